//! One error type for the HTTP API, mapped to OpenAI's error body and status codes, and to
//! an SSE error event once a stream has started.

use arbor_engine::EngineError;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::openai::{ErrorBody, ErrorDetail};

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not valid JSON of the expected shape.
    #[error("invalid request body: {0}")]
    BadJson(String),
    /// A parameter is out of range or unsupported.
    #[error("{message}")]
    InvalidParam {
        /// The parameter's name.
        param: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Prompt plus requested tokens exceed the model's context.
    #[error("{0}")]
    ContextLength(String),
    /// The body is larger than the server accepts.
    #[error("request body larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// No such model is served.
    #[error("the model `{0}` does not exist (see GET /v1/models)")]
    UnknownModel(String),
    /// No such route.
    #[error("no route {0}")]
    NotFound(String),
    /// Too many requests queued or running.
    #[error("server busy: {in_flight} requests in flight (limit {limit}); retry shortly")]
    Busy {
        /// Requests in flight.
        in_flight: usize,
        /// The limit.
        limit: usize,
    },
    /// The server is shutting down.
    #[error("server is shutting down")]
    ShuttingDown,
    /// The request ran past its deadline.
    #[error("{0}")]
    Timeout(String),
    /// The engine failed.
    #[error("generation failed: {0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadJson(_) | Self::InvalidParam { .. } | Self::ContextLength(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnknownModel(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Busy { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's error body.
    pub fn body(&self) -> ErrorBody {
        let (kind, code, param) = match self {
            Self::BadJson(_) => ("invalid_request_error", Some("invalid_json"), None),
            Self::InvalidParam { param, .. } => (
                "invalid_request_error",
                Some("invalid_value"),
                Some((*param).to_string()),
            ),
            Self::ContextLength(_) => (
                "invalid_request_error",
                Some("context_length_exceeded"),
                Some("messages".into()),
            ),
            Self::TooLarge { .. } => ("invalid_request_error", Some("request_too_large"), None),
            Self::UnknownModel(_) => (
                "invalid_request_error",
                Some("model_not_found"),
                Some("model".into()),
            ),
            Self::NotFound(_) => ("invalid_request_error", Some("not_found"), None),
            Self::Busy { .. } => ("rate_limit_error", Some("rate_limit_exceeded"), None),
            Self::ShuttingDown => ("server_error", Some("shutting_down"), None),
            Self::Timeout(_) => ("server_error", Some("timeout"), None),
            Self::Internal(_) => ("server_error", None, None),
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind,
                param,
                code,
            },
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::PromptTooLong { .. } | EngineError::KvCapacity { .. } => {
                Self::ContextLength(e.to_string())
            }
            EngineError::EmptyPrompt => Self::InvalidParam {
                param: "messages",
                message: e.to_string(),
            },
            EngineError::InvalidParams(m) => Self::InvalidParam {
                param: "parameters",
                message: m,
            },
            EngineError::QueueFull { in_flight, limit } => Self::Busy { in_flight, limit },
            EngineError::Timeout { .. } => Self::Timeout(e.to_string()),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, %status, "request refused");
        }
        let mut resp = (status, axum::Json(self.body())).into_response();
        if matches!(self, Self::Busy { .. } | Self::ShuttingDown) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

//! The `arbor` binary's library half: draft loading shared by its commands, and the
//! OpenAI-compatible HTTP server ([`http`]) that `arbor serve` runs.

pub mod drafts;
pub mod http;

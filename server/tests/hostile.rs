//! Hostile and malformed requests: each gets a 4xx with OpenAI's error body, and the server
//! stays healthy. Backpressure (429 + Retry-After) and request timeouts.

mod common;

use std::time::Duration;

use arbor_engine::SchedulerConfig;
use arbor_server::http::ServeConfig;
use serde_json::{Value, json};

use common::{model_name, post, raw_post, smollm2, start};

fn chat(extra: Value) -> Value {
    let mut v = json!({
        "model": model_name(),
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_get_clear_4xx_errors() {
    let server = start(ServeConfig::new(smollm2())).await;
    let c = reqwest::Client::new();
    let chat_url = server.url("/v1/chat/completions");
    let huge_prompt = "word ".repeat(20_000);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("malformed JSON", b"{\"model\": ".to_vec(), 400, "invalid_json"),
        ("not an object", b"[1, 2]".to_vec(), 400, "invalid_json"),
        ("empty body", Vec::new(), 400, "invalid_json"),
        ("wrong type", chat(json!({"max_tokens": "ten"})).to_string().into_bytes(), 400, "invalid_json"),
        ("messages not a list", chat(json!({"messages": "hi"})).to_string().into_bytes(), 400, "invalid_json"),
        ("unknown field", chat(json!({"best_of": 3})).to_string().into_bytes(), 400, "invalid_json"),
        ("empty messages", chat(json!({"messages": []})).to_string().into_bytes(), 400, "invalid_value"),
        ("unknown role", chat(json!({"messages": [{"role": "wizard", "content": "x"}]})).to_string().into_bytes(), 400, "invalid_value"),
        ("image part", chat(json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})).to_string().into_bytes(), 400, "invalid_value"),
        ("prompt over context", chat(json!({"messages": [{"role": "user", "content": huge_prompt}]})).to_string().into_bytes(), 400, "context_length_exceeded"),
        ("max_tokens 0", chat(json!({"max_tokens": 0})).to_string().into_bytes(), 400, "invalid_value"),
        ("max_tokens huge", chat(json!({"max_tokens": 1_000_000_000u64})).to_string().into_bytes(), 400, "context_length_exceeded"),
        ("max_tokens negative", chat(json!({"max_tokens": -5})).to_string().into_bytes(), 400, "invalid_json"),
        ("negative temperature", chat(json!({"temperature": -0.5})).to_string().into_bytes(), 400, "invalid_value"),
        ("top_p > 1", chat(json!({"top_p": 1.5})).to_string().into_bytes(), 400, "invalid_value"),
        ("top_k negative", chat(json!({"top_k": -3})).to_string().into_bytes(), 400, "invalid_value"),
        ("n = 2", chat(json!({"n": 2})).to_string().into_bytes(), 400, "invalid_value"),
        ("logprobs", chat(json!({"logprobs": true})).to_string().into_bytes(), 400, "invalid_value"),
        ("tools", chat(json!({"tools": [{"type": "function", "function": {"name": "f"}}]})).to_string().into_bytes(), 400, "invalid_value"),
        ("empty stop", chat(json!({"stop": [""]})).to_string().into_bytes(), 400, "invalid_value"),
        ("five stops", chat(json!({"stop": ["a", "b", "c", "d", "e"]})).to_string().into_bytes(), 400, "invalid_value"),
        ("stream_options without stream", chat(json!({"stream_options": {"include_usage": true}})).to_string().into_bytes(), 400, "invalid_value"),
        ("negative seed", chat(json!({"seed": -1})).to_string().into_bytes(), 400, "invalid_value"),
        ("unknown model", chat(json!({"model": "gpt-9"})).to_string().into_bytes(), 404, "model_not_found"),
        ("invalid UTF-8", {
            let mut b = br#"{"model": "x", "messages": [{"role": "user", "content": ""#.to_vec();
            b.extend_from_slice(&[0xff, 0xfe, 0x80]);
            b.extend_from_slice(br#""}]}"#);
            b
        }, 400, "invalid_json"),
        ("10 MB body", {
            let mut b = br#"{"model": "x", "messages": [{"role": "user", "content": ""#.to_vec();
            b.extend(std::iter::repeat_n(b'a', 10 << 20));
            b.extend_from_slice(br#""}]}"#);
            b
        }, 413, "request_too_large"),
    ];
    for (what, body, status, code) in cases {
        let (got, v) = if body.len() > 1 << 20 {
            raw_post(&server.base, "/v1/chat/completions", body).await
        } else {
            post(&c, &chat_url, body).await
        };
        assert_eq!(got, status, "{what}: {v}");
        let err = &v["error"];
        assert_eq!(err["code"], code, "{what}: {v}");
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
        assert!(err["type"].is_string(), "{what}: {v}");
    }
    // Completions and the tokenizer endpoints check their inputs too.
    let (s, v) = post(
        &c,
        &server.url("/v1/completions"),
        json!({"model": model_name(), "prompt": [1, 2, 99_999_999], "max_tokens": 2}).to_string(),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = post(
        &c,
        &server.url("/v1/completions"),
        json!({"model": model_name(), "prompt": ["a", "b"]}).to_string(),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = post(
        &c,
        &server.url("/detokenize"),
        json!({"tokens": [-1]}).to_string(),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) = post(
        &c,
        &server.url("/tokenize"),
        json!({"prompt": "hello", "messages": []}).to_string(),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    let r = c.get(server.url("/v1/nothing")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // Still healthy and still serving, and the metrics count the refusals.
    let r = c.get(server.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let (s, v) = post(&c, &chat_url, chat(json!({"temperature": 0})).to_string()).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = post(
        &c,
        &server.url("/tokenize"),
        json!({"prompt": "hello world"}).to_string(),
    )
    .await;
    assert_eq!(s, 200);
    let (s2, back) = post(
        &c,
        &server.url("/detokenize"),
        json!({"tokens": v["tokens"]}).to_string(),
    )
    .await;
    assert_eq!((s2, back["prompt"].as_str()), (200, Some("hello world")));
    assert!(
        server
            .metric("arbor_requests_total{endpoint=\"chat\",status=\"400\"}")
            .await
            >= 20.0
    );
    server.stop().await;
}

/// A bounded queue: with one running and one waiting slot, a third concurrent request gets
/// 429 with Retry-After at once; a request past its deadline gets 504.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_server_answers_429_and_deadlines_504() {
    let mut config = ServeConfig::new(smollm2());
    config.scheduler = SchedulerConfig {
        max_running: 1,
        max_waiting: 1,
        ..SchedulerConfig::default()
    };
    config.request_timeout = Some(Duration::from_millis(3000));
    let server = start(config).await;
    let c = reqwest::Client::new();
    let url = server.url("/v1/chat/completions");
    let long = chat(json!({"max_tokens": 4000, "ignore_eos": true, "temperature": 0})).to_string();
    let a = tokio::spawn({
        let (c, url, long) = (c.clone(), url.clone(), long.clone());
        async move { post(&c, &url, long).await }
    });
    let b = tokio::spawn({
        let (c, url, long) = (c.clone(), url.clone(), long.clone());
        async move { post(&c, &url, long).await }
    });
    // Wait until one runs and one waits (both slots taken).
    let t0 = std::time::Instant::now();
    while server.metric("arbor_running_sequences").await + server.metric("arbor_queue_depth").await
        < 2.0
    {
        if a.is_finished() || b.is_finished() {
            let r = if a.is_finished() { a.await } else { b.await };
            panic!("a long request ended early: {r:?}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the long requests never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = c
        .post(&url)
        .body(chat(json!({})).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    // Both long ones run into the 3 s deadline.
    for h in [a, b] {
        let (s, v) = h.await.unwrap();
        assert_eq!(s, 504, "{v}");
        assert_eq!(v["error"]["code"], "timeout");
    }
    // Everything is released.
    server.wait_idle().await;
    let (s, _) = post(&c, &url, chat(json!({})).to_string()).await;
    assert_eq!(s, 200);
    server.stop().await;
}

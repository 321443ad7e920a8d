//! Many clients at once: batched greedy output equals each request alone, and 64 streams
//! with a third of the clients vanishing mid-stream leave nothing behind.

mod common;

use std::time::{Duration, Instant};

use arbor_server::drafts::DraftSpec;
use arbor_server::http::ServeConfig;
use futures_util::StreamExt;
use serde_json::{Value, json};

use common::{model_name, post, smollm2, sse_data, start};

fn prompts() -> Vec<String> {
    let topics = [
        "the sea",
        "trees",
        "a robot",
        "Paris",
        "numbers",
        "the moon",
        "music",
        "rain",
        "a cat",
        "winter",
        "bread",
        "rivers",
        "stars",
        "a library",
        "trains",
        "gardens",
    ];
    topics
        .iter()
        .map(|t| format!("Write one sentence about {t}."))
        .collect()
}

async fn greedy(c: &reqwest::Client, base: &str, prompt: &str) -> String {
    let body = json!({
        "model": model_name(),
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 24, "temperature": 0,
    });
    let (status, v) = post(c, &format!("{base}/v1/chat/completions"), body.to_string()).await;
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Greedy outputs are identical whether a request runs alone or batched with 15 others,
/// with speculation on (n-gram draft; trees shrink as the batch grows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_greedy_equals_alone() {
    let mut config = ServeConfig::new(smollm2());
    config.drafts = vec![DraftSpec::Ngram(4)];
    let server = start(config).await;
    let c = reqwest::Client::new();
    let mut alone = Vec::new();
    for p in prompts() {
        alone.push(greedy(&c, &server.base, &p).await);
    }
    let tasks: Vec<_> = prompts()
        .into_iter()
        .map(|p| {
            let c = c.clone();
            let url = server.url("");
            tokio::spawn(async move { greedy(&c, &url, &p).await })
        })
        .collect();
    let mut together = Vec::new();
    for t in tasks {
        together.push(t.await.unwrap());
    }
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "request {i} differs when batched");
    }
    // The batch really was a batch: steps with more than one row happened.
    assert!(
        server.metric("arbor_engine_step_rows_sum").await
            > server.metric("arbor_engine_step_rows_count").await
    );
    server.stop().await;
}

/// Reads an SSE stream; stops after `drop_after` events (then the connection is dropped).
async fn stream_chat(
    c: reqwest::Client,
    url: String,
    i: usize,
    drop_after: Option<usize>,
) -> Result<usize, String> {
    let body = json!({
        "model": model_name(),
        "messages": [{"role": "user", "content": format!("Tell story number {i}.")}],
        "max_tokens": 16 + i % 8, "temperature": 0.7, "seed": i, "stream": true,
    });
    let r = c
        .post(&url)
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status() != 200 {
        return Err(format!("status {}", r.status()));
    }
    let mut bytes = r.bytes_stream();
    let mut buf = String::new();
    let mut events = 0;
    while let Some(chunk) = bytes.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.map_err(|e| e.to_string())?));
        events = sse_data(&buf).len();
        if drop_after.is_some_and(|n| events >= n) {
            return Ok(events); // drops the response: the client disconnects
        }
    }
    let data = sse_data(&buf);
    if data.last().map(String::as_str) != Some("[DONE]") {
        return Err(format!("stream ended without [DONE]: {buf}"));
    }
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).map_err(|e| format!("{e}: {d}"))?;
        if v.get("error").is_some() {
            return Err(d.clone());
        }
    }
    Ok(events)
}

/// 64 concurrent streams, a third of the clients disconnecting at random points: every
/// remaining stream completes, and afterwards nothing runs and every KV page is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_streams_with_disconnects_leave_nothing_behind() {
    // Any panic anywhere in the process (handlers, the engine thread) is counted.
    static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        default_hook(info);
    }));
    let mut config = ServeConfig::new(smollm2());
    config.drafts = vec![DraftSpec::Ngram(4)];
    let server = start(config).await;
    let c = reqwest::Client::new();
    let url = server.url("/v1/chat/completions");
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            // Every third client leaves after 1–9 events (a pseudo-random point).
            let drop_after = (i % 3 == 0).then_some(1 + (i * 7) % 9);
            tokio::spawn(stream_chat(c.clone(), url.clone(), i, drop_after))
        })
        .collect();
    let mut completed = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let r = tokio::time::timeout(Duration::from_secs(300), t)
            .await
            .expect("no request is stuck")
            .unwrap();
        match r {
            Ok(_) => completed += 1,
            Err(e) => panic!("request {i}: {e}"),
        }
    }
    assert_eq!(completed, 64);
    // Cancelled sequences are dropped within a step; give the engine a moment to notice.
    server.wait_idle().await;
    assert_eq!(server.metric("arbor_kv_tokens").await, 0.0);
    let finished = server.metric("arbor_request_duration_seconds_count").await;
    assert!(finished >= 42.0, "{finished} requests finished");
    eprintln!("64 streams in {:.1} s", t0.elapsed().as_secs_f64());
    // Still healthy, and nothing panicked.
    let r = c.get(server.url("/health")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    server.stop().await;
    assert_eq!(
        PANICS.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a panic happened"
    );
}

/// With the KV cache compressed (`--kv-bits 2 --kv-window 16 --quest-budget 100
/// --h2o-budget 48`: most of each prompt read as 2-bit codes, pages selected, tokens evicted)
/// the server still gives each request the same greedy text alone and batched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_kv_cache_serves_batch_invariantly() {
    let mut config = ServeConfig::new(smollm2());
    config.kv = arbor_server::kv::KvSpec {
        quant: Some(arbor_cache::QuantConfig {
            bits: 2,
            window: 16,
            ..arbor_cache::QuantConfig::default()
        }),
        calibration: None,
        quest_budget: Some(100),
        h2o_budget: Some(48),
    };
    let server = start(config).await;
    let c = reqwest::Client::new();
    let ps: Vec<String> = prompts().into_iter().take(4).collect();
    let mut alone = Vec::new();
    for p in &ps {
        alone.push(greedy(&c, &server.base, p).await);
    }
    let tasks: Vec<_> = ps
        .iter()
        .cloned()
        .map(|p| {
            let c = c.clone();
            let url = server.url("");
            tokio::spawn(async move { greedy(&c, &url, &p).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), alone[i], "request {i}");
    }
    assert!(server.metric("arbor_kv_bytes").await >= 0.0);
    server.stop().await;
}

//! A real `arbor serve` (in-process, on a loopback port) over SmolLM2 for the HTTP tests.

#![allow(dead_code)] // each test binary uses part of it

use std::time::Duration;

use arbor_model::device::Cpu;
use arbor_server::http::{ServeConfig, serve};
use serde_json::Value;

pub struct TestServer {
    pub base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// The SmolLM2 checkpoint (fetched on first use).
pub fn smollm2() -> String {
    arbor_tests::smollm2_path().display().to_string()
}

/// Serve `config` on 127.0.0.1:0 and wait until it answers `/health`.
pub async fn start(config: ServeConfig) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(serve::<Cpu>(listener, config, Default::default(), async {
        let _ = rx.await;
    }));
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(r) = client.get(format!("{base}/health")).send().await
            && r.status().is_success()
        {
            return TestServer {
                base,
                stop: Some(tx),
                handle,
            };
        }
        assert!(!handle.is_finished(), "server ended while starting");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("server did not come up");
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Shuts down and waits for the server to return.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(60), &mut self.handle)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }

    /// A metric's value from `/metrics` (first sample whose line starts with `name`).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }
}

impl TestServer {
    /// Waits (up to 30 s) until nothing runs or waits and every KV page is free; the engine
    /// updates its gauges after the step that ended the last request, a moment after the
    /// client saw the end.
    pub async fn wait_idle(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let running = self.metric("arbor_running_sequences").await;
            let waiting = self.metric("arbor_queue_depth").await;
            let used = self.metric("arbor_kv_pages_used").await;
            if running == 0.0 && waiting == 0.0 && used == 0.0 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "left behind: {running} running, {waiting} waiting, {used} KV pages"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Model name the server answers to.
pub fn model_name() -> String {
    smollm2()
}

/// POST JSON, return status and body.
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let r = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let v =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("non-JSON body ({status}): {text}"));
    (status, v)
}

/// POST over a raw socket with `Expect: 100-continue`: the body goes out only after the
/// server's `100 Continue` (or a second without an answer), so a server that refuses early
/// (413) answers before any body byte is sent — a client library writing a 10 MB body into a
/// closed connection gets a broken pipe instead of the response.
pub async fn raw_post(base: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        body.len()
    );
    wr.write_all(head.as_bytes()).await.unwrap();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(1), go_rx).await;
        let _ = wr.write_all(&body).await;
    });
    let mut go = Some(go_tx);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let response = loop {
        match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => break String::from_utf8_lossy(&buf).to_string(),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(rest) = text.strip_prefix("HTTP/1.1 100 Continue\r\n\r\n") {
            buf = rest.as_bytes().to_vec();
            if let Some(tx) = go.take() {
                let _ = tx.send(());
            }
            continue;
        }
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok());
            if len.is_some_and(|n| body.len() >= n) {
                break text;
            }
        }
    };
    writer.abort();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no response: {response:?}"));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
    (
        status,
        serde_json::from_str(body).unwrap_or_else(|_| panic!("non-JSON body: {body}")),
    )
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| {
            ev.lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_string)
        })
        .collect()
}

/// Runs `cmd` (an `arbor` command that writes a JSON report to `json`), asserts that it
/// succeeded (showing its stderr otherwise), and returns its stdout and the parsed report.
pub fn json_report(cmd: &mut std::process::Command, json: &std::path::Path) -> (String, Value) {
    let out = cmd.arg("--json").arg(json).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
    (String::from_utf8_lossy(&out.stdout).into_owned(), report)
}

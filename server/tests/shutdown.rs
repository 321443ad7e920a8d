//! SIGTERM on the real `arbor serve` binary: it stops taking requests, lets a running stream
//! finish, and exits 0.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

use common::{smollm2, sse_data};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_running_streams_then_exits_0() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_arbor"))
        .args([
            "serve",
            "--no-fetch",
            "--port",
            "0",
            "--grace-period",
            "60",
            "--model",
        ])
        .arg(smollm2())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("server printed its address").unwrap();
        if let Some(rest) = line.split("will listen on ").nth(1) {
            break rest.trim().to_string();
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    let log = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let c = reqwest::Client::new();
    let t0 = Instant::now();
    while c.get(format!("{base}/health")).send().await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "server did not come up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = json!({
        "model": smollm2(), "prompt": "Once upon a time", "max_tokens": 80,
        "ignore_eos": true, "temperature": 0, "stream": true,
    });
    let r = c
        .post(format!("{base}/v1/completions"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut bytes = r.bytes_stream();
    let mut buf = String::new();
    // Wait for the first token, then ask the server to stop.
    while sse_data(&buf).is_empty() {
        buf.push_str(&String::from_utf8_lossy(
            &bytes.next().await.unwrap().unwrap(),
        ));
    }
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    // New requests are refused (closed listener or 503) while the stream keeps going.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refused = match c.get(format!("{base}/health")).send().await {
        Err(_) => true,
        Ok(r) => r.status() == 503,
    };
    assert!(refused, "new requests must not be served after SIGTERM");
    while let Some(chunk) = bytes.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    let data = sse_data(&buf);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{buf}");
    let texts = data.iter().filter(|d| d.contains("\"text\"")).count();
    assert!(
        texts >= 80,
        "the stream finished all its tokens ({texts} chunks)"
    );
    // And the process exits 0, well within the grace period.
    let t0 = Instant::now();
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "server did not exit"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = log.join().unwrap();
    assert!(code.success(), "exit {code:?}; log:\n{}", log.join("\n"));
    assert!(
        !log.iter().any(|l| l.contains("panicked")),
        "{}",
        log.join("\n")
    );
}

//! Hostile clients: slow headers, slow bodies, huge headers, many connections. Each gets a
//! bounded answer (or a closed connection) and the service keeps serving everyone else.

use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::testkit::{start_switchyard, MockServer, Process, TestDatabase};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "wk_limits";

async fn setup(label: &str) -> (TestDatabase, MockServer, switchyard::cli::serve::Running) {
    let db = TestDatabase::create(label).await;
    let sink = MockServer::start().await;
    let config = format!(
        "[[sources]]\nname = \"web\"\nwrite_key = \"{KEY}\"\n\n[[destinations]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\n",
        sink.url("/in")
    );
    let sy = start_switchyard(&config, &db.url).await;
    (db, sink, sy)
}

async fn healthy(addr: std::net::SocketAddr) -> bool {
    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/v1/track"))
        .basic_auth(KEY, Some(""))
        .json(&json!({"event": "E", "userId": "u"}))
        .send()
        .await;
    response.is_ok_and(|r| r.status() == 200) && started.elapsed() < Duration::from_secs(2)
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    let mut answer = Vec::new();
    tokio::time::timeout(limit, stream.read_to_end(&mut answer))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let (_db, _sink, sy) = setup("slowloris").await;
    let mut stream = TcpStream::connect(sy.addr).await.unwrap();
    stream
        .write_all(b"POST /v1/track HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // ... and never finish the headers.
    let started = Instant::now();
    let closed = read_to_close(&mut stream, Duration::from_secs(10)).await;
    assert!(closed.is_some(), "the connection was closed");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "within the header timeout"
    );
    assert!(healthy(sy.addr).await);
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_slow_body_gets_408() {
    let (_db, sink, sy) = setup("slow_body").await;
    let mut stream = TcpStream::connect(sy.addr).await.unwrap();
    let head = format!(
        "POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"event\":",
        base64_key()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("an answer within the body timeout")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"body_timeout\""), "{answer}");
    assert!(healthy(sy.addr).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.events().len(), 1, "only the healthy request's event");
    sy.shutdown().await.unwrap();
}

fn base64_key() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{KEY}:"))
}

#[tokio::test]
async fn huge_headers_are_refused() {
    let (_db, _sink, sy) = setup("huge_headers").await;
    let mut stream = TcpStream::connect(sy.addr).await.unwrap();
    let filler = "a".repeat(200 * 1024);
    let request = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: {filler}\r\n\r\n");
    let _ = stream.write_all(request.as_bytes()).await;
    let answer = read_to_close(&mut stream, Duration::from_secs(5))
        .await
        .expect("refused and closed within 5 s, not left hanging");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{}",
        &answer[..answer.len().min(80)]
    );
    assert!(healthy(sy.addr).await);
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn many_idle_connections_do_not_block_real_clients() {
    // The real binary, so that its memory is measured apart from this test's own.
    let db = TestDatabase::create("many_connections").await;
    let sink = MockServer::start().await;
    let config = format!(
        "[[sources]]\nname = \"web\"\nwrite_key = \"{KEY}\"\n\n[[destinations]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\n",
        sink.url("/in")
    );
    let sy = Process::spawn(env!("CARGO_BIN_EXE_switchyard"), &config, &db.url).await;
    assert!(healthy(sy.addr).await, "warmed up before the baseline");
    let before = sy.proc_status("VmRSS:");
    let mut idle = Vec::new();
    for _ in 0..1000 {
        idle.push(TcpStream::connect(sy.addr).await.unwrap());
    }
    assert!(
        healthy(sy.addr).await,
        "a real client is served next to 1,000 idle connections"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let open = sy.open_files();
    assert!(
        open >= 1000,
        "the server holds the 1,000 connections: {open} open files"
    );
    let grown = sy.proc_status("VmRSS:").saturating_sub(before);
    println!("1,000 idle connections: server RSS {before} kB + {grown} kB, {open} open files");
    assert!(
        grown < 50 * 1024,
        "1,000 idle connections cost the server {grown} kB"
    );
    // The idle ones are closed by the header timeout (15 s in the binary).
    let mut closed = 0;
    for stream in idle.iter_mut().take(20) {
        if read_to_close(stream, Duration::from_secs(25))
            .await
            .is_some()
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 20);
    drop(sink);
}

//! The demo's local sink: stands in for the vendors, answers 200 to every request and keeps
//! what it received so the tour can show it. (The test kit's mock receiver is scriptable and
//! lives behind the `testkit` feature; the demo ships in the binary, so it has its own.)

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use bytes::Bytes;
use serde_json::Value;

/// A request the sink received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The status the sink answered (always 200).
    pub status: u16,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

type Log = Arc<Mutex<Vec<Received>>>;

/// A loopback HTTP receiver that records every request.
pub struct Sink {
    pub addr: SocketAddr,
    log: Log,
}

impl Sink {
    pub async fn start() -> std::io::Result<Sink> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let log = Log::default();
        let app = axum::Router::new().fallback(record).with_state(log.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Sink { addr, log })
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until `done(self)` holds, or `limit` passes; returns whether it held.
    pub async fn wait_until(&self, limit: Duration, done: impl Fn(&Sink) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while !done(self) {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }
}

async fn record(State(log): State<Log>, request: Request) -> &'static str {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    log.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Received {
            path: parts.uri.path().to_owned(),
            headers: parts.headers,
            body,
            status: 200,
        });
    r#"{"ok":true}"#
}

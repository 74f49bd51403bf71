//! The mock receiver: records every request and answers as scripted (200, any status with
//! headers, after a delay, or never).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::Notify;

type Script = Box<dyn FnMut(usize, &Received) -> Reply + Send>;

/// A request the mock received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
    /// The status the mock answered (0 while it is still answering or when it hung).
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

/// How the mock answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
        delay: Duration,
    },
    /// Never answers (the connection stays open).
    Hang,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::status(200)
    }

    pub fn status(status: u16) -> Reply {
        Reply::Status {
            status,
            headers: Vec::new(),
            body: r#"{"ok":true}"#.into(),
            delay: Duration::ZERO,
        }
    }

    pub fn with_header(self, name: &str, value: &str) -> Reply {
        match self {
            Reply::Status {
                status,
                mut headers,
                body,
                delay,
            } => {
                headers.push((name.into(), value.into()));
                Reply::Status {
                    status,
                    headers,
                    body,
                    delay,
                }
            }
            Reply::Hang => Reply::Hang,
        }
    }

    pub fn with_body(self, text: &str) -> Reply {
        match self {
            Reply::Status {
                status,
                headers,
                delay,
                ..
            } => Reply::Status {
                status,
                headers,
                body: text.into(),
                delay,
            },
            Reply::Hang => Reply::Hang,
        }
    }

    pub fn after(self, wait: Duration) -> Reply {
        match self {
            Reply::Status {
                status,
                headers,
                body,
                ..
            } => Reply::Status {
                status,
                headers,
                body,
                delay: wait,
            },
            Reply::Hang => Reply::Hang,
        }
    }
}

struct MockState {
    received: Mutex<Vec<Received>>,
    script: Mutex<Script>,
    arrived: Notify,
}

/// A local HTTP receiver that records requests and answers as scripted.
#[derive(Clone)]
pub struct MockServer {
    pub addr: SocketAddr,
    state: Arc<MockState>,
}

impl MockServer {
    /// A receiver that answers 200 to everything.
    pub async fn start() -> MockServer {
        MockServer::scripted(|_, _| Reply::ok()).await
    }

    /// A receiver whose answer to the n-th request (from 1) is `script(n, request)`.
    pub async fn scripted(
        script: impl FnMut(usize, &Received) -> Reply + Send + 'static,
    ) -> MockServer {
        let state = Arc::new(MockState {
            received: Mutex::new(Vec::new()),
            script: Mutex::new(Box::new(script)),
            arrived: Notify::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port");
        let addr = listener.local_addr().expect("a bound address");
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        MockServer { addr, state }
    }

    /// Changes the script from now on.
    pub fn script(&self, script: impl FnMut(usize, &Received) -> Reply + Send + 'static) {
        *self.state.script.lock().expect("script lock") = Box::new(script);
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("received lock").clone()
    }

    /// Every event in bodies answered 2xx: a body that is one event, `{"batch": [...]}`, or an
    /// array of events.
    pub fn events(&self) -> Vec<Value> {
        let mut events = Vec::new();
        for request in self.received() {
            if !(200..300).contains(&request.status) {
                continue;
            }
            match request.json() {
                Value::Object(mut body) if body.get("batch").is_some_and(Value::is_array) => {
                    if let Some(Value::Array(batch)) = body.remove("batch") {
                        events.extend(batch);
                    }
                }
                Value::Array(batch) => events.extend(batch),
                Value::Null => {}
                other => events.push(other),
            }
        }
        events
    }

    /// messageIds of [`MockServer::events`].
    pub fn message_ids(&self) -> Vec<String> {
        self.events()
            .iter()
            .filter_map(|e| e["messageId"].as_str().map(str::to_owned))
            .collect()
    }

    /// Waits until `done(self)` holds, or `limit` passes; returns whether it held.
    pub async fn wait_until(&self, limit: Duration, done: impl Fn(&MockServer) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if done(self) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = tokio::time::timeout(
                left.min(Duration::from_millis(100)),
                self.state.arrived.notified(),
            )
            .await;
        }
    }
}

async fn answer(State(state): State<Arc<MockState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let body = if parts
        .headers
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"))
    {
        let mut out = Vec::new();
        let mut decoder = flate2::read::GzDecoder::new(&body[..]);
        match std::io::Read::read_to_end(&mut decoder, &mut out) {
            Ok(_) => Bytes::from(out),
            Err(_) => body,
        }
    } else {
        body
    };
    let mut received = Received {
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers,
        body,
        at: Instant::now(),
        status: 0,
    };
    let (index, reply) = {
        let mut log = state.received.lock().expect("received lock");
        let index = log.len();
        let reply = (state.script.lock().expect("script lock"))(index + 1, &received);
        if let Reply::Status { status, .. } = &reply {
            received.status = *status;
        }
        // Recorded as answered once the delay (if any) has passed.
        let mut recorded = received.clone();
        if matches!(&reply, Reply::Status { delay, .. } if !delay.is_zero()) {
            recorded.status = 0;
        }
        log.push(recorded);
        (index, reply)
    };
    state.arrived.notify_waiters();
    match reply {
        Reply::Hang => {
            futures::future::pending::<()>().await;
            StatusCode::OK.into_response()
        }
        Reply::Status {
            status,
            headers,
            body,
            delay,
        } => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
                if let Some(entry) = state.received.lock().expect("received lock").get_mut(index) {
                    entry.status = status;
                }
                state.arrived.notify_waiters();
            }
            let mut response = (
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body,
            )
                .into_response();
            for (name, value) in headers {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&value),
                ) {
                    response.headers_mut().insert(name, value);
                }
            }
            response
        }
    }
}

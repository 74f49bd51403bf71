//! The load generator: one task per keep-alive HTTP/1.1 connection, sending Segment calls
//! closed-loop (the next request as soon as the answer is back) or open-loop (on a fixed
//! schedule, latency counted from the scheduled instant so a slow server cannot hide its
//! queueing delay).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::events::{EventMaker, WRITE_KEY};
use crate::timing::{self, Latencies};

/// One keep-alive connection to a server, opened again after an error.
pub struct Connection {
    addr: SocketAddr,
    host: HeaderValue,
    auth: HeaderValue,
    sender: Option<http1::SendRequest<Full<Bytes>>>,
}

impl Connection {
    pub fn new(addr: SocketAddr) -> Connection {
        let auth = format!("Basic {}", BASE64.encode(format!("{WRITE_KEY}:")));
        Connection {
            addr,
            host: HeaderValue::from_str(&addr.to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("127.0.0.1")),
            auth: HeaderValue::from_str(&auth).unwrap_or_else(|_| HeaderValue::from_static("")),
            sender: None,
        }
    }

    /// A connection that authenticates with `Authorization: Bearer token` (the admin API).
    pub fn bearer(addr: SocketAddr, token: &str) -> Connection {
        let mut connection = Connection::new(addr);
        connection.auth = HeaderValue::from_str(&format!("Bearer {token}"))
            .unwrap_or_else(|_| HeaderValue::from_static(""));
        connection
    }

    async fn open(&self) -> anyhow::Result<http1::SendRequest<Full<Bytes>>> {
        let stream = TcpStream::connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// Sends one request and reads the whole answer: (status, body).
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<(u16, Bytes)> {
        let result = self.try_send(method, path, body).await;
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn try_send(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<(u16, Bytes)> {
        let mut sender = match self.sender.take() {
            Some(sender) => sender,
            None => self.open().await?,
        };
        sender.ready().await?;
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.host.clone())
            .header(AUTHORIZATION, self.auth.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        self.sender = Some(sender);
        Ok((status, body))
    }
}

/// Which Segment endpoint a load sends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/track`: one event a request.
    Track,
    /// `/v1/batch` with this many events a request.
    Batch(usize),
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Track => "/v1/track",
            Endpoint::Batch(_) => "/v1/batch",
        }
    }

    fn events_per_request(self) -> u64 {
        match self {
            Endpoint::Track => 1,
            Endpoint::Batch(n) => n.max(1) as u64,
        }
    }
}

/// Holds the sender back while more than `max_outstanding` acknowledged events are not yet at
/// the sink: a closed loop over the whole pipeline, so ingest runs exactly as fast as delivery
/// and the queue stays short.
#[derive(Clone)]
pub struct Throttle {
    pub delivered: Arc<AtomicU64>,
    pub max_outstanding: u64,
}

/// What to send, how fast, and for how long.
pub struct Load {
    pub endpoint: Endpoint,
    pub connections: usize,
    /// Events per second on a fixed schedule; `None`: closed loop.
    pub rate: Option<f64>,
    /// Stop once this many events were sent (a backlog fill); `None`: run for `duration`.
    pub total_events: Option<u64>,
    /// The hard stop.
    pub duration: Duration,
    /// Requests scheduled before this are left out of the reported window.
    pub warmup: Duration,
    pub throttle: Option<Throttle>,
    pub events: EventMaker,
}

impl Load {
    pub fn closed(endpoint: Endpoint, connections: usize, duration: Duration) -> Load {
        Load {
            endpoint,
            connections,
            rate: None,
            total_events: None,
            duration,
            warmup: Duration::ZERO,
            throttle: None,
            events: EventMaker::single("Order Completed"),
        }
    }

    pub fn open(endpoint: Endpoint, connections: usize, rate: f64, duration: Duration) -> Load {
        Load {
            rate: Some(rate),
            ..Load::closed(endpoint, connections, duration)
        }
    }

    /// Sends `total` events as fast as they are taken, giving up after `limit`.
    pub fn fill(endpoint: Endpoint, connections: usize, total: u64, limit: Duration) -> Load {
        Load {
            total_events: Some(total),
            ..Load::closed(endpoint, connections, limit)
        }
    }

    pub fn warmup(self, warmup: Duration) -> Load {
        Load { warmup, ..self }
    }

    pub fn events(self, events: EventMaker) -> Load {
        Load { events, ..self }
    }

    pub fn throttle(self, throttle: Throttle) -> Load {
        Load {
            throttle: Some(throttle),
            ..self
        }
    }
}

/// What a load achieved.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Events answered 200 in the whole run.
    pub acked: u64,
    /// Events answered 200 for requests scheduled after the warmup.
    pub window_acked: u64,
    pub window: Duration,
    /// Request latencies after the warmup (open loop: from the scheduled instant).
    pub latencies: Latencies,
    /// Failed requests by cause.
    pub failures: BTreeMap<String, u64>,
    /// Requests answered 200 after the warmup.
    pub window_requests: u64,
}

impl LoadReport {
    pub fn events_per_sec(&self) -> f64 {
        per_sec(self.window_acked, self.window)
    }

    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// The failures as `cause=count` pairs, for a report line.
    pub fn failure_summary(&self) -> String {
        self.failures
            .iter()
            .map(|(cause, n)| format!("{cause}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `count` over `window`, per second.
pub fn per_sec(count: u64, window: Duration) -> f64 {
    if window.is_zero() {
        0.0
    } else {
        count as f64 / window.as_secs_f64()
    }
}

/// Counters the connection tasks share.
struct Shared {
    /// The next request's number: it fixes the request's events and its slot in the schedule.
    next: AtomicU64,
    acked: AtomicU64,
}

/// One connection's tally.
#[derive(Default)]
struct Tally {
    acked: u64,
    window_acked: u64,
    window_requests: u64,
    latencies: Latencies,
    failures: BTreeMap<String, u64>,
    last_done: Option<Instant>,
}

/// Runs `load` against the server at `addr`; returns once every connection is done.
pub async fn run(addr: SocketAddr, load: Load) -> LoadReport {
    let load = Arc::new(load);
    let shared = Arc::new(Shared {
        next: AtomicU64::new(0),
        acked: AtomicU64::new(0),
    });
    let start = Instant::now();
    let tasks: Vec<_> = (0..load.connections.max(1))
        .map(|_| tokio::spawn(drive(addr, load.clone(), shared.clone(), start)))
        .collect();
    let mut report = LoadReport::default();
    let mut last_done = start;
    for task in tasks {
        let tally = match task.await {
            Ok(tally) => tally,
            Err(error) => {
                *report.failures.entry(format!("task: {error}")).or_default() += 1;
                continue;
            }
        };
        report.acked += tally.acked;
        report.window_acked += tally.window_acked;
        report.window_requests += tally.window_requests;
        report.latencies.extend(tally.latencies);
        for (cause, n) in tally.failures {
            *report.failures.entry(cause).or_default() += n;
        }
        last_done = last_done.max(tally.last_done.unwrap_or(start));
    }
    let warm = start + load.warmup;
    let end = last_done.min(start + load.duration).max(warm);
    report.window = end - warm;
    report
}

async fn drive(addr: SocketAddr, load: Arc<Load>, shared: Arc<Shared>, start: Instant) -> Tally {
    let mut connection = Connection::new(addr);
    let mut tally = Tally::default();
    let per_request = load.endpoint.events_per_request();
    let deadline = start + load.duration;
    let warm = start + load.warmup;
    loop {
        let slot = shared.next.fetch_add(1, Ordering::Relaxed);
        let first = slot * per_request;
        let count = match load.total_events {
            Some(total) if first >= total => break,
            Some(total) => per_request.min(total - first),
            None => per_request,
        };
        let scheduled = match load.rate {
            Some(rate) => start + Duration::from_secs_f64(first as f64 / rate),
            None => Instant::now(),
        };
        if scheduled >= deadline {
            break;
        }
        if load.rate.is_some() {
            tokio::time::sleep_until(scheduled.into()).await;
        }
        if let Some(throttle) = &load.throttle {
            if !wait_for_room(throttle, &shared, deadline).await {
                break;
            }
        }
        let sent_ns = timing::ns(scheduled);
        let body = match load.endpoint {
            Endpoint::Track => load.events.track_body(first, sent_ns),
            Endpoint::Batch(_) => load.events.batch_body(first, count as usize, sent_ns),
        };
        let result = connection
            .send(Method::POST, load.endpoint.path(), body.into())
            .await;
        let done = Instant::now();
        let cause = match result {
            Ok((200, body)) if !contains(&body, b"\"rejected\"") => None,
            Ok((200, _)) => Some("rejected".to_owned()),
            Ok((status, _)) => Some(format!("http_{status}")),
            Err(error) => Some(format!("error: {}", error.root_cause())),
        };
        match cause {
            None => {
                tally.acked += count;
                shared.acked.fetch_add(count, Ordering::Relaxed);
                if scheduled >= warm && done <= deadline {
                    tally.window_acked += count;
                    tally.window_requests += 1;
                    tally.latencies.push(done - scheduled);
                }
                tally.last_done = Some(done);
            }
            Some(cause) => {
                *tally.failures.entry(cause).or_default() += 1;
                // Do not spin on a server that is down or shedding load.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tally
}

/// Waits until the pipeline has room; false once the deadline passed.
async fn wait_for_room(throttle: &Throttle, shared: &Shared, deadline: Instant) -> bool {
    loop {
        let acked = shared.acked.load(Ordering::Relaxed);
        let delivered = throttle.delivered.load(Ordering::Relaxed);
        if acked.saturating_sub(delivered) < throttle.max_outstanding {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `GET path` on a fresh connection: the status.
pub async fn get_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let mut connection = Connection::new(addr);
    let (status, _) = connection.send(Method::GET, path, Bytes::new()).await?;
    Ok(status)
}

//! Local webhook receivers: answer 200 at once, count events, and note when each arrived.
//!
//! One sink serves several channels (`/c/0`, `/c/1`, ...), one per destination or rate-limit
//! key a scenario tells apart. Bodies are not parsed: the sink scans them for each event's
//! `"sent_ns":` stamp, which works the same for a single event and for `{"batch": [...]}`. It
//! runs on a thread and runtime of its own, so its CPU time can be told from the loader's.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use tokio::sync::oneshot;

use crate::timing::{self, Latencies};

/// One event at the sink.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub sent_ns: u64,
    pub at_ns: u64,
}

impl Arrival {
    pub fn latency_ns(&self) -> u64 {
        self.at_ns.saturating_sub(self.sent_ns)
    }
}

#[derive(Default)]
struct Channel {
    requests: AtomicU64,
    arrivals: Mutex<Vec<Arrival>>,
}

struct Counts {
    channels: Vec<Channel>,
    /// Events over every channel.
    delivered: Arc<AtomicU64>,
}

/// A running sink.
pub struct Sink {
    pub addr: SocketAddr,
    /// The sink thread's id, for its CPU time.
    pub tid: Option<u32>,
    counts: Arc<Counts>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    /// Starts a sink with `channels` channels on a free loopback port.
    pub fn start(channels: usize) -> anyhow::Result<Sink> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the sink")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let counts = Arc::new(Counts {
            channels: (0..channels.max(1)).map(|_| Channel::default()).collect(),
            delivered: Arc::new(AtomicU64::new(0)),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let (started, tid) = std::sync::mpsc::channel();
        let app = axum::Router::new()
            .route("/c/{channel}", post(receive))
            .with_state(counts.clone());
        let thread = std::thread::Builder::new()
            .name("bench-sink".into())
            .spawn(move || {
                let _ = started.send(thread_id());
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        eprintln!("sink: cannot start a runtime: {error}");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        eprintln!("sink: cannot use the listener");
                        return;
                    };
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async {
                            let _ = stopped.await;
                        })
                        .await;
                });
            })
            .context("starting the sink thread")?;
        Ok(Sink {
            addr,
            tid: tid.recv().ok().flatten(),
            counts,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The URL of `channel`.
    pub fn url(&self, channel: usize) -> String {
        format!("http://{}/c/{channel}", self.addr)
    }

    /// Events received over every channel (shared with a loader's [`crate::loader::Throttle`]).
    pub fn delivered_counter(&self) -> Arc<AtomicU64> {
        self.counts.delivered.clone()
    }

    pub fn delivered(&self) -> u64 {
        self.counts.delivered.load(Ordering::Relaxed)
    }

    /// Events received on `channel`.
    pub fn channel_delivered(&self, channel: usize) -> u64 {
        self.counts
            .channels
            .get(channel)
            .map_or(0, |c| c.arrivals.lock().map_or(0, |a| a.len() as u64))
    }

    /// Requests received on `channel`.
    pub fn channel_requests(&self, channel: usize) -> u64 {
        self.counts
            .channels
            .get(channel)
            .map_or(0, |c| c.requests.load(Ordering::Relaxed))
    }

    /// Every arrival on `channel` so far.
    pub fn arrivals(&self, channel: usize) -> Vec<Arrival> {
        self.counts
            .channels
            .get(channel)
            .and_then(|c| c.arrivals.lock().ok().map(|a| a.clone()))
            .unwrap_or_default()
    }

    /// Events on `channel` that arrived in `[from_ns, to_ns)`.
    pub fn arrived_between(&self, channel: usize, from_ns: u64, to_ns: u64) -> u64 {
        self.count_between(channel, from_ns..to_ns, |a| a.at_ns)
    }

    /// Events on `channel` sent in `[from_ns, to_ns)` that arrived.
    pub fn sent_between(&self, channel: usize, from_ns: u64, to_ns: u64) -> u64 {
        self.count_between(channel, from_ns..to_ns, |a| a.sent_ns)
    }

    /// Arrivals on `channel` whose `instant` (arrival or send) falls in `window`.
    fn count_between(
        &self,
        channel: usize,
        window: std::ops::Range<u64>,
        instant: impl Fn(&Arrival) -> u64,
    ) -> u64 {
        let Some(channel) = self.counts.channels.get(channel) else {
            return 0;
        };
        let Ok(arrivals) = channel.arrivals.lock() else {
            return 0;
        };
        arrivals
            .iter()
            .filter(|a| window.contains(&instant(a)))
            .count() as u64
    }

    /// Events on every channel that arrived in `[from_ns, to_ns)`.
    pub fn all_arrived_between(&self, from_ns: u64, to_ns: u64) -> u64 {
        (0..self.counts.channels.len())
            .map(|c| self.arrived_between(c, from_ns, to_ns))
            .sum()
    }

    /// Ingest-to-sink latencies on `channel` of the events sent in `[from_ns, to_ns)`.
    pub fn latencies(&self, channel: usize, from_ns: u64, to_ns: u64) -> Latencies {
        let mut latencies = Latencies::default();
        for arrival in self.arrivals(channel) {
            if (from_ns..to_ns).contains(&arrival.sent_ns) {
                latencies.push_ns(arrival.latency_ns());
            }
        }
        latencies
    }

    /// [`Sink::latencies`] over every channel.
    pub fn all_latencies(&self, from_ns: u64, to_ns: u64) -> Latencies {
        let mut latencies = Latencies::default();
        for channel in 0..self.counts.channels.len() {
            latencies.extend(self.latencies(channel, from_ns, to_ns));
        }
        latencies
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn receive(
    State(counts): State<Arc<Counts>>,
    Path(channel): Path<usize>,
    body: Bytes,
) -> StatusCode {
    let at_ns = timing::now_ns();
    let Some(target) = counts.channels.get(channel) else {
        return StatusCode::NOT_FOUND;
    };
    target.requests.fetch_add(1, Ordering::Relaxed);
    let mut events = 0;
    if let Ok(mut arrivals) = target.arrivals.lock() {
        for sent_ns in sent_stamps(&body) {
            arrivals.push(Arrival { sent_ns, at_ns });
            events += 1;
        }
    }
    counts.delivered.fetch_add(events, Ordering::Relaxed);
    StatusCode::OK
}

/// Every `"sent_ns": N` in a body, in order.
fn sent_stamps(body: &[u8]) -> impl Iterator<Item = u64> + '_ {
    const KEY: &[u8] = b"\"sent_ns\":";
    let mut at = 0;
    std::iter::from_fn(move || {
        while at + KEY.len() <= body.len() {
            let found = body[at..].windows(KEY.len()).position(|w| w == KEY)?;
            let mut i = at + found + KEY.len();
            while body.get(i).is_some_and(u8::is_ascii_whitespace) {
                i += 1;
            }
            let digits = body[i..].iter().take_while(|b| b.is_ascii_digit()).count();
            at = i + digits;
            if let Some(value) = std::str::from_utf8(&body[i..i + digits])
                .ok()
                .and_then(|text| text.parse().ok())
            {
                return Some(value);
            }
        }
        None
    })
}

/// This thread's kernel id (`/proc/thread-self` names it).
fn thread_id() -> Option<u32> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_found_in_single_events_and_batches() {
        let single = br#"{"properties":{"sent_ns":42,"x":1}}"#;
        assert_eq!(sent_stamps(single).collect::<Vec<_>>(), vec![42]);
        let batch = br#"{"batch":[{"properties":{"sent_ns": 1}},{"properties":{"sent_ns":23}}]}"#;
        assert_eq!(sent_stamps(batch).collect::<Vec<_>>(), vec![1, 23]);
        assert_eq!(sent_stamps(b"{}").count(), 0);
    }
}

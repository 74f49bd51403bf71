//! `balancing`: issue 8's experiment, after Netflix's comparison of round robin with the power
//! of two choices ("Rethinking Netflix's Edge Load Balancing", 2018).
//!
//! Four local replicas of one receiver, of different capacity: each serves at most 4, 8, 16 or
//! 32 requests at once (30 ms each, ±50%), queues as many more, sheds the rest with a 503, and
//! reports `X-Server-Utilization` = requests in the system / slots (capped at 1). The same
//! open-loop load (600 events/s of `/v1/track` for 20 s) goes through a real `switchyard serve`
//! child process to one webhook destination listing the four, three times:
//!
//! | arm | `balance` | `use_utilization` |
//! |---|---|---|
//! | round robin | `round_robin` | — |
//! | choice of two, no utilization | `p2c` | `false` |
//! | everything on | `p2c` | `true` |
//!
//! What happens to the replicas, at the same instants in every arm:
//! - all along, round robin's quarter (150/s) is more than the smallest replica serves (133/s);
//! - 2–8 s: other clients (another Switchyard, say) send 970 requests/s to the largest
//!   replica, 91% of what it serves: load this process cannot see in its own requests in flight;
//! - 8–12 s: the 16-slot replica degrades: ten times slower;
//! - 12–16 s: it answers every request with a 500; from 16 s it is healthy again.
//!
//! Reported per arm: failed requests (delivery attempts answered non-2xx or timed out, from
//! Switchyard's `switchyard_endpoint_requests_total`; every failed attempt is retried, so none
//! is lost), and the latency of each event from its scheduled send to its first 2xx at a
//! replica (retries included): average, p50, p99. Every arm runs on fresh replicas and a fresh
//! database, so no arm inherits another's state.
//!
//! One experiment in one file (replicas, load, the three arms and their report): long, but read
//! top to bottom as the experiment runs.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::Method;
use serde_json::{json, Value};
use tokio::sync::{oneshot, Semaphore};

use crate::events::{EventMaker, WRITE_KEY};
use crate::loader::{self, Connection, Endpoint, Load};
use crate::report::{round, Row};
use crate::scenarios::{count_missing, note_log, wait_until, Env};
use crate::switchyard::{Role, Switchyard};
use crate::timing::{self, Latencies};

/// The offered load, the same in every arm.
const RATE: f64 = 600.0;
const LOAD_FOR: Duration = Duration::from_secs(20);
/// Loader connections: enough that the schedule never waits for one.
const CONNECTIONS: usize = 32;
/// How long acknowledged events may take to arrive after the load ends (retries included).
const SETTLE: Duration = Duration::from_secs(15);
/// Mean service time of one request at a healthy replica.
const SERVICE: Duration = Duration::from_millis(30);
/// The degrading replica's phases, from the start of the load.
const SLOW_FROM: Duration = Duration::from_secs(8);
const ERRORS_FROM: Duration = Duration::from_secs(12);
const RECOVERS_AT: Duration = Duration::from_secs(16);
/// How much slower it serves while slow.
const SLOWDOWN: u32 = 10;
/// Other clients' load on one replica, and when.
const OTHERS_RATE: f64 = 970.0;
const OTHERS_FROM: Duration = Duration::from_secs(2);
const OTHERS_UNTIL: Duration = Duration::from_secs(8);

/// One replica: its capacity and what happens to it.
struct Spec {
    name: &'static str,
    slots: usize,
    /// Slow, then erroring, midway.
    degrades: bool,
    /// Requests per second from other clients during `OTHERS_FROM..OTHERS_UNTIL`.
    others: f64,
}

const REPLICAS: [Spec; 4] = [
    Spec {
        name: "small",
        slots: 4,
        degrades: false,
        others: 0.0,
    },
    Spec {
        name: "medium",
        slots: 8,
        degrades: false,
        others: 0.0,
    },
    Spec {
        name: "large",
        slots: 16,
        degrades: true,
        others: 0.0,
    },
    Spec {
        name: "xlarge",
        slots: 32,
        degrades: false,
        others: OTHERS_RATE,
    },
];

/// One configuration of the destination.
struct Arm {
    /// Its prefix in the JSON keys.
    key: &'static str,
    label: &'static str,
    balance: &'static str,
    use_utilization: bool,
}

const ARMS: [Arm; 3] = [
    Arm {
        key: "round_robin",
        label: "round robin",
        balance: "round_robin",
        use_utilization: false,
    },
    Arm {
        key: "p2c",
        label: "choice of two, no utilization",
        balance: "p2c",
        use_utilization: false,
    },
    Arm {
        key: "p2c_all",
        label: "everything on",
        balance: "p2c",
        use_utilization: true,
    },
];

/// Runs the three arms and compares them; the row's own figures are the last arm's.
pub async fn run(env: &Env) -> anyhow::Result<Row> {
    let mut row = Row::new("balancing");
    let mut results = Vec::new();
    for arm in &ARMS {
        eprintln!("  balancing: {} ...", arm.label);
        let measured = run_arm(env, arm, &mut row)
            .await
            .with_context(|| format!("the `{}` arm", arm.label))?;
        results.push(measured);
    }
    println!("{}", table(&mut results));
    for (arm, measured) in ARMS.iter().zip(&mut results) {
        let (p50, p99) = measured.latencies.p50_p99();
        let key = |name: &str| format!("{}_{name}", arm.key);
        row.set(&key("failed"), measured.failed());
        row.set(&key("timeouts"), measured.outcome("timeout"));
        row.set(&key("avg_ms"), round(measured.average_ms(), 1));
        row.set(&key("p50_ms"), p50.map_or(Value::Null, |v| round(v, 1)));
        row.set(&key("p99_ms"), p99.map_or(Value::Null, |v| round(v, 1)));
        row.set(&key("missing"), measured.missing);
        row.set(&key("shares_pct"), json!(measured.shares_pct()));
    }
    let failed: Vec<u64> = results.iter().map(Measured::failed).collect();
    let p99: Vec<f64> = results
        .iter_mut()
        .map(|m| m.latencies.percentile_ms(0.99).unwrap_or(f64::INFINITY))
        .collect();
    // Netflix's ordering: round robin worst, everything on best, on both counts.
    let ordered =
        failed[2] < failed[1] && failed[1] <= failed[0] && p99[2] < p99[1] && p99[1] <= p99[0];
    row.set("ordered", ordered);
    row.set("offered_per_sec", RATE);
    let best = &mut results[2];
    row.events_per_sec = loader::per_sec(best.delivered, LOAD_FOR);
    (row.p50_ms, row.p99_ms) = best.latencies.p50_p99();
    Ok(row)
}

/// What one arm measured.
struct Measured {
    acked: u64,
    delivered: u64,
    /// Acknowledged events never seen at a replica within [`SETTLE`].
    missing: u64,
    /// Delivery attempts by outcome (`switchyard_endpoint_requests_total`).
    outcomes: BTreeMap<String, u64>,
    /// Requests each replica received from this Switchyard.
    requests: Vec<u64>,
    /// This Switchyard's requests each replica shed (503) or failed (500).
    refused: Vec<u64>,
    latencies: Latencies,
    total_latency_ms: f64,
}

impl Measured {
    fn failed(&self) -> u64 {
        self.outcomes
            .iter()
            .filter(|(outcome, _)| outcome.as_str() != "success")
            .map(|(_, n)| n)
            .sum()
    }

    fn outcome(&self, name: &str) -> u64 {
        self.outcomes.get(name).copied().unwrap_or(0)
    }

    fn average_ms(&self) -> f64 {
        match self.latencies.len() {
            0 => 0.0,
            samples => self.total_latency_ms / samples as f64,
        }
    }

    /// Each replica's share of the requests, in percent.
    fn shares_pct(&self) -> Vec<f64> {
        let total: u64 = self.requests.iter().sum::<u64>().max(1);
        self.requests
            .iter()
            .map(|n| (*n as f64 * 1000.0 / total as f64).round() / 10.0)
            .collect()
    }
}

async fn run_arm(env: &Env, arm: &Arm, row: &mut Row) -> anyhow::Result<Measured> {
    let database = env.database(&format!("balancing_{}", arm.key)).await?;
    let replicas = Replicas::start()?;
    let dir = env.work_dir.join(format!("balancing-{}", arm.key));
    let config = config(arm, &replicas.urls());
    let switchyard = Switchyard::start(&env.binary, &dir, &config, &database, Role::All).await?;

    let load = Load::open(Endpoint::Track, CONNECTIONS, RATE, LOAD_FOR)
        .events(EventMaker::single("Order Completed"));
    replicas.begin(Instant::now());
    let report = loader::run(switchyard.addr, load).await;
    if report.acked == 0 {
        bail!("no event was accepted: {}", report.failure_summary());
    }
    let ledger = replicas.ledger.clone();
    wait_until(SETTLE, || ledger.delivered() >= report.acked).await;
    let metrics = fetch(&switchyard, "/metrics").await?;
    note_log(row, &switchyard);
    switchyard.stop().await?;

    let delivered = ledger.delivered();
    let (mut latencies, total_latency_ms) = ledger.latencies();
    let missing = report.acked.saturating_sub(delivered);
    count_missing(&mut latencies, missing, SETTLE);
    Ok(Measured {
        acked: report.acked,
        delivered,
        missing,
        outcomes: outcomes(&metrics),
        requests: replicas.counts(|r| r.requests.load(Ordering::Relaxed)),
        refused: replicas
            .counts(|r| r.shed.load(Ordering::Relaxed) + r.errors.load(Ordering::Relaxed)),
        latencies,
        total_latency_ms,
    })
}

/// One source and the webhook destination over the replicas. Retries come soon (250 ms, then
/// doubling to 2 s) so a run settles quickly; the 1 s timeout is far above a healthy answer;
/// `max_in_flight` 64 is about what the replicas hold at once (120 with full queues), so a
/// burst after a stall of this busy machine cannot flood them all whatever the balancing.
fn config(arm: &Arm, urls: &[String]) -> String {
    format!(
        r#"[[sources]]
name = "bench"
write_key = "{WRITE_KEY}"

[[destinations]]
name = "replicas"
kind = "webhook"
urls = {urls:?}
balance = "{balance}"
use_utilization = {use_utilization}
max_in_flight = 64
timeout = "1s"
retry.initial_backoff = "250ms"
retry.max_backoff = "2s"
"#,
        balance = arm.balance,
        use_utilization = arm.use_utilization,
    )
}

/// `GET path` on the child: the body as text.
async fn fetch(switchyard: &Switchyard, path: &str) -> anyhow::Result<String> {
    let mut connection = Connection::new(switchyard.addr);
    let (status, body) = connection
        .send(Method::GET, path, Bytes::new())
        .await
        .with_context(|| format!("GET {path}"))?;
    if status != 200 {
        bail!("GET {path} answered {status}");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// `switchyard_endpoint_requests_total` summed over the endpoints, by outcome.
fn outcomes(metrics: &str) -> BTreeMap<String, u64> {
    let mut by_outcome = BTreeMap::new();
    for line in metrics.lines() {
        if !line.starts_with("switchyard_endpoint_requests_total{") {
            continue;
        }
        let outcome = line
            .split("outcome=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next());
        let count = line.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok());
        if let (Some(outcome), Some(count)) = (outcome, count) {
            *by_outcome.entry(outcome.to_owned()).or_default() += count as u64;
        }
    }
    by_outcome
}

/// The comparison, as printed.
fn table(results: &mut [Measured]) -> String {
    let names: Vec<&str> = REPLICAS.iter().map(|r| r.name).collect();
    let mut out = format!(
        "balancing: {RATE} events/s for {}s to replicas of {} slots ({}ms a request); \
         other clients on `xlarge` at {}-{}s, `large` slow at {}s, erroring at {}s, \
         healthy at {}s\n",
        LOAD_FOR.as_secs(),
        REPLICAS
            .iter()
            .map(|r| r.slots.to_string())
            .collect::<Vec<_>>()
            .join("/"),
        SERVICE.as_millis(),
        OTHERS_FROM.as_secs(),
        OTHERS_UNTIL.as_secs(),
        SLOW_FROM.as_secs(),
        ERRORS_FROM.as_secs(),
        RECOVERS_AT.as_secs(),
    );
    out.push_str(&format!(
        "{:<31} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8}  share % {}\n",
        "arm",
        "failed",
        "timeouts",
        "avg ms",
        "p50 ms",
        "p99 ms",
        "missing",
        names.join("/")
    ));
    for (arm, measured) in ARMS.iter().zip(results.iter_mut()) {
        let average = measured.average_ms();
        let (p50, p99) = measured.latencies.p50_p99();
        let shares: Vec<String> = measured
            .shares_pct()
            .iter()
            .map(|s| format!("{s:.0}"))
            .collect();
        let refused: Vec<String> = measured.refused.iter().map(u64::to_string).collect();
        out.push_str(&format!(
            "{:<31} {:>7} {:>9} {:>8.1} {:>8.1} {:>8.1} {:>8}  {}  (refused by replica: {}; \
             delivered {} of {})\n",
            arm.label,
            measured.failed(),
            measured.outcome("timeout"),
            average,
            p50.unwrap_or(0.0),
            p99.unwrap_or(0.0),
            measured.missing,
            shares.join("/"),
            refused.join("/"),
            measured.delivered,
            measured.acked,
        ));
    }
    out
}

/// The first 2xx of each event at any replica.
#[derive(Default)]
struct Ledger {
    /// messageId → (sent_ns, arrived_ns).
    arrivals: Mutex<HashMap<String, (u64, u64)>>,
    delivered: AtomicU64,
}

impl Ledger {
    fn record(&self, body: &[u8], at_ns: u64) {
        let Ok(event) = serde_json::from_slice::<Value>(body) else {
            return;
        };
        let (Some(id), Some(sent_ns)) = (
            event["messageId"].as_str(),
            event["properties"]["sent_ns"].as_u64(),
        ) else {
            return;
        };
        let Ok(mut arrivals) = self.arrivals.lock() else {
            return;
        };
        if !arrivals.contains_key(id) {
            arrivals.insert(id.to_owned(), (sent_ns, at_ns));
            self.delivered.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Every event's latency, and their sum in milliseconds.
    fn latencies(&self) -> (Latencies, f64) {
        let mut latencies = Latencies::default();
        let mut total_ms = 0.0;
        if let Ok(arrivals) = self.arrivals.lock() {
            for (sent_ns, at_ns) in arrivals.values() {
                let nanos = at_ns.saturating_sub(*sent_ns);
                latencies.push_ns(nanos);
                total_ms += nanos as f64 / 1e6;
            }
        }
        (latencies, total_ms)
    }
}

/// One replica's state and counters.
struct Replica {
    spec: &'static Spec,
    slots: Semaphore,
    /// Requests being served or waiting for a slot.
    in_system: AtomicUsize,
    /// When the load began: the phases count from it.
    began: Arc<Mutex<Option<Instant>>>,
    ledger: Arc<Ledger>,
    /// This Switchyard's requests, and those shed (503) or failed (500).
    requests: AtomicU64,
    shed: AtomicU64,
    errors: AtomicU64,
}

/// How a replica behaves at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Healthy,
    Slow,
    Erroring,
}

/// Leaves the system when the request is done (or its connection is gone).
struct InSystem<'a>(&'a AtomicUsize);

impl Drop for InSystem<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Replica {
    fn phase(&self, now: Instant) -> Phase {
        let began = self.began.lock().ok().and_then(|b| *b);
        let Some(began) = began.filter(|_| self.spec.degrades) else {
            return Phase::Healthy;
        };
        let at = now.saturating_duration_since(began);
        if at >= SLOW_FROM && at < ERRORS_FROM {
            Phase::Slow
        } else if at >= ERRORS_FROM && at < RECOVERS_AT {
            Phase::Erroring
        } else {
            Phase::Healthy
        }
    }

    /// Serves one request: a slot for the service time, a queue as long as the slots, 503
    /// beyond; 500 while erroring.
    async fn serve(&self) -> StatusCode {
        let phase = self.phase(Instant::now());
        if phase == Phase::Erroring {
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
        let before = self.in_system.fetch_add(1, Ordering::AcqRel);
        let _in_system = InSystem(&self.in_system);
        if before >= 2 * self.spec.slots {
            return StatusCode::SERVICE_UNAVAILABLE;
        }
        let Ok(_slot) = self.slots.acquire().await else {
            return StatusCode::SERVICE_UNAVAILABLE;
        };
        let mut service = SERVICE.mul_f64(rand::random_range(0.5..1.5));
        if phase == Phase::Slow {
            service *= SLOWDOWN;
        }
        tokio::time::sleep(service).await;
        StatusCode::OK
    }

    /// Requests in the system per slot, capped at 1: at 1 every slot is taken and a queue forms.
    fn utilization(&self) -> f64 {
        (self.in_system.load(Ordering::Acquire) as f64 / self.spec.slots as f64).min(1.0)
    }
}

async fn receive(State(replica): State<Arc<Replica>>, body: Bytes) -> Response {
    replica.requests.fetch_add(1, Ordering::Relaxed);
    let status = replica.serve().await;
    match status {
        StatusCode::OK => replica.ledger.record(&body, timing::now_ns()),
        StatusCode::SERVICE_UNAVAILABLE => {
            replica.shed.fetch_add(1, Ordering::Relaxed);
        }
        _ => {
            replica.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    let mut response = status.into_response();
    if let Ok(value) = HeaderValue::from_str(&format!("{:.3}", replica.utilization())) {
        response.headers_mut().insert("x-server-utilization", value);
    }
    response
}

/// Other clients of one replica: a fixed rate through the same slots and queue, not counted.
async fn other_clients(replica: Arc<Replica>, began: Instant) {
    const TICK: Duration = Duration::from_millis(5);
    let mut tick = tokio::time::interval(TICK);
    let mut owed = 0.0;
    loop {
        let now = tick.tick().await.into_std();
        let at = now.saturating_duration_since(began);
        if at >= OTHERS_UNTIL {
            return;
        }
        if at < OTHERS_FROM {
            continue;
        }
        owed += replica.spec.others * TICK.as_secs_f64();
        while owed >= 1.0 {
            owed -= 1.0;
            let replica = replica.clone();
            tokio::spawn(async move {
                replica.serve().await;
            });
        }
    }
}

/// The four replicas, on a thread and runtime of their own (like the bench's sinks), so their
/// timing does not depend on the loader's.
struct Replicas {
    replicas: Vec<Arc<Replica>>,
    addrs: Vec<std::net::SocketAddr>,
    ledger: Arc<Ledger>,
    began: Arc<Mutex<Option<Instant>>>,
    runtime: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Replicas {
    fn start() -> anyhow::Result<Replicas> {
        let ledger = Arc::new(Ledger::default());
        let began = Arc::new(Mutex::new(None));
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for _ in &REPLICAS {
            let listener =
                std::net::TcpListener::bind("127.0.0.1:0").context("binding a replica")?;
            listener.set_nonblocking(true)?;
            addrs.push(listener.local_addr()?);
            listeners.push(listener);
        }
        let replicas: Vec<Arc<Replica>> = REPLICAS
            .iter()
            .map(|spec| {
                Arc::new(Replica {
                    spec,
                    slots: Semaphore::new(spec.slots),
                    in_system: AtomicUsize::new(0),
                    began: began.clone(),
                    ledger: ledger.clone(),
                    requests: AtomicU64::new(0),
                    shed: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                })
            })
            .collect();
        let (stop, stopped) = oneshot::channel::<()>();
        let (handle_sender, handle) = std::sync::mpsc::channel();
        let served = replicas.clone();
        let thread = std::thread::Builder::new()
            .name("bench-replicas".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        eprintln!("replicas: cannot start a runtime: {error}");
                        return;
                    }
                };
                let _ = handle_sender.send(runtime.handle().clone());
                runtime.block_on(async move {
                    for (listener, replica) in listeners.into_iter().zip(served) {
                        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                            eprintln!("replicas: cannot use a listener");
                            return;
                        };
                        let app = axum::Router::new().fallback(receive).with_state(replica);
                        tokio::spawn(async move {
                            let _ = axum::serve(listener, app).await;
                        });
                    }
                    let _ = stopped.await;
                });
            })
            .context("starting the replicas' thread")?;
        let runtime = handle
            .recv()
            .context("the replicas' runtime did not start")?;
        Ok(Replicas {
            replicas,
            addrs,
            ledger,
            began,
            runtime,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn urls(&self) -> Vec<String> {
        REPLICAS
            .iter()
            .zip(&self.addrs)
            .map(|(spec, addr)| format!("http://{addr}/{}", spec.name))
            .collect()
    }

    /// Starts the clock of the phases and the other clients.
    fn begin(&self, at: Instant) {
        if let Ok(mut began) = self.began.lock() {
            *began = Some(at);
        }
        for replica in &self.replicas {
            if replica.spec.others > 0.0 {
                self.runtime.spawn(other_clients(replica.clone(), at));
            }
        }
    }

    fn counts(&self, count: impl Fn(&Replica) -> u64) -> Vec<u64> {
        self.replicas.iter().map(|r| count(r)).collect()
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_summed_over_endpoints() {
        let metrics = "\
# TYPE switchyard_endpoint_requests_total counter
switchyard_endpoint_requests_total{destination=\"replicas\",endpoint=\"http://a/x\",outcome=\"success\"} 10
switchyard_endpoint_requests_total{destination=\"replicas\",endpoint=\"http://b/x\",outcome=\"success\"} 5
switchyard_endpoint_requests_total{destination=\"replicas\",endpoint=\"http://b/x\",outcome=\"server_error\"} 3
switchyard_deliveries_total{destination=\"replicas\",outcome=\"retried\"} 3
";
        let counted = outcomes(metrics);
        assert_eq!(counted.get("success"), Some(&15));
        assert_eq!(counted.get("server_error"), Some(&3));
        assert_eq!(counted.len(), 2);
    }

    #[test]
    fn the_ledger_keeps_each_events_first_arrival() {
        let ledger = Ledger::default();
        let body = br#"{"messageId":"m1","properties":{"sent_ns":100}}"#;
        ledger.record(body, 400);
        ledger.record(body, 900);
        ledger.record(b"not json", 900);
        assert_eq!(ledger.delivered(), 1);
        let (mut latencies, total_ms) = ledger.latencies();
        assert_eq!(latencies.percentile_ms(0.5), Some(0.0));
        assert!((total_ms - 0.0003).abs() < 1e-9);
    }
}

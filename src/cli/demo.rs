//! `switchyard demo`: a self-contained tour. It starts a throwaway pipeline in this process (a
//! database of its own, a local sink standing in for the vendors, a demo config), sends a few
//! events of every call type over HTTP like an SDK would, shows what each destination received
//! and where to look, and cleans up after itself.
//!
//! Nothing is left behind: the database is dropped and a private PostgreSQL started for the
//! tour is stopped, whether the tour succeeded or not.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::cli::bootstrap;
use crate::cli::serve::{self, Role, Running};
use sink::{Received, Sink};

mod sink;

/// The demo source's write key (printed, so the reader can send events of their own).
const WRITE_KEY: &str = "wk_demo";
/// How long deliveries may take before the tour gives up.
const DELIVERY_DEADLINE: Duration = Duration::from_secs(30);

/// What the tour does besides the defaults.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The server to make the demo database on (`DATABASE_URL`); the default local one (or a
    /// private one) when `None`.
    pub database_url: Option<String>,
    /// Keep serving after the tour until Ctrl-C, so the dashboard can be opened.
    pub keep_running: bool,
}

/// Runs the tour with `DATABASE_URL` from the environment and exits when done.
pub async fn run() -> anyhow::Result<()> {
    run_with(Options {
        database_url: std::env::var("DATABASE_URL")
            .ok()
            .filter(|url| !url.is_empty()),
        keep_running: false,
    })
    .await
}

/// Runs the tour.
pub async fn run_with(options: Options) -> anyhow::Result<()> {
    let server = bootstrap::resolve(options.database_url.clone()).await?;
    let url = demo_database_url(&server.url)?;
    let tour = async {
        bootstrap::create_database_if_missing(&url).await?;
        tour(&url, &options).await
    }
    .await;
    let dropped = bootstrap::drop_database(&url).await;
    if let Some(private) = server.private {
        private.stop().await;
    }
    tour?;
    dropped
}

/// The server's URL with a database name of this run's own.
fn demo_database_url(server_url: &str) -> anyhow::Result<String> {
    let mut url = url::Url::parse(server_url)
        .with_context(|| format!("the database URL {}", bootstrap::mask_password(server_url)))?;
    url.set_path(&format!("/switchyard_demo_{}", std::process::id()));
    Ok(url.to_string())
}

/// The destinations of the demo config: what each one shows off.
struct DemoDestination {
    name: &'static str,
    path: &'static str,
    about: &'static str,
    /// How many of the demo's events it should receive.
    expects: usize,
}

const DESTINATIONS: [DemoDestination; 3] = [
    DemoDestination {
        name: "every-event",
        path: "/every-event",
        about: "webhook, one event per request",
        expects: 10,
    },
    DemoDestination {
        name: "signed-batches",
        path: "/signed-batches",
        about: "webhook, batch_size = 10, Standard Webhooks signatures",
        expects: 10,
    },
    DemoDestination {
        name: "orders-only",
        path: "/orders-only",
        about: "webhook, events = [\"Order Completed\"]",
        expects: 2,
    },
];

fn demo_config(sink: &Sink, secret: &str) -> String {
    format!(
        r#"
[[sources]]
name = "demo"
write_key = "{WRITE_KEY}"

[[destinations]]
name = "every-event"
kind = "webhook"
url = "{every}"

[[destinations]]
name = "signed-batches"
kind = "webhook"
url = "{signed}"
secret = "{secret}"
batch_size = 10

[[destinations]]
name = "orders-only"
kind = "webhook"
url = "{orders}"
events = ["Order Completed"]
"#,
        every = sink.url(DESTINATIONS[0].path),
        signed = sink.url(DESTINATIONS[1].path),
        orders = sink.url(DESTINATIONS[2].path),
    )
}

async fn tour(database_url: &str, options: &Options) -> anyhow::Result<()> {
    let sink = Sink::start().await.context("starting the demo sink")?;
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(uuid::Uuid::new_v4().as_bytes())
    );
    let config = crate::config::parse(&demo_config(&sink, &secret), "demo.toml")
        .map_err(|errors| anyhow::anyhow!("the demo config is invalid:\n{errors}"))?;
    let admin_token = format!("demo-{}", uuid::Uuid::new_v4().simple());
    let running = serve::start(serve::Settings {
        listen: "127.0.0.1:0".into(),
        database_url: Some(database_url.to_owned()),
        config,
        config_path: None,
        role: Role::All,
        admin_token: Some(admin_token.clone()),
        grace: Duration::from_secs(5),
        timeouts: Default::default(),
    })
    .await
    .context("starting Switchyard")?;
    let outcome = show(&running, &sink, &admin_token, database_url, options).await;
    running.shutdown().await?;
    outcome
}

async fn show(
    running: &Running,
    sink: &Sink,
    admin_token: &str,
    database_url: &str,
    options: &Options,
) -> anyhow::Result<()> {
    let base = format!("http://{}", running.addr);
    let client = reqwest::Client::new();
    crate::say!("Switchyard demo")?;
    crate::say!(
        "  database     {} (dropped at the end)",
        bootstrap::mask_password(database_url)
    )?;
    crate::say!(
        "  sink         http://{} (stands in for the vendors)",
        sink.addr
    )?;
    crate::say!("  switchyard   {base}  source `demo`, write key `{WRITE_KEY}`")?;
    crate::say!()?;

    let live = watch_live(&client, &base, admin_token).await;

    crate::say!("Sending events as an SDK would (HTTP Basic with the write key):")?;
    let started = Instant::now();
    for (path, body) in sample_calls() {
        let response = client
            .post(format!("{base}{path}"))
            .basic_auth(WRITE_KEY, Some(""))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        let status = response.status();
        let answer = response.text().await.unwrap_or_default();
        crate::say!("  POST {path:<13} {} {answer}", status.as_u16())?;
        if !status.is_success() {
            bail!("Switchyard refused POST {path}: {status} {answer}");
        }
    }

    let arrived = sink
        .wait_until(DELIVERY_DEADLINE, |sink| {
            DESTINATIONS
                .iter()
                .all(|d| events_at(sink, d.path) >= d.expects)
        })
        .await;
    if !arrived {
        bail!(
            "not every destination received its events within {} s",
            DELIVERY_DEADLINE.as_secs()
        );
    }
    crate::say!(
        "Every destination received its events {} ms after the first send.",
        started.elapsed().as_millis()
    )?;
    crate::say!()?;

    let expected_deliveries: usize = DESTINATIONS.iter().map(|d| d.expects).sum();
    crate::say!("What each destination received:")?;
    let received = sink.received();
    for destination in &DESTINATIONS {
        let requests: Vec<&Received> = received
            .iter()
            .filter(|r| r.path == destination.path)
            .collect();
        crate::say!(
            "  {} ({}): {} request(s), {} event(s)",
            destination.name,
            destination.about,
            requests.len(),
            events_at(sink, destination.path)
        )?;
        for request in requests {
            crate::say!("    {}", describe(request))?;
        }
    }
    crate::say!()?;

    if let Some(mut live) = live {
        match tokio::time::timeout(Duration::from_secs(2), &mut live).await {
            Ok(Ok(seen)) => crate::say!(
                "The live debugger (GET /admin/v1/live) streamed {seen} event(s) as they were \
                 accepted.\n"
            )?,
            _ => live.abort(),
        }
    }
    print_metrics(&client, &base, expected_deliveries).await?;

    crate::say!("Where to look (`switchyard serve` has the same):")?;
    crate::say!("  dashboard    {base}/admin   (admin token: {admin_token})")?;
    crate::say!(
        "  live events  curl -N -H 'Authorization: Bearer {admin_token}' {base}/admin/v1/live"
    )?;
    crate::say!("  metrics      {base}/metrics")?;
    crate::say!("  API          {base}/openapi.json")?;
    if options.keep_running {
        crate::say!()?;
        crate::say!("Serving until Ctrl-C. Send your own events with:")?;
        crate::say!(
            "  curl -u {WRITE_KEY}: -H 'content-type: application/json' \\\n    \
             -d '{{\"userId\":\"u1\",\"event\":\"Hello\"}}' {base}/v1/track"
        )?;
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
    } else {
        crate::say!("  (these stop with the demo; `switchyard demo --keep` serves until Ctrl-C)")?;
    }
    crate::say!()?;
    crate::say!("Done: the demo database is dropped and the sink is gone.")?;
    Ok(())
}

/// One call of every type, then a batch, with readable messageIds.
fn sample_calls() -> Vec<(&'static str, Value)> {
    let context =
        json!({"library": {"name": "switchyard-demo", "version": env!("CARGO_PKG_VERSION")}});
    vec![
        (
            "/v1/track",
            json!({"userId": "u_1001", "event": "Order Completed", "messageId": "demo-01",
                   "properties": {"order_id": "o_42", "revenue": 42.5, "currency": "EUR"},
                   "context": context}),
        ),
        (
            "/v1/identify",
            json!({"userId": "u_1001", "messageId": "demo-02",
                   "traits": {"email": "ada@example.com", "plan": "pro"}, "context": context}),
        ),
        (
            "/v1/page",
            json!({"userId": "u_1001", "name": "Pricing", "messageId": "demo-03",
                   "properties": {"path": "/pricing"}, "context": context}),
        ),
        (
            "/v1/screen",
            json!({"anonymousId": "anon_77", "name": "Home", "messageId": "demo-04",
                   "context": context}),
        ),
        (
            "/v1/group",
            json!({"userId": "u_1001", "groupId": "acme", "messageId": "demo-05",
                   "traits": {"name": "Acme Inc.", "employees": 120}, "context": context}),
        ),
        (
            "/v1/alias",
            json!({"userId": "u_1001", "previousId": "anon_77", "messageId": "demo-06",
                   "context": context}),
        ),
        (
            "/v1/batch",
            json!({"context": context, "batch": [
                {"type": "track", "userId": "u_2002", "event": "Product Viewed",
                 "messageId": "demo-07", "properties": {"sku": "sku_9"}},
                {"type": "track", "userId": "u_2002", "event": "Order Completed",
                 "messageId": "demo-08", "properties": {"order_id": "o_43", "revenue": 19.0}},
                {"type": "identify", "anonymousId": "anon_88", "messageId": "demo-09",
                 "traits": {"referrer": "newsletter"}},
                {"type": "page", "anonymousId": "anon_88", "name": "Docs", "messageId": "demo-10"},
            ]}),
        ),
    ]
}

/// Events delivered (answered 2xx) to one path of the sink.
fn events_at(sink: &Sink, path: &str) -> usize {
    sink.received()
        .iter()
        .filter(|r| r.path == path && (200..300).contains(&r.status))
        .map(|r| request_events(r).len())
        .sum()
}

/// The events in one request: the body itself, or its `batch`.
fn request_events(request: &Received) -> Vec<Value> {
    match request.json() {
        Value::Object(mut body) if body.get("batch").is_some_and(Value::is_array) => {
            match body.remove("batch") {
                Some(Value::Array(events)) => events,
                _ => Vec::new(),
            }
        }
        Value::Null => Vec::new(),
        event => vec![event],
    }
}

/// `POST /path  webhook-id=…  [track "Order Completed" demo-01, identify demo-02]`.
fn describe(request: &Received) -> String {
    let mut line = format!("POST {}", request.path);
    for header in ["webhook-id", "webhook-signature"] {
        if let Some(value) = request.header(header) {
            let shown: String = value.chars().take(24).collect();
            let more = if value.chars().count() > 24 {
                "…"
            } else {
                ""
            };
            let _ = write!(line, "  {header}={shown}{more}");
        }
    }
    let events: Vec<String> = request_events(request)
        .iter()
        .map(|event| {
            let kind = event["type"].as_str().unwrap_or("?");
            let id = event["messageId"].as_str().unwrap_or("?");
            match event["event"].as_str() {
                Some(name) if kind == "track" => format!("{kind} \"{name}\" {id}"),
                _ => format!("{kind} {id}"),
            }
        })
        .collect();
    let _ = write!(line, "  [{}]", events.join(", "));
    line
}

/// Watches the live debugger while the events go in; the task's result is how many it saw.
async fn watch_live(
    client: &reqwest::Client,
    base: &str,
    admin_token: &str,
) -> Option<tokio::task::JoinHandle<usize>> {
    let response = client
        .get(format!("{base}/admin/v1/live?source=demo"))
        .bearer_auth(admin_token)
        .send()
        .await
        .ok()
        .filter(|r| r.status().is_success())?;
    Some(tokio::spawn(async move {
        let mut response = response;
        let mut seen = 0;
        let mut text = String::new();
        let expected: usize = 10;
        while seen < expected {
            match tokio::time::timeout(DELIVERY_DEADLINE, response.chunk()).await {
                Ok(Ok(Some(chunk))) => {
                    text.push_str(&String::from_utf8_lossy(&chunk));
                    seen = text.matches("event: message").count();
                }
                _ => break,
            }
        }
        seen
    }))
}

/// The contract's delivery and ingest counters, as a scraper sees them. Outcomes are recorded
/// just after the vendor answers, so this waits (briefly) until they add up.
async fn print_metrics(
    client: &reqwest::Client,
    base: &str,
    deliveries: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut text = String::new();
    while Instant::now() < deadline {
        let Ok(response) = client.get(format!("{base}/metrics")).send().await else {
            return Ok(());
        };
        text = response.text().await.unwrap_or_default();
        let delivered: f64 = text
            .lines()
            .filter(|l| {
                l.starts_with("switchyard_deliveries_total") && l.contains("outcome=\"delivered\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if delivered >= deliveries as f64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lines: BTreeSet<&str> = text
        .lines()
        .filter(|line| {
            line.starts_with("switchyard_deliveries_total")
                || line.starts_with("switchyard_ingested_events_total")
        })
        .collect();
    if lines.is_empty() {
        return Ok(());
    }
    crate::say!("Metrics (GET /metrics):")?;
    for line in lines {
        crate::say!("  {line}")?;
    }
    crate::say!()?;
    Ok(())
}

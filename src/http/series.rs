//! The metric series a dashboard or an alert needs before the first event: every required series
//! at zero for each configured source and destination (`rate()` and absence alerts need the
//! series to exist), the build, and gauges sampled when Prometheus scrapes (dead letters, deliveries
//! in flight, the age of the oldest queued delivery).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::http::server::AppState;
use crate::pipeline::Pipeline;

/// Per-message rejection codes, listed at zero for every source.
const REJECTION_CODES: &[&str] = &["invalid_message", "invalid_json", "too_large"];
const OUTCOMES: &[&str] = &["delivered", "retried", "dead"];

/// How long a scrape waits for the database before answering with the last values.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);

/// Creates every series of `pipeline`'s sources and destinations (a reload adds new ones);
/// values already there are left as they are.
pub fn register(pipeline: &Pipeline, sources: &[String]) {
    // The first pipeline is built before the server asks for the recorder: make sure it exists,
    // or these series would go to no recorder at all.
    let _ = crate::cli::serve::metrics_handle();
    metrics::gauge!("switchyard_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for source in sources {
        metrics::counter!("switchyard_ingested_events_total", "source" => source.clone())
            .increment(0);
        for code in REJECTION_CODES {
            metrics::counter!("switchyard_rejected_events_total", "source" => source.clone(), "code" => *code)
                .increment(0);
        }
    }
    for lane in &pipeline.lanes {
        let name = lane.config.name.clone();
        for outcome in OUTCOMES {
            metrics::counter!("switchyard_deliveries_total", "destination" => name.clone(), "outcome" => *outcome)
                .increment(0);
        }
        metrics::counter!("switchyard_rate_limited_total", "destination" => name.clone())
            .increment(0);
        // A histogram with no sample yet: the exporter lists it with zero counts.
        let _ = metrics::histogram!("switchyard_delivery_latency_seconds", "destination" => name.clone());
        for gauge in [
            "switchyard_queue_depth",
            "switchyard_in_flight",
            "switchyard_dead_letters",
            "switchyard_oldest_queued_age_seconds",
        ] {
            metrics::gauge!(gauge, "destination" => name.clone()).increment(0.0);
        }
    }
}

/// When the database was last sampled, and how long that took: the two scans run at most
/// every ten times their own duration (and every second at most), however often Prometheus
/// scrapes, so a deep queue is not scanned back to back.
static LAST_SAMPLE: Mutex<Option<(Instant, Duration)>> = Mutex::new(None);

/// Brings the sampled gauges up to date; called on each scrape. A slow or absent database
/// leaves the last values.
pub async fn sample(state: &AppState) {
    let pipeline = state.pipeline.load_full();
    pipeline.routes.publish_counts();
    for lane in &pipeline.lanes {
        metrics::gauge!("switchyard_in_flight", "destination" => lane.config.name.clone())
            .set(lane.in_flight() as f64);
    }
    let due = LAST_SAMPLE.lock().map_or(true, |last| {
        last.is_none_or(|(at, took)| at.elapsed() >= (took * 10).max(Duration::from_secs(1)))
    });
    if !due {
        return;
    }
    let started = Instant::now();
    let store = &state.store;
    let counts = async { tokio::try_join!(store.dead_counts(), store.oldest_queued_ages()) };
    let sampled = tokio::time::timeout(SAMPLE_TIMEOUT, counts).await;
    if let Ok(mut last) = LAST_SAMPLE.lock() {
        *last = Some((Instant::now(), started.elapsed()));
    }
    let Ok(Ok((dead, ages))) = sampled else {
        tracing::debug!("sampling dead letters and queue ages failed; the last values stay");
        return;
    };
    for lane in &pipeline.lanes {
        let name = lane.config.name.clone();
        let dead = dead.get(&lane.id).copied().unwrap_or(0);
        metrics::gauge!("switchyard_dead_letters", "destination" => name.clone()).set(dead as f64);
        let age = ages.get(&lane.id).copied().unwrap_or(0.0);
        metrics::gauge!("switchyard_oldest_queued_age_seconds", "destination" => name).set(age);
    }
}

//! A claimed run on its way through the pool: each event's fate as its requests come back,
//! one request under a timeout with panics caught, the retry schedule, and the completer that
//! writes outcomes in batches.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use rand::Rng;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::RetryPolicy;
use crate::delivery::lane::Lane;
use crate::delivery::scheduler::Wake;
use crate::destination::{DeliveryContext, Event, Outcome, Verdict};
use crate::store::{ClaimedRun, Fate, RunOutcome, Store};
use crate::{rates, trail};

/// Outcomes written in one transaction at most, and the longest one waits for company.
pub(super) const MAX_FINISH_BATCH: usize = 1000;

pub(super) const FINISH_LINGER: Duration = Duration::from_millis(5);

/// One claimed event, waiting in its lane or in flight.
pub(super) struct Claimed {
    pub(super) run: Arc<RunProgress>,
    pub(super) position: usize,
    pub(super) event: Event,
}

/// A claimed run's progress: each event's fate as it comes in. The run is written once every
/// event has one (a run's events may go out in several requests).
pub(super) struct RunProgress {
    pub(super) id: i64,
    pub(super) attempts: i32,
    pub(super) enqueued_at: OffsetDateTime,
    pub(super) lane: i32,
    pub(super) ordered: bool,
    pub(super) state: Mutex<RunState>,
}

pub(super) struct RunState {
    pub(super) event_ids: Vec<i64>,
    pub(super) fates: Vec<Option<Fate>>,
    pub(super) unknown: usize,
    /// The longest retry delay asked for, and the last failure, for the events left over.
    pub(super) delay: Duration,
    pub(super) status: Option<i32>,
    pub(super) error: Option<String>,
    pub(super) settled: bool,
}

impl RunProgress {
    pub(super) fn start(
        run: ClaimedRun,
        lane: i32,
        ordered: bool,
    ) -> (Arc<RunProgress>, Vec<Event>) {
        let count = run.events.len();
        let mut event_ids = Vec::with_capacity(count);
        let mut events = Vec::with_capacity(count);
        for event in run.events {
            event_ids.push(event.id);
            events.push(Event {
                message_id: event.message_id,
                payload: raw_payload(&event.payload),
                source: event.source.map(Into::into),
            });
        }
        let progress = RunProgress {
            id: run.id,
            attempts: run.attempts,
            enqueued_at: run.enqueued_at,
            lane,
            ordered,
            state: Mutex::new(RunState {
                event_ids,
                fates: vec![None; count],
                unknown: count,
                delay: Duration::ZERO,
                status: None,
                error: None,
                settled: false,
            }),
        };
        (Arc::new(progress), events)
    }

    /// Records one event's fate (with the delay, status and error of a retry); returns the
    /// run's outcome once every event has one.
    pub(super) fn record(
        &self,
        position: usize,
        fate: Fate,
        retry: Option<(Duration, Option<i32>, String)>,
    ) -> Option<RunOutcome> {
        let mut state = self.state.lock().expect("run lock");
        if state.settled || state.fates[position].is_some() {
            return None;
        }
        if let Some((delay, status, error)) = retry {
            state.delay = state.delay.max(delay);
            state.status = status;
            state.error = Some(error);
        }
        state.fates[position] = Some(fate);
        state.unknown -= 1;
        (state.unknown == 0).then(|| self.outcome(&mut state))
    }

    /// Settles the run now: events without a fate are released to be claimed again.
    pub(super) fn close(&self) -> Option<RunOutcome> {
        let mut state = self.state.lock().expect("run lock");
        if state.settled {
            return None;
        }
        for fate in state.fates.iter_mut().filter(|fate| fate.is_none()) {
            *fate = Some(Fate::Release);
        }
        Some(self.outcome(&mut state))
    }

    pub(super) fn outcome(&self, state: &mut RunState) -> RunOutcome {
        state.settled = true;
        let events = state
            .event_ids
            .iter()
            .zip(state.fates.iter_mut())
            .map(|(id, fate)| (*id, fate.take().unwrap_or(Fate::Release)))
            .collect();
        RunOutcome {
            id: self.id,
            attempts: self.attempts,
            delay: state.delay,
            status: state.status,
            error: state.error.take(),
            events,
        }
    }
}

/// Claimed runs not yet settled, so that shutdown can write what they did.
#[derive(Default)]
pub(super) struct OpenRuns(Mutex<HashMap<i64, Arc<RunProgress>>>);

impl OpenRuns {
    pub(super) fn insert(&self, run: Arc<RunProgress>) {
        self.0.lock().expect("open runs lock").insert(run.id, run);
    }

    pub(super) fn remove(&self, id: i64) {
        self.0.lock().expect("open runs lock").remove(&id);
    }

    pub(super) fn take_all(&self) -> Vec<Arc<RunProgress>> {
        let mut open = self.0.lock().expect("open runs lock");
        open.drain().map(|(_, run)| run).collect()
    }
}

/// A run's outcome on its way to the completer.
pub(super) struct Settled {
    pub(super) outcome: RunOutcome,
    /// The destination to wake once it is written (its ordered queue's head moves).
    pub(super) wake: Option<i32>,
}

impl Settled {
    pub(super) fn new(run: &RunProgress, outcome: RunOutcome) -> Settled {
        Settled {
            outcome,
            wake: run.ordered.then_some(run.lane),
        }
    }
}

/// Runs one request: the plugin under a timeout with panics caught, then each event's fate.
/// Returns the runs this request completed.
#[tracing::instrument(
    name = "delivery",
    skip_all,
    fields(
        destination = %lane.config.name,
        key = %lane.gate.digest,
        events = claimed.len(),
        attempt = claimed.iter().map(|c| c.run.attempts).max().unwrap_or(0),
    )
)]
pub(super) async fn deliver(lane: &Lane, open: &OpenRuns, claimed: Vec<Claimed>) -> Vec<Settled> {
    let started = Instant::now();
    let events: Vec<Event> = claimed.iter().map(|c| c.event.clone()).collect();
    let context = DeliveryContext { http: &lane.sender };
    let plugin = lane.plugin.clone();
    // The sender enforces the request timeout; this one catches a plugin that hangs elsewhere.
    let limit = lane.config.timeout + Duration::from_secs(5);
    let run = AssertUnwindSafe(plugin.deliver(&context, &events)).catch_unwind();
    let verdict = match tokio::time::timeout(limit, run).await {
        Ok(Ok(verdict)) => verdict,
        Ok(Err(panic)) => Verdict::All(Outcome::retry(format!(
            "the {} plugin panicked: {}",
            lane.config.kind,
            panic_message(&panic)
        ))),
        Err(_) => Verdict::All(Outcome::retry(format!(
            "the {} plugin did not finish within {}",
            lane.config.kind,
            humantime::format_duration(limit)
        ))),
    };
    let outcomes = verdict.per_event(claimed.len(), |got| {
        format!(
            "the {} plugin returned {got} outcomes for {} events",
            lane.config.kind,
            claimed.len()
        )
    });
    lane.learn(&outcomes);
    let name = lane.config.name.clone();
    let now = OffsetDateTime::now_utc();
    let mut settled = Vec::new();
    let mut counts = rates::Deliveries::default();
    let mut attempts: Vec<trail::AttemptResult> = Vec::with_capacity(claimed.len());
    for (claimed, outcome) in claimed.iter().zip(outcomes) {
        let run = &claimed.run;
        let mut attempt = trail::AttemptResult {
            message_id: &claimed.event.message_id,
            state: trail::State::Delivered,
            status: None,
            error: None,
        };
        let (fate, retry) = match outcome {
            Outcome::Delivered => {
                let latency = (now - run.enqueued_at).unsigned_abs();
                counts.delivered += 1;
                counts.latencies.push(latency);
                metrics::histogram!("switchyard_delivery_latency_seconds", "destination" => name.clone())
                    .record(latency.as_secs_f64());
                metrics::counter!("switchyard_deliveries_total", "destination" => name.clone(), "outcome" => "delivered")
                    .increment(1);
                lane.stats.delivered.fetch_add(1, Ordering::Relaxed);
                (Fate::Delivered, None)
            }
            Outcome::Retry {
                status,
                retry_after,
                message,
                ..
            } => {
                lane.note_error(&message);
                let age = (now - run.enqueued_at).unsigned_abs();
                attempt.status = status;
                let status = status.map(i32::from);
                match retry_delay(&lane.config.retry, run.attempts, age, retry_after) {
                    Some(delay) => {
                        counts.retried += 1;
                        attempt.state = trail::State::Retrying;
                        lane.stats.retried.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("switchyard_deliveries_total", "destination" => name.clone(), "outcome" => "retried")
                            .increment(1);
                        (Fate::Retry, Some((delay, status, message)))
                    }
                    None => {
                        counts.dead += 1;
                        attempt.state = trail::State::Dead;
                        lane.stats.dead.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("switchyard_deliveries_total", "destination" => name.clone(), "outcome" => "dead")
                            .increment(1);
                        let error = format!("gave up after {} attempts: {message}", run.attempts);
                        (Fate::Dead { status, error }, None)
                    }
                }
            }
            Outcome::Filtered { reason } => {
                attempt.state = trail::State::Filtered(reason.as_str());
                crate::filter::count(&name, reason);
                (Fate::Delivered, None)
            }
            Outcome::Failed { status, message } => {
                lane.note_error(&message);
                counts.dead += 1;
                attempt.state = trail::State::Dead;
                attempt.status = status;
                lane.stats.dead.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("switchyard_deliveries_total", "destination" => name.clone(), "outcome" => "dead")
                    .increment(1);
                let status = status.map(i32::from);
                (
                    Fate::Dead {
                        status,
                        error: message,
                    },
                    None,
                )
            }
        };
        attempt.error = match (&fate, &retry) {
            (Fate::Dead { error, .. }, _) => Some(error.clone()),
            (_, Some((_, _, message))) => Some(message.clone()),
            _ => None,
        };
        attempts.push(attempt);
        if let Some(outcome) = run.record(claimed.position, fate, retry) {
            open.remove(run.id);
            settled.push(Settled::new(run, outcome));
        }
    }
    trail::TRAIL.attempted(lane.id, now, attempts);
    lane.stats.rates.delivered(&counts);
    tracing::debug!(
        destination = %name,
        events = claimed.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "delivery finished"
    );
    settled
}

pub(super) fn raw_payload(payload: &[u8]) -> Box<RawValue> {
    // Payloads were serialized by ingest; a corrupt one becomes `null` and fails in the plugin.
    std::str::from_utf8(payload)
        .ok()
        .and_then(|text| RawValue::from_string(text.to_owned()).ok())
        .unwrap_or_else(|| RawValue::from_string("null".into()).expect("null is JSON"))
}

pub(super) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a non-text panic".into()
    }
}

/// When to try again, or `None` when the retry budget is spent. Exponential backoff from
/// `initial_backoff`, capped at `max_backoff`, with jitter (a random 50–100% of the step);
/// a vendor's `Retry-After` is honored when it asks for longer.
pub fn retry_delay(
    policy: &RetryPolicy,
    attempts: i32,
    age: Duration,
    retry_after: Option<Duration>,
) -> Option<Duration> {
    if attempts >= policy.max_attempts as i32 {
        return None;
    }
    let exponent = attempts.saturating_sub(1).clamp(0, 30) as u32;
    let step = policy
        .initial_backoff
        .saturating_mul(2u32.saturating_pow(exponent))
        .min(policy.max_backoff);
    let jittered = step.mul_f64(rand::rng().random_range(0.5..=1.0));
    let delay = match retry_after {
        Some(after) if after > jittered => after,
        _ => jittered,
    };
    if age + delay > policy.max_age {
        return None;
    }
    Some(delay)
}

/// Writes run outcomes in batches; a failed write is retried, never dropped (until then the
/// claims stay leased, so nothing is claimed twice meanwhile).
pub(super) async fn complete(
    store: Store,
    instance: i32,
    mut outcomes: mpsc::UnboundedReceiver<Settled>,
    wake: mpsc::UnboundedSender<Wake>,
    drained: CancellationToken,
) {
    let mut pending: Vec<RunOutcome> = Vec::new();
    let mut woken: Vec<i32> = Vec::new();
    loop {
        let first = tokio::select! {
            first = outcomes.recv() => first,
            _ = drained.cancelled() => None,
        };
        let Some(first) = first else {
            // The drain: every run still open was just closed, thousands with many
            // destinations. Written in one statement, 10,000 webhooks' runs took Postgres
            // over 30 s, and `serve` outlived the supervisor's patience for SIGTERM.
            while let Ok(last) = outcomes.try_recv() {
                absorb(last, &mut pending, &mut woken);
                if events_in(&pending).max(pending.len()) >= MAX_FINISH_BATCH {
                    flush(&store, instance, &mut pending).await;
                }
            }
            break;
        };
        absorb(first, &mut pending, &mut woken);
        let linger = tokio::time::sleep(FINISH_LINGER);
        tokio::pin!(linger);
        while events_in(&pending) < MAX_FINISH_BATCH {
            tokio::select! {
                next = outcomes.recv() => match next {
                    Some(next) => absorb(next, &mut pending, &mut woken),
                    None => break,
                },
                _ = &mut linger => break,
            }
        }
        flush(&store, instance, &mut pending).await;
        if !woken.is_empty() {
            let _ = wake.send(Wake::Destinations(std::mem::take(&mut woken)));
        }
    }
    flush(&store, instance, &mut pending).await;
}

pub(super) fn absorb(settled: Settled, pending: &mut Vec<RunOutcome>, woken: &mut Vec<i32>) {
    if let Some(id) = settled.wake {
        if !woken.contains(&id) {
            woken.push(id);
        }
    }
    pending.push(settled.outcome);
}

pub(super) fn events_in(outcomes: &[RunOutcome]) -> usize {
    outcomes.iter().map(|o| o.events.len()).sum()
}

pub(super) async fn flush(store: &Store, instance: i32, pending: &mut Vec<RunOutcome>) {
    let mut backoff = Duration::from_millis(100);
    while !pending.is_empty() {
        match store.finish(instance, pending).await {
            Ok(held) => {
                let lost = pending.len() as u64 - held.min(pending.len() as u64);
                if lost > 0 {
                    tracing::warn!(runs = lost, "outcomes of claims that expired were dropped; those events are delivered again");
                }
                pending.clear();
                return;
            }
            Err(error) => {
                tracing::warn!(%error, runs = pending.len(), "writing outcomes failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn backoff_grows_is_capped_and_ends() {
        let policy = RetryPolicy {
            max_attempts: 5,
            max_age: Duration::from_secs(3600),
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(4),
        };
        let first = retry_delay(&policy, 1, Duration::ZERO, None).unwrap();
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
        let fourth = retry_delay(&policy, 4, Duration::ZERO, None).unwrap();
        assert!(fourth >= Duration::from_secs(2) && fourth <= Duration::from_secs(4));
        assert_eq!(retry_delay(&policy, 5, Duration::ZERO, None), None);
        let asked = retry_delay(&policy, 1, Duration::ZERO, Some(Duration::from_secs(30)));
        assert_eq!(asked, Some(Duration::from_secs(30)));
        assert_eq!(
            retry_delay(&policy, 1, Duration::from_millis(3_599_600), None),
            None,
            "past max_age"
        );
    }
}

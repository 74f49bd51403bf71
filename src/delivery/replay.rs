//! Replays: archived events delivered again to one destination, in bounded memory.
//!
//! A replay is a row in Postgres with a cursor. Each serving process runs [`run`], which pages
//! through the archive from the cursor (a few thousand events at a time), keeps the events the
//! destination takes (its `sources`, `events`, `integrations`, `where`, `consent`, `sample`),
//! cuts them into runs
//! marked with the replay's id, and moves the cursor in the same transaction, so a restart
//! resumes where it was and two processes never queue a page twice. It stays a bounded amount
//! ahead of delivery, so a replay of millions of events holds only a page in memory and a few
//! thousand runs in the queue. Delivery is the scheduler's: replay runs have a lane of their own
//! that yields to live traffic and spends the destination's rate limit like live work.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::ingest::{Message, Route};
use crate::pipeline::Pipeline;
use crate::store::{self, ArchivedEvent, ClaimedEvent, Replay, ReplayStep, Store};

/// Archived events read per step.
const PAGE: i64 = 5_000;
/// Events a replay may have queued and unfinished before it selects more.
const AHEAD: i64 = 20_000;
/// How often replays are looked at when none has anything to do.
const IDLE: Duration = Duration::from_millis(250);
/// How soon a replay that is [`AHEAD`] of delivery is looked at again: delivery takes that
/// many events in a fraction of a second, and an idle pause would let its queue run dry.
const AHEAD_PAUSE: Duration = Duration::from_millis(20);

/// Selects the next pages of every replay until `stop`.
pub async fn run(store: Store, pipeline: Arc<ArcSwap<Pipeline>>, stop: CancellationToken) {
    loop {
        let pause = match step_all(&store, &pipeline).await {
            Ok(Step::Queued) => Duration::ZERO,
            Ok(Step::Ahead) => AHEAD_PAUSE,
            Ok(Step::Idle) => IDLE,
            Err(error) => {
                tracing::warn!(%error, "selecting replay work failed; retrying");
                IDLE
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// What one step of every replay did.
enum Step {
    /// Some replay queued a page: the next may follow at once.
    Queued,
    /// Some replay is [`AHEAD`] of delivery: it is looked at again soon.
    Ahead,
    Idle,
}

/// One step of every replay still selecting.
async fn step_all(store: &Store, pipeline: &ArcSwap<Pipeline>) -> store::Result<Step> {
    store.finish_replays().await?;
    let mut step = Step::Idle;
    for replay in store.selecting_replays().await? {
        let pipeline = pipeline.load_full();
        // A destination that is not configured (or disabled) now waits; its replay resumes
        // when it is back.
        if pipeline.routes.route(replay.destination_id).is_none() {
            continue;
        }
        if replay.backlog() >= AHEAD {
            if matches!(step, Step::Idle) {
                step = Step::Ahead;
            }
            continue;
        }
        let page = store.replay_page(&replay, PAGE).await?;
        let read = page.len();
        // Unpacking and filtering a page of 5,000 is 5 to 15 ms of CPU: on a blocking thread, so
        // that the live requests a runtime worker serves do not wait behind it.
        let planned = tokio::task::spawn_blocking(move || {
            let step = plan_page(&replay, &pipeline, page);
            (replay, step)
        })
        .await;
        let (replay, planned) = match planned {
            Ok((replay, Some(planned))) => (replay, planned),
            // Not configured: it waits, as above (the same pipeline, so not met here).
            Ok((_, None)) => continue,
            Err(error) => {
                tracing::error!(%error, "selecting a replay page failed");
                continue;
            }
        };
        store.queue_replay_step(&replay, planned).await?;
        if read > 0 {
            step = Step::Queued;
        }
    }
    Ok(step)
}

/// [`plan`] for a page of a replay under `pipeline`, with the names of its sources; `None`
/// when its destination is not configured.
fn plan_page(replay: &Replay, pipeline: &Pipeline, page: Vec<ArchivedEvent>) -> Option<ReplayStep> {
    let route = pipeline.routes.route(replay.destination_id)?;
    let names: HashMap<i32, &str> = pipeline
        .sources
        .sources()
        .into_iter()
        .map(|source| (source.id, source.name.as_str()))
        .collect();
    Some(plan(replay, route, page, &names))
}

/// The runs one page (its payloads as stored) makes for a replay's destination, and where the
/// cursor goes next; with the events taken, for delivery, when `names` has their source's name.
pub fn plan(
    replay: &Replay,
    route: &Route,
    page: Vec<ArchivedEvent>,
    names: &HashMap<i32, &str>,
) -> ReplayStep {
    let done = (page.len() as i64) < PAGE;
    let cursor = page
        .last()
        .map_or((replay.cursor_day, replay.cursor_id), |e| (e.day, e.id));
    let mut runs: Vec<(i32, i32, Vec<i64>, Option<i64>)> = Vec::new();
    let mut open: HashMap<(i32, i32, Option<i64>), usize> = HashMap::new();
    let mut events = Vec::with_capacity(page.len());
    for mut event in page {
        event.unpack();
        let Some(message) = Message::from_stored(&event.payload) else {
            continue;
        };
        // The same decision as at ingest: routing, then `where`, `consent` and `sample`, which
        // alone may need the whole event.
        if !route.accepts(event.source_id, &message)
            || route
                .check_gate(&message.message_id, &event.payload, &mut None)
                .is_err()
        {
            continue;
        }
        let user = route.ordered.then_some(event.order_key);
        let key = (event.day, event.source_id, user);
        match open.get(&key) {
            Some(&index) if runs[index].2.len() < route.run_size.clamp(1, store::MAX_RUN) => {
                runs[index].2.push(event.id);
            }
            _ => {
                open.insert(key, runs.len());
                runs.push((event.day, event.source_id, vec![event.id], user));
            }
        }
        if let Some(source) = names.get(&event.source_id) {
            let read = ClaimedEvent {
                id: event.id,
                message_id: event.message_id,
                payload: event.payload,
                source: Some((*source).to_owned()),
            };
            events.push((event.day, read));
        }
    }
    ReplayStep {
        runs,
        cursor,
        done,
        events,
    }
}

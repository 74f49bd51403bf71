//! Group commit: requests that arrive together are written together.
//!
//! Each ingest request hands its messages to a channel and waits. A few writer tasks take turns
//! draining whatever has piled up into one multi-row statement, so a burst of single-event
//! requests costs one round trip and one fsync per group, not per request. A request is
//! answered only after the statement that holds its messages has committed.
//!
//! Delivering processes hear of the new work from a notifier task: it sends one `NOTIFY` for
//! every group committed while it sent the last, outside the writers' transactions (why, at
//! [`Store::notify_jobs`]).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinSet;

use crate::store::{destinations, Committed, NewEvent, Store, StoreError};

/// Writer tasks, each a connection of its own. Two, not more: while one waits for its commit
/// to reach disk the other executes, and the fewer writers take turns, the more requests each
/// group holds, so the fewer statements and commits the same traffic costs. Under
/// single-event traffic (`switchyard-bench --scenario ingest-single`) four writers made groups
/// of 9 messages and two make groups of 14: Postgres CPU per event 40.5 -> 30.4 us, and the
/// rate 18,194 -> 21,922/s; large batches (`ingest-batch`) stay within noise.
pub const WRITERS: usize = 2;
/// Messages per statement at most; more waiting requests go to the next group.
const MAX_GROUP_ROWS: usize = 5000;
/// After the database proved unreachable, requests are refused at once for this long (one
/// writer keeps probing), so clients get their 503 in milliseconds, not after a connect timeout.
const UNREACHABLE_PAUSE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("the database did not take the write: {0}")]
    Store(String),
    #[error("shutting down")]
    Closed,
}

struct Pending {
    events: Vec<NewEvent>,
    done: oneshot::Sender<Result<Committed, CommitError>>,
    /// When it was handed to the writers.
    since: Instant,
}

/// The ingest side's handle.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Pending>,
    health: Arc<Health>,
    times: Arc<CommitTimes>,
}

/// How long committed requests waited for their commit since the last look: replays slow
/// down while the longest wait grows (`delivery::pace`).
#[derive(Debug, Default)]
pub struct CommitTimes {
    requests: AtomicU64,
    longest_us: AtomicU64,
}

impl CommitTimes {
    fn record(&self, wait: Duration) {
        self.longest_us
            .fetch_max(wait.as_micros() as u64, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests committed since the last call, and the longest wait among them.
    pub fn take(&self) -> (u64, Duration) {
        let requests = self.requests.swap(0, Ordering::Relaxed);
        let longest = self.longest_us.swap(0, Ordering::Relaxed);
        (requests, Duration::from_micros(longest))
    }
}

/// Whether the database answered lately.
#[derive(Default)]
struct Health {
    /// Milliseconds since the epoch until which the database counts as unreachable.
    unreachable_until: AtomicU64,
}

impl Health {
    fn reachable(&self) -> bool {
        now_ms() >= self.unreachable_until.load(Ordering::Acquire)
    }

    fn note(&self, error: &StoreError) {
        if is_unreachable(error) {
            let until = now_ms() + UNREACHABLE_PAUSE.as_millis() as u64;
            self.unreachable_until.store(until, Ordering::Release);
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// Errors that mean "no database", as opposed to a statement that failed.
fn is_unreachable(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Database(
            sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
        )
    )
}

impl GroupCommit {
    /// Starts the [`WRITERS`] writer tasks. They stop once every handle is dropped and the
    /// queue is drained.
    /// With `archive`, every fresh message is kept, not only those with a destination.
    /// The notifier stops after them, once it has sent what they committed.
    pub fn start(store: Store, archive: bool) -> (GroupCommit, JoinSet<()>) {
        let (queue, receiver) = mpsc::channel(4096);
        let receiver = Arc::new(Mutex::new(receiver));
        let health = Arc::new(Health::default());
        let times = Arc::new(CommitTimes::default());
        // Unbounded, but each message is a group's destination ids, and the notifier takes
        // every waiting one at each turn.
        let (notices, announced) = mpsc::unbounded_channel();
        let mut tasks = JoinSet::new();
        for _ in 0..WRITERS {
            tasks.spawn(write_groups(
                Writer {
                    store: store.clone(),
                    health: health.clone(),
                    times: times.clone(),
                    notices: notices.clone(),
                    archive,
                },
                receiver.clone(),
            ));
        }
        tasks.spawn(notify(store, announced));
        (
            GroupCommit {
                queue,
                health,
                times,
            },
            tasks,
        )
    }

    /// How long its requests wait for their commits.
    pub fn times(&self) -> Arc<CommitTimes> {
        self.times.clone()
    }

    /// Commits `events`; returns once they are durable.
    pub async fn commit(&self, events: Vec<NewEvent>) -> Result<Committed, CommitError> {
        if !self.health.reachable() {
            return Err(CommitError::Store("the database is unreachable".into()));
        }
        let (done, answer) = oneshot::channel();
        self.queue
            .send(Pending {
                events,
                done,
                since: Instant::now(),
            })
            .await
            .map_err(|_| CommitError::Closed)?;
        answer.await.map_err(|_| CommitError::Closed)?
    }
}

/// What a writer task writes with.
struct Writer {
    store: Store,
    health: Arc<Health>,
    times: Arc<CommitTimes>,
    /// The destinations of each committed group, for the notifier.
    notices: mpsc::UnboundedSender<Vec<i32>>,
    /// Keep every fresh message, not only those with a destination.
    archive: bool,
}

async fn write_groups(writer: Writer, receiver: Arc<Mutex<mpsc::Receiver<Pending>>>) {
    loop {
        let group = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut rows = first.events.len();
            let mut group = vec![first];
            while rows < MAX_GROUP_ROWS {
                match receiver.try_recv() {
                    Ok(next) => {
                        rows += next.events.len();
                        group.push(next);
                    }
                    Err(_) => break,
                }
            }
            group
        };
        writer.write(group).await;
    }
}

impl Writer {
    async fn write(&self, group: Vec<Pending>) {
        // A messageId repeated inside one group is written once; the SQL dedups against the past.
        let mut seen = HashSet::new();
        let rows: Vec<NewEvent> = group
            .iter()
            .flat_map(|pending| pending.events.iter())
            .filter(|event| seen.insert((event.source_id, event.message_id.as_str())))
            .cloned()
            .collect();
        let result = match insert(&self.store, &rows, self.archive).await {
            Ok(committed) => {
                if committed.jobs > 0 {
                    let _ = self.notices.send(destinations(&rows));
                }
                Ok(committed)
            }
            Err(error) => {
                tracing::warn!(%error, messages = rows.len(), "group commit failed");
                self.health.note(&error);
                Err(error.to_string())
            }
        };
        for pending in group {
            let answer = match &result {
                Ok(committed) => {
                    self.times.record(pending.since.elapsed());
                    Ok(*committed)
                }
                Err(message) => Err(CommitError::Store(message.clone())),
            };
            let _ = pending.done.send(answer);
        }
    }
}

/// Sends a `NOTIFY` for the groups committed since the last one, until every writer is gone.
/// One that fails is logged and not retried: delivering processes also look for work on a
/// timer.
async fn notify(store: Store, mut announced: mpsc::UnboundedReceiver<Vec<i32>>) {
    while let Some(first) = announced.recv().await {
        let mut ids = first;
        while let Ok(more) = announced.try_recv() {
            ids.extend(more);
        }
        ids.sort_unstable();
        ids.dedup();
        if let Err(error) = store.notify_jobs(&ids).await {
            tracing::warn!(%error, "announcing new work failed");
        }
    }
}

/// Inserts, creating today's partitions once if upkeep has not prepared them (it makes them
/// days ahead, so this happens only when it could not run).
async fn insert(store: &Store, rows: &[NewEvent], archive: bool) -> Result<Committed, StoreError> {
    match store.insert_events(rows, archive).await {
        Err(StoreError::Database(error)) if is_missing_partition(&error) => {
            store.prepare_today().await?;
            store.insert_events(rows, archive).await
        }
        other => other,
    }
}

fn is_missing_partition(error: &sqlx::Error) -> bool {
    // 23514: check_violation, which Postgres raises for "no partition of relation found".
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("23514")
        && db.message().contains("partition"))
}

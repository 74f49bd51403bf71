//! Claiming and finishing runs: a claim leases due runs with `FOR UPDATE SKIP LOCKED`, moving
//! `run_at` past the lease so that an abandoned claim comes due again by itself; outcomes are
//! written in one statement per batch, and only while the claim still holds.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use sqlx::Row;
use time::OffsetDateTime;

use super::{payload, Result, Store, JOBS_CHANNEL};

/// Which of a destination's queues: live traffic, or replays of the archive (which yield to
/// live traffic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    Live,
    Replay,
}

/// What one destination asks of a claim.
#[derive(Debug, Clone, Copy)]
pub struct Ask {
    pub destination_id: i32,
    /// Runs at most.
    pub limit: usize,
    /// How long the claimed runs are leased.
    pub lease: Duration,
    /// Only each user's oldest run (per-user ordering).
    pub ordered: bool,
}

/// A claimed run: events of one source for one destination.
#[derive(Debug, Clone)]
pub struct ClaimedRun {
    pub id: i64,
    /// This claim's attempt number; outcomes are written only while it still holds.
    pub attempts: i32,
    pub enqueued_at: OffsetDateTime,
    pub events: Vec<ClaimedEvent>,
}

/// One event of a claimed run.
#[derive(Debug, Clone)]
pub struct ClaimedEvent {
    pub id: i64,
    pub message_id: String,
    pub payload: Vec<u8>,
    /// Its source's name.
    pub source: Option<String>,
}

/// Runs with their events from a claim's rows (one per event, in run order), by destination.
fn gather_events(rows: Vec<sqlx::postgres::PgRow>, claimed: &mut HashMap<i32, Vec<ClaimedRun>>) {
    let mut last: Option<(i32, i64)> = None;
    for row in rows {
        let id: i64 = row.get("id");
        let destination: i32 = row.get("destination_id");
        let runs = claimed.entry(destination).or_default();
        if last != Some((destination, id)) {
            runs.push(ClaimedRun {
                id,
                attempts: row.get("attempts"),
                enqueued_at: row.get("enqueued_at"),
                events: Vec::new(),
            });
            last = Some((destination, id));
        }
        if let Some(run) = runs.last_mut() {
            run.events.push(ClaimedEvent {
                id: row.get("event_id"),
                message_id: row.get("message_id"),
                payload: payload::unpack(row.get("payload")),
                source: row.get("source"),
            });
        }
    }
}

/// Archived events a replay selected in this process, with what delivery needs of them, kept
/// from its read of the archive until a claim takes their runs: a replay claim then reads no
/// event again. Reading them twice made a replayed event cost Postgres two and a half times
/// what an event of a backlog costs. It is only a cache: an event not in it (selected by
/// another process, before a restart, or dropped here) is read from the archive.
#[derive(Debug, Default)]
pub(crate) struct Selected {
    /// By day and id: the event, and the replay that selected it.
    events: Mutex<HashMap<(i32, i64), (i64, ClaimedEvent)>>,
}

/// Events [`Selected`] holds at most: replays stay a bounded number of events ahead of
/// delivery, so it only fills up with events it will never be asked for (runs another process
/// claimed, a replay another process cancelled), and it is then emptied.
const SELECTED_MAX: usize = 100_000;

impl Selected {
    /// Keeps events a replay selected (by day) for the claim of their runs.
    pub(crate) fn keep(&self, replay: i64, events: impl IntoIterator<Item = (i32, ClaimedEvent)>) {
        let mut kept = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        for (day, event) in events {
            if kept.len() >= SELECTED_MAX {
                kept.clear();
            }
            kept.insert((day, event.id), (replay, event));
        }
    }

    /// Takes out the events of `keys` it holds.
    fn take(
        &self,
        keys: impl IntoIterator<Item = (i32, i64)>,
    ) -> HashMap<(i32, i64), ClaimedEvent> {
        let mut kept = self.events.lock().unwrap_or_else(PoisonError::into_inner);
        keys.into_iter()
            .filter_map(|key| kept.remove(&key).map(|(_, event)| (key, event)))
            .collect()
    }

    /// Lets go of what a replay selected: it was cancelled, and its runs will not be claimed.
    pub(crate) fn forget(&self, replay: i64) {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, (selected_by, _)| *selected_by != replay);
    }
}

/// What became of one event of a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    Delivered,
    /// Try again with the run.
    Retry,
    /// Never tried or cut off by shutdown: due again at once.
    Release,
    Dead {
        status: Option<i32>,
        error: String,
    },
}

/// The outcome of a whole run, written when every event of it has one.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub id: i64,
    pub attempts: i32,
    /// When the events left to try are due again.
    pub delay: Duration,
    pub status: Option<i32>,
    pub error: Option<String>,
    pub events: Vec<(i64, Fate)>,
}

/// A claim across destinations: for each (`$1` destination, `$2` at most, `$3` lease seconds),
/// the `due` runs are leased to owner `$4` and returned as `$select` says (a live claim's with
/// their events, one row per event; a replay claim's alone), in one statement, so many
/// destinations with a run or two each cost one round trip.
macro_rules! claim {
    ($select:ident; $($due:tt)+) => {
        concat!(
            r#"WITH wanted AS (
    SELECT * FROM unnest($1::int[], $2::bigint[], $3::float8[]) AS w(destination_id, n, lease)
    WHERE NOT EXISTS (
        SELECT 1 FROM paused_destinations p WHERE p.destination_id = w.destination_id)
), due AS (
    SELECT d.id
    FROM wanted w
    CROSS JOIN LATERAL ("#,
            $($due)+,
            r#") d
), claimed AS (
    UPDATE jobs j
    SET run_at = now() + make_interval(secs => $3[array_position($1, j.destination_id)]),
        attempts = j.attempts + 1, owner = $4
    -- By key, and joined to nothing: Postgres cannot know how many rows `LIMIT w.n` leaves,
    -- and a join to them read the whole queue (guessing thousands) or probed the key once per
    -- claimed run for every claimed run (guessing one).
    WHERE j.id = ANY (ARRAY(SELECT id FROM due))
    RETURNING j.id, j.destination_id, j.day, j.event_ids, j.attempts, j.enqueued_at
)
"#,
            $select!()
        )
    };
}

/// The end of a live claim: the claimed runs with their events, one row per event.
macro_rules! with_events {
    () => {
        r#"
SELECT c.id, c.destination_id, c.attempts, c.enqueued_at, e.id AS event_id, e.message_id,
       e.payload, s.name AS source
FROM claimed c
CROSS JOIN LATERAL unnest(c.event_ids) WITH ORDINALITY AS u(event_id, position)
-- `LIMIT` keeps it a lookup by key: as a join, a day guessed small was read whole per run.
CROSS JOIN LATERAL (
    SELECT e.id, e.message_id, e.payload, e.source_id
    FROM events e WHERE e.day = c.day AND e.id = u.event_id LIMIT 1
) e
LEFT JOIN sources s ON s.id = e.source_id
ORDER BY c.id, u.position
"#
    };
}

/// The end of a replay claim: the claimed runs alone. Their events were mostly read by the
/// replay that queued them, a moment before ([`Store::claim_many`]).
macro_rules! runs_only {
    () => {
        r#"
SELECT id, destination_id, day, event_ids, attempts, enqueued_at FROM claimed ORDER BY id
"#
    };
}

/// The oldest due runs of a destination; `$lane` picks live runs or replays, written as the
/// due indexes' own conditions so that a claim reads only the runs it takes.
macro_rules! oldest {
    ($lane:literal, $select:ident) => {
        claim!($select; concat!(
            "
        SELECT id FROM jobs
        WHERE destination_id = w.destination_id AND ",
            $lane,
            " AND run_at <= now()
        ORDER BY run_at
        LIMIT w.n
        FOR UPDATE SKIP LOCKED
    "
        ))
    };
}

/// Per-user ordering: only the oldest run of each user is claimable, so while it is in flight
/// or waiting to be retried, that user's later runs wait and other users' do not.
macro_rules! oldest_per_user {
    ($lane:literal, $select:ident) => {
        claim!($select; concat!(
            "
        SELECT j.id FROM jobs j
        WHERE j.destination_id = w.destination_id AND j.",
            $lane,
            " AND j.run_at <= now()
          AND NOT EXISTS (
              SELECT 1 FROM jobs earlier
              WHERE earlier.destination_id = j.destination_id
                AND earlier.",
            $lane,
            "
                AND earlier.order_key = j.order_key
                AND earlier.id < j.id)
        ORDER BY j.id
        LIMIT w.n
        FOR UPDATE SKIP LOCKED
    "
        ))
    };
}

const CLAIM_LIVE: &str = oldest!("replay_id IS NULL", with_events);
const CLAIM_REPLAY: &str = oldest!("replay_id IS NOT NULL", runs_only);
const CLAIM_LIVE_PER_USER: &str = oldest_per_user!("replay_id IS NULL", with_events);
const CLAIM_REPLAY_PER_USER: &str = oldest_per_user!("replay_id IS NOT NULL", runs_only);

/// Writes run outcomes. Only runs still held by this claim (`$9` owner, the attempt number)
/// are touched, so a late outcome never overwrites a newer claim's, and an event is never both
/// delivered and dead-lettered. A run with events left to try keeps them (`left`, the ids as
/// text since arrays of arrays must be rectangular) and comes due after its delay; a run with
/// none left is deleted; its dead events (`dead`, JSON) go to the dead letters.
///
/// Every run, and every dead event's run, is looked up by key from its own row of the batch
/// (`LATERAL`), so the work grows with the batch, whatever Postgres guesses. Postgres takes a
/// list passed in for ten rows, and the plan it keeps after a few calls joined lists by nested
/// loops: 300 runs with 300 dead events (28 ms a batch), and the runs with the claimed rows,
/// which a stale count of owned runs put at one: every run of the batch was compared with every
/// other, 1,000,000 comparisons and 300 ms for a batch of 1,000 one-event runs (thousands of
/// destinations, or any rate-limited one, and shutting down with 10,000 destinations).
const FINISH: &str = r#"
WITH r AS (
    SELECT * FROM unnest($1::bigint[], $2::int[], $3::float8[], $4::int[], $5::text[],
                         $6::text[], $7::int[], $8::int[], $10::text[])
        AS r(id, attempts, delay, status, error, left_ids, delivered, failed, dead)
), mine AS (
    SELECT j.id, j.day, j.destination_id, j.attempts, j.replay_id,
           r.delay, r.status, r.error, r.left_ids::bigint[] AS left_ids, r.delivered, r.failed,
           r.dead::jsonb AS dead
    FROM r CROSS JOIN LATERAL (
        SELECT j.id, j.day, j.destination_id, j.attempts, j.replay_id
        FROM jobs j
        WHERE j.id = r.id AND j.attempts = r.attempts AND j.owner = $9
        FOR UPDATE
    ) j
), kept AS (
    UPDATE jobs j
    SET event_ids = mine.left_ids, run_at = now() + make_interval(secs => mine.delay),
        owner = NULL, last_status = coalesce(mine.status, j.last_status),
        last_error = coalesce(mine.error, j.last_error)
    FROM mine
    WHERE j.id = mine.id AND mine.left_ids IS NOT NULL
    RETURNING j.id
), gone AS (
    DELETE FROM jobs j
    USING mine
    WHERE j.id = mine.id AND mine.left_ids IS NULL
    RETURNING j.id
), dead AS (
    INSERT INTO dead_letters (destination_id, source_id, message_id, attempts, last_status,
                              last_error, received_at, payload, order_key, replay_id)
    SELECT mine.destination_id, ev.source_id, ev.message_id, mine.attempts, e.status, e.error,
           ev.received_at, ev.payload, ev.order_key, mine.replay_id
    FROM mine
    CROSS JOIN LATERAL jsonb_to_recordset(mine.dead) AS e(event_id bigint, status int, error text)
    -- `LIMIT` keeps it a lookup by key: as a join, a day guessed small was read whole per run.
    CROSS JOIN LATERAL (
        SELECT * FROM events ev WHERE ev.day = mine.day AND ev.id = e.event_id LIMIT 1
    ) ev
    RETURNING 1
), progress AS (
    UPDATE replays p
    SET delivered = p.delivered + c.delivered, failed = p.failed + c.failed
    FROM (SELECT replay_id, sum(delivered) AS delivered, sum(failed) AS failed
          FROM mine
          WHERE replay_id IS NOT NULL
          GROUP BY replay_id) c
    WHERE p.id = c.replay_id
    RETURNING 1
)
SELECT (SELECT count(*) FROM mine) AS runs
"#;

/// Of `$1`, the destinations with a run due. Each is one probe of each lane's due index, asked
/// in its own terms and in its order: asked as `EXISTS` without the lane, Postgres hashed
/// every queued run for each look (224 ms a poll with 100 destinations, the scheduling loop
/// waiting on it); without the order, it expects a scan of the table to find a row at once,
/// and reads it all for a destination with nothing queued.
const DUE_DESTINATIONS: &str = r#"
SELECT d FROM unnest($1::int[]) AS d
WHERE NOT EXISTS (SELECT 1 FROM paused_destinations p WHERE p.destination_id = d)
  AND (coalesce((SELECT true FROM jobs j
                 WHERE j.destination_id = d AND j.replay_id IS NULL AND j.run_at <= now()
                 ORDER BY j.run_at LIMIT 1), false)
       OR coalesce((SELECT true FROM jobs j
                    WHERE j.destination_id = d AND j.replay_id IS NOT NULL
                      AND j.run_at <= now()
                    ORDER BY j.run_at LIMIT 1), false))
"#;

impl Store {
    /// Claims up to `limit` due runs of one destination's `lane` for `lease`, oldest first;
    /// with `ordered`, only each user's oldest run.
    pub async fn claim(
        &self,
        destination_id: i32,
        limit: usize,
        lease: Duration,
        owner: i32,
        ordered: bool,
        lane: Lane,
    ) -> Result<Vec<ClaimedRun>> {
        let ask = Ask {
            destination_id,
            limit,
            lease,
            ordered,
        };
        let mut claimed = self.claim_many(&[ask], owner, lane).await?;
        Ok(claimed.remove(&destination_id).unwrap_or_default())
    }

    /// Claims for several destinations at once: at most two statements (one for those
    /// delivering in per-user order), whatever the number of destinations. Runs come back per
    /// destination, oldest first; a destination with nothing due is absent.
    pub async fn claim_many(
        &self,
        asks: &[Ask],
        owner: i32,
        lane: Lane,
    ) -> Result<HashMap<i32, Vec<ClaimedRun>>> {
        let mut claimed: HashMap<i32, Vec<ClaimedRun>> = HashMap::new();
        for ordered in [false, true] {
            let asks: Vec<&Ask> = asks.iter().filter(|ask| ask.ordered == ordered).collect();
            if asks.is_empty() {
                continue;
            }
            let sql = match (lane, ordered) {
                (Lane::Live, false) => CLAIM_LIVE,
                (Lane::Replay, false) => CLAIM_REPLAY,
                (Lane::Live, true) => CLAIM_LIVE_PER_USER,
                (Lane::Replay, true) => CLAIM_REPLAY_PER_USER,
            };
            let destinations: Vec<i32> = asks.iter().map(|ask| ask.destination_id).collect();
            let limits: Vec<i64> = asks.iter().map(|ask| ask.limit as i64).collect();
            let leases: Vec<f64> = asks.iter().map(|ask| ask.lease.as_secs_f64()).collect();
            // Per-user claims keep custom plans: their look for each user's earlier runs is
            // not written to stay a lookup by key on a plan made for a short queue.
            let pool = if ordered { &self.pool } else { &self.claims };
            let rows = sqlx::query(sql)
                .bind(&destinations)
                .bind(&limits)
                .bind(&leases)
                .bind(owner)
                .fetch_all(pool)
                .await?;
            match lane {
                Lane::Live => gather_events(rows, &mut claimed),
                Lane::Replay => self.gather_replayed(rows, &mut claimed).await?,
            }
        }
        Ok(claimed)
    }

    /// Fills the replay runs of a claim (one row per run) with their events: those the replay
    /// selecting them read in this process are taken from [`Selected`], the rest (a replay
    /// selected by another process or before a restart, a run retried) read in one statement.
    async fn gather_replayed(
        &self,
        rows: Vec<sqlx::postgres::PgRow>,
        claimed: &mut HashMap<i32, Vec<ClaimedRun>>,
    ) -> Result<()> {
        let mut runs: Vec<(i32, i32, ClaimedRun, Vec<i64>)> = Vec::with_capacity(rows.len());
        for row in rows {
            runs.push((
                row.get("destination_id"),
                row.get("day"),
                ClaimedRun {
                    id: row.get("id"),
                    attempts: row.get("attempts"),
                    enqueued_at: row.get("enqueued_at"),
                    events: Vec::new(),
                },
                row.get("event_ids"),
            ));
        }
        // How often each event is asked for: two replays to one destination may both have
        // queued it, and a claim may take both runs.
        let mut uses: HashMap<(i32, i64), usize> = HashMap::new();
        for (_, day, _, ids) in &runs {
            for &id in ids {
                *uses.entry((*day, id)).or_default() += 1;
            }
        }
        let mut found = self.selected.take(uses.keys().copied());
        let (days, ids): (Vec<i32>, Vec<i64>) = uses
            .keys()
            .filter(|key| !found.contains_key(key))
            .copied()
            .unzip();
        if !ids.is_empty() {
            let rows = sqlx::query(
                "SELECT u.day, e.id, e.message_id, e.payload, s.name AS source \
                 FROM unnest($1::int[], $2::bigint[]) AS u(day, id) \
                 JOIN events e ON e.day = u.day AND e.id = u.id \
                 LEFT JOIN sources s ON s.id = e.source_id",
            )
            .bind(&days)
            .bind(&ids)
            .fetch_all(&self.pool)
            .await?;
            for row in rows {
                found.insert(
                    (row.get("day"), row.get("id")),
                    ClaimedEvent {
                        id: row.get("id"),
                        message_id: row.get("message_id"),
                        payload: payload::unpack(row.get("payload")),
                        source: row.get("source"),
                    },
                );
            }
        }
        // An event no longer archived (its day dropped) is left out, as a claim joining the
        // archive leaves it out.
        for (destination, day, mut run, ids) in runs {
            run.events = ids
                .into_iter()
                .filter_map(|id| {
                    let key = (day, id);
                    let left = uses.get_mut(&key)?;
                    *left -= 1;
                    if *left == 0 {
                        found.remove(&key)
                    } else {
                        found.get(&key).cloned()
                    }
                })
                .collect();
            claimed.entry(destination).or_default().push(run);
        }
        Ok(())
    }

    /// Records run outcomes of claims held by `owner` in one statement; returns how many runs
    /// were still held (the others' outcomes are dropped: a newer claim owns them).
    pub async fn finish(&self, owner: i32, outcomes: &[RunOutcome]) -> Result<u64> {
        let runs = outcomes.len();
        let mut ids = Vec::with_capacity(runs);
        let mut attempts = Vec::with_capacity(runs);
        let mut delays = Vec::with_capacity(runs);
        let mut statuses = Vec::with_capacity(runs);
        let mut errors: Vec<Option<String>> = Vec::with_capacity(runs);
        let mut left: Vec<Option<String>> = Vec::with_capacity(runs);
        let mut delivered = Vec::with_capacity(runs);
        let mut failed = Vec::with_capacity(runs);
        let mut dead_letters: Vec<Option<String>> = Vec::with_capacity(runs);
        for outcome in outcomes {
            ids.push(outcome.id);
            attempts.push(outcome.attempts);
            delays.push(outcome.delay.as_secs_f64());
            statuses.push(outcome.status);
            errors.push(outcome.error.as_deref().map(storable));
            let mut kept: Vec<i64> = Vec::new();
            let mut ok = 0;
            let mut dead = Vec::new();
            for (event, fate) in &outcome.events {
                match fate {
                    Fate::Delivered => ok += 1,
                    Fate::Retry | Fate::Release => kept.push(*event),
                    Fate::Dead { status, error } => dead.push(serde_json::json!({
                        "event_id": event,
                        "status": status,
                        "error": storable(error),
                    })),
                }
            }
            kept.sort_unstable();
            left.push((!kept.is_empty()).then(|| {
                let ids: Vec<String> = kept.iter().map(i64::to_string).collect();
                format!("{{{}}}", ids.join(","))
            }));
            delivered.push(ok);
            failed.push(dead.len() as i32);
            dead_letters
                .push((!dead.is_empty()).then(|| serde_json::Value::from(dead).to_string()));
        }
        let held: i64 = sqlx::query_scalar(FINISH)
            .bind(&ids)
            .bind(&attempts)
            .bind(&delays)
            .bind(&statuses)
            .bind(&errors)
            .bind(&left)
            .bind(&delivered)
            .bind(&failed)
            .bind(owner)
            .bind(&dead_letters)
            .fetch_one(&self.finishes)
            .await?;
        Ok(held as u64)
    }

    /// Of `destinations`, those with a job due now.
    pub async fn due_destinations(&self, destinations: &[i32]) -> Result<Vec<i32>> {
        Ok(sqlx::query_scalar(DUE_DESTINATIONS)
            .bind(destinations)
            .fetch_all(&self.pool)
            .await?)
    }

    /// Queued jobs per (destination id, source id), and how many of them are waiting for a
    /// retry. A full count: callers sample it now and then rather than per request.
    pub async fn queued(&self) -> Result<Vec<(i32, i32, i64, i64)>> {
        Ok(sqlx::query_as(
            "SELECT destination_id, source_id, sum(cardinality(event_ids))::bigint, \
                    coalesce(sum(cardinality(event_ids)) FILTER (WHERE last_error IS NOT NULL), 0)::bigint \
             FROM jobs GROUP BY 1, 2",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Seconds since the oldest queued live delivery of each destination id was enqueued.
    pub async fn oldest_queued_ages(&self) -> Result<HashMap<i32, f64>> {
        let rows: Vec<(i32, f64)> = sqlx::query_as(
            "SELECT destination_id, \
                    greatest(extract(epoch FROM now() - min(enqueued_at)), 0)::float8 \
             FROM jobs WHERE replay_id IS NULL GROUP BY destination_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// Pauses (or resumes) a destination's deliveries in every process. Both notify the
    /// delivering processes with an empty notice ("look at everything"), on which they re-read
    /// the paused destinations: a pause stops what they claimed before it, a resume lets them
    /// claim the backlog at once.
    pub async fn set_paused(&self, destination_id: i32, paused: bool) -> Result<()> {
        let statement = if paused {
            "WITH added AS (INSERT INTO paused_destinations (destination_id) VALUES ($1) \
             ON CONFLICT (destination_id) DO NOTHING) SELECT pg_notify($2, '')"
        } else {
            "WITH gone AS (DELETE FROM paused_destinations WHERE destination_id = $1) \
             SELECT pg_notify($2, '')"
        };
        sqlx::query(statement)
            .bind(destination_id)
            .bind(JOBS_CHANNEL)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The paused destinations' ids.
    pub async fn paused(&self) -> Result<HashSet<i32>> {
        let ids: Vec<i32> = sqlx::query_scalar("SELECT destination_id FROM paused_destinations")
            .fetch_all(&self.pool)
            .await?;
        Ok(ids.into_iter().collect())
    }
}

/// Text as Postgres can store it: `text` columns refuse NUL, which a vendor's error body may
/// hold.
pub fn storable(text: &str) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_text_has_no_nul() {
        assert_eq!(storable("a\0b"), "a\u{FFFD}b");
        assert_eq!(storable("plain"), "plain");
    }
}

//! Replays of the archive: a replay selects archived events in a time range page by page,
//! queues them as runs on the destination's replay lane, and counts what became of them.

use time::OffsetDateTime;

use super::{partitions::day_of, payload, ClaimedEvent, Result, Store, StoreError};

/// A replay as the admin API shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Replay {
    pub id: i64,
    pub destination_id: i32,
    pub destination: String,
    pub from_at: OffsetDateTime,
    pub to_at: OffsetDateTime,
    pub sources: Option<Vec<i32>>,
    pub state: String,
    pub events: i64,
    pub selected: i64,
    pub selection_done: bool,
    pub cursor_day: i32,
    pub cursor_id: i64,
    pub delivered: i64,
    pub failed: i64,
    pub created_at: OffsetDateTime,
    pub finished_at: Option<OffsetDateTime>,
}

impl Replay {
    /// Events it has queued and not finished yet, from its own counts (every outcome adds to
    /// them): summing its queued runs instead took 2 ms a look, 50 looks a second.
    pub fn backlog(&self) -> i64 {
        self.selected - self.delivered - self.failed
    }
}

/// An archived event, as replays and exports read it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ArchivedEvent {
    pub day: i32,
    pub id: i64,
    pub message_id: String,
    pub source_id: i32,
    pub order_key: i64,
    pub received_at: OffsetDateTime,
    pub payload: Vec<u8>,
}

impl ArchivedEvent {
    /// Its payload as JSON, from the payload as stored.
    pub fn unpack(&mut self) {
        self.payload = payload::unpack(std::mem::take(&mut self.payload));
    }
}

/// Runs a replay queues in one step, with where its selection got to.
#[derive(Debug, Clone, Default)]
pub struct ReplayStep {
    /// (day, source id, event ids in order, order key when per-user).
    pub runs: Vec<(i32, i32, Vec<i64>, Option<i64>)>,
    pub cursor: (i32, i64),
    pub done: bool,
    /// The events of `runs` (by day) as delivery needs them, kept for the claim of their runs
    /// so that it need not read them again; those left out are read then.
    pub events: Vec<(i32, ClaimedEvent)>,
}

const REPLAY_COLUMNS: &str = "r.id, r.destination_id, d.name AS destination, r.from_at, r.to_at, \
    r.sources, r.state, r.events, r.selected, r.selection_done, r.cursor_day, r.cursor_id, \
    r.delivered, r.failed, r.created_at, r.finished_at";

/// The archived events received in [`$3`, `$4`) (days `$1` to `$2`) of the sources `$5` (all
/// when null). A row without a payload is a messageId kept for dedup only: not archived. A
/// `requeued` row is the copy a dead letter sent again is queued from: the event it copies was
/// received once.
macro_rules! archived_in_range {
    () => {
        "day BETWEEN $1 AND $2 AND received_at >= $3 AND received_at < $4 \
         AND payload IS NOT NULL AND NOT requeued \
         AND ($5::int[] IS NULL OR source_id = ANY($5))"
    };
}

/// Archived events in a range after the cursor (`$6`, `$7`), in (day, id) order, `$8` at most.
const ARCHIVE_PAGE: &str = concat!(
    "SELECT day, id, message_id, source_id, order_key, received_at, payload FROM events WHERE ",
    archived_in_range!(),
    " AND (day, id) > ($6, $7) ORDER BY day, id LIMIT $8"
);

/// How many events a replay of a range will read, before the destination's filters.
const COUNT_ARCHIVED: &str = concat!("SELECT count(*) FROM events WHERE ", archived_in_range!());

impl Store {
    /// Records a replay of the archive in `[from, to)` (of `sources`, or all) to a destination;
    /// returns it with `events` the archived events in range (the destination's filters may
    /// then select fewer). A `to` still ahead is brought back to now: what arrives later is
    /// live traffic, not history, and a replay that took it would send it twice.
    pub async fn create_replay(
        &self,
        destination_id: i32,
        from: OffsetDateTime,
        to: OffsetDateTime,
        sources: Option<&[i32]>,
    ) -> Result<Replay> {
        let to = to.min(OffsetDateTime::now_utc());
        // Each source once: every page compares each event with each of them.
        let sources = sources.map(|ids| {
            let mut ids = ids.to_vec();
            ids.sort_unstable();
            ids.dedup();
            ids
        });
        let sources = sources.as_deref();
        let events: i64 = sqlx::query_scalar(COUNT_ARCHIVED)
            .bind(day_of(from))
            .bind(day_of(to))
            .bind(from)
            .bind(to)
            .bind(sources)
            .fetch_one(&self.pool)
            .await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO replays (destination_id, from_at, to_at, sources, events, cursor_day) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(destination_id)
        .bind(from)
        .bind(to)
        .bind(sources)
        .bind(events)
        .bind(day_of(from) - 1)
        .fetch_one(&self.pool)
        .await?;
        let _ = self.notify_jobs(&[destination_id]).await;
        self.replay(id)
            .await?
            .ok_or(StoreError::Database(sqlx::Error::RowNotFound))
    }

    /// Replays, newest first (`id` for one).
    pub async fn replays(&self, id: Option<i64>) -> Result<Vec<Replay>> {
        let sql = format!(
            "SELECT {REPLAY_COLUMNS} FROM replays r JOIN destinations d ON d.id = r.destination_id \
             WHERE $1::bigint IS NULL OR r.id = $1 ORDER BY r.id DESC LIMIT 1000"
        );
        Ok(sqlx::query_as(&sql).bind(id).fetch_all(&self.pool).await?)
    }

    pub async fn replay(&self, id: i64) -> Result<Option<Replay>> {
        Ok(self.replays(Some(id)).await?.into_iter().next())
    }

    /// Replays whose selection is not finished, oldest first.
    pub async fn selecting_replays(&self) -> Result<Vec<Replay>> {
        let sql = format!(
            "SELECT {REPLAY_COLUMNS} FROM replays r JOIN destinations d ON d.id = r.destination_id \
             WHERE r.state IN ('queued', 'running') AND NOT r.selection_done ORDER BY r.id"
        );
        Ok(sqlx::query_as(&sql).fetch_all(&self.pool).await?)
    }

    /// The next archived events of a replay's range after its cursor, with their payloads as
    /// stored: unpacking a page is milliseconds of CPU, which a replay spends off the runtime
    /// ([`ArchivedEvent::unpack`]).
    pub async fn replay_page(&self, replay: &Replay, limit: i64) -> Result<Vec<ArchivedEvent>> {
        self.stored_page(
            (replay.from_at, replay.to_at),
            replay.sources.as_deref(),
            (replay.cursor_day, replay.cursor_id),
            limit,
        )
        .await
    }

    /// Archived events received in `range`, after `cursor`, in (day, id) order.
    pub async fn archive_page(
        &self,
        range: (OffsetDateTime, OffsetDateTime),
        sources: Option<&[i32]>,
        cursor: (i32, i64),
        limit: i64,
    ) -> Result<Vec<ArchivedEvent>> {
        let mut page = self.stored_page(range, sources, cursor, limit).await?;
        page.iter_mut().for_each(ArchivedEvent::unpack);
        Ok(page)
    }

    /// [`Store::archive_page`] with the payloads as stored.
    ///
    /// The page is read in the primary key's order, from the cursor on, and never by sorting
    /// what matches: the day's statistics never know of the events received since they were
    /// taken, so for a replay of recent events Postgres expects a few dozen rows and would
    /// read and sort the whole day for every page (2.7 s a page on a fresh million events).
    async fn stored_page(
        &self,
        range: (OffsetDateTime, OffsetDateTime),
        sources: Option<&[i32]>,
        cursor: (i32, i64),
        limit: i64,
    ) -> Result<Vec<ArchivedEvent>> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "SELECT set_config('enable_sort', 'off', true), \
                    set_config('enable_bitmapscan', 'off', true)",
        )
        .execute(&mut *tx)
        .await?;
        let page: Vec<ArchivedEvent> = sqlx::query_as(ARCHIVE_PAGE)
            .bind(day_of(range.0))
            .bind(day_of(range.1))
            .bind(range.0)
            .bind(range.1)
            .bind(sources)
            .bind(cursor.0)
            .bind(cursor.1)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(page)
    }

    /// Queues one step of a replay and moves its cursor, in one transaction, unless it was
    /// cancelled meanwhile. Returns the events queued.
    pub async fn queue_replay_step(&self, replay: &Replay, step: ReplayStep) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        // Only from the cursor this step was read at: another process that selected the same
        // page first wins, and this step is dropped rather than queued twice.
        let current: Option<(String, i32, i64)> = sqlx::query_as(
            "SELECT state, cursor_day, cursor_id FROM replays WHERE id = $1 FOR UPDATE",
        )
        .bind(replay.id)
        .fetch_optional(&mut *tx)
        .await?;
        match current {
            Some((state, day, id))
                if matches!(state.as_str(), "queued" | "running")
                    && (day, id) == (replay.cursor_day, replay.cursor_id) => {}
            _ => return Ok(0),
        }
        let mut days = Vec::with_capacity(step.runs.len());
        let mut sources = Vec::with_capacity(step.runs.len());
        let mut lists = Vec::with_capacity(step.runs.len());
        let mut keys = Vec::with_capacity(step.runs.len());
        for (day, source, ids, key) in &step.runs {
            days.push(*day);
            sources.push(*source);
            // Postgres arrays of arrays must be rectangular: each run travels as text.
            lists.push(format!(
                "{{{}}}",
                ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
            ));
            keys.push(*key);
        }
        let queued: i64 = sqlx::query_scalar(
            "WITH queued AS ( \
                 INSERT INTO jobs (destination_id, source_id, day, event_ids, order_key, run_at, \
                                   enqueued_at, replay_id) \
                 SELECT $1, s, d, l::bigint[], k, now(), now(), $2 \
                 FROM unnest($3::int[], $4::int[], $5::text[], $6::bigint[]) AS u(d, s, l, k) \
                 RETURNING cardinality(event_ids) AS n) \
             SELECT coalesce(sum(n), 0)::bigint FROM queued",
        )
        .bind(replay.destination_id)
        .bind(replay.id)
        .bind(&days)
        .bind(&sources)
        .bind(&lists)
        .bind(&keys)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE replays SET state = 'running', cursor_day = $2, cursor_id = $3, \
                 selected = selected + $4, selection_done = $5, \
                 events = CASE WHEN $5 THEN selected + $4 ELSE events END \
             WHERE id = $1",
        )
        .bind(replay.id)
        .bind(step.cursor.0)
        .bind(step.cursor.1)
        .bind(queued)
        .bind(step.done)
        .execute(&mut *tx)
        .await?;
        // Kept before the commit: a claim may take the runs the moment it is done.
        self.selected.keep(replay.id, step.events);
        tx.commit().await?;
        // Committed either way: delivery also looks for work on a timer.
        if queued > 0 {
            if let Err(error) = self.notify_jobs(&[replay.destination_id]).await {
                tracing::warn!(%error, "announcing replay work failed");
            }
        }
        Ok(queued as u64)
    }

    /// Marks replays done whose selection is finished and whose runs are all settled.
    pub async fn finish_replays(&self) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE replays r SET state = 'done', finished_at = now() \
             WHERE r.state IN ('queued', 'running') AND r.selection_done \
               AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.replay_id = r.id)",
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Cancels a replay: nothing more is selected, and its runs not in flight are dropped.
    /// `false` when there is no such replay.
    pub async fn cancel_replay(&self, id: i64) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let found = sqlx::query(
            "UPDATE replays SET state = CASE WHEN state = 'done' THEN state ELSE 'cancelled' END, \
                 finished_at = coalesce(finished_at, now()) WHERE id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        sqlx::query("DELETE FROM jobs WHERE replay_id = $1 AND (owner IS NULL OR run_at <= now())")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        // Its runs are gone; what this process kept of their events would stay until the
        // ceiling empties the whole store of them. (Another process's copy goes that way.)
        self.selected.forget(id);
        Ok(found)
    }
}

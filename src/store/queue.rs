//! Enqueueing: one group commit deduplicates messages by (source, messageId), archives the
//! events and cuts their deliveries into runs, in a single statement; a `NOTIFY` sent after it
//! names the destinations that got work.

use std::collections::HashMap;

use sqlx::Row;
use time::OffsetDateTime;

use super::{partitions::today, payload, Result, Store, JOBS_CHANNEL, MAX_RUN};

/// A message ready to commit.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub source_id: i32,
    pub message_id: String,
    pub received_at: OffsetDateTime,
    /// userId, else anonymousId: the key of per-user ordering.
    pub user_key: String,
    /// The enriched message, serialized.
    pub payload: Vec<u8>,
    /// Destinations that get a delivery of it.
    pub targets: Vec<Target>,
}

/// One destination an event is queued for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub destination_id: i32,
    /// Deliver this user's events to it one at a time, in ingest order (runs hold one user).
    pub ordered: bool,
    /// Events per run for this destination (at most [`MAX_RUN`]).
    pub run_size: usize,
}

/// What a group commit wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// Messages seen for the first time (the others were repeats of a known messageId).
    pub fresh: u64,
    /// Deliveries queued (events × destinations).
    pub jobs: u64,
}

/// One group commit, in one statement: each message gets its event id in ingest order; the
/// fresh ones go into the archive, whose unique index per day is the dedup window (today by the
/// index, yesterday by a lookup), inserted in key order so that concurrent groups repeating the
/// same ids queue up instead of deadlocking; then the runs, cut by Switchyard and filled here
/// with the fresh events' ids. It sends no `NOTIFY`: see [`Store::notify_jobs`].
const INSERT_EVENTS: &str = r#"
WITH input AS MATERIALIZED (
    SELECT nextval('events_id_seq2') AS id, t.*
    FROM unnest($1::int[], $2::text[], $3::timestamptz[], $4::bytea[], $5::bool[], $6::text[])
        WITH ORDINALITY AS t(source_id, message_id, received_at, payload, wanted, user_key, idx)
), fresh AS (
    INSERT INTO events (day, id, source_id, message_id, received_at, order_key, payload)
    SELECT $7, i.id, i.source_id, i.message_id, i.received_at, hashtextextended(i.user_key, 0),
           CASE WHEN i.wanted OR $8 THEN i.payload END
    FROM input i
    WHERE NOT EXISTS (
        SELECT 1 FROM events e
        WHERE e.day = $7 - 1 AND e.source_id = i.source_id AND NOT e.requeued
          AND e.message_id COLLATE "C" = i.message_id COLLATE "C")
    ORDER BY i.source_id, i.message_id COLLATE "C"
    ON CONFLICT DO NOTHING
    RETURNING id
), placed AS (
    -- The event id at each position, 0 for a repeat.
    SELECT array_agg(CASE WHEN f.id IS NULL THEN 0 ELSE i.id END ORDER BY i.idx) AS ids
    FROM input i LEFT JOIN fresh f ON f.id = i.id
), runs AS (
    SELECT r.run, r.destination_id, r.source_id, r.ordered, r.user_key,
           ARRAY(SELECT p.ids[m.position]
                 FROM unnest($9[r.first:r.last]) WITH ORDINALITY AS m(position, k)
                 WHERE p.ids[m.position] <> 0
                 ORDER BY m.k) AS ids
    FROM unnest($10::int[], $11::int[], $12::bool[], $13::text[], $14::int[], $15::int[])
        WITH ORDINALITY AS r(destination_id, source_id, ordered, user_key, first, last, run)
    CROSS JOIN placed p
), queued AS (
    INSERT INTO jobs (destination_id, source_id, day, event_ids, order_key, run_at, enqueued_at)
    SELECT destination_id, source_id, $7, ids,
           CASE WHEN ordered THEN hashtextextended(user_key, 0) END, now(), now()
    FROM runs
    WHERE cardinality(ids) > 0
    ORDER BY run
    RETURNING cardinality(event_ids) AS events
)
SELECT (SELECT count(*) FROM fresh) AS fresh,
       (SELECT coalesce(sum(events), 0) FROM queued)::bigint AS jobs
"#;

/// A `NOTIFY` in a transaction of its own, committed without waiting for its commit record to
/// reach disk. Postgres lets one notifying transaction commit at a time (it holds a lock from
/// before its commit record until that is flushed), so a `NOTIFY` inside the group commit made
/// the writers take turns at their fsyncs, and every other transaction that notifies waited
/// too: during a replay, live groups spent a fifth of their time on that lock, took 8 ms
/// instead of 2, and single-event ingest fell behind its clients. A notice lost to a crash
/// costs a delivering process at most its poll interval.
const NOTIFY_JOBS: &str = "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, $2)";

impl Store {
    /// Commits a group of messages in one statement: dedup by (source, messageId), the events
    /// (every fresh one when `archive`, else those with a destination), their runs, and a
    /// `NOTIFY` naming the destinations.
    pub async fn insert_events(&self, events: &[NewEvent], archive: bool) -> Result<Committed> {
        let mut source_ids = Vec::with_capacity(events.len());
        let mut message_ids = Vec::with_capacity(events.len());
        let mut received = Vec::with_capacity(events.len());
        let mut payloads: Vec<Vec<u8>> = Vec::with_capacity(events.len());
        let mut wanted = Vec::with_capacity(events.len());
        let mut user_keys = Vec::with_capacity(events.len());
        for event in events {
            source_ids.push(event.source_id);
            message_ids.push(event.message_id.as_str());
            received.push(event.received_at);
            let wants = !event.targets.is_empty();
            // What the statement keeps no payload of (`wanted OR archive`) is not compressed.
            payloads.push(match wants || archive {
                true => payload::pack(&event.payload),
                false => Vec::new(),
            });
            wanted.push(wants);
            user_keys.push(event.user_key.as_str());
        }
        let runs = Runs::plan(events);
        let row = sqlx::query(INSERT_EVENTS)
            .bind(&source_ids)
            .bind(&message_ids)
            .bind(&received)
            .bind(&payloads)
            .bind(&wanted)
            .bind(&user_keys)
            .bind(today())
            .bind(archive)
            .bind(&runs.positions)
            .bind(&runs.destination)
            .bind(&runs.source)
            .bind(&runs.ordered)
            .bind(&runs.user_key)
            .bind(&runs.first)
            .bind(&runs.last)
            .fetch_one(&self.writes)
            .await?;
        Ok(Committed {
            fresh: row.get::<i64, _>("fresh") as u64,
            jobs: row.get::<i64, _>("jobs") as u64,
        })
    }

    /// Tells every delivering process that these destinations have new work (after the commit
    /// that queued it, so they find it). None is no notice: an empty one means "look at every
    /// destination".
    pub async fn notify_jobs(&self, destinations: &[i32]) -> Result<()> {
        if destinations.is_empty() {
            return Ok(());
        }
        sqlx::query(NOTIFY_JOBS)
            .bind(JOBS_CHANNEL)
            .bind(notice_payload(destinations))
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// How a group's deliveries are cut into runs: per destination and source, in ingest order,
/// at most the destination's run size; for per-user ordering, one user per run.
#[derive(Debug, Default)]
struct Runs<'a> {
    /// The events' positions (1-based) in the group, run after run.
    positions: Vec<i32>,
    /// Per run (numbered from 1 in this order): where its positions are (1-based, inclusive).
    first: Vec<i32>,
    last: Vec<i32>,
    destination: Vec<i32>,
    source: Vec<i32>,
    ordered: Vec<bool>,
    /// The user of a per-user run, else empty.
    user_key: Vec<&'a str>,
}

impl<'a> Runs<'a> {
    fn plan(events: &'a [NewEvent]) -> Runs<'a> {
        let mut runs = Runs::default();
        let mut members: Vec<Vec<i32>> = Vec::new();
        // The open run of each (destination, source, user if ordered).
        let mut open: HashMap<(i32, i32, Option<&str>), usize> = HashMap::new();
        for (position, event) in events.iter().enumerate() {
            for target in &event.targets {
                let user = target.ordered.then_some(event.user_key.as_str());
                let key = (target.destination_id, event.source_id, user);
                let limit = target.run_size.clamp(1, MAX_RUN);
                let run = match open.get(&key) {
                    Some(&run) if members[run].len() < limit => run,
                    _ => {
                        runs.destination.push(target.destination_id);
                        runs.source.push(event.source_id);
                        runs.ordered.push(target.ordered);
                        runs.user_key.push(user.unwrap_or_default());
                        members.push(Vec::new());
                        open.insert(key, members.len() - 1);
                        members.len() - 1
                    }
                };
                members[run].push(position as i32 + 1);
            }
        }
        for run in members {
            runs.first.push(runs.positions.len() as i32 + 1);
            runs.positions.extend(run);
            runs.last.push(runs.positions.len() as i32);
        }
        runs
    }
}

/// The destinations some of `events` are queued for, each once.
pub fn destinations(events: &[NewEvent]) -> Vec<i32> {
    let mut ids: Vec<i32> = events
        .iter()
        .flat_map(|event| event.targets.iter().map(|target| target.destination_id))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The `NOTIFY` payload: destination ids, comma separated; empty (meaning "look at every
/// destination") when they would not fit Postgres's 8000-byte limit.
fn notice_payload(destinations: &[i32]) -> String {
    let text = destinations
        .iter()
        .map(i32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    if text.len() > 7000 {
        String::new()
    } else {
        text
    }
}

/// Parses a `NOTIFY` payload back into destination ids (`None`: every destination).
pub fn parse_notice(payload: &str) -> Option<Vec<i32>> {
    if payload.is_empty() {
        return None;
    }
    Some(
        payload
            .split(',')
            .filter_map(|id| id.parse().ok())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(source_id: i32, user: &str, targets: &[(i32, bool, usize)]) -> NewEvent {
        NewEvent {
            source_id,
            message_id: String::new(),
            received_at: OffsetDateTime::UNIX_EPOCH,
            user_key: user.into(),
            payload: Vec::new(),
            targets: targets
                .iter()
                .map(|&(destination_id, ordered, run_size)| Target {
                    destination_id,
                    ordered,
                    run_size,
                })
                .collect(),
        }
    }

    #[test]
    fn runs_are_cut_per_destination_source_and_size() {
        let events = vec![
            event(1, "a", &[(10, false, 2), (11, true, 5)]),
            event(1, "b", &[(10, false, 2), (11, true, 5)]),
            event(1, "a", &[(10, false, 2), (11, true, 5)]),
            event(2, "a", &[(10, false, 2)]),
        ];
        let runs = Runs::plan(&events);
        // 10: [1,2] [3] from source 1, [4] from source 2; 11: user a [1,3], user b [2].
        assert_eq!(runs.destination, vec![10, 11, 11, 10, 10]);
        assert_eq!(runs.source, vec![1, 1, 1, 1, 2]);
        assert_eq!(runs.positions, vec![1, 2, 1, 3, 2, 3, 4]);
        assert_eq!(runs.first, vec![1, 3, 5, 6, 7]);
        assert_eq!(runs.last, vec![2, 4, 5, 6, 7]);
        assert_eq!(runs.user_key, vec!["", "a", "b", "", ""]);
        assert_eq!(destinations(&events), vec![10, 11]);
    }

    #[test]
    fn notices_round_trip_and_overflow_to_everyone() {
        assert_eq!(parse_notice(&notice_payload(&[3, 7])), Some(vec![3, 7]));
        let many: Vec<i32> = (100_000..102_000).collect();
        assert_eq!(parse_notice(&notice_payload(&many)), None);
    }
}

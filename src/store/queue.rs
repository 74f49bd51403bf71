//! Enqueueing: one group commit deduplicates messages by (source, messageId), archives the
//! events and cuts their deliveries into runs, in a single statement; the `NOTIFY` it sends
//! names the destinations that got work.

use std::collections::HashMap;

use sqlx::Row;
use time::OffsetDateTime;

use super::{partitions::today, Result, Store, JOBS_CHANNEL, MAX_RUN};

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

/// One group commit: dedup by (source, messageId) with locks taken in key order (so that
/// concurrent groups repeating the same ids queue up instead of deadlocking), the events into
/// the archive, the runs, and a `NOTIFY` naming the destinations.
const INSERT_EVENTS: &str = r#"
WITH input AS (
    SELECT *
    FROM unnest($1::int[], $2::text[], $3::timestamptz[], $4::bytea[], $5::bool[], $6::text[])
        WITH ORDINALITY AS t(source_id, message_id, received_at, payload, wanted, user_key, idx)
), fresh AS (
    INSERT INTO message_ids (day, source_id, message_id)
    SELECT $7, i.source_id, i.message_id
    FROM input i
    WHERE NOT EXISTS (
        SELECT 1 FROM message_ids m
        WHERE m.day = $7 - 1 AND m.source_id = i.source_id AND m.message_id = i.message_id)
    ORDER BY i.source_id, i.message_id
    ON CONFLICT DO NOTHING
    RETURNING source_id, message_id
), inserted AS (
    -- Ordered by position so that ids (and so per-user order) follow ingest order.
    INSERT INTO events (day, source_id, message_id, received_at, order_key, payload)
    SELECT $7, i.source_id, i.message_id, i.received_at, hashtextextended(i.user_key, 0),
           i.payload
    FROM input i JOIN fresh f USING (source_id, message_id)
    WHERE i.wanted OR $8
    ORDER BY i.idx
    RETURNING id, source_id, message_id, order_key
), placed AS (
    SELECT i.idx, ins.id, ins.order_key
    FROM inserted ins JOIN input i USING (source_id, message_id)
), runs AS (
    SELECT r.run, r.destination_id, r.source_id, r.ordered,
           array_agg(p.id ORDER BY p.idx) AS ids, min(p.order_key) AS order_key
    FROM unnest($9::int[], $10::int[]) AS m(run, idx)
    JOIN placed p ON p.idx = m.idx
    JOIN unnest($11::int[], $12::int[], $13::bool[])
        WITH ORDINALITY AS r(destination_id, source_id, ordered, run) ON r.run = m.run
    GROUP BY r.run, r.destination_id, r.source_id, r.ordered
), queued AS (
    INSERT INTO jobs (destination_id, source_id, day, event_ids, order_key, run_at, enqueued_at)
    SELECT destination_id, source_id, $7, ids, CASE WHEN ordered THEN order_key END, now(), now()
    FROM runs
    ORDER BY run
    RETURNING cardinality(event_ids) AS events
)
SELECT (SELECT count(*) FROM fresh) AS fresh,
       (SELECT coalesce(sum(events), 0) FROM queued)::bigint AS jobs,
       pg_notify($15, $14)
"#;

impl Store {
    /// Commits a group of messages in one statement: dedup by (source, messageId), the events
    /// (every fresh one when `archive`, else those with a destination), their runs, and a
    /// `NOTIFY` naming the destinations.
    pub async fn insert_events(&self, events: &[NewEvent], archive: bool) -> Result<Committed> {
        let mut source_ids = Vec::with_capacity(events.len());
        let mut message_ids = Vec::with_capacity(events.len());
        let mut received = Vec::with_capacity(events.len());
        let mut payloads = Vec::with_capacity(events.len());
        let mut wanted = Vec::with_capacity(events.len());
        let mut user_keys = Vec::with_capacity(events.len());
        for event in events {
            source_ids.push(event.source_id);
            message_ids.push(event.message_id.as_str());
            received.push(event.received_at);
            payloads.push(event.payload.as_slice());
            wanted.push(!event.targets.is_empty());
            user_keys.push(event.user_key.as_str());
        }
        let runs = Runs::plan(events);
        let notice = notice_payload(&runs.destinations());
        let row = sqlx::query(INSERT_EVENTS)
            .bind(&source_ids)
            .bind(&message_ids)
            .bind(&received)
            .bind(&payloads)
            .bind(&wanted)
            .bind(&user_keys)
            .bind(today())
            .bind(archive)
            .bind(&runs.member_run)
            .bind(&runs.member_index)
            .bind(&runs.destination)
            .bind(&runs.source)
            .bind(&runs.ordered)
            .bind(&notice)
            .bind(JOBS_CHANNEL)
            .fetch_one(&self.writes)
            .await?;
        Ok(Committed {
            fresh: row.get::<i64, _>("fresh") as u64,
            jobs: row.get::<i64, _>("jobs") as u64,
        })
    }
}

/// How a group's deliveries are cut into runs: per destination and source, in ingest order,
/// at most the destination's run size; for per-user ordering, one user per run.
#[derive(Debug, Default)]
struct Runs {
    /// For each (run, event) membership: the run's number and the event's position (1-based).
    member_run: Vec<i32>,
    member_index: Vec<i32>,
    /// Per run (numbered from 1 in this order).
    destination: Vec<i32>,
    source: Vec<i32>,
    ordered: Vec<bool>,
}

impl Runs {
    fn plan(events: &[NewEvent]) -> Runs {
        let mut runs = Runs::default();
        // The open run of each (destination, source, user if ordered), and its size so far.
        let mut open: HashMap<(i32, i32, Option<&str>), (i32, usize)> = HashMap::new();
        for (position, event) in events.iter().enumerate() {
            for target in &event.targets {
                let user = target.ordered.then_some(event.user_key.as_str());
                let key = (target.destination_id, event.source_id, user);
                let limit = target.run_size.clamp(1, MAX_RUN);
                let run = match open.get_mut(&key) {
                    Some((run, size)) if *size < limit => {
                        *size += 1;
                        *run
                    }
                    _ => {
                        runs.destination.push(target.destination_id);
                        runs.source.push(event.source_id);
                        runs.ordered.push(target.ordered);
                        let run = runs.destination.len() as i32;
                        open.insert(key, (run, 1));
                        run
                    }
                };
                runs.member_run.push(run);
                runs.member_index.push(position as i32 + 1);
            }
        }
        runs
    }

    fn destinations(&self) -> Vec<i32> {
        let mut ids = self.destination.clone();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
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
        assert_eq!(runs.member_run, vec![1, 2, 1, 3, 4, 2, 5]);
        assert_eq!(runs.member_index, vec![1, 1, 2, 2, 3, 3, 4]);
        assert_eq!(runs.destinations(), vec![10, 11]);
    }

    #[test]
    fn notices_round_trip_and_overflow_to_everyone() {
        assert_eq!(parse_notice(&notice_payload(&[3, 7])), Some(vec![3, 7]));
        let many: Vec<i32> = (100_000..102_000).collect();
        assert_eq!(parse_notice(&notice_payload(&many)), None);
    }
}

//! Storage: the archive's day partitions, the queue of runs, and what stays behind.

use std::time::Duration;

use serde_json::json;
use sqlx::Connection;
use switchyard::store::commit::GroupCommit;
use switchyard::store::{
    today, ArchivedEvent, Ask, ClaimedEvent, Fate, JobsNotice, Lane, NameTable, NewEvent, Replay,
    ReplayStep, RunOutcome, Store, Target,
};
use switchyard::testkit::{start_switchyard, MockServer, Reply, TestDatabase};

async fn partitions(db: &TestDatabase, parent: &str) -> Vec<String> {
    let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = $1::regclass ORDER BY 1",
    )
    .bind(parent)
    .fetch_all(&mut connection)
    .await
    .unwrap()
}

#[tokio::test]
async fn archive_days_past_retention_are_dropped_unless_a_run_needs_them() {
    let db = TestDatabase::create("partitions").await;
    let store = Store::connect(&db.url, 4).await.unwrap();
    store.migrate().await.unwrap();
    let retention = Duration::from_secs(2 * 86_400);
    store.upkeep(retention).await.unwrap();
    let ids = store
        .name_ids(NameTable::Destinations, &["d".to_string()])
        .await
        .unwrap();
    let destination = ids["d"];
    let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let day = today();
    // Days past the retention, each with one event; the older one's run is done, the newer
    // one's still waits for a retry.
    for old in [day - 6, day - 5] {
        create_day(&mut connection, old).await;
    }
    sqlx::query(
        "WITH e AS (INSERT INTO events (day, source_id, message_id, received_at, order_key, payload) \
         VALUES ($1, 1, 'm', now(), 0, '{}') RETURNING id) \
         INSERT INTO jobs (destination_id, source_id, day, event_ids, run_at, enqueued_at) \
         SELECT $2, 1, $1, ARRAY[id], now() + interval '1 hour', now() FROM e",
    )
    .bind(day - 5)
    .bind(destination)
    .execute(&mut connection)
    .await
    .unwrap();
    let report = store.upkeep(retention).await.unwrap();
    let events = partitions(&db, "events").await;
    assert!(
        !events.contains(&format!("events_d{}", day - 6)),
        "{events:?} {report:?}"
    );
    assert!(
        events.contains(&format!("events_d{}", day - 5)),
        "a day a queued run refers to stays: {events:?}"
    );
    // Days ahead are ready before they are needed.
    for d in day..=day + 2 {
        assert!(events.contains(&format!("events_d{d}")), "{events:?}");
    }
    // Once the run is done, its day goes too.
    sqlx::query("DELETE FROM jobs")
        .execute(&mut connection)
        .await
        .unwrap();
    store.upkeep(retention).await.unwrap();
    let events = partitions(&db, "events").await;
    assert!(
        !events.contains(&format!("events_d{}", day - 5)),
        "{events:?}"
    );
    // With the archive off, yesterday still stays: its messageIds are half the dedup window.
    for old in [day - 2, day - 1] {
        create_day(&mut connection, old).await;
    }
    store.upkeep(Duration::ZERO).await.unwrap();
    let events = partitions(&db, "events").await;
    assert!(
        !events.contains(&format!("events_d{}", day - 2)),
        "{events:?}"
    );
    assert!(
        events.contains(&format!("events_d{}", day - 1)),
        "{events:?}"
    );
}

// `[archive] retention = "3000000000d"` passes the config's checks (it is a duration); its
// count of days does not fit an `i32`, and upkeep once wrapped it to a negative number, read
// that as one day, and dropped every older day of the archive it was asked to keep forever.
#[tokio::test]
async fn a_retention_longer_than_any_calendar_keeps_every_day() {
    let db = TestDatabase::create("retention_huge").await;
    let (store, _, _) = migrated_store(&db).await;
    let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let day = today();
    for old in [day - 400, day - 6] {
        create_day(&mut connection, old).await;
    }
    for days in [3_000_000_000_u64, 5_000_000_000, u64::MAX / 86_400] {
        store
            .upkeep(Duration::from_secs(days * 86_400))
            .await
            .unwrap();
        let events = partitions(&db, "events").await;
        for old in [day - 400, day - 6] {
            assert!(
                events.contains(&format!("events_d{old}")),
                "retention of {days} days dropped day {old}: {events:?}"
            );
        }
    }
}

// `"sources": ["web", "web", ...]` (100,000 times) was kept as it came, and every page of the
// replay compared each archived event with each of them.
#[tokio::test]
async fn a_replay_keeps_each_of_its_sources_once() {
    let db = TestDatabase::create("replay_sources").await;
    let (store, _, destination) = migrated_store(&db).await;
    let now = time::OffsetDateTime::now_utc();
    let repeated: Vec<i32> = [7, 3].repeat(50_000);
    let replay = store
        .create_replay(
            destination,
            now - time::Duration::hours(1),
            now,
            Some(&repeated),
        )
        .await
        .unwrap();
    let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let sources: Vec<i32> = sqlx::query_scalar("SELECT sources FROM replays WHERE id = $1")
        .bind(replay.id)
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(sources.len(), 2, "each of 100,000 names kept");
    assert_eq!(sources, [3, 7]);
}

/// Each archive day with its storage parameters and its columns' statistics targets
/// (`column=target`, for those set).
async fn archive_day_settings(db: &TestDatabase) -> Vec<(String, Vec<String>, Vec<String>)> {
    let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query_as(
        "SELECT c.relname::text, coalesce(c.reloptions, '{}')::text[], \
                coalesce(array_agg(a.attname || '=' || a.attstattarget ORDER BY a.attnum) \
                         FILTER (WHERE a.attstattarget >= 0), '{}')::text[] \
         FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
         WHERE i.inhparent = 'events'::regclass GROUP BY c.relname, c.reloptions ORDER BY 1",
    )
    .fetch_all(&mut connection)
    .await
    .unwrap()
}

// An archive day is only inserted into, then dropped whole. In an hour's soak, once the day
// held 13 to 15 GB, two things autovacuum did to it stalled delivery: insert-driven vacuum,
// which scans the day's newest pages again and rewrites them, and each analyze reading 30,000
// random pages. So days are made without the first and analyzed from a tenth of the rows.
#[tokio::test]
async fn archive_days_skip_insert_driven_vacuum_and_analyze_from_few_rows() {
    let insert_vacuum_off = "autovacuum_vacuum_insert_threshold=-1".to_string();
    let targets: Vec<String> = [
        "day=10",
        "id=10",
        "source_id=10",
        "message_id=10",
        "received_at=10",
        "order_key=10",
        "payload=0",
        "requeued=10",
    ]
    .map(String::from)
    .to_vec();
    let db = TestDatabase::create("archive_day_settings").await;
    let store = Store::connect(&db.url, 4).await.unwrap();
    store.migrate().await.unwrap();
    let day = today();
    // Yesterday, made as an older process made its days.
    let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
    create_day(&mut connection, day - 1).await;
    store.upkeep(Duration::from_secs(7 * 86_400)).await.unwrap();
    let days = archive_day_settings(&db).await;
    let names: Vec<&str> = days.iter().map(|(name, _, _)| name.as_str()).collect();
    let expected: Vec<String> = (day - 1..=day + 2)
        .map(|d| format!("events_d{d}"))
        .collect();
    assert_eq!(names, expected);
    for (name, options, statistics) in &days {
        assert!(options.contains(&insert_vacuum_off), "{name}: {options:?}");
        assert_eq!(statistics, &targets, "{name}");
    }

    // The migrations make a fresh database's first day the same way.
    let db = TestDatabase::create("archive_day_settings_fresh").await;
    let store = Store::connect(&db.url, 4).await.unwrap();
    store.migrate().await.unwrap();
    store.prepare_today().await.unwrap();
    let days = archive_day_settings(&db).await;
    assert_eq!(days.len(), 1, "{days:?}");
    assert!(days[0].1.contains(&insert_vacuum_off), "{days:?}");
    assert_eq!(days[0].2, targets);
}

async fn create_day(connection: &mut sqlx::PgConnection, day: i32) {
    sqlx::query(&format!(
        "CREATE TABLE events_d{day} PARTITION OF events FOR VALUES FROM ({day}) TO ({})",
        day + 1
    ))
    .execute(connection)
    .await
    .unwrap();
}

#[tokio::test]
async fn delivered_jobs_leave_no_rows_behind() {
    let db = TestDatabase::create("no_rows_left").await;
    let sink = MockServer::start().await;
    let config = format!(
        "[[sources]]\nname = \"web\"\nwrite_key = \"wk\"\n\n[[destinations]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\n",
        sink.url("/in")
    );
    let sy = start_switchyard(&config, &db.url).await;
    let batch: Vec<_> = (0..200)
        .map(|i| json!({"type": "track", "event": "E", "userId": "u", "messageId": format!("r-{i}")}))
        .collect();
    reqwest::Client::new()
        .post(format!("http://{}/v1/batch", sy.addr))
        .basic_auth("wk", Some(""))
        .json(&json!({ "batch": batch }))
        .send()
        .await
        .unwrap();
    assert!(
        sink.wait_until(Duration::from_secs(10), |s| s.events().len() == 200)
            .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        db.scalar("SELECT count(*)::text FROM jobs")
            .await
            .as_deref(),
        Some("0")
    );
    sy.shutdown().await.unwrap();
}

fn hook_config(sink: &MockServer, extra: &str) -> String {
    format!(
        "[[sources]]\nname = \"web\"\nwrite_key = \"wk\"\n\n[[destinations]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\n{extra}\n",
        sink.url("/in")
    )
}

async fn post_batch(base: &str, batch: &[serde_json::Value]) -> u16 {
    reqwest::Client::new()
        .post(format!("{base}/v1/batch"))
        .basic_auth("wk", Some(""))
        .json(&json!({ "batch": batch }))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// #11.1: concurrent batches repeating the same messageIds (as an SDK retrying while its
/// first try is in flight sends them) must never deadlock the group commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_batches_repeating_message_ids_never_deadlock() {
    let db = TestDatabase::create("dedup_race").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&hook_config(&sink, ""), &db.url).await;
    let base = format!("http://{}", sy.addr);
    let mut statuses = Vec::new();
    for round in 0..8 {
        let ids: Vec<String> = (0..300).map(|i| format!("r{round}-{i}")).collect();
        let forward: Vec<_> = ids
            .iter()
            .map(|id| json!({"type": "track", "event": "E", "userId": "u", "messageId": id}))
            .collect();
        let mut backward = forward.clone();
        backward.reverse();
        let sends = [&forward, &backward, &forward, &backward].map(|batch| {
            let base = base.clone();
            let batch = batch.clone();
            tokio::spawn(async move { post_batch(&base, &batch).await })
        });
        for send in sends {
            statuses.push(send.await.unwrap());
        }
    }
    assert!(statuses.iter().all(|s| *s == 200), "statuses: {statuses:?}");
    assert!(
        sink.wait_until(Duration::from_secs(20), |s| s.events().len() >= 2400)
            .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sink.events().len(), 2400, "each messageId delivered once");
    sy.shutdown().await.unwrap();
}

/// #11.10: a userId far longer than an index row may be must not fail the group commit of a
/// `per_user` destination.
#[tokio::test]
async fn a_very_long_user_id_on_a_per_user_destination_is_accepted_and_delivered() {
    let db = TestDatabase::create("long_user").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&hook_config(&sink, "ordering = \"per_user\""), &db.url).await;
    // Incompressible, so it cannot fit an index row however Postgres squeezes it.
    let long: String = (0..400).map(|i| format!("{:x}", md5_like(i))).collect();
    assert!(long.len() > 6_000);
    let batch = vec![
        json!({"type": "track", "event": "E", "userId": long, "messageId": "long-1"}),
        json!({"type": "track", "event": "E", "userId": "short", "messageId": "short-1"}),
    ];
    assert_eq!(
        post_batch(&format!("http://{}", sy.addr), &batch).await,
        200
    );
    assert!(
        sink.wait_until(Duration::from_secs(10), |s| s.events().len() == 2)
            .await
    );
    sy.shutdown().await.unwrap();
}

/// #11.9: a NUL byte in a vendor's error body must not fail the outcome write: the event ends
/// in the dead letters with the (sanitized) error, and can be replayed.
#[tokio::test]
async fn a_nul_byte_in_an_error_body_still_makes_a_dead_letter() {
    let db = TestDatabase::create("nul_error").await;
    let sink = MockServer::scripted(|_, _| Reply::status(400).with_body("bad\u{0}input")).await;
    let sy = start_switchyard(&hook_config(&sink, ""), &db.url).await;
    let batch = vec![json!({"type": "track", "event": "E", "userId": "u", "messageId": "nul-1"})];
    assert_eq!(
        post_batch(&format!("http://{}", sy.addr), &batch).await,
        200
    );
    let mut dead = None;
    for _ in 0..100 {
        dead = db
            .scalar("SELECT last_error FROM dead_letters WHERE message_id = 'nul-1'")
            .await;
        if dead.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dead = dead.expect("a dead letter for the event");
    assert!(dead.contains("bad") && !dead.contains('\0'), "{dead:?}");
    sy.shutdown().await.unwrap();
}

/// #11.11: an outcome is written only while the claim it belongs to holds. A claim whose lease
/// ran out and was taken again must not overwrite the newer claim's result, and an event is
/// never both delivered and dead-lettered.
/// A migrated store with source `s` and destination `d`, and their ids.
async fn migrated_store(db: &TestDatabase) -> (Store, i32, i32) {
    let store = Store::connect(&db.url, 4).await.unwrap();
    store.migrate().await.unwrap();
    store.prepare_today().await.unwrap();
    let sources = store
        .name_ids(NameTable::Sources, &["s".to_string()])
        .await
        .unwrap();
    let destinations = store
        .name_ids(NameTable::Destinations, &["d".to_string()])
        .await
        .unwrap();
    (store, sources["s"], destinations["d"])
}

fn message(source_id: i32, message_id: &str, targets: &[i32]) -> NewEvent {
    NewEvent {
        source_id,
        message_id: message_id.into(),
        received_at: time::OffsetDateTime::now_utc(),
        user_key: "u".into(),
        payload: format!(r#"{{"messageId":"{message_id}"}}"#).into_bytes(),
        targets: targets
            .iter()
            .map(|&destination_id| Target {
                destination_id,
                ordered: false,
                run_size: 100,
            })
            .collect(),
    }
}

/// Delivering processes hear of new work from a `NOTIFY` sent once the group is committed (in a
/// transaction of its own): it names the destinations, and what it announces can be claimed.
/// A group that queued nothing announces nothing, and the notifier stops with the writers.
#[tokio::test]
async fn a_group_commit_announces_its_destinations_once_committed() {
    let db = TestDatabase::create("notices").await;
    let (store, source, destination) = migrated_store(&db).await;
    let mut listener = store.listen_jobs().await.unwrap();
    let (commit, writers) = GroupCommit::start(store.clone(), true);

    commit
        .commit(vec![message(source, "archived only", &[])])
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(1_500), listener.next())
            .await
            .is_err(),
        "a group with no delivery announced work"
    );
    commit
        .commit(vec![message(source, "queued", &[destination])])
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_millis(1_500), listener.next()).await {
        Ok(Ok(JobsNotice::Destinations(ids))) => assert_eq!(ids, vec![destination]),
        Ok(Ok(JobsNotice::All)) => panic!("the notice named no destination"),
        other => panic!(
            "no notice of the queued run: {:?}",
            other.map(|r| r.is_ok())
        ),
    }
    let lease = Duration::from_secs(60);
    let runs = store
        .claim(destination, 10, lease, 1, false, Lane::Live)
        .await
        .unwrap();
    assert_eq!(runs.len(), 1, "the announced run is there to claim");

    drop(commit);
    tokio::time::timeout(Duration::from_secs(5), writers.join_all())
        .await
        .expect("the writers and the notifier stop once the handle is gone");
    store.close().await;
}

/// Replays make way for live traffic by what the writers record (`delivery::pace`): every
/// committed request is counted once, with the longest wait among them.
#[tokio::test]
async fn a_group_commit_times_what_its_requests_waited() {
    let db = TestDatabase::create("commit_times").await;
    let (store, source, destination) = migrated_store(&db).await;
    let (commit, writers) = GroupCommit::start(store.clone(), true);
    let times = commit.times();

    let started = std::time::Instant::now();
    for n in 0..3 {
        commit
            .commit(vec![message(source, &format!("timed {n}"), &[destination])])
            .await
            .unwrap();
    }
    let took = started.elapsed();
    let (requests, longest) = times.take();
    assert_eq!(requests, 3);
    assert!(
        longest > Duration::ZERO && longest <= took,
        "longest wait {longest:?} of requests that took {took:?} in all"
    );
    assert_eq!(
        times.take(),
        (0, Duration::ZERO),
        "a look takes what it read"
    );

    drop(commit);
    writers.join_all().await;
    store.close().await;
}

/// The dedup window is the archive's own rows: a messageId seen today or yesterday is a repeat,
/// even one kept without its payload (no destination took it and the archive is off); a repeat
/// is in no run, and a message kept only for dedup is not archived (no replay or export sees it).
#[tokio::test]
async fn the_archive_is_the_dedup_window_of_today_and_yesterday() {
    let db = TestDatabase::create("dedup_window").await;
    let (store, source, destination) = migrated_store(&db).await;
    let day = today();
    let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
    create_day(&mut connection, day - 1).await;
    create_day(&mut connection, day - 2).await;
    for (old, id) in [(day - 1, "yesterday"), (day - 2, "two-days-ago")] {
        sqlx::query(
            "INSERT INTO events (day, source_id, message_id, received_at, order_key, payload) \
             VALUES ($1, $2, $3, now() - interval '2 days', 0, '{}')",
        )
        .bind(old)
        .bind(source)
        .bind(id)
        .execute(&mut connection)
        .await
        .unwrap();
    }
    let unwanted = store
        .insert_events(&[message(source, "no-destination", &[])], false)
        .await
        .unwrap();
    assert_eq!((unwanted.fresh, unwanted.jobs), (1, 0));

    let group = [
        message(source, "yesterday", &[destination]),
        message(source, "fresh-1", &[destination]),
        message(source, "no-destination", &[destination]),
        message(source, "two-days-ago", &[destination]),
        message(source + 1, "yesterday", &[destination]),
    ];
    let committed = store.insert_events(&group, false).await.unwrap();
    assert_eq!((committed.fresh, committed.jobs), (3, 3));
    let runs: Vec<(i32, Vec<String>)> = sqlx::query_as(
        "SELECT j.source_id, array_agg(e.message_id ORDER BY u.k) FROM jobs j \
         CROSS JOIN LATERAL unnest(j.event_ids) WITH ORDINALITY AS u(id, k) \
         JOIN events e ON e.day = j.day AND e.id = u.id GROUP BY j.id, j.source_id ORDER BY j.id",
    )
    .fetch_all(&mut connection)
    .await
    .unwrap();
    assert_eq!(
        runs,
        vec![
            (
                source,
                vec!["fresh-1".to_string(), "two-days-ago".to_string()]
            ),
            (source + 1, vec!["yesterday".to_string()]),
        ]
    );
    // The same group again is all repeats: nothing new, no run.
    let again = store.insert_events(&group, false).await.unwrap();
    assert_eq!((again.fresh, again.jobs), (0, 0));

    let now = time::OffsetDateTime::now_utc();
    let range = (
        now - Duration::from_secs(3_600),
        now + Duration::from_secs(60),
    );
    let archived: Vec<String> = store
        .archive_page(range, Some(&[source]), (day - 1, 0), 100)
        .await
        .unwrap()
        .into_iter()
        .map(|event| String::from_utf8(event.payload).unwrap())
        .collect();
    assert_eq!(
        archived,
        vec![
            r#"{"messageId":"fresh-1"}"#.to_string(),
            r#"{"messageId":"two-days-ago"}"#.to_string(),
        ],
        "the payload-less row of `no-destination` is not archived"
    );
}

#[tokio::test]
async fn a_late_outcome_never_overwrites_a_newer_claim() {
    let db = TestDatabase::create("late_outcome").await;
    let (store, source, destination) = migrated_store(&db).await;
    let event = NewEvent {
        source_id: source,
        message_id: "late-1".into(),
        received_at: time::OffsetDateTime::now_utc(),
        user_key: "u".into(),
        payload: br#"{"type":"track"}"#.to_vec(),
        targets: vec![Target {
            destination_id: destination,
            ordered: false,
            run_size: 10,
        }],
    };
    store.insert_events(&[event], true).await.unwrap();
    // Owner 1 claims with a lease that runs out at once; owner 2 claims again.
    let first = store
        .claim(destination, 10, Duration::ZERO, 1, false, Lane::Live)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = store
        .claim(
            destination,
            10,
            Duration::from_secs(60),
            2,
            false,
            Lane::Live,
        )
        .await
        .unwrap();
    assert_eq!((first.len(), second.len()), (1, 1));
    let outcome = outcome_of;
    // The first claim's late "dead" is dropped; the second's "delivered" holds.
    let dead = Fate::Dead {
        status: Some(400),
        error: "late".into(),
    };
    assert_eq!(
        store.finish(1, &[outcome(&first[0], dead)]).await.unwrap(),
        0
    );
    assert_eq!(
        store
            .finish(2, &[outcome(&second[0], Fate::Delivered)])
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        db.scalar("SELECT count(*)::text FROM dead_letters")
            .await
            .as_deref(),
        Some("0")
    );
    assert_eq!(
        db.scalar("SELECT count(*)::text FROM jobs")
            .await
            .as_deref(),
        Some("0")
    );
}

/// #11.7: partition DDL never makes ingest wait behind a reader holding a lock (a `pg_dump`,
/// an idle-in-transaction session): it gives up within its lock timeout and tries again later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upkeep_behind_a_locking_reader_neither_waits_nor_stalls_ingest() {
    let db = TestDatabase::create("ddl_reader").await;
    let sink = MockServer::start().await;
    let sy = start_switchyard(&hook_config(&sink, ""), &db.url).await;
    let store = Store::connect(&db.url, 2).await.unwrap();
    let day = today();
    // An archive day past any retention, that upkeep will want to drop.
    let mut reader = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let old = day - 30;
    create_day(&mut reader, old).await;
    // A reader holds a lock on the archive, as pg_dump does.
    sqlx::query("BEGIN").execute(&mut reader).await.unwrap();
    sqlx::query("SELECT count(*) FROM events")
        .execute(&mut reader)
        .await
        .unwrap();
    let upkeep = {
        let store = store.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let report = store.upkeep(Duration::from_secs(86_400)).await;
            (started.elapsed(), report)
        })
    };
    let base = format!("http://{}", sy.addr);
    for i in 0..20 {
        let started = std::time::Instant::now();
        let batch = vec![
            json!({"type": "track", "event": "E", "userId": "u", "messageId": format!("d-{i}")}),
        ];
        assert_eq!(post_batch(&base, &batch).await, 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "ingest waited {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (took, report) = upkeep.await.unwrap();
    let report = report.unwrap();
    assert!(took < Duration::from_secs(2), "upkeep waited {took:?}");
    assert!(report.deferred >= 1, "{report:?}");
    sqlx::query("ROLLBACK").execute(&mut reader).await.unwrap();
    // Once the reader is gone, the next pass drops the day.
    let report = store.upkeep(Duration::from_secs(86_400)).await.unwrap();
    assert!(report.dropped_days >= 1, "{report:?}");
    sy.shutdown().await.unwrap();
}

/// #11.13: a destination removed from the config between two runs leaves no queued work
/// behind: it becomes dead letters at start, and no longer counts against `max_queued`.
#[tokio::test]
async fn work_of_a_destination_removed_between_runs_is_dead_lettered_at_start() {
    let db = TestDatabase::create("removed_between").await;
    let sink = MockServer::start().await;
    let down = MockServer::scripted(|_, _| Reply::status(503)).await;
    let both = format!(
        "{}\n[[destinations]]\nname = \"gone\"\nkind = \"webhook\"\nurl = \"{}\"\nretry = {{ initial_backoff = \"5m\" }}\n\n[limits]\nmax_queued = 100\n",
        hook_config(&sink, ""),
        down.url("/down")
    );
    let sy = start_switchyard(&both, &db.url).await;
    let base = format!("http://{}", sy.addr);
    let batch: Vec<_> = (0..40)
        .map(|i| json!({"type": "track", "event": "E", "userId": "u", "messageId": format!("g-{i}")}))
        .collect();
    assert_eq!(post_batch(&base, &batch).await, 200);
    assert!(
        down.wait_until(Duration::from_secs(10), |s| s.received().len() >= 40)
            .await
    );
    // The hook's copies are delivered too, so what is queued at the restart is only `gone`'s.
    assert!(
        sink.wait_until(Duration::from_secs(10), |s| s.events().len() >= 40)
            .await
    );
    sy.shutdown().await.unwrap();

    let only_hook = format!("{}\n[limits]\nmax_queued = 100\n", hook_config(&sink, ""));
    let sy = start_switchyard(&only_hook, &db.url).await;
    let base = format!("http://{}", sy.addr);
    let dead = db
        .scalar("SELECT count(*)::text FROM dead_letters d JOIN destinations n ON n.id = d.destination_id WHERE n.name = 'gone'")
        .await;
    assert_eq!(dead.as_deref(), Some("40"));
    // The queue holds nothing of it, so 70 more events fit under max_queued = 100.
    let batch: Vec<_> = (0..70)
        .map(|i| json!({"type": "track", "event": "E", "userId": "u", "messageId": format!("h-{i}")}))
        .collect();
    assert_eq!(post_batch(&base, &batch).await, 200);
    sy.shutdown().await.unwrap();
}

/// A cheap, incompressible-looking number per `i` (no hash crate needed).
fn md5_like(i: u64) -> u64 {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 32)
}

/// #11.8: a long vendor outage pins no partitions: retrying runs live in the one `jobs`
/// table, so the partition count stays the same however long it lasts, and the backlog drains
/// once the vendor is back. Three minutes with `SWITCHYARD_LONG_FAULTS=1`, else 20 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_keeps_the_partition_count_bounded() {
    let outage = if std::env::var_os("SWITCHYARD_LONG_FAULTS").is_some() {
        Duration::from_secs(180)
    } else {
        Duration::from_secs(20)
    };
    let db = TestDatabase::create("long_outage").await;
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sink = {
        let up = up.clone();
        MockServer::scripted(move |_, _| {
            if up.load(std::sync::atomic::Ordering::Relaxed) {
                Reply::ok()
            } else {
                Reply::status(503)
            }
        })
        .await
    };
    let retry = "retry = { initial_backoff = \"1s\", max_backoff = \"2s\", max_attempts = 1000 }";
    let sy = start_switchyard(&hook_config(&sink, retry), &db.url).await;
    let base = format!("http://{}", sy.addr);
    let count_partitions = "SELECT count(*)::text FROM pg_inherits";
    let before: usize = db.scalar(count_partitions).await.unwrap().parse().unwrap();
    let started = std::time::Instant::now();
    let mut sent = 0;
    let mut counts = Vec::new();
    while started.elapsed() < outage {
        let batch: Vec<_> = (0..20)
            .map(|i| json!({"type": "track", "event": "E", "userId": "u", "messageId": format!("o-{sent}-{i}")}))
            .collect();
        assert_eq!(post_batch(&base, &batch).await, 200);
        sent += 20;
        counts.push(
            db.scalar(count_partitions)
                .await
                .unwrap()
                .parse::<usize>()
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(
        counts.iter().all(|c| *c <= before),
        "partitions during the outage: {before} at the start, then {counts:?}"
    );
    up.store(true, std::sync::atomic::Ordering::Relaxed);
    let drained = sink
        .wait_until(Duration::from_secs(60), |s| {
            let mut ids = s.message_ids();
            ids.sort();
            ids.dedup();
            ids.len() == sent
        })
        .await;
    assert!(
        drained,
        "the backlog of {sent} events drains once the vendor is back"
    );
    sy.shutdown().await.unwrap();
}

/// Rows read so far (sequentially and through indexes) from the tables named like `tables`,
/// once their statistics have moved past `after_scans` scans: a backend's counters reach the
/// statistics when it goes idle or exits.
async fn rows_read(db: &TestDatabase, tables: &str, after_scans: i64) -> (i64, i64) {
    let sql = format!(
        "SELECT sum(coalesce(seq_scan, 0) + coalesce(idx_scan, 0))::text || ' ' || \
         sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0))::text \
         FROM pg_stat_user_tables WHERE relname LIKE '{tables}'"
    );
    for _ in 0..100 {
        let text = db.scalar(&sql).await.unwrap_or_default();
        let mut parts = text.split(' ').map(|n| n.parse::<i64>().unwrap_or(0));
        let (scans, read) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if scans > after_scans {
            return (scans, read);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the statistics of {tables} did not move past {after_scans} scans");
}

/// Rows of `tables` read since `before` (a [`rows_read`] taken earlier).
async fn rows_read_since(db: &TestDatabase, tables: &str, before: (i64, i64)) -> i64 {
    let (_, after) = rows_read(db, tables, before.0).await;
    after - before.1
}

/// `count` events, each queued for `destination` as a run of its own.
fn one_event_runs(source: i32, destination: i32, prefix: &str, count: usize) -> Vec<NewEvent> {
    (0..count)
        .map(|i| NewEvent {
            source_id: source,
            message_id: format!("{prefix}-{i}"),
            received_at: time::OffsetDateTime::now_utc(),
            user_key: format!("u{i}"),
            payload: br#"{"type":"track"}"#.to_vec(),
            targets: vec![Target {
                destination_id: destination,
                ordered: false,
                run_size: 1,
            }],
        })
        .collect()
}

/// The outcome of a claimed run whose every event met `fate`.
fn outcome_of(run: &switchyard::store::ClaimedRun, fate: Fate) -> RunOutcome {
    RunOutcome {
        id: run.id,
        attempts: run.attempts,
        delay: Duration::ZERO,
        status: None,
        error: None,
        events: run.events.iter().map(|e| (e.id, fate.clone())).collect(),
    }
}

/// A store of one connection, as the completer has, that has written a few outcomes against a
/// short queue analyzed while none of its runs was claimed: the plan a connection keeps.
async fn completer_with_its_kept_plan(
    db: &TestDatabase,
    store: Store,
    source: i32,
    destination: i32,
) -> Store {
    store.close().await;
    let store = Store::connect(&db.url, 1).await.unwrap();
    store
        .insert_events(&one_event_runs(source, destination, "short", 20), true)
        .await
        .unwrap();
    db.scalar("ANALYZE jobs").await;
    for _ in 0..10 {
        let runs = store
            .claim(
                destination,
                2,
                Duration::from_secs(60),
                1,
                false,
                Lane::Live,
            )
            .await
            .unwrap();
        let delivered: Vec<RunOutcome> = runs
            .iter()
            .map(|run| outcome_of(run, Fate::Delivered))
            .collect();
        assert_eq!(store.finish(1, &delivered).await.unwrap(), 2);
    }
    store
}

/// Queues `count` one-event runs for `destination`, closes `store`, and analyzes the queue as
/// autovacuum would (so the planner knows how deep it is); returns `rows_read` of `jobs`.
async fn queue_deep_backlog(
    db: &TestDatabase,
    store: Store,
    source: i32,
    destination: i32,
    count: usize,
) -> (i64, i64) {
    for chunk in one_event_runs(source, destination, "deep", count).chunks(2_000) {
        store.insert_events(chunk, true).await.unwrap();
    }
    store.close().await;
    db.scalar("ANALYZE jobs").await;
    rows_read(db, "jobs", -1).await
}

/// Overload: with a deep backlog, a claim reads the runs it takes, not the whole queue. The due
/// index once did not match the claims' lane condition, so each claim read and sorted every
/// queued run, and while ingest went on at full speed delivery fell to a few hundred events a
/// second.
#[tokio::test]
async fn a_claim_against_a_deep_backlog_reads_only_the_runs_it_takes() {
    let db = TestDatabase::create("deep_backlog_claim").await;
    let (store, source, destination) = migrated_store(&db).await;
    let backlog = 20_000;
    let before = queue_deep_backlog(&db, store, source, destination, backlog).await;

    let store = Store::connect(&db.url, 1).await.unwrap();
    let lease = Duration::from_secs(60);
    let live = store
        .claim(destination, 10, lease, 1, false, Lane::Live)
        .await
        .unwrap();
    let replay = store
        .claim(destination, 10, lease, 1, false, Lane::Replay)
        .await
        .unwrap();
    assert_eq!((live.len(), replay.len()), (10, 0));
    store.close().await;

    let read = rows_read_since(&db, "jobs", before).await;
    assert!(
        read < 1_000,
        "two claims of 10 runs read {read} rows of a {backlog}-run queue"
    );
}

/// A claim's connection keeps the plan it made first. Made while the queue and the archive were
/// empty, it read the whole day of events for every run it claimed once the queue was deep
/// (43 s for 10 runs of 100 events in a day of 300,000), until each event was looked up by key.
#[tokio::test]
async fn a_claim_planned_on_an_empty_queue_reads_only_its_events_once_deep() {
    let db = TestDatabase::create("claim_planned_empty").await;
    let (store, source, destination) = migrated_store(&db).await;
    db.scalar("ANALYZE").await;
    let store = {
        store.close().await;
        Store::connect(&db.url, 1).await.unwrap()
    };
    let lease = Duration::from_secs(60);
    let first = store
        .claim(destination, 10, lease, 1, false, Lane::Live)
        .await
        .unwrap();
    assert!(first.is_empty());
    let backlog = 20_000;
    let events: Vec<NewEvent> = (0..backlog)
        .map(|i| message(source, &format!("deep-{i}"), &[destination]))
        .collect();
    // Queued from other connections, closed so that only the claim's reads are counted.
    let writer = Store::connect(&db.url, 1).await.unwrap();
    for chunk in events.chunks(2_000) {
        writer.insert_events(chunk, true).await.unwrap();
    }
    writer.close().await;
    let before = rows_read(&db, "events_d%", -1).await;

    let runs = store
        .claim(destination, 10, lease, 1, false, Lane::Live)
        .await
        .unwrap();
    store.close().await;

    let claimed: usize = runs.iter().map(|run| run.events.len()).sum();
    assert_eq!((runs.len(), claimed), (10, 1_000));
    let read = rows_read_since(&db, "events_d%", before).await;
    assert!(
        read < 10_000,
        "a claim of {claimed} events read {read} archived events of {backlog}"
    );
}

/// Outcomes find their runs by key, however small the queue was when their plan was made.
/// A connection keeps the plan it made after a few outcomes against a short queue (a scan of
/// it, then the cheapest way): once the queue grew, every outcome read all of it, 3.4 ms a
/// statement in the `replay` bench instead of 0.2 ms.
#[tokio::test]
async fn an_outcome_reads_only_its_runs_after_the_queue_grew() {
    let db = TestDatabase::create("outcome_by_key").await;
    let (store, source, destination) = migrated_store(&db).await;
    let queue = |prefix: &str, count: usize| one_event_runs(source, destination, prefix, count);
    let delivered = |runs: &[switchyard::store::ClaimedRun]| -> Vec<RunOutcome> {
        runs.iter()
            .map(|run| outcome_of(run, Fate::Delivered))
            .collect()
    };
    let lease = Duration::from_secs(60);
    let store = completer_with_its_kept_plan(&db, store, source, destination).await;
    let backlog = 20_000;
    for chunk in queue("long", backlog).chunks(2_000) {
        store.insert_events(chunk, true).await.unwrap();
    }
    // Claimed elsewhere, so that only the outcome's reads are counted.
    let claimer = Store::connect(&db.url, 1).await.unwrap();
    let runs = claimer
        .claim(destination, 10, lease, 1, false, Lane::Live)
        .await
        .unwrap();
    assert_eq!(runs.len(), 10);
    claimer.close().await;
    let before = rows_read(&db, "jobs", -1).await;

    assert_eq!(store.finish(1, &delivered(&runs)).await.unwrap(), 10);
    store.close().await;

    let read = rows_read_since(&db, "jobs", before).await;
    assert!(
        read < 1_000,
        "an outcome of 10 runs read {read} rows of a {backlog}-run queue"
    );
}

/// Writing many runs' outcomes at once costs about what writing them in small batches does.
/// With the plan a connection keeps after a few outcomes, and statistics taken while no run was
/// claimed, Postgres guessed one owned run and compared every run of a batch with every other,
/// and read the whole day of events for each run with a dead event: 1,000 one-event runs (a
/// rate-limited destination, thousands of destinations, or a shutdown releasing 10,000
/// destinations' runs) took 300 ms to write, and the drain at shutdown outlived its 30 s.
#[tokio::test]
async fn a_large_batch_of_outcomes_costs_what_small_batches_do() {
    let db = TestDatabase::create("outcomes_linear").await;
    let (store, source, destination) = migrated_store(&db).await;
    let queue = |prefix: &str, count: usize| one_event_runs(source, destination, prefix, count);
    let lease = Duration::from_secs(600);
    let store = completer_with_its_kept_plan(&db, store, source, destination).await;
    let runs = 4_000;
    for chunk in queue("many", runs).chunks(2_000) {
        store.insert_events(chunk, true).await.unwrap();
    }
    let mut claimed = Vec::new();
    while claimed.len() < runs {
        let more = store
            .claim(destination, 500, lease, 1, false, Lane::Live)
            .await
            .unwrap();
        assert!(!more.is_empty(), "every queued run can be claimed");
        claimed.extend(more);
    }
    // Every other run failed for good, so half the events go to the dead letters.
    let outcomes: Vec<RunOutcome> = claimed
        .iter()
        .enumerate()
        .map(|(i, run)| {
            let fate = if i % 2 == 0 {
                Fate::Delivered
            } else {
                Fate::Dead {
                    status: Some(400),
                    error: "rejected".into(),
                }
            };
            outcome_of(run, fate)
        })
        .collect();
    let (small, large) = outcomes.split_at(runs / 2);
    let before = rows_read(&db, "events_d%", -1).await;

    let started = std::time::Instant::now();
    for batch in small.chunks(100) {
        assert_eq!(store.finish(1, batch).await.unwrap(), 100);
    }
    let in_small_batches = started.elapsed();
    let started = std::time::Instant::now();
    assert_eq!(store.finish(1, large).await.unwrap(), large.len() as u64);
    let at_once = started.elapsed();
    store.close().await;

    assert_eq!(
        db.scalar("SELECT count(*)::text FROM dead_letters").await,
        Some((runs / 2).to_string())
    );
    assert_eq!(
        db.scalar("SELECT count(*)::text FROM jobs").await,
        Some("0".into())
    );
    let read = rows_read_since(&db, "events_d%", before).await;
    assert!(
        read < 10 * runs as i64,
        "{} dead events read {read} archived events",
        runs / 2
    );
    assert!(
        at_once < in_small_batches * 2,
        "{} outcomes took {at_once:?} in one batch, {in_small_batches:?} in batches of 100",
        large.len()
    );
}

/// A replay's runs moved to the dead letters with their removed destination count as failed,
/// so its progress adds up and, when the destination comes back, its backlog (what it may
/// still select against) is what is really queued: counted without them, a replay with
/// 20,000 such events would never select again.
#[tokio::test]
async fn retired_replay_runs_count_as_failed() {
    let db = TestDatabase::create("retired_replay").await;
    let (store, source, destination) = migrated_store(&db).await;
    let now = time::OffsetDateTime::now_utc();
    let events: Vec<NewEvent> = (0..30)
        .map(|i| message(source, &format!("archived-{i}"), &[]))
        .collect();
    store.insert_events(&events, true).await.unwrap();
    let range = (
        now - time::Duration::minutes(1),
        now + time::Duration::minutes(1),
    );
    let replay = queue_replay(&store, source, destination, range).await;
    assert_eq!(replay.selected, 30);

    assert_eq!(store.retire_removed(&[]).await.unwrap(), 30);
    let replay = store.replay(replay.id).await.unwrap().unwrap();
    assert_eq!(
        (
            replay.selected,
            replay.delivered,
            replay.failed,
            replay.backlog()
        ),
        (30, 0, 30, 0)
    );
    store.close().await;
}

/// Queues, through `selector`, a replay to `destination` of the archive received in `range`,
/// as runs of 10 events, with what it read kept for their claim as a replay does; returns it
/// as queued.
async fn queue_replay(
    selector: &Store,
    source: i32,
    destination: i32,
    range: (time::OffsetDateTime, time::OffsetDateTime),
) -> Replay {
    let replay = selector
        .create_replay(destination, range.0, range.1, None)
        .await
        .unwrap();
    let mut page = selector.replay_page(&replay, 100).await.unwrap();
    page.iter_mut().for_each(ArchivedEvent::unpack);
    let last = page.last().unwrap();
    let step = ReplayStep {
        runs: page
            .chunks(10)
            .map(|run| (run[0].day, source, run.iter().map(|e| e.id).collect(), None))
            .collect(),
        cursor: (last.day, last.id),
        done: true,
        events: page
            .iter()
            .map(|e| {
                let read = ClaimedEvent {
                    id: e.id,
                    message_id: e.message_id.clone(),
                    payload: e.payload.clone(),
                    source: Some("s".into()),
                };
                (e.day, read)
            })
            .collect(),
    };
    let queued = page.len() as u64;
    assert_eq!(
        selector.queue_replay_step(&replay, step).await.unwrap(),
        queued
    );
    selector.replay(replay.id).await.unwrap().unwrap()
}

/// Archives `read-0` to `read-19` of `source`, the first ten received 30 s ago and the others
/// 10 s ago; returns instants before, between and after the two.
async fn archive_twice_ten(
    store: &Store,
    source: i32,
) -> (
    time::OffsetDateTime,
    time::OffsetDateTime,
    time::OffsetDateTime,
) {
    let now = time::OffsetDateTime::now_utc();
    let events: Vec<NewEvent> = (0..20)
        .map(|i| {
            let mut event = message(source, &format!("read-{i}"), &[]);
            event.received_at = now - time::Duration::seconds(if i < 10 { 30 } else { 10 });
            event
        })
        .collect();
    store.insert_events(&events, true).await.unwrap();
    let (early, middle, late) = (
        now - time::Duration::minutes(1),
        now - time::Duration::seconds(20),
        now + time::Duration::minutes(1),
    );
    (early, middle, late)
}

/// The message ids and payloads of claimed runs, run by run.
fn contents(runs: &[switchyard::store::ClaimedRun]) -> Vec<Vec<(String, String)>> {
    runs.iter()
        .map(|run| {
            run.events
                .iter()
                .map(|e| {
                    assert_eq!(e.source.as_deref(), Some("s"));
                    let payload = String::from_utf8_lossy(&e.payload).into_owned();
                    (e.message_id.clone(), payload)
                })
                .collect()
        })
        .collect()
}

/// A replay claim takes the events its replay read from the archive a moment before, instead
/// of reading them again (once, a replayed event cost Postgres two and a half times an event
/// of a backlog); events selected by another process are read from the archive. Two replays
/// of the same events to one destination each get all of theirs, even in one claim.
#[tokio::test]
async fn a_replay_claim_takes_what_its_replay_read() {
    let db = TestDatabase::create("replay_claim_read").await;
    let (store, source, destination) = migrated_store(&db).await;
    let (early, middle, late) = archive_twice_ten(&store, source).await;
    // The first ten are replayed by this process, the last ten by another one.
    queue_replay(&store, source, destination, (early, middle)).await;
    let elsewhere = Store::connect(&db.url, 1).await.unwrap();
    queue_replay(&elsewhere, source, destination, (middle, late)).await;
    elsewhere.close().await;
    // From here on, the archive holds other payloads than the replays read.
    db.scalar(r#"UPDATE events SET payload = convert_to('{"read":"again"}', 'UTF8')"#)
        .await;

    let lease = Duration::from_secs(60);
    let runs = store
        .claim(destination, 10, lease, 1, false, Lane::Replay)
        .await
        .unwrap();
    let expected = |range: std::ops::Range<usize>, payload: &dyn Fn(usize) -> String| {
        range
            .map(|i| (format!("read-{i}"), payload(i)))
            .collect::<Vec<_>>()
    };
    let as_read = |i: usize| format!(r#"{{"messageId":"read-{i}"}}"#);
    let again = |_| r#"{"read":"again"}"#.to_string();
    assert_eq!(
        contents(&runs),
        vec![expected(0..10, &as_read), expected(10..20, &again)]
    );

    // Two more replays of all twenty, both selected here: one claim takes their four runs.
    for _ in 0..2 {
        queue_replay(&store, source, destination, (early, late)).await;
    }
    let runs = store
        .claim(destination, 10, lease, 1, false, Lane::Replay)
        .await
        .unwrap();
    let halves = vec![expected(0..10, &again), expected(10..20, &again)];
    assert_eq!(contents(&runs), [halves.clone(), halves].concat());
    store.close().await;
}

/// A cancelled replay's runs are never claimed, so what its process kept of their events is
/// let go at once, and not after others' replays have filled the store up; what another
/// replay kept stays.
#[tokio::test]
async fn a_cancelled_replay_lets_go_of_what_it_read() {
    let db = TestDatabase::create("replay_cancel_read").await;
    let (store, source, destination) = migrated_store(&db).await;
    let (early, middle, late) = archive_twice_ten(&store, source).await;
    let cancelled = queue_replay(&store, source, destination, (early, middle)).await;
    queue_replay(&store, source, destination, (middle, late)).await;
    assert!(store.cancel_replay(cancelled.id).await.unwrap());
    db.scalar(r#"UPDATE events SET payload = convert_to('{"read":"again"}', 'UTF8')"#)
        .await;
    // The cancelled replay's events again, selected by another process.
    let elsewhere = Store::connect(&db.url, 1).await.unwrap();
    queue_replay(&elsewhere, source, destination, (early, middle)).await;
    elsewhere.close().await;

    let runs = store
        .claim(
            destination,
            10,
            Duration::from_secs(60),
            1,
            false,
            Lane::Replay,
        )
        .await
        .unwrap();
    let kept: Vec<_> = (10..20)
        .map(|i| {
            (
                format!("read-{i}"),
                format!(r#"{{"messageId":"read-{i}"}}"#),
            )
        })
        .collect();
    let read_again: Vec<_> = (0..10)
        .map(|i| (format!("read-{i}"), r#"{"read":"again"}"#.to_string()))
        .collect();
    assert_eq!(contents(&runs), vec![kept, read_again]);
    store.close().await;
}

/// A replay of the last minutes reads a page of the archive, not the whole day. The page once
/// was planned from the day's statistics, which never know of the events received since they
/// were taken: Postgres expected a few dozen rows, read and sorted the whole day for each page,
/// and a replay of a fresh million events took 2.7 s a page.
#[tokio::test]
async fn a_page_of_fresh_archive_reads_only_that_page() {
    let db = TestDatabase::create("fresh_archive_page").await;
    let (store, source, _) = migrated_store(&db).await;
    let now = time::OffsetDateTime::now_utc();
    let earlier = now - time::Duration::minutes(10);
    for (batch, received_at) in [(0, earlier), (1, earlier), (2, now), (3, now)] {
        let events: Vec<NewEvent> = (0..5_000)
            .map(|i| NewEvent {
                source_id: source,
                message_id: format!("fresh-{batch}-{i}"),
                received_at,
                user_key: format!("u{i}"),
                payload: br#"{"type":"track","event":"E"}"#.to_vec(),
                targets: vec![],
            })
            .collect();
        store.insert_events(&events, true).await.unwrap();
        if batch == 1 {
            // Autovacuum analyzed the day before the last events came in.
            db.scalar("ANALYZE events").await;
        }
    }
    store.close().await;
    let store = Store::connect(&db.url, 1).await.unwrap();
    let before = rows_read(&db, "events_d%", -1).await;
    let range = (
        now - time::Duration::seconds(1),
        now + time::Duration::seconds(1),
    );
    let page = store
        .archive_page(range, None, (today() - 1, 0), 100)
        .await
        .unwrap();
    assert_eq!(page.len(), 100);
    assert!(page.iter().all(|event| event.received_at >= range.0));
    store.close().await;

    let read = rows_read_since(&db, "events_d%", before).await;
    assert!(
        read < 11_000,
        "a page of 100 read {read} rows of a 20,000-event day"
    );
}

#[tokio::test]
async fn one_claim_serves_many_destinations_each_within_its_own_limit() {
    let db = TestDatabase::create("claim_many").await;
    let (store, source, _) = migrated_store(&db).await;
    let names: Vec<String> = ["many", "one", "paused", "ordered", "idle"]
        .iter()
        .map(|name| name.to_string())
        .collect();
    let ids = store
        .name_ids(NameTable::Destinations, &names)
        .await
        .unwrap();
    let event = |message_id: &str, user: &str, destination: &str, ordered: bool| NewEvent {
        source_id: source,
        message_id: message_id.into(),
        received_at: time::OffsetDateTime::now_utc(),
        user_key: user.into(),
        payload: br#"{"type":"track"}"#.to_vec(),
        targets: vec![Target {
            destination_id: ids[destination],
            ordered,
            run_size: 1,
        }],
    };
    // One event for two destinations, each claimed with it.
    let mut shared = event("s1", "c", "one", false);
    shared.targets.push(Target {
        destination_id: ids["ordered"],
        ordered: true,
        run_size: 1,
    });
    // Separate commits, so each destination's runs are in ingest order.
    for batch in [
        vec![
            event("m1", "a", "many", false),
            event("o1", "a", "one", false),
            shared,
        ],
        vec![
            event("m2", "b", "many", false),
            event("p1", "a", "paused", false),
        ],
        vec![
            event("m3", "c", "many", false),
            event("u1", "a", "ordered", true),
        ],
        vec![
            event("u2", "a", "ordered", true),
            event("u3", "b", "ordered", true),
        ],
    ] {
        store.insert_events(&batch, true).await.unwrap();
    }
    store.set_paused(ids["paused"], true).await.unwrap();
    let ask = |name: &str, limit: usize, ordered: bool| Ask {
        destination_id: ids[name],
        limit,
        lease: Duration::from_secs(60),
        ordered,
    };
    let asks = [
        ask("many", 2, false),
        ask("one", 5, false),
        ask("paused", 5, false),
        ask("ordered", 5, true),
        ask("idle", 5, false),
    ];
    let claimed = store.claim_many(&asks, 1, Lane::Live).await.unwrap();
    let got = |name: &str| -> Vec<String> {
        claimed
            .get(&ids[name])
            .map(|runs| {
                runs.iter()
                    .flat_map(|run| run.events.iter().map(|e| e.message_id.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(got("many"), ["m1", "m2"], "the oldest, up to its limit");
    assert_eq!(got("one"), ["o1", "s1"]);
    assert!(
        got("paused").is_empty(),
        "a paused destination gets nothing"
    );
    assert_eq!(
        got("ordered"),
        ["s1", "u1", "u3"],
        "per-user order: user a's second run waits for its first"
    );
    assert!(!claimed.contains_key(&ids["idle"]));
    // What is claimed is leased: a second claim gets only what was left.
    let again = store.claim_many(&asks, 2, Lane::Live).await.unwrap();
    let left: Vec<&str> = again
        .values()
        .flatten()
        .flat_map(|run| run.events.iter().map(|e| e.message_id.as_str()))
        .collect();
    assert_eq!(left, ["m3"]);
}

/// The scheduler's once-a-second look for due work asks each destination's due index, and
/// reads no queue: asked without the lane's condition, no index applied, and with 100
/// destinations each look took 224 ms while the scheduling loop waited on it.
#[tokio::test]
async fn looking_for_due_destinations_reads_no_queue() {
    let db = TestDatabase::create("due_destinations").await;
    let (store, source, busy) = migrated_store(&db).await;
    let idle = store
        .name_ids(NameTable::Destinations, &["idle".to_string()])
        .await
        .unwrap()["idle"];
    let before = queue_deep_backlog(&db, store, source, busy, 20_000).await;

    let store = Store::connect(&db.url, 1).await.unwrap();
    let due = store.due_destinations(&[busy, idle]).await.unwrap();
    assert_eq!(due, [busy]);
    store.close().await;

    let read = rows_read_since(&db, "jobs", before).await;
    assert!(read < 100, "looking for due work read {read} queued runs");
}

/// A page event as analytics.js sends it from a browser (about 1 KB with its context),
/// numbered.
fn browser_page(i: usize) -> String {
    let page = json!({
        "path": "/pricing", "referrer": "https://www.google.com/", "search": "",
        "title": "Pricing - Acme", "url": "https://www.acme.com/pricing"
    });
    json!({
        "type": "page", "name": "Pricing", "anonymousId": format!("5f1b2c3d-4e5f-6789-{i:012}"),
        "messageId": format!("packed-{i}"), "integrations": {}, "properties": page,
        "context": {
            "ip": "203.0.113.7", "locale": "en-US", "page": page,
            "library": {"name": "analytics.js", "version": "next-1.70.0"},
            "userAgent": "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 \
                          (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
            "userAgentData": {"brands": [{"brand": "Google Chrome", "version": "131"},
                                         {"brand": "Chromium", "version": "131"}],
                              "mobile": false, "platform": "macOS"}
        },
        "timestamp": "2026-11-30T10:00:00.007Z", "sentAt": "2026-11-30T10:00:00.005Z",
        "receivedAt": "2026-11-30T10:00:00.012Z"
    })
    .to_string()
}

// Postgres compresses a value only once its row passes about 2 KB, so an event of a few
// hundred bytes was archived as it came. It is now stored compressed (LZ4), and every reader
// (claims, replay pages, dead letters) gets the JSON back byte for byte.
#[tokio::test]
async fn an_archived_event_takes_less_room_than_its_json_and_reads_back_whole() {
    let db = TestDatabase::create("packed_payloads").await;
    let (store, source, destination) = migrated_store(&db).await;
    let sent: Vec<String> = (0..200).map(browser_page).collect();
    let events: Vec<NewEvent> = sent
        .iter()
        .enumerate()
        .map(|(i, json)| NewEvent {
            payload: json.clone().into_bytes(),
            ..message(source, &format!("packed-{i}"), &[destination])
        })
        .collect();
    store.insert_events(&events, true).await.unwrap();

    let json_bytes: usize = sent.iter().map(String::len).sum();
    let stored: i64 = db
        .scalar("SELECT sum(octet_length(payload))::text FROM events")
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (stored as usize) * 10 < json_bytes * 8,
        "{stored} bytes stored for {json_bytes} bytes of JSON"
    );

    let lease = Duration::from_secs(60);
    let runs = store
        .claim(destination, 10, lease, 1, false, Lane::Live)
        .await
        .unwrap();
    let claimed: Vec<String> = runs
        .iter()
        .flat_map(|run| &run.events)
        .map(|event| String::from_utf8(event.payload.clone()).unwrap())
        .collect();
    assert_eq!(claimed, sent);

    let now = time::OffsetDateTime::now_utc();
    let range = (
        now - time::Duration::hours(1),
        now + time::Duration::hours(1),
    );
    let page = store
        .archive_page(range, None, (today() - 1, 0), 1_000)
        .await
        .unwrap();
    let paged: Vec<String> = page
        .iter()
        .map(|event| String::from_utf8(event.payload.clone()).unwrap())
        .collect();
    assert_eq!(paged, sent);

    let dead = RunOutcome {
        status: Some(400),
        error: Some("bad request".into()),
        ..outcome_of(
            &runs[0],
            Fate::Dead {
                status: Some(400),
                error: "bad request".into(),
            },
        )
    };
    store.finish(1, &[dead]).await.unwrap();
    let letters = store.dead_letters(None, 1_000).await.unwrap();
    let lettered: Vec<String> = letters
        .iter()
        .map(|letter| String::from_utf8(letter.payload.clone()).unwrap())
        .collect();
    assert_eq!(lettered, sent[..runs[0].events.len()]);
    store.close().await;
}

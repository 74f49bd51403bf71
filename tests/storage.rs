//! Finished work is reclaimed by dropping whole time partitions, not by DELETE + VACUUM.

use std::time::Duration;

use serde_json::json;
use sqlx::Connection;
use switchyard::store::{NameTable, Store, PART_SECONDS};
use switchyard::testkit::{start_switchyard, MockServer, TestDatabase};

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
async fn a_past_window_is_dropped_once_its_jobs_are_done_and_kept_while_one_is_left() {
    let db = TestDatabase::create("partitions").await;
    let store = Store::connect(&db.url, 4).await.unwrap();
    store.migrate().await.unwrap();
    store.maintain_partitions().await.unwrap();
    let ids = store
        .name_ids(NameTable::Destinations, &["d".to_string()])
        .await
        .unwrap();
    let destination = ids["d"];
    let mut connection = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let now: i64 = sqlx::query_scalar("SELECT floor(extract(epoch FROM now()))::bigint")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    // Two windows an hour in the past, each with one event and one queued job.
    let old = (now / PART_SECONDS - 6) as i32;
    for part in [old, old + 1] {
        for table in ["events", "jobs"] {
            sqlx::query(&format!(
                "CREATE TABLE {table}_p{part} PARTITION OF {table} FOR VALUES FROM ({part}) TO ({})",
                part + 1
            ))
            .execute(&mut connection)
            .await
            .unwrap();
        }
        sqlx::query(
            "WITH e AS (INSERT INTO events (part, source_id, message_id, received_at, payload) \
             VALUES ($1, 1, $2, now(), '{}') RETURNING part, id) \
             INSERT INTO jobs (part, event_id, destination_id, source_id, run_at, enqueued_at) \
             SELECT part, id, $3, 1, now() + interval '1 hour', now() FROM e",
        )
        .bind(part)
        .bind(format!("m-{part}"))
        .bind(destination)
        .execute(&mut connection)
        .await
        .unwrap();
    }
    // The first window's job is done; the second's is still waiting for a retry.
    sqlx::query("DELETE FROM jobs WHERE part = $1")
        .bind(old)
        .execute(&mut connection)
        .await
        .unwrap();
    let report = store.maintain_partitions().await.unwrap();
    assert_eq!(report.dropped_windows, 1, "{report:?}");
    let jobs = partitions(&db, "jobs").await;
    let events = partitions(&db, "events").await;
    assert!(!jobs.contains(&format!("jobs_p{old}")) && !events.contains(&format!("events_p{old}")));
    assert!(
        jobs.contains(&format!("jobs_p{}", old + 1))
            && events.contains(&format!("events_p{}", old + 1)),
        "a window with work left stays: {jobs:?}"
    );
    // Windows ahead are ready before they are needed.
    let current = (now / PART_SECONDS) as i32;
    for part in current..=current + 2 {
        assert!(jobs.contains(&format!("jobs_p{part}")), "{jobs:?}");
    }
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

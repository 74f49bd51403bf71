//! Storage: the archive's day partitions, the queue of runs, and what stays behind.

use std::time::Duration;

use serde_json::json;
use sqlx::Connection;
use switchyard::store::{today, NameTable, Store};
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
    // one's still waits for a retry. A dedup day older than yesterday, and one within.
    for old in [day - 6, day - 5] {
        for table in ["events", "message_ids"] {
            sqlx::query(&format!(
                "CREATE TABLE {table}_d{old} PARTITION OF {table} FOR VALUES FROM ({old}) TO ({})",
                old + 1
            ))
            .execute(&mut connection)
            .await
            .unwrap();
        }
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
    let dedup = partitions(&db, "message_ids").await;
    assert!(
        !events.contains(&format!("events_d{}", day - 6)),
        "{events:?} {report:?}"
    );
    assert!(
        events.contains(&format!("events_d{}", day - 5)),
        "a day a queued run refers to stays: {events:?}"
    );
    assert!(
        !dedup
            .iter()
            .any(|t| t.ends_with(&format!("_d{}", day - 6))
                || t.ends_with(&format!("_d{}", day - 5))),
        "{dedup:?}"
    );
    // Days ahead are ready before they are needed.
    for d in day..=day + 2 {
        assert!(events.contains(&format!("events_d{d}")), "{events:?}");
        assert!(dedup.contains(&format!("message_ids_d{d}")), "{dedup:?}");
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

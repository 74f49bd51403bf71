//! Several processes on one database: roles, rate-limit keys and liveness, with real
//! processes killed and cut off.

use std::time::Duration;

use serde_json::json;
use switchyard::testkit::{MockServer, Process, Reply, TestDatabase};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");
const KEY: &str = "wk_cluster";

async fn send(base: &str, prefix: &str, count: usize) -> u16 {
    let batch: Vec<_> = (0..count)
        .map(|i| json!({"type": "track", "event": "E", "userId": format!("u{i}"), "messageId": format!("{prefix}-{i}")}))
        .collect();
    reqwest::Client::new()
        .post(format!("{base}/v1/batch"))
        .basic_auth(KEY, Some(""))
        .json(&json!({ "batch": batch }))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

fn per_path(sink: &MockServer, destinations: usize) -> Vec<usize> {
    let received = sink.received();
    (0..destinations)
        .map(|d| {
            let path = format!("/d{d}");
            received
                .iter()
                .filter(|r| r.path == path && r.status == 200)
                .count()
        })
        .collect()
}

/// #11.2: ingest-only processes take no share of the rate-limit keys, and a killed worker's
/// keys move to the survivor, so every key is served while any worker lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rate_limit_key_is_served_by_workers_whatever_the_roles_and_kills() {
    let db = TestDatabase::create("cluster_roles").await;
    let sink = MockServer::start().await;
    let mut config = format!("[[sources]]\nname = \"web\"\nwrite_key = \"{KEY}\"\n");
    for d in 0..6 {
        config += &format!(
            "\n[[destinations]]\nname = \"d{d}\"\nkind = \"webhook\"\nurl = \"{}\"\nrate_limit = \"20/s\"\nrate_limit_key = \"key-{d}\"\n",
            sink.url(&format!("/d{d}"))
        );
    }
    let ingest = [("SWITCHYARD_ROLE", "ingest")];
    let worker = [("SWITCHYARD_ROLE", "worker")];
    let front = Process::spawn_with(BIN, &config, &db.url, &ingest).await;
    let _front2 = Process::spawn_with(BIN, &config, &db.url, &ingest).await;
    let mut first = Process::spawn_with(BIN, &config, &db.url, &worker).await;
    let _second = Process::spawn_with(BIN, &config, &db.url, &worker).await;
    assert_eq!(send(&front.base(), "a", 40).await, 200);
    let all_served = |want: usize| move |s: &MockServer| per_path(s, 6).iter().all(|n| *n >= want);
    let served = sink
        .wait_until(Duration::from_secs(40), all_served(40))
        .await;
    assert!(served, "per key after 40 s: {:?}", per_path(&sink, 6));

    first.kill9();
    assert_eq!(send(&front.base(), "b", 40).await, 200);
    let served = sink
        .wait_until(Duration::from_secs(40), all_served(80))
        .await;
    assert!(
        served,
        "per key after a worker was killed: {:?}",
        per_path(&sink, 6)
    );
}

/// #11.12: a process whose liveness connection is cut, but which keeps running and
/// delivering, is not declared dead (its claims are not handed to another process, so nothing
/// is delivered twice), and it takes its liveness back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_liveness_connection_does_not_make_a_running_process_dead() {
    let db = TestDatabase::create("cluster_liveness").await;
    // Slow answers keep claims in flight while the liveness locks are cut.
    let sink = MockServer::scripted(|_, _| Reply::ok().after(Duration::from_secs(6))).await;
    let config = format!(
        "[[sources]]\nname = \"web\"\nwrite_key = \"{KEY}\"\n\n[[destinations]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\nmax_in_flight = 40\ntimeout = \"20s\"\n",
        sink.url("/in")
    );
    let first = Process::spawn(BIN, &config, &db.url).await;
    let _second = Process::spawn(BIN, &config, &db.url).await;
    assert_eq!(send(&first.base(), "l", 40).await, 200);
    assert!(
        sink.wait_until(Duration::from_secs(10), |s| s.received().len() >= 40)
            .await
    );
    // Every process's liveness connection (the one holding its advisory lock) is cut while
    // its deliveries are in flight; each keeps running and sweeping for dead processes.
    let cut = db
        .scalar(
            "SELECT count(pg_terminate_backend(pid))::text FROM pg_locks \
             WHERE locktype = 'advisory' AND classid = 1398210561 AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .await;
    assert_eq!(cut.as_deref(), Some("2"), "both liveness locks were held");
    tokio::time::sleep(Duration::from_secs(12)).await;
    let ids = sink.message_ids();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 40, "every event delivered");
    assert_eq!(
        ids.len(),
        40,
        "nothing delivered twice: {} requests",
        ids.len()
    );
    // Their liveness is back: the locks are held again.
    let locks = db
        .scalar(
            "SELECT count(*)::text FROM pg_locks \
             WHERE locktype = 'advisory' AND classid = 1398210561 AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .await;
    assert_eq!(
        locks.as_deref(),
        Some("2"),
        "both processes hold their lock again"
    );
}

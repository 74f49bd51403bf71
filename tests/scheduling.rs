//! The scheduling loop: who gets looked at, and when.

use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::testkit::{start_switchyard, MockServer, TestDatabase};

async fn send(base: &str, event: &str, prefix: &str, count: usize) -> u16 {
    let batch: Vec<_> = (0..count)
        .map(|i| json!({"type": "track", "event": event, "userId": "u", "messageId": format!("{prefix}-{i}")}))
        .collect();
    reqwest::Client::new()
        .post(format!("{base}/v1/batch"))
        .basic_auth("wk", Some(""))
        .json(&json!({ "batch": batch }))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// #11.14: a destination that just got work is served at once, even while another keeps the
/// scheduling loop busy with a long backlog (wake-ups are read on every pass).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_destination_with_new_work_does_not_wait_for_a_busy_one() {
    let db = TestDatabase::create("wakeups").await;
    // Instant receivers and room for many requests: four busy destinations have free slots and
    // work on every pass of the loop, so the loop never runs out of something to dispatch.
    let busy = MockServer::start().await;
    let idle = MockServer::start().await;
    let mut config = "[[sources]]\nname = \"web\"\nwrite_key = \"wk\"\n".to_string();
    for d in 0..4 {
        config += &format!(
            "\n[[destinations]]\nname = \"busy{d}\"\nkind = \"webhook\"\nurl = \"{}\"\nevents = [\"Load\"]\nmax_in_flight = 50\n",
            busy.url(&format!("/busy{d}"))
        );
    }
    config += &format!(
        "\n[[destinations]]\nname = \"idle\"\nkind = \"webhook\"\nurl = \"{}\"\nevents = [\"Ping\"]\n",
        idle.url("/idle")
    );
    let sy = start_switchyard(&config, &db.url).await;
    let base = format!("http://{}", sy.addr);
    for round in 0..6 {
        assert_eq!(
            send(&base, "Load", &format!("load{round}"), 1000).await,
            200
        );
    }
    assert!(
        busy.wait_until(Duration::from_secs(10), |s| s.received().len() >= 50)
            .await
    );
    let mut waits = Vec::new();
    for i in 0..5 {
        let before = idle.received().len();
        assert_eq!(send(&base, "Ping", &format!("ping{i}"), 1).await, 200);
        let sent = Instant::now();
        assert!(
            idle.wait_until(Duration::from_secs(30), |s| s.received().len() > before)
                .await
        );
        waits.push(sent.elapsed());
    }
    let still_busy = busy.received().len() < 24_000;
    assert!(
        still_busy,
        "the busy destination must still have a backlog for this to mean anything"
    );
    // The median, so one scheduling hiccup on a loaded machine does not decide: before wake-ups
    // were read on every pass it was over a second (waits of 0.34 to 2.3 s).
    let mut sorted = waits.clone();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    assert!(
        median < Duration::from_millis(300),
        "the idle destination waited {waits:?}"
    );
    sy.shutdown().await.unwrap();
}

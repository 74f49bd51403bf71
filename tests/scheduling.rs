//! The scheduling loop: who gets looked at, and when.

use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::testkit::{start_switchyard, MockServer, Reply, TestDatabase};

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
    let busy = MockServer::scripted(|_, _| Reply::ok().after(Duration::from_millis(20))).await;
    let idle = MockServer::start().await;
    let config = format!(
        "[[sources]]\nname = \"web\"\nwrite_key = \"wk\"\n\n\
         [[destinations]]\nname = \"busy\"\nkind = \"webhook\"\nurl = \"{}\"\nevents = [\"Load\"]\nmax_in_flight = 4\n\n\
         [[destinations]]\nname = \"idle\"\nkind = \"webhook\"\nurl = \"{}\"\nevents = [\"Ping\"]\n",
        busy.url("/busy"),
        idle.url("/idle")
    );
    let sy = start_switchyard(&config, &db.url).await;
    let base = format!("http://{}", sy.addr);
    for round in 0..4 {
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
    let still_busy = busy.received().len() < 4000;
    assert!(
        still_busy,
        "the busy destination must still have a backlog for this to mean anything"
    );
    let worst = waits.iter().max().copied().unwrap_or_default();
    assert!(
        worst < Duration::from_millis(800),
        "the idle destination waited {waits:?}"
    );
    sy.shutdown().await.unwrap();
}

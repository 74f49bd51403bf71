//! The real binary: crash and restart with nothing lost, graceful shutdown, `check`,
//! `migrate`, and how it finds its database.

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use switchyard::testkit::{MockServer, Process, Reply, TestDatabase};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");
const KEY: &str = "wk_process";

fn config(sink: &MockServer) -> String {
    format!(
        r#"
[[sources]]
name = "web"
write_key = "{KEY}"

[[destinations]]
name = "hook"
kind = "webhook"
url = "{}"
max_in_flight = 4
"#,
        sink.url("/in")
    )
}

async fn send_batch(base: &str, ids: &[String]) -> u16 {
    let batch: Vec<Value> = ids
        .iter()
        .map(|id| json!({"type": "track", "event": "E", "userId": "u", "messageId": id}))
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

#[tokio::test]
async fn kill_9_in_the_middle_of_delivery_loses_nothing() {
    let db = TestDatabase::create("kill9").await;
    // A slow receiver keeps deliveries in flight when the process dies.
    let sink = MockServer::scripted(|_, _| Reply::ok().after(Duration::from_millis(300))).await;
    let mut sy = Process::spawn(BIN, &config(&sink), &db.url).await;
    let ids: Vec<String> = (0..120).map(|i| format!("k-{i}")).collect();
    for chunk in ids.chunks(20) {
        assert_eq!(send_batch(&sy.base(), chunk).await, 200);
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!sink.received().is_empty(), "deliveries were under way");
    sy.kill9();
    let before = sink.message_ids().len();
    assert!(
        before < ids.len(),
        "the crash came mid-delivery ({before} delivered)"
    );

    sink.script(|_, _| Reply::ok());
    sy.restart().await;
    let all: HashSet<String> = ids.iter().cloned().collect();
    let arrived = sink
        .wait_until(Duration::from_secs(30), |s| {
            all.is_subset(&s.message_ids().into_iter().collect())
        })
        .await;
    assert!(arrived, "missing after restart: {}", {
        let got: HashSet<String> = sink.message_ids().into_iter().collect();
        all.difference(&got).count()
    });
    // Redeliveries are only of the same messageIds (at least once, never invented).
    assert!(sink.message_ids().iter().all(|id| all.contains(id)));
    assert_eq!(sy.terminate(Duration::from_secs(20)).await, Some(0));
}

#[tokio::test]
async fn sigterm_finishes_in_flight_work_and_exits_0() {
    let db = TestDatabase::create("sigterm").await;
    let sink = MockServer::scripted(|_, _| Reply::ok().after(Duration::from_millis(500))).await;
    let mut sy = Process::spawn(BIN, &config(&sink), &db.url).await;
    let ids: Vec<String> = (0..40).map(|i| format!("t-{i}")).collect();
    assert_eq!(send_batch(&sy.base(), &ids).await, 200);
    assert!(
        sink.wait_until(Duration::from_secs(10), |s| !s.received().is_empty())
            .await
    );
    let code = sy.terminate(Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "log:\n{}", sy.log());
    // Every request that had started was answered before the exit (none cut off), and the
    // shutdown came mid-way (some events still undelivered).
    let started = sink.received();
    assert!(
        started.iter().all(|r| r.status == 200),
        "in-flight requests finished: {:?}",
        started.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    let answered: HashSet<String> = sink.message_ids().into_iter().collect();
    assert!(
        !answered.is_empty() && answered.len() < ids.len(),
        "the shutdown came mid-delivery ({} of {} answered)",
        answered.len(),
        ids.len()
    );
    let log = sy.log();
    assert!(log.contains("shutting down"), "{log}");
    sink.script(|_, _| Reply::ok());
    sy.restart().await;
    let all: HashSet<String> = ids.iter().cloned().collect();
    assert!(
        sink.wait_until(Duration::from_secs(30), |s| {
            all.is_subset(&s.message_ids().into_iter().collect())
        })
        .await
    );
    // Their outcomes were recorded: nothing answered before the exit is delivered again.
    let delivered = sink.message_ids();
    for id in &answered {
        let times = delivered.iter().filter(|d| *d == id).count();
        assert_eq!(
            times, 1,
            "{id}, answered before the exit, was delivered {times} times"
        );
    }
    assert_eq!(sy.terminate(Duration::from_secs(20)).await, Some(0));
}

#[tokio::test]
async fn sigterm_releases_deliveries_that_outlive_the_grace_period() {
    let db = TestDatabase::create("sigterm_grace").await;
    // Never answers; with a 120 s timeout a claim's lease is 150 s, far past the 10 s grace.
    let sink = MockServer::scripted(|_, _| Reply::Hang).await;
    let toml = format!(
        "[[sources]]\nname = \"web\"\nwrite_key = \"{KEY}\"\n\n[[destinations]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\nmax_in_flight = 4\ntimeout = \"120s\"\n",
        sink.url("/in")
    );
    let mut sy = Process::spawn(BIN, &toml, &db.url).await;
    let ids: Vec<String> = (0..8).map(|i| format!("g-{i}")).collect();
    assert_eq!(send_batch(&sy.base(), &ids).await, 200);
    assert!(
        sink.wait_until(Duration::from_secs(10), |s| !s.received().is_empty())
            .await
    );
    let claimed = Instant::now();
    let code = sy.terminate(Duration::from_secs(30)).await;
    assert_eq!(code, Some(0), "log:\n{}", sy.log());
    let took = claimed.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "the exit came after the 10 s grace, not at the lease: {took:?}"
    );
    sink.script(|_, _| Reply::ok());
    sy.restart().await;
    let all: HashSet<String> = ids.iter().cloned().collect();
    let arrived = sink
        .wait_until(Duration::from_secs(20), |s| {
            all.is_subset(&s.message_ids().into_iter().collect())
        })
        .await;
    let waited = claimed.elapsed();
    assert!(
        arrived,
        "the abandoned claims were released at shutdown and redelivered well before the 150 s lease ({} of {} after {waited:?})",
        sink.message_ids().len(),
        ids.len()
    );
    assert!(waited < Duration::from_secs(60), "{waited:?}");
    println!("hung past the grace period: exit after {took:?}, all redelivered {waited:?} after the claim");
    assert_eq!(sy.terminate(Duration::from_secs(20)).await, Some(0));
}

#[tokio::test]
async fn the_database_is_created_if_missing_and_migrate_is_repeatable() {
    let db = TestDatabase::uncreated("created");
    for _ in 0..2 {
        let output = Command::new(BIN)
            .arg("migrate")
            .env("DATABASE_URL", &db.url)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let tables = db
        .scalar("SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE tablename IN ('jobs', 'events', 'dead_letters')")
        .await;
    assert_eq!(tables.as_deref(), Some("dead_letters,events,jobs"));
}

#[tokio::test]
async fn a_given_database_url_that_does_not_answer_is_retried_never_replaced() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env(
            "DATABASE_URL",
            format!("postgres://postgres:hunter2@127.0.0.1:{port}/nowhere"),
        )
        .env("SWITCHYARD_CONFIG", "/dev/null")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "still retrying, not given up or replaced"
    );
    child.kill().unwrap();
    let output = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(
        log.contains(&format!("127.0.0.1:{port}")),
        "the failure is reported: {log}"
    );
    assert!(!log.contains("hunter2"), "the password is masked: {log}");
    assert!(!log.contains("private PostgreSQL"), "no fallback: {log}");
}

#[test]
fn check_reports_every_error_with_its_position_and_exits_2() {
    let dir = std::env::temp_dir().join(format!("sy-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        r#"[[sources]]
name = "web"
write_key = "wk"

[[destinations]]
name = "a"
kind = "webhook"
url = "not a url"
rate_limit = "ten per second"
colour = "blue"

[[destinations]]
name = "a"
kind = "carrier-pigeon"
"#,
    )
    .unwrap();
    let output = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    // Exit 2 even when nothing reads what it prints (`check bad.toml | true`).
    let status = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&file)
        .stdout(switchyard::testkit::closed_pipe())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
    let printed = String::from_utf8_lossy(&output.stdout);
    let path = file.display();
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 5, "{printed}");
    assert!(
        lines[0].starts_with(&format!("{path}:8:1: `url`:")),
        "{printed}"
    );
    assert!(
        lines[1].starts_with(&format!("{path}:9:14: bad rate")),
        "{printed}"
    );
    assert!(
        lines[2].starts_with(&format!("{path}:10:1: unknown key `colour`")),
        "{printed}"
    );
    assert!(
        lines[3].starts_with(&format!("{path}:13:8: duplicate destination name")),
        "{printed}"
    );
    assert!(
        lines[4].starts_with(&format!("{path}:14:8: unknown kind `carrier-pigeon`")),
        "{printed}"
    );

    let good = dir.join("good.toml");
    std::fs::write(&good, "[[sources]]\nname = \"web\"\nwrite_key = \"wk\"\n").unwrap();
    let output = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));

    // Its reader gone (`| true`), it stops quietly, as Unix tools do: no panic, no message.
    switchyard::testkit::assert_quiet_when_its_reader_has_gone(
        Command::new(BIN).args(["check", "--config"]).arg(&good),
    );
}

async fn event_lookup(base: &str, message_id: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(format!("{base}/admin/v1/events/{message_id}"))
        .bearer_auth(switchyard::testkit::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// `[server] event_trail` sizes the per-process trail (its own process: the trail is one per
/// process); 0 turns recording off, and the lookup says so rather than "unknown".
#[tokio::test]
async fn event_trail_sizes_the_event_lookup_and_zero_turns_it_off() {
    let db = TestDatabase::create("event_trail").await;
    let sink = MockServer::start().await;
    let off = format!("{}\n[server]\nevent_trail = 0\n", config(&sink));
    let sy = Process::spawn(BIN, &off, &db.url).await;
    assert_eq!(send_batch(&sy.base(), &["off-1".to_owned()]).await, 200);
    assert!(
        sink.wait_until(Duration::from_secs(10), |s| s.message_ids().len() == 1)
            .await
    );
    let (status, answer) = event_lookup(&sy.base(), "off-1").await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(answer["code"], "event_trail_off", "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("event_trail = 0"),
        "{answer}"
    );

    // A reload sizes it again: two events kept, the oldest forgotten.
    let two = format!("{}\n[server]\nevent_trail = 2\n", config(&sink));
    std::fs::write(sy.config_path(), two).unwrap();
    let reloaded = reqwest::Client::new()
        .post(format!("{}/admin/v1/reload", sy.base()))
        .bearer_auth(switchyard::testkit::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(reloaded.status(), 200);
    for id in ["two-1", "two-2", "two-3"] {
        assert_eq!(send_batch(&sy.base(), &[id.to_owned()]).await, 200);
    }
    let (status, answer) = event_lookup(&sy.base(), "two-1").await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (404, Some("not_found")),
        "{answer}"
    );
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("last 2 events"),
        "{answer}"
    );
    let (status, answer) = event_lookup(&sy.base(), "two-3").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["message_id"], "two-3");

    // `check` validates it where it is written.
    let bad = format!("{}\n[server]\nevent_trail = -5\n", config(&sink));
    let path = std::env::temp_dir().join(format!("sy-event-trail-{}.toml", std::process::id()));
    std::fs::write(&path, bad).unwrap();
    let check = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(2), "{printed}");
    assert!(
        printed.contains(":13:15: `server.event_trail` must be 0 (off) to 10000000 events, not -5"),
        "{printed}"
    );
    std::fs::remove_file(&path).ok();
}

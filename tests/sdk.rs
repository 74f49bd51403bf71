//! The official SDKs, unmodified, against the running binary: every call they make reaches the
//! webhook. `.ci/test` installs them (a virtualenv under `target/`, `npm ci` in
//! `tests/sdk`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use switchyard::testkit::{MockServer, Process, TestDatabase};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");
const KEY: &str = "wk_sdk";
const CALLS: usize = 26;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    let python = std::env::var_os("SWITCHYARD_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target/sdk-venv/bin/python"));
    assert!(
        python.exists(),
        "no Python with the Segment SDKs at {}: run .ci/test, which installs them",
        python.display()
    );
    python
}

async fn run_sdk(command: &mut Command, sink: &MockServer, run: &str) {
    let output = command.output().expect("the SDK driver runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the SDK reported errors:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|_| panic!("the driver prints a JSON report: {stdout}"));
    let ours = |s: &MockServer| {
        s.events()
            .into_iter()
            .filter(|e| e["context"]["run"] == run)
            .collect::<Vec<_>>()
    };
    // Counted where the calls arrive: distinct messageIds at the webhook, not the driver's word.
    let distinct = |s: &MockServer| {
        ours(s)
            .iter()
            .filter_map(|e| e["messageId"].as_str().map(str::to_owned))
            .collect::<std::collections::BTreeSet<_>>()
    };
    let arrived = sink
        .wait_until(Duration::from_secs(30), |s| distinct(s).len() >= CALLS)
        .await;
    let events = ours(sink);
    let received = distinct(sink);
    assert!(
        arrived && received.len() == CALLS,
        "{} distinct messageIds of {CALLS} calls reached the webhook",
        received.len()
    );
    let reported: std::collections::BTreeSet<String> = report["message_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("the report lists message_ids: {report}"))
        .iter()
        .filter_map(|id| id.as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        received, reported,
        "the webhook got exactly the messageIds the SDK set"
    );
    let mut seqs: Vec<u64> = events
        .iter()
        .filter_map(|e| e["context"]["seq"].as_u64())
        .collect();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs, (0..CALLS as u64).collect::<Vec<_>>());
    let types: std::collections::BTreeSet<&str> =
        events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        types.into_iter().collect::<Vec<_>>(),
        ["alias", "group", "identify", "page", "screen", "track"]
    );
    for event in &events {
        assert!(event["receivedAt"].is_string() && event["messageId"].is_string());
    }
}

async fn setup(label: &str) -> (TestDatabase, MockServer, Process) {
    let db = TestDatabase::create(label).await;
    let sink = MockServer::start().await;
    let config = format!(
        "[[sources]]\nname = \"app\"\nwrite_key = \"{KEY}\"\n\n[[destinations]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\nbatch_size = 50\n",
        sink.url("/in")
    );
    let sy = Process::spawn(BIN, &config, &db.url).await;
    (db, sink, sy)
}

fn driver(name: &str) -> PathBuf {
    manifest_dir().join("tests/sdk").join(name)
}

#[tokio::test]
async fn segment_analytics_python_delivers_every_call() {
    let (_db, sink, sy) = setup("sdk_segment_py").await;
    let run = "segment-py";
    run_sdk(
        Command::new(python()).arg(driver("send_python.py")).args([
            &sy.base(),
            KEY,
            run,
            "segment",
        ]),
        &sink,
        run,
    )
    .await;
}

#[tokio::test]
async fn rudder_sdk_python_delivers_every_call() {
    let (_db, sink, sy) = setup("sdk_rudder_py").await;
    let run = "rudder-py";
    run_sdk(
        Command::new(python())
            .arg(driver("send_python.py"))
            .args([&sy.base(), KEY, run, "rudder"]),
        &sink,
        run,
    )
    .await;
}

#[tokio::test]
async fn segment_analytics_node_delivers_every_call() {
    assert!(
        Command::new("node").arg("--version").output().is_ok(),
        "node is not installed: the @segment/analytics-node test needs it (.ci/test says how)"
    );
    let dir = std::env::var_os("SWITCHYARD_TEST_NODE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("tests/sdk"));
    assert!(
        Path::new(&dir)
            .join("node_modules/@segment/analytics-node")
            .exists(),
        "@segment/analytics-node is not installed in {}: run .ci/test",
        dir.display()
    );
    let (_db, sink, sy) = setup("sdk_node").await;
    let run = "segment-node";
    run_sdk(
        Command::new("node")
            .arg(dir.join("send_node.mjs"))
            .args([&sy.base(), KEY, run])
            .current_dir(&dir),
        &sink,
        run,
    )
    .await;
}

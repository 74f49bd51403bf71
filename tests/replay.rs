//! Replays of the archive: history delivered to a destination added later, its filters
//! honored, cancelled, resumed after a restart, and exported as NDJSON.

use std::collections::HashSet;
use std::io::Read;
use std::time::Duration;

use serde_json::{json, Value};
use switchyard::testkit::{
    start_switchyard_from, MockServer, Process, Reply, TestDatabase, ADMIN_TOKEN,
};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");
const KEY: &str = "wk_replay";

fn destination(name: &str, url: &str, extra: &str) -> String {
    format!("\n[[destinations]]\nname = \"{name}\"\nkind = \"webhook\"\nurl = \"{url}\"\n{extra}\n")
}

fn config(destinations: &[String]) -> String {
    format!(
        "[[sources]]\nname = \"web\"\nwrite_key = \"{KEY}\"\n{}",
        destinations.concat()
    )
}

/// Sends `count` track events named `event`, ids `{prefix}-{i}`, in batches of 100.
async fn send(base: &str, prefix: &str, event: &str, count: usize) {
    for chunk in (0..count).collect::<Vec<_>>().chunks(100) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|i| json!({"type": "track", "event": event, "userId": format!("u{i}"), "messageId": format!("{prefix}-{i}")}))
            .collect();
        let response = reqwest::Client::new()
            .post(format!("{base}/v1/batch"))
            .basic_auth(KEY, Some(""))
            .json(&json!({ "batch": batch }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
}

async fn admin(
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method, format!("{base}{path}"))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn unique(ids: &[String]) -> HashSet<String> {
    ids.iter().cloned().collect()
}

/// A range around now that holds everything sent in the test.
fn around_now() -> (String, String) {
    let now = time::OffsetDateTime::now_utc();
    let format = &time::format_description::well_known::Rfc3339;
    (
        (now - time::Duration::hours(1)).format(format).unwrap(),
        (now + time::Duration::hours(1)).format(format).unwrap(),
    )
}

/// Asks for a replay to `destination` of everything sent in the test; the status and answer.
async fn replay_everything(base: &str, destination: &str) -> (u16, Value) {
    let (from, to) = around_now();
    admin(
        base,
        reqwest::Method::POST,
        "/admin/v1/replays",
        Some(json!({"destination": destination, "from": from, "to": to})),
    )
    .await
}

async fn wait_state(base: &str, id: i64, state: &str) -> Value {
    let mut last = Value::Null;
    for _ in 0..300 {
        let (_, body) = admin(
            base,
            reqwest::Method::GET,
            &format!("/admin/v1/replays/{id}"),
            None,
        )
        .await;
        if body["state"] == state {
            return body;
        }
        last = body;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("replay {id} never reached {state}: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_added_later_gets_the_archived_history_and_only_what_its_filters_take() {
    let db = TestDatabase::create("replay_added").await;
    let first = MockServer::start().await;
    let later = MockServer::start().await;
    let dir = std::env::temp_dir().join(format!("sy-replay-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("switchyard.toml");
    std::fs::write(
        &path,
        config(&[destination("first", &first.url("/in"), "")]),
    )
    .unwrap();
    let sy = start_switchyard_from(&path, &db.url).await;
    let base = format!("http://{}", sy.addr);
    send(&base, "keep", "Keep", 300).await;
    send(&base, "drop", "Drop", 200).await;
    assert!(
        first
            .wait_until(Duration::from_secs(20), |s| s.events().len() >= 500)
            .await
    );

    // A destination added today, which takes only `Keep` events (by an FQL `where`).
    std::fs::write(
        &path,
        config(&[
            destination("first", &first.url("/in"), ""),
            destination("later", &later.url("/in"), "where = 'event = \"Keep\"'"),
        ]),
    )
    .unwrap();
    let (status, body) = admin(&base, reqwest::Method::POST, "/admin/v1/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = replay_everything(&base, "later").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["events"], 500, "every archived event in range: {body}");
    let id = body["id"].as_i64().unwrap();

    let done = wait_state(&base, id, "done").await;
    assert_eq!(
        done["events"], 300,
        "the filter selected the Keep events: {done}"
    );
    assert_eq!(done["delivered"], 300, "{done}");
    assert_eq!(done["failed"], 0, "{done}");
    let got = later.message_ids();
    assert_eq!(got.len(), 300, "each once");
    assert!(got.iter().all(|id| id.starts_with("keep-")));
    assert_eq!(unique(&got).len(), 300);
    // The other destination got nothing twice.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(first.message_ids().len(), 500);

    let (status, list) = admin(&base, reqwest::Method::GET, "/admin/v1/replays", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["replays"][0]["id"], id);
    let (status, _) = admin(
        &base,
        reqwest::Method::GET,
        "/admin/v1/replays/999999",
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, body) = replay_everything(&base, "nope").await;
    assert_eq!(
        (status, body["code"].as_str().is_some()),
        (404, true),
        "{body}"
    );
    let (from, to) = around_now();
    let (status, body) = admin(
        &base,
        reqwest::Method::POST,
        "/admin/v1/replays",
        Some(json!({"destination": "later", "from": to, "to": from})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    sy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_replay_stops_delivering() {
    let db = TestDatabase::create("replay_cancel").await;
    let slow = MockServer::scripted(|_, _| Reply::ok().after(Duration::from_millis(100))).await;
    let dir = std::env::temp_dir().join(format!("sy-replay-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("switchyard.toml");
    // Not receiving from any source: only replays reach it.
    std::fs::write(
        &path,
        config(&[destination(
            "slow",
            &slow.url("/in"),
            "max_in_flight = 1\nevents = [\"Never\"]",
        )]),
    )
    .unwrap();
    let sy = start_switchyard_from(&path, &db.url).await;
    let base = format!("http://{}", sy.addr);
    send(&base, "c", "E", 300).await;
    std::fs::write(
        &path,
        config(&[destination("slow", &slow.url("/in"), "max_in_flight = 1")]),
    )
    .unwrap();
    admin(&base, reqwest::Method::POST, "/admin/v1/reload", None).await;
    let (from, to) = around_now();
    let (_, body) = admin(
        &base,
        reqwest::Method::POST,
        "/admin/v1/replays",
        Some(json!({"destination": "slow", "from": from, "to": to})),
    )
    .await;
    let id = body["id"].as_i64().unwrap();
    assert!(
        slow.wait_until(Duration::from_secs(20), |s| s.received().len() >= 10)
            .await
    );
    let (status, body) = admin(
        &base,
        reqwest::Method::DELETE,
        &format!("/admin/v1/replays/{id}"),
        None,
    )
    .await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("cancelled")),
        "{body}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let settled = slow.received().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        slow.received().len(),
        settled,
        "nothing more after the cancel settled"
    );
    assert!(
        settled < 300,
        "{settled} of 300 delivered before the cancel took"
    );
    sy.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_resumes_after_a_restart_and_the_archive_exports_as_ndjson() {
    let db = TestDatabase::create("replay_restart").await;
    let sink = MockServer::scripted(|_, _| Reply::ok().after(Duration::from_millis(20))).await;
    let config = config(&[destination(
        "hook",
        &sink.url("/in"),
        "max_in_flight = 2\nevents = [\"Other\"]",
    )]);
    let mut sy = Process::spawn(BIN, &config, &db.url).await;
    send(&sy.base(), "r", "E", 400).await;
    // Live, the destination took none of them (its `events` filter); now it takes all.
    std::fs::write(sy.config_path(), config.replace("events = [\"Other\"]", "")).unwrap();
    let _ = std::process::Command::new("kill")
        .args(["-HUP", &sy.pid().to_string()])
        .status();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(sink.received().is_empty());
    let (from, to) = around_now();
    // The CLI records the replay; the running process delivers it.
    let output = std::process::Command::new(BIN)
        .args([
            "replay",
            "--destination",
            "hook",
            "--from",
            &from,
            "--to",
            &to,
        ])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed["events"], 400, "{printed}");
    assert!(
        sink.wait_until(Duration::from_secs(30), |s| s.received().len() >= 100)
            .await
    );
    assert_eq!(sy.terminate(Duration::from_secs(20)).await, Some(0));
    let before = sink.message_ids().len();
    assert!(
        before < 400,
        "the restart came mid-replay ({before} of 400)"
    );
    sy.restart().await;
    assert!(
        sink.wait_until(Duration::from_secs(60), |s| unique(&s.message_ids()).len()
            == 400)
            .await,
        "the replay resumed: {} of 400",
        unique(&sink.message_ids()).len()
    );

    // The export round-trips: every archived event, once, as it was stored.
    let file = std::env::temp_dir().join(format!(
        "sy-export-{}.ndjson.gz",
        uuid::Uuid::new_v4().simple()
    ));
    let output = std::process::Command::new(BIN)
        .args([
            "archive", "export", "--from", &from, "--to", &to, "--source", "web", "--output",
        ])
        .arg(&file)
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&file).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    let exported: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: HashSet<String> = exported
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!((exported.len(), ids.len()), (400, 400));
    assert!(exported
        .iter()
        .all(|e| e["event"] == "E" && e.get("writeKey").is_none()));
    let _ = std::fs::remove_file(&file);

    // To a reader that goes away (`| head`), it stops quietly: no panic, no broken pipe.
    switchyard::testkit::assert_quiet_when_its_reader_has_gone(
        std::process::Command::new(BIN)
            .args(["archive", "export", "--from", &from, "--to", &to])
            .env("DATABASE_URL", &db.url),
    );

    // A range given the wrong way round is refused, as `replay` refuses it, not exported as
    // an archive with nothing in it.
    let output = std::process::Command::new(BIN)
        .args(["archive", "export", "--from", &to, "--to", &from])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(said.contains("--from must be before --to"), "{said}");
    assert!(output.stdout.is_empty());
}

/// Live traffic first: live events to a destination that is replaying overtake the replay's
/// backlog instead of queueing behind it, and two replays to one destination share its rate
/// limit with the live events (no second allowance per replay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_events_overtake_two_replays_that_share_the_destinations_rate_limit() {
    const LIMIT: usize = 40;
    let db = TestDatabase::create("replay_lanes").await;
    let other = MockServer::start().await;
    let hook = MockServer::start().await;
    let dir = std::env::temp_dir().join(format!("sy-replay-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("switchyard.toml");
    let before = [destination("other", &other.url("/in"), "")];
    std::fs::write(&path, config(&before)).unwrap();
    let sy = start_switchyard_from(&path, &db.url).await;
    let base = format!("http://{}", sy.addr);
    send(&base, "hist", "History", 150).await;
    assert!(
        other
            .wait_until(Duration::from_secs(20), |s| s.events().len() >= 150)
            .await
    );

    // `hook` is added today with a limit of LIMIT requests a second, one event each.
    let hook_settings = format!("rate_limit = \"{LIMIT}/s\"\nbatch_size = 1");
    let after = [
        destination("other", &other.url("/in"), ""),
        destination("hook", &hook.url("/in"), &hook_settings),
    ];
    std::fs::write(&path, config(&after)).unwrap();
    let (status, body) = admin(&base, reqwest::Method::POST, "/admin/v1/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let (from, to) = around_now();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, body) = admin(
            &base,
            reqwest::Method::POST,
            "/admin/v1/replays",
            Some(json!({"destination": "hook", "from": from, "to": to})),
        )
        .await;
        assert_eq!((status, &body["events"]), (202, &json!(150)), "{body}");
        ids.push(body["id"].as_i64().unwrap());
    }
    // The replays are flowing (300 requests at LIMIT/s: about 7.5 s) when live events come.
    assert!(
        hook.wait_until(Duration::from_secs(20), |s| s.received().len() >= LIMIT)
            .await
    );
    send(&base, "live", "Live", 10).await;
    let live_arrived = hook
        .wait_until(Duration::from_secs(30), |s| {
            s.message_ids()
                .iter()
                .filter(|id| id.starts_with("live-"))
                .count()
                == 10
        })
        .await;
    assert!(
        live_arrived,
        "the live events reached the replaying destination"
    );
    for id in &ids {
        let done = wait_state(&base, *id, "done").await;
        assert_eq!(
            (&done["delivered"], &done["failed"]),
            (&json!(150), &json!(0)),
            "{done}"
        );
    }

    // In arrival order, most of the replays' requests came after the last live event: the live
    // events did not wait for the replays' backlog.
    let received = hook.received();
    let replayed_of = |request: &switchyard::testkit::Received| {
        !request.json()["messageId"]
            .as_str()
            .unwrap_or("")
            .starts_with("live-")
    };
    let last_live = received.iter().rposition(|r| !replayed_of(r)).unwrap();
    let replayed_after = received[last_live..]
        .iter()
        .filter(|r| replayed_of(r))
        .count();
    assert!(
        replayed_after >= 100,
        "only {replayed_after} of 300 replayed requests came after the last live event"
    );
    // Each event of history twice (one replay each), each live one once.
    let got = hook.message_ids();
    assert_eq!(got.len(), 310, "{got:?}");
    assert_eq!(unique(&got).len(), 160);
    // One limit for all three: no second in which the destination got more than LIMIT requests
    // (plus the 50 ms burst the limiter allows and a little timer slack).
    let times: Vec<_> = received.iter().map(|r| r.at).collect();
    let busiest = (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|at| **at < times[i] + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    assert!(
        busiest <= LIMIT + LIMIT / 10 + 2,
        "{busiest} requests in one second against a limit of {LIMIT}/s"
    );
    // The other destination got nothing twice.
    assert_eq!(other.message_ids().len(), 160);
    sy.shutdown().await.unwrap();
}

/// Live traffic first, on a slow destination: a replay's requests never take every in-flight
/// slot, so a live event is sent while they are all still waiting for their answers, not
/// after the first of them ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_event_is_sent_while_the_replays_requests_hold_their_slots() {
    const HOLD: Duration = Duration::from_secs(6);
    let db = TestDatabase::create("replay_slots").await;
    let hook = MockServer::scripted(|_, request| {
        let live = request.json()["messageId"]
            .as_str()
            .is_some_and(|id| id.starts_with("live-"));
        if live {
            Reply::ok()
        } else {
            Reply::ok().after(HOLD)
        }
    })
    .await;
    let dir = std::env::temp_dir().join(format!("sy-replay-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("switchyard.toml");
    let settings = "max_in_flight = 4\nbatch_size = 1\ntimeout = \"30s\"";
    // The history is archived while the destination takes none of it.
    let before = format!("{settings}\nevents = [\"Live\"]");
    std::fs::write(
        &path,
        config(&[destination("hook", &hook.url("/in"), &before)]),
    )
    .unwrap();
    let sy = start_switchyard_from(&path, &db.url).await;
    let base = format!("http://{}", sy.addr);
    send(&base, "hist", "History", 50).await;
    std::fs::write(
        &path,
        config(&[destination("hook", &hook.url("/in"), settings)]),
    )
    .unwrap();
    let (status, body) = admin(&base, reqwest::Method::POST, "/admin/v1/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = replay_everything(&base, "hook").await;
    assert_eq!((status, &body["events"]), (202, &json!(50)), "{body}");
    let id = body["id"].as_i64().unwrap();
    // The replay's first requests are out, and held.
    assert!(
        hook.wait_until(Duration::from_secs(20), |s| !s.received().is_empty())
            .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    send(&base, "live", "Live", 1).await;
    assert!(
        hook.wait_until(Duration::from_secs(30), |s| s
            .message_ids()
            .contains(&"live-0".to_owned()))
            .await,
        "the live event never arrived"
    );

    let received = hook.received();
    let first = received[0].at;
    let live = received
        .iter()
        .position(|r| r.json()["messageId"] == "live-0")
        .unwrap();
    assert!(
        received[live].at < first + HOLD,
        "the live event came {:?} after the replay's first request, which was held {HOLD:?}: \
         it waited for a replay request to end",
        received[live].at - first
    );
    assert!(
        live <= 3,
        "{live} replay requests were out before the live event: every slot of 4"
    );
    let (status, _) = admin(
        &base,
        reqwest::Method::DELETE,
        &format!("/admin/v1/replays/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    sy.shutdown().await.unwrap();
}

/// A dead letter sent again is queued from a copy of its event in the archive. The copy is
/// delivery's, not a second event received: the export listed the event twice and a replay
/// sent it twice over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_sent_again_from_the_dead_letters_is_exported_and_replayed_once() {
    let db = TestDatabase::create("replay_requeued").await;
    let down = MockServer::scripted(|_, _| Reply::status(500)).await;
    let other = MockServer::start().await;
    let config = config(&[
        destination("down", &down.url("/in"), "retry = { max_attempts = 1 }"),
        destination("other", &other.url("/in"), ""),
    ]);
    let sy = Process::spawn(BIN, &config, &db.url).await;
    let base = sy.base();
    send(&base, "dl", "E", 5).await;
    let dead = || async {
        let (_, body) = admin(
            &base,
            reqwest::Method::GET,
            "/admin/v1/dead-letters?destination=down",
            None,
        )
        .await;
        body["items"].as_array().map_or(0, Vec::len)
    };
    for _ in 0..100 {
        if dead().await == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(dead().await, 5);
    let (status, body) = admin(
        &base,
        reqwest::Method::POST,
        "/admin/v1/dead-letters/replay",
        Some(json!({"destination": "down"})),
    )
    .await;
    assert_eq!((status, &body["requeued"]), (200, &json!(5)), "{body}");
    assert!(
        down.wait_until(Duration::from_secs(20), |s| s.received().len() >= 10)
            .await
    );

    let (from, to) = around_now();
    let output = std::process::Command::new(BIN)
        .args(["archive", "export", "--from", &from, "--to", &to])
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(output.status.success());
    let exported: Vec<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap()["messageId"].to_string())
        .collect();
    assert_eq!(exported.len(), 5, "each event once: {exported:?}");

    let (status, body) = replay_everything(&base, "other").await;
    assert_eq!((status, &body["events"]), (202, &json!(5)), "{body}");
    let done = wait_state(&base, body["id"].as_i64().unwrap(), "done").await;
    assert_eq!(done["delivered"], 5, "{done}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Five live, five replayed: each event twice, not three times.
    assert_eq!(other.message_ids().len(), 10);
}

/// A replay takes what was archived when it was asked for: events received later, with a `to`
/// still ahead, are live traffic, not history (they went to the destination live, if it takes
/// them). A replay whose destination was disabled waited, then sent the later ones as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_ending_in_the_future_takes_only_what_was_archived_when_it_began() {
    let db = TestDatabase::create("replay_future").await;
    let sink = MockServer::start().await;
    let dir = std::env::temp_dir().join(format!("sy-replay-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("switchyard.toml");
    let hook = |extra: &str| config(&[destination("hook", &sink.url("/in"), extra)]);
    std::fs::write(&path, hook("enabled = false")).unwrap();
    let sy = start_switchyard_from(&path, &db.url).await;
    let base = format!("http://{}", sy.addr);
    send(&base, "before", "E", 20).await;
    // The destination is off: the replay waits for it.
    let (status, body) = replay_everything(&base, "hook").await;
    assert_eq!((status, &body["events"]), (202, &json!(20)), "{body}");
    // Its dead letters cannot be sent while it is off, and the answer says so (it said "no
    // destination `hook`" for a destination in the config).
    let (status, body) = admin(
        &base,
        reqwest::Method::POST,
        "/admin/v1/dead-letters/replay",
        Some(json!({"destination": "hook"})),
    )
    .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (409, Some("destination_disabled")),
        "{body}"
    );
    // Received while the destination is off: neither queued for it nor, now, history.
    send(&base, "after", "E", 10).await;
    std::fs::write(&path, hook("")).unwrap();
    let (status, body) = admin(&base, reqwest::Method::POST, "/admin/v1/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let done = wait_state(&base, body_id(&base).await, "done").await;
    assert_eq!(done["delivered"], 20, "{done}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = sink.message_ids();
    assert_eq!(got.len(), 20, "{got:?}");
    assert!(got.iter().all(|id| id.starts_with("before-")), "{got:?}");
    sy.shutdown().await.unwrap();
}

/// The newest replay's id.
async fn body_id(base: &str) -> i64 {
    let (_, list) = admin(base, reqwest::Method::GET, "/admin/v1/replays", None).await;
    list["replays"][0]["id"].as_i64().unwrap()
}

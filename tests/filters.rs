//! Per-destination filters and transformations end to end: real Postgres, local mock vendors.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use switchyard::testkit::{
    self, send_batch, start_switchyard_from, MockServer, TestDatabase, ADMIN_TOKEN,
};

const KEY: &str = "wk_filters";

fn scratch(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sy-filters-{label}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn webhook(name: &str, server: &MockServer, extra: &str) -> String {
    format!(
        "\n[[destinations]]\nname = \"{name}\"\nkind = \"webhook\"\nurl = \"{}\"\ntimeout = \"2s\"\n\
         retry.max_attempts = 2\nretry.initial_backoff = \"100ms\"\n{extra}\n",
        server.url("/in")
    )
}

fn write_config(dir: &Path, destinations: &[String]) -> PathBuf {
    let path = dir.join("switchyard.toml");
    let text = format!(
        "[[sources]]\nname = \"web\"\nwrite_key = \"{KEY}\"\n{}",
        destinations.concat()
    );
    std::fs::write(&path, text).unwrap();
    path
}

async fn send(base: &str, batch: Vec<Value>) {
    assert_eq!(send_batch(base, KEY, &batch).await.0, 200);
}

async fn admin(
    base: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    testkit::admin(base, method, path, body).await
}

async fn metric(base: &str, series: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn dead_letters(base: &str, destination: &str) -> Vec<Value> {
    let path = format!("/admin/v1/dead-letters?destination={destination}&limit=100");
    let (status, body) = admin(base, reqwest::Method::GET, &path, None).await;
    assert_eq!(status, 200, "{body}");
    body["items"].as_array().cloned().unwrap_or_default()
}

fn track(id: &str, event: &str, properties: Value) -> Value {
    json!({"type": "track", "event": event, "userId": "u", "messageId": id, "properties": properties})
}

#[tokio::test]
async fn each_filter_drops_what_it_should_in_the_documented_order() {
    let db = TestDatabase::create("filters_order").await;
    let dir = scratch("order");
    std::fs::write(
        dir.join("shape.js"),
        "export function transformEvent(event, metadata) {\n\
           if (event.event === 'Skip') return null;\n\
           if (event.event === 'Boom') throw new Error('boom for ' + metadata(event).destinationName);\n\
           event.properties = event.properties || {};\n\
           event.properties.secret = 'added by the transform';\n\
           event.properties.seen_revenue = event.properties.revenue;\n\
           return event;\n\
         }\n",
    )
    .unwrap();
    let (big, ads, half, shaped, plain) = (
        MockServer::start().await,
        MockServer::start().await,
        MockServer::start().await,
        MockServer::start().await,
        MockServer::start().await,
    );
    let path = write_config(
        &dir,
        &[
            webhook(
                "f_big",
                &big,
                "where = \"type = 'track' and properties.revenue > 100\"",
            ),
            webhook("f_ads", &ads, "consent = [\"Advertising\"]"),
            webhook("f_half", &half, "sample = 0.5"),
            webhook(
                "f_shaped",
                &shaped,
                "transform = \"shape.js\"\nwhere = \"event != 'Hidden'\"\n\
                 drop_properties = [\"properties.secret\", \"context.ip\"]\n\
                 allow_properties = [\"revenue\", \"seen_revenue\", \"secret\"]",
            ),
            webhook("f_plain", &plain, ""),
        ],
    );
    let sy = start_switchyard_from(&path, &db.url).await;
    let base = format!("http://{}", sy.addr);

    let consent = |id: &str, ads: Option<bool>| {
        let mut event = track(id, "Viewed", json!({"revenue": 1}));
        if let Some(on) = ads {
            event["context"] =
                json!({"consent": {"categoryPreferences": {"Advertising": on, "Analytics": true}}});
        }
        event
    };
    let mut batch = vec![
        track("o-1", "Order", json!({"revenue": 150, "coupon": "x"})),
        track("o-2", "Order", json!({"revenue": 50})),
        json!({"type": "identify", "userId": "u", "messageId": "o-3", "traits": {"revenue": 500}}),
        track("o-4", "Skip", json!({})),
        track("o-5", "Boom", json!({})),
        track("o-6", "Hidden", json!({})),
        consent("c-1", Some(true)),
        consent("c-2", Some(false)),
        consent("c-3", None),
    ];
    let sampled: Vec<Value> = (0..200)
        .map(|i| track(&format!("s-{i}"), "Sampled", json!({})))
        .collect();
    batch.extend(sampled);
    let total = batch.len();
    send(&base, batch).await;

    let limit = Duration::from_secs(20);
    assert!(plain.wait_until(limit, |s| s.events().len() == total).await);
    assert!(big.wait_until(limit, |s| !s.events().is_empty()).await);
    // where: only the track with revenue over 100, evaluated on the stored event.
    assert_eq!(big.message_ids(), ["o-1"]);
    // consent: granted and absent go, denied does not.
    assert!(
        ads.wait_until(limit, |s| s.events().len() == total - 1)
            .await
    );
    assert!(!ads.message_ids().contains(&"c-2".to_owned()));
    // sample: about half of the same messageIds every time.
    assert!(half.wait_until(limit, |s| s.events().len() > 60).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kept = half.events().len();
    assert!((70..160).contains(&kept), "sampled {kept} of {total}");

    // transform then drops: where saw the original (Hidden is gone before the script ran), the
    // script's null drops, its throw dead-letters, and the drops run after it.
    let expected_shaped = total - 3;
    assert!(
        shaped
            .wait_until(limit, |s| s.events().len() == expected_shaped)
            .await
    );
    let order = shaped
        .events()
        .into_iter()
        .find(|e| e["messageId"] == "o-1")
        .unwrap();
    assert_eq!(
        order["properties"],
        json!({"revenue": 150, "seen_revenue": 150})
    );
    assert!(order["context"].get("ip").is_none(), "{order}");
    let ids = shaped.message_ids();
    for gone in ["o-4", "o-5", "o-6"] {
        assert!(!ids.contains(&gone.to_owned()), "{gone} reached f_shaped");
    }
    let dead = dead_letters(&base, "f_shaped").await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["message_id"], "o-5");
    let error = dead[0]["last_error"].as_str().unwrap();
    assert!(
        error.contains("transform failed: Error: boom for f_shaped"),
        "{error}"
    );

    // Dropped events got no job; each one is counted with its reason.
    let filtered = |d: &str, r: &str| {
        format!("switchyard_filtered_events_total{{destination=\"{d}\",reason=\"{r}\"}}")
    };
    assert_eq!(
        metric(&base, &filtered("f_big", "where")).await,
        (total - 1) as f64
    );
    assert_eq!(metric(&base, &filtered("f_ads", "consent")).await, 1.0);
    assert_eq!(
        metric(&base, &filtered("f_half", "sample")).await,
        (total - kept) as f64
    );
    assert_eq!(metric(&base, &filtered("f_shaped", "where")).await, 1.0);
    assert_eq!(metric(&base, &filtered("f_shaped", "transform")).await, 1.0);
    let jobs: i64 = db
        .scalar("SELECT count(*) FROM jobs j JOIN destinations d ON d.id = j.destination_id WHERE d.name = 'f_big'")
        .await
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(jobs <= 1, "an event the filter drops gets no job ({jobs})");
    assert!(dead_letters(&base, "f_plain").await.is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_hostile_transform_dead_letters_its_own_events_only() {
    let db = TestDatabase::create("filters_hostile").await;
    let dir = scratch("hostile");
    std::fs::write(
        dir.join("hostile.js"),
        "export function transformEvent(event) {\n\
           if (event.event === 'Loop') { while (true) {} }\n\
           if (event.event === 'Alloc') { return { big: 'x'.repeat(100 * 1024 * 1024) }; }\n\
           if (event.event === 'Throw') { throw new TypeError('bad input'); }\n\
           return event;\n\
         }\n",
    )
    .unwrap();
    let hostile = MockServer::start().await;
    let plain = MockServer::start().await;
    let path = write_config(
        &dir,
        &[
            webhook(
                "h_hostile",
                &hostile,
                "transform = \"hostile.js\"\ntransform_timeout = \"50ms\"",
            ),
            webhook("h_plain", &plain, ""),
        ],
    );
    let sy = start_switchyard_from(&path, &db.url).await;
    let base = format!("http://{}", sy.addr);
    let batch = vec![
        track("h-loop", "Loop", json!({})),
        track("h-alloc", "Alloc", json!({})),
        track("h-throw", "Throw", json!({})),
        track("h-fine", "Fine", json!({})),
    ];
    send(&base, batch).await;
    let limit = Duration::from_secs(20);
    assert!(plain.wait_until(limit, |s| s.events().len() == 4).await);
    assert!(hostile.wait_until(limit, |s| s.events().len() == 1).await);
    assert_eq!(hostile.message_ids(), ["h-fine"]);
    let started = std::time::Instant::now();
    let mut dead = Vec::new();
    while started.elapsed() < limit && dead.len() < 3 {
        dead = dead_letters(&base, "h_hostile").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let error_of = |id: &str| {
        dead.iter()
            .find(|d| d["message_id"] == id)
            .and_then(|d| d["last_error"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        error_of("h-loop").contains("ran past transform_timeout (50ms)"),
        "{dead:?}"
    );
    assert!(error_of("h-alloc").contains("out of memory"), "{dead:?}");
    assert!(
        error_of("h-throw").contains("TypeError: bad input"),
        "{dead:?}"
    );
    // One attempt each: a script's failure is not retried.
    assert!(dead.iter().all(|d| d["attempts"] == 1), "{dead:?}");
    assert!(dead_letters(&base, "h_plain").await.is_empty());
    let health = reqwest::get(format!("{base}/healthz")).await.unwrap();
    assert_eq!(health.status(), 200);
    // The engine goes on after all that.
    send(&base, vec![track("h-after", "Fine", json!({}))]).await;
    assert!(hostile.wait_until(limit, |s| s.events().len() == 2).await);
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn a_reload_changes_the_transform_while_events_flow() {
    let db = TestDatabase::create("filters_reload").await;
    let dir = scratch("reload");
    let script = |version: u32| {
        format!(
            "export function transformEvent(event) {{ event.properties.version = {version}; return event; }}\n"
        )
    };
    std::fs::write(dir.join("t.js"), script(1)).unwrap();
    let sink = MockServer::start().await;
    let path = write_config(&dir, &[webhook("r_sink", &sink, "transform = \"t.js\"")]);
    let sy = start_switchyard_from(&path, &db.url).await;
    let base = format!("http://{}", sy.addr);

    let sender = {
        let base = base.clone();
        tokio::spawn(async move {
            for round in 0..40 {
                let batch = (0..5)
                    .map(|i| track(&format!("r-{round}-{i}"), "E", json!({})))
                    .collect();
                send(&base, batch).await;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(dir.join("t.js"), script(2)).unwrap();
    let (status, body) = admin(&base, reqwest::Method::POST, "/admin/v1/reload", None).await;
    assert_eq!(status, 200, "{body}");
    sender.await.unwrap();
    send(&base, vec![track("r-last", "E", json!({}))]).await;

    let limit = Duration::from_secs(30);
    assert!(sink.wait_until(limit, |s| s.events().len() >= 201).await);
    let events = sink.events();
    let mut ids: Vec<String> = sink.message_ids();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 201, "every event arrives");
    assert!(events
        .iter()
        .all(|e| matches!(e["properties"]["version"].as_u64(), Some(1 | 2))));
    assert!(events.iter().any(|e| e["properties"]["version"] == 1));
    let last = events.iter().find(|e| e["messageId"] == "r-last").unwrap();
    assert_eq!(
        last["properties"]["version"], 2,
        "after the reload, the new script"
    );
    assert!(dead_letters(&base, "r_sink").await.is_empty());
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn the_test_endpoint_shows_what_would_be_delivered_and_sends_nothing() {
    let db = TestDatabase::create("filters_test_endpoint").await;
    let dir = scratch("test_endpoint");
    std::fs::write(
        dir.join("t.js"),
        "export function transformEvent(event) {\n\
           if (event.event === 'Drop') return null;\n\
           if (event.event === 'Fail') throw new Error('nope');\n\
           event.properties.tier = 'gold';\n\
           return [event, {...event, event: 'Copy'}];\n\
         }\n",
    )
    .unwrap();
    let sink = MockServer::start().await;
    let path = write_config(
        &dir,
        &[webhook(
            "t_sink",
            &sink,
            "events = [\"Order\", \"Drop\", \"Fail\"]\nwhere = \"properties.revenue > 10\"\n\
             consent = [\"Ads\"]\ntransform = \"t.js\"\ndrop_properties = [\"properties.email\"]",
        )],
    );
    let sy = start_switchyard_from(&path, &db.url).await;
    let base = format!("http://{}", sy.addr);
    let test = |body: Value| {
        let base = base.clone();
        async move {
            admin(
                &base,
                reqwest::Method::POST,
                "/admin/v1/destinations/t_sink/test",
                Some(body),
            )
            .await
        }
    };
    let order =
        json!({"event": "Order", "userId": "u", "properties": {"revenue": 20, "email": "a@b"}});
    let (status, answer) = test(json!({ "event": order })).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["delivered"], true);
    assert_eq!(answer["filtered"], Value::Null);
    let events = answer["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(
        events[0]["properties"],
        json!({"revenue": 20, "tier": "gold"})
    );
    assert_eq!(events[1]["event"], "Copy");

    let cases = [
        (
            json!({"event": "Order", "properties": {"revenue": 20},
                   "integrations": {"t_sink": false}}),
            "integrations",
        ),
        (
            json!({"event": "Other", "properties": {"revenue": 20}}),
            "events",
        ),
        (
            json!({"event": "Order", "properties": {"revenue": 5}}),
            "where",
        ),
        (
            json!({"event": "Order", "properties": {"revenue": 20},
                   "context": {"consent": {"categoryPreferences": {"Ads": false}}}}),
            "consent",
        ),
        (
            json!({"event": "Drop", "properties": {"revenue": 20}}),
            "transform",
        ),
    ];
    for (event, reason) in cases {
        let (status, answer) = test(json!({ "event": event })).await;
        assert_eq!(status, 200);
        assert_eq!(answer["filtered"], reason, "{answer}");
        assert_eq!(answer["delivered"], false);
    }
    let (_, failed) =
        test(json!({"event": {"event": "Fail", "properties": {"revenue": 20}}})).await;
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.starts_with("transform failed: Error: nope (at transformEvent ("),
        "{error}"
    );
    assert!(
        error.ends_with("t.js:3:39))"),
        "where in the script: {error}"
    );

    // Bad input is a JSON error, never a 500.
    let (status, error) = test(json!({"nope": 1})).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("invalid_body"))
    );
    let (status, error) = test(json!({"event": {"type": "bogus"}})).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("invalid_body"))
    );
    assert_eq!(error["message"], "unknown type `bogus`");
    let expected = "expected {\"event\": {...}}: the event to try, as an SDK would send it";
    for shape in [
        json!({"event": "Order"}),
        json!({"event": null}),
        json!([{"event": {}}]),
    ] {
        let (status, error) = test(shape.clone()).await;
        assert_eq!(
            (status, error["code"].as_str(), error["message"].as_str()),
            (400, Some("invalid_body"), Some(expected)),
            "{shape}"
        );
    }
    let not_json = reqwest::Client::new()
        .post(format!("{base}/admin/v1/destinations/t_sink/test"))
        .bearer_auth(ADMIN_TOKEN)
        .body("{\"event\": {")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 400);
    let error: Value = not_json.json().await.unwrap();
    assert_eq!(error["code"], "invalid_body");
    assert_eq!(
        error["message"],
        "the body is not JSON: EOF while parsing an object at line 1 column 11"
    );
    // The dashboard's list shows each destination's filters.
    let (_, list) = admin(&base, reqwest::Method::GET, "/admin/v1/destinations", None).await;
    let filters = list[0]["filters"].as_array().unwrap();
    let shown: Vec<&str> = filters.iter().filter_map(Value::as_str).collect();
    assert_eq!(shown[0], "where: properties.revenue > 10");
    assert_eq!(shown[1], "consent: Ads");
    assert!(
        shown[2].starts_with("transform: ") && shown[2].ends_with("t.js"),
        "{shown:?}"
    );
    assert_eq!(shown[3], "drop_properties: properties.email");
    let (status, _) = admin(
        &base,
        reqwest::Method::POST,
        "/admin/v1/destinations/nobody/test",
        Some(json!({"event": {}})),
    )
    .await;
    assert_eq!(status, 404);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(sink.received().is_empty(), "the test sends nothing");
    std::fs::remove_dir_all(&dir).ok();
}

/// Every frame of a server-sent event stream as (event, data), read until `done` holds or
/// `limit` passes.
async fn read_frames(
    response: &mut reqwest::Response,
    limit: Duration,
    done: impl Fn(&[(String, Value)]) -> bool,
) -> Vec<(String, Value)> {
    let deadline = std::time::Instant::now() + limit;
    let mut text = String::new();
    let mut frames = Vec::new();
    while !done(&frames) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match tokio::time::timeout(left, response.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            _ => break,
        }
        frames = text
            .split("\n\n")
            .filter_map(|frame| {
                let kind = frame.lines().find_map(|l| l.strip_prefix("event: "))?;
                let data = frame.lines().find_map(|l| l.strip_prefix("data: "))?;
                Some((kind.to_owned(), serde_json::from_str(data).ok()?))
            })
            .collect();
    }
    frames
}

/// Why an event did not reach a destination, named by the first rule that stopped it in the
/// documented order (integrations → events → where → consent → sample → transform), and how a
/// transform failed: in the event's path, in the live debugger, and in the dead letters. The
/// script's `metadata(event)` names the source.
#[tokio::test]
async fn the_path_and_the_live_stream_say_which_rule_filtered_an_event() {
    let db = TestDatabase::create("filters_reasons").await;
    let dir = scratch("reasons");
    std::fs::write(
        dir.join("shape.js"),
        "export function transformEvent(event, metadata) {\n\
           if (event.event === 'Skip') return null;\n\
           if (event.event === 'Boom') throw new Error('boom');\n\
           event.properties.source = metadata(event).sourceName;\n\
           event.properties.destination = metadata(event).destinationName;\n\
           return event;\n\
         }\n",
    )
    .unwrap();
    let (gauntlet, shaper) = (MockServer::start().await, MockServer::start().await);
    let path = write_config(
        &dir,
        &[
            webhook(
                "gauntlet",
                &gauntlet,
                "events = [\"Order\"]\nwhere = \"properties.revenue > 10\"\n\
                 consent = [\"Ads\"]\nsample = 0.0",
            ),
            webhook("shaper", &shaper, "transform = \"shape.js\""),
        ],
    );
    let sy = start_switchyard_from(&path, &db.url).await;
    let base = format!("http://{}", sy.addr);
    let mut live = reqwest::Client::new()
        .get(format!("{base}/admin/v1/live"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);

    let run = std::process::id();
    let id = |name: &str| format!("why-{run}-{name}");
    let event = |name: &str, kind: &str, revenue: u32, ads: bool| {
        json!({"type": "track", "event": kind, "userId": "u", "messageId": id(name),
               "properties": {"revenue": revenue},
               "context": {"consent": {"categoryPreferences": {"Ads": ads}}}})
    };
    let mut off = event("integrations", "Order", 5, false);
    off["integrations"] = json!({"All": false});
    let batch = vec![
        off,
        event("events", "Other", 5, false),
        event("where", "Order", 5, false),
        event("consent", "Order", 50, false),
        event("sample", "Order", 50, true),
        event("skip", "Skip", 50, true),
        event("boom", "Boom", 50, true),
    ];
    send(&base, batch).await;

    let limit = Duration::from_secs(20);
    // Every rule, named in the event's path (the first one that stopped it).
    let expected = [
        ("integrations", "integrations"),
        ("events", "events"),
        ("where", "where"),
        ("consent", "consent"),
        ("sample", "sample"),
    ];
    let route = |path: &Value, destination: &str| {
        path["routes"]
            .as_array()
            .and_then(|routes| routes.iter().find(|r| r["destination"] == destination))
            .cloned()
            .unwrap_or(Value::Null)
    };
    for (name, reason) in expected {
        let (status, path) = admin(
            &base,
            reqwest::Method::GET,
            &format!("/admin/v1/events/{}", id(name)),
            None,
        )
        .await;
        assert_eq!(status, 200, "{path}");
        let gate = route(&path, "gauntlet");
        assert_eq!(gate["state"], "filtered", "{name}: {path}");
        assert_eq!(gate["reason"], reason, "{name}: {path}");
    }
    // The transform's null and its failure, once delivery has run it.
    let started = std::time::Instant::now();
    let (skip, boom) = loop {
        let get = |name: &str| {
            let base = base.clone();
            let path = format!("/admin/v1/events/{}", id(name));
            async move { admin(&base, reqwest::Method::GET, &path, None).await.1 }
        };
        let (skip, boom) = (get("skip").await, get("boom").await);
        let settled = route(&skip, "shaper")["state"] == "filtered"
            && route(&boom, "shaper")["state"] == "dead";
        if settled || started.elapsed() > limit {
            break (skip, boom);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(route(&skip, "shaper")["reason"], "transform", "{skip}");
    let failed = route(&boom, "shaper");
    assert_eq!(failed["state"], "dead", "{boom}");
    assert!(
        failed["attempts"][0]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("transform failed: Error: boom")),
        "{boom}"
    );
    assert_eq!(route(&skip, "gauntlet")["reason"], "events", "{skip}");
    let integrations_path = format!("/admin/v1/events/{}", id("integrations"));
    let (_, off_path) = admin(&base, reqwest::Method::GET, &integrations_path, None).await;
    assert_eq!(
        route(&off_path, "shaper")["reason"],
        "integrations",
        "{off_path}"
    );

    // The live debugger: each message with its routing, then what delivery made of it.
    let frames = read_frames(&mut live, limit, |frames| {
        frames.iter().filter(|(kind, _)| kind == "message").count() >= 7
            && frames.iter().filter(|(kind, _)| kind == "outcome").count() >= 2
    })
    .await;
    let message = |name: &str| {
        frames
            .iter()
            .find(|(kind, data)| kind == "message" && data["message"]["messageId"] == id(name))
            .map(|(_, data)| data.clone())
            .unwrap_or_else(|| panic!("no message frame for {name}: {frames:?}"))
    };
    for (name, reason) in expected {
        let routes = message(name)["routes"].clone();
        let gate = routes
            .as_array()
            .and_then(|r| r.iter().find(|r| r["destination"] == "gauntlet"))
            .unwrap_or_else(|| panic!("{name}: {routes}"));
        assert_eq!(gate["state"], "filtered", "{name}: {routes}");
        assert_eq!(gate["reason"], reason, "{name}: {routes}");
    }
    let shaper_route = message("sample")["routes"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["destination"] == "shaper").cloned())
        .unwrap();
    assert_eq!(shaper_route["state"], "queued", "{shaper_route}");
    let outcome = |name: &str| {
        frames
            .iter()
            .find(|(kind, data)| kind == "outcome" && data["message_id"] == id(name))
            .map(|(_, data)| data.clone())
            .unwrap_or_else(|| panic!("no outcome frame for {name}: {frames:?}"))
    };
    let skipped = outcome("skip");
    assert_eq!(
        (
            &skipped["destination"],
            &skipped["state"],
            &skipped["reason"]
        ),
        (&json!("shaper"), &json!("filtered"), &json!("transform")),
        "{skipped}"
    );
    let boomed = outcome("boom");
    assert_eq!(boomed["state"], "dead", "{boomed}");
    assert!(
        boomed["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("transform failed: Error: boom")),
        "{boomed}"
    );

    // The dead letter says how the script failed; the delivered events name their source.
    let dead = dead_letters(&base, "shaper").await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0]["last_error"]
        .as_str()
        .unwrap()
        .starts_with("transform failed: Error: boom"));
    assert!(shaper.wait_until(limit, |s| s.events().len() == 4).await);
    for delivered in shaper.events() {
        assert_eq!(delivered["properties"]["source"], "web", "{delivered}");
        assert_eq!(
            delivered["properties"]["destination"], "shaper",
            "{delivered}"
        );
    }
    assert!(gauntlet.received().is_empty());
    let filtered = |r: &str| {
        format!("switchyard_filtered_events_total{{destination=\"gauntlet\",reason=\"{r}\"}}")
    };
    assert_eq!(metric(&base, &filtered("integrations")).await, 1.0);
    assert_eq!(metric(&base, &filtered("events")).await, 3.0);
    std::fs::remove_dir_all(&dir).ok();
}

//! The admin surface is closed and secrets stay secret: every admin route needs the token,
//! CORS is closed, and write keys, vendor keys, webhook secrets, database passwords and the
//! admin token appear in no log line, error, admin answer or metric.

use std::time::Duration;

use serde_json::json;
use switchyard::testkit::{start_switchyard, MockServer, Process, TestDatabase, ADMIN_TOKEN};

#[tokio::test]
async fn every_admin_route_requires_the_token() {
    let db = TestDatabase::create("admin_walk").await;
    let sy = start_switchyard("[[sources]]\nname = \"web\"\nwrite_key = \"wk\"\n", &db.url).await;
    let client = reqwest::Client::new();
    let mut paths: Vec<String> = switchyard::http::server::admin_paths()
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert!(paths.len() >= 5, "{paths:?}");
    // Every admin path the OpenAPI document names, and ones no route has.
    let document: serde_json::Value =
        serde_json::from_str(&switchyard::http::openapi::json()).unwrap();
    paths.extend(
        document["paths"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|path| path.starts_with(switchyard::http::server::ADMIN_API))
            .cloned(),
    );
    paths.extend([
        "/admin/v1/".into(),
        "/admin/v1/no-such-route".into(),
        "/admin/v1/destinations/x".into(),
    ]);
    for path in paths {
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let url = format!("http://{}{path}", sy.addr);
            for token in [None, Some("wrong"), Some("")] {
                let mut request = client.request(method.clone(), &url);
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                let status = request.send().await.unwrap().status().as_u16();
                // 405 is a method the route does not have, answered before anything runs.
                assert!(
                    status == 401 || status == 405,
                    "{method} {path} with {token:?}: {status}"
                );
            }
        }
    }
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn cors_is_closed_by_default() {
    let db = TestDatabase::create("cors").await;
    let sy = start_switchyard("[[sources]]\nname = \"web\"\nwrite_key = \"wk\"\n", &db.url).await;
    let client = reqwest::Client::new();
    for path in ["/v1/track", "/admin/v1/destinations"] {
        let response = client
            .request(
                reqwest::Method::OPTIONS,
                format!("http://{}{path}", sy.addr),
            )
            .header("origin", "https://evil.example")
            .header("access-control-request-method", "POST")
            .send()
            .await
            .unwrap();
        assert!(
            response
                .headers()
                .get("access-control-allow-origin")
                .is_none(),
            "{path}"
        );
    }
    let response = client
        .get(format!("http://{}/admin/v1/destinations", sy.addr))
        .header("origin", "https://evil.example")
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn secrets_appear_nowhere() {
    let db = TestDatabase::create("secrets").await;
    let sink = MockServer::start().await;
    let vendor = MockServer::scripted(|_, _| switchyard::testkit::Reply::status(401)).await;
    let write_key = "wk_TOPSECRET_write";
    // base64 of "TOPSECRETTOPSECRET".
    let webhook_secret = "whsec_VE9QU0VDUkVUVE9QU0VDUkVU";
    let api_key = "amp_TOPSECRET_api_key";
    let db_password = "TOPSECRET_db_password";
    let config = format!(
        r#"
[[sources]]
name = "web"
write_key = "{write_key}"

[[destinations]]
name = "hook"
kind = "webhook"
url = "{}"
secret = "{webhook_secret}"

[[destinations]]
name = "amp"
kind = "amplitude"
api_key = "{api_key}"
endpoint = "{}"
"#,
        sink.url("/in"),
        vendor.url("")
    );
    // The database password must never show either. Trust auth ignores the password, so one is
    // made up; with password auth (SWITCHYARD_TEST_DATABASE_URL) the real one is checked.
    let mut url = url::Url::parse(&db.url).expect("the test database URL parses");
    let db_password = match url.password() {
        Some(real) => real.to_owned(),
        None => {
            url.set_password(Some(db_password))
                .expect("a URL with a host");
            db_password.to_owned()
        }
    };
    let url = url.to_string();
    let mut sy = Process::spawn(env!("CARGO_BIN_EXE_switchyard"), &config, &url).await;
    let client = reqwest::Client::new();
    let base = sy.base();
    client
        .post(format!("{base}/v1/track"))
        .basic_auth(write_key, Some(""))
        .json(&json!({"event": "E", "userId": "u"}))
        .send()
        .await
        .unwrap();
    // A wrong key, a key in the body, and a bad request: none echo a key back.
    let wrong = client
        .post(format!("{base}/v1/track"))
        .basic_auth("wk_TOPSECRET_wrong", Some(""))
        .json(&json!({"event": "E", "userId": "u"}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let bad = client
        .post(format!("{base}/v1/batch"))
        .json(&json!({"writeKey": write_key, "batch": [{"type": "nope"}]}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        sink.wait_until(Duration::from_secs(10), |s| !s.events().is_empty())
            .await
    );
    assert!(
        vendor
            .wait_until(Duration::from_secs(10), |s| !s.received().is_empty())
            .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let admin = |path: &'static str| {
        let client = client.clone();
        let base = base.clone();
        async move {
            client
                .get(format!("{base}{path}"))
                .bearer_auth(ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    let destinations = admin("/admin/v1/destinations").await;
    let dead = admin("/admin/v1/dead-letters").await;
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        dead.contains("HTTP 401"),
        "the vendor's refusal is a dead letter: {dead}"
    );
    let delivered = sink.received().remove(0);
    let delivered = String::from_utf8_lossy(&delivered.body).into_owned();
    assert_eq!(sy.terminate(Duration::from_secs(20)).await, Some(0));
    let log = sy.log();
    for (what, text) in [
        ("log", &log),
        ("401 answer", &wrong),
        ("400 answer", &bad),
        ("admin destinations", &destinations),
        ("dead letters", &dead),
        ("metrics", &metrics),
        ("delivered event", &delivered),
    ] {
        for secret in ["TOPSECRET", "VE9QU0VDUkVU", &db_password] {
            assert!(
                !text.contains(secret),
                "a secret leaked into the {what}:\n{text}"
            );
        }
        assert!(
            !text.contains(ADMIN_TOKEN),
            "the admin token leaked into the {what}"
        );
    }
}

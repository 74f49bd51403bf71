//! Security: where deliveries may go (SSRF), redirects, and secrets kept out of sight.

use std::time::Duration;

use serde_json::{json, Value};
use switchyard::testkit::{start_switchyard, MockServer, Reply, TestDatabase, ADMIN_TOKEN};

const KEY: &str = "wk_security";

async fn send(addr: std::net::SocketAddr, id: &str) {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/v1/track"))
        .basic_auth(KEY, Some(""))
        .json(&json!({"event": "E", "userId": "u", "messageId": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

async fn dead_letters(addr: std::net::SocketAddr, count: usize) -> Vec<Value> {
    for _ in 0..100 {
        let body: Value = reqwest::Client::new()
            .get(format!("http://{addr}/admin/v1/dead-letters"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let items = body["items"].as_array().cloned().unwrap_or_default();
        if items.len() >= count {
            return items;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("fewer than {count} dead letters");
}

#[tokio::test]
async fn private_addresses_are_refused_when_asked_at_connect_time() {
    let db = TestDatabase::create("ssrf").await;
    let sink = MockServer::start().await;
    let port = sink.addr.port();
    let config = format!(
        r#"
[security]
deny_private_networks = true

[[sources]]
name = "web"
write_key = "{KEY}"

[[destinations]]
name = "literal"
kind = "webhook"
url = "http://127.0.0.1:{port}/literal"

[[destinations]]
name = "named"
kind = "webhook"
url = "http://localhost:{port}/named"
"#
    );
    let sy = start_switchyard(&config, &db.url).await;
    send(sy.addr, "ssrf-1").await;
    let items = dead_letters(sy.addr, 2).await;
    for item in &items {
        let reason = item["last_error"].as_str().unwrap();
        assert!(reason.contains("refused to connect to"), "{reason}");
        assert!(reason.contains("loopback"), "{reason}");
        assert_eq!(item["attempts"], 1, "a refusal is permanent, not retried");
    }
    assert!(sink.received().is_empty(), "nothing reached the receiver");
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn allowed_networks_pass_and_the_default_is_friendly_to_local_setups() {
    let db = TestDatabase::create("allow").await;
    let sink = MockServer::start().await;
    let config = format!(
        "[security]\ndeny_private_networks = true\nallow_networks = [\"127.0.0.0/8\"]\n\n[[sources]]\nname = \"web\"\nwrite_key = \"{KEY}\"\n\n[[destinations]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\n",
        sink.url("/in")
    );
    let sy = start_switchyard(&config, &db.url).await;
    send(sy.addr, "allowed-1").await;
    assert!(
        sink.wait_until(Duration::from_secs(10), |s| s.events().len() == 1)
            .await
    );
    sy.shutdown().await.unwrap();
}

#[tokio::test]
async fn redirects_are_never_followed() {
    let db = TestDatabase::create("redirect").await;
    let elsewhere = MockServer::start().await;
    let target = elsewhere.url("/stolen");
    let sink =
        MockServer::scripted(move |_, _| Reply::status(307).with_header("location", &target)).await;
    let config = format!(
        "[[sources]]\nname = \"web\"\nwrite_key = \"{KEY}\"\n\n[[destinations]]\nname = \"hook\"\nkind = \"webhook\"\nurl = \"{}\"\n",
        sink.url("/in")
    );
    let sy = start_switchyard(&config, &db.url).await;
    send(sy.addr, "redirect-1").await;
    let items = dead_letters(sy.addr, 1).await;
    assert_eq!(items[0]["last_status"], 307);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        elsewhere.received().is_empty(),
        "the redirect was not followed"
    );
    sy.shutdown().await.unwrap();
}

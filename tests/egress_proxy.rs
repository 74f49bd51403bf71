//! Item 15 of issue #11: `HTTP_PROXY` in the environment must not carry deliveries past the
//! address policy (a proxy resolves and connects on our behalf). Its own test binary: the
//! variable is set for this process only.

use std::time::Duration;

use serde_json::{json, Value};
use switchyard::testkit::{start_switchyard, MockServer, TestDatabase, ADMIN_TOKEN};

#[tokio::test]
async fn an_environment_proxy_does_not_bypass_the_address_policy() {
    let proxy = MockServer::start().await;
    let sink = MockServer::start().await;
    // Set before the HTTP client exists, and read by nothing else in this binary.
    for name in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "ALL_PROXY"] {
        std::env::set_var(name, proxy.url(""));
    }
    for name in ["NO_PROXY", "no_proxy"] {
        std::env::remove_var(name);
    }
    let db = TestDatabase::create("env_proxy").await;
    let config = format!(
        r#"
[security]
deny_private_networks = true

[[sources]]
name = "web"
write_key = "wk_proxy"

[[destinations]]
name = "named"
kind = "webhook"
url = "http://localhost:{}/in"
"#,
        sink.addr.port()
    );
    let sy = start_switchyard(&config, &db.url).await;
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("http://{}/v1/track", sy.addr))
        .basic_auth("wk_proxy", Some(""))
        .json(&json!({"event": "E", "userId": "u", "messageId": "proxy-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut items = Vec::new();
    for _ in 0..100 {
        let body: Value = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{}/admin/v1/dead-letters", sy.addr))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        items = body["items"].as_array().cloned().unwrap_or_default();
        if !items.is_empty() || !proxy.received().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        proxy.received().is_empty(),
        "the delivery went through the environment's proxy"
    );
    assert!(sink.received().is_empty());
    let reason = items[0]["last_error"].as_str().unwrap();
    assert!(reason.contains("refused to connect to"), "{reason}");
    sy.shutdown().await.unwrap();
}

//! The client side of a test: send events with a write key, call the admin API with the test
//! token, as an SDK and an operator would.

use reqwest::header::CONTENT_TYPE;
use reqwest::Method;
use serde_json::{json, Value};

use super::ADMIN_TOKEN;

/// An answer's status and its body as JSON (`Null` when it is not JSON).
async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.bytes().await.unwrap_or_default();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Posts `batch` to `{base}/v1/batch` with the write key `key`.
pub async fn send_batch(base: &str, key: &str, batch: &[Value]) -> (u16, Value) {
    let body = json!({ "batch": batch }).to_string();
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/batch"))
        .basic_auth(key, Some(""))
        .header(CONTENT_TYPE, "application/json")
        .body(body)
        .send()
        .await
        .expect("ingest answers");
    answer(response).await
}

/// Calls the admin API with [`ADMIN_TOKEN`] and, when given, a JSON body.
pub async fn admin(base: &str, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .request(method, format!("{base}{path}"))
        .bearer_auth(ADMIN_TOKEN);
    if let Some(body) = body {
        request = request
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_string());
    }
    answer(request.send().await.expect("the admin API answers")).await
}

/// Calls the admin API, which must answer with a success; returns the answer's JSON.
pub async fn admin_ok(base: &str, method: Method, path: &str, body: Option<Value>) -> Value {
    let (status, answer) = admin(base, method, path, body).await;
    assert!((200..300).contains(&status), "{path}: {status} {answer}");
    answer
}

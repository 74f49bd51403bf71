//! What a webhook request carries: the body (the event, or `{"batch": [...]}`), its
//! `webhook-id`, and the Standard Webhooks signature made with the destination's `secret`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::destination::Event;

pub(super) fn decode_secret(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret
        .strip_prefix("whsec_")
        .ok_or("must start with `whsec_` followed by base64 (Standard Webhooks)")?;
    let key = BASE64
        .decode(encoded)
        .map_err(|_| "is not valid base64 after `whsec_`")?;
    if key.is_empty() {
        return Err("is empty after `whsec_`".into());
    }
    Ok(key)
}

/// `webhook-signature` for `id.timestamp.body`: `v1,` + base64(HMAC-SHA256).
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// The `webhook-id` of a request: the messageId of a single event; for a batch, a digest of its
/// messageIds, so a retried batch keeps its id and a different batch never shares one.
pub(super) fn webhook_id(events: &[Event]) -> String {
    match events {
        [event] => event.message_id.clone(),
        _ => {
            let mut digest = Sha256::new();
            for event in events {
                digest.update(event.message_id.as_bytes());
                digest.update([0]);
            }
            let hash = digest.finalize();
            let hex: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
            format!("batch_{hex}")
        }
    }
}

/// The body: the event itself, or `{"batch": [...]}` with the raw events spliced in.
pub(super) fn body(events: &[Event]) -> Vec<u8> {
    if let [event] = events {
        return event.payload.get().as_bytes().to_vec();
    }
    let size: usize = events.iter().map(|e| e.payload.get().len() + 1).sum();
    let mut body = Vec::with_capacity(size + 12);
    body.extend_from_slice(b"{\"batch\":[");
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(event.payload.get().as_bytes());
    }
    body.extend_from_slice(b"]}");
    body
}

#[cfg(test)]
mod tests {
    use super::super::tests::event;
    use super::*;

    #[test]
    fn signs_the_standard_webhooks_test_vector() {
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn batches_wrap_events_and_single_events_go_as_is() {
        let a = event("a", r#"{"messageId":"a"}"#);
        let b = event("b", r#"{"messageId":"b"}"#);
        assert_eq!(body(std::slice::from_ref(&a)), br#"{"messageId":"a"}"#);
        let both: serde_json::Value = serde_json::from_slice(&body(&[a.clone(), b])).unwrap();
        assert_eq!(both["batch"][1]["messageId"], "b");
        assert_eq!(webhook_id(&[a]), "a");
    }
}

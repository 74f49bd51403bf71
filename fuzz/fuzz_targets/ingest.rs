//! The ingest parser on arbitrary bytes: it may refuse them, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::ingest::{decode_body, parse, Call, Endpoint};

fuzz_target!(|data: &[u8]| {
    let now = time::OffsetDateTime::UNIX_EPOCH;
    for endpoint in [Endpoint::Batch, Endpoint::Single(Call::Track)] {
        if let Ok(parsed) = parse(endpoint, data, now) {
            for (_, message) in parsed.messages {
                // What ingest accepted is valid JSON for every destination.
                let _: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            }
        }
    }
    if let Ok(decoded) = decode_body(Some("gzip"), data) {
        let _ = parse(Endpoint::Batch, &decoded, now);
    }
});

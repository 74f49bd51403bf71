//! How an event's payload is stored: its JSON compressed with LZ4 behind a one-byte tag, or the
//! JSON itself when compressing saves nothing.
//!
//! Postgres compresses a value only once its row passes about 2 KB (`TOAST_TUPLE_THRESHOLD`;
//! `toast_tuple_target` does not lower that), so the column's `lz4` setting never touched the
//! typical event of a few hundred bytes: it was archived as it came. LZ4 takes an eighth off a
//! small server-side track event and about a third off a browser's page event with its
//! context, in about a microsecond. zstd took a third off the small event too, but cost 8.7 µs
//! to compress and 2.8 µs to read back per event on the bench machine, and cut the ingest rate
//! by a tenth (BENCHMARKS.md, "2026-11-30, afternoon: compressed payloads").
//!
//! A stored payload is told apart by its first byte: JSON never starts with the tag (0x01), so
//! rows written before this, and copies of them, read as they are.

/// Starts a compressed payload; then the JSON's length (u32, little-endian) and the LZ4 block.
const TAG: u8 = 0x01;
/// The tag and the length before the block.
const HEADER: usize = 5;
/// The largest payload a header may claim to hold; ingest takes no event near it.
const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

/// The stored form of an event's JSON.
pub fn pack(json: &[u8]) -> Vec<u8> {
    let Ok(size) = u32::try_from(json.len()) else {
        return json.to_vec();
    };
    let mut packed = vec![0; HEADER + lz4_flex::block::get_maximum_output_size(json.len())];
    packed[0] = TAG;
    packed[1..HEADER].copy_from_slice(&size.to_le_bytes());
    match lz4_flex::block::compress_into(json, &mut packed[HEADER..]) {
        Ok(written) if HEADER + written < json.len() => {
            packed.truncate(HEADER + written);
            packed
        }
        _ => json.to_vec(),
    }
}

/// The JSON of a stored payload. One that does not decode (the database damaged it) is logged
/// and handed on as stored: delivery then gives destinations `null` for it, as for any payload
/// that is not JSON, and they fail it.
pub fn unpack(stored: Vec<u8>) -> Vec<u8> {
    if stored.first() != Some(&TAG) {
        return stored;
    }
    let json = stored
        .get(1..HEADER)
        .and_then(|size| size.try_into().ok())
        .map(|size| u32::from_le_bytes(size) as usize)
        .filter(|&size| size <= MAX_PAYLOAD)
        .and_then(|size| lz4_flex::block::decompress(&stored[HEADER..], size).ok());
    match json {
        Some(json) => json,
        None => {
            tracing::error!(bytes = stored.len(), "a stored payload does not decode");
            stored
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A browser's page event, as analytics.js sends it (with the context it adds).
    const PAGE: &[u8] = br#"{"anonymousId":"5f1b2c3d-4e5f-6789-abcd-ef0123456789","context":{"ip":"203.0.113.7","library":{"name":"analytics.js","version":"next-1.70.0"},"locale":"en-US","page":{"path":"/pricing","referrer":"https://www.google.com/","search":"","title":"Pricing - Acme","url":"https://www.acme.com/pricing"},"userAgent":"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36","userAgentData":{"brands":[{"brand":"Google Chrome","version":"131"},{"brand":"Chromium","version":"131"}],"mobile":false,"platform":"macOS"}},"integrations":{},"messageId":"ajs-next-1732960000000-abcdef12","name":"Pricing","properties":{"path":"/pricing","referrer":"https://www.google.com/","search":"","title":"Pricing - Acme","url":"https://www.acme.com/pricing"},"receivedAt":"2026-11-30T10:00:00.012Z","sentAt":"2026-11-30T10:00:00.005Z","timestamp":"2026-11-30T10:00:00.007Z","type":"page"}"#;

    #[test]
    fn an_event_is_stored_smaller_and_read_back_whole() {
        let stored = pack(PAGE);
        assert_eq!(stored[0], TAG);
        assert!(
            stored.len() * 4 < PAGE.len() * 3,
            "{} of {}",
            stored.len(),
            PAGE.len()
        );
        assert_eq!(unpack(stored), PAGE);
    }

    #[test]
    fn what_does_not_shrink_is_stored_as_it_is() {
        assert_eq!(pack(b"{}"), b"{}");
        assert_eq!(unpack(b"{}".to_vec()), b"{}");
    }

    #[test]
    fn a_payload_stored_before_compression_reads_as_it_is() {
        assert_eq!(unpack(PAGE.to_vec()), PAGE);
    }

    #[test]
    fn a_damaged_payload_is_handed_on_as_stored() {
        let mut stored = pack(PAGE);
        stored.truncate(stored.len() / 2);
        assert_eq!(unpack(stored.clone()), stored);
        let mut huge = pack(PAGE);
        huge[1..HEADER].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(unpack(huge.clone()), huge);
    }
}

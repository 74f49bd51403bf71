//! The config parser on arbitrary text: every problem is an error with a position, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(errors) = switchyard::config::parse(text, "fuzz.toml") {
            assert!(!errors.0.is_empty());
            for error in &errors.0 {
                assert!(error.line >= 1 && error.col >= 1);
            }
        }
    }
});

//! Sizes (`8G`) and durations (`500ms`): never panic, and a size that
//! parses is written back (as config files are) in a form that reads as
//! the same number of bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rivernode::config::{parse_duration, HumanSize};

fuzz_target!(|s: &str| {
    let _ = parse_duration(s);
    if let Ok(n) = rivernode::api::parse_memory_size(s) {
        let written = serde_json::to_value(HumanSize(n)).unwrap();
        let back: HumanSize = serde_json::from_value(written.clone()).expect("reads back");
        assert_eq!(back.0, n, "{s:?} -> {written}");
    }
});

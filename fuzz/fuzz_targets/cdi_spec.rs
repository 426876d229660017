//! CDI specs as YAML and JSON: never panic, and a spec that parses is valid
//! and survives a JSON round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rivernode::oci::cdi;
use std::path::Path;

fuzz_target!(|s: &str| {
    for name in ["spec.yaml", "spec.json"] {
        if let Ok(spec) = cdi::parse(Path::new(name), s) {
            cdi::validate(Path::new(name), &spec).expect("a parsed spec is valid");
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(cdi::parse(Path::new("again.json"), &json).unwrap(), spec);
        }
    }
});

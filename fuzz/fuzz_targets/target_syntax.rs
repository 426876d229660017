//! `-t NODE[:NUMA][::GPU,...]`: never panics, and what parses prints back
//! to a string that parses to the same target.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rivernode::api::Target;

fuzz_target!(|s: &str| {
    if let Ok(t) = s.parse::<Target>() {
        let again: Target = t.to_string().parse().expect("a printed target parses");
        assert_eq!(again, t);
    }
});

//! The SSH proxy's `REQUEST_TUNNEL <id> <token>` line: never panics, and a
//! line it accepts names a token with no whitespace in it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &str| {
    if let Ok((_, token)) = rivernode::host::proxy::parse_request(line) {
        assert!(!token.is_empty() && !token.contains(char::is_whitespace));
    }
});

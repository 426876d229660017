//! Bearer tokens: made by the host, hashed by both daemons (only hashes
//! are stored), read from 0600 files by the runner and the CLI.

use std::path::Path;

use sha2::{Digest, Sha256};

/// A new token: `prefix_` and 64 hex digits from the kernel's random source.
pub fn generate(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the kernel's random source is unavailable");
    format!("{prefix}_{}", hex::encode(bytes))
}

/// The SHA-256 of a token, in hex: what is stored and compared.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token in a file (trimmed); `None` if it is missing or empty.
pub fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_random_and_hash_stably() {
        let (a, b) = (super::generate("rnadm"), super::generate("rnadm"));
        assert!(a.starts_with("rnadm_") && a.len() == 6 + 64, "{a}");
        assert_ne!(a, b);
        assert_eq!(super::hash(&a), super::hash(&a));
        assert_ne!(super::hash(&a), super::hash(&b));
        assert_eq!(super::hash(&a).len(), 64);
    }
}

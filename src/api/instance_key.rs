//! `CONTAINER_API_KEY`: a key the host makes for each container VPS, put in
//! its variables, that can show, stop, start and destroy that one instance
//! and nothing else (Vast.ai's per-instance key). Instances never reach the
//! host's API: the key is presented to their runner's in-instance endpoint
//! (`runner::instance_api`), which names the calling instance by its
//! address and hands the key and the verb to the host (`SelfRequest`).

use serde::{Deserialize, Serialize};

/// The variable that holds the key, as Vast.ai names it.
pub const KEY_VAR: &str = "CONTAINER_API_KEY";

/// What an instance may do to itself with its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SelfAction {
    Show,
    Stop,
    Start,
    Destroy,
}

/// A runner's word that one of its instances asked this with this key.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SelfRequest {
    pub key: String,
    pub action: SelfAction,
}

/// How every key begins (`cak_<64 hex digits>`).
pub const PREFIX: &str = "cak_";

/// A new key: 32 random bytes, as every other token of the cluster.
pub fn generate() -> String {
    super::token::generate(PREFIX.trim_end_matches('_'))
}

/// Whether `given` is the key `spec` holds, compared by hash so the time
/// taken says nothing about the key.
pub fn matches(spec: &super::TaskSpec, given: &str) -> bool {
    spec.env
        .get(KEY_VAR)
        .is_some_and(|k| !k.is_empty() && super::token::hash(k) == super::token::hash(given))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_matches_only_the_spec_that_holds_it() {
        let mut spec: crate::api::TaskSpec = serde_json::from_value(
            serde_json::json!({"kind": "vps", "command": [], "image": {"environment": "e"}}),
        )
        .unwrap();
        assert!(
            !matches(&spec, ""),
            "no key, no match, also for an empty one"
        );
        let key = generate();
        assert!(key.len() > 40, "{key}");
        spec.env.insert(KEY_VAR.into(), key.clone());
        assert!(matches(&spec, &key));
        assert!(!matches(&spec, &generate()));
        assert!(!matches(&spec, ""));
    }
}

//! rivernode: a self-hosted cluster for GPU workloads. One package, one
//! binary: `rivernode host`, `rivernode runner`, `rivernode up` and the CLI.
//! See README.md for the module map.

pub mod api;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod files;
pub mod host;
pub mod kvm;
pub mod net;
pub mod oci;
pub mod runner;
pub mod topology;
pub mod vfio;

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An error and its causes on one line, joined by ": " (as anyhow's `{:#}`
/// prints them): for messages that go to the host or a log.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

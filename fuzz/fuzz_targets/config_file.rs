//! host.toml and runner.toml: any text is a config or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rivernode::config::{HostConfig, HostLayer, RunnerConfig, RunnerLayer};

fuzz_target!(|s: &str| {
    if let Ok(l) = toml::from_str::<HostLayer>(s) {
        let mut c = HostConfig::default();
        c.apply(l);
        let _ = c.validate();
    }
    if let Ok(l) = toml::from_str::<RunnerLayer>(s) {
        let mut c = RunnerConfig::default();
        c.apply(l);
        let _ = c.validate();
    }
});

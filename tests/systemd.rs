//! The unit files are valid for systemd and say what the runner needs.

mod common;

use common::*;

fn unit(name: &str) -> String {
    std::fs::read_to_string(format!("{}/systemd/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn units_pass_systemd_analyze_verify() {
    if !real_part_available("systemd-analyze", command_exists("systemd-analyze")) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    for name in ["rivernode-host.service", "rivernode-runner.service"] {
        // Point ExecStart at the binary under test; verify checks that it exists.
        let text = unit(name).replace("/usr/local/bin/rivernode", BIN);
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        let o = std::process::Command::new("systemd-analyze")
            .args(["verify", path.to_str().unwrap()])
            .output()
            .unwrap();
        let err = stderr(&o);
        assert!(o.status.success() && err.trim().is_empty(), "{name}: {err}");
    }
}

#[test]
fn units_are_notify_and_the_runner_keeps_its_workloads() {
    let host = unit("rivernode-host.service");
    let runner = unit("rivernode-runner.service");
    for (name, text) in [("host", &host), ("runner", &runner)] {
        assert!(text.contains("\nType=notify\n"), "{name}");
        assert!(text.contains("\nRestart=on-failure\n"), "{name}");
    }
    assert!(host.contains("ExecStart=/usr/local/bin/rivernode host\n"));
    assert!(runner.contains("ExecStart=/usr/local/bin/rivernode runner\n"));
    assert!(runner.contains("\nDelegate=yes\n"));
    assert!(runner.contains("\nKillMode=process\n"));
}

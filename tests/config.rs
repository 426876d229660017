//! Bad configuration stops the daemons with one line naming the key or file.

mod common;

use common::*;

fn host_with(tmp: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut args = vec![
        "--data-dir".to_string(),
        tmp.join("data").display().to_string(),
        "host".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(&args).env("RIVERNODE_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn one_error_line(o: &std::process::Output) -> String {
    assert!(!o.status.success());
    let e = stderr(o);
    let lines: Vec<&str> = e.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {e}");
    lines[0].to_string()
}

#[test]
fn unknown_key_names_the_key_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("host.toml");
    std::fs::write(&f, "api_port = 9000\nheartbeat_timeout = 5\n").unwrap();
    let line = one_error_line(&host_with(
        tmp.path(),
        &["--config", f.to_str().unwrap()],
        &[],
    ));
    assert!(
        line.contains("host.toml") && line.contains("line 2") && line.contains("heartbeat_timeout"),
        "{line}"
    );
}

#[test]
fn bad_ports_name_the_key_variable_or_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("host.toml");
    std::fs::write(&f, "api_port = 70000\n").unwrap();
    let line = one_error_line(&host_with(
        tmp.path(),
        &["--config", f.to_str().unwrap()],
        &[],
    ));
    assert!(
        line.contains("host.toml") && line.contains("line 1"),
        "{line}"
    );

    std::fs::write(&f, "api_port = \"eighty\"\n").unwrap();
    let line = one_error_line(&host_with(
        tmp.path(),
        &["--config", f.to_str().unwrap()],
        &[],
    ));
    assert!(
        line.contains("host.toml") && line.contains("line 1"),
        "{line}"
    );

    let line = one_error_line(&host_with(
        tmp.path(),
        &["--config", "/dev/null"],
        &[("RIVERNODE_API_PORT", "http")],
    ));
    assert!(line.contains("RIVERNODE_API_PORT"), "{line}");

    let o = host_with(
        tmp.path(),
        &["--config", "/dev/null", "--api-port", "70000"],
        &[],
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--api-port"), "{}", stderr(&o));

    let line = one_error_line(&host_with(
        tmp.path(),
        &[
            "--config",
            "/dev/null",
            "--api-port",
            "9000",
            "--ssh-proxy-port",
            "9000",
        ],
        &[],
    ));
    assert!(line.contains("ssh_proxy_port"), "{line}");
}

#[test]
fn unreadable_config_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("missing.toml");
    let line = one_error_line(&host_with(
        tmp.path(),
        &["--config", missing.to_str().unwrap()],
        &[],
    ));
    assert!(line.contains("missing.toml"), "{line}");
    // A directory where a file should be (root can read any mode, so no chmod 000 here).
    let line = one_error_line(&host_with(
        tmp.path(),
        &["--config", tmp.path().to_str().unwrap()],
        &[],
    ));
    assert!(line.contains("cannot read config file"), "{line}");
}

#[test]
fn runner_config_errors_too() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("runner.toml");
    std::fs::write(&f, "host_url = \"ftp://x\"\n").unwrap();
    let o = std::process::Command::new(BIN)
        .args([
            "--data-dir",
            tmp.path().to_str().unwrap(),
            "runner",
            "--config",
            f.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let line = one_error_line(&o);
    assert!(line.contains("host_url"), "{line}");
}

#[test]
fn config_init_writes_commented_defaults_and_never_overwrites() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("runner.toml");
    let o = cli(&["config", "init", "runner", "--file", f.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&f).unwrap();
    assert!(
        text.contains("#heartbeat_interval = \"5s\"") && text.contains("#runner_port = 8001"),
        "{text}"
    );
    let o = cli(&["config", "init", "runner", "--file", f.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("never overwritten"), "{}", stderr(&o));

    let o = cli(&["config", "init", "host"]);
    assert!(stdout(&o).contains("#api_port = 8000"), "{}", stdout(&o));
}

#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let o = cli(&["completion", shell]);
        assert!(o.status.success(), "{shell}");
        let text = stdout(&o);
        assert!(
            text.contains("rivernode") && text.contains("node"),
            "{shell}: {text}"
        );
    }
}

#[test]
fn up_takes_both_tables_of_one_file_and_an_unknown_key_still_stops_it() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("up.toml");
    std::fs::write(
        &f,
        "[host]\napi_port = 9000\n[runner]\nauto_snapshot_on_stop = false\nsnapshot_every = 5\n",
    )
    .unwrap();
    let o = std::process::Command::new(BIN)
        .args(["--data-dir", tmp.path().join("data").to_str().unwrap()])
        .args(["up", "--config", f.to_str().unwrap()])
        .env("RIVERNODE_LOG", "off")
        .output()
        .unwrap();
    let line = one_error_line(&o);
    assert!(
        line.contains("snapshot_every") && line.contains("up.toml"),
        "{line}"
    );
    let o = std::process::Command::new(BIN)
        .args(["--data-dir", tmp.path().join("data").to_str().unwrap()])
        .args(["up", "--config", "/dev/null"])
        .env("RIVERNODE_LOG", "off")
        .env("RIVERNODE_AUTO_SNAPSHOT_ON_STOP", "maybe")
        .output()
        .unwrap();
    let line = one_error_line(&o);
    assert!(
        line.contains("RIVERNODE_AUTO_SNAPSHOT_ON_STOP"),
        "the runner's variables count under up: {line}"
    );
}

#[test]
fn a_busy_port_is_named_once_with_its_cause() {
    // Each error in the printed chain says its own part; the cause comes once.
    let tmp = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let o = std::process::Command::new(BIN)
        .args(["--data-dir", tmp.path().join("data").to_str().unwrap()])
        .args(["up", "--config", "/dev/null", "--api-port", &port])
        .args(["--runner-port", "0", "--ssh-proxy-port", "0"])
        .env("RIVERNODE_LOG", "off")
        .output()
        .unwrap();
    let line = one_error_line(&o);
    assert!(
        line.starts_with("error: cannot listen on 127.0.0.1:"),
        "{line}"
    );
    assert_eq!(
        line.matches("Address already in use").count(),
        1,
        "the cause is printed once: {line}"
    );
}

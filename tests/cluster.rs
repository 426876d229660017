//! The real binary as a cluster: `up`, a host with runners that register,
//! heartbeat, go offline when killed and come back when restarted.

mod common;

use std::time::Duration;

use common::*;

fn nproc() -> usize {
    let o = std::process::Command::new("nproc").output().expect("nproc");
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .expect("nproc output")
}

fn meminfo_total_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = text.lines().find(|l| l.starts_with("MemTotal:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

fn numa_node_count() -> usize {
    match std::fs::read_dir("/sys/devices/system/node") {
        Ok(entries) => entries
            .flatten()
            .filter(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with("node") && n[4..].parse::<u32>().is_ok()
            })
            .count()
            .max(1),
        Err(_) => 1,
    }
}

#[test]
fn up_brings_up_a_one_node_cluster_of_this_machine() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let data_s = data.to_str().unwrap();
    let up = Daemon::start(
        tmp.path(),
        "up",
        &[
            "--data-dir",
            data_s,
            "up",
            "--api-port",
            "0",
            "--runner-port",
            "0",
            "--ssh-proxy-port",
            "0",
            "--name",
            "solo",
        ],
    );
    let list = wait_for("the node to register", || {
        read_trimmed(&data.join("api.url"))?;
        let l = nodes(&data);
        (!l.is_empty()).then_some(l)
    });
    assert_eq!(list.len(), 1, "{list:?}");
    let n = &list[0];
    assert_eq!(n["name"], "solo");
    assert!(alive(n), "{n}");
    let inv = &n["inventory"];
    assert_eq!(
        inv["cpus"].as_array().unwrap().len(),
        nproc(),
        "cores = nproc"
    );
    assert_eq!(
        inv["memory_total_bytes"].as_u64().unwrap(),
        meminfo_total_bytes()
    );
    // Part of it is held back for the node's own daemons, never placed.
    assert_eq!(
        inv["memory_reserved_bytes"].as_u64().unwrap(),
        rivernode::runner::default_reserved_memory(meminfo_total_bytes())
    );
    assert_eq!(
        inv["numa_nodes"].as_array().unwrap().len(),
        numa_node_count()
    );

    let o = cli(&["--data-dir", data_s, "node", "status", "solo"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    // Online, or (no containerd on this machine) degraded, saying what to do.
    assert!(
        text.contains("State:      online")
            || text.contains("State:      degraded: cannot connect to containerd"),
        "{text}"
    );
    assert!(
        text.contains(&format!("CPUs:       {} logical", nproc())),
        "{text}"
    );
    assert!(
        text.contains("NUMA nodes:") && text.contains("GPUs:"),
        "{text}"
    );
    assert!(
        text.contains("reachable (rivernode"),
        "host reaches the runner API: {text}"
    );

    let o = cli(&["--data-dir", data_s, "node", "list"]);
    let table = stdout(&o);
    assert!(table.starts_with("NAME"), "{table}");
    assert!(table.lines().nth(1).unwrap().starts_with("solo"), "{table}");

    // up tells a newcomer what to type next.
    let said = std::fs::read_to_string(&up.stdout).unwrap();
    assert!(
        said.contains(&format!("rivernode --data-dir {data_s} node list")),
        "{said}"
    );

    // Secrets are private.
    runner_credential(&data);
    use std::os::unix::fs::PermissionsExt;
    for f in ["admin.token", "join.token", "host.db", "runner/node.json"] {
        let mode = std::fs::metadata(data.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
}

#[test]
fn runner_registers_heartbeats_goes_offline_and_comes_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (_host, url) = start_host(tmp.path());
    let host_data = tmp.path().join("host");
    let join = host_data.join("join.token");

    let mut runner = start_runner(tmp.path(), "r1", &url, &join, "node-a");
    let first = wait_for("node-a online", || {
        let l = nodes(&host_data);
        node(&l, "node-a").filter(|n| alive(n)).cloned()
    });
    let registered_at = first["registered_at_unix_ms"].as_i64().unwrap();
    let beat0 = first["last_heartbeat_unix_ms"].as_i64().unwrap();
    // Heartbeats keep arriving and carry usage.
    let later = wait_for("a later heartbeat", || {
        let l = nodes(&host_data);
        node(&l, "node-a")
            .filter(|n| {
                n["last_heartbeat_unix_ms"].as_i64().unwrap() > beat0 && !n["usage"].is_null()
            })
            .cloned()
    });
    assert_eq!(later["heartbeat_interval_ms"], 200);

    // A crashed runner: the host marks the node offline after 3 silent intervals.
    runner.kill();
    wait_for("node-a offline", || {
        let l = nodes(&host_data);
        node(&l, "node-a")
            .filter(|n| n["state"] == "offline")
            .map(|_| ())
    });
    assert!(host_log_mentions(tmp.path(), "node marked offline"));

    // Restarted with the same data dir it reuses its credential: online again, same registration.
    let _runner = start_runner(tmp.path(), "r1", &url, &join, "node-a");
    let back = wait_for("node-a online again", || {
        let l = nodes(&host_data);
        node(&l, "node-a").filter(|n| alive(n)).cloned()
    });
    assert_eq!(
        back["registered_at_unix_ms"].as_i64().unwrap(),
        registered_at
    );
    assert_eq!(nodes(&host_data).len(), 1);
}

fn host_log_mentions(dir: &std::path::Path, what: &str) -> bool {
    std::fs::read_to_string(dir.join("host.stderr"))
        .unwrap_or_default()
        .contains(what)
}

#[test]
fn a_second_machine_cannot_take_a_registered_name() {
    let tmp = tempfile::tempdir().unwrap();
    let (_host, url) = start_host(tmp.path());
    let host_data = tmp.path().join("host");
    let join = host_data.join("join.token");
    let _r1 = start_runner(tmp.path(), "r1", &url, &join, "node-a");
    wait_for("node-a", || node(&nodes(&host_data), "node-a").map(|_| ()));
    let runner_url = node(&nodes(&host_data), "node-a").unwrap()["runner_url"]
        .as_str()
        .unwrap()
        .to_string();

    // Same name, other data dir (no credential): refused, and the runner says why.
    let mut r2 = start_runner(tmp.path(), "r2", &url, &join, "node-a");
    let status = r2.wait_exit(WAIT).expect("the impostor runner exits");
    assert!(!status.success());
    let log = r2.log_text();
    assert!(log.contains("already registered"), "{log}");
    let l = nodes(&host_data);
    assert_eq!(
        node(&l, "node-a").unwrap()["runner_url"],
        runner_url.as_str(),
        "first node untouched"
    );
}

#[test]
fn a_runner_whose_registration_answer_was_lost_registers_again() {
    // F8d: the host committed the node but its answer never reached the
    // runner (killed before it saved the credential). Its retry must not
    // meet "name taken" forever.
    let tmp = tempfile::tempdir().unwrap();
    let (_host, url) = start_host(tmp.path());
    let host_data = tmp.path().join("host");
    let join = host_data.join("join.token");
    let mut r1 = start_runner(tmp.path(), "r1", &url, &join, "node-l");
    let first = runner_credential(&tmp.path().join("r1"));
    r1.kill();
    std::fs::remove_file(tmp.path().join("r1/runner/node.json")).unwrap();
    let mut r1 = start_runner(tmp.path(), "r1", &url, &join, "node-l");
    let second = runner_credential(&tmp.path().join("r1"));
    assert_ne!(first["credential"], second["credential"], "fresh secrets");
    wait_for("node-l online again", || {
        node(&nodes(&host_data), "node-l")
            .filter(|n| alive(n))
            .map(|_| ())
    });
    assert!(
        r1.wait_exit(Duration::from_millis(500)).is_none(),
        "the runner keeps running: {}",
        r1.log_text()
    );
}

#[test]
fn removed_node_is_forgotten_and_its_credential_revoked() {
    let tmp = tempfile::tempdir().unwrap();
    let (host, url) = start_host(tmp.path());
    let host_data = tmp.path().join("host");
    let hd = host_data.to_str().unwrap();
    let join = host_data.join("join.token");
    let mut r = start_runner(tmp.path(), "r1", &url, &join, "node-b");
    wait_for("node-b", || node(&nodes(&host_data), "node-b").map(|_| ()));
    let cred = runner_credential(&tmp.path().join("r1"));
    r.kill();
    let o = cli(&["--data-dir", hd, "node", "remove", "node-b"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(nodes(&host_data).is_empty());
    let o = cli(&["--data-dir", hd, "node", "status", "node-b"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no node named \"node-b\""),
        "{}",
        stderr(&o)
    );

    // The old credential no longer works.
    let credential = cred["credential"].as_str().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let status = rt.block_on(async {
        reqwest::Client::new()
            .get(format!("{url}/api/whoami"))
            .bearer_auth(credential)
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status.as_u16(), 401);

    // F5: the runner comes back with the join token it has: refused for good.
    let mut r = start_runner(tmp.path(), "r1", &url, &join, "node-b");
    let exit = r.wait_exit(WAIT);
    assert!(exit.is_some_and(|e| !e.success()), "the runner gives up");
    assert!(
        r.log_text().contains("join-token rotate"),
        "{}",
        r.log_text()
    );
    assert!(nodes(&host_data).is_empty(), "the name stays free");
    // A rotated token (written where the runner reads it) brings the node back.
    let o = cli(&[
        "--data-dir",
        hd,
        "node",
        "join-token",
        "rotate",
        "--expires-in",
        "1h",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let new_token = stdout(&o).lines().next().unwrap().to_string();
    assert_eq!(read_trimmed(&join).as_deref(), Some(new_token.as_str()));
    let r = start_runner(tmp.path(), "r1", &url, &join, "node-b");
    wait_for_logged("node-b back", &[&host, &r], || {
        node(&nodes(&host_data), "node-b").map(|_| ())
    });
}

#[test]
fn host_tells_systemd_it_is_ready_once_the_api_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let data = tmp.path().join("data");
    let _host = Daemon::start_with_env(
        tmp.path(),
        "host",
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "host",
            "--config",
            "/dev/null",
            "--bind",
            "127.0.0.1",
            "--api-port",
            "0",
        ],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("a notification from the host");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    // Ready means listening: the API answers right away.
    let o = cli(&[
        "--data-dir",
        data.to_str().unwrap(),
        "node",
        "list",
        "-o",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "[]");
}

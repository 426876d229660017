//! Helpers for tests that start the real `rivernode` binary.
#![allow(dead_code)]

pub mod cluster;
pub mod containerd;
pub mod guest;
pub mod libvirt;
pub mod metrics;
pub mod three;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_rivernode");

/// A daemon started from the binary; killed (SIGKILL) when dropped, so a
/// failing test leaves no process behind. Its stderr goes to a log file.
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
    pub stdout: PathBuf,
}

impl Daemon {
    pub fn start(dir: &Path, label: &str, args: &[&str]) -> Self {
        Self::start_with_env(dir, label, args, &[])
    }

    pub fn start_with_env(dir: &Path, label: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(dir, label, args, env, |_| {})
    }

    /// The daemon's command, adjusted by `prepare` (e.g. to enter a
    /// namespace) before it starts.
    pub fn spawn(
        dir: &Path,
        label: &str,
        args: &[&str],
        env: &[(&str, &str)],
        prepare: impl FnOnce(&mut Command),
    ) -> Self {
        let log = dir.join(format!("{label}.stderr"));
        let stdout = dir.join(format!("{label}.stdout"));
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .envs(env.iter().copied())
            .env("RIVERNODE_LOG", "info")
            .env_remove("RIVERNODE_HOST")
            .env_remove("RIVERNODE_TOKEN")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&log).unwrap());
        prepare(&mut cmd);
        let child = cmd.spawn().expect("start rivernode");
        Self { child, log, stdout }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for a daemon started with `crash_at` to die at its crash point.
    pub fn wait_died_at_crash_point(&mut self) {
        let status = self.wait_exit(Duration::from_secs(60));
        assert!(
            status.is_some(),
            "the daemon should have died at its crash point: {}",
            self.log_text()
        );
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a test runner needs: where it keeps state, who it is, its host, a
/// private containerd and the shared directory; fast heartbeats, 1 s grace.
pub struct RunnerSetup<'a> {
    pub data: &'a Path,
    pub name: &'a str,
    pub host_url: &'a str,
    pub join_file: &'a Path,
    pub containerd: &'a Path,
    pub shared: &'a Path,
}

impl RunnerSetup<'_> {
    /// `rivernode runner` and its flags; add more after them.
    pub fn args(&self) -> Vec<String> {
        let p = |p: &Path| p.to_str().unwrap().to_string();
        [
            "--data-dir",
            &p(self.data),
            "runner",
            "--config",
            "/dev/null",
            "--name",
            self.name,
            "--host-url",
            self.host_url,
            "--join-token-file",
            &p(self.join_file),
            "--runner-port",
            "0",
            "--heartbeat-interval",
            "300ms",
            "--containerd-socket",
            &p(self.containerd),
            "--shared-dir",
            &p(self.shared),
            "--kill-grace",
            "1s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// Starts a runner with `args` and `env` (pairs of owned strings).
pub fn start_runner_daemon(dir: &Path, args: &[String], env: &[(String, String)]) -> Daemon {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Daemon::start_with_env(dir, "runner", &args, &env)
}

/// The environment that makes a runner die at `step` (none: no crash).
pub fn crash_at(step: Option<&str>) -> Vec<(String, String)> {
    step.map(|s| vec![("RIVERNODE_CRASH_AT".to_string(), s.to_string())])
        .unwrap_or_default()
}

/// Runs the CLI to completion.
pub fn cli(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RIVERNODE_HOST")
        .env_remove("RIVERNODE_TOKEN")
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .expect("run rivernode")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// How long a test waits for something that should happen before it calls
/// the thing lost. A bound, never a speed claim: generous, because CI's two
/// cores run four clusters of one test binary at once.
pub const WAIT: Duration = Duration::from_secs(120);

/// Polls `f` until it returns `Some`, failing the test with `what` after `WAIT`.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `wait_for`, and on a timeout the failure shows the daemons' logs: a wait
/// that fails in CI is then explained by its own output.
pub fn wait_for_logged<T>(what: &str, logs: &[&Daemon], mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            let text: Vec<String> = logs
                .iter()
                .map(|d| format!("--- {} ---\n{}", d.log.display(), d.log_text()))
                .collect();
            panic!("timed out waiting for {what}\n{}", text.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Starts `rivernode host` on free ports with a fast liveness check and
/// returns it with its API URL.
pub fn start_host(dir: &Path) -> (Daemon, String) {
    start_host_with(dir, &[])
}

/// `start_host` with more `rivernode host` flags.
pub fn start_host_with(dir: &Path, extra: &[&str]) -> (Daemon, String) {
    let data = dir.join("host");
    let mut args = vec![
        "--data-dir",
        data.to_str().unwrap(),
        "host",
        "--config",
        "/dev/null",
        "--bind",
        "127.0.0.1",
        "--api-port",
        "0",
        "--ssh-proxy-port",
        "0",
        "--liveness-check-interval",
        "100ms",
        "--offline-after-missed",
        "3",
    ];
    args.extend_from_slice(extra);
    let d = Daemon::start(dir, "host", &args);
    let url = wait_for("host api.url", || read_trimmed(&data.join("api.url")));
    (d, url)
}

/// `node list -o json` against a host data dir, parsed.
pub fn nodes(host_data: &Path) -> Vec<serde_json::Value> {
    let o = cli(&[
        "--data-dir",
        host_data.to_str().unwrap(),
        "node",
        "list",
        "-o",
        "json",
    ]);
    assert!(o.status.success(), "node list failed: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("node list JSON")
}

/// A node that heartbeats: online, or degraded (these tests' runners have
/// no containerd unless they are given one, and then say so).
pub fn alive(n: &serde_json::Value) -> bool {
    n["state"] == "online" || (n["state"] == "degraded" && n["degraded"].is_string())
}

pub fn node<'a>(list: &'a [serde_json::Value], name: &str) -> Option<&'a serde_json::Value> {
    list.iter().find(|n| n["name"] == name)
}

/// For a test that needs a real component: returns false (after printing a
/// loud skip line) when it is missing, and fails the test instead when
/// `RIVERNODE_REQUIRE_REAL=1` (as in CI).
pub fn real_part_available(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if std::env::var("RIVERNODE_REQUIRE_REAL").as_deref() == Ok("1") {
        panic!("{what} is required (RIVERNODE_REQUIRE_REAL=1) but missing; scripts/setup.sh --test installs it");
    }
    eprintln!("SKIPPED: {what} is missing on this machine; set RIVERNODE_REQUIRE_REAL=1 to make this a failure");
    false
}

/// Debian 12 (minbase, plus `include`, comma-separated) made at `rootfs`
/// by debootstrap from Debian's mirror; false (a clear skip, or a failure
/// where real parts are required) when debootstrap or the mirror is missing.
pub fn debootstrap(rootfs: &Path, include: &str) -> bool {
    if !real_part_available("debootstrap", command_exists("debootstrap")) {
        return false;
    }
    let o = std::process::Command::new("debootstrap")
        .args([
            "--variant=minbase",
            &format!("--include={include}"),
            "bookworm",
        ])
        .arg(rootfs)
        .arg("http://deb.debian.org/debian")
        .output()
        .unwrap();
    let tail: String = String::from_utf8_lossy(&o.stdout)
        .lines()
        .rev()
        .take(3)
        .collect::<Vec<_>>()
        .join(" | ");
    real_part_available(
        &format!("the Debian mirror for debootstrap (it said: {tail})"),
        o.status.success(),
    )
}

/// Runs `cmd` with `input` on its stdin; its output.
pub fn output_with_stdin(cmd: &mut Command, input: &str) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

pub fn command_exists(name: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Starts `rivernode runner` named `name` with its own data dir `dir/label`,
/// a 200 ms heartbeat and a free runner port.
pub fn start_runner(
    dir: &Path,
    label: &str,
    host_url: &str,
    join_file: &Path,
    name: &str,
) -> Daemon {
    let data = dir.join(label);
    Daemon::start(
        dir,
        label,
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "runner",
            "--config",
            "/dev/null",
            "--name",
            name,
            "--host-url",
            host_url,
            "--join-token-file",
            join_file.to_str().unwrap(),
            "--bind",
            "127.0.0.1",
            "--runner-port",
            "0",
            "--heartbeat-interval",
            "200ms",
        ],
    )
}

/// The credential a runner with data dir `data` saved after registering
/// (written just after the host answered, so it may lag the node list).
pub fn runner_credential(data: &Path) -> serde_json::Value {
    let path = data.join("runner/node.json");
    let text = wait_for("the runner's credential", || read_trimmed(&path));
    serde_json::from_str(&text).expect("node.json")
}

/// A node's inventory for nodes registered over the API alone (no runner):
/// 4 CPUs on one NUMA node, 8 GiB, no GPUs.
pub fn inventory() -> serde_json::Value {
    serde_json::json!({
        "hostname": "m", "kernel": "6.1",
        "cpus": (0..4).map(|i| serde_json::json!({
            "id": i, "core_id": i, "package_id": 0, "numa_node": 0, "thread_siblings": i.to_string(),
        })).collect::<Vec<_>>(),
        "numa_nodes": [{"id": 0, "cpus": "0-3", "memory_total_bytes": 1u64 << 33}],
        "memory_total_bytes": 1u64 << 33,
        "gpus": [],
    })
}

/// Registers node `name` with `inventory()` using the join token; its credential.
pub async fn register(url: &str, join: &str, name: &str) -> String {
    let body = serde_json::json!({
        "name": name, "runner_url": "http://127.0.0.1:9", "heartbeat_interval_ms": 60000,
        "version": "t", "inventory": inventory(),
    });
    let r = reqwest::Client::new()
        .post(format!("{url}/api/nodes/register"))
        .bearer_auth(join)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::CREATED);
    let v: serde_json::Value = r.json().await.unwrap();
    v["credential"].as_str().unwrap().to_string()
}

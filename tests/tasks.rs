//! Command tasks end to end on real parts: the rivernode binary as host and
//! runner, a private containerd with runc, busybox environments built at
//! test time, and the CLI as a user would type it.

mod common;

use std::path::PathBuf;

use common::containerd::{busybox_oci_archive, docker_archive, PrivateContainerd, PrivateRegistry};
use common::*;

struct Cluster {
    // Dropped in this order: runner, host, then containerd (which removes what is left).
    runner: Option<Daemon>,
    _host: Daemon,
    ctd: PrivateContainerd,
    dir: tempfile::TempDir,
    url: String,
    node: String,
    runner_extra: Vec<String>,
    /// Environment of the runner (RIVERNODE_CRASH_AT for crash-point tests).
    runner_env: Vec<(String, String)>,
}

impl Cluster {
    fn start(name: &str) -> Option<Cluster> {
        Self::start_with(name, &[])
    }

    fn start_with(name: &str, runner_extra: &[&str]) -> Option<Cluster> {
        Self::start_opts(name, runner_extra, false)
    }

    /// `frozen`: containerd is stopped (SIGSTOP) before the runner starts,
    /// and the node is awaited degraded, not online.
    fn start_opts(name: &str, runner_extra: &[&str], frozen: bool) -> Option<Cluster> {
        let ctd = PrivateContainerd::start()?;
        ctd.freeze(frozen);
        let dir = tempfile::tempdir().unwrap();
        let envs = dir.path().join("shared/environments");
        std::fs::create_dir_all(&envs).unwrap();
        let oci = busybox_oci_archive(dir.path())?;
        let docker = docker_archive(&oci, dir.path())?;
        std::fs::copy(&oci, envs.join("busybox.tar")).unwrap();
        std::fs::copy(&docker, envs.join("busybox-docker.tar")).unwrap();
        let shared = dir.path().join("shared");
        let (host, url) = start_host_with(dir.path(), &["--shared-dir", shared.to_str().unwrap()]);
        let mut c = Cluster {
            runner: None,
            _host: host,
            ctd,
            dir,
            url,
            node: name.to_string(),
            runner_extra: runner_extra.iter().map(|s| s.to_string()).collect(),
            runner_env: vec![],
        };
        c.start_runner();
        let hd = c.host_data();
        let n = c.node.clone();
        let want = if frozen { "degraded" } else { "online" };
        wait_for_logged(&format!("the node {want}"), &c.daemons(), || {
            node(&nodes(&hd), &n)
                .filter(|v| v["state"] == want)
                .map(|_| ())
        });
        Some(c)
    }

    fn host_data(&self) -> PathBuf {
        self.dir.path().join("host")
    }

    fn start_runner(&mut self) {
        let (data, shared) = (
            self.dir.path().join("runner"),
            self.dir.path().join("shared"),
        );
        let join = self.host_data().join("join.token");
        let mut args = RunnerSetup {
            data: &data,
            name: &self.node,
            host_url: &self.url,
            join_file: &join,
            containerd: &self.ctd.socket,
            shared: &shared,
        }
        .args();
        args.extend(["--bind".to_string(), "127.0.0.1".to_string()]);
        args.extend(self.runner_extra.iter().cloned());
        self.runner = Some(start_runner_daemon(
            self.dir.path(),
            &args,
            &self.runner_env,
        ));
    }

    fn rn(&self, args: &[&str]) -> std::process::Output {
        let data = self.host_data();
        let mut all = vec!["--data-dir", data.to_str().unwrap()];
        all.extend_from_slice(args);
        cli(&all)
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        // Before the subcommand: after `--` it would be part of a task's command.
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        let o = self.rn(&a);
        assert!(o.status.success(), "rivernode {args:?}: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&o)))
    }

    fn submit(&self, args: &[&str]) -> u64 {
        let mut a = vec!["task", "submit"];
        a.extend_from_slice(args);
        self.json(&a)["id"].as_u64().unwrap()
    }

    fn task(&self, id: u64) -> serde_json::Value {
        self.json(&["task", "status", &id.to_string()])
    }

    /// Waits for `state`; a task that ends in another final state fails the test at once.
    /// The host's and the runner's logs, for a failure to show.
    fn daemons(&self) -> Vec<&Daemon> {
        std::iter::once(&self._host)
            .chain(self.runner.as_ref())
            .collect()
    }

    fn wait_state(&self, id: u64, state: &str) -> serde_json::Value {
        wait_for_logged(&format!("task {id} {state}"), &self.daemons(), || {
            let t = self.task(id);
            let s = t["state"].as_str().unwrap_or_default();
            let is_final = ["completed", "failed", "killed", "killed_oom", "deleted"].contains(&s);
            assert!(
                s == state || !is_final,
                "task {id} ended {s}, not {state}: {t}"
            );
            (s == state).then_some(t)
        })
    }
}

fn nproc() -> String {
    String::from_utf8(std::process::Command::new("nproc").output().unwrap().stdout)
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn tasks_complete_fail_and_are_oom_killed_with_logs() {
    common::cluster::private_namespaces(|| {
        let Some(c) = Cluster::start("tasks-a") else {
            return;
        };
        // --wait streams the task's stdout and stderr to ours, each apart,
        // says how it ended on stderr and exits with its code.
        let o = c.rn(&[
            "task",
            "submit",
            "--container",
            "busybox",
            "--wait",
            "--",
            "sh",
            "-c",
            "echo hello; echo oops >&2",
        ]);
        assert!(o.status.success(), "{} {}", stdout(&o), stderr(&o));
        assert_eq!(stdout(&o), "hello\n");
        // (A slow unpack may print its progress first.)
        let said = stderr(&o);
        let phases = [
            "pulling ",
            "fetching ",
            "importing ",
            "storing ",
            "unpacking ",
        ];
        let own = said
            .lines()
            .find(|l| !phases.iter().any(|p| l.starts_with(p)));
        assert_eq!(own, Some("oops"), "{said}");
        assert!(
            stderr(&o).contains("completed (exit code 0)"),
            "{}",
            stderr(&o)
        );
        // While it runs, not only at its end: the first line arrives while the
        // task still sleeps, and it is then killed.
        let mut w = std::process::Command::new(BIN)
            .args(["--data-dir", c.host_data().to_str().unwrap()])
            .args(["task", "submit", "--container", "busybox", "--wait", "--"])
            .args(["sh", "-c", "echo started; sleep 1000; echo never"])
            .env("HOME", "/nonexistent")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(w.stdout.as_mut().unwrap()),
            &mut first,
        )
        .unwrap();
        assert_eq!(first, "started\n");
        // The table shows the cores asked for and the CPUs held apart.
        let table = stdout(&c.rn(&["task", "list", "--state", "running"]));
        let head: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            &head[..6],
            ["ID", "STATE", "NODE", "CORES", "CPU", "LIST"],
            "{table}"
        );
        assert_eq!(row[3], "1", "one core asked for: {table}");
        let running = c.rn(&["-o", "json", "task", "list", "--state", "running"]);
        let running: serde_json::Value = serde_json::from_slice(&running.stdout).unwrap();
        let streaming = running.as_array().unwrap()[0]["id"].as_u64().unwrap();
        assert!(c
            .rn(&["task", "kill", &streaming.to_string()])
            .status
            .success());
        let o = w.wait_with_output().unwrap();
        assert!(!o.status.success(), "a killed task's --wait fails");
        assert!(stderr(&o).contains("killed"), "{}", stderr(&o));
        let o = c.rn(&["task", "logs", "1"]);
        assert_eq!(stdout(&o), "hello\n");
        let o = c.rn(&["task", "logs", "1", "--stderr"]);
        assert_eq!(stdout(&o), "oops\n");

        let id = c.submit(&["--container", "busybox", "--", "sh", "-c", "exit 3"]);
        let t = c.wait_state(id, "failed");
        assert_eq!(t["exit_code"], 3);

        let id = c.submit(&[
            "--container",
            "busybox-docker",
            "--",
            "echo",
            "from a docker archive",
        ]);
        c.wait_state(id, "completed");
        assert_eq!(
            stdout(&c.rn(&["task", "logs", &id.to_string()])),
            "from a docker archive\n"
        );

        let id = c.submit(&[
            "--container",
            "busybox",
            "-m",
            "32M",
            "--",
            "sh",
            "-c",
            "x=$(head -c 100000000 /dev/zero | tr '\\0' a); echo ${#x}",
        ]);
        let t = c.wait_state(id, "killed_oom");
        assert!(t["message"].as_str().unwrap().contains("OOM"), "{t}");

        // Only a child is OOM-killed; the main process goes on and exits 0.
        let id = c.submit(&[
            "--container",
            "busybox",
            "-m",
            "32M",
            "--",
            "sh",
            "-c",
            "head -c 200000000 /dev/zero | tr '\\0' a | sort >/dev/null; echo survived",
        ]);
        let t = c.wait_state(id, "completed");
        assert_eq!(t["exit_code"], 0, "{t}");
        let m = t["message"].as_str().unwrap_or_default();
        assert!(m.contains("OOM-killed") && m.contains("1 process"), "{t}");
        assert_eq!(
            stdout(&c.rn(&["task", "logs", &id.to_string()])),
            "survived\n"
        );

        // The environment and RIVERNODE_* variables reach the task.
        let id = c.submit(&[
            "--container",
            "busybox",
            "-e",
            "GREETING=hi",
            "--",
            "sh",
            "-c",
            "echo $GREETING $RIVERNODE_TASK_ID $RIVERNODE_CORES",
        ]);
        c.wait_state(id, "completed");
        assert_eq!(
            stdout(&c.rn(&["task", "logs", &id.to_string()])),
            format!("hi {id} 1\n")
        );
    });
}

#[test]
fn kill_pause_resume_and_paused_tasks_keep_their_cores() {
    common::cluster::private_namespaces(|| {
        let Some(c) = Cluster::start("tasks-b") else {
            return;
        };
        let all = nproc();
        let big = c.submit(&["--container", "busybox", "-c", &all, "--", "sleep", "1000"]);
        c.wait_state(big, "running");
        c.rn(&["task", "pause", &big.to_string()]);
        c.wait_state(big, "paused");
        // Paused holds its cores: another task waits, saying why.
        let small = c.submit(&["--container", "busybox", "--", "echo", "after"]);
        let t = c.task(small);
        assert_eq!(t["state"], "pending");
        assert!(t["reason"].as_str().unwrap().contains("cores free"), "{t}");
        c.rn(&["task", "resume", &big.to_string()]);
        c.wait_state(big, "running");
        c.rn(&["task", "kill", &big.to_string()]);
        let t = c.wait_state(big, "killed");
        assert_eq!(
            t["exit_code"], 137,
            "sleep as PID 1 ignores SIGTERM: SIGKILL after the 1 s grace"
        );
        // Its cores are free again: the queued task runs.
        c.wait_state(small, "completed");
    });
}

#[test]
fn full_node_tasks_run_one_after_the_other() {
    common::cluster::private_namespaces(|| {
        let Some(c) = Cluster::start("tasks-c") else {
            return;
        };
        let all = nproc();
        let a = c.submit(&["--container", "busybox", "-c", &all, "--", "sleep", "1"]);
        let b = c.submit(&["--container", "busybox", "-c", &all, "--", "true"]);
        let tb = c.task(b);
        assert_eq!(tb["state"], "pending");
        assert!(
            tb["reason"]
                .as_str()
                .unwrap()
                .contains(&format!("0 of {all} cores free")),
            "{tb}"
        );
        let ta = c.wait_state(a, "completed");
        let tb = c.wait_state(b, "completed");
        assert!(
            tb["started_at_unix_ms"].as_i64().unwrap()
                >= ta["finished_at_unix_ms"].as_i64().unwrap()
        );
    });
}

#[test]
fn a_task_outlives_a_killed_runner_and_its_completion_is_reported() {
    common::cluster::private_namespaces(|| {
        let Some(mut c) = Cluster::start("tasks-d") else {
            return;
        };
        let id = c.submit(&[
            "--container",
            "busybox",
            "--",
            "sh",
            "-c",
            "sleep 3; echo survived",
        ]);
        c.wait_state(id, "running");
        c.runner.as_mut().unwrap().kill();
        // The host notices the silence; the task is lost, not forgotten.
        c.wait_state(id, "lost");
        c.start_runner();
        let t = c.wait_state(id, "completed");
        assert_eq!(t["exit_code"], 0);
        assert_eq!(
            stdout(&c.rn(&["task", "logs", &id.to_string()])),
            "survived\n",
            "logs kept flowing without the runner"
        );
        // Reported once: the runner found nothing left to adopt afterwards.
        let log = std::fs::read_to_string(c.dir.path().join("host.stderr")).unwrap();
        let reports = log.matches(&format!("task={id} state=completed")).count();
        assert_eq!(reports, 1, "{log}");
    });
}

#[test]
fn bad_input_is_refused_and_nothing_is_created() {
    common::cluster::private_namespaces(|| {
        let Some(c) = Cluster::start("tasks-e") else {
            return;
        };
        let cases: [(&[&str], &str); 5] = [
            (
                &["--container", "nope", "--", "true"],
                "no environment named \"nope\"",
            ),
            (
                &["--container", "busybox", "-t", "tasks-e::", "--", "true"],
                "invalid target",
            ),
            (
                &["--container", "busybox", "-t", "ghost", "--", "true"],
                "no node named \"ghost\"",
            ),
            (
                &["--container", "busybox", "-m", "12", "--", "true"],
                "no unit",
            ),
            (
                &["--container", "busybox", "-t", "tasks-e:9", "--", "true"],
                "no NUMA node 9",
            ),
        ];
        for (args, want) in cases {
            let mut a = vec!["task", "submit"];
            a.extend_from_slice(args);
            let o = c.rn(&a);
            assert!(!o.status.success(), "{args:?}");
            let e = stderr(&o);
            assert!(e.contains(want), "{args:?}: {e}");
            assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        }
        let o = c.rn(&["task", "submit", "--container", "busybox", "--"]);
        assert!(!o.status.success(), "an empty command is refused");
        assert_eq!(c.json(&["task", "list"]), serde_json::json!([]));
    });
}

#[test]
fn a_registry_image_is_pulled_and_runs() {
    common::cluster::private_namespaces(|| {
        let Some(reg) = PrivateRegistry::start() else {
            return;
        };
        let addr = reg.addr.clone();
        let Some(c) = Cluster::start_with("tasks-f", &["--insecure-registry", &addr]) else {
            return;
        };
        let oci = c.dir.path().join("shared/environments/busybox.tar");
        let image = reg.push(&oci, "env:1");
        let id = c.submit(&["--image", &image, "--", "echo", "pulled"]);
        c.wait_state(id, "completed");
        assert_eq!(
            stdout(&c.rn(&["task", "logs", &id.to_string()])),
            "pulled\n"
        );
        let bad = c.rn(&["task", "submit", "--image", "not a ref", "--", "true"]);
        assert!(!bad.status.success());
        assert!(stderr(&bad).contains("image.registry"), "{}", stderr(&bad));
    });
}

/// `oci` (an OCI archive) with `size` random bytes more in `/big`, as a new
/// archive: a layer no cache has, too big to pull in an instant.
fn with_random_file(oci: &std::path::Path, dir: &std::path::Path, size: usize) -> PathBuf {
    let run = |c: &mut std::process::Command| {
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "{c:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let img = dir.join("img");
    std::fs::create_dir_all(&img).unwrap();
    run(std::process::Command::new("tar")
        .arg("xf")
        .arg(oci)
        .arg("-C")
        .arg(&img));
    let layout = format!("{}:latest", img.display());
    let bundle = dir.join("bundle");
    run(std::process::Command::new("umoci")
        .args(["unpack", "--rootless", "--image", &layout])
        .arg(&bundle));
    let mut noise = vec![0u8; size];
    getrandom::fill(&mut noise).unwrap();
    std::fs::write(bundle.join("rootfs/big"), noise).unwrap();
    run(std::process::Command::new("umoci")
        .args(["repack", "--image", &layout])
        .arg(&bundle));
    let out = dir.join("big.tar");
    run(std::process::Command::new("tar")
        .arg("cf")
        .arg(&out)
        .arg("-C")
        .arg(&img)
        .arg("."));
    out
}

/// A loopback relay to `to` that sends what comes back at about
/// `per_second` bytes a second (a slow link to a registry); its address.
fn throttled_relay(to: String, per_second: usize) -> String {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for client in l.incoming().flatten() {
            let Ok(server) = std::net::TcpStream::connect(&to) else {
                continue;
            };
            let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_in, &mut s_out);
                let _ = s_out.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_in, mut c_out) = (server, client);
            std::thread::spawn(move || {
                let chunk = (per_second / 16).max(1);
                let mut buf = vec![0u8; chunk];
                while let Ok(n) = s_in.read(&mut buf) {
                    if n == 0 || c_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1000 / 16));
                }
                let _ = c_out.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// The percentages of the `phase` lines a waiting CLI printed.
fn progress_lines(err: &str, phase: &str, image: &str) -> Vec<u64> {
    err.lines()
        .filter(|l| l.starts_with(&format!("{phase} {image}: ")))
        .filter_map(|l| l.rsplit_once('(')?.1.strip_suffix("%)")?.parse().ok())
        .collect()
}

#[test]
fn a_slow_pull_shows_how_far_it_got_while_the_cli_waits() {
    // The VPS's network is made in namespaces of the test's own.
    if !common::cluster::parts_present() {
        return;
    }
    common::cluster::private_namespaces(|| {
        let Some(reg) = PrivateRegistry::start() else {
            return;
        };
        // About 4 s for each 3 MiB layer: long enough for several words of progress.
        let relay = throttled_relay(reg.addr.clone(), 768 << 10);
        let Some(c) = Cluster::start_with("tasks-p", &["--insecure-registry", &relay]) else {
            return;
        };
        let oci = c.dir.path().join("shared/environments/busybox.tar");
        for tag in ["big:1", "big:2"] {
            let dir = c.dir.path().join(tag.replace(':', "-"));
            reg.push(&with_random_file(&oci, &dir, 3 << 20), tag);
        }
        // A command: `--wait` shows the pull, then the task's own output.
        let image = format!("{relay}/big:1");
        let o = c.rn(&[
            "task", "submit", "--wait", "--image", &image, "--", "echo", "ran",
        ]);
        let err = stderr(&o);
        assert!(o.status.success(), "{err}");
        assert_eq!(stdout(&o), "ran\n");
        let seen = progress_lines(&err, "pulling", &image);
        assert!(seen.len() >= 2, "several words of the pull: {err}");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{err}");
        assert!(
            seen.iter().any(|p| (1..100).contains(p)),
            "part of the way: {err}"
        );
        // A VPS: `vps create` waits while its node pulls, then says how to log in.
        let key = c.dir.path().join("vps.key");
        let image = format!("{relay}/big:2");
        let o = c.rn(&[
            "vps",
            "create",
            "--image",
            &image,
            "--gen-ssh-key",
            "--key-out-file",
            key.to_str().unwrap(),
        ]);
        let err = stderr(&o);
        assert!(o.status.success(), "{err}");
        assert!(progress_lines(&err, "pulling", &image).len() >= 2, "{err}");
        let out = stdout(&o);
        assert!(out.contains(" running"), "it waited until it ran: {out}");
        assert!(
            out.contains(&format!("-i {}", key.display())),
            "how to log in with the key it wrote: {out}"
        );
        // Once made, a task says nothing more of its making.
        let id = out.split_whitespace().nth(1).unwrap();
        assert!(c.json(&["task", "status", id]).get("progress").is_none());
        // `env import` shows its copy the same way.
        let o = c.rn(&["env", "import", "again", oci.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("copying environment again: ") && stderr(&o).contains("(100%)"),
            "{}",
            stderr(&o)
        );
        let o = c.rn(&["env", "import", "none", "/nonexistent.tar"]);
        assert!(
            stderr(&o).contains("/nonexistent.tar: no such file"),
            "{}",
            stderr(&o)
        );
        let o = c.rn(&["vps", "delete", id]);
        assert!(o.status.success(), "{}", stderr(&o));
        c.wait_state(id.parse().unwrap(), "deleted");
    });
}

/// A registry that misbehaves on purpose: for the tag `realm` it names a
/// token endpoint elsewhere on this machine (the canary, which records any
/// visit); for `huge` it sends a manifest that never ends; for `slow` it
/// sends headers and then nothing (and records that it was asked).
#[allow(clippy::type_complexity)]
fn hostile_registry() -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::io::{Read, Write};
    let canary = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let canary_port = canary.local_addr().unwrap().port();
    let visited = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let v = visited.clone();
    std::thread::spawn(move || {
        for c in canary.incoming().flatten() {
            v.store(true, std::sync::atomic::Ordering::SeqCst);
            drop(c);
        }
    });
    let reg = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = reg.local_addr().unwrap().to_string();
    let slow_asked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow = slow_asked.clone();
    std::thread::spawn(move || {
        for mut c in reg.incoming().flatten() {
            let slow = slow.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let n = c.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                if req.contains("/manifests/slow") {
                    let _ = write!(
                        c,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 1000\r\n\r\n"
                    );
                    slow.store(true, std::sync::atomic::Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_secs(600));
                } else if req.contains("/manifests/realm") {
                    let _ = write!(
                        c,
                        "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://127.0.0.1:{canary_port}/metrics\",service=\"x\"\r\nContent-Length: 0\r\n\r\n"
                    );
                } else {
                    let _ = write!(
                        c,
                        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\n\r\n"
                    );
                    let zeros = vec![b' '; 1 << 16];
                    while c.write_all(&zeros).is_ok() {}
                }
            });
        }
    });
    (addr, visited, slow_asked)
}

#[test]
fn a_hostile_registry_can_neither_aim_the_node_nor_flood_it() {
    common::cluster::private_namespaces(|| {
        let (addr, visited, slow_asked) = hostile_registry();
        let Some(c) = Cluster::start_with("tasks-i", &["--insecure-registry", &addr]) else {
            return;
        };
        let id = c.submit(&["--image", &format!("{addr}/x:realm"), "--", "true"]);
        let t = c.wait_state(id, "failed");
        assert!(
            t["message"]
                .as_str()
                .unwrap_or_default()
                .contains("not HTTPS"),
            "{t}"
        );
        assert!(
            !visited.load(std::sync::atomic::Ordering::SeqCst),
            "the node never called the named endpoint"
        );
        let id = c.submit(&["--image", &format!("{addr}/x:huge"), "--", "true"]);
        let t = c.wait_state(id, "failed");
        assert!(
            t["message"]
                .as_str()
                .unwrap_or_default()
                .contains("larger than"),
            "{t}"
        );
        // Killed while its pull is stalled, a task ends now (not when the
        // registry or the read timeout lets go), and was never running.
        let pulling = |what: &str| {
            wait_for(&format!("the runner is pulling for {what}"), || {
                slow_asked
                    .swap(false, std::sync::atomic::Ordering::SeqCst)
                    .then_some(())
            })
        };
        let id = c.submit(&["--image", &format!("{addr}/x:slow"), "--", "true"]);
        pulling("the task");
        c.rn(&["task", "kill", &id.to_string()]);
        let t = c.wait_state(id, "killed");
        assert!(t["started_at_unix_ms"].is_null(), "{t}");
        // So does a VPS stopped meanwhile (F7).
        let key = c.dir.path().join("slow.key");
        let v = c.json(&[
            "vps",
            "create",
            "--image",
            &format!("{addr}/x:slow"),
            "--gen-ssh-key",
            "--key-out-file",
            key.to_str().unwrap(),
        ]);
        let id = v["id"].as_u64().unwrap();
        pulling("the VPS");
        c.rn(&["vps", "stop", &id.to_string()]);
        let t = c.wait_state(id, "stopped");
        assert!(t["started_at_unix_ms"].is_null(), "{t}");
        let reason = t["message"].as_str().unwrap_or_default();
        assert!(reason.contains("before it started"), "{t}");
    });
}

#[test]
fn a_stalled_runner_brings_its_lost_task_back() {
    common::cluster::private_namespaces(|| {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let Some(c) = Cluster::start("tasks-g") else {
            return;
        };
        let id = c.submit(&["--container", "busybox", "--", "sleep", "1000"]);
        c.wait_state(id, "running");
        // SIGSTOP the runner: heartbeats stop, the host calls the node offline and the task lost.
        let pid = Pid::from_raw(c.runner.as_ref().unwrap().child.id() as i32);
        kill(pid, Signal::SIGSTOP).unwrap();
        c.wait_state(id, "lost");
        kill(pid, Signal::SIGCONT).unwrap();
        // The runner, seeing its running task marked lost, reports it running again.
        c.wait_state(id, "running");
        c.rn(&["task", "kill", &id.to_string()]);
        c.wait_state(id, "killed");
    });
}

impl Cluster {
    fn ctr(&self, args: &[&str]) -> String {
        self.ctd.ctr(args)
    }

    /// Starts the runner again, dying at `step` (or not, with `None`).
    fn restart_runner(&mut self, crash_at: Option<&str>) {
        if let Some(r) = self.runner.as_mut() {
            r.kill();
        }
        self.runner_env = common::crash_at(crash_at);
        self.start_runner();
    }

    fn wait_runner_died(&mut self) {
        self.runner.as_mut().unwrap().wait_died_at_crash_point();
    }
}

#[test]
fn work_accepted_before_a_runner_crash_runs_exactly_once() {
    common::cluster::private_namespaces(|| {
        // Kill the runner at each step of a command's start (and right after its
        // end was reported): each task still runs, once, and nothing is left.
        let Some(mut c) = Cluster::start("tasks-h") else {
            return;
        };
        // The admin's part of the share is what its tasks see at /shared.
        let shared = c.dir.path().join("shared/admin");
        for step in ["imported", "created", "started", "reported"] {
            c.restart_runner(Some(step));
            let id = c.submit(&[
                "--container",
                "busybox",
                "--",
                "sh",
                "-c",
                "echo ran >> /shared/once-$RIVERNODE_TASK_ID; sleep 1",
            ]);
            c.wait_runner_died();
            c.restart_runner(None);
            let t = c.wait_state(id, "completed");
            assert_eq!(t["exit_code"], 0, "{step}: {t}");
            let ran =
                std::fs::read_to_string(shared.join(format!("once-{id}"))).unwrap_or_default();
            assert_eq!(ran, "ran\n", "{step}: the task ran exactly once");
            // Its container went (after "reported", by the restarted runner's sweep).
            wait_for(&format!("{step}: no container left"), || {
                c.ctr(&["containers", "ls", "-q"])
                    .trim()
                    .is_empty()
                    .then_some(())
            });
        }
    });
}

#[test]
fn a_node_whose_containerd_stops_answering_is_degraded_and_gets_nothing_new() {
    common::cluster::private_namespaces(|| {
        let Some(c) = Cluster::start("tasks-deg") else {
            return;
        };
        c.ctd.freeze(true);
        degraded_until_containerd_answers(&c);
    });
}

/// A runner that starts while containerd accepts its socket and never
/// answers still beats: the node is degraded, never offline, and takes
/// work once containerd answers (a CI run lost the race of the test above
/// to this: the first connect hung the heartbeat loop).
#[test]
fn a_runner_started_while_containerd_hangs_keeps_beating() {
    common::cluster::private_namespaces(|| {
        let Some(c) = Cluster::start_opts("tasks-hang", &[], true) else {
            return;
        };
        degraded_until_containerd_answers(&c);
        let host_log = c._host.log_text();
        assert!(!host_log.contains("marked offline"), "{host_log}");
    });
}

/// With `c`'s containerd frozen: the node turns degraded naming
/// containerd, gets no task, and runs it once containerd answers again.
fn degraded_until_containerd_answers(c: &Cluster) {
    let hd = c.host_data();
    let n = wait_for_logged("the node degraded", &c.daemons(), || {
        node(&nodes(&hd), &c.node)
            .filter(|v| v["state"] == "degraded")
            .cloned()
    });
    let why = n["degraded"].as_str().unwrap_or_default();
    assert!(why.contains("containerd"), "{n}");
    let o = c.rn(&["node", "list"]);
    assert!(
        stdout(&o).contains("degraded") && stdout(&o).contains("PROBLEM"),
        "{}",
        stdout(&o)
    );
    // Nothing new is placed there, and the task says why it waits.
    let id = c.submit(&["--container", "busybox", "--", "echo", "after"]);
    let t = wait_for_logged("the reason", &c.daemons(), || {
        let t = c.task(id);
        t["reason"]
            .as_str()
            .is_some_and(|r| r.contains("degraded"))
            .then_some(t)
    });
    assert_eq!(t["state"], "pending", "{t}");
    // containerd answers again: the node is online and the task runs.
    c.ctd.freeze(false);
    c.wait_state(id, "completed");
    let n = node(&nodes(&hd), &c.node).cloned().unwrap();
    assert_eq!(n["state"], "online", "{n}");
    assert!(n.get("degraded").is_none(), "{n}");
}

/// CPU numbers of a kernel cpulist ("0-3,6").
fn cpulist(s: &str) -> std::collections::BTreeSet<u32> {
    s.trim()
        .split(',')
        .filter(|p| !p.is_empty())
        .flat_map(|p| match p.split_once('-') {
            Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<u32>>(),
            None => vec![p.parse().unwrap()],
        })
        .collect()
}

#[test]
fn tasks_on_shared_cores_run_on_the_unreserved_ones_and_follow_them() {
    common::cluster::private_namespaces(|| {
        let online = cpulist(&std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap());
        if online.len() < 2 {
            eprintln!("SKIP: shared cores need a machine with two CPUs or more");
            return;
        }
        let Some(c) = Cluster::start("tasks-shr") else {
            return;
        };
        let hold = c.submit(&["--container", "busybox", "-c", "1", "--", "sleep", "600"]);
        let t = c.wait_state(hold, "running");
        let held = cpulist(t["placement"]["cpus"].as_str().unwrap());
        let shared = c.submit(&[
            "--container",
            "busybox",
            "-c",
            "0",
            "--",
            "sh",
            "-c",
            "while true; do grep Cpus_allowed_list /proc/self/status; sleep 0.2; done",
        ]);
        let t = c.wait_state(shared, "running");
        assert_eq!(t["placement"]["cpus"], "", "no cores of its own: {t}");
        let allowed = |want: &std::collections::BTreeSet<u32>| {
            let runner: Vec<&Daemon> = c.runner.iter().collect();
            wait_for_logged(&format!("task {shared} on cpus {want:?}"), &runner, || {
                let logs = stdout(&c.rn(&["task", "logs", &shared.to_string()]));
                let last = logs
                    .lines()
                    .rev()
                    .find(|l| l.contains("Cpus_allowed_list"))?;
                let now = cpulist(last.split_once(':')?.1);
                (now == *want).then_some(())
            })
        };
        // Every CPU but the one the exclusive task holds...
        let unreserved: std::collections::BTreeSet<u32> =
            online.difference(&held).copied().collect();
        allowed(&unreserved);
        let list = stdout(&c.rn(&["task", "list"]));
        assert!(list.contains("shared"), "{list}");
        // ...and all of them once it is gone.
        let o = c.rn(&["task", "kill", &hold.to_string()]);
        assert!(o.status.success(), "{}", stderr(&o));
        c.wait_state(hold, "killed");
        allowed(&online);
        let o = c.rn(&["task", "kill", &shared.to_string()]);
        assert!(o.status.success(), "{}", stderr(&o));
    });
}

/// Runs `cmd ARGS`; it must succeed.
fn must(cmd: &str, args: &[&str]) {
    let o = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(o.status.success(), "{cmd} {args:?}: {}", stderr(&o));
}

#[test]
fn a_command_task_reaches_another_network_through_masquerade_unless_it_has_none() {
    common::cluster::private_namespaces(|| {
        let Some(c) = Cluster::start("tasks-net") else {
            return;
        };
        // A web server in a network namespace of its own, joined to this
        // one by a veth. It has no route to the instances' subnet: only the
        // node's masquerade brings its answers back.
        let ns = Reaped(
            std::process::Command::new("unshare")
                .args(["--net", "sleep", "600"])
                .spawn()
                .unwrap(),
        );
        let pid = ns.0.id().to_string();
        // thread-self, not self: this thread has a namespace of its own
        // (private_namespaces), and /proc/self names the main thread, so
        // comparing with it would pass before `unshare` had run.
        let ours = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
        wait_for("the server's namespace", || {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
            (theirs != ours).then_some(())
        });
        must(
            "ip",
            &[
                "link", "add", "rn-up", "type", "veth", "peer", "name", "rn-srv",
            ],
        );
        must("ip", &["link", "set", "rn-srv", "netns", &pid]);
        must("ip", &["addr", "add", "192.0.2.1/24", "dev", "rn-up"]);
        must("ip", &["link", "set", "rn-up", "up"]);
        for args in [
            &["ip", "addr", "add", "192.0.2.2/24", "dev", "rn-srv"][..],
            &["ip", "link", "set", "rn-srv", "up"],
            &["ip", "link", "set", "lo", "up"],
        ] {
            let mut a = vec!["-t", pid.as_str(), "-n"];
            a.extend_from_slice(args);
            must("nsenter", &a);
        }
        let www = c.dir.path().join("www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("index.html"), "from-the-other-side\n").unwrap();
        let _server = Reaped(
            std::process::Command::new("nsenter")
                .args([
                    "-t", &pid, "-n", "busybox", "httpd", "-f", "-p", "8080", "-h",
                ])
                .arg(&www)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let id = c.submit(&[
            "--container",
            "busybox",
            "--",
            "sh",
            "-c",
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 192.0.2.2 8080 | tail -n 1",
        ]);
        c.wait_state(id, "completed");
        let logs = c.rn(&["task", "logs", &id.to_string()]);
        assert_eq!(stdout(&logs), "from-the-other-side\n");
        // A command publishes a port too: reached at the host's address.
        let web = c.submit(&[
            "--container",
            "busybox",
            "-p",
            "8090",
            "--",
            "sh",
            "-c",
            "mkdir -p /tmp/w && echo task-served > /tmp/w/index.html && exec httpd -f -p 8090 -h /tmp/w",
        ]);
        c.wait_state(web, "running");
        let line = stdout(&c.rn(&["task", "ports", &web.to_string()]));
        let ext: u16 = line
            .split_once(" -> 8090/tcp")
            .and_then(|(outside, _)| outside.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or_else(|| panic!("no 8090 in {line:?}"));
        let page = wait_for("the task's published port", || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", ext)).ok()?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            out.contains("task-served").then_some(out)
        });
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        c.rn(&["task", "kill", &web.to_string()]);
        c.wait_state(web, "killed");
        wait_for("the port to close with the task", || {
            std::net::TcpStream::connect(("127.0.0.1", ext))
                .is_err()
                .then_some(())
        });
        // The same with --network none: loopback only, so nothing answers.
        let none = c.submit(&[
            "--container",
            "busybox",
            "--network",
            "none",
            "--",
            "sh",
            "-c",
            "echo routes:$(cat /proc/net/route | wc -l); printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 192.0.2.2 8080",
        ]);
        let t = c.wait_state(none, "failed");
        assert_ne!(t["exit_code"], 0, "{t}");
        let logs = c.rn(&["task", "logs", &none.to_string()]);
        assert_eq!(stdout(&logs), "routes:1\n", "only the header: no routes");
    });
}

/// A child killed and reaped when the test ends, also when it fails.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

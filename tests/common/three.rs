//! A three-node cluster on one machine: the host and three nodes each in
//! its own network namespace, joined by veth to an underlay bridge in the
//! test's own (private) namespace, as machines on a switch. Each node has
//! its own runner, private containerd and data directory; they share only
//! the environments directory (a test that needs none of it ignores it).
//! Cutting a node off is taking its veth down.
//!
//! Call `ThreeNodes::start` inside `private_namespaces`: the bridge and the
//! named namespaces live and die with the test.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::containerd::{busybox_oci_archive, PrivateContainerd};
use super::*;

/// The nodes' names and their addresses on the underlay (the host is .1).
pub const NODES: [(&str, &str); 3] = [
    ("n1", "10.77.0.11"),
    ("n2", "10.77.0.12"),
    ("n3", "10.77.0.13"),
];
pub const HOST_IP: &str = "10.77.0.1";
const BRIDGE: &str = "rnul0";

/// Fields drop in this order: the daemons (killed), the containerds (their
/// containers removed), the directories, then the network.
pub struct ThreeNodes {
    pub host: Daemon,
    pub runners: Vec<Daemon>,
    pub ctds: Vec<PrivateContainerd>,
    pub dir: tempfile::TempDir,
    pub url: String,
    _net: Network,
    /// One cluster at a time in this process: every cluster's nodes are
    /// n1..n3 and its tasks count from 1, so two at once would name the
    /// same containers and cgroups (which are machine-wide).
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

/// The bridge and the named namespaces, removed however the test ends
/// (also when starting the cluster fails halfway).
struct Network {
    netns: Vec<String>,
}

impl Drop for Network {
    fn drop(&mut self) {
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).status();
    }
}

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().unwrap();
    assert!(o.status.success(), "ip {args:?}: {}", stderr(&o));
}

/// Starts `rivernode ARGS` inside the network namespace `/run/netns/NAME`
/// (the mount namespace stays the test's, so the runner's instance
/// namespaces and mounts are the ones its containerd sees).
fn start_in(dir: &Path, label: &str, netns: &str, args: &[String]) -> Daemon {
    let ns = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
    let fd = ns.as_raw_fd();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::spawn(dir, label, &args, &[], |cmd| {
        // SAFETY: runs in the child between fork and exec, calling only
        // setns(2) (async-signal-safe) on a descriptor the parent keeps
        // open until spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(
                    BorrowedFd::borrow_raw(fd),
                    nix::sched::CloneFlags::CLONE_NEWNET,
                )
                .map_err(std::io::Error::from)
            });
        }
    });
    drop(ns);
    d
}

impl ThreeNodes {
    /// `None` (after a skip line) where containerd or runc is missing.
    pub fn start() -> Option<ThreeNodes> {
        Self::start_with(true)
    }

    /// With `shared_dir` false, each node has a shared directory of its
    /// own (empty): environments come from the host.
    pub fn start_with(shared_dir: bool) -> Option<ThreeNodes> {
        Self::start_opts(shared_dir, &[])
    }

    /// With `host_extra` flags for the host (`--overlay-range R`, ...).
    pub fn start_opts(shared_dir: bool, host_extra: &[&str]) -> Option<ThreeNodes> {
        let one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let dir = tempfile::tempdir().unwrap();
        let envs = dir.path().join("shared/environments");
        std::fs::create_dir_all(&envs).unwrap();
        let oci = busybox_oci_archive(dir.path())?;
        std::fs::copy(&oci, envs.join("busybox.tar")).unwrap();
        let mut ctds = Vec::new();
        for _ in NODES {
            ctds.push(PrivateContainerd::start()?);
        }

        // The switch, and a port on it for the host and each node.
        let mut net = Network { netns: Vec::new() };
        ip(&["link", "add", BRIDGE, "type", "bridge"]);
        ip(&["addr", "add", "10.77.0.254/24", "dev", BRIDGE]);
        ip(&["link", "set", BRIDGE, "up"]);
        // Named namespaces are files under /run/netns, shared by every
        // test of this process: each cluster's names are its own.
        static CLUSTERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let tag = format!(
            "{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let members = std::iter::once(("host", HOST_IP)).chain(NODES);
        for (name, addr) in members {
            let ns = format!("rn3-{tag}-{name}");
            ip(&["netns", "add", &ns]);
            net.netns.push(ns.clone());
            let port = format!("v3-{name}");
            ip(&[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &port, "master", BRIDGE, "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }

        let data = dir.path().join("host");
        let shared = dir.path().join("shared");
        let s = |p: &Path| p.to_str().unwrap().to_string();
        let host_args: Vec<String> = [
            "--data-dir",
            &s(&data),
            "host",
            "--config",
            "/dev/null",
            "--bind",
            HOST_IP,
            "--api-port",
            "8000",
            "--ssh-proxy-port",
            "8002",
            "--liveness-check-interval",
            "200ms",
            // 3 s of silence: a loaded 2-core machine misses a beat or two.
            "--offline-after-missed",
            "10",
            "--shared-dir",
            &s(&shared),
            "--approval",
            "none",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain(host_extra.iter().map(|a| a.to_string()))
        .collect();
        let host = start_in(dir.path(), "host", &net.netns[0], &host_args);
        let url = wait_for("host api.url", || read_trimmed(&data.join("api.url")));
        let join = data.join("join.token");
        wait_for("the join token", || join.exists().then_some(()));

        let mut runners = Vec::new();
        for (i, (name, addr)) in NODES.iter().enumerate() {
            let runner_data = dir.path().join(format!("runner-{name}"));
            let own = dir.path().join(format!("shared-{name}"));
            let node_shared = if shared_dir { shared.clone() } else { own };
            let mut args = RunnerSetup {
                data: &runner_data,
                name,
                host_url: &url,
                join_file: &join,
                containerd: &ctds[i].socket,
                shared: &node_shared,
            }
            .args();
            // Each node's own port 8001 on its own address.
            let at = args.iter().position(|a| a == "--runner-port").unwrap();
            args[at + 1] = "8001".into();
            args.extend(
                [
                    "--bind",
                    addr,
                    "--instance-bridge",
                    "rvt9",
                    "--instance-subnet",
                    "10.253.0.0/24",
                ]
                .iter()
                .map(|a| a.to_string()),
            );
            runners.push(start_in(
                dir.path(),
                &format!("runner-{name}"),
                &net.netns[i + 1],
                &args,
            ));
        }
        let c = ThreeNodes {
            host,
            runners,
            ctds,
            dir,
            url,
            _net: net,
            _one_at_a_time: one_at_a_time,
        };
        for (name, _) in NODES {
            c.wait_node(name, "online");
        }
        Some(c)
    }

    /// A user named `name`; their token.
    pub fn add_user(&self, name: &str) -> String {
        let o = self.rn(&["-o", "json", "user", "add", name]);
        assert!(o.status.success(), "{}", stderr(&o));
        let u: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        u["token"].as_str().unwrap().to_string()
    }

    pub fn host_data(&self) -> PathBuf {
        self.dir.path().join("host")
    }

    /// `rivernode ARGS` as the admin.
    pub fn rn(&self, args: &[&str]) -> Output {
        let data = self.host_data();
        let mut a = vec!["--data-dir", data.to_str().unwrap()];
        a.extend_from_slice(args);
        cli(&a)
    }

    /// Every daemon's log, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = format!("--- host ---\n{}", self.host.log_text());
        for (r, (name, _)) in self.runners.iter().zip(NODES) {
            out.push_str(&format!("\n--- runner {name} ---\n{}", r.log_text()));
        }
        out
    }

    fn daemons(&self) -> Vec<&Daemon> {
        std::iter::once(&self.host).chain(&self.runners).collect()
    }

    /// The task's JSON as the host reports it.
    pub fn task(&self, id: &str) -> serde_json::Value {
        let o = self.rn(&["-o", "json", "task", "status", id]);
        serde_json::from_slice(&o.stdout).unwrap_or_default()
    }

    pub fn wait_state(&self, id: &str, want: &str) {
        wait_for_logged(&format!("task {id} {want}"), &self.daemons(), || {
            let s = self.task(id)["state"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if s == "failed" && want != "failed" {
                panic!("task {id} failed: {}\n{}", self.task(id), self.logs());
            }
            (s == want).then_some(())
        });
    }

    pub fn wait_node(&self, name: &str, want: &str) {
        let hd = self.host_data();
        wait_for_logged(&format!("node {name} {want}"), &self.daemons(), || {
            let list = nodes(&hd);
            let n = node(&list, name)?;
            (n["state"] == want).then_some(())
        });
    }

    /// Cuts node `name` off the switch (`false`), or plugs it back in.
    pub fn link(&self, name: &str, up: bool) {
        ip(&[
            "link",
            "set",
            &format!("v3-{name}"),
            if up { "up" } else { "down" },
        ]);
    }

    /// `CMD ARGS` run inside node `name`'s network namespace; its output.
    pub fn on_node(&self, name: &str, cmd: &[&str]) -> String {
        let i = NODES.iter().position(|(n, _)| *n == name).unwrap();
        let o = Command::new("ip")
            .args(["netns", "exec", &self._net.netns[i + 1]])
            .args(cmd)
            .output()
            .unwrap();
        format!("{}{}", stdout(&o), stderr(&o))
    }

    /// The runner of node `name`.
    pub fn runner(&self, name: &str) -> &Daemon {
        let i = NODES.iter().position(|(n, _)| *n == name).unwrap();
        &self.runners[i]
    }

    /// The containerd of node `name`.
    pub fn ctd(&self, name: &str) -> &PrivateContainerd {
        let i = NODES.iter().position(|(n, _)| *n == name).unwrap();
        &self.ctds[i]
    }
}

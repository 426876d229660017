//! A one-node cluster for VPS tests, inside private network and mount
//! namespaces made for each test: a private containerd, the rivernode
//! binary as host and runner, a busybox environment, and the CLI.

use std::path::PathBuf;
use std::process::Output;

use super::containerd::{busybox_oci_archive, PrivateContainerd};
use super::*;

pub fn private_namespaces<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        use nix::sched::CloneFlags;
        nix::sched::unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS)
            .expect("unshare (root needed)");
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .unwrap();
        assert!(std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success());
        f()
    })
    .join()
    .unwrap()
}

pub fn parts_present() -> bool {
    let present = ["ssh", "scp", "ssh-keygen", "dropbearkey", "nft", "ip"]
        .iter()
        .all(|c| command_exists(c))
        && std::path::Path::new("/usr/sbin/dropbear").exists();
    real_part_available("openssh-client, dropbear-bin, nftables, iproute2", present)
}

/// A one-node cluster whose daemons run in the caller's (private) namespaces.
pub struct Vps {
    pub runner: Option<Daemon>,
    pub host: Daemon,
    pub ctd: PrivateContainerd,
    pub dir: tempfile::TempDir,
    pub url: String,
    pub node: String,
    pub key: PathBuf,
    pub known_hosts: PathBuf,
    /// Environment of the runner (e.g. RIVERNODE_CRASH_AT for crash-point tests).
    pub runner_env: Vec<(String, String)>,
    /// More runner flags (a fake sysfs, CDI spec directories).
    pub runner_extra: Vec<String>,
}

impl Vps {
    pub fn start(node: &str) -> Option<Vps> {
        Self::start_with(node, &[])
    }

    pub fn start_with(node: &str, host_extra: &[&str]) -> Option<Vps> {
        Self::start_full(node, host_extra, &[])
    }

    /// A cluster whose runner gets `runner_extra` flags too.
    pub fn start_full(node: &str, host_extra: &[&str], runner_extra: &[String]) -> Option<Vps> {
        let ctd = PrivateContainerd::start()?;
        let dir = tempfile::tempdir().unwrap();
        let envs = dir.path().join("shared/environments");
        std::fs::create_dir_all(&envs).unwrap();
        let oci = busybox_oci_archive(dir.path())?;
        std::fs::copy(&oci, envs.join("busybox.tar")).unwrap();
        let data = dir.path().join("host");
        let shared = dir.path().join("shared");
        // Listening on every address of this private namespace, as in production.
        let mut host_args = vec![
            "--data-dir",
            data.to_str().unwrap(),
            "host",
            "--config",
            "/dev/null",
            "--api-port",
            "0",
            "--ssh-proxy-port",
            "0",
            "--liveness-check-interval",
            "200ms",
            "--shared-dir",
            shared.to_str().unwrap(),
        ];
        host_args.extend_from_slice(host_extra);
        let host = Daemon::start(dir.path(), "host", &host_args);
        let url = wait_for("host api.url", || read_trimmed(&data.join("api.url")));
        let mut v = Vps {
            runner: None,
            host,
            ctd,
            key: dir.path().join("key"),
            known_hosts: dir.path().join("known_hosts"),
            dir,
            url,
            node: node.into(),
            runner_env: vec![],
            runner_extra: runner_extra.to_vec(),
        };
        v.start_runner();
        let (hd, n) = (v.host_data(), v.node.clone());
        let logs: Vec<&Daemon> = std::iter::once(&v.host).chain(v.runner.as_ref()).collect();
        wait_for_logged("the node", &logs, move || node_of(&hd, &n));
        Some(v)
    }

    pub fn host_data(&self) -> PathBuf {
        self.dir.path().join("host")
    }

    pub fn runner_data(&self) -> PathBuf {
        self.dir.path().join("runner")
    }

    /// The logs of the host and the runner, for a failure message.
    pub fn logs(&self) -> String {
        let runner = self
            .runner
            .as_ref()
            .map(Daemon::log_text)
            .unwrap_or_default();
        format!(
            "--- host ---\n{}\n--- runner ---\n{runner}",
            self.host.log_text()
        )
    }

    pub fn start_runner(&mut self) {
        let (data, shared) = (self.runner_data(), self.dir.path().join("shared"));
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
        for a in [
            "--instance-bridge",
            "rvt9",
            "--instance-subnet",
            "10.253.0.0/24",
        ] {
            args.push(a.to_string());
        }
        args.extend(self.runner_extra.iter().cloned());
        self.runner = Some(start_runner_daemon(
            self.dir.path(),
            &args,
            &self.runner_env,
        ));
    }

    pub fn rn(&self, args: &[&str]) -> Output {
        let data = self.host_data();
        let mut a = vec!["--data-dir", data.to_str().unwrap()];
        a.extend_from_slice(args);
        cli(&a)
    }

    /// `rivernode ARGS` as the user whose token is `token`.
    pub fn rn_as(&self, token: &str, args: &[&str]) -> Output {
        let mut a = vec!["--token", token];
        a.extend_from_slice(args);
        self.rn(&a)
    }

    pub fn state(&self, id: &str) -> String {
        let o = self.rn(&["-o", "json", "task", "status", id]);
        let t: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        t["state"].as_str().unwrap_or_default().to_string()
    }

    pub fn wait_state(&self, id: &str, want: &str) {
        let logs: Vec<&Daemon> = std::iter::once(&self.host)
            .chain(self.runner.as_ref())
            .collect();
        wait_for_logged(&format!("vps {id} {want}"), &logs, || {
            let s = self.state(id);
            if s == "failed" && want != "failed" {
                let o = self.rn(&["-o", "json", "task", "status", id]);
                panic!("task {id} failed: {}", stdout(&o));
            }
            (s == want).then_some(())
        });
    }

    /// Creates a busybox VPS with a generated key; returns its id once running.
    pub fn create(&self) -> String {
        self.create_with(&[])
    }

    /// `create` with more `vps create` flags (e.g. `-m 64M`).
    pub fn create_with(&self, extra: &[&str]) -> String {
        self.create_from("busybox", extra)
    }

    /// `create_with` from another environment.
    pub fn create_from(&self, environment: &str, extra: &[&str]) -> String {
        // The first VPS generates the key; later ones take its public half.
        let public = self.key.with_extension("pub");
        let key_args: Vec<&str> = if self.key.exists() {
            vec!["--public-key-file", public.to_str().unwrap()]
        } else {
            vec![
                "--gen-ssh-key",
                "--key-out-file",
                self.key.to_str().unwrap(),
            ]
        };
        let mut args = vec!["-o", "json", "vps", "create", "--container", environment];
        args.extend(key_args);
        args.extend_from_slice(extra);
        let o = self.rn(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let id = created_id(&o);
        self.wait_state(&id, "running");
        id
    }

    pub fn ssh(&self, id: &str, cmd: &[&str]) -> Output {
        let mut a = vec![
            "ssh",
            id,
            "-i",
            self.key.to_str().unwrap(),
            "--known-hosts",
            self.known_hosts.to_str().unwrap(),
            "--",
        ];
        a.extend_from_slice(cmd);
        self.rn(&a)
    }

    /// Writes `rivernode ssh config` entries (with the test's key) to `dir/name`.
    pub fn ssh_config(&self, name: &str) -> PathBuf {
        let cfg = self.dir.path().join(name);
        let o = self.rn(&[
            "ssh",
            "config",
            "--file",
            cfg.to_str().unwrap(),
            "-i",
            self.key.to_str().unwrap(),
            "--known-hosts",
            self.known_hosts.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        cfg
    }

    /// Runs stock `ssh`/`scp` with the entries of `cfg`; its stdout.
    pub fn with_config(cfg: &std::path::Path, args: &[&str]) -> String {
        let o = std::process::Command::new(args[0])
            .args(["-F", cfg.to_str().unwrap(), "-o", "BatchMode=yes"])
            .args(&args[1..])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// scp of `bytes` to `remote` on `entry` and back; the copy that came back.
    pub fn scp_round_trip(
        &self,
        cfg: &std::path::Path,
        entry: &str,
        remote: &str,
        bytes: &[u8],
    ) -> Vec<u8> {
        let src = self.dir.path().join("payload");
        std::fs::write(&src, bytes).unwrap();
        let back = self.dir.path().join("payload.back");
        let there = format!("{entry}:{remote}");
        Self::with_config(cfg, &["scp", "-q", src.to_str().unwrap(), &there]);
        Self::with_config(cfg, &["scp", "-q", &there, back.to_str().unwrap()]);
        std::fs::read(&back).unwrap()
    }

    /// Deletes a VPS and waits until it is gone.
    pub fn delete(&self, id: &str) {
        let o = self.rn(&["vps", "delete", id]);
        assert!(o.status.success(), "{}", stderr(&o));
        self.wait_state(id, "deleted");
    }

    /// Retries while dropbear starts up.
    pub fn ssh_ok(&self, id: &str, cmd: &[&str]) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let o = self.ssh(id, cmd);
            if o.status.success() {
                return stdout(&o);
            }
            if Instant::now() >= deadline {
                panic!("timed out waiting for ssh: {}\n{}", stderr(&o), self.logs());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The id in `vps create -o json`'s answer.
pub fn created_id(o: &Output) -> String {
    assert!(o.status.success(), "{}", stderr(o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    r["id"].as_u64().unwrap().to_string()
}

pub fn node_of(host_data: &std::path::Path, name: &str) -> Option<()> {
    node(&nodes(host_data), name).map(|_| ())
}

pub fn cli_with_stdin(args: &[&str], input: &str) -> Output {
    super::output_with_stdin(
        std::process::Command::new(BIN)
            .args(args)
            .env_remove("RIVERNODE_HOST")
            .env_remove("RIVERNODE_TOKEN")
            .env("HOME", "/nonexistent"),
        input,
    )
}

impl Vps {
    /// `rivernode ssh` with a password typed by an askpass program, no keys.
    pub fn ssh_password(&self, token: &str, id: &str, password: &str, cmd: &str) -> Output {
        let askpass = self.dir.path().join(format!("askpass-{id}"));
        std::fs::write(&askpass, format!("#!/bin/sh\necho '{password}'\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o700)).unwrap();
        let data = self.host_data();
        std::process::Command::new(BIN)
            .args(["--data-dir", data.to_str().unwrap(), "--token", token])
            .args([
                "ssh",
                id,
                "--known-hosts",
                self.known_hosts.to_str().unwrap(),
            ])
            .args(["--", cmd])
            .env("HOME", "/nonexistent")
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env_remove("RIVERNODE_HOST")
            .env_remove("RIVERNODE_TOKEN")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    }

    pub fn add_user(&self, name: &str) -> String {
        let o = self.rn(&["-o", "json", "user", "add", name]);
        assert!(o.status.success(), "{}", stderr(&o));
        let u: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        u["token"].as_str().unwrap().to_string()
    }
}

impl Vps {
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        let o = self.rn(&a);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    pub fn snapshot_ids(&self, id: &str) -> Vec<String> {
        self.json(&["vps", "snapshot", "list", id])
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn ctr(&self, args: &[&str]) -> String {
        self.ctd.ctr(args)
    }
}

impl Vps {
    /// Starts the runner again, dying at `step` (or not, with `None`).
    pub fn restart_runner(&mut self, crash_at: Option<&str>) {
        if let Some(r) = self.runner.as_mut() {
            r.kill();
        }
        self.runner_env = super::crash_at(crash_at);
        self.start_runner();
    }

    /// Waits for the runner to die at its crash point.
    pub fn wait_runner_died(&mut self) {
        self.runner.as_mut().unwrap().wait_died_at_crash_point();
    }

    /// What instances leave on the node: containers, veths, address leases.
    pub fn leftovers(&self) -> (usize, usize, usize) {
        let containers = self.ctr(&["containers", "ls", "-q"]).lines().count();
        let links = std::process::Command::new("ip")
            .args(["-o", "link"])
            .output()
            .unwrap();
        let veths = String::from_utf8_lossy(&links.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .filter(|name| name.starts_with("rv") && !name.starts_with("rvt9"))
            .count();
        let leases = std::fs::read_to_string(self.runner_data().join("runner/ipam.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map(|v| v.as_object().map_or(0, |o| o.len()))
            .unwrap_or(0);
        (containers, veths, leases)
    }
}

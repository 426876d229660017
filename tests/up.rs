//! `rivernode up`, the one-node cluster in one process, on real parts: it
//! takes the runner's settings from its file and the environment, and work
//! it accepted before a SIGKILL runs exactly once after it comes back.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use common::cluster::{parts_present, private_namespaces};
use common::containerd::{busybox_oci_archive, PrivateContainerd};
use common::*;

struct Up {
    daemon: Option<Daemon>,
    /// The node's name; it is part of container ids, which runc keeps machine-wide.
    name: String,
    ctd: PrivateContainerd,
    dir: tempfile::TempDir,
    config: PathBuf,
    env: Vec<(String, String)>,
}

impl Up {
    fn new(name: &str, config: &str, env: &[(&str, &str)]) -> Option<Up> {
        let ctd = PrivateContainerd::start()?;
        let dir = tempfile::tempdir().unwrap();
        let envs = dir.path().join("shared/environments");
        std::fs::create_dir_all(&envs).unwrap();
        let oci = busybox_oci_archive(dir.path())?;
        std::fs::copy(&oci, envs.join("busybox.tar")).unwrap();
        let path = dir.path().join("up.toml");
        std::fs::write(&path, config).unwrap();
        let mut up = Up {
            daemon: None,
            name: name.to_string(),
            ctd,
            dir,
            config: path,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        up.start();
        Some(up)
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn start(&mut self) {
        let (data, shared) = (self.data(), self.dir.path().join("shared"));
        let _ = std::fs::remove_file(data.join("api.url"));
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.daemon = Some(Daemon::start_with_env(
            self.dir.path(),
            "up",
            &[
                "--data-dir",
                data.to_str().unwrap(),
                "up",
                "--config",
                self.config.to_str().unwrap(),
                "--name",
                self.name.as_str(),
                "--api-port",
                "0",
                "--runner-port",
                "0",
                "--ssh-proxy-port",
                "0",
                "--heartbeat-interval",
                "300ms",
                "--kill-grace",
                "1s",
                "--containerd-socket",
                self.ctd.socket.to_str().unwrap(),
                "--shared-dir",
                shared.to_str().unwrap(),
            ],
            &env,
        ));
        wait_for("up's api.url", || read_trimmed(&data.join("api.url")));
        let d = self.daemon.as_mut().unwrap();
        wait_for("the node online", || {
            if let Ok(Some(s)) = d.child.try_wait() {
                panic!("up exited ({s}): {}", d.log_text());
            }
            let o = cli(&[
                "--data-dir",
                data.to_str().unwrap(),
                "-o",
                "json",
                "node",
                "list",
            ]);
            let list: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).ok()?;
            node(&list, &self.name)
                .filter(|n| n["state"] == "online")
                .map(|_| ())
        });
    }

    fn rn(&self, args: &[&str]) -> std::process::Output {
        let data = self.data();
        let mut all = vec!["--data-dir", data.to_str().unwrap()];
        all.extend_from_slice(args);
        cli(&all)
    }

    fn task(&self, id: u64) -> serde_json::Value {
        let o = self.rn(&["-o", "json", "task", "status", &id.to_string()]);
        serde_json::from_slice(&o.stdout).unwrap_or_default()
    }
}

#[test]
fn a_burst_of_submissions_runs_exactly_once_across_a_sigkill_of_up() {
    // Command tasks get the instances' network: the bridge, veths and
    // table go into namespaces made for this test, never the machine's.
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(mut up) = Up::new("up-a", "", &[]) else {
            return;
        };
        let out = up.dir.path().join("shared/admin/burst");
        std::fs::create_dir_all(&out).unwrap();
        let ids = Arc::new(Mutex::new(Vec::<u64>::new()));
        let clients: Vec<_> = (0..2)
            .map(|_| {
                let (ids, data) = (ids.clone(), up.data());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let o = cli(&[
                            "--data-dir",
                            data.to_str().unwrap(),
                            "-o",
                            "json",
                            "task",
                            "submit",
                            "--container",
                            "busybox",
                            "--",
                            "sh",
                            "-c",
                            "echo ran >> /shared/burst/$RIVERNODE_TASK_ID",
                        ]);
                        // While `up` is down a submission fails and gets no id: fine.
                        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) {
                            if let Some(id) = v["id"].as_u64() {
                                ids.lock().unwrap().push(id);
                            }
                        }
                    }
                })
            })
            .collect();
        wait_for("30 submissions accepted", || {
            (ids.lock().unwrap().len() >= 30).then_some(())
        });
        up.daemon.as_mut().unwrap().kill();
        up.start();
        for c in clients {
            c.join().unwrap();
        }
        let ids = ids.lock().unwrap().clone();
        assert!(ids.len() >= 30, "{} accepted", ids.len());
        for id in &ids {
            let t = wait_for(&format!("task {id} ended"), || {
                let t = up.task(*id);
                let s = t["state"].as_str().unwrap_or_default().to_string();
                ["completed", "failed", "killed", "killed_oom"]
                    .contains(&s.as_str())
                    .then_some(t)
            });
            if t["state"] != "completed" {
                let log = up.daemon.as_ref().unwrap().log_text();
                let cid = format!("task-{id}");
                let lines: Vec<&str> = log.lines().filter(|l| l.contains(&cid)).collect();
                panic!("task {id}: {t}\nup's lines on it:\n{}", lines.join("\n"));
            }
            let ran = std::fs::read_to_string(out.join(id.to_string())).unwrap_or_default();
            assert_eq!(ran, "ran\n", "task {id} ran exactly once");
        }
        // No task ran twice, also among those whose answer the crash swallowed.
        for f in std::fs::read_dir(&out).unwrap() {
            let f = f.unwrap().path();
            assert_eq!(
                std::fs::read_to_string(&f).unwrap(),
                "ran\n",
                "{}",
                f.display()
            );
        }
    })
}

#[test]
fn up_takes_the_runner_settings_from_its_file_and_the_environment() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let config = "[runner]\ninstance_bridge = \"rvt6\"\ninstance_subnet = \"10.252.0.0/24\"\n";
        let Some(up) = Up::new(
            "up-b",
            config,
            &[("RIVERNODE_AUTO_SNAPSHOT_ON_STOP", "false")],
        ) else {
            return;
        };
        let key = up.dir.path().join("key");
        let o = up.rn(&[
            "-o",
            "json",
            "vps",
            "create",
            "--container",
            "busybox",
            "--gen-ssh-key",
            "--key-out-file",
            key.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let id = serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["id"]
            .as_u64()
            .unwrap();
        let state = |want: &str| {
            wait_for(&format!("vps {id} {want}"), || {
                (up.task(id)["state"] == want).then_some(())
            })
        };
        state("running");
        let link = std::process::Command::new("ip")
            .args(["link", "show", "rvt6"])
            .output()
            .unwrap();
        assert!(link.status.success(), "the file's instance_bridge is used");
        up.rn(&["vps", "stop", &id.to_string()]);
        state("stopped");
        let o = up.rn(&["-o", "json", "vps", "snapshot", "list", &id.to_string()]);
        let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(
            list.as_array().map(Vec::len),
            Some(0),
            "RIVERNODE_AUTO_SNAPSHOT_ON_STOP=false: no snapshot on stop: {list}"
        );
    });
}

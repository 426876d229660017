//! Submit→running latency of a rivernode task against `ctr run -d` of the
//! same unpacked image on the same private containerd, in the same run,
//! printed side by side with their ratio.
//!
//! `cargo bench --bench task_start` (needs containerd, runc, umoci, skopeo;
//! everything on loopback, bounded iteration count).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::containerd::{busybox_oci_archive, PrivateContainerd};
use common::*;

const N: usize = 10;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let Some(ctd) = PrivateContainerd::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let envs = dir.path().join("shared/environments");
    std::fs::create_dir_all(&envs).unwrap();
    let Some(oci) = busybox_oci_archive(dir.path()) else {
        return;
    };
    std::fs::copy(&oci, envs.join("busybox.tar")).unwrap();
    let shared = dir.path().join("shared");
    let data = dir.path().join("data");
    let _up = Daemon::start(
        dir.path(),
        "up",
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "up",
            "--api-port",
            "0",
            "--runner-port",
            "0",
            "--ssh-proxy-port",
            "0",
            "--name",
            "bench",
            "--shared-dir",
            shared.to_str().unwrap(),
            "--containerd-socket",
            ctd.socket.to_str().unwrap(),
            "--kill-grace",
            "1s",
            "--heartbeat-interval",
            "1s",
        ],
    );
    wait_for("the host", || read_trimmed(&data.join("api.url")));
    wait_for("the node", || node(&nodes(&data), "bench").map(|_| ()));
    let rn = |args: &[&str]| {
        let mut a = vec!["--data-dir", data.to_str().unwrap(), "-o", "json"];
        a.extend_from_slice(args);
        let o = cli(&a);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    // Warm-up: imports and unpacks the environment once.
    let w = rn(&[
        "task",
        "submit",
        "--container",
        "busybox",
        "--wait",
        "--",
        "true",
    ]);
    assert_eq!(w["state"], "completed");

    let mut ours = Vec::new();
    for _ in 0..N {
        let id = rn(&[
            "task",
            "submit",
            "--container",
            "busybox",
            "--",
            "sleep",
            "30",
        ])["id"]
            .as_u64()
            .unwrap();
        let t = wait_for("running", || {
            let t = rn(&["task", "status", &id.to_string()]);
            (t["state"] == "running").then_some(t)
        });
        let ms =
            t["started_at_unix_ms"].as_i64().unwrap() - t["submitted_at_unix_ms"].as_i64().unwrap();
        ours.push(ms as f64);
        rn(&["task", "kill", &id.to_string()]);
        wait_for("killed", || {
            (rn(&["task", "status", &id.to_string()])["state"] == "killed").then_some(())
        });
    }

    let ctr = |args: &[&str]| {
        Command::new("ctr")
            .arg("-a")
            .arg(&ctd.socket)
            .args(["-n", "rivernode"])
            .args(args)
            .output()
            .unwrap()
    };
    let mut theirs = Vec::new();
    for i in 0..N {
        let id = format!("ctr-bench-{i}");
        let t = Instant::now();
        let o = ctr(&[
            "run",
            "-d",
            "--snapshotter",
            "overlayfs",
            "rivernode.local/env/busybox:latest",
            &id,
            "sleep",
            "30",
        ]);
        theirs.push(t.elapsed().as_secs_f64() * 1000.0);
        assert!(
            o.status.success(),
            "ctr run: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        ctr(&["task", "kill", "-s", "SIGKILL", &id]);
        std::thread::sleep(Duration::from_millis(100));
        ctr(&["task", "rm", "-f", &id]);
        ctr(&["containers", "rm", &id]);
    }
    let (a, b) = (median(ours), median(theirs));
    println!("task_start: rivernode submit->running median {a:.1} ms over {N} tasks (API, scheduler, long-poll, containerd)");
    println!("task_start: ctr run -d                median {b:.1} ms over {N} containers");
    println!("task_start: ratio rivernode/ctr {:.2}", a / b);
}

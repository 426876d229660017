//! `vps create` → the instance's SSH banner through the host's proxy, warm
//! image, against submit → running of a plain command task in the same
//! cluster and run (the VPS's own cost: network, node port, SSH server);
//! then the same for a VM VPS (the tier-1 guest under a private libvirtd,
//! TCG: the guest's boot is emulated, so the figure is an upper bound of
//! what KVM gives) against the container VPS.
//! Inside a private network and mount namespace; prints medians and ratios.
//!
//! `cargo bench --bench vps_ready`

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::containerd::{busybox_oci_archive, PrivateContainerd};
use common::*;

const N: usize = 5;
/// VM boots under TCG take seconds each: fewer of them.
const N_VM: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    std::thread::spawn(run).join().unwrap();
}

fn run() {
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
    let Some(ctd) = PrivateContainerd::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // The VM case's parts: a private libvirtd, the tier-1 guest, its base image.
    let vm = common::guest::guest_kernel().map(|(kernel, version)| {
        let lv = common::libvirt::PrivateLibvirt::start();
        let initrd = common::guest::tier1_initramfs(dir.path(), &version);
        let base = common::guest::ext2_base(dir.path());
        (lv, kernel, initrd, base)
    });
    let vm_env: Vec<(String, String)> = match &vm {
        Some((lv, kernel, initrd, _)) => [
            ("RIVERNODE_LIBVIRT_URI", lv.uri.clone()),
            ("RIVERNODE_VM_ACCEL", "qemu".into()),
            ("RIVERNODE_VM_KERNEL", kernel.display().to_string()),
            ("RIVERNODE_VM_INITRD", initrd.display().to_string()),
            (
                "RIVERNODE_VM_CMDLINE",
                "console=ttyS0 panic=-1 quiet".into(),
            ),
            ("RIVERNODE_VM_DISK_CACHE", "writeback".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        None => vec![],
    };
    let envs = dir.path().join("shared/environments");
    std::fs::create_dir_all(&envs).unwrap();
    let Some(oci) = busybox_oci_archive(dir.path()) else {
        return;
    };
    std::fs::copy(&oci, envs.join("busybox.tar")).unwrap();
    let (shared, data) = (dir.path().join("shared"), dir.path().join("data"));
    let env: Vec<(&str, &str)> = vm_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let _up = Daemon::start_with_env(
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
        ],
        &env,
    );
    wait_for("the host", || read_trimmed(&data.join("api.url")));
    wait_for("the node", || node(&nodes(&data), "bench").map(|_| ()));
    let rn = |args: &[&str]| {
        let mut a = vec!["--data-dir", data.to_str().unwrap(), "-o", "json"];
        a.extend_from_slice(args);
        let o = cli(&a);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", stdout(&o)))
    };
    let admin = read_trimmed(&data.join("admin.token")).unwrap();
    let whoami: serde_json::Value = {
        let url = read_trimmed(&data.join("api.url")).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            reqwest::Client::new()
                .get(format!("{url}/api/whoami"))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap()
        })
    };
    let proxy = format!("127.0.0.1:{}", whoami["ssh_proxy_port"]);
    // Warm: the environment imported, the SSH kit bundled.
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

    // Polls the proxy until instance `id` sends its SSH banner.
    let until_banner = |id: u64| {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            assert!(Instant::now() < deadline, "no SSH banner from vps {id}");
            let mut s = std::net::TcpStream::connect(&proxy).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            s.write_all(format!("REQUEST_TUNNEL {id} {admin}\n").as_bytes())
                .unwrap();
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).unwrap_or(0);
            if String::from_utf8_lossy(&buf[..n]).contains("SSH-2.0") {
                return;
            }
            // SUCCESS may come alone: the banner follows in the next read.
            let m = s.read(&mut buf).unwrap_or(0);
            if String::from_utf8_lossy(&buf[..m]).contains("SSH-2.0") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // `vps create ARGS` with a new key (named `key`) until its SSH banner,
    // in milliseconds; the VPS is deleted after.
    let ready = |args: &[&str], key: &str| {
        let key = dir.path().join(key);
        let mut a = vec!["vps", "create"];
        a.extend_from_slice(args);
        a.extend(["--gen-ssh-key", "--key-out-file", key.to_str().unwrap()]);
        let t = Instant::now();
        let id = rn(&a)["id"].as_u64().unwrap();
        until_banner(id);
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        rn(&["vps", "delete", &id.to_string()]);
        ms
    };
    let mut vps = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..N {
        vps.push(ready(&["--container", "busybox"], &format!("key{i}")));

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
        tasks.push(
            (t["started_at_unix_ms"].as_i64().unwrap()
                - t["submitted_at_unix_ms"].as_i64().unwrap()) as f64,
        );
        rn(&["task", "kill", &id.to_string()]);
    }
    let (a, b) = (median(vps), median(tasks));
    println!("vps_ready: vps create -> SSH banner median {a:.0} ms over {N} (goal < 1000 ms)");
    println!("vps_ready: command task submit -> running median {b:.0} ms over {N}");
    println!("vps_ready: ratio vps/task {:.2}", a / b);

    let Some((_lv, _, _, base)) = &vm else {
        println!("vps_ready: VM case skipped (no libvirtd, QEMU or kernel here)");
        return;
    };
    rn(&["vm", "image", "import", "mini", base.to_str().unwrap()]);
    let vm_args = [
        "--backend",
        "vm",
        "--vm-image",
        "mini",
        "--vm-memory",
        "256",
    ];
    let vms: Vec<f64> = (0..N_VM)
        .map(|i| ready(&vm_args, &format!("vmkey{i}")))
        .collect();
    let v = median(vms);
    println!("vps_ready: VM (TCG) vps create -> SSH banner median {v:.0} ms over {N_VM}");
    println!("vps_ready: ratio VM/container {:.2}", v / a);
}

//! A container VPS end to end on real parts, inside a private network and
//! mount namespace made for this test: containerd and runc, the rivernode
//! binary as host and runner, a bridge with veth and nftables node ports,
//! dropbear injected into a busybox image, and stock OpenSSH through the
//! host's proxy.

mod common;

use common::containerd::{busybox_oci_archive, PrivateContainerd};
use common::*;

fn private_namespaces<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
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

#[test]
fn a_busybox_vps_answers_stock_ssh_through_the_proxy() {
    let present = ["ssh", "ssh-keygen", "dropbearkey", "nft", "ip"]
        .iter()
        .all(|c| command_exists(c))
        && std::path::Path::new("/usr/sbin/dropbear").exists();
    if !real_part_available("openssh-client, dropbear-bin, nftables, iproute2", present) {
        return;
    }
    private_namespaces(|| {
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
        let (_host, url) = start_host_with(dir.path(), &["--shared-dir", shared.to_str().unwrap()]);
        let host_data = dir.path().join("host");
        let runner_data = dir.path().join("runner");
        let _runner = Daemon::start(
            dir.path(),
            "runner",
            &[
                "--data-dir",
                runner_data.to_str().unwrap(),
                "runner",
                "--config",
                "/dev/null",
                "--name",
                "vps-node",
                "--host-url",
                &url,
                "--join-token-file",
                host_data.join("join.token").to_str().unwrap(),
                "--bind",
                "127.0.0.1",
                "--runner-port",
                "0",
                "--heartbeat-interval",
                "300ms",
                "--containerd-socket",
                ctd.socket.to_str().unwrap(),
                "--shared-dir",
                shared.to_str().unwrap(),
                "--instance-bridge",
                "rvt9",
                "--instance-subnet",
                "10.253.0.0/24",
            ],
        );
        let hd = host_data.clone();
        wait_for("the node", move || {
            node(&nodes(&hd), "vps-node").map(|_| ())
        });
        let rn = |args: &[&str]| {
            let mut a = vec!["--data-dir", host_data.to_str().unwrap()];
            a.extend_from_slice(args);
            cli(&a)
        };
        let key = dir.path().join("key");
        let o = rn(&[
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
            .unwrap()
            .to_string();
        wait_for("the VPS running", || {
            let o = rn(&["-o", "json", "task", "status", &id]);
            let t: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            assert!(t["state"] != "failed", "{t}");
            (t["state"] == "running").then_some(())
        });
        let kh = dir.path().join("known_hosts");
        // dropbear needs a moment after the container starts: retry the first login.
        let out = wait_for("ssh echo ok", || {
            let o = rn(&[
                "ssh",
                &id,
                "-i",
                key.to_str().unwrap(),
                "--known-hosts",
                kh.to_str().unwrap(),
                "--",
                "echo",
                "ok",
            ]);
            o.status.success().then(|| stdout(&o))
        });
        assert_eq!(out, "ok\n");
        assert!(
            std::fs::read_to_string(&kh)
                .unwrap()
                .contains("ssh-ed25519"),
            "the host key is pinned"
        );
        // ssh config entries work with stock ssh and scp (files in and back, bytes identical).
        let cfg = dir.path().join("ssh_config");
        let o = rn(&[
            "ssh",
            "config",
            "--file",
            cfg.to_str().unwrap(),
            "-i",
            key.to_str().unwrap(),
            "--known-hosts",
            kh.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let entry = format!("rivernode-vps-{id}");
        let run = |args: &[&str]| {
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
        };
        assert_eq!(run(&["ssh", &entry, "echo", "via-config"]), "via-config\n");
        let data: Vec<u8> = (0..(1u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        let src = dir.path().join("payload");
        std::fs::write(&src, &data).unwrap();
        let back = dir.path().join("payload.back");
        run(&[
            "scp",
            "-q",
            src.to_str().unwrap(),
            &format!("{entry}:/tmp/payload"),
        ]);
        run(&[
            "scp",
            "-q",
            &format!("{entry}:/tmp/payload"),
            back.to_str().unwrap(),
        ]);
        assert!(std::fs::read(&back).unwrap() == data, "scp round trip");

        // No key, no login: passwords are off.
        let o = rn(&[
            "ssh",
            &id,
            "--known-hosts",
            kh.to_str().unwrap(),
            "--",
            "true",
        ]);
        assert!(!o.status.success());

        let o = rn(&["vps", "delete", &id]);
        assert!(o.status.success(), "{}", stderr(&o));
        wait_for("the VPS gone", || {
            let o = rn(&["-o", "json", "task", "status", &id]);
            let t: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            (t["state"] == "killed").then_some(())
        });
        wait_for("its network gone", || {
            let leases =
                std::fs::read_to_string(runner_data.join("runner/ipam.json")).unwrap_or_default();
            let netns = std::fs::read_dir(runner_data.join("runner/netns"))
                .map(|d| d.count())
                .unwrap_or(0);
            (!leases.contains("task") && netns == 0).then_some(())
        });
    });
}

//! Container VPS end to end on real parts, each test inside a private
//! network and mount namespace made for it: containerd and runc, the
//! rivernode binary as host and runner, a bridge with veth and nftables node
//! ports, dropbear injected into a busybox image, and stock OpenSSH through
//! the host's proxy.

mod common;

use common::cluster::*;
use common::*;

#[test]
fn a_busybox_vps_answers_stock_ssh_and_scp_through_the_proxy() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("vps-a") else { return };
        let id = v.create();
        assert_eq!(v.ssh_ok(&id, &["echo", "ok"]), "ok\n");
        // The instance has a resolver configuration and a hosts file of its own.
        let resolv = v.ssh_ok(&id, &["cat", "/etc/resolv.conf", "/etc/hosts"]);
        assert!(
            resolv.contains("nameserver ") && !resolv.contains("nameserver 127."),
            "{resolv}"
        );
        assert!(
            resolv.contains("localhost") && resolv.contains(&format!("vps-a-task-{id}")),
            "{resolv}"
        );
        let status: serde_json::Value =
            serde_json::from_slice(&v.rn(&["-o", "json", "task", "status", &id]).stdout).unwrap();
        let key = status["ssh_host_key"]
            .as_str()
            .expect("the runner reports the host key")
            .to_string();
        assert!(key.starts_with("ssh-ed25519 "), "{key}");
        let known = std::fs::read_to_string(&v.known_hosts).unwrap();
        assert!(
            known
                .lines()
                .any(|l| l == format!("rivernode-vps-{id} {key}")),
            "the reported key is pinned: {known}"
        );

        // ssh config entries work with stock ssh and scp (files in and back, bytes identical).
        let cfg = v.ssh_config("ssh_config");
        let entry = format!("rivernode-vps-{id}");
        assert_eq!(
            Vps::with_config(&cfg, &["ssh", &entry, "echo", "via-config"]),
            "via-config\n"
        );
        let data: Vec<u8> = (0..(1u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
            .collect();
        assert!(
            v.scp_round_trip(&cfg, &entry, "/tmp/payload", &data) == data,
            "scp round trip"
        );

        // No key, no login: passwords are off.
        let o = v.rn(&[
            "ssh",
            &id,
            "--known-hosts",
            v.known_hosts.to_str().unwrap(),
            "--",
            "true",
        ]);
        assert!(!o.status.success());

        let o = v.rn(&["vps", "delete", &id]);
        assert!(o.status.success(), "{}", stderr(&o));
        v.wait_state(&id, "deleted");
        let runner = v.runner_data();
        wait_for("its network gone", || {
            let leases =
                std::fs::read_to_string(runner.join("runner/ipam.json")).unwrap_or_default();
            let netns = std::fs::read_dir(runner.join("runner/netns"))
                .map(|d| d.count())
                .unwrap_or(0);
            (!leases.contains("task") && netns == 0).then_some(())
        });
        let o = v.ssh(&id, &["true"]);
        assert!(
            stderr(&o).contains(&format!("ERROR instance {id} is deleted")),
            "{}",
            stderr(&o)
        );
        // Nothing left: no container (nor its snapshot), no veth, no node port rule.
        assert_eq!(v.ctr(&["containers", "ls", "-q"]).trim(), "");
        assert!(!v
            .ctr(&["snapshots", "ls"])
            .contains(&format!("vps-a-task-{id}")));
        let links = std::process::Command::new("ip")
            .args(["-o", "link"])
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&links.stdout)
                .lines()
                .filter_map(|l| l.split(": ").nth(1))
                .any(|n| n.starts_with("rv") && !n.starts_with("rvt9")),
            "no veth left"
        );
        wait_for("no node port left", || {
            let nft = std::process::Command::new("nft")
                .args(["list", "table", "inet", "rivernode"])
                .output()
                .unwrap();
            (!String::from_utf8_lossy(&nft.stdout).contains("dnat ip to")).then_some(())
        });
    });
}

#[test]
fn a_vps_cannot_reach_the_node_apis_and_pause_freezes_it() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("vps-b") else { return };
        let id = v.create();
        v.ssh_ok(&id, &["true"]);
        let port_of = |url: &str| {
            url.rsplit(':')
                .next()
                .unwrap()
                .trim_end_matches('/')
                .to_string()
        };
        let runner_url = node(&nodes(&v.host_data()), "vps-b").unwrap()["runner_url"]
            .as_str()
            .unwrap()
            .to_string();
        // A node service nobody protects: the control showing the path itself works.
        let open = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let open_port = open.local_addr().unwrap().port().to_string();
        // It greets and hangs up, so a probe sees that it got through.
        std::thread::spawn(move || {
            for c in open.incoming().flatten() {
                use std::io::Write;
                let mut c = c;
                let _ = c.write_all(b"hello\n");
            }
        });
        // "open" when a greeting came back; a dropped SYN gives nothing within 3 s.
        let reach = |port: &str| {
            // One string: ssh hands the remote shell a single command line.
            let o = v.ssh(&id, &[&format!("nc -w 3 10.253.0.1 {port} </dev/null")]);
            if stdout(&o).contains("hello") {
                "open"
            } else {
                "closed"
            }
        };
        assert_eq!(reach(&open_port), "open");
        assert_eq!(
            reach(&port_of(&runner_url)),
            "closed",
            "the runner API is closed to instances"
        );
        assert_eq!(
            reach(&port_of(&v.url)),
            "closed",
            "the host API is closed to instances"
        );

        // Paused, its processes are frozen: a login cannot complete.
        let login = || {
            let key = v.key.to_str().unwrap().to_string();
            let known = v.known_hosts.to_str().unwrap().to_string();
            let data = v.host_data();
            std::process::Command::new("timeout")
                .arg("8")
                .arg(BIN)
                .args([
                    "--data-dir",
                    data.to_str().unwrap(),
                    "ssh",
                    &id,
                    "-i",
                    &key,
                    "--known-hosts",
                    &known,
                    "--",
                    "echo",
                    "in",
                ])
                .env("HOME", "/nonexistent")
                .output()
                .unwrap()
        };
        v.rn(&["task", "pause", &id]);
        v.wait_state(&id, "paused");
        assert!(!login().status.success(), "no login into a paused VPS");
        v.rn(&["task", "resume", &id]);
        v.wait_state(&id, "running");
        assert_eq!(stdout(&login()), "in\n", "after resume it answers again");
    });
}

#[test]
fn an_ssh_session_survives_kill_9_of_the_runner_and_nothing_is_duplicated() {
    use std::io::{BufRead, BufReader};
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(mut v) = Vps::start("vps-c") else {
            return;
        };
        let id = v.create();
        v.ssh_ok(&id, &["true"]);
        let data = v.host_data();
        let mut session = std::process::Command::new(BIN)
            .args([
                "--data-dir",
                data.to_str().unwrap(),
                "ssh",
                &id,
                "-i",
                v.key.to_str().unwrap(),
            ])
            .args(["--known-hosts", v.known_hosts.to_str().unwrap(), "--"])
            .arg("i=0; while [ $i -lt 25 ]; do echo $i; i=$((i+1)); sleep 0.2; done")
            .env("HOME", "/nonexistent")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(session.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "0");
        // The runner dies mid-session and comes back.
        v.runner.as_mut().unwrap().kill();
        v.start_runner();
        let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
        assert_eq!(
            rest.last().map(String::as_str),
            Some("24"),
            "the session streamed to the end: {rest:?}"
        );
        assert_eq!(rest.len(), 24, "no line lost: {rest:?}");
        assert!(session.wait().unwrap().success());

        // Re-adopted, not recreated: one container, one veth, the node port once.
        v.wait_state(&id, "running");
        assert_eq!(v.ssh_ok(&id, &["echo", "again"]), "again\n");
        assert_eq!(v.ctr(&["containers", "ls", "-q"]).lines().count(), 1);
        let links = std::process::Command::new("ip")
            .args(["-o", "link"])
            .output()
            .unwrap();
        let veths = String::from_utf8_lossy(&links.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .filter(|name| name.starts_with("rv") && !name.starts_with("rvt9"))
            .count();
        assert_eq!(veths, 1);
        let nft = std::process::Command::new("nft")
            .args(["list", "table", "inet", "rivernode"])
            .output()
            .unwrap();
        let rules = String::from_utf8_lossy(&nft.stdout);
        assert_eq!(
            rules.matches("dnat ip to").count(),
            2,
            "prerouting + output, once each: {rules}"
        );
    });
}

#[test]
fn stop_keeps_the_disk_and_restart_brings_it_back_key_only() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("vps-d") else { return };
        let id = v.create();
        assert_eq!(
            v.ssh_ok(&id, &["echo keep > /root/data && echo written"]),
            "written\n"
        );
        let o = v.rn(&["vps", "stop", &id]);
        assert!(o.status.success(), "{}", stderr(&o));
        v.wait_state(&id, "stopped");
        let o = v.ssh(&id, &["true"]);
        assert!(
            stderr(&o).contains(&format!("ERROR instance {id} is stopped")),
            "{}",
            stderr(&o)
        );
        let o = v.rn(&["vps", "restart", &id]);
        assert!(o.status.success(), "{}", stderr(&o));
        v.wait_state(&id, "running");
        // Same disk, same host key (the pinned known_hosts entry still matches; ssh checks strictly).
        assert_eq!(v.ssh_ok(&id, &["cat", "/root/data"]), "keep\n");
        let o = v.rn(&[
            "ssh",
            &id,
            "--known-hosts",
            v.known_hosts.to_str().unwrap(),
            "--",
            "true",
        ]);
        assert!(!o.status.success(), "still key-only after a restart");
        // A real password attempt with stock ssh: the server does not even offer it.
        let cfg = v.ssh_config("ssh_config_d");
        let askpass = v.dir.path().join("askpass");
        std::fs::write(&askpass, "#!/bin/sh\necho root\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&askpass, std::fs::Permissions::from_mode(0o700)).unwrap();
        let o = std::process::Command::new("ssh")
            .args(["-F", cfg.to_str().unwrap()])
            .args([
                "-o",
                "PubkeyAuthentication=no",
                "-o",
                "PasswordAuthentication=yes",
            ])
            .args(["-o", "KbdInteractiveAuthentication=yes"])
            .arg(format!("rivernode-vps-{id}"))
            .arg("true")
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(err.contains("Permission denied (publickey)"), "{err}");

        // A restart of a running VPS stops and starts it: memory (/dev/shm) is gone, the disk stays.
        v.ssh_ok(&id, &["echo x > /dev/shm/marker"]);
        let o = v.rn(&["vps", "restart", &id]);
        assert!(o.status.success(), "{}", stderr(&o));
        wait_for("the restart", || {
            let o = v.ssh(&id, &["test -e /dev/shm/marker || echo restarted"]);
            (stdout(&o) == "restarted\n").then_some(())
        });
        assert_eq!(v.ssh_ok(&id, &["cat", "/root/data"]), "keep\n");
        assert_eq!(v.state(&id), "running");
        v.delete(&id);
    });
}

#[test]
fn a_restarted_runner_keeps_stopped_instances_and_cleans_up_vanished_ones() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(mut v) = Vps::start("vps-e") else {
            return;
        };
        let kept = v.create();
        v.ssh_ok(&kept, &["echo keep > /root/data"]);
        let gone = v.create();
        v.ssh_ok(&gone, &["true"]);
        v.rn(&["vps", "stop", &kept]);
        v.wait_state(&kept, "stopped");
        // The runner crashes; meanwhile one instance's container disappears.
        v.runner.as_mut().unwrap().kill();
        let gone_cid = format!("vps-e-task-{gone}");
        v.ctr(&["task", "kill", "-s", "SIGKILL", &gone_cid]);
        std::thread::sleep(std::time::Duration::from_millis(300));
        v.ctr(&["task", "rm", "-f", &gone_cid]);
        v.ctr(&["containers", "rm", &gone_cid]);
        v.start_runner();
        // The vanished one's network is taken down and the host hears it failed.
        let runner = v.runner_data();
        wait_for("the vanished instance's network gone", || {
            let leases =
                std::fs::read_to_string(runner.join("runner/ipam.json")).unwrap_or_default();
            (!leases.contains(&gone_cid)).then_some(())
        });
        wait_for("the vanished instance reported", || {
            (v.state(&gone) == "failed").then_some(())
        });
        // The stopped one kept its disk through the crash.
        assert_eq!(v.state(&kept), "stopped");
        v.rn(&["vps", "restart", &kept]);
        v.wait_state(&kept, "running");
        assert_eq!(v.ssh_ok(&kept, &["cat", "/root/data"]), "keep\n");
    });
}

/// Runs the CLI with `input` on its standard input.

#[test]
fn users_reach_only_their_own_vps_and_a_password_vps_takes_only_its_password() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("vps-f") else { return };
        let alice = v.add_user("alice");
        let bob = v.add_user("bob");
        let data = v.host_data();
        let as_user = |token: &str, args: &[&str], input: &str| {
            let mut a = vec!["--data-dir", data.to_str().unwrap(), "--token", token];
            a.extend_from_slice(args);
            cli_with_stdin(&a, input)
        };
        let create = ["-o", "json", "vps", "create", "--container", "busybox"];

        // The operator did not allow privileged instances.
        let o = as_user(
            &alice,
            &[&create[..], &["--no-ssh-key", "--privileged"]].concat(),
            "",
        );
        assert!(!o.status.success());
        assert!(stderr(&o).contains("privileged"), "{}", stderr(&o));
        // An empty password is refused before anything is sent.
        let o = as_user(
            &alice,
            &[&create[..], &["--no-ssh-key", "--password-stdin"]].concat(),
            "\n",
        );
        assert!(stderr(&o).contains("empty"), "{}", stderr(&o));

        let o = as_user(
            &alice,
            &[&create[..], &["--no-ssh-key", "--password-stdin"]].concat(),
            "correct horse battery\n",
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let id = created_id(&o);
        v.wait_state(&id, "running");
        let login = wait_for("a password login", || {
            let o = v.ssh_password(&alice, &id, "correct horse battery", "echo in");
            o.status.success().then(|| stdout(&o))
        });
        assert_eq!(login, "in\n");
        let o = v.ssh_password(&alice, &id, "wrong", "echo in");
        assert!(!o.status.success(), "a wrong password is refused");
        // The shared environments are read-only in every instance.
        let o = v.ssh_password(
            &alice,
            &id,
            "correct horse battery",
            "echo x > /shared/environments/busybox.tar || echo refused",
        );
        assert!(stdout(&o).contains("refused"), "{}", stderr(&o));
        // Node paths are the admin's to mount.
        let o = as_user(
            &alice,
            &[
                "task",
                "submit",
                "--container",
                "busybox",
                "--mount",
                "/:/host",
                "--",
                "true",
            ],
            "",
        );
        assert!(
            stderr(&o).contains("mounts: only the admin"),
            "{}",
            stderr(&o)
        );

        // Bob sees nothing of it: not in lists, not by id, not through the proxy.
        let o = as_user(&bob, &["-o", "json", "task", "list"], "");
        assert_eq!(stdout(&o).trim(), "[]", "{}", stderr(&o));
        let o = as_user(&bob, &["task", "status", &id], "");
        assert!(
            stderr(&o).contains(&format!("no task {id}")),
            "{}",
            stderr(&o)
        );
        let o = as_user(&bob, &["vps", "stop", &id], "");
        assert!(!o.status.success());
        let o = as_user(&bob, &["ssh-proxy-command", &id], "");
        assert!(
            stderr(&o).contains(&format!("the SSH proxy said: ERROR no instance {id}")),
            "{}",
            stderr(&o)
        );
        let o = as_user(&alice, &["ssh-proxy-command", &id], "");
        assert!(
            stdout(&o).starts_with("SSH-2.0-"),
            "alice's tunnel opens: {}",
            stderr(&o)
        );
        // Alice and the admin see it, owned by alice, with the hash withheld.
        let o = as_user(&alice, &["-o", "json", "task", "status", &id], "");
        let t: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(t["owner"], "alice");
        assert_eq!(t["spec"]["ssh_password_hash"], "(set)");
        let o = v.rn(&["-o", "json", "user", "list"]);
        let users: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(users[0]["name"], "alice");
        assert_eq!(users[0]["active_tasks"], 1, "{users}");

        // Removing bob revokes his token.
        assert!(v.rn(&["user", "remove", "bob"]).status.success());
        let o = as_user(&bob, &["task", "list"], "");
        assert!(
            stderr(&o).contains("invalid or revoked token"),
            "{}",
            stderr(&o)
        );

        // No key, no password, and an image without its own sshd: the VPS fails, saying why.
        let o = as_user(&alice, &[&create[..], &["--no-ssh-key"]].concat(), "");
        assert!(o.status.success(), "{}", stderr(&o));
        let bare = created_id(&o);
        let msg = wait_for("the bare VPS to fail", || {
            let o = v.rn(&["-o", "json", "task", "status", &bare]);
            let t: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
            (t["state"] == "failed").then(|| t["message"].as_str().unwrap_or("").to_string())
        });
        assert!(msg.contains("needs an SSH key or a password"), "{msg}");
        v.delete(&id);
    });
}

#[test]
fn a_debian_vps_runs_its_own_sshd_with_keys_and_a_password() {
    if !parts_present() {
        return;
    }
    let Some(debian) = common::containerd::debian_sshd_archive() else {
        return;
    };
    private_namespaces(move || {
        let Some(v) = Vps::start("vps-g") else { return };
        std::fs::copy(&debian, v.dir.path().join("shared/environments/debian.tar")).unwrap();
        // A key for the user, and a password too.
        let o = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&v.key)
            .output()
            .unwrap();
        assert!(o.status.success());
        let data = v.host_data();
        let o = cli_with_stdin(
            &[
                "--data-dir",
                data.to_str().unwrap(),
                "-o",
                "json",
                "vps",
                "create",
                "--container",
                "debian",
                "--public-key-file",
                v.key.with_extension("pub").to_str().unwrap(),
                "--password-stdin",
            ],
            "debian pass\n",
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let id = created_id(&o);
        v.wait_state(&id, "running");
        // The image's own OpenSSH server answers, under our configuration.
        let cmdline = v.ssh_ok(&id, &["tr '\\0' ' ' </proc/1/cmdline"]);
        assert!(
            // sshd rewrites its process title: "sshd: /usr/sbin/sshd -D ... [listener] ...".
            cmdline.contains("/usr/sbin/sshd -D -e -f /.rivernode/instance/sshd_config"),
            "{cmdline}"
        );
        let banner = v.ssh_ok(&id, &["echo $SSH_CONNECTION; cat /etc/debian_version"]);
        assert!(
            banner.lines().nth(1).unwrap_or("").starts_with("12"),
            "{banner}"
        );
        let admin = read_trimmed(&data.join("admin.token")).unwrap();
        let o = v.ssh_password(&admin, &id, "debian pass", "echo by-password");
        assert_eq!(stdout(&o), "by-password\n", "{}", stderr(&o));
        assert!(!v.ssh_password(&admin, &id, "nope", "true").status.success());

        // scp (OpenSSH's internal sftp) in and back.
        let data_bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let cfg = v.ssh_config("deb_ssh_config");
        let entry = format!("rivernode-vps-{id}");
        assert!(v.scp_round_trip(&cfg, &entry, "/root/payload", &data_bytes) == data_bytes);

        // Stop and restart: same disk, same host key, same logins.
        v.rn(&["vps", "stop", &id]);
        v.wait_state(&id, "stopped");
        v.rn(&["vps", "restart", &id]);
        v.wait_state(&id, "running");
        assert_eq!(v.ssh_ok(&id, &["wc -c < /root/payload"]).trim(), "300000");
        v.delete(&id);
    });
}

#[test]
fn snapshots_bring_back_a_deleted_file_and_seed_a_new_vps() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(mut v) = Vps::start("vps-h") else {
            return;
        };
        let id = v.create();
        v.ssh_ok(
            &id,
            &["echo precious > /root/keep && head -c 3000000 /dev/urandom > /root/blob && echo ok"],
        );
        let s1 = v.json(&[
            "vps",
            "snapshot",
            "create",
            &id,
            "-m",
            "before the accident",
        ]);
        let s1_id = s1["id"].as_str().unwrap().to_string();
        // The layer holds the changes (3 MB of random bytes), not the image under them.
        let size = s1["size_bytes"].as_u64().unwrap();
        assert!(
            (3_000_000..3_400_000).contains(&size),
            "layer of {size} bytes"
        );
        assert_eq!(s1["message"], "before the accident");
        v.ssh_ok(&id, &["rm /root/keep"]);

        // Two in the same second: distinct, ordered; latest is the newer.
        let s2 = v.json(&["vps", "snapshot", "create", &id]);
        let s3 = v.json(&["vps", "snapshot", "create", &id]);
        let (s2_id, s3_id) = (s2["id"].as_str().unwrap(), s3["id"].as_str().unwrap());
        assert!(s2_id.parse::<u64>().unwrap() < s3_id.parse::<u64>().unwrap());
        assert_eq!(v.json(&["vps", "snapshot", "latest", &id])["id"], s3_id);

        // Bad requests say what is wrong and change nothing.
        let o = v.rn(&["vps", "snapshot", "delete", &id, "123"]);
        assert!(
            stderr(&o).contains("has no snapshot 123") && stderr(&o).contains("404"),
            "{}",
            stderr(&o)
        );
        let o = v.rn(&["vps", "snapshot", "create", "999"]);
        assert!(stderr(&o).contains("no task 999"), "{}", stderr(&o));
        let o = v.rn(&[
            "-o",
            "json",
            "task",
            "submit",
            "--container",
            "busybox",
            "--",
            "true",
        ]);
        let cmd_id = created_id(&o);
        let o = v.rn(&["vps", "snapshot", "list", &cmd_id]);
        assert!(
            stderr(&o).contains("only a VPS has snapshots") && stderr(&o).contains("400"),
            "{}",
            stderr(&o)
        );
        assert_eq!(v.snapshot_ids(&id).len(), 3);

        // Stop takes a snapshot of its own; restart from the first brings the file back.
        v.rn(&["vps", "stop", &id]);
        v.wait_state(&id, "stopped");
        let all = v.json(&["vps", "snapshot", "list", &id]);
        assert_eq!(all[3]["message"], "automatic, on stop", "{all}");
        let o = v.rn(&["vps", "restart", &id, "--from-snapshot", &s1_id]);
        assert!(o.status.success(), "{}", stderr(&o));
        v.wait_state(&id, "running");
        assert_eq!(v.ssh_ok(&id, &["cat", "/root/keep"]), "precious\n");

        // A new VPS from that snapshot has the file too.
        let o = v.rn(&[
            "-o",
            "json",
            "vps",
            "create",
            "--from-snapshot",
            &format!("{id}:{s1_id}"),
            "--public-key-file",
            v.key.with_extension("pub").to_str().unwrap(),
        ]);
        let copy = created_id(&o);
        v.wait_state(&copy, "running");
        assert_eq!(v.ssh_ok(&copy, &["cat", "/root/keep"]), "precious\n");
        let o = v.rn(&[
            "vps",
            "create",
            "--from-snapshot",
            &format!("{id}:77"),
            "--public-key-file",
            v.key.with_extension("pub").to_str().unwrap(),
        ]);
        assert!(stderr(&o).contains("has no snapshot 77"), "{}", stderr(&o));

        // Snapshots live in containerd, listed by label: a runner restart keeps them.
        let before = v.snapshot_ids(&id);
        v.runner.as_mut().unwrap().kill();
        // As if the runner died while a snapshot held the VPS frozen: it is thawed on adoption.
        v.ctr(&["task", "pause", &format!("vps-h-task-{id}")]);
        assert!(v.ctr(&["task", "ls"]).contains("PAUSED"));
        v.start_runner();
        let after = wait_for("the runner back", || {
            let o = v.rn(&["-o", "json", "vps", "snapshot", "list", &id]);
            o.status.success().then(|| v.snapshot_ids(&id))
        });
        assert_eq!(before, after);
        assert_eq!(v.ssh_ok(&id, &["echo", "thawed"]), "thawed\n");
        assert_eq!(v.state(&id), "running");

        // Deleting the VPS deletes its snapshots; the copy keeps running on its own disk.
        v.delete(&id);
        wait_for("its snapshot images gone", || {
            (!v.ctr(&["images", "ls", "-q"])
                .contains(&format!("vps-{id}:")))
            .then_some(())
        });
        assert_eq!(v.ssh_ok(&copy, &["cat", "/root/keep"]), "precious\n");
        v.json(&["vps", "snapshot", "create", &copy]);
        v.delete(&copy);
    });
}

#[test]
fn stopping_seven_times_keeps_the_five_newest_snapshots() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("vps-i") else { return };
        let id = v.create();
        let mut taken = Vec::new();
        for round in 0..7 {
            v.rn(&["vps", "stop", &id]);
            v.wait_state(&id, "stopped");
            taken.push(
                v.json(&["vps", "snapshot", "latest", &id])["id"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
            if round < 6 {
                v.rn(&["vps", "restart", &id]);
                v.wait_state(&id, "running");
            }
        }
        assert_eq!(
            v.snapshot_ids(&id),
            taken[2..],
            "the five newest of {taken:?}"
        );
        let images = v.ctr(&["images", "ls", "-q"]);
        assert_eq!(images.matches(&format!("vps-{id}:")).count(), 5, "{images}");
        v.delete(&id);
    });
}

#[test]
fn a_privileged_vps_gets_every_capability_where_the_operator_allows_it() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start_with("vps-j", &["--allow-privileged"]) else {
            return;
        };
        let plain = v.create();
        let o = v.rn(&[
            "-o",
            "json",
            "vps",
            "create",
            "--container",
            "busybox",
            "--privileged",
            "--public-key-file",
            v.key.with_extension("pub").to_str().unwrap(),
        ]);
        let privileged = created_id(&o);
        v.wait_state(&privileged, "running");
        let sys_admin = |id: &str| {
            let status = v.ssh_ok(id, &["cat", "/proc/1/status"]);
            let eff = status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
                .unwrap();
            eff & (1 << 21) != 0
        };
        assert!(!sys_admin(&plain), "a plain VPS has no CAP_SYS_ADMIN");
        assert!(sys_admin(&privileged), "a privileged one has it");

        // The operator withdraws the permission: a stopped privileged VPS stays stopped.
        v.rn(&["vps", "stop", &privileged]);
        v.wait_state(&privileged, "stopped");
        let mut v = v;
        v.host.kill();
        let data = v.host_data();
        std::fs::remove_file(data.join("api.url")).unwrap();
        let shared = v.dir.path().join("shared");
        // The same API port: the runner keeps talking to it.
        let port = v
            .url
            .rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches('/')
            .to_string();
        v.host = Daemon::start(
            v.dir.path(),
            "host-again",
            &[
                "--data-dir",
                data.to_str().unwrap(),
                "host",
                "--config",
                "/dev/null",
                "--api-port",
                &port,
                "--ssh-proxy-port",
                "0",
                "--shared-dir",
                shared.to_str().unwrap(),
            ],
        );
        wait_for("the host again", || read_trimmed(&data.join("api.url")));
        for verb in ["restart", "resume"] {
            let o = if verb == "restart" {
                v.rn(&["vps", "restart", &privileged])
            } else {
                v.rn(&["task", "resume", &privileged])
            };
            assert!(
                stderr(&o).contains("no longer allows"),
                "{verb}: {}",
                stderr(&o)
            );
        }
        assert_eq!(v.state(&privileged), "stopped");
        let v = v;
        for id in [plain, privileged] {
            v.delete(&id);
        }
    });
}

//! Who may use a VPS, end to end on real parts in private namespaces: users
//! reach only their own, password logins take only their password, and
//! `--privileged` only where the operator allows it.

mod common;

use common::cluster::*;
use common::*;

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
        // Its ssh config entry leaves password logins possible.
        let known = v.dir.path().join("alice_known_hosts");
        let o = as_user(
            &alice,
            &["ssh", "config", "--known-hosts", known.to_str().unwrap()],
            "",
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let config = stdout(&o);
        let entry = config
            .split("\nHost ")
            .find(|e| e.starts_with(&format!("rivernode-vps-{id}\n")))
            .unwrap_or_else(|| panic!("no entry for VPS {id}: {config}"));
        assert!(!entry.contains("PasswordAuthentication no"), "{entry}");
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

#[test]
fn a_users_own_variables_reach_every_instance_they_make() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("vps-u") else { return };
        let alice = v.add_user("alice");
        let bob = v.add_user("bob");
        let o = v.rn_as(&alice, &["user", "env", "set", "A=from-alice", "B=kept"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let listed = stdout(&v.rn_as(&alice, &["user", "env", "list"]));
        assert!(listed.contains("from-alice"), "{listed}");
        // Nobody else's to read or change; bad input named.
        let o = v.rn_as(&bob, &["user", "env", "list", "--user", "alice"]);
        assert!(stderr(&o).contains("only their own"), "{}", stderr(&o));
        let o = v.rn_as(&alice, &["user", "env", "set", "NOEQUALS"]);
        assert!(stderr(&o).contains("KEY=VALUE"), "{}", stderr(&o));
        let o = v.rn(&["user", "env", "list"]);
        assert!(stderr(&o).contains("--user NAME"), "{}", stderr(&o));
        // A task of hers has them, her own -e wins; bob's has none of them.
        let run = |token: &str, extra: &[&str]| {
            let mut a = vec!["task", "submit", "--container", "busybox", "--wait"];
            a.extend_from_slice(extra);
            a.extend(["--", "sh", "-c", "echo \"$A|$B\""]);
            let o = v.rn_as(token, &a);
            assert!(o.status.success(), "{}", stderr(&o));
            stdout(&o)
        };
        assert_eq!(run(&alice, &["-e", "A=mine"]), "mine|kept\n");
        assert_eq!(run(&bob, &[]), "|\n");
        // Unset: the next instance lacks it.
        let o = v.rn_as(&alice, &["user", "env", "unset", "B"]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(run(&alice, &[]), "from-alice|\n");
    });
}

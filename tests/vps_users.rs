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
        // A user's VPS waits for an operator (the default `approval`), then runs.
        v.wait_state(&id, "pending_approval");
        let o = v.rn(&["approve", &id]);
        assert!(o.status.success(), "{}", stderr(&o));
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
        assert!(v.rn(&["approve", &bare]).status.success());
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

/// Vast.ai's own CLI (PyPI), as `scripts/setup.sh --test` installs it.
const VASTAI: &str = "/opt/rivernode-test/vastai/bin/vastai";

/// Runs `vastai ARGS` in the network namespace of instance `id` (so its
/// calls come from that instance's address) with `env` (its variables),
/// and a HOME of its own (the CLI keeps files there).
fn vastai_in(v: &Vps, id: &str, env: &[(&str, &str)], args: &[&str]) -> String {
    let netns = v
        .runner_data()
        .join("runner/netns")
        .join(format!("{}-task-{id}", v.node));
    let home = v.dir.path().join("vastai-home");
    std::fs::create_dir_all(&home).unwrap();
    let o = std::process::Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .arg(VASTAI)
        .args(args)
        .env_clear()
        .env("HOME", &home)
        .env("PATH", "/usr/bin:/bin")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    format!("{}{}", stdout(&o), stderr(&o))
}

#[test]
fn an_instance_stops_and_destroys_itself_with_the_vastai_cli_and_its_key_touches_nothing_else() {
    if !parts_present()
        || !real_part_available(
            "the vastai CLI (PyPI) at /opt/rivernode-test/vastai",
            std::path::Path::new(VASTAI).exists(),
        )
    {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("vps-k") else { return };
        let a = v.create();
        let b = v.create();
        v.wait_state(&a, "running");
        v.wait_state(&b, "running");
        // The instance's own variables, as a session inside sees them.
        let vars = v.ssh_ok(
            &a,
            &["echo $CONTAINER_API_KEY; echo $VAST_API_KEY; echo $VAST_URL; echo $CONTAINER_API_URL"],
        );
        let vars: Vec<&str> = vars.lines().collect();
        let (key, url) = (vars[0], vars[2]);
        assert!(key.starts_with("cak_"), "{vars:?}");
        assert_eq!(vars[1], key, "VAST_API_KEY is the instance's key");
        assert_eq!(url, "http://169.254.42.1:4280");
        assert_eq!(vars[3], url);
        let env = [("VAST_URL", url), ("VAST_API_KEY", key)];

        // show, with the variables alone (as a Vast.ai template calls it).
        let shown = vastai_in(&v, &a, &env, &["show", "instance", &a, "--raw"]);
        let json: serde_json::Value = serde_json::from_str(&shown).unwrap_or_else(|_| {
            panic!("vastai show: {shown}\n{}", v.logs());
        });
        assert_eq!(json["id"].as_u64().unwrap().to_string(), a, "{json}");
        assert_eq!(json["actual_status"], "running", "{json}");
        assert!(!shown.contains(key), "the key is not echoed back: {shown}");
        let table = vastai_in(&v, &a, &env, &["show", "instance", &a]);
        assert!(table.contains("running"), "{table}");

        // The key acts on its own instance only: not on b by naming it (the
        // runner refuses)...
        let out = vastai_in(&v, &a, &env, &["stop", "instance", &b]);
        assert!(
            out.contains("403") && out.contains("acts on its own instance"),
            "{out}"
        );
        // ...nor from b's address with a's key (the host refuses)...
        let out = vastai_in(&v, &b, &env, &["stop", "instance", &b]);
        assert!(
            out.contains("403") && out.contains("not the CONTAINER_API_KEY of instance"),
            "{out}"
        );
        // ...nor from b's address taken inside a: the bridge drops what a
        // sends from an address not its own.
        let netns = |id: &str| {
            v.runner_data()
                .join("runner/netns")
                .join(format!("{}-task-{id}", v.node))
        };
        let in_ns = |id: &str, args: &[&str]| {
            std::process::Command::new("nsenter")
                .arg(format!("--net={}", netns(id).display()))
                .arg("--")
                .args(args)
                .output()
                .unwrap()
        };
        let o = in_ns(&b, &["ip", "-4", "-o", "addr", "show", "eth0"]);
        let b_ip = stdout(&o)
            .split_whitespace()
            .nth(3)
            .and_then(|a| a.split('/').next())
            .unwrap()
            .to_string();
        assert!(in_ns(
            &a,
            &["ip", "addr", "add", &format!("{b_ip}/32"), "dev", "eth0"]
        )
        .status
        .success());
        let spoofed = in_ns(
            &a,
            &[
                "curl",
                "-s",
                "--max-time",
                "3",
                "--interface",
                &b_ip,
                "-H",
                &format!("Authorization: Bearer {key}"),
                &format!("{url}/api/v0/instances/{b}/"),
            ],
        );
        assert!(
            !spoofed.status.success(),
            "a spoofed b: {}",
            stdout(&spoofed)
        );
        assert!(in_ns(
            &a,
            &["ip", "addr", "del", &format!("{b_ip}/32"), "dev", "eth0"]
        )
        .status
        .success());
        // No key, a wrong one, another kind of key: refused.
        let out = vastai_in(&v, &a, &[("VAST_URL", url)], &["stop", "instance", &a]);
        assert!(
            out.contains("401") && out.contains("send the instance's key"),
            "{out}"
        );
        let wrong = [("VAST_URL", url), ("VAST_API_KEY", "cak_wrong")];
        let out = vastai_in(&v, &a, &wrong, &["stop", "instance", &a]);
        assert!(
            out.contains("403") && out.contains("not the CONTAINER_API_KEY"),
            "{out}"
        );
        let foreign = [("VAST_URL", url), ("VAST_API_KEY", "a-vast-account-key")];
        let out = vastai_in(&v, &a, &foreign, &["stop", "instance", &a]);
        assert!(
            out.contains("403") && out.contains("only the instance's own key"),
            "{out}"
        );
        assert_eq!(v.state(&b), "running");
        assert_eq!(v.state(&a), "running");
        // The endpoint answers the instance bridge only: not the node itself.
        let o = std::process::Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "3",
                &format!("{url}/api/v0/instances/{a}/"),
            ])
            .output()
            .unwrap();
        assert!(!o.status.success(), "reached from the node: {}", stdout(&o));

        // stop, as the command line says it: --url and --api-key;
        // the disk is kept.
        v.ssh_ok(&a, &["echo kept > /root/mark"]);
        let out = vastai_in(
            &v,
            &a,
            &[],
            &["--url", url, "--api-key", key, "stop", "instance", &a],
        );
        assert!(out.contains(&format!("stopping instance {a}")), "{out}");
        v.wait_state(&a, "stopped");
        let o = v.rn(&["vps", "restart", &a]);
        assert!(o.status.success(), "{}", stderr(&o));
        v.wait_state(&a, "running");
        assert_eq!(v.ssh_ok(&a, &["cat /root/mark"]), "kept\n");
        // start of the running instance that asks: nothing to do, and said so.
        let out = vastai_in(&v, &a, &env, &["start", "instance", &a]);
        assert!(out.contains(&format!("starting instance {a}")), "{out}");
        // destroy: the instance is gone, disk and all; b is untouched.
        let out = vastai_in(&v, &a, &env, &["destroy", "instance", &a, "-y"]);
        assert!(out.contains(&format!("destroying instance {a}")), "{out}");
        v.wait_state(&a, "deleted");
        let containers = v.ctr(&["containers", "ls", "-q"]);
        assert!(
            !containers.contains(&format!("{}-task-{a}", v.node)),
            "its container (the disk) is gone: {containers}"
        );
        assert_eq!(v.state(&b), "running");
        v.delete(&b);
    });
}

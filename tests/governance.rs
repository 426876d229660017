//! A shared lab's rules on the real binary: a user's VPS waits for an
//! operator's approval and holds nothing until then, a rejection reaches
//! its owner with the reason, and viewers and operators see everyone's
//! work (the variables' values left out) but do only what their role says.

mod common;

use common::*;

struct Lab {
    _host: Daemon,
    _dir: tempfile::TempDir,
    data: String,
}

impl Lab {
    /// A host (with `extra` flags) whose shared directory has an empty
    /// environment `base`, and a node `lab-a` registered over the API (no
    /// runner: placement is the host's alone, which is what these rules govern).
    fn start(extra: &[&str]) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir_all(shared.join("environments")).unwrap();
        std::fs::write(shared.join("environments/base.tar"), "").unwrap();
        let mut args = vec!["--shared-dir", shared.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (host, url) = start_host_with(dir.path(), &args);
        let data = dir.path().join("host");
        let join = read_trimmed(&data.join("join.token")).unwrap();
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(register(&url, &join, "lab-a"));
        Lab {
            _host: host,
            data: data.to_str().unwrap().to_string(),
            _dir: dir,
        }
    }

    /// The CLI with `token` (none: the admin's, found in the data dir).
    fn rn(&self, token: Option<&str>, args: &[&str]) -> std::process::Output {
        let mut a = vec!["--data-dir", self.data.as_str()];
        if let Some(t) = token {
            a.extend(["--token", t]);
        }
        a.extend_from_slice(args);
        cli(&a)
    }

    fn add(&self, name: &str, role: &str) -> String {
        let o = self.rn(None, &["-o", "json", "user", "add", name, "--role", role]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["token"].as_str().unwrap().to_string()
    }

    fn task(&self, token: Option<&str>, id: &str) -> serde_json::Value {
        let o = self.rn(token, &["-o", "json", "task", "status", id]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }

    fn vps(&self, token: &str) -> String {
        let o = self.rn(
            Some(token),
            &[
                "-o",
                "json",
                "vps",
                "create",
                "--container",
                "base",
                "--no-ssh-key",
                "-e",
                "SECRET=hunter2",
            ],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["id"].as_u64().unwrap().to_string()
    }
}

#[test]
fn a_users_vps_waits_for_an_operator_and_roles_do_only_what_they_say() {
    let lab = Lab::start(&[]);
    let bob = lab.add("bob", "user");
    let olga = lab.add("olga", "operator");
    let vera = lab.add("vera", "viewer");
    let o = lab.rn(None, &["user", "list"]);
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with("olga") && l.contains("operator")),
        "{}",
        stdout(&o)
    );

    // bob's VPS waits, placed nowhere, holding nothing.
    let first = lab.vps(&bob);
    let t = lab.task(Some(&bob), &first);
    assert_eq!(t["state"], "pending_approval", "{t}");
    assert!(t["placement"].is_null(), "{t}");
    assert!(
        t["reason"].as_str().unwrap().contains("rivernode approve"),
        "{t}"
    );
    // A person creating it is told, without waiting for it.
    let o = lab.rn(
        Some(&bob),
        &["vps", "create", "--container", "base", "--no-ssh-key"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("pending_approval"), "{}", stdout(&o));
    let second = stdout(&o)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .trim_end_matches(':')
        .to_string();

    // Only operators and the admin decide.
    for (who, token) in [("bob", &bob), ("vera", &vera)] {
        let o = lab.rn(Some(token), &["approve", &first]);
        assert!(!o.status.success(), "{who} approved");
        assert!(
            stderr(&o).contains("403") || stderr(&o).contains("needs"),
            "{who}: {}",
            stderr(&o)
        );
    }
    // A viewer sees bob's work, not the values of its variables, and changes nothing.
    let t = lab.task(Some(&vera), &first);
    assert_eq!(t["spec"]["env"]["SECRET"], "(set)", "{t}");
    assert!(!t.to_string().contains("hunter2"));
    let o = lab.rn(Some(&vera), &["-o", "json", "task", "list"]);
    assert!(
        stdout(&o).contains(&format!("\"id\":{first}"))
            || stdout(&o).contains(&format!("\"id\": {first}")),
        "{}",
        stdout(&o)
    );
    let o = lab.rn(Some(&vera), &["task", "kill", &first]);
    assert!(!o.status.success(), "a viewer killed a task");
    let o = lab.rn(
        Some(&vera),
        &["task", "submit", "--container", "base", "--", "true"],
    );
    assert!(!o.status.success(), "a viewer submitted work");
    // Its owner sees the values.
    assert_eq!(
        lab.task(Some(&bob), &first)["spec"]["env"]["SECRET"],
        "hunter2"
    );

    // olga approves the first: queued and placed at once (the node has room).
    let o = lab.rn(Some(&olga), &["approve", &first]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = lab.task(Some(&bob), &first);
    assert_eq!(t["state"], "assigning", "{t}");
    assert_eq!(t["placement"]["node"], "lab-a", "{t}");
    // Approving twice is a conflict, not a second placement.
    let o = lab.rn(Some(&olga), &["approve", &first]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("only a task waiting for approval"),
        "{}",
        stderr(&o)
    );

    // ...and rejects the second, with a reason bob reads.
    let o = lab.rn(
        Some(&olga),
        &["reject", &second, "--reason", "no room this week"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let t = lab.task(Some(&bob), &second);
    assert_eq!(t["state"], "rejected", "{t}");
    assert_eq!(t["message"], "rejected by olga: no room this week", "{t}");
    let o = lab.rn(Some(&bob), &["vps", "status", &second]);
    assert!(stdout(&o).contains("no room this week"), "{}", stdout(&o));
    // A restart does not pass the decision by; a delete clears it away.
    let o = lab.rn(Some(&bob), &["vps", "restart", &second]);
    assert!(!o.status.success(), "a rejected VPS restarted");
    let o = lab.rn(Some(&bob), &["vps", "delete", &second]);
    assert!(o.status.success(), "{}", stderr(&o));

    // An operator's own VPS does not wait; an operator stops anyone's work
    // but does not reach inside it.
    let own = lab.vps(&olga);
    assert_ne!(lab.task(Some(&olga), &own)["state"], "pending_approval");
    let o = lab.rn(Some(&olga), &["task", "logs", &first]);
    assert!(!o.status.success(), "an operator read bob's logs");
    // Her ssh config holds her own VPS, not bob's (the proxy would refuse those).
    let cfg = std::path::Path::new(&lab.data).join("olga_ssh_config");
    let known = std::path::Path::new(&lab.data).join("olga_known_hosts");
    let o = lab.rn(
        Some(&olga),
        &[
            "ssh",
            "config",
            "--file",
            cfg.to_str().unwrap(),
            "--known-hosts",
            known.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        text.contains(&format!("Host rivernode-vps-{own}\n")),
        "{text}"
    );
    assert!(
        !text.contains(&format!("Host rivernode-vps-{first}\n")),
        "{text}"
    );
    let o = lab.rn(Some(&olga), &["vps", "delete", &first]);
    assert!(!o.status.success(), "an operator deleted bob's disk");
    let o = lab.rn(Some(&olga), &["-o", "json", "task", "kill", &first]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !stdout(&o).contains("hunter2"),
        "the answer to an operator's kill shows no values: {}",
        stdout(&o)
    );

    // A withdrawn request ends before anyone decides.
    let third = lab.vps(&bob);
    let o = lab.rn(Some(&bob), &["task", "kill", &third]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(lab.task(Some(&bob), &third)["state"], "killed");
    // ...and a restart does not pass the approval by.
    let o = lab.rn(Some(&bob), &["vps", "restart", &third]);
    assert!(!o.status.success(), "a withdrawn request restarted");
    assert!(stderr(&o).contains("never ran"), "{}", stderr(&o));
    assert_eq!(lab.task(Some(&bob), &third)["state"], "killed");
}

#[test]
fn a_groups_quota_holds_work_back_with_the_numbers_and_a_request_too_big_is_refused() {
    // No approval here: quotas alone.
    let lab = Lab::start(&["--approval", "none"]);
    let add = |name: &str| {
        let o = lab.rn(
            None,
            &["-o", "json", "user", "add", name, "--group", "lab-a"],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["token"].as_str().unwrap().to_string()
    };
    let (ann, ben) = (add("ann"), add("ben"));
    let o = lab.rn(
        None,
        &[
            "quota", "set", "--group", "lab-a", "--vps", "1", "--cores", "3",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("vps 1, cores 3"), "{}", stdout(&o));

    let first = lab.vps(&ann);
    assert_eq!(lab.task(Some(&ann), &first)["state"], "assigning");
    // ben is in the same group: his VPS waits, saying whose quota and the numbers.
    let second = lab.vps(&ben);
    let t = lab.task(Some(&ben), &second);
    assert_eq!(t["state"], "pending", "{t}");
    assert_eq!(
        t["reason"], "over quota: group lab-a holds 1 of 1 running VPS and this asks for 1",
        "{t}"
    );
    let o = lab.rn(Some(&ben), &["quota", "show"]);
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with("group lab-a") && l.contains("1/1")),
        "{}",
        stdout(&o)
    );
    // More cores than the group may ever hold: refused at once, with the numbers.
    let o = lab.rn(
        Some(&ben),
        &[
            "task",
            "submit",
            "--container",
            "base",
            "-c",
            "4",
            "--",
            "true",
        ],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("group lab-a's quota (vps 1, cores 3) is smaller than this request"),
        "{}",
        stderr(&o)
    );
    // Lifting the quota (no limit given removes it) lets the second in.
    let o = lab.rn(None, &["quota", "set", "--group", "lab-a"]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_for("the second VPS placed", || {
        (lab.task(Some(&ben), &second)["state"] == "assigning").then_some(())
    });
    let o = lab.rn(Some(&ben), &["-o", "json", "quota", "show"]);
    assert_eq!(stdout(&o).trim(), "[]", "the quota is gone");
    // GPU time: hours in a rolling period (the store's tests count them).
    let o = lab.rn(
        None,
        &[
            "quota",
            "set",
            "--user",
            "ann",
            "--gpu-hours",
            "0.5",
            "--period",
            "1d",
        ],
    );
    assert!(
        stdout(&o).contains("0.5 GPU-hours per 1d"),
        "{}",
        stderr(&o)
    );
    let o = lab.rn(Some(&ann), &["quota", "show"]);
    assert!(stdout(&o).contains("0/0.5 per 1d"), "{}", stdout(&o));
}

/// The CLI with HOME at `home` (where login keeps client.toml), no admin data dir.
fn rn_at_home(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .env_remove("RIVERNODE_HOST")
        .env_remove("RIVERNODE_TOKEN")
        .env("HOME", home)
        .output()
        .unwrap()
}

#[test]
fn an_invitation_makes_one_person_once_before_it_expires() {
    let lab = Lab::start(&[]);
    let url = read_trimmed(&std::path::Path::new(&lab.data).join("api.url")).unwrap();
    let invite = |extra: &[&str]| {
        let mut a = vec!["-o", "json", "user", "invite", "--group", "lab-a"];
        a.extend_from_slice(extra);
        let o = lab.rn(None, &a);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["code"].as_str().unwrap().to_string()
    };
    let code = invite(&["--role", "operator", "--expires", "7d"]);
    let home = tempfile::tempdir().unwrap();
    let login = |code: &str, name: &str| {
        rn_at_home(
            home.path(),
            &[
                "--host", &url, "login", "--invite", code, "--name", name, "--force",
            ],
        )
    };
    let o = login(&code, "dora");
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = home.path().join(".config/rivernode/client.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("token = \"rnusr_"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The stored token and host work as they are: dora is an operator of lab-a.
    let o = rn_at_home(home.path(), &["whoami"]);
    assert!(stdout(&o).contains("dora"), "{}{}", stdout(&o), stderr(&o));
    let o = lab.rn(None, &["user", "list"]);
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with("dora") && l.contains("operator") && l.contains("lab-a")),
        "{}",
        stdout(&o)
    );
    // Without --force an existing token is kept.
    let o = rn_at_home(
        home.path(),
        &[
            "--host",
            &url,
            "login",
            "--invite",
            &invite(&[]),
            "--name",
            "eve",
        ],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already holds a token"),
        "{}",
        stderr(&o)
    );
    // Used once, never again.
    let o = login(&code, "dora2");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("was used"), "{}", stderr(&o));
    // A name taken is refused and the code is not spent.
    let spare = invite(&[]);
    let o = login(&spare, "dora");
    assert!(stderr(&o).contains("exists"), "{}", stderr(&o));
    assert!(login(&spare, "fay").status.success());
    // An expired code is refused.
    let short = invite(&["--expires", "1s"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let o = login(&short, "gus");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("expired"), "{}", stderr(&o));
    // A made-up code is no credential.
    let o = login("rninv_0000", "hal");
    assert!(stderr(&o).contains("401"), "{}", stderr(&o));

    // fay (client.toml holds her token now) rotates it: the file gets the
    // new one, the old one is refused, and her work is still hers.
    // What the person in `home` makes (`-o json` ARGS): its id.
    let make = |args: &[&str]| {
        let mut a = vec!["-o", "json"];
        a.extend_from_slice(args);
        let o = rn_at_home(home.path(), &a);
        assert!(o.status.success(), "{}", stderr(&o));
        common::cluster::created_id(&o)
    };
    let task = make(&["task", "submit", "--container", "base", "--", "true"]);
    let old = std::fs::read_to_string(&cfg).unwrap();
    let o = rn_at_home(home.path(), &["token", "rotate"]);
    assert!(
        stdout(&o).contains("fay's token rotated; the new one is in"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    let new = std::fs::read_to_string(&cfg).unwrap();
    assert_ne!(old, new);
    let old_token = old
        .lines()
        .find_map(|l| l.strip_prefix("token = "))
        .unwrap();
    let o = rn_at_home(
        home.path(),
        &["--token", old_token.trim_matches('"'), "whoami"],
    );
    assert!(stderr(&o).contains("401"), "{}", stderr(&o));
    let o = rn_at_home(home.path(), &["-o", "json", "task", "status", &task]);
    assert!(o.status.success(), "{}", stderr(&o));

    // The admin lists the invitations (used, open, expired) and revokes an open one.
    let open = invite(&[]);
    let o = lab.rn(None, &["-o", "json", "user", "invitations"]);
    let list: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(list.iter().any(|i| i["used_by"] == "dora"), "{list:?}");
    assert!(
        list.iter().all(|i| i.get("code").is_none()),
        "codes are never listed"
    );
    let newest = list[0]["id"].as_str().unwrap().to_string();
    let o = lab.rn(None, &["user", "invitations"]);
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with(&newest) && l.contains("open, expires")),
        "{}",
        stdout(&o)
    );
    let o = lab.rn(None, &["user", "uninvite", &newest]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        !login(&open, "ivy").status.success(),
        "a revoked code makes no one"
    );
    let o = lab.rn(
        None,
        &[
            "user",
            "uninvite",
            list[list.len() - 1]["id"].as_str().unwrap(),
        ],
    );
    assert!(
        stderr(&o).contains("was used already (by dora)"),
        "{}",
        stderr(&o)
    );

    // A role and group change reaches the person's next request: fay, a
    // viewer for a while, cannot submit; a user again, she can.
    let o = lab.rn(
        None,
        &["user", "set", "fay", "--role", "viewer", "--no-group"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = lab.rn(None, &["-o", "json", "user", "list"]);
    let users: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let fay = users.iter().find(|u| u["name"] == "fay").unwrap();
    assert_eq!(
        (&fay["role"], &fay["group"]),
        (&"viewer".into(), &serde_json::Value::Null)
    );
    let o = rn_at_home(home.path(), &["whoami"]);
    assert!(stdout(&o).starts_with("viewer fay"), "{}", stdout(&o));
    let o = rn_at_home(
        home.path(),
        &["task", "submit", "--container", "base", "--", "true"],
    );
    assert!(stderr(&o).contains("403"), "{}", stderr(&o));
    let o = lab.rn(
        None,
        &["user", "set", "fay", "--role", "user", "--group", "lab-b"],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    // fay's request that waits for approval ends when she is removed; her
    // placed task stays, for the admin.
    let waiting = make(&["vps", "create", "--container", "base", "--no-ssh-key"]);
    assert_eq!(lab.task(None, &waiting)["state"], "pending_approval");
    assert!(lab.rn(None, &["user", "remove", "fay"]).status.success());
    let t = lab.task(None, &waiting);
    assert_eq!(
        (&t["state"], &t["message"]),
        (&"rejected".into(), &"its owner was removed".into()),
        "{t}"
    );
    assert_eq!(lab.task(None, &task)["state"], "assigning");
}

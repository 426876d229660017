//! The command lines of the seeds (`shared/seeds/`), as a KohakuRiver user
//! types them: `kohakuriver` becomes `rivernode`, and the placeholders are
//! filled in (`mynode` is the test's node, `<task_id>` the first VPS, `~`
//! the test's HOME, `my-env` its busybox environment). Each either works,
//! or is refused with a message that says what to do instead.

mod common;

use std::path::Path;

use common::cluster::*;
use common::*;

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Succeeds; a VPS it creates is deleted again (the node has few cores).
    Works,
    /// Succeeds, and `<task_id>` reaches this state.
    Then(&'static str),
    /// Succeeds on a node big enough; elsewhere the refusal names one of these.
    FitsOrNames(&'static [&'static str]),
    /// Refused (or the VPS it creates fails) with a message containing this.
    Says(&'static str),
}

use Expect::*;

/// (seed file, command line as written there, what must happen).
const LINES: &[(&str, &str, Expect)] = &[
    (
        "kohakuriver-docker-vps.md",
        "vps create -t mynode --ssh",
        Then("running"),
    ),
    (
        "kohakuriver-docker-vps.md",
        "vps create -t mynode -c 8 -m 32G --container my-pytorch --ssh",
        FitsOrNames(&["cores", "memory"]),
    ),
    (
        "kohakuriver-docker-vps.md",
        "vps create -t mynode::0,1 -c 8 -m 32G --ssh",
        FitsOrNames(&["GPU", "cores"]),
    ),
    (
        "kohakuriver-docker-vps.md",
        "vps create -t mynode --container my-env --ssh",
        Works,
    ),
    // The flags table's `-c 0` ("no limit"): no cores of its own, it shares
    // the node's unreserved ones.
    (
        "kohakuriver-vps-overview.md",
        "vps create -t mynode --ssh -c 0",
        Works,
    ),
    (
        "kohakuriver-docker-vps.md",
        "vps create -t mynode --ssh --gen-ssh-key --key-out-file ~/.ssh/mynode_vps",
        Works,
    ),
    (
        "kohakuriver-docker-vps.md",
        "vps create -t mynode --privileged --ssh",
        Works,
    ),
    (
        "kohakuriver-docker-vps.md",
        "vps pause <task_id>",
        Then("paused"),
    ),
    (
        "kohakuriver-docker-vps.md",
        "vps resume <task_id>",
        Then("running"),
    ),
    (
        "kohakuriver-docker-vps.md",
        "vps snapshot create <task_id>",
        Works,
    ),
    (
        "kohakuriver-docker-vps.md",
        "vps snapshot list <task_id>",
        Works,
    ),
    (
        "kohakuriver-docker-vps.md",
        "vps stop <task_id>",
        Then("stopped"),
    ),
    (
        "kohakuriver-docker-vps.md",
        "vps restart <task_id>",
        Then("running"),
    ),
    (
        "kohakuriver-docker-vps.md",
        "vps stop <task_id>",
        Then("stopped"),
    ),
    (
        "kohakuriver-docker-vps.md",
        "vps restart <task_id> --from-snapshot",
        Then("running"),
    ),
    // The login itself, with a command so the test need not type.
    ("kohakuriver-ssh-access.md", "ssh <task_id> -- true", Works),
    (
        "kohakuriver-ssh-access.md",
        "ssh <task_id> --key ~/.ssh/mykey -- true",
        Works,
    ),
    ("kohakuriver-ssh-access.md", "ssh config", Works),
    (
        "kohakuriver-ssh-access.md",
        "ssh config --output ~/.ssh/kohakuriver_config",
        Works,
    ),
    (
        "kohakuriver-ssh-access.md",
        "vps create -t mynode --ssh --gen-ssh-key",
        Works,
    ),
    (
        "kohakuriver-ssh-access.md",
        "vps create -t mynode --ssh --public-key-file ~/.ssh/custom_key.pub",
        Works,
    ),
    (
        "kohakuriver-ssh-access.md",
        "vps create -t mynode --ssh --public-key-string CUSTOM_KEY",
        Works,
    ),
    // busybox has no SSH server of its own: rivernode never runs root without a login.
    (
        "kohakuriver-ssh-access.md",
        "vps create -t mynode --ssh --no-ssh-key",
        Says("needs an SSH key or a password"),
    ),
    ("kohakuriver-ssh-access.md", "vps status <task_id>", Works),
    ("kohakuriver-ssh-access.md", "node status mynode", Works),
    (
        "kohakuriver-vps-overview.md",
        "vps create -t mynode --ssh -c 4 -m 8G",
        FitsOrNames(&["cores", "memory"]),
    ),
    (
        "kohakuriver-vps-overview.md",
        "vps create --backend qemu -t mynode::0 --vm-memory 16384 -c 8 --ssh",
        // As written, with the operator's default image: `::0` asks for
        // GPU 0, which this test node does not have, and the host says so.
        FitsOrNames(&["GPU", "cores"]),
    ),
    // Interactive as written; with no terminal on stdin the shell sees its end.
    ("kohakuriver-vps-overview.md", "connect <task_id>", Works),
    (
        "kohakuriver-vps-overview.md",
        "terminal attach <task_id>",
        Works,
    ),
    (
        "kohakuriver-vps-overview.md",
        "terminal exec <task_id> -- ps aux",
        Works,
    ),
    (
        "kohakuriver-ssh-access.md",
        "terminal exec <task_id> -- cat /root/.ssh/authorized_keys",
        Works,
    ),
    ("kohakuriver-vps-overview.md", "vps list", Works),
    ("kohakuriver-vps-overview.md", "vps status <task_id>", Works),
];

/// Words of `line`, with `"..."` kept together.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn keygen(path: &Path) {
    let o = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn the_seeds_command_lines_work_as_written() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        // The operator names the default environment, as KohakuRiver's config does.
        let Some(v) = Vps::start_with(
            "seednode",
            &[
                "--allow-privileged",
                "--default-environment",
                "busybox",
                "--default-vm-image",
                "ubuntu-24.04",
            ],
        ) else {
            return;
        };
        // The default image is there (its content matters only to a node).
        let images = v.dir.path().join("shared/vm-images");
        std::fs::create_dir_all(&images).unwrap();
        std::fs::write(images.join("ubuntu-24.04.qcow2"), b"").unwrap();
        let home = v.dir.path().join("home");
        std::fs::create_dir_all(home.join(".ssh")).unwrap();
        keygen(&home.join(".ssh/id_ed25519"));
        std::fs::copy(home.join(".ssh/id_ed25519"), home.join(".ssh/mykey")).unwrap();
        keygen(&home.join(".ssh/custom_key"));
        let custom = std::fs::read_to_string(home.join(".ssh/custom_key.pub")).unwrap();
        let data = v.host_data();
        let run = |line: &str, task: &str| {
            let filled = line
                .replace("mynode", &v.node)
                .replace("<task_id>", task)
                .replace("my-pytorch", "busybox")
                .replace("my-env", "busybox")
                .replace('~', home.to_str().unwrap())
                .replace("CUSTOM_KEY", &format!("\"{}\"", custom.trim()));
            let mut args = vec![
                "--data-dir".to_string(),
                data.to_str().unwrap().to_string(),
                "-o".into(),
                "json".into(),
            ];
            // `ssh` and the terminals print their session, not JSON.
            if ["ssh", "connect", "terminal"]
                .iter()
                .any(|c| filled.starts_with(c))
            {
                args.truncate(2);
            }
            args.extend(words(&filled));
            let o = std::process::Command::new(BIN)
                .args(&args)
                .env("HOME", &home)
                .env_remove("RIVERNODE_HOST")
                .env_remove("RIVERNODE_TOKEN")
                .stdin(std::process::Stdio::null())
                .output()
                .unwrap();
            (filled, o)
        };
        let mut task = String::new();
        for (seed, line, expect) in LINES {
            let (filled, o) = run(line, &task);
            let what = format!("{seed}: `{line}` (ran `{filled}`)");
            let err = stderr(&o);
            let created =
                (line.starts_with("vps create") && o.status.success()).then(|| created_id(&o));
            match expect {
                Works | Then(_) => assert!(o.status.success(), "{what}: {:?} {err}", o.status),
                FitsOrNames(fields) => assert!(
                    o.status.success() || fields.iter().any(|f| err.contains(f)),
                    "{what}: {err}"
                ),
                Says(text) => {
                    if let Some(id) = &created {
                        v.wait_state(id, "failed");
                        let t = v.json(&["task", "status", id]);
                        let m = t["message"].as_str().unwrap_or_default().to_string();
                        assert!(m.contains(text), "{what}: {m}");
                    } else {
                        assert!(err.contains(text), "{what}: {err}");
                    }
                }
            }
            if let Then(state) = expect {
                if task.is_empty() {
                    task = created.clone().expect("the first line creates the VPS");
                }
                v.wait_state(&task, state);
            } else if let Some(id) = created.filter(|id| *id != task) {
                if !matches!(expect, Says(_)) {
                    v.wait_state(&id, "running");
                }
                assert!(v.rn(&["vps", "delete", &id]).status.success());
                // (A failed one is `failed` until its delete is done.)
                wait_for(&format!("vps {id} deleted"), || {
                    (v.state(&id) == "deleted").then_some(())
                });
            }
        }
        // The key the seed told vps create to write logs in (ssh finds it
        // on its own: it was recorded when the VPS was created).
        let o = run(
            "vps create -t mynode --ssh --gen-ssh-key --key-out-file ~/.ssh/second_key",
            &task,
        )
        .1;
        let id = created_id(&o);
        v.wait_state(&id, "running");
        let (_, o) = run(&format!("ssh {id} -- echo in"), &task);
        assert_eq!(stdout(&o), "in\n", "{}", stderr(&o));
        // `ssh <task_id> --key ~/.ssh/mykey --user root --proxy-port 8002
        // --local-port 2222` (kohakuriver-ssh-access.md), with this host's
        // proxy port and a free local port: the VPS's SSH server answers there.
        let proxy = v.json(&["whoami"])["ssh_proxy_port"].to_string();
        let local = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local_port = local.local_addr().unwrap().port().to_string();
        drop(local);
        let mut fwd = std::process::Command::new(BIN)
            .args(["--data-dir", data.to_str().unwrap(), "ssh", &task, "--key"])
            .arg(home.join(".ssh/mykey"))
            .args([
                "--user",
                "root",
                "--proxy-port",
                &proxy,
                "--local-port",
                &local_port,
            ])
            .env("HOME", &home)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let banner = wait_for("the local port answers", || {
            use std::io::Read;
            let mut c = std::net::TcpStream::connect(format!("127.0.0.1:{local_port}")).ok()?;
            c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            let mut buf = [0u8; 64];
            let n = c.read(&mut buf).ok()?;
            Some(String::from_utf8_lossy(&buf[..n]).to_string())
        });
        let _ = fwd.kill();
        let _ = fwd.wait();
        assert!(banner.starts_with("SSH-2.0-"), "{banner}");
        // `forward <task_id> 8080 --local-port 8080`
        // (kohakuriver-vps-overview.md), to a web server in the VPS.
        let (_, o) = run(
            "terminal exec <task_id> -- httpd -p 127.0.0.1:8080 -h /tmp",
            &task,
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let mut fwd = std::process::Command::new(BIN)
            .args(["--data-dir", data.to_str().unwrap()])
            .args(words(&format!("forward {task} 8080 --local-port 8080")))
            .env("HOME", &home)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let answer = wait_for("the forwarded port answers", || {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect("127.0.0.1:8080").ok()?;
            c.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
            let mut a = String::new();
            c.read_to_string(&mut a).ok()?;
            Some(a)
        });
        let _ = fwd.kill();
        let _ = fwd.wait();
        assert!(answer.starts_with("HTTP/1."), "{answer}");
        // `ssh config --output` wrote entries for both, the stopped one kept.
        let config = std::fs::read_to_string(home.join(".ssh/kohakuriver_config")).unwrap();
        assert!(
            config.contains(&format!("Host rivernode-vps-{task}")),
            "{config}"
        );
        assert!(config.contains("PasswordAuthentication no"), "{config}");
    });
}

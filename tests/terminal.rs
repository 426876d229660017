//! `terminal exec`, `terminal attach` and `connect` against a VPS and a
//! command task on real containerd, through the host's websocket to the
//! runner: exit statuses, stdout and stderr apart, input, a terminal that
//! answers `tty`, only the owner, and a shell typed into with tmux.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::cluster::*;
use common::*;

/// `rivernode terminal exec ...` with `input` on its stdin.
fn exec(v: &Vps, args: &[&str], input: &str) -> std::process::Output {
    let data = v.host_data();
    let mut c = Command::new(BIN)
        .args(["--data-dir", data.to_str().unwrap(), "terminal", "exec"])
        .args(args)
        .env("HOME", "/nonexistent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    c.wait_with_output().unwrap()
}

#[test]
fn exec_runs_in_a_vps_and_a_task_with_its_streams_apart_and_its_status() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("term-a") else {
            return;
        };
        let vps = v.create();
        let o = exec(
            &v,
            &[&vps, "--", "sh", "-c", "echo out; echo err >&2; exit 3"],
            "",
        );
        assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
        assert_eq!(stdout(&o), "out\n");
        assert_eq!(stderr(&o), "err\n");
        // Input reaches it, and its end too (cat ends).
        let o = exec(&v, &[&vps, "--", "cat"], "hello\nworld\n");
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout(&o), "hello\nworld\n");
        // With -t it has a terminal (and without, it has none).
        let probe = "[ -t 0 ] && [ -t 1 ] && echo terminal || echo none";
        let o = exec(&v, &["-t", &vps, "--", "sh", "-c", probe], "");
        assert_eq!(stdout(&o).trim(), "terminal", "{}", stderr(&o));
        let o = exec(&v, &[&vps, "--", "sh", "-c", probe], "");
        assert_eq!(stdout(&o).trim(), "none", "{}", stderr(&o));
        // The seed's check that a key was injected.
        let o = exec(&v, &[&vps, "--", "cat", "/root/.ssh/authorized_keys"], "");
        assert!(stdout(&o).starts_with("ssh-ed25519 "), "{}", stderr(&o));

        // A command task, too.
        let task = created_id(&v.rn(&[
            "-o",
            "json",
            "task",
            "submit",
            "--container",
            "busybox",
            "--",
            "sleep",
            "1000",
        ]));
        v.wait_state(&task, "running");
        let o = exec(
            &v,
            &[&task, "--", "sh", "-c", "echo in task $RIVERNODE_TASK_ID"],
            "",
        );
        assert_eq!(stdout(&o), format!("in task {task}\n"), "{}", stderr(&o));

        // Only its owner: another user sees no such task.
        let bob = v.add_user("bob");
        let data = v.host_data();
        let o = Command::new(BIN)
            .args(["--data-dir", data.to_str().unwrap(), "--token", &bob])
            .args(["terminal", "exec", &vps, "--", "true"])
            .output()
            .unwrap();
        assert!(!o.status.success());
        assert!(stderr(&o).contains("no task"), "{}", stderr(&o));

        // A stopped VPS says so.
        v.rn(&["vps", "stop", &vps]);
        v.wait_state(&vps, "stopped");
        let o = exec(&v, &[&vps, "--", "true"], "");
        assert!(stderr(&o).contains("not running"), "{}", stderr(&o));
        v.rn(&["task", "kill", &task]);
    });
}

#[test]
fn a_vps_without_ssh_runs_its_own_command_and_is_reached_by_terminal_only() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("term-n") else {
            return;
        };
        let o = v.rn(&[
            "-o",
            "json",
            "vps",
            "create",
            "--no-ssh",
            "--container",
            "busybox",
            "--",
            "sleep",
            "1000",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let vps = created_id(&o);
        v.wait_state(&vps, "running");
        // Its command is its first process: no SSH server was put in.
        let o = exec(&v, &[&vps, "--", "cat", "/proc/1/cmdline"], "");
        assert_eq!(stdout(&o), "sleep\u{0}1000\u{0}", "{}", stderr(&o));
        let o = exec(&v, &[&vps, "--", "ls", "/root/.ssh"], "");
        assert!(!o.status.success(), "no keys were put in: {}", stdout(&o));
        // No node port, no host key; ssh and the proxy say what to use.
        let t = v.json(&["vps", "status", &vps]);
        assert!(t["placement"]["node_port"].is_null(), "{t}");
        assert!(t["ssh_host_key"].is_null(), "{t}");
        let o = v.rn(&["ssh", &vps]);
        assert!(!o.status.success());
        assert!(
            stderr(&o).contains(&format!("rivernode connect {vps}")),
            "{}",
            stderr(&o)
        );
        let o = v.rn(&["ssh-proxy-command", &vps]);
        assert!(stderr(&o).contains("no SSH server"), "{}", stderr(&o));
        let text = stdout(&v.rn(&["vps", "status", &vps]));
        assert!(text.contains("--no-ssh"), "{text}");
        // Its entry is left out of ssh config.
        let known = v.runner_data().join("known_hosts");
        let o = v.rn(&["ssh", "config", "--known-hosts", known.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        let cfg = stdout(&o);
        assert!(cfg.starts_with("# Generated by"), "{cfg}");
        assert!(!cfg.contains(&format!("rivernode-vps-{vps}")), "{cfg}");
        // A restart runs its command again (not an SSH server).
        v.rn(&["vps", "stop", &vps]);
        v.wait_state(&vps, "stopped");
        v.rn(&["vps", "restart", &vps]);
        v.wait_state(&vps, "running");
        let o = exec(&v, &[&vps, "--", "cat", "/proc/1/cmdline"], "");
        assert_eq!(stdout(&o), "sleep\u{0}1000\u{0}", "{}", stderr(&o));
        // Without a command it runs the image's (busybox's: /bin/sh, which
        // ends at once with no input): the VPS ends, its disk kept.
        let o = v.rn(&[
            "-o",
            "json",
            "vps",
            "create",
            "--no-ssh",
            "--container",
            "busybox",
        ]);
        let bare = created_id(&o);
        let t = wait_for("the image's command to end", || {
            let t = v.json(&["vps", "status", &bare]);
            (t["state"] == "completed").then_some(t)
        });
        assert!(
            t["message"]
                .as_str()
                .unwrap_or_default()
                .contains("main process exited with code 0"),
            "{t}"
        );
        v.delete(&vps);
    });
}

#[test]
fn connect_gives_a_shell_that_answers_what_is_typed() {
    if !parts_present() || !real_part_available("tmux", command_exists("tmux")) {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("term-b") else {
            return;
        };
        let vps = v.create();
        let session = format!("rn-connect-{}", std::process::id());
        let data = v.host_data();
        let cmd = format!(
            "{BIN} --data-dir {} connect {vps}; echo EXITED $?; sleep 30",
            data.display()
        );
        let tmux = |args: &[&str]| {
            let o = Command::new("tmux").args(args).output().unwrap();
            assert!(
                o.status.success(),
                "tmux {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            String::from_utf8_lossy(&o.stdout).to_string()
        };
        tmux(&[
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "120",
            "-y",
            "30",
            &cmd,
        ]);
        let pane = || tmux(&["capture-pane", "-p", "-t", &session]);
        // A prompt (busybox sh as root: "# " or "~ # ").
        wait_for("a prompt", || pane().contains('#').then_some(()));
        tmux(&[
            "send-keys",
            "-t",
            &session,
            "echo $((6*7)); stty size",
            "Enter",
        ]);
        let screen = wait_for("the answer", || {
            let p = pane();
            (p.contains("42") && p.contains("30 120")).then_some(p)
        });
        assert!(
            screen.contains("30 120"),
            "the window's size reached the terminal: {screen}"
        );
        tmux(&["send-keys", "-t", &session, "exit 5", "Enter"]);
        let screen = wait_for("connect ended", || {
            let p = pane();
            p.contains("EXITED").then_some(p)
        });
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &session])
            .output();
        assert!(
            screen.contains("EXITED 5"),
            "the shell's status is connect's: {screen}"
        );
    });
}

/// `rivernode forward ...` with its stdout read up to the line that says
/// where it listens; the child and that local address.
fn forward(v: &Vps, token: Option<&str>, args: &[&str]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let data = v.host_data();
    let mut c = Command::new(BIN);
    c.args(["--data-dir", data.to_str().unwrap()]);
    if let Some(t) = token {
        c.args(["--token", t]);
    }
    let mut child = c
        .arg("forward")
        .args(args)
        .args(["--local-port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .strip_prefix("Forwarding ")
        .and_then(|r| r.split_whitespace().next())
        .map(str::to_string)
        .unwrap_or_default();
    (child, addr)
}

/// An HTTP/1.0 GET of `path` on `conn`; the whole answer.
fn get(conn: &mut std::net::TcpStream, path: &str) -> Vec<u8> {
    use std::io::Read;
    write!(conn, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).unwrap();
    answer
}

/// A UDP echo server on 127.0.0.1:`port` inside the network namespace of
/// the process `pid` (as a server in the instance would be: busybox has
/// none); it answers each datagram with "echo:" and the datagram.
fn udp_echo_in(pid: u32, port: u16) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let s = std::net::UdpSocket::bind(("127.0.0.1", port)).unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = s.recv_from(&mut buf) {
            let mut answer = b"echo:".to_vec();
            answer.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&answer, from);
        }
    });
    rx.recv().unwrap();
}

#[test]
fn forward_reaches_tcp_and_udp_ports_of_a_vps_for_its_owner_only() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("term-c") else {
            return;
        };
        let vps = v.create();
        // An HTTP server on the instance's loopback only, with a file
        // larger than a connection's window (flow control is exercised).
        let o = exec(
            &v,
            &[
                &vps,
                "--",
                "sh",
                "-c",
                "mkdir -p /tmp/www && echo hello-forward > /tmp/www/index.html \
                 && head -c 3000000 /dev/zero > /tmp/www/big \
                 && httpd -p 127.0.0.1:8080 -h /tmp/www",
            ],
            "",
        );
        assert!(o.status.success(), "{}", stderr(&o));

        let (mut tcp, addr) = forward(&v, None, &[&vps, "8080"]);
        assert!(!addr.is_empty(), "forward said where it listens");
        // Two connections at once over the one session: the first is
        // opened and left waiting while the second is answered.
        let mut first = std::net::TcpStream::connect(&addr).unwrap();
        let mut second = std::net::TcpStream::connect(&addr).unwrap();
        let b = get(&mut second, "/index.html");
        assert!(
            String::from_utf8_lossy(&b).contains("hello-forward"),
            "{}",
            String::from_utf8_lossy(&b)
        );
        let big = get(&mut first, "/big");
        let body = big.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(big.len() - body, 3_000_000, "the whole file came through");

        // UDP: two local peers, each answered on its own.
        let pid: u32 = v
            .ctr(&["task", "ls"])
            .lines()
            .find(|l| l.starts_with(&format!("term-c-task-{vps} ")))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
            .expect("the VPS's pid");
        udp_echo_in(pid, 5353);
        let (mut udp, uaddr) = forward(&v, None, &[&vps, "5353", "--proto", "udp"]);
        let peers: Vec<std::net::UdpSocket> = (0..2)
            .map(|_| {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
                    .unwrap();
                s.connect(&uaddr).unwrap();
                s
            })
            .collect();
        for (i, p) in peers.iter().enumerate() {
            p.send(format!("ping{i}").as_bytes()).unwrap();
        }
        for (i, p) in peers.iter().enumerate() {
            let mut buf = [0u8; 64];
            let n = p.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], format!("echo:ping{i}").as_bytes());
        }

        // Another user: no such task, and nothing listens.
        let bob = v.add_user("bob");
        let (refused, none) = forward(&v, Some(&bob), &[&vps, "8080"]);
        let o = refused.wait_with_output().unwrap();
        assert!(!o.status.success() && none.is_empty());
        assert!(stderr(&o).contains("no task"), "{}", stderr(&o));

        // The instance stops: both sessions end, saying so.
        v.rn(&["vps", "stop", &vps]);
        v.wait_state(&vps, "stopped");
        for child in [&mut tcp, &mut udp] {
            let status = child.wait().unwrap();
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            assert!(status.success(), "{err}");
            assert!(err.contains(&format!("task {vps} stopped")), "{err}");
        }
    });
}

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

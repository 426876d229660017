//! What an unprivileged container may not do, on real containerd and runc:
//! the default seccomp profile refuses new namespaces (EPERM), setuid
//! programs gain nothing (no_new_privileges), and `--privileged` (allowed
//! by the operator here) lifts both.

mod common;

use common::cluster::*;
use common::*;

const PROBE: &str =
    "unshare -U true 2>&1; echo \"rc=$?\"; grep -E '^(Seccomp|NoNewPrivs):' /proc/self/status";

fn run(v: &Vps, extra: &[&str]) -> String {
    let mut args = vec!["-o", "json", "task", "submit", "--container", "busybox"];
    args.extend_from_slice(extra);
    args.extend(["--", "sh", "-c", PROBE]);
    let id = created_id(&v.rn(&args));
    v.wait_state(&id, "completed");
    stdout(&v.rn(&["task", "logs", &id]))
}

#[test]
fn unprivileged_containers_are_confined_and_privileged_ones_are_not() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start_with("conf-a", &["--allow-privileged"]) else {
            return;
        };
        let out = run(&v, &[]);
        assert!(out.contains("Operation not permitted"), "{out}");
        assert!(!out.contains("rc=0"), "unshare -U was refused: {out}");
        // 2: a seccomp filter is installed.
        assert!(out.contains("Seccomp:\t2"), "{out}");
        assert!(out.contains("NoNewPrivs:\t1"), "{out}");

        // F13: allow_privileged is the admin's; a user is refused.
        let alice = v.add_user("alice");
        let o = v.rn_as(
            &alice,
            &[
                "task",
                "submit",
                "--privileged",
                "--container",
                "busybox",
                "--",
                "true",
            ],
        );
        assert!(!o.status.success());
        assert!(stderr(&o).contains("only the admin"), "{}", stderr(&o));

        let out = run(&v, &["--privileged"]);
        assert!(out.contains("rc=0"), "privileged: unconfined: {out}");
        assert!(
            out.contains("Seccomp:\t0") && out.contains("NoNewPrivs:\t0"),
            "{out}"
        );
    });
}

#[test]
fn a_command_runs_as_the_images_user_looked_up_in_the_image() {
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("conf-b") else {
            return;
        };
        let passwd = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
        let group = "root:x:0:\napp:x:1000:\nvideo:x:44:app\n";
        let envs = v.dir.path().join("shared/environments");
        let image_as = |user: &str, env: &str| {
            let build = v.dir.path().join(env);
            std::fs::create_dir_all(&build).unwrap();
            let archive =
                common::containerd::busybox_oci_archive_as(&build, Some((user, passwd, group)))
                    .unwrap();
            std::fs::copy(&archive, envs.join(format!("{env}.tar"))).unwrap();
        };
        image_as("app", "busybox-app");
        let o = v.rn(&[
            "-o",
            "json",
            "task",
            "submit",
            "--container",
            "busybox-app",
            "--",
            "sh",
            "-c",
            "echo \"$(id -u):$(id -g):$(id -G):$HOME\"",
        ]);
        let id = created_id(&o);
        v.wait_state(&id, "completed");
        assert_eq!(
            stdout(&v.rn(&["task", "logs", &id])),
            "1000:1000:1000 44:/home/app\n"
        );

        // A User the image's passwd does not have fails, saying so.
        image_as("ghost", "busybox-ghost");
        let o = v.rn(&[
            "-o",
            "json",
            "task",
            "submit",
            "--container",
            "busybox-ghost",
            "--",
            "true",
        ]);
        let id = created_id(&o);
        v.wait_state(&id, "failed");
        let t = v.json(&["task", "status", &id]);
        assert!(
            t["message"].as_str().unwrap_or_default().contains("ghost"),
            "{t}"
        );
    });
}

#[test]
fn each_user_sees_only_their_own_part_of_the_share() {
    // F10: one user cannot plant a module next to another's training script.
    if !parts_present() {
        return;
    }
    private_namespaces(|| {
        let Some(v) = Vps::start("conf-c") else {
            return;
        };
        let as_user = |token: &str, script: &str| {
            let o = v.rn_as(
                token,
                &[
                    "-o",
                    "json",
                    "task",
                    "submit",
                    "--container",
                    "busybox",
                    "--",
                    "sh",
                    "-c",
                    script,
                ],
            );
            let id = created_id(&o);
            v.wait_state(&id, "completed");
            stdout(&v.rn(&["task", "logs", &id]))
        };
        let (alice, bob) = (v.add_user("alice"), v.add_user("bob"));
        let out = as_user(
            &alice,
            "echo evil > /shared/numpy.py && pwd && grep ' /shared ' /proc/self/mounts",
        );
        assert!(out.starts_with("/shared\n"), "{out}");
        assert!(out.contains("nosuid") && out.contains("nodev"), "{out}");
        let share = v.dir.path().join("shared");
        assert_eq!(
            std::fs::read_to_string(share.join("users/alice/numpy.py")).unwrap(),
            "evil\n"
        );
        // Bob's /shared is his own: no numpy.py, and no way up to alice's.
        let out = as_user(
            &bob,
            "ls -a /shared; cat /shared/numpy.py ../users/alice/numpy.py 2>&1; true",
        );
        assert!(!out.contains("evil"), "{out}");
        assert!(
            out.contains("environments"),
            "environments are still there: {out}"
        );
        assert!(!share.join("users/bob/numpy.py").exists());
    });
}

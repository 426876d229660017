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

        let out = run(&v, &["--privileged"]);
        assert!(out.contains("rc=0"), "privileged: unconfined: {out}");
        assert!(
            out.contains("Seccomp:\t0") && out.contains("NoNewPrivs:\t0"),
            "{out}"
        );
    });
}

//! Node-local admin commands on this machine, read-only: `rivernode cgroup`
//! works on a cgroup v2 host and refuses a v1/hybrid one with one line that
//! says why; `rivernode gpu list` reports this machine's GPUs (none here).
//! Limits and VFIO binding on a real kernel are tested in tests/kernel; this
//! machine's own cgroups and devices are never touched.

mod common;

use common::*;

#[test]
fn cgroup_list_matches_this_hosts_hierarchy() {
    let is_v2 = nix::sys::statfs::statfs("/sys/fs/cgroup")
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false);
    // A subtree name that cannot exist here, so a v2 host lists nothing and nothing is created.
    let o = cli(&[
        "cgroup",
        "list",
        "--subtree",
        "rivernode-test-absent",
        "-o",
        "json",
    ]);
    if is_v2 {
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout(&o).trim(), "[]");
    } else {
        assert!(!o.status.success());
        let e = stderr(&o);
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        assert!(e.contains("not cgroup2") && e.contains("cgroup v2"), "{e}");
    }
    assert!(!std::path::Path::new("/sys/fs/cgroup/rivernode-test-absent").exists());
}

#[test]
fn cgroup_show_on_a_fake_v2_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cg");
    let dir = root.join("rivernode/task-9");
    std::fs::create_dir_all(&dir).unwrap();
    let mountinfo = tmp.path().join("mountinfo");
    std::fs::write(
        &mountinfo,
        format!("30 22 0:26 / {} rw - cgroup2 cgroup2 rw\n", root.display()),
    )
    .unwrap();
    for (f, v) in [
        ("cgroup.events", "populated 1\nfrozen 0\n"),
        ("cgroup.procs", "42\n"),
        ("memory.max", "33554432\n"),
        ("memory.current", "1048576\n"),
        ("cpu.max", "50000 100000\n"),
        ("pids.max", "max\n"),
    ] {
        std::fs::write(dir.join(f), v).unwrap();
    }
    let base = [
        "--cgroup-root",
        root.to_str().unwrap(),
        "--mountinfo",
        mountinfo.to_str().unwrap(),
    ];
    let mut args = vec!["cgroup", "list"];
    args.extend(base);
    let o = cli(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    let row = text.lines().nth(1).unwrap();
    assert!(
        row.starts_with("task-9") && row.contains("50000 100000") && row.contains("32.0 MiB"),
        "{text}"
    );
    let mut args = vec!["cgroup", "show", "task-9", "-o", "json"];
    args.extend(base);
    let o = cli(&args);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["processes"], 1);
    assert_eq!(v["limits"]["pids_max"], "max");
}

#[test]
fn gpu_list_matches_this_machines_display_devices() {
    // Count display-class (03xx) PCI functions independently of rivernode.
    let display = std::fs::read_dir("/sys/bus/pci/devices")
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("class"))
                        .map(|c| c.trim().starts_with("0x03"))
                        .unwrap_or(false)
                })
                .count()
        })
        .unwrap_or(0);
    let tmp = tempfile::tempdir().unwrap();
    let o = cli(&[
        "--data-dir",
        tmp.path().to_str().unwrap(),
        "gpu",
        "list",
        "-o",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let list: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list.len(), display);
    if display == 0 {
        assert_eq!(stdout(&o).trim(), "[]");
    }
}

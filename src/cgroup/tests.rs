//! Unit tests on fake cgroupfs trees; the real kernel's behaviour is tested
//! in tests/kernel.

use std::fs;
use std::time::Duration;

use super::*;

const V2_MOUNTINFO: &str = "22 1 0:21 / /sys rw - sysfs sysfs rw\n30 22 0:26 / ROOT rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";

struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    fn new(mountinfo: &str) -> Self {
        let f = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        let root = f.root();
        fs::create_dir_all(&root).unwrap();
        fs::write(
            f.dir.path().join("mountinfo"),
            mountinfo.replace("ROOT", root.to_str().unwrap()),
        )
        .unwrap();
        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        )
        .unwrap();
        fs::write(root.join("cgroup.subtree_control"), "").unwrap();
        f
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("cg")
    }

    fn fs(&self) -> CgroupFs {
        CgroupFs::new(self.root(), self.dir.path().join("mountinfo"))
    }

    /// What the kernel would create on mkdir.
    fn kernel_files(&self, rel: &str) -> PathBuf {
        let d = self.root().join(rel);
        fs::create_dir_all(&d).unwrap();
        for f in [
            "cgroup.subtree_control",
            "cgroup.procs",
            "cgroup.freeze",
            "cgroup.kill",
            "cpu.max",
            "cpu.weight",
            "memory.max",
            "memory.high",
            "memory.swap.max",
            "pids.max",
            "cpuset.cpus",
            "cpuset.mems",
            "io.max",
        ] {
            fs::write(d.join(f), "").unwrap();
        }
        fs::write(d.join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n",
        )
        .unwrap();
        d
    }
}

#[test]
fn v2_detection() {
    let f = Fake::new(V2_MOUNTINFO);
    f.fs().check_v2().unwrap();

    let hybrid = "31 23 0:28 / ROOT rw - tmpfs tmpfs rw,mode=755\n32 31 0:29 / ROOT/cpu rw - cgroup cgroup rw,cpu\n";
    let e = Fake::new(hybrid).fs().check_v2().unwrap_err().to_string();
    assert!(e.contains("tmpfs") && e.contains("cgroup v2"), "{e}");

    let e = Fake::new("22 1 0:21 / /sys rw - sysfs sysfs rw\n")
        .fs()
        .check_v2()
        .unwrap_err();
    assert!(matches!(e, CgroupError::NotMounted { .. }), "{e}");

    // A later mount over the same path wins.
    let shadowed = format!("{V2_MOUNTINFO}40 30 0:40 / ROOT rw - tmpfs tmpfs rw\n");
    assert!(Fake::new(&shadowed).fs().check_v2().is_err());
}

#[test]
fn this_machine_is_judged_by_its_real_mount() {
    // Read-only: compares our mountinfo reading with statfs(2) of /sys/fs/cgroup.
    let is_v2 = nix::sys::statfs::statfs("/sys/fs/cgroup")
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false);
    assert_eq!(CgroupFs::system().check_v2().is_ok(), is_v2);
}

#[test]
fn subtree_enables_controllers_along_the_path() {
    let f = Fake::new(V2_MOUNTINFO);
    f.kernel_files("rivernode");
    let st = f.fs().subtree("rivernode", &Controller::ALL).unwrap();
    assert_eq!(st.path(), f.root().join("rivernode"));
    let want = "+cpu +cpuset +memory +io +pids";
    assert_eq!(
        fs::read_to_string(f.root().join("cgroup.subtree_control")).unwrap(),
        want
    );
    assert_eq!(
        fs::read_to_string(f.root().join("rivernode/cgroup.subtree_control")).unwrap(),
        want
    );

    // Already enabled: nothing is written again.
    fs::write(
        f.root().join("cgroup.subtree_control"),
        "cpuset cpu io memory pids\n",
    )
    .unwrap();
    fs::write(
        f.root().join("rivernode/cgroup.subtree_control"),
        "cpuset cpu io memory pids\n",
    )
    .unwrap();
    f.fs().subtree("rivernode", &Controller::ALL).unwrap();
    assert_eq!(
        fs::read_to_string(f.root().join("cgroup.subtree_control")).unwrap(),
        "cpuset cpu io memory pids\n"
    );
}

#[test]
fn missing_controller_is_named() {
    let f = Fake::new(V2_MOUNTINFO);
    fs::write(f.root().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
    let e = f
        .fs()
        .subtree("rivernode", &Controller::ALL)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cpuset") && e.contains("cpu memory pids"), "{e}");
}

#[test]
fn names_are_checked() {
    let f = Fake::new(V2_MOUNTINFO);
    f.kernel_files("rivernode");
    let st = f.fs().subtree("rivernode", &[]).unwrap();
    for bad in ["", "..", "a/b", "memory.max", "x y", &"a".repeat(65)] {
        assert!(
            matches!(st.create(bad), Err(CgroupError::BadName(_))),
            "{bad}"
        );
    }
    assert!(matches!(
        st.open("absent"),
        Err(CgroupError::NoSuchCgroup(_))
    ));
    assert!(f.fs().subtree("../escape", &[]).is_err());
}

#[test]
fn limits_are_written_in_kernel_format_and_read_back() {
    let f = Fake::new(V2_MOUNTINFO);
    f.kernel_files("rivernode");
    let st = f.fs().subtree("rivernode", &[]).unwrap();
    let dir = f.kernel_files("rivernode/task-1");
    let cg = st.open("task-1").unwrap();
    let limits = Limits {
        cpu_max: Some("50000 100000".parse().unwrap()),
        cpu_weight: Some(CpuWeight::new(200).unwrap()),
        memory_max: Some("32M".parse().unwrap()),
        memory_high: Some(Max::Value(30 << 20)),
        memory_swap_max: Some(Max::Value(0)),
        pids_max: Some(Max::Value(5)),
        cpuset_cpus: Some("1,3-4".parse().unwrap()),
        cpuset_mems: Some("1".parse().unwrap()),
        io_max: vec!["8:0 rbps=1048576 wbps=max riops=max wiops=100"
            .parse()
            .unwrap()],
    };
    cg.apply(&limits).unwrap();
    let file = |n: &str| fs::read_to_string(dir.join(n)).unwrap();
    assert_eq!(file("memory.max"), "33554432");
    assert_eq!(file("cpu.max"), "50000 100000");
    assert_eq!(file("cpuset.cpus"), "1,3-4");
    assert_eq!(file("pids.max"), "5");
    assert_eq!(
        file("io.max"),
        "8:0 rbps=1048576 wbps=max riops=max wiops=100"
    );
    assert_eq!(cg.limits().unwrap(), limits);

    // A file the kernel does not offer (controller not enabled) is an error naming it.
    fs::remove_file(dir.join("pids.max")).unwrap();
    let e = cg.apply(&limits).unwrap_err().to_string();
    assert!(e.contains("pids.max") && e.contains("\"5\""), "{e}");
}

#[test]
fn stats_and_state_are_parsed() {
    let f = Fake::new(V2_MOUNTINFO);
    f.kernel_files("rivernode");
    let st = f.fs().subtree("rivernode", &[]).unwrap();
    let dir = f.kernel_files("rivernode/vps-2");
    fs::write(dir.join("memory.current"), "1048576\n").unwrap();
    fs::write(dir.join("cpu.stat"), "usage_usec 100\nnr_throttled 3\n").unwrap();
    fs::write(dir.join("pids.current"), "2\n").unwrap();
    fs::write(dir.join("pids.events"), "max 1\n").unwrap();
    fs::write(
        dir.join("io.stat"),
        "8:0 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n",
    )
    .unwrap();
    fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
    let cg = st.open("vps-2").unwrap();
    let s = cg.stats().unwrap();
    assert_eq!(s.memory_current, Some(1 << 20));
    assert_eq!(s.memory_peak, None, "absent on older kernels");
    assert_eq!(s.cpu["nr_throttled"], 3);
    assert_eq!(s.pids_events["max"], 1);
    assert_eq!(s.io["8:0"]["rbytes"], 4096);
    assert_eq!(cg.state().unwrap(), (true, true));
    fs::write(dir.join("memory.current"), "lots\n").unwrap();
    assert!(cg
        .stats()
        .unwrap_err()
        .to_string()
        .contains("memory.current"));
    assert_eq!(
        st.list()
            .unwrap()
            .iter()
            .map(|c| c.name().to_string())
            .collect::<Vec<_>>(),
        ["vps-2"]
    );
}

#[test]
fn watcher_sleeps_until_the_kernel_file_changes() {
    let f = Fake::new(V2_MOUNTINFO);
    f.kernel_files("rivernode");
    let st = f.fs().subtree("rivernode", &[]).unwrap();
    let dir = f.kernel_files("rivernode/task-3");
    let mut w = st.open("task-3").unwrap().watch().unwrap();
    assert!(
        w.wait(Duration::from_millis(50)).unwrap().is_empty(),
        "nothing changed yet"
    );
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        fs::write(dir.join("cgroup.events"), "populated 0\nfrozen 1\n").unwrap();
    });
    let got = w
        .wait_for(Duration::from_secs(10), "an OOM kill", |e| {
            matches!(e, CgroupEvent::OomKill { .. })
        })
        .unwrap();
    assert!(got.contains(&CgroupEvent::OomKill { total: 1 }), "{got:?}");
    assert!(
        got.contains(&CgroupEvent::MemoryMax { total: 4 }),
        "{got:?}"
    );
    let got = w
        .wait_for(Duration::from_secs(10), "freezing", |e| {
            e == &CgroupEvent::Frozen(true)
        })
        .unwrap();
    assert_eq!(got, vec![CgroupEvent::Frozen(true)]);
    writer.join().unwrap();
    let e = w
        .wait_for(Duration::from_millis(50), "thawing", |e| {
            e == &CgroupEvent::Frozen(false)
        })
        .unwrap_err();
    assert!(e.to_string().contains("thawing did not happen"), "{e}");
}

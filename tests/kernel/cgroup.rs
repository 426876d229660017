//! cgroup v2 on a real kernel: every limit does what rivernode promises.

use std::time::{Duration, Instant};

use rivernode::cgroup::{CgroupEvent, CgroupFs, Controller, CpuMax, Limits, Max, Subtree};

use crate::guest::Helper;
use crate::harness::VmSpec;
use crate::{Expect, KernelTest};

pub fn tests() -> Vec<KernelTest> {
    vec![
        KernelTest {
            name: "cgroup_memory_max_oom_kills",
            vm: VmSpec::default,
            body: memory_max_oom_kills,
            expect: Expect::Pass,
        },
        KernelTest {
            name: "cgroup_cpuset_cpus_pins",
            vm: VmSpec::default,
            body: cpuset_cpus_pins,
            expect: Expect::Pass,
        },
        KernelTest {
            name: "cgroup_cpuset_mems_binds_numa",
            vm: two_numa_nodes,
            body: cpuset_mems_binds_numa,
            expect: Expect::Pass,
        },
        KernelTest {
            name: "cgroup_pids_max_refuses_forks",
            vm: VmSpec::default,
            body: pids_max_refuses_forks,
            expect: Expect::Pass,
        },
        KernelTest {
            name: "cgroup_cpu_max_throttles",
            vm: VmSpec::default,
            body: cpu_max_throttles,
            expect: Expect::Pass,
        },
        KernelTest {
            name: "cgroup_freeze_and_thaw",
            vm: VmSpec::default,
            body: freeze_and_thaw,
            expect: Expect::Pass,
        },
        KernelTest {
            name: "cgroup_kill_then_remove",
            vm: VmSpec::default,
            body: kill_then_remove,
            expect: Expect::Pass,
        },
        KernelTest {
            name: "cgroup_admin_view",
            vm: VmSpec::default,
            body: admin_view,
            expect: Expect::Pass,
        },
    ]
}

fn two_numa_nodes() -> VmSpec {
    VmSpec {
        cpus: 2,
        memory_mib: 1024,
        numa: vec![(0, 0, 512), (1, 1, 512)],
        ..VmSpec::default()
    }
}

const WAIT: Duration = Duration::from_secs(60);

fn subtree() -> Subtree {
    CgroupFs::system()
        .subtree(rivernode::cgroup::DEFAULT_SUBTREE, &Controller::ALL)
        .expect("rivernode subtree on the guest's cgroup2")
}

fn memory_max_oom_kills() {
    let cg = subtree().create("oom").unwrap();
    cg.apply(&Limits {
        memory_max: Some("32M".parse().unwrap()),
        memory_swap_max: Some(Max::Value(0)),
        ..Limits::default()
    })
    .unwrap();
    let mut events = cg.watch().unwrap();
    let mut h = Helper::start_in(&cg, &["alloc", "64"]);
    let seen = events
        .wait_for(WAIT, "an OOM kill", |e| {
            matches!(e, CgroupEvent::OomKill { .. })
        })
        .expect("the event stream reports the OOM kill");
    assert!(
        seen.iter()
            .any(|e| matches!(e, CgroupEvent::OomKill { total } if *total >= 1)),
        "{seen:?}"
    );
    let status = h.wait(WAIT);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(9),
        "killed by the OOM killer: {status:?}"
    );
    assert_eq!(h.line(), "", "it never finished allocating");
    let stats = cg.stats().unwrap();
    assert!(stats.memory_events["oom_kill"] >= 1, "{stats:?}");
    assert!(stats.memory_peak.unwrap() <= 32 << 20, "{stats:?}");
    cg.remove(WAIT).unwrap();
}

fn cpuset_cpus_pins() {
    let cg = subtree().create("pinned").unwrap();
    cg.apply(&Limits {
        cpuset_cpus: Some("1".parse().unwrap()),
        ..Limits::default()
    })
    .unwrap();
    let mut h = Helper::start_in(&cg, &["park"]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", h.pid())).unwrap();
    let allowed = status
        .lines()
        .find(|l| l.starts_with("Cpus_allowed_list:"))
        .unwrap();
    assert_eq!(allowed.split_whitespace().nth(1), Some("1"), "{allowed}");
    assert_eq!(cg.limits().unwrap().cpuset_cpus.unwrap().to_string(), "1");
    cg.kill().unwrap();
    h.wait(WAIT);
    cg.remove(WAIT).unwrap();
}

fn numa_anon_bytes(cg: &rivernode::cgroup::Cgroup, node: u32) -> u64 {
    let text = std::fs::read_to_string(cg.path().join("memory.numa_stat")).unwrap();
    let anon = text.lines().find(|l| l.starts_with("anon ")).unwrap();
    anon.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("N{node}="))?.parse().ok())
        .unwrap_or(0)
}

fn cpuset_mems_binds_numa() {
    let nodes = std::fs::read_to_string("/sys/devices/system/node/online").unwrap();
    assert_eq!(nodes.trim(), "0-1", "the guest has two NUMA nodes");
    let cg = subtree().create("numa1").unwrap();
    cg.apply(&Limits {
        cpuset_mems: Some("1".parse().unwrap()),
        ..Limits::default()
    })
    .unwrap();
    let mut h = Helper::start_in(&cg, &["alloc", "64"]);
    assert_eq!(h.line(), "allocated");
    let on1 = numa_anon_bytes(&cg, 1);
    let on0 = numa_anon_bytes(&cg, 0);
    assert!(
        on1 >= 60 << 20,
        "64 MiB should be on node 1: N0={on0} N1={on1}"
    );
    assert!(on0 < 4 << 20, "almost nothing on node 0: N0={on0} N1={on1}");
    cg.kill().unwrap();
    h.wait(WAIT);
    cg.remove(WAIT).unwrap();
}

fn pids_max_refuses_forks() {
    let cg = subtree().create("pids").unwrap();
    cg.apply(&Limits {
        pids_max: Some(Max::Value(5)),
        ..Limits::default()
    })
    .unwrap();
    let mut h = Helper::start_in(&cg, &["spawn", "8"]);
    // The helper is the first of the 5 processes: 4 children fit, the 5th fork fails.
    assert_eq!(h.line(), "spawned 4 refused 4");
    assert!(h.wait(WAIT).success());
    let stats = cg.stats().unwrap();
    assert!(
        stats.pids_events["max"] >= 1,
        "pids.events counts refused forks: {stats:?}"
    );
    cg.remove(WAIT).unwrap();
}

fn cpu_max_throttles() {
    let cg = subtree().create("throttled").unwrap();
    cg.apply(&Limits {
        cpu_max: Some(CpuMax::new(Some(10_000), 100_000).unwrap()),
        ..Limits::default()
    })
    .unwrap();
    let start = Instant::now();
    let mut h = Helper::start_in(&cg, &["spin", "2"]);
    assert_eq!(h.line(), "spun");
    let wall_us = start.elapsed().as_micros() as u64;
    h.wait(WAIT);
    let cpu = cg.stats().unwrap().cpu;
    assert!(cpu["nr_throttled"] > 0, "{cpu:?}");
    // A 10% quota: usage stays well under the wall time spent spinning.
    assert!(
        cpu["usage_usec"] < wall_us / 2,
        "usage {} of {wall_us} us wall: {cpu:?}",
        cpu["usage_usec"]
    );
    cg.remove(WAIT).unwrap();
}

fn read_counter(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn freeze_and_thaw() {
    let cg = subtree().create("frozen").unwrap();
    let counter = "/tmp/counter";
    let mut h = Helper::start_in(&cg, &["count", counter]);
    let deadline = Instant::now() + WAIT;
    while read_counter(counter) < 3 {
        assert!(Instant::now() < deadline, "counter never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut events = cg.watch().unwrap();
    cg.freeze(WAIT).unwrap();
    assert_eq!(
        cg.state().unwrap(),
        (true, true),
        "cgroup.events says frozen 1"
    );
    assert_eq!(events.wait(WAIT).unwrap(), vec![CgroupEvent::Frozen(true)]);
    let a = read_counter(counter);
    std::thread::sleep(Duration::from_millis(500));
    let b = read_counter(counter);
    assert_eq!(a, b, "the counter stops while frozen");
    cg.thaw(WAIT).unwrap();
    assert_eq!(
        cg.state().unwrap(),
        (true, false),
        "cgroup.events says frozen 0"
    );
    let deadline = Instant::now() + WAIT;
    while read_counter(counter) <= b {
        assert!(Instant::now() < deadline, "the counter did not resume");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(events.wait(WAIT).unwrap(), vec![CgroupEvent::Frozen(false)]);
    cg.kill().unwrap();
    h.wait(WAIT);
    cg.remove(WAIT).unwrap();
}

fn kill_then_remove() {
    let st = subtree();
    let cg = st.create("doomed").unwrap();
    let mut helpers: Vec<Helper> = (0..3).map(|_| Helper::start_in(&cg, &["park"])).collect();
    assert_eq!(cg.processes().unwrap().len(), 3);
    cg.kill().unwrap();
    for h in &mut helpers {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(h.wait(WAIT).signal(), Some(9));
    }
    // Removal waits for the kernel to report the cgroup empty.
    cg.remove(WAIT).unwrap();
    assert!(
        st.list().unwrap().is_empty(),
        "nothing left under the rivernode subtree"
    );
    std::fs::remove_dir(st.path()).expect("the subtree itself can go");
}

fn admin_view() {
    let cg = subtree().create("vps-7").unwrap();
    cg.apply(&Limits {
        memory_max: Some("256M".parse().unwrap()),
        pids_max: Some(Max::Value(64)),
        cpuset_cpus: Some("0".parse().unwrap()),
        ..Limits::default()
    })
    .unwrap();
    let mut h = Helper::start_in(&cg, &["alloc", "8"]);
    assert_eq!(h.line(), "allocated");
    // The real CLI, run in the guest.
    let out = std::process::Command::new(crate::harness::GUEST_RIVERNODE)
        .args(["cgroup", "list"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text
        .lines()
        .find(|l| l.starts_with("vps-7"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        row.contains("running") && row.contains("256.0 MiB") && row.contains("64"),
        "{row}"
    );
    let out = std::process::Command::new(crate::harness::GUEST_RIVERNODE)
        .args(["cgroup", "show", "vps-7", "-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["processes"], 1);
    assert_eq!(v["limits"]["memory_max"], 256u64 << 20);
    assert_eq!(v["limits"]["cpuset_cpus"], "0");
    assert!(
        v["stats"]["memory_current"].as_u64().unwrap() >= 8 << 20,
        "{v}"
    );
    let out = std::process::Command::new(crate::harness::GUEST_RIVERNODE)
        .args(["cgroup", "show", "absent"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cgroup"));
    cg.kill().unwrap();
    h.wait(WAIT);
    cg.remove(WAIT).unwrap();
}

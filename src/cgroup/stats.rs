//! Reading cgroup v2 statistics: flat keyed files (`memory.events`,
//! `cpu.stat`, `pids.events`), nested keyed files (`io.stat`) and
//! single values (`memory.current`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::value::DeviceNumber;

/// `key value` lines, as in `memory.events` and `cpu.stat`.
pub fn parse_flat_keyed(text: &str) -> Result<BTreeMap<String, u64>, String> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut it = line.split_whitespace();
        let (Some(k), Some(v), None) = (it.next(), it.next(), it.next()) else {
            return Err(format!("line {line:?} is not \"key value\""));
        };
        let v: u64 = v
            .parse()
            .map_err(|_| format!("line {line:?}: value is not a number"))?;
        out.insert(k.to_string(), v);
    }
    Ok(out)
}

/// `MAJ:MIN key=value ...` lines, as in `io.stat`.
pub fn parse_nested_keyed(
    text: &str,
) -> Result<BTreeMap<DeviceNumber, BTreeMap<String, u64>>, String> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut it = line.split_whitespace();
        let dev: DeviceNumber = it
            .next()
            .unwrap_or_default()
            .parse()
            .map_err(|e| format!("line {line:?}: {e}"))?;
        let mut fields = BTreeMap::new();
        for kv in it {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("line {line:?}: {kv:?} is not key=value"))?;
            let v: u64 = v
                .parse()
                .map_err(|_| format!("line {line:?}: {k} is not a number"))?;
            fields.insert(k.to_string(), v);
        }
        out.insert(dev, fields);
    }
    Ok(out)
}

/// Usage of one cgroup. Files of controllers that are not enabled are absent (`None`/empty).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub memory_current: Option<u64>,
    /// Highest usage since creation (`memory.peak`, kernel 5.19+).
    pub memory_peak: Option<u64>,
    /// `memory.events`: low, high, max, oom, oom_kill, oom_group_kill.
    pub memory_events: BTreeMap<String, u64>,
    /// `cpu.stat`: usage_usec, user_usec, system_usec, nr_periods, nr_throttled, throttled_usec.
    pub cpu: BTreeMap<String, u64>,
    pub pids_current: Option<u64>,
    /// `pids.events`: max = forks refused at `pids.max`.
    pub pids_events: BTreeMap<String, u64>,
    /// `io.stat` per device: rbytes, wbytes, rios, wios, dbytes, dios.
    pub io: BTreeMap<String, BTreeMap<String, u64>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_keyed() {
        let m = parse_flat_keyed("low 0\nhigh 2\nmax 7\noom 1\noom_kill 1\n").unwrap();
        assert_eq!(m["oom_kill"], 1);
        assert_eq!(m["max"], 7);
        assert!(parse_flat_keyed("oom_kill x\n").is_err());
        assert!(parse_flat_keyed("oom_kill 1 2\n").is_err());
        assert!(parse_flat_keyed("oom_kill -1\n").is_err());
    }

    #[test]
    fn nested_keyed() {
        let m = parse_nested_keyed("8:0 rbytes=90112 wbytes=0 rios=3 wios=0 dbytes=0 dios=0\n")
            .unwrap();
        let d = DeviceNumber { major: 8, minor: 0 };
        assert_eq!(m[&d]["rbytes"], 90112);
        assert!(parse_nested_keyed("8:0 rbytes\n").is_err());
        assert!(parse_nested_keyed("sda rbytes=1\n").is_err());
    }
}

/// What `/metrics` says of one instance's cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct InstanceUsage {
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    /// Processes and threads (none: not known, as for a VM).
    pub pids: Option<u64>,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
}

/// The usage of the cgroup at `rel` under `root`, read from cgroup v2's
/// files (`cpu.stat`, `memory.current`, `pids.current`, `io.stat`), or
/// from v1's controllers (`cpuacct`, `memory`, `pids`, `blkio`) where the
/// node mounts those. `None`: no such cgroup (the instance is gone).
pub fn instance_usage(root: &std::path::Path, rel: &str) -> Option<InstanceUsage> {
    let rel = rel.trim_start_matches('/');
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).ok();
    let number = |p: std::path::PathBuf| read(p).and_then(|t| t.trim().parse::<u64>().ok());
    let v2 = root.join(rel);
    if v2.join("cgroup.procs").is_file() && v2.join("cpu.stat").is_file() {
        let cpu = read(v2.join("cpu.stat"))
            .and_then(|t| parse_flat_keyed(&t).ok())
            .and_then(|m| m.get("usage_usec").copied())
            .unwrap_or(0);
        let (r, w) = read(v2.join("io.stat"))
            .and_then(|t| parse_nested_keyed(&t).ok())
            .map(|m| {
                m.values().fold((0, 0), |(r, w), f| {
                    (
                        r + f.get("rbytes").copied().unwrap_or(0),
                        w + f.get("wbytes").copied().unwrap_or(0),
                    )
                })
            })
            .unwrap_or((0, 0));
        return Some(InstanceUsage {
            cpu_seconds: cpu as f64 / 1e6,
            memory_bytes: number(v2.join("memory.current")).unwrap_or(0),
            pids: number(v2.join("pids.current")),
            io_read_bytes: r,
            io_write_bytes: w,
        });
    }
    let v1 = |controller: &str, file: &str| root.join(controller).join(rel).join(file);
    let cpu_ns = number(v1("cpuacct", "cpuacct.usage"))?;
    let (r, w) = read(v1("blkio", "blkio.throttle.io_service_bytes"))
        .map(|t| blkio_bytes(&t))
        .unwrap_or((0, 0));
    Some(InstanceUsage {
        cpu_seconds: cpu_ns as f64 / 1e9,
        memory_bytes: number(v1("memory", "memory.usage_in_bytes")).unwrap_or(0),
        pids: number(v1("pids", "pids.current")),
        io_read_bytes: r,
        io_write_bytes: w,
    })
}

/// Read and write bytes summed over devices from v1's
/// `blkio.throttle.io_service_bytes` (`8:0 Read 4096` lines, and a `Total`).
fn blkio_bytes(text: &str) -> (u64, u64) {
    text.lines().fold((0, 0), |(r, w), line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f[..] {
            [_, "Read", n] => (r + n.parse().unwrap_or(0), w),
            [_, "Write", n] => (r, w + n.parse().unwrap_or(0)),
            _ => (r, w),
        }
    })
}

#[cfg(test)]
mod usage_tests {
    use super::*;

    fn put(root: &std::path::Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn an_instances_usage_is_read_from_v2_and_from_v1() {
        let v2 = tempfile::tempdir().unwrap();
        let r = v2.path();
        put(r, "rn/n-task-1/cgroup.procs", "42\n");
        put(
            r,
            "rn/n-task-1/cpu.stat",
            "usage_usec 2500000\nuser_usec 2000000\n",
        );
        put(r, "rn/n-task-1/memory.current", "67108864\n");
        put(r, "rn/n-task-1/pids.current", "3\n");
        put(
            r,
            "rn/n-task-1/io.stat",
            "8:0 rbytes=100 wbytes=7 rios=1 wios=1 dbytes=0 dios=0\n8:16 rbytes=1 wbytes=3 rios=1 wios=1 dbytes=0 dios=0\n",
        );
        let u = instance_usage(r, "/rn/n-task-1").unwrap();
        assert_eq!(
            u,
            InstanceUsage {
                cpu_seconds: 2.5,
                memory_bytes: 64 << 20,
                pids: Some(3),
                io_read_bytes: 101,
                io_write_bytes: 10
            }
        );
        assert_eq!(instance_usage(r, "/rn/n-task-2"), None, "gone");

        let v1 = tempfile::tempdir().unwrap();
        let r = v1.path();
        put(r, "cpuacct/rn/n-task-1/cpuacct.usage", "1500000000\n");
        put(r, "memory/rn/n-task-1/memory.usage_in_bytes", "4096\n");
        put(r, "pids/rn/n-task-1/pids.current", "2\n");
        put(
            r,
            "blkio/rn/n-task-1/blkio.throttle.io_service_bytes",
            "8:0 Read 4096\n8:0 Write 512\n8:0 Sync 0\n8:0 Total 4608\nTotal 4608\n",
        );
        let u = instance_usage(r, "rn/n-task-1").unwrap();
        assert_eq!(
            (u.cpu_seconds, u.memory_bytes, u.pids),
            (1.5, 4096, Some(2))
        );
        assert_eq!((u.io_read_bytes, u.io_write_bytes), (4096, 512));
    }
}

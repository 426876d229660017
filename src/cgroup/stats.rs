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

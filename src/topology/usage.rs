//! Live usage for heartbeats: CPU busy fraction since the last sample (from
//! `/proc/stat`), available memory and load average.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{meminfo_field, read_trimmed, TopologyError};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    /// Busy share of all CPUs since the previous sample, 0–100.
    pub cpu_percent: f64,
    pub memory_available_bytes: u64,
    pub load_1m: f64,
    /// Each GPU's reading from NVML (none without it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<super::nvml::GpuSample>,
}

/// Aggregate jiffies from the `cpu ` line of `/proc/stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

impl CpuTimes {
    pub fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal [guest guest_nice]:
        // guest time is already counted in user, so only the first eight add up.
        let total: u64 = fields.iter().take(8).sum();
        let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
        Some(Self {
            busy: total.saturating_sub(idle),
            total,
        })
    }
}

/// Keeps the previous `/proc/stat` sample so each call reports the interval since.
pub struct UsageSampler {
    proc: PathBuf,
    last: Option<CpuTimes>,
}

impl UsageSampler {
    pub fn new(proc: &Path) -> Self {
        Self {
            proc: proc.to_path_buf(),
            last: None,
        }
    }

    pub fn sample(&mut self) -> Result<Usage, TopologyError> {
        let stat_path = self.proc.join("stat");
        let stat = read_trimmed(&stat_path)?;
        let now = CpuTimes::parse(&stat).ok_or_else(|| TopologyError::Parse {
            path: stat_path,
            reason: "no readable aggregate cpu line".into(),
        })?;
        let cpu_percent = match self.last {
            Some(prev) if now.total > prev.total => {
                100.0 * now.busy.saturating_sub(prev.busy) as f64 / (now.total - prev.total) as f64
            }
            _ => 0.0,
        };
        self.last = Some(now);
        let loadavg = read_trimmed(&self.proc.join("loadavg")).unwrap_or_default();
        let load_1m = loadavg
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        Ok(Usage {
            cpu_percent,
            memory_available_bytes: meminfo_field(&self.proc.join("meminfo"), "MemAvailable")?,
            load_1m,
            gpus: vec![],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_times_from_stat() {
        let t = CpuTimes::parse("cpu  100 0 50 800 50 0 0 0 10 0\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(t.total, 1000);
        assert_eq!(t.busy, 150);
        assert!(CpuTimes::parse("cpu0 1 2 3").is_none());
        assert!(CpuTimes::parse("cpu  1 x 3 4").is_none());
    }

    #[test]
    fn sampler_reports_interval_share() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::write(p.join("meminfo"), "MemTotal: 100 kB\nMemAvailable: 40 kB\n").unwrap();
        std::fs::write(p.join("loadavg"), "0.50 0.40 0.30 1/100 42\n").unwrap();
        std::fs::write(p.join("stat"), "cpu  100 0 0 900 0 0 0 0\n").unwrap();
        let mut s = UsageSampler::new(p);
        let first = s.sample().unwrap();
        assert_eq!(first.cpu_percent, 0.0);
        assert_eq!(first.memory_available_bytes, 40 * 1024);
        assert_eq!(first.load_1m, 0.5);
        std::fs::write(p.join("stat"), "cpu  150 0 0 950 0 0 0 0\n").unwrap();
        assert_eq!(s.sample().unwrap().cpu_percent, 50.0);
    }
}

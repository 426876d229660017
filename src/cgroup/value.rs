//! Typed values of cgroup v2 interface files, each with a parser that
//! rejects garbage and a `Display` that writes the kernel's format.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A limit that is either a number or the kernel's `max` (no limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Max<T> {
    Max,
    #[serde(untagged)]
    Value(T),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {reason}")]
pub struct ValueError {
    pub what: &'static str,
    pub input: String,
    pub reason: String,
}

fn err(what: &'static str, input: &str, reason: impl Into<String>) -> ValueError {
    ValueError {
        what,
        input: input.to_string(),
        reason: reason.into(),
    }
}

/// A byte count written as `33554432`, `32M`, `32MiB`, `1.5G` is not accepted
/// (no fractions), `max` is handled by [`Max`].
pub fn parse_bytes(input: &str) -> Result<u64, ValueError> {
    let s = input.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(err(
            "byte size",
            input,
            "expected a non-negative number like 512M or 8G",
        ));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| err("byte size", input, "number too large"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        other => {
            return Err(err(
                "byte size",
                input,
                format!("unknown unit {other:?} (use K, M, G or T)"),
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| err("byte size", input, "does not fit in 64 bits"))
}

impl FromStr for Max<u64> {
    type Err = ValueError;

    /// `max`, or a byte count/number as [`parse_bytes`] reads it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "max" {
            Ok(Max::Max)
        } else {
            parse_bytes(s).map(Max::Value)
        }
    }
}

impl<T: fmt::Display> fmt::Display for Max<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Max::Max => f.write_str("max"),
            Max::Value(v) => write!(f, "{v}"),
        }
    }
}

/// `cpu.max`: at most `quota` microseconds of CPU time per `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuMax {
    /// `None` is `max`: no quota.
    pub quota_us: Option<u64>,
    pub period_us: u64,
}

impl CpuMax {
    /// The kernel accepts periods of 1 ms to 1 s and quotas of at least 1 ms.
    pub const MIN_US: u64 = 1_000;
    pub const MAX_PERIOD_US: u64 = 1_000_000;

    /// A quota of `cores` whole CPUs (e.g. 2.5) over the default 100 ms period.
    pub fn cores(cores: f64) -> Result<Self, ValueError> {
        if !(cores.is_finite() && cores > 0.0) {
            return Err(err(
                "CPU count",
                &cores.to_string(),
                "must be a positive number",
            ));
        }
        let quota = (cores * 100_000.0).round() as u64;
        Self::new(Some(quota), 100_000)
    }

    pub fn new(quota_us: Option<u64>, period_us: u64) -> Result<Self, ValueError> {
        let text = format!(
            "{} {period_us}",
            quota_us.map(|q| q.to_string()).unwrap_or("max".into())
        );
        if !(Self::MIN_US..=Self::MAX_PERIOD_US).contains(&period_us) {
            return Err(err(
                "cpu.max",
                &text,
                "period must be 1000..=1000000 microseconds",
            ));
        }
        if let Some(q) = quota_us {
            if q < Self::MIN_US {
                return Err(err(
                    "cpu.max",
                    &text,
                    "quota must be at least 1000 microseconds",
                ));
            }
        }
        Ok(Self {
            quota_us,
            period_us,
        })
    }
}

impl FromStr for CpuMax {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split_whitespace();
        let (Some(q), p, None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(err(
                "cpu.max",
                s,
                "expected \"QUOTA PERIOD\" or \"max PERIOD\"",
            ));
        };
        let quota = if q == "max" {
            None
        } else {
            Some(parse_plain(q).ok_or_else(|| err("cpu.max", s, "quota is not a number"))?)
        };
        let period = match p {
            None => 100_000,
            Some(p) => parse_plain(p).ok_or_else(|| err("cpu.max", s, "period is not a number"))?,
        };
        Self::new(quota, period).map_err(|e| ValueError {
            input: s.into(),
            ..e
        })
    }
}

impl fmt::Display for CpuMax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.quota_us {
            Some(q) => write!(f, "{q} {}", self.period_us),
            None => write!(f, "max {}", self.period_us),
        }
    }
}

/// Digits only: no sign, no spaces, no hex.
fn parse_plain(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `cpu.weight`, 1..=10000 (default 100).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuWeight(u16);

impl CpuWeight {
    pub fn new(w: u64) -> Result<Self, ValueError> {
        if (1..=10_000).contains(&w) {
            Ok(Self(w as u16))
        } else {
            Err(err("cpu.weight", &w.to_string(), "must be 1..=10000"))
        }
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

impl FromStr for CpuWeight {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_plain(s.trim())
            .ok_or_else(|| err("cpu.weight", s, "not a number"))
            .and_then(Self::new)
    }
}

impl fmt::Display for CpuWeight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A block device's `MAJOR:MINOR`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceNumber {
    pub major: u32,
    pub minor: u32,
}

impl DeviceNumber {
    /// The device number of a block device node such as `/dev/vda`.
    pub fn of_block_device(path: &Path) -> Result<Self, ValueError> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let shown = path.display().to_string();
        let meta =
            std::fs::metadata(path).map_err(|e| err("block device", &shown, e.to_string()))?;
        if !meta.file_type().is_block_device() {
            return Err(err("block device", &shown, "not a block device"));
        }
        let rdev = meta.rdev();
        Ok(Self {
            major: nix::sys::stat::major(rdev) as u32,
            minor: nix::sys::stat::minor(rdev) as u32,
        })
    }
}

impl FromStr for DeviceNumber {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, b) = s
            .split_once(':')
            .ok_or_else(|| err("device number", s, "expected MAJOR:MINOR"))?;
        let num = |x: &str| {
            parse_plain(x)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| err("device number", s, "expected MAJOR:MINOR"))
        };
        Ok(Self {
            major: num(a)?,
            minor: num(b)?,
        })
    }
}

impl fmt::Display for DeviceNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// One line of `io.max`: bandwidth (bytes/s) and IOPS caps for one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoMax {
    pub device: DeviceNumber,
    pub rbps: Max<u64>,
    pub wbps: Max<u64>,
    pub riops: Max<u64>,
    pub wiops: Max<u64>,
}

impl IoMax {
    /// No cap on `device`; set the fields to cap it.
    pub fn unlimited(device: DeviceNumber) -> Self {
        Self {
            device,
            rbps: Max::Max,
            wbps: Max::Max,
            riops: Max::Max,
            wiops: Max::Max,
        }
    }
}

impl FromStr for IoMax {
    type Err = ValueError;

    /// The kernel's line: `8:16 rbps=2097152 wbps=max riops=max wiops=120`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split_whitespace();
        let dev: DeviceNumber = parts
            .next()
            .ok_or_else(|| err("io.max line", s, "empty"))?
            .parse()?;
        let mut v = Self::unlimited(dev);
        for kv in parts {
            let (k, val) = kv
                .split_once('=')
                .ok_or_else(|| err("io.max line", s, format!("{kv:?} is not key=value")))?;
            let val = if val == "max" {
                Max::Max
            } else {
                Max::Value(
                    parse_plain(val)
                        .ok_or_else(|| err("io.max line", s, format!("{k}: not a number")))?,
                )
            };
            match k {
                "rbps" => v.rbps = val,
                "wbps" => v.wbps = val,
                "riops" => v.riops = val,
                "wiops" => v.wiops = val,
                _ => return Err(err("io.max line", s, format!("unknown key {k:?}"))),
            }
        }
        Ok(v)
    }
}

impl fmt::Display for IoMax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} rbps={} wbps={} riops={} wiops={}",
            self.device, self.rbps, self.wbps, self.riops, self.wiops
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_and_max() {
        assert_eq!(parse_bytes("32M").unwrap(), 32 << 20);
        assert_eq!(parse_bytes("32MiB").unwrap(), 32 << 20);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("2G").unwrap(), 2 << 30);
        for bad in [
            "",
            "-1",
            "1.5G",
            "12X",
            "M",
            "99999999999999999999",
            "17179869184T",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert_eq!("max".parse::<Max<u64>>().unwrap(), Max::Max);
        assert_eq!("8K".parse::<Max<u64>>().unwrap(), Max::Value(8192));
        assert_eq!(Max::Value(5u64).to_string(), "5");
        assert_eq!(Max::<u64>::Max.to_string(), "max");
    }

    #[test]
    fn cpu_max() {
        let c: CpuMax = "10000 100000".parse().unwrap();
        assert_eq!((c.quota_us, c.period_us), (Some(10_000), 100_000));
        assert_eq!(c.to_string(), "10000 100000");
        assert_eq!(
            "max 100000".parse::<CpuMax>().unwrap().to_string(),
            "max 100000"
        );
        assert_eq!(CpuMax::cores(2.5).unwrap().to_string(), "250000 100000");
        for bad in [
            "",
            "-1 100000",
            "10 100000",
            "10000 10",
            "10000 2000000",
            "a b",
            "1000 1000 1000",
            "0x10 100000",
        ] {
            assert!(bad.parse::<CpuMax>().is_err(), "{bad}");
        }
        assert!(CpuMax::cores(0.0).is_err());
        assert!(CpuMax::cores(f64::NAN).is_err());
    }

    #[test]
    fn cpu_weight() {
        assert_eq!("100".parse::<CpuWeight>().unwrap().get(), 100);
        for bad in ["0", "10001", "-5", "x", ""] {
            assert!(bad.parse::<CpuWeight>().is_err(), "{bad}");
        }
    }

    #[test]
    fn io_max_lines() {
        let l: IoMax = "8:16 rbps=2097152 wbps=max riops=max wiops=120"
            .parse()
            .unwrap();
        assert_eq!(
            l.device,
            DeviceNumber {
                major: 8,
                minor: 16
            }
        );
        assert_eq!((l.rbps, l.wiops), (Max::Value(2_097_152), Max::Value(120)));
        assert_eq!(
            l.to_string(),
            "8:16 rbps=2097152 wbps=max riops=max wiops=120"
        );
        for bad in [
            "",
            "8 rbps=1",
            "8:16 rbps",
            "8:16 speed=1",
            "8:16 rbps=-1",
            "x:1",
        ] {
            assert!(bad.parse::<IoMax>().is_err(), "{bad}");
        }
    }

    #[test]
    fn device_number_of_a_block_device() {
        // /dev/null is a character device: refused with a message naming it.
        let e = DeviceNumber::of_block_device(Path::new("/dev/null")).unwrap_err();
        assert!(
            e.to_string().contains("/dev/null") && e.reason.contains("not a block device"),
            "{e}"
        );
        assert!(DeviceNumber::of_block_device(Path::new("/nonexistent")).is_err());
    }
}

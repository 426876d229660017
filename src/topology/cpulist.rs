//! The kernel's CPU/node list format (`0-3,8,10-11`), as a typed value.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Highest CPU or node index we accept. The kernel's NR_CPUS tops out at 8192;
/// anything larger in a list is garbage, not a big machine.
pub const MAX_INDEX: u32 = 8191;

/// A set of CPU (or NUMA node) indexes, written the way the kernel writes
/// `cpulist`, `cpuset.cpus` and `/sys/devices/system/cpu/online`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CpuList(BTreeSet<u32>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CPU list {input:?}: {reason}")]
pub struct CpuListError {
    pub input: String,
    pub reason: String,
}

impl CpuList {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, cpu: u32) -> bool {
        self.0.contains(&cpu)
    }

    pub fn insert(&mut self, cpu: u32) {
        self.0.insert(cpu);
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }
}

impl FromIterator<u32> for CpuList {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl FromStr for CpuList {
    type Err = CpuListError;

    /// Accepts what the kernel writes: comma-separated indexes and inclusive
    /// ranges, surrounding whitespace/newline ignored. An empty string is the
    /// empty set (a memory-only NUMA node has an empty `cpulist`).
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| CpuListError {
            input: input.to_string(),
            reason,
        };
        let trimmed = input.trim();
        let mut set = BTreeSet::new();
        if trimmed.is_empty() {
            return Ok(Self(set));
        }
        for part in trimmed.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(err("empty element".into()));
            }
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (parse_index(a, &err)?, parse_index(b, &err)?),
                None => {
                    let i = parse_index(part, &err)?;
                    (i, i)
                }
            };
            if lo > hi {
                return Err(err(format!("range {part:?} runs backwards")));
            }
            set.extend(lo..=hi);
        }
        Ok(Self(set))
    }
}

fn parse_index(s: &str, err: &impl Fn(String) -> CpuListError) -> Result<u32, CpuListError> {
    let s = s.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err(format!("{s:?} is not a CPU index")));
    }
    match s.parse::<u32>() {
        Ok(i) if i <= MAX_INDEX => Ok(i),
        _ => Err(err(format!("{s} is larger than {MAX_INDEX}"))),
    }
}

impl fmt::Display for CpuList {
    /// Writes the kernel's compact form, collapsing runs into ranges.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut iter = self.0.iter().copied().peekable();
        let mut first = true;
        while let Some(start) = iter.next() {
            let mut end = start;
            while iter.peek() == Some(&(end + 1)) {
                end += 1;
                iter.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

/// In the API a CPU list is the kernel's text, `0-3,8`.
impl utoipa::PartialSchema for CpuList {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .examples(["0-3,8"])
            .into()
    }
}

impl utoipa::ToSchema for CpuList {}

impl Serialize for CpuList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CpuList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_forms() {
        let l: CpuList = "0-3,8,10-11\n".parse().unwrap();
        assert_eq!(l.iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(l.to_string(), "0-3,8,10-11");
        assert_eq!("5".parse::<CpuList>().unwrap().to_string(), "5");
        assert!("".parse::<CpuList>().unwrap().is_empty());
        assert!("\n".parse::<CpuList>().unwrap().is_empty());
    }

    #[test]
    fn display_collapses_runs() {
        let l: CpuList = [0, 2, 1, 5, 6, 9].into_iter().collect();
        assert_eq!(l.to_string(), "0-2,5-6,9");
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "0-",
            "-1",
            "3-1",
            "a",
            "1,,2",
            "1,",
            "99999",
            "4294967296",
            "1-2-3",
            "0x1",
        ] {
            let e = bad.parse::<CpuList>().unwrap_err();
            assert_eq!(e.input, bad, "{bad}");
        }
    }

    #[test]
    fn serde_round_trip() {
        let l: CpuList = "0-1,4".parse().unwrap();
        let j = serde_json::to_string(&l).unwrap();
        assert_eq!(j, "\"0-1,4\"");
        assert_eq!(serde_json::from_str::<CpuList>(&j).unwrap(), l);
        assert!(serde_json::from_str::<CpuList>("\"2-1\"").is_err());
    }
}

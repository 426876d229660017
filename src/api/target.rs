//! The placement target syntax `node[:numa][::gpu,gpu]` and user-facing
//! memory sizes (`512M`, `8G`, `1.5T`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a task must run. `None` fields are left to the scheduler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Target {
    pub node: String,
    pub numa: Option<u32>,
    /// GPUs on that node: an index into the node's GPU list (sorted by PCI
    /// address), a PCI address, or an NVML UUID. Resolved to PCI addresses at submission.
    pub gpus: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid target {input:?}: {reason} (syntax: NODE[:NUMA][::GPU,GPU...], e.g. gpu1, gpu1:0, gpu1::0,1, gpu1:1::0000:ca:00.0)")]
pub struct TargetError {
    pub input: String,
    pub reason: String,
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| TargetError {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        let s = input.trim();
        // GPU lists may hold PCI addresses, which contain ':' themselves: split at the first "::".
        let (head, gpus) = match s.split_once("::") {
            Some((h, g)) => (h, Some(g)),
            None => (s, None),
        };
        let (node, numa) = match head.split_once(':') {
            Some((n, m)) => {
                let numa: u32 = m
                    .parse()
                    .map_err(|_| err(&format!("NUMA node {m:?} is not a number")))?;
                (n, Some(numa))
            }
            None => (head, None),
        };
        super::validate_node_name(node).map_err(|e| err(&e))?;
        let gpus = match gpus {
            None => Vec::new(),
            Some(list) => {
                let items: Vec<String> = list.split(',').map(|g| g.trim().to_string()).collect();
                if items.iter().any(|g| g.is_empty()) {
                    return Err(err("empty GPU in the list"));
                }
                items
            }
        };
        Ok(Target {
            node: node.to_string(),
            numa,
            gpus,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.node)?;
        if let Some(n) = self.numa {
            write!(f, ":{n}")?;
        }
        if !self.gpus.is_empty() {
            write!(f, "::{}", self.gpus.join(","))?;
        }
        Ok(())
    }
}

/// A memory size as users write it: a number with a unit (`K`, `M`, `G`, `T`,
/// optionally with `i`/`iB`, binary in all cases), fractions allowed (`1.5G`).
/// A bare number is refused: it is ambiguous (KohakuRiver read it as bytes).
pub fn parse_memory_size(input: &str) -> Result<u64, String> {
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.matches('.').count() > 1
    {
        return Err(format!(
            "{input:?} is not a size: write a number with a unit, e.g. 512M, 8G, 1.5T"
        ));
    }
    let shift = match unit.trim().trim_end_matches("iB").trim_end_matches('i').trim_end_matches('B') {
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        "" => {
            return Err(format!(
                "{input:?} has no unit: write {input}M or {input}G (a bare number would be read as bytes)"
            ))
        }
        other => return Err(format!("{input:?}: unknown unit {other:?} (use K, M, G or T)")),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{input:?} is not a number"))?;
    let bytes = value * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 / 2.0 {
        return Err(format!("{input:?} is out of range"));
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t: Target = "gpu1".parse().unwrap();
        assert_eq!((t.node.as_str(), t.numa, t.gpus.len()), ("gpu1", None, 0));
        let t: Target = "gpu1:1".parse().unwrap();
        assert_eq!(t.numa, Some(1));
        let t: Target = "gpu1::0,1".parse().unwrap();
        assert_eq!(t.gpus, ["0", "1"]);
        let t: Target = "gpu1:1::0000:ca:00.0,GPU-abc".parse().unwrap();
        assert_eq!(
            (t.numa, t.gpus.clone()),
            (
                Some(1),
                vec!["0000:ca:00.0".to_string(), "GPU-abc".to_string()]
            )
        );
        assert_eq!(t.to_string(), "gpu1:1::0000:ca:00.0,GPU-abc");
        for bad in [
            "",
            ":0",
            "gpu1:x",
            "gpu1::",
            "gpu1::0,,1",
            "GPU1",
            "gpu1:-1",
            "a b",
        ] {
            let e = bad.parse::<Target>().unwrap_err();
            assert!(e.to_string().contains("syntax"), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_memory_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_memory_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_memory_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_memory_size("1.5T").unwrap(), 3 << 39);
        assert_eq!(parse_memory_size("32m").unwrap(), 32 << 20);
        let e = parse_memory_size("12").unwrap_err();
        assert!(e.contains("no unit") && e.contains("12M"), "{e}");
        for bad in [
            "",
            "G",
            "1..5G",
            ".5G",
            "5.G",
            "-1G",
            "1X",
            "0M",
            "99999999999T",
        ] {
            assert!(parse_memory_size(bad).is_err(), "{bad}");
        }
    }
}

//! Node inventory from sysfs and procfs: online CPUs with their core and
//! thread siblings, NUMA nodes, memory, PCI GPUs with IOMMU groups and slot
//! companions, and NVML UUIDs where an NVIDIA driver is present.
//!
//! Every reader takes its roots from [`KernelRoots`], so unit tests run the
//! same code against a fake tree that the real machine reads from `/sys`.

mod cpulist;
pub mod nvml;
mod pci;
mod usage;

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use cpulist::{CpuList, CpuListError};
pub use pci::{
    lookup_names, scan_functions, scan_gpus, Gpu, PciAddress, PciAddressError, PciFunction,
};
pub use usage::{CpuTimes, Usage, UsageSampler};

/// Where the kernel's files are. Production uses the defaults; tests point
/// these at temp trees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelRoots {
    pub sys: PathBuf,
    pub proc: PathBuf,
    /// The pciutils/hwdata ID database used for GPU names when NVML is absent.
    pub pci_ids: PathBuf,
}

impl Default for KernelRoots {
    fn default() -> Self {
        Self {
            sys: PathBuf::from("/sys"),
            proc: PathBuf::from("/proc"),
            pci_ids: PathBuf::from("/usr/share/misc/pci.ids"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
}

/// One logical CPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Cpu {
    pub id: u32,
    /// Physical core id, unique within its package.
    pub core_id: u32,
    /// Socket.
    pub package_id: u32,
    pub numa_node: u32,
    /// Hyperthreads sharing this core, this CPU included.
    pub thread_siblings: CpuList,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NumaNode {
    pub id: u32,
    /// Online CPUs of the node; empty for a memory-only node.
    pub cpus: CpuList,
    pub memory_total_bytes: u64,
}

/// What a runner reports about its machine at registration and in heartbeats.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Inventory {
    pub hostname: String,
    pub kernel: String,
    pub cpus: Vec<Cpu>,
    pub numa_nodes: Vec<NumaNode>,
    pub memory_total_bytes: u64,
    pub gpus: Vec<Gpu>,
    /// Files that could not be read as expected and what was assumed instead.
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The runner reaches libvirt here: the node can run VM VPS.
    #[serde(default)]
    pub vms: bool,
    /// Memory held back for the node itself (kernel, runner, containerd,
    /// libvirt, QEMU's own overhead): never given to an instance.
    #[serde(default)]
    pub memory_reserved_bytes: u64,
}

impl Inventory {
    /// The memory instances may be given, in all.
    pub fn memory_for_instances(&self) -> u64 {
        self.memory_total_bytes
            .saturating_sub(self.memory_reserved_bytes)
    }

    pub fn cpu_count(&self) -> usize {
        self.cpus.len()
    }

    /// Physical cores: distinct (package, core) pairs.
    pub fn core_count(&self) -> usize {
        let mut cores: Vec<(u32, u32)> = self
            .cpus
            .iter()
            .map(|c| (c.package_id, c.core_id))
            .collect();
        cores.sort_unstable();
        cores.dedup();
        cores.len()
    }
}

pub(crate) fn read_trimmed(path: &Path) -> Result<String, TopologyError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| TopologyError::Read {
            path: path.to_path_buf(),
            source,
        })
}

fn read_cpulist(path: &Path) -> Result<CpuList, TopologyError> {
    read_trimmed(path)?
        .parse()
        .map_err(|e: CpuListError| TopologyError::Parse {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

fn read_u32(path: &Path) -> Result<u32, TopologyError> {
    let text = read_trimmed(path)?;
    text.parse().map_err(|_| TopologyError::Parse {
        path: path.to_path_buf(),
        reason: format!("{text:?} is not a non-negative integer"),
    })
}

/// Reads the whole inventory. NVML is not consulted here (see
/// [`nvml::attach_uuids`]) so that this stays a pure function of the trees.
pub fn collect(roots: &KernelRoots) -> Result<Inventory, TopologyError> {
    let mut warnings = Vec::new();
    let memory_total_bytes = meminfo_field(&roots.proc.join("meminfo"), "MemTotal")?;
    let numa_nodes = read_numa_nodes(&roots.sys, memory_total_bytes, &mut warnings)?;
    let cpus = read_cpus(&roots.sys, &numa_nodes, &mut warnings)?;
    let numa_memory: u64 = numa_nodes.iter().map(|n| n.memory_total_bytes).sum();
    if numa_memory < memory_total_bytes / 10 * 9 {
        // Seen with hot-plugged memory in some VMs: the per-node counts lag MemTotal.
        warnings.push(format!(
            "NUMA nodes account for {numa_memory} of {memory_total_bytes} bytes of memory"
        ));
    }
    let mut gpus = pci::scan_gpus(&roots.sys, &mut warnings)?;
    pci::lookup_names(&roots.pci_ids, &mut gpus);
    Ok(Inventory {
        hostname: read_trimmed(&roots.proc.join("sys/kernel/hostname"))?,
        kernel: read_trimmed(&roots.proc.join("sys/kernel/osrelease")).unwrap_or_default(),
        cpus,
        numa_nodes,
        memory_total_bytes,
        gpus,
        warnings,
        memory_reserved_bytes: 0,
        vms: false,
    })
}

/// A `Key: N kB` field of `/proc/meminfo` or a node's `meminfo`, in bytes.
pub(crate) fn meminfo_field(path: &Path, key: &str) -> Result<u64, TopologyError> {
    let text = fs::read_to_string(path).map_err(|source| TopologyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_meminfo_field(&text, key).ok_or_else(|| TopologyError::Parse {
        path: path.to_path_buf(),
        reason: format!("no readable {key} line"),
    })
}

fn parse_meminfo_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        // Node meminfo lines carry a "Node N " prefix; /proc/meminfo lines don't.
        let rest = match line.strip_prefix("Node ") {
            Some(r) => r.split_once(' ')?.1.trim_start(),
            None => line,
        };
        let value = rest.strip_prefix(key)?.strip_prefix(':')?.trim();
        let (num, unit) = value.split_once(' ').unwrap_or((value, ""));
        let n: u64 = num.parse().ok()?;
        match unit.trim() {
            "kB" => n.checked_mul(1024),
            "" => Some(n),
            _ => None,
        }
    })
}

fn read_numa_nodes(
    sys: &Path,
    memory_total_bytes: u64,
    warnings: &mut Vec<String>,
) -> Result<Vec<NumaNode>, TopologyError> {
    let node_dir = sys.join("devices/system/node");
    let mut ids: Vec<u32> = match fs::read_dir(&node_dir) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix("node")?.parse().ok())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(TopologyError::Read {
                path: node_dir,
                source,
            })
        }
    };
    ids.sort_unstable();
    if ids.is_empty() {
        // Kernels built without CONFIG_NUMA have no node directory: the whole
        // machine is one node 0 holding every online CPU and all memory.
        let cpus = read_cpulist(&sys.join("devices/system/cpu/online"))?;
        return Ok(vec![NumaNode {
            id: 0,
            cpus,
            memory_total_bytes,
        }]);
    }
    let mut nodes = Vec::new();
    for id in ids {
        let dir = node_dir.join(format!("node{id}"));
        let cpus = read_cpulist(&dir.join("cpulist"))?;
        let memory_total_bytes = match meminfo_field(&dir.join("meminfo"), "MemTotal") {
            Ok(b) => b,
            Err(e) => {
                warnings.push(format!("{e}; reporting 0 bytes for NUMA node {id}"));
                0
            }
        };
        nodes.push(NumaNode {
            id,
            cpus,
            memory_total_bytes,
        });
    }
    Ok(nodes)
}

fn read_cpus(
    sys: &Path,
    numa_nodes: &[NumaNode],
    warnings: &mut Vec<String>,
) -> Result<Vec<Cpu>, TopologyError> {
    let online_path = sys.join("devices/system/cpu/online");
    let online = read_cpulist(&online_path)?;
    if online.is_empty() {
        return Err(TopologyError::Parse {
            path: online_path,
            reason: "no online CPUs listed".into(),
        });
    }
    let mut cpus = Vec::with_capacity(online.len());
    for id in online.iter() {
        let topo = sys.join(format!("devices/system/cpu/cpu{id}/topology"));
        let (core_id, package_id, thread_siblings) = if topo.is_dir() {
            (
                read_u32(&topo.join("core_id"))?,
                read_u32(&topo.join("physical_package_id"))?,
                read_cpulist(&topo.join("thread_siblings_list"))?,
            )
        } else {
            // Some hypervisors expose no topology: each CPU is its own core.
            warnings.push(format!(
                "{} is missing; CPU {id} counted as its own core on package 0",
                topo.display()
            ));
            (id, 0, [id].into_iter().collect())
        };
        let numa_node = numa_nodes
            .iter()
            .find(|n| n.cpus.contains(id))
            .map(|n| n.id)
            .unwrap_or_else(|| {
                warnings.push(format!(
                    "CPU {id} is in no NUMA node's cpulist; assuming node 0"
                ));
                0
            });
        cpus.push(Cpu {
            id,
            core_id,
            package_id,
            numa_node,
            thread_siblings,
        });
    }
    Ok(cpus)
}

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

//! A CDI spec made from what an NVIDIA node has, for nodes where no spec in
//! the spec directories names the GPUs (`nvidia-ctk` is not in Debian, and
//! many nodes run the driver alone). It has what `nvidia-ctk cdi generate`
//! puts in for compute: `/dev/nvidia<minor>` per GPU, named by UUID; the
//! control nodes; the driver's user-space libraries and tools, bound
//! read-only at their own paths and at their sonames (so the loader finds
//! `libcuda.so.1` without an ldcache hook); the persistenced socket.
//!
//! Reading the node (`discover`) is kept apart from building the spec
//! (`generate`, pure), so tests feed it fake trees and library lists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{CdiDevice, CdiMount, CdiSpec, ContainerEdits, DeviceNode};
use crate::topology::PciAddress;

/// The kind of the spec we generate (what `nvidia-ctk` writes too).
pub const KIND: &str = "nvidia.com/gpu";

/// Control nodes every CUDA process opens, besides its GPUs'.
const CONTROL_NODES: [&str; 4] = [
    "nvidiactl",
    "nvidia-uvm",
    "nvidia-uvm-tools",
    "nvidia-modeset",
];

/// Compute and utility libraries (nvidia-ctk's compute/utility set).
const LIBRARIES: [&str; 14] = [
    "libcuda",
    "libcudadebugger",
    "libnvidia-ml",
    "libnvidia-ptxjitcompiler",
    "libnvidia-nvvm",
    "libnvidia-cfg",
    "libnvidia-gpucomp",
    "libnvidia-opencl",
    "libnvidia-allocator",
    "libnvidia-pkcs11",
    "libnvidia-pkcs11-openssl3",
    "libnvidia-encode",
    "libnvcuvid",
    "libnvidia-opticalflow",
];

const BINARIES: [&str; 5] = [
    "nvidia-smi",
    "nvidia-debugdump",
    "nvidia-persistenced",
    "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
];

const MOUNT_OPTIONS: [&str; 5] = ["ro", "nosuid", "nodev", "rbind", "rprivate"];

/// Where an NVIDIA node keeps what the spec is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvidiaRoots {
    /// The driver's procfs directory, `/proc/driver/nvidia`.
    pub driver: PathBuf,
    /// Where device nodes are, `/dev`.
    pub dev: PathBuf,
    pub lib_dirs: Vec<PathBuf>,
    pub bin_dirs: Vec<PathBuf>,
    /// `/run`, for the persistenced socket.
    pub run: PathBuf,
}

impl Default for NvidiaRoots {
    fn default() -> Self {
        Self {
            driver: "/proc/driver/nvidia".into(),
            dev: "/dev".into(),
            lib_dirs: [
                "/usr/lib/x86_64-linux-gnu",
                // Debian's packaged driver.
                "/usr/lib/x86_64-linux-gnu/nvidia/current",
                "/usr/lib64",
                "/usr/lib",
                "/lib/x86_64-linux-gnu",
            ]
            .map(PathBuf::from)
            .to_vec(),
            bin_dirs: ["/usr/bin", "/usr/sbin"].map(PathBuf::from).to_vec(),
            run: "/run".into(),
        }
    }
}

/// One GPU as the NVIDIA driver describes it in
/// `/proc/driver/nvidia/gpus/<bdf>/information`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverGpu {
    pub address: PciAddress,
    pub uuid: String,
    /// `/dev/nvidia<minor>`.
    pub minor: u32,
    pub model: Option<String>,
}

/// A driver library: its file and the links to it (soname, dev link).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Library {
    pub path: PathBuf,
    pub links: Vec<PathBuf>,
}

/// What `discover` found: everything `generate` needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NvidiaNode {
    pub version: Option<String>,
    pub gpus: Vec<DriverGpu>,
    /// Control nodes present under the dev root (names, e.g. `nvidiactl`).
    pub control_nodes: Vec<String>,
    pub libraries: Vec<Library>,
    pub binaries: Vec<PathBuf>,
    pub sockets: Vec<PathBuf>,
    pub dev: PathBuf,
}

/// Parses an `information` file; `None` when it lacks the UUID or minor.
pub fn parse_information(address: PciAddress, text: &str) -> Option<DriverGpu> {
    let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
    for line in text.lines() {
        if let Some((k, v)) = line.split_once(':') {
            fields.insert(k.trim(), v.trim());
        }
    }
    Some(DriverGpu {
        address,
        uuid: fields.get("GPU UUID")?.to_string(),
        minor: fields.get("Device Minor")?.parse().ok()?,
        model: fields.get("Model").map(|m| m.to_string()),
    })
}

/// The GPUs the driver has, sorted by PCI address; empty without a driver.
pub fn driver_gpus(driver: &Path) -> Vec<DriverGpu> {
    let Ok(entries) = std::fs::read_dir(driver.join("gpus")) else {
        return Vec::new();
    };
    let mut out: Vec<DriverGpu> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let address: PciAddress = e.file_name().to_str()?.parse().ok()?;
            let text = std::fs::read_to_string(e.path().join("information")).ok()?;
            parse_information(address, &text)
        })
        .collect();
    out.sort_by_key(|g| g.address);
    out
}

/// The driver version from `/proc/driver/nvidia/version`
/// ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  ...").
pub fn parse_version(text: &str) -> Option<String> {
    let line = text.lines().find(|l| l.starts_with("NVRM version:"))?;
    line.split_whitespace()
        .find(|w| {
            w.contains('.')
                && w.split('.').count() >= 2
                && w.split('.')
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(str::to_string)
}

/// The driver's libraries reachable from `dirs`: every `<name>.so*` entry
/// (file or link) is followed to its real file, which must be
/// `<name>.so.<version>` of this driver (any version when it is unknown).
/// Each real file is bound once, with every link that leads to it: on
/// Debian the links in the multiarch directory go through
/// /etc/alternatives into `nvidia/current/`.
pub fn find_libraries(dirs: &[PathBuf], version: Option<&str>) -> Vec<Library> {
    let mut out: Vec<Library> = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        for name in &names {
            let Some(stem) = LIBRARIES.iter().find(|l| {
                name.strip_prefix(*l)
                    .is_some_and(|rest| rest == ".so" || rest.starts_with(".so."))
            }) else {
                continue;
            };
            let path = dir.join(name);
            let Ok(real) = std::fs::canonicalize(&path) else {
                continue; // a dangling link
            };
            let real_version = real
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix(&format!("{stem}.so.")).map(str::to_string));
            let wanted = real.is_file()
                && match (version, real_version.as_deref()) {
                    (Some(v), Some(rv)) => rv == v,
                    (None, Some(rv)) => rv.contains('.'),
                    (_, None) => false,
                };
            if !wanted {
                continue;
            }
            let i = match out.iter().position(|l| l.path == real) {
                Some(i) => i,
                None => {
                    out.push(Library {
                        path: real.clone(),
                        links: Vec::new(),
                    });
                    out.len() - 1
                }
            };
            if path != real && !out[i].links.contains(&path) {
                out[i].links.push(path);
            }
        }
    }
    out
}

/// What CUDA and `nvidia-smi` cannot do without, if the node lacks it.
pub fn missing_essentials(node: &NvidiaNode) -> Vec<&'static str> {
    ["libcuda", "libnvidia-ml"]
        .into_iter()
        .filter(|stem| {
            !node.libraries.iter().any(|l| {
                l.path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{stem}.so.")))
            })
        })
        .collect()
}

/// Reads what an NVIDIA node has. `None` when the driver is not loaded.
pub fn discover(roots: &NvidiaRoots) -> Option<NvidiaNode> {
    let gpus = driver_gpus(&roots.driver);
    if gpus.is_empty() {
        return None;
    }
    let version = std::fs::read_to_string(roots.driver.join("version"))
        .ok()
        .and_then(|t| parse_version(&t));
    let binaries = BINARIES
        .iter()
        .filter_map(|b| {
            roots
                .bin_dirs
                .iter()
                .map(|d| d.join(b))
                .find(|p| p.is_file())
        })
        .collect();
    let socket = roots.run.join("nvidia-persistenced/socket");
    Some(NvidiaNode {
        libraries: find_libraries(&roots.lib_dirs, version.as_deref()),
        version,
        gpus,
        control_nodes: CONTROL_NODES
            .iter()
            .filter(|n| roots.dev.join(n).exists())
            .map(|n| n.to_string())
            .collect(),
        binaries,
        sockets: socket.exists().then_some(socket).into_iter().collect(),
        dev: roots.dev.clone(),
    })
}

fn bind(host: &Path, container: &Path) -> CdiMount {
    CdiMount {
        host_path: host.to_path_buf(),
        container_path: container.display().to_string(),
        typ: Some("bind".into()),
        options: MOUNT_OPTIONS.iter().map(|o| o.to_string()).collect(),
    }
}

fn node(dev: &Path, name: &str) -> DeviceNode {
    DeviceNode {
        path: format!("/dev/{name}"),
        host_path: Some(dev.join(name)),
        ..DeviceNode::default()
    }
}

/// The spec for `node`: one device per GPU, named by its UUID.
pub fn generate(node: &NvidiaNode) -> CdiSpec {
    let mut mounts = Vec::new();
    for lib in &node.libraries {
        mounts.push(bind(&lib.path, &lib.path));
        for link in &lib.links {
            // The link's own path, holding the library itself: no ldcache
            // or symlink hook is needed inside.
            mounts.push(bind(&lib.path, link));
        }
    }
    for p in node.binaries.iter().chain(&node.sockets) {
        mounts.push(bind(p, p));
    }
    CdiSpec {
        cdi_version: "0.5.0".into(),
        kind: KIND.into(),
        annotations: BTreeMap::new(),
        devices: node
            .gpus
            .iter()
            .map(|g| CdiDevice {
                name: g.uuid.clone(),
                annotations: BTreeMap::new(),
                container_edits: ContainerEdits {
                    device_nodes: vec![self::node(&node.dev, &format!("nvidia{}", g.minor))],
                    ..ContainerEdits::default()
                },
            })
            .collect(),
        container_edits: ContainerEdits {
            device_nodes: node
                .control_nodes
                .iter()
                .map(|n| self::node(&node.dev, n))
                .collect(),
            mounts,
            ..ContainerEdits::default()
        },
    }
}

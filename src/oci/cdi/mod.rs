//! CDI (Container Device Interface 1.1): device specs loaded from the spec
//! directories (`/etc/cdi`, then `/var/run/cdi`; a later directory wins),
//! and their container edits applied to our OCI runtime spec: device nodes
//! with their device-cgroup allow rules, mounts, env, hooks and additional
//! GIDs. The semantics follow the reference implementation
//! (cncf-tags/container-device-interface, `pkg/cdi/container-edits.go`).
//!
//! We apply CDI ourselves because we build the runtime spec ourselves, and
//! containerd 1.6 (Debian 12) has no CDI. Specs are files root put on the
//! node: only devices the ledger assigned are ever requested, and users
//! never name CDI devices. A device node's type, major and minor are always
//! read from the node (a spec cannot grant access to a device it does not
//! name truthfully), and a bad spec fails the whole request: an instance is
//! never started half-equipped.

pub mod nvidia;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    HookBuilder, LinuxDeviceBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType, MountBuilder, Spec,
};
use serde::{Deserialize, Serialize};

/// Versions of the CDI spec we read, oldest first.
const VERSIONS: [&str; 8] = [
    "0.3.0", "0.4.0", "0.5.0", "0.6.0", "0.7.0", "0.8.0", "1.0.0", "1.1.0",
];

#[derive(Debug, thiserror::Error)]
pub enum CdiError {
    #[error("CDI spec {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CDI spec {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("CDI device {name} is defined twice, in {first} and {second}")]
    Conflict {
        name: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("CDI device {device} (spec {path})")]
    Device {
        path: PathBuf,
        device: String,
        source: EditError,
    },
    #[error("no CDI spec in {dirs} defines device {name}{problems}")]
    Unknown {
        name: String,
        dirs: String,
        problems: String,
    },
}

/// Why one container edit cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("{what} {path:?} is not absolute")]
    NotAbsolute { what: &'static str, path: String },
    #[error("device node {} does not exist on this node", .0.display())]
    NoNode(PathBuf),
    #[error("{} is not a device node", .0.display())]
    NotADevice(PathBuf),
    #[error("device node {}", path.display())]
    Stat {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is a {found} device, the spec says type {said}", path.display())]
    Type {
        path: PathBuf,
        found: &'static str,
        said: String,
    },
    #[error("{} is {found}, the spec says {said}", path.display())]
    Numbers {
        path: PathBuf,
        found: String,
        said: String,
    },
    #[error("permissions {0:?}: expected r, w and/or m")]
    Permissions(String),
    #[error("mount hostPath {} does not exist (a driver upgrade leaves specs stale: regenerate it)", .0.display())]
    NoMountSource(PathBuf),
    #[error("hook {} is not installed on this node", .0.display())]
    NoHook(PathBuf),
    #[error("unknown hook name {0:?}")]
    HookName(String),
    #[error("{0} edits are not supported by rivernode")]
    Unsupported(&'static str),
    #[error("building the runtime spec entry: {0}")]
    Build(String),
}

fn build_err(e: impl std::fmt::Display) -> EditError {
    EditError::Build(e.to_string())
}

/// A CDI spec file as written by `nvidia-ctk cdi generate` or an operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CdiSpec {
    pub cdi_version: String,
    /// `vendor.com/class`, e.g. `nvidia.com/gpu`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    pub devices: Vec<CdiDevice>,
    /// Applied once when any device of this spec is requested.
    #[serde(default, skip_serializing_if = "ContainerEdits::is_empty")]
    pub container_edits: ContainerEdits,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CdiDevice {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    pub container_edits: ContainerEdits,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ContainerEdits {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub device_nodes: Vec<DeviceNode>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<CdiMount>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<CdiHook>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub additional_gids: Vec<u32>,
    /// Parsed so that a spec using it is refused by name, not as "unknown field".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intel_rdt: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net_devices: Vec<serde_json::Value>,
}

impl ContainerEdits {
    pub fn is_empty(&self) -> bool {
        self == &ContainerEdits::default()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeviceNode {
    /// Path inside the container.
    pub path: String,
    /// Path on the node; default: `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<PathBuf>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_mode: Option<u32>,
    /// Device-cgroup access, any of `r`, `w`, `m`; default `rwm`; `none`: no access rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CdiMount {
    pub host_path: PathBuf,
    pub container_path: String,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CdiHook {
    pub hook_name: String,
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
}

/// The oldest spec version that has every field `spec` uses.
fn required_version(spec: &CdiSpec) -> &'static str {
    let edits = std::iter::once(&spec.container_edits)
        .chain(spec.devices.iter().map(|d| &d.container_edits));
    let mut need = "0.3.0";
    for e in edits {
        if !e.net_devices.is_empty() {
            return "1.1.0";
        }
        if !e.additional_gids.is_empty() || e.intel_rdt.is_some() {
            need = "0.7.0";
        }
    }
    let older = |a: &str, b: &str| {
        VERSIONS.iter().position(|v| *v == a) < VERSIONS.iter().position(|v| *v == b)
    };
    if older(need, "0.6.0")
        && (!spec.annotations.is_empty() || spec.devices.iter().any(|d| !d.annotations.is_empty()))
    {
        need = "0.6.0";
    }
    need
}

/// Checks what the reference loader checks: a version we know that has
/// every field used, a `vendor/class` kind, and device names that are unique.
pub fn validate(path: &Path, spec: &CdiSpec) -> Result<(), CdiError> {
    let bad = |message: String| CdiError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let Some(have) = VERSIONS.iter().position(|v| *v == spec.cdi_version) else {
        return Err(bad(format!(
            "cdiVersion {:?} is not one rivernode reads ({})",
            spec.cdi_version,
            VERSIONS.join(", ")
        )));
    };
    let need = required_version(spec);
    if VERSIONS.iter().position(|v| *v == need).unwrap_or(0) > have {
        return Err(bad(format!(
            "uses fields of CDI {need} but says cdiVersion {}",
            spec.cdi_version
        )));
    }
    let name_ok = |s: &str, extra: &[u8]| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b) || extra.contains(&b))
    };
    match spec.kind.split_once('/') {
        Some((vendor, class)) if name_ok(vendor, b"") && name_ok(class, b"") => {}
        _ => return Err(bad(format!("kind {:?} is not vendor.com/class", spec.kind))),
    }
    if spec.devices.is_empty() {
        return Err(bad("no devices".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for d in &spec.devices {
        if !name_ok(&d.name, b":") {
            return Err(bad(format!("device name {:?} is not valid", d.name)));
        }
        if !seen.insert(&d.name) {
            return Err(bad(format!("device {:?} is defined twice", d.name)));
        }
    }
    Ok(())
}

/// Parses one spec file: JSON, or YAML (`.yaml`, `.yml`).
pub fn parse(path: &Path, text: &str) -> Result<CdiSpec, CdiError> {
    let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
    let spec: CdiSpec = if yaml {
        serde_yaml_ng::from_str(text).map_err(|e| e.to_string())
    } else {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }
    .map_err(|message| CdiError::Invalid {
        path: path.to_path_buf(),
        message,
    })?;
    validate(path, &spec)?;
    Ok(spec)
}

/// Every spec in the spec directories, read fresh (they change when the
/// driver is upgraded). A device defined in a later directory replaces one
/// of the same name in an earlier one; defined twice in one directory, it is
/// an error, as in the reference implementation.
#[derive(Debug, Default)]
pub struct Registry {
    /// Qualified name (`kind=name`) to the spec file and its index in `specs`.
    devices: BTreeMap<String, (PathBuf, usize)>,
    specs: Vec<(PathBuf, CdiSpec)>,
    dirs: Vec<PathBuf>,
    /// Files that could not be read and devices defined twice: left out,
    /// as the reference loader does, so one bad file does not take every
    /// device down; a request that needs them is told why.
    problems: Vec<CdiError>,
}

impl Registry {
    pub fn load(dirs: &[PathBuf]) -> Result<Registry, CdiError> {
        let mut r = Registry {
            dirs: dirs.to_vec(),
            ..Registry::default()
        };
        for dir in dirs {
            let entries = match std::fs::read_dir(dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(CdiError::Read {
                        path: dir.clone(),
                        source,
                    })
                }
            };
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension()
                        .is_some_and(|e| e == "json" || e == "yaml" || e == "yml")
                })
                .collect();
            files.sort();
            let mut this_dir: BTreeMap<String, PathBuf> = BTreeMap::new();
            for path in files {
                let spec = std::fs::read_to_string(&path)
                    .map_err(|source| CdiError::Read {
                        path: path.clone(),
                        source,
                    })
                    .and_then(|text| parse(&path, &text));
                match spec {
                    Ok(spec) => r.add(path, spec, &mut this_dir),
                    Err(e) => r.problems.push(e),
                }
            }
        }
        Ok(r)
    }

    /// What was left out while loading.
    pub fn problems(&self) -> &[CdiError] {
        &self.problems
    }

    /// The problems, for an error message ("" when there are none).
    pub fn problems_text(&self) -> String {
        if self.problems.is_empty() {
            return String::new();
        }
        let list: Vec<String> = self
            .problems
            .iter()
            .map(|p| crate::error_chain(p))
            .collect();
        format!(" (left out: {})", list.join("; "))
    }

    /// A registry of specs already in memory (a generated one, tests).
    pub fn from_specs(specs: Vec<(PathBuf, CdiSpec)>) -> Result<Registry, CdiError> {
        let mut r = Registry::default();
        let mut names = BTreeMap::new();
        for (path, spec) in specs {
            validate(&path, &spec)?;
            r.add(path, spec, &mut names);
        }
        match r.problems.pop() {
            Some(e) => Err(e),
            None => Ok(r),
        }
    }

    /// Adds a spec made in memory (from the driver); its devices replace
    /// same-named ones, as a later directory's would.
    pub fn add_generated(&mut self, origin: PathBuf, spec: CdiSpec) -> Result<(), CdiError> {
        validate(&origin, &spec)?;
        self.add(origin, spec, &mut BTreeMap::new());
        Ok(())
    }

    /// Adds a spec's devices; one defined already in the same directory is
    /// a conflict: neither definition is used.
    fn add(&mut self, path: PathBuf, spec: CdiSpec, this_dir: &mut BTreeMap<String, PathBuf>) {
        let index = self.specs.len();
        for d in &spec.devices {
            let q = format!("{}={}", spec.kind, d.name);
            if let Some(first) = this_dir.insert(q.clone(), path.clone()) {
                self.devices.remove(&q);
                self.problems.push(CdiError::Conflict {
                    name: q,
                    first,
                    second: path.clone(),
                });
                continue;
            }
            self.devices.insert(q, (path.clone(), index));
        }
        self.specs.push((path, spec));
    }

    /// Qualified names of every device called `name`, whatever its kind.
    pub fn named(&self, name: &str) -> Vec<String> {
        self.devices
            .keys()
            .filter(|q| q.split_once('=').is_some_and(|(_, n)| n == name))
            .cloned()
            .collect()
    }

    /// The directories this registry was read from, for messages.
    pub fn dirs(&self) -> String {
        if self.dirs.is_empty() {
            return "memory".into();
        }
        self.dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Applies the edits of the `requested` devices (qualified names) to
    /// `spec`: each spec's own edits once, then each device's, in the order
    /// asked. Either every edit applies or `spec` is left as it was.
    pub fn apply(
        &self,
        spec: &mut Spec,
        requested: &[String],
        nodes: &dyn DeviceNodes,
    ) -> Result<(), CdiError> {
        let mut out = spec.clone();
        let mut spec_done = std::collections::BTreeSet::new();
        for q in requested {
            let (path, index) = self.devices.get(q).ok_or_else(|| CdiError::Unknown {
                name: q.clone(),
                dirs: self.dirs(),
                problems: self.problems_text(),
            })?;
            let cdi = &self.specs[*index].1;
            let name = q.split_once('=').map(|(_, n)| n).unwrap_or(q);
            let device = cdi
                .devices
                .iter()
                .find(|d| d.name == name)
                .expect("the index names a device of this spec");
            if spec_done.insert(*index) {
                apply_edits(&mut out, &cdi.container_edits, nodes).map_err(|source| {
                    CdiError::Device {
                        path: path.clone(),
                        device: format!("{} (spec-wide edits)", cdi.kind),
                        source,
                    }
                })?;
            }
            apply_edits(&mut out, &device.container_edits, nodes).map_err(|source| {
                CdiError::Device {
                    path: path.clone(),
                    device: q.clone(),
                    source,
                }
            })?;
        }
        sort_mounts(&mut out);
        *spec = out;
        Ok(())
    }
}

/// A device node as the node's filesystem has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    pub char_device: bool,
    pub major: i64,
    pub minor: i64,
    /// Permission bits.
    pub mode: u32,
}

/// Reads device nodes on the node (`stat`); tests give a table.
pub trait DeviceNodes {
    /// `Ok(None)` when `path` exists but is not a char or block device.
    fn stat(&self, path: &Path) -> std::io::Result<Option<NodeFacts>>;
}

/// The node's real filesystem.
pub struct RealDeviceNodes;

impl DeviceNodes for RealDeviceNodes {
    fn stat(&self, path: &Path) -> std::io::Result<Option<NodeFacts>> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let m = std::fs::metadata(path)?;
        let ft = m.file_type();
        if !ft.is_char_device() && !ft.is_block_device() {
            return Ok(None);
        }
        let rdev = m.rdev();
        Ok(Some(NodeFacts {
            char_device: ft.is_char_device(),
            major: nix::sys::stat::major(rdev) as i64,
            minor: nix::sys::stat::minor(rdev) as i64,
            mode: m.mode() & 0o7777,
        }))
    }
}

fn apply_edits(
    spec: &mut Spec,
    edits: &ContainerEdits,
    nodes: &dyn DeviceNodes,
) -> Result<(), EditError> {
    if edits.intel_rdt.is_some() {
        return Err(EditError::Unsupported("intelRdt"));
    }
    if !edits.net_devices.is_empty() {
        return Err(EditError::Unsupported("netDevices"));
    }
    let process = spec.process_mut().get_or_insert_with(Default::default);
    if !edits.env.is_empty() {
        let mut env = process.env().clone().unwrap_or_default();
        env.extend(edits.env.iter().cloned());
        process.set_env(Some(env));
    }
    let (uid, gid) = (process.user().uid(), process.user().gid());
    let gids: Vec<u32> = edits
        .additional_gids
        .iter()
        .copied()
        .filter(|g| *g != 0)
        .collect();
    if !gids.is_empty() {
        let user = process.user_mut();
        let mut all = user.additional_gids().clone().unwrap_or_default();
        for g in gids {
            if !all.contains(&g) {
                all.push(g);
            }
        }
        user.set_additional_gids(Some(all));
    }
    for d in &edits.device_nodes {
        add_device_node(spec, d, nodes, uid, gid)?;
    }
    for m in &edits.mounts {
        add_mount(spec, m)?;
    }
    for h in &edits.hooks {
        add_hook(spec, h)?;
    }
    Ok(())
}

fn add_device_node(
    spec: &mut Spec,
    d: &DeviceNode,
    nodes: &dyn DeviceNodes,
    uid: u32,
    gid: u32,
) -> Result<(), EditError> {
    if !d.path.starts_with('/') {
        return Err(EditError::NotAbsolute {
            what: "device node path",
            path: d.path.clone(),
        });
    }
    let host = d
        .host_path
        .clone()
        .unwrap_or_else(|| PathBuf::from(&d.path));
    let facts = match nodes.stat(&host) {
        Ok(Some(f)) => f,
        Ok(None) => return Err(EditError::NotADevice(host)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(EditError::NoNode(host)),
        Err(source) => return Err(EditError::Stat { path: host, source }),
    };
    let typ = if facts.char_device { "c" } else { "b" };
    // The spec may say what it expects; the node decides what is granted.
    if let Some(t) = d.typ.as_deref() {
        let t = if t == "u" { "c" } else { t };
        if t != typ {
            return Err(EditError::Type {
                path: host,
                found: typ,
                said: t.to_string(),
            });
        }
    }
    if d.major.is_some_and(|m| m != facts.major) || d.minor.is_some_and(|m| m != facts.minor) {
        let said = |n: Option<i64>| n.map(|m| m.to_string()).unwrap_or("*".into());
        return Err(EditError::Numbers {
            path: host,
            found: format!("{}:{}", facts.major, facts.minor),
            said: format!("{}:{}", said(d.major), said(d.minor)),
        });
    }
    let access = match d.permissions.as_deref() {
        None | Some("") => "rwm".to_string(),
        Some("none") => String::new(),
        Some(p) if p.chars().all(|c| "rwm".contains(c)) => p.to_string(),
        Some(p) => return Err(EditError::Permissions(p.to_string())),
    };
    let dtype = if facts.char_device {
        LinuxDeviceType::C
    } else {
        LinuxDeviceType::B
    };
    let mut dev = LinuxDeviceBuilder::default()
        .path(PathBuf::from(&d.path))
        .typ(dtype)
        .major(facts.major)
        .minor(facts.minor)
        .file_mode(d.file_mode.unwrap_or(facts.mode));
    // As the reference does: unset owner means the container's user (when not root).
    if let Some(u) = d.uid.or((uid > 0).then_some(uid)) {
        dev = dev.uid(u);
    }
    if let Some(g) = d.gid.or((gid > 0).then_some(gid)) {
        dev = dev.gid(g);
    }
    let dev = dev.build().map_err(build_err)?;
    let linux = spec.linux_mut().get_or_insert_with(Default::default);
    let mut devices = linux.devices().clone().unwrap_or_default();
    devices.retain(|x| x.path() != dev.path());
    devices.push(dev);
    linux.set_devices(Some(devices));
    if !access.is_empty() {
        let rule = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(dtype)
            .major(facts.major)
            .minor(facts.minor)
            .access(access)
            .build()
            .map_err(build_err)?;
        let resources = linux.resources_mut().get_or_insert_with(Default::default);
        let mut rules = resources.devices().clone().unwrap_or_default();
        rules.push(rule);
        resources.set_devices(Some(rules));
    }
    Ok(())
}

fn add_mount(spec: &mut Spec, m: &CdiMount) -> Result<(), EditError> {
    if !m.container_path.starts_with('/') {
        return Err(EditError::NotAbsolute {
            what: "mount containerPath",
            path: m.container_path.clone(),
        });
    }
    if !m.host_path.exists() {
        return Err(EditError::NoMountSource(m.host_path.clone()));
    }
    let bind = m.options.iter().any(|o| o == "bind" || o == "rbind");
    let typ = m
        .typ
        .clone()
        .unwrap_or_else(|| if bind { "bind".into() } else { "none".into() });
    let mount = MountBuilder::default()
        .destination(PathBuf::from(&m.container_path))
        .source(m.host_path.clone())
        .typ(typ)
        .options(m.options.clone())
        .build()
        .map_err(build_err)?;
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    mounts.retain(|x| x.destination() != mount.destination());
    mounts.push(mount);
    spec.set_mounts(Some(mounts));
    Ok(())
}

fn add_hook(spec: &mut Spec, h: &CdiHook) -> Result<(), EditError> {
    if !h.path.is_absolute() {
        return Err(EditError::NotAbsolute {
            what: "hook path",
            path: h.path.display().to_string(),
        });
    }
    if !h.path.is_file() {
        return Err(EditError::NoHook(h.path.clone()));
    }
    let mut hook = HookBuilder::default().path(h.path.clone());
    if !h.args.is_empty() {
        hook = hook.args(h.args.clone());
    }
    if !h.env.is_empty() {
        hook = hook.env(h.env.clone());
    }
    if let Some(t) = h.timeout {
        hook = hook.timeout(t);
    }
    let hook = hook.build().map_err(build_err)?;
    let hooks = spec.hooks_mut().get_or_insert_with(Default::default);
    let push = |list: &Option<Vec<oci_spec::runtime::Hook>>| {
        let mut l = list.clone().unwrap_or_default();
        l.push(hook.clone());
        Some(l)
    };
    match h.hook_name.as_str() {
        "createRuntime" => hooks.set_create_runtime(push(hooks.create_runtime())),
        "createContainer" => hooks.set_create_container(push(hooks.create_container())),
        "startContainer" => hooks.set_start_container(push(hooks.start_container())),
        "poststart" => hooks.set_poststart(push(hooks.poststart())),
        "poststop" => hooks.set_poststop(push(hooks.poststop())),
        // `prestart` is deprecated in OCI; the reference maps it the same way.
        "prestart" => hooks.set_prestart(push(hooks.prestart())),
        other => return Err(EditError::HookName(other.to_string())),
    };
    Ok(())
}

/// Parents before children: mounts sorted by the depth of their destination
/// (stable, so equal depths keep their order), as the reference does.
fn sort_mounts(spec: &mut Spec) {
    if let Some(mounts) = spec.mounts_mut().as_mut() {
        mounts.sort_by_key(|m| m.destination().components().count());
    }
}

#[cfg(test)]
mod tests;

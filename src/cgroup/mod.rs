//! cgroup v2, written directly on cgroupfs: the rivernode subtree with its
//! controllers enabled, per-instance cgroups, typed limits, statistics,
//! events (OOM kills, population, freezing) without busy polling,
//! freeze/thaw, kill and removal.
//!
//! The cgroupfs root and the mountinfo file are parameters, so unit tests run
//! this against a fake tree and the kernel tests (tests/kernel) against a real
//! guest kernel. Hosts without the unified v2 hierarchy are refused.

mod events;
mod stats;
mod value;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use events::{CgroupEvent, EventWatcher};
pub use stats::{instance_usage, parse_flat_keyed, parse_nested_keyed, InstanceUsage, Stats};
pub use value::{parse_bytes, CpuMax, CpuWeight, DeviceNumber, IoMax, Max, ValueError};

use crate::topology::CpuList;

/// The subtree rivernode owns, relative to the cgroupfs root.
pub const DEFAULT_SUBTREE: &str = "rivernode";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("nothing is mounted at {root} (looked in {mountinfo})")]
    NotMounted { root: PathBuf, mountinfo: PathBuf },
    #[error("{root} is a {fstype} mount, not cgroup2: this host uses cgroup v1 or the hybrid layout; rivernode needs the unified cgroup v2 hierarchy (boot with systemd.unified_cgroup_hierarchy=1; the default since Debian 11)")]
    NotV2 { root: PathBuf, fstype: String },
    #[error("controller {controller} is not available in {path} (it lists: {available})")]
    ControllerMissing {
        controller: &'static str,
        path: PathBuf,
        available: String,
    },
    #[error("invalid cgroup name {0:?}: use 1-64 letters, digits, '-' or '_'")]
    BadName(String),
    #[error("no cgroup {0}")]
    NoSuchCgroup(PathBuf),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {value:?} to {path}")]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot remove {path}")]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot watch {path}")]
    Watch {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what} did not happen within {after:?}")]
    Timeout {
        path: PathBuf,
        what: String,
        after: Duration,
    },
}

/// The controllers rivernode uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Controller {
    Cpu,
    Cpuset,
    Memory,
    Io,
    Pids,
}

impl Controller {
    pub const ALL: [Controller; 5] = [
        Controller::Cpu,
        Controller::Cpuset,
        Controller::Memory,
        Controller::Io,
        Controller::Pids,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Cpuset => "cpuset",
            Controller::Memory => "memory",
            Controller::Io => "io",
            Controller::Pids => "pids",
        }
    }
}

/// Limits to apply to a cgroup; `None` leaves a file as it is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub cpu_max: Option<CpuMax>,
    pub cpu_weight: Option<CpuWeight>,
    pub memory_max: Option<Max<u64>>,
    pub memory_high: Option<Max<u64>>,
    pub memory_swap_max: Option<Max<u64>>,
    pub pids_max: Option<Max<u64>>,
    pub cpuset_cpus: Option<CpuList>,
    pub cpuset_mems: Option<CpuList>,
    pub io_max: Vec<IoMax>,
}

/// cgroupfs as mounted on this machine.
#[derive(Clone, Debug)]
pub struct CgroupFs {
    root: PathBuf,
    mountinfo: PathBuf,
}

fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// One write(2) of `value`, without O_CREAT: a missing file is an error
/// (usually a controller that is not enabled), not a new file.
fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    let err = |source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    };
    let mut f = fs::OpenOptions::new().write(true).open(path).map_err(err)?;
    f.write_all(value.as_bytes()).map_err(err)
}

fn parse_file<T: std::str::FromStr>(path: &Path) -> Result<Option<T>, CgroupError>
where
    T::Err: std::fmt::Display,
{
    match fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|e: T::Err| CgroupError::Parse {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CgroupError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount_path(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let digits: String = chars.clone().take(3).collect();
            if let Ok(v) = u8::from_str_radix(&digits, 8) {
                out.push(v as char);
                for _ in 0..3 {
                    chars.next();
                }
                continue;
            }
        }
        out.push(c);
    }
    out
}

impl CgroupFs {
    pub fn new(root: impl Into<PathBuf>, mountinfo: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            mountinfo: mountinfo.into(),
        }
    }

    /// `/sys/fs/cgroup`, checked against `/proc/self/mountinfo`.
    pub fn system() -> Self {
        Self::new("/sys/fs/cgroup", "/proc/self/mountinfo")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Refuses anything but a cgroup2 mount at the root (v1 and hybrid hosts).
    pub fn check_v2(&self) -> Result<(), CgroupError> {
        let text = read(&self.mountinfo)?;
        // The last mount at a path is the visible one.
        let fstype = text
            .lines()
            .rev()
            .find_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                let mount_point = unescape_mount_path(left.split_whitespace().nth(4)?);
                (Path::new(&mount_point) == self.root)
                    .then(|| right.split_whitespace().next().map(str::to_string))?
            })
            .ok_or_else(|| CgroupError::NotMounted {
                root: self.root.clone(),
                mountinfo: self.mountinfo.clone(),
            })?;
        if fstype == "cgroup2" {
            Ok(())
        } else {
            Err(CgroupError::NotV2 {
                root: self.root.clone(),
                fstype,
            })
        }
    }

    /// Creates (or adopts) the subtree at `rel` below the root and enables
    /// `controllers` in `cgroup.subtree_control` of every cgroup on the way,
    /// the subtree itself included, so its children get them.
    pub fn subtree(&self, rel: &str, controllers: &[Controller]) -> Result<Subtree, CgroupError> {
        self.check_v2()?;
        let available = read(&self.root.join("cgroup.controllers"))?;
        for c in controllers {
            if !available.split_whitespace().any(|a| a == c.name()) {
                return Err(CgroupError::ControllerMissing {
                    controller: c.name(),
                    path: self.root.join("cgroup.controllers"),
                    available: available.trim().to_string(),
                });
            }
        }
        let mut dir = self.root.clone();
        enable_controllers(&dir, controllers)?;
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            validate_name(part)?;
            dir.push(part);
            make_dir(&dir)?;
            enable_controllers(&dir, controllers)?;
        }
        Ok(Subtree { path: dir })
    }

    /// The subtree at `rel` if it exists, without changing anything (for the admin view).
    pub fn existing_subtree(&self, rel: &str) -> Result<Subtree, CgroupError> {
        self.check_v2()?;
        let path = self.root.join(rel);
        if !path.is_dir() {
            return Err(CgroupError::NoSuchCgroup(path));
        }
        Ok(Subtree { path })
    }
}

fn make_dir(dir: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

fn enable_controllers(dir: &Path, controllers: &[Controller]) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.subtree_control");
    let enabled = read(&path)?;
    let missing: Vec<String> = controllers
        .iter()
        .filter(|c| !enabled.split_whitespace().any(|e| e == c.name()))
        .map(|c| format!("+{}", c.name()))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    write(&path, &missing.join(" "))
}

fn validate_name(name: &str) -> Result<(), CgroupError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(CgroupError::BadName(name.to_string()))
    }
}

/// The part of the hierarchy rivernode owns; instance cgroups live below it.
#[derive(Clone, Debug)]
pub struct Subtree {
    path: PathBuf,
}

impl Subtree {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the cgroup `name` (or adopts it if it exists).
    pub fn create(&self, name: &str) -> Result<Cgroup, CgroupError> {
        validate_name(name)?;
        let path = self.path.join(name);
        make_dir(&path)?;
        Ok(Cgroup {
            name: name.to_string(),
            path,
        })
    }

    pub fn open(&self, name: &str) -> Result<Cgroup, CgroupError> {
        validate_name(name)?;
        let path = self.path.join(name);
        if !path.is_dir() {
            return Err(CgroupError::NoSuchCgroup(path));
        }
        Ok(Cgroup {
            name: name.to_string(),
            path,
        })
    }

    /// The cgroups directly below the subtree, by name.
    pub fn list(&self) -> Result<Vec<Cgroup>, CgroupError> {
        let entries = fs::read_dir(&self.path).map_err(|source| CgroupError::Read {
            path: self.path.clone(),
            source,
        })?;
        let mut out: Vec<Cgroup> = entries
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .map(|e| Cgroup {
                name: e.file_name().to_string_lossy().into_owned(),
                path: e.path(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

/// One cgroup below the subtree.
#[derive(Clone, Debug)]
pub struct Cgroup {
    name: String,
    path: PathBuf,
}

impl Cgroup {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes every limit that is set. Stops at the first file the kernel
    /// refuses, naming it and the value.
    pub fn apply(&self, l: &Limits) -> Result<(), CgroupError> {
        let p = |f: &str| self.path.join(f);
        // cpuset first: a memory or CPU limit is meaningless on the wrong node.
        if let Some(v) = &l.cpuset_cpus {
            write(&p("cpuset.cpus"), &v.to_string())?;
        }
        if let Some(v) = &l.cpuset_mems {
            write(&p("cpuset.mems"), &v.to_string())?;
        }
        if let Some(v) = l.cpu_max {
            write(&p("cpu.max"), &v.to_string())?;
        }
        if let Some(v) = l.cpu_weight {
            write(&p("cpu.weight"), &v.to_string())?;
        }
        // memory.high before memory.max so that lowering both never has high > max.
        if let Some(v) = l.memory_high {
            write(&p("memory.high"), &v.to_string())?;
        }
        if let Some(v) = l.memory_max {
            write(&p("memory.max"), &v.to_string())?;
        }
        if let Some(v) = l.memory_swap_max {
            write(&p("memory.swap.max"), &v.to_string())?;
        }
        if let Some(v) = l.pids_max {
            write(&p("pids.max"), &v.to_string())?;
        }
        for line in &l.io_max {
            write(&p("io.max"), &line.to_string())?;
        }
        Ok(())
    }

    /// The limits as the kernel reports them (files of disabled controllers are `None`).
    pub fn limits(&self) -> Result<Limits, CgroupError> {
        let p = |f: &str| self.path.join(f);
        let io_max = match fs::read_to_string(p("io.max")) {
            Ok(text) => text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    l.parse().map_err(|e: ValueError| CgroupError::Parse {
                        path: p("io.max"),
                        reason: e.to_string(),
                    })
                })
                .collect::<Result<_, _>>()?,
            Err(_) => Vec::new(),
        };
        Ok(Limits {
            cpu_max: parse_file(&p("cpu.max"))?,
            cpu_weight: parse_file(&p("cpu.weight"))?,
            memory_max: parse_file(&p("memory.max"))?,
            memory_high: parse_file(&p("memory.high"))?,
            memory_swap_max: parse_file(&p("memory.swap.max"))?,
            pids_max: parse_file(&p("pids.max"))?,
            cpuset_cpus: parse_file(&p("cpuset.cpus"))?,
            cpuset_mems: parse_file(&p("cpuset.mems"))?,
            io_max,
        })
    }

    pub fn stats(&self) -> Result<Stats, CgroupError> {
        let p = |f: &str| self.path.join(f);
        let flat = |f: &str| -> Result<_, CgroupError> {
            match fs::read_to_string(p(f)) {
                Ok(t) => {
                    parse_flat_keyed(&t).map_err(|reason| CgroupError::Parse { path: p(f), reason })
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
                Err(source) => Err(CgroupError::Read { path: p(f), source }),
            }
        };
        let io = match fs::read_to_string(p("io.stat")) {
            Ok(t) => parse_nested_keyed(&t)
                .map_err(|reason| CgroupError::Parse {
                    path: p("io.stat"),
                    reason,
                })?
                .into_iter()
                .map(|(d, m)| (d.to_string(), m))
                .collect(),
            Err(_) => Default::default(),
        };
        Ok(Stats {
            memory_current: parse_file(&p("memory.current"))?,
            memory_peak: parse_file(&p("memory.peak"))?,
            memory_events: flat("memory.events")?,
            cpu: flat("cpu.stat")?,
            pids_current: parse_file(&p("pids.current"))?,
            pids_events: flat("pids.events")?,
            io,
        })
    }

    /// `populated` and `frozen` from `cgroup.events`.
    pub fn state(&self) -> Result<(bool, bool), CgroupError> {
        let path = self.path.join("cgroup.events");
        let m = parse_flat_keyed(&read(&path)?)
            .map_err(|reason| CgroupError::Parse { path, reason })?;
        Ok((m.get("populated") == Some(&1), m.get("frozen") == Some(&1)))
    }

    /// Moves a process (all its threads) into this cgroup.
    pub fn add_process(&self, pid: u32) -> Result<(), CgroupError> {
        write(&self.path.join("cgroup.procs"), &pid.to_string())
    }

    pub fn processes(&self) -> Result<Vec<u32>, CgroupError> {
        let path = self.path.join("cgroup.procs");
        read(&path)?
            .lines()
            .map(|l| {
                l.trim().parse().map_err(|_| CgroupError::Parse {
                    path: path.clone(),
                    reason: format!("{l:?} is not a pid"),
                })
            })
            .collect()
    }

    pub fn watch(&self) -> Result<EventWatcher, CgroupError> {
        EventWatcher::new(self.path.clone())
    }

    /// Freezes every process and waits until the kernel reports `frozen 1`.
    pub fn freeze(&self, timeout: Duration) -> Result<(), CgroupError> {
        self.set_frozen(true, timeout)
    }

    pub fn thaw(&self, timeout: Duration) -> Result<(), CgroupError> {
        self.set_frozen(false, timeout)
    }

    fn set_frozen(&self, frozen: bool, timeout: Duration) -> Result<(), CgroupError> {
        let mut w = self.watch()?;
        write(
            &self.path.join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )?;
        if w.frozen() == frozen {
            return Ok(());
        }
        let what = if frozen { "freezing" } else { "thawing" };
        w.wait_for(timeout, what, |e| e == &CgroupEvent::Frozen(frozen))
            .map(|_| ())
    }

    /// SIGKILLs every process in the cgroup and its children (`cgroup.kill`).
    pub fn kill(&self) -> Result<(), CgroupError> {
        write(&self.path.join("cgroup.kill"), "1")
    }

    /// Removes the cgroup, waiting up to `timeout` for its last process to
    /// go (after a kill, processes exit asynchronously).
    pub fn remove(self, timeout: Duration) -> Result<(), CgroupError> {
        let (populated, _) = self.state()?;
        if populated {
            let mut w = self.watch()?;
            if w.populated() {
                w.wait_for(timeout, "emptying", |e| e == &CgroupEvent::Populated(false))?;
            }
        }
        fs::remove_dir(&self.path).map_err(|source| CgroupError::Remove {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests;

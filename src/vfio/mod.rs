//! VFIO passthrough through PCI sysfs: IOMMU groups and their members, a
//! viability check before any write, binding a request's groups to vfio-pci
//! with `driver_override` (never `new_id`, which would grab every device with
//! that ID), verification, and restoring each member to the driver it had.
//!
//! Every binding is recorded before the first write (write-ahead), so a
//! runner that crashed half-way, or whose VM owner is gone, can restore it.
//! A failure half-way rolls the group back. There is no ACS override: a
//! device that shares a group with something that must stay on the host
//! cannot be passed through, and the error says which device blocks it.

mod sysfs;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use sysfs::{write_with_timeout, RealSysfs, SysfsWriter, WriteError};

use crate::topology::{scan_functions, PciAddress, PciFunction, TopologyError};

pub const VFIO_DRIVER: &str = "vfio-pci";

/// The owner of bindings an admin made by hand (`rivernode gpu bind`); they
/// are never treated as orphans.
pub const ADMIN_OWNER: &str = "admin";

/// Where a data directory records its bindings.
pub fn state_file(data_dir: &Path) -> PathBuf {
    data_dir.join("vfio/bindings.json")
}

#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error("no PCI device {0}")]
    NoDevice(PciAddress),
    #[error("{0} has no IOMMU group: the IOMMU is off (enable VT-d/AMD-Vi in the firmware and boot with intel_iommu=on or amd_iommu=on)")]
    IommuOff(PciAddress),
    #[error("the vfio-pci driver is not loaded ({0} is missing): run `modprobe vfio-pci`")]
    NoVfioDriver(PathBuf),
    #[error("{device} ({driver}) shares IOMMU group {group} with {requested} but was not asked for: pass it too, or move the card to a slot with its own group (rivernode never uses the ACS override)")]
    Blocked {
        group: u32,
        device: PciAddress,
        driver: String,
        requested: String,
    },
    #[error("{device} in IOMMU group {group} is already assigned elsewhere ({holder})")]
    AssignedElsewhere {
        group: u32,
        device: PciAddress,
        holder: String,
    },
    #[error("{0} is the boot display: passing it through would take the host's console")]
    BootVga(PciAddress),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("{what}: expected {expected}, found {found}")]
    Verify {
        what: String,
        expected: String,
        found: String,
    },
    #[error("binding state {path}: {message}")]
    State { path: PathBuf, message: String },
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("GPU {device} is in use by {holder}: stop it first (a GPU is never in a container and on vfio-pci at once)")]
    HeldByInstance { device: PciAddress, holder: String },
    #[error("GPU {device} is bound to vfio-pci ({holder}): `rivernode gpu unbind {device}` gives it back to the host")]
    OnVfio { device: PciAddress, holder: String },
    #[error("GPU {device} is passed to {holder}'s VM: stopping the VM gives it back (`--force` takes it from under a running VM)")]
    PassedToInstance { device: PciAddress, holder: String },
    #[error("restoring IOMMU group {group} left problems: {}", problems.join("; "))]
    Restore { group: u32, problems: Vec<String> },
}

/// What a group member is, for the viability check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberKind {
    /// A device that does work; it must go to vfio-pci with the group.
    Endpoint,
    /// A PCI bridge (class 06xx); it stays with its host driver.
    Bridge,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupMember {
    pub function: PciFunction,
    pub kind: MemberKind,
    pub boot_vga: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IommuGroup {
    pub id: u32,
    pub members: Vec<GroupMember>,
}

/// What binding a request would do to one group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub group: u32,
    /// Endpoints that go to vfio-pci: the requested devices and their slot companions.
    pub bind: Vec<PciAddress>,
    /// Bridges of the group, left alone.
    pub bridges: Vec<PciAddress>,
    /// Driverless endpoints not asked for: they do not block VFIO and are left alone.
    pub idle: Vec<PciAddress>,
}

/// One member of a binding with the driver it had before.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub address: PciAddress,
    pub original_driver: Option<String>,
}

/// A group rivernode bound to vfio-pci, for whom.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupBinding {
    pub group: u32,
    pub owner: String,
    pub members: Vec<MemberRecord>,
}

#[derive(Default, Serialize, Deserialize)]
struct State {
    groups: BTreeMap<u32, GroupBinding>,
    /// GPUs a container holds, by its holder (`task 7`): the other half of
    /// the node's one GPU ledger, so that a GPU is never on vfio-pci and in
    /// a container at once.
    #[serde(default)]
    held: BTreeMap<PciAddress, String>,
}

/// An exclusive lock on the state file (flock on a sibling `.lock` file),
/// held by every read-modify-write: the runner and `rivernode gpu` both
/// change the state.
struct StateLock {
    _flock: nix::fcntl::Flock<std::fs::File>,
}

/// Machine-level facts for `rivernode gpu check`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VfioStatus {
    pub iommu_groups: usize,
    pub vfio_pci_loaded: bool,
    pub dev_vfio: bool,
}

pub struct Vfio {
    sys: PathBuf,
    dev: PathBuf,
    state_file: PathBuf,
    timeout: Duration,
    writer: Arc<dyn SysfsWriter>,
}

impl Vfio {
    /// `sys` and `dev` are the roots of sysfs and devtmpfs; `state_file`
    /// records bindings; `timeout` bounds every sysfs write.
    pub fn new(
        sys: &Path,
        dev: &Path,
        state_file: &Path,
        timeout: Duration,
        writer: Arc<dyn SysfsWriter>,
    ) -> Self {
        Self {
            sys: sys.to_path_buf(),
            dev: dev.to_path_buf(),
            state_file: state_file.to_path_buf(),
            timeout,
            writer,
        }
    }

    fn device_dir(&self, a: PciAddress) -> PathBuf {
        self.sys.join("bus/pci/devices").join(a.to_string())
    }

    fn driver_of(&self, a: PciAddress) -> Option<String> {
        std::fs::read_link(self.device_dir(a).join("driver"))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    pub fn status(&self) -> VfioStatus {
        VfioStatus {
            iommu_groups: std::fs::read_dir(self.sys.join("kernel/iommu_groups"))
                .map(|d| d.count())
                .unwrap_or(0),
            vfio_pci_loaded: self.sys.join("bus/pci/drivers").join(VFIO_DRIVER).is_dir(),
            dev_vfio: self.dev.join("vfio/vfio").exists(),
        }
    }

    pub fn group_id(&self, a: PciAddress) -> Result<u32, VfioError> {
        let dir = self.device_dir(a);
        if !dir.is_dir() {
            return Err(VfioError::NoDevice(a));
        }
        std::fs::read_link(dir.join("iommu_group"))
            .ok()
            .and_then(|t| t.file_name()?.to_str()?.parse().ok())
            .ok_or(VfioError::IommuOff(a))
    }

    pub fn group(&self, id: u32) -> Result<IommuGroup, VfioError> {
        let functions = scan_functions(&self.sys)?;
        self.group_from(id, &functions)
    }

    fn group_from(&self, id: u32, functions: &[PciFunction]) -> Result<IommuGroup, VfioError> {
        let dir = self.sys.join(format!("kernel/iommu_groups/{id}/devices"));
        let entries = std::fs::read_dir(&dir).map_err(|source| TopologyError::Read {
            path: dir.clone(),
            source,
        })?;
        let mut members = Vec::new();
        for e in entries.flatten() {
            let Ok(a) = e.file_name().to_string_lossy().parse::<PciAddress>() else {
                continue;
            };
            let Some(f) = functions.iter().find(|f| f.address == a) else {
                continue;
            };
            let boot_vga = std::fs::read_to_string(self.device_dir(a).join("boot_vga"))
                .map(|v| v.trim() == "1")
                .unwrap_or(false);
            members.push(GroupMember {
                kind: if f.class >> 16 == 0x06 {
                    MemberKind::Bridge
                } else {
                    MemberKind::Endpoint
                },
                function: f.clone(),
                boot_vga,
            });
        }
        members.sort_by_key(|m| m.function.address);
        Ok(IommuGroup { id, members })
    }

    fn load_state(&self) -> Result<State, VfioError> {
        match std::fs::read_to_string(&self.state_file) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| VfioError::State {
                path: self.state_file.clone(),
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(VfioError::State {
                path: self.state_file.clone(),
                message: e.to_string(),
            }),
        }
    }

    fn save_state(&self, s: &State) -> Result<(), VfioError> {
        let err = |message: String| VfioError::State {
            path: self.state_file.clone(),
            message,
        };
        if let Some(parent) = self.state_file.parent() {
            crate::files::ensure_private_dir(parent).map_err(|e| err(e.to_string()))?;
        }
        let json = serde_json::to_vec_pretty(s).map_err(|e| err(e.to_string()))?;
        crate::files::write_secret(&self.state_file, &json).map_err(|e| err(e.to_string()))
    }

    fn lock(&self) -> Result<StateLock, VfioError> {
        let err = |message: String| VfioError::State {
            path: self.state_file.clone(),
            message,
        };
        if let Some(parent) = self.state_file.parent() {
            crate::files::ensure_private_dir(parent).map_err(|e| err(e.to_string()))?;
        }
        let path = self.state_file.with_extension("lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| err(format!("{}: {e}", path.display())))?;
        // Never wait without bound: a `gpu bind` stuck in a hanging sysfs
        // write must not stall the runner's teardowns behind it.
        let deadline = std::time::Instant::now() + self.timeout * 3;
        let mut file = file;
        loop {
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(f) => return Ok(StateLock { _flock: f }),
                Err((f, nix::errno::Errno::EWOULDBLOCK))
                    if std::time::Instant::now() < deadline =>
                {
                    file = f;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(err(format!(
                        "{} is held by another rivernode process (a `gpu bind` or `unbind` still running?)",
                        path.display()
                    )))
                }
                Err((_, e)) => return Err(err(format!("locking {}: {e}", path.display()))),
            }
        }
    }

    /// Records that `holder` (an instance) uses `gpus` in a container. Refused
    /// for a GPU on vfio-pci (bound by rivernode or not) or held by another.
    pub fn claim(&self, gpus: &[PciAddress], holder: &str) -> Result<(), VfioError> {
        if gpus.is_empty() {
            return Ok(());
        }
        let _lock = self.lock()?;
        let mut state = self.load_state()?;
        for &g in gpus {
            if let Some(b) = state
                .groups
                .values()
                .find(|b| b.members.iter().any(|m| m.address == g))
            {
                // Passed to a VM: in use, not an admin's binding to undo.
                if b.owner != ADMIN_OWNER {
                    return Err(VfioError::HeldByInstance {
                        device: g,
                        holder: b.owner.clone(),
                    });
                }
                return Err(VfioError::OnVfio {
                    device: g,
                    holder: format!("bound by rivernode for {}", b.owner),
                });
            }
            if self.driver_of(g).as_deref() == Some(VFIO_DRIVER) {
                return Err(VfioError::OnVfio {
                    device: g,
                    holder: "bound outside rivernode".into(),
                });
            }
            match state.held.get(&g) {
                Some(h) if h != holder => {
                    return Err(VfioError::HeldByInstance {
                        device: g,
                        holder: h.clone(),
                    })
                }
                _ => {}
            }
        }
        // A holder has one set: a claim replaces what it held before.
        state.held.retain(|_, h| h != holder);
        for &g in gpus {
            state.held.insert(g, holder.to_string());
        }
        self.save_state(&state)
    }

    /// Gives back every GPU `holder` has in a container.
    pub fn release(&self, holder: &str) -> Result<(), VfioError> {
        // Most instances hold no GPU: no lock, no write for them.
        if !self.load_state()?.held.values().any(|h| h == holder) {
            return Ok(());
        }
        self.retain_claims(|h| h != holder)
    }

    /// Keeps only the claims whose holder passes `keep` (after a crash: the
    /// instances that still run).
    pub fn retain_claims(&self, keep: impl Fn(&str) -> bool) -> Result<(), VfioError> {
        let _lock = self.lock()?;
        let mut state = self.load_state()?;
        let before = state.held.len();
        state.held.retain(|_, h| keep(h));
        if state.held.len() != before {
            self.save_state(&state)?;
        }
        Ok(())
    }

    /// GPUs held by containers, with their holders.
    pub fn claims(&self) -> Result<BTreeMap<PciAddress, String>, VfioError> {
        Ok(self.load_state()?.held)
    }

    /// Every binding rivernode holds.
    pub fn bindings(&self) -> Result<Vec<GroupBinding>, VfioError> {
        Ok(self.load_state()?.groups.into_values().collect())
    }

    /// Checks, without writing anything, what binding `request` would do;
    /// one plan per IOMMU group involved.
    pub fn plan(&self, request: &[PciAddress], owner: &str) -> Result<Vec<Plan>, VfioError> {
        let functions = scan_functions(&self.sys)?;
        let state = self.load_state()?;
        let mut groups: Vec<u32> = Vec::new();
        for &a in request {
            let g = self.group_id(a)?;
            if !groups.contains(&g) {
                groups.push(g);
            }
        }
        let wanted = |a: &PciAddress| request.iter().any(|r| r == a || r.same_slot(a));
        let requested = request
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut plans = Vec::new();
        for g in groups {
            let group = self.group_from(g, &functions)?;
            let ours = state.groups.get(&g);
            if let Some(b) = ours.filter(|b| b.owner != owner) {
                return Err(VfioError::AssignedElsewhere {
                    group: g,
                    device: b.members.first().map(|m| m.address).unwrap_or(request[0]),
                    holder: format!("bound by rivernode for {}", b.owner),
                });
            }
            let mut plan = Plan {
                group: g,
                bind: Vec::new(),
                bridges: Vec::new(),
                idle: Vec::new(),
            };
            for m in &group.members {
                let a = m.function.address;
                let driver = m.function.driver.as_deref();
                if m.kind == MemberKind::Bridge {
                    plan.bridges.push(a);
                } else if wanted(&a) {
                    if let Some(h) = state.held.get(&a) {
                        return Err(VfioError::HeldByInstance {
                            device: a,
                            holder: h.clone(),
                        });
                    }
                    if m.boot_vga {
                        return Err(VfioError::BootVga(a));
                    }
                    if driver == Some(VFIO_DRIVER) && ours.is_none() {
                        return Err(VfioError::AssignedElsewhere {
                            group: g,
                            device: a,
                            holder: "bound to vfio-pci outside rivernode".into(),
                        });
                    }
                    plan.bind.push(a);
                } else {
                    match driver {
                        None => plan.idle.push(a),
                        Some(d) => {
                            return Err(VfioError::Blocked {
                                group: g,
                                device: a,
                                driver: d.to_string(),
                                requested: requested.clone(),
                            })
                        }
                    }
                }
            }
            plans.push(plan);
        }
        Ok(plans)
    }

    fn write(&self, path: &Path, value: &str) -> Result<(), VfioError> {
        Ok(write_with_timeout(&self.writer, path, value, self.timeout)?)
    }

    /// Binds the groups of `request` to vfio-pci for `owner`. All groups are
    /// checked before anything is written; if binding one fails, every group
    /// of this request is rolled back. Binding again for the same owner is a no-op.
    pub fn bind(
        &self,
        request: &[PciAddress],
        owner: &str,
    ) -> Result<Vec<GroupBinding>, VfioError> {
        let driver_dir = self.sys.join("bus/pci/drivers").join(VFIO_DRIVER);
        if !driver_dir.is_dir() {
            return Err(VfioError::NoVfioDriver(driver_dir));
        }
        // Held from the check to the last write: a container cannot claim a
        // GPU of this request in between.
        let _lock = self.lock()?;
        let plans = self.plan(request, owner)?;
        let mut state = self.load_state()?;
        let mut done: Vec<u32> = Vec::new();
        for plan in &plans {
            let record = match state.groups.get(&plan.group) {
                // Already ours: re-verify (and finish, if a crash interrupted
                // it), recording any member the group gained since.
                Some(b) => {
                    let mut b = b.clone();
                    for &addr in &plan.bind {
                        if !b.members.iter().any(|m| m.address == addr) {
                            b.members.push(MemberRecord {
                                address: addr,
                                original_driver: self.driver_of(addr),
                            });
                        }
                    }
                    b
                }
                None => GroupBinding {
                    group: plan.group,
                    owner: owner.to_string(),
                    members: plan
                        .bind
                        .iter()
                        .map(|&a| MemberRecord {
                            address: a,
                            original_driver: self.driver_of(a),
                        })
                        .collect(),
                },
            };
            // Write-ahead: the record exists before the first sysfs write.
            state.groups.insert(plan.group, record.clone());
            self.save_state(&state)?;
            if let Err(e) = self.bind_group(plan) {
                tracing::warn!(group = plan.group, error = %crate::error_chain(&e), "binding failed; rolling back");
                let mut problems = Vec::new();
                for g in done.iter().copied().chain([plan.group]) {
                    let left = state
                        .groups
                        .get(&g)
                        .map(|b| self.restore_members(&b.members))
                        .unwrap_or_default();
                    // A group that did not come back keeps its record for a later restore.
                    if left.is_empty() {
                        state.groups.remove(&g);
                    }
                    problems.extend(left);
                }
                self.save_state(&state)?;
                if !problems.is_empty() {
                    tracing::error!(?problems, "rollback left problems");
                }
                return Err(e);
            }
            done.push(plan.group);
        }
        Ok(done
            .iter()
            .filter_map(|g| state.groups.get(g).cloned())
            .collect())
    }

    fn bind_group(&self, plan: &Plan) -> Result<(), VfioError> {
        for &a in &plan.bind {
            let dir = self.device_dir(a);
            let current = self.driver_of(a);
            if current.as_deref() == Some(VFIO_DRIVER) {
                continue;
            }
            if current.is_some() {
                self.write(&dir.join("driver/unbind"), &a.to_string())?;
            }
            self.write(&dir.join("driver_override"), VFIO_DRIVER)?;
            self.write(&self.sys.join("bus/pci/drivers_probe"), &a.to_string())?;
            let now = self.driver_of(a);
            if now.as_deref() != Some(VFIO_DRIVER) {
                return Err(VfioError::Verify {
                    what: format!("driver of {a}"),
                    expected: VFIO_DRIVER.into(),
                    found: now.unwrap_or_else(|| "none".into()),
                });
            }
        }
        let node = self.dev.join("vfio").join(plan.group.to_string());
        if !node.exists() {
            return Err(VfioError::Verify {
                what: format!("IOMMU group {}", plan.group),
                expected: format!("{} to exist", node.display()),
                found: "nothing".into(),
            });
        }
        Ok(())
    }

    /// Gives each member back to its recorded driver. Keeps going past
    /// failures and returns every problem (an empty list is success).
    fn restore_members(&self, members: &[MemberRecord]) -> Vec<String> {
        let mut problems = Vec::new();
        for m in members.iter().rev() {
            let a = m.address;
            let dir = self.device_dir(a);
            let step = || -> Result<(), VfioError> {
                if self.driver_of(a).as_deref() == Some(VFIO_DRIVER) {
                    self.write(&dir.join("driver/unbind"), &a.to_string())?;
                }
                // An empty write clears the override.
                self.write(&dir.join("driver_override"), "\n")?;
                if let Some(original) = &m.original_driver {
                    if self.driver_of(a).is_none() {
                        self.write(&self.sys.join("bus/pci/drivers_probe"), &a.to_string())?;
                    }
                    let now = self.driver_of(a);
                    if now.as_deref() != Some(original) {
                        return Err(VfioError::Verify {
                            what: format!("driver of {a}"),
                            expected: original.clone(),
                            found: now.unwrap_or_else(|| "none".into()),
                        });
                    }
                }
                Ok(())
            };
            if let Err(e) = step() {
                problems.push(e.to_string());
            }
        }
        problems
    }

    /// Restores the group rivernode bound; a group it did not bind is left
    /// alone (no-op). The record is dropped only when every member is back.
    pub fn restore(&self, group: u32) -> Result<(), VfioError> {
        let _lock = self.lock()?;
        let mut state = self.load_state()?;
        let Some(b) = state.groups.get(&group).cloned() else {
            return Ok(());
        };
        let problems = self.restore_members(&b.members);
        if !problems.is_empty() {
            return Err(VfioError::Restore { group, problems });
        }
        state.groups.remove(&group);
        self.save_state(&state)
    }

    /// `rivernode gpu unbind`: restores the group of `device`, unless an
    /// instance (a VM) holds it and `force` is not given: taking a GPU from
    /// under a running QEMU leaves the device stuck half-way.
    pub fn unbind(&self, device: PciAddress, force: bool) -> Result<(), VfioError> {
        let g = self.group_id(device)?;
        if let Some(b) = self.bindings()?.into_iter().find(|b| b.group == g) {
            if b.owner != ADMIN_OWNER && !force {
                return Err(VfioError::PassedToInstance {
                    device,
                    holder: b.owner,
                });
            }
        }
        self.restore(g)
    }

    /// Restores the group of `device`.
    pub fn restore_device(&self, device: PciAddress) -> Result<(), VfioError> {
        let g = self.group_id(device)?;
        self.restore(g)
    }

    /// Restores every group bound for `owner` (a VM that ended), all of
    /// them tried; the groups restored, or the first group that did not
    /// come back (its record kept for the next try).
    pub fn restore_owner(&self, owner: &str) -> Result<Vec<u32>, VfioError> {
        let mut restored = Vec::new();
        let mut failed = None;
        for b in self.bindings()?.into_iter().filter(|b| b.owner == owner) {
            match self.restore(b.group) {
                Ok(()) => restored.push(b.group),
                Err(e) => {
                    tracing::error!(group = b.group, owner, error = %crate::error_chain(&e), "cannot restore a VM's binding");
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(restored),
        }
    }

    /// Startup reconciliation: restores every binding whose owner is gone.
    /// Returns the groups it restored; failures are logged and kept for the next try.
    pub fn restore_orphans(
        &self,
        owner_alive: impl Fn(&str) -> bool,
    ) -> Result<Vec<u32>, VfioError> {
        let mut restored = Vec::new();
        for b in self.bindings()? {
            if owner_alive(&b.owner) {
                continue;
            }
            match self.restore(b.group) {
                Ok(()) => restored.push(b.group),
                Err(e) => {
                    tracing::error!(group = b.group, owner = %b.owner, error = %crate::error_chain(&e), "cannot restore orphaned binding")
                }
            }
        }
        Ok(restored)
    }
}

#[cfg(test)]
mod tests;

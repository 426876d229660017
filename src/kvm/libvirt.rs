//! VMs through libvirt (the `virt` crate, 0.4.3): define from our domain
//! XML, start, stop (ACPI power button with a deadline, then destroy),
//! pause and resume, undefine, and the list of our domains with their
//! metadata, which is all a restarted runner needs to find its VMs again.
//!
//! Every call blocks (libvirt's API is synchronous): async callers run
//! them with `spawn_blocking`. Domains are persistent, so libvirt owns the
//! QEMU processes and a runner's crash touches no VM.

use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::ErrorNumber;
use virt::sys;

use super::domain::{Instance, Vm, METADATA_NS, NAME_PREFIX};
use crate::cgroup::InstanceUsage;

#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("libvirt: {what}")]
    Call {
        what: String,
        #[source]
        source: virt::error::Error,
    },
    #[error(transparent)]
    Domain(#[from] super::domain::DomainError),
    #[error("libvirt has no domain {0}")]
    NoDomain(String),
}

fn call(what: impl Into<String>) -> impl FnOnce(virt::error::Error) -> LibvirtError {
    let what = what.into();
    move |source| LibvirtError::Call { what, source }
}

/// What a domain is doing, as far as the runner cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    Running,
    Paused,
    /// Defined, not running (stopped, crashed, or never started), with
    /// the exit status that stands for why, as a container's would:
    /// 0 the guest powered off, 137 the plug was pulled, 1 it crashed.
    Off {
        exit: u32,
    },
    /// Shutting down, or a state we do not act on.
    Other,
}

fn state_of(s: sys::virDomainState, reason: i32) -> VmState {
    match s {
        sys::VIR_DOMAIN_RUNNING | sys::VIR_DOMAIN_BLOCKED => VmState::Running,
        sys::VIR_DOMAIN_PAUSED | sys::VIR_DOMAIN_PMSUSPENDED => VmState::Paused,
        sys::VIR_DOMAIN_SHUTOFF => VmState::Off {
            exit: match reason as sys::virDomainShutoffReason {
                sys::VIR_DOMAIN_SHUTOFF_DESTROYED => 128 + 9,
                sys::VIR_DOMAIN_SHUTOFF_CRASHED | sys::VIR_DOMAIN_SHUTOFF_FAILED => 1,
                // Shut down by the guest, never started, saved, ...
                _ => 0,
            },
        },
        sys::VIR_DOMAIN_CRASHED => VmState::Off { exit: 1 },
        _ => VmState::Other,
    }
}

/// The backup job description: disk `vda` (the VM's own) copied whole, as
/// it is when the job begins, into a new qcow2 file `target`; the seed
/// (`sda`) left out.
pub fn disk_copy_xml(target: &std::path::Path) -> String {
    let mut w = super::xml::Writer::default();
    w.open("domainbackup", &[("mode", "push")])
        .open("disks", &[])
        .open(
            "disk",
            &[
                ("name", super::domain::DISK_TARGET),
                ("backup", "yes"),
                ("type", "file"),
            ],
        )
        .empty("target", &[("file", &target.display().to_string())])
        .empty("driver", &[("type", "qcow2")])
        .close()
        .empty("disk", &[("name", "sda"), ("backup", "no")])
        .close()
        .close();
    w.finish()
}

/// One of our domains as libvirt has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundVm {
    pub uuid: String,
    pub instance: Instance,
    pub state: VmState,
}

/// A connection to libvirt (`qemu:///system` on a node).
pub struct Hypervisor {
    conn: Connect,
}

impl Drop for Hypervisor {
    fn drop(&mut self) {
        // virt's Connect has no Drop of its own.
        let _ = self.conn.close();
    }
}

impl Hypervisor {
    pub fn open(uri: &str) -> Result<Hypervisor, LibvirtError> {
        // libvirt prints every error to stderr by default, an expected
        // "no such domain" too; ours come back as values instead.
        static QUIET: std::sync::Once = std::sync::Once::new();
        QUIET.call_once(virt::error::clear_error_callback);
        Ok(Hypervisor {
            conn: Connect::open(Some(uri)).map_err(call(format!(
                "connecting to {uri} (is libvirtd running? `rivernode vm check` says)"
            )))?,
        })
    }

    fn lookup(&self, uuid: &str) -> Result<Option<Domain>, LibvirtError> {
        // virt turns a NUL in a string argument into a panic: only UUIDs pass.
        if !super::domain::valid_uuid(uuid) {
            return Err(super::domain::DomainError::Uuid(uuid.to_string()).into());
        }
        match Domain::lookup_by_uuid_string(&self.conn, uuid) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.code() == ErrorNumber::NoDomain => Ok(None),
            Err(e) => Err(call(format!("looking up domain {uuid}"))(e)),
        }
    }

    /// Defines `vm` (again, if it exists: a newer definition replaces an
    /// inactive one) and starts it unless it runs already.
    pub fn define_and_start(&self, vm: &Vm) -> Result<(), LibvirtError> {
        let xml = vm.to_xml()?;
        let name = super::domain_name(&vm.uuid);
        let dom = match self.lookup(&vm.uuid)? {
            Some(d) if d.is_active().map_err(call(format!("state of {name}")))? => return Ok(()),
            _ => Domain::define_xml(&self.conn, &xml).map_err(call(format!("defining {name}")))?,
        };
        // A fresh boot, never a managed-save image (libvirt-guests suspends
        // domains at node shutdown): the guest must read its new seed.
        // (libvirt's test driver takes no flags: there, a plain start.)
        match dom.create_with_flags(sys::VIR_DOMAIN_START_FORCE_BOOT) {
            Err(e) if e.code() == ErrorNumber::InvalidArg => dom.create().map(|_| 0),
            r => r,
        }
        .map_err(call(format!("starting {name}")))?;
        Ok(())
    }

    pub fn state(&self, uuid: &str) -> Result<Option<VmState>, LibvirtError> {
        let Some(d) = self.lookup(uuid)? else {
            return Ok(None);
        };
        let (s, reason) = d
            .get_state()
            .map_err(call(format!("state of domain {uuid}")))?;
        Ok(Some(state_of(s, reason)))
    }

    /// Presses the power button (ACPI) and returns; the guest decides when
    /// to turn off. False when the domain is absent or off already.
    pub fn press_power_button(&self, uuid: &str) -> Result<bool, LibvirtError> {
        let Some(d) = self.lookup(uuid)? else {
            return Ok(false);
        };
        if !d
            .is_active()
            .map_err(call(format!("state of domain {uuid}")))?
        {
            return Ok(false);
        }
        // Some drivers (libvirt's test driver) take no ACPI flag.
        let pressed = match d.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN) {
            Err(e) if e.code() == ErrorNumber::InvalidArg => d.shutdown(),
            r => r,
        };
        if let Err(e) = pressed {
            // Off already (it went down by itself meanwhile) is what we wanted.
            if d.is_active()
                .map_err(call(format!("state of domain {uuid}")))?
            {
                return Err(call(format!("shutting down domain {uuid}"))(e));
            }
            return Ok(false);
        }
        Ok(true)
    }

    /// Presses the power button and waits up to `grace` for the guest to
    /// turn itself off; then pulls the plug. True if the guest shut down
    /// by itself. An absent or stopped domain is done already.
    pub fn stop(&self, uuid: &str, grace: Duration) -> Result<bool, LibvirtError> {
        if !self.press_power_button(uuid)? {
            return Ok(true);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !matches!(
                self.state(uuid)?,
                Some(VmState::Running | VmState::Paused | VmState::Other)
            ) {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.destroy(uuid)?;
        Ok(false)
    }

    /// Stops the domain at once (the plug pulled), if it runs.
    pub fn destroy(&self, uuid: &str) -> Result<(), LibvirtError> {
        let Some(d) = self.lookup(uuid)? else {
            return Ok(());
        };
        let active = |d: &Domain| {
            d.is_active()
                .map_err(call(format!("state of domain {uuid}")))
        };
        if !active(&d)? {
            return Ok(());
        }
        // Graceful first (QEMU gets SIGTERM and flushes), then SIGKILL.
        if d.destroy_flags(sys::VIR_DOMAIN_DESTROY_GRACEFUL).is_err() {
            if let Err(e) = d.destroy() {
                // The guest may have turned itself off meanwhile: that is done too.
                if active(&d)? {
                    return Err(call(format!("destroying domain {uuid}"))(e));
                }
            }
        }
        Ok(())
    }

    /// What running domain `uuid` uses, for `/metrics`: its CPU time, its
    /// QEMU's resident memory and its disk's bytes, as libvirt accounts
    /// them (the VM's processes are the guest's: no count). `None`: not
    /// there or not running.
    pub fn usage(&self, uuid: &str) -> Result<Option<InstanceUsage>, LibvirtError> {
        let Some(d) = self.lookup(uuid)? else {
            return Ok(None);
        };
        let info = match d.get_info() {
            Ok(i) => i,
            Err(e) if e.code() == ErrorNumber::NoDomain => return Ok(None),
            Err(e) => return Err(call(format!("info of domain {uuid}"))(e)),
        };
        if info.state == sys::VIR_DOMAIN_SHUTOFF {
            return Ok(None);
        }
        // A driver or guest that cannot say leaves out only that part.
        let memory = d
            .memory_stats(0)
            .map(|m| m.iter().map(|s| (s.tag, s.val)).collect::<Vec<_>>())
            .unwrap_or_default();
        let disk = d
            .get_block_stats(super::domain::DISK_TARGET)
            .ok()
            .map(|b| (b.rd_bytes, b.wr_bytes));
        Ok(Some(domain_usage(
            info.cpu_time,
            info.memory,
            &memory,
            disk,
        )))
    }

    pub fn pause(&self, uuid: &str) -> Result<(), LibvirtError> {
        if let Some(d) = self.lookup(uuid)? {
            d.suspend()
                .map_err(call(format!("pausing domain {uuid}")))?;
        }
        Ok(())
    }

    pub fn resume(&self, uuid: &str) -> Result<(), LibvirtError> {
        if let Some(d) = self.lookup(uuid)? {
            d.resume()
                .map_err(call(format!("resuming domain {uuid}")))?;
        }
        Ok(())
    }

    /// Freezes the guest's filesystems through its guest agent, so that a
    /// disk copy begun now finds them consistent; false when no agent
    /// froze them (the copy is then as consistent as a disk after a power
    /// cut). An agent that answered too late may still have frozen them:
    /// the caller thaws whatever this returns.
    pub fn freeze(&self, uuid: &str) -> Result<bool, LibvirtError> {
        let Some(d) = self.lookup(uuid)? else {
            return Ok(false);
        };
        // SAFETY: `d` owns a valid domain pointer for the whole call; a
        // null list of zero mount points asks for every filesystem.
        let frozen = unsafe { sys::virDomainFSFreeze(d.as_ptr(), std::ptr::null_mut(), 0, 0) };
        if frozen < 0 {
            tracing::info!(domain = uuid, error = %virt::error::Error::last_error(), "no guest agent froze the filesystems: the copy is crash-consistent");
        }
        Ok(frozen > 0)
    }

    /// Thaws the guest's filesystems (a no-op for a guest not frozen),
    /// trying `attempts` times: a guest left frozen stops writing.
    pub fn thaw(&self, uuid: &str, attempts: u32) -> Result<(), LibvirtError> {
        let mut last = None;
        for attempt in 0..attempts.max(1) {
            if attempt > 0 {
                std::thread::sleep(Duration::from_secs(1));
            }
            let Some(d) = self.lookup(uuid)? else {
                return Ok(());
            };
            // SAFETY: as in `freeze`.
            if unsafe { sys::virDomainFSThaw(d.as_ptr(), std::ptr::null_mut(), 0, 0) } >= 0 {
                return Ok(());
            }
            last = Some(virt::error::Error::last_error());
        }
        Err(call(format!("thawing the filesystems of domain {uuid}"))(
            last.expect("at least one attempt"),
        ))
    }

    /// Begins copying the running domain's disk, as it is at this call,
    /// into the new file `target` (`disk_copy_xml`); the guest runs on.
    pub fn begin_disk_copy(
        &self,
        uuid: &str,
        target: &std::path::Path,
    ) -> Result<(), LibvirtError> {
        let Some(d) = self.lookup(uuid)? else {
            return Err(LibvirtError::NoDomain(uuid.to_string()));
        };
        let xml = std::ffi::CString::new(disk_copy_xml(target)).map_err(|_| {
            super::domain::DomainError::Text {
                what: "backup target",
            }
        })?;
        // SAFETY: `d` owns a valid domain pointer and `xml` a NUL-terminated
        // string, both for the whole call; no checkpoint (null), no flags.
        let r = unsafe { sys::virDomainBackupBegin(d.as_ptr(), xml.as_ptr(), std::ptr::null(), 0) };
        if r < 0 {
            return Err(call(format!("copying the disk of domain {uuid}"))(
                virt::error::Error::last_error(),
            ));
        }
        Ok(())
    }

    /// The domain's job: `None` when none runs (or the domain is off),
    /// else the bytes it has processed so far.
    pub fn job_progress(&self, uuid: &str) -> Result<Option<u64>, LibvirtError> {
        let Some(d) = self.lookup(uuid)? else {
            return Ok(None);
        };
        if !d
            .is_active()
            .map_err(call(format!("state of domain {uuid}")))?
        {
            return Ok(None);
        }
        let job = d
            .get_job_info()
            .map_err(call(format!("the job of domain {uuid}")))?;
        Ok(
            (job.r#type != sys::VIR_DOMAIN_JOB_NONE as i32)
                .then(|| job.data_processed.unwrap_or(0)),
        )
    }

    /// Whether the domain's last finished job was a disk copy (a backup)
    /// that completed; the record stays for other readers.
    pub fn disk_copy_completed(&self, uuid: &str) -> Result<bool, LibvirtError> {
        let Some(d) = self.lookup(uuid)? else {
            return Ok(false);
        };
        let mut kind: std::ffi::c_int = 0;
        let mut params: sys::virTypedParameterPtr = std::ptr::null_mut();
        let mut n: std::ffi::c_int = 0;
        // SAFETY: `d` owns a valid domain pointer; libvirt fills the three
        // out-pointers, which are ours, and allocates `params` (freed below
        // with its own free, whatever it holds).
        let r = unsafe {
            sys::virDomainGetJobStats(
                d.as_ptr(),
                &mut kind,
                &mut params,
                &mut n,
                sys::VIR_DOMAIN_JOB_STATS_COMPLETED | sys::VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED,
            )
        };
        if r < 0 {
            return Err(call(format!("the last job of domain {uuid}"))(
                virt::error::Error::last_error(),
            ));
        }
        let mut operation: std::ffi::c_int = -1;
        if !params.is_null() {
            // SAFETY: `params` holds `n` parameters libvirt allocated, and
            // the name is a NUL-terminated constant; then freed once.
            unsafe {
                sys::virTypedParamsGetInt(
                    params,
                    n,
                    sys::VIR_DOMAIN_JOB_OPERATION.as_ptr(),
                    &mut operation,
                );
                sys::virTypedParamsFree(params, n);
            }
        }
        Ok(kind == sys::VIR_DOMAIN_JOB_COMPLETED as i32
            && operation == sys::VIR_DOMAIN_JOB_OPERATION_BACKUP as i32)
    }

    /// Cancels the domain's job (a disk copy that is to end).
    pub fn abort_job(&self, uuid: &str) -> Result<(), LibvirtError> {
        let Some(d) = self.lookup(uuid)? else {
            return Ok(());
        };
        // SAFETY: `d` owns a valid domain pointer for the call.
        if unsafe { sys::virDomainAbortJob(d.as_ptr()) } < 0 {
            return Err(call(format!("cancelling the job of domain {uuid}"))(
                virt::error::Error::last_error(),
            ));
        }
        Ok(())
    }

    /// Destroys and undefines the domain, with its UEFI variables and
    /// libvirt's snapshot records; its files are the caller's to remove.
    pub fn undefine(&self, uuid: &str) -> Result<(), LibvirtError> {
        self.destroy(uuid)?;
        let Some(d) = self.lookup(uuid)? else {
            return Ok(());
        };
        let all = sys::VIR_DOMAIN_UNDEFINE_NVRAM
            | sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA;
        // A driver without checkpoints or NVRAM (libvirt's test driver)
        // refuses those flags: fewer, then none. A UEFI domain needs the
        // NVRAM flag, so the first refusal is the one reported.
        let first = match d.undefine_flags(all) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if first.code() == ErrorNumber::InvalidArg {
            let fewer = all & !sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA;
            if d.undefine_flags(fewer).is_ok() || d.undefine().is_ok() {
                return Ok(());
            }
        }
        Err(call(format!("undefining domain {uuid}"))(first))
    }

    /// Every domain named `rivernode-*` with readable metadata; another
    /// manager's domains (other names) are never touched.
    pub fn list(&self) -> Result<Vec<FoundVm>, LibvirtError> {
        let doms = self
            .conn
            .list_all_domains(0)
            .map_err(call("listing domains"))?;
        let mut out = Vec::new();
        for d in doms {
            let name = d.get_name().map_err(call("a domain's name"))?;
            if !name.starts_with(NAME_PREFIX) {
                continue;
            }
            let uuid = d
                .get_uuid_string()
                .map_err(call(format!("uuid of {name}")))?;
            let meta = match d.get_metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(METADATA_NS),
                sys::VIR_DOMAIN_AFFECT_CONFIG,
            ) {
                Ok(m) => m,
                // Undefined while we listed: not there.
                Err(e) if e.code() == ErrorNumber::NoDomain => continue,
                Err(e) if e.code() == ErrorNumber::NoDomainMetadata => {
                    tracing::warn!(domain = %name, "a rivernode domain without our metadata is left alone");
                    continue;
                }
                // Anything else fails the list: a VM missed here would have
                // its cores and GPUs handed out again.
                Err(e) => return Err(call(format!("metadata of {name}"))(e)),
            };
            let instance = match Instance::from_metadata(&meta) {
                Ok(i) => i,
                Err(e) => {
                    tracing::warn!(domain = %name, error = %e, "a rivernode domain with unreadable metadata is left alone");
                    continue;
                }
            };
            let (s, reason) = match d.get_state() {
                Ok(s) => s,
                Err(e) if e.code() == ErrorNumber::NoDomain => continue,
                Err(e) => return Err(call(format!("state of {name}"))(e)),
            };
            out.push(FoundVm {
                uuid,
                instance,
                state: state_of(s, reason),
            });
        }
        out.sort_by_key(|f| f.instance.id);
        Ok(out)
    }
}

/// A domain's usage from libvirt's numbers: CPU time in ns, the guest's
/// memory in KiB (`virDomainGetInfo`), the memory statistics (tag, KiB)
/// and the disk's (read, written) bytes (-1 where QEMU cannot say).
/// Memory is QEMU's resident set where libvirt reads it, else what the
/// guest was given.
fn domain_usage(
    cpu_ns: u64,
    guest_kib: u64,
    memory: &[(u32, u64)],
    disk: Option<(i64, i64)>,
) -> InstanceUsage {
    let rss = memory
        .iter()
        .find(|(tag, _)| *tag == sys::VIR_DOMAIN_MEMORY_STAT_RSS)
        .map(|(_, kib)| *kib);
    let (r, w) = disk.unwrap_or((0, 0));
    InstanceUsage {
        cpu_seconds: cpu_ns as f64 / 1e9,
        memory_bytes: rss.unwrap_or(guest_kib) * 1024,
        pids: None,
        io_read_bytes: r.max(0) as u64,
        io_write_bytes: w.max(0) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libvirt's in-process test driver: the same calls, no daemon, no QEMU.
    #[test]
    fn a_domains_usage_is_qemus_resident_memory_its_cpu_time_and_its_disks_bytes() {
        let rss = sys::VIR_DOMAIN_MEMORY_STAT_RSS;
        let u = domain_usage(
            2_500_000_000,
            262_144,
            &[(0, 1), (rss, 40_960)],
            Some((512, 4096)),
        );
        assert_eq!(
            u,
            InstanceUsage {
                cpu_seconds: 2.5,
                memory_bytes: 40 << 20,
                pids: None,
                io_read_bytes: 512,
                io_write_bytes: 4096
            }
        );
        let u = domain_usage(0, 262_144, &[], Some((-1, -1)));
        assert_eq!(
            (u.memory_bytes, u.io_read_bytes),
            (256 << 20, 0),
            "what libvirt cannot say"
        );
    }

    #[test]
    fn a_domain_goes_through_its_life_and_is_found_by_its_metadata() {
        let h = Hypervisor::open("test:///default").unwrap();
        let vm = super::super::domain::tests::tcg();
        assert_eq!(h.state(&vm.uuid).unwrap(), None);
        h.define_and_start(&vm).unwrap();
        assert_eq!(h.state(&vm.uuid).unwrap(), Some(VmState::Running));
        // Starting what runs is nothing to do.
        h.define_and_start(&vm).unwrap();
        let found = h.list().unwrap();
        let ours: Vec<&FoundVm> = found.iter().filter(|f| f.uuid == vm.uuid).collect();
        assert_eq!(ours.len(), 1, "{found:?}");
        assert_eq!(ours[0].instance, vm.instance);
        assert!(
            found.iter().all(|f| f.uuid == vm.uuid),
            "the test driver's own domain (not rivernode-*) is not ours: {found:?}"
        );
        // The test driver keeps no statistics beyond its info: the guest's
        // memory stands in for QEMU's resident set.
        let u = h
            .usage(&vm.uuid)
            .unwrap()
            .expect("a running domain's usage");
        assert_eq!(u.memory_bytes, vm.memory_mib * 1024 * 1024, "{u:?}");
        assert_eq!(u.pids, None);
        h.pause(&vm.uuid).unwrap();
        assert_eq!(h.state(&vm.uuid).unwrap(), Some(VmState::Paused));
        h.resume(&vm.uuid).unwrap();
        assert!(h.stop(&vm.uuid, Duration::from_secs(5)).unwrap());
        assert_eq!(h.state(&vm.uuid).unwrap(), Some(VmState::Off { exit: 0 }));
        assert_eq!(
            h.usage(&vm.uuid).unwrap(),
            None,
            "an off domain uses nothing"
        );
        h.undefine(&vm.uuid).unwrap();
        assert_eq!(h.state(&vm.uuid).unwrap(), None);
        // Gone is gone: every step again is nothing to do.
        assert!(h.stop(&vm.uuid, Duration::from_secs(1)).unwrap());
        h.undefine(&vm.uuid).unwrap();
    }
}

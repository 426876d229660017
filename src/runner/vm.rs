//! The VM side of the node's driver: a VM VPS is a libvirt domain booting a
//! qcow2 overlay on a base image, with a NoCloud seed, a tap on the
//! instance bridge, its vCPUs pinned to its reserved cores and its memory
//! strict to its NUMA node (`crate::kvm` writes the domain).
//!
//! What the runner keeps of a VM is its directory, `VM_STORE/vms/<cid>/`
//! (disk, seed, console log, UEFI variables): the directory existing is what
//! makes an instance a VM, so every call finds the right backend with no
//! record of its own, after a crash too. libvirt owns the running QEMU, so a
//! VM outlives the runner; a restarted runner finds it in libvirt's list by
//! its directory, and its state in libvirt's list. The file `started` in the
//! directory marks a start, in this boot of the node, whose end the runner
//! has not finished yet: with it, a domain that is off has exited (its end
//! is to be reported); without it (or from an earlier boot: the node went
//! down under the VM), it is kept, and a VPS that should run is started.
//! `submitted-ms` says which task the VM was made for; a directory without
//! its disk is a make that did not finish (a crash), not a VM yet.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::api::{Assignment, ImageSource};
use crate::kvm::libvirt::{Hypervisor, LibvirtError, VmState};
use crate::kvm::seed::{seed_iso, SeedInput};
use crate::kvm::{Accel, Boot, DiskCache, Instance, Vm};

use super::container::TaskContext;
use super::driver::{Found, InstanceError, Signal, Started, TeardownFailure};
use super::lifecycle::Observed;

/// The marker of a start whose end is not finished (see the module's note).
const STARTED: &str = "started";
/// When the host accepted the task the VM was made for.
const SUBMITTED: &str = "submitted-ms";

/// The domain UUID of instance `cid`: derived, so the runner never has to
/// record it (version-4 and variant bits set, as libvirt expects a UUID).
pub fn vm_uuid(cid: &str) -> String {
    let mut b: [u8; 16] = Sha256::digest(cid.as_bytes())[..16]
        .try_into()
        .unwrap_or([0; 16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// What libvirt's state of a VM means to the lifecycle; `disk`: the VM's
/// disk exists; `started`: the runner has not finished the end of its last
/// start, made in this boot.
pub fn observed(state: Option<VmState>, disk: bool, started: bool) -> Observed {
    match state {
        // A make that did not get as far as the disk: nothing to keep.
        None if !disk => Observed::Absent,
        // Files, no domain: a crash between making the disk and defining
        // the domain, or a domain undefined by hand. The disk is there to start.
        None => Observed::Kept,
        Some(VmState::Running | VmState::Other) => Observed::Running,
        Some(VmState::Paused) => Observed::Paused,
        Some(VmState::Off { exit }) if started => Observed::Exited(exit),
        Some(VmState::Off { .. }) => Observed::Kept,
    }
}

/// How VMs boot on this node, from the runner's settings. A kernel and
/// initrd from the node are copied into the VM's directory first: libvirt
/// hands the files a domain boots to QEMU's user while it runs, and the
/// node's own /boot must never be writable by a guest's QEMU.
fn boot(config: &crate::config::RunnerConfig, dir: &Path) -> Result<Boot, InstanceError> {
    let copy = |from: &Path, name: &str| -> Result<PathBuf, InstanceError> {
        let to = dir.join(name);
        let tmp = dir.join(format!("{name}.copying"));
        let io = |source| InstanceError::Io {
            path: from.to_path_buf(),
            source,
        };
        std::fs::copy(from, &tmp).map_err(io)?;
        std::fs::rename(&tmp, &to).map_err(io)?;
        Ok(to)
    };
    Ok(match (&config.vm_kernel, config.vm_firmware.as_str()) {
        (Some(kernel), _) => Boot::Kernel {
            kernel: copy(kernel, "vmlinuz")?,
            initrd: match &config.vm_initrd {
                Some(i) => Some(copy(i, "initrd.img")?),
                None => None,
            },
            cmdline: config.vm_cmdline.clone(),
        },
        (None, "bios") => Boot::Bios,
        (None, _) => Boot::Uefi {
            nvram: dir.join("VARS.fd"),
        },
    })
}

impl TaskContext {
    /// Where VM `id`'s files are.
    pub(super) fn vm_dir(&self, id: u64) -> PathBuf {
        vms_dir(&self.config).join(self.container_id(id))
    }

    /// Instance `id` is a VM on this node.
    pub(super) fn is_vm(&self, id: u64) -> bool {
        self.vm_dir(id).is_dir()
    }

    /// Whether VM `id` has its disk, and a start of this boot whose end is unfinished.
    fn vm_marks(&self, id: u64) -> (bool, bool) {
        let dir = self.vm_dir(id);
        let now = self.boot_id().unwrap_or_default();
        let started = std::fs::read_to_string(dir.join(STARTED)).is_ok_and(|b| b.trim() == now);
        (dir.join("disk.qcow2").exists(), started)
    }

    /// Runs `f` on a libvirt connection, off the async workers (libvirt's
    /// API blocks). A connection per call: libvirtd may restart under a
    /// long-lived one, and opening a local socket costs little.
    pub(super) async fn libvirt<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Hypervisor) -> Result<T, LibvirtError> + Send + 'static,
    ) -> Result<T, InstanceError> {
        let uri = self.config.libvirt_uri.clone();
        if uri.is_empty() {
            return Err(InstanceError::NoVms {
                node: self.node.clone(),
            });
        }
        tokio::task::spawn_blocking(move || f(&Hypervisor::open(&uri)?))
            .await
            .map_err(|e| InstanceError::Io {
                path: PathBuf::from("(libvirt call)"),
                source: std::io::Error::other(e),
            })?
            .map_err(InstanceError::Libvirt)
    }

    /// The node's VMs, from libvirt's list and the VM directories.
    pub(super) async fn vm_list(&self) -> Result<Vec<Found>, InstanceError> {
        let ids = self.vm_ids();
        // A node without VMs never asks libvirt (it may have none).
        if ids.is_empty() {
            return Ok(vec![]);
        }
        let node = self.node.clone();
        let domains = self.libvirt(|h| h.list()).await?;
        let mut out = Vec::new();
        for id in ids {
            let state = domains
                .iter()
                .find(|d| d.instance.id == id && d.instance.node == node)
                .map(|d| d.state);
            out.push(Found {
                id,
                kind: Some(crate::api::Kind::Vps),
                observed: {
                    let (disk, started) = self.vm_marks(id);
                    observed(state, disk, started)
                },
                restore_request: std::fs::read_to_string(
                    self.vm_dir(id).join(super::vm_snapshots::RESTORE_FILE),
                )
                .ok(),
            });
        }
        Ok(out)
    }

    pub(super) async fn vm_observe(&self, id: u64) -> Result<Observed, InstanceError> {
        let uuid = vm_uuid(&self.container_id(id));
        let state = self.libvirt(move |h| h.state(&uuid)).await?;
        let (disk, started) = self.vm_marks(id);
        Ok(observed(state, disk, started))
    }

    /// Makes VM `a` (its image copied to the node, its disk) and starts it.
    pub(super) async fn vm_create(&self, a: &Assignment) -> Result<Started, InstanceError> {
        let dir = self.vm_dir(a.id);
        let disk = dir.join("disk.qcow2");
        // Not made yet (or a make a crash cut short): its leftovers go on failure.
        let made_here = !disk.exists();
        let made = async {
            let io = |source| InstanceError::Io {
                path: dir.clone(),
                source,
            };
            // Traversable, not listable: QEMU runs as libvirt's user and
            // opens the files libvirt hands it by path.
            make_dir(&dir).map_err(io)?;
            std::fs::write(dir.join(SUBMITTED), a.submitted_at_unix_ms.to_string()).map_err(io)?;
            let done = std::fs::read_to_string(dir.join(super::vm_snapshots::RESTORE_FILE)).ok();
            match &a.spec.restore {
                // `restart --from-snapshot`: the disk is replaced once per request.
                Some(r) if done.as_deref() != Some(&r.request.to_string()) => {
                    self.vm_restore(a.id, &r.snapshot, r.request).await?;
                }
                _ if !disk.exists() => {
                    let base = self.vm_base(a).await?;
                    self.vm_disk(a, &base, &disk)?;
                }
                _ => {}
            }
            self.vm_start(a).await
        }
        .await;
        if made.is_err() && made_here {
            // A first start that failed leaves nothing behind.
            for f in self.vm_remove(a.id, false).await {
                tracing::warn!(task = a.id, error = %crate::error_chain(&f), "cleaning up a VM that failed to start");
            }
        }
        made
    }

    /// The node's copy of the VM's base image, made on first use.
    async fn vm_base(&self, a: &Assignment) -> Result<PathBuf, InstanceError> {
        let ImageSource::VmImage(name) = &a.spec.image else {
            return Err(InstanceError::NotAVm(a.id));
        };
        let progress = self.progress.sink(a.id, a.spec.image.to_string());
        let _clear = super::progress::ClearOnDrop(&self.progress, a.id);
        let shared = self.config.shared_dir.join("vm-images");
        let store = self.config.vm_store.join("images");
        // One copy at a time, as for container images.
        let _held = self.image_lock.lock().await;
        let name = name.clone();
        Ok(tokio::task::block_in_place(|| {
            crate::kvm::image::install(&shared, &name, &store, |done, total| {
                progress.report("copying", done, total)
            })
        })?)
    }

    /// The VM's disk: an overlay on `base`, of the asked size or the base's.
    fn vm_disk(&self, a: &Assignment, base: &Path, disk: &Path) -> Result<(), InstanceError> {
        tokio::task::block_in_place(|| {
            let info = crate::kvm::image::inspect(base)?;
            let size = match a.spec.vm_disk_bytes {
                Some(asked) if asked < info.virtual_bytes => {
                    return Err(InstanceError::VmDiskTooSmall {
                        asked,
                        image: a.spec.image.to_string(),
                        size: info.virtual_bytes,
                    })
                }
                Some(asked) => asked,
                None => info.virtual_bytes,
            };
            // Made beside, then renamed: a crash never leaves half a disk
            // that a later start would take for the VM's own.
            let tmp = disk.with_extension("qcow2.making");
            let _ = std::fs::remove_file(&tmp);
            crate::kvm::image::create_overlay(base, &tmp, size)?;
            std::fs::rename(&tmp, disk).map_err(|source| InstanceError::Io {
                path: disk.to_path_buf(),
                source,
            })
        })
    }

    /// Starts VM `a` on its disk: its tap and address, the seed (with its
    /// keys, pinned host key and address), the domain defined again from
    /// the assignment (cores and memory as placed now), started.
    pub(super) async fn vm_start(&self, a: &Assignment) -> Result<Started, InstanceError> {
        let started = self.vm_start_once(a).await;
        if started.is_err() {
            // Not started: nothing of a running VM stays (its disk does).
            // Unless its QEMU may still run (libvirt did not answer): then
            // its GPUs and tap stay with it, for a later end to give back.
            let uuid = vm_uuid(&self.container_id(a.id));
            match self.libvirt(move |h| h.destroy(&uuid)).await {
                Ok(()) => {
                    for f in self.vm_keep(a.id).await {
                        tracing::warn!(task = a.id, error = %crate::error_chain(&f), "cleaning up a VM start that failed");
                    }
                }
                Err(e) => {
                    tracing::error!(task = a.id, error = %crate::error_chain(&e), "a VM that failed to start may still run: its GPUs and network stay until its end is seen")
                }
            }
        }
        started
    }

    async fn vm_start_once(&self, a: &Assignment) -> Result<Started, InstanceError> {
        let (id, cid) = (a.id, self.container_id(a.id));
        // Never while its disk is copied into a snapshot.
        let lock = self.snapshot_locks.of(id);
        let _held = lock.lock().await;
        let dir = self.vm_dir(id);
        let ImageSource::VmImage(name) = &a.spec.image else {
            return Err(InstanceError::NotAVm(id));
        };
        let disk = dir.join("disk.qcow2");
        let base = crate::kvm::image::backing_file(&disk)?;
        if !base.is_file() {
            return Err(InstanceError::VmBaseGone {
                image: name.clone(),
                path: base,
            });
        }
        let (private, public) = tokio::task::block_in_place(|| self.vps.host_key_pair(&cid))
            .map_err(InstanceError::Vps)?;
        let marker = dir.join(STARTED);
        std::fs::write(&marker, self.boot_id().unwrap_or_default()).map_err(|source| {
            InstanceError::Io {
                path: marker.clone(),
                source,
            }
        })?;
        let (ip, tap) = self
            .vps
            .start_vm_network(
                id,
                &cid,
                &a.placement,
                &self.config.dev_root,
                a.overlay_group,
            )
            .await?;
        let net = self.vps.network.ipam.net();
        let uuid = vm_uuid(&cid);
        let mac = crate::net::firewall::instance_mac(ip);
        let seed = SeedInput {
            instance_id: uuid.clone(),
            hostname: format!("task-{id}"),
            ssh_keys: a.spec.ssh_keys.clone(),
            password_hash: a.spec.ssh_password_hash.clone(),
            host_key: Some((private, public.clone())),
            mac,
            ip,
            prefix: net.prefix,
            gateway: net.gateway(),
            nameservers: self.vps.nameservers(),
        };
        let seed_path = dir.join("seed.iso");
        crate::files::write_secret(&seed_path, &seed_iso(&seed)).map_err(|source| {
            InstanceError::Io {
                path: seed_path.clone(),
                source,
            }
        })?;
        let p = &a.placement;
        let boot = tokio::task::block_in_place(|| boot(&self.config, &dir))?;
        // The GPUs' IOMMU groups go to vfio-pci before QEMU opens them, the
        // last step before it: a failure from here on gives them back
        // (`vm_start` → `vm_keep`).
        let gpus = p.gpus.clone();
        let hostdevs = tokio::task::block_in_place(|| self.gpus.bind_for_vm(&gpus, id))
            .map_err(InstanceError::Gpu)?;
        let vm = Vm {
            uuid: uuid.clone(),
            accel: match self.config.vm_accel.as_str() {
                "qemu" => Accel::Qemu,
                _ => Accel::Kvm,
            },
            memory_mib: p.memory_bytes >> 20,
            vcpu_pins: p.cpus.iter().collect(),
            emulator_cpus: p.cpus.clone(),
            boot,
            disk,
            base,
            disk_cache: match self.config.vm_disk_cache.as_str() {
                "writeback" => DiskCache::Writeback,
                _ => DiskCache::None,
            },
            seed: seed_path,
            mac,
            console_log: dir.join("console.log"),
            hostdevs,
            instance: Instance {
                id,
                owner: a.owner.clone(),
                node: self.node.clone(),
                submitted_at_unix_ms: a.submitted_at_unix_ms,
                cpus: p.cpus.clone(),
                numa: p.numa,
                gpus: p.gpus.clone(),
                tap,
                ip,
            },
        };
        super::supervisor::crash_point(&self.crash_at, "created");
        self.libvirt(move |h| h.define_and_start(&vm)).await?;
        tracing::info!(task = id, domain = %crate::kvm::domain_name(&uuid), %ip, "VM started");
        Ok(Started {
            pid: 0,
            host_key: Some(public),
        })
    }

    /// From the VM's own record (no libvirt call: an unreachable libvirtd
    /// must not make a user's VM look like an earlier owner's).
    pub(super) fn vm_made_for(&self, a: &Assignment) -> bool {
        let recorded = std::fs::read_to_string(self.vm_dir(a.id).join(SUBMITTED)).ok();
        super::container::made_for(recorded.as_deref().map(str::trim), a.submitted_at_unix_ms)
    }

    /// Waits until the VM is off (polling libvirt: its state is the truth,
    /// whoever started the VM); its exit status.
    pub(super) async fn vm_wait(&self, id: u64) -> Result<u32, InstanceError> {
        loop {
            match self.vm_observe(id).await {
                Ok(Observed::Exited(code)) => return Ok(code),
                Ok(Observed::Kept | Observed::Absent) => return Ok(0),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(task = id, error = %crate::error_chain(&e), "cannot read the VM's state; trying again")
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }

    /// Term presses the power button (the guest shuts down), Kill pulls the plug.
    pub(super) async fn vm_signal(&self, id: u64, s: Signal) -> Result<(), InstanceError> {
        let uuid = vm_uuid(&self.container_id(id));
        match s {
            Signal::Term => {
                self.libvirt(move |h| h.press_power_button(&uuid).map(|_| ()))
                    .await
            }
            Signal::Kill => self.libvirt(move |h| h.destroy(&uuid)).await,
        }
    }

    pub(super) async fn vm_pause(&self, id: u64, pause: bool) -> Result<(), InstanceError> {
        let uuid = vm_uuid(&self.container_id(id));
        if pause {
            self.libvirt(move |h| h.pause(&uuid)).await
        } else {
            self.libvirt(move |h| h.resume(&uuid)).await
        }
    }

    /// After the VM went off: its tap and node port go, its GPUs go back
    /// to the host; the domain, disk and address stay for a restart.
    pub(super) async fn vm_keep(&self, id: u64) -> Vec<TeardownFailure> {
        let cid = self.container_id(id);
        let mut problems: Vec<TeardownFailure> = self
            .vps
            .stop_vm_network(id, &cid)
            .await
            .into_iter()
            .map(TeardownFailure::Network)
            .collect();
        problems.extend(self.vm_restore_gpus(id));
        if problems.is_empty() {
            let marker = self.vm_dir(id).join(STARTED);
            if let Err(e) = std::fs::remove_file(&marker) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    problems.push(TeardownFailure::Files {
                        path: marker,
                        source: e,
                    });
                }
            }
        }
        problems
    }

    /// Gives the GPUs of VM `id` (its QEMU gone) back to their host drivers.
    fn vm_restore_gpus(&self, id: u64) -> Option<TeardownFailure> {
        tokio::task::block_in_place(|| self.gpus.restore_for_vm(id))
            .err()
            .map(TeardownFailure::Gpus)
    }

    /// Removes the domain, the VM's files, tap, address and host key, and
    /// with `snapshots` its snapshots too (a delete).
    pub(super) async fn vm_remove(&self, id: u64, snapshots: bool) -> Vec<TeardownFailure> {
        let cid = self.container_id(id);
        let uuid = vm_uuid(&cid);
        let mut problems = Vec::new();
        if let Err(e) = self.libvirt(move |h| h.undefine(&uuid)).await {
            problems.push(TeardownFailure::Domain(Box::new(e)));
            // The files stay with the domain that uses them.
            return problems;
        }
        // A GPU that did not come back keeps its binding's record: the
        // converge loop gives it back later (`converge_gpus`), so the rest
        // of the delete goes on.
        problems.extend(self.vm_restore_gpus(id));
        problems.extend(
            self.vps
                .stop_network(id, &cid)
                .await
                .into_iter()
                .map(TeardownFailure::Network),
        );
        self.vps.forget(&cid);
        if snapshots {
            problems.extend(
                self.delete_all_snapshots(id)
                    .await
                    .into_iter()
                    .map(TeardownFailure::Snapshots),
            );
        }
        let dir = self.vm_dir(id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                problems.push(TeardownFailure::Files {
                    path: dir,
                    source: e,
                });
            }
        }
        problems
    }

    /// At runner start: thaws the filesystems of every running VM (a no-op
    /// for a guest not frozen): a runner that died between a snapshot's
    /// freeze and thaw must not leave a guest that cannot write.
    pub(super) async fn vm_thaw_all(&self) {
        for id in self.vm_ids() {
            if matches!(self.vm_observe(id).await, Ok(Observed::Running)) {
                let uuid = vm_uuid(&self.container_id(id));
                let _ = self.libvirt(move |h| h.thaw(&uuid, 1)).await;
            }
        }
    }

    /// The task ids of this node's VMs: their directories in the store.
    fn vm_ids(&self) -> Vec<u64> {
        let prefix = format!("{}-task-", self.node);
        std::fs::read_dir(vms_dir(&self.config))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix(&prefix)?.parse().ok()
            })
            .collect()
    }

    /// The instance ids of this node's VMs, for cleanups that must not
    /// take a VM for a vanished container.
    pub(super) fn vm_cids(&self) -> Vec<String> {
        self.vm_ids()
            .into_iter()
            .map(|id| self.container_id(id))
            .collect()
    }
}

/// `VM_STORE/vms`: outside the runner's private data directory, which
/// QEMU (libvirt's user) cannot enter.
pub fn vms_dir(config: &crate::config::RunnerConfig) -> PathBuf {
    config.vm_store.join("vms")
}

/// A directory (and its parents) others may pass through but not list.
fn make_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(dir)?;
    // The VM's, `vms/` and the store: made by us, passable by QEMU.
    for d in dir.ancestors().take(3) {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o711))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vms_uuid_is_derived_valid_and_its_own() {
        let a = vm_uuid("n1-task-7");
        assert!(crate::kvm::domain::valid_uuid(&a), "{a}");
        assert_eq!(a, vm_uuid("n1-task-7"), "the same every time");
        assert_ne!(a, vm_uuid("n1-task-8"));
        assert_ne!(a, vm_uuid("n2-task-7"));
        assert_eq!(&a[14..15], "4", "version 4");
    }

    #[test]
    fn an_off_vm_has_exited_only_while_its_end_is_unfinished() {
        use VmState::*;
        assert_eq!(observed(Some(Running), true, true), Observed::Running);
        assert_eq!(observed(Some(Other), true, true), Observed::Running);
        assert_eq!(observed(Some(Paused), true, true), Observed::Paused);
        assert_eq!(
            observed(Some(Off { exit: 0 }), true, true),
            Observed::Exited(0)
        );
        assert_eq!(
            observed(Some(Off { exit: 137 }), true, true),
            Observed::Exited(137)
        );
        // Off with its end finished, or started in a boot that is over: kept,
        // so a VPS that should run is started again.
        assert_eq!(observed(Some(Off { exit: 0 }), true, false), Observed::Kept);
        // Its files without a domain: a disk to start again, never "vanished".
        assert_eq!(observed(None, true, true), Observed::Kept);
        assert_eq!(observed(None, true, false), Observed::Kept);
        // A make cut short before the disk: nothing made yet.
        assert_eq!(observed(None, false, false), Observed::Absent);
    }
}

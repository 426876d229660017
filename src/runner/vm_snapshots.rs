//! Snapshots of VM VPS: a copy of the VM's disk (a qcow2 overlay standing
//! on the VM's read-only base). A stopped VM's disk is copied as it is,
//! consistent without asking the guest (on stop, when the VM has just gone
//! off, and by hand). A running VM's disk is copied by libvirt's backup
//! job while the guest runs on, as it was when the job began: with the
//! guest's filesystems frozen for that instant when its guest agent
//! answers, crash-consistent (as after a power cut) when not; the copy is
//! then rebased onto the base, so every snapshot has the same shape.
//! Kept beside the VM, not in it:
//! `DATA_DIR/runner/vm-snapshots/<cid>/<id>.qcow2` with `<id>.json` (when,
//! the message, how consistent), so the VM's files can be replaced by a
//! restore and the snapshots stay until the VPS is deleted. Ids are
//! creation times in milliseconds, as for container snapshots.

use std::path::{Path, PathBuf};

use crate::api::{Consistency, SnapshotView};

use super::container::TaskContext;
use super::driver::InstanceError;
use super::snapshots::{next_id, rotated_out, SnapshotError};

/// What is recorded beside a snapshot's disk.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    created_at_unix_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    /// How consistent the copy is (absent in snapshots from before it was recorded: stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    consistency: Option<Consistency>,
}

/// The file in the VM's directory that libvirt's backup job writes (QEMU,
/// as libvirt's user, can write there and not in the runner's data directory).
const LIVE_COPY: &str = "snapshot.qcow2";

/// How long a copy may make no progress before it is given up.
const STALLED: std::time::Duration = std::time::Duration::from_secs(600);

/// The file that records which `restart --from-snapshot` request the VM's
/// disk was last restored for (each request restores once).
pub(super) const RESTORE_FILE: &str = "restore-request";

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Copies `from` to `to` whole: into `to` + `.partial` first, renamed over
/// `to` only once complete (a crash leaves the old file or the new one),
/// the partial copy removed if the copy fails.
fn copy_whole(from: &Path, to: &Path) -> Result<(), SnapshotError> {
    let tmp = to.with_extension("partial");
    let _ = std::fs::remove_file(&tmp);
    tokio::task::block_in_place(|| {
        let copied = crate::files::copy_hashed(from, &tmp, 0o600, |_, _| {})
            .map_err(io(from))
            .and_then(|_| std::fs::rename(&tmp, to).map_err(io(to)));
        if copied.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        copied
    })
}

/// A snapshot id is digits only: it names a file, never a path.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit())
}

impl TaskContext {
    /// Sets aside the snapshots an id the host hands out for the first
    /// time already has here (an earlier life of the cluster, L8): the
    /// directory gets a `.set-aside-<ms>` suffix, nothing is deleted.
    pub fn vm_set_aside_earlier_life(&self, vps: u64) -> Result<(), InstanceError> {
        let dir = self.vm_snapshot_dir(vps);
        if !dir.exists() {
            return Ok(());
        }
        let mut aside = dir.clone().into_os_string();
        aside.push(format!(".set-aside-{}", crate::now_unix_ms()));
        tracing::warn!(task = vps, from = %dir.display(), "an earlier VPS's snapshots set aside");
        std::fs::rename(&dir, aside).map_err(|source| InstanceError::Io { path: dir, source })
    }

    fn vm_snapshot_dir(&self, vps: u64) -> PathBuf {
        self.config
            .data_dir
            .join(super::STATE_DIR)
            .join("vm-snapshots")
            .join(self.container_id(vps))
    }

    /// A VM's snapshots, oldest first.
    pub(super) fn vm_snapshots(&self, vps: u64) -> Result<Vec<SnapshotView>, SnapshotError> {
        let dir = self.vm_snapshot_dir(vps);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io(&dir)(e)),
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .filter(|n| valid_id(n))
            else {
                continue;
            };
            let disk = dir.join(format!("{id}.qcow2"));
            let (Ok(text), Ok(meta)) = (std::fs::read_to_string(&path), std::fs::metadata(&disk))
            else {
                // Half written (a crash while it was taken): not a snapshot.
                continue;
            };
            let Ok(r) = serde_json::from_str::<Record>(&text) else {
                continue;
            };
            out.push(SnapshotView {
                id: id.to_string(),
                vps_id: vps,
                created_at_unix_ms: r.created_at_unix_ms,
                size_bytes: meta.len(),
                message: r.message,
                image: disk.display().to_string(),
                node: self.node.clone(),
                consistency: Some(r.consistency.unwrap_or(Consistency::Stopped)),
            });
        }
        out.sort_by_key(|s| (s.created_at_unix_ms, s.id.clone()));
        Ok(out)
    }

    /// Copies the VM's disk as a snapshot (see the module's note), then
    /// deletes the oldest beyond the limit. A VM starting or stopping is
    /// refused, to be asked again. A running VM's copy is begun under the
    /// VM's lock and made without it: pause, resume and stop go on meanwhile.
    pub(super) async fn vm_take_snapshot(
        &self,
        vps: u64,
        message: Option<&str>,
    ) -> Result<SnapshotView, SnapshotError> {
        // The message's length was checked by `take_snapshot`.
        let lock = self.snapshot_locks.of(vps);
        let mut held = lock.lock().await;
        use super::lifecycle::Observed;
        // An Exited VM is being stopped, or started (its marker is written
        // before QEMU runs): neither has a disk to copy now.
        let live = match self.vm_observe(vps).await {
            Ok(Observed::Kept) => None,
            Ok(Observed::Running) => Some(true),
            // No agent answers a paused guest.
            Ok(Observed::Paused) => Some(false),
            Ok(_) => return Err(SnapshotError::VmBusy(vps)),
            Err(e) => return Err(SnapshotError::Vm(crate::error_chain(&e))),
        };
        let created = next_id(
            crate::now_unix_ms(),
            self.vm_snapshots(vps)?.last().map(|s| s.created_at_unix_ms),
        );
        let id = created.to_string();
        let dir = self.vm_snapshot_dir(vps);
        crate::files::ensure_private_dir(&dir).map_err(io(&dir))?;
        let disk = dir.join(format!("{id}.qcow2"));
        let started = std::time::Instant::now();
        let consistency = match live {
            None => {
                copy_whole(&self.vm_dir(vps).join("disk.qcow2"), &disk)?;
                Consistency::Stopped
            }
            Some(may_freeze) => {
                let consistency = self.vm_begin_live_copy(vps, may_freeze).await?;
                drop(held);
                self.vm_finish_live_copy(vps, &disk).await?;
                held = lock.lock().await;
                consistency
            }
        };
        // The record last: a snapshot is listed only once its disk is whole.
        let existing = self.vm_snapshots(vps)?;
        let record = Record {
            created_at_unix_ms: created,
            message: message.map(String::from),
            consistency: Some(consistency),
        };
        let json = dir.join(format!("{id}.json"));
        crate::files::write_secret(&json, &serde_json::to_vec(&record).unwrap_or_default())
            .map_err(io(&json))?;
        let size_bytes = std::fs::metadata(&disk).map(|m| m.len()).unwrap_or(0);
        tracing::info!(task = vps, snapshot = %id, bytes = size_bytes, ?consistency, ms = started.elapsed().as_millis() as u64, "VM snapshot taken");
        for old in rotated_out(&existing, self.config.max_snapshots_per_vps) {
            if let Err(e) = self.vm_delete_files(vps, &old.id) {
                tracing::warn!(task = vps, snapshot = %old.id, error = %crate::error_chain(&e), "rotating out a snapshot failed");
            }
        }
        drop(held);
        Ok(SnapshotView {
            id,
            vps_id: vps,
            created_at_unix_ms: created,
            size_bytes,
            message: record.message,
            image: disk.display().to_string(),
            node: self.node.clone(),
            consistency: Some(consistency),
        })
    }

    /// Begins the copy of the running VM's disk into its work file: the
    /// guest frozen (when `may_freeze` and its agent answers) for the
    /// instant the copy begins, and thawed at once. One copy at a time:
    /// a job that still runs (a copy begun before a runner crash, an
    /// admin's) is waited for.
    async fn vm_begin_live_copy(
        &self,
        vps: u64,
        may_freeze: bool,
    ) -> Result<Consistency, SnapshotError> {
        let tmp = self.vm_dir(vps).join(LIVE_COPY);
        let uuid = super::vm::vm_uuid(&self.container_id(vps));
        let begun = self
            .libvirt(move |h| {
                if h.job_progress(&uuid)?.is_some() {
                    return Ok(None);
                }
                // A crash's leftover (libvirt makes the file itself).
                let _ = std::fs::remove_file(&tmp);
                let frozen = may_freeze && h.freeze(&uuid)?;
                let begun = h.begin_disk_copy(&uuid, &tmp);
                if frozen {
                    if let Err(e) = h.thaw(&uuid, 3) {
                        // No copy of a guest that may stay frozen: say so.
                        if begun.is_ok() {
                            let _ = h.abort_job(&uuid);
                        }
                        return Err(e);
                    }
                } else if may_freeze {
                    // An agent that answered too late may have frozen it.
                    let _ = h.thaw(&uuid, 1);
                }
                begun.map(|()| {
                    Some(match frozen {
                        true => Consistency::Frozen,
                        false => Consistency::Crash,
                    })
                })
            })
            .await
            .map_err(|e| SnapshotError::Vm(crate::error_chain(&e)))?;
        begun.ok_or(SnapshotError::VmJob(vps))
    }

    /// Waits for the copy `vm_begin_live_copy` began, makes it an overlay
    /// on the VM's base (the shape of every VM disk here) and puts it at
    /// `to`. A copy that fails, or makes no progress for 10 minutes, is
    /// cancelled; the work file goes either way.
    async fn vm_finish_live_copy(&self, vps: u64, to: &Path) -> Result<(), SnapshotError> {
        let dir = self.vm_dir(vps);
        let tmp = dir.join(LIVE_COPY);
        let uuid = super::vm::vm_uuid(&self.container_id(vps));
        let vm_error =
            |e: &(dyn std::error::Error + 'static)| SnapshotError::Vm(crate::error_chain(e));
        let copied = async {
            let mut progress = (0, std::time::Instant::now());
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                let u = uuid.clone();
                match self.libvirt(move |h| h.job_progress(&u)).await {
                    Ok(None) => break,
                    Ok(Some(done)) if done != progress.0 => {
                        progress = (done, std::time::Instant::now())
                    }
                    Ok(Some(_)) if progress.1.elapsed() > STALLED => {
                        return Err(SnapshotError::Vm(format!(
                            "copying the running VM's disk made no progress for {} minutes",
                            STALLED.as_secs() / 60
                        )))
                    }
                    Ok(Some(_)) => {}
                    Err(e) => return Err(vm_error(&e)),
                }
            }
            let u = uuid.clone();
            if !self
                .libvirt(move |h| h.disk_copy_completed(&u))
                .await
                .map_err(|e| vm_error(&e))?
            {
                return Err(SnapshotError::Vm(
                    "copying the running VM's disk failed (did the VM stop meanwhile?)".into(),
                ));
            }
            tokio::task::block_in_place(|| {
                let base = crate::kvm::image::backing_file(&dir.join("disk.qcow2"))?;
                // libvirt reports the job done just before QEMU lets go of
                // the file: a few tries for its lock.
                let mut tries = 0;
                loop {
                    match crate::kvm::image::rebase(&tmp, &base) {
                        Err(e) if tries < 5 && e.to_string().contains("lock") => {
                            tries += 1;
                            std::thread::sleep(std::time::Duration::from_secs(1));
                        }
                        r => return r,
                    }
                }
            })
            .map_err(|e| vm_error(&e))?;
            copy_whole(&tmp, to)
        }
        .await;
        if copied.is_err() {
            let u = uuid.clone();
            let _ = self
                .libvirt(move |h| match h.job_progress(&u)? {
                    Some(_) => h.abort_job(&u),
                    None => Ok(()),
                })
                .await;
        }
        let _ = std::fs::remove_file(&tmp);
        copied
    }

    /// Snapshot `id` of VM `vps`, as listed: an id names only what the
    /// listing vouches for, never a path.
    fn vm_snapshot(&self, vps: u64, id: &str) -> Result<SnapshotView, SnapshotError> {
        self.vm_snapshots(vps)?
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| SnapshotError::NoSnapshot {
                vps,
                id: id.to_string(),
            })
    }

    fn vm_delete_files(&self, vps: u64, id: &str) -> Result<(), SnapshotError> {
        let dir = self.vm_snapshot_dir(vps);
        // The record first: a snapshot half deleted is no longer listed.
        for f in [format!("{id}.json"), format!("{id}.qcow2")] {
            let p = dir.join(f);
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&p)(e)),
                _ => {}
            }
        }
        Ok(())
    }

    pub(super) async fn vm_delete_snapshot(&self, vps: u64, id: &str) -> Result<(), SnapshotError> {
        let lock = self.snapshot_locks.of(vps);
        let _held = lock.lock().await;
        self.vm_snapshot(vps, id)?;
        self.vm_delete_files(vps, id)
    }

    /// Every snapshot of the VM goes (it is being deleted).
    pub(super) async fn vm_delete_all_snapshots(&self, vps: u64) -> Vec<SnapshotError> {
        let lock = self.snapshot_locks.of(vps);
        let _held = lock.lock().await;
        let dir = self.vm_snapshot_dir(vps);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => vec![io(&dir)(e)],
            _ => vec![],
        }
    }

    /// Puts snapshot `id` in place of the stopped VM's disk (whole, by a
    /// rename: a crash leaves the old disk or the new one) and records the
    /// restore `request`, so it is done once.
    pub(super) async fn vm_restore(
        &self,
        vps: u64,
        id: &str,
        request: i64,
    ) -> Result<(), SnapshotError> {
        let lock = self.snapshot_locks.of(vps);
        let _held = lock.lock().await;
        let found = self.vm_snapshot(vps, id)?;
        let vm = self.vm_dir(vps);
        copy_whole(Path::new(&found.image), &vm.join("disk.qcow2"))?;
        let record = vm.join(RESTORE_FILE);
        crate::files::write_secret(&record, request.to_string().as_bytes()).map_err(io(&record))?;
        tracing::info!(task = vps, snapshot = %id, "VM disk restored from a snapshot");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn snapshot_ids_name_files_not_paths() {
        assert!(super::valid_id("1796000000000"));
        for bad in ["", "../x", "1/2", "latest", "12a", "123456789012345678901"] {
            assert!(!super::valid_id(bad), "{bad}");
        }
    }
}

//! VPS snapshots on this node: a VPS container's filesystem changes
//! committed as an image in containerd (`rivernode/snapshots/<node>/vps-<id>:<sid>`;
//! the node's name keeps two clusters sharing one containerd apart),
//! found again by its labels, so they outlive runner restarts and no other
//! image is ever scanned. Snapshot ids are creation times in milliseconds,
//! made distinct per VPS, so they sort by age and two taken in the same
//! second never collide. The oldest beyond `max_snapshots_per_vps` go.

use std::collections::HashMap;
use std::sync::Arc;

use crate::api::SnapshotView;
use crate::oci::{Containerd, ImportedImage, OciError};

use super::container::TaskContext;
use super::driver::InstanceError;

const VPS_LABEL: &str = "io.rivernode.snapshot.vps";
const NODE_LABEL: &str = "io.rivernode.snapshot.node";
const ID_LABEL: &str = "io.rivernode.snapshot.id";
const CREATED_LABEL: &str = "io.rivernode.snapshot.created-ms";
const SIZE_LABEL: &str = crate::oci::COMMIT_SIZE_LABEL;
const MESSAGE_LABEL: &str = "io.rivernode.snapshot.message";
use crate::api::MAX_SNAPSHOT_MESSAGE as MAX_MESSAGE;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("VPS {0} has no container on this node (deleted, or never started here)")]
    NoContainer(u64),
    #[error("VPS {vps} has no snapshot {id}")]
    NoSnapshot { vps: u64, id: String },
    #[error("VM VPS {0} is starting or stopping: ask again once it runs or is stopped")]
    VmBusy(u64),
    #[error("libvirt runs a job on VM VPS {0} (a copy of its disk still under way?): ask again when it has ended")]
    VmJob(u64),
    #[error("the VM's state: {0}")]
    Vm(String),
    #[error("{}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("message: longer than {MAX_MESSAGE} bytes")]
    MessageTooLong,
    #[error("snapshot {id} of VPS {vps} vanished from containerd")]
    Vanished { vps: u64, id: String },
    #[error(transparent)]
    Oci(#[from] OciError),
}

pub fn image_name(node: &str, vps: u64, id: &str) -> String {
    format!("rivernode/snapshots/{node}/vps-{vps}:{id}")
}

/// The next id: now, or one past the newest when that is not older.
pub(super) fn next_id(now_ms: i64, newest: Option<i64>) -> i64 {
    newest.map_or(now_ms, |n| now_ms.max(n + 1))
}

fn view(node: &str, img: &containerd_client::services::v1::Image) -> Option<SnapshotView> {
    let l = &img.labels;
    Some(SnapshotView {
        id: l.get(ID_LABEL)?.clone(),
        vps_id: l.get(VPS_LABEL)?.parse().ok()?,
        created_at_unix_ms: l.get(CREATED_LABEL)?.parse().ok()?,
        size_bytes: l.get(SIZE_LABEL).and_then(|s| s.parse().ok()).unwrap_or(0),
        message: l.get(MESSAGE_LABEL).cloned(),
        image: img.name.clone(),
        node: node.to_string(),
        consistency: None,
    })
}

/// The oldest of `existing` (oldest first) that go once one more is
/// taken, to keep `max` (0: keep all).
pub(super) fn rotated_out(existing: &[SnapshotView], max: u32) -> &[SnapshotView] {
    let max = max as usize;
    if max == 0 || existing.len() < max {
        return &[];
    }
    &existing[..existing.len() + 1 - max]
}

/// Serializes snapshot work per VPS (ids, rotation, freeze and thaw).
#[derive(Default)]
pub struct SnapshotLocks(std::sync::Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>);

impl SnapshotLocks {
    pub(super) fn of(&self, vps: u64) -> Arc<tokio::sync::Mutex<()>> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(vps)
            .or_default()
            .clone()
    }
}

async fn list(ctd: &Containerd, node: &str, vps: u64) -> Result<Vec<SnapshotView>, OciError> {
    let mut out: Vec<SnapshotView> = ctd
        .images_with_labels(&[(VPS_LABEL, &vps.to_string()), (NODE_LABEL, node)])
        .await?
        .iter()
        .filter_map(|i| view(node, i))
        .collect();
    out.sort_by_key(|s| (s.created_at_unix_ms, s.id.clone()));
    Ok(out)
}

/// The value a set-aside snapshot's VPS label gets: no VPS id, so no
/// listing finds it, and it says whose it was.
fn set_aside_label(vps: u64) -> String {
    format!("set-aside-{vps}")
}

impl TaskContext {
    /// Hides the snapshots and logs that an id the host hands out for the
    /// first time already has on this node: they belong to an earlier life of
    /// the cluster (its database was reset), never to this id's new owner
    /// (L8). Nothing is deleted: the snapshots stay in containerd, labelled
    /// `set-aside-<id>`, and the logs get a `.set-aside-<ms>` suffix.
    pub async fn set_aside_earlier_life(&self, id: u64) -> Result<(), SnapshotError> {
        let stamp = crate::now_unix_ms();
        let streams = crate::api::LOG_STREAMS
            .iter()
            .flat_map(|s| [s.to_string(), format!("{s}.1")]);
        for stream in streams {
            let path = super::container::logs_dir(&self.config).join(format!("task-{id}.{stream}"));
            if path.exists() {
                let aside = path.with_file_name(format!("task-{id}.{stream}.set-aside-{stamp}"));
                tracing::warn!(task = id, from = %path.display(), to = %aside.display(), "an earlier task's log set aside");
                let _ = std::fs::rename(&path, &aside);
            }
        }
        for s in list(&self.ctd, &self.node, id).await? {
            tracing::warn!(task = id, image = %s.image, "an earlier VPS's snapshot set aside");
            self.ctd
                .set_image_label(&s.image, VPS_LABEL, &set_aside_label(id))
                .await?;
        }
        Ok(())
    }

    /// A VPS's snapshots, oldest first.
    pub async fn snapshots(&self, vps: u64) -> Result<Vec<SnapshotView>, SnapshotError> {
        if self.is_vm(vps) {
            return self.vm_snapshots(vps);
        }
        Ok(list(&self.ctd, &self.node, vps).await?)
    }

    /// Commits the VPS's filesystem (running, paused or stopped), then
    /// deletes the oldest snapshots beyond the limit.
    pub async fn take_snapshot(
        &self,
        vps: u64,
        message: Option<&str>,
    ) -> Result<SnapshotView, SnapshotError> {
        if message.is_some_and(|m| m.len() > MAX_MESSAGE) {
            return Err(SnapshotError::MessageTooLong);
        }
        if self.is_vm(vps) {
            return self.vm_take_snapshot(vps, message).await;
        }
        let cid = self.container_id(vps);
        let lock = self.snapshot_locks.of(vps);
        let _held = lock.lock().await;
        if !self.ctd.container_exists(&cid).await? {
            return Err(SnapshotError::NoContainer(vps));
        }
        let existing = list(&self.ctd, &self.node, vps).await?;
        let created = next_id(
            crate::now_unix_ms(),
            existing.last().map(|s| s.created_at_unix_ms),
        );
        let id = created.to_string();
        let name = image_name(&self.node, vps, &id);
        let mut labels = HashMap::from([
            (VPS_LABEL.to_string(), vps.to_string()),
            (NODE_LABEL.to_string(), self.node.clone()),
            (ID_LABEL.to_string(), id.clone()),
            (CREATED_LABEL.to_string(), created.to_string()),
        ]);
        if let Some(m) = message {
            labels.insert(MESSAGE_LABEL.to_string(), m.to_string());
        }
        let started = std::time::Instant::now();
        let committed = self
            .ctd
            .commit(&cid, &name, labels, message.unwrap_or("snapshot"))
            .await?;
        tracing::info!(
            task = vps,
            snapshot = %id,
            bytes = committed.layer_size,
            ms = started.elapsed().as_millis() as u64,
            "snapshot taken"
        );
        for old in rotated_out(&existing, self.config.max_snapshots_per_vps) {
            match self.ctd.delete_image(&old.image).await {
                Ok(_) => {
                    tracing::info!(task = vps, snapshot = %old.id, "old snapshot rotated out")
                }
                Err(e) => {
                    tracing::warn!(task = vps, snapshot = %old.id, error = %crate::error_chain(&e), "rotating out a snapshot failed")
                }
            }
        }
        Ok(SnapshotView {
            id,
            vps_id: vps,
            created_at_unix_ms: created,
            size_bytes: committed.layer_size,
            message: message.map(String::from),
            image: name,
            node: self.node.clone(),
            consistency: None,
        })
    }

    pub async fn delete_snapshot(&self, vps: u64, id: &str) -> Result<(), SnapshotError> {
        if self.is_vm(vps) {
            return self.vm_delete_snapshot(vps, id).await;
        }
        let lock = self.snapshot_locks.of(vps);
        let _held = lock.lock().await;
        // Only names this VPS's labels vouch for: an id is never a path into other images.
        let found = list(&self.ctd, &self.node, vps)
            .await?
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| SnapshotError::NoSnapshot {
                vps,
                id: id.to_string(),
            })?;
        self.ctd.delete_image(&found.image).await?;
        Ok(())
    }

    /// Deletes every snapshot of a VPS (it is being deleted); returns the problems met.
    pub async fn delete_all_snapshots(&self, vps: u64) -> Vec<SnapshotError> {
        if self.is_vm(vps) {
            return self.vm_delete_all_snapshots(vps).await;
        }
        let lock = self.snapshot_locks.of(vps);
        let _held = lock.lock().await;
        match list(&self.ctd, &self.node, vps).await {
            Ok(all) => {
                let mut problems = Vec::new();
                for s in all {
                    if let Err(e) = self.ctd.delete_image(&s.image).await {
                        problems.push(e.into());
                    }
                }
                problems
            }
            Err(e) => vec![e.into()],
        }
    }

    /// A snapshot as an image to run (the host resolved "latest" to an id).
    pub async fn snapshot_image(&self, vps: u64, id: &str) -> Result<ImportedImage, SnapshotError> {
        let all = self.snapshots(vps).await?;
        let found = all
            .iter()
            .find(|s| s.id == id)
            .ok_or_else(|| SnapshotError::NoSnapshot {
                vps,
                id: id.to_string(),
            })?;
        let img =
            self.ctd
                .get_image(&found.image)
                .await?
                .ok_or_else(|| SnapshotError::Vanished {
                    vps,
                    id: found.id.clone(),
                })?;
        Ok(self.ctd.image_ready(&found.image, &img).await?)
    }
}

impl TaskContext {
    /// Snapshot `s` of VPS `vps` on this node as a copy names it (its
    /// manifest, config and layers, read from containerd), and its blobs.
    pub(super) async fn kept_here(
        &self,
        vps: u64,
        s: &SnapshotView,
    ) -> Result<(crate::api::KeptSnapshot, crate::oci::ImageBlobs), InstanceError> {
        let image = self
            .ctd
            .image_blobs(&image_name(&self.node, vps, &s.id))
            .await?;
        let kept = crate::api::KeptSnapshot {
            id: s.id.clone(),
            created_at_unix_ms: s.created_at_unix_ms,
            message: s.message.clone(),
            size_bytes: s.size_bytes,
            manifest: image.manifest.descriptor(),
            blobs: image.blobs.iter().map(|b| b.descriptor()).collect(),
        };
        Ok((kept, image))
    }
}

/// Whether the host refused a park (a 4xx), as opposed to not answering.
fn host_refused(e: &InstanceError) -> bool {
    use crate::api::host_client::HostCallError;
    matches!(
        e,
        InstanceError::ParkRefused { .. } | InstanceError::Park(HostCallError::Refused { .. })
    )
}

/// Whether a node's runner refused a move's grant (a 401: expired, or
/// forgotten in a restart).
pub(super) fn grant_refused(e: &InstanceError) -> bool {
    use super::envfetch::FetchError;
    use crate::api::host_client::HostCallError;
    matches!(e, InstanceError::Fetch(FetchError::Host { source: HostCallError::Refused { status, .. }, .. })
        if *status == reqwest::StatusCode::UNAUTHORIZED)
}

/// Pieces of a park's blob: a request body each.
const PARK_PIECE: u64 = 8 << 20;

/// Rounds of a park: each sends what the host lacks. The first two are
/// the manifest, then the config and layers it names; the rest are spare.
const PARK_ROUNDS: usize = 5;

impl TaskContext {
    /// Parks VPS `vps`'s newest snapshot (its stop's) on the host, with its
    /// host key and its other snapshots, when the host parks VPS. The
    /// snapshot parked; none when the host parks nothing, or for a VM.
    pub async fn park_newest(&self, vps: u64) -> Result<Option<String>, InstanceError> {
        if !self.park.load(std::sync::atomic::Ordering::Relaxed) || self.is_vm(vps) {
            return Ok(None);
        }
        let lock = self.park_locks.of(vps);
        let _held = lock.lock().await;
        let all = self.snapshots(vps).await?;
        let Some(newest) = all.last().cloned() else {
            return Ok(None);
        };
        match self.park_as(vps, (&newest.id, None), &all).await {
            Ok(id) => Ok(Some(id)),
            // The stop is what a move needs: alone, if the host refuses its
            // snapshots (an older host, a full disk there). A host that does
            // not answer fails the park as before.
            Err(e) if all.len() > 1 && host_refused(&e) => {
                tracing::warn!(task = vps, error = %crate::error_chain(&e), "parking the VPS's snapshots failed: parking its stop alone (the others stay on this node)");
                let alone = [newest.clone()];
                self.park_as(vps, (&newest.id, None), &alone)
                    .await
                    .map(Some)
            }
            Err(e) => Err(e),
        }
    }

    /// Parks VPS `vps`'s snapshots again, with the same last stop, when
    /// the host holds a copy of it (it is stopped and parked): a snapshot
    /// taken since then follows it too. Nothing for a VPS the host holds
    /// no current copy of (it runs, or was never parked).
    pub async fn park_again(&self, vps: u64) -> Result<(), InstanceError> {
        use crate::api::host_client::HostCallError;
        if !self.park.load(std::sync::atomic::Ordering::Relaxed) || self.is_vm(vps) {
            return Ok(());
        }
        let lock = self.park_locks.of(vps);
        let _held = lock.lock().await;
        let copy = match self.host.parked(vps).await {
            Ok(c) => c,
            Err(HostCallError::Refused { status, .. })
                if status == reqwest::StatusCode::NOT_FOUND =>
            {
                return Ok(())
            }
            Err(e) => return Err(InstanceError::Park(e)),
        };
        let all = self.snapshots(vps).await?;
        // Its stop's snapshot may be gone here (deleted, rotated out): the
        // host's copy of it, the VPS's disk, is named as the host has it.
        let stop = copy
            .manifest
            .filter(|_| !all.iter().any(|s| s.id == copy.snapshot));
        self.park_as(vps, (&copy.snapshot, stop), &all)
            .await
            .map(|_| ())
    }

    /// Parks snapshot `current` of VPS `vps` as its last stop, with its
    /// host key, and `all` its snapshots here (the newest the host takes):
    /// the host is told their manifests, and is sent the blobs it lacks
    /// (base layers, parked before with this or another VPS, are not sent
    /// again), each in pieces, read from containerd's content store.
    /// `current` names its manifest when the host holds it and this node
    /// no longer does.
    async fn park_as(
        &self,
        vps: u64,
        (current, held): (&str, Option<crate::api::ArchiveBlob>),
        all: &[SnapshotView],
    ) -> Result<String, InstanceError> {
        // The newest, and the stop's.
        let newest = all.len().saturating_sub(crate::api::MAX_KEPT_SNAPSHOTS - 1);
        let all: Vec<&SnapshotView> = all
            .iter()
            .enumerate()
            .filter(|(i, s)| *i >= newest || s.id == current)
            .map(|(_, s)| s)
            .collect();
        let key = self.vps.host_key_file(&self.container_id(vps))?;
        let started = std::time::Instant::now();
        let mut images = Vec::new();
        let mut kept = Vec::new();
        for s in &all {
            let (k, image) = self.kept_here(vps, s).await?;
            // The host reads a snapshot's blobs from its manifest itself.
            kept.push(crate::api::KeptSnapshot { blobs: vec![], ..k });
            images.push(image);
        }
        let manifest = match (all.iter().position(|s| s.id == current), held) {
            (Some(at), _) => kept[at].manifest.clone(),
            (None, Some(m)) => m,
            (None, None) => {
                return Err(SnapshotError::NoSnapshot {
                    vps,
                    id: current.to_string(),
                }
                .into())
            }
        };
        let req = crate::api::ParkRequest {
            snapshot: current.to_string(),
            host_key: hex::encode(&key),
            manifest,
            snapshots: kept,
        };
        let find = |digest: &str| images.iter().find_map(|i| i.find(digest));
        let (mut sent, mut bytes) = (0usize, 0u64);
        for _ in 0..PARK_ROUNDS {
            let missing = self
                .host
                .park(vps, &req)
                .await
                .map_err(InstanceError::Park)?
                .missing;
            if missing.is_empty() {
                let mut digests: Vec<&str> = images
                    .iter()
                    .flat_map(|i| std::iter::once(&i.manifest).chain(&i.blobs))
                    .map(|b| b.digest.as_str())
                    .collect();
                digests.sort_unstable();
                digests.dedup();
                let held = digests.len().saturating_sub(sent);
                tracing::info!(task = vps, snapshot = %current, snapshots = all.len(), blobs_sent = sent, bytes_sent = bytes, blobs_held = held, ms = started.elapsed().as_millis() as u64, "VPS parked on the host");
                return Ok(current.to_string());
            }
            for digest in &missing {
                let b = find(digest).ok_or_else(|| InstanceError::ParkRefused {
                    vps,
                    why: format!("the host asks for {digest}, which is no blob of its snapshots"),
                })?;
                match self.send_blob(vps, b).await {
                    Ok(()) => (sent, bytes) = (sent + 1, bytes + b.size),
                    // The host no longer expects it (it restarted and lost
                    // the park under way): park again, which names it anew.
                    Err(InstanceError::Park(crate::api::host_client::HostCallError::Refused {
                        status,
                        ..
                    })) if status == reqwest::StatusCode::CONFLICT => break,
                    Err(e) => return Err(e),
                }
            }
        }
        Err(InstanceError::ParkRefused {
            vps,
            why: format!("the host still lacked blobs after {PARK_ROUNDS} rounds"),
        })
    }

    /// Blob `b` of VPS `vps`'s park to the host, in pieces.
    async fn send_blob(&self, vps: u64, b: &crate::oci::BlobRef) -> Result<(), InstanceError> {
        let mut offset = 0u64;
        loop {
            let len = PARK_PIECE.min(b.size - offset);
            let piece = self.ctd.read_range(&b.digest, offset, len).await?;
            self.host
                .park_blob(vps, &b.digest, offset, b.size, piece)
                .await
                .map_err(InstanceError::Park)?;
            offset += len;
            if offset >= b.size {
                return Ok(());
            }
        }
    }

    /// VPS `vps`'s snapshot `snapshot` from the host's parked copy (a
    /// move): it and the VPS's other snapshots this node lacks come (the
    /// blobs it lacks fetched, resumable, checked), each imported as a
    /// snapshot of this node, and the VPS's host key is taken as this
    /// instance's.
    pub async fn unpark(&self, vps: u64, snapshot: &str) -> Result<ImportedImage, InstanceError> {
        let copy = self.host.parked(vps).await.map_err(InstanceError::Park)?;
        let of = super::envfetch::BlobOf::Parked(vps);
        self.take_copy(vps, snapshot, &copy, of).await
    }

    /// VPS `vps`'s snapshot `snapshot` from the node it stopped on (a move
    /// node to node): as `unpark`, from that node's runner, with the grant
    /// the host asked it for.
    pub async fn take_over(
        &self,
        vps: u64,
        snapshot: &str,
    ) -> Result<ImportedImage, InstanceError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let src = self
                .host
                .move_source(vps)
                .await
                .map_err(|source| InstanceError::MoveSource { vps, source })?;
            let of = super::envfetch::BlobOf::Node {
                id: vps,
                node: &src.node,
                url: &src.url,
                grant: &src.grant,
            };
            match self.take_copy(vps, snapshot, &src.copy, of).await {
                // The grant expired, or that runner restarted and forgot
                // it: a new one, and the fetch resumes.
                Err(e) if tries < 3 && grant_refused(&e) => {
                    tracing::warn!(task = vps, from = %src.node, "the grant was refused: asking the host for a new one");
                }
                other => return other,
            }
        }
    }

    /// Snapshot `snapshot` of `copy` (VPS `vps`'s, its blobs from `of`) and
    /// its other snapshots this node lacks, imported here, with its host key.
    async fn take_copy(
        &self,
        vps: u64,
        snapshot: &str,
        copy: &crate::api::ParkedVps,
        of: super::envfetch::BlobOf<'_>,
    ) -> Result<ImportedImage, InstanceError> {
        let Some(wanted) = copy.kept(snapshot) else {
            return Err(InstanceError::ParkedOther {
                vps,
                held: copy.snapshot.clone(),
                wanted: snapshot.to_string(),
            });
        };
        let progress = self.progress.sink(vps, of.to_string());
        let _clear = super::progress::ClearOnDrop(&self.progress, vps);
        let here: Vec<String> = list(&self.ctd, &self.node, vps)
            .await?
            .into_iter()
            .map(|s| s.id)
            .collect();
        // The one it starts from first; the others as they come (one that
        // does not stays where it was, and is said); that one labelled
        // last: once it is, it is found and none of this is done again
        // (after a crash in between, too).
        self.fetch_kept(vps, &wanted, (of, &progress)).await?;
        let others = copy
            .all_snapshots()
            .into_iter()
            .filter(|k| k.id != snapshot && !here.contains(&k.id));
        // Each of the others, or the move fails (and resumes when asked
        // again): one left behind would be lost to the VPS.
        let mut came = 0usize;
        for k in others {
            if let Err(e) = self.fetch_kept(vps, &k, (of, &progress)).await {
                if grant_refused(&e) {
                    return Err(e);
                }
                return Err(InstanceError::SnapshotDidNotCome {
                    vps,
                    snapshot: k.id.clone(),
                    origin: of.origin(),
                    parked: matches!(of, super::envfetch::BlobOf::Parked(_)),
                    source: Box::new(e),
                });
            }
            self.label_kept(vps, &k).await?;
            came += 1;
        }
        let key = hex::decode(&copy.host_key).map_err(|_| InstanceError::ParkedKey(vps))?;
        if !key.is_empty() {
            self.vps.adopt_host_key(&self.container_id(vps), &key)?;
        }
        self.label_kept(vps, &wanted).await?;
        tracing::info!(
            task = vps,
            snapshot,
            snapshots = came,
            "{of} taken from {}",
            of.origin()
        );
        Ok(self.snapshot_image(vps, snapshot).await?)
    }

    /// Snapshot `k` of VPS `vps`, its blobs from `of`, imported as its
    /// image here (not yet labelled: listed once `label_kept` is done).
    async fn fetch_kept(
        &self,
        vps: u64,
        k: &crate::api::KeptSnapshot,
        (of, progress): (super::envfetch::BlobOf<'_>, &crate::oci::Progress),
    ) -> Result<(), InstanceError> {
        let name = image_name(&self.node, vps, &k.id);
        // Every import shares the content store's layers: one at a time.
        let _held = self.image_lock.lock().await;
        let image = super::envfetch::Image {
            manifest: Some(&k.manifest),
            blobs: &k.blobs,
            sha256: k.manifest.digest.trim_start_matches("sha256:"),
        };
        self.fetch_image(of, image, &name, progress).await?;
        Ok(())
    }

    /// Snapshot `k` of VPS `vps`, imported, labelled as a snapshot of this
    /// node; its VPS last, the label `list` looks for, so that it is found
    /// only whole.
    async fn label_kept(&self, vps: u64, k: &crate::api::KeptSnapshot) -> Result<(), OciError> {
        let name = image_name(&self.node, vps, &k.id);
        let message = k
            .message
            .clone()
            .unwrap_or_else(|| "parked on the host, moved here".to_string());
        for (key, value) in [
            (SIZE_LABEL, k.size_bytes.to_string()),
            (MESSAGE_LABEL, message),
            (ID_LABEL, k.id.clone()),
            (CREATED_LABEL, k.created_at_unix_ms.to_string()),
            (NODE_LABEL, self.node.clone()),
            (VPS_LABEL, vps.to_string()),
        ] {
            self.ctd.set_image_label(&name, key, &value).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_ordered_within_a_millisecond() {
        assert_eq!(next_id(1000, None), 1000);
        assert_eq!(next_id(1000, Some(999)), 1000);
        assert_eq!(next_id(1000, Some(1000)), 1001, "same millisecond");
        assert_eq!(next_id(1000, Some(1005)), 1006, "clock went back");
        assert_eq!(
            image_name("n1", 7, "1001"),
            "rivernode/snapshots/n1/vps-7:1001"
        );
    }

    #[test]
    fn rotation_keeps_the_newest_max() {
        let snap = |id: &str| SnapshotView {
            id: id.into(),
            vps_id: 1,
            created_at_unix_ms: 0,
            size_bytes: 0,
            message: None,
            image: String::new(),
            node: "n1".into(),
            consistency: None,
        };
        let three = [snap("1"), snap("2"), snap("3")];
        let ids = |s: &[SnapshotView]| s.iter().map(|s| s.id.clone()).collect::<Vec<_>>();
        assert_eq!(
            ids(rotated_out(&three, 3)),
            ["1"],
            "the fourth pushes one out"
        );
        assert_eq!(ids(rotated_out(&three, 2)), ["1", "2"]);
        assert!(rotated_out(&three, 4).is_empty());
        assert!(rotated_out(&three, 0).is_empty(), "0 keeps all");
    }

    #[test]
    fn views_come_from_labels_only() {
        let mut img = containerd_client::services::v1::Image {
            name: "rivernode/snapshots/vps-3:5".into(),
            labels: HashMap::from([
                (VPS_LABEL.to_string(), "3".to_string()),
                (ID_LABEL.to_string(), "5".to_string()),
                (CREATED_LABEL.to_string(), "5".to_string()),
                (SIZE_LABEL.to_string(), "4096".to_string()),
            ]),
            target: None,
            created_at: None,
            updated_at: None,
        };
        let v = view("n1", &img).unwrap();
        assert_eq!((v.vps_id, v.id.as_str(), v.size_bytes), (3, "5", 4096));
        img.labels.remove(ID_LABEL);
        assert!(
            view("n1", &img).is_none(),
            "an image without our labels is not a snapshot"
        );
    }
}

//! Parked VPS (`park_stopped_vps`): when a container VPS stops, its node
//! exports the snapshot of that stop (an OCI archive) and sends it here
//! with the instance's host key, before it reports the stop. The host keeps
//! one copy per VPS in `DATA_DIR/parked/` (`vps-<id>-<snapshot>.tar`, and
//! `vps-<id>.json` naming it, written last), and the stop's report names the
//! snapshot (`tasks.parked`). `vps restart --anywhere` then places the VPS
//! on any node, whose runner fetches the copy (resumable, checked against
//! its digest) and the host key from here: the VPS starts there as it
//! stopped, while its first node is gone. A delete removes the copy.
//!
//! The record lists the archive's blobs (the manifest, its config and
//! layers, and where each lies in the archive), and a node fetches them one
//! by one (`.../parked/<id>/blobs/<digest>`): only those its content store
//! lacks, so the base layers of an image the node already runs never travel.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{delete, get, put};
use axum::{Extension, Json, Router};

use super::api::ApiError;
use super::auth::Principal;
use super::tasks::own_node;
use super::HostState;
use crate::api::{Kind, ParkedVps, TaskView};

/// The snapshot a park is of (a runner's snapshot id: digits).
pub const SNAPSHOT_HEADER: &str = "x-snapshot-id";
/// The instance's private host key file, in hex.
pub const HOST_KEY_HEADER: &str = "x-host-key";
/// Where a piece of the archive starts, and the archive's whole size.
pub const OFFSET_HEADER: &str = "x-upload-offset";
pub const TOTAL_HEADER: &str = "x-upload-total";
/// The whole archive's SHA-256, with its last piece.
pub const SHA256_HEADER: &str = "x-upload-sha256";
/// What a park leaves free on the host's disk: the store lives there too.
const KEEP_FREE: u64 = 1 << 30;
/// A host key file is a few hundred bytes; this bounds the header.
const MAX_HOST_KEY: usize = 16 << 10;

/// A node's routes (its own credential, its own name in the path).
pub fn node_routes() -> Router<Arc<HostState>> {
    Router::new()
        .route("/api/nodes/{name}/tasks/{id}/park", put(park))
        .route("/api/nodes/{name}/parked/{id}", get(describe))
        .route("/api/nodes/{name}/parked/{id}/blobs/{digest}", get(blob))
        .route("/api/nodes/{name}/left/{id}", delete(left_removed))
}

/// `DELETE /api/nodes/{name}/left/{id}`: the node removed what VPS `id`
/// (deleted) left there when it moved away.
async fn left_removed(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    UrlPath((name, id)): UrlPath<(String, u64)>,
) -> Result<StatusCode, ApiError> {
    own_node(&p, &name)?;
    let node = name.clone();
    state.blocking(move |s| s.left_removed(&node, id)).await?;
    tracing::info!(task = id, node = %name, "what a moved VPS left on its old node is gone");
    Ok(StatusCode::NO_CONTENT)
}

fn dir(state: &HostState) -> PathBuf {
    state.data_dir.join("parked")
}

fn record_path(state: &HostState, id: u64) -> PathBuf {
    dir(state).join(format!("vps-{id}.json"))
}

fn archive_path(state: &HostState, id: u64, snapshot: &str) -> PathBuf {
    dir(state).join(format!("vps-{id}-{snapshot}.tar"))
}

fn valid_snapshot(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
}

fn internal(path: &Path) -> impl Fn(std::io::Error) -> ApiError + '_ {
    move |e| ApiError::Internal(format!("{}: {e}", path.display()))
}

/// The copy the host keeps of VPS `id`, if any. (A record from before
/// records listed their blobs is none until `sweep` lists them, at the
/// host's start.)
pub fn record(state: &HostState, id: u64) -> Option<ParkedVps> {
    let text = std::fs::read(record_path(state, id)).ok()?;
    serde_json::from_slice::<ParkedVps>(&text).ok().filter(|r| {
        r.vps_id == id && r.manifest.is_some() && archive_path(state, id, &r.snapshot).is_file()
    })
}

/// Removes VPS `id`'s copy (it was deleted): its record first, so that no
/// half is ever taken for a copy.
pub fn forget(state: &HostState, id: u64) {
    let _ = std::fs::remove_file(record_path(state, id));
    remove_files(state, id, |_| true);
}

/// Removes the copies of VPS that are deleted or gone from the store.
pub async fn sweep(state: &HostState) {
    let Ok(entries) = std::fs::read_dir(dir(state)) else {
        return;
    };
    // Every file names its VPS: records, archives and unfinished parks.
    let mut ids: Vec<u64> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let rest = name.strip_prefix("vps-")?;
            let end = rest.find(|c: char| !c.is_ascii_digit())?;
            rest[..end].parse().ok()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        match state.blocking(move |s| s.get_task(id)).await {
            Ok(Some(t)) if t.state != crate::api::TaskState::Deleted => list_blobs(state, id).await,
            Ok(_) => {
                tracing::info!(task = id, "the parked copy of a deleted VPS removed");
                forget(state, id);
            }
            Err(e) => {
                tracing::warn!(task = id, error = %crate::error_chain(&e), "cannot tell whether a parked VPS still exists")
            }
        }
    }
}

/// Lists the blobs of VPS `id`'s copy when its record (an older host's)
/// does not; removes a copy that is no image layout.
async fn list_blobs(state: &HostState, id: u64) {
    let Ok(text) = std::fs::read(record_path(state, id)) else {
        return;
    };
    let Ok(mut r) = serde_json::from_slice::<ParkedVps>(&text) else {
        return;
    };
    if r.manifest.is_some() {
        return;
    }
    let path = archive_path(state, id, &r.snapshot);
    let read = tokio::task::spawn_blocking(move || super::archive::read_archive(&path)).await;
    match read {
        Ok(Ok(super::archive::ArchiveRead {
            sha256,
            layout: Ok((manifest, blobs)),
        })) if sha256 == r.sha256 => {
            (r.manifest, r.blobs) = (Some(manifest), blobs);
            if let Ok(text) = serde_json::to_vec(&r) {
                let _ = crate::files::write_secret(&record_path(state, id), &text);
            }
        }
        _ => {
            tracing::warn!(task = id, "a parked copy that is no whole image removed");
            forget(state, id);
        }
    }
}

/// Removes VPS `id`'s files whose names `gone` picks.
fn remove_files(state: &HostState, id: u64, gone: impl Fn(&str) -> bool) {
    let prefix = format!("vps-{id}-");
    let Ok(entries) = std::fs::read_dir(dir(state)) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && gone(&name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// VPS `id`, placed on node `name` (who asks about it), as a container.
async fn placed_here(state: &HostState, name: &str, id: u64) -> Result<TaskView, ApiError> {
    let t = state
        .blocking(move |s| s.get_task(id))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no task {id}")))?;
    if t.placement.as_ref().map(|p| p.node.as_str()) != Some(name) {
        return Err(ApiError::Conflict(format!(
            "task {id} is not placed on node {name:?}"
        )));
    }
    if t.spec.kind != Kind::Vps || t.spec.is_vm() {
        return Err(ApiError::BadRequest(format!(
            "task {id} is not a container VPS: only those are parked"
        )));
    }
    Ok(t)
}

/// `PUT /api/nodes/{name}/tasks/{id}/park`: a piece of the archive of a
/// stop's snapshot, from `x-upload-offset` on, of `x-upload-total` bytes
/// in all (pieces in order: a request body is bounded, and a cut upload
/// starts again); the snapshot and host key in headers. The last piece
/// makes the copy, which replaces the last one.
async fn park(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    UrlPath((name, id)): UrlPath<(String, u64)>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    own_node(&p, &name)?;
    if !state.park_stopped_vps {
        return Err(ApiError::Conflict(
            "this host does not park VPS (park_stopped_vps is off)".into(),
        ));
    }
    let header = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
    let number = |h: &'static str| {
        header(h)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| ApiError::BadRequest(format!("{h}: a number of bytes is required")))
    };
    let snapshot = header(SNAPSHOT_HEADER)
        .filter(|s| valid_snapshot(s))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{SNAPSHOT_HEADER}: a snapshot id (digits) is required"
            ))
        })?
        .to_string();
    let host_key = header(HOST_KEY_HEADER)
        .filter(|k| k.len() <= MAX_HOST_KEY && hex::decode(k).is_ok())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{HOST_KEY_HEADER}: the host key file in hex is required"
            ))
        })?
        .to_string();
    let (offset, total) = (number(OFFSET_HEADER)?, number(TOTAL_HEADER)?);
    placed_here(&state, &name, id).await?;

    let d = dir(&state);
    // Host keys are in there.
    crate::files::ensure_private_dir(&d).map_err(internal(&d))?;
    let path = archive_path(&state, id, &snapshot);
    let part = path.with_extension("tar.part");
    let held = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    if offset != 0 && offset != held {
        return Err(ApiError::Conflict(format!(
            "{OFFSET_HEADER}: the host holds {held} bytes of this park; start again from 0"
        )));
    }
    if offset == 0 {
        // A park begins: the VPS's unfinished ones will never end.
        remove_files(&state, id, |name| name.ends_with(".part"));
        let free = nix::sys::statvfs::statvfs(&d)
            .map(|v| v.blocks_available().saturating_mul(v.fragment_size()))
            .map_err(|e| ApiError::Internal(format!("{}: {e}", d.display())))?;
        if total.saturating_add(KEEP_FREE) > free {
            return Err(ApiError::TooMany(format!(
                "{TOTAL_HEADER}: {total} bytes do not fit on the host ({free} free, {KEEP_FREE} kept free)"
            )));
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(offset == 0)
        .append(offset != 0)
        .open(&part)
        .map_err(internal(&part))?;
    let mut size = offset;
    let mut stream = body.into_data_stream();
    use futures_util::StreamExt;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::BadRequest(format!("body: cut off at byte {size}: {e}")))?;
        size += chunk.len() as u64;
        if size > total {
            let _ = std::fs::remove_file(&part);
            return Err(ApiError::BadRequest(format!(
                "{TOTAL_HEADER}: more than {total} bytes came"
            )));
        }
        tokio::task::block_in_place(|| file.write_all(&chunk)).map_err(internal(&part))?;
    }
    if size < total {
        return Ok(StatusCode::NO_CONTENT);
    }
    tokio::task::block_in_place(|| file.sync_all()).map_err(internal(&part))?;
    let sent = header(SHA256_HEADER).map(str::to_string);
    let p2 = part.clone();
    // One read: the whole digest, and each blob's checked against its name.
    let read = tokio::task::spawn_blocking(move || super::archive::read_archive(&p2))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(internal(&part))?;
    let sha256 = read.sha256;
    if sent.as_deref() != Some(sha256.as_str()) {
        let _ = std::fs::remove_file(&part);
        return Err(ApiError::BadRequest(format!(
            "{SHA256_HEADER}: the host received an archive with SHA-256 {sha256}, not {}; park it again",
            sent.as_deref().unwrap_or("(none given)")
        )));
    }
    let (manifest, blobs) = match read.layout {
        Ok(i) => i,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(ApiError::BadRequest(format!(
                "body: the archive is no whole OCI image layout of one image ({e}); park it again"
            )));
        }
    };
    std::fs::rename(&part, &path).map_err(internal(&path))?;
    let record = ParkedVps {
        vps_id: id,
        snapshot: snapshot.clone(),
        size_bytes: size,
        sha256,
        host_key,
        manifest: Some(manifest),
        blobs,
    };
    let rp = record_path(&state, id);
    let text = serde_json::to_vec(&record).map_err(|e| ApiError::Internal(e.to_string()))?;
    crate::files::write_secret(&rp, &text).map_err(internal(&rp))?;
    let kept = format!("vps-{id}-{snapshot}.tar");
    remove_files(&state, id, |name| name != kept);
    tracing::info!(task = id, node = %name, snapshot = %snapshot, bytes = size, "VPS parked on the host");
    Ok(StatusCode::NO_CONTENT)
}

/// VPS `id`'s copy, if its last stop is the one parked, for the node it
/// is placed on now (a move); or, without its host key, for a node that
/// makes a new VPS from it (`vps create --from-snapshot`).
async fn current(
    state: &HostState,
    p: &Principal,
    name: &str,
    id: u64,
) -> Result<ParkedVps, ApiError> {
    own_node(p, name)?;
    let found = |t: &TaskView| {
        record(state, id)
            .filter(|r| t.parked.as_deref() == Some(r.snapshot.as_str()))
            .ok_or_else(|| ApiError::NotFound(format!("VPS {id} has no parked copy on the host")))
    };
    let not_here = match placed_here(state, name, id).await {
        Ok(t) => return found(&t),
        Err(e) => e,
    };
    let Some(source) = state.blocking(move |s| s.get_task(id)).await? else {
        return Err(not_here);
    };
    let node = name.to_string();
    let here = state
        .blocking(move |s| s.list_tasks(None, Some(&node), None))
        .await?;
    let made_from_it = here.iter().any(|c| {
        !c.state.is_final()
            && matches!(&c.spec.image, crate::api::ImageSource::Snapshot { vps, snapshot }
                if *vps == id && source.parked.as_deref() == Some(snapshot.as_str()))
    });
    if !made_from_it {
        return Err(not_here);
    }
    // Its own key stays its own: the new VPS gets one of its own.
    Ok(ParkedVps {
        host_key: String::new(),
        ..found(&source)?
    })
}

/// `GET /api/nodes/{name}/parked/{id}`: the copy's snapshot, size, digest
/// and host key.
async fn describe(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    UrlPath((name, id)): UrlPath<(String, u64)>,
) -> Result<Json<ParkedVps>, ApiError> {
    Ok(Json(current(&state, &p, &name, id).await?))
}

/// `GET /api/nodes/{name}/parked/{id}/blobs/{digest}`: one blob of the
/// copy (its manifest, config or a layer) from the range's start;
/// `x-expect-sha256` must be its digest's.
async fn blob(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    UrlPath((name, id, digest)): UrlPath<(String, u64, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let r = current(&state, &p, &name, id).await?;
    let path = archive_path(&state, id, &r.snapshot);
    let what = format!("blob {digest} of VPS {id}'s parked copy");
    let resp = super::archive::send_blob(
        &headers,
        &path,
        (&r.manifest, &r.blobs, &r.sha256),
        &digest,
        &what,
    )
    .await?;
    tracing::info!(task = id, node = %name, blob = %digest, "parked blob sent");
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_id_is_digits() {
        assert!(valid_snapshot("1796184404728"));
        for bad in ["", "../x", "12a", "123456789012345678901"] {
            assert!(!valid_snapshot(bad), "{bad}");
        }
    }
}

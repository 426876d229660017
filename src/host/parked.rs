//! Parked VPS (`park_stopped_vps`): when a container VPS stops, its node
//! parks the snapshot of that stop here, with the instance's host key,
//! before it reports the stop. The host keeps images blob by blob, shared
//! by every copy (`DATA_DIR/parked/blobs/sha256/<hex>`, content-addressed),
//! and one record per VPS naming its copy (`vps-<id>.json`). A park names
//! the snapshot's manifest (`PUT .../tasks/<id>/park`); the host answers
//! which blobs it lacks, the node sends those (`PUT .../park/blobs/<digest>`,
//! in pieces, each checked against its digest), and names it again: with
//! nothing missing, the record is written. So a VPS's base layers, and the
//! layers of its earlier stops, travel once. The stop's report names the
//! snapshot (`tasks.parked`). `vps restart --anywhere` then places the VPS
//! on any node, whose runner fetches the blobs it lacks and the host key
//! from here (`.../parked/<id>/blobs/<digest>`): the VPS starts there as
//! it stopped, while its first node is gone. A delete removes the record,
//! and blobs no record or park under way names go.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
use crate::api::MAX_SNAPSHOT_MESSAGE as MAX_MESSAGE;
use crate::api::{
    ArchiveBlob, KeptSnapshot, Kind, ParkAnswer, ParkRequest, ParkedVps, SnapshotView, TaskView,
};

/// Where a piece of a blob starts, and the blob's whole size.
pub const OFFSET_HEADER: &str = "x-upload-offset";
pub const TOTAL_HEADER: &str = "x-upload-total";
/// What a park leaves free on the host's disk: the store lives there too.
const KEEP_FREE: u64 = 1 << 30;
/// A host key file is a few hundred bytes; this bounds its hex.
const MAX_HOST_KEY: usize = 16 << 10;
/// A manifest is a few KiB; this bounds what the host reads of one.
const MAX_MANIFEST: u64 = 4 << 20;
/// The snapshots one park may name (a node sends its newest).
const MAX_KEPT: usize = crate::api::MAX_KEPT_SNAPSHOTS;

/// The blobs of parks under way, by VPS (digest to size): what a node may
/// send, not yet named by a record, and kept from `collect` until the park
/// ends. Its lock is the store's: `collect`, a park's commit and a blob's
/// arrival take turns, so no blob is collected between its arrival or a
/// check that it is there and the record that names it.
type Uploading = HashMap<u64, HashMap<String, u64>>;
static STORE: Mutex<Option<Uploading>> = Mutex::new(None);

fn with_store<T>(f: impl FnOnce(&mut Uploading) -> T) -> T {
    let mut u = STORE.lock().unwrap_or_else(|p| p.into_inner());
    f(u.get_or_insert_with(HashMap::new))
}

/// A node's routes (its own credential, its own name in the path).
pub fn node_routes() -> Router<Arc<HostState>> {
    Router::new()
        .route("/api/nodes/{name}/tasks/{id}/park", put(park))
        .route(
            "/api/nodes/{name}/tasks/{id}/park/blobs/{digest}",
            put(park_blob),
        )
        .route("/api/nodes/{name}/parked/{id}", get(describe))
        .route("/api/nodes/{name}/parked/{id}/blobs/{digest}", get(blob))
        .route("/api/nodes/{name}/left/{id}", delete(left_removed))
        .route("/api/nodes/{name}/moves/{id}", get(move_source))
        .route("/api/nodes/{name}/clones/{id}", get(clone_source))
}

/// How long a node may read a VPS's snapshots from the node it left.
const GRANT_MS: i64 = 3_600_000;

/// `GET /api/nodes/{name}/moves/{id}`: where VPS `id`, placed on node
/// `name` by a move node to node, is fetched from: the runner of the node
/// it left, a grant that node gave for its snapshots (an hour, that VPS's
/// blobs only), and the copy (its snapshots and host key).
async fn move_source(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    UrlPath((name, id)): UrlPath<(String, u64)>,
) -> Result<Json<crate::api::MoveSource>, ApiError> {
    own_node(&p, &name)?;
    let t = placed_here(&state, &name, id).await?;
    let Some(restore) = t.spec.restore.clone().filter(|r| r.from.is_some()) else {
        return Err(ApiError::Conflict(format!(
            "VPS {id} is not moving here node to node"
        )));
    };
    let from = restore.from.clone().unwrap_or_default();
    let why = format!("which VPS {id} moves from");
    let again = format!("`rivernode vps restart {id} --anywhere` again once it is");
    let grant = Grant {
        vps: id,
        snapshot: &restore.snapshot,
        to: &name,
        only: false,
    };
    let source = granted(&state, &from, grant, (&why, &again)).await?;
    tracing::info!(task = id, from = %from, to = %name, snapshot = %restore.snapshot, "a move node to node granted");
    Ok(Json(source))
}

/// `GET /api/nodes/{name}/clones/{id}`: where the snapshot that new VPS
/// `id` (placed on node `name`) starts from is fetched from, when neither
/// that node nor the host has it: the runner of the node that keeps the
/// source VPS, with a grant for that snapshot alone (never its host key).
async fn clone_source(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    UrlPath((name, id)): UrlPath<(String, u64)>,
) -> Result<Json<crate::api::MoveSource>, ApiError> {
    own_node(&p, &name)?;
    let t = placed_here(&state, &name, id).await?;
    let crate::api::ImageSource::Snapshot { vps, snapshot } = &t.spec.image else {
        return Err(ApiError::Conflict(format!(
            "VPS {id} does not start from a snapshot"
        )));
    };
    if t.state.is_final() {
        return Err(ApiError::Conflict(format!("VPS {id} has ended")));
    }
    let (vps, snapshot) = (*vps, snapshot.clone());
    let source = state
        .blocking(move |s| s.get_task(vps))
        .await?
        .ok_or_else(|| {
            ApiError::NotFound(format!("VPS {vps}, which VPS {id} starts from, is gone"))
        })?;
    if source.state == crate::api::TaskState::Deleted
        || source.desired == crate::api::Desired::Deleted
    {
        return Err(ApiError::Conflict(format!(
            "VPS {vps} was deleted, and its snapshots with it: VPS {id} cannot start from one (`rivernode vps delete {id}`)"
        )));
    }
    // Its snapshots are where it is, or, while a move node to node of it
    // has not finished, still on the node it left.
    let moving_from = source.spec.restore.as_ref().and_then(|r| r.from.clone());
    let Some(from) = moving_from.or(source.placement.map(|p| p.node)) else {
        return Err(ApiError::Conflict(format!(
            "VPS {vps}, which VPS {id} starts from, is on no node now (its node was removed)"
        )));
    };
    let why = format!("which keeps VPS {vps}'s snapshot {snapshot}");
    let again = format!("`rivernode vps restart {id}` once it is");
    let grant = Grant {
        vps,
        snapshot: &snapshot,
        to: &name,
        only: true,
    };
    let mut source = granted(&state, &from, grant, (&why, &again)).await?;
    // Its own key stays its own, whatever a runner sends.
    source.copy.host_key = String::new();
    tracing::info!(task = id, source = vps, from = %from, to = %name, snapshot = %snapshot, "a new VPS's snapshot granted node to node");
    Ok(Json(source))
}

/// What a grant is asked for: snapshot `snapshot` of VPS `vps` (with its
/// other snapshots and host key, unless `only`), for node `to`.
struct Grant<'a> {
    vps: u64,
    snapshot: &'a str,
    to: &'a str,
    only: bool,
}

/// Asks the runner of node `from` (online; `why` and `again` say what it
/// is to the caller, and what to do when it is not) for `grant`: where
/// and how node `grant.to` fetches it.
async fn granted(
    state: &HostState,
    from: &str,
    grant: Grant<'_>,
    (why, again): (&str, &str),
) -> Result<crate::api::MoveSource, ApiError> {
    if from == grant.to {
        return Err(ApiError::Conflict(format!(
            "node {from:?}, {why}, is this one"
        )));
    }
    let f = from.to_string();
    let (url, token) = state
        .blocking(move |s| s.runner_access(&f))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("node {from:?}, {why}, is gone")))?;
    let online = super::snapshots::node_state(state, Some(from.to_string())).await?;
    if online != Some(crate::api::NodeState::Online) {
        return Err(ApiError::Conflict(format!(
            "node {from:?}, {why}, is not online: {again}"
        )));
    }
    let token_of_grant = crate::api::token::generate("rnmove_");
    let ask = crate::api::TransferGrant {
        grant_sha256: crate::api::token::hash(&token_of_grant),
        to: grant.to.to_string(),
        snapshot: grant.snapshot.to_string(),
        ttl_ms: GRANT_MS,
        only: grant.only,
    };
    let client = crate::api::runner_client::RunnerClient {
        http: &state.http,
        node: from,
        url: &url,
        token: &token,
    };
    let path = format!("/api/vps/{}/transfer", grant.vps);
    let resp = client
        .call(
            reqwest::Method::PUT,
            &path,
            &[],
            Some(&ask),
            std::time::Duration::from_secs(120),
        )
        .await?;
    let copy: ParkedVps = resp.json().await.map_err(|e| {
        ApiError::BadGateway(format!(
            "runner of {from:?} sent an unreadable copy: {}",
            crate::error_chain(&e)
        ))
    })?;
    Ok(crate::api::MoveSource {
        node: from.to_string(),
        url,
        grant: token_of_grant,
        copy,
    })
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

/// An older host's copy: one archive.
fn archive_path(state: &HostState, id: u64, snapshot: &str) -> PathBuf {
    dir(state).join(format!("vps-{id}-{snapshot}.tar"))
}

fn blobs_dir(state: &HostState) -> PathBuf {
    dir(state).join("blobs/sha256")
}

/// Where blob `digest` (`sha256:<hex>`) is kept; none for another name.
fn blob_path(state: &HostState, digest: &str) -> Option<PathBuf> {
    // Lowercase only, as OCI writes them: one blob, one name.
    let hex = digest.strip_prefix("sha256:").filter(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })?;
    Some(blobs_dir(state).join(hex))
}

fn valid_snapshot(s: &str) -> bool {
    !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit())
}

fn internal(path: &Path) -> impl Fn(std::io::Error) -> ApiError + '_ {
    move |e| ApiError::Internal(format!("{}: {e}", path.display()))
}

/// The copy the host keeps of VPS `id`, if any: its record, with every
/// blob it names in the store.
pub fn record(state: &HostState, id: u64) -> Option<ParkedVps> {
    let text = std::fs::read(record_path(state, id)).ok()?;
    let held = |b: &ArchiveBlob| blob_path(state, &b.digest).is_some_and(|p| p.is_file());
    let mut r = serde_json::from_slice::<ParkedVps>(&text)
        .ok()
        .filter(|r| {
            r.vps_id == id && r.manifest.is_some() && r.manifest.iter().chain(&r.blobs).all(held)
        })?;
    r.snapshots
        .retain(|k| std::iter::once(&k.manifest).chain(&k.blobs).all(held));
    Some(r)
}

/// Every blob a record names: its last stop's and its other snapshots'.
fn named_by(r: &ParkedVps) -> impl Iterator<Item = &ArchiveBlob> {
    let kept = r
        .snapshots
        .iter()
        .flat_map(|k| std::iter::once(&k.manifest).chain(&k.blobs));
    r.manifest.iter().chain(&r.blobs).chain(kept)
}

/// Snapshot `snapshot` of VPS `id` was deleted: the host's copy no longer
/// holds it (nor the blobs only it named). Its last stop stays: that is
/// the VPS's disk, which a move starts from. Whether the copy held it.
pub fn forget_snapshot(state: &HostState, id: u64, snapshot: &str) -> bool {
    with_store(|u| {
        let path = record_path(state, id);
        let Some(mut r) = std::fs::read(&path)
            .ok()
            .and_then(|t| serde_json::from_slice::<ParkedVps>(&t).ok())
        else {
            return false;
        };
        let before = r.snapshots.len();
        r.snapshots.retain(|k| k.id != snapshot);
        if r.snapshots.len() == before {
            return false;
        }
        match serde_json::to_vec(&r) {
            Ok(text) => {
                if let Err(e) = crate::files::write_secret(&path, &text) {
                    tracing::warn!(task = id, error = %e, "the host's copy still holds a deleted snapshot");
                    return false;
                }
            }
            Err(_) => return false,
        }
        collect_in(state, u);
        tracing::info!(
            task = id,
            snapshot,
            "a deleted snapshot removed from the host's copy"
        );
        true
    })
}

/// VPS `t`'s snapshots as the host keeps them, while its node cannot be
/// asked (offline or removed); none unless its last stop is parked.
pub fn host_snapshots(state: &HostState, t: &TaskView) -> Option<Vec<SnapshotView>> {
    let r = record(state, t.id).filter(|r| t.parked.as_deref() == Some(r.snapshot.as_str()))?;
    Some(
        r.all_snapshots()
            .into_iter()
            .map(|k| SnapshotView {
                image: format!("parked on the host ({})", k.manifest.digest),
                id: k.id,
                vps_id: t.id,
                created_at_unix_ms: k.created_at_unix_ms,
                size_bytes: k.size_bytes,
                message: k.message,
                node: "host".into(),
                consistency: None,
            })
            .collect(),
    )
}

/// Removes VPS `id`'s copy (it was deleted): its record, then the blobs
/// nothing else names.
pub fn forget(state: &HostState, id: u64) {
    let _ = std::fs::remove_file(record_path(state, id));
    remove_files(state, id, |_| true);
    park_ended(state, id);
    collect(state);
}

/// VPS `id`'s park is over (its stop was reported, or it is deleted):
/// what it named is no longer kept for it, and its partial blobs go.
pub fn park_ended(state: &HostState, id: u64) {
    with_store(|u| u.remove(&id));
    let suffix = format!(".vps-{id}.part");
    if let Ok(entries) = std::fs::read_dir(blobs_dir(state)) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().ends_with(&suffix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Removes the blobs that no record and no park under way names, and the
/// partial blobs of parks that are not under way.
fn collect(state: &HostState) {
    with_store(|u| collect_in(state, u))
}

/// `collect`, with the store's lock held (`u`).
fn collect_in(state: &HostState, u: &Uploading) {
    {
        let Ok(entries) = std::fs::read_dir(dir(state)) else {
            return;
        };
        let mut named: HashSet<String> = HashSet::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("vps-") && name.ends_with(".json")) {
                continue;
            }
            match std::fs::read(e.path())
                .ok()
                .and_then(|t| serde_json::from_slice::<ParkedVps>(&t).ok())
            {
                Some(r) => named.extend(named_by(&r).map(|b| b.digest.clone())),
                // A record this host cannot read names blobs all the same
                // (a VPS's disk among them): none is removed.
                None => {
                    tracing::warn!(record = %e.path().display(), "an unreadable parked record: no blob is removed until it is read or its VPS deleted");
                    return;
                }
            }
        }
        named.extend(u.values().flat_map(|d| d.keys().cloned()));
        let Ok(blobs) = std::fs::read_dir(blobs_dir(state)) else {
            return;
        };
        for e in blobs.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let keep = match name.split_once(".vps-") {
                // `<hex>.vps-<id>.part`: a piece of a park under way.
                Some((_, rest)) => rest
                    .strip_suffix(".part")
                    .and_then(|id| id.parse::<u64>().ok())
                    .is_some_and(|id| u.contains_key(&id)),
                None => named.contains(&format!("sha256:{name}")),
            };
            if !keep {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Removes the copies of VPS that are deleted or gone from the store,
/// converts an older host's (one archive each) to blobs, and removes the
/// blobs nothing names.
pub async fn sweep(state: &HostState) {
    let Ok(entries) = std::fs::read_dir(dir(state)) else {
        return;
    };
    // Every file names its VPS: records, and an older host's archives.
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
            Ok(Some(t)) if t.state != crate::api::TaskState::Deleted => convert(state, id).await,
            Ok(_) => {
                tracing::info!(task = id, "the parked copy of a deleted VPS removed");
                let _ = std::fs::remove_file(record_path(state, id));
                remove_files(state, id, |_| true);
            }
            Err(e) => {
                tracing::warn!(task = id, error = %crate::error_chain(&e), "cannot tell whether a parked VPS still exists")
            }
        }
    }
    collect(state);
}

/// An older host's copy of VPS `id` (one archive) as blobs in the store;
/// one that is no whole image is removed.
async fn convert(state: &HostState, id: u64) {
    let Some(mut r) = std::fs::read(record_path(state, id))
        .ok()
        .and_then(|t| serde_json::from_slice::<ParkedVps>(&t).ok())
    else {
        return;
    };
    let archive = archive_path(state, id, &r.snapshot);
    if r.manifest.is_some() && !archive.exists() {
        return;
    }
    let (a, store, sha256) = (archive.clone(), blobs_dir(state), r.sha256.clone());
    // Err: it could not be read or copied now (kept, tried at the next
    // start); Ok(Err): it is no whole image (removed).
    type Converted = Result<(ArchiveBlob, Vec<ArchiveBlob>), String>;
    let converted = tokio::task::spawn_blocking(move || -> Result<Converted, String> {
        let read = super::archive::read_archive(&a).map_err(|e| e.to_string())?;
        if read.sha256 != sha256 {
            return Ok(Err(format!(
                "its SHA-256 is {}, not the record's",
                read.sha256
            )));
        }
        let (manifest, blobs) = match read.layout {
            Ok(l) => l,
            Err(e) => return Ok(Err(e)),
        };
        crate::files::ensure_private_dir(&store).map_err(|e| e.to_string())?;
        let mut file = std::fs::File::open(&a).map_err(|e| e.to_string())?;
        for b in std::iter::once(&manifest).chain(&blobs) {
            use std::io::{Read, Seek};
            let to = store.join(b.digest.trim_start_matches("sha256:"));
            let part = to.with_extension("convert.part");
            file.seek(std::io::SeekFrom::Start(b.offset))
                .map_err(|e| e.to_string())?;
            let mut out = std::fs::File::create(&part).map_err(|e| e.to_string())?;
            std::io::copy(&mut (&mut file).take(b.size), &mut out).map_err(|e| e.to_string())?;
            std::fs::rename(&part, &to).map_err(|e| e.to_string())?;
        }
        let at_zero = |b: &ArchiveBlob| ArchiveBlob {
            offset: 0,
            ..b.clone()
        };
        Ok(Ok((
            at_zero(&manifest),
            blobs.iter().map(at_zero).collect(),
        )))
    })
    .await;
    match converted {
        Ok(Ok(Ok((manifest, blobs)))) => {
            r.sha256 = manifest.digest.trim_start_matches("sha256:").to_string();
            (r.manifest, r.blobs) = (Some(manifest), blobs);
            if let Ok(text) = serde_json::to_vec(&r) {
                let _ = crate::files::write_secret(&record_path(state, id), &text);
            }
            let _ = std::fs::remove_file(&archive);
            tracing::info!(task = id, "an older host's parked copy kept as blobs");
        }
        Ok(Ok(Err(e))) => {
            tracing::warn!(task = id, error = %e, "an older host's parked copy that is no whole image removed");
            let _ = std::fs::remove_file(record_path(state, id));
            remove_files(state, id, |_| true);
        }
        Ok(Err(e)) => {
            tracing::warn!(task = id, error = %e, "an older host's parked copy is kept as it is: converting it failed (tried again at the next start)")
        }
        Err(e) => tracing::warn!(task = id, error = %e, "converting a parked copy"),
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

/// A park's checks: the host parks VPS, and VPS `id` is a container VPS
/// placed on node `name`, who asks.
async fn may_park(state: &HostState, p: &Principal, name: &str, id: u64) -> Result<(), ApiError> {
    own_node(p, name)?;
    if !state.park_stopped_vps {
        return Err(ApiError::Conflict(
            "this host does not park VPS (park_stopped_vps is off)".into(),
        ));
    }
    let t = placed_here(state, name, id).await?;
    if t.state == crate::api::TaskState::Deleted || t.desired == crate::api::Desired::Deleted {
        return Err(ApiError::Conflict(format!(
            "VPS {id} is deleted: it is not parked"
        )));
    }
    Ok(())
}

/// `PUT /api/nodes/{name}/tasks/{id}/park`: parks the stop snapshot the
/// body names (its manifest) with its host key, and the VPS's other
/// snapshots it lists. The answer lists the blobs the host lacks (sent
/// next, then the park asked again); with none missing the copy is made,
/// and replaces the VPS's last one.
async fn park(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    UrlPath((name, id)): UrlPath<(String, u64)>,
    super::api::ApiJson(mut req): super::api::ApiJson<ParkRequest>,
) -> Result<Json<ParkAnswer>, ApiError> {
    may_park(&state, &p, &name, id).await?;
    if !valid_snapshot(&req.snapshot) {
        return Err(ApiError::BadRequest(
            "snapshot: a snapshot id (digits) is required".into(),
        ));
    }
    if req.host_key.len() > MAX_HOST_KEY || hex::decode(&req.host_key).is_err() {
        return Err(ApiError::BadRequest(
            "host_key: the host key file in hex is required".into(),
        ));
    }
    check_manifest(&state, "manifest", &req.manifest)?;
    if req.snapshots.len() > MAX_KEPT {
        return Err(ApiError::BadRequest(format!(
            "snapshots: {} named; a park holds at most {MAX_KEPT}",
            req.snapshots.len()
        )));
    }
    for (i, k) in req.snapshots.iter().enumerate() {
        if !valid_snapshot(&k.id) {
            return Err(ApiError::BadRequest(format!(
                "snapshots[{i}].id: a snapshot id (digits) is required"
            )));
        }
        if k.message.as_ref().is_some_and(|m| m.len() > MAX_MESSAGE) {
            return Err(ApiError::BadRequest(format!(
                "snapshots[{i}].message: longer than {MAX_MESSAGE} bytes"
            )));
        }
        check_manifest(&state, &format!("snapshots[{i}].manifest"), &k.manifest)?;
    }
    // Oldest first, one of each; the host reads their blobs itself.
    req.snapshots
        .sort_by(|a, b| (a.created_at_unix_ms, &a.id).cmp(&(b.created_at_unix_ms, &b.id)));
    let mut seen = HashSet::new();
    req.snapshots.retain(|k| seen.insert(k.id.clone()));
    for k in &mut req.snapshots {
        k.blobs.clear();
        if k.id == req.snapshot && k.manifest.digest != req.manifest.digest {
            return Err(ApiError::BadRequest(format!(
                "snapshots: {} names another manifest than the stop's (manifest)",
                k.id
            )));
        }
    }
    // Manifests are read and blobs looked for off the async workers.
    let (st, r) = (state.clone(), req.clone());
    let answer = tokio::task::spawn_blocking(move || with_store(|u| settle(&st, u, id, &r)))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
    if answer.missing.is_empty() {
        tracing::info!(task = id, node = %name, snapshot = %req.snapshot, snapshots = req.snapshots.len(), "VPS parked on the host");
    }
    Ok(Json(answer))
}

/// A manifest a park names (`field`): a sha256 digest, a manifest's size,
/// and the size of its blob, if the host has it.
fn check_manifest(state: &HostState, field: &str, m: &ArchiveBlob) -> Result<(), ApiError> {
    let Some(path) = blob_path(state, &m.digest) else {
        return Err(ApiError::BadRequest(format!(
            "{field}.digest: {:?} is no sha256:<hex> digest",
            m.digest
        )));
    };
    if m.size > MAX_MANIFEST {
        return Err(ApiError::BadRequest(format!(
            "{field}.size: {} bytes; a manifest has at most {MAX_MANIFEST}",
            m.size
        )));
    }
    // The manifest is read only at the size it was named with.
    if std::fs::metadata(path).is_ok_and(|f| f.len() != m.size) {
        return Err(ApiError::BadRequest(format!(
            "{field}.size: its blob does not have {} bytes",
            m.size
        )));
    }
    Ok(())
}

/// The config and layers manifest `m` (the request's `field`) names,
/// each kept for the park (`named`); none while the host lacks the
/// manifest itself.
fn image_of(
    state: &HostState,
    named: &mut HashMap<String, u64>,
    (field, m): (&str, &ArchiveBlob),
) -> Result<Option<Vec<ArchiveBlob>>, ApiError> {
    named.insert(m.digest.clone(), m.size);
    let Some(Ok(text)) = blob_path(state, &m.digest).map(std::fs::read) else {
        return Ok(None);
    };
    let image: crate::oci::Manifest = serde_json::from_slice(&text).map_err(|e| {
        ApiError::BadRequest(format!(
            "{field}: blob {} is no image manifest: {e}",
            m.digest
        ))
    })?;
    let mut blobs = Vec::new();
    for d in std::iter::once(&image.config).chain(&image.layers) {
        let size = u64::try_from(d.size).ok();
        let (Some(_), Some(size)) = (blob_path(state, &d.digest), size) else {
            return Err(ApiError::BadRequest(format!(
                "{field}: it names {:?} of {} bytes, no sha256:<hex> digest and size",
                d.digest, d.size
            )));
        };
        named.insert(d.digest.clone(), size);
        blobs.push(ArchiveBlob {
            media_type: d.media_type.clone(),
            digest: d.digest.clone(),
            size,
            offset: 0,
        });
    }
    Ok(Some(blobs))
}

/// The rest of a park, with the store's lock held (`u`): the blobs it
/// lacks, kept for it; or, with none, its record written.
fn settle(
    state: &HostState,
    u: &mut Uploading,
    id: u64,
    req: &ParkRequest,
) -> Result<ParkAnswer, ApiError> {
    // What this park names is kept from `collect` until it ends, and is
    // all a node may send for it.
    let named = u.entry(id).or_default();
    let fields = std::iter::once("manifest".to_string())
        .chain((0..req.snapshots.len()).map(|i| format!("snapshots[{i}].manifest")));
    let manifests = std::iter::once(&req.manifest).chain(req.snapshots.iter().map(|k| &k.manifest));
    let mut images = Vec::new();
    let mut missing: Vec<String> = Vec::new();
    for (field, m) in fields.zip(manifests) {
        match image_of(state, named, (&field, m))? {
            Some(blobs) => images.push(blobs),
            None => {
                missing.push(m.digest.clone());
                images.push(Vec::new());
            }
        }
    }
    if !missing.is_empty() {
        // The manifests first: what they name is asked for next.
        let mut seen = HashSet::new();
        missing.retain(|d| seen.insert(d.clone()));
        return Ok(ParkAnswer { missing });
    }
    let lacks = |b: &&ArchiveBlob| {
        blob_path(state, &b.digest)
            .is_none_or(|p| std::fs::metadata(p).map(|m| m.len()).ok() != Some(b.size))
    };
    let mut seen = HashSet::new();
    let missing: Vec<String> = images
        .iter()
        .flatten()
        .filter(lacks)
        .filter(|b| seen.insert(b.digest.clone()))
        .map(|b| b.digest.clone())
        .collect();
    if !missing.is_empty() {
        return Ok(ParkAnswer { missing });
    }
    let mut images = images.into_iter();
    let blobs = images.next().unwrap_or_default();
    let m = &req.manifest;
    let record = ParkedVps {
        vps_id: id,
        snapshot: req.snapshot.clone(),
        size_bytes: m.size + blobs.iter().map(|b| b.size).sum::<u64>(),
        sha256: m.digest.trim_start_matches("sha256:").to_string(),
        host_key: req.host_key.clone(),
        manifest: Some(ArchiveBlob {
            offset: 0,
            ..m.clone()
        }),
        blobs,
        snapshots: req
            .snapshots
            .iter()
            .zip(images)
            .map(|(k, blobs)| KeptSnapshot {
                blobs,
                manifest: ArchiveBlob {
                    offset: 0,
                    ..k.manifest.clone()
                },
                ..k.clone()
            })
            .collect(),
    };
    let rp = record_path(state, id);
    let text = serde_json::to_vec(&record).map_err(|e| ApiError::Internal(e.to_string()))?;
    crate::files::write_secret(&rp, &text).map_err(internal(&rp))?;
    // An older host's archive of this VPS is of no more use.
    remove_files(state, id, |_| true);
    u.remove(&id);
    collect_in(state, u);
    Ok(ParkAnswer { missing: vec![] })
}

/// `PUT /api/nodes/{name}/tasks/{id}/park/blobs/{digest}`: a piece of a
/// blob a park lacks, from `x-upload-offset` on, of `x-upload-total`
/// bytes in all (pieces in order: a request body is bounded, and a cut
/// upload starts again). The last piece is checked against the digest and
/// makes the blob.
async fn park_blob(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    UrlPath((name, id, digest)): UrlPath<(String, u64, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<StatusCode, ApiError> {
    may_park(&state, &p, &name, id).await?;
    let number = |h: &'static str| {
        headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| ApiError::BadRequest(format!("{h}: a number of bytes is required")))
    };
    let (offset, total) = (number(OFFSET_HEADER)?, number(TOTAL_HEADER)?);
    let path = blob_path(&state, &digest).ok_or_else(|| {
        ApiError::BadRequest(format!("digest: {digest:?} is no sha256:<hex> digest"))
    })?;
    // Only what this VPS's park named, at its size.
    let wanted = with_store(|u| u.get(&id).and_then(|d| d.get(&digest)).copied());
    match wanted {
        None => {
            return Err(ApiError::Conflict(format!(
                "digest: VPS {id}'s park names no blob {digest}; park it first (PUT .../park)"
            )))
        }
        Some(size) if size != total => {
            return Err(ApiError::BadRequest(format!(
                "{TOTAL_HEADER}: the park names {digest} with {size} bytes, not {total}"
            )))
        }
        Some(_) => {}
    }
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == total) {
        return Ok(StatusCode::NO_CONTENT);
    }
    let d = blobs_dir(&state);
    // Host keys live beside the blobs: the directory is private.
    crate::files::ensure_private_dir(&dir(&state)).map_err(internal(&dir(&state)))?;
    crate::files::ensure_private_dir(&d).map_err(internal(&d))?;
    // Each VPS's upload its own: two parks may send one base layer at once.
    let part = d.join(format!(
        "{}.vps-{id}.part",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let held = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    if offset != 0 && offset != held {
        return Err(ApiError::Conflict(format!(
            "{OFFSET_HEADER}: the host holds {held} bytes of this blob; start again from 0"
        )));
    }
    if offset == 0 {
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
    let p2 = part.clone();
    let sha256 = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        std::io::copy(&mut std::fs::File::open(&p2)?, &mut h)?;
        Ok(hex::encode(h.finalize()))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(internal(&part))?;
    if format!("sha256:{sha256}") != digest.to_ascii_lowercase() {
        let _ = std::fs::remove_file(&part);
        return Err(ApiError::BadRequest(format!(
            "body: the host received bytes with SHA-256 {sha256}, not {digest}; send the blob again"
        )));
    }
    // Under the store's lock: `collect` sees it, or its part, not neither.
    with_store(|_| std::fs::rename(&part, &path)).map_err(internal(&path))?;
    tracing::debug!(task = id, node = %name, blob = %digest, bytes = size, "a parked blob received");
    Ok(StatusCode::NO_CONTENT)
}

/// VPS `id`'s copy, if its last stop is the one parked, for the node it
/// is placed on now (a move: all of it); or, for a node that makes a new
/// VPS from one of its snapshots (`vps create --from-snapshot`), only the
/// snapshots that node makes VPS from, without the host key.
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
    let wanted: HashSet<String> = here
        .iter()
        .filter(|c| !c.state.is_final())
        .filter_map(|c| match &c.spec.image {
            crate::api::ImageSource::Snapshot { vps, snapshot } if *vps == id => {
                Some(snapshot.clone())
            }
            _ => None,
        })
        .collect();
    if wanted.is_empty() {
        return Err(not_here);
    }
    // No copy of it here: 404, and the node asks the node that keeps it.
    let mut r = found(&source)?;
    r.snapshots = r
        .all_snapshots()
        .into_iter()
        .filter(|k| wanted.contains(&k.id))
        .collect();
    if r.snapshots.is_empty() {
        return Err(ApiError::NotFound(format!(
            "the host's copy of VPS {id} holds no snapshot a VPS on node {name:?} starts from"
        )));
    }
    if !wanted.contains(&r.snapshot) {
        (r.manifest, r.blobs) = (None, Vec::new());
    }
    // Its own key stays its own: the new VPS gets one of its own.
    r.host_key = String::new();
    Ok(r)
}

/// `GET /api/nodes/{name}/parked/{id}`: the copy's snapshot, size, digest
/// and host key, and its snapshots.
async fn describe(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    UrlPath((name, id)): UrlPath<(String, u64)>,
) -> Result<Json<ParkedVps>, ApiError> {
    Ok(Json(current(&state, &p, &name, id).await?))
}

/// `GET /api/nodes/{name}/parked/{id}/blobs/{digest}`: one blob of the
/// copy (a manifest, config or layer of a snapshot the node may fetch)
/// from the range's start; `x-expect-sha256` must be its digest's.
async fn blob(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    UrlPath((name, id, digest)): UrlPath<(String, u64, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let r = current(&state, &p, &name, id).await?;
    let what = format!("blob {digest} of VPS {id}'s parked copy");
    let store = blobs_dir(&state);
    // Each blob is a file of its own (offset 0), named by its digest.
    let path = |b: &ArchiveBlob| store.join(b.digest.trim_start_matches("sha256:"));
    // The snapshot that holds it; none: the copy changed since the node
    // read it (a 412 names the last stop's copy).
    let kept = r.snapshots.iter().find(|k| {
        std::iter::once(&k.manifest)
            .chain(&k.blobs)
            .any(|b| b.digest == digest)
    });
    let resp = match kept {
        Some(k) => {
            let manifest = Some(k.manifest.clone());
            let sha256 = k.manifest.digest.trim_start_matches("sha256:");
            super::archive::send_blob(
                &headers,
                path,
                (&manifest, &k.blobs, sha256),
                &digest,
                &what,
            )
            .await?
        }
        None => {
            let index = (&r.manifest, &r.blobs[..], r.sha256.as_str());
            super::archive::send_blob(&headers, path, index, &digest, &what).await?
        }
    };
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

//! VPS snapshots on the host API, at the seed's paths: the host checks who
//! may touch the VPS, finds its node and asks that node's runner, which
//! keeps the snapshots in its containerd. Also the two ways back from one:
//! `restart` with `from_snapshot`, and new VPS whose image is a snapshot.

use std::sync::Arc;
use std::time::Duration;

use crate::api::runner_client::RunnerClient;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};

use super::api::ApiError;
use super::auth::Principal;
use super::tasks::visible_task;
use super::HostState;
use crate::api::{
    ImageSource, Kind, NodeState, RestartRequest, Restore, SnapshotRequest, SnapshotView, TaskSpec,
    TaskView,
};

pub fn routes() -> Router<Arc<HostState>> {
    Router::new()
        .route("/api/vps/snapshots/{id}", post(create).get(list))
        .route("/api/vps/snapshots/{id}/latest", get(latest))
        .route(
            "/api/vps/snapshots/{id}/{snapshot}",
            axum::routing::delete(delete),
        )
        .route("/api/tasks/{id}/restart", post(restart))
}

/// An optional JSON body: empty means the defaults.
pub fn optional_body<T: serde::de::DeserializeOwned + Default>(
    body: &Bytes,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))
}

/// The node that keeps a VPS's disk and snapshots.
fn node_of(t: &TaskView) -> Result<String, ApiError> {
    if t.spec.kind != Kind::Vps {
        return Err(ApiError::BadRequest(format!(
            "task {} is a command task: only a VPS has snapshots",
            t.id
        )));
    }
    t.placement
        .as_ref()
        .map(|p| p.node.clone())
        .or_else(|| t.spec.target.as_ref().map(|t| t.node.clone()))
        .ok_or_else(|| {
            ApiError::Conflict(format!(
                "VPS {} has not been placed on a node yet ({})",
                t.id, t.reason
            ))
        })
}

/// The state of node `node`; none without a node, or for one removed.
pub(super) async fn node_state(
    state: &HostState,
    node: Option<String>,
) -> Result<Option<NodeState>, ApiError> {
    let Some(node) = node else {
        return Ok(None);
    };
    let found = state.blocking(move |s| s.get_node(&node)).await?;
    Ok(found.map(|n| n.state))
}

/// Calls `path` on the runner of `node`; the runner's 4xx answers become ours.
async fn runner(
    state: &HostState,
    node: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<&SnapshotRequest>,
) -> Result<reqwest::Response, ApiError> {
    let n = node.to_string();
    let (url, token) = state
        .blocking(move |s| s.runner_access(&n))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("node {node:?} is gone")))?;
    // An answer now, not a wait on a runner that cannot answer.
    if node_state(state, Some(node.to_string())).await? == Some(NodeState::Offline) {
        return Err(ApiError::Conflict(format!(
            "node {node:?} is offline: ask again once it is back (the host keeps the snapshots of a VPS stopped and parked: those it lists meanwhile)"
        )));
    }
    let client = RunnerClient {
        http: &state.http,
        node,
        url: &url,
        token: &token,
    };
    // A snapshot of a large disk takes as long as reading its changes.
    Ok(client
        .call(method, path, &[], body, Duration::from_secs(3600))
        .await?)
}

async fn decode<T: serde::de::DeserializeOwned>(
    resp: reqwest::Response,
    node: &str,
) -> Result<T, ApiError> {
    resp.json().await.map_err(|e| {
        ApiError::BadGateway(format!(
            "runner of {node:?} sent an unreadable answer: {}",
            crate::error_chain(&e)
        ))
    })
}

/// A VPS's snapshots, oldest first: its node's; or, while its node is
/// offline or removed, those the host keeps of it (stopped and parked).
async fn snapshots_of(state: &HostState, t: &TaskView) -> Result<Vec<SnapshotView>, ApiError> {
    let node = t
        .placement
        .as_ref()
        .map(|p| p.node.clone())
        .or_else(|| t.spec.target.as_ref().map(|t| t.node.clone()));
    let gone = matches!(
        node_state(state, node).await?,
        None | Some(NodeState::Offline)
    );
    if gone && t.spec.kind == Kind::Vps {
        if let Some(kept) = super::parked::host_snapshots(state, t) {
            return Ok(kept);
        }
    }
    let node = node_of(t)?;
    let path = format!("/api/vps/{}/snapshots", t.id);
    let resp = runner(state, &node, reqwest::Method::GET, &path, None).await?;
    decode(resp, &node).await
}

/// One snapshot of `t` by id, or its newest for `"latest"`.
async fn find(state: &HostState, t: &TaskView, id: &str) -> Result<SnapshotView, ApiError> {
    let all = snapshots_of(state, t).await?;
    let found = if id == "latest" {
        all.last()
    } else {
        all.iter().find(|s| s.id == id)
    };
    found.cloned().ok_or_else(|| {
        ApiError::NotFound(if all.is_empty() {
            format!("VPS {} has no snapshots", t.id)
        } else {
            format!(
                "VPS {} has no snapshot {id}; `rivernode vps snapshot list {}` shows them",
                t.id, t.id
            )
        })
    })
}

async fn create(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<u64>,
    body: Bytes,
) -> Result<(StatusCode, Json<SnapshotView>), ApiError> {
    let req: SnapshotRequest = optional_body(&body)?;
    let t = visible_task(&state, &p, id).await?;
    let node = node_of(&t)?;
    // An ended VPS (killed, failed) still has its disk: it can be snapshotted.
    if t.state == crate::api::TaskState::Deleted || t.desired == crate::api::Desired::Deleted {
        return Err(ApiError::Conflict(format!("VPS {id} is deleted")));
    }
    let path = format!("/api/vps/{id}/snapshots");
    let resp = runner(&state, &node, reqwest::Method::POST, &path, Some(&req)).await?;
    let s: SnapshotView = decode(resp, &node).await?;
    tracing::info!(task = id, snapshot = %s.id, bytes = s.size_bytes, "snapshot taken");
    Ok((StatusCode::CREATED, Json(s)))
}

async fn list(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<u64>,
) -> Result<Json<Vec<SnapshotView>>, ApiError> {
    let t = visible_task(&state, &p, id).await?;
    snapshots_of(&state, &t).await.map(Json)
}

async fn latest(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<u64>,
) -> Result<Json<SnapshotView>, ApiError> {
    let t = visible_task(&state, &p, id).await?;
    find(&state, &t, "latest").await.map(Json)
}

async fn delete(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path((id, snapshot)): Path<(u64, String)>,
) -> Result<StatusCode, ApiError> {
    let t = visible_task(&state, &p, id).await?;
    let node = node_of(&t)?;
    if snapshot.is_empty() || !snapshot.chars().all(|c| c.is_ascii_digit()) {
        return Err(ApiError::NotFound(format!(
            "VPS {id} has no snapshot {snapshot:?}"
        )));
    }
    let path = format!("/api/vps/{id}/snapshots/{snapshot}");
    let deleted = runner(&state, &node, reqwest::Method::DELETE, &path, None).await;
    // Nor does it follow the VPS any more (also when its node no longer
    // had it: the host's copy was the last). A node that could not answer
    // keeps it, and so does the host.
    match deleted {
        Ok(_) => {
            super::parked::forget_snapshot(&state, id, &snapshot);
        }
        Err(ApiError::NotFound(e)) => {
            if !super::parked::forget_snapshot(&state, id, &snapshot) {
                return Err(ApiError::NotFound(e));
            }
        }
        Err(e) => return Err(e),
    }
    tracing::info!(task = id, snapshot = %snapshot, "snapshot deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/tasks/{id}/restart` (a stopped VPS starts; a running or
/// paused one stops and starts), with `{"from_snapshot": "<id>|latest"}` to
/// recreate its disk from a snapshot on the way.
async fn restart(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<u64>,
    body: Bytes,
) -> Result<Json<TaskView>, ApiError> {
    // The role before the body: a viewer learns nothing of what it says.
    if p.role == super::auth::Role::Viewer {
        return Err(ApiError::Forbidden(
            "a viewer token may look at tasks but not change them".into(),
        ));
    }
    let req: RestartRequest = optional_body(&body)?;
    // A restore rewrites the disk: its owner's (and the admin's) call. A
    // plain restart is also an operator's.
    let t = match req.from_snapshot {
        Some(_) => visible_task(&state, &p, id).await?,
        None => super::tasks::operated_task(&state, &p, id).await?,
    };
    super::tasks::still_allowed(&state, &t)?;
    // The copy of its last stop the host keeps, if it is current.
    let copy = super::parked::record(&state, id)
        .filter(|c| t.parked.as_deref() == Some(c.snapshot.as_str()));
    // A movable VPS whose node is gone (offline, or removed: then it has no
    // placement left) moves on a plain restart, if it has a copy to move
    // from; without one it waits for its node as any other. (One queued
    // for a node that is full, or goes offline while it waits, the
    // scheduler moves: `scheduler::moved_spec`.)
    let gone = if t.spec.movable && !req.anywhere && req.from_snapshot.is_none() && copy.is_some() {
        let node = t.placement.as_ref().map(|p| p.node.clone());
        matches!(
            node_state(&state, node).await?,
            None | Some(NodeState::Offline)
        )
    } else {
        false
    };
    // `--anywhere`: node to node while its node is online, from its disk
    // as it stopped (the host's copy may hold fewer of its snapshots).
    let node_to_node = if req.anywhere && req.from_snapshot.is_none() {
        node_to_node(&state, &t, copy.as_ref()).await?
    } else {
        None
    };
    let view = if let Some(restore) = node_to_node {
        tracing::info!(task = id, snapshot = %restore.snapshot, from = ?restore.from, "restart anywhere, node to node");
        state
            .blocking(move |s| s.restart_anywhere(id, &restore))
            .await?
    } else if req.anywhere || gone {
        if req.from_snapshot.is_some() {
            return Err(ApiError::BadRequest(
                "anywhere: a move starts from the VPS's disk as it stopped, not from_snapshot (restore a snapshot on the new node after the move)"
                    .into(),
            ));
        }
        let Some(copy) = copy else {
            return Err(ApiError::Conflict(format!(
                "VPS {id} has no parked copy of its last stop on the host{}, and moves node to node only while its node is online and it is stopped",
                if state.park_stopped_vps {
                    ""
                } else {
                    " (the host's park_stopped_vps is off)"
                }
            )));
        };
        let restore = Restore {
            snapshot: copy.snapshot,
            request: crate::now_unix_ms(),
            parked: true,
            from: None,
        };
        tracing::info!(task = id, snapshot = %restore.snapshot, movable_and_gone = gone, "restart anywhere from the parked copy");
        state
            .blocking(move |s| s.restart_anywhere(id, &restore))
            .await?
    } else {
        let restore = match req.from_snapshot {
            None => None,
            Some(wanted) => {
                let snap = find(&state, &t, &wanted).await?;
                if snap.node == "host" {
                    return Err(ApiError::Conflict(format!(
                        "VPS {id}'s node is offline or gone, and snapshot {} is on the host: `rivernode vps restart {id} --anywhere` moves the VPS, then `--from-snapshot {}` restores it on its new node",
                        snap.id, snap.id
                    )));
                }
                tracing::info!(task = id, snapshot = %snap.id, "restart from a snapshot");
                Some(Restore {
                    snapshot: snap.id,
                    request: crate::now_unix_ms(),
                    parked: false,
                    from: None,
                })
            }
        };
        state
            .blocking(move |s| s.restart(id, restore.as_ref()))
            .await?
    };
    state.publish().await;
    state.schedule.notify_one();
    Ok(Json(super::tasks::outward(&state, &p, view)))
}

/// A move node to node of stopped container VPS `t` whose node is online:
/// a snapshot of its disk taken there now, which the node it lands on
/// fetches from that node. A move node to node that never ran is tried
/// again from the node it left, whose snapshot it names (not from the node
/// it failed on, which holds nothing newer of the VPS). None when it
/// cannot move so (that node is offline or gone, it is a VM, it is not
/// stopped).
async fn node_to_node(
    state: &HostState,
    t: &TaskView,
    copy: Option<&crate::api::ParkedVps>,
) -> Result<Option<Restore>, ApiError> {
    if t.spec.kind != Kind::Vps || t.spec.is_vm() || !t.state.kept_its_disk() {
        return Ok(None);
    }
    let online = |node: String| async move {
        Ok::<_, ApiError>(node_state(state, Some(node)).await? == Some(NodeState::Online))
    };
    let unfinished = t.spec.restore.clone().filter(|r| r.from.is_some());
    if let Some(r) = unfinished {
        let from = r.from.clone().unwrap_or_default();
        return Ok(online(from).await?.then(|| Restore {
            request: crate::now_unix_ms(),
            ..r
        }));
    }
    let Some(node) = t.placement.as_ref().map(|p| p.node.clone()) else {
        return Ok(None);
    };
    if !online(node.clone()).await? {
        return Ok(None);
    }
    let restore = |snapshot: String| Restore {
        snapshot,
        request: crate::now_unix_ms(),
        parked: false,
        from: Some(node.clone()),
    };
    // Parked: its stop's snapshot is its disk as it stopped, with no new
    // snapshot (nor its park) needed, while its node still has it; else
    // (or when its node does not answer) the host's copy.
    if let Some(c) = copy {
        let path = format!("/api/vps/{}/snapshots", t.id);
        let listed = match runner(state, &node, reqwest::Method::GET, &path, None).await {
            Ok(resp) => decode::<Vec<SnapshotView>>(resp, &node).await.ok(),
            Err(_) => None,
        };
        let held = listed.is_some_and(|l| l.iter().any(|s| s.id == c.snapshot));
        return Ok(held.then(|| restore(c.snapshot.clone())));
    }
    let req = SnapshotRequest {
        message: Some("for a move to another node".into()),
    };
    let path = format!("/api/vps/{}/snapshots", t.id);
    let resp = runner(state, &node, reqwest::Method::POST, &path, Some(&req)).await?;
    let taken: SnapshotView = decode(resp, &node).await?;
    Ok(Some(restore(taken.id)))
}

/// For a new VPS from a snapshot: the source must be the caller's VPS;
/// the new one goes to any node (the snapshot comes from the host's parked
/// copy, or from the node that keeps it), and `latest` is fixed to a
/// concrete id now.
pub async fn resolve_source(
    state: &HostState,
    p: &Principal,
    spec: &mut TaskSpec,
) -> Result<(), ApiError> {
    let ImageSource::Snapshot { vps, snapshot } = &spec.image else {
        return Ok(());
    };
    if spec.kind != Kind::Vps {
        return Err(ApiError::BadRequest(
            "image.snapshot: only a VPS can start from a snapshot".into(),
        ));
    }
    let source = visible_task(state, p, *vps)
        .await
        .map_err(|_| ApiError::NotFound(format!("image.snapshot: no VPS {vps}")))?;
    if source.spec.is_vm() {
        return Err(ApiError::BadRequest(format!(
            "image.snapshot: VPS {vps} is a VM; a new VPS from a VM's snapshot is not built yet (restore it in place: `rivernode vps restart {vps} --from-snapshot ID`)"
        )));
    }
    // The snapshots the host keeps of a stopped, parked VPS go to any
    // node, also while the source's own is gone: the new VPS's node
    // fetches the one it starts from here.
    let parked = super::parked::record(state, *vps)
        .filter(|r| source.parked.as_deref() == Some(r.snapshot.as_str()))
        .and_then(|r| {
            let all = r.all_snapshots();
            match snapshot.as_str() {
                "latest" => all.last().cloned(),
                id => all.into_iter().find(|k| k.id == id),
            }
        });
    if let Some(k) = parked {
        tracing::info!(task = vps, snapshot = %k.id, "a new VPS from the host's copy, on any node");
        spec.image = ImageSource::Snapshot {
            vps: *vps,
            snapshot: k.id,
        };
        return Ok(());
    }
    let snap = find(state, &source, snapshot).await?;
    if snap.node == "host" {
        return Err(ApiError::Conflict(format!(
            "image.snapshot: VPS {vps}'s node is offline or gone, and the host's copy of snapshot {} is not current: ask again once the node is back",
            snap.id
        )));
    }
    // Any node (or its target): one that lacks the snapshot fetches it
    // from the node that keeps it, node to node.
    tracing::info!(task = vps, snapshot = %snap.id, node = %snap.node, "a new VPS from a snapshot, on any node");
    spec.image = ImageSource::Snapshot {
        vps: *vps,
        snapshot: snap.id,
    };
    Ok(())
}

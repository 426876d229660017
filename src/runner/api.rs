//! The runner's own HTTP API (port 8001). Only the host may call it: every
//! request must carry the token the host received when this node registered.
//! Task logs and VPS snapshots.

use std::sync::{Arc, RwLock};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::api::token::hash as hash_token;
use crate::api::{ErrorBody, RunnerStatus};

/// Who may call the runner API: the hash of the host's token for this node,
/// unknown until the node has registered.
#[derive(Default)]
pub struct HostKey(RwLock<Option<String>>);

impl HostKey {
    pub fn set(&self, hash: Option<String>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = hash;
    }

    fn accepts(&self, token: &str) -> bool {
        let guard = self.0.read().unwrap_or_else(|p| p.into_inner());
        guard.as_deref() == Some(hash_token(token).as_str())
    }
}

pub struct RunnerApiState {
    pub name: String,
    pub host_key: HostKey,
    pub logs_dir: std::path::PathBuf,
    /// The task loop's context, once containerd answered.
    pub tasks: std::sync::OnceLock<Arc<super::container::TaskContext>>,
    /// Hashes of the tokens that may read /metrics, as the host last said.
    pub metrics_keys: RwLock<Vec<String>>,
    /// What /metrics says of the node: its GPUs, containerd and libvirt.
    pub node: super::metrics::NodeReadings,
    /// The host parks stopped VPS (its `park_stopped_vps`), as its last
    /// heartbeat reply said; the task loop reads it.
    pub park_stopped_vps: Arc<std::sync::atomic::AtomicBool>,
    /// The grants of moves node to node this node gave.
    pub grants: super::transfer::Grants,
}

pub fn router(state: Arc<RunnerApiState>) -> Router {
    // Prometheus scrapes with the cluster's metrics token; the host may too.
    let scrape = Router::new()
        .route("/metrics", get(super::metrics::page))
        .layer(middleware::from_fn_with_state(state.clone(), only_scrapers))
        .with_state(state.clone());
    // A node a VPS moves to reads its snapshots with the grant the host
    // gave it for them, not the host's token.
    let transfers = Router::new()
        .route(
            "/api/transfers/{id}/blobs/{digest}",
            get(super::transfer::blob),
        )
        .with_state(state.clone());
    Router::new()
        .route("/api/status", get(status))
        .route("/api/tasks/{id}/logs", get(logs))
        .route("/api/tasks/{id}/exec", get(exec))
        .route("/api/tasks/{id}/forward", get(forward))
        .route(
            "/api/vps/{id}/snapshots",
            get(list_snapshots).post(take_snapshot),
        )
        .route(
            "/api/vps/{id}/snapshots/{snapshot}",
            axum::routing::delete(delete_snapshot),
        )
        .route(
            "/api/vps/{id}/transfer",
            axum::routing::put(super::transfer::give),
        )
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such runner API route") })
        .layer(middleware::from_fn_with_state(state.clone(), only_the_host))
        .with_state(state)
        .merge(scrape)
        .merge(transfers)
}

fn bearer(req: &Request) -> Option<&str> {
    req.headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

async fn only_scrapers(
    State(state): State<Arc<RunnerApiState>>,
    req: Request,
    next: Next,
) -> Response {
    let allowed = match bearer(&req) {
        None => {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing Authorization: Bearer <token> header (the cluster's metrics token)",
            )
        }
        Some(token) => {
            let hash = hash_token(token);
            let keys = state.metrics_keys.read().unwrap_or_else(|p| p.into_inner());
            keys.contains(&hash) || state.host_key.accepts(token)
        }
    };
    if allowed {
        next.run(req).await
    } else {
        error(
            StatusCode::UNAUTHORIZED,
            "this is not the cluster's metrics token (`rivernode token metrics` makes one)",
        )
    }
}

pub(super) fn error(status: StatusCode, msg: &str) -> Response {
    (
        status,
        Json(ErrorBody {
            error: msg.to_string(),
        }),
    )
        .into_response()
}

async fn only_the_host(
    State(state): State<Arc<RunnerApiState>>,
    req: Request,
    next: Next,
) -> Response {
    match bearer(&req) {
        Some(t) if state.host_key.accepts(t) => next.run(req).await,
        Some(_) => error(
            StatusCode::UNAUTHORIZED,
            "this runner accepts only its host's token",
        ),
        None => error(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <token> header",
        ),
    }
}

/// `GET /api/tasks/{id}/exec`: a websocket carrying a command run in the
/// instance (the host relays the client's).
async fn exec(
    State(state): State<Arc<RunnerApiState>>,
    axum::extract::Path(id): axum::extract::Path<u64>,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Response {
    let Some(tasks) = state.tasks.get().cloned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "containerd is not answering on this node yet",
        );
    };
    ws.on_upgrade(move |socket| super::exec::serve(tasks, id, socket))
}

/// `GET /api/tasks/{id}/forward?port=P&proto=tcp|udp`: a websocket carrying
/// connections to a port inside the instance. What can be refused is
/// refused before the upgrade, as an HTTP error the host passes on.
async fn forward(
    State(state): State<Arc<RunnerApiState>>,
    axum::extract::Path(id): axum::extract::Path<u64>,
    q: Result<
        axum::extract::Query<crate::api::forward::ForwardQuery>,
        axum::extract::rejection::QueryRejection,
    >,
    ws: axum::extract::ws::WebSocketUpgrade,
) -> Response {
    let q = match q {
        Ok(q) => q.0,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("port, proto: {e}")),
    };
    if let Err(e) = q.check() {
        return error(StatusCode::BAD_REQUEST, &e);
    }
    let Some(tasks) = state.tasks.get().cloned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "containerd is not answering on this node yet",
        );
    };
    let cid = tasks.container_id(id);
    let not_running = || {
        error(
            StatusCode::CONFLICT,
            &format!("task {id} has no running instance on this node"),
        )
    };
    let pid = match tasks.ctd.running_pid(&cid).await {
        Ok(Some(pid)) => pid,
        Ok(None) => return not_running(),
        Err(e) => {
            return error(
                StatusCode::BAD_GATEWAY,
                &format!("containerd: {}", crate::error_chain(&e)),
            )
        }
    };
    let pidfd = match super::forward::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(_) => return not_running(),
    };
    // The pid was the instance's when asked; still so now that the pidfd
    // holds it, or it was reused by another process in between.
    if !matches!(tasks.ctd.running_pid(&cid).await, Ok(Some(p)) if p == pid) {
        return not_running();
    }
    ws.on_upgrade(move |socket| super::forward::serve(id, pidfd, q, socket))
}

async fn status(State(state): State<Arc<RunnerApiState>>) -> Json<RunnerStatus> {
    Json(RunnerStatus {
        name: state.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    })
}

#[derive(serde::Deserialize)]
struct LogsQuery {
    stream: Option<String>,
    offset: Option<u64>,
}

/// At most this much of a log per request; clients continue from `x-next-offset`.
const LOG_CHUNK: u64 = 1 << 20;

async fn logs(
    State(state): State<Arc<RunnerApiState>>,
    axum::extract::Path(id): axum::extract::Path<u64>,
    axum::extract::Query(q): axum::extract::Query<LogsQuery>,
) -> Response {
    use std::io::{Read, Seek, SeekFrom};
    let stream = q.stream.unwrap_or_else(|| "stdout".into());
    if !crate::api::LOG_STREAMS.contains(&stream.as_str()) {
        return error(
            StatusCode::BAD_REQUEST,
            "stream must be stdout, stderr, onstart.stdout or onstart.stderr",
        );
    }
    let path = state.logs_dir.join(format!("task-{id}.{stream}"));
    let offset = q.offset.unwrap_or(0);
    let read = tokio::task::spawn_blocking(move || -> std::io::Result<(Vec<u8>, u64)> {
        let mut f = std::fs::File::open(&path)?;
        let len = f.metadata()?.len();
        let start = offset.min(len);
        f.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        f.take(LOG_CHUNK).read_to_end(&mut buf)?;
        let next = start + buf.len() as u64;
        Ok((buf, next))
    })
    .await;
    match read {
        Ok(Ok((buf, next))) => {
            let mut resp = buf.into_response();
            if let Ok(v) = next.to_string().parse() {
                resp.headers_mut().insert("x-next-offset", v);
            }
            resp
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            error(StatusCode::NOT_FOUND, "no such log")
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn snapshot_error(e: super::snapshots::SnapshotError) -> Response {
    use super::snapshots::SnapshotError as E;
    let status = match &e {
        E::NoContainer(_) | E::NoSnapshot { .. } | E::Vanished { .. } => StatusCode::NOT_FOUND,
        E::MessageTooLong => StatusCode::BAD_REQUEST,
        E::VmBusy(_) | E::VmJob(_) => StatusCode::CONFLICT,
        E::Oci(_) | E::Vm(_) | E::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, &crate::error_chain(&e))
}

fn no_tasks() -> Response {
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "this runner has no containerd connection yet",
    )
}

async fn list_snapshots(
    State(state): State<Arc<RunnerApiState>>,
    axum::extract::Path(id): axum::extract::Path<u64>,
) -> Response {
    let Some(ctx) = state.tasks.get().cloned() else {
        return no_tasks();
    };
    match ctx.snapshots(id).await {
        Ok(list) => Json(list).into_response(),
        Err(e) => snapshot_error(e),
    }
}

async fn take_snapshot(
    State(state): State<Arc<RunnerApiState>>,
    axum::extract::Path(id): axum::extract::Path<u64>,
    Json(req): Json<crate::api::SnapshotRequest>,
) -> Response {
    let Some(ctx) = state.tasks.get().cloned() else {
        return no_tasks();
    };
    // Its own task: a caller that goes away must not cancel a commit
    // halfway (with the VPS frozen and a lease held).
    let taken = tokio::spawn(async move {
        let taken = ctx.take_snapshot(id, req.message.as_deref()).await?;
        // A stopped, parked VPS's new snapshot follows it too. The snapshot
        // is taken all the same when that fails: it is on this node.
        if let Err(e) = ctx.park_again(id).await {
            tracing::warn!(task = id, snapshot = %taken.id, error = %crate::error_chain(&e), "the new snapshot is not on the host: it is parked with the VPS's next stop");
        }
        Ok(taken)
    });
    match taken.await {
        Ok(Ok(s)) => (StatusCode::CREATED, Json(s)).into_response(),
        Ok(Err(e)) => snapshot_error(e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn delete_snapshot(
    State(state): State<Arc<RunnerApiState>>,
    axum::extract::Path((id, snapshot)): axum::extract::Path<(u64, String)>,
) -> Response {
    let Some(ctx) = state.tasks.get().cloned() else {
        return no_tasks();
    };
    match ctx.delete_snapshot(id, &snapshot).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => snapshot_error(e),
    }
}

//! Task routes of the host API: submit, list, status, kill/pause/resume and
//! logs for admins; assignments (long-poll) and reports for runners; and the
//! scheduler loop that places queued work when something changes.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use serde::Deserialize;

use super::api::{ApiError, ApiJson, ApiQuery};
use super::auth::{Principal, Role};
use super::HostState;
use crate::api::{Assignments, Desired, SubmitResponse, TaskReport, TaskSpec, TaskState, TaskView};

/// Routes for people: the admin sees and controls every task, a user only
/// their own (another user's task answers 404, as if it did not exist);
/// operators and viewers see every task, operators also stop and start
/// them (`Principal::may_see`, `may_operate`).
pub fn user_routes() -> Router<Arc<HostState>> {
    Router::new()
        .route("/api/tasks", get(list))
        .route("/api/tasks/{id}", get(status))
        .route("/api/tasks/{id}/exec", get(super::exec::exec))
        .route("/api/tasks/{id}/forward", get(super::exec::forward))
        .route(
            "/api/tasks/{id}/kill",
            post(|s, who, id| desire(s, who, id, Desired::Killed)),
        )
        .route(
            "/api/tasks/{id}/delete",
            post(|s, who, id| desire(s, who, id, Desired::Deleted)),
        )
        .route(
            "/api/tasks/{id}/pause",
            post(|s, who, id| desire(s, who, id, Desired::Paused)),
        )
        .route(
            "/api/tasks/{id}/resume",
            post(|s, who, id| desire(s, who, id, Desired::Running)),
        )
        .route(
            "/api/tasks/{id}/stop",
            post(|s, who, id| desire(s, who, id, Desired::Stopped)),
        )
        .route("/api/tasks/{id}/logs", get(logs))
        .route("/api/environments", get(environments))
        .merge(super::snapshots::routes())
}

/// Routes for those who may submit work (people, but not viewers).
pub fn submit_routes() -> Router<Arc<HostState>> {
    Router::new().route("/api/tasks", post(submit))
}

/// Routes for operators and the admin: deciding on requests that wait for approval.
pub fn operator_routes() -> Router<Arc<HostState>> {
    Router::new()
        .route("/api/tasks/{id}/approve", post(approve))
        .route("/api/tasks/{id}/reject", post(reject))
        .route("/api/tasks/{id}/idle-exempt", post(idle_exempt))
}

/// Environments: `SHARED_DIR/environments/<name>.tar`.
async fn environments(
    State(state): State<Arc<HostState>>,
) -> Result<Json<crate::api::Environments>, ApiError> {
    let dir = state.shared_dir.join("environments");
    let mut list = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = name.strip_suffix(".tar") else {
                continue;
            };
            let meta = e.metadata().ok();
            list.push(crate::api::Environment {
                name: stem.to_string(),
                size_bytes: meta.as_ref().map(|m| m.len()).unwrap_or(0),
            });
        }
    }
    list.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(crate::api::Environments {
        shared_dir: state.shared_dir.display().to_string(),
        environments: list,
        default: state.default_environment.clone(),
        default_vm_image: state.default_vm_image.clone(),
    }))
}

pub fn node_routes() -> Router<Arc<HostState>> {
    Router::new()
        .route("/api/nodes/{name}/assignments", get(assignments))
        .route("/api/nodes/{name}/tasks/{id}", put(report))
        .route("/api/nodes/{name}/tasks/{id}/progress", put(progress))
        .route("/api/nodes/{name}/tasks/{id}/expose", put(expose))
        .route("/api/nodes/{name}/tasks/{id}/self", post(instance_self))
}

/// Places queued tasks whenever something may have freed or added room, and
/// at least every second (nodes come back online, heartbeats change state).
pub async fn scheduler_loop(state: Arc<HostState>) {
    loop {
        let _ = tokio::time::timeout(Duration::from_secs(1), state.schedule.notified()).await;
        match schedule_pass(&state).await {
            Ok(placed) if !placed.is_empty() => {
                tracing::info!(?placed, "tasks placed");
                state.publish().await;
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %crate::error_chain(&e), "scheduling failed"),
        }
    }
}

/// One scheduling pass, timed for /metrics with the waits of what it placed.
async fn schedule_pass(state: &HostState) -> Result<Vec<u64>, ApiError> {
    let started = std::time::Instant::now();
    let placed = state.blocking(|s| s.schedule()).await?;
    state.metrics.schedule_pass(started.elapsed().as_secs_f64());
    if !placed.is_empty() {
        placement_waits(state, placed.clone()).await;
    }
    Ok(placed)
}

/// Records how long each task placed for the first time waited since it
/// was submitted (a restart's wait is not a placement's).
async fn placement_waits(state: &HostState, placed: Vec<u64>) {
    let now = crate::now_unix_ms();
    let found = state
        .blocking(move |s| {
            placed
                .iter()
                .map(|id| s.get_task(*id))
                .collect::<Result<Vec<_>, _>>()
        })
        .await;
    for t in found.unwrap_or_default().into_iter().flatten() {
        if t.started_at_unix_ms.is_none() {
            let waited = (now - t.submitted_at_unix_ms).max(0) as f64 / 1000.0;
            state.metrics.placed_after(waited);
        }
    }
}

/// Whether `p` may have privileged instances: the operator allows them,
/// to the admin, and to the users `privileged_users` names (F13).
pub(super) fn may_be_privileged(state: &HostState, p: &Principal) -> Result<(), ApiError> {
    privileged_right(state.allow_privileged, &state.privileged_users, p)
}

/// `may_be_privileged` of the settings `allow` and `listed_users`.
fn privileged_right(allow: bool, listed_users: &[String], p: &Principal) -> Result<(), ApiError> {
    if !allow {
        return Err(ApiError::BadRequest(
            "privileged: this cluster does not allow privileged instances (the operator can set allow_privileged = true in host.toml)".into(),
        ));
    }
    let listed = p.user.as_ref().is_some_and(|u| listed_users.contains(u));
    if p.role == Role::Admin || listed {
        Ok(())
    } else {
        Err(ApiError::Forbidden(
            "privileged: only the admin, and the users privileged_users names, may ask for privileged instances (they own their node)".into(),
        ))
    }
}

/// `--launch jupyter`: port 8080 published (unless the request has it).
fn jupyter_port(spec: &mut TaskSpec) -> Result<(), ApiError> {
    if !spec.jupyter {
        return Ok(());
    }
    if spec.kind != crate::api::Kind::Vps || spec.no_ssh || spec.is_vm() {
        return Err(ApiError::BadRequest(
            "jupyter: Jupyter mode is for a container VPS with SSH (--launch jupyter without --no-ssh)".into(),
        ));
    }
    let tcp = crate::api::ports::PortRequest {
        port: crate::api::ports::JUPYTER_PORT,
        proto: crate::api::ports::Proto::Tcp,
    };
    if !spec.ports.contains(&tcp) {
        spec.ports.push(tcp);
    }
    Ok(())
}

/// `--launch jupyter`: its token, once the variables are all in (the
/// request's, then the owner's): a new one unless they name one, and
/// never an empty one (Jupyter would take no token at all, on a public port).
fn jupyter_token(spec: &mut TaskSpec) -> Result<(), ApiError> {
    if !spec.jupyter {
        return Ok(());
    }
    let token = spec
        .env
        .entry("JUPYTER_TOKEN".into())
        .or_insert_with(|| super::auth::generate_token("jpy"));
    if token.trim().is_empty() {
        return Err(ApiError::BadRequest(
            "env: JUPYTER_TOKEN is empty: Jupyter would let anyone in; leave it out for a generated one".into(),
        ));
    }
    Ok(())
}

/// A container VPS's `CONTAINER_API_KEY`, always made here: one the request
/// or the owner's variables named would be known beyond the instance. None
/// for a VM (its guest takes no variables) or a command.
fn instance_key(spec: &mut TaskSpec) -> Result<(), ApiError> {
    use crate::api::instance_key::{generate, KEY_VAR};
    if spec.env.contains_key(KEY_VAR) {
        return Err(ApiError::BadRequest(format!(
            "env: {KEY_VAR} is made by rivernode for each VPS; leave it out (if it is one of your own variables: `rivernode user env unset {KEY_VAR}`)"
        )));
    }
    if spec.kind == crate::api::Kind::Vps && !spec.is_vm() {
        spec.env.insert(KEY_VAR.into(), generate());
    }
    Ok(())
}

/// The most an onstart script may hold.
const MAX_ONSTART: usize = 64 << 10;

fn check_spec(spec: &TaskSpec) -> Result<(), ApiError> {
    if let Some(script) = &spec.onstart {
        let why = if spec.kind != crate::api::Kind::Vps {
            Some("only a VPS runs an onstart script (a task's command is its script)".to_string())
        } else if spec.no_ssh {
            Some("a --no-ssh VPS runs its own command, not an onstart script".to_string())
        } else if script.len() > MAX_ONSTART {
            Some(format!("{} bytes; at most {MAX_ONSTART}", script.len()))
        } else if script.contains('\0') || script.trim().is_empty() {
            Some("empty, or holds a NUL byte".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            return Err(ApiError::BadRequest(format!("onstart: {why}")));
        }
    }
    if !spec.ports.is_empty() {
        if spec.no_network {
            return Err(ApiError::BadRequest(
                "ports: a task without a network (--network none) publishes nothing".into(),
            ));
        }
        crate::api::ports::check_requests(&spec.ports).map_err(ApiError::BadRequest)?;
        if spec.ports.iter().any(|r| spec.asks_for_our_ssh(r)) {
            return Err(ApiError::BadRequest(
                "ports: 22 is the VPS's SSH server, reached through the host's proxy (rivernode ssh ID), never published to anyone".into(),
            ));
        }
    }
    let runs_its_image = spec.no_ssh && spec.command.is_empty();
    if !spec.args.is_empty() && !runs_its_image {
        return Err(ApiError::BadRequest(
            "args: arguments of the image's entrypoint, for a --no-ssh VPS that runs its image (--launch entrypoint); a command after -- replaces it whole".into(),
        ));
    }
    match (spec.shm_bytes, spec.memory_bytes) {
        (Some(0), _) => {
            return Err(ApiError::BadRequest(
                "shm_bytes: must be more than 0".into(),
            ))
        }
        (Some(shm), Some(mem)) if shm > mem => {
            return Err(ApiError::BadRequest(format!(
                "shm_bytes: {shm} is more than memory_bytes {mem}; /dev/shm counts against the memory limit"
            )))
        }
        _ => {}
    }
    if let Some(h) = &spec.ssh_password_hash {
        // A crypt(3) hash goes into passwd/shadow files: no field or line separators.
        let ok = (h.starts_with("$6$") || h.starts_with("$5$") || h.starts_with("$y$"))
            && h.len() <= 512
            && h.chars().all(|c| c.is_ascii_graphic() && c != ':');
        if !ok {
            return Err(ApiError::BadRequest(
                "ssh_password_hash: must be a crypt(3) SHA-512, SHA-256 or yescrypt hash ($6$..., $5$..., $y$...)".into(),
            ));
        }
    }
    if let Some(h) = &spec.hostname {
        if !crate::api::valid_hostname(h) {
            return Err(ApiError::BadRequest(format!(
                "hostname: {h:?} is not a hostname (letters, digits and inner hyphens, 1-63 per dot-separated part)"
            )));
        }
    }
    if spec.no_network && spec.kind == crate::api::Kind::Vps {
        return Err(ApiError::BadRequest(
            "no_network: a VPS is reached over its network; only a command task runs without one"
                .into(),
        ));
    }
    if spec.no_ssh && spec.kind == crate::api::Kind::Command {
        return Err(ApiError::BadRequest(
            "no_ssh: only a VPS has an SSH server to leave out".into(),
        ));
    }
    if spec.kind == crate::api::Kind::Vps && !spec.no_ssh && !spec.command.is_empty() {
        return Err(ApiError::BadRequest(
            "command: a VPS with SSH runs its SSH server; only a VPS without one (no_ssh) runs a command of its own".into(),
        ));
    }
    if spec.no_ssh && (spec.ssh_password_hash.is_some() || !spec.ssh_keys.is_empty()) {
        return Err(ApiError::BadRequest(
            "ssh_keys, ssh_password_hash: a VPS without SSH (no_ssh) has no SSH logins".into(),
        ));
    }
    if spec.kind == crate::api::Kind::Command
        && (spec.ssh_password_hash.is_some() || !spec.ssh_keys.is_empty())
    {
        return Err(ApiError::BadRequest(
            "ssh_keys, ssh_password_hash: only a VPS has SSH logins".into(),
        ));
    }
    for k in &spec.ssh_keys {
        if k.contains('\n') || k.contains('\r') || k.split_whitespace().count() < 2 {
            return Err(ApiError::BadRequest(format!(
                "ssh_keys: {:?} is not one public key line (type and base64 key)",
                k.chars().take(40).collect::<String>()
            )));
        }
    }
    match &spec.image {
        crate::api::ImageSource::Environment(n) if !crate::api::valid_image_name(n) => {
            return Err(ApiError::BadRequest(format!(
                "image.environment: {n:?} is not an environment name (letters, digits, '.', '_', '-')"
            )))
        }
        crate::api::ImageSource::Snapshot { snapshot, .. }
            if snapshot != "latest" && !snapshot.chars().all(|c| c.is_ascii_digit()) =>
        {
            return Err(ApiError::BadRequest(format!(
                "image.snapshot: {snapshot:?} is not a snapshot id (digits) or \"latest\""
            )))
        }
        crate::api::ImageSource::Registry(r) => {
            crate::oci::Reference::parse(r).map_err(|e| ApiError::BadRequest(format!("image.registry: {e}")))?;
        }
        _ => {}
    }
    check_vm(spec)?;
    for m in &spec.mounts {
        if !m.target.starts_with('/') || !m.source.starts_with('/') {
            return Err(ApiError::BadRequest(format!(
                "mounts: {}:{} must be two absolute paths",
                m.source, m.target
            )));
        }
    }
    check_env("env", &spec.env)
}

/// Variables as instances take them: names without `=`, and neither names
/// nor values with a line break or NUL (SSH sessions and /etc/environment
/// take one variable per line). `field` names them in the error.
pub(super) fn check_env(
    field: &str,
    env: &std::collections::BTreeMap<String, String>,
) -> Result<(), ApiError> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains(['\0', '\n', '\r']) {
            return Err(ApiError::BadRequest(format!(
                "{field}: {k:?} is not a variable name"
            )));
        }
        if v.contains(['\0', '\n', '\r']) {
            return Err(ApiError::BadRequest(format!(
                "{field}: the value of {k} holds a line break or NUL"
            )));
        }
    }
    Ok(())
}

/// What a VM VPS can be asked for, and what only containers have.
fn check_vm(spec: &TaskSpec) -> Result<(), ApiError> {
    let bad = |m: &str| Err(ApiError::BadRequest(m.to_string()));
    if !spec.is_vm() {
        if spec.vm_disk_bytes.is_some() {
            return bad("vm_disk_bytes: only a VM VPS (image.vm_image) has a disk size");
        }
        if spec.movable && spec.kind != crate::api::Kind::Vps {
            return bad("movable: only a VPS moves between nodes");
        }
        return Ok(());
    }
    if let crate::api::ImageSource::VmImage(n) = &spec.image {
        if !crate::api::valid_image_name(n) {
            return Err(ApiError::BadRequest(format!(
                "image.vm_image: {n:?} is not an image name (letters, digits, '.', '_', '-')"
            )));
        }
    }
    if spec.kind != crate::api::Kind::Vps {
        return bad("image.vm_image: only a VPS can be a VM (vps create --backend vm)");
    }
    if spec.no_ssh {
        return bad("no_ssh: a VM VPS is reached over SSH; --no-ssh is for container VPS");
    }
    if spec.movable {
        return bad(
            "movable: a VM VPS does not move between nodes yet; --movable is for container VPS",
        );
    }
    if spec.privileged
        || spec.shm_bytes.is_some()
        || !spec.mounts.is_empty()
        || !spec.env.is_empty()
        || spec.onstart.is_some()
    {
        return bad(
            "privileged, shm_bytes, mounts, env, onstart: container settings; a VM VPS takes none of them",
        );
    }
    if !spec.ports.is_empty() {
        return bad(
            "ports: published ports are not built for VM VPS yet; use rivernode forward ID PORT",
        );
    }
    if spec.hostname.is_some() {
        return bad("hostname: --hostname is for containers (a VM is named by its node)");
    }
    if spec.cores == 0 {
        return bad("cores: a VM needs at least one core of its own (each vCPU is pinned to one)");
    }
    if spec.memory_bytes.is_some_and(|m| m < VM_MIN_MEMORY) {
        return Err(ApiError::BadRequest(format!(
            "memory_bytes: a VM needs at least {} MiB",
            VM_MIN_MEMORY >> 20
        )));
    }
    if spec.vm_disk_bytes == Some(0) {
        return bad("vm_disk_bytes: must be more than 0");
    }
    Ok(())
}

/// The least memory a VM is given: a kernel and an SSH server.
const VM_MIN_MEMORY: u64 = 128 << 20;

/// What a task looks like from outside: a password hash stays on the host
/// and the runner, and readers learn only that a password is set.
pub(super) fn redacted(mut t: TaskView) -> TaskView {
    if t.spec.ssh_password_hash.is_some() {
        t.spec.ssh_password_hash = Some(REDACTED.into());
    }
    t
}

/// `redacted`, with how far its node got making it while that lasts; the
/// word of a task that is made (or ended) is forgotten here. Someone who
/// sees the task without owning it (an operator, a viewer) learns which
/// variables it has and that it has an onstart script, not what they say.
pub(super) fn outward(state: &HostState, p: &Principal, t: TaskView) -> TaskView {
    let mut t = redacted(t);
    if !p.may_use(t.owner.as_deref()) {
        for v in t.spec.env.values_mut() {
            *v = REDACTED.into();
        }
        if t.spec.onstart.is_some() {
            t.spec.onstart = Some(REDACTED.into());
        }
    }
    let mut all = state.progress.lock().unwrap_or_else(|e| e.into_inner());
    if t.state == TaskState::Assigning {
        t.progress = all.get(&t.id).cloned();
    } else {
        all.remove(&t.id);
    }
    t
}

const REDACTED: &str = "(set)";

/// The principal a task runs for: its owner, or the admin.
fn owner_of(t: &TaskView) -> Principal {
    Principal {
        role: if t.owner.is_some() {
            Role::User
        } else {
            Role::Admin
        },
        node: None,
        user: t.owner.clone(),
    }
}

/// A privileged task runs again (restart, resume) only while the cluster
/// still allows privileged instances to its owner: whoever asks for the
/// restart (its owner, an operator, the admin), the right is the owner's.
pub(super) fn still_allowed(state: &HostState, t: &TaskView) -> Result<(), ApiError> {
    if t.spec.privileged {
        may_be_privileged(state, &owner_of(t)).map_err(|_| {
            ApiError::BadRequest(format!(
                "privileged: task {} is privileged and this cluster no longer allows that for its owner",
                t.id
            ))
        })?;
    }
    Ok(())
}

/// The task `id` if `p` may see it (`Principal::may_see`: operators and
/// viewers see every task); 404 otherwise.
pub async fn seen_task(state: &HostState, p: &Principal, id: u64) -> Result<TaskView, ApiError> {
    task_if(state, id, |owner| p.may_see(owner)).await
}

/// Task `id` if `allowed` says yes for its owner; the same 404 otherwise.
async fn task_if(
    state: &HostState,
    id: u64,
    allowed: impl Fn(Option<&str>) -> bool,
) -> Result<TaskView, ApiError> {
    let t = state.blocking(move |s| s.get_task(id)).await?;
    t.filter(|t| allowed(t.owner.as_deref()))
        .ok_or_else(|| no_task(id))
}

/// The task `id` if `p` may stop, kill, pause, resume or restart it; 404
/// if `p` may not even see it, 403 if only see it.
pub async fn operated_task(
    state: &HostState,
    p: &Principal,
    id: u64,
) -> Result<TaskView, ApiError> {
    let t = seen_task(state, p, id).await?;
    if !p.may_operate(t.owner.as_deref()) {
        return Err(ApiError::Forbidden(format!(
            "a {} token may look at task {id} but not change it",
            p.role.as_str()
        )));
    }
    Ok(t)
}

fn no_task(id: u64) -> ApiError {
    ApiError::NotFound(format!(
        "no task {id}; `rivernode task list` shows the tasks"
    ))
}

/// The task `id` if `p` may use it in every way (`Principal::may_use`);
/// 404 otherwise.
pub async fn visible_task(state: &HostState, p: &Principal, id: u64) -> Result<TaskView, ApiError> {
    task_if(state, id, |owner| p.may_use(owner)).await
}

/// Who decided, as the owner of a request reads it.
fn decider(p: &Principal) -> String {
    p.user.clone().unwrap_or_else(|| "the admin".into())
}

async fn submit(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    ApiJson(mut spec): ApiJson<TaskSpec>,
) -> Result<(StatusCode, Json<SubmitResponse>), ApiError> {
    jupyter_port(&mut spec)?;
    check_spec(&spec)?;
    if spec.privileged {
        may_be_privileged(&state, &p)?;
    }
    if p.role == Role::Viewer {
        return Err(ApiError::Forbidden(
            "a viewer token reads the cluster and submits nothing; ask the admin for a user token"
                .into(),
        ));
    }
    if p.role != Role::Admin && !spec.mounts.is_empty() {
        // A node path in a container is the node's files in a tenant's hands.
        return Err(ApiError::Forbidden(
            "mounts: only the admin may mount node paths into tasks".into(),
        ));
    }
    if spec.restore.is_some() {
        return Err(ApiError::BadRequest(
            "restore: set by the host on `restart --from-snapshot`, not on submit".into(),
        ));
    }
    super::snapshots::resolve_source(&state, &p, &mut spec).await?;
    if let crate::api::ImageSource::Environment(name) = &spec.image {
        let archive = state
            .shared_dir
            .join("environments")
            .join(format!("{name}.tar"));
        if !archive.is_file() {
            return Err(ApiError::BadRequest(format!(
                "image.environment: no environment named {name:?} ({} does not exist; `rivernode env list` shows the environments)",
                archive.display()
            )));
        }
    }
    if let crate::api::ImageSource::VmImage(name) = &spec.image {
        let image = state
            .shared_dir
            .join("vm-images")
            .join(format!("{name}.qcow2"));
        if !image.is_file() {
            return Err(ApiError::BadRequest(format!(
                "image.vm_image: no VM image named {name:?} ({} does not exist; `rivernode vm image list` shows the images)",
                image.display()
            )));
        }
    }
    let owner = p.owner();
    // The owner's own variables, under what this request sets (a VM takes none).
    if let (Some(user), false) = (owner.clone(), spec.is_vm()) {
        let theirs = state.blocking(move |s| s.user_env(&user)).await?;
        for (k, v) in theirs.unwrap_or_default() {
            spec.env.entry(k).or_insert(v);
        }
    }
    jupyter_token(&mut spec)?;
    instance_key(&mut spec)?;
    let now = crate::now_unix_ms();
    let cap = state.max_waiting_per_user;
    let approval = state.approval.needs_approval(p.role, &spec);
    let id = state
        .blocking(move |s| s.submit_task_capped(&spec, owner.as_deref(), cap, approval, now))
        .await?;
    // Place it now if it fits, so the answer says where (or why it waits).
    schedule_pass(&state).await?;
    state.publish().await;
    let t = state
        .blocking(move |s| s.get_task(id))
        .await?
        .ok_or(ApiError::Internal(format!("task {id} vanished")))?;
    tracing::info!(task = id, state = %t.state, reason = %t.reason, "task submitted");
    Ok((
        StatusCode::CREATED,
        Json(SubmitResponse {
            id,
            state: t.state,
            reason: t.reason,
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    node: Option<String>,
}

async fn list(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<Vec<TaskView>>, ApiError> {
    let st = q
        .state
        .map(|s| {
            s.parse::<TaskState>()
                .map_err(|e| ApiError::BadRequest(format!("state: {e}")))
        })
        .transpose()?;
    // A user lists their own tasks (an owner filter of "" matches none);
    // operators, viewers and the admin list everyone's.
    let owner = match p.role {
        Role::User => Some(p.user.clone().unwrap_or_default()),
        _ => None,
    };
    Ok(Json(
        state
            .blocking(move |s| s.list_tasks(st, q.node.as_deref(), owner.as_deref()))
            .await?
            .into_iter()
            .map(|t| outward(&state, &p, t))
            .collect(),
    ))
}

async fn status(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<u64>,
) -> Result<Json<TaskView>, ApiError> {
    seen_task(&state, &p, id)
        .await
        .map(|t| Json(outward(&state, &p, t)))
}

async fn desire(
    state: State<Arc<HostState>>,
    p: Extension<Principal>,
    Path(id): Path<u64>,
    d: Desired,
) -> Result<Json<TaskView>, ApiError> {
    // A delete takes the instance's disk and snapshots: its owner's (and the
    // admin's) alone. Stopping, starting and killing are operators' too.
    let t = if d == Desired::Deleted {
        visible_task(&state, &p, id).await?
    } else {
        operated_task(&state, &p, id).await?
    };
    if d == Desired::Running {
        still_allowed(&state, &t)?;
    }
    let now = crate::now_unix_ms();
    let t = state.blocking(move |s| s.set_desired(id, d, now)).await?;
    // Deleted at once (it was on no node): its parked copy goes now.
    if t.state == TaskState::Deleted {
        super::parked::forget(&state, id);
    }
    state.publish().await;
    state.schedule.notify_one();
    // An operator acting on someone's task learns no more than it shows them.
    Ok(Json(outward(&state, &p, t)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    stream: Option<String>,
    offset: Option<u64>,
}

/// Reads a task's log from the runner of its node (the host keeps no copies).
async fn logs(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<u64>,
    ApiQuery(q): ApiQuery<LogsQuery>,
) -> Result<(HeaderMap, Bytes), ApiError> {
    let stream = q.stream.unwrap_or_else(|| "stdout".into());
    if !crate::api::LOG_STREAMS.contains(&stream.as_str()) {
        return Err(ApiError::BadRequest(format!(
            "stream: {stream:?} is not one of {}",
            crate::api::LOG_STREAMS.join(", ")
        )));
    }
    let t = visible_task(&state, &p, id).await?;
    let Some(p) = t.placement else {
        return Err(ApiError::Conflict(format!(
            "task {id} has not started: {}",
            t.reason
        )));
    };
    let node = p.node.clone();
    let (url, token) = state
        .blocking(move |s| s.runner_access(&node))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("node {:?} of task {id} is gone", p.node)))?;
    let client = crate::api::runner_client::RunnerClient {
        http: &state.http,
        node: &p.node,
        url: &url,
        token: &token,
    };
    let query = [
        ("stream", stream.clone()),
        ("offset", q.offset.unwrap_or(0).to_string()),
    ];
    let resp = client
        .call(
            reqwest::Method::GET,
            &format!("/api/tasks/{id}/logs"),
            &query,
            None::<&()>,
            Duration::from_secs(30),
        )
        .await
        .map_err(|e| match e {
            crate::api::runner_client::RunnerCallError::Answered { status, .. }
                if status == reqwest::StatusCode::NOT_FOUND =>
            {
                ApiError::NotFound(format!("no logs for task {id} on {:?}", p.node))
            }
            other => ApiError::BadGateway(crate::error_chain(&other)),
        })?;
    let mut headers = HeaderMap::new();
    if let Some(v) = resp.headers().get("x-next-offset").cloned() {
        headers.insert("x-next-offset", v);
    }
    headers.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    let body = resp
        .bytes()
        .await
        .map_err(|e| ApiError::BadGateway(format!("reading logs from the runner: {e}")))?;
    Ok((headers, body))
}

/// A node that has a VPS's image asks for its `EXPOSE`d ports to be
/// published; the answer is the VPS's placement with them.
async fn expose(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path((name, id)): Path<(String, u64)>,
    ApiJson(req): ApiJson<crate::api::ports::ExposeRequest>,
) -> Result<Json<crate::api::Placement>, ApiError> {
    own_node(&p, &name)?;
    if req.ports.len() > 4096 {
        return Err(ApiError::BadRequest("ports: too many".into()));
    }
    for r in &req.ports {
        r.check()
            .map_err(|e| ApiError::BadRequest(format!("ports: {e}")))?;
        if r.is_identity() {
            return Err(ApiError::BadRequest(format!(
                "ports: {r} is an identity request; an image exposes real ports"
            )));
        }
    }
    let placement = state
        .blocking(move |s| s.expose(&name, id, &req.ports))
        .await?;
    state.publish().await;
    Ok(Json(placement))
}

/// `rivernode approve ID`: the request is queued, to be placed.
async fn approve(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<u64>,
) -> Result<Json<TaskView>, ApiError> {
    let by = decider(&p);
    let t = state.blocking(move |s| s.approve(id, &by)).await?;
    tracing::info!(task = id, by = ?p.user, "request approved");
    state.publish().await;
    state.schedule.notify_one();
    Ok(Json(outward(&state, &p, t)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ExemptRequest {
    exempt: bool,
}

/// `rivernode vps exempt ID [--undo]`: a VPS whose idle GPUs are never
/// reclaimed (a long job's setup, a demo), or no longer.
async fn idle_exempt(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<u64>,
    ApiJson(req): ApiJson<ExemptRequest>,
) -> Result<Json<TaskView>, ApiError> {
    let t = state
        .blocking(move |s| s.set_idle_exempt(id, req.exempt))
        .await?;
    tracing::info!(task = id, by = ?p.user, exempt = req.exempt, "idle-GPU exemption");
    state.publish().await;
    Ok(Json(outward(&state, &p, t)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RejectRequest {
    reason: String,
}

/// `rivernode reject ID --reason ...`: the request ends, and its owner reads why.
async fn reject(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<u64>,
    ApiJson(req): ApiJson<RejectRequest>,
) -> Result<Json<TaskView>, ApiError> {
    let reason: String = req.reason.chars().filter(|c| !c.is_control()).collect();
    let reason = reason.trim().to_string();
    if reason.is_empty() || reason.len() > 1000 {
        return Err(ApiError::BadRequest(
            "reason: say why, in at most 1000 bytes; its owner reads it".into(),
        ));
    }
    let by = decider(&p);
    let now = crate::now_unix_ms();
    let t = state
        .blocking(move |s| s.reject(id, &by, &reason, now))
        .await?;
    tracing::info!(task = id, by = ?p.user, "request rejected");
    state.publish().await;
    Ok(Json(outward(&state, &p, t)))
}

/// What an instance asks of itself with its `CONTAINER_API_KEY`, handed on
/// by its runner (which named the instance by its address): the key must be
/// this instance's, and it acts on this instance only.
async fn instance_self(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path((name, id)): Path<(String, u64)>,
    body: Bytes,
) -> Result<Json<TaskView>, ApiError> {
    use crate::api::instance_key::{matches, SelfAction, SelfRequest, KEY_VAR};
    // Who calls is checked before what is asked: a stranger learns nothing.
    own_node(&p, &name)?;
    let req: SelfRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?;
    let t = state
        .blocking(move |s| s.get_task(id))
        .await?
        .filter(|t| t.placement.as_ref().is_some_and(|pl| pl.node == name))
        .filter(|t| t.state != TaskState::Deleted)
        .ok_or_else(|| ApiError::NotFound(format!("no instance {id} on this node")))?;
    if !matches(&t.spec, &req.key) {
        // 403, not 401: a 401 would read as the node's credential refused.
        return Err(ApiError::Forbidden(format!(
            "key: not the {KEY_VAR} of instance {id}"
        )));
    }
    let desired = match req.action {
        SelfAction::Show => return Ok(Json(redacted(t))),
        SelfAction::Stop => Desired::Stopped,
        SelfAction::Destroy => Desired::Deleted,
        // Only a running instance can ask: starting it again is asking for
        // what is; a privileged one that lost the right keeps what it has.
        SelfAction::Start if t.desired == Desired::Running => return Ok(Json(redacted(t))),
        SelfAction::Start => {
            if t.spec.privileged {
                return Err(ApiError::Forbidden(format!(
                    "instance {id} is privileged: its owner starts it"
                )));
            }
            Desired::Running
        }
    };
    let now = crate::now_unix_ms();
    let t = state
        .blocking(move |s| s.set_desired(id, desired, now))
        .await?;
    tracing::info!(task = id, action = ?req.action, "an instance acted on itself with its key");
    state.publish().await;
    state.schedule.notify_one();
    Ok(Json(redacted(t)))
}

/// A node's word on how far it got making one of its tasks; kept only
/// while the task is being made there.
async fn progress(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path((name, id)): Path<(String, u64)>,
    ApiJson(mut progress): ApiJson<crate::api::TaskProgress>,
) -> Result<StatusCode, ApiError> {
    own_node(&p, &name)?;
    // Shown on users' terminals: short, and no control characters.
    for text in [&mut progress.phase, &mut progress.what] {
        *text = text.chars().filter(|c| !c.is_control()).take(200).collect();
    }
    let placed_here = move |s: &dyn super::store::Store| {
        Ok(s.get_task(id)?
            .filter(|t| t.placement.as_ref().is_some_and(|pl| pl.node == name))
            .map(|t| t.state))
    };
    let Some(before) = state.blocking(placed_here.clone()).await? else {
        return Err(ApiError::NotFound(format!("no task {id} on this node")));
    };
    let being_made = |s: Option<TaskState>| s == Some(TaskState::Assigning);
    {
        let mut all = state.progress.lock().unwrap_or_else(|e| e.into_inner());
        // One entry per task being made; the cap only guards the host's memory.
        if being_made(Some(before)) && (all.len() < MAX_PROGRESS || all.contains_key(&id)) {
            all.insert(id, progress);
        } else {
            all.remove(&id);
        }
    }
    // A report may have come between the read and the insert: read again.
    if !being_made(state.blocking(placed_here).await?) {
        let mut all = state.progress.lock().unwrap_or_else(|e| e.into_inner());
        all.remove(&id);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The most tasks the host keeps progress of at once.
const MAX_PROGRESS: usize = 10_000;

pub(super) fn own_node(p: &Principal, name: &str) -> Result<(), ApiError> {
    if p.node.as_deref() == Some(name) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "this credential is not for node {name:?}"
        )))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignmentsQuery {
    /// Answer only once the revision is past this one (long-poll).
    after: Option<u64>,
    /// How long to hold the request, in milliseconds (at most 60 s).
    wait_ms: Option<u64>,
}

async fn assignments(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<AssignmentsQuery>,
) -> Result<Json<Assignments>, ApiError> {
    own_node(&p, &name)?;
    if let Some(after) = q.after {
        let mut rx = state.revision.subscribe();
        let wait = Duration::from_millis(q.wait_ms.unwrap_or(30_000).min(60_000));
        let _ = tokio::time::timeout(wait, rx.wait_for(|r| *r > after)).await;
    }
    let mut a = state.blocking(move |s| s.assignments(&name)).await?;
    for t in &mut a.tasks {
        t.public_address = state.public_address.clone();
    }
    super::overlay::fill_groups(&state, &mut a.tasks).await?;
    Ok(Json(a))
}

async fn report(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path((name, id)): Path<(String, u64)>,
    ApiJson(mut r): ApiJson<TaskReport>,
) -> Result<Json<TaskView>, ApiError> {
    own_node(&p, &name)?;
    // Whatever the node says now, it parks nothing more of this stop.
    super::parked::park_ended(&state, id);
    // A stop is parked only if the host holds that very copy.
    if let Some(sid) = &r.parked {
        if super::parked::record(&state, id).is_none_or(|k| &k.snapshot != sid) {
            tracing::warn!(task = id, snapshot = %sid, "a stop reported parked that the host does not hold");
            r.parked = None;
        }
    }
    if let Some(k) = &r.ssh_host_key {
        if !crate::api::valid_ssh_host_key(k) {
            return Err(ApiError::BadRequest(
                "ssh_host_key: not one OpenSSH public key line (type and base64 key)".into(),
            ));
        }
    }
    let now = crate::now_unix_ms();
    let (before, t) = state
        .blocking(move |s| {
            let before = s.get_task(id)?.map(|t| t.state);
            Ok((before, s.report_task(&name, id, &r, now)?))
        })
        .await?;
    // Made (or failed): how far the making got is moot.
    if t.state != TaskState::Assigning {
        state
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
    if t.state == TaskState::Deleted {
        super::parked::forget(&state, id);
    }
    // A repeated report (a runner retrying after a lost answer) changes nothing.
    if before != Some(t.state) {
        tracing::info!(task = id, state = %t.state, exit_code = ?t.exit_code, "task state reported");
    }
    state.publish().await;
    if t.state.is_final() {
        state.schedule.notify_one();
    }
    Ok(Json(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Kind;

    #[test]
    fn a_privileged_restart_is_the_owners_right_whoever_asks() {
        let listed = vec!["bob".to_string()];
        let mut t: TaskView = serde_json::from_value(serde_json::json!({
            "id": 7, "state": "stopped", "desired": "stopped", "reason": "",
            "exit_code": null, "message": null, "submitted_at_unix_ms": 0,
            "started_at_unix_ms": 1, "finished_at_unix_ms": 2, "placement": null,
            "owner": "bob",
            "spec": {"command": [], "image": {"environment": "base"}, "kind": "vps", "privileged": true},
        }))
        .unwrap();
        // bob is listed: an operator (not listed) may restart his instance.
        assert!(privileged_right(true, &listed, &owner_of(&t)).is_ok());
        let olga = Principal {
            role: Role::Operator,
            node: None,
            user: Some("olga".into()),
        };
        assert!(privileged_right(true, &listed, &olga).is_err());
        // ann is not: not even the admin restarts hers privileged.
        t.owner = Some("ann".into());
        assert!(privileged_right(true, &listed, &owner_of(&t)).is_err());
        t.owner = None;
        assert!(privileged_right(true, &listed, &owner_of(&t)).is_ok());
        assert!(privileged_right(false, &listed, &owner_of(&t)).is_err());
    }

    fn spec(kind: Kind) -> TaskSpec {
        serde_json::from_value(serde_json::json!({
            "command": [],
            "image": {"environment": "base"},
            "kind": kind,
        }))
        .unwrap()
    }

    fn refusal(s: &TaskSpec) -> String {
        match check_spec(s) {
            Err(ApiError::BadRequest(m)) => m,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn a_vps_without_ssh_takes_a_command_and_no_logins() {
        let mut s = spec(Kind::Vps);
        s.no_ssh = true;
        s.command = vec!["sleep".into(), "1".into()];
        assert!(check_spec(&s).is_ok());
        s.ssh_keys = vec!["ssh-ed25519 AAAA".into()];
        assert!(refusal(&s).starts_with("ssh_keys"));
        // With SSH, its SSH server is its main process: no command.
        let mut s = spec(Kind::Vps);
        s.command = vec!["sleep".into()];
        assert!(refusal(&s).starts_with("command:"));
        // A command task has no SSH server to leave out.
        let mut s = spec(Kind::Command);
        s.command = vec!["true".into()];
        s.no_ssh = true;
        assert!(refusal(&s).starts_with("no_ssh:"));
    }

    #[test]
    fn a_container_vps_gets_a_key_of_its_own_and_none_is_taken_from_the_user() {
        use crate::api::instance_key::KEY_VAR;
        let mut s = spec(Kind::Vps);
        instance_key(&mut s).unwrap();
        let key = s.env[KEY_VAR].clone();
        assert!(key.starts_with("cak_"), "{key}");
        let mut t = spec(Kind::Vps);
        instance_key(&mut t).unwrap();
        assert_ne!(t.env[KEY_VAR], key, "each VPS its own");
        // One the request or the owner's variables name would be known to them.
        assert!(
            matches!(instance_key(&mut s), Err(ApiError::BadRequest(m)) if m.contains(KEY_VAR))
        );
        let mut c = spec(Kind::Command);
        instance_key(&mut c).unwrap();
        assert!(!c.env.contains_key(KEY_VAR), "a command has no key");
        let mut vm = spec(Kind::Vps);
        vm.image = crate::api::ImageSource::VmImage("debian".into());
        instance_key(&mut vm).unwrap();
        assert!(
            !vm.env.contains_key(KEY_VAR),
            "a VM's guest takes no variables"
        );
    }

    #[test]
    fn port_22_is_published_only_without_our_ssh_server_and_jupyter_needs_a_token() {
        use crate::api::ports::PortRequest;
        let mut s = spec(Kind::Vps);
        s.ports = vec![PortRequest::parse("22").unwrap()];
        assert!(refusal(&s).contains("22 is the VPS's SSH server"));
        s.ports = vec![PortRequest::parse("22/udp").unwrap()];
        assert!(check_spec(&s).is_ok(), "UDP 22 is not SSH");
        let mut s = spec(Kind::Vps);
        s.no_ssh = true;
        s.ports = vec![PortRequest::parse("22").unwrap()];
        assert!(check_spec(&s).is_ok(), "its own server, its choice");
        // A command publishes what it asks, 22 too (it runs no SSH server),
        // but not without a network.
        let mut s = spec(Kind::Command);
        s.command = vec!["true".into()];
        s.ports = vec![PortRequest::parse("22").unwrap()];
        assert!(check_spec(&s).is_ok());
        s.no_network = true;
        assert!(refusal(&s).starts_with("ports: a task without a network"));
        // Jupyter: a token is made, an empty one is refused, a VM gets the Jupyter reason.
        let mut s = spec(Kind::Vps);
        s.jupyter = true;
        jupyter_port(&mut s).unwrap();
        assert_eq!(s.ports, [PortRequest::parse("8080").unwrap()]);
        jupyter_token(&mut s).unwrap();
        assert!(s.env["JUPYTER_TOKEN"].len() > 20);
        s.env.insert("JUPYTER_TOKEN".into(), " ".into());
        assert!(
            matches!(jupyter_token(&mut s), Err(ApiError::BadRequest(m)) if m.contains("empty"))
        );
        let mut s = spec(Kind::Vps);
        s.jupyter = true;
        s.image = crate::api::ImageSource::VmImage("debian-12".into());
        assert!(
            matches!(jupyter_port(&mut s), Err(ApiError::BadRequest(m)) if m.starts_with("jupyter:"))
        );
    }

    #[test]
    fn a_vm_is_a_vps_with_its_own_cores_and_no_container_settings() {
        let vm = || {
            let mut s = spec(Kind::Vps);
            s.image = crate::api::ImageSource::VmImage("debian-12".into());
            s
        };
        assert!(check_spec(&vm()).is_ok());
        let mut s = vm();
        s.kind = Kind::Command;
        s.command = vec!["true".into()];
        assert!(refusal(&s).starts_with("image.vm_image: only a VPS"));
        let mut s = vm();
        s.image = crate::api::ImageSource::VmImage("../etc".into());
        assert!(refusal(&s).starts_with("image.vm_image:"));
        let mut s = vm();
        s.cores = 0;
        assert!(refusal(&s).starts_with("cores:"));
        let mut s = vm();
        s.env.insert("A".into(), "1".into());
        assert!(refusal(&s).contains("env"));
        // A VM takes GPUs as a container does (passed through whole).
        let mut s = vm();
        s.gpu_count = 1;
        assert!(check_spec(&s).is_ok());
        let mut s = vm();
        s.memory_bytes = Some(64 << 20);
        assert!(refusal(&s).starts_with("memory_bytes:"));
        let mut s = vm();
        s.no_ssh = true;
        assert!(refusal(&s).starts_with("no_ssh:"));
        // A disk size is a VM's alone.
        let mut s = spec(Kind::Vps);
        s.vm_disk_bytes = Some(1 << 30);
        assert!(refusal(&s).starts_with("vm_disk_bytes:"));
    }
}

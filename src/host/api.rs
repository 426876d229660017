//! The host's HTTP API under `/api`. Every route sits behind the bearer-token
//! middleware; handlers then check the role they need.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{middleware, Extension, Json, Router};

use super::auth::{self, generate_token, hash_token, Principal, Role};
use super::store::StoreError;
use super::HostState;
use crate::api::{
    validate_node_name, validate_user_name, ErrorBody, HeartbeatRequest, NewUser, NodeView,
    RegisterRequest, RegisterResponse, RunnerStatus, UserView, WhoAmI,
};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    TooMany(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Refused(msg) => ApiError::BadRequest(msg),
            StoreError::NoTask(id) => ApiError::NotFound(format!("no task {id}; `rivernode task list` shows the tasks")),
            StoreError::Conflict(msg) => ApiError::Conflict(msg),
            StoreError::TooMany(msg) => ApiError::TooMany(msg),
            StoreError::NodeExists(name) => ApiError::Conflict(format!(
                "node {name:?} is already registered; if this is a new machine give it another name, \
                 or remove the old entry with `rivernode node remove {name}`"
            )),
            other => ApiError::Internal(crate::error_chain(&other)),
        }
    }
}

impl From<crate::api::runner_client::RunnerCallError> for ApiError {
    fn from(e: crate::api::runner_client::RunnerCallError) -> Self {
        use crate::api::runner_client::RunnerCallError as E;
        match e {
            // The runner's own refusals are the caller's answer.
            E::Answered {
                status, message, ..
            } if status == reqwest::StatusCode::NOT_FOUND => ApiError::NotFound(message),
            E::Answered {
                status, message, ..
            } if status == reqwest::StatusCode::BAD_REQUEST => ApiError::BadRequest(message),
            other => ApiError::BadGateway(crate::error_chain(&other)),
        }
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::BadRequest(e.body_text())
    }
}

/// `Query` whose rejections are 400s naming the parameter.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError::BadRequest(e.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(msg) => {
                tracing::error!(error = %msg, "request failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let mut resp = (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                "www-authenticate",
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

/// `Json` whose rejections are 400s with our error body naming the field.
#[derive(FromRequest)]
#[from_request(via(Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

/// Routes are grouped by the role they need; the role is checked before the
/// body is read, so a wrong token never learns what a valid body looks like.
pub fn router(state: Arc<HostState>) -> Router {
    let people = Router::new()
        .merge(super::tasks::user_routes())
        .route("/api/users/{name}/token", post(rotate_user_token))
        .route(
            "/api/users/{name}/env",
            get(get_user_env).post(change_user_env),
        )
        .route("/api/quotas", get(list_quotas))
        .route_layer(middleware::from_fn(|req, next| {
            auth::require(&Principal::PEOPLE, req, next)
        }));
    // Reading the nodes: those who run the cluster or look at it.
    let readers = Router::new()
        .route("/api/nodes", get(list_nodes))
        .route("/api/nodes/{name}", get(get_node))
        .route("/api/overlay", get(super::overlay::show))
        .route_layer(middleware::from_fn(|req, next| {
            auth::require(&[Role::Admin, Role::Operator, Role::Viewer], req, next)
        }));
    // Prometheus scrapes with a metrics token; people who read the cluster may too.
    let scrapers = Router::new()
        .route("/metrics", get(super::metrics::page))
        .route_layer(middleware::from_fn(|req, next| {
            auth::require(
                &[Role::Admin, Role::Operator, Role::Viewer, Role::Metrics],
                req,
                next,
            )
        }));
    let submitters = super::tasks::submit_routes().route_layer(middleware::from_fn(|req, next| {
        auth::require(&[Role::Admin, Role::Operator, Role::User], req, next)
    }));
    let operators =
        super::tasks::operator_routes().route_layer(middleware::from_fn(|req, next| {
            auth::require(&[Role::Admin, Role::Operator], req, next)
        }));
    let admin = Router::new()
        .route("/api/invitations", post(invite).get(list_invitations))
        .route("/api/invitations/{id}", delete(revoke_invitation))
        .route("/api/quotas/{scope}/{name}", put(set_quota))
        .route("/api/users", post(add_user).get(list_users))
        .route("/api/users/{name}", delete(remove_user).put(set_person))
        .route("/api/nodes/{name}", delete(remove_node))
        .route("/api/join-token", post(rotate_join_token))
        .route("/api/metrics-token", post(rotate_metrics_token))
        .route("/api/nodes/{name}/runner", get(probe_runner))
        .route_layer(middleware::from_fn(|req, next| {
            auth::require(&[Role::Admin], req, next)
        }));
    let join = Router::new()
        .route("/api/nodes/register", post(register))
        .route_layer(middleware::from_fn(|req, next| {
            auth::require(&[Role::Join], req, next)
        }));
    let node = Router::new()
        .merge(super::tasks::node_routes())
        .merge(super::environments::node_routes())
        .merge(super::parked::node_routes())
        .route("/api/nodes/{name}/heartbeat", put(heartbeat))
        .route_layer(middleware::from_fn(auth::require_own_node))
        .route_layer(middleware::from_fn(|req, next| {
            auth::require(&[Role::Node], req, next)
        }));
    let authenticated = Router::new()
        .route("/api/whoami", get(whoami))
        .route("/api/openapi.json", get(openapi_document))
        .merge(people)
        .merge(submitters)
        .merge(readers)
        .merge(scrapers)
        .merge(operators)
        .merge(admin)
        .merge(join)
        .merge(node)
        .fallback(|| async { ApiError::NotFound("no such API route".into()) })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    // An invitation's code is its own credential, checked by its route: the
    // person redeeming it has no token yet.
    Router::new()
        .route("/api/invitations/redeem", post(redeem))
        .merge(super::dashboard::routes())
        .merge(authenticated)
        .layer(middleware::map_response(json_refusals))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            super::metrics::track,
        ))
        .with_state(state)
}

/// axum's own refusals (a path segment that does not parse, a method the
/// route lacks, a body over the limit) are plain text; every refusal of
/// this API is an `ErrorBody`, as its OpenAPI document says, so a client
/// reads one shape.
async fn json_refusals(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let error = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("refused")
            .to_lowercase()
    } else {
        text
    };
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    let body = serde_json::to_vec(&ErrorBody { error }).unwrap_or_default();
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// `GET /api/openapi.json`: every route and wire type (`host::openapi`).
async fn openapi_document() -> ([(axum::http::HeaderName, &'static str); 1], &'static str) {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        super::openapi::json(),
    )
}

/// `POST /api/metrics-token`: the token Prometheus scrapes the host and
/// every runner with (shown once); the earlier one stops working.
async fn rotate_metrics_token(
    State(state): State<Arc<HostState>>,
) -> Result<(StatusCode, Json<crate::api::MetricsToken>), ApiError> {
    let token = generate_token("rnmet");
    let (hash, now) = (hash_token(&token), crate::now_unix_ms());
    state
        .blocking(move |s| s.rotate_metrics_token(&hash, now))
        .await?;
    tracing::info!("metrics token rotated");
    Ok((
        StatusCode::CREATED,
        Json(crate::api::MetricsToken { token }),
    ))
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Invite {
    #[serde(default)]
    role: crate::api::PersonRole,
    #[serde(default)]
    group: Option<String>,
    /// How long the code may be redeemed (default 7 days).
    #[serde(default)]
    expires_in_ms: Option<u64>,
}

/// How long an invitation lasts unless the admin says.
const INVITATION_LIFETIME_MS: u64 = 7 * 24 * 3600 * 1000;

/// `POST /api/invitations`: a one-time code that makes one person with
/// this role and group; only its hash is kept.
async fn invite(
    State(state): State<Arc<HostState>>,
    ApiJson(req): ApiJson<Invite>,
) -> Result<(StatusCode, Json<crate::api::Invitation>), ApiError> {
    if let Some(g) = &req.group {
        validate_user_name(g).map_err(|m| ApiError::BadRequest(format!("group: {m}")))?;
    }
    let now = crate::now_unix_ms();
    let expires_at = expiry(
        now,
        Some(req.expires_in_ms.unwrap_or(INVITATION_LIFETIME_MS)),
    )?
    .unwrap_or(i64::MAX);
    let code = generate_token("rninv");
    let (hash, role, group) = (hash_token(&code), req.role, req.group.clone());
    state
        .blocking(move |s| s.add_invitation(&hash, role, group.as_deref(), expires_at, now))
        .await?;
    tracing::info!(role = role.as_str(), group = ?req.group, "invitation made");
    Ok((
        StatusCode::CREATED,
        Json(crate::api::Invitation {
            id: crate::api::invitation_id(&hash_token(&code)),
            code,
            role,
            group: req.group,
            expires_at_unix_ms: expires_at,
        }),
    ))
}

/// `GET /api/invitations`: every invitation (never a code).
async fn list_invitations(
    State(state): State<Arc<HostState>>,
) -> Result<Json<Vec<crate::api::InvitationView>>, ApiError> {
    Ok(Json(state.blocking(|s| s.list_invitations()).await?))
}

/// `DELETE /api/invitations/{id}`: an unused code no longer works.
async fn revoke_invitation(
    State(state): State<Arc<HostState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if id.len() != 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::BadRequest(format!(
            "id: {id:?} is not an invitation id (12 hex digits, as `rivernode user invitations` shows)"
        )));
    }
    let i = id.clone();
    state.blocking(move |s| s.revoke_invitation(&i)).await?;
    tracing::info!(invitation = %id, "invitation revoked");
    Ok(StatusCode::NO_CONTENT)
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Redeem {
    name: String,
}

/// `POST /api/invitations/redeem` with `Authorization: Bearer <code>`: the
/// person `name` is made, with their token (shown once); the code is spent.
async fn redeem(
    State(state): State<Arc<HostState>>,
    req: axum::extract::Request,
) -> Result<(StatusCode, Json<NewUser>), ApiError> {
    let code = auth::bearer(&req)?.to_string();
    let no_credential = |e: ApiError| match e {
        // An unknown, used or expired code (the store's refusal) is no credential.
        ApiError::BadRequest(why) => ApiError::Unauthorized(format!("invitation: {why}")),
        other => other,
    };
    // The code first: without a good one, nothing about the body is said.
    let (code_hash, now) = (hash_token(&code), crate::now_unix_ms());
    let h = code_hash.clone();
    state
        .blocking(move |s| s.check_invitation(&h, now))
        .await
        .map_err(no_credential)?;
    let body = axum::body::to_bytes(req.into_body(), 64 << 10)
        .await
        .map_err(|e| ApiError::BadRequest(format!("body: {e}")))?;
    let Redeem { name } =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?;
    validate_user_name(&name).map_err(|m| ApiError::BadRequest(format!("name: {m}")))?;
    let token = generate_token("rnusr");
    let (hash, n) = (hash_token(&token), name.clone());
    state
        .blocking(move |s| s.redeem_invitation(&code_hash, &n, &hash, now))
        .await
        .map_err(no_credential)?;
    tracing::info!(user = %name, "invitation redeemed");
    Ok((StatusCode::CREATED, Json(NewUser { name, token })))
}

async fn whoami(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
) -> Json<WhoAmI> {
    Json(WhoAmI {
        role: p.role.as_str().to_string(),
        node: p.node,
        user: p.user,
        ssh_proxy_port: state.ssh_proxy_port,
        public_address: state.public_address.clone(),
    })
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct AddUser {
    name: String,
    /// What the person's token may do (default `user`).
    #[serde(default)]
    role: crate::api::PersonRole,
    /// The group whose quota they share.
    #[serde(default)]
    group: Option<String>,
}

async fn add_user(
    State(state): State<Arc<HostState>>,
    ApiJson(req): ApiJson<AddUser>,
) -> Result<(StatusCode, Json<NewUser>), ApiError> {
    validate_user_name(&req.name).map_err(|m| ApiError::BadRequest(format!("name: {m}")))?;
    let token = generate_token("rnusr");
    if let Some(g) = &req.group {
        validate_user_name(g).map_err(|m| ApiError::BadRequest(format!("group: {m}")))?;
    }
    let (hash, name, role, group) = (
        hash_token(&token),
        req.name.clone(),
        req.role,
        req.group.clone(),
    );
    let now = crate::now_unix_ms();
    state
        .blocking(move |s| s.add_user(&name, role, group.as_deref(), &hash, now))
        .await?;
    tracing::info!(user = %req.name, role = role.as_str(), "user added");
    Ok((
        StatusCode::CREATED,
        Json(NewUser {
            name: req.name,
            token,
        }),
    ))
}

/// `PUT /api/quotas/{scope}/{name}`: the caps (all none removes the quota).
async fn set_quota(
    State(state): State<Arc<HostState>>,
    Path((scope, name)): Path<(String, String)>,
    ApiJson(caps): ApiJson<crate::api::QuotaCaps>,
) -> Result<StatusCode, ApiError> {
    let scope = match scope.as_str() {
        "user" => crate::api::QuotaScope::User,
        "group" => crate::api::QuotaScope::Group,
        other => {
            return Err(ApiError::BadRequest(format!(
                "scope: {other:?} is not user or group"
            )))
        }
    };
    validate_user_name(&name).map_err(|m| ApiError::BadRequest(format!("name: {m}")))?;
    if let Some(p) = caps.period_s {
        if caps.gpu_seconds.is_none() {
            return Err(ApiError::BadRequest(
                "period_s: a period is for gpu_seconds; give both".into(),
            ));
        }
        // The ledger keeps a stretch for 400 days after it ended.
        if !(1..=400 * 86_400).contains(&p) {
            return Err(ApiError::BadRequest(format!(
                "period_s: {p} is outside 1 second to 400 days"
            )));
        }
    }
    let n = name.clone();
    state
        .blocking(move |s| s.set_quota(scope, &n, &caps))
        .await?;
    tracing::info!(scope = scope.as_str(), name = %name, ?caps, "quota set");
    // A raised quota may let waiting work in.
    state.publish().await;
    state.schedule.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/quotas`: every quota for those who run or read the cluster; a
/// user's own and their group's for a user.
async fn list_quotas(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Vec<crate::api::QuotaView>>, ApiError> {
    let all = state.blocking(|s| s.quotas()).await?;
    if p.role != Role::User {
        return Ok(Json(all));
    }
    let me = p.user.clone().unwrap_or_default();
    let users = state.blocking(|s| s.list_users()).await?;
    let group = users
        .into_iter()
        .find(|u| u.name == me)
        .and_then(|u| u.group);
    Ok(Json(
        all.into_iter()
            .filter(|q| match q.scope {
                crate::api::QuotaScope::User => q.name == me,
                crate::api::QuotaScope::Group => group.as_deref() == Some(q.name.as_str()),
            })
            .collect(),
    ))
}

async fn list_users(State(state): State<Arc<HostState>>) -> Result<Json<Vec<UserView>>, ApiError> {
    Ok(Json(state.blocking(|s| s.list_users()).await?))
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SetPerson {
    #[serde(default)]
    role: Option<crate::api::PersonRole>,
    /// A group to put them in.
    #[serde(default)]
    group: Option<String>,
    /// Take them out of their group.
    #[serde(default)]
    no_group: bool,
}

/// `PUT /api/users/{name}`: a person's new role or group; their token,
/// work and variables stay. The role applies to their next request.
async fn set_person(
    State(state): State<Arc<HostState>>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<SetPerson>,
) -> Result<StatusCode, ApiError> {
    if req.group.is_some() && req.no_group {
        return Err(ApiError::BadRequest(
            "group: give a group or no_group, not both".into(),
        ));
    }
    if let Some(g) = &req.group {
        validate_user_name(g).map_err(|m| ApiError::BadRequest(format!("group: {m}")))?;
    }
    let group = match (req.group, req.no_group) {
        (Some(g), _) => Some(Some(g)),
        (None, true) => Some(None),
        (None, false) => None,
    };
    let (n, role) = (name.clone(), req.role);
    let g = group.clone();
    if !state
        .blocking(move |s| s.set_person(&n, role, g.as_ref().map(|g| g.as_deref())))
        .await?
    {
        return Err(no_such_user(&name));
    }
    tracing::info!(user = %name, role = ?role.map(|r| r.as_str()), ?group, "person changed");
    state.schedule.notify_one();
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_user(
    State(state): State<Arc<HostState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let n = name.clone();
    if state.blocking(move |s| s.remove_user(&n)).await? {
        tracing::info!(user = %name, "user removed; their tokens are revoked");
        state.publish().await;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(no_such_user(&name))
    }
}

async fn list_nodes(State(state): State<Arc<HostState>>) -> Result<Json<Vec<NodeView>>, ApiError> {
    Ok(Json(state.blocking(|s| s.list_nodes()).await?))
}

async fn get_node(
    State(state): State<Arc<HostState>>,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, ApiError> {
    let n = name.clone();
    state
        .blocking(move |s| s.get_node(&n))
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no node named {name:?}; `rivernode node list` shows the nodes"
            ))
        })
}

/// `POST /api/join-token`: what a rotation asks for.
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateJoinToken {
    /// How long the new token stays valid; none: until the next rotation.
    #[serde(default)]
    pub expires_in_ms: Option<u64>,
}

/// The new join token (shown once), when it expires, and where the host wrote it.
#[derive(Debug, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct JoinTokenView {
    pub token: String,
    pub expires_at_unix_ms: Option<i64>,
    pub file: String,
}

/// When a token asked to last `expires_in_ms` from `now` expires.
fn expiry(now: i64, expires_in_ms: Option<u64>) -> Result<Option<i64>, ApiError> {
    match expires_in_ms {
        Some(0) => Err(ApiError::BadRequest(
            "expires_in_ms: must be more than 0".into(),
        )),
        Some(ms) => Ok(Some(
            now.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX)),
        )),
        None => Ok(None),
    }
}

/// The admin acts for any user, a user only for themselves.
fn for_user(p: &Principal, name: &str, what: &str) -> Result<(), ApiError> {
    if p.role != Role::Admin && p.user.as_deref() != Some(name) {
        return Err(ApiError::Forbidden(format!(
            "a user may {what} of only their own account"
        )));
    }
    Ok(())
}

fn no_such_user(name: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no user named {name:?}; `rivernode user list` shows the users"
    ))
}

/// `GET /api/users/{name}/env`: the variables the user gives each instance.
async fn get_user_env(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<BTreeMap<String, String>>, ApiError> {
    for_user(&p, &name, "read the variables")?;
    let n = name.clone();
    state
        .blocking(move |s| s.user_env(&n))
        .await?
        .map(Json)
        .ok_or_else(|| no_such_user(&name))
}

/// `POST /api/users/{name}/env` `{"set": {K: V}, "unset": [K]}`: changes
/// the variables every instance the user makes from now on gets (its own
/// `-e` wins over them); answers the variables after the change.
async fn change_user_env(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<crate::api::UserEnvChange>,
) -> Result<Json<BTreeMap<String, String>>, ApiError> {
    for_user(&p, &name, "change the variables")?;
    super::tasks::check_env("set", &req.set)?;
    // Made by the host for each VPS: one kept here would refuse every submit.
    let key = crate::api::instance_key::KEY_VAR;
    if req.set.contains_key(key) {
        return Err(ApiError::BadRequest(format!(
            "set: {key} is made by rivernode for each VPS, not a user's variable"
        )));
    }
    let n = name.clone();
    let after = state
        .blocking(move |s| s.change_user_env(&n, &req.set, &req.unset))
        .await?
        .ok_or_else(|| no_such_user(&name))?;
    tracing::info!(user = %name, "user variables changed");
    Ok(Json(after))
}

/// `POST /api/users/{name}/token`: the admin gives any user a new token,
/// a user themselves; their other tokens are revoked at once.
async fn rotate_user_token(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<NewUser>), ApiError> {
    for_user(&p, &name, "rotate the token")?;
    // No body: no expiry.
    let req: RotateJoinToken = super::snapshots::optional_body(&body)?;
    let now = crate::now_unix_ms();
    if name == "admin" {
        return rotate_admin_token(&state, &p, req.expires_in_ms, now).await;
    }
    let expires_at = expiry(now, req.expires_in_ms)?;
    let token = generate_token("rnusr");
    let (hash, n) = (hash_token(&token), name.clone());
    let found = state
        .blocking(move |s| s.rotate_user_token(&n, &hash, expires_at, now))
        .await?;
    if !found {
        return Err(no_such_user(&name));
    }
    tracing::info!(user = %name, ?expires_at, "user token rotated");
    Ok((StatusCode::CREATED, Json(NewUser { name, token })))
}

/// The admin's own rotation (`user rotate-token admin`): every admin token
/// is replaced, and DATA_DIR/admin.token rewritten for local clients.
async fn rotate_admin_token(
    state: &HostState,
    p: &Principal,
    expires_in_ms: Option<u64>,
    now: i64,
) -> Result<(StatusCode, Json<NewUser>), ApiError> {
    p.require(Role::Admin)?;
    if expires_in_ms.is_some() {
        return Err(ApiError::BadRequest(
            "expires_in_ms: the admin token does not expire (an expired one would lock everyone out)"
                .into(),
        ));
    }
    let token = generate_token("rnadm");
    let hash = hash_token(&token);
    state
        .blocking(move |s| s.rotate_admin_token(&hash, now))
        .await?;
    let file = state.data_dir.join(super::ADMIN_TOKEN_FILE);
    crate::files::write_secret(&file, format!("{token}\n").as_bytes()).map_err(|e| {
        ApiError::Internal(format!(
            "the admin token is rotated but {} was not written: {e}",
            file.display()
        ))
    })?;
    tracing::info!(file = %file.display(), "admin token rotated");
    Ok((
        StatusCode::CREATED,
        Json(NewUser {
            name: "admin".into(),
            token,
        }),
    ))
}

/// Replaces the join token: registered nodes keep their credentials, and
/// a removed node's name can come back only with the new token.
async fn rotate_join_token(
    State(state): State<Arc<HostState>>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<JoinTokenView>), ApiError> {
    // No body: a token without expiry.
    let req: RotateJoinToken = super::snapshots::optional_body(&body)?;
    let now = crate::now_unix_ms();
    let expires_at = expiry(now, req.expires_in_ms)?;
    let token = generate_token("rnjoin");
    let hash = hash_token(&token);
    state
        .blocking(move |s| s.rotate_join_token(&hash, expires_at, now))
        .await?;
    let file = state.data_dir.join(super::JOIN_TOKEN_FILE);
    crate::files::write_secret(&file, format!("{token}\n").as_bytes()).map_err(|e| {
        ApiError::Internal(format!(
            "the token is rotated but {} was not written: {e}",
            file.display()
        ))
    })?;
    tracing::info!(file = %file.display(), ?expires_at, "join token rotated");
    Ok((
        StatusCode::CREATED,
        Json(JoinTokenView {
            token,
            expires_at_unix_ms: expires_at,
            file: file.display().to_string(),
        }),
    ))
}

async fn remove_node(
    State(state): State<Arc<HostState>>,
    Path(name): Path<String>,
) -> Result<Json<crate::api::NodeRemoved>, ApiError> {
    let n = name.clone();
    let now = crate::now_unix_ms();
    match state.blocking(move |s| s.delete_node(&n, now)).await? {
        Some(vps_left) => {
            tracing::info!(node = %name, ?vps_left, "node removed; its credential is revoked and its tasks ended");
            state.publish().await;
            Ok(Json(crate::api::NodeRemoved {
                node: name,
                vps_left,
            }))
        }
        None => Err(ApiError::NotFound(format!("no node named {name:?}"))),
    }
}

async fn register(
    State(state): State<Arc<HostState>>,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<RegisterResponse>), ApiError> {
    validate_node_name(&req.name).map_err(|m| ApiError::BadRequest(format!("name: {m}")))?;
    check_url("runner_url", &req.runner_url)?;
    check_interval(req.heartbeat_interval_ms)?;
    let credential = generate_token("rnnode");
    let host_token = generate_token("rnhost");
    let (cred_hash, token, name) = (
        hash_token(&credential),
        host_token.clone(),
        req.name.clone(),
    );
    let now = crate::now_unix_ms();
    // Its overlay subnet first: a full range refuses the node before it is
    // registered, not after (kept for the name, a retry finds the same).
    let instance_subnet = super::overlay::subnet_for(&state, &name).await?;
    state
        .blocking(move |s| s.register_node(&req, &cred_hash, &token, now))
        .await?;
    tracing::info!(node = %name, "node registered");
    state.schedule.notify_one();
    Ok((
        StatusCode::CREATED,
        Json(RegisterResponse {
            name,
            credential,
            host_token,
            instance_subnet,
        }),
    ))
}

async fn heartbeat(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    ApiJson(hb): ApiJson<HeartbeatRequest>,
) -> Result<Json<crate::api::HeartbeatReply>, ApiError> {
    if p.node.as_deref() != Some(name.as_str()) {
        return Err(ApiError::Forbidden(format!(
            "this credential is not for node {name:?}"
        )));
    }
    check_url("runner_url", &hb.runner_url)?;
    check_interval(hb.heartbeat_interval_ms)?;
    let n = name.clone();
    let now = crate::now_unix_ms();
    let degraded = hb.degraded.clone();
    let readings = (!hb.usage.gpus.is_empty()).then(|| hb.usage.gpus.clone());
    let interval = Duration::from_millis(hb.heartbeat_interval_ms);
    use crate::api::NodeState;
    let prev = state.blocking(move |s| s.heartbeat(&n, &hb, now)).await?;
    let Some(prev) = prev else {
        return Err(ApiError::NotFound(format!(
            "node {name:?} is not registered"
        )));
    };
    let now_state = if degraded.is_some() {
        NodeState::Degraded
    } else {
        NodeState::Online
    };
    if prev != now_state {
        match &degraded {
            Some(why) => tracing::warn!(node = %name, "node degraded: {why}"),
            None => tracing::info!(node = %name, was = prev.as_str(), "node is online"),
        }
        // It may take what waits for it now.
        if now_state == NodeState::Online {
            state.schedule.notify_one();
        }
    }
    if let (Some(policy), Some(readings)) = (state.idle, readings) {
        // The beat is recorded: a failure here is the host's, not the node's.
        if let Err(e) = reclaim_idle_gpus(&state, &name, readings, policy, interval, now).await {
            tracing::error!(node = %name, error = ?e, "the idle-GPU check failed");
        }
    }
    let metrics_keys = state.blocking(|s| Ok(s.metrics_keys())).await?;
    let overlay = super::overlay::plan_for(&state, &name).await?;
    Ok(Json(crate::api::HeartbeatReply {
        metrics_keys,
        overlay,
        park_stopped_vps: state.park_stopped_vps,
    }))
}

/// Moves the idle clocks of the node's GPU VPS by this beat's readings;
/// warnings and stops reach the runner through its assignments.
async fn reclaim_idle_gpus(
    state: &HostState,
    node: &str,
    readings: Vec<crate::topology::nvml::GpuSample>,
    policy: crate::host::idle::IdlePolicy,
    interval: Duration,
    now: i64,
) -> Result<(), ApiError> {
    use crate::host::idle::IdleStep;
    // Three missed beats (and never under 30 s) break an idle stretch.
    let policy = crate::host::idle::IdlePolicy {
        max_gap: (interval * 3).max(Duration::from_secs(30)),
        ..policy
    };
    let n = node.to_string();
    let steps = state
        .blocking(move |s| s.review_idle(&n, &readings, &policy, now))
        .await?;
    for (id, step) in &steps {
        match step {
            IdleStep::Warn(text) => tracing::info!(task = id, node, "idle GPUs: {text}"),
            IdleStep::Clear => tracing::info!(task = id, node, "idle GPUs: in use again"),
            IdleStep::Stop(why) => tracing::warn!(task = id, node, "idle GPUs: {why}"),
            IdleStep::Nothing => {}
        }
    }
    if !steps.is_empty() {
        state.publish().await;
    }
    Ok(())
}

/// Calls the node's runner API with the host's token for it: shows that the
/// host can reach and command the runner.
async fn probe_runner(
    State(state): State<Arc<HostState>>,
    Path(name): Path<String>,
) -> Result<Json<RunnerStatus>, ApiError> {
    let n = name.clone();
    let (url, token) = state
        .blocking(move |s| s.runner_access(&n))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no node named {name:?}")))?;
    let client = crate::api::runner_client::RunnerClient {
        http: &state.http,
        node: &name,
        url: &url,
        token: &token,
    };
    let resp = client
        .call(
            reqwest::Method::GET,
            "/api/status",
            &[],
            None::<&()>,
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| ApiError::BadGateway(format!("{} (at {url})", crate::error_chain(&e))))?;
    Ok(Json(client.json(resp).await.map_err(|e| {
        ApiError::BadGateway(crate::error_chain(&e))
    })?))
}

fn check_url(field: &str, url: &str) -> Result<(), ApiError> {
    crate::api::runner_origin(url)
        .map(|_| ())
        .map_err(|e| ApiError::BadRequest(format!("{field}: {e}")))
}

fn check_interval(ms: u64) -> Result<(), ApiError> {
    if (1..=3_600_000).contains(&ms) {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "heartbeat_interval_ms: {ms} is outside 1..=3600000"
        )))
    }
}

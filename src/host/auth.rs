//! Bearer tokens: generation, hashing, the role a token carries, and the
//! middleware that puts the caller's [`Principal`] on every request.
//!
//! Only SHA-256 hashes of tokens are stored. Tokens are 256 random bits, so a
//! fast hash is enough: there is nothing to brute-force.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::Response;

use super::api::ApiError;
use super::HostState;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Full control of the cluster.
    Admin,
    /// May only register a new node.
    Join,
    /// A runner, for its own node only.
    Node,
    /// A person: submits tasks and VPS and sees and controls only their own.
    User,
    /// A person who reads the cluster (its nodes, every task with the
    /// variables' values left out) and changes nothing.
    Viewer,
    /// A person who runs the cluster's work: a user who also sees every
    /// task (values left out), approves and rejects requests, and stops,
    /// kills, pauses, resumes and restarts anyone's instances; never users,
    /// tokens or what is inside others' instances (exec, logs, snapshots,
    /// delete stay theirs and the admin's).
    Operator,
    /// Reads `/metrics` on the host and on every runner, and nothing else
    /// (what Prometheus scrapes with).
    Metrics,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Join => "join",
            Role::Node => "node",
            Role::User => "user",
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Metrics => "metrics",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Role::Admin),
            "join" => Some(Role::Join),
            "node" => Some(Role::Node),
            "user" => Some(Role::User),
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "metrics" => Some(Role::Metrics),
            _ => None,
        }
    }
}

/// Who is calling: the role of the token and, for node tokens, the node;
/// for user tokens, the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub role: Role,
    pub node: Option<String>,
    pub user: Option<String>,
}

impl Principal {
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        self.require_any(&[role])
    }

    pub fn require_any(&self, roles: &[Role]) -> Result<(), ApiError> {
        if roles.contains(&self.role) {
            Ok(())
        } else {
            let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            Err(ApiError::Forbidden(format!(
                "this needs a {} token; the one presented is a {} token",
                names.join(" or "),
                self.role.as_str()
            )))
        }
    }

    /// The owner recorded on what this principal creates: the person's
    /// name, or none for the admin.
    pub fn owner(&self) -> Option<String> {
        match self.role {
            Role::User | Role::Operator | Role::Viewer => self.user.clone(),
            _ => None,
        }
    }

    /// Whether `owner` is this person.
    fn owns(&self, owner: Option<&str>) -> bool {
        self.user.is_some() && self.user.as_deref() == owner
    }

    /// Whether this principal may use a task owned by `owner` in every way
    /// (exec, logs, snapshots, delete): the admin everything, a person only
    /// their own.
    pub fn may_use(&self, owner: Option<&str>) -> bool {
        match self.role {
            Role::Admin => true,
            Role::User | Role::Operator | Role::Viewer => self.owns(owner),
            Role::Join | Role::Node | Role::Metrics => false,
        }
    }

    /// Whether this principal may see a task owned by `owner` (its
    /// variables' values left out unless `may_use`).
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        matches!(self.role, Role::Operator | Role::Viewer) || self.may_use(owner)
    }

    /// Whether this principal may stop, kill, pause, resume or restart a
    /// task owned by `owner`.
    pub fn may_operate(&self, owner: Option<&str>) -> bool {
        self.role == Role::Operator || (self.role != Role::Viewer && self.may_use(owner))
    }

    /// The roles a person's token may carry.
    pub const PEOPLE: [Role; 4] = [Role::Admin, Role::Operator, Role::User, Role::Viewer];
}

/// A new random token like `rnadm_<64 hex digits>`; the prefix says what it is for
/// so a leaked token is recognisable.
pub use crate::api::token::{generate as generate_token, hash as hash_token};

/// The websocket subprotocol a browser names its token with: a page's
/// script cannot set `Authorization` on a websocket, and a token in the URL
/// would end up in logs (Kubernetes does the same).
pub const WS_BEARER_PREFIX: &str = "rivernode.bearer.";

/// The subprotocol the exec and forward websockets answer with.
pub const WS_PROTOCOL: &str = "rivernode.exec";

/// The token a websocket upgrade offers as a `rivernode.bearer.<token>`
/// subprotocol; only upgrades carry one this way.
pub fn websocket_bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let upgrade = headers.get(axum::http::header::UPGRADE)?.to_str().ok()?;
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return None;
    }
    headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(WS_BEARER_PREFIX))
        .filter(|t| !t.is_empty())
}

/// The token of an `Authorization: Bearer <token>` header (or, for a
/// browser's websocket, of its subprotocol: `websocket_bearer`).
pub fn bearer(req: &Request) -> Result<&str, ApiError> {
    let Some(value) = req.headers().get(AUTHORIZATION) else {
        return websocket_bearer(req.headers()).ok_or_else(|| {
            ApiError::Unauthorized("missing Authorization: Bearer <token> header".into())
        });
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("Authorization header is not text".into()))?;
    text.strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::Unauthorized("Authorization header must be 'Bearer <token>'".into())
        })
}

/// Rejects the request with 401 unless it carries a known token.
pub async fn authenticate(
    State(state): State<Arc<HostState>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let hash = hash_token(bearer(&req)?);
    let found = match state.store.find_token_now(&hash) {
        Some(found) => found,
        None => state.blocking(move |s| s.find_token(&hash)).await?,
    };
    let principal =
        found.ok_or_else(|| ApiError::Unauthorized("invalid or revoked token".into()))?;
    req.extensions_mut().insert(principal);
    Ok(next.run(req).await)
}

/// Route layer: lets the request through only if the authenticated
/// principal has one of `roles` (403 otherwise).
pub async fn require(roles: &[Role], req: Request, next: Next) -> Result<Response, ApiError> {
    let principal = req
        .extensions()
        .get::<Principal>()
        .ok_or_else(|| ApiError::Unauthorized("not authenticated".into()))?;
    principal.require_any(roles)?;
    Ok(next.run(req).await)
}

/// The node a `/api/nodes/<name>/...` path is about.
pub fn node_in_path(path: &str) -> Option<&str> {
    path.strip_prefix("/api/nodes/")?.split('/').next()
}

/// Middleware for a node's own routes: its credential is for the node the
/// path names, checked before the body is read (another node's calls get
/// 403 whatever they send).
pub async fn require_own_node(req: Request, next: Next) -> Result<Response, ApiError> {
    let principal = req
        .extensions()
        .get::<Principal>()
        .ok_or_else(|| ApiError::Unauthorized("not authenticated".into()))?;
    let named = node_in_path(req.uri().path());
    if principal.node.as_deref() != named || named.is_none() {
        return Err(ApiError::Forbidden(format!(
            "this credential is not for node {:?}",
            named.unwrap_or_default()
        )));
    }
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_of_a_path() {
        assert_eq!(node_in_path("/api/nodes/n1/heartbeat"), Some("n1"));
        assert_eq!(node_in_path("/api/nodes/n1/tasks/7"), Some("n1"));
        assert_eq!(node_in_path("/api/tasks/7"), None);
    }

    #[test]
    fn a_browser_names_its_token_as_a_websocket_subprotocol() {
        use axum::http::{header, HeaderMap, HeaderValue};
        let mut h = HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("rivernode.exec, rivernode.bearer.rnusr_abc"),
        );
        assert_eq!(
            websocket_bearer(&h),
            None,
            "only an upgrade carries a token this way"
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(websocket_bearer(&h), Some("rnusr_abc"));
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("rivernode.exec, rivernode.bearer."),
        );
        assert_eq!(websocket_bearer(&h), None, "an empty token is none");
    }

    #[test]
    fn roles_round_trip() {
        for r in [Role::Admin, Role::Join, Role::Node, Role::User] {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
        let p = Principal {
            role: Role::Join,
            node: None,
            user: None,
        };
        assert!(p.require(Role::Join).is_ok());
        assert!(p.require(Role::Admin).is_err());
        assert!(!p.may_use(None), "a join token controls no task");
    }

    #[test]
    fn users_use_only_their_own_tasks() {
        let alice = Principal {
            role: Role::User,
            node: None,
            user: Some("alice".into()),
        };
        assert!(alice.may_use(Some("alice")));
        assert!(!alice.may_use(Some("bob")));
        assert!(!alice.may_use(None), "the admin's tasks are not a user's");
        assert_eq!(alice.owner().as_deref(), Some("alice"));
        let admin = Principal {
            role: Role::Admin,
            node: None,
            user: None,
        };
        assert!(admin.may_use(Some("bob")) && admin.may_use(None));
        assert_eq!(admin.owner(), None);
        let e = alice.require_any(&[Role::Admin]).unwrap_err().to_string();
        assert!(
            e.contains("needs a admin token") && e.contains("user token"),
            "{e}"
        );
    }
}

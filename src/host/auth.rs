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
use sha2::{Digest, Sha256};

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
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Join => "join",
            Role::Node => "node",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "admin" => Some(Role::Admin),
            "join" => Some(Role::Join),
            "node" => Some(Role::Node),
            _ => None,
        }
    }
}

/// Who is calling: the role of the token and, for node tokens, the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub role: Role,
    pub node: Option<String>,
}

impl Principal {
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role == role {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this needs a {} token; the one presented is a {} token",
                role.as_str(),
                self.role.as_str()
            )))
        }
    }
}

/// A new random token like `rnadm_<64 hex digits>`; the prefix says what it is for
/// so a leaked token is recognisable.
pub fn generate_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the kernel's random source is unavailable");
    format!("{prefix}_{}", hex::encode(bytes))
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(req: &Request) -> Result<&str, ApiError> {
    let value = req.headers().get(AUTHORIZATION).ok_or_else(|| {
        ApiError::Unauthorized("missing Authorization: Bearer <token> header".into())
    })?;
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
    let principal = state
        .blocking(move |s| s.find_token(&hash))
        .await?
        .ok_or_else(|| ApiError::Unauthorized("invalid or revoked token".into()))?;
    req.extensions_mut().insert(principal);
    Ok(next.run(req).await)
}

/// Route layer: lets the request through only if the authenticated
/// principal has `role` (403 otherwise).
pub async fn require(role: Role, req: Request, next: Next) -> Result<Response, ApiError> {
    let principal = req
        .extensions()
        .get::<Principal>()
        .ok_or_else(|| ApiError::Unauthorized("not authenticated".into()))?;
    principal.require(role)?;
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_prefixed() {
        let a = generate_token("rnadm");
        let b = generate_token("rnadm");
        assert_ne!(a, b);
        assert!(a.starts_with("rnadm_") && a.len() == 6 + 64, "{a}");
        assert_eq!(hash_token(&a), hash_token(&a));
        assert_ne!(hash_token(&a), hash_token(&b));
        assert_eq!(hash_token(&a).len(), 64);
    }

    #[test]
    fn roles_round_trip() {
        for r in [Role::Admin, Role::Join, Role::Node] {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
        let p = Principal {
            role: Role::Join,
            node: None,
        };
        assert!(p.require(Role::Join).is_ok());
        assert!(p.require(Role::Admin).is_err());
    }
}

//! Moves node to node: a stopped VPS's snapshots go from the runner of the
//! node it stopped on straight to the runner of the node it moves to,
//! without the host holding them (`vps restart --anywhere` while its node
//! is online). The host asks this node for a grant (`PUT
//! /api/vps/{id}/transfer`, with its own token): a random token it made,
//! known here only by its SHA-256, that lets one node read the blobs of
//! that VPS's snapshots, and nothing else, for an hour. That node then
//! fetches what its containerd lacks from `/api/transfers/{id}/blobs/{digest}`
//! (`Authorization: Bearer <grant>`), resumed and checked as blobs from
//! the host are.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::api::{error, RunnerApiState};
use super::container::TaskContext;
use super::driver::InstanceError;
use crate::api::{KeptSnapshot, ParkedVps, TransferGrant};

/// What a grant lets its holder read: VPS `vps`'s blobs (digest to size)
/// until `expires_unix_ms`.
#[derive(Clone, Debug)]
struct Grant {
    vps: u64,
    to: String,
    /// The snapshot asked for, and whether it is that one alone (a new
    /// VPS from it) or the VPS's snapshots (a move).
    snapshot: String,
    only: bool,
    blobs: HashMap<String, u64>,
    expires_unix_ms: i64,
}

/// The grants this node gave, by the SHA-256 of their token (memory only:
/// after a restart the node that moves asks the host again).
#[derive(Default)]
pub struct Grants(Mutex<HashMap<String, Grant>>);

/// Why a grant does not let a read through.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Unknown,
    Expired,
    OtherVps,
    NotItsBlob,
}

impl Grants {
    /// Gives `grant`, in place of an earlier one asked for the same (a
    /// node asking again); others of its VPS (other nodes, a move and new
    /// VPS from its snapshots at once) stay.
    fn give(&self, hash: String, grant: Grant, now_ms: i64) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let same = |v: &Grant| {
            (v.vps, &v.to, &v.snapshot, v.only)
                == (grant.vps, &grant.to, &grant.snapshot, grant.only)
        };
        g.retain(|_, v| v.expires_unix_ms > now_ms && !same(v));
        g.insert(hash, grant);
    }

    /// The size of blob `digest` of VPS `vps`, if grant `hash` lets it be read now.
    fn allows(
        &self,
        hash: &str,
        vps: u64,
        digest: &str,
        now_ms: i64,
    ) -> Result<(u64, String), Refusal> {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let grant = g.get(hash).ok_or(Refusal::Unknown)?;
        check(grant, vps, digest, now_ms).map(|size| (size, grant.to.clone()))
    }
}

/// Whether `grant` lets blob `digest` of VPS `vps` be read at `now_ms`: its size.
fn check(grant: &Grant, vps: u64, digest: &str, now_ms: i64) -> Result<u64, Refusal> {
    if grant.expires_unix_ms <= now_ms {
        return Err(Refusal::Expired);
    }
    if grant.vps != vps {
        return Err(Refusal::OtherVps);
    }
    grant.blobs.get(digest).copied().ok_or(Refusal::NotItsBlob)
}

/// How long a grant the host asks for may last at most.
const MAX_GRANT_MS: i64 = 3_600_000;

/// `PUT /api/vps/{id}/transfer` (the host only): grants node `to` the
/// blobs of VPS `id`'s snapshots here; the copy, as the host describes a
/// parked one (the snapshot it starts from, its host key, every snapshot).
pub async fn give(
    State(state): State<Arc<RunnerApiState>>,
    Path(id): Path<u64>,
    Json(req): Json<TransferGrant>,
) -> Response {
    let Some(ctx) = state.tasks.get().cloned() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "containerd is not up yet");
    };
    let now = crate::now_unix_ms();
    if req.grant_sha256.len() != 64 || !req.grant_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return error(
            StatusCode::BAD_REQUEST,
            "grant_sha256: the grant's SHA-256 in hex is required",
        );
    }
    if req.ttl_ms <= 0 || req.ttl_ms > MAX_GRANT_MS {
        return error(
            StatusCode::BAD_REQUEST,
            "ttl_ms: more than 0, an hour at most",
        );
    }
    match ctx.copy_of(id, &req.snapshot, req.only).await {
        Ok(copy) => {
            let blobs = copy
                .snapshots
                .iter()
                .flat_map(|k| std::iter::once(&k.manifest).chain(&k.blobs))
                .map(|b| (b.digest.clone(), b.size))
                .collect();
            let grant = Grant {
                vps: id,
                to: req.to.clone(),
                snapshot: req.snapshot.clone(),
                only: req.only,
                blobs,
                expires_unix_ms: now + req.ttl_ms,
            };
            state.grants.give(req.grant_sha256, grant, now);
            tracing::info!(task = id, to = %req.to, snapshots = copy.snapshots.len(), "a move's grant given");
            Json(copy).into_response()
        }
        Err(InstanceError::Snapshot(e @ super::snapshots::SnapshotError::NoSnapshot { .. })) => {
            error(StatusCode::NOT_FOUND, &e.to_string())
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &crate::error_chain(&e)),
    }
}

/// `GET /api/transfers/{id}/blobs/{digest}` (a grant's holder): the blob
/// from `Range: bytes=N-` on; `x-expect-sha256` must be its digest's hex.
pub async fn blob(
    State(state): State<Arc<RunnerApiState>>,
    Path((id, digest)): Path<(u64, String)>,
    headers: HeaderMap,
) -> Response {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = token else {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing Authorization: Bearer <grant> header",
        );
    };
    let hash = crate::api::token::hash(token);
    let (size, to) = match state
        .grants
        .allows(&hash, id, &digest, crate::now_unix_ms())
    {
        Ok(found) => found,
        // The node that moves asks the host for a new grant on a 401.
        Err(Refusal::Unknown) => {
            return error(
                StatusCode::UNAUTHORIZED,
                "this runner gave no such grant, or a newer one for this VPS",
            )
        }
        Err(Refusal::Expired) => return error(StatusCode::UNAUTHORIZED, "the grant expired"),
        Err(Refusal::OtherVps) => {
            return error(
                StatusCode::FORBIDDEN,
                &format!("the grant is not for VPS {id}"),
            )
        }
        Err(Refusal::NotItsBlob) => {
            return error(
                StatusCode::FORBIDDEN,
                &format!("{digest} is no blob of VPS {id}'s snapshots here"),
            )
        }
    };
    let Some(ctx) = state.tasks.get().cloned() else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "containerd is not up yet");
    };
    let hex = digest.trim_start_matches("sha256:").to_string();
    if headers
        .get(crate::api::EXPECT_SHA256)
        .is_some_and(|v| v.as_bytes() != hex.as_bytes())
    {
        return error(
            StatusCode::PRECONDITION_FAILED,
            "x-expect-sha256: not this blob's digest",
        );
    }
    let start =
        match crate::api::range_start(headers.get(axum::http::header::RANGE).map(|v| v.as_bytes()))
        {
            Ok(s) => s,
            Err(e) => return error(StatusCode::BAD_REQUEST, e),
        };
    let from = start.unwrap_or(0);
    if from > size || (from == size && from > 0) {
        return error(
            StatusCode::BAD_REQUEST,
            &format!("Range: {from} is not before the end of {digest} ({size} bytes)"),
        );
    }
    tracing::info!(task = id, to = %to, blob = %digest, from, "a blob sent to the node a VPS moves to");
    // Pieces read from containerd as the body is sent: a layer is never
    // held whole in memory.
    let pieces = futures_util::stream::unfold(from, move |at| {
        let (ctx, digest) = (ctx.clone(), digest.clone());
        async move {
            if at >= size {
                return None;
            }
            let len = PIECE.min(size - at);
            match ctx.ctd.read_range(&digest, at, len).await {
                Ok(bytes) => Some((Ok::<_, std::io::Error>(bytes), at + len)),
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), size)),
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(pieces));
    if start.is_some() {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    let h = resp.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&(size - from).to_string()) {
        h.insert("content-length", v);
    }
    if start.is_some() {
        if let Ok(v) =
            HeaderValue::from_str(&format!("bytes {from}-{}/{size}", size.saturating_sub(1)))
        {
            h.insert("content-range", v);
        }
    }
    resp
}

/// The pieces a blob is read from containerd in.
const PIECE: u64 = 4 << 20;

impl TaskContext {
    /// VPS `vps`'s copy here, as a move node to node takes it: `snapshot`
    /// (the one it starts from), the VPS's host key, and all its snapshots
    /// with their blobs; for a new VPS from it (`only`), that snapshot
    /// alone, without the key.
    pub async fn copy_of(
        &self,
        vps: u64,
        snapshot: &str,
        only: bool,
    ) -> Result<ParkedVps, InstanceError> {
        let mut all = self.snapshots(vps).await?;
        if only {
            all.retain(|s| s.id == snapshot);
        }
        let mut kept: Vec<KeptSnapshot> = Vec::new();
        for s in &all {
            kept.push(self.kept_here(vps, s).await?.0);
        }
        let Some(from) = kept.iter().find(|k| k.id == snapshot).cloned() else {
            return Err(super::snapshots::SnapshotError::NoSnapshot {
                vps,
                id: snapshot.to_string(),
            }
            .into());
        };
        let key = match only {
            false => self.vps.host_key_file(&self.container_id(vps))?,
            true => Vec::new(),
        };
        Ok(ParkedVps {
            vps_id: vps,
            snapshot: from.id.clone(),
            size_bytes: from.manifest.size + from.blobs.iter().map(|b| b.size).sum::<u64>(),
            sha256: from
                .manifest
                .digest
                .trim_start_matches("sha256:")
                .to_string(),
            host_key: hex::encode(key),
            manifest: Some(from.manifest),
            blobs: from.blobs,
            snapshots: kept,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_lets_through_only_its_vps_blobs_until_it_expires() {
        let grant = Grant {
            vps: 7,
            to: "n2".into(),
            snapshot: "1".into(),
            only: false,
            blobs: HashMap::from([("sha256:aa".to_string(), 10)]),
            expires_unix_ms: 1_000,
        };
        assert_eq!(check(&grant, 7, "sha256:aa", 999), Ok(10));
        assert_eq!(check(&grant, 7, "sha256:aa", 1_000), Err(Refusal::Expired));
        assert_eq!(check(&grant, 8, "sha256:aa", 999), Err(Refusal::OtherVps));
        assert_eq!(check(&grant, 7, "sha256:bb", 999), Err(Refusal::NotItsBlob));
        let grants = Grants::default();
        grants.give("h".into(), grant.clone(), 0);
        assert_eq!(grants.allows("h", 7, "sha256:aa", 1).map(|g| g.0), Ok(10));
        assert_eq!(
            grants.allows("other", 7, "sha256:aa", 1),
            Err(Refusal::Unknown)
        );
        // The same asked again replaces it; others stay until they expire:
        // another VPS's, and the same VPS's for another node or a new VPS.
        let others = [
            Grant {
                vps: 8,
                ..grant.clone()
            },
            Grant {
                to: "n3".into(),
                ..grant.clone()
            },
            Grant {
                only: true,
                ..grant.clone()
            },
        ];
        for (i, o) in others.into_iter().enumerate() {
            grants.give(format!("o{i}"), o, 0);
        }
        grants.give("h2".into(), grant.clone(), 0);
        assert_eq!(grants.allows("h", 7, "sha256:aa", 1), Err(Refusal::Unknown));
        assert_eq!(grants.allows("h2", 7, "sha256:aa", 1).map(|g| g.0), Ok(10));
        assert_eq!(grants.allows("o0", 8, "sha256:aa", 1).map(|g| g.0), Ok(10));
        for o in ["o1", "o2"] {
            assert_eq!(
                grants.allows(o, 7, "sha256:aa", 1).map(|g| g.0),
                Ok(10),
                "{o}"
            );
        }
        grants.give("h3".into(), grant, 2_000);
        assert_eq!(
            grants.allows("o0", 8, "sha256:aa", 1),
            Err(Refusal::Unknown)
        );
    }
}

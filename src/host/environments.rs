//! Environment archives for nodes that do not share the host's directory:
//! a node asks for an archive's size and SHA-256, then fetches it (from an
//! offset, to resume) and checks it against that digest before importing
//! it. The host reads `SHARED_DIR/environments/<name>.tar` and hashes each
//! archive once per version of the file (size and modification time).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::api::ApiError;
use super::HostState;
use crate::api::{valid_image_name, EnvironmentArchive, EXPECT_SHA256};

/// A node's routes (its own credential, its own name in the path).
pub fn node_routes() -> Router<Arc<HostState>> {
    Router::new()
        .route("/api/nodes/{name}/environments/{env}", get(describe))
        .route("/api/nodes/{name}/environments/{env}/archive", get(archive))
}

/// Which version of a file a digest belongs to: its size, modification
/// time, inode and change time (a copy that keeps size and mtime, as
/// `cp -p` or `rsync -a` do, is still another file).
type Version = (u64, Option<SystemTime>, u64, i64, i64);

/// Digests by archive path, for the version of the file they were made of.
static DIGESTS: Mutex<Option<HashMap<PathBuf, (Version, String)>>> = Mutex::new(None);

fn archive_path(state: &HostState, env: &str) -> Result<PathBuf, ApiError> {
    if !valid_image_name(env) {
        return Err(ApiError::BadRequest(format!(
            "env: {env:?} is no environment name (letters, digits, '.', '_' and '-')"
        )));
    }
    let path = state
        .shared_dir
        .join("environments")
        .join(format!("{env}.tar"));
    if !path.is_file() {
        return Err(ApiError::NotFound(format!(
            "no environment {env:?} on the host ({} is missing)",
            path.display()
        )));
    }
    Ok(path)
}

fn version(path: &Path) -> Result<Version, ApiError> {
    let m = std::fs::metadata(path)
        .map_err(|e| ApiError::NotFound(format!("{}: {e}", path.display())))?;
    use std::os::unix::fs::MetadataExt;
    Ok((
        m.len(),
        m.modified().ok(),
        m.ino(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

/// The archive's size and SHA-256, hashed once per version of the file.
async fn digest(path: PathBuf) -> Result<EnvironmentArchive, ApiError> {
    let v = version(&path)?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let known = DIGESTS
        .lock()
        .ok()
        .and_then(|d| d.as_ref()?.get(&path).filter(|(at, _)| *at == v).cloned());
    let sha256 = match known {
        Some((_, hex)) => hex,
        None => {
            let p = path.clone();
            let hex = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
                let mut f = std::fs::File::open(&p)?;
                let mut h = Sha256::new();
                std::io::copy(&mut f, &mut h)?;
                Ok(hex::encode(h.finalize()))
            })
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(format!("hashing {}: {e}", path.display())))?;
            if let Ok(mut d) = DIGESTS.lock() {
                d.get_or_insert_with(HashMap::new)
                    .insert(path, (v, hex.clone()));
            }
            hex
        }
    };
    Ok(EnvironmentArchive {
        name,
        size_bytes: v.0,
        sha256,
    })
}

async fn describe(
    State(state): State<Arc<HostState>>,
    UrlPath((_node, env)): UrlPath<(String, String)>,
) -> Result<Json<EnvironmentArchive>, ApiError> {
    Ok(Json(digest(archive_path(&state, &env)?).await?))
}

/// Where a `Range: bytes=N-` request starts; none without one. Only that
/// form is served (a node resumes from what it has; it never asks for a
/// slice in the middle).
fn range_start(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(v) = headers.get(axum::http::header::RANGE) else {
        return Ok(None);
    };
    v.to_str()
        .ok()
        .and_then(|t| t.strip_prefix("bytes="))
        .and_then(|t| t.strip_suffix('-'))
        .and_then(|n| n.parse::<u64>().ok())
        .map(Some)
        .ok_or_else(|| ApiError::BadRequest("Range: only bytes=N- is served".into()))
}

/// The archive's bytes from the range's start; `x-expect-sha256` must
/// still name it.
async fn archive(
    State(state): State<Arc<HostState>>,
    UrlPath((_node, env)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let path = archive_path(&state, &env)?;
    let d = digest(path.clone()).await?;
    let what = format!("environment {env:?}");
    let resp = send_archive(&headers, &path, d.size_bytes, &d.sha256, &what).await?;
    tracing::info!(environment = %env, "environment archive sent");
    Ok(resp)
}

/// What `send_slice` serves: `size` bytes of `path` from `base` on, whose
/// SHA-256 is `sha256` (an archive: all of its file from 0; a parked blob:
/// its entry in the archive), named `what` in errors.
pub(super) struct Slice<'a> {
    pub path: &'a Path,
    pub base: u64,
    pub size: u64,
    pub sha256: &'a str,
    pub what: &'a str,
    pub content_type: &'static str,
}

/// An archive's bytes as the request asks: from its `Range: bytes=N-`
/// start (a 206; a 200 without one), `path`'s first `size` bytes,
/// announced with its digest `sha256`; a 412 when `x-expect-sha256` names
/// another digest (`what` changed meanwhile).
pub(super) async fn send_archive(
    headers: &HeaderMap,
    path: &Path,
    size: u64,
    sha256: &str,
    what: &str,
) -> Result<Response, ApiError> {
    let slice = Slice {
        path,
        base: 0,
        size,
        sha256,
        what,
        content_type: "application/x-tar",
    };
    send_slice(headers, &slice).await
}

/// `slice`'s bytes from the request's `Range: bytes=N-` start, as
/// `send_archive` serves a whole archive.
pub(super) async fn send_slice(
    headers: &HeaderMap,
    slice: &Slice<'_>,
) -> Result<Response, ApiError> {
    let Slice {
        path,
        base,
        size,
        sha256,
        what,
        content_type,
    } = *slice;
    let start = range_start(headers)?;
    if let Some(expected) = headers.get(EXPECT_SHA256) {
        if expected.as_bytes() != sha256.as_bytes() {
            return Ok((
                StatusCode::PRECONDITION_FAILED,
                Json(crate::api::ErrorBody {
                    error: format!(
                        "{what} changed on the host (now sha256 {sha256}): fetch it again"
                    ),
                }),
            )
                .into_response());
        }
    }
    let from = start.unwrap_or(0);
    if from >= size && from > 0 {
        return Err(ApiError::BadRequest(format!(
            "Range: {from} is not before the end of {what} ({size} bytes)"
        )));
    }
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?;
    file.seek(std::io::SeekFrom::Start(base + from))
        .await
        .map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?;
    // Exactly the version hashed: a file that grows meanwhile is cut at
    // the size announced, and the node's check catches any other change.
    // 1 MiB reads: each is a blocking-pool round trip in tokio's file.
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        file.take(size - from),
        1 << 20,
    ));
    let mut resp = Response::new(body);
    if start.is_some() {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    let h = resp.headers_mut();
    let value =
        |s: String| HeaderValue::from_str(&s).map_err(|e| ApiError::Internal(e.to_string()));
    h.insert("content-type", HeaderValue::from_static(content_type));
    h.insert("content-length", value((size - from).to_string())?);
    h.insert("accept-ranges", HeaderValue::from_static("bytes"));
    h.insert("x-content-sha256", value(sha256.to_string())?);
    if start.is_some() {
        h.insert(
            "content-range",
            value(format!("bytes {from}-{}/{size}", size.saturating_sub(1),))?,
        );
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_open_range_from_an_offset_is_served() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(axum::http::header::RANGE, HeaderValue::from_str(v).unwrap());
            range_start(&h)
        };
        assert_eq!(range_start(&HeaderMap::new()).unwrap(), None);
        assert_eq!(with("bytes=1024-").unwrap(), Some(1024));
        assert!(with("bytes=0-99").is_err());
        assert!(with("bytes=-5").is_err());
        assert!(with("items=0-").is_err());
    }
}

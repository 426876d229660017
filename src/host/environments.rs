//! Environment archives for nodes that do not share the host's directory:
//! a node asks for an archive's size and SHA-256, then fetches it (from an
//! offset, to resume) and checks it against that digest before importing
//! it. The host reads `SHARED_DIR/environments/<name>.tar` and hashes each
//! archive once per version of the file (size and modification time).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::extract::{Path as UrlPath, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};

use super::api::ApiError;
use super::HostState;
use crate::api::{valid_image_name, EnvironmentArchive};

/// A node's routes (its own credential, its own name in the path).
pub fn node_routes() -> Router<Arc<HostState>> {
    Router::new()
        .route("/api/nodes/{name}/environments/{env}", get(describe))
        .route("/api/nodes/{name}/environments/{env}/archive", get(archive))
        .route(
            "/api/nodes/{name}/environments/{env}/blobs/{digest}",
            get(blob),
        )
}

/// Which version of a file a digest belongs to: its size, modification
/// time, inode and change time (a copy that keeps size and mtime, as
/// `cp -p` or `rsync -a` do, is still another file).
type Version = (u64, Option<SystemTime>, u64, i64, i64);

/// Digests and blob lists by archive path, for the version of the file
/// they were made of.
static DIGESTS: Mutex<Option<HashMap<PathBuf, (Version, EnvironmentArchive)>>> = Mutex::new(None);

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

/// The archive's size, SHA-256 and blobs (an OCI layout's), read once per
/// version of the file.
async fn digest(path: PathBuf) -> Result<EnvironmentArchive, ApiError> {
    let v = version(&path)?;
    let known = DIGESTS
        .lock()
        .ok()
        .and_then(|d| d.as_ref()?.get(&path).filter(|(at, _)| *at == v).cloned());
    if let Some((_, found)) = known {
        return Ok(found);
    }
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let p = path.clone();
    let read = tokio::task::spawn_blocking(move || super::archive::read_archive(&p))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(format!("hashing {}: {e}", path.display())))?;
    // Any other archive is fetched whole.
    let (manifest, blobs) = read
        .layout
        .map_or((None, Vec::new()), |(m, b)| (Some(m), b));
    let found = EnvironmentArchive {
        name,
        size_bytes: v.0,
        sha256: read.sha256,
        manifest,
        blobs,
    };
    if let Ok(mut d) = DIGESTS.lock() {
        d.get_or_insert_with(HashMap::new)
            .insert(path, (v, found.clone()));
    }
    Ok(found)
}

async fn describe(
    State(state): State<Arc<HostState>>,
    UrlPath((_node, env)): UrlPath<(String, String)>,
) -> Result<Json<EnvironmentArchive>, ApiError> {
    Ok(Json(digest(archive_path(&state, &env)?).await?))
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
    let resp =
        super::archive::send_archive(&headers, &path, d.size_bytes, &d.sha256, &what).await?;
    tracing::info!(environment = %env, "environment archive sent");
    Ok(resp)
}

/// One blob of an OCI layout archive (its manifest, config or a layer)
/// from the range's start; `x-expect-sha256` must be its digest's.
async fn blob(
    State(state): State<Arc<HostState>>,
    UrlPath((_node, env, digest_name)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let path = archive_path(&state, &env)?;
    let d = digest(path.clone()).await?;
    let what = format!("blob {digest_name} of environment {env:?}");
    let resp = super::archive::send_blob(
        &headers,
        |_| path.clone(),
        (&d.manifest, &d.blobs, &d.sha256),
        &digest_name,
        &what,
    )
    .await?;
    tracing::info!(environment = %env, blob = %digest_name, "environment blob sent");
    Ok(resp)
}

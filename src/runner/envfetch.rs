//! Archives from the host: environments for a node without the host's
//! shared directory, and the blobs of a VPS's parked copy that the node it
//! moves to lacks. Each is fetched into a cache on the node, named by its
//! SHA-256 (`sha256-<hex>.tar`, a blob too), resumed from a partial copy (`.part`) after a cut
//! (a few times within one fetch, and on the next one), and checked
//! against the digest before the cached copy is first used. An archive
//! the cache has is never fetched again; when an environment changes on the
//! host, its older copy is removed once the new one is in.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::api::host_client::{HostCallError, HostClient};
use crate::oci::Progress;

/// What is fetched from the host.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    /// An environment archive, by name.
    Environment(&'a str),
    /// A blob of VPS `vps`'s parked copy (`vps restart --anywhere`): its
    /// `sha256:<hex>` digest and size.
    ParkedBlob {
        vps: u64,
        digest: &'a str,
        size: u64,
    },
}

impl Source<'_> {
    fn label(&self) -> String {
        match self {
            Source::Environment(name) => format!("environment {name:?}"),
            Source::ParkedBlob { vps, digest, .. } => {
                format!("blob {digest} of VPS {vps}'s parked copy")
            }
        }
    }

    /// Its size and SHA-256 now.
    async fn meta(&self, host: &HostClient) -> Result<(u64, String), HostCallError> {
        Ok(match self {
            Source::Environment(name) => {
                let m = host.environment(name).await?;
                (m.size_bytes, m.sha256)
            }
            // Named by its digest: what it is cannot change.
            Source::ParkedBlob { digest, size, .. } => {
                (*size, digest.trim_start_matches("sha256:").to_string())
            }
        })
    }

    async fn open(
        &self,
        host: &HostClient,
        from: u64,
        sha256: &str,
    ) -> Result<reqwest::Response, HostCallError> {
        match self {
            Source::Environment(name) => host.environment_archive(name, from, sha256).await,
            Source::ParkedBlob { vps, digest, .. } => {
                host.parked_blob(*vps, digest, from, sha256).await
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("asking the host for {what}")]
    Host {
        what: String,
        #[source]
        source: HostCallError,
    },
    #[error("reading {what} from the host")]
    Read {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{what}: the host sent nothing for a minute (after {after} bytes)")]
    Stalled { what: String, after: u64 },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} from the host has SHA-256 {got}, not {want}: the copy was thrown away")]
    Mismatch {
        what: String,
        got: String,
        want: String,
    },
}

/// A verified archive in the cache, and how many bytes this call fetched.
#[derive(Debug)]
pub struct Fetched {
    pub path: PathBuf,
    pub bytes_fetched: u64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The cached copy of a digest, and the partial one while it is fetched.
fn cache_names(dir: &Path, sha256: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("sha256-{sha256}.tar")),
        dir.join(format!("sha256-{sha256}.tar.part")),
    )
}

/// Where a fetch starts: what a partial copy already holds, unless it is
/// longer than the archive (then it is no copy of it).
pub fn resume_from(partial_len: Option<u64>, size: u64) -> u64 {
    partial_len.filter(|&n| n <= size).unwrap_or(0)
}

/// The digest state of the first `len` bytes of `path` (a partial copy).
fn hash_prefix(path: &Path, len: u64) -> std::io::Result<Sha256> {
    let mut h = Sha256::new();
    let n = std::io::copy(
        &mut std::io::Read::take(std::fs::File::open(path)?, len),
        &mut h,
    )?;
    if n != len {
        return Err(std::io::Error::other(format!(
            "{n} of {len} bytes in the partial copy"
        )));
    }
    Ok(h)
}

/// How long a fetch waits for the next bytes before it gives up on the
/// connection (and tries again from where it got).
const STALL: Duration = Duration::from_secs(60);

/// Tries of one fetch: a cut connection resumes, a changed archive starts
/// again with its new digest.
const TRIES: usize = 3;

/// Whether trying again may help: the host or the connection failed, the
/// archive changed meanwhile (412), or the copy did not check out (its
/// `.part` is gone, so the next try starts from 0).
fn worth_retrying(e: &FetchError) -> bool {
    match e {
        FetchError::Host { source, .. } => match source {
            HostCallError::Refused { status, .. } => {
                *status == reqwest::StatusCode::PRECONDITION_FAILED
            }
            _ => true,
        },
        FetchError::Read { .. } | FetchError::Stalled { .. } | FetchError::Mismatch { .. } => true,
        FetchError::Io { .. } => false,
    }
}

/// `source` in the node's cache at `dir`, fetched from the host if the
/// cache lacks its current version.
pub async fn fetch(
    host: &HostClient,
    dir: &Path,
    source: Source<'_>,
    progress: &Progress,
) -> Result<Fetched, FetchError> {
    let mut tries = 0;
    loop {
        tries += 1;
        match fetch_once(host, dir, source, progress).await {
            Err(e) if tries < TRIES && worth_retrying(&e) => {
                tracing::warn!(what = %source.label(), error = %crate::error_chain(&e), "fetching it again");
            }
            other => return other,
        }
    }
}

async fn fetch_once(
    host: &HostClient,
    dir: &Path,
    source: Source<'_>,
    progress: &Progress,
) -> Result<Fetched, FetchError> {
    let what = source.label();
    let host_err = |e| FetchError::Host {
        what: what.clone(),
        source: e,
    };
    let (size_bytes, sha256) = source.meta(host).await.map_err(host_err)?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let (done, part) = cache_names(dir, &sha256);
    if std::fs::metadata(&done).is_ok_and(|m| m.len() == size_bytes) {
        return Ok(Fetched {
            path: done,
            bytes_fetched: 0,
        });
    }
    // Partial copies of other versions (the archive changed on the host
    // while one was fetched) will never be completed. Fetches on a node
    // take turns (the runner's image lock), so none is being written.
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "part") && p != part {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    let mut from = resume_from(std::fs::metadata(&part).ok().map(|m| m.len()), size_bytes);
    let mut got = 0u64;
    // The digest grows with the copy: what the part already held is read
    // once (to resume), what arrives is hashed as it is written, so the
    // archive is never read back whole.
    let mut hasher = Sha256::new();
    // A copy already whole (cut off just before its check) needs no bytes.
    if from < size_bytes {
        let mut resp = source.open(host, from, &sha256).await.map_err(host_err)?;
        if from > 0 && resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
            // The whole archive came back: start the copy again.
            from = 0;
        }
        if from > 0 {
            hasher = tokio::task::block_in_place(|| hash_prefix(&part, from)).map_err(io(&part))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(from == 0)
            .append(from > 0)
            .open(&part)
            .map_err(io(&part))?;
        loop {
            let chunk = tokio::time::timeout(STALL, resp.chunk())
                .await
                .map_err(|_| FetchError::Stalled {
                    what: what.clone(),
                    after: from + got,
                })?
                .map_err(|source| FetchError::Read {
                    what: what.clone(),
                    source,
                })?;
            let Some(chunk) = chunk else { break };
            // Disk writes off the runtime's async threads.
            tokio::task::block_in_place(|| file.write_all(&chunk)).map_err(io(&part))?;
            hasher.update(&chunk);
            got += chunk.len() as u64;
            progress.report("fetching", from + got, size_bytes);
        }
        tokio::task::block_in_place(|| file.sync_all()).map_err(io(&part))?;
    } else {
        hasher = tokio::task::block_in_place(|| hash_prefix(&part, from)).map_err(io(&part))?;
    }
    let digest = hex::encode(hasher.finalize());
    if digest != sha256 {
        let _ = std::fs::remove_file(&part);
        return Err(FetchError::Mismatch {
            what,
            got: digest,
            want: sha256,
        });
    }
    std::fs::rename(&part, &done).map_err(io(&done))?;
    // The environment's older copy, if it had one, is of no more use.
    if let Source::Environment(name) = source {
        let current = dir.join(format!("{name}.sha256"));
        if let Ok(old) = std::fs::read_to_string(&current) {
            if old.trim() != sha256 {
                let (old_done, old_part) = cache_names(dir, old.trim());
                let _ = std::fs::remove_file(old_done);
                let _ = std::fs::remove_file(old_part);
            }
        }
        crate::files::write_public(&current, sha256.as_bytes()).map_err(io(&current))?;
    }
    match source {
        Source::Environment(name) => {
            tracing::info!(environment = %name, bytes = got, from, sha256 = %sha256, "environment fetched from the host")
        }
        Source::ParkedBlob { vps, digest, .. } => {
            tracing::debug!(
                task = vps,
                blob = digest,
                bytes = got,
                from,
                "parked blob fetched from the host"
            )
        }
    }
    Ok(Fetched {
        path: done,
        bytes_fetched: got,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_copy_is_resumed_unless_it_is_too_long() {
        assert_eq!(resume_from(None, 100), 0);
        assert_eq!(resume_from(Some(40), 100), 40);
        assert_eq!(resume_from(Some(100), 100), 100);
        assert_eq!(resume_from(Some(101), 100), 0);
    }

    #[test]
    fn a_copy_is_named_by_its_digest() {
        let (done, part) = cache_names(Path::new("/c"), "ab12");
        assert_eq!(done, Path::new("/c/sha256-ab12.tar"));
        assert_eq!(part, Path::new("/c/sha256-ab12.tar.part"));
    }
}

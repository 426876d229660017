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

use std::collections::{HashMap, HashSet};

use super::container::TaskContext;
use super::driver::InstanceError;
use crate::api::host_client::{HostCallError, HostClient};
use crate::api::ArchiveBlob;
use crate::oci::{ImportedImage, Progress};

/// What is fetched from the host.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    /// An environment archive, by name.
    Environment(&'a str),
    /// A blob of an OCI layout archive: its `sha256:<hex>` digest and size.
    Blob {
        of: BlobOf<'a>,
        digest: &'a str,
        size: u64,
    },
}

/// The archive on the host a blob is of.
#[derive(Clone, Copy, Debug)]
pub enum BlobOf<'a> {
    /// An environment archive, by name.
    Environment(&'a str),
    /// VPS `id`'s parked copy (`vps restart --anywhere`).
    Parked(u64),
    /// VPS `id`'s snapshots on the node it left, read from that node's
    /// runner (`url`) with a grant (a move node to node).
    Node {
        id: u64,
        node: &'a str,
        url: &'a str,
        grant: &'a str,
    },
}

impl std::fmt::Display for BlobOf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlobOf::Environment(name) => write!(f, "environment {name:?}"),
            BlobOf::Parked(id) => write!(f, "VPS {id}'s parked copy"),
            BlobOf::Node { id, node, .. } => write!(f, "VPS {id}'s snapshots on node {node}"),
        }
    }
}

impl BlobOf<'_> {
    /// Where its blobs come from, for the log.
    pub fn origin(&self) -> String {
        match self {
            BlobOf::Node { node, .. } => format!("node {node}"),
            _ => "the host".into(),
        }
    }
}

impl Source<'_> {
    fn label(&self) -> String {
        match self {
            Source::Environment(name) => format!("environment {name:?}"),
            Source::Blob { of, digest, .. } => format!("blob {digest} of {of}"),
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
            Source::Blob { digest, size, .. } => {
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
            Source::Blob { of, digest, .. } => {
                let of = match of {
                    BlobOf::Environment(name) => format!("environments/{name}"),
                    BlobOf::Parked(id) => format!("parked/{id}"),
                    BlobOf::Node { id, url, grant, .. } => {
                        return host.node_blob((url, grant), *id, digest, from).await
                    }
                };
                host.archive_blob(&of, digest, from, sha256).await
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("asking for {what}")]
    Host {
        what: String,
        #[source]
        source: HostCallError,
    },
    #[error("reading {what}")]
    Read {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{what}: nothing came for a minute (after {after} bytes)")]
    Stalled { what: String, after: u64 },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} has SHA-256 {got}, not {want}: the copy was thrown away")]
    Mismatch {
        what: String,
        got: String,
        want: String,
    },
}

impl FetchError {
    /// What was fetched changed on the host meanwhile (a 412): its new
    /// version is to be asked for.
    pub fn changed_on_host(&self) -> bool {
        matches!(self, FetchError::Host { source: HostCallError::Refused { status, .. }, .. }
            if *status == reqwest::StatusCode::PRECONDITION_FAILED)
    }
}

/// Removes environment `name`'s copy fetched whole (unless it is of the
/// digest `except`), and the file naming it, from the cache at `dir`.
pub fn forget_whole(dir: &Path, name: &str, except: Option<&str>) {
    let current = dir.join(format!("{name}.sha256"));
    if let Ok(old) = std::fs::read_to_string(&current) {
        if Some(old.trim()) != except {
            let (done, part) = cache_names(dir, old.trim());
            let _ = std::fs::remove_file(done);
            let _ = std::fs::remove_file(part);
        }
    }
    let _ = std::fs::remove_file(current);
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
    // (Blobs: `fetch_image` keeps the cache to the import under way.)
    if let (Source::Environment(_), Ok(entries)) = (source, std::fs::read_dir(dir)) {
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
        forget_whole(dir, name, Some(&sha256));
        let current = dir.join(format!("{name}.sha256"));
        crate::files::write_public(&current, sha256.as_bytes()).map_err(io(&current))?;
    }
    match source {
        Source::Environment(name) => {
            tracing::info!(environment = %name, bytes = got, from, sha256 = %sha256, "environment fetched from the host")
        }
        Source::Blob { of, digest, .. } => {
            tracing::debug!(
                blob = digest,
                bytes = got,
                from,
                "blob of {of} fetched from {}",
                of.origin()
            )
        }
    }
    Ok(Fetched {
        path: done,
        bytes_fetched: got,
    })
}

/// An archive on the host listed blob by blob: its manifest, its config
/// and layers, and its whole SHA-256 (recorded on the image made of it).
#[derive(Clone, Copy)]
pub struct Image<'a> {
    pub manifest: Option<&'a ArchiveBlob>,
    pub blobs: &'a [ArchiveBlob],
    pub sha256: &'a str,
}

/// `sha256:` and 64 hex digits: a blob name that is safe as a file name.
fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The blobs of an image a node fetches: its manifest and config always
/// (small, and the image is made of them), and each layer its content
/// store does not hold (`held`): the base layers of an image the node
/// already runs do not travel again.
pub fn blobs_to_fetch<'a>(image: Image<'a>, held: &HashSet<String>) -> Vec<&'a ArchiveBlob> {
    let (config, layers) = image
        .blobs
        .split_first()
        .map_or((None, &[][..]), |(c, l)| (Some(c), l));
    image
        .manifest
        .into_iter()
        .chain(config)
        .chain(layers.iter().filter(|l| !held.contains(&l.digest)))
        .collect()
}

impl TaskContext {
    /// Image `name` from `image` on the host (`of`): the blobs this node
    /// lacks fetched into its blob cache (resumable, checked against their
    /// digests), imported with the layers its containerd holds, which a
    /// lease keeps meanwhile. The cache holds only the import under way:
    /// what an earlier one left is removed first, what this one fetched
    /// once it is in. The caller holds the image lock.
    pub async fn fetch_image(
        &self,
        of: BlobOf<'_>,
        image: Image<'_>,
        name: &str,
        progress: &Progress,
    ) -> Result<ImportedImage, InstanceError> {
        let lease = self.ctd.create_lease().await?;
        let imported = self.fetch_leased(of, image, name, &lease, progress).await;
        self.ctd.delete_lease(&lease).await;
        imported
    }

    async fn fetch_leased(
        &self,
        of: BlobOf<'_>,
        image: Image<'_>,
        name: &str,
        lease: &str,
        progress: &Progress,
    ) -> Result<ImportedImage, InstanceError> {
        let damaged = |what: String| InstanceError::DamagedArchive {
            of: of.to_string(),
            what,
            remedy: match of {
                BlobOf::Environment(name) => {
                    format!("replace SHARED_DIR/environments/{name}.tar on the host")
                }
                BlobOf::Parked(id) => {
                    format!("start VPS {id} on its own node and stop it again, to park it anew")
                }
                BlobOf::Node { id, node, .. } => {
                    format!("start VPS {id} on node {node} and stop it again, to snapshot it anew")
                }
            },
        };
        let manifest = image
            .manifest
            .ok_or_else(|| damaged("it lists no manifest".into()))?;
        if let Some(b) = std::iter::once(manifest)
            .chain(image.blobs)
            .find(|b| !valid_digest(&b.digest))
        {
            return Err(damaged(format!("{:?} is no sha256 digest", b.digest)));
        }
        // Leased before they are looked for: a layer found cannot be
        // collected before the image that holds it again is made.
        let mut held = HashSet::new();
        for b in image.blobs {
            self.ctd.lease_content(lease, &b.digest).await?;
            if self.ctd.has_blob(&b.digest).await? {
                held.insert(b.digest.clone());
            }
        }
        let wanted = blobs_to_fetch(image, &held);
        let cache = self.config.data_dir.join(super::STATE_DIR).join("blobs");
        let name_of =
            |b: &ArchiveBlob| format!("sha256-{}", b.digest.trim_start_matches("sha256:"));
        if let Ok(entries) = std::fs::read_dir(&cache) {
            // Imports take turns (the image lock): none is using these.
            for e in entries.flatten() {
                let f = e.file_name().to_string_lossy().into_owned();
                if !wanted.iter().any(|b| f.starts_with(&name_of(b))) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let mut files = HashMap::new();
        let mut fetched = 0u64;
        for b in &wanted {
            let source = Source::Blob {
                of,
                digest: &b.digest,
                size: b.size,
            };
            let got = fetch(&self.host, &cache, source, progress).await?;
            fetched += got.bytes_fetched;
            files.insert(b.digest.clone(), got.path);
        }
        let skipped = image
            .blobs
            .iter()
            .filter(|b| !wanted.iter().any(|w| w.digest == b.digest));
        tracing::info!(
            blobs = wanted.len(),
            bytes = fetched,
            layers_skipped = skipped.clone().count(),
            bytes_skipped = skipped.map(|b| b.size).sum::<u64>(),
            "{of} fetched from {}",
            of.origin()
        );
        let m = &files[&manifest.digest];
        let manifest_bytes = std::fs::read(m).map_err(|source| InstanceError::Io {
            path: m.clone(),
            source,
        })?;
        let size = i64::try_from(manifest.size)
            .map_err(|_| damaged(format!("its manifest has {} bytes", manifest.size)))?;
        let paths: Vec<PathBuf> = files.values().cloned().collect();
        let imported = self
            .ctd
            .import_blobs(
                name,
                (&manifest.media_type, &manifest.digest, size),
                manifest_bytes,
                files,
                image.sha256,
                lease,
                progress,
            )
            .await?;
        for p in paths {
            let _ = std::fs::remove_file(p);
        }
        Ok(imported)
    }
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

    #[test]
    fn the_manifest_the_config_and_the_layers_not_held_are_fetched() {
        let blob = |n: u8| crate::api::ArchiveBlob {
            media_type: String::new(),
            digest: format!("sha256:{}", hex::encode([n; 32])),
            size: u64::from(n),
            offset: 0,
        };
        let (manifest, blobs) = (blob(1), [blob(2), blob(3), blob(4)]);
        let image = Image {
            manifest: Some(&manifest),
            blobs: &blobs,
            sha256: "",
        };
        let digests = |held: &[u8]| {
            let held = held.iter().map(|&n| blob(n).digest).collect();
            blobs_to_fetch(image, &held)
                .iter()
                .map(|b| b.size as u8)
                .collect::<Vec<_>>()
        };
        assert_eq!(digests(&[]), [1, 2, 3, 4], "a node with none of it");
        assert_eq!(digests(&[3]), [1, 2, 4], "the base layer is held");
        assert_eq!(digests(&[1, 2, 3, 4]), [1, 2], "manifest and config always");
        assert!(valid_digest(&blob(9).digest));
        for bad in ["", "sha256:../../etc/passwd", "sha512:ab", "sha256:abc"] {
            assert!(!valid_digest(bad), "{bad}");
        }
    }
}

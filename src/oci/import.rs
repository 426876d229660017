//! Environments from archives: an OCI image layout (`umoci`, `skopeo copy
//! oci-archive:`, new `docker save`) or a classic `docker save` archive is
//! written into containerd's content store, recorded as an image, and its
//! layers applied to snapshots with containerd's diff service — all
//! client-side, so containerd 1.6 (which has no Transfer service) works.
//! An archive whose digest matches the imported image is not imported again.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::snapshots::{
    snapshots_client::SnapshotsClient, CommitSnapshotRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    content_client::ContentClient, diff_client::DiffClient, images_client::ImagesClient,
    leases_client::LeasesClient, ApplyRequest, CreateImageRequest, GetImageRequest, Image,
    InfoRequest, UpdateImageRequest, WriteAction, WriteContentRequest,
};
use containerd_client::tonic;
use containerd_client::types::Descriptor;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{Containerd, OciError};

pub(super) const MANIFEST_OCI: &str = "application/vnd.oci.image.manifest.v1+json";
pub(super) const MANIFEST_DOCKER: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub(super) const INDEX_OCI: &str = "application/vnd.oci.image.index.v1+json";
pub(super) const INDEX_DOCKER: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const CONFIG_OCI: &str = "application/vnd.oci.image.config.v1+json";
const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Label recording which archive an image came from.
pub const ARCHIVE_LABEL: &str = "io.rivernode.archive-digest";
const CHUNK: usize = 1 << 20;
/// Leases outlive any import or commit; they are deleted when the work ends.
const LEASE_LIFETIME_S: i64 = 24 * 3600;

/// An OCI descriptor, as an index and a manifest hold them.
#[derive(Clone, Debug, Deserialize)]
pub struct Desc {
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    pub digest: String,
    pub size: i64,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

/// An image index (a layout's `index.json`, or a nested one).
#[derive(Debug, Deserialize)]
pub struct Index {
    pub manifests: Vec<Desc>,
}

/// An image manifest: its config and layers.
#[derive(Debug, Deserialize)]
pub struct Manifest {
    pub config: Desc,
    pub layers: Vec<Desc>,
}

/// Whether a descriptor of this media type is an index (one manifest per
/// platform), to descend through.
pub fn is_index(media_type: &str) -> bool {
    media_type == INDEX_OCI || media_type == INDEX_DOCKER
}

/// The manifest of an archive's index an import takes: the linux/amd64
/// one, or else the first.
pub fn pick_manifest(index: &Index) -> Option<&Desc> {
    linux_amd64(index).or_else(|| index.manifests.first())
}

#[derive(Debug, Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// The parts of an image config the runtime spec needs.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ImageConfig {
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
    #[serde(rename = "User", default)]
    pub user: Option<String>,
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    /// The signal that asks its main process to stop (`SIGINT`, `INT`, `2`).
    #[serde(rename = "StopSignal", default)]
    pub stop_signal: Option<String>,
    /// `EXPOSE`: `{"8080/tcp": {}, "53/udp": {}}`.
    #[serde(rename = "ExposedPorts", default)]
    pub exposed_ports: Option<std::collections::BTreeMap<String, serde_json::Value>>,
}

impl ImageConfig {
    /// The image's `EXPOSE`d ports as publish requests (TCP when the
    /// protocol is not named; what is no port is left out).
    pub fn exposed(&self) -> Vec<crate::api::ports::PortRequest> {
        let mut out: Vec<crate::api::ports::PortRequest> = self
            .exposed_ports
            .iter()
            .flatten()
            .filter_map(|(k, _)| crate::api::ports::PortRequest::parse(k).ok())
            .filter(|r| !r.is_identity())
            .collect();
        out.dedup();
        out
    }

    /// What the image runs when nothing else is asked: Entrypoint then Cmd,
    /// as Docker starts it; empty when the image names neither.
    pub fn default_command(&self) -> Vec<String> {
        self.command_with(&[])
    }

    /// Entrypoint with `args` in place of Cmd (Docker's `run IMAGE ARGS`);
    /// with no `args`, Entrypoint then Cmd.
    pub fn command_with(&self, args: &[String]) -> Vec<String> {
        let mut argv = self.entrypoint.clone().unwrap_or_default();
        if args.is_empty() {
            argv.extend(self.cmd.clone().unwrap_or_default());
        } else {
            argv.extend(args.iter().cloned());
        }
        argv
    }

    /// The number of its StopSignal, when it names one this knows.
    pub fn stop_signal_number(&self) -> Option<i32> {
        let s = self.stop_signal.as_deref()?.trim();
        if let Ok(n) = s.parse::<i32>() {
            return (1..=64).contains(&n).then_some(n);
        }
        let name = s.to_ascii_uppercase();
        let name = name.strip_prefix("SIG").unwrap_or(&name);
        nix::sys::signal::Signal::iterator()
            .find(|sig| sig.as_str().strip_prefix("SIG") == Some(name))
            .map(|sig| sig as i32)
    }
}

#[derive(Debug, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ImageConfig>,
    rootfs: RootFs,
}

#[derive(Debug, Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// An image ready to run: its top snapshot (chain ID) and config.
#[derive(Clone, Debug)]
pub struct ImportedImage {
    pub name: String,
    /// Digest of its manifest (containers record it: see `BASE_MANIFEST_LABEL`).
    pub manifest: String,
    pub top_chain: String,
    pub config: ImageConfig,
}

/// Snapshot names of each layer stacked on the ones below (OCI chain IDs).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {d}").as_bytes()))
            ),
        };
        out.push(next);
    }
    out
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

fn to_descriptor(d: &Desc) -> Descriptor {
    Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: d.size,
        annotations: Default::default(),
    }
}

/// The linux/amd64 entry of an image index.
pub(super) fn linux_amd64(index: &Index) -> Option<&Desc> {
    index.manifests.iter().find(|m| {
        m.platform
            .as_ref()
            .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
    })
}

/// An archive unpacked into a private temporary directory.
pub(super) struct Layout {
    /// The archive's extracted files, removed with the layout (none when
    /// the blobs are files the caller keeps).
    pub(super) dir: Option<PathBuf>,
    /// digest → file, for every blob we may upload.
    pub(super) blobs: HashMap<String, PathBuf>,
    pub(super) manifest: Desc,
    pub(super) manifest_bytes: Vec<u8>,
    pub(super) config: Desc,
    pub(super) layers: Vec<Desc>,
}

impl Drop for Layout {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn archive_err(path: &Path, message: impl Into<String>) -> OciError {
    OciError::Archive {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Reads an archive's layout as an import would, then removes what it
/// unpacked: whether `archive` is one rivernode can import (the fuzz target
/// of the archive reader).
pub fn check_archive(archive: &Path, scratch: &Path) -> Result<(), OciError> {
    read_layout(archive, scratch)?;
    Ok(())
}

fn read_layout(archive: &Path, scratch: &Path) -> Result<Layout, OciError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| OciError::Io { path: p, source }
    };
    let dir = scratch.join(format!(
        "import-{}-{}",
        std::process::id(),
        crate::now_unix_ms()
    ));
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let file = std::fs::File::open(archive).map_err(io(archive))?;
    let mut t = tar::Archive::new(file);
    t.set_preserve_permissions(false);
    t.set_overwrite(true);
    // unpack() refuses entries that would escape `dir` ("../", absolute links).
    t.unpack(&dir)
        .map_err(|e| archive_err(archive, format!("not a tar archive: {e}")))?;
    let mut layout = Layout {
        dir: Some(dir.clone()),
        blobs: HashMap::new(),
        manifest: Desc {
            media_type: String::new(),
            digest: String::new(),
            size: 0,
            platform: None,
        },
        manifest_bytes: Vec::new(),
        config: Desc {
            media_type: String::new(),
            digest: String::new(),
            size: 0,
            platform: None,
        },
        layers: Vec::new(),
    };
    let read_json = |p: &Path| -> Result<Vec<u8>, OciError> { std::fs::read(p).map_err(io(p)) };
    let blob_path = |digest: &str| -> Result<PathBuf, OciError> {
        let (alg, hex) = digest
            .split_once(':')
            .ok_or_else(|| archive_err(archive, format!("bad digest {digest:?}")))?;
        if alg != "sha256" || hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(archive_err(
                archive,
                format!("unsupported digest {digest:?}"),
            ));
        }
        Ok(dir.join("blobs/sha256").join(hex))
    };
    if dir.join("index.json").exists() {
        let mut index: Index = serde_json::from_slice(&read_json(&dir.join("index.json"))?)
            .map_err(|e| archive_err(archive, format!("index.json: {e}")))?;
        // Descend through nested indexes to a linux/amd64 (or the only) manifest.
        let manifest = loop {
            let pick = pick_manifest(&index)
                .cloned()
                .ok_or_else(|| archive_err(archive, "index.json lists no manifest"))?;
            if is_index(&pick.media_type) {
                index = serde_json::from_slice(&read_json(&blob_path(&pick.digest)?)?)
                    .map_err(|e| archive_err(archive, format!("nested index: {e}")))?;
                continue;
            }
            break pick;
        };
        let bytes = read_json(&blob_path(&manifest.digest)?)?;
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| archive_err(archive, format!("manifest: {e}")))?;
        for d in std::iter::once(&m.config).chain(&m.layers) {
            layout.blobs.insert(d.digest.clone(), blob_path(&d.digest)?);
        }
        layout.manifest = Desc {
            media_type: if manifest.media_type.is_empty() {
                MANIFEST_OCI.into()
            } else {
                manifest.media_type
            },
            ..manifest
        };
        layout.manifest_bytes = bytes;
        layout.config = m.config;
        layout.layers = m.layers;
    } else if dir.join("manifest.json").exists() {
        // Classic `docker save`: layers are plain tars named by directory; build an OCI manifest.
        let entries: Vec<DockerEntry> =
            serde_json::from_slice(&read_json(&dir.join("manifest.json"))?)
                .map_err(|e| archive_err(archive, format!("manifest.json: {e}")))?;
        let e = entries
            .into_iter()
            .next()
            .ok_or_else(|| archive_err(archive, "manifest.json lists no image"))?;
        let describe = |rel: &str, media_type: &str| -> Result<(Desc, PathBuf), OciError> {
            if rel.contains("..") || rel.starts_with('/') {
                return Err(archive_err(
                    archive,
                    format!("path {rel:?} leaves the archive"),
                ));
            }
            let p = dir.join(rel);
            let size = std::fs::metadata(&p).map_err(io(&p))?.len() as i64;
            let digest = sha256_file(&p).map_err(io(&p))?;
            Ok((
                Desc {
                    media_type: media_type.into(),
                    digest,
                    size,
                    platform: None,
                },
                p,
            ))
        };
        let (config, cp) = describe(&e.config, CONFIG_OCI)?;
        layout.blobs.insert(config.digest.clone(), cp);
        for l in &e.layers {
            let (d, p) = describe(l, LAYER_TAR)?;
            layout.blobs.insert(d.digest.clone(), p);
            layout.layers.push(d);
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_OCI,
            "config": {"mediaType": CONFIG_OCI, "digest": config.digest, "size": config.size},
            "layers": layout.layers.iter().map(|l| serde_json::json!({
                "mediaType": l.media_type, "digest": l.digest, "size": l.size,
            })).collect::<Vec<_>>(),
        });
        layout.manifest_bytes =
            serde_json::to_vec(&manifest).map_err(|e| archive_err(archive, e.to_string()))?;
        layout.manifest = Desc {
            media_type: MANIFEST_OCI.into(),
            digest: format!(
                "sha256:{}",
                hex::encode(Sha256::digest(&layout.manifest_bytes))
            ),
            size: layout.manifest_bytes.len() as i64,
            platform: None,
        };
        layout.config = config;
    } else {
        return Err(archive_err(
            archive,
            "neither an OCI image layout (index.json) nor a docker save archive (manifest.json)",
        ));
    }
    if layout.manifest.media_type != MANIFEST_OCI && layout.manifest.media_type != MANIFEST_DOCKER {
        return Err(archive_err(
            archive,
            format!("unsupported manifest type {}", layout.manifest.media_type),
        ));
    }
    Ok(layout)
}

impl Containerd {
    /// Imports `archive` as image `name` (unless the image already came from
    /// an archive with the same digest) and unpacks it. `scratch` holds the
    /// archive's extracted files while importing.
    pub async fn import_archive(
        &self,
        name: &str,
        archive: &Path,
        scratch: &Path,
        progress: &super::Progress,
    ) -> Result<ImportedImage, OciError> {
        let a = archive.to_path_buf();
        let digest = tokio::task::spawn_blocking(move || sha256_file(&a))
            .await
            .map_err(|e| archive_err(archive, e.to_string()))?
            .map_err(|source| OciError::Io {
                path: archive.to_path_buf(),
                source,
            })?;
        if let Some(ready) = self.imported_from(name, &digest).await? {
            return Ok(ready);
        }
        tracing::info!(image = name, archive = %archive.display(), "importing environment");
        let (a, s) = (archive.to_path_buf(), scratch.to_path_buf());
        let layout = tokio::task::spawn_blocking(move || read_layout(&a, &s))
            .await
            .map_err(|e| archive_err(archive, e.to_string()))??;
        let lease = self.create_lease().await?;
        let result = self
            .store_and_unpack(name, &layout, &digest, &lease, "importing", progress)
            .await;
        self.delete_lease(&lease).await;
        result
    }

    /// Imports image `name` from its manifest (`manifest`, and its bytes)
    /// and the blobs fetched (`blobs`: digest to file; the config among
    /// them), as an archive fetched blob by blob arrives: a layer not
    /// fetched must be in the content store already, held there by
    /// `lease`. `source` is recorded as the archive it came from.
    #[allow(clippy::too_many_arguments)]
    pub async fn import_blobs(
        &self,
        name: &str,
        manifest: (&str, &str, i64),
        manifest_bytes: Vec<u8>,
        blobs: HashMap<String, PathBuf>,
        source: &str,
        lease: &str,
        progress: &super::Progress,
    ) -> Result<ImportedImage, OciError> {
        let (media_type, digest, size) = manifest;
        let bad = |message: String| OciError::Image {
            name: name.into(),
            message,
        };
        let media_type = match media_type {
            "" => MANIFEST_OCI,
            t @ (MANIFEST_OCI | MANIFEST_DOCKER) => t,
            t => return Err(bad(format!("unsupported manifest type {t}"))),
        };
        let m: Manifest =
            serde_json::from_slice(&manifest_bytes).map_err(|e| bad(format!("manifest: {e}")))?;
        let layout = Layout {
            dir: None,
            blobs,
            manifest: Desc {
                media_type: media_type.into(),
                digest: digest.into(),
                size,
                platform: None,
            },
            manifest_bytes,
            config: m.config,
            layers: m.layers,
        };
        if !layout.blobs.contains_key(&layout.config.digest) {
            return Err(bad(format!(
                "its config {} was not fetched",
                layout.config.digest
            )));
        }
        for l in &layout.layers {
            if !layout.blobs.contains_key(&l.digest) && !self.has_blob(&l.digest).await? {
                return Err(bad(format!(
                    "layer {} is neither fetched nor in the content store",
                    l.digest
                )));
            }
        }
        self.store_and_unpack(name, &layout, source, lease, "importing", progress)
            .await
    }

    /// Image `name`, if it is made and was imported from the archive
    /// whose SHA-256 is `digest`.
    pub async fn imported_from(
        &self,
        name: &str,
        digest: &str,
    ) -> Result<Option<ImportedImage>, OciError> {
        let Some(img) = self.get_image(name).await? else {
            return Ok(None);
        };
        if img.labels.get(ARCHIVE_LABEL).map(String::as_str) != Some(digest) {
            return Ok(None);
        }
        Ok(self.image_ready(name, &img).await.ok())
    }

    pub(super) async fn store_and_unpack(
        &self,
        name: &str,
        layout: &Layout,
        archive_digest: &str,
        lease: &str,
        phase: &'static str,
        progress: &super::Progress,
    ) -> Result<ImportedImage, OciError> {
        let config_bytes =
            std::fs::read(&layout.blobs[&layout.config.digest]).map_err(|source| OciError::Io {
                path: layout.blobs[&layout.config.digest].clone(),
                source,
            })?;
        let config: ConfigFile =
            serde_json::from_slice(&config_bytes).map_err(|e| OciError::Image {
                name: name.into(),
                message: format!("config: {e}"),
            })?;
        if config.rootfs.diff_ids.len() != layout.layers.len() {
            return Err(OciError::Image {
                name: name.into(),
                message: format!(
                    "config lists {} layers, the manifest {}",
                    config.rootfs.diff_ids.len(),
                    layout.layers.len()
                ),
            });
        }
        let chains = chain_ids(&config.rootfs.diff_ids);
        let top = chains.last().cloned().ok_or_else(|| OciError::Image {
            name: name.into(),
            message: "no layers".into(),
        })?;
        let total: i64 = layout.layers.iter().map(|l| l.size).sum();
        let mut done: i64 = 0;
        progress.report(phase, 0, total.max(0) as u64);
        for (i, l) in layout.layers.iter().enumerate() {
            done += l.size;
            tracing::info!(
                image = name,
                "storing layer {}/{} ({} of {} bytes)",
                i + 1,
                layout.layers.len(),
                done,
                total
            );
            // A layer with no file is one the store holds (`import_blobs`
            // made sure, and its lease keeps it).
            if let Some(file) = layout.blobs.get(&l.digest) {
                self.upload_file(file, &l.digest, l.size, HashMap::new(), lease)
                    .await?;
            }
            progress.report(phase, done.max(0) as u64, total.max(0) as u64);
        }
        // GC labels keep the blobs and the unpacked snapshot alive as long as the image is.
        let mut config_labels = HashMap::new();
        config_labels.insert(
            format!("containerd.io/gc.ref.snapshot.{}", self.snapshotter),
            top.clone(),
        );
        self.upload_file(
            &layout.blobs[&layout.config.digest],
            &layout.config.digest,
            layout.config.size,
            config_labels,
            lease,
        )
        .await?;
        let mut manifest_labels = HashMap::new();
        manifest_labels.insert(
            "containerd.io/gc.ref.content.config".to_string(),
            layout.config.digest.clone(),
        );
        for (i, l) in layout.layers.iter().enumerate() {
            manifest_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.clone(),
            );
        }
        self.upload_bytes(
            &layout.manifest_bytes,
            &layout.manifest.digest,
            manifest_labels,
            lease,
        )
        .await?;
        let all = total.max(0) as u64;
        progress.report("unpacking", 0, all);
        self.unpack(&layout.layers, &chains, lease).await?;
        progress.report("unpacking", all, all);
        let mut labels = HashMap::new();
        labels.insert(ARCHIVE_LABEL.to_string(), archive_digest.to_string());
        let image = Image {
            name: name.to_string(),
            labels,
            target: Some(to_descriptor(&layout.manifest)),
            created_at: None,
            updated_at: None,
        };
        let mut images = ImagesClient::new(self.channel());
        let created = images
            .create(self.req(
                CreateImageRequest {
                    image: Some(image.clone()),
                    source_date_epoch: None,
                },
                Some(lease),
            ))
            .await;
        match created {
            Ok(_) => {}
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                images
                    .update(self.req(
                        UpdateImageRequest {
                            image: Some(image),
                            update_mask: None,
                            source_date_epoch: None,
                        },
                        Some(lease),
                    ))
                    .await
                    .map_err(OciError::rpc(format!("update image {name}")))?;
            }
            Err(s) => return Err(OciError::rpc(format!("create image {name}"))(s)),
        }
        Ok(ImportedImage {
            name: name.to_string(),
            manifest: layout.manifest.digest.clone(),
            top_chain: top,
            config: config.config.unwrap_or_default(),
        })
    }

    pub(crate) async fn get_image(&self, name: &str) -> Result<Option<Image>, OciError> {
        match ImagesClient::new(self.channel())
            .get(self.req(GetImageRequest { name: name.into() }, None))
            .await
        {
            Ok(r) => Ok(r.into_inner().image),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(OciError::rpc(format!("get image {name}"))(s)),
        }
    }

    /// The image's config and top snapshot, if everything it needs is present.
    pub async fn image_ready(&self, name: &str, img: &Image) -> Result<ImportedImage, OciError> {
        let target = img.target.clone().ok_or_else(|| OciError::Image {
            name: name.into(),
            message: "no target".into(),
        })?;
        let manifest: Manifest = serde_json::from_slice(&self.read_blob(&target.digest).await?)
            .map_err(|e| OciError::Image {
                name: name.into(),
                message: format!("manifest: {e}"),
            })?;
        let config: ConfigFile = serde_json::from_slice(
            &self.read_blob(&manifest.config.digest).await?,
        )
        .map_err(|e| OciError::Image {
            name: name.into(),
            message: format!("config: {e}"),
        })?;
        let top = chain_ids(&config.rootfs.diff_ids)
            .pop()
            .ok_or_else(|| OciError::Image {
                name: name.into(),
                message: "no layers".into(),
            })?;
        SnapshotsClient::new(self.channel())
            .stat(self.req(
                StatSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    key: top.clone(),
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("snapshot {top}")))?;
        Ok(ImportedImage {
            name: name.into(),
            manifest: target.digest.clone(),
            top_chain: top,
            config: config.config.unwrap_or_default(),
        })
    }

    pub(super) async fn read_blob(&self, digest: &str) -> Result<Vec<u8>, OciError> {
        use containerd_client::services::v1::ReadContentRequest;
        let mut stream = ContentClient::new(self.channel())
            .read(self.req(
                ReadContentRequest {
                    digest: digest.into(),
                    offset: 0,
                    size: 0,
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("read {digest}")))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(OciError::rpc(format!("read {digest}")))?
        {
            out.extend_from_slice(&chunk.data);
        }
        Ok(out)
    }

    pub(crate) async fn has_blob(&self, digest: &str) -> Result<bool, OciError> {
        match ContentClient::new(self.channel())
            .info(self.req(
                InfoRequest {
                    digest: digest.into(),
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(OciError::rpc(format!("content info {digest}"))(s)),
        }
    }

    pub(super) async fn upload_bytes(
        &self,
        data: &[u8],
        digest: &str,
        labels: HashMap<String, String>,
        lease: &str,
    ) -> Result<(), OciError> {
        let chunks: Vec<Vec<u8>> = data.chunks(CHUNK).map(|c| c.to_vec()).collect();
        self.write_content(chunks, data.len() as i64, digest, labels, lease)
            .await
    }

    async fn upload_file(
        &self,
        path: &Path,
        digest: &str,
        size: i64,
        labels: HashMap<String, String>,
        lease: &str,
    ) -> Result<(), OciError> {
        if labels.is_empty() && self.has_blob(digest).await? {
            return Ok(());
        }
        // Blobs of test and typical environment images are small enough to
        // hold; large layers stream through a bounded channel below.
        let p = path.to_path_buf();
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut f = std::fs::File::open(&p)?;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = f.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                buf.truncate(n);
                if tx.blocking_send(buf).is_err() {
                    return Ok(());
                }
            }
        });
        let result = self.write_stream(rx, size, digest, labels, lease).await;
        reader
            .await
            .map_err(|e| archive_err(path, e.to_string()))?
            .map_err(|source| OciError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        result
    }

    async fn write_content(
        &self,
        chunks: Vec<Vec<u8>>,
        total: i64,
        digest: &str,
        labels: HashMap<String, String>,
        lease: &str,
    ) -> Result<(), OciError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(chunks.len().max(1));
        for c in chunks {
            let _ = tx.send(c).await;
        }
        drop(tx);
        self.write_stream(rx, total, digest, labels, lease).await
    }

    /// One Content.Write session: WRITE messages carrying the data at their
    /// offsets, then COMMIT with the expected digest (containerd verifies it).
    async fn write_stream(
        &self,
        mut rx: tokio::sync::mpsc::Receiver<Vec<u8>>,
        total: i64,
        digest: &str,
        labels: HashMap<String, String>,
        lease: &str,
    ) -> Result<(), OciError> {
        let reference = format!("rivernode-{digest}");
        let expected = digest.to_string();
        let requests = async_stream(move |out| async move {
            let mut offset: i64 = 0;
            while let Some(chunk) = rx.recv().await {
                let n = chunk.len() as i64;
                let msg = WriteContentRequest {
                    action: WriteAction::Write as i32,
                    r#ref: reference.clone(),
                    total,
                    expected: expected.clone(),
                    offset,
                    data: chunk,
                    labels: HashMap::new(),
                };
                offset += n;
                if out.send(msg).await.is_err() {
                    return;
                }
            }
            let _ = out
                .send(WriteContentRequest {
                    action: WriteAction::Commit as i32,
                    r#ref: reference,
                    total,
                    expected,
                    offset,
                    data: Vec::new(),
                    labels,
                })
                .await;
        });
        let resp = ContentClient::new(self.channel())
            .write(self.req(requests, Some(lease)))
            .await;
        let mut stream = match resp {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
            Err(s) => return Err(OciError::rpc(format!("write {digest}"))(s)),
        };
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
                Err(s) => return Err(OciError::rpc(format!("write {digest}"))(s)),
            }
        }
    }

    pub(super) async fn unpack(
        &self,
        layers: &[Desc],
        chains: &[String],
        lease: &str,
    ) -> Result<(), OciError> {
        let mut snaps = SnapshotsClient::new(self.channel());
        let mut diff = DiffClient::new(self.channel());
        for (i, (layer, chain)) in layers.iter().zip(chains).enumerate() {
            let exists = snaps
                .stat(self.req(
                    StatSnapshotRequest {
                        snapshotter: self.snapshotter.clone(),
                        key: chain.clone(),
                    },
                    None,
                ))
                .await
                .is_ok();
            if exists {
                continue;
            }
            let parent = if i == 0 {
                String::new()
            } else {
                chains[i - 1].clone()
            };
            let key = format!("rivernode-unpack-{chain}-{}", crate::now_unix_ms());
            let mounts = snaps
                .prepare(self.req(
                    PrepareSnapshotRequest {
                        snapshotter: self.snapshotter.clone(),
                        key: key.clone(),
                        parent,
                        labels: HashMap::new(),
                    },
                    Some(lease),
                ))
                .await
                .map_err(OciError::rpc(format!(
                    "prepare snapshot for layer {}",
                    layer.digest
                )))?
                .into_inner()
                .mounts;
            let applied = diff
                .apply(self.req(
                    ApplyRequest {
                        diff: Some(to_descriptor(layer)),
                        mounts,
                        payloads: HashMap::new(),
                        sync_fs: false,
                    },
                    Some(lease),
                ))
                .await;
            if let Err(s) = applied {
                self.remove_snapshot(&key).await;
                return Err(OciError::rpc(format!("apply layer {}", layer.digest))(s));
            }
            let committed = snaps
                .commit(self.req(
                    CommitSnapshotRequest {
                        snapshotter: self.snapshotter.clone(),
                        name: chain.clone(),
                        key: key.clone(),
                        labels: HashMap::new(),
                    },
                    Some(lease),
                ))
                .await;
            match committed {
                Ok(_) => {}
                // Another import committed the same layer first: ours is redundant.
                Err(s) if s.code() == tonic::Code::AlreadyExists => {
                    self.remove_snapshot(&key).await
                }
                Err(s) => {
                    self.remove_snapshot(&key).await;
                    return Err(OciError::rpc(format!("commit layer {}", layer.digest))(s));
                }
            }
        }
        Ok(())
    }

    pub(crate) async fn remove_snapshot(&self, key: &str) {
        let _ = SnapshotsClient::new(self.channel())
            .remove(self.req(
                RemoveSnapshotRequest {
                    snapshotter: self.snapshotter.clone(),
                    key: key.into(),
                },
                None,
            ))
            .await;
    }

    /// A lease protects content and snapshots being written from containerd's GC.
    pub(crate) async fn create_lease(&self) -> Result<String, OciError> {
        use containerd_client::services::v1::CreateRequest;
        // Unique within the process even for leases taken in the same millisecond.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!(
            "rivernode-{}-{}-{n}",
            std::process::id(),
            crate::now_unix_ms()
        );
        // A runner that dies mid-import or mid-commit must not pin what the
        // lease holds forever: containerd's GC drops expired leases.
        let expire = prost_types::Timestamp {
            seconds: crate::now_unix_ms() / 1000 + LEASE_LIFETIME_S,
            nanos: 0,
        };
        LeasesClient::new(self.channel())
            .create(self.req(
                CreateRequest {
                    id: id.clone(),
                    labels: HashMap::from([(
                        "containerd.io/gc.expire".to_string(),
                        expire.to_string(),
                    )]),
                },
                None,
            ))
            .await
            .map_err(OciError::rpc("create lease"))?;
        Ok(id)
    }

    /// Lease `id` holds blob `digest` against containerd's GC from now on
    /// (whether or not the store has it yet).
    pub(crate) async fn lease_content(&self, id: &str, digest: &str) -> Result<(), OciError> {
        use containerd_client::services::v1::{AddResourceRequest, Resource};
        LeasesClient::new(self.channel())
            .add_resource(self.req(
                AddResourceRequest {
                    id: id.into(),
                    resource: Some(Resource {
                        id: digest.into(),
                        r#type: "content".into(),
                    }),
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("lease {digest}")))?;
        Ok(())
    }

    pub(crate) async fn delete_lease(&self, id: &str) {
        use containerd_client::services::v1::DeleteRequest;
        let _ = LeasesClient::new(self.channel())
            .delete(self.req(
                DeleteRequest {
                    id: id.into(),
                    sync: false,
                },
                None,
            ))
            .await;
    }
}

/// A stream of requests produced by an async task.
fn async_stream<T: Send + 'static, F, Fut>(produce: F) -> tokio_stream::wrappers::ReceiverStream<T>
where
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(produce(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_rule() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        let want = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("{a} {b}").as_bytes()))
        );
        assert_eq!(c[1], want);
    }

    #[test]
    fn garbage_archives_are_named() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("env.tar");
        std::fs::write(&f, b"not a tar at all, definitely not").unwrap();
        let e = read_layout(&f, d.path()).err().unwrap().to_string();
        assert!(e.contains("env.tar"), "{e}");
        // An empty tar is neither layout.
        let empty = d.path().join("empty.tar");
        tar::Builder::new(std::fs::File::create(&empty).unwrap())
            .finish()
            .unwrap();
        let e = read_layout(&empty, d.path()).err().unwrap().to_string();
        assert!(e.contains("neither an OCI image layout"), "{e}");
    }

    #[test]
    fn an_images_stop_signal_and_its_args_in_place_of_cmd() {
        let c = |stop: Option<&str>| ImageConfig {
            entrypoint: Some(vec!["/ep".into()]),
            cmd: Some(vec!["default".into()]),
            stop_signal: stop.map(str::to_string),
            ..Default::default()
        };
        assert_eq!(c(None).default_command(), ["/ep", "default"]);
        assert_eq!(c(None).command_with(&["one".into()]), ["/ep", "one"]);
        for (s, n) in [
            ("SIGINT", Some(2)),
            ("int", Some(2)),
            ("15", Some(15)),
            ("SIGRTMIN", None),
            ("99", None),
            ("nope", None),
        ] {
            assert_eq!(c(Some(s)).stop_signal_number(), n, "{s}");
        }
        assert_eq!(c(None).stop_signal_number(), None);
    }
}

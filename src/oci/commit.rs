//! A container's filesystem changes committed as a new image (VPS
//! snapshots), client-side like the import: containerd's differ writes the
//! changes as one gzip layer into the content store, then the image gets the
//! base image's config and manifest plus that layer, and its top snapshot is
//! committed so the image can run at once. Images are found again by label.
//!
//! Consistency: a running container is frozen (cgroup freezer) while the
//! differ reads its filesystem and thawed right after, so the layer is what
//! a power cut at that instant would leave: crash-consistent, not
//! application-consistent (buffers inside processes are not flushed).

use std::collections::HashMap;

use containerd_client::services::v1::snapshots::{
    snapshots_client::SnapshotsClient, MountsRequest, StatSnapshotRequest, ViewSnapshotRequest,
};
use containerd_client::services::v1::{
    containers_client::ContainersClient, content_client::ContentClient, diff_client::DiffClient,
    images_client::ImagesClient, CreateImageRequest, DeleteImageRequest, DiffRequest,
    GetContainerRequest, Image, InfoRequest, ListImagesRequest, UpdateImageRequest,
};
use containerd_client::tonic;
use containerd_client::types::Descriptor;
use sha2::{Digest, Sha256};

use super::import::{chain_ids, Desc, Manifest, MANIFEST_DOCKER};
use super::{Containerd, OciError, TaskStatus};

/// Container label naming the manifest it was created from. As a GC
/// reference it keeps that manifest (and through its own labels, the config
/// and layers) alive while the container exists, so the container can be
/// committed even after its image was replaced or deleted.
pub const BASE_MANIFEST_LABEL: &str = "containerd.io/gc.ref.content.image";

const LAYER_GZIP_OCI: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const LAYER_GZIP_DOCKER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Image label set by a commit: bytes of its own (compressed) layer.
pub const COMMIT_SIZE_LABEL: &str = "io.rivernode.commit.layer-size";
/// Set by containerd's differ on a compressed layer: its uncompressed digest.
const UNCOMPRESSED_LABEL: &str = "containerd.io/uncompressed";

/// What a commit made.
#[derive(Clone, Debug)]
pub struct Committed {
    pub name: String,
    /// Bytes of the new (compressed) layer: the size of the changes.
    pub layer_size: u64,
}

/// The new config: the base's, with one more layer and a history entry.
pub(super) fn committed_config(
    base: &serde_json::Value,
    diff_id: &str,
    created: &str,
    comment: &str,
) -> Result<serde_json::Value, String> {
    let mut config = base.clone();
    let obj = config
        .as_object_mut()
        .ok_or("the base image config is not a JSON object")?;
    obj.insert("created".into(), created.into());
    let diff_ids = obj
        .get_mut("rootfs")
        .and_then(|r| r.get_mut("diff_ids"))
        .and_then(|d| d.as_array_mut())
        .ok_or("the base image config has no rootfs.diff_ids")?;
    diff_ids.push(diff_id.into());
    let entry = serde_json::json!({
        "created": created,
        "created_by": "rivernode snapshot",
        "comment": comment,
    });
    match obj.get_mut("history").and_then(|h| h.as_array_mut()) {
        Some(h) => h.push(entry),
        None => {
            obj.insert("history".into(), serde_json::json!([entry]));
        }
    }
    Ok(config)
}

/// The new manifest: the base's, pointing at the new config, with the new layer on top.
pub(super) fn committed_manifest(
    base: &serde_json::Value,
    config: &Descriptor,
    layer: &Descriptor,
) -> Result<serde_json::Value, String> {
    let mut m = base.clone();
    let obj = m
        .as_object_mut()
        .ok_or("the base manifest is not a JSON object")?;
    let docker = obj.get("mediaType").and_then(|t| t.as_str()) == Some(MANIFEST_DOCKER);
    let config_type = obj
        .get("config")
        .and_then(|c| c.get("mediaType"))
        .cloned()
        .unwrap_or_else(|| config.media_type.clone().into());
    obj.insert(
        "config".into(),
        serde_json::json!({"mediaType": config_type, "digest": config.digest, "size": config.size}),
    );
    let layer_type = if docker {
        LAYER_GZIP_DOCKER
    } else {
        LAYER_GZIP_OCI
    };
    obj.get_mut("layers")
        .and_then(|l| l.as_array_mut())
        .ok_or("the base manifest has no layers")?
        .push(serde_json::json!({"mediaType": layer_type, "digest": layer.digest, "size": layer.size}));
    Ok(m)
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A containerd filter matching images with every one of these labels
/// (a comma is containerd's "and").
pub(super) fn label_filter(labels: &[(&str, &str)]) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("labels.\"{k}\"==\"{v}\""))
        .collect::<Vec<_>>()
        .join(",")
}

fn image_err(name: &str) -> impl Fn(String) -> OciError + '_ {
    move |message| OciError::Image {
        name: name.into(),
        message,
    }
}

impl Containerd {
    /// Commits the changes in container `cid`'s filesystem as image `name`
    /// with `labels`. A running container is frozen only while its changes
    /// are read; a paused or stopped one stays as it is.
    pub async fn commit(
        &self,
        cid: &str,
        name: &str,
        labels: HashMap<String, String>,
        comment: &str,
    ) -> Result<Committed, OciError> {
        let lease = self.create_lease().await?;
        let result = self.commit_leased(cid, name, labels, comment, &lease).await;
        self.delete_lease(&lease).await;
        result
    }

    async fn commit_leased(
        &self,
        cid: &str,
        name: &str,
        labels: HashMap<String, String>,
        comment: &str,
        lease: &str,
    ) -> Result<Committed, OciError> {
        let bad = image_err(name);
        let container = ContainersClient::new(self.channel())
            .get(self.req(GetContainerRequest { id: cid.into() }, None))
            .await
            .map_err(OciError::rpc(format!("container {cid}")))?
            .into_inner()
            .container
            .ok_or_else(|| bad(format!("container {cid} vanished")))?;
        let mut snaps = SnapshotsClient::new(self.channel());
        let parent = snaps
            .stat(self.req(
                StatSnapshotRequest {
                    snapshotter: self.snapshotter().into(),
                    key: container.snapshot_key.clone(),
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("rootfs of {cid}")))?
            .into_inner()
            .info
            .map(|i| i.parent)
            .unwrap_or_default();
        let base_digest = match container.labels.get(BASE_MANIFEST_LABEL) {
            Some(d) => d.clone(),
            None => self
                .get_image(&container.image)
                .await?
                .and_then(|i| i.target)
                .map(|t| t.digest)
                .ok_or_else(|| bad(format!("the image {} of {cid} is gone", container.image)))?,
        };
        let manifest_bytes = self.read_blob(&base_digest).await?;
        let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| bad(format!("base manifest: {e}")))?;
        let manifest_json: serde_json::Value = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| bad(format!("base manifest: {e}")))?;
        let config_json: serde_json::Value =
            serde_json::from_slice(&self.read_blob(&manifest.config.digest).await?)
                .map_err(|e| bad(format!("base config: {e}")))?;
        let mut diff_ids: Vec<String> = config_json["rootfs"]["diff_ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if chain_ids(&diff_ids).last() != Some(&parent) {
            return Err(bad(format!(
                "the filesystem of {cid} does not sit on its image's layers"
            )));
        }

        let layer = self
            .diff(cid, &container.snapshot_key, &parent, lease)
            .await?;
        let diff_id = ContentClient::new(self.channel())
            .info(self.req(
                InfoRequest {
                    digest: layer.digest.clone(),
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("info of {}", layer.digest)))?
            .into_inner()
            .info
            .and_then(|i| i.labels.get(UNCOMPRESSED_LABEL).cloned())
            .ok_or_else(|| bad("the differ did not record the layer's diff ID".into()))?;
        diff_ids.push(diff_id.clone());

        // The image's top snapshot, committed now so the image runs at once.
        let chains = chain_ids(&diff_ids);
        let top = chains.last().cloned().unwrap_or_default();
        let mut layers = manifest.layers.clone();
        layers.push(Desc {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: layer.size,
            platform: None,
        });
        self.unpack(&layers, &chains, lease).await?;

        let created = prost_types::Timestamp::from(std::time::SystemTime::now());
        let created = prost_types::Timestamp {
            nanos: 0,
            ..created
        }
        .to_string();
        let config = committed_config(&config_json, &diff_id, &created, comment).map_err(&bad)?;
        let config_bytes = serde_json::to_vec(&config).map_err(|e| bad(e.to_string()))?;
        let config_desc = Descriptor {
            media_type: manifest.config.media_type.clone(),
            digest: sha256(&config_bytes),
            size: config_bytes.len() as i64,
            annotations: Default::default(),
        };
        let snapshot_ref = HashMap::from([(
            format!("containerd.io/gc.ref.snapshot.{}", self.snapshotter()),
            top,
        )]);
        self.upload_bytes(&config_bytes, &config_desc.digest, snapshot_ref, lease)
            .await?;
        let new_manifest =
            committed_manifest(&manifest_json, &config_desc, &layer).map_err(&bad)?;
        let new_bytes = serde_json::to_vec(&new_manifest).map_err(|e| bad(e.to_string()))?;
        let mut refs = HashMap::from([(
            "containerd.io/gc.ref.content.config".to_string(),
            config_desc.digest.clone(),
        )]);
        for (i, l) in layers.iter().enumerate() {
            refs.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.clone(),
            );
        }
        let manifest_digest = sha256(&new_bytes);
        self.upload_bytes(&new_bytes, &manifest_digest, refs, lease)
            .await?;
        let mut labels = labels;
        labels.insert(COMMIT_SIZE_LABEL.into(), layer.size.max(0).to_string());
        let media_type = manifest_json["mediaType"]
            .as_str()
            .unwrap_or(super::import::MANIFEST_OCI)
            .to_string();
        ImagesClient::new(self.channel())
            .create(self.req(
                CreateImageRequest {
                    image: Some(Image {
                        name: name.into(),
                        labels,
                        target: Some(Descriptor {
                            media_type,
                            digest: manifest_digest,
                            size: new_bytes.len() as i64,
                            annotations: Default::default(),
                        }),
                        created_at: None,
                        updated_at: None,
                    }),
                    source_date_epoch: None,
                },
                Some(lease),
            ))
            .await
            .map_err(OciError::rpc(format!("create image {name}")))?;
        Ok(Committed {
            name: name.into(),
            layer_size: layer.size.max(0) as u64,
        })
    }

    /// The changes of snapshot `key` over `parent` as a gzip layer in the
    /// content store, with the container frozen meanwhile if it runs.
    async fn diff(
        &self,
        cid: &str,
        key: &str,
        parent: &str,
        lease: &str,
    ) -> Result<Descriptor, OciError> {
        let mut snaps = SnapshotsClient::new(self.channel());
        let lower_key = format!("rivernode-commit-{cid}-{}", crate::now_unix_ms());
        let lower = snaps
            .view(self.req(
                ViewSnapshotRequest {
                    snapshotter: self.snapshotter().into(),
                    key: lower_key.clone(),
                    parent: parent.into(),
                    labels: HashMap::new(),
                },
                Some(lease),
            ))
            .await
            .map_err(OciError::rpc(format!("view of the image of {cid}")))?
            .into_inner()
            .mounts;
        let froze = self.status(cid).await? == TaskStatus::Running && self.pause(cid).await.is_ok();
        let upper = snaps
            .mounts(self.req(
                MountsRequest {
                    snapshotter: self.snapshotter().into(),
                    key: key.into(),
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("rootfs of {cid}")));
        let diff = match upper {
            Ok(upper) => DiffClient::new(self.channel())
                .diff(self.req(
                    DiffRequest {
                        left: lower,
                        right: upper.into_inner().mounts,
                        media_type: LAYER_GZIP_OCI.into(),
                        // Empty: the differ picks its own ingest and cleans it up on failure.
                        r#ref: String::new(),
                        labels: HashMap::new(),
                        source_date_epoch: None,
                    },
                    Some(lease),
                ))
                .await
                .map_err(OciError::rpc(format!("diff of {cid}"))),
            Err(e) => Err(e),
        };
        if froze {
            if let Err(e) = self.resume(cid).await {
                tracing::error!(container = cid, error = %crate::error_chain(&e), "thawing after a snapshot failed");
            }
        }
        self.remove_snapshot(&lower_key).await;
        diff?.into_inner().diff.ok_or_else(|| OciError::Image {
            name: cid.into(),
            message: "the differ returned no layer".into(),
        })
    }

    /// Images that carry all of `labels`.
    pub async fn images_with_labels(
        &self,
        labels: &[(&str, &str)],
    ) -> Result<Vec<Image>, OciError> {
        let filter = label_filter(labels);
        Ok(ImagesClient::new(self.channel())
            .list(self.req(
                ListImagesRequest {
                    filters: vec![filter.clone()],
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("list images with {filter}")))?
            .into_inner()
            .images)
    }

    /// Sets one label of image `name` (the image itself is untouched).
    pub async fn set_image_label(
        &self,
        name: &str,
        key: &str,
        value: &str,
    ) -> Result<(), OciError> {
        ImagesClient::new(self.channel())
            .update(self.req(
                UpdateImageRequest {
                    image: Some(Image {
                        name: name.into(),
                        labels: HashMap::from([(key.to_string(), value.to_string())]),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec![format!("labels.{key}")],
                    }),
                    source_date_epoch: None,
                },
                None,
            ))
            .await
            .map(|_| ())
            .map_err(OciError::rpc(format!("label image {name}")))
    }

    /// Deletes an image record and waits for containerd's GC to free what
    /// only it used. `false`: there was no such image.
    pub async fn delete_image(&self, name: &str) -> Result<bool, OciError> {
        match ImagesClient::new(self.channel())
            .delete(self.req(
                DeleteImageRequest {
                    name: name.into(),
                    sync: true,
                    target: None,
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(OciError::rpc(format!("delete image {name}"))(s)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(digest: &str, size: i64) -> Descriptor {
        Descriptor {
            media_type: String::new(),
            digest: digest.into(),
            size,
            annotations: Default::default(),
        }
    }

    #[test]
    fn config_gains_the_layer_and_a_history_entry() {
        let base = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": ["sha256:a"]},
        });
        let c = committed_config(&base, "sha256:b", "2026-12-02T04:00:00Z", "snap 1").unwrap();
        assert_eq!(
            c["rootfs"]["diff_ids"],
            serde_json::json!(["sha256:a", "sha256:b"])
        );
        assert_eq!(c["config"], base["config"], "the runtime config is kept");
        assert_eq!(c["history"][0]["comment"], "snap 1");
        assert_eq!(c["created"], "2026-12-02T04:00:00Z");
        let mut broken = base.clone();
        broken["rootfs"] = serde_json::json!({});
        assert!(committed_config(&broken, "sha256:b", "", "").is_err());
    }

    #[test]
    fn manifest_keeps_its_family() {
        let oci = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:c0", "size": 1},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": "sha256:l0", "size": 2}],
        });
        let m = committed_manifest(&oci, &desc("sha256:c1", 10), &desc("sha256:l1", 20)).unwrap();
        assert_eq!(m["config"]["digest"], "sha256:c1");
        assert_eq!(
            m["config"]["mediaType"],
            "application/vnd.oci.image.config.v1+json"
        );
        assert_eq!(m["layers"][1]["mediaType"], LAYER_GZIP_OCI);
        assert_eq!(m["layers"][1]["size"], 20);
        let mut docker = oci.clone();
        docker["mediaType"] = MANIFEST_DOCKER.into();
        let m =
            committed_manifest(&docker, &desc("sha256:c1", 10), &desc("sha256:l1", 20)).unwrap();
        assert_eq!(m["layers"][1]["mediaType"], LAYER_GZIP_DOCKER);
    }

    #[test]
    fn label_filters_quote_dotted_keys() {
        assert_eq!(
            label_filter(&[("io.rivernode.snapshot.vps", "5"), ("n", "a")]),
            r#"labels."io.rivernode.snapshot.vps"=="5",labels."n"=="a""#
        );
    }
}

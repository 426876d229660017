//! An image's blobs as they are in containerd's content store: its
//! manifest, config and layers by digest, and any range of one of them, so
//! that a runner can send a snapshot to the host blob by blob, only those
//! the host lacks.

use containerd_client::services::v1::{content_client::ContentClient, ReadContentRequest};

use super::import::{Manifest, MANIFEST_DOCKER, MANIFEST_OCI};
use super::{Containerd, OciError};

/// A blob of an image: its media type, `sha256:<hex>` digest and size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobRef {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// An image's manifest, and its config and layers in the manifest's order.
#[derive(Clone, Debug)]
pub struct ImageBlobs {
    pub manifest: BlobRef,
    pub blobs: Vec<BlobRef>,
}

impl BlobRef {
    /// As the host and a node name a blob to each other (a file of its own).
    pub fn descriptor(&self) -> crate::api::ArchiveBlob {
        crate::api::ArchiveBlob {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            offset: 0,
        }
    }
}

impl ImageBlobs {
    /// The manifest, config or layer named `digest`.
    pub fn find(&self, digest: &str) -> Option<&BlobRef> {
        std::iter::once(&self.manifest)
            .chain(&self.blobs)
            .find(|b| b.digest == digest)
    }
}

impl Containerd {
    /// Image `name`'s manifest, config and layers.
    pub async fn image_blobs(&self, name: &str) -> Result<ImageBlobs, OciError> {
        let bad = |message: String| OciError::Image {
            name: name.into(),
            message,
        };
        let img = self
            .get_image(name)
            .await?
            .ok_or_else(|| bad("not in containerd".into()))?;
        let target = img.target.ok_or_else(|| bad("no target".into()))?;
        if target.media_type != MANIFEST_OCI && target.media_type != MANIFEST_DOCKER {
            return Err(bad(format!(
                "its target is a {}, not one manifest",
                target.media_type
            )));
        }
        let size = |digest: &str, size: i64| {
            u64::try_from(size).map_err(|_| bad(format!("{digest}: size {size}")))
        };
        let manifest: Manifest = serde_json::from_slice(&self.read_blob(&target.digest).await?)
            .map_err(|e| bad(format!("manifest: {e}")))?;
        let blobs = std::iter::once(&manifest.config)
            .chain(&manifest.layers)
            .map(|d| {
                Ok(BlobRef {
                    media_type: d.media_type.clone(),
                    digest: d.digest.clone(),
                    size: size(&d.digest, d.size)?,
                })
            })
            .collect::<Result<_, OciError>>()?;
        Ok(ImageBlobs {
            manifest: BlobRef {
                size: size(&target.digest, target.size)?,
                media_type: target.media_type,
                digest: target.digest,
            },
            blobs,
        })
    }

    /// `len` bytes of blob `digest` from `offset` on.
    pub async fn read_range(
        &self,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, OciError> {
        // containerd reads size 0 as "to the end".
        if len == 0 {
            return Ok(Vec::new());
        }
        let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let mut stream = ContentClient::new(self.channel())
            .read(self.req(
                ReadContentRequest {
                    digest: digest.into(),
                    offset: to_i64(offset),
                    size: to_i64(len),
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("read {digest}")))?
            .into_inner();
        let mut out = Vec::with_capacity(len.min(64 << 20) as usize);
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(OciError::rpc(format!("read {digest}")))?
        {
            out.extend_from_slice(&chunk.data);
        }
        if out.len() as u64 != len {
            return Err(OciError::Image {
                name: digest.into(),
                message: format!("{} of the {len} bytes from {offset} came", out.len()),
            });
        }
        Ok(out)
    }
}

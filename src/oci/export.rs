//! An image out of containerd's content store as an OCI image layout
//! archive (`oci-layout`, `index.json`, `blobs/sha256/<hex>`): what
//! `import_archive` reads back on another node. Blobs are streamed from the
//! content store into the tar, so an image of any size takes no memory.

use std::io::Write;
use std::path::Path;

use containerd_client::services::v1::{content_client::ContentClient, ReadContentRequest};

use super::import::{Desc, Manifest, MANIFEST_DOCKER, MANIFEST_OCI};
use super::{Containerd, OciError};

/// `index.json` of a layout holding the one manifest `manifest`.
pub fn layout_index(manifest: &Desc, name: &str) -> serde_json::Value {
    let media_type = if manifest.media_type.is_empty() {
        MANIFEST_OCI
    } else {
        manifest.media_type.as_str()
    };
    serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": media_type,
            "digest": manifest.digest,
            "size": manifest.size,
            "annotations": {"org.opencontainers.image.ref.name": name},
        }],
    })
}

/// Where blob `digest` lies in the layout.
fn blob_path(digest: &str) -> Result<String, String> {
    match digest.split_once(':') {
        Some(("sha256", hex)) if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(format!("blobs/sha256/{hex}"))
        }
        _ => Err(format!("unsupported digest {digest:?}")),
    }
}

/// A file entry's header: a regular file of `size` bytes, 0644.
fn header(path: &str, size: u64) -> std::io::Result<tar::Header> {
    let mut h = tar::Header::new_gnu();
    h.set_path(path)?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(h)
}

impl Containerd {
    /// Writes image `name` (its manifest, config and layers, as they are in
    /// the content store) to `dest` as an OCI image layout archive.
    pub async fn export_archive(&self, name: &str, dest: &Path) -> Result<(), OciError> {
        let bad = |message: String| OciError::Image {
            name: name.into(),
            message,
        };
        let io = |source| OciError::Io {
            path: dest.to_path_buf(),
            source,
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
        let manifest_desc = Desc {
            media_type: target.media_type.clone(),
            digest: target.digest.clone(),
            size: target.size,
            platform: None,
        };
        let manifest_bytes = self.read_blob(&target.digest).await?;
        let manifest: Manifest =
            serde_json::from_slice(&manifest_bytes).map_err(|e| bad(format!("manifest: {e}")))?;
        let file = std::fs::File::create(dest).map_err(io)?;
        let mut tar = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, file));
        let small = |tar: &mut tar::Builder<_>, path: &str, data: &[u8]| {
            tar.append(&header(path, data.len() as u64)?, data)
        };
        tokio::task::block_in_place(|| -> std::io::Result<()> {
            small(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
            let index = serde_json::to_vec(&layout_index(&manifest_desc, name))?;
            small(&mut tar, "index.json", &index)?;
            let path = blob_path(&target.digest).map_err(std::io::Error::other)?;
            small(&mut tar, &path, &manifest_bytes)
        })
        .map_err(io)?;
        for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
            let path = blob_path(&d.digest).map_err(bad)?;
            let size =
                u64::try_from(d.size).map_err(|_| bad(format!("{}: size {}", d.digest, d.size)))?;
            tokio::task::block_in_place(|| {
                let h = header(&path, size)?;
                tar.get_mut().write_all(h.as_bytes())
            })
            .map_err(io)?;
            let mut stream = ContentClient::new(self.channel())
                .read(self.req(
                    ReadContentRequest {
                        digest: d.digest.clone(),
                        offset: 0,
                        size: 0,
                    },
                    None,
                ))
                .await
                .map_err(OciError::rpc(format!("read {}", d.digest)))?
                .into_inner();
            let mut written = 0u64;
            while let Some(chunk) = stream
                .message()
                .await
                .map_err(OciError::rpc(format!("read {}", d.digest)))?
            {
                written += chunk.data.len() as u64;
                tokio::task::block_in_place(|| tar.get_mut().write_all(&chunk.data)).map_err(io)?;
            }
            if written != size {
                return Err(bad(format!(
                    "blob {} has {written} bytes, its descriptor says {size}",
                    d.digest
                )));
            }
            // An entry fills whole 512-byte blocks.
            let pad = (512 - (size % 512) as usize) % 512;
            tokio::task::block_in_place(|| tar.get_mut().write_all(&vec![0u8; pad])).map_err(io)?;
        }
        tokio::task::block_in_place(|| {
            tar.finish()?;
            let mut w = tar.into_inner()?;
            w.flush()?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()
        })
        .map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_names_its_one_manifest() {
        let d = Desc {
            media_type: String::new(),
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 7,
            platform: None,
        };
        let i = layout_index(&d, "rivernode/snapshots/n1/vps-3:12");
        assert_eq!(i["manifests"][0]["mediaType"], MANIFEST_OCI);
        assert_eq!(i["manifests"][0]["size"], 7);
        assert_eq!(
            i["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
            "rivernode/snapshots/n1/vps-3:12"
        );
        assert_eq!(
            blob_path(&d.digest).unwrap(),
            format!("blobs/sha256/{}", "a".repeat(64))
        );
        assert!(blob_path("sha512:ab").is_err());
        assert!(blob_path("sha256:../../etc").is_err());
    }
}

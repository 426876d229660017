//! Archives served to nodes: an environment archive or a VPS's parked copy,
//! whole or one blob at a time, from an offset (a cut fetch resumes), and
//! the index of an OCI image layout archive that says where each of its
//! blobs lies, so that a node fetches only the layers it lacks.

use std::path::Path;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::api::ApiError;
use crate::api::{ArchiveBlob, EXPECT_SHA256};

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

/// Blob `digest` (of `manifest` and `blobs`, an index of the archive at
/// `path`) from the request's range, as `send_slice` serves it; a 404 when
/// the archive has no such blob.
pub(super) async fn send_blob(
    headers: &HeaderMap,
    path: &Path,
    manifest: &Option<ArchiveBlob>,
    blobs: &[ArchiveBlob],
    digest: &str,
    what: &str,
) -> Result<Response, ApiError> {
    let b = manifest
        .iter()
        .chain(blobs)
        .find(|b| b.digest == digest)
        .ok_or_else(|| ApiError::NotFound(format!("{what}: there is no such blob")))?;
    let slice = Slice {
        path,
        base: b.offset,
        size: b.size,
        sha256: b.digest.trim_start_matches("sha256:"),
        what,
        content_type: "application/octet-stream",
    };
    send_slice(headers, &slice).await
}

/// An OCI descriptor, as an image layout's index and a manifest hold them.
#[derive(serde::Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
}

#[derive(serde::Deserialize)]
struct LayoutIndex {
    manifests: Vec<Descriptor>,
}

#[derive(serde::Deserialize)]
struct ImageManifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// The manifest and its config and layers (in its order) of the OCI image
/// layout archive at `path`, each with where its bytes lie in the file; why
/// not, when it is no layout of one image with all its blobs.
pub fn index_archive(path: &Path) -> Result<(ArchiveBlob, Vec<ArchiveBlob>), String> {
    use std::io::{Read, Seek};
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    // digest -> (offset, size) of every blob entry; index.json's text.
    let mut entries = std::collections::HashMap::new();
    let mut index = None;
    {
        let mut tar = tar::Archive::new(&mut file);
        // Seeks past each entry's data rather than reading it.
        for entry in tar.entries_with_seek().map_err(|e| e.to_string())? {
            let mut entry = entry.map_err(|e| format!("not a tar archive: {e}"))?;
            let name = entry.path().map_err(|e| e.to_string())?.into_owned();
            let name = name.to_string_lossy();
            // `tar -C layout .` names them `./index.json`, `./blobs/...`.
            let name = name.strip_prefix("./").unwrap_or(&name);
            if name == "index.json" {
                let mut text = Vec::new();
                (&mut entry)
                    .take(1 << 20)
                    .read_to_end(&mut text)
                    .map_err(|e| e.to_string())?;
                index = Some(text);
            } else if let Some(hex) = name
                .strip_prefix("blobs/sha256/")
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            {
                entries.insert(
                    format!("sha256:{hex}"),
                    (entry.raw_file_position(), entry.size()),
                );
            }
        }
    }
    let index: LayoutIndex = serde_json::from_slice(&index.ok_or("it has no index.json")?)
        .map_err(|e| format!("index.json: {e}"))?;
    let [m] = &index.manifests[..] else {
        return Err(format!(
            "index.json lists {} manifests, not one",
            index.manifests.len()
        ));
    };
    let blob = |d: &Descriptor| -> Result<ArchiveBlob, String> {
        match entries.get(&d.digest) {
            Some(&(offset, size)) if size == d.size => Ok(ArchiveBlob {
                media_type: d.media_type.clone(),
                digest: d.digest.clone(),
                size,
                offset,
            }),
            Some(&(_, size)) => Err(format!(
                "blob {} has {size} bytes, its descriptor says {}",
                d.digest, d.size
            )),
            None => Err(format!("blob {} is not in it", d.digest)),
        }
    };
    let manifest = blob(m)?;
    if manifest.size > 4 << 20 {
        return Err(format!("its manifest has {} bytes", manifest.size));
    }
    let mut text = vec![0u8; manifest.size as usize];
    file.seek(std::io::SeekFrom::Start(manifest.offset))
        .and_then(|_| file.read_exact(&mut text))
        .map_err(|e| e.to_string())?;
    let image: ImageManifest =
        serde_json::from_slice(&text).map_err(|e| format!("manifest {}: {e}", m.digest))?;
    let blobs = std::iter::once(&image.config)
        .chain(&image.layers)
        .map(blob)
        .collect::<Result<_, _>>()?;
    Ok((manifest, blobs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::path::PathBuf;

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

    /// A layout archive of one image with `layers`, and its blobs; the
    /// layer `leave_out` (an index) is listed but not in the archive.
    fn layout(dir: &Path, layers: &[&[u8]], leave_out: Option<usize>) -> PathBuf {
        let digest = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
        let config = br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
        let desc =
            |b: &[u8]| serde_json::json!({"mediaType": "x", "digest": digest(b), "size": b.len()});
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "config": desc(&config),
            "layers": layers.iter().map(|l| desc(l)).collect::<Vec<_>>(),
        }))
        .unwrap();
        let index =
            serde_json::to_vec(&serde_json::json!({"manifests": [desc(&manifest)]})).unwrap();
        let path = dir.join("a.tar");
        let mut tar = tar::Builder::new(std::fs::File::create(&path).unwrap());
        let mut add = |name: String, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, data).unwrap();
        };
        add("index.json".into(), &index);
        let blobs = [manifest.as_slice(), &config]
            .into_iter()
            .chain(layers.iter().copied())
            .enumerate()
            .filter(|(i, _)| leave_out.map(|l| l + 2) != Some(*i));
        for (_, b) in blobs {
            add(format!("blobs/sha256/{}", &digest(b)[7..]), b);
        }
        tar.finish().unwrap();
        path
    }

    #[test]
    fn an_archive_lists_where_each_blob_lies() {
        let dir = tempfile::tempdir().unwrap();
        let layers: [&[u8]; 2] = [b"base layer", &[7u8; 3000]];
        let path = layout(dir.path(), &layers, None);
        let (manifest, blobs) = index_archive(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let at = |b: &ArchiveBlob| &bytes[b.offset as usize..(b.offset + b.size) as usize];
        let m: serde_json::Value = serde_json::from_slice(at(&manifest)).unwrap();
        assert_eq!(m["schemaVersion"], 2);
        assert_eq!(blobs.len(), 3, "the config, then the layers");
        assert!(at(&blobs[0]).starts_with(b"{\"rootfs\""));
        assert_eq!(at(&blobs[1]), layers[0]);
        assert_eq!(at(&blobs[2]), layers[1]);
        assert_eq!(
            blobs[2].digest,
            format!("sha256:{}", hex::encode(Sha256::digest(layers[1])))
        );

        let missing = layout(dir.path(), &layers, Some(1));
        let e = index_archive(&missing).unwrap_err();
        assert!(e.contains("is not in it"), "{e}");
        std::fs::write(dir.path().join("junk"), b"no tar at all").unwrap();
        assert!(index_archive(&dir.path().join("junk")).is_err());
    }
}

//! Archives served to nodes: an environment archive or a VPS's parked copy,
//! whole or one blob at a time, from an offset (a cut fetch resumes), and
//! the index of an OCI image layout archive that says where each of its
//! blobs lies, so that a node fetches only the layers it lacks.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::api::ApiError;
use sha2::{Digest, Sha256};

use crate::api::{ArchiveBlob, EXPECT_SHA256};

/// Where a `Range: bytes=N-` request starts; none without one. Only that
/// form is served (a node resumes from what it has; it never asks for a
/// slice in the middle).
fn range_start(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let header = headers.get(axum::http::header::RANGE).map(|v| v.as_bytes());
    crate::api::range_start(header).map_err(|e| ApiError::BadRequest(e.into()))
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

/// A 412 saying `error`: what a node fetches changed meanwhile.
fn changed(error: &str) -> Response {
    (
        StatusCode::PRECONDITION_FAILED,
        Json(crate::api::ErrorBody {
            error: error.to_string(),
        }),
    )
        .into_response()
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
            return Ok(changed(&format!(
                "{what} changed on the host (now sha256 {sha256}): fetch it again"
            )));
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

/// Blob `digest` (of `manifest` and `blobs`, an image whose identity is
/// `sha256`; `path` says which file holds a blob, at its offset) from the
/// request's range, as `send_slice` serves it; a 412 when the image's
/// current version has no such blob (it changed since the node read its
/// list).
pub(super) async fn send_blob(
    headers: &HeaderMap,
    path: impl Fn(&ArchiveBlob) -> PathBuf,
    (manifest, blobs, sha256): (&Option<ArchiveBlob>, &[ArchiveBlob], &str),
    digest: &str,
    what: &str,
) -> Result<Response, ApiError> {
    let Some(b) = manifest.iter().chain(blobs).find(|b| b.digest == digest) else {
        return Ok(changed(&format!(
            "{what}: it changed on the host (now sha256 {sha256}, without that blob): fetch it again"
        )));
    };
    let path = path(b);
    let slice = Slice {
        path: &path,
        base: b.offset,
        size: b.size,
        sha256: b.digest.trim_start_matches("sha256:"),
        what,
        content_type: "application/octet-stream",
    };
    send_slice(headers, &slice).await
}

/// What one read of an archive finds: its whole SHA-256 (hex), and its
/// index as an OCI image layout of one image, or why it is none.
pub struct ArchiveRead {
    pub sha256: String,
    pub layout: Result<(ArchiveBlob, Vec<ArchiveBlob>), String>,
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Reads the archive at `path` once: its SHA-256, and, for an OCI image
/// layout of one image, its manifest and its config and layers (in the
/// manifest's order), each with where its bytes lie in the file and
/// checked against its digest. An I/O error is the only error; an archive
/// that is no such layout says why in `layout`.
pub fn read_archive(path: &Path) -> std::io::Result<ArchiveRead> {
    let file = std::fs::File::open(path)?;
    let mut reader = Hashing {
        inner: std::io::BufReader::with_capacity(1 << 20, file),
        hash: Sha256::new(),
    };
    let scanned = scan(&mut reader);
    // The rest (the tar's end blocks, or what followed a bad entry) counts
    // to the whole digest too.
    std::io::copy(&mut reader, &mut std::io::sink())?;
    let sha256 = hex::encode(reader.hash.finalize());
    let layout = match scanned {
        Ok((entries, index)) => index_of(path, &entries, index),
        Err(e) => Err(e),
    };
    Ok(ArchiveRead { sha256, layout })
}

/// digest -> (offset, size) of every blob entry whose bytes match its
/// name, and index.json's text; why not, for an entry that does not.
type Scanned = (HashMap<String, (u64, u64)>, Option<Vec<u8>>);

fn scan(reader: &mut impl Read) -> Result<Scanned, String> {
    let mut entries = HashMap::new();
    let mut index = None;
    let mut tar = tar::Archive::new(reader);
    for entry in tar.entries().map_err(|e| e.to_string())? {
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
        } else if let Some(hex) = name.strip_prefix("blobs/sha256/").filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }) {
            let (offset, size) = (entry.raw_file_position(), entry.size());
            let mut h = Sha256::new();
            std::io::copy(&mut entry, &mut h).map_err(|e| e.to_string())?;
            let got = hex::encode(h.finalize());
            if got != hex {
                return Err(format!(
                    "blob sha256:{hex} has bytes whose SHA-256 is {got}"
                ));
            }
            entries.insert(format!("sha256:{hex}"), (offset, size));
        }
    }
    Ok((entries, index))
}

/// The layout's one manifest and its blobs, from what `scan` found in the
/// archive at `path` (the manifest is read back from its place).
fn index_of(
    path: &Path,
    entries: &HashMap<String, (u64, u64)>,
    index: Option<Vec<u8>>,
) -> Result<(ArchiveBlob, Vec<ArchiveBlob>), String> {
    use crate::oci::{is_index, pick_manifest, Desc, Index, Manifest};
    use std::io::Seek;
    let index: Index = serde_json::from_slice(&index.ok_or("it has no index.json")?)
        .map_err(|e| format!("index.json: {e}"))?;
    let blob = |d: &Desc| -> Result<ArchiveBlob, String> {
        match entries.get(&d.digest) {
            Some(&(offset, size)) if i64::try_from(size) == Ok(d.size) => Ok(ArchiveBlob {
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
    let read_at = |b: &ArchiveBlob| -> Result<Vec<u8>, String> {
        if b.size > 4 << 20 {
            return Err(format!("{} has {} bytes", b.digest, b.size));
        }
        let mut text = vec![0u8; b.size as usize];
        let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        file.seek(std::io::SeekFrom::Start(b.offset))
            .and_then(|_| file.read_exact(&mut text))
            .map_err(|e| e.to_string())?;
        Ok(text)
    };
    // Down nested indexes (one per platform) to the manifest.
    let mut index = index;
    let mut depth = 0;
    let m = loop {
        let m = pick_manifest(&index).ok_or("index.json lists no manifest")?;
        if !is_index(&m.media_type) {
            break m;
        }
        depth += 1;
        if depth > 4 {
            return Err("its indexes nest deeper than 4".into());
        }
        let text = read_at(&blob(m)?)?;
        let nested: Index =
            serde_json::from_slice(&text).map_err(|e| format!("index {}: {e}", m.digest))?;
        index = nested;
    };
    let manifest = blob(m)?;
    let text = read_at(&manifest)?;
    let image: Manifest =
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
        let read = read_archive(&path).unwrap();
        let whole = hex::encode(Sha256::digest(std::fs::read(&path).unwrap()));
        assert_eq!(read.sha256, whole);
        let (manifest, blobs) = read.layout.unwrap();
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

        // A layer whose bytes are not what its name says.
        let mut damaged = bytes.clone();
        damaged[blobs[2].offset as usize + 10] ^= 1;
        std::fs::write(dir.path().join("damaged.tar"), &damaged).unwrap();
        let read = read_archive(&dir.path().join("damaged.tar")).unwrap();
        let e = read.layout.unwrap_err();
        assert!(
            e.contains(&format!("blob {} has bytes whose SHA-256", blobs[2].digest)),
            "{e}"
        );
        assert_eq!(read.sha256, hex::encode(Sha256::digest(&damaged)));

        let missing = layout(dir.path(), &layers, Some(1));
        let e = read_archive(&missing).unwrap().layout.unwrap_err();
        assert!(e.contains("is not in it"), "{e}");
        std::fs::write(dir.path().join("junk"), b"no tar at all").unwrap();
        let junk = read_archive(&dir.path().join("junk")).unwrap();
        assert!(junk.layout.is_err());
        assert_eq!(junk.sha256, hex::encode(Sha256::digest(b"no tar at all")));
    }

    #[test]
    fn a_nested_index_leads_to_the_linux_amd64_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let digest = |b: &[u8]| format!("sha256:{}", hex::encode(Sha256::digest(b)));
        let desc = |b: &[u8], media_type: &str, arch: Option<&str>| {
            let mut d =
                serde_json::json!({"mediaType": media_type, "digest": digest(b), "size": b.len()});
            if let Some(a) = arch {
                d["platform"] = serde_json::json!({"os": "linux", "architecture": a});
            }
            d
        };
        let (config, layer) = (b"{}".to_vec(), b"layer".to_vec());
        let manifest = |tag: &str| {
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2, "annotations": {"t": tag},
                "config": desc(&config, "c", None), "layers": [desc(&layer, "l", None)],
            }))
            .unwrap()
        };
        let (arm, amd) = (manifest("arm64"), manifest("amd64"));
        let m = "application/vnd.oci.image.manifest.v1+json";
        let nested = serde_json::to_vec(&serde_json::json!({
            "manifests": [desc(&arm, m, Some("arm64")), desc(&amd, m, Some("amd64"))],
        }))
        .unwrap();
        let top = serde_json::to_vec(&serde_json::json!({
            "manifests": [desc(&nested, "application/vnd.oci.image.index.v1+json", None)],
        }))
        .unwrap();
        let path = dir.path().join("multi.tar");
        let mut tar = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for (name, data) in [("./index.json".to_string(), &top)].into_iter().chain(
            [&nested, &arm, &amd, &config, &layer]
                .map(|b| (format!("./blobs/sha256/{}", &digest(b)[7..]), b)),
        ) {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, &data[..]).unwrap();
        }
        tar.finish().unwrap();
        let (manifest, blobs) = read_archive(&path).unwrap().layout.unwrap();
        assert_eq!(manifest.digest, digest(&amd));
        assert_eq!(blobs.len(), 2);
    }
}

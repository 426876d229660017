//! Pulling images from registries (OCI distribution API) into the same
//! content-store-and-unpack path as archives. Plain HTTP is used only for
//! registries the runner lists as insecure (e.g. a loopback test registry);
//! everything else is HTTPS. Anonymous pulls and the bearer-token challenge
//! of public registries are supported; credentials are not yet.

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::import::{
    linux_amd64, Desc, Index, Layout, Manifest, INDEX_DOCKER, INDEX_OCI, MANIFEST_DOCKER,
    MANIFEST_OCI,
};
use super::{Containerd, ImportedImage, OciError};

/// `registry/repository:tag` or `@digest`, normalised the way docker does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    /// A tag or a `sha256:` digest.
    pub reference: String,
}

impl Reference {
    pub fn parse(input: &str) -> Result<Self, String> {
        let s = input.trim();
        if s.is_empty() || s.contains(char::is_whitespace) {
            return Err(format!("{input:?} is not an image reference"));
        }
        let (name, reference) = match s.split_once('@') {
            Some((n, d)) => (n, d.to_string()),
            None => match s.rsplit_once(':') {
                Some((n, t)) if !t.contains('/') => (n, t.to_string()),
                _ => (s, "latest".to_string()),
            },
        };
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        let repository = if registry == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.is_empty() || reference.is_empty() {
            return Err(format!("{input:?} is not an image reference"));
        }
        Ok(Self {
            registry,
            repository,
            reference,
        })
    }

    /// The containerd image name.
    pub fn name(&self) -> String {
        let sep = if self.reference.starts_with("sha256:") {
            "@"
        } else {
            ":"
        };
        format!(
            "{}/{}{sep}{}",
            self.registry, self.repository, self.reference
        )
    }

    fn api_host(&self) -> &str {
        if self.registry == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }
}

fn reg_err(r: &Reference, message: impl Into<String>) -> OciError {
    OciError::Image {
        name: r.name(),
        message: message.into(),
    }
}

struct Session<'a> {
    http: reqwest::Client,
    base: String,
    r: &'a Reference,
    token: Option<String>,
}

impl Session<'_> {
    /// GET with the registry's bearer challenge answered once, anonymously.
    async fn get(&mut self, path: &str, accept: &str) -> Result<reqwest::Response, OciError> {
        for attempt in 0..2 {
            let mut req = self
                .http
                .get(format!("{}{path}", self.base))
                .header("accept", accept);
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| reg_err(self.r, format!("{}: {e}", self.base)))?;
            if resp.status() == reqwest::StatusCode::UNAUTHORIZED && attempt == 0 {
                let challenge = resp
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                self.token = Some(self.fetch_token(&challenge).await?);
                continue;
            }
            if !resp.status().is_success() {
                return Err(reg_err(self.r, format!("GET {path}: {}", resp.status())));
            }
            return Ok(resp);
        }
        Err(reg_err(self.r, "the registry refused the anonymous token"))
    }

    async fn fetch_token(&self, challenge: &str) -> Result<String, OciError> {
        let params: HashMap<String, String> = challenge
            .trim_start_matches("Bearer ")
            .split(',')
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.trim().to_string(), v.trim().trim_matches('"').to_string()))
            })
            .collect();
        let realm = params.get("realm").ok_or_else(|| {
            reg_err(
                self.r,
                format!("unsupported authentication challenge {challenge:?}"),
            )
        })?;
        // The token endpoint is the registry's to name, but not to aim the
        // node anywhere: HTTPS only, unless the registry itself is plain HTTP
        // (an operator's insecure registry) and the realm is on it (F7).
        let realm_ok = realm.starts_with("https://")
            || (self.base.starts_with("http://")
                && realm
                    .strip_prefix("http://")
                    .and_then(|r| r.split(['/', '?']).next())
                    == Some(self.r.api_host()));
        if !realm_ok {
            return Err(reg_err(
                self.r,
                format!("the registry names a token endpoint {realm:?} that is not HTTPS (nor on the registry itself)"),
            ));
        }
        let mut q = vec![("scope", format!("repository:{}:pull", self.r.repository))];
        if let Some(s) = params.get("service") {
            q.push(("service", s.clone()));
        }
        let resp = self
            .http
            .get(realm)
            .query(&q)
            .send()
            .await
            .map_err(|e| reg_err(self.r, format!("token: {e}")))?;
        // A token answer is a few KiB: a realm that streams more is hostile.
        let body = read_capped(resp, MAX_MANIFEST)
            .await
            .map_err(|e| reg_err(self.r, format!("token: {e}")))?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| reg_err(self.r, format!("token: {e}")))?;
        v["token"]
            .as_str()
            .or_else(|| v["access_token"].as_str())
            .map(str::to_string)
            .ok_or_else(|| reg_err(self.r, "the token answer holds no token"))
    }

    /// Downloads blob `d` into `dir`, verified; `got` hears of each chunk's size.
    async fn blob_to_file(
        &mut self,
        d: &Desc,
        dir: &Path,
        got: &mut (dyn FnMut(u64) + Send),
    ) -> Result<std::path::PathBuf, OciError> {
        let mut resp = self
            .get(
                &format!("/v2/{}/blobs/{}", self.r.repository, d.digest),
                "*/*",
            )
            .await?;
        let path = dir.join(d.digest.replace(':', "-"));
        let mut f = std::fs::File::create(&path).map_err(|source| OciError::Io {
            path: path.clone(),
            source,
        })?;
        let mut h = Sha256::new();
        let mut written: u64 = 0;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| reg_err(self.r, format!("blob {}: {e}", d.digest)))?
        {
            written += chunk.len() as u64;
            // The manifest says how big the blob is: not a byte more.
            if written > d.size.max(0) as u64 {
                return Err(reg_err(
                    self.r,
                    format!(
                        "blob {} is larger than the {} bytes its manifest says",
                        d.digest, d.size
                    ),
                ));
            }
            h.update(&chunk);
            got(chunk.len() as u64);
            std::io::Write::write_all(&mut f, &chunk).map_err(|source| OciError::Io {
                path: path.clone(),
                source,
            })?;
        }
        let got = format!("sha256:{}", hex::encode(h.finalize()));
        if got != d.digest {
            return Err(reg_err(
                self.r,
                format!("blob {} arrived with digest {got}", d.digest),
            ));
        }
        Ok(path)
    }
}

/// Manifests and indexes are small; a bigger one is refused, not buffered.
const MAX_MANIFEST: usize = 4 << 20;

/// Follows at most 5 redirects (registries send blobs to their storage),
/// never from HTTPS down to HTTP unless the registry is plain HTTP itself.
fn redirects(allow_http: bool) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= 5 {
            attempt.error("more than 5 redirects")
        } else if attempt.url().scheme() == "https"
            || allow_http && attempt.url().scheme() == "http"
        {
            attempt.follow()
        } else {
            attempt.error("a redirect to another scheme")
        }
    })
}

/// The body, refused once it passes `cap` bytes.
async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, String> {
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(format!("an answer larger than {cap} bytes"));
    }
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + chunk.len() > cap {
            return Err(format!("an answer larger than {cap} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

impl Containerd {
    /// Pulls `reference` unless the image is already here and unpacked.
    /// `insecure` lists registries (host:port) spoken to over plain HTTP.
    pub async fn pull(
        &self,
        reference: &str,
        insecure: &[String],
        scratch: &Path,
        progress: &super::Progress,
    ) -> Result<ImportedImage, OciError> {
        let r = Reference::parse(reference).map_err(|m| OciError::Image {
            name: reference.into(),
            message: m,
        })?;
        let name = r.name();
        if let Some(img) = self.get_image(&name).await? {
            if let Ok(ready) = self.image_ready(&name, &img).await {
                return Ok(ready);
            }
        }
        tracing::info!(image = %name, "pulling");
        let scheme = if insecure.iter().any(|i| i == &r.registry) {
            "http"
        } else {
            "https"
        };
        let mut s = Session {
            http: reqwest::Client::builder()
                .user_agent(concat!("rivernode/", env!("CARGO_PKG_VERSION")))
                // A registry that stops answering fails the pull, not holds it forever.
                .connect_timeout(std::time::Duration::from_secs(15))
                .read_timeout(std::time::Duration::from_secs(60))
                .redirect(redirects(scheme == "http"))
                .build()
                .map_err(|e| reg_err(&r, e.to_string()))?,
            base: format!("{scheme}://{}", r.api_host()),
            r: &r,
            token: None,
        };
        let mut reference_now = r.reference.clone();
        let mut hops = 0;
        let (manifest_desc, manifest_bytes) = loop {
            // An index names a manifest, never another index chain without end.
            hops += 1;
            if hops > 3 {
                return Err(reg_err(&r, "the index leads to more indexes"));
            }
            let resp = s
                .get(
                    &format!("/v2/{}/manifests/{reference_now}", r.repository),
                    ACCEPT_MANIFESTS,
                )
                .await?;
            let media_type = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .split(';')
                .next()
                .unwrap_or_default()
                .to_string();
            let bytes = read_capped(resp, MAX_MANIFEST)
                .await
                .map_err(|e| reg_err(&r, e))?;
            // Asked for by digest: what came must be that.
            if reference_now.starts_with("sha256:") {
                let got = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
                if got != reference_now {
                    return Err(reg_err(
                        &r,
                        format!("manifest {reference_now} arrived with digest {got}"),
                    ));
                }
            }
            if media_type == INDEX_OCI || media_type == INDEX_DOCKER {
                let index: Index = serde_json::from_slice(&bytes)
                    .map_err(|e| reg_err(&r, format!("index: {e}")))?;
                let pick = linux_amd64(&index)
                    .ok_or_else(|| reg_err(&r, "no linux/amd64 image in the index"))?;
                reference_now = pick.digest.clone();
                continue;
            }
            if media_type != MANIFEST_OCI && media_type != MANIFEST_DOCKER {
                return Err(reg_err(
                    &r,
                    format!("unsupported manifest type {media_type:?}"),
                ));
            }
            let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
            break (
                Desc {
                    media_type,
                    digest,
                    size: bytes.len() as i64,
                    platform: None,
                },
                bytes,
            );
        };
        let m: Manifest = serde_json::from_slice(&manifest_bytes)
            .map_err(|e| reg_err(&r, format!("manifest: {e}")))?;
        let dir = scratch.join(format!(
            "pull-{}-{}",
            std::process::id(),
            crate::now_unix_ms()
        ));
        std::fs::create_dir_all(&dir).map_err(|source| OciError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut layout = Layout {
            dir: Some(dir.clone()),
            blobs: HashMap::new(),
            manifest: manifest_desc,
            manifest_bytes,
            config: m.config.clone(),
            layers: m.layers.clone(),
        };
        let blobs: Vec<&Desc> = std::iter::once(&m.config).chain(&m.layers).collect();
        let total: u64 = blobs.iter().map(|d| d.size.max(0) as u64).sum();
        let mut done = 0u64;
        progress.report("pulling", 0, total);
        for (i, d) in blobs.iter().enumerate() {
            tracing::info!(image = %name, "downloading blob {}/{} ({} bytes)", i + 1, blobs.len(), d.size);
            let path = s
                .blob_to_file(d, &dir, &mut |n| {
                    done += n;
                    progress.report("pulling", done, total);
                })
                .await?;
            layout.blobs.insert(d.digest.clone(), path);
        }
        let lease = self.create_lease().await?;
        let result = self
            .store_and_unpack(
                &name,
                &layout,
                &format!("registry:{}", layout.manifest.digest),
                &lease,
                "storing",
                progress,
            )
            .await;
        self.delete_lease(&lease).await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalise_like_docker() {
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.as_str()
            ),
            ("docker.io", "library/busybox", "latest")
        );
        let r = Reference::parse("127.0.0.1:5000/env:1").unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.reference.as_str()
            ),
            ("127.0.0.1:5000", "env", "1")
        );
        assert_eq!(r.name(), "127.0.0.1:5000/env:1");
        let r = Reference::parse("ghcr.io/org/img@sha256:abc").unwrap();
        assert_eq!(
            (r.repository.as_str(), r.reference.as_str()),
            ("org/img", "sha256:abc")
        );
        assert_eq!(r.name(), "ghcr.io/org/img@sha256:abc");
        let r = Reference::parse("localhost/x").unwrap();
        assert_eq!(r.registry, "localhost");
        for bad in ["", "a b", "x:"] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }
}

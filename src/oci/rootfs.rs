//! Looking into an image's root filesystem without mounting it: a read-only
//! view of its top snapshot names the layer directories (overlayfs
//! `lowerdir=`, top first, or one bind source), and a path resolves in the
//! first layer that has it. Enough to ask "does this image have an sshd?" or
//! to read its `/etc/shadow`. Symlinks are never followed (the runner reads
//! as root on the node; a link could point anywhere there) and whiteouts
//! are not interpreted, so a file deleted in an upper layer may still be seen.

use std::path::{Path, PathBuf};

use containerd_client::services::v1::snapshots::{
    snapshots_client::SnapshotsClient, ViewSnapshotRequest,
};

use super::{Containerd, ImportedImage, OciError};

/// The layer directories of a snapshot's mounts, top layer first.
pub fn layer_dirs(mounts: &[containerd_client::types::Mount]) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for m in mounts {
        match m.r#type.as_str() {
            "bind" => dirs.push(PathBuf::from(&m.source)),
            "overlay" => {
                // upperdir (a writable view) first, then the lower layers in order.
                for key in ["upperdir=", "lowerdir="] {
                    for o in m.options.iter().filter_map(|o| o.strip_prefix(key)) {
                        dirs.extend(o.split(':').map(PathBuf::from));
                    }
                }
            }
            _ => {}
        }
    }
    dirs
}

/// `path` (absolute, inside the image) in the first layer that has it,
/// never through a symlink: a symlink on the way, in any layer, makes it
/// "not found", so an image cannot point the runner at the node's own files.
pub fn find_in_layers(dirs: &[PathBuf], path: &str) -> Option<PathBuf> {
    let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    if parts.is_empty() || parts.iter().any(|c| *c == "." || *c == "..") {
        return None;
    }
    'layers: for d in dirs {
        let mut cur = d.clone();
        for (i, part) in parts.iter().enumerate() {
            cur.push(part);
            match cur.symlink_metadata() {
                // Not in this layer: a lower one may have it.
                Err(_) => continue 'layers,
                Ok(m) if m.file_type().is_symlink() => return None,
                Ok(m) if i + 1 < parts.len() && !m.is_dir() => return None,
                Ok(_) => {}
            }
        }
        return Some(cur);
    }
    None
}

/// A regular file of at most `cap` bytes, opened without following a symlink.
pub fn read_small_file(p: &Path, cap: u64) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(p)
        .ok()?;
    let meta = f.metadata().ok()?;
    if !meta.is_file() || meta.len() > cap {
        return None;
    }
    let mut text = String::new();
    f.take(cap).read_to_string(&mut text).ok()?;
    Some(text)
}

impl Containerd {
    /// Where each of `paths` lives in the image's layers (`None`: absent).
    /// The view that names the layers is removed before this returns; the
    /// returned paths stay valid while the image is.
    pub async fn find_in_image(
        &self,
        image: &ImportedImage,
        paths: &[&str],
    ) -> Result<Vec<Option<PathBuf>>, OciError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = format!("rivernode-inspect-{}-{n}", std::process::id());
        let mounts = SnapshotsClient::new(self.channel())
            .view(self.req(
                ViewSnapshotRequest {
                    snapshotter: self.snapshotter().into(),
                    key: key.clone(),
                    parent: image.top_chain.clone(),
                    labels: Default::default(),
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("view of {}", image.name)))?
            .into_inner()
            .mounts;
        self.remove_snapshot(&key).await;
        let dirs = layer_dirs(&mounts);
        Ok(paths.iter().map(|p| find_in_layers(&dirs, p)).collect())
    }
}

/// Whether `p` is a regular file itself, not a symlink to one (an image's executable, say).
pub fn is_file(p: &Option<PathBuf>) -> bool {
    p.as_deref()
        .and_then(|p| p.symlink_metadata().ok())
        .is_some_and(|m| m.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_client::types::Mount;

    #[test]
    fn overlay_layers_resolve_top_first() {
        let d = tempfile::tempdir().unwrap();
        let (top, base) = (d.path().join("2"), d.path().join("1"));
        for (dir, text) in [(&top, "new"), (&base, "old")] {
            std::fs::create_dir_all(dir.join("etc")).unwrap();
            std::fs::write(dir.join("etc/shadow"), text).unwrap();
        }
        std::fs::create_dir_all(base.join("usr/sbin")).unwrap();
        std::fs::write(base.join("usr/sbin/sshd"), "").unwrap();
        let m = Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options: vec![
                "index=off".into(),
                format!("lowerdir={}:{}", top.display(), base.display()),
            ],
        };
        let dirs = layer_dirs(&[m]);
        assert_eq!(dirs, vec![top.clone(), base.clone()]);
        let shadow = find_in_layers(&dirs, "/etc/shadow").unwrap();
        assert_eq!(std::fs::read_to_string(shadow).unwrap(), "new");
        assert!(is_file(&find_in_layers(&dirs, "/usr/sbin/sshd")));
        assert!(find_in_layers(&dirs, "/usr/sbin/dropbear").is_none());
        // A symlink on the way is refused, wherever it points.
        let evil = d.path().join("3");
        std::fs::create_dir_all(evil.join("usr")).unwrap();
        std::os::unix::fs::symlink("/etc", evil.join("etc")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", evil.join("usr/sshd")).unwrap();
        let with_evil = vec![evil.clone(), top.clone(), base.clone()];
        assert_eq!(find_in_layers(&with_evil, "/etc/shadow"), None);
        assert!(!is_file(&find_in_layers(&with_evil, "/usr/sshd")));
        assert_eq!(find_in_layers(&dirs, "/etc/../etc/shadow"), None);
        assert_eq!(
            read_small_file(&evil.join("usr/sshd"), 1 << 20),
            None,
            "O_NOFOLLOW"
        );
        assert_eq!(
            read_small_file(&top.join("etc/shadow"), 2),
            None,
            "over the cap"
        );
        assert_eq!(
            read_small_file(&top.join("etc/shadow"), 100).as_deref(),
            Some("new")
        );
        let bind = Mount {
            r#type: "bind".into(),
            source: base.display().to_string(),
            target: String::new(),
            options: vec!["ro".into(), "rbind".into()],
        };
        assert_eq!(layer_dirs(&[bind]), vec![base]);
    }
}

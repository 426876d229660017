//! Looking into an image's root filesystem without mounting it: a read-only
//! view of its top snapshot names the layer directories (overlayfs
//! `lowerdir=`, top first, or one bind source), and a path resolves in the
//! first layer that has it. Enough to ask "does this image have an sshd?" or
//! to read its `/etc/shadow`. Symlinks resolve inside the image, never on
//! the node (the runner reads as root; a link could point anywhere there).
//! Whiteouts are not interpreted, so a file deleted in an upper layer may
//! still be seen.

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

/// The file `path` (absolute, inside the image) names, as it lives in
/// the layers: each component is looked up in the top-most layer that has
/// it, and symlinks are resolved the way the image itself would see them,
/// inside the image (an absolute target starts again at the image's root,
/// `..` stops at it), never on the node. The result is not a symlink.
pub fn find_in_layers(dirs: &[PathBuf], path: &str) -> Option<PathBuf> {
    const MAX_LINKS: usize = 40;
    let mut pending: std::collections::VecDeque<String> = split(path).collect();
    let mut at: Vec<String> = Vec::new();
    let mut links = 0;
    let mut found = None;
    while let Some(part) = pending.pop_front() {
        match part.as_str() {
            "." => continue,
            ".." => {
                at.pop();
                continue;
            }
            _ => at.push(part),
        }
        let (hit, meta) = lookup(dirs, &at)?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return None;
            }
            let target = std::fs::read_link(&hit).ok()?;
            let target = target.to_str()?;
            at.pop();
            if target.starts_with('/') {
                at.clear();
            }
            for p in split(target).rev() {
                pending.push_front(p);
            }
            found = None;
        } else if !pending.is_empty() && !meta.is_dir() {
            return None;
        } else {
            found = Some(hit);
        }
    }
    found
}

/// Where the component path `at` (each ancestor already resolved to a
/// directory) lives, as overlayfs decides it: the top-most layer that has
/// it, among the layers in which every ancestor is a real directory. A
/// layer with a non-directory (a file, or a symlink) at an ancestor is
/// hidden, with every layer under it, by the directory above it: its
/// entries are never looked at, so `lstat` never follows a link on the node.
fn lookup(dirs: &[PathBuf], at: &[String]) -> Option<(PathBuf, std::fs::Metadata)> {
    'layers: for d in dirs {
        let mut p = d.clone();
        for ancestor in &at[..at.len().saturating_sub(1)] {
            p.push(ancestor);
            match p.symlink_metadata() {
                Ok(m) if m.is_dir() => {}
                // Not in this layer: a lower one may have it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue 'layers,
                // A file or link here is shadowed by the directory above: so is all below.
                _ => return None,
            }
        }
        p.push(at.last()?);
        match p.symlink_metadata() {
            Ok(m) => return Some((p, m)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(_) => return None,
        }
    }
    None
}

fn split(path: &str) -> impl DoubleEndedIterator<Item = String> + '_ {
    path.split('/').filter(|c| !c.is_empty()).map(String::from)
}

/// A regular file of at most `cap` bytes, opened without following a symlink.
pub fn read_small_file(p: &Path, cap: u64) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // Checked before opening: opening a FIFO or a device could block or act.
    if !p.symlink_metadata().ok()?.is_file() {
        return None;
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
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
        // Symlinks resolve inside the image, whatever they point at on the node.
        let evil = d.path().join("3");
        std::fs::create_dir_all(evil.join("usr/bin")).unwrap();
        std::fs::write(evil.join("usr/bin/sshd"), "").unwrap();
        std::os::unix::fs::symlink("bin", evil.join("usr/sbin")).unwrap();
        std::os::unix::fs::symlink("/etc", evil.join("conf")).unwrap();
        std::os::unix::fs::symlink("../../../../../etc/hostname", evil.join("escape")).unwrap();
        std::os::unix::fs::symlink("loop", evil.join("loop")).unwrap();
        let with_evil = vec![evil.clone(), top.clone(), base.clone()];
        let shadow = find_in_layers(&with_evil, "/conf/shadow").unwrap();
        assert_eq!(
            shadow,
            top.join("etc/shadow"),
            "/conf -> /etc is the image's own /etc"
        );
        let sshd = find_in_layers(&with_evil, "/usr/sbin/sshd");
        assert_eq!(
            sshd,
            Some(evil.join("usr/bin/sshd")),
            "sbin merged into bin"
        );
        assert!(is_file(&sshd));
        assert_eq!(
            find_in_layers(&with_evil, "/escape"),
            None,
            "no /etc/hostname in the image"
        );
        assert_eq!(
            find_in_layers(&with_evil, "/loop"),
            None,
            "a symlink loop ends"
        );
        assert_eq!(
            find_in_layers(&dirs, "/etc/../etc/shadow"),
            Some(top.join("etc/shadow"))
        );
        std::os::unix::fs::symlink("/etc/hostname", evil.join("link")).unwrap();
        assert_eq!(
            read_small_file(&evil.join("link"), 1 << 20),
            None,
            "never through a link"
        );
        nix::unistd::mkfifo(&evil.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(
            read_small_file(&evil.join("fifo"), 1 << 20),
            None,
            "a FIFO is not opened"
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
        // F1: a lower layer's `etc -> /etc` (on the node) under an upper
        // layer's real etc/ must not lead to the node's files.
        let (upper, lower, node) = (
            d.path().join("u"),
            d.path().join("l"),
            d.path().join("node"),
        );
        std::fs::create_dir_all(upper.join("etc")).unwrap();
        std::fs::create_dir_all(&lower).unwrap();
        std::fs::create_dir_all(&node).unwrap();
        std::fs::write(node.join("shadow"), "admin:$y$SECRET:").unwrap();
        std::os::unix::fs::symlink(&node, lower.join("etc")).unwrap();
        assert_eq!(
            find_in_layers(&[upper.clone(), lower.clone()], "/etc/shadow"),
            None,
            "the node's file through a lower layer's link"
        );
        // Nor through a lower layer's file at an ancestor path.
        let lower2 = d.path().join("l2");
        std::fs::create_dir_all(lower2.join("etc")).unwrap();
        std::fs::write(lower2.join("etc/shadow"), "lower").unwrap();
        assert_eq!(
            find_in_layers(&[upper.clone(), lower2.clone()], "/etc/shadow"),
            Some(lower2.join("etc/shadow")),
            "a real lower directory still merges"
        );
        assert_eq!(
            find_in_layers(&[upper, lower, lower2], "/etc/shadow"),
            None,
            "a link at an ancestor hides the layers under it"
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

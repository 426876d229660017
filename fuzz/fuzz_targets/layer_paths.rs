//! A path looked up in an image's layers (as the runner does for sshd and
//! /etc/shadow) resolves inside the layers, never to a node file, whatever
//! links the layers hold.
#![no_main]
use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// Two layers full of links that point out of the image, and a "node" file.
fn layers() -> &'static (tempfile::TempDir, Vec<PathBuf>) {
    static L: OnceLock<(tempfile::TempDir, Vec<PathBuf>)> = OnceLock::new();
    L.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let (up, low, node) = (
            d.path().join("up"),
            d.path().join("low"),
            d.path().join("node"),
        );
        for p in [
            up.join("etc"),
            up.join("usr/bin"),
            low.join("usr"),
            node.clone(),
        ] {
            std::fs::create_dir_all(p).unwrap();
        }
        std::fs::write(node.join("shadow"), "node secret").unwrap();
        std::fs::write(up.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::write(up.join("usr/bin/sshd"), "").unwrap();
        symlink(&node, low.join("etc")).unwrap();
        symlink(&node, up.join("n")).unwrap();
        symlink("../../../../../..", up.join("dots")).unwrap();
        symlink("/", low.join("root")).unwrap();
        symlink("bin", low.join("usr/sbin")).unwrap();
        symlink("loop", up.join("loop")).unwrap();
        (d, vec![up, low])
    })
}

fuzz_target!(|path: &str| {
    let (_, dirs) = layers();
    if let Some(found) = rivernode::oci::rootfs::find_in_layers(dirs, path) {
        assert!(
            dirs.iter().any(|d| found.starts_with(d)),
            "{path:?} resolved outside the layers: {}",
            found.display()
        );
        let real = std::fs::canonicalize(&found).unwrap_or(found.clone());
        assert!(
            dirs.iter()
                .any(|d| real.starts_with(std::fs::canonicalize(d).unwrap())),
            "{path:?} leads out through a link: {}",
            real.display()
        );
    }
});

//! Small file helpers for the data directory: private directories, secrets
//! written 0600 atomically, public files written atomically.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Creates `dir` (and parents) 0700 if missing; tightens an existing one.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
}

/// Makes an existing file readable by its owner only.
pub fn restrict(path: &Path) -> std::io::Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    // The rename itself is durable only once its directory is (L6): after
    // a power loss the old file, or no file, would be back.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Writes a secret readable by its owner only; readers never see a partial file.
pub fn write_secret(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_atomic(path, data, 0o600)
}

pub fn write_public(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_atomic(path, data, 0o644)
}

/// Copies `from` to the new file `to` (never over an existing one, nor
/// through a link planted there), made `mode` and synced; `progress` hears
/// the bytes done and the total as it goes. Returns the SHA-256 (hex) of
/// what was written.
pub fn copy_hashed(
    from: &Path,
    to: &Path,
    mode: u32,
    mut progress: impl FnMut(u64, u64),
) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut hash = sha2::Sha256::new();
    let mut src = fs::File::open(from)?;
    let total = src.metadata()?.len();
    let mut dst = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    progress(0, total);
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n])?;
        hash.update(&buf[..n]);
        done += n as u64;
        progress(done, total);
    }
    // Through the descriptor: the mode is this file's, whatever the path is now.
    dst.set_permissions(fs::Permissions::from_mode(mode))?;
    dst.sync_all()?;
    Ok(hex::encode(hash.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_0600_and_dirs_0700() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("a/b");
        ensure_private_dir(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let f = dir.join("s.token");
        write_secret(&f, b"x").unwrap();
        write_secret(&f, b"y").unwrap();
        assert_eq!(
            fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read(&f).unwrap(), b"y");
        assert!(!f.with_extension("tmp").exists());
    }
}

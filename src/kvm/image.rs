//! VM base images and the disks made from them. A base image is a qcow2
//! file a user gives (`rivernode vm image import`); each VM's disk is a
//! qcow2 overlay whose backing file is the base, which stays read-only and
//! shared. An image that names a backing file or an external data file of
//! its own is refused: QEMU would open that path on the node for the guest
//! (any file the node can read, `/etc/shadow` or a disk).

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("running qemu-img under prlimit (install qemu-utils and util-linux)")]
    Tool(#[source] std::io::Error),
    #[error("qemu-img {what} {}: {message}", path.display())]
    QemuImg {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{}: {reason}", path.display())]
    Refused { path: PathBuf, reason: String },
    #[error("no VM image {name}: {} does not exist (import it with `rivernode vm image import {name} FILE.qcow2`)", path.display())]
    NoImage { name: String, path: PathBuf },
    #[error("VM image {name}: its copy has SHA-256 {got}, but {} says {want}; the image changed since it was imported, import it again under a new name", digest_file.display())]
    Digest {
        name: String,
        digest_file: PathBuf,
        want: String,
        got: String,
    },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The node's copy of base image `name` from the shared directory's
/// `vm-images/` (`shared_images`), made on first use in `store`: copied,
/// checked against the digest `vm image import` wrote beside it, judged
/// again (the shared file could have changed since), and kept read-only
/// under a name with its digest, so a later image of the same name is
/// another file and disks made from the old one keep their base.
/// `progress` hears bytes copied and the total.
pub fn install(
    shared_images: &Path,
    name: &str,
    store: &Path,
    progress: impl FnMut(u64, u64),
) -> Result<PathBuf, ImageError> {
    let src = shared_images.join(format!("{name}.qcow2"));
    let digest_file = shared_images.join(format!("{name}.qcow2.sha256"));
    if !src.is_file() {
        return Err(ImageError::NoImage {
            name: name.to_string(),
            path: src,
        });
    }
    let want = std::fs::read_to_string(&digest_file)
        .map_err(io(&digest_file))?
        .trim()
        .to_ascii_lowercase();
    if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ImageError::Refused {
            path: digest_file,
            reason: "not a SHA-256 digest; import the image again".into(),
        });
    }
    let dest = store.join(format!("{name}-{}.qcow2", &want[..16]));
    if dest.is_file() {
        return Ok(dest);
    }
    std::fs::create_dir_all(store).map_err(io(store))?;
    // QEMU (libvirt's user) reads the copies: the store must be passable.
    std::fs::set_permissions(store, std::os::unix::fs::PermissionsExt::from_mode(0o711))
        .map_err(io(store))?;
    let tmp = store.join(format!(".{name}.copying"));
    let _ = std::fs::remove_file(&tmp);
    let copied = crate::files::copy_hashed(&src, &tmp, 0o444, progress)
        .map_err(io(&src))
        .and_then(|got| {
            if got != want {
                return Err(ImageError::Digest {
                    name: name.to_string(),
                    digest_file: digest_file.clone(),
                    want: want.clone(),
                    got,
                });
            }
            inspect(&tmp)
        });
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    Ok(dest)
}

/// What a base image is, as far as VMs care.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageInfo {
    /// The disk size the guest sees.
    pub virtual_bytes: u64,
}

/// Judges `qemu-img info --output=json` of the image at `path`: qcow2,
/// standing alone (no backing file, no external data file), not
/// encrypted, not marked corrupt.
pub fn judge(path: &Path, info: &serde_json::Value) -> Result<ImageInfo, ImageError> {
    let refuse = |reason: &str| ImageError::Refused {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if info["format"] != "qcow2" {
        return Err(refuse(&format!(
            "a {} image; give a qcow2 image (qemu-img convert -O qcow2 IN OUT)",
            info["format"].as_str().unwrap_or("unknown")
        )));
    }
    if info.get("backing-filename").is_some() || info.get("full-backing-filename").is_some() {
        return Err(refuse(
            "it names a backing file; give a standalone image (qemu-img convert -O qcow2 IN OUT)",
        ));
    }
    let data = &info["format-specific"]["data"];
    if data.get("data-file").is_some() {
        return Err(refuse("it names an external data file"));
    }
    if info["encrypted"] == true || data.get("encrypt").is_some() {
        return Err(refuse("it is encrypted"));
    }
    if data["corrupt"] == true {
        return Err(refuse("qemu-img marks it corrupt"));
    }
    let virtual_bytes = info["virtual-size"]
        .as_u64()
        .filter(|s| *s > 0)
        .ok_or_else(|| refuse("no virtual size"))?;
    Ok(ImageInfo { virtual_bytes })
}

/// Runs qemu-img with a bound on its memory and CPU time (prlimit, from
/// util-linux): the files it reads are users', and qemu-img's parsers have
/// had holes.
fn qemu_img(
    what: &'static str,
    path: &Path,
    args: &[&std::ffi::OsStr],
) -> Result<Vec<u8>, ImageError> {
    qemu_img_for(what, path, args, 60)
}

/// `qemu_img` with `cpu_seconds` of CPU time: a whole disk read takes more.
fn qemu_img_for(
    what: &'static str,
    path: &Path,
    args: &[&std::ffi::OsStr],
    cpu_seconds: u32,
) -> Result<Vec<u8>, ImageError> {
    let o = Command::new("prlimit")
        .args([
            "--as=2147483648",
            &format!("--cpu={cpu_seconds}"),
            "--",
            "qemu-img",
        ])
        .args(args)
        .output()
        .map_err(ImageError::Tool)?;
    if !o.status.success() {
        let message = String::from_utf8_lossy(&o.stderr).trim().to_string();
        if message.contains("not in qcow2 format") {
            return Err(ImageError::Refused {
                path: path.to_path_buf(),
                reason: "not a qcow2 image; convert it (qemu-img convert -O qcow2 IN OUT)".into(),
            });
        }
        return Err(ImageError::QemuImg {
            what,
            path: path.to_path_buf(),
            message,
        });
    }
    Ok(o.stdout)
}

/// Reads and judges the image at `path`. The format is given, never
/// probed (a raw file can look like anything), and qemu-img opens no
/// backing file to answer.
pub fn inspect(path: &Path) -> Result<ImageInfo, ImageError> {
    let out = qemu_img(
        "info",
        path,
        &[
            "info".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "--output=json".as_ref(),
            path.as_os_str(),
        ],
    )?;
    let info: serde_json::Value =
        serde_json::from_slice(&out).map_err(|e| ImageError::QemuImg {
            what: "info",
            path: path.to_path_buf(),
            message: format!("unreadable answer: {e}"),
        })?;
    judge(path, &info)
}

/// The base image a VM's overlay `disk` (one `create_overlay` made) stands on.
pub fn backing_file(disk: &Path) -> Result<PathBuf, ImageError> {
    let out = qemu_img(
        "info",
        disk,
        &[
            "info".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            // The VM may hold it open (a restart's info while QEMU exits).
            "-U".as_ref(),
            "--output=json".as_ref(),
            disk.as_os_str(),
        ],
    )?;
    let info: serde_json::Value =
        serde_json::from_slice(&out).map_err(|e| ImageError::QemuImg {
            what: "info",
            path: disk.to_path_buf(),
            message: format!("unreadable answer: {e}"),
        })?;
    info["full-backing-filename"]
        .as_str()
        .or(info["backing-filename"].as_str())
        .map(PathBuf::from)
        .ok_or_else(|| ImageError::Refused {
            path: disk.to_path_buf(),
            reason: "a VM disk without its base image".into(),
        })
}

/// Makes `disk`, a qcow2 overlay on `base` of `size` bytes (at least the
/// base's own size: a disk never shrinks under its filesystem).
pub fn create_overlay(base: &Path, disk: &Path, size: u64) -> Result<(), ImageError> {
    let size = size.to_string();
    qemu_img(
        "create",
        disk,
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            "-b".as_ref(),
            base.as_os_str(),
            disk.as_os_str(),
            size.as_ref(),
        ],
    )
    .map(|_| ())
}

/// Makes `image` (a whole disk, as a backup job writes it) an overlay on
/// `base`, reading the same: a snapshot of a running VM then has the shape
/// of every VM disk here. It stays a whole copy (what it holds is kept;
/// where it has a hole and the base has data, zeros are written), and
/// qemu-img reads both whole to do it.
pub fn rebase(image: &Path, base: &Path) -> Result<(), ImageError> {
    qemu_img_for(
        "rebase",
        image,
        &[
            "rebase".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            "-b".as_ref(),
            base.as_os_str(),
            image.as_os_str(),
        ],
        3600,
    )
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn judged(info: serde_json::Value) -> Result<ImageInfo, String> {
        judge(Path::new("/x.qcow2"), &info).map_err(|e| e.to_string())
    }

    #[test]
    fn only_a_standalone_qcow2_is_taken() {
        let good = json!({"format": "qcow2", "virtual-size": 1024,
            "format-specific": {"type": "qcow2", "data": {"corrupt": false}}});
        assert_eq!(
            judged(good.clone()),
            Ok(ImageInfo {
                virtual_bytes: 1024
            })
        );
        let mut backed = good.clone();
        backed["backing-filename"] = json!("/etc/shadow");
        assert!(judged(backed).unwrap_err().contains("backing file"));
        let mut data_file = good.clone();
        data_file["format-specific"]["data"]["data-file"] = json!("/dev/sda");
        assert!(judged(data_file)
            .unwrap_err()
            .contains("external data file"));
        let mut encrypted = good.clone();
        encrypted["encrypted"] = json!(true);
        assert!(judged(encrypted).unwrap_err().contains("encrypted"));
        let mut corrupt = good.clone();
        corrupt["format-specific"]["data"]["corrupt"] = json!(true);
        assert!(judged(corrupt).unwrap_err().contains("corrupt"));
        let raw = json!({"format": "raw", "virtual-size": 1024});
        assert!(judged(raw).unwrap_err().contains("qemu-img convert"));
    }
}

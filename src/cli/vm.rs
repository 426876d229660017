//! `rivernode vm image import|list`: VM base images in the shared
//! directory, beside the environments. The CLI writes them where the
//! shared directory is mounted (as `env import` does); nodes copy them to
//! their own store and check the digest before a VM uses one.

use std::path::Path;

use anyhow::{bail, Context};

use crate::cli::args::{Output, VmImageCommand};
use crate::cli::client::Client;
use crate::cli::output::{bytes, emit, emit_json, table};
use crate::kvm::image::{inspect, ImageInfo};

/// One base image as `vm image list` shows it.
#[derive(Debug, serde::Serialize)]
struct Listed {
    name: String,
    virtual_bytes: u64,
    file_bytes: u64,
    sha256: String,
}

/// Where the images are: `SHARED_DIR/vm-images`, as the host names the shared directory.
async fn images_dir(client: &Client) -> anyhow::Result<std::path::PathBuf> {
    let envs: crate::api::Environments = client.get("/api/environments").await?;
    Ok(Path::new(&envs.shared_dir).join("vm-images"))
}

fn list(dir: &Path) -> anyhow::Result<Vec<Listed>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for e in entries.flatten() {
        let path = e.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".qcow2"))
            .filter(|n| crate::api::valid_image_name(n))
        else {
            continue;
        };
        let sha256 = std::fs::read_to_string(path.with_extension("qcow2.sha256"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let info = inspect(&path).unwrap_or(ImageInfo { virtual_bytes: 0 });
        out.push(Listed {
            name: name.to_string(),
            virtual_bytes: info.virtual_bytes,
            file_bytes: e.metadata().map(|m| m.len()).unwrap_or(0),
            sha256,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

pub async fn image(client: &Client, cmd: VmImageCommand, output: Output) -> anyhow::Result<()> {
    let dir = images_dir(client).await?;
    match cmd {
        VmImageCommand::List => {
            let images = list(&dir)?;
            match output {
                Output::Json => emit_json(&images),
                Output::Table => {
                    let rows: Vec<Vec<String>> = images
                        .iter()
                        .map(|i| {
                            vec![
                                i.name.clone(),
                                bytes(i.virtual_bytes),
                                bytes(i.file_bytes),
                                i.sha256.chars().take(12).collect(),
                            ]
                        })
                        .collect();
                    emit(&table(&["NAME", "DISK", "FILE", "SHA256"], &rows));
                }
            }
        }
        VmImageCommand::Import { name, file } => {
            if !crate::api::valid_image_name(&name) {
                bail!("image name {name:?}: use letters, digits, '.', '_' and '-'");
            }
            if !file.is_file() {
                bail!("{}: no such file (give a qcow2 image)", file.display());
            }
            // Refused before anything is copied; the copy is judged again,
            // since the file could change while it is read.
            inspect(&file)?;
            std::fs::create_dir_all(&dir).with_context(|| {
                format!(
                    "creating {} (is the shared directory mounted here?)",
                    dir.display()
                )
            })?;
            let dest = dir.join(format!("{name}.qcow2"));
            // VMs' disks are overlays on it: an image is never replaced.
            if dest.symlink_metadata().is_ok() {
                bail!(
                    "VM image {name} exists ({}); import under another name",
                    dest.display()
                );
            }
            // A name nobody can have planted a link at; made new, 0444.
            let mut nonce = [0u8; 8];
            getrandom::fill(&mut nonce).context("random bytes for a temporary name")?;
            let tmp = dir.join(format!(".{name}.{}.importing", hex::encode(nonce)));
            let copied =
                crate::cli::progress::copy_file(&file, &tmp, &format!("VM image {name}"), 0o444)
                    .with_context(|| format!("copying {} to {}", file.display(), tmp.display()))
                    .and_then(|sha256| Ok((sha256, inspect(&tmp)?)));
            let (sha256, info) = match copied {
                Ok(c) => c,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            };
            std::fs::rename(&tmp, &dest)
                .with_context(|| format!("renaming to {}", dest.display()))?;
            crate::files::write_public(
                &dest.with_extension("qcow2.sha256"),
                format!("{sha256}\n").as_bytes(),
            )
            .with_context(|| format!("writing the digest of {}", dest.display()))?;
            let listed = Listed {
                name: name.clone(),
                virtual_bytes: info.virtual_bytes,
                file_bytes: std::fs::metadata(&dest).map(|m| m.len()).unwrap_or(0),
                sha256,
            };
            match output {
                Output::Json => emit_json(&listed),
                Output::Table => emit(&format!(
                    "VM image {name} is {} ({} disk, sha256 {})\n",
                    dest.display(),
                    bytes(info.virtual_bytes),
                    &listed.sha256[..12]
                )),
            }
        }
    }
    Ok(())
}

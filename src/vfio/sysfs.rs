//! Writes to PCI sysfs files behind a trait, with a timeout: some devices
//! (consumer GPUs among them) hang in their driver's remove path, and a
//! write to `unbind` then never returns. Such a write runs on its own thread;
//! if it does not return in time it is reported as "device stuck" and the
//! thread is left blocked in the kernel (nothing can cancel it).

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// How sysfs is written. The real one writes files; tests substitute a fake
/// kernel that reacts to the writes the way the PCI core does.
pub trait SysfsWriter: Send + Sync + 'static {
    fn write(&self, path: &Path, value: &str) -> std::io::Result<()>;
}

/// Plain writes to the real (or a fake) sysfs tree.
pub struct RealSysfs;

impl SysfsWriter for RealSysfs {
    fn write(&self, path: &Path, value: &str) -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(value.as_bytes())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writing {value:?} to {path} failed")]
    Failed {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("device stuck: writing {value:?} to {path} did not return within {after:?}")]
    Stuck {
        path: PathBuf,
        value: String,
        after: Duration,
    },
}

/// Writes `value` to `path`, giving up after `timeout`.
pub fn write_with_timeout(
    writer: &Arc<dyn SysfsWriter>,
    path: &Path,
    value: &str,
    timeout: Duration,
) -> Result<(), WriteError> {
    let (tx, rx) = mpsc::channel();
    let (w, p, v) = (writer.clone(), path.to_path_buf(), value.to_string());
    std::thread::Builder::new()
        .name("sysfs-write".into())
        .spawn(move || {
            let _ = tx.send(w.write(&p, &v));
        })
        .map_err(|source| WriteError::Failed {
            path: path.to_path_buf(),
            value: value.to_string(),
            source,
        })?;
    match rx.recv_timeout(timeout) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(WriteError::Failed {
            path: path.to_path_buf(),
            value: value.to_string(),
            source,
        }),
        Err(_) => Err(WriteError::Stuck {
            path: path.to_path_buf(),
            value: value.to_string(),
            after: timeout,
        }),
    }
}

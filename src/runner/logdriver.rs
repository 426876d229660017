//! The task log driver. containerd's shim starts this binary for every task
//! (`binary://` stdio URI) with the task's stdout and stderr on fds 3 and 4
//! and a readiness pipe on fd 5, so logs keep flowing into files while the
//! runner restarts. Each stream goes to its own file with a size cap: past
//! the cap the file is rotated once (`.1`), so a chatty task cannot fill the disk.
//!
//! The shim passes the URI's query as `key value` argument pairs in no fixed
//! order, which is why this mode is recognised by a marker argument anywhere
//! on the command line rather than by a subcommand.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};

/// The argument that selects this mode.
pub const MARKER: &str = "--rivernode-log-driver";

/// The `binary://` URI that makes the shim run this driver.
/// Logs go to `dir/<name>.stdout` and `dir/<name>.stderr`.
pub fn uri(binary: &Path, dir: &Path, name: &str, max_bytes: u64) -> String {
    format!(
        "binary://{}?{MARKER}=1&--dir={}&--name={name}&--max-bytes={max_bytes}",
        binary.display(),
        dir.display()
    )
}

fn arg_value(args: &[String], key: &str) -> Option<String> {
    args.iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

struct Capped {
    path: PathBuf,
    file: File,
    written: u64,
    max: u64,
}

impl Capped {
    fn open(path: PathBuf, max: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path,
            file,
            written,
            max,
        })
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.written + data.len() as u64 > self.max && self.written > 0 {
            let old = self.path.with_extension(format!(
                "{}.1",
                self.path
                    .extension()
                    .and_then(|e| e.to_str())
                    .unwrap_or("log")
            ));
            std::fs::rename(&self.path, old)?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            self.written = 0;
        }
        self.file.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }
}

fn pump(mut from: File, mut to: Capped) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                // A full disk must not block the task: drop what cannot be written.
                let _ = to.write(&buf[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Runs the driver; returns the process exit code.
pub fn main(args: &[String]) -> i32 {
    let Some(dir) = arg_value(args, "--dir").map(PathBuf::from) else {
        eprintln!("log driver: missing --dir");
        return 2;
    };
    let max: u64 = arg_value(args, "--max-bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(100 << 20);
    let id = arg_value(args, "--name")
        .or_else(|| std::env::var("CONTAINER_ID").ok())
        .unwrap_or_else(|| "unknown".into());
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        || id.starts_with('.')
    {
        eprintln!("log driver: bad log name {id:?}");
        return 2;
    }
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("log driver: {}: {e}", dir.display());
        return 1;
    }
    let open = |stream: &str| Capped::open(dir.join(format!("{id}.{stream}")), max);
    let (out, err) = match (open("stdout"), open("stderr")) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("log driver: {e}");
            return 1;
        }
    };
    // SAFETY: the containerd shim starts this process with the read ends of the
    // task's stdout and stderr pipes on fds 3 and 4 and the write end of its
    // readiness pipe on fd 5 (containerd pkg/process NewBinaryIO); nothing else
    // in this process owns those descriptors.
    let (stdout, stderr, ready) = unsafe {
        (
            File::from_raw_fd(3),
            File::from_raw_fd(4),
            File::from_raw_fd(5),
        )
    };
    // Closing the readiness pipe tells the shim the task may start.
    drop(ready);
    let t = std::thread::spawn(move || pump(stderr, err));
    pump(stdout, out);
    let _ = t.join();
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_rotate_once() {
        let d = tempfile::tempdir().unwrap();
        let mut c = Capped::open(d.path().join("task-1.stdout"), 10).unwrap();
        c.write(b"12345678").unwrap();
        c.write(b"abcdef").unwrap();
        assert_eq!(
            std::fs::read(d.path().join("task-1.stdout")).unwrap(),
            b"abcdef"
        );
        assert_eq!(
            std::fs::read(d.path().join("task-1.stdout.1")).unwrap(),
            b"12345678"
        );
    }

    #[test]
    fn uri_carries_the_marker_and_settings() {
        let u = uri(
            Path::new("/usr/local/bin/rivernode"),
            Path::new("/var/lib/rivernode/runner/logs"),
            "task-1",
            1024,
        );
        assert!(
            u.starts_with("binary:///usr/local/bin/rivernode?--rivernode-log-driver=1"),
            "{u}"
        );
        let args: Vec<String> = ["--max-bytes", "1024", "--dir", "/x", MARKER, "1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(arg_value(&args, "--dir").as_deref(), Some("/x"));
        assert_eq!(arg_value(&args, "--max-bytes").as_deref(), Some("1024"));
    }
}

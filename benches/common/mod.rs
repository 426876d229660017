//! What the whole-system benches share: the real binary's host, started on
//! loopback in a directory of its own.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `rivernode host`; killed when dropped.
pub struct Host {
    child: Child,
    pub url: String,
    pub admin: String,
    pub join: String,
    pub dir: tempfile::TempDir,
}

impl Host {
    /// Starts the host with `extra` flags; `dir/shared` is its shared directory.
    pub fn start(extra: &[&str]) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("host");
        let shared = dir.path().join("shared");
        std::fs::create_dir_all(shared.join("environments")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_rivernode"))
            .args([
                "--data-dir",
                data.to_str().unwrap(),
                "host",
                "--config",
                "/dev/null",
            ])
            .args([
                "--bind",
                "127.0.0.1",
                "--api-port",
                "0",
                "--ssh-proxy-port",
                "0",
            ])
            .args(["--shared-dir", shared.to_str().unwrap()])
            .args(extra)
            .env("RIVERNODE_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("start rivernode host");
        let read = |f: &str| {
            std::fs::read_to_string(data.join(f))
                .ok()
                .map(|s| s.trim().to_string())
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = loop {
            if let Some(u) = read("api.url") {
                break u;
            }
            assert!(Instant::now() < deadline, "host did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        Host {
            child,
            url,
            admin: read("admin.token").unwrap(),
            join: read("join.token").unwrap(),
            dir,
        }
    }

    /// The shared directory's environments.
    #[allow(dead_code)]
    pub fn environments(&self) -> PathBuf {
        self.dir.path().join("shared/environments")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

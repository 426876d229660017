//! A private libvirtd for VM tests, started in the caller's private mount
//! and network namespaces (`cluster::private_namespaces`): tmpfs over
//! libvirt's system directories, so the machine's own libvirt (if any) is
//! never touched, QEMU as root without a security driver, and QEMU writing
//! the serial log itself (no virtlogd).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{command_exists, real_part_available, WAIT};

pub struct PrivateLibvirt {
    child: Child,
    pub dir: tempfile::TempDir,
    pub uri: String,
}

/// True when libvirtd with its QEMU driver, QEMU and qemu-img are here.
pub fn libvirt_present() -> bool {
    let present = command_exists("libvirtd")
        && command_exists("qemu-system-x86_64")
        && command_exists("qemu-img")
        && Path::new("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so")
            .exists();
    real_part_available(
        "libvirtd with its QEMU driver, qemu-system-x86, qemu-utils",
        present,
    )
}

/// How QEMU runs as root, every file left as it is (tests that boot
/// domains from their own private temporary directories).
const AS_ROOT: &str = "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\n";
/// How Debian's libvirt runs QEMU: as its own user, libvirt handing the
/// domain's files to it while it runs.
const AS_QEMU_USER: &str =
    "user = \"libvirt-qemu\"\ngroup = \"libvirt-qemu\"\ndynamic_ownership = 1\n";

impl PrivateLibvirt {
    /// Starts libvirtd with QEMU as root; call from a thread in private namespaces.
    pub fn start() -> PrivateLibvirt {
        Self::start_with(AS_ROOT)
    }

    /// Starts libvirtd that runs QEMU as libvirt-qemu, as a node's does.
    pub fn start_as_qemu_user() -> PrivateLibvirt {
        Self::start_with(AS_QEMU_USER)
    }

    fn start_with(qemu_user: &str) -> PrivateLibvirt {
        for d in [
            "/run/libvirt",
            "/var/lib/libvirt",
            "/etc/libvirt",
            "/var/log/libvirt",
            "/var/cache/libvirt",
        ] {
            std::fs::create_dir_all(d).unwrap();
            nix::mount::mount(
                Some("tmpfs"),
                d,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .unwrap_or_else(|e| panic!("tmpfs on {d}: {e}"));
        }
        std::fs::write(
            "/etc/libvirt/qemu.conf",
            format!("{qemu_user}security_driver = \"none\"\nstdio_handler = \"file\"\n"),
        )
        .unwrap();
        // A short path: the guest agent's socket path must fit 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("rvl")
            .tempdir_in("/tmp")
            .unwrap();
        let sock = dir.path().join("sock");
        std::fs::create_dir_all(&sock).unwrap();
        let conf = dir.path().join("libvirtd.conf");
        std::fs::write(
            &conf,
            format!(
                "unix_sock_dir = \"{}\"\nunix_sock_rw_perms = \"0700\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\nlog_outputs = \"3:file:{}\"\n",
                sock.display(),
                dir.path().join("libvirtd.log").display()
            ),
        )
        .unwrap();
        let mut child = Command::new("libvirtd")
            .arg("--config")
            .arg(&conf)
            // Its own pid file: the default (/run/libvirtd.pid) is one lock
            // for every libvirtd on the machine, so two tests could not both run one.
            .arg("--pid-file")
            .arg(dir.path().join("libvirtd.pid"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap())
            .spawn()
            .expect("start libvirtd");
        let socket = sock.join("libvirt-sock");
        let deadline = Instant::now() + WAIT;
        while !socket.exists() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
            }
            assert!(
                Instant::now() < deadline,
                "libvirtd did not listen at {}: {}",
                socket.display(),
                std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        PrivateLibvirt {
            child,
            uri: format!("qemu:///system?socket={}", socket.display()),
            dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("libvirtd.log")).unwrap_or_default()
    }

    /// The QEMU process of domain `name` (libvirt's pid file).
    pub fn qemu_pid(&self, name: &str) -> Option<u32> {
        std::fs::read_to_string(PathBuf::from("/run/libvirt/qemu").join(format!("{name}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for PrivateLibvirt {
    fn drop(&mut self) {
        // QEMU outlives libvirtd: a test that failed half-way leaves none.
        if let Ok(pids) = std::fs::read_dir("/run/libvirt/qemu") {
            for e in pids.flatten() {
                if e.path().extension().is_some_and(|x| x == "pid") {
                    if let Some(pid) = std::fs::read_to_string(e.path())
                        .ok()
                        .and_then(|p| p.trim().parse::<i32>().ok())
                    {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

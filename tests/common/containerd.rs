//! A private containerd for tests (its own root, state and socket under a
//! temp dir) and busybox environments built at test time: an OCI archive
//! with umoci and a docker archive from it with skopeo. Everything the
//! containerd started (shims, mounts) is removed when the fixture drops.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{command_exists, real_part_available};

pub struct PrivateContainerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Child,
}

impl PrivateContainerd {
    /// `None` (after a loud skip line) when containerd or runc is missing and
    /// `RIVERNODE_REQUIRE_REAL` is not set.
    pub fn start() -> Option<Self> {
        let present = command_exists("containerd") && command_exists("runc");
        if !real_part_available("containerd and runc", present) {
            return None;
        }
        let dir = tempfile::Builder::new()
            .prefix("rn-ctd-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{1}\"\n",
                dir.path().display(),
                socket.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let deadline = Instant::now() + super::WAIT;
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not create its socket"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Self { dir, socket, child })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// SIGSTOP (`true`) or SIGCONT: a containerd that stops answering, and comes back.
    pub fn freeze(&self, frozen: bool) {
        let sig = if frozen {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }
}

impl PrivateContainerd {
    /// `ctr` in rivernode's namespace of this containerd; its stdout.
    pub fn ctr(&self, args: &[&str]) -> String {
        let o = Command::new("ctr")
            .arg("-a")
            .arg(&self.socket)
            .args(["-n", "rivernode"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- containerd.log tail ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        // Containers first, through containerd itself, so their processes,
        // runc state and cgroups go too; then containerd and its shims.
        let ctr = |args: &[&str]| {
            Command::new("ctr")
                .arg("-a")
                .arg(&self.socket)
                .args(["-n", "rivernode"])
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        for id in ctr(&["task", "ls", "-q"]).lines() {
            ctr(&["task", "kill", "-a", "-s", "SIGKILL", id]);
        }
        std::thread::sleep(Duration::from_millis(200));
        for id in ctr(&["task", "ls", "-q"]).lines() {
            ctr(&["task", "rm", "-f", id]);
        }
        for id in ctr(&["containers", "ls", "-q"]).lines() {
            ctr(&["containers", "rm", id]);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let me = self.dir.path().to_string_lossy().into_owned();
        // Shims outlive containerd by design: end every process started for this instance.
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
                if String::from_utf8_lossy(&cmd).contains(&me) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        // Rootfs mounts of containers that were still running.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| m.starts_with(&me))
            .collect();
        points.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in points {
            let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn run(cmd: &mut Command) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A busybox OCI archive (about 1 MiB) at `dir/busybox.tar`.
pub fn busybox_oci_archive(dir: &Path) -> Option<PathBuf> {
    busybox_oci_archive_as(dir, None)
}

/// The busybox archive; with `user` = (User, passwd line, group line) it
/// runs as that user (its config's `User`) and has those /etc files.
pub fn busybox_oci_archive_as(dir: &Path, user: Option<(&str, &str, &str)>) -> Option<PathBuf> {
    busybox_oci_archive_with(dir, user, &[], &[], &[])
}

/// The busybox archive with more `umoci config` flags (`--config.entrypoint`,
/// `--config.workingdir`, `--config.stopsignal`, ...) and more directories.
pub fn busybox_oci_archive_with(
    dir: &Path,
    user: Option<(&str, &str, &str)>,
    config: &[&str],
    dirs: &[&str],
    files: &[(&str, &str)],
) -> Option<PathBuf> {
    let present = command_exists("umoci") && Path::new("/bin/busybox").exists();
    if !real_part_available("umoci and busybox-static", present) {
        return None;
    }
    let img = dir.join("img");
    let bundle = dir.join("bundle");
    let layout = format!("{}:latest", img.display());
    run(Command::new("umoci").arg("init").arg("--layout").arg(&img));
    run(Command::new("umoci").args(["new", "--image", &layout]));
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image", &layout])
        .arg(&bundle));
    let bin = bundle.join("rootfs/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    for applet in [
        "sh", "echo", "cat", "sleep", "head", "tr", "true", "false", "env", "ls", "id", "touch",
        "rm", "stat", "grep", "df", "awk", "mknod", "tail", "unshare", "ps", "stty", "httpd", "nc",
        "mkdir",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    for d in ["tmp", "proc", "sys", "dev", "etc"].iter().chain(dirs) {
        std::fs::create_dir_all(bundle.join("rootfs").join(d)).unwrap();
    }
    // Executables of the test's own (stand-ins), by path in the image.
    for (path, text) in files {
        let f = bundle.join("rootfs").join(path.trim_start_matches('/'));
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    if let Some((_, passwd, group)) = user {
        std::fs::write(bundle.join("rootfs/etc/passwd"), passwd).unwrap();
        std::fs::write(bundle.join("rootfs/etc/group"), group).unwrap();
    }
    run(Command::new("umoci")
        .args(["repack", "--image", &layout])
        .arg(&bundle));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &layout,
        "--config.env",
        "PATH=/bin",
        "--config.cmd",
        "/bin/sh",
    ]));
    if let Some((u, _, _)) = user {
        run(Command::new("umoci").args(["config", "--image", &layout, "--config.user", u]));
    }
    if !config.is_empty() {
        run(Command::new("umoci")
            .args(["config", "--image", &layout])
            .args(config));
    }
    let archive = dir.join("busybox.tar");
    tar_layout(&img, &archive);
    Some(archive)
}

/// The busybox archive made in `dir` with one more layer (a file
/// `/etc/second`), at `dir/<name>.tar`: its first layer is the busybox
/// archive's own.
pub fn busybox_with_a_layer(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(format!("{name}-img"));
    let bundle = dir.join(format!("{name}-bundle"));
    run(Command::new("cp").arg("-a").arg(dir.join("img")).arg(&img));
    let layout = format!("{}:latest", img.display());
    run(Command::new("umoci")
        .args(["unpack", "--rootless", "--image", &layout])
        .arg(&bundle));
    std::fs::write(bundle.join("rootfs/etc/second"), "second layer\n").unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &layout])
        .arg(&bundle));
    let archive = dir.join(format!("{name}.tar"));
    tar_layout(&img, &archive);
    archive
}

/// The OCI layout at `img` as the archive `archive`.
fn tar_layout(img: &Path, archive: &Path) {
    run(Command::new("tar")
        .arg("cf")
        .arg(archive)
        .arg("-C")
        .arg(img)
        .arg("."));
}

/// The same image as a `docker save` archive, converted by skopeo.
pub fn docker_archive(oci: &Path, dir: &Path) -> Option<PathBuf> {
    if !real_part_available("skopeo", command_exists("skopeo")) {
        return None;
    }
    let out = dir.join("busybox-docker.tar");
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci-archive:{}", oci.display()))
        .arg(format!("docker-archive:{}:busybox:test", out.display())));
    Some(out)
}

/// A private registry (Debian's docker-registry) on a loopback port.
pub struct PrivateRegistry {
    _dir: tempfile::TempDir,
    child: Child,
    pub addr: String,
}

impl PrivateRegistry {
    pub fn start() -> Option<Self> {
        if !real_part_available("docker-registry", command_exists("docker-registry")) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        // A free loopback port: the registry cannot report the one it picked.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let deadline = Instant::now() + super::WAIT;
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "the registry did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Self {
            _dir: dir,
            child,
            addr,
        })
    }

    /// Pushes an OCI archive as `repo:tag` with skopeo.
    pub fn push(&self, archive: &Path, repo_tag: &str) -> String {
        let dest = format!("{}/{repo_tag}", self.addr);
        run(Command::new("skopeo")
            .args(["copy", "--dest-tls-verify=false"])
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("docker://{dest}")));
        dest
    }
}

impl Drop for PrivateRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Debian 12 (minbase) image with openssh-server, as a `docker save`
/// archive: made with debootstrap from Debian's mirror once, then kept under
/// the build's target directory for later runs.
pub fn debian_sshd_archive() -> Option<PathBuf> {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-images");
    let archive = cache.join("debian-sshd.tar");
    if archive.exists() {
        return Some(archive);
    }
    std::fs::create_dir_all(&cache).unwrap();
    let work = tempfile::tempdir_in(&cache).unwrap();
    let rootfs = work.path().join("rootfs");
    if !super::debootstrap(&rootfs, "openssh-server") {
        return None;
    }
    // What a container runtime provides itself, and downloaded packages.
    for d in ["dev", "proc", "sys", "var/cache/apt/archives"] {
        let _ = std::fs::remove_dir_all(rootfs.join(d));
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    let layer = work.path().join("layer.tar");
    run(Command::new("tar")
        .args(["--numeric-owner", "--xattrs", "-cf"])
        .arg(&layer)
        .arg("-C")
        .arg(&rootfs)
        .arg("."));
    let diff_id = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        std::io::copy(&mut std::fs::File::open(&layer).unwrap(), &mut h).unwrap();
        hex::encode(h.finalize())
    };
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/bash"],
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
    });
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_name = {
        use sha2::Digest;
        format!("{}.json", hex::encode(sha2::Sha256::digest(&config_bytes)))
    };
    std::fs::write(work.path().join(&config_name), &config_bytes).unwrap();
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": ["debian-sshd:test"],
        "Layers": ["layer.tar"],
    }]);
    std::fs::write(
        work.path().join("manifest.json"),
        serde_json::to_vec(&manifest).unwrap(),
    )
    .unwrap();
    let partial = cache.join("debian-sshd.tar.partial");
    run(Command::new("tar")
        .arg("cf")
        .arg(&partial)
        .arg("-C")
        .arg(work.path())
        .args(["manifest.json", &config_name, "layer.tar"]));
    std::fs::rename(&partial, &archive).unwrap();
    Some(archive)
}

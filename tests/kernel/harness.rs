//! The kernel VM harness: builds an initramfs holding busybox, this test
//! binary with the libraries it links, and chosen kernel modules; boots the
//! installed Debian kernel in QEMU (TCG) with the topology a test asks for;
//! runs one named test inside as `<binary> guest <name>`; reads the verdict
//! from the serial console. A guest that hangs is killed at its timeout.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the guest finds this test binary.
pub const GUEST_BINARY: &str = "/rivernode-test";
/// Where the guest finds the real `rivernode` binary (same libraries).
pub const GUEST_RIVERNODE: &str = "/rivernode";
const RESULT_MARKER: &str = "RIVERNODE-RESULT ";

/// The machine a test runs on.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub cpus: u32,
    pub memory_mib: u32,
    /// NUMA nodes as (first cpu, last cpu, memory MiB); empty = no NUMA.
    pub numa: Vec<(u32, u32, u32)>,
    /// Emulated Intel IOMMU (q35 `intel-iommu`, guest `intel_iommu=on`).
    pub iommu: bool,
    /// Extra `-device` arguments, e.g. `e1000,netdev=n0`.
    pub devices: Vec<String>,
    /// Kernel modules to load before the test, dependencies resolved.
    pub modules: Vec<&'static str>,
    /// The host's root directory shared read-only over 9p (tag `hostroot`):
    /// programs the initramfs does not carry (a nested QEMU) run from it.
    pub host_root: bool,
    pub timeout: Duration,
}

impl Default for VmSpec {
    fn default() -> Self {
        Self {
            cpus: 2,
            memory_mib: 512,
            numa: Vec::new(),
            iommu: false,
            devices: Vec::new(),
            modules: Vec::new(),
            host_root: false,
            timeout: Duration::from_secs(180),
        }
    }
}

/// What the host machine must offer to run guests.
pub struct Kit {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub modules_dir: PathBuf,
    pub busybox: PathBuf,
}

impl Kit {
    /// Finds QEMU, the newest installed kernel with modules, and a static busybox.
    /// `Err` says what is missing and which package provides it.
    pub fn find() -> Result<Kit, String> {
        let qemu = which("qemu-system-x86_64")
            .ok_or("qemu-system-x86_64 is missing (Debian package qemu-system-x86)")?;
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or("busybox is missing (Debian package busybox-static)")?;
        let static_ok = Command::new("ldd")
            .arg(&busybox)
            .output()
            .map(|o| {
                !o.status.success() || String::from_utf8_lossy(&o.stdout).contains("not a dynamic")
            })
            .unwrap_or(true);
        if !static_ok {
            return Err(format!(
                "{} is dynamically linked; install busybox-static",
                busybox.display()
            ));
        }
        let (kernel, modules_dir) = match std::env::var_os("RIVERNODE_TEST_KERNEL") {
            Some(k) => {
                let k = PathBuf::from(k);
                let ver = k
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix("vmlinuz-"))
                    .unwrap_or_default()
                    .to_string();
                (k, PathBuf::from("/lib/modules").join(ver))
            }
            None => newest_kernel().ok_or(
                "no /boot/vmlinuz-* with matching /lib/modules (Debian package linux-image-amd64)",
            )?,
        };
        Ok(Kit {
            qemu,
            kernel,
            modules_dir,
            busybox,
        })
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn newest_kernel() -> Option<(PathBuf, PathBuf)> {
    let mut found: Vec<(PathBuf, PathBuf)> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let ver = name.strip_prefix("vmlinuz-")?.to_string();
            let modules = PathBuf::from("/lib/modules").join(&ver);
            modules
                .join("modules.dep")
                .exists()
                .then(|| (e.path(), modules))
        })
        .collect();
    found.sort();
    found.pop()
}

/// A cpio "newc" archive, the format the kernel unpacks as initramfs.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let name = name.trim_start_matches('/');
        let mut h = String::from("070701");
        for v in [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ] {
            let _ = write!(h, "{v:08x}");
        }
        self.buf.extend_from_slice(h.as_bytes());
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    /// Adds `path`'s parent directories that are not in the archive yet.
    fn parents(&mut self, path: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            if self.dirs.insert(acc.clone()) {
                let a = acc.clone();
                self.entry(&a, 0o040755, &[], (0, 0));
            }
        }
    }

    pub fn dir(&mut self, path: &str) {
        self.parents(&format!("{path}/x"));
    }

    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.parents(path);
        self.entry(path, 0o100000 | mode, data, (0, 0));
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.entry(path, 0o120777, target.as_bytes(), (0, 0));
    }

    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) {
        self.parents(path);
        self.entry(path, 0o020600, &[], (major, minor));
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.buf
    }
}

/// The shared libraries (and loader) `ldd` lists for `binary`.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let o = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    let text = String::from_utf8_lossy(&o.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Module files for `names` and everything they depend on, in load order.
fn module_load_order(modules_dir: &Path, names: &[&str]) -> Result<Vec<PathBuf>, String> {
    let dep_text = std::fs::read_to_string(modules_dir.join("modules.dep"))
        .map_err(|e| format!("modules.dep: {e}"))?;
    let norm = |s: &str| s.replace('-', "_");
    let mut deps: std::collections::HashMap<String, Vec<String>> = Default::default();
    let mut by_name: std::collections::HashMap<String, String> = Default::default();
    for line in dep_text.lines() {
        let Some((file, rest)) = line.split_once(':') else {
            continue;
        };
        let base = Path::new(file)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split(".ko").next())
            .unwrap_or_default();
        by_name.insert(norm(base), file.to_string());
        deps.insert(
            file.to_string(),
            rest.split_whitespace().map(str::to_string).collect(),
        );
    }
    fn visit(
        f: &str,
        deps: &std::collections::HashMap<String, Vec<String>>,
        out: &mut Vec<String>,
    ) {
        if out.iter().any(|o| o == f) {
            return;
        }
        for d in deps.get(f).into_iter().flatten() {
            visit(d, deps, out);
        }
        out.push(f.to_string());
    }
    let mut order = Vec::new();
    for n in names {
        let file = by_name.get(&norm(n)).ok_or_else(|| {
            format!(
                "kernel module {n} is not in {}",
                modules_dir.join("modules.dep").display()
            )
        })?;
        visit(file, &deps, &mut order);
    }
    Ok(order.into_iter().map(|f| modules_dir.join(f)).collect())
}

fn read_module(path: &Path) -> Result<Vec<u8>, String> {
    let name = path.to_string_lossy();
    if name.ends_with(".xz") {
        let o = Command::new("xz")
            .arg("-dc")
            .arg(path)
            .output()
            .map_err(|e| format!("xz: {e}"))?;
        if !o.status.success() {
            return Err(format!("xz -dc {name} failed"));
        }
        Ok(o.stdout)
    } else if name.ends_with(".zst") {
        let o = Command::new("zstd")
            .arg("-dc")
            .arg(path)
            .output()
            .map_err(|e| format!("zstd: {e}"))?;
        Ok(o.stdout)
    } else {
        std::fs::read(path).map_err(|e| format!("{name}: {e}"))
    }
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
for m in $(cat /modules.order); do
    insmod "/lib/modules/$m.ko" || echo "RIVERNODE-MODULE-FAILED $m"
done
test=$(sed -n 's/.*rivernode\.test=\([^ ]*\).*/\1/p' /proc/cmdline)
echo "RIVERNODE-START $test"
RIVERNODE_IN_GUEST=1 /rivernode-test guest "$test"
echo "RIVERNODE-RESULT $?"
poweroff -f
"#;

/// Builds the initramfs for `modules` (uncompressed: the kernel unpacks it
/// faster than it would decompress it under TCG).
pub fn build_initramfs(kit: &Kit, modules: &[&str], out: &Path) -> Result<(), String> {
    let mut c = Cpio::default();
    for d in [
        "proc",
        "sys",
        "dev",
        "tmp",
        "bin",
        "sbin",
        "etc",
        "lib/modules",
    ] {
        c.dir(d);
    }
    c.char_device("dev/console", 5, 1);
    c.char_device("dev/null", 1, 3);
    c.file("init", 0o755, INIT.as_bytes());
    let busybox =
        std::fs::read(&kit.busybox).map_err(|e| format!("{}: {e}", kit.busybox.display()))?;
    c.file("bin/busybox", 0o755, &busybox);
    c.symlink("bin/sh", "busybox");
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    c.file(GUEST_BINARY, 0o755, &without_debug_info(&me, out)?);
    let cli = Path::new(env!("CARGO_BIN_EXE_rivernode"));
    c.file(GUEST_RIVERNODE, 0o755, &without_debug_info(cli, out)?);
    let mut libs = shared_libraries(&me)?;
    libs.extend(shared_libraries(cli)?);
    libs.sort();
    libs.dedup();
    for lib in libs {
        let data = std::fs::read(&lib).map_err(|e| format!("{}: {e}", lib.display()))?;
        c.file(&lib.to_string_lossy(), 0o755, &data);
    }
    let mut order = String::new();
    for path in module_load_order(&kit.modules_dir, modules)? {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split(".ko").next())
            .unwrap_or_default()
            .to_string();
        c.file(
            &format!("lib/modules/{name}.ko"),
            0o644,
            &read_module(&path)?,
        );
        order.push_str(&name);
        order.push('\n');
    }
    c.file("modules.order", 0o644, order.as_bytes());
    let mut f = std::fs::File::create(out).map_err(|e| format!("{}: {e}", out.display()))?;
    f.write_all(&c.finish())
        .map_err(|e| format!("{}: {e}", out.display()))
}

/// `binary` without its debug sections (objcopy, from binutils): a debug
/// build's binaries are most of an initramfs the guest unpacks into half of
/// its memory. The copy is made beside `out`.
fn without_debug_info(binary: &Path, out: &Path) -> Result<Vec<u8>, String> {
    let name = binary.file_name().unwrap_or_default().to_string_lossy();
    let copy = out.with_file_name(format!("{name}.stripped"));
    let o = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(binary)
        .arg(&copy)
        .output()
        .map_err(|e| format!("objcopy (install binutils): {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "objcopy --strip-debug {}: {}",
            binary.display(),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    let data = std::fs::read(&copy).map_err(|e| format!("{}: {e}", copy.display()));
    let _ = std::fs::remove_file(&copy);
    data
}

/// The outcome of one guest run.
pub struct Verdict {
    pub passed: bool,
    pub console: String,
    pub elapsed: Duration,
    pub reason: String,
}

impl Verdict {
    /// The last lines of the console, for failure reports.
    pub fn console_tail(&self, lines: usize) -> String {
        let all: Vec<&str> = self.console.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Boots a guest from `initramfs` and runs test `name` in it.
pub fn run_guest(kit: &Kit, spec: &VmSpec, initramfs: &Path, name: &str, work: &Path) -> Verdict {
    let console_path = work.join(format!("{name}.console"));
    let mut append = format!("console=ttyS0 panic=-1 quiet rivernode.test={name}");
    let mut cmd = Command::new(&kit.qemu);
    cmd.args([
        "-accel",
        "tcg",
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
    ]);
    cmd.args([
        "-machine",
        "q35",
        "-smp",
        &spec.cpus.to_string(),
        "-m",
        &format!("{}M", spec.memory_mib),
    ]);
    cmd.arg("-serial")
        .arg(format!("file:{}", console_path.display()));
    cmd.arg("-kernel")
        .arg(&kit.kernel)
        .arg("-initrd")
        .arg(initramfs);
    if spec.iommu {
        cmd.args(["-device", "intel-iommu"]);
        append.push_str(" intel_iommu=on");
    }
    for (i, (first, last, mib)) in spec.numa.iter().enumerate() {
        cmd.args([
            "-object",
            &format!("memory-backend-ram,id=m{i},size={mib}M"),
        ]);
        cmd.args([
            "-numa",
            &format!("node,nodeid={i},cpus={first}-{last},memdev=m{i}"),
        ]);
    }
    if spec.host_root {
        cmd.args([
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        ]);
    }
    for d in &spec.devices {
        if d.contains("netdev=n0") {
            cmd.args(["-netdev", "user,id=n0,restrict=on"]);
        }
        cmd.args(["-device", d]);
    }
    cmd.arg("-append").arg(&append);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Verdict {
                passed: false,
                console: String::new(),
                elapsed: start.elapsed(),
                reason: format!("cannot start {}: {e}", kit.qemu.display()),
            }
        }
    };
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if start.elapsed() > spec.timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(_) => break None,
        }
    };
    let mut qemu_err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut qemu_err);
    }
    let console = std::fs::read_to_string(&console_path).unwrap_or_default();
    let elapsed = start.elapsed();
    let result = console.lines().find_map(|l| {
        l.trim()
            .strip_prefix(RESULT_MARKER)
            .map(|c| c.trim().to_string())
    });
    let (passed, reason) = match (status, result) {
        (None, _) => (
            false,
            format!("guest hung: killed after {:?}", spec.timeout),
        ),
        (Some(_), Some(code)) if code == "0" => (true, String::new()),
        (Some(_), Some(code)) => (false, format!("test exited with {code} in the guest")),
        (Some(s), None) => (
            false,
            format!(
                "guest ended ({s}) without a verdict; qemu said: {}",
                qemu_err.trim()
            ),
        ),
    };
    Verdict {
        passed,
        console,
        elapsed,
        reason,
    }
}

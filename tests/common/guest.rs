//! Guests for VM tests and benches, made at test time from this machine's
//! own kernel, modules and binaries: the tier-1 guest (busybox, dropbear and
//! a small NoCloud reader of our own in an initramfs) and a base image for
//! its disk.

use std::process::Command;

use super::real_part_available;

/// Runs `c`; its stdout. Fails the test with its output when it fails.
pub fn run(c: &mut Command) -> String {
    let o = c.output().unwrap();
    assert!(
        o.status.success(),
        "{c:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The node's newest kernel and its version, for guests to boot, when
/// libvirt, QEMU and the SSH tools are here too; none (a clear skip, or a
/// failure where real parts are required) without them.
pub fn guest_kernel() -> Option<(std::path::PathBuf, String)> {
    if !super::cluster::parts_present() || !super::libvirt::libvirt_present() {
        return None;
    }
    let Some(kernel) = newest_kernel() else {
        assert!(!real_part_available(
            "a kernel in /boot (linux-image-amd64)",
            false
        ));
        return None;
    };
    let version = kernel
        .file_name()?
        .to_string_lossy()
        .trim_start_matches("vmlinuz-")
        .to_string();
    Some((boot_copy(&kernel), version))
}

/// A copy of the node's boot file `path` (its kernel, Debian's initrd) for
/// guests to boot: libvirt hands the files a domain boots to QEMU's user
/// (dynamic ownership) and, when a test kills QEMU and libvirtd, never hands
/// them back; the machine's own /boot stays as it is. One copy per machine,
/// made beside and renamed, so tests running at once share it.
pub fn boot_copy(path: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::path::Path::new("/tmp/rivernode-test-boot");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.join(path.file_name().unwrap());
    let same = |a: &std::path::Path, b: &std::path::Path| {
        std::fs::metadata(a).map(|m| m.len()).ok() == std::fs::metadata(b).map(|m| m.len()).ok()
    };
    if !same(path, &copy) {
        let tmp = tempfile::NamedTempFile::new_in(dir).unwrap();
        std::fs::copy(path, tmp.path()).unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        tmp.persist(&copy).unwrap();
    }
    // A test that died under QEMU's user leaves it that user's.
    let _ = std::os::unix::fs::chown(&copy, Some(0), Some(0));
    copy
}

pub fn newest_kernel() -> Option<std::path::PathBuf> {
    let mut k: Vec<std::path::PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    k.sort();
    k.pop()
}

/// Kernel modules `wanted` (by name) and everything they need, in load
/// order, as paths under `modules` (the node's /lib/modules/VERSION).
pub fn module_closure(modules: &std::path::Path, wanted: &[&str]) -> Vec<std::path::PathBuf> {
    let dep = std::fs::read_to_string(modules.join("modules.dep")).unwrap();
    let deps: std::collections::HashMap<String, Vec<String>> = dep
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(m, d)| {
            (
                m.to_string(),
                d.split_whitespace().map(str::to_string).collect(),
            )
        })
        .collect();
    let by_name = |n: &str| {
        deps.keys()
            .find(|k| k.rsplit('/').next() == Some(&format!("{n}.ko")))
            .cloned()
            .unwrap_or_else(|| panic!("no module {n}"))
    };
    fn visit(
        m: &str,
        deps: &std::collections::HashMap<String, Vec<String>>,
        out: &mut Vec<String>,
    ) {
        if out.iter().any(|o| o == m) {
            return;
        }
        // modules.dep lists a module's needs so that the last loads first.
        for d in deps.get(m).into_iter().flatten().rev() {
            visit(d, deps, out);
        }
        out.push(m.to_string());
    }
    let mut out = Vec::new();
    for w in wanted {
        visit(&by_name(w), &deps, &mut out);
    }
    out.into_iter().map(|m| modules.join(m)).collect()
}

/// The tier-1 guest: the node's kernel booting an initramfs of busybox,
/// dropbear and its libraries, the modules for virtio-net, virtio-blk (its
/// disk, mounted at /data when it holds a filesystem) and the seed's SATA
/// cdrom, and an init that is a small NoCloud reader of our own: it
/// mounts the `cidata` image, takes root's key, the host key and the
/// static address from it, and starts dropbear.
pub fn tier1_initramfs(dir: &std::path::Path, version: &str) -> std::path::PathBuf {
    let root = dir.join("tier1");
    let mut files: Vec<String> = Vec::new();
    let mut put = |from: &std::path::Path, to: &str| {
        let dest = root.join(to.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(from, &dest).unwrap();
        files.push(to.trim_start_matches('/').to_string());
    };
    put(std::path::Path::new("/bin/busybox"), "/bin/busybox");
    for bin in ["/usr/sbin/dropbear", "/usr/bin/dropbearconvert"] {
        put(std::path::Path::new(bin), bin);
        let ldd = run(Command::new("ldd").arg(bin));
        for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
            put(std::path::Path::new(lib), lib);
        }
    }
    let mods = std::path::Path::new("/lib/modules").join(version);
    let mut order = String::new();
    for m in module_closure(
        &mods,
        &[
            "virtio_pci",
            "virtio_net",
            "virtio_blk",
            "ahci",
            "sr_mod",
            "isofs",
            "crc32c_generic",
            "ext4",
        ],
    ) {
        let name = m.file_name().unwrap().to_string_lossy().into_owned();
        put(&m, &format!("/modules/{name}"));
        order.push_str(&name);
        order.push('\n');
    }
    std::fs::write(root.join("modules.order"), order).unwrap();
    files.push("modules.order".into());
    let init = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for m in $(cat /modules.order); do insmod /modules/$m; done
mkdir -p /seed /etc/dropbear /root/.ssh
for i in $(seq 50); do [ -b /dev/sr0 ] && break; sleep 0.2; done
mount -t iso9660 -o ro /dev/sr0 /seed || echo "RIVERNODE-VM-NOSEED"
# The VM's own disk, where a filesystem is on it (the runner's tests put one).
mkdir -p /data
for i in $(seq 50); do [ -b /dev/vda ] && break; sleep 0.2; done
mount -t ext4 /dev/vda /data 2>/dev/null || echo "RIVERNODE-VM-NODISK"
# Our bodies are one-line JSON: each value is found by its key.
field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p" "$2"; }
key=$(sed -n 's/.*"ssh_authorized_keys":\["\([^"]*\)".*/\1/p' /seed/user-data)
echo "$key" > /root/.ssh/authorized_keys
chmod 700 /root/.ssh; chmod 600 /root/.ssh/authorized_keys
printf '%b' "$(field ed25519_private /seed/user-data)" > /tmp/hostkey
dropbearconvert openssh dropbear /tmp/hostkey /etc/dropbear/host_key
echo "root:x:0:0:root:/root:/bin/sh" > /etc/passwd
# The interface's address is the one with a prefix (the resolvers' have none).
addr=$(sed -n 's/.*"addresses":\["\([^"]*\/[0-9]*\)".*/\1/p' /seed/network-config)
gw=$(field via /seed/network-config)
ip link set lo up
ip link set eth0 up
ip addr add "$addr" dev eth0
ip route add default via "$gw"
hostname "$(field local-hostname /seed/meta-data)"
dropbear -E -s -p 22 -r /etc/dropbear/host_key -P /tmp/dropbear.pid
echo "RIVERNODE-VM-UP $(hostname) $addr"
while true; do sleep 3600; done
"#;
    std::fs::write(root.join("init"), init).unwrap();
    std::fs::set_permissions(
        root.join("init"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    files.push("init".into());
    for d in ["proc", "sys", "dev", "tmp", "etc", "root", "seed", "lib64"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let out = dir.join("tier1.cpio");
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    write_cpio(
        &root,
        &files,
        &["proc", "sys", "dev", "tmp", "etc", "root", "seed"],
        &out,
    );
    out
}

/// An initramfs (cpio, newc) at `out` of `files` under `root` and the empty
/// `dirs`. The kernel's unpacker makes no directory itself: every parent
/// is listed before what it holds.
pub fn write_cpio(root: &std::path::Path, files: &[&str], dirs: &[&str], out: &std::path::Path) {
    let mut all: std::collections::BTreeSet<String> = dirs.iter().map(|d| d.to_string()).collect();
    for f in files {
        let mut p = std::path::Path::new(f).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            all.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    let list = all
        .into_iter()
        .chain(files.iter().map(|f| f.to_string()))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    let mut c = Command::new("busybox")
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(root)
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(out).unwrap())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut c.stdin.take().unwrap(), list.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success());
}

/// A base image for the runner's VMs: 16 MiB of ext2 (the tier-1 guest
/// mounts it at /data), as qcow2.
pub fn ext2_base(dir: &std::path::Path) -> std::path::PathBuf {
    let raw = dir.join("base.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext2", "-F"])
        .arg(&raw));
    let q = dir.join("mini.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&q));
    q
}

/// True when the tools for a UEFI-bootable disk are here: GRUB's EFI
/// build, mkfs.fat, mtools and OVMF (a clear skip, or a failure where real
/// parts are required, without them).
pub fn uefi_tools_present() -> bool {
    real_part_available(
        "grub-mkstandalone with x86_64-efi (grub-efi-amd64-bin), mkfs.fat (dosfstools), mcopy (mtools), OVMF (ovmf)",
        super::command_exists("grub-mkstandalone")
            && std::path::Path::new("/usr/lib/grub/x86_64-efi").is_dir()
            && super::command_exists("mkfs.fat")
            && super::command_exists("mcopy")
            && std::path::Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd").exists(),
    )
}

/// A disk a UEFI firmware boots on its own, as qcow2: a FAT filesystem
/// (no partition table) with `\EFI\BOOT\BOOTX64.EFI`, the removable-media
/// loader path every firmware tries, which is a standalone GRUB whose
/// embedded configuration boots `kernel` and `initrd` from the same disk
/// with `cmdline`.
pub fn uefi_base(
    dir: &std::path::Path,
    kernel: &std::path::Path,
    initrd: &std::path::Path,
    cmdline: &str,
) -> std::path::PathBuf {
    let cfg = dir.join("grub.cfg");
    std::fs::write(
        &cfg,
        format!(
            "serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n\
             search --no-floppy --file --set=root /vmlinuz\necho RIVERNODE-GRUB\n\
             linux /vmlinuz {cmdline}\ninitrd /initrd.img\nboot\n"
        ),
    )
    .unwrap();
    let loader = dir.join("BOOTX64.EFI");
    run(Command::new("grub-mkstandalone")
        .args(["-O", "x86_64-efi", "--locales=", "--fonts=", "--themes="])
        .arg("-o")
        .arg(&loader)
        .arg(format!("boot/grub/grub.cfg={}", cfg.display())));
    let raw = dir.join("esp.raw");
    let _ = std::fs::remove_file(&raw);
    run(Command::new("mkfs.fat")
        .args(["-C", "-n", "ESP"])
        .arg(&raw)
        .arg("65536"));
    let img = raw.to_str().unwrap();
    run(Command::new("mmd").args(["-i", img, "::/EFI", "::/EFI/BOOT"]));
    for (from, to) in [
        (loader.as_path(), "::/EFI/BOOT/BOOTX64.EFI"),
        (kernel, "::/vmlinuz"),
        (initrd, "::/initrd.img"),
    ] {
        run(Command::new("mcopy").args(["-i", img]).arg(from).arg(to));
    }
    let q = dir.join("efi.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&q));
    q
}

/// The tier-2 guest's disk: Debian 12 with systemd, udev, openssh-server,
/// ifupdown, the real cloud-init and QEMU's guest agent (debootstrap), the node kernel's
/// modules a VM needs, as an ext4 root filesystem in a qcow2 image. Built
/// once and kept under the build's target directory; booted with the node's
/// kernel and Debian initrd (`root=/dev/vda`).
pub fn debian_cloud_image(version: &str) -> Option<std::path::PathBuf> {
    let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("test-images");
    // The name changes with what is built into it (v2: the locale, v4: the
    // guest agent and its virtio-serial port).
    let image = cache.join(format!("debian-cloud-v4-{version}.qcow2"));
    if image.exists() {
        return Some(image);
    }
    std::fs::create_dir_all(&cache).unwrap();
    let work = tempfile::tempdir_in(&cache).unwrap();
    let rootfs = work.path().join("rootfs");
    // python3-cffi-backend by name: debootstrap does not resolve the
    // virtual packages python3-cryptography needs from it.
    if !super::debootstrap(
        &rootfs,
        "systemd-sysv,udev,kmod,openssh-server,cloud-init,python3-cffi-backend,ifupdown,iproute2,netbase,qemu-guest-agent",
    ) {
        return None;
    }
    // The modules the guest loads after the initrd: its NIC, the seed's
    // cdrom and filesystem, the guest agent's virtio-serial port (the
    // initrd itself brings virtio_blk and ext4).
    let modules = std::path::Path::new("/lib/modules").join(version);
    for m in module_closure(
        &modules,
        &[
            "virtio_net",
            "ahci",
            "sr_mod",
            "isofs",
            "virtio_blk",
            "ext4",
            "virtio_console",
        ],
    ) {
        let rel = m.strip_prefix("/").unwrap();
        let dest = rootfs.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&m, &dest).unwrap();
    }
    for f in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        let _ = std::fs::copy(
            modules.join(f),
            rootfs.join("lib/modules").join(version).join(f),
        );
    }
    run(Command::new("depmod").arg("-b").arg(&rootfs).arg(version));
    // Only the NoCloud seed: no probing for clouds that are not there.
    std::fs::write(
        rootfs.join("etc/cloud/cloud.cfg.d/90-rivernode.cfg"),
        // C.UTF-8 is built into glibc; minbase has no `locales` for Debian's en_US default.
        "datasource_list: [ NoCloud, None ]\nlocale: C.UTF-8\n",
    )
    .unwrap();
    std::fs::write(rootfs.join("etc/fstab"), "/dev/vda / ext4 rw 0 1\n").unwrap();
    let _ = std::fs::remove_dir_all(rootfs.join("var/cache/apt/archives"));
    let raw = work.path().join("root.raw");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(1536 << 20)
        .unwrap();
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-F", "-d"])
        .arg(&rootfs)
        .arg(&raw));
    let tmp = work.path().join("image.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&tmp));
    std::fs::rename(&tmp, &image).unwrap();
    Some(image)
}

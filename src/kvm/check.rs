//! `rivernode vm check`: what a node offers VMs (KVM, an IOMMU, the VFIO
//! modules, UEFI firmware, QEMU, libvirt), each with what to do when it is
//! missing. Read from injectable roots, so tests use fake trees.

use std::path::{Path, PathBuf};

/// Where the checks look (the machine's own in production).
#[derive(Clone, Debug)]
pub struct Roots {
    pub dev: PathBuf,
    pub sys: PathBuf,
    pub proc: PathBuf,
    /// `/`: for the firmware, QEMU and libvirt's socket.
    pub fs: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            dev: "/dev".into(),
            sys: "/sys".into(),
            proc: "/proc".into(),
            fs: "/".into(),
        }
    }
}

/// One thing checked.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    pub what: &'static str,
    pub ok: bool,
    /// What was found, or what is missing.
    pub detail: String,
    /// What to do about it (empty when ok).
    pub fix: String,
}

/// Whether VMs can run at all here: everything but the GPU parts.
pub fn vms_can_run(findings: &[Finding]) -> bool {
    findings
        .iter()
        .filter(|f| matches!(f.what, "qemu" | "libvirt"))
        .all(|f| f.ok)
}

fn rel(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

fn finding(what: &'static str, ok: bool, detail: String, fix: &str) -> Finding {
    Finding {
        what,
        ok,
        detail,
        fix: if ok { String::new() } else { fix.to_string() },
    }
}

/// Every check, in the order a person fixes them.
pub fn check(r: &Roots) -> Vec<Finding> {
    let mut out = Vec::new();
    let kvm = rel(&r.dev, "kvm").exists();
    out.push(finding(
        "kvm",
        kvm,
        if kvm {
            "/dev/kvm exists".into()
        } else {
            "no /dev/kvm".into()
        },
        "enable virtualization (VT-x/AMD-V) in the firmware and load kvm_intel or kvm_amd; without it set the runner's vm_accel = \"qemu\" (slow emulation)",
    ));
    let groups = std::fs::read_dir(rel(&r.sys, "kernel/iommu_groups"))
        .map(|d| d.count())
        .unwrap_or(0);
    let cmdline = std::fs::read_to_string(rel(&r.proc, "cmdline")).unwrap_or_default();
    out.push(finding(
        "iommu",
        groups > 0,
        if groups > 0 {
            format!("{groups} IOMMU groups")
        } else if cmdline.contains("iommu=") {
            "no IOMMU groups, though the kernel command line names an iommu option".into()
        } else {
            "no IOMMU groups".into()
        },
        "for GPU passthrough: enable VT-d/AMD-Vi in the firmware and boot with intel_iommu=on iommu=pt (Intel) or amd_iommu=on (AMD)",
    ));
    let vfio: Vec<&str> = ["vfio", "vfio_iommu_type1", "vfio_pci"]
        .into_iter()
        .filter(|m| !rel(&r.sys, &format!("module/{m}")).exists())
        .collect();
    out.push(finding(
        "vfio",
        vfio.is_empty(),
        if vfio.is_empty() {
            "vfio, vfio_iommu_type1 and vfio_pci are loaded".into()
        } else {
            format!("not loaded: {}", vfio.join(", "))
        },
        "for GPU passthrough: modprobe vfio-pci (and list it in /etc/modules-load.d/)",
    ));
    let ovmf = [
        "usr/share/OVMF/OVMF_CODE_4M.fd",
        "usr/share/OVMF/OVMF_CODE.fd",
    ]
    .into_iter()
    .map(|p| rel(&r.fs, p))
    .find(|p| p.exists());
    out.push(finding(
        "ovmf",
        ovmf.is_some(),
        match &ovmf {
            Some(p) => format!("UEFI firmware {}", p.display()),
            None => "no OVMF firmware".into(),
        },
        "for UEFI guests (GPUs with large BARs need them): apt-get install ovmf",
    ));
    let qemu = rel(&r.fs, "usr/bin/qemu-system-x86_64");
    let img = rel(&r.fs, "usr/bin/qemu-img");
    out.push(finding(
        "qemu",
        qemu.exists() && img.exists(),
        match (qemu.exists(), img.exists()) {
            (true, true) => "qemu-system-x86_64 and qemu-img".into(),
            (false, _) => "no qemu-system-x86_64".into(),
            (true, false) => "no qemu-img".into(),
        },
        "apt-get install qemu-system-x86 qemu-utils",
    ));
    let socket = ["run/libvirt/libvirt-sock", "run/libvirt/virtqemud-sock"]
        .into_iter()
        .map(|p| rel(&r.fs, p))
        .find(|p| p.exists());
    out.push(finding(
        "libvirt",
        socket.is_some(),
        match &socket {
            Some(p) => format!("libvirt answers at {}", p.display()),
            None => "no libvirt socket in /run/libvirt".into(),
        },
        "apt-get install libvirt-daemon-system and start it (systemctl enable --now libvirtd)",
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(root: &Path, p: &str) {
        let p = root.join(p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "").unwrap();
    }

    #[test]
    fn a_bare_machine_is_told_what_to_install_and_a_ready_one_nothing() {
        let t = tempfile::tempdir().unwrap();
        let r = Roots {
            dev: t.path().join("dev"),
            sys: t.path().join("sys"),
            proc: t.path().join("proc"),
            fs: t.path().join("fs"),
        };
        let bare = check(&r);
        assert!(bare.iter().all(|f| !f.ok && !f.fix.is_empty()), "{bare:?}");
        assert!(!vms_can_run(&bare));
        for p in [
            "dev/kvm",
            "sys/kernel/iommu_groups/0/x",
            "sys/module/vfio/x",
            "sys/module/vfio_iommu_type1/x",
            "sys/module/vfio_pci/x",
            "fs/usr/share/OVMF/OVMF_CODE_4M.fd",
            "fs/usr/bin/qemu-system-x86_64",
            "fs/usr/bin/qemu-img",
            "fs/run/libvirt/libvirt-sock",
        ] {
            touch(t.path(), p);
        }
        let ready = check(&r);
        assert!(ready.iter().all(|f| f.ok && f.fix.is_empty()), "{ready:?}");
        assert!(vms_can_run(&ready));
        assert_eq!(ready[1].detail, "1 IOMMU groups");
    }

    #[test]
    fn a_missing_vfio_module_is_named() {
        let t = tempfile::tempdir().unwrap();
        touch(t.path(), "sys/module/vfio/x");
        let r = Roots {
            sys: t.path().join("sys"),
            ..Roots::default()
        };
        let v = check(&r).into_iter().find(|f| f.what == "vfio").unwrap();
        assert_eq!(v.detail, "not loaded: vfio_iommu_type1, vfio_pci");
        assert!(v.fix.contains("modprobe vfio-pci"));
    }
}

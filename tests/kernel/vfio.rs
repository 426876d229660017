//! VFIO on a real kernel: q35 with an emulated Intel IOMMU; e1000 NICs stand
//! in for GPUs (binding works the same for any PCI function).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rivernode::topology::{scan_functions, PciAddress};
use rivernode::vfio::{RealSysfs, Vfio, VfioError};

use crate::harness::{VmSpec, GUEST_RIVERNODE};
use crate::{Expect, KernelTest};

const MODULES: [&str; 3] = ["e1000", "vfio-pci", "vfio_iommu_type1"];

pub fn tests() -> Vec<KernelTest> {
    vec![
        KernelTest {
            name: "vfio_e1000_bind_and_restore",
            vm: || VmSpec {
                iommu: true,
                devices: vec!["e1000,netdev=n0".into()],
                modules: MODULES.to_vec(),
                ..VmSpec::default()
            },
            body: e1000_bind_and_restore,
            expect: Expect::Pass,
        },
        KernelTest {
            name: "vfio_bridge_group_binds_together",
            vm: || VmSpec {
                iommu: true,
                devices: vec![
                    "pcie-pci-bridge,id=br1,bus=pcie.0".into(),
                    "e1000,bus=br1,addr=1".into(),
                    "e1000,bus=br1,addr=2".into(),
                ],
                modules: MODULES.to_vec(),
                ..VmSpec::default()
            },
            body: bridge_group_binds_together,
            expect: Expect::Pass,
        },
    ]
}

fn e1000s() -> Vec<PciAddress> {
    scan_functions(Path::new("/sys"))
        .unwrap()
        .into_iter()
        .filter(|f| (f.vendor_id, f.device_id) == (0x8086, 0x100e))
        .map(|f| f.address)
        .collect()
}

fn driver(a: PciAddress) -> Option<String> {
    std::fs::read_link(format!("/sys/bus/pci/devices/{a}/driver"))
        .ok()
        .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
}

fn has_netdev(a: PciAddress) -> bool {
    std::fs::read_dir(format!("/sys/bus/pci/devices/{a}/net"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

fn vfio() -> Vfio {
    Vfio::new(
        Path::new("/sys"),
        Path::new("/dev"),
        Path::new("/tmp/rivernode/vfio/bindings.json"),
        Duration::from_secs(30),
        Arc::new(RealSysfs),
    )
}

fn rivernode(args: &[&str]) -> String {
    let o = Command::new(GUEST_RIVERNODE)
        .args(["--data-dir", "/tmp/rivernode"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "rivernode {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn e1000_bind_and_restore() {
    let nics = e1000s();
    assert_eq!(nics.len(), 1, "{nics:?}");
    let nic = nics[0];
    assert_eq!(driver(nic).as_deref(), Some("e1000"));
    assert!(has_netdev(nic), "e1000 has a network interface");
    let v = vfio();
    let group = v.group_id(nic).unwrap();

    let bound = v.bind(&[nic], "kernel-test").unwrap();
    assert_eq!(bound[0].group, group);
    assert_eq!(driver(nic).as_deref(), Some("vfio-pci"));
    assert!(!has_netdev(nic), "the interface disappeared");
    assert!(Path::new(&format!("/dev/vfio/{group}")).exists());

    v.restore_device(nic).unwrap();
    assert_eq!(driver(nic).as_deref(), Some("e1000"));
    assert!(has_netdev(nic), "the interface is back");
    assert!(v.bindings().unwrap().is_empty());

    // The same through the CLI, as an admin would.
    let check: serde_json::Value =
        serde_json::from_str(&rivernode(&["gpu", "check", "-o", "json"])).unwrap();
    assert!(
        check["status"]["iommu_groups"].as_u64().unwrap() > 0,
        "{check}"
    );
    assert_eq!(check["status"]["vfio_pci_loaded"], true);
    let out = rivernode(&["gpu", "bind", &nic.to_string(), "--owner", "vm-42"]);
    assert!(
        out.contains(&format!("IOMMU group {group} bound to vfio-pci for vm-42")),
        "{out}"
    );
    assert_eq!(driver(nic).as_deref(), Some("vfio-pci"));
    rivernode(&["gpu", "unbind", &nic.to_string()]);
    assert_eq!(driver(nic).as_deref(), Some("e1000"));
    assert!(has_netdev(nic));

    // A binding whose owner is gone is given back when a runner starts.
    rivernode(&["gpu", "bind", &nic.to_string(), "--owner", "vm-gone"]);
    assert_eq!(driver(nic).as_deref(), Some("vfio-pci"));
    let lo = Command::new("/bin/ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(lo.success());
    let mut up = Command::new(GUEST_RIVERNODE)
        .args([
            "--data-dir",
            "/tmp/rivernode",
            "up",
            "--api-port",
            "0",
            "--runner-port",
            "0",
            "--ssh-proxy-port",
            "0",
        ])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // Restored means: back on e1000 and the record dropped (written just after).
    while driver(nic).as_deref() != Some("e1000") || !vfio().bindings().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the runner did not restore the orphaned binding"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = up.kill();
    let _ = up.wait();
    assert!(has_netdev(nic));
}

fn bridge_group_binds_together() {
    let nics = e1000s();
    assert_eq!(nics.len(), 2, "{nics:?}");
    let (a, b) = (nics[0], nics[1]);
    let v = vfio();
    let group = v.group_id(a).unwrap();
    assert_eq!(
        v.group_id(b).unwrap(),
        group,
        "devices behind a PCIe-to-PCI bridge share a group"
    );
    let members = v.group(group).unwrap().members;
    let bridge = members
        .iter()
        .find(|m| m.kind == rivernode::vfio::MemberKind::Bridge)
        .expect("the bridge is in the group")
        .function
        .address;
    let bridge_driver = driver(bridge);

    // One alone is refused, naming the other, and nothing changes.
    let e = v.bind(&[a], "kernel-test").unwrap_err();
    assert!(
        matches!(e, VfioError::Blocked { device, .. } if device == b),
        "{e}"
    );
    assert!(e.to_string().contains(&b.to_string()), "{e}");
    assert_eq!(
        (driver(a).as_deref(), driver(b).as_deref()),
        (Some("e1000"), Some("e1000"))
    );

    // Both together bind; the bridge stays as it was.
    v.bind(&[a, b], "kernel-test").unwrap();
    assert_eq!(
        (driver(a).as_deref(), driver(b).as_deref()),
        (Some("vfio-pci"), Some("vfio-pci"))
    );
    assert_eq!(driver(bridge), bridge_driver);
    assert!(Path::new(&format!("/dev/vfio/{group}")).exists());

    v.restore(group).unwrap();
    assert_eq!(
        (driver(a).as_deref(), driver(b).as_deref()),
        (Some("e1000"), Some("e1000"))
    );
    assert!(has_netdev(a) && has_netdev(b));
}

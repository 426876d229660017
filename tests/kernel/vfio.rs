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
            name: "vfio_device_bound_by_rivernode_works_in_a_nested_qemu",
            vm: || VmSpec {
                iommu: true,
                memory_mib: 1024,
                devices: vec!["e1000,netdev=n0".into()],
                modules: [&MODULES[..], &["virtio_pci", "9pnet_virtio", "9p"]].concat(),
                host_root: true,
                timeout: Duration::from_secs(300),
                ..VmSpec::default()
            },
            body: device_works_in_a_nested_qemu,
            expect: Expect::Pass,
        },
        KernelTest {
            name: "vfio_a_vm_gets_its_gpu_through_libvirt",
            vm: || VmSpec {
                iommu: true,
                memory_mib: 1024,
                // Two nodes: the VM's reservation is node 1's core and memory.
                numa: vec![(0, 0, 512), (1, 1, 512)],
                devices: vec!["e1000,netdev=n0".into()],
                modules: [&MODULES[..], &["virtio_pci", "9pnet_virtio", "9p", "tun"]].concat(),
                host_root: true,
                timeout: Duration::from_secs(420),
                ..VmSpec::default()
            },
            body: a_vm_gets_its_gpu_through_libvirt,
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
    // Someone else's binding (a VM's) is not undone by a plain unbind.
    let o = Command::new(GUEST_RIVERNODE)
        .args([
            "--data-dir",
            "/tmp/rivernode",
            "gpu",
            "unbind",
            &nic.to_string(),
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("passed to vm-42's VM"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(driver(nic).as_deref(), Some("vfio-pci"));
    rivernode(&["gpu", "unbind", "--force", &nic.to_string()]);
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

/// A nested QEMU (the host's, run from its root over 9p) given the e1000
/// that src/vfio bound, as libvirt's `<hostdev managed='no'>` hands a GPU
/// to a VM: the nested machine reads the device's identity from its config
/// space and writes and reads its registers through VFIO, driven by QEMU's
/// qtest protocol (no guest OS needed); afterwards the device is back on
/// its own driver.
fn device_works_in_a_nested_qemu() {
    use std::io::{BufRead, BufReader, Write};
    let nics = e1000s();
    assert_eq!(nics.len(), 1, "{nics:?}");
    let nic = nics[0];
    let v = vfio();
    v.bind(&[nic], "vm-7").unwrap();
    assert_eq!(driver(nic).as_deref(), Some("vfio-pci"));

    sh("mkdir -p /host && mount -t 9p -o trans=virtio,version=9p2000.L,ro hostroot /host");
    sh("mount --bind /dev /host/dev && mount --bind /proc /host/proc && mount --bind /sys /host/sys && mount -t tmpfs tmpfs /host/tmp");
    let mut qemu = Command::new("/bin/chroot")
        .args([
            "/host",
            "/usr/bin/qemu-system-x86_64",
            "-machine",
            "q35",
            // No vCPU runs: the firmware never touches the device, only qtest does.
            "-S",
            "-display",
            "none",
            "-nodefaults",
            "-m",
            "64M",
            "-device",
            &format!("vfio-pci,host={nic},addr=0x4,rombar=0"),
            "-qtest",
            "stdio",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut to = qemu.stdin.take().unwrap();
    let mut from = BufReader::new(qemu.stdout.take().unwrap());
    // One qtest command, its answer ("OK [value]"); interrupt lines are skipped.
    let mut ask = |cmd: &str| -> String {
        writeln!(to, "{cmd}").unwrap();
        loop {
            let mut line = String::new();
            if from.read_line(&mut line).unwrap() == 0 {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(qemu.stderr.as_mut().unwrap(), &mut err);
                panic!("the nested QEMU ended at {cmd:?}: {err}");
            }
            if line.starts_with("OK") || line.starts_with("FAIL") || line.starts_with("ERR") {
                return line.trim().to_string();
            }
        }
    };
    // Config space of bus 0, slot 4 through the 0xcf8/0xcfc ports.
    let cfg = |reg: u32| format!("0x{:x}", 0x8000_0000u32 | (4 << 11) | reg);
    ask(&format!("outl 0xcf8 {}", cfg(0)));
    assert_eq!(
        ask("inl 0xcfc"),
        "OK 0x100e8086",
        "the e1000's vendor and device id"
    );
    // Its first BAR at 0xfe000000, memory decoding on.
    ask(&format!("outl 0xcf8 {}", cfg(0x10)));
    ask("outl 0xcfc 0xfe000000");
    ask(&format!("outl 0xcf8 {}", cfg(0x04)));
    ask("outl 0xcfc 0x6");
    // A read-write register of the device (RDBAL) keeps what is written.
    assert_eq!(ask("writel 0xfe002800 0x12345670"), "OK");
    let value = ask("readl 0xfe002800");
    let value = value
        .strip_prefix("OK 0x")
        .and_then(|v| u64::from_str_radix(v, 16).ok());
    assert_eq!(value, Some(0x1234_5670));
    let _ = qemu.kill();
    let _ = qemu.wait();
    sh("umount /host/tmp /host/sys /host/proc /host/dev /host");

    v.restore_device(nic).unwrap();
    assert_eq!(driver(nic).as_deref(), Some("e1000"));
    assert!(has_netdev(nic), "the interface is back");
}

fn sh(cmd: &str) -> String {
    let o = Command::new("/bin/sh").args(["-c", cmd]).output().unwrap();
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A VM's GPU as the runner hands it over, with the host's own libvirtd
/// (run from its root over 9p, its state on tmpfs): the runner's
/// `NodeGpus::bind_for_vm` moves the device's IOMMU group to vfio-pci and
/// names the functions, `src/kvm` writes them into the domain as
/// `<hostdev managed='no'>`, and libvirt starts QEMU with them. QEMU holds
/// the group's VFIO file, the nested machine has the device on its PCI bus
/// with the identity it read through VFIO, the vCPU runs on the reserved
/// core and guest memory is bound to the reserved NUMA node. Once the
/// domain is gone, `restore_for_vm` gives the device back to its driver.
fn a_vm_gets_its_gpu_through_libvirt() {
    use rivernode::kvm::{Accel, Boot, DiskCache, Instance, Vm};
    use rivernode::runner::gpus::NodeGpus;

    let nics = e1000s();
    assert_eq!(nics.len(), 1, "{nics:?}");
    let nic = nics[0];
    let group = std::fs::read_link(format!("/sys/bus/pci/devices/{nic}/iommu_group"))
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let gpus = NodeGpus {
        cdi_dirs: vec![],
        nvidia: Default::default(),
        ledger: vfio(),
    };
    let hostdevs = gpus.bind_for_vm(&[nic], 7).unwrap();
    assert_eq!(hostdevs, [nic]);
    assert_eq!(driver(nic).as_deref(), Some("vfio-pci"));

    // The host's root, read-only; libvirt's state and configuration on tmpfs.
    sh("mkdir -p /host && mount -t 9p -o trans=virtio,version=9p2000.L,ro hostroot /host");
    sh("mount --bind /dev /host/dev && mount --bind /proc /host/proc && mount --bind /sys /host/sys");
    for d in ["/host/tmp", "/host/run", "/host/var", "/host/etc/libvirt"] {
        sh(&format!("mount -t tmpfs tmpfs {d}"));
    }
    // The VM's serial console is a pty.
    sh("mkdir -p /host/dev/pts && mount -t devpts -o ptmxmode=0666 devpts /host/dev/pts");
    std::fs::create_dir_all("/host/tmp/lv/sock").unwrap();
    std::fs::create_dir_all("/host/tmp/vm").unwrap();
    std::fs::write(
        "/host/etc/libvirt/qemu.conf",
        "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nsecurity_driver = \"none\"\nstdio_handler = \"file\"\ncgroup_controllers = [ ]\nnamespaces = [ ]\n",
    )
    .unwrap();
    std::fs::write(
        "/host/tmp/lv/libvirtd.conf",
        "unix_sock_dir = \"/tmp/lv/sock\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\nlog_outputs = \"3:file:/tmp/lv/libvirtd.log\"\n",
    )
    .unwrap();
    let mut libvirtd = Command::new("/bin/chroot")
        .args([
            "/host",
            "libvirtd",
            "--config",
            "/tmp/lv/libvirtd.conf",
            "--pid-file",
            "/tmp/lv/libvirtd.pid",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create("/host/tmp/lv/stderr.log").unwrap())
        .spawn()
        .unwrap();
    let log = || {
        format!(
            "{}{}",
            std::fs::read_to_string("/host/tmp/lv/stderr.log").unwrap_or_default(),
            std::fs::read_to_string("/host/tmp/lv/libvirtd.log").unwrap_or_default()
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !Path::new("/host/tmp/lv/sock/libvirt-sock").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "libvirtd did not listen: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The instance's tap, as the runner makes it; a disk, a seed.
    rivernode::net::tap::create_tap(Path::new("/dev"), "rvt7").unwrap();
    sh("chroot /host qemu-img create -q -f qcow2 /tmp/vm/base.qcow2 16M");
    sh("chroot /host qemu-img create -q -f qcow2 -b /tmp/vm/base.qcow2 -F qcow2 /tmp/vm/disk.qcow2");
    std::fs::write(
        "/host/tmp/vm/seed.iso",
        rivernode::kvm::seed::seed_iso(&crate::kvm::input()),
    )
    .unwrap();
    let ip: std::net::Ipv4Addr = "10.250.0.7".parse().unwrap();
    let uuid = rivernode::runner::vm::vm_uuid("n1-task-7");
    let name = rivernode::kvm::domain_name(&uuid);
    let vm = Vm {
        uuid: uuid.clone(),
        accel: Accel::Qemu,
        memory_mib: 64,
        vcpu_pins: vec![1],
        emulator_cpus: "1".parse().unwrap(),
        // SeaBIOS finds no boot disk and waits: the machine itself is what is looked at.
        boot: Boot::Bios,
        disk: "/tmp/vm/disk.qcow2".into(),
        base: "/tmp/vm/base.qcow2".into(),
        disk_cache: DiskCache::Writeback,
        seed: "/tmp/vm/seed.iso".into(),
        mac: rivernode::net::firewall::instance_mac(ip),
        console_log: "/tmp/vm/console.log".into(),
        hostdevs,
        instance: Instance {
            id: 7,
            owner: None,
            node: "n1".into(),
            submitted_at_unix_ms: 1,
            cpus: "1".parse().unwrap(),
            numa: Some(1),
            gpus: vec![nic],
            tap: "rvt7".into(),
            ip,
        },
    };
    let uri = "qemu:///system?socket=/host/tmp/lv/sock/libvirt-sock";
    let h = rivernode::kvm::libvirt::Hypervisor::open(uri).unwrap();
    if let Err(e) = h.define_and_start(&vm) {
        panic!("define and start: {e}\n{}", log());
    }
    let pid: u32 = std::fs::read_to_string(format!("/host/run/libvirt/qemu/{name}.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    // QEMU was given the device and holds its IOMMU group open.
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        cmdline.contains("vfio-pci") && cmdline.contains(&nic.to_string()),
        "{cmdline:?}"
    );
    // (Read from outside QEMU's chroot: `/host/dev/...`.)
    let vfio_group = format!("/host/dev/vfio/{group}");
    let holds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == Path::new(&vfio_group)));
    assert!(holds, "QEMU does not hold {vfio_group}");

    // The nested machine's PCI bus has the e1000 (8086:100e), as read through
    // VFIO. It sits behind a root port, which lists it only once the VM's
    // firmware has numbered the buses: under TCG that takes a while.
    fn has_device(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::Object(o) => {
                o.get("id").and_then(|id| id.get("vendor")) == Some(&0x8086.into())
                    && o.get("id").and_then(|id| id.get("device")) == Some(&0x100e.into())
                    || o.values().any(has_device)
            }
            serde_json::Value::Array(a) => a.iter().any(has_device),
            _ => false,
        }
    }
    let query = || {
        let pci = sh(&format!(
            "chroot /host virsh -c 'qemu:///system?socket=/tmp/lv/sock/libvirt-sock' qemu-monitor-command {name} '{{\"execute\":\"query-pci\"}}'"
        ));
        serde_json::from_str::<serde_json::Value>(&pci).unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut pci = query();
    while !has_device(&pci) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(500));
        pci = query();
    }
    assert!(has_device(&pci), "no 8086:100e on the VM's bus: {pci}");

    // Every QEMU thread (vCPU and emulator) on the reserved core, guest
    // memory bound to the reserved node.
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_string();
        assert_eq!(cpus, "1", "thread {:?}", t.file_name());
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/numa_maps")).unwrap();
    assert!(
        maps.lines().any(|l| l.contains("bind:1")),
        "no memory bound to node 1:\n{maps}"
    );

    // Gone: the device goes back to its driver, the ledger forgets it.
    if let Err(e) = h.undefine(&uuid) {
        panic!("undefine: {e}\n{}", log());
    }
    // (Orphaned, QEMU is the guest's init's to reap: a zombie is gone too.)
    let state = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    assert!(
        state.is_empty() || state.contains("State:\tZ"),
        "QEMU still runs: {state}"
    );
    if let Err(e) = gpus.restore_for_vm(7) {
        panic!("restore: {e}");
    }
    assert_eq!(driver(nic).as_deref(), Some("e1000"));
    assert!(has_netdev(nic), "the interface is back");
    assert!(gpus.ledger.bindings().unwrap().is_empty());
    let _ = libvirtd.kill();
    let _ = libvirtd.wait();
}

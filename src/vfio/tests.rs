//! Binding logic against a fake kernel: a fake sysfs tree plus a writer that
//! reacts to unbind / driver_override / drivers_probe the way the PCI core does.

use std::collections::HashSet;
use std::os::unix::fs::symlink;
use std::sync::Mutex;

use super::*;
use crate::topology::fake::FakeMachine;

const GPU: u32 = 0x030000;
const AUDIO: u32 = 0x040300;
const NIC: u32 = 0x020000;
const BRIDGE: u32 = 0x060400;

struct FakeKernel {
    sys: PathBuf,
    dev: PathBuf,
    /// Devices whose driver hangs in unbind.
    hang_unbind: Mutex<HashSet<String>>,
    /// Devices vfio-pci refuses to probe.
    refuse_probe: Mutex<HashSet<String>>,
    writes: Mutex<Vec<String>>,
}

impl FakeKernel {
    fn device(&self, addr: &str) -> PathBuf {
        self.sys.join("bus/pci/devices").join(addr)
    }

    fn group_of(&self, addr: &str) -> String {
        std::fs::read_link(self.device(addr).join("iommu_group"))
            .unwrap()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }
}

impl SysfsWriter for FakeKernel {
    fn write(&self, path: &Path, value: &str) -> std::io::Result<()> {
        let rel = path
            .strip_prefix(&self.sys)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        self.writes
            .lock()
            .unwrap()
            .push(format!("{rel} <- {}", value.trim()));
        let parts: Vec<&str> = rel.split('/').collect();
        match parts.as_slice() {
            ["bus", "pci", "devices", addr, "driver", "unbind"] => {
                assert_eq!(*addr, value, "unbind takes the device's own address");
                if self.hang_unbind.lock().unwrap().contains(*addr) {
                    std::thread::sleep(Duration::from_secs(5));
                    return Err(std::io::Error::other("never got here in time"));
                }
                let link = self.device(addr).join("driver");
                let was = std::fs::read_link(&link)?;
                std::fs::remove_file(&link)?;
                if was.ends_with(VFIO_DRIVER) {
                    let g = self.group_of(addr);
                    let still = std::fs::read_dir(
                        self.sys.join(format!("kernel/iommu_groups/{g}/devices")),
                    )?
                    .flatten()
                    .any(|e| {
                        std::fs::read_link(e.path().join("driver"))
                            .map(|d| d.ends_with(VFIO_DRIVER))
                            .unwrap_or(false)
                    });
                    if !still {
                        let _ = std::fs::remove_file(self.dev.join("vfio").join(g));
                    }
                }
                Ok(())
            }
            ["bus", "pci", "devices", addr, "driver_override"] => {
                std::fs::write(self.device(addr).join("driver_override"), value.trim())
            }
            ["bus", "pci", "drivers_probe"] => {
                let dev = self.device(value);
                if dev.join("driver").exists() {
                    return Ok(());
                }
                let over = std::fs::read_to_string(dev.join("driver_override")).unwrap_or_default();
                let target = if over.trim().is_empty() {
                    std::fs::read_to_string(dev.join("native_driver")).unwrap_or_default()
                } else {
                    over
                };
                let target = target.trim();
                if target.is_empty() {
                    return Ok(());
                }
                if target == VFIO_DRIVER && self.refuse_probe.lock().unwrap().contains(value) {
                    return Ok(());
                }
                let ddir = self.sys.join("bus/pci/drivers").join(target);
                std::fs::create_dir_all(&ddir)?;
                symlink(&ddir, dev.join("driver"))?;
                if target == VFIO_DRIVER {
                    std::fs::create_dir_all(self.dev.join("vfio"))?;
                    std::fs::write(self.dev.join("vfio").join(self.group_of(value)), "")?;
                }
                Ok(())
            }
            _ => panic!("unexpected sysfs write {rel}"),
        }
    }
}

struct Rig {
    m: FakeMachine,
    kernel: Arc<FakeKernel>,
}

impl Rig {
    fn new(m: FakeMachine) -> Self {
        std::fs::create_dir_all(m.path("sys/bus/pci/drivers/vfio-pci")).unwrap();
        std::fs::create_dir_all(m.path("dev/vfio")).unwrap();
        std::fs::write(m.path("dev/vfio/vfio"), "").unwrap();
        // Remember each device's native driver, as the PCI core's ID tables would.
        for e in std::fs::read_dir(m.path("sys/bus/pci/devices"))
            .unwrap()
            .flatten()
        {
            if let Ok(t) = std::fs::read_link(e.path().join("driver")) {
                std::fs::write(
                    e.path().join("native_driver"),
                    t.file_name().unwrap().to_string_lossy().as_bytes(),
                )
                .unwrap();
            }
        }
        let kernel = Arc::new(FakeKernel {
            sys: m.path("sys"),
            dev: m.path("dev"),
            hang_unbind: Mutex::new(HashSet::new()),
            refuse_probe: Mutex::new(HashSet::new()),
            writes: Mutex::new(Vec::new()),
        });
        Self { m, kernel }
    }

    fn vfio(&self) -> Vfio {
        Vfio::new(
            &self.m.path("sys"),
            &self.m.path("dev"),
            &self.m.path("state/vfio.json"),
            Duration::from_millis(300),
            self.kernel.clone(),
        )
    }

    fn driver(&self, addr: &str) -> Option<String> {
        std::fs::read_link(self.m.path(&format!("sys/bus/pci/devices/{addr}/driver")))
            .ok()
            .map(|t| t.file_name().unwrap().to_string_lossy().into_owned())
    }

    fn writes(&self) -> usize {
        self.kernel.writes.lock().unwrap().len()
    }
}

fn a(s: &str) -> PciAddress {
    s.parse().unwrap()
}

/// GPU + HDMI audio in group 1; two NICs behind a PCIe-to-PCI bridge in group 2;
/// a GPU sharing group 3 with the host's NVMe; a GPU alone in group 4 that is the boot VGA.
fn machine() -> Rig {
    let m = FakeMachine::two_socket_four_gpus();
    m.pci(
        "0000:41:00.0",
        GPU,
        (0x10de, 0x2204),
        "0",
        Some(101),
        Some("nvidia"),
    );
    m.pci(
        "0000:41:00.1",
        AUDIO,
        (0x10de, 0x1aef),
        "0",
        Some(101),
        Some("snd_hda_intel"),
    );
    m.pci(
        "0000:50:00.0",
        BRIDGE,
        (0x1b36, 0x000e),
        "0",
        Some(102),
        None,
    );
    m.pci(
        "0000:51:01.0",
        NIC,
        (0x8086, 0x100e),
        "0",
        Some(102),
        Some("e1000"),
    );
    m.pci(
        "0000:51:02.0",
        NIC,
        (0x8086, 0x100e),
        "0",
        Some(102),
        Some("e1000"),
    );
    m.pci(
        "0000:60:00.0",
        GPU,
        (0x10de, 0x2204),
        "1",
        Some(103),
        Some("nvidia"),
    );
    m.pci(
        "0000:60:01.0",
        0x010802,
        (0x144d, 0xa808),
        "1",
        Some(103),
        Some("nvme"),
    );
    m.pci(
        "0000:70:00.0",
        GPU,
        (0x1af4, 0x1050),
        "-1",
        Some(104),
        Some("virtio-pci"),
    );
    m.write("sys/bus/pci/devices/0000:70:00.0/boot_vga", "1\n");
    Rig::new(m)
}

#[test]
fn gpu_and_its_audio_function_bind_together_and_restore() {
    let r = machine();
    let v = r.vfio();
    let bound = v.bind(&[a("0000:41:00.0")], "vm-1").unwrap();
    assert_eq!(bound.len(), 1);
    assert_eq!(bound[0].group, 101);
    assert_eq!(r.driver("0000:41:00.0").as_deref(), Some("vfio-pci"));
    assert_eq!(r.driver("0000:41:00.1").as_deref(), Some("vfio-pci"));
    assert!(r.m.path("dev/vfio/101").exists());
    let recorded: Vec<Option<String>> = bound[0]
        .members
        .iter()
        .map(|m| m.original_driver.clone())
        .collect();
    assert_eq!(
        recorded,
        [
            Some("nvidia".to_string()),
            Some("snd_hda_intel".to_string())
        ]
    );

    v.restore(101).unwrap();
    assert_eq!(r.driver("0000:41:00.0").as_deref(), Some("nvidia"));
    assert_eq!(r.driver("0000:41:00.1").as_deref(), Some("snd_hda_intel"));
    assert!(!r.m.path("dev/vfio/101").exists());
    assert!(v.bindings().unwrap().is_empty());
}

#[test]
fn a_bridge_stays_and_its_endpoints_bind() {
    let r = machine();
    let v = r.vfio();
    let plans = v
        .plan(&[a("0000:51:01.0"), a("0000:51:02.0")], "vm-2")
        .unwrap();
    assert_eq!(plans[0].bridges, [a("0000:50:00.0")]);
    assert_eq!(plans[0].bind, [a("0000:51:01.0"), a("0000:51:02.0")]);
    v.bind(&[a("0000:51:01.0"), a("0000:51:02.0")], "vm-2")
        .unwrap();
    assert_eq!(r.driver("0000:51:01.0").as_deref(), Some("vfio-pci"));
    assert_eq!(r.driver("0000:51:02.0").as_deref(), Some("vfio-pci"));
    assert_eq!(r.driver("0000:50:00.0"), None, "the bridge is not touched");
    v.restore_device(a("0000:51:02.0")).unwrap();
    assert_eq!(r.driver("0000:51:01.0").as_deref(), Some("e1000"));
    assert_eq!(r.driver("0000:51:02.0").as_deref(), Some("e1000"));
}

#[test]
fn one_of_two_devices_in_a_group_is_refused_naming_the_other() {
    let r = machine();
    let e = r
        .vfio()
        .bind(&[a("0000:51:01.0")], "vm-3")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("0000:51:02.0") && e.contains("e1000") && e.contains("group 102"),
        "{e}"
    );
    assert_eq!(r.writes(), 0, "refused before any write");
}

#[test]
fn an_unrelated_device_on_a_host_driver_blocks_the_group() {
    let r = machine();
    let e = r
        .vfio()
        .bind(&[a("0000:60:00.0")], "vm-4")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("0000:60:01.0 (nvme)") && e.contains("ACS"),
        "{e}"
    );
    assert_eq!(r.driver("0000:60:01.0").as_deref(), Some("nvme"));
    assert_eq!(r.writes(), 0);
}

#[test]
fn the_boot_display_is_refused() {
    let r = machine();
    let e = r.vfio().bind(&[a("0000:70:00.0")], "vm-5").unwrap_err();
    assert!(matches!(e, VfioError::BootVga(_)), "{e}");
}

#[test]
fn a_hanging_unbind_times_out_and_leaves_the_group_as_it_was() {
    let r = machine();
    r.kernel
        .hang_unbind
        .lock()
        .unwrap()
        .insert("0000:41:00.1".into());
    let v = r.vfio();
    let e = v
        .bind(&[a("0000:41:00.0")], "vm-6")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("device stuck") && e.contains("0000:41:00.1"),
        "{e}"
    );
    // The GPU, already moved to vfio-pci, was rolled back; the audio never left.
    assert_eq!(r.driver("0000:41:00.0").as_deref(), Some("nvidia"));
    assert_eq!(r.driver("0000:41:00.1").as_deref(), Some("snd_hda_intel"));
    let over =
        std::fs::read_to_string(r.m.path("sys/bus/pci/devices/0000:41:00.0/driver_override"))
            .unwrap();
    assert_eq!(over, "", "override cleared");
    assert!(v.bindings().unwrap().is_empty());
}

#[test]
fn a_device_vfio_will_not_take_rolls_back_the_whole_request() {
    let r = machine();
    r.kernel
        .refuse_probe
        .lock()
        .unwrap()
        .insert("0000:51:02.0".into());
    let v = r.vfio();
    // Group 101 binds first, group 102 fails: both come back.
    let e = v
        .bind(
            &[a("0000:41:00.0"), a("0000:51:01.0"), a("0000:51:02.0")],
            "vm-7",
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("driver of 0000:51:02.0") && e.contains("expected vfio-pci"),
        "{e}"
    );
    for (dev, drv) in [
        ("0000:41:00.0", "nvidia"),
        ("0000:41:00.1", "snd_hda_intel"),
        ("0000:51:01.0", "e1000"),
        ("0000:51:02.0", "e1000"),
    ] {
        assert_eq!(r.driver(dev).as_deref(), Some(drv), "{dev}");
    }
    assert!(v.bindings().unwrap().is_empty());
}

#[test]
fn a_member_that_joined_a_bound_group_is_recorded_and_restored() {
    // L6: a group already recorded for this owner gains a function (hot
    // plug, or a bind interrupted before a rescan): binding again records
    // it too, so a restore gives it back.
    let r = machine();
    let v = r.vfio();
    v.bind(&[a("0000:41:00.0")], "vm-1").unwrap();
    r.m.pci(
        "0000:41:00.2",
        AUDIO,
        (0x10de, 0x1aef),
        "0",
        Some(101),
        Some("snd_hda_intel"),
    );
    std::fs::write(
        r.m.path("sys/bus/pci/devices/0000:41:00.2/native_driver"),
        "snd_hda_intel",
    )
    .unwrap();
    let bound = v.bind(&[a("0000:41:00.0")], "vm-1").unwrap();
    let members: Vec<String> = bound[0]
        .members
        .iter()
        .map(|m| m.address.to_string())
        .collect();
    assert_eq!(members, ["0000:41:00.0", "0000:41:00.1", "0000:41:00.2"]);
    assert_eq!(r.driver("0000:41:00.2").as_deref(), Some("vfio-pci"));
    v.restore(101).unwrap();
    assert_eq!(r.driver("0000:41:00.2").as_deref(), Some("snd_hda_intel"));
}

#[test]
fn repeated_bind_and_restore_are_no_ops() {
    let r = machine();
    let v = r.vfio();
    v.bind(&[a("0000:41:00.0")], "vm-8").unwrap();
    let n = r.writes();
    v.bind(&[a("0000:41:00.0")], "vm-8").unwrap();
    assert_eq!(r.writes(), n, "second bind writes nothing");
    v.restore(101).unwrap();
    let n = r.writes();
    v.restore(101).unwrap();
    v.restore_device(a("0000:41:00.0")).unwrap();
    assert_eq!(r.writes(), n, "second restore writes nothing");
}

#[test]
fn another_owner_cannot_take_a_bound_group() {
    let r = machine();
    let v = r.vfio();
    v.bind(&[a("0000:41:00.0")], "vm-9").unwrap();
    let e = v
        .bind(&[a("0000:41:00.0")], "vm-10")
        .unwrap_err()
        .to_string();
    assert!(e.contains("already assigned") && e.contains("vm-9"), "{e}");
    // A device put on vfio-pci by someone else is not ours to take either.
    let e = v
        .bind(&[a("0000:cb:00.0")], "vm-10")
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside rivernode"), "{e}");
}

#[test]
fn orphans_are_restored_from_the_persisted_record() {
    let r = machine();
    r.vfio().bind(&[a("0000:41:00.0")], "vm-dead").unwrap();
    r.vfio()
        .bind(&[a("0000:51:01.0"), a("0000:51:02.0")], "vm-alive")
        .unwrap();
    // A new Vfio (a restarted runner) reads the record from disk.
    let restored = r
        .vfio()
        .restore_orphans(|owner| owner == "vm-alive")
        .unwrap();
    assert_eq!(restored, [101]);
    assert_eq!(r.driver("0000:41:00.0").as_deref(), Some("nvidia"));
    assert_eq!(r.driver("0000:51:01.0").as_deref(), Some("vfio-pci"));
    let left: Vec<u32> = r
        .vfio()
        .bindings()
        .unwrap()
        .iter()
        .map(|b| b.group)
        .collect();
    assert_eq!(left, [102]);
}

#[test]
fn missing_iommu_or_driver_is_explained() {
    let r = machine();
    r.m.pci(
        "0000:80:00.0",
        GPU,
        (0x10de, 0x2204),
        "0",
        None,
        Some("nvidia"),
    );
    let e = r
        .vfio()
        .bind(&[a("0000:80:00.0")], "vm")
        .unwrap_err()
        .to_string();
    assert!(e.contains("IOMMU is off"), "{e}");
    let e = r
        .vfio()
        .bind(&[a("0000:99:00.0")], "vm")
        .unwrap_err()
        .to_string();
    assert!(e.contains("no PCI device 0000:99:00.0"), "{e}");
    std::fs::remove_dir(r.m.path("sys/bus/pci/drivers/vfio-pci")).unwrap();
    let e = r
        .vfio()
        .bind(&[a("0000:41:00.0")], "vm")
        .unwrap_err()
        .to_string();
    assert!(e.contains("modprobe vfio-pci"), "{e}");
}

#[test]
fn one_ledger_a_held_gpu_is_not_bound_and_a_bound_gpu_is_not_held() {
    let r = machine();
    let v = r.vfio();
    // A container holds 41:00.0: binding it (or its group) is refused, naming the holder.
    v.claim(&[a("0000:41:00.0")], "task 7").unwrap();
    let writes = r.writes();
    let e = v
        .bind(&[a("0000:41:00.0")], "admin")
        .unwrap_err()
        .to_string();
    assert!(e.contains("0000:41:00.0") && e.contains("task 7"), "{e}");
    assert_eq!(r.writes(), writes, "nothing written");
    assert_eq!(r.driver("0000:41:00.0").as_deref(), Some("nvidia"));
    // Another instance cannot take it either; the same one may claim again (restart).
    let e = v
        .claim(&[a("0000:41:00.0")], "task 8")
        .unwrap_err()
        .to_string();
    assert!(e.contains("task 7"), "{e}");
    v.claim(&[a("0000:41:00.0")], "task 7").unwrap();
    // Given back, it binds.
    v.release("task 7").unwrap();
    assert!(v.claims().unwrap().is_empty());
    v.bind(&[a("0000:41:00.0")], "admin").unwrap();
    // Bound to vfio-pci, by rivernode or not: never given to a container.
    let e = v
        .claim(&[a("0000:41:00.0")], "task 9")
        .unwrap_err()
        .to_string();
    assert!(e.contains("vfio-pci") && e.contains("admin"), "{e}");
    let e = v
        .claim(&[a("0000:cb:00.0")], "task 9")
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside rivernode"), "{e}");
    assert!(
        v.claims().unwrap().is_empty(),
        "a refused claim records nothing"
    );
}

#[test]
fn claims_of_instances_that_are_gone_are_dropped() {
    let r = machine();
    let v = r.vfio();
    v.claim(&[a("0000:41:00.0")], "task 1").unwrap();
    v.claim(&[a("0000:60:00.0")], "task 2").unwrap();
    v.retain_claims(|h| h == "task 2").unwrap();
    let left: Vec<String> = v.claims().unwrap().into_values().collect();
    assert_eq!(left, ["task 2"]);
}

#[test]
fn a_vms_groups_are_restored_together_and_nobody_elses() {
    let r = machine();
    r.vfio().bind(&[a("0000:41:00.0")], "task 7").unwrap();
    r.vfio()
        .bind(&[a("0000:51:01.0"), a("0000:51:02.0")], "task 8")
        .unwrap();
    assert_eq!(r.vfio().restore_owner("task 7").unwrap(), [101]);
    assert_eq!(r.driver("0000:41:00.0").as_deref(), Some("nvidia"));
    assert_eq!(r.driver("0000:41:00.1").as_deref(), Some("snd_hda_intel"));
    assert_eq!(r.driver("0000:51:01.0").as_deref(), Some("vfio-pci"));
    // Nothing left for it: a second end is a no-op.
    assert!(r.vfio().restore_owner("task 7").unwrap().is_empty());
    let left: Vec<String> = r
        .vfio()
        .bindings()
        .unwrap()
        .into_iter()
        .map(|b| b.owner)
        .collect();
    assert_eq!(left, ["task 8"]);
}

#[test]
fn a_vms_gpu_is_in_use_for_containers_and_gpu_unbind_without_force() {
    let r = machine();
    let v = r.vfio();
    v.bind(&[a("0000:41:00.0")], "task 7").unwrap();
    let e = v.claim(&[a("0000:41:00.0")], "task 8").unwrap_err();
    assert!(e.to_string().contains("in use by task 7"), "{e}");
    let e = v.unbind(a("0000:41:00.0"), false).unwrap_err();
    assert!(e.to_string().contains("passed to task 7's VM"), "{e}");
    assert_eq!(r.driver("0000:41:00.0").as_deref(), Some("vfio-pci"));
    v.unbind(a("0000:41:00.0"), true).unwrap();
    assert_eq!(r.driver("0000:41:00.0").as_deref(), Some("nvidia"));
    // An admin's binding is undone without asking.
    v.bind(&[a("0000:41:00.0")], "admin").unwrap();
    v.unbind(a("0000:41:00.0"), false).unwrap();
    assert_eq!(r.driver("0000:41:00.0").as_deref(), Some("nvidia"));
}

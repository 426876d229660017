//! Builders for fake sysfs/procfs trees used by unit tests.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;

use super::KernelRoots;

pub struct FakeMachine {
    pub dir: tempfile::TempDir,
}

impl FakeMachine {
    pub fn new() -> Self {
        let m = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        m.write("proc/sys/kernel/hostname", "fakenode\n");
        m.write("proc/sys/kernel/osrelease", "6.1.0-test\n");
        m
    }

    pub fn roots(&self) -> KernelRoots {
        KernelRoots {
            sys: self.path("sys"),
            proc: self.path("proc"),
            pci_ids: self.path("pci.ids"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, content: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    pub fn meminfo(&self, total_kb: u64) {
        self.write(
            "proc/meminfo",
            &format!(
                "MemTotal:       {total_kb} kB\nMemFree: 1 kB\nMemAvailable:   {} kB\n",
                total_kb / 2
            ),
        );
    }

    pub fn online(&self, list: &str) {
        self.write("sys/devices/system/cpu/online", &format!("{list}\n"));
    }

    pub fn cpu(&self, id: u32, package: u32, core: u32, siblings: &str) {
        let t = format!("sys/devices/system/cpu/cpu{id}/topology");
        self.write(&format!("{t}/core_id"), &format!("{core}\n"));
        self.write(&format!("{t}/physical_package_id"), &format!("{package}\n"));
        self.write(
            &format!("{t}/thread_siblings_list"),
            &format!("{siblings}\n"),
        );
    }

    pub fn numa_node(&self, id: u32, cpulist: &str, total_kb: u64) {
        let d = format!("sys/devices/system/node/node{id}");
        self.write(&format!("{d}/cpulist"), &format!("{cpulist}\n"));
        self.write(
            &format!("{d}/meminfo"),
            &format!("Node {id} MemTotal:       {total_kb} kB\nNode {id} MemFree: 1 kB\n"),
        );
    }

    /// A PCI function; `group` puts it in that IOMMU group, `driver` binds it.
    pub fn pci(
        &self,
        addr: &str,
        class: u32,
        (vendor, device): (u16, u16),
        numa: &str,
        group: Option<u32>,
        driver: Option<&str>,
    ) {
        let d = format!("sys/bus/pci/devices/{addr}");
        self.write(&format!("{d}/class"), &format!("0x{class:06x}\n"));
        self.write(&format!("{d}/vendor"), &format!("0x{vendor:04x}\n"));
        self.write(&format!("{d}/device"), &format!("0x{device:04x}\n"));
        self.write(&format!("{d}/numa_node"), &format!("{numa}\n"));
        let dev = self.path(&d);
        if let Some(g) = group {
            let gdir = self.path(&format!("sys/kernel/iommu_groups/{g}/devices"));
            fs::create_dir_all(&gdir).unwrap();
            symlink(&dev, gdir.join(addr)).unwrap();
            symlink(gdir.parent().unwrap(), dev.join("iommu_group")).unwrap();
        }
        if let Some(drv) = driver {
            let ddir = self.path(&format!("sys/bus/pci/drivers/{drv}"));
            fs::create_dir_all(&ddir).unwrap();
            symlink(&ddir, dev.join("driver")).unwrap();
        }
    }

    /// The acceptance machine: 2 sockets, 2 NUMA nodes, 2 cores x 2 threads
    /// per socket, 4 NVIDIA GPUs (2 per node) each with an HDMI audio
    /// function in its slot, GPUs 17:00 and 18:00 sharing IOMMU group 20,
    /// plus a NIC and a boot VGA-less setup.
    pub fn two_socket_four_gpus() -> Self {
        let m = Self::new();
        m.meminfo(64 * 1024 * 1024);
        m.online("0-7");
        // Package 0: cores 0,1 -> cpus (0,4) (1,5). Package 1: cores 0,1 -> (2,6) (3,7).
        for (cpu, pkg, core, sib) in [
            (0, 0, 0, "0,4"),
            (1, 0, 1, "1,5"),
            (2, 1, 0, "2,6"),
            (3, 1, 1, "3,7"),
            (4, 0, 0, "0,4"),
            (5, 0, 1, "1,5"),
            (6, 1, 0, "2,6"),
            (7, 1, 1, "3,7"),
        ] {
            m.cpu(cpu, pkg, core, sib);
        }
        m.numa_node(0, "0-1,4-5", 32 * 1024 * 1024);
        m.numa_node(1, "2-3,6-7", 32 * 1024 * 1024);
        let gpu = 0x030200;
        let audio = 0x040300;
        m.pci(
            "0000:17:00.0",
            gpu,
            (0x10de, 0x2330),
            "0",
            Some(20),
            Some("nvidia"),
        );
        m.pci(
            "0000:17:00.1",
            audio,
            (0x10de, 0x22a3),
            "0",
            Some(20),
            Some("snd_hda_intel"),
        );
        m.pci(
            "0000:18:00.0",
            gpu,
            (0x10de, 0x2330),
            "0",
            Some(20),
            Some("nvidia"),
        );
        m.pci(
            "0000:18:00.1",
            audio,
            (0x10de, 0x22a3),
            "0",
            Some(20),
            Some("snd_hda_intel"),
        );
        m.pci(
            "0000:ca:00.0",
            gpu,
            (0x10de, 0x2330),
            "1",
            Some(30),
            Some("nvidia"),
        );
        m.pci(
            "0000:ca:00.1",
            audio,
            (0x10de, 0x22a3),
            "1",
            Some(30),
            Some("snd_hda_intel"),
        );
        m.pci(
            "0000:cb:00.0",
            gpu,
            (0x10de, 0x2330),
            "1",
            Some(31),
            Some("vfio-pci"),
        );
        m.pci(
            "0000:cb:00.1",
            audio,
            (0x10de, 0x22a3),
            "1",
            Some(31),
            Some("vfio-pci"),
        );
        m.pci(
            "0000:00:1f.6",
            0x020000,
            (0x8086, 0x15bb),
            "-1",
            Some(5),
            Some("e1000e"),
        );
        m.write(
            "pci.ids",
            "10de  NVIDIA Corporation\n\t2330  GH100 [H100 SXM5 80GB]\n8086  Intel Corporation\n",
        );
        m
    }
}

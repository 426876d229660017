//! The libvirt domain of a VM VPS, as a typed value written out as XML.
//!
//! One shape for every VM (shared/reference/vm-gpu-design.md §1.2): q35,
//! a virtio disk on a qcow2 overlay over a read-only base, the NoCloud
//! seed as a read-only SATA cdrom, a tap the runner made (`type='ethernet'`,
//! libvirt does not manage it), every vCPU pinned to one reserved core and
//! the emulator to the reservation, memory strict to its NUMA node, GPUs
//! as `<hostdev managed='no'>` (src/vfio binds them, not libvirt), a serial
//! console logged to a file, a guest-agent channel, and our own metadata,
//! which is what a restarted runner re-adopts the domain from.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use super::xml::Writer;
use crate::net::firewall::mac_text;
use crate::topology::{CpuList, PciAddress};

/// The namespace of our `<metadata>` element (libvirt keeps one element per
/// namespace, and drops one without a namespace).
pub const METADATA_NS: &str = "https://rivernode.dev/xmlns/libvirt/1";
/// Every domain rivernode defines is named `rivernode-<uuid>`.
pub const NAME_PREFIX: &str = "rivernode-";

/// How guests run: KVM with the host's CPU in production, QEMU's TCG
/// emulation where KVM cannot be used (tests; nested KVM hangs on CI).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Qemu,
}

/// How QEMU caches the VM's disk on the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskCache {
    /// O_DIRECT: the guest's own page cache is the only one (production).
    None,
    /// Through the node's page cache: tmpfs (test directories) has no O_DIRECT.
    Writeback,
}

impl DiskCache {
    fn as_str(self) -> &'static str {
        match self {
            DiskCache::None => "none",
            DiskCache::Writeback => "writeback",
        }
    }
}

/// How the guest boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// UEFI (OVMF, picked by libvirt's firmware auto-selection) with Secure
    /// Boot off, its variables in `nvram`. GPUs with big BARs need UEFI.
    Uefi { nvram: PathBuf },
    /// SeaBIOS, booting the disk.
    Bios,
    /// A kernel (and initrd) from the node: images without a boot loader.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

/// What the runner records in the domain about the instance: enough to
/// re-adopt it after a restart without any state of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: u64,
    pub owner: Option<String>,
    pub node: String,
    /// When the host accepted it: with the id, which task this is.
    pub submitted_at_unix_ms: i64,
    pub cpus: CpuList,
    pub numa: Option<u32>,
    pub gpus: Vec<PciAddress>,
    pub tap: String,
    pub ip: Ipv4Addr,
}

/// A VM VPS's domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    pub uuid: String,
    pub accel: Accel,
    pub memory_mib: u64,
    /// The host CPU of each vCPU, in vCPU order.
    pub vcpu_pins: Vec<u32>,
    /// Where QEMU's own threads run (the reservation, never another's cores).
    pub emulator_cpus: CpuList,
    pub boot: Boot,
    /// The instance's own disk: a qcow2 overlay whose backing file is `base`.
    pub disk: PathBuf,
    pub base: PathBuf,
    pub disk_cache: DiskCache,
    pub seed: PathBuf,
    pub mac: [u8; 6],
    pub console_log: PathBuf,
    /// Every PCI function handed to the guest (all of its GPUs' IOMMU groups).
    pub hostdevs: Vec<PciAddress>,
    pub instance: Instance,
}

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    #[error("domain uuid {0:?}: expected 8-4-4-4-12 lower-case hex digits")]
    Uuid(String),
    #[error("a VM needs at least one vCPU (pinned to a reserved core)")]
    NoVcpus,
    #[error("a VM needs memory (memory_mib is 0)")]
    NoMemory,
    #[error("{what} {path}: not an absolute path", path = .path.display())]
    Path { what: &'static str, path: PathBuf },
    #[error("tap name {0:?}: 1 to 15 letters, digits, '-' or '_'")]
    Tap(String),
    #[error("metadata: {0}")]
    Metadata(String),
    #[error("{what}: control characters or bytes that are not UTF-8")]
    Text { what: &'static str },
}

/// True for a UUID as libvirt writes it: 8-4-4-4-12 lower-case hex.
pub fn valid_uuid(u: &str) -> bool {
    let groups: Vec<&str> = u.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// The guest's name for the instance's own disk.
pub const DISK_TARGET: &str = "vda";

/// The domain name of the VM with `uuid`.
pub fn domain_name(uuid: &str) -> String {
    format!("{NAME_PREFIX}{uuid}")
}

fn path_text(p: &std::path::Path) -> String {
    p.display().to_string()
}

impl Vm {
    /// Refuses what libvirt would refuse later, or take the wrong way.
    pub fn check(&self) -> Result<(), DomainError> {
        if !valid_uuid(&self.uuid) {
            return Err(DomainError::Uuid(self.uuid.clone()));
        }
        if self.vcpu_pins.is_empty() {
            return Err(DomainError::NoVcpus);
        }
        if self.memory_mib == 0 {
            return Err(DomainError::NoMemory);
        }
        let t = &self.instance.tap;
        if t.is_empty()
            || t.len() > 15
            || !t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(DomainError::Tap(t.clone()));
        }
        let mut paths = vec![
            ("disk", &self.disk),
            ("base image", &self.base),
            ("seed", &self.seed),
            ("console log", &self.console_log),
        ];
        match &self.boot {
            Boot::Uefi { nvram } => paths.push(("nvram", nvram)),
            Boot::Kernel { kernel, initrd, .. } => {
                paths.push(("kernel", kernel));
                if let Some(i) = initrd {
                    paths.push(("initrd", i));
                }
            }
            Boot::Bios => {}
        }
        let plain = |t: &str| !t.chars().any(char::is_control);
        for (what, path) in paths {
            if !path.is_absolute() {
                return Err(DomainError::Path {
                    what,
                    path: path.clone(),
                });
            }
            // A path must be written as it is, or the domain names another file.
            if !path.to_str().is_some_and(plain) {
                return Err(DomainError::Text { what });
            }
        }
        if let Boot::Kernel { cmdline, .. } = &self.boot {
            if !plain(cmdline) {
                return Err(DomainError::Text {
                    what: "kernel command line",
                });
            }
        }
        let i = &self.instance;
        if !i.owner.as_deref().is_none_or(plain) || !plain(&i.node) {
            return Err(DomainError::Text {
                what: "owner or node name",
            });
        }
        Ok(())
    }

    /// The domain XML, checked first.
    pub fn to_xml(&self) -> Result<String, DomainError> {
        self.check()?;
        let kind = match self.accel {
            Accel::Kvm => "kvm",
            Accel::Qemu => "qemu",
        };
        let mut w = Writer::default();
        w.open("domain", &[("type", kind)])
            .text("name", &[], &domain_name(&self.uuid))
            .text("uuid", &[], &self.uuid)
            .text(
                "title",
                &[],
                &match &self.instance.owner {
                    Some(o) => format!("vps {} ({o})", self.instance.id),
                    None => format!("vps {}", self.instance.id),
                },
            );
        self.metadata(&mut w);
        let mem = self.memory_mib.to_string();
        w.text("memory", &[("unit", "MiB")], &mem)
            .text("currentMemory", &[("unit", "MiB")], &mem)
            .text(
                "vcpu",
                &[("placement", "static")],
                &self.vcpu_pins.len().to_string(),
            );
        w.open("cputune", &[]);
        for (v, cpu) in self.vcpu_pins.iter().enumerate() {
            w.empty(
                "vcpupin",
                &[("vcpu", &v.to_string()), ("cpuset", &cpu.to_string())],
            );
        }
        w.empty(
            "emulatorpin",
            &[("cpuset", &self.emulator_cpus.to_string())],
        )
        .close();
        if let Some(n) = self.instance.numa {
            w.open("numatune", &[])
                .empty("memory", &[("mode", "strict"), ("nodeset", &n.to_string())])
                .close();
        }
        self.os(&mut w);
        w.open("features", &[])
            .empty("acpi", &[])
            .empty("apic", &[]);
        if self.accel == Accel::Kvm {
            // Each vCPU has a core of its own: the guest need not yield it.
            w.open("kvm", &[])
                .empty("hint-dedicated", &[("state", "on")])
                .close();
        }
        w.close();
        if self.accel == Accel::Kvm {
            // The host's CPU, and its physical address width: big GPU BARs
            // need more than QEMU's default 40 bits.
            w.open(
                "cpu",
                &[
                    ("mode", "host-passthrough"),
                    ("check", "none"),
                    ("migratable", "off"),
                ],
            )
            .empty("maxphysaddr", &[("mode", "passthrough")])
            .close();
        }
        w.empty("clock", &[("offset", "utc")])
            .text("on_poweroff", &[], "destroy")
            .text("on_reboot", &[], "restart")
            .text("on_crash", &[], "destroy");
        self.devices(&mut w);
        Ok(w.finish())
    }

    fn metadata(&self, w: &mut Writer) {
        let i = &self.instance;
        w.open("metadata", &[])
            .open("rivernode:instance", &[("xmlns:rivernode", METADATA_NS)]);
        w.text("rivernode:id", &[], &i.id.to_string());
        if let Some(o) = &i.owner {
            w.text("rivernode:owner", &[], o);
        }
        w.text("rivernode:node", &[], &i.node)
            .text(
                "rivernode:submitted",
                &[],
                &i.submitted_at_unix_ms.to_string(),
            )
            .text("rivernode:cpus", &[], &i.cpus.to_string());
        if let Some(n) = i.numa {
            w.text("rivernode:numa", &[], &n.to_string());
        }
        for g in &i.gpus {
            w.text("rivernode:gpu", &[], &g.to_string());
        }
        w.text("rivernode:tap", &[], &i.tap)
            .text("rivernode:ip", &[], &i.ip.to_string())
            .close()
            .close();
    }

    fn os(&self, w: &mut Writer) {
        let firmware: &[(&str, &str)] = match self.boot {
            Boot::Uefi { .. } => &[("firmware", "efi")],
            _ => &[],
        };
        w.open("os", firmware)
            .text("type", &[("arch", "x86_64"), ("machine", "q35")], "hvm");
        match &self.boot {
            Boot::Uefi { nvram } => {
                w.open("firmware", &[])
                    .empty("feature", &[("enabled", "no"), ("name", "secure-boot")])
                    .empty("feature", &[("enabled", "no"), ("name", "enrolled-keys")])
                    .close()
                    .text("nvram", &[], &path_text(nvram))
                    .empty("boot", &[("dev", "hd")]);
            }
            Boot::Bios => {
                w.empty("boot", &[("dev", "hd")]);
            }
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                w.text("kernel", &[], &path_text(kernel));
                if let Some(i) = initrd {
                    w.text("initrd", &[], &path_text(i));
                }
                w.text("cmdline", &[], cmdline);
            }
        }
        w.close();
    }

    fn devices(&self, w: &mut Writer) {
        w.open("devices", &[]);
        w.open("disk", &[("type", "file"), ("device", "disk")])
            .empty(
                "driver",
                &[
                    ("name", "qemu"),
                    ("type", "qcow2"),
                    ("cache", self.disk_cache.as_str()),
                    ("discard", "unmap"),
                ],
            )
            .empty("source", &[("file", &path_text(&self.disk))])
            .open("backingStore", &[("type", "file")])
            .empty("format", &[("type", "qcow2")])
            .empty("source", &[("file", &path_text(&self.base))])
            .empty("backingStore", &[])
            .close()
            .empty("target", &[("dev", DISK_TARGET), ("bus", "virtio")])
            .close();
        w.open("disk", &[("type", "file"), ("device", "cdrom")])
            .empty("driver", &[("name", "qemu"), ("type", "raw")])
            .empty("source", &[("file", &path_text(&self.seed))])
            .empty("target", &[("dev", "sda"), ("bus", "sata")])
            .empty("readonly", &[])
            .close();
        w.open("interface", &[("type", "ethernet")])
            .empty("mac", &[("address", &mac_text(self.mac))])
            .empty("target", &[("dev", &self.instance.tap), ("managed", "no")])
            .empty("model", &[("type", "virtio")])
            .close();
        for a in &self.hostdevs {
            w.open(
                "hostdev",
                &[("mode", "subsystem"), ("type", "pci"), ("managed", "no")],
            )
            .empty("driver", &[("name", "vfio")])
            .open("source", &[])
            .empty(
                "address",
                &[
                    ("domain", &format!("0x{:04x}", a.domain)),
                    ("bus", &format!("0x{:02x}", a.bus)),
                    ("slot", &format!("0x{:02x}", a.slot)),
                    ("function", &format!("0x{:x}", a.function)),
                ],
            )
            .close()
            .close();
        }
        w.open("serial", &[("type", "pty")])
            .empty(
                "log",
                &[("file", &path_text(&self.console_log)), ("append", "off")],
            )
            .open("target", &[("type", "isa-serial"), ("port", "0")])
            .empty("model", &[("name", "isa-serial")])
            .close()
            .close();
        w.open("console", &[("type", "pty")])
            .empty("target", &[("type", "serial"), ("port", "0")])
            .close();
        w.open("channel", &[("type", "unix")])
            .empty("source", &[("mode", "bind")])
            .empty(
                "target",
                &[("type", "virtio"), ("name", "org.qemu.guest_agent.0")],
            )
            .close();
        // No USB controller: nothing uses one, and q35 would add xHCI.
        w.empty("controller", &[("type", "usb"), ("model", "none")]);
        w.open("rng", &[("model", "virtio")])
            .text("backend", &[("model", "random")], "/dev/urandom")
            .close();
        // No balloon: the memory is the VM's reservation, not a hint.
        w.empty("memballoon", &[("model", "none")]);
        w.close();
    }
}

/// The text of `<tag>` (with or without our prefix) in `xml`, unescaped.
fn child<'a>(xml: &'a str, tag: &str) -> Vec<String> {
    let mut out = Vec::new();
    for t in [format!("rivernode:{tag}"), tag.to_string()] {
        let (open, close) = (format!("<{t}>"), format!("</{t}>"));
        let mut rest: &'a str = xml;
        while let Some(i) = rest.find(&open) {
            let after = &rest[i + open.len()..];
            let Some(j) = after.find(&close) else { break };
            out.push(unescape(&after[..j]));
            rest = &after[j + close.len()..];
        }
        if !out.is_empty() {
            break;
        }
    }
    out
}

fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&apos;", "'")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

impl Instance {
    /// Reads our metadata element back, as libvirt returns it (with or
    /// without the namespace prefix): how a restarted runner knows what a
    /// domain is for.
    pub fn from_metadata(xml: &str) -> Result<Instance, DomainError> {
        let one = |tag: &str| {
            child(xml, tag)
                .into_iter()
                .next()
                .ok_or_else(|| DomainError::Metadata(format!("no <{tag}>")))
        };
        let bad =
            |tag: &str, e: &dyn std::fmt::Display| DomainError::Metadata(format!("<{tag}>: {e}"));
        Ok(Instance {
            id: one("id")?.parse().map_err(|e| bad("id", &e))?,
            owner: child(xml, "owner").into_iter().next(),
            node: one("node")?,
            submitted_at_unix_ms: one("submitted")?
                .parse()
                .map_err(|e| bad("submitted", &e))?,
            cpus: one("cpus")?.parse().map_err(|e| bad("cpus", &e))?,
            numa: child(xml, "numa")
                .into_iter()
                .next()
                .map(|n| n.parse().map_err(|e| bad("numa", &e)))
                .transpose()?,
            gpus: child(xml, "gpu")
                .iter()
                .map(|g| g.parse().map_err(|e| bad("gpu", &e)))
                .collect::<Result<_, _>>()?,
            tap: one("tap")?,
            ip: one("ip")?.parse().map_err(|e| bad("ip", &e))?,
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The test profile: TCG, direct kernel boot, no GPUs.
    pub fn tcg() -> Vm {
        Vm {
            uuid: "3f2a9c1e-0000-4000-8000-00000000002a".into(),
            accel: Accel::Qemu,
            memory_mib: 512,
            vcpu_pins: vec![0, 1],
            emulator_cpus: "0-1".parse().unwrap(),
            boot: Boot::Kernel {
                kernel: "/boot/vmlinuz-6.1.0-57-amd64".into(),
                initrd: Some("/var/lib/rivernode/vms/42/initrd.img".into()),
                cmdline: "console=ttyS0 root=/dev/vda rw quiet".into(),
            },
            disk: "/var/lib/rivernode/vms/42/disk.qcow2".into(),
            base: "/var/lib/rivernode/vm-images/mini.qcow2".into(),
            disk_cache: DiskCache::Writeback,
            seed: "/var/lib/rivernode/vms/42/seed.iso".into(),
            mac: [0x0a, 0x58, 10, 250, 0, 42],
            console_log: "/var/lib/rivernode/vms/42/console.log".into(),
            hostdevs: vec![],
            instance: Instance {
                id: 42,
                owner: Some("alice & co".into()),
                node: "n1".into(),
                submitted_at_unix_ms: 1_796_000_000_000,
                cpus: "0-1".parse().unwrap(),
                numa: Some(0),
                gpus: vec![],
                tap: "rvtap42".into(),
                ip: "10.250.0.42".parse().unwrap(),
            },
        }
    }

    /// Production: KVM, UEFI, two GPUs with their audio functions.
    pub fn kvm_gpu() -> Vm {
        let gpus: Vec<PciAddress> = [
            "0000:41:00.0",
            "0000:41:00.1",
            "0000:c1:00.0",
            "0000:c1:00.1",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let mut vm = tcg();
        vm.accel = Accel::Kvm;
        vm.memory_mib = 65536;
        vm.vcpu_pins = (8..16).collect();
        vm.emulator_cpus = "8-15".parse().unwrap();
        vm.boot = Boot::Uefi {
            nvram: "/var/lib/rivernode/vms/42/VARS.fd".into(),
        };
        vm.disk_cache = DiskCache::None;
        vm.hostdevs = gpus.clone();
        vm.instance.cpus = "8-15".parse().unwrap();
        vm.instance.numa = Some(1);
        vm.instance.gpus = vec![gpus[0], gpus[2]];
        vm
    }

    /// Compares with `src/kvm/testdata/<name>`; `RIVERNODE_BLESS=1` rewrites
    /// it instead (then read the diff: tests/kvm.rs validates these files
    /// with libvirt's own schema).
    fn golden(name: &str, actual: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/kvm/testdata")
            .join(name);
        if std::env::var_os("RIVERNODE_BLESS").is_some() {
            std::fs::write(&path, actual).unwrap();
        }
        let want = std::fs::read_to_string(&path).unwrap_or_default();
        assert_eq!(actual, want, "{} differs", path.display());
    }

    #[test]
    fn the_test_profile_matches_its_golden_file() {
        golden("domain-tcg.xml", &tcg().to_xml().unwrap());
    }

    #[test]
    fn the_gpu_profile_matches_its_golden_file() {
        golden("domain-kvm-gpu.xml", &kvm_gpu().to_xml().unwrap());
    }

    #[test]
    fn the_metadata_reads_back_with_or_without_its_prefix() {
        for vm in [tcg(), kvm_gpu()] {
            let xml = vm.to_xml().unwrap();
            let start = xml.find("<rivernode:instance").unwrap();
            let end = xml.find("</rivernode:instance>").unwrap();
            let ours = &xml[start..end];
            assert_eq!(Instance::from_metadata(ours).unwrap(), vm.instance);
            // libvirt hands the element back without the prefix.
            let plain = ours.replace("rivernode:", "");
            assert_eq!(Instance::from_metadata(&plain).unwrap(), vm.instance);
        }
        assert!(matches!(
            Instance::from_metadata("<instance><id>x</id></instance>"),
            Err(DomainError::Metadata(_))
        ));
    }

    #[test]
    fn what_libvirt_would_refuse_is_refused_first() {
        let mut vm = tcg();
        vm.uuid = "3F2A9C1E-0000-4000-8000-00000000002A".into();
        assert!(matches!(vm.to_xml(), Err(DomainError::Uuid(_))));
        let mut vm = tcg();
        vm.vcpu_pins.clear();
        assert!(matches!(vm.to_xml(), Err(DomainError::NoVcpus)));
        let mut vm = tcg();
        vm.instance.tap = "a-tap-name-too-long".into();
        assert!(matches!(vm.to_xml(), Err(DomainError::Tap(_))));
        let mut vm = tcg();
        vm.seed = "seed.iso".into();
        assert!(matches!(
            vm.to_xml(),
            Err(DomainError::Path { what: "seed", .. })
        ));
        let mut vm = tcg();
        vm.disk = "/vms/42/disk\n.qcow2".into();
        assert!(matches!(
            vm.to_xml(),
            Err(DomainError::Text { what: "disk" })
        ));
        let mut vm = tcg();
        vm.instance.owner = Some("eve\u{7}".into());
        assert!(matches!(vm.to_xml(), Err(DomainError::Text { .. })));
    }
}

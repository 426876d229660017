//! PCI devices under `<sys>/bus/pci/devices`: addresses, GPUs, their IOMMU
//! groups and the companion functions that sit in the same slot.

use std::fmt;
use std::fs;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{read_trimmed, TopologyError};

/// A PCI function address, `dddd:bb:ss.f` (domain, bus, slot, function).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    pub domain: u32,
    pub bus: u8,
    pub slot: u8,
    pub function: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PCI address {input:?}: expected dddd:bb:ss.f, e.g. 0000:3b:00.0")]
pub struct PciAddressError {
    pub input: String,
}

impl PciAddress {
    /// True for another function of the same physical slot (e.g. a GPU's HDMI audio).
    pub fn same_slot(&self, other: &PciAddress) -> bool {
        self.domain == other.domain && self.bus == other.bus && self.slot == other.slot
    }
}

impl FromStr for PciAddress {
    type Err = PciAddressError;

    /// Accepts the kernel's form and NVML's (8-hex-digit domain, upper case),
    /// and a short `bb:ss.f` meaning domain 0.
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = || PciAddressError {
            input: input.to_string(),
        };
        let s = input.trim();
        let parts: Vec<&str> = s.split(':').collect();
        let (domain, bus, devfn) = match parts.as_slice() {
            [d, b, df] => (*d, *b, *df),
            [b, df] => ("0", *b, *df),
            _ => return Err(err()),
        };
        let (slot, function) = devfn.split_once('.').ok_or_else(err)?;
        let hex = |t: &str, max_len: usize| -> Result<u32, PciAddressError> {
            if t.is_empty() || t.len() > max_len || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u32::from_str_radix(t, 16).map_err(|_| err())
        };
        let domain = hex(domain, 8)?;
        let bus = hex(bus, 2)?;
        let slot = hex(slot, 2)?;
        let function = hex(function, 1)?;
        if slot > 0x1f || function > 7 {
            return Err(err());
        }
        Ok(Self {
            domain,
            bus: bus as u8,
            slot: slot as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.slot, self.function
        )
    }
}

/// In the API a PCI address is its text, `dddd:bb:ss.f`.
impl utoipa::PartialSchema for PciAddress {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::Type::String)
            .examples(["0000:3b:00.0"])
            .into()
    }
}

impl utoipa::ToSchema for PciAddress {}

impl Serialize for PciAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// One PCI function as the inventory reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PciFunction {
    pub address: PciAddress,
    /// 24-bit class code, e.g. 0x030000 for a VGA controller.
    pub class: u32,
    pub vendor_id: u16,
    pub device_id: u16,
    /// Name of the bound kernel driver, if any (`nvidia`, `vfio-pci`, ...).
    pub driver: Option<String>,
}

/// A GPU (PCI class 03xx: VGA, 3D or other display controller).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Gpu {
    pub address: PciAddress,
    pub vendor_id: u16,
    pub device_id: u16,
    pub class: u32,
    pub vendor_name: Option<String>,
    /// Marketing name, from NVML when available, else from pci.ids.
    pub name: Option<String>,
    /// NVML's UUID (`GPU-...`); absent without an NVIDIA driver.
    pub uuid: Option<String>,
    pub driver: Option<String>,
    /// NUMA node the device is attached to; `None` when the kernel says -1.
    pub numa_node: Option<u32>,
    pub iommu_group: Option<u32>,
    /// Every other function in the same IOMMU group (they move to vfio-pci together).
    pub iommu_group_members: Vec<PciFunction>,
    /// Other functions in the same slot, e.g. the card's HDMI audio.
    pub companions: Vec<PciFunction>,
    /// The firmware's boot display; handing it to a VM takes the console away.
    pub boot_vga: bool,
}

const CLASS_DISPLAY: u32 = 0x03;

fn hex_file(path: &Path) -> Result<u32, TopologyError> {
    let text = read_trimmed(path)?;
    let digits = text.strip_prefix("0x").unwrap_or(&text);
    u32::from_str_radix(digits, 16).map_err(|_| TopologyError::Parse {
        path: path.to_path_buf(),
        reason: format!("{text:?} is not a hex number"),
    })
}

fn link_name(path: &Path) -> Option<String> {
    fs::read_link(path)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
}

fn read_function(dev_dir: &Path, address: PciAddress) -> Result<PciFunction, TopologyError> {
    Ok(PciFunction {
        address,
        class: hex_file(&dev_dir.join("class"))?,
        vendor_id: hex_file(&dev_dir.join("vendor"))? as u16,
        device_id: hex_file(&dev_dir.join("device"))? as u16,
        driver: link_name(&dev_dir.join("driver")),
    })
}

/// Every PCI function on the machine, sorted by address. Entries whose
/// directory name is not an address are skipped.
pub fn scan_functions(sys: &Path) -> Result<Vec<PciFunction>, TopologyError> {
    let dir = sys.join("bus/pci/devices");
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        // No PCI bus at all (some containers, some VMs): no GPUs, not an error.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(TopologyError::Read { path: dir, source }),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| TopologyError::Read {
            path: dir.clone(),
            source,
        })?;
        let Ok(address) = entry.file_name().to_string_lossy().parse::<PciAddress>() else {
            continue;
        };
        out.push(read_function(&entry.path(), address)?);
    }
    out.sort_by_key(|f| f.address);
    Ok(out)
}

/// GPUs with their IOMMU group and slot companions. Bad optional files
/// (numa_node, boot_vga) degrade to "unknown" and add a line to `warnings`.
pub fn scan_gpus(sys: &Path, warnings: &mut Vec<String>) -> Result<Vec<Gpu>, TopologyError> {
    let functions = scan_functions(sys)?;
    let mut gpus = Vec::new();
    for f in functions.iter().filter(|f| f.class >> 16 == CLASS_DISPLAY) {
        let dev_dir = sys.join("bus/pci/devices").join(f.address.to_string());
        let numa_node = read_numa_node(&dev_dir.join("numa_node"), warnings);
        let boot_vga = match read_trimmed(&dev_dir.join("boot_vga")) {
            Ok(v) => v == "1",
            Err(_) => false,
        };
        let iommu_group = link_name(&dev_dir.join("iommu_group")).and_then(|n| n.parse().ok());
        let iommu_group_members = match iommu_group {
            Some(g) => group_members(sys, g, f.address, &functions)?,
            None => Vec::new(),
        };
        let companions = functions
            .iter()
            .filter(|o| o.address != f.address && o.address.same_slot(&f.address))
            .cloned()
            .collect();
        gpus.push(Gpu {
            address: f.address,
            vendor_id: f.vendor_id,
            device_id: f.device_id,
            class: f.class,
            vendor_name: None,
            name: None,
            uuid: None,
            driver: f.driver.clone(),
            numa_node,
            iommu_group,
            iommu_group_members,
            companions,
            boot_vga,
        });
    }
    Ok(gpus)
}

fn read_numa_node(path: &Path, warnings: &mut Vec<String>) -> Option<u32> {
    let text = read_trimmed(path).ok()?;
    match text.parse::<i64>() {
        Ok(n) if n < 0 => None,
        Ok(n) if n <= i64::from(super::cpulist::MAX_INDEX) => Some(n as u32),
        _ => {
            warnings.push(format!(
                "{}: {text:?} is not a NUMA node; treating it as unknown",
                path.display()
            ));
            None
        }
    }
}

fn group_members(
    sys: &Path,
    group: u32,
    this: PciAddress,
    functions: &[PciFunction],
) -> Result<Vec<PciFunction>, TopologyError> {
    let dir = sys.join(format!("kernel/iommu_groups/{group}/devices"));
    let entries = fs::read_dir(&dir).map_err(|source| TopologyError::Read {
        path: dir.clone(),
        source,
    })?;
    let mut members = Vec::new();
    for entry in entries.flatten() {
        let Ok(addr) = entry.file_name().to_string_lossy().parse::<PciAddress>() else {
            continue;
        };
        if addr == this {
            continue;
        }
        if let Some(f) = functions.iter().find(|f| f.address == addr) {
            members.push(f.clone());
        }
    }
    members.sort_by_key(|f| f.address);
    Ok(members)
}

/// Vendor and device names from a `pci.ids` database (pciutils/hwdata),
/// scanning the file once for the IDs asked for.
pub fn lookup_names(pci_ids: &Path, gpus: &mut [Gpu]) {
    let Ok(text) = fs::read_to_string(pci_ids) else {
        return;
    };
    let mut vendor: Option<u16> = None;
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with("C ") {
            // Class section at the end of the file: no more vendors.
            break;
        }
        if !line.starts_with('\t') {
            vendor = parse_id_line(line).map(|(id, name)| {
                for g in gpus.iter_mut().filter(|g| g.vendor_id == id) {
                    g.vendor_name = Some(name.to_string());
                }
                id
            });
        } else if !line.starts_with("\t\t") {
            let (Some(v), Some((id, name))) = (vendor, parse_id_line(&line[1..])) else {
                continue;
            };
            for g in gpus
                .iter_mut()
                .filter(|g| g.vendor_id == v && g.device_id == id && g.name.is_none())
            {
                g.name = Some(name.to_string());
            }
        }
    }
}

fn parse_id_line(line: &str) -> Option<(u16, &str)> {
    let (id, name) = line.split_once("  ")?;
    Some((u16::from_str_radix(id.trim(), 16).ok()?, name.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_forms() {
        let a: PciAddress = "0000:3b:00.1".parse().unwrap();
        assert_eq!((a.domain, a.bus, a.slot, a.function), (0, 0x3b, 0, 1));
        assert_eq!(a.to_string(), "0000:3b:00.1");
        let nvml: PciAddress = "00000000:3B:00.0".parse().unwrap();
        assert_eq!(nvml.to_string(), "0000:3b:00.0");
        assert!(nvml.same_slot(&a));
        let short: PciAddress = "01:00.0".parse().unwrap();
        assert_eq!(short.to_string(), "0000:01:00.0");
        for bad in [
            "",
            "0000:3b:00",
            "0000:3b:20.0",
            "0000:3b:00.8",
            "zz:00.0",
            "0:0:0:0.0",
            "0000:100:00.0",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pci_ids_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let ids = dir.path().join("pci.ids");
        fs::write(
            &ids,
            "# comment\n10de  NVIDIA Corporation\n\t2204  GA102 [GeForce RTX 3090]\n\t\t10de 1454  sub\n8086  Intel Corporation\nC 03  Display controller\n",
        )
        .unwrap();
        let mut gpus = vec![Gpu {
            address: "0000:01:00.0".parse().unwrap(),
            vendor_id: 0x10de,
            device_id: 0x2204,
            class: 0x030000,
            vendor_name: None,
            name: None,
            uuid: None,
            driver: None,
            numa_node: None,
            iommu_group: None,
            iommu_group_members: vec![],
            companions: vec![],
            boot_vga: false,
        }];
        lookup_names(&ids, &mut gpus);
        assert_eq!(gpus[0].vendor_name.as_deref(), Some("NVIDIA Corporation"));
        assert_eq!(gpus[0].name.as_deref(), Some("GA102 [GeForce RTX 3090]"));
    }
}

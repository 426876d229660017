//! GPU UUIDs and names from NVML, loaded at run time with `dlopen` so that
//! machines without an NVIDIA driver (the common case for a CI box, and for
//! AMD/Intel nodes) run the same binary. Absent NVML is normal, not an error.

use std::ffi::{c_char, c_int, c_uint, c_void};

use libloading::{Library, Symbol};

use super::{Gpu, PciAddress};

const LIBRARY: &str = "libnvidia-ml.so.1";
const NVML_SUCCESS: c_int = 0;
/// NVML_DEVICE_UUID_V2_BUFFER_SIZE and NVML_DEVICE_NAME_V2_BUFFER_SIZE.
const STRING_BUFFER: usize = 96;

type NvmlDevice = *mut c_void;

/// `nvmlPciInfo_t` as declared in nvml.h (the v3 getter fills this layout).
#[repr(C)]
struct NvmlPciInfo {
    bus_id_legacy: [c_char; 16],
    domain: c_uint,
    bus: c_uint,
    device: c_uint,
    pci_device_id: c_uint,
    pci_sub_system_id: c_uint,
    bus_id: [c_char; 32],
}

/// What NVML says about one GPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvmlGpu {
    pub address: PciAddress,
    pub uuid: String,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NvmlError {
    #[error("{LIBRARY} is not installed")]
    NotInstalled,
    #[error("NVML symbol {0} missing: {1}")]
    Symbol(&'static str, libloading::Error),
    #[error("NVML call {call} failed with code {code}")]
    Call { call: &'static str, code: c_int },
    #[error("NVML returned an unreadable PCI bus id {0:?}")]
    BusId(String),
}

/// Lists the GPUs NVML sees. `Err(NotInstalled)` on machines without the driver.
pub fn query() -> Result<Vec<NvmlGpu>, NvmlError> {
    // SAFETY: loading the system's NVML runs its initialisers, which is what
    // every NVML user (nvidia-smi, DCGM) does; we pass no callbacks into it.
    let lib = unsafe { Library::new(LIBRARY) }.map_err(|_| NvmlError::NotInstalled)?;
    let api = Api::load(&lib)?;
    // SAFETY: nvmlInit_v2 takes no arguments; it is balanced by nvmlShutdown below.
    check("nvmlInit_v2", unsafe { (api.init)() })?;
    let result = api.list();
    // SAFETY: NVML was initialised above; shutdown releases that reference.
    unsafe { (api.shutdown)() };
    result
}

/// Fills `uuid` (and `name`, when pci.ids had none) of GPUs NVML knows,
/// matched by PCI address, never by index.
pub fn attach_uuids(gpus: &mut [Gpu], nvml: &[NvmlGpu]) {
    for g in gpus.iter_mut() {
        if let Some(n) = nvml.iter().find(|n| n.address == g.address) {
            g.uuid = Some(n.uuid.clone());
            g.name = Some(n.name.clone());
        }
    }
}

fn check(call: &'static str, code: c_int) -> Result<(), NvmlError> {
    if code == NVML_SUCCESS {
        Ok(())
    } else {
        Err(NvmlError::Call { call, code })
    }
}

struct Api<'lib> {
    init: Symbol<'lib, unsafe extern "C" fn() -> c_int>,
    shutdown: Symbol<'lib, unsafe extern "C" fn() -> c_int>,
    count: Symbol<'lib, unsafe extern "C" fn(*mut c_uint) -> c_int>,
    handle: Symbol<'lib, unsafe extern "C" fn(c_uint, *mut NvmlDevice) -> c_int>,
    uuid: Symbol<'lib, unsafe extern "C" fn(NvmlDevice, *mut c_char, c_uint) -> c_int>,
    name: Symbol<'lib, unsafe extern "C" fn(NvmlDevice, *mut c_char, c_uint) -> c_int>,
    pci: Symbol<'lib, unsafe extern "C" fn(NvmlDevice, *mut NvmlPciInfo) -> c_int>,
}

impl<'lib> Api<'lib> {
    fn load(lib: &'lib Library) -> Result<Self, NvmlError> {
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the signature matches the declaration in nvml.h for this symbol.
                unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| NvmlError::Symbol($name, e))?
            };
        }
        Ok(Self {
            init: sym!("nvmlInit_v2"),
            shutdown: sym!("nvmlShutdown"),
            count: sym!("nvmlDeviceGetCount_v2"),
            handle: sym!("nvmlDeviceGetHandleByIndex_v2"),
            uuid: sym!("nvmlDeviceGetUUID"),
            name: sym!("nvmlDeviceGetName"),
            pci: sym!("nvmlDeviceGetPciInfo_v3"),
        })
    }

    fn list(&self) -> Result<Vec<NvmlGpu>, NvmlError> {
        let mut count: c_uint = 0;
        // SAFETY: NVML is initialised; `count` is a valid out pointer.
        check("nvmlDeviceGetCount_v2", unsafe { (self.count)(&mut count) })?;
        let mut out = Vec::with_capacity(count as usize);
        for index in 0..count {
            let mut dev: NvmlDevice = std::ptr::null_mut();
            // SAFETY: index < count; `dev` is a valid out pointer.
            check("nvmlDeviceGetHandleByIndex_v2", unsafe {
                (self.handle)(index, &mut dev)
            })?;
            let uuid = self.string("nvmlDeviceGetUUID", &self.uuid, dev)?;
            let name = self.string("nvmlDeviceGetName", &self.name, dev)?;
            // SAFETY: all-zero is a valid value of this plain C struct.
            let mut info: NvmlPciInfo = unsafe { std::mem::zeroed() };
            // SAFETY: `dev` came from NVML; `info` has the layout NVML writes.
            check("nvmlDeviceGetPciInfo_v3", unsafe {
                (self.pci)(dev, &mut info)
            })?;
            out.push(NvmlGpu {
                address: bus_id_to_address(&info.bus_id)?,
                uuid,
                name,
            });
        }
        Ok(out)
    }

    fn string(
        &self,
        call: &'static str,
        f: &Symbol<'lib, unsafe extern "C" fn(NvmlDevice, *mut c_char, c_uint) -> c_int>,
        dev: NvmlDevice,
    ) -> Result<String, NvmlError> {
        let mut buf = [0 as c_char; STRING_BUFFER];
        // SAFETY: `buf` holds STRING_BUFFER bytes, the length we pass; NVML NUL-terminates.
        check(call, unsafe {
            f(dev, buf.as_mut_ptr(), STRING_BUFFER as c_uint)
        })?;
        Ok(c_buf_to_string(&buf))
    }
}

fn c_buf_to_string(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn bus_id_to_address(buf: &[c_char]) -> Result<PciAddress, NvmlError> {
    let s = c_buf_to_string(buf);
    s.parse().map_err(|_| NvmlError::BusId(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c_buf(s: &str, len: usize) -> Vec<c_char> {
        let mut v: Vec<c_char> = s.bytes().map(|b| b as c_char).collect();
        v.resize(len, 0);
        v
    }

    #[test]
    fn bus_id_is_parsed_from_nvml_format() {
        let a = bus_id_to_address(&c_buf("00000000:3B:00.0", 32)).unwrap();
        assert_eq!(a.to_string(), "0000:3b:00.0");
        assert!(bus_id_to_address(&c_buf("garbage", 32)).is_err());
    }

    #[test]
    fn uuids_attach_by_address_not_index() {
        let mk = |addr: &str| Gpu {
            address: addr.parse().unwrap(),
            vendor_id: 0x10de,
            device_id: 0x2330,
            class: 0x030200,
            vendor_name: None,
            name: None,
            uuid: None,
            driver: Some("nvidia".into()),
            numa_node: None,
            iommu_group: None,
            iommu_group_members: vec![],
            companions: vec![],
            boot_vga: false,
        };
        let mut gpus = vec![mk("0000:17:00.0"), mk("0000:65:00.0")];
        // NVML enumerates in its own order; the second GPU comes first here.
        let nvml = vec![
            NvmlGpu {
                address: "0000:65:00.0".parse().unwrap(),
                uuid: "GPU-b".into(),
                name: "H100".into(),
            },
            NvmlGpu {
                address: "0000:17:00.0".parse().unwrap(),
                uuid: "GPU-a".into(),
                name: "H100".into(),
            },
        ];
        attach_uuids(&mut gpus, &nvml);
        assert_eq!(gpus[0].uuid.as_deref(), Some("GPU-a"));
        assert_eq!(gpus[1].uuid.as_deref(), Some("GPU-b"));
    }

    #[test]
    fn absent_library_is_reported_as_not_installed() {
        // This machine has no NVIDIA driver; where it has one, query must succeed.
        match query() {
            Err(NvmlError::NotInstalled) => {}
            Ok(list) => assert!(list.iter().all(|g| g.uuid.starts_with("GPU-"))),
            Err(e) => panic!("unexpected NVML error: {e}"),
        }
    }
}

//! GPU UUIDs, names and utilisation from NVML, loaded at run time with
//! `dlopen` so that machines without an NVIDIA driver (the common case for
//! a CI box, and for AMD/Intel nodes) run the same binary. Absent NVML is
//! normal, not an error. The library's path is a setting (`nvml_library`):
//! tests load a fake one whose readings they control.

use std::ffi::{c_char, c_int, c_uint, c_void};
use std::path::Path;

use libloading::Library;

use super::{Gpu, PciAddress};

/// The driver's NVML, found by the dynamic loader.
pub const LIBRARY: &str = "libnvidia-ml.so.1";
const NVML_SUCCESS: c_int = 0;
/// NVML_DEVICE_UUID_V2_BUFFER_SIZE and NVML_DEVICE_NAME_V2_BUFFER_SIZE.
const STRING_BUFFER: usize = 96;

type NvmlDevice = *mut c_void;

/// nvmlTemperatureSensors_t: the GPU die.
const TEMPERATURE_GPU: c_int = 0;
/// nvmlMemoryErrorType_t.
const ECC_CORRECTED: c_int = 0;
const ECC_UNCORRECTED: c_int = 1;
/// nvmlEccCounterType_t: since the driver loaded.
const ECC_VOLATILE: c_int = 0;

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

/// `nvmlUtilization_t`: percent of the last sample period the GPU (and its
/// memory controller) was busy.
#[repr(C)]
#[derive(Default)]
struct NvmlUtilization {
    gpu: c_uint,
    memory: c_uint,
}

/// `nvmlMemory_t`, in bytes.
#[repr(C)]
#[derive(Default)]
struct NvmlMemory {
    total: u64,
    free: u64,
    used: u64,
}

/// One GPU's reading, for heartbeats (the idle-GPU check) and metrics.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct GpuSample {
    pub address: PciAddress,
    /// Busy share of NVML's last sample period, 0–100.
    pub utilisation_percent: u32,
    pub memory_used_bytes: u64,
    /// What a GPU cannot say (no sensor, ECC off) is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_celsius: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_milliwatts: Option<u32>,
    /// ECC errors since the driver loaded (NVML's volatile counters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecc_corrected: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecc_uncorrected: Option<u64>,
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
    #[error("NVML ({0}) is not installed")]
    NotInstalled(String),
    #[error("NVML symbol {0} missing: {1}")]
    Symbol(&'static str, libloading::Error),
    #[error("NVML call {call} failed with code {code}")]
    Call { call: &'static str, code: c_int },
    #[error("NVML returned an unreadable PCI bus id {0:?}")]
    BusId(String),
}

/// Lists the GPUs the system's NVML sees. `Err(NotInstalled)` on machines
/// without the driver.
pub fn query() -> Result<Vec<NvmlGpu>, NvmlError> {
    Nvml::open(Path::new(LIBRARY))?.list()
}

/// NVML, loaded and initialised; shut down when dropped. A runner keeps
/// one for its life: initialising NVML costs far more than a reading.
pub struct Nvml {
    api: Api,
    // Declared last: dropped after `api`'s pointers are last used.
    _lib: Library,
}

impl Nvml {
    /// Loads the library at `path` (a bare name: the loader's search) and initialises it.
    pub fn open(path: &Path) -> Result<Nvml, NvmlError> {
        // SAFETY: loading NVML runs its initialisers, which is what every
        // NVML user (nvidia-smi, DCGM) does; we pass no callbacks into it.
        let lib = unsafe { Library::new(path) }
            .map_err(|_| NvmlError::NotInstalled(path.display().to_string()))?;
        let api = Api::load(&lib)?;
        // SAFETY: nvmlInit_v2 takes no arguments; Drop balances it with nvmlShutdown.
        check("nvmlInit_v2", unsafe { (api.init)() })?;
        Ok(Nvml { api, _lib: lib })
    }

    /// Every GPU NVML sees, with its UUID and name.
    pub fn list(&self) -> Result<Vec<NvmlGpu>, NvmlError> {
        self.devices()?
            .into_iter()
            .map(|dev| {
                Ok(NvmlGpu {
                    address: self.api.address(dev)?,
                    uuid: self.api.string("nvmlDeviceGetUUID", self.api.uuid, dev)?,
                    name: self.api.string("nvmlDeviceGetName", self.api.name, dev)?,
                })
            })
            .collect()
    }

    /// Each GPU's reading now. A GPU that cannot give one (utilisation is
    /// not supported in MIG mode; a GPU fallen off the bus) is left out and
    /// the others are read; an error here is NVML's own (the driver).
    pub fn sample(&self) -> Result<Vec<GpuSample>, NvmlError> {
        Ok(self
            .devices()?
            .into_iter()
            .filter_map(|dev| self.read(dev).ok())
            .collect())
    }

    fn read(&self, dev: NvmlDevice) -> Result<GpuSample, NvmlError> {
        let mut u = NvmlUtilization::default();
        // SAFETY: `dev` came from NVML; `u` has the layout NVML writes.
        check("nvmlDeviceGetUtilizationRates", unsafe {
            (self.api.utilization)(dev, &mut u)
        })?;
        let mut m = NvmlMemory::default();
        // SAFETY: as above, for nvmlMemory_t.
        check("nvmlDeviceGetMemoryInfo", unsafe {
            (self.api.memory)(dev, &mut m)
        })?;
        let mut temperature: c_uint = 0;
        // SAFETY: as above; the sensor is NVML_TEMPERATURE_GPU (0).
        let temperature = check("nvmlDeviceGetTemperature", unsafe {
            (self.api.temperature)(dev, TEMPERATURE_GPU, &mut temperature)
        })
        .ok()
        .map(|_| temperature);
        let mut power: c_uint = 0;
        // SAFETY: as above.
        let power = check("nvmlDeviceGetPowerUsage", unsafe {
            (self.api.power)(dev, &mut power)
        })
        .ok()
        .map(|_| power);
        let ecc = |kind: c_int| {
            let mut n: u64 = 0;
            // SAFETY: as above; `kind` is an nvmlMemoryErrorType_t, the counter volatile.
            check("nvmlDeviceGetTotalEccErrors", unsafe {
                (self.api.ecc)(dev, kind, ECC_VOLATILE, &mut n)
            })
            .ok()
            .map(|_| n)
        };
        Ok(GpuSample {
            address: self.api.address(dev)?,
            utilisation_percent: u.gpu.min(100),
            memory_used_bytes: m.used,
            temperature_celsius: temperature,
            power_milliwatts: power,
            ecc_corrected: ecc(ECC_CORRECTED),
            ecc_uncorrected: ecc(ECC_UNCORRECTED),
        })
    }

    fn devices(&self) -> Result<Vec<NvmlDevice>, NvmlError> {
        let mut count: c_uint = 0;
        // SAFETY: NVML is initialised; `count` is a valid out pointer.
        check("nvmlDeviceGetCount_v2", unsafe {
            (self.api.count)(&mut count)
        })?;
        (0..count)
            .map(|index| {
                let mut dev: NvmlDevice = std::ptr::null_mut();
                // SAFETY: index < count; `dev` is a valid out pointer.
                check("nvmlDeviceGetHandleByIndex_v2", unsafe {
                    (self.api.handle)(index, &mut dev)
                })?;
                Ok(dev)
            })
            .collect()
    }
}

impl Drop for Nvml {
    fn drop(&mut self) {
        // SAFETY: `open` initialised NVML; this releases that reference.
        unsafe { (self.api.shutdown)() };
    }
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

type StringFn = unsafe extern "C" fn(NvmlDevice, *mut c_char, c_uint) -> c_int;

/// The NVML entry points we call, copied out of the library (valid while it is loaded).
struct Api {
    init: unsafe extern "C" fn() -> c_int,
    shutdown: unsafe extern "C" fn() -> c_int,
    count: unsafe extern "C" fn(*mut c_uint) -> c_int,
    handle: unsafe extern "C" fn(c_uint, *mut NvmlDevice) -> c_int,
    uuid: StringFn,
    name: StringFn,
    pci: unsafe extern "C" fn(NvmlDevice, *mut NvmlPciInfo) -> c_int,
    utilization: unsafe extern "C" fn(NvmlDevice, *mut NvmlUtilization) -> c_int,
    memory: unsafe extern "C" fn(NvmlDevice, *mut NvmlMemory) -> c_int,
    temperature: unsafe extern "C" fn(NvmlDevice, c_int, *mut c_uint) -> c_int,
    power: unsafe extern "C" fn(NvmlDevice, *mut c_uint) -> c_int,
    ecc: unsafe extern "C" fn(NvmlDevice, c_int, c_int, *mut u64) -> c_int,
}

impl Api {
    fn load(lib: &Library) -> Result<Self, NvmlError> {
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: each field's type is the declaration in nvml.h of the symbol it names.
                unsafe { symbol(lib, $name)? }
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
            utilization: sym!("nvmlDeviceGetUtilizationRates"),
            memory: sym!("nvmlDeviceGetMemoryInfo"),
            temperature: sym!("nvmlDeviceGetTemperature"),
            power: sym!("nvmlDeviceGetPowerUsage"),
            ecc: sym!("nvmlDeviceGetTotalEccErrors"),
        })
    }

    fn address(&self, dev: NvmlDevice) -> Result<PciAddress, NvmlError> {
        // SAFETY: all-zero is a valid value of this plain C struct.
        let mut info: NvmlPciInfo = unsafe { std::mem::zeroed() };
        // SAFETY: `dev` came from NVML; `info` has the layout NVML writes.
        check("nvmlDeviceGetPciInfo_v3", unsafe {
            (self.pci)(dev, &mut info)
        })?;
        bus_id_to_address(&info.bus_id)
    }

    fn string(
        &self,
        call: &'static str,
        f: StringFn,
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

/// The entry point `name`, copied out of `lib`.
///
/// # Safety
/// `T` must be the type nvml.h declares for `name`.
unsafe fn symbol<T: Copy>(lib: &Library, name: &'static str) -> Result<T, NvmlError> {
    let bytes = format!("{name}\0");
    // SAFETY: the caller vouches for `T`.
    unsafe { lib.get::<T>(bytes.as_bytes()) }
        .map(|s| *s)
        .map_err(|e| NvmlError::Symbol(name, e))
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

    /// The fake NVML the integration tests use, compiled here: the same
    /// symbols and layouts as the real library's.
    fn fake(state: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state"), state).unwrap();
        let lib = dir.path().join("libfake-nvml.so");
        let o = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&lib)
            .arg(format!(
                "-DSTATE_FILE=\"{}\"",
                dir.path().join("state").display()
            ))
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/fake_nvml.c"
            ))
            .output()
            .expect("cc (build-essential)");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (dir, lib)
    }

    #[test]
    fn gpus_and_their_readings_come_through_the_nvml_calls() {
        let (dir, lib) =
            fake("00000000:3B:00.0 GPU-aaaa H100 37 1073741824\n0000:65:00.0 GPU-bbbb H100 0 0\n");
        let nvml = Nvml::open(&lib).unwrap();
        let list = nvml.list().unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].address.to_string(), "0000:3b:00.0");
        assert_eq!(
            (list[0].uuid.as_str(), list[0].name.as_str()),
            ("GPU-aaaa", "H100")
        );
        let s = nvml.sample().unwrap();
        assert_eq!(
            (s[0].utilisation_percent, s[0].memory_used_bytes),
            (37, 1 << 30)
        );
        assert_eq!(
            (s[0].temperature_celsius, s[0].power_milliwatts),
            (Some(40), Some(75_000))
        );
        // The fake's first GPU counts ECC errors; the second cannot.
        assert_eq!(
            (s[0].ecc_corrected, s[0].ecc_uncorrected),
            (Some(2), Some(0))
        );
        assert_eq!(s[1].ecc_corrected, None, "not supported: absent");
        assert_eq!(s[1].address.to_string(), "0000:65:00.0");
        // A GPU that cannot say (MIG mode) is left out; the other is read.
        std::fs::write(
            dir.path().join("state"),
            "0000:3b:00.0 GPU-aaaa H100 999 0\n0000:65:00.0 GPU-bbbb H100 5 0\n",
        )
        .unwrap();
        let s = nvml.sample().unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].address.to_string(), "0000:65:00.0");
        // The readings are taken anew each time.
        std::fs::write(
            dir.path().join("state"),
            "0000:3b:00.0 GPU-aaaa H100 250 0\n",
        )
        .unwrap();
        let s = nvml.sample().unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].utilisation_percent, 100, "clamped to a percent");
        assert!(matches!(
            Nvml::open(&dir.path().join("absent.so")),
            Err(NvmlError::NotInstalled(_))
        ));
    }

    #[test]
    fn absent_library_is_reported_as_not_installed() {
        // This machine has no NVIDIA driver; where it has one, query must succeed.
        match query() {
            Err(NvmlError::NotInstalled(_)) => {}
            Ok(list) => assert!(list.iter().all(|g| g.uuid.starts_with("GPU-"))),
            Err(e) => panic!("unexpected NVML error: {e}"),
        }
    }
}

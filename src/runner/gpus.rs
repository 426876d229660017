//! The GPUs of an instance: the ledger's PCI addresses, claimed in the
//! node's GPU ledger (never a GPU on vfio-pci), resolved to CDI devices (by
//! UUID, else by PCI address; a spec generated from the NVIDIA driver when
//! no spec names them), applied to the runtime spec, and told to the
//! workload (`CUDA_VISIBLE_DEVICES`, `NVIDIA_VISIBLE_DEVICES`, `GPU_COUNT`,
//! `RIVERNODE_GPUS`), all in the ledger's order.

use std::collections::BTreeMap;
use std::path::PathBuf;

use oci_spec::runtime::Spec;

use super::lifecycle::Observed;
use crate::oci::cdi::nvidia::{self, DriverGpu, NvidiaRoots};
use crate::oci::cdi::{CdiError, DeviceNodes, Registry};
use crate::topology::PciAddress;
use crate::vfio::{GroupBinding, Vfio, VfioError};

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(transparent)]
    Cdi(#[from] CdiError),
    #[error(transparent)]
    Ledger(#[from] VfioError),
    #[error("no CDI spec names this node's GPUs, and the NVIDIA driver's {missing} is not in {dirs}: install the driver's user-space libraries, or put a CDI spec in /etc/cdi")]
    DriverLibraries { missing: String, dirs: String },
    #[error("GPU {gpu} is named {names} in more than one CDI spec; keep one")]
    Ambiguous { gpu: PciAddress, names: String },
    #[error("no CDI spec in {dirs} names GPU {gpu}{uuid}{problems}: run `nvidia-ctk cdi generate --device-name-strategy=uuid --output=/etc/cdi/nvidia.yaml`, or write a spec whose device is named by the GPU's UUID or PCI address")]
    Unnamed {
        gpu: PciAddress,
        uuid: String,
        dirs: String,
        problems: String,
    },
}

/// One GPU as it reaches the instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub address: PciAddress,
    pub uuid: Option<String>,
    /// The qualified CDI device, `kind=name`.
    pub cdi: String,
}

/// A GPU and the CDI device that names it, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub address: PciAddress,
    pub uuid: Option<String>,
    pub cdi: Option<String>,
}

/// Finds each GPU's CDI device: the one named by its UUID, else by its PCI
/// address; `cdi: None` for a GPU no spec names.
pub fn resolve(
    gpus: &[PciAddress],
    driver: &[DriverGpu],
    registry: &Registry,
) -> Result<Vec<Resolved>, GpuError> {
    let mut out = Vec::new();
    for &gpu in gpus {
        let uuid = driver
            .iter()
            .find(|d| d.address == gpu)
            .map(|d| d.uuid.clone());
        let mut found = uuid
            .as_deref()
            .map(|u| registry.named(u))
            .unwrap_or_default();
        if found.is_empty() {
            found = registry.named(&gpu.to_string());
        }
        if found.len() > 1 {
            return Err(GpuError::Ambiguous {
                gpu,
                names: found.join(" and "),
            });
        }
        out.push(Resolved {
            address: gpu,
            uuid,
            cdi: found.pop(),
        });
    }
    Ok(out)
}

/// The variables a workload reads to find its GPUs. CUDA and NVIDIA's tools
/// take UUIDs (an index would depend on enumeration order); a GPU without
/// one is named by its PCI address.
pub fn env(grants: &[Grant]) -> BTreeMap<String, String> {
    let ids: Vec<String> = grants
        .iter()
        .map(|g| g.uuid.clone().unwrap_or_else(|| g.address.to_string()))
        .collect();
    let mut env = BTreeMap::from([("GPU_COUNT".to_string(), grants.len().to_string())]);
    if !grants.is_empty() {
        env.insert("CUDA_VISIBLE_DEVICES".into(), ids.join(","));
        env.insert("NVIDIA_VISIBLE_DEVICES".into(), ids.join(","));
        env.insert(
            "RIVERNODE_GPUS".into(),
            grants
                .iter()
                .map(|g| g.address.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
    } else {
        // An image built for nvidia-container-runtime must not think it has all.
        env.insert("NVIDIA_VISIBLE_DEVICES".into(), "void".into());
    }
    env
}

/// After a runner restart: whether an instance's GPU claim stays, from what
/// its container shows (`None`: cannot tell). Only an instance with a live
/// process (or one created, about to start) holds its GPUs; not knowing is
/// not gone.
pub fn claim_survives(observed: Option<Observed>) -> bool {
    match observed {
        Some(Observed::Running | Observed::Paused | Observed::Created) | None => true,
        Some(Observed::Absent | Observed::Kept | Observed::Exited(_)) => false,
    }
}

/// The PCI functions a VM is handed for `gpus`: every function bound with
/// their IOMMU groups, each GPU first and then the rest of its group (its
/// audio function), GPUs in the ledger's order, none twice.
pub fn hostdevs(gpus: &[PciAddress], bound: &[GroupBinding]) -> Vec<PciAddress> {
    let mut out: Vec<PciAddress> = Vec::new();
    for &gpu in gpus {
        let group = bound
            .iter()
            .find(|b| b.members.iter().any(|m| m.address == gpu));
        let members = group
            .into_iter()
            .flat_map(|b| b.members.iter().map(|m| m.address));
        for a in std::iter::once(gpu).chain(members) {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

/// The instances VFIO bindings are held for (an admin's are not one), each once.
pub fn vm_owners(bindings: &[GroupBinding]) -> std::collections::BTreeSet<u64> {
    bindings
        .iter()
        .filter_map(|b| NodeGpus::holder_task(&b.owner))
        .collect()
}

/// At a runner's start: whether a VFIO binding stays for now. An admin's
/// (`rivernode gpu bind`) does, and an instance's until its state can be
/// read (a VM outlives its runner with its GPUs; `claim_survives` judges
/// it then). Anything else is an orphan.
pub fn binding_survives_startup(owner: &str) -> bool {
    owner == crate::vfio::ADMIN_OWNER || NodeGpus::holder_task(owner).is_some()
}

/// The node's GPU plumbing, from the runner settings.
pub struct NodeGpus {
    pub cdi_dirs: Vec<PathBuf>,
    pub nvidia: NvidiaRoots,
    pub ledger: Vfio,
}

impl NodeGpus {
    /// The instance's holder name in the ledger.
    pub fn holder(id: u64) -> String {
        format!("task {id}")
    }

    /// The task a holder name stands for, if it is one.
    pub fn holder_task(holder: &str) -> Option<u64> {
        holder.strip_prefix("task ")?.parse().ok()
    }

    /// Applies the CDI devices of `gpus` (claimed already) to `spec`, with
    /// the grants that tell the workload; on error `spec` is unchanged.
    pub fn apply(
        &self,
        gpus: &[PciAddress],
        spec: &mut Spec,
        nodes: &dyn DeviceNodes,
    ) -> Result<Vec<Grant>, GpuError> {
        if gpus.is_empty() {
            return Ok(Vec::new());
        }
        let driver = nvidia::driver_gpus(&self.nvidia.driver);
        let mut registry = Registry::load(&self.cdi_dirs)?;
        let mut found = resolve(gpus, &driver, &registry)?;
        if found.iter().any(|r| r.cdi.is_none()) {
            if let Some(node) = nvidia::discover(&self.nvidia) {
                let missing = nvidia::missing_essentials(&node);
                if !missing.is_empty() {
                    return Err(GpuError::DriverLibraries {
                        missing: missing.join(", "),
                        dirs: self
                            .nvidia
                            .lib_dirs
                            .iter()
                            .map(|d| d.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                    });
                }
                let origin = self.nvidia.driver.join("(generated)");
                registry.add_generated(origin, nvidia::generate(&node))?;
                found = resolve(gpus, &driver, &registry)?;
            }
        }
        let mut grants = Vec::new();
        for Resolved { address, uuid, cdi } in found {
            let Some(cdi) = cdi else {
                return Err(GpuError::Unnamed {
                    gpu: address,
                    uuid: uuid.map(|u| format!(" ({u})")).unwrap_or_default(),
                    dirs: registry.dirs(),
                    problems: registry.problems_text(),
                });
            };
            grants.push(Grant { address, uuid, cdi });
        }
        let names: Vec<String> = grants.iter().map(|g| g.cdi.clone()).collect();
        registry.apply(spec, &names, nodes)?;
        Ok(grants)
    }

    /// Moves VM `id`'s GPUs, with their IOMMU groups, to vfio-pci; the
    /// functions to hand to the VM. Refused for a GPU a container holds.
    pub fn bind_for_vm(&self, gpus: &[PciAddress], id: u64) -> Result<Vec<PciAddress>, GpuError> {
        if gpus.is_empty() {
            return Ok(Vec::new());
        }
        let bound = self.ledger.bind(gpus, &Self::holder(id))?;
        Ok(hostdevs(gpus, &bound))
    }

    /// Gives VM `id`'s GPUs back to their host drivers (its QEMU is gone).
    pub fn restore_for_vm(&self, id: u64) -> Result<(), VfioError> {
        self.ledger.restore_owner(&Self::holder(id)).map(|_| ())
    }

    /// Gives back instance `id`'s GPUs.
    pub fn release(&self, id: u64) {
        if let Err(e) = self.ledger.release(&Self::holder(id)) {
            tracing::warn!(task = id, error = %crate::error_chain(&e), "cannot give back the GPU claim");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::cdi::{CdiDevice, CdiSpec};

    fn a(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    fn spec_naming(kind: &str, names: &[&str]) -> CdiSpec {
        CdiSpec {
            cdi_version: "0.5.0".into(),
            kind: kind.into(),
            devices: names
                .iter()
                .map(|n| CdiDevice {
                    name: n.to_string(),
                    ..CdiDevice::default()
                })
                .collect(),
            ..CdiSpec::default()
        }
    }

    #[test]
    fn gpus_resolve_by_uuid_then_by_address_in_ledger_order() {
        let driver = vec![DriverGpu {
            address: a("0000:17:00.0"),
            uuid: "GPU-aaaa".into(),
            minor: 0,
            model: None,
        }];
        let r = Registry::from_specs(vec![
            (
                "/etc/cdi/n.yaml".into(),
                spec_naming("nvidia.com/gpu", &["GPU-aaaa"]),
            ),
            (
                "/etc/cdi/o.yaml".into(),
                spec_naming("other.com/gpu", &["0000:65:00.0"]),
            ),
        ])
        .unwrap();
        let got = resolve(
            &[a("0000:65:00.0"), a("0000:17:00.0"), a("0000:99:00.0")],
            &driver,
            &r,
        )
        .unwrap();
        assert_eq!(
            got,
            vec![
                Resolved {
                    address: a("0000:65:00.0"),
                    uuid: None,
                    cdi: Some("other.com/gpu=0000:65:00.0".into())
                },
                Resolved {
                    address: a("0000:17:00.0"),
                    uuid: Some("GPU-aaaa".into()),
                    cdi: Some("nvidia.com/gpu=GPU-aaaa".into())
                },
                Resolved {
                    address: a("0000:99:00.0"),
                    uuid: None,
                    cdi: None
                },
            ]
        );
        // Two kinds naming one GPU: refused, not a guess.
        let r = Registry::from_specs(vec![
            (
                "/a.json".into(),
                spec_naming("nvidia.com/gpu", &["GPU-aaaa"]),
            ),
            ("/b.json".into(), spec_naming("test.com/gpu", &["GPU-aaaa"])),
        ])
        .unwrap();
        let e = resolve(&[a("0000:17:00.0")], &driver, &r)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nvidia.com/gpu=GPU-aaaa") && e.contains("test.com/gpu=GPU-aaaa"),
            "{e}"
        );
    }

    #[test]
    fn only_a_live_instance_keeps_its_claim_after_a_restart() {
        for (o, keep) in [
            (Some(Observed::Running), true),
            (Some(Observed::Paused), true),
            (Some(Observed::Created), true),
            (None, true),
            (Some(Observed::Exited(0)), false),
            (Some(Observed::Kept), false),
            (Some(Observed::Absent), false),
        ] {
            assert_eq!(claim_survives(o), keep, "{o:?}");
        }
        assert_eq!(NodeGpus::holder_task(&NodeGpus::holder(7)), Some(7));
        assert_eq!(NodeGpus::holder_task("vm 3"), None);
    }

    #[test]
    fn the_workload_is_told_its_gpus_by_uuid() {
        let grants = vec![
            Grant {
                address: a("0000:65:00.0"),
                uuid: Some("GPU-bbbb".into()),
                cdi: "x/y=GPU-bbbb".into(),
            },
            Grant {
                address: a("0000:17:00.0"),
                uuid: None,
                cdi: "x/y=0000:17:00.0".into(),
            },
        ];
        let e = env(&grants);
        assert_eq!(e["CUDA_VISIBLE_DEVICES"], "GPU-bbbb,0000:17:00.0");
        assert_eq!(e["NVIDIA_VISIBLE_DEVICES"], e["CUDA_VISIBLE_DEVICES"]);
        assert_eq!(e["GPU_COUNT"], "2");
        assert_eq!(e["RIVERNODE_GPUS"], "0000:65:00.0,0000:17:00.0");
        let none = env(&[]);
        assert_eq!(
            (
                none["GPU_COUNT"].as_str(),
                none["NVIDIA_VISIBLE_DEVICES"].as_str()
            ),
            ("0", "void")
        );
        assert!(!none.contains_key("CUDA_VISIBLE_DEVICES"));
    }

    fn binding(group: u32, owner: &str, members: &[&str]) -> GroupBinding {
        GroupBinding {
            group,
            owner: owner.into(),
            members: members
                .iter()
                .map(|m| crate::vfio::MemberRecord {
                    address: a(m),
                    original_driver: Some("nvidia".into()),
                })
                .collect(),
        }
    }

    #[test]
    fn a_vm_gets_each_gpu_then_the_rest_of_its_group_in_ledger_order() {
        let bound = [
            binding(101, "task 7", &["0000:41:00.1", "0000:41:00.0"]),
            binding(103, "task 7", &["0000:60:00.0"]),
        ];
        assert_eq!(
            hostdevs(&[a("0000:60:00.0"), a("0000:41:00.0")], &bound),
            [a("0000:60:00.0"), a("0000:41:00.0"), a("0000:41:00.1")]
        );
        // Two GPUs of one group: the group once.
        let both = [binding(101, "task 7", &["0000:41:00.0", "0000:41:00.1"])];
        assert_eq!(
            hostdevs(&[a("0000:41:00.1"), a("0000:41:00.0")], &both),
            [a("0000:41:00.1"), a("0000:41:00.0")]
        );
        assert!(hostdevs(&[], &bound).is_empty());
    }

    #[test]
    fn each_vm_holding_bindings_is_named_once_and_the_admins_are_not() {
        let b = [
            binding(101, "task 7", &["0000:41:00.0"]),
            binding(103, "task 7", &["0000:60:00.0"]),
            binding(104, "admin", &["0000:70:00.0"]),
            binding(105, "task 9", &["0000:80:00.0"]),
        ];
        assert_eq!(vm_owners(&b).into_iter().collect::<Vec<_>>(), [7, 9]);
    }

    #[test]
    fn an_instances_binding_waits_for_its_state_and_others_are_orphans() {
        assert!(binding_survives_startup("admin"));
        assert!(binding_survives_startup("task 7"));
        assert!(!binding_survives_startup("vm-1"));
        assert!(!binding_survives_startup("task x"));
    }
}

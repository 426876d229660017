//! `rivernode gpu list|check|bind|unbind`: node-local GPU passthrough admin.
//! Reads sysfs directly and binds through src/vfio; needs root for bind/unbind.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;

use crate::cli::args::{GpuCommand, GpuOpts, Output};
use crate::cli::output::{emit, emit_json, table};
use crate::topology::{self, Gpu, PciAddress};
use crate::vfio::{state_file, GroupBinding, RealSysfs, Vfio, VFIO_DRIVER};

/// Where the NVIDIA driver describes its GPUs.
const NVIDIA_DRIVER: &str = "/proc/driver/nvidia";

#[derive(Debug, Serialize)]
pub struct GpuEntry {
    #[serde(flatten)]
    pub gpu: Gpu,
    /// `host`, `vfio:<owner>` (bound by rivernode), `vfio:unmanaged`, or
    /// `task <id>` (a container holds it).
    pub assignment: String,
}

/// A GPU's state in words: in use by an instance, on vfio-pci (for whom),
/// or free on its host driver.
pub fn state_text(
    driver: Option<&str>,
    holder: Option<String>,
    vfio_owner: Option<&str>,
) -> String {
    match (holder, driver) {
        (Some(h), _) => format!("in use by {h}"),
        (None, Some(VFIO_DRIVER)) => match vfio_owner {
            Some(o) => format!("vfio-pci ({o})"),
            None => "vfio-pci".into(),
        },
        (None, Some(d)) => format!("free (host driver {d})"),
        (None, None) => "free (no driver)".into(),
    }
}

fn vfio(opts: &GpuOpts, data_dir: &Path) -> Vfio {
    Vfio::new(
        &opts.sys_root,
        &opts.dev_root,
        &state_file(data_dir),
        opts.timeout.0,
        Arc::new(RealSysfs),
    )
}

pub fn entries(
    sys: &Path,
    pci_ids: &Path,
    bindings: &[GroupBinding],
    claims: &BTreeMap<PciAddress, String>,
) -> anyhow::Result<Vec<GpuEntry>> {
    let mut warnings = Vec::new();
    let mut gpus = topology::scan_gpus(sys, &mut warnings)?;
    topology::lookup_names(pci_ids, &mut gpus);
    if sys == Path::new("/sys") && !gpus.is_empty() {
        if let Ok(list) = topology::nvml::query() {
            topology::nvml::attach_uuids(&mut gpus, &list);
        }
        for d in crate::oci::cdi::nvidia::driver_gpus(Path::new(NVIDIA_DRIVER)) {
            if let Some(g) = gpus.iter_mut().find(|g| g.address == d.address) {
                g.uuid.get_or_insert(d.uuid);
            }
        }
    }
    Ok(gpus
        .into_iter()
        .map(|gpu| {
            let owner = bindings
                .iter()
                .find(|b| b.members.iter().any(|m| m.address == gpu.address))
                .map(|b| b.owner.clone());
            let assignment = match (claims.get(&gpu.address), gpu.driver.as_deref(), owner) {
                (Some(holder), _, _) => holder.clone(),
                (None, Some(VFIO_DRIVER), Some(o)) => format!("vfio:{o}"),
                (None, Some(VFIO_DRIVER), None) => "vfio:unmanaged".into(),
                _ => "host".into(),
            };
            GpuEntry { gpu, assignment }
        })
        .collect())
}

/// The cells every GPU table shows: address, vendor:device, name, driver,
/// NUMA node, IOMMU group with the other members.
pub fn gpu_cells(g: &Gpu) -> [String; 6] {
    let members: Vec<String> = g
        .iommu_group_members
        .iter()
        .map(|f| f.address.to_string())
        .collect();
    [
        g.address.to_string(),
        format!("{:04x}:{:04x}", g.vendor_id, g.device_id),
        g.name.clone().unwrap_or_else(|| "-".into()),
        g.driver.clone().unwrap_or_else(|| "none".into()),
        g.numa_node
            .map(|n| n.to_string())
            .unwrap_or_else(|| "-".into()),
        match g.iommu_group {
            Some(id) if members.is_empty() => id.to_string(),
            Some(id) => format!("{id} (+{})", members.join(",")),
            None => "no IOMMU".into(),
        },
    ]
}

fn list_table(list: &[GpuEntry]) -> String {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|e| {
            let mut row = gpu_cells(&e.gpu).to_vec();
            row.insert(3, e.gpu.uuid.clone().unwrap_or_else(|| "-".into()));
            let (holder, owner) = match e.assignment.split_once(':') {
                Some(("vfio", o)) => (None, Some(o)),
                _ if e.assignment.starts_with("task ") => (Some(e.assignment.clone()), None),
                _ => (None, None),
            };
            row.push(state_text(e.gpu.driver.as_deref(), holder, owner));
            row
        })
        .collect();
    table(
        &[
            "ADDRESS",
            "ID",
            "NAME",
            "UUID",
            "DRIVER",
            "NUMA",
            "IOMMU GROUP",
            "STATE",
        ],
        &rows,
    )
}

/// A GPU named by index (its place in PCI-address order, as `gpu list`
/// shows them), PCI address, or UUID (`GPU-...`, from the NVIDIA driver's
/// files or NVML).
fn resolve(arg: &str, sys: &Path, driver_root: &Path) -> anyhow::Result<PciAddress> {
    if arg.starts_with("GPU-") {
        if let Some(d) = crate::oci::cdi::nvidia::driver_gpus(driver_root)
            .into_iter()
            .find(|g| g.uuid == arg)
        {
            return Ok(d.address);
        }
        let list = topology::nvml::query().with_context(|| format!("looking up {arg}"))?;
        return list
            .iter()
            .find(|g| g.uuid == arg)
            .map(|g| g.address)
            .with_context(|| format!("no GPU with UUID {arg} (`rivernode gpu list` shows them)"));
    }
    if let Ok(i) = arg.parse::<usize>() {
        let mut gpus = topology::scan_gpus(sys, &mut Vec::new())?;
        gpus.sort_by_key(|g| g.address);
        return gpus.get(i).map(|g| g.address).with_context(|| {
            format!(
                "no GPU {i}: this node has {} (`rivernode gpu list` shows them)",
                gpus.len()
            )
        });
    }
    arg.parse::<PciAddress>()
        .map_err(|e| anyhow::anyhow!("{e}; or give a GPU index or UUID (GPU-...)"))
}

pub fn run(cmd: GpuCommand, output: Output, data_dir: &Path) -> anyhow::Result<()> {
    match cmd {
        GpuCommand::List(opts) => {
            let v = vfio(&opts, data_dir);
            let list = entries(
                &opts.sys_root,
                Path::new("/usr/share/misc/pci.ids"),
                &v.bindings()?,
                &v.claims()?,
            )?;
            match output {
                Output::Json => emit_json(&list),
                Output::Table if list.is_empty() => emit("no GPUs on this node\n"),
                Output::Table => emit(&list_table(&list)),
            }
        }
        GpuCommand::CdiSpec { driver_root, opts } => {
            let roots = crate::oci::cdi::nvidia::NvidiaRoots {
                driver: driver_root.clone(),
                dev: opts.dev_root.clone(),
                ..Default::default()
            };
            let node = crate::oci::cdi::nvidia::discover(&roots).with_context(|| {
                format!(
                    "no NVIDIA GPUs here: {} lists none (is the nvidia driver loaded?)",
                    driver_root.join("gpus").display()
                )
            })?;
            let spec = crate::oci::cdi::nvidia::generate(&node);
            match output {
                Output::Json => emit_json(&spec),
                Output::Table => emit(&serde_yaml_ng::to_string(&spec)?),
            }
        }
        GpuCommand::Check(opts) => {
            let v = vfio(&opts, data_dir);
            let status = v.status();
            let list = entries(
                &opts.sys_root,
                Path::new("/usr/share/misc/pci.ids"),
                &v.bindings()?,
                &v.claims()?,
            )?;
            let verdicts: Vec<serde_json::Value> = list
                .iter()
                .map(|e| match v.plan(&[e.gpu.address], "check") {
                    Ok(plans) => serde_json::json!({
                        "address": e.gpu.address,
                        "viable": true,
                        "binds": plans.iter().flat_map(|p| p.bind.clone()).collect::<Vec<_>>(),
                    }),
                    Err(err) => serde_json::json!({"address": e.gpu.address, "viable": false, "reason": err.to_string()}),
                })
                .collect();
            match output {
                Output::Json => emit_json(&serde_json::json!({"status": status, "gpus": verdicts})),
                Output::Table => {
                    let yes = |b: bool| if b { "yes" } else { "no" };
                    let mut out = format!(
                        "IOMMU:     {} ({} groups)\nvfio-pci:  {}\n/dev/vfio: {}\n",
                        if status.iommu_groups > 0 {
                            "on"
                        } else {
                            "off (enable VT-d/AMD-Vi and boot with intel_iommu=on)"
                        },
                        status.iommu_groups,
                        if status.vfio_pci_loaded {
                            "loaded"
                        } else {
                            "not loaded (modprobe vfio-pci)"
                        },
                        yes(status.dev_vfio),
                    );
                    for j in &verdicts {
                        let line = if j["viable"] == true {
                            format!(
                                "{}: viable, binds {}\n",
                                j["address"].as_str().unwrap_or("?"),
                                j["binds"]
                            )
                        } else {
                            format!(
                                "{}: not viable: {}\n",
                                j["address"].as_str().unwrap_or("?"),
                                j["reason"].as_str().unwrap_or("?")
                            )
                        };
                        out.push_str(&line);
                    }
                    emit(&out);
                }
            }
        }
        GpuCommand::Bind {
            devices,
            owner,
            opts,
        } => {
            let addrs = devices
                .iter()
                .map(|d| resolve(d, &opts.sys_root, Path::new(NVIDIA_DRIVER)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let bound = vfio(&opts, data_dir).bind(&addrs, &owner)?;
            match output {
                Output::Json => emit_json(&bound),
                Output::Table => {
                    for b in &bound {
                        let m: Vec<String> =
                            b.members.iter().map(|m| m.address.to_string()).collect();
                        emit(&format!(
                            "IOMMU group {} bound to vfio-pci for {}: {}\n",
                            b.group,
                            b.owner,
                            m.join(", ")
                        ));
                    }
                }
            }
        }
        GpuCommand::Unbind {
            device,
            force,
            opts,
        } => {
            let a = resolve(&device, &opts.sys_root, Path::new(NVIDIA_DRIVER))?;
            vfio(&opts, data_dir).unbind(a, force)?;
            if output == Output::Table {
                emit(&format!(
                    "{a} and its IOMMU group are back on their host drivers\n"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::fake::FakeMachine;

    #[test]
    fn lists_gpus_with_numa_group_and_assignment() {
        let m = FakeMachine::two_socket_four_gpus();
        let claims = BTreeMap::from([("0000:18:00.0".parse().unwrap(), "task 7".to_string())]);
        let list = entries(&m.path("sys"), &m.path("pci.ids"), &[], &claims).unwrap();
        assert_eq!(list.len(), 4);
        assert_eq!(list[2].gpu.numa_node, Some(1));
        assert_eq!(list[0].gpu.iommu_group, Some(20));
        assert_eq!(list[0].assignment, "host");
        assert_eq!(list[3].assignment, "vfio:unmanaged");
        assert_eq!(list[1].assignment, "task 7");
        let t = list_table(&list);
        let row = |a: &str| t.lines().find(|l| l.starts_with(a)).unwrap().to_string();
        assert!(row("0000:cb:00.0").ends_with("vfio-pci (unmanaged)"), "{t}");
        assert!(row("0000:18:00.0").ends_with("in use by task 7"), "{t}");
        assert!(
            row("0000:17:00.0").ends_with("free (host driver nvidia)"),
            "{t}"
        );
        let j = serde_json::to_value(&list).unwrap();
        assert_eq!(j[2]["numa_node"], 1);
        assert_eq!(j[0]["iommu_group"], 20);
        assert_eq!(j[0]["address"], "0000:17:00.0");
    }

    #[test]
    fn resolve_names_the_problem() {
        let m = FakeMachine::two_socket_four_gpus();
        let (sys, drv) = (m.path("sys"), m.path("nvidia"));
        m.write(
            "nvidia/gpus/0000:ca:00.0/information",
            "GPU UUID: GPU-cafe\nDevice Minor: 2\n",
        );
        let r = |a: &str| resolve(a, &sys, &drv).map(|a| a.to_string());
        assert_eq!(r("0000:17:00.0").unwrap(), "0000:17:00.0");
        assert_eq!(
            r("1").unwrap(),
            "0000:18:00.0",
            "index in PCI-address order"
        );
        assert_eq!(r("GPU-cafe").unwrap(), "0000:ca:00.0");
        let e = r("9").unwrap_err().to_string();
        assert!(e.contains("no GPU 9") && e.contains("has 4"), "{e}");
        let e = resolve("seventeen", &sys, &drv).unwrap_err().to_string();
        assert!(e.contains("seventeen") && e.contains("GPU-"), "{e}");
    }
}

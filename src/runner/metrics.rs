//! The runner's `/metrics` (OpenMetrics text): each instance's CPU, memory,
//! pids and IO from its cgroup, each GPU's readings from NVML (the latest
//! heartbeat's), and whether containerd and libvirt answer. Labels carry
//! the node, the instance id and owner, the GPU's UUID and address: one
//! series per thing that exists, never per request.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::State;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::api::RunnerApiState;
use crate::topology::nvml::GpuSample;
use crate::topology::{Inventory, PciAddress};

/// What the runner knows of its node for /metrics, kept as it learns it.
#[derive(Default)]
pub struct NodeReadings {
    /// The latest GPU readings (the heartbeat's).
    pub gpus: Arc<Mutex<Vec<GpuSample>>>,
    /// The node's NVIDIA GPUs and their UUIDs (empty when unknown), from the inventory.
    nvidia: RwLock<Vec<(PciAddress, String)>>,
    /// Xid errors by the device the driver names (see `xid`).
    pub xids: super::xid::XidCounts,
    /// What is wrong with containerd (none: it answers), once the task loop runs.
    pub containerd_problem: Arc<Mutex<Option<String>>>,
    /// libvirt answered when the inventory was last read.
    libvirt: AtomicBool,
}

impl NodeReadings {
    /// Takes what /metrics needs from a fresh inventory.
    pub fn follow(&self, inv: &Inventory) {
        self.libvirt.store(inv.vms, Ordering::Relaxed);
        *self.nvidia.write().unwrap_or_else(|p| p.into_inner()) = inv
            .gpus
            .iter()
            .filter(|g| g.vendor_id == NVIDIA)
            .map(|g| (g.address, g.uuid.clone().unwrap_or_default()))
            .collect();
    }

    /// Whether the node has NVIDIA GPUs (whose Xids are worth counting).
    pub fn has_nvidia(&self) -> bool {
        !self
            .nvidia
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }
}

/// One instance, as its labels name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceLabel {
    pub id: u64,
    pub owner: Option<String>,
    pub kind: &'static str,
    pub usage: UsageSource,
}

/// Where an instance's usage is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsageSource {
    /// A container's cgroup, relative to the cgroup root.
    Cgroup(String),
    /// A VM's libvirt domain (its UUID): QEMU runs in libvirt's cgroup.
    Domain(String),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    node: String,
    instance: String,
    owner: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabels {
    node: String,
    gpu: String,
    address: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EccLabels {
    node: String,
    gpu: String,
    address: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    node: String,
    backend: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

const NVIDIA: u16 = 0x10de;

/// `GET /metrics` (the cluster's metrics token, or the host's).
pub async fn page(
    State(state): State<Arc<RunnerApiState>>,
    headers: axum::http::HeaderMap,
) -> Response {
    let node = state.name.clone();
    let usage = match state.tasks.get() {
        Some(t) => instance_usage(t).await,
        None => vec![],
    };

    let mut r = Registry::with_prefix("rivernode");
    let cpu = Family::<InstanceLabels, Counter<f64, AtomicU64>>::default();
    let memory = Family::<InstanceLabels, Gauge>::default();
    let pids = Family::<InstanceLabels, Gauge>::default();
    let io_read = Family::<InstanceLabels, Counter>::default();
    let io_write = Family::<InstanceLabels, Counter>::default();
    for (l, u) in &usage {
        let labels = InstanceLabels {
            node: node.clone(),
            instance: l.id.to_string(),
            owner: l.owner.clone().unwrap_or_else(|| "admin".into()),
            kind: l.kind.to_string(),
        };
        cpu.get_or_create(&labels).inc_by(u.cpu_seconds);
        memory.get_or_create(&labels).set(clamp(u.memory_bytes));
        if let Some(n) = u.pids {
            pids.get_or_create(&labels).set(clamp(n));
        }
        io_read.get_or_create(&labels).inc_by(u.io_read_bytes);
        io_write.get_or_create(&labels).inc_by(u.io_write_bytes);
    }
    r.register(
        "instance_cpu_seconds",
        "CPU time an instance used (a container's processes, a VM's QEMU)",
        cpu,
    );
    r.register(
        "instance_memory_bytes",
        "Memory an instance uses now (a container's cgroup's, page cache included; a VM's QEMU's resident set)",
        memory,
    );
    r.register(
        "instance_pids",
        "Processes and threads in a container instance",
        pids,
    );
    r.register(
        "instance_io_read_bytes",
        "Bytes an instance read from block devices (a VM's: from its disk)",
        io_read,
    );
    r.register(
        "instance_io_write_bytes",
        "Bytes an instance wrote to block devices (a VM's: to its disk)",
        io_write,
    );

    let readings = state
        .node
        .gpus
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let nvidia = state
        .node
        .nvidia
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let uuid_of = |a: &PciAddress| {
        nvidia
            .iter()
            .find(|(x, _)| x == a)
            .map(|(_, u)| u.clone())
            .unwrap_or_default()
    };
    let util = Family::<GpuLabels, Gauge>::default();
    let mem = Family::<GpuLabels, Gauge>::default();
    let temp = Family::<GpuLabels, Gauge>::default();
    let power = Family::<GpuLabels, FloatGauge>::default();
    let ecc = Family::<EccLabels, Counter>::default();
    for g in &readings {
        let labels = GpuLabels {
            node: node.clone(),
            gpu: uuid_of(&g.address),
            address: g.address.to_string(),
        };
        util.get_or_create(&labels)
            .set(i64::from(g.utilisation_percent));
        mem.get_or_create(&labels).set(clamp(g.memory_used_bytes));
        if let Some(t) = g.temperature_celsius {
            temp.get_or_create(&labels).set(i64::from(t));
        }
        if let Some(mw) = g.power_milliwatts {
            power.get_or_create(&labels).set(f64::from(mw) / 1000.0);
        }
        for (kind, n) in [
            ("corrected", g.ecc_corrected),
            ("uncorrected", g.ecc_uncorrected),
        ] {
            if let Some(n) = n {
                let l = EccLabels {
                    node: labels.node.clone(),
                    gpu: labels.gpu.clone(),
                    address: labels.address.clone(),
                    kind: kind.into(),
                };
                ecc.get_or_create(&l).inc_by(n);
            }
        }
    }
    r.register(
        "gpu_utilization_percent",
        "Share of the last sample period the GPU was busy (NVML)",
        util,
    );
    r.register("gpu_memory_used_bytes", "GPU memory in use (NVML)", mem);
    r.register(
        "gpu_temperature_celsius",
        "GPU die temperature (NVML)",
        temp,
    );
    r.register("gpu_power_watts", "GPU power draw (NVML)", power);
    r.register(
        "gpu_ecc_errors",
        "ECC errors since the driver loaded (NVML, volatile counters)",
        ecc,
    );
    let xid = Family::<GpuLabels, Counter>::default();
    let seen = state
        .node
        .xids
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for (address, uuid) in &nvidia {
        let a = address.to_string();
        let n: u64 = seen
            .iter()
            .filter(|(device, _)| super::xid::names(device, &a))
            .map(|(_, n)| n)
            .sum();
        xid.get_or_create(&GpuLabels {
            node: node.clone(),
            gpu: uuid.clone(),
            address: a,
        })
        .inc_by(n);
    }
    r.register(
        "gpu_xid_errors",
        "NVIDIA Xid errors the driver logged since the node booted (kernel log)",
        xid,
    );

    let up = Family::<BackendLabels, Gauge>::default();
    let containerd = state.tasks.get().is_some()
        && state
            .node
            .containerd_problem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none();
    let libvirt = state.node.libvirt.load(Ordering::Relaxed);
    for (backend, ok) in [("containerd", containerd), ("libvirt", libvirt)] {
        up.get_or_create(&BackendLabels {
            node: node.clone(),
            backend: backend.into(),
        })
        .set(i64::from(ok));
    }
    r.register(
        "backend_up",
        "Whether the node's containerd (and libvirt, for VMs) answers",
        up,
    );

    crate::api::openmetrics::page(&headers, &r)
}

/// Each assigned instance's usage: a container's from its cgroup files, a
/// VM's from libvirt (one connection for all). Both block: off the async
/// workers. An instance that is gone, or a libvirt that does not answer,
/// leaves out only those.
async fn instance_usage(
    tasks: &super::container::TaskContext,
) -> Vec<(InstanceLabel, crate::cgroup::InstanceUsage)> {
    let (cgroups, domains): (Vec<_>, Vec<_>) = tasks
        .instance_labels()
        .into_iter()
        .partition(|l| matches!(l.usage, UsageSource::Cgroup(_)));
    let root = tasks.cgroup_root.clone();
    let mut out = tokio::task::spawn_blocking(move || {
        cgroups
            .into_iter()
            .filter_map(|l| match &l.usage {
                UsageSource::Cgroup(rel) => {
                    crate::cgroup::instance_usage(&root, rel).map(|u| (l, u))
                }
                UsageSource::Domain(_) => None,
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    if !domains.is_empty() {
        let vms = tasks
            .libvirt(move |h| {
                Ok(domains
                    .into_iter()
                    .filter_map(|l| match &l.usage {
                        UsageSource::Domain(uuid) => match h.usage(uuid) {
                            Ok(u) => u.map(|u| (l, u)),
                            Err(e) => {
                                tracing::debug!(domain = %uuid, error = %crate::error_chain(&e), "no usage for /metrics");
                                None
                            }
                        },
                        UsageSource::Cgroup(_) => None,
                    })
                    .collect::<Vec<_>>())
            })
            .await;
        match vms {
            Ok(v) => out.extend(v),
            Err(e) => {
                tracing::debug!(error = %crate::error_chain(&e), "no VM usage for /metrics")
            }
        }
    }
    out
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

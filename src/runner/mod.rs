//! `rivernode runner`: registers the node with the host, heartbeats its
//! inventory and usage, serves the runner API to the host only, and runs
//! the instance lifecycle: the reconcile loop (`reconcile`), pure decisions
//! (`lifecycle`), one supervisor per instance (`supervisor`) acting through
//! a driver (`driver`; containerd in `container`), and the report queue
//! (`report`).

pub mod api;
pub mod container;
pub mod driver;
pub mod envfetch;
pub mod exec;
pub mod forward;
pub mod gpu_meter;
pub mod gpus;
pub mod instance_api;
pub mod lifecycle;
pub mod logdriver;
pub mod metrics;
pub mod progress;
pub mod reconcile;
pub mod report;
pub mod snapshots;
pub mod supervisor;
pub mod transfer;
pub mod vm;
mod vm_snapshots;
pub mod vps;
pub mod xid;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::token::hash as hash_token;
use crate::api::{node_name_from_hostname, HeartbeatRequest, RegisterRequest};
use crate::config::RunnerConfig;
use crate::topology::{self, Inventory, KernelRoots, TopologyError, UsageSampler};
use api::{HostKey, RunnerApiState};

/// The IPv4 addresses of the host in `url` (it connects to node ports
/// from one of them); none if it cannot be resolved now.
fn host_addresses(url: &str) -> Vec<std::net::Ipv4Addr> {
    use std::net::ToSocketAddrs;
    let authority = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split('/')
        .next()
        .unwrap_or_default();
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let mut out: Vec<std::net::Ipv4Addr> = with_port
        .to_socket_addrs()
        .map(|it| {
            it.filter_map(|a| match a.ip() {
                std::net::IpAddr::V4(v4) => Some(v4),
                std::net::IpAddr::V6(_) => None,
            })
            .collect()
        })
        .unwrap_or_default();
    out.sort();
    out.dedup();
    out
}

/// The runner's own subdirectory of the data directory.
pub const STATE_DIR: &str = "runner";
const CREDENTIAL_FILE: &str = "node.json";
/// The key this runner registers with (0600), saved before the first try.
const REGISTRATION_KEY_FILE: &str = "registration.key";
/// The inventory is read again every this many heartbeats (GPUs, CPUs and
/// memory can be hot-plugged, but rarely).
const INVENTORY_EVERY_BEATS: u32 = 12;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading the node inventory")]
    Topology(#[from] TopologyError),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("this node is not registered and has no join token: set join_token or join_token_file in runner.toml or RIVERNODE_JOIN_TOKEN (the host writes it to DATA_DIR/join.token)")]
    NoJoinToken,
    #[error("the host refused registration: {0}")]
    Refused(String),
    #[error("runner API server: {0}")]
    Serve(std::io::Error),
}

/// What the runner keeps after registering (0600, DATA_DIR/runner/node.json).
#[derive(Clone, Serialize, Deserialize)]
struct Credential {
    name: String,
    host_url: String,
    credential: String,
    host_token_hash: String,
    /// The instance subnet the host gave at registration (its overlay's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    instance_subnet: Option<String>,
}

pub struct BoundRunner {
    config: RunnerConfig,
    roots: KernelRoots,
    listener: TcpListener,
    api: Arc<RunnerApiState>,
    join_token: Option<String>,
    inventory: Inventory,
    pub runner_addr: SocketAddr,
}

impl BoundRunner {
    /// Reads the inventory and binds the runner API. `join_token` overrides the config's.
    pub async fn bind(
        config: RunnerConfig,
        join_token: Option<String>,
    ) -> Result<Self, RunnerError> {
        let dir = config.data_dir.join(STATE_DIR);
        crate::files::ensure_private_dir(&dir)
            .map_err(|source| RunnerError::Io { path: dir, source })?;
        let join_token = match join_token.or_else(|| config.join_token.clone()) {
            Some(t) => Some(t),
            None => match &config.join_token_file {
                Some(p) => Some(crate::api::token::read(p).ok_or_else(|| RunnerError::Io {
                    path: p.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "no token in this file",
                    ),
                })?),
                None => None,
            },
        };
        let roots = KernelRoots {
            sys: config.sys_root.clone(),
            proc: config.proc_root.clone(),
            ..KernelRoots::default()
        };
        restore_orphaned_gpus(&config).await;
        let inventory = collect_inventory(&roots, &config).await?;
        let name = config
            .name
            .clone()
            .unwrap_or_else(|| node_name_from_hostname(&inventory.hostname));
        let addr = SocketAddr::new(config.bind, config.runner_port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| RunnerError::Bind { addr, source })?;
        let runner_addr = listener.local_addr().map_err(RunnerError::Serve)?;
        let api = Arc::new(RunnerApiState {
            name,
            host_key: HostKey::default(),
            logs_dir: container::logs_dir(&config),
            tasks: Default::default(),
            metrics_keys: Default::default(),
            node: Default::default(),
            park_stopped_vps: Default::default(),
            grants: Default::default(),
        });
        api.node.follow(&inventory);
        Ok(Self {
            config,
            roots,
            listener,
            api,
            join_token,
            inventory,
            runner_addr,
        })
    }

    pub fn name(&self) -> &str {
        &self.api.name
    }

    /// Serves the runner API and keeps the node registered and heartbeating
    /// until `shutdown` resolves. Returns early only on errors that retrying
    /// cannot fix (a refused join token, a name taken by another node).
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), RunnerError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let mut server_stop = stop_rx.clone();
        let limits = crate::api::http::Limits {
            header_timeout: self.config.http_header_timeout.0,
            max_connections: self.config.http_max_connections,
            max_per_peer: usize::MAX,
        };
        let server = crate::api::http::serve(
            self.listener,
            api::router(self.api.clone()),
            limits,
            async move {
                let _ = server_stop.wait_for(|s| *s).await;
            },
        );
        tracing::info!(addr = %self.runner_addr, node = %self.api.name, "runner API listening");
        let server = tokio::spawn(server);
        let containerd_problem = self.api.node.containerd_problem.clone();
        let mut control = Control {
            http: reqwest::Client::builder()
                .user_agent(concat!("rivernode-runner/", env!("CARGO_PKG_VERSION")))
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| RunnerError::Serve(std::io::Error::other(e)))?,
            credential_path: self.config.data_dir.join(STATE_DIR).join(CREDENTIAL_FILE),
            runner_url: self.config.runner_url(self.runner_addr.port()),
            interval: self.config.heartbeat_interval.0,
            host_url: self.config.host_url.trim_end_matches('/').to_string(),
            join_token: self.join_token,
            api: self.api,
            roots: self.roots,
            inventory: self.inventory,
            stop: stop_rx,
            config: self.config,
            tasks: None,
            task_loop_problem: None,
            containerd_problem,
            connecting: None,
            overlay_problem: None,
        };
        if let Err(e) = control.run().await {
            server.abort();
            return Err(e);
        }
        server
            .await
            .map_err(|e| RunnerError::Serve(std::io::Error::other(e)))?
            .map_err(RunnerError::Serve)
    }
}

/// Asks containerd for its version every `every` (and at most
/// `CONTAINERD_PING` for an answer), recording what is wrong in `problem`.
async fn watch_containerd(
    ctd: crate::oci::Containerd,
    socket: PathBuf,
    every: Duration,
    problem: Arc<std::sync::Mutex<Option<String>>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let found = match tokio::time::timeout(CONTAINERD_PING, ctd.version()).await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!(
                "containerd at {} does not answer: {}",
                socket.display(),
                crate::error_chain(&e)
            )),
            Err(_) => Some(format!(
                "containerd at {} did not answer within {CONTAINERD_PING:?}",
                socket.display()
            )),
        };
        let changed = {
            let mut p = problem.lock().unwrap_or_else(|p| p.into_inner());
            let changed = *p != found;
            *p = found.clone();
            changed
        };
        if changed {
            match &found {
                Some(why) => tracing::warn!("node degraded: {why}"),
                None => tracing::info!("containerd answers again"),
            }
        }
        if tokio::time::timeout(every, stop.wait_for(|s| *s))
            .await
            .is_ok()
        {
            return;
        }
    }
}

/// Gives back to the host every GPU group a previous runner bound to
/// vfio-pci for something other than an admin or an instance; an
/// instance's bindings are judged once its state can be read (the
/// driver's `recover`: a VM outlives its runner with its GPUs).
async fn restore_orphaned_gpus(config: &RunnerConfig) {
    let vfio = crate::vfio::Vfio::new(
        &config.sys_root,
        &config.dev_root,
        &crate::vfio::state_file(&config.data_dir),
        Duration::from_secs(10),
        Arc::new(crate::vfio::RealSysfs),
    );
    match tokio::task::spawn_blocking(move || vfio.restore_orphans(gpus::binding_survives_startup))
        .await
    {
        Ok(Ok(groups)) if !groups.is_empty() => {
            tracing::info!(
                ?groups,
                "restored orphaned VFIO bindings to their host drivers"
            )
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %crate::error_chain(&e), "cannot read VFIO bindings"),
        Err(e) => {
            tracing::error!(error = %crate::error_chain(&e), "VFIO reconciliation task failed")
        }
    }
}

/// The TCP port a URL names, the scheme's default when it names none.
fn url_port(url: &str) -> Option<u16> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    match authority.rsplit_once(':') {
        Some((_, p)) if !p.contains(']') => p.parse().ok(),
        _ => match scheme {
            "https" => Some(443),
            "http" => Some(80),
            _ => None,
        },
    }
}

/// Re-reads the bound driver of each GPU (one readlink each); true when one changed.
fn refresh_gpu_drivers(sys: &std::path::Path, gpus: &mut [topology::Gpu]) -> bool {
    let mut changed = false;
    for g in gpus {
        let link = sys
            .join("bus/pci/devices")
            .join(g.address.to_string())
            .join("driver");
        let now = std::fs::read_link(link)
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()));
        if now != g.driver {
            g.driver = now;
            changed = true;
        }
    }
    changed
}

/// Whether a refused heartbeat means the host no longer knows this node
/// (register again): its credential refused, or the host's own "not
/// registered". A 404 of a proxy in front of a host that is starting is
/// not: the node keeps its credential (a join token may have expired since).
fn forgotten(status: reqwest::StatusCode, message: &str) -> bool {
    match status.as_u16() {
        401 => true,
        404 => message.contains("is not registered"),
        _ => false,
    }
}

/// Whether the host's 4xx to a registration is its last word. A bad join
/// token, a taken name or a bad request are: the operator must act. A 404,
/// 408 or 429 may come from a proxy in front of a host that is starting or
/// busy (F8d): the runner tries again rather than exit for good.
fn refusal_is_final(status: reqwest::StatusCode) -> bool {
    !matches!(status.as_u16(), 404 | 408 | 425 | 429)
}

/// Serves the in-instance API (`instance_api`) on `addr`. A node that
/// cannot (the port taken, or one instances may not reach) runs its
/// instances without it, and says so: they get neither its URL nor their
/// key in `VAST_*`, so nothing is sent to whatever else listens there.
fn serve_instance_api(
    addr: std::net::SocketAddrV4,
    protected: &[u16],
    node: &str,
    ctx: Arc<container::TaskContext>,
    host: Arc<crate::api::host_client::HostClient>,
    stop: watch::Receiver<bool>,
) {
    if protected.contains(&addr.port()) {
        tracing::error!(%addr, ?protected, "cannot serve the in-instance API: its port is one instances may not reach on this node (the runner's, the host's or the SSH proxy's); set instance_api_address to another");
        return;
    }
    let listener = match instance_api::listen(addr) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot serve the in-instance API: CONTAINER_API_KEY will not work on this node (instance_api_address)");
            return;
        }
    };
    let _ = ctx.instance_api_url.set(container::instance_api_url(addr));
    let state = Arc::new(instance_api::InstanceApi {
        node: node.to_string(),
        leases: Box::new(move || ctx.vps.network.ipam.leases()),
        host,
    });
    tracing::info!(%addr, "in-instance API listening");
    tokio::spawn(async move {
        if let Err(e) = instance_api::serve(listener, state, stop).await {
            tracing::error!(error = %e, "the in-instance API stopped");
        }
    });
}

/// The memory a node holds back for itself when its operator names none:
/// a twentieth, at least 1 GiB (the daemons' own need), at most a quarter
/// (small test machines still run instances).
pub fn default_reserved_memory(total: u64) -> u64 {
    (total / 20).max(1 << 30).min(total / 4)
}

async fn collect_inventory(
    roots: &KernelRoots,
    config: &RunnerConfig,
) -> Result<Inventory, TopologyError> {
    let roots = roots.clone();
    let nvidia_driver = config.nvidia_driver_root.clone();
    let libvirt_uri = config.libvirt_uri.clone();
    let reserved = config.reserved_memory;
    tokio::task::spawn_blocking(move || {
        let mut inv = topology::collect(&roots)?;
        inv.memory_reserved_bytes = match reserved {
            Some(r) => r.0.min(inv.memory_total_bytes),
            None => default_reserved_memory(inv.memory_total_bytes),
        };
        // VMs go only to nodes whose runner reaches libvirt (asked on each
        // read, so a libvirtd started later is found).
        inv.vms =
            !libvirt_uri.is_empty() && crate::kvm::libvirt::Hypervisor::open(&libvirt_uri).is_ok();
        // The driver's own files name each GPU's UUID, NVML or not.
        for d in crate::oci::cdi::nvidia::driver_gpus(&nvidia_driver) {
            if let Some(g) = inv.gpus.iter_mut().find(|g| g.address == d.address) {
                g.uuid.get_or_insert(d.uuid);
                if g.name.is_none() {
                    g.name = d.model;
                }
            }
        }
        // Only the real sysfs has GPUs NVML can know about.
        if !inv.gpus.is_empty() && roots.sys == std::path::Path::new("/sys") {
            match topology::nvml::query() {
                Ok(list) => topology::nvml::attach_uuids(&mut inv.gpus, &list),
                Err(topology::nvml::NvmlError::NotInstalled(_)) => {}
                Err(e) => inv.warnings.push(format!("NVML: {e}")),
            }
        }
        Ok(inv)
    })
    .await
    .map_err(|e| TopologyError::Read {
        path: PathBuf::from("(inventory task)"),
        source: std::io::Error::other(e),
    })?
}

/// Heartbeats failed in a row after which the runner's /metrics refuses
/// every token until the host is heard again.
const METRICS_KEYS_MISSED_BEATS: u32 = 3;

/// How long the per-beat check of containerd waits for its answer.
const CONTAINERD_PING: Duration = Duration::from_secs(5);

struct Control {
    http: reqwest::Client,
    credential_path: PathBuf,
    host_url: String,
    runner_url: String,
    interval: Duration,
    join_token: Option<String>,
    api: Arc<RunnerApiState>,
    roots: KernelRoots,
    inventory: Inventory,
    stop: watch::Receiver<bool>,
    config: RunnerConfig,
    /// The task loop's client of the host, once started (after the first registration).
    tasks: Option<Arc<crate::api::host_client::HostClient>>,
    /// Why the task loop could not start, while it cannot.
    task_loop_problem: Option<String>,
    /// What the watch of containerd last found wrong (none: it answers),
    /// once the task loop runs. Kept apart from the beat, so a containerd
    /// that hangs never delays a heartbeat.
    containerd_problem: Arc<std::sync::Mutex<Option<String>>>,
    /// The connection to containerd being made for the task loop. It runs
    /// beside the beat: a containerd that accepts the socket and never
    /// answers (stopped, swapping) must not stop the heartbeats that say so.
    connecting: Option<tokio::task::JoinHandle<Result<crate::oci::Containerd, String>>>,
    /// Why the overlay could not be built last time (none: it was, or none is run).
    overlay_problem: Option<String>,
}

enum Beat {
    Ok(crate::api::HeartbeatReply),
    /// The host no longer knows this credential: register again.
    Forgotten,
    Failed(String),
}

impl Control {
    async fn run(&mut self) -> Result<(), RunnerError> {
        if self.api.node.has_nvidia() {
            xid::watch(self.config.kmsg_path.clone(), self.api.node.xids.clone());
        }
        let mut sampler = UsageSampler::new(&self.roots.proc);
        let gpu_meter =
            gpu_meter::GpuMeter::new(self.config.nvml_library.clone(), self.api.node.gpus.clone());
        let mut backoff = Duration::from_millis(500);
        let mut beats: u32 = 0;
        let mut missed: u32 = 0;
        let mut send_inventory = true;
        let mut cred = self.load_credential();
        loop {
            if *self.stop.borrow() {
                return Ok(());
            }
            let c = match cred.clone() {
                Some(c) => c,
                None => match self.register().await {
                    Ok(c) => {
                        backoff = Duration::from_millis(500);
                        send_inventory = false;
                        cred = Some(c.clone());
                        c
                    }
                    Err(RegisterFailure::Fatal(e)) => return Err(e),
                    Err(RegisterFailure::Retry(msg)) => {
                        tracing::warn!(host = %self.host_url, retry_in = ?backoff, "registration failed: {msg}");
                        self.sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                },
            };
            self.api.host_key.set(Some(c.host_token_hash.clone()));
            self.ensure_task_loop(&c).await;
            if beats % INVENTORY_EVERY_BEATS == INVENTORY_EVERY_BEATS - 1 {
                match collect_inventory(&self.roots, &self.config).await {
                    Ok(inv) if inv != self.inventory => {
                        self.api.node.follow(&inv);
                        self.inventory = inv;
                        send_inventory = true;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %crate::error_chain(&e), "re-reading the inventory failed")
                    }
                }
            }
            // A GPU moved to or from vfio-pci (`gpu bind`): the scheduler
            // must know at once, so that it never places a container on it.
            if refresh_gpu_drivers(&self.roots.sys, &mut self.inventory.gpus) {
                send_inventory = true;
            }
            beats = beats.wrapping_add(1);
            let mut usage = match sampler.sample() {
                Ok(u) => u,
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "usage sample failed");
                    Default::default()
                }
            };
            usage.gpus = gpu_meter.sample(&self.inventory.gpus).await;
            let hb = HeartbeatRequest {
                runner_url: self.runner_url.clone(),
                heartbeat_interval_ms: self.interval.as_millis() as u64,
                version: env!("CARGO_PKG_VERSION").to_string(),
                usage,
                inventory: send_inventory.then(|| self.inventory.clone()),
                degraded: self.degraded(),
            };
            match self.heartbeat(&c, &hb).await {
                Beat::Ok(reply) => {
                    send_inventory = false;
                    missed = 0;
                    self.set_metrics_keys(reply.metrics_keys);
                    self.api
                        .park_stopped_vps
                        .store(reply.park_stopped_vps, std::sync::atomic::Ordering::Relaxed);
                    self.follow_overlay(reply.overlay.as_ref()).await;
                }
                Beat::Forgotten => {
                    tracing::warn!(node = %c.name, "the host no longer knows this node; registering again");
                    self.set_metrics_keys(vec![]);
                    let _ = std::fs::remove_file(&self.credential_path);
                    self.api.host_key.set(None);
                    cred = None;
                    continue;
                }
                Beat::Failed(msg) => {
                    tracing::warn!(host = %self.host_url, "heartbeat failed: {msg}");
                    send_inventory = true;
                    // Out of touch with the host, the node cannot know of a
                    // rotation: a rotated-out token must not go on working.
                    missed += 1;
                    if missed == METRICS_KEYS_MISSED_BEATS {
                        self.set_metrics_keys(vec![]);
                    }
                }
            }
            self.sleep(self.interval).await;
        }
    }

    /// Builds the overlay as the host last planned it (once the task loop
    /// runs: the mesh routes its instances), or takes it down when the host
    /// runs none (a device left by an earlier run goes too). A failure is
    /// logged when it changes, and tried again on the next beat.
    async fn follow_overlay(&mut self, plan: Option<&crate::api::OverlayPlan>) {
        let Some(ctx) = self.api.tasks.get() else {
            return;
        };
        let problem = ctx
            .vps
            .follow_overlay(plan)
            .await
            .err()
            .map(|e| crate::error_chain(&e));
        if problem != self.overlay_problem {
            match &problem {
                Some(why) => tracing::error!("the overlay cannot be built: {why}"),
                None => tracing::info!("the overlay is as the host plans it"),
            }
            self.overlay_problem = problem;
        }
    }

    /// The tokens that may read /metrics, as the host last said.
    fn set_metrics_keys(&self, keys: Vec<String>) {
        *self
            .api
            .metrics_keys
            .write()
            .unwrap_or_else(|p| p.into_inner()) = keys;
    }

    /// The task loop cannot start yet: the log says why once, the
    /// heartbeat on every beat (the node is degraded).
    fn task_loop_blocked(&mut self, why: String) {
        if self.task_loop_problem.as_deref() != Some(why.as_str()) {
            tracing::warn!("tasks cannot run yet: {why}");
        }
        self.task_loop_problem = Some(why);
    }

    /// Starts the task reconcile loop once containerd answers; later calls
    /// only refresh its credential.
    async fn ensure_task_loop(&mut self, c: &Credential) {
        if let Some(t) = &self.tasks {
            t.set_credential(&c.credential);
            return;
        }
        let socket = self.config.containerd_socket.clone();
        let snapshotter = self.config.snapshotter.clone();
        let attempt = self.connecting.get_or_insert_with(|| {
            tokio::spawn(async move {
                match tokio::time::timeout(
                    CONTAINERD_PING,
                    crate::oci::Containerd::connect(&socket, &snapshotter),
                )
                .await
                {
                    Ok(Ok(ctd)) => Ok(ctd),
                    Ok(Err(e)) => Err(crate::error_chain(&e)),
                    Err(_) => Err(format!(
                        "containerd at {} did not answer within {CONTAINERD_PING:?}",
                        socket.display()
                    )),
                }
            })
        });
        // A containerd that answers does so in milliseconds: wait that
        // long, so a fresh runner takes work on its first beat.
        let grace = (self.interval / 3).min(Duration::from_secs(1));
        let result = match tokio::time::timeout(grace, attempt).await {
            Ok(joined) => {
                self.connecting = None;
                joined.unwrap_or_else(|e| Err(format!("the containerd connect task failed: {e}")))
            }
            Err(_) => {
                if self.task_loop_problem.is_none() {
                    self.task_loop_problem = Some(format!(
                        "connecting to containerd at {}",
                        self.config.containerd_socket.display()
                    ));
                }
                return;
            }
        };
        let ctd = match result {
            Ok(ctd) => ctd,
            Err(why) => {
                self.task_loop_blocked(why);
                return;
            }
        };
        // Instances may not reach the runner's or the host's API through the node.
        // The ports as the URLs say them (an implicit 80 or 443 included) and
        // the port this runner listens on, which a proxy in front may hide (L10).
        // The host's SSH proxy too: instances are no client of the host.
        let proxy_port = match crate::api::host_client::HostClient::whoami(
            &self.http,
            &self.host_url,
            &c.credential,
        )
        .await
        {
            Ok(w) => Some(w.ssh_proxy_port).filter(|p| *p != 0),
            // Fail closed: without the port, instances could reach the proxy.
            Err(e) => {
                self.task_loop_blocked(format!(
                    "cannot learn the host's SSH proxy port, which instances must not reach: {}",
                    crate::error_chain(&e)
                ));
                return;
            }
        };
        // Other nodes' runners listen where this one does.
        let runner_ports: Vec<u16> = [url_port(&self.runner_url)]
            .into_iter()
            .flatten()
            .chain(Some(self.config.runner_port).filter(|p| *p != 0))
            .collect();
        let mut protected: Vec<u16> = runner_ports
            .iter()
            .copied()
            .chain(url_port(&self.host_url))
            .chain(proxy_port)
            .collect();
        protected.sort_unstable();
        protected.dedup();
        // Node ports answer the host's SSH proxy, from outside: no one else.
        let mut sources = host_addresses(&self.host_url);
        sources.extend(self.config.node_port_sources.iter().copied());
        if sources.is_empty() {
            tracing::warn!(host_url = %self.host_url, "cannot resolve the host's address: node ports work from this node only, and instances are kept from the host's API and SSH proxy on this node only (set node_port_sources)");
        }
        let vps = match vps::VpsKit::new(
            &self.config,
            protected.clone(),
            runner_ports,
            sources,
            c.instance_subnet.as_deref(),
        ) {
            Ok(v) => v,
            Err(e) => {
                self.task_loop_blocked(format!(
                    "instance networking settings are invalid: {}",
                    crate::error_chain(&e)
                ));
                return;
            }
        };
        // Test-only: crash-point tests make the runner die at a named step.
        let crash_at = std::env::var("RIVERNODE_CRASH_AT")
            .ok()
            .filter(|s| !s.is_empty());
        let gpus = gpus::NodeGpus {
            cdi_dirs: self.config.cdi_spec_dirs.clone(),
            nvidia: crate::oci::cdi::nvidia::NvidiaRoots {
                driver: self.config.nvidia_driver_root.clone(),
                dev: self.config.dev_root.clone(),
                ..Default::default()
            },
            ledger: crate::vfio::Vfio::new(
                &self.config.sys_root,
                &self.config.dev_root,
                &crate::vfio::state_file(&self.config.data_dir),
                Duration::from_secs(10),
                Arc::new(crate::vfio::RealSysfs),
            ),
        };
        let host = Arc::new(crate::api::host_client::HostClient::new(
            reqwest::Client::builder()
                .user_agent(concat!("rivernode-runner/", env!("CARGO_PKG_VERSION")))
                .build()
                .unwrap_or_else(|_| self.http.clone()),
            &self.host_url,
            &c.name,
            &c.credential,
        ));
        let ctx = Arc::new(container::TaskContext {
            node: c.name.clone(),
            gpus,
            config: self.config.clone(),
            ctd,
            vps,
            snapshot_locks: Default::default(),
            park_locks: Default::default(),
            cgroup_root: self.config.sys_root.join("fs/cgroup"),
            crash_at: crash_at.clone(),
            image_lock: Default::default(),
            node_cpus: self.inventory.cpus.iter().map(|c| c.id).collect(),
            shared_cpus: Default::default(),
            assigned: Default::default(),
            progress: Default::default(),
            prepared: Default::default(),
            instance_api_url: Default::default(),
            host: host.clone(),
            park: self.api.park_stopped_vps.clone(),
        });
        let sup = Arc::new(supervisor::Supervisors {
            driver: ctx.clone(),
            reports: report::Reports::start(host.clone(), self.stop.clone()),
            kill_grace: self.config.kill_grace.0,
            auto_snapshot_on_stop: self.config.auto_snapshot_on_stop,
            crash_at,
            host: Some(host.clone()),
        });
        tracing::info!(socket = %self.config.containerd_socket.display(), "containerd connected; task loop started");
        tokio::spawn(progress::pump(
            ctx.progress.clone(),
            host.clone(),
            self.stop.clone(),
        ));
        tokio::spawn(reconcile::Reconciler::new(sup, host.clone()).run(self.stop.clone()));
        tokio::spawn(watch_containerd(
            ctx.ctd.clone(),
            self.config.containerd_socket.clone(),
            self.interval,
            self.containerd_problem.clone(),
            self.stop.clone(),
        ));
        if let Some(addr) = self.config.instance_api() {
            serve_instance_api(
                addr,
                &protected,
                &c.name,
                ctx.clone(),
                host.clone(),
                self.stop.clone(),
            );
        }
        let _ = self.api.tasks.set(ctx);
        self.tasks = Some(host);
        self.task_loop_problem = None;
    }

    /// Why this node cannot start instances now, for the heartbeat: the
    /// task loop has not started, or containerd stopped answering since.
    fn degraded(&self) -> Option<String> {
        if self.api.tasks.get().is_none() {
            return Some(
                self.task_loop_problem
                    .clone()
                    .unwrap_or_else(|| "the task loop has not started".into()),
            );
        }
        self.containerd_problem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn sleep(&mut self, d: Duration) {
        let _ = tokio::time::timeout(d, self.stop.wait_for(|s| *s)).await;
    }

    fn load_credential(&self) -> Option<Credential> {
        let text = std::fs::read_to_string(&self.credential_path).ok()?;
        match serde_json::from_str::<Credential>(&text) {
            Ok(c) if c.host_url == self.host_url && c.name == self.api.name => Some(c),
            Ok(_) => {
                tracing::info!(
                    "stored credential is for another host URL or node name; registering again"
                );
                None
            }
            Err(e) => {
                tracing::warn!(path = %self.credential_path.display(), error = %crate::error_chain(&e), "unreadable credential; registering again");
                None
            }
        }
    }

    /// The registration key, made and saved (0600) before it is first sent:
    /// a retry after a lost answer then proves it is the same runner.
    fn registration_key(&self) -> Result<String, RunnerError> {
        let path = self.credential_path.with_file_name(REGISTRATION_KEY_FILE);
        if let Some(k) = crate::api::token::read(&path) {
            return Ok(k);
        }
        let key = crate::api::token::generate("rnreg");
        crate::files::write_secret(&path, key.as_bytes())
            .map_err(|source| RunnerError::Io { path, source })?;
        Ok(key)
    }

    async fn register(&self) -> Result<Credential, RegisterFailure> {
        let token = self
            .join_token
            .as_deref()
            .ok_or(RegisterFailure::Fatal(RunnerError::NoJoinToken))?;
        let registration_key = Some(self.registration_key().map_err(RegisterFailure::Fatal)?);
        let req = RegisterRequest {
            name: self.api.name.clone(),
            runner_url: self.runner_url.clone(),
            heartbeat_interval_ms: self.interval.as_millis() as u64,
            version: env!("CARGO_PKG_VERSION").to_string(),
            inventory: self.inventory.clone(),
            registration_key,
        };
        use crate::api::host_client::{HostCallError, HostClient};
        let r = match HostClient::register(&self.http, &self.host_url, token, &req).await {
            Ok(r) => r,
            Err(HostCallError::Refused { status, message }) if !refusal_is_final(status) => {
                return Err(RegisterFailure::Retry(format!("{status}: {message}")));
            }
            Err(HostCallError::Refused { status, message }) => {
                let hint = if status == reqwest::StatusCode::UNAUTHORIZED {
                    " (check the join token)"
                } else {
                    ""
                };
                return Err(RegisterFailure::Fatal(RunnerError::Refused(format!(
                    "{status}: {message}{hint}"
                ))));
            }
            Err(e) => return Err(RegisterFailure::Retry(crate::error_chain(&e))),
        };
        let cred = Credential {
            name: r.name,
            host_url: self.host_url.clone(),
            credential: r.credential,
            host_token_hash: hash_token(&r.host_token),
            instance_subnet: r.instance_subnet,
        };
        let json = serde_json::to_vec_pretty(&cred)
            .map_err(|e| RegisterFailure::Retry(crate::error_chain(&e)))?;
        crate::files::write_secret(&self.credential_path, &json).map_err(|source| {
            RegisterFailure::Fatal(RunnerError::Io {
                path: self.credential_path.clone(),
                source,
            })
        })?;
        tracing::info!(node = %cred.name, host = %self.host_url, "registered with the host");
        Ok(cred)
    }

    async fn heartbeat(&self, c: &Credential, hb: &HeartbeatRequest) -> Beat {
        use crate::api::host_client::{HostCallError, HostClient};
        match HostClient::heartbeat(&self.http, &self.host_url, &c.name, &c.credential, hb).await {
            Ok(reply) => Beat::Ok(reply),
            Err(HostCallError::Refused { status, message }) if forgotten(status, &message) => {
                Beat::Forgotten
            }
            Err(e) => Beat::Failed(crate::error_chain(&e)),
        }
    }
}

enum RegisterFailure {
    Retry(String),
    Fatal(RunnerError),
}

#[cfg(test)]
mod host_address_tests {
    #[test]
    fn the_hosts_address_comes_from_its_url() {
        assert_eq!(
            super::host_addresses("http://192.0.2.7:8000"),
            vec!["192.0.2.7".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        assert_eq!(
            super::host_addresses("http://127.0.0.1"),
            vec!["127.0.0.1".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        assert!(super::host_addresses("http://[::1]:8000").is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::fake::FakeMachine;

    #[test]
    fn only_the_hosts_own_word_forgets_a_node() {
        use reqwest::StatusCode as S;
        assert!(forgotten(S::UNAUTHORIZED, "invalid or revoked token"));
        assert!(forgotten(S::NOT_FOUND, "node \"n1\" is not registered"));
        assert!(!forgotten(S::NOT_FOUND, "<html>404 Not Found</html>"));
        assert!(!forgotten(S::TOO_MANY_REQUESTS, "slow down"));
    }

    #[test]
    fn only_a_hosts_own_refusals_end_registration() {
        use reqwest::StatusCode as S;
        for s in [S::BAD_REQUEST, S::UNAUTHORIZED, S::FORBIDDEN, S::CONFLICT] {
            assert!(refusal_is_final(s), "{s}");
        }
        for s in [S::NOT_FOUND, S::REQUEST_TIMEOUT, S::TOO_MANY_REQUESTS] {
            assert!(!refusal_is_final(s), "{s}");
        }
    }

    #[test]
    fn a_node_holds_back_memory_for_itself() {
        const G: u64 = 1 << 30;
        assert_eq!(
            default_reserved_memory(2 * G),
            G / 2,
            "a quarter of a small node"
        );
        assert_eq!(default_reserved_memory(8 * G), G, "at least 1 GiB");
        assert_eq!(default_reserved_memory(1024 * G), 1024 * G / 20);
    }

    #[test]
    fn ports_come_from_urls_with_their_schemes_defaults() {
        assert_eq!(url_port("http://head:8000/"), Some(8000));
        assert_eq!(url_port("https://head.lab/rivernode"), Some(443));
        assert_eq!(url_port("http://10.0.0.1"), Some(80));
        assert_eq!(url_port("http://[::1]:8001"), Some(8001));
        assert_eq!(url_port("http://[::1]"), Some(80));
        assert_eq!(url_port("head:8000"), None);
    }

    #[test]
    fn a_gpu_moved_to_vfio_is_seen_on_the_next_beat() {
        let m = FakeMachine::two_socket_four_gpus();
        let mut inv = topology::collect(&m.roots()).unwrap();
        let sys = m.path("sys");
        assert!(!refresh_gpu_drivers(&sys, &mut inv.gpus), "nothing moved");
        let link = sys.join("bus/pci/devices/0000:17:00.0/driver");
        std::fs::remove_file(&link).unwrap();
        let vfio = sys.join("bus/pci/drivers/vfio-pci");
        std::fs::create_dir_all(&vfio).unwrap();
        std::os::unix::fs::symlink(&vfio, &link).unwrap();
        assert!(refresh_gpu_drivers(&sys, &mut inv.gpus));
        assert_eq!(inv.gpus[0].driver.as_deref(), Some("vfio-pci"));
    }
}

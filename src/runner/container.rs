//! The containerd driver: instances as containers in the node's containerd,
//! found again by their labels (`io.rivernode.task`, `io.rivernode.kind`,
//! `io.rivernode.restore`), with a VPS's network and SSH server from `vps`
//! and its snapshots from `snapshots`.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::api::ports::PortRequest;
use crate::api::{Assignment, ImageSource, Kind};
use crate::config::RunnerConfig;
use crate::oci::{self, Containerd, MountInput, RuntimeSpecInput, TaskStatus, TASK_LABEL};
use crate::topology::CpuList;

use super::driver::{Driver, Found, InstanceError, Signal, Started, TeardownFailure};
use super::lifecycle::Observed;
use super::vps::{ImageSsh, SshLogin, VpsKit};

/// Container label: the restore request its disk was made for.
pub const RESTORE_LABEL: &str = "io.rivernode.restore";
/// Container label: `command` or `vps` (a VPS's container is its disk).
pub const KIND_LABEL: &str = "io.rivernode.kind";
/// Container label: the GPUs (PCI addresses, in order) whose devices the
/// container was made with; a restart must be placed on the same ones.
pub const GPUS_LABEL: &str = "io.rivernode.gpus";
/// When the host accepted the task a container was made for (`Assignment::submitted_at_unix_ms`).
pub const SUBMITTED_LABEL: &str = "io.rivernode.submitted-ms";
/// The signal a stop sends its main process: the image's StopSignal,
/// unless the main process is our SSH server (SIGTERM, which it handles).
pub const STOP_SIGNAL_LABEL: &str = "io.rivernode.stop-signal";
/// Container label: the boot id of the node when a command's task start
/// began. Found after a reboot, it means the work may have run.
pub const STARTED_BOOT_LABEL: &str = "io.rivernode.started-boot";

/// Where an image's own SSH server is looked for (Debian, Ubuntu, Fedora, Alpine).
const SSHD: &str = "/usr/sbin/sshd";

/// The node's containerd, networking and SSH kit: what the driver works with.
pub struct TaskContext {
    pub node: String,
    /// The node's GPU ledger and CDI specs.
    pub gpus: super::gpus::NodeGpus,
    pub config: RunnerConfig,
    pub ctd: Containerd,
    /// Networking and SSH for VPS instances.
    pub vps: VpsKit,
    pub snapshot_locks: super::snapshots::SnapshotLocks,
    /// One park of a VPS at a time (a stop's, and one after a snapshot of
    /// it stopped): two would share the host's list of what it lacks.
    pub park_locks: super::snapshots::SnapshotLocks,
    /// Where cgroupfs is mounted (for the OOM counters).
    pub cgroup_root: PathBuf,
    /// Test-only crash points (`RIVERNODE_CRASH_AT`).
    pub crash_at: Option<String>,
    /// One import or pull of an image at a time: containerd locks a content
    /// ref while it is written, and a second writer of the same layer fails.
    pub image_lock: tokio::sync::Mutex<()>,
    /// Every CPU of the node.
    pub node_cpus: CpuList,
    /// The node's unreserved CPUs, which instances on shared cores (`-c 0`)
    /// run on; recomputed on every pass of the reconciler.
    pub shared_cpus: std::sync::Mutex<CpuList>,
    /// The node's container instances as the host last assigned them, for /metrics.
    pub assigned: std::sync::Mutex<Vec<crate::runner::metrics::InstanceLabel>>,
    /// How far the making of each instance got, for the host.
    pub progress: Arc<super::progress::Board>,
    /// Images `prepare` fetched, for `create` to take.
    pub prepared: std::sync::Mutex<HashMap<u64, oci::ImportedImage>>,
    /// The in-instance API's URL, set once it listens: only then do
    /// instances get it (and their key offered to the `vastai` CLI).
    pub instance_api_url: std::sync::OnceLock<String>,
    /// The host, for environment archives this node's shared directory
    /// lacks, and parked VPS.
    pub host: Arc<crate::api::host_client::HostClient>,
    /// Park each stopped container VPS on the host (the host's
    /// `park_stopped_vps`, from its heartbeat replies).
    pub park: Arc<std::sync::atomic::AtomicBool>,
}

/// The `cpuset.cpus` file of cgroup `path`: in the unified hierarchy
/// (cgroup v2), else in v1's cpuset hierarchy; none while it does not exist.
/// The variables a template written for Vast.ai reads (its execution
/// environment's contract), each also as `RIVERNODE_<name>`: the instance's
/// id and label, the cluster's public address, the first SSH key, the GPU
/// count and the data directory (`/shared`, where the instance starts).
///
/// With a `CONTAINER_API_KEY` (a container VPS) and the node's in-instance
/// API (`api_url`), also `CONTAINER_API_URL`, and `VAST_URL` and
/// `VAST_API_KEY` unless the instance's own variables set them: the `vastai`
/// CLI reads those two, so `vastai stop instance $CONTAINER_ID` works as is.
pub fn contract_env(
    a: &Assignment,
    data_directory: Option<&str>,
    api_url: Option<&str>,
) -> BTreeMap<String, String> {
    let label = format!("C.{}", a.id);
    let vars = [
        ("CONTAINER_ID", Some(a.id.to_string())),
        ("VAST_CONTAINERLABEL", Some(label.clone())),
        ("PUBLIC_IPADDR", a.public_address.clone()),
        ("SSH_PUBLIC_KEY", a.spec.ssh_keys.first().cloned()),
        ("GPU_COUNT", Some(a.placement.gpus.len().to_string())),
        ("DATA_DIRECTORY", data_directory.map(str::to_string)),
    ];
    let mut env = BTreeMap::new();
    for (k, v) in vars {
        let Some(v) = v else { continue };
        let ours = match k {
            "VAST_CONTAINERLABEL" => "RIVERNODE_CONTAINERLABEL".to_string(),
            _ => format!("RIVERNODE_{k}"),
        };
        env.insert(ours, v.clone());
        env.insert(k.to_string(), v);
    }
    // Jupyter mode: where its server answers, as Vast.ai says it.
    let jupyter = a.placement.published.iter().find(|p| {
        p.request == crate::api::ports::JUPYTER_PORT && p.proto == crate::api::ports::Proto::Tcp
    });
    if let (true, Some(p), Some(host)) = (a.spec.jupyter, jupyter, &a.public_address) {
        let url = format!("http://{host}:{}/", p.external);
        env.insert("RIVERNODE_JUPYTER_SERVER_URL".into(), url.clone());
        env.insert("JUPYTER_SERVER_URL".into(), url);
    }
    let key = a.spec.env.get(crate::api::instance_key::KEY_VAR);
    if let (Some(key), Some(url)) = (key, api_url) {
        env.insert("RIVERNODE_CONTAINER_API_KEY".into(), key.clone());
        env.insert("CONTAINER_API_URL".into(), url.to_string());
        env.insert("RIVERNODE_CONTAINER_API_URL".into(), url.to_string());
        // Both or neither: an instance that names either keeps its own
        // pair (a real Vast.ai account), and our key never goes to Vast.ai
        // nor its key to us.
        let own = ["VAST_URL", "VAST_API_KEY"]
            .iter()
            .any(|k| a.spec.env.contains_key(*k));
        if !own {
            env.insert("VAST_URL".into(), url.to_string());
            env.insert("VAST_API_KEY".into(), key.clone());
        }
    }
    // Each published port's external port, named by the port asked for.
    for p in &a.placement.published {
        let name = p.variable();
        let ours = name.replacen("VAST_", "RIVERNODE_", 1);
        env.insert(ours, p.external.to_string());
        env.insert(name, p.external.to_string());
    }
    env
}

/// The in-instance API's URL as instances use it (`http://169.254.42.1:4280`).
pub fn instance_api_url(addr: std::net::SocketAddrV4) -> String {
    match addr.port() {
        80 => format!("http://{}", addr.ip()),
        port => format!("http://{}:{port}", addr.ip()),
    }
}

fn cpuset_file(cgroup_root: &std::path::Path, path: &str) -> Option<PathBuf> {
    let rel = path.trim_start_matches('/');
    [cgroup_root.join(rel), cgroup_root.join("cpuset").join(rel)]
        .into_iter()
        .map(|d| d.join("cpuset.cpus"))
        .find(|f| f.is_file())
}

/// The CPUs no live instance of `assigned` holds as its own: where the
/// instances on shared cores run. A stopped VPS holds none.
pub fn shared_pool(node_cpus: &CpuList, assigned: &[Assignment]) -> CpuList {
    let held: std::collections::BTreeSet<u32> = assigned
        .iter()
        .filter(|a| !a.state.is_final() && a.state != crate::api::TaskState::Stopped)
        .flat_map(|a| a.placement.cpus.iter())
        .collect();
    node_cpus.iter().filter(|c| !held.contains(c)).collect()
}

fn kind_label(k: Kind) -> &'static str {
    match k {
        Kind::Command => "command",
        Kind::Vps => "vps",
    }
}

fn observed(s: TaskStatus) -> Observed {
    match s {
        TaskStatus::Absent => Observed::Kept,
        TaskStatus::Created => Observed::Created,
        TaskStatus::Running => Observed::Running,
        TaskStatus::Paused => Observed::Paused,
        TaskStatus::Stopped { exit_code } => Observed::Exited(exit_code),
    }
}

impl TaskContext {
    pub fn logs_dir(&self) -> PathBuf {
        logs_dir(&self.config)
    }

    /// The container instances /metrics reports on.
    pub fn instance_labels(&self) -> Vec<crate::runner::metrics::InstanceLabel> {
        self.assigned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The node's name is part of the id: runc keeps container state in a
    /// machine-wide directory, and two clusters (or test runs) on one machine
    /// must not collide there.
    pub(crate) fn container_id(&self, id: u64) -> String {
        format!("{}-task-{id}", self.node)
    }

    fn cgroups_path(&self, id: u64) -> String {
        format!(
            "{}/{}",
            self.config.cgroup_parent.trim_end_matches('/'),
            self.container_id(id)
        )
    }

    fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> InstanceError + '_ {
        move |source| InstanceError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Instance `id`'s image, imported or pulled as needed; how far that
    /// got goes to the progress board.
    async fn image(
        &self,
        id: u64,
        source: &ImageSource,
    ) -> Result<oci::ImportedImage, InstanceError> {
        let progress = self.progress.sink(id, source.to_string());
        // Cleared however this ends, a kill's cancellation of the pull too.
        let _clear = super::progress::ClearOnDrop(&self.progress, id);
        self.image_with(id, source, &progress).await
    }

    /// The image of instance `id`, from `source`.
    async fn image_with(
        &self,
        id: u64,
        source: &ImageSource,
        progress: &oci::Progress,
    ) -> Result<oci::ImportedImage, InstanceError> {
        let scratch = self.config.data_dir.join(super::STATE_DIR).join("import");
        // Every import shares the content store's layers: one at a time.
        let _held = self.image_lock.lock().await;
        match source {
            ImageSource::Environment(name) => {
                let shared = self
                    .config
                    .shared_dir
                    .join("environments")
                    .join(format!("{name}.tar"));
                let image = format!("rivernode.local/env/{name}:latest");
                // Without the host's shared directory, the node fetches the
                // archive from the host (`envfetch`): an OCI layout blob by
                // blob (only the layers it lacks), any other whole, into a
                // copy of its own.
                let archive = if shared.is_file() {
                    shared
                } else if let Some(found) = self.env_by_blobs(name, &image, progress).await? {
                    return Ok(found);
                } else {
                    let cache = self.env_cache();
                    match super::envfetch::fetch(
                        &self.host,
                        &cache,
                        super::envfetch::Source::Environment(name),
                        progress,
                    )
                    .await
                    {
                        Ok(f) => f.path,
                        Err(super::envfetch::FetchError::Host {
                            source: crate::api::host_client::HostCallError::Refused { status, .. },
                            ..
                        }) if status == reqwest::StatusCode::NOT_FOUND => {
                            return Err(InstanceError::NoEnvironment {
                                name: name.clone(),
                                path: shared,
                                node: self.node.clone(),
                            })
                        }
                        Err(e) => return Err(e.into()),
                    }
                };
                std::fs::create_dir_all(&scratch).map_err(Self::io(&scratch))?;
                Ok(self
                    .ctd
                    .import_archive(&image, &archive, &scratch, progress)
                    .await?)
            }
            ImageSource::Snapshot { vps, snapshot } => {
                use super::snapshots::SnapshotError::NoSnapshot;
                match self.snapshot_image(*vps, snapshot).await {
                    // Not this node's: the host's parked copy, if it is that
                    // one; else from the node that keeps it.
                    Err(NoSnapshot { .. }) => {
                        // The host is asked without holding up other
                        // imports: a fetch takes the lock itself.
                        drop(_held);
                        match self.parked_image(*vps, snapshot, progress).await {
                            Err(InstanceError::Snapshot(NoSnapshot { .. })) => {
                                self.cloned_image(id, (*vps, snapshot), progress).await
                            }
                            other => other,
                        }
                    }
                    other => Ok(other?),
                }
            }
            ImageSource::VmImage(name) => Err(InstanceError::VmImageForContainer(name.clone())),
            ImageSource::Registry(r) => {
                std::fs::create_dir_all(&scratch).map_err(Self::io(&scratch))?;
                Ok(self
                    .ctd
                    .pull(r, &self.config.insecure_registries, &scratch, progress)
                    .await?)
            }
        }
    }

    /// Environment `name` as image `image`, when the host lists its
    /// archive's blobs (an OCI layout of one image): made already from
    /// the archive's current version, or fetched blob by blob (again, with
    /// the new list, when the archive changes on the host meanwhile). None
    /// when the archive is fetched whole.
    async fn env_by_blobs(
        &self,
        name: &str,
        image: &str,
        progress: &oci::Progress,
    ) -> Result<Option<oci::ImportedImage>, InstanceError> {
        use crate::api::host_client::HostCallError;
        let mut tries = 0;
        loop {
            tries += 1;
            let meta = match self.host.environment(name).await {
                Ok(m) => m,
                Err(HostCallError::Refused { status, .. })
                    if status == reqwest::StatusCode::NOT_FOUND =>
                {
                    return Err(InstanceError::NoEnvironment {
                        name: name.to_string(),
                        path: self
                            .config
                            .shared_dir
                            .join("environments")
                            .join(format!("{name}.tar")),
                        node: self.node.clone(),
                    })
                }
                Err(e @ HostCallError::Unreachable(_)) if tries < 3 => {
                    tracing::warn!(environment = name, error = %crate::error_chain(&e), "asking the host again");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => {
                    return Err(super::envfetch::FetchError::Host {
                        what: format!("environment {name:?}"),
                        source: e,
                    }
                    .into())
                }
            };
            if meta.manifest.is_none() {
                return Ok(None);
            }
            if let Some(ready) = self.ctd.imported_from(image, &meta.sha256).await? {
                return Ok(Some(ready));
            }
            let of = super::envfetch::BlobOf::Environment(name);
            let parts = super::envfetch::Image {
                manifest: meta.manifest.as_ref(),
                blobs: &meta.blobs,
                sha256: &meta.sha256,
            };
            match self.fetch_image(of, parts, image, progress).await {
                Ok(found) => {
                    // A copy of an older version fetched whole is of no more use.
                    super::envfetch::forget_whole(&self.env_cache(), name, None);
                    return Ok(Some(found));
                }
                Err(InstanceError::Fetch(e)) if tries < 3 && e.changed_on_host() => {
                    tracing::warn!(environment = name, "the environment changed on the host while it was fetched: fetching its new version");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Snapshot `snapshot` of VPS `vps` (on another node, or none) as the
    /// image of a new VPS here, from the copy the host keeps of a stopped,
    /// parked VPS (`vps create --from-snapshot`): its blobs this node lacks
    /// fetched, not its host key.
    async fn parked_image(
        &self,
        vps: u64,
        snapshot: &str,
        progress: &oci::Progress,
    ) -> Result<oci::ImportedImage, InstanceError> {
        use crate::api::host_client::HostCallError;
        let none = || super::snapshots::SnapshotError::NoSnapshot {
            vps,
            id: snapshot.to_string(),
        };
        let copy = match self.host.parked(vps).await {
            Ok(c) => c.kept(snapshot).ok_or_else(none)?,
            Err(HostCallError::Refused { status, .. })
                if status == reqwest::StatusCode::NOT_FOUND =>
            {
                return Err(none().into())
            }
            Err(e) => return Err(InstanceError::Park(e)),
        };
        let image = format!("rivernode.local/parked/vps-{vps}:{snapshot}");
        let sha256 = copy.manifest.digest.trim_start_matches("sha256:");
        if let Some(ready) = self.ctd.imported_from(&image, sha256).await? {
            return Ok(ready);
        }
        let of = super::envfetch::BlobOf::Parked(vps);
        let parts = super::envfetch::Image {
            manifest: Some(&copy.manifest),
            blobs: &copy.blobs,
            sha256,
        };
        let _held = self.image_lock.lock().await;
        self.fetch_image(of, parts, &image, progress).await
    }

    /// Snapshot `snapshot` of VPS `vps` as the image of new VPS `id` here,
    /// fetched from the runner of the node that keeps it, with a grant the
    /// host asked it for (that snapshot alone, not the VPS's host key).
    async fn cloned_image(
        &self,
        id: u64,
        (vps, snapshot): (u64, &str),
        progress: &oci::Progress,
    ) -> Result<oci::ImportedImage, InstanceError> {
        let image = format!("rivernode.local/parked/vps-{vps}:{snapshot}");
        let mut tries = 0;
        loop {
            tries += 1;
            let src =
                self.host
                    .clone_source(id)
                    .await
                    .map_err(|source| InstanceError::CloneSource {
                        vps: id,
                        source_vps: vps,
                        snapshot: snapshot.to_string(),
                        source,
                    })?;
            let Some(k) = src.copy.kept(snapshot) else {
                return Err(super::snapshots::SnapshotError::NoSnapshot {
                    vps,
                    id: snapshot.to_string(),
                }
                .into());
            };
            let sha256 = k.manifest.digest.trim_start_matches("sha256:");
            if let Some(ready) = self.ctd.imported_from(&image, sha256).await? {
                return Ok(ready);
            }
            let of = super::envfetch::BlobOf::Node {
                id: vps,
                node: &src.node,
                url: &src.url,
                grant: &src.grant,
            };
            let parts = super::envfetch::Image {
                manifest: Some(&k.manifest),
                blobs: &k.blobs,
                sha256,
            };
            let fetched = {
                let _held = self.image_lock.lock().await;
                self.fetch_image(of, parts, &image, progress).await
            };
            match fetched {
                // Expired, or forgotten in a restart of that runner.
                Err(e) if tries < 3 && super::snapshots::grant_refused(&e) => {
                    tracing::warn!(task = id, from = %src.node, "the grant was refused: asking the host for a new one");
                }
                other => return other,
            }
        }
    }

    /// Where environment archives fetched whole are kept.
    fn env_cache(&self) -> std::path::PathBuf {
        self.config
            .data_dir
            .join(super::STATE_DIR)
            .join("environments")
    }

    fn spec_input(&self, a: &Assignment) -> Result<RuntimeSpecInput, InstanceError> {
        let mut mounts = Vec::new();
        let mut cwd = None;
        if self.config.shared_dir.is_dir() {
            let own = shared_part(
                &self.config.shared_dir,
                self.config.shared_per_user,
                a.owner.as_deref(),
            );
            if own != self.config.shared_dir {
                // Sticky and open to every uid: an image's user is not the
                // node's, and only this owner's instances mount it.
                if !own.is_dir() {
                    std::fs::create_dir_all(&own).map_err(Self::io(&own))?;
                    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o1777))
                        .map_err(Self::io(&own))?;
                }
                // A link would send the mount anywhere on the node.
                if !own.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                    return Err(InstanceError::SharedDir {
                        path: own,
                        node: self.node.clone(),
                    });
                }
            }
            mounts.push(MountInput {
                source: own,
                target: "/shared".into(),
                read_only: false,
            });
            cwd = Some("/shared".to_string());
            // Everyone's tasks run the archives in environments/: no task may
            // change them, nor replace the directory with a link of its own.
            let envs = self.config.shared_dir.join("environments");
            let _ = std::fs::create_dir(&envs);
            if !envs.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                return Err(InstanceError::SharedDir {
                    path: envs,
                    node: self.node.clone(),
                });
            }
            mounts.push(MountInput {
                source: envs,
                target: "/shared/environments".into(),
                read_only: true,
            });
        }
        for m in &a.spec.mounts {
            if !std::path::Path::new(&m.source).exists() {
                return Err(InstanceError::NoMountSource {
                    path: m.source.clone(),
                    node: self.node.clone(),
                });
            }
            mounts.push(MountInput {
                source: m.source.clone().into(),
                target: m.target.clone(),
                read_only: m.read_only,
            });
        }
        let p = &a.placement;
        // No cores of its own (`-c 0`): the node's unreserved ones, as they
        // are now (the reconciler follows them as they change), no quota.
        let shared = p.cpus.is_empty();
        let cpus = if shared {
            let pool = self
                .shared_cpus
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if pool.is_empty() {
                self.node_cpus.clone()
            } else {
                pool
            }
        } else {
            p.cpus.clone()
        };
        let mut rivernode_env: BTreeMap<String, String> = [
            ("RIVERNODE_TASK_ID", a.id.to_string()),
            ("RIVERNODE_NODE", self.node.clone()),
            ("RIVERNODE_CPUS", cpus.to_string()),
            ("RIVERNODE_CORES", p.cpus.len().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let api_url = self.instance_api_url.get().map(String::as_str);
        rivernode_env.extend(contract_env(a, cwd.as_deref(), api_url));
        Ok(RuntimeSpecInput {
            hostname: a
                .spec
                .hostname
                .clone()
                .unwrap_or_else(|| format!("task-{}", a.id)),
            args: a.spec.command.clone(),
            env: a.spec.env.clone(),
            rivernode_env,
            cwd,
            mounts,
            cpu_quota_cores: (!shared).then(|| p.cpus.len().max(1) as i64),
            cpus,
            mems: p.numa.map(|n| [n].into_iter().collect()),
            // The placement's: the asked limit, or the share the scheduler gave.
            memory_bytes: Some(a.placement.memory_bytes).filter(|m| *m > 0),
            pids_max: 32768,
            cgroups_path: self.cgroups_path(a.id),
            netns: None,
            shm_bytes: shm_bytes(a, self.config.default_shm_size.0),
            user: Default::default(),
            privileged: if a.spec.privileged {
                Some(
                    oci::capability_bound(&self.config.proc_root)
                        .map_err(InstanceError::Capabilities)?,
                )
            } else {
                None
            },
        })
    }

    /// The shim's log driver URI for task `id`.
    fn log_uri(&self, id: u64) -> Result<String, InstanceError> {
        let logs = self.logs_dir();
        std::fs::create_dir_all(&logs).map_err(Self::io(&logs))?;
        let exe = std::env::current_exe().map_err(InstanceError::Exe)?;
        Ok(super::logdriver::uri(
            &exe,
            &logs,
            &format!("task-{id}"),
            self.config.max_log_bytes,
        ))
    }

    fn started(&self, a: &Assignment, pid: u32) -> Started {
        Started {
            pid,
            host_key: (a.spec.kind == Kind::Vps && !a.spec.no_ssh)
                .then(|| self.vps.host_key(&self.container_id(a.id)))
                .flatten(),
        }
    }

    /// Makes and starts the instance, its GPUs claimed in the node's ledger
    /// first: from then on `gpu bind` refuses them, also while the image is
    /// pulled. Any failure gives them back.
    async fn make(
        &self,
        a: &Assignment,
        labels: Option<&HashMap<String, String>>,
    ) -> Result<u32, InstanceError> {
        self.claim_gpus(a)?;
        let made = self.make_claimed(a, labels).await;
        if made.is_err() {
            self.release_gpus(a.id);
        }
        made
    }

    fn claim_gpus(&self, a: &Assignment) -> Result<(), InstanceError> {
        if a.placement.gpus.is_empty() {
            return Ok(());
        }
        let holder = super::gpus::NodeGpus::holder(a.id);
        tokio::task::block_in_place(|| self.gpus.ledger.claim(&a.placement.gpus, &holder))
            .map_err(|e| InstanceError::Gpu(e.into()))
    }

    pub(super) fn release_gpus(&self, id: u64) {
        tokio::task::block_in_place(|| self.gpus.release(id));
    }

    async fn make_claimed(
        &self,
        a: &Assignment,
        labels: Option<&HashMap<String, String>>,
    ) -> Result<u32, InstanceError> {
        let id = a.id;
        let cid = self.container_id(id);
        let is_vps = a.spec.kind == Kind::Vps;
        // `restart --from-snapshot`: the disk is recreated once per request.
        let restore =
            a.spec.restore.as_ref().filter(|r| {
                labels.and_then(|l| l.get(RESTORE_LABEL)) != Some(&r.request.to_string())
            });
        let uri = self.log_uri(id)?;
        // A restore must not race a snapshot or rotation of the same VPS.
        let lock = self.snapshot_locks.of(id);
        let _held = match restore {
            Some(_) => Some(lock.lock().await),
            None => None,
        };
        let image = match restore {
            // A move (`restart --anywhere`): a node without the snapshot
            // takes the host's parked copy of it.
            Some(r) => match self.snapshot_image(id, &r.snapshot).await {
                Err(super::snapshots::SnapshotError::NoSnapshot { .. }) if r.parked => {
                    self.unpark(id, &r.snapshot).await?
                }
                // A move node to node: from the runner of the node it left.
                Err(super::snapshots::SnapshotError::NoSnapshot { .. }) if r.from.is_some() => {
                    self.take_over(id, &r.snapshot).await?
                }
                other => other?,
            },
            None => {
                let fetched = self
                    .prepared
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                match fetched {
                    Some(image) => image,
                    None => self.image(id, &a.spec.image).await?,
                }
            }
        };
        super::supervisor::crash_point(&self.crash_at, "imported");
        let mut input = self.spec_input(a)?;
        // A command, and a VPS's own command (--no-ssh), run as the image's
        // User. A VPS's SSH server needs root (its logins choose their users).
        let wanted_user = image.config.user.as_deref().filter(|u| !u.is_empty());
        let own_command = a.spec.kind == Kind::Command || a.spec.no_ssh;
        if let (true, Some(user)) = (own_command, wanted_user) {
            let found = self
                .ctd
                .find_in_image(&image, &["/etc/passwd", "/etc/group"])
                .await?;
            let read = |p: &Option<PathBuf>| {
                p.as_deref()
                    .and_then(|p| oci::rootfs::read_small_file(p, 4 << 20))
            };
            let (passwd, group) = (read(&found[0]), read(&found[1]));
            input.user = oci::user::resolve(user, passwd.as_deref(), group.as_deref())?;
        }
        // An SSH VPS's sessions see its variables, with the image's own
        // /etc/environment: read here, written once the variables are known.
        let mut image_environment = None;
        // The SSH server: `Some(version)` for the image's own sshd, `None`
        // for the injected dropbear.
        let mut sshd: Option<Option<(u32, u32)>> = None;
        if is_vps && a.spec.no_ssh {
            // No SSH server: the VPS runs its own command, or the image's
            // (in the image's WorkingDir, as Docker runs it).
            if input.args.is_empty() {
                input.args = image.config.command_with(&a.spec.args);
                if let Some(dir) = image.config.working_dir.clone().filter(|d| !d.is_empty()) {
                    input.cwd = Some(dir);
                }
            }
            if input.args.is_empty() {
                return Err(InstanceError::NoCommand {
                    image: match &restore {
                        Some(r) => format!("snapshot {} of VPS {id}", r.snapshot),
                        None => a.spec.image.to_string(),
                    },
                });
            }
            let inet = self
                .vps
                .start_network(id, &cid, &a.placement, a.overlay_group)
                .await?;
            input.netns = Some(inet.netns);
            input
                .mounts
                .extend(self.vps.network_files(&cid, &input.hostname)?);
        } else if is_vps {
            let found = self
                .ctd
                .find_in_image(&image, &[SSHD, "/etc/shadow", "/etc/environment"])
                .await?;
            image_environment = found[2]
                .as_deref()
                .and_then(|p| oci::rootfs::read_small_file(p, 1 << 20));
            let image_ssh = ImageSsh {
                sshd: oci::rootfs::is_file(&found[0]).then(|| SSHD.to_string()),
                shadow: found[1].clone(),
            };
            if image_ssh.sshd.is_some() {
                sshd = Some(
                    found[0]
                        .as_deref()
                        .and_then(|p| std::fs::read(p).ok())
                        .and_then(|b| super::vps::openssh_version(&b)),
                );
            }
            let login = SshLogin {
                keys: &a.spec.ssh_keys,
                password_hash: a.spec.ssh_password_hash.as_deref(),
            };
            // dropbearkey, ldd and file copies: blocking work, off the async workers.
            let (args, mounts) =
                tokio::task::block_in_place(|| self.vps.ssh_server(&cid, &login, &image_ssh))?;
            tracing::info!(
                task = id,
                server = if image_ssh.sshd.is_some() {
                    "the image's sshd"
                } else {
                    "injected dropbear"
                },
                "VPS SSH server"
            );
            let inet = self
                .vps
                .start_network(id, &cid, &a.placement, a.overlay_group)
                .await?;
            input.args = args;
            input.mounts.extend(mounts);
            input
                .mounts
                .extend(self.vps.network_files(&cid, &input.hostname)?);
            input.netns = Some(inet.netns);
        }
        if !is_vps && !a.spec.no_network {
            // A command task: the instances' network too (egress, none of
            // the node's services), unless it asked for none.
            let inet = self
                .vps
                .start_network(id, &cid, &a.placement, a.overlay_group)
                .await?;
            input.netns = Some(inet.netns);
            input
                .mounts
                .extend(self.vps.network_files(&cid, &input.hostname)?);
        }
        let mut spec = oci::build_spec(&image.config, &input)?;
        // The reserved GPUs, and only those, from their CDI specs; then our
        // variables over anything a spec set.
        let grants = tokio::task::block_in_place(|| {
            self.gpus
                .apply(&a.placement.gpus, &mut spec, &oci::cdi::RealDeviceNodes)
        })?;
        let mut env = input.rivernode_env.clone();
        env.extend(super::gpus::env(&grants));
        oci::set_env(&mut spec, &env);
        if is_vps && !a.spec.no_ssh && sshd.is_none() {
            // The injected dropbear runs on the node's libraries through
            // ld.so, which would load what these name from the image.
            oci::remove_env(&mut spec, &super::vps::LOADER_VARS);
        }
        if is_vps && !a.spec.no_ssh {
            let all: Vec<(String, String)> = spec
                .process()
                .as_ref()
                .and_then(|p| p.env().clone())
                .unwrap_or_default()
                .iter()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            self.vps.session_env(
                &cid,
                &super::vps::session_vars(&all),
                image_environment.as_deref().unwrap_or_default(),
                sshd,
            )?;
        }
        self.create_and_start(a, labels, &image, &spec, &uri).await
    }

    async fn create_and_start(
        &self,
        a: &Assignment,
        labels: Option<&HashMap<String, String>>,
        image: &oci::ImportedImage,
        spec: &oci_spec::runtime::Spec,
        uri: &str,
    ) -> Result<u32, InstanceError> {
        let (id, cid) = (a.id, self.container_id(a.id));
        if labels.is_some() {
            // Restoring: the old disk goes only now that everything else is
            // ready (a failure before this leaves the VPS stopped, disk intact).
            if let Some(e) = self.ctd.cleanup(&cid).await.into_iter().next() {
                return Err(InstanceError::OldDisk(TeardownFailure::Container(e)));
            }
        }
        let mut labels = HashMap::from([
            (TASK_LABEL.to_string(), id.to_string()),
            (KIND_LABEL.to_string(), kind_label(a.spec.kind).to_string()),
        ]);
        if let Some(r) = &a.spec.restore {
            labels.insert(RESTORE_LABEL.to_string(), r.request.to_string());
        }
        labels.insert(GPUS_LABEL.to_string(), gpus_label(&a.placement.gpus));
        labels.insert(
            SUBMITTED_LABEL.to_string(),
            a.submitted_at_unix_ms.to_string(),
        );
        let ssh_server = a.spec.kind == Kind::Vps && !a.spec.no_ssh;
        if let (false, Some(n)) = (ssh_server, image.config.stop_signal_number()) {
            labels.insert(STOP_SIGNAL_LABEL.to_string(), n.to_string());
        }
        self.ctd.create_container(&cid, labels, image, spec).await?;
        super::supervisor::crash_point(&self.crash_at, "created");
        self.mark_start(a).await?;
        match self.start_task(&cid, uri).await {
            Ok(pid) => Ok(pid),
            Err(e) => {
                // A first start that failed leaves nothing behind.
                self.ctd.cleanup(&cid).await;
                Err(e.into())
            }
        }
    }
}

impl TaskContext {
    /// The node's boot id (`/proc/sys/kernel/random/boot_id`), if readable.
    pub(super) fn boot_id(&self) -> Option<String> {
        std::fs::read_to_string(self.config.proc_root.join("sys/kernel/random/boot_id"))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Records on a command's container, before its task starts, in which
    /// boot it started: the host may never hear that it ran.
    async fn mark_start(&self, a: &Assignment) -> Result<(), InstanceError> {
        if a.spec.kind != Kind::Command {
            return Ok(());
        }
        let boot = self.boot_id().unwrap_or_else(|| "unknown".into());
        Ok(self
            .ctd
            .set_label(&self.container_id(a.id), STARTED_BOOT_LABEL, &boot)
            .await?)
    }

    /// Starts a new task on container `cid`. A runner killed while
    /// containerd was creating a task leaves that creation running on
    /// (its shim directory appears a moment later), and a new create meets
    /// it: such a start is tried again, each try first removing the
    /// leftover task, which never ran (it was created, not started).
    async fn start_task(&self, cid: &str, uri: &str) -> Result<u32, oci::OciError> {
        let mut tries = 0;
        loop {
            match self.ctd.start_existing(cid, uri, uri).await {
                Ok(pid) => return Ok(pid),
                Err(e) if tries < 4 => {
                    tries += 1;
                    tracing::warn!(instance = cid, error = %crate::error_chain(&e), "starting the task failed; trying again");
                    tokio::time::sleep(std::time::Duration::from_millis(300 * tries)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn gpus_label(gpus: &[crate::topology::PciAddress]) -> String {
    gpus.iter()
        .map(|g| g.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// From a command container's start label and the node's boot id now:
/// whether its task may have run in a boot that is over.
pub fn started_in_an_earlier_boot(label: Option<&str>, now: Option<&str>) -> bool {
    match (label, now) {
        // The start never began.
        (None, _) => false,
        // Same boot, and no task: the start never got as far as a task
        // (a task that ran stays, exited, until the runner removes it).
        (Some(b), Some(now)) => b != now,
        // Cannot tell: failing it beats running it twice.
        (Some(_), None) => true,
    }
}

/// `/dev/shm`: what was asked, else half the memory limit, else the
/// runner's default.
pub fn shm_bytes(a: &Assignment, default: u64) -> u64 {
    a.spec
        .shm_bytes
        .or(Some(a.placement.memory_bytes / 2).filter(|m| *m > 0))
        .unwrap_or(default)
}

/// Whether a container labelled `label` was made for the task submitted at
/// `submitted_ms`. One without the label (made before it existed) or an
/// assignment without the time (an older host) is taken as its own.
pub fn made_for(label: Option<&str>, submitted_ms: i64) -> bool {
    match label.and_then(|l| l.parse::<i64>().ok()) {
        Some(ms) => submitted_ms == 0 || ms == submitted_ms,
        None => true,
    }
}

/// The part of the cluster share an instance of `owner` (none: the admin)
/// sees at /shared: its owner's own directory, so one user can neither read
/// nor plant files in another's (a `numpy.py` next to their `train.py`);
/// the whole share when `per_user` is off (one trusted team).
pub fn shared_part(shared: &std::path::Path, per_user: bool, owner: Option<&str>) -> PathBuf {
    match (per_user, owner) {
        (false, _) => shared.to_path_buf(),
        (true, Some(user)) => shared.join("users").join(user),
        (true, None) => shared.join("admin"),
    }
}

/// Where task logs are written: DATA_DIR/runner/logs/task-<id>.{stdout,stderr}.
/// The name of a VPS's onstart log (`<name>.stdout`, `<name>.stderr`).
pub fn onstart_log_name(id: u64) -> String {
    format!("task-{id}.onstart")
}

pub fn logs_dir(config: &RunnerConfig) -> PathBuf {
    config.data_dir.join(super::STATE_DIR).join("logs")
}

impl Driver for TaskContext {
    async fn list(&self) -> Result<Vec<Found>, InstanceError> {
        let mut out = self.vm_list().await?;
        for (cid, labels) in self.ctd.containers_with_label(TASK_LABEL).await? {
            let Some(id) = labels.get(TASK_LABEL).and_then(|v| v.parse::<u64>().ok()) else {
                continue;
            };
            // Another node's container in a shared containerd is not ours.
            if cid != self.container_id(id) {
                continue;
            }
            let kind = match labels.get(KIND_LABEL).map(String::as_str) {
                Some("command") => Some(Kind::Command),
                Some("vps") => Some(Kind::Vps),
                _ => None,
            };
            out.push(Found {
                id,
                kind,
                observed: observed(self.ctd.status(&cid).await?),
                restore_request: labels.get(RESTORE_LABEL).cloned(),
            });
        }
        Ok(out)
    }

    async fn observe(&self, id: u64) -> Result<Observed, InstanceError> {
        if self.is_vm(id) {
            return self.vm_observe(id).await;
        }
        let cid = self.container_id(id);
        if !self.ctd.container_exists(&cid).await? {
            return Ok(Observed::Absent);
        }
        Ok(observed(self.ctd.status(&cid).await?))
    }

    async fn prepare(&self, a: &Assignment) -> Result<Vec<PortRequest>, InstanceError> {
        let made = if a.spec.is_vm() {
            self.vm_dir(a.id).join("disk.qcow2").exists()
        } else {
            self.ctd
                .container_labels(&self.container_id(a.id))
                .await?
                .is_some()
        };
        if !made && !a.started {
            // Never run in this cluster, so nothing on this node is its yet
            // (L8): first of all, whether its making fails or is cancelled.
            self.set_aside_earlier_life(a.id).await?;
            self.vm_set_aside_earlier_life(a.id)?;
        }
        // A VM's base image is copied when it is made; a restore is made
        // from a snapshot on the node; a container made already is started.
        if made || a.spec.is_vm() || a.spec.restore.is_some() {
            return Ok(vec![]);
        }
        let image = self.image(a.id, &a.spec.image).await?;
        // A VPS publishes what its image EXPOSEs (Vast.ai maps them too).
        let exposed = match a.spec.kind {
            Kind::Vps => image.config.exposed(),
            Kind::Command => vec![],
        };
        self.prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(a.id, image);
        Ok(exposed)
    }

    async fn onstart(&self, a: &Assignment) -> Result<Option<u32>, InstanceError> {
        if a.spec.is_vm() || (a.spec.onstart.is_none() && !a.spec.jupyter) {
            return Ok(None);
        }
        let cid = self.container_id(a.id);
        let args = self
            .vps
            .onstart_command(&cid, a.spec.onstart.as_deref(), a.spec.jupyter)?;
        // Its output goes to its own capped log beside the instance's
        // (`task logs ID --onstart`), through the log driver containerd's
        // shim runs: nothing of it depends on this runner staying up.
        let logs = self.logs_dir();
        std::fs::create_dir_all(&logs).map_err(Self::io(&logs))?;
        let exe = std::env::current_exe().map_err(InstanceError::Exe)?;
        let req = oci::exec::ExecRequest {
            args,
            tty: false,
            cols: 0,
            rows: 0,
            log_uri: Some(super::logdriver::uri(
                &exe,
                &logs,
                &onstart_log_name(a.id),
                self.config.max_log_bytes,
            )),
        };
        let mut raw = [0u8; 6];
        getrandom::fill(&mut raw).map_err(|e| InstanceError::Io {
            path: "/dev/urandom".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let exec_id = format!(
            "onstart-{}",
            raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let unused = self.config.data_dir.join(super::STATE_DIR).join("exec");
        let exec = self.ctd.exec(&cid, &exec_id, &req, &unused).await?;
        let status = exec.wait().await;
        // Not deleted: what it started in the background (a server, `nohup
        // ... &`) keeps writing to the log driver's pipe, which containerd
        // would close with the exec. It goes with the container's task.
        drop(exec);
        Ok(Some(status?))
    }

    async fn create(&self, a: &Assignment) -> Result<Started, InstanceError> {
        if a.spec.is_vm() {
            return self.vm_create(a).await;
        }
        let labels = self.ctd.container_labels(&self.container_id(a.id)).await?;
        let restoring = a.spec.restore.as_ref().is_some_and(|r| {
            labels.as_ref().and_then(|l| l.get(RESTORE_LABEL)) != Some(&r.request.to_string())
        });
        if labels.is_some() && !restoring {
            // Made already (by a runner that crashed before reporting): start it.
            return self.start(a).await;
        }
        let pid = self.make(a, labels.as_ref()).await?;
        Ok(self.started(a, pid))
    }

    async fn start(&self, a: &Assignment) -> Result<Started, InstanceError> {
        if self.is_vm(a.id) {
            return self.vm_start(a).await;
        }
        let cid = self.container_id(a.id);
        // The container keeps the devices it was made with: the placement
        // must name the same GPUs (the host pins a restart to them), or the
        // ledger and the devices would disagree.
        let made_with = self
            .ctd
            .container_labels(&cid)
            .await?
            .and_then(|l| l.get(GPUS_LABEL).cloned())
            .unwrap_or_default();
        let placed = gpus_label(&a.placement.gpus);
        if made_with != placed {
            return Err(InstanceError::GpuMismatch { made_with, placed });
        }
        self.claim_gpus(a)?;
        let started = async {
            if a.spec.kind == Kind::Vps {
                self.vps
                    .start_network(a.id, &cid, &a.placement, a.overlay_group)
                    .await?;
            }
            let uri = self.log_uri(a.id)?;
            self.mark_start(a).await?;
            Ok::<_, InstanceError>(self.start_task(&cid, &uri).await?)
        }
        .await;
        match started {
            Ok(pid) => Ok(self.started(a, pid)),
            Err(e) => {
                self.release_gpus(a.id);
                Err(e)
            }
        }
    }

    async fn start_created(&self, id: u64) -> Result<(), InstanceError> {
        if self.is_vm(id) {
            // Never asked: a VM is never observed as only created.
            return Ok(());
        }
        Ok(self.ctd.start_created(&self.container_id(id)).await?)
    }

    async fn made_for(&self, a: &Assignment) -> bool {
        if self.is_vm(a.id) {
            return self.vm_made_for(a);
        }
        match self.ctd.container_labels(&self.container_id(a.id)).await {
            Ok(Some(l)) => made_for(
                l.get(SUBMITTED_LABEL).map(String::as_str),
                a.submitted_at_unix_ms,
            ),
            Ok(None) => true,
            // Unknown: not ours to touch this round.
            Err(_) => false,
        }
    }

    async fn may_have_run(&self, id: u64) -> bool {
        if self.is_vm(id) {
            // A VPS: it runs again after a reboot by design.
            return false;
        }
        let labels = match self.ctd.container_labels(&self.container_id(id)).await {
            Ok(Some(l)) => l,
            Ok(None) => return false,
            // Unknown: treat as run; failing it beats running it twice.
            Err(_) => return true,
        };
        started_in_an_earlier_boot(
            labels.get(STARTED_BOOT_LABEL).map(String::as_str),
            self.boot_id().as_deref(),
        )
    }

    async fn wait(&self, id: u64) -> Result<u32, InstanceError> {
        if self.is_vm(id) {
            return self.vm_wait(id).await;
        }
        Ok(self.ctd.wait(&self.container_id(id)).await?)
    }

    async fn signal(&self, id: u64, s: Signal) -> Result<(), InstanceError> {
        if self.is_vm(id) {
            return self.vm_signal(id, s).await;
        }
        let cid = self.container_id(id);
        let n = match s {
            Signal::Term => self
                .ctd
                .container_labels(&cid)
                .await
                .ok()
                .flatten()
                .and_then(|l| l.get(STOP_SIGNAL_LABEL)?.parse().ok())
                .unwrap_or(15),
            Signal::Kill => 9,
        };
        Ok(self.ctd.kill(&cid, n).await?)
    }

    async fn pause(&self, id: u64) -> Result<(), InstanceError> {
        if self.is_vm(id) {
            return self.vm_pause(id, true).await;
        }
        Ok(self.ctd.pause(&self.container_id(id)).await?)
    }

    async fn resume(&self, id: u64) -> Result<(), InstanceError> {
        if self.is_vm(id) {
            return self.vm_pause(id, false).await;
        }
        Ok(self.ctd.resume(&self.container_id(id)).await?)
    }

    fn oom_kills(&self, id: u64) -> u64 {
        oci::oom_kills(&self.cgroup_root, &self.cgroups_path(id))
    }

    fn exited(&self, id: u64) {
        self.release_gpus(id);
    }

    async fn keep(&self, id: u64) -> Vec<TeardownFailure> {
        if self.is_vm(id) {
            return self.vm_keep(id).await;
        }
        let cid = self.container_id(id);
        let mut problems = Vec::new();
        match self.ctd.delete_task(&cid).await {
            // No process left: its GPUs are free for the next instance.
            Ok(()) => self.release_gpus(id),
            Err(e) => problems.push(TeardownFailure::Container(e)),
        }
        if self.vps.address_of(&cid).is_some() {
            problems.extend(
                self.vps
                    .stop_network(id, &cid)
                    .await
                    .into_iter()
                    .map(TeardownFailure::Network),
            );
        }
        problems
    }

    async fn snapshot_on_stop(&self, id: u64) -> Result<(), InstanceError> {
        self.take_snapshot(id, Some("automatic, on stop")).await?;
        Ok(())
    }

    async fn park(&self, id: u64) -> Result<Option<String>, InstanceError> {
        self.park_newest(id).await
    }

    async fn remove(&self, id: u64, snapshots: bool) -> Vec<TeardownFailure> {
        // An image fetched for a make that never came.
        self.prepared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if self.is_vm(id) {
            return self.vm_remove(id, snapshots).await;
        }
        let cid = self.container_id(id);
        let mut problems: Vec<TeardownFailure> = self
            .ctd
            .cleanup(&cid)
            .await
            .into_iter()
            .map(TeardownFailure::Container)
            .collect();
        if problems.is_empty() {
            self.release_gpus(id);
        }
        if snapshots {
            // A park cut short by a crash left its export.
            let _ = std::fs::remove_file(
                self.config
                    .data_dir
                    .join(super::STATE_DIR)
                    .join("parking")
                    .join(format!("vps-{id}.tar")),
            );
            problems.extend(
                self.delete_all_snapshots(id)
                    .await
                    .into_iter()
                    .map(TeardownFailure::Snapshots),
            );
        }
        if self.vps.address_of(&cid).is_some() {
            problems.extend(
                self.vps
                    .stop_network(id, &cid)
                    .await
                    .into_iter()
                    .map(TeardownFailure::Network),
            );
        }
        self.vps.forget(&cid);
        problems
    }

    fn lock(&self, id: u64) -> Arc<tokio::sync::Mutex<()>> {
        self.snapshot_locks.of(id)
    }

    async fn converge_network(&self, assigned: &[Assignment]) {
        // Node ports of running instances (after a runner restart the table
        // is rebuilt from the assignments and the addresses IPAM kept).
        for a in assigned.iter().filter(|a| {
            a.spec.kind == Kind::Vps
                && !a.state.is_final()
                && a.state != crate::api::TaskState::Stopped
        }) {
            let cid = self.container_id(a.id);
            if let Some(ip) = self.vps.address_of(&cid) {
                let maps = super::vps::port_maps(&a.placement, ip);
                if let Err(e) = self.vps.set_port(a.id, maps, false) {
                    tracing::warn!(task = a.id, error = %crate::error_chain(&e), "cannot publish the node port");
                }
            }
        }
    }

    async fn follow_assignments(&self, assigned: &[Assignment]) {
        use crate::runner::metrics::{InstanceLabel, UsageSource};
        *self.assigned.lock().unwrap_or_else(|e| e.into_inner()) = assigned
            .iter()
            .map(|a| InstanceLabel {
                id: a.id,
                owner: a.owner.clone(),
                kind: kind_label(a.spec.kind),
                usage: if a.spec.is_vm() {
                    UsageSource::Domain(super::vm::vm_uuid(&self.container_id(a.id)))
                } else {
                    UsageSource::Cgroup(self.cgroups_path(a.id))
                },
            })
            .collect();
        for a in assigned.iter().filter(|a| {
            a.spec.kind == Kind::Vps
                && !a.spec.is_vm()
                && matches!(
                    a.state,
                    crate::api::TaskState::Running | crate::api::TaskState::Paused
                )
        }) {
            match self
                .vps
                .set_notice(&self.container_id(a.id), a.notice.as_deref())
            {
                Ok(true) => {
                    tracing::info!(task = a.id, notice = ?a.notice, "the instance's warning changed")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(task = a.id, error = %crate::error_chain(&e), "cannot write the instance's warning")
                }
            }
        }
    }

    async fn converge_cpus(&self, assigned: &[Assignment]) {
        let pool = shared_pool(&self.node_cpus, assigned);
        *self.shared_cpus.lock().unwrap_or_else(|e| e.into_inner()) = pool.clone();
        if pool.is_empty() {
            return;
        }
        let want = pool.to_string();
        for a in assigned.iter().filter(|a| {
            a.placement.cpus.is_empty()
                && matches!(
                    a.state,
                    crate::api::TaskState::Running | crate::api::TaskState::Paused
                )
        }) {
            let path = self.cgroups_path(a.id);
            let Some(file) = cpuset_file(&self.cgroup_root, &path) else {
                continue;
            };
            let Ok(now) = std::fs::read_to_string(&file) else {
                continue;
            };
            if now.trim() != want {
                match std::fs::write(&file, &want) {
                    Ok(()) => {
                        tracing::info!(task = a.id, cpus = %want, "shared cores follow the node's unreserved ones")
                    }
                    Err(e) => {
                        tracing::warn!(task = a.id, file = %file.display(), error = %e, "cannot set the shared cores")
                    }
                }
            }
        }
    }

    async fn converge_gpus(&self, busy: &[u64]) {
        reconcile_vm_bindings(self, busy).await;
    }

    async fn recover(&self) {
        reconcile_gpu_claims(self).await;
        reconcile_vm_bindings(self, &[]).await;
        self.vm_thaw_all().await;
        reconcile_networks(self).await
    }
}

/// After a crash: GPU claims of instances with no process left (they ended
/// while no runner was watching, or it died between claim and start) are
/// given back; running, paused and created instances keep theirs.
async fn reconcile_gpu_claims(ctx: &TaskContext) {
    let claims = match ctx.gpus.ledger.claims() {
        Ok(c) if c.is_empty() => return,
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "cannot read the GPU ledger");
            return;
        }
    };
    let mut live = std::collections::HashSet::new();
    for holder in claims.values() {
        // A holder that is not one of ours is left alone.
        let Some(id) = super::gpus::NodeGpus::holder_task(holder) else {
            live.insert(holder.clone());
            continue;
        };
        if super::gpus::claim_survives(ctx.observe(id).await.ok()) {
            live.insert(holder.clone());
        }
    }
    if let Err(e) = ctx.gpus.ledger.retain_claims(|h| live.contains(h)) {
        tracing::warn!(error = %crate::error_chain(&e), "cannot update the GPU ledger");
    }
}

/// The VFIO bindings of VMs that no longer run (they ended while no
/// runner was watching, a teardown could not give them back, the node
/// rebooted) give their GPUs back to the host; a running or paused VM, one
/// whose state cannot be read, and one in `busy` (being started or torn
/// down right now) keep theirs.
async fn reconcile_vm_bindings(ctx: &TaskContext, busy: &[u64]) {
    let bindings = match tokio::task::block_in_place(|| ctx.gpus.ledger.bindings()) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "cannot read the VFIO bindings");
            return;
        }
    };
    for id in super::gpus::vm_owners(&bindings) {
        if busy.contains(&id) || super::gpus::claim_survives(ctx.observe(id).await.ok()) {
            continue;
        }
        match tokio::task::block_in_place(|| ctx.gpus.restore_for_vm(id)) {
            Ok(()) => tracing::info!(task = id, "gave an ended VM's GPUs back to the host"),
            Err(e) => {
                tracing::error!(task = id, error = %crate::error_chain(&e), "cannot give an ended VM's GPUs back")
            }
        }
    }
}

/// After a crash: instance networks whose container is gone are taken down,
/// and the nftables table is rebuilt (the node ports of live instances come
/// back with the first assignments).
async fn reconcile_networks(ctx: &TaskContext) {
    let live: std::collections::HashSet<String> = match ctx
        .ctd
        .containers_with_label(TASK_LABEL)
        .await
    {
        Ok(f) => f.into_iter().map(|(cid, _)| cid).collect(),
        Err(e) => {
            tracing::error!(error = %crate::error_chain(&e), "cannot list containers; instance networks left as they are");
            return;
        }
    };
    // A VM (stopped ones too) keeps its address while its files exist.
    let live: std::collections::HashSet<String> = live.into_iter().chain(ctx.vm_cids()).collect();
    let leases = ctx.vps.network.ipam.leases().unwrap_or_default();
    if leases.is_empty() {
        // This node has no instances: its firewall is not ours to touch.
        return;
    }
    for cid in leases.into_keys() {
        if !live.contains(&cid) {
            tracing::info!(instance = %cid, "removing the network of a vanished instance");
            match crate::net::link::connect() {
                Ok(h) => {
                    let problems = ctx.vps.network.teardown(&h, &cid).await;
                    if !problems.is_empty() {
                        tracing::warn!(instance = %cid, ?problems, "network cleanup left problems");
                    }
                }
                Err(e) => tracing::warn!(error = %crate::error_chain(&e), "netlink"),
            }
        }
    }
    if let Err(e) = tokio::task::block_in_place(|| ctx.vps.network.apply_firewall(vec![])) {
        tracing::warn!(error = %crate::error_chain(&e), "cannot rebuild the nftables table");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpuset_file_is_found_in_either_hierarchy() {
        let v2 = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(v2.path().join("rivernode/n-task-1")).unwrap();
        std::fs::write(v2.path().join("rivernode/n-task-1/cpuset.cpus"), "0-3").unwrap();
        assert_eq!(
            cpuset_file(v2.path(), "/rivernode/n-task-1"),
            Some(v2.path().join("rivernode/n-task-1/cpuset.cpus"))
        );
        let v1 = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(v1.path().join("cpuset/rivernode/n-task-1")).unwrap();
        std::fs::write(
            v1.path().join("cpuset/rivernode/n-task-1/cpuset.cpus"),
            "0-3",
        )
        .unwrap();
        assert_eq!(
            cpuset_file(v1.path(), "/rivernode/n-task-1"),
            Some(v1.path().join("cpuset/rivernode/n-task-1/cpuset.cpus"))
        );
        assert_eq!(cpuset_file(v1.path(), "/rivernode/n-task-2"), None);
    }

    #[test]
    fn the_shared_pool_is_what_no_live_instance_holds() {
        use crate::api::TaskState;
        let node: CpuList = "0-7".parse().unwrap();
        let with = |id, cpus: &str, state| {
            let mut a = super::super::reconcile::placeholder(id, Kind::Vps);
            a.placement.cpus = cpus.parse().unwrap();
            a.state = state;
            a
        };
        let assigned = [
            with(1, "0-1", TaskState::Running),
            with(2, "4", TaskState::Paused),
            with(3, "5", TaskState::Stopped),
            with(4, "6", TaskState::Completed),
            with(5, "", TaskState::Running),
        ];
        assert_eq!(shared_pool(&node, &assigned).to_string(), "2-3,5-7");
        assert_eq!(shared_pool(&node, &[]).to_string(), "0-7");
    }

    #[test]
    fn only_a_start_in_an_earlier_boot_may_have_run() {
        assert!(!started_in_an_earlier_boot(None, Some("b1")));
        assert!(!started_in_an_earlier_boot(Some("b1"), Some("b1")));
        assert!(started_in_an_earlier_boot(Some("b0"), Some("b1")));
        assert!(started_in_an_earlier_boot(Some("b0"), None));
    }

    #[test]
    fn a_container_is_its_tasks_only_when_made_for_it() {
        assert!(made_for(Some("1700"), 1700));
        assert!(
            !made_for(Some("1700"), 1800),
            "an earlier task with the same id"
        );
        assert!(made_for(None, 1800), "made before the label existed");
        assert!(made_for(Some("1700"), 0), "an older host sends no time");
    }

    #[test]
    fn each_owner_has_its_own_part_of_the_share() {
        let s = std::path::Path::new("/mnt/share");
        assert_eq!(shared_part(s, true, Some("alice")), s.join("users/alice"));
        assert_eq!(shared_part(s, true, None), s.join("admin"));
        assert_ne!(
            shared_part(s, true, Some("bob")),
            shared_part(s, true, Some("alice"))
        );
        assert_eq!(shared_part(s, false, Some("alice")), s);
    }

    #[test]
    fn shm_is_asked_else_half_the_memory_else_the_default() {
        let mut a = super::super::reconcile::placeholder(1, Kind::Command);
        assert_eq!(shm_bytes(&a, 8 << 30), 8 << 30);
        a.placement.memory_bytes = 1 << 30;
        assert_eq!(shm_bytes(&a, 8 << 30), 512 << 20);
        a.spec.shm_bytes = Some(2 << 30);
        assert_eq!(shm_bytes(&a, 8 << 30), 2 << 30);
    }

    #[test]
    fn the_vast_contract_variables_come_in_both_names() {
        let mut a = super::super::reconcile::placeholder(7, Kind::Vps);
        a.spec.ssh_keys = vec!["ssh-ed25519 AAAA k".into()];
        a.public_address = Some("203.0.113.9".into());
        a.placement.published = vec![crate::api::ports::Published {
            request: 8082,
            proto: crate::api::ports::Proto::Udp,
            internal: 8082,
            node_port: 30001,
            external: 21234,
        }];
        a.spec
            .env
            .insert("CONTAINER_API_KEY".into(), "cak_7".into());
        a.spec
            .env
            .insert("VAST_URL".into(), "https://console.vast.ai".into());
        let env = contract_env(&a, Some("/shared"), Some("http://169.254.42.1"));
        for (k, v) in [
            ("CONTAINER_ID", "7"),
            ("VAST_CONTAINERLABEL", "C.7"),
            ("RIVERNODE_CONTAINERLABEL", "C.7"),
            ("PUBLIC_IPADDR", "203.0.113.9"),
            ("RIVERNODE_PUBLIC_IPADDR", "203.0.113.9"),
            ("SSH_PUBLIC_KEY", "ssh-ed25519 AAAA k"),
            ("GPU_COUNT", "0"),
            ("DATA_DIRECTORY", "/shared"),
            ("RIVERNODE_DATA_DIRECTORY", "/shared"),
            ("VAST_UDP_PORT_8082", "21234"),
            ("RIVERNODE_UDP_PORT_8082", "21234"),
            ("RIVERNODE_CONTAINER_API_KEY", "cak_7"),
            ("CONTAINER_API_URL", "http://169.254.42.1"),
        ] {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
        }
        // What is not known is not set (never an empty value).
        a.public_address = None;
        a.spec.ssh_keys.clear();
        assert!(
            !env.contains_key("VAST_URL") && !env.contains_key("VAST_API_KEY"),
            "the instance's own VAST_URL (a real Vast.ai account) is left as it is, and our key is not sent there"
        );
        a.spec.env.remove("VAST_URL");
        let env = contract_env(&a, Some("/shared"), Some("http://169.254.42.1"));
        assert_eq!(
            env.get("VAST_URL").map(String::as_str),
            Some("http://169.254.42.1")
        );
        assert_eq!(env.get("VAST_API_KEY").map(String::as_str), Some("cak_7"));
        let env = contract_env(&a, None, None);
        assert!(!env.contains_key("PUBLIC_IPADDR") && !env.contains_key("SSH_PUBLIC_KEY"));
        assert!(
            !env.contains_key("VAST_API_KEY") && !env.contains_key("CONTAINER_API_URL"),
            "no in-instance API on the node: no URL, and the key is not offered to the CLI"
        );
        assert!(!env.contains_key("DATA_DIRECTORY"));
    }
}

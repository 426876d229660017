//! The seam between the runner's lifecycle and what runs an instance: a
//! driver (containerd today, libvirt next) makes, starts, signals, watches
//! and removes instances; the supervisor and the reconcile loop decide when.
//! Modelled on Nomad's task driver interface, with a fake driver (in
//! `fake`) that the supervisor's unit tests run on.

use std::future::Future;
use std::sync::Arc;

use crate::api::ports::PortRequest;
use crate::api::{Assignment, Kind};

use super::lifecycle::Observed;

/// Why an instance could not be made, started or changed.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error("environment {name:?} not found: {} does not exist on node {node}, and the host has none of that name", path.display())]
    NoEnvironment {
        name: String,
        path: std::path::PathBuf,
        node: String,
    },
    #[error("mount source {path} does not exist on node {node}")]
    NoMountSource { path: String, node: String },
    #[error("{} is not a directory (a link?): fix the shared directory on node {node}", path.display())]
    SharedDir {
        path: std::path::PathBuf,
        node: String,
    },
    #[error("{}", path.display())]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("locating the rivernode binary (for the log driver)")]
    Exe(#[source] std::io::Error),
    #[error("GPUs")]
    Gpu(#[from] super::gpus::GpuError),
    #[error(transparent)]
    ImageUser(#[from] crate::oci::user::UserError),
    #[error("its container was made with GPUs [{made_with}] but is placed on [{placed}]; `vps delete` and create it again")]
    GpuMismatch { made_with: String, placed: String },
    #[error("reading the runner's capabilities for a privileged instance")]
    Capabilities(#[source] crate::oci::OciError),
    #[error("removing the old disk for the restore")]
    OldDisk(#[source] TeardownFailure),
    #[error("{image} names no Entrypoint or Cmd: give the VPS a command (`vps create --no-ssh ... -- CMD`)")]
    NoCommand { image: String },
    #[error("instance {0} has no container on this node")]
    NoContainer(u64),
    #[error(transparent)]
    Oci(#[from] crate::oci::OciError),
    #[error(transparent)]
    Fetch(#[from] super::envfetch::FetchError),
    #[error("the host's parked copy")]
    Park(#[source] crate::api::host_client::HostCallError),
    #[error("snapshot {snapshot} of VPS {vps} did not come from {origin}: `rivernode vps restart {vps}` tries again (what came is kept){}", if *parked { format!(", and `rivernode vps snapshot delete {vps} {snapshot}` moves it without that snapshot") } else { String::new() })]
    SnapshotDidNotCome {
        vps: u64,
        snapshot: String,
        origin: String,
        parked: bool,
        #[source]
        source: Box<InstanceError>,
    },
    #[error("asking the host where snapshot {snapshot} of VPS {source_vps}, which VPS {vps} starts from, is fetched from")]
    CloneSource {
        vps: u64,
        source_vps: u64,
        snapshot: String,
        #[source]
        source: crate::api::host_client::HostCallError,
    },
    #[error("asking the host where VPS {vps}, moving here, is fetched from")]
    MoveSource {
        vps: u64,
        #[source]
        source: crate::api::host_client::HostCallError,
    },
    #[error("parking VPS {vps} on the host: {why}")]
    ParkRefused { vps: u64, why: String },
    #[error("the host's parked host key of VPS {0} is not hex")]
    ParkedKey(u64),
    #[error("the host's {of} is damaged ({what}): {remedy}")]
    DamagedArchive {
        of: String,
        what: String,
        remedy: String,
    },
    #[error(
        "the host's parked copy of VPS {vps} is of snapshot {held}, not {wanted}: restart it again"
    )]
    ParkedOther {
        vps: u64,
        held: String,
        wanted: String,
    },
    #[error(transparent)]
    Snapshot(#[from] super::snapshots::SnapshotError),
    #[error(transparent)]
    Vps(#[from] super::vps::VpsError),
    #[error("node {node} runs no VMs (its runner's libvirt_uri is empty)")]
    NoVms { node: String },
    #[error(transparent)]
    Libvirt(crate::kvm::libvirt::LibvirtError),
    #[error(transparent)]
    VmImage(#[from] crate::kvm::image::ImageError),
    #[error("VM image {0} is for VM VPS (vps create --backend vm), not containers")]
    VmImageForContainer(String),
    #[error("instance {0} is not a VM")]
    NotAVm(u64),
    #[error(
        "--vm-disk {asked} bytes is smaller than {image} ({size} bytes); ask for at least its size"
    )]
    VmDiskTooSmall {
        asked: u64,
        image: String,
        size: u64,
    },
    #[error("the base image of {image} ({}) is gone from this node; the VM's disk needs it", path.display())]
    VmBaseGone {
        image: String,
        path: std::path::PathBuf,
    },

    /// The fake driver's scripted failure (tests only).
    #[cfg(test)]
    #[error("scripted failure: {0}")]
    Scripted(String),
}

/// One thing teardown could not remove. Teardown goes on past each and
/// returns them all (netavark's error list).
#[derive(Debug, thiserror::Error)]
pub enum TeardownFailure {
    #[error("container")]
    Container(#[source] crate::oci::OciError),
    #[error("network: {0}")]
    Network(String),
    #[error("snapshot")]
    Snapshot(#[source] crate::oci::OciError),
    #[error("snapshots")]
    Snapshots(#[source] super::snapshots::SnapshotError),
    #[error("VM domain")]
    Domain(#[source] Box<InstanceError>),
    #[error("GPUs back to their host drivers")]
    Gpus(#[source] crate::vfio::VfioError),
    #[error("{}", path.display())]
    Files {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A started instance.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Started {
    pub pid: u32,
    /// A VPS's public SSH host key, for clients to pin.
    pub host_key: Option<String>,
}

/// An instance the driver holds on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub id: u64,
    /// `None` for one made by an older runner that did not record it.
    pub kind: Option<Kind>,
    pub observed: Observed,
    /// The `restart --from-snapshot` request its disk was made for.
    pub restore_request: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

/// What runs instances on this node. Every call names the instance by its
/// task id; the driver keeps no record of its own beyond what its backend
/// holds (containerd labels, libvirt domain metadata), so a runner killed
/// at any point finds everything again with `list`.
pub trait Driver: Send + Sync + 'static {
    /// Every instance on the node, with what each is doing.
    fn list(&self) -> impl Future<Output = Result<Vec<Found>, InstanceError>> + Send;
    fn observe(&self, id: u64) -> impl Future<Output = Result<Observed, InstanceError>> + Send;
    /// Fetches what making the instance needs from off the node (pulls or
    /// imports its image). Cancel-safe: it makes nothing of the instance,
    /// so a kill or stop meanwhile drops it (F7: a stalled registry must
    /// not hold the task and its reservation). Answers the ports the
    /// image `EXPOSE`s, for a VPS to publish.
    fn prepare(
        &self,
        a: &Assignment,
    ) -> impl Future<Output = Result<Vec<PortRequest>, InstanceError>> + Send;
    /// Makes the instance from its image (or, for a restore, its snapshot,
    /// replacing the old disk only once everything else is ready) and starts it.
    fn create(&self, a: &Assignment)
        -> impl Future<Output = Result<Started, InstanceError>> + Send;
    /// Runs a started VPS's onstart script to its end, its output appended
    /// to the instance's log; its exit status (`None`: it has none).
    fn onstart(
        &self,
        a: &Assignment,
    ) -> impl Future<Output = Result<Option<u32>, InstanceError>> + Send;
    /// Starts a new task on the kept container and disk.
    fn start(&self, a: &Assignment) -> impl Future<Output = Result<Started, InstanceError>> + Send;
    /// Starts a task that was created but never started.
    fn start_created(&self, id: u64) -> impl Future<Output = Result<(), InstanceError>> + Send;
    /// True when a start of the instance's task began before the node last
    /// booted: its work may have run (a reboot takes the task and its
    /// record), so it must not run again.
    fn may_have_run(&self, id: u64) -> impl Future<Output = bool> + Send;
    /// False when the instance on the node was made for another task that
    /// had `a`'s id (before the host's database was reset): it is an earlier
    /// owner's, never to be adopted, started or removed for `a`.
    fn made_for(&self, a: &Assignment) -> impl Future<Output = bool> + Send;
    /// Resolves with the main process's exit status (128 + signal number
    /// for a signal); works for instances an earlier runner started.
    fn wait(&self, id: u64) -> impl Future<Output = Result<u32, InstanceError>> + Send;
    fn signal(&self, id: u64, s: Signal) -> impl Future<Output = Result<(), InstanceError>> + Send;
    fn pause(&self, id: u64) -> impl Future<Output = Result<(), InstanceError>> + Send;
    fn resume(&self, id: u64) -> impl Future<Output = Result<(), InstanceError>> + Send;
    /// The kernel's OOM-kill counter of the instance's cgroup (0 if unknown).
    fn oom_kills(&self, id: u64) -> u64;
    /// Its main process has exited (and with it every process of its PID
    /// namespace): gives back what only a live instance holds, its GPUs,
    /// before the host hears of the end and hands them out again.
    fn exited(&self, id: u64);
    /// Removes the ended task and the instance's network; the container and
    /// its disk stay for a restart.
    fn keep(&self, id: u64) -> impl Future<Output = Vec<TeardownFailure>> + Send;
    /// The snapshot taken when a VPS stops.
    fn snapshot_on_stop(&self, id: u64) -> impl Future<Output = Result<(), InstanceError>> + Send;
    /// After the stop's snapshot: a copy of it on the host, when the host
    /// parks VPS; the snapshot parked (none: not parked).
    fn park(&self, id: u64) -> impl Future<Output = Result<Option<String>, InstanceError>> + Send;
    /// Removes the task, container, disk, network and instance files, and
    /// with `snapshots` every snapshot of it too (a delete).
    fn remove(&self, id: u64, snapshots: bool)
        -> impl Future<Output = Vec<TeardownFailure>> + Send;
    /// Serializes pause, resume and snapshots of one instance.
    fn lock(&self, id: u64) -> Arc<tokio::sync::Mutex<()>>;
    /// After a runner restart: takes down the networks of instances that
    /// are gone and republishes node ports of the assigned ones.
    fn converge_network(&self, assigned: &[Assignment]) -> impl Future<Output = ()> + Send;
    /// Keeps the instances on shared cores on the node's unreserved CPUs
    /// as the assignments change.
    fn converge_cpus(&self, assigned: &[Assignment]) -> impl Future<Output = ()> + Send;
    /// Writes each running VPS's warning from the host (idle GPUs) where
    /// the instance reads it, and takes down those the host took down; and
    /// remembers whose each instance is, for /metrics.
    fn follow_assignments(&self, assigned: &[Assignment]) -> impl Future<Output = ()> + Send;
    /// Gives back the GPUs of VMs that no longer run (a teardown that
    /// could not give them back, a VM that ended unwatched); `busy`: the
    /// instances a supervisor is acting on, left alone.
    fn converge_gpus(&self, busy: &[u64]) -> impl Future<Output = ()> + Send;
    /// At runner start: removes what instances that are gone left behind
    /// (their networks), before anything is adopted.
    fn recover(&self) -> impl Future<Output = ()> + Send;
}

#[cfg(test)]
pub mod fake {
    //! An in-memory driver: instances are records, exits are scripted.

    use std::collections::HashMap;
    use std::sync::Mutex;

    use tokio::sync::watch;

    use super::*;

    #[derive(Debug)]
    pub struct FakeInstance {
        pub kind: Kind,
        /// The container (disk) exists.
        pub disk: bool,
        pub observed: Observed,
        pub oom_kills: u64,
        pub snapshots: u32,
        /// Every signal it received, in order.
        pub signals: Vec<Signal>,
        exit: watch::Sender<Option<u32>>,
        /// Its task was started before the (fake) node last booted.
        pub started_before_boot: bool,
        /// The submission time of the task it was made for (`None`: unrecorded).
        pub made_for: Option<i64>,
    }

    #[derive(Default)]
    pub struct FakeDriver {
        pub instances: Mutex<HashMap<u64, FakeInstance>>,
        /// `create` and `start` fail with this message when set.
        pub fail_start: Mutex<Option<String>>,
        locks: super::super::snapshots::SnapshotLocks,
        /// A signalled instance exits with 128 + signal at once.
        pub obey_signals: bool,
        /// `prepare` never finishes (a registry that stalls the pull).
        pub stall_prepare: bool,
    }

    impl FakeDriver {
        pub fn obedient() -> Self {
            Self {
                obey_signals: true,
                ..Default::default()
            }
        }

        pub fn with<T>(&self, id: u64, f: impl FnOnce(&mut FakeInstance) -> T) -> T {
            let mut all = self.instances.lock().unwrap();
            f(all.get_mut(&id).expect("no such fake instance"))
        }

        /// Puts an instance there, as an earlier runner would have left it.
        pub fn insert(&self, id: u64, kind: Kind, observed: Observed) {
            let (exit, _) = watch::channel(match observed {
                Observed::Exited(c) => Some(c),
                _ => None,
            });
            self.instances.lock().unwrap().insert(
                id,
                FakeInstance {
                    kind,
                    disk: observed != Observed::Absent,
                    observed,
                    oom_kills: 0,
                    snapshots: 0,
                    signals: vec![],
                    exit,
                    started_before_boot: false,
                    made_for: None,
                },
            );
        }

        /// The instance's main process exits with `code`.
        pub fn exit(&self, id: u64, code: u32) {
            self.with(id, |i| {
                i.observed = Observed::Exited(code);
                let _ = i.exit.send(Some(code));
            });
        }

        pub fn exists(&self, id: u64) -> bool {
            self.instances.lock().unwrap().contains_key(&id)
        }

        fn started(&self, a: &Assignment) -> Result<Started, InstanceError> {
            if let Some(m) = self.fail_start.lock().unwrap().clone() {
                return Err(InstanceError::Scripted(m));
            }
            let mut all = self.instances.lock().unwrap();
            let (exit, _) = watch::channel(None);
            let i = all.entry(a.id).or_insert_with(|| FakeInstance {
                kind: a.spec.kind,
                disk: true,
                observed: Observed::Kept,
                oom_kills: 0,
                snapshots: 0,
                signals: vec![],
                exit,
                started_before_boot: false,
                made_for: Some(a.submitted_at_unix_ms),
            });
            i.observed = Observed::Running;
            let _ = i.exit.send(None);
            Ok(Started {
                pid: 1,
                host_key: (a.spec.kind == Kind::Vps).then(|| "ssh-ed25519 AAAAfake".into()),
            })
        }
    }

    impl Driver for FakeDriver {
        async fn list(&self) -> Result<Vec<Found>, InstanceError> {
            Ok(self
                .instances
                .lock()
                .unwrap()
                .iter()
                .map(|(id, i)| Found {
                    id: *id,
                    kind: Some(i.kind),
                    observed: i.observed,
                    restore_request: None,
                })
                .collect())
        }
        async fn observe(&self, id: u64) -> Result<Observed, InstanceError> {
            Ok(self
                .instances
                .lock()
                .unwrap()
                .get(&id)
                .map_or(Observed::Absent, |i| i.observed))
        }
        async fn prepare(&self, _a: &Assignment) -> Result<Vec<PortRequest>, InstanceError> {
            if self.stall_prepare {
                std::future::pending::<()>().await;
            }
            Ok(vec![])
        }
        async fn create(&self, a: &Assignment) -> Result<Started, InstanceError> {
            self.started(a)
        }
        async fn onstart(&self, a: &Assignment) -> Result<Option<u32>, InstanceError> {
            // A script that says "fail" fails.
            Ok(a.spec
                .onstart
                .as_ref()
                .map(|s| u32::from(s.contains("fail"))))
        }
        async fn start(&self, a: &Assignment) -> Result<Started, InstanceError> {
            self.started(a)
        }
        async fn made_for(&self, a: &Assignment) -> bool {
            self.instances
                .lock()
                .unwrap()
                .get(&a.id)
                .is_none_or(|i| i.made_for.is_none_or(|ms| ms == a.submitted_at_unix_ms))
        }
        async fn may_have_run(&self, id: u64) -> bool {
            self.instances
                .lock()
                .unwrap()
                .get(&id)
                .is_some_and(|i| i.started_before_boot)
        }
        async fn start_created(&self, id: u64) -> Result<(), InstanceError> {
            self.with(id, |i| i.observed = Observed::Running);
            Ok(())
        }
        async fn wait(&self, id: u64) -> Result<u32, InstanceError> {
            let mut rx = self.with(id, |i| i.exit.subscribe());
            let code = rx
                .wait_for(|c| c.is_some())
                .await
                .map_err(|_| InstanceError::NoContainer(id))?;
            Ok(code.unwrap_or_default())
        }
        async fn signal(&self, id: u64, s: Signal) -> Result<(), InstanceError> {
            self.with(id, |i| i.signals.push(s));
            if self.obey_signals {
                self.exit(
                    id,
                    128 + match s {
                        Signal::Term => 15,
                        Signal::Kill => 9,
                    },
                );
            }
            Ok(())
        }
        async fn pause(&self, id: u64) -> Result<(), InstanceError> {
            self.with(id, |i| i.observed = Observed::Paused);
            Ok(())
        }
        async fn resume(&self, id: u64) -> Result<(), InstanceError> {
            self.with(id, |i| i.observed = Observed::Running);
            Ok(())
        }
        fn exited(&self, _id: u64) {}
        fn oom_kills(&self, id: u64) -> u64 {
            self.instances
                .lock()
                .unwrap()
                .get(&id)
                .map_or(0, |i| i.oom_kills)
        }
        async fn keep(&self, id: u64) -> Vec<TeardownFailure> {
            self.with(id, |i| i.observed = Observed::Kept);
            vec![]
        }
        async fn snapshot_on_stop(&self, id: u64) -> Result<(), InstanceError> {
            self.with(id, |i| i.snapshots += 1);
            Ok(())
        }
        async fn park(&self, _id: u64) -> Result<Option<String>, InstanceError> {
            Ok(None)
        }
        async fn remove(&self, id: u64, _snapshots: bool) -> Vec<TeardownFailure> {
            self.instances.lock().unwrap().remove(&id);
            vec![]
        }
        fn lock(&self, id: u64) -> Arc<tokio::sync::Mutex<()>> {
            self.locks.of(id)
        }
        async fn converge_network(&self, _assigned: &[Assignment]) {}
        async fn converge_cpus(&self, _assigned: &[Assignment]) {}
        async fn follow_assignments(&self, _assigned: &[Assignment]) {}
        async fn converge_gpus(&self, _busy: &[u64]) {}
        async fn recover(&self) {}
    }
}

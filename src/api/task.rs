//! Tasks: what users submit, where the scheduler placed it, what the runner
//! observed, and the one state machine all of them go through.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::Target;
use crate::topology::{CpuList, PciAddress};

/// Observed state of a task. `pending` waits for resources; `stopped` (VPS
/// only) keeps the instance's disk but holds no cores or GPUs. The last five
/// are ends: a command never leaves one, a VPS leaves `completed`, `failed`,
/// `killed` and `killed_oom` only by a restart or a delete (its disk is kept
/// until then), and nothing leaves `deleted`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// A user's request that waits for an operator (`rivernode approve`);
    /// it holds nothing until then.
    PendingApproval,
    Pending,
    Assigning,
    Running,
    Paused,
    Lost,
    Stopped,
    Completed,
    Failed,
    Killed,
    KilledOom,
    /// VPS only: removed with its disk and snapshots by an explicit delete.
    Deleted,
    /// Refused by an operator; its message says why. It never ran.
    Rejected,
}

impl TaskState {
    pub const ALL: [TaskState; 13] = [
        TaskState::PendingApproval,
        TaskState::Pending,
        TaskState::Assigning,
        TaskState::Running,
        TaskState::Paused,
        TaskState::Lost,
        TaskState::Stopped,
        TaskState::Completed,
        TaskState::Failed,
        TaskState::Killed,
        TaskState::KilledOom,
        TaskState::Deleted,
        TaskState::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::PendingApproval => "pending_approval",
            TaskState::Pending => "pending",
            TaskState::Assigning => "assigning",
            TaskState::Running => "running",
            TaskState::Paused => "paused",
            TaskState::Lost => "lost",
            TaskState::Stopped => "stopped",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Killed => "killed",
            TaskState::KilledOom => "killed_oom",
            TaskState::Deleted => "deleted",
            TaskState::Rejected => "rejected",
        }
    }

    /// Whether the task has ended: it runs nothing and holds no cores,
    /// memory or GPUs. Only a VPS's restart or delete changes such a state.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Completed
                | TaskState::Failed
                | TaskState::Killed
                | TaskState::KilledOom
                | TaskState::Deleted
                | TaskState::Rejected
        )
    }

    /// Whether a VPS in this state has ended and kept its disk (stopped,
    /// killed, failed): it can start again, here or on another node.
    pub fn kept_its_disk(self) -> bool {
        matches!(
            self,
            TaskState::Stopped
                | TaskState::Killed
                | TaskState::KilledOom
                | TaskState::Failed
                | TaskState::Completed
        )
    }

    /// Whether `self → to` is allowed. Ends change only by a restart
    /// (back to `pending`) or a delete, and the store allows both for a VPS
    /// alone; a lost task may come back when its node reports it again.
    pub fn can_become(self, to: TaskState) -> bool {
        use TaskState::*;
        if self == to {
            return true;
        }
        match self {
            // Approved (queued), refused, withdrawn (killed), or a VPS deleted.
            PendingApproval => matches!(to, Pending | Rejected | Killed | Deleted),
            Pending => matches!(to, Assigning | Killed | Failed),
            Assigning => !matches!(to, Pending),
            Running => !matches!(to, Pending | Assigning),
            Paused => !matches!(to, Pending | Assigning),
            Lost => !matches!(to, Pending | Assigning),
            // A restart queues it again; a delete ends it.
            Stopped => matches!(to, Pending | Killed | Failed | Deleted),
            Completed | Failed | Killed | KilledOom => matches!(to, Pending | Deleted),
            Deleted => false,
            // Never ran: a restart would pass the approval by; a delete ends it.
            Rejected => matches!(to, Deleted),
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskState::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                let all: Vec<&str> = TaskState::ALL.iter().map(|t| t.as_str()).collect();
                format!("unknown state {s:?} (one of: {})", all.join(", "))
            })
    }
}

/// What the user wants the task to be doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    Running,
    Paused,
    /// VPS only: stop the instance, keep its disk.
    Stopped,
    /// VPS only: stop it, then start it again (the host queues the start
    /// when the runner reports it stopped).
    Restarting,
    /// End it at once. A command is gone; a VPS stops hard (SIGKILL) and
    /// keeps its disk and snapshots, to be restarted or deleted.
    Killed,
    /// VPS only: stop it and remove its disk and snapshots.
    Deleted,
}

/// Where the root filesystem comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageSource {
    /// `SHARED_DIR/environments/<name>.tar`, imported by the runner.
    Environment(String),
    /// A registry reference, pulled by the runner.
    Registry(String),
    /// A snapshot of a VPS, on the node that keeps it.
    Snapshot { vps: u64, snapshot: String },
    /// A VM base image, `SHARED_DIR/vm-images/<name>.qcow2`: the instance
    /// is a VM (`vps create --backend vm`), its disk an overlay on it.
    VmImage(String),
}

impl std::fmt::Display for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageSource::Environment(n) => write!(f, "environment {n}"),
            ImageSource::Registry(r) => write!(f, "{r}"),
            ImageSource::Snapshot { vps, snapshot } => {
                write!(f, "snapshot {snapshot} of VPS {vps}")
            }
            ImageSource::VmImage(n) => write!(f, "VM image {n}"),
        }
    }
}

/// `vps restart --from-snapshot`: the runner recreates the instance's disk
/// from `snapshot` once for each `request` (a new request, a new restore).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Restore {
    pub snapshot: String,
    pub request: i64,
    /// The snapshot is the host's parked copy (`vps restart --anywhere`):
    /// a node that lacks it fetches it, and the VPS's host key, from the host.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub parked: bool,
    /// The snapshot is on this node, where the VPS stopped (`vps restart
    /// --anywhere` while that node is online): the node it lands on fetches
    /// it from that node's runner, node to node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

/// What the host asks of a VPS's node before a move node to node
/// (`PUT /api/vps/{id}/transfer` on its runner): to let the holder of a
/// grant (whose SHA-256 this is), node `to`, read the VPS's snapshots for
/// `ttl_ms` (counted on the runner's clock: the two clocks need not
/// agree). The runner answers with the copy, as the host describes a
/// parked one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransferGrant {
    pub grant_sha256: String,
    pub to: String,
    pub snapshot: String,
    pub ttl_ms: i64,
    /// For a new VPS from `snapshot` (`vps create --from-snapshot`): that
    /// snapshot alone, without the VPS's host key.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub only: bool,
}

/// Where a node that a VPS moves to fetches it from, node to node: the
/// runner of the node it left (`url`), with a grant for its snapshots
/// (`Authorization: Bearer <grant>` at `/api/transfers/{id}/blobs/{digest}`),
/// and what it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MoveSource {
    pub node: String,
    pub url: String,
    pub grant: String,
    pub copy: ParkedVps,
}

/// A VPS's parked copy on the host: the snapshot its node took when it
/// last stopped (an image, kept blob by blob), and its SSH host key, so
/// that it can start again on another node while its own is gone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ParkedVps {
    pub vps_id: u64,
    pub snapshot: String,
    /// Its blobs' bytes together.
    pub size_bytes: u64,
    /// The hex SHA-256 of its manifest: the copy's identity.
    pub sha256: String,
    /// The instance's private host key (the node's file, in hex), sent
    /// only to the node the VPS is placed on.
    pub host_key: String,
    /// The snapshot's image manifest, and its config and layers in the
    /// manifest's order: a node fetches only the blobs its content store
    /// lacks. (None in an older host's record, of a copy kept as one
    /// archive: the host's start converts those.)
    #[serde(default)]
    pub manifest: Option<ArchiveBlob>,
    #[serde(default)]
    pub blobs: Vec<ArchiveBlob>,
    /// The VPS's snapshots on its node at the park, oldest first (the
    /// last stop's among them): they follow it to the node it moves to,
    /// and a new VPS can start from one on any node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<KeptSnapshot>,
}

impl ParkedVps {
    /// The VPS's snapshots the copy holds, oldest first: those its park
    /// named (less any deleted since); an older host's record names its
    /// last stop's alone.
    pub fn all_snapshots(&self) -> Vec<KeptSnapshot> {
        if self.snapshots.is_empty() {
            return self.stop().into_iter().collect();
        }
        self.snapshots.clone()
    }

    /// Snapshot `id` of the copy, if it holds it; its last stop's always
    /// (the VPS's disk, which a move starts from, also once that snapshot
    /// was deleted).
    pub fn kept(&self, id: &str) -> Option<KeptSnapshot> {
        let listed = self.snapshots.iter().find(|k| k.id == id).cloned();
        listed.or_else(|| self.stop().filter(|k| k.id == id))
    }

    /// Its last stop's snapshot.
    fn stop(&self) -> Option<KeptSnapshot> {
        Some(KeptSnapshot {
            id: self.snapshot.clone(),
            created_at_unix_ms: self.snapshot.parse().unwrap_or(0),
            message: None,
            size_bytes: self.blobs.last().map_or(0, |b| b.size),
            manifest: self.manifest.clone()?,
            blobs: self.blobs.clone(),
        })
    }
}

/// The longest snapshot message: containerd caps a label at 4096 bytes,
/// and messages stay well below.
pub const MAX_SNAPSHOT_MESSAGE: usize = 1024;

/// The most snapshots of a VPS one park holds (its newest).
pub const MAX_KEPT_SNAPSHOTS: usize = 64;

/// A snapshot of a parked VPS that the host keeps (blob by blob, in the
/// same store) so that it follows the VPS.
// Kept in the host's records too: no `deny_unknown_fields`, so that a
// record a later version wrote still reads (a park checks its fields).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeptSnapshot {
    pub id: String,
    pub created_at_unix_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The bytes it added (its own layer), as its node counted them.
    pub size_bytes: u64,
    pub manifest: ArchiveBlob,
    /// Its config and layers: the host fills them in from the manifest
    /// (a park sends none).
    #[serde(default)]
    pub blobs: Vec<ArchiveBlob>,
}

/// A park of a stopped VPS's snapshot (`PUT .../tasks/{id}/park`): its
/// snapshot id, host key file (hex) and image manifest, and the VPS's
/// other snapshots on the node. The host answers which blobs it still
/// lacks; with none missing, the copy is made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ParkRequest {
    pub snapshot: String,
    pub host_key: String,
    pub manifest: ArchiveBlob,
    /// Left out when empty: a host older than snapshots that follow their
    /// VPS takes the park of the stop alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<KeptSnapshot>,
}

/// The blobs (digests) a park still lacks; none: the copy is made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ParkAnswer {
    pub missing: Vec<String>,
}

/// A blob of an image the host keeps: its OCI descriptor, and where its
/// bytes lie in the file that holds it (0 for a blob in a file of its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ArchiveBlob {
    #[serde(default)]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
    /// The offset of its first byte in the host's archive.
    pub offset: u64,
}

/// A VPS snapshot: a container's filesystem changes committed as an image
/// on its node, or a copy of a VM's disk there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SnapshotView {
    /// Unique per VPS and ordered by creation (milliseconds since the epoch, made distinct).
    pub id: String,
    pub vps_id: u64,
    pub created_at_unix_ms: i64,
    /// A container's: its own layer (compressed), the changes. A VM's: the copy's file.
    pub size_bytes: u64,
    #[serde(default)]
    pub message: Option<String>,
    /// The image in the node's containerd, or the VM disk copy's path there.
    pub image: String,
    pub node: String,
    /// How consistent a VM's disk copy is (absent for containers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
}

/// How a VM's disk was when a snapshot copied it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// The VM was off.
    Stopped,
    /// Running, with its filesystems frozen by the guest agent.
    Frozen,
    /// Running, no guest agent answered: as a disk after a power cut.
    Crash,
}

impl std::fmt::Display for Consistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Consistency::Stopped => "VM stopped",
            Consistency::Frozen => "filesystems frozen",
            Consistency::Crash => "crash-consistent",
        })
    }
}

/// `POST /api/vps/snapshots/{id}` (body optional).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    #[serde(default)]
    pub message: Option<String>,
}

/// `POST /api/tasks/{id}/restart` (body optional).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartRequest {
    /// Restore the disk from this snapshot first; `"latest"` for the newest.
    #[serde(default)]
    pub from_snapshot: Option<String>,
    /// Start it on any node that fits, from its parked copy on the host
    /// (it must be stopped, with its last stop parked).
    #[serde(default)]
    pub anywhere: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MountSpec {
    pub source: String,
    pub target: String,
    #[serde(default)]
    pub read_only: bool,
}

/// `POST /api/tasks`: a command task as submitted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub mounts: Vec<MountSpec>,
    pub image: ImageSource,
    /// Whole cores (logical CPUs) reserved exclusively.
    #[serde(default = "one")]
    pub cores: u32,
    /// Memory limit and reservation; `None` = no limit, nothing reserved.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// How many GPUs, when the target does not name them.
    #[serde(default)]
    pub gpu_count: u32,
    #[serde(default)]
    pub target: Option<Target>,
    /// A one-shot command, or a long-lived instance reachable over SSH.
    #[serde(default)]
    pub kind: Kind,
    /// Public keys allowed to log in (VPS only).
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// root's password as a crypt(3) SHA-512 hash (`$6$...`), made by the
    /// client: the host and runner never see the password (VPS only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_password_hash: Option<String>,
    /// Every capability and no masked paths; refused unless the host's
    /// operator sets `allow_privileged`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub privileged: bool,
    /// Size of `/dev/shm`; default: half the memory limit, or the runner's
    /// `default_shm_size` without one (counts against the memory limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_bytes: Option<u64>,
    /// A VPS without an SSH server (`vps create --no-ssh`): no node port, no
    /// host key; its main process is `command`, else the image's Entrypoint
    /// and Cmd. Reached with `connect`, `terminal` and `forward`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_ssh: bool,
    /// Set by the host on `restart --from-snapshot` (VPS only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<Restore>,
    /// Its owner lets it move (`vps create --movable`): a plain `vps restart`
    /// while its node is offline, removed or too full for it starts it on
    /// another node from its parked copy, as `--anywhere` does.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub movable: bool,
    /// A VM's disk size (`--vm-disk`); default: its base image's own size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_disk_bytes: Option<u64>,
    /// A script a VPS runs each time it starts, after its SSH server
    /// (Vast.ai's onstart), with the instance's variables; its output goes
    /// to the VPS's log, a failure to its status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onstart: Option<String>,
    /// A `--no-ssh` VPS's arguments to its image's Entrypoint, in place of
    /// the image's Cmd (`--launch entrypoint --args ...`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Ports published through the host (`-p`), VPS only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<super::ports::PortRequest>,
    /// Vast.ai's Jupyter launch mode (`--launch jupyter`): the SSH server,
    /// then the image's Jupyter on port 8080 (published) with the token in
    /// `JUPYTER_TOKEN`, then the onstart script.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub jupyter: bool,
    /// A command task without a network (`--network none`): loopback
    /// only. Others get the instances' network, with egress.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_network: bool,
    /// The instance's hostname (Docker's and Vast.ai's `-h`); default
    /// `task-<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// A hostname an instance may have: dot-separated RFC 1123 labels (letters,
/// digits, inner hyphens; 1-63 each), at most 253 characters in all.
pub fn valid_hostname(h: &str) -> bool {
    h.len() <= 253
        && h.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

impl TaskSpec {
    /// Whether `r` asks to publish our SSH server's port: never done, it
    /// would open the server to anyone past the proxy's token check.
    pub fn asks_for_our_ssh(&self, r: &super::ports::PortRequest) -> bool {
        self.kind == Kind::Vps
            && !self.no_ssh
            && r.port == 22
            && r.proto == super::ports::Proto::Tcp
    }

    /// A VM VPS (its image a VM base image), not a container.
    pub fn is_vm(&self) -> bool {
        matches!(self.image, ImageSource::VmImage(_))
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    #[default]
    Command,
    Vps,
}

fn one() -> u32 {
    1
}

/// Where the scheduler put a task: what the ledger holds for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Placement {
    pub node: String,
    /// The NUMA node everything sits on, if it fits on one.
    pub numa: Option<u32>,
    pub cpus: CpuList,
    pub memory_bytes: u64,
    pub gpus: Vec<PciAddress>,
    /// The node port DNAT'ed to the instance's SSH port (VPS only).
    #[serde(default)]
    pub node_port: Option<u16>,
    /// Its published ports: node ports DNAT'ed to the instance, and the
    /// host's external ports relayed to them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub published: Vec<super::ports::Published>,
}

impl Placement {
    /// The node ports it holds on its node: SSH's and its published ports'.
    pub fn node_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.node_port
            .into_iter()
            .chain(self.published.iter().map(|p| p.node_port))
    }
}

/// A task as the host reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskView {
    pub id: u64,
    pub state: TaskState,
    pub desired: Desired,
    pub spec: TaskSpec,
    pub placement: Option<Placement>,
    /// Why it waits, or why it was placed where it is.
    pub reason: String,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    pub submitted_at_unix_ms: i64,
    pub started_at_unix_ms: Option<i64>,
    pub finished_at_unix_ms: Option<i64>,
    /// A VPS's SSH host key as its runner reported it.
    #[serde(default)]
    pub ssh_host_key: Option<String>,
    /// The user who submitted it; none for the admin.
    #[serde(default)]
    pub owner: Option<String>,
    /// How far its node got making it (image pull or import), while it is
    /// being made; the host keeps this in memory only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<TaskProgress>,
    /// A warning for its owner (its GPUs sit idle and it will be stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// An operator exempted it from idle-GPU reclamation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub idle_exempt: bool,
    /// The snapshot of its last stop the host keeps a copy of (with
    /// `park_stopped_vps`): `vps restart --anywhere` starts it from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<String>,
}

/// A node's word on how far it got making an instance: `phase` is what it
/// does (`pulling`, `importing`, `unpacking`), bytes of it done and in all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskProgress {
    pub phase: String,
    /// What is pulled or imported (an image reference, an environment).
    pub what: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// What a runner must converge to for one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Assignment {
    pub id: u64,
    pub desired: Desired,
    pub state: TaskState,
    /// Whether the host ever heard it running: work that never started is
    /// created after a crash, work that did is never run twice.
    #[serde(default)]
    pub started: bool,
    pub spec: TaskSpec,
    pub placement: Placement,
    /// The user it runs for; none for the admin. Picks its part of /shared.
    #[serde(default)]
    pub owner: Option<String>,
    /// When the host accepted it: with the id, which task this is (an id
    /// can come again after the host's database is reset; this does not).
    #[serde(default)]
    pub submitted_at_unix_ms: i64,
    /// The address users reach the cluster at (the host's
    /// `public_address`), for the instance's PUBLIC_IPADDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_address: Option<String>,
    /// A warning the runner writes into the instance (idle GPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    /// Its owner's number on the overlay (the VXLAN group policy id its
    /// packets carry between nodes): instances with the same one reach
    /// each other across nodes. None: no overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_group: Option<u16>,
}

/// `GET /api/nodes/{name}/assignments?after=REV`: answered when the node's
/// assignments change after revision `after` (or at the long-poll timeout).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Assignments {
    pub revision: u64,
    pub tasks: Vec<Assignment>,
    /// VPS deleted after they moved away from this node (`restart
    /// --anywhere`): what is left of them here (container, disk, older
    /// snapshots) goes, and the node says so (`DELETE .../left/{id}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forget: Vec<u64>,
}

/// The log streams of a task: its main process's, and a VPS's onstart's.
pub const LOG_STREAMS: [&str; 4] = ["stdout", "stderr", "onstart.stdout", "onstart.stderr"];

/// `POST /api/users/{name}/env`: variables to set and to remove.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserEnvChange {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub unset: Vec<String>,
}

/// `PUT /api/nodes/{name}/tasks/{id}`: what the runner observed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskReport {
    pub state: TaskState,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    /// A VPS's SSH host key (`ssh-ed25519 AAAA...`), so clients can pin it.
    #[serde(default)]
    pub ssh_host_key: Option<String>,
    /// A stopped VPS: the snapshot of this stop its node parked on the host
    /// (none: not parked, and `restart --anywhere` is refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubmitResponse {
    pub id: u64,
    pub state: TaskState,
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_rfc_1123() {
        for ok in ["billybob", "gpu-1", "a.b.example", "x9"] {
            assert!(valid_hostname(ok), "{ok}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "-bad",
            "bad-",
            "a..b",
            "under_score",
            "sp ace",
            long.as_str(),
            "new\nline",
        ] {
            assert!(!valid_hostname(bad), "{bad:?}");
        }
    }

    #[test]
    fn ends_change_only_by_restart_or_delete() {
        for from in TaskState::ALL.into_iter().filter(|s| s.is_final()) {
            for to in TaskState::ALL {
                let restart_or_delete = match from {
                    TaskState::Deleted => false,
                    TaskState::Rejected => to == TaskState::Deleted,
                    _ => matches!(to, TaskState::Pending | TaskState::Deleted),
                };
                assert_eq!(
                    from.can_become(to),
                    from == to || restart_or_delete,
                    "{from} -> {to}"
                );
            }
        }
        assert!(!TaskState::Deleted.can_become(TaskState::Pending));
        assert!(
            TaskState::PendingApproval.can_become(TaskState::Pending),
            "approved"
        );
        assert!(TaskState::PendingApproval.can_become(TaskState::Rejected));
        assert!(
            !TaskState::PendingApproval.can_become(TaskState::Assigning),
            "never placed before approval"
        );
        assert!(TaskState::Pending.can_become(TaskState::Assigning));
        assert!(!TaskState::Running.can_become(TaskState::Pending));
        assert!(
            TaskState::Lost.can_become(TaskState::Running),
            "a lost task can come back"
        );
        assert!(TaskState::Paused.can_become(TaskState::Running));
        assert!(TaskState::Running.can_become(TaskState::Stopped));
        assert!(TaskState::Stopped.can_become(TaskState::Pending), "restart");
        assert!(
            !TaskState::Stopped.can_become(TaskState::Running),
            "a restart goes through the scheduler"
        );
    }

    #[test]
    fn states_parse() {
        for s in TaskState::ALL {
            assert_eq!(s.as_str().parse::<TaskState>().unwrap(), s);
            assert_eq!(
                serde_json::to_string(&s).unwrap(),
                format!("\"{}\"", s.as_str())
            );
        }
        assert!("done"
            .parse::<TaskState>()
            .unwrap_err()
            .contains("killed_oom"));
    }

    #[test]
    fn spec_rejects_unknown_fields_and_defaults() {
        let s: TaskSpec =
            serde_json::from_str(r#"{"command":["echo"],"image":{"environment":"base"}}"#).unwrap();
        assert_eq!((s.cores, s.gpu_count, s.memory_bytes), (1, 0, None));
        let e = serde_json::from_str::<TaskSpec>(
            r#"{"command":["x"],"image":{"environment":"b"},"cpus":2}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("cpus"), "{e}");
    }
}

//! Wire types shared by the host, the runner and the CLI, and the parsers of
//! what users type (placement targets, sizes).

pub mod exec;
pub mod forward;
pub mod host_client;
pub mod http;
pub mod instance_key;
pub mod openmetrics;
pub mod ports;
pub mod runner_client;
mod target;
mod task;
pub mod token;

use serde::{Deserialize, Serialize};

pub use target::{parse_memory_size, Target, TargetError};
pub use task::{
    valid_hostname, ArchiveBlob, Assignment, Assignments, Consistency, Desired, ImageSource,
    KeptSnapshot, Kind, MountSpec, MoveSource, ParkAnswer, ParkRequest, ParkedVps, Placement,
    RestartRequest, Restore, SnapshotRequest, SnapshotView, SubmitResponse, TaskProgress,
    TaskReport, TaskSpec, TaskState, TaskView, TransferGrant, UserEnvChange, LOG_STREAMS,
    MAX_KEPT_SNAPSHOTS, MAX_SNAPSHOT_MESSAGE,
};

use crate::topology::{Inventory, Usage};

/// Body of every non-2xx answer of the host and runner APIs.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

impl ErrorBody {
    /// The `error` of an answer's body, or `None` when it is not an ErrorBody.
    pub fn message_of(text: &str) -> Option<String> {
        serde_json::from_str::<ErrorBody>(text)
            .ok()
            .map(|b| b.error)
    }
}

/// `POST /api/nodes/register`, authenticated with the cluster's join token.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegisterRequest {
    pub name: String,
    /// Where the host reaches this node's runner API.
    pub runner_url: String,
    pub heartbeat_interval_ms: u64,
    pub version: String,
    pub inventory: Inventory,
    /// A secret the runner saved before its first try: with it, a retry
    /// after a lost answer registers the same node again (fresh secrets,
    /// the old credential revoked) instead of meeting "name taken".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registration_key: Option<String>,
}

/// The node's two secrets, shown once: `credential` authenticates the runner
/// to the host; `host_token` is what the host presents to the runner API.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegisterResponse {
    pub name: String,
    pub credential: String,
    pub host_token: String,
    /// The node's instance subnet, when the host runs an overlay: taken
    /// from the cluster range, the same for this name every time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_subnet: Option<String>,
}

/// `PUT /api/nodes/{name}/heartbeat`, authenticated with the node credential.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatRequest {
    pub runner_url: String,
    pub heartbeat_interval_ms: u64,
    pub version: String,
    pub usage: Usage,
    /// Sent at start and whenever it changes, not on every beat.
    pub inventory: Option<Inventory>,
    /// Why this node cannot start instances now (containerd does not
    /// answer), on every beat while it lasts; none when it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Online,
    /// Heartbeating, but unable to start instances (see `NodeView::degraded`):
    /// nothing new is placed there.
    Degraded,
    Offline,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Online => "online",
            NodeState::Degraded => "degraded",
            NodeState::Offline => "offline",
        }
    }
}

/// A node as the host knows it (`GET /api/nodes`, `GET /api/nodes/{name}`).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeView {
    pub name: String,
    pub state: NodeState,
    pub runner_url: String,
    pub version: String,
    pub registered_at_unix_ms: i64,
    pub last_heartbeat_unix_ms: i64,
    pub heartbeat_interval_ms: u64,
    pub inventory: Inventory,
    pub usage: Option<Usage>,
    /// Why the node is degraded, as its runner last said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<String>,
    /// GPUs (by PCI address) that instances hold, with the instance's id.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub gpu_holders: std::collections::BTreeMap<crate::topology::PciAddress, u64>,
}

/// A node of the fake two-socket, four-GPU machine at `runner_url`, for
/// unit tests of what the host decides.
#[cfg(test)]
pub fn test_node(name: &str, runner_url: &str) -> NodeView {
    use crate::topology::{collect, fake::FakeMachine};
    let m = FakeMachine::two_socket_four_gpus();
    NodeView {
        name: name.into(),
        state: NodeState::Online,
        runner_url: runner_url.into(),
        version: "t".into(),
        registered_at_unix_ms: 0,
        last_heartbeat_unix_ms: 0,
        heartbeat_interval_ms: 1000,
        inventory: collect(&m.roots()).unwrap(),
        usage: None,
        degraded: None,
        gpu_holders: Default::default(),
    }
}

/// Node ports handed to instances for SSH (the Kubernetes NodePort range).
pub const NODE_PORTS: (u16, u16) = (30000, 32767);

/// The host part of a URL (`http://10.0.0.2:8001` → `10.0.0.2`): where
/// the host reaches a node, where a client reaches the host.
pub fn url_host(runner_url: &str) -> Option<String> {
    let rest = runner_url.split("://").nth(1)?;
    let origin = rest.split('/').next()?;
    let host = match origin.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => origin,
    };
    Some(host.trim_matches(['[', ']']).to_string()).filter(|h| !h.is_empty())
}

/// A runner URL's origin, `(scheme, host, port)`. Only an origin is
/// accepted (`http[s]://host[:port][/]`): the host appends its own paths,
/// and a query, fragment or user part would let a node aim the host's
/// requests (and the answers it relays) anywhere.
pub fn runner_origin(url: &str) -> Result<(String, String, u16), String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("{url:?} is not an http(s) URL"))?;
    let default_port = match scheme {
        "http" => 80,
        "https" => 443,
        _ => return Err(format!("{url:?} is not an http(s) URL")),
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!(
            "{url:?} must be only scheme://host[:port], with no path, query or user"
        ));
    }
    let (host, port) = match authority.rsplit_once(':') {
        // An IPv6 literal without a port: [::1]
        Some((h, p)) if !p.contains(']') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{url:?} has a bad port"))?,
        ),
        _ => (authority, default_port),
    };
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok((scheme.to_string(), host.to_ascii_lowercase(), port))
}

/// What the runner API answers on `GET /api/status`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunnerStatus {
    pub name: String,
    pub version: String,
}

/// `GET /api/environments`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Environments {
    pub shared_dir: String,
    pub environments: Vec<Environment>,
    /// What a task or VPS without --container or --image runs in.
    #[serde(default)]
    pub default: Option<String>,
    /// What a VM VPS without --vm-image boots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_vm_image: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Environment {
    pub name: String,
    pub size_bytes: u64,
}

/// `GET /api/nodes/{name}/environments/{env}`: what a node fetches when
/// it has no shared directory with the archive: its size and SHA-256 (the
/// name of the node's cached copy, and what the copy is checked against).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EnvironmentArchive {
    pub name: String,
    pub size_bytes: u64,
    /// Lower-case hex.
    pub sha256: String,
    /// For an OCI image layout of one image: its manifest, and its config
    /// and layers (each with where it lies in the archive), which a node
    /// fetches one by one, skipping the layers it holds. None for any
    /// other archive (`docker save`, several images): fetched whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<ArchiveBlob>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blobs: Vec<ArchiveBlob>,
}

/// The header an archive download names the digest it expects with: the
/// host answers 412 when the archive changed since (a resumed download
/// must not splice two archives together).
pub const EXPECT_SHA256: &str = "x-expect-sha256";

/// The start of a `Range: bytes=N-` header, the one form a fetch sends
/// (none without a header); an error names the forms served.
pub fn range_start(header: Option<&[u8]>) -> Result<Option<u64>, &'static str> {
    let Some(v) = header else {
        return Ok(None);
    };
    std::str::from_utf8(v)
        .ok()
        .and_then(|t| t.strip_prefix("bytes="))
        .and_then(|t| t.strip_suffix('-'))
        .and_then(|n| n.parse::<u64>().ok())
        .map(Some)
        .ok_or("Range: only bytes=N- is served")
}

/// `GET /api/whoami`: the role the presented token carries.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WhoAmI {
    pub role: String,
    pub node: Option<String>,
    /// The user a user token belongs to.
    #[serde(default)]
    pub user: Option<String>,
    /// The host's SSH proxy port (for `rivernode ssh`).
    #[serde(default)]
    pub ssh_proxy_port: u16,
    /// The address users reach the cluster at (`public_address`), where
    /// published ports answer (for `rivernode vps ports`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_address: Option<String>,
}

/// `GET /api/users`: a user and how many of their tasks have not ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserView {
    pub name: String,
    #[serde(default)]
    pub role: PersonRole,
    /// The group whose quota they share, if any.
    #[serde(default)]
    pub group: Option<String>,
    pub created_at_unix_ms: i64,
    pub active_tasks: u64,
}

/// `POST /api/invitations`: the one-time code (shown once).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Invitation {
    pub code: String,
    /// What names it in `user invitations` and `user uninvite` (not the code).
    #[serde(default)]
    pub id: String,
    pub role: PersonRole,
    pub group: Option<String>,
    pub expires_at_unix_ms: i64,
}

/// `POST /api/metrics-token`: the scrape token (shown once).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MetricsToken {
    pub token: String,
}

/// The host's answer to a heartbeat: what the runner must know now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeartbeatReply {
    /// Hashes of the tokens that may read the runner's /metrics.
    #[serde(default)]
    pub metrics_keys: Vec<String>,
    /// The overlay mesh as this node must build it; none when the host
    /// runs no overlay (`overlay_range` unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay: Option<OverlayPlan>,
    /// Park each stopped VPS on the host (`park_stopped_vps`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub park_stopped_vps: bool,
}

/// The VXLAN overlay as one node builds it: its own subnet and underlay
/// address, and every other heartbeating node's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OverlayPlan {
    pub vni: u32,
    /// The UDP port VXLAN travels on between nodes.
    pub port: u16,
    /// The cluster range every node's subnet is part of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub range: Option<String>,
    /// This node's instance subnet (a /24 of the cluster range).
    pub subnet: String,
    /// This node's address on the underlay (from its runner URL).
    pub underlay: String,
    pub peers: Vec<OverlayPeer>,
}

/// Another node of the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OverlayPeer {
    pub node: String,
    pub underlay: String,
    pub subnet: String,
}

/// `DELETE /api/nodes/{name}`: the node is forgotten; these VPS (failed
/// now) keep their disks and snapshots on that machine, where the cluster
/// no longer reaches them and never deletes them (a runner there leaves a
/// VPS no assignment names as it is): the operator frees that space there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NodeRemoved {
    pub node: String,
    pub vps_left: Vec<u64>,
}

/// `GET /api/overlay`: the cluster's overlay, node by node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OverlayView {
    /// The cluster range node subnets come from; none: no overlay.
    pub range: Option<String>,
    pub vni: u32,
    pub port: u16,
    pub nodes: Vec<OverlayNode>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OverlayNode {
    pub node: String,
    pub subnet: String,
    /// None when its runner URL names no IPv4 address: it is left out of the mesh.
    pub underlay: Option<String>,
    pub state: NodeState,
    /// Whether the others route to it now (it heartbeats and has an underlay address).
    pub in_mesh: bool,
}

/// An invitation as `GET /api/invitations` lists it (never its code).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct InvitationView {
    pub id: String,
    pub role: PersonRole,
    pub group: Option<String>,
    pub created_at_unix_ms: i64,
    pub expires_at_unix_ms: i64,
    /// Who it made, once used.
    pub used_by: Option<String>,
}

/// The id of an invitation: the start of its code's hash (the code itself
/// is shown once and never kept).
pub fn invitation_id(code_hash: &str) -> String {
    code_hash.chars().take(12).collect()
}

/// Whose quota: one user's, or a group's (all its users together).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum QuotaScope {
    User,
    Group,
}

impl QuotaScope {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaScope::User => "user",
            QuotaScope::Group => "group",
        }
    }
}

/// The most one user or group may hold at once; none: no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotaCaps {
    #[serde(default)]
    pub gpus: Option<u64>,
    /// Running (or paused) VPS; a stopped one holds nothing.
    #[serde(default)]
    pub vps: Option<u64>,
    #[serde(default)]
    pub cores: Option<u64>,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// GPU time (seconds of one GPU) its work may have had in the last
    /// `period_s`: placed GPU work past it waits until older use ages out.
    #[serde(default)]
    pub gpu_seconds: Option<u64>,
    /// The window GPU time is counted over (default a week).
    #[serde(default)]
    pub period_s: Option<u64>,
}

/// The window GPU time is counted over when a quota does not say.
pub const DEFAULT_QUOTA_PERIOD_S: u64 = 7 * 86_400;

/// GPU seconds as hours, e.g. `12.25`, `0.5`, `8` (at most two decimals,
/// three under a tenth of an hour).
pub fn gpu_hours_text(seconds: u64) -> String {
    let h = seconds as f64 / 3600.0;
    let text = if h >= 0.1 {
        format!("{h:.2}")
    } else {
        format!("{h:.3}")
    };
    // 12.50 -> 12.5, 8.00 -> 8.
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A period in words: `7d`, `12h`, `90m`, `45s`.
pub fn period_text(seconds: u64) -> String {
    match seconds {
        s if s >= 86_400 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s >= 3600 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

impl QuotaCaps {
    /// The window its GPU time is counted over.
    pub fn period(&self) -> u64 {
        self.period_s.unwrap_or(DEFAULT_QUOTA_PERIOD_S).max(1)
    }

    /// `gpus 8, vps 2, cores 32, memory 128 GiB` (the caps set).
    pub fn text(&self) -> String {
        let mut parts = Vec::new();
        for (name, v) in [
            ("gpus", self.gpus),
            ("vps", self.vps),
            ("cores", self.cores),
        ] {
            if let Some(n) = v {
                parts.push(format!("{name} {n}"));
            }
        }
        if let Some(n) = self.memory_bytes {
            parts.push(format!("memory {} GiB", n.div_ceil(1 << 30)));
        }
        if let Some(s) = self.gpu_seconds {
            parts.push(format!(
                "{} GPU-hours per {}",
                gpu_hours_text(s),
                period_text(self.period())
            ));
        }
        if parts.is_empty() {
            "no limits".into()
        } else {
            parts.join(", ")
        }
    }
}

/// What a user or group holds now (placed work only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuotaUse {
    pub gpus: u64,
    pub vps: u64,
    pub cores: u64,
    pub memory_bytes: u64,
    /// GPU seconds had in the quota's period (placed work so far included).
    #[serde(default)]
    pub gpu_seconds: u64,
}

impl QuotaUse {
    pub fn plus(&self, o: &QuotaUse) -> QuotaUse {
        QuotaUse {
            gpus: self.gpus + o.gpus,
            vps: self.vps + o.vps,
            cores: self.cores + o.cores,
            memory_bytes: self.memory_bytes + o.memory_bytes,
            gpu_seconds: self.gpu_seconds + o.gpu_seconds,
        }
    }
}

/// A quota with what its user or group holds now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QuotaView {
    pub scope: QuotaScope,
    pub name: String,
    pub caps: QuotaCaps,
    pub used: QuotaUse,
}

/// What a person's token may do (the admin's is not a person's): `viewer`
/// reads the cluster, `user` runs their own work, `operator` also runs
/// everyone's (approves, stops, kills) without reaching inside it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PersonRole {
    Viewer,
    #[default]
    User,
    Operator,
}

impl PersonRole {
    pub fn as_str(self) -> &'static str {
        match self {
            PersonRole::Viewer => "viewer",
            PersonRole::User => "user",
            PersonRole::Operator => "operator",
        }
    }
}

impl std::str::FromStr for PersonRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(PersonRole::Viewer),
            "user" => Ok(PersonRole::User),
            "operator" => Ok(PersonRole::Operator),
            _ => Err(format!("{s:?} is not one of viewer, user, operator")),
        }
    }
}

/// `POST /api/users`: the new user's token, shown once.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewUser {
    pub name: String,
    pub token: String,
}

/// User names appear in logs and tables: 1–32 characters of `[a-z0-9_-]`,
/// starting with a letter (like a Unix login name).
pub fn validate_user_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
    if name.is_empty()
        || name.len() > 32
        || !name.chars().all(ok_char)
        || !name.starts_with(|c: char| c.is_ascii_lowercase())
    {
        return Err(format!(
            "user name {name:?} must be 1 to 32 lower-case letters, digits, '-' or '_', starting with a letter"
        ));
    }
    if name == "admin" {
        return Err("user name \"admin\" is taken by the cluster's admin".into());
    }
    Ok(())
}

/// Environment and VM image names are file names in the shared directory:
/// 1–128 of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn valid_image_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Node names end up in URLs, file names and interface names: keep them to
/// 1–63 characters of `[a-z0-9.-]`, starting with a letter or digit (a DNS label).
pub fn validate_node_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    if name.is_empty() || name.len() > 63 {
        return Err(format!(
            "node name {name:?} must be 1 to 63 characters long"
        ));
    }
    if !name.chars().all(ok_char) || !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!(
            "node name {name:?} may hold only lower-case letters, digits, '-' and '.', and must start with a letter or digit"
        ));
    }
    // `/api/nodes/register` would shadow `/api/nodes/{name}` (L3).
    if RESERVED_NODE_NAMES.contains(&name) {
        return Err(format!("node name {name:?} is reserved; choose another"));
    }
    Ok(())
}

/// Names that are API paths under `/api/nodes/`.
pub const RESERVED_NODE_NAMES: &[&str] = &["register"];

/// An SSH host key as `ssh-keygen` writes one: `type base64 [comment]` on
/// one line, of a key type OpenSSH knows. The host writes it into users'
/// known_hosts files, so nothing else may pass (L1).
pub fn valid_ssh_host_key(key: &str) -> bool {
    const TYPES: [&str; 6] = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
    ];
    let mut parts = key.split(' ');
    let (Some(t), Some(b64)) = (parts.next(), parts.next()) else {
        return false;
    };
    key.len() <= 16 << 10
        && !key.contains(['\n', '\r', '\0'])
        && key.chars().all(|c| c.is_ascii_graphic() || c == ' ')
        && TYPES.contains(&t)
        && !b64.is_empty()
        && b64
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b))
}

/// A hostname turned into a valid node name (lower-cased, other characters replaced).
pub fn node_name_from_hostname(hostname: &str) -> String {
    let mut n: String = hostname
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if !n.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        n.insert(0, 'n');
        n.truncate(63);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_come_from_urls() {
        assert_eq!(
            url_host("http://10.0.0.2:8001").as_deref(),
            Some("10.0.0.2")
        );
        assert_eq!(
            url_host("http://[fd00::2]:8001/").as_deref(),
            Some("fd00::2")
        );
        assert_eq!(url_host("https://gpu1").as_deref(), Some("gpu1"));
        assert_eq!(url_host("gpu1:8001"), None);
    }

    #[test]
    fn image_names_are_file_names_that_stay_in_their_directory() {
        for ok in ["ubuntu-24.04", "mini", "a_b.c"] {
            assert!(valid_image_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "../x", "a/b", "a b", &"x".repeat(129)] {
            assert!(!valid_image_name(bad), "{bad}");
        }
    }

    #[test]
    fn node_names() {
        assert!(validate_node_name("gpu-node1.lab").is_ok());
        assert!(validate_node_name("register")
            .unwrap_err()
            .contains("reserved"));
        assert!(valid_ssh_host_key(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG4x root@vps"
        ));
        assert!(valid_ssh_host_key("ecdsa-sha2-nistp256 AAAAE2Vj="));
        for bad in [
            "ssh-ed25519 AAAA\n@cert-authority * ssh-ed25519 AAAA",
            "ssh-ed25519",
            "bogus AAAA",
            "ssh-ed25519 AA*A",
            "ssh-ed25519 AAAA\r",
        ] {
            assert!(!valid_ssh_host_key(bad), "{bad:?}");
        }
        assert_eq!(
            runner_origin("http://10.0.0.2:8001").unwrap(),
            ("http".into(), "10.0.0.2".into(), 8001)
        );
        assert_eq!(runner_origin("https://Node1/").unwrap().1, "node1");
        assert_eq!(runner_origin("https://node1").unwrap().2, 443);
        assert_eq!(runner_origin("http://[::1]:8001").unwrap().1, "[::1]");
        for bad in [
            "ftp://x",
            "http://169.254.169.254/latest/meta-data?",
            "http://x:8001/?",
            "http://u@x:8001",
            "http://x:8001#f",
            "http://:8001",
            "http://x:port",
            "x:8001",
        ] {
            assert!(runner_origin(bad).is_err(), "{bad}");
        }
        for bad in ["", "-x", "UPPER", "a b", "a/b", &"x".repeat(64)] {
            assert!(validate_node_name(bad).is_err(), "{bad}");
        }
        assert_eq!(node_name_from_hostname("My_Host\n"), "my-host");
        assert_eq!(node_name_from_hostname("_x"), "n-x");
        assert!(validate_node_name(&node_name_from_hostname(&"Q".repeat(80))).is_ok());
    }
}

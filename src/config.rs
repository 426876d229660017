//! Configuration of `rivernode host` and `rivernode runner`: built-in defaults,
//! then a TOML file, then `RIVERNODE_<KEY>` environment variables, then flags.
//! Every layer is checked on its own so an error names the file line, the
//! variable or the flag that holds the bad value.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// A duration written as `500ms`, `5s`, `2m`, `1h` or `7d` (a bare integer means seconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// Parses `500ms`, `5s`, `2m`, `1h`, `7d` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 500ms, 5s, 2m, 1h, 7d)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        "d" => Duration::from_secs(n.saturating_mul(86_400)),
        _ => return Err(format!("{s:?} has an unknown unit (use ms, s, m, h or d)")),
    };
    Ok(d)
}

impl std::str::FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(Self)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms % 1000 != 0 {
            write!(f, "{ms}ms")
        } else {
            write!(f, "{}s", ms / 1000)
        }
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) => Ok(Self(Duration::from_secs(n))),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A size written as `512M`, `8G`, `1.5T` or a bare number of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HumanSize(pub u64);

impl std::str::FromStr for HumanSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::api::parse_memory_size(s).map(Self)
    }
}

impl fmt::Display for HumanSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let units = [(40, "T"), (30, "G"), (20, "M"), (10, "K")];
        match units
            .iter()
            .find(|(shift, _)| self.0 != 0 && self.0 % (1u64 << shift) == 0)
        {
            Some((shift, unit)) => write!(f, "{}{unit}", self.0 >> shift),
            None => write!(f, "{}", self.0),
        }
    }
}

impl Serialize for HumanSize {
    /// `8G` when a unit divides it, else the number of bytes: a size is
    /// written back only in a form that reads as the same size (a bare
    /// number in text would be refused as unit-less; found by fuzzing).
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 != 0 && self.0 % 1024 == 0 {
            s.collect_str(self)
        } else {
            s.serialize_u64(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for HumanSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Self(n)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Declares a config struct, its all-optional layer (one per source), the
/// list of keys with their documentation, and the merge of a layer onto it.
macro_rules! layered_config {
    (
        $(#[$meta:meta])*
        pub struct $name:ident, layer $layer:ident {
            $( $(#[doc = $doc:literal])+ $field:ident : $ty:ty = $default:expr, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Serialize)]
        pub struct $name { $( $(#[doc = $doc])+ pub $field: $ty, )* }

        /// One source's settings; `None` means "this source does not set it".
        #[derive(Clone, Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct $layer { $( #[serde(default)] pub $field: Option<$ty>, )* }

        impl Default for $name {
            fn default() -> Self { Self { $( $field: $default, )* } }
        }

        impl $name {
            /// (key, documentation) for every setting, in declaration order.
            pub const KEYS: &'static [(&'static str, &'static str)] =
                &[ $( (stringify!($field), concat!($($doc, "\n"),+)), )* ];

            pub fn apply(&mut self, layer: $layer) {
                $( if let Some(v) = layer.$field { self.$field = v; } )*
            }
        }
    };
}

layered_config! {
    /// Settings of `rivernode host`.
    pub struct HostConfig, layer HostLayer {
        /// Directory for the SQLite store, tokens and the API URL file.
        data_dir: PathBuf = PathBuf::from("/var/lib/rivernode"),
        /// Address the API and the SSH proxy listen on.
        bind: IpAddr = IpAddr::from([0, 0, 0, 0]),
        /// HTTP API port (`/api/...`), used by the CLI and the runners; 0 picks a free port.
        api_port: u16 = 8000,
        /// SSH proxy port (the proxy itself arrives with the VPS work).
        ssh_proxy_port: u16 = 8002,
        /// URL written to DATA_DIR/api.url for local clients; default http://<bind>:<api_port>.
        advertise_url: Option<String> = None,
        /// The address users reach the cluster at, given to instances as
        /// PUBLIC_IPADDR; default: the host part of advertise_url.
        public_address: Option<String> = None,
        /// A node is marked offline after this many heartbeat intervals without one.
        offline_after_missed: u32 = 3,
        /// How often the host looks for nodes that went silent.
        liveness_check_interval: HumanDuration = HumanDuration(Duration::from_secs(1)),
        /// Cluster-shared directory, the same on every node: environments/<name>.tar live here.
        shared_dir: PathBuf = PathBuf::from("/mnt/cluster-share"),
        /// Whether tasks and VPS may ask for `--privileged` (every capability,
        /// no masked /proc and /sys paths): a privileged instance can take over its node.
        /// Only the admin may, unless privileged_users names others.
        allow_privileged: bool = false,
        /// Users (besides the admin) who may ask for `--privileged` when allow_privileged is on.
        privileged_users: Vec<String> = Vec::new(),
        /// Time a client has to send a request's headers before the API closes its connection.
        http_header_timeout: HumanDuration = HumanDuration(Duration::from_secs(10)),
        /// Connections the API holds open at once; one more is closed at once.
        http_max_connections: usize = 1024,
        /// Tunnels the SSH proxy holds open at once (each holds two descriptors;
        /// fewer when the host's descriptor limit is lower: see the log).
        ssh_proxy_max_tunnels: usize = 16384,
        /// Tasks one user may have waiting for resources at once; one more is refused (429).
        /// The admin is not capped.
        max_waiting_per_user: u32 = 1000,
        /// The environment a task or VPS without --container or --image runs in
        /// (KohakuRiver's default container); none: they must say.
        default_environment: Option<String> = None,
        /// The base image `vps create --backend vm` without --vm-image boots
        /// (KohakuRiver's default VM image); none: they must say.
        default_vm_image: Option<String> = None,
        /// External ports the host gives published ports (`vps create -p`), FIRST-LAST:
        /// users reach an instance's port at the host's address and one of these.
        /// Keep it clear of the node ports (30000-32767) and of the kernel's ephemeral
        /// ports (net.ipv4.ip_local_port_range, 32768-60999 by default).
        published_ports: String = "20000-29999".to_string(),
        /// Published ports one user's VPS may hold in all (they hold them until deleted);
        /// one more is refused (429). The admin is not capped.
        max_published_ports_per_user: u32 = 256,
        /// Which of a `user`'s requests wait in pending_approval until an operator or the
        /// admin runs `rivernode approve ID` (or `reject`): a comma list of `vps` (their VPS,
        /// as KohakuRiver does) and `gpu` (their command tasks that ask for GPUs), or `none`.
        approval: String = "vps".to_string(),
        /// A request for no GPUs never waits for approval.
        approval_skips_cpu_only: bool = false,
        /// A VPS whose GPUs all stay below idle_gpu_threshold percent for this long is
        /// warned (in `vps status` and in /.rivernode/instance/idle-warning), then stopped
        /// after idle_gpu_grace (disk kept, GPUs freed). Unset: never.
        idle_gpu_after: Option<HumanDuration> = None,
        /// Time between the idle warning and the stop.
        idle_gpu_grace: HumanDuration = HumanDuration(Duration::from_secs(3600)),
        /// Utilisation (percent, NVML's) below which a GPU counts as idle.
        idle_gpu_threshold: u32 = 5,
        /// The cluster range of the VXLAN overlay, e.g. 10.200.0.0/16: each node gets a
        /// /24 of it as its instance subnet (in place of its instance_subnet) when it
        /// registers, nodes route to each other's subnets over VXLAN, and one user's
        /// instances reach each other across nodes (other users' do not). Unset: no overlay.
        /// Set it before nodes register: a node takes its subnet at registration.
        overlay_range: Option<String> = None,
        /// The overlay's VXLAN network identifier.
        overlay_vni: u32 = 4242,
        /// The UDP port VXLAN travels on between nodes (open it between them).
        overlay_port: u16 = 4789,
        /// Keep a copy of every container VPS's stop on the host (its snapshot of that
        /// stop, exported by its node, and its host key, in data_dir/parked), so that
        /// `vps restart --anywhere` starts it on another node while its own is gone. It
        /// costs the host a whole image archive per stopped VPS, and each stop the upload.
        park_stopped_vps: bool = false,
    }
}

layered_config! {
    /// Settings of `rivernode runner`.
    pub struct RunnerConfig, layer RunnerLayer {
        /// Directory for the runner's credential and local state.
        data_dir: PathBuf = PathBuf::from("/var/lib/rivernode"),
        /// Node name in the cluster; default: the machine's hostname.
        name: Option<String> = None,
        /// URL of the host API.
        host_url: String = "http://127.0.0.1:8000".to_string(),
        /// Join token printed by the host (DATA_DIR/join.token on the host machine).
        join_token: Option<String> = None,
        /// File holding the join token, instead of putting it in this file.
        join_token_file: Option<PathBuf> = None,
        /// Address the runner API listens on.
        bind: IpAddr = IpAddr::from([0, 0, 0, 0]),
        /// Runner API port; only the host may call it; 0 picks a free port.
        runner_port: u16 = 8001,
        /// URL the host uses to reach this runner; default http://<bind>:<runner_port>.
        advertise_url: Option<String> = None,
        /// Time between heartbeats.
        heartbeat_interval: HumanDuration = HumanDuration(Duration::from_secs(5)),
        /// Root of sysfs (tests point this at a fake tree).
        sys_root: PathBuf = PathBuf::from("/sys"),
        /// Root of procfs (tests point this at a fake tree).
        proc_root: PathBuf = PathBuf::from("/proc"),
        /// containerd's socket.
        containerd_socket: PathBuf = PathBuf::from("/run/containerd/containerd.sock"),
        /// containerd snapshotter for task root filesystems.
        snapshotter: String = "overlayfs".to_string(),
        /// Cluster-shared directory: environments/<name>.tar live here; mounted at /shared in tasks.
        shared_dir: PathBuf = PathBuf::from("/mnt/cluster-share"),
        /// /shared in an instance is SHARED_DIR/users/<owner> (the admin's: SHARED_DIR/admin), so
        /// users cannot change each other's files; false mounts all of SHARED_DIR (one trusted team).
        shared_per_user: bool = true,
        /// Time between SIGTERM and SIGKILL when a task is killed.
        kill_grace: HumanDuration = HumanDuration(Duration::from_secs(10)),
        /// cgroup parent of task containers, relative to the cgroup root.
        cgroup_parent: String = "/rivernode".to_string(),
        /// Size at which a task's stdout or stderr log is rotated (one old file is kept).
        max_log_bytes: u64 = 100 << 20,
        /// Registries (host:port) pulled from over plain HTTP, e.g. a registry on loopback. Never a default.
        insecure_registries: Vec<String> = Vec::new(),
        /// Bridge that instances (VPS) attach to.
        instance_bridge: String = "river0".to_string(),
        /// Subnet of the instance bridge; the bridge takes the first address. When the
        /// host runs an overlay (its overlay_range), the subnet it gives the node instead.
        instance_subnet: String = "10.88.0.0/24".to_string(),
        /// The VXLAN device of the overlay between nodes (when the host runs one).
        overlay_device: String = "rn-overlay".to_string(),
        /// The node's nftables table (inet family).
        nft_table: String = "rivernode".to_string(),
        /// The dropbear binary injected into images that have no SSH server.
        dropbear: PathBuf = PathBuf::from("/usr/sbin/dropbear"),
        /// Take a snapshot of a VPS each time it is stopped (AUTO_SNAPSHOT_ON_STOP).
        auto_snapshot_on_stop: bool = true,
        /// Snapshots kept per VPS; the oldest beyond it are deleted; 0 keeps all (MAX_SNAPSHOTS_PER_VPS).
        max_snapshots_per_vps: u32 = 5,
        /// Addresses, besides the host's (from host_url), that may use node ports from outside
        /// (a host that connects from another address). Nobody else reaches instances' SSH servers.
        node_port_sources: Vec<std::net::Ipv4Addr> = Vec::new(),
        /// Instances (VPS) cannot reach each other on the instance bridge (its ports are isolated).
        isolate_instances: bool = true,
        /// IPv4 networks (CIDR) instances may not reach, e.g. a storage network that trusts
        /// this node's address. Link-local (cloud metadata) is always closed.
        blocked_networks: Vec<String> = Vec::new(),
        /// Where instances reach the in-instance API (`vastai stop instance $CONTAINER_ID`
        /// with their CONTAINER_API_KEY): a link-local address:port put on the instance bridge
        /// and answered by the runner, for instances only. Not port 80: a web server on the
        /// node listening on every address would hold it. Empty: none.
        instance_api_address: String = "169.254.42.1:4280".to_string(),
        /// CDI spec directories, in priority order (a later one wins), as nvidia-ctk writes them.
        cdi_spec_dirs: Vec<PathBuf> = vec![PathBuf::from("/etc/cdi"), PathBuf::from("/var/run/cdi")],
        /// The NVIDIA driver's procfs directory (GPU UUIDs and device minors).
        nvidia_driver_root: PathBuf = PathBuf::from("/proc/driver/nvidia"),
        /// NVML, for GPU UUIDs and the utilisation readings heartbeats carry (the idle-GPU
        /// check); a bare name is searched by the dynamic loader. Absent: no readings.
        nvml_library: PathBuf = PathBuf::from(crate::topology::nvml::LIBRARY),
        /// The kernel log, where NVIDIA's driver reports Xid errors (tests point this at a file).
        kmsg_path: PathBuf = PathBuf::from("/dev/kmsg"),
        /// Where the node's device nodes are (tests point this at a fake tree).
        dev_root: PathBuf = PathBuf::from("/dev"),
        /// Memory held back for the node itself (kernel, runner, containerd,
        /// libvirt, each VM's QEMU), never given to instances; unset: a
        /// twentieth of the node's memory, at least 1 GiB and at most a quarter.
        reserved_memory: Option<HumanSize> = None,
        /// Size of /dev/shm for an instance without a memory limit or --shm-size.
        default_shm_size: HumanSize = HumanSize(8 << 30),
        /// Time a client has to send a request's headers before the runner API closes its connection.
        http_header_timeout: HumanDuration = HumanDuration(Duration::from_secs(10)),
        /// Connections the runner API holds open at once.
        http_max_connections: usize = 64,
        /// libvirt's URI for VM VPS; empty: this node runs no VMs.
        libvirt_uri: String = "qemu:///system".to_string(),
        /// How VMs run: kvm (hardware, the host's CPU model) or qemu (TCG emulation, for tests).
        vm_accel: String = "kvm".to_string(),
        /// VM firmware: uefi (OVMF, Secure Boot off; GPUs need it) or bios (SeaBIOS).
        vm_firmware: String = "uefi".to_string(),
        /// Boot every VM with this kernel from the node instead of its image's boot loader.
        vm_kernel: Option<PathBuf> = None,
        /// The initrd for vm_kernel.
        vm_initrd: Option<PathBuf> = None,
        /// The kernel command line for vm_kernel.
        vm_cmdline: String = "console=ttyS0".to_string(),
        /// How QEMU caches VM disks: none (O_DIRECT) or writeback (for filesystems without O_DIRECT, e.g. tmpfs).
        vm_disk_cache: String = "none".to_string(),
        /// Where VMs' files live (images/, vms/<instance>/): a tree QEMU, running as libvirt's
        /// user, can pass through (the runner's own data directory is closed to it).
        vm_store: PathBuf = PathBuf::from("/var/lib/libvirt/rivernode"),
    }
}

impl HostConfig {
    /// The approval settings; `validate` has checked them.
    pub fn approval(&self) -> Result<crate::host::approval::Approval, ConfigError> {
        crate::host::approval::Approval::parse(&self.approval, self.approval_skips_cpu_only)
            .map_err(|message| ConfigError::Invalid {
                key: "approval",
                message,
            })
    }

    /// The idle-GPU settings, none when off; `validate` has checked them.
    pub fn idle_policy(&self) -> Result<Option<crate::host::idle::IdlePolicy>, ConfigError> {
        let Some(after) = self.idle_gpu_after else {
            return Ok(None);
        };
        check_nonzero("idle_gpu_after", after)?;
        if self.idle_gpu_threshold == 0 || self.idle_gpu_threshold > 100 {
            return Err(ConfigError::Invalid {
                key: "idle_gpu_threshold",
                message: format!(
                    "{} is not a utilisation percent from 1 to 100",
                    self.idle_gpu_threshold
                ),
            });
        }
        Ok(Some(crate::host::idle::IdlePolicy {
            threshold_percent: self.idle_gpu_threshold,
            after: after.0,
            grace: self.idle_gpu_grace.0,
            // Each node's own heartbeat interval sets this (see the heartbeat route).
            max_gap: Duration::ZERO,
        }))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.approval()?;
        self.idle_policy()?;
        if self.api_port != 0 && self.api_port == self.ssh_proxy_port {
            return Err(ConfigError::Invalid {
                key: "ssh_proxy_port",
                message: format!("must differ from api_port ({})", self.api_port),
            });
        }
        if self.offline_after_missed == 0 {
            return Err(ConfigError::Invalid {
                key: "offline_after_missed",
                message: "must be at least 1".into(),
            });
        }
        check_nonzero("liveness_check_interval", self.liveness_check_interval)?;
        if let Some(url) = &self.advertise_url {
            check_url("advertise_url", url)?;
        }
        self.published_range()?;
        self.overlay()?;
        Ok(())
    }

    /// The overlay's settings; none when `overlay_range` is unset.
    pub fn overlay(&self) -> Result<Option<crate::host::overlay::Overlay>, ConfigError> {
        let Some(range) = &self.overlay_range else {
            return Ok(None);
        };
        crate::host::overlay::Overlay::new(range, self.overlay_vni, self.overlay_port)
            .map(Some)
            .map_err(|message| ConfigError::Invalid {
                key: "overlay_range",
                message,
            })
    }

    /// `published_ports` as a range, refused when it is not one or meets
    /// the node ports or the host's own ports.
    pub fn published_range(&self) -> Result<crate::api::ports::PortRange, ConfigError> {
        let invalid = |message| ConfigError::Invalid {
            key: "published_ports",
            message,
        };
        let r = crate::api::ports::PortRange::parse(&self.published_ports).map_err(invalid)?;
        if r.first < 1024 {
            return Err(invalid(format!(
                "{r} starts below 1024: the system's own services live there; pick a range above"
            )));
        }
        let (first, last) = crate::api::NODE_PORTS;
        if r.overlaps(first, last) {
            return Err(invalid(format!(
                "{r} meets the node ports ({first}-{last}); pick a range outside them"
            )));
        }
        for (key, port) in [
            ("api_port", self.api_port),
            ("ssh_proxy_port", self.ssh_proxy_port),
        ] {
            if r.contains(port) {
                return Err(invalid(format!("{r} holds {key} ({port})")));
            }
        }
        Ok(r)
    }

    /// The URL a client on this machine uses to reach the API listening on `port`.
    pub fn local_url(&self, port: u16) -> String {
        if let Some(u) = &self.advertise_url {
            return u.trim_end_matches('/').to_string();
        }
        format!("http://{}", socket_for_clients(self.bind, port))
    }
}

impl RunnerConfig {
    /// The in-instance API's address; none if turned off (or invalid: `validate` says so).
    pub fn instance_api(&self) -> Option<std::net::SocketAddrV4> {
        self.instance_api_address.parse().ok()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        check_url("host_url", &self.host_url)?;
        check_nonzero("heartbeat_interval", self.heartbeat_interval)?;
        if let Some(url) = &self.advertise_url {
            check_url("advertise_url", url)?;
        }
        self.instance_subnet
            .parse::<crate::net::Ipv4Net>()
            .map_err(|message| ConfigError::Invalid {
                key: "instance_subnet",
                message,
            })?;
        for net in &self.blocked_networks {
            net.parse::<crate::net::Ipv4Net>()
                .map_err(|message| ConfigError::Invalid {
                    key: "blocked_networks",
                    message,
                })?;
        }
        if !self.instance_api_address.is_empty() {
            let addr: std::net::SocketAddrV4 =
                self.instance_api_address
                    .parse()
                    .map_err(|e| ConfigError::Invalid {
                        key: "instance_api_address",
                        message: format!("an IPv4 address:port, e.g. 169.254.42.1:4280 ({e})"),
                    })?;
            if !addr.ip().is_link_local() || addr.port() == 0 {
                return Err(ConfigError::Invalid {
                    key: "instance_api_address",
                    message: "a link-local address (169.254.0.0/16) and a port: an instance reaches it on its node only".into(),
                });
            }
            // Put on the bridge, these would take the node's own cloud
            // metadata (and ECS credentials) service from it.
            if [[169, 254, 169, 254], [169, 254, 170, 2]].contains(&addr.ip().octets()) {
                return Err(ConfigError::Invalid {
                    key: "instance_api_address",
                    message: format!("{} is a cloud's metadata address; the node may need it: choose another, e.g. 169.254.42.1:4280", addr.ip()),
                });
            }
        }
        for (key, name) in [
            ("instance_bridge", &self.instance_bridge),
            ("overlay_device", &self.overlay_device),
        ] {
            if !crate::net::tap::valid_link_name(name) {
                return Err(ConfigError::Invalid {
                    key,
                    message: "an interface name of 1 to 15 characters".into(),
                });
            }
        }
        if let Some(name) = &self.name {
            crate::api::validate_node_name(name).map_err(|message| ConfigError::Invalid {
                key: "name",
                message,
            })?;
        }
        for (key, value, allowed) in [
            ("vm_accel", &self.vm_accel, &["kvm", "qemu"][..]),
            ("vm_firmware", &self.vm_firmware, &["uefi", "bios"][..]),
            (
                "vm_disk_cache",
                &self.vm_disk_cache,
                &["none", "writeback"][..],
            ),
        ] {
            if !allowed.contains(&value.as_str()) {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!("{value:?}: say {}", allowed.join(" or ")),
                });
            }
        }
        if self.vm_initrd.is_some() && self.vm_kernel.is_none() {
            return Err(ConfigError::Invalid {
                key: "vm_initrd",
                message: "an initrd needs vm_kernel too".into(),
            });
        }
        Ok(())
    }

    /// The URL the host uses to reach the runner API listening on `port`.
    pub fn runner_url(&self, port: u16) -> String {
        if let Some(u) = &self.advertise_url {
            return u.trim_end_matches('/').to_string();
        }
        format!("http://{}", socket_for_clients(self.bind, port))
    }
}

/// A wildcard bind address is not something a client can connect to: use loopback.
fn socket_for_clients(bind: IpAddr, port: u16) -> std::net::SocketAddr {
    let ip = if bind.is_unspecified() {
        IpAddr::from([127, 0, 0, 1])
    } else {
        bind
    };
    std::net::SocketAddr::new(ip, port)
}

fn check_nonzero(key: &'static str, d: HumanDuration) -> Result<(), ConfigError> {
    if d.0.is_zero() {
        return Err(ConfigError::Invalid {
            key,
            message: "must be longer than 0".into(),
        });
    }
    Ok(())
}

fn check_url(key: &'static str, url: &str) -> Result<(), ConfigError> {
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() < 10 {
        return Err(ConfigError::Invalid {
            key,
            message: format!("{url:?} is not an http:// or https:// URL"),
        });
    }
    Ok(())
}

/// `rivernode up --config FILE`: both daemons' settings in one file, as a
/// `[host]` and a `[runner]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpLayer {
    #[serde(default)]
    pub host: HostLayer,
    #[serde(default)]
    pub runner: RunnerLayer,
}

/// Reads one TOML layer. A missing file is an error only when `required`.
pub fn read_file_layer<L: for<'de> Deserialize<'de> + Default>(
    path: &Path,
    required: bool,
) -> Result<L, ConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(L::default()),
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|s| format!("line {}: ", text[..s.start].matches('\n').count() + 1))
            .unwrap_or_default();
        ConfigError::File {
            path: path.to_path_buf(),
            message: format!("{line}{}", e.message().trim()),
        }
    })
}

/// Reads `RIVERNODE_<KEY>` for every key of the config. Values are read as
/// TOML where they parse (`8000`, `true`) and as plain strings otherwise.
/// Variables that are not config keys (e.g. `RIVERNODE_TOKEN`) are ignored.
pub fn read_env_layer<L: for<'de> Deserialize<'de> + Default>(
    keys: &[(&str, &str)],
    env: impl Fn(&str) -> Option<String>,
) -> Result<L, ConfigError> {
    let mut table = toml::Table::new();
    for (key, _) in keys {
        let var = format!("RIVERNODE_{}", key.to_ascii_uppercase());
        let Some(raw) = env(&var) else { continue };
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(raw));
        let mut one = toml::Table::new();
        one.insert(key.to_string(), value.clone());
        // Checked key by key so that the error names the variable.
        toml::Value::Table(one)
            .try_into::<L>()
            .map_err(|e| ConfigError::Env {
                var: var.clone(),
                message: e.message().trim().to_string(),
            })?;
        table.insert(key.to_string(), value);
    }
    toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| ConfigError::Env {
            var: "RIVERNODE_*".into(),
            message: e.message().trim().to_string(),
        })
}

/// The commented file `rivernode config init` prints.
pub fn render_defaults<C: Serialize>(title: &str, keys: &[(&str, &str)], defaults: &C) -> String {
    let values = toml::Value::try_from(defaults).ok();
    let mut out = format!(
        "# {title}\n# Every key is optional; the value shown is the default.\n# Each key can also be set as RIVERNODE_<KEY> in the environment or as a flag.\n"
    );
    for (key, doc) in keys {
        out.push('\n');
        for line in doc.lines() {
            out.push_str(&format!("#{line}\n"));
        }
        match values.as_ref().and_then(|v| v.get(key)) {
            Some(v) => out.push_str(&format!("#{key} = {v}\n")),
            None => out.push_str(&format!("#{key} = \"\"   (unset)\n")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_in_instance_api_takes_a_link_local_address_but_not_a_clouds_metadata_one() {
        let with = |addr: &str| RunnerConfig {
            instance_api_address: addr.into(),
            ..RunnerConfig::default()
        };
        assert!(with("169.254.42.1:4280").validate().is_ok());
        assert!(with("").validate().is_ok(), "turned off");
        assert_eq!(with("").instance_api(), None);
        for bad in [
            "169.254.169.254:80",
            "169.254.170.2:80",
            "10.0.0.1:80",
            "169.254.42.1:0",
            "x",
        ] {
            let e = with(bad).validate().unwrap_err().to_string();
            assert!(e.contains("instance_api_address"), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes_are_written_back_as_what_reads_as_the_same_size() {
        // A fuzz find: 1.1M is 1153434 bytes, and "1153434" alone reads as no unit.
        for n in [8u64 << 30, 1_153_434, 1024, 1] {
            let v = serde_json::to_value(HumanSize(n)).unwrap();
            assert_eq!(serde_json::from_value::<HumanSize>(v).unwrap().0, n);
        }
        assert_eq!(
            serde_json::to_value(HumanSize(8 << 30)).unwrap(),
            serde_json::json!("8G")
        );
    }

    #[test]
    fn durations() {
        assert_eq!(
            "500ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            "5s".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(5)
        );
        assert_eq!(
            "2m".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(120)
        );
        assert_eq!(
            "7".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(7)
        );
        // `user invite --expires 7d`, `quota set --period 30d`.
        assert_eq!(
            "7d".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(7 * 86_400)
        );
        for bad in ["", "s", "5x", "-1s", "1.5s"] {
            assert!(bad.parse::<HumanDuration>().is_err(), "{bad}");
        }
        assert_eq!(
            HumanDuration(Duration::from_millis(250)).to_string(),
            "250ms"
        );
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("host.toml");
        std::fs::write(&f, "api_port = 9000\nliveness_check_interval = \"250ms\"\n").unwrap();
        let mut cfg = HostConfig::default();
        cfg.apply(read_file_layer(&f, true).unwrap());
        assert_eq!(cfg.api_port, 9000);
        let env: HashMap<&str, &str> = [
            ("RIVERNODE_API_PORT", "9100"),
            ("RIVERNODE_TOKEN", "ignored"),
        ]
        .into();
        cfg.apply(read_env_layer(HostConfig::KEYS, |k| env.get(k).map(|v| v.to_string())).unwrap());
        assert_eq!(cfg.api_port, 9100);
        assert_eq!(cfg.liveness_check_interval.0, Duration::from_millis(250));
        assert_eq!(cfg.ssh_proxy_port, 8002);
        cfg.validate().unwrap();
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("host.toml");
        std::fs::write(&f, "api_port = 9000\nbogus_key = 1\n").unwrap();
        let e = read_file_layer::<HostLayer>(&f, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("host.toml") && e.contains("line 2") && e.contains("bogus_key"),
            "{e}"
        );
        assert_eq!(e.lines().count(), 1, "{e}");
    }

    #[test]
    fn bad_port_names_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("host.toml");
        std::fs::write(&f, "api_port = 70000\n").unwrap();
        let e = read_file_layer::<HostLayer>(&f, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
        let env = |k: &str| (k == "RIVERNODE_RUNNER_PORT").then(|| "http".to_string());
        let e = read_env_layer::<RunnerLayer>(RunnerConfig::KEYS, env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("RIVERNODE_RUNNER_PORT"), "{e}");
        let cfg = HostConfig {
            api_port: 8002,
            ..Default::default()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("ssh_proxy_port"));
    }

    #[test]
    fn missing_files() {
        let p = Path::new("/nonexistent/rivernode/host.toml");
        assert!(read_file_layer::<HostLayer>(p, false).is_ok());
        let e = read_file_layer::<HostLayer>(p, true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/rivernode/host.toml"), "{e}");
    }

    #[test]
    fn defaults_render_as_valid_commented_toml() {
        let text = render_defaults("host", HostConfig::KEYS, &HostConfig::default());
        assert!(text.contains("#api_port = 8000"), "{text}");
        // Uncommenting every value line gives a file that loads back to the defaults.
        let uncommented: String = text
            .lines()
            .filter(|l| l.contains(" = ") && !l.contains("(unset)"))
            .map(|l| format!("{}\n", l.trim_start_matches('#')))
            .collect();
        let layer: HostLayer = toml::from_str(&uncommented).unwrap();
        let mut cfg = HostConfig::default();
        cfg.apply(layer);
        assert_eq!(cfg, HostConfig::default());
    }
}

//! The command line, as clap types. `rivernode --help` is generated from here.

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::HumanDuration;

#[derive(Parser, Debug)]
#[command(name = "rivernode", version, about = "Run GPU workloads on your own machines", long_about = None)]
pub struct Cli {
    /// URL of the host API, e.g. http://gpu-head:8000.
    #[arg(long, global = true, env = "RIVERNODE_HOST", value_name = "URL")]
    pub host: Option<String>,
    /// API token (default: DATA_DIR/admin.token, then ~/.config/rivernode/client.toml).
    #[arg(
        long,
        global = true,
        env = "RIVERNODE_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
    /// Output format of listings and status (`--output FILE` is the
    /// seeds' `ssh config` flag, so the long form here is `--format`).
    #[arg(short = 'o', long = "format", global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// State directory of a local host/runner (default /var/lib/rivernode).
    #[arg(long, global = true, env = "RIVERNODE_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ForwardProto {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the host daemon: API, store, scheduler (usually under systemd).
    Host(HostArgs),
    /// Run the runner daemon on a node (usually under systemd).
    Runner(Box<RunnerArgs>),
    /// Run a one-node cluster (host + runner) in one process on this machine.
    Up(UpArgs),
    /// Nodes of the cluster.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Users: each has a token and sees and controls only their own tasks and VPS (admin).
    #[command(subcommand)]
    User(UserCommand),
    /// Quotas: the most a user or a group may hold at once (GPUs, running VPS, cores, memory).
    #[command(subcommand)]
    Quota(QuotaCommand),
    /// Who this token is (admin, user NAME, node NAME) on which host.
    Whoami,
    /// Your own token: `rotate` replaces it (your instances stay yours).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Redeem an invitation from the admin: become user NAME, keeping the token in
    /// ~/.config/rivernode/client.toml (with --host, which later commands then use).
    Login {
        /// The code `rivernode user invite` printed.
        #[arg(long, value_name = "CODE")]
        invite: String,
        /// The name to go by (letters, digits, '-').
        #[arg(long)]
        name: String,
        /// Replace a token client.toml already holds.
        #[arg(long)]
        force: bool,
    },
    /// Let a request that waits for approval run (operator, admin).
    Approve { id: u64 },
    /// Refuse a request that waits for approval; its owner reads the reason (operator, admin).
    Reject {
        id: u64,
        /// Why, for the person who asked.
        #[arg(long)]
        reason: String,
    },
    /// An interactive shell in a task or VPS on any node, without SSH (bash if the image has it).
    Connect {
        id: u64,
        /// The shell to start instead.
        #[arg(long)]
        shell: Option<String>,
    },
    /// Reach a port of a task or VPS on any node from a local port (Jupyter, TensorBoard), through the host.
    Forward {
        id: u64,
        /// The port inside the instance (reached on its 127.0.0.1).
        port: u16,
        /// The local port (default: the same number; 0 picks a free one).
        #[arg(long, value_name = "PORT")]
        local_port: Option<u16>,
        /// The local address to listen on.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1")]
        local_host: String,
        #[arg(long, value_enum, default_value_t = ForwardProto::Tcp)]
        proto: ForwardProto,
    },
    /// A terminal in an instance (`attach`) or one command in it (`exec`).
    #[command(subcommand)]
    Terminal(TerminalCommand),
    /// Configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// rivernode's cgroups on this node, with limits and usage (node-local).
    #[command(subcommand)]
    Cgroup(CgroupCommand),
    /// What this node offers VMs: KVM, IOMMU, VFIO, UEFI firmware, QEMU, libvirt (node-local).
    #[command(subcommand)]
    Vm(VmCommand),
    /// Command tasks: submit, list, status, logs, kill, pause, resume.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Environments (container images) in the shared directory.
    #[command(subcommand)]
    Env(EnvCommand),
    /// Long-lived container instances reachable over SSH.
    #[command(subcommand)]
    Vps(VpsCommand),
    /// Log in to a VPS with stock ssh, through the host's SSH proxy; `ssh config` writes entries for ssh/scp/IDEs.
    Ssh(SshCmd),
    /// (used by ssh as its ProxyCommand) connect stdin/stdout to a VPS through the proxy.
    #[command(hide = true)]
    SshProxyCommand { id: u64 },
    /// GPUs of this node and their passthrough to VMs (node-local, root).
    #[command(subcommand)]
    Gpu(GpuCommand),
    /// Print a shell completion script.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Args, Debug, Default)]
pub struct HostArgs {
    /// Config file (default /etc/rivernode/host.toml, if present).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub bind: Option<IpAddr>,
    #[arg(long, value_name = "PORT")]
    pub api_port: Option<u16>,
    #[arg(long, value_name = "PORT")]
    pub ssh_proxy_port: Option<u16>,
    #[arg(long, value_name = "URL")]
    pub advertise_url: Option<String>,
    /// The address users reach the cluster at, given to instances as
    /// PUBLIC_IPADDR (default: the host of --advertise-url).
    #[arg(long, value_name = "ADDRESS")]
    pub public_address: Option<String>,
    /// External ports for published ports (`vps create -p`), FIRST-LAST.
    #[arg(long, value_name = "FIRST-LAST")]
    pub published_ports: Option<String>,
    /// Run a VXLAN overlay between nodes: each node takes a /24 of this range
    /// (e.g. 10.200.0.0/16) when it registers, and one user's instances reach
    /// each other across nodes.
    #[arg(long, value_name = "CIDR")]
    pub overlay_range: Option<String>,
    /// Keep a copy of each stopped container VPS on the host, so that
    /// `vps restart --anywhere` can start it on another node.
    #[arg(long)]
    pub park_stopped_vps: bool,
    #[arg(long, value_name = "N")]
    pub offline_after_missed: Option<u32>,
    #[arg(long, value_name = "DURATION")]
    pub liveness_check_interval: Option<HumanDuration>,
    #[arg(long, value_name = "DIR")]
    pub shared_dir: Option<PathBuf>,
    /// Let tasks and VPS ask for --privileged (they can take over their node).
    #[arg(long)]
    pub allow_privileged: bool,
    /// Tasks one user may have waiting for resources at once (default 1000).
    #[arg(long, value_name = "N")]
    pub max_waiting_per_user: Option<u32>,
    /// Which of a user's requests wait for an operator's approval: `vps`, `gpu`
    /// (comma list), or `none` (default vps).
    #[arg(long, value_name = "LIST")]
    pub approval: Option<String>,
    /// Stop a VPS whose GPUs stayed idle this long, after a warning and the grace (default: never).
    #[arg(long, value_name = "DURATION")]
    pub idle_gpu_after: Option<HumanDuration>,
    /// Time between the idle-GPU warning and the stop (default 1h).
    #[arg(long, value_name = "DURATION")]
    pub idle_gpu_grace: Option<HumanDuration>,
    /// Utilisation percent below which a GPU counts as idle (default 5).
    #[arg(long, value_name = "PERCENT")]
    pub idle_gpu_threshold: Option<u32>,
    /// The environment work without --container or --image runs in.
    #[arg(long, value_name = "NAME")]
    pub default_environment: Option<String>,
    /// The base image VM VPS without --vm-image boot.
    #[arg(long, value_name = "NAME")]
    pub default_vm_image: Option<String>,
    /// Time a client has to send a request's headers.
    #[arg(long, value_name = "DURATION")]
    pub http_header_timeout: Option<HumanDuration>,
}

#[derive(Args, Debug, Default)]
pub struct RunnerArgs {
    /// Config file (default /etc/rivernode/runner.toml, if present).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Node name (default: hostname).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, value_name = "URL")]
    pub host_url: Option<String>,
    #[arg(long, value_name = "TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    #[arg(long, value_name = "FILE")]
    pub join_token_file: Option<PathBuf>,
    #[arg(long)]
    pub bind: Option<IpAddr>,
    #[arg(long, value_name = "PORT")]
    pub runner_port: Option<u16>,
    #[arg(long, value_name = "URL")]
    pub advertise_url: Option<String>,
    #[arg(long, value_name = "DURATION")]
    pub heartbeat_interval: Option<HumanDuration>,
    #[arg(long, value_name = "DIR", hide = true)]
    pub sys_root: Option<PathBuf>,
    #[arg(long, value_name = "DIR", hide = true)]
    pub proc_root: Option<PathBuf>,
    #[arg(long, value_name = "SOCKET")]
    pub containerd_socket: Option<PathBuf>,
    /// Cluster-shared directory (environments/<name>.tar; each user's users/<name> is their /shared).
    #[arg(long, value_name = "DIR")]
    pub shared_dir: Option<PathBuf>,
    #[arg(long, value_name = "DURATION")]
    pub kill_grace: Option<HumanDuration>,
    /// A registry (host:port) to pull from over plain HTTP; repeatable.
    #[arg(long, value_name = "HOST:PORT")]
    pub insecure_registry: Vec<String>,
    #[arg(long, value_name = "NAME")]
    pub instance_bridge: Option<String>,
    #[arg(long, value_name = "CIDR")]
    pub instance_subnet: Option<String>,
    #[arg(long, value_name = "NAME")]
    pub nft_table: Option<String>,
    /// Take a snapshot of a VPS each time it is stopped (true or false).
    #[arg(long, value_name = "BOOL")]
    pub auto_snapshot_on_stop: Option<bool>,
    /// Snapshots kept per VPS; the oldest beyond it are deleted (0: no limit).
    #[arg(long, value_name = "N")]
    pub max_snapshots_per_vps: Option<u32>,
    /// A CDI spec directory; repeatable, later ones win (default /etc/cdi, /var/run/cdi).
    #[arg(long = "cdi-spec-dir", value_name = "DIR")]
    pub cdi_spec_dirs: Vec<PathBuf>,
    #[arg(long, value_name = "DIR", hide = true)]
    pub nvidia_driver_root: Option<PathBuf>,
    #[arg(long, value_name = "FILE", hide = true)]
    pub kmsg_path: Option<PathBuf>,
    /// NVML's library (default libnvidia-ml.so.1, found by the dynamic loader).
    #[arg(long, value_name = "FILE")]
    pub nvml_library: Option<PathBuf>,
    #[arg(long, value_name = "DIR", hide = true)]
    pub dev_root: Option<PathBuf>,
    /// /dev/shm size of instances with neither --memory nor --shm-size (e.g. 8G).
    #[arg(long, value_name = "SIZE")]
    pub default_shm_size: Option<crate::config::HumanSize>,
    /// Memory the node keeps for itself, never given to instances (e.g. 4G);
    /// default: a twentieth of its memory, at least 1G, at most a quarter.
    #[arg(long, value_name = "SIZE")]
    pub reserved_memory: Option<crate::config::HumanSize>,
    /// Time a client has to send a request's headers.
    #[arg(long, value_name = "DURATION")]
    pub http_header_timeout: Option<HumanDuration>,
    /// libvirt's URI for VM VPS (default qemu:///system; empty: no VMs here).
    #[arg(long, value_name = "URI")]
    pub libvirt_uri: Option<String>,
    /// kvm (default) or qemu (TCG emulation, where KVM is missing).
    #[arg(long, value_name = "ACCEL")]
    pub vm_accel: Option<String>,
    /// uefi (default) or bios.
    #[arg(long, value_name = "FIRMWARE")]
    pub vm_firmware: Option<String>,
    /// Boot VMs with this kernel from the node (images without a boot loader).
    #[arg(long, value_name = "FILE")]
    pub vm_kernel: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "vm_kernel")]
    pub vm_initrd: Option<PathBuf>,
    #[arg(long, value_name = "ARGS")]
    pub vm_cmdline: Option<String>,
    /// none (default, O_DIRECT) or writeback (a disk store on tmpfs).
    #[arg(long, value_name = "MODE")]
    pub vm_disk_cache: Option<String>,
    /// Where VMs' disks, seeds and base image copies live (default /var/lib/libvirt/rivernode).
    #[arg(long, value_name = "DIR")]
    pub vm_store: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    /// One file with both daemons' settings as `[host]` and `[runner]`
    /// tables (default: /etc/rivernode/host.toml and runner.toml, if present).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[arg(long, value_name = "PORT", default_value_t = 8000)]
    pub api_port: u16,
    #[arg(long, value_name = "PORT", default_value_t = 8001)]
    pub runner_port: u16,
    #[arg(long, value_name = "PORT", default_value_t = 8002)]
    pub ssh_proxy_port: u16,
    /// Node name (default: hostname).
    #[arg(long)]
    pub name: Option<String>,
    /// Between heartbeats (default 5s, or the runner settings').
    #[arg(long, value_name = "DURATION")]
    pub heartbeat_interval: Option<HumanDuration>,
    /// Shared directory (default DATA_DIR/shared): environments/<name>.tar; users/<name> is each user's /shared.
    #[arg(long, value_name = "DIR")]
    pub shared_dir: Option<PathBuf>,
    #[arg(long, value_name = "SOCKET")]
    pub containerd_socket: Option<PathBuf>,
    /// Time between SIGTERM and SIGKILL when a task is killed.
    #[arg(long, value_name = "DURATION")]
    pub kill_grace: Option<HumanDuration>,
    /// Let tasks and VPS ask for --privileged (they can take over this machine).
    #[arg(long)]
    pub allow_privileged: bool,
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List nodes with their state and capacity.
    List,
    /// One node: cores, NUMA map, memory, GPUs, heartbeat, runner reachability.
    Status { name: String },
    /// Remove a node for good: its credential is revoked, its tasks end, and
    /// its name registers again only with a new join token.
    Remove { name: String },
    /// The VXLAN overlay between nodes: each node's subnet, its underlay
    /// address, and whether the others route to it now.
    Overlay,
    /// The join token runners register with.
    #[command(subcommand)]
    JoinToken(JoinTokenCommand),
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// A new token for yourself; the old one stops working at once. The token
    /// kept in ~/.config/rivernode/client.toml is replaced there; another is printed.
    Rotate {
        /// How long the new token stays valid (e.g. 90d); default: until the next rotation.
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<crate::config::HumanDuration>,
    },
    /// The cluster's scrape token (admin): Prometheus reads /metrics on the host and on
    /// every runner with it; a new one replaces the last.
    Metrics,
}

#[derive(Subcommand, Debug)]
pub enum JoinTokenCommand {
    /// Replace it (registered nodes keep working) and print the new one,
    /// which the host also writes to its DATA_DIR/join.token.
    Rotate {
        /// How long the new token is valid (e.g. 1h, 7d is 168h); default: until the next rotation.
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<crate::config::HumanDuration>,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Add a user and print their token (shown once; only its hash is kept).
    Add {
        name: String,
        /// viewer: reads the cluster; user: runs their own work; operator: also
        /// approves requests and stops, kills and restarts anyone's instances.
        #[arg(long, default_value = "user", value_parser = parse_person_role)]
        role: crate::api::PersonRole,
        /// The group whose quota they share (`rivernode quota set --group`).
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
    },
    /// List users with how many of their tasks have not ended.
    List,
    /// Remove a user and revoke their token; what of theirs ran stays, for the admin
    /// to end; their requests that never ran end.
    Remove { name: String },
    /// Change a person's role or group; their token and work stay.
    Set {
        name: String,
        #[arg(long, value_parser = parse_person_role)]
        role: Option<crate::api::PersonRole>,
        #[arg(long, value_name = "GROUP", conflicts_with = "no_group")]
        group: Option<String>,
        /// Take them out of their group.
        #[arg(long)]
        no_group: bool,
    },
    /// The invitations: open, used (by whom) or expired.
    Invitations,
    /// Revoke an unused invitation (ID as `user invitations` shows it).
    Uninvite { id: String },
    /// A one-time code that lets one person make their own account (`rivernode login --invite`).
    Invite {
        #[arg(long, default_value = "user", value_parser = parse_person_role)]
        role: crate::api::PersonRole,
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        /// How long the code may be used (default 7d).
        #[arg(long, value_name = "DURATION")]
        expires: Option<crate::config::HumanDuration>,
    },
    /// Give a user a new token (shown once) and revoke their old one; a user may rotate their own.
    /// `admin` rotates the admin token (and rewrites DATA_DIR/admin.token on the host).
    RotateToken {
        name: String,
        /// How long the new token stays valid (e.g. 90d); default: until the next rotation.
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<crate::config::HumanDuration>,
    },
    /// Variables every new container instance of a user gets (its own -e wins).
    Env {
        #[command(subcommand)]
        cmd: UserEnvCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum UserEnvCommand {
    /// Set variables: K=V ...
    Set {
        #[arg(required = true, value_name = "K=V")]
        vars: Vec<String>,
        /// Whose (the admin names a user; default: the token's own user).
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
    },
    /// List the variables.
    List {
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
    },
    /// Remove variables: K ...
    Unset {
        #[arg(required = true, value_name = "K")]
        keys: Vec<String>,
        #[arg(long, value_name = "NAME")]
        user: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TerminalCommand {
    /// An interactive shell in the instance (as `connect`).
    Attach {
        id: u64,
        #[arg(long)]
        shell: Option<String>,
    },
    /// Run one command in the instance: its stdout and stderr apart, its exit status ours.
    Exec {
        id: u64,
        /// Give it a terminal (stdout and stderr are one stream then).
        #[arg(short = 't', long)]
        tty: bool,
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Daemon {
    Host,
    Runner,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print (or write) a config file with every key, its default and what it does.
    Init {
        #[arg(value_enum)]
        daemon: Daemon,
        /// Write to this file instead of standard output (never overwrites).
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
    },
}

#[derive(Args, Debug, Clone)]
pub struct CgroupOpts {
    /// Subtree below the cgroup root that rivernode owns.
    #[arg(long, default_value = crate::cgroup::DEFAULT_SUBTREE)]
    pub subtree: String,
    #[arg(long, default_value = "/sys/fs/cgroup", hide = true)]
    pub cgroup_root: PathBuf,
    #[arg(long, default_value = "/proc/self/mountinfo", hide = true)]
    pub mountinfo: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum CgroupCommand {
    /// Every rivernode cgroup on this node.
    List(CgroupOpts),
    /// One cgroup: every limit and statistic.
    Show {
        name: String,
        #[command(flatten)]
        opts: CgroupOpts,
    },
}

#[derive(Args, Debug, Clone)]
pub struct GpuOpts {
    /// How long one sysfs write may take before the device is reported stuck.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub timeout: HumanDuration,
    #[arg(long, default_value = "/sys", hide = true)]
    pub sys_root: PathBuf,
    #[arg(long, default_value = "/dev", hide = true)]
    pub dev_root: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum GpuCommand {
    /// GPUs with vendor:device, name, UUID, driver, NUMA node, IOMMU group, and
    /// state: free on the host driver, on vfio-pci, or in use by an instance.
    List(GpuOpts),
    /// Print the CDI spec the runner makes from this node's NVIDIA driver when
    /// no spec in /etc/cdi or /var/run/cdi names its GPUs (YAML; -o json for JSON).
    CdiSpec {
        #[arg(long, default_value = "/proc/driver/nvidia", hide = true)]
        driver_root: PathBuf,
        #[command(flatten)]
        opts: GpuOpts,
    },
    /// Is the IOMMU on, is vfio-pci loaded, can each GPU's group be passed through?
    Check(GpuOpts),
    /// Bind GPUs (index, PCI address or UUID) and their IOMMU groups to vfio-pci;
    /// refused for a GPU an instance holds.
    Bind {
        #[arg(required = true, value_name = "INDEX|PCI-ADDRESS|UUID")]
        devices: Vec<String>,
        /// Who the binding is for (an admin's by default; the runner binds
        /// a VM's GPUs itself, for `task N`).
        #[arg(long, default_value = crate::vfio::ADMIN_OWNER)]
        owner: String,
        #[command(flatten)]
        opts: GpuOpts,
    },
    /// Give a device's IOMMU group back to its host drivers.
    Unbind {
        #[arg(value_name = "INDEX|PCI-ADDRESS|UUID")]
        device: String,
        /// Also a GPU the runner passed to a VM (stop the VM instead).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        opts: GpuOpts,
    },
}

/// What a task or VPS asks for and runs in.
#[derive(Args, Debug)]
pub struct ResourceArgs {
    /// Where: NODE[:NUMA][::GPU,GPU...] (GPUs by index, PCI address or UUID); default: automatic.
    #[arg(short = 't', long)]
    pub target: Option<String>,
    /// Cores (logical CPUs) reserved exclusively; 0: none of its own, it
    /// shares the node's unreserved cores (they change as others come and go).
    #[arg(short = 'c', long, default_value_t = 1)]
    pub cores: u32,
    /// Memory limit, e.g. 512M, 8G, 1.5T; default: the node's memory in
    /// proportion to the cores (or GPUs, if that share is larger) asked for.
    #[arg(short = 'm', long)]
    pub memory: Option<String>,
    /// Number of GPUs, when the target does not name them.
    #[arg(long, default_value_t = 0)]
    pub gpus: u32,
    /// Size of /dev/shm, e.g. 1G (Docker's flag); default: half of the
    /// memory limit. Counts against the memory limit.
    #[arg(long, value_name = "SIZE")]
    pub shm_size: Option<String>,
    /// The instance's hostname (Docker's and Vast.ai's `-h`); default task-<id>.
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Environment: SHARED_DIR/environments/<ENV>.tar.
    #[arg(long, value_name = "ENV", conflicts_with = "image")]
    pub container: Option<String>,
    /// Registry image reference.
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub resources: ResourceArgs,
    /// Environment variable for the task.
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Bind mount SRC:DST[:ro] from the node.
    #[arg(long = "mount", value_name = "SRC:DST[:ro]")]
    pub mounts: Vec<String>,
    /// Publish a port of the task through the host (as `vps create -p`).
    #[arg(short = 'p', long = "port", value_name = "PORT[:PORT][/udp]")]
    pub ports: Vec<String>,
    /// `bridge` (the default): the instances' network, with egress through
    /// the node (masquerade) and nothing of the node's own; `none`: loopback only.
    #[arg(long, value_name = "MODE", default_value = "bridge", value_parser = ["bridge", "none"])]
    pub network: String,
    /// Wait until the task ends and exit with its exit code.
    #[arg(long)]
    pub wait: bool,
    /// Every capability, no seccomp profile and no masked kernel paths (only
    /// where the operator allows it).
    #[arg(long)]
    pub privileged: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum TaskCommand {
    /// Queue a command task; it runs as soon as its resources are free.
    Submit(Box<SubmitArgs>),
    /// Tasks, newest last.
    List {
        #[arg(short = 's', long)]
        state: Option<String>,
        #[arg(short = 'n', long)]
        node: Option<String>,
    },
    /// One task: state, placement and why, exit code.
    Status {
        id: u64,
    },
    /// Its published ports: `HOST:EXTERNAL -> INTERNAL/proto`.
    Ports {
        id: u64,
    },
    /// A task's output.
    Logs {
        id: u64,
        #[arg(long)]
        stderr: bool,
        /// The VPS's onstart script's output instead of its main process's.
        #[arg(long)]
        onstart: bool,
        /// Keep printing until the task ends.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// End a task now. A command: SIGTERM, then SIGKILL after the runner's
    /// grace period. A VPS: a hard stop (SIGKILL) that keeps its disk and
    /// snapshots; `vps restart` starts it again, `vps delete` removes it.
    Kill {
        id: u64,
    },
    Pause {
        id: u64,
    },
    Resume {
        id: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// Check this node for VMs and say what to do about what is missing;
    /// exits 1 when QEMU or libvirt is missing (VMs cannot run at all).
    Check,
    /// VM base images in the shared directory (SHARED_DIR/vm-images).
    #[command(subcommand)]
    Image(VmImageCommand),
}

#[derive(Subcommand, Debug)]
pub enum VmImageCommand {
    /// Copy a standalone qcow2 image into the shared directory as NAME
    /// (read-only, with its SHA-256 beside it).
    Import { name: String, file: PathBuf },
    /// The VM base images, with their disk sizes and digests.
    List,
}

#[derive(Subcommand, Debug)]
pub enum EnvCommand {
    /// Environments in the shared directory.
    List,
    /// Copy an OCI or docker archive into the shared directory as environment NAME.
    Import { name: String, archive: PathBuf },
}

#[derive(Args, Debug)]
pub struct VpsCreateArgs {
    #[command(flatten)]
    pub resources: ResourceArgs,
    /// The VPS's kind: `container` (also `docker`), or `vm` (also `qemu`):
    /// a libvirt VM booting --vm-image, its vCPUs pinned to its cores.
    #[arg(short = 'b', long, value_name = "BACKEND", default_value = "container")]
    pub backend: String,
    /// SSH access (on by default; KohakuRiver's flag, accepted as written).
    #[arg(long, conflicts_with = "no_ssh")]
    pub ssh: bool,
    /// No SSH server and no node port: the VPS runs CMD (after --), else its
    /// image's Entrypoint and Cmd; reach it with `connect`, `terminal`, `forward`.
    #[arg(long, conflicts_with_all = ["gen_ssh_key", "public_key_file", "public_key_string", "no_ssh_key", "password_stdin"])]
    pub no_ssh: bool,
    /// Let a restart move it: when its node is offline, removed or too full
    /// to start it again, `vps restart` starts it on another node from the
    /// copy of its last stop the host keeps (the host's park_stopped_vps).
    #[arg(long)]
    pub movable: bool,
    /// A VM's memory in MiB (a unit is taken too: 16G); -m says the same.
    #[arg(long, value_name = "MIB")]
    pub vm_memory: Option<String>,
    /// A VM's base image (`rivernode vm image list`).
    #[arg(long, value_name = "NAME")]
    pub vm_image: Option<String>,
    /// A VM's disk size in GiB (a unit is taken too: 500M); default: its image's size.
    #[arg(long, value_name = "GB")]
    pub vm_disk: Option<String>,
    /// Generate an ed25519 key pair; the private key is written 0600 locally.
    #[arg(long)]
    pub gen_ssh_key: bool,
    /// Where --gen-ssh-key writes the private key (default ~/.ssh/rivernode_vps_<time>).
    #[arg(long, value_name = "FILE", requires = "gen_ssh_key")]
    pub key_out_file: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub public_key_file: Option<PathBuf>,
    #[arg(long, value_name = "KEY")]
    pub public_key_string: Option<String>,
    /// Upload no key: log in with a password (--password-stdin) or with what
    /// the image itself provides (its own sshd and accounts).
    #[arg(long, conflicts_with_all = ["gen_ssh_key", "public_key_file", "public_key_string"])]
    pub no_ssh_key: bool,
    /// Read root's password from the first line of standard input; only its
    /// SHA-512 crypt hash leaves this machine.
    #[arg(long)]
    pub password_stdin: bool,
    /// Every capability and no masked kernel paths (only where the operator allows it).
    #[arg(long)]
    pub privileged: bool,
    /// An environment variable of the VPS, in its SSH sessions too (container VPS).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// A script the VPS runs each time it starts, after its SSH server, with
    /// its variables (Vast.ai's onstart); its output in `task logs ID
    /// --onstart`, a failure in `vps status`.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["onstart_cmd", "no_ssh"])]
    pub onstart: Option<PathBuf>,
    /// The onstart script given inline.
    #[arg(long, value_name = "SCRIPT", conflicts_with = "no_ssh")]
    pub onstart_cmd: Option<String>,
    /// Vast.ai's launch mode: `ssh` (the default: our SSH server, then
    /// --onstart), `entrypoint` (the image's Entrypoint with --args as its
    /// main process, no SSH server: as --no-ssh), `jupyter` (not yet).
    #[arg(long, value_name = "MODE", value_parser = ["ssh", "entrypoint", "jupyter"])]
    pub launch: Option<String>,
    /// With `--launch entrypoint`: arguments of the image's Entrypoint, in
    /// place of its Cmd (everything after --args is one of them: put it last).
    #[arg(long, num_args = 1.., allow_hyphen_values = true, value_name = "ARG", conflicts_with = "command")]
    pub args: Vec<String>,
    /// Publish a port of the VPS through the host (Vast.ai's `-p 8081:8081`,
    /// `-p 8082:8082/udp`; 70000 and up: an identity port, the same number
    /// outside and in); `rivernode vps ports ID` says where. At most 64.
    #[arg(short = 'p', long = "port", value_name = "PORT[:PORT][/udp]")]
    pub ports: Vec<String>,
    /// Start from a snapshot of a VPS: VPS_ID (its newest) or VPS_ID:SNAPSHOT_ID.
    /// On any node: one that lacks it fetches it from the node that keeps
    /// it, or, while that node is gone, from the host's parked copy of a
    /// stopped VPS (the host's park_stopped_vps).
    #[arg(long, value_name = "VPS[:SNAPSHOT]", conflicts_with_all = ["container", "image"])]
    pub from_snapshot: Option<String>,
    /// Return as soon as the host has the VPS, without waiting while its
    /// node makes it (pulls or imports its image). `-o json` never waits.
    #[arg(long)]
    pub no_wait: bool,
    /// The main process of a --no-ssh VPS and its arguments.
    #[arg(last = true, value_name = "CMD", requires = "no_ssh")]
    pub command: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum VpsCommand {
    /// Create a VPS; by default your ~/.ssh/id_*.pub keys may log in.
    Create(Box<VpsCreateArgs>),
    /// Your VPS that have not been deleted (--all: deleted ones too).
    List {
        #[arg(long)]
        all: bool,
    },
    /// One VPS: state, placement and why, how to log in.
    Status { id: u64 },
    /// Its published ports: `HOST:EXTERNAL -> INTERNAL/proto`.
    Ports { id: u64 },
    /// Freeze every process of the VPS (its memory and reservation stay).
    Pause { id: u64 },
    /// Thaw a paused VPS.
    Resume { id: u64 },
    /// Stop the VPS: its processes end, its disk stays, its cores and GPUs are freed.
    Stop { id: u64 },
    /// Never stop this VPS for idle GPUs (operator, admin); --undo ends the exemption.
    Exempt {
        id: u64,
        #[arg(long)]
        undo: bool,
    },
    /// Start a stopped VPS again on its node, with its disk and host key.
    Restart {
        id: u64,
        /// First restore the disk from a snapshot (default: the newest).
        #[arg(long, value_name = "SNAPSHOT", num_args = 0..=1, default_missing_value = "latest", conflicts_with = "anywhere")]
        from_snapshot: Option<String>,
        /// Start it on any node that fits, from the copy of its last stop
        /// the host keeps (with the host's park_stopped_vps): for a VPS
        /// whose node is gone or full.
        #[arg(long)]
        anywhere: bool,
    },
    /// Snapshots of a VPS (a container's filesystem, a VM's disk): create, list, latest, delete.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Stop the VPS and remove its container, disk, snapshots, network and
    /// node port: the only command that removes a VPS's disk.
    Delete { id: u64 },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Snapshot the VPS now, running, paused or stopped: a container's
    /// filesystem changes, a VM's disk (filesystems frozen through its guest
    /// agent when it has one, else crash-consistent; the COPY column says which).
    Create {
        id: u64,
        #[arg(short, long)]
        message: Option<String>,
    },
    /// The VPS's snapshots, oldest first.
    List { id: u64 },
    /// The VPS's newest snapshot.
    Latest { id: u64 },
    /// Delete one snapshot of the VPS (SNAPSHOT as `snapshot list` shows it).
    Delete { id: u64, snapshot: String },
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SshCmd {
    #[command(subcommand)]
    pub sub: Option<SshSub>,
    #[command(flatten)]
    pub login: SshArgs,
}

#[derive(Subcommand, Debug)]
pub enum SshSub {
    /// Print (or write) ssh_config entries `rivernode-vps-<id>` for every running VPS.
    Config {
        /// Write to this file instead of standard output.
        #[arg(long, visible_alias = "output", value_name = "FILE")]
        file: Option<PathBuf>,
        #[arg(short = 'i', long)]
        key: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        known_hosts: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct SshArgs {
    pub id: Option<u64>,
    /// Private key to log in with.
    #[arg(short = 'i', long)]
    pub key: Option<PathBuf>,
    #[arg(long, default_value = "root")]
    pub user: String,
    /// Host keys seen before (default ~/.config/rivernode/known_hosts).
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// The host's SSH proxy port (default: what the host says).
    #[arg(long, value_name = "PORT")]
    pub proxy_port: Option<u16>,
    /// Instead of logging in, listen on 127.0.0.1:PORT and carry each
    /// connection to the VPS's SSH server (for tools that want host:port).
    #[arg(long, value_name = "PORT", conflicts_with = "command")]
    pub local_port: Option<u16>,
    /// Command to run instead of a login shell.
    #[arg(last = true)]
    pub command: Vec<String>,
}

fn parse_person_role(s: &str) -> Result<crate::api::PersonRole, String> {
    s.parse()
}

fn parse_gpu_hours(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(h) if (0.0..1e9).contains(&h) => Ok(h),
        _ => Err(format!("{s:?} is not a number of hours (e.g. 100 or 0.5)")),
    }
}

#[derive(Subcommand, Debug)]
pub enum QuotaCommand {
    /// Set (replace) a user's or group's quota; a limit left out is no limit, none at all
    /// removes the quota (admin). Work over it waits, saying whose quota and the numbers.
    Set {
        #[arg(
            long,
            value_name = "NAME",
            conflicts_with = "group",
            required_unless_present = "group"
        )]
        user: Option<String>,
        #[arg(long, value_name = "NAME")]
        group: Option<String>,
        /// GPUs held at once.
        #[arg(long, value_name = "N")]
        gpus: Option<u64>,
        /// Running (or paused) VPS; stopped ones hold nothing.
        #[arg(long, value_name = "N")]
        vps: Option<u64>,
        /// Cores held at once.
        #[arg(long, value_name = "N")]
        cores: Option<u64>,
        /// Memory held at once (e.g. 128G).
        #[arg(long, value_name = "SIZE")]
        memory: Option<crate::config::HumanSize>,
        /// GPU-hours in each --period (one GPU for an hour is one); past them, GPU work waits.
        #[arg(long, value_name = "HOURS", value_parser = parse_gpu_hours)]
        gpu_hours: Option<f64>,
        /// The rolling window --gpu-hours counts over (default 7d).
        #[arg(long, value_name = "DURATION", requires = "gpu_hours")]
        period: Option<crate::config::HumanDuration>,
    },
    /// The quotas (a user sees theirs and their group's) and what each holds now.
    Show,
}

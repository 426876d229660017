//! Starting the daemons: `rivernode host`, `rivernode runner` and the
//! all-in-one `rivernode up`. Layers the configuration, binds, tells systemd
//! it is ready once the APIs listen, and stops on SIGINT/SIGTERM.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::cli::args::{HostArgs, RunnerArgs, UpArgs};
use crate::cli::client::DEFAULT_DATA_DIR;
use crate::config::{
    read_env_layer, read_file_layer, ConfigError, HostConfig, HostLayer, RunnerConfig, RunnerLayer,
    UpLayer,
};
use crate::host::BoundHost;
use crate::runner::BoundRunner;

fn env_var(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

fn config_file(explicit: &Option<PathBuf>, default: &str) -> (PathBuf, bool) {
    match explicit {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(default), false),
    }
}

pub fn host_config(args: &HostArgs, data_dir: Option<PathBuf>) -> Result<HostConfig, ConfigError> {
    let mut cfg = HostConfig::default();
    let (path, required) = config_file(&args.config, "/etc/rivernode/host.toml");
    cfg.apply(read_file_layer::<HostLayer>(&path, required)?);
    cfg.apply(read_env_layer::<HostLayer>(HostConfig::KEYS, env_var)?);
    cfg.apply(HostLayer {
        data_dir,
        bind: args.bind,
        api_port: args.api_port,
        ssh_proxy_port: args.ssh_proxy_port,
        advertise_url: args.advertise_url.clone().map(Some),
        public_address: args.public_address.clone().map(Some),
        offline_after_missed: args.offline_after_missed,
        liveness_check_interval: args.liveness_check_interval,
        shared_dir: args.shared_dir.clone(),
        allow_privileged: args.allow_privileged.then_some(true),
        privileged_users: None,
        http_header_timeout: args.http_header_timeout,
        http_max_connections: None,
        ssh_proxy_max_tunnels: None,
        max_waiting_per_user: args.max_waiting_per_user,
        default_environment: args.default_environment.clone().map(Some),
        default_vm_image: args.default_vm_image.clone().map(Some),
        published_ports: args.published_ports.clone(),
        max_published_ports_per_user: None,
        approval: args.approval.clone(),
        approval_skips_cpu_only: None,
        idle_gpu_after: args.idle_gpu_after.map(Some),
        idle_gpu_grace: args.idle_gpu_grace,
        idle_gpu_threshold: args.idle_gpu_threshold,
        overlay_range: args.overlay_range.clone().map(Some),
        overlay_vni: None,
        overlay_port: None,
        park_stopped_vps: args.park_stopped_vps.then_some(true),
    });
    cfg.validate()?;
    Ok(cfg)
}

pub fn runner_config(
    args: &RunnerArgs,
    data_dir: Option<PathBuf>,
) -> Result<RunnerConfig, ConfigError> {
    let mut cfg = RunnerConfig::default();
    let (path, required) = config_file(&args.config, "/etc/rivernode/runner.toml");
    cfg.apply(read_file_layer::<RunnerLayer>(&path, required)?);
    cfg.apply(read_env_layer::<RunnerLayer>(RunnerConfig::KEYS, env_var)?);
    cfg.apply(RunnerLayer {
        data_dir,
        name: args.name.clone().map(Some),
        host_url: args.host_url.clone(),
        join_token: args.join_token.clone().map(Some),
        join_token_file: args.join_token_file.clone().map(Some),
        bind: args.bind,
        runner_port: args.runner_port,
        advertise_url: args.advertise_url.clone().map(Some),
        heartbeat_interval: args.heartbeat_interval,
        sys_root: args.sys_root.clone(),
        proc_root: args.proc_root.clone(),
        containerd_socket: args.containerd_socket.clone(),
        snapshotter: None,
        shared_dir: args.shared_dir.clone(),
        shared_per_user: None,
        kill_grace: args.kill_grace,
        cgroup_parent: None,
        max_log_bytes: None,
        insecure_registries: (!args.insecure_registry.is_empty())
            .then(|| args.insecure_registry.clone()),
        instance_bridge: args.instance_bridge.clone(),
        instance_subnet: args.instance_subnet.clone(),
        overlay_device: None,
        nft_table: args.nft_table.clone(),
        dropbear: None,
        auto_snapshot_on_stop: args.auto_snapshot_on_stop,
        max_snapshots_per_vps: args.max_snapshots_per_vps,
        node_port_sources: None,
        isolate_instances: None,
        blocked_networks: None,
        instance_api_address: None,
        cdi_spec_dirs: (!args.cdi_spec_dirs.is_empty()).then(|| args.cdi_spec_dirs.clone()),
        nvidia_driver_root: args.nvidia_driver_root.clone(),
        nvml_library: args.nvml_library.clone(),
        kmsg_path: args.kmsg_path.clone(),
        dev_root: args.dev_root.clone(),
        default_shm_size: args.default_shm_size,
        reserved_memory: args.reserved_memory.map(Some),
        http_header_timeout: args.http_header_timeout,
        http_max_connections: None,
        libvirt_uri: args.libvirt_uri.clone(),
        vm_accel: args.vm_accel.clone(),
        vm_firmware: args.vm_firmware.clone(),
        vm_kernel: args.vm_kernel.clone().map(Some),
        vm_initrd: args.vm_initrd.clone().map(Some),
        vm_cmdline: args.vm_cmdline.clone(),
        vm_disk_cache: args.vm_disk_cache.clone(),
        vm_store: args.vm_store.clone(),
    });
    cfg.validate()?;
    Ok(cfg)
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

fn notify_ready() {
    // Outside systemd NOTIFY_SOCKET is unset and this does nothing.
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %crate::error_chain(&e), "could not notify systemd");
    }
}

pub async fn host(args: HostArgs, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = host_config(&args, data_dir)?;
    let host = BoundHost::bind(cfg).await?;
    notify_ready();
    host.run(shutdown_signal()).await?;
    Ok(())
}

pub async fn runner(args: RunnerArgs, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = runner_config(&args, data_dir)?;
    let runner = BoundRunner::bind(cfg, None).await?;
    notify_ready();
    runner.run(shutdown_signal()).await?;
    Ok(())
}

/// The two layers of `up`'s files: one file with both tables (`--config`),
/// or the two daemons' own files where they exist.
fn up_files(args: &UpArgs) -> Result<(HostLayer, RunnerLayer), ConfigError> {
    match &args.config {
        Some(path) => {
            let both: UpLayer = read_file_layer(path, true)?;
            Ok((both.host, both.runner))
        }
        None => Ok((
            read_file_layer(Path::new("/etc/rivernode/host.toml"), false)?,
            read_file_layer(Path::new("/etc/rivernode/runner.toml"), false)?,
        )),
    }
}

pub async fn up(args: UpArgs, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let data_dir = data_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
    let (host_file, runner_file) = up_files(&args)?;
    // Files, then RIVERNODE_* variables, then what `up` itself decides
    // (one data directory, loopback, the ports of its flags).
    let mut host_cfg = HostConfig::default();
    host_cfg.apply(host_file);
    host_cfg.apply(read_env_layer::<HostLayer>(HostConfig::KEYS, env_var)?);
    let mut runner_cfg = RunnerConfig::default();
    runner_cfg.apply(runner_file);
    runner_cfg.apply(read_env_layer::<RunnerLayer>(RunnerConfig::KEYS, env_var)?);
    let shared_dir = args
        .shared_dir
        .clone()
        .unwrap_or_else(|| data_dir.join("shared"));
    std::fs::create_dir_all(shared_dir.join("environments"))
        .with_context(|| format!("creating {}", shared_dir.join("environments").display()))?;
    host_cfg.data_dir = data_dir.clone();
    host_cfg.shared_dir = shared_dir.clone();
    host_cfg.bind = loopback;
    host_cfg.api_port = args.api_port;
    host_cfg.ssh_proxy_port = args.ssh_proxy_port;
    if args.allow_privileged {
        host_cfg.allow_privileged = true;
    }
    host_cfg.validate()?;
    let host = BoundHost::bind(host_cfg).await?;
    let join = host
        .join_token()
        .context("the host's join token file is missing from the data directory")?;
    runner_cfg.data_dir = data_dir.clone();
    runner_cfg.host_url = host.api_url.clone();
    runner_cfg.bind = loopback;
    runner_cfg.runner_port = args.runner_port;
    runner_cfg.shared_dir = shared_dir;
    if args.name.is_some() {
        runner_cfg.name = args.name.clone();
    }
    if let Some(h) = args.heartbeat_interval {
        runner_cfg.heartbeat_interval = h;
    }
    if let Some(s) = &args.containerd_socket {
        runner_cfg.containerd_socket = s.clone();
    }
    if let Some(k) = args.kill_grace {
        runner_cfg.kill_grace = k;
    }
    runner_cfg.validate()?;
    let runner = BoundRunner::bind(runner_cfg, Some(join)).await?;
    print_next_steps(&data_dir, &host.api_url, runner.runner_addr, runner.name());
    notify_ready();

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut host_task = tokio::spawn(host.run(stopped(stop_rx.clone())));
    let mut runner_task = tokio::spawn(runner.run(stopped(stop_rx)));
    // Whichever ends first (a signal, or a fatal error in one half) stops both.
    let result: anyhow::Result<()> = tokio::select! {
        _ = shutdown_signal() => Ok(()),
        r = &mut host_task => r.context("host task")?.map_err(Into::into),
        r = &mut runner_task => r.context("runner task")?.map_err(Into::into),
    };
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let _ = (&mut host_task).await;
        let _ = (&mut runner_task).await;
    })
    .await;
    result
}

fn print_next_steps(data_dir: &Path, api_url: &str, runner_addr: std::net::SocketAddr, node: &str) {
    let dd = if data_dir == Path::new(DEFAULT_DATA_DIR) {
        String::new()
    } else {
        format!("--data-dir {} ", data_dir.display())
    };
    crate::cli::output::emit(&format!(
        "rivernode is up: a one-node cluster on this machine.\n\
         \x20 host API   {api_url}  (admin token: {admin})\n\
         \x20 runner     http://{runner_addr}  node {node:?}\n\
         \x20 state      {dir}\n\
         \n\
         Next, in another terminal:\n\
         \x20 rivernode {dd}node list\n\
         \x20 rivernode {dd}node status {node}\n\
         \n\
         Ctrl-C stops it; running it again keeps the cluster's state.\n",
        admin = data_dir.join(crate::host::ADMIN_TOKEN_FILE).display(),
        dir = data_dir.display(),
    ));
}

//! `rivernode host`: the HTTP API, the store, the node registry and node
//! liveness. Later: the ledger and scheduler and the SSH proxy.

pub mod api;
pub mod approval;
mod archive;
pub mod auth;
pub mod dashboard;
pub mod environments;
mod exec;
pub mod front_door;
pub mod idle;
pub mod metrics;
pub mod openapi;
pub mod overlay;
mod parked;
pub mod proxy;
pub mod quota;
pub mod scheduler;
mod snapshots;
pub mod store;
mod tasks;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::config::HostConfig;
use crate::files::{write_public, write_secret};
use auth::{generate_token, hash_token, Role};
use store::{SqliteStore, Store, StoreError};

/// Files the host keeps in its data directory.
pub const DB_FILE: &str = "host.db";
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
pub const JOIN_TOKEN_FILE: &str = "join.token";
pub const API_URL_FILE: &str = "api.url";

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// What every request handler shares.
pub struct HostState {
    pub store: Arc<dyn Store>,
    pub http: reqwest::Client,
    /// The store's revision, for runners long-polling their assignments.
    pub revision: tokio::sync::watch::Sender<u64>,
    /// Wakes the scheduler (a submission, a finished task, a node change).
    pub schedule: tokio::sync::Notify,
    /// The cluster-shared directory (environments live in its `environments/`).
    pub shared_dir: PathBuf,
    /// Where the SSH proxy listens (clients learn it from `whoami`).
    pub ssh_proxy_port: u16,
    /// The operator's `allow_privileged`.
    pub allow_privileged: bool,
    /// Users besides the admin it extends to (`privileged_users`).
    pub privileged_users: Vec<String>,
    /// The host's data directory (the join token file is rewritten on rotation).
    pub data_dir: PathBuf,
    /// Tasks a user may have waiting for resources at once (`max_waiting_per_user`).
    pub max_waiting_per_user: u32,
    /// Which of a user's requests wait for an operator (`approval`).
    pub approval: approval::Approval,
    /// What `/metrics` reports that is recorded as it happens.
    pub metrics: Arc<metrics::HostMetrics>,
    /// When idle GPUs are reclaimed (`idle_gpu_*`); none: never.
    pub idle: Option<idle::IdlePolicy>,
    /// What work without --container or --image runs in (`default_environment`).
    pub default_environment: Option<String>,
    /// What a VM VPS without --vm-image boots (`default_vm_image`).
    pub default_vm_image: Option<String>,
    /// The address users reach the cluster at (PUBLIC_IPADDR in instances).
    pub public_address: Option<String>,
    /// The VXLAN overlay (`overlay_range`); none: nodes keep their own subnets.
    pub overlay: Option<overlay::Overlay>,
    /// The operator's `park_stopped_vps`.
    pub park_stopped_vps: bool,
    /// How far nodes got making tasks that are being made (in memory only:
    /// it matters while someone waits, and a runner sends it again).
    pub progress: std::sync::Mutex<std::collections::HashMap<u64, crate::api::TaskProgress>>,
}

impl HostState {
    /// Publishes the store's current revision to long-polling runners.
    pub async fn publish(&self) {
        if let Ok(r) = self.blocking(|s| s.revision()).await {
            self.revision.send_if_modified(|cur| {
                let newer = r > *cur;
                if newer {
                    *cur = r;
                }
                newer
            });
        }
    }

    /// Runs a store call off the async workers (SQLite calls block).
    pub async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, api::ApiError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| api::ApiError::Internal(format!("store task: {e}")))?
            .map_err(api::ApiError::from)
    }
}

/// A host whose store is open and whose API socket is bound, not yet serving.
pub struct BoundHost {
    state: Arc<HostState>,
    listener: TcpListener,
    ssh_listener: TcpListener,
    config: HostConfig,
    /// URL local clients use; also written to DATA_DIR/api.url.
    pub api_url: String,
    pub api_addr: SocketAddr,
    pub ssh_proxy_addr: SocketAddr,
}

impl BoundHost {
    pub async fn bind(config: HostConfig) -> Result<Self, HostError> {
        let dir = &config.data_dir;
        crate::files::ensure_private_dir(dir).map_err(|source| HostError::Io {
            path: dir.clone(),
            source,
        })?;
        let db_path = dir.join(DB_FILE);
        let max_published = config.max_published_ports_per_user;
        let published_ports = config
            .published_range()
            .map_err(|e| HostError::Config(e.to_string()))?;
        let ephemeral =
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
        if let Some(why) = crate::api::ports::ephemeral_clash(published_ports, &ephemeral) {
            return Err(HostError::Config(why));
        }
        let store: Arc<dyn Store> = {
            let p = db_path.clone();
            let store = tokio::task::spawn_blocking(move || SqliteStore::open(&p))
                .await
                .map_err(|e| HostError::Serve(std::io::Error::other(e)))??;
            store.set_published_ports(published_ports);
            store.set_published_per_user(max_published as usize);
            Arc::new(store)
        };
        crate::files::restrict(&db_path).map_err(|source| HostError::Io {
            path: db_path,
            source,
        })?;
        bootstrap_token(store.as_ref(), dir, Role::Admin, ADMIN_TOKEN_FILE, "rnadm")?;
        bootstrap_token(store.as_ref(), dir, Role::Join, JOIN_TOKEN_FILE, "rnjoin")?;

        let addr = SocketAddr::new(config.bind, config.api_port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| HostError::Bind { addr, source })?;
        let api_addr = listener.local_addr().map_err(HostError::Serve)?;
        let ssh_addr = SocketAddr::new(config.bind, config.ssh_proxy_port);
        let ssh_listener = TcpListener::bind(ssh_addr)
            .await
            .map_err(|source| HostError::Bind {
                addr: ssh_addr,
                source,
            })?;
        let ssh_proxy_addr = ssh_listener.local_addr().map_err(HostError::Serve)?;
        let api_url = config.local_url(api_addr.port());
        let url_path = dir.join(API_URL_FILE);
        write_public(&url_path, format!("{api_url}\n").as_bytes()).map_err(|source| {
            HostError::Io {
                path: url_path,
                source,
            }
        })?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("rivernode-host/", env!("CARGO_PKG_VERSION")))
            // A runner's answer is relayed to users: it must come from the runner.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| HostError::Serve(std::io::Error::other(e)))?;
        let revision = {
            let st = store.clone();
            tokio::task::spawn_blocking(move || st.revision())
                .await
                .map_err(|e| HostError::Serve(std::io::Error::other(e)))??
        };
        Ok(Self {
            state: Arc::new(HostState {
                store,
                http,
                revision: tokio::sync::watch::Sender::new(revision),
                schedule: tokio::sync::Notify::new(),
                shared_dir: config.shared_dir.clone(),
                ssh_proxy_port: ssh_proxy_addr.port(),
                allow_privileged: config.allow_privileged,
                privileged_users: config.privileged_users.clone(),
                data_dir: config.data_dir.clone(),
                max_waiting_per_user: config.max_waiting_per_user,
                approval: config
                    .approval()
                    .map_err(|e| HostError::Config(e.to_string()))?,
                metrics: Default::default(),
                idle: config
                    .idle_policy()
                    .map_err(|e| HostError::Config(e.to_string()))?,
                default_environment: config.default_environment.clone(),
                default_vm_image: config.default_vm_image.clone(),
                public_address: config.public_address.clone().or_else(|| {
                    config
                        .advertise_url
                        .as_deref()
                        .and_then(|u| reqwest::Url::parse(u).ok())
                        .and_then(|u| u.host_str().map(str::to_string))
                }),
                overlay: config
                    .overlay()
                    .map_err(|e| HostError::Config(e.to_string()))?,
                park_stopped_vps: config.park_stopped_vps,
                progress: Default::default(),
            }),
            listener,
            ssh_listener,
            config,
            api_url,
            api_addr,
            ssh_proxy_addr,
        })
    }

    /// The cluster's join token, as stored in the data directory.
    pub fn join_token(&self) -> Option<String> {
        read_token(&self.config.data_dir.join(JOIN_TOKEN_FILE))
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), HostError> {
        tracing::info!(addr = %self.api_addr, data_dir = %self.config.data_dir.display(), "host API listening");
        // Copies of VPS deleted while the host was down, or on paths that
        // never passed a node's report (a node removed), go now.
        parked::sweep(&self.state).await;
        let liveness = tokio::spawn(liveness_loop(self.state.clone(), self.config.clone()));
        let scheduler = tokio::spawn(tasks::scheduler_loop(self.state.clone()));
        tracing::info!(addr = %self.ssh_proxy_addr, "ssh proxy listening");
        let tunnels = Arc::new(Tunnels {
            state: self.state.clone(),
        });
        let descriptors = proxy::raise_descriptor_limit();
        let max_tunnels = proxy::tunnel_cap(self.config.ssh_proxy_max_tunnels, descriptors);
        if max_tunnels < self.config.ssh_proxy_max_tunnels {
            tracing::warn!(
                max_tunnels,
                descriptors,
                "the descriptor limit (RLIMIT_NOFILE) caps the SSH proxy's tunnels below ssh_proxy_max_tunnels; raise LimitNOFILE"
            );
        }
        let proxy = tokio::spawn(proxy::serve(
            self.ssh_listener,
            tunnels,
            proxy::ProxyConfig {
                stats: self.state.metrics.proxy.clone(),
                max_connections: max_tunnels,
                ..Default::default()
            },
        ));
        let doors = tokio::spawn(front_door::serve(
            self.state.clone(),
            self.config.bind,
            front_door::DoorLimits::default(),
        ));
        let limits = crate::api::http::Limits {
            header_timeout: self.config.http_header_timeout.0,
            max_connections: self.config.http_max_connections,
            max_per_peer: usize::MAX,
        };
        let result =
            crate::api::http::serve(self.listener, api::router(self.state), limits, shutdown)
                .await
                .map_err(HostError::Serve);
        liveness.abort();
        scheduler.abort();
        proxy.abort();
        doors.abort();
        result
    }
}

/// The host's tunnel authority: the token must be valid (an admin's, until
/// users own instances) before anything about instances is said; then the
/// instance must be a running VPS, reached at its node port on its node.
struct Tunnels {
    state: Arc<HostState>,
}

impl proxy::TunnelResolver for Tunnels {
    async fn resolve(&self, id: u64, token: &str) -> Result<SocketAddr, String> {
        let hash = hash_token(token);
        let found = self
            .state
            .blocking(move |s| {
                let who = s.find_token(&hash)?;
                let task = s.get_task(id)?;
                let node = match &task {
                    Some(t) => match &t.placement {
                        Some(p) => s.runner_access(&p.node)?.map(|(url, _)| url),
                        None => None,
                    },
                    None => None,
                };
                Ok((who, task, node))
            })
            .await
            .map_err(|e| {
                // The cause is for the operator's log, not for an anonymous peer (L4).
                tracing::warn!(error = %crate::error_chain(&e), "tunnel check failed");
                "the host cannot check this right now; try again".to_string()
            })?;
        let (who, task, runner_url) = found;
        // Nothing about instances is said before the token checks out, and
        // another user's instance looks like no instance at all.
        let who = match who {
            Some(p) if matches!(p.role, Role::Admin | Role::User | Role::Operator) => p,
            Some(_) => return Err("this token may not open tunnels".into()),
            None => return Err("invalid token".into()),
        };
        let t = task
            .filter(|t| t.spec.kind == crate::api::Kind::Vps && who.may_use(t.owner.as_deref()))
            .ok_or_else(|| format!("no instance {id}"))?;
        if t.state != crate::api::TaskState::Running {
            return Err(format!("instance {id} is {}", t.state));
        }
        if t.spec.no_ssh {
            return Err(format!(
                "instance {id} has no SSH server (made with --no-ssh): use rivernode connect {id}"
            ));
        }
        let port = t
            .placement
            .and_then(|p| p.node_port)
            .ok_or_else(|| format!("instance {id} has no SSH port"))?;
        let url = runner_url.ok_or_else(|| format!("the node of instance {id} is gone"))?;
        // The node's address as the host knows it: the host part of its runner URL.
        let host = crate::api::url_host(&url)
            .ok_or_else(|| format!("cannot tell the address of the node of instance {id}"))?;
        tokio::net::lookup_host((host.as_str(), port))
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| format!("cannot resolve the node {host}"))
    }
}

/// Creates the token of `role` at first start and writes it 0600 to `file`.
/// A token that exists is never rotated here: the file may be gone (an admin
/// moved it away), which is fine.
fn bootstrap_token(
    store: &dyn Store,
    dir: &Path,
    role: Role,
    file: &str,
    prefix: &str,
) -> Result<(), HostError> {
    if store.has_token_with_role(role)? {
        if !dir.join(file).exists() {
            tracing::warn!(file = %dir.join(file).display(), "{} token file is missing; the token in the store stays valid", role.as_str());
        }
        return Ok(());
    }
    let token = generate_token(prefix);
    let path = dir.join(file);
    write_secret(&path, format!("{token}\n").as_bytes()).map_err(|source| HostError::Io {
        path: path.clone(),
        source,
    })?;
    store.insert_token(
        &hash_token(&token),
        role,
        &format!("{} token (first start)", role.as_str()),
    )?;
    tracing::info!(file = %path.display(), "created the {} token", role.as_str());
    Ok(())
}

pub use crate::api::token::read as read_token;

async fn liveness_loop(state: Arc<HostState>, config: HostConfig) {
    let mut tick = tokio::time::interval(config.liveness_check_interval.0);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let missed = config.offline_after_missed;
        let now = crate::now_unix_ms();
        match state
            .blocking(move |s| s.mark_silent_offline(now, missed))
            .await
        {
            Ok(names) => {
                for name in &names {
                    tracing::warn!(node = %name, missed, "node marked offline: no heartbeat; its tasks are lost until it reports them");
                }
                if !names.is_empty() {
                    state.publish().await;
                }
            }
            Err(e) => tracing::error!(error = %crate::error_chain(&e), "liveness check failed"),
        }
    }
}

//! The runner's reconcile loop for tasks: it long-polls its assignments,
//! starts a supervisor for each task it does not run yet, hands desired-state
//! changes (pause, resume, kill) to the supervisors, and reports what it
//! observes. containerd is the source of truth for what exists: at start the
//! runner re-adopts every container labelled as a rivernode task, so a task
//! that outlived a `kill -9` of the runner still has its completion reported.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::api::{Assignment, Assignments, Desired, ImageSource, TaskReport, TaskState};
use crate::config::RunnerConfig;
use crate::oci::{self, Containerd, MountInput, RuntimeSpecInput, TaskStatus, TASK_LABEL};
use crate::runner::vps::{ImageSsh, SshLogin};

/// Container label: the restore request its disk was made for.
const RESTORE_LABEL: &str = "io.rivernode.restore";

/// Where an image's own SSH server is looked for (Debian, Ubuntu, Fedora, Alpine).
const SSHD: &str = "/usr/sbin/sshd";

/// What every supervisor shares.
pub struct TaskContext {
    pub http: reqwest::Client,
    pub host_url: String,
    pub node: String,
    /// Replaced when the node registers again.
    pub credential: std::sync::RwLock<String>,
    pub config: RunnerConfig,
    pub ctd: Containerd,
    /// Networking and SSH for VPS instances.
    pub vps: super::vps::VpsKit,
    pub snapshot_locks: super::snapshots::SnapshotLocks,
}

impl TaskContext {
    fn credential(&self) -> String {
        self.credential
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn logs_dir(&self) -> PathBuf {
        logs_dir(&self.config)
    }

    /// The node's name is part of the id: runc keeps container state in a
    /// machine-wide directory, and two clusters (or test runs) on one machine
    /// must not collide there.
    pub(super) fn container_id(&self, id: u64) -> String {
        format!("{}-task-{id}", self.node)
    }

    fn cgroups_path(&self, id: u64) -> String {
        format!(
            "{}/{}",
            self.config.cgroup_parent.trim_end_matches('/'),
            self.container_id(id)
        )
    }

    async fn report(
        &self,
        id: u64,
        state: TaskState,
        exit_code: Option<i32>,
        message: Option<String>,
        stop: &watch::Receiver<bool>,
    ) {
        let body = TaskReport {
            state,
            exit_code,
            message,
            ssh_host_key: None,
        };
        self.send_report(id, body, stop).await
    }

    /// Reports until the host has it (or refuses it for good); gives up only at `stop`.
    async fn send_report(&self, id: u64, body: TaskReport, stop: &watch::Receiver<bool>) {
        let state = body.state;
        let mut backoff = Duration::from_millis(200);
        loop {
            let r = self
                .http
                .put(format!(
                    "{}/api/nodes/{}/tasks/{id}",
                    self.host_url, self.node
                ))
                .bearer_auth(self.credential())
                .json(&body)
                .send()
                .await;
            match r {
                Ok(resp) if resp.status().is_success() => return,
                Ok(resp) if resp.status().is_client_error() => {
                    let text = resp.text().await.unwrap_or_default();
                    tracing::warn!(task = id, state = %state, "host refused the report: {text}");
                    return;
                }
                Ok(resp) => {
                    tracing::warn!(task = id, status = %resp.status(), "report failed; retrying")
                }
                Err(e) => tracing::warn!(task = id, error = %e, "report failed; retrying"),
            }
            if *stop.borrow() {
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn image(&self, source: &ImageSource) -> Result<oci::ImportedImage, String> {
        match source {
            ImageSource::Environment(name) => {
                let archive = self
                    .config
                    .shared_dir
                    .join("environments")
                    .join(format!("{name}.tar"));
                if !archive.is_file() {
                    return Err(format!(
                        "environment {name:?} not found: {} does not exist on node {}",
                        archive.display(),
                        self.node
                    ));
                }
                let scratch = self.config.data_dir.join(super::STATE_DIR).join("import");
                std::fs::create_dir_all(&scratch)
                    .map_err(|e| format!("{}: {e}", scratch.display()))?;
                self.ctd
                    .import_archive(
                        &format!("rivernode.local/env/{name}:latest"),
                        &archive,
                        &scratch,
                    )
                    .await
                    .map_err(|e| e.to_string())
            }
            ImageSource::Snapshot { vps, snapshot } => self.snapshot_image(*vps, snapshot).await,
            ImageSource::Registry(r) => {
                let scratch = self.config.data_dir.join(super::STATE_DIR).join("import");
                std::fs::create_dir_all(&scratch)
                    .map_err(|e| format!("{}: {e}", scratch.display()))?;
                self.ctd
                    .pull(r, &self.config.insecure_registries, &scratch)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }

    fn spec_input(&self, a: &Assignment) -> Result<RuntimeSpecInput, String> {
        let mut mounts = Vec::new();
        let mut cwd = None;
        if self.config.shared_dir.is_dir() {
            mounts.push(MountInput {
                source: self.config.shared_dir.clone(),
                target: "/shared".into(),
                read_only: false,
            });
            cwd = Some("/shared".to_string());
            // Everyone's tasks run the archives in environments/: no task may
            // change them, nor replace the directory with a link of its own.
            let envs = self.config.shared_dir.join("environments");
            let _ = std::fs::create_dir(&envs);
            if !envs.symlink_metadata().is_ok_and(|m| m.is_dir()) {
                return Err(format!(
                    "{} is not a directory (a link?): fix the shared directory on node {}",
                    envs.display(),
                    self.node
                ));
            }
            mounts.push(MountInput {
                source: envs,
                target: "/shared/environments".into(),
                read_only: true,
            });
        }
        for m in &a.spec.mounts {
            if !std::path::Path::new(&m.source).exists() {
                return Err(format!(
                    "mount source {} does not exist on node {}",
                    m.source, self.node
                ));
            }
            mounts.push(MountInput {
                source: m.source.clone().into(),
                target: m.target.clone(),
                read_only: m.read_only,
            });
        }
        let p = &a.placement;
        let rivernode_env: BTreeMap<String, String> = [
            ("RIVERNODE_TASK_ID", a.id.to_string()),
            ("RIVERNODE_NODE", self.node.clone()),
            ("RIVERNODE_CPUS", p.cpus.to_string()),
            ("RIVERNODE_CORES", p.cpus.len().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Ok(RuntimeSpecInput {
            hostname: format!("task-{}", a.id),
            args: a.spec.command.clone(),
            env: a.spec.env.clone(),
            rivernode_env,
            cwd,
            mounts,
            cpus: p.cpus.clone(),
            mems: p.numa.map(|n| [n].into_iter().collect()),
            memory_bytes: a.spec.memory_bytes,
            pids_max: 32768,
            cgroups_path: self.cgroups_path(a.id),
            netns: None,
            privileged: if a.spec.privileged {
                Some(oci::capability_bound(&self.config.proc_root).map_err(|e| e.to_string())?)
            } else {
                None
            },
        })
    }
}

/// Where task logs are written: DATA_DIR/runner/logs/task-<id>.{stdout,stderr}.
pub fn logs_dir(config: &RunnerConfig) -> PathBuf {
    config.data_dir.join(super::STATE_DIR).join("logs")
}

struct Running {
    desired: watch::Sender<Desired>,
    handle: tokio::task::JoinHandle<()>,
}

/// Runs until `stop` turns true.
pub async fn reconcile_loop(ctx: Arc<TaskContext>, mut stop: watch::Receiver<bool>) {
    let mut running: HashMap<u64, Running> = HashMap::new();
    let mut ended: std::collections::HashSet<u64> = std::collections::HashSet::new();
    reconcile_networks(&ctx).await;
    adopt(&ctx, &mut running, &stop).await;
    let mut revision: Option<u64> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        let mut req = ctx
            .http
            .get(format!(
                "{}/api/nodes/{}/assignments",
                ctx.host_url, ctx.node
            ))
            .bearer_auth(ctx.credential())
            .timeout(Duration::from_secs(40));
        if let Some(r) = revision {
            req = req.query(&[("after", r.to_string()), ("wait_ms", "20000".to_string())]);
        }
        let fetched = tokio::select! {
            r = req.send() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let assignments: Assignments = match fetched {
            Ok(resp) if resp.status().is_success() => match resp.json().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable assignments");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            Ok(resp) => {
                tracing::warn!(status = %resp.status(), "assignments request refused");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot fetch assignments");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        revision = Some(assignments.revision);
        // A supervisor that returned has reported its task's end; the host may
        // not have processed that yet, so such tasks are not "vanished".
        running.retain(|id, r| {
            let done = r.handle.is_finished();
            if done {
                ended.insert(*id);
            }
            !done
        });
        ended.retain(|id| assignments.tasks.iter().any(|a| a.id == *id));
        // Node ports of running instances (after a runner restart the table
        // is rebuilt from the assignments and the addresses IPAM kept).
        for a in assignments
            .tasks
            .iter()
            .filter(|a| a.spec.kind == crate::api::Kind::Vps && a.desired != Desired::Killed)
        {
            let cid = ctx.container_id(a.id);
            if let (Some(port), Some(ip)) = (a.placement.node_port, ctx.vps.address_of(&cid)) {
                let map = crate::net::PortMap {
                    node_port: port,
                    ip,
                    port: 22,
                };
                if let Err(e) = ctx.vps.set_port(a.id, Some(map)) {
                    tracing::warn!(task = a.id, error = %e, "cannot publish the node port");
                }
            }
        }
        for a in &assignments.tasks {
            // A task whose supervisor just reported its end is not "vanished"
            // while the host catches up; a restart (assigning again) starts anew.
            if ended.contains(&a.id)
                && matches!(
                    a.state,
                    TaskState::Running | TaskState::Paused | TaskState::Lost
                )
            {
                continue;
            }
            match running.get(&a.id) {
                Some(r) => {
                    r.desired.send_if_modified(|d| {
                        let changed = *d != a.desired;
                        *d = a.desired;
                        changed
                    });
                    // The host lost sight of us (a partition, a slow heartbeat) while
                    // the task kept running: tell it what is really happening.
                    // Not while a snapshot holds it frozen: that is no user's pause.
                    let snapshotting = ctx.snapshot_locks.of(a.id).try_lock().is_err();
                    if a.state == TaskState::Lost && !snapshotting {
                        let observed = match ctx.ctd.status(&ctx.container_id(a.id)).await {
                            Ok(TaskStatus::Paused) => Some(TaskState::Paused),
                            Ok(TaskStatus::Running) | Ok(TaskStatus::Created) => {
                                Some(TaskState::Running)
                            }
                            _ => None,
                        };
                        if let Some(state) = observed {
                            ctx.report(a.id, state, None, None, &stop).await;
                        }
                    }
                }
                None if a.state == TaskState::Stopped && a.desired == Desired::Killed => {
                    // Delete of a stopped VPS: its kept container and disk go now.
                    let cid = ctx.container_id(a.id);
                    let mut problems = ctx.ctd.cleanup(&cid).await;
                    problems.extend(ctx.delete_all_snapshots(a.id).await);
                    if !problems.is_empty() {
                        tracing::warn!(task = a.id, ?problems, "cleanup left problems");
                    }
                    ctx.vps.forget(&cid);
                    ctx.report(a.id, TaskState::Killed, None, None, &stop).await;
                }
                None if a.state == TaskState::Stopped => {}
                None if a.desired == Desired::Killed => {
                    // Never started here (or already gone): nothing to stop.
                    ctx.report(
                        a.id,
                        TaskState::Killed,
                        None,
                        Some("killed before it started".into()),
                        &stop,
                    )
                    .await;
                }
                None if matches!(a.state, TaskState::Assigning) => {
                    // A restarted VPS runs anew: its earlier end no longer counts.
                    ended.remove(&a.id);
                    let (tx, rx) = watch::channel(a.desired);
                    let handle =
                        tokio::spawn(supervise(ctx.clone(), a.clone(), false, rx, stop.clone()));
                    running.insert(
                        a.id,
                        Running {
                            desired: tx,
                            handle,
                        },
                    );
                }
                None => {
                    // The host thinks it runs here but no container exists: it is gone.
                    ctx.report(
                        a.id,
                        TaskState::Failed,
                        None,
                        Some("the container vanished from the node".into()),
                        &stop,
                    )
                    .await;
                }
            }
        }
        // Tasks the host no longer assigns here are stopped.
        for (id, r) in &running {
            if !assignments.tasks.iter().any(|a| a.id == *id) {
                let _ = r.desired.send(Desired::Killed);
            }
        }
    }
    for (_, r) in running {
        r.handle.abort();
    }
}

/// After a crash: instance networks whose container is gone are taken down,
/// and the nftables table is rebuilt (the node ports of live instances come
/// back with the first assignments).
async fn reconcile_networks(ctx: &Arc<TaskContext>) {
    let live: std::collections::HashSet<String> = match ctx
        .ctd
        .containers_with_label(TASK_LABEL)
        .await
    {
        Ok(f) => f.into_iter().map(|(cid, _)| cid).collect(),
        Err(e) => {
            tracing::error!(error = %e, "cannot list containers; instance networks left as they are");
            return;
        }
    };
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
                Err(e) => tracing::warn!(error = %e, "netlink"),
            }
        }
    }
    if let Err(e) = ctx.vps.network.apply_firewall(vec![]) {
        tracing::warn!(error = %e, "cannot rebuild the nftables table");
    }
}

/// Re-adopts task containers an earlier runner started.
async fn adopt(
    ctx: &Arc<TaskContext>,
    running: &mut HashMap<u64, Running>,
    stop: &watch::Receiver<bool>,
) {
    let found = match ctx.ctd.containers_with_label(TASK_LABEL).await {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "cannot list task containers to re-adopt");
            return;
        }
    };
    for (cid, labels) in found {
        let Some(id) = labels.get(TASK_LABEL).and_then(|v| v.parse::<u64>().ok()) else {
            continue;
        };
        let desired = match ctx.ctd.status(&cid).await {
            Ok(TaskStatus::Paused) => Desired::Paused,
            // No task in it: a stopped VPS keeping its disk. The assignments
            // say whether it restarts or goes.
            Ok(TaskStatus::Absent) => continue,
            _ => Desired::Running,
        };
        tracing::info!(task = id, container = %cid, "re-adopting task container");
        let (tx, rx) = watch::channel(desired);
        let a = placeholder_assignment(id);
        let handle = tokio::spawn(supervise(ctx.clone(), a, true, rx, stop.clone()));
        running.insert(
            id,
            Running {
                desired: tx,
                handle,
            },
        );
    }
}

/// An adopted container needs only its id: its spec lives in containerd.
fn placeholder_assignment(id: u64) -> Assignment {
    Assignment {
        id,
        desired: Desired::Running,
        state: TaskState::Running,
        spec: crate::api::TaskSpec {
            command: vec![],
            env: Default::default(),
            mounts: vec![],
            image: ImageSource::Environment(String::new()),
            cores: 0,
            memory_bytes: None,
            gpu_count: 0,
            target: None,
            kind: crate::api::Kind::Command,
            ssh_keys: vec![],
            ssh_password_hash: None,
            privileged: false,
            restore: None,
        },
        placement: crate::api::Placement {
            node: String::new(),
            numa: None,
            cpus: Default::default(),
            memory_bytes: 0,
            gpus: vec![],
            node_port: None,
        },
    }
}

async fn supervise(
    ctx: Arc<TaskContext>,
    a: Assignment,
    adopted: bool,
    mut desired: watch::Receiver<Desired>,
    stop: watch::Receiver<bool>,
) {
    let id = a.id;
    let cid = ctx.container_id(id);
    if !adopted {
        let is_vps = a.spec.kind == crate::api::Kind::Vps;
        let started = async {
            let labels = ctx
                .ctd
                .container_labels(&cid)
                .await
                .map_err(|e| e.to_string())?;
            // `restart --from-snapshot`: the disk is recreated once per request.
            let restore = a.spec.restore.as_ref().filter(|r| {
                labels.as_ref().and_then(|l| l.get(RESTORE_LABEL)) != Some(&r.request.to_string())
            });
            let logs = ctx.logs_dir();
            std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
            let exe = std::env::current_exe()
                .map_err(|e| format!("locating the rivernode binary: {e}"))?;
            let uri =
                super::logdriver::uri(&exe, &logs, &format!("task-{id}"), ctx.config.max_log_bytes);
            if labels.is_some() && restore.is_none() {
                // A restarted VPS: its container, disk and SSH setup are still there.
                if is_vps {
                    ctx.vps
                        .start_network(id, &cid, a.placement.node_port)
                        .await?;
                }
                return ctx
                    .ctd
                    .start_existing(&cid, &uri, &uri)
                    .await
                    .map_err(|e| e.to_string());
            }
            // A restore must not race a snapshot or rotation of the same VPS.
            let lock = ctx.snapshot_locks.of(id);
            let _held = match restore {
                Some(_) => Some(lock.lock().await),
                None => None,
            };
            let image = match restore {
                Some(r) => ctx.snapshot_image(id, &r.snapshot).await?,
                None => ctx.image(&a.spec.image).await?,
            };
            let mut input = ctx.spec_input(&a)?;
            if is_vps {
                let found = ctx
                    .ctd
                    .find_in_image(&image, &[SSHD, "/etc/shadow"])
                    .await
                    .map_err(|e| e.to_string())?;
                let image_ssh = ImageSsh {
                    sshd: oci::rootfs::is_file(&found[0]).then(|| SSHD.to_string()),
                    shadow: found[1].clone(),
                };
                let login = SshLogin {
                    keys: &a.spec.ssh_keys,
                    password_hash: a.spec.ssh_password_hash.as_deref(),
                };
                let (args, mounts) = ctx.vps.ssh_server(&cid, &login, &image_ssh)?;
                tracing::info!(
                    task = id,
                    server = if image_ssh.sshd.is_some() {
                        "the image's sshd"
                    } else {
                        "injected dropbear"
                    },
                    "VPS SSH server"
                );
                let inet = ctx
                    .vps
                    .start_network(id, &cid, a.placement.node_port)
                    .await?;
                input.args = args;
                input.mounts.extend(mounts);
                input.netns = Some(inet.netns);
            }
            let spec = oci::build_spec(&image.config, &input).map_err(|e| e.to_string())?;
            if labels.is_some() {
                // Restoring: the old disk goes only now that everything else is
                // ready (a failure before this leaves the VPS stopped, disk intact).
                let problems = ctx.ctd.cleanup(&cid).await;
                if !problems.is_empty() {
                    return Err(format!("removing the old disk: {}", problems.join("; ")));
                }
            }
            let mut labels = HashMap::from([(TASK_LABEL.to_string(), id.to_string())]);
            if let Some(r) = &a.spec.restore {
                labels.insert(RESTORE_LABEL.to_string(), r.request.to_string());
            }
            ctx.ctd
                .run_container(&cid, labels, &image, &spec, &uri, &uri)
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        match started {
            Ok(pid) => {
                tracing::info!(task = id, pid, "task started");
                let report = TaskReport {
                    state: TaskState::Running,
                    exit_code: None,
                    message: None,
                    ssh_host_key: if is_vps { ctx.vps.host_key(&cid) } else { None },
                };
                ctx.send_report(id, report, &stop).await;
            }
            Err(message) => {
                tracing::warn!(task = id, "task failed to start: {message}");
                if is_vps {
                    let problems = ctx.vps.stop_network(id, &cid).await;
                    if !problems.is_empty() {
                        tracing::warn!(task = id, ?problems, "network cleanup left problems");
                    }
                }
                // A VPS whose disk is still there (a restart or restore that
                // failed) stays stopped, to be restarted or deleted; not failed.
                let keeps_disk = is_vps && matches!(ctx.ctd.container_exists(&cid).await, Ok(true));
                let state = if keeps_disk {
                    let _ = ctx.ctd.delete_task(&cid).await;
                    TaskState::Stopped
                } else {
                    TaskState::Failed
                };
                ctx.report(id, state, None, Some(message), &stop).await;
                return;
            }
        }
    } else {
        // Tell the host what we found (it may believe the task lost). One
        // frozen though it should run (a runner that died during a
        // snapshot's freeze) is thawed when the assignments say "running".
        let state = match ctx.ctd.status(&cid).await {
            Ok(TaskStatus::Paused) => TaskState::Paused,
            _ => TaskState::Running,
        };
        ctx.report(id, state, None, None, &stop).await;
    }

    let mut killed_by_us = false;
    let mut stopping = false;
    let mut escalate: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let ctd = ctx.ctd.clone();
    let wait_id = cid.clone();
    let mut exit = Box::pin(async move { ctd.wait(&wait_id).await });
    let code = loop {
        tokio::select! {
            r = &mut exit => break r,
            _ = async { escalate.as_mut().unwrap().await }, if escalate.is_some() => {
                tracing::info!(task = id, "grace period over: SIGKILL");
                let _ = ctx.ctd.kill(&cid, 9).await;
                escalate = None;
            }
            changed = desired.changed() => {
                if changed.is_err() {
                    // The reconcile loop is gone (runner stopping): leave the task running.
                    return;
                }
                let d = *desired.borrow_and_update();
                // Not while a snapshot holds the VPS frozen: its thaw would undo a pause.
                // Pause and resume wait for a snapshot's freeze and thaw (its
                // thaw would undo a pause); the lock is not held while reporting.
                let lock = ctx.snapshot_locks.of(id);
                match d {
                    Desired::Paused => {
                        let paused = {
                            let _held = lock.lock().await;
                            ctx.ctd.pause(&cid).await
                        };
                        match paused {
                            Ok(()) => ctx.report(id, TaskState::Paused, None, None, &stop).await,
                            Err(e) => tracing::warn!(task = id, error = %e, "pause failed"),
                        }
                    }
                    Desired::Running => {
                        let resumed = {
                            let _held = lock.lock().await;
                            if matches!(ctx.ctd.status(&cid).await, Ok(TaskStatus::Paused)) {
                                Some(ctx.ctd.resume(&cid).await)
                            } else {
                                None
                            }
                        };
                        match resumed {
                            Some(Ok(())) => ctx.report(id, TaskState::Running, None, None, &stop).await,
                            Some(Err(e)) => tracing::warn!(task = id, error = %e, "resume failed"),
                            None => {}
                        }
                    }
                    Desired::Killed | Desired::Stopped | Desired::Restarting if !killed_by_us => {
                        killed_by_us = true;
                        stopping = d != Desired::Killed;
                        // A paused task cannot handle SIGTERM: let it run to receive it.
                        if matches!(ctx.ctd.status(&cid).await, Ok(TaskStatus::Paused)) {
                            let _ = ctx.ctd.resume(&cid).await;
                        }
                        let _ = ctx.ctd.kill(&cid, 15).await;
                        escalate = Some(Box::pin(tokio::time::sleep(ctx.config.kill_grace.0)));
                    }
                    Desired::Killed | Desired::Stopped | Desired::Restarting => {
                        // A delete after a stop was asked for: the disk goes too.
                        stopping = d != Desired::Killed;
                    }
                }
            }
        }
    };
    let (state, exit_code, message) = match code {
        Ok(code) => {
            let oom = oci::oom_killed(
                std::path::Path::new("/sys/fs/cgroup"),
                &ctx.cgroups_path(id),
            );
            if oom {
                (
                    TaskState::KilledOom,
                    Some(code as i32),
                    Some("killed by the kernel's OOM killer at the memory limit".to_string()),
                )
            } else if killed_by_us && stopping {
                (TaskState::Stopped, Some(code as i32), None)
            } else if killed_by_us {
                (TaskState::Killed, Some(code as i32), None)
            } else if code == 0 {
                (TaskState::Completed, Some(0), None)
            } else {
                (
                    TaskState::Failed,
                    Some(code as i32),
                    Some(format!("exited with code {code}")),
                )
            }
        }
        Err(e) => (
            TaskState::Failed,
            None,
            Some(format!("lost track of the container: {e}")),
        ),
    };
    tracing::info!(task = id, state = %state, ?exit_code, "task ended");
    let mut problems = Vec::new();
    let mut message = message;
    if state == TaskState::Stopped {
        // Stopped: the container and its disk stay for a restart.
        if let Err(e) = ctx.ctd.delete_task(&cid).await {
            problems.push(e.to_string());
        }
        // Before the host hears "stopped", so a snapshot taken on stop is listed by then.
        if ctx.config.auto_snapshot_on_stop {
            if let Err(e) = ctx.take_snapshot(id, Some("automatic, on stop")).await {
                tracing::warn!(task = id, error = %e, "snapshot on stop failed");
                message = Some(format!("the snapshot on stop failed: {e}"));
            }
        }
        ctx.report(id, state, exit_code, message, &stop).await;
    } else {
        ctx.report(id, state, exit_code, message, &stop).await;
        problems = ctx.ctd.cleanup(&cid).await;
        // A deleted VPS takes its snapshots along; one that crashed or was
        // OOM-killed keeps them, to be restored into a new VPS.
        if state == TaskState::Killed {
            problems.extend(ctx.delete_all_snapshots(id).await);
        }
        ctx.vps.forget(&cid);
    }
    // An instance with an address is a VPS (also when adopted after a restart).
    if ctx.vps.address_of(&cid).is_some() {
        problems.extend(ctx.vps.stop_network(id, &cid).await);
    }
    if !problems.is_empty() {
        tracing::warn!(task = id, ?problems, "cleanup left problems");
    }
}

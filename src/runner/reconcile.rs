//! The runner's reconcile loop: it long-polls the node's assignments, hands
//! desired-state changes to the supervisors it runs, and for every instance
//! without a supervisor asks `lifecycle::plan` what to do and starts one
//! that does it. The driver's backend (containerd labels) is the only
//! record of what exists, so a runner killed at any point converges again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

use crate::api::host_client::HostClient;
use crate::api::{Assignment, Desired, ImageSource, Kind, TaskState};

use super::driver::Driver;
use super::lifecycle::{plan, Action, Observed, Outcome, Wanted};
use super::supervisor::{BringUp, Supervisors};

/// How long one assignments request waits for a change.
const LONG_POLL: Duration = Duration::from_secs(20);
/// How often instances no assignment names are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

struct Running {
    desired: watch::Sender<Desired>,
    handle: tokio::task::JoinHandle<()>,
}

fn wanted(a: &Assignment) -> Wanted {
    Wanted {
        kind: a.spec.kind,
        desired: a.desired,
        state: a.state,
        started: a.started,
        // The driver checks whether the disk was made for this request already.
        restore_pending: a.spec.restore.is_some(),
    }
}

/// What a supervisor needs of an instance no assignment names: its id and kind.
pub(super) fn placeholder(id: u64, kind: Kind) -> Assignment {
    Assignment {
        id,
        desired: Desired::Killed,
        state: TaskState::Running,
        started: true,
        spec: crate::api::TaskSpec {
            command: vec![],
            env: Default::default(),
            mounts: vec![],
            image: ImageSource::Environment(String::new()),
            cores: 0,
            memory_bytes: None,
            gpu_count: 0,
            target: None,
            kind,
            ssh_keys: vec![],
            ssh_password_hash: None,
            privileged: false,
            restore: None,
            movable: false,
            no_ssh: false,
            shm_bytes: None,
            vm_disk_bytes: None,
            onstart: None,
            args: vec![],
            ports: vec![],
            jupyter: false,
            no_network: false,
            hostname: None,
        },
        placement: crate::api::Placement {
            node: String::new(),
            numa: None,
            cpus: Default::default(),
            memory_bytes: 0,
            gpus: vec![],
            node_port: None,
            published: vec![],
        },
        owner: None,
        submitted_at_unix_ms: 0,
        public_address: None,
        notice: None,
        overlay_group: None,
    }
}

/// The supervisor's start for a planned action; `None`: nothing to do.
fn bring_up(action: Action) -> Option<(BringUp, Option<Desired>)> {
    let ended = |state, message, keep_disk, snapshot| {
        BringUp::Finish(Outcome {
            state,
            exit_code: None,
            message,
            keep_disk,
            snapshot,
        })
    };
    Some(match action {
        Action::Nothing => return None,
        Action::Create => (BringUp::Create, None),
        Action::Start => (BringUp::Start, None),
        Action::Supervise => (BringUp::Adopt, None),
        Action::FinishStop { state, snapshot } => (ended(state, None, true, snapshot), None),
        Action::Delete => (ended(TaskState::Deleted, None, false, false), None),
        Action::End { state, message, .. } => (ended(state, Some(message), false, false), None),
        Action::Discard => (BringUp::Discard, None),
        Action::StopUnassigned => (BringUp::Adopt, Some(Desired::Killed)),
    })
}

pub struct Reconciler<D: Driver> {
    sup: Arc<Supervisors<D>>,
    host: Arc<HostClient>,
    running: HashMap<u64, Running>,
    /// Tasks whose supervisor ended while the host may not show it yet.
    ended: HashSet<u64>,
    /// Ids whose container on the node is an earlier task's, and whether
    /// their delete was reported (each end is reported once).
    foreign: HashSet<(u64, bool)>,
    /// Woken when a supervisor ends, so the next assignments come at once.
    finished: Arc<Notify>,
}

impl<D: Driver> Reconciler<D> {
    pub fn new(sup: Arc<Supervisors<D>>, host: Arc<HostClient>) -> Self {
        Self {
            sup,
            host,
            running: HashMap::new(),
            ended: HashSet::new(),
            foreign: HashSet::new(),
            finished: Arc::new(Notify::new()),
        }
    }

    /// Runs until `stop` turns true; supervised instances keep running then.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        self.sup.driver.recover().await;
        let mut revision: Option<u64> = None;
        let mut last_sweep: Option<Instant> = None;
        loop {
            if *stop.borrow() {
                break;
            }
            let finished = self.finished.clone();
            let fetched = tokio::select! {
                r = self.host.assignments(revision, LONG_POLL) => r,
                // A supervisor ended: look again now, without waiting for a change.
                _ = finished.notified(), if revision.is_some() => { revision = None; continue; }
                _ = stop.wait_for(|s| *s) => break,
            };
            let assignments = match fetched {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot fetch assignments");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.wait_for(|s| *s) => break,
                    }
                    continue;
                }
            };
            revision = Some(assignments.revision);
            let sweep = last_sweep.is_none_or(|t| t.elapsed() >= SWEEP_EVERY);
            if sweep {
                last_sweep = Some(Instant::now());
            }
            self.converge(&assignments.tasks, sweep).await;
            self.forget(&assignments.tasks, &assignments.forget).await;
        }
        for (_, r) in self.running.drain() {
            r.handle.abort();
        }
    }

    /// One pass: every assignment and (when `sweep`) every instance found.
    async fn converge(&mut self, tasks: &[Assignment], sweep: bool) {
        // A supervisor that returned has reported its task's end; the host
        // may not show that yet, so such tasks are not acted on again.
        self.running.retain(|id, r| {
            let done = r.handle.is_finished();
            if done {
                self.ended.insert(*id);
            }
            !done
        });
        // Until the host shows the end (or a restart assigns it anew).
        self.ended.retain(|id| {
            tasks.iter().any(|a| {
                a.id == *id
                    && matches!(
                        a.state,
                        TaskState::Running | TaskState::Paused | TaskState::Lost
                    )
            })
        });
        self.sup.driver.converge_network(tasks).await;
        self.sup.driver.converge_cpus(tasks).await;
        self.sup.driver.follow_assignments(tasks).await;
        let busy: Vec<u64> = self.running.keys().copied().collect();
        self.sup.driver.converge_gpus(&busy).await;
        for a in tasks {
            if let Some(r) = self.running.get(&a.id) {
                r.desired.send_if_modified(|d| {
                    let changed = *d != a.desired;
                    *d = a.desired;
                    changed
                });
                if a.state == TaskState::Lost {
                    self.tell_the_truth(a.id).await;
                }
                continue;
            }
            if self.ended.contains(&a.id) {
                continue;
            }
            let observed = match self.sup.driver.observe(a.id).await {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(task = a.id, error = %crate::error_chain(&e), "cannot observe the instance");
                    continue;
                }
            };
            if observed != Observed::Absent && !self.sup.driver.made_for(a).await {
                self.earlier_life(a);
                continue;
            }
            let mut w = wanted(a);
            // The host may not have heard that a command started (its report
            // was still queued) when the node rebooted: the node's own record says.
            if observed == Observed::Kept
                && w.kind == Kind::Command
                && !w.started
                && self.sup.driver.may_have_run(a.id).await
            {
                w.started = true;
            }
            let action = plan(Some(&w), observed, None);
            self.act(a.clone(), action, observed);
        }
        // Supervised tasks the host no longer assigns here are stopped (a VPS keeps its disk).
        for (id, r) in &self.running {
            if !tasks.iter().any(|a| a.id == *id) {
                let _ = r.desired.send(Desired::Killed);
            }
        }
        if sweep {
            self.sweep(tasks).await;
        }
    }

    /// Removes what deleted VPS that moved away from this node left here
    /// (their container, disk and older snapshots), then tells the host;
    /// what fails is tried again with the next assignments.
    async fn forget(&mut self, tasks: &[Assignment], ids: &[u64]) {
        for &id in ids {
            if self.running.contains_key(&id) || tasks.iter().any(|a| a.id == id) {
                continue;
            }
            let problems = self.sup.driver.remove(id, true).await;
            if !problems.is_empty() {
                let problems: Vec<String> =
                    problems.iter().map(|p| crate::error_chain(p)).collect();
                tracing::warn!(
                    task = id,
                    ?problems,
                    "cannot remove what a moved VPS left here yet"
                );
                continue;
            }
            match self.host.left_removed(id).await {
                Ok(()) => tracing::info!(task = id, "what a moved VPS left here is removed"),
                Err(e) => {
                    tracing::warn!(task = id, error = %crate::error_chain(&e), "cannot tell the host")
                }
            }
        }
    }

    /// The container under `a`'s id belongs to an earlier task that had the
    /// same id: it is left exactly as it is (another owner's disk), and `a`
    /// ends without it, once: a delete is done (nothing of `a` is here),
    /// anything else fails, saying what the operator can do.
    fn earlier_life(&mut self, a: &Assignment) {
        if !self.foreign.insert((a.id, a.desired == Desired::Deleted)) {
            return;
        }
        let (state, message) = if a.desired == Desired::Deleted {
            (TaskState::Deleted, None)
        } else {
            (
                TaskState::Failed,
                Some(format!(
                    "this node still has the container of an earlier task {} (from before the host's \
                     database was reset), which is another owner's: it was left alone. The operator \
                     removes it (`ctr -n rivernode containers rm {}-task-{}` after saving what is needed), \
                     then restart this one",
                    a.id, self.host.node(), a.id
                )),
            )
        };
        tracing::warn!(
            task = a.id,
            "the node's container of this id is an earlier task's; left alone"
        );
        self.sup.reports.push(
            a.id,
            crate::api::TaskReport {
                state,
                exit_code: None,
                message,
                ssh_host_key: None,
                parked: None,
            },
        );
    }

    /// The host lost sight of us (a partition, a slow heartbeat) while the
    /// task kept running: tell it what is really happening. Not while a
    /// snapshot holds it frozen: that is no user's pause.
    async fn tell_the_truth(&self, id: u64) {
        if self.sup.driver.lock(id).try_lock().is_err() {
            return;
        }
        let state = match self.sup.driver.observe(id).await {
            Ok(Observed::Paused) => TaskState::Paused,
            Ok(Observed::Running | Observed::Created) => TaskState::Running,
            _ => return,
        };
        self.sup.reports.push(
            id,
            crate::api::TaskReport {
                state,
                exit_code: None,
                message: None,
                ssh_host_key: None,
                parked: None,
            },
        );
    }

    /// Instances that no assignment names: leftovers of ended commands go,
    /// a VPS's disk stays.
    async fn sweep(&mut self, tasks: &[Assignment]) {
        let found = match self.sup.driver.list().await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "cannot list instances");
                return;
            }
        };
        for f in found {
            if self.running.contains_key(&f.id) || tasks.iter().any(|a| a.id == f.id) {
                continue;
            }
            let action = plan(None, f.observed, f.kind);
            let kind = f.kind.unwrap_or(Kind::Vps);
            self.act(placeholder(f.id, kind), action, f.observed);
        }
    }

    fn act(&mut self, a: Assignment, action: Action, observed: Observed) {
        let id = a.id;
        if action != Action::Nothing {
            tracing::info!(task = id, ?observed, ?action, "reconciling");
        }
        let Some((bring, desired)) = bring_up(action) else {
            return;
        };
        let (tx, rx) = watch::channel(desired.unwrap_or(a.desired));
        let sup = self.sup.clone();
        let finished = self.finished.clone();
        let handle = tokio::spawn(async move {
            sup.run(a, bring, rx).await;
            finished.notify_one();
        });
        self.running.insert(
            id,
            Running {
                desired: tx,
                handle,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_planned_action_has_a_bring_up() {
        assert_eq!(bring_up(Action::Nothing), None);
        assert_eq!(bring_up(Action::Create), Some((BringUp::Create, None)));
        assert_eq!(
            bring_up(Action::StopUnassigned),
            Some((BringUp::Adopt, Some(Desired::Killed)))
        );
        let Some((BringUp::Finish(o), None)) = bring_up(Action::FinishStop {
            state: TaskState::Stopped,
            snapshot: true,
        }) else {
            panic!("a finish")
        };
        assert!(o.keep_disk && o.snapshot);
        let Some((BringUp::Finish(o), None)) = bring_up(Action::Delete) else {
            panic!("a finish")
        };
        assert_eq!((o.state, o.keep_disk), (TaskState::Deleted, false));
    }
}

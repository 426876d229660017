//! One instance's supervisor: brings it up (or adopts it), carries out the
//! host's desired state (pause, resume, stop, kill, delete), and when it
//! ends, reports how (`lifecycle::classify`) and keeps or removes what the
//! outcome says. Everything it does to the instance goes through a
//! `Driver`; everything it tells the host goes through the report queue.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::api::{Assignment, Desired, Kind, TaskReport, TaskState};

use super::driver::{Driver, InstanceError, Signal, Started};
use super::lifecycle::{classify, Asked, ExitFacts, Observed, Outcome};
use super::report::Reports;

/// How the supervisor finds the instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BringUp {
    /// Make it from its image (or snapshot) and start it.
    Create,
    /// Start a new task on its kept container.
    Start,
    /// Its task exists (an earlier runner made it): watch it.
    Adopt,
    /// It has ended already: only report this and keep or remove what it says.
    Finish(Outcome),
    /// A command's leftover container whose end the host has: remove it.
    Discard,
}

/// A test hook for crash-point tests: with `RIVERNODE_CRASH_AT=<step>` the
/// runner dies (SIGKILL, as a crash would) on reaching that step.
pub fn crash_point(crash_at: &Option<String>, step: &str) {
    if crash_at.as_deref() == Some(step) {
        tracing::warn!(step, "RIVERNODE_CRASH_AT: dying here");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    }
}

/// What every supervisor shares.
pub struct Supervisors<D> {
    pub driver: Arc<D>,
    pub reports: Reports,
    /// Time between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    pub auto_snapshot_on_stop: bool,
    /// Test-only: die (SIGKILL) on reaching a named step (`RIVERNODE_CRASH_AT`).
    pub crash_at: Option<String>,
    /// Where a VPS's image's EXPOSEd ports are published (the host); none
    /// in unit tests.
    pub host: Option<Arc<crate::api::host_client::HostClient>>,
}

fn report(state: TaskState) -> TaskReport {
    TaskReport {
        state,
        exit_code: None,
        message: None,
        ssh_host_key: None,
        parked: None,
    }
}

impl<D: Driver> Supervisors<D> {
    /// Publishes the image's EXPOSEd ports the VPS did not ask for, and
    /// makes it with them (their node ports, its `VAST_*_PORT_*`). Not
    /// fatal: a VPS whose host cannot publish them runs without them (the
    /// runner's log says why).
    async fn publish_exposed(
        &self,
        a: &mut Assignment,
        exposed: Vec<crate::api::ports::PortRequest>,
    ) {
        let (new, _) = crate::api::ports::still_unpublished(&a.spec.ports, &exposed);
        let Some(host) = self.host.as_ref().filter(|_| !new.is_empty()) else {
            return;
        };
        let req = crate::api::ports::ExposeRequest { ports: exposed };
        match host.expose(a.id, &req).await {
            Ok(placement) => {
                tracing::info!(task = a.id, ports = ?new, "the image's EXPOSEd ports are published");
                // What the host published (it may leave some out: 22).
                a.spec.ports = placement
                    .published
                    .iter()
                    .map(|p| crate::api::ports::PortRequest {
                        port: p.request,
                        proto: p.proto,
                    })
                    .collect();
                a.placement = placement;
            }
            Err(e) => {
                tracing::warn!(task = a.id, error = %crate::error_chain(&e), "the image's EXPOSEd ports are not published");
            }
        }
    }
}

/// What `vps status` should say of how an onstart script ended; `None`
/// when it went well (or there was none).
fn onstart_news(id: u64, r: Result<Option<u32>, InstanceError>) -> Option<String> {
    match r {
        Ok(None | Some(0)) => None,
        Ok(Some(code)) => Some(format!(
            "onstart exited with code {code} (its output: `rivernode task logs {id} --onstart`)"
        )),
        Err(e) => Some(format!("onstart could not run: {}", crate::error_chain(&e))),
    }
}

/// Resolves once the host asks for the instance to end (never, if the
/// host goes away: the runner's own stop ends the work another way).
async fn asked_to_end(desired: &mut watch::Receiver<Desired>) {
    loop {
        if Asked::from_desired(*desired.borrow_and_update()) != Asked::Nothing {
            return;
        }
        if desired.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl<D: Driver> Supervisors<D> {
    fn crash_point(&self, step: &str) {
        crash_point(&self.crash_at, step)
    }

    /// Runs instance `a` until it ends (or the runner stops: then the
    /// instance is left running, to be adopted by the next runner).
    pub async fn run(
        self: Arc<Self>,
        mut a: Assignment,
        bring: BringUp,
        mut desired: watch::Receiver<Desired>,
    ) {
        let id = a.id;
        let kind = a.spec.kind;
        let mut oom_at_start = 0;
        match bring {
            BringUp::Finish(outcome) => {
                self.finish(id, outcome).await;
                return;
            }
            BringUp::Discard => {
                let problems = self.driver.remove(id, false).await;
                if !problems.is_empty() {
                    let problems: Vec<String> =
                        problems.iter().map(|p| crate::error_chain(p)).collect();
                    tracing::warn!(task = id, ?problems, "cleanup left problems");
                }
                return;
            }
            BringUp::Create | BringUp::Start => {
                if bring == BringUp::Create {
                    // Asked to end while its image is still being pulled:
                    // it ends now, not when a slow registry lets go (F7).
                    let prepared = tokio::select! {
                        r = self.driver.prepare(&a) => Some(r),
                        _ = asked_to_end(&mut desired) => None,
                    };
                    match prepared {
                        Some(Ok(exposed)) => self.publish_exposed(&mut a, exposed).await,
                        Some(Err(e)) => {
                            let message = crate::error_chain(&e);
                            tracing::warn!(task = id, "task failed to start: {message}");
                            self.start_failed(id, kind, message).await;
                            return;
                        }
                        None => {
                            let asked = Asked::from_desired(*desired.borrow());
                            tracing::info!(task = id, ?asked, "asked to end before it was made");
                            self.ended_unstarted(id, kind, asked).await;
                            return;
                        }
                    }
                }
                let started = if bring == BringUp::Create {
                    self.driver.create(&a).await
                } else {
                    self.driver.start(&a).await
                };
                match started {
                    Ok(Started { pid, host_key }) => {
                        tracing::info!(task = id, pid, "task started");
                        self.crash_point("started");
                        oom_at_start = self.driver.oom_kills(id);
                        self.reports.push(
                            id,
                            TaskReport {
                                ssh_host_key: host_key,
                                parked: None,
                                ..report(TaskState::Running)
                            },
                        );
                    }
                    Err(e) => {
                        let message = crate::error_chain(&e);
                        tracing::warn!(task = id, "task failed to start: {message}");
                        self.start_failed(id, kind, message).await;
                        return;
                    }
                }
            }
            BringUp::Adopt => {
                let observed = self.driver.observe(id).await;
                let asked = Asked::from_desired(*desired.borrow());
                if matches!(observed, Ok(Observed::Created)) && asked != Asked::Nothing {
                    self.ended_unstarted(id, kind, asked).await;
                    return;
                }
                let state = match observed {
                    Ok(Observed::Created) => match self.driver.start_created(id).await {
                        // Created but never started: no code of it has run, so
                        // starting it now runs the work exactly once.
                        Ok(()) => Some(TaskState::Running),
                        Err(e) => {
                            self.start_failed(id, kind, crate::error_chain(&e)).await;
                            return;
                        }
                    },
                    Ok(Observed::Paused) => Some(TaskState::Paused),
                    Ok(Observed::Running) => Some(TaskState::Running),
                    // It ended while no runner watched: `wait` says how.
                    _ => None,
                };
                if let Some(s) = state {
                    tracing::info!(task = id, state = %s, "re-adopted");
                    self.reports.push(id, report(s));
                }
            }
        }

        // A VPS's onstart runs on each start it was made or started for
        // (not on adoption: it ran when the instance started).
        let onstart = (matches!(bring, BringUp::Create | BringUp::Start)
            && (a.spec.onstart.is_some() || a.spec.jupyter))
            .then(|| a.clone());
        let exit = self.watch(id, kind, &mut desired, onstart).await;
        let Some(exit) = exit else {
            return; // the runner is stopping: leave it running
        };
        // Why it ended is what the host wants of it now: that survives crashes.
        let asked = Asked::from_desired(*desired.borrow());
        let outcome = classify(&ExitFacts {
            kind,
            exit,
            asked,
            oom_at_start,
            oom_at_exit: self.driver.oom_kills(id),
        });
        tracing::info!(task = id, state = %outcome.state, exit_code = ?outcome.exit_code, "task ended");
        self.finish(id, outcome).await;
    }

    /// An instance asked to end before its task ever ran: it ends without
    /// running, a never-run disk needs no snapshot, and a VPS that has no
    /// disk yet (killed while its image was pulled) has none to keep.
    async fn ended_unstarted(&self, id: u64, kind: Kind, asked: Asked) {
        let mut outcome = Outcome {
            snapshot: false,
            ..classify(&ExitFacts {
                kind,
                exit: None,
                asked,
                oom_at_start: 0,
                oom_at_exit: 0,
            })
        };
        if matches!(self.driver.observe(id).await, Ok(Observed::Absent)) {
            outcome.keep_disk = false;
        }
        let what = match asked {
            Asked::Stop => "stopped",
            Asked::Kill => "killed",
            Asked::Delete | Asked::Nothing => "deleted",
        };
        outcome.message = Some(format!("{what} before it started"));
        self.finish(id, outcome).await;
    }

    /// A start that failed: a VPS whose disk is there stays stopped (to be
    /// restarted or deleted), anything else failed and is removed.
    async fn start_failed(&self, id: u64, kind: Kind, message: String) {
        let keeps_disk =
            kind == Kind::Vps && !matches!(self.driver.observe(id).await, Ok(Observed::Absent));
        let outcome = Outcome {
            state: if keeps_disk {
                TaskState::Stopped
            } else {
                TaskState::Failed
            },
            exit_code: None,
            message: Some(message),
            keep_disk: keeps_disk,
            snapshot: false,
        };
        self.finish(id, outcome).await;
    }

    /// Carries out the desired state until the main process exits; `None`
    /// when the runner is stopping (the instance is left as it is).
    async fn watch(
        &self,
        id: u64,
        kind: Kind,
        desired: &mut watch::Receiver<Desired>,
        onstart: Option<Assignment>,
    ) -> Option<Option<u32>> {
        let driver = self.driver.clone();
        let mut exit = Box::pin(async move { driver.wait(id).await });
        let driver = self.driver.clone();
        let mut onstart = onstart.map(|a| Box::pin(async move { driver.onstart(&a).await }));
        let mut signalled = false;
        let mut escalate: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        // The desired state it was handed counts as a change too.
        desired.mark_changed();
        loop {
            tokio::select! {
                // An exit that is already there wins: nothing to signal then.
                biased;
                r = &mut exit => return Some(r.ok()),
                r = async { onstart.as_mut().expect("guarded").await }, if onstart.is_some() => {
                    onstart = None;
                    // Said while it runs, before any end it is asked for
                    // (one that kills the script is no failure of it).
                    if let (false, Some(news)) = (signalled, onstart_news(id, r)) {
                        tracing::warn!(task = id, "{news}");
                        // In the state it is in now: news is no resume.
                        let now = match self.driver.observe(id).await {
                            Ok(Observed::Paused) => TaskState::Paused,
                            _ => TaskState::Running,
                        };
                        self.reports.push(
                            id,
                            TaskReport {
                                message: Some(news),
                                ..report(now)
                            },
                        );
                    }
                }
                _ = async { escalate.as_mut().expect("guarded").await }, if escalate.is_some() => {
                    tracing::info!(task = id, "grace period over: SIGKILL");
                    if let Err(e) = self.driver.signal(id, Signal::Kill).await {
                        tracing::warn!(task = id, error = %crate::error_chain(&e), "SIGKILL failed");
                    }
                    escalate = None;
                }
                changed = desired.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    let d = *desired.borrow_and_update();
                    self.apply(id, kind, d, &mut signalled, &mut escalate).await;
                }
            }
        }
    }

    async fn apply(
        &self,
        id: u64,
        kind: Kind,
        d: Desired,
        signalled: &mut bool,
        escalate: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    ) {
        // Pause and resume wait for a snapshot's freeze and thaw (its thaw
        // would undo a pause); the lock is not held while reporting.
        let lock = self.driver.lock(id);
        match d {
            Desired::Paused if !*signalled => {
                let now = self.driver.observe(id).await;
                if matches!(now, Ok(Observed::Paused)) {
                    return;
                }
                let paused = {
                    let _held = lock.lock().await;
                    self.driver.pause(id).await
                };
                match paused {
                    Ok(()) => self.reports.push(id, report(TaskState::Paused)),
                    Err(e) => {
                        tracing::warn!(task = id, error = %crate::error_chain(&e), "pause failed")
                    }
                }
            }
            Desired::Running if !*signalled => {
                let resumed = {
                    let _held = lock.lock().await;
                    if matches!(self.driver.observe(id).await, Ok(Observed::Paused)) {
                        Some(self.driver.resume(id).await)
                    } else {
                        None
                    }
                };
                match resumed {
                    Some(Ok(())) => self.reports.push(id, report(TaskState::Running)),
                    Some(Err(e)) => {
                        tracing::warn!(task = id, error = %crate::error_chain(&e), "resume failed")
                    }
                    None => {}
                }
            }
            Desired::Paused | Desired::Running => {}
            Desired::Stopped | Desired::Restarting | Desired::Killed | Desired::Deleted => {
                if *signalled {
                    // A delete after a stop was asked for: read at exit.
                    return;
                }
                *signalled = true;
                // A paused task cannot handle a signal: let it run to receive it.
                if matches!(self.driver.observe(id).await, Ok(Observed::Paused)) {
                    let _ = self.driver.resume(id).await;
                }
                // Kill of a VPS is a hard stop; everything else gets the grace period.
                let hard = d == Desired::Killed && kind == Kind::Vps;
                let signal = if hard { Signal::Kill } else { Signal::Term };
                if let Err(e) = self.driver.signal(id, signal).await {
                    tracing::warn!(task = id, error = %crate::error_chain(&e), "signal failed");
                }
                self.crash_point("signalled");
                if !hard {
                    *escalate = Some(Box::pin(tokio::time::sleep(self.kill_grace)));
                }
            }
        }
    }

    /// Reports `outcome` and keeps or removes what it says. What the report
    /// describes is removed only once the host has it, so a crash in
    /// between leaves something to find, never a report of nothing.
    async fn finish(&self, id: u64, outcome: Outcome) {
        self.driver.exited(id);
        let mut problems = Vec::new();
        let mut message = outcome.message.clone();
        let mut parked = None;
        let r = |message, parked| TaskReport {
            state: outcome.state,
            exit_code: outcome.exit_code,
            message,
            ssh_host_key: None,
            parked,
        };
        if outcome.state == TaskState::Deleted {
            problems.extend(self.driver.remove(id, true).await);
            self.crash_point("removed");
            self.reports.deliver(id, r(message, None)).await;
        } else if outcome.keep_disk {
            problems.extend(self.driver.keep(id).await);
            self.crash_point("kept");
            // Before the host hears "stopped", so the snapshot is listed by then.
            if outcome.snapshot && self.auto_snapshot_on_stop {
                match self.driver.snapshot_on_stop(id).await {
                    Err(e) => {
                        let e = crate::error_chain(&e);
                        tracing::warn!(task = id, error = %e, "snapshot on stop failed");
                        message = Some(format!("the snapshot on stop failed: {e}"));
                    }
                    // Parked before the stop is reported, so that the host
                    // never hears of a stop it holds no copy of as parked.
                    Ok(()) => match self.driver.park(id).await {
                        Ok(p) => parked = p,
                        Err(e) => {
                            let e = crate::error_chain(&e);
                            tracing::warn!(task = id, error = %e, "parking on the host failed");
                            message = Some(format!(
                                "parking on the host failed (it restarts only on this node): {e}"
                            ));
                        }
                    },
                }
                self.crash_point("snapshotted");
            }
            self.reports.deliver(id, r(message, parked)).await;
        } else {
            if !self.reports.deliver(id, r(message, None)).await {
                return; // stopping: the next runner finds it and reports again
            }
            self.crash_point("reported");
            problems.extend(self.driver.remove(id, false).await);
        }
        if !problems.is_empty() {
            let problems: Vec<String> = problems.iter().map(|p| crate::error_chain(p)).collect();
            tracing::warn!(task = id, ?problems, "cleanup left problems");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::driver::fake::FakeDriver;
    use super::super::report::recorder::Recorder;
    use super::*;
    use crate::api::{ImageSource, Placement, TaskSpec};

    struct Bench {
        driver: Arc<FakeDriver>,
        rec: Arc<Recorder>,
        sup: Arc<Supervisors<FakeDriver>>,
        _stop: watch::Sender<bool>,
    }

    fn bench(driver: FakeDriver) -> Bench {
        let driver = Arc::new(driver);
        let rec = Arc::new(Recorder::default());
        let (stop_tx, stop) = watch::channel(false);
        let sup = Arc::new(Supervisors {
            driver: driver.clone(),
            reports: Reports::start(rec.clone(), stop),
            kill_grace: Duration::from_secs(3600),
            auto_snapshot_on_stop: true,
            crash_at: None,
            host: None,
        });
        Bench {
            driver,
            rec,
            sup,
            _stop: stop_tx,
        }
    }

    fn assignment(id: u64, kind: Kind) -> Assignment {
        Assignment {
            id,
            desired: Desired::Running,
            state: TaskState::Assigning,
            started: false,
            spec: TaskSpec {
                command: vec!["x".into()],
                env: Default::default(),
                mounts: vec![],
                image: ImageSource::Environment("base".into()),
                cores: 1,
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
            placement: Placement {
                node: "n1".into(),
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

    impl Bench {
        fn spawn(
            &self,
            a: Assignment,
            bring: BringUp,
            d: Desired,
        ) -> (watch::Sender<Desired>, tokio::task::JoinHandle<()>) {
            let (tx, rx) = watch::channel(d);
            (tx, tokio::spawn(self.sup.clone().run(a, bring, rx)))
        }

        async fn until_reported(&self, id: u64, state: TaskState) {
            loop {
                let notified = self.rec.notify.notified();
                if self.rec.states(id).contains(&state) {
                    return;
                }
                notified.await;
            }
        }
    }

    #[tokio::test]
    async fn a_failed_onstart_is_said_while_the_vps_runs_and_a_good_one_is_not() {
        let b = bench(FakeDriver::obedient());
        for (id, script) in [(1, "exit 1 # fail"), (2, "true")] {
            let mut a = assignment(id, Kind::Vps);
            a.spec.onstart = Some(script.into());
            let (tx, h) = b.spawn(a, BringUp::Create, Desired::Running);
            b.until_reported(id, TaskState::Running).await;
            // Its news comes before the stop's report, or not at all.
            tokio::task::yield_now().await;
            tx.send(Desired::Stopped).unwrap();
            h.await.unwrap();
        }
        let said = |id| -> Vec<Option<String>> {
            b.rec
                .got
                .lock()
                .unwrap()
                .iter()
                .filter(|(i, r)| *i == id && r.state == TaskState::Running)
                .map(|(_, r)| r.message.clone())
                .collect()
        };
        let failed = said(1);
        assert!(
            failed
                .iter()
                .flatten()
                .any(|m| m.contains("onstart exited with code 1")),
            "{failed:?}"
        );
        assert!(said(2).iter().all(Option::is_none), "{:?}", said(2));
        assert_eq!(b.rec.last(1).unwrap().state, TaskState::Stopped);
    }

    #[tokio::test]
    async fn a_command_killed_while_it_is_created_ends_at_once() {
        let mut d = FakeDriver::obedient();
        d.stall_prepare = true;
        let b = bench(d);
        let (tx, h) = b.spawn(
            assignment(1, Kind::Command),
            BringUp::Create,
            Desired::Running,
        );
        tokio::task::yield_now().await;
        tx.send(Desired::Killed).unwrap();
        h.await.unwrap();
        let last = b.rec.last(1).unwrap();
        assert_eq!(last.state, TaskState::Killed);
        assert_eq!(
            b.rec.states(1),
            vec![TaskState::Killed],
            "never reported running"
        );
    }

    #[tokio::test]
    async fn a_vps_asked_to_end_while_its_image_is_pulled_ends_at_once() {
        for (asked, state) in [
            (Desired::Killed, TaskState::Killed),
            (Desired::Stopped, TaskState::Stopped),
            (Desired::Deleted, TaskState::Deleted),
        ] {
            let mut d = FakeDriver::obedient();
            d.stall_prepare = true;
            let b = bench(d);
            let (tx, h) = b.spawn(assignment(1, Kind::Vps), BringUp::Create, Desired::Running);
            tokio::task::yield_now().await;
            tx.send(asked).unwrap();
            h.await.unwrap();
            assert_eq!(b.rec.states(1), vec![state], "{asked:?}: never running");
            let message = b.rec.last(1).unwrap().message.unwrap_or_default();
            assert!(message.contains("before it started"), "{message}");
            assert!(!b.driver.exists(1), "{asked:?}: nothing was made");
        }
    }

    #[tokio::test]
    async fn a_stopped_vps_with_an_oom_killed_child_keeps_its_disk_and_is_snapshotted() {
        let b = bench(FakeDriver::obedient());
        let (tx, h) = b.spawn(assignment(1, Kind::Vps), BringUp::Create, Desired::Running);
        b.until_reported(1, TaskState::Running).await;
        b.driver.with(1, |i| i.oom_kills = 2);
        tx.send(Desired::Stopped).unwrap();
        h.await.unwrap();
        let last = b.rec.last(1).unwrap();
        assert_eq!(last.state, TaskState::Stopped);
        assert!(last
            .message
            .unwrap()
            .contains("2 processes were OOM-killed"));
        b.driver.with(1, |i| {
            assert!(i.disk, "the disk stays");
            assert_eq!(i.observed, Observed::Kept);
            assert_eq!(i.snapshots, 1, "the snapshot on stop was taken");
            assert_eq!(i.signals, vec![Signal::Term]);
        });
    }

    #[tokio::test]
    async fn kill_of_a_vps_is_a_hard_stop_that_keeps_the_disk() {
        let b = bench(FakeDriver::obedient());
        let (tx, h) = b.spawn(assignment(2, Kind::Vps), BringUp::Create, Desired::Running);
        b.until_reported(2, TaskState::Running).await;
        tx.send(Desired::Killed).unwrap();
        h.await.unwrap();
        assert_eq!(b.rec.last(2).unwrap().state, TaskState::Killed);
        b.driver.with(2, |i| {
            assert_eq!(i.signals, vec![Signal::Kill], "SIGKILL, no grace");
            assert_eq!(i.snapshots, 0);
            assert_eq!(i.observed, Observed::Kept);
        });
    }

    #[tokio::test]
    async fn delete_removes_the_vps_and_reports_it_only_then() {
        let b = bench(FakeDriver::obedient());
        let (tx, h) = b.spawn(assignment(3, Kind::Vps), BringUp::Create, Desired::Running);
        b.until_reported(3, TaskState::Running).await;
        tx.send(Desired::Deleted).unwrap();
        h.await.unwrap();
        assert_eq!(b.rec.last(3).unwrap().state, TaskState::Deleted);
        assert!(!b.driver.exists(3));
    }

    #[tokio::test]
    async fn a_vps_whose_ssh_server_exits_keeps_its_disk() {
        let b = bench(FakeDriver::default());
        let (_tx, h) = b.spawn(assignment(4, Kind::Vps), BringUp::Create, Desired::Running);
        b.until_reported(4, TaskState::Running).await;
        b.driver.exit(4, 1);
        h.await.unwrap();
        let last = b.rec.last(4).unwrap();
        assert_eq!(last.state, TaskState::Failed);
        assert!(last.message.unwrap().contains("disk is kept"));
        assert!(b.driver.exists(4), "the disk stays");
    }

    #[tokio::test]
    async fn a_command_with_an_oom_killed_child_that_exits_0_completes() {
        let b = bench(FakeDriver::default());
        let (_tx, h) = b.spawn(
            assignment(5, Kind::Command),
            BringUp::Create,
            Desired::Running,
        );
        b.until_reported(5, TaskState::Running).await;
        b.driver.with(5, |i| i.oom_kills = 1);
        b.driver.exit(5, 0);
        h.await.unwrap();
        let last = b.rec.last(5).unwrap();
        assert_eq!(
            (last.state, last.exit_code),
            (TaskState::Completed, Some(0))
        );
        assert!(last.message.unwrap().contains("1 process was OOM-killed"));
        assert!(!b.driver.exists(5), "a command's container goes");
    }

    #[tokio::test]
    async fn a_vps_stopped_while_no_runner_watched_is_stopped_not_failed() {
        // F8a: the exit arrives before anything else; the host's desired
        // state (stopped) says why it ended.
        let b = bench(FakeDriver::default());
        b.driver.insert(6, Kind::Vps, Observed::Exited(255));
        let mut a = assignment(6, Kind::Vps);
        a.state = TaskState::Running;
        let (_tx, h) = b.spawn(a, BringUp::Adopt, Desired::Stopped);
        h.await.unwrap();
        assert_eq!(b.rec.states(6), vec![TaskState::Stopped]);
        b.driver.with(6, |i| {
            assert!(i.disk);
            assert_eq!(i.snapshots, 1);
            assert!(i.signals.is_empty(), "it had ended: nothing to signal");
        });
    }

    #[tokio::test]
    async fn a_task_created_but_never_started_is_started_once_on_adoption() {
        let b = bench(FakeDriver::default());
        b.driver.insert(7, Kind::Command, Observed::Created);
        let (_tx, h) = b.spawn(
            assignment(7, Kind::Command),
            BringUp::Adopt,
            Desired::Running,
        );
        b.until_reported(7, TaskState::Running).await;
        assert_eq!(b.driver.with(7, |i| i.observed), Observed::Running);
        b.driver.exit(7, 0);
        h.await.unwrap();
        assert_eq!(
            b.rec.states(7),
            vec![TaskState::Running, TaskState::Completed]
        );
    }

    #[tokio::test]
    async fn a_created_task_whose_end_was_asked_is_never_started() {
        let b = bench(FakeDriver::default());
        b.driver.insert(9, Kind::Command, Observed::Created);
        let (_tx, h) = b.spawn(
            assignment(9, Kind::Command),
            BringUp::Adopt,
            Desired::Killed,
        );
        h.await.unwrap();
        assert_eq!(b.rec.states(9), vec![TaskState::Killed]);
        assert!(!b.driver.exists(9), "removed without running");
        // A VPS asked to stop keeps its disk, unstarted.
        b.driver.insert(10, Kind::Vps, Observed::Created);
        let (_tx, h) = b.spawn(assignment(10, Kind::Vps), BringUp::Adopt, Desired::Stopped);
        h.await.unwrap();
        assert_eq!(b.rec.states(10), vec![TaskState::Stopped]);
        b.driver.with(10, |i| {
            assert!(i.disk);
            assert_ne!(i.observed, Observed::Running);
        });
    }

    #[tokio::test]
    async fn a_failed_restart_of_a_vps_leaves_it_stopped_with_its_disk() {
        let b = bench(FakeDriver::default());
        b.driver.insert(8, Kind::Vps, Observed::Kept);
        *b.driver.fail_start.lock().unwrap() = Some("no such image".into());
        let (_tx, h) = b.spawn(assignment(8, Kind::Vps), BringUp::Start, Desired::Running);
        h.await.unwrap();
        let last = b.rec.last(8).unwrap();
        assert_eq!(last.state, TaskState::Stopped);
        assert!(last.message.unwrap().contains("no such image"));
        assert!(b.driver.exists(8));
    }

    #[tokio::test]
    async fn a_failed_first_start_fails_and_leaves_nothing() {
        let b = bench(FakeDriver::default());
        *b.driver.fail_start.lock().unwrap() = Some("no such image".into());
        let (_tx, h) = b.spawn(
            assignment(9, Kind::Command),
            BringUp::Create,
            Desired::Running,
        );
        h.await.unwrap();
        assert_eq!(b.rec.states(9), vec![TaskState::Failed]);
        assert!(!b.driver.exists(9));
    }

    #[tokio::test]
    async fn pause_and_resume_are_carried_out_and_reported() {
        let b = bench(FakeDriver::obedient());
        let (tx, h) = b.spawn(
            assignment(10, Kind::Command),
            BringUp::Create,
            Desired::Running,
        );
        b.until_reported(10, TaskState::Running).await;
        tx.send(Desired::Paused).unwrap();
        b.until_reported(10, TaskState::Paused).await;
        assert_eq!(b.driver.with(10, |i| i.observed), Observed::Paused);
        tx.send(Desired::Running).unwrap();
        loop {
            let n = b.rec.notify.notified();
            if b.rec.states(10).len() == 3 {
                break;
            }
            n.await;
        }
        tx.send(Desired::Killed).unwrap();
        h.await.unwrap();
        assert_eq!(
            b.rec.states(10),
            vec![
                TaskState::Running,
                TaskState::Paused,
                TaskState::Running,
                TaskState::Killed
            ]
        );
        assert!(!b.driver.exists(10));
    }
}

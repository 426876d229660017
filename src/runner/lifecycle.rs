//! The instance lifecycle's decisions, as pure functions: what to do with
//! an instance the runner does not supervise yet (`plan`), and how an
//! instance that ended is reported and what of it is kept (`classify`).
//! The supervisor and the reconcile loop only carry these decisions out.
//!
//! The rules that keep work safe across crashes live here:
//! - A VPS's disk is removed only by a delete, never because of how it ended.
//! - Why an instance was asked to end is the host's desired state, which
//!   outlives a runner crash; the runner's memory is never the only record.
//! - Work the host never saw running is created after a crash; work it saw
//!   running is never run a second time.

use crate::api::{Desired, Kind, TaskState};

/// What containerd (or libvirt) holds for one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Observed {
    /// No container: never created, or removed.
    Absent,
    /// A container (its disk) with no task: stopped, or never started.
    Kept,
    /// A task that was created but never started (a crash between the two).
    Created,
    Running,
    Paused,
    /// A task whose main process has exited with this status.
    Exited(u32),
}

impl Observed {
    /// A task exists: something to supervise.
    pub fn has_task(self) -> bool {
        matches!(
            self,
            Observed::Created | Observed::Running | Observed::Paused | Observed::Exited(_)
        )
    }
}

/// What the host asks of an instance, from its assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub kind: Kind,
    pub desired: Desired,
    /// The host's record of it.
    pub state: TaskState,
    /// The host heard it running at least once.
    pub started: bool,
    /// `restart --from-snapshot` asks for a disk this container was not made from.
    pub restore_pending: bool,
}

/// What to do about an instance that has no supervisor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Make the instance from its image (or snapshot) and start it.
    Create,
    /// Start a new task on the kept container and disk.
    Start,
    /// Watch the existing task (starting it if it was only created).
    Supervise,
    /// Finish a stop that a crash interrupted after the task was gone:
    /// report the instance `state` (with the snapshot on stop, if `snapshot`).
    FinishStop {
        state: TaskState,
        snapshot: bool,
    },
    /// Remove the instance, its disk and its snapshots; report it deleted.
    Delete,
    /// Report an end that happened without a supervisor (or before one);
    /// `discard` removes what is left of a command's container once the
    /// host has that report.
    End {
        state: TaskState,
        message: String,
        discard: bool,
    },
    /// Remove a command's leftover container that no assignment names.
    Discard,
    /// Stop a VPS that no assignment names, keeping its disk.
    StopUnassigned,
}

/// Decides what to do with instance `observed`, given what the host wants
/// (`None`: not assigned here). Called only when no supervisor runs it.
pub fn plan(wanted: Option<&Wanted>, observed: Observed, kind_found: Option<Kind>) -> Action {
    let Some(w) = wanted else {
        return match (kind_found, observed) {
            (_, Observed::Absent) => Action::Nothing,
            // Command containers are disposable once the host has their end.
            (Some(Kind::Command), _) => Action::Discard,
            // A VPS container is a disk: it stays until a delete names it.
            // One of unknown kind (an older runner made it) is kept too.
            (_, o) if o.has_task() && !matches!(o, Observed::Exited(_)) => Action::StopUnassigned,
            _ => Action::Nothing,
        };
    };
    let vps = w.kind == Kind::Vps;
    if w.desired == Desired::Deleted {
        return if observed.has_task() && !matches!(observed, Observed::Exited(_)) {
            // The supervisor stops it first, then removes it.
            Action::Supervise
        } else {
            Action::Delete
        };
    }
    if w.state.is_final() {
        // Ended, and not to be deleted: nothing runs, the disk stays.
        return Action::Nothing;
    }
    if w.state == TaskState::Stopped {
        return if observed.has_task() && !matches!(observed, Observed::Exited(_)) {
            // A task that should not run (a crash between start and report of a stop).
            Action::Supervise
        } else {
            Action::Nothing
        };
    }
    // The host has it assigning, running, paused or lost.
    let ending = matches!(
        w.desired,
        Desired::Stopped | Desired::Restarting | Desired::Killed
    );
    match observed {
        _ if w.restore_pending && !ending && !observed.has_task() => Action::Create,
        o if o.has_task() => Action::Supervise,
        Observed::Kept if ending => match w.desired {
            // The task went but the host never heard: the stop is finished now.
            Desired::Killed if !vps => Action::End {
                state: TaskState::Killed,
                message: "killed".into(),
                discard: true,
            },
            Desired::Killed => Action::FinishStop {
                state: TaskState::Killed,
                snapshot: false,
            },
            _ => Action::FinishStop {
                state: TaskState::Stopped,
                snapshot: true,
            },
        },
        Observed::Absent if ending => match w.desired {
            Desired::Killed => Action::End {
                state: TaskState::Killed,
                message: "killed before it started".into(),
                discard: false,
            },
            // Nothing was made yet: stopped, with nothing to keep.
            _ => Action::FinishStop {
                state: TaskState::Stopped,
                snapshot: false,
            },
        },
        // A VPS's container is its disk: start it again (a restart, or a
        // node that rebooted under it).
        Observed::Kept if vps => Action::Start,
        // A command whose container was made but whose task never started.
        Observed::Kept if !w.started => Action::Start,
        Observed::Kept => Action::End {
            state: TaskState::Failed,
            message: "its task vanished from the node (did the node restart?); it is not run twice"
                .into(),
            discard: true,
        },
        Observed::Absent if !w.started => Action::Create,
        Observed::Absent if vps => Action::End {
            state: TaskState::Failed,
            message: "its container and disk vanished from the node".into(),
            discard: false,
        },
        Observed::Absent => Action::End {
            state: TaskState::Failed,
            message: "the container vanished from the node".into(),
            discard: false,
        },
        // Unreachable: every task-holding observation matched above.
        _ => Action::Supervise,
    }
}

/// Why an instance was asked to end: the host's desired state when it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asked {
    Nothing,
    /// Stop (or the stop half of a restart): keep the disk, snapshot it.
    Stop,
    /// Kill: a command ends; a VPS stops hard and keeps its disk.
    Kill,
    /// Delete: remove the disk and snapshots.
    Delete,
}

impl Asked {
    pub fn from_desired(d: Desired) -> Asked {
        match d {
            Desired::Running | Desired::Paused => Asked::Nothing,
            Desired::Stopped | Desired::Restarting => Asked::Stop,
            Desired::Killed => Asked::Kill,
            Desired::Deleted => Asked::Delete,
        }
    }
}

/// What is known when an instance's main process has ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitFacts {
    pub kind: Kind,
    /// The main process's exit status (128 + signal when a signal killed
    /// it); `None` when the runner lost track of it.
    pub exit: Option<u32>,
    pub asked: Asked,
    /// The cgroup's OOM-kill counter when the task started (0 if unknown).
    pub oom_at_start: u64,
    /// The counter at exit.
    pub oom_at_exit: u64,
}

/// How an instance ended and what of it stays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub state: TaskState,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
    /// The container and disk stay (every VPS end but a delete).
    pub keep_disk: bool,
    /// Take the snapshot on stop (when the runner is configured to).
    pub snapshot: bool,
}

const SIGKILL_EXIT: u32 = 128 + 9;

/// Classifies an ended instance. OOM kills of other processes are a note,
/// never the verdict: `killed_oom` only when the main process died of
/// SIGKILL while the OOM counter rose and nobody asked it to end.
pub fn classify(f: &ExitFacts) -> Outcome {
    let vps = f.kind == Kind::Vps;
    let oom = f.oom_at_exit.saturating_sub(f.oom_at_start);
    let code = f.exit.map(|c| c as i32);
    let note = (oom > 0).then(|| {
        format!(
            "{oom} process{} OOM-killed at the memory limit",
            if oom == 1 { " was" } else { "es were" }
        )
    });
    let with_note = |m: Option<String>| match (m, note.clone()) {
        (Some(m), Some(n)) => Some(format!("{m}; {n}")),
        (m, n) => m.or(n),
    };
    let outcome = |state, message, keep_disk, snapshot| Outcome {
        state,
        exit_code: code,
        message,
        keep_disk,
        snapshot,
    };
    match f.asked {
        Asked::Delete => outcome(TaskState::Deleted, None, false, false),
        Asked::Stop => outcome(TaskState::Stopped, with_note(None), true, true),
        Asked::Kill => outcome(TaskState::Killed, with_note(None), vps, false),
        Asked::Nothing => {
            let kept = vps.then_some("its disk is kept: `vps restart` starts it again");
            let join = |m: String| match kept {
                Some(k) => format!("{m} ({k})"),
                None => m,
            };
            match f.exit {
                None => outcome(
                    TaskState::Failed,
                    Some(join("lost track of its main process".into())),
                    vps,
                    false,
                ),
                Some(SIGKILL_EXIT) if oom > 0 => outcome(
                    TaskState::KilledOom,
                    Some(join(
                        "killed by the kernel's OOM killer at the memory limit".into(),
                    )),
                    vps,
                    false,
                ),
                Some(0) if !vps => outcome(TaskState::Completed, note.clone(), false, false),
                Some(c) => {
                    let what = if vps {
                        // The SSH server, or a --no-ssh VPS's own command.
                        format!("its main process exited with code {c}")
                    } else {
                        format!("exited with code {c}")
                    };
                    let state = if c == 0 {
                        TaskState::Completed
                    } else {
                        TaskState::Failed
                    };
                    outcome(state, with_note(Some(join(what))), vps, false)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Kind::{Command, Vps};

    fn facts(kind: Kind, exit: Option<u32>, asked: Asked, oom: (u64, u64)) -> ExitFacts {
        ExitFacts {
            kind,
            exit,
            asked,
            oom_at_start: oom.0,
            oom_at_exit: oom.1,
        }
    }

    #[test]
    fn every_way_an_instance_ends() {
        use TaskState::*;
        // (case, facts, state, exit code, keeps disk, snapshot, message contains)
        // (case, facts, state, exit code, keeps disk, snapshot, message contains)
        type Row = (
            &'static str,
            ExitFacts,
            TaskState,
            Option<i32>,
            bool,
            bool,
            &'static str,
        );
        let rows: Vec<Row> = vec![
            (
                "command exits 0",
                facts(Command, Some(0), Asked::Nothing, (0, 0)),
                Completed,
                Some(0),
                false,
                false,
                "",
            ),
            (
                "command exits 3",
                facts(Command, Some(3), Asked::Nothing, (0, 0)),
                Failed,
                Some(3),
                false,
                false,
                "exited with code 3",
            ),
            (
                "defect 2: a child OOM-killed, main exits 0",
                facts(Command, Some(0), Asked::Nothing, (0, 2)),
                Completed,
                Some(0),
                false,
                false,
                "2 processes were OOM-killed",
            ),
            (
                "main process OOM-killed",
                facts(Command, Some(137), Asked::Nothing, (0, 1)),
                KilledOom,
                Some(137),
                false,
                false,
                "OOM killer",
            ),
            (
                "SIGKILL from inside, no OOM",
                facts(Command, Some(137), Asked::Nothing, (0, 0)),
                Failed,
                Some(137),
                false,
                false,
                "code 137",
            ),
            (
                "an OOM kill before a restart is not this run's",
                facts(Command, Some(137), Asked::Nothing, (4, 4)),
                Failed,
                Some(137),
                false,
                false,
                "code 137",
            ),
            (
                "command killed",
                facts(Command, Some(143), Asked::Kill, (0, 0)),
                Killed,
                Some(143),
                false,
                false,
                "",
            ),
            (
                "command killed after an OOM child",
                facts(Command, Some(143), Asked::Kill, (0, 1)),
                Killed,
                Some(143),
                false,
                false,
                "1 process was OOM-killed",
            ),
            (
                "command lost track",
                facts(Command, None, Asked::Nothing, (0, 0)),
                Failed,
                None,
                false,
                false,
                "lost track",
            ),
            (
                "VPS stopped",
                facts(Vps, Some(143), Asked::Stop, (0, 0)),
                Stopped,
                Some(143),
                true,
                true,
                "",
            ),
            (
                "defect 1: VPS stopped after an OOM-killed child",
                facts(Vps, Some(143), Asked::Stop, (0, 3)),
                Stopped,
                Some(143),
                true,
                true,
                "3 processes were OOM-killed",
            ),
            (
                "VPS stopped, killed at the grace period's end",
                facts(Vps, Some(137), Asked::Stop, (0, 1)),
                Stopped,
                Some(137),
                true,
                true,
                "OOM-killed",
            ),
            (
                "F8a: stopped while the runner was down",
                facts(Vps, Some(255), Asked::Stop, (0, 0)),
                Stopped,
                Some(255),
                true,
                true,
                "",
            ),
            (
                "defect 5: VPS killed keeps its disk",
                facts(Vps, Some(137), Asked::Kill, (0, 0)),
                Killed,
                Some(137),
                true,
                false,
                "",
            ),
            (
                "VPS deleted",
                facts(Vps, Some(143), Asked::Delete, (0, 5)),
                Deleted,
                Some(143),
                false,
                false,
                "",
            ),
            (
                "F8e: VPS PID 1 exits 1",
                facts(Vps, Some(1), Asked::Nothing, (0, 0)),
                Failed,
                Some(1),
                true,
                false,
                "disk is kept",
            ),
            (
                "F8e: VPS PID 1 exits 0",
                facts(Vps, Some(0), Asked::Nothing, (0, 0)),
                Completed,
                Some(0),
                true,
                false,
                "disk is kept",
            ),
            (
                "F8e: VPS PID 1 OOM-killed",
                facts(Vps, Some(137), Asked::Nothing, (0, 1)),
                KilledOom,
                Some(137),
                true,
                false,
                "disk is kept",
            ),
            (
                "VPS lost track",
                facts(Vps, None, Asked::Nothing, (0, 0)),
                Failed,
                None,
                true,
                false,
                "disk is kept",
            ),
        ];
        for (case, f, state, code, keep, snap, msg) in rows {
            let o = classify(&f);
            assert_eq!(o.state, state, "{case}");
            assert_eq!(o.exit_code, code, "{case}");
            assert_eq!(o.keep_disk, keep, "{case}: keep disk");
            assert_eq!(o.snapshot, snap, "{case}: snapshot");
            let m = o.message.unwrap_or_default();
            assert!(m.contains(msg), "{case}: {m:?} lacks {msg:?}");
            if msg.is_empty() {
                assert!(m.is_empty(), "{case}: unexpected message {m:?}");
            }
        }
    }

    fn wanted(kind: Kind, desired: Desired, state: TaskState, started: bool) -> Wanted {
        Wanted {
            kind,
            desired,
            state,
            started,
            restore_pending: false,
        }
    }

    #[test]
    fn what_to_do_with_an_unsupervised_instance() {
        use Desired as D;
        use Observed as O;
        use TaskState as S;
        let end = |state, m: &str, discard| Action::End {
            state,
            message: m.into(),
            discard,
        };
        let lost = |m: &str, discard| end(S::Failed, m, discard);
        let vanished = "the container vanished from the node";
        // (case, what the host wants, what is there, its kind label, the action)
        type Row = (&'static str, Option<Wanted>, Observed, Option<Kind>, Action);
        let rows: Vec<Row> = vec![
            (
                "new work",
                Some(wanted(Command, D::Running, S::Assigning, false)),
                O::Absent,
                None,
                Action::Create,
            ),
            (
                "defect 3: placed, marked lost in a crash, never made",
                Some(wanted(Command, D::Running, S::Lost, false)),
                O::Absent,
                None,
                Action::Create,
            ),
            (
                "defect 3: container made, task never created",
                Some(wanted(Command, D::Running, S::Assigning, false)),
                O::Kept,
                Some(Command),
                Action::Start,
            ),
            (
                "task created, never started",
                Some(wanted(Command, D::Running, S::Lost, false)),
                O::Created,
                Some(Command),
                Action::Supervise,
            ),
            (
                "a running task is adopted",
                Some(wanted(Command, D::Running, S::Running, true)),
                O::Running,
                Some(Command),
                Action::Supervise,
            ),
            (
                "it ended while the runner was down",
                Some(wanted(Command, D::Running, S::Lost, true)),
                O::Exited(0),
                Some(Command),
                Action::Supervise,
            ),
            (
                "it ran and vanished: never twice",
                Some(wanted(Command, D::Running, S::Running, true)),
                O::Absent,
                None,
                lost(vanished, false),
            ),
            (
                "the node rebooted under a command",
                Some(wanted(Command, D::Running, S::Lost, true)),
                O::Kept,
                Some(Command),
                lost(
                    "its task vanished from the node (did the node restart?); it is not run twice",
                    true,
                ),
            ),
            (
                "killed before it was made",
                Some(wanted(Command, D::Killed, S::Assigning, false)),
                O::Absent,
                None,
                end(S::Killed, "killed before it started", false),
            ),
            (
                "killed: the task went, the report did not",
                Some(wanted(Command, D::Killed, S::Running, true)),
                O::Kept,
                Some(Command),
                end(S::Killed, "killed", true),
            ),
            (
                "a new VPS",
                Some(wanted(Vps, D::Running, S::Assigning, false)),
                O::Absent,
                None,
                Action::Create,
            ),
            (
                "a restarted VPS",
                Some(wanted(Vps, D::Running, S::Assigning, true)),
                O::Kept,
                Some(Vps),
                Action::Start,
            ),
            (
                "F8c: the node rebooted under a VPS",
                Some(wanted(Vps, D::Running, S::Lost, true)),
                O::Kept,
                Some(Vps),
                Action::Start,
            ),
            (
                "a VPS whose disk vanished",
                Some(wanted(Vps, D::Running, S::Running, true)),
                O::Absent,
                None,
                lost("its container and disk vanished from the node", false),
            ),
            (
                "F8b: a crash during the snapshot on stop",
                Some(wanted(Vps, D::Stopped, S::Running, true)),
                O::Kept,
                Some(Vps),
                Action::FinishStop {
                    state: S::Stopped,
                    snapshot: true,
                },
            ),
            (
                "a crash during a restart's stop",
                Some(wanted(Vps, D::Restarting, S::Lost, true)),
                O::Kept,
                Some(Vps),
                Action::FinishStop {
                    state: S::Stopped,
                    snapshot: true,
                },
            ),
            (
                "F8a: stopped while the runner was down",
                Some(wanted(Vps, D::Stopped, S::Running, true)),
                O::Exited(143),
                Some(Vps),
                Action::Supervise,
            ),
            (
                "a VPS kill, the report lost",
                Some(wanted(Vps, D::Killed, S::Running, true)),
                O::Kept,
                Some(Vps),
                Action::FinishStop {
                    state: S::Killed,
                    snapshot: false,
                },
            ),
            (
                "a stopped VPS waits",
                Some(wanted(Vps, D::Stopped, S::Stopped, true)),
                O::Kept,
                Some(Vps),
                Action::Nothing,
            ),
            (
                "a killed VPS is not assigned: its disk stays",
                None,
                O::Kept,
                Some(Vps),
                Action::Nothing,
            ),
            (
                "a VPS of unknown kind stays",
                None,
                O::Kept,
                None,
                Action::Nothing,
            ),
            (
                "delete of a stopped VPS",
                Some(wanted(Vps, D::Deleted, S::Stopped, true)),
                O::Kept,
                Some(Vps),
                Action::Delete,
            ),
            (
                "delete of a killed VPS",
                Some(wanted(Vps, D::Deleted, S::Killed, true)),
                O::Kept,
                Some(Vps),
                Action::Delete,
            ),
            (
                "delete of a running VPS stops it first",
                Some(wanted(Vps, D::Deleted, S::Running, true)),
                O::Running,
                Some(Vps),
                Action::Supervise,
            ),
            (
                "a crash in the middle of a delete",
                Some(wanted(Vps, D::Deleted, S::Running, true)),
                O::Absent,
                None,
                Action::Delete,
            ),
            (
                "a command's leftover container",
                None,
                O::Exited(0),
                Some(Command),
                Action::Discard,
            ),
            (
                "an unassigned running VPS stops, disk kept",
                None,
                O::Running,
                Some(Vps),
                Action::StopUnassigned,
            ),
            (
                "nothing there, nothing assigned",
                None,
                O::Absent,
                None,
                Action::Nothing,
            ),
        ];
        for (case, w, o, k, want) in rows {
            assert_eq!(plan(w.as_ref(), o, k), want, "{case}");
        }
        let mut restore = wanted(Vps, D::Running, S::Assigning, true);
        restore.restore_pending = true;
        assert_eq!(
            plan(Some(&restore), O::Kept, Some(Vps)),
            Action::Create,
            "a restore makes the disk anew"
        );
    }
}

//! Waiting for cgroup events without busy polling: the kernel raises a
//! "modified" inotify event on `memory.events` and `cgroup.events` when a
//! value in them changes; the watcher sleeps in poll(2) until then and
//! reports what changed.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use serde::{Deserialize, Serialize};

use super::stats::parse_flat_keyed;
use super::CgroupError;

/// Something that happened to a cgroup, with the counter's new total.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupEvent {
    /// The OOM killer killed a process of this cgroup (`oom_kill`).
    OomKill { total: u64 },
    /// The cgroup hit `memory.max` and the OOM killer was invoked (`oom`).
    Oom { total: u64 },
    /// Allocations hit `memory.max` (`max`), reclaim ran.
    MemoryMax { total: u64 },
    /// Usage went over `memory.high` (`high`), the cgroup was throttled.
    MemoryHigh { total: u64 },
    /// The cgroup gained its first or lost its last process.
    Populated(bool),
    /// Freezing or thawing finished.
    Frozen(bool),
}

pub struct EventWatcher {
    inotify: Inotify,
    dir: PathBuf,
    memory: BTreeMap<String, u64>,
    populated: bool,
    frozen: bool,
}

impl EventWatcher {
    /// Watches the cgroup at `dir`. Events are reported relative to the
    /// state at this call.
    pub fn new(dir: PathBuf) -> Result<Self, CgroupError> {
        let inotify =
            Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).map_err(|e| {
                CgroupError::Watch {
                    path: dir.clone(),
                    source: e.into(),
                }
            })?;
        for file in ["cgroup.events", "memory.events"] {
            let path = dir.join(file);
            // memory.events exists only where the memory controller is enabled.
            if file == "memory.events" && !path.exists() {
                continue;
            }
            inotify
                .add_watch(&path, AddWatchFlags::IN_MODIFY)
                .map_err(|e| CgroupError::Watch {
                    path: path.clone(),
                    source: e.into(),
                })?;
        }
        let mut w = Self {
            inotify,
            dir,
            memory: BTreeMap::new(),
            populated: false,
            frozen: false,
        };
        w.memory = w.read_memory()?;
        (w.populated, w.frozen) = w.read_state()?;
        Ok(w)
    }

    fn read_memory(&self) -> Result<BTreeMap<String, u64>, CgroupError> {
        let path = self.dir.join("memory.events");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                parse_flat_keyed(&text).map_err(|reason| CgroupError::Parse { path, reason })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.dir.exists() => {
                Ok(BTreeMap::new())
            }
            Err(source) => Err(CgroupError::Read { path, source }),
        }
    }

    fn read_state(&self) -> Result<(bool, bool), CgroupError> {
        let path = self.dir.join("cgroup.events");
        let text = std::fs::read_to_string(&path).map_err(|source| CgroupError::Read {
            path: path.clone(),
            source,
        })?;
        let m = parse_flat_keyed(&text).map_err(|reason| CgroupError::Parse { path, reason })?;
        Ok((m.get("populated") == Some(&1), m.get("frozen") == Some(&1)))
    }

    /// What changed since the last look, oldest state first.
    fn changes(&mut self) -> Result<Vec<CgroupEvent>, CgroupError> {
        let mut out = Vec::new();
        let memory = self.read_memory()?;
        for (key, make) in [
            (
                "oom_kill",
                (|t| CgroupEvent::OomKill { total: t }) as fn(u64) -> CgroupEvent,
            ),
            ("oom", |t| CgroupEvent::Oom { total: t }),
            ("max", |t| CgroupEvent::MemoryMax { total: t }),
            ("high", |t| CgroupEvent::MemoryHigh { total: t }),
        ] {
            let now = memory.get(key).copied().unwrap_or(0);
            if now > self.memory.get(key).copied().unwrap_or(0) {
                out.push(make(now));
            }
        }
        self.memory = memory;
        let (populated, frozen) = self.read_state()?;
        if populated != self.populated {
            out.push(CgroupEvent::Populated(populated));
            self.populated = populated;
        }
        if frozen != self.frozen {
            out.push(CgroupEvent::Frozen(frozen));
            self.frozen = frozen;
        }
        Ok(out)
    }

    /// Sleeps until something changes or `timeout` passes; an empty list means
    /// the timeout passed.
    pub fn wait(&mut self, timeout: Duration) -> Result<Vec<CgroupEvent>, CgroupError> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.changes()?;
            if !events.is_empty() {
                return Ok(events);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            let mut fds = [PollFd::new(self.inotify.as_fd(), PollFlags::POLLIN)];
            let t = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            match poll(&mut fds, t) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => {
                    return Err(CgroupError::Watch {
                        path: self.dir.clone(),
                        source: e.into(),
                    })
                }
            }
            // Drain; the content of the events does not matter, the files do.
            while let Ok(evs) = self.inotify.read_events() {
                if evs.is_empty() {
                    break;
                }
            }
        }
    }

    /// Waits for a specific condition, e.g. `|e| e == &CgroupEvent::Frozen(true)`.
    /// Returns every event seen; fails with `timeout` if the condition never held.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&CgroupEvent) -> bool,
    ) -> Result<Vec<CgroupEvent>, CgroupError> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let events = self.wait(left)?;
            if events.is_empty() {
                return Err(CgroupError::Timeout {
                    path: self.dir.clone(),
                    what: what.to_string(),
                    after: timeout,
                });
            }
            let hit = events.iter().any(&mut done);
            seen.extend(events);
            if hit {
                return Ok(seen);
            }
        }
    }

    pub fn populated(&self) -> bool {
        self.populated
    }

    pub fn frozen(&self) -> bool {
        self.frozen
    }
}

//! How far the making of each instance got (image pull or import), sent to
//! the host while it lasts so a waiting CLI can show it. Only the newest
//! word per instance is kept and sent, at most once per `PUMP`: progress
//! never queues up behind a slow host, and a lost one is simply replaced.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::api::host_client::HostClient;
use crate::api::TaskProgress;

/// How often what changed is sent.
pub const PUMP: Duration = Duration::from_millis(500);

/// The newest progress of each instance being made, and whether the host
/// has been sent it.
#[derive(Default)]
pub struct Board {
    entries: Mutex<HashMap<u64, (TaskProgress, bool)>>,
}

impl Board {
    /// A sink for the import or pull of instance `id`'s image `what`.
    pub fn sink(self: &Arc<Self>, id: u64, what: String) -> crate::oci::Progress {
        let board = self.clone();
        crate::oci::Progress::new(move |phase, done, total| {
            board.set(
                id,
                TaskProgress {
                    phase: phase.to_string(),
                    what: what.clone(),
                    done_bytes: done,
                    total_bytes: total,
                },
            )
        })
    }

    pub fn set(&self, id: u64, p: TaskProgress) {
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        e.insert(id, (p, false));
    }

    /// Instance `id` is made (or failed): nothing more to say of it.
    pub fn clear(&self, id: u64) {
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        e.remove(&id);
    }

    /// What the host has not been sent yet; marked sent.
    pub fn take_unsent(&self) -> Vec<(u64, TaskProgress)> {
        let mut e = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(u64, TaskProgress)> = e
            .iter_mut()
            .filter(|(_, (_, sent))| !*sent)
            .map(|(id, (p, sent))| {
                *sent = true;
                (*id, p.clone())
            })
            .collect();
        out.sort_by_key(|(id, _)| *id);
        out
    }
}

/// Clears an instance's entry when dropped: however its making ended.
pub struct ClearOnDrop<'a>(pub &'a Board, pub u64);

impl Drop for ClearOnDrop<'_> {
    fn drop(&mut self) {
        self.0.clear(self.1);
    }
}

/// Sends what changed every `PUMP` until `stop` turns true. A failed send
/// is only logged: the next change replaces it.
pub async fn pump(board: Arc<Board>, host: Arc<HostClient>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PUMP) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
        for (id, p) in board.take_unsent() {
            if let Err(e) = host.progress(id, &p).await {
                tracing::debug!(task = id, error = %crate::error_chain(&e), "progress not sent");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_unsent_word_goes_out_once() {
        let board = Arc::new(Board::default());
        let sink = board.sink(7, "env base".into());
        sink.report("importing", 1, 10);
        sink.report("importing", 5, 10);
        board.sink(3, "r:1".into()).report("pulling", 2, 4);
        let sent = board.take_unsent();
        assert_eq!(sent.len(), 2);
        assert_eq!((sent[0].0, sent[0].1.done_bytes), (3, 2));
        assert_eq!(
            sent[1],
            (
                7,
                TaskProgress {
                    phase: "importing".into(),
                    what: "env base".into(),
                    done_bytes: 5,
                    total_bytes: 10
                }
            )
        );
        assert!(board.take_unsent().is_empty(), "nothing new: nothing sent");
        sink.report("unpacking", 10, 10);
        board.clear(3);
        let sent = board.take_unsent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].1.phase, "unpacking");
        board.clear(7);
        sink.report("unpacking", 10, 10);
        board.clear(7);
        assert!(
            board.take_unsent().is_empty(),
            "a cleared instance says nothing"
        );
    }
}

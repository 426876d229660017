//! Reports to the host go through one queue: sent in the order they were
//! made, retried with backoff until the host has them (or refuses one for
//! good), so a slow or absent host never blocks the reconcile loop. A
//! supervisor that must not go on before the host knows (it is about to
//! remove what the report describes) waits for its report's delivery.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::api::host_client::{HostCallError, HostClient};
use crate::api::TaskReport;

/// Where reports go: the host, or a recorder in tests.
pub trait ReportSink: Send + Sync + 'static {
    fn send(
        &self,
        id: u64,
        report: &TaskReport,
    ) -> impl Future<Output = Result<(), HostCallError>> + Send;
}

impl ReportSink for Arc<HostClient> {
    async fn send(&self, id: u64, report: &TaskReport) -> Result<(), HostCallError> {
        self.report(id, report).await
    }
}

struct Queued {
    id: u64,
    report: TaskReport,
    delivered: Option<oneshot::Sender<()>>,
}

/// The sending end of the queue; cheap to clone.
#[derive(Clone)]
pub struct Reports {
    tx: mpsc::UnboundedSender<Queued>,
}

impl Reports {
    /// Starts the queue's worker; it ends when `stop` turns true.
    pub fn start<S: ReportSink>(sink: S, stop: watch::Receiver<bool>) -> Reports {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(deliver_all(sink, rx, stop));
        Reports { tx }
    }

    /// Queues a report and returns at once.
    pub fn push(&self, id: u64, report: TaskReport) {
        let _ = self.tx.send(Queued {
            id,
            report,
            delivered: None,
        });
    }

    /// Queues a report and waits until the host has it (or refused it for
    /// good). Returns false if the queue stopped first (the runner is
    /// stopping): the caller must then leave things as they are.
    pub async fn deliver(&self, id: u64, report: TaskReport) -> bool {
        let (done, wait) = oneshot::channel();
        let queued = Queued {
            id,
            report,
            delivered: Some(done),
        };
        if self.tx.send(queued).is_err() {
            return false;
        }
        wait.await.is_ok()
    }
}

async fn deliver_all<S: ReportSink>(
    sink: S,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let q = tokio::select! {
            q = rx.recv() => match q { Some(q) => q, None => return },
            _ = stop.wait_for(|s| *s) => return,
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            match sink.send(q.id, &q.report).await {
                Ok(()) => break,
                Err(e) if e.is_refusal() => {
                    tracing::warn!(task = q.id, state = %q.report.state, error = %crate::error_chain(&e), "the host refused a report");
                    break;
                }
                Err(e) => {
                    tracing::warn!(task = q.id, state = %q.report.state, error = %crate::error_chain(&e), retry_in = ?backoff, "report not delivered; retrying");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                // Undelivered: its sender sees the queue gone and leaves things be.
                _ = stop.wait_for(|s| *s) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        if let Some(d) = q.delivered {
            let _ = d.send(());
        }
    }
}

#[cfg(test)]
pub mod recorder {
    //! A sink that records reports, and fails the first `fail_first` sends.

    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    pub struct Recorder {
        pub got: Mutex<Vec<(u64, TaskReport)>>,
        pub fail_first: AtomicU32,
        pub notify: tokio::sync::Notify,
    }

    impl Recorder {
        pub fn states(&self, id: u64) -> Vec<crate::api::TaskState> {
            self.got
                .lock()
                .unwrap()
                .iter()
                .filter(|(i, _)| *i == id)
                .map(|(_, r)| r.state)
                .collect()
        }

        pub fn last(&self, id: u64) -> Option<TaskReport> {
            self.got
                .lock()
                .unwrap()
                .iter()
                .rev()
                .find(|(i, _)| *i == id)
                .map(|(_, r)| r.clone())
        }
    }

    impl ReportSink for Arc<Recorder> {
        async fn send(&self, id: u64, report: &TaskReport) -> Result<(), HostCallError> {
            if self
                .fail_first
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(HostCallError::Failed {
                    status: reqwest::StatusCode::SERVICE_UNAVAILABLE,
                    message: "scripted".into(),
                });
            }
            self.got.lock().unwrap().push((id, report.clone()));
            self.notify.notify_waiters();
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::recorder::Recorder;
    use super::*;
    use crate::api::TaskState;

    fn r(state: TaskState) -> TaskReport {
        TaskReport {
            state,
            exit_code: None,
            message: None,
            ssh_host_key: None,
            parked: None,
        }
    }

    #[tokio::test]
    async fn reports_arrive_in_order_after_failures_and_delivery_is_awaited() {
        let rec = Arc::new(Recorder::default());
        rec.fail_first.store(3, std::sync::atomic::Ordering::SeqCst);
        let (_stop_tx, stop) = watch::channel(false);
        let q = Reports::start(rec.clone(), stop);
        q.push(1, r(TaskState::Running));
        q.push(2, r(TaskState::Running));
        assert!(q.deliver(1, r(TaskState::Completed)).await);
        assert_eq!(
            rec.states(1),
            vec![TaskState::Running, TaskState::Completed]
        );
        assert_eq!(rec.states(2), vec![TaskState::Running]);
        let order: Vec<u64> = rec.got.lock().unwrap().iter().map(|(i, _)| *i).collect();
        assert_eq!(order, vec![1, 2, 1]);
    }

    #[tokio::test]
    async fn a_stopped_queue_says_it_did_not_deliver() {
        let rec = Arc::new(Recorder::default());
        rec.fail_first
            .store(u32::MAX, std::sync::atomic::Ordering::SeqCst);
        let (stop_tx, stop) = watch::channel(false);
        let q = Reports::start(rec.clone(), stop);
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.deliver(7, r(TaskState::Stopped)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop_tx.send(true).unwrap();
        assert!(!waiting.await.unwrap(), "undelivered, and said so");
        assert!(rec.states(7).is_empty());
    }
}

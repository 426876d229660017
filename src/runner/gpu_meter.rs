//! The node's GPU readings for each heartbeat, from NVML (`nvml_library`).
//! NVML is opened once and kept; a node without it sends no readings (and
//! looks for it again only every minute). A reading runs off the async
//! workers with a deadline: a GPU whose driver hangs delays no heartbeat
//! (that beat goes without readings). The latest readings are kept for
//! the runner's `/metrics`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::topology::nvml::{GpuSample, Nvml, NvmlError};
use crate::topology::Gpu;

/// How long one reading may take.
const DEADLINE: Duration = Duration::from_secs(2);
/// How long a node without NVML waits before looking for it again.
const LOOK_AGAIN: Duration = Duration::from_secs(60);

pub struct GpuMeter {
    library: PathBuf,
    nvml: Arc<Mutex<Option<Nvml>>>,
    /// NVML was not there: not before this instant again.
    absent_until: Mutex<Option<Instant>>,
    /// The last failure logged, so each kind is logged once.
    said: Mutex<Option<String>>,
    /// The latest readings, for `/metrics`.
    pub latest: Arc<Mutex<Vec<GpuSample>>>,
}

impl GpuMeter {
    /// A meter of the NVML at `library` that keeps its latest readings in `latest`.
    pub fn new(library: PathBuf, latest: Arc<Mutex<Vec<GpuSample>>>) -> GpuMeter {
        GpuMeter {
            library,
            nvml: Arc::new(Mutex::new(None)),
            absent_until: Mutex::new(None),
            said: Mutex::new(None),
            latest,
        }
    }

    /// Readings of the node's GPUs (those in `gpus`), none without NVML.
    pub async fn sample(&self, gpus: &[Gpu]) -> Vec<GpuSample> {
        let samples = self.read(gpus).await;
        *lock(&self.latest) = samples.clone();
        samples
    }

    async fn read(&self, gpus: &[Gpu]) -> Vec<GpuSample> {
        if gpus.is_empty() || lock(&self.absent_until).is_some_and(|t| Instant::now() < t) {
            return vec![];
        }
        let (nvml, library) = (self.nvml.clone(), self.library.clone());
        let read = tokio::task::spawn_blocking(move || {
            // A reading still hanging from an earlier beat holds the lock: skip this one.
            let Ok(mut guard) = nvml.try_lock() else {
                return Ok(vec![]);
            };
            if guard.is_none() {
                *guard = Some(Nvml::open(&library)?);
            }
            let result = guard.as_ref().map_or(Ok(vec![]), Nvml::sample);
            if result.is_err() {
                // NVML itself failed (a driver reload invalidates its
                // handles): it is opened again next beat.
                *guard = None;
            }
            result
        });
        let samples = match tokio::time::timeout(DEADLINE, read).await {
            Ok(Ok(Ok(s))) => s,
            Ok(Ok(Err(NvmlError::NotInstalled(_)))) => {
                *lock(&self.absent_until) = Some(Instant::now() + LOOK_AGAIN);
                vec![]
            }
            Ok(Ok(Err(e))) => {
                self.say(format!("NVML readings failed: {e}"));
                vec![]
            }
            Ok(Err(e)) => {
                self.say(format!("NVML readings failed: {e}"));
                vec![]
            }
            Err(_) => {
                self.say(format!(
                    "NVML took over {DEADLINE:?} to answer; this beat has no GPU readings"
                ));
                vec![]
            }
        };
        samples
            .into_iter()
            .filter(|s| gpus.iter().any(|g| g.address == s.address))
            .collect()
    }

    fn say(&self, what: String) {
        let mut said = lock(&self.said);
        if said.as_deref() != Some(what.as_str()) {
            tracing::warn!("{what}");
            *said = Some(what);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

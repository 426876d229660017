//! containerd, spoken to directly over its gRPC socket: environments
//! imported from OCI or docker archives into the content store and unpacked
//! into snapshots client-side (works on containerd 1.6 as on 1.7/2.x, which
//! would also offer a server-side Transfer service), the OCI runtime spec
//! built as a typed value, containers and tasks with file-backed logs, OOM
//! events, pause/resume, kill and cleanup, registry pulls, and commits of
//! a container's changes as images (VPS snapshots), and CDI device edits (`cdi`).

mod blobs;
pub mod cdi;
mod commit;
pub mod exec;
mod import;
mod registry;
pub mod rootfs;
pub mod seccomp;
mod spec;
mod task;
pub mod user;

use std::path::{Path, PathBuf};

use containerd_client::tonic;
use tonic::transport::Channel;

pub use blobs::{BlobRef, ImageBlobs};
pub use commit::{Committed, BASE_MANIFEST_LABEL, COMMIT_SIZE_LABEL};
pub use import::{
    chain_ids, check_archive, is_index, pick_manifest, Desc, ImageConfig, ImportedImage, Index,
    Manifest,
};
pub use registry::Reference;
pub use spec::{
    build as build_spec, capability_bound, remove_env, set_env, MountInput, RuntimeSpecInput,
};
pub use task::{oom_kills, TaskStatus, TASK_LABEL};

/// Where an import or a pull says how far it got: `(phase, done, total)`
/// in bytes, phase `pulling` (download), `importing` (archive blobs into the
/// content store), `storing` (downloaded blobs into it) or `unpacking`. Called often; the receiver throttles.
#[derive(Clone, Default)]
pub struct Progress(Option<std::sync::Arc<ProgressFn>>);

type ProgressFn = dyn Fn(&'static str, u64, u64) + Send + Sync;

impl Progress {
    pub fn new(f: impl Fn(&'static str, u64, u64) + Send + Sync + 'static) -> Self {
        Progress(Some(std::sync::Arc::new(f)))
    }

    /// Reports nowhere.
    pub fn none() -> Self {
        Progress(None)
    }

    pub fn report(&self, phase: &'static str, done: u64, total: u64) {
        if let Some(f) = &self.0 {
            f(phase, done, total)
        }
    }
}

/// containerd namespace of everything rivernode creates.
pub const NAMESPACE: &str = "rivernode";

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("cannot connect to containerd at {socket}: {message}; is containerd running? (runner setting containerd_socket)")]
    Connect { socket: PathBuf, message: String },
    #[error("containerd {what}: {status}")]
    Rpc {
        what: String,
        status: Box<tonic::Status>,
    },
    #[error("archive {path}: {message}")]
    Archive { path: PathBuf, message: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("image {name}: {message}")]
    Image { name: String, message: String },
    #[error("runtime spec: {0}")]
    Spec(String),
}

impl OciError {
    pub(crate) fn rpc(what: impl Into<String>) -> impl FnOnce(tonic::Status) -> OciError {
        let what = what.into();
        move |status| OciError::Rpc {
            what,
            status: Box::new(status),
        }
    }

    /// True for containerd's NotFound answers.
    pub fn is_not_found(&self) -> bool {
        matches!(self, OciError::Rpc { status, .. } if status.code() == tonic::Code::NotFound)
    }
}

/// A connection to containerd, scoped to the rivernode namespace.
#[derive(Clone)]
pub struct Containerd {
    channel: Channel,
    namespace: String,
    snapshotter: String,
}

impl Containerd {
    pub async fn connect(socket: &Path, snapshotter: &str) -> Result<Self, OciError> {
        let channel = containerd_client::connect(socket)
            .await
            .map_err(|e| OciError::Connect {
                socket: socket.to_path_buf(),
                message: e.to_string(),
            })?;
        let c = Self {
            channel,
            namespace: NAMESPACE.to_string(),
            snapshotter: snapshotter.to_string(),
        };
        // The channel connects lazily on some paths: prove the socket answers.
        c.version().await.map_err(|e| OciError::Connect {
            socket: socket.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(c)
    }

    pub fn snapshotter(&self) -> &str {
        &self.snapshotter
    }

    /// A request in our namespace (and lease, when given).
    pub(crate) fn req<T>(&self, msg: T, lease: Option<&str>) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        let md = r.metadata_mut();
        if let Ok(v) = self.namespace.parse() {
            md.insert("containerd-namespace", v);
        }
        if let Some(l) = lease.and_then(|l| l.parse().ok()) {
            md.insert("containerd-lease", l);
        }
        r
    }

    pub(crate) fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub async fn version(&self) -> Result<String, OciError> {
        use containerd_client::services::v1::version_client::VersionClient;
        let v = VersionClient::new(self.channel())
            .version(tonic::Request::new(()))
            .await
            .map_err(OciError::rpc("version"))?
            .into_inner();
        Ok(v.version)
    }
}

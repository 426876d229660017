//! Containers and their tasks: create from an unpacked image with our
//! runtime spec, start with stdout/stderr written by the shim straight to
//! files (so logs survive a runner restart), wait, pause, resume, kill,
//! and clean up container, task and snapshot.

use std::collections::HashMap;
use std::path::Path;

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::snapshots::{
    snapshots_client::SnapshotsClient, PrepareSnapshotRequest,
};
use containerd_client::services::v1::{
    containers_client::ContainersClient, tasks_client::TasksClient, Container,
    CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest, DeleteTaskRequest,
    GetRequest, KillRequest, ListContainersRequest, PauseTaskRequest, ResumeTaskRequest,
    StartRequest, WaitRequest,
};
use containerd_client::tonic;
use containerd_client::types::v1::Status;
use oci_spec::runtime::Spec;

use super::import::ImportedImage;
use super::{spec, Containerd, OciError};

/// Label holding the rivernode task id of a container.
pub const TASK_LABEL: &str = "io.rivernode.task";
const RUNTIME: &str = "io.containerd.runc.v2";

/// What containerd says a container's task is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskStatus {
    /// No task (never started, or deleted).
    Absent,
    Created,
    Running,
    Paused,
    Stopped {
        exit_code: u32,
    },
}

impl Containerd {
    /// Creates the container: its snapshot on top of `image` and its record
    /// with our spec. No task yet: `start_existing` starts one.
    pub async fn create_container(
        &self,
        id: &str,
        labels: HashMap<String, String>,
        image: &ImportedImage,
        spec: &Spec,
    ) -> Result<(), OciError> {
        // The container keeps its image's manifest alive (for commits).
        let mut labels = labels;
        labels.insert(
            super::BASE_MANIFEST_LABEL.to_string(),
            image.manifest.clone(),
        );
        // A snapshot left by a crash before its container record existed
        // would make `prepare` fail: no container owns it, so it goes.
        if !self.container_exists(id).await? {
            self.remove_snapshot(id).await;
        }
        // Until the container record exists nothing references its new
        // snapshot, and containerd's GC would collect it: hold a lease.
        let lease = self.create_lease().await?;
        let prepared = SnapshotsClient::new(self.channel())
            .prepare(self.req(
                PrepareSnapshotRequest {
                    snapshotter: self.snapshotter().into(),
                    key: id.into(),
                    parent: image.top_chain.clone(),
                    labels: HashMap::new(),
                },
                Some(&lease),
            ))
            .await
            .map_err(OciError::rpc(format!("prepare rootfs of {id}")));
        let result = match prepared {
            Ok(_) => ContainersClient::new(self.channel())
                .create(self.req(
                    CreateContainerRequest {
                        container: Some(Container {
                            id: id.into(),
                            labels,
                            image: image.name.clone(),
                            runtime: Some(Runtime {
                                name: RUNTIME.into(),
                                options: None,
                            }),
                            spec: Some(spec::to_any(spec)?),
                            snapshotter: self.snapshotter().into(),
                            snapshot_key: id.into(),
                            created_at: None,
                            updated_at: None,
                            extensions: HashMap::new(),
                            sandbox: String::new(),
                        }),
                    },
                    Some(&lease),
                ))
                .await
                .map(|_| ())
                .map_err(OciError::rpc(format!("create container {id}"))),
            Err(e) => Err(e),
        };
        self.delete_lease(&lease).await;
        if result.is_err() {
            self.cleanup(id).await;
        }
        result
    }

    /// Creates the container and starts its task with stdio going to the
    /// given shim URIs (`file:///path` puts both streams in that one file;
    /// `binary://` runs a log driver). On failure nothing is left.
    pub async fn run_container(
        &self,
        id: &str,
        labels: HashMap<String, String>,
        image: &ImportedImage,
        spec: &Spec,
        stdout: &str,
        stderr: &str,
    ) -> Result<u32, OciError> {
        self.create_container(id, labels, image, spec).await?;
        let started = self.start_existing(id, stdout, stderr).await;
        if started.is_err() {
            self.cleanup(id).await;
        }
        started
    }

    /// Creates and starts the container's task with stdio going to shim URIs
    /// (file://, binary://) that the shim opens itself, so logs keep flowing
    /// while the runner restarts.
    async fn start_task(
        &self,
        id: &str,
        rootfs: Vec<containerd_client::types::Mount>,
        stdout: &str,
        stderr: &str,
    ) -> Result<u32, OciError> {
        let mut tasks = TasksClient::new(self.channel());
        let created = tasks
            .create(self.req(
                CreateTaskRequest {
                    container_id: id.into(),
                    rootfs,
                    stdin: String::new(),
                    stdout: stdout.to_string(),
                    stderr: stderr.to_string(),
                    terminal: false,
                    checkpoint: None,
                    options: None,
                    runtime_path: String::new(),
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("create task {id}")))?
            .into_inner();
        tasks
            .start(self.req(
                StartRequest {
                    container_id: id.into(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("start task {id}")))?;
        Ok(created.pid)
    }

    /// Starts a task that was created but never started.
    pub async fn start_created(&self, id: &str) -> Result<(), OciError> {
        TasksClient::new(self.channel())
            .start(self.req(
                StartRequest {
                    container_id: id.into(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("start task {id}")))?;
        Ok(())
    }

    /// Starts a new task in a container that exists (a new one, or a
    /// stopped VPS), on its snapshot and stored spec.
    pub async fn start_existing(
        &self,
        id: &str,
        stdout: &str,
        stderr: &str,
    ) -> Result<u32, OciError> {
        use containerd_client::services::v1::snapshots::MountsRequest;
        let rootfs = SnapshotsClient::new(self.channel())
            .mounts(self.req(
                MountsRequest {
                    snapshotter: self.snapshotter().into(),
                    key: id.into(),
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("rootfs of {id}")))?
            .into_inner()
            .mounts;
        // The previous task, if its deletion was interrupted.
        let _ = TasksClient::new(self.channel())
            .delete(self.req(
                DeleteTaskRequest {
                    container_id: id.into(),
                },
                None,
            ))
            .await;
        self.start_task(id, rootfs, stdout, stderr).await
    }

    /// Whether the container record exists.
    /// Sets one label of container `id`.
    pub async fn set_label(&self, id: &str, key: &str, value: &str) -> Result<(), OciError> {
        use containerd_client::services::v1::UpdateContainerRequest;
        ContainersClient::new(self.channel())
            .update(self.req(
                UpdateContainerRequest {
                    container: Some(Container {
                        id: id.into(),
                        labels: HashMap::from([(key.to_string(), value.to_string())]),
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec![format!("labels.{key}")],
                    }),
                },
                None,
            ))
            .await
            .map(|_| ())
            .map_err(OciError::rpc(format!("label container {id}")))
    }

    pub async fn container_exists(&self, id: &str) -> Result<bool, OciError> {
        Ok(self.container_labels(id).await?.is_some())
    }

    /// The labels of container `id`, or `None` if it does not exist.
    pub async fn container_labels(
        &self,
        id: &str,
    ) -> Result<Option<HashMap<String, String>>, OciError> {
        use containerd_client::services::v1::GetContainerRequest;
        match ContainersClient::new(self.channel())
            .get(self.req(GetContainerRequest { id: id.into() }, None))
            .await
        {
            Ok(r) => Ok(r.into_inner().container.map(|c| c.labels)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(OciError::rpc(format!("get container {id}"))(s)),
        }
    }

    pub async fn delete_task(&self, id: &str) -> Result<(), OciError> {
        match TasksClient::new(self.channel())
            .delete(self.req(
                DeleteTaskRequest {
                    container_id: id.into(),
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(OciError::rpc(format!("delete task {id}"))(s)),
        }
    }

    /// Blocks until the task exits; works for tasks started by an earlier runner.
    pub async fn wait(&self, id: &str) -> Result<u32, OciError> {
        let r = TasksClient::new(self.channel())
            .wait(self.req(
                WaitRequest {
                    container_id: id.into(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("wait for {id}")))?
            .into_inner();
        Ok(r.exit_status)
    }

    /// The container's first process as containerd reports it; `None`
    /// when it has no task.
    async fn process(
        &self,
        id: &str,
    ) -> Result<Option<containerd_client::types::v1::Process>, OciError> {
        let r = TasksClient::new(self.channel())
            .get(self.req(
                GetRequest {
                    container_id: id.into(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await;
        match r {
            Ok(r) => Ok(r.into_inner().process),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(OciError::rpc(format!("status of {id}"))(s)),
        }
    }

    pub async fn status(&self, id: &str) -> Result<TaskStatus, OciError> {
        let Some(p) = self.process(id).await? else {
            return Ok(TaskStatus::Absent);
        };
        Ok(
            match Status::try_from(p.status).unwrap_or(Status::Unknown) {
                Status::Created => TaskStatus::Created,
                Status::Running | Status::Pausing => TaskStatus::Running,
                Status::Paused => TaskStatus::Paused,
                Status::Stopped => TaskStatus::Stopped {
                    exit_code: p.exit_status,
                },
                Status::Unknown => TaskStatus::Absent,
            },
        )
    }

    /// The pid (in the node's pid namespace) of the container's first
    /// process while it runs; `None` when it is not running or has none.
    pub async fn running_pid(&self, id: &str) -> Result<Option<u32>, OciError> {
        let p = self.process(id).await?;
        Ok(p.filter(|p| {
            p.pid > 0
                && matches!(
                    Status::try_from(p.status).unwrap_or(Status::Unknown),
                    Status::Running | Status::Pausing | Status::Paused
                )
        })
        .map(|p| p.pid))
    }

    /// Sends `signal` to every process of the container.
    pub async fn kill(&self, id: &str, signal: u32) -> Result<(), OciError> {
        let r = TasksClient::new(self.channel())
            .kill(self.req(
                KillRequest {
                    container_id: id.into(),
                    exec_id: String::new(),
                    signal,
                    all: true,
                },
                None,
            ))
            .await;
        match r {
            Ok(_) => Ok(()),
            // Already gone: nothing to kill.
            Err(s) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(s) => Err(OciError::rpc(format!("kill {id}"))(s)),
        }
    }

    pub async fn pause(&self, id: &str) -> Result<(), OciError> {
        TasksClient::new(self.channel())
            .pause(self.req(
                PauseTaskRequest {
                    container_id: id.into(),
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("pause {id}")))?;
        Ok(())
    }

    pub async fn resume(&self, id: &str) -> Result<(), OciError> {
        TasksClient::new(self.channel())
            .resume(self.req(
                ResumeTaskRequest {
                    container_id: id.into(),
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("resume {id}")))?;
        Ok(())
    }

    /// Deletes the task, the container and its snapshot; each step is
    /// attempted even if an earlier one failed (it may already be gone).
    pub async fn cleanup(&self, id: &str) -> Vec<OciError> {
        let mut problems = Vec::new();
        let r = TasksClient::new(self.channel())
            .delete(self.req(
                DeleteTaskRequest {
                    container_id: id.into(),
                },
                None,
            ))
            .await;
        if let Err(s) = r {
            if s.code() != tonic::Code::NotFound {
                problems.push(OciError::rpc(format!("delete task {id}"))(s));
            }
        }
        let r = ContainersClient::new(self.channel())
            .delete(self.req(DeleteContainerRequest { id: id.into() }, None))
            .await;
        if let Err(s) = r {
            if s.code() != tonic::Code::NotFound {
                problems.push(OciError::rpc(format!("delete container {id}"))(s));
            }
        }
        self.remove_snapshot(id).await;
        problems
    }

    /// Containers carrying `label`, with their labels.
    pub async fn containers_with_label(
        &self,
        label: &str,
    ) -> Result<Vec<(String, HashMap<String, String>)>, OciError> {
        let r = ContainersClient::new(self.channel())
            .list(self.req(
                ListContainersRequest {
                    filters: vec![format!("labels.\"{label}\"")],
                },
                None,
            ))
            .await
            .map_err(OciError::rpc("list containers"))?
            .into_inner();
        Ok(r.containers.into_iter().map(|c| (c.id, c.labels)).collect())
    }
}

/// How many processes the OOM killer killed in a container's cgroup, from
/// the kernel's own counter (cgroup v2 `memory.events`, or v1
/// `memory.oom_control`), never from an exit code; 0 when unreadable. Read
/// before the task is deleted (runc removes the cgroup then).
pub fn oom_kills(cgroup_root: &Path, cgroups_path: &str) -> u64 {
    let rel = cgroups_path.trim_start_matches('/');
    let count = |path: std::path::PathBuf| -> Option<u64> {
        let text = std::fs::read_to_string(path).ok()?;
        text.lines().find_map(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|v| v.trim().parse().ok())
        })
    };
    count(cgroup_root.join(rel).join("memory.events"))
        .or_else(|| {
            count(
                cgroup_root
                    .join("memory")
                    .join(rel)
                    .join("memory.oom_control"),
            )
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_counter_from_v2_or_v1() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(oom_kills(d.path(), "/rivernode/task-1"), 0);
        let v1 = d.path().join("memory/rivernode/task-1");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(
            v1.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .unwrap();
        assert_eq!(oom_kills(d.path(), "/rivernode/task-1"), 2);
        let v2 = d.path().join("rivernode/task-2");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(
            v2.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(oom_kills(d.path(), "/rivernode/task-2"), 1);
    }
}

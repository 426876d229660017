//! A process started in a running container (`terminal exec`, `connect`):
//! containerd's Exec, with named pipes for its standard streams the way
//! containerd's own client does it. The process gets the container's own
//! process settings (user, environment, capabilities, seccomp profile,
//! no_new_privileges) with only its arguments and terminal changed, so an
//! exec can do no more than the instance's main process.

use std::path::{Path, PathBuf};

use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::{
    tasks_client::TasksClient, CloseIoRequest, DeleteProcessRequest, ExecProcessRequest,
    GetContainerRequest, ResizePtyRequest, StartRequest, WaitRequest,
};
use tokio::net::unix::pipe;

use super::{Containerd, OciError};

const PROCESS_TYPE: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecRequest {
    pub args: Vec<String>,
    /// A pseudo-terminal (stdout and stderr are one stream then).
    pub tty: bool,
    pub cols: u16,
    pub rows: u16,
    /// Its output to this logging URI (`binary://...`, the shim starts the
    /// log driver) instead of pipes to the caller; no input then.
    pub log_uri: Option<String>,
}

/// A started exec: its streams, and what its end needs.
pub struct Exec {
    ctd: Containerd,
    container: String,
    pub id: String,
    dir: PathBuf,
    pub stdin: Option<pipe::Sender>,
    /// Taken by whoever reads it.
    pub stdout: Option<pipe::Receiver>,
    /// `None` with a terminal: everything comes on `stdout`.
    pub stderr: Option<pipe::Receiver>,
}

/// The container's process settings with `req`'s arguments and terminal:
/// everything that confines the main process confines the exec too.
pub fn exec_process(
    container_process: &serde_json::Value,
    req: &ExecRequest,
) -> Result<serde_json::Value, OciError> {
    let mut p = container_process.clone();
    let obj = p
        .as_object_mut()
        .ok_or_else(|| OciError::Spec("the container's spec has no process".into()))?;
    obj.insert("args".into(), serde_json::json!(req.args));
    obj.insert("terminal".into(), serde_json::json!(req.tty));
    obj.remove("consoleSize");
    if req.tty {
        obj.insert(
            "consoleSize".into(),
            serde_json::json!({"height": req.rows, "width": req.cols}),
        );
        let env = obj
            .entry("env")
            .or_insert_with(|| serde_json::json!([]))
            .as_array_mut()
            .ok_or_else(|| OciError::Spec("process.env is not a list".into()))?;
        if !env
            .iter()
            .any(|e| e.as_str().is_some_and(|e| e.starts_with("TERM=")))
        {
            env.push(serde_json::json!("TERM=xterm-256color"));
        }
    }
    Ok(p)
}

/// The exec's named pipes in `dir`, opened before the shim does, without
/// blocking: the reading ends non-blocking, the writing one read-write (as
/// containerd's fifo package does) so that no reader has to be there yet.
/// (stdin, stdout, stderr; none with a terminal).
fn open_fifos(
    dir: &Path,
    tty: bool,
) -> Result<(pipe::Sender, pipe::Receiver, Option<pipe::Receiver>), OciError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = |name: &str| dir.join(name);
    for name in ["stdin", "stdout", "stderr"] {
        let p = path(name);
        let _ = std::fs::remove_file(&p);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).map_err(|e| {
            OciError::Io {
                path: p.clone(),
                source: e.into(),
            }
        })?;
    }
    let stdout = pipe::OpenOptions::new()
        .open_receiver(path("stdout"))
        .map_err(io(&path("stdout")))?;
    let stderr = if tty {
        None
    } else {
        Some(
            pipe::OpenOptions::new()
                .open_receiver(path("stderr"))
                .map_err(io(&path("stderr")))?,
        )
    };
    let stdin = pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(path("stdin"))
        .map_err(io(&path("stdin")))?;
    Ok((stdin, stdout, stderr))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OciError + '_ {
    move |source| OciError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Containerd {
    /// Starts `req` in the running task of `container`; its pipes live in
    /// `fifo_dir` (made here, removed by `Exec::remove`).
    pub async fn exec(
        &self,
        container: &str,
        exec_id: &str,
        req: &ExecRequest,
        fifo_dir: &Path,
    ) -> Result<Exec, OciError> {
        let c = ContainersClient::new(self.channel())
            .get(self.req(
                GetContainerRequest {
                    id: container.into(),
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("get container {container}")))?
            .into_inner()
            .container
            .ok_or_else(|| OciError::Spec(format!("container {container} vanished")))?;
        let spec: serde_json::Value = c
            .spec
            .as_ref()
            .and_then(|a| serde_json::from_slice(&a.value).ok())
            .ok_or_else(|| OciError::Spec(format!("container {container} has no runtime spec")))?;
        let process = exec_process(&spec["process"], req)?;

        // Pipes to the caller, or (a logging URI) the output to the log
        // driver containerd's shim starts, with no input.
        let (pipes, stdin_at, stdout_at, stderr_at) = match &req.log_uri {
            Some(uri) => (None, String::new(), uri.clone(), uri.clone()),
            None => {
                let pipes = open_fifos(fifo_dir, req.tty)?;
                let at = |name: &str| fifo_dir.join(name).display().to_string();
                let stderr_at = if req.tty { String::new() } else { at("stderr") };
                (Some(pipes), at("stdin"), at("stdout"), stderr_at)
            }
        };
        let mut tasks = TasksClient::new(self.channel());
        tasks
            .exec(
                self.req(
                    ExecProcessRequest {
                        container_id: container.into(),
                        stdin: stdin_at,
                        stdout: stdout_at,
                        stderr: stderr_at,
                        terminal: req.tty,
                        spec: Some(prost_types::Any {
                            type_url: PROCESS_TYPE.into(),
                            value: serde_json::to_vec(&process)
                                .map_err(|e| OciError::Spec(e.to_string()))?,
                        }),
                        exec_id: exec_id.into(),
                    },
                    None,
                ),
            )
            .await
            .map_err(OciError::rpc(format!("exec in {container}")))?;
        let exec = Exec {
            ctd: self.clone(),
            container: container.into(),
            id: exec_id.into(),
            dir: fifo_dir.to_path_buf(),
            stdin: None,
            stdout: None,
            stderr: None,
        };
        let mut exec = exec;
        if let Some((stdin, stdout, stderr)) = pipes {
            exec.stdin = Some(stdin);
            exec.stdout = Some(stdout);
            exec.stderr = stderr;
        }
        if let Err(e) = tasks
            .start(self.req(
                StartRequest {
                    container_id: container.into(),
                    exec_id: exec_id.into(),
                },
                None,
            ))
            .await
        {
            exec.remove().await;
            return Err(OciError::rpc(format!("start exec in {container}"))(e));
        }
        Ok(exec)
    }
}

impl Exec {
    pub async fn resize(&self, cols: u16, rows: u16) -> Result<(), OciError> {
        TasksClient::new(self.ctd.channel())
            .resize_pty(self.ctd.req(
                ResizePtyRequest {
                    container_id: self.container.clone(),
                    exec_id: self.id.clone(),
                    width: cols.into(),
                    height: rows.into(),
                },
                None,
            ))
            .await
            .map(|_| ())
            .map_err(OciError::rpc(format!("resize exec {}", self.id)))
    }

    /// The process sees the end of its input.
    pub async fn close_stdin(&mut self) -> Result<(), OciError> {
        self.stdin = None;
        TasksClient::new(self.ctd.channel())
            .close_io(self.ctd.req(
                CloseIoRequest {
                    container_id: self.container.clone(),
                    exec_id: self.id.clone(),
                    stdin: true,
                },
                None,
            ))
            .await
            .map(|_| ())
            .map_err(OciError::rpc(format!(
                "close the input of exec {}",
                self.id
            )))
    }

    /// Waits for the process to end; its exit status.
    pub async fn wait(&self) -> Result<u32, OciError> {
        Ok(TasksClient::new(self.ctd.channel())
            .wait(self.ctd.req(
                WaitRequest {
                    container_id: self.container.clone(),
                    exec_id: self.id.clone(),
                },
                None,
            ))
            .await
            .map_err(OciError::rpc(format!("wait for exec {}", self.id)))?
            .into_inner()
            .exit_status)
    }

    /// Kills what is left of the process and forgets it (containerd keeps
    /// an ended exec until it is deleted), and removes its pipes.
    pub async fn remove(self) {
        let mut tasks = TasksClient::new(self.ctd.channel());
        let _ = tasks
            .kill(self.ctd.req(
                containerd_client::services::v1::KillRequest {
                    container_id: self.container.clone(),
                    exec_id: self.id.clone(),
                    signal: 9,
                    all: false,
                },
                None,
            ))
            .await;
        let _ = tasks
            .delete_process(self.ctd.req(
                DeleteProcessRequest {
                    container_id: self.container.clone(),
                    exec_id: self.id.clone(),
                },
                None,
            ))
            .await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exec_keeps_the_containers_confinement_and_changes_only_its_command() {
        let main = serde_json::json!({
            "args": ["/usr/sbin/sshd", "-D"],
            "user": {"uid": 1000, "gid": 1000},
            "env": ["PATH=/bin"],
            "cwd": "/shared",
            "noNewPrivileges": true,
            "capabilities": {"bounding": ["CAP_CHOWN"]},
        });
        let req = ExecRequest {
            args: vec!["ps".into(), "aux".into()],
            tty: false,
            cols: 80,
            rows: 24,
            log_uri: None,
        };
        let p = exec_process(&main, &req).unwrap();
        assert_eq!(p["args"], serde_json::json!(["ps", "aux"]));
        assert_eq!(p["terminal"], false);
        for k in ["user", "cwd", "noNewPrivileges", "capabilities", "env"] {
            assert_eq!(p[k], main[k], "{k}");
        }
        let tty = exec_process(
            &main,
            &ExecRequest {
                tty: true,
                ..req.clone()
            },
        )
        .unwrap();
        assert_eq!(tty["terminal"], true);
        assert_eq!(
            tty["consoleSize"],
            serde_json::json!({"height": 24, "width": 80})
        );
        assert_eq!(
            tty["env"],
            serde_json::json!(["PATH=/bin", "TERM=xterm-256color"])
        );
        assert!(exec_process(&serde_json::Value::Null, &req).is_err());
    }
}

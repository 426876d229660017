//! The runner's end of an exec websocket (`GET /api/tasks/{id}/exec`, the
//! host's token only): starts the command in the instance's container and
//! carries its streams (see `api::exec` for the frames). The command ends
//! with the websocket: a client that goes away leaves nothing running.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::api::exec::{frame, ExecControl, ExecEnd, ExecStart, STDERR, STDIN, STDOUT};
use crate::oci::exec::{Exec, ExecRequest};
use crate::oci::TaskStatus;

use super::container::TaskContext;

/// Serves one exec on `ws` for instance `id`.
pub async fn serve(ctx: Arc<TaskContext>, id: u64, mut ws: WebSocket) {
    let end = match run(&ctx, id, &mut ws).await {
        Ok(code) => ExecEnd {
            exit_code: Some(code),
            error: None,
        },
        Err(e) => ExecEnd {
            exit_code: None,
            error: Some(e),
        },
    };
    if let Ok(text) = serde_json::to_string(&end) {
        let _ = ws.send(Message::Text(text.into())).await;
    }
    let _ = ws.send(Message::Close(None)).await;
}

async fn run(ctx: &TaskContext, id: u64, ws: &mut WebSocket) -> Result<i32, String> {
    let start: ExecStart = match ws.recv().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str(t.as_str())
            .map_err(|e| format!("the first frame must be an exec start: {e}"))?,
        _ => return Err("the first frame must be an exec start (JSON text)".into()),
    };
    start.check()?;
    let cid = ctx.container_id(id);
    match ctx.ctd.status(&cid).await {
        Ok(TaskStatus::Running) => {}
        Ok(other) => {
            return Err(format!(
                "task {id} is {other:?} on this node, not running: resume or restart it first"
            ))
        }
        Err(e) if e.is_not_found() => {
            return Err(format!("task {id} has no running instance on this node"))
        }
        Err(e) => return Err(crate::error_chain(&e)),
    }
    let mut raw = [0u8; 8];
    getrandom::fill(&mut raw).map_err(|e| format!("random source: {e}"))?;
    let exec_id = format!(
        "exec-{}",
        raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let dir = ctx
        .config
        .data_dir
        .join(super::STATE_DIR)
        .join("exec")
        .join(&exec_id);
    let req = ExecRequest {
        args: start.command.clone(),
        tty: start.tty,
        cols: start.cols,
        rows: start.rows,
        log_uri: None,
    };
    let mut exec = ctx
        .ctd
        .exec(&cid, &exec_id, &req, &dir)
        .await
        .map_err(|e| crate::error_chain(&e))?;
    tracing::info!(task = id, exec = %exec_id, command = ?start.command, tty = start.tty, "exec started");
    let result = relay(&mut exec, ws).await;
    exec.remove().await;
    tracing::info!(task = id, exec = %exec_id, ?result, "exec ended");
    result
}

/// Copies one of the command's outputs into frames of `stream`.
fn pump(
    mut from: tokio::net::unix::pipe::Receiver,
    stream: u8,
    to: mpsc::Sender<Vec<u8>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.send(frame(stream, &buf[..n])).await.is_err() {
                        break;
                    }
                }
            }
        }
    })
}

async fn relay(exec: &mut Exec, ws: &mut WebSocket) -> Result<i32, String> {
    let (tx, mut rx) = mpsc::channel(16);
    let mut pumps = Vec::new();
    if let Some(out) = exec.stdout.take() {
        pumps.push(pump(out, STDOUT, tx.clone()));
    }
    if let Some(err) = exec.stderr.take() {
        pumps.push(pump(err, STDERR, tx.clone()));
    }
    // The channel ends when both outputs have.
    drop(tx);
    let mut stdin = exec.stdin.take();
    loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(f) => ws
                    .send(Message::Binary(f.into()))
                    .await
                    .map_err(|e| format!("the client went away: {e}"))?,
                None => break,
            },
            msg = ws.recv() => match msg {
                Some(Ok(Message::Binary(b))) if b.first() == Some(&STDIN) => {
                    if b.len() == 1 {
                        stdin = None;
                        exec.close_stdin().await.map_err(|e| crate::error_chain(&e))?;
                    } else if let Some(s) = stdin.as_mut() {
                        // A command that stopped reading its input is no error.
                        let _ = s.write_all(&b[1..]).await;
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    if let Ok(ExecControl::Resize { cols, rows }) = serde_json::from_str(t.as_str()) {
                        let _ = exec.resize(cols, rows).await;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    return Err("the client went away".into());
                }
                Some(Ok(_)) => {}
            },
        }
    }
    for p in pumps {
        let _ = p.await;
    }
    let status = exec.wait().await.map_err(|e| crate::error_chain(&e))?;
    Ok(i32::try_from(status).unwrap_or(i32::MAX))
}

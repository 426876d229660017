//! `GET /api/tasks/{id}/exec` and `/forward`: the owner's (or the admin's)
//! websocket to a command in their instance or to a port of it, relayed
//! frame by frame to the runner of the instance's node, which is reached
//! with the host's own token. The host reads nothing of the frames; it only
//! carries them (see `api::exec`, `api::forward`).

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{Message as AxMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::Extension;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as TMessage;

use super::api::ApiError;
use super::auth::Principal;
use super::HostState;
use crate::api::forward::ForwardQuery;
use crate::api::TaskState;

type RunnerSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn exec(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<u64>,
    // Taken as a result so that who may see the task is decided first.
    ws: Result<WebSocketUpgrade, WsRejection>,
) -> Result<Response, ApiError> {
    let runner = dial_runner(&state, &p, id, ws.is_ok(), &format!("/api/tasks/{id}/exec")).await?;
    let ws = upgrade(ws)?;
    tracing::info!(task = id, "exec relayed");
    Ok(ws.on_upgrade(move |client| relay(client, runner)))
}

/// `GET /api/tasks/{id}/forward?port=P&proto=tcp|udp`: the owner's (or the
/// admin's) connections to a port of their instance (`api::forward`),
/// relayed like exec.
pub async fn forward(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<u64>,
    q: Result<Query<ForwardQuery>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WsRejection>,
) -> Result<Response, ApiError> {
    // Who may see the task first: another user learns nothing of its ports.
    super::tasks::visible_task(&state, &p, id).await?;
    let q = q
        .map_err(|e| ApiError::BadRequest(format!("port, proto: {e}")))?
        .0;
    q.check().map_err(ApiError::BadRequest)?;
    let path = format!("/api/tasks/{id}/forward?{}", q.to_query());
    let runner = dial_runner(&state, &p, id, ws.is_ok(), &path).await?;
    let ws = upgrade(ws)?;
    tracing::info!(task = id, port = q.port, proto = %q.proto, "forward relayed");
    Ok(ws.on_upgrade(move |client| relay(client, runner)))
}

type WsRejection = axum::extract::ws::rejection::WebSocketUpgradeRejection;

/// The client's upgrade, answering a browser's subprotocol (which it must
/// see echoed, or it drops the socket).
fn upgrade(ws: Result<WebSocketUpgrade, WsRejection>) -> Result<WebSocketUpgrade, ApiError> {
    ws.map(|ws| ws.protocols([super::auth::WS_PROTOCOL]))
        .map_err(|e| {
            ApiError::BadRequest(format!(
                "this route is a websocket (Upgrade: websocket): {e}"
            ))
        })
}

/// Why a task in `state` cannot be reached, and what the user can do.
fn not_running(id: u64, state: TaskState) -> String {
    let what = match state {
        TaskState::Paused => format!("resume it first (`rivernode task resume {id}`)"),
        TaskState::Stopped => format!("start it again first (`rivernode vps restart {id}`)"),
        TaskState::Pending | TaskState::Assigning => {
            format!("it has not started yet (`rivernode task status {id}` says why)")
        }
        TaskState::Lost => "its node has gone silent; it is back when the node is".into(),
        TaskState::PendingApproval => {
            "it waits for an operator's approval (`rivernode approve`)".into()
        }
        _ => "it has ended".into(),
    };
    format!("task {id} is {state}, not running: {what}")
}

/// The websocket `path` of the runner of task `id`'s node, after checking
/// that `p` may see the task and that it runs. It is connected before the
/// client's upgrade, so a runner that cannot be reached, or refuses, is an
/// HTTP error the client sees, not a closed socket.
async fn dial_runner(
    state: &Arc<HostState>,
    p: &Principal,
    id: u64,
    is_websocket: bool,
    path: &str,
) -> Result<RunnerSocket, ApiError> {
    let t = super::tasks::visible_task(state, p, id).await?;
    if t.state != TaskState::Running {
        return Err(ApiError::Conflict(not_running(id, t.state)));
    }
    if !is_websocket {
        // Answered before any runner is dialled.
        return Err(ApiError::BadRequest(
            "this route is a websocket (Upgrade: websocket)".into(),
        ));
    }
    let node = t
        .placement
        .map(|p| p.node)
        .ok_or_else(|| ApiError::Conflict(format!("task {id} has no node")))?;
    let n = node.clone();
    let (url, token) = state
        .blocking(move |s| s.runner_access(&n))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("node {node:?} of task {id} is gone")))?;
    let mut req = crate::api::exec::ws_url(&url, path)
        .into_client_request()
        .map_err(|e| ApiError::Internal(format!("runner URL {url}: {e}")))?;
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| ApiError::Internal("the runner token is not a header value".into()))?;
    req.headers_mut()
        .insert(axum::http::header::AUTHORIZATION, bearer);
    let connect = tokio_tungstenite::connect_async_with_config(req, None, false);
    match tokio::time::timeout(std::time::Duration::from_secs(10), connect).await {
        Err(_) => Err(ApiError::BadGateway(format!(
            "node {node}'s runner did not answer in 10 s"
        ))),
        Ok(Ok((runner, _))) => Ok(runner),
        // The runner's own refusal (the instance is not running there, a
        // bad port) is the client's answer.
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp)))
            if resp.status().is_client_error() =>
        {
            let body = resp.body().as_deref().unwrap_or_default();
            let text = String::from_utf8_lossy(body).to_string();
            let message = crate::api::ErrorBody::message_of(&text).unwrap_or(text);
            Err(match resp.status().as_u16() {
                400 => ApiError::BadRequest(message),
                404 => ApiError::NotFound(message),
                _ => ApiError::Conflict(message),
            })
        }
        Ok(Err(e)) => Err(ApiError::BadGateway(format!("node {node}'s runner: {e}"))),
    }
}

/// Carries frames both ways until either side closes.
async fn relay(client: WebSocket, runner: RunnerSocket) {
    let (mut c_tx, mut c_rx) = client.split();
    let (mut r_tx, mut r_rx) = runner.split();
    let up = async {
        while let Some(Ok(m)) = c_rx.next().await {
            let m = match m {
                AxMessage::Binary(b) => TMessage::Binary(b),
                AxMessage::Text(t) => TMessage::Text(t.as_str().into()),
                AxMessage::Close(_) => break,
                _ => continue,
            };
            if r_tx.send(m).await.is_err() {
                break;
            }
        }
        let _ = r_tx.send(TMessage::Close(None)).await;
    };
    let down = async {
        while let Some(Ok(m)) = r_rx.next().await {
            let m = match m {
                TMessage::Binary(b) => AxMessage::Binary(b),
                TMessage::Text(t) => AxMessage::Text(t.as_str().into()),
                TMessage::Close(_) => break,
                _ => continue,
            };
            if c_tx.send(m).await.is_err() {
                break;
            }
        }
        let _ = c_tx.send(AxMessage::Close(None)).await;
    };
    until_runner_ends(up, down, std::time::Duration::from_secs(30)).await;
}

/// The runner's end is the session's end. The client's end (it went away,
/// or its last frame found the runner done) is not yet: what the runner
/// still sends, its exit status above all, goes on to the client until the
/// runner closes (or `grace` passes). Ending at either side's end lost the
/// status of a quick command now and then ("the session ended before the
/// command did").
async fn until_runner_ends(
    up: impl std::future::Future<Output = ()>,
    down: impl std::future::Future<Output = ()>,
    grace: std::time::Duration,
) {
    tokio::pin!(up, down);
    tokio::select! {
        _ = &mut down => {}
        _ = &mut up => {
            let _ = tokio::time::timeout(grace, &mut down).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn what_the_runner_sends_after_the_client_ended_still_arrives() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;
        let delivered = AtomicBool::new(false);
        // The client is done at once; the runner's exit status comes later.
        let down = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            delivered.store(true, Ordering::SeqCst);
        };
        until_runner_ends(async {}, down, Duration::from_secs(5)).await;
        assert!(delivered.load(Ordering::SeqCst));
        // A runner that never ends is given up on after the grace.
        until_runner_ends(
            async {},
            std::future::pending::<()>(),
            Duration::from_millis(20),
        )
        .await;
        // The runner's end ends the session even if the client stays.
        until_runner_ends(
            std::future::pending::<()>(),
            async {},
            Duration::from_secs(5),
        )
        .await;
    }

    #[test]
    fn a_task_that_does_not_run_says_what_to_do() {
        assert!(not_running(3, TaskState::Paused).contains("rivernode task resume 3"));
        assert!(not_running(3, TaskState::Stopped).contains("rivernode vps restart 3"));
        assert!(not_running(3, TaskState::Pending).contains("not started yet"));
        let done = not_running(3, TaskState::Completed);
        assert!(done.contains("ended") && !done.contains("resume"), "{done}");
    }
}

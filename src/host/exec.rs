//! `GET /api/tasks/{id}/exec`: the owner's (or the admin's) websocket to a
//! command in their instance, relayed frame by frame to the runner of the
//! instance's node, which is reached with the host's own token. The host
//! reads nothing of the frames; it only carries them (see `api::exec`).

use std::sync::Arc;

use axum::extract::ws::{Message as AxMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::Extension;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as TMessage;

use super::api::ApiError;
use super::auth::Principal;
use super::HostState;
use crate::api::TaskState;

type RunnerSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn exec(
    State(state): State<Arc<HostState>>,
    Extension(p): Extension<Principal>,
    Path(id): Path<u64>,
    // Taken as a result so that who may see the task is decided first.
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let t = super::tasks::visible_task(&state, &p, id).await?;
    if t.state != TaskState::Running {
        return Err(ApiError::Conflict(format!(
            "task {id} is {}, not running: a command runs only in a running instance",
            t.state
        )));
    }
    let ws = ws.map_err(|e| {
        ApiError::BadRequest(format!(
            "this route is a websocket (Upgrade: websocket): {e}"
        ))
    })?;
    let node = t
        .placement
        .map(|p| p.node)
        .ok_or_else(|| ApiError::Conflict(format!("task {id} has no node")))?;
    let n = node.clone();
    let (url, token) = state
        .blocking(move |s| s.runner_access(&n))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("node {node:?} of task {id} is gone")))?;
    // Connected before the client's upgrade, so a runner that cannot be
    // reached is an HTTP error the client sees, not a closed socket.
    let mut req = crate::api::exec::ws_url(&url, &format!("/api/tasks/{id}/exec"))
        .into_client_request()
        .map_err(|e| ApiError::Internal(format!("runner URL {url}: {e}")))?;
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| ApiError::Internal("the runner token is not a header value".into()))?;
    req.headers_mut()
        .insert(axum::http::header::AUTHORIZATION, bearer);
    let connect = tokio_tungstenite::connect_async_with_config(req, None, false);
    let (runner, _) = tokio::time::timeout(std::time::Duration::from_secs(10), connect)
        .await
        .map_err(|_| ApiError::BadGateway(format!("node {node}'s runner did not answer in 10 s")))?
        .map_err(|e| ApiError::BadGateway(format!("node {node}'s runner: {e}")))?;
    tracing::info!(task = id, node = %node, "exec relayed");
    Ok(ws.on_upgrade(move |client| relay(client, runner)))
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
    // Either side's end is the session's end.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

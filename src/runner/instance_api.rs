//! The in-instance API: the part of Vast.ai's REST API that `vastai show |
//! stop | start | destroy instance $CONTAINER_ID` calls, for an instance
//! acting on itself with its `CONTAINER_API_KEY`.
//!
//! Instances never reach the host's or a runner's API. The runner serves
//! this narrow endpoint on a link-local address on the instance bridge (as
//! cloud metadata services do), reached only from the bridge (the table
//! drops it from anywhere else). It names the caller by its source address:
//! the bridge's anti-spoofing rules pin each instance to its own, so an
//! address is an instance. The key and the verb go to the host, which
//! checks the key is that instance's; a path naming another instance is
//! refused here, before anything is sent.
//!
//! Answers take Vast.ai's shapes: `{"instances": {...}}` for show (with
//! `start_date` and `extra_env` as the CLI reads them), `{"success": true}`
//! for the verbs, `{"success": false, "error": ..., "msg": ...}` otherwise.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::api::host_client::{HostCallError, HostClient};
use crate::api::instance_key::{SelfAction, SelfRequest, KEY_VAR};
use crate::api::{TaskState, TaskView};

/// What the endpoint needs from the runner: who holds an address, and the host.
pub struct InstanceApi {
    /// The node's name: its instances' container ids are `<node>-task-<id>`.
    pub node: String,
    /// The instance addresses, by container id (the IPAM leases).
    pub leases:
        Box<dyn Fn() -> Result<BTreeMap<String, Ipv4Addr>, crate::net::NetError> + Send + Sync>,
    pub host: Arc<HostClient>,
}

/// The task id of the instance at `ip` on node `node`, from the leases.
pub fn caller(leases: &BTreeMap<String, Ipv4Addr>, node: &str, ip: Ipv4Addr) -> Option<u64> {
    let prefix = format!("{node}-task-");
    leases
        .iter()
        .find(|(_, a)| **a == ip)
        .and_then(|(cid, _)| cid.strip_prefix(&prefix)?.parse().ok())
}

/// The key of an `Authorization: Bearer KEY` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// The verb of a `PUT /instances/{id}/` body: `{"state": "stopped" | "running"}`.
pub fn put_action(body: &Value) -> Result<SelfAction, String> {
    match body.get("state").and_then(Value::as_str) {
        Some("stopped") => Ok(SelfAction::Stop),
        Some("running") => Ok(SelfAction::Start),
        Some(other) => Err(format!(
            "state: {other:?} is not one of \"stopped\", \"running\""
        )),
        None => Err(
            "only {\"state\": \"stopped\" | \"running\"} is served here (labels, prepay and the rest are not)"
                .into(),
        ),
    }
}

/// Vast.ai's name for where an instance is.
fn actual_status(s: TaskState) -> &'static str {
    match s {
        TaskState::Pending | TaskState::Assigning => "loading",
        TaskState::Running => "running",
        TaskState::Paused => "paused",
        TaskState::Lost => "offline",
        _ => "exited",
    }
}

/// An instance as `vastai show instance` reads it: the fields its table
/// prints that rivernode has, `start_date` (seconds) and `extra_env` as
/// pairs. The key itself is left out of the variables.
pub fn vast_instance(t: &TaskView) -> Value {
    let extra_env: Vec<[&str; 2]> = t
        .spec
        .env
        .iter()
        .filter(|(k, _)| k.as_str() != KEY_VAR)
        .map(|(k, v)| [k.as_str(), v.as_str()])
        .collect();
    let mut ports = serde_json::Map::new();
    let placement = t.placement.as_ref();
    for p in placement
        .map(|p| p.published.as_slice())
        .unwrap_or_default()
    {
        ports.insert(
            format!("{}/{}", p.internal, p.proto),
            json!([{"HostIp": "0.0.0.0", "HostPort": p.external.to_string()}]),
        );
    }
    let started_ms = t.started_at_unix_ms.unwrap_or(t.submitted_at_unix_ms);
    json!({
        "id": t.id,
        "machine_id": placement.map(|p| p.node.clone()),
        "actual_status": actual_status(t.state),
        "intended_status": if t.desired == crate::api::Desired::Running { "running" } else { "stopped" },
        "cur_state": actual_status(t.state),
        "status_msg": t.message.clone().unwrap_or_else(|| t.reason.clone()),
        "label": format!("C.{}", t.id),
        "image_uuid": t.spec.image.to_string(),
        "num_gpus": placement.map(|p| p.gpus.len()).unwrap_or(0),
        "cpu_cores_effective": placement.map(|p| p.cpus.len()).unwrap_or(0),
        "cpu_ram": placement.map(|p| p.memory_bytes / 1_000_000).unwrap_or(0),
        "start_date": started_ms as f64 / 1000.0,
        "extra_env": extra_env,
        "ports": ports,
        "jupyter_token": t.spec.env.get("JUPYTER_TOKEN"),
    })
}

/// A refusal in Vast.ai's shape.
fn refuse(status: StatusCode, error: &str, msg: impl Into<String>) -> Response {
    let msg = msg.into();
    (
        status,
        Json(json!({"success": false, "error": error, "msg": msg})),
    )
        .into_response()
}

pub fn router(state: Arc<InstanceApi>) -> Router {
    Router::new()
        .route(
            "/api/v0/instances/{id}/",
            get(show_or_destroy).put(put_state).delete(show_or_destroy),
        )
        .fallback(|| async {
            refuse(
                StatusCode::NOT_FOUND,
                "not_found",
                "this endpoint serves show, start, stop and destroy of the calling instance only",
            )
        })
        .with_state(state)
}

/// GET shows, DELETE destroys: the verb is the method.
async fn show_or_destroy(
    s: State<Arc<InstanceApi>>,
    peer: ConnectInfo<SocketAddr>,
    method: axum::http::Method,
    id: Path<String>,
    headers: HeaderMap,
) -> Response {
    let action = if method == axum::http::Method::DELETE {
        SelfAction::Destroy
    } else {
        SelfAction::Show
    };
    act(&s, peer.0, &id, &headers, action).await
}

/// The most a request body may hold, and the time it gets to arrive: an
/// instance trickling a body must not hold its slot.
const MAX_BODY: usize = 1024;
const BODY_TIME: std::time::Duration = std::time::Duration::from_secs(5);

async fn put_state(
    s: State<Arc<InstanceApi>>,
    peer: ConnectInfo<SocketAddr>,
    id: Path<String>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let read = tokio::time::timeout(BODY_TIME, axum::body::to_bytes(body, MAX_BODY)).await;
    let Ok(Ok(body)) = read else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "invalid_args",
            format!("the body must be JSON of at most {MAX_BODY} bytes, sent within {BODY_TIME:?}"),
        );
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match put_action(&body) {
        Ok(action) => act(&s, peer.0, &id, &headers, action).await,
        Err(why) => refuse(StatusCode::BAD_REQUEST, "invalid_args", why),
    }
}

async fn act(
    s: &InstanceApi,
    peer: SocketAddr,
    path_id: &str,
    headers: &HeaderMap,
    action: SelfAction,
) -> Response {
    let Some(key) = bearer(headers) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "auth_error",
            format!("send the instance's key: --api-key ${KEY_VAR}"),
        );
    };
    // Any other key (a Vast.ai account's, by mistake) is not sent on to the host.
    if !key.starts_with(crate::api::instance_key::PREFIX) {
        return refuse(
            StatusCode::FORBIDDEN,
            "auth_error",
            format!("not a {KEY_VAR}: only the instance's own key is taken here"),
        );
    }
    let SocketAddr::V4(peer) = peer else {
        return refuse(StatusCode::FORBIDDEN, "auth_error", "IPv4 instances only");
    };
    let leases = match tokio::task::block_in_place(|| (s.leases)()) {
        Ok(l) => l,
        Err(e) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                crate::error_chain(&e),
            )
        }
    };
    let Some(id) = caller(&leases, &s.node, *peer.ip()) else {
        return refuse(
            StatusCode::FORBIDDEN,
            "auth_error",
            "only an instance of this node is served here",
        );
    };
    if path_id.parse::<u64>().ok() != Some(id) {
        return refuse(
            StatusCode::FORBIDDEN,
            "auth_error",
            format!("this key acts on its own instance ({id}) only"),
        );
    }
    let req = SelfRequest {
        key: key.to_string(),
        action,
    };
    match s.host.instance_self(id, &req).await {
        Ok(t) if action == SelfAction::Show => {
            Json(json!({"instances": vast_instance(&t)})).into_response()
        }
        Ok(_) => Json(json!({"success": true})).into_response(),
        Err(HostCallError::Refused { status, message }) => {
            let status = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_REQUEST);
            let error = match status.as_u16() {
                401 | 403 => "auth_error",
                404 => "not_found",
                409 => "conflict",
                _ => "invalid_args",
            };
            refuse(status, error, message)
        }
        Err(e) => {
            // The cause (the host's address among it) is the node's business.
            tracing::warn!(task = id, error = %crate::error_chain(&e), "the in-instance API cannot reach the host");
            refuse(
                StatusCode::BAD_GATEWAY,
                "unavailable",
                "the cluster's host cannot be reached now; try again",
            )
        }
    }
}

/// Listens on `addr` even before the address is on the bridge (freebind:
/// the bridge and its address come with the first instance network).
pub fn listen(addr: SocketAddrV4) -> std::io::Result<tokio::net::TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::IpFreebind, &true)
        .map_err(std::io::Error::from)?;
    socket.bind(addr.into())?;
    socket.listen(256)
}

/// Serves the endpoint until `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<InstanceApi>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    let limits = crate::api::http::Limits {
        header_timeout: std::time::Duration::from_secs(10),
        max_connections: 256,
        // One instance must not take the slots of all others.
        max_per_peer: 8,
    };
    crate::api::http::serve(listener, router(state), limits, async move {
        let _ = stop.wait_for(|s| *s).await;
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_caller_is_the_instance_of_this_node_holding_the_address() {
        let leases: BTreeMap<String, Ipv4Addr> = [
            ("n1-task-7".to_string(), Ipv4Addr::new(10, 88, 0, 2)),
            ("n1-task-9".to_string(), Ipv4Addr::new(10, 88, 0, 3)),
            ("n12-task-4".to_string(), Ipv4Addr::new(10, 88, 0, 4)),
        ]
        .into();
        assert_eq!(caller(&leases, "n1", Ipv4Addr::new(10, 88, 0, 3)), Some(9));
        assert_eq!(caller(&leases, "n1", Ipv4Addr::new(10, 88, 0, 9)), None);
        assert_eq!(
            caller(&leases, "n1", Ipv4Addr::new(10, 88, 0, 4)),
            None,
            "another node's name that starts with this one's"
        );
    }

    #[test]
    fn only_a_state_change_is_taken_from_a_put() {
        assert_eq!(
            put_action(&json!({"state": "stopped"})),
            Ok(SelfAction::Stop)
        );
        assert_eq!(
            put_action(&json!({"state": "running"})),
            Ok(SelfAction::Start)
        );
        assert!(put_action(&json!({"state": "gone"}))
            .unwrap_err()
            .contains("gone"));
        assert!(put_action(&json!({"label": "x"})).is_err());
        assert!(put_action(&Value::Null).is_err());
    }

    #[test]
    fn a_bearer_key_is_read_and_an_empty_one_is_none() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert("authorization", "Bearer cak_1".parse().unwrap());
        assert_eq!(bearer(&h), Some("cak_1"));
        h.insert("authorization", "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert("authorization", "Basic eDp5".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn show_takes_the_shape_the_vastai_cli_reads_and_leaves_the_key_out() {
        let t: TaskView = serde_json::from_value(json!({
            "id": 5, "state": "running", "desired": "running",
            "spec": {"kind": "vps", "command": [], "image": {"environment": "busybox"},
                     "env": {"CONTAINER_API_KEY": "cak_x", "TZ": "UTC"}},
            "placement": {"node": "n1", "numa": 0, "cpus": "0-1", "memory_bytes": 2_000_000_000u64,
                          "gpus": [], "node_port": 40000,
                          "published": [{"request": 8081, "proto": "tcp", "internal": 8081,
                                         "node_port": 40001, "external": 20001}]},
            "reason": "placed", "exit_code": null, "message": null,
            "submitted_at_unix_ms": 1000, "started_at_unix_ms": 3000, "finished_at_unix_ms": null
        }))
        .unwrap();
        let v = vast_instance(&t);
        assert_eq!(v["id"], 5);
        assert_eq!(v["actual_status"], "running");
        assert_eq!(v["start_date"], 3.0);
        assert_eq!(v["extra_env"], json!([["TZ", "UTC"]]));
        assert_eq!(v["ports"]["8081/tcp"][0]["HostPort"], "20001");
        assert_eq!(v["cpu_cores_effective"], 2);
        assert!(!v.to_string().contains("cak_x"), "{v}");
    }
}

//! The host's `/metrics` (OpenMetrics text, prometheus-client): nodes by
//! state, tasks by state and kind, the queue and its oldest wait, how long
//! placement takes, API request latency by route, and the SSH proxy's
//! tunnels and bytes. Counts are read from the store at each scrape;
//! latencies are recorded as they happen. Every label is bounded: a route
//! template, never a path; a state or kind, never an id.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::api::ApiError;
use super::HostState;
use crate::api::{NodeState, TaskState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    /// The route's template (`/api/tasks/{id}`); `unmatched` for none.
    route: String,
    /// `2xx`, `4xx`, `5xx`.
    code: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms to about 33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The SSH proxy's counts, kept by the proxy as tunnels open and close.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub open: AtomicI64,
    pub opened: AtomicU64,
    pub refused: AtomicU64,
    /// Bytes from clients to instances and back, counted as each tunnel closes.
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
}

/// What the host records as it goes.
pub struct HostMetrics {
    requests: HistogramFamily<RouteLabels>,
    schedule_pass: Histogram,
    placement_wait: Histogram,
    pub proxy: Arc<ProxyStats>,
}

impl Default for HostMetrics {
    fn default() -> Self {
        HostMetrics {
            requests: Family::new_with_constructor(latency_histogram),
            schedule_pass: latency_histogram(),
            // 10 ms to about 23 h: a task may wait long for its GPUs.
            placement_wait: Histogram::new(exponential_buckets(0.01, 2.0, 24)),
            proxy: Arc::default(),
        }
    }
}

impl HostMetrics {
    /// One scheduling pass took `seconds`.
    pub fn schedule_pass(&self, seconds: f64) {
        self.schedule_pass.observe(seconds);
    }

    /// A task was placed `seconds` after it was submitted (first placements).
    pub fn placed_after(&self, seconds: f64) {
        self.placement_wait.observe(seconds);
    }
}

/// Records each API request's latency by route (a layer on the router).
pub async fn track(State(state): State<Arc<HostState>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    // A method name is the client's to choose: only the standard ones are labels.
    let method = match req.method().as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "PATCH" | "OPTIONS") => m,
        _ => "other",
    }
    .to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    let resp = next.run(req).await;
    let code = format!("{}xx", resp.status().as_u16() / 100);
    state
        .metrics
        .requests
        .get_or_create(&RouteLabels {
            method,
            route,
            code,
        })
        .observe(started.elapsed().as_secs_f64());
    resp
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TaskLabels {
    state: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: String,
}

/// `GET /metrics` (a metrics, viewer, operator or admin token).
pub async fn page(
    State(state): State<Arc<HostState>>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let nodes = state.blocking(|s| s.list_nodes()).await?;
    let counts = state.blocking(|s| s.task_counts()).await?;
    let now = crate::now_unix_ms();
    let mut r = Registry::with_prefix("rivernode");

    let by_state = Family::<StateLabel, Gauge>::default();
    for s in [NodeState::Online, NodeState::Degraded, NodeState::Offline] {
        let n = nodes.iter().filter(|n| n.state == s).count();
        by_state
            .get_or_create(&StateLabel {
                state: s.as_str().into(),
            })
            .set(n as i64);
    }
    r.register("nodes", "Nodes by state", by_state);

    let tasks = Family::<TaskLabels, Gauge>::default();
    // Every state and kind has its series, at 0 when nothing is in it: an
    // alert on `rivernode_tasks{state="lost"} > 0` needs a series to read,
    // and a series that vanishes looks like a scrape that failed.
    for state in TaskState::ALL {
        for kind in ["command", "vps"] {
            tasks
                .get_or_create(&TaskLabels {
                    state: state.as_str().into(),
                    kind: kind.into(),
                })
                .set(0);
        }
    }
    let mut queued = 0;
    for (state_name, kind, n) in &counts.by_state {
        tasks
            .get_or_create(&TaskLabels {
                state: state_name.clone(),
                kind: kind.clone(),
            })
            .set(*n as i64);
        if state_name == TaskState::Pending.as_str() {
            queued += n;
        }
    }
    r.register("tasks", "Tasks and VPS by state and kind", tasks);
    let queue = Gauge::<i64>::default();
    queue.set(queued as i64);
    r.register(
        "queue_length",
        "Tasks waiting to be placed (pending)",
        queue,
    );
    let oldest = Gauge::<f64, AtomicU64>::default();
    oldest.set(
        counts
            .oldest_waiting_since
            .map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0),
    );
    r.register(
        "queue_oldest_wait_seconds",
        "How long the longest-waiting never-started queued task has waited (0: none)",
        oldest,
    );

    let m = &state.metrics;
    r.register(
        "schedule_pass_seconds",
        "Time one scheduling pass takes",
        m.schedule_pass.clone(),
    );
    r.register(
        "placement_wait_seconds",
        "Time from submission to first placement",
        m.placement_wait.clone(),
    );
    r.register(
        "http_request_duration_seconds",
        "API request latency by route",
        m.requests.clone(),
    );

    let p = &m.proxy;
    let open = Gauge::<i64>::default();
    open.set(p.open.load(Ordering::Relaxed));
    r.register("proxy_tunnels_open", "SSH proxy tunnels open now", open);
    let opened = Counter::<u64>::default();
    opened.inc_by(p.opened.load(Ordering::Relaxed));
    r.register("proxy_tunnels", "SSH proxy tunnels opened", opened);
    let refused = Counter::<u64>::default();
    refused.inc_by(p.refused.load(Ordering::Relaxed));
    r.register(
        "proxy_refused",
        "SSH proxy connections refused (bad handshake, token, instance or limits)",
        refused,
    );
    let bytes = Family::<DirectionLabel, Counter>::default();
    for (d, n) in [("up", &p.bytes_up), ("down", &p.bytes_down)] {
        bytes
            .get_or_create(&DirectionLabel {
                direction: d.into(),
            })
            .inc_by(n.load(Ordering::Relaxed));
    }
    r.register(
        "proxy_bytes",
        "Bytes the SSH proxy moved (up: to instances), counted as tunnels close",
        bytes,
    );

    Ok(crate::api::openmetrics::page(&headers, &r))
}

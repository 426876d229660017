//! Scheduling at scale: tasks placed on simulated nodes of 8 GPUs (two NUMA
//! nodes of 32 CPUs and 4 GPUs each), one submission and one scheduling
//! pass at a time through the SQLite store, as the host's submit route
//! does. Prints the time from submission to placement per task (p50, p99),
//! beside a submission alone (the baseline: one write transaction), as a
//! ratio; then submissions per second through the real HTTP API of the
//! real binary, with its scheduling pass each.
//!
//! `cargo bench --bench scheduler` (10,000 tasks on 1,000 nodes; set
//! RIVERNODE_BENCH_NODES and RIVERNODE_BENCH_TASKS for other sizes).

mod common;

use std::time::{Duration, Instant};

use common::Host;

use rivernode::api::{RegisterRequest, TaskSpec};
use rivernode::host::store::{SqliteStore, Store};
use rivernode::topology::Inventory;

fn size(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A two-socket node: 64 CPUs, 512 GiB, 8 GPUs (4 on each NUMA node).
fn inventory(i: usize) -> Inventory {
    let cpus: Vec<serde_json::Value> = (0..64u32)
        .map(|c| {
            serde_json::json!({
                "id": c, "core_id": c % 32, "package_id": c / 32, "numa_node": c / 32,
                "thread_siblings": c.to_string(),
            })
        })
        .collect();
    let gpus: Vec<serde_json::Value> = (0..8u32)
        .map(|g| {
            serde_json::json!({
                "address": format!("0000:{:02x}:00.0", 0x10 + g * 0x10),
                "vendor_id": 0x10de, "device_id": 0x2330, "class": 0x030200,
                "vendor_name": null, "name": "H100", "uuid": format!("GPU-{i:04}-{g}"),
                "driver": "nvidia", "numa_node": g / 4, "iommu_group": g,
                "iommu_group_members": [], "companions": [], "boot_vga": false,
            })
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "hostname": format!("n{i}"), "kernel": "6.1",
        "cpus": cpus,
        "numa_nodes": [
            {"id": 0, "cpus": "0-31", "memory_total_bytes": 256u64 << 30},
            {"id": 1, "cpus": "32-63", "memory_total_bytes": 256u64 << 30},
        ],
        "memory_total_bytes": 512u64 << 30,
        "gpus": gpus,
    }))
    .unwrap()
}

/// The n-th task: half ask one GPU, a fifth two, a tenth four, the rest
/// four cores and no GPU.
fn spec(n: usize) -> TaskSpec {
    let gpus = match n % 10 {
        0..=4 => 1,
        5 | 6 => 2,
        7 => 4,
        _ => 0,
    };
    serde_json::from_value(serde_json::json!({
        "command": ["true"], "image": {"environment": "base"}, "kind": "command",
        "cores": if gpus == 0 { 4 } else { 2 }, "gpu_count": gpus,
        "memory_bytes": 8u64 << 30,
    }))
    .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn register(s: &SqliteStore, nodes: usize) {
    for i in 0..nodes {
        s.register_node(
            &RegisterRequest {
                name: format!("n{i}"),
                runner_url: "http://127.0.0.1:1".into(),
                heartbeat_interval_ms: 5000,
                version: "bench".into(),
                inventory: inventory(i),
                registration_key: None,
            },
            &format!("cred-{i}"),
            "host-token",
            0,
        )
        .unwrap();
    }
}

fn main() {
    let nodes = size("RIVERNODE_BENCH_NODES", 1000);
    let tasks = size("RIVERNODE_BENCH_TASKS", 10_000);

    // Baseline: submissions alone, into a store with the same nodes.
    let base = SqliteStore::open_in_memory().unwrap();
    register(&base, nodes);
    let started = Instant::now();
    for n in 0..tasks {
        base.submit_task(&spec(n), Some("bench"), 0).unwrap();
    }
    let submit_each = started.elapsed() / tasks as u32;

    // Submission and placement, one task at a time.
    let s = SqliteStore::open_in_memory().unwrap();
    register(&s, nodes);
    let mut each = Vec::with_capacity(tasks);
    let mut placed = 0usize;
    let run = Instant::now();
    for n in 0..tasks {
        let t = Instant::now();
        s.submit_task(&spec(n), Some("bench"), 0).unwrap();
        placed += s.schedule().unwrap().len();
        each.push(t.elapsed());
    }
    let total = run.elapsed();
    each.sort();
    let (p50, p99) = (percentile(&each, 0.5), percentile(&each, 0.99));
    println!(
        "scheduler: {tasks} tasks on {nodes} nodes x 8 GPUs (2 NUMA each): {placed} placed, {} waiting, in {total:.1?}",
        tasks - placed
    );
    println!(
        "  submit+place per task: p50 {p50:.2?}  p99 {p99:.2?}  | submit alone {submit_each:.2?}  \
         ratio p50/submit {:.1}",
        p50.as_secs_f64() / submit_each.as_secs_f64()
    );

    // Submissions through the real HTTP API (each with its scheduling pass).
    let http_tasks = size("RIVERNODE_BENCH_HTTP_TASKS", 2000).min(tasks);
    let host = Host::start(&["--max-waiting-per-user", "1000000"]);
    std::fs::write(host.environments().join("base.tar"), "").unwrap();
    let (url, admin, join) = (host.url.clone(), host.admin.clone(), host.join.clone());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let per_second = rt.block_on(async {
        let http = reqwest::Client::new();
        for i in 0..nodes {
            let r = http
                .post(format!("{url}/api/nodes/register"))
                .bearer_auth(&join)
                .json(&RegisterRequest {
                    name: format!("n{i}"),
                    runner_url: "http://127.0.0.1:1".into(),
                    heartbeat_interval_ms: 60_000,
                    version: "bench".into(),
                    inventory: inventory(i),
                    registration_key: None,
                })
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{}", r.text().await.unwrap());
        }
        // Eight clients at once, as a provisioning script's burst would be.
        let started = Instant::now();
        let clients: Vec<_> = (0..8)
            .map(|c| {
                let (http, url, admin) = (http.clone(), url.clone(), admin.clone());
                tokio::spawn(async move {
                    for n in (c..http_tasks).step_by(8) {
                        let r = http
                            .post(format!("{url}/api/tasks"))
                            .bearer_auth(&admin)
                            .json(&spec(n))
                            .send()
                            .await
                            .unwrap();
                        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
                    }
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap();
        }
        http_tasks as f64 / started.elapsed().as_secs_f64()
    });
    println!(
        "  HTTP API: {http_tasks} submissions (8 clients, {nodes} nodes): {per_second:.0} per second"
    );
}

//! `rivernode node list|status|remove`.

use crate::api::{NodeRemoved, NodeView, OverlayView, RunnerStatus};
use crate::cli::args::{JoinTokenCommand, NodeCommand, Output};
use crate::cli::client::{Client, ClientError};
use crate::cli::output::{ago, bytes, emit, emit_json, table};
use crate::host::api::JoinTokenView;
use crate::topology::CpuList;

pub async fn run(client: &Client, cmd: NodeCommand, output: Output) -> Result<(), ClientError> {
    match cmd {
        NodeCommand::List => {
            let nodes: Vec<NodeView> = client.get("/api/nodes").await?;
            match output {
                Output::Json => emit_json(&nodes),
                Output::Table => emit(&list_table(&nodes, crate::now_unix_ms())),
            }
        }
        NodeCommand::Status { name } => {
            let node: NodeView = client.get(&format!("/api/nodes/{name}")).await?;
            // Reachability of the runner is shown, not required: an offline node still has a status.
            let runner = client
                .get::<RunnerStatus>(&format!("/api/nodes/{name}/runner"))
                .await
                .map_err(|e| e.to_string());
            match output {
                Output::Json => emit_json(&serde_json::json!({
                    "node": node,
                    "runner_api": match &runner {
                        Ok(s) => serde_json::json!({"reachable": true, "version": s.version}),
                        Err(e) => serde_json::json!({"reachable": false, "error": e}),
                    },
                })),
                Output::Table => emit(&status_text(&node, &runner, crate::now_unix_ms())),
            }
        }
        NodeCommand::Overlay => {
            let o: OverlayView = client.get("/api/overlay").await?;
            match output {
                Output::Json => emit_json(&o),
                Output::Table => emit(&overlay_text(&o)),
            }
        }
        NodeCommand::Remove { name } => {
            let r: NodeRemoved = client.delete_json(&format!("/api/nodes/{name}")).await?;
            match output {
                Output::Json => emit_json(&r),
                Output::Table => emit(&removed_text(&r)),
            }
        }
        NodeCommand::JoinToken(JoinTokenCommand::Rotate { expires_in }) => {
            let body = serde_json::json!({
                "expires_in_ms": expires_in.map(|d| d.0.as_millis() as u64),
            });
            let t: JoinTokenView = client.post("/api/join-token", &body).await?;
            match output {
                Output::Json => emit_json(&t),
                Output::Table => emit(&format!(
                    "{}\n(written to {} on the host{})\n",
                    t.token,
                    t.file,
                    t.expires_at_unix_ms
                        .map(|e| format!("; expires in {}", ago_future(e, crate::now_unix_ms())))
                        .unwrap_or_default()
                )),
            }
        }
    }
    Ok(())
}

fn removed_text(r: &NodeRemoved) -> String {
    let mut out = format!(
        "node {} removed: its credential is revoked and its tasks ended; it registers again only with a new join token\n",
        r.node
    );
    if !r.vps_left.is_empty() {
        let ids: Vec<String> = r.vps_left.iter().map(u64::to_string).collect();
        out.push_str(&format!(
            "VPS {} keep their disks and snapshots on that machine; the cluster no longer reaches them \
             and never deletes them. To free the space, on that machine: \
             `ctr -n rivernode containers rm {}-task-ID` and `ctr -n rivernode images rm` of their \
             rivernode/snapshots/{}/vps-ID images (a VM's disk: its vm_store, /var/lib/libvirt/rivernode/vms/ by default)\n",
            ids.join(", "),
            r.node,
            r.node
        ));
    }
    out
}

fn overlay_text(o: &OverlayView) -> String {
    let Some(range) = &o.range else {
        return "no overlay: the host runs none (set overlay_range in its host.toml)\n".into();
    };
    let rows: Vec<Vec<String>> = o
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.node.clone(),
                n.subnet.clone(),
                n.underlay
                    .clone()
                    .unwrap_or_else(|| "- (its runner URL names no IPv4 address)".into()),
                n.state.as_str().to_string(),
                if n.in_mesh { "yes" } else { "no" }.to_string(),
            ]
        })
        .collect();
    format!(
        "overlay {range}, VXLAN id {} on UDP {}\n{}",
        o.vni,
        o.port,
        table(&["NODE", "SUBNET", "UNDERLAY", "STATE", "IN MESH"], &rows)
    )
}

/// `at` (in the future) as a duration from `now`.
fn ago_future(at: i64, now: i64) -> String {
    let s = (at - now).max(0) / 1000;
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

fn list_table(nodes: &[NodeView], now: i64) -> String {
    // The column of problems only when there is one.
    let problems = nodes.iter().any(|n| n.degraded.is_some());
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let inv = &n.inventory;
            let mut row = vec![
                n.name.clone(),
                n.state.as_str().to_string(),
                inv.cpu_count().to_string(),
                inv.numa_nodes.len().to_string(),
                bytes(inv.memory_total_bytes),
                inv.gpus.len().to_string(),
                ago(n.last_heartbeat_unix_ms, now),
            ];
            if problems {
                row.push(n.degraded.clone().unwrap_or_default());
            }
            row
        })
        .collect();
    let mut head = vec![
        "NAME",
        "STATE",
        "CPUS",
        "NUMA",
        "MEMORY",
        "GPUS",
        "HEARTBEAT",
    ];
    if problems {
        head.push("PROBLEM");
    }
    table(&head, &rows)
}

fn status_text(n: &NodeView, runner: &Result<RunnerStatus, String>, now: i64) -> String {
    let inv = &n.inventory;
    let mut out = String::new();
    let usage = n
        .usage
        .as_ref()
        .map(|u| {
            format!(
                "cpu {:.0}%, memory available {}, load {:.2}",
                u.cpu_percent,
                bytes(u.memory_available_bytes),
                u.load_1m
            )
        })
        .unwrap_or_else(|| "not reported yet".into());
    let runner = match runner {
        Ok(s) => format!("reachable (rivernode {})", s.version),
        Err(e) => format!("unreachable: {e}"),
    };
    let all_cpus: CpuList = inv.cpus.iter().map(|c| c.id).collect();
    let fields = [
        ("Name", n.name.clone()),
        (
            "State",
            match &n.degraded {
                Some(why) if n.state == crate::api::NodeState::Degraded => {
                    format!("degraded: {why}")
                }
                _ => n.state.as_str().to_string(),
            },
        ),
        ("Hostname", inv.hostname.clone()),
        ("Kernel", inv.kernel.clone()),
        ("Version", n.version.clone()),
        ("Runner API", format!("{} — {runner}", n.runner_url)),
        (
            "Heartbeat",
            format!(
                "{} (every {} ms)",
                ago(n.last_heartbeat_unix_ms, now),
                n.heartbeat_interval_ms
            ),
        ),
        (
            "CPUs",
            format!(
                "{} logical ({}), {} cores",
                inv.cpu_count(),
                all_cpus,
                inv.core_count()
            ),
        ),
        ("Memory", bytes(inv.memory_total_bytes)),
        ("Usage", usage),
    ];
    for (k, v) in fields {
        out.push_str(&format!("{:<12}{v}\n", format!("{k}:")));
    }
    out.push_str("\nNUMA nodes:\n");
    let numa_rows: Vec<Vec<String>> = inv
        .numa_nodes
        .iter()
        .map(|m| {
            let gpus = inv
                .gpus
                .iter()
                .filter(|g| g.numa_node == Some(m.id))
                .map(|g| g.address.to_string())
                .collect::<Vec<_>>()
                .join(",");
            vec![
                m.id.to_string(),
                if m.cpus.is_empty() {
                    "-".into()
                } else {
                    m.cpus.to_string()
                },
                bytes(m.memory_total_bytes),
                if gpus.is_empty() { "-".into() } else { gpus },
            ]
        })
        .collect();
    out.push_str(&indent(&table(
        &["NODE", "CPUS", "MEMORY", "GPUS"],
        &numa_rows,
    )));
    out.push_str("\nGPUs:\n");
    if inv.gpus.is_empty() {
        out.push_str("  none\n");
    } else {
        let rows: Vec<Vec<String>> = inv
            .gpus
            .iter()
            .map(|g| {
                let mut row = crate::cli::gpu::gpu_cells(g).to_vec();
                row.insert(3, g.uuid.clone().unwrap_or_else(|| "-".into()));
                row.push(crate::cli::gpu::state_text(
                    g.driver.as_deref(),
                    n.gpu_holders.get(&g.address).map(|id| format!("task {id}")),
                    None,
                ));
                row
            })
            .collect();
        out.push_str(&indent(&table(
            &[
                "ADDRESS",
                "ID",
                "NAME",
                "UUID",
                "DRIVER",
                "NUMA",
                "IOMMU GROUP",
                "STATE",
            ],
            &rows,
        )));
    }
    if !inv.warnings.is_empty() {
        out.push_str("\nWarnings:\n");
        for w in &inv.warnings {
            out.push_str(&format!("  {w}\n"));
        }
    }
    out
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::NodeState;
    use crate::topology::{collect, fake::FakeMachine};

    fn view() -> NodeView {
        let m = FakeMachine::two_socket_four_gpus();
        NodeView {
            name: "gpu1".into(),
            state: NodeState::Online,
            runner_url: "http://10.0.0.2:8001".into(),
            version: "0.1.0".into(),
            registered_at_unix_ms: 0,
            last_heartbeat_unix_ms: 1_000,
            heartbeat_interval_ms: 5_000,
            inventory: collect(&m.roots()).unwrap(),
            usage: None,
            degraded: None,
            gpu_holders: Default::default(),
        }
    }

    #[test]
    fn status_shows_numa_map_and_gpus_with_iommu_groups() {
        let mut v = view();
        v.gpu_holders.insert("0000:18:00.0".parse().unwrap(), 7);
        let text = status_text(&v, &Err("connection refused".into()), 4_000);
        let g18 = text.lines().find(|l| l.contains("0000:18:00.0  ")).unwrap();
        assert!(g18.ends_with("in use by task 7"), "{g18}");
        assert!(
            text.contains("CPUs:       8 logical (0-7), 4 cores"),
            "{text}"
        );
        assert!(
            text.contains("Heartbeat:  3s ago (every 5000 ms)"),
            "{text}"
        );
        assert!(text.contains("unreachable: connection refused"), "{text}");
        // NUMA node 1 holds cpus 2-3,6-7 and the GPUs at ca:00.0 and cb:00.0.
        let numa1 = text
            .lines()
            .find(|l| l.trim_start().starts_with("1 "))
            .unwrap();
        assert!(
            numa1.contains("2-3,6-7") && numa1.contains("0000:ca:00.0,0000:cb:00.0"),
            "{numa1}"
        );
        let g17 = text.lines().find(|l| l.contains("0000:17:00.0  ")).unwrap();
        assert!(g17.contains("10de:2330") && g17.contains("nvidia"), "{g17}");
        assert!(
            g17.contains("20 (+0000:17:00.1,0000:18:00.0,0000:18:00.1)"),
            "{g17}"
        );
        let gcb = text.lines().find(|l| l.contains("0000:cb:00.0  ")).unwrap();
        assert!(
            gcb.contains("vfio-pci") && gcb.contains("31 (+0000:cb:00.1)"),
            "{gcb}"
        );
        assert!(g17.ends_with("free (host driver nvidia)"), "{g17}");
    }

    #[test]
    fn list_has_one_row_per_node() {
        let text = list_table(&[view()], 3_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].starts_with("gpu1  online  8"), "{text}");
        assert!(
            lines[1].contains("64.0 GiB") && lines[1].ends_with("2s ago"),
            "{text}"
        );
    }
}

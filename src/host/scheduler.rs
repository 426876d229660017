//! Placement: given the nodes, what the ledger already holds, and a task's
//! request, decide where it runs (cores, memory and GPUs on one NUMA node
//! when possible), why it must wait, or why it can never run. A pure
//! function; the store calls it inside the transaction that records the result.

use std::collections::BTreeSet;

use crate::api::ports::{PortRange, Published};
use crate::api::{Kind, NodeState, NodeView, Placement, TaskSpec};
use crate::topology::{CpuList, Gpu, Inventory, PciAddress};
use crate::vfio::VFIO_DRIVER;

pub use crate::api::NODE_PORTS;

#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Place {
        placement: Placement,
        reason: String,
    },
    /// Fits the cluster, not right now.
    Wait(String),
    /// Can never run as asked (unknown node, NUMA node or GPU; more than exists).
    Refuse(String),
}

/// Resolves a GPU named in a target: index into the node's GPUs sorted by
/// PCI address, a PCI address, or a UUID.
fn resolve_gpu<'a>(inv: &'a Inventory, name: &str) -> Option<&'a Gpu> {
    let mut sorted: Vec<&Gpu> = inv.gpus.iter().collect();
    sorted.sort_by_key(|g| g.address);
    if let Ok(i) = name.parse::<usize>() {
        return sorted.get(i).copied();
    }
    if let Ok(a) = name.parse::<PciAddress>() {
        return sorted.into_iter().find(|g| g.address == a);
    }
    sorted.into_iter().find(|g| g.uuid.as_deref() == Some(name))
}

/// Checks what can never work, independent of the current load.
pub fn validate(spec: &TaskSpec, nodes: &[NodeView]) -> Result<(), String> {
    let needs_command = spec.kind == Kind::Command;
    if needs_command && (spec.command.is_empty() || spec.command[0].trim().is_empty()) {
        return Err("command: empty; give the command to run after --".into());
    }
    let Some(t) = &spec.target else {
        if nodes.is_empty() {
            return Err("no nodes are registered; start a runner first".into());
        }
        if nodes.iter().any(|n| fits_at_all(spec, &n.inventory)) {
            return Ok(());
        }
        return Err(never_fits(spec, nodes));
    };
    let node = nodes
        .iter()
        .find(|n| n.name == t.node)
        .ok_or_else(|| format!("target: no node named {:?}", t.node))?;
    let inv = &node.inventory;
    if let Some(numa) = t.numa {
        let n = inv
            .numa_nodes
            .iter()
            .find(|m| m.id == numa)
            .ok_or_else(|| format!("target: node {:?} has no NUMA node {numa}", t.node))?;
        if (n.cpus.len() as u32) < spec.cores {
            return Err(format!(
                "target: NUMA node {numa} of {:?} has only {} CPUs",
                t.node,
                n.cpus.len()
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for g in &t.gpus {
        let gpu = resolve_gpu(inv, g)
            .ok_or_else(|| format!("target: node {:?} has no GPU {g:?}", t.node))?;
        if !seen.insert(gpu.address) {
            return Err(format!("target: GPU {g:?} is named twice"));
        }
    }
    if spec.is_vm() && !inv.vms {
        return Err(format!(
            "target: node {:?} cannot run VMs (its runner does not reach libvirt, or it has no /dev/kvm; `rivernode vm check` on it says why)",
            t.node
        ));
    }
    if !fits_at_all(spec, inv) {
        return Err(format!(
            "target: node {:?} is too small for {} cores, {} GPUs and this memory",
            t.node, spec.cores, spec.gpu_count
        ));
    }
    Ok(())
}

/// Why no node could ever take `spec`: the first resource no node has enough of.
fn never_fits(spec: &TaskSpec, nodes: &[NodeView]) -> String {
    let most =
        |f: &dyn Fn(&Inventory) -> u64| nodes.iter().map(|n| f(&n.inventory)).max().unwrap_or(0);
    if spec.is_vm() && !nodes.iter().any(|n| n.inventory.vms) {
        return "image.vm_image: no node runs VMs (no runner reaches libvirt with KVM; `rivernode vm check` on a node says why)".into();
    }
    let gpus = most(&|i| i.gpus.len() as u64);
    let cores = most(&|i| i.cpus.len() as u64);
    if u64::from(spec.gpu_count) > gpus {
        return format!(
            "gpu_count: no node has {} GPUs (the most any node has is {gpus})",
            spec.gpu_count
        );
    }
    if u64::from(spec.cores) > cores {
        return format!(
            "cores: no node has {} cores (the most any node has is {cores})",
            spec.cores
        );
    }
    let mem = most(&|i| i.memory_for_instances());
    if spec.memory_bytes.is_some_and(|m| m > mem) {
        return format!(
            "memory_bytes: no node gives instances {} bytes of memory (the most any node gives is {mem})",
            spec.memory_bytes.unwrap_or(0)
        );
    }
    format!(
        "no single node has {} cores, {} GPUs and this memory together",
        spec.cores, spec.gpu_count
    )
}

/// The GPUs a request asks for: those its target names, else its count.
pub fn gpus_asked(spec: &TaskSpec) -> u32 {
    spec.target
        .as_ref()
        .map(|t| t.gpus.len() as u32)
        .filter(|n| *n > 0)
        .unwrap_or(spec.gpu_count)
}

fn fits_at_all(spec: &TaskSpec, inv: &Inventory) -> bool {
    let gpus = gpus_asked(spec);
    (inv.vms || !spec.is_vm())
        && inv.cpus.len() as u32 >= spec.cores
        && spec
            .memory_bytes
            .is_none_or(|m| m <= inv.memory_for_instances())
        && inv.gpus.len() as u32 >= gpus
}

/// The memory a task that names none gets on `inv`: the node's memory
/// (less what it holds back for itself) in
/// proportion to the larger of its share of the cores and of the GPUs (as
/// Vast.ai sizes an instance). It is both its limit and its reservation, so
/// a task without `--memory` can neither take the node's memory from the
/// others nor be placed where its share is already taken.
pub fn memory_share(spec: &TaskSpec, inv: &Inventory) -> u64 {
    let share = |asked: u64, of: u64| if of == 0 { (0, 1) } else { (asked.min(of), of) };
    // A task on shared cores (`-c 0`) counts as one core here: it gets a
    // share, not the node.
    let (c, cn) = share(u64::from(spec.cores.max(1)), inv.cpus.len() as u64);
    let (g, gn) = share(u64::from(spec.gpu_count), inv.gpus.len() as u64);
    // The larger fraction of c/cn and g/gn, compared without rounding.
    let (n, d) = if u128::from(c) * u128::from(gn) >= u128::from(g) * u128::from(cn) {
        (c, cn)
    } else {
        (g, gn)
    };
    (u128::from(inv.memory_for_instances()) * u128::from(n) / u128::from(d)) as u64
}

/// What of a request decides where it can go (not its command, image or
/// variables): within one scheduling pass, where room only shrinks, a
/// request of the same shape as one that had to wait waits too, for the
/// same reason, and is not weighed against every node again.
pub fn shape(spec: &TaskSpec) -> String {
    serde_json::json!([
        spec.kind,
        spec.is_vm(),
        spec.cores,
        spec.memory_bytes,
        spec.gpu_count,
        spec.target,
        spec.no_ssh,
        spec.ports.len(),
    ])
    .to_string()
}

/// What a queued VPS that cannot start on its own node asks for instead,
/// if it may move: made `--movable`, queued again by a plain restart (not
/// from a snapshot of its node) and its last stop parked on the host. Then
/// it goes to any node, from that copy (as `vps restart --anywhere`).
pub fn moved_spec(t: &crate::api::TaskView, now_ms: i64) -> Option<TaskSpec> {
    let snapshot = t.parked.as_ref()?;
    if t.spec.kind != Kind::Vps || t.spec.is_vm() || !t.spec.movable || t.spec.restore.is_some() {
        return None;
    }
    t.placement.as_ref()?;
    let mut spec = t.spec.clone();
    spec.target = None;
    spec.restore = Some(crate::api::Restore {
        snapshot: snapshot.clone(),
        request: now_ms,
        parked: true,
        from: None,
    });
    Some(spec)
}

/// Decides for one task. `reserved` holds every placement of every non-final task.
pub fn place(spec: &TaskSpec, nodes: &[NodeView], reserved: &[Placement]) -> Decision {
    if let Err(e) = validate(spec, nodes) {
        return Decision::Refuse(e);
    }
    let mut why_not = Vec::new();
    let candidates: Vec<&NodeView> = match &spec.target {
        Some(t) => nodes.iter().filter(|n| n.name == t.node).collect(),
        None => nodes.iter().collect(),
    };
    for node in candidates {
        match node.state {
            NodeState::Online => {}
            NodeState::Offline => {
                why_not.push(format!("{}: offline", node.name));
                continue;
            }
            NodeState::Degraded => {
                let why = node.degraded.as_deref().unwrap_or("cannot start instances");
                why_not.push(format!("{}: degraded ({why})", node.name));
                continue;
            }
        }
        match place_on(spec, node, reserved) {
            Ok(d) => return d,
            Err(reason) => why_not.push(format!("{}: {reason}", node.name)),
        }
    }
    Decision::Wait(format!("waiting for resources: {}", why_not.join("; ")))
}

fn place_on(spec: &TaskSpec, node: &NodeView, reserved: &[Placement]) -> Result<Decision, String> {
    let inv = &node.inventory;
    if spec.is_vm() && !inv.vms {
        return Err("runs no VMs (its runner does not reach libvirt, or no /dev/kvm)".into());
    }
    let mine: Vec<&Placement> = reserved.iter().filter(|p| p.node == node.name).collect();
    let used_cpus: BTreeSet<u32> = mine.iter().flat_map(|p| p.cpus.iter()).collect();
    let used_gpus: BTreeSet<PciAddress> =
        mine.iter().flat_map(|p| p.gpus.iter().copied()).collect();
    let used_mem: u64 = mine.iter().map(|p| p.memory_bytes).sum();
    let memory = spec.memory_bytes.unwrap_or_else(|| memory_share(spec, inv));
    // A node port carries SSH (a VPS without an SSH server needs none) and
    // one more carries each published port.
    let ssh = spec.kind == Kind::Vps && !spec.no_ssh;
    let wanted = usize::from(ssh) + spec.ports.len();
    let node_ports: Vec<u16> = free_node_ports(mine.iter().copied()).take(wanted).collect();
    if node_ports.len() < wanted {
        return Err(format!(
            "{} of the {wanted} node ports it needs are free",
            node_ports.len()
        ));
    }
    let node_port = ssh.then(|| node_ports[0]);
    // The external ports are the host's to give (`give_external`), after
    // the node is chosen.
    let published: Vec<Published> = spec
        .ports
        .iter()
        .zip(&node_ports[usize::from(ssh)..])
        .map(|(r, &node_port)| Published {
            request: r.port,
            proto: r.proto,
            internal: if r.is_identity() { 0 } else { r.port as u16 },
            node_port,
            external: 0,
        })
        .collect();
    let free_cpus: Vec<u32> = inv
        .cpus
        .iter()
        .map(|c| c.id)
        .filter(|c| !used_cpus.contains(c))
        .collect();
    // Tasks on shared cores (`-c 0`, no cpus of their own) run on the
    // node's unreserved cores, so while one is here at least one core
    // stays unreserved.
    let shared_here = mine.iter().any(|p| p.cpus.is_empty());
    if spec.cores == 0 && free_cpus.is_empty() {
        return Err("no unreserved core to share".into());
    }
    if spec.cores > 0 && shared_here && free_cpus.len() as u32 <= spec.cores {
        return Err(format!(
            "{} of {} cores free, and one stays unreserved for the tasks on shared cores here",
            free_cpus.len(),
            spec.cores
        ));
    }
    if (free_cpus.len() as u32) < spec.cores {
        return Err(format!("{} of {} cores free", free_cpus.len(), spec.cores));
    }
    let free_mem = inv.memory_for_instances().saturating_sub(used_mem);
    if memory > free_mem {
        return Err(format!("{free_mem} of {memory} bytes of memory free"));
    }
    let usable_gpu =
        |g: &&Gpu| !used_gpus.contains(&g.address) && g.driver.as_deref() != Some(VFIO_DRIVER);

    // GPUs: the named ones, or a set on one NUMA node with enough free cores.
    let target = spec.target.as_ref();
    let gpus: Vec<&Gpu> = match target.filter(|t| !t.gpus.is_empty()) {
        Some(t) => {
            let named: Vec<&Gpu> = t.gpus.iter().filter_map(|g| resolve_gpu(inv, g)).collect();
            if let Some(busy) = named.iter().find(|g| !usable_gpu(g)) {
                return Err(if busy.driver.as_deref() == Some(VFIO_DRIVER) {
                    format!("GPU {} is bound to vfio-pci", busy.address)
                } else {
                    format!("GPU {} is in use", busy.address)
                });
            }
            named
        }
        None if spec.gpu_count == 0 => Vec::new(),
        None => {
            let free: Vec<&Gpu> = inv.gpus.iter().filter(usable_gpu).collect();
            if (free.len() as u32) < spec.gpu_count {
                let vfio = inv
                    .gpus
                    .iter()
                    .filter(|g| g.driver.as_deref() == Some(VFIO_DRIVER))
                    .count();
                return Err(format!(
                    "{} of {} GPUs free{}",
                    free.len(),
                    spec.gpu_count,
                    if vfio > 0 {
                        format!(" ({vfio} on vfio-pci)")
                    } else {
                        String::new()
                    }
                ));
            }
            let n = spec.gpu_count as usize;
            let numa_with_room = |numa: Option<u32>| {
                let on: Vec<&Gpu> = free
                    .iter()
                    .copied()
                    .filter(|g| g.numa_node == numa)
                    .collect();
                let cpus_free = free_cpus
                    .iter()
                    .filter(|c| {
                        inv.cpus
                            .iter()
                            .any(|x| x.id == **c && Some(x.numa_node) == numa)
                    })
                    .count();
                (on.len() >= n && cpus_free >= spec.cores as usize).then(|| on[..n].to_vec())
            };
            inv.numa_nodes
                .iter()
                .filter(|m| target.and_then(|t| t.numa).is_none_or(|t| t == m.id))
                .find_map(|m| numa_with_room(Some(m.id)))
                .unwrap_or_else(|| free[..n].to_vec())
        }
    };
    let gpu_numa: BTreeSet<Option<u32>> = gpus.iter().map(|g| g.numa_node).collect();

    if spec.cores == 0 {
        // No cores of its own: memory stays on the target's NUMA node, if one is named.
        let numa = target.and_then(|t| t.numa);
        let reason = format!(
            "placed on {} on shared cores (the node's unreserved ones){}",
            node.name,
            numa.map(|n| format!(", memory on NUMA node {n}"))
                .unwrap_or_default()
        );
        return Ok(Decision::Place {
            placement: Placement {
                node: node.name.clone(),
                numa,
                cpus: CpuList::default(),
                memory_bytes: memory,
                gpus: gpus.iter().map(|g| g.address).collect(),
                node_port,
                published: published.clone(),
            },
            reason,
        });
    }

    // NUMA node for the cores: the target's, the GPUs', else any with room.
    let numa_order: Vec<u32> = match target.and_then(|t| t.numa) {
        Some(n) => vec![n],
        None => match gpu_numa.iter().next() {
            Some(Some(n)) if gpu_numa.len() == 1 => vec![*n],
            _ => inv.numa_nodes.iter().map(|m| m.id).collect(),
        },
    };
    let pick = |pool: Vec<u32>| -> CpuList {
        // Sibling hyperthreads next to each other, so a task gets whole cores first.
        let mut pool: Vec<(u32, u32, u32)> = pool
            .into_iter()
            .filter_map(|c| {
                inv.cpus
                    .iter()
                    .find(|x| x.id == c)
                    .map(|x| (x.package_id, x.core_id, x.id))
            })
            .collect();
        pool.sort_unstable();
        pool.into_iter()
            .take(spec.cores as usize)
            .map(|(_, _, id)| id)
            .collect()
    };
    for numa in &numa_order {
        let pool: Vec<u32> = free_cpus
            .iter()
            .copied()
            .filter(|c| inv.cpus.iter().any(|x| x.id == *c && x.numa_node == *numa))
            .collect();
        // Its share of what the node gives instances (the node holds the
        // rest back for itself).
        let numa_mem = inv
            .numa_nodes
            .iter()
            .find(|m| m.id == *numa)
            .map(|m| {
                (u128::from(m.memory_total_bytes) * u128::from(inv.memory_for_instances())
                    / u128::from(inv.memory_total_bytes.max(1))) as u64
            })
            .unwrap_or(0);
        let numa_used: u64 = mine
            .iter()
            .filter(|p| p.numa == Some(*numa))
            .map(|p| p.memory_bytes)
            .sum();
        if pool.len() as u32 >= spec.cores && memory <= numa_mem.saturating_sub(numa_used) {
            let cpus = pick(pool);
            let gpu_note = if gpus.is_empty() {
                String::new()
            } else {
                let same = gpus.iter().all(|g| g.numa_node == Some(*numa));
                format!(
                    ", GPUs {}{}",
                    gpus.iter()
                        .map(|g| g.address.to_string())
                        .collect::<Vec<_>>()
                        .join(","),
                    if same {
                        " on the same NUMA node"
                    } else {
                        " (on another NUMA node)"
                    }
                )
            };
            let reason = format!(
                "placed on {} NUMA node {numa}: cpus {cpus}{gpu_note}",
                node.name
            );
            return Ok(Decision::Place {
                placement: Placement {
                    node: node.name.clone(),
                    numa: Some(*numa),
                    cpus,
                    memory_bytes: memory,
                    gpus: gpus.iter().map(|g| g.address).collect(),
                    node_port,
                    published: published.clone(),
                },
                reason,
            });
        }
    }
    if target.and_then(|t| t.numa).is_some() {
        return Err(format!(
            "NUMA node {} lacks free cores or memory",
            numa_order[0]
        ));
    }
    // No single NUMA node has room: spread over several.
    let cpus = pick(free_cpus);
    let reason = format!(
        "placed on {} across NUMA nodes (no single node had room): cpus {cpus}",
        node.name
    );
    Ok(Decision::Place {
        placement: Placement {
            node: node.name.clone(),
            numa: None,
            cpus,
            memory_bytes: memory,
            gpus: gpus.iter().map(|g| g.address).collect(),
            node_port,
            published,
        },
        reason,
    })
}

/// The node ports no placement of `held` (all on one node) holds, lowest first.
pub fn free_node_ports<'a>(
    held: impl IntoIterator<Item = &'a Placement>,
) -> impl Iterator<Item = u16> {
    let used: BTreeSet<u16> = held.into_iter().flat_map(Placement::node_ports).collect();
    (NODE_PORTS.0..=NODE_PORTS.1).filter(move |p| !used.contains(p))
}

/// Gives each published port of `placement` an external port of `range`
/// that `held` lacks: the one it had before (`previous`, so that a VPS
/// keeps its addresses, and the `VAST_*_PORT_*` its container was made
/// with stay true), else one from a point of the range picked by `seed`, so
/// that a port just given back is not the next one handed out (a client
/// still using it would reach another instance). An identity request
/// listens inside on its external port.
pub fn give_external(
    placement: &mut Placement,
    previous: &[Published],
    held: &BTreeSet<u16>,
    range: PortRange,
    seed: u64,
) -> Result<(), String> {
    let mut taken = held.clone();
    // First the ports each had (so that a new pick cannot take one of them).
    for p in &mut placement.published {
        let before = previous
            .iter()
            .find(|q| q.request == p.request && q.proto == p.proto)
            .map(|q| q.external)
            .filter(|e| range.contains(*e) && !taken.contains(e));
        p.external = before.unwrap_or(0);
        taken.extend(before);
    }
    let size = u64::from(range.last - range.first) + 1;
    let mut next = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) % size;
    for p in placement.published.iter_mut().filter(|p| p.external == 0) {
        let found = (0..size)
            .map(|i| range.first + ((next + i) % size) as u16)
            .find(|e| !taken.contains(e))
            .ok_or_else(|| format!("no free published port in {range}"))?;
        next = u64::from(found - range.first) + 1;
        taken.insert(found);
        p.external = found;
    }
    for p in &mut placement.published {
        if p.internal == 0 {
            p.internal = p.external;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ImageSource, Target};

    #[test]
    fn requests_that_differ_only_in_what_they_run_have_one_shape() {
        let a = spec(2, 1, None);
        let mut b = spec(2, 1, None);
        b.command = vec!["python".into(), "train.py".into()];
        b.env.insert("K".into(), "V".into());
        assert_eq!(shape(&a), shape(&b));
        for other in [
            spec(3, 1, None),
            spec(2, 2, None),
            spec(2, 1, Some("n1::0")),
        ] {
            assert_ne!(shape(&a), shape(&other), "{other:?}");
        }
        let mut vps = spec(2, 1, None);
        vps.kind = Kind::Vps;
        assert_ne!(shape(&a), shape(&vps));
    }

    fn node(name: &str) -> NodeView {
        crate::api::test_node(name, "http://127.0.0.1:1")
    }

    fn spec(cores: u32, gpus: u32, target: Option<&str>) -> TaskSpec {
        TaskSpec {
            command: vec!["true".into()],
            env: Default::default(),
            mounts: vec![],
            image: ImageSource::Environment("base".into()),
            cores,
            memory_bytes: Some(1 << 30),
            gpu_count: gpus,
            target: target.map(|t| t.parse::<Target>().unwrap()),
            kind: Kind::Command,
            ssh_keys: vec![],
            ssh_password_hash: None,
            privileged: false,
            restore: None,
            movable: false,
            no_ssh: false,
            shm_bytes: None,
            vm_disk_bytes: None,
            onstart: None,
            args: vec![],
            ports: vec![],
            jupyter: false,
            no_network: false,
            hostname: None,
        }
    }

    fn placed(d: Decision) -> Placement {
        match d {
            Decision::Place { placement, .. } => placement,
            other => panic!("not placed: {other:?}"),
        }
    }

    #[test]
    fn what_a_node_holds_back_for_itself_is_never_placed() {
        let mut n = node("a");
        let total = n.inventory.memory_total_bytes;
        let mut s = spec(1, 0, None);
        s.memory_bytes = None;
        let whole = memory_share(&s, &n.inventory);
        n.inventory.memory_reserved_bytes = total / 2;
        assert_eq!(memory_share(&s, &n.inventory), whole / 2);
        // More than the node gives instances: refused, though it has it.
        s.memory_bytes = Some(total / 4 * 3);
        match place(&s, std::slice::from_ref(&n), &[]) {
            Decision::Refuse(e) => assert!(e.contains("gives instances"), "{e}"),
            other => panic!("{other:?}"),
        }
        // Within it: placed.
        s.memory_bytes = Some(total / 4);
        assert!(
            matches!(
                place(&s, std::slice::from_ref(&n), &[]),
                Decision::Place { .. }
            ),
            "a quarter fits in the half it gives"
        );
    }

    #[test]
    fn without_memory_a_task_gets_its_share_of_the_node() {
        let n = node("a");
        let inv = &n.inventory;
        let (cpus, gpus, mem) = (
            inv.cpus.len() as u64,
            inv.gpus.len() as u64,
            inv.memory_total_bytes,
        );
        let mut s = spec(2, 0, None);
        s.memory_bytes = None;
        assert_eq!(memory_share(&s, inv), mem * 2 / cpus);
        // The GPU share wins when it is the larger one.
        s.gpu_count = 2;
        assert_eq!(memory_share(&s, inv), mem * 2 / gpus);
        // Placed, it is reserved: as many such tasks as the node has room
        // for by memory, and the next waits although cores are free.
        let mut s = spec(1, 0, None);
        s.memory_bytes = None;
        let mut reserved = vec![];
        for _ in 0..cpus {
            match place(&s, std::slice::from_ref(&n), &reserved) {
                Decision::Place { placement, .. } => {
                    assert_eq!(placement.memory_bytes, mem / cpus);
                    reserved.push(placement)
                }
                other => panic!("{other:?}"),
            }
        }
        let mut big = spec(1, 0, None);
        big.memory_bytes = Some(mem / cpus + cpus);
        reserved.pop();
        assert!(matches!(
            place(&big, std::slice::from_ref(&n), &reserved),
            Decision::Wait(_)
        ));
    }

    #[test]
    fn gpus_cores_and_memory_on_one_numa_node() {
        let nodes = [node("n1")];
        // Three of the fake's four GPUs are usable (0000:cb:00.0 sits on vfio-pci).
        let p = placed(place(&spec(2, 2, None), &nodes, &[]));
        assert_eq!(p.numa, Some(0));
        assert_eq!(p.gpus.len(), 2);
        assert!(
            p.cpus.iter().all(|c| [0, 1, 4, 5].contains(&c)),
            "{}",
            p.cpus
        );
        // Hyperthread siblings together: cpus 0 and 4 are one core.
        assert_eq!(p.cpus.to_string(), "0,4");
        let q = placed(place(&spec(2, 1, None), &nodes, std::slice::from_ref(&p)));
        assert_eq!(
            (q.numa, q.gpus[0].to_string().as_str()),
            (Some(1), "0000:ca:00.0")
        );
        let r = place(&spec(1, 1, None), &nodes, &[p, q]);
        assert!(
            matches!(&r, Decision::Wait(w) if w.contains("0 of 1 GPUs free")),
            "{r:?}"
        );
    }

    #[test]
    fn targets_are_honoured_or_refused() {
        let nodes = [node("n1")];
        let p = placed(place(&spec(1, 0, Some("n1:1::0000:ca:00.0")), &nodes, &[]));
        assert_eq!(
            (p.numa, p.gpus[0].to_string().as_str()),
            (Some(1), "0000:ca:00.0")
        );
        let p = placed(place(&spec(1, 0, Some("n1::1")), &nodes, &[]));
        assert_eq!(
            p.gpus[0].to_string(),
            "0000:18:00.0",
            "index 1 in PCI address order"
        );
        for (t, want) in [
            ("n9", "no node named"),
            ("n1:7", "no NUMA node 7"),
            ("n1::9", "no GPU \"9\""),
            ("n1::0000:99:00.0", "no GPU"),
            ("n1::0,0", "named twice"),
        ] {
            match place(&spec(1, 0, Some(t)), &nodes, &[]) {
                Decision::Refuse(e) => assert!(e.contains(want), "{t}: {e}"),
                other => panic!("{t}: {other:?}"),
            }
        }
        let busy = place(&spec(1, 0, Some("n1::0000:cb:00.0")), &nodes, &[]);
        assert!(
            matches!(&busy, Decision::Wait(w) if w.contains("0000:cb:00.0 is bound to vfio-pci")),
            "vfio-bound GPU: {busy:?}"
        );
    }

    #[test]
    fn what_no_node_could_ever_give_is_refused_naming_it() {
        let nodes = [node("n1")];
        for (s, want) in [
            (
                spec(1, 5, None),
                "gpu_count: no node has 5 GPUs (the most any node has is 4)",
            ),
            (spec(99, 0, None), "cores: no node has 99 cores"),
            (
                TaskSpec {
                    memory_bytes: Some(1 << 50),
                    ..spec(1, 0, None)
                },
                "memory_bytes: no node gives instances",
            ),
        ] {
            match place(&s, &nodes, &[]) {
                Decision::Refuse(e) => assert!(e.contains(want), "{e}"),
                other => panic!("{want}: {other:?}"),
            }
        }
        match place(&spec(1, 5, Some("n1")), &nodes, &[]) {
            Decision::Refuse(e) => assert!(e.contains("too small"), "{e}"),
            other => panic!("a node target with --gpus 5: {other:?}"),
        }
        // Four GPUs exist, one is on vfio-pci: four wait (it may come back), saying why.
        match place(&spec(1, 4, None), &nodes, &[]) {
            Decision::Wait(w) => assert!(w.contains("3 of 4 GPUs free (1 on vfio-pci)"), "{w}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn full_node_tasks_queue_one_after_the_other() {
        let nodes = [node("n1")];
        let first = placed(place(&spec(8, 0, None), &nodes, &[]));
        assert_eq!(first.cpus.len(), 8);
        assert_eq!(first.numa, None, "8 cores span both NUMA nodes");
        match place(&spec(8, 0, None), &nodes, &[first]) {
            Decision::Wait(w) => assert!(w.contains("0 of 8 cores free"), "{w}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            place(&spec(8, 0, None), &nodes, &[]),
            Decision::Place { .. }
        ));
        assert!(matches!(
            place(&spec(9, 0, None), &nodes, &[]),
            Decision::Refuse(_)
        ));
    }

    #[test]
    fn instances_get_distinct_node_ports() {
        let nodes = [node("n1")];
        let mut vps = spec(1, 0, None);
        vps.kind = Kind::Vps;
        let a = placed(place(&vps, &nodes, &[]));
        let b = placed(place(&vps, &nodes, std::slice::from_ref(&a)));
        assert_eq!((a.node_port, b.node_port), (Some(30000), Some(30001)));
        assert_eq!(
            placed(place(&spec(1, 0, None), &nodes, &[])).node_port,
            None,
            "commands get none"
        );
    }

    #[test]
    fn published_ports_get_node_ports_beside_ssh_and_keep_their_external_ports() {
        use crate::api::ports::{PortRequest, Proto};
        let nodes = [node("n1")];
        let mut vps = spec(1, 0, None);
        vps.kind = Kind::Vps;
        vps.ports = vec![
            PortRequest::parse("8081:8081").unwrap(),
            PortRequest::parse("8082/udp").unwrap(),
            PortRequest::parse("70000:70000").unwrap(),
        ];
        let first = placed(place(&vps, &nodes, &[]));
        let mut a = placed(place(&vps, &nodes, std::slice::from_ref(&first)));
        // 30000-30003 are the first's: SSH and its three.
        assert_eq!(a.node_port, Some(30004));
        let node_ports: Vec<u16> = a.published.iter().map(|p| p.node_port).collect();
        assert_eq!(node_ports, [30005, 30006, 30007]);
        assert_eq!(a.published[1].proto, Proto::Udp);
        let range = PortRange::parse("20000-20009").unwrap();
        let held: BTreeSet<u16> = [20000, 20005].into();
        give_external(&mut a, &[], &held, range, 5).unwrap();
        let ext: Vec<u16> = a.published.iter().map(|p| p.external).collect();
        assert!(
            ext.iter().all(|e| range.contains(*e) && !held.contains(e)),
            "{ext:?}"
        );
        assert_eq!(
            ext.iter().collect::<BTreeSet<_>>().len(),
            3,
            "distinct: {ext:?}"
        );
        assert_eq!(a.published[0].internal, 8081);
        assert_eq!(a.published[2].internal, a.published[2].external, "identity");
        // Placed again (a restart): the same external ports, unless taken.
        let previous = a.published.clone();
        let mut again = placed(place(&vps, &nodes, &[]));
        let taken: BTreeSet<u16> = [previous[1].external].into();
        give_external(&mut again, &previous, &taken, range, 99).unwrap();
        assert_eq!(again.published[0].external, previous[0].external);
        assert_ne!(again.published[1].external, previous[1].external);
        assert_eq!(again.published[2].external, previous[2].external);
        // A full range: the task waits, saying so.
        let full: BTreeSet<u16> = (20000..=20008).collect();
        assert!(give_external(&mut again, &[], &full, range, 1)
            .unwrap_err()
            .contains("no free published port in 20000-20009"));
        // Node ports run out: it says how many it needs.
        let hog = Placement {
            published: (30000..=32767)
                .map(|n| Published {
                    request: 1,
                    proto: Proto::Tcp,
                    internal: 1,
                    node_port: n,
                    external: 1,
                })
                .collect(),
            ..first
        };
        match place(&vps, &nodes, &[hog]) {
            Decision::Wait(w) => assert!(w.contains("0 of the 4 node ports"), "{w}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shared_cores_take_none_and_always_leave_one_unreserved() {
        let n = node("n1");
        let all = n.inventory.cpus.len() as u32;
        let mut shared = spec(0, 0, None);
        shared.memory_bytes = None;
        let s = placed(place(&shared, std::slice::from_ref(&n), &[]));
        assert!(s.cpus.is_empty() && s.numa.is_none(), "{s:?}");
        assert_eq!(
            s.memory_bytes,
            memory_share(&spec(1, 0, None), &n.inventory),
            "a memory share of one core, not the node"
        );
        let on = |t: &TaskSpec, beside: &Placement| {
            place(t, std::slice::from_ref(&n), std::slice::from_ref(beside))
        };
        let waits = |d: Decision, why: &str| match d {
            Decision::Wait(w) => assert!(w.contains(why), "{w}"),
            other => panic!("not waiting: {other:?}"),
        };
        // Beside it an exclusive task gets every core but one.
        waits(on(&spec(all, 0, None), &s), "one stays unreserved");
        let big = placed(on(&spec(all - 1, 0, None), &s));
        // With every core reserved, a shared task waits.
        let full = placed(place(&spec(all, 0, None), std::slice::from_ref(&n), &[]));
        waits(on(&shared, &full), "no unreserved core");
        // A named NUMA node keeps its memory there.
        let on1 = placed(place(
            &spec(0, 0, Some("n1:1")),
            std::slice::from_ref(&n),
            &[big],
        ));
        assert_eq!(on1.numa, Some(1));
    }

    #[test]
    fn a_degraded_node_gets_nothing_and_the_wait_says_why() {
        let mut sick = node("n1");
        sick.state = NodeState::Degraded;
        sick.degraded = Some("containerd at /run/c.sock does not answer".into());
        let d = place(&spec(1, 0, None), std::slice::from_ref(&sick), &[]);
        assert!(
            matches!(&d, Decision::Wait(w) if w.contains("n1: degraded (containerd at /run/c.sock")),
            "{d:?}"
        );
        // A healthy node next to it takes the task.
        assert_eq!(
            placed(place(&spec(1, 0, None), &[sick, node("n2")], &[])).node,
            "n2"
        );
    }

    #[test]
    fn vms_go_only_to_nodes_that_run_them() {
        let mut vm = spec(1, 0, None);
        vm.kind = Kind::Vps;
        vm.image = ImageSource::VmImage("debian".into());
        let plain = node("n1");
        let mut kvm = node("n2");
        kvm.inventory.vms = true;
        let d = place(&vm, std::slice::from_ref(&plain), &[]);
        assert!(
            matches!(&d, Decision::Refuse(r) if r.starts_with("image.vm_image: no node runs VMs")),
            "{d:?}"
        );
        assert_eq!(placed(place(&vm, &[plain.clone(), kvm], &[])).node, "n2");
        vm.target = Some("n1".parse().unwrap());
        let d = place(&vm, std::slice::from_ref(&plain), &[]);
        assert!(
            matches!(&d, Decision::Refuse(r) if r.contains("node \"n1\" cannot run VMs")),
            "{d:?}"
        );
        // A container VPS does not care.
        let mut ctr = spec(1, 0, Some("n1"));
        ctr.kind = Kind::Vps;
        assert_eq!(placed(place(&ctr, &[plain], &[])).node, "n1");
    }

    #[test]
    fn offline_nodes_and_empty_commands() {
        let mut n = node("n1");
        n.state = NodeState::Offline;
        assert!(
            matches!(place(&spec(1, 0, None), &[n], &[]), Decision::Wait(w) if w.contains("offline"))
        );
        let mut s = spec(1, 0, None);
        s.command.clear();
        assert!(
            matches!(place(&s, &[node("n1")], &[]), Decision::Refuse(e) if e.contains("command"))
        );
        assert!(
            matches!(place(&spec(1, 0, None), &[], &[]), Decision::Refuse(e) if e.contains("no nodes"))
        );
    }
}

//! Two nodes joined by a VXLAN overlay, made with rivernode's own network
//! code on the real kernel: each node a network namespace with its bridge,
//! instance namespaces and nftables table, the two joined by a veth (the
//! underlay). Instances `a1` (node 1) and `a2` (node 2) belong to one
//! owner (group 1), `b2` (node 2) to another (group 2).
//!
//! Call `build` on a thread already in private network and mount
//! namespaces. Self-contained, so `benches/overlay.rs` uses it too.
#![allow(dead_code)] // each user takes a part

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rivernode::api::{OverlayPeer, OverlayPlan};
use rivernode::net::{Firewall, Ipam, Ipv4Net, NodeNetwork, NodeOverlay};

pub const UNDERLAY: [&str; 2] = ["192.0.2.1", "192.0.2.2"];
pub const SUBNETS: [&str; 2] = ["10.200.0.0/24", "10.200.1.0/24"];

pub struct Node {
    pub netns: PathBuf,
    pub network: Arc<NodeNetwork>,
}

pub struct Instance {
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
}

pub struct Pair {
    pub nodes: [Node; 2],
    pub a1: Instance,
    pub a2: Instance,
    pub b2: Instance,
}

/// Runs `f` on a thread inside the network namespace at `ns`.
pub fn in_ns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&ns).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// Runs `f` with a netlink handle, in the namespace at `ns`.
pub fn with_netlink<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce(rtnetlink::Handle) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
) -> T {
    in_ns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let h = rivernode::net::link::connect().unwrap();
            f(h).await
        })
    })
}

fn ip(args: &[&str]) {
    let o = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The plan the host would give node `i` (0 or 1).
pub fn plan(i: usize) -> OverlayPlan {
    let other = 1 - i;
    OverlayPlan {
        vni: 4242,
        port: 4789,
        range: Some("10.200.0.0/16".into()),
        subnet: SUBNETS[i].into(),
        underlay: UNDERLAY[i].into(),
        peers: vec![OverlayPeer {
            node: format!("n{}", other + 1),
            underlay: UNDERLAY[other].into(),
            subnet: SUBNETS[other].into(),
        }],
    }
}

fn node_network(dir: &Path, i: usize) -> NodeNetwork {
    let subnet: Ipv4Net = SUBNETS[i].parse().unwrap();
    let state = dir.join(format!("n{}", i + 1));
    NodeNetwork {
        bridge: "rvo0".into(),
        sysctl_dir: "/proc/sys".into(),
        netns_dir: state.join("netns"),
        ipam: Ipam::new(&state.join("ipam.json"), subnet),
        firewall: Firewall {
            nft: "nft".into(),
            table: "rivernode".into(),
            bridge: "rvo0".into(),
            subnet,
            protected_ports: vec![],
            runner_ports: vec![],
            port_maps: vec![],
            node_port_sources: vec![],
            isolate_instances: true,
            instances: vec![],
            blocked_networks: vec![],
            instance_api: None,
            overlay: None,
        },
        isolate_instances: true,
        instance_api: None,
        overlay: NodeOverlay::new("rn-overlay", &state.join("overlay-groups.json")),
    }
}

/// Builds both nodes, their underlay, the instances and the mesh.
pub fn build(dir: &Path) -> Pair {
    let ns_dir = dir.join("nodes");
    let n1 = rivernode::net::link::create_netns(&ns_dir, "n1").unwrap();
    let n2 = rivernode::net::link::create_netns(&ns_dir, "n2").unwrap();
    // The underlay: one veth, an end in each node.
    ip(&[
        "link", "add", "rvu1", "type", "veth", "peer", "name", "rvu2",
    ]);
    for (end, ns, addr) in [("rvu1", &n1, UNDERLAY[0]), ("rvu2", &n2, UNDERLAY[1])] {
        let (end, addr) = (end.to_string(), addr.to_string());
        // `ip` takes a namespace by the path of its bind mount too.
        ip(&["link", "set", &end, "netns", &ns.to_string_lossy()]);
        in_ns(ns, move || {
            ip(&["link", "set", "lo", "up"]);
            ip(&["addr", "add", &format!("{addr}/24"), "dev", &end]);
            ip(&["link", "set", &end, "up"]);
        });
    }
    let mut instances = Vec::new();
    let mut nodes = Vec::new();
    for (i, ns) in [n1, n2].into_iter().enumerate() {
        let network = Arc::new(node_network(dir, i));
        let members: &[(&str, u16)] = if i == 0 {
            &[("a1", 1)]
        } else {
            &[("a2", 1), ("b2", 2)]
        };
        let members: Vec<(String, u16)> =
            members.iter().map(|(n, g)| (n.to_string(), *g)).collect();
        let net = network.clone();
        let made = with_netlink(&ns, move |h| {
            Box::pin(async move {
                let mut made = Vec::new();
                for (id, g) in members {
                    let inet = net.setup(&h, &id, Some(g)).await.unwrap();
                    made.push(Instance {
                        netns: inet.netns,
                        ip: inet.ip,
                    });
                }
                // As the runner does it: the table, then the device.
                assert!(net.plan_overlay(Some(&plan(i))).unwrap());
                assert!(
                    !net.plan_overlay(Some(&plan(i))).unwrap(),
                    "the same plan again changes nothing"
                );
                net.apply_firewall(vec![]).unwrap();
                net.build_overlay(&h).await.unwrap();
                made
            })
        });
        instances.extend(made);
        nodes.push(Node { netns: ns, network });
    }
    let mut it = instances.into_iter();
    let (a1, a2, b2) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
    let nodes: [Node; 2] = nodes.try_into().ok().unwrap();
    Pair { nodes, a1, a2, b2 }
}

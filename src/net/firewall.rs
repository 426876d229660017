//! The node's nftables rules, in one table `inet rivernode` that is replaced
//! as a whole in one transaction (libnftables JSON via `nft -j -f -`):
//! egress masquerade for the instance subnet, node ports DNAT'ed to an
//! instance's address (in the kernel, so SSH sessions outlive the runner),
//! and instances kept away from the node's own services and from each
//! other's node ports.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use super::ipam::Ipv4Net;
use super::NetError;
pub use crate::api::ports::Proto;

/// A node port forwarded to `ip:port` of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortMap {
    pub node_port: u16,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

/// Everything the table says.
#[derive(Clone, Debug)]
pub struct Firewall {
    pub nft: PathBuf,
    pub table: String,
    pub bridge: String,
    pub subnet: Ipv4Net,
    /// Ports of this node instances may not reach (runner API, host API,
    /// SSH proxy), nor on the host's addresses (`node_port_sources`).
    pub protected_ports: Vec<u16>,
    /// Ports every node's runner API listens on: closed to instances on
    /// any machine. The well-known web ports are never closed this widely
    /// (instances would lose the web); a runner behind one is protected on
    /// this node only.
    pub runner_ports: Vec<u16>,
    pub port_maps: Vec<PortMap>,
    /// Who may use node ports from outside the node: the host's SSH proxy.
    /// Anyone else would reach an instance's SSH server without a token.
    /// Empty: node ports work from the node itself only.
    pub node_port_sources: Vec<Ipv4Addr>,
    /// Instances may not reach each other, also not routed through the node.
    pub isolate_instances: bool,
    /// Each instance's bridge port (host-side veth) and address: it may
    /// send only from these (anti-spoofing in the bridge table).
    pub instances: Vec<(String, Ipv4Addr)>,
    /// Networks instances may not reach at all (e.g. the storage network,
    /// which trusts the node's address).
    pub blocked_networks: Vec<Ipv4Net>,
    /// The in-instance API (`runner::instance_api`): reached from the
    /// instance bridge only.
    pub instance_api: Option<std::net::SocketAddrV4>,
    /// The VXLAN overlay, when the node is in one.
    pub overlay: Option<OverlayRules>,
}

/// What the table needs to know of the overlay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverlayRules {
    /// The VXLAN device: closed whatever else is known (one left by an
    /// earlier run, or made before the table follows, passes nothing).
    pub device: String,
    /// The mesh the node is in; none: nothing passes the device.
    pub mesh: Option<MeshRules>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshRules {
    /// The UDP port VXLAN travels on.
    pub port: u16,
    /// The cluster range: instances' packets for it leave by the bridge
    /// or the device, never by the default route.
    pub range: Option<Ipv4Net>,
    /// The other nodes' underlay addresses: the only senders of VXLAN here.
    pub peers: Vec<Ipv4Addr>,
    /// This node's instances with their owners' groups: what their packets
    /// are marked with on the way out, and must be marked with on the way in.
    pub members: Vec<(Ipv4Addr, u16)>,
}

/// The MAC of an instance's interface, from its address (as Kubernetes'
/// bridge plugin does, 0a:58 + the IPv4 bytes): the bridge table knows it
/// without asking the instance, and it is locally administered.
pub fn instance_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

/// A MAC address as nft, libvirt and netplan write it: `0a:58:0a:fa:00:2a`.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Ports closed to instances only on the node and the host, never on
/// every machine: the web.
const WEB_PORTS: [u16; 2] = [80, 443];

fn m(op: &str, left: Value, right: Value) -> Value {
    json!({"match": {"op": op, "left": left, "right": right}})
}

impl Firewall {
    fn rule(&self, chain: &str, expr: Vec<Value>) -> Value {
        json!({"add": {"rule": {"family": "inet", "table": self.table, "chain": chain, "expr": expr}}})
    }

    fn chain(&self, name: &str, kind: &str, hook: &str, prio: i32) -> Value {
        json!({"add": {"chain": {
            "family": "inet", "table": self.table, "name": name,
            "type": kind, "hook": hook, "prio": prio, "policy": "accept",
        }}})
    }

    /// The whole table as one libnftables JSON transaction.
    pub fn ruleset(&self) -> Value {
        let table = json!({"table": {"family": "inet", "name": self.table}});
        let iif = json!({"meta": {"key": "iifname"}});
        let oif = json!({"meta": {"key": "oifname"}});
        let dport = json!({"payload": {"protocol": "tcp", "field": "dport"}});
        let local = m(
            "==",
            json!({"fib": {"result": "type", "flags": ["daddr"]}}),
            json!("local"),
        );
        // Add-then-delete makes the replacement work whether or not the table exists.
        let mut cmds = vec![
            json!({"add": table.clone()}),
            json!({"delete": table.clone()}),
            json!({"add": table}),
        ];
        cmds.push(self.chain("prerouting", "nat", "prerouting", -100));
        cmds.push(self.chain("output", "nat", "output", -100));
        cmds.push(self.chain("postrouting", "nat", "postrouting", 100));
        cmds.push(self.chain("input", "filter", "input", 0));
        cmds.push(self.chain("forward", "filter", "forward", 0));
        // Before NAT: route_localnet (needed for node ports used as
        // 127.0.0.1) would make loopback addresses that arrive from an
        // instance local, and open the node's loopback-only services to
        // it (the CVE-2020-8558 class). Nothing from the bridge is for 127/8.
        cmds.push(self.chain("guard", "filter", "prerouting", -150));
        // (A packet from 127/8 itself is the node's own, or a spoof whose
        // answer stays on the node.)
        let loopback = json!({"prefix": {"addr": "127.0.0.0", "len": 8}});
        cmds.push(self.rule(
            "guard",
            vec![
                m("==", iif.clone(), json!(self.bridge)),
                m(
                    "==",
                    json!({"payload": {"protocol": "ip", "field": "daddr"}}),
                    loopback.clone(),
                ),
                m(
                    "!=",
                    json!({"payload": {"protocol": "ip", "field": "saddr"}}),
                    loopback,
                ),
                json!({"drop": null}),
            ],
        ));
        for p in &self.port_maps {
            let proto_dport =
                json!({"payload": {"protocol": p.proto.to_string(), "field": "dport"}});
            let expr = vec![
                local.clone(),
                m("==", proto_dport, json!(p.node_port)),
                json!({"dnat": {"family": "ip", "addr": p.ip.to_string(), "port": p.port}}),
            ];
            // prerouting for traffic from elsewhere (the host's proxy only),
            // output for the node's own (a host proxy on this node).
            if !self.node_port_sources.is_empty() {
                let sources: Vec<String> = self
                    .node_port_sources
                    .iter()
                    .map(|a| a.to_string())
                    .collect();
                let mut from_host = vec![m(
                    "==",
                    json!({"payload": {"protocol": "ip", "field": "saddr"}}),
                    json!({"set": sources}),
                )];
                from_host.extend(expr.clone());
                cmds.push(self.rule("prerouting", from_host));
            }
            cmds.push(self.rule("output", expr));
        }
        let egress = vec![
            m(
                "==",
                json!({"payload": {"protocol": "ip", "field": "saddr"}}),
                json!({"prefix": {"addr": self.subnet.addr.to_string(), "len": self.subnet.prefix}}),
            ),
            // The overlay carries instances' own addresses between nodes.
            m("!=", oif.clone(), json!({"set": self.own_links()})),
        ];
        // TCP and UDP leave from unprivileged ports: a server that trusts a
        // reserved source port as the node's root (NFS with AUTH_SYS, rsh)
        // must not take an instance's root for it (F14).
        let mut tcp_udp = egress.clone();
        tcp_udp.push(m(
            "==",
            json!({"meta": {"key": "l4proto"}}),
            json!({"set": ["tcp", "udp"]}),
        ));
        tcp_udp.push(json!({"masquerade": {"port": {"range": [1024, 65535]}}}));
        cmds.push(self.rule("postrouting", tcp_udp));
        let mut other = egress;
        other.push(json!({"masquerade": null}));
        cmds.push(self.rule("postrouting", other));
        // Node ports used from the node itself as 127.0.0.1: give them a routable source.
        cmds.push(self.rule(
            "postrouting",
            vec![
                m(
                    "==",
                    json!({"payload": {"protocol": "ip", "field": "saddr"}}),
                    json!({"prefix": {"addr": "127.0.0.0", "len": 8}}),
                ),
                m(
                    "==",
                    json!({"payload": {"protocol": "ip", "field": "daddr"}}),
                    json!({"prefix": {"addr": self.subnet.addr.to_string(), "len": self.subnet.prefix}}),
                ),
                m("==", oif.clone(), json!(self.bridge)),
                json!({"masquerade": null}),
            ],
        ));
        if !self.protected_ports.is_empty() {
            cmds.push(self.rule(
                "input",
                vec![
                    m("==", iif.clone(), json!(self.bridge)),
                    m("==", dport.clone(), json!({"set": self.protected_ports})),
                    json!({"drop": null}),
                ],
            ));
        }
        if let Some(api) = self.instance_api {
            // The in-instance API names its caller by source address: only
            // the bridge, whose guard pins each instance to its own, may reach it.
            cmds.push(self.rule(
                "input",
                vec![
                    m(
                        "==",
                        json!({"payload": {"protocol": "ip", "field": "daddr"}}),
                        json!(api.ip().to_string()),
                    ),
                    m("!=", iif.clone(), json!(self.bridge)),
                    json!({"drop": null}),
                ],
            ));
        }
        cmds.extend(self.overlay_rules());
        let dnat = m("in", json!({"ct": {"key": "status"}}), json!("dnat"));
        // An instance reaching another instance through a node port.
        cmds.push(self.rule(
            "forward",
            vec![
                m("==", iif.clone(), json!(self.bridge)),
                m("==", oif.clone(), json!(self.bridge)),
                dnat.clone(),
                json!({"drop": null}),
            ],
        ));
        // Cloud metadata and other link-local services answer as the node's
        // identity: never an instance's (F14); nor do the networks the
        // operator names (storage that trusts this node's address).
        let link_local = Ipv4Net {
            addr: Ipv4Addr::new(169, 254, 0, 0),
            prefix: 16,
        };
        for net in std::iter::once(&link_local).chain(&self.blocked_networks) {
            cmds.push(self.rule(
                "forward",
                vec![
                    m("==", iif.clone(), json!(self.bridge)),
                    m(
                        "==",
                        json!({"payload": {"protocol": "ip", "field": "daddr"}}),
                        json!({"prefix": {"addr": net.addr.to_string(), "len": net.prefix}}),
                    ),
                    json!({"drop": null}),
                ],
            ));
        }
        // The host's API and SSH proxy wherever the host runs, and the
        // runner APIs of other machines (they listen on the port this one
        // does; input already closes this node's). Not these port numbers
        // on the rest of the world: a web server on 443 or 8000 stays reachable.
        if !self.protected_ports.is_empty() && !self.node_port_sources.is_empty() {
            let host: Vec<String> = self
                .node_port_sources
                .iter()
                .map(|a| a.to_string())
                .collect();
            cmds.push(self.rule(
                "forward",
                vec![
                    m("==", iif.clone(), json!(self.bridge)),
                    m(
                        "==",
                        json!({"payload": {"protocol": "ip", "field": "daddr"}}),
                        json!({"set": host}),
                    ),
                    m("==", dport.clone(), json!({"set": self.protected_ports})),
                    json!({"drop": null}),
                ],
            ));
        }
        let runner_ports: Vec<u16> = self
            .runner_ports
            .iter()
            .copied()
            .filter(|p| !WEB_PORTS.contains(p))
            .collect();
        if !runner_ports.is_empty() {
            cmds.push(self.rule(
                "forward",
                vec![
                    m("==", iif.clone(), json!(self.bridge)),
                    m("==", dport.clone(), json!({"set": runner_ports})),
                    json!({"drop": null}),
                ],
            ));
        }
        // Node ports of other machines trust the host's address, and an
        // instance on the host's machine leaves masqueraded as exactly that:
        // instances never reach a node port off this node (F9), TCP or UDP.
        for proto in ["tcp", "udp"] {
            cmds.push(self.rule(
                "forward",
                vec![
                    m("==", iif.clone(), json!(self.bridge)),
                    m("!=", oif.clone(), json!(self.bridge)),
                    m(
                        "==",
                        json!({"payload": {"protocol": proto, "field": "dport"}}),
                        json!({"range": [crate::api::NODE_PORTS.0, crate::api::NODE_PORTS.1]}),
                    ),
                    json!({"drop": null}),
                ],
            ));
        }
        if self.isolate_instances {
            // ...or routed through the node (isolated bridge ports stop only direct frames).
            cmds.push(self.rule(
                "forward",
                vec![
                    m("==", iif.clone(), json!(self.bridge)),
                    m("==", oif.clone(), json!(self.bridge)),
                    json!({"drop": null}),
                ],
            ));
        }
        // From outside, instances are reached only through node ports (which
        // answer only the host): a route to the instance subnet opens nothing.
        cmds.push(self.rule(
            "forward",
            vec![
                m("==", oif.clone(), json!(self.bridge)),
                dnat,
                json!({"accept": null}),
            ],
        ));
        cmds.push(self.rule(
            "forward",
            vec![
                m("==", oif, json!(self.bridge)),
                m("!=", iif, json!(self.bridge)),
                m("in", json!({"ct": {"key": "state"}}), json!("new")),
                json!({"drop": null}),
            ],
        ));
        cmds.extend(self.bridge_guard());
        json!({"nftables": cmds})
    }

    /// The bridge, and the overlay's device when the node is in a mesh.
    fn own_links(&self) -> Vec<String> {
        let device = self
            .overlay
            .as_ref()
            .filter(|o| o.mesh.is_some())
            .map(|o| o.device.clone());
        std::iter::once(self.bridge.clone()).chain(device).collect()
    }

    /// The overlay's rules, first in the forward chain: a packet from an
    /// instance leaves for the overlay marked with its owner's group (the
    /// VXLAN header carries the mark: GBP), one from the overlay reaches
    /// an instance only if its mark is that instance's owner's, and nothing
    /// else passes the overlay's device. VXLAN is taken only from the other
    /// nodes, and instances send it nowhere (masqueraded as the node, they
    /// could inject frames with any group).
    fn overlay_rules(&self) -> Vec<Value> {
        let Some(o) = &self.overlay else {
            return vec![];
        };
        let iif = json!({"meta": {"key": "iifname"}});
        let oif = json!({"meta": {"key": "oifname"}});
        let mut cmds = Vec::new();
        if let Some(mesh) = &o.mesh {
            // TCP across the overlay is sized for its smaller MTU from the
            // first segment: instances' interfaces keep the bridge's.
            cmds.push(self.rule(
                "forward",
                vec![
                    m("==", oif.clone(), json!(o.device)),
                    m(
                        "in",
                        json!({"payload": {"protocol": "tcp", "field": "flags"}}),
                        json!("syn"),
                    ),
                    json!({"mangle": {
                        "key": {"tcp option": {"name": "maxseg", "field": "size"}},
                        "value": {"rt": {"key": "mtu"}},
                    }}),
                ],
            ));
            cmds.extend(self.mesh_rules(&o.device, mesh));
        }
        for dir in [&iif, &oif] {
            cmds.push(self.rule(
                "forward",
                vec![m("==", dir.clone(), json!(o.device)), json!({"drop": null})],
            ));
        }
        // Nothing that came over the overlay is for the node itself.
        cmds.push(self.rule(
            "input",
            vec![m("==", iif, json!(o.device)), json!({"drop": null})],
        ));
        cmds
    }

    /// The marks, admissions and guards of a mesh the node is in.
    fn mesh_rules(&self, device: &str, mesh: &MeshRules) -> Vec<Value> {
        let iif = json!({"meta": {"key": "iifname"}});
        let oif = json!({"meta": {"key": "oifname"}});
        let saddr = json!({"payload": {"protocol": "ip", "field": "saddr"}});
        let daddr = json!({"payload": {"protocol": "ip", "field": "daddr"}});
        let mark = json!({"meta": {"key": "mark"}});
        let vxlan_port = m(
            "==",
            json!({"payload": {"protocol": "udp", "field": "dport"}}),
            json!(mesh.port),
        );
        let mut cmds = Vec::new();
        if !mesh.members.is_empty() {
            let ips: Vec<String> = mesh.members.iter().map(|(ip, _)| ip.to_string()).collect();
            let marks: Vec<Value> = mesh
                .members
                .iter()
                .map(|(ip, g)| json!([ip.to_string(), g]))
                .collect();
            cmds.push(self.rule(
                "forward",
                vec![
                    m("==", iif.clone(), json!(self.bridge)),
                    m("==", oif.clone(), json!(device)),
                    m("==", saddr.clone(), json!({"set": ips})),
                    json!({"mangle": {
                        "key": mark.clone(),
                        "value": {"map": {"key": saddr.clone(), "data": {"set": marks}}},
                    }}),
                    json!({"accept": null}),
                ],
            ));
            let pairs: Vec<Value> = mesh
                .members
                .iter()
                .map(|(ip, g)| json!({"concat": [ip.to_string(), g]}))
                .collect();
            cmds.push(self.rule(
                "forward",
                vec![
                    m("==", iif.clone(), json!(device)),
                    m("==", oif.clone(), json!(self.bridge)),
                    m(
                        "==",
                        json!({"concat": [daddr.clone(), mark]}),
                        json!({"set": pairs}),
                    ),
                    json!({"accept": null}),
                ],
            ));
        }
        cmds.push(self.rule(
            "forward",
            vec![
                m("==", iif.clone(), json!(self.bridge)),
                vxlan_port.clone(),
                json!({"drop": null}),
            ],
        ));
        if let Some(range) = mesh.range {
            // A node that left (its route gone) is not reached by the
            // default route instead, masqueraded onto the LAN.
            cmds.push(self.rule(
                "forward",
                vec![
                    m("==", iif, json!(self.bridge)),
                    m(
                        "==",
                        daddr,
                        json!({"prefix": {"addr": range.addr.to_string(), "len": range.prefix}}),
                    ),
                    m("!=", oif, json!({"set": [self.bridge.clone(), device]})),
                    json!({"drop": null}),
                ],
            ));
        }
        let mut from_strangers = vec![vxlan_port];
        if !mesh.peers.is_empty() {
            let peers: Vec<String> = mesh.peers.iter().map(|a| a.to_string()).collect();
            from_strangers.push(m("!=", saddr, json!({"set": peers})));
        }
        from_strangers.push(json!({"drop": null}));
        cmds.push(self.rule("input", from_strangers));
        cmds
    }

    /// The bridge-family table: frames entering the bridge from an
    /// instance's port must carry its own MAC and IPv4 address (Ethernet,
    /// ARP and IP source alike), only IPv4 and ARP pass (so no IPv6 router
    /// advertisements), and no instance answers as a DHCP server (F4).
    fn bridge_guard(&self) -> Vec<Value> {
        let table = json!({"table": {"family": "bridge", "name": self.table}});
        let mut cmds = vec![
            json!({"add": table.clone()}),
            json!({"delete": table.clone()}),
            json!({"add": table}),
            json!({"add": {"chain": {
                "family": "bridge", "table": self.table, "name": "guard",
                "type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept",
            }}}),
        ];
        let iif = json!({"meta": {"key": "iifname"}});
        let field = |protocol: &str, field: &str| json!({"payload": {"protocol": protocol, "field": field}});
        let ether_type = field("ether", "type");
        for (port, ip) in &self.instances {
            let mac = mac_text(instance_mac(*ip));
            let from = m("==", iif.clone(), json!(port));
            let rules = [
                vec![m("!=", field("ether", "saddr"), json!(mac))],
                vec![
                    m("==", ether_type.clone(), json!("arp")),
                    m("!=", field("arp", "saddr ether"), json!(mac)),
                ],
                vec![
                    m("==", ether_type.clone(), json!("arp")),
                    m("!=", field("arp", "saddr ip"), json!(ip.to_string())),
                ],
                vec![
                    m("==", ether_type.clone(), json!("ip")),
                    m("!=", field("ip", "saddr"), json!(ip.to_string())),
                ],
                vec![m("!=", ether_type.clone(), json!({"set": ["ip", "arp"]}))],
                vec![
                    m("==", ether_type.clone(), json!("ip")),
                    m("==", field("udp", "sport"), json!(67)),
                ],
            ];
            for r in rules {
                let mut expr = vec![from.clone()];
                expr.extend(r);
                expr.push(json!({"drop": null}));
                cmds.push(json!({"add": {"rule": {
                    "family": "bridge", "table": self.table, "chain": "guard", "expr": expr,
                }}}));
            }
        }
        cmds
    }

    fn nft(&self, input: &str) -> Result<String, NetError> {
        let mut child = Command::new(&self.nft)
            .args(["-j", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| NetError::Nft(format!("{}: {e}", self.nft.display())))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .map_err(|e| NetError::Nft(e.to_string()))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| NetError::Nft(e.to_string()))?;
        if !out.status.success() {
            return Err(NetError::Nft(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Replaces the table atomically (idempotent).
    pub fn apply(&self) -> Result<(), NetError> {
        self.nft(&self.ruleset().to_string()).map(|_| ())
    }

    /// Removes the table; a missing table is fine.
    pub fn remove(&self) -> Result<(), NetError> {
        let table = json!({"table": {"family": "inet", "name": self.table}});
        let bridge = json!({"table": {"family": "bridge", "name": self.table}});
        let tx = json!({"nftables": [
            {"add": table.clone()}, {"delete": table},
            {"add": bridge.clone()}, {"delete": bridge},
        ]});
        self.nft(&tx.to_string()).map(|_| ())
    }

    /// The table as the kernel has it (`nft -j list table`), for checks.
    pub fn list(&self) -> Result<Value, NetError> {
        let tx = json!({"nftables": [{"list": {"table": {"family": "inet", "name": self.table}}}]});
        let text = self.nft(&tx.to_string())?;
        serde_json::from_str(&text).map_err(|e| NetError::Nft(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fw(sources: Vec<Ipv4Addr>) -> Firewall {
        Firewall {
            nft: "nft".into(),
            table: "rivernode".into(),
            bridge: "river0".into(),
            subnet: "10.88.0.0/24".parse().unwrap(),
            protected_ports: vec![443, 8001, 8002],
            runner_ports: vec![443, 8001],
            port_maps: vec![PortMap {
                node_port: 30022,
                ip: "10.88.0.2".parse().unwrap(),
                port: 22,
                proto: Proto::Tcp,
            }],
            node_port_sources: sources,
            isolate_instances: true,
            instances: vec![("rvabc".into(), "10.88.0.2".parse().unwrap())],
            blocked_networks: vec!["198.51.100.0/24".parse().unwrap()],
            instance_api: Some("169.254.42.1:80".parse().unwrap()),
            overlay: None,
        }
    }

    #[test]
    fn instances_reach_no_metadata_service_and_no_other_nodes_apis_or_node_ports() {
        let fwd = serde_json::to_string(&rules(&fw(vec![]), "forward")).unwrap();
        assert!(fwd.contains("169.254.0.0"), "{fwd}");
        assert!(fwd.contains("198.51.100.0"), "blocked networks: {fwd}");
        assert!(fwd.contains("[30000,32767]"), "{fwd}");
        // Other runners' port everywhere, but never the web's.
        assert!(fwd.contains("\"set\":[8001]"), "{fwd}");
        assert!(!fwd.contains("443"), "{fwd}");
        // The host's ports (443 too) on the host's address only.
        let fwd = rules(&fw(vec!["192.0.2.10".parse().unwrap()]), "forward");
        let to_host: Vec<&Value> = fwd
            .iter()
            .filter(|e| serde_json::to_string(e).unwrap().contains("192.0.2.10"))
            .collect();
        assert_eq!(to_host.len(), 1, "{fwd:?}");
        let text = serde_json::to_string(&to_host[0]).unwrap();
        assert!(text.contains("[443,8001,8002]"), "{text}");
        // The in-instance API: dropped unless it comes in from the bridge.
        let input = rules(&fw(vec![]), "input");
        let api: Vec<&Value> = input
            .iter()
            .filter(|e| serde_json::to_string(e).unwrap().contains("169.254.42.1"))
            .collect();
        assert_eq!(api.len(), 1, "{input:?}");
        assert_eq!(api[0][1]["match"]["op"], "!=");
        assert_eq!(api[0][1]["match"]["right"], "river0");
        assert!(api[0][2].get("drop").is_some(), "{:?}", api[0]);
    }

    #[test]
    fn an_instance_port_sends_only_from_its_own_mac_and_address() {
        let f = fw(vec![]);
        let all = f.ruleset();
        let guard: Vec<&Value> = all["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["add"]["rule"].as_object())
            .filter(|r| r["family"] == "bridge" && r["chain"] == "guard")
            .map(|r| &r["expr"])
            .collect();
        assert_eq!(guard.len(), 6);
        let text = serde_json::to_string(&guard).unwrap();
        assert!(
            text.contains("0a:58:0a:58:00:02") && text.contains("10.88.0.2"),
            "{text}"
        );
        assert!(guard.iter().all(|e| e[0]["match"]["right"] == "rvabc"));
        assert_eq!(
            instance_mac("10.88.0.2".parse().unwrap()),
            [0x0a, 0x58, 10, 88, 0, 2]
        );
    }

    fn rules(f: &Firewall, chain: &str) -> Vec<Value> {
        f.ruleset()["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c["add"]["rule"].as_object())
            .filter(|r| r["chain"] == chain)
            .map(|r| r["expr"].clone())
            .collect()
    }

    #[test]
    fn the_overlay_device_is_closed_until_a_mesh_opens_it_to_one_group_each() {
        let mut f = fw(vec![]);
        f.overlay = Some(OverlayRules {
            device: "rn-overlay".into(),
            mesh: None,
        });
        let text = |f: &Firewall, chain| serde_json::to_string(&rules(f, chain)).unwrap();
        // No mesh: the device passes nothing, and nothing is marked.
        let fwd = text(&f, "forward");
        assert!(
            !fwd.contains("mangle") && !fwd.contains("accept\":null}],\"rn"),
            "{fwd}"
        );
        assert_eq!(fwd.matches("rn-overlay").count(), 2, "{fwd}");
        assert!(text(&f, "input").contains("rn-overlay"));
        f.overlay = Some(OverlayRules {
            device: "rn-overlay".into(),
            mesh: Some(MeshRules {
                port: 4789,
                range: Some("10.200.0.0/16".parse().unwrap()),
                peers: vec!["192.0.2.2".parse().unwrap()],
                members: vec![("10.200.0.2".parse().unwrap(), 7)],
            }),
        });
        let fwd = rules(&f, "forward");
        let out = serde_json::to_string(&fwd[1]).unwrap();
        assert!(
            out.contains("\"mangle\"") && out.contains("[\"10.200.0.2\",7]"),
            "{out}"
        );
        let inbound = serde_json::to_string(&fwd[2]).unwrap();
        assert!(
            inbound.contains("{\"concat\":[\"10.200.0.2\",7]}"),
            "{inbound}"
        );
        // The accepts come before every drop of the device.
        let first_drop = fwd
            .iter()
            .position(|r| serde_json::to_string(r).unwrap().contains("drop"))
            .unwrap();
        assert_eq!(first_drop, 3);
        let input = text(&f, "input");
        assert!(
            input.contains("4789") && input.contains("192.0.2.2"),
            "{input}"
        );
        assert!(
            text(&f, "forward").contains("10.200.0.0"),
            "the range stays off the default route"
        );
    }

    #[test]
    fn node_ports_from_outside_only_for_the_host() {
        let open = fw(vec![]);
        assert!(
            rules(&open, "prerouting").is_empty(),
            "no outside source at all"
        );
        assert_eq!(
            rules(&open, "output").len(),
            1,
            "the node itself still reaches it"
        );
        let host = fw(vec!["192.0.2.10".parse().unwrap()]);
        let pre = rules(&host, "prerouting");
        assert_eq!(pre.len(), 1);
        assert_eq!(
            pre[0][0]["match"]["left"]["payload"]["field"], "saddr",
            "{}",
            pre[0]
        );
        assert_eq!(pre[0][0]["match"]["right"]["set"], json!(["192.0.2.10"]));
        let fwd = rules(&host, "forward");
        // With the host's address known, its ports are closed there too.
        assert_eq!(fwd.len(), 10, "{fwd:?}");
        let mut open_bridge = fw(vec![]);
        open_bridge.isolate_instances = false;
        assert_eq!(rules(&open_bridge, "forward").len(), 8);
    }
}

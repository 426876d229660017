//! The VXLAN overlay as the host decides it: each node's subnet (a /24 of
//! the cluster range, by the slot the store keeps for its name), and the
//! mesh each node is told to build in its heartbeat reply: every other
//! node that heartbeats, at the address of its runner URL. Nodes route to
//! each other directly; nothing passes through the host.

use std::net::Ipv4Addr;
use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use super::api::ApiError;
use super::store::OverlayMember;
use super::HostState;
use crate::api::{NodeState, OverlayNode, OverlayPeer, OverlayPlan, OverlayView};
use crate::net::Ipv4Net;

/// The prefix of a node's subnet: 253 instances each.
pub const NODE_PREFIX: u8 = 24;

/// The operator's overlay settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overlay {
    pub range: Ipv4Net,
    pub vni: u32,
    pub port: u16,
}

impl Overlay {
    pub fn new(range: &str, vni: u32, port: u16) -> Result<Self, String> {
        let range: Ipv4Net = range.parse()?;
        if range.prefix > NODE_PREFIX - 1 {
            return Err(format!(
                "{range} has room for one node subnet (/{NODE_PREFIX}); give a /{} or wider",
                NODE_PREFIX - 1
            ));
        }
        if !(1..=0xff_ffff).contains(&vni) {
            return Err(format!(
                "overlay_vni {vni} is not a VXLAN id (1 to 16777215)"
            ));
        }
        if port == 0 {
            return Err("overlay_port must not be 0".into());
        }
        Ok(Self { range, vni, port })
    }

    /// How many node subnets the range holds.
    pub fn slots(&self) -> u32 {
        1 << (NODE_PREFIX - self.range.prefix)
    }

    /// The subnet of the node in `slot`.
    pub fn subnet(&self, slot: u32) -> Ipv4Net {
        Ipv4Net {
            addr: Ipv4Addr::from(u32::from(self.range.addr) + (slot << (32 - NODE_PREFIX))),
            prefix: NODE_PREFIX,
        }
    }

    /// What `node` must build: its subnet and address, and every other
    /// node that is in the mesh. None when `node` has no slot or no address.
    pub fn plan(&self, node: &str, members: &[OverlayMember]) -> Option<OverlayPlan> {
        let me = members.iter().find(|m| m.node == node)?;
        let peers = self
            .members(members)
            .into_iter()
            .filter(|m| m.node != node && m.in_mesh)
            .filter_map(|m| {
                Some(OverlayPeer {
                    node: m.node,
                    underlay: m.underlay?,
                    subnet: m.subnet,
                })
            })
            .collect();
        Some(OverlayPlan {
            vni: self.vni,
            port: self.port,
            range: Some(self.range.to_string()),
            subnet: self.subnet(me.slot).to_string(),
            underlay: underlay(&me.runner_url)?.to_string(),
            peers,
        })
    }

    /// Every node with a slot, and whether the others route to it.
    pub fn members(&self, members: &[OverlayMember]) -> Vec<OverlayNode> {
        members
            .iter()
            .map(|m| {
                let addr = underlay(&m.runner_url);
                OverlayNode {
                    node: m.node.clone(),
                    subnet: self.subnet(m.slot).to_string(),
                    underlay: addr.map(|a| a.to_string()),
                    state: m.state,
                    // A silent node is left out until it beats again: its
                    // instances cannot answer, and its slot stays its own.
                    in_mesh: addr.is_some() && m.state != NodeState::Offline,
                }
            })
            .collect()
    }
}

/// The underlay address of a node: the IPv4 address its runner URL names
/// (a name is not resolved: the mesh must not follow DNS).
pub fn underlay(runner_url: &str) -> Option<Ipv4Addr> {
    crate::api::url_host(runner_url)?
        .parse::<Ipv4Addr>()
        .ok()
        .filter(|a| !a.is_loopback() && !a.is_unspecified())
}

/// The subnet a registering node takes (and keeps), when there is an overlay.
pub async fn subnet_for(state: &HostState, node: &str) -> Result<Option<String>, ApiError> {
    let Some(o) = state.overlay else {
        return Ok(None);
    };
    let n = node.to_string();
    let slot = state
        .blocking(move |s| s.overlay_slot(&n, o.slots()))
        .await?;
    Ok(Some(o.subnet(slot).to_string()))
}

/// The heartbeat reply's overlay for `node`.
pub async fn plan_for(state: &HostState, node: &str) -> Result<Option<OverlayPlan>, ApiError> {
    let Some(o) = state.overlay else {
        return Ok(None);
    };
    let mut members = state.blocking(|s| s.overlay_members()).await?;
    if !members.iter().any(|m| m.node == node) {
        // A node registered before the overlay was set takes its slot now
        // (its runner learns of it when it registers again: see the README).
        // A full range is the operator's to fix, not a failed heartbeat.
        match subnet_for(state, node).await {
            Err(ApiError::TooMany(why)) => {
                tracing::error!(node, "no overlay subnet for this node: {why}");
                return Ok(None);
            }
            r => r?,
        };
        members = state.blocking(|s| s.overlay_members()).await?;
    }
    Ok(o.plan(node, &members))
}

/// `GET /api/overlay`: the mesh, node by node.
pub async fn show(State(state): State<Arc<HostState>>) -> Result<Json<OverlayView>, ApiError> {
    let Some(o) = state.overlay else {
        return Ok(Json(OverlayView {
            range: None,
            vni: 0,
            port: 0,
            nodes: vec![],
        }));
    };
    let members = state.blocking(|s| s.overlay_members()).await?;
    Ok(Json(OverlayView {
        range: Some(o.range.to_string()),
        vni: o.vni,
        port: o.port,
        nodes: o.members(&members),
    }))
}

/// Fills in each assignment's overlay group (its owner's; the admin's is
/// the owner `""`).
pub async fn fill_groups(
    state: &HostState,
    tasks: &mut [crate::api::Assignment],
) -> Result<(), ApiError> {
    if state.overlay.is_none() || tasks.is_empty() {
        return Ok(());
    }
    let owners: Vec<String> = tasks
        .iter()
        .map(|t| t.owner.clone().unwrap_or_default())
        .collect();
    let groups = state.blocking(move |s| s.overlay_groups(&owners)).await?;
    for t in tasks {
        t.overlay_group = groups.get(t.owner.as_deref().unwrap_or("")).copied();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o() -> Overlay {
        Overlay::new("10.200.0.0/16", 4242, 4789).unwrap()
    }

    #[test]
    fn node_subnets_are_slices_of_the_range() {
        assert_eq!(o().slots(), 256);
        assert_eq!(o().subnet(0).to_string(), "10.200.0.0/24");
        assert_eq!(o().subnet(7).to_string(), "10.200.7.0/24");
        let narrow = Overlay::new("10.9.8.0/23", 1, 4789).unwrap();
        assert_eq!(narrow.slots(), 2);
        assert_eq!(narrow.subnet(1).to_string(), "10.9.9.0/24");
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        assert!(Overlay::new("10.9.8.0/24", 1, 4789)
            .unwrap_err()
            .contains("room for one"));
        assert!(Overlay::new("10.9.8.1/16", 1, 4789)
            .unwrap_err()
            .contains("host bits"));
        assert!(Overlay::new("10.9.0.0/16", 0, 4789)
            .unwrap_err()
            .contains("VXLAN id"));
        assert!(Overlay::new("10.9.0.0/16", 1 << 24, 4789).is_err());
        assert!(Overlay::new("10.9.0.0/16", 1, 0).is_err());
    }

    #[test]
    fn the_underlay_is_the_runner_urls_ipv4_address() {
        assert_eq!(
            underlay("http://10.77.0.11:8001"),
            Some(Ipv4Addr::new(10, 77, 0, 11))
        );
        assert_eq!(underlay("http://node-a:8001"), None);
        assert_eq!(underlay("http://127.0.0.1:8001"), None);
        assert_eq!(underlay("http://[fd00::1]:8001"), None);
    }

    #[test]
    fn a_plan_names_every_other_live_node_with_an_address() {
        let member = |node: &str, url: &str, state, slot| OverlayMember {
            node: node.into(),
            runner_url: url.into(),
            state,
            slot,
        };
        let members = vec![
            member("a", "http://10.77.0.11:8001", NodeState::Online, 0),
            member("b", "http://10.77.0.12:8001", NodeState::Degraded, 1),
            member("c", "http://10.77.0.13:8001", NodeState::Offline, 2),
            member("d", "http://node-d:8001", NodeState::Online, 3),
        ];
        let p = o().plan("a", &members).unwrap();
        assert_eq!(p.subnet, "10.200.0.0/24");
        assert_eq!(p.underlay, "10.77.0.11");
        assert_eq!(
            p.peers,
            vec![OverlayPeer {
                node: "b".into(),
                underlay: "10.77.0.12".into(),
                subnet: "10.200.1.0/24".into()
            }]
        );
        // No slot yet, or no address: no plan.
        assert!(o().plan("e", &members).is_none());
        assert!(o().plan("d", &members).is_none());
        let view = o().members(&members);
        assert_eq!(view.len(), 4);
        assert!(!view.iter().find(|m| m.node == "c").unwrap().in_mesh);
        assert!(!view.iter().find(|m| m.node == "d").unwrap().in_mesh);
    }
}

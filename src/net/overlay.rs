//! The node's side of the VXLAN overlay, over rtnetlink: one VXLAN device
//! (no learning, group-based policy on) whose address is its subnet's
//! network address, and for each peer node a static forwarding entry (its
//! VTEP's MAC at its underlay address), a permanent neighbour (its VTEP
//! address at that MAC) and a route to its subnet through it, as flannel's
//! vxlan backend lays it out. Nothing is learned from the wire (the FDB
//! holds only what the host named), but the kernel takes VXLAN from any
//! sender: the table drops it from all but the other nodes, and the
//! underlay must be trusted (VXLAN has no authentication).
//!
//! Which instances may talk is the firewall's part (`firewall.rs`): each
//! packet leaving for the overlay carries its owner's group in the VXLAN
//! header (the GBP extension, from the packet's mark), and a node lets in
//! only packets whose group is the destination instance's owner's.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use netlink_packet_route::link::InfoVxlan;
use netlink_packet_route::neighbour::NeighbourFlags;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder};

use super::ipam::Ipv4Net;
use super::link::{delete_link, ensure_address, link_index};
use super::NetError;

/// Another node of the mesh.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    pub underlay: Ipv4Addr,
    pub subnet: Ipv4Net,
}

/// The mesh as this node builds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mesh {
    pub vni: u32,
    pub port: u16,
    /// This node's underlay address (the tunnels' source).
    pub local: Ipv4Addr,
    pub subnet: Ipv4Net,
    /// The cluster range: an address in it that no route of the mesh
    /// names is dropped, never sent out by the default route.
    pub range: Option<Ipv4Net>,
    pub peers: Vec<Peer>,
}

impl Mesh {
    /// The host's plan, checked: a bad address names the node it came from.
    pub fn from_plan(p: &crate::api::OverlayPlan) -> Result<Mesh, String> {
        let addr = |what: &str, a: &str| -> Result<Ipv4Addr, String> {
            a.parse()
                .map_err(|_| format!("{what}: {a:?} is not an IPv4 address"))
        };
        let mut peers = p
            .peers
            .iter()
            .map(|peer| {
                Ok(Peer {
                    underlay: addr(&peer.node, &peer.underlay)?,
                    subnet: peer
                        .subnet
                        .parse()
                        .map_err(|e| format!("{}: {e}", peer.node))?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        peers.sort();
        Ok(Mesh {
            vni: p.vni,
            port: p.port,
            local: addr("this node", &p.underlay)?,
            subnet: p.subnet.parse()?,
            range: match &p.range {
                Some(r) => Some(r.parse()?),
                None => None,
            },
            peers,
        })
    }

    /// Whether `next` is built on the same device as this one (only its
    /// peers differ).
    pub fn same_device(&self, next: &Mesh) -> bool {
        self.vni == next.vni
            && self.port == next.port
            && self.local == next.local
            && self.subnet == next.subnet
    }
}

/// A node's VTEP address: its subnet's network address, which IPAM never
/// hands out (instances start after the gateway).
pub fn vtep_ip(subnet: Ipv4Net) -> Ipv4Addr {
    subnet.addr
}

/// A node's VTEP MAC, from its subnet (locally administered, like
/// `firewall::instance_mac`, with 0a:59 so the two never meet).
pub fn vtep_mac(subnet: Ipv4Net) -> [u8; 6] {
    let o = subnet.addr.octets();
    [0x0a, 0x59, o[0], o[1], o[2], o[3]]
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |e| NetError::Netlink(format!("{what}: {e}"))
}

/// Builds `mesh` on `device`. Given the mesh built before (`built`, on a
/// device that is still there) on the same device, only the peers that
/// left and came are changed, so traffic to the others never stops;
/// otherwise the device is made afresh with every peer.
pub async fn apply(
    h: &Handle,
    device: &str,
    mesh: &Mesh,
    built: Option<&Mesh>,
) -> Result<(), NetError> {
    let kept = match (built, link_index(h, device).await?) {
        (Some(old), Some(index)) if old.same_device(mesh) => Some((index, &old.peers)),
        _ => None,
    };
    let (index, had): (u32, &[Peer]) = match kept {
        Some((index, peers)) => (index, peers),
        None => (create(h, device, mesh).await?, &[]),
    };
    for p in had.iter().filter(|p| !mesh.peers.contains(p)) {
        remove_peer(h, index, p).await?;
    }
    for p in mesh.peers.iter().filter(|p| !had.contains(p)) {
        add_peer(h, index, p).await?;
    }
    Ok(())
}

/// Removes the device (and with it every route and entry of the mesh).
pub async fn remove(h: &Handle, device: &str) -> Result<bool, NetError> {
    delete_link(h, device).await
}

/// The link that holds `ip`.
async fn link_with_address(h: &Handle, ip: Ipv4Addr) -> Result<Option<u32>, NetError> {
    use futures_util::TryStreamExt;
    let mut addrs = h.address().get().execute();
    while let Some(a) = addrs.try_next().await.map_err(nl("list addresses"))? {
        if super::link::holds(&a, ip) {
            return Ok(Some(a.header.index));
        }
    }
    Ok(None)
}

async fn create(h: &Handle, device: &str, mesh: &Mesh) -> Result<u32, NetError> {
    delete_link(h, device).await?;
    // Bound to the underlay's link, the device takes its MTU less VXLAN's
    // 50 bytes: a full-size frame would otherwise leave in two fragments.
    let lower = link_with_address(h, mesh.local).await?.ok_or_else(|| {
        NetError::Overlay(format!(
            "no link of this node has the address {} (its runner URL's), which the tunnels leave from",
            mesh.local
        ))
    })?;
    let link = LinkVxlan::new(device, mesh.vni)
        .dev(lower)
        .port(mesh.port)
        .local(mesh.local)
        .append_info_data(InfoVxlan::Learning(false))
        .append_info_data(InfoVxlan::Gbp)
        .address(vtep_mac(mesh.subnet).to_vec())
        .build();
    h.link()
        .add(link)
        .execute()
        .await
        .map_err(nl(format!("create VXLAN device {device}")))?;
    let index = link_index(h, device)
        .await?
        .ok_or_else(|| NetError::Netlink(format!("VXLAN device {device} vanished")))?;
    ensure_address(h, index, vtep_ip(mesh.subnet), 32).await?;
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("set {device} up")))?;
    Ok(index)
}

async fn add_peer(h: &Handle, index: u32, p: &Peer) -> Result<(), NetError> {
    let mac = vtep_mac(p.subnet);
    let vtep = vtep_ip(p.subnet);
    // Frames for its VTEP go to its underlay address...
    h.neighbours()
        .add_bridge(index, &mac)
        .destination(IpAddr::V4(p.underlay))
        .flags(NeighbourFlags::Own)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("forwarding entry for {}", p.underlay)))?;
    // ...its VTEP address is that MAC, never asked for on the wire...
    h.neighbours()
        .add(index, IpAddr::V4(vtep))
        .link_layer_address(&mac)
        .replace()
        .execute()
        .await
        .map_err(nl(format!("neighbour {vtep}")))?;
    // ...and its subnet is behind it.
    h.route()
        .add(peer_route(index, p))
        .replace()
        .execute()
        .await
        .map_err(nl(format!("route to {}", p.subnet)))?;
    Ok(())
}

/// The route to a peer's subnet: through its VTEP on the device.
fn peer_route(index: u32, p: &Peer) -> netlink_packet_route::route::RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(p.subnet.addr, p.subnet.prefix)
        .gateway(vtep_ip(p.subnet))
        .output_interface(index)
        .onlink()
        .build()
}

/// Takes a peer's route, neighbour and forwarding entry away (each one
/// already gone is fine: the kernel answers ENOENT).
async fn remove_peer(h: &Handle, index: u32, p: &Peer) -> Result<(), NetError> {
    use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage};
    use netlink_packet_route::AddressFamily;
    let gone = |r: Result<(), rtnetlink::Error>, what: String| match r {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == nix::libc::ENOENT => Ok(()),
        r => r.map_err(nl(what)),
    };
    let vtep = vtep_ip(p.subnet);
    gone(
        h.route().del(peer_route(index, p)).execute().await,
        format!("route to {}", p.subnet),
    )?;
    let mut neigh = NeighbourMessage::default();
    neigh.header.family = AddressFamily::Inet;
    neigh.header.ifindex = index;
    neigh
        .attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            vtep,
        )));
    gone(
        h.neighbours().del(neigh).execute().await,
        format!("neighbour {vtep}"),
    )?;
    let mut fdb = NeighbourMessage::default();
    fdb.header.family = AddressFamily::Bridge;
    fdb.header.ifindex = index;
    fdb.header.flags = NeighbourFlags::Own;
    fdb.attributes.push(NeighbourAttribute::LinkLayerAddress(
        vtep_mac(p.subnet).to_vec(),
    ));
    fdb.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            p.underlay,
        )));
    gone(
        h.neighbours().del(fdb).execute().await,
        format!("forwarding entry for {}", p.underlay),
    )
}

/// Each instance's overlay group (its owner's), in a JSON file beside the
/// address leases, so a restarted runner still marks and admits their
/// packets.
pub struct GroupBook {
    file: PathBuf,
    lock: Mutex<()>,
}

impl GroupBook {
    pub fn new(file: &Path) -> Self {
        Self {
            file: file.to_path_buf(),
            lock: Mutex::new(()),
        }
    }

    pub fn all(&self) -> Result<BTreeMap<String, u16>, NetError> {
        super::ipam::read_map(&self.file)
    }

    /// Records `instance`'s group; none removes it.
    pub fn set(&self, instance: &str, group: Option<u16>) -> Result<(), NetError> {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = self.all()?;
        let changed = match group {
            Some(g) => all.insert(instance.to_string(), g) != Some(g),
            None => all.remove(instance).is_some(),
        };
        if changed {
            super::ipam::write_map(&self.file, &all)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> crate::api::OverlayPlan {
        crate::api::OverlayPlan {
            vni: 42,
            port: 4789,
            range: Some("10.200.0.0/16".into()),
            subnet: "10.200.0.0/24".into(),
            underlay: "10.77.0.11".into(),
            peers: vec![
                crate::api::OverlayPeer {
                    node: "n3".into(),
                    underlay: "10.77.0.13".into(),
                    subnet: "10.200.2.0/24".into(),
                },
                crate::api::OverlayPeer {
                    node: "n2".into(),
                    underlay: "10.77.0.12".into(),
                    subnet: "10.200.1.0/24".into(),
                },
            ],
        }
    }

    #[test]
    fn a_plan_becomes_a_mesh_and_bad_addresses_name_their_node() {
        let m = Mesh::from_plan(&plan()).unwrap();
        assert_eq!(m.local, Ipv4Addr::new(10, 77, 0, 11));
        assert_eq!(m.peers[0].underlay, Ipv4Addr::new(10, 77, 0, 12));
        let mut bad = plan();
        bad.peers[1].underlay = "n2.example".into();
        assert!(Mesh::from_plan(&bad).unwrap_err().starts_with("n2:"));
        let mut bad = plan();
        bad.peers[0].subnet = "10.200.2.1/24".into();
        assert!(Mesh::from_plan(&bad).unwrap_err().starts_with("n3:"));
    }

    #[test]
    fn peers_come_and_go_on_the_same_device_and_nothing_else_does() {
        let full = Mesh::from_plan(&plan()).unwrap();
        let mut fewer = full.clone();
        fewer.peers.pop();
        assert!(fewer.same_device(&full) && full.same_device(&fewer));
        let mut moved = full.clone();
        moved.local = Ipv4Addr::new(10, 77, 0, 99);
        assert!(!full.same_device(&moved));
        let mut other = full.clone();
        other.vni = 7;
        assert!(!full.same_device(&other));
    }

    #[test]
    fn vtep_addresses_come_from_the_subnet() {
        let s: Ipv4Net = "10.200.7.0/24".parse().unwrap();
        assert_eq!(vtep_ip(s), Ipv4Addr::new(10, 200, 7, 0));
        assert_eq!(vtep_mac(s), [0x0a, 0x59, 10, 200, 7, 0]);
    }

    #[test]
    fn groups_are_kept_in_their_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("groups.json");
        let b = GroupBook::new(&f);
        b.set("a", Some(3)).unwrap();
        b.set("b", Some(4)).unwrap();
        b.set("a", None).unwrap();
        assert_eq!(
            GroupBook::new(&f).all().unwrap(),
            [("b".to_string(), 4)].into_iter().collect()
        );
    }
}

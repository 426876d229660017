//! One instance's network, end to end: an address from IPAM, a named
//! namespace, a veth from the node bridge into it, and the node's nftables
//! table (masquerade, node ports, protected ports). Teardown removes every
//! piece and keeps going past failures, reporting all of them.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use rtnetlink::Handle;
use sha2::{Digest, Sha256};

use super::firewall::{Firewall, MeshRules, OverlayRules, PortMap};
use super::ipam::Ipam;
use super::link::{
    attach, create_netns, delete_link, delete_netns, ensure_address, ensure_bridge, Attachment,
};
use super::overlay::{GroupBook, Mesh};
use super::NetError;

/// The node side: bridge, subnet, where namespaces live, the table.
pub struct NodeNetwork {
    pub bridge: String,
    /// Where `net/ipv4/ip_forward` is (`/proc/sys`); instances' traffic is routed by the node.
    pub sysctl_dir: PathBuf,
    pub netns_dir: PathBuf,
    pub ipam: Ipam,
    /// The table's settings; its `port_maps` are replaced on every apply.
    pub firewall: Firewall,
    /// Instances reach the node and the world but not each other.
    pub isolate_instances: bool,
    /// The in-instance API's address, put on the bridge (as a /32: no
    /// route of the node's changes).
    pub instance_api: Option<Ipv4Addr>,
    pub overlay: NodeOverlay,
}

/// The node's part of the VXLAN overlay: its device, its instances'
/// groups, the mesh the host plans for it (what the table follows) and
/// the one built on the device.
pub struct NodeOverlay {
    pub device: String,
    pub groups: GroupBook,
    wanted: std::sync::Mutex<Option<Mesh>>,
    built: std::sync::Mutex<Option<Mesh>>,
}

impl NodeOverlay {
    pub fn new(device: &str, groups_file: &std::path::Path) -> Self {
        Self {
            device: device.to_string(),
            groups: GroupBook::new(groups_file),
            wanted: Default::default(),
            built: Default::default(),
        }
    }

    /// The mesh the host plans for this node (none: it is in none).
    pub fn mesh(&self) -> Option<Mesh> {
        self.wanted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What an instance got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceNet {
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
    pub host_if: String,
}

/// The host-side interface name: `rv` + 12 hex digits of the id's hash
/// (interface names are at most 15 characters).
pub fn host_if(id: &str) -> String {
    format!("rv{}", &hex::encode(Sha256::digest(id.as_bytes()))[..12])
}

impl NodeNetwork {
    /// The bridge up with the subnet's gateway, and the node routing for instances.
    async fn prepare_node(&self, h: &Handle) -> Result<(), NetError> {
        let net = self.ipam.net();
        let bridge = ensure_bridge(h, &self.bridge, net.gateway(), net.prefix).await?;
        if let Some(api) = self.instance_api {
            ensure_address(h, bridge, api, 32).await?;
        }
        let fwd = self.sysctl_dir.join("net/ipv4/ip_forward");
        // Node ports reached as 127.0.0.1 (a host proxy on this node) are DNAT'ed
        // onto the bridge; the kernel routes such loopback-sourced packets only
        // with route_localnet, and the table masquerades them.
        let localnet = self
            .sysctl_dir
            .join(format!("net/ipv4/conf/{}/route_localnet", self.bridge));
        for path in [&fwd, &localnet] {
            std::fs::write(path, "1").map_err(|e| NetError::State {
                path: path.clone(),
                message: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// Idempotent: a second call for the same id returns the same network.
    /// `group`: its owner's on the overlay.
    pub async fn setup(
        &self,
        h: &Handle,
        id: &str,
        group: Option<u16>,
    ) -> Result<InstanceNet, NetError> {
        self.prepare_node(h).await?;
        let net = self.ipam.net();
        let ip = self.ipam.allocate(id)?;
        self.overlay.groups.set(id, group)?;
        let netns = create_netns(&self.netns_dir, id)?;
        let host_if = host_if(id);
        let a = Attachment {
            host_if: host_if.clone(),
            ip,
            prefix: net.prefix,
            gateway: net.gateway(),
            isolated: self.isolate_instances,
        };
        attach(h, &self.bridge, &netns, &a).await?;
        Ok(InstanceNet { netns, ip, host_if })
    }

    /// A VM's network: its address (kept from an earlier start), and a tap
    /// on the bridge named as a veth would be (`host_if`), so the table's
    /// anti-spoofing and isolation hold for it as for containers.
    /// Idempotent. `dev_root` holds `net/tun`.
    pub async fn setup_tap(
        &self,
        h: &Handle,
        id: &str,
        dev_root: &std::path::Path,
        group: Option<u16>,
    ) -> Result<(Ipv4Addr, String), NetError> {
        self.prepare_node(h).await?;
        let ip = self.ipam.allocate(id)?;
        self.overlay.groups.set(id, group)?;
        let tap = host_if(id);
        super::tap::create_tap(dev_root, &tap)?;
        super::tap::attach_tap(h, &self.bridge, &tap, self.isolate_instances).await?;
        Ok((ip, tap))
    }

    /// Removes a VM's tap (its address stays until `teardown`).
    pub async fn remove_tap(&self, h: &Handle, id: &str) -> Result<(), NetError> {
        delete_link(h, &host_if(id)).await.map(|_| ())
    }

    /// Removes the veth (or tap), the namespace and the lease; every step is tried.
    pub async fn teardown(&self, h: &Handle, id: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = delete_link(h, &host_if(id)).await {
            problems.push(e.to_string());
        }
        if let Err(e) = delete_netns(&self.netns_dir.join(id)) {
            problems.push(e.to_string());
        }
        if let Err(e) = self.ipam.release(id) {
            problems.push(e.to_string());
        }
        if let Err(e) = self.overlay.groups.set(id, None) {
            problems.push(e.to_string());
        }
        problems
    }

    /// Takes the host's plan (none: no overlay) as the mesh this node is
    /// in; true when that changed (the table must follow, before the
    /// device: `build_overlay`). The plan's subnet must be this node's:
    /// instances' addresses are routed by it.
    pub fn plan_overlay(&self, plan: Option<&crate::api::OverlayPlan>) -> Result<bool, NetError> {
        let mesh = match plan {
            Some(plan) => {
                let mesh = Mesh::from_plan(plan).map_err(NetError::Overlay)?;
                if mesh.subnet != self.ipam.net() {
                    return Err(NetError::Overlay(format!(
                        "the host gives this node the subnet {}, but its instances are on {}; \
                         remove the node's credential (DATA_DIR/runner/node.json) with no \
                         instances on it and restart the runner, so it registers again and takes it",
                        mesh.subnet,
                        self.ipam.net()
                    )));
                }
                Some(mesh)
            }
            None => None,
        };
        let mut wanted = self
            .overlay
            .wanted
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let changed = *wanted != mesh;
        *wanted = mesh;
        Ok(changed)
    }

    /// Makes the device what the plan says: built, changed peer by peer,
    /// made again if it vanished, or removed. Checked on every call (the
    /// kernel removes a device whose underlay link goes away).
    pub async fn build_overlay(&self, h: &Handle) -> Result<(), NetError> {
        let wanted = self.overlay.mesh();
        let built = self
            .overlay
            .built
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let present = super::link::link_index(h, &self.overlay.device)
            .await?
            .is_some();
        match &wanted {
            None if present => {
                super::overlay::remove(h, &self.overlay.device).await?;
            }
            None => {}
            Some(w) if present && built.as_ref() == Some(w) => return Ok(()),
            Some(w) => {
                let on_device = built.as_ref().filter(|_| present);
                // Forgotten first: a failure halfway leaves it to be made again.
                *self.overlay.built.lock().unwrap_or_else(|p| p.into_inner()) = None;
                super::overlay::apply(h, &self.overlay.device, w, on_device).await?;
            }
        }
        *self.overlay.built.lock().unwrap_or_else(|p| p.into_inner()) = wanted;
        Ok(())
    }

    /// Rewrites the node's table with these node ports.
    pub fn apply_firewall(&self, port_maps: Vec<PortMap>) -> Result<(), NetError> {
        let leases = self.ipam.leases()?;
        let mesh = match self.overlay.mesh() {
            Some(mesh) => {
                let groups = self.overlay.groups.all()?;
                Some(MeshRules {
                    port: mesh.port,
                    range: mesh.range,
                    peers: mesh.peers.iter().map(|p| p.underlay).collect(),
                    members: leases
                        .iter()
                        .filter_map(|(id, ip)| Some((*ip, *groups.get(id)?)))
                        .collect(),
                })
            }
            None => None,
        };
        let overlay = Some(OverlayRules {
            device: self.overlay.device.clone(),
            mesh,
        });
        let instances = leases
            .into_iter()
            .map(|(id, ip)| (host_if(&id), ip))
            .collect();
        let fw = Firewall {
            port_maps,
            instances,
            overlay,
            ..self.firewall.clone()
        };
        fw.apply()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_interface_names_fit_the_kernel_limit_and_differ() {
        let a = super::host_if("node1-vps-1");
        let b = super::host_if("node1-vps-2");
        assert!(a.len() <= 15 && a.starts_with("rv"), "{a}");
        assert_ne!(a, b);
    }
}

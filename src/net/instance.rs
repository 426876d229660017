//! One instance's network, end to end: an address from IPAM, a named
//! namespace, a veth from the node bridge into it, and the node's nftables
//! table (masquerade, node ports, protected ports). Teardown removes every
//! piece and keeps going past failures, reporting all of them.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use rtnetlink::Handle;
use sha2::{Digest, Sha256};

use super::firewall::{Firewall, PortMap};
use super::ipam::Ipam;
use super::link::{
    attach, create_netns, delete_link, delete_netns, ensure_address, ensure_bridge, Attachment,
};
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
    pub async fn setup(&self, h: &Handle, id: &str) -> Result<InstanceNet, NetError> {
        self.prepare_node(h).await?;
        let net = self.ipam.net();
        let ip = self.ipam.allocate(id)?;
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
    ) -> Result<(Ipv4Addr, String), NetError> {
        self.prepare_node(h).await?;
        let ip = self.ipam.allocate(id)?;
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
        problems
    }

    /// Rewrites the node's table with these node ports.
    pub fn apply_firewall(&self, port_maps: Vec<PortMap>) -> Result<(), NetError> {
        let instances = self
            .ipam
            .leases()?
            .into_iter()
            .map(|(id, ip)| (host_if(&id), ip))
            .collect();
        let fw = Firewall {
            port_maps,
            instances,
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

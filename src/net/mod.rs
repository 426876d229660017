//! Instance networking on a node: IPAM (persisted addresses on the bridge
//! subnet), the nftables table (masquerade, node-port DNAT, the node's own
//! services closed to instances), and links over rtnetlink (the bridge,
//! named network namespaces, veth pairs into them), taps for VMs, and the
//! VXLAN overlay between nodes.

pub mod firewall;
pub mod instance;
pub mod ipam;
pub mod link;
pub mod overlay;
pub mod tap;

use std::path::PathBuf;

pub use firewall::{Firewall, PortMap, Proto};
pub use instance::{InstanceNet, NodeNetwork, NodeOverlay};
pub use ipam::{Ipam, Ipv4Net};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("no free address left in {0}")]
    Exhausted(Ipv4Net),
    #[error("nft: {0}")]
    Nft(String),
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("overlay: {0}")]
    Overlay(String),
    #[error("network namespace: {0}")]
    Netns(String),
    #[error("tap: {what}")]
    Tun {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

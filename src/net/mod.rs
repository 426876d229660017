//! Instance networking on a node. So far: IPAM (persisted addresses on the
//! bridge subnet) and the nftables table (masquerade, node-port DNAT, the
//! node's own services closed to instances). Later: the bridge, veth pairs
//! into named network namespaces, taps and VXLAN over rtnetlink.

pub mod firewall;
pub mod ipam;

use std::path::PathBuf;

pub use firewall::{Firewall, PortMap};
pub use ipam::{Ipam, Ipv4Net};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{path}: {message}")]
    State { path: PathBuf, message: String },
    #[error("no free address left in {0}")]
    Exhausted(Ipv4Net),
    #[error("nft: {0}")]
    Nft(String),
}

//! Links over rtnetlink: the node bridge, named network namespaces (the
//! `ip netns` convention: a bind mount of the namespace file, so it lives
//! without a process), and a veth pair from the bridge into an instance's
//! namespace with its address, loopback and default route.
//!
//! A netlink socket belongs to the namespace its thread was in when it was
//! opened, so work inside an instance's namespace runs on a short-lived
//! thread that joined that namespace first.

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, RouteMessageBuilder};
use tokio_stream::StreamExt;

use super::NetError;

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetError {
    let what = what.into();
    move |e| NetError::Netlink(format!("{what}: {e}"))
}

/// A netlink connection in the calling thread's network namespace.
pub fn connect() -> Result<Handle, NetError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| NetError::Netlink(format!("socket: {e}")))?;
    tokio::spawn(conn);
    Ok(handle)
}

pub async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, NetError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.next().await {
        Some(Ok(l)) => Ok(Some(l.header.index)),
        // The kernel answers ENODEV for an unknown name; any other error is
        // not an answer, and taken for one it would make a link's caller
        // skip a step (a veth's end never moved into its namespace).
        Some(Err(rtnetlink::Error::NetlinkError(e))) if e.raw_code().abs() == nix::libc::ENODEV => {
            Ok(None)
        }
        Some(Err(e)) => Err(NetError::Netlink(format!("look up link {name}: {e}"))),
        None => Ok(None),
    }
}

/// The bridge `name` with `gateway/prefix`, up; created if missing.
pub async fn ensure_bridge(
    h: &Handle,
    name: &str,
    gateway: Ipv4Addr,
    prefix: u8,
) -> Result<u32, NetError> {
    if link_index(h, name).await?.is_none() {
        h.link()
            .add(LinkBridge::new(name).build())
            .execute()
            .await
            .map_err(nl(format!("create bridge {name}")))?;
    }
    let index = link_index(h, name)
        .await?
        .ok_or_else(|| NetError::Netlink(format!("bridge {name} vanished")))?;
    ensure_address(h, index, gateway, prefix).await?;
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl(format!("set {name} up")))?;
    Ok(index)
}

/// Puts `ip/prefix` on link `index` unless it is there.
pub async fn ensure_address(
    h: &Handle,
    index: u32,
    ip: Ipv4Addr,
    prefix: u8,
) -> Result<(), NetError> {
    let mut addrs = h.address().get().set_link_index_filter(index).execute();
    let mut has = false;
    while let Some(Ok(a)) = addrs.next().await {
        has |= holds(&a, ip);
    }
    if !has {
        match h.address().add(index, ip.into(), prefix).execute().await {
            // Another instance's start put it there since we looked (two
            // VPS starting at once on one bridge): it is there, as wanted.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == nix::libc::EEXIST => {}
            r => r.map_err(nl(format!("address {ip}/{prefix} on link {index}")))?,
        }
    }
    Ok(())
}

/// Whether an address message is `ip`'s.
pub(super) fn holds(a: &netlink_packet_route::address::AddressMessage, ip: Ipv4Addr) -> bool {
    a.attributes.iter().any(|attr| {
        matches!(attr, netlink_packet_route::address::AddressAttribute::Address(std::net::IpAddr::V4(a)) if *a == ip)
    })
}

pub async fn delete_link(h: &Handle, name: &str) -> Result<bool, NetError> {
    match link_index(h, name).await? {
        Some(i) => {
            h.link()
                .del(i)
                .execute()
                .await
                .map_err(nl(format!("delete {name}")))?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Runs `f` on a thread inside the namespace at `netns`, with its own runtime.
fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce(Handle) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, NetError>>>>
        + Send
        + 'static,
) -> Result<T, NetError> {
    let path = netns.to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path)
            .map_err(|e| NetError::Netns(format!("{}: {e}", path.display())))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| NetError::Netns(format!("enter {}: {e}", path.display())))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| NetError::Netns(e.to_string()))?;
        rt.block_on(async move {
            let h = connect()?;
            f(h).await
        })
    })
    .join()
    .map_err(|_| NetError::Netns("namespace worker panicked".into()))?
}

/// Creates the named namespace `dir/name` (a bind mount of a fresh
/// namespace), or returns it if it exists.
pub fn create_netns(dir: &Path, name: &str) -> Result<PathBuf, NetError> {
    let path = dir.join(name);
    if path.exists() && is_netns(&path) {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).map_err(|e| NetError::Netns(format!("{}: {e}", dir.display())))?;
    std::fs::File::create(&path)
        .map_err(|e| NetError::Netns(format!("{}: {e}", path.display())))?;
    let target = path.clone();
    std::thread::spawn(move || -> Result<(), NetError> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| NetError::Netns(format!("unshare: {e}")))?;
        let own = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
        nix::mount::mount(
            Some(own.as_str()),
            &target,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| NetError::Netns(format!("bind {own} on {}: {e}", target.display())))
    })
    .join()
    .map_err(|_| NetError::Netns("netns creation panicked".into()))??;
    Ok(path)
}

fn is_netns(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .unwrap_or(false)
}

/// Unmounts and removes a named namespace; a missing one is fine.
pub fn delete_netns(path: &Path) -> Result<(), NetError> {
    if !path.exists() {
        return Ok(());
    }
    if is_netns(path) {
        nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|e| NetError::Netns(format!("unmount {}: {e}", path.display())))?;
    }
    std::fs::remove_file(path).map_err(|e| NetError::Netns(format!("{}: {e}", path.display())))
}

/// What an instance's interface looks like.
#[derive(Clone, Debug)]
pub struct Attachment {
    /// Host side of the veth, on the bridge (at most 15 characters).
    pub host_if: String,
    pub ip: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    /// An isolated bridge port reaches the node (the bridge) but no other
    /// isolated port: instances cannot talk to each other, even by ARP.
    pub isolated: bool,
}

/// Whether a veth pair found at (re)attach can be carried on: its host end
/// exists and its inner end is on the node (before the move) or in the
/// instance's namespace (after it).
fn pair_usable(host_end: bool, peer_on_node: bool, inside: bool) -> bool {
    host_end && (peer_on_node || inside)
}

/// A veth pair: `host_if` on `bridge`, the peer as `eth0` in `netns` with
/// the address, loopback up and a default route through the bridge.
pub async fn attach(
    h: &Handle,
    bridge: &str,
    netns: &Path,
    a: &Attachment,
) -> Result<(), NetError> {
    let bridge_index = link_index(h, bridge)
        .await?
        .ok_or_else(|| NetError::Netlink(format!("no bridge {bridge}")))?;
    // A temporary peer name, unique on the node, renamed eth0 inside the namespace.
    let peer = format!("{}p", &a.host_if[..a.host_if.len().min(14)]);
    let peer_name = peer.clone();
    let inside = in_netns(netns, move |h| {
        Box::pin(async move {
            Ok(link_index(&h, &peer_name).await?.is_some()
                || link_index(&h, "eth0").await?.is_some())
        })
    })?;
    let host_end = link_index(h, &a.host_if).await?.is_some();
    let peer_on_node = link_index(h, &peer).await?.is_some();
    if !pair_usable(host_end, peer_on_node, inside) {
        // A half left by a start cut short: most often the host end of a
        // pair whose inner end went with a namespace that died with a
        // killed runner (the kernel frees such a pair later, on its own
        // time). It is removed and the pair made afresh.
        for stale in [&a.host_if, &peer] {
            if let Err(e) = delete_link(h, stale).await {
                if link_index(h, stale).await?.is_some() {
                    return Err(e);
                }
            }
        }
        h.link()
            .add(LinkVeth::new(&a.host_if, &peer).build())
            .execute()
            .await
            .map_err(nl(format!("create veth {}", a.host_if)))?;
    }
    let host_index = link_index(h, &a.host_if)
        .await?
        .ok_or_else(|| NetError::Netlink(format!("veth {} vanished", a.host_if)))?;
    h.link()
        .set(
            LinkUnspec::new_with_index(host_index)
                .controller(bridge_index)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!("attach {} to {bridge}", a.host_if)))?;
    h.link()
        .set_port(LinkBridgePort::new(host_index).isolated(a.isolated).build())
        .execute()
        .await
        .map_err(nl(format!("bridge port settings of {}", a.host_if)))?;
    if let Some(peer_index) = link_index(h, &peer).await? {
        let ns = std::fs::File::open(netns)
            .map_err(|e| NetError::Netns(format!("{}: {e}", netns.display())))?;
        h.link()
            .set(
                LinkUnspec::new_with_index(peer_index)
                    .setns_by_fd(ns.as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("move {peer} into {}", netns.display())))?;
    }
    let (ip, prefix, gw) = (a.ip, a.prefix, a.gateway);
    in_netns(netns, move |h| {
        Box::pin(async move {
            let lo = link_index(&h, "lo")
                .await?
                .ok_or_else(|| NetError::Netlink("no lo".into()))?;
            h.link()
                .set(LinkUnspec::new_with_index(lo).up().build())
                .execute()
                .await
                .map_err(nl("lo up"))?;
            let idx = match link_index(&h, &peer).await? {
                Some(i) => {
                    h.link()
                        .set(LinkUnspec::new_with_index(i).name("eth0").build())
                        .execute()
                        .await
                        .map_err(nl("rename to eth0"))?;
                    i
                }
                None => link_index(&h, "eth0")
                    .await?
                    .ok_or_else(|| NetError::Netlink("no eth0".into()))?,
            };
            // The MAC the bridge table allows for this address.
            h.link()
                .set(
                    LinkUnspec::new_with_index(idx)
                        .address(super::firewall::instance_mac(ip).to_vec())
                        .build(),
                )
                .execute()
                .await
                .map_err(nl("eth0 address"))?;
            // Adding an address or route that exists fails with EEXIST: fine when re-attaching.
            let _ = h.address().add(idx, ip.into(), prefix).execute().await;
            h.link()
                .set(LinkUnspec::new_with_index(idx).up().build())
                .execute()
                .await
                .map_err(nl("eth0 up"))?;
            let _ = h
                .route()
                .add(RouteMessageBuilder::<Ipv4Addr>::new().gateway(gw).build())
                .execute()
                .await;
            Ok(())
        })
    })
}

#[cfg(test)]
mod tests {
    use super::pair_usable;

    #[test]
    fn a_pair_is_carried_on_only_with_both_ends_where_they_can_be_found() {
        assert!(pair_usable(true, true, false), "cut short before the move");
        assert!(
            pair_usable(true, false, true),
            "re-attaching after a restart"
        );
        assert!(
            !pair_usable(true, false, false),
            "inner end gone with a dead namespace"
        );
        assert!(
            !pair_usable(false, true, false),
            "a lone inner end on the node"
        );
        assert!(!pair_usable(false, false, false), "nothing yet");
    }
}

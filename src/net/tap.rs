//! Taps for VMs: a persistent tap made through `/dev/net/tun` (as `ip
//! tuntap add mode tap vnet_hdr` does), then put on the node bridge as a
//! port like an instance's veth. libvirt only opens it (`type='ethernet'`,
//! `managed='no'`), so the runner owns its life: made before the domain
//! starts, removed when the VM is gone.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;

use rtnetlink::{Handle, LinkBridgePort, LinkUnspec};

use super::link::link_index;
use super::NetError;

/// `struct ifreq` as TUNSETIFF reads it: a name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

nix::ioctl_readwrite_bad!(tun_set_iff, 0x4004_54ca, IfReq);
nix::ioctl_write_int_bad!(tun_set_persist, 0x4004_54cb);

/// True for a name the kernel takes for a link: 1 to 15 bytes, no `/`,
/// whitespace or `:`.
pub fn valid_link_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '/' | ':'))
}

/// Makes the persistent tap `name` with `dev_root`'s `net/tun` (`/dev` on
/// a node). A tap of that name that exists is taken as it is (the kernel
/// attaches to it); a link of another kind with that name is an error.
pub fn create_tap(dev_root: &Path, name: &str) -> Result<(), NetError> {
    if !valid_link_name(name) {
        return Err(NetError::Netlink(format!("{name:?} is not a link name")));
    }
    let tun = dev_root.join("net/tun");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&tun)
        .map_err(|source| NetError::Tun {
            what: format!("opening {}", tun.display()),
            source,
        })?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads one `struct ifreq` (40 bytes, laid out as
    // `IfReq`) from our own value and writes the name it chose back into
    // it, through a unique reference; the descriptor is ours and stays
    // open for both calls.
    unsafe { tun_set_iff(f.as_raw_fd(), &mut req) }.map_err(|e| NetError::Tun {
        what: format!("TUNSETIFF {name}"),
        source: e.into(),
    })?;
    // SAFETY: TUNSETPERSIST takes an integer by value; the descriptor is ours.
    unsafe { tun_set_persist(f.as_raw_fd(), 1) }.map_err(|e| NetError::Tun {
        what: format!("TUNSETPERSIST {name}"),
        source: e.into(),
    })?;
    Ok(())
}

/// Puts tap `name` on `bridge`, up; `isolated` keeps it from the bridge's
/// other isolated ports (instances of other users), as for veths.
pub async fn attach_tap(
    h: &Handle,
    bridge: &str,
    name: &str,
    isolated: bool,
) -> Result<(), NetError> {
    let nl = |what: String| move |e: rtnetlink::Error| NetError::Netlink(format!("{what}: {e}"));
    let bridge_index = link_index(h, bridge)
        .await?
        .ok_or_else(|| NetError::Netlink(format!("no bridge {bridge}")))?;
    let index = link_index(h, name)
        .await?
        .ok_or_else(|| NetError::Netlink(format!("no tap {name}")))?;
    h.link()
        .set(
            LinkUnspec::new_with_index(index)
                .controller(bridge_index)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!("attach {name} to {bridge}")))?;
    h.link()
        .set_port(LinkBridgePort::new(index).isolated(isolated).build())
        .execute()
        .await
        .map_err(nl(format!("bridge port settings of {name}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_names_are_what_the_kernel_takes() {
        for ok in ["rvtap7", "a", "rv-tap_1.2", "fifteen-chars15"] {
            assert!(valid_link_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "sixteen-chars-16", "a/b", "a b", "a:b"] {
            assert!(!valid_link_name(bad), "{bad}");
        }
    }

    #[test]
    fn ifreq_is_the_kernels_size() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}

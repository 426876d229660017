//! The VXLAN overlay on the real kernel, between two nodes made of network
//! namespaces (`common/overlay_pair.rs`): one owner's instances reach each
//! other across nodes, another owner's do not, VXLAN is taken only from
//! the other node, and the mesh goes with its device.

mod common;

#[path = "common/overlay_pair.rs"]
mod overlay_pair;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use overlay_pair::{in_ns, with_netlink, Instance};

/// A listener in `inst` that echoes one line per connection, for as long as the test runs.
fn echo_server(inst: &Instance, port: u16) {
    let ns = inst.netns.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&ns).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let l = TcpListener::bind(("0.0.0.0", port)).unwrap();
        tx.send(()).unwrap();
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 64];
            if let Ok(n) = s.read(&mut buf) {
                let _ = s.write_all(&buf[..n]);
            }
        }
    });
    rx.recv().unwrap();
}

/// What `from` hears back from `to:port` (none: no connection).
fn ask(from: &Instance, to: Ipv4Addr, port: u16) -> Option<String> {
    in_ns(&from.netns, move || {
        let mut s =
            TcpStream::connect_timeout(&(to, port).into(), Duration::from_millis(1500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
        s.write_all(b"hello").ok()?;
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

#[test]
fn one_owners_instances_meet_across_nodes_and_no_one_elses() {
    let present = command_exists("nft") && command_exists("ip");
    if !real_part_available("nft (nftables), iproute2", present) {
        return;
    }
    common::cluster::private_namespaces(|| {
        let dir = tempfile::tempdir().unwrap();
        let pair = overlay_pair::build(dir.path());
        let (a1, a2, b2) = (&pair.a1, &pair.a2, &pair.b2);
        assert!(a1.ip.to_string().starts_with("10.200.0."), "{}", a1.ip);
        assert!(a2.ip.to_string().starts_with("10.200.1."), "{}", a2.ip);
        echo_server(a1, 7001);
        echo_server(a2, 7001);
        echo_server(b2, 7001);
        // One owner: both ways, across the overlay.
        assert_eq!(ask(a1, a2.ip, 7001).as_deref(), Some("hello"));
        assert_eq!(ask(a2, a1.ip, 7001).as_deref(), Some("hello"));
        // Another owner's instance, across the overlay either way.
        assert_eq!(ask(a1, b2.ip, 7001), None, "group 1 reached group 2");
        assert_eq!(ask(b2, a1.ip, 7001), None, "group 2 reached group 1");
        // The nodes route directly, with the VTEP's entries the mesh set.
        let n1 = pair.nodes[0].netns.clone();
        let routes = in_ns(&n1, || {
            let o = std::process::Command::new("ip")
                .args(["route", "show", "dev", "rn-overlay"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        });
        assert!(
            routes.contains("10.200.1.0/24 via 10.200.1.0 ") && routes.contains("onlink"),
            "{routes}"
        );
        // VXLAN is taken from the other node only (a third party on the
        // underlay could mark frames with any group), and nothing from the
        // overlay is for the node itself.
        let table = in_ns(&n1, || {
            let o = std::process::Command::new("nft")
                .args(["list", "table", "inet", "rivernode"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        });
        assert!(
            table.contains("udp dport 4789 ip saddr != 192.0.2.2 drop"),
            "{table}"
        );
        assert!(
            table.contains("iifname \"rn-overlay\" drop\n\t\toifname \"rn-overlay\" drop"),
            "{table}"
        );
        // Full-size frames fit the underlay whole: the device is bound to
        // the underlay's link (1500) and takes 50 less, and TCP is sized for it.
        let link = in_ns(&n1, || {
            let o = std::process::Command::new("ip")
                .args(["-o", "link", "show", "rn-overlay"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        });
        assert!(link.contains(" mtu 1450 "), "{link}");
        assert!(
            table
                .contains("oifname \"rn-overlay\" tcp flags syn tcp option maxseg size set rt mtu"),
            "{table}"
        );
        // Node 2 leaves node 1's plan: its route, neighbour and forwarding
        // entry go, on the same device; it comes back and is reached again.
        let node1 = pair.nodes[0].network.clone();
        let follow = move |plan: Option<rivernode::api::OverlayPlan>| {
            let net = node1.clone();
            with_netlink(&n1, move |h| {
                Box::pin(async move {
                    net.plan_overlay(plan.as_ref()).unwrap();
                    net.apply_firewall(vec![]).unwrap();
                    net.build_overlay(&h).await.unwrap();
                    let idx = rivernode::net::link::link_index(&h, "rn-overlay")
                        .await
                        .unwrap();
                    let o = std::process::Command::new("ip")
                        .args(["route", "show", "dev", "rn-overlay"])
                        .output()
                        .unwrap();
                    (idx, String::from_utf8_lossy(&o.stdout).into_owned())
                })
            })
        };
        let n1 = pair.nodes[0].netns.clone();
        let (before, _) = follow(Some(overlay_pair::plan(0)));
        let mut alone = overlay_pair::plan(0);
        alone.peers.clear();
        let (after, routes) = follow(Some(alone));
        assert_eq!(before, after, "a peer that leaves is taken off the device");
        assert!(!routes.contains("10.200.1.0/24"), "{routes}");
        assert_eq!(
            ask(a2, a1.ip, 7001),
            None,
            "a peer that left is not reached"
        );
        let (again, _) = follow(Some(overlay_pair::plan(0)));
        assert_eq!(before, again);
        assert_eq!(ask(a2, a1.ip, 7001).as_deref(), Some("hello"));
        // A device that vanished is made again on the next call.
        in_ns(&n1, || {
            let ok = std::process::Command::new("ip")
                .args(["link", "del", "rn-overlay"])
                .status()
                .unwrap();
            assert!(ok.success());
        });
        let (made, _) = follow(Some(overlay_pair::plan(0)));
        assert!(made.is_some());
        assert_eq!(ask(a2, a1.ip, 7001).as_deref(), Some("hello"));
        // No overlay: the device goes, and with it the mesh.
        let (gone, _) = follow(None);
        assert_eq!(gone, None);
        assert_eq!(ask(a2, a1.ip, 7001), None, "the mesh is gone");
    });
}

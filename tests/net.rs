//! The nftables table on a real kernel, inside a private network namespace
//! made for this test (the machine's own rules are never touched).

mod common;

use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use rivernode::net::{Firewall, PortMap};

fn in_private_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare a network namespace (root needed)");
        // Processes this thread starts (ip, nft) live in the same namespace.
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(up.success());
        f()
    })
    .join()
    .unwrap()
}

fn reachable(port: u16) -> bool {
    TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(500),
    )
    .is_ok()
}

#[test]
fn the_table_masquerades_forwards_node_ports_and_closes_protected_ones() {
    if !real_part_available("nft (nftables)", command_exists("nft")) {
        return;
    }
    in_private_netns(|| {
        let protected = TcpListener::bind("127.0.0.1:0").unwrap();
        let service = TcpListener::bind("127.0.0.1:0").unwrap();
        let (pp, sp) = (
            protected.local_addr().unwrap().port(),
            service.local_addr().unwrap().port(),
        );
        let fw = Firewall {
            nft: "nft".into(),
            table: "rivernode".into(),
            // Loopback stands in for the instance bridge: traffic arriving on it is "from instances".
            bridge: "lo".into(),
            subnet: "10.88.0.0/24".parse().unwrap(),
            protected_ports: vec![pp],
            port_maps: vec![PortMap {
                node_port: 30022,
                ip: "127.0.0.1".parse().unwrap(),
                port: sp,
            }],
        };
        assert!(reachable(pp));
        fw.apply().unwrap();
        fw.apply().unwrap();
        let listed = fw.list().unwrap().to_string();
        assert!(
            listed.contains("masquerade") && listed.contains("dnat"),
            "{listed}"
        );
        let rules = listed.matches("\"rule\"").count();
        assert_eq!(
            rules, 5,
            "applying twice replaces, never duplicates: {listed}"
        );
        assert!(!reachable(pp), "a protected port is closed to the bridge");
        assert!(
            reachable(30022),
            "the node port reaches the service through DNAT"
        );
        fw.remove().unwrap();
        fw.remove().unwrap();
        assert!(fw.list().is_err(), "the table is gone");
        assert!(reachable(pp));
        assert!(!reachable(30022));
    });
}

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
            runner_ports: vec![pp],
            port_maps: vec![PortMap {
                node_port: 30022,
                ip: "127.0.0.1".parse().unwrap(),
                port: sp,
                proto: rivernode::net::Proto::Tcp,
            }],
            // The kernel takes the source-restricted prerouting rule too.
            node_port_sources: vec!["127.0.0.1".parse().unwrap()],
            isolate_instances: true,
            instances: vec![],
            blocked_networks: vec![],
            instance_api: None,
            overlay: None,
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
            rules, 16,
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

#[test]
fn a_bridge_a_named_namespace_and_a_veth_carry_traffic_and_are_removed() {
    use rivernode::net::link::{
        attach, connect, create_netns, delete_link, delete_netns, ensure_bridge, link_index,
        Attachment,
    };
    use std::io::{Read, Write};
    std::thread::spawn(|| {
        // A private network and mount namespace: the bridge, the veth and the
        // namespace bind mount never touch the machine's own.
        nix::sched::unshare(
            nix::sched::CloneFlags::CLONE_NEWNET | nix::sched::CloneFlags::CLONE_NEWNS,
        )
        .unwrap();
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let h = connect().unwrap();
            let gw = "10.250.0.1".parse().unwrap();
            let idx = ensure_bridge(&h, "rvt0", gw, 24).await.unwrap();
            assert_eq!(
                ensure_bridge(&h, "rvt0", gw, 24).await.unwrap(),
                idx,
                "idempotent"
            );
            let ns = create_netns(dir.path(), "inst1").unwrap();
            assert_eq!(create_netns(dir.path(), "inst1").unwrap(), ns);
            let a = Attachment {
                host_if: "rvtv1".into(),
                ip: "10.250.0.2".parse().unwrap(),
                prefix: 24,
                gateway: gw,
                isolated: true,
            };
            attach(&h, "rvt0", &ns, &a).await.unwrap();

            // A server inside the instance's namespace, reached from the node.
            let ns2 = ns.clone();
            let server = std::thread::spawn(move || {
                let f = std::fs::File::open(&ns2).unwrap();
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let l = std::net::TcpListener::bind("10.250.0.2:7000").unwrap();
                let (mut s, peer) = l.accept().unwrap();
                s.write_all(b"hi").unwrap();
                peer
            });
            let mut got = String::new();
            let mut c = loop {
                if let Ok(c) = std::net::TcpStream::connect("10.250.0.2:7000") {
                    break c;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            };
            c.read_to_string(&mut got).unwrap();
            assert_eq!(got, "hi");
            let peer = server.join().unwrap();
            assert_eq!(
                peer.ip().to_string(),
                "10.250.0.1",
                "the node reaches it from the bridge address"
            );

            // Re-attaching an attached instance (a restarted runner) keeps it.
            attach(&h, "rvt0", &ns, &a).await.unwrap();
            assert!(has_eth0(&ns), "re-attached");

            // A runner killed with the namespace private to it leaves the
            // host end of a pair whose inner end is not where the new
            // namespace can find it: the next attach makes the pair afresh.
            let gone = create_netns(dir.path(), "gone").unwrap();
            let b = Attachment {
                host_if: "rvtv2".into(),
                ip: "10.250.0.3".parse().unwrap(),
                ..a.clone()
            };
            attach(&h, "rvt0", &gone, &b).await.unwrap();
            let fresh = create_netns(dir.path(), "fresh").unwrap();
            attach(&h, "rvt0", &fresh, &b).await.unwrap();
            assert!(has_eth0(&fresh), "the pair was made afresh");
            assert!(!has_eth0(&gone), "the stale pair went");
            assert!(delete_link(&h, "rvtv2").await.unwrap());
            delete_netns(&gone).unwrap();
            delete_netns(&fresh).unwrap();

            assert!(delete_link(&h, "rvtv1").await.unwrap());
            assert!(
                !delete_link(&h, "rvtv1").await.unwrap(),
                "deleting twice is fine"
            );
            delete_netns(&ns).unwrap();
            delete_netns(&ns).unwrap();
            assert!(!ns.exists());
            assert!(delete_link(&h, "rvt0").await.unwrap());
            assert_eq!(link_index(&h, "rvt0").await.unwrap(), None);
        });
    })
    .join()
    .unwrap();
}

/// Whether the namespace at `ns` has an `eth0`.
fn has_eth0(ns: &std::path::Path) -> bool {
    in_ns(ns, || {
        std::process::Command::new("ip")
            .args(["link", "show", "eth0"])
            .output()
            .unwrap()
            .status
            .success()
    })
    .join()
    .unwrap()
}

/// Runs `f` on a thread inside the network namespace at `ns`.
fn in_ns<T: Send + 'static>(
    ns: &std::path::Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = ns.to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&ns).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
}

/// Runs `ip ARGS` in this thread's namespace; it must succeed.
fn ip(args: &[&str]) {
    let o = std::process::Command::new("ip")
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A TCP connection from `src` (an address of this namespace) to `to`.
fn connects_from(src: &str, to: &str) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
        tokio::time::timeout(
            Duration::from_millis(700),
            sock.connect(to.parse().unwrap()),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    })
}

fn connects(addr: &str) -> bool {
    TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_millis(700)).is_ok()
}

#[test]
fn instance_networks_reach_out_are_reached_by_node_port_and_are_fenced() {
    use rivernode::net::{Firewall, Ipam, NodeNetwork, PortMap};
    if !real_part_available("nft (nftables)", command_exists("nft")) {
        return;
    }
    std::thread::spawn(|| {
        nix::sched::unshare(
            nix::sched::CloneFlags::CLONE_NEWNET | nix::sched::CloneFlags::CLONE_NEWNS,
        )
        .unwrap();
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .unwrap();
        assert!(std::process::Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap()
            .success());
        let dir = tempfile::tempdir().unwrap();
        let subnet: rivernode::net::Ipv4Net = "10.251.0.0/24".parse().unwrap();
        // The node's own services on the gateway address: one protected, one not.
        let protected = TcpListener::bind("0.0.0.0:0").unwrap();
        let open = TcpListener::bind("0.0.0.0:0").unwrap();
        let (pp, op) = (
            protected.local_addr().unwrap().port(),
            open.local_addr().unwrap().port(),
        );
        let node = NodeNetwork {
            bridge: "rvt1".into(),
            sysctl_dir: "/proc/sys".into(),
            netns_dir: dir.path().join("netns"),
            ipam: Ipam::new(&dir.path().join("ipam.json"), subnet),
            firewall: Firewall {
                nft: "nft".into(),
                table: "rivernode".into(),
                bridge: "rvt1".into(),
                subnet,
                // The runner API's port, and the host API's (8000).
                protected_ports: vec![pp, 8000],
                runner_ports: vec![pp],
                port_maps: vec![],
                // The "host" on the outside network below.
                node_port_sources: vec!["192.0.2.2".parse().unwrap()],
                isolate_instances: true,
                instances: vec![],
                // A "storage network" on the outside machine below.
                blocked_networks: vec!["198.51.100.0/24".parse().unwrap()],
                instance_api: None,
                overlay: None,
            },
            isolate_instances: true,
            instance_api: None,
            overlay: rivernode::net::NodeOverlay::new(
                "rn-overlay",
                &dir.path().join("groups.json"),
            ),
        };

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let h = rivernode::net::link::connect().unwrap();
            // An outside network: a namespace on its own bridge, whose default
            // route (so also to the instance subnet) goes through the node.
            use rivernode::net::link::{attach, create_netns, ensure_bridge, Attachment};
            let outside = create_netns(&dir.path().join("netns"), "outside").unwrap();
            ensure_bridge(&h, "rvto", "192.0.2.1".parse().unwrap(), 24)
                .await
                .unwrap();
            let a = Attachment {
                host_if: "rvto0".into(),
                ip: "192.0.2.2".parse().unwrap(),
                prefix: 24,
                gateway: "192.0.2.1".parse().unwrap(),
                isolated: false,
            };
            attach(&h, "rvto", &outside, &a).await.unwrap();
            let o = in_ns(&outside, || {
                std::process::Command::new("ip")
                    .args(["addr", "add", "192.0.2.3/24", "dev", "eth0"])
                    .output()
                    .unwrap()
            })
            .join()
            .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let i1 = node.setup(&h, "i1", None).await.unwrap();
            let i2 = node.setup(&h, "i2", None).await.unwrap();
            assert_ne!(i1.ip, i2.ip);
            assert_eq!(
                node.setup(&h, "i1", None).await.unwrap(),
                i1,
                "setup is idempotent"
            );
            node.apply_firewall(vec![PortMap {
                node_port: 30022,
                ip: i1.ip,
                port: 7000,
                proto: rivernode::net::Proto::Tcp,
            }])
            .unwrap();

            // A server in i1, listening until the checks are done.
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            let server = in_ns(&i1.netns, move || {
                let l = TcpListener::bind("0.0.0.0:7000").unwrap();
                let _ = done_rx.recv();
                drop(l);
            });
            std::thread::sleep(Duration::from_millis(100));
            // The node reaches it through the node port (DNAT in the kernel).
            assert!(connects("10.251.0.1:30022"), "node port -> instance");
            let i1_ip = i1.ip;
            let (pp2, op2) = (pp, op);
            // i1 answers i2 through the node too (as a colluding pair would set it up).
            let i2_ip = i2.ip;
            let o = in_ns(&i1.netns, move || {
                std::process::Command::new("ip")
                    .args(["route", "add", &format!("{i2_ip}/32"), "via", "10.251.0.1"])
                    .output()
                    .unwrap()
            })
            .join()
            .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            let from_i2 = in_ns(&i2.netns, move || {
                let direct = connects(&format!("{i1_ip}:7000"));
                // Routed through the node instead of across the bridge.
                let o = std::process::Command::new("ip")
                    .args(["route", "add", &format!("{i1_ip}/32"), "via", "10.251.0.1"])
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
                (
                    direct,
                    connects(&format!("10.251.0.1:{op2}")),
                    connects(&format!("10.251.0.1:{pp2}")),
                    connects("10.251.0.1:30022"),
                    connects(&format!("{i1_ip}:7000")),
                )
            })
            .join()
            .unwrap();
            assert!(!from_i2.4, "nor routed through the node");
            // F3: the node's loopback-only services stay closed to an
            // instance that routes 127.0.0.0/8 to the bridge itself.
            let lo_only = TcpListener::bind("127.0.0.5:0").unwrap();
            let lo_port = lo_only.local_addr().unwrap().port();
            let to_loopback = in_ns(&i2.netns, move || {
                ip(&[
                    "route",
                    "del",
                    "local",
                    "127.0.0.0/8",
                    "dev",
                    "lo",
                    "table",
                    "local",
                ]);
                for k in ["all", "eth0"] {
                    std::fs::write(format!("/proc/sys/net/ipv4/conf/{k}/route_localnet"), "1")
                        .unwrap();
                }
                ip(&[
                    "route",
                    "add",
                    "127.0.0.5/32",
                    "via",
                    "10.251.0.1",
                    "dev",
                    "eth0",
                ]);
                connects(&format!("127.0.0.5:{lo_port}"))
            })
            .join()
            .unwrap();
            drop(lo_only);
            assert!(
                !to_loopback,
                "the node's loopback is not reachable from an instance"
            );
            // F9: an instance reaches the world, but no other machine's node ports.
            let (outside_done_tx, outside_done_rx) = std::sync::mpsc::channel::<()>();
            let outside_servers = in_ns(&outside, move || {
                // The outside machine also sits on a storage network.
                ip(&["addr", "add", "198.51.100.3/24", "dev", "eth0"]);
                let a = TcpListener::bind("0.0.0.0:8080").unwrap();
                let b = TcpListener::bind("0.0.0.0:30500").unwrap();
                // Another machine's runner API, on the protected port.
                let c = TcpListener::bind(format!("0.0.0.0:{pp2}")).unwrap();
                // The host's API (on .2), or any web server (on .3).
                let e = TcpListener::bind("0.0.0.0:8000").unwrap();
                // A server that trusts reserved source ports (NFS, AUTH_SYS).
                let d = TcpListener::bind("0.0.0.0:2049").unwrap();
                let _ = outside_done_rx.recv();
                d.set_nonblocking(true).unwrap();
                let peer_port = d.accept().map(|(_, peer)| peer.port()).ok();
                drop((a, b, c, e));
                peer_port
            });
            ip(&["route", "add", "198.51.100.0/24", "via", "192.0.2.3"]);
            std::thread::sleep(Duration::from_millis(100));
            assert!(
                connects("198.51.100.3:8080"),
                "the node reaches the storage network"
            );
            let to_other_node = in_ns(&i1.netns, move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                let from_reserved_port = rt.block_on(async {
                    let sock = tokio::net::TcpSocket::new_v4().unwrap();
                    sock.bind("0.0.0.0:700".parse().unwrap()).unwrap();
                    sock.connect("192.0.2.3:2049".parse().unwrap())
                        .await
                        .is_ok()
                });
                (
                    connects("192.0.2.3:8080"),
                    connects("192.0.2.3:30500"),
                    connects(&format!("192.0.2.3:{pp2}")),
                    from_reserved_port,
                    connects("198.51.100.3:8080"),
                    connects("192.0.2.2:8000"),
                    connects("192.0.2.3:8000"),
                )
            })
            .join()
            .unwrap();
            assert!(
                !to_other_node.2,
                "another machine's runner API is not reachable"
            );
            let _ = outside_done_tx.send(());
            let peer_port = outside_servers.join().unwrap();
            assert!(to_other_node.3, "an instance connects from its port 700");
            let peer_port = peer_port.expect("the connection from port 700 arrived");
            assert!(
                peer_port >= 1024,
                "it leaves the node from an unprivileged port, not {peer_port}"
            );
            assert!(!to_other_node.4, "a blocked network is not reachable");
            assert!(!to_other_node.5, "the host's API is not reachable");
            assert!(
                to_other_node.6,
                "another machine's server on the host API's port is reachable"
            );
            assert!(to_other_node.0, "egress to the world works");
            assert!(
                !to_other_node.1,
                "another node's node port is not reachable from an instance"
            );
            // F4: an instance sends only from its own address and MAC.
            let spoofed = in_ns(&i2.netns, move || {
                let to = format!("10.251.0.1:{op2}");
                let honest = connects_from(&i2_ip.to_string(), &to);
                ip(&["addr", "add", "10.251.0.77/24", "dev", "eth0"]);
                let other_ip = connects_from("10.251.0.77", &to);
                ip(&["addr", "del", "10.251.0.77/24", "dev", "eth0"]);
                ip(&["link", "set", "eth0", "address", "02:00:00:00:00:99"]);
                ip(&["neigh", "flush", "all"]);
                let other_mac = connects_from(&i2_ip.to_string(), &to);
                (honest, other_ip, other_mac)
            })
            .join()
            .unwrap();
            assert!(spoofed.0, "its own address and MAC pass");
            assert!(
                !spoofed.1,
                "another source address is dropped on the bridge"
            );
            assert!(!spoofed.2, "another source MAC is dropped on the bridge");
            let from_outside = in_ns(&outside.clone(), move || {
                let from = connects_from;
                (
                    from("192.0.2.2", "192.0.2.1:30022"),
                    from("192.0.2.3", "192.0.2.1:30022"),
                    from("192.0.2.2", &format!("{i1_ip}:7000")),
                )
            })
            .join()
            .unwrap();
            assert!(from_outside.0, "the host reaches the node port");
            assert!(!from_outside.1, "another address does not");
            assert!(
                !from_outside.2,
                "a route to the instance subnet opens nothing"
            );
            let _ = done_tx.send(());
            assert!(
                !from_i2.0,
                "instances are isolated from each other on the bridge"
            );
            assert!(
                from_i2.1,
                "an open node service is reachable from an instance"
            );
            assert!(!from_i2.2, "a protected node port (runner/host API) is not");
            assert!(
                !from_i2.3,
                "another tenant's node port is not reachable from an instance"
            );
            server.join().unwrap();

            for id in ["i1", "i2"] {
                let problems = node.teardown(&h, id).await;
                assert!(problems.is_empty(), "{problems:?}");
            }
            assert!(node.ipam.leases().unwrap().is_empty());
            assert!(!i1.netns.exists() && !i2.netns.exists());
            rivernode::net::link::delete_netns(&outside).unwrap();
            assert_eq!(
                rivernode::net::link::link_index(&h, &i1.host_if)
                    .await
                    .unwrap(),
                None
            );
            assert!(
                node.teardown(&h, "i1").await.is_empty(),
                "teardown twice is fine"
            );
        });
        drop((protected, open));
    })
    .join()
    .unwrap();
}

#[test]
fn a_vm_tap_is_made_persistent_joins_the_bridge_isolated_and_is_removed() {
    use rivernode::net::link::{connect, delete_link, ensure_bridge, link_index};
    use rivernode::net::tap::{attach_tap, create_tap};
    common::cluster::private_namespaces(|| {
        // sysfs shows the links of the namespace that mounted it: ours.
        nix::mount::mount(
            Some("sysfs"),
            "/sys",
            Some("sysfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let h = connect().unwrap();
            ensure_bridge(&h, "rvt0", "10.250.0.1".parse().unwrap(), 24)
                .await
                .unwrap();
            create_tap(std::path::Path::new("/dev"), "rvtap1").unwrap();
            // It outlives the descriptor that made it, and making it again is fine.
            create_tap(std::path::Path::new("/dev"), "rvtap1").unwrap();
            assert!(link_index(&h, "rvtap1").await.unwrap().is_some());
            let sys = std::path::Path::new("/sys/class/net/rvtap1");
            // IFF_TAP | IFF_PERSIST | IFF_NO_PI | IFF_VNET_HDR
            let flags = std::fs::read_to_string(sys.join("tun_flags")).unwrap();
            assert_eq!(flags.trim(), "0x5802");
            attach_tap(&h, "rvt0", "rvtap1", true).await.unwrap();
            let master = std::fs::read_link(sys.join("master")).unwrap();
            assert!(master.ends_with("rvt0"), "{}", master.display());
            let isolated = std::fs::read_to_string(sys.join("brport/isolated")).unwrap();
            assert_eq!(isolated.trim(), "1");
            // A name that is a link of another kind is refused.
            assert!(create_tap(std::path::Path::new("/dev"), "rvt0").is_err());
            assert!(create_tap(std::path::Path::new("/dev"), "bad/name").is_err());
            assert!(delete_link(&h, "rvtap1").await.unwrap());
            assert!(link_index(&h, "rvtap1").await.unwrap().is_none());
        });
    });
}

//! TCP throughput between two instances on different nodes over the VXLAN
//! overlay, beside the same transfer between the two nodes themselves on
//! the underlay (the link the overlay is carried on), in the same run, as
//! a ratio. The nodes are network namespaces joined by a veth, built by
//! rivernode's own network code (`tests/common/overlay_pair.rs`): the
//! overlay row pays for the bridge, the veths, nftables marking and
//! checking each packet, and VXLAN encapsulation.
//!
//! `cargo bench --bench overlay` (root: it makes namespaces). Each row
//! sends for RIVERNODE_BENCH_SECONDS (default 2) per round, three rounds,
//! alternating; the median is printed.

#[path = "../tests/common/overlay_pair.rs"]
mod overlay_pair;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes per second from `from` (a namespace) to `to:port` (in `to_ns`).
fn throughput(from: &Path, to_ns: &Path, to: Ipv4Addr, port: u16, secs: u64) -> f64 {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let to_ns: PathBuf = to_ns.to_path_buf();
    let receiver = std::thread::spawn(move || {
        let file = std::fs::File::open(&to_ns).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let l = TcpListener::bind(("0.0.0.0", port)).unwrap();
        ready_tx.send(()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 256 << 10];
        let start = Instant::now();
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
        total as f64 / start.elapsed().as_secs_f64()
    });
    ready_rx.recv().unwrap();
    overlay_pair::in_ns(from, move || {
        let mut s = TcpStream::connect((to, port)).unwrap();
        let buf = vec![7u8; 256 << 10];
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            s.write_all(&buf).unwrap();
        }
    });
    receiver.join().unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let secs: u64 = std::env::var("RIVERNODE_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    std::thread::spawn(move || {
        if let Err(e) = nix::sched::unshare(
            nix::sched::CloneFlags::CLONE_NEWNET | nix::sched::CloneFlags::CLONE_NEWNS,
        ) {
            eprintln!("overlay bench: skipped: it makes network namespaces, as root ({e})");
            return;
        }
        nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pair = overlay_pair::build(dir.path());
        let (n1, n2) = (&pair.nodes[0].netns, &pair.nodes[1].netns);
        let underlay_to: Ipv4Addr = overlay_pair::UNDERLAY[1].parse().unwrap();
        let (mut under, mut over) = (Vec::new(), Vec::new());
        for round in 0..3u16 {
            under.push(throughput(n1, n2, underlay_to, 9000 + round, secs));
            over.push(throughput(
                &pair.a1.netns,
                &pair.a2.netns,
                pair.a2.ip,
                9100 + round,
                secs,
            ));
        }
        let (u, o) = (median(under), median(over));
        println!("overlay bench: TCP, one stream, {secs} s a round, median of 3");
        println!("  underlay  node to node            {:>8.1} MB/s", u / 1e6);
        println!("  overlay   instance to instance    {:>8.1} MB/s", o / 1e6);
        println!("  overlay / underlay                {:>8.2}", o / u);
    })
    .join()
    .unwrap();
}

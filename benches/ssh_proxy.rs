//! One stream through the SSH proxy on loopback: throughput and the proxy's
//! CPU-seconds per GB, direct vs the userspace-copy relay vs the splice
//! relay, in the same run, printed with ratios.
//!
//! The sender and the receiver run as child processes (this binary again,
//! with BENCH_ROLE set), so this process's CPU time is the proxy's alone.
//! `cargo bench --bench ssh_proxy`; loopback only, a fixed byte count.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::resource::{getrusage, UsageWho};
use rivernode::host::proxy::{serve, ProxyConfig, RelayMode, TunnelResolver};

const BYTES: u64 = 1 << 30;

struct To(SocketAddr);

impl TunnelResolver for To {
    async fn resolve(&self, _id: u64, _token: &str) -> Result<SocketAddr, String> {
        Ok(self.0)
    }
}

fn cpu_seconds() -> f64 {
    let u = getrusage(UsageWho::RUSAGE_SELF).unwrap();
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

fn sink(port_file: &str) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    std::fs::write(port_file, l.local_addr().unwrap().port().to_string()).unwrap();
    let (mut s, _) = l.accept().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        match s.read(&mut buf).unwrap() {
            0 => break,
            k => n += k as u64,
        }
    }
    println!("{n}");
}

fn source(addr: &str, handshake: bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    if handshake {
        s.write_all(b"REQUEST_TUNNEL 1 bench\n").unwrap();
        let mut ok = [0u8; 8];
        s.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, b"SUCCESS\n");
    }
    let buf = vec![7u8; 1 << 20];
    let mut left = BYTES;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..k]).unwrap();
        left -= k as u64;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
}

/// Sends BYTES through `via` (or straight to the sink); returns (seconds, proxy CPU-seconds).
fn run(rt: &tokio::runtime::Runtime, mode: Option<RelayMode>) -> (f64, f64) {
    let me = std::env::current_exe().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port_file = dir.path().join("port");
    let sink = Command::new(&me)
        .env("BENCH_ROLE", "sink")
        .env("BENCH_PORT_FILE", &port_file)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let sink_port = loop {
        if let Ok(p) = std::fs::read_to_string(&port_file) {
            if !p.is_empty() {
                break p;
            }
        }
        assert!(Instant::now() < deadline, "sink did not start");
        std::thread::sleep(Duration::from_millis(5));
    };
    let sink_addr: SocketAddr = format!("127.0.0.1:{sink_port}").parse().unwrap();
    let target = match mode {
        None => sink_addr,
        Some(m) => {
            let l = rt
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .unwrap();
            let a = l.local_addr().unwrap();
            rt.spawn(serve(
                l,
                Arc::new(To(sink_addr)),
                ProxyConfig {
                    mode: m,
                    ..ProxyConfig::default()
                },
            ));
            a
        }
    };
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    let status = Command::new(&me)
        .env("BENCH_ROLE", "source")
        .env("BENCH_ADDR", target.to_string())
        .env("BENCH_HANDSHAKE", if mode.is_some() { "1" } else { "0" })
        .status()
        .unwrap();
    assert!(status.success());
    let out = sink.wait_with_output().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let got: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert_eq!(got, BYTES, "every byte arrived");
    (secs, cpu)
}

fn main() {
    match std::env::var("BENCH_ROLE").as_deref() {
        Ok("sink") => return sink(&std::env::var("BENCH_PORT_FILE").unwrap()),
        Ok("source") => {
            return source(
                &std::env::var("BENCH_ADDR").unwrap(),
                std::env::var("BENCH_HANDSHAKE").as_deref() == Ok("1"),
            )
        }
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let gb = BYTES as f64 / 1e9;
    let (d, _) = run(&rt, None);
    let (c, c_cpu) = run(&rt, Some(RelayMode::Copy));
    let (s, s_cpu) = run(&rt, Some(RelayMode::Splice));
    println!("ssh_proxy: {:.2} GB per run, one stream on loopback", gb);
    println!("ssh_proxy: direct        {:6.2} GB/s", gb / d);
    println!(
        "ssh_proxy: copy proxy    {:6.2} GB/s, {:.3} proxy CPU-s/GB",
        gb / c,
        c_cpu / gb
    );
    println!(
        "ssh_proxy: splice proxy  {:6.2} GB/s, {:.3} proxy CPU-s/GB",
        gb / s,
        s_cpu / gb
    );
    println!("ssh_proxy: ratio splice/direct throughput {:.2}", d / s);
    println!(
        "ssh_proxy: ratio splice/copy CPU per GB {:.2}",
        s_cpu / c_cpu
    );
}

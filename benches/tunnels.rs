//! Many concurrent tunnels through the SSH proxy: how much memory and how
//! many descriptors each open (idle) tunnel costs the host, with the splice
//! relay and with the copy relay, in the same run.
//!
//! The clients and the instance end (an echo server) are child processes
//! (this binary again, with BENCH_ROLE set), so this process's RSS and
//! descriptors are the proxy's alone. Every tunnel carries one byte each
//! way before it is counted, so both of its directions have relayed.
//! `cargo bench --bench tunnels`; aims at 10,000 tunnels, fewer where the
//! descriptor limit (RLIMIT_NOFILE's hard limit) cannot hold them: it says.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rivernode::host::proxy::{serve, ProxyConfig, RelayMode, TunnelResolver};

const WANTED: usize = 10_000;

struct To(SocketAddr);

impl TunnelResolver for To {
    async fn resolve(&self, _id: u64, _token: &str) -> Result<SocketAddr, String> {
        Ok(self.0)
    }
}

/// This process's resident memory, from /proc/self/status.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The instance's end: echoes every byte on every connection it accepts.
fn echo() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", l.local_addr().unwrap().port());
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

/// Opens `n` tunnels through the proxy at `addr`, sends a byte through
/// each and reads it back, says "ready", and holds them until stdin closes.
fn clients(addr: &str, n: usize) {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"REQUEST_TUNNEL 1 bench\n").unwrap();
        let mut ok = [0u8; 8];
        s.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, b"SUCCESS\n");
        s.write_all(b"x").unwrap();
        let mut one = [0u8; 1];
        s.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"x");
        held.push(s);
    }
    println!("ready");
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().read(&mut [0u8; 1]);
}

/// (RSS growth per tunnel in bytes, descriptors per tunnel) with `n` tunnels.
fn run(
    rt: &tokio::runtime::Runtime,
    echo_addr: SocketAddr,
    mode: RelayMode,
    n: usize,
) -> (f64, f64) {
    let l = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let proxy_addr = l.local_addr().unwrap();
    let stats = Arc::new(rivernode::host::metrics::ProxyStats::default());
    let proxy = rt.spawn(serve(
        l,
        Arc::new(To(echo_addr)),
        ProxyConfig {
            mode,
            max_connections: n + 16,
            max_per_peer: n + 16,
            stats: stats.clone(),
            ..ProxyConfig::default()
        },
    ));
    // Settle: the runtime's threads and the listener are there before counting.
    std::thread::sleep(Duration::from_millis(200));
    let (rss0, fds0) = (rss_bytes(), open_descriptors());
    let me = std::env::current_exe().unwrap();
    let mut child = Command::new(&me)
        .env("BENCH_ROLE", "clients")
        .env("BENCH_ADDR", proxy_addr.to_string())
        .env("BENCH_N", n.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "the clients opened their tunnels");
    let opened_in = t.elapsed();
    let (rss1, fds1) = (rss_bytes(), open_descriptors());
    let open = stats.open.load(Ordering::Relaxed);
    assert_eq!(open as usize, n, "every tunnel is open at once");
    drop(child.stdin.take());
    child.wait().unwrap();
    // Every tunnel closes and gives its descriptors back.
    let deadline = Instant::now() + Duration::from_secs(60);
    while stats.open.load(Ordering::Relaxed) > 0 {
        assert!(Instant::now() < deadline, "tunnels did not close");
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy.abort();
    println!(
        "tunnels: {mode:?}: {n} open in {:.1} s",
        opened_in.as_secs_f64()
    );
    (
        rss1.saturating_sub(rss0) as f64 / n as f64,
        fds1.saturating_sub(fds0) as f64 / n as f64,
    )
}

fn main() {
    match std::env::var("BENCH_ROLE").as_deref() {
        Ok("echo") => return echo(),
        Ok("clients") => {
            return clients(
                &std::env::var("BENCH_ADDR").unwrap(),
                std::env::var("BENCH_N").unwrap().parse().unwrap(),
            )
        }
        _ => {}
    }
    // Each tunnel is two of this process's descriptors (and one in each child).
    let limit = rivernode::host::proxy::raise_descriptor_limit();
    let n = WANTED.min((limit.saturating_sub(256) / 2) as usize);
    if n < WANTED {
        println!(
            "tunnels: {n} tunnels, not {WANTED}: this machine's descriptor limit (RLIMIT_NOFILE) is {limit}"
        );
    }
    let me = std::env::current_exe().unwrap();
    let mut echo = Command::new(&me)
        .env("BENCH_ROLE", "echo")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    BufReader::new(echo.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let echo_addr: SocketAddr = format!("127.0.0.1:{}", port.trim()).parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (copy_rss, copy_fds) = run(&rt, echo_addr, RelayMode::Copy, n);
    let (splice_rss, splice_fds) = run(&rt, echo_addr, RelayMode::Splice, n);
    println!(
        "tunnels: copy relay    {:8.0} bytes of host RSS per open tunnel, {:.2} descriptors",
        copy_rss, copy_fds
    );
    println!(
        "tunnels: splice relay  {:8.0} bytes of host RSS per open tunnel, {:.2} descriptors ({} spare pipes kept)",
        splice_rss,
        splice_fds,
        rivernode::host::proxy::relay::spare_pipes()
    );
    println!(
        "tunnels: ratio splice/copy RSS per tunnel {:.2}",
        splice_rss / copy_rss.max(1.0)
    );
    let _ = echo.kill();
    let _ = echo.wait();
}

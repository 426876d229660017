//! One stream through the SSH proxy on loopback: throughput and the proxy's
//! CPU-seconds per GB, direct vs the userspace-copy relay vs the splice
//! relay vs HAProxy (Debian's, `option splice-auto`), in the same run,
//! printed with ratios.
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
    let mut buf = vec![0u8; 1 << 20];
    // Connections that carry nothing are a relay's readiness probes (a
    // probe of HAProxy reaches here): the run is the first with bytes.
    loop {
        let (mut s, _) = l.accept().unwrap();
        let mut n = 0u64;
        while let Ok(k) = s.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        if n > 0 {
            println!("{n}");
            return;
        }
    }
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

/// HAProxy (Debian's) as the same relay, tuned as a splice relay is:
/// `option splice-auto`, 1 MiB pipes, large buffers. Returns it and its
/// listening address.
fn haproxy(dir: &std::path::Path, to: SocketAddr) -> (std::process::Child, SocketAddr) {
    // A free port: bound, read, released (HAProxy cannot report one it picks).
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 64\n  tune.bufsize 262144\n  tune.pipesize 1048576\n\
             defaults\n  mode tcp\n  option splice-auto\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             listen bench\n  bind 127.0.0.1:{port}\n  server sink {to}\n"
        ),
    )
    .unwrap();
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(&cfg)
        .arg("-db")
        .stdout(Stdio::null())
        .spawn()
        .expect("haproxy (Debian's haproxy package)");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "haproxy did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, addr)
}

/// A process's CPU-seconds so far, from /proc/PID/stat (utime + stime).
fn cpu_seconds_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command's closing parenthesis; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    // /proc counts in USER_HZ, which Linux fixes at 100 for every architecture's ABI.
    let tick = 100.0;
    (f[0] + f[1]) as f64 / tick
}

/// How the bytes go from the source to the sink.
#[derive(Clone, Copy)]
enum Via {
    Direct,
    Proxy(RelayMode),
    HaProxy,
}

/// Sends BYTES through `via` (or straight to the sink); returns (seconds, proxy CPU-seconds).
fn run(rt: &tokio::runtime::Runtime, via: Via) -> (f64, f64) {
    let mode = match via {
        Via::Proxy(m) => Some(m),
        _ => None,
    };
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
    let mut haproxy_child = None;
    let target = match mode {
        None if matches!(via, Via::HaProxy) => {
            let (child, addr) = haproxy(dir.path(), sink_addr);
            haproxy_child = Some(child);
            addr
        }
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
    let proxy_cpu = || match &haproxy_child {
        Some(c) => cpu_seconds_of(c.id()),
        None => cpu_seconds(),
    };
    let cpu0 = proxy_cpu();
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
    let cpu = proxy_cpu() - cpu0;
    if let Some(mut c) = haproxy_child {
        let _ = c.kill();
        let _ = c.wait();
    }
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
    let (d, _) = run(&rt, Via::Direct);
    let (c, c_cpu) = run(&rt, Via::Proxy(RelayMode::Copy));
    let (s, s_cpu) = run(&rt, Via::Proxy(RelayMode::Splice));
    // HAProxy is Debian's `haproxy` package (not installed by setup.sh: its
    // package starts a service).
    let has_haproxy = Command::new("haproxy").arg("-v").output().is_ok();
    let (h, h_cpu) = if has_haproxy {
        run(&rt, Via::HaProxy)
    } else {
        println!("ssh_proxy: no haproxy row: `apt-get install haproxy` to compare with it");
        (f64::NAN, f64::NAN)
    };
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
    println!(
        "ssh_proxy: haproxy       {:6.2} GB/s, {:.3} proxy CPU-s/GB (option splice-auto)",
        gb / h,
        h_cpu / gb
    );
    println!("ssh_proxy: ratio splice/direct throughput {:.2}", d / s);
    println!(
        "ssh_proxy: ratio splice/haproxy throughput {:.2}, CPU per GB {:.2}",
        h / s,
        s_cpu / h_cpu.max(1e-9)
    );
    println!(
        "ssh_proxy: ratio splice/copy CPU per GB {:.2}",
        s_cpu / c_cpu
    );
}

//! The proxy on loopback sockets with a resolver that knows two instances
//! (an echo server each) and refuses the rest as the host would.

use super::*;

struct Fixed {
    echo: SocketAddr,
}

impl TunnelResolver for Fixed {
    async fn resolve(&self, id: u64, token: &str) -> Result<SocketAddr, String> {
        match (id, token) {
            (_, t) if t != "good" && t != "other" => Err("invalid token".into()),
            (7, "good") => Ok(self.echo),
            (7, "other") => Err("this token may not use instance 7".into()),
            (8, _) => Err("instance 8 is stopped".into()),
            _ => Err(format!("no instance {id}")),
        }
    }
}

async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn proxy(cfg: ProxyConfig) -> SocketAddr {
    let echo = echo_server().await;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve(l, Arc::new(Fixed { echo }), cfg));
    addr
}

async fn connect_from(src: &str, to: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{src}:0").parse().unwrap()).unwrap();
    sock.connect(to).await.unwrap()
}

async fn answer(addr: SocketAddr, send: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(send).await.unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).await.unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

#[tokio::test]
async fn a_valid_tunnel_carries_bytes_sent_with_the_handshake() {
    let addr = proxy(ProxyConfig::default()).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The SSH client speaks right after the handshake line, in the same packet.
    s.write_all(b"REQUEST_TUNNEL 7 good\nSSH-2.0-test\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; "SUCCESS\n".len() + "SSH-2.0-test\r\n".len()];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, b"SUCCESS\nSSH-2.0-test\r\n");
}

#[tokio::test]
async fn every_bad_handshake_gets_an_error_line() {
    let addr = proxy(ProxyConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ProxyConfig::default()
    })
    .await;
    for (send, want) in [
        (&b"REQUEST_TUNNEL 7\n"[..], "ERROR missing token"),
        (b"REQUEST_TUNNEL 7 wrong\n", "ERROR invalid token"),
        (
            b"REQUEST_TUNNEL 7 other\n",
            "ERROR this token may not use instance 7",
        ),
        (b"REQUEST_TUNNEL 8 good\n", "ERROR instance 8 is stopped"),
        (
            b"REQUEST_TUNNEL seven good\n",
            "ERROR the instance id must be a number",
        ),
        (b"HELLO\n", "ERROR expected REQUEST_TUNNEL"),
        (b"", "ERROR handshake timeout"),
    ] {
        let got = answer(addr, send).await;
        assert!(
            got.starts_with(want),
            "{:?}: {got}",
            String::from_utf8_lossy(send)
        );
    }
    let long = vec![b'x'; 100 * 1024];
    assert_eq!(answer(addr, &long).await, "ERROR handshake line too long");
}

#[tokio::test]
async fn valid_clients_are_served_while_500_bad_ones_hang() {
    let addr = proxy(ProxyConfig::default()).await;
    let mut idle = Vec::new();
    for i in 0..500 {
        // From 20 addresses, under the per-peer cap each.
        let mut s = connect_from(&format!("127.0.0.{}", 2 + i % 20), addr).await;
        s.write_all(b"REQUEST_TUNNEL 7 go").await.unwrap(); // never finishes the line
        idle.push(s);
    }
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"REQUEST_TUNNEL 7 good\nping").await.unwrap();
    let mut buf = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"SUCCESS\nping");
    drop(idle);
}

#[tokio::test]
async fn the_connection_limit_answers_instead_of_queueing() {
    let addr = proxy(ProxyConfig {
        max_connections: 2,
        ..ProxyConfig::default()
    })
    .await;
    // Two open tunnels hold both slots (SUCCESS proves each was accepted).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"REQUEST_TUNNEL 7 good\n").await.unwrap();
        let mut ok = [0u8; 8];
        s.read_exact(&mut ok).await.unwrap();
        assert_eq!(&ok, b"SUCCESS\n");
        held.push(s);
    }
    assert!(answer(addr, b"")
        .await
        .starts_with("ERROR too many connections"));
    drop(held);
}

#[tokio::test]
async fn one_address_cannot_take_every_slot() {
    let addr = proxy(ProxyConfig {
        max_per_peer: 3,
        ..ProxyConfig::default()
    })
    .await;
    let mut hogs = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.9", addr).await;
        s.write_all(b"REQUEST_TUNNEL 7 go").await.unwrap();
        hogs.push(s);
    }
    let mut fourth = connect_from("127.0.0.9", addr).await;
    let mut line = String::new();
    let mut b = [0u8; 64];
    let n = fourth.read(&mut b).await.unwrap();
    line.push_str(&String::from_utf8_lossy(&b[..n]));
    assert!(
        line.starts_with("ERROR too many connections from your address"),
        "{line}"
    );
    // Another address is served.
    let mut s = connect_from("127.0.0.1", addr).await;
    s.write_all(b"REQUEST_TUNNEL 7 good\n").await.unwrap();
    let mut ok = [0u8; 8];
    s.read_exact(&mut ok).await.unwrap();
    assert_eq!(&ok, b"SUCCESS\n");
    drop(hogs);
}

/// Says yes until told otherwise (a token revoked, a VPS stopped).
struct Revocable {
    echo: SocketAddr,
    valid: Arc<std::sync::atomic::AtomicBool>,
}

impl TunnelResolver for Revocable {
    async fn resolve(&self, _id: u64, _token: &str) -> Result<SocketAddr, String> {
        if self.valid.load(std::sync::atomic::Ordering::SeqCst) {
            Ok(self.echo)
        } else {
            Err("invalid token".into())
        }
    }
}

#[tokio::test]
async fn an_open_tunnel_ends_when_its_token_is_revoked() {
    let echo = echo_server().await;
    let valid = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let cfg = ProxyConfig {
        recheck_interval: Duration::from_millis(100),
        ..ProxyConfig::default()
    };
    tokio::spawn(serve(
        l,
        Arc::new(Revocable {
            echo,
            valid: valid.clone(),
        }),
        cfg,
    ));
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"REQUEST_TUNNEL 7 t\nping").await.unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"SUCCESS\nping");
    valid.store(false, std::sync::atomic::Ordering::SeqCst);
    // The proxy closes it: the next read ends (EOF or reset), whatever is sent.
    let mut b = [0u8; 16];
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let _ = s.write_all(b"x").await;
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the tunnel outlived its token");
}

#[test]
fn the_tunnel_cap_follows_the_descriptor_limit() {
    // systemd's LimitNOFILE=1048576: the setting rules.
    assert_eq!(tunnel_cap(16384, 1 << 20), 16384);
    // A shell's 20000: (20000 - 4096) / 3 tunnels, not more than fit.
    assert_eq!(tunnel_cap(16384, 20000), 5301);
    // A soft 1024 the host could not raise: a quarter kept, the rest / 3.
    assert_eq!(tunnel_cap(16384, 1024), 256);
    // Even less: never below 64; and never above the setting.
    assert_eq!(tunnel_cap(16384, 100), 64);
    assert_eq!(tunnel_cap(10, 1 << 20), 10);
}

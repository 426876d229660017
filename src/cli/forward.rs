//! `rivernode forward <id> <port>`: a local port that reaches a port of an
//! instance on any node, through the host, over one authenticated
//! websocket that carries every connection (`api::forward`). TCP
//! connections are accepted locally and each becomes a stream; for UDP,
//! each local peer becomes a flow that ends after `UDP_IDLE` without a
//! datagram either way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::api::forward::{
    decode, Endpoint, ForwardEnd, ForwardQuery, Mux, Proto, CLOSE, DATA, OPEN,
};
use crate::cli::client::Client;

/// A UDP flow with no datagram from its peer for this long is closed.
const UDP_IDLE: Duration = Duration::from_secs(120);

pub struct ForwardArgs {
    pub id: u64,
    pub port: u16,
    pub local_host: String,
    pub local_port: Option<u16>,
    pub proto: Proto,
}

/// The local address to listen on: the instance's port number unless
/// another is given (0 asks the kernel for a free one).
pub fn local_addr(host: &str, port: u16, local_port: Option<u16>) -> anyhow::Result<SocketAddr> {
    let port = local_port.unwrap_or(port);
    let ip: std::net::IpAddr = match host {
        "localhost" => std::net::Ipv4Addr::LOCALHOST.into(),
        h => h.parse().with_context(|| {
            format!("--local-host {h:?}: give an IP address to listen on, e.g. 127.0.0.1")
        })?,
    };
    Ok(SocketAddr::new(ip, port))
}

enum Local {
    Tcp(tokio::net::TcpListener),
    Udp(Arc<tokio::net::UdpSocket>),
}

pub async fn forward(client: &Client, a: ForwardArgs) -> anyhow::Result<()> {
    let q = ForwardQuery {
        port: a.port,
        proto: a.proto,
    };
    if let Err(e) = q.check() {
        bail!("{e}");
    }
    let addr = local_addr(&a.local_host, a.port, a.local_port)?;
    // Who may, and whether the instance runs, is known before we listen.
    let ws = super::terminal::dial(
        client,
        &format!("/api/tasks/{}/forward?{}", a.id, q.to_query()),
    )
    .await?;
    let local = match a.proto {
        Proto::Tcp => Local::Tcp(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}; try another --local-port"))?,
        ),
        Proto::Udp => Local::Udp(Arc::new(
            tokio::net::UdpSocket::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}; try another --local-port"))?,
        )),
    };
    let bound = match &local {
        Local::Tcp(l) => l.local_addr()?,
        Local::Udp(u) => u.local_addr()?,
    };
    println!(
        "Forwarding {bound} ({}) -> task {} port {}; Ctrl-C to stop",
        a.proto, a.id, a.port
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut mux, mut out, mut finished) = Mux::new();
    let overflow = mux.overflow();
    tokio::spawn(async move {
        while let Some(f) = out.recv().await {
            if ws_tx.send(Message::Binary(f.into())).await.is_err() {
                break;
            }
        }
    });
    let mut next: u32 = 0;
    // UDP: each local peer's flow, and when the flow last carried a
    // datagram either way (an answer keeps it alive too).
    let mut peers: HashMap<SocketAddr, (u32, Instant)> = HashMap::new();
    let mut flows: HashMap<u32, SocketAddr> = HashMap::new();
    let mut udp_buf = vec![0u8; 64 << 10];
    let mut sweep = tokio::time::interval(UDP_IDLE / 4);
    loop {
        tokio::select! {
            m = ws_rx.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    if let Some(f) = decode(&b) {
                        if f.op == CLOSE && !f.data.is_empty() {
                            eprintln!(
                                "connection {} to port {} of task {}: {}",
                                f.conn,
                                a.port,
                                a.id,
                                String::from_utf8_lossy(f.data)
                            );
                        }
                        if f.op == DATA {
                            if let Some(seen) = flows.get(&f.conn).and_then(|p| peers.get_mut(p)) {
                                seen.1 = Instant::now();
                            }
                        }
                        if f.op != OPEN {
                            mux.frame(f);
                        }
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    let end: ForwardEnd = serde_json::from_str(t.as_str())
                        .context("the host sent an unknown message")?;
                    eprintln!("forward ended: {}", end.reason);
                    return Ok(());
                }
                Some(Ok(Message::Close(_))) | None => bail!("the host closed the session; run forward again"),
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("the session broke ({e}); run forward again"),
            },
            _ = overflow.wait() => bail!("the host stopped reading what this side sends; run forward again"),
            c = finished.recv() => {
                if let Some(c) = c {
                    mux.finished(c);
                    if let Some(p) = flows.remove(&c) {
                        peers.remove(&p);
                    }
                }
            }
            accepted = accept(&local) => {
                let stream = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        // Out of descriptors, or a connection reset while
                        // queued: the listener goes on, and so do the others.
                        eprintln!("accepting a local connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let conn = next;
                next = next.wrapping_add(1);
                mux.send(OPEN, conn, b"");
                mux.open(conn, Endpoint::Tcp(Box::pin(async move { Ok(stream) })));
            }
            got = recv_from(&local, &mut udp_buf) => {
                let (n, peer) = match got {
                    Ok(got) => got,
                    // An ICMP error for an earlier datagram to a local peer: the others go on.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => return Err(e).context("reading a local datagram"),
                };
                let Local::Udp(sock) = &local else { continue };
                let conn = match peers.get_mut(&peer) {
                    Some((conn, seen)) if mux.contains(*conn) => {
                        *seen = Instant::now();
                        *conn
                    }
                    _ => {
                        let conn = next;
                        next = next.wrapping_add(1);
                        mux.send(OPEN, conn, b"");
                        mux.open(conn, Endpoint::UdpPeer(sock.clone(), peer));
                        peers.insert(peer, (conn, Instant::now()));
                        flows.insert(conn, peer);
                        conn
                    }
                };
                mux.datagram(conn, &udp_buf[..n]);
            }
            _ = sweep.tick() => {
                let now = Instant::now();
                let idle: Vec<SocketAddr> = peers
                    .iter()
                    .filter(|(_, (_, seen))| now.duration_since(*seen) >= UDP_IDLE)
                    .map(|(p, _)| *p)
                    .collect();
                for p in idle {
                    if let Some((conn, _)) = peers.remove(&p) {
                        flows.remove(&conn);
                        mux.close(conn);
                    }
                }
            }
        }
    }
}

async fn accept(local: &Local) -> std::io::Result<tokio::net::TcpStream> {
    match local {
        Local::Tcp(l) => l.accept().await.map(|(s, _)| s),
        Local::Udp(_) => std::future::pending().await,
    }
}

async fn recv_from(local: &Local, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
    match local {
        Local::Udp(u) => u.recv_from(buf).await,
        Local::Tcp(_) => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_port_is_the_instances_unless_given() {
        assert_eq!(
            local_addr("127.0.0.1", 8888, None).unwrap().to_string(),
            "127.0.0.1:8888"
        );
        assert_eq!(
            local_addr("localhost", 8888, Some(9000))
                .unwrap()
                .to_string(),
            "127.0.0.1:9000"
        );
        assert_eq!(
            local_addr("::1", 53, Some(0)).unwrap().to_string(),
            "[::1]:0"
        );
        let e = local_addr("my-laptop", 1, None).unwrap_err().to_string();
        assert!(e.contains("--local-host"), "{e}");
    }
}

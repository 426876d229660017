//! The SSH proxy on port 8002. A client sends one line,
//! `REQUEST_TUNNEL <id> <token>\n`; the proxy checks that the token may use
//! that instance, connects to it, answers `SUCCESS\n` (or `ERROR <reason>\n`
//! and closes), then relays bytes both ways with splice(2). No thread per
//! connection, a bounded handshake (time and length) and a connection limit,
//! so idle or hostile clients cannot starve valid ones.

pub mod relay;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::host::metrics::ProxyStats;

pub use relay::{relay, Moved, RelayMode};

/// Decides where a tunnel goes, or why not (the reason is sent to the client).
pub trait TunnelResolver: Send + Sync + 'static {
    fn resolve(
        &self,
        id: u64,
        token: &str,
    ) -> impl Future<Output = Result<SocketAddr, String>> + Send;
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub max_connections: usize,
    /// Connections one address may hold at once: one peer cannot take
    /// every slot (F11).
    pub max_per_peer: usize,
    pub handshake_timeout: Duration,
    pub max_line: usize,
    pub connect_timeout: Duration,
    /// How often an open tunnel's token and instance are checked again: a
    /// revoked token or a stopped VPS ends its tunnels.
    pub recheck_interval: Duration,
    pub mode: RelayMode,
    /// Tunnels and bytes, for /metrics.
    pub stats: Arc<crate::host::metrics::ProxyStats>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_per_peer: 64,
            handshake_timeout: Duration::from_secs(10),
            max_line: 1024,
            connect_timeout: Duration::from_secs(5),
            recheck_interval: Duration::from_secs(10),
            mode: RelayMode::Splice,
            stats: Arc::default(),
        }
    }
}

pub(crate) use crate::api::http::PerPeer;

/// How many tunnels the proxy may hold with `limit` descriptors. A
/// quarter of them (at most 4096) stays for everything else: the database,
/// API connections, published ports, runner calls, spare pipes. Each tunnel
/// holds two sockets and, while bytes wait in them, up to four pipe ends:
/// with room for three per tunnel, half of them can be moving bytes at
/// once. Never fewer than 64 (a tiny limit then shows as refused pipes in
/// the log, not as a proxy that takes nobody).
pub fn tunnel_cap(configured: usize, limit: u64) -> usize {
    let reserve = (limit / 4).min(4096);
    let room = limit.saturating_sub(reserve) / 3;
    configured.min(usize::try_from(room).unwrap_or(usize::MAX).max(64))
}

/// Raises this process's soft descriptor limit to its hard one (a daemon
/// with thousands of sockets needs more than the usual soft 1024; the
/// systemd unit sets both high) and returns the limit now in force.
pub fn raise_descriptor_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => 1024,
    }
}

/// TCP keepalive: a peer that vanished without a FIN frees its tunnel
/// within minutes instead of never.
pub(crate) fn keepalive(s: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(s, sockopt::KeepAlive, &true);
    let _ = setsockopt(s, sockopt::TcpKeepIdle, &60);
    let _ = setsockopt(s, sockopt::TcpKeepInterval, &10);
    let _ = setsockopt(s, sockopt::TcpKeepCount, &6);
}

/// Accepts until the task is dropped.
pub async fn serve<R: TunnelResolver>(listener: TcpListener, resolver: Arc<R>, cfg: ProxyConfig) {
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let peers = Arc::new(PerPeer::default());
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %crate::error_chain(&e), "ssh proxy accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(peer_slot) = peers.enter(peer.ip(), cfg.max_per_peer) else {
            cfg.stats.refused.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let _ = stream
                    .write_all(b"ERROR too many connections from your address\n")
                    .await;
            });
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            cfg.stats.refused.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let _ = stream
                    .write_all(b"ERROR too many connections, try again later\n")
                    .await;
            });
            continue;
        };
        let (resolver, cfg) = (resolver.clone(), cfg.clone());
        tokio::spawn(async move {
            match handle(stream, resolver.as_ref(), &cfg).await {
                Ok(Some((id, moved))) => {
                    cfg.stats
                        .bytes_up
                        .fetch_add(moved.a_to_b, Ordering::Relaxed);
                    cfg.stats
                        .bytes_down
                        .fetch_add(moved.b_to_a, Ordering::Relaxed);
                    tracing::info!(%peer, instance = id, up = moved.a_to_b, down = moved.b_to_a, "tunnel closed")
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(%peer, error = %crate::error_chain(&e), "tunnel ended with an error")
                }
            }
            drop((permit, peer_slot));
        });
    }
}

/// Counts a tunnel open while it lives.
struct OpenTunnel<'a>(&'a ProxyStats);

impl<'a> OpenTunnel<'a> {
    fn new(stats: &'a ProxyStats) -> Self {
        stats.open.fetch_add(1, Ordering::Relaxed);
        stats.opened.fetch_add(1, Ordering::Relaxed);
        OpenTunnel(stats)
    }
}

impl Drop for OpenTunnel<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why a handshake failed; sent to the client as `ERROR <reason>`.
async fn refuse(
    stats: &ProxyStats,
    stream: &mut TcpStream,
    reason: &str,
) -> std::io::Result<Option<(u64, Moved)>> {
    stats.refused.fetch_add(1, Ordering::Relaxed);
    stream
        .write_all(format!("ERROR {reason}\n").as_bytes())
        .await?;
    let _ = stream.shutdown().await;
    Ok(None)
}

enum Line {
    /// The line, and whatever the client sent after it (already read).
    Got(String, Vec<u8>),
    TooLong,
    Closed,
}

async fn read_line(stream: &mut TcpStream, max: usize) -> std::io::Result<Line> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(Line::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            if pos > max {
                return Ok(Line::TooLong);
            }
            let rest = buf.split_off(pos + 1);
            let line = String::from_utf8_lossy(&buf[..pos])
                .trim_end_matches('\r')
                .to_string();
            return Ok(Line::Got(line, rest));
        }
        if buf.len() > max {
            return Ok(Line::TooLong);
        }
    }
}

/// The handshake line, `REQUEST_TUNNEL <id> <token>`: the instance and the
/// token, or why not (sent as `ERROR <reason>`).
pub fn parse_request(line: &str) -> Result<(u64, &str), &'static str> {
    let parts: Vec<&str> = line.split_whitespace().collect();
    let (id, token) = match parts.as_slice() {
        ["REQUEST_TUNNEL", id, token] => (*id, *token),
        ["REQUEST_TUNNEL", _] => return Err("missing token: REQUEST_TUNNEL <id> <token>"),
        _ => return Err("expected REQUEST_TUNNEL <id> <token>"),
    };
    let id = id
        .parse::<u64>()
        .map_err(|_| "the instance id must be a number")?;
    Ok((id, token))
}

async fn handle<R: TunnelResolver>(
    mut stream: TcpStream,
    resolver: &R,
    cfg: &ProxyConfig,
) -> std::io::Result<Option<(u64, Moved)>> {
    let line =
        match tokio::time::timeout(cfg.handshake_timeout, read_line(&mut stream, cfg.max_line))
            .await
        {
            Err(_) => {
                return refuse(
                    &cfg.stats,
                    &mut stream,
                    "handshake timeout: send REQUEST_TUNNEL <id> <token>",
                )
                .await
            }
            Ok(r) => r?,
        };
    let (line, rest) = match line {
        Line::Got(l, rest) => (l, rest),
        Line::TooLong => return refuse(&cfg.stats, &mut stream, "handshake line too long").await,
        Line::Closed => return Ok(None),
    };
    let (id, token) = match parse_request(&line) {
        Ok(r) => r,
        Err(reason) => return refuse(&cfg.stats, &mut stream, reason).await,
    };
    let target =
        match tokio::time::timeout(cfg.handshake_timeout, resolver.resolve(id, token)).await {
            Ok(Ok(t)) => t,
            Ok(Err(reason)) => return refuse(&cfg.stats, &mut stream, &reason).await,
            Err(_) => {
                return refuse(
                    &cfg.stats,
                    &mut stream,
                    "the host cannot check this right now; try again",
                )
                .await
            }
        };
    let mut upstream =
        match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(target)).await {
            Ok(Ok(u)) => u,
            _ => {
                return refuse(
                    &cfg.stats,
                    &mut stream,
                    &format!("instance {id} is not reachable"),
                )
                .await
            }
        };
    let _ = upstream.set_nodelay(true);
    let _ = stream.set_nodelay(true);
    stream.write_all(b"SUCCESS\n").await?;
    let _open = OpenTunnel::new(&cfg.stats);
    // Bytes the client sent right behind its handshake line belong to the instance.
    if !rest.is_empty() {
        upstream.write_all(&rest).await?;
    }
    keepalive(&stream);
    keepalive(&upstream);
    // The tunnel lasts while its token may still use a running instance.
    let still_allowed = async {
        loop {
            tokio::time::sleep(cfg.recheck_interval).await;
            match tokio::time::timeout(cfg.handshake_timeout, resolver.resolve(id, token)).await {
                Ok(Ok(t)) if t == target => {}
                // A check the host could not answer is not a revocation.
                Err(_) => {}
                Ok(Ok(_)) | Ok(Err(_)) => return,
            }
        }
    };
    tokio::select! {
        moved = relay(stream, upstream, cfg.mode) => Ok(Some((id, moved?))),
        () = still_allowed => {
            tracing::info!(instance = id, "tunnel closed: its token or instance is no longer valid");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests;

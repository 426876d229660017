//! The SSH proxy on port 8002. A client sends one line,
//! `REQUEST_TUNNEL <id> <token>\n`; the proxy checks that the token may use
//! that instance, connects to it, answers `SUCCESS\n` (or `ERROR <reason>\n`
//! and closes), then relays bytes both ways with splice(2). No thread per
//! connection, a bounded handshake (time and length) and a connection limit,
//! so idle or hostile clients cannot starve valid ones.

pub mod relay;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

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
    pub handshake_timeout: Duration,
    pub max_line: usize,
    pub connect_timeout: Duration,
    pub mode: RelayMode,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            max_line: 1024,
            connect_timeout: Duration::from_secs(5),
            mode: RelayMode::Splice,
        }
    }
}

/// Accepts until the task is dropped.
pub async fn serve<R: TunnelResolver>(listener: TcpListener, resolver: Arc<R>, cfg: ProxyConfig) {
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
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
        let Ok(permit) = slots.clone().try_acquire_owned() else {
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
                    tracing::info!(%peer, instance = id, up = moved.a_to_b, down = moved.b_to_a, "tunnel closed")
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(%peer, error = %crate::error_chain(&e), "tunnel ended with an error")
                }
            }
            drop(permit);
        });
    }
}

/// Why a handshake failed; sent to the client as `ERROR <reason>`.
async fn refuse(stream: &mut TcpStream, reason: &str) -> std::io::Result<Option<(u64, Moved)>> {
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
                    &mut stream,
                    "handshake timeout: send REQUEST_TUNNEL <id> <token>",
                )
                .await
            }
            Ok(r) => r?,
        };
    let (line, rest) = match line {
        Line::Got(l, rest) => (l, rest),
        Line::TooLong => return refuse(&mut stream, "handshake line too long").await,
        Line::Closed => return Ok(None),
    };
    let parts: Vec<&str> = line.split_whitespace().collect();
    let (id, token) = match parts.as_slice() {
        ["REQUEST_TUNNEL", id, token] => (*id, *token),
        ["REQUEST_TUNNEL", _] => {
            return refuse(&mut stream, "missing token: REQUEST_TUNNEL <id> <token>").await
        }
        _ => return refuse(&mut stream, "expected REQUEST_TUNNEL <id> <token>").await,
    };
    let Ok(id) = id.parse::<u64>() else {
        return refuse(&mut stream, "the instance id must be a number").await;
    };
    let target = match resolver.resolve(id, token).await {
        Ok(t) => t,
        Err(reason) => return refuse(&mut stream, &reason).await,
    };
    let mut upstream =
        match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(target)).await {
            Ok(Ok(u)) => u,
            _ => return refuse(&mut stream, &format!("instance {id} is not reachable")).await,
        };
    let _ = upstream.set_nodelay(true);
    let _ = stream.set_nodelay(true);
    stream.write_all(b"SUCCESS\n").await?;
    // Bytes the client sent right behind its handshake line belong to the instance.
    if !rest.is_empty() {
        upstream.write_all(&rest).await?;
    }
    let moved = relay(stream, upstream, cfg.mode).await?;
    Ok(Some((id, moved)))
}

#[cfg(test)]
mod tests;

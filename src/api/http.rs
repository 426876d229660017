//! The HTTP server of the host and runner APIs: hyper's HTTP/1 server with
//! what `axum::serve` leaves out, so that anonymous or slow clients cannot
//! hold it: a deadline for a request's headers (slowloris), and a cap on
//! open connections (one past it is closed at once). Shutdown stops
//! accepting, then lets requests under way finish for a short while.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// How much a server takes from its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Time for a client to send a request's headers.
    pub header_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections one peer address may hold open at once: on an endpoint
    /// shared by many callers, one must not take every slot.
    pub max_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_per_peer: usize::MAX,
        }
    }
}

/// Requests under way get this long to finish at shutdown (long polls end sooner than that).
const DRAIN: Duration = Duration::from_secs(5);

/// Open connections by peer address.
#[derive(Default)]
pub struct PerPeer(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

/// One peer's connection, counted while it lives.
pub struct PeerSlot {
    peers: Arc<PerPeer>,
    ip: std::net::IpAddr,
}

impl PerPeer {
    pub fn enter(self: &Arc<Self>, ip: std::net::IpAddr, max: usize) -> Option<PeerSlot> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            peers: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut m = self.peers.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let per_peer = Arc::new(PerPeer::default());
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of file descriptors and the like: wait, do not spin.
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = limits.max_connections, "too many connections; closing one");
            drop(stream);
            continue;
        };
        let Some(peer_slot) = per_peer.enter(peer.ip(), limits.max_per_peer) else {
            tracing::debug!(%peer, max = limits.max_per_peer, "too many connections from one address; closing one");
            drop(stream);
            continue;
        };
        // With upgrades, for the websockets of exec and connect: an upgraded
        // connection leaves hyper (and this drain) once it is handed over.
        // Each request carries its peer (`ConnectInfo`), as `axum::serve` gives it.
        let service = router
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        let conn = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
            .with_upgrades();
        let mut stopping = stopping.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let ended = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { let _ = stopping.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
            drop(peer_slot);
            drop(permit);
        });
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    // Every connection holds a permit until it is done.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::info!("requests still under way at shutdown were cut");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn one_address_holds_at_most_its_share_of_connections() {
        let peers = Arc::new(PerPeer::default());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap());
        let first = peers.enter(a, 2).unwrap();
        let _second = peers.enter(a, 2).unwrap();
        assert!(peers.enter(a, 2).is_none(), "a third from a");
        assert!(peers.enter(b, 2).is_some(), "b is not held back by a");
        drop(first);
        assert!(peers.enter(a, 2).is_some(), "a closed one frees its slot");
    }
}

//! The front door: published ports (`vps create -p`) answered at the host.
//! Each running or paused instance's published port has an external port
//! here; a TCP connection to it is spliced (zero-copy, as the SSH proxy
//! does) to the instance's node port on its node, and UDP datagrams are
//! relayed, one upstream socket per client. The node DNATs its node port
//! to the instance and answers only the host's addresses, so users need
//! only the host's address, and nodes need no public one.
//!
//! The doors follow the store: a loop compares the doors that should be
//! open (a pure function of the tasks and nodes) with those that are, on
//! every change and every second. Closing a door ends its connections.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::{AbortHandle, JoinSet};

use super::proxy::{keepalive, relay, PerPeer, RelayMode};
use super::HostState;
use crate::api::ports::Proto;
use crate::api::{url_host, NodeView, TaskState, TaskView};

/// One open external port and where it leads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Door {
    pub task: u64,
    /// The node's address as the host reaches it (host part of its runner URL).
    pub node: String,
    pub node_port: u16,
}

/// The doors' limits, per door and for all of them together (so that no
/// instance's ports, nor a flood of spoofed UDP sources, can take the
/// host's descriptors and memory from its API and SSH proxy).
#[derive(Clone, Debug)]
pub struct DoorLimits {
    /// TCP connections one door holds at once.
    pub max_connections: usize,
    /// TCP connections all doors hold at once.
    pub max_total_connections: usize,
    /// TCP connections one address may hold at one door.
    pub max_per_peer: usize,
    /// UDP peers one door relays for at once.
    pub max_udp_peers: usize,
    /// UDP peers one address may be at one door (UDP sources are easily spoofed).
    pub max_udp_per_peer: usize,
    /// UDP peers all doors relay for at once (each holds a socket and a
    /// datagram buffer).
    pub max_total_udp_peers: usize,
    /// A UDP peer silent this long is forgotten.
    pub udp_idle: Duration,
    pub connect_timeout: Duration,
}

impl Default for DoorLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_total_connections: 8192,
            max_per_peer: 64,
            max_udp_peers: 256,
            max_udp_per_peer: 16,
            max_total_udp_peers: 2048,
            udp_idle: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// The permits all doors draw from.
#[derive(Clone)]
struct Totals {
    tcp: Arc<Semaphore>,
    udp: Arc<Semaphore>,
}

/// The doors that should be open: every published port of every running or
/// paused instance whose node the host knows.
pub fn wanted(tasks: &[TaskView], nodes: &[NodeView]) -> BTreeMap<(u16, Proto), Door> {
    let mut doors = BTreeMap::new();
    for t in tasks {
        if !matches!(t.state, TaskState::Running | TaskState::Paused) {
            continue;
        }
        let Some(p) = &t.placement else { continue };
        let Some(node) = nodes
            .iter()
            .find(|n| n.name == p.node)
            .and_then(|n| url_host(&n.runner_url))
        else {
            continue;
        };
        for x in &p.published {
            doors.insert(
                (x.external, x.proto),
                Door {
                    task: t.id,
                    node: node.clone(),
                    node_port: x.node_port,
                },
            );
        }
    }
    doors
}

/// Keeps the doors as the store says until the task is dropped.
pub async fn serve(state: Arc<HostState>, bind: IpAddr, limits: DoorLimits) {
    let mut changes = state.revision.subscribe();
    let totals = Totals {
        tcp: Arc::new(Semaphore::new(limits.max_total_connections)),
        udp: Arc::new(Semaphore::new(limits.max_total_udp_peers)),
    };
    let mut open: BTreeMap<(u16, Proto), (Door, AbortHandle)> = BTreeMap::new();
    let mut doors = JoinSet::new();
    loop {
        let found = state
            .blocking(|s| {
                let mut tasks = s.list_tasks(Some(TaskState::Running), None, None)?;
                tasks.extend(s.list_tasks(Some(TaskState::Paused), None, None)?);
                Ok((tasks, s.list_nodes()?))
            })
            .await;
        match found {
            Ok((tasks, nodes)) => {
                let want = wanted(&tasks, &nodes);
                open.retain(|key, (door, handle)| {
                    let keep = want.get(key) == Some(door);
                    if !keep {
                        handle.abort();
                        tracing::info!(port = key.0, proto = %key.1, task = door.task, "published port closed");
                    }
                    keep
                });
                for (key, door) in want {
                    if open.contains_key(&key) {
                        continue;
                    }
                    let addr = SocketAddr::new(bind, key.0);
                    let opened = match key.1 {
                        Proto::Tcp => TcpListener::bind(addr).await.map(|l| {
                            doors.spawn(tcp_door(l, door.clone(), limits.clone(), totals.clone()))
                        }),
                        Proto::Udp => UdpSocket::bind(addr).await.map(|s| {
                            doors.spawn(udp_door(s, door.clone(), limits.clone(), totals.clone()))
                        }),
                    };
                    match opened {
                        Ok(handle) => {
                            tracing::info!(port = key.0, proto = %key.1, task = door.task, node = %door.node, node_port = door.node_port, "published port open");
                            open.insert(key, (door, handle));
                        }
                        // Tried again at the next round: the port may be
                        // held by a connection of a door just closed.
                        Err(e) => {
                            tracing::warn!(%addr, proto = %key.1, task = door.task, error = %e, "cannot open a published port")
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the published ports"),
        }
        while doors.try_join_next().is_some() {}
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
    }
}

async fn connect(door: &Door, limits: &DoorLimits) -> std::io::Result<TcpStream> {
    let s = tokio::time::timeout(
        limits.connect_timeout,
        TcpStream::connect((door.node.as_str(), door.node_port)),
    )
    .await
    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    keepalive(&s);
    Ok(s)
}

/// Accepts and splices until aborted; its connections end with it.
async fn tcp_door(listener: TcpListener, door: Door, limits: DoorLimits, totals: Totals) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let peers = Arc::new(PerPeer::default());
    let mut conns = JoinSet::new();
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "published port accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while conns.try_join_next().is_some() {}
        // Over a limit: closed at once (the client sees a reset or EOF).
        let Some(slot) = peers.enter(peer.ip(), limits.max_per_peer) else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let Ok(total) = totals.tcp.clone().try_acquire_owned() else {
            continue;
        };
        keepalive(&client);
        let (door, limits) = (door.clone(), limits.clone());
        conns.spawn(async move {
            match connect(&door, &limits).await {
                Ok(upstream) => {
                    if let Err(e) = relay(client, upstream, RelayMode::Splice).await {
                        tracing::debug!(task = door.task, %peer, error = %e, "published port connection ended with an error");
                    }
                }
                Err(e) => {
                    tracing::debug!(task = door.task, %peer, error = %e, "cannot reach the instance's node port")
                }
            }
            drop((permit, total, slot));
        });
    }
}

/// Relays datagrams until aborted: each client address gets its own
/// upstream socket (so answers find their way back), forgotten after
/// `udp_idle` of silence.
async fn udp_door(socket: UdpSocket, door: Door, limits: DoorLimits, totals: Totals) {
    let socket = Arc::new(socket);
    let mut upstreams: BTreeMap<SocketAddr, Arc<UdpSocket>> = BTreeMap::new();
    let mut per_ip: BTreeMap<IpAddr, usize> = BTreeMap::new();
    let mut relays: JoinSet<SocketAddr> = JoinSet::new();
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            got = socket.recv_from(&mut buf) => {
                let Ok((n, peer)) = got else { continue };
                let up = match upstreams.get(&peer) {
                    Some(u) => u.clone(),
                    None => {
                        let mine = per_ip.get(&peer.ip()).copied().unwrap_or(0);
                        if upstreams.len() >= limits.max_udp_peers || mine >= limits.max_udp_per_peer {
                            continue;
                        }
                        let Ok(total) = totals.udp.clone().try_acquire_owned() else { continue };
                        let Ok(u) = upstream_udp(&door).await else { continue };
                        let u = Arc::new(u);
                        upstreams.insert(peer, u.clone());
                        *per_ip.entry(peer.ip()).or_default() += 1;
                        let back = udp_back(u.clone(), socket.clone(), peer, limits.udp_idle);
                        relays.spawn(async move {
                            let peer = back.await;
                            drop(total);
                            peer
                        });
                        u
                    }
                };
                let _ = up.send(&buf[..n]).await;
            }
            Some(Ok(peer)) = relays.join_next() => {
                upstreams.remove(&peer);
                if let Some(n) = per_ip.get_mut(&peer.ip()) {
                    *n -= 1;
                    if *n == 0 {
                        per_ip.remove(&peer.ip());
                    }
                }
            }
        }
    }
}

async fn upstream_udp(door: &Door) -> std::io::Result<UdpSocket> {
    let target = tokio::net::lookup_host((door.node.as_str(), door.node_port))
        .await?
        .next()
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
    let any: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse().expect("an address")
    } else {
        "[::]:0".parse().expect("an address")
    };
    let u = UdpSocket::bind(any).await?;
    u.connect(target).await?;
    Ok(u)
}

/// Sends the instance's answers back to `peer` until it has been silent
/// for `idle` (both ways: a datagram from the peer counts only when the
/// instance answers, as a stateless relay can tell no more).
async fn udp_back(
    up: Arc<UdpSocket>,
    door: Arc<UdpSocket>,
    peer: SocketAddr,
    idle: Duration,
) -> SocketAddr {
    let mut buf = vec![0u8; 65536];
    while let Ok(Ok(n)) = tokio::time::timeout(idle, up.recv(&mut buf)).await {
        let _ = door.send_to(&buf[..n], peer).await;
    }
    peer
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ports::Published;

    fn task(id: u64, state: TaskState, node: &str, published: Vec<Published>) -> TaskView {
        let mut v: TaskView = serde_json::from_value(serde_json::json!({
            "id": id, "state": "running", "desired": "running",
            "spec": {"command": [], "image": {"environment": "base"}},
            "placement": {"node": node, "numa": null, "cpus": "", "memory_bytes": 0, "gpus": []},
            "reason": "", "exit_code": null, "message": null, "submitted_at_unix_ms": 0,
            "started_at_unix_ms": null, "finished_at_unix_ms": null,
        }))
        .unwrap();
        v.state = state;
        v.placement.as_mut().unwrap().published = published;
        v
    }

    #[test]
    fn doors_are_those_of_live_instances_on_known_nodes() {
        let p = |external, proto| Published {
            request: 8081,
            proto,
            internal: 8081,
            node_port: 30001,
            external,
        };
        let nodes = [crate::api::test_node("n1", "http://10.0.0.2:8001")];
        let tasks = [
            task(
                1,
                TaskState::Running,
                "n1",
                vec![p(20001, Proto::Tcp), p(20002, Proto::Udp)],
            ),
            task(2, TaskState::Paused, "n1", vec![p(20003, Proto::Tcp)]),
            task(3, TaskState::Stopped, "n1", vec![p(20004, Proto::Tcp)]),
            task(4, TaskState::Running, "gone", vec![p(20005, Proto::Tcp)]),
        ];
        let w = wanted(&tasks, &nodes);
        let keys: Vec<(u16, Proto)> = w.keys().copied().collect();
        assert_eq!(
            keys,
            [
                (20001, Proto::Tcp),
                (20002, Proto::Udp),
                (20003, Proto::Tcp)
            ]
        );
        assert_eq!(
            w[&(20001, Proto::Tcp)],
            Door {
                task: 1,
                node: "10.0.0.2".into(),
                node_port: 30001
            }
        );
    }
}

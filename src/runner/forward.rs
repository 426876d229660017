//! The runner's end of `rivernode forward` (`GET /api/tasks/{id}/forward`,
//! the host's token only): connections to a port of the instance, made from
//! inside its network namespace to 127.0.0.1, as `kubectl port-forward`
//! does, so a server bound to the instance's loopback (Jupyter's default)
//! is reached too and no firewall rule has to open. The namespace is
//! entered through a pidfd of the instance's first process, which also
//! tells when the instance ends: the session ends with it.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures_util::{SinkExt, StreamExt};
use tokio::io::unix::AsyncFd;

use crate::api::forward::{
    decode, Endpoint, ForwardEnd, ForwardQuery, Mux, Proto, CLOSE, MAX_CONNECTIONS, OPEN,
};

/// A pidfd of process `pid` (pidfd_open(2)): it stays that process even
/// when the pid is reused, and polls readable once the process has ended.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = nix::libc::pid_t::try_from(pid)
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; nothing of ours is read or written.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just returned to us and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// How long a connection to the instance's port may take to be accepted.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one frame may wait for the websocket to take it before the
/// session is ended (the client stopped reading).
const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// A socket made inside the network namespace of the process behind
/// `pidfd` (a socket stays in the namespace it was made in): for TCP
/// unconnected, for UDP bound to 127.0.0.1 and connected to `port`. It is
/// made on a short thread of its own that enters the namespace and ends,
/// so no thread of the runner is left in an instance's namespace and none
/// waits there; a TCP connect then waits on the runtime, with a deadline.
async fn socket_inside(pidfd: Arc<OwnedFd>, proto: Proto, port: u16) -> std::io::Result<OwnedFd> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("rn-forward-ns".into())
        .spawn(move || {
            let made = (|| -> std::io::Result<OwnedFd> {
                nix::sched::setns(&*pidfd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                Ok(match proto {
                    Proto::Tcp => {
                        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
                        socket(
                            AddressFamily::Inet,
                            SockType::Stream,
                            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                            None,
                        )
                        .map_err(std::io::Error::from)?
                    }
                    Proto::Udp => {
                        let s = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
                        s.connect((Ipv4Addr::LOCALHOST, port))?;
                        s.set_nonblocking(true)?;
                        OwnedFd::from(s)
                    }
                })
            })();
            let _ = tx.send(made);
        })?;
    rx.await
        .map_err(|_| std::io::Error::other("the namespace thread ended without a socket"))?
}

fn endpoint(pidfd: Arc<OwnedFd>, proto: Proto, port: u16) -> Endpoint {
    match proto {
        Proto::Tcp => Endpoint::Tcp(Box::pin(async move {
            let fd = socket_inside(pidfd, proto, port).await?;
            let socket = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
            let to = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(to))
                .await
                .map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("port {port} did not answer within {CONNECT_TIMEOUT:?}"),
                    )
                })?
        })),
        Proto::Udp => Endpoint::Udp(Box::pin(async move {
            let fd = socket_inside(pidfd, proto, port).await?;
            tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(fd))
        })),
    }
}

/// Resolves once the process behind `pidfd` has ended; at once when that
/// cannot be watched (the session must not outlive an instance unseen).
async fn exited(pidfd: Arc<OwnedFd>) -> Option<String> {
    // SAFETY: the AsyncFd owns a clone of the Arc, so the pidfd stays
    // open, and the same descriptor, for as long as it is registered.
    let registered =
        unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) };
    match registered {
        Ok(fd) => {
            let _ = fd.readable().await;
            None
        }
        Err(e) => Some(format!("cannot watch the instance's process: {e}")),
    }
}

/// Sends `m`, false when the client did not take it within `SEND_TIMEOUT`.
async fn send(ws_tx: &mut futures_util::stream::SplitSink<WebSocket, Message>, m: Message) -> bool {
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, ws_tx.send(m)).await,
        Ok(Ok(()))
    )
}

/// Serves one forward session for instance `id` (its first process behind
/// `pidfd`) until the client goes or the instance ends.
pub async fn serve(id: u64, pidfd: OwnedFd, q: ForwardQuery, ws: WebSocket) {
    let pidfd = Arc::new(pidfd);
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut mux, mut out, mut finished) = Mux::new();
    let overflow = mux.overflow();
    // Sending has its own task, so reading the socket never waits on it.
    // Told the session's end, it sends what is queued by then, the reason
    // and a close; a client that stops reading ends it too.
    let (end_tx, mut end_rx) = tokio::sync::oneshot::channel::<Option<String>>();
    let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel::<()>();
    let sender = tokio::spawn(async move {
        let reason = loop {
            tokio::select! {
                f = out.recv() => match f {
                    Some(f) => {
                        if !send(&mut ws_tx, Message::Binary(f.into())).await {
                            let _ = stalled_tx.send(());
                            return;
                        }
                    }
                    // The mux is gone: the session is ending, and why
                    // comes next (a closed channel can win the race
                    // against the reason, which must still be told).
                    None => break (&mut end_rx).await.ok().flatten(),
                },
                r = &mut end_rx => break r.ok().flatten(),
            }
        };
        while let Some(f) = out.try_recv() {
            if !send(&mut ws_tx, Message::Binary(f.into())).await {
                return;
            }
        }
        if let Some(reason) = reason {
            if let Ok(text) = serde_json::to_string(&ForwardEnd { reason }) {
                send(&mut ws_tx, Message::Text(text.into())).await;
            }
        }
        send(&mut ws_tx, Message::Close(None)).await;
    });
    let exited = exited(pidfd.clone());
    tokio::pin!(exited);
    tokio::pin!(stalled_rx);
    tracing::info!(task = id, port = q.port, proto = %q.proto, "forward started");
    let reason = loop {
        tokio::select! {
            why = &mut exited => break Some(why.unwrap_or_else(|| format!("task {id} stopped"))),
            _ = overflow.wait() => break Some("the client does not read what it is sent".into()),
            _ = &mut stalled_rx => break None,
            c = finished.recv() => {
                if let Some(c) = c {
                    mux.finished(c);
                }
            }
            m = ws_rx.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    let Some(f) = decode(&b) else { continue };
                    if f.op != OPEN {
                        mux.frame(f);
                    } else if mux.contains(f.conn) {
                        mux.send(CLOSE, f.conn, b"connection number already in use");
                    } else if mux.live() >= MAX_CONNECTIONS {
                        mux.send(
                            CLOSE,
                            f.conn,
                            format!("more than {MAX_CONNECTIONS} connections in one forward").as_bytes(),
                        );
                    } else {
                        mux.open(f.conn, endpoint(pidfd.clone(), q.proto, q.port));
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break None,
                Some(Ok(_)) => {}
            },
        }
    };
    tracing::info!(task = id, port = q.port, ?reason, "forward ended");
    // Why first, then every connection's sockets close with the mux.
    let _ = end_tx.send(reason);
    drop(mux);
    let _ = sender.await;
}

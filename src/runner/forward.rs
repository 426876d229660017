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

/// A socket made inside the network namespace of the process behind
/// `pidfd`, connected to 127.0.0.1:`port` there. It is made on a thread of
/// its own that enters the namespace and then ends, so no thread of the
/// runner is left in an instance's namespace.
async fn connect_inside(
    pidfd: Arc<OwnedFd>,
    proto: Proto,
    port: u16,
) -> std::io::Result<std::os::fd::OwnedFd> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let made = (|| -> std::io::Result<OwnedFd> {
            nix::sched::setns(&*pidfd, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            let to = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            Ok(match proto {
                Proto::Tcp => {
                    let s = std::net::TcpStream::connect(to)?;
                    s.set_nonblocking(true)?;
                    OwnedFd::from(s)
                }
                Proto::Udp => {
                    let s = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
                    s.connect(to)?;
                    s.set_nonblocking(true)?;
                    OwnedFd::from(s)
                }
            })
        })();
        let _ = tx.send(made);
    });
    rx.await
        .map_err(|_| std::io::Error::other("the namespace thread ended without a socket"))?
}

fn endpoint(pidfd: Arc<OwnedFd>, proto: Proto, port: u16) -> Endpoint {
    match proto {
        Proto::Tcp => Endpoint::Tcp(Box::pin(async move {
            let fd = connect_inside(pidfd, proto, port).await?;
            tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd))
        })),
        Proto::Udp => Endpoint::Udp(Box::pin(async move {
            let fd = connect_inside(pidfd, proto, port).await?;
            tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(fd))
        })),
    }
}

/// Serves one forward session for instance `id` (its first process behind
/// `pidfd`) until the client goes or the instance ends.
pub async fn serve(id: u64, pidfd: OwnedFd, q: ForwardQuery, ws: WebSocket) {
    let pidfd = Arc::new(pidfd);
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut mux, mut out, mut finished) = Mux::new();
    // Sending has its own task, so reading the socket never waits on it.
    let (end_tx, end_rx) = tokio::sync::oneshot::channel::<String>();
    let sender = tokio::spawn(async move {
        while let Some(f) = out.recv().await {
            if ws_tx.send(Message::Binary(f.into())).await.is_err() {
                return;
            }
        }
        if let Ok(reason) = end_rx.await {
            if let Ok(text) = serde_json::to_string(&ForwardEnd { reason }) {
                let _ = ws_tx.send(Message::Text(text.into())).await;
            }
            let _ = ws_tx.send(Message::Close(None)).await;
        }
    });
    let exited = async {
        // SAFETY: the AsyncFd owns a clone of the Arc, so the pidfd stays
        // open, and the same descriptor, for as long as it is registered.
        let registered = unsafe {
            AsyncFd::register_with_interest(pidfd.clone(), tokio::io::Interest::READABLE)
        };
        match registered {
            Ok(fd) => {
                let _ = fd.readable().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::pin!(exited);
    tracing::info!(task = id, port = q.port, proto = %q.proto, "forward started");
    let reason = loop {
        tokio::select! {
            _ = &mut exited => break Some(format!("task {id} stopped")),
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
                        // A number in use: the client's mistake, not a new stream.
                    } else if mux.len() >= MAX_CONNECTIONS {
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
    // Every connection's sockets close with the mux.
    drop(mux);
    if let Some(reason) = reason {
        let _ = end_tx.send(reason);
    } else {
        drop(end_tx);
    }
    let _ = sender.await;
}

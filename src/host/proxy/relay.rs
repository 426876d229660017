//! Moving bytes between two sockets: zero-copy with splice(2) through a
//! pipe per direction (the kernel moves pages; nothing is copied to user
//! space), or a plain userspace copy behind the same interface.
//!
//! Pipes are pooled: a direction holds one only while bytes wait in it.
//!
//! The readiness trap: splice from a socket into a *full* pipe also fails
//! with EAGAIN, and reporting that to tokio as the socket's WouldBlock would
//! clear the socket's readiness and stall the relay. So only a read into an
//! empty pipe goes through tokio's readiness (its EAGAIN is the socket's);
//! top-ups while data waits in the pipe are plain non-blocking calls.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Pipe capacity per direction: large batches, few syscalls.
const PIPE_SIZE: i32 = 1 << 20;

/// How the proxy moves bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayMode {
    Splice,
    /// Userspace copy through 1 MiB buffers (for kernels or sockets where splice fails).
    Copy,
}

/// Bytes moved in each direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Moved {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Relays until both directions are closed; each EOF is passed on as a
/// half-close (shutdown of the write side), so protocols that half-close work.
pub async fn relay(a: TcpStream, b: TcpStream, mode: RelayMode) -> io::Result<Moved> {
    match mode {
        RelayMode::Splice => {
            let (ab, ba) = tokio::try_join!(splice_one_way(&a, &b), splice_one_way(&b, &a))?;
            Ok(Moved {
                a_to_b: ab,
                b_to_a: ba,
            })
        }
        RelayMode::Copy => {
            let (mut a, mut b) = (a, b);
            let (ab, ba) =
                tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 1 << 20, 1 << 20).await?;
            Ok(Moved {
                a_to_b: ab,
                b_to_a: ba,
            })
        }
    }
}

/// A pipe, both ends.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

fn pipe() -> io::Result<Pipe> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A smaller pipe still works, only with more syscalls: ignore a refusal
    // (e.g. above /proc/sys/fs/pipe-max-size).
    let _ = fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    Ok(Pipe { r, w })
}

/// Empty pipes kept for the next direction that has data. A tunnel holds a
/// pipe only while bytes wait in it: most SSH tunnels are idle most of the
/// time, so 10,000 open tunnels need 20,000 descriptors (their sockets),
/// not 60,000, and no pipe buffers while they sit.
static SPARE_PIPES: std::sync::Mutex<Vec<Pipe>> = std::sync::Mutex::new(Vec::new());

/// How many empty pipes are kept at most (the rest are closed).
const SPARE_PIPES_KEPT: usize = 256;

fn take_pipe() -> io::Result<Pipe> {
    let spare = SPARE_PIPES.lock().ok().and_then(|mut v| v.pop());
    spare.map_or_else(pipe, Ok)
}

/// Bytes waiting in a pipe, as the kernel counts them.
fn queued(p: &Pipe) -> Option<usize> {
    let mut n: nix::libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points
    // at a live local; the descriptor is the pipe's open read end.
    let r = unsafe { nix::libc::ioctl(p.r.as_raw_fd(), nix::libc::FIONREAD, &mut n) };
    (r == 0).then_some(n as usize)
}

/// Gives back a pipe that is empty (only then may another tunnel use it).
/// The relay only calls this with nothing in the pipe by its own count;
/// the kernel's count is asked too, since a pipe handed on with one
/// tunnel's bytes in it would put them into another's stream.
fn give_back(p: Pipe) {
    if queued(&p) != Some(0) {
        return;
    }
    if let Ok(mut v) = SPARE_PIPES.lock() {
        if v.len() < SPARE_PIPES_KEPT {
            v.push(p);
        }
    }
}

/// How many pipes are kept spare now (for tests and the tunnels bench).
pub fn spare_pipes() -> usize {
    SPARE_PIPES.lock().map(|v| v.len()).unwrap_or(0)
}

fn fill(from: &TcpStream, p: &Pipe) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    splice(
        from.as_fd(),
        None,
        p.w.as_fd(),
        None,
        PIPE_SIZE as usize,
        flags,
    )
    .map_err(io::Error::from)
}

async fn splice_one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    // Held only while bytes wait in it (see SPARE_PIPES).
    let mut held: Option<Pipe> = None;
    let mut in_pipe = 0usize;
    let mut total = 0u64;
    let mut eof = false;
    loop {
        if !eof {
            let filled = if in_pipe == 0 {
                // Empty: the pipe goes back while the socket is idle.
                if let Some(p) = held.take() {
                    give_back(p);
                }
                // Nothing buffered: EAGAIN can only mean the socket is empty, so
                // let tokio clear its readiness and wait.
                from.readable().await?;
                let p = held.insert(take_pipe()?);
                match from.try_io(Interest::READABLE, || fill(from, p)) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    r => r,
                }
            } else {
                // Top up while data waits to be sent; an EAGAIN here may be the
                // pipe's, so it must not touch the socket's readiness.
                let p = held.as_ref().expect("a pipe holds the bytes in it");
                match fill(from, p) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(usize::MAX),
                    r => r,
                }
            };
            match filled {
                Ok(0) => eof = true,
                Ok(usize::MAX) => {}
                Ok(n) => in_pipe += n,
                // A pipe that may hold bytes is dropped (closed), never reused.
                Err(e) => return Err(e),
            }
        }
        if in_pipe == 0 {
            if eof {
                if let Some(p) = held.take() {
                    give_back(p);
                }
                // Pass the half-close on.
                let _ = nix::sys::socket::shutdown(
                    std::os::fd::AsRawFd::as_raw_fd(to),
                    nix::sys::socket::Shutdown::Write,
                );
                return Ok(total);
            }
            continue;
        }
        let p = held.as_ref().expect("a pipe holds the bytes in it");
        to.writable().await?;
        let w = to.try_io(Interest::WRITABLE, || {
            splice(p.r.as_fd(), None, to.as_fd(), None, in_pipe, flags).map_err(io::Error::from)
        });
        match w {
            Ok(n) => {
                in_pipe -= n;
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A pair of connected sockets: (our side, the peer's side).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (s, c)
    }

    async fn check(mode: RelayMode) {
        // client <-> [x | relay | y] <-> server
        let (x, mut client) = pair().await;
        let (y, mut server) = pair().await;
        let relay = tokio::spawn(relay(x, y, mode));
        let data: Vec<u8> = (0..(8u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let want = Sha256::digest(&data);
        let send = tokio::spawn(async move {
            client.write_all(&data).await.unwrap();
            client.shutdown().await.unwrap();
            // The server answers after our half-close and closes.
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(Sha256::digest(&got), want, "{mode:?}: bytes arrive intact");
        server.write_all(b"thanks").await.unwrap();
        drop(server);
        assert_eq!(
            send.await.unwrap(),
            b"thanks",
            "{mode:?}: the other direction after a half-close"
        );
        let moved = relay.await.unwrap().unwrap();
        assert_eq!(
            moved,
            Moved {
                a_to_b: 8 << 20,
                b_to_a: 6
            }
        );
    }

    #[tokio::test]
    async fn splice_relays_both_ways_with_half_close() {
        check(RelayMode::Splice).await;
    }

    /// Pipes open in this process (distinct pipe inodes among its descriptors).
    fn open_pipes() -> usize {
        let mut inodes = std::collections::BTreeSet::new();
        for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            if let Ok(target) = std::fs::read_link(e.path()) {
                let t = target.to_string_lossy().into_owned();
                if t.starts_with("pipe:") {
                    inodes.insert(t);
                }
            }
        }
        inodes.len()
    }

    #[tokio::test]
    async fn idle_tunnels_hold_no_pipes() {
        const TUNNELS: usize = 60;
        let before = open_pipes();
        let mut ends = Vec::new();
        for _ in 0..TUNNELS {
            let (x, mut client) = pair().await;
            let (y, mut server) = pair().await;
            tokio::spawn(relay(x, y, RelayMode::Splice));
            // One byte each way: both directions have used a pipe.
            client.write_all(b"?").await.unwrap();
            let mut one = [0u8; 1];
            server.read_exact(&mut one).await.unwrap();
            server.write_all(b"!").await.unwrap();
            client.read_exact(&mut one).await.unwrap();
            ends.push((client, server));
        }
        // With a pipe per direction for its life, 60 open tunnels would
        // hold 120 pipes; idle, they hold none (the spares, and the other
        // relay tests' pipes of this process, are far fewer).
        let pipes = open_pipes().saturating_sub(before);
        assert!(
            pipes < TUNNELS,
            "{pipes} more pipes open for {TUNNELS} idle tunnels"
        );
        drop(ends);
    }

    /// Many tunnels at once through the pool, each with its own bytes and
    /// slow readers (so pipes fill, wait and are handed on): every stream
    /// arrives whole and only its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tunnels_sharing_the_pool_keep_their_own_bytes() {
        let mut runs = Vec::new();
        for t in 0..24u32 {
            runs.push(tokio::spawn(async move {
                let (x, mut client) = pair().await;
                let (y, mut server) = pair().await;
                tokio::spawn(relay(x, y, RelayMode::Splice));
                let data: Vec<u8> = (0..(256u32 << 10))
                    .map(|i| (i.wrapping_mul(2654435761).wrapping_add(t * 7919) >> 11) as u8)
                    .collect();
                let want = Sha256::digest(&data);
                let send = tokio::spawn(async move {
                    for piece in data.chunks(8192) {
                        client.write_all(piece).await.unwrap();
                        tokio::task::yield_now().await;
                    }
                    client.shutdown().await.unwrap();
                    client
                });
                let mut got = Vec::new();
                let mut buf = vec![0u8; 4096];
                loop {
                    let n = server.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    tokio::time::sleep(std::time::Duration::from_micros(200)).await;
                }
                drop(send.await.unwrap());
                assert_eq!(
                    Sha256::digest(&got),
                    want,
                    "tunnel {t} got another's bytes or lost some"
                );
            }));
        }
        for r in runs {
            r.await.unwrap();
        }
    }

    #[tokio::test]
    async fn copy_relays_both_ways_with_half_close() {
        check(RelayMode::Copy).await;
    }
}

//! The protocol of `rivernode forward`: one websocket from the CLI through
//! the host to the runner (the host relays frames unchanged) carries many
//! connections to one port of an instance. The port and protocol are in
//! the URL (`?port=8888&proto=tcp`). Every binary frame is
//! `[op][connection: u32 big-endian][data]`:
//!
//! - `OPEN` (client): a new local connection (TCP) or peer (UDP) numbered
//!   by the client; the runner connects to the port inside the instance.
//! - `DATA` (both ways): bytes of a TCP stream or one UDP datagram.
//! - `EOF` (both ways): that side will send no more (TCP half-close).
//! - `CLOSE` (both ways): the connection is gone; its data may say why
//!   (e.g. "connection refused").
//! - `WINDOW` (both ways): the data is a u32 big-endian count of bytes of
//!   this connection the sender has written out; the other side may send
//!   that many more. Each side starts with `WINDOW_BYTES` of credit, so a
//!   slow reader slows its own connection's sender down and no other, and
//!   neither side ever queues more than the window per connection. A UDP
//!   datagram that finds no credit is dropped, as a full network would.
//!
//! The runner's last frame is a text `ForwardEnd` (the instance stopped, or
//! the session could not start), then it closes.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::AbortHandle;

pub const OPEN: u8 = 0;
pub const DATA: u8 = 1;
pub const EOF: u8 = 2;
pub const CLOSE: u8 = 3;
pub const WINDOW: u8 = 4;

/// The credit each side of a connection starts with.
pub const WINDOW_BYTES: usize = 256 << 10;

/// How long a cleanly closed connection may take to write out what is
/// queued for its socket.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(30);

/// The most one `DATA` frame of a TCP stream carries.
const CHUNK: usize = 32 << 10;

/// Connections one session may have open at once; more are refused with a
/// `CLOSE` saying so, so that a client cannot exhaust the runner's files.
pub const MAX_CONNECTIONS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// The query of the forward route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardQuery {
    pub port: u16,
    #[serde(default = "default_proto")]
    pub proto: Proto,
}

fn default_proto() -> Proto {
    Proto::Tcp
}

impl ForwardQuery {
    /// A refusal naming the field.
    pub fn check(&self) -> Result<(), String> {
        if self.port == 0 {
            return Err("port: 0 is no port; give the instance's port (1-65535)".into());
        }
        Ok(())
    }

    pub fn to_query(&self) -> String {
        format!("port={}&proto={}", self.port, self.proto)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardEnd {
    pub reason: String,
}

/// One decoded frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub op: u8,
    pub conn: u32,
    pub data: &'a [u8],
}

pub fn encode(op: u8, conn: u32, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + data.len());
    f.push(op);
    f.extend_from_slice(&conn.to_be_bytes());
    f.extend_from_slice(data);
    f
}

/// The frame in `b`, or `None` for one too short or of an unknown op (a
/// newer peer's), which the reader skips.
pub fn decode(b: &[u8]) -> Option<Frame<'_>> {
    let (&op, rest) = b.split_first()?;
    if op > WINDOW || rest.len() < 4 {
        return None;
    }
    let (conn, data) = rest.split_at(4);
    Some(Frame {
        op,
        conn: u32::from_be_bytes(conn.try_into().ok()?),
        data,
    })
}

/// What a connection's writer is handed.
enum Input {
    Data(Vec<u8>),
    Eof,
}

struct Conn {
    input: mpsc::UnboundedSender<Input>,
    credit: Arc<Semaphore>,
    tasks: Vec<AbortHandle>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Either end's connections of one session: it turns frames from the
/// websocket into writes to sockets, and sockets' reads into frames on
/// `out`. The caller owns the websocket: it sends what `out` yields, feeds
/// every received frame to `frame`, and hands every number `finished`
/// yields back to `finished`. Every queue here is unbounded, yet bounded by
/// the windows: no side's reading ever waits for its writing, so two ends
/// that both send a lot cannot wait on each other.
pub struct Mux {
    out: mpsc::UnboundedSender<Vec<u8>>,
    done: mpsc::UnboundedSender<u32>,
    conns: HashMap<u32, Conn>,
}

/// Where a connection's data goes and comes from.
pub enum Endpoint {
    /// A TCP stream, once connected.
    Tcp(Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>),
    /// A connected UDP socket, once made (the runner's end of a flow).
    Udp(Pin<Box<dyn Future<Output = std::io::Result<UdpSocket>> + Send>>),
    /// One peer of a shared local UDP socket (the CLI's end of a flow): its
    /// datagrams come in through `Mux::datagram`.
    UdpPeer(Arc<UdpSocket>, SocketAddr),
}

impl Mux {
    /// The mux, what it sends, and the connections that have ended.
    pub fn new() -> (
        Mux,
        mpsc::UnboundedReceiver<Vec<u8>>,
        mpsc::UnboundedReceiver<u32>,
    ) {
        let (out, out_rx) = mpsc::unbounded_channel();
        let (done, done_rx) = mpsc::unbounded_channel();
        (
            Mux {
                out,
                done,
                conns: HashMap::new(),
            },
            out_rx,
            done_rx,
        )
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn contains(&self, conn: u32) -> bool {
        self.conns.contains_key(&conn)
    }

    /// Sends a frame of this end's own (`OPEN`, or a refusal's `CLOSE`).
    pub fn send(&self, op: u8, conn: u32, data: &[u8]) {
        let _ = self.out.send(encode(op, conn, data));
    }

    /// Starts connection `conn` on `endpoint`. Data the other side sends
    /// before it is connected waits in its queue.
    pub fn open(&mut self, conn: u32, endpoint: Endpoint) {
        let (input, rx) = mpsc::unbounded_channel();
        let credit = Arc::new(Semaphore::new(WINDOW_BYTES));
        let ends = Ends {
            conn,
            out: self.out.clone(),
            done: self.done.clone(),
            halves: Arc::new(AtomicU8::new(0)),
        };
        let c = credit.clone();
        let task = tokio::spawn(async move {
            match endpoint {
                Endpoint::Tcp(connect) => match connect.await {
                    Ok(s) => tcp(s, rx, c, ends).await,
                    Err(e) => ends.fail(&e.to_string()),
                },
                Endpoint::Udp(make) => match make.await {
                    Ok(s) => udp(s, rx, c, ends).await,
                    Err(e) => ends.fail(&e.to_string()),
                },
                Endpoint::UdpPeer(sock, peer) => udp_peer(sock, peer, rx, ends).await,
            }
        });
        self.conns.insert(
            conn,
            Conn {
                input,
                credit,
                tasks: vec![task.abort_handle()],
            },
        );
    }

    /// A datagram from a `UdpPeer` connection's peer; dropped when the
    /// other side has not made room for it.
    pub fn datagram(&self, conn: u32, data: &[u8]) {
        if let Some(c) = self.conns.get(&conn) {
            if take_credit(&c.credit, data.len()) {
                self.send(DATA, conn, data);
            }
        }
    }

    /// A frame from the other side (`OPEN` is the caller's to handle).
    pub fn frame(&mut self, f: Frame<'_>) {
        match f.op {
            DATA => {
                if let Some(c) = self.conns.get(&f.conn) {
                    let _ = c.input.send(Input::Data(f.data.to_vec()));
                }
            }
            EOF => {
                if let Some(c) = self.conns.get(&f.conn) {
                    let _ = c.input.send(Input::Eof);
                }
            }
            WINDOW => {
                if let (Some(c), Ok(n)) = (self.conns.get(&f.conn), <[u8; 4]>::try_from(f.data)) {
                    // Never more than the window: a peer cannot grant itself
                    // an unbounded queue here.
                    let room = WINDOW_BYTES.saturating_sub(c.credit.available_permits());
                    c.credit
                        .add_permits((u32::from_be_bytes(n) as usize).min(room));
                }
            }
            CLOSE => {
                if let Some(mut c) = self.conns.remove(&f.conn) {
                    if f.data.is_empty() {
                        // A clean end: both sides sent their EOF, and what
                        // is queued for the socket is still written out
                        // (the writer ends once the queue has drained),
                        // within a deadline, so a peer cannot leave a
                        // socket here open by closing too early.
                        let tasks = std::mem::take(&mut c.tasks);
                        tokio::spawn(async move {
                            tokio::time::sleep(DRAIN).await;
                            for t in tasks {
                                t.abort();
                            }
                        });
                    }
                }
            }
            _ => {}
        }
    }

    /// Forgets a connection that ended on this side (its `CLOSE` is sent).
    pub fn finished(&mut self, conn: u32) {
        self.conns.remove(&conn);
    }

    /// Ends connection `conn` from this side.
    pub fn close(&mut self, conn: u32) {
        if self.conns.remove(&conn).is_some() {
            self.send(CLOSE, conn, b"");
        }
    }
}

fn take_credit(credit: &Semaphore, n: usize) -> bool {
    match credit.try_acquire_many(n as u32) {
        Ok(p) => {
            p.forget();
            true
        }
        Err(_) => false,
    }
}

/// What a connection's tasks use to report back.
#[derive(Clone)]
struct Ends {
    conn: u32,
    out: mpsc::UnboundedSender<Vec<u8>>,
    done: mpsc::UnboundedSender<u32>,
    /// Halves (reading, writing) that ended cleanly; at two the connection is over.
    halves: Arc<AtomicU8>,
}

impl Ends {
    fn send(&self, op: u8, data: &[u8]) {
        let _ = self.out.send(encode(op, self.conn, data));
    }

    fn half_done(&self) {
        if self.halves.fetch_add(1, Ordering::AcqRel) == 1 {
            self.send(CLOSE, b"");
            let _ = self.done.send(self.conn);
        }
    }

    fn fail(&self, why: &str) {
        self.send(CLOSE, why.as_bytes());
        let _ = self.done.send(self.conn);
    }

    fn written(&self, n: usize) {
        self.send(WINDOW, &(n as u32).to_be_bytes());
    }
}

async fn tcp(
    s: TcpStream,
    mut rx: mpsc::UnboundedReceiver<Input>,
    credit: Arc<Semaphore>,
    ends: Ends,
) {
    let (mut r, mut w) = s.into_split();
    let reader = {
        let ends = ends.clone();
        async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) => {
                        ends.send(EOF, b"");
                        return Ok(());
                    }
                    Ok(n) => {
                        // Waits for the other side to make room: this
                        // connection's sender is what slows down.
                        match credit.acquire_many(n as u32).await {
                            Ok(p) => p.forget(),
                            Err(_) => return Ok(()),
                        }
                        ends.send(DATA, &buf[..n]);
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        }
    };
    let writer = {
        let ends = ends.clone();
        async move {
            while let Some(i) = rx.recv().await {
                match i {
                    Input::Data(d) => {
                        w.write_all(&d).await.map_err(|e| e.to_string())?;
                        ends.written(d.len());
                    }
                    Input::Eof => {
                        let _ = w.shutdown().await;
                        return Ok(());
                    }
                }
            }
            Ok::<(), String>(())
        }
    };
    // Each half reports its own end; an error ends the whole connection.
    let reader = async {
        match reader.await {
            Ok(()) => ends.half_done(),
            Err(e) => ends.fail(&e),
        }
    };
    let writer = async {
        match writer.await {
            Ok(()) => ends.half_done(),
            Err(e) => ends.fail(&e),
        }
    };
    tokio::join!(reader, writer);
}

async fn udp(
    s: UdpSocket,
    mut rx: mpsc::UnboundedReceiver<Input>,
    credit: Arc<Semaphore>,
    ends: Ends,
) {
    let s = Arc::new(s);
    let r = s.clone();
    let e = ends.clone();
    let reader = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match r.recv(&mut buf).await {
                Ok(n) => {
                    if take_credit(&credit, n) {
                        e.send(DATA, &buf[..n]);
                    }
                }
                // An ICMP "port unreachable" for an earlier datagram: the
                // flow goes on, as UDP does.
                Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(err) => return err.to_string(),
            }
        }
    };
    let w = ends.clone();
    let writer = async move {
        while let Some(i) = rx.recv().await {
            if let Input::Data(d) = i {
                let _ = s.send(&d).await;
                w.written(d.len());
            }
        }
    };
    // A flow has no end of its own: the CLI closes it when idle.
    tokio::select! {
        why = reader => ends.fail(&why),
        _ = writer => {}
    }
}

async fn udp_peer(
    sock: Arc<UdpSocket>,
    peer: SocketAddr,
    mut rx: mpsc::UnboundedReceiver<Input>,
    ends: Ends,
) {
    while let Some(i) = rx.recv().await {
        if let Input::Data(d) = i {
            let _ = sock.send_to(&d, peer).await;
            ends.written(d.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_skipped() {
        let f = encode(DATA, 7, b"hi");
        assert_eq!(f, [1, 0, 0, 0, 7, b'h', b'i']);
        assert_eq!(
            decode(&f),
            Some(Frame {
                op: DATA,
                conn: 7,
                data: b"hi"
            })
        );
        assert_eq!(
            decode(&encode(CLOSE, u32::MAX, b"")).unwrap().conn,
            u32::MAX
        );
        assert_eq!(decode(&[DATA, 0, 0]), None);
        assert_eq!(decode(&[9, 0, 0, 0, 1]), None);
        assert_eq!(decode(&[]), None);
    }

    fn query(q: &str) -> Result<ForwardQuery, String> {
        let uri: axum::http::Uri = format!("http://h/f?{q}").parse().unwrap();
        axum::extract::Query::<ForwardQuery>::try_from_uri(&uri)
            .map(|q| q.0)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn queries_name_the_field() {
        let q: ForwardQuery = query("port=8888").unwrap();
        assert_eq!(q.proto, Proto::Tcp);
        assert!(q.check().is_ok());
        assert_eq!(q.to_query(), "port=8888&proto=tcp");
        let q: ForwardQuery = query("port=53&proto=udp").unwrap();
        assert_eq!(q.proto, Proto::Udp);
        let zero = ForwardQuery {
            port: 0,
            proto: Proto::Tcp,
        };
        assert!(zero.check().unwrap_err().starts_with("port"));
        assert!(query("port=1&proto=sctp").is_err());
    }
}

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
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{mpsc, Notify, Semaphore};
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
pub const MAX_CONNECTIONS: usize = 128;

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
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

/// Bytes queued for the websocket, all connections together, past which
/// the session ends: the other side stopped reading. The windows bound the
/// data (every connection's full window may be in flight, legitimately);
/// the rest is room for the small frames (`WINDOW`, `CLOSE`).
pub const OUT_BUDGET: usize = MAX_CONNECTIONS * WINDOW_BYTES + (4 << 20);

/// What a queued frame is counted as beyond its bytes (the allocation and
/// the queue's own slot), so that many tiny frames are not free.
const FRAME_COST: usize = 64;

/// A connection's writer acknowledges written bytes (`WINDOW`) once this
/// many have gathered or its queue is empty: one small frame per many
/// data frames, however small the peer makes them.
const ACK_AT: usize = WINDOW_BYTES / 8;

/// Set once the outgoing queue went past `OUT_BUDGET`.
#[derive(Default)]
pub struct Overflow {
    flag: AtomicBool,
    notify: Notify,
}

impl Overflow {
    /// Resolves once the budget has been passed.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.flag.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn set(&self) {
        self.flag.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

/// The sending half of the outgoing queue, with its byte count.
#[derive(Clone)]
struct Outbox {
    tx: mpsc::UnboundedSender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    overflow: Arc<Overflow>,
}

impl Outbox {
    fn push(&self, frame: Vec<u8>) {
        let cost = frame.len() + FRAME_COST;
        if self.queued.fetch_add(cost, Ordering::AcqRel) + cost > OUT_BUDGET {
            self.queued.fetch_sub(cost, Ordering::AcqRel);
            self.overflow.set();
            return;
        }
        if self.tx.send(frame).is_err() {
            self.queued.fetch_sub(cost, Ordering::AcqRel);
        }
    }
}

/// What the mux sends, in order; the caller writes each frame to the websocket.
pub struct Outgoing {
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
}

impl Outgoing {
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        let f = self.rx.recv().await?;
        self.queued
            .fetch_sub(f.len() + FRAME_COST, Ordering::AcqRel);
        Some(f)
    }

    /// A frame already queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Vec<u8>> {
        let f = self.rx.try_recv().ok()?;
        self.queued
            .fetch_sub(f.len() + FRAME_COST, Ordering::AcqRel);
        Some(f)
    }
}

/// The credit this side has to send on one connection: a semaphore of
/// bytes, and how many bytes were sent and not yet granted back, so that
/// a grant can never lift the credit past the window.
struct Credit {
    sem: Semaphore,
    outstanding: AtomicUsize,
}

impl Credit {
    fn new() -> Self {
        Credit {
            sem: Semaphore::new(WINDOW_BYTES),
            outstanding: AtomicUsize::new(0),
        }
    }

    /// Waits for room for `n` bytes; false once the connection is gone.
    async fn take(&self, n: usize) -> bool {
        match self.sem.acquire_many(n as u32).await {
            Ok(p) => {
                p.forget();
                self.outstanding.fetch_add(n, Ordering::AcqRel);
                true
            }
            Err(_) => false,
        }
    }

    /// Room for `n` bytes now, or false (a datagram is then dropped).
    fn try_take(&self, n: usize) -> bool {
        match self.sem.try_acquire_many(n as u32) {
            Ok(p) => {
                p.forget();
                self.outstanding.fetch_add(n, Ordering::AcqRel);
                true
            }
            Err(_) => false,
        }
    }

    /// The other side wrote out `n` bytes: that much room again, but never
    /// more than was sent (a peer cannot grant itself a bigger queue here).
    fn grant(&self, n: usize) {
        let before = self
            .outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |o| Some(o - o.min(n)))
            .unwrap_or(0);
        self.sem.add_permits(before.min(n));
    }
}

struct Conn {
    input: mpsc::UnboundedSender<Input>,
    credit: Arc<Credit>,
    /// Bytes the other side sent here and this side has not yet granted
    /// back: more than a window means the peer ignores its credit.
    received: Arc<AtomicUsize>,
    tasks: Vec<AbortHandle>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Counts a connection's task as live until it ends (or is aborted).
struct Live(Arc<AtomicUsize>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Either end's connections of one session: it turns frames from the
/// websocket into writes to sockets, and sockets' reads into frames on
/// `Outgoing`. The caller owns the websocket: it sends what `Outgoing`
/// yields, feeds every received frame to `frame`, hands every number
/// `finished` yields back to `finished`, and ends the session when
/// `overflow` resolves. No side's reading ever waits for its writing, so
/// two ends that both send a lot cannot wait on each other; what is queued
/// is bounded by the windows (checked on receipt, not trusted) and by
/// `OUT_BUDGET`.
pub struct Mux {
    out: Outbox,
    done: mpsc::UnboundedSender<u32>,
    conns: HashMap<u32, Conn>,
    live: Arc<AtomicUsize>,
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
    pub fn new() -> (Mux, Outgoing, mpsc::UnboundedReceiver<u32>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (done, done_rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        (
            Mux {
                out: Outbox {
                    tx,
                    queued: queued.clone(),
                    overflow: Arc::default(),
                },
                done,
                conns: HashMap::new(),
                live: Arc::new(AtomicUsize::new(0)),
            },
            Outgoing { rx, queued },
            done_rx,
        )
    }

    /// Resolves once the other side has stopped reading (see `OUT_BUDGET`).
    pub fn overflow(&self) -> Arc<Overflow> {
        self.out.overflow.clone()
    }

    /// Connections open, closing ones still writing out included.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    pub fn contains(&self, conn: u32) -> bool {
        self.conns.contains_key(&conn)
    }

    /// Sends a frame of this end's own (`OPEN`, or a refusal's `CLOSE`).
    pub fn send(&self, op: u8, conn: u32, data: &[u8]) {
        self.out.push(encode(op, conn, data));
    }

    /// Starts connection `conn` on `endpoint`. Data the other side sends
    /// before it is connected waits in its queue.
    pub fn open(&mut self, conn: u32, endpoint: Endpoint) {
        let (input, rx) = mpsc::unbounded_channel();
        let credit = Arc::new(Credit::new());
        let received = Arc::new(AtomicUsize::new(0));
        let ends = Ends {
            conn,
            out: self.out.clone(),
            done: self.done.clone(),
            halves: Arc::new(AtomicU8::new(0)),
            received: received.clone(),
        };
        let c = credit.clone();
        self.live.fetch_add(1, Ordering::AcqRel);
        let live = Live(self.live.clone());
        let task = tokio::spawn(async move {
            let _live = live;
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
                received,
                tasks: vec![task.abort_handle()],
            },
        );
    }

    /// A datagram from a `UdpPeer` connection's peer; dropped when the
    /// other side has not made room for it.
    pub fn datagram(&self, conn: u32, data: &[u8]) {
        if let Some(c) = self.conns.get(&conn) {
            if c.credit.try_take(data.len()) {
                self.send(DATA, conn, data);
            }
        }
    }

    /// A frame from the other side (`OPEN` is the caller's to handle).
    pub fn frame(&mut self, f: Frame<'_>) {
        match f.op {
            DATA => {
                let Some(c) = self.conns.get(&f.conn) else {
                    return;
                };
                let n = f.data.len();
                if c.received.fetch_add(n, Ordering::AcqRel) + n > WINDOW_BYTES {
                    // The peer ignores its credit: this connection ends
                    // rather than queue without bound.
                    self.conns.remove(&f.conn);
                    self.send(CLOSE, f.conn, b"data sent past the connection's window");
                    return;
                }
                let _ = c.input.send(Input::Data(f.data.to_vec()));
            }
            EOF => {
                if let Some(c) = self.conns.get(&f.conn) {
                    let _ = c.input.send(Input::Eof);
                }
            }
            WINDOW => {
                if let (Some(c), Ok(n)) = (self.conns.get(&f.conn), <[u8; 4]>::try_from(f.data)) {
                    c.credit.grant(u32::from_be_bytes(n) as usize);
                }
            }
            CLOSE => {
                if let Some(mut c) = self.conns.remove(&f.conn) {
                    if f.data.is_empty() {
                        // A clean end: both sides sent their EOF, and what
                        // is queued for the socket is still written out
                        // (the writer ends once the queue has drained),
                        // within a deadline, so a peer cannot leave a
                        // socket here open by closing too early. A CLOSE
                        // with a reason is the other socket's failure (a
                        // reset): what is queued goes, as with TCP's RST.
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

/// What a connection's tasks use to report back.
#[derive(Clone)]
struct Ends {
    conn: u32,
    out: Outbox,
    done: mpsc::UnboundedSender<u32>,
    /// Halves (reading, writing) that ended cleanly; at two the connection is over.
    halves: Arc<AtomicU8>,
    received: Arc<AtomicUsize>,
}

impl Ends {
    fn send(&self, op: u8, data: &[u8]) {
        self.out.push(encode(op, self.conn, data));
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

    /// Grants back `n` written bytes, when enough have gathered or nothing
    /// more is queued (`idle`); returns what is still to grant.
    fn ack(&self, n: usize, idle: bool) -> usize {
        if n == 0 || (n < ACK_AT && !idle) {
            return n;
        }
        self.received.fetch_sub(n, Ordering::AcqRel);
        self.send(WINDOW, &(n as u32).to_be_bytes());
        0
    }
}

async fn tcp(
    s: TcpStream,
    mut rx: mpsc::UnboundedReceiver<Input>,
    credit: Arc<Credit>,
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
                        if !credit.take(n).await {
                            return Ok(());
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
            let mut unacked = 0;
            while let Some(i) = rx.recv().await {
                match i {
                    Input::Data(d) => {
                        w.write_all(&d).await.map_err(|e| e.to_string())?;
                        unacked = ends.ack(unacked + d.len(), rx.is_empty());
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
    credit: Arc<Credit>,
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
                    if credit.try_take(n) {
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
        let mut unacked = 0;
        while let Some(i) = rx.recv().await {
            if let Input::Data(d) = i {
                let _ = s.send(&d).await;
                unacked = w.ack(unacked + d.len(), rx.is_empty());
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
    let mut unacked = 0;
    while let Some(i) = rx.recv().await {
        if let Input::Data(d) = i {
            let _ = sock.send_to(&d, peer).await;
            unacked = ends.ack(unacked + d.len(), rx.is_empty());
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

    fn never() -> Endpoint {
        Endpoint::Tcp(Box::pin(std::future::pending()))
    }

    /// Every frame queued on `out` now.
    fn drain(out: &mut Outgoing) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| out.try_recv()).collect()
    }

    #[tokio::test]
    async fn a_peer_that_ignores_its_window_loses_the_connection() {
        let (mut mux, mut out, _done) = Mux::new();
        mux.open(1, never());
        let chunk = vec![0u8; CHUNK];
        for _ in 0..WINDOW_BYTES / CHUNK {
            mux.frame(decode(&encode(DATA, 1, &chunk)).unwrap());
        }
        assert!(mux.contains(1), "a full window is the peer's right");
        assert!(drain(&mut out).is_empty());
        mux.frame(decode(&encode(DATA, 1, b"x")).unwrap());
        assert!(!mux.contains(1));
        let frames = drain(&mut out);
        let f = decode(&frames[0]).unwrap();
        assert_eq!((f.op, f.conn), (CLOSE, 1));
        assert!(String::from_utf8_lossy(f.data).contains("window"));
    }

    #[test]
    fn a_grant_never_lifts_the_credit_past_the_window() {
        let c = Credit::new();
        assert!(c.try_take(100));
        c.grant(1 << 30);
        assert_eq!(c.sem.available_permits(), WINDOW_BYTES);
        c.grant(5);
        assert_eq!(
            c.sem.available_permits(),
            WINDOW_BYTES,
            "nothing was outstanding"
        );
        assert!(c.try_take(WINDOW_BYTES));
        assert!(!c.try_take(1));
    }

    #[tokio::test]
    async fn closing_connections_count_until_their_tasks_end() {
        let (mut mux, _out, _done) = Mux::new();
        mux.open(1, never());
        mux.open(2, never());
        assert_eq!(mux.live(), 2);
        // A clean CLOSE leaves the writer time to drain: still live.
        mux.frame(decode(&encode(CLOSE, 1, b"")).unwrap());
        assert!(!mux.contains(1));
        assert_eq!(mux.live(), 2);
        // Closed from this side: aborted, and no longer counted.
        mux.close(2);
        for _ in 0..100 {
            if mux.live() == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(mux.live(), 1);
    }

    #[tokio::test]
    async fn written_bytes_are_granted_back_in_few_frames() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.unwrap();
            all.len()
        });
        let (mut mux, mut out, _done) = Mux::new();
        mux.open(
            7,
            Endpoint::Tcp(Box::pin(async move { TcpStream::connect(addr).await })),
        );
        for _ in 0..1000 {
            mux.frame(decode(&encode(DATA, 7, b"0123456789")).unwrap());
        }
        let mut granted = 0;
        let mut windows = 0;
        while granted < 10_000 {
            let f = out.recv().await.unwrap();
            let f = decode(&f).unwrap();
            if f.op == WINDOW {
                windows += 1;
                granted += u32::from_be_bytes(f.data.try_into().unwrap()) as usize;
            }
        }
        assert_eq!(granted, 10_000);
        assert!(windows < 10, "{windows} WINDOW frames for 1000 small ones");
        mux.frame(decode(&encode(EOF, 7, b"")).unwrap());
        assert_eq!(reader.await.unwrap(), 10_000);
    }

    #[tokio::test]
    async fn a_queue_nobody_reads_ends_the_session() {
        let (mux, mut out, _done) = Mux::new();
        let overflow = mux.overflow();
        let big = vec![0u8; 1 << 20];
        for _ in 0..OUT_BUDGET / big.len() + 1 {
            mux.send(DATA, 1, &big);
        }
        tokio::time::timeout(std::time::Duration::from_secs(5), overflow.wait())
            .await
            .expect("the budget is passed");
        // What was refused is not queued: the queue stays within the budget.
        let queued: usize = drain(&mut out).iter().map(Vec::len).sum();
        assert!(queued <= OUT_BUDGET, "{queued}");
    }
}

//! A TCP fault proxy for chaos tests: listens on `127.0.0.1:0`, forwards every connection to a
//! target address, and injects network faults on command.
//!
//! - [`FaultProxy::cut`]: closes every open connection and closes new ones right after
//!   accepting them, until [`FaultProxy::heal`] (an uplink that is down: the client sees the
//!   connection drop and its reconnects fail).
//! - [`FaultProxy::blackhole`]: keeps every socket open but forwards nothing in either
//!   direction, and accepts new connections into the same silence (a half-open link: only a
//!   keepalive can notice). Bytes read meanwhile are discarded. A connection that was silenced
//!   has lost bytes in the middle of its stream, so [`FaultProxy::heal`] closes it (as the
//!   peer's RST would) instead of resuming it.
//! - [`FaultProxy::latency`]: delays every forwarded chunk (in both directions) without
//!   limiting throughput.
//!
//! Every fault applies to the connections that exist when it is injected, even if it is healed
//! again before a connection task gets to look (fault epochs, not just the latest mode).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The fault currently injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwarding normally.
    None,
    /// Connections are closed.
    Cut,
    /// Connections stay open, nothing is forwarded.
    Blackhole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    fault: Fault,
    /// Incremented on every cut.
    cut_epoch: u64,
    /// Incremented on every blackhole.
    hole_epoch: u64,
}

impl State {
    /// Whether a connection opened at `born` may still forward.
    fn forwards(&self, born: &State) -> bool {
        self.fault == Fault::None
            && self.cut_epoch == born.cut_epoch
            && self.hole_epoch == born.hole_epoch
    }
}

/// Counters of what the proxy did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections forwarded to the target.
    pub forwarded: u64,
    /// Connections closed at once because the link was cut (or the target refused).
    pub refused: u64,
    /// Connections accepted while blackholed (each is a client's attempt to reconnect).
    pub accepted_into_hole: u64,
    /// Connections currently open (forwarding or silenced).
    pub open: u64,
    /// Bytes forwarded client → target.
    pub bytes_up: u64,
    /// Bytes forwarded target → client.
    pub bytes_down: u64,
    /// Bytes read and discarded (blackhole, or queued when a fault hit).
    pub bytes_dropped: u64,
    /// Cuts injected.
    pub cuts: u64,
    /// Blackholes injected.
    pub blackholes: u64,
    /// Open connections closed by a cut, or by healing a blackhole.
    pub killed: u64,
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    refused: AtomicU64,
    accepted_into_hole: AtomicU64,
    open: AtomicU64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    bytes_dropped: AtomicU64,
    cuts: AtomicU64,
    blackholes: AtomicU64,
    killed: AtomicU64,
}

struct Shared {
    target: SocketAddr,
    state: watch::Sender<State>,
    latency_us: AtomicU64,
    c: Counters,
    cancel: CancellationToken,
}

impl Shared {
    fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Ordering::Relaxed))
    }
}

/// A running fault proxy; stops (closing every connection) when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("target", &self.shared.target)
            .field("fault", &self.fault())
            .finish()
    }
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (state, _) = watch::channel(State {
            fault: Fault::None,
            cut_epoch: 0,
            hole_epoch: 0,
        });
        let shared = Arc::new(Shared {
            target,
            state,
            latency_us: AtomicU64::new(0),
            c: Counters::default(),
            cancel: CancellationToken::new(),
        });
        tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(FaultProxy { addr, shared })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address connections are forwarded to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// The fault injected now.
    pub fn fault(&self) -> Fault {
        self.shared.state.borrow().fault
    }

    /// Closes every open connection; new ones are closed right after accepting, until healed.
    pub fn cut(&self) {
        self.shared.c.cuts.fetch_add(1, Ordering::Relaxed);
        self.shared.state.send_modify(|s| {
            s.fault = Fault::Cut;
            s.cut_epoch += 1;
        });
    }

    /// Stops forwarding in both directions while keeping every socket open (half-open link);
    /// new connections are accepted into the same silence, until healed.
    pub fn blackhole(&self) {
        self.shared.c.blackholes.fetch_add(1, Ordering::Relaxed);
        self.shared.state.send_modify(|s| {
            s.fault = Fault::Blackhole;
            s.hole_epoch += 1;
        });
    }

    /// Forwards normally again. Connections silenced by a blackhole are closed.
    pub fn heal(&self) {
        self.shared.state.send_modify(|s| s.fault = Fault::None);
    }

    /// Delays every forwarded chunk by `d` (both directions); zero turns it off.
    pub fn latency(&self, d: Duration) {
        self.shared.latency_us.store(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// The counters.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.c;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyStats {
            forwarded: g(&c.forwarded),
            refused: g(&c.refused),
            accepted_into_hole: g(&c.accepted_into_hole),
            open: g(&c.open),
            bytes_up: g(&c.bytes_up),
            bytes_down: g(&c.bytes_down),
            bytes_dropped: g(&c.bytes_dropped),
            cuts: g(&c.cuts),
            blackholes: g(&c.blackholes),
            killed: g(&c.killed),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((sock, _)) => {
                let _ = sock.set_nodelay(true);
                tokio::spawn(connection(sock, shared.clone()));
            }
            Err(error) => {
                tracing::debug!(%error, "proxy accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Decrements the open-connection gauge when a connection task ends, however it ends.
struct OpenGuard(Arc<Shared>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.c.open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(client: TcpStream, shared: Arc<Shared>) {
    let mut rx = shared.state.subscribe();
    let born = *rx.borrow_and_update();
    match born.fault {
        Fault::Cut => {
            shared.c.refused.fetch_add(1, Ordering::Relaxed);
            drop(client);
        }
        Fault::Blackhole => {
            shared.c.accepted_into_hole.fetch_add(1, Ordering::Relaxed);
            shared.c.open.fetch_add(1, Ordering::Relaxed);
            let _open = OpenGuard(shared.clone());
            swallow(client, &shared, &mut rx, &born).await;
        }
        Fault::None => {
            let upstream = tokio::select! {
                _ = shared.cancel.cancelled() => return,
                u = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(shared.target)) => u,
            };
            let upstream = match upstream {
                Ok(Ok(u)) => u,
                _ => {
                    shared.c.refused.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            let _ = upstream.set_nodelay(true);
            shared.c.forwarded.fetch_add(1, Ordering::Relaxed);
            shared.c.open.fetch_add(1, Ordering::Relaxed);
            let _open = OpenGuard(shared.clone());
            forward(client, upstream, &shared, rx, born).await;
        }
    }
}

/// A connection accepted into a blackhole: read and discard until the hole is healed or cut.
async fn swallow(
    mut client: TcpStream,
    shared: &Shared,
    rx: &mut watch::Receiver<State>,
    born: &State,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            changed = rx.changed() => {
                let now = *rx.borrow_and_update();
                if changed.is_err() || now.fault != Fault::Blackhole || now.cut_epoch != born.cut_epoch {
                    shared.c.killed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            n = client.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => { shared.c.bytes_dropped.fetch_add(n as u64, Ordering::Relaxed); }
            },
        }
    }
}

type Chunk = (Instant, Vec<u8>);

/// Forwards both directions until either side closes or a fault ends the connection.
async fn forward(
    client: TcpStream,
    upstream: TcpStream,
    shared: &Arc<Shared>,
    mut rx: watch::Receiver<State>,
    born: State,
) {
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let (up_tx, up_rx) = mpsc::channel::<Chunk>(1024);
    let (down_tx, down_rx) = mpsc::channel::<Chunk>(1024);
    let mut tasks = JoinSet::new();
    tasks.spawn(pump(cr, up_tx, shared.clone(), rx.clone(), born, true));
    tasks.spawn(pump(ur, down_tx, shared.clone(), rx.clone(), born, false));
    tasks.spawn(deliver(uw, up_rx, shared.clone(), rx.clone(), born));
    tasks.spawn(deliver(cw, down_rx, shared.clone(), rx.clone(), born));
    let mut silenced = false;
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => break,
            // A side that closes has its remaining bytes delivered and its close passed on
            // (half-close, as a real network does: git's server closes right after the pack);
            // the connection ends when both directions are done.
            done = tasks.join_next() => if done.is_none() || tasks.is_empty() { break },
            changed = rx.changed() => {
                let now = *rx.borrow_and_update();
                if changed.is_err() || now.cut_epoch != born.cut_epoch {
                    shared.c.killed.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                if now.hole_epoch != born.hole_epoch {
                    // Silenced for good: the pumps see the epoch and discard. Once the hole
                    // is healed, the broken stream is closed.
                    silenced = true;
                }
                if silenced && now.fault != Fault::Blackhole {
                    shared.c.killed.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// Reads one direction and queues chunks for delivery after the current latency; discards
/// while the connection may not forward.
async fn pump(
    mut r: OwnedReadHalf,
    tx: mpsc::Sender<Chunk>,
    shared: Arc<Shared>,
    rx: watch::Receiver<State>,
    born: State,
    up: bool,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if !rx.borrow().forwards(&born) {
            shared
                .c
                .bytes_dropped
                .fetch_add(n as u64, Ordering::Relaxed);
            continue;
        }
        let due = Instant::now() + shared.latency();
        if tx.send((due, buf[..n].to_vec())).await.is_err() {
            return;
        }
        let counter = if up {
            &shared.c.bytes_up
        } else {
            &shared.c.bytes_down
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Writes queued chunks when they are due, unless a fault hit in the meantime.
async fn deliver(
    mut w: OwnedWriteHalf,
    mut chunks: mpsc::Receiver<Chunk>,
    shared: Arc<Shared>,
    rx: watch::Receiver<State>,
    born: State,
) {
    while let Some((due, data)) = chunks.recv().await {
        tokio::time::sleep_until(due).await;
        if !rx.borrow().forwards(&born) {
            shared
                .c
                .bytes_dropped
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            continue;
        }
        if w.write_all(&data).await.is_err() {
            return;
        }
    }
    // The reading side saw EOF: pass the close on.
    let _ = w.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on a free port.
    async fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    /// Writes `msg` and waits up to `within` for the echo.
    async fn roundtrip(s: &mut TcpStream, msg: &[u8], within: Duration) -> Option<Vec<u8>> {
        s.write_all(msg).await.ok()?;
        let mut buf = vec![0u8; msg.len()];
        match tokio::time::timeout(within, s.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Some(buf),
            _ => None,
        }
    }

    /// Whether the peer closed `s` within `within`.
    async fn closed(s: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 16];
        matches!(
            tokio::time::timeout(within, s.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }

    const W: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn forwards_cuts_blackholes_heals_and_delays() {
        let p = FaultProxy::start(echo().await).await.expect("proxy");
        let mut a = TcpStream::connect(p.addr()).await.expect("connect");
        assert_eq!(
            roundtrip(&mut a, b"hello", W).await.as_deref(),
            Some(&b"hello"[..])
        );

        // Cut: the open connection is closed, new ones are closed right away.
        p.cut();
        assert!(closed(&mut a, W).await, "open connection closed by the cut");
        let mut b = TcpStream::connect(p.addr()).await.expect("accepted");
        assert!(closed(&mut b, W).await, "new connection closed while cut");
        assert_eq!(p.fault(), Fault::Cut);

        // Healed: forwarding again.
        p.heal();
        let mut c = TcpStream::connect(p.addr()).await.expect("connect");
        assert_eq!(
            roundtrip(&mut c, b"again", W).await.as_deref(),
            Some(&b"again"[..])
        );

        // Blackhole: the socket stays open, nothing comes back, new connections hang too.
        p.blackhole();
        assert_eq!(
            roundtrip(&mut c, b"lost", Duration::from_millis(300)).await,
            None
        );
        assert!(
            !closed(&mut c, Duration::from_millis(100)).await,
            "half-open, not closed"
        );
        let mut d = TcpStream::connect(p.addr())
            .await
            .expect("accepted into the hole");
        assert_eq!(
            roundtrip(&mut d, b"void", Duration::from_millis(300)).await,
            None
        );
        // Healing closes the silenced (broken) streams; a new connection works.
        p.heal();
        assert!(
            closed(&mut c, W).await,
            "silenced connection closed on heal"
        );
        assert!(
            closed(&mut d, W).await,
            "connection accepted into the hole closed on heal"
        );
        let mut e = TcpStream::connect(p.addr()).await.expect("connect");
        assert_eq!(
            roundtrip(&mut e, b"back", W).await.as_deref(),
            Some(&b"back"[..])
        );

        // Latency applies to both directions.
        p.latency(Duration::from_millis(150));
        let t0 = Instant::now();
        assert_eq!(
            roundtrip(&mut e, b"slow", W).await.as_deref(),
            Some(&b"slow"[..])
        );
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t0.elapsed()
        );
        p.latency(Duration::ZERO);

        // A cut and a heal in quick succession still closes what was open.
        p.cut();
        p.heal();
        assert!(closed(&mut e, W).await, "a missed cut still closes");

        let s = p.stats();
        assert_eq!((s.cuts, s.blackholes), (2, 1));
        assert_eq!(s.forwarded, 3, "{s:?}");
        assert!(s.refused >= 1, "{s:?}");
        assert_eq!(s.accepted_into_hole, 1, "{s:?}");
        assert_eq!(s.killed, 4, "{s:?}");
        assert!(s.bytes_dropped >= 8, "{s:?}");
        assert!(s.bytes_up >= 17 && s.bytes_down >= 17, "{s:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(p.stats().open, 0);
    }
}

//! MQTT listeners: the socket (SO_REUSEPORT, so every MQTT shard binds the same port and the
//! kernel spreads connections), the probe that refuses to share a port with another process,
//! the accept loop, and the handshakes (TLS, the WebSocket upgrade) that come before the
//! engine sees a connection.

use super::connection::{self, ConnCtx};
use crate::config::TcpListenerConfig;
use crate::shard::clock;
use crate::transport::tcp::Tcp;
use crate::transport::tls::{Tls, TlsSettings};
use crate::transport::ws::{Ws, WsSettings};
use crate::transport::Transport;
use futures_lite::future;
use glommio::net::TcpListener;
use glommio::timer::sleep;
use glommio::{spawn_local, Task};
use socket2::{Domain, Protocol, Socket, Type};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

/// How a listener's accepted connections are set up before the engine sees them.
#[derive(Debug, Clone)]
pub enum Setup {
    /// Plain MQTT over TCP: none.
    Plain,
    /// The HTTP upgrade to WebSocket.
    Ws(WsSettings),
    /// The TLS handshake.
    Tls(TlsSettings),
    /// The TLS handshake, then the HTTP upgrade (one deadline for both).
    Wss(TlsSettings, WsSettings),
}

/// What one listener admits, all shards together: at most `max_connections` open at once
/// (handshakes in progress included) and, with `max_conn_rate`, that many new connections a
/// second (a token bucket holding one second's worth). Checked once per accepted connection:
/// one atomic add, and a lock only when a rate is set.
pub struct Gate {
    open: AtomicUsize,
    max: usize,
    rate: Option<Mutex<Bucket>>,
}

struct Bucket {
    per_sec: f64,
    tokens: f64,
    at: Instant,
}

impl Gate {
    /// A gate for `max` connections and `rate` new ones a second (0: no rate limit).
    pub fn new(max: usize, rate: u32) -> Gate {
        Gate {
            open: AtomicUsize::new(0),
            max,
            rate: (rate > 0).then(|| {
                Mutex::new(Bucket {
                    per_sec: f64::from(rate),
                    tokens: f64::from(rate),
                    at: Instant::now(),
                })
            }),
        }
    }

    /// Takes a token if the rate allows a new connection now.
    fn admit_rate(&self) -> bool {
        let Some(bucket) = &self.rate else {
            return true;
        };
        let mut b = bucket.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(b.at).as_secs_f64() * b.per_sec;
        b.tokens = (b.tokens + refill).min(b.per_sec);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Reserves a place for a new connection, if there is one.
    fn reserve(self: &Arc<Self>) -> Option<Slot> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(Some(self.clone())))
    }

    /// Admits a connection just accepted: a place in the gate, or `None` when the rate or
    /// `max_connections` refuses it (counted in `metrics`; the caller drops the socket).
    pub fn admit(self: &Arc<Self>, metrics: &mut crate::core::metrics::Metrics) -> Option<Slot> {
        if !self.admit_rate() {
            metrics.connections_rate_limited += 1;
            return None;
        }
        let slot = self.reserve();
        if slot.is_none() {
            metrics.connections_refused += 1;
        }
        slot
    }

    /// A connection of this listener ended (`Engine::conn_closed` named the listener). Never
    /// below zero, should a connection the gate did not admit name this listener.
    pub fn release(&self) {
        let _ = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Sets the count of what is open: for a datagram gateway, whose state machine admits and
    /// counts its clients itself (`mqtt.sn.max_clients`).
    pub fn set_open(&self, n: usize) {
        self.open.store(n, Ordering::Release);
    }

    /// Connections open (or in their handshake) through this listener, all shards together.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// A reserved place of a [`Gate`]: given back when dropped (a handshake that failed), unless
/// kept by the connection opened in it, which gives it back when it closes.
pub struct Slot(Option<Arc<Gate>>);

impl Slot {
    /// The connection opened in this place keeps it until it closes.
    pub fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(g) = self.0.take() {
            g.release();
        }
    }
}

/// `fut`, unless `deadline` comes first.
pub(crate) async fn before<T>(
    deadline: Instant,
    what: &str,
    fut: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    let timeout = async {
        sleep(deadline.saturating_duration_since(Instant::now())).await;
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{what} handshake timed out"),
        ))
    };
    future::or(fut, timeout).await
}

/// Runs the connection's handshakes within their timeout, then opens it in the engine and
/// drives it like any other. Failures are counted (`tls_handshake_failures`,
/// `ws_handshake_failures`) and logged at debug level.
async fn handshake(
    ctx: Rc<ConnCtx>,
    stream: glommio::net::TcpStream,
    peer: SocketAddr,
    number: u16,
    setup: Rc<Setup>,
    slot: Slot,
) {
    let failed = |ctx: &ConnCtx, tls: bool, error: io::Error| {
        let mut e = ctx.engine.borrow_mut();
        if tls {
            e.metrics.tls_handshake_failures += 1;
            debug!(%peer, %error, "TLS handshake failed");
        } else {
            e.metrics.ws_handshake_failures += 1;
            debug!(%peer, %error, "WebSocket upgrade failed");
        }
    };
    match &*setup {
        Setup::Plain => open(ctx, Tcp::new(stream), peer, number, None, slot),
        Setup::Ws(ws) => {
            let deadline = Instant::now() + ws.handshake_timeout;
            match before(deadline, "WebSocket", Ws::accept(Tcp::new(stream), ws)).await {
                Ok(t) => open(ctx, t, peer, number, None, slot),
                Err(error) => failed(&ctx, false, error),
            }
        }
        Setup::Tls(tls) => {
            let deadline = Instant::now() + tls.handshake_timeout;
            match before(deadline, "TLS", Tls::accept(stream, tls)).await {
                Ok(t) => {
                    let user = tls.peer_cert_as_username.and_then(|w| t.peer_username(w));
                    open(ctx, t, peer, number, user, slot)
                }
                Err(error) => failed(&ctx, true, error),
            }
        }
        Setup::Wss(tls, ws) => {
            let deadline = Instant::now() + tls.handshake_timeout;
            let t = match before(deadline, "TLS", Tls::accept(stream, tls)).await {
                Ok(t) => t,
                Err(error) => return failed(&ctx, true, error),
            };
            let user = tls.peer_cert_as_username.and_then(|w| t.peer_username(w));
            match before(deadline, "WebSocket", Ws::accept(t, ws)).await {
                Ok(t) => open(ctx, t, peer, number, user, slot),
                Err(error) => failed(&ctx, false, error),
            }
        }
    }
}

/// Opens the connection in the engine (with the username its certificate gave, if any) and
/// starts its driver as a task of its own: the handshake task, sized for the largest
/// handshake (some 16 KB), ends here instead of staying allocated for the connection's life.
fn open<T: Transport>(
    ctx: Rc<ConnCtx>,
    transport: T,
    peer: SocketAddr,
    number: u16,
    username: Option<String>,
    slot: Slot,
) {
    // The connection holds its place from now on; `drive` gives it back when it closes.
    slot.keep();
    let id = {
        let mut e = ctx.engine.borrow_mut();
        let id = e.open_conn(peer, number, clock::now());
        if let Some(name) = username {
            e.set_conn_username(id, &name);
        }
        id
    };
    spawn_local(connection::drive(ctx, transport, id)).detach();
}

/// Checks, before any shard binds, that no other process listens on `addr` (glommio-style
/// SO_REUSEPORT would otherwise silently share the port with it), and resolves port 0 to a
/// free port. Returns the address the shards must bind.
pub fn probe(addr: SocketAddr) -> io::Result<SocketAddr> {
    // No SO_REUSEPORT here: the bind fails if anyone listens on the port.
    let probe = std::net::TcpListener::bind(addr)?;
    probe.local_addr()
}

/// A socket bound to `addr` with SO_REUSEPORT and not listening: it keeps the port out of
/// other processes' hands (their probe's bind fails, and the kernel gives no port in use for
/// port 0) until the shards have bound it, without taking any connection.
pub fn hold(addr: SocketAddr) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_port(true)?;
    sock.set_reuse_address(true)?;
    sock.set_cloexec(true)?;
    sock.bind(&addr.into())?;
    Ok(sock)
}

/// Binds one shard's socket for a listener. Returns it with a second descriptor of the same
/// socket, for [`stop_listening`] at shutdown.
pub fn bind(addr: SocketAddr, backlog: u32) -> io::Result<(TcpListener, OwnedFd)> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_port(true)?;
    sock.set_reuse_address(true)?;
    sock.set_cloexec(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog.min(i32::MAX as u32) as i32)?;
    let second = OwnedFd::from(sock.try_clone()?);
    // SAFETY: the descriptor is a bound, listening TCP socket that we own and hand over.
    Ok((
        unsafe { TcpListener::from_raw_fd(sock.into_raw_fd()) },
        second,
    ))
}

/// Stops the socket behind `fd` listening, at once. glommio closes its own descriptor of a
/// listener through io_uring, which may complete only after the process has exited (the ring
/// is torn down asynchronously); meanwhile the port would still accept connections and refuse
/// a restarted broker.
pub fn stop_listening(fd: OwnedFd) {
    // SAFETY: shutdown(2) on a socket descriptor we own; it takes effect whoever else still
    // refers to the socket.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
}

/// Applies the listener's socket buffer sizes to an accepted socket (best effort).
fn set_buffers(stream: &glommio::net::TcpStream, cfg: &TcpListenerConfig) {
    if cfg.sndbuf.0 == 0 && cfg.recbuf.0 == 0 {
        return;
    }
    // SAFETY: the descriptor belongs to `stream`, which outlives the borrow.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let sock = socket2::SockRef::from(&fd);
    if cfg.sndbuf.0 > 0 {
        let _ = sock.set_send_buffer_size(cfg.sndbuf.as_usize());
    }
    if cfg.recbuf.0 > 0 {
        let _ = sock.set_recv_buffer_size(cfg.recbuf.as_usize());
    }
}

/// Accepts connections until the task is dropped. `number` tells the engine which listener a
/// connection came through; its [`Gate`] (`ctx.gates[number]`, shared by every shard)
/// admits it or not.
pub fn spawn_accept(
    name: String,
    number: u16,
    listener: TcpListener,
    cfg: TcpListenerConfig,
    setup: Rc<Setup>,
    ctx: Rc<ConnCtx>,
) -> Task<()> {
    spawn_local(async move {
        let mut backoff = Duration::from_millis(10);
        let gate = ctx.gates[usize::from(number)].clone();
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    backoff = Duration::from_millis(10);
                    let mut e = ctx.engine.borrow_mut();
                    // Handshakes in progress hold a place too, so a flood of silent clients
                    // is bounded as well.
                    let Some(slot) = gate.admit(&mut e.metrics) else {
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(cfg.nodelay);
                    set_buffers(&stream, &cfg);
                    let peer = stream
                        .peer_addr()
                        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                    if let Setup::Plain = *setup {
                        let id = e.open_conn(peer, number, clock::now());
                        drop(e);
                        slot.keep();
                        spawn_local(connection::drive(ctx.clone(), Tcp::new(stream), id)).detach();
                        continue;
                    }
                    drop(e);
                    spawn_local(handshake(
                        ctx.clone(),
                        stream,
                        peer,
                        number,
                        setup.clone(),
                        slot,
                    ))
                    .detach();
                }
                Err(err) => {
                    // EMFILE, ENFILE, ENOBUFS…: back off instead of spinning.
                    ctx.engine.borrow_mut().metrics.accept_errors += 1;
                    warn!(listener = %name, error = %err, retry_in = ?backoff, "accept failed");
                    sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    })
}

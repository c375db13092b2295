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

/// One handshake in progress on a listener of this shard, counted while it lives.
struct Pending(Rc<std::cell::Cell<usize>>);

impl Pending {
    fn new(count: &Rc<std::cell::Cell<usize>>) -> Pending {
        count.set(count.get() + 1);
        Pending(count.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// `fut`, unless `deadline` comes first.
async fn before<T>(
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
    pending: Pending,
) {
    // Counted until the handshake ends, whichever way (the engine counts it from then on).
    let _pending = pending;
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
        Setup::Plain => open(ctx, Tcp::new(stream), peer, number, None),
        Setup::Ws(ws) => {
            let deadline = Instant::now() + ws.handshake_timeout;
            match before(deadline, "WebSocket", Ws::accept(Tcp::new(stream), ws)).await {
                Ok(t) => open(ctx, t, peer, number, None),
                Err(error) => failed(&ctx, false, error),
            }
        }
        Setup::Tls(tls) => {
            let deadline = Instant::now() + tls.handshake_timeout;
            match before(deadline, "TLS", Tls::accept(stream, tls)).await {
                Ok(t) => {
                    let user = tls.peer_cert_as_username.and_then(|w| t.peer_username(w));
                    open(ctx, t, peer, number, user)
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
                Ok(t) => open(ctx, t, peer, number, user),
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
) {
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
/// connection came through (`max_connections` counts them per listener).
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
        // Connections of this listener still in their handshake: they count against
        // `max_connections` like open ones, so a flood of silent handshakes is bounded too.
        let handshaking = Rc::new(std::cell::Cell::new(0usize));
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    backoff = Duration::from_millis(10);
                    let mut e = ctx.engine.borrow_mut();
                    if e.listener_connections(number) + handshaking.get() >= cfg.max_connections {
                        e.metrics.connections_refused += 1;
                        drop(stream);
                        continue;
                    }
                    let _ = stream.set_nodelay(cfg.nodelay);
                    set_buffers(&stream, &cfg);
                    let peer = stream
                        .peer_addr()
                        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                    if let Setup::Plain = *setup {
                        let id = e.open_conn(peer, number, clock::now());
                        drop(e);
                        spawn_local(connection::drive(ctx.clone(), Tcp::new(stream), id)).detach();
                        continue;
                    }
                    drop(e);
                    let pending = Pending::new(&handshaking);
                    spawn_local(handshake(
                        ctx.clone(),
                        stream,
                        peer,
                        number,
                        setup.clone(),
                        pending,
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

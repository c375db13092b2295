//! The private TCP gateway's driver: its listener's accept tasks (`tcp.listener.external.
//! acceptors` of them, on the gateway's shard) and one task per device that reads frames
//! into the [`TcpGwConn`] state machine and writes what it has for the device.

use crate::config::{parse_force_shutdown, TcpGatewayConfig};
use crate::core::engine::{ConnId, ListenerProtocol};
use crate::core::gateway::tcp::{TcpGwConn, TcpGwSettings};
use crate::core::sink::Sink;
use crate::gateway::{GatewayCtl, GatewayState};
use crate::shard::clock;
use crate::shard::connection::{feed, ConnCtx};
use crate::shard::listener;
use crate::transport::tcp::Tcp;
use crate::transport::tls::{Tls, TlsSettings};
use crate::transport::Transport;
use bytes::BytesMut;
use glommio::net::TcpListener;
use glommio::{spawn_local, Task};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tracing::{debug, info, warn};

/// Reads handled per wake-up before yielding to the other tasks of the shard.
const READS_PER_POLL: usize = 8;

/// What every device's task shares.
pub struct GwCtx {
    /// The shard's engine, scratch buffer and gates.
    pub conn: Rc<ConnCtx>,
    /// The protocol settings.
    pub settings: TcpGwSettings,
    /// `tcp.proto.enable_stats`.
    pub stats: bool,
    /// `tcp.proto.force_gc_policy`: (frames, bytes) moved before buffers are given back.
    pub gc: Option<(usize, usize)>,
}

impl GwCtx {
    /// The context of the gateway configured by `cfg`.
    pub fn new(conn: Rc<ConnCtx>, cfg: &TcpGatewayConfig) -> GwCtx {
        let p = &cfg.proto;
        GwCtx {
            conn,
            settings: TcpGwSettings {
                up_topic: p.up_topic.clone(),
                dn_topic: p.dn_topic.clone(),
                max_packet_size: p.max_packet_size.as_usize(),
                force_shutdown: parse_force_shutdown(&p.force_shutdown_policy).unwrap_or(None),
            },
            stats: p.enable_stats,
            gc: parse_force_shutdown(&p.force_gc_policy).unwrap_or(None),
        }
    }
}

/// How the engine names the gateway's clients, and how long they may take to CONNECT.
pub fn protocol(cfg: &TcpGatewayConfig) -> ListenerProtocol {
    ListenerProtocol {
        name: "tcp",
        version: shardmq_protocol::tcpgw::VERSION,
        idle_timeout: cfg.proto.idle_timeout.0,
    }
}

/// Starts the accept tasks of the plain listener `number` (the gateway's gate) on this shard.
fn spawn_acceptors(
    listener: Rc<TcpListener>,
    number: u16,
    cfg: &TcpGatewayConfig,
    ctx: Rc<GwCtx>,
) -> Vec<Task<()>> {
    let nodelay = cfg.listener.external.nodelay;
    (0..cfg.listener.external.acceptors)
        .map(|_| {
            spawn_local(accept_loop(
                listener.clone(),
                number,
                nodelay,
                ctx.clone(),
                None,
            ))
        })
        .collect()
}

/// Accepts devices on `listener` (its gate is `number`'s); with `tls`, each goes through the
/// TLS handshake first (within its timeout; a verified certificate may name the user).
async fn accept_loop(
    listener: Rc<TcpListener>,
    number: u16,
    nodelay: bool,
    ctx: Rc<GwCtx>,
    tls: Option<Rc<TlsSettings>>,
) {
    let mut backoff = Duration::from_millis(10);
    let gate = ctx.conn.gates[usize::from(number)].clone();
    loop {
        match listener.accept().await {
            Ok(stream) => {
                backoff = Duration::from_millis(10);
                let mut e = ctx.conn.engine.borrow_mut();
                let Some(slot) = gate.admit(&mut e.metrics) else {
                    continue;
                };
                let _ = stream.set_nodelay(nodelay);
                let peer = stream
                    .peer_addr()
                    .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                let Some(tls) = tls.clone() else {
                    let id = e.open_conn_with(peer, number, Sink::packets(), clock::now());
                    drop(e);
                    slot.keep();
                    spawn_local(drive(ctx.clone(), Tcp::new(stream), id)).detach();
                    continue;
                };
                drop(e);
                let ctx = ctx.clone();
                spawn_local(async move {
                    let deadline = std::time::Instant::now() + tls.handshake_timeout;
                    match listener::before(deadline, "TLS", Tls::accept(stream, &tls)).await {
                        Ok(t) => {
                            let user = tls.peer_cert_as_username.and_then(|w| t.peer_username(w));
                            let id = {
                                let mut e = ctx.conn.engine.borrow_mut();
                                let id =
                                    e.open_conn_with(peer, number, Sink::packets(), clock::now());
                                if let Some(name) = user {
                                    e.set_conn_username(id, &name);
                                }
                                id
                            };
                            slot.keep();
                            spawn_local(drive(ctx, t, id)).detach();
                        }
                        Err(error) => {
                            ctx.conn.engine.borrow_mut().metrics.tls_handshake_failures += 1;
                            debug!(%peer, %error, "TCP gateway TLS handshake failed");
                        }
                    }
                })
                .detach();
            }
            Err(err) => {
                ctx.conn.engine.borrow_mut().metrics.accept_errors += 1;
                warn!(listener = "gateway.tcp", error = %err, retry_in = ?backoff, "accept failed");
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// What a running gateway holds: its accept tasks and a descriptor of each listening socket.
pub type Running = (Vec<Task<()>>, Vec<OwnedFd>);

/// Binds the gateway's listeners (`ctl.binds`: plain, then TLS with `tls`) and starts their
/// accept tasks; listener `number` is the plain one, `number + 1` the TLS one. Returns what
/// runs and the bound addresses, or why a listener could not bind.
pub fn bind_all(
    ctl: &GatewayCtl,
    number: u16,
    cfg: &TcpGatewayConfig,
    gw: &Rc<GwCtx>,
    tls: Option<&Rc<TlsSettings>>,
) -> Result<(Running, Vec<SocketAddr>), String> {
    let mut tasks = Vec::new();
    let mut fds = Vec::new();
    let mut addrs = Vec::new();
    for (i, bind) in ctl.binds.iter().enumerate() {
        let backlog = match i {
            0 => cfg.listener.external.backlog,
            _ => cfg.listener.ssl.external.backlog,
        };
        let (l, fd) =
            listener::bind(*bind, backlog).map_err(|e| format!("cannot bind {bind}: {e}"))?;
        addrs.push(l.local_addr().unwrap_or(*bind));
        fds.push(fd);
        let l = Rc::new(l);
        match (i, tls) {
            (0, _) => tasks.extend(spawn_acceptors(l, number, cfg, gw.clone())),
            (_, Some(tls)) => {
                let s = &cfg.listener.ssl.external;
                tasks.extend((0..s.acceptors).map(|_| {
                    spawn_local(accept_loop(
                        l.clone(),
                        number + 1,
                        s.nodelay,
                        gw.clone(),
                        Some(tls.clone()),
                    ))
                }));
            }
            (_, None) => {}
        }
    }
    Ok(((tasks, fds), addrs))
}

/// Starts and stops the gateway on its shard as `ctl` asks (`running`: what the start
/// already bound), until the shard stops. Unloading stops the listeners and closes the
/// gateway's connections: their sessions end as after a network error (wills published).
pub async fn supervise(
    ctl: Arc<GatewayCtl>,
    number: u16,
    cfg: TcpGatewayConfig,
    gw: Rc<GwCtx>,
    tls: Option<Rc<TlsSettings>>,
    mut running: Option<Running>,
) {
    loop {
        let want = poll_fn(|cx| ctl.poll_change(cx, running.is_some())).await;
        if want {
            match bind_all(&ctl, number, &cfg, &gw, tls.as_ref()) {
                Ok((r, addrs)) => {
                    running = Some(r);
                    info!(listener = "gateway.tcp", addrs = ?addrs, "TCP gateway loaded");
                    ctl.settle(GatewayState::Running(addrs));
                }
                Err(e) => {
                    warn!(listener = "gateway.tcp", error = %e, "TCP gateway cannot load");
                    ctl.settle(GatewayState::Failed(e));
                }
            }
        } else if let Some((tasks, fds)) = running.take() {
            drop(tasks);
            fds.into_iter().for_each(listener::stop_listening);
            let mut e = gw.conn.engine.borrow_mut();
            let now = clock::now();
            let closed =
                e.close_listener_conns(number, now) + e.close_listener_conns(number + 1, now);
            drop(e);
            info!(listener = "gateway.tcp", closed, "TCP gateway unloaded");
            ctl.settle(GatewayState::Stopped);
        }
    }
}

/// Why a device's task stopped.
enum End {
    /// The engine closed the connection and what it had was written.
    Closed,
    /// The close timed out: reset the socket.
    Reset,
    /// The device went away or the socket failed.
    Transport,
}

struct Driver<T> {
    ctx: Rc<GwCtx>,
    transport: T,
    gw: TcpGwConn,
    partial: BytesMut,
    /// Frames and bytes moved since the buffers were last given back.
    moved: (usize, usize),
}

/// Runs one device's connection until it ends, then closes the socket and tells the engine.
pub async fn drive<T: Transport>(ctx: Rc<GwCtx>, transport: T, id: ConnId) {
    let mut d = Driver {
        ctx,
        transport,
        gw: TcpGwConn::new(id),
        partial: BytesMut::new(),
        moved: (0, 0),
    };
    let end = poll_fn(|cx| d.poll(cx)).await;
    let Driver { ctx, transport, .. } = d;
    match end {
        End::Closed => transport.close().await,
        End::Reset => transport.reset(),
        End::Transport => {}
    }
    let listener = ctx.conn.engine.borrow_mut().conn_closed(id, clock::now());
    if let Some(g) = listener.and_then(|l| ctx.conn.gates.get(usize::from(l))) {
        g.release();
    }
}

impl<T: Transport> Driver<T> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        let id = self.gw.id();
        for _ in 0..READS_PER_POLL {
            let ctx = self.ctx.clone();
            let now = clock::now();
            {
                let mut e = ctx.conn.engine.borrow_mut();
                let polled = self.gw.poll_engine(&mut e, &ctx.settings, now);
                self.moved.0 += polled.frames;
                if ctx.stats {
                    e.metrics.tcpgw_frames_sent += polled.frames as u64;
                }
            }
            if let Some(end) = self.flush(cx) {
                return Poll::Ready(end);
            }
            let mut e = ctx.conn.engine.borrow_mut();
            let Some(status) = e.conn_status(id) else {
                return Poll::Ready(End::Transport);
            };
            if status.close {
                if status.reset {
                    return Poll::Ready(End::Reset);
                }
                if self.gw.outbox().is_empty() {
                    return Poll::Ready(End::Closed);
                }
                // flush() could not write it all yet; the socket wakes us.
                e.set_conn_waker(id, cx.waker());
                return Poll::Pending;
            }
            if status.readable && !self.partial.is_empty() && self.process(&mut e, None, now) {
                continue;
            }
            if status.readable {
                let mut scratch = ctx.conn.scratch.borrow_mut();
                match self.transport.poll_read(cx, &mut scratch[..]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(End::Transport),
                    Poll::Ready(Ok(n)) => {
                        e.count_received(n);
                        if ctx.stats {
                            e.metrics.tcpgw_bytes_received += n as u64;
                        }
                        drop(scratch);
                        let data = ctx.conn.scratch.borrow();
                        self.process(&mut e, Some(&data[..n]), now);
                        continue;
                    }
                    Poll::Pending => {}
                }
            }
            e.set_conn_waker(id, cx.waker());
            return Poll::Pending;
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Writes what the state machine has for the device. `Some` when the connection ends.
    fn flush(&mut self, cx: &mut Context<'_>) -> Option<End> {
        let mut sent = 0;
        while !self.gw.outbox().is_empty() {
            match self.transport.poll_write(cx, self.gw.outbox()) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Some(End::Transport),
                Poll::Ready(Ok(n)) => {
                    self.gw.written(n);
                    sent += n;
                }
                Poll::Pending => break,
            }
        }
        if sent > 0 {
            if self.ctx.stats {
                self.ctx.conn.engine.borrow_mut().metrics.tcpgw_bytes_sent += sent as u64;
            }
            self.moved.1 += sent;
        }
        None
    }

    /// Feeds the state machine the partial buffer followed by `fresh`, keeping what it
    /// leaves; whether it made progress.
    fn process(
        &mut self,
        e: &mut crate::core::engine::Engine,
        fresh: Option<&[u8]>,
        now: crate::core::time::Timestamp,
    ) -> bool {
        let frames_before = self.gw.frames_received();
        let (gw, settings) = (&mut self.gw, &self.ctx.settings);
        let input = feed(&mut self.partial, fresh, |data| {
            gw.handle_input(e, settings, data, now)
        });
        let frames = self.gw.frames_received() - frames_before;
        self.moved.0 += frames as usize;
        self.moved.1 += input.used;
        if self.ctx.stats {
            e.metrics.tcpgw_frames_received += frames;
        }
        self.maybe_shrink();
        input.progressed
    }

    /// `tcp.proto.force_gc_policy`: after enough has moved, a partial frame's buffer is
    /// copied into one of its own size (an empty one is freed whenever it empties).
    fn maybe_shrink(&mut self) {
        let Some((frames, bytes)) = self.ctx.gc else {
            return;
        };
        if self.moved.0 >= frames || self.moved.1 >= bytes {
            self.moved = (0, 0);
            if self.partial.capacity() > self.partial.len() {
                self.partial = BytesMut::from(&self.partial[..]);
            }
            debug!("TCP gateway connection buffers given back (tcp.proto.force_gc_policy)");
        }
    }
}

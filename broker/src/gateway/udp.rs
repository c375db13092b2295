//! The driver of a datagram gateway (MQTT-SN, LwM2M): one UDP socket on the gateway's shard
//! and three tasks around the gateway's sans-IO state machine ([`DatagramGateway`]): one
//! receives datagrams, one polls the clients the engine woke (each connection's waker files
//! its id in a ready list) and runs the state machine's timer, and one sends a periodic
//! announcement when the gateway has one (MQTT-SN's ADVERTISE). Each task sends what the
//! state machine has for its clients after its step. Loading and unloading go through the
//! gateway's [`GatewayCtl`].

use crate::core::engine::{ConnId, Engine};
use crate::core::time::Timestamp;
use crate::gateway::dtls::DtlsLayer;
use crate::gateway::{GatewayCtl, GatewayState};
use crate::shard::clock;
use crate::shard::connection::ConnCtx;
use crate::shard::listener::Gate;
use bytes::Bytes;
use futures_lite::future;
use glommio::net::UdpSocket;
use glommio::{spawn_local, Task};
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Wake, Waker};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// The largest datagram read (a UDP payload cannot be larger).
const RECV_BUFFER: usize = 65_536;

/// What the driver asks of a datagram gateway's state machine.
pub trait DatagramGateway {
    /// A datagram from `from` (`vouched`: the identity a security layer authenticated).
    fn datagram(
        &mut self,
        e: &mut Engine,
        from: SocketAddr,
        data: &[u8],
        vouched: Option<&str>,
        now: Timestamp,
    );
    /// The engine woke connection `id`.
    fn poll_conn(&mut self, e: &mut Engine, id: ConnId, now: Timestamp);
    /// Runs what is due.
    fn tick(&mut self, e: &mut Engine, now: Timestamp);
    /// When something is due.
    fn next_deadline(&self) -> Option<Timestamp>;
    /// The next datagram to send.
    fn pop_datagram(&mut self, e: &mut Engine) -> Option<(SocketAddr, Bytes)>;
    /// Connections opened since the last call.
    fn take_opened(&mut self) -> Vec<ConnId>;
    /// Clients known.
    fn client_count(&self) -> usize;
    /// Unloading: every client's session ends as after a network error; how many.
    fn close_all(&mut self, e: &mut Engine, now: Timestamp) -> usize;
    /// The broker stops: forget every client (the engine closed them).
    fn forget_all(&mut self, e: &mut Engine, now: Timestamp);
}

/// Connections the engine woke, for the polling task.
#[derive(Default)]
struct Ready {
    ids: Mutex<Vec<ConnId>>,
    waker: Mutex<Option<Waker>>,
}

impl Ready {
    fn take(&self) -> Vec<ConnId> {
        let mut ids = std::mem::take(&mut *self.ids.lock().unwrap_or_else(|e| e.into_inner()));
        ids.sort_unstable_by_key(|id| (id.idx, id.gen));
        ids.dedup();
        ids
    }
}

/// The waker the engine holds for one client's connection: files it as ready.
struct ConnWake {
    ready: Arc<Ready>,
    id: ConnId,
}

impl Wake for ConnWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready
            .ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.id);
        if let Some(w) = self
            .ready
            .waker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            w.wake();
        }
    }
}

/// What a datagram gateway's tasks share.
pub struct UdpCtx<G> {
    conn: Rc<ConnCtx>,
    gw: RefCell<G>,
    ready: Arc<Ready>,
    /// The waker of each client's connection (the engine takes it when it wakes one).
    wakers: RefCell<HashMap<ConnId, Waker>>,
    gate: Arc<Gate>,
    /// A datagram sent to an address at start and then every so often (MQTT-SN's
    /// ADVERTISE), when configured.
    announce: Option<(SocketAddr, Duration, Bytes)>,
    /// SO_RCVBUF to ask for (0: the system's default).
    recbuf: usize,
    /// The listener's name in logs (`gateway.mqttsn`) and the protocol's (`MQTT-SN`).
    names: (&'static str, &'static str),
    /// The DTLS sessions, when the socket speaks DTLS.
    dtls: Option<RefCell<DtlsLayer>>,
}

impl<G: DatagramGateway> UdpCtx<G> {
    /// The context of gateway `gw` (its clients counted under `gate`), asking for a receive
    /// buffer of `recbuf` bytes, sending `announce` if given; `names`: the listener's name in
    /// logs and the protocol's.
    pub fn new(
        conn: Rc<ConnCtx>,
        gw: G,
        gate: Arc<Gate>,
        recbuf: usize,
        announce: Option<(SocketAddr, Duration, Bytes)>,
        names: (&'static str, &'static str),
    ) -> UdpCtx<G> {
        UdpCtx {
            conn,
            gw: RefCell::new(gw),
            ready: Arc::new(Ready::default()),
            wakers: RefCell::new(HashMap::new()),
            gate,
            announce,
            recbuf,
            names,
            dtls: None,
        }
    }

    /// The same over DTLS: every datagram goes through the peer's DTLS session.
    pub fn with_dtls(mut self, layer: DtlsLayer) -> UdpCtx<G> {
        self.dtls = Some(RefCell::new(layer));
        self
    }

    /// After a step: wakers for the connections it opened, the client count for the gate.
    fn settle(&self, e: &mut Engine, gw: &mut G) {
        let mut wakers = self.wakers.borrow_mut();
        for id in gw.take_opened() {
            let waker = Waker::from(Arc::new(ConnWake {
                ready: self.ready.clone(),
                id,
            }));
            e.set_conn_waker(id, &waker);
            wakers.insert(id, waker);
        }
        self.gate.set_open(gw.client_count());
    }

    /// Registers again the wakers of connections the engine woke (it takes them), and
    /// forgets those of connections that are gone.
    fn rearm(&self, e: &mut Engine, woken: &[ConnId]) {
        let mut wakers = self.wakers.borrow_mut();
        for id in woken {
            if e.conn_status(*id).is_none() {
                wakers.remove(id);
            } else if let Some(w) = wakers.get(id) {
                e.set_conn_waker(*id, w);
            }
        }
    }

    /// The broker stops: the engine closed every connection; the gateway forgets its clients.
    pub fn forget_all(&self) {
        let mut e = self.conn.engine.borrow_mut();
        let mut gw = self.gw.borrow_mut();
        gw.forget_all(&mut e, clock::now());
        self.wakers.borrow_mut().clear();
        self.gate.set_open(0);
    }
}

/// Sends what the state machine has for the clients.
async fn flush<G: DatagramGateway>(sn: &UdpCtx<G>, sock: &UdpSocket) {
    let mut sealed = Vec::new();
    loop {
        let next = {
            let mut e = sn.conn.engine.borrow_mut();
            sn.gw.borrow_mut().pop_datagram(&mut e)
        };
        let Some((to, d)) = next else {
            break;
        };
        match &sn.dtls {
            // In the peer's DTLS session; a peer without one is not written to.
            Some(layer) => {
                if !layer.borrow_mut().send(to, &d, &mut sealed) {
                    debug!(listener = sn.names.0, %to, "no DTLS session for this peer: datagram dropped");
                }
            }
            None => {
                if let Err(error) = sock.send_to(&d, to).await {
                    debug!(listener = sn.names.0, %to, %error, "datagram not sent");
                }
            }
        }
    }
    send_all(sn, sock, sealed).await;
}

/// Sends DTLS records.
async fn send_all<G>(sn: &UdpCtx<G>, sock: &UdpSocket, records: Vec<(SocketAddr, Vec<u8>)>) {
    for (to, d) in records {
        if let Err(error) = sock.send_to(&d, to).await {
            debug!(listener = sn.names.0, %to, %error, "DTLS record not sent");
        }
    }
}

async fn recv_loop<G: DatagramGateway + 'static>(sn: Rc<UdpCtx<G>>, sock: Rc<UdpSocket>) {
    let mut buf = vec![0u8; RECV_BUFFER];
    let mut backoff = Duration::from_millis(10);
    loop {
        match sock.recv_from(&mut buf).await {
            Ok((n, from)) => {
                backoff = Duration::from_millis(10);
                let mut records = Vec::new();
                {
                    let mut e = sn.conn.engine.borrow_mut();
                    let mut gw = sn.gw.borrow_mut();
                    e.count_received(n);
                    match &sn.dtls {
                        Some(layer) => {
                            let mut layer = layer.borrow_mut();
                            let failed = layer.failures;
                            let plain =
                                layer.receive(from, &buf[..n], Instant::now(), &mut records);
                            e.metrics.tls_handshake_failures += layer.failures - failed;
                            drop(layer);
                            for (d, identity) in plain {
                                gw.datagram(&mut e, from, &d, identity.as_deref(), clock::now());
                            }
                        }
                        None => gw.datagram(&mut e, from, &buf[..n], None, clock::now()),
                    }
                    sn.settle(&mut e, &mut gw);
                }
                send_all(&sn, &sock, records).await;
                flush(&sn, &sock).await;
            }
            Err(error) => {
                warn!(listener = sn.names.0, %error, retry_in = ?backoff, "receiving failed");
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Waits until the engine wakes a client or `deadline` (a retransmission) comes.
async fn woken(ready: &Ready, deadline: Option<Duration>) {
    let notified = poll_fn(|cx| {
        if !ready
            .ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            return Poll::Ready(());
        }
        *ready.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        // A wake between the check and here left its id: look again.
        if ready
            .ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    });
    match deadline {
        Some(wait) => future::or(notified, glommio::timer::sleep(wait)).await,
        None => notified.await,
    }
}

async fn poll_loop<G: DatagramGateway + 'static>(sn: Rc<UdpCtx<G>>, sock: Rc<UdpSocket>) {
    loop {
        let gw_due = sn
            .gw
            .borrow()
            .next_deadline()
            .map(|at| at.since(clock::now()) + Duration::from_millis(1));
        let dtls_due = sn
            .dtls
            .as_ref()
            .and_then(|l| l.borrow().next_timeout())
            .map(|at| at.saturating_duration_since(Instant::now()) + Duration::from_millis(1));
        let wait = match (gw_due, dtls_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        woken(&sn.ready, wait).await;
        if let Some(cell) = &sn.dtls {
            let mut records = Vec::new();
            {
                let mut layer = cell.borrow_mut();
                let failed = layer.failures;
                layer.handle_timeouts(Instant::now(), &mut records);
                sn.conn.engine.borrow_mut().metrics.tls_handshake_failures +=
                    layer.failures - failed;
            }
            send_all(&sn, &sock, records).await;
        }
        {
            let mut e = sn.conn.engine.borrow_mut();
            let mut gw = sn.gw.borrow_mut();
            let now = clock::now();
            let woken = sn.ready.take();
            for &id in &woken {
                gw.poll_conn(&mut e, id, now);
            }
            gw.tick(&mut e, now);
            sn.settle(&mut e, &mut gw);
            sn.rearm(&mut e, &woken);
        }
        flush(&sn, &sock).await;
    }
}

async fn announce_loop<G: DatagramGateway>(
    sn: Rc<UdpCtx<G>>,
    sock: Rc<UdpSocket>,
    to: SocketAddr,
    every: Duration,
    d: Bytes,
) {
    loop {
        if let Err(error) = sock.send_to(&d, to).await {
            debug!(listener = sn.names.0, %to, %error, "announcement not sent");
        }
        glommio::timer::sleep(every).await;
    }
}

/// Asks for a receive buffer of `bytes` (the kernel caps it at `net.core.rmem_max`; what it
/// gave is logged when less).
fn set_recbuf(sock: &UdpSocket, bytes: usize, listener: &'static str) {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor belongs to `sock`, which outlives the borrow.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(sock.as_raw_fd()) };
    let sock = socket2::SockRef::from(&fd);
    let _ = sock.set_recv_buffer_size(bytes);
    // Linux reports twice what it grants (its bookkeeping share included).
    let granted = sock.recv_buffer_size().unwrap_or(0) / 2;
    if granted < bytes / 2 {
        info!(
            listener,
            asked = bytes,
            granted,
            "UDP receive buffer capped by net.core.rmem_max"
        );
    }
}

/// What a running gateway holds: its tasks and its socket.
pub type Running = (Vec<Task<()>>, Rc<UdpSocket>);

/// Binds the gateway's socket to `addr` and starts its tasks. Returns what runs and the
/// bound address, or why the socket could not bind.
pub fn bind<G: DatagramGateway + 'static>(
    addr: SocketAddr,
    sn: &Rc<UdpCtx<G>>,
) -> Result<(Running, Vec<SocketAddr>), String> {
    let mut sock = UdpSocket::bind(addr).map_err(|e| format!("cannot bind UDP {addr}: {e}"))?;
    sock.set_buffer_size(RECV_BUFFER);
    if sn.recbuf > 0 {
        set_recbuf(&sock, sn.recbuf, sn.names.0);
    }
    let bound = sock.local_addr().unwrap_or(addr);
    if sn.announce.is_some() {
        // A broadcast address needs it; a unicast one is not affected.
        let _ = sock.set_broadcast(true);
    }
    let sock = Rc::new(sock);
    let mut tasks = vec![
        spawn_local(recv_loop(sn.clone(), sock.clone())),
        spawn_local(poll_loop(sn.clone(), sock.clone())),
    ];
    if let Some((to, every, d)) = sn.announce.clone() {
        tasks.push(spawn_local(announce_loop(
            sn.clone(),
            sock.clone(),
            to,
            every,
            d,
        )));
    }
    Ok(((tasks, sock), vec![bound]))
}

/// One socket of a gateway: its context, the address it binds (after the first bind, the
/// bound one, so a port 0 keeps the port it got) and what runs while it is loaded.
pub struct Socket<G> {
    ctx: Rc<UdpCtx<G>>,
    addr: SocketAddr,
    running: Option<Running>,
}

impl<G: DatagramGateway + 'static> Socket<G> {
    /// A socket of `ctx` to bind at `addr`, not bound yet.
    pub fn new(ctx: Rc<UdpCtx<G>>, addr: SocketAddr) -> Socket<G> {
        Socket {
            ctx,
            addr,
            running: None,
        }
    }

    /// Its context.
    pub fn ctx(&self) -> &Rc<UdpCtx<G>> {
        &self.ctx
    }
}

/// Binds every socket of a gateway (all or none): the bound addresses, or why one failed.
pub fn bind_all<G: DatagramGateway + 'static>(
    socks: &mut [Socket<G>],
) -> Result<Vec<SocketAddr>, String> {
    let mut addrs = Vec::new();
    for i in 0..socks.len() {
        match bind(socks[i].addr, &socks[i].ctx) {
            Ok((r, a)) => {
                socks[i].running = Some(r);
                socks[i].addr = a[0];
                addrs.extend(a);
            }
            Err(e) => {
                for s in socks[..i].iter_mut() {
                    s.running = None;
                }
                return Err(e);
            }
        }
    }
    Ok(addrs)
}

/// Starts and stops the gateway on its shard as `ctl` asks (`socks`: its sockets, bound
/// already if the start loaded it), until the shard stops. Unloading ends every client's
/// session as after a network error (wills published; MQTT-SN clients get DISCONNECT), then
/// closes the sockets.
pub async fn supervise<G: DatagramGateway + 'static>(
    ctl: Arc<GatewayCtl>,
    mut socks: Vec<Socket<G>>,
) {
    let (listener, what) = socks
        .first()
        .map_or(("gateway", "datagram"), |s| s.ctx.names);
    loop {
        let loaded = socks.iter().any(|s| s.running.is_some());
        let want = poll_fn(|cx| ctl.poll_change(cx, loaded)).await;
        if want {
            match bind_all(&mut socks) {
                Ok(addrs) => {
                    info!(listener, addrs = ?addrs, "{what} gateway loaded");
                    ctl.settle(GatewayState::Running(addrs));
                }
                Err(e) => {
                    warn!(listener, error = %e, "{what} gateway cannot load");
                    ctl.settle(GatewayState::Failed(e));
                }
            }
        } else {
            let mut closed = 0;
            for s in socks.iter_mut() {
                let Some((tasks, sock)) = s.running.take() else {
                    continue;
                };
                drop(tasks);
                let sn = &s.ctx;
                closed += {
                    let mut e = sn.conn.engine.borrow_mut();
                    let mut gw = sn.gw.borrow_mut();
                    let n = gw.close_all(&mut e, clock::now());
                    sn.settle(&mut e, &mut gw);
                    n
                };
                flush(sn, &sock).await;
                drop(sock);
                sn.ready.take();
                sn.wakers.borrow_mut().clear();
            }
            info!(listener, closed, "{what} gateway unloaded");
            ctl.settle(GatewayState::Stopped);
        }
    }
}

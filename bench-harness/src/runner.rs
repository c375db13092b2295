//! Running a scenario: worker executors (glommio, one per thread) own the client connections;
//! the calling thread coordinates the phases, samples per-second figures and shows progress.
//!
//! Phases of a pubsub run: subscribers connect and subscribe → publishers connect → warm-up
//! (publishing, not measured) → measurement → stop (publishers stop, subscribers keep reading
//! until every expected message arrived or the drain time ran out) → done.

use crate::client::{
    ack, connect_packet, device_connect_frame, device_data_frame, next_device_incoming,
    next_incoming, subscribe_packet, Incoming,
};
use crate::net::{self, Shared};
use crate::report::{ConnResult, PubsubResult, Second};
use crate::scenario::{ConnScenario, GatewayDirection, Pattern, PubsubScenario};
use crate::stats::{self, new_histogram, Delivery, LatencySummary, SeqTracker};
use crate::transport::{self, ClientTransport};
use bytes::BytesMut;
use glommio::timer::sleep;
use glommio::{spawn_local, LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use shardmq_protocol::mqtt::{encode_publish, Packet, QoS};
use std::cell::{Cell, RefCell};
use std::io::{self, IsTerminal, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod sn;

/// The broker under test.
#[derive(Debug, Clone)]
pub struct Target {
    /// Name in reports.
    pub name: String,
    /// Address.
    pub addr: SocketAddr,
    /// Process id, for RSS readings.
    pub pid: Option<u32>,
}

/// Where the load generator runs.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Worker threads (one glommio executor each).
    pub threads: usize,
    /// CPUs to pin the workers to (one per worker); `None` = unpinned.
    pub cpus: Option<Vec<usize>>,
    /// Loopback source addresses to spread connections over; 0 = one per 20,000 connections.
    pub sources: usize,
    /// Live progress on the terminal.
    pub progress: bool,
    /// What connections travel over.
    pub transport: ClientTransport,
}

const SETUP: u8 = 0;
const PUBS: u8 = 1;
const WARMUP: u8 = 2;
const MEASURE: u8 = 3;
const STOP: u8 = 4;
const DONE: u8 = 5;

/// How long connecting may take before the run fails.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);
/// Preface a raw-forwarder client sends instead of CONNECT.
pub const RAW_PREFACE: &[u8; 6] = b"SMQFWD";

struct Coord {
    phase: AtomicU8,
    epoch: Instant,
    subs_ready: AtomicUsize,
    pubs_ready: AtomicUsize,
    failed: AtomicUsize,
    sent: AtomicU64,
    received: AtomicU64,
    error_count: AtomicU64,
    errors: Mutex<Vec<String>>,
    live: Mutex<Histogram<u64>>,
    /// Copies received by subscribers, per publisher (the end-to-end window of max mode).
    delivered: Vec<AtomicU64>,
}

impl Coord {
    fn new(publishers: usize) -> Arc<Self> {
        Arc::new(Coord {
            phase: AtomicU8::new(SETUP),
            epoch: Instant::now(),
            subs_ready: AtomicUsize::new(0),
            pubs_ready: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            error_count: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
            live: Mutex::new(new_histogram()),
            delivered: (0..publishers).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    fn phase(&self) -> u8 {
        self.phase.load(Ordering::Acquire)
    }

    fn set(&self, p: u8) {
        self.phase.store(p, Ordering::Release);
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn error(&self, what: String) {
        self.error_count.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut e) = self.errors.lock() {
            if e.len() < 10 {
                e.push(what);
            }
        }
    }
}

async fn wait_phase(coord: &Coord, at_least: u8) {
    while coord.phase() < at_least {
        sleep(Duration::from_millis(5)).await;
    }
}

/// Runs `f` on each worker executor and returns their results.
fn on_workers<T, F, Fut>(opts: &RunOptions, f: F) -> Result<Vec<T>, String>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = T> + 'static,
{
    let mut handles = Vec::new();
    for w in 0..opts.threads {
        let placement = match &opts.cpus {
            Some(c) => Placement::Fixed(c[w % c.len()]),
            None => Placement::Unbound,
        };
        let f = f.clone();
        let h = LocalExecutorBuilder::new(placement)
            .name(&format!("bench{w}"))
            .io_memory(256 << 10)
            .spawn(move || f(w))
            .map_err(|e| format!("cannot start worker {w}: {e}"))?;
        handles.push(h);
    }
    handles
        .into_iter()
        .enumerate()
        .map(|(w, h)| h.join().map_err(|e| format!("worker {w} failed: {e}")))
        .collect()
}

struct Plan {
    sc: PubsubScenario,
    addr: SocketAddr,
    transport: ClientTransport,
    sources: usize,
    threads: usize,
    run_id: String,
    qos: QoS,
}

impl Plan {
    /// Whether clients in `role` are TCP gateway devices (`--tcpgw`).
    fn device(&self, role: Role) -> bool {
        matches!(
            (self.sc.tcpgw, role),
            (Some(GatewayDirection::Up), Role::Publisher)
                | (Some(GatewayDirection::Down), Role::Subscriber)
        )
    }

    fn client_id(&self, role: Role, idx: usize) -> String {
        let tag = match role {
            Role::Publisher => 'p',
            Role::Subscriber => 's',
        };
        format!("b{}-{tag}{idx}", self.run_id)
    }

    fn topic(&self, publisher: usize) -> String {
        if self.sc.tcpgw == Some(GatewayDirection::Down) {
            return format!("tcp/{}/dn", self.client_id(Role::Subscriber, publisher));
        }
        match self.sc.pattern {
            Pattern::P2p => format!("bench/{}/p2p/{publisher}", self.run_id),
            Pattern::Fanout => format!("bench/{}/fanout", self.run_id),
            Pattern::Fanin => format!("bench/{}/fanin/{publisher}", self.run_id),
        }
    }

    fn filter(&self, subscriber: usize) -> String {
        if self.sc.tcpgw == Some(GatewayDirection::Up) {
            return format!("tcp/{}/up", self.client_id(Role::Publisher, subscriber));
        }
        match self.sc.pattern {
            Pattern::P2p => format!("bench/{}/p2p/{subscriber}", self.run_id),
            Pattern::Fanout => format!("bench/{}/fanout", self.run_id),
            Pattern::Fanin => format!("bench/{}/fanin/+", self.run_id),
        }
    }

    /// Copies of each published message the subscribers should receive.
    fn copies(&self) -> u64 {
        match self.sc.pattern {
            Pattern::P2p => 1,
            Pattern::Fanout | Pattern::Fanin => self.sc.subscribers as u64,
        }
    }
}

#[derive(Default)]
struct WorkerOut {
    measured: Option<Histogram<u64>>,
    connack: Option<Histogram<u64>>,
    trackers: Vec<SeqTracker>,
    sent_measured: u64,
    received_measured: u64,
    sent_total: u64,
}

struct Local {
    measured: RefCell<Histogram<u64>>,
    interval: RefCell<Histogram<u64>>,
    connack: RefCell<Histogram<u64>>,
    sent_measured: Cell<u64>,
    received_measured: Cell<u64>,
    scratch: RefCell<Vec<u8>>,
    /// Publishers waiting for their end-to-end window: (publisher, delivered count that
    /// frees a slot, since when, waker).
    blocked: RefCell<Vec<(usize, u64, Instant, std::task::Waker)>>,
}

fn timestamp_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Where and as whom a client connects.
struct Endpoint<'a> {
    addr: SocketAddr,
    source: Option<std::net::IpAddr>,
    client_id: &'a str,
    keepalive: u16,
    /// (role, pair index) for a raw forwarder instead of MQTT.
    raw: Option<(u8, u32)>,
    /// A TCP gateway device instead of an MQTT client.
    device: bool,
    transport: &'a ClientTransport,
}

/// Opens a connection and completes CONNECT/CONNACK (or the raw preface).
async fn open(
    coord: &Coord,
    local: &Local,
    ep: &Endpoint<'_>,
    buf: &mut BytesMut,
) -> io::Result<Rc<Shared>> {
    let Endpoint {
        addr,
        source,
        client_id,
        keepalive,
        raw,
        device,
        transport,
    } = *ep;
    let t0 = coord.now_ns();
    let stream = net::connect(addr, source)?;
    // The TLS handshake and the WebSocket upgrade (if any) count in the CONNACK time.
    let stream = transport::establish(stream, transport).await?;
    stream
        .tcp()
        .set_read_timeout(Some(Duration::from_millis(200)))?;
    let s = Shared::new(stream);
    if let Some((role, idx)) = raw {
        let mut p = RAW_PREFACE.to_vec();
        p.push(role);
        p.extend_from_slice(&idx.to_be_bytes());
        s.write_all(&p).await?;
        return Ok(s);
    }
    let parse = if device {
        s.write_all(&device_connect_frame(client_id, keepalive))
            .await?;
        next_device_incoming
    } else {
        s.write_all(&connect_packet(client_id, keepalive)).await?;
        next_incoming
    };
    loop {
        match parse(buf).map_err(io::Error::other)? {
            Some(Incoming::Connack(0)) => break,
            Some(Incoming::Connack(code)) => {
                return Err(io::Error::other(format!("CONNACK {code}")))
            }
            Some(_) => {}
            None => {
                if read_some(coord, &s, local, buf, SETUP_TIMEOUT).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
    }
    let _ = local
        .connack
        .borrow_mut()
        .record((coord.now_ns() - t0).max(1));
    Ok(s)
}

/// Reads once; a read timeout is retried until `limit` has passed or the run is done.
async fn read_some(
    coord: &Coord,
    s: &Shared,
    local: &Local,
    buf: &mut BytesMut,
    limit: Duration,
) -> io::Result<usize> {
    let start = Instant::now();
    loop {
        match s.read_into(&local.scratch, buf).await {
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                if coord.phase() == DONE || start.elapsed() > limit {
                    return Err(e);
                }
            }
            other => return other,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Publisher,
    Subscriber,
}

/// Connects client `idx` in `role`; a failure is counted and reported, and gives `None`.
async fn connect_client(
    role: Role,
    idx: usize,
    plan: &Plan,
    coord: &Coord,
    local: &Local,
    buf: &mut BytesMut,
) -> Option<Rc<Shared>> {
    let (name, raw_role, n) = match role {
        Role::Publisher => ("publisher", 0u8, plan.sc.subscribers + idx),
        Role::Subscriber => ("subscriber", 1u8, idx),
    };
    let id = plan.client_id(role, idx);
    let device = plan.device(role);
    let ep = Endpoint {
        addr: if device {
            SocketAddr::new(plan.addr.ip(), plan.sc.tcpgw_port)
        } else {
            plan.addr
        },
        device,
        source: net::source_for(n, plan.sources, plan.addr),
        client_id: &id,
        keepalive: plan.sc.keepalive,
        raw: plan.sc.raw.then_some((raw_role, idx as u32)),
        transport: &plan.transport,
    };
    match open(coord, local, &ep, buf).await {
        Ok(s) => Some(s),
        Err(e) => {
            coord.failed.fetch_add(1, Ordering::AcqRel);
            coord.error(format!("{name} {idx}: {e}"));
            None
        }
    }
}

async fn subscriber(idx: usize, plan: Rc<Plan>, coord: Arc<Coord>, local: Rc<Local>) -> SeqTracker {
    let mut tracker = SeqTracker::default();
    let mut buf = BytesMut::new();
    let Some(s) = connect_client(Role::Subscriber, idx, &plan, &coord, &local, &mut buf).await
    else {
        return tracker;
    };
    let device = plan.device(Role::Subscriber);
    let parse = if device {
        next_device_incoming
    } else {
        next_incoming
    };
    // A device is subscribed by the gateway when it connects.
    if !plan.sc.raw && !device {
        let r: io::Result<()> = async {
            s.write_all(&subscribe_packet(&plan.filter(idx), plan.qos))
                .await?;
            loop {
                match next_incoming(&mut buf).map_err(io::Error::other)? {
                    Some(Incoming::Suback(true)) => return Ok(()),
                    Some(Incoming::Suback(false)) => {
                        return Err(io::Error::other("subscription refused"))
                    }
                    Some(_) => {}
                    None => {
                        if read_some(&coord, &s, &local, &mut buf, SETUP_TIMEOUT).await? == 0 {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                    }
                }
            }
        }
        .await;
        if let Err(e) = r {
            coord.failed.fetch_add(1, Ordering::AcqRel);
            coord.error(format!("subscriber {idx}: {e}"));
            return tracker;
        }
    }
    coord.subs_ready.fetch_add(1, Ordering::AcqRel);
    // A subscriber frees the publishers' windows: when its socket turns readable it runs
    // before the publisher tasks woken with it.
    glommio::task::set_wake_first(true);
    let mut acks = BytesMut::new();
    let mut per_publisher: ahash::AHashMap<u32, u64> = ahash::AHashMap::new();
    loop {
        let now = coord.now_ns();
        let measuring = coord.phase() == MEASURE;
        let mut got = 0u64;
        loop {
            match parse(&mut buf) {
                Ok(Some(Incoming::Publish {
                    qos,
                    packet_id,
                    header,
                })) => {
                    got += 1;
                    if let Some((publisher, seq, sent)) = header {
                        tracker.record(publisher, seq);
                        *per_publisher.entry(publisher).or_default() += 1;
                        let lat = now.saturating_sub(sent).max(1);
                        let _ = local.interval.borrow_mut().record(lat);
                        if measuring {
                            let _ = local.measured.borrow_mut().record(lat);
                        }
                    }
                    match qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => ack(Packet::Puback(packet_id), &mut acks),
                        QoS::ExactlyOnce => ack(Packet::Pubrec(packet_id), &mut acks),
                    }
                }
                Ok(Some(Incoming::Pubrel(id))) => ack(Packet::Pubcomp(id), &mut acks),
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    coord.error(format!("subscriber {idx}: {e}"));
                    return tracker;
                }
            }
        }
        for (publisher, n) in per_publisher.drain() {
            if let Some(d) = coord.delivered.get(publisher as usize) {
                d.fetch_add(n, Ordering::Relaxed);
            }
        }
        if got > 0 {
            coord.received.fetch_add(got, Ordering::Relaxed);
            if measuring {
                local
                    .received_measured
                    .set(local.received_measured.get() + got);
            }
        }
        if !acks.is_empty() {
            if let Err(e) = s.write_all(&acks).await {
                coord.error(format!("subscriber {idx}: {e}"));
                return tracker;
            }
            acks.clear();
        }
        if coord.phase() == DONE {
            break;
        }
        match s.read_into(&local.scratch, &mut buf).await {
            Ok(0) => {
                coord.error(format!("subscriber {idx}: closed by the broker"));
                return tracker;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
            Err(e) => {
                coord.error(format!("subscriber {idx}: {e}"));
                return tracker;
            }
        }
    }
    if !plan.sc.raw {
        let _ = s
            .write_all(if device { &[0x60][..] } else { &[0xE0, 0][..] })
            .await;
    }
    tracker
}

async fn publisher(idx: usize, plan: Rc<Plan>, coord: Arc<Coord>, local: Rc<Local>) -> u64 {
    let mut buf = BytesMut::new();
    let Some(s) = connect_client(Role::Publisher, idx, &plan, &coord, &local, &mut buf).await
    else {
        return 0;
    };
    coord.pubs_ready.fetch_add(1, Ordering::AcqRel);
    let window = Rc::new(glommio::sync::Semaphore::new(plan.sc.inflight as u64));
    let reader = (plan.qos != QoS::AtMostOnce).then(|| {
        let (s, coord, local, window) = (s.clone(), coord.clone(), local.clone(), window.clone());
        spawn_local(async move {
            let mut rel = BytesMut::new();
            loop {
                loop {
                    match next_incoming(&mut buf) {
                        Ok(Some(Incoming::Puback(_) | Incoming::Pubcomp(_))) => window.signal(1),
                        Ok(Some(Incoming::Pubrec(id))) => ack(Packet::Pubrel(id), &mut rel),
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => return coord.error(format!("publisher {idx}: {e}")),
                    }
                }
                if !rel.is_empty() {
                    if let Err(e) = s.write_all(&rel).await {
                        return coord.error(format!("publisher {idx}: {e}"));
                    }
                    rel.clear();
                }
                if coord.phase() == DONE {
                    return;
                }
                match s.read_into(&local.scratch, &mut buf).await {
                    Ok(0) => return coord.error(format!("publisher {idx}: closed by the broker")),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                    Err(e) => return coord.error(format!("publisher {idx}: {e}")),
                }
            }
        })
    });
    wait_phase(&coord, WARMUP).await;
    let device = plan.device(Role::Publisher);
    let topic = plan.topic(idx);
    let mut payload = vec![0u8; plan.sc.payload.as_usize()];
    let mut out = BytesMut::new();
    let mut seq: u32 = 0;
    let mut packet_id: u16 = 0;
    let tick = if plan.sc.rate > 0.0 {
        Some(Duration::from_secs_f64((1.0 / plan.sc.rate).max(0.005)))
    } else {
        None
    };
    // Fixed rate: publisher `idx` starts `idx / publishers` of a tick late and then keeps to
    // its own timeline (tick k at `started + k · tick`), so the publishers' sends stay spread
    // evenly over each tick instead of arriving as one burst per tick.
    let phase = tick.map_or(Duration::ZERO, |t| {
        publisher_phase(t, idx, plan.sc.publishers)
    });
    let started = Instant::now() + phase;
    let mut next_tick = started;
    let mut window_state = Window::default();
    while coord.phase() < STOP {
        let n = match tick {
            Some(t) => {
                next_tick += t;
                let wait = next_tick.saturating_duration_since(Instant::now());
                sleep(grid_wait(coord.now_ns(), wait)).await;
                let due = (started.elapsed().as_secs_f64() * plan.sc.rate) as u64;
                due.saturating_sub(seq as u64)
                    .min(plan.sc.inflight.max(1) as u64 * 64) as usize
            }
            None => e2e_window(idx, seq, &mut window_state, &plan, &coord, &local).await,
        };
        let n = if plan.qos == QoS::AtMostOnce {
            n
        } else {
            // Acknowledgement window: wait for one slot (or the end), then take what is free.
            let want = n;
            if want == 0 {
                continue;
            }
            let acquired =
                futures_lite::future::or(async { window.acquire(1).await.is_ok() }, async {
                    wait_phase(&coord, STOP).await;
                    false
                })
                .await;
            if !acquired {
                break;
            }
            let mut got = 1;
            while got < want && window.try_acquire(1).unwrap_or(false) {
                got += 1;
            }
            got
        };
        if n == 0 {
            continue;
        }
        let now = coord.now_ns();
        for _ in 0..n {
            stats::write_header(&mut payload, idx as u32, seq, now);
            if plan.qos != QoS::AtMostOnce {
                packet_id = packet_id.wrapping_add(1).max(1);
            }
            if device {
                device_data_frame(&payload, &mut out);
            } else {
                encode_publish(
                    false,
                    plan.qos,
                    false,
                    topic.as_bytes(),
                    packet_id,
                    &payload,
                    &mut out,
                );
            }
            seq = seq.wrapping_add(1);
        }
        if let Err(e) = s.write_all(&out).await {
            coord.error(format!("publisher {idx}: {e}"));
            break;
        }
        out.clear();
        coord.sent.fetch_add(n as u64, Ordering::Relaxed);
        if coord.phase() == MEASURE {
            local
                .sent_measured
                .set(local.sent_measured.get() + n as u64);
        }
    }
    wait_phase(&coord, DONE).await;
    if let Some(r) = reader {
        r.await;
    }
    if !plan.sc.raw {
        let _ = s
            .write_all(if device { &[0x60][..] } else { &[0xE0, 0][..] })
            .await;
    }
    seq as u64
}

/// Fixed-rate sends are timed to this grid: a worker wakes at most once per step for all its
/// publishers that are due, instead of once per publisher.
const SEND_GRID: Duration = Duration::from_micros(100);

/// The wait from `now_ns` (the run's clock) that covers `wait` and ends on a multiple of
/// [`SEND_GRID`].
fn grid_wait(now_ns: u64, wait: Duration) -> Duration {
    let grid = SEND_GRID.as_nanos() as u64;
    let at = now_ns + wait.as_nanos() as u64;
    Duration::from_nanos(at.div_ceil(grid) * grid - now_ns)
}

/// How late publisher `idx` of `publishers` starts its fixed-rate timeline: an even share of
/// one tick, so the publishers' sends spread over the tick.
fn publisher_phase(tick: Duration, idx: usize, publishers: usize) -> Duration {
    tick.mul_f64(idx as f64 / publishers.max(1) as f64)
}

/// A message that has not arrived after this long is taken as lost: its slot in the
/// end-to-end window is freed, so a broker that drops messages slows a run down instead of
/// stalling it (the loss is still counted).
const LOSS_TIMEOUT: Duration = Duration::from_secs(2);

/// The end-to-end window of one publisher in max mode.
#[derive(Default)]
struct Window {
    /// Copies given up as lost.
    forgiven: u64,
}

/// Max mode: how many messages publisher `idx` may send now so that at most `inflight` of
/// its messages are on their way to subscribers (published but not yet received by every
/// subscriber they go to). Waits while none may; 0 once the run stops.
async fn e2e_window(
    idx: usize,
    seq: u32,
    win: &mut Window,
    plan: &Plan,
    coord: &Coord,
    local: &Local,
) -> usize {
    let copies = plan.copies();
    let window = plan.sc.inflight as u64;
    let sent = u64::from(seq) * copies;
    let mut since: Option<Instant> = None;
    std::future::poll_fn(|cx| {
        if coord.phase() >= STOP {
            return std::task::Poll::Ready(0);
        }
        let delivered = coord.delivered[idx].load(Ordering::Acquire) + win.forgiven;
        let outstanding = sent.saturating_sub(delivered);
        let free = window.saturating_sub(outstanding.div_ceil(copies));
        if free > 0 {
            return std::task::Poll::Ready(free as usize);
        }
        match since {
            Some(t) if t.elapsed() >= LOSS_TIMEOUT => {
                win.forgiven += outstanding;
                return std::task::Poll::Ready(window as usize);
            }
            Some(_) => {}
            None => since = Some(Instant::now()),
        }
        let target = (sent - (window - 1) * copies).saturating_sub(win.forgiven);
        local
            .blocked
            .borrow_mut()
            .push((idx, target, Instant::now(), cx.waker().clone()));
        std::task::Poll::Pending
    })
    .await
}

/// Wakes publishers whose end-to-end window has room again, or that waited longer than
/// [`LOSS_TIMEOUT`] (every 500 µs).
async fn pacer(coord: Arc<Coord>, local: Rc<Local>) {
    while coord.phase() < DONE {
        sleep(Duration::from_micros(500)).await;
        let stop = coord.phase() >= STOP;
        // One clock read per tick, not one per blocked publisher (a thousand every 500 µs).
        let now = Instant::now();
        local
            .blocked
            .borrow_mut()
            .retain(|(idx, target, since, waker)| {
                if stop
                    || coord.delivered[*idx].load(Ordering::Acquire) >= *target
                    || now.saturating_duration_since(*since) >= LOSS_TIMEOUT
                {
                    waker.wake_by_ref();
                    false
                } else {
                    true
                }
            });
    }
}

async fn pubsub_worker(w: usize, plan: Arc<Plan>, coord: Arc<Coord>) -> WorkerOut {
    let plan = Rc::new(Plan {
        sc: plan.sc.clone(),
        addr: plan.addr,
        transport: plan.transport.clone(),
        sources: plan.sources,
        threads: plan.threads,
        run_id: plan.run_id.clone(),
        qos: plan.qos,
    });
    let local = Rc::new(Local {
        measured: RefCell::new(new_histogram()),
        interval: RefCell::new(new_histogram()),
        connack: RefCell::new(new_histogram()),
        sent_measured: Cell::new(0),
        received_measured: Cell::new(0),
        scratch: RefCell::new(vec![0u8; 64 << 10]),
        blocked: RefCell::new(Vec::new()),
    });
    let flusher = {
        let (local, coord) = (local.clone(), coord.clone());
        spawn_local(async move {
            while coord.phase() < DONE {
                sleep(Duration::from_millis(100)).await;
                let mut h = local.interval.borrow_mut();
                if let Ok(mut live) = coord.live.lock() {
                    let _ = live.add(&*h);
                }
                h.reset();
            }
        })
    };
    let pacer = spawn_local(pacer(coord.clone(), local.clone()));
    let subs: Vec<_> = (w..plan.sc.subscribers)
        .step_by(plan.threads)
        .map(|i| spawn_local(subscriber(i, plan.clone(), coord.clone(), local.clone())))
        .collect();
    wait_phase(&coord, PUBS).await;
    let pubs: Vec<_> = (w..plan.sc.publishers)
        .step_by(plan.threads)
        .map(|i| {
            let (plan, coord, local) = (plan.clone(), coord.clone(), local.clone());
            if plan.sc.mqttsn_port.is_some() {
                spawn_local(sn::publisher(i, plan, coord, local))
            } else {
                spawn_local(publisher(i, plan, coord, local))
            }
        })
        .collect();
    let mut out = WorkerOut::default();
    for p in pubs {
        out.sent_total += p.await;
    }
    for s in subs {
        out.trackers.push(s.await);
    }
    flusher.await;
    pacer.await;
    out.sent_measured = local.sent_measured.get();
    out.received_measured = local.received_measured.get();
    out.measured = Some(local.measured.replace(new_histogram()));
    out.connack = Some(local.connack.replace(new_histogram()));
    out
}

fn wait_until(
    what: &str,
    coord: &Coord,
    timeout: Duration,
    done: impl Fn() -> bool,
) -> Result<(), String> {
    let start = Instant::now();
    while !done() {
        if start.elapsed() > timeout {
            return Err(format!("timed out while {what}: {}", first_errors(coord)));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn first_errors(coord: &Coord) -> String {
    coord
        .errors
        .lock()
        .map(|e| e.join("; "))
        .unwrap_or_default()
}

fn auto_sources(opts: &RunOptions, connections: usize) -> usize {
    if opts.sources > 0 {
        opts.sources
    } else {
        connections.div_ceil(net::PER_SOURCE).max(1)
    }
}

/// Live progress on stderr: one line redrawn in place on a terminal; when stderr is a pipe or
/// a file, a plain line every few seconds.
struct Progress {
    on: bool,
    tty: bool,
    last: std::cell::Cell<Option<Instant>>,
}

/// How often progress is printed when stderr is not a terminal.
const PIPED_PROGRESS_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    fn new(on: bool) -> Progress {
        Progress {
            on,
            tty: std::io::stderr().is_terminal(),
            last: std::cell::Cell::new(None),
        }
    }

    /// A line said once, before the progress (what the run will do).
    fn note(&self, line: &str) {
        if self.on {
            eprintln!("{line}");
        }
    }

    fn show(&self, line: &str) {
        if !self.on {
            return;
        }
        if self.tty {
            let mut e = std::io::stderr();
            let _ = write!(e, "\r\x1b[2K{line}");
            let _ = e.flush();
        } else if self
            .last
            .get()
            .is_none_or(|t| t.elapsed() >= PIPED_PROGRESS_EVERY)
        {
            self.last.set(Some(Instant::now()));
            eprintln!("{line}");
        }
    }

    fn end(&self) {
        if self.on && self.tty {
            eprintln!();
        }
    }
}

/// Runs a pubsub scenario against `target`.
pub fn run_pubsub(
    target: &Target,
    opts: &RunOptions,
    sc: &PubsubScenario,
) -> Result<PubsubResult, String> {
    if sc.raw && opts.transport.kind != transport::Kind::Tcp {
        return Err("raw (the forwarder baseline) runs over plain TCP only".into());
    }
    let coord = Coord::new(sc.publishers);
    let plan = Arc::new(Plan {
        sc: sc.clone(),
        addr: target.addr,
        transport: opts.transport.clone(),
        sources: auto_sources(opts, sc.publishers + sc.subscribers),
        threads: opts.threads.max(1),
        run_id: format!("{:x}", timestamp_ms() ^ u64::from(std::process::id())),
        qos: QoS::from_u8(sc.qos).ok_or("qos must be 0, 1 or 2")?,
    });
    let progress = Progress::new(opts.progress);
    progress.note(&format!(
        "{}: connecting {} subscribers and {} publishers, then {} s of warm-up (publishing, not \
         measured: buffers, windows and caches settle), {} s measured, and up to {} s for \
         messages still in flight",
        sc.name,
        sc.subscribers,
        sc.publishers,
        sc.warmup.0.as_secs_f64(),
        sc.duration.0.as_secs_f64(),
        sc.drain.0.as_secs_f64()
    ));
    let mut peak_rss = target.pid.and_then(rss_bytes);
    let workers = {
        let (plan, coord) = (plan.clone(), coord.clone());
        let opts = RunOptions {
            threads: plan.threads,
            ..opts.clone()
        };
        std::thread::spawn(move || {
            on_workers(&opts, move |w| {
                pubsub_worker(w, plan.clone(), coord.clone())
            })
        })
    };
    let abort = |coord: &Coord, e: String| {
        coord.set(DONE);
        e
    };
    let subs_total = sc.subscribers;
    wait_until("connecting subscribers", &coord, SETUP_TIMEOUT, || {
        coord.subs_ready.load(Ordering::Acquire) + coord.failed.load(Ordering::Acquire)
            >= subs_total
    })
    .map_err(|e| abort(&coord, e))?;
    if coord.failed.load(Ordering::Acquire) > 0 {
        coord.set(DONE);
        let _ = workers.join();
        return Err(format!(
            "subscribers failed to connect: {}",
            first_errors(&coord)
        ));
    }
    coord.set(PUBS);
    wait_until("connecting publishers", &coord, SETUP_TIMEOUT, || {
        coord.pubs_ready.load(Ordering::Acquire) + coord.failed.load(Ordering::Acquire)
            >= sc.publishers
    })
    .map_err(|e| abort(&coord, e))?;
    if coord.failed.load(Ordering::Acquire) > 0 {
        coord.set(DONE);
        let _ = workers.join();
        return Err(format!(
            "publishers failed to connect: {}",
            first_errors(&coord)
        ));
    }
    coord.set(WARMUP);
    let total = sc.warmup.0 + sc.duration.0;
    let run_start = Instant::now();
    let mut series = Vec::new();
    let (mut last_sent, mut last_recv) = (0u64, 0u64);
    let mut measure_start = None;
    let mut second = 1u64;
    while run_start.elapsed() < total {
        let next = run_start + Duration::from_secs(second);
        let until_measure = sc.warmup.0.checked_sub(run_start.elapsed());
        let wake = match until_measure {
            Some(d) if run_start + sc.warmup.0 < next && !d.is_zero() => run_start + sc.warmup.0,
            _ => next.min(run_start + total),
        };
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
        if measure_start.is_none() && run_start.elapsed() >= sc.warmup.0 {
            coord.set(MEASURE);
            measure_start = Some(Instant::now());
        }
        if Instant::now() < next && run_start.elapsed() < total {
            continue;
        }
        let sent = coord.sent.load(Ordering::Relaxed);
        let recv = coord.received.load(Ordering::Relaxed);
        let p99 = coord
            .live
            .lock()
            .map(|mut h| {
                let v = h.value_at_quantile(0.99) as f64 / 1000.0;
                h.reset();
                v
            })
            .unwrap_or(0.0);
        series.push(Second {
            t: second as f64,
            sent: sent - last_sent,
            received: recv - last_recv,
            p99_us: p99,
            measured: run_start.elapsed() > sc.warmup.0 + Duration::from_millis(1),
        });
        if let Some(pid) = target.pid {
            peak_rss = peak_rss.max(rss_bytes(pid));
        }
        let phase = if second <= sc.warmup.0.as_secs() {
            "warm-up"
        } else {
            "measured"
        };
        progress.show(&format!(
            "{}  {:>3}/{}s {phase:<8}  in {:>10}/s  out {:>10}/s  p99 {:>9.1} µs  errors {}",
            sc.name,
            second,
            total.as_secs(),
            sent - last_sent,
            recv - last_recv,
            p99,
            coord.error_count.load(Ordering::Relaxed)
        ));
        last_sent = sent;
        last_recv = recv;
        second += 1;
    }
    coord.set(STOP);
    let measured = measure_start.map_or(Duration::ZERO, |s| s.elapsed());
    // Drain: until every expected message is in, or nothing moved for a while, or time is up.
    let drain_start = Instant::now();
    let mut last = (coord.received.load(Ordering::Relaxed), Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let recv = coord.received.load(Ordering::Relaxed);
        let expected = coord.sent.load(Ordering::Relaxed) * plan.copies();
        if recv >= expected || drain_start.elapsed() > sc.drain.0 {
            break;
        }
        if recv != last.0 {
            last = (recv, Instant::now());
        } else if last.1.elapsed() > Duration::from_millis(1500) {
            break;
        }
    }
    coord.set(DONE);
    progress.end();
    let outs = workers
        .join()
        .map_err(|_| "worker thread panicked".to_string())??;
    let mut latency = new_histogram();
    let mut connack = new_histogram();
    let (mut sent_measured, mut received_measured, mut sent_total) = (0, 0, 0);
    let mut trackers = Vec::new();
    for o in outs {
        if let Some(h) = &o.measured {
            let _ = latency.add(h);
        }
        if let Some(h) = &o.connack {
            let _ = connack.add(h);
        }
        sent_measured += o.sent_measured;
        received_measured += o.received_measured;
        sent_total += o.sent_total;
        trackers.extend(o.trackers);
    }
    let secs = measured.as_secs_f64().max(1e-9);
    Ok(PubsubResult {
        measured_secs: secs,
        sent: sent_measured,
        received: received_measured,
        rate_in: sent_measured as f64 / secs,
        rate_out: received_measured as f64 / secs,
        series,
        latency: LatencySummary::of(&latency),
        connack: LatencySummary::of(&connack),
        delivery: Delivery::from_trackers(sent_total * plan.copies(), trackers.iter()),
        errors: coord.error_count.load(Ordering::Relaxed),
        error_samples: coord.errors.lock().map(|e| e.clone()).unwrap_or_default(),
        broker_rss_peak: peak_rss,
    })
}

/// Reads VmRSS of `pid` in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

async fn conn_worker(
    w: usize,
    threads: usize,
    sc: ConnScenario,
    (addr, transport): (SocketAddr, ClientTransport),
    sources: usize,
    coord: Arc<Coord>,
) -> WorkerOut {
    let transport = Rc::new(transport);
    let local = Rc::new(Local {
        measured: RefCell::new(new_histogram()),
        interval: RefCell::new(new_histogram()),
        connack: RefCell::new(new_histogram()),
        sent_measured: Cell::new(0),
        received_measured: Cell::new(0),
        scratch: RefCell::new(vec![0u8; 4 << 10]),
        blocked: RefCell::new(Vec::new()),
    });
    let mine: Vec<usize> = (w..sc.connections).step_by(threads).collect();
    let per_worker_rate = if sc.rate > 0.0 {
        sc.rate / threads as f64
    } else {
        0.0
    };
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(mine.len());
    for (k, i) in mine.into_iter().enumerate() {
        if per_worker_rate > 0.0 {
            let due = started + Duration::from_secs_f64(k as f64 / per_worker_rate);
            let now = Instant::now();
            if due > now {
                sleep(due - now).await;
            }
        } else if k % 64 == 63 {
            futures_lite::future::yield_now().await;
        }
        let (coord, local, transport) = (coord.clone(), local.clone(), transport.clone());
        let ka = sc.keepalive;
        tasks.push(spawn_local(async move {
            let mut buf = BytesMut::new();
            let id = format!(
                "bc{}-{i}",
                coord.epoch.elapsed().as_nanos() as u64 ^ u64::from(std::process::id())
            );
            let ep = Endpoint {
                addr,
                source: net::source_for(i, sources, addr),
                client_id: &id,
                keepalive: ka,
                raw: None,
                device: false,
                transport: &transport,
            };
            let s = match open(&coord, &local, &ep, &mut buf).await {
                Ok(s) => s,
                Err(e) => {
                    coord.failed.fetch_add(1, Ordering::AcqRel);
                    coord.error(format!("connection {i}: {e}"));
                    return;
                }
            };
            coord.subs_ready.fetch_add(1, Ordering::AcqRel);
            let ping_every = (ka > 0).then(|| Duration::from_secs(u64::from(ka)) / 2);
            let mut last_ping = Instant::now();
            while coord.phase() < DONE {
                match s.read_into(&local.scratch, &mut buf).await {
                    Ok(0) => {
                        coord.error(format!("connection {i}: closed by the broker"));
                        return;
                    }
                    Ok(_) => while let Ok(Some(_)) = next_incoming(&mut buf) {},
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {}
                    Err(e) => {
                        coord.error(format!("connection {i}: {e}"));
                        return;
                    }
                }
                if ping_every.is_some_and(|p| last_ping.elapsed() >= p) {
                    last_ping = Instant::now();
                    let _ = s.write_all(&[0xC0, 0]).await;
                }
            }
            let _ = s.write_all(&[0xE0, 0]).await;
        }));
    }
    for t in tasks {
        t.await;
    }
    WorkerOut {
        connack: Some(local.connack.replace(new_histogram())),
        ..Default::default()
    }
}

/// Runs a conn scenario against `target`.
pub fn run_conn(
    target: &Target,
    opts: &RunOptions,
    sc: &ConnScenario,
) -> Result<ConnResult, String> {
    let coord = Coord::new(0);
    let sources = auto_sources(opts, sc.connections);
    let threads = opts.threads.max(1);
    let rss_before = target.pid.and_then(rss_bytes);
    let progress = Progress::new(opts.progress);
    let start = Instant::now();
    let workers = {
        let (coord, sc, addr) = (coord.clone(), sc.clone(), target.addr);
        let opts = RunOptions {
            threads,
            ..opts.clone()
        };
        std::thread::spawn(move || {
            let transport = opts.transport.clone();
            on_workers(&opts, move |w| {
                conn_worker(
                    w,
                    threads,
                    sc.clone(),
                    (addr, transport.clone()),
                    sources,
                    coord.clone(),
                )
            })
        })
    };
    let expected_secs = if sc.rate > 0.0 {
        sc.connections as f64 / sc.rate
    } else {
        0.0
    };
    let timeout = SETUP_TIMEOUT + Duration::from_secs_f64(expected_secs * 2.0);
    let result = wait_until("opening connections", &coord, timeout, || {
        let done = coord.subs_ready.load(Ordering::Acquire) + coord.failed.load(Ordering::Acquire);
        progress.show(&format!(
            "{}  {done}/{} connections",
            sc.name, sc.connections
        ));
        done >= sc.connections
    });
    let connect_secs = start.elapsed().as_secs_f64();
    progress.end();
    if let Err(e) = result {
        coord.set(DONE);
        let _ = workers.join();
        return Err(e);
    }
    std::thread::sleep(Duration::from_secs(3));
    let rss_after = target.pid.and_then(rss_bytes);
    std::thread::sleep(sc.hold.0.saturating_sub(Duration::from_secs(3)));
    let opened = coord.subs_ready.load(Ordering::Acquire);
    coord.set(DONE);
    let outs = workers
        .join()
        .map_err(|_| "worker thread panicked".to_string())??;
    let mut connack = new_histogram();
    for o in outs {
        if let Some(h) = &o.connack {
            let _ = connack.add(h);
        }
    }
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if opened > 0 => Some(a.saturating_sub(b) as f64 / opened as f64),
        _ => None,
    };
    Ok(ConnResult {
        connections: sc.connections,
        opened,
        failed: coord.failed.load(Ordering::Acquire),
        connect_secs,
        connect_rate: opened as f64 / connect_secs.max(1e-9),
        connack: LatencySummary::of(&connack),
        rss_before,
        rss_after,
        rss_per_connection: per_conn,
        errors: coord.error_count.load(Ordering::Relaxed),
        error_samples: coord.errors.lock().map(|e| e.clone()).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_rate_waits_end_on_the_send_grid() {
        let grid = SEND_GRID.as_nanos() as u64;
        for (now, wait_us) in [(0u64, 0u64), (1, 36_000), (123_456_789, 24), (grid, 100)] {
            let wait = Duration::from_micros(wait_us);
            let got = grid_wait(now, wait);
            assert!(got >= wait, "{got:?} < {wait:?}");
            assert!(got < wait + SEND_GRID, "{got:?} overshoots {wait:?}");
            assert_eq!((now + got.as_nanos() as u64) % grid, 0);
        }
    }

    #[test]
    fn publishers_spread_evenly_over_a_tick() {
        let tick = Duration::from_millis(36);
        assert_eq!(publisher_phase(tick, 0, 1000), Duration::ZERO);
        assert_eq!(publisher_phase(tick, 500, 1000), Duration::from_millis(18));
        assert!(publisher_phase(tick, 999, 1000) < tick);
        assert_eq!(publisher_phase(tick, 0, 0), Duration::ZERO);
    }
}

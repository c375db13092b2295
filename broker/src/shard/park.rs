//! Parking idle connections: a connected client with no traffic for `shards.park_idle_after`
//! gives up its driver task, its glommio stream and its buffers. Its socket waits in the
//! shard's epoll set; the engine keeps all its state. It is promoted back to a driver when the
//! socket becomes readable (the client sent something or went away) or when the engine wakes
//! it (a delivery, a close, shutdown).
//!
//! An idle glommio connection costs a task, a stream and an armed read source (about 1.2 KB);
//! a parked one costs an 8-byte slot in a vector and the kernel's epoll item (its waker is
//! the connection's token, with no allocation).
//!
//! One OS thread per shard blocks in `epoll_wait` and hands ready sockets to the shard through
//! a queue and a socketpair doorbell, which the shard's promoter task awaits with glommio.

use super::connection::{self, ConnCtx};
use crate::core::engine::ConnId;
use crate::shard::clock;
use crate::transport::tcp::Tcp;
use futures_lite::AsyncRead;
use glommio::net::UnixStream;
use glommio::{spawn_local, Task};
use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, RawWaker, RawWakerVTable, Waker};

/// Sockets waiting for promotion, by token (connection slot and generation).
type Queue = Arc<Mutex<Vec<u64>>>;

/// Where a parked connection's waker queues its token: the queue of promotions and the
/// promoter task's waker, set by [`ParkingLot::start`] on the shard's thread.
type WakeTarget = (Queue, Arc<Mutex<Option<Waker>>>);

thread_local! {
    static WAKE_TARGET: RefCell<Option<WakeTarget>> = const { RefCell::new(None) };
}

/// The engine's waker of a parked connection, with no allocation: the waker's data word is
/// the connection's token, and waking queues it for promotion on the current thread's parking
/// lot. The engine (not `Send`) holds and wakes these wakers only on its own shard thread,
/// which is the thread whose lot parked the connection.
fn park_waker(token: u64) -> Waker {
    // SAFETY: the vtable functions treat the data word as a plain integer and never
    // dereference it, so any value is valid and clone/drop need no bookkeeping.
    unsafe {
        Waker::from_raw(RawWaker::new(
            token as usize as *const (),
            &PARK_WAKER_VTABLE,
        ))
    }
}

// The token (slot and generation, 64 bits) travels in the waker's data word.
const _: () = assert!(usize::BITS >= 64, "park wakers need 64-bit pointers");

static PARK_WAKER_VTABLE: RawWakerVTable = RawWakerVTable::new(
    park_waker_clone,
    park_waker_wake,
    park_waker_wake,
    park_waker_drop,
);

fn park_waker_clone(data: *const ()) -> RawWaker {
    RawWaker::new(data, &PARK_WAKER_VTABLE)
}

fn park_waker_wake(data: *const ()) {
    let token = data as usize as u64;
    WAKE_TARGET.with(|t| {
        let Some((queue, promoter)) = &*t.borrow() else {
            return;
        };
        if let Ok(mut q) = queue.lock() {
            q.push(token);
        }
        if let Some(w) = promoter.lock().ok().and_then(|mut w| w.take()) {
            w.wake();
        }
    });
}

fn park_waker_drop(_: *const ()) {}

/// One shard's parked sockets.
pub struct ParkingLot {
    epoll: Arc<OwnedFd>,
    /// Parked sockets by connection slot, with the connection's generation.
    parked: RefCell<Vec<Option<(u32, OwnedFd)>>>,
    parked_len: Cell<usize>,
    /// Tokens the engine woke.
    woken: Queue,
    /// Tokens epoll reported ready.
    ready: Queue,
    promoter: Arc<Mutex<Option<Waker>>>,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl ParkingLot {
    /// Creates the epoll set, its watcher thread and the promoter task. The thread exits when
    /// `shutdown` is raised.
    pub fn start(
        ctx: Rc<ConnCtx>,
        shutdown: Arc<AtomicBool>,
    ) -> io::Result<(Rc<ParkingLot>, Task<()>)> {
        // SAFETY: epoll_create1 returns a new descriptor or -1.
        let epfd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `epfd` is a fresh descriptor we own.
        let epoll = Arc::new(unsafe { OwnedFd::from_raw_fd(epfd) });
        let (bell_rx, bell_tx) = std::os::unix::net::UnixStream::pair()?;
        bell_rx.set_nonblocking(true)?;
        bell_tx.set_nonblocking(true)?;
        let lot = Rc::new(ParkingLot {
            epoll: epoll.clone(),
            parked: RefCell::new(Vec::new()),
            parked_len: Cell::new(0),
            woken: Arc::new(Mutex::new(Vec::new())),
            ready: Arc::new(Mutex::new(Vec::new())),
            promoter: Arc::new(Mutex::new(None)),
        });
        WAKE_TARGET.with(|t| *t.borrow_mut() = Some((lot.woken.clone(), lot.promoter.clone())));
        let ready = lot.ready.clone();
        std::thread::Builder::new()
            .name(format!("shard{}-park", ctx.engine.borrow().shard()))
            .spawn(move || watch(epoll, ready, bell_tx, shutdown))?;
        // SAFETY: a connected, non-blocking socket we own and hand over.
        let bell = unsafe { UnixStream::from_raw_fd(bell_rx.into_raw_fd()) };
        let task = spawn_local(promote_loop(lot.clone(), bell, ctx));
        Ok((lot, task))
    }

    /// Parks the connection's socket (a plain TCP socket, given up by its transport). On
    /// error the connection is closed by the caller.
    pub fn park(&self, ctx: &ConnCtx, id: ConnId, fd: OwnedFd) -> io::Result<()> {
        let t = id.token();
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32,
            u64: t,
        };
        // SAFETY: valid epoll and socket descriptors; `ev` lives across the call.
        cvt(unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &mut ev,
            )
        })?;
        let (idx, gen) = (id.idx, id.gen);
        let mut parked = self.parked.borrow_mut();
        if parked.len() <= idx as usize {
            parked.resize_with(idx as usize + 1, || None);
        }
        if parked[idx as usize].replace((gen, fd)).is_none() {
            self.parked_len.set(self.parked_len.get() + 1);
        }
        drop(parked);
        ctx.engine.borrow_mut().conn_parked(id, park_waker(t));
        Ok(())
    }

    /// Sockets parked now.
    pub fn len(&self) -> usize {
        self.parked_len.get()
    }

    /// Whether no socket is parked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn promote(&self, ctx: &Rc<ConnCtx>, t: u64) {
        let id = ConnId::from_token(t);
        let (idx, gen) = (id.idx, id.gen);
        let fd = {
            let mut parked = self.parked.borrow_mut();
            let Some(slot) = parked.get_mut(idx as usize) else {
                return;
            };
            if slot.as_ref().is_none_or(|(g, _)| *g != gen) {
                return; // Already promoted (woken and ready at once).
            }
            let Some((_, fd)) = slot.take() else {
                return;
            };
            fd
        };
        self.parked_len.set(self.parked_len.get() - 1);
        // SAFETY: removing a registered descriptor; the event argument is ignored.
        unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd.as_raw_fd(),
                std::ptr::null_mut(),
            );
        }
        // Only plain TCP parks (`Transport::PARKS`).
        let transport = Tcp::from_parked(fd);
        ctx.engine.borrow_mut().conn_promoted(id, clock::now());
        spawn_local(connection::drive(ctx.clone(), transport, id)).detach();
    }
}

/// Promotes what epoll reported or the engine woke.
async fn promote_loop(lot: Rc<ParkingLot>, mut bell: UnixStream, ctx: Rc<ConnCtx>) {
    let mut scratch = [0u8; 64];
    loop {
        let bell_ok = poll_fn(|cx| {
            if let Ok(mut p) = lot.promoter.lock() {
                *p = Some(cx.waker().clone());
            }
            let woken = lot.woken.lock().map(|q| !q.is_empty()).unwrap_or(false);
            let ready = lot.ready.lock().map(|q| !q.is_empty()).unwrap_or(false);
            // Drain the doorbell; readiness of the queues decides.
            let mut rang = false;
            loop {
                match Pin::new(&mut bell).poll_read(cx, &mut scratch) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(false),
                    Poll::Ready(Ok(_)) => rang = true,
                    Poll::Pending => break,
                }
            }
            if woken || ready || rang {
                Poll::Ready(true)
            } else {
                Poll::Pending
            }
        })
        .await;
        let mut tokens = std::mem::take(&mut *lot.woken.lock().unwrap_or_else(|e| e.into_inner()));
        tokens.append(&mut lot.ready.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tokens {
            lot.promote(&ctx, t);
        }
        if !bell_ok {
            return;
        }
    }
}

/// The watcher thread: waits on the epoll set and hands ready tokens to the shard.
fn watch(
    epoll: Arc<OwnedFd>,
    ready: Queue,
    bell: std::os::unix::net::UnixStream,
    shutdown: Arc<AtomicBool>,
) {
    use std::io::Write;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let epfd: RawFd = epoll.as_raw_fd();
    let mut bell = bell;
    while !shutdown.load(Ordering::Acquire) {
        // SAFETY: `events` has room for `events.len()` entries.
        let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), events.len() as i32, 100) };
        if n <= 0 {
            continue;
        }
        if let Ok(mut q) = ready.lock() {
            q.extend(events[..n as usize].iter().map(|e| e.u64));
        }
        // A full socketpair buffer means the shard is already being rung.
        let _ = bell.write(&[1]);
    }
}

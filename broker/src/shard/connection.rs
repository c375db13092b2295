//! The driver task of one connection, over any [`Transport`]: read → feed the engine (which
//! decodes) → write the outbox → sleep until the transport or the engine wakes it.
//!
//! One hand-written future per connection does it all, so an idle connection is just that
//! future: the transport and an empty partial-frame buffer (CONNECT and keepalive deadlines
//! live in the engine's timer heap, not in per-connection timers). Reads go into the shard's
//! shared scratch buffer; only the tail of an incomplete packet is copied into the
//! connection's own buffer, which is freed once it empties. Writes send the whole outbox (many
//! deliveries, one `send`) whenever it has bytes; a flushed outbox is freed too. When the engine
//! says the connection has been idle long enough and the transport can park, the driver hands
//! the socket to the shard's [`ParkingLot`] and ends; the lot starts a new driver when the
//! socket or the engine needs one.

use super::park::ParkingLot;
use crate::core::engine::{ConnId, Engine, Input};
use crate::core::time::Timestamp;
use crate::shard::clock;
use crate::transport::Transport;
use bytes::{Buf, BytesMut};
use std::cell::RefCell;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Context, Poll};
use tracing::debug;

/// Reads handled per wake-up before yielding to the other tasks of the shard.
const READS_PER_POLL: usize = 8;

/// What every connection driver of a shard shares.
pub struct ConnCtx {
    /// The shard's engine.
    pub engine: Rc<RefCell<Engine>>,
    /// The shard's read scratch buffer.
    pub scratch: RefCell<Vec<u8>>,
    /// Where idle sockets are parked (`None` when parking is off).
    pub parking: RefCell<Option<Rc<ParkingLot>>>,
    /// What each listener admits, by listener number (shared with the other shards).
    pub gates: Vec<std::sync::Arc<super::listener::Gate>>,
}

struct Driver<T> {
    ctx: Rc<ConnCtx>,
    transport: T,
    id: ConnId,
    partial: BytesMut,
}

/// Why the driver stopped.
enum End {
    /// The engine asked to close (after flushing).
    Closed,
    /// The engine gave up flushing a closing connection: reset it.
    Reset,
    /// The peer closed or the socket failed.
    Transport,
    /// Idle: hand the socket to the parking lot.
    Park,
}

/// Runs the connection until it ends (then closes the socket and tells the engine) or until it
/// is parked.
pub async fn drive<T: Transport>(ctx: Rc<ConnCtx>, transport: T, id: ConnId) {
    let mut d = Driver {
        ctx,
        transport,
        id,
        partial: BytesMut::new(),
    };
    let end = poll_fn(|cx| d.poll(cx)).await;
    let Driver {
        ctx, transport, id, ..
    } = d;
    match end {
        End::Park => {
            let lot = ctx.parking.borrow().clone();
            // `poll` parks only transports that can; should one refuse now, it closes.
            if let (Some(lot), Ok(fd)) = (lot, transport.park()) {
                if lot.park(&ctx, id, fd).is_ok() {
                    return;
                }
            }
        }
        End::Closed => transport.close().await,
        End::Reset => transport.reset(),
        End::Transport => {}
    }
    let listener = ctx.engine.borrow_mut().conn_closed(id, clock::now());
    if let Some(g) = listener.and_then(|l| ctx.gates.get(usize::from(l))) {
        g.release();
    }
}

impl<T: Transport> Driver<T> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        for _ in 0..READS_PER_POLL {
            if let Some(end) = self.flush(cx) {
                return Poll::Ready(end);
            }
            let ctx = self.ctx.clone();
            let mut e = ctx.engine.borrow_mut();
            let Some(status) = e.conn_status(self.id) else {
                return Poll::Ready(End::Transport);
            };
            if status.close {
                // flush() found bytes it could not write yet; wait for the socket.
                e.set_conn_waker(self.id, cx.waker());
                return Poll::Pending;
            }
            let now = clock::now();
            // Whatever the engine did with the input (a CONNACK, a close), the next round looks
            // at the connection's state again before reading more.
            if status.readable && !self.partial.is_empty() && self.process(&mut e, None, now) {
                continue;
            }
            if status.readable {
                let mut scratch = ctx.scratch.borrow_mut();
                match self.transport.poll_read(cx, &mut scratch[..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(End::Transport),
                    Poll::Ready(Err(err)) => {
                        if err.kind() == std::io::ErrorKind::InvalidData {
                            // The transport refused the peer's framing (and told it so).
                            e.metrics.transport_violations += 1;
                            debug!(error = %err, "bad input on the transport, closing");
                        }
                        return Poll::Ready(End::Transport);
                    }
                    Poll::Ready(Ok(n)) => {
                        e.count_received(n);
                        e.note_io(self.id, now);
                        drop(scratch);
                        let data = ctx.scratch.borrow();
                        self.process(&mut e, Some(&data[..n]), now);
                        continue;
                    }
                    Poll::Pending => {}
                }
            }
            let idle =
                self.partial.is_empty() && e.conn_outbox(self.id).is_some_and(|o| o.is_empty());
            if status.park && idle && T::PARKS && self.ctx.parking.borrow().is_some() {
                return Poll::Ready(End::Park);
            }
            e.set_conn_waker(self.id, cx.waker());
            return Poll::Pending;
        }
        // Busy connection: let the other tasks of the shard run, then continue.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Writes as much of the outbox as the socket takes. `Some` when the connection ends.
    fn flush(&mut self, cx: &mut Context<'_>) -> Option<End> {
        let mut e = self.ctx.engine.borrow_mut();
        let empty = loop {
            let Some(out) = e.conn_outbox(self.id) else {
                return Some(End::Transport);
            };
            let mut sent = 0;
            let mut failed = false;
            let mut blocked = false;
            while !out.is_empty() {
                match self.transport.poll_write(cx, &out[..]) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        failed = true;
                        break;
                    }
                    Poll::Ready(Ok(n)) => {
                        out.advance(n);
                        sent += n;
                    }
                    Poll::Pending => {
                        blocked = true;
                        break;
                    }
                }
            }
            let mut empty = out.is_empty();
            if empty && out.capacity() > 0 {
                // An idle connection keeps no buffer; the next delivery allocates one.
                *out = BytesMut::new();
            }
            // Room in the outbox may let deliveries that waited for it in (`conn_flushed`).
            let refilled = e.conn_flushed(self.id, sent, clock::now());
            if failed {
                return Some(End::Transport);
            }
            empty &= !refilled;
            if blocked || !refilled {
                break empty;
            }
        };
        // What the transport itself still holds (a WebSocket frame or TLS record it buffered)
        // must go out before the connection counts as flushed.
        let empty = empty
            && match self.transport.poll_flush(cx) {
                Poll::Ready(Ok(())) => true,
                Poll::Ready(Err(_)) => return Some(End::Transport),
                Poll::Pending => false,
            };
        match e.conn_status(self.id) {
            None => Some(End::Transport),
            Some(s) if s.close && s.reset => Some(End::Reset),
            Some(s) if s.close && empty => Some(End::Closed),
            Some(_) => None,
        }
    }

    /// Feeds the engine the partial buffer followed by `fresh`, keeping what it leaves.
    /// Returns whether it made progress: handled a packet or met bad input (which closes the
    /// connection), so the caller must look at the connection's state again.
    fn process(&mut self, e: &mut Engine, fresh: Option<&[u8]>, now: Timestamp) -> bool {
        let id = self.id;
        feed(&mut self.partial, fresh, |data| {
            e.handle_input(id, data, now)
        })
        .progressed
    }
}

/// Offers `handle` the bytes of `partial` followed by `fresh` (or `fresh` alone, without a
/// copy, when nothing is pending) and keeps what it does not use in `partial`, which is freed
/// once it empties. Shared by the MQTT driver and the gateways' drivers.
pub fn feed(
    partial: &mut BytesMut,
    fresh: Option<&[u8]>,
    handle: impl FnOnce(&[u8]) -> Input,
) -> Input {
    let use_partial = !partial.is_empty();
    if let (true, Some(f)) = (use_partial, fresh) {
        partial.extend_from_slice(f);
    }
    let input = if use_partial {
        handle(partial)
    } else {
        handle(fresh.unwrap_or(&[]))
    };
    if use_partial {
        partial.advance(input.used);
        if partial.is_empty() {
            *partial = BytesMut::new();
        }
    } else if let Some(rest) = fresh
        .and_then(|f| f.get(input.used..))
        .filter(|r| !r.is_empty())
    {
        partial.extend_from_slice(rest);
    }
    input
}

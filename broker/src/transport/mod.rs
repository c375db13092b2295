//! The transport seam: what a connection's bytes travel over.
//!
//! The connection driver ([`crate::shard::connection`]) is written once, generic over a
//! [`Transport`]: it reads into the shard's scratch buffer, hands the bytes to the engine, and
//! writes the engine's outbox. It knows nothing of the protocol (the engine decodes) nor of
//! what carries the bytes (the transport). Plain TCP ([`tcp::Tcp`]) is the first, and further
//! transports are added beside it without touching the driver, the engine or the codecs. TLS ([`tls::Tls`]) and WebSocket ([`ws::Ws`], over either) are such
//! additions; a WSS connection is `Ws<Tls>`.
//!
//! Parking an idle connection (handing its socket to the shard's epoll set and dropping the
//! driver) is a capability: a transport that keeps no state outside the kernel socket can
//! offer it ([`Transport::park`]); one with user-space state (a TLS session, a WebSocket
//! frame in progress) keeps its driver instead.

pub mod tcp;
pub mod tls;
pub mod ws;

use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::task::{Context, Poll};

/// A byte stream under one connection, polled by its driver task.
pub trait Transport: Sized + Unpin + 'static {
    /// Whether [`Transport::park`] can succeed (the driver asks before it gives up its task).
    const PARKS: bool = false;

    /// Reads what is available into `buf`. `Ok(0)` means the peer closed.
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;

    /// Writes a prefix of `buf`; returns how many bytes it took.
    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>>;

    /// Sends what the transport itself still holds (a frame or record it buffered).
    /// `Ready(Ok)` once nothing is held; plain TCP holds nothing.
    fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Closes gracefully, after what was written (the driver has flushed the outbox).
    fn close(self) -> impl Future<Output = ()>;

    /// Drops the connection at once, discarding what is still unsent (a reset where the
    /// transport has one).
    fn reset(self);

    /// Gives up the socket for parking: its descriptor, with nothing left in user space. A
    /// transport that cannot park returns itself.
    fn park(self) -> Result<OwnedFd, Self> {
        Err(self)
    }
}

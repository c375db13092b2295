//! Plain TCP: a glommio `TcpStream`, parkable.

use super::Transport;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// MQTT over a plain TCP connection.
pub struct Tcp(TcpStream);

impl Tcp {
    /// The accepted stream.
    pub fn new(stream: TcpStream) -> Self {
        Tcp(stream)
    }

    /// The connected socket of a parked connection, back in glommio's hands.
    pub fn from_parked(fd: OwnedFd) -> Self {
        // SAFETY: a connected TCP socket we own, handed over whole.
        Tcp(unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) })
    }
}

impl Transport for Tcp {
    const PARKS: bool = true;

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    async fn close(self) {
        let _ = self.0.shutdown(Shutdown::Both).await;
    }

    fn reset(self) {
        // SO_LINGER 0: close() sends RST and drops what the kernel still holds.
        // SAFETY: the descriptor belongs to the stream, which outlives the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(self.0.as_raw_fd()) };
        let _ = socket2::SockRef::from(&fd).set_linger(Some(Duration::ZERO));
    }

    fn park(self) -> Result<OwnedFd, Self> {
        // glommio's stream owns its descriptor and closes it on drop: keep a duplicate.
        // SAFETY: dup(2) of a descriptor the stream owns; the copy is ours.
        let fd = unsafe { libc::dup(self.0.as_raw_fd()) };
        if fd < 0 {
            return Err(self);
        }
        // SAFETY: `fd` is the fresh duplicate.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}

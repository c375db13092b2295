//! Sockets for the load generator: non-blocking connects from a chosen loopback source address,
//! and read/write helpers for a connection (over any [`Stream`]) shared by a reader and a
//! writer task.

use crate::transport::Stream;
use bytes::BytesMut;
use glommio::net::TcpStream;
use glommio::sync::Semaphore;
use socket2::{Domain, Protocol, Socket, Type};
use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{FromRawFd, IntoRawFd};
use std::rc::Rc;

/// Connections per loopback source address (one ephemeral port range holds ~28,000).
pub const PER_SOURCE: usize = 20_000;

/// The source address for connection number `index` when `sources` loopback addresses are in
/// use (127.0.0.1, 127.0.0.2, …); `None` lets the kernel choose.
pub fn source_for(index: usize, sources: usize, dest: SocketAddr) -> Option<IpAddr> {
    if sources <= 1 || !dest.ip().is_loopback() || !dest.is_ipv4() {
        return None;
    }
    let n = (index % sources) as u8;
    Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + n)))
}

/// Starts a TCP connection; completion shows as the first write going through.
pub fn connect(dest: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let sock = Socket::new(Domain::for_address(dest), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    sock.set_nodelay(true)?;
    if let Some(ip) = source {
        sock.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match sock.connect(&dest.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    // SAFETY: a connected (or connecting) TCP socket we own and hand over.
    Ok(unsafe { TcpStream::from_raw_fd(sock.into_raw_fd()) })
}

/// A stream used by several tasks of one executor; writes are serialised so packets never
/// interleave.
pub struct Shared {
    stream: RefCell<Stream>,
    write_lock: Semaphore,
}

impl Shared {
    /// Wraps a stream.
    pub fn new(stream: Stream) -> Rc<Self> {
        Rc::new(Shared {
            stream: RefCell::new(stream),
            write_lock: Semaphore::new(1),
        })
    }

    /// Reads what is available (at least one byte, 0 at end of stream) into `scratch`, then
    /// appends it to `buf`.
    pub async fn read_into(
        &self,
        scratch: &RefCell<Vec<u8>>,
        buf: &mut BytesMut,
    ) -> io::Result<usize> {
        poll_fn(|cx| {
            let mut s = scratch.borrow_mut();
            let mut stream = self.stream.borrow_mut();
            match stream.poll_read(cx, &mut s[..]) {
                std::task::Poll::Ready(Ok(n)) => {
                    buf.extend_from_slice(&s[..n]);
                    std::task::Poll::Ready(Ok(n))
                }
                other => other,
            }
        })
        .await
    }

    /// Writes all of `data`.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        let _permit = self
            .write_lock
            .acquire_permit(1)
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
        while !data.is_empty() {
            let n = poll_fn(|cx| self.stream.borrow_mut().poll_write(cx, data)).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            data = &data[n..];
        }
        poll_fn(|cx| self.stream.borrow_mut().poll_flush(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_rotate_on_loopback_only() {
        let lo: SocketAddr = "127.0.0.1:1883".parse().unwrap();
        assert_eq!(source_for(0, 1, lo), None);
        assert_eq!(source_for(0, 3, lo), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(source_for(4, 3, lo), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(source_for(4, 3, "10.0.0.1:1883".parse().unwrap()), None);
    }
}

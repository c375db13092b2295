//! What the load generator's connections travel over (`--transport`): plain TCP, TLS
//! (rustls), or MQTT over WebSocket (tungstenite) on either, so that any broker can be driven
//! over the transport it is being compared on.
//!
//! Everything is polled from glommio tasks: TLS runs rustls over the socket through an adapter
//! that turns a pending poll into `WouldBlock`; the WebSocket upgrade runs tungstenite over an
//! in-memory byte queue in each direction ([`Queues`]), and [`Ws`] then frames the traffic
//! with tungstenite's header codec. Each MQTT write becomes one binary frame.

use bytes::{Buf, BytesMut};
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore};
use std::cell::RefCell;
use std::future::poll_fn;
use std::io::{self, Read, Write};
use std::path::Path;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::WebSocketConfig;

/// `--transport`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// MQTT over plain TCP.
    #[default]
    Tcp,
    /// MQTT over TLS.
    Tls,
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

/// How to set up each connection.
#[derive(Debug, Clone, Default)]
pub struct ClientTransport {
    /// Which transport.
    pub kind: Kind,
    tls: Option<Arc<ClientConfig>>,
    server_name: Option<ServerName<'static>>,
    /// The WebSocket request path.
    ws_path: String,
}

impl ClientTransport {
    /// A transport of `kind`. TLS trusts the PEM certificates of `cafile` and checks that the
    /// broker's certificate is for `server_name`.
    pub fn new(
        kind: Kind,
        cafile: Option<&Path>,
        server_name: &str,
        ws_path: &str,
    ) -> Result<ClientTransport, String> {
        let mut t = ClientTransport {
            kind,
            ws_path: ws_path.to_string(),
            ..ClientTransport::default()
        };
        if matches!(kind, Kind::Tls | Kind::Wss) {
            let cafile = cafile.ok_or("--transport tls/wss needs --cafile")?;
            let mut roots = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(cafile)
                .map_err(|e| format!("{}: {e}", cafile.display()))?;
            for c in certs {
                let c = c.map_err(|e| format!("{}: {e}", cafile.display()))?;
                roots
                    .add(c)
                    .map_err(|e| format!("{}: {e}", cafile.display()))?;
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            t.tls = Some(Arc::new(config));
            t.server_name = Some(
                ServerName::try_from(server_name.to_string())
                    .map_err(|e| format!("--tls-name {server_name:?}: {e}"))?,
            );
        }
        if matches!(kind, Kind::Ws | Kind::Wss) && !ws_path.starts_with('/') {
            return Err(format!("--ws-path {ws_path:?} must start with /"));
        }
        Ok(t)
    }
}

/// A stream the load generator reads and writes.
pub(crate) trait Io {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;
    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>>;
    /// Sends what the stream holds of earlier writes.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl Io for TcpStream {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        AsyncRead::poll_read(Pin::new(self), cx, buf)
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(self), cx, buf)
    }

    fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The socket as rustls' blocking `Read + Write`.
struct Blocking<'a, 'b>(&'a mut TcpStream, &'a mut Context<'b>);

fn pending_as_would_block<T>(p: Poll<io::Result<T>>) -> io::Result<T> {
    match p {
        Poll::Ready(r) => r,
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

impl Read for Blocking<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        pending_as_would_block(Io::poll_read(self.0, self.1, buf))
    }
}

impl Write for Blocking<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        pending_as_would_block(Io::poll_write(self.0, self.1, buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn would_block_as_pending<T>(r: io::Result<T>) -> Poll<io::Result<T>> {
    match r {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
        other => Poll::Ready(other),
    }
}

/// A TLS client session over TCP.
pub struct Tls {
    tcp: TcpStream,
    conn: ClientConnection,
}

impl Io for Tls {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            match self.conn.reader().read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return Poll::Ready(other),
            }
            let n = match would_block_as_pending(
                self.conn.read_tls(&mut Blocking(&mut self.tcp, cx)),
            ) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Ok(n)) => n,
                other => return other,
            };
            debug_assert!(n > 0);
            self.conn
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Err(e)) = self.poll_flush(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(self.conn.writer().write(buf))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.conn.wants_write() {
            match would_block_as_pending(self.conn.write_tls(&mut Blocking(&mut self.tcp, cx))) {
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The two byte queues tungstenite works on: what arrived (it reads) and what it wrote (to
/// be sent). Shared, so that the bytes it writes during the handshake can be sent before it
/// hands the stream back.
#[derive(Clone, Default)]
struct Queues {
    arrived: Rc<RefCell<BytesMut>>,
    to_send: Rc<RefCell<BytesMut>>,
}

impl Read for Queues {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut q = self.arrived.borrow_mut();
        if q.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = q.len().min(buf.len());
        q.copy_to_slice(&mut buf[..n]);
        Ok(n)
    }
}

impl Write for Queues {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.to_send.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Queues {
    /// Moves what waits to be sent into `inner`; `Ready(Ok)` once it all went.
    fn poll_send(&self, inner: &mut impl Io, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut q = self.to_send.borrow_mut();
        while !q.is_empty() {
            match inner.poll_write(cx, &q) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => q.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        inner.poll_flush(cx)
    }

    /// Reads from `inner` into the arrived queue; `Ok(0)` at end of stream.
    fn poll_receive(&self, inner: &mut impl Io, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut chunk = [0u8; 16 << 10];
        let r = inner.poll_read(cx, &mut chunk);
        if let Poll::Ready(Ok(n)) = r {
            self.arrived.borrow_mut().extend_from_slice(&chunk[..n]);
        }
        r
    }
}

/// MQTT over WebSocket over `S`, after the upgrade. tungstenite does the upgrade; the frames
/// are then read and written here with its header codec (`FrameHeader`), which keeps the
/// load generator's cost per message small: it shares the machine with the broker it
/// measures, and a dearer client would slow a multi-core broker down more than a
/// single-threaded one.
pub struct Ws<S> {
    inner: S,
    /// Bytes from the broker not yet taken apart.
    arrived: BytesMut,
    /// Payload bytes of the current data frame not yet handed out.
    remaining: u64,
    /// Frames to send (header, masked payload) the stream below has not taken.
    to_send: BytesMut,
    /// State of the masking-key generator (xorshift32; client frames must be masked).
    mask_state: u32,
}

impl<S: Io> Ws<S> {
    fn next_mask(&mut self) -> [u8; 4] {
        let mut x = self.mask_state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.mask_state = x;
        x.to_ne_bytes()
    }

    /// Appends one masked frame.
    fn queue_frame(&mut self, opcode: OpCode, payload: &[u8]) -> io::Result<()> {
        let mask = self.next_mask();
        let header = FrameHeader {
            opcode,
            mask: Some(mask),
            ..FrameHeader::default()
        };
        let mut head = Vec::with_capacity(14);
        header
            .format(payload.len() as u64, &mut head)
            .map_err(io::Error::other)?;
        self.to_send.extend_from_slice(&head);
        self.to_send
            .extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        Ok(())
    }

    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.to_send.is_empty() {
            match self.inner.poll_write(cx, &self.to_send) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.to_send.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.inner.poll_flush(cx)
    }

    /// Takes the next frame header off `arrived` (a control frame only once its payload is
    /// there too, and then handles it). `Ok(false)`: more bytes are needed; an `Err` of kind
    /// `ConnectionAborted`: the broker closed the WebSocket.
    fn next_frame(&mut self) -> io::Result<bool> {
        let mut cursor = std::io::Cursor::new(&self.arrived[..]);
        let Some((header, len)) = FrameHeader::parse(&mut cursor).map_err(io::Error::other)? else {
            return Ok(false);
        };
        let head = cursor.position() as usize;
        match header.opcode {
            OpCode::Data(Data::Binary | Data::Continue) => {
                self.arrived.advance(head);
                self.remaining = len;
            }
            OpCode::Control(control) => {
                let total = head + len as usize;
                if self.arrived.len() < total {
                    return Ok(false);
                }
                let payload = self.arrived.split_to(total).split_off(head);
                match control {
                    Control::Close => return Err(io::ErrorKind::ConnectionAborted.into()),
                    Control::Ping => self.queue_frame(OpCode::Control(Control::Pong), &payload)?,
                    _ => {}
                }
            }
            other => return Err(io::Error::other(format!("unexpected frame {other}"))),
        }
        Ok(true)
    }
}

impl<S: Io> Io for Ws<S> {
    /// Hands out as much payload as `buf` holds and has arrived, reading the stream below
    /// only when nothing has.
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut filled = 0;
        loop {
            if self.remaining > 0 && !self.arrived.is_empty() {
                let n = (self.remaining.min(self.arrived.len() as u64) as usize)
                    .min(buf.len() - filled);
                self.arrived.copy_to_slice(&mut buf[filled..filled + n]);
                self.remaining -= n as u64;
                filled += n;
                if filled == buf.len() {
                    return Poll::Ready(Ok(filled));
                }
                continue;
            }
            if self.remaining == 0 {
                match self.next_frame() {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(_) if filled > 0 => return Poll::Ready(Ok(filled)),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {
                        return Poll::Ready(Ok(0))
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if filled > 0 {
                return Poll::Ready(Ok(filled));
            }
            if !self.to_send.is_empty() {
                // A pong to send.
                if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            let mut chunk = [0u8; 16 << 10];
            match self.inner.poll_read(cx, &mut chunk) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Ok(n)) => self.arrived.extend_from_slice(&chunk[..n]),
                other => return other,
            }
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Err(e)) = self.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        self.queue_frame(OpCode::Data(Data::Binary), buf)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_send(cx)
    }
}

/// A connection as the load generator uses it.
pub enum Stream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS.
    Tls(Box<Tls>),
    /// WebSocket.
    Ws(Box<Ws<TcpStream>>),
    /// WebSocket over TLS.
    Wss(Box<Ws<Tls>>),
}

impl Stream {
    /// The TCP connection under it all.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Tcp(s) => s,
            Stream::Tls(s) => &s.tcp,
            Stream::Ws(s) => &s.inner,
            Stream::Wss(s) => &s.inner.tcp,
        }
    }

    /// Reads what is available; `Ok(0)` at end of stream.
    pub fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self {
            Stream::Tcp(s) => s.poll_read(cx, buf),
            Stream::Tls(s) => s.poll_read(cx, buf),
            Stream::Ws(s) => s.poll_read(cx, buf),
            Stream::Wss(s) => s.poll_read(cx, buf),
        }
    }

    /// Takes a prefix of `buf` (TLS and WebSocket may hold it until [`Stream::poll_flush`]).
    pub fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self {
            Stream::Tcp(s) => Io::poll_write(s, cx, buf),
            Stream::Tls(s) => s.poll_write(cx, buf),
            Stream::Ws(s) => s.poll_write(cx, buf),
            Stream::Wss(s) => s.poll_write(cx, buf),
        }
    }

    /// Sends whatever earlier writes left held.
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(_) => Poll::Ready(Ok(())),
            Stream::Tls(s) => s.poll_flush(cx),
            Stream::Ws(s) => s.poll_flush(cx),
            Stream::Wss(s) => s.poll_flush(cx),
        }
    }
}

/// Runs the TLS handshake.
async fn tls(tcp: TcpStream, t: &ClientTransport) -> io::Result<Tls> {
    let (Some(config), Some(name)) = (&t.tls, &t.server_name) else {
        return Err(io::Error::other("no TLS configuration"));
    };
    let conn = ClientConnection::new(config.clone(), name.clone()).map_err(io::Error::other)?;
    let mut s = Tls { tcp, conn };
    poll_fn(|cx| loop {
        match s.poll_flush(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        if !s.conn.is_handshaking() {
            return Poll::Ready(Ok(()));
        }
        match would_block_as_pending(s.conn.read_tls(&mut Blocking(&mut s.tcp, cx))) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
            Poll::Ready(Ok(_)) => {
                if let Err(e) = s.conn.process_new_packets() {
                    let _ = s.poll_flush(cx);
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                }
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await?;
    Ok(s)
}

/// Runs the WebSocket upgrade over `inner`, offering the `mqtt` subprotocol.
async fn websocket<S: Io>(mut inner: S, t: &ClientTransport) -> io::Result<Ws<S>> {
    let mut req = format!("ws://localhost{}", t.ws_path)
        .into_client_request()
        .map_err(io::Error::other)?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "mqtt".parse().expect("a header value"),
    );
    let queues = Queues::default();
    let config = WebSocketConfig::default().write_buffer_size(0);
    let mut mid = match ClientHandshake::start(queues.clone(), req, Some(config))
        .map_err(io::Error::other)?
        .handshake()
    {
        Ok(_) => return Err(io::Error::other("upgrade answered before the request went")),
        Err(HandshakeError::Interrupted(mid)) => mid,
        Err(HandshakeError::Failure(e)) => return Err(io::Error::other(e)),
    };
    loop {
        poll_fn(|cx| queues.poll_send(&mut inner, cx)).await?;
        if poll_fn(|cx| queues.poll_receive(&mut inner, cx)).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        match mid.handshake() {
            // The broker sends nothing before the client's CONNECT, so tungstenite holds no
            // frame bytes past its response.
            Ok((_ws, _response)) => {
                let seed = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.subsec_nanos())
                    | 1;
                return Ok(Ws {
                    inner,
                    arrived: BytesMut::new(),
                    remaining: 0,
                    to_send: BytesMut::new(),
                    mask_state: seed,
                });
            }
            Err(HandshakeError::Interrupted(m)) => mid = m,
            Err(HandshakeError::Failure(e)) => return Err(io::Error::other(e)),
        }
    }
}

/// Sets up the transport over a TCP connection (whose connect may still be under way).
pub async fn establish(tcp: TcpStream, t: &ClientTransport) -> io::Result<Stream> {
    Ok(match t.kind {
        Kind::Tcp => Stream::Tcp(tcp),
        Kind::Tls => Stream::Tls(Box::new(tls(tcp, t).await?)),
        Kind::Ws => Stream::Ws(Box::new(websocket(tcp, t).await?)),
        Kind::Wss => Stream::Wss(Box::new(websocket(tls(tcp, t).await?, t).await?)),
    })
}

//! MQTT over WebSocket: binary frames framed by tungstenite, over another transport: plain
//! TCP ([`Tcp`], the `ws` listeners) or TLS (the `wss` listeners).
//!
//! tungstenite works on blocking `Read + Write` streams; here it runs sans-IO over two
//! in-memory buffers ([`Pipe`]): bytes read from the socket are appended to `input`, and what it
//! writes lands in `output`, which the transport sends when the socket takes it. A read that
//! finds `input` empty answers `WouldBlock`, and the transport then polls the socket.
//!
//! MQTT packets travel in binary frames; one frame may carry several packets and a packet may
//! span frames (the driver's partial-packet buffer joins them). A text frame closes the
//! connection with 1003. Pings are answered; a close frame is answered and ends the
//! connection. Parking is not offered: the framing state lives in user space.

use super::tcp::Tcp;
use super::Transport;
use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::rc::Rc;
use std::task::{Context, Poll};
use tungstenite::handshake::server::{ErrorResponse, Request, Response, ServerHandshake};
use tungstenite::handshake::HandshakeError;
use tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tungstenite::{Error as WsError, Message, WebSocket};

/// The largest binary frame written at once: a larger outbox goes out as several frames, so
/// the copy a frame needs stays small.
const MAX_OUT_FRAME: usize = 64 << 10;

/// What the WebSocket handshake checks (from `listener.ws.<name>.*`).
#[derive(Debug, Clone)]
pub struct WsSettings {
    /// The request path that upgrades (others get 404).
    pub path: String,
    /// Accepted `Sec-WebSocket-Protocol` values, in order of preference.
    pub subprotocols: Vec<String>,
    /// Refuse (400) a client that offers none of them, or none at all.
    pub fail_if_no_subprotocol: bool,
    /// Largest frame and message accepted.
    pub max_frame_size: usize,
    /// How long the HTTP upgrade may take.
    pub handshake_timeout: std::time::Duration,
}

/// The in-memory stream tungstenite reads and writes. The output is shared, so that what a
/// refused handshake wrote (a 400 or 404 response) can still be sent after tungstenite has
/// dropped the stream.
#[derive(Debug, Default)]
pub struct Pipe {
    input: Vec<u8>,
    read_at: usize,
    output: Rc<RefCell<Vec<u8>>>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = &self.input[self.read_at..];
        if avail.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.read_at += n;
        if self.read_at == self.input.len() {
            self.input = Vec::new();
            self.read_at = 0;
        }
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The tungstenite configuration for `settings`: frames and messages capped at the packet
/// size limit, small buffers.
fn ws_config(settings: &WsSettings) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(usize::MAX)
        .max_frame_size(Some(settings.max_frame_size))
        .max_message_size(Some(settings.max_frame_size))
}

/// Checks the upgrade request: the path, then the subprotocols offered against the accepted
/// ones (the first accepted one offered is echoed). The error type is tungstenite's.
#[allow(clippy::result_large_err)]
fn check_request(
    settings: &WsSettings,
    request: &Request,
    mut response: Response,
) -> Result<Response, ErrorResponse> {
    let refuse = |status: u16, why: &str| -> ErrorResponse {
        let mut r = ErrorResponse::new(Some(why.to_string()));
        *r.status_mut() = tungstenite::http::StatusCode::from_u16(status)
            .unwrap_or(tungstenite::http::StatusCode::BAD_REQUEST);
        r
    };
    if request.uri().path() != settings.path {
        return Err(refuse(404, "no WebSocket endpoint at this path"));
    }
    let offered: Vec<String> = request
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_ascii_lowercase())
        .filter(|p| !p.is_empty())
        .collect();
    let chosen = offered.iter().find(|p| {
        settings
            .subprotocols
            .iter()
            .any(|a| a.eq_ignore_ascii_case(p))
    });
    match chosen {
        Some(p) => {
            if let Ok(v) = p.parse() {
                response.headers_mut().insert("sec-websocket-protocol", v);
            }
            Ok(response)
        }
        None if settings.fail_if_no_subprotocol => {
            Err(refuse(400, "no supported WebSocket subprotocol offered"))
        }
        None => Ok(response),
    }
}

/// MQTT over WebSocket, over `S`.
pub struct Ws<S = Tcp> {
    inner: S,
    ws: WebSocket<Pipe>,
    /// What tungstenite wrote and the socket has not taken yet (shared with the pipe).
    output: Rc<RefCell<Vec<u8>>>,
    /// What is left of the binary message being handed to the driver (no copy of it).
    pending: bytes::Bytes,
    /// How the stream ended, found while data read before it was still to be handed out.
    deferred: Option<io::Result<usize>>,
}

/// Sends what `output` holds, and what the inner transport holds of it; `Ready(Ok)` once
/// both are empty.
fn poll_send<S: Transport>(
    inner: &mut S,
    output: &RefCell<Vec<u8>>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    let mut output = output.borrow_mut();
    while !output.is_empty() {
        match inner.poll_write(cx, &output) {
            Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Poll::Ready(Ok(n)) => {
                output.drain(..n);
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
    }
    *output = Vec::new();
    inner.poll_flush(cx)
}

/// Reads what the inner transport has into `pipe`; `Ok(0)` when the peer closed.
fn poll_fill<S: Transport>(
    inner: &mut S,
    pipe: &mut Pipe,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let mut buf = [0u8; 4096];
    match inner.poll_read(cx, &mut buf) {
        Poll::Ready(Ok(n)) => {
            pipe.input.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        other => other,
    }
}

fn ws_error(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

impl<S: Transport> Ws<S> {
    /// Runs the HTTP upgrade over an accepted connection. `Err` when the client goes away or
    /// is refused (the refusal, 400 or 404, is sent first); the caller bounds the time it
    /// takes.
    #[allow(clippy::result_large_err)] // the callback's type is tungstenite's
    pub async fn accept(mut inner: S, settings: &WsSettings) -> io::Result<Ws<S>> {
        let config = ws_config(settings);
        let output = Rc::new(RefCell::new(Vec::new()));
        let pipe = Pipe {
            output: output.clone(),
            ..Pipe::default()
        };
        let callback = |req: &Request, resp: Response| check_request(settings, req, resp);
        let mut mid = match ServerHandshake::start(pipe, callback, Some(config)).handshake() {
            Ok(_) => return Err(io::ErrorKind::InvalidData.into()),
            Err(HandshakeError::Interrupted(mid)) => mid,
            Err(HandshakeError::Failure(e)) => return Err(ws_error(e)),
        };
        loop {
            let pipe = mid.get_mut().get_mut();
            let n = std::future::poll_fn(|cx| poll_fill(&mut inner, pipe, cx)).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let result = mid.handshake();
            // The response (101, or a refusal) goes out whatever came of it.
            std::future::poll_fn(|cx| poll_send(&mut inner, &output, cx)).await?;
            match result {
                Ok(ws) => {
                    return Ok(Ws {
                        inner,
                        ws,
                        output,
                        pending: bytes::Bytes::new(),
                        deferred: None,
                    });
                }
                Err(HandshakeError::Interrupted(m)) => mid = m,
                Err(HandshakeError::Failure(e)) => {
                    inner.close().await;
                    return Err(ws_error(e));
                }
            }
        }
    }

    /// Queues a close frame with `code` (best effort).
    fn close_with(&mut self, code: CloseCode, reason: &str) {
        let _ = self.ws.close(Some(CloseFrame {
            code,
            reason: reason.to_string().into(),
        }));
    }
}

impl<S: Transport> Transport for Ws<S> {
    /// Hands out the payloads of as many binary frames as `buf` holds and tungstenite has
    /// already read (one packet per frame is the rule for MQTT clients: one frame per call
    /// would feed the engine a packet at a time), touching the socket only when it has none.
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if let Some(r) = self.deferred.take() {
            return Poll::Ready(r);
        }
        let mut filled = 0;
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.len() - filled);
                buf[filled..filled + n].copy_from_slice(&self.pending[..n]);
                bytes::Buf::advance(&mut self.pending, n);
                filled += n;
                if filled == buf.len() {
                    return Poll::Ready(Ok(filled));
                }
                continue;
            }
            let end = match self.ws.read() {
                Ok(Message::Binary(data)) => {
                    self.pending = data;
                    continue;
                }
                Err(WsError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    if filled > 0 {
                        return Poll::Ready(Ok(filled));
                    }
                    match poll_fill(&mut self.inner, self.ws.get_mut(), cx) {
                        Poll::Ready(Ok(0)) => Ok(0),
                        Poll::Ready(Ok(_)) => continue,
                        Poll::Ready(Err(e)) => Err(e),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                // Pings are answered by tungstenite (the pong goes out with the next send).
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {
                    let _ = self.ws.flush();
                    match poll_send(&mut self.inner, &self.output, cx) {
                        Poll::Ready(Err(e)) => Err(e),
                        _ => continue,
                    }
                }
                Ok(Message::Text(_)) => {
                    self.close_with(CloseCode::Unsupported, "MQTT needs binary frames");
                    let _ = poll_send(&mut self.inner, &self.output, cx);
                    Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text frame on an MQTT WebSocket",
                    ))
                }
                Ok(Message::Close(_)) => {
                    let _ = self.ws.flush();
                    let _ = poll_send(&mut self.inner, &self.output, cx);
                    Ok(0)
                }
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Ok(0),
                Err(e) => {
                    if matches!(e, WsError::Capacity(_)) {
                        self.close_with(CloseCode::Size, "frame too large");
                    } else {
                        self.close_with(CloseCode::Protocol, "bad WebSocket frame");
                    }
                    let _ = poll_send(&mut self.inner, &self.output, cx);
                    Err(ws_error(e))
                }
            };
            // The end of the stream: what came before it goes first.
            if filled > 0 {
                self.deferred = Some(end);
                return Poll::Ready(Ok(filled));
            }
            return Poll::Ready(end);
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        // What an earlier frame left unsent goes first; no new frame while it waits.
        match poll_send(&mut self.inner, &self.output, cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        // The frame goes straight into the shared output, not through tungstenite's write
        // buffer, which would keep the capacity of the largest frame ever sent for the
        // connection's whole life. Frames from the server are not masked.
        let n = buf.len().min(MAX_OUT_FRAME);
        let header = FrameHeader {
            opcode: OpCode::Data(Data::Binary),
            ..FrameHeader::default()
        };
        {
            let mut out = self.output.borrow_mut();
            if let Err(e) = header.format(n as u64, &mut *out) {
                return Poll::Ready(Err(ws_error(e)));
            }
            out.extend_from_slice(&buf[..n]);
        }
        // The frame is ours now; it goes out here or on the next write or flush.
        if let Poll::Ready(Err(e)) = poll_send(&mut self.inner, &self.output, cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        poll_send(&mut self.inner, &self.output, cx)
    }

    async fn close(mut self) {
        self.close_with(CloseCode::Normal, "");
        let _ = std::future::poll_fn(|cx| poll_send(&mut self.inner, &self.output, cx)).await;
        self.inner.close().await;
    }

    fn reset(self) {
        self.inner.reset();
    }
}

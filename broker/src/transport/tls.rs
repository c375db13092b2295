//! MQTT over TLS: a rustls server session over a glommio `TcpStream`.
//!
//! rustls runs over the socket through a small adapter ([`Io`]) that turns a pending poll into
//! `WouldBlock`, so it reads records straight from the socket into its own buffer and writes
//! its records straight out; the transport adds no buffer of its own. Handshake failures
//! (a client certificate from another CA, no certificate where one is required, a protocol
//! version that is not enabled) are answered with rustls' alert and end the connection.
//! Parking is not offered: the session's keys live in user space.
//!
//! The settings ([`TlsSettings`]) are built once from the listener's configuration, at start,
//! and shared by the shards: certificate files that cannot be read or do not match are a
//! start error naming the key and the file.

use super::Transport;
use crate::config::{PeerCertAsUsername, TlsOptions, TlsVerify};
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// A TLS listener's settings, ready for its shards.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// The rustls configuration: certificate chain, key, versions, client verification.
    pub config: Arc<ServerConfig>,
    /// How long the handshake may take.
    pub handshake_timeout: Duration,
    /// Which part of a verified client certificate becomes the username, if any.
    pub peer_cert_as_username: Option<PeerCertAsUsername>,
}

impl TlsSettings {
    /// Builds the settings of the listener `key` (`listener.ssl.external`, …): reads the
    /// certificate, key and CA files. The error names the key and the file.
    pub fn load(key: &str, opts: &TlsOptions) -> Result<TlsSettings, String> {
        let certfile = opts
            .certfile
            .as_deref()
            .ok_or_else(|| format!("`{key}.certfile` is not set"))?;
        let keyfile = opts
            .keyfile
            .as_deref()
            .ok_or_else(|| format!("`{key}.keyfile` must be set with `{key}.certfile`"))?;
        let read = |k: &str, path: &Path| {
            std::fs::read(path)
                .map_err(|e| format!("`{key}.{k}`: cannot read {}: {e}", path.display()))
        };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read("certfile", certfile)?)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("`{key}.certfile`: {}: {e}", certfile.display()))?;
        if chain.is_empty() {
            return Err(format!(
                "`{key}.certfile`: {} holds no PEM certificate",
                certfile.display()
            ));
        }
        let private = PrivateKeyDer::from_pem_slice(&read("keyfile", keyfile)?)
            .map_err(|e| format!("`{key}.keyfile`: {}: {e}", keyfile.display()))?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut versions: Vec<&'static rustls::SupportedProtocolVersion> = Vec::new();
        for v in &opts.versions {
            versions.push(match v.as_str() {
                "tlsv1.2" => &rustls::version::TLS12,
                "tlsv1.3" => &rustls::version::TLS13,
                other => {
                    return Err(format!(
                        "`{key}.versions`: {other:?} is not supported (tlsv1.2, tlsv1.3)"
                    ))
                }
            });
        }
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)
            .map_err(|e| format!("`{key}.versions`: {e}"))?;
        let builder = match opts.verify {
            TlsVerify::VerifyNone => builder.with_no_client_auth(),
            TlsVerify::VerifyPeer => {
                let cafile = opts.cacertfile.as_deref().ok_or_else(|| {
                    format!("`{key}.verify = \"verify_peer\"` needs `{key}.cacertfile`")
                })?;
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&read("cacertfile", cafile)?) {
                    let cert =
                        cert.map_err(|e| format!("`{key}.cacertfile`: {}: {e}", cafile.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("`{key}.cacertfile`: {}: {e}", cafile.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!(
                        "`{key}.cacertfile`: {} holds no PEM certificate",
                        cafile.display()
                    ));
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = if opts.fail_if_no_peer_cert {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                let verifier = verifier
                    .build()
                    .map_err(|e| format!("`{key}.cacertfile`: {e}"))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, private)
            .map_err(|e| format!("`{key}.keyfile` does not fit `{key}.certfile`: {e}"))?;
        // Clients of a broker reconnect, sometimes all at once: let them resume with
        // stateless tickets (no server-side cache shared by the shards, none growing with the
        // number of clients). One TLS 1.3 ticket per handshake is enough for one reconnect.
        config.ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| format!("`{key}`: cannot set up session tickets: {e}"))?;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 1;
        Ok(TlsSettings {
            config: Arc::new(config),
            handshake_timeout: opts.handshake_timeout.0,
            peer_cert_as_username: opts.peer_cert_as_username,
        })
    }
}

/// The socket as the blocking `Read + Write` rustls expects: a pending poll is `WouldBlock`
/// (and has registered the task's waker).
struct Io<'a, 'b> {
    tcp: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl Read for Io<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.tcp).poll_read(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for Io<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.tcp).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// MQTT over TLS.
pub struct Tls {
    tcp: TcpStream,
    conn: ServerConnection,
}

/// Writes the records rustls holds; `Ready(Ok)` once none is left.
fn poll_send(
    tcp: &mut TcpStream,
    conn: &mut ServerConnection,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    while conn.wants_write() {
        match conn.write_tls(&mut Io { tcp, cx }) {
            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
    Poll::Ready(Ok(()))
}

/// Reads records from the socket and processes them. `Ok(0)` when the peer closed the socket.
/// A record rustls refuses queues its alert (sent best effort) and is `InvalidData`.
fn poll_receive(
    tcp: &mut TcpStream,
    conn: &mut ServerConnection,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    let n = match conn.read_tls(&mut Io { tcp, cx }) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
        Err(e) => return Poll::Ready(Err(e)),
    };
    if n > 0 {
        if let Err(e) = conn.process_new_packets() {
            let _ = poll_send(tcp, conn, cx);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
        }
    }
    Poll::Ready(Ok(n))
}

impl Tls {
    /// Runs the server handshake on an accepted stream. `Err` when the client goes away or
    /// the handshake fails (the alert is sent first); the caller bounds the time it takes.
    pub async fn accept(mut tcp: TcpStream, settings: &TlsSettings) -> io::Result<Tls> {
        let mut conn = ServerConnection::new(settings.config.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let done = std::future::poll_fn(|cx| loop {
            match poll_send(&mut tcp, &mut conn, cx) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            if !conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            match poll_receive(&mut tcp, &mut conn, cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        })
        .await;
        if let Err(e) = done {
            let _ = tcp.shutdown(Shutdown::Both).await;
            return Err(e);
        }
        Ok(Tls { tcp, conn })
    }

    /// The username a verified client certificate gives, as `peer_cert_as_username` asks:
    /// its subject's common name (`cn`) or whole distinguished name (`dn`).
    pub fn peer_username(&self, which: PeerCertAsUsername) -> Option<String> {
        let cert = self.conn.peer_certificates()?.first()?;
        peer_name(cert, which)
    }
}

/// The subject name of a DER certificate: its CN, or its DN as RFC 4514 writes it.
pub fn peer_name(cert: &[u8], which: PeerCertAsUsername) -> Option<String> {
    use x509_cert::der::{oid::db::rfc4519::CN, Decode};
    let cert = x509_cert::Certificate::from_der(cert).ok()?;
    let subject = &cert.tbs_certificate.subject;
    match which {
        PeerCertAsUsername::Dn => Some(subject.to_string()),
        PeerCertAsUsername::Cn => subject
            .0
            .iter()
            .flat_map(|rdn| rdn.0.iter())
            .find(|atv| atv.oid == CN)
            .and_then(|atv| std::str::from_utf8(atv.value.value()).ok())
            .map(str::to_string),
    }
}

impl Transport for Tls {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        loop {
            match self.conn.reader().read(buf) {
                // 0: the peer sent close_notify.
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            match poll_receive(&mut self.tcp, &mut self.conn, cx) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(0)),
                Poll::Ready(Ok(_)) => {}
                other => return other,
            }
            // Processing may have queued records of its own (a key update's answer).
            if let Poll::Ready(Err(e)) = poll_send(&mut self.tcp, &mut self.conn, cx) {
                return Poll::Ready(Err(e));
            }
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        // Records an earlier write left unsent go first; no new ones while they wait.
        match poll_send(&mut self.tcp, &mut self.conn, cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        let n = self.conn.writer().write(buf)?;
        // The records are ours now; they go out here or on the next write or flush.
        if let Poll::Ready(Err(e)) = poll_send(&mut self.tcp, &mut self.conn, cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        poll_send(&mut self.tcp, &mut self.conn, cx)
    }

    async fn close(mut self) {
        self.conn.send_close_notify();
        let _ = std::future::poll_fn(|cx| poll_send(&mut self.tcp, &mut self.conn, cx)).await;
        let _ = self.tcp.shutdown(Shutdown::Both).await;
    }

    fn reset(self) {
        super::tcp::Tcp::new(self.tcp).reset();
    }
}

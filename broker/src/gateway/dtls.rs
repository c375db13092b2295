//! DTLS 1.2 for a datagram gateway (LwM2M's CoAP over DTLS), on dimpl: a sans-IO DTLS
//! implementation (its RustCrypto provider; no cryptography of our own). One session per peer
//! address, created by a ClientHello; what the gateway sends a peer is encrypted in its
//! session, what the peer sends is decrypted and handed on with the identity it proved (its
//! PSK identity).
//!
//! Modes: PSK (`lwm2m.psk_file`: `identity:hexkey` lines) with TLS_PSK_WITH_AES_128_CCM_8, and
//! certificates (`lwm2m.certfile`/`keyfile`, ECDSA P-256 or P-384) with
//! TLS_ECDHE_ECDSA_WITH_AES_{128,256}_GCM and CHACHA20_POLY1305; with both, the client's
//! offer decides per session. Sessions are bounded; when full, the quietest is evicted for a
//! new handshake.

use dimpl::crypto::Dtls12CipherSuite;
use dimpl::{Config, Dtls, DtlsCertificate, Output, PskResolver};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::debug;

/// What the PSK resolver last looked up (the handshake being processed: one at a time on a
/// shard), so that the session can name its peer's identity.
#[derive(Default)]
struct PskTable {
    keys: HashMap<Vec<u8>, Vec<u8>>,
    last: Mutex<Option<Vec<u8>>>,
}

impl PskResolver for PskTable {
    fn resolve(&self, identity: &[u8]) -> Option<Vec<u8>> {
        let key = self.keys.get(identity).cloned();
        if key.is_some() {
            *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(identity.to_vec());
        }
        key
    }
}

/// The DTLS settings of a gateway.
#[derive(Clone)]
pub struct DtlsSettings {
    config: Arc<Config>,
    /// The certificate, in certificate mode.
    cert: Option<DtlsCertificate>,
    psk: Option<Arc<PskTable>>,
    max_sessions: usize,
}

/// The PSK suite (the LwM2M specification's mandatory one).
const PSK_SUITES: [Dtls12CipherSuite; 1] = [Dtls12CipherSuite::PSK_AES128_CCM_8];
/// The certificate suites (ECDSA keys).
const CERT_SUITES: [Dtls12CipherSuite; 3] = [
    Dtls12CipherSuite::ECDHE_ECDSA_AES128_GCM_SHA256,
    Dtls12CipherSuite::ECDHE_ECDSA_AES256_GCM_SHA384,
    Dtls12CipherSuite::ECDHE_ECDSA_CHACHA20_POLY1305_SHA256,
];

/// Reads a PSK file: `identity:hexkey` per line, `#` comments and blank lines skipped.
pub fn read_psk_file(path: &Path) -> Result<HashMap<Vec<u8>, Vec<u8>>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut keys = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| format!("{}:{}: {why}", path.display(), n + 1);
        let (id, key) = line
            .rsplit_once(':')
            .ok_or_else(|| bad("not identity:hexkey"))?;
        let key = shardmq_protocol::lwm2m::from_hex(key.trim())
            .filter(|k| !k.is_empty())
            .ok_or_else(|| bad("the key is not hexadecimal"))?;
        if id.is_empty() {
            return Err(bad("empty identity"));
        }
        keys.insert(id.as_bytes().to_vec(), key);
    }
    if keys.is_empty() {
        return Err(format!("{}: no identity:hexkey line", path.display()));
    }
    Ok(keys)
}

impl DtlsSettings {
    /// Settings from a certificate and key (PEM; ECDSA) and/or a PSK table; `None` when
    /// neither is given (no DTLS).
    pub fn load(
        cert: Option<(&Path, &Path)>,
        psk_file: Option<&Path>,
        max_sessions: usize,
    ) -> Result<Option<DtlsSettings>, String> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        if cert.is_none() && psk_file.is_none() {
            return Ok(None);
        }
        // DTLS 1.2 only, with the suites of the modes configured.
        let mut suites: Vec<Dtls12CipherSuite> = Vec::new();
        if psk_file.is_some() {
            suites.extend(PSK_SUITES);
        }
        if cert.is_some() {
            suites.extend(CERT_SUITES);
        }
        let mut builder = Config::builder()
            .require_client_certificate(false)
            .flight_retries(4)
            .dtls12_cipher_suites(&suites)
            .dtls13_cipher_suites(&[]);
        let psk = match psk_file {
            Some(p) => {
                let table = Arc::new(PskTable {
                    keys: read_psk_file(p)?,
                    last: Mutex::new(None),
                });
                builder = builder.with_psk_server(None, table.clone());
                Some(table)
            }
            None => None,
        };
        let config = builder.build().map_err(|e| format!("DTLS: {e:?}"))?;
        let cert = match cert {
            Some((certfile, keyfile)) => {
                let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(&read(certfile)?)
                        .collect::<Result<_, _>>()
                        .map_err(|e| format!("{}: {e}", certfile.display()))?;
                let leaf = chain
                    .into_iter()
                    .next()
                    .ok_or_else(|| format!("{}: no certificate", certfile.display()))?;
                let key = PrivateKeyDer::from_pem_slice(&read(keyfile)?)
                    .map_err(|e| format!("{}: {e}", keyfile.display()))?;
                let key = key.secret_der().to_vec();
                // dimpl takes ECDSA P-256 and P-384 keys only: refused here, not mid-handshake.
                config
                    .crypto_provider()
                    .key_provider
                    .load_private_key(&key)
                    .map_err(|e| {
                        format!(
                            "{}: not an ECDSA P-256 or P-384 key ({e:?}); DTLS takes no RSA",
                            keyfile.display()
                        )
                    })?;
                Some(DtlsCertificate {
                    certificate: leaf.to_vec(),
                    private_key: key,
                })
            }
            None => None,
        };
        Ok(Some(DtlsSettings {
            config: Arc::new(config),
            cert,
            psk,
            max_sessions: max_sessions.max(1),
        }))
    }
}

struct Session {
    dtls: Dtls,
    connected: bool,
    identity: Option<String>,
    due: Option<Instant>,
    last_rx: Instant,
}

/// Plaintext from a peer, with the identity its handshake proved.
pub type Plain = (Vec<u8>, Option<String>);

/// The DTLS sessions of one socket.
pub struct DtlsLayer {
    s: DtlsSettings,
    sessions: HashMap<SocketAddr, Session>,
    buf: Vec<u8>,
    /// Handshakes that failed or were refused (the caller counts them).
    pub failures: u64,
}

/// Whether `d` is a DTLS handshake record carrying a ClientHello.
fn client_hello(d: &[u8]) -> bool {
    d.len() > 25 && d[0] == 22 && d[13] == 1
}

/// Whether a ClientHello's first suite of ours is the PSK one (the offer in the client's
/// order of preference, RFC 5246 §7.4.1.2).
fn offers_psk_first(d: &[u8]) -> bool {
    // Record header 13 bytes, handshake header 12, then version 2, random 32.
    let body = match d.get(25..) {
        Some(b) => b,
        None => return false,
    };
    let mut i = 2 + 32;
    let Some(&sid) = body.get(i) else {
        return false;
    };
    i += 1 + usize::from(sid);
    let Some(&cookie) = body.get(i) else {
        return false;
    };
    i += 1 + usize::from(cookie);
    let Some(len) = body
        .get(i..i + 2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    else {
        return false;
    };
    i += 2;
    let Some(suites) = body.get(i..i + len) else {
        return false;
    };
    for pair in suites.chunks_exact(2) {
        let code = u16::from_be_bytes([pair[0], pair[1]]);
        if PSK_SUITES.iter().any(|s| s.as_u16() == code) {
            return true;
        }
        if CERT_SUITES.iter().any(|s| s.as_u16() == code) {
            return false;
        }
    }
    false
}

impl DtlsLayer {
    /// No session yet.
    pub fn new(s: DtlsSettings) -> DtlsLayer {
        DtlsLayer {
            s,
            sessions: HashMap::new(),
            buf: vec![0; 2048],
            failures: 0,
        }
    }

    /// Sessions open (handshaking or established).
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// A datagram from `peer`: handshake records are answered (into `out`), application data
    /// returned decrypted.
    pub fn receive(
        &mut self,
        peer: SocketAddr,
        data: &[u8],
        now: Instant,
        out: &mut Vec<(SocketAddr, Vec<u8>)>,
    ) -> Vec<Plain> {
        if !self.sessions.contains_key(&peer) {
            if !client_hello(data) {
                // Not a session of ours, and not the start of one.
                return Vec::new();
            }
            if self.sessions.len() >= self.s.max_sessions && !self.evict(now) {
                self.failures += 1;
                debug!(%peer, "DTLS handshake refused: too many sessions");
                return Vec::new();
            }
            // PSK or certificate, as the client's first acceptable suite says.
            let psk = self.s.psk.is_some() && (self.s.cert.is_none() || offers_psk_first(data));
            let dtls = match (&self.s.cert, psk) {
                (Some(cert), false) => Dtls::new_12(self.s.config.clone(), cert.clone(), now),
                _ => Dtls::new_12_psk(self.s.config.clone(), now),
            };
            self.sessions.insert(
                peer,
                Session {
                    dtls,
                    connected: false,
                    identity: None,
                    due: None,
                    last_rx: now,
                },
            );
        }
        let Some(sess) = self.sessions.get_mut(&peer) else {
            return Vec::new();
        };
        sess.last_rx = now;
        // The engine's clock moves first (dimpl's integration model: it also seeds a new
        // server's random), then the record.
        let fed = sess
            .dtls
            .handle_timeout(now)
            .and_then(|()| sess.dtls.handle_packet(data));
        if let Err(e) = fed {
            debug!(%peer, error = ?e, "DTLS record refused");
            if !sess.connected {
                self.failures += 1;
                self.sessions.remove(&peer);
                return Vec::new();
            }
        }
        if let Some(psk) = &self.s.psk {
            if let Some(id) = psk.last.lock().unwrap_or_else(|e| e.into_inner()).take() {
                sess.identity = Some(String::from_utf8_lossy(&id).into_owned());
            }
        }
        self.drain(peer, out)
    }

    /// Sends `data` to `peer` in its session (into `out`); `false` when it has none.
    pub fn send(
        &mut self,
        peer: SocketAddr,
        data: &[u8],
        out: &mut Vec<(SocketAddr, Vec<u8>)>,
    ) -> bool {
        let Some(sess) = self.sessions.get_mut(&peer).filter(|s| s.connected) else {
            return false;
        };
        if sess.dtls.send_application_data(data).is_err() {
            return false;
        }
        self.drain(peer, out);
        true
    }

    /// The earliest retransmission or handshake deadline.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.sessions.values().filter_map(|s| s.due).min()
    }

    /// Runs due timers (handshake retransmissions; sessions that gave up are dropped).
    pub fn handle_timeouts(&mut self, now: Instant, out: &mut Vec<(SocketAddr, Vec<u8>)>) {
        let due: Vec<SocketAddr> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.due.is_some_and(|d| d <= now))
            .map(|(p, _)| *p)
            .collect();
        for peer in due {
            let Some(sess) = self.sessions.get_mut(&peer) else {
                continue;
            };
            sess.due = None;
            if sess.dtls.handle_timeout(now).is_err() {
                if !sess.connected {
                    self.failures += 1;
                }
                debug!(%peer, "DTLS session timed out");
                self.sessions.remove(&peer);
                continue;
            }
            self.drain(peer, out);
        }
    }

    /// Takes what the session has: packets to send, the deadline, events, plaintext.
    fn drain(&mut self, peer: SocketAddr, out: &mut Vec<(SocketAddr, Vec<u8>)>) -> Vec<Plain> {
        let mut plain = Vec::new();
        let mut closed = false;
        let Some(sess) = self.sessions.get_mut(&peer) else {
            return plain;
        };
        loop {
            match sess.dtls.poll_output(&mut self.buf) {
                Output::Packet(p) => out.push((peer, p.to_vec())),
                Output::BufferTooSmall { needed } => self.buf.resize(needed, 0),
                Output::Timeout(at) => {
                    sess.due = Some(at);
                    break;
                }
                Output::Connected => {
                    sess.connected = true;
                    debug!(%peer, identity = ?sess.identity, "DTLS session established");
                }
                Output::ApplicationData(d) => plain.push((d.to_vec(), sess.identity.clone())),
                Output::CloseNotify => closed = true,
                _ => {}
            }
        }
        if closed {
            debug!(%peer, "DTLS session closed by the peer");
            self.sessions.remove(&peer);
        }
        plain
    }

    /// Makes room for a new session: the oldest handshake still unfinished, else the session
    /// heard from least recently if it has been quiet for a minute. `false` when none may go.
    fn evict(&mut self, now: Instant) -> bool {
        let victim = self
            .sessions
            .iter()
            .filter(|(_, s)| !s.connected)
            .min_by_key(|(_, s)| s.last_rx)
            .or_else(|| {
                self.sessions
                    .iter()
                    .filter(|(_, s)| now.duration_since(s.last_rx) > Duration::from_secs(60))
                    .min_by_key(|(_, s)| s.last_rx)
            })
            .map(|(p, _)| *p);
        match victim {
            Some(p) => {
                self.sessions.remove(&p);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psk_files_are_read_and_bad_lines_named() {
        let dir = std::env::temp_dir().join(format!("shardmq-psk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("psk");
        std::fs::write(&f, "# devices\n\nsensor-1:00ff\nurn:dev:2:0102\n").unwrap();
        let keys = read_psk_file(&f).unwrap();
        assert_eq!(keys[b"sensor-1".as_slice()], vec![0, 255]);
        assert_eq!(
            keys[b"urn:dev:2".as_slice()],
            vec![1, 2],
            "the key is after the last colon"
        );
        for (text, says) in [
            ("nokey\n", ":1: not identity"),
            ("a:xyz\n", "not hexadecimal"),
            ("# only\n", "no identity"),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = read_psk_file(&f).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn hello(suites: &[u16]) -> Vec<u8> {
        let mut body = vec![0xFE, 0xFD];
        body.extend([0u8; 32]);
        body.push(0); // session id
        body.push(0); // cookie
        body.extend(((suites.len() * 2) as u16).to_be_bytes());
        for s in suites {
            body.extend(s.to_be_bytes());
        }
        body.extend([1, 0]);
        let mut d = vec![22, 0xFE, 0xFD, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        d.extend([1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        d.extend(body);
        d
    }

    #[test]
    fn the_clients_first_supported_suite_picks_the_mode() {
        assert!(client_hello(&hello(&[0xC0A8])));
        assert!(offers_psk_first(&hello(&[0x1301, 0xC0A8, 0xC02B])));
        assert!(!offers_psk_first(&hello(&[0xC02B, 0xC0A8])));
        assert!(
            !offers_psk_first(&hello(&[0x00A8])),
            "a PSK suite we do not have"
        );
        assert!(!offers_psk_first(&[22, 0, 0]), "cut short");
    }
}

//! The private TCP gateway's state machine, one per device connection (sans-IO).
//!
//! A device is an engine connection with a gateway sink ([`crate::sink::Sink::packets`]):
//! its CONNECT becomes an MQTT CONNECT (clean session, its keepalive, its credentials, so the
//! broker's authentication and takeover apply as to any client); once the engine accepts it,
//! the gateway subscribes the device's down topic at QoS 0 and answers CONNACK 0 when the
//! subscription is in place everywhere, so nothing published after the device sees CONNACK
//! is missed. Uplink DATATRANS frames are published to the up topic (QoS 0, not retained);
//! deliveries on the down topic go back as DATATRANS; PING is the engine's PINGREQ (which
//! keeps the keepalive), answered PONG. Topics expand `%c` (client id) and `%u` (username).
//!
//! The driver feeds [`TcpGwConn::handle_input`] the bytes it reads, calls
//! [`TcpGwConn::poll_engine`] when the engine wakes the connection, writes
//! [`TcpGwConn::outbox`] to the socket and reports what it wrote with
//! [`TcpGwConn::written`]. Frames wait in that outbox, not in the engine, so the engine never
//! drops a downlink message for a slow device; [`TcpGwSettings::force_shutdown`] bounds them
//! instead: a device with more waiting is disconnected and counted. With no such policy the
//! outbox is refilled only once written, and the engine's write-buffer limits apply.

use crate::engine::{ConnId, EndReason, Engine, Input};
use crate::time::Timestamp;
use bytes::BytesMut;
use shardmq_protocol::mqtt::{
    Connack, Connect, ConnectReturnCode, Packet, ProtocolLevel, Publish, QoS, Subscribe,
};
use shardmq_protocol::tcpgw::{self, code, DecodeError, Frame};
use std::collections::VecDeque;

/// The settings of the TCP gateway (`tcp.proto.*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpGwSettings {
    /// Uplink topic pattern (`tcp/%c/up`).
    pub up_topic: String,
    /// Downlink topic pattern (`tcp/%c/dn`).
    pub dn_topic: String,
    /// Largest DATATRANS accepted from a device.
    pub max_packet_size: usize,
    /// `tcp.proto.force_shutdown_policy`: frames and bytes waiting for a device beyond which
    /// it is disconnected; `None` = never.
    pub force_shutdown: Option<(usize, usize)>,
}

/// Expands `%c` and `%u` in a topic pattern (`%u` is empty without a username).
pub fn expand(pattern: &str, client_id: &str, username: Option<&str>) -> String {
    pattern
        .replace("%c", client_id)
        .replace("%u", username.unwrap_or(""))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the device's CONNECT.
    AwaitingConnect,
    /// The engine has the CONNECT.
    Connecting,
    /// Accepted; the down topic's subscription is on its way.
    Subscribing,
    /// CONNACK 0 sent.
    Connected,
    /// Refused or closed: nothing more is read.
    Closed,
}

/// What [`TcpGwConn::poll_engine`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Polled {
    /// Frames added to the outbox.
    pub frames: usize,
    /// The device fell behind `force_shutdown` and was disconnected.
    pub shut_down: bool,
}

/// One device's connection.
#[derive(Debug)]
pub struct TcpGwConn {
    id: ConnId,
    phase: Phase,
    up_topic: String,
    /// Frames for the device, encoded.
    out: BytesMut,
    /// The length of each frame in `out` not yet written, oldest first.
    frame_lens: VecDeque<usize>,
    /// Bytes of the front frame already written.
    front_written: usize,
    /// Frames decoded from the device.
    frames_in: u64,
}

impl TcpGwConn {
    /// The state of engine connection `id` (opened with a packet sink).
    pub fn new(id: ConnId) -> TcpGwConn {
        TcpGwConn {
            id,
            phase: Phase::AwaitingConnect,
            up_topic: String::new(),
            out: BytesMut::new(),
            frame_lens: VecDeque::new(),
            front_written: 0,
            frames_in: 0,
        }
    }

    /// Frames decoded from the device so far.
    pub fn frames_received(&self) -> u64 {
        self.frames_in
    }

    /// The engine connection.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Whether CONNACK 0 was sent.
    pub fn connected(&self) -> bool {
        self.phase == Phase::Connected
    }

    /// Frames waiting to be written.
    pub fn waiting_frames(&self) -> usize {
        self.frame_lens.len()
    }

    fn push(&mut self, frame: &Frame) {
        let before = self.out.len();
        tcpgw::encode(frame, &mut self.out);
        self.frame_lens.push_back(self.out.len() - before);
    }

    /// Bytes for the device; the driver writes them, then calls [`TcpGwConn::written`].
    pub fn outbox(&self) -> &[u8] {
        &self.out
    }

    /// `n` bytes of the outbox were written. Frees the buffer once it is empty.
    pub fn written(&mut self, n: usize) {
        let _ = self.out.split_to(n.min(self.out.len()));
        let mut n = n + self.front_written;
        while let Some(&len) = self.frame_lens.front() {
            if n < len {
                break;
            }
            n -= len;
            self.frame_lens.pop_front();
        }
        self.front_written = n;
        if self.out.is_empty() {
            self.out = BytesMut::new();
            self.front_written = 0;
        }
    }

    /// Bytes read from the device: decodes and handles the complete frames at the front of
    /// `data` while the engine reads this connection. Bad input closes it (after CONNACK 2 for
    /// a version other than 1) and uses all of `data`.
    pub fn handle_input(
        &mut self,
        e: &mut Engine,
        s: &TcpGwSettings,
        data: &[u8],
        now: Timestamp,
    ) -> Input {
        let mut input = Input {
            used: 0,
            progressed: false,
        };
        while self.phase != Phase::Closed && e.conn_readable(self.id) {
            match tcpgw::decode_slice(&data[input.used..], s.max_packet_size) {
                Ok(Some((frame, n))) => {
                    input.used += n;
                    input.progressed = true;
                    self.frames_in += 1;
                    let message = matches!(frame, Frame::Data(_));
                    self.handle_frame(e, s, frame, now);
                    e.charge_input(self.id, message, n, now);
                }
                Ok(None) => break,
                Err(err) => {
                    self.bad_input(e, &err, now);
                    input.used = data.len();
                    input.progressed = true;
                    break;
                }
            }
        }
        input
    }

    fn bad_input(&mut self, e: &mut Engine, err: &DecodeError, now: Timestamp) {
        tracing::debug!(error = %err, "bad frame from a TCP gateway device, closing");
        if let (Phase::AwaitingConnect, DecodeError::UnsupportedVersion(_)) = (self.phase, err) {
            self.push(&Frame::Connack {
                code: code::ILLEGAL_VERSION,
                message: "Unsupported protocol version".into(),
            });
            self.phase = Phase::Closed;
            return e.close_conn(self.id, EndReason::ProtocolError, now);
        }
        self.phase = Phase::Closed;
        e.close_conn(self.id, EndReason::MalformedPacket, now);
    }

    fn violation(&mut self, e: &mut Engine, what: &str, now: Timestamp) {
        tracing::debug!(what, "TCP gateway protocol error, closing");
        self.phase = Phase::Closed;
        e.close_conn(self.id, EndReason::ProtocolError, now);
    }

    /// One frame from the device.
    pub fn handle_frame(
        &mut self,
        e: &mut Engine,
        s: &TcpGwSettings,
        frame: Frame,
        now: Timestamp,
    ) {
        match (self.phase, frame) {
            (
                Phase::AwaitingConnect,
                Frame::Connect {
                    keepalive,
                    client_id,
                    username,
                    password,
                },
            ) => {
                if client_id.is_empty() {
                    // Its topics name it: a device must say who it is.
                    self.push(&Frame::Connack {
                        code: code::AUTH_FAILED,
                        message: "A client id is required".into(),
                    });
                    return self.violation(e, "CONNECT without a client id", now);
                }
                self.up_topic = expand(&s.up_topic, &client_id, username.as_deref());
                self.phase = Phase::Connecting;
                let connect = Connect {
                    level: ProtocolLevel::V311,
                    client_id,
                    clean_session: true,
                    keep_alive: u16::from(keepalive),
                    will: None,
                    username,
                    password,
                };
                e.handle_packet(self.id, Packet::Connect(Box::new(connect)), now);
            }
            (Phase::AwaitingConnect, f) => {
                self.violation(e, &format!("first frame is {}, not CONNECT", f.name()), now)
            }
            (_, Frame::Connect { .. }) => self.violation(e, "second CONNECT", now),
            (Phase::Subscribing | Phase::Connected, Frame::Data(payload)) => {
                let publish = Publish {
                    dup: false,
                    qos: QoS::AtMostOnce,
                    retain: false,
                    topic: self.up_topic.as_str().into(),
                    packet_id: 0,
                    payload,
                };
                e.handle_packet(self.id, Packet::Publish(publish), now);
            }
            (Phase::Subscribing | Phase::Connected, Frame::Ping) => {
                e.handle_packet(self.id, Packet::Pingreq, now)
            }
            (_, Frame::Disconnect) => {
                self.phase = Phase::Closed;
                e.handle_packet(self.id, Packet::Disconnect, now);
            }
            (_, f @ (Frame::Connack { .. } | Frame::Pong)) => {
                self.violation(e, &format!("{} from a device", f.name()), now)
            }
            // The engine does not read a connection it is still connecting.
            (Phase::Connecting | Phase::Closed, f) => {
                self.violation(e, &format!("{} before CONNACK", f.name()), now)
            }
        }
    }

    /// Takes what the engine has for the device and turns it into frames in the outbox.
    /// Without `force_shutdown` nothing is taken while the outbox still has bytes: what waits
    /// stays in the engine's sink, under its write-buffer limits (QoS 0 beyond them dropped
    /// and counted as for a slow MQTT consumer), so the outbox never grows without bound.
    pub fn poll_engine(&mut self, e: &mut Engine, s: &TcpGwSettings, now: Timestamp) -> Polled {
        let mut polled = Polled::default();
        if s.force_shutdown.is_none() && !self.out.is_empty() {
            return polled;
        }
        let Some(packets) = e.take_packets(self.id, now) else {
            return polled;
        };
        let before = self.frame_lens.len();
        for p in packets {
            match p {
                Packet::Connack(Connack {
                    code: ConnectReturnCode::Accepted,
                    ..
                }) if self.phase == Phase::Connecting => {
                    self.phase = Phase::Subscribing;
                    let dn = expand(
                        &s.dn_topic,
                        e.conn_client_id(self.id).unwrap_or_default(),
                        e.conn_username(self.id),
                    );
                    let subscribe = Subscribe {
                        packet_id: 1,
                        filters: vec![(dn, QoS::AtMostOnce)],
                    };
                    e.handle_packet(self.id, Packet::Subscribe(subscribe), now);
                }
                Packet::Connack(c) => {
                    tracing::debug!(code = ?c.code, "TCP gateway device refused");
                    self.phase = Phase::Closed;
                    self.push(&Frame::Connack {
                        code: code::AUTH_FAILED,
                        message: "Authentication Failure".into(),
                    });
                }
                Packet::Suback(_) if self.phase == Phase::Subscribing => {
                    // A down topic the access rules deny leaves an uplink-only device.
                    self.phase = Phase::Connected;
                    self.push(&Frame::Connack {
                        code: code::ACCEPTED,
                        message: "Connect Successfully".into(),
                    });
                }
                Packet::Publish(p) if self.phase == Phase::Connected => {
                    self.push(&Frame::Data(p.payload));
                }
                Packet::Pingresp => self.push(&Frame::Pong),
                _ => {}
            }
        }
        polled.frames = self.frame_lens.len() - before;
        if let Some((max_frames, max_bytes)) = s.force_shutdown {
            if self.frame_lens.len() > max_frames || self.out.len() > max_bytes {
                tracing::warn!(waiting = self.frame_lens.len(), bytes = self.out.len(), "too much waits for a TCP gateway device (tcp.proto.force_shutdown_policy); closing it");
                self.out = BytesMut::new();
                self.frame_lens.clear();
                self.front_written = 0;
                self.phase = Phase::Closed;
                e.close_conn(self.id, EndReason::ForceShutdown, now);
                polled.shut_down = true;
            }
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_expand_client_id_and_username() {
        assert_eq!(expand("tcp/%c/up", "dev1", None), "tcp/dev1/up");
        assert_eq!(expand("u/%u/%c", "dev1", Some("bob")), "u/bob/dev1");
        assert_eq!(expand("u/%u", "dev1", None), "u/");
    }
}

//! Per-shard counters: plain integers owned by the shard, summed on request.

use serde::Serialize;
use shardmq_protocol::mqtt::{Packet, QoS};

macro_rules! metrics {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Counters of one shard (or the sum over shards).
        #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
        pub struct Metrics {
            $($(#[doc = $doc])* pub $name: u64,)*
        }

        /// (name, description) of every counter, in declaration order.
        pub const DESCRIPTIONS: &[(&str, &str)] = &[$((stringify!($name), concat!($($doc),*)),)*];

        impl Metrics {
            /// Adds `other` into `self`.
            pub fn merge(&mut self, other: &Metrics) {
                $(self.$name += other.$name;)*
            }

            /// (name, value) pairs, in declaration order.
            pub fn pairs(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)*]
            }
        }
    };
}

metrics! {
    /// Connections accepted.
    connections_accepted,
    /// Connections refused by `max_connections`.
    connections_refused,
    /// Connections closed right after accept by `max_conn_rate`.
    connections_rate_limited,
    /// Connections ended.
    connections_closed,
    /// Times an idle connection was parked (its driver task released).
    connections_parked,
    /// CONNECTs accepted (CONNACK 0).
    connects_accepted,
    /// CONNECTs refused with a CONNACK error code.
    connects_refused,
    /// Credentials checked and accepted.
    auth_succeeded,
    /// CONNECTs refused by authentication: bad credentials (0x04), or anonymous where
    /// `auth.allow_anonymous` does not admit it (0x05).
    auth_refused,
    /// Connections closed for sending no CONNECT in time.
    connect_timeouts,
    /// Connections closed by keepalive.
    keepalive_timeouts,
    /// Closing connections whose last bytes could not be written within `mqtt.close_timeout`
    /// (the socket was reset).
    close_timeouts,
    /// Connections closed because a newer one took the client id.
    takeovers,
    /// Sessions handed over to another shard.
    sessions_moved,
    /// Packets that failed to decode (connection closed).
    malformed_packets,
    /// Decodable packets that broke the protocol (connection closed).
    protocol_errors,
    /// Packets received.
    packets_received,
    /// CONNECT packets received.
    packets_connect_received,
    /// PUBLISH packets received.
    packets_publish_received,
    /// PUBACK packets received.
    packets_puback_received,
    /// PUBREC packets received.
    packets_pubrec_received,
    /// PUBREL packets received.
    packets_pubrel_received,
    /// PUBCOMP packets received.
    packets_pubcomp_received,
    /// SUBSCRIBE packets received.
    packets_subscribe_received,
    /// UNSUBSCRIBE packets received.
    packets_unsubscribe_received,
    /// PINGREQ packets received.
    packets_pingreq_received,
    /// DISCONNECT packets received.
    packets_disconnect_received,
    /// CONNACK packets sent.
    packets_connack_sent,
    /// PUBACK packets sent.
    packets_puback_sent,
    /// PUBREC packets sent.
    packets_pubrec_sent,
    /// PUBREL packets sent (first sends; resends count in `retries`).
    packets_pubrel_sent,
    /// PUBCOMP packets sent.
    packets_pubcomp_sent,
    /// SUBACK packets sent.
    packets_suback_sent,
    /// UNSUBACK packets sent.
    packets_unsuback_sent,
    /// PINGRESP packets sent.
    packets_pingresp_sent,
    /// Bytes received.
    bytes_received,
    /// Bytes sent.
    bytes_sent,
    /// PUBLISH packets received from clients (and wills published).
    messages_received,
    /// Of those, at QoS 0.
    messages_qos0_received,
    /// Of those, at QoS 1.
    messages_qos1_received,
    /// Of those, at QoS 2.
    messages_qos2_received,
    /// PUBLISH packets written to clients (deliveries, and resends of unacknowledged ones to
    /// a client that came back).
    messages_sent,
    /// Of those, at QoS 0.
    messages_qos0_sent,
    /// Of those, at QoS 1.
    messages_qos1_sent,
    /// Of those, at QoS 2.
    messages_qos2_sent,
    /// QoS 1 and 2 deliveries the client acknowledged (PUBACK, PUBCOMP).
    messages_acked,
    /// Messages that matched no subscriber anywhere.
    messages_no_subscribers,
    /// Deliveries dropped because a session queue was full (oldest dropped).
    dropped_queue_full,
    /// QoS 0 deliveries dropped for offline sessions.
    dropped_qos0_offline,
    /// Deliveries to offline sessions dropped because all offline queues together held
    /// `mqtt.max_mqueue_bytes_total`.
    dropped_queue_total,
    /// QoS 0 deliveries dropped for slow consumers (`mqtt.max_write_buffer`).
    dropped_slow_consumer,
    /// QoS 0 deliveries dropped because the shard's connections together had
    /// `shards.max_write_buffer` bytes waiting.
    dropped_shard_write_buffer_full,
    /// QoS 0 messages dropped by the cross-shard overload policy.
    dropped_overload,
    /// Deliveries dropped as duplicates while a session moved between shards.
    dropped_duplicates,
    /// Forwarded deliveries dropped because the session they were for is gone (its client
    /// came back with a clean session while the old shard still forwarded).
    dropped_stale_forwards,
    /// Inbound QoS 2 ids forgotten after `await_rel_timeout`.
    awaiting_rel_expired,
    /// Acknowledgements for unknown packet ids (ignored).
    unknown_acks,
    /// Deliveries resent after `retry_interval`.
    retries,
    /// Wills published.
    wills_published,
    /// Messages published through the admin API.
    admin_published,
    /// Clients kicked out through the admin API.
    clients_kicked,
    /// Messages the broker published itself (`$SYS/…`).
    sys_published,
    /// Client PUBLISH packets into `$SYS/`, acknowledged and dropped.
    sys_publish_denied,
    /// PUBLISH packets the access rules denied (dropped).
    acl_denied_publish,
    /// Subscriptions the access rules denied (SUBACK 0x80).
    acl_denied_subscribe,
    /// PUBLISH topics deeper than `mqtt.max_topic_levels` (connection closed).
    topic_levels_exceeded,
    /// Connections closed by `mqtt.force_shutdown_policy` (too many deliveries waiting).
    force_shutdowns,
    /// TCP gateway frames read from devices (`tcp.proto.enable_stats`).
    tcpgw_frames_received,
    /// TCP gateway frames written to devices.
    tcpgw_frames_sent,
    /// TCP gateway bytes read from devices.
    tcpgw_bytes_received,
    /// TCP gateway bytes written to devices.
    tcpgw_bytes_sent,
    /// MQTT-SN datagrams received (`mqtt.sn.enable_stats`).
    mqttsn_datagrams_received,
    /// MQTT-SN datagrams sent (`mqtt.sn.enable_stats`).
    mqttsn_datagrams_sent,
    /// MQTT-SN datagrams that did not decode (dropped).
    mqttsn_bad_datagrams,
    /// MQTT-SN messages dropped: from an unknown address, for an unknown topic id at QoS 0,
    /// QoS -1 while `mqtt.sn.enable_qos3` is off, or while the client's input is held back.
    mqttsn_dropped,
    /// MQTT-SN messages and registrations sent again for want of an acknowledgement.
    mqttsn_retransmits,
    /// MQTT-SN clients given up on after `mqtt.sn.max_retries` unanswered sends.
    mqttsn_retries_exhausted,
    /// MQTT-SN CONNECTs refused because `mqtt.sn.max_clients` clients are known.
    mqttsn_clients_refused,
    /// MQTT-SN messages published at QoS -1 (without a connection).
    mqttsn_qos_minus_one,
    /// Deliveries an MQTT-SN client could not be given (its REGISTER refused, the datagram
    /// too large, its topic registry full).
    mqttsn_undeliverable,
    /// LwM2M (CoAP) datagrams received.
    lwm2m_datagrams_received,
    /// LwM2M (CoAP) datagrams sent.
    lwm2m_datagrams_sent,
    /// LwM2M datagrams that were not CoAP (dropped).
    lwm2m_bad_datagrams,
    /// LwM2M registrations accepted.
    lwm2m_registrations,
    /// LwM2M registrations refused (bad parameters, authentication, `lwm2m.max_endpoints`).
    lwm2m_registrations_refused,
    /// LwM2M registrations that outlived their lifetime.
    lwm2m_registrations_expired,
    /// LwM2M commands taken from MQTT.
    lwm2m_commands,
    /// LwM2M commands refused for their JSON (answered 4.00 on the response topic).
    lwm2m_bad_commands,
    /// LwM2M requests sent again for want of an acknowledgement.
    lwm2m_retransmits,
    /// LwM2M requests a device never answered (answered 5.04 on the response topic).
    lwm2m_timeouts,
    /// LwM2M notifications published.
    lwm2m_notifications,
    /// LwM2M commands and messages dropped (a full command queue, input held back).
    lwm2m_dropped,
    /// CONNECTs refused because their client id, username or address is banned.
    connects_banned,
    /// Client ids banned for reconnecting too often (`flapping.*`).
    flapping_bans,
    /// Times a connection's reads were paused by `mqtt.rate_limit` (ahead of its rate).
    connections_throttled,
    /// Subscriptions refused for their depth (`mqtt.max_topic_levels`) or for
    /// `mqtt.max_subscriptions` (SUBACK 0x80).
    subscriptions_refused,
    /// Retained messages stored or replaced.
    retained_stored,
    /// Retained messages not stored (partition full or payload too large).
    retained_refused,
    /// Persistent sessions freed by `session_expiry_interval`.
    sessions_expired,
    /// Packets held back (their connection not read) until the cross-shard queues had room.
    backpressure_pauses,
    /// Accept errors (such as EMFILE) that made a listener back off.
    accept_errors,
    /// WebSocket upgrades that failed: refused (wrong path, no accepted subprotocol), not an
    /// upgrade, timed out, or the client went away.
    ws_handshake_failures,
    /// TLS handshakes that failed: a client certificate refused or missing, no common version
    /// or cipher suite, not TLS at all, timed out, or the client went away.
    tls_handshake_failures,
    /// Connections closed for bad input below MQTT: a WebSocket text frame, a frame that is
    /// too large or malformed, or a TLS record that does not decrypt.
    transport_violations,
}

impl Metrics {
    /// Counts a packet received, by type.
    #[inline]
    pub fn count_received(&mut self, p: &Packet) {
        self.packets_received += 1;
        match p {
            Packet::Connect(_) => self.packets_connect_received += 1,
            Packet::Publish(_) => self.packets_publish_received += 1,
            Packet::Puback(_) => self.packets_puback_received += 1,
            Packet::Pubrec(_) => self.packets_pubrec_received += 1,
            Packet::Pubrel(_) => self.packets_pubrel_received += 1,
            Packet::Pubcomp(_) => self.packets_pubcomp_received += 1,
            Packet::Subscribe(_) => self.packets_subscribe_received += 1,
            Packet::Unsubscribe(_) => self.packets_unsubscribe_received += 1,
            Packet::Pingreq => self.packets_pingreq_received += 1,
            Packet::Disconnect => self.packets_disconnect_received += 1,
            // Packets only a server sends: a protocol error, counted in total only.
            _ => {}
        }
    }

    /// Counts a control packet sent, by type (PUBLISH is `messages_sent`).
    #[inline]
    pub fn count_sent(&mut self, p: &Packet) {
        match p {
            Packet::Connack(_) => self.packets_connack_sent += 1,
            Packet::Puback(_) => self.packets_puback_sent += 1,
            Packet::Pubrec(_) => self.packets_pubrec_sent += 1,
            Packet::Pubrel(_) => self.packets_pubrel_sent += 1,
            Packet::Pubcomp(_) => self.packets_pubcomp_sent += 1,
            Packet::Suback(_) => self.packets_suback_sent += 1,
            Packet::Unsuback(_) => self.packets_unsuback_sent += 1,
            Packet::Pingresp => self.packets_pingresp_sent += 1,
            _ => {}
        }
    }

    /// Counts a message accepted from a client (or a will), by QoS.
    #[inline]
    pub fn count_message_in(&mut self, qos: QoS) {
        self.messages_received += 1;
        match qos {
            QoS::AtMostOnce => self.messages_qos0_received += 1,
            QoS::AtLeastOnce => self.messages_qos1_received += 1,
            QoS::ExactlyOnce => self.messages_qos2_received += 1,
        }
    }

    /// Counts one PUBLISH written to a client at `qos`.
    #[inline]
    pub fn count_message_out(&mut self, qos: QoS) {
        self.messages_sent += 1;
        match qos {
            QoS::AtMostOnce => self.messages_qos0_sent += 1,
            QoS::AtLeastOnce => self.messages_qos1_sent += 1,
            QoS::ExactlyOnce => self.messages_qos2_sent += 1,
        }
    }

    /// Counts PUBLISH packets written to clients.
    #[inline]
    pub fn count_messages_out(&mut self, w: crate::session::Written) {
        let [q0, q1, q2] = w.0;
        self.messages_sent += u64::from(q0) + u64::from(q1) + u64::from(q2);
        self.messages_qos0_sent += u64::from(q0);
        self.messages_qos1_sent += u64::from(q1);
        self.messages_qos2_sent += u64::from(q2);
    }

    /// Control packets and PUBLISH packets sent, all types.
    pub fn packets_sent(&self) -> u64 {
        self.messages_sent
            + self.packets_connack_sent
            + self.packets_puback_sent
            + self.packets_pubrec_sent
            + self.packets_pubrel_sent
            + self.packets_pubcomp_sent
            + self.packets_suback_sent
            + self.packets_unsuback_sent
            + self.packets_pingresp_sent
    }
}

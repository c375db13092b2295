//! The MQTT-SN gateway on the datagram driver ([`super::udp`]): its settings from
//! `mqtt.sn.*`, and the [`SnGateway`] state machine as a [`DatagramGateway`], with ADVERTISE
//! as the driver's announcement when `mqtt.sn.advertise_address` is set.

use super::udp::{DatagramGateway, UdpCtx};
use crate::config::MqttSnConfig;
use crate::core::engine::{ConnId, Engine, ListenerProtocol};
use crate::core::gateway::mqttsn::{SnGateway, SnSettings};
use crate::core::time::Timestamp;
use crate::shard::connection::ConnCtx;
use crate::shard::listener::Gate;
use bytes::Bytes;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

/// How the engine names the gateway's clients, and how long they may take to CONNECT.
pub fn protocol(cfg: &MqttSnConfig) -> ListenerProtocol {
    ListenerProtocol {
        name: "MQTT-SN",
        version: 1,
        idle_timeout: cfg.idle_timeout.0,
    }
}

/// The state machine's settings from `mqtt.sn.*`; its clients count under engine listener
/// `listener`.
pub fn settings(cfg: &MqttSnConfig, listener: u16) -> SnSettings {
    let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    SnSettings {
        listener,
        gateway_id: cfg.gateway_id,
        username: non_empty(&cfg.username),
        password: non_empty(&cfg.password).map(Bytes::from),
        enable_qos3: cfg.enable_qos3,
        // Checked when the configuration was validated.
        predefined: cfg.predefined_topics().unwrap_or_default(),
        retry_interval: cfg.retry_interval.0,
        max_retries: cfg.max_retries,
        max_clients: cfg.max_clients,
        max_registered_topics: cfg.max_registered_topics,
        stats: cfg.enable_stats,
    }
}

/// The gateway of `cfg` on the datagram driver, its clients counted under listener
/// `listener` (whose gate is `gate`).
pub fn ctx(
    conn: Rc<ConnCtx>,
    cfg: &MqttSnConfig,
    listener: u16,
    gate: Arc<Gate>,
) -> UdpCtx<SnGateway> {
    let gw = SnGateway::new(settings(cfg, listener));
    let secs = cfg.advertise_duration.0.as_secs().min(u64::from(u16::MAX)) as u16;
    let announce = cfg
        .advertise_to()
        .filter(|_| !cfg.advertise_address.trim().is_empty())
        .map(|to| (to, cfg.advertise_duration.0, gw.advertise(secs)));
    UdpCtx::new(
        conn,
        gw,
        gate,
        cfg.recbuf.as_usize(),
        announce,
        ("gateway.mqttsn", "MQTT-SN"),
    )
}

impl DatagramGateway for SnGateway {
    fn datagram(
        &mut self,
        e: &mut Engine,
        from: SocketAddr,
        data: &[u8],
        _vouched: Option<&str>,
        now: Timestamp,
    ) {
        self.handle_datagram(e, from, data, now)
    }

    fn poll_conn(&mut self, e: &mut Engine, id: ConnId, now: Timestamp) {
        SnGateway::poll_conn(self, e, id, now)
    }

    fn tick(&mut self, e: &mut Engine, now: Timestamp) {
        SnGateway::tick(self, e, now)
    }

    fn next_deadline(&self) -> Option<Timestamp> {
        SnGateway::next_deadline(self)
    }

    fn pop_datagram(&mut self, e: &mut Engine) -> Option<(SocketAddr, Bytes)> {
        SnGateway::pop_datagram(self, e)
    }

    fn take_opened(&mut self) -> Vec<ConnId> {
        SnGateway::take_opened(self)
    }

    fn client_count(&self) -> usize {
        SnGateway::client_count(self)
    }

    fn close_all(&mut self, e: &mut Engine, now: Timestamp) -> usize {
        SnGateway::close_all(self, e, now)
    }

    fn forget_all(&mut self, e: &mut Engine, now: Timestamp) {
        SnGateway::forget_all(self, e, now)
    }
}

//! The LwM2M gateway on the datagram driver ([`super::udp`]): its settings from `lwm2m.*`,
//! the object registry read from `lwm2m.xml_dir`, and the [`Lwm2mGateway`] state machine as a
//! [`DatagramGateway`].

use super::udp::{DatagramGateway, UdpCtx};
use crate::config::Lwm2mConfig;
use crate::core::engine::{ConnId, Engine, ListenerProtocol};
use crate::core::gateway::lwm2m::registry::Registry;
use crate::core::gateway::lwm2m::server::{Lwm2mGateway, Lwm2mSettings, Lwm2mTopics};
use crate::core::time::Timestamp;
use crate::shard::connection::ConnCtx;
use crate::shard::listener::Gate;
use bytes::Bytes;
use std::net::SocketAddr;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

/// How the engine names the gateway's endpoints, and how long a registration may wait for
/// the broker.
pub fn protocol() -> ListenerProtocol {
    ListenerProtocol {
        name: "LwM2M",
        version: 1,
        idle_timeout: std::time::Duration::from_secs(30),
    }
}

/// Reads every `.xml` file of `dir` into a registry. A file that is not an object definition
/// is an error naming it; a directory without definitions gives an empty registry (the
/// caller warns).
pub fn load_registry(dir: &Path) -> Result<Registry, String> {
    let mut r = Registry::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(r),
        Err(e) => return Err(format!("lwm2m.xml_dir {}: {e}", dir.display())),
    };
    let mut files: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x.eq_ignore_ascii_case("xml")))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        r.load_str(&text)
            .map_err(|e| format!("{}: {e}", f.display()))?;
    }
    Ok(r)
}

/// A seed no other host can know: from the system's randomness (the RNG the password file's
/// salts come from).
fn random_seed() -> u64 {
    use argon2::password_hash::rand_core::{OsRng, RngCore};
    OsRng.next_u64()
}

/// The state machine's settings from `lwm2m.*`; its endpoints count under engine listener
/// `listener`.
pub fn settings(cfg: &Lwm2mConfig, listener: u16) -> Lwm2mSettings {
    let t = &cfg.topics;
    Lwm2mSettings {
        listener,
        lifetime_min: cfg.lifetime_min.0.as_secs().min(u64::from(u32::MAX)) as u32,
        lifetime_max: cfg.lifetime_max.0.as_secs().min(u64::from(u32::MAX)) as u32,
        qmode_time_window: cfg.qmode_time_window.0,
        auto_observe: cfg.auto_observe,
        topics: Lwm2mTopics {
            command: t.command.clone(),
            response: t.response.clone(),
            notify: t.notify.clone(),
            register: t.register.clone(),
            update: t.update.clone(),
        },
        update_always: cfg.update_msg_publish_condition == "always",
        ack_timeout: cfg.ack_timeout.0,
        max_retransmit: cfg.max_retransmit,
        max_endpoints: cfg.max_endpoints,
        max_queued: cfg.max_queued,
        max_payload: cfg.max_payload.as_usize(),
        seed: random_seed(),
    }
}

/// The gateway of `cfg` with the object definitions `registry` on the datagram driver, its
/// endpoints counted under listener `listener` (whose gate is `gate`).
pub fn ctx(
    conn: Rc<ConnCtx>,
    cfg: &Lwm2mConfig,
    registry: Arc<Registry>,
    listener: u16,
    gate: Arc<Gate>,
) -> UdpCtx<Lwm2mGateway> {
    UdpCtx::new(
        conn,
        Lwm2mGateway::new(settings(cfg, listener), registry),
        gate,
        cfg.recbuf.as_usize(),
        None,
        ("gateway.lwm2m", "LwM2M"),
    )
}

impl DatagramGateway for Lwm2mGateway {
    fn datagram(
        &mut self,
        e: &mut Engine,
        from: SocketAddr,
        data: &[u8],
        vouched: Option<&str>,
        now: Timestamp,
    ) {
        self.handle_datagram(e, from, data, vouched, now)
    }

    fn poll_conn(&mut self, e: &mut Engine, id: ConnId, now: Timestamp) {
        Lwm2mGateway::poll_conn(self, e, id, now)
    }

    fn tick(&mut self, e: &mut Engine, now: Timestamp) {
        Lwm2mGateway::tick(self, e, now)
    }

    fn next_deadline(&self) -> Option<Timestamp> {
        Lwm2mGateway::next_deadline(self)
    }

    fn pop_datagram(&mut self, e: &mut Engine) -> Option<(SocketAddr, Bytes)> {
        Lwm2mGateway::pop_datagram(self, e)
    }

    fn take_opened(&mut self) -> Vec<ConnId> {
        Lwm2mGateway::take_opened(self)
    }

    fn client_count(&self) -> usize {
        self.endpoint_count()
    }

    fn close_all(&mut self, e: &mut Engine, now: Timestamp) -> usize {
        Lwm2mGateway::close_all(self, e, now)
    }

    fn forget_all(&mut self, e: &mut Engine, now: Timestamp) {
        Lwm2mGateway::forget_all(self, e, now)
    }
}

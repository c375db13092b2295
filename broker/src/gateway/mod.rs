//! The gateways' drivers: sockets and tasks on the shard a profile pins each gateway to. The
//! protocols themselves are sans-IO state machines in the core crate
//! ([`crate::core::gateway`]); a gateway's clients are engine connections with a packet sink,
//! so routing, retained, wills, authentication, ACL, takeover, metrics and `$SYS` events treat
//! them as any client.

pub mod dtls;
pub mod lwm2m;
pub mod mqttsn;
pub mod tcp;
pub mod udp;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// A gateway's state as `shardmq ctl gateways list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayState {
    /// Listening on these addresses (plain first, then TLS when configured).
    Running(Vec<SocketAddr>),
    /// Not started, or unloaded.
    Stopped,
    /// The last load failed (the port is taken, say).
    Failed(String),
}

impl GatewayState {
    /// `running`, `stopped` or `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            GatewayState::Running(_) => "running",
            GatewayState::Stopped => "stopped",
            GatewayState::Failed(_) => "failed",
        }
    }
}

/// One gateway's lifecycle, shared between its shard (which starts and stops it) and the
/// admin API (which asks for it): the operator sets whether it is wanted, the shard's
/// supervisor task brings it there and records the state.
pub struct GatewayCtl {
    /// `tcp`, `mqttsn`.
    pub name: &'static str,
    /// The shard that hosts it.
    pub shard: usize,
    /// The addresses its listeners bind (plain first, then TLS when configured).
    pub binds: Vec<SocketAddr>,
    /// Their gates (connections open), in the same order.
    pub gates: Vec<Arc<crate::shard::listener::Gate>>,
    inner: Mutex<CtlInner>,
}

#[derive(Debug)]
struct CtlInner {
    wanted: bool,
    state: GatewayState,
    /// Bumped each time the supervisor settles, so a caller can wait for its answer.
    settled: u64,
    waker: Option<Waker>,
}

impl GatewayCtl {
    /// A gateway wanted running (or not) from the start.
    pub fn new(
        name: &'static str,
        shard: usize,
        binds: Vec<SocketAddr>,
        gates: Vec<Arc<crate::shard::listener::Gate>>,
        wanted: bool,
    ) -> GatewayCtl {
        GatewayCtl {
            name,
            shard,
            binds,
            gates,
            inner: Mutex::new(CtlInner {
                wanted,
                state: GatewayState::Stopped,
                settled: 0,
                waker: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CtlInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether it is wanted running.
    pub fn wanted(&self) -> bool {
        self.lock().wanted
    }

    /// Connections open through its listeners.
    pub fn connections(&self) -> usize {
        self.gates.iter().map(|g| g.open()).sum()
    }

    /// The current state.
    pub fn state(&self) -> GatewayState {
        self.lock().state.clone()
    }

    /// How many times the supervisor has settled (see [`GatewayCtl::want`]).
    pub fn settled(&self) -> u64 {
        self.lock().settled
    }

    /// Asks for the gateway running (`true`) or stopped; wakes its supervisor (from any
    /// thread). Returns the settle count to wait past.
    pub fn want(&self, on: bool) -> u64 {
        let mut i = self.lock();
        i.wanted = on;
        if let Some(w) = i.waker.take() {
            w.wake();
        }
        i.settled
    }

    /// The supervisor: whether the gateway should now run, once that differs from
    /// `running`; otherwise waits.
    pub fn poll_change(&self, cx: &mut Context<'_>, running: bool) -> Poll<bool> {
        let mut i = self.lock();
        if i.wanted != running {
            return Poll::Ready(i.wanted);
        }
        i.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The supervisor records where it got. A failed start is no longer wanted.
    pub fn settle(&self, state: GatewayState) {
        let mut i = self.lock();
        if matches!(state, GatewayState::Failed(_)) {
            i.wanted = false;
        }
        i.state = state;
        i.settled += 1;
    }
}

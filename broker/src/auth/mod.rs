//! Authentication in the runtime: the chain of backends that check a CONNECT's credentials,
//! and the task on each shard that runs the checks off its event loop.
//!
//! The engine decides alone what needs no check (a verified certificate; anonymous clients by
//! `auth.allow_anonymous`) and queues an [`AuthRequest`] for the rest. Each shard's
//! [`serve`] task takes them, answers from a short cache of recent successes when it can, and
//! otherwise runs the chain on glommio's blocking pool (a slow hash must not stall the other
//! connections of the shard), then hands the outcome back with `Engine::auth_done`.
//!
//! A backend is an [`Authenticator`]: the password file today; TLS client certificates are
//! vouched for by the transport before the engine sees the CONNECT, and the gateways' clients
//! come through the same engine path. Later backends (HTTP, JWT) are new implementations of
//! the trait.

pub mod acl;
pub mod password;

use crate::config::AuthConfig;
use crate::core::auth::{AuthOutcome, AuthRequest};
use crate::core::engine::Engine;
use crate::shard::clock;
use sha2::{Digest, Sha256};
use std::cell::RefCell;
use std::collections::HashMap;
use std::future::poll_fn;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// What one backend says of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Let in.
    Allow,
    /// Refuse, with this outcome.
    Deny(AuthOutcome),
    /// Not mine to say (unknown user): ask the next backend.
    Ignore,
}

/// A credential backend.
pub trait Authenticator: Send + Sync {
    /// Its name in logs.
    fn name(&self) -> &str;
    /// Checks a request. May block (it runs on the blocking pool).
    fn authenticate(&self, req: &AuthRequest) -> Decision;
    /// Re-reads its source (SIGHUP, the admin API); on error keeps what it had.
    fn reload(&self) -> Result<(), String>;
}

/// The backends, asked in order; the first that does not ignore a request decides. A request
/// none of them knows is refused as bad credentials (CONNACK 0x04).
pub struct AuthChain {
    backends: Vec<Box<dyn Authenticator>>,
    /// Bumped by every reload: cached successes of an earlier generation are forgotten.
    generation: AtomicU64,
}

impl AuthChain {
    /// The chain `cfg` configures; `None` when no backend is (credentials are then not
    /// checked). Errors name the key and the file.
    pub fn from_config(cfg: &AuthConfig) -> Result<Option<Arc<AuthChain>>, String> {
        let mut backends: Vec<Box<dyn Authenticator>> = Vec::new();
        if let Some(path) = &cfg.password_file {
            let file = password::PasswordFile::load(path)
                .map_err(|e| format!("auth.password_file: {e}"))?;
            info!(file = %path.display(), users = file.len(), "password file loaded");
            backends.push(Box::new(file));
        }
        if backends.is_empty() {
            return Ok(None);
        }
        Ok(Some(Arc::new(AuthChain {
            backends,
            generation: AtomicU64::new(0),
        })))
    }

    /// Asks the backends in turn.
    pub fn check(&self, req: &AuthRequest) -> AuthOutcome {
        for b in &self.backends {
            match b.authenticate(req) {
                Decision::Allow => return AuthOutcome::Allow,
                Decision::Deny(o) => return o,
                Decision::Ignore => {}
            }
        }
        AuthOutcome::BadCredentials
    }

    /// Reloads every backend; the first error is returned (the others still reload).
    pub fn reload(&self) -> Result<(), String> {
        let mut first = None;
        for b in &self.backends {
            match b.reload() {
                Ok(()) => info!(backend = b.name(), "authentication reloaded"),
                Err(e) => {
                    warn!(backend = b.name(), error = %e, "authentication reload failed; keeping the previous data");
                    first.get_or_insert(e);
                }
            }
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        first.map_or(Ok(()), Err)
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// Successful checks remembered by one shard: digest of (username, password) → (until,
/// chain generation). Bounded: emptied when full.
struct Cache {
    ttl: Duration,
    entries: HashMap<[u8; 32], (Instant, u64)>,
}

/// At most this many remembered successes per shard.
const CACHE_MAX: usize = 100_000;

fn digest(req: &AuthRequest) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(req.username.as_deref().unwrap_or("").as_bytes());
    h.update([0]);
    h.update(req.password.as_deref().unwrap_or(&[]));
    h.finalize().into()
}

impl Cache {
    fn hit(&self, key: &[u8; 32], generation: u64) -> bool {
        self.entries
            .get(key)
            .is_some_and(|(until, g)| *g == generation && Instant::now() < *until)
    }

    fn remember(&mut self, key: [u8; 32], generation: u64) {
        if self.ttl.is_zero() {
            return;
        }
        if self.entries.len() >= CACHE_MAX {
            self.entries.clear();
        }
        self.entries
            .insert(key, (Instant::now() + self.ttl, generation));
    }
}

/// Runs the checks the shard's engine asks for, as long as the shard runs.
pub async fn serve(engine: Rc<RefCell<Engine>>, chain: Arc<AuthChain>, cache_ttl: Duration) {
    let cache = Rc::new(RefCell::new(Cache {
        ttl: cache_ttl,
        entries: HashMap::new(),
    }));
    loop {
        let requests = poll_fn(|cx| {
            let mut e = engine.borrow_mut();
            let r = e.take_auth_requests();
            if r.is_empty() {
                e.set_auth_waker(cx.waker());
                Poll::Pending
            } else {
                Poll::Ready(r)
            }
        })
        .await;
        for req in requests {
            let key = digest(&req);
            let generation = chain.generation();
            if cache.borrow().hit(&key, generation) {
                engine
                    .borrow_mut()
                    .auth_done(req.conn, AuthOutcome::Allow, clock::now());
                continue;
            }
            let (engine, chain, cache) = (engine.clone(), chain.clone(), cache.clone());
            glommio::spawn_local(async move {
                let id = req.conn;
                let outcome = glommio::executor()
                    .spawn_blocking({
                        let chain = chain.clone();
                        move || chain.check(&req)
                    })
                    .await;
                if outcome == AuthOutcome::Allow {
                    cache.borrow_mut().remember(key, generation);
                }
                engine.borrow_mut().auth_done(id, outcome, clock::now());
            })
            .detach();
        }
    }
}

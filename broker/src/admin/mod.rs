//! The admin API: REST under `/api/v1` ([`api`]) and Prometheus at `/metrics`
//! ([`prometheus`]), served by hyper on a current-thread tokio runtime in a thread of its own
//! (`admin`), beside the shards. It reads the stats board and asks the shards for the rest
//! through their mailboxes ([`crate::shard::control`]); a shard never waits for it.
//!
//! Access: on a loopback bind without credentials configured, requests are served as they
//! come; otherwise each must carry `admin.username`/`admin.password` (basic auth) or
//! `admin.api_key` (`Authorization: Bearer …`). Configuration validation refuses a
//! non-loopback bind with neither.

pub mod api;
pub mod banned;
pub mod gateways;
pub mod prometheus;

use crate::config::AdminConfig;
use crate::shard::Shards;
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::sync::{oneshot, Semaphore};
use tracing::{debug, warn};

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The running admin API.
pub struct AdminServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What every request handler needs.
pub struct Ctx {
    /// The shards.
    pub shards: Shards,
    /// `admin.*`.
    pub cfg: AdminConfig,
    /// `mqtt.max_packet_size`: the largest message `publish` takes.
    pub max_packet_size: usize,
}

impl AdminServer {
    /// Serves the API on `listener` (already bound) in a new thread.
    pub fn start(
        listener: std::net::TcpListener,
        cfg: &AdminConfig,
        max_packet_size: usize,
        shards: Shards,
    ) -> std::io::Result<AdminServer> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let ctx = Arc::new(Ctx {
            shards,
            cfg: cfg.clone(),
            max_packet_size,
        });
        let (stop, stopped) = oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("admin".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => {
                            let _ = ready_tx.send(Ok(()));
                            l
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    tokio::select! {
                        _ = serve(listener, ctx) => {}
                        _ = stopped => {}
                    }
                });
            })?;
        ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("the admin thread exited"))??;
        Ok(AdminServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving (requests in progress are dropped) and waits for the thread.
    pub fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

async fn serve(listener: tokio::net::TcpListener, ctx: Arc<Ctx>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: back off rather than spin.
                warn!(error = %e, "admin API: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(respond(&ctx, req, peer).await) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                debug!(%peer, error = %e, "admin API connection ended with an error");
            }
            drop(permit);
        });
    }
}

/// A JSON or text response.
pub type Reply = Response<Full<Bytes>>;

/// A response with `body` of `content_type`.
pub fn reply(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// A JSON response.
pub fn json(status: StatusCode, value: &impl serde::Serialize) -> Reply {
    match serde_json::to_vec(value) {
        Ok(body) => reply(status, "application/json", body),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "INTERNAL",
            &e.to_string(),
        ),
    }
}

/// A JSON error: `{"code": …, "message": …}`.
pub fn error(status: StatusCode, code: &str, message: &str) -> Reply {
    let body = serde_json::json!({ "code": code, "message": message });
    reply(
        status,
        "application/json",
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

/// Whether the request carries the configured credentials (or needs none).
fn authorized(cfg: &AdminConfig, req: &Request<Incoming>) -> bool {
    if !cfg.needs_credentials() {
        return true;
    }
    let Some(value) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let eq = |a: &str, b: &str| bool::from(a.as_bytes().ct_eq(b.as_bytes()));
    if let Some(token) = value.strip_prefix("Bearer ") {
        return cfg.api_key.as_deref().is_some_and(|k| eq(token.trim(), k));
    }
    if let Some(encoded) = value.strip_prefix("Basic ") {
        let (Some(user), Some(pass)) = (cfg.username.as_deref(), cfg.password.as_deref()) else {
            return false;
        };
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
            return false;
        };
        let Ok(decoded) = String::from_utf8(decoded) else {
            return false;
        };
        let Some((u, p)) = decoded.split_once(':') else {
            return false;
        };
        // Both compared, whatever the first gives.
        return eq(u, user) & eq(p, pass);
    }
    false
}

async fn respond(ctx: &Ctx, req: Request<Incoming>, peer: SocketAddr) -> Reply {
    if !authorized(&ctx.cfg, &req) {
        warn!(%peer, path = %req.uri().path(), "admin API: request without valid credentials refused");
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "credentials required: basic auth (admin.username, admin.password) or Authorization: Bearer <admin.api_key>",
        );
        r.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"shardmq admin\""),
        );
        return r;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    // The largest body: a publish of max_packet_size bytes, base64-encoded, with its JSON.
    let limit = ctx.max_packet_size / 3 * 4 + 64 * 1024;
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BAD_REQUEST",
                &format!("cannot read the request body: {e}"),
            )
        }
    };
    let r = api::route(ctx, &method, &path, &query, body).await;
    debug!(%peer, %method, %path, status = r.status().as_u16(), "admin API request");
    r
}

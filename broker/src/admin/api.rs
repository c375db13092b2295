//! The REST endpoints under `/api/v1` (docs/operations.md shows each with curl):
//!
//! | method and path | answer |
//! |---|---|
//! | `GET /api/v1/status` | node, version, uptime, shards |
//! | `GET /api/v1/stats` | counts and their peaks, broker-wide and per shard |
//! | `GET /api/v1/metrics[?shard=N]` | every counter, summed or of one shard |
//! | `GET /api/v1/clients` | clients, paged (`page`, `limit`), filtered (`clientid_prefix`, `username_prefix`, `connected`) |
//! | `GET /api/v1/clients/{clientid}` | one client's details and subscriptions; 404 if unknown |
//! | `DELETE /api/v1/clients/{clientid}` | kicks the client out (its session goes too); 204, or 404 |
//! | `GET /api/v1/clients/{clientid}/subscriptions` | its subscriptions |
//! | `GET /api/v1/subscriptions` | subscriptions, paged, filtered (`clientid`, `topic`) |
//! | `GET /api/v1/routes` | (filter, shard) routes, paged, filtered (`topic`) |
//! | `POST /api/v1/publish` | publishes `{"topic", "payload", "qos", "retain", "encoding"}` |
//! | `POST /api/v1/auth/reload` | re-reads the password file (as SIGHUP does) |
//! | `GET /api/v1/gateways` | the gateways: name, state, shard, bind, connections |
//! | `POST /api/v1/gateways/{name}/load`, `/unload` | starts or stops a gateway on its shard |
//! | `GET /api/v1/banned` | the bans in force |
//! | `POST /api/v1/banned` | bans `{"as", "who", "reason", "until" or "duration"}`; closes what it matches |
//! | `DELETE /api/v1/banned/{as}/{who}` | lifts a ban; 204, or 404 |
//! | `GET /metrics` | Prometheus text format |
//!
//! Listings answer `{"data": [...], "meta": {"page", "limit", "count"}}`; errors answer
//! `{"code", "message"}` with a 4xx or 5xx status.

use super::{error, json, prometheus, reply, Ctx, Reply};
use crate::core::engine::admin::{ClientFilter, Page, PublishError, SubscriptionFilter, Window};
use crate::core::engine::Engine;
use crate::protocol::mqtt::QoS;
use base64::Engine as _;
use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::SystemTime;

/// Entries per page unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 100;
/// The largest `limit`.
const MAX_LIMIT: usize = 10_000;

/// A request that fails: its status, code, message and, for 405, the methods allowed.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    allow: Option<&'static str>,
}

impl ApiError {
    pub(super) fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            allow: None,
        }
    }

    fn into_reply(self) -> Reply {
        let mut r = error(self.status, self.code, &self.message);
        if let Some(allow) = self.allow {
            r.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static(allow),
            );
        }
        r
    }
}

/// Answers one request.
pub async fn route(ctx: &Ctx, method: &Method, path: &str, query: &str, body: Bytes) -> Reply {
    let params: HashMap<String, String> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let mut segs = Vec::new();
    for raw in path.trim_end_matches('/').split('/').skip(1) {
        match percent_encoding::percent_decode_str(raw).decode_utf8() {
            Ok(s) => segs.push(s.into_owned()),
            Err(_) => return bad_request("the path is not UTF-8 once decoded").into_reply(),
        }
    }
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let result = match (method, segs.as_slice()) {
        (&Method::GET, ["metrics"]) => Ok(prometheus_reply(ctx)),
        (&Method::GET, ["api", "v1", "status"]) => Ok(status(ctx)),
        (&Method::GET, ["api", "v1", "stats"]) => Ok(stats(ctx)),
        (&Method::GET, ["api", "v1", "metrics"]) => metrics(ctx, &params),
        (&Method::GET, ["api", "v1", "clients"]) => clients(ctx, &params).await,
        (&Method::GET, ["api", "v1", "clients", id]) => client(ctx, id).await,
        (&Method::DELETE, ["api", "v1", "clients", id]) => kick(ctx, id).await,
        (&Method::GET, ["api", "v1", "clients", id, "subscriptions"]) => {
            client_subscriptions(ctx, id).await
        }
        (&Method::GET, ["api", "v1", "subscriptions"]) => subscriptions(ctx, &params).await,
        (&Method::GET, ["api", "v1", "routes"]) => routes(ctx, &params).await,
        (&Method::POST, ["api", "v1", "publish"]) => publish(ctx, &body).await,
        (&Method::GET, ["api", "v1", "gateways"]) => super::gateways::list(ctx),
        (&Method::POST, ["api", "v1", "gateways", name, action]) => {
            super::gateways::set(ctx, name, action).await
        }
        (&Method::GET, ["api", "v1", "banned"]) => super::banned::list(ctx).await,
        (&Method::POST, ["api", "v1", "banned"]) => super::banned::add(ctx, &body).await,
        (&Method::DELETE, ["api", "v1", "banned", kind, who]) => {
            super::banned::remove(ctx, kind, who).await
        }
        (&Method::POST, ["api", "v1", "auth", "reload"]) => {
            match crate::shard::runtime::reload_auth(&ctx.shards) {
                Ok(()) => Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({ "reloaded": true }),
                )),
                Err(e) => Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "RELOAD_FAILED",
                    e,
                )),
            }
        }
        (_, p) => Err(not_routed(method, p)),
    };
    result.unwrap_or_else(ApiError::into_reply)
}

/// 404 for a path that does not exist, 405 for a method a path does not take.
fn not_routed(method: &Method, path: &[&str]) -> ApiError {
    let allowed: Option<&'static str> = match path {
        ["metrics"] | ["api", "v1", "status" | "stats" | "metrics" | "clients"] => Some("GET"),
        ["api", "v1", "subscriptions" | "routes"] => Some("GET"),
        ["api", "v1", "clients", _] => Some("GET, DELETE"),
        ["api", "v1", "clients", _, "subscriptions"] => Some("GET"),
        ["api", "v1", "banned"] => Some("GET, POST"),
        ["api", "v1", "gateways"] => Some("GET"),
        ["api", "v1", "gateways", _, _] => Some("POST"),
        ["api", "v1", "banned", _, _] => Some("DELETE"),
        ["api", "v1", "publish"] | ["api", "v1", "auth", "reload"] => Some("POST"),
        _ => None,
    };
    match allowed {
        Some(allow) => ApiError {
            allow: Some(allow),
            ..ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                format!("{method} is not allowed here (allowed: {allow})"),
            )
        },
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("no such endpoint: /{}", path.join("/")),
        ),
    }
}

/// 204, with no body and no content type.
pub(super) fn no_content() -> Reply {
    let mut r = reply(StatusCode::NO_CONTENT, "application/json", Bytes::new());
    r.headers_mut().remove(hyper::header::CONTENT_TYPE);
    r
}

pub(super) fn bad_request(message: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "BAD_REQUEST", message)
}

fn unavailable(shard: usize) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "SHARD_UNAVAILABLE",
        format!("shard {shard} did not answer in time"),
    )
}

/// Runs `f` on `shard`, within `admin.request_timeout`.
pub(super) async fn ask<R: Send + 'static>(
    ctx: &Ctx,
    shard: usize,
    f: impl FnOnce(&mut Engine, crate::core::time::Timestamp) -> R + Send + 'static,
) -> Result<R, ApiError> {
    let wait = ctx.cfg.request_timeout.0;
    match tokio::time::timeout(wait, ctx.shards.ask(shard, f)).await {
        Ok(Some(r)) => Ok(r),
        _ => Err(unavailable(shard)),
    }
}

fn prometheus_reply(ctx: &Ctx) -> Reply {
    let text = prometheus::render(&ctx.shards.board().snapshot(), &ctx.shards);
    reply(
        StatusCode::OK,
        "text/plain; version=0.0.4; charset=utf-8",
        text,
    )
}

fn uptime(ctx: &Ctx) -> u64 {
    SystemTime::now()
        .duration_since(ctx.shards.started())
        .map_or(0, |d| d.as_secs())
}

fn status(ctx: &Ctx) -> Reply {
    let snap = ctx.shards.board().snapshot();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "node": ctx.shards.node(),
            "version": env!("CARGO_PKG_VERSION"),
            "status": "running",
            "uptime": uptime(ctx),
            "started_at": humantime::format_rfc3339_seconds(ctx.shards.started()).to_string(),
            "shards": ctx.shards.len(),
            "mqtt_shards": ctx.shards.mqtt(),
            "connections": snap.counts.connections,
            "sessions": snap.counts.sessions,
        }),
    )
}

fn stats(ctx: &Ctx) -> Reply {
    let snap = ctx.shards.board().snapshot();
    let mut out = serde_json::Map::new();
    for ((name, count), (_, peak)) in snap.counts.pairs().into_iter().zip(snap.peaks.pairs()) {
        out.insert(format!("{name}.count"), count.into());
        out.insert(format!("{name}.max"), peak.into());
    }
    let shards: Vec<serde_json::Value> = snap
        .shards
        .iter()
        .enumerate()
        .map(|(n, s)| {
            serde_json::json!({
                "shard": n,
                "connections": s.connections,
                "parked": s.parked,
                "sessions": s.sessions,
                "subscriptions": s.subscriptions,
                "routes": s.local_filters,
                "retained": s.retained,
            })
        })
        .collect();
    out.insert("shards".into(), shards.into());
    json(StatusCode::OK, &out)
}

fn metrics(ctx: &Ctx, params: &HashMap<String, String>) -> Result<Reply, ApiError> {
    let snap = ctx.shards.board().snapshot();
    match params.get("shard") {
        None => Ok(json(StatusCode::OK, &snap.metrics())),
        Some(s) => {
            let n: usize = s
                .parse()
                .map_err(|_| bad_request("shard must be a shard number"))?;
            let shard = snap.shards.get(n).ok_or_else(|| {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "NOT_FOUND",
                    format!("no shard {n} ({} shards)", snap.shards.len()),
                )
            })?;
            Ok(json(StatusCode::OK, &shard.metrics))
        }
    }
}

/// `page` (from 1) and `limit` of a listing.
fn paging(params: &HashMap<String, String>) -> Result<(usize, usize), ApiError> {
    let num = |key: &str, default: usize| -> Result<usize, ApiError> {
        match params.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse::<usize>()
                .map_err(|_| bad_request(&format!("{key} must be a positive integer"))),
        }
    };
    let page = num("page", 1)?;
    let limit = num("limit", DEFAULT_LIMIT)?;
    if page == 0 {
        return Err(bad_request("page counts from 1"));
    }
    if limit == 0 || limit > MAX_LIMIT {
        return Err(bad_request(&format!(
            "limit must be between 1 and {MAX_LIMIT}"
        )));
    }
    Ok((page, limit))
}

#[derive(Serialize)]
struct Meta {
    page: usize,
    limit: usize,
    count: usize,
}

#[derive(Serialize)]
struct Listing<T> {
    data: Vec<T>,
    meta: Meta,
}

/// One page of a listing over every shard: shard after shard, each passing over what the
/// earlier ones had beyond the page's start.
async fn paged<T, F>(
    ctx: &Ctx,
    params: &HashMap<String, String>,
    part: F,
) -> Result<Reply, ApiError>
where
    T: Serialize + Send + 'static,
    F: Fn(&Engine, Window) -> Page<T> + Clone + Send + 'static,
{
    let (page, limit) = paging(params)?;
    let mut skip = (page - 1).saturating_mul(limit);
    let mut data = Vec::new();
    let mut count = 0;
    for shard in 0..ctx.shards.len() {
        let window = Window {
            skip,
            take: limit - data.len(),
        };
        let part = part.clone();
        let p = ask(ctx, shard, move |e, _| part(e, window)).await?;
        count += p.matched;
        skip = skip.saturating_sub(p.matched);
        data.extend(p.items);
    }
    Ok(json(
        StatusCode::OK,
        &Listing {
            data,
            meta: Meta { page, limit, count },
        },
    ))
}

async fn clients(ctx: &Ctx, params: &HashMap<String, String>) -> Result<Reply, ApiError> {
    let connected = match params.get("connected").map(String::as_str) {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(_) => return Err(bad_request("connected must be true or false")),
    };
    let filter = ClientFilter {
        clientid_prefix: params.get("clientid_prefix").cloned(),
        username_prefix: params.get("username_prefix").cloned(),
        connected,
    };
    paged(ctx, params, move |e: &Engine, w| e.list_clients(&filter, w)).await
}

fn client_not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "CLIENT_NOT_FOUND",
        format!("no client {id:?}"),
    )
}

async fn client(ctx: &Ctx, id: &str) -> Result<Reply, ApiError> {
    for shard in 0..ctx.shards.len() {
        let wanted = id.to_string();
        if let Some(d) = ask(ctx, shard, move |e, _| e.client_detail(&wanted)).await? {
            return Ok(json(StatusCode::OK, &d));
        }
    }
    Err(client_not_found(id))
}

async fn client_subscriptions(ctx: &Ctx, id: &str) -> Result<Reply, ApiError> {
    for shard in 0..ctx.shards.len() {
        let wanted = id.to_string();
        if let Some(d) = ask(ctx, shard, move |e, _| e.client_detail(&wanted)).await? {
            return Ok(json(StatusCode::OK, &d.subscriptions));
        }
    }
    Err(client_not_found(id))
}

async fn kick(ctx: &Ctx, id: &str) -> Result<Reply, ApiError> {
    let mut found = false;
    for shard in 0..ctx.shards.len() {
        let wanted = id.to_string();
        found |= ask(ctx, shard, move |e, now| e.kick(&wanted, now)).await?;
    }
    if found {
        tracing::info!(client_id = id, "client kicked through the admin API");
        Ok(no_content())
    } else {
        Err(client_not_found(id))
    }
}

async fn subscriptions(ctx: &Ctx, params: &HashMap<String, String>) -> Result<Reply, ApiError> {
    let filter = SubscriptionFilter {
        clientid: params.get("clientid").cloned(),
        topic: params.get("topic").cloned(),
    };
    paged(ctx, params, move |e: &Engine, w| {
        e.list_subscriptions(&filter, w)
    })
    .await
}

async fn routes(ctx: &Ctx, params: &HashMap<String, String>) -> Result<Reply, ApiError> {
    let topic = params.get("topic").cloned();
    paged(ctx, params, move |e: &Engine, w| {
        e.list_routes(topic.as_deref(), w)
    })
    .await
}

/// The body of `POST /api/v1/publish`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    topic: String,
    #[serde(default)]
    payload: String,
    #[serde(default)]
    qos: u8,
    #[serde(default)]
    retain: bool,
    /// `plain` (the payload as it is, UTF-8) or `base64`.
    #[serde(default = "plain")]
    encoding: String,
}

fn plain() -> String {
    "plain".into()
}

async fn publish(ctx: &Ctx, body: &[u8]) -> Result<Reply, ApiError> {
    let b: PublishBody = serde_json::from_slice(body)
        .map_err(|e| bad_request(&format!("the body is not a publish request: {e}")))?;
    let qos = match b.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        q => return Err(bad_request(&format!("qos {q} is not 0, 1 or 2"))),
    };
    let payload = match b.encoding.as_str() {
        "plain" => Bytes::from(b.payload.into_bytes()),
        "base64" => Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(b.payload.as_bytes())
                .map_err(|e| bad_request(&format!("payload is not base64: {e}")))?,
        ),
        other => {
            return Err(bad_request(&format!(
                "encoding {other:?} is not plain or base64"
            )))
        }
    };
    let shard = ctx.shards.mqtt().first().copied().unwrap_or(0);
    let topic = b.topic.clone();
    let retain = b.retain;
    let outcome = ask(ctx, shard, move |e, now| {
        e.publish_admin(&topic, payload, qos, retain, now)
    })
    .await?;
    match outcome {
        Ok(()) => Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "topic": b.topic, "qos": b.qos, "retain": b.retain }),
        )),
        Err(e @ PublishError::TooLarge(_)) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            e.to_string(),
        )),
        Err(e) => Err(bad_request(&e.to_string())),
    }
}

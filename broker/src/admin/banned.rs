//! `/api/v1/banned`: the bans in force, adding one and lifting one (see
//! [`crate::core::ban`]).
//!
//! Every shard is told of a new ban: the owner shard of a banned client id keeps it, every
//! shard keeps a username or address ban, and each closes the connections it matches.
//! Listing asks every shard and merges what they keep. Times are Unix seconds, as EMQX's API
//! gives them; `until` is `null` for a ban without end.

use super::api::{ask, bad_request, no_content, ApiError};
use super::{json, Ctx, Reply};
use crate::core::ban::{Ban, BanKind};
use crate::core::time::Timestamp;
use crate::shard::clock;
use hyper::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// How long a ban lasts when the request gives neither `until` nor `duration` (EMQX's
/// default).
const DEFAULT_BAN: std::time::Duration = std::time::Duration::from_secs(300);

/// A ban as the API shows it.
fn ban_json(b: &Ban) -> Value {
    json!({
        "as": b.kind.as_str(),
        "who": b.who,
        "reason": b.reason,
        "by": b.by,
        "at": b.at.0 / 1000,
        "until": (b.until != Timestamp::NEVER).then_some(b.until.0 / 1000),
    })
}

/// `GET /api/v1/banned`
pub async fn list(ctx: &Ctx) -> Result<Reply, ApiError> {
    let mut all: BTreeMap<(&'static str, String), Ban> = BTreeMap::new();
    for shard in 0..ctx.shards.len() {
        for b in ask(ctx, shard, |e, now| e.list_bans(now)).await? {
            // Username and address bans are on every shard: list each once.
            all.insert((b.kind.as_str(), b.who.clone()), b);
        }
    }
    let data: Vec<Value> = all.values().map(ban_json).collect();
    let count = data.len();
    Ok(json(
        StatusCode::OK,
        &json!({ "data": data, "meta": { "count": count } }),
    ))
}

/// The body of `POST /api/v1/banned`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BanBody {
    #[serde(rename = "as")]
    kind: String,
    who: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    by: Option<String>,
    /// Unix seconds, or `"infinity"`.
    #[serde(default)]
    until: Option<Value>,
    /// From now (`"1h"`), instead of `until`.
    #[serde(default)]
    duration: Option<String>,
}

/// When a ban requested at `now` ends.
fn until(b: &BanBody, now: Timestamp) -> Result<Timestamp, ApiError> {
    match (&b.until, &b.duration) {
        (Some(_), Some(_)) => Err(bad_request("give until or duration, not both")),
        (None, None) => Ok(now.after(DEFAULT_BAN)),
        (None, Some(d)) => {
            let d = crate::protocol::units::parse_duration(d)
                .map_err(|e| bad_request(&format!("duration: {e}")))?;
            if d.0.is_zero() {
                return Err(bad_request("duration must be more than 0s"));
            }
            Ok(now.after(d.0))
        }
        (Some(Value::String(s)), None) if s == "infinity" => Ok(Timestamp::NEVER),
        (Some(v), None) => {
            let secs = v
                .as_u64()
                .ok_or_else(|| bad_request("until is Unix seconds or \"infinity\""))?;
            let at = Timestamp(secs.saturating_mul(1000));
            if at <= now {
                return Err(bad_request("until is in the past"));
            }
            Ok(at)
        }
    }
}

/// `POST /api/v1/banned`
pub async fn add(ctx: &Ctx, body: &[u8]) -> Result<Reply, ApiError> {
    let b: BanBody = serde_json::from_slice(body)
        .map_err(|e| bad_request(&format!("the body is not a ban: {e}")))?;
    let kind = BanKind::parse(&b.kind).map_err(|e| bad_request(&format!("as: {e}")))?;
    let now = clock::now();
    let ban = Ban {
        kind,
        who: b.who.clone(),
        reason: b.reason.clone(),
        by: b.by.clone().unwrap_or_else(|| "admin".into()),
        at: now,
        until: until(&b, now)?,
    };
    ban.validate().map_err(|e| bad_request(&e))?;
    let mut closed = 0;
    for shard in 0..ctx.shards.len() {
        let ban = ban.clone();
        closed += ask(ctx, shard, move |e, now| e.add_ban(ban, now))
            .await?
            .map_err(|e| bad_request(&e))?;
    }
    tracing::info!(kind = kind.as_str(), who = %ban.who, closed, "ban added through the admin API");
    let mut v = ban_json(&ban);
    v["closed"] = closed.into();
    Ok(json(StatusCode::OK, &v))
}

/// `DELETE /api/v1/banned/{as}/{who}`
pub async fn remove(ctx: &Ctx, kind: &str, who: &str) -> Result<Reply, ApiError> {
    let kind = BanKind::parse(kind).map_err(|e| bad_request(&format!("as: {e}")))?;
    let mut found = false;
    for shard in 0..ctx.shards.len() {
        let who = who.to_string();
        found |= ask(ctx, shard, move |e, now| e.remove_ban(kind, &who, now)).await?;
    }
    if found {
        tracing::info!(
            kind = kind.as_str(),
            who,
            "ban lifted through the admin API"
        );
        Ok(no_content())
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("no {} ban for {who:?}", kind.as_str()),
        ))
    }
}

//! `/api/v1/gateways`: the gateways, and loading and unloading one at runtime (the seed's
//! `emqx_ctl plugins load|unload`). The gateway's shard does the work; the request waits for
//! it (at most `admin.request_timeout`) and answers with the gateway's new state.

use super::api::{bad_request, ApiError};
use super::{json, Ctx, Reply};
use crate::gateway::{GatewayCtl, GatewayState};
use hyper::StatusCode;
use serde_json::{json, Value};

fn gateway_json(g: &GatewayCtl) -> Value {
    let state = g.state();
    let (binds, error) = match &state {
        GatewayState::Running(addrs) => (addrs.clone(), None),
        GatewayState::Stopped => (g.binds.clone(), None),
        GatewayState::Failed(e) => (g.binds.clone(), Some(e.clone())),
    };
    json!({
        "name": g.name,
        "state": state.name(),
        "shard": g.shard,
        "bind": binds.first().map(ToString::to_string),
        "tls_bind": binds.get(1).map(ToString::to_string),
        "connections": g.connections(),
        "error": error,
    })
}

/// `GET /api/v1/gateways`
pub fn list(ctx: &Ctx) -> Result<Reply, ApiError> {
    let data: Vec<Value> = ctx
        .shards
        .gateways()
        .iter()
        .map(|g| gateway_json(g))
        .collect();
    let count = data.len();
    Ok(json(
        StatusCode::OK,
        &json!({ "data": data, "meta": { "count": count } }),
    ))
}

/// `POST /api/v1/gateways/{name}/load` and `/unload`.
pub async fn set(ctx: &Ctx, name: &str, action: &str) -> Result<Reply, ApiError> {
    let on = match action {
        "load" => true,
        "unload" => false,
        other => return Err(bad_request(&format!("{other:?} is not load or unload"))),
    };
    let Some(g) = ctx
        .shards
        .gateways()
        .iter()
        .find(|g| g.name == name)
        .cloned()
    else {
        let known: Vec<&str> = ctx.shards.gateways().iter().map(|g| g.name).collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("no gateway {name:?} (there are: {})", known.join(", ")),
        ));
    };
    let running = matches!(g.state(), GatewayState::Running(_));
    if running != on {
        let before = g.want(on);
        let deadline = tokio::time::Instant::now() + ctx.cfg.request_timeout.0;
        while g.settled() == before {
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "SHARD_UNAVAILABLE",
                    format!("shard {} did not {action} gateway {name} in time", g.shard),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tracing::info!(
            gateway = name,
            action,
            "gateway {action}ed through the admin API"
        );
    }
    if let GatewayState::Failed(e) = g.state() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "GATEWAY_FAILED",
            format!("gateway {name} did not load: {e}"),
        ));
    }
    Ok(json(StatusCode::OK, &gateway_json(&g)))
}

//! `shardmq ctl`: the operator's command line, like `emqx_ctl`, over the admin API. It finds
//! the API where the configuration says (`admin.bind`, with `--config`/`--profile` and the
//! `SHARDMQ_*` environment as for the broker) or at `--url`, with the configured credentials
//! or the ones given. Tables for people, `--json` for scripts; exit status 1, with one line
//! saying why, when the broker cannot be reached or refuses.

use crate::config::Config;
use base64::Engine as _;
use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(15);

/// `shardmq ctl …`
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The admin API (default: from `admin.bind` in the configuration).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// Print the API's JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Basic-auth user (default: `admin.username`).
    #[arg(long)]
    pub username: Option<String>,
    /// Basic-auth password (default: `admin.password`).
    #[arg(long)]
    pub password: Option<String>,
    /// API key (default: `admin.api_key`).
    #[arg(long)]
    pub api_key: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// Whether the broker runs: node, version, uptime, shards.
    Status,
    /// Clients: list, show, kick.
    Clients {
        /// What to do with clients.
        #[command(subcommand)]
        command: ClientsCommand,
    },
    /// Subscriptions.
    Subscriptions {
        /// What to do with subscriptions.
        #[command(subcommand)]
        command: SubscriptionsCommand,
    },
    /// Routes: which shards subscribe to which filters.
    Routes {
        /// What to do with routes.
        #[command(subcommand)]
        command: RoutesCommand,
    },
    /// Every counter, summed over shards (or of one shard).
    Metrics {
        /// One shard's counters.
        #[arg(long)]
        shard: Option<usize>,
    },
    /// Broker-wide counts and their peaks, and each shard's.
    Stats,
    /// Gateways: list, load, unload.
    Gateways {
        /// What to do with gateways.
        #[command(subcommand)]
        command: GatewaysCommand,
    },
    /// Bans: list, add, delete.
    Banned {
        /// What to do with bans.
        #[command(subcommand)]
        command: BannedCommand,
    },
    /// Publishes a message.
    Publish {
        /// Topic name.
        topic: String,
        /// Payload (text).
        payload: String,
        /// QoS 0, 1 or 2.
        #[arg(long, default_value_t = 0)]
        qos: u8,
        /// Retain it.
        #[arg(long)]
        retain: bool,
    },
}

/// `ctl clients …`
#[derive(Subcommand, Debug)]
pub enum ClientsCommand {
    /// One page of clients.
    List {
        /// Client ids starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Usernames starting with this.
        #[arg(long)]
        username: Option<String>,
        /// Page, from 1.
        #[arg(long, default_value_t = 1)]
        page: usize,
        /// Clients per page.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One client's details and subscriptions.
    Show {
        /// Client id.
        id: String,
    },
    /// Closes the client's connection and discards its session.
    Kick {
        /// Client id.
        id: String,
    },
}

/// `ctl gateways …`
#[derive(Subcommand, Debug)]
pub enum GatewaysCommand {
    /// Each gateway: state, shard, address, connections.
    List,
    /// Starts a gateway on its shard.
    Load {
        /// The gateway (tcp, mqttsn).
        name: String,
    },
    /// Stops a gateway: its listener closes and its devices are disconnected.
    Unload {
        /// The gateway (tcp, mqttsn).
        name: String,
    },
}

/// `ctl banned …`
#[derive(Subcommand, Debug)]
pub enum BannedCommand {
    /// The bans in force.
    List,
    /// Bans a client id, a username or an address (its connections are closed).
    Add {
        /// clientid, username or peerhost.
        #[arg(value_name = "AS")]
        kind: String,
        /// The client id, username, or address or network (10.0.0.0/8).
        who: String,
        /// How long ("1h", "7d"); default 5 minutes.
        #[arg(long, conflicts_with = "forever")]
        duration: Option<String>,
        /// Without end.
        #[arg(long)]
        forever: bool,
        /// Why (shown in the list).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Lifts a ban.
    Del {
        /// clientid, username or peerhost.
        #[arg(value_name = "AS")]
        kind: String,
        /// The client id, username, or address or network.
        who: String,
    },
}

/// `ctl subscriptions …`
#[derive(Subcommand, Debug)]
pub enum SubscriptionsCommand {
    /// One page of subscriptions.
    List {
        /// Of this client only.
        #[arg(long)]
        client: Option<String>,
        /// Page, from 1.
        #[arg(long, default_value_t = 1)]
        page: usize,
        /// Subscriptions per page.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// `ctl routes …`
#[derive(Subcommand, Debug)]
pub enum RoutesCommand {
    /// One page of routes.
    List {
        /// Page, from 1.
        #[arg(long, default_value_t = 1)]
        page: usize,
        /// Routes per page.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// Where the API is and how to get in.
struct Target {
    /// Shown in messages.
    url: String,
    host: String,
    addr: SocketAddr,
    authorization: Option<String>,
}

/// The URL of the API for `admin.bind` (an unspecified address means this host).
pub fn default_url(cfg: &Config) -> String {
    let bind = cfg.admin.bind;
    let ip = match bind.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, bind.port()))
}

fn target(args: &CtlArgs, cfg: Option<&Config>) -> Result<Target, String> {
    let url = match (&args.url, cfg) {
        (Some(u), _) => u.trim_end_matches('/').to_string(),
        (None, Some(cfg)) => default_url(cfg),
        (None, None) => "http://127.0.0.1:18083".to_string(),
    };
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!("--url {url}: only http:// is supported (the admin API speaks plain HTTP)")
    })?;
    if rest.contains('/') {
        return Err(format!("--url {url}: give the host and port only"));
    }
    let host = rest.to_string();
    let with_port = if rest
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !rest.ends_with(']')
    {
        rest.to_string()
    } else {
        format!("{rest}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("--url {url}: {e}"))?
        .next()
        .ok_or_else(|| format!("--url {url}: the host has no address"))?;
    let admin = cfg.map(|c| &c.admin);
    let username = args
        .username
        .clone()
        .or_else(|| admin.and_then(|a| a.username.clone()));
    let password = args
        .password
        .clone()
        .or_else(|| admin.and_then(|a| a.password.clone()));
    let api_key = args
        .api_key
        .clone()
        .or_else(|| admin.and_then(|a| a.api_key.clone()));
    let authorization = match (api_key, username, password) {
        (Some(k), _, _) => Some(format!("Bearer {k}")),
        (None, Some(u), Some(p)) => Some(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )),
        _ => None,
    };
    Ok(Target {
        url,
        host,
        addr,
        authorization,
    })
}

/// Sends one request; the status and the body.
async fn send(
    t: &Target,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Bytes), String> {
    let down = |e: &dyn std::fmt::Display| {
        format!(
            "cannot reach the admin API at {} ({e}); is the broker running? (its address is admin.bind; or give --url)",
            t.url
        )
    };
    let stream = tokio::net::TcpStream::connect(t.addr)
        .await
        .map_err(|e| down(&e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| down(&e))?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, &t.host);
    if let Some(a) = &t.authorization {
        req = req.header(hyper::header::AUTHORIZATION, a);
    }
    let payload = match body {
        Some(v) => {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    let req = req
        .body(Full::new(payload))
        .map_err(|e| format!("bad request: {e}"))?;
    let resp = sender.send_request(req).await.map_err(|e| down(&e))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| down(&e))?
        .to_bytes();
    Ok((status, body))
}

/// Sends a request and returns its JSON, or the API's error as one line.
async fn call(
    t: &Target,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let (status, bytes) = tokio::time::timeout(TIMEOUT, send(t, method, path, body))
        .await
        .map_err(|_| {
            format!(
                "the admin API at {} did not answer within {TIMEOUT:?}",
                t.url
            )
        })??;
    let value: Value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    if status.is_success() {
        return Ok(value);
    }
    let message = value
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| value.to_string());
    if status == StatusCode::UNAUTHORIZED {
        return Err(format!(
            "the admin API refused the credentials: {message} (set admin.username/admin.password or admin.api_key, or pass --username/--password or --api-key)"
        ));
    }
    Err(format!("{message} ({status})"))
}

/// A query string from the pairs whose value is set.
fn query(pairs: &[(&str, Option<String>)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        if let Some(v) = v {
            q.append_pair(k, v);
        }
    }
    let q = q.finish();
    if q.is_empty() {
        q
    } else {
        format!("?{q}")
    }
}

/// A path segment with everything but unreserved characters percent-encoded.
fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Text of a JSON value for a table cell.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Prints rows under headers, columns padded to their widest cell.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r.clone()));
    }
    out
}

/// Rows of the listed `data` with the `fields` of each entry.
fn rows(v: &Value, fields: &[&str]) -> Vec<Vec<String>> {
    v["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| fields.iter().map(|f| cell(&e[*f])).collect())
                .collect()
        })
        .unwrap_or_default()
}

fn footer(v: &Value, what: &str) -> String {
    let shown = v["data"].as_array().map_or(0, Vec::len);
    format!(
        "{shown} of {} {what} (page {}, {} per page)\n",
        cell(&v["meta"]["count"]),
        cell(&v["meta"]["page"]),
        cell(&v["meta"]["limit"])
    )
}

fn human(cmd: &CtlCommand, v: &Value) -> String {
    match cmd {
        CtlCommand::Status => format!(
            "Node {} is {}: ShardMQ {}, up {} s, {} shards, {} connections, {} sessions\n",
            cell(&v["node"]),
            cell(&v["status"]),
            cell(&v["version"]),
            cell(&v["uptime"]),
            cell(&v["shards"]),
            cell(&v["connections"]),
            cell(&v["sessions"]),
        ),
        CtlCommand::Clients {
            command: ClientsCommand::List { .. },
        } => {
            let fields = [
                "clientid",
                "connected",
                "username",
                "ipaddress",
                "port",
                "shard",
                "keepalive",
                "subscriptions_cnt",
                "inflight_cnt",
                "mqueue_len",
            ];
            let headers = [
                "CLIENTID",
                "CONNECTED",
                "USERNAME",
                "IP",
                "PORT",
                "SHARD",
                "KEEPALIVE",
                "SUBS",
                "INFLIGHT",
                "QUEUED",
            ];
            table(&headers, &rows(v, &fields)) + &footer(v, "clients")
        }
        CtlCommand::Clients {
            command: ClientsCommand::Show { .. },
        } => {
            let mut out = String::new();
            if let Some(obj) = v.as_object() {
                for (k, val) in obj.iter().filter(|(k, _)| *k != "subscriptions") {
                    out.push_str(&format!("{k:<18} {}\n", cell(val)));
                }
            }
            let subs: Vec<Vec<String>> = v["subscriptions"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|s| vec![cell(&s["topic"]), cell(&s["qos"])])
                        .collect()
                })
                .unwrap_or_default();
            out.push('\n');
            out + &table(&["TOPIC", "QOS"], &subs)
        }
        CtlCommand::Clients {
            command: ClientsCommand::Kick { id },
        } => format!("client {id} kicked\n"),
        CtlCommand::Subscriptions { .. } => {
            table(
                &["CLIENTID", "TOPIC", "QOS", "SHARD"],
                &rows(v, &["clientid", "topic", "qos", "shard"]),
            ) + &footer(v, "subscriptions")
        }
        CtlCommand::Routes { .. } => {
            table(&["TOPIC", "SHARD"], &rows(v, &["topic", "shard"])) + &footer(v, "routes")
        }
        CtlCommand::Metrics { .. } => {
            let mut out = String::new();
            if let Some(obj) = v.as_object() {
                let width = obj.keys().map(String::len).max().unwrap_or(0);
                for (k, val) in obj {
                    out.push_str(&format!("{k:<width$}  {}\n", cell(val)));
                }
            }
            out
        }
        CtlCommand::Stats => {
            let mut out = String::new();
            if let Some(obj) = v.as_object() {
                for (k, val) in obj.iter().filter(|(k, _)| *k != "shards") {
                    out.push_str(&format!("{k:<20} {}\n", cell(val)));
                }
            }
            let fields = [
                "shard",
                "connections",
                "parked",
                "sessions",
                "subscriptions",
                "routes",
                "retained",
            ];
            let shards: Vec<Vec<String>> = v["shards"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|s| fields.iter().map(|f| cell(&s[*f])).collect())
                        .collect()
                })
                .unwrap_or_default();
            out.push('\n');
            out + &table(
                &[
                    "SHARD",
                    "CONNECTIONS",
                    "PARKED",
                    "SESSIONS",
                    "SUBSCRIPTIONS",
                    "ROUTES",
                    "RETAINED",
                ],
                &shards,
            )
        }
        CtlCommand::Publish { topic, qos, .. } => {
            format!("published to {topic} at QoS {qos}\n")
        }
        CtlCommand::Gateways {
            command: GatewaysCommand::List,
        } => table(
            &["NAME", "STATE", "SHARD", "BIND", "CONNECTIONS", "ERROR"],
            &rows(
                v,
                &["name", "state", "shard", "bind", "connections", "error"],
            ),
        ),
        CtlCommand::Gateways {
            command: GatewaysCommand::Load { name } | GatewaysCommand::Unload { name },
        } => format!(
            "gateway {name} {} (shard {}, {})\n",
            cell(&v["state"]),
            cell(&v["shard"]),
            cell(&v["bind"])
        ),
        CtlCommand::Banned {
            command: BannedCommand::List,
        } => {
            let mut listed = v.clone();
            if let Some(a) = listed["data"].as_array_mut() {
                for b in a {
                    b["at"] = rfc3339(&b["at"]).into();
                    b["until"] = if b["until"].is_null() {
                        "never".into()
                    } else {
                        rfc3339(&b["until"]).into()
                    };
                }
            }
            table(
                &["AS", "WHO", "BY", "AT", "UNTIL", "REASON"],
                &rows(&listed, &["as", "who", "by", "at", "until", "reason"]),
            ) + &format!("{} bans\n", cell(&v["meta"]["count"]))
        }
        CtlCommand::Banned {
            command: BannedCommand::Add { kind, who, .. },
        } => format!(
            "{kind} {who} banned {} ({} connections closed)\n",
            if v["until"].is_null() {
                "without end".to_string()
            } else {
                format!("until {}", rfc3339(&v["until"]))
            },
            cell(&v["closed"])
        ),
        CtlCommand::Banned {
            command: BannedCommand::Del { kind, who },
        } => format!("{kind} {who} no longer banned\n"),
    }
}

/// Unix seconds as an RFC 3339 time.
fn rfc3339(v: &Value) -> String {
    match v.as_u64() {
        Some(s) => {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(s))
                .to_string()
        }
        None => cell(v),
    }
}

/// The request a command makes.
fn request(cmd: &CtlCommand) -> (Method, String, Option<Value>) {
    let get = |p: String| (Method::GET, p, None);
    match cmd {
        CtlCommand::Status => get("/api/v1/status".into()),
        CtlCommand::Stats => get("/api/v1/stats".into()),
        CtlCommand::Metrics { shard } => get(format!(
            "/api/v1/metrics{}",
            query(&[("shard", shard.map(|s| s.to_string()))])
        )),
        CtlCommand::Clients { command } => match command {
            ClientsCommand::List {
                prefix,
                username,
                page,
                limit,
            } => get(format!(
                "/api/v1/clients{}",
                query(&[
                    ("clientid_prefix", prefix.clone()),
                    ("username_prefix", username.clone()),
                    ("page", Some(page.to_string())),
                    ("limit", Some(limit.to_string())),
                ])
            )),
            ClientsCommand::Show { id } => get(format!("/api/v1/clients/{}", segment(id))),
            ClientsCommand::Kick { id } => (
                Method::DELETE,
                format!("/api/v1/clients/{}", segment(id)),
                None,
            ),
        },
        CtlCommand::Subscriptions {
            command:
                SubscriptionsCommand::List {
                    client,
                    page,
                    limit,
                },
        } => get(format!(
            "/api/v1/subscriptions{}",
            query(&[
                ("clientid", client.clone()),
                ("page", Some(page.to_string())),
                ("limit", Some(limit.to_string())),
            ])
        )),
        CtlCommand::Routes {
            command: RoutesCommand::List { page, limit },
        } => get(format!(
            "/api/v1/routes{}",
            query(&[
                ("page", Some(page.to_string())),
                ("limit", Some(limit.to_string())),
            ])
        )),
        CtlCommand::Gateways { command } => match command {
            GatewaysCommand::List => get("/api/v1/gateways".into()),
            GatewaysCommand::Load { name } => (
                Method::POST,
                format!("/api/v1/gateways/{}/load", segment(name)),
                None,
            ),
            GatewaysCommand::Unload { name } => (
                Method::POST,
                format!("/api/v1/gateways/{}/unload", segment(name)),
                None,
            ),
        },
        CtlCommand::Banned { command } => match command {
            BannedCommand::List => get("/api/v1/banned".into()),
            BannedCommand::Add {
                kind,
                who,
                duration,
                forever,
                reason,
            } => {
                let mut body = serde_json::json!({ "as": kind, "who": who, "reason": reason });
                if *forever {
                    body["until"] = "infinity".into();
                } else if let Some(d) = duration {
                    body["duration"] = d.as_str().into();
                }
                (Method::POST, "/api/v1/banned".into(), Some(body))
            }
            BannedCommand::Del { kind, who } => (
                Method::DELETE,
                format!("/api/v1/banned/{}/{}", segment(kind), segment(who)),
                None,
            ),
        },
        CtlCommand::Publish {
            topic,
            payload,
            qos,
            retain,
        } => (
            Method::POST,
            "/api/v1/publish".into(),
            Some(serde_json::json!({
                "topic": topic, "payload": payload, "qos": qos, "retain": retain,
            })),
        ),
    }
}

/// Runs `shardmq ctl`; the text to print, or the error line.
pub fn run(args: &CtlArgs, cfg: Option<&Config>) -> Result<String, String> {
    let t = target(args, cfg)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| format!("cannot start: {e}"))?;
    let (method, path, body) = request(&args.command);
    let v = runtime.block_on(call(&t, method, &path, body))?;
    if args.json {
        let text = serde_json::to_string_pretty(&v).unwrap_or_default();
        Ok(if v.is_null() {
            String::new()
        } else {
            text + "\n"
        })
    } else {
        Ok(human(&args.command, &v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    BB\nxyz  1\nq    22\n");
    }

    #[test]
    fn ids_are_one_path_segment() {
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
        assert_eq!(query(&[("a", Some("x y".into())), ("b", None)]), "?a=x+y");
        assert_eq!(query(&[("b", None)]), "");
    }

    #[test]
    fn the_default_url_follows_admin_bind() {
        let mut cfg = Config::default();
        assert_eq!(default_url(&cfg), "http://127.0.0.1:18083");
        cfg.admin.bind = "0.0.0.0:9000".parse().unwrap_or(cfg.admin.bind);
        assert_eq!(default_url(&cfg), "http://127.0.0.1:9000");
    }
}

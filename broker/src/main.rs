//! `shardmq`: runs the broker (default), prints the effective configuration, or talks to a
//! running broker (`shardmq ctl …`).

use clap::Parser;
use shardmq::config::{self, LoadOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What `--version` prints.
const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit:   ",
    env!("BUILD_SHARDMQ_COMMIT"),
    "\nbuild:    ",
    env!("BUILD_SHARDMQ_PROFILE"),
    ", ",
    env!("BUILD_SHARDMQ_TARGET"),
    ", ",
    env!("BUILD_SHARDMQ_RUSTC"),
    "\nfeatures: MQTT 3.1 and 3.1.1; TCP, TLS 1.2/1.3 (rustls, ring), WebSocket, WSS; \
     $SYS, admin API, Prometheus; password file (Argon2id, mosquitto $7$), ACL file; \
     glommio/io_uring shards (vendored, patched); mimalloc",
);

/// What `--help` adds at the end.
const AFTER_HELP: &str = "\
Configuration is layered: compiled defaults, then --config FILE, then --profile NAME, then \
environment variables, then --bind/--port. Every key can be set from the environment as \
SHARDMQ_ followed by its path in capitals with __ between the parts, e.g. \
SHARDMQ_MQTT__MAX_INFLIGHT=64 or SHARDMQ_LISTENER__TCP__EXTERNAL__BIND=127.0.0.1:1883; \
SHARDMQ_CONFIG and SHARDMQ_PROFILE stand for --config and --profile. Every key, its default and \
its EMQX name: docs/configuration.md.

By default the broker listens for MQTT on 0.0.0.0:1883, MQTT over WebSocket on \
0.0.0.0:8083 and the TCP gateway on 0.0.0.0:8090, with the admin API on 127.0.0.1:18083; clients without credentials are let in \
from this host only (auth.allow_anonymous = \"loopback\", docs/security.md).";

/// ShardMQ, an MQTT broker on a sharded thread-per-core runtime.
#[derive(Parser, Debug)]
#[command(name = "shardmq", version, long_version = LONG_VERSION, about, after_help = AFTER_HELP)]
struct Cli {
    /// TOML configuration file, on top of the compiled defaults.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Per-core profile: configs/profiles/NAME.toml (or the built-in one of that name).
    #[arg(long, value_name = "NAME")]
    profile: Option<String>,
    /// Directory of profiles.
    #[arg(long, value_name = "DIR")]
    profiles_dir: Option<PathBuf>,
    /// Port of the MQTT listener (listener.tcp.external), as with mosquitto -p.
    #[arg(long, short = 'p', value_name = "PORT")]
    port: Option<u16>,
    /// Address of the MQTT listener (listener.tcp.external.bind): IP:PORT or HOST:PORT, or an
    /// address alone (then with --port, or the configured port).
    #[arg(long, value_name = "ADDR")]
    bind: Option<String>,
    /// Print the effective configuration as TOML and exit (without checking this host's CPUs).
    #[arg(long)]
    print_config: bool,
    /// Check the configuration for this host (CPUs, memory lock limit, certificates, password
    /// and ACL files) and exit: 0 if the broker would start with it, 2 if not.
    #[arg(long, conflicts_with = "print_config")]
    check: bool,
    /// What to do instead of running the broker.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Talks to a running broker through its admin API (status, clients, subscriptions,
    /// routes, metrics, publish).
    Ctl(shardmq::ctl::CtlArgs),
    /// Adds or changes a user in a password file (auth.password_file), like mosquitto_passwd.
    /// The password is asked for twice on a terminal, read from one line of standard input
    /// otherwise, or given with --password.
    Passwd {
        /// The password file (created, mode 0600, if missing).
        file: PathBuf,
        /// The user.
        user: String,
        /// The password (visible in the process list and shell history: for scripts).
        #[arg(long, conflicts_with = "delete")]
        password: Option<String>,
        /// Removes the user instead.
        #[arg(long, short = 'D')]
        delete: bool,
    },
}

/// Reads a password: prompted twice on a terminal, else one line of standard input.
fn read_password(user: &str) -> Result<String, String> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(format!("Password for {user}: "))
            .map_err(|e| e.to_string())?;
        let again = rpassword::prompt_password("Again: ").map_err(|e| e.to_string())?;
        if first != again {
            return Err("the passwords differ".into());
        }
        Ok(first)
    } else {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }
}

/// `shardmq passwd`.
fn passwd(file: &std::path::Path, user: &str, password: Option<&str>, delete: bool) -> ExitCode {
    let password = match (delete, password) {
        (true, _) => None,
        (false, Some(p)) => Some(p.to_string()),
        (false, None) => match read_password(user) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("shardmq passwd: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    if password.as_deref().is_some_and(str::is_empty) {
        eprintln!("shardmq passwd: the password is empty");
        return ExitCode::FAILURE;
    }
    match shardmq::auth::password::set_user(file, user, password.as_deref()) {
        Ok(existed) => {
            let what = match (delete, existed) {
                (true, _) => "removed",
                (false, true) => "changed",
                (false, false) => "added",
            };
            eprintln!(
                "{user} {what} in {} (a running broker reads it again on SIGHUP)",
                file.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shardmq passwd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `shardmq ctl`: the configuration gives the API's address and credentials; with `--url`, a
/// configuration that does not load is no obstacle.
fn ctl(args: &shardmq::ctl::CtlArgs, cfg: Result<config::Config, config::ConfigError>) -> ExitCode {
    let cfg = match cfg {
        Ok(c) => Some(c),
        Err(_) if args.url.is_some() => None,
        Err(e) => {
            eprintln!("shardmq ctl: configuration error: {e} (or give --url)");
            return ExitCode::from(2);
        }
    };
    match shardmq::ctl::run(args, cfg.as_ref()) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shardmq ctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--bind` and `--port`: the default MQTT listener's address, over everything else.
fn apply_listener_flags(
    cfg: &mut config::Config,
    bind: Option<&str>,
    port: Option<u16>,
) -> Result<(), config::ConfigError> {
    if bind.is_none() && port.is_none() {
        return Ok(());
    }
    let flag = if bind.is_some() { "--bind" } else { "--port" };
    let invalid = |reason: String| config::ConfigError::Invalid {
        key: "listener.tcp.external.bind".into(),
        reason,
        origin: format!(" (from {flag})"),
    };
    let Some(l) = cfg.listener.tcp.get_mut("external") else {
        return Err(invalid(
            "the configuration has no listener.tcp.external to set".into(),
        ));
    };
    if let Some(b) = bind {
        // An address alone keeps the port (or takes --port).
        let addr = match b.parse::<std::net::IpAddr>() {
            Ok(ip) => std::net::SocketAddr::new(ip, l.bind.port()),
            Err(_) => config::values::parse_bind(b).map_err(invalid)?,
        };
        l.bind = addr;
    }
    if let Some(p) = port {
        l.bind.set_port(p);
    }
    l.enable = true;
    Ok(())
}

/// Turns transparent huge pages off for this process (unless `MIMALLOC_ALLOW_THP=1` asks to
/// keep them): with THP, mimalloc's sparse per-connection allocations are backed by 2 MiB
/// pages and RSS grows several times faster than the memory in use.
fn disable_transparent_huge_pages() {
    if std::env::var("MIMALLOC_ALLOW_THP").is_ok_and(|v| v == "1") {
        return;
    }
    // SAFETY: prctl(PR_SET_THP_DISABLE) only sets a flag on this process.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

fn main() -> ExitCode {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    if let Some(Command::Passwd {
        file,
        user,
        password,
        delete,
    }) = &cli.command
    {
        return passwd(file, user, password.as_deref(), *delete);
    }
    let loaded = config::load(&LoadOptions {
        config_file: cli.config.clone(),
        profile: cli.profile.clone(),
        profiles_dir: cli.profiles_dir.clone(),
        use_env: true,
    })
    .and_then(|mut l| {
        apply_listener_flags(&mut l.config, cli.bind.as_deref(), cli.port)?;
        Ok(l)
    });
    if let Some(Command::Ctl(args)) = &cli.command {
        return ctl(args, loaded.map(|l| l.config));
    }
    let loaded = match loaded {
        Ok(l) => {
            for w in &l.warnings {
                eprintln!("shardmq: warning: {w}");
            }
            l
        }
        Err(e) => {
            eprintln!("shardmq: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = loaded.config.clone();
    if cli.print_config {
        print!("{}", cfg.to_toml());
        return ExitCode::SUCCESS;
    }
    if let Err(e) = loaded.check_host() {
        eprintln!("shardmq: configuration error: {e}");
        return ExitCode::from(2);
    }
    if cli.check {
        return match shardmq::shard::runtime::check(&cfg) {
            Ok(summary) => {
                println!("configuration OK for this host: {summary}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("shardmq: configuration error: {e}");
                ExitCode::from(2)
            }
        };
    }
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cfg.log.level.clone());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Installed before the start so a signal during it is not lost (the default action would
    // kill the process instead of stopping it gracefully).
    let mut signals = match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("shardmq: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let handle = match shardmq::shard::start(&cfg) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("shardmq: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let flag = handle.shutdown_flag();
    let shards = handle.shards().clone();
    std::thread::spawn(move || {
        let mut stopping = false;
        for sig in signals.forever() {
            if sig == signal_hook::consts::SIGHUP {
                // Re-read the password file; the broker goes on either way.
                match shardmq::shard::runtime::reload_auth(&shards) {
                    Ok(()) => tracing::info!("SIGHUP: authentication reloaded"),
                    Err(e) => tracing::warn!(error = %e, "SIGHUP: nothing reloaded"),
                }
                continue;
            }
            if stopping {
                // A second signal ends the process at once.
                std::process::exit(130);
            }
            tracing::info!(signal = sig, "shutting down");
            flag.store(true, Ordering::Release);
            stopping = true;
        }
    });
    match handle.wait() {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shardmq: {e}");
            ExitCode::FAILURE
        }
    }
}

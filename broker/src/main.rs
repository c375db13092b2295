//! `shardmq`: runs the broker (default), prints the effective configuration, or talks to a
//! running broker (`shardmq ctl …`).

use clap::Parser;
use shardmq::config::{self, LoadOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// ShardMQ, an MQTT broker on a sharded thread-per-core runtime.
#[derive(Parser, Debug)]
#[command(name = "shardmq", version, about)]
struct Cli {
    /// TOML configuration file, on top of the compiled defaults.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Per-core profile: configs/profiles/NAME.toml (or the built-in one of that name).
    #[arg(long, short = 'p', value_name = "NAME")]
    profile: Option<String>,
    /// Directory of profiles.
    #[arg(long, value_name = "DIR")]
    profiles_dir: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
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
        config_file: cli.config,
        profile: cli.profile,
        profiles_dir: cli.profiles_dir,
        use_env: true,
    });
    if let Some(Command::Ctl(args)) = &cli.command {
        return ctl(args, loaded);
    }
    let cfg = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shardmq: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        print!("{}", cfg.to_toml());
        return ExitCode::SUCCESS;
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

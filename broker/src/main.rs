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
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, "shutting down");
            flag.store(true, Ordering::Release);
        }
        // A second signal ends the process at once.
        if signals.forever().next().is_some() {
            std::process::exit(130);
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

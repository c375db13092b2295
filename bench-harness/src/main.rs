//! `shardmq-bench`: drives any MQTT 3.1.1 broker with scenarios (`conn`, `pubsub`, or a list
//! from a TOML file), compares several brokers side by side, and provides the raw-TCP
//! forwarder baseline.

mod client;
mod forwarder;
mod net;
mod plot;
mod report;
mod runner;
mod scenario;
mod stats;
mod transport;

use clap::{Args, Parser, Subcommand};
use report::{Outcome, Report};
use runner::{RunOptions, Target};
use scenario::{ConnScenario, PubsubScenario, Scenario};
use std::io::IsTerminal;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What `--help` says after the options.
const AFTER_HELP: &str = concat!(
    "\
A pubsub run connects the subscribers, then the publishers, publishes for --warmup (not
measured: socket buffers, TCP windows and the broker's caches settle) and then for --duration
(measured), then waits up to --drain for messages still in flight: the default run takes
2 s + 10 s plus set-up and drain. Progress goes to stderr: one line redrawn on a terminal, a
line every 5 s otherwise (--quiet for none). The summary's columns:

",
    report::legend!(),
    "
Topics are bench/<run>/p2p/<i>, bench/<run>/fanout and bench/<run>/fanin/<i>, <run> a hex id
drawn for each run so that runs never see each other's messages."
);

/// Load generator and comparison tool for MQTT 3.1.1 brokers.
#[derive(Parser, Debug)]
#[command(name = "shardmq-bench", version, about, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    broker: String,
    /// Broker name in reports.
    #[arg(long, default_value = "broker")]
    broker_name: String,
    /// Broker process id: its RSS per connection (conn) or its peak RSS (pubsub) is reported.
    #[arg(long)]
    pid: Option<u32>,
    #[command(flatten)]
    load: Load,
    /// Write the JSON report(s) here (a file for one scenario, else a directory).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
struct Load {
    /// Load-generator threads (default: one per available CPU, or one per --cpus entry).
    #[arg(long)]
    threads: Option<usize>,
    /// Pin the load-generator threads to these CPUs (comma-separated).
    #[arg(long, value_delimiter = ',')]
    cpus: Option<Vec<usize>>,
    /// Loopback source addresses to spread connections over (0 = one per 20,000 connections).
    #[arg(long, default_value_t = 0)]
    sources: usize,
    /// No live progress even on a terminal.
    #[arg(long)]
    quiet: bool,
    /// What the connections travel over (give the broker's port for it).
    #[arg(long, value_enum, default_value_t = transport::Kind::Tcp)]
    transport: transport::Kind,
    /// PEM CA certificates to trust for --transport tls and wss.
    #[arg(long)]
    cafile: Option<PathBuf>,
    /// The name the broker's certificate must carry (tls, wss).
    #[arg(long, default_value = "localhost")]
    tls_name: String,
    /// The WebSocket request path (ws, wss).
    #[arg(long, default_value = "/mqtt")]
    ws_path: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Open connections at a target rate and hold them.
    Conn {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        sc: ConnScenario,
    },
    /// Publishers and subscribers: throughput, latency, loss and duplicates.
    Pubsub {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        sc: PubsubScenario,
    },
    /// Run the scenarios of a TOML file against one broker.
    Run {
        #[command(flatten)]
        common: Common,
        /// Scenario file.
        file: PathBuf,
    },
    /// Run the scenarios of a TOML file against several brokers, one after another, and print
    /// the comparison (markdown) with ratios to the first broker; JSON and SVG plots go to --out.
    Compare {
        /// Brokers as NAME=HOST:PORT[@PID], the first is the one compared to the others.
        #[arg(long = "target", required = true)]
        targets: Vec<String>,
        #[command(flatten)]
        load: Load,
        /// Directory for JSON reports, plots and comparison.md.
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// Scenario file.
        file: PathBuf,
    },
    /// The raw-limit baseline: copy bytes between paired sockets with no MQTT logic.
    Forwarder {
        /// Address to listen on (port 0 = a free port, printed on stdout).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Pin the threads to these CPUs.
        #[arg(long, value_delimiter = ',')]
        cpus: Option<Vec<usize>>,
    },
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))
}

fn run_options(load: &Load) -> Result<RunOptions, String> {
    let threads = load
        .threads
        .or(load.cpus.as_ref().map(|c| c.len()))
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    Ok(RunOptions {
        threads,
        cpus: load.cpus.clone(),
        sources: load.sources,
        progress: !load.quiet,
        transport: transport::ClientTransport::new(
            load.transport,
            load.cafile.as_deref(),
            &load.tls_name,
            &load.ws_path,
        )?,
    })
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn run_one(target: &Target, opts: &RunOptions, sc: &Scenario) -> Result<Report, String> {
    sc.validate()?;
    let started_at = now_unix();
    let outcome = match sc {
        Scenario::Conn(c) => Outcome::Conn(runner::run_conn(target, opts, c)?),
        Scenario::Pubsub(p) => Outcome::Pubsub(runner::run_pubsub(target, opts, p)?),
    };
    Ok(Report {
        tool: "shardmq-bench".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        broker: target.name.clone(),
        addr: target.addr.to_string(),
        transport: opts.transport.kind,
        pid: target.pid,
        scenario: sc.clone(),
        threads: opts.threads,
        cpus: opts.cpus.clone(),
        started_at,
        outcome,
    })
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn run_list(common: &Common, scenarios: Vec<Scenario>) -> Result<(), String> {
    let target = Target {
        name: common.broker_name.clone(),
        addr: resolve(&common.broker)?,
        pid: common.pid,
    };
    let opts = run_options(&common.load)?;
    let single = scenarios.len() == 1;
    let mut reports = Vec::new();
    for sc in &scenarios {
        let r = run_one(&target, &opts, sc)?;
        if let Some(out) = &common.out {
            let path = if single {
                out.clone()
            } else {
                out.join(format!("{}-{}.json", slug(sc.name()), slug(&target.name)))
            };
            write_json(&path, &r)?;
        }
        reports.push(r);
    }
    print!("{}", report::summary(&reports));
    println!();
    print!("{}", report::LEGEND);
    Ok(())
}

fn parse_target(t: &str) -> Result<Target, String> {
    let (name, rest) = t
        .split_once('=')
        .ok_or_else(|| format!("target {t:?}: expected NAME=HOST:PORT[@PID]"))?;
    let (addr, pid) = match rest.split_once('@') {
        Some((a, p)) => (
            a,
            Some(p.parse().map_err(|_| format!("target {t:?}: bad pid"))?),
        ),
        None => (rest, None),
    };
    Ok(Target {
        name: name.into(),
        addr: resolve(addr)?,
        pid,
    })
}

fn compare(targets: &[String], load: &Load, out: &Path, file: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let scenarios = scenario::parse_file(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let targets: Vec<Target> = targets
        .iter()
        .map(|t| parse_target(t))
        .collect::<Result<_, _>>()?;
    let opts = run_options(load)?;
    let mut reports = Vec::new();
    for sc in &scenarios {
        for t in &targets {
            if !load.quiet && !std::io::stderr().is_terminal() {
                eprintln!("running {} against {}", sc.name(), t.name);
            }
            let r = match run_one(t, &opts, sc) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("{} against {}: {e}", sc.name(), t.name);
                    continue;
                }
            };
            write_json(
                &out.join(format!("{}-{}.json", slug(sc.name()), slug(&t.name))),
                &r,
            )?;
            reports.push(r);
        }
        let these: Vec<&Report> = reports
            .iter()
            .filter(|r| r.scenario.name() == sc.name())
            .collect();
        if let Some(svg) = plot::throughput_svg(sc.name(), &these) {
            std::fs::write(out.join(format!("{}-throughput.svg", slug(sc.name()))), svg)
                .map_err(|e| e.to_string())?;
        }
        if let Some(svg) = plot::latency_svg(sc.name(), &these) {
            std::fs::write(out.join(format!("{}-latency.svg", slug(sc.name()))), svg)
                .map_err(|e| e.to_string())?;
        }
    }
    let md = report::comparison_markdown(&reports);
    std::fs::write(out.join("comparison.md"), &md).map_err(|e| e.to_string())?;
    write_json(&out.join("all.json"), &reports)?;
    print!("{}", report::summary(&reports));
    println!();
    print!("{}", report::LEGEND);
    println!();
    print!("{md}");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Conn { common, sc } => run_list(&common, vec![Scenario::Conn(sc)]),
        Cmd::Pubsub { common, sc } => run_list(&common, vec![Scenario::Pubsub(sc)]),
        Cmd::Run { common, file } => std::fs::read_to_string(&file)
            .map_err(|e| format!("{}: {e}", file.display()))
            .and_then(|t| scenario::parse_file(&t).map_err(|e| format!("{}: {e}", file.display())))
            .and_then(|s| run_list(&common, s)),
        Cmd::Compare {
            targets,
            load,
            out,
            file,
        } => compare(&targets, &load, &out, &file),
        Cmd::Forwarder {
            listen,
            threads,
            cpus,
        } => forwarder::run(listen, threads, cpus),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shardmq-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn targets_parse() {
        let t = parse_target("mosq=127.0.0.1:1883@42").unwrap();
        assert_eq!(
            (t.name.as_str(), t.addr.port(), t.pid),
            ("mosq", 1883, Some(42))
        );
        assert!(parse_target("nonsense").is_err());
        assert!(parse_target("x=127.0.0.1:1@pid").is_err());
    }
}

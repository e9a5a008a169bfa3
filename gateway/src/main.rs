//! The `watchpost` command: run the gateway, check a configuration, print the quickstart one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use watchpost::config::{self, ConfigError, Loaded};
use watchpost::query;
use watchpost::store::Reader;

/// Default log filter: Watchpost at info, the embedded broker and MQTT client only when
/// something is wrong.
const DEFAULT_LOG: &str = "info,rumqttd=warn,rumqttc=warn";

#[derive(Parser)]
#[command(
    name = "watchpost",
    version,
    about = "MQTT edge gateway for IoT sensor fleets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (without --config: the embedded quickstart configuration).
    Run {
        /// Configuration file, e.g. /etc/watchpost/watchpost.toml.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and report every problem with its line and column.
    Check {
        /// Configuration file to check.
        #[arg(long, short)]
        config: PathBuf,
        /// Treat warnings as errors.
        #[arg(long)]
        deny_warnings: bool,
    },
    /// Print the embedded quickstart configuration, a starting point for your own.
    DefaultConfig,
    /// List recorded alert transitions (works while the gateway runs).
    Alerts {
        /// Configuration file whose data_dir holds the database (default: the quickstart).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// How far back, e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        since: Duration,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the history of one device's metric: rollups, or raw readings with --raw.
    History {
        /// Configuration file whose data_dir holds the database (default: the quickstart).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Device id.
        #[arg(long)]
        device: String,
        /// Metric name.
        #[arg(long)]
        metric: String,
        /// How far back, e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        since: Duration,
        /// Raw readings (if history.raw_retention keeps them) instead of rollups.
        #[arg(long)]
        raw: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show each device's counters: messages, malformed input, and what its seq says was
    /// lost, duplicated or late; plus the outbox.
    Devices {
        /// Configuration file whose data_dir holds the database (default: the quickstart).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|_| format!("{s:?} is not a duration; write e.g. 30m, 24h or 7d"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(config),
        Command::Check {
            config,
            deny_warnings,
        } => check(&config, deny_warnings),
        Command::DefaultConfig => {
            print!("{}", config::QUICKSTART);
            ExitCode::SUCCESS
        }
        Command::Alerts {
            config,
            since,
            json,
        } => query(config, |r| {
            let records =
                r.alerts(watchpost::alert::now_millis().saturating_sub(since.as_millis() as u64))?;
            Ok(if json {
                query::json(&records)
            } else {
                query::alerts(&records)
            })
        }),
        Command::History {
            config,
            device,
            metric,
            since,
            raw,
            json,
        } => query(config, |r| {
            let from = watchpost::alert::now_millis().saturating_sub(since.as_millis() as u64);
            Ok(if raw {
                let records = r.readings(&device, &metric, from)?;
                if json {
                    query::json(&records)
                } else {
                    query::readings(&records)
                }
            } else {
                let records = r.rollups(&device, &metric, from)?;
                if json {
                    query::json(&records)
                } else {
                    query::rollups(&records)
                }
            })
        }),
        Command::Devices { config, json } => query(config, |r| {
            let records = r.devices()?;
            let (depth, oldest) = r.outbox()?;
            let jumps = (r.counter("cursor_jumps")?, r.counter("cursor_jump_lost")?);
            Ok(if json {
                let doc = serde_json::json!({
                    "devices": records,
                    "outbox": { "depth": depth, "oldest": oldest.map(watchpost::alert::rfc3339) },
                    "broker_cursor_jumps": jumps.0,
                    "broker_cursor_jump_lost": jumps.1,
                });
                query::json(&doc)
            } else {
                let oldest = oldest.map_or(String::new(), |t| {
                    format!(", oldest queued {}", watchpost::alert::rfc3339(t))
                });
                format!(
                    "{}\noutbox: {depth} waiting for the upstream{oldest}\nbroker read cursor jumps: {} ({} messages lost before ingest read them)\n",
                    query::devices(&records),
                    jumps.0,
                    jumps.1
                )
            })
        }),
    }
}

/// Runs a read-only query against the database of `config`'s data_dir and prints it.
fn query(path: Option<PathBuf>, run: impl FnOnce(&Reader) -> rusqlite::Result<String>) -> ExitCode {
    let loaded = match load(path.as_ref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let reader = match Reader::open(&loaded.config.gateway.data_dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("watchpost: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(&reader) {
        Ok(text) => {
            print!("{text}");
            if !text.ends_with('\n') {
                println!();
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("watchpost: cannot read the database: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: Option<&PathBuf>) -> Result<Loaded, ConfigError> {
    match path {
        Some(p) => config::load(p),
        None => config::quickstart(),
    }
}

fn run(path: Option<PathBuf>) -> ExitCode {
    init_logging();
    let loaded = match load(path.as_ref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("watchpost: the configuration has errors; nothing was started");
            return ExitCode::FAILURE;
        }
    };
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("watchpost: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let gateway = watchpost::start(loaded.config).await?;
        wait_for_signal().await;
        gateway.shutdown().await;
        Ok::<_, watchpost::StartError>(())
    });
    // Background threads of the embedded broker do not hold the process.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("watchpost: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            tracing::error!("cannot install signal handlers; stop the gateway with SIGKILL");
            return std::future::pending().await;
        }
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!("{name} received; shutting down");
}

fn check(path: &Path, deny_warnings: bool) -> ExitCode {
    match config::load(path) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                println!("{w}");
            }
            let rules = loaded.config.rules.len();
            if deny_warnings && !loaded.warnings.is_empty() {
                println!(
                    "{}: {} warning(s), denied by --deny-warnings",
                    path.display(),
                    loaded.warnings.len()
                );
                return ExitCode::FAILURE;
            }
            println!(
                "{}: OK ({rules} rule(s), {} warning(s))",
                path.display(),
                loaded.warnings.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{e}");
            println!("{}: {} error(s)", path.display(), e.errors.len());
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

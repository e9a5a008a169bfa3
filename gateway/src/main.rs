//! The `watchpost` command: run the gateway, check a configuration, print the quickstart one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use watchpost::config::{self, ConfigError, Loaded};

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

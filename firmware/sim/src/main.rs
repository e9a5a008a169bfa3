//! `watchpost-sim`: runs N simulated sensor nodes (the firmware's own logic over TCP) against a
//! gateway and reports what they sent.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// Simulate a fleet of Watchpost sensors against a gateway.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Number of devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Samples per second per device.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Probability per sample that a device starts an excursion above 90 °C.
    #[arg(long, default_value_t = 0.0, conflicts_with = "excursion_share")]
    anomaly: f64,
    /// Instead of --anomaly: the share of samples that fall inside an excursion (e.g. 0.001).
    #[arg(long, requires = "excursion_secs")]
    excursion_share: Option<f64>,
    /// With --excursion-share: shortest and longest excursion in seconds, e.g. 10-60.
    #[arg(long, value_parser = seconds_range, requires = "excursion_share")]
    excursion_secs: Option<(f64, f64)>,
    /// Metrics per device: 1 (temperature), 2 (and humidity) or 3 (and pressure, hPa).
    #[arg(long, default_value_t = 2)]
    metrics: usize,
    /// Send every sample of every metric (no report by exception).
    #[arg(long)]
    every_sample: bool,
    /// MQTT keep-alive in seconds.
    #[arg(long, default_value_t = 30)]
    keep_alive: u32,
    /// The gateway's MQTT listener. Give it more than once (or a comma-separated list) for a
    /// site with several gateways: a device moves to the next after a failed connect or a lost
    /// session.
    #[arg(
        long = "gateway",
        default_value = "127.0.0.1:1883",
        value_delimiter = ','
    )]
    gateways: Vec<SocketAddr>,
    /// Seconds a device waits for an answer from the gateway before its link counts as dead.
    #[arg(long, default_value_t = 5.0)]
    ack_timeout: f64,
    /// Give every device a leak probe that gets wet with this probability per sample (for as
    /// long as an excursion lasts); its state goes to sensors/{device}/water_leak.
    #[arg(long, default_value_t = 0.0)]
    leak: f64,
    /// Seconds between two reports of a leak probe's unchanged state.
    #[arg(long, default_value_t = 60.0)]
    leak_heartbeat: f64,
    /// Seconds of sampling.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds to wait afterwards for queued messages to be acknowledged.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    /// Device ids are PREFIX followed by a number.
    #[arg(long, default_value = "sim-")]
    prefix: String,
    /// Threads polling the devices.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seed for the signals, so runs can be repeated.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// `MIN-MAX` in seconds.
fn seconds_range(s: &str) -> Result<(f64, f64), String> {
    let (min, max) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?} is not MIN-MAX seconds, e.g. 10-60"))?;
    let number = |v: &str| {
        v.trim()
            .parse::<f64>()
            .map_err(|_| format!("{v:?} is not a number of seconds"))
    };
    Ok((number(min)?, number(max)?))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seconds = |s: f64, name: &str| {
        Duration::try_from_secs_f64(s)
            .map_err(|_| anyhow::anyhow!("--{name} must be a non-negative number of seconds"))
    };
    let first = *args
        .gateways
        .first()
        .ok_or_else(|| anyhow::anyhow!("give at least one --gateway"))?;
    let mut options = watchpost_sim::Options::new(first, args.devices);
    options.gateways = args.gateways;
    options.rate = args.rate;
    options.leak = args.leak;
    options.leak_heartbeat_ms = seconds(args.leak_heartbeat, "leak-heartbeat")?.as_millis() as u64;
    options.ack_timeout_ms = seconds(args.ack_timeout, "ack-timeout")?
        .as_millis()
        .try_into()
        .map_err(|_| anyhow::anyhow!("--ack-timeout is too long"))?;
    options.anomaly = args.anomaly;
    options.metrics = args.metrics;
    options.keep_alive_ms = args.keep_alive.saturating_mul(1000);
    if args.every_sample {
        options.every_sample();
    }
    if let (Some(share), Some((min, max))) = (args.excursion_share, args.excursion_secs) {
        options.excursions(
            share,
            seconds(min, "excursion-secs")?,
            seconds(max, "excursion-secs")?,
        )?;
    }
    options.duration = seconds(args.duration, "duration")?;
    options.drain = seconds(args.drain, "drain")?;
    options.prefix = args.prefix;
    options.threads = args.threads;
    options.seed = args.seed;
    let report = watchpost_sim::run(&options)?;
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
    Ok(())
}

//! `watchpost-bench`: Watchpost against a Mosquitto bridge, bare rumqttd and bare Mosquitto,
//! real processes over loopback, in one run that rewrites `BENCHMARKS.md`.
//!
//! ```sh
//! cargo run --release -p watchpost-e2e --bin watchpost-bench -- [--quick] [--runs N] [--out FILE]
//!     [--only PHASE,...]
//! ```
//!
//! It builds the release gateway and the simulator first (`cargo build --release -p
//! watchpost`, then `-p watchpost-sim`), runs the workloads ([`plant`], [`saturation`], its
//! mixed variant with a share of states and its variant with every reading retained,
//! [`fleet`], [`sessions`], [`retained`], [`churn`], the site [`pair`]) `--runs` times, writes every raw figure as JSON next
//! to the logs, and renders the tables ([`report`]). `--from-json` renders tables again from a
//! saved run without running anything. Helper modes (`flood`, `rumqttd`, `count-sub`) are this
//! binary started by itself as a separate process, so that load and counting never share a
//! process with the harness or with the system under test.
//!
//! | module | one job |
//! |---|---|
//! | [`setup`] | configurations and start of Watchpost, the bridge and bare Mosquitto |
//! | [`procs`] | child processes, `/proc` memory and CPU, `/metrics` |
//! | [`wire`] | just enough MQTT over blocking sockets for load and measurement clients |
//! | [`proxy`] | the byte-counting TCP proxy on the uplinks |
//! | [`flood`], [`peer`] | helper modes: load, bare rumqttd, a counting subscriber |
//! | [`probe`] | latency probes and the subscribers that time them |
//! | [`plant`], [`saturation`], [`fleet`], [`sessions`], [`retained`], [`churn`], [`pair`] | the workloads |
//! | [`stats`], [`report`] | percentiles and medians; the tables |

mod churn;
mod fleet;
mod flood;
mod pair;
mod peer;
mod plant;
mod probe;
mod procs;
mod proxy;
mod report;
mod retained;
mod saturation;
mod sessions;
mod setup;
mod stats;
mod wire;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::procs::Bins;
use crate::saturation::{Shape, System, Timing};

/// Benchmark Watchpost against a Mosquitto bridge, bare rumqttd and bare Mosquitto.
#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    helper: Option<Helper>,
    /// A short run for CI (2-3 minutes, one run, smaller fleets); its tables go next to its
    /// logs unless --out says otherwise.
    #[arg(long)]
    quick: bool,
    /// Runs of every workload; figures are medians over them (default: 3, quick: 1).
    #[arg(long)]
    runs: Option<usize>,
    /// Where to write the tables (default: BENCHMARKS.md at the workspace root, or with
    /// --quick beside the run's logs).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only these workloads (the others' figures show as "–").
    #[arg(long, value_delimiter = ',')]
    only: Vec<Phase>,
    /// Render the tables from a results.json of an earlier run instead of running.
    #[arg(long)]
    from_json: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Phase {
    Plant,
    Summary,
    Saturation,
    /// Saturation of Watchpost with a share of the readings states.
    Mixed,
    Overload,
    Latency,
    Fleet,
    /// Offline persistent sessions with queued messages: memory, and delivery on return.
    Sessions,
    /// Ten thousand retained messages: memory, disk, and delivery to a new `#` subscriber.
    Retained,
    /// Saturation (10 connections) of Watchpost and bare Mosquitto with every reading
    /// retained.
    RetainedSaturation,
    /// Distinct devices that each connect once, publish and leave: memory before, at the peak
    /// and after Watchpost forgot them (issue 21).
    Churn,
    /// Two gateways at one site (issue 22): saturation of gateway A of a pair beside a gateway
    /// alone, and the time B takes over when A is killed or frozen.
    Pair,
}

#[derive(Debug, Subcommand)]
enum Helper {
    /// (helper) Flood a broker: ADDR CONNS QOS RATE SECONDS DEVICES_PER_CONN [--states PERCENT]
    /// [--retain].
    #[command(hide = true)]
    Flood {
        addr: SocketAddr,
        conns: usize,
        qos: u8,
        rate: f64,
        seconds: f64,
        devices: usize,
        /// Per cent of the readings that are states.
        #[arg(long, default_value_t = 0)]
        states: u8,
        /// Every message with the retain flag set.
        #[arg(long)]
        retain: bool,
    },
    /// (helper) Bare rumqttd on 127.0.0.1:PORT with a counting in-process subscriber.
    #[command(hide = true)]
    Rumqttd { port: u16 },
    /// (helper) A counting subscriber: ADDR FILTER.
    #[command(hide = true)]
    CountSub { addr: SocketAddr, filter: String },
}

/// Sizes and durations of one invocation.
#[derive(Debug, Clone)]
pub struct Config {
    /// `--quick`.
    pub quick: bool,
    /// Runs.
    pub runs: usize,
    /// The plant.
    pub plant: plant::Plan,
    /// Summary measurement: interval and seconds.
    pub summary: (&'static str, f64),
    /// Saturation windows.
    pub timing: Timing,
    /// Connection counts of the saturation load.
    pub conns: [usize; 2],
    /// Per cent of the readings that are states in the mixed saturation load.
    pub mixed_states: u8,
    /// Connection counts of the mixed saturation load.
    pub mixed_conns: Vec<usize>,
    /// Seconds of QoS 1 overload.
    pub overload_s: f64,
    /// Connections of the QoS 1 overload.
    pub overload_conns: usize,
    /// Latency at half saturation: warm-up and probing.
    pub half: (Duration, Duration),
    /// Probe transitions per second.
    pub probe_rate: f64,
    /// The fleet at Watchpost.
    pub fleet: fleet::Plan,
    /// The fleet at the bare brokers (shorter window: memory is what they are compared on).
    pub fleet_peers: fleet::Plan,
    /// Offline persistent sessions and what is queued for them.
    pub sessions: sessions::Plan,
    /// Retained messages.
    pub retained: retained::Plan,
    /// Connection counts of the saturation load with every reading retained.
    pub retain_conns: Vec<usize>,
    /// Devices that come and go.
    pub churn: churn::Plan,
    /// Connection counts of the saturation load into a site pair and a gateway alone.
    pub pair_conns: Vec<usize>,
    /// The site pair's takeover.
    pub pair: pair::Plan,
}

impl Config {
    fn new(quick: bool, runs: Option<usize>) -> Config {
        let probe_rate = 20.0;
        // A third of the readings are temperatures: 0.3 % of them in an excursion puts about
        // 0.1 % of all readings across the overheat rule.
        let excursion_share = 0.003;
        let full = Config {
            quick: false,
            runs: runs.unwrap_or(3),
            plant: plant::Plan {
                devices: 1000,
                window: Duration::from_secs(300),
                probe: Duration::from_secs(90),
                probe_rate,
                excursion_share,
                seed: 1,
            },
            summary: ("10s", 25.0),
            timing: Timing {
                warm: Duration::from_secs(5),
                window: Duration::from_secs(10),
                drain: Duration::from_secs(60),
            },
            conns: [10, 100],
            mixed_states: saturation::MIXED_STATES,
            mixed_conns: vec![10, 100],
            overload_s: 10.0,
            overload_conns: 100,
            half: (Duration::from_secs(5), Duration::from_secs(30)),
            probe_rate,
            fleet: fleet::Plan {
                devices: 10_000,
                settle: Duration::from_secs(10),
                window: Duration::from_secs(60),
                seed: 1,
            },
            fleet_peers: fleet::Plan {
                devices: 10_000,
                settle: Duration::from_secs(5),
                window: Duration::from_secs(30),
                seed: 1,
            },
            sessions: sessions::Plan {
                sessions: 1000,
                messages: 100,
                payload: 64,
            },
            retained: retained::Plan { messages: 10_000 },
            retain_conns: vec![10],
            churn: churn::Plan {
                devices: 100_000,
                warm_up: 10_000,
                forget_after: "5s",
            },
            pair_conns: vec![10, 100],
            pair: pair::Plan {
                devices: 100,
                rate: 1.0,
                settle: Duration::from_secs(2),
                margin: Duration::from_secs(5),
                takeover_after: None,
                stops: vec![pair::Stop::Kill, pair::Stop::Freeze],
                // Past the catch-up horizon of two minutes, so that RSS has levelled off.
                memory: Some(Duration::from_secs(150)),
            },
        };
        if !quick {
            return full;
        }
        // The same workloads, smaller and shorter: every phase and peer, in minutes.
        let fleet = fleet::Plan {
            devices: 1000,
            settle: Duration::from_secs(1),
            window: Duration::from_secs(2),
            ..full.fleet
        };
        Config {
            quick: true,
            runs: runs.unwrap_or(1),
            plant: plant::Plan {
                devices: 300,
                window: Duration::from_secs(15),
                probe: Duration::from_secs(8),
                ..full.plant
            },
            summary: ("2s", 5.0),
            timing: Timing {
                warm: Duration::from_secs(1),
                window: Duration::from_secs(2),
                drain: Duration::from_secs(8),
            },
            // Mixed at 10 connections only: it shows that the step works.
            mixed_conns: vec![10],
            overload_s: 2.0,
            half: (Duration::from_secs(1), Duration::from_secs(3)),
            fleet_peers: fleet.clone(),
            fleet,
            sessions: sessions::Plan {
                sessions: 200,
                messages: 20,
                ..full.sessions
            },
            retained: retained::Plan { messages: 1000 },
            churn: churn::Plan {
                devices: 10_000,
                warm_up: 1000,
                forget_after: "2s",
            },
            // One takeover, killed, with a short takeover_after: it shows that the step works.
            pair_conns: vec![10],
            pair: pair::Plan {
                devices: 20,
                settle: Duration::from_secs(1),
                margin: Duration::from_secs(3),
                takeover_after: Some("2s"),
                stops: vec![pair::Stop::Kill],
                memory: None,
                ..full.pair
            },
            ..full
        }
    }

    /// The configuration as JSON, for the report.
    fn to_json(&self) -> Value {
        json!({
            "quick": self.quick,
            "runs": self.runs,
            "plant_devices": self.plant.devices,
            "plant_window_s": self.plant.window.as_secs_f64(),
            "plant_probe_s": self.plant.probe.as_secs_f64(),
            "excursion_share": self.plant.excursion_share,
            "summary_interval": self.summary.0,
            "summary_s": self.summary.1,
            "sat_warm_s": self.timing.warm.as_secs_f64(),
            "sat_window_s": self.timing.window.as_secs_f64(),
            "drain_s": self.timing.drain.as_secs_f64(),
            "conns": self.conns,
            "mixed_state_share": f64::from(self.mixed_states) / 100.0,
            "mixed_conns": self.mixed_conns,
            "overload_s": self.overload_s,
            "overload_conns": self.overload_conns,
            "half_warm_s": self.half.0.as_secs_f64(),
            "half_probe_s": self.half.1.as_secs_f64(),
            "probe_rate": self.probe_rate,
            "fleet_devices": self.fleet.devices,
            "fleet_window_s": self.fleet.window.as_secs_f64(),
            "fleet_peers_window_s": self.fleet_peers.window.as_secs_f64(),
            "sessions": self.sessions.sessions,
            "session_messages": self.sessions.messages,
            "session_payload_bytes": self.sessions.payload,
            "session_workers": sessions::WORKERS,
            "session_mosquitto_settle_s": sessions::MOSQUITTO_SETTLE.as_secs_f64(),
            "retained_messages": self.retained.messages,
            "retained_publishers": retained::PUBLISHERS,
            "retained_window": retained::WINDOW,
            "retained_bound": retained::BOUND,
            "retained_mosquitto_autosave_s": retained::MOSQUITTO_AUTOSAVE_S,
            "retain_conns": self.retain_conns,
            "churn_devices": self.churn.devices,
            "churn_warm_up": self.churn.warm_up,
            "churn_workers": churn::WORKERS,
            "churn_forget_after": self.churn.forget_after,
            "churn_settle_s": churn::SETTLE.as_secs_f64(),
            "pair": self.pair_json(),
        })
    }

    /// The site pair's part of the configuration.
    fn pair_json(&self) -> Value {
        json!({
            "conns": self.pair_conns,
            "devices": self.pair.devices,
            "rate": self.pair.rate,
            "settle_s": self.pair.settle.as_secs_f64(),
            "takeover_after": self.pair.takeover_after,
            "hold": pair::HOLD,
            "ack_timeout_s": pair::ACK_TIMEOUT.as_secs_f64(),
            "stops": self.pair.stops.iter().map(|s| s.name()).collect::<Vec<_>>(),
            "memory_s": self.pair.memory.map(|d| d.as_secs_f64()),
        })
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.helper {
        Some(Helper::Flood {
            addr,
            conns,
            qos,
            rate,
            seconds,
            devices,
            states,
            retain,
        }) => {
            return flood::main(flood::Flood {
                addr,
                conns,
                qos,
                rate,
                seconds,
                devices,
                states,
                retain,
                prefix: format!("flood{}-", std::process::id()),
            });
        }
        Some(Helper::Rumqttd { port }) => return peer::rumqttd_main(port),
        Some(Helper::CountSub { addr, filter }) => return peer::count_sub_main(addr, &filter),
        None => {}
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("the workspace root")?
        .to_owned();
    let (results, work) = match &cli.from_json {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let doc: Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a results file", path.display()))?;
            (doc, path.parent().unwrap_or(Path::new(".")).to_owned())
        }
        None => run_all(&cli, &root)?,
    };
    // A quick run's figures are not the project's: they go next to its logs.
    let quick = results["config"]["quick"].as_bool().unwrap_or(false);
    let out = cli.out.clone().unwrap_or_else(|| {
        if quick {
            work.join("BENCHMARKS.md")
        } else {
            root.join("BENCHMARKS.md")
        }
    });
    // Sections of BENCHMARKS.md that other benchmarks wrote are kept.
    let previous = std::fs::read_to_string(&out)
        .or_else(|_| std::fs::read_to_string(root.join("BENCHMARKS.md")))
        .unwrap_or_default();
    let text = report::render(&results, &previous);
    std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// Runs every workload `runs` times; returns the raw figures and the directory of the logs.
fn run_all(cli: &Cli, root: &Path) -> Result<(Value, PathBuf)> {
    let building = Instant::now();
    let config = Config::new(cli.quick, cli.runs);
    let wanted = |p: Phase| cli.only.is_empty() || cli.only.contains(&p);
    let bins = Bins::build()?;
    let build_s = building.elapsed().as_secs_f64();
    // The figures' time: from here, without building.
    let started = Instant::now();
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "-");
    let work = bins
        .bench
        .parent()
        .and_then(Path::parent)
        .context("target directory")?
        .join("watchpost-bench")
        .join(stamp);
    std::fs::create_dir_all(&work)?;
    eprintln!("logs and raw figures in {}", work.display());
    let mut command = format!(
        "cargo run --release -p watchpost-e2e --bin watchpost-bench --{}",
        if cli.quick { " --quick" } else { "" }
    );
    if let Some(n) = cli.runs {
        command.push_str(&format!(" --runs {n}"));
    }
    if !cli.only.is_empty() {
        let names: Vec<String> = cli
            .only
            .iter()
            .filter_map(|p| p.to_possible_value().map(|v| v.get_name().to_owned()))
            .collect();
        command.push_str(&format!(" --only {}", names.join(",")));
    }
    let mut doc = json!({
        "command": command,
        "machine": machine(&bins, root),
        "config": config.to_json(),
        "runs": [],
    });
    let save = |doc: &Value| -> Result<()> {
        std::fs::write(
            work.join("results.json"),
            serde_json::to_string_pretty(doc)?,
        )?;
        Ok(())
    };
    for run in 0..config.runs {
        let dir = work.join(format!("run-{}", run + 1));
        let mut result = json!({});
        // The one-minute load average as each step starts: whatever else ran on the machine.
        let loads = std::cell::RefCell::new(Vec::new());
        let step = |name: &str| {
            eprintln!("[{:>6.0?}] run {} {name}", started.elapsed(), run + 1);
            loads.borrow_mut().push(json!([name, loadavg()]));
        };
        if wanted(Phase::Plant) {
            step("plant");
            let mut plan = config.plant.clone();
            plan.seed = run as u64 + 1;
            result["plant"] = plant::run(&bins, &dir.join("plant"), &plan)?;
        }
        if wanted(Phase::Saturation) {
            let mut all = Vec::new();
            for conns in config.conns {
                for system in [System::Watchpost, System::Rumqttd, System::Mosquitto] {
                    step(&format!("saturation {} × {conns}", system.name()));
                    let d = dir.join(format!("saturation-{}-{conns}", system.name()));
                    all.push(saturation::saturate(
                        &bins,
                        &d,
                        system,
                        conns,
                        config.timing,
                        Shape::default(),
                    )?);
                }
            }
            result["saturation"] = json!(all);
        }
        if wanted(Phase::Mixed) {
            let mut all = Vec::new();
            for &conns in &config.mixed_conns {
                let states = config.mixed_states;
                step(&format!(
                    "saturation watchpost × {conns}, {states} % states"
                ));
                let d = dir.join(format!("saturation-mixed-watchpost-{conns}"));
                all.push(saturation::saturate(
                    &bins,
                    &d,
                    System::Watchpost,
                    conns,
                    config.timing,
                    Shape {
                        states,
                        retain: false,
                    },
                )?);
            }
            result["mixed"] = json!(all);
        }
        if wanted(Phase::RetainedSaturation) {
            let mut all = Vec::new();
            for &conns in &config.retain_conns {
                for system in [System::Watchpost, System::Mosquitto] {
                    step(&format!(
                        "saturation {} × {conns}, every reading retained",
                        system.name()
                    ));
                    let d = dir.join(format!("saturation-retained-{}-{conns}", system.name()));
                    let shape = Shape {
                        states: 0,
                        retain: true,
                    };
                    all.push(saturation::saturate(
                        &bins,
                        &d,
                        system,
                        conns,
                        config.timing,
                        shape,
                    )?);
                }
            }
            result["retained_saturation"] = json!(all);
        }
        if wanted(Phase::Overload) {
            let mut all = Vec::new();
            for system in [System::Watchpost, System::Rumqttd, System::Mosquitto] {
                step(&format!("QoS 1 overload {}", system.name()));
                let d = dir.join(format!("overload-{}", system.name()));
                all.push(saturation::overload(
                    &bins,
                    &d,
                    system,
                    config.overload_conns,
                    config.overload_s,
                    config.timing.drain,
                )?);
            }
            result["overload"] = json!(all);
        }
        if wanted(Phase::Latency) {
            let mut all = Vec::new();
            for system in [System::Watchpost, System::Rumqttd, System::Mosquitto] {
                // Half of what this system sustained in this run, whichever connection count
                // did best; without a saturation figure, a conservative fixed load.
                let best = result["saturation"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|s| s["system"] == system.name())
                    .filter_map(|s| s["rate"].as_f64())
                    .fold(0.0, f64::max);
                let rate = if best > 0.0 { best / 2.0 } else { 20_000.0 };
                step(&format!(
                    "latency {} at {rate:.0} readings/s",
                    system.name()
                ));
                all.push(saturation::half_latency(
                    &bins,
                    &dir.join(format!("half-saturation-{}", system.name())),
                    system,
                    rate,
                    config.half.0,
                    config.half.1,
                    config.probe_rate,
                )?);
            }
            result["half"] = json!(all);
        }
        if wanted(Phase::Fleet) {
            let mut all = Vec::new();
            for system in [System::Watchpost, System::Rumqttd, System::Mosquitto] {
                step(&format!("fleet {}", system.name()));
                let plan = if system == System::Watchpost {
                    &config.fleet
                } else {
                    &config.fleet_peers
                };
                let d = dir.join(format!("fleet-{}", system.name()));
                all.push(fleet::run(&bins, &d, system, plan)?);
            }
            result["fleet"] = json!(all);
        }
        if wanted(Phase::Sessions) {
            let mut all = Vec::new();
            for system in [System::Watchpost, System::Mosquitto] {
                step(&format!("sessions {}", system.name()));
                let d = dir.join(format!("sessions-{}", system.name()));
                all.push(sessions::run(&bins, &d, system, &config.sessions)?);
            }
            result["sessions"] = json!(all);
        }
        if wanted(Phase::Retained) {
            let mut all = Vec::new();
            for system in [System::Watchpost, System::Mosquitto] {
                step(&format!("retained {}", system.name()));
                let d = dir.join(format!("retained-{}", system.name()));
                all.push(retained::run(&bins, &d, system, &config.retained)?);
            }
            result["retained"] = json!(all);
        }
        if wanted(Phase::Churn) {
            let mut all = Vec::new();
            for system in [System::Watchpost, System::Mosquitto] {
                step(&format!("churn {}", system.name()));
                let d = dir.join(format!("churn-{}", system.name()));
                all.push(churn::run(&bins, &d, system, &config.churn)?);
            }
            result["churn"] = json!(all);
        }
        if wanted(Phase::Pair) {
            let mut saturation = Vec::new();
            for &conns in &config.pair_conns {
                step(&format!("saturation watchpost alone × {conns}"));
                let d = dir.join(format!("pair-saturation-alone-{conns}"));
                saturation.push(saturation::saturate(
                    &bins,
                    &d,
                    System::Watchpost,
                    conns,
                    config.timing,
                    Shape::default(),
                )?);
                step(&format!(
                    "saturation watchpost pair (A, B its peer) × {conns}"
                ));
                let d = dir.join(format!("pair-saturation-pair-{conns}"));
                saturation.push(saturation::saturate_pair(
                    &bins,
                    &d,
                    conns,
                    config.timing,
                    Shape::default(),
                )?);
            }
            let mut takeover = Vec::new();
            for &stop in &config.pair.stops {
                step(&format!(
                    "pair takeover, A stopped by {}, {} devices",
                    stop.name(),
                    config.pair.devices
                ));
                let d = dir.join(format!("pair-takeover-{}", stop.name()));
                takeover.push(pair::takeover(&bins, &d, &config.pair, stop)?);
            }
            let memory = match config.pair.memory {
                Some(seconds) => {
                    step("pair memory under the plant, beside a gateway alone");
                    let d = dir.join("pair-memory");
                    Some(pair::memory(&bins, &d, &config.plant, seconds)?)
                }
                None => None,
            };
            result["pair"] = json!({
                "saturation": saturation,
                "takeover": takeover,
                "memory": memory,
            });
        }
        result["load_at_steps"] = json!(loads.take());
        if let Some(list) = doc["runs"].as_array_mut() {
            list.push(result);
        }
        save(&doc)?;
    }
    if wanted(Phase::Summary) {
        eprintln!("[{:>6.0?}] summaries", started.elapsed());
        doc["summary"] = plant::summary(
            &bins,
            &work.join("summary"),
            &config.plant,
            config.summary.0,
            config.summary.1,
        )?;
    }
    doc["machine"]["load_after"] = json!(loadavg());
    doc["elapsed_s"] = json!(started.elapsed().as_secs_f64());
    doc["build_s"] = json!(build_s);
    save(&doc)?;
    eprintln!(
        "done in {:.0?}; raw figures in {}",
        started.elapsed(),
        work.join("results.json").display()
    );
    Ok((doc, work))
}

fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines().next().map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The version of `package` in the workspace's `Cargo.lock`.
fn locked_version(root: &Path, package: &str) -> String {
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).unwrap_or_default();
    let name = format!("name = \"{package}\"");
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == name {
            if let Some(v) = lines.next().and_then(|l| l.strip_prefix("version = ")) {
                return v.trim_matches('"').to_owned();
            }
        }
    }
    "unknown".into()
}

/// What the figures were measured on and with.
fn machine(bins: &Bins, root: &Path) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    // The tables this run rewrites do not make the build dirty.
    let dirty = !git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":!BENCHMARKS.md",
    ])
    .is_empty();
    let size = std::fs::metadata(&bins.watchpost).map_or(0, |m| m.len());
    let stripped = {
        let tmp = std::env::temp_dir().join(format!("watchpost-stripped-{}", std::process::id()));
        let ok = Command::new("strip")
            .arg("-o")
            .arg(&tmp)
            .arg(&bins.watchpost)
            .status()
            .is_ok_and(|s| s.success());
        let len = if ok {
            std::fs::metadata(&tmp).map_or(0, |m| m.len())
        } else {
            0
        };
        let _ = std::fs::remove_file(&tmp);
        len
    };
    json!({
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": model,
        "memory_gib": mem_kib as f64 / 1024.0 / 1024.0,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "rustc": first_line("rustc", &["--version"]),
        "mosquitto": setup::mosquitto_version(),
        "rumqttd": locked_version(root, "rumqttd"),
        "rumqttc": locked_version(root, "rumqttc"),
        "watchpost": first_line(&bins.watchpost.to_string_lossy(), &["--version"]),
        "commit": git(&["rev-parse", "--short=12", "HEAD"]),
        "dirty": dirty,
        "binary_bytes": size,
        "binary_stripped_bytes": stripped,
        "date": humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        "load_before": loadavg(),
    })
}

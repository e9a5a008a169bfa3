//! The fleet workload: many connected devices, one reading per minute each, long enough to
//! read the memory and CPU of the broker that holds them: Watchpost, and for comparison bare
//! rumqttd and bare Mosquitto with the same simulated devices.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::procs::{Bins, Proc, Usage};
use crate::saturation::{Running, System};

/// How the fleet runs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Devices.
    pub devices: usize,
    /// After the last device connected, before measuring.
    pub settle: Duration,
    /// The measured window.
    pub window: Duration,
    /// Seed of the signals.
    pub seed: u64,
}

/// Established TCP connections whose local end is `port`, from `/proc/net/tcp`: the broker's
/// side of every client connection.
pub fn established(port: u16) -> Result<usize> {
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    let local = format!(":{port:04X}");
    Ok(table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&local) && f[3] == "01"
        })
        .count())
}

/// Runs the fleet against `system` in `dir`.
pub fn run(bins: &Bins, dir: &Path, system: System, plan: &Plan) -> Result<Value> {
    let mut sut = Running::start(bins, dir, system, "")?;
    let (addr, pid) = (sut.addr, sut.pid);
    // Connections now: Watchpost's gauge, or the broker's established sockets (its counting
    // subscriber's among them).
    let connections = |sut: &Running| -> Result<usize> {
        Ok(match &sut.gateway {
            Some(gw) => gw.metrics()?.get("watchpost_connections") as usize,
            None => established(addr.port())?,
        })
    };
    let base = connections(&sut)?;
    let idle = Usage::of(pid)?;
    let connect_budget = Duration::from_secs(120);
    let seconds = (connect_budget + plan.settle + plan.window).as_secs_f64();
    let mut command = Command::new(&bins.sim);
    command.args([
        "--devices",
        &plan.devices.to_string(),
        "--rate",
        &(1.0f64 / 60.0).to_string(),
        "--metrics",
        "1",
        "--every-sample",
        "--keep-alive",
        "60",
        "--duration",
        &format!("{seconds:.0}"),
        "--drain",
        "1",
        "--gateway",
        &addr.to_string(),
        "--seed",
        &plan.seed.to_string(),
        "--prefix",
        "fleet-",
        "--json",
    ]);
    let mut sim = Proc::spawn("watchpost-sim", command, &dir.join("sim.log"))?;
    let started = Instant::now();
    loop {
        sim.check_alive()?;
        let connected = connections(&sut)?.saturating_sub(base);
        if connected >= plan.devices {
            break;
        }
        if started.elapsed() > connect_budget {
            bail!(
                "{connected} of {} devices connected to {} within {connect_budget:?}",
                plan.devices,
                system.name()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let connect_time = started.elapsed();
    // Fixed durations: settle, then the measured window.
    std::thread::sleep(plan.settle);
    let (c0, u0) = (sut.count()?, Usage::of(pid)?);
    std::thread::sleep(plan.window);
    let (c1, u1) = (sut.count()?, Usage::of(pid)?);
    sim.check_alive()?;
    let window = (u1.at - u0.at).as_secs_f64();
    let still = connections(&sut)?.saturating_sub(base);
    sim.stop();
    let startup_ms = sut
        .gateway
        .as_ref()
        .map(|g| g.startup.as_secs_f64() * 1000.0);
    if let Some(gw) = sut.gateway.as_mut() {
        gw.proc.stop();
    }
    Ok(json!({
        "system": system.name(),
        "devices": plan.devices,
        "connect_s": connect_time.as_secs_f64(),
        "connected_at_end": still,
        "window_s": window,
        "readings_rate": (c1 - c0) / window,
        "cores": u1.cores_since(&u0),
        "rss_kib": u1.rss_kib,
        "hwm_kib": u1.hwm_kib,
        "idle_rss_kib": idle.rss_kib,
        "startup_ms": startup_ms,
    }))
}

//! The plant workload: a site's devices, three metrics each, one reading per metric per
//! second, excursions as rare episodes; the same devices (same seed) at Watchpost and at a
//! Mosquitto that bridges everything upstream, side by side. Upstream bytes are counted on each
//! uplink's TCP connection by a proxy; then, with the plant still running, probes measure alert
//! latency at Watchpost and reading latency through the bridge, and after them leak probes the
//! latency of a state rule's alert at Watchpost.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::fleet;
use crate::probe::{self, Kind, Target, Watch};
use crate::procs::{Bins, Proc, Usage};
use crate::proxy::Proxy;
use crate::setup::{self, SITE};

/// How the plant runs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Devices.
    pub devices: usize,
    /// The window over which bytes, CPU and memory are measured.
    pub window: Duration,
    /// Probing after the window, plant still running: threshold probes, then as long again
    /// leak probes.
    pub probe: Duration,
    /// Probe transitions per second.
    pub probe_rate: f64,
    /// Share of temperature samples inside an excursion (a third of all readings are
    /// temperatures, so a third of this share of readings crosses the rule).
    pub excursion_share: f64,
    /// Seed of the simulated signals (the same at Watchpost and at the bridge).
    pub seed: u64,
}

/// Alert transitions of the plant's devices (not probes) seen on one subscription, as
/// (alert id, state).
#[derive(Default)]
struct Tally {
    seen: HashSet<(String, String)>,
}

impl Tally {
    fn count(&self, state: &str) -> usize {
        self.seen.iter().filter(|(_, s)| s == state).count()
    }
}

fn tally(t: &Mutex<Tally>, topic: &[u8], payload: &[u8]) {
    let alert = topic.starts_with(b"alerts/") || topic.windows(8).any(|w| w == b"/alerts/");
    if !alert || probe::probe_key(topic, payload).is_some() {
        return;
    }
    let Ok(doc) = serde_json::from_slice::<Value>(payload) else {
        return;
    };
    let (Some(id), Some(state)) = (doc["id"].as_str(), doc["state"].as_str()) else {
        return;
    };
    t.lock()
        .unwrap()
        .seen
        .insert((id.to_owned(), state.to_owned()));
}

/// A simulator process: the plant's devices against `gateway` for `seconds`.
pub fn sim(
    bins: &Bins,
    plan: &Plan,
    gateway: SocketAddr,
    seconds: f64,
    log: &Path,
) -> Result<Proc> {
    let mut command = Command::new(&bins.sim);
    command.args([
        "--devices",
        &plan.devices.to_string(),
        "--rate",
        "1",
        "--metrics",
        "3",
        "--every-sample",
        "--excursion-share",
        &plan.excursion_share.to_string(),
        "--excursion-secs",
        "10-60",
        "--duration",
        &format!("{seconds:.1}"),
        "--drain",
        "10",
        "--gateway",
        &gateway.to_string(),
        "--seed",
        &plan.seed.to_string(),
        "--prefix",
        "dev-",
        "--json",
    ]);
    Proc::spawn("watchpost-sim", command, log)
}

/// Waits until `condition` holds, at most `timeout`; says whether it held.
fn wait_for(timeout: Duration, condition: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Runs the plant once in `dir`; returns its figures as JSON.
pub fn run(bins: &Bins, dir: &Path, plan: &Plan) -> Result<Value> {
    std::fs::create_dir_all(dir)?;
    let upstream = setup::bare_mosquitto(&dir.join("upstream"))?;
    let wp_proxy = Proxy::start(upstream.addr)?;
    let br_proxy = Proxy::start(upstream.addr)?;
    let mut site = setup::bridge(&dir.join("site"), br_proxy.addr(), 1)?;
    let mut gw = setup::watchpost(
        bins,
        &dir.join("watchpost"),
        wp_proxy.addr(),
        None,
        setup::WATER_LEAK,
    )?;
    anyhow::ensure!(
        wait_for(Duration::from_secs(20), || br_proxy.snapshot().down > 0),
        "the bridge did not connect upstream within 20 s; its log:\n{}",
        site.proc.log_tail()
    );

    // Subscribers: alerts locally and upstream (tallied, and probe latencies), probe readings
    // at the site broker and bridged upstream, and everything the bridge delivers upstream.
    let stop = Arc::new(AtomicBool::new(false));
    let watches: Vec<Arc<Watch>> = (0..4).map(|_| Arc::default()).collect();
    let (local, up) = (
        Arc::new(Mutex::new(Tally::default())),
        Arc::new(Mutex::new(Tally::default())),
    );
    let mut threads = Vec::new();
    let upstream_alerts = format!("{SITE}/alerts/#");
    for (addr, id, filter, tally_into, watch) in [
        (gw.mqtt, "local-alerts", "alerts/#", &local, &watches[0]),
        (
            upstream.addr,
            "upstream-alerts",
            upstream_alerts.as_str(),
            &up,
            &watches[1],
        ),
    ] {
        let (t, w) = (tally_into.clone(), watch.clone());
        threads.push(probe::subscribe(
            addr,
            id,
            &[filter],
            stop.clone(),
            move |at, topic, payload| {
                if let Some(key) = probe::probe_key(topic, payload) {
                    w.received(key, at);
                } else {
                    tally(&t, topic, payload);
                }
            },
        )?);
    }
    // Plant devices publish all three metrics on `sensors/{device}`: only probes match this.
    let probe_filter = "sensors/+/temperature";
    for (addr, id, watch) in [
        (site.addr, "site-probes", &watches[2]),
        (upstream.addr, "upstream-probes", &watches[3]),
    ] {
        threads.push(probe::watch(
            addr,
            id,
            &[probe_filter],
            watch.clone(),
            stop.clone(),
        )?);
    }
    let bridged = Arc::new(AtomicU64::new(0));
    let counter = bridged.clone();
    threads.push(probe::subscribe(
        upstream.addr,
        "upstream-bridged",
        &["sensors/#"],
        stop.clone(),
        move |_, _, _| {
            counter.fetch_add(1, Ordering::Relaxed);
        },
    )?);

    // The plant: the same devices at both sites, from the same instant. The first seconds,
    // while 2 × devices connect, are left out of the window.
    let seconds = (plan.window + plan.probe * 2).as_secs_f64() + 5.0;
    let m_start = gw.metrics()?;
    // Connections before the devices come: the harness's own subscribers.
    let (gw_base, site_base) = (
        m_start.get("watchpost_connections"),
        fleet::established(site.addr.port())?,
    );
    let mut sim_wp = sim(bins, plan, gw.mqtt, seconds, &dir.join("sim-watchpost.log"))?;
    let mut sim_br = sim(bins, plan, site.addr, seconds, &dir.join("sim-bridge.log"))?;
    let connected = wait_for(Duration::from_secs(30), || {
        let at_watchpost = gw
            .metrics()
            .is_ok_and(|m| m.get("watchpost_connections") >= gw_base + plan.devices as f64);
        at_watchpost
            && fleet::established(site.addr.port()).is_ok_and(|n| n >= site_base + plan.devices)
    });
    anyhow::ensure!(
        connected,
        "the plant's devices did not all connect to Watchpost and the bridge within 30 s"
    );
    let (wp0, br0) = (wp_proxy.snapshot(), br_proxy.snapshot());
    let m0 = gw.metrics()?;
    let (g0, s0) = (Usage::of(gw.proc.pid())?, Usage::of(site.proc.pid())?);
    let mut peak_rss = 0;
    // The window runs for a fixed time; memory is sampled once a second meanwhile.
    while g0.at.elapsed() < plan.window {
        for p in [&mut gw.proc, &mut site.proc, &mut sim_wp, &mut sim_br] {
            p.check_alive()?;
        }
        peak_rss = peak_rss.max(Usage::of(gw.proc.pid())?.rss_kib);
        std::thread::sleep(Duration::from_secs(1).min(plan.window.saturating_sub(g0.at.elapsed())));
    }
    let (wp1, br1) = (wp_proxy.snapshot(), br_proxy.snapshot());
    let m1 = gw.metrics()?;
    let (g1, s1) = (Usage::of(gw.proc.pid())?, Usage::of(site.proc.pid())?);
    let window = (g1.at - g0.at).as_secs_f64();

    // Latency, the plant still running.
    let targets = [
        Target {
            addr: gw.mqtt,
            watches: vec![watches[0].clone(), watches[1].clone()],
        },
        Target {
            addr: site.addr,
            watches: vec![watches[2].clone(), watches[3].clone()],
        },
    ];
    let probes = probe::run(&targets, Kind::Threshold, plan.probe_rate, plan.probe)?;
    // Then leaks, at Watchpost only: at a broker a state is just another reading.
    let leaks = probe::run(&targets[..1], Kind::Leak, plan.probe_rate, plan.probe)?;

    let budget = Duration::from_secs_f64(seconds) + Duration::from_secs(60);
    let report_wp: Value = serde_json::from_str(sim_wp.wait_output(budget)?.trim())
        .context("the simulator's report (Watchpost)")?;
    let report_br: Value = serde_json::from_str(sim_br.wait_output(budget)?.trim())
        .context("the simulator's report (bridge)")?;
    // Every alert acknowledged upstream, then delivered to the subscriber.
    let m_end = gw.wait_metrics("the outbox drains", Duration::from_secs(60), |m| {
        m.get("watchpost_outbox_depth") == 0.0
    })?;
    wait_for(Duration::from_secs(10), || {
        up.lock().unwrap().seen.len() >= local.lock().unwrap().seen.len()
    });
    stop.store(true, Ordering::Relaxed);
    let (local, up) = (local.lock().unwrap(), up.lock().unwrap());
    let delivered = |state: &str| {
        local
            .seen
            .intersection(&up.seen)
            .filter(|(_, s)| s == state)
            .count()
    };
    let d = |name: &str| m1.sum(name) - m0.sum(name);
    let all = |name: &str| m_end.sum(name) - m_start.sum(name);
    let (wp, br) = (wp1.since(wp0), br1.since(br0));
    let readings = d("watchpost_readings_total");
    let result = json!({
        "devices": plan.devices,
        "window_s": window,
        "startup_ms": gw.startup.as_secs_f64() * 1000.0,
        "readings": readings,
        "readings_rate": readings / window,
        "messages": d("watchpost_messages_total"),
        "upstream_bytes": {
            "watchpost": wp.total(), "watchpost_up": wp.up, "watchpost_down": wp.down,
            "bridge": br.total(), "bridge_up": br.up, "bridge_down": br.down,
            "watchpost_own_count": d("watchpost_upstream_bytes_total"),
        },
        "bridged_messages_upstream": bridged.load(Ordering::Relaxed),
        "gateway": {
            "cores": g1.cores_since(&g0),
            "rss_kib": g1.rss_kib, "hwm_kib": g1.hwm_kib, "peak_rss_kib": peak_rss,
        },
        "bridge_broker": {
            "cores": s1.cores_since(&s0),
            "rss_kib": s1.rss_kib, "hwm_kib": s1.hwm_kib,
        },
        "alerts": {
            // Ground truth: every excursion a device started raises overheat once.
            "excursions": report_wp["excursions"],
            "raised_local": local.count("raised"),
            "cleared_local": local.count("cleared"),
            "raised_upstream": up.count("raised"),
            "cleared_upstream": up.count("cleared"),
            "raised_delivered": delivered("raised"),
            "cleared_delivered": delivered("cleared"),
        },
        // Over the whole run: readings the devices sent (every message acknowledged, if
        // `unsent` and `dropped` are 0 in the simulator's report) and the probes' against
        // readings ingest judged. Messages are not compared: devices also publish `online`
        // at QoS 0, and their wills `offline` when the simulator exits.
        "accounting": {
            "readings_sent": report_wp["values"].as_f64().unwrap_or(0.0) + (probes + leaks) as f64,
            "all_acked": report_wp["unsent"] == 0 && report_wp["dropped"] == 0,
            "readings_judged": all("watchpost_readings_total"),
            "dropped_counted": m_end.dropped_since(&m_start),
            "decode_errors": all("watchpost_decode_errors_total"),
            "seq_gaps": all("watchpost_seq_gap_messages_total"),
        },
        "sim_watchpost": report_wp,
        "sim_bridge": report_br,
        "latency": {
            "watchpost_local": watches[0].summary(Kind::Threshold),
            "watchpost_upstream": watches[1].summary(Kind::Threshold),
            "mosquitto_local": watches[2].summary(Kind::Threshold),
            "bridge_upstream": watches[3].summary(Kind::Threshold),
            "watchpost_leak_local": watches[0].summary(Kind::Leak),
            "watchpost_leak_upstream": watches[1].summary(Kind::Leak),
        },
    });
    drop(threads);
    gw.proc.stop();
    site.proc.stop();
    Ok(result)
}

/// The size of one summary: Watchpost with `[uplink.summaries]` every `interval`, the plant's
/// devices for `seconds`; the upstream subscriber keeps the size of every summary it receives.
/// A summary is one message per site and interval whatever the interval, so its size and the
/// plant's alert traffic give the upstream bytes with 15-minute summaries.
pub fn summary(
    bins: &Bins,
    dir: &Path,
    plan: &Plan,
    interval: &str,
    seconds: f64,
) -> Result<Value> {
    std::fs::create_dir_all(dir)?;
    let upstream = setup::bare_mosquitto(&dir.join("upstream"))?;
    let proxy = Proxy::start(upstream.addr)?;
    let mut gw = setup::watchpost(
        bins,
        &dir.join("watchpost"),
        proxy.addr(),
        Some(interval),
        "",
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::<(usize, usize)>::new()));
    let last = Arc::new(Mutex::new(String::new()));
    let (sink, text) = (seen.clone(), last.clone());
    let _thread = probe::subscribe(
        upstream.addr,
        "upstream-summaries",
        &[&format!("{SITE}/summaries")],
        stop.clone(),
        move |_, topic, payload| {
            sink.lock().unwrap().push((topic.len(), payload.len()));
            *text.lock().unwrap() = String::from_utf8_lossy(payload).into_owned();
        },
    )?;
    let b0 = proxy.snapshot();
    let mut sim = sim(bins, plan, gw.mqtt, seconds, &dir.join("sim.log"))?;
    sim.wait_output(Duration::from_secs_f64(seconds) + Duration::from_secs(60))?;
    gw.wait_metrics("the outbox drains", Duration::from_secs(30), |m| {
        m.get("watchpost_outbox_depth") == 0.0
    })?;
    wait_for(Duration::from_secs(5), || seen.lock().unwrap().len() >= 2);
    stop.store(true, Ordering::Relaxed);
    let b1 = proxy.snapshot();
    let seen = seen.lock().unwrap();
    // The largest: an interval in which every device and metric reported.
    let (topic, payload) = seen
        .iter()
        .max_by_key(|(_, p)| *p)
        .copied()
        .context("no summary arrived upstream")?;
    gw.proc.stop();
    let example = last.lock().unwrap().clone();
    Ok(json!({
        "interval": interval,
        "startup_ms": gw.startup.as_secs_f64() * 1000.0,
        "summaries": seen.len(),
        "topic_bytes": topic,
        "payload_bytes": payload,
        "mqtt_bytes": crate::wire::qos1_exchange_bytes(topic, payload),
        "example": example,
        "proxy_bytes_in_phase": b1.since(b0).total(),
    }))
}

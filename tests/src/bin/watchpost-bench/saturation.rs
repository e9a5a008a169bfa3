//! Saturation: as many readings per second as N connections can push (QoS 0), into Watchpost
//! (rules, rollups and the durable outbox on) and into bare rumqttd and bare Mosquitto, each
//! counted where it is consumed, into Watchpost again with a share of the readings states, and
//! with the retain flag set on every reading; QoS 1 overload, where every acknowledged reading
//! must be processed or counted as dropped; and alert latency (threshold and leak) at half of
//! Watchpost's saturation.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::peer::Counter;
use crate::probe::{self, Kind, Target, Watch};
use crate::procs::{self, Bins, Gateway, Metrics, Proc, Usage};
use crate::setup::{self, Broker, SITE};

/// Devices the flood stands for, over all connections.
pub const FLOOD_DEVICES: usize = 1000;

/// Per cent of the readings that are states in the mixed saturation load.
pub const MIXED_STATES: u8 = 20;

/// What the readings of a saturation load are, besides QoS 0 numbers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shape {
    /// Per cent of the readings that are doors' states.
    pub states: u8,
    /// Whether every reading has the retain flag set.
    pub retain: bool,
}

impl Shape {
    /// The rules Watchpost needs besides overheat: the door rule if there are states.
    fn rules(self) -> &'static str {
        if self.states > 0 {
            setup::DOOR_STATE
        } else {
            ""
        }
    }
}

/// Warm-up before a window, the window, and how long consumption may go on afterwards.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Load runs this long before measuring starts.
    pub warm: Duration,
    /// The measured window.
    pub window: Duration,
    /// After the load stops, how long to wait at most for the consumer to finish what is
    /// still queued (in the broker, or in socket buffers) before counting what never came.
    pub drain: Duration,
}

/// A system under load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// Watchpost: rules, rollups, durable outbox, uplink to a Mosquitto.
    Watchpost,
    /// Bare rumqttd 0.20 with an in-process counting subscriber.
    Rumqttd,
    /// Bare Mosquitto with one counting subscriber.
    Mosquitto,
}

impl System {
    /// Its name in tables.
    pub fn name(self) -> &'static str {
        match self {
            System::Watchpost => "watchpost",
            System::Rumqttd => "rumqttd",
            System::Mosquitto => "mosquitto",
        }
    }
}

/// A started system: where to send load and how to count what it consumed. Its processes
/// stop when it is dropped.
pub struct Running {
    /// Where devices connect.
    pub addr: SocketAddr,
    /// The process whose CPU and memory are measured.
    pub pid: u32,
    /// Watchpost, if that is the system (gateway A of a pair).
    pub gateway: Option<Gateway>,
    /// Gateway B, when Watchpost runs as a site pair: the peer A mirrors to.
    pub peer: Option<Gateway>,
    counter: Option<Counter>,
    /// Watchpost's upstream broker.
    pub upstream: Option<Broker>,
    _broker: Option<Broker>,
}

impl Running {
    /// Starts `system` with its files in `dir`: Watchpost with an upstream Mosquitto and
    /// `rules` besides overheat (see [`setup::watchpost_config`]), bare rumqttd with its
    /// counting link, or bare Mosquitto with a counting subscriber.
    pub fn start(bins: &Bins, dir: &Path, system: System, rules: &str) -> Result<Running> {
        std::fs::create_dir_all(dir)?;
        Ok(match system {
            System::Watchpost => {
                let upstream = setup::bare_mosquitto(&dir.join("upstream"))?;
                let gw =
                    setup::watchpost(bins, &dir.join("watchpost"), upstream.addr, None, rules)?;
                Running {
                    addr: gw.mqtt,
                    pid: gw.proc.pid(),
                    gateway: Some(gw),
                    peer: None,
                    counter: None,
                    upstream: Some(upstream),
                    _broker: None,
                }
            }
            System::Rumqttd => {
                let (counter, addr) = Counter::rumqttd(bins, &dir.join("rumqttd.log"))?;
                Running {
                    addr,
                    pid: counter.proc.pid(),
                    gateway: None,
                    peer: None,
                    counter: Some(counter),
                    upstream: None,
                    _broker: None,
                }
            }
            System::Mosquitto => {
                let broker = setup::bare_mosquitto(&dir.join("mosquitto"))?;
                let counter = Counter::subscriber(
                    bins,
                    broker.addr,
                    "sensors/#",
                    &dir.join("subscriber.log"),
                )?;
                Running {
                    addr: broker.addr,
                    pid: broker.proc.pid(),
                    gateway: None,
                    peer: None,
                    counter: Some(counter),
                    upstream: None,
                    _broker: Some(broker),
                }
            }
        })
    }

    /// Watchpost as gateway A of a site pair with its files in `dir`: B its peer, both with
    /// an uplink to the same upstream Mosquitto and `rules` besides overheat, A where devices
    /// connect (see [`setup::pair`]).
    pub fn pair(bins: &Bins, dir: &Path, rules: &str) -> Result<Running> {
        std::fs::create_dir_all(dir)?;
        let upstream = setup::bare_mosquitto(&dir.join("upstream"))?;
        let setup::Pair { a, b } = setup::pair(bins, dir, upstream.addr, rules, None)?;
        Ok(Running {
            addr: a.mqtt,
            pid: a.proc.pid(),
            gateway: Some(a),
            peer: Some(b),
            counter: None,
            upstream: Some(upstream),
            _broker: None,
        })
    }

    /// Readings consumed so far: processed by Watchpost, or counted by the subscriber.
    pub fn count(&mut self) -> Result<f64> {
        if let Some(gw) = &mut self.gateway {
            gw.proc.check_alive()?;
            return Ok(gw.metrics()?.sum("watchpost_readings_total"));
        }
        let counter = self
            .counter
            .as_mut()
            .context("a bare broker without its counter")?;
        Ok(counter.count()? as f64)
    }

    /// Waits until the count stops rising (1 s without change), at most `max`; returns the
    /// count and whether it did stop.
    fn settle(&mut self, max: Duration) -> Result<(f64, bool)> {
        settle(max, || self.count())
    }

    /// Readings gateway B of a pair has judged so far (its own clients' and A's mirrored).
    fn peer_count(&mut self) -> Result<Option<f64>> {
        let Some(b) = &mut self.peer else {
            return Ok(None);
        };
        b.proc.check_alive()?;
        Ok(Some(b.metrics()?.sum("watchpost_readings_total")))
    }
}

/// Waits until `count` stops rising (1 s without change), at most `max`; returns the count and
/// whether it did stop.
fn settle(max: Duration, mut count: impl FnMut() -> Result<f64>) -> Result<(f64, bool)> {
    let deadline = Instant::now() + max;
    let mut last = count()?;
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = count()?;
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_secs(1) {
            return Ok((now, true));
        }
        if Instant::now() >= deadline {
            return Ok((now, false));
        }
    }
}

/// A flood process, connected and waiting for the word.
struct Flooder {
    proc: Proc,
    stdin: std::process::ChildStdin,
}

impl Flooder {
    #[allow(clippy::too_many_arguments)]
    fn start(
        bins: &Bins,
        addr: SocketAddr,
        conns: usize,
        qos: u8,
        rate: f64,
        seconds: f64,
        shape: Shape,
        log: &Path,
    ) -> Result<Flooder> {
        let mut args = vec![
            "flood".to_owned(),
            addr.to_string(),
            conns.to_string(),
            qos.to_string(),
            format!("{rate:.0}"),
            format!("{seconds:.2}"),
            (FLOOD_DEVICES / conns).max(1).to_string(),
            format!("--states={}", shape.states),
        ];
        if shape.retain {
            args.push("--retain".to_owned());
        }
        let mut proc = procs::helper(bins, "flood", &args, log)?;
        let stdin = proc.stdin().context("stdin")?;
        let (_, reader) = procs::wait_ready(&mut proc, Duration::from_secs(60))?;
        // The report comes on stdout after the run: hand the reader back.
        proc.give_stdout(reader);
        Ok(Flooder { proc, stdin })
    }

    fn go(&mut self) -> Result<()> {
        writeln!(self.stdin)?;
        Ok(self.stdin.flush()?)
    }

    fn report(mut self, timeout: Duration) -> Result<Value> {
        let out = self.proc.wait_output(timeout)?;
        let last = out.lines().last().unwrap_or_default();
        serde_json::from_str(last).with_context(|| format!("the flood's report: {out:?}"))
    }
}

/// Saturates `system` with `conns` QoS 0 connections; returns the figures of one window.
/// `shape.states` per cent of the readings are doors' states, judged at Watchpost by
/// [`setup::DOOR_STATE`]; with `shape.retain` every reading is retained. The default shape
/// is numbers only, not retained: the saturation step as it always was.
pub fn saturate(
    bins: &Bins,
    dir: &Path,
    system: System,
    conns: usize,
    timing: Timing,
    shape: Shape,
) -> Result<Value> {
    let sut = Running::start(bins, dir, system, shape.rules())?;
    measure(bins, dir, sut, system.name(), conns, timing, shape)
}

/// Name of Watchpost as gateway A of a site pair in the figures.
pub const PAIR: &str = "watchpost-pair";

/// [`saturate`] for Watchpost as gateway A of a site pair ([`Running::pair`]): the load goes
/// to A, which mirrors every reading to B; the figure is what A judged, and B's share of the
/// work is reported beside it.
pub fn saturate_pair(
    bins: &Bins,
    dir: &Path,
    conns: usize,
    timing: Timing,
    shape: Shape,
) -> Result<Value> {
    let sut = Running::pair(bins, dir, shape.rules())?;
    measure(bins, dir, sut, PAIR, conns, timing, shape)
}

/// The saturation measurement of a started system, named `name` in the figures.
fn measure(
    bins: &Bins,
    dir: &Path,
    mut sut: Running,
    name: &str,
    conns: usize,
    timing: Timing,
    shape: Shape,
) -> Result<Value> {
    let seconds = (timing.warm + timing.window).as_secs_f64() + 1.0;
    let mut flood = Flooder::start(
        bins,
        sut.addr,
        conns,
        0,
        0.0,
        seconds,
        shape,
        &dir.join("flood.log"),
    )?;
    let (c_start, m_start) = (
        sut.count()?,
        sut.gateway.as_ref().map(|g| g.metrics()).transpose()?,
    );
    let b_start = sut.peer_count()?;
    flood.go()?;
    // The load runs for fixed durations: warm-up, then the window.
    std::thread::sleep(timing.warm);
    let (c0, u0) = (sut.count()?, Usage::of(sut.pid)?);
    let b0 = peer_sample(&mut sut)?;
    // The load's CPU and the whole machine's: what else ran besides the system under test.
    let (f0, all0) = (Usage::of(flood.proc.pid())?, procs::machine_cpu_seconds()?);
    std::thread::sleep(timing.window);
    let (c1, u1) = (sut.count()?, Usage::of(sut.pid)?);
    let b1 = peer_sample(&mut sut)?;
    let (f1, all1) = (Usage::of(flood.proc.pid())?, procs::machine_cpu_seconds()?);
    let machine_cores = (all1 - all0) / (f1.at - f0.at).as_secs_f64();
    // A's mirror backlog as the window ends: how far B is behind.
    let a1 = match (&b1, &sut.gateway) {
        (Some(_), Some(a)) => Some(a.metrics()?),
        _ => None,
    };
    let report = flood.report(Duration::from_secs(60))?;
    let window = (u1.at - u0.at).as_secs_f64();
    // QoS 0 has no acknowledgement, but what was sent and never consumed is worth knowing.
    let (settled_at, settled) = sut.settle(timing.drain)?;
    let consumed = settled_at - c_start;
    let m_end = sut.gateway.as_ref().map(|g| g.metrics()).transpose()?;
    let dropped = match (&m_start, &m_end) {
        (Some(a), Some(b)) => Some(b.dropped_since(a)),
        _ => None,
    };
    let mut out = json!({
        "system": name,
        "conns": conns,
        "state_share": f64::from(shape.states) / 100.0,
        "retain": shape.retain,
        "rate": (c1 - c0) / window,
        "window_s": window,
        "offered": report["sent"].as_f64().unwrap_or(0.0) / report["seconds"].as_f64().unwrap_or(1.0),
        "flood": report,
        "cores": u1.cores_since(&u0),
        "load_cores": f1.cores_since(&f0),
        "machine_cores": machine_cores,
        "rss_kib": u1.rss_kib,
        "hwm_kib": u1.hwm_kib,
        "consumed_in_all": consumed,
        "settled": settled,
        "sent_not_consumed": report["sent"].as_f64().unwrap_or(0.0) - consumed,
        "dropped_counted": dropped,
        "startup_ms": sut.gateway.as_ref().map(|g| g.startup.as_secs_f64() * 1000.0),
    });
    if let (Some(b_start), Some((b0, v0, _)), Some((b1, v1, m1))) = (b_start, b0, b1) {
        // B goes on judging what A mirrored after A is done: until its count settles too.
        let (b_settled_at, b_settled) =
            settle(timing.drain, || Ok(sut.peer_count()?.unwrap_or_default()))?;
        // A's mirror counters once B has settled: A may still be sending its backlog after
        // its own count stopped.
        let (a_end, b_end) = (
            sut.gateway
                .as_ref()
                .map(|a| a.metrics())
                .transpose()?
                .unwrap_or_default(),
            sut.peer
                .as_ref()
                .map(|b| b.metrics())
                .transpose()?
                .unwrap_or_default(),
        );
        let (a_start, wall) = (m_start.unwrap_or_default(), (v1.at - v0.at).as_secs_f64());
        out["peer"] = json!({
            "rate": (b1 - b0) / wall,
            "cores": v1.cores_since(&v0),
            "rss_kib": v1.rss_kib,
            "judged_in_all": b_settled_at - b_start,
            "settled": b_settled,
            "mirror_dropped": a_end.sum("watchpost_peer_mirror_dropped_total")
                - a_start.sum("watchpost_peer_mirror_dropped_total"),
            "entries_sent": a_end.sum("watchpost_peer_entries_sent_total")
                - a_start.sum("watchpost_peer_entries_sent_total"),
            "entries_received": b_end.sum("watchpost_peer_entries_received_total"),
            // Entries B never received, by their numbers.
            "entries_gap": b_end.sum("watchpost_peer_entries_gap_total"),
            "entries_duplicate": b_end.sum("watchpost_peer_entries_duplicate_total"),
            "lag_at_window_end_s": m1.get("watchpost_peer_lag_seconds"),
            "backlog_bytes_at_window_end": a1.as_ref().map(|m| m.get("watchpost_peer_backlog_bytes")),
            "catchup_bytes_at_window_end": a1.as_ref().map(|m| m.get("watchpost_peer_catchup_bytes")),
            "mirror_queue_at_window_end": a1.as_ref().map(|m| m.get("watchpost_peer_mirror_queue")),
        });
        // The pair's CPU: both processes over the same window.
        out["pair_cores"] = json!(u1.cores_since(&u0) + v1.cores_since(&v0));
    }
    Ok(out)
}

/// Gateway B's count, CPU and memory, and its `/metrics`, at one moment (`None` without a
/// pair).
fn peer_sample(sut: &mut Running) -> Result<Option<(f64, Usage, Metrics)>> {
    let Some(count) = sut.peer_count()? else {
        return Ok(None);
    };
    let b = sut.peer.as_ref().context("a pair without B")?;
    Ok(Some((count, Usage::of(b.proc.pid())?, b.metrics()?)))
}

/// QoS 1 overload: `conns` connections publish QoS 1 as fast as acknowledgements come, for
/// `seconds`; afterwards, what was acknowledged is compared with what was consumed and, for
/// Watchpost, with what `/metrics` counts as dropped.
pub fn overload(
    bins: &Bins,
    dir: &Path,
    system: System,
    conns: usize,
    seconds: f64,
    drain: Duration,
) -> Result<Value> {
    let mut sut = Running::start(bins, dir, system, "")?;
    let m0 = sut.gateway.as_ref().map(|g| g.metrics()).transpose()?;
    let c0 = sut.count()?;
    let mut flood = Flooder::start(
        bins,
        sut.addr,
        conns,
        1,
        0.0,
        seconds,
        Shape::default(),
        &dir.join("flood.log"),
    )?;
    flood.go()?;
    let report = flood.report(Duration::from_secs_f64(seconds) + Duration::from_secs(60))?;
    let acked = report["acked"].as_f64().unwrap_or(0.0);
    let (settled_at, settled) = sut.settle(drain)?;
    let consumed = settled_at - c0;
    let mut out = json!({
        "system": system.name(),
        "conns": conns,
        "seconds": seconds,
        "flood": report,
        "acked": acked,
        "consumed": consumed,
        "settled": settled,
    });
    if let (Some(m0), Some(gw)) = (m0, sut.gateway.as_mut()) {
        let m1 = gw.metrics()?;
        let d = |n: &str| m1.sum(n) - m0.sum(n);
        let dropped = m1.dropped_since(&m0);
        let refused = d("watchpost_rate_limited_total") + d("watchpost_publish_denied_total");
        out["watchpost"] = json!({
            "messages": d("watchpost_messages_total"),
            "readings": d("watchpost_readings_total"),
            "dropped_counted": dropped,
            "dropped_families": m1.dropped().into_iter().map(|(k, _)| k).collect::<Vec<_>>(),
            "refused_counted": refused,
            "decode_errors": d("watchpost_decode_errors_total"),
            // Acknowledged, and neither taken by ingest nor counted anywhere.
            "silently_lost": acked - d("watchpost_messages_total") - dropped - refused,
            "startup_ms": gw.startup.as_secs_f64() * 1000.0,
        });
        let log = std::fs::read_to_string(dir.join("watchpost").join("watchpost.log"))
            .unwrap_or_default();
        out["watchpost"]["log_lines_about_loss"] = json!(
            log.lines()
                .filter(|l| l.contains("dropped") || l.contains("lost"))
                .count()
        );
    }
    Ok(out)
}

/// Latency under a steady QoS 0 load of `rate` readings/s on 10 connections into `system`:
/// after `warm`, probes raise and clear overheat `probe_rate` times a second for `probe`. At
/// Watchpost that is alert latency (to `alerts/#` locally and to the upstream subscriber),
/// followed by as long of leak probes (the `water-leak` state rule); at a bare broker, the
/// probes' readings to a subscriber of their topics.
pub fn half_latency(
    bins: &Bins,
    dir: &Path,
    system: System,
    rate: f64,
    warm: Duration,
    probe: Duration,
    probe_rate: f64,
) -> Result<Value> {
    if rate.is_nan() || rate <= 0.0 {
        bail!("no saturation rate to take half of");
    }
    let mut sut = Running::start(bins, dir, system, setup::WATER_LEAK)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (near, far) = (Arc::new(Watch::default()), Arc::new(Watch::default()));
    let mut threads = Vec::new();
    match (&sut.gateway, &sut.upstream) {
        (Some(gw), Some(upstream)) => {
            threads.push(probe::watch(
                gw.mqtt,
                "local-alerts",
                &["alerts/#"],
                near.clone(),
                stop.clone(),
            )?);
            threads.push(probe::watch(
                upstream.addr,
                "upstream-alerts",
                &[&format!("{SITE}/alerts/#")],
                far.clone(),
                stop.clone(),
            )?);
        }
        _ => {
            let topics = probe::reading_topics(Kind::Threshold);
            let filters: Vec<&str> = topics.iter().map(String::as_str).collect();
            threads.push(probe::watch(
                sut.addr,
                "probe-readings",
                &filters,
                near.clone(),
                stop.clone(),
            )?);
        }
    }
    // At Watchpost the load goes on while the leak probes follow.
    let probing = if sut.gateway.is_some() { 2 } else { 1 };
    let seconds = (warm + probe * probing).as_secs_f64() + 3.0;
    let log = dir.join("flood.log");
    let mut flood = Flooder::start(bins, sut.addr, 10, 0, rate, seconds, Shape::default(), &log)?;
    flood.go()?;
    // The load runs for a fixed warm-up before probing.
    std::thread::sleep(warm);
    let (c0, u0) = (sut.count()?, Usage::of(sut.pid)?);
    let mut watches = vec![near.clone()];
    if sut.gateway.is_some() {
        watches.push(far.clone());
    }
    let target = [Target {
        addr: sut.addr,
        watches,
    }];
    probe::run(&target, Kind::Threshold, probe_rate, probe)?;
    let (c1, u1) = (sut.count()?, Usage::of(sut.pid)?);
    if sut.gateway.is_some() {
        probe::run(&target, Kind::Leak, probe_rate, probe)?;
    }
    flood.report(Duration::from_secs(60))?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(threads);
    let window = (u1.at - u0.at).as_secs_f64();
    let mut out = json!({
        "system": system.name(),
        "offered_rate": rate,
        "rate": (c1 - c0) / window,
        "cores": u1.cores_since(&u0),
    });
    if let Some(gw) = sut.gateway.as_mut() {
        gw.proc.check_alive()?;
        out["startup_ms"] = json!(gw.startup.as_secs_f64() * 1000.0);
        out["latency_local"] = near.summary(Kind::Threshold);
        out["latency_upstream"] = far.summary(Kind::Threshold);
        out["latency_leak_local"] = near.summary(Kind::Leak);
        out["latency_leak_upstream"] = far.summary(Kind::Leak);
        gw.proc.stop();
    } else {
        out["latency_subscriber"] = near.summary(Kind::Threshold);
    }
    Ok(out)
}

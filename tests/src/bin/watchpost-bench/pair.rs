//! Two gateways at one site (issue 22): what the site pair costs and how fast B takes over.
//!
//! The cost is the saturation step run against gateway A of a pair (B its peer, both release
//! processes on this machine; [`saturation::saturate_pair`]) beside a gateway alone, in the
//! same run. The takeover is measured here: A and B with an uplink each to one upstream
//! Mosquitto, a fleet of simulated devices (`watchpost-sim`, the firmware's own session and
//! its list of gateways) that know A, then B, and publish to A at QoS 1, and two probe devices
//! of the harness on A:
//!
//! - `probe-held` published a coolant temperature above the `coolant-held` rule's bound
//!   (`for` [`HOLD`]) just before A stops: A and B both have it (its PUBACK says so), neither
//!   has raised it. It sends nothing more: B raises it when its deadline is due on B's own
//!   clock, which B takes up only once A has been silent for `peer.takeover_after`.
//! - `probe-mover` publishes one reading after A stops, waits for its PUBACK as long as the
//!   simulated devices do ([`ACK_TIMEOUT`]), and on the first sign that A is gone (the socket
//!   closed, or no PUBACK in time) connects to B at once and publishes a temperature that
//!   raises `overheat` there (no `for`); then a few more readings, one in flight, each timed to
//!   its PUBACK.
//!
//! A is then stopped in one of two ways ([`Stop`]): SIGKILL (the process dies; the kernel
//! closes its sockets, and every client sees it at once), or SIGSTOP (the process no longer
//! answers, its sockets stay open: a hung or powered-off box, which clients find out only by
//! their own timeouts). From that instant: when each device said `online` at B and when B
//! first routed one of its readings after that (a subscriber of `sensors/#` on B); when
//! `probe-mover`'s critical reading was acknowledged by B; when each probe's alert arrived at a
//! subscriber of the upstream's `{site}/alerts/#`. A is gone, so whatever alert arrives about
//! the probes came from B alone.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::plant;
use crate::probe;
use crate::procs::{Bins, Metrics, Proc};
use crate::setup::{self, SITE};
use crate::stats;
use crate::wire::{self, Conn, Incoming};

/// How long `coolant-held` must hold before it is raised.
pub const HOLD: &str = "3s";

/// The pair's rules besides overheat: a critical coolant temperature that must hold for
/// [`HOLD`], the deadline a gateway's own clock fires.
pub const COOLANT_HELD: &str = r#"[[rule]]
name = "coolant-held"
match = "sensors/+/coolant"
above = 90.0
clear_below = 85.0
for = "3s"
severity = "critical"
"#;

/// How long a device waits for a PUBACK before its link counts as dead: the simulator's
/// default (`--ack-timeout`), and `probe-mover`'s.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// A PUBACK that takes this long or longer counts as slow.
const SLOW_ACK: Duration = Duration::from_millis(500);

/// How gateway A is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGKILL: the process dies and the kernel closes its connections.
    Kill,
    /// SIGSTOP: the process stops answering with its connections open (a hung box, or one
    /// whose power failed, as its clients see it).
    Freeze,
}

impl Stop {
    /// Its name in the figures.
    pub fn name(self) -> &'static str {
        match self {
            Stop::Kill => "sigkill",
            Stop::Freeze => "sigstop",
        }
    }

    fn signal(self) -> i32 {
        match self {
            Stop::Kill => libc::SIGKILL,
            Stop::Freeze => libc::SIGSTOP,
        }
    }
}

/// The takeover workload's sizes.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Simulated devices.
    pub devices: usize,
    /// Readings per second of each device (temperature only, every sample sent, QoS 1).
    pub rate: f64,
    /// After every device is connected to A, before A is stopped.
    pub settle: Duration,
    /// The fleet samples this long before A is stopped besides `settle` (it usually connects
    /// in about a second), and this long after the measurement's end.
    pub margin: Duration,
    /// `peer.takeover_after` of both gateways; `None`: the default (10 s).
    pub takeover_after: Option<&'static str>,
    /// How A is stopped, one takeover each.
    pub stops: Vec<Stop>,
    /// How long the plant's devices run against a gateway alone and a pair for their memory
    /// ([`memory`]); `None`: not measured.
    pub memory: Option<Duration>,
}

impl Plan {
    /// `peer.takeover_after` in effect.
    fn takeover(&self) -> Duration {
        self.takeover_after
            .and_then(|t| humantime::parse_duration(t).ok())
            .unwrap_or(Duration::from_secs(10))
    }
}

/// What the subscribers saw after A was stopped, each with its time.
#[derive(Default)]
struct Seen {
    /// Device → when it said `online` at B.
    online: HashMap<String, Instant>,
    /// Device → when B first routed one of its readings after that.
    flowing: HashMap<String, Instant>,
    /// (device, rule, state) → when it arrived upstream, the first time.
    alerts: HashMap<(String, String, String), Instant>,
    /// Alerts about the probes that arrived upstream before A was stopped.
    alerts_before: u64,
}

/// One takeover: A stopped by `stop` under the fleet of `plan`; the times from the stop.
pub fn takeover(bins: &Bins, dir: &Path, plan: &Plan, stop: Stop) -> Result<Value> {
    std::fs::create_dir_all(dir)?;
    let upstream = setup::bare_mosquitto(&dir.join("upstream"))?;
    let setup::Pair { mut a, b } =
        setup::pair(bins, dir, upstream.addr, COOLANT_HELD, plan.takeover_after)?;
    let stopped: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let quit = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    {
        let (seen, stopped) = (seen.clone(), stopped.clone());
        threads.push(probe::subscribe(
            upstream.addr,
            "bench-upstream-alerts",
            &[&format!("{SITE}/alerts/#")],
            quit.clone(),
            move |at, topic, payload| {
                let Some(key) = alert_key(topic, payload) else {
                    return;
                };
                let mut seen = seen.lock().unwrap();
                match stopped.get() {
                    Some(t) if at > *t => {
                        seen.alerts.entry(key).or_insert(at);
                    }
                    _ if key.0.starts_with("probe-") => seen.alerts_before += 1,
                    _ => {}
                }
            },
        )?);
    }
    {
        let (seen, stopped) = (seen.clone(), stopped.clone());
        threads.push(probe::subscribe(
            b.mqtt,
            "bench-b-readings",
            &["sensors/#"],
            quit.clone(),
            move |at, topic, payload| {
                let Some(t) = stopped.get().copied() else {
                    return;
                };
                let Some((device, metric)) = device_metric(topic) else {
                    return;
                };
                if at <= t {
                    return;
                }
                let mut seen = seen.lock().unwrap();
                if metric == "status" {
                    if payload == b"online" {
                        seen.online.entry(device.to_owned()).or_insert(at);
                    }
                } else if seen.online.contains_key(device) {
                    // After the device's own CONNECT at B: a reading it published there.
                    seen.flowing.entry(device.to_owned()).or_insert(at);
                }
            },
        )?);
    }

    // The fleet: connected to A, publishing; it runs past the measurement and then drains.
    let base = a.metrics()?.get("watchpost_connections") as usize;
    let takeover = plan.takeover();
    // Sampling goes on past the measurement: devices that publish nothing cannot show that
    // they moved.
    let sampling = plan.margin + plan.settle + takeover + plan.margin;
    let mut sim = fleet(bins, plan, a.mqtt, b.mqtt, sampling, &dir.join("sim.log"))?;
    let started = Instant::now();
    a.wait_metrics("the fleet connects to A", CONNECT_BUDGET, |m| {
        m.get("watchpost_connections") as usize >= base + plan.devices
    })
    .context("the fleet connects to A")?;
    let connect_s = started.elapsed().as_secs_f64();
    // A fixed settling time with the fleet publishing, not a wait for a condition.
    std::thread::sleep(plan.settle);

    // The probes, on A. The held one's reading is acknowledged once both gateways have it.
    let mut held = Conn::connect(a.mqtt, "probe-held")?;
    let acked = publish_acked(
        &mut held,
        b"sensors/probe-held/coolant",
        b"95.0",
        1,
        ACK_TIMEOUT,
    )?;
    if acked.is_none() {
        bail!("probe-held's reading was not acknowledged by A");
    }
    let mut mover = Conn::connect(a.mqtt, "probe-mover")?;
    if publish_acked(
        &mut mover,
        b"sensors/probe-mover/temperature",
        b"20.0",
        1,
        ACK_TIMEOUT,
    )?
    .is_none()
    {
        bail!("probe-mover's reading was not acknowledged by A");
    }

    // Stop A.
    let at = Instant::now();
    let _ = stopped.set(at);
    watchpost_e2e::send_signal(a.proc.pid(), stop.signal());
    // B's own view, from its /metrics every 20 ms: when its mirror to A went down, and when
    // it took over A's devices' deadlines.
    let b_view = {
        let (http, quit) = (b.http, quit.clone());
        std::thread::spawn(move || {
            let (mut down, mut over) = (None, None);
            while !quit.load(Ordering::Relaxed) && (down.is_none() || over.is_none()) {
                if let Ok(m) = Metrics::scrape(http) {
                    let now = at.elapsed().as_secs_f64();
                    if down.is_none() && m.get("watchpost_peer_mirror_up") == 0.0 {
                        down = Some(now);
                    }
                    if over.is_none() && m.get("watchpost_peer_active") == 0.0 {
                        over = Some(now);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (down, over)
        })
    };

    // probe-mover: a reading to A every 100 ms until one is not answered, then B at once.
    let mut answered_after_stop = 0u64;
    let mut pkid: u16 = 2;
    while let Some(_rtt) = publish_acked(
        &mut mover,
        b"sensors/probe-mover/temperature",
        b"20.0",
        pkid,
        ACK_TIMEOUT,
    )? {
        // A process does not stop the very instant it is signalled.
        answered_after_stop += 1;
        pkid += 1;
        if at.elapsed() > ACK_TIMEOUT * 2 {
            bail!("A still answers {:?} after it was stopped", at.elapsed());
        }
        // Pacing the device's readings, not waiting for a condition.
        std::thread::sleep(Duration::from_millis(100));
    }
    let gone_s = at.elapsed().as_secs_f64();
    let mut mover = Conn::connect(b.mqtt, "probe-mover")?;
    let connected_s = at.elapsed().as_secs_f64();
    let critical = publish_acked(
        &mut mover,
        b"sensors/probe-mover/temperature",
        b"95.0",
        1,
        ACK_TIMEOUT * 2,
    )?;
    let critical_acked_s = critical.map(|_| at.elapsed().as_secs_f64());
    // Then a reading every 100 ms, one in flight as a device has it, each timed to its PUBACK,
    // until a while after B took over A's deadlines.
    let mut acks = Vec::new();
    let mut slow_until = critical
        .filter(|rtt| *rtt >= SLOW_ACK)
        .and(critical_acked_s);
    let until = at + takeover + Duration::from_secs(3);
    let mut pkid: u16 = 2;
    while Instant::now() < until {
        let sent = at.elapsed().as_secs_f64();
        match publish_acked(
            &mut mover,
            b"sensors/probe-mover/temperature",
            b"95.0",
            pkid,
            ACK_TIMEOUT * 2,
        )? {
            Some(rtt) => {
                let rtt = rtt.as_secs_f64();
                if rtt >= SLOW_ACK.as_secs_f64() {
                    slow_until = Some(sent + rtt);
                }
                acks.push(rtt * 1000.0);
            }
            None => bail!(
                "B did not acknowledge probe-mover's reading within {:?}",
                ACK_TIMEOUT * 2
            ),
        }
        pkid = pkid.wrapping_add(1).max(1);
        // Pacing the device's readings, not waiting for a condition.
        std::thread::sleep(Duration::from_millis(100));
    }

    // Wait for every device at B and both alerts upstream.
    let probes = [("probe-mover", "overheat"), ("probe-held", "coolant-held")];
    let deadline = at + takeover + Duration::from_secs(30);
    loop {
        {
            let seen = seen.lock().unwrap();
            let alerts = probes.iter().all(|(d, r)| {
                seen.alerts
                    .contains_key(&(d.to_string(), r.to_string(), "raised".into()))
            });
            let fleet =
                (0..plan.devices).all(|i| seen.flowing.contains_key(&format!("{}{i}", PREFIX)));
            if alerts && fleet {
                break;
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        b_alive(&b.proc)?;
        std::thread::sleep(Duration::from_millis(50));
    }
    let b_metrics = b.metrics()?;
    let log = std::fs::read_to_string(dir.join("b").join("watchpost.log")).unwrap_or_default();

    // The fleet's own account: what it queued was acknowledged, nothing dropped.
    let out = sim.wait_output(sampling + Duration::from_secs(60))?;
    let report: Value = out
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("the simulator's report: {out:?}"))?;
    quit.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let (b_mirror_down_s, b_took_over_s) = b_view.join().unwrap_or_default();
    drop(held);
    drop(mover);

    let seen = seen.lock().unwrap();
    let since = |t: &Instant| (*t - at).as_secs_f64();
    let fleet_times = |map: &HashMap<String, Instant>| -> Vec<f64> {
        (0..plan.devices)
            .filter_map(|i| map.get(&format!("{PREFIX}{i}")))
            .map(since)
            .collect()
    };
    let (online, flowing) = (fleet_times(&seen.online), fleet_times(&seen.flowing));
    let summary = |v: Vec<f64>| {
        let s = stats::sorted(v);
        json!({
            "n": s.len(),
            "first": s.first(),
            "median": stats::percentile(&s, 0.5),
            "last": s.last(),
        })
    };
    let alert = |device: &str, rule: &str| {
        seen.alerts
            .get(&(device.into(), rule.into(), "raised".into()))
            .map(since)
    };
    let acks = stats::sorted(acks);
    Ok(json!({
        "stop": stop.name(),
        "devices": plan.devices,
        "rate": plan.rate,
        "takeover_after_s": takeover.as_secs_f64(),
        "connect_s": connect_s,
        "online": summary(online),
        "flowing": summary(flowing),
        "mover": {
            "a_answered_after_stop": answered_after_stop,
            "gone_s": gone_s,
            "connected_b_s": connected_s,
            "critical_acked_s": critical_acked_s,
            "alert_s": alert("probe-mover", "overheat"),
            "acks_n": acks.len(),
            "acks_p50_ms": stats::percentile(&acks, 0.5),
            "acks_max_ms": acks.last(),
            "slow_acks_until_s": slow_until,
        },
        "held_alert_s": alert("probe-held", "coolant-held"),
        "alerts_before_stop": seen.alerts_before,
        "b_mirror_down_s": b_mirror_down_s,
        "b_took_over_s": b_took_over_s,
        "b_peer_ack_timeouts": b_metrics.sum("watchpost_peer_ack_timeouts_total"),
        "b_logged_takeover": log.contains("no word from the peer gateway"),
        "sim": report,
    }))
}

/// Memory of a gateway alone and of both gateways of a pair, each under the plant's devices
/// (`plant`: one message a second per device, three readings in it, QoS 1) for `seconds`,
/// side by side: each gateway of a pair keeps what it judged over its catch-up horizon (two
/// minutes with the plant's one rule) for the other, so its RSS grows until that horizon is
/// full. RSS is read every 10 s.
pub fn memory(bins: &Bins, dir: &Path, plant: &plant::Plan, seconds: Duration) -> Result<Value> {
    std::fs::create_dir_all(dir)?;
    let up_alone = setup::bare_mosquitto(&dir.join("alone").join("upstream"))?;
    let alone = setup::watchpost(bins, &dir.join("alone"), up_alone.addr, None, "")?;
    let up_pair = setup::bare_mosquitto(&dir.join("pair").join("upstream"))?;
    let setup::Pair { a, b } = setup::pair(bins, &dir.join("pair"), up_pair.addr, "", None)?;
    let pids = [alone.proc.pid(), a.proc.pid(), b.proc.pid()];
    let rss = || -> Result<Vec<u64>> {
        pids.iter()
            .map(|&pid| Ok(crate::procs::memory_kib(pid)?.0))
            .collect()
    };
    let start = rss()?;
    let secs = seconds.as_secs_f64();
    let mut sims = [
        plant::sim(bins, plant, alone.mqtt, secs, &dir.join("sim-alone.log"))?,
        plant::sim(bins, plant, a.mqtt, secs, &dir.join("sim-pair.log"))?,
    ];
    let began = Instant::now();
    let mut series = Vec::new();
    while began.elapsed() + Duration::from_secs(10) <= seconds {
        // Sampling memory at fixed times, not waiting for a condition.
        std::thread::sleep(Duration::from_secs(10));
        let now = rss()?;
        series.push(json!({ "s": began.elapsed().as_secs_f64(), "rss_kib": now }));
    }
    // The last reading at `seconds`, as the devices stop.
    std::thread::sleep(seconds.saturating_sub(began.elapsed()));
    let end = rss()?;
    let end_s = began.elapsed().as_secs_f64();
    let judged = [
        alone.metrics()?.sum("watchpost_readings_total"),
        a.metrics()?.sum("watchpost_readings_total"),
        b.metrics()?.sum("watchpost_readings_total"),
    ];
    let messages = [
        alone.metrics()?.sum("watchpost_messages_total"),
        a.metrics()?.sum("watchpost_messages_total"),
        b.metrics()?.sum("watchpost_peer_entries_received_total"),
    ];
    for sim in &mut sims {
        sim.wait_output(Duration::from_secs(60))?;
    }
    Ok(json!({
        "seconds": secs,
        "devices": plant.devices,
        "rss_start_kib": { "alone": start[0], "a": start[1], "b": start[2] },
        "rss_end_kib": { "alone": end[0], "a": end[1], "b": end[2] },
        "end_s": end_s,
        "readings": { "alone": judged[0], "a": judged[1], "b": judged[2] },
        "messages": { "alone": messages[0], "a": messages[1], "b_mirrored": messages[2] },
        "series": series,
    }))
}

/// Device ids of the fleet are `pair-0`, `pair-1`, ...
const PREFIX: &str = "pair-";

/// How long the fleet may take to connect to A.
const CONNECT_BUDGET: Duration = Duration::from_secs(20);

/// Fails if gateway B has exited.
fn b_alive(b: &Proc) -> Result<()> {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    if unsafe { libc::kill(b.pid() as libc::pid_t, 0) } != 0 {
        bail!("gateway B exited; end of its log:\n{}", b.log_tail());
    }
    Ok(())
}

/// Starts the simulated fleet of `plan` knowing `first`, then `second`, sampling for
/// `sampling`, with the simulator's default keep-alive (30 s) and PUBACK timeout
/// ([`ACK_TIMEOUT`]).
fn fleet(
    bins: &Bins,
    plan: &Plan,
    first: SocketAddr,
    second: SocketAddr,
    sampling: Duration,
    log: &Path,
) -> Result<Proc> {
    let mut command = Command::new(&bins.sim);
    command.args([
        "--devices",
        &plan.devices.to_string(),
        "--rate",
        &plan.rate.to_string(),
        "--metrics",
        "1",
        "--every-sample",
        "--ack-timeout",
        &ACK_TIMEOUT.as_secs_f64().to_string(),
        "--duration",
        &format!("{:.1}", sampling.as_secs_f64()),
        "--drain",
        "15",
        "--gateway",
        &format!("{first},{second}"),
        "--prefix",
        PREFIX,
        "--json",
    ]);
    Proc::spawn("watchpost-sim", command, log)
}

/// `sensors/{device}/{metric}` → (device, metric).
fn device_metric(topic: &[u8]) -> Option<(&str, &str)> {
    let topic = std::str::from_utf8(topic).ok()?;
    let mut levels = topic.split('/');
    (levels.next()? == "sensors").then_some(())?;
    let device = levels.next()?;
    let metric = levels.next()?;
    Some((device, metric))
}

/// An alert document on `{prefix}/alerts/{severity}/{device}/{rule}` → (device, rule, state).
fn alert_key(topic: &[u8], payload: &[u8]) -> Option<(String, String, String)> {
    let topic = std::str::from_utf8(topic).ok()?;
    let mut levels = topic.rsplit('/');
    let rule = levels.next()?.to_owned();
    let device = levels.next()?.to_owned();
    let doc: Value = serde_json::from_slice(payload).ok()?;
    Some((device, rule, doc.get("state")?.as_str()?.to_owned()))
}

/// Publishes `payload` on `topic` at QoS 1 with packet id `pkid` and waits up to `timeout` for
/// its PUBACK; returns the time it took, or `None` if the connection closed, failed or stayed
/// silent (what a device takes for a dead link).
fn publish_acked(
    conn: &mut Conn,
    topic: &[u8],
    payload: &[u8],
    pkid: u16,
    timeout: Duration,
) -> Result<Option<Duration>> {
    let mut packet = Vec::with_capacity(64);
    wire::put_publish(&mut packet, topic, payload, Some(pkid), false);
    let sent = Instant::now();
    if conn.stream().write_all(&packet).is_err() {
        return Ok(None);
    }
    let deadline = sent + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        conn.stream().set_read_timeout(Some(left))?;
        match conn.next() {
            Ok(Some(Incoming::PubAck)) => return Ok(Some(sent.elapsed())),
            Ok(Some(_)) => {}
            Ok(None) => return Ok(None),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(None);
            }
            Err(_) => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_topics_and_device_topics_are_read() {
        assert_eq!(
            alert_key(
                b"site-bench/alerts/critical/probe-held/coolant-held",
                br#"{"state":"raised"}"#
            ),
            Some(("probe-held".into(), "coolant-held".into(), "raised".into()))
        );
        assert_eq!(alert_key(b"a/b", b"not json"), None);
        assert_eq!(
            device_metric(b"sensors/pair-7/status"),
            Some(("pair-7", "status"))
        );
        assert_eq!(device_metric(b"alerts/x/y"), None);
    }

    #[test]
    fn the_held_rule_holds_for_hold() {
        assert!(COOLANT_HELD.contains(&format!("for = \"{HOLD}\"")));
    }
}

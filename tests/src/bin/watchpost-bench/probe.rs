//! Latency probes: devices in the harness that raise and clear an alert at a steady rate,
//! alongside whatever load runs, and subscribers that note when each transition shows up.
//! Publish and receipt are timestamped in this process, with the same monotonic clock, right
//! next to the socket write and read.
//!
//! A probe of [`Kind::Threshold`] publishes `95.0` (raises overheat) and `20.0` (clears it) in
//! turn on `sensors/probe-{n}/temperature`; one of [`Kind::Leak`] publishes `true` and `false`
//! on `sensors/probe-{n}/water_leak` (the `water-leak` state rule). Where it shows up depends
//! on who listens: the gateway's alert document on `alerts/#` locally and `{prefix}/alerts/#`
//! upstream, or, for a plain broker and a bridge, the reading itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};

use crate::stats;
use crate::wire::{self, Conn, Incoming};

/// Probe devices publishing in turn.
pub const PROBES: usize = 10;

/// What a probe's transitions cross: a threshold rule on a number or a state rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `overheat` (above 90, cleared below 85) on `temperature`.
    Threshold,
    /// `water-leak` (`equals = true`) on `water_leak`.
    Leak,
}

impl Kind {
    /// The metric a probe of this kind publishes.
    pub fn metric(self) -> &'static str {
        match self {
            Kind::Threshold => "temperature",
            Kind::Leak => "water_leak",
        }
    }

    /// The rule its transitions raise and clear (the alert topic's last level).
    fn rule(self) -> &'static str {
        match self {
            Kind::Threshold => "overheat",
            Kind::Leak => "water-leak",
        }
    }

    /// The payload that raises the rule, and the one that clears it.
    pub fn payloads(self) -> (&'static [u8], &'static [u8]) {
        match self {
            Kind::Threshold => (b"95.0", b"20.0"),
            Kind::Leak => (b"true", b"false"),
        }
    }
}

/// A transition: its kind, the probe that published it, raised (or cleared).
pub type Key = (Kind, usize, bool);

/// One place a probe's transitions show up, and the latencies seen there, apart by kind.
#[derive(Default)]
pub struct Watch {
    /// Transition → when it was published; removed at receipt.
    pending: Mutex<HashMap<Key, Instant>>,
    samples: Mutex<HashMap<Kind, Vec<f64>>>,
    /// Transitions published again before the previous one of the same kind arrived.
    overtaken: Mutex<HashMap<Kind, u64>>,
}

impl Watch {
    fn published(&self, key: Key, at: Instant) {
        if self.pending.lock().unwrap().insert(key, at).is_some() {
            *self.overtaken.lock().unwrap().entry(key.0).or_default() += 1;
        }
    }

    /// Notes that transition `key` arrived at `at`.
    pub fn received(&self, key: Key, at: Instant) {
        if let Some(sent) = self.pending.lock().unwrap().remove(&key) {
            self.samples
                .lock()
                .unwrap()
                .entry(key.0)
                .or_default()
                .push((at - sent).as_secs_f64() * 1000.0);
        }
    }

    /// Latencies of `kind` so far as JSON: how many arrived, how many never did, and p50,
    /// p99, p99.9 and the largest, in ms.
    pub fn summary(&self, kind: Kind) -> Value {
        let pending = self.pending.lock().unwrap();
        let missing = pending.keys().filter(|k| k.0 == kind).count() as u64
            + self
                .overtaken
                .lock()
                .unwrap()
                .get(&kind)
                .copied()
                .unwrap_or(0);
        let samples = self.samples.lock().unwrap().get(&kind).cloned();
        let s = stats::sorted(samples.unwrap_or_default());
        json!({
            "n": s.len(),
            "missing": missing,
            "p50": stats::percentile(&s, 0.5),
            "p99": stats::percentile(&s, 0.99),
            "p999": stats::percentile(&s, 0.999),
            "max": s.last(),
        })
    }

    fn outstanding(&self) -> usize {
        self.pending.lock().unwrap().len()
    }
}

/// The transition a message describes, if it is about a probe: an alert document on
/// `.../alerts/{severity}/probe-{n}/{rule}`, or a reading on `sensors/probe-{n}/{metric}`.
pub fn probe_key(topic: &[u8], payload: &[u8]) -> Option<Key> {
    let topic = std::str::from_utf8(topic).ok()?;
    let mut levels = topic.rsplit('/');
    let last = levels.next()?;
    let device = levels.next()?;
    let n = device.strip_prefix("probe-")?.parse().ok()?;
    for kind in [Kind::Threshold, Kind::Leak] {
        if last == kind.metric() {
            return Some((kind, n, payload == kind.payloads().0));
        }
        if last == kind.rule() {
            let doc: serde_json::Value = serde_json::from_slice(payload).ok()?;
            return Some((kind, n, doc.get("state")?.as_str()? == "raised"));
        }
    }
    None
}

/// A subscriber thread: calls `handle(receipt time, topic, payload)` for every message until
/// the broker closes the connection or `stop` is set.
pub fn subscribe(
    addr: SocketAddr,
    client_id: &str,
    filters: &[&str],
    stop: Arc<AtomicBool>,
    mut handle: impl FnMut(Instant, &[u8], &[u8]) + Send + 'static,
) -> Result<std::thread::JoinHandle<()>> {
    let mut conn = Conn::subscriber(addr, client_id, filters, 0)?;
    conn.stream()
        .set_read_timeout(Some(Duration::from_millis(500)))?;
    Ok(std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match conn.next() {
                Ok(Some(Incoming::Publish { topic, payload, .. })) => {
                    let at = Instant::now();
                    handle(at, topic, payload);
                }
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
            if conn.ping_if_due().is_err() {
                return;
            }
        }
    }))
}

/// The probes' own reading topics of `kind`, to watch them at a broker that also carries
/// other load.
pub fn reading_topics(kind: Kind) -> Vec<String> {
    (0..PROBES)
        .map(|n| format!("sensors/probe-{n}/{}", kind.metric()))
        .collect()
}

/// A subscriber that feeds every probe transition it sees to `watch`.
pub fn watch(
    addr: SocketAddr,
    client_id: &str,
    filters: &[&str],
    watch: Arc<Watch>,
    stop: Arc<AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    subscribe(addr, client_id, filters, stop, move |at, topic, payload| {
        if let Some(key) = probe_key(topic, payload) {
            watch.received(key, at);
        }
    })
}

/// A broker the probes publish to, and where their transitions are watched.
pub struct Target {
    /// The broker.
    pub addr: SocketAddr,
    /// Where its transitions show up.
    pub watches: Vec<Arc<Watch>>,
}

/// Publishes `rate` transitions of `kind` per second for `duration`, round robin over
/// [`PROBES`] devices, to every target (QoS 1, as devices do); then waits up to 5 s for the
/// last ones to arrive. Returns how many it published to each target.
pub fn run(targets: &[Target], kind: Kind, rate: f64, duration: Duration) -> Result<u64> {
    let mut conns = Vec::new();
    for (t, target) in targets.iter().enumerate() {
        let mut per_target = Vec::new();
        for n in 0..PROBES {
            let conn = Conn::connect(target.addr, &format!("probe-{n}-t{t}"))?;
            let writer = conn.stream().try_clone()?;
            // Drain the PUBACKs (and pings) so that the socket never fills.
            let mut reader = conn;
            std::thread::spawn(move || while let Ok(Some(_)) = reader.next_packet() {});
            per_target.push(writer);
        }
        conns.push(per_target);
    }
    let period = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut i: usize = 0;
    let mut packet = Vec::with_capacity(64);
    let topics = reading_topics(kind);
    let (raise, clear) = kind.payloads();
    while start.elapsed() < duration {
        let due = start + period * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            // Pacing the probes, not waiting for a condition.
            std::thread::sleep(wait);
        }
        let n = i % PROBES;
        let raised = (i / PROBES) % 2 == 0;
        let topic = &topics[n];
        for (target, writers) in targets.iter().zip(&mut conns) {
            packet.clear();
            let pkid = (i % 65_535) as u16 + 1;
            wire::put_publish(
                &mut packet,
                topic.as_bytes(),
                if raised { raise } else { clear },
                Some(pkid),
                false,
            );
            let at = Instant::now();
            for w in &target.watches {
                w.published((kind, n, raised), at);
            }
            use std::io::Write;
            writers[n].write_all(&packet)?;
        }
        i += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && targets
            .iter()
            .flat_map(|t| &t.watches)
            .any(|w| w.outstanding() > 0)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for writers in conns {
        for mut w in writers {
            use std::io::Write;
            let _ = w.write_all(&[0xe0, 0]);
        }
    }
    Ok(i as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_keys_come_from_alerts_and_readings() {
        use Kind::{Leak, Threshold};
        let raised = br#"{"state":"raised","device":"probe-3"}"#;
        let cleared = br#"{"state":"cleared"}"#;
        for (topic, payload, key) in [
            (
                &b"site/alerts/critical/probe-3/overheat"[..],
                &raised[..],
                Some((Threshold, 3, true)),
            ),
            (
                b"alerts/critical/probe-12/overheat",
                cleared,
                Some((Threshold, 12, false)),
            ),
            (
                b"alerts/critical/probe-4/water-leak",
                raised,
                Some((Leak, 4, true)),
            ),
            (
                b"sensors/probe-0/temperature",
                b"95.0",
                Some((Threshold, 0, true)),
            ),
            (
                b"sensors/probe-0/water_leak",
                b"true",
                Some((Leak, 0, true)),
            ),
            (
                b"sensors/probe-0/water_leak",
                b"false",
                Some((Leak, 0, false)),
            ),
            (b"sensors/dev-1/temperature", b"95.0", None),
            (b"alerts/warning/probe-1/door-open", raised, None),
        ] {
            assert_eq!(probe_key(topic, payload), key, "{topic:?}");
        }
    }

    #[test]
    fn latencies_are_kept_apart_by_kind() {
        let watch = Watch::default();
        let at = Instant::now();
        watch.published((Kind::Threshold, 0, true), at);
        watch.published((Kind::Leak, 0, true), at);
        watch.received((Kind::Leak, 0, true), at + Duration::from_millis(2));
        assert_eq!(watch.summary(Kind::Leak)["n"], 1);
        assert_eq!(watch.summary(Kind::Leak)["missing"], 0);
        assert_eq!(watch.summary(Kind::Threshold)["n"], 0);
        assert_eq!(watch.summary(Kind::Threshold)["missing"], 1);
    }
}

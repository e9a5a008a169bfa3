//! Latency probes: devices in the harness that raise and clear the overheat rule at a steady
//! rate, alongside whatever load runs, and subscribers that note when each transition shows
//! up. Publish and receipt are timestamped in this process, with the same monotonic clock,
//! right next to the socket write and read.
//!
//! A probe publishes `95.0` (raises overheat) and `20.0` (clears it) in turn on
//! `sensors/probe-{n}/temperature`. Where it shows up depends on who listens: the gateway's
//! alert document on `alerts/#` locally and `{prefix}/alerts/#` upstream, or, for a plain
//! broker and a bridge, the reading itself.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{Value, json};

use crate::stats;
use crate::wire::{self, Conn, Incoming};

/// Probe devices publishing in turn.
pub const PROBES: usize = 10;
/// The value that raises overheat, and the one that clears it.
pub const RAISE: &[u8] = b"95.0";
/// See [`RAISE`].
pub const CLEAR: &[u8] = b"20.0";

/// One place a probe's transitions show up, and the latencies seen there.
#[derive(Default)]
pub struct Watch {
    /// (probe, raised) → when it was published; removed at receipt.
    pending: Mutex<HashMap<(usize, bool), Instant>>,
    samples: Mutex<Vec<f64>>,
    /// Transitions published again before the previous one of the same kind arrived.
    overtaken: AtomicU64,
}

impl Watch {
    fn published(&self, key: (usize, bool), at: Instant) {
        if self.pending.lock().unwrap().insert(key, at).is_some() {
            self.overtaken.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Notes that transition `key` arrived at `at`.
    pub fn received(&self, key: (usize, bool), at: Instant) {
        if let Some(sent) = self.pending.lock().unwrap().remove(&key) {
            self.samples
                .lock()
                .unwrap()
                .push((at - sent).as_secs_f64() * 1000.0);
        }
    }

    /// Latencies so far as JSON: how many arrived, how many never did, and p50, p99, p99.9
    /// and the largest, in ms.
    pub fn summary(&self) -> Value {
        let missing =
            self.pending.lock().unwrap().len() as u64 + self.overtaken.load(Ordering::Relaxed);
        let s = stats::sorted(self.samples.lock().unwrap().clone());
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

/// The probe and state a message describes, if it is about a probe: an alert document on
/// `.../alerts/{severity}/probe-{n}/overheat`, or a reading on `sensors/probe-{n}/temperature`.
pub fn probe_key(topic: &[u8], payload: &[u8]) -> Option<(usize, bool)> {
    let topic = std::str::from_utf8(topic).ok()?;
    let mut levels = topic.rsplit('/');
    let last = levels.next()?;
    let device = levels.next()?;
    let n = device.strip_prefix("probe-")?.parse().ok()?;
    if last == "temperature" {
        return Some((n, payload == RAISE));
    }
    let doc: serde_json::Value = serde_json::from_slice(payload).ok()?;
    Some((n, doc.get("state")?.as_str()? == "raised"))
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
                Ok(Some(Incoming::Publish { topic, payload })) => {
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

/// The probes' own reading topics, to watch them at a broker that also carries other load.
pub fn reading_topics() -> Vec<String> {
    (0..PROBES)
        .map(|n| format!("sensors/probe-{n}/temperature"))
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

/// Publishes `rate` transitions per second for `duration`, round robin over [`PROBES`]
/// devices, to every target (QoS 1, as devices do); then waits up to 5 s for the last ones to
/// arrive. Returns how many it published to each target.
pub fn run(targets: &[Target], rate: f64, duration: Duration) -> Result<u64> {
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
    let topics = reading_topics();
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
                if raised { RAISE } else { CLEAR },
                Some(pkid),
            );
            let at = Instant::now();
            for w in &target.watches {
                w.published((n, raised), at);
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
        let doc = br#"{"state":"raised","device":"probe-3"}"#;
        assert_eq!(
            probe_key(b"site/alerts/critical/probe-3/overheat", doc),
            Some((3, true))
        );
        let doc = br#"{"state":"cleared"}"#;
        assert_eq!(
            probe_key(b"alerts/critical/probe-12/overheat", doc),
            Some((12, false))
        );
        assert_eq!(
            probe_key(b"sensors/probe-0/temperature", RAISE),
            Some((0, true))
        );
        assert_eq!(probe_key(b"sensors/dev-1/temperature", RAISE), None);
    }
}

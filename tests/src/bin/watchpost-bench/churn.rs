//! The churn workload (issue 21): device ids that come and go. Every client id is new; each
//! connects once with a clean session, publishes one reading and leaves. What the broker and
//! the gateway kept for them must go once they are gone: Watchpost forgets a device silent for
//! `gateway.forget_after` (short here), Mosquitto drops a clean session's client at once.
//! VmRSS is read before, at the peak (VmHWM) and after.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::procs::{Bins, Gateway, Usage};
use crate::saturation::System;
use crate::setup;
use crate::wire::{self, Conn};

/// Clients connected at once.
pub const WORKERS: usize = 8;
/// How long after the churn the gateway may take to forget every device.
const FORGET_DEADLINE: Duration = Duration::from_secs(60);
/// Wait after the last device is forgotten (or, for Mosquitto, after the churn) before the
/// last reading of VmRSS: the round that forgot them gives the memory back after counting.
pub const SETTLE: Duration = Duration::from_secs(3);

/// How many devices.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Distinct client ids over the run, each connecting once.
    pub devices: usize,
    /// Devices that come and go first, forgotten before "before" is read: a gateway that has
    /// run for a while, its database's page cache in use (0: before is read at a fresh start).
    pub warm_up: usize,
    /// Watchpost's `gateway.forget_after` (and `stale_after`, which may not be longer).
    pub forget_after: &'static str,
}

/// The topic of device `n`'s reading.
fn topic(prefix: &str, n: usize) -> String {
    format!("sensors/{prefix}{n}/temperature")
}

/// Devices `from..to`, [`WORKERS`] at a time: each connects (clean session) as
/// `{prefix}{n}`, publishes `{"v":21.5,"seq":0}` at QoS 0 and leaves with DISCONNECT, waiting
/// for the broker to close. Returns the seconds it took.
fn churn(addr: SocketAddr, prefix: &str, from: usize, to: usize) -> Result<f64> {
    let started = Instant::now();
    let next = AtomicUsize::new(from);
    let failed = std::sync::Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| {
                let mut packet = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= to {
                        return;
                    }
                    let mut one = || -> Result<()> {
                        let id = format!("{prefix}{n}");
                        let mut conn = Conn::connect(addr, &id)?;
                        packet.clear();
                        wire::put_publish(
                            &mut packet,
                            topic(prefix, n).as_bytes(),
                            br#"{"v":21.5,"seq":0}"#,
                            None,
                            false,
                        );
                        conn.write(&packet)?;
                        conn.disconnect(Duration::from_secs(5))
                    };
                    if let Err(e) = one() {
                        failed.lock().expect("not poisoned").get_or_insert(e);
                        next.store(to, Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().expect("not poisoned") {
        return Err(e);
    }
    Ok(started.elapsed().as_secs_f64())
}

/// A Watchpost for this workload in `dir`: anonymous clients on loopback, no rate limit, the
/// benchmark's overheat rule, no uplink, `forget_after` and `stale_after` as given.
fn gateway(bins: &Bins, dir: &Path, forget_after: &str) -> Result<Gateway> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let config = dir.join("watchpost.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nid = \"{}\"\ndata_dir = {data:?}\nstale_after = \"{forget_after}\"\nforget_after = \"{forget_after}\"\n\n\
             [broker]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = true\nmax_publish_rate = 0\n\n\
             [http]\nlisten = \"127.0.0.1:0\"\n\n{}",
            setup::SITE,
            setup::OVERHEAT
        ),
    )?;
    Gateway::start(&bins.watchpost, &config, &dir.join("watchpost.log"))
}

/// Waits until the gateway counts `total` devices forgotten; returns how long that took.
fn forgotten(gw: &mut Gateway, total: usize) -> Result<f64> {
    let since = Instant::now();
    gw.wait_metrics("every device forgotten", FORGET_DEADLINE, |m| {
        m.get("watchpost_devices_forgotten_total") as usize >= total
    })?;
    Ok(since.elapsed().as_secs_f64())
}

/// Runs the workload against `system` (Watchpost or bare Mosquitto) in `dir`.
pub fn run(bins: &Bins, dir: &Path, system: System, plan: &Plan) -> Result<Value> {
    std::fs::create_dir_all(dir)?;
    let prefix = format!("churn{}-", std::process::id());
    let (mut gw, broker) = match system {
        System::Watchpost => (
            Some(gateway(bins, &dir.join("watchpost"), plan.forget_after)?),
            None,
        ),
        System::Mosquitto => (None, Some(setup::bare_mosquitto(&dir.join("mosquitto"))?)),
        System::Rumqttd => bail!("the churn workload compares Watchpost and Mosquitto"),
    };
    let (addr, pid) = match (&gw, &broker) {
        (Some(g), _) => (g.mqtt, g.proc.pid()),
        (None, Some(b)) => (b.addr, b.proc.pid()),
        _ => unreachable!("one of them was started"),
    };
    let fresh = Usage::of(pid)?;
    let settle = |gw: &mut Option<Gateway>, total: usize| -> Result<Option<f64>> {
        let waited = match gw {
            Some(g) => Some(forgotten(g, total)?),
            None => None,
        };
        std::thread::sleep(SETTLE);
        Ok(waited)
    };
    if plan.warm_up > 0 {
        churn(addr, &prefix, 0, plan.warm_up).context("warm-up")?;
        settle(&mut gw, plan.warm_up)?;
    }
    let before = Usage::of(pid)?;
    let total = plan.warm_up + plan.devices;
    let churn_s = churn(addr, &prefix, plan.warm_up, total)?;
    let peak = Usage::of(pid)?;
    let forget_s = settle(&mut gw, total)?;
    let after = Usage::of(pid)?;
    let metrics = match &gw {
        Some(g) => Some(g.metrics()?),
        None => None,
    };
    if let Some(g) = gw.as_mut() {
        g.proc.check_alive()?;
        g.proc.stop();
    }
    let devices_gauge = metrics.as_ref().map(|m| m.sum("watchpost_devices"));
    let readings = metrics.as_ref().map(|m| m.get("watchpost_readings_total"));
    Ok(json!({
        "system": system.name(),
        "devices": plan.devices,
        "warm_up": plan.warm_up,
        "forget_after": plan.forget_after,
        "fresh_rss_kib": fresh.rss_kib,
        "before_rss_kib": before.rss_kib,
        "peak_rss_kib": peak.hwm_kib,
        "end_rss_kib": peak.rss_kib,
        "after_rss_kib": after.rss_kib,
        "churn_s": churn_s,
        "forget_wait_s": forget_s,
        "settle_s": SETTLE.as_secs_f64(),
        "devices_gauge_after": devices_gauge,
        "readings": readings,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_has_its_own_topic() {
        assert_eq!(topic("c-", 7), "sensors/c-7/temperature");
        assert_ne!(topic("c-", 1), topic("c-", 10));
    }
}

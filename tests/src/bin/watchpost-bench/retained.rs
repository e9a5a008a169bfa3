//! The retained workload: what ten thousand retained messages (a device's configuration each,
//! as a site keeps them for devices that come back) cost Watchpost and bare Mosquitto in
//! memory and on disk, and how long a new subscriber to `#` waits for all of them.
//!
//! Each broker is started fresh and saves what it retains: Watchpost in its SQLite database
//! (whatever of its retained messages it keeps there: the data directory is measured as it
//! is), Mosquitto in `mosquitto.db` every second or two. Publishers are the harness's raw
//! clients ([`Conn`]), [`PUBLISHERS`] connections with [`WINDOW`] QoS 1 PUBLISHes in flight
//! each; the new subscriber is one too, acknowledging every message as it reads it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::procs::{Bins, Gateway, Usage};
use crate::saturation::System;
use crate::setup::{self, Broker};
use crate::wire::{self, Conn, Incoming};

/// Publishing connections.
pub const PUBLISHERS: usize = 5;
/// QoS 1 PUBLISHes in flight per publishing connection.
pub const WINDOW: usize = 64;
/// Retained messages Watchpost is allowed (default 10,000: room for the plan's messages and
/// the gateway's own), and queued messages per session Mosquitto is allowed (default 1,000:
/// beyond it, a subscription to `#` is given only the first thousand retained messages at
/// QoS 1). Watchpost gives a subscription every retained message whatever its queue bound.
pub const BOUND: usize = 20_000;
/// Mosquitto's `autosave_interval`, seconds.
pub const MOSQUITTO_AUTOSAVE_S: u32 = 1;
/// A new subscriber that hears nothing for this long has had all it will get.
const SILENCE: Duration = Duration::from_secs(10);
/// How long to wait at most for a broker to count every message, or to save them.
const DEADLINE: Duration = Duration::from_secs(30);
/// Watchpost's data directory is taken as settled once its size has not changed for this
/// long, after it changed at all ...
const DISK_QUIET: Duration = Duration::from_secs(2);
/// ... or once it has not changed at all for this long.
const DISK_UNCHANGED: Duration = Duration::from_secs(10);

/// How many retained messages.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Retained messages, one per topic.
    pub messages: usize,
}

/// The topic of message `i`: a hundred devices per area.
pub fn topic(i: usize) -> String {
    format!("site/area{}/dev{i}/config", i / 100)
}

/// Message `i`'s index, from its topic; `None` for any other topic.
fn index_of(topic: &[u8]) -> Option<usize> {
    let rest = std::str::from_utf8(topic).ok()?.strip_prefix("site/area")?;
    let (_, rest) = rest.split_once("/dev")?;
    let i: usize = rest.strip_suffix("/config")?.parse().ok()?;
    (topic == self::topic(i).as_bytes()).then_some(i)
}

/// The payload of message `i`: a device's configuration as JSON, about 100 bytes.
pub fn payload(i: usize) -> Vec<u8> {
    format!(
        r#"{{"device":"dev{i}","interval_s":{},"report":"temperature,humidity","hi":{}.0,"lo":85.0,"fw":"2.4.1"}}"#,
        60 + (i % 4) * 30,
        86 + i % 10,
    )
    .into_bytes()
}

/// The broker under test, and where it saves.
struct Sut {
    addr: SocketAddr,
    pid: u32,
    gateway: Option<Gateway>,
    /// Watchpost's upstream, or bare Mosquitto itself.
    brokers: Vec<Broker>,
    /// Watchpost's data directory, or Mosquitto's `mosquitto.db`.
    disk: PathBuf,
}

impl Sut {
    /// Watchpost with the harness's usual configuration (its upstream a bare Mosquitto) and
    /// [`BOUND`]; or bare Mosquitto saving every [`MOSQUITTO_AUTOSAVE_S`] with [`BOUND`],
    /// and `$SYS` every second for its count of retained messages.
    fn start(bins: &Bins, dir: &Path, system: System) -> Result<Sut> {
        std::fs::create_dir_all(dir)?;
        Ok(match system {
            System::Watchpost => {
                let upstream = setup::bare_mosquitto(&dir.join("upstream"))?;
                let broker = format!("max_retained_messages = {BOUND}\n");
                let home = dir.join("watchpost");
                let gw = setup::watchpost_with(bins, &home, upstream.addr, None, "", &broker)?;
                Sut {
                    addr: gw.mqtt,
                    pid: gw.proc.pid(),
                    gateway: Some(gw),
                    brokers: vec![upstream],
                    disk: home.join("data"),
                }
            }
            System::Mosquitto => {
                let (broker, db) = setup::saving_mosquitto(
                    &dir.join("mosquitto"),
                    MOSQUITTO_AUTOSAVE_S,
                    &format!("max_queued_messages {BOUND}\nsys_interval 1\n"),
                )?;
                Sut {
                    addr: broker.addr,
                    pid: broker.proc.pid(),
                    gateway: None,
                    brokers: vec![broker],
                    disk: db,
                }
            }
            System::Rumqttd => bail!("the retained workload compares Watchpost and Mosquitto"),
        })
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(gw) = &mut self.gateway {
            gw.proc.check_alive()?;
        }
        for broker in &mut self.brokers {
            broker.proc.check_alive()?;
        }
        Ok(())
    }

    /// Retained messages the broker counts: Watchpost's gauge (refreshed every 5 s), or
    /// Mosquitto's `$SYS/broker/retained messages/count` (its own `$SYS` topics included).
    fn retained(&mut self) -> Result<u64> {
        self.check_alive()?;
        match &self.gateway {
            Some(gw) => Ok(gw.metrics()?.get("watchpost_broker_retained_messages") as u64),
            None => mosquitto_retained(self.addr),
        }
    }

    /// Waits until the broker counts at least `want` retained messages, at most
    /// [`DEADLINE`]; returns the last count.
    fn wait_retained(&mut self, want: u64) -> Result<u64> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let n = self.retained()?;
            if n >= want || Instant::now() >= deadline {
                return Ok(n);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The files it saves to, by name, and their sizes.
    fn files(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        if self.gateway.is_some() {
            sizes(&self.disk, "", &mut out);
        } else if let Ok(m) = std::fs::metadata(&self.disk) {
            out.insert("mosquitto.db".to_owned(), m.len());
        }
        out
    }

    /// The files once the broker has saved what it has: for Watchpost, once its data
    /// directory's size has settled ([`DISK_QUIET`] after a change, or [`DISK_UNCHANGED`]
    /// without one); for Mosquitto, once `mosquitto.db` was written after `after` (an autosave
    /// that started then, plus a margin). Returns them and how long it waited.
    fn saved(&mut self, before: u64, after: SystemTime) -> Result<(BTreeMap<String, u64>, f64)> {
        let started = Instant::now();
        let deadline = started + DEADLINE;
        let mut last = (total(&self.files()), Instant::now());
        loop {
            self.check_alive()?;
            let files = self.files();
            if Instant::now() >= deadline {
                return Ok((files, started.elapsed().as_secs_f64()));
            }
            let done = if self.gateway.is_some() {
                let size = total(&files);
                if size != last.0 {
                    last = (size, Instant::now());
                }
                let quiet = last.1.elapsed();
                (size != before && quiet >= DISK_QUIET) || quiet >= DISK_UNCHANGED
            } else {
                std::fs::metadata(&self.disk)
                    .and_then(|m| m.modified())
                    .is_ok_and(|at| at >= after + Duration::from_millis(500))
            };
            if done {
                return Ok((files, started.elapsed().as_secs_f64()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the broker under test (SIGTERM, as a service manager would): Watchpost closes its
    /// database, Mosquitto saves its own once more.
    fn stop(&mut self) {
        match &mut self.gateway {
            Some(gw) => gw.proc.stop(),
            None => {
                for broker in &mut self.brokers {
                    broker.proc.stop();
                }
            }
        }
    }
}

/// Sizes of the regular files under `dir`, by their path below it after `prefix`.
fn sizes(dir: &Path, prefix: &str, out: &mut BTreeMap<String, u64>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        match entry.metadata() {
            Ok(m) if m.is_dir() => sizes(&entry.path(), &format!("{name}/"), out),
            Ok(m) => {
                out.insert(name, m.len());
            }
            Err(_) => {}
        }
    }
}

fn total(files: &BTreeMap<String, u64>) -> u64 {
    files.values().sum()
}

/// Mosquitto's count of retained messages, from `$SYS` (a retained message itself, so a new
/// subscriber gets it at once).
fn mosquitto_retained(addr: SocketAddr) -> Result<u64> {
    const COUNT: &str = "$SYS/broker/retained messages/count";
    let mut conn = Conn::connect(addr, "bench-retained-sys")?;
    conn.stream()
        .set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write(&wire::subscribe_packet(&[COUNT], 0))?;
    let n = loop {
        match conn.next().context("reading Mosquitto's $SYS")? {
            Some(Incoming::Publish { topic, payload, .. }) if topic == COUNT.as_bytes() => {
                break std::str::from_utf8(payload)?
                    .trim()
                    .parse()
                    .with_context(|| format!("{COUNT} is {payload:?}"))?;
            }
            Some(_) => {}
            None => bail!("{addr} closed the connection before {COUNT}"),
        }
    };
    conn.disconnect(Duration::from_secs(5))?;
    Ok(n)
}

/// Publishes messages `k`, `k + PUBLISHERS`, ... of `messages` retained at QoS 1 as client
/// `bench-retain-k`, [`WINDOW`] in flight, and waits for every PUBACK.
fn publish(addr: SocketAddr, k: usize, messages: usize) -> Result<()> {
    let id = format!("bench-retain-{k}");
    let mut conn = Conn::connect(addr, &id)?;
    conn.stream()
        .set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut mine = (k..messages).step_by(PUBLISHERS);
    let (mut in_flight, mut pkid, mut more) = (0, 0u16, true);
    let mut packet = Vec::new();
    while more || in_flight > 0 {
        packet.clear();
        while more && in_flight < WINDOW {
            match mine.next() {
                Some(i) => {
                    pkid = pkid % u16::MAX + 1;
                    wire::put_publish(
                        &mut packet,
                        topic(i).as_bytes(),
                        &payload(i),
                        Some(pkid),
                        true,
                    );
                    in_flight += 1;
                }
                None => more = false,
            }
        }
        if !packet.is_empty() {
            conn.write(&packet)?;
        }
        if in_flight > 0 {
            match conn
                .next()
                .with_context(|| format!("{id} waiting for a PUBACK"))?
            {
                Some(Incoming::PubAck) => in_flight -= 1,
                Some(_) => {}
                None => bail!("{addr} closed the connection of {id}"),
            }
        }
    }
    conn.disconnect(Duration::from_secs(5))?;
    Ok(())
}

/// What a new subscriber to `#` got.
struct Delivery {
    /// Distinct messages of the plan received.
    delivered: usize,
    /// Messages of the plan received again.
    duplicates: usize,
    /// Messages of the plan that came without the retain flag.
    not_flagged: usize,
    /// Other messages (the gateway's own retained ones).
    others: usize,
    /// SUBSCRIBE written → SUBACK read.
    suback: Option<Duration>,
    /// SUBSCRIBE written → first message of the plan read.
    first: Option<Duration>,
    /// SUBSCRIBE written → last new message of the plan read.
    last: Option<Duration>,
}

/// Connects with a clean session, subscribes to `#` at QoS 1, and reads until it has every
/// one of `messages` or hears nothing for [`SILENCE`], acknowledging each as it reads it.
fn new_subscriber(addr: SocketAddr, messages: usize) -> Result<Delivery> {
    let mut conn = Conn::connect(addr, "bench-retained-new")?;
    conn.stream().set_read_timeout(Some(SILENCE))?;
    let mut seen = vec![false; messages];
    let mut d = Delivery {
        delivered: 0,
        duplicates: 0,
        not_flagged: 0,
        others: 0,
        suback: None,
        first: None,
        last: None,
    };
    let packet = wire::subscribe_packet(&["#"], 1);
    let sent = Instant::now();
    conn.write(&packet)?;
    while d.delivered < messages {
        let ack = match conn.next() {
            Ok(Some(Incoming::Publish {
                topic,
                pkid,
                retain,
                ..
            })) => {
                match index_of(topic).and_then(|i| seen.get_mut(i)) {
                    Some(seen) if *seen => d.duplicates += 1,
                    Some(seen) => {
                        *seen = true;
                        d.delivered += 1;
                        let at = sent.elapsed();
                        d.first.get_or_insert(at);
                        d.last = Some(at);
                        d.not_flagged += usize::from(!retain);
                    }
                    None => d.others += 1,
                }
                pkid
            }
            Ok(Some(Incoming::Other)) => {
                d.suback.get_or_insert(sent.elapsed());
                None
            }
            Ok(Some(Incoming::PubAck)) => None,
            Ok(None) => bail!("{addr} closed the connection of the new subscriber"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => return Err(e).context("the new subscriber"),
        };
        if let Some(pkid) = ack {
            conn.write(&wire::puback_packet(pkid))?;
        }
    }
    conn.disconnect(Duration::from_secs(5))?;
    Ok(d)
}

/// Runs the workload against `system` (Watchpost or bare Mosquitto) in `dir`.
pub fn run(bins: &Bins, dir: &Path, system: System, plan: &Plan) -> Result<Value> {
    let name = system.name();
    let mut sut = Sut::start(bins, dir, system)?;
    let (addr, pid) = (sut.addr, sut.pid);
    let n = plan.messages;

    // Fresh: what the broker retains of its own, holds on disk, and takes in memory. Mosquitto
    // writes its file at its first autosave.
    let retained_idle = sut.retained()?;
    let (disk_idle, _) = sut.saved(0, SystemTime::now() - Duration::from_millis(500))?;
    let idle = Usage::of(pid)?;

    let publishing = Instant::now();
    std::thread::scope(|scope| {
        let all: Vec<_> = (0..PUBLISHERS)
            .map(|k| scope.spawn(move || publish(addr, k, n)))
            .collect();
        all.into_iter()
            .map(|t| t.join().unwrap_or_else(|_| bail!("a publisher panicked")))
            .collect::<Result<Vec<()>>>()
    })?;
    let publish_s = publishing.elapsed().as_secs_f64();
    let acknowledged = Instant::now();
    let want = retained_idle + n as u64;
    let retained_count = sut.wait_retained(want)?;
    let counted_s = acknowledged.elapsed().as_secs_f64();
    if retained_count < want {
        eprintln!(
            "{name}: counts {retained_count} retained messages after {DEADLINE:?}, not {want}; measuring anyway"
        );
    }
    let counted = SystemTime::now();
    sut.check_alive()?;
    let loaded = Usage::of(pid)?;
    let (disk, disk_wait_s) = sut.saved(total(&disk_idle), counted)?;

    let delivery = new_subscriber(addr, n)?;
    if delivery.delivered < n {
        eprintln!(
            "{name}: the new subscriber to # got {} of {n} retained messages",
            delivery.delivered
        );
    }
    sut.check_alive()?;
    let delivered = Usage::of(pid)?;
    let counters = match &sut.gateway {
        Some(gw) => {
            let m = gw.metrics()?;
            Some((
                m.sum("watchpost_broker_retained_refused_total"),
                m.sum("watchpost_broker_queue_dropped_total"),
            ))
        }
        None => None,
    };
    let startup_ms = sut
        .gateway
        .as_ref()
        .map(|g| g.startup.as_secs_f64() * 1000.0);
    sut.stop();
    let stopped = sut.files();

    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
    let mean = |f: fn(usize) -> usize| (0..n).map(f).sum::<usize>() as f64 / n.max(1) as f64;
    Ok(json!({
        "system": name,
        "messages": n,
        "publishers": PUBLISHERS,
        "topic_bytes": mean(|i| topic(i).len()),
        "payload_bytes": mean(|i| payload(i).len()),
        "idle_rss_kib": idle.rss_kib,
        "rss_kib": loaded.rss_kib,
        "hwm_kib": loaded.hwm_kib,
        "delivered_rss_kib": delivered.rss_kib,
        "publish_s": publish_s,
        "retained_idle": retained_idle,
        "retained_count": retained_count,
        "retained_count_wait_s": counted_s,
        "disk_idle_bytes": total(&disk_idle),
        "disk_idle_files": disk_idle,
        "disk_bytes": total(&disk),
        "disk_files": disk,
        "disk_wait_s": disk_wait_s,
        "disk_stopped_bytes": total(&stopped),
        "disk_stopped_files": stopped,
        "delivered": delivery.delivered,
        "duplicates": delivery.duplicates,
        "not_flagged": delivery.not_flagged,
        "other_messages": delivery.others,
        "suback_ms": ms(delivery.suback),
        "first_ms": ms(delivery.first),
        "deliver_s": delivery.last.map(|d| d.as_secs_f64()),
        "retained_refused": counters.map(|c| c.0),
        "queue_dropped": counters.map(|c| c.1),
        "startup_ms": startup_ms,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_name_their_message_and_nothing_else() {
        assert_eq!(topic(4242), "site/area42/dev4242/config");
        assert_eq!(topic(7), "site/area0/dev7/config");
        for i in [0, 7, 99, 100, 4242, 9999] {
            assert_eq!(index_of(topic(i).as_bytes()), Some(i));
        }
        for other in [
            "site/area1/dev7/config",
            "site/area0/dev7/state",
            "alerts/critical/d/r",
            "site/area0/dev07/config",
        ] {
            assert_eq!(index_of(other.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn payloads_are_json_of_about_a_hundred_bytes() {
        for i in [0, 7, 4242, 9999] {
            let p = payload(i);
            assert!((90..=110).contains(&p.len()), "{} bytes", p.len());
            let doc: Value = serde_json::from_slice(&p).unwrap();
            assert_eq!(doc["device"], format!("dev{i}"));
        }
    }
}

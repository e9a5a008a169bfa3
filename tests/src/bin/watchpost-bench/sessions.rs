//! The sessions workload: what offline persistent sessions with queued messages cost in
//! memory, and whether every queued message comes back when its client does, in Watchpost and
//! in bare Mosquitto.
//!
//! Clients are the harness's raw ones ([`Conn`]), a pool of [`WORKERS`] threads, each taking
//! the next client id when it is done with the last: a thousand sessions are made, and come
//! back, in seconds, without a client library's tasks between the socket and the count.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::procs::{Bins, Gateway, Usage};
use crate::saturation::System;
use crate::setup::{self, Broker};
use crate::wire::{self, Conn, Incoming};

/// Clients connected at once.
pub const WORKERS: usize = 50;
/// The topic every session subscribes to, and the publisher publishes on.
pub const SHARED_TOPIC: &str = "bench/all";
/// Mosquitto has no gauge of its queues: the wait after the last PUBACK before its memory is
/// read. It queues a message for every matching session before it acknowledges it, so this
/// is a margin, not a synchronisation.
pub const MOSQUITTO_SETTLE: Duration = Duration::from_secs(2);
/// Watchpost's queued-messages gauge is refreshed every 5 s: how long to wait for it at most.
const GAUGE_DEADLINE: Duration = Duration::from_secs(30);
/// A returning client that hears nothing for this long has had all it will get.
const SILENCE: Duration = Duration::from_secs(5);

/// How many sessions and messages.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Persistent sessions (client ids `s0000`, `s0001`, ...).
    pub sessions: usize,
    /// QoS 1 messages published to [`SHARED_TOPIC`] while they are away: queued for each.
    pub messages: usize,
    /// Bytes of each message's payload.
    pub payload: usize,
}

/// The client id of session `n`.
fn client_id(n: usize) -> String {
    format!("s{n:04}")
}

/// The payload of message `seq`: its number in eight digits, padded to `len` bytes.
fn payload(seq: usize, len: usize) -> Vec<u8> {
    let mut p = format!("{seq:08}").into_bytes();
    p.resize(len.max(8), b'.');
    p
}

/// The message number a [`payload`] carries.
fn seq_of(payload: &[u8]) -> Option<usize> {
    std::str::from_utf8(payload.get(..8)?).ok()?.parse().ok()
}

/// Runs `f` for every n in `0..count` on [`WORKERS`] threads; the results in order of n, or
/// the first error.
fn each_client<T: Send>(count: usize, f: impl Fn(usize) -> Result<T> + Sync) -> Result<Vec<T>> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<T>>> = Mutex::new((0..count).map(|_| None).collect());
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..WORKERS.min(count) {
            scope.spawn(|| {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= count || failed.lock().expect("not poisoned").is_some() {
                        return;
                    }
                    match f(n) {
                        Ok(v) => results.lock().expect("not poisoned")[n] = Some(v),
                        Err(e) => {
                            failed.lock().expect("not poisoned").get_or_insert(e);
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().expect("not poisoned") {
        return Err(e);
    }
    Ok(results
        .into_inner()
        .expect("not poisoned")
        .into_iter()
        .map(|v| v.expect("every client ran"))
        .collect())
}

/// What one returning client got.
struct Returned {
    present: bool,
    /// Distinct messages of this run received.
    delivered: usize,
    /// Messages received again (the same number twice).
    duplicates: usize,
    /// When its last new message came (or its CONNACK, if none did).
    last: Instant,
}

/// Comes back as `id` with the session kept, acknowledges everything the broker sends, and
/// counts the distinct messages until it has all `expected` of them or hears nothing for
/// [`SILENCE`]; then leaves with DISCONNECT.
fn come_back(addr: SocketAddr, id: &str, expected: usize) -> Result<Returned> {
    let (mut conn, present) = Conn::open(addr, id, false)?;
    let mut seen = vec![false; expected];
    let (mut delivered, mut duplicates) = (0, 0);
    let mut last = Instant::now();
    conn.stream().set_read_timeout(Some(SILENCE))?;
    while delivered < expected {
        let ack = match conn.next() {
            Ok(Some(Incoming::Publish {
                topic,
                payload,
                pkid,
                ..
            })) => {
                if topic == SHARED_TOPIC.as_bytes() {
                    match seq_of(payload).and_then(|s| seen.get_mut(s)) {
                        Some(seen) if *seen => duplicates += 1,
                        Some(seen) => {
                            *seen = true;
                            delivered += 1;
                            last = Instant::now();
                        }
                        None => bail!("{id} got a message on {SHARED_TOPIC} that is not ours"),
                    }
                }
                pkid
            }
            Ok(Some(_)) => None,
            Ok(None) => bail!("{addr} closed the connection of returning {id}"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => return Err(e).with_context(|| format!("returning {id}")),
        };
        if let Some(pkid) = ack {
            conn.write(&wire::puback_packet(pkid))?;
        }
    }
    conn.disconnect(SILENCE)?;
    Ok(Returned {
        present,
        delivered,
        duplicates,
        last,
    })
}

/// The broker under test.
struct Sut {
    addr: SocketAddr,
    pid: u32,
    gateway: Option<Gateway>,
    brokers: Vec<Broker>,
}

impl Sut {
    /// Watchpost with the harness's usual configuration (its upstream a bare Mosquitto), or
    /// bare Mosquitto with the harness's usual configuration. Both keep what this workload
    /// needs by default: Watchpost keeps a session a day (`broker.max_session_expiry`) and
    /// queues 1,000 messages (or 1 MiB) per session; Mosquitto keeps sessions for ever
    /// (no `persistent_client_expiration`) and queues 1,000 QoS 1 messages per session
    /// (`max_queued_messages`), in memory (`persistence false` only means it saves nothing to
    /// disk).
    fn start(bins: &Bins, dir: &Path, system: System) -> Result<Sut> {
        std::fs::create_dir_all(dir)?;
        Ok(match system {
            System::Watchpost => {
                let upstream = setup::bare_mosquitto(&dir.join("upstream"))?;
                let gw = setup::watchpost(bins, &dir.join("watchpost"), upstream.addr, None, "")?;
                Sut {
                    addr: gw.mqtt,
                    pid: gw.proc.pid(),
                    gateway: Some(gw),
                    brokers: vec![upstream],
                }
            }
            System::Mosquitto => {
                let broker = setup::bare_mosquitto(&dir.join("mosquitto"))?;
                Sut {
                    addr: broker.addr,
                    pid: broker.proc.pid(),
                    gateway: None,
                    brokers: vec![broker],
                }
            }
            System::Rumqttd => bail!("the sessions workload compares Watchpost and Mosquitto"),
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
}

/// Runs the workload against `system` (Watchpost or bare Mosquitto) in `dir`.
pub fn run(bins: &Bins, dir: &Path, system: System, plan: &Plan) -> Result<Value> {
    let mut sut = Sut::start(bins, dir, system)?;
    let (addr, pid) = (sut.addr, sut.pid);
    let idle = Usage::of(pid)?;

    // Sessions: each subscribes to its own topic and the shared one, then leaves.
    let started = Instant::now();
    let fresh = each_client(plan.sessions, |n| {
        let id = client_id(n);
        let (mut conn, present) =
            Conn::open(addr, &id, false).with_context(|| format!("session {id}"))?;
        let own = format!("bench/s/{id}");
        conn.subscribe(&[&own, SHARED_TOPIC], 1)
            .with_context(|| format!("session {id}"))?;
        conn.disconnect(SILENCE)
            .with_context(|| format!("session {id}"))?;
        Ok(present)
    })?;
    let subscribe_s = started.elapsed().as_secs_f64();
    let stale = fresh.iter().filter(|p| **p).count();
    if stale > 0 {
        bail!(
            "{} said a session was present for {stale} new clients on a fresh start",
            system.name()
        );
    }
    sut.check_alive()?;
    let away = Usage::of(pid)?;

    // Messages for them, one at a time, each acknowledged.
    let mut publisher = Conn::connect(addr, "bench-publisher")?;
    publisher
        .stream()
        .set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut packet = Vec::new();
    for seq in 0..plan.messages {
        packet.clear();
        let pkid = (seq % usize::from(u16::MAX)) as u16 + 1;
        wire::put_publish(
            &mut packet,
            SHARED_TOPIC.as_bytes(),
            &payload(seq, plan.payload),
            Some(pkid),
            false,
        );
        publisher.write(&packet)?;
        loop {
            match publisher.next().context("waiting for a PUBACK")? {
                Some(Incoming::PubAck) => break,
                Some(_) => continue,
                None => bail!("{} closed the publisher's connection", system.name()),
            }
        }
    }
    publisher.disconnect(SILENCE)?;
    let published = Instant::now();
    let expected = plan.sessions * plan.messages;

    // Until they are queued: Watchpost's gauge, or Mosquitto's fixed settle.
    let (queued_gauge, queued_s, sessions_offline) = match &mut sut.gateway {
        Some(gw) => {
            let deadline = published + GAUGE_DEADLINE;
            let m = loop {
                gw.proc.check_alive()?;
                let m = gw.metrics()?;
                let queued = m.get("watchpost_broker_queued_messages") as usize;
                if queued >= expected || Instant::now() >= deadline {
                    break m;
                }
                std::thread::sleep(Duration::from_millis(250));
            };
            let queued = m.get("watchpost_broker_queued_messages");
            if (queued as usize) < expected {
                eprintln!(
                    "watchpost: watchpost_broker_queued_messages at {queued} after {GAUGE_DEADLINE:?}, not {expected}; measuring anyway"
                );
            }
            (
                Some(queued),
                published.elapsed().as_secs_f64(),
                Some(m.get("watchpost_broker_sessions_offline")),
            )
        }
        None => {
            std::thread::sleep(MOSQUITTO_SETTLE);
            (None, MOSQUITTO_SETTLE.as_secs_f64(), None)
        }
    };
    sut.check_alive()?;
    let loaded = Usage::of(pid)?;
    let queue_dropped = match &sut.gateway {
        Some(gw) => Some(gw.metrics()?.sum("watchpost_broker_queue_dropped_total")),
        None => None,
    };

    // They come back: each must find its session and everything queued for it.
    let returning = Instant::now();
    let back = each_client(plan.sessions, |n| {
        come_back(addr, &client_id(n), plan.messages)
    })?;
    let drain_s = back
        .iter()
        .map(|r| r.last)
        .max()
        .map_or(0.0, |last| (last - returning).as_secs_f64());
    sut.check_alive()?;
    let drained = Usage::of(pid)?;
    let present = back.iter().filter(|r| r.present).count();
    let delivered: usize = back.iter().map(|r| r.delivered).sum();
    let duplicates: usize = back.iter().map(|r| r.duplicates).sum();
    let short = back.iter().filter(|r| r.delivered < plan.messages).count();
    if present < plan.sessions || delivered < expected {
        eprintln!(
            "{}: {present} of {} sessions present on return, {delivered} of {expected} messages delivered ({short} clients short)",
            system.name(),
            plan.sessions
        );
    }
    let startup_ms = sut
        .gateway
        .as_ref()
        .map(|g| g.startup.as_secs_f64() * 1000.0);
    if let Some(gw) = sut.gateway.as_mut() {
        gw.proc.stop();
    }
    Ok(json!({
        "system": system.name(),
        "sessions": plan.sessions,
        "messages": plan.messages,
        "payload_bytes": plan.payload,
        "subscribe_s": subscribe_s,
        "idle_rss_kib": idle.rss_kib,
        "sessions_rss_kib": away.rss_kib,
        "rss_kib": loaded.rss_kib,
        "hwm_kib": loaded.hwm_kib,
        "queued_gauge": queued_gauge,
        "queued_wait_s": queued_s,
        "sessions_offline_gauge": sessions_offline,
        "queue_dropped": queue_dropped,
        "present": present,
        "delivered": delivered,
        "expected": expected,
        "duplicates": duplicates,
        "clients_short": short,
        "drain_s": drain_s,
        "drained_rss_kib": drained.rss_kib,
        "startup_ms": startup_ms,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_carry_their_number_and_have_the_planned_size() {
        let p = payload(42, 64);
        assert_eq!(p.len(), 64);
        assert_eq!(seq_of(&p), Some(42));
        assert_eq!(seq_of(b"bogus"), None);
    }

    #[test]
    fn every_client_runs_once_and_in_order() {
        let out = each_client(120, |n| Ok(n * 2)).unwrap();
        assert_eq!(out, (0..120).map(|n| n * 2).collect::<Vec<_>>());
        assert!(each_client(10, |n| if n == 7 { bail!("no") } else { Ok(n) }).is_err());
    }
}

//! The saturation load: N connections, each a thread that writes PUBLISH packets as fast as
//! the broker takes them (or at a set rate), QoS 0 or QoS 1 with a window of packets in flight.
//!
//! Every connection stands for `devices` devices; each message is one reading on
//! `sensors/{device}/{metric}` as `{"v":..,"seq":..}`, with the device's `seq` counting up by
//! one per message, so that the gateway judges every one (no duplicates, no gaps). Values stay
//! in the normal range: no alerts. With a share of states, that share of each device's
//! messages are instead its door's state on `sensors/{device}/door`, `{"v":"open","seq":..}`
//! and `{"v":"closed","seq":..}` in turn, spread evenly over devices and time. With `retain`,
//! every message has the retain flag set, as a sensor does whose last reading a dashboard
//! that connects later should see. Packets are formatted in the writing thread into batches
//! of about 64 KiB, without allocating per message.
//!
//! Runs as a process of its own (`watchpost-bench flood ...`): prints `ready` once every
//! connection is accepted, starts on a line on stdin, and prints a JSON report when done.

use std::io::{BufRead, ErrorKind, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use watchpost_firmware::payload::{self, State, Writer};

use crate::wire::{self, Conn, Incoming};

/// Metric names of the flood's devices.
pub const METRICS: [&str; 3] = ["temperature", "humidity", "pressure"];

/// The metric of the states, when a share of the readings are states.
pub const STATE_METRIC: &str = "door";

/// QoS 1 packets in flight per connection.
pub const WINDOW: u64 = 64;

/// What to flood.
#[derive(Debug, Clone)]
pub struct Flood {
    /// The broker.
    pub addr: SocketAddr,
    /// Connections.
    pub conns: usize,
    /// 0 or 1.
    pub qos: u8,
    /// Messages per second over all connections; 0 for as fast as possible.
    pub rate: f64,
    /// How long to send.
    pub seconds: f64,
    /// Devices per connection.
    pub devices: usize,
    /// Per cent of the readings that are states (0: numbers only).
    pub states: u8,
    /// Whether every message has the retain flag set.
    pub retain: bool,
    /// Client ids and device ids start with this.
    pub prefix: String,
}

#[derive(Default)]
struct Totals {
    sent: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
}

/// The `flood` mode.
pub fn main(flood: Flood) -> Result<()> {
    let totals = Arc::new(Totals::default());
    let go = Arc::new(Barrier::new(flood.conns + 1));
    let mut conns = Vec::new();
    for i in 0..flood.conns {
        let id = format!("{}{i}", flood.prefix);
        conns.push(Conn::connect(flood.addr, &id).with_context(|| format!("connection {id}"))?);
    }
    let mut threads = Vec::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let (flood, totals, go) = (flood.clone(), totals.clone(), go.clone());
        threads.push(std::thread::spawn(move || {
            go.wait();
            if let Err(e) = one(conn, i, &flood, &totals) {
                eprintln!("connection {i}: {e:#}");
                totals.errors.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    println!("ready {} connections", flood.conns);
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let started = Instant::now();
    go.wait();
    for t in threads {
        let _ = t.join();
    }
    let report = json!({
        "sent": totals.sent.load(Ordering::Relaxed),
        "acked": totals.acked.load(Ordering::Relaxed),
        "errors": totals.errors.load(Ordering::Relaxed),
        "seconds": started.elapsed().as_secs_f64(),
    });
    println!("{report}");
    Ok(())
}

/// Writes `buf`, waiting as long as the socket takes it until `until`; returns how many
/// bytes went out, fewer than all only when time was up.
fn write_until(w: &mut TcpStream, buf: &[u8], until: Instant) -> Result<usize> {
    let mut off = 0;
    while off < buf.len() {
        match w.write(&buf[off..]) {
            Ok(0) => anyhow::bail!("the broker closed the connection"),
            Ok(n) => off += n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                if Instant::now() >= until {
                    break;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(off)
}

/// Whether the `i`-th reading of a sequence is a state when `percent` of them are, and if so
/// whether it is `open`: every (100 / `percent`)-th reading, on average, `open` and `closed`
/// in turn.
fn state_at(i: u64, percent: u8) -> Option<bool> {
    let p = u64::from(percent);
    let (before, after) = (i * p / 100, (i + 1) * p / 100);
    (after > before).then_some(after % 2 == 1)
}

/// Appends what `write` puts into one of the firmware's payload writers.
fn put(
    out: &mut Vec<u8>,
    write: impl FnOnce(&mut Writer<'_>) -> Result<(), payload::Error>,
) -> Result<()> {
    let mut buf = [0u8; 48];
    let mut w = Writer::new(&mut buf);
    write(&mut w).map_err(|e| anyhow::anyhow!("{e}"))?;
    let n = w.len();
    out.extend_from_slice(&buf[..n]);
    Ok(())
}

/// The payload of a door's state reading, as the firmware writes it: `{"v":"open","seq":..}`
/// (or `closed`).
fn state_payload(out: &mut Vec<u8>, open: bool, seq: u32) -> Result<()> {
    let word = if open { "open" } else { "closed" };
    put(out, |w| payload::single_state(w, State::Word(word), seq))
        .with_context(|| format!("formatting state reading {seq}"))
}

/// The payload of message `k` of a connection with `devices` devices, as the firmware writes
/// it: a value between 20.0 and 29.9 and the device's `seq`.
fn payload(out: &mut Vec<u8>, k: u64, devices: u64) -> Result<()> {
    let milli = 20_000 + (k.wrapping_mul(7) % 100) as i32 * 100;
    put(out, |w| payload::single(w, milli, (k / devices) as u32))
        .with_context(|| format!("formatting reading {k}"))
}

fn one(mut conn: Conn, index: usize, flood: &Flood, totals: &Totals) -> Result<()> {
    let devices = flood.devices.max(1) as u64;
    // Topics of every device and metric, made once.
    let topic = |d: u64, m: &str| format!("sensors/{}{index}-{d}/{m}", flood.prefix).into_bytes();
    let topics: Vec<[Vec<u8>; 3]> = (0..devices).map(|d| METRICS.map(|m| topic(d, m))).collect();
    let doors: Vec<Vec<u8>> = (0..devices).map(|d| topic(d, STATE_METRIC)).collect();
    let per_conn = flood.rate / flood.conns as f64;
    let until = Instant::now() + Duration::from_secs_f64(flood.seconds);
    let start = Instant::now();
    let mut writer = conn.stream().try_clone()?;
    let acked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // Everything the broker sends is read, PUBACKs counted, until the load is done and the
    // broker has been quiet for a moment. Nothing may be left unread at the close: that would
    // make it a reset, and a reset makes the broker's kernel discard what it had received and
    // not yet read, readings lost to the harness rather than to the broker. For the same
    // reason the load sends no PINGREQ (its PUBLISHes keep the connection alive), so that no
    // PINGRESP can arrive after the reader stopped.
    conn.stream()
        .set_read_timeout(Some(Duration::from_millis(500)))?;
    let reader = {
        let (acked, done) = (acked.clone(), done.clone());
        let me = std::thread::current();
        std::thread::spawn(move || {
            loop {
                match conn.next() {
                    Ok(Some(Incoming::PubAck)) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                        me.unpark();
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        if done.load(Ordering::Relaxed) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        })
    };
    let mut batch = Vec::with_capacity(80 * 1024);
    // Where each message of the batch ends, to count what a write cut short did send.
    let mut ends = Vec::with_capacity(1024);
    let mut body = Vec::with_capacity(64);
    let mut k: u64 = 0;
    // A broker that stops reading must not hold the load past its time.
    writer.set_write_timeout(Some(Duration::from_millis(100)))?;
    let mut torn = false;
    while Instant::now() < until {
        let mut room = 1024u64;
        if per_conn > 0.0 {
            let allowed = (start.elapsed().as_secs_f64() * per_conn) as u64;
            room = room.min(allowed.saturating_sub(k));
        }
        if flood.qos == 1 {
            room = room.min(WINDOW.saturating_sub(k - acked.load(Ordering::Relaxed)));
        }
        if room == 0 {
            if flood.qos == 1 {
                std::thread::park_timeout(Duration::from_millis(1));
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
            continue;
        }
        batch.clear();
        ends.clear();
        let first = k;
        for _ in 0..room {
            let d = (k % devices) as usize;
            let round = k / devices;
            body.clear();
            // Device d's state readings are every few rounds, and in one round every few
            // devices send one.
            let topic = match state_at(round + d as u64, flood.states) {
                Some(open) => {
                    state_payload(&mut body, open, round as u32)?;
                    &doors[d]
                }
                None => {
                    payload(&mut body, k, devices)?;
                    &topics[d][(round % 3) as usize]
                }
            };
            let pkid = (flood.qos == 1).then(|| (k % 65_535) as u16 + 1);
            wire::put_publish(&mut batch, topic, &body, pkid, flood.retain);
            ends.push(batch.len());
            k += 1;
            if batch.len() >= 64 * 1024 {
                break;
            }
        }
        let written = write_until(&mut writer, &batch, until)?;
        if written < batch.len() {
            // Time is up in the middle of the batch: count only whole messages, and send
            // nothing more on a stream that ends inside a packet.
            k = first + ends.iter().filter(|&&end| end <= written).count() as u64;
            torn = true;
            break;
        }
    }
    if flood.qos == 1 && !torn {
        let deadline = Instant::now() + Duration::from_secs(15);
        while acked.load(Ordering::Relaxed) < k && Instant::now() < deadline {
            std::thread::park_timeout(Duration::from_millis(10));
        }
    }
    done.store(true, Ordering::Relaxed);
    // Once the reader has drained what came back: DISCONNECT and close, in order.
    let _ = reader.join();
    totals.sent.fetch_add(k, Ordering::Relaxed);
    totals
        .acked
        .fetch_add(acked.load(Ordering::Relaxed), Ordering::Relaxed);
    if !torn {
        let _ = writer.write_all(&[0xe0, 0]);
    }
    let _ = writer.shutdown(std::net::Shutdown::Write);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_readings_with_a_rising_seq_per_device() {
        let mut out = Vec::new();
        payload(&mut out, 0, 10).unwrap();
        assert_eq!(out, br#"{"v":20,"seq":0}"#);
        out.clear();
        payload(&mut out, 23, 10).unwrap();
        assert_eq!(out, br#"{"v":26.1,"seq":2}"#);
    }

    #[test]
    fn a_share_of_readings_are_states_open_and_closed_in_turn() {
        let states: Vec<_> = (0..20).filter_map(|i| state_at(i, 20)).collect();
        assert_eq!(states, [true, false, true, false]);
        assert_eq!((0..1000).filter_map(|i| state_at(i, 20)).count(), 200);
        assert_eq!((0..1000).filter_map(|i| state_at(i, 0)).count(), 0);
        let mut out = Vec::new();
        state_payload(&mut out, true, 7).unwrap();
        assert_eq!(out, br#"{"v":"open","seq":7}"#);
        out.clear();
        state_payload(&mut out, false, 8).unwrap();
        assert_eq!(out, br#"{"v":"closed","seq":8}"#);
    }
}

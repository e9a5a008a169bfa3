//! A local subscriber that never reads: the real `watchpost` process, a client subscribed to
//! `#` that reads nothing after its SUBACK, a flood of readings, and alerts firing at a high
//! rate. The client's queue stays at its bound and what does not fit is dropped, counted and
//! logged; another local subscriber and the upstream receive every alert; the gateway's memory
//! stays under a bound.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use watchpost_e2e::{Collector, GatewayProcess, Mosquitto, Publisher, clients};

const BIN: &str = env!("CARGO_BIN_EXE_watchpost");
const DEADLINE: Duration = Duration::from_secs(30);
/// Devices whose alerts go up and down.
const DEVICES: usize = 25;
/// Readings per device, each one a transition (raised, cleared, raised, ...).
const ROUNDS: usize = 80;
/// Readings of the flood that fills the silent client's socket and queue.
const FLOOD: usize = 500_000;
/// What the gateway's resident memory must stay under (a debug build; the release build's
/// figure under a much larger flood is in BENCHMARKS.md).
const RSS_BOUND_KIB: u64 = 56 * 1024;

fn write_config(dir: &Path, upstream: u16) -> PathBuf {
    let path = dir.join("watchpost.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"site-slow\"\ndata_dir = {:?}\n\
             [broker]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = true\nmax_publish_rate = 0\n\
             [http]\nlisten = \"off\"\n[uplink]\nurl = \"mqtt://127.0.0.1:{upstream}\"\n\
             [[rule]]\nname = \"hot\"\nmatch = \"sensors/+/temperature\"\nabove = 50.0\nclear_below = 40.0\nseverity = \"critical\"\n",
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    path
}

/// The resident memory of process `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A client subscribed to `#` that reads its CONNACK and SUBACK and nothing after.
fn silent_subscriber(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&clients::connect_packet("silent", None))
        .unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    s.write_all(&[0x82, 6, 0, 1, 0, 1, b'#', 0]).unwrap();
    let mut suback = [0u8; 5];
    s.read_exact(&mut suback).unwrap();
    assert_eq!(suback[0], 0x90, "{suback:?}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_never_reads_costs_neither_alerts_nor_memory() {
    let upstream = Mosquitto::start().unwrap();
    let up_alerts = Collector::subscribe(upstream.addr(), "site-slow/alerts/#")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), upstream.port());
    let mut gateway = GatewayProcess::spawn(BIN, &config);
    let addr = gateway.wait_ready(DEADLINE);
    let pid = gateway.pid();
    let before = rss_kib(pid);

    let _silent = silent_subscriber(addr);
    let local_alerts = Collector::subscribe(addr, "alerts/#").await.unwrap();

    // Peak memory, sampled while everything below runs.
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // The flood, QoS 0 (what the gateway cannot take it may drop; it is not what is checked).
    let flood = Publisher::connect(addr, "flood").await.unwrap();
    let flooding = tokio::spawn(async move {
        for i in 0..FLOOD {
            let topic = format!("sensors/f-{}/humidity", i % 500);
            if flood
                .publish(&topic, QoS::AtMostOnce, format!("{}", 30 + i % 40))
                .await
                .is_err()
            {
                break;
            }
        }
        flood
    });
    // Alerts at a high rate: every reading crosses the threshold one way or the other.
    let sensors = Publisher::connect(addr, "boilers").await.unwrap();
    let started = Instant::now();
    for round in 0..ROUNDS {
        let value = if round % 2 == 0 { "60" } else { "30" };
        for d in 0..DEVICES {
            sensors
                .publish(
                    &format!("sensors/boiler-{d}/temperature"),
                    QoS::AtLeastOnce,
                    value,
                )
                .await
                .unwrap();
        }
    }
    let expected = DEVICES * ROUNDS;
    sensors.wait_acked(expected as u64, DEADLINE).await.unwrap();
    let _flood = flooding.await.unwrap();
    let transitions = |messages: &[watchpost_e2e::Received]| -> BTreeSet<(String, String)> {
        messages
            .iter()
            .map(|m| {
                let doc = m.json();
                (
                    doc["id"].as_str().unwrap().to_owned(),
                    doc["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let local = local_alerts
        .wait_for(expected, DEADLINE)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let up = up_alerts
        .wait_for(expected, DEADLINE)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let took = started.elapsed();
    assert_eq!(transitions(&local).len(), expected, "every alert, locally");
    assert_eq!(transitions(&up).len(), expected, "every alert, upstream");
    sampler.abort();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{expected} transitions in {took:?} beside a flood of {FLOOD} readings; RSS {before} KiB before, {peak} KiB at the peak"
    );
    assert!(
        peak < RSS_BOUND_KIB,
        "peak RSS {peak} KiB over the bound of {RSS_BOUND_KIB} KiB"
    );
    let dropped = gateway
        .wait_line(
            "messages for this client dropped: its queue is full",
            DEADLINE,
        )
        .unwrap_or_else(|| panic!("no drop logged: {:#?}", gateway.log()));
    assert!(dropped.contains("client=silent"), "{dropped}");
}

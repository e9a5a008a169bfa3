//! The fleet simulator (the firmware's own node logic over TCP) against real gateways: every
//! message it queues is acknowledged and judged, its excursions and leaks become alerts, and a
//! device that knows two gateways moves to the second when the first dies, losing nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use watchpost::stats::Stats;
use watchpost_e2e::failover::{self, KEEP_RAW};
use watchpost_e2e::{Collector, OVERHEAT, gateway_config, wait_until};

const DEADLINE: Duration = Duration::from_secs(30);

/// The shipped `water-leak` rule (config/watchpost.toml).
const WATER_LEAK: &str = "[[rule]]\nname = \"water-leak\"\nmatch = \"sensors/+/water_leak\"\nequals = true\nseverity = \"critical\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_simulated_message_is_acknowledged_decoded_and_judged() {
    let data = tempfile::tempdir().unwrap();
    let rules = format!("{OVERHEAT}{WATER_LEAK}");
    let gateway = watchpost::start(gateway_config(data.path(), None, &rules))
        .await
        .unwrap();
    let stats = gateway.stats().clone();
    let alerts = Collector::subscribe(gateway.mqtt_addr(), "alerts/#")
        .await
        .unwrap();

    let mut options = watchpost_sim::Options::new(gateway.mqtt_addr(), 50);
    options.rate = 5.0;
    options.anomaly = 0.02;
    options.leak = 0.01;
    options.duration = Duration::from_secs(3);
    options.seed = 42;
    let report = tokio::task::spawn_blocking(move || watchpost_sim::run(&options))
        .await
        .unwrap()
        .unwrap();

    assert_eq!(report.connected_at_end, 50, "{report}");
    assert!(
        report.queued > 50,
        "every device reports at least once: {report}"
    );
    assert_eq!(report.acked, report.queued, "{report}");
    assert_eq!(
        (report.dropped, report.unsent, report.links_lost),
        (0, 0, 0),
        "{report}"
    );
    assert!(
        wait_until(DEADLINE, || Stats::get(&stats.readings) == report.values).await,
        "gateway judged {} readings, the fleet sent {} values",
        Stats::get(&stats.readings),
        report.values
    );
    assert_eq!(stats.decode_errors.load(Ordering::Relaxed), 0);
    // About 15 excursions above 90 °C are expected (750 samples at 0.02); each device in one
    // raises the overheat alert.
    assert!(report.excursions > 0, "{report}");
    assert!(
        wait_until(DEADLINE, || Stats::get(&stats.alerts_raised) > 0).await,
        "no alert from {} excursions",
        report.excursions
    );
    // About 7 leaks (750 samples at 0.01), each debounced from a bouncing pin into one wet and
    // one dry state: each raises the water-leak alert once, and no bounce raises one.
    assert!(report.leaks > 0 && report.states >= 50, "{report}");
    let raised = |rule: &str| {
        alerts
            .messages()
            .iter()
            .filter(|m| m.topic.ends_with(&format!("/{rule}")))
            .filter(|m| m.json()["state"] == "raised")
            .count() as u64
    };
    assert!(
        wait_until(DEADLINE, || raised("water-leak") > 0).await,
        "no leak alert from {} leaks",
        report.leaks
    );
    assert!(raised("water-leak") <= report.leaks, "{report}");
    assert!(
        Stats::get(&stats.alerts_raised) <= report.excursions + report.leaks,
        "{report}"
    );
    gateway.shutdown().await;
}

/// A TCP relay in front of a gateway, standing for the network path to its box. `cut` is the
/// box losing power as the devices see it: open connections go silent (nothing forwarded either
/// way, no FIN, no RST), and new connections are refused. The gateway behind it keeps running,
/// so what it acknowledged before the cut can be counted afterwards.
struct Cable {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Cable {
    async fn to(gateway: SocketAddr) -> Cable {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let cut_in = cut.clone();
        let task = tokio::spawn(async move {
            while let Ok((device, _)) = listener.accept().await {
                if cut_in.load(Ordering::SeqCst) {
                    // The listener is dropped below; until then a late connect is reset.
                    drop(device);
                    break;
                }
                let cut = cut_in.clone();
                tokio::spawn(async move {
                    let Ok(gateway) = TcpStream::connect(gateway).await else {
                        return;
                    };
                    let (dr, dw) = device.into_split();
                    let (gr, gw) = gateway.into_split();
                    tokio::join!(pipe(dr, gw, &cut), pipe(gr, dw, &cut));
                });
            }
        });
        Cable { addr, cut, task }
    }

    /// Cuts the path: silence on open connections, and no new ones.
    async fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it drops the listener: connects are refused from here.
        let _ = TcpStream::connect(self.addr).await;
    }
}

/// Copies `from` to `to` until either ends; once `cut` is set, holds everything it reads.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: &AtomicBool,
) {
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if cut.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}

impl Drop for Cable {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Three simulated devices that know gateways A and B; A's power is cut (as the devices see
/// it) after about 1.5 s of a 5 s run. Every message each device queued must be in A's or B's
/// database, none dropped from a ring, and B's `seq` accounting must show nothing lost. A
/// gateway killed with SIGKILL is `gateway/tests/failover.rs`, with real processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_two_gateways_moves_to_the_second_when_the_first_loses_power_and_loses_nothing()
 {
    let rules = format!("{KEEP_RAW}{OVERHEAT}");
    let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = watchpost::start(gateway_config(data_a.path(), None, &rules))
        .await
        .unwrap();
    let b = watchpost::start(gateway_config(data_b.path(), None, &rules))
        .await
        .unwrap();
    let stats_a = a.stats().clone();
    let cable = Cable::to(a.mqtt_addr()).await;
    let options = failover::fleet(cable.addr, b.mqtt_addr(), 3);
    let sim = tokio::task::spawn_blocking(move || watchpost_sim::run(&options));

    // A takes readings for a while, then its power goes.
    assert!(
        wait_until(DEADLINE, || Stats::get(&stats_a.readings) >= 60).await,
        "A never got readings"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    cable.cut().await;
    let report = sim.await.unwrap().unwrap();
    a.shutdown().await;
    b.shutdown().await;

    failover::assert_nothing_lost(&report, 3, data_a.path(), data_b.path());
}

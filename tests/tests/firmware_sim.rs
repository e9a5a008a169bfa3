//! The fleet simulator (the firmware's own node logic over TCP) against a real gateway: every
//! message it queues is acknowledged and judged, and its excursions become alerts.

use std::sync::atomic::Ordering;
use std::time::Duration;

use watchpost::stats::Stats;
use watchpost_e2e::{Collector, OVERHEAT, gateway_config, wait_until};

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_simulated_message_is_acknowledged_decoded_and_judged() {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    let stats = gateway.stats().clone();
    let alerts = Collector::subscribe(gateway.mqtt_addr(), "alerts/#")
        .await
        .unwrap();

    let mut options = watchpost_sim::Options::new(gateway.mqtt_addr(), 50);
    options.rate = 5.0;
    options.anomaly = 0.02;
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
    assert!(Stats::get(&stats.alerts_raised) <= report.excursions);
    assert!(alerts.count() > 0);
    gateway.shutdown().await;
}

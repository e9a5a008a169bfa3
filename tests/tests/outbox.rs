//! Nothing lost: faults are made on purpose with a real upstream broker (Mosquitto), stopped,
//! restarted and frozen by the test, and every alert must still arrive.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rumqttc::QoS;
use watchpost::stats::Stats;
use watchpost_e2e::{
    Collector, Mosquitto, OVERHEAT, Publisher, Received, gateway_config_with, wait_until,
};

const DEADLINE: Duration = Duration::from_secs(30);

/// An alert document as it arrived: (device, id, state).
type Arrival = (String, String, String);

/// Distinct alert documents in arrival order, and the set of their (id, state).
fn alert_log(messages: &[Received]) -> (Vec<Arrival>, BTreeSet<(String, String)>) {
    let mut order = Vec::new();
    let mut distinct = BTreeSet::new();
    for m in messages.iter().filter(|m| m.topic.contains("/alerts/")) {
        let doc = m.json();
        let (id, state) = (
            doc["id"].as_str().unwrap().to_owned(),
            doc["state"].as_str().unwrap().to_owned(),
        );
        if distinct.insert((id.clone(), state.clone())) {
            order.push((doc["device"].as_str().unwrap().to_owned(), id, state));
        }
    }
    (order, distinct)
}

/// Raises and clears `rounds` times on each of `devices` devices: `2 * rounds * devices` alerts.
async fn fire_alerts(sensor: &Publisher, devices: usize, rounds: usize) {
    for round in 0..rounds {
        for value in ["95", "70"] {
            for d in 0..devices {
                let seq = round * 2 + usize::from(value == "70");
                let payload = format!("{{\"v\":{value},\"seq\":{seq}}}");
                sensor
                    .publish(
                        &format!("sensors/dev-{d}/temperature"),
                        QoS::AtLeastOnce,
                        payload,
                    )
                    .await
                    .unwrap();
            }
        }
    }
    sensor
        .wait_acked((2 * rounds * devices) as u64, DEADLINE)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_alerts_during_an_upstream_outage_all_arrive_in_order() {
    let mut upstream = Mosquitto::start_persistent().unwrap();
    let upstream_sub =
        Collector::subscribe_persistent(upstream.addr(), "site-test/alerts/#", "outage-watcher")
            .await
            .unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = gateway_config_with(data.path(), Some(upstream.port()), "", OVERHEAT);
    let gateway = watchpost::start(config).await.unwrap();
    let stats = gateway.stats().clone();
    assert!(wait_until(DEADLINE, || stats.uplink_connected.load(Ordering::Relaxed)).await);

    upstream.stop();
    assert!(
        wait_until(DEADLINE, || !stats.uplink_connected.load(Ordering::Relaxed)).await,
        "the outage is noticed"
    );
    let sensor = Publisher::connect(gateway.mqtt_addr(), "fleet")
        .await
        .unwrap();
    fire_alerts(&sensor, 50, 5).await;
    assert!(
        wait_until(DEADLINE, || Stats::get(&stats.outbox_depth) == 500).await,
        "outbox: {}",
        Stats::get(&stats.outbox_depth)
    );
    assert_eq!(Stats::get(&stats.uplink_acked), 0);

    upstream.restart().unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || Stats::get(&stats.outbox_depth)
            == 0)
        .await,
        "the outbox drains once the upstream is back: {} left",
        Stats::get(&stats.outbox_depth)
    );
    assert!(
        wait_until(DEADLINE, || alert_log(&upstream_sub.messages()).1.len()
            == 500)
        .await,
        "got {}",
        alert_log(&upstream_sub.messages()).1.len()
    );

    let (order, distinct) = alert_log(&upstream_sub.messages());
    assert_eq!(distinct.len(), 500);
    let mut per_device: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (device, _id, state) in &order {
        per_device
            .entry(device.clone())
            .or_default()
            .push(state.clone());
    }
    assert_eq!(per_device.len(), 50);
    let expected: Vec<String> = (0..10)
        .map(|i| if i % 2 == 0 { "raised" } else { "cleared" }.to_owned())
        .collect();
    for (device, states) in per_device {
        assert_eq!(
            states, expected,
            "{device}: raised and cleared alternate, in order"
        );
    }
    // Five episodes per device: five ids, each shared by its raised and cleared document.
    let ids: BTreeSet<_> = order.iter().map(|(_, id, _)| id.clone()).collect();
    assert_eq!(ids.len(), 250);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_upstream_is_noticed_within_two_keep_alives_and_gets_everything_after() {
    let upstream = Mosquitto::start().unwrap();
    let upstream_sub = Collector::subscribe(upstream.addr(), "site-test/alerts/#")
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = gateway_config_with(data.path(), Some(upstream.port()), "", OVERHEAT);
    let keep_alive = Duration::from_secs(1);
    config.uplink.as_mut().unwrap().keep_alive = keep_alive;
    let gateway = watchpost::start(config).await.unwrap();
    let stats = gateway.stats().clone();
    assert!(wait_until(DEADLINE, || stats.uplink_connected.load(Ordering::Relaxed)).await);

    upstream.pause();
    let frozen = Instant::now();
    assert!(wait_until(DEADLINE, || !stats.uplink_connected.load(Ordering::Relaxed)).await);
    let noticed = frozen.elapsed();
    eprintln!("frozen upstream noticed after {noticed:?} (keep-alive {keep_alive:?})");
    // Two keep-alives, plus a little for the scheduler.
    assert!(
        noticed <= keep_alive * 2 + Duration::from_millis(250),
        "noticed after {noticed:?}"
    );

    let sensor = Publisher::connect(gateway.mqtt_addr(), "fleet")
        .await
        .unwrap();
    fire_alerts(&sensor, 10, 1).await;
    assert!(
        wait_until(DEADLINE, || Stats::get(&stats.outbox_depth) == 20).await,
        "kept in the outbox"
    );

    upstream.resume();
    assert!(
        wait_until(Duration::from_secs(60), || Stats::get(&stats.outbox_depth)
            == 0)
        .await,
        "delivered after SIGCONT"
    );
    assert!(
        wait_until(DEADLINE, || alert_log(&upstream_sub.messages()).1.len()
            == 20)
        .await
    );
    assert!(stats.uplink_connected.load(Ordering::Relaxed));
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seq_gaps_duplicates_and_late_messages_are_counted_per_device() {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config_with(data.path(), None, "", OVERHEAT))
        .await
        .unwrap();
    let stats = gateway.stats().clone();
    let sensor = Publisher::connect(gateway.mqtt_addr(), "skipper")
        .await
        .unwrap();
    // Skips 3 and 4, repeats 5 twice, 7 arrives after 8; another device is in order.
    for (i, seq) in [0, 1, 2, 5, 5, 5, 6, 8, 7, 9].into_iter().enumerate() {
        sensor
            .publish(
                "sensors/skipper/temperature",
                QoS::AtLeastOnce,
                format!("{{\"v\":20,\"seq\":{seq}}}"),
            )
            .await
            .unwrap();
        sensor
            .publish(
                "sensors/steady/temperature",
                QoS::AtLeastOnce,
                format!("{{\"v\":20,\"seq\":{}}}", 100 + i),
            )
            .await
            .unwrap();
    }
    sensor.wait_acked(20, DEADLINE).await.unwrap();
    let counted = wait_until(DEADLINE, || {
        stats.device("skipper").is_some_and(|c| c.messages == 10)
    })
    .await;
    assert!(counted, "{:?}", stats.devices());
    let skipper = stats.device("skipper").unwrap();
    assert_eq!(
        (
            skipper.loss.lost,
            skipper.loss.duplicated,
            skipper.loss.out_of_order,
            skipper.readings
        ),
        (2, 2, 1, 8),
        "{skipper:?}"
    );
    let steady = stats.device("steady").unwrap();
    assert_eq!(
        (
            steady.loss.lost,
            steady.loss.duplicated,
            steady.loss.out_of_order
        ),
        (0, 0, 0)
    );
    assert_eq!(Stats::get(&stats.duplicates), 2);
    gateway.shutdown().await;

    // The counters are in the database too, for `watchpost devices`.
    let reader = watchpost::store::Reader::open(data.path()).unwrap();
    let rows = reader.devices().unwrap();
    let row = rows.iter().find(|d| d.device == "skipper").unwrap();
    assert_eq!(
        (row.lost, row.duplicated, row.out_of_order, row.messages),
        (2, 2, 1, 10)
    );
}

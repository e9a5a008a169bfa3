//! The gateway spine end to end: a reading from a real MQTT client becomes an alert on the
//! local broker and on a real upstream broker (Mosquitto).

use std::time::Duration;

use rumqttc::QoS;
use watchpost::stats::{OTHER_DEVICES, Stats};
use watchpost_e2e::{
    Collector, Mosquitto, OVERHEAT, Publisher, gateway_config, gateway_config_with, wait_until,
};

/// One test client stands in for many devices here, faster than any device would publish.
const UNLIMITED: &str = "max_publish_rate = 0";

const DEADLINE: Duration = Duration::from_secs(20);

/// Publishes a marker straight to the upstream broker and waits until `collector` (subscribed
/// to `#` there) has it. Everything the broker acknowledged before the marker was published
/// reaches the subscriber before the marker, so afterwards the collector holds all of it.
async fn upstream_barrier(upstream: &Mosquitto, collector: &Collector) {
    let marker = Publisher::connect(upstream.addr(), "marker").await.unwrap();
    marker
        .publish("marker", QoS::AtLeastOnce, "end")
        .await
        .unwrap();
    assert!(
        wait_until(DEADLINE, || collector
            .messages()
            .iter()
            .any(|m| m.topic == "marker"))
        .await,
        "marker never arrived upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_excursion_becomes_exactly_one_raised_and_one_cleared_alert_upstream() {
    let upstream = Mosquitto::start().unwrap();
    let upstream_sub = Collector::subscribe(upstream.addr(), "#").await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config_with(
        data.path(),
        Some(upstream.port()),
        UNLIMITED,
        OVERHEAT,
    ))
    .await
    .unwrap();
    let stats = gateway.stats().clone();
    assert!(
        wait_until(DEADLINE, || stats
            .uplink_connected
            .load(std::sync::atomic::Ordering::Relaxed))
        .await
    );

    let sensor = Publisher::connect(gateway.mqtt_addr(), "fleet")
        .await
        .unwrap();
    // 1,000 in-range readings from 10 devices, in several payload forms.
    for i in 0..1000u32 {
        let device = format!("dev-{}", i % 10);
        let value = 20.0 + f64::from(i % 50) / 10.0;
        match i % 3 {
            0 => {
                sensor
                    .publish(
                        &format!("sensors/{device}/temperature"),
                        QoS::AtLeastOnce,
                        value.to_string(),
                    )
                    .await
            }
            1 => {
                sensor
                    .publish(
                        &format!("sensors/{device}/temperature"),
                        QoS::AtLeastOnce,
                        format!("{{\"v\":{value},\"seq\":{}}}", i / 10),
                    )
                    .await
            }
            _ => {
                sensor
                    .publish(
                        &format!("sensors/{device}"),
                        QoS::AtLeastOnce,
                        format!("{{\"temperature\":{value},\"humidity\":40.5}}"),
                    )
                    .await
            }
        }
        .unwrap();
    }
    sensor
        .publish("sensors/dev-3/temperature", QoS::AtLeastOnce, "95.2")
        .await
        .unwrap();
    for i in 0..1000u32 {
        let value = 20.0 + f64::from(i % 50) / 10.0;
        sensor
            .publish(
                &format!("sensors/dev-{}/temperature", i % 10),
                QoS::AtLeastOnce,
                value.to_string(),
            )
            .await
            .unwrap();
    }
    sensor.wait_acked(2001, DEADLINE).await.unwrap();

    // Every reading was judged: 2,001 temperatures plus 333 humidities from object payloads.
    assert!(
        wait_until(DEADLINE, || Stats::get(&stats.readings) == 2001 + 333).await,
        "readings: {}",
        Stats::get(&stats.readings)
    );
    let alerts = upstream_sub.wait_for(2, DEADLINE).await.unwrap();
    assert!(wait_until(DEADLINE, || Stats::get(&stats.uplink_acked) == 2).await);
    upstream_barrier(&upstream, &upstream_sub).await;

    let all = upstream_sub.messages();
    let from_gateway: Vec<_> = all.iter().filter(|m| m.topic != "marker").collect();
    assert_eq!(
        from_gateway.len(),
        2,
        "nothing but the two alert documents goes upstream: {from_gateway:#?}"
    );
    let (raised, cleared) = (alerts[0].json(), alerts[1].json());
    for m in &alerts[..2] {
        assert_eq!(m.topic, "site-test/alerts/critical/dev-3/overheat");
    }
    assert_eq!(raised["state"], "raised");
    assert_eq!(cleared["state"], "cleared");
    for doc in [&raised, &cleared] {
        assert_eq!(doc["rule"], "overheat");
        assert_eq!(doc["device"], "dev-3");
        assert_eq!(doc["metric"], "temperature");
        assert_eq!(doc["severity"], "critical");
        assert_eq!(doc["threshold"], 90.0);
        assert_eq!(doc["gateway"], "site-test");
        for field in ["since", "at"] {
            let text = doc[field].as_str().unwrap();
            humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("{field} {text:?}: {e}"));
            assert!(
                text.ends_with('Z') && text.len() == "2026-11-21T18:05:45.123Z".len(),
                "{text}"
            );
        }
        assert_eq!(
            doc.as_object().unwrap().len(),
            11,
            "exactly the design's fields: {doc}"
        );
    }
    assert_eq!(raised["value"], 95.2);
    assert!(cleared["value"].as_f64().unwrap() < 85.0);
    assert_eq!(raised["id"], cleared["id"], "one episode, one id");
    let id = raised["id"].as_str().unwrap();
    assert!(id.starts_with("site-test:dev-3:overheat:"), "{id}");
    assert_eq!(raised["since"], cleared["since"]);

    // A subscriber that connects afterwards gets the current state, retained.
    let late = Collector::subscribe(gateway.mqtt_addr(), "alerts/#")
        .await
        .unwrap();
    let retained = late.wait_for(1, DEADLINE).await.unwrap();
    assert_eq!(retained.len(), 1);
    assert_eq!(retained[0].topic, "alerts/critical/dev-3/overheat");
    assert!(retained[0].retain);
    assert_eq!(retained[0].json(), cleared);

    assert_eq!(Stats::get(&stats.decode_errors), 0);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn severities_outside_forward_stay_local() {
    let upstream = Mosquitto::start().unwrap();
    let upstream_sub = Collector::subscribe(upstream.addr(), "#").await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let rules = format!(
        "{OVERHEAT}[[rule]]\nname = \"damp\"\nmatch = \"sensors/+/humidity\"\nabove = 80.0\nseverity = \"warning\"\n"
    );
    let gateway = watchpost::start(gateway_config(data.path(), Some(upstream.port()), &rules))
        .await
        .unwrap();
    let local = Collector::subscribe(gateway.mqtt_addr(), "alerts/#")
        .await
        .unwrap();
    let sensor = Publisher::connect(gateway.mqtt_addr(), "s").await.unwrap();
    sensor
        .publish("sensors/cellar/humidity", QoS::AtLeastOnce, "93")
        .await
        .unwrap();
    sensor
        .publish("sensors/boiler/temperature", QoS::AtLeastOnce, "99")
        .await
        .unwrap();

    let local_alerts = local.wait_for(2, DEADLINE).await.unwrap();
    let topics: Vec<_> = local_alerts.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(
        topics,
        [
            "alerts/warning/cellar/damp",
            "alerts/critical/boiler/overheat"
        ]
    );
    let stats = gateway.stats().clone();
    assert!(wait_until(DEADLINE, || Stats::get(&stats.uplink_acked) == 1).await);
    upstream_barrier(&upstream, &upstream_sub).await;
    let upstream_topics: Vec<_> = upstream_sub
        .messages()
        .into_iter()
        .map(|m| m.topic)
        .collect();
    assert_eq!(
        upstream_topics,
        ["site-test/alerts/critical/boiler/overheat", "marker"]
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_readings_are_all_decoded() {
    const N: u64 = 100_000;
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config_with(data.path(), None, UNLIMITED, OVERHEAT))
        .await
        .unwrap();
    let stats = gateway.stats().clone();
    let sensor = Publisher::connect(gateway.mqtt_addr(), "flood")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    for i in 0..N {
        sensor
            .publish(
                &format!("sensors/dev-{}/temperature", i % 100),
                QoS::AtMostOnce,
                format!("{{\"v\":21.5,\"seq\":{}}}", i / 100),
            )
            .await
            .unwrap();
    }
    let decoded = wait_until(Duration::from_secs(60), || Stats::get(&stats.readings) >= N).await;
    eprintln!(
        "{N} readings from one connection into ingest in {:?}",
        started.elapsed()
    );
    assert!(
        decoded,
        "decoded {} of {N} readings",
        Stats::get(&stats.readings)
    );
    // Nothing between the connection and ingest may drop a reading: a publisher faster than
    // ingest is slowed down instead.
    assert_eq!(Stats::get(&stats.readings), N);
    assert_eq!(Stats::get(&stats.messages), N);
    assert_eq!(Stats::get(&stats.decode_errors), 0);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_counted_and_does_not_stop_another_devices_alert() {
    let upstream = Mosquitto::start().unwrap();
    let upstream_sub = Collector::subscribe(upstream.addr(), "#").await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), Some(upstream.port()), OVERHEAT))
        .await
        .unwrap();
    let stats = gateway.stats().clone();
    let bad = Publisher::connect(gateway.mqtt_addr(), "bad")
        .await
        .unwrap();
    let oversized = vec![b'1'; 257];
    let bad_device: [(&str, &[u8]); 7] = [
        ("sensors/bad/temperature", b"[warm]"), // neither a number nor a state
        ("sensors/bad/temperature", b"{\"v\":21.5,"), // bad JSON
        ("sensors/bad", b"{\"temperature\":}"), // bad JSON, object form
        ("sensors/bad/temperature", b"NaN"),    // NaN
        ("sensors/bad/temperature", b"inf"),    // infinity
        ("sensors/bad/temperature", &oversized), // over the size limit
        ("sensors/bad/temperature", b"\xc3\x28"), // not UTF-8
    ];
    for (topic, payload) in bad_device {
        bad.publish(topic, QoS::AtLeastOnce, payload.to_vec())
            .await
            .unwrap();
    }
    for topic in ["sensors//temperature", "sensors"] {
        // topics that name no device
        bad.publish(topic, QoS::AtLeastOnce, "95").await.unwrap();
    }
    bad.wait_acked(9, DEADLINE).await.unwrap();

    let good = Publisher::connect(gateway.mqtt_addr(), "good")
        .await
        .unwrap();
    good.publish("sensors/good/temperature", QoS::AtLeastOnce, "97")
        .await
        .unwrap();
    let alerts = upstream_sub.wait_for(1, DEADLINE).await.unwrap();
    assert_eq!(alerts[0].topic, "site-test/alerts/critical/good/overheat");
    assert_eq!(alerts[0].json()["state"], "raised");

    // Per-device counters are published about once a second.
    let counted = wait_until(DEADLINE, || {
        stats.decode_errors_of("bad") == 7 && stats.decode_errors_of(OTHER_DEVICES) == 2
    })
    .await;
    assert!(counted, "errors: {:?}", stats.devices());
    assert_eq!(Stats::get(&stats.decode_errors), 9);
    assert_eq!(stats.decode_errors_of("good"), 0);
    // The bad device is still served: a good reading from it still counts.
    bad.publish("sensors/bad/temperature", QoS::AtLeastOnce, "99")
        .await
        .unwrap();
    assert!(wait_until(DEADLINE, || upstream_sub.count() == 2).await);
    assert_eq!(
        upstream_sub.messages()[1].topic,
        "site-test/alerts/critical/bad/overheat"
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_at_start_still_serves_locally_and_delivers_later() {
    // A port with nothing behind it yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), Some(port), OVERHEAT))
        .await
        .unwrap();
    let stats = gateway.stats().clone();
    let local = Collector::subscribe(gateway.mqtt_addr(), "alerts/#")
        .await
        .unwrap();
    let sensor = Publisher::connect(gateway.mqtt_addr(), "s").await.unwrap();
    sensor
        .publish("sensors/boiler/temperature", QoS::AtLeastOnce, "99")
        .await
        .unwrap();
    assert_eq!(
        local.wait_for(1, DEADLINE).await.unwrap()[0].json()["state"],
        "raised"
    );
    assert!(
        !stats
            .uplink_connected
            .load(std::sync::atomic::Ordering::Relaxed)
    );

    // The upstream comes up: the queued alert is delivered after a reconnect with backoff.
    let upstream = Mosquitto::start_on(port).unwrap();
    let upstream_sub = Collector::subscribe(upstream.addr(), "#").await.unwrap();
    let alerts = upstream_sub.wait_for(1, DEADLINE).await.unwrap();
    assert_eq!(alerts[0].topic, "site-test/alerts/critical/boiler/overheat");
    assert!(wait_until(DEADLINE, || Stats::get(&stats.uplink_acked) == 1).await);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_alert_stays_raised_across_a_restart_and_is_not_raised_again() {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    let sensor = Publisher::connect(gateway.mqtt_addr(), "s").await.unwrap();
    sensor
        .publish("sensors/boiler/temperature", QoS::AtLeastOnce, "97")
        .await
        .unwrap();
    let local = Collector::subscribe(gateway.mqtt_addr(), "alerts/#")
        .await
        .unwrap();
    let before = local.wait_for(1, DEADLINE).await.unwrap()[0].json();
    assert_eq!(before["state"], "raised");
    drop((sensor, local));
    gateway.shutdown().await;

    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    // The current state is published again, retained, for subscribers after the restart.
    let local = Collector::subscribe(gateway.mqtt_addr(), "alerts/#")
        .await
        .unwrap();
    let retained = local.wait_for(1, DEADLINE).await.unwrap();
    assert_eq!(retained[0].json(), before);
    let sensor = Publisher::connect(gateway.mqtt_addr(), "s").await.unwrap();
    sensor
        .publish("sensors/boiler/temperature", QoS::AtLeastOnce, "98")
        .await
        .unwrap();
    sensor
        .publish("sensors/boiler/temperature", QoS::AtLeastOnce, "60")
        .await
        .unwrap();
    let after = local.wait_for(2, DEADLINE).await.unwrap();
    let next = after[1].json();
    assert_eq!(
        next["state"], "cleared",
        "still high after the restart raised nothing new: {after:#?}"
    );
    assert_eq!(next["id"], before["id"], "the same episode ends");
    assert_eq!(Stats::get(&gateway.stats().alerts_raised), 0);
    gateway.shutdown().await;
}

//! `/metrics` scraped over HTTP, parsed as Prometheus text, before and after real traffic.

use std::collections::HashMap;
use std::time::Duration;

use rumqttc::QoS;
use watchpost::stats::Stats;
use watchpost_e2e::{Collector, Mosquitto, OVERHEAT, Publisher, gateway_config, wait_until};

const DEADLINE: Duration = Duration::from_secs(20);

/// Every sample as `name{labels}` → value.
async fn scrape(addr: std::net::SocketAddr) -> HashMap<String, f64> {
    let (code, body) =
        tokio::task::spawn_blocking(move || watchpost::http::get_blocking(addr, "/metrics"))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(code, 200);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("valid Prometheus text");
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let mut labels: Vec<_> = s
                .labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect();
            labels.sort();
            let key = if labels.is_empty() {
                s.metric
            } else {
                format!("{}{{{}}}", s.metric, labels.join(","))
            };
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                other => panic!("unexpected sample {other:?}"),
            };
            (key, value)
        })
        .collect()
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, key: &str) -> f64 {
    after.get(key).unwrap_or_else(|| panic!("{key} missing"))
        - before.get(key).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_what_went_through() {
    let upstream = Mosquitto::start().unwrap();
    let upstream_sub = Collector::subscribe(upstream.addr(), "#").await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), Some(upstream.port()), OVERHEAT))
        .await
        .unwrap();
    let http = gateway.http_addr().expect("HTTP endpoint on");
    let stats = gateway.stats().clone();
    assert!(
        wait_until(DEADLINE, || stats
            .uplink_connected
            .load(std::sync::atomic::Ordering::Relaxed))
        .await
    );
    let before = scrape(http).await;
    assert_eq!(before["watchpost_uplink_connected"], 1.0);

    let sensor = Publisher::connect(gateway.mqtt_addr(), "boiler")
        .await
        .unwrap();
    for i in 0..10 {
        let device = if i % 2 == 0 { "boiler-1" } else { "boiler-2" };
        sensor
            .publish(
                &format!("sensors/{device}/temperature"),
                QoS::AtLeastOnce,
                format!("{{\"v\":{},\"seq\":{}}}", 20 + i, i / 2),
            )
            .await
            .unwrap();
    }
    sensor
        .publish("sensors/boiler-1/temperature", QoS::AtLeastOnce, "NaN")
        .await
        .unwrap();
    sensor
        .publish("sensors/boiler-2/temperature", QoS::AtLeastOnce, "97.5")
        .await
        .unwrap();
    sensor.wait_acked(12, DEADLINE).await.unwrap();
    upstream_sub.wait_for(1, DEADLINE).await.unwrap();
    assert!(
        wait_until(DEADLINE, || stats.devices().len() == 2
            && Stats::get(&stats.uplink_acked) == 1
            && Stats::get(&stats.devices_online) == 2)
        .await
    );

    let after = scrape(http).await;
    assert_eq!(delta(&before, &after, "watchpost_messages_total"), 12.0);
    assert_eq!(delta(&before, &after, "watchpost_readings_total"), 11.0);
    assert_eq!(delta(&before, &after, "watchpost_decode_errors_total"), 1.0);
    assert_eq!(
        delta(
            &before,
            &after,
            "watchpost_alerts_raised_total{severity=\"critical\"}"
        ),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "watchpost_alerts_raised_total{severity=\"warning\"}"
        ),
        0.0
    );
    assert_eq!(after["watchpost_alerts_active"], 1.0);
    assert_eq!(after["watchpost_devices{state=\"online\"}"], 2.0);
    assert_eq!(delta(&before, &after, "watchpost_uplink_acked_total"), 1.0);
    assert_eq!(after["watchpost_outbox_depth"], 0.0);
    assert_eq!(
        delta(&before, &after, "watchpost_ingest_seconds_count"),
        12.0
    );
    assert!(
        delta(&before, &after, "watchpost_bytes_in_total") > 12.0 * 30.0,
        "at least the 12 publishes"
    );
    // One alert went up; a bridge would have sent all twelve messages.
    let up = delta(&before, &after, "watchpost_upstream_bytes_total");
    let all = delta(&before, &after, "watchpost_forward_all_bytes_total");
    assert!(
        up > 200.0 && all > 12.0 * 40.0,
        "upstream {up}, forward-all {all}"
    );
    assert!(after["watchpost_upstream_ratio"] > 0.0);
    assert!(
        after.contains_key("watchpost_info{gateway=\"site-test\",version=\"0.1.0\"}"),
        "{:?}",
        after.keys()
    );
    gateway.shutdown().await;
}

async fn get(addr: std::net::SocketAddr, path: &'static str) -> (u16, String) {
    tokio::task::spawn_blocking(move || watchpost::http::get_blocking(addr, path))
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_with_the_upstream_up_and_down() {
    let mut upstream = Mosquitto::start().unwrap();
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), Some(upstream.port()), OVERHEAT))
        .await
        .unwrap();
    let http = gateway.http_addr().unwrap();
    let stats = gateway.stats().clone();
    assert!(
        wait_until(DEADLINE, || stats
            .uplink_connected
            .load(std::sync::atomic::Ordering::Relaxed))
        .await
    );
    assert_eq!(get(http, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(get(http, "/readyz").await, (200, "ready\n".into()));

    upstream.stop();
    assert!(
        wait_until(DEADLINE, || !stats
            .uplink_connected
            .load(std::sync::atomic::Ordering::Relaxed))
        .await
    );
    let (code, body) = get(http, "/readyz").await;
    assert_eq!(
        code, 200,
        "a gateway without its upstream still serves locally"
    );
    assert!(body.starts_with("degraded"), "{body}");
    gateway.shutdown().await;
}

//! Foreign fleets through the shipped example configurations: payloads in Tasmota's,
//! ESPHome's and Shelly's own formats, published by a real MQTT client, become readings and
//! raise alerts without a line of code per product.

use std::time::Duration;

use rumqttc::QoS;
use watchpost::stats::Stats;
use watchpost_e2e::{Collector, Publisher, shipped_config, wait_until};

const DEADLINE: Duration = Duration::from_secs(20);

/// Publishes each (topic, payload) and returns the (device, rule, state) of the alerts that
/// follow, once `n` have arrived.
async fn alerts_for(
    file: &str,
    messages: &[(&str, &str)],
    n: usize,
) -> (Vec<(String, String, String)>, watchpost::Gateway) {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(shipped_config(file, data.path()))
        .await
        .unwrap();
    let local = Collector::subscribe(gateway.mqtt_addr(), "alerts/#")
        .await
        .unwrap();
    let device = Publisher::connect(gateway.mqtt_addr(), "foreign")
        .await
        .unwrap();
    for (topic, payload) in messages {
        device
            .publish(topic, QoS::AtLeastOnce, *payload)
            .await
            .unwrap();
    }
    device
        .wait_acked(messages.len() as u64, DEADLINE)
        .await
        .unwrap();
    let got = local.wait_for(n, DEADLINE).await.unwrap();
    let alerts = got
        .iter()
        .map(|m| {
            let d = m.json();
            let s = |k: &str| d[k].as_str().unwrap().to_owned();
            (s("device"), s("rule"), s("state"))
        })
        .collect();
    (alerts, gateway)
}

fn owned(list: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    list.iter()
        .map(|(a, b, c)| ((*a).into(), (*b).into(), (*c).into()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasmota_sensor_telemetry() {
    let messages = [
        (
            "tele/kitchen/SENSOR",
            r#"{"Time":"2026-11-21T18:05:45","BME280":{"Temperature":31.5,"Humidity":40.1,"DewPoint":16.1,"Pressure":1013.2},"PressureUnit":"hPa","TempUnit":"C"}"#,
        ),
        (
            "tele/washer-plug/SENSOR",
            r#"{"Time":"2026-11-21T18:05:46","ENERGY":{"TotalStartTime":"2026-01-01T00:00:00","Total":123.456,"Yesterday":1.2,"Today":0.5,"Period":0,"Power":45,"ApparentPower":50,"ReactivePower":20,"Factor":0.9,"Voltage":201,"Current":0.196}}"#,
        ),
    ];
    let (alerts, gateway) = alerts_for("tasmota.toml", &messages, 2).await;
    assert_eq!(
        alerts,
        owned(&[
            ("kitchen", "room-hot", "raised"),
            ("washer-plug", "undervoltage", "raised")
        ])
    );
    // Temperature, humidity and pressure of the kitchen; power and voltage of the plug.
    assert!(
        wait_until(DEADLINE, || Stats::get(&gateway.stats().readings) == 5).await,
        "{}",
        Stats::get(&gateway.stats().readings)
    );
    assert_eq!(Stats::get(&gateway.stats().decode_errors), 0);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn esphome_sensor_states() {
    let messages = [
        ("greenhouse/sensor/temperature/state", "36.20"),
        ("greenhouse/sensor/soil_moisture/state", "nan"),
        ("greenhouse/sensor/temperature/state", "30.95"),
    ];
    let (alerts, gateway) = alerts_for("esphome.toml", &messages, 2).await;
    assert_eq!(
        alerts,
        owned(&[
            ("greenhouse", "greenhouse-hot", "raised"),
            ("greenhouse", "greenhouse-hot", "cleared")
        ])
    );
    // A failed ESPHome sensor says "nan": counted against the node, nothing else harmed.
    let stats = gateway.stats().clone();
    assert!(wait_until(DEADLINE, || stats.decode_errors_of("greenhouse") == 1).await);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shelly_gen1_and_gen2() {
    let messages = [
        ("shellies/shellyht-AB12CD/sensor/temperature", "4.25"),
        ("shellies/shellyht-AB12CD/sensor/humidity", "55.5"),
        (
            "shellyplusht-08b61f/status/temperature:0",
            r#"{"id":0,"tC":3.9,"tF":39.0}"#,
        ),
        (
            "shellyplusht-08b61f/status/devicepower:0",
            r#"{"id":0,"battery":{"V":3.52,"percent":12},"external":{"present":false}}"#,
        ),
    ];
    let (alerts, gateway) = alerts_for("shelly.toml", &messages, 3).await;
    assert_eq!(
        alerts,
        owned(&[
            ("shellyht-AB12CD", "cold-room", "raised"),
            ("shellyplusht-08b61f", "cold-room", "raised"),
            ("shellyplusht-08b61f", "battery-low", "raised")
        ])
    );
    gateway.shutdown().await;
}

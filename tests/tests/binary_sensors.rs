//! Binary sensors through the shipped example configurations: leaks, doors, relays and
//! presence, in the payload formats Zigbee2MQTT, Tasmota, ESPHome and Shelly really publish
//! (see the README's "Foreign fleets"), sent by a real MQTT client into a gateway on
//! `127.0.0.1:0` whose uplink is a real Mosquitto. Each alert is checked on the local
//! `alerts/#` and upstream on `site-test/alerts/#`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rumqttc::QoS;
use serde_json::{Value, json};
use tempfile::TempDir;
use watchpost::config::{Config, UplinkConfig};
use watchpost::rules::{Kind, Severity};
use watchpost::stats::Stats;
use watchpost_e2e::{Collector, Mosquitto, Publisher, shipped_config, wait_until};

const DEADLINE: Duration = Duration::from_secs(10);

/// Stands in for the shipped configurations' `for` and `offline_for`, which are minutes long
/// (a door open for ten minutes, a sensor offline for five): a test cannot wait that long,
/// and the waiting itself is the rules' unit tests' business. What these tests check is that
/// the product's payload reaches the rule, and the rule's alert reaches both brokers.
const SHORT: Duration = Duration::from_millis(200);

/// Upstream topic prefix.
const PREFIX: &str = "site-test";

/// A gateway on a shipped configuration, with an uplink to a Mosquitto of its own, a local
/// and an upstream subscriber to alerts, and one client publishing as the products do.
struct Site {
    gateway: watchpost::Gateway,
    device: Publisher,
    /// QoS 1 publishes sent by `device`, to wait for their PUBACKs.
    sent: AtomicU64,
    local: Collector,
    upstream: Collector,
    _mosquitto: Mosquitto,
    _data: TempDir,
}

impl Site {
    /// Starts `file` from `config/`, changed by `adjust`, forwarding every severity upstream.
    async fn start(file: &str, adjust: impl FnOnce(&mut Config)) -> Site {
        let mosquitto = Mosquitto::start().unwrap();
        let upstream = Collector::subscribe(mosquitto.addr(), &format!("{PREFIX}/alerts/#"))
            .await
            .unwrap();
        let data = tempfile::tempdir().unwrap();
        let mut config = shipped_config(file, data.path());
        config.uplink = Some(UplinkConfig {
            forwarded_by: None,
            host: "127.0.0.1".into(),
            port: mosquitto.port(),
            tls: false,
            client_id: format!("watchpost-{}", config.gateway.id),
            topic_prefix: PREFIX.into(),
            forward: vec![Severity::Info, Severity::Warning, Severity::Critical],
            keep_alive: Duration::from_secs(5),
            summaries: None,
            ca_file: None,
            client_cert: None,
            login: None,
            delivery: Default::default(),
        });
        adjust(&mut config);
        let gateway = watchpost::start(config).await.unwrap();
        let local = Collector::subscribe(gateway.mqtt_addr(), "alerts/#")
            .await
            .unwrap();
        let device = Publisher::connect(gateway.mqtt_addr(), "products")
            .await
            .unwrap();
        Site {
            gateway,
            device,
            sent: AtomicU64::new(0),
            local,
            upstream,
            _mosquitto: mosquitto,
            _data: data,
        }
    }

    /// Publishes `payload` on `topic` (QoS 1) and waits until the gateway acknowledged it.
    async fn publish(&self, topic: &str, payload: &str) {
        self.device
            .publish(topic, QoS::AtLeastOnce, payload)
            .await
            .unwrap();
        self.acked().await;
    }

    /// Like [`Site::publish`], retained, as last wills and availability are.
    async fn publish_retained(&self, topic: &str, payload: &str) {
        self.device
            .publish_retained(topic, QoS::AtLeastOnce, payload)
            .await
            .unwrap();
        self.acked().await;
    }

    async fn acked(&self) {
        let n = self.sent.fetch_add(1, Ordering::Relaxed) + 1;
        self.device.wait_acked(n, DEADLINE).await.unwrap();
    }

    /// Waits for the alert document on `alerts/{topic}` whose state is `state`, locally and
    /// upstream, checks that both brokers got the same document, and returns it.
    async fn alert(&self, topic: &str, state: &str) -> Value {
        let local = wait_alert(&self.local, &format!("alerts/{topic}"), state).await;
        let upstream = wait_alert(&self.upstream, &format!("{PREFIX}/alerts/{topic}"), state).await;
        assert_eq!(local, upstream, "the same document on both brokers");
        local
    }

    fn stats(&self) -> &Stats {
        self.gateway.stats()
    }

    async fn shutdown(self) {
        self.gateway.shutdown().await;
    }
}

/// Shortens the `for` of the shipped rule `name` to [`SHORT`].
fn shorten_hold(config: &mut Config, name: &str) {
    let rule = config.rules.iter_mut().find(|r| r.name == name);
    let rule = rule.unwrap_or_else(|| panic!("no rule {name:?} in the shipped configuration"));
    assert!(!rule.hold.is_zero(), "{name} has no `for` to shorten");
    rule.hold = SHORT;
}

/// Shortens the `offline_for` of the shipped presence rule `name` to [`SHORT`].
fn shorten_grace(config: &mut Config, name: &str) {
    let rule = config.rules.iter_mut().find(|r| r.name == name);
    let rule = rule.unwrap_or_else(|| panic!("no rule {name:?} in the shipped configuration"));
    match &mut rule.kind {
        Kind::Presence { grace } => *grace = SHORT,
        other => panic!("{name} is not a presence rule: {other:?}"),
    }
}

/// Waits until `collector` holds a document on `topic` whose `state` is `state`.
async fn wait_alert(collector: &Collector, topic: &str, state: &str) -> Value {
    let find = || {
        collector
            .messages()
            .into_iter()
            .filter(|m| m.topic == topic)
            .map(|m| m.json())
            .find(|d| d["state"] == state)
    };
    if wait_until(DEADLINE, || find().is_some()).await {
        return find().unwrap();
    }
    let seen: Vec<_> = collector
        .messages()
        .into_iter()
        .map(|m| (m.topic, String::from_utf8_lossy(&m.payload).into_owned()))
        .collect();
    panic!("no {state} alert on {topic} within {DEADLINE:?}; got {seen:#?}")
}

/// An Aqara SJCGQ11LM water leak sensor's full state, as Zigbee2MQTT publishes it.
fn aqara_leak(wet: bool) -> String {
    json!({"battery":100,"battery_low":false,"device_temperature":26,"linkquality":132,
           "power_outage_count":7,"trigger_count":1,"voltage":3015,"water_leak":wet})
    .to_string()
}

/// An Aqara MCCGQ11LM door sensor's full state; Zigbee2MQTT's `contact` is true when CLOSED.
fn aqara_door(contact: bool) -> String {
    json!({"battery":91,"contact":contact,"device_temperature":24,"linkquality":87,
           "power_outage_count":3,"trigger_count":12,"voltage":2995})
    .to_string()
}

// --- Zigbee2MQTT -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zigbee2mqtt_leak_raises_water_leak_at_once_and_dry_clears_it() {
    let site = Site::start("zigbee2mqtt.toml", |_| {}).await;
    // A friendly name with '/' is one device, its levels joined with '.'.
    site.publish("zigbee2mqtt/basement/leak", &aqara_leak(true))
        .await;
    let raised = site
        .alert("critical/basement.leak/water-leak", "raised")
        .await;
    assert_eq!(raised["device"], "basement.leak");
    assert_eq!(raised["metric"], "water_leak");
    assert_eq!(raised["severity"], "critical");
    assert_eq!(raised["value"], json!(true), "the state, as JSON true");
    assert!(
        raised.get("threshold").is_none(),
        "a state rule has no threshold: {raised}"
    );

    site.publish("zigbee2mqtt/basement/leak", &aqara_leak(false))
        .await;
    let cleared = site
        .alert("critical/basement.leak/water-leak", "cleared")
        .await;
    assert_eq!(cleared["value"], json!(false));
    assert_eq!(cleared["id"], raised["id"], "one episode, one id");
    assert!(cleared.get("threshold").is_none(), "{cleared}");
    site.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zigbee2mqtt_contact_false_is_an_open_door_and_true_a_closed_one() {
    let site = Site::start("zigbee2mqtt.toml", |c| shorten_hold(c, "door-open")).await;
    site.publish("zigbee2mqtt/hall/door", &aqara_door(false))
        .await;
    let raised = site.alert("warning/hall.door/door-open", "raised").await;
    assert_eq!(raised["metric"], "door");
    assert_eq!(raised["value"], "open", "contact false is an open door");

    site.publish("zigbee2mqtt/hall/door", &aqara_door(true))
        .await;
    let cleared = site.alert("warning/hall.door/door-open", "cleared").await;
    assert_eq!(cleared["value"], "closed", "contact true is a closed door");
    site.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zigbee2mqtt_bridge_topics_and_commands_create_no_device() {
    let site = Site::start("zigbee2mqtt.toml", |_| {}).await;
    let bridge_devices = json!([
        {"ieee_address":"0x00124b0022ab5a1c","type":"Coordinator","network_address":0,
         "supported":true,"friendly_name":"Coordinator","disabled":false,"definition":null,
         "power_source":null,"interview_completed":true,"interviewing":false},
        {"ieee_address":"0x00158d0001a2b3c4","type":"EndDevice","network_address":31241,
         "supported":true,"friendly_name":"basement/leak","disabled":false,
         "definition":{"model":"SJCGQ11LM","vendor":"Aqara","description":"Water leak sensor",
                       "exposes":[{"type":"binary","name":"water_leak","property":"water_leak",
                                   "access":1,"value_on":true,"value_off":false}]},
         "power_source":"Battery","model_id":"lumi.sensor_wleak.aq1",
         "manufacturer":"LUMI","interview_completed":true,"interviewing":false}
    ]);
    let bridge_info = json!({"version":"2.1.3","commit":"a1b2c3d","coordinator":
        {"ieee_address":"0x00124b0022ab5a1c","type":"zStack3x0","meta":{"revision":20230507}},
        "network":{"channel":11,"pan_id":6754,"extended_pan_id":"0xdddddddddddddddd"},
        "log_level":"info","permit_join":false,"restart_required":false});
    for (topic, payload) in [
        (
            "zigbee2mqtt/bridge/state",
            r#"{"state":"online"}"#.to_owned(),
        ),
        ("zigbee2mqtt/bridge/info", bridge_info.to_string()),
        ("zigbee2mqtt/bridge/devices", bridge_devices.to_string()),
        (
            "zigbee2mqtt/basement/leak/set",
            r#"{"state":"ON"}"#.to_owned(),
        ),
        (
            "zigbee2mqtt/basement/leak/set/sensitivity",
            "high".to_owned(),
        ),
        (
            "zigbee2mqtt/basement/leak/get",
            r#"{"state":""}"#.to_owned(),
        ),
    ] {
        // The bridge publishes its own topics retained; the gateway's broker drops the flag.
        site.publish_retained(topic, &payload).await;
    }
    // After the topics above, in order: once this reading is counted, they have been judged.
    site.publish("zigbee2mqtt/basement/leak", &aqara_leak(false))
        .await;
    let stats = site.stats();
    assert!(
        wait_until(DEADLINE, || stats
            .device("basement.leak")
            .is_some_and(|d| d.readings > 0))
        .await,
        "the leak sensor's reading never counted: {:?}",
        stats.devices()
    );
    let devices: Vec<String> = stats.devices().into_keys().collect();
    assert_eq!(devices, ["basement.leak"]);
    // battery, battery_low and water_leak: the mapped fields of the one reading.
    assert_eq!(Stats::get(&stats.readings), 3);
    assert_eq!(Stats::get(&stats.decode_errors), 0);
    site.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zigbee2mqtt_availability_offline_raises_sensor_offline_and_online_clears_it() {
    let site = Site::start("zigbee2mqtt.toml", |c| shorten_grace(c, "sensor-offline")).await;
    // Zigbee2MQTT 2.x says {"state":"offline"}; 1.x (legacy payload) says offline.
    for (device, offline, online) in [
        (
            "basement/leak",
            r#"{"state":"offline"}"#,
            r#"{"state":"online"}"#,
        ),
        ("attic/smoke", "offline", "online"),
    ] {
        let topic = format!("zigbee2mqtt/{device}/availability");
        let alert = format!("warning/{}/sensor-offline", device.replace('/', "."));
        site.publish_retained(&topic, offline).await;
        let raised = site.alert(&alert, "raised").await;
        assert_eq!(raised["metric"], "status");
        site.publish_retained(&topic, online).await;
        site.alert(&alert, "cleared").await;
    }
    assert_eq!(Stats::get(&site.stats().decode_errors), 0);
    site.shutdown().await;
}

// --- Tasmota -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasmota_power_off_raises_freezer_switched_off_and_on_clears_it() {
    let site = Site::start("tasmota.toml", |c| shorten_hold(c, "freezer-switched-off")).await;
    site.publish("stat/freezer-plug/POWER", "ON").await;
    site.publish("stat/freezer-plug/POWER", "OFF").await;
    let raised = site
        .alert("critical/freezer-plug/freezer-switched-off", "raised")
        .await;
    assert_eq!(raised["metric"], "relay");
    assert_eq!(raised["value"], "off", "Tasmota's OFF is the state off");
    assert!(raised.get("threshold").is_none(), "{raised}");

    site.publish("stat/freezer-plug/POWER", "ON").await;
    let cleared = site
        .alert("critical/freezer-plug/freezer-switched-off", "cleared")
        .await;
    assert_eq!(cleared["value"], "on");
    site.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasmota_lwt_offline_raises_device_offline_and_online_clears_it() {
    let site = Site::start("tasmota.toml", |c| shorten_grace(c, "device-offline")).await;
    site.publish_retained("tele/freezer-plug/LWT", "Offline")
        .await;
    let raised = site
        .alert("warning/freezer-plug/device-offline", "raised")
        .await;
    assert_eq!(raised["metric"], "status");
    site.publish_retained("tele/freezer-plug/LWT", "Online")
        .await;
    site.alert("warning/freezer-plug/device-offline", "cleared")
        .await;
    site.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasmota_wired_leak_probe_on_switch1_raises_water_leak_and_time_is_no_error() {
    let site = Site::start("tasmota.toml", |_| {}).await;
    site.publish(
        "tele/laundry/SENSOR",
        r#"{"Time":"2026-11-21T18:05:45","Switch1":"ON"}"#,
    )
    .await;
    let raised = site.alert("critical/laundry/water-leak", "raised").await;
    assert_eq!(raised["value"], json!(true), "ON maps to true");
    site.publish(
        "tele/laundry/SENSOR",
        r#"{"Time":"2026-11-21T18:06:45","Switch1":"OFF"}"#,
    )
    .await;
    let cleared = site.alert("critical/laundry/water-leak", "cleared").await;
    assert_eq!(cleared["value"], json!(false));
    assert_eq!(Stats::get(&site.stats().decode_errors), 0);
    site.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_subscriber_gets_a_sources_retained_presence() {
    let site = Site::start("tasmota.toml", |_| {}).await;
    site.publish_retained("tele/plug/LWT", "Offline").await;
    let late = Collector::subscribe(site.gateway.mqtt_addr(), "tele/+/LWT")
        .await
        .unwrap();
    let got = late.wait_for(1, DEADLINE).await.unwrap();
    assert_eq!(got[0].topic, "tele/plug/LWT");
    assert_eq!(got[0].payload, b"Offline");
    assert!(got[0].retain, "delivered as a retained message");
    site.shutdown().await;
}

// --- ESPHome -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn esphome_binary_sensor_on_raises_water_leak_and_off_clears_it() {
    let site = Site::start("esphome.toml", |_| {}).await;
    site.publish("basement-leak/binary_sensor/water_leak/state", "ON")
        .await;
    let raised = site
        .alert("critical/basement-leak/water-leak", "raised")
        .await;
    assert_eq!(raised["value"], json!(true));
    site.publish("basement-leak/binary_sensor/water_leak/state", "OFF")
        .await;
    let cleared = site
        .alert("critical/basement-leak/water-leak", "cleared")
        .await;
    assert_eq!(cleared["value"], json!(false));
    site.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn esphome_status_offline_raises_node_offline_and_online_clears_it() {
    let site = Site::start("esphome.toml", |c| shorten_grace(c, "node-offline")).await;
    site.publish_retained("basement-leak/status", "offline")
        .await;
    site.alert("warning/basement-leak/node-offline", "raised")
        .await;
    site.publish_retained("basement-leak/status", "online")
        .await;
    site.alert("warning/basement-leak/node-offline", "cleared")
        .await;
    site.shutdown().await;
}

// --- Shelly ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shelly_gen1_flood_true_raises_flood_and_false_clears_it() {
    let site = Site::start("shelly.toml", |_| {}).await;
    site.publish("shellies/shellyflood-ABE866/sensor/flood", "true")
        .await;
    let raised = site
        .alert("critical/shellyflood-ABE866/flood", "raised")
        .await;
    assert_eq!(raised["value"], json!(true));
    site.publish("shellies/shellyflood-ABE866/sensor/flood", "false")
        .await;
    let cleared = site
        .alert("critical/shellyflood-ABE866/flood", "cleared")
        .await;
    assert_eq!(cleared["value"], json!(false));
    site.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shelly_gen1_wake_reasons_are_ignored_not_an_error() {
    let site = Site::start("shelly.toml", |_| {}).await;
    // A Flood's wake-up burst: why it woke, then what it saw.
    site.publish(
        "shellies/shellyflood-ABE866/sensor/act_reasons",
        r#"["sensor"]"#,
    )
    .await;
    site.publish("shellies/shellyflood-ABE866/sensor/flood", "true")
        .await;
    site.alert("critical/shellyflood-ABE866/flood", "raised")
        .await;
    assert_eq!(Stats::get(&site.stats().decode_errors), 0);
    assert_eq!(
        Stats::get(&site.stats().readings),
        1,
        "only the flood reading"
    );
    site.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shelly_gen2_flood_alarm_raises_flood_and_no_alarm_clears_it() {
    let site = Site::start("shelly.toml", |_| {}).await;
    let topic = "shellyfloodg4-a0b765f1c2d4/status/flood:0";
    site.publish(topic, r#"{"id":0,"alarm":true,"mute":false}"#)
        .await;
    let raised = site
        .alert("critical/shellyfloodg4-a0b765f1c2d4/flood", "raised")
        .await;
    assert_eq!(raised["value"], json!(true));
    site.publish(topic, r#"{"id":0,"alarm":false,"mute":false}"#)
        .await;
    site.alert("critical/shellyfloodg4-a0b765f1c2d4/flood", "cleared")
        .await;
    site.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shelly_online_false_raises_device_offline_and_true_clears_it() {
    let site = Site::start("shelly.toml", |c| shorten_grace(c, "device-offline")).await;
    // Gen1 under shellies/, Gen2+ under its own prefix.
    for (topic, device) in [
        ("shellies/shellyflood-ABE866/online", "shellyflood-ABE866"),
        (
            "shellyfloodg4-a0b765f1c2d4/online",
            "shellyfloodg4-a0b765f1c2d4",
        ),
    ] {
        let alert = format!("warning/{device}/device-offline");
        site.publish_retained(topic, "false").await;
        site.alert(&alert, "raised").await;
        site.publish_retained(topic, "true").await;
        site.alert(&alert, "cleared").await;
    }
    site.shutdown().await;
}

/// One device's entry in Zigbee2MQTT's `bridge/devices`, shaped as 2.x publishes it for an
/// Aqara leak sensor (definition, exposes with their descriptions, options, endpoints):
/// about 2.9 KB.
fn bridge_device(i: usize) -> Value {
    let numeric = |name: &str, unit: &str, description: &str| {
        json!({"access":1,"category":"diagnostic","description":description,"label":name,
               "name":name,"property":name,"type":"numeric","unit":unit})
    };
    let binary = |name: &str, description: &str| {
        json!({"access":1,"description":description,"label":name,"name":name,"property":name,
               "type":"binary","value_off":false,"value_on":true})
    };
    json!({
        "date_code":"20191205","disabled":false,
        "friendly_name":format!("floor{}/room{i}/leak", i % 4),
        "ieee_address":format!("0x00158d0001a2{i:04x}"),"interview_completed":true,
        "interview_state":"SUCCESSFUL","interviewing":false,"manufacturer":"LUMI",
        "model_id":"lumi.sensor_wleak.aq1","network_address":31241 + i,
        "power_source":"Battery","software_build_id":"3000-0001","supported":true,
        "type":"EndDevice",
        "definition":{
            "description":"Water leak sensor","model":"SJCGQ11LM","vendor":"Aqara",
            "source":"native","supports_ota":false,
            "icon":"device_icons/3a2d9b5c0c6c0e0f7a5b2a1d.png",
            "exposes":[
                binary("water_leak","Indicates whether the device detected a water leak"),
                binary("battery_low","Indicates whether the battery of the device is almost empty"),
                numeric("battery","%","Remaining battery in %, can take up to 24 hours before reported"),
                numeric("voltage","mV","Voltage of the battery in millivolts"),
                numeric("device_temperature","°C","Temperature of the device"),
                numeric("power_outage_count","","Number of power outages (since last pairing)"),
                numeric("trigger_count","","Indicates how many times the sensor was triggered (since last scheduled report)"),
                numeric("linkquality","lqi","Link quality (signal strength)")
            ],
            "options":[
                {"access":2,"description":"Number of digits after decimal point for device_temperature, takes into effect on next report of device.",
                 "label":"Device temperature precision","name":"device_temperature_precision",
                 "property":"device_temperature_precision","type":"numeric","value_max":3,"value_min":0},
                {"access":2,"description":"Calibrates the device_temperature value (absolute offset), takes into effect on next report of device.",
                 "label":"Device temperature calibration","name":"device_temperature_calibration",
                 "property":"device_temperature_calibration","type":"numeric"}
            ]
        },
        "endpoints":{"1":{"bindings":[],"clusters":{"input":["genBasic","genPowerCfg","genIdentify","ssIasZone"],
                                                    "output":["genOta"]},
                          "configured_reportings":[],"name":"1","scenes":[]}}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zigbee2mqtt_a_network_sized_bridge_device_list_does_not_cut_the_bridge_off() {
    let site = Site::start("zigbee2mqtt.toml", |_| {}).await;
    // Thirty leak sensors: about 88 KB, a modest Zigbee network.
    let devices = Value::Array((0..30).map(bridge_device).collect()).to_string();
    assert!(devices.len() > 64 * 1024, "{} bytes", devices.len());
    // Zigbee2MQTT publishes the list retained at QoS 0, at start and whenever a device joins.
    site.device
        .publish_retained("zigbee2mqtt/bridge/devices", QoS::AtMostOnce, devices)
        .await
        .unwrap();
    // The bridge's next message, on the same connection.
    site.publish("zigbee2mqtt/basement/leak", &aqara_leak(true))
        .await;
    site.alert("critical/basement.leak/water-leak", "raised")
        .await;
    assert_eq!(
        Stats::get(&site.stats().protocol_errors),
        0,
        "the bridge's connection was closed"
    );
    assert_eq!(Stats::get(&site.stats().decode_errors), 0);
    site.shutdown().await;
}

//! Home Assistant MQTT discovery, end to end: a gateway on `127.0.0.1:0` with
//! `[homeassistant] discovery = true` and a real Mosquitto as its upstream, real MQTT clients
//! in the roles of a sensor and of Home Assistant (subscribed to the discovery prefix, the
//! alert topics and the gateway's state topic, as Home Assistant's MQTT integration does once
//! it has read the configs). Every discovery message is checked against Home Assistant's
//! documented schema (`watchpost::homeassistant::check_message`), and states are read the way
//! the configs tell Home Assistant to: the `{{ value_json.KEY }}` template, compared with
//! `payload_on` and `payload_off`. No Home Assistant runs here.

use std::time::Duration;

use rumqttc::{ConnectReturnCode, LastWill, QoS};
use serde_json::{Value, json};
use tempfile::TempDir;
use watchpost::access::{Credentials, Role};
use watchpost::homeassistant::{check_message, state_topic};
use watchpost_e2e::clients;
use watchpost_e2e::{
    Collector, Mosquitto, OVERHEAT, Publisher, Received, gateway_config, wait_until,
};

const DEADLINE: Duration = Duration::from_secs(20);

const LEAK: &str = "[[rule]]\nname = \"water-leak\"\nmatch = \"sensors/+/water_leak\"\nequals = true\nseverity = \"critical\"\n";

const DISCOVERY: &str = "[homeassistant]\ndiscovery = true\n";

/// The site in these tests (`gateway_config`'s gateway id, and so its site).
const SITE: &str = "site-test";

struct Site {
    gateway: watchpost::Gateway,
    /// Subscribed to `homeassistant/#`, as Home Assistant is to its discovery prefix.
    discovery: Collector,
    /// Subscribed to `alerts/#`: the binary sensors' state topics.
    alerts: Collector,
    /// Subscribed to the gateway's state topic.
    state: Collector,
    sensor: Publisher,
    mosquitto: Mosquitto,
    data: TempDir,
}

impl Site {
    async fn start(rules: &str, adjust: impl FnOnce(&mut watchpost::Config)) -> Site {
        let mosquitto = Mosquitto::start().unwrap();
        let data = tempfile::tempdir().unwrap();
        let mut config = gateway_config(
            data.path(),
            Some(mosquitto.port()),
            &format!("{rules}{DISCOVERY}"),
        );
        adjust(&mut config);
        let gateway = watchpost::start(config).await.unwrap();
        let addr = gateway.mqtt_addr();
        let discovery = Collector::subscribe(addr, "homeassistant/#").await.unwrap();
        let alerts = Collector::subscribe(addr, "alerts/#").await.unwrap();
        let state = Collector::subscribe(addr, &state_topic(SITE))
            .await
            .unwrap();
        let sensor = Publisher::connect(addr, "sensor").await.unwrap();
        Site {
            gateway,
            discovery,
            alerts,
            state,
            sensor,
            mosquitto,
            data,
        }
    }

    async fn publish(&self, topic: &str, payload: &str) {
        self.sensor
            .publish(topic, QoS::AtLeastOnce, payload.as_bytes().to_vec())
            .await
            .unwrap();
    }

    /// The latest config published for `unique_id`, once one has arrived (checked against
    /// the documented schema), with its topic.
    async fn config(&self, unique_id: &str) -> (String, Value) {
        let found = |messages: Vec<Received>| {
            messages
                .into_iter()
                .rev()
                .filter(|m| !m.payload.is_empty())
                .find(|m| m.json()["unique_id"] == unique_id)
        };
        let arrived = wait_until(DEADLINE, || found(self.discovery.messages()).is_some()).await;
        assert!(
            arrived,
            "no discovery config for {unique_id}: {:#?}",
            self.discovery.messages()
        );
        let m = found(self.discovery.messages()).unwrap();
        if let Err(e) = check_message("homeassistant", &m.topic, &m.payload) {
            panic!("{e}: {}", String::from_utf8_lossy(&m.payload));
        }
        (m.topic.clone(), m.json())
    }

    /// Waits until `topic` has an empty (removing) retained payload.
    async fn removed(&self, topic: &str) {
        let gone = wait_until(DEADLINE, || {
            self.discovery
                .messages()
                .iter()
                .any(|m| m.topic == topic && m.payload.is_empty())
        })
        .await;
        assert!(
            gone,
            "{topic} not removed: {:#?}",
            self.discovery.messages()
        );
    }

    /// Waits until the binary sensor of `config` reads `expected` from its state topic.
    async fn binary_state(&self, config: &Value, expected: &str) {
        let topic = config["state_topic"].as_str().unwrap();
        let now = || {
            self.alerts
                .messages()
                .iter()
                .rev()
                .find(|m| m.topic == topic)
                .map_or("unknown", |m| read_binary(config, &m.payload))
        };
        let reached = wait_until(DEADLINE, || now() == expected).await;
        assert!(
            reached,
            "{topic} reads {} instead of {expected}: {:#?}",
            now(),
            self.alerts.messages()
        );
    }
}

/// The documented `{{ value_json.KEY }}` template on `payload`, rendered as text.
fn render(config: &Value, payload: &[u8]) -> String {
    let template = config["value_template"].as_str().unwrap();
    let key = template
        .strip_prefix("{{ value_json.")
        .and_then(|t| t.strip_suffix(" }}"))
        .unwrap_or_else(|| panic!("not a value_json template: {template}"));
    let value: Value = serde_json::from_slice(payload).unwrap();
    match &value[key] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// What Home Assistant shows for a binary sensor given `payload` on its state topic.
fn read_binary(config: &Value, payload: &[u8]) -> &'static str {
    let rendered = render(config, payload);
    if rendered == config["payload_on"] {
        "on"
    } else if rendered == config["payload_off"] {
        "off"
    } else {
        "unknown"
    }
}

fn entity_id(device: &str, rule: &str) -> String {
    format!("watchpost:{SITE}:{device}:{rule}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_and_a_device_appear_as_a_binary_sensor_that_follows_raise_and_clear() {
    let site = Site::start(&format!("{OVERHEAT}{LEAK}"), |_| {}).await;
    site.publish("sensors/boiler-1/temperature", "50").await;
    let (topic, config) = site.config(&entity_id("boiler-1", "overheat")).await;
    assert!(
        topic.starts_with(&format!(
            "homeassistant/binary_sensor/{SITE}/boiler-1_overheat_"
        )) && topic.ends_with("/config"),
        "{topic}"
    );
    let gateway_device = format!("watchpost-gateway:{SITE}:{SITE}");
    assert_eq!(config["state_topic"], "alerts/critical/boiler-1/overheat");
    assert_eq!(config["json_attributes_topic"], config["state_topic"]);
    assert_eq!(config["device_class"], "heat");
    assert_eq!(
        config["device"],
        json!({
            "identifiers": [format!("watchpost-device:{SITE}:boiler-1")],
            "name": "boiler-1",
            "via_device": gateway_device,
        })
    );
    // The device the sensor's entity routes through is announced too.
    let (_, alerts_raised) = site
        .config(&format!("{gateway_device}:alerts_active"))
        .await;
    assert_eq!(
        alerts_raised["device"]["identifiers"],
        json!([gateway_device])
    );
    // Only the rule that watches what the device reported.
    let boiler: Vec<Value> = site
        .discovery
        .messages()
        .iter()
        .map(Received::json)
        .filter(|d| d["device"]["name"] == "boiler-1")
        .collect();
    assert_eq!(boiler.len(), 1, "{boiler:#?}");

    // The state: nothing yet (no alert so far), then raised, then cleared.
    site.publish("sensors/boiler-1/temperature", "95").await;
    site.binary_state(&config, "on").await;
    site.publish("sensors/boiler-1/temperature", "80").await;
    site.binary_state(&config, "off").await;
    site.publish("sensors/boiler-1/temperature", "96").await;
    site.binary_state(&config, "on").await;

    // A leak probe: a moisture sensor, wet at once.
    site.publish("sensors/cellar/water_leak", "true").await;
    let (_, leak) = site.config(&entity_id("cellar", "water-leak")).await;
    assert_eq!(leak["device_class"], "moisture");
    site.binary_state(&leak, "on").await;
    site.publish("sensors/cellar/water_leak", "false").await;
    site.binary_state(&leak, "off").await;
    site.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_rule_by_reload_removes_its_entities() {
    let mut site = Site::start(&format!("{OVERHEAT}{LEAK}"), |_| {}).await;
    site.publish("sensors/boiler-1/temperature", "95").await;
    site.publish("sensors/cellar/water_leak", "false").await;
    let (overheat, config) = site.config(&entity_id("boiler-1", "overheat")).await;
    let (leak, _) = site.config(&entity_id("cellar", "water-leak")).await;
    site.binary_state(&config, "on").await;

    let fewer = gateway_config(
        site.data.path(),
        Some(site.mosquitto.port()),
        &format!("{LEAK}{DISCOVERY}"),
    );
    let outcome = site.gateway.reload(fewer).await.unwrap();
    assert_eq!(outcome.removed, ["overheat"]);
    site.removed(&overheat).await;
    check_message("homeassistant", &overheat, b"").unwrap();

    // What Home Assistant finds when it connects now: the leak sensor and the gateway's, not
    // overheat. A publish after subscribing marks where the retained messages end.
    let fresh = Collector::subscribe(site.gateway.mqtt_addr(), "homeassistant/#")
        .await
        .unwrap();
    site.publish("homeassistant/fence", "end").await;
    let fenced = wait_until(DEADLINE, || {
        fresh
            .messages()
            .iter()
            .any(|m| m.topic == "homeassistant/fence")
    })
    .await;
    assert!(fenced, "{:#?}", fresh.messages());
    let retained: Vec<String> = fresh
        .messages()
        .iter()
        .take_while(|m| m.topic != "homeassistant/fence")
        .map(|m| m.topic.clone())
        .collect();
    assert!(retained.contains(&leak), "{retained:#?}");
    assert!(!retained.contains(&overheat), "{retained:#?}");
    assert_eq!(
        retained.len(),
        1 + 3,
        "the leak, uplink, outbox, alerts raised: {retained:#?}"
    );
    site.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_device_takes_its_entities_with_it() {
    let site = Site::start(OVERHEAT, |config| {
        config.gateway.stale_after = Duration::from_secs(1);
        config.gateway.forget_after = Duration::from_secs(2);
    })
    .await;
    site.publish("sensors/boiler-1/temperature", "50").await;
    let (topic, _) = site.config(&entity_id("boiler-1", "overheat")).await;
    // Silent for forget_after with nothing raised: forgotten, and gone from Home Assistant.
    site.removed(&topic).await;
    // Back: announced again.
    site.publish("sensors/boiler-1/temperature", "51").await;
    let back = wait_until(DEADLINE, || {
        let messages = site.discovery.messages();
        let last = messages.iter().rev().find(|m| m.topic == topic);
        last.is_some_and(|m| !m.payload.is_empty())
    })
    .await;
    assert!(back, "{:#?}", site.discovery.messages());
    site.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_is_a_device_with_its_uplink_and_outbox() {
    let mut site = Site::start(OVERHEAT, |_| {}).await;
    let device = format!("watchpost-gateway:{SITE}:{SITE}");
    let (uplink_topic, uplink) = site.config(&format!("{device}:uplink")).await;
    let (_, outbox) = site.config(&format!("{device}:outbox_depth")).await;
    let (_, raised) = site.config(&format!("{device}:alerts_active")).await;
    assert!(uplink_topic.starts_with("homeassistant/binary_sensor/"));
    assert_eq!(uplink["device_class"], "connectivity");
    for config in [&uplink, &outbox, &raised] {
        assert_eq!(config["state_topic"], state_topic(SITE));
        assert_eq!(config["device"]["identifiers"], json!([device]));
        assert_eq!(config["entity_category"], "diagnostic");
    }
    let latest = |site: &Site| {
        site.state
            .messages()
            .last()
            .map(|m| m.payload.clone())
            .unwrap_or_default()
    };
    let connected = wait_until(DEADLINE, || {
        let state = latest(&site);
        !state.is_empty() && read_binary(&uplink, &state) == "on"
    })
    .await;
    assert!(connected, "{:#?}", site.state.messages());
    assert_eq!(render(&outbox, &latest(&site)), "0");
    assert_eq!(render(&raised, &latest(&site)), "0");

    // An alert raised shows; with the upstream gone, the uplink is disconnected and the
    // alert waits in the outbox.
    site.mosquitto.stop();
    site.publish("sensors/boiler-1/temperature", "95").await;
    let seen = wait_until(Duration::from_secs(40), || {
        let state = latest(&site);
        read_binary(&uplink, &state) == "off"
            && render(&outbox, &state) == "1"
            && render(&raised, &state) == "1"
    })
    .await;
    assert!(seen, "{:#?}", site.state.messages());
    site.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_entities_are_back_at_once_and_go_after_forget_after() {
    let site = Site::start(&format!("{OVERHEAT}{LEAK}"), |_| {}).await;
    site.publish("sensors/cellar/water_leak", "false").await;
    let (topic, config) = site.config(&entity_id("cellar", "water-leak")).await;
    let Site {
        gateway,
        data,
        mosquitto,
        ..
    } = site;
    gateway.shutdown().await;
    assert!(
        data.path()
            .join(watchpost::homeassistant::SAVED_FILE)
            .exists()
    );

    // The next run: cellar says nothing, and the broker kept no discovery message. Home
    // Assistant (re)connecting finds cellar's entity all the same, as long as ingest would
    // have kept cellar in memory had the gateway not restarted.
    let mut next = gateway_config(
        data.path(),
        Some(mosquitto.port()),
        &format!("{OVERHEAT}{LEAK}{DISCOVERY}"),
    );
    next.gateway.stale_after = Duration::from_secs(1);
    next.gateway.forget_after = Duration::from_secs(3);
    let gateway = watchpost::start(next).await.unwrap();
    let discovery = Collector::subscribe(gateway.mqtt_addr(), "homeassistant/#")
        .await
        .unwrap();
    let back = wait_until(DEADLINE, || {
        discovery
            .messages()
            .iter()
            .any(|m| m.topic == topic && !m.payload.is_empty() && m.json() == config)
    })
    .await;
    assert!(back, "{:#?}", discovery.messages());
    let gone = wait_until(DEADLINE, || {
        discovery
            .messages()
            .iter()
            .any(|m| m.topic == topic && m.payload.is_empty())
    })
    .await;
    assert!(gone, "{:#?}", discovery.messages());
    gateway.shutdown().await;
}

/// The `[[acl]]` rule the README gives for Home Assistant's birth and last will messages.
const HOME_ASSISTANT_ACL: &str = "[[acl]]\nclient = \"home-assistant\"\nallow = \"publish\"\ntopics = [\"homeassistant/status\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn home_assistant_logs_in_as_an_operator_as_the_readme_says() {
    let data = tempfile::tempdir().unwrap();
    let file = data.path().join("credentials.toml");
    let mut credentials = Credentials::default();
    let secret = credentials.add("home-assistant", Role::Operator).unwrap();
    credentials.save(&file).unwrap();
    let config = |acl: &str| {
        let mut config = gateway_config(data.path(), None, &format!("{OVERHEAT}{DISCOVERY}{acl}"));
        config.broker.allow_anonymous = false;
        config.broker.credentials = file.clone();
        config
    };
    // What Home Assistant sends by default: its client ID as set, a login, and a last will
    // of `offline` on homeassistant/status.
    let options = |addr| {
        let mut options =
            clients::options(addr, "home-assistant", Some(("home-assistant", &secret)));
        options.set_last_will(LastWill::new(
            "homeassistant/status",
            "offline",
            QoS::AtMostOnce,
            false,
        ));
        options
    };

    // Without the rule, an operator may not publish its last will's topic: refused.
    let gateway = watchpost::start(config("")).await.unwrap();
    let answer = clients::connect(options(gateway.mqtt_addr()))
        .await
        .unwrap();
    assert_eq!(
        answer.refused(),
        Some(ConnectReturnCode::NotAuthorized),
        "{answer:?}"
    );
    gateway.shutdown().await;

    // With it: admitted, and it finds the gateway's entities and its state.
    let gateway = watchpost::start(config(HOME_ASSISTANT_ACL)).await.unwrap();
    let addr = gateway.mqtt_addr();
    let discovery = Collector::subscribe_options(options(addr), "homeassistant/#")
        .await
        .unwrap();
    let entities = wait_until(DEADLINE, || {
        discovery.messages().iter().any(|m| {
            m.json()["unique_id"] == format!("watchpost-gateway:{SITE}:{SITE}:alerts_active")
        })
    })
    .await;
    assert!(entities, "{:#?}", discovery.messages());
    drop(discovery);
    let mut state_client = clients::options(
        addr,
        "home-assistant@state",
        Some(("home-assistant", &secret)),
    );
    state_client.set_clean_session(true);
    let state = Collector::subscribe_options(state_client, &state_topic(SITE))
        .await
        .unwrap();
    let read = wait_until(DEADLINE, || !state.messages().is_empty()).await;
    assert!(
        read,
        "the state topic under $SYS is readable by an operator"
    );
    assert_eq!(state.messages()[0].json()["alerts_active"], 0);
    gateway.shutdown().await;
}

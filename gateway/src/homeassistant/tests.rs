//! The discovery documents against Home Assistant's documented schema, and the state
//! machine's life: devices and metrics appearing, reloads, forgetting, falling behind.

use super::*;
use crate::alert::AlertDoc;
use crate::rules::{AlertState, Transition};
use crate::value::Value;

const RULES: &str = r#"
[[rule]]
name = "overheat"
match = "sensors/+/temperature"
above = 90.0
severity = "critical"

[[rule]]
name = "water-leak"
match = "sensors/+/water_leak"
equals = true
severity = "critical"

[[rule]]
name = "offline"
match = "sensors/+/status"
offline_for = "5m"

[[rule]]
name = "quiet"
match = "sensors/+/+"
silent_for = "1h"
scope = "device"

[[rule]]
name = "door.open"
match = "sensors/+/door"
equals = "open"
labels = { device_class = "garage_door" }
"#;

fn rules_of(toml: &str) -> Arc<[Rule]> {
    let source = format!("[gateway]\nid = \"site-17\"\n{toml}");
    match crate::config::parse(&source, "t.toml") {
        Ok(loaded) => loaded.config.rules.into(),
        Err(e) => panic!("{e}"),
    }
}

fn identity() -> Identity {
    Identity {
        prefix: "homeassistant".into(),
        site: "site-17".into(),
        gateway: "gw-a".into(),
        uplink: true,
        peer: true,
    }
}

fn snapshot(rules: &Arc<[Rule]>, devices: &[(&str, &[&str])]) -> Snapshot {
    Snapshot {
        rules: rules.clone(),
        devices: devices
            .iter()
            .map(|(d, metrics)| ((*d).into(), metrics.iter().map(|m| (*m).into()).collect()))
            .collect(),
    }
}

fn stream(device: &str, metric: &str) -> Event {
    Event::Stream {
        device: device.into(),
        metric: metric.into(),
    }
}

fn doc(m: &Publish) -> Json {
    serde_json::from_slice(&m.payload).unwrap()
}

/// The config of `rule`'s binary sensor on `device` among `messages`.
fn config_of<'a>(messages: &'a [Publish], device: &str, rule: &str) -> Option<&'a Publish> {
    let unique = format!("watchpost:site-17:{device}:{rule}");
    messages
        .iter()
        .filter(|m| !m.payload.is_empty())
        .find(|m| doc(m)["unique_id"] == unique.as_str())
}

/// What Home Assistant makes of `payload` on a binary sensor's state topic: the documented
/// `{{ value_json.KEY }}` template (the only form discovery writes) rendered and compared
/// with `payload_on` and `payload_off`.
fn binary_state(config: &Json, payload: &[u8]) -> &'static str {
    let template = config["value_template"].as_str().unwrap();
    let key = template
        .strip_prefix("{{ value_json.")
        .and_then(|t| t.strip_suffix(" }}"))
        .unwrap_or_else(|| panic!("not a value_json template: {template}"));
    let value: Json = serde_json::from_slice(payload).unwrap();
    let rendered = match &value[key] {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    };
    if rendered == config["payload_on"] {
        "on"
    } else if rendered == config["payload_off"] {
        "off"
    } else {
        "unknown"
    }
}

#[test]
fn every_message_follows_the_documented_schema() {
    let rules = rules_of(RULES);
    let mut discovery = Discovery::new(identity());
    let mut messages = discovery.gateway_messages();
    messages.extend(discovery.on_snapshot(snapshot(
        &rules,
        &[
            ("boiler-1", &["temperature"]),
            ("basement.leak", &["water_leak", "temperature"]),
            ("garage door (west)", &["door"]),
            ("ümlaut", &["temperature"]),
        ],
    )));
    assert!(!messages.is_empty());
    let mut topics = BTreeSet::new();
    let mut unique_ids = BTreeSet::new();
    for m in &messages {
        if let Err(e) = check_message("homeassistant", &m.topic, &m.payload) {
            panic!("{e}\n{}", String::from_utf8_lossy(&m.payload));
        }
        assert!(!m.payload.is_empty(), "nothing to remove yet: {}", m.topic);
        assert!(topics.insert(m.topic.clone()), "two configs on {}", m.topic);
        let d = doc(m);
        let unique = d["unique_id"].as_str().unwrap().to_owned();
        assert!(
            unique_ids.insert(unique.clone()),
            "unique_id {unique} twice"
        );
        assert_eq!(d["origin"]["name"], "Watchpost");
    }
    // Per device: its device-wide rules (presence, device-wide silence) and the rules of the
    // metrics it reported; the gateway: uplink, outbox, peer, alerts raised.
    assert_eq!(messages.len(), 4 + 3 + 4 + 3 + 3);
    let gateway_ids = json!(["watchpost-gateway:site-17:gw-a"]);
    for m in &messages {
        let d = doc(m);
        if m.topic.contains("/gateway_gw-a_") {
            assert_eq!(d["device"]["identifiers"], gateway_ids, "{}", m.topic);
            assert_eq!(d["state_topic"], "$SYS/watchpost/gw-a/state");
        } else {
            let device = d["device"]["name"].as_str().unwrap();
            assert_eq!(
                d["device"]["identifiers"],
                json!([format!("watchpost-device:site-17:{device}")])
            );
            assert_eq!(d["device"]["via_device"], "watchpost-gateway:site-17:gw-a");
            assert!(
                m.topic.starts_with("homeassistant/binary_sensor/site-17/"),
                "{}",
                m.topic
            );
        }
    }
    let leak = config_of(&messages, "basement.leak", "water-leak").unwrap();
    let leak = doc(leak);
    assert_eq!(
        leak["state_topic"],
        "alerts/critical/basement.leak/water-leak"
    );
    assert_eq!(leak["json_attributes_topic"], leak["state_topic"]);
    assert_eq!(leak["device_class"], "moisture");
    assert_eq!(leak["name"], "water-leak");
    let door = doc(config_of(&messages, "garage door (west)", "door.open").unwrap());
    assert_eq!(door["device_class"], "garage_door", "from the label");
    assert_eq!(
        door["state_topic"],
        "alerts/warning/garage door (west)/door.open"
    );
}

#[test]
fn the_state_follows_the_alert_documents_raise_and_clear() {
    let rules = rules_of(RULES);
    let mut discovery = Discovery::new(identity());
    discovery.on_snapshot(snapshot(&rules, &[]));
    let messages = discovery.on_event(&stream("boiler-1", "temperature"));
    let config = doc(config_of(&messages, "boiler-1", "overheat").unwrap());
    let rule = rules.iter().find(|r| r.name == "overheat").unwrap();
    let transition = |state, at| Transition {
        state,
        since: 1_732_212_345_123,
        at,
        value: Value::Number(95.2),
        threshold: Some(90.0),
        repeat: 0,
    };
    let raised = AlertDoc::new(
        "site-17",
        rule,
        "boiler-1",
        "temperature",
        &transition(AlertState::Raised, 1_732_212_355_130),
    );
    let cleared = AlertDoc::new(
        "site-17",
        rule,
        "boiler-1",
        "temperature",
        &transition(AlertState::Cleared, 1_732_212_455_130),
    );
    assert_eq!(config["state_topic"], raised.topic());
    assert_eq!(binary_state(&config, &raised.to_json()), "on");
    assert_eq!(binary_state(&config, &cleared.to_json()), "off");
}

#[test]
fn devices_get_the_rules_ingest_gives_them() {
    let rules = rules_of(RULES);
    let mut discovery = Discovery::new(identity());
    assert!(discovery.on_snapshot(snapshot(&rules, &[])).is_empty());
    // A first reading: the device's device-wide rules and the metric's rule.
    let first = discovery.on_event(&stream("boiler-1", "temperature"));
    let names: BTreeSet<String> = first
        .iter()
        .map(|m| doc(m)["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        ["offline", "overheat", "quiet"].map(String::from).into()
    );
    // The same metric again: nothing new.
    assert!(
        discovery
            .on_event(&stream("boiler-1", "temperature"))
            .is_empty()
    );
    // A metric no rule watches but the device-wide ones: nothing new either.
    assert!(
        discovery
            .on_event(&stream("boiler-1", "humidity"))
            .is_empty()
    );
    let leak = discovery.on_event(&stream("boiler-1", "water_leak"));
    assert_eq!(leak.len(), 1);
    assert_eq!(doc(&leak[0])["name"], "water-leak");
    // A device that only said it is online: its device-wide rules.
    let presence = discovery.on_event(&Event::Presence {
        device: "plug-3".into(),
        online: true,
        at: 1,
    });
    let names: BTreeSet<String> = presence
        .iter()
        .map(|m| doc(m)["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["offline", "quiet"].map(String::from).into());
    assert!(
        discovery
            .on_event(&Event::Presence {
                device: "plug-3".into(),
                online: false,
                at: 2,
            })
            .is_empty()
    );
    assert_eq!(discovery.entities(), 4 + 2);
}

#[test]
fn a_removed_rule_and_a_forgotten_device_take_their_entities_with_them() {
    let rules = rules_of(RULES);
    let mut discovery = Discovery::new(identity());
    let all = discovery.on_snapshot(snapshot(
        &rules,
        &[("boiler-1", &["temperature"]), ("cellar", &["water_leak"])],
    ));
    let overheat = config_of(&all, "boiler-1", "overheat")
        .unwrap()
        .topic
        .clone();
    // A reload without overheat, and with water-leak changed to a warning.
    let overheat_rule = "[[rule]]\nname = \"overheat\"\nmatch = \"sensors/+/temperature\"\nabove = 90.0\nseverity = \"critical\"\n";
    assert!(RULES.contains(overheat_rule));
    let fewer = RULES.replacen(overheat_rule, "", 1).replacen(
        "equals = true\nseverity = \"critical\"",
        "equals = true\nseverity = \"warning\"",
        1,
    );
    let changed = discovery.on_event(&Event::Rules(rules_of(&fewer)));
    let removed: Vec<&str> = changed
        .iter()
        .filter(|m| m.payload.is_empty())
        .map(|m| m.topic.as_str())
        .collect();
    assert_eq!(removed, [overheat.as_str()]);
    // The changed rule's config is published again, with its new state topic; nothing else.
    let updated: Vec<Json> = changed
        .iter()
        .filter(|m| !m.payload.is_empty())
        .map(doc)
        .collect();
    assert_eq!(updated.len(), 1, "{updated:#?}");
    assert_eq!(
        updated[0]["state_topic"],
        "alerts/warning/cellar/water-leak"
    );
    for m in &changed {
        check_message("homeassistant", &m.topic, &m.payload).unwrap();
    }
    // The same rules again: nothing.
    assert!(
        discovery
            .on_event(&Event::Rules(rules_of(&fewer)))
            .is_empty()
    );

    // Forgetting a device removes every entity of its own, and only those.
    let before = discovery.entities();
    let gone = discovery.on_event(&Event::Forgotten(Arc::from(vec![Box::<str>::from(
        "cellar",
    )])));
    assert!(gone.iter().all(|m| m.payload.is_empty()));
    assert_eq!(gone.len(), 3, "offline, quiet and water-leak: {gone:#?}");
    assert_eq!(discovery.entities(), before - 3);
    assert!(
        discovery
            .on_event(&Event::Forgotten(Arc::from(vec![Box::<str>::from(
                "cellar"
            )])))
            .is_empty(),
        "forgotten twice"
    );
    // Back again: as new.
    assert_eq!(discovery.on_event(&stream("cellar", "water_leak")).len(), 3);
}

#[test]
fn after_falling_behind_the_snapshot_decides_whatever_comes_after_it() {
    let rules = rules_of(RULES);
    // What the engine went through: the listener saw the start, then missed the rest.
    let history = [
        stream("a", "temperature"),
        stream("b", "water_leak"),
        Event::Forgotten(Arc::from(vec![Box::<str>::from("a")])),
        stream("c", "door"),
        stream("a", "water_leak"),
        Event::Forgotten(Arc::from(vec![Box::<str>::from("c")])),
    ];
    let mut engine_view = Discovery::new(identity());
    engine_view.on_snapshot(snapshot(&rules, &[]));
    for e in &history {
        engine_view.on_event(e);
    }
    let truth = snapshot(&rules, &[("a", &["water_leak"]), ("b", &["water_leak"])]);
    assert_eq!(
        engine_view.devices.keys().map(|d| &**d).collect::<Vec<_>>(),
        ["a", "b"]
    );
    for seen in 0..history.len() {
        let mut listener = Discovery::new(identity());
        listener.on_snapshot(snapshot(&rules, &[]));
        for e in &history[..seen] {
            listener.on_event(e);
        }
        // Lagged: the snapshot, then whatever was still queued (some of it older).
        listener.on_snapshot(truth.clone());
        for e in &history[seen..] {
            listener.on_event(e);
        }
        assert_eq!(listener.devices, engine_view.devices, "after {seen} events");
        assert_eq!(
            listener.published, engine_view.published,
            "after {seen} events"
        );
    }
}

#[test]
fn a_snapshot_removes_what_no_longer_exists_and_publishes_only_what_changed() {
    let rules = rules_of(RULES);
    let mut discovery = Discovery::new(identity());
    discovery.on_snapshot(snapshot(&rules, &[("a", &["temperature"])]));
    discovery.on_event(&stream("stale", "temperature"));
    let out = discovery.on_snapshot(snapshot(&rules, &[("a", &["temperature"])]));
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|m| m.payload.is_empty()));
    assert!(
        discovery
            .on_snapshot(snapshot(&rules, &[("a", &["temperature"])]))
            .is_empty()
    );
}

#[test]
fn device_classes_come_from_the_label_the_name_or_a_states_metric() {
    let cases = [
        // (rule, expected class)
        (
            "name = \"water-leak\"\nmatch = \"sensors/+/water_leak\"\nequals = true",
            "moisture",
        ),
        (
            "name = \"flood\"\nmatch = \"sensors/+/flood\"\nequals = true",
            "moisture",
        ),
        (
            "name = \"wet\"\nmatch = \"sensors/+/probe\"\nequals = true",
            "moisture",
        ),
        (
            "name = \"alarm\"\nmatch = \"sensors/+/water\"\nequals = true",
            "moisture",
        ),
        (
            "name = \"dry-soil\"\nmatch = \"sensors/+/soil_moisture\"\nbelow = 20.0",
            "problem",
        ),
        (
            "name = \"smoke\"\nmatch = \"sensors/+/smoke\"\nequals = true",
            "smoke",
        ),
        (
            "name = \"co-alarm\"\nmatch = \"sensors/+/co\"\nabove = 50.0",
            "carbon_monoxide",
        ),
        (
            "name = \"door-open\"\nmatch = \"sensors/+/door\"\nequals = \"open\"",
            "door",
        ),
        (
            "name = \"garage-door-open\"\nmatch = \"sensors/+/door\"\nequals = \"open\"",
            "garage_door",
        ),
        (
            "name = \"left-open\"\nmatch = \"sensors/+/contact\"\nequals = false",
            "opening",
        ),
        (
            "name = \"intruder\"\nmatch = \"sensors/+/motion\"\nequals = true",
            "motion",
        ),
        (
            "name = \"tamper\"\nmatch = \"sensors/+/tamper\"\nequals = true",
            "tamper",
        ),
        (
            "name = \"battery-low\"\nmatch = \"sensors/+/battery\"\nbelow = 15.0",
            "battery",
        ),
        (
            "name = \"room-hot\"\nmatch = \"sensors/+/temperature\"\nabove = 30.0",
            "heat",
        ),
        (
            "name = \"freezing\"\nmatch = \"sensors/+/temperature\"\nbelow = 0.0",
            "cold",
        ),
        (
            "name = \"freezer-switched-off\"\nmatch = \"sensors/+/relay\"\nequals = \"off\"",
            "problem",
        ),
        (
            "name = \"overload\"\nmatch = \"sensors/+/power\"\nabove = 2000.0",
            "problem",
        ),
        (
            "name = \"door-chatter\"\nmatch = \"sensors/+/door\"\nchanges_above = 10\nwindow = \"5m\"",
            "problem",
        ),
        (
            "name = \"leak-offline\"\nmatch = \"sensors/+/status\"\noffline_for = \"5m\"",
            "problem",
        ),
        (
            "name = \"quiet\"\nmatch = \"sensors/+/+\"\nsilent_for = \"1h\"",
            "problem",
        ),
        (
            "name = \"mains\"\nmatch = \"sensors/+/power\"\nabove = 5.0\nlabels = { device_class = \"power\" }",
            "power",
        ),
        (
            "name = \"door-open\"\nmatch = \"sensors/+/door\"\nequals = \"open\"\nlabels = { device_class = \"nonsense\" }",
            "door",
        ),
    ];
    for (rule, expected) in cases {
        let rules = rules_of(&format!("[[rule]]\n{rule}\n"));
        assert_eq!(device_class(&rules[0]), expected, "{rule}");
    }
}

#[test]
fn ids_are_topic_safe_and_names_that_read_alike_stay_apart() {
    let pairs = [
        ("a.b", "r", "a_b", "r"),
        ("a", "b_c", "a_b", "c"),
        ("dev ice", "r", "dev_ice", "r"),
        ("x/y", "r", "x_y", "r"),
    ];
    for (d1, r1, d2, r2) in pairs {
        let (one, two) = (object_id("s", d1, r1), object_id("s", d2, r2));
        assert!(id_level(&one) && id_level(&two), "{one} {two}");
        assert_ne!(one, two);
    }
    assert_eq!(object_id("s", "a", "r"), object_id("s", "a", "r"), "stable");
    assert_ne!(
        object_id("s", "a", "r"),
        object_id("t", "a", "r"),
        "per site"
    );
    let long = "d".repeat(500);
    assert!(object_id("s", &long, "r").len() < 80);
}

#[test]
fn the_schema_check_refuses_what_home_assistant_would() {
    let rules = rules_of(RULES);
    let mut discovery = Discovery::new(identity());
    let good = discovery.on_snapshot(snapshot(&rules, &[("boiler-1", &["temperature"])]));
    let good = config_of(&good, "boiler-1", "overheat").unwrap().clone();
    check_message("homeassistant", &good.topic, &good.payload).unwrap();
    let with = |change: &dyn Fn(&mut Json)| {
        let mut d = doc(&good);
        change(&mut d);
        serde_json::to_vec(&d).unwrap()
    };
    let topic = good.topic.as_str();
    let cases: Vec<(String, Vec<u8>, &str)> = vec![
        (
            topic.replace("homeassistant/", "ha/"),
            good.payload.to_vec(),
            "prefix",
        ),
        (
            topic.replace("/config", "/state"),
            good.payload.to_vec(),
            "config",
        ),
        (
            topic.replace("site-17", "site.17"),
            good.payload.to_vec(),
            "characters",
        ),
        (
            topic.replace("binary_sensor", "lamp"),
            good.payload.to_vec(),
            "component",
        ),
        (topic.into(), b"[1]".to_vec(), "dictionary"),
        (topic.into(), b"{".to_vec(), "JSON"),
        (
            topic.into(),
            with(&|d| d["stat_topic"] = json!("x")),
            "documented",
        ),
        (
            topic.into(),
            with(&|d| {
                d.as_object_mut().unwrap().remove("state_topic");
            }),
            "state_topic",
        ),
        (
            topic.into(),
            with(&|d| d["state_topic"] = json!("alerts/#")),
            "subscribe",
        ),
        (
            topic.into(),
            with(&|d| {
                d.as_object_mut().unwrap().remove("unique_id");
            }),
            "unique_id",
        ),
        (
            topic.into(),
            with(&|d| d["device"] = json!({"name": "x"})),
            "identifiers",
        ),
        (
            topic.into(),
            with(&|d| d["device"]["identifiers"] = json!([])),
            "identifiers",
        ),
        (
            topic.into(),
            with(&|d| {
                d["device"].as_object_mut().unwrap().remove("name");
            }),
            "name",
        ),
        (
            topic.into(),
            with(&|d| d["device"]["via"] = json!("x")),
            "device key",
        ),
        (
            topic.into(),
            with(&|d| {
                d.as_object_mut().unwrap().remove("origin");
            }),
            "origin",
        ),
        (
            topic.into(),
            with(&|d| d["device_class"] = json!("wetness")),
            "class",
        ),
        (
            topic.into(),
            with(&|d| d["payload_off"] = json!("raised")),
            "both",
        ),
        (topic.into(), with(&|d| d["qos"] = json!(3)), "qos"),
    ];
    for (topic, payload, why) in cases {
        match check_message("homeassistant", &topic, &payload) {
            Ok(()) => panic!(
                "accepted ({why}): {topic} {}",
                String::from_utf8_lossy(&payload)
            ),
            Err(e) => assert!(e.contains(why), "{why:?} not in {e:?}"),
        }
    }
    // A removal: the topic must still be one.
    check_message("homeassistant", &good.topic, b"").unwrap();
}

#[test]
fn the_gateways_state_document_reads_the_counters() {
    let stats = Stats::default();
    let id = identity();
    let doc =
        |stats: &Stats| -> Json { serde_json::from_slice(&state_document(&id, stats)).unwrap() };
    assert_eq!(
        doc(&stats),
        json!({"uplink": "disconnected", "outbox_depth": 0, "peer": "disconnected", "alerts_active": 0})
    );
    stats.uplink_connected.store(true, Ordering::Relaxed);
    Stats::set(&stats.outbox_depth, 7);
    Stats::set(&stats.peer_link_up, 1);
    Stats::set(&stats.alerts_active, 2);
    assert_eq!(
        doc(&stats),
        json!({"uplink": "connected", "outbox_depth": 7, "peer": "connected", "alerts_active": 2})
    );
    // Each sensor's template names a key of the document.
    let alone = Identity {
        uplink: false,
        peer: false,
        ..identity()
    };
    let messages = Discovery::new(alone.clone()).gateway_messages();
    assert_eq!(
        messages.len(),
        1,
        "alerts raised only, without uplink or peer"
    );
    let state: Json = serde_json::from_slice(&state_document(&alone, &stats)).unwrap();
    assert_eq!(state, json!({"alerts_active": 2}));
    for m in Discovery::new(identity()).gateway_messages() {
        let d = self::doc(&m);
        let template = d["value_template"].as_str().unwrap();
        let key = template
            .strip_prefix("{{ value_json.")
            .and_then(|t| t.strip_suffix(" }}"))
            .unwrap();
        assert!(
            doc(&stats).get(key).is_some(),
            "{key} in the state document"
        );
    }
}

#[test]
fn after_a_restart_the_last_runs_devices_keep_their_entities_until_forget_after() {
    let rules = rules_of(RULES);
    let mut first = Discovery::new(identity());
    let before = first.on_snapshot(snapshot(
        &rules,
        &[
            ("boiler-1", &["temperature"]),
            ("cellar", &["water_leak", "temperature"]),
        ],
    ));
    let saved = first.saved();
    assert!(first.take_changed());
    let text = serde_json::to_string(&saved).unwrap();
    assert_eq!(serde_json::from_str::<Saved>(&text).unwrap(), saved);

    // The next run, with overheat taken out of the file meanwhile.
    let overheat_rule = "[[rule]]\nname = \"overheat\"\nmatch = \"sensors/+/temperature\"\nabove = 90.0\nseverity = \"critical\"\n";
    let fewer = rules_of(&RULES.replacen(overheat_rule, "", 1));
    let mut next = Discovery::new(identity());
    assert!(next.restore(saved, 10_000).is_empty());
    // Ingest knows nothing yet; boiler-1 will report, cellar not.
    let start = next.on_snapshot(snapshot(&fewer, &[]));
    let overheat: BTreeSet<&str> = before
        .iter()
        .filter(|m| doc(m)["name"] == "overheat")
        .map(|m| m.topic.as_str())
        .collect();
    assert_eq!(overheat.len(), 2);
    let removed: BTreeSet<&str> = start
        .iter()
        .filter(|m| m.payload.is_empty())
        .map(|m| m.topic.as_str())
        .collect();
    assert_eq!(removed, overheat, "the rule gone while stopped");
    // Everything else is published again at once: the broker did not keep it.
    let again: BTreeSet<&str> = start
        .iter()
        .filter(|m| !m.payload.is_empty())
        .map(|m| m.topic.as_str())
        .collect();
    let kept: BTreeSet<&str> = before
        .iter()
        .map(|m| m.topic.as_str())
        .filter(|t| !overheat.contains(t))
        .collect();
    assert_eq!(again, kept);
    for m in &start {
        check_message("homeassistant", &m.topic, &m.payload).unwrap();
    }
    assert!(
        next.on_event(&stream("boiler-1", "temperature")).is_empty(),
        "nothing new"
    );
    assert!(next.expire(9_999).is_empty(), "not yet");
    // Time is up: cellar, not heard of since, goes; boiler-1 stays.
    let expired = next.expire(10_000);
    assert!(expired.iter().all(|m| m.payload.is_empty()));
    let names: BTreeSet<String> = before
        .iter()
        .filter(|m| expired.iter().any(|e| e.topic == m.topic))
        .map(|m| {
            let d = doc(m);
            format!(
                "{} {}",
                d["device"]["name"].as_str().unwrap(),
                d["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        names,
        ["cellar offline", "cellar quiet", "cellar water-leak"]
            .map(String::from)
            .into()
    );
    assert!(next.expire(20_000).is_empty(), "once");
    assert_eq!(next.entities(), 2, "boiler-1: offline and quiet");
    assert_eq!(
        next.saved().devices.keys().collect::<Vec<_>>(),
        ["boiler-1"]
    );
}

#[test]
fn a_device_of_the_last_run_that_ingest_forgets_goes_at_once() {
    let rules = rules_of(RULES);
    let mut first = Discovery::new(identity());
    first.on_snapshot(snapshot(&rules, &[("cellar", &["water_leak"])]));
    let mut next = Discovery::new(identity());
    next.restore(first.saved(), 10_000);
    next.on_snapshot(snapshot(&rules, &[("cellar", &[])]));
    let gone = next.on_event(&Event::Forgotten(Arc::from(vec![Box::<str>::from(
        "cellar",
    )])));
    assert_eq!(gone.len(), 3);
    assert!(gone.iter().all(|m| m.payload.is_empty()));
    assert!(next.expire(10_000).is_empty());
}

#[test]
fn the_gateways_entities_it_no_longer_has_are_removed_after_a_restart() {
    let with_uplink = Discovery::new(identity());
    let saved = with_uplink.saved();
    assert_eq!(saved.gateway.len(), 4);
    let mut without = Discovery::new(Identity {
        uplink: false,
        ..identity()
    });
    let removed = without.restore(saved, 0);
    let topics: Vec<&str> = removed.iter().map(|m| m.topic.as_str()).collect();
    assert_eq!(
        topics,
        [
            "homeassistant/binary_sensor/site-17/gateway_gw-a_uplink/config",
            "homeassistant/sensor/site-17/gateway_gw-a_outbox_depth/config",
        ]
    );
    assert!(removed.iter().all(|m| m.payload.is_empty()));
    assert!(without.take_changed());
}

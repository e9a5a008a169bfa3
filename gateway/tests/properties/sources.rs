//! Foreign payloads (`Source::decode`) against their contract: the shipped Tasmota, ESPHome and
//! Shelly sources on the seed corpus, mutations of it and generated nested JSON.

use proptest::prelude::*;
use watchpost::codec::{self, Limits};
use watchpost::sources::{Payload, Source};

use crate::check;
use crate::codec::{JSON_TOKENS, json, json_object, level, number};
use crate::corpus::{cases, mutant, seeds};

/// A topic of one of the fleet's sources with its placeholders (and `+`) filled in.
fn fleet_topic() -> impl Strategy<Value = String> {
    let patterns: Vec<&'static str> = check::fleet().iter().map(|s| s.pattern).collect();
    (prop::sample::select(patterns), level(), level(), level()).prop_map(|(p, d, m, any)| {
        p.replace("{device}", &d)
            .replace("{metric}", &m)
            .replace('+', &any)
    })
}

/// A fleet topic, sometimes one level too many or too few.
fn topic() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => fleet_topic(),
        1 => (fleet_topic(), level()).prop_map(|(t, l)| format!("{t}/{l}")),
        1 => fleet_topic().prop_map(|t| t.rsplit_once('/').map_or(t.clone(), |(a, _)| a.to_owned())),
    ]
}

#[test]
fn every_seed_is_a_message_that_keeps_the_contract() {
    let mut claimed = 0;
    for (name, data) in seeds("sources") {
        let (topic, payload) = check::split_message(&data)
            .unwrap_or_else(|| panic!("{name}: a seed is `topic\\npayload`"));
        check::sources(topic, payload);
        let fleet = check::fleet();
        claimed += usize::from(fleet.iter().any(|s| {
            s.source
                .decode(topic, payload, Default::default())
                .is_some()
        }));
    }
    assert!(
        claimed >= 20,
        "most seeds are for some source of the fleet ({claimed})"
    );
}

/// A usable metric name, by the rule `config` applies to the names a source maps to and the
/// module doc of `codec` states: not empty, no `/`, `+` or `#`, not `seq` or `status`.
fn usable_metric(name: &str) -> bool {
    !name.is_empty()
        && !name.contains(['/', '+', '#'])
        && name != codec::SEQ_KEY
        && name != codec::STATUS_METRIC
}

/// Found while writing the property "a source's readings are readings the codec would
/// accept": a JSON source without a `metrics` map made a metric of any key path, and a number
/// source of any `{metric}` level, the reserved `status` and `seq` included.
#[test]
fn sources_give_only_usable_metric_names() {
    let tasmota = Source::new("t", "tele/{device}/SENSOR", Payload::Json, None, None).unwrap();
    for (payload, numbers) in [
        (r#"{"":1}"#, 1),
        (r#"{"a/b":2}"#, 1),
        (r##"{"+":3,"#":4}"##, 2),
        (r#"{"status":5}"#, 1),
        (r#"{"seq":6}"#, 1),
        (r#"{"x":{"":7}}"#, 1),
        (r#"{"ok":1,"status":2}"#, 2),
    ] {
        check::sources("tele/k/SENSOR", payload.as_bytes());
        let r = match tasmota.decode("tele/k/SENSOR", payload.as_bytes(), Limits::default()) {
            Some(Ok(watchpost::codec::Message::Readings(r))) => r,
            other => panic!("{payload}: {other:?}"),
        };
        for (metric, _) in &r.values {
            assert!(
                usable_metric(metric),
                "{payload} gave the metric {metric:?}"
            );
        }
        assert_eq!(
            r.values.len() + r.rejected.len() + r.unmapped as usize,
            numbers,
            "{payload}: every number is a reading, a rejection, or (under a reserved name) counted as unmapped"
        );
    }
    let esphome = Source::new(
        "e",
        "{device}/sensor/{metric}/state",
        Payload::Number,
        None,
        None,
    )
    .unwrap();
    for topic in ["node/sensor/status/state", "node/sensor/seq/state"] {
        check::sources(topic, b"1");
        let r = esphome.decode(topic, b"1", Limits::default()).unwrap();
        assert!(r.is_err(), "{topic} decoded as {r:?}");
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn mutated_seeds_keep_the_contract(data in mutant("sources", JSON_TOKENS)) {
        if let Some((topic, payload)) = check::split_message(&data) {
            check::sources(topic, payload);
        }
    }

    #[test]
    fn nested_json_gives_one_reading_per_numeric_leaf(topic in topic(), payload in json_object()) {
        check::sources(&topic, payload.as_bytes());
    }

    #[test]
    fn any_json_value_keeps_the_contract(topic in topic(), value in json()) {
        check::sources(&topic, value.text().as_bytes());
    }

    #[test]
    fn numbers_and_bytes_keep_the_contract(
        topic in topic(),
        payload in prop_oneof![
            number().prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 0..32),
        ],
    ) {
        check::sources(&topic, &payload);
    }
}

//! Inputs the fuzzing and property tests found that the code under test mishandles. Each test
//! states the behaviour that should hold and is ignored, with the reason, until the code is
//! fixed; then the `#[ignore]` goes.

use watchpost::codec::{self, Limits};
use watchpost::sources::{Payload, Source};

/// A usable metric name, by the rule `config` applies to the names a source maps to and the
/// module doc of `codec` states: not empty, no `/`, `+` or `#`, not `seq` or `status`.
fn usable_metric(name: &str) -> bool {
    !name.is_empty()
        && !name.contains(['/', '+', '#'])
        && name != codec::SEQ_KEY
        && name != codec::STATUS_METRIC
}

#[test]
#[ignore = "known issue: a JSON source turns any key into a metric name: empty, with '/', '+' or '#', or the reserved seq and status"]
fn json_sources_give_only_usable_metric_names() {
    let tasmota = Source::new("t", "tele/{device}/SENSOR", Payload::Json, None, None).unwrap();
    for payload in [
        r#"{"":1}"#,
        r#"{"a/b":2}"#,
        r##"{"+":3,"#":4}"##,
        r#"{"status":5}"#,
        r#"{"seq":6}"#,
        r#"{"x":{"":7}}"#,
    ] {
        let r = tasmota
            .decode("tele/k/SENSOR", payload.as_bytes(), Limits::default())
            .unwrap();
        if let Ok(r) = r {
            for (metric, _) in &r.values {
                assert!(
                    usable_metric(metric),
                    "{payload} gave the metric {metric:?}"
                );
            }
        }
    }
}

#[test]
#[ignore = "known issue: a number source takes `status` or `seq` from the topic as a metric name"]
fn number_sources_give_only_usable_metric_names() {
    let esphome = Source::new(
        "e",
        "{device}/sensor/{metric}/state",
        Payload::Number,
        None,
        None,
    )
    .unwrap();
    for topic in ["node/sensor/status/state", "node/sensor/seq/state"] {
        let r = esphome.decode(topic, b"1", Limits::default()).unwrap();
        if let Ok(r) = r {
            for (metric, _) in &r.values {
                assert!(usable_metric(metric), "{topic} gave the metric {metric:?}");
            }
        }
    }
}

//! The native payload decoder (`codec::decode`) against its contract, on the seed corpus,
//! mutations of it, arbitrary bytes and generated JSON.

use proptest::prelude::*;
use watchpost::codec::{self, Limits, Message};
use watchpost::replay;

use crate::check;
use crate::corpus::{cases, mutant, seeds};

/// Tokens of the payload language, and hostile ones.
pub const JSON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    "\"",
    ":",
    ",",
    "\\",
    "\\u",
    "\\ud800",
    "\\u0000",
    "\"v\":",
    "\"seq\":",
    "\"status\":",
    "\"\":",
    "1e999",
    "-",
    ".",
    "e",
    "0",
    "18446744073709551616",
    "-1",
    "null",
    "true",
    "NaN",
    "inf",
    " ",
    "\n",
    "/",
    "+",
    "#",
    "é",
    "\u{feff}",
    "\u{0}",
    "\u{ff}",
    "{\"a\":{\"b\":[",
    "]}}",
    "99999999999999999999999999999999",
    "1.5",
    "1E+2",
];

/// A JSON document written by hand, so that it can hold what `serde_json::Value` cannot:
/// duplicate keys, raw numbers out of range, escaped keys.
#[derive(Debug, Clone)]
pub enum Json {
    /// A literal (`null`, `true`) or a number, written as is.
    Raw(String),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<Json>),
    /// An object, in order, duplicates allowed; `true` writes the key with `\u` escapes.
    Obj(Vec<(String, bool, Json)>),
}

impl Json {
    /// The document as JSON text.
    pub fn text(&self) -> String {
        match self {
            Json::Raw(r) => r.clone(),
            Json::Str(s) => serde_json::to_string(s).unwrap(),
            Json::Arr(items) => {
                let items: Vec<_> = items.iter().map(Json::text).collect();
                format!("[{}]", items.join(","))
            }
            Json::Obj(fields) => {
                let fields: Vec<_> = fields
                    .iter()
                    .map(|(k, escaped, v)| {
                        let key = if *escaped {
                            let units: String =
                                k.encode_utf16().map(|u| format!("\\u{u:04x}")).collect();
                            format!("\"{units}\"")
                        } else {
                            serde_json::to_string(k).unwrap()
                        };
                        format!("{key}:{}", v.text())
                    })
                    .collect();
                format!("{{{}}}", fields.join(","))
            }
        }
    }
}

/// Numbers as a sensor (or an attacker) might write them.
pub fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(|f| format!("{f:?}")),
        (-1000.0f64..1000.0).prop_map(|f| format!("{f}")),
        (-1000.0f64..1000.0).prop_map(|f| format!("{f:e}")),
        prop::sample::select(vec![
            "0",
            "-0",
            "-0.0",
            "1e308",
            "1.7976931348623157e308",
            "1e309",
            "-1e400",
            "5e-324",
            "1e-400",
            "18446744073709551615",
            "18446744073709551616",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "1E2",
            "0.1e+1",
        ])
        .prop_map(str::to_owned),
    ]
}

/// Keys: the reserved ones, ordinary names, names a topic level cannot hold, and any text.
pub fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "v", "seq", "status", "", "temperature", "humidity", "a/b", "+", "#", "a.b", "tC",
            "AM2301", "Temperature", "battery", "percent", "ENERGY", "Power",
        ])
        .prop_map(str::to_owned),
        2 => "[a-zA-Z_][a-zA-Z0-9_]{0,10}",
        1 => "\\PC{0,6}",
    ]
}

/// JSON values of every kind, nested up to a few levels.
pub fn json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        4 => number().prop_map(Json::Raw),
        1 => prop::sample::select(vec!["null", "true", "false"]).prop_map(|s| Json::Raw(s.into())),
        1 => prop_oneof!["\\PC{0,8}".prop_map(String::from), number()].prop_map(Json::Str),
    ];
    leaf.prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            1 => prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Arr),
            3 => prop::collection::vec((key(), prop::bool::weighted(0.1), inner), 0..8)
                .prop_map(Json::Obj),
        ]
    })
}

/// A JSON object (what a payload should be), possibly padded with whitespace.
pub fn json_object() -> impl Strategy<Value = String> {
    (
        prop::collection::vec((key(), prop::bool::weighted(0.1), json()), 0..10),
        "[ \t\r\n]{0,2}",
    )
        .prop_map(|(fields, pad)| format!("{pad}{}{pad}", Json::Obj(fields).text()))
}

/// A topic level: ordinary, empty, reserved, wildcard or odd text.
pub fn level() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z][a-z0-9_-]{0,8}",
        2 => prop::sample::select(vec!["", "status", "seq", "+", "#", "sensors", "$SYS", "é", "a b", "temperature"])
            .prop_map(str::to_owned),
        1 => "\\PC{0,5}".prop_map(|s: String| s.replace('/', "")),
    ]
}

/// Topics under `sensors/` of every depth, and a few that are not.
pub fn topic() -> impl Strategy<Value = String> {
    (
        prop_oneof![9 => Just("sensors".to_owned()), 1 => level()],
        prop::collection::vec(level(), 0..4),
    )
        .prop_map(|(root, levels)| {
            std::iter::once(root)
                .chain(levels)
                .collect::<Vec<_>>()
                .join("/")
        })
}

#[test]
fn every_seed_is_a_message_that_keeps_the_contract() {
    for (name, data) in seeds("codec") {
        let (topic, payload) = check::split_message(&data)
            .unwrap_or_else(|| panic!("{name}: a seed is `topic\\npayload`"));
        check::codec(topic, payload);
    }
}

/// The value of a message that holds one reading.
fn single_value(m: Result<Message<'_>, codec::Rejected<'_>>) -> f64 {
    match m {
        Ok(Message::Readings(r)) if r.values.len() == 1 => {
            r.values[0].1.as_number().expect("a number")
        }
        other => panic!("expected one reading, got {other:?}"),
    }
}

/// Found by the readings round-trip property: without serde_json's `float_roundtrip` this
/// value came back 2 ulp off from `{"v":..}` and from a JSON-lines reading alike, while the
/// plain payload (Rust's parser) was exact.
#[test]
fn json_numbers_decode_to_the_value_written() {
    let written = "-1.0776287325534397e39";
    let exact: f64 = written.parse().unwrap();
    let plain = codec::decode("sensors/d/t", written.as_bytes(), Limits::default());
    assert_eq!(single_value(plain), exact);
    let v = format!(r#"{{"v":{written}}}"#);
    let object = codec::decode("sensors/d/t", v.as_bytes(), Limits::default());
    assert_eq!(single_value(object), exact, "{v}");
    let line = format!(r#"{{"time":0,"device":"d","metric":"t","value":{written}}}"#);
    assert_eq!(
        replay::parse_readings(&line).unwrap()[0].value,
        watchpost::value::Value::Number(exact),
        "{line}"
    );
}

/// `seq` is reserved (the codec's module doc), yet `sensors/{device}/seq` was read as a
/// reading named `seq`.
#[test]
fn native_seq_topic_is_not_a_reading() {
    for payload in ["1", r#"{"v":1}"#, r#"{"v":1,"seq":2}"#] {
        check::codec("sensors/d/seq", payload.as_bytes());
        let got = codec::decode("sensors/d/seq", payload.as_bytes(), Limits::default());
        assert!(
            !matches!(got, Ok(Message::Readings(_))),
            "sensors/d/seq decoded as {got:?}"
        );
    }
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn json_and_plain_numbers_decode_alike(n in number()) {
        // Rust's parser is exact; a JSON number must come out as the same f64 (JSON refuses
        // what overflows, where Rust's parser gives infinity and the codec NotFinite).
        let plain = codec::decode("sensors/d/t", n.as_bytes(), Limits::default());
        let v = format!(r#"{{"v":{n}}}"#);
        let object = codec::decode("sensors/d/t", v.as_bytes(), Limits::default());
        if let Some(exact) = n.parse::<f64>().ok().filter(|f| f.is_finite()) {
            prop_assert_eq!(single_value(plain), exact, "{}", n);
            prop_assert_eq!(single_value(object), exact, "{}", v);
        }
    }

    #[test]
    fn mutated_seeds_keep_the_contract(data in mutant("codec", JSON_TOKENS)) {
        if let Some((topic, payload)) = check::split_message(&data) {
            check::codec(topic, payload);
        }
    }

    #[test]
    fn arbitrary_bytes_keep_the_contract(topic in topic(), payload in prop::collection::vec(any::<u8>(), 0..64)) {
        check::codec(&topic, &payload);
    }

    #[test]
    fn generated_objects_are_accounted_field_by_field(payload in json_object(), device in "[a-z0-9-]{1,8}") {
        check::codec(&format!("sensors/{device}"), payload.as_bytes());
        check::codec(&format!("sensors/{device}/temperature"), payload.as_bytes());
    }

    #[test]
    fn any_json_value_on_any_topic_keeps_the_contract(value in json(), topic in topic()) {
        check::codec(&topic, value.text().as_bytes());
    }

    #[test]
    fn plain_numbers_decode_to_their_value(n in number(), pad in "[ \t\r\n]{0,3}") {
        let payload = format!("{pad}{n}{pad}");
        check::codec("sensors/d/t", payload.as_bytes());
    }

    #[test]
    fn payloads_around_the_limit_keep_the_contract(len in 4090usize..4100, fill in prop::sample::select(vec![b' ', b'1', b'{'])) {
        let mut payload = vec![fill; len];
        payload[0] = b'1';
        check::codec("sensors/d/t", &payload);
    }
}

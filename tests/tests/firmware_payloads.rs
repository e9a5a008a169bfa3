//! The firmware and the gateway share one payload contract: everything the firmware encodes,
//! the gateway's decoder reads back exactly, in every form the firmware produces. For states
//! also the converse: a word the firmware refuses is one the gateway would not read back as
//! written.

use std::borrow::Cow;

use watchpost::codec::{self, Limits, Message, Readings};
use watchpost::value::Value;
use watchpost_firmware::mqtt::{PAYLOAD_MAX, TOPIC_MAX};
use watchpost_firmware::node::{Sample, encode, encode_state};
use watchpost_firmware::payload::{self, MAX_STATE_LEN, State, Writer};

/// Encodes `sample` as the firmware does and decodes it as the gateway does.
fn round_trip<const M: usize>(
    device: &str,
    metrics: &[&str; M],
    sample: &Sample<M>,
) -> (String, Vec<(String, f64)>, Option<u64>) {
    let (mut topic, mut body) = ([0u8; TOPIC_MAX], [0u8; PAYLOAD_MAX]);
    let (mut tw, mut bw) = (Writer::new(&mut topic), Writer::new(&mut body));
    encode(device, metrics, sample, &mut tw, &mut bw).unwrap();
    let (tn, bn) = (tw.len(), bw.len());
    let topic = std::str::from_utf8(&topic[..tn]).unwrap().to_owned();
    let decoded = codec::decode(&topic, &body[..bn], Limits::default())
        .unwrap_or_else(|e| panic!("{topic} {:?}: {e:?}", String::from_utf8_lossy(&body[..bn])));
    let Message::Readings(Readings {
        device: got_device,
        seq,
        values,
        rejected,
        unmapped,
    }) = decoded
    else {
        panic!("a reading decoded as presence");
    };
    assert_eq!(got_device, device);
    assert!(rejected.is_empty() && unmapped == 0, "{rejected:?}");
    let values = values
        .into_iter()
        .map(|(k, v): (Cow<'_, str>, Value)| (k.into_owned(), v.as_number().expect("a number")))
        .collect();
    (topic, values, seq)
}

fn exact(milli: i32) -> f64 {
    f64::from(milli) / 1000.0
}

/// Values at the edges of the fixed-point range and of the formatting rules.
const EDGES: [i32; 14] = [
    0,
    1,
    -1,
    999,
    -999,
    1000,
    21_500,
    21_535,
    -40_125,
    95_200,
    100_000,
    i32::MAX,
    i32::MIN,
    i32::MIN + 1,
];

#[test]
fn a_single_metric_message_decodes_to_its_value_and_seq() {
    let metrics = ["temperature", "humidity"];
    let mut rng = fastrand::Rng::with_seed(5);
    let values: Vec<i32> = EDGES
        .into_iter()
        .chain((0..2000).map(|_| rng.i32(..)))
        .collect();
    for (i, milli) in values.into_iter().enumerate() {
        let seq = [0, 1, u32::MAX, rng.u32(..)][i % 4];
        let sample = Sample {
            seq,
            values: [Some(milli), None],
        };
        let (topic, values, got_seq) = round_trip("boiler-1", &metrics, &sample);
        assert_eq!(topic, "sensors/boiler-1/temperature");
        assert_eq!(
            values,
            [("temperature".to_owned(), exact(milli))],
            "{milli}"
        );
        assert_eq!(got_seq, Some(u64::from(seq)));
    }
}

#[test]
fn a_multi_metric_message_decodes_to_every_value_and_seq() {
    let metrics = ["temperature", "humidity", "pressure.hpa"];
    let mut rng = fastrand::Rng::with_seed(7);
    for i in 0..2000u32 {
        let v = [
            rng.i32(..),
            rng.i32(-50_000..150_000),
            EDGES[i as usize % EDGES.len()],
        ];
        let sample = Sample {
            seq: i,
            values: v.map(Some),
        };
        let (topic, values, seq) = round_trip("dev_7.b", &metrics, &sample);
        assert_eq!(topic, "sensors/dev_7.b");
        let want: Vec<_> = metrics
            .iter()
            .zip(v)
            .map(|(m, v)| ((*m).to_owned(), exact(v)))
            .collect();
        assert_eq!(values, want);
        assert_eq!(seq, Some(u64::from(i)));
    }
    // Two of three due is still the object form, with only those two.
    let sample = Sample {
        seq: 9,
        values: [Some(1), None, Some(-2)],
    };
    let (_, values, _) = round_trip("d", &metrics, &sample);
    assert_eq!(
        values,
        [
            ("temperature".to_owned(), 0.001),
            ("pressure.hpa".to_owned(), -0.002)
        ]
    );
}

#[test]
fn presence_and_the_last_will_decode_as_status() {
    for (body, online) in [(payload::ONLINE, true), (payload::OFFLINE, false)] {
        let mut topic = [0u8; TOPIC_MAX];
        let mut w = Writer::new(&mut topic);
        payload::status_topic(&mut w, "boiler-1").unwrap();
        let n = w.len();
        let topic = std::str::from_utf8(&topic[..n]).unwrap();
        assert_eq!(
            codec::decode(topic, body, Limits::default()),
            Ok(Message::Status {
                device: "boiler-1".into(),
                online
            })
        );
    }
}

#[test]
fn the_largest_message_a_node_accepts_fits_its_buffers_and_decodes() {
    // Three metrics with 32-byte names and the longest values and seq.
    let names = [
        "a234567890123456789012345678901b",
        "c234567890123456789012345678901d",
        "e234567890123456789012345678901f",
    ];
    let band = watchpost_firmware::report::Deadband {
        delta: 1,
        min_interval_ms: 0,
        heartbeat_ms: 1,
    };
    let config = watchpost_firmware::node::Config {
        device: "x2345678901234567890123456789012",
        metrics: names,
        deadband: [band; 3],
        credentials: None,
        keep_alive_ms: 1_000,
        ack_timeout_ms: 1_000,
        backoff_ms: (1, 1),
    };
    assert!(watchpost_firmware::node::Node::<3, 2>::new(config).is_ok());
    let sample = Sample {
        seq: u32::MAX,
        values: [Some(i32::MIN); 3],
    };
    let (topic, values, seq) = round_trip(config.device, &names, &sample);
    assert_eq!(topic, format!("sensors/{}", config.device));
    assert_eq!(values.len(), 3);
    assert_eq!(seq, Some(u64::from(u32::MAX)));
}

/// Encodes one state reading as the firmware does and decodes it as the gateway does: the
/// topic, the one value and `seq`.
fn state_round_trip(
    device: &str,
    metric: &str,
    state: State<'_>,
    seq: u32,
) -> Result<(String, Value, Option<u64>), payload::Error> {
    let (mut topic, mut body) = ([0u8; TOPIC_MAX], [0u8; PAYLOAD_MAX]);
    let (mut tw, mut bw) = (Writer::new(&mut topic), Writer::new(&mut body));
    encode_state(device, metric, state, seq, &mut tw, &mut bw)?;
    let (tn, bn) = (tw.len(), bw.len());
    let topic = std::str::from_utf8(&topic[..tn]).unwrap().to_owned();
    let decoded = codec::decode(&topic, &body[..bn], Limits::default())
        .unwrap_or_else(|e| panic!("{topic} {:?}: {e:?}", String::from_utf8_lossy(&body[..bn])));
    let Message::Readings(Readings {
        device: got_device,
        seq,
        mut values,
        rejected,
        unmapped,
    }) = decoded
    else {
        panic!("a reading decoded as presence");
    };
    assert_eq!(got_device, device);
    assert!(rejected.is_empty() && unmapped == 0, "{rejected:?}");
    assert_eq!(values.len(), 1);
    let (name, value) = values.remove(0);
    assert_eq!(name, metric);
    Ok((topic, value, seq))
}

/// What the gateway makes of `word` in the JSON state form, written with every escape JSON
/// needs (which the firmware does not write): the value, or `None` when it refuses it.
fn gateway_reads(word: &str) -> Option<Value> {
    let body = serde_json::json!({ "v": word, "seq": 1 }).to_string();
    match codec::decode("sensors/d/m", body.as_bytes(), Limits::default()) {
        Ok(Message::Readings(mut r)) if r.values.len() == 1 => Some(r.values.remove(0).1),
        Ok(other) => panic!("{word:?} decoded as {other:?}"),
        Err(_) => None,
    }
}

fn text(word: &str) -> Value {
    Value::Text(word.into())
}

#[test]
fn a_boolean_state_decodes_to_the_same_boolean_and_seq() {
    for (i, b) in [true, false, true, false].into_iter().enumerate() {
        let seq = [0, 1, 7, u32::MAX][i];
        let (topic, value, got_seq) =
            state_round_trip("basement", "water_leak", State::Bool(b), seq).unwrap();
        assert_eq!(topic, "sensors/basement/water_leak");
        assert_eq!(value, Value::Bool(b));
        assert_eq!(got_seq, Some(u64::from(seq)));
    }
}

#[test]
fn a_word_state_decodes_to_exactly_the_word_written() {
    let ascii_64 = "x".repeat(MAX_STATE_LEN);
    let two_byte_64 = "é".repeat(MAX_STATE_LEN / 2);
    let words: Vec<&str> = payload::GATEWAY_WORDS
        .into_iter()
        .chain([
            "heat",
            "Single Click",
            "x",
            "Über-heiß",
            "低",
            "don't",
            "a{b}[c]",
            // Shaped like numbers or booleans, but not by the gateway's rule.
            "1st",
            "-x",
            "e5",
            "1e",
            "1.2.3",
            "0x10",
            "nano",
            "inf1",
            "truee",
            "no",
            "ON-ish",
            &ascii_64,
            &two_byte_64,
        ])
        .collect();
    for (i, word) in words.into_iter().enumerate() {
        let seq = [0, 1043, u32::MAX][i % 3];
        let (topic, value, got_seq) = state_round_trip("front", "door", State::Word(word), seq)
            .unwrap_or_else(|e| panic!("{word:?}: {e}"));
        assert_eq!(topic, "sensors/front/door");
        assert_eq!(value, text(word), "{word:?}");
        assert_eq!(got_seq, Some(u64::from(seq)));
    }
}

#[test]
fn a_word_the_firmware_refuses_is_one_the_gateway_would_not_read_back() {
    use payload::Error as E;
    let ascii_65 = "x".repeat(MAX_STATE_LEN + 1);
    let two_byte_66 = "é".repeat(MAX_STATE_LEN / 2 + 1);
    let cases: &[(&str, E)] = &[
        ("", E::StateEmpty),
        (&ascii_65, E::StateTooLong),
        (&two_byte_66, E::StateTooLong),
        ("line\nbreak", E::StateNeedsEscaping),
        ("nul\0", E::StateNeedsEscaping),
        ("del\u{7f}", E::StateNeedsEscaping),
        ("c1\u{85}", E::StateNeedsEscaping),
        ("0", E::StateReadsAsValue),
        ("21.5", E::StateReadsAsValue),
        ("-3", E::StateReadsAsValue),
        ("+.5", E::StateReadsAsValue),
        ("1.", E::StateReadsAsValue),
        ("1e3", E::StateReadsAsValue),
        ("1E-3", E::StateReadsAsValue),
        ("1e999", E::StateReadsAsValue),
        ("nan", E::StateReadsAsValue),
        ("-NaN", E::StateReadsAsValue),
        ("+inf", E::StateReadsAsValue),
        ("Infinity", E::StateReadsAsValue),
        ("true", E::StateReadsAsValue),
        ("False", E::StateReadsAsValue),
        (" open", E::StateNotAsWritten),
        ("heat\t", E::StateNeedsEscaping),
        ("heat\u{a0}", E::StateNotAsWritten),
        ("{\"v\":1}", E::StateNeedsEscaping),
        ("{x", E::StateNotAsWritten),
        ("[1,2]", E::StateNotAsWritten),
        ("OPEN", E::StateNotAsWritten),
        ("Closed", E::StateNotAsWritten),
        ("oFF", E::StateNotAsWritten),
    ];
    for (word, error) in cases {
        assert_eq!(
            state_round_trip("d", "m", State::Word(word), 1),
            Err(*error),
            "{word:?}"
        );
        assert_ne!(gateway_reads(word), Some(text(word)), "{word:?}");
    }
    // `"` and `\` are the only refusals the gateway would not need: it reads them escaped,
    // and the firmware writes no escapes.
    for word in ["say \"hi\"", "a\\b"] {
        assert_eq!(
            state_round_trip("d", "m", State::Word(word), 1),
            Err(E::StateNeedsEscaping),
            "{word:?}"
        );
        assert_eq!(gateway_reads(word), Some(text(word)), "{word:?}");
    }
}

/// A word near the rules' edges: a sign, a number, a boolean or one of the gateway's words,
/// with its case changed, padded, or with a character of interest added; or a few such
/// characters at random.
fn tricky_word(rng: &mut fastrand::Rng) -> String {
    const BASES: &[&str] = &[
        "true", "false", "on", "off", "open", "closed", "online", "offline", "inf", "infinity",
        "nan", "0", "1.5", ".5", "1.", "1e3", "2E-7", "heat", "",
    ];
    const CHARS: &[char] = &[
        '0', '7', '.', '+', '-', 'e', 'E', 'i', 'n', 'f', 'a', 'x', ' ', '\u{a0}', '{', '[', '"',
        '\\', '\n', '\u{7f}', 'é',
    ];
    let mut word = String::new();
    if rng.bool() {
        if rng.u8(..4) == 0 {
            word.push(if rng.bool() { '+' } else { '-' });
        }
        for c in rng.choice(BASES).unwrap().chars() {
            word.push(if rng.u8(..3) == 0 {
                c.to_ascii_uppercase()
            } else {
                c
            });
        }
        if rng.u8(..4) == 0 {
            word.push(*rng.choice(CHARS).unwrap());
        }
        if rng.u8(..8) == 0 {
            word.insert(0, *rng.choice(CHARS).unwrap());
        }
    } else {
        for _ in 0..rng.usize(0..6) {
            word.push(*rng.choice(CHARS).unwrap());
        }
    }
    word
}

#[test]
fn the_firmware_accepts_exactly_the_words_the_gateway_reads_back_as_written() {
    let mut rng = fastrand::Rng::with_seed(11);
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..20_000 {
        let word = tricky_word(&mut rng);
        let escapes = word.contains(['"', '\\']);
        match state_round_trip("d", "m", State::Word(&word), 1) {
            Ok((_, value, _)) => {
                accepted += 1;
                assert_eq!(value, text(&word), "{word:?}");
            }
            Err(payload::Error::StateNeedsEscaping) if escapes => refused += 1,
            Err(e) => {
                refused += 1;
                assert_ne!(gateway_reads(&word), Some(text(&word)), "{word:?}: {e}");
            }
        }
        // The converse: what the gateway reads back as written, the firmware writes (or it
        // needs an escape).
        if gateway_reads(&word) == Some(text(&word)) && !escapes {
            assert_eq!(State::Word(&word).check(), Ok(()), "{word:?}");
        }
    }
    assert!(accepted > 1_000 && refused > 1_000, "{accepted} {refused}");
}

#[test]
fn the_largest_state_message_fits_the_buffers_and_decodes() {
    let word = "w".repeat(MAX_STATE_LEN);
    let (topic, value, seq) = state_round_trip(
        "x2345678901234567890123456789012",
        "a234567890123456789012345678901b",
        State::Word(&word),
        u32::MAX,
    )
    .unwrap();
    assert_eq!(
        topic,
        "sensors/x2345678901234567890123456789012/a234567890123456789012345678901b"
    );
    assert_eq!(value, text(&word));
    assert_eq!(seq, Some(u64::from(u32::MAX)));
}

#[test]
fn the_firmware_knows_the_gateways_state_length_and_words() {
    assert_eq!(MAX_STATE_LEN, watchpost::value::MAX_STATE_LEN);
    assert_eq!(
        payload::GATEWAY_WORDS.as_slice(),
        watchpost::value::DEFAULT_WORDS
    );
}

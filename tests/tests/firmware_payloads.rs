//! The firmware and the gateway share one payload contract: everything the firmware encodes,
//! the gateway's decoder reads back exactly, in every form the firmware produces.

use std::borrow::Cow;

use watchpost::codec::{self, Limits, Message, Readings};
use watchpost::value::Value;
use watchpost_firmware::mqtt::{PAYLOAD_MAX, TOPIC_MAX};
use watchpost_firmware::node::{Sample, encode};
use watchpost_firmware::payload::{self, Writer};

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
    assert!(watchpost_firmware::node::Node::<3, 1>::new(config).is_ok());
    let sample = Sample {
        seq: u32::MAX,
        values: [Some(i32::MIN); 3],
    };
    let (topic, values, seq) = round_trip(config.device, &names, &sample);
    assert_eq!(topic, format!("sensors/{}", config.device));
    assert_eq!(values.len(), 3);
    assert_eq!(seq, Some(u64::from(u32::MAX)));
}

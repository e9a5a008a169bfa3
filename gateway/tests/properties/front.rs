//! The broker's packet front: the codec and one client's session, fed the seed corpora
//! (`tests/corpus/packet/`, `tests/corpus/session/`), mutations of them and generated packet
//! sequences. The properties are in `watchpost::broker::front_check`, which the fuzz targets
//! `packet` and `session` run too; its docs say what an input is and what is checked.
//!
//! The seeds are written by [`seeds`] from packets, so that each reads as what it is; the
//! committed files must be what it writes (`WATCHPOST_WRITE_SEEDS=1` writes them). Inputs a
//! fuzzer found go in the same folders, under names of their own.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use watchpost::broker::front_check;
use watchpost::broker::packet::{
    Ack, Auth, ConnAck, Connect, Disconnect, MessageProperties, Packet, Publish, QoS, SubAck,
    Subscribe, SubscriptionOptions, UnsubAck, Unsubscribe, Version, Will, encode, reason,
};

use crate::corpus::{cases, manifest_dir, mutant, seeds};

const V311: Version = Version::V311;
const V5: Version = Version::V5;

/// Bytes of the packet language a mutation may insert (ASCII only: the mutations take text).
const MQTT_TOKENS: &[&str] = &[
    "\u{0}",
    "\u{1}",
    "\u{2}",
    "\u{7f}",
    "\u{10}",
    "\u{20}",
    "\u{30}",
    "\u{32}",
    "\u{34}",
    "\u{3b}",
    "\u{40}\u{2}\u{0}\u{1}",
    "\u{50}\u{2}\u{0}\u{1}",
    "\u{62}\u{2}\u{0}\u{1}",
    "\u{70}\u{2}\u{0}\u{1}",
    "\u{c0}\u{0}",
    "\u{e0}\u{0}",
    "\u{0}\u{4}MQTT\u{4}",
    "\u{0}\u{4}MQTT\u{5}",
    "\u{0}\u{6}MQIsdp\u{3}",
    "\u{26}\u{0}\u{1}k\u{0}\u{1}v",
    "\u{23}\u{0}\u{1}",
    "\u{b}\u{1}",
    "\u{2}\u{0}\u{0}\u{0}\u{1}",
    "sensors/",
    "boiler-1",
    "/",
    "+",
    "#",
    "$share/g/",
    "alerts/",
    "tele/boiler-1/SENSOR",
];

// ---------------------------------------------------------------------------------------------
// The seeds.

fn text(s: &str) -> Bytes {
    Bytes::from(s.to_owned())
}

fn bytes_of(v: Version, packets: &[Packet]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for p in packets {
        encode(p, v, &mut buf);
    }
    buf.to_vec()
}

fn publish(topic: &str, qos: QoS, pkid: u16, payload: &str) -> Packet {
    Packet::Publish(Publish {
        qos,
        topic: text(topic),
        pkid,
        payload: text(payload),
        ..Publish::default()
    })
}

fn retained(topic: &str, qos: QoS, pkid: u16, payload: &str) -> Packet {
    match publish(topic, qos, pkid, payload) {
        Packet::Publish(p) => Packet::Publish(Publish { retain: true, ..p }),
        _ => unreachable!(),
    }
}

/// An MQTT 5 publish with every message property, a topic alias and a payload that says it is
/// UTF-8.
fn publish_v5(topic: &str, alias: Option<u16>, qos: QoS, pkid: u16) -> Packet {
    Packet::Publish(Publish {
        qos,
        topic: text(topic),
        pkid,
        payload: text("21.5"),
        topic_alias: alias,
        properties: Some(Box::new(MessageProperties {
            payload_is_utf8: Some(true),
            message_expiry: Some(30),
            content_type: Some("text/plain".into()),
            response_topic: Some("replies/r".into()),
            correlation_data: Some(text("c1")),
            user_properties: vec![("k".into(), "v".into())],
        })),
        ..Publish::default()
    })
}

fn subscribe(pkid: u16, filters: &[(&str, QoS)]) -> Packet {
    Packet::Subscribe(Subscribe {
        pkid,
        filters: filters
            .iter()
            .map(|(f, qos)| {
                let o = SubscriptionOptions {
                    qos: *qos,
                    ..SubscriptionOptions::default()
                };
                ((*f).to_owned(), o)
            })
            .collect(),
        ..Subscribe::default()
    })
}

/// An MQTT 5 SUBSCRIBE of one filter with options and a subscription identifier.
fn subscribe_v5(pkid: u16, filter: &str, options: SubscriptionOptions, id: Option<u32>) -> Packet {
    Packet::Subscribe(Subscribe {
        pkid,
        filters: vec![(filter.to_owned(), options)],
        id,
        user_properties: vec![("k".into(), "v".into())],
    })
}

fn unsubscribe(pkid: u16, filters: &[&str]) -> Packet {
    Packet::Unsubscribe(Unsubscribe {
        pkid,
        filters: filters.iter().map(|f| (*f).to_owned()).collect(),
        ..Unsubscribe::default()
    })
}

fn pubrel(pkid: u16) -> Packet {
    Packet::PubRel(Ack::new(pkid))
}

fn disconnect() -> Packet {
    Packet::Disconnect(Disconnect::default())
}

fn connect(id: &str) -> Connect {
    Connect {
        clean_start: true,
        keep_alive: 60,
        client_id: id.to_owned(),
        receive_maximum: u16::MAX,
        request_problem_information: true,
        ..Connect::default()
    }
}

/// A CONNECT with a will, a user name and a password, and in MQTT 5 properties of each kind.
fn full_connect(v: Version) -> Packet {
    let will = Will {
        topic: text("sensors/c-1/status"),
        payload: text("offline"),
        qos: QoS::AtLeastOnce,
        retain: true,
        delay: if v.is_v5() { 5 } else { 0 },
        properties: v.is_v5().then(|| {
            Box::new(MessageProperties {
                message_expiry: Some(60),
                ..MessageProperties::default()
            })
        }),
    };
    let mut c = Connect {
        will: Some(will),
        username: Some("c-1".into()),
        password: Some(text("secret")),
        ..connect("c-1")
    };
    if v.is_v5() {
        c.session_expiry = 3600;
        c.receive_maximum = 2;
        c.maximum_packet_size = Some(512);
        c.topic_alias_maximum = 4;
        c.request_response_information = true;
        c.user_properties = vec![("site".into(), "north".into())];
    }
    Packet::Connect(Box::new(c))
}

/// What a client sends in a typical life: CONNECT, SUBSCRIBE, publishes of each QoS, the
/// acknowledgements of each step, a ping, UNSUBSCRIBE, DISCONNECT.
fn client_life(v: Version) -> Vec<Packet> {
    let mut packets = vec![
        full_connect(v),
        subscribe(
            1,
            &[
                ("sensors/#", QoS::ExactlyOnce),
                ("alerts/+", QoS::AtMostOnce),
            ],
        ),
        publish("sensors/c-1/temp", QoS::AtMostOnce, 0, "21.5"),
        publish("sensors/c-1/temp", QoS::AtLeastOnce, 2, "21.6"),
        retained("sensors/c-1/temp", QoS::ExactlyOnce, 3, "21.7"),
        pubrel(3),
        Packet::PubAck(Ack::new(1)),
        Packet::PubRec(Ack::new(2)),
        Packet::PubComp(Ack::new(2)),
        Packet::PingReq,
    ];
    if v.is_v5() {
        packets.push(publish_v5("sensors/c-1/hum", Some(1), QoS::AtLeastOnce, 4));
        packets.push(publish_v5("", Some(1), QoS::AtMostOnce, 0));
        packets.push(subscribe_v5(
            5,
            "$share/g/sensors/+/temp",
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                retain_handling: 2,
                ..SubscriptionOptions::default()
            },
            Some(7),
        ));
    }
    packets.push(unsubscribe(6, &["sensors/#", "never/subscribed"]));
    packets.push(Packet::Disconnect(Disconnect {
        session_expiry: v.is_v5().then_some(0),
        reason_string: v.is_v5().then(|| "bye".into()),
        ..Disconnect::default()
    }));
    packets
}

/// What a server sends: CONNACK (with its properties in MQTT 5), acks with and without
/// reason codes, SUBACK, UNSUBACK, PINGRESP, a publish with subscription identifiers, AUTH and
/// DISCONNECT.
fn server_life(v: Version) -> Vec<Packet> {
    let v5 = v.is_v5();
    let mut packets = vec![
        Packet::ConnAck(Box::new(ConnAck {
            session_present: true,
            receive_maximum: v5.then_some(64),
            maximum_qos: v5.then_some(QoS::AtLeastOnce),
            retain_available: v5.then_some(true),
            maximum_packet_size: v5.then_some(65_536),
            assigned_client_id: v5.then(|| "watchpost-auto-1".into()),
            topic_alias_maximum: v5.then_some(16),
            server_keep_alive: v5.then_some(60),
            ..ConnAck::default()
        })),
        Packet::PubAck(Ack::new(1)),
        Packet::PubRec(Ack::with_code(2, reason::NOT_AUTHORIZED)),
        Packet::PubRel(Ack::new(2)),
        Packet::PubComp(Ack::with_code(3, reason::PACKET_ID_NOT_FOUND)),
        Packet::SubAck(SubAck {
            pkid: 4,
            codes: vec![0, 1, 2, reason::UNSPECIFIED],
            ..SubAck::default()
        }),
        Packet::UnsubAck(UnsubAck {
            pkid: 5,
            codes: if v5 {
                vec![reason::SUCCESS, reason::NO_SUBSCRIPTION_EXISTED]
            } else {
                Vec::new()
            },
            ..UnsubAck::default()
        }),
        Packet::PingResp,
    ];
    if v5 {
        packets.push(Packet::Publish(Publish {
            subscription_ids: vec![1, 268_435_455],
            ..match publish_v5("sensors/c-1/temp", Some(3), QoS::AtLeastOnce, 9) {
                Packet::Publish(p) => p,
                _ => unreachable!(),
            }
        }));
        packets.push(Packet::Auth(Auth {
            code: 0x18,
            method: Some("SCRAM".into()),
            data: Some(text("x")),
            ..Auth::default()
        }));
        packets.push(Packet::Disconnect(Disconnect {
            code: reason::SERVER_SHUTTING_DOWN,
            server_reference: Some("other:1883".into()),
            ..Disconnect::new(reason::SERVER_SHUTTING_DOWN, "shutting down")
        }));
    }
    packets
}

/// The `packet` target's mode byte: version, largest packet ([0] 64 KiB, [1] 16 B, [2] 300 B,
/// [3] MQTT's most), bytes at a time in the second reading ([0] 1 ... [7] all).
fn packet_mode(v: Version, limit: u8, chunk: u8) -> u8 {
    u8::from(v.is_v5()) | limit << 1 | chunk << 3
}

/// A packet seed: its mode, then the stream.
fn packet_seed(mode: u8, stream: &[u8]) -> Vec<u8> {
    [&[mode][..], stream].concat()
}

/// The `session` target's mode byte (`front_check::session`).
#[derive(Clone, Copy, Default)]
struct Mode {
    v5: bool,
    spelled_out: bool,
    /// 0 anonymous, 2 the device `boiler-1`, 3 the operator `panel`.
    who: u8,
    rated: bool,
    /// [0] 1, [1] 2, [2] 4, [3] 256 packets a round.
    per_round: u8,
    reconnect: bool,
}

impl Mode {
    fn byte(self) -> u8 {
        u8::from(self.v5)
            | u8::from(self.spelled_out) << 1
            | self.who << 2
            | u8::from(self.rated) << 4
            | self.per_round << 5
            | u8::from(self.reconnect) << 7
    }

    fn version(self) -> Version {
        if self.v5 { V5 } else { V311 }
    }
}

/// The two bytes of a synthetic CONNECT (`front_check::synthetic_connect`).
#[derive(Clone, Copy, Default)]
struct Synthetic {
    persistent: bool,
    /// 0 no will, else the will's QoS + 1.
    will: u8,
    will_retain: bool,
    will_delay: bool,
    /// [0] 0, [1] 10 s, [2] 3600 s, [3] u32::MAX.
    expiry: u8,
    no_problem_info: bool,
    /// [0] 65,535, [1] 1, [2] 2, [3] 3.
    receive_maximum: u8,
    /// [0] none, [1] 24, [2] 64, [3] 300 bytes.
    max_packet: u8,
    /// [0] 0, [1] 1, [2] 2, [3] 64.
    aliases: u8,
    /// [0] "" [1] "c-7" [2] "boiler-1" [3] "panel@2".
    id: u8,
}

impl Synthetic {
    fn bytes(self) -> [u8; 2] {
        let a = u8::from(self.persistent)
            | self.will << 1
            | u8::from(self.will_retain) << 3
            | u8::from(self.will_delay) << 4
            | self.expiry << 5
            | u8::from(self.no_problem_info) << 7;
        let b = self.receive_maximum | self.max_packet << 2 | self.aliases << 4 | self.id << 6;
        [a, b]
    }
}

/// A session seed with a synthetic CONNECT.
fn session_seed(mode: Mode, connect: Synthetic, packets: &[Packet]) -> Vec<u8> {
    let mut out = vec![mode.byte()];
    out.extend(connect.bytes());
    out.extend(bytes_of(mode.version(), packets));
    out
}

/// A session seed that spells its CONNECT out.
fn session_seed_spelled(mode: Mode, packets: &[Packet]) -> Vec<u8> {
    let mode = Mode {
        spelled_out: true,
        ..mode
    };
    [vec![mode.byte()], bytes_of(mode.version(), packets)].concat()
}

/// Every seed: (target, file name, bytes).
fn seeds_written() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    let mut packet = |name, bytes| out.push(("packet", name, bytes));
    for (v, name) in [(V311, "v311"), (V5, "v5")] {
        let client = bytes_of(v, &client_life(v));
        let server = bytes_of(v, &server_life(v));
        let at_once = packet_mode(v, 0, 7);
        let by_byte = packet_mode(v, 0, 0);
        match name {
            "v311" => {
                packet("v311-client-life.bin", packet_seed(at_once, &client));
                packet(
                    "v311-client-life-byte-by-byte.bin",
                    packet_seed(by_byte, &client),
                );
                packet("v311-server-life.bin", packet_seed(at_once, &server));
            }
            _ => {
                packet("v5-client-life.bin", packet_seed(at_once, &client));
                packet(
                    "v5-client-life-byte-by-byte.bin",
                    packet_seed(by_byte, &client),
                );
                packet(
                    "v5-server-life.bin",
                    packet_seed(packet_mode(v, 3, 4), &server),
                );
            }
        }
    }
    let big = bytes_of(
        V5,
        &[publish("sensors/c-1/temp", QoS::AtMostOnce, 0, "21.5")],
    );
    packet(
        "too-large-for-16-bytes.bin",
        packet_seed(packet_mode(V5, 1, 7), &big),
    );
    let raw = |v: Version, bytes: &[u8]| packet_seed(packet_mode(v, 0, 7), bytes);
    packet(
        "remaining-length-of-5-bytes.bin",
        raw(V311, &[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]),
    );
    packet(
        "publish-qos-3.bin",
        raw(V311, &[0x36, 0x05, 0x00, 0x01, b'a', 0x00, 0x01]),
    );
    packet(
        "mqtt-3.1-connect.bin",
        raw(V311, b"\x10\x0c\x00\x06MQIsdp\x03\x02\x00\x3c"),
    );
    packet("auth-in-3.1.1.bin", raw(V311, &[0xf0, 0x00]));
    packet(
        "duplicate-property.bin",
        raw(
            V5,
            &[
                0x40, 0x0a, 0x00, 0x01, 0x10, 0x06, 0x1f, 0x00, 0x00, 0x1f, 0x00, 0x00,
            ],
        ),
    );
    packet(
        "property-length-past-the-end.bin",
        raw(V5, &[0x40, 0x04, 0x00, 0x01, 0x00, 0x09]),
    );
    packet(
        "connect-shorter-than-its-protocol-name.bin",
        raw(V311, &[0x10, 0x01, 0x00, 0x00, 0x00]),
    );
    packet(
        "incomplete-publish.bin",
        raw(V311, &[0x32, 0x20, 0x00, 0x03, b'a', b'/', b'b']),
    );

    let mut session = |name, bytes| out.push(("session", name, bytes));
    let v311 = Mode::default();
    let v5 = Mode {
        v5: true,
        ..Mode::default()
    };
    let plain = Synthetic::default();
    for (mode, name) in [(v311, "v311-client-life.bin"), (v5, "v5-client-life.bin")] {
        let life = client_life(mode.version());
        session(name, session_seed_spelled(mode, &life));
    }
    let round_trip = [
        subscribe(1, &[("sensors/#", QoS::ExactlyOnce)]),
        publish("sensors/c-7/temp", QoS::AtMostOnce, 0, "1"),
        publish("sensors/c-7/temp", QoS::AtLeastOnce, 1, "2"),
        publish("sensors/c-7/temp", QoS::ExactlyOnce, 2, "3"),
        pubrel(2),
        Packet::PingReq,
        Packet::PubAck(Ack::new(1)),
        Packet::PubRec(Ack::new(2)),
        Packet::PubComp(Ack::new(2)),
        unsubscribe(3, &["sensors/#"]),
        disconnect(),
    ];
    let c7 = Synthetic { id: 1, ..plain };
    session(
        "v311-subscribe-to-own-publishes.bin",
        session_seed(v311, c7, &round_trip),
    );
    session(
        "v5-subscribe-to-own-publishes.bin",
        session_seed(v5, c7, &round_trip),
    );
    session(
        "v5-topic-aliases-both-ways.bin",
        session_seed(
            Mode { per_round: 3, ..v5 },
            Synthetic { aliases: 1, ..c7 },
            &[
                subscribe(1, &[("sensors/+/temp", QoS::AtMostOnce)]),
                publish_v5("sensors/c-7/temp", Some(1), QoS::AtMostOnce, 0),
                publish_v5("", Some(1), QoS::AtMostOnce, 0),
                publish_v5("sensors/c-8/temp", Some(2), QoS::AtMostOnce, 0),
                publish_v5("", Some(2), QoS::AtMostOnce, 0),
            ],
        ),
    );
    session(
        "v5-retained-and-retain-handling.bin",
        session_seed(
            v5,
            c7,
            &[
                retained("sensors/c-7/a", QoS::AtLeastOnce, 1, "1"),
                retained("sensors/c-7/b", QoS::AtMostOnce, 0, "2"),
                subscribe_v5(2, "sensors/#", SubscriptionOptions::default(), Some(1)),
                subscribe_v5(
                    3,
                    "sensors/#",
                    SubscriptionOptions {
                        retain_handling: 1,
                        retain_as_published: true,
                        ..SubscriptionOptions::default()
                    },
                    None,
                ),
                retained("sensors/c-7/a", QoS::AtMostOnce, 0, ""),
                subscribe_v5(
                    4,
                    "sensors/c-7/+",
                    SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        no_local: true,
                        ..SubscriptionOptions::default()
                    },
                    Some(2),
                ),
                publish("sensors/c-7/b", QoS::AtLeastOnce, 5, "3"),
            ],
        ),
    );
    let persistent = Synthetic {
        persistent: true,
        expiry: 2,
        receive_maximum: 1,
        ..c7
    };
    let in_flight = [
        subscribe(1, &[("sensors/#", QoS::ExactlyOnce)]),
        publish("sensors/c-7/a", QoS::AtLeastOnce, 2, "1"),
        publish("sensors/c-7/b", QoS::ExactlyOnce, 3, "2"),
        publish("sensors/c-7/c", QoS::AtLeastOnce, 4, "3"),
        Packet::PubRec(Ack::new(1)),
    ];
    for (mode, name) in [
        (v311, "v311-reconnect-to-messages-in-flight.bin"),
        (v5, "v5-reconnect-to-messages-in-flight.bin"),
    ] {
        let mode = Mode {
            reconnect: true,
            ..mode
        };
        session(name, session_seed(mode, persistent, &in_flight));
    }
    let device = Mode { who: 2, ..v5 };
    session(
        "device-publishes-own-and-foreign-topics.bin",
        session_seed(
            device,
            Synthetic { id: 2, ..plain },
            &[
                publish("sensors/boiler-1/temp", QoS::AtLeastOnce, 1, "1"),
                publish("sensors/boiler-2/temp", QoS::AtLeastOnce, 2, "2"),
                publish("tele/boiler-1/SENSOR", QoS::AtLeastOnce, 3, "{\"t\":1}"),
                publish("alerts/x/y/z", QoS::AtLeastOnce, 4, "4"),
                publish("$SYS/x", QoS::AtMostOnce, 0, "5"),
                subscribe(
                    5,
                    &[
                        ("sensors/boiler-1/#", QoS::AtMostOnce),
                        ("#", QoS::AtMostOnce),
                    ],
                ),
            ],
        ),
    );
    session(
        "operator-publishes-and-subscribes.bin",
        session_seed(
            Mode { who: 3, ..v311 },
            Synthetic { id: 3, ..plain },
            &[
                publish("sensors/panel/x", QoS::AtLeastOnce, 1, "1"),
                subscribe(2, &[("#", QoS::AtLeastOnce)]),
            ],
        ),
    );
    session(
        "anonymous-client-with-a-registered-name.bin",
        session_seed(v311, Synthetic { id: 2, ..plain }, &[Packet::PingReq]),
    );
    session(
        "refused-subscriptions.bin",
        session_seed(
            v5,
            c7,
            &[subscribe(
                1,
                &[
                    ("test/nosubscribe", QoS::AtMostOnce),
                    ("a/#/b", QoS::AtMostOnce),
                    ("$share//x", QoS::AtMostOnce),
                    ("$share/g+/x", QoS::AtMostOnce),
                    ("", QoS::AtMostOnce),
                ],
            )],
        ),
    );
    session(
        "rate-limited.bin",
        session_seed(
            Mode {
                rated: true,
                per_round: 3,
                ..v5
            },
            c7,
            &(1..=4)
                .map(|i| publish("sensors/c-7/t", QoS::AtLeastOnce, i, "1"))
                .collect::<Vec<_>>(),
        ),
    );
    session(
        "receive-maximum-exceeded.bin",
        session_seed(
            Mode { per_round: 3, ..v5 },
            c7,
            &(1..=5)
                .map(|i| publish("sensors/c-7/t", QoS::ExactlyOnce, i, "1"))
                .collect::<Vec<_>>(),
        ),
    );
    session(
        "small-maximum-packet-size.bin",
        session_seed(
            v5,
            Synthetic {
                max_packet: 1,
                ..c7
            },
            &[
                subscribe(
                    1,
                    &[("sensors/#", QoS::AtLeastOnce), ("a/#/b", QoS::AtMostOnce)],
                ),
                publish(
                    "sensors/c-7/t",
                    QoS::AtLeastOnce,
                    2,
                    "a payload too long to deliver",
                ),
                publish("sensors/c-7/t", QoS::AtLeastOnce, 3, "1"),
            ],
        ),
    );
    session(
        "message-expiry-in-the-queue.bin",
        session_seed(
            v5,
            Synthetic {
                receive_maximum: 1,
                ..c7
            },
            &[
                subscribe(1, &[("sensors/#", QoS::AtLeastOnce)]),
                publish_v5("sensors/c-7/a", None, QoS::AtLeastOnce, 2),
                publish_v5("sensors/c-7/b", None, QoS::AtLeastOnce, 3),
                Packet::PingReq,
                Packet::PingReq,
                Packet::PubAck(Ack::new(1)),
            ],
        ),
    );
    session(
        "will-with-delay-on-a-lost-connection.bin",
        session_seed(
            v5,
            Synthetic {
                will: 2,
                will_retain: true,
                will_delay: true,
                expiry: 1,
                ..c7
            },
            &[subscribe(1, &[("sensors/+/status", QoS::AtLeastOnce)])],
        ),
    );
    session(
        "disconnect-with-will.bin",
        session_seed(
            v5,
            Synthetic { will: 1, ..c7 },
            &[Packet::Disconnect(Disconnect::new(
                reason::DISCONNECT_WITH_WILL,
                "",
            ))],
        ),
    );
    for (name, violation) in [
        (
            "second-connect.bin",
            Packet::Connect(Box::new(connect("c-7"))),
        ),
        ("auth-without-a-method.bin", Packet::Auth(Auth::default())),
        ("suback-from-a-client.bin", server_life(V5)[5].clone()),
        (
            "topic-alias-0.bin",
            publish_v5("a", Some(0), QoS::AtMostOnce, 0),
        ),
        (
            "wildcard-topic.bin",
            publish("sensors/+/t", QoS::AtLeastOnce, 1, "1"),
        ),
        (
            "publish-with-a-subscription-id.bin",
            server_life(V5)[8].clone(),
        ),
        (
            "no-local-on-a-shared-subscription.bin",
            subscribe_v5(
                1,
                "$share/g/x",
                SubscriptionOptions {
                    no_local: true,
                    ..SubscriptionOptions::default()
                },
                None,
            ),
        ),
        (
            "session-expiry-at-disconnect-after-0.bin",
            Packet::Disconnect(Disconnect {
                session_expiry: Some(60),
                ..Disconnect::default()
            }),
        ),
    ] {
        session(name, session_seed(v5, c7, &[Packet::PingReq, violation]));
    }
    let mut again = session_seed(v5, c7, &[Packet::PingReq]);
    again.extend(bytes_of(V311, &[Packet::Connect(Box::new(connect("c-7")))]));
    session("second-connect-of-3.1.1.bin", again);
    session(
        "reasons-too-large-for-the-client.bin",
        session_seed(
            v5,
            Synthetic {
                max_packet: 1,
                ..c7
            },
            &[
                subscribe(1, &[("a/#/b", QoS::AtMostOnce)]),
                publish("a/+", QoS::AtMostOnce, 0, "1"),
            ],
        ),
    );
    session(
        "alias-of-a-message-too-large.bin",
        session_seed(
            Mode {
                reconnect: true,
                ..v5
            },
            Synthetic {
                expiry: 1,
                max_packet: 1,
                aliases: 3,
                ..plain
            },
            &[
                retained("sensors/c-7/temp", QoS::AtLeastOnce, 1, "21.5"),
                subscribe(2, &[("#", QoS::AtMostOnce)]),
                subscribe(3, &[("sensors/#", QoS::AtLeastOnce)]),
            ],
        ),
    );
    session(
        "resend-larger-than-first-sent.bin",
        session_seed(
            Mode {
                reconnect: true,
                ..v5
            },
            Synthetic {
                persistent: true,
                expiry: 2,
                max_packet: 2,
                aliases: 1,
                ..c7
            },
            &[
                subscribe(1, &[("sensors/c-7/t", QoS::AtLeastOnce)]),
                publish("sensors/c-7/t", QoS::AtLeastOnce, 10, "1"),
                Packet::PubAck(Ack::new(1)),
                publish("sensors/c-7/t", QoS::AtLeastOnce, 11, &"x".repeat(50)),
            ],
        ),
    );
    let mut garbage = session_seed(v311, c7, &[Packet::PingReq]);
    garbage.extend([0x00, 0x00]);
    session("malformed-after-connect.bin", garbage);
    out
}

#[test]
fn the_committed_seeds_are_the_written_ones() {
    let write = std::env::var_os("WATCHPOST_WRITE_SEEDS").is_some();
    let mut stale = Vec::new();
    for (target, name, bytes) in seeds_written() {
        let path = manifest_dir().join("tests/corpus").join(target).join(name);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        } else if std::fs::read(&path).ok().as_ref() != Some(&bytes) {
            stale.push(format!("{target}/{name}"));
        }
    }
    assert!(
        stale.is_empty(),
        "seeds missing or not as written: {stale:?}; `WATCHPOST_WRITE_SEEDS=1 cargo test -p watchpost --test properties front` writes them"
    );
}

#[test]
fn every_packet_seed_keeps_the_codec_s_promises() {
    for (name, data) in seeds("packet") {
        println!("{name}");
        front_check::packet(&data);
    }
}

#[test]
fn every_session_seed_keeps_the_session_s_promises() {
    for (name, data) in seeds("session") {
        println!("{name}");
        front_check::session(&data);
    }
}

// ---------------------------------------------------------------------------------------------
// Generated inputs.

/// A packet a client might send, for either version (what a version cannot carry is left out
/// when it is written).
fn client_packet() -> impl Strategy<Value = Packet> {
    let topic = prop::sample::select(vec![
        "sensors/c-7/temp",
        "sensors/boiler-1/temp",
        "tele/boiler-1/SENSOR",
        "alerts/a/b/c",
        "a",
        "$SYS/x",
        "",
    ]);
    let filter = prop::sample::select(vec![
        "#",
        "sensors/#",
        "sensors/+/temp",
        "$share/g/sensors/#",
        "test/nosubscribe",
        "a/#/b",
    ]);
    let qos = prop::sample::select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]);
    let pkid = 1u16..6;
    prop_oneof![
        4 => (topic, qos.clone(), pkid.clone(), any::<bool>(), prop::option::of(0u16..4), any::<bool>())
            .prop_map(|(topic, qos, pkid, retain, alias, props)| {
                let mut p = match publish_v5(topic, alias, qos, if qos == QoS::AtMostOnce { 0 } else { pkid }) {
                    Packet::Publish(p) => p,
                    _ => unreachable!(),
                };
                p.retain = retain;
                if !props {
                    p.properties = None;
                }
                if p.topic.is_empty() && p.topic_alias.is_none() {
                    p.topic = text("a");
                }
                Packet::Publish(p)
            }),
        2 => (pkid.clone(), filter, qos, 0u8..3, any::<bool>(), prop::option::of(1u32..3))
            .prop_map(|(pkid, filter, qos, retain_handling, no_local, id)| {
                subscribe_v5(pkid, filter, SubscriptionOptions { qos, no_local, retain_handling, ..SubscriptionOptions::default() }, id)
            }),
        1 => pkid.clone().prop_map(|i| unsubscribe(i, &["sensors/#", "#"])),
        1 => pkid.clone().prop_map(|i| Packet::PubAck(Ack::new(i))),
        1 => pkid.clone().prop_map(|i| Packet::PubRec(Ack::new(i))),
        1 => pkid.clone().prop_map(pubrel),
        1 => pkid.prop_map(|i| Packet::PubComp(Ack::new(i))),
        1 => Just(Packet::PingReq),
        1 => prop::option::of(0u32..100).prop_map(|session_expiry| Packet::Disconnect(Disconnect { session_expiry, ..Disconnect::default() })),
    ]
}

/// A session input: a mode, a synthetic CONNECT and a sequence of client packets.
fn session_input() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u8>(),
        any::<[u8; 2]>(),
        prop::collection::vec(client_packet(), 0..24),
    )
        .prop_map(|(mode, connect, packets)| {
            let mode = mode & !2;
            let v = if mode & 1 == 0 { V311 } else { V5 };
            let mut out = vec![mode];
            out.extend(connect);
            out.extend(bytes_of(v, &packets));
            out
        })
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn mutated_packet_seeds_keep_the_codec_s_promises(data in mutant("packet", MQTT_TOKENS)) {
        front_check::packet(&data);
    }

    #[test]
    fn arbitrary_bytes_keep_the_codec_s_promises(data in prop::collection::vec(any::<u8>(), 0..64)) {
        front_check::packet(&data);
    }

    #[test]
    fn mutated_session_seeds_keep_the_session_s_promises(data in mutant("session", MQTT_TOKENS)) {
        front_check::session(&data);
    }

    #[test]
    fn generated_client_lives_keep_the_session_s_promises(data in session_input()) {
        front_check::session(&data);
    }
}

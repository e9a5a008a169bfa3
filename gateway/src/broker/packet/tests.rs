use bytes::{Bytes, BytesMut};
use proptest::prelude::*;

use super::*;

const V5: Version = Version::V5;
const V311: Version = Version::V311;
const MAX: usize = 1 << 20;

fn enc(p: &Packet, v: Version) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(p, v, &mut buf);
    buf.to_vec()
}

/// Decodes `bytes`, which must hold exactly one whole packet.
fn dec(bytes: &[u8], v: Version) -> Result<Packet, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let p = decode(&mut buf, v, MAX)?.expect("a whole packet");
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    Ok(p)
}

fn vbi(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (n & 0x7F) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

/// A string (or binary data) with its two-byte length.
fn s(x: &str) -> Vec<u8> {
    let mut out = (x.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(x.as_bytes());
    out
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A packet: `first`, the remaining length, `body`.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    cat(&[&[first], &vbi(body.len()), body])
}

/// A 3.1.1 CONNECT with `flags`, keep alive 60, and `payload`.
fn connect4(flags: u8, payload: &[u8]) -> Vec<u8> {
    frame(0x10, &cat(&[&s("MQTT"), &[4, flags, 0, 60], payload]))
}

/// An MQTT 5 CONNECT with `flags`, keep alive 60, properties `props` and `payload`.
fn connect5(flags: u8, props: &[u8], payload: &[u8]) -> Vec<u8> {
    frame(
        0x10,
        &cat(&[
            &s("MQTT"),
            &[5, flags, 0, 60],
            &vbi(props.len()),
            props,
            payload,
        ]),
    )
}

fn users() -> Vec<UserProperty> {
    vec![
        ("k".into(), "v".into()),
        ("k".into(), "second".into()),
        ("ü".into(), String::new()),
    ]
}

fn full_message_properties() -> Option<Box<MessageProperties>> {
    Some(Box::new(MessageProperties {
        payload_is_utf8: Some(true),
        message_expiry: Some(3600),
        content_type: Some("application/json".into()),
        response_topic: Some("reply/here".into()),
        correlation_data: Some(Bytes::from_static(&[0, 1, 2, 0xFF])),
        user_properties: users(),
    }))
}

fn plain_connect() -> Connect {
    Connect {
        clean_start: true,
        keep_alive: 60,
        client_id: "abc".into(),
        receive_maximum: u16::MAX,
        request_problem_information: true,
        ..Connect::default()
    }
}

/// Packets valid in both versions, every property set somewhere.
fn examples() -> Vec<Packet> {
    vec![
        Packet::Connect(Box::new(plain_connect())),
        Packet::Connect(Box::new(Connect {
            clean_start: false,
            keep_alive: 0,
            client_id: String::new(),
            will: Some(Will {
                topic: Bytes::from_static(b"status/dev1"),
                payload: Bytes::from_static(b"offline"),
                qos: QoS::AtLeastOnce,
                retain: true,
                delay: 30,
                properties: full_message_properties(),
            }),
            username: Some("user".into()),
            password: Some(Bytes::from_static(&[0, 0xFF, b'p'])),
            session_expiry: 7200,
            receive_maximum: 10,
            maximum_packet_size: Some(4096),
            topic_alias_maximum: 5,
            request_response_information: true,
            request_problem_information: false,
            user_properties: users(),
            authentication_method: Some("SCRAM-SHA-1".into()),
            authentication_data: Some(Bytes::from_static(b"client-first")),
        })),
        Packet::Connect(Box::new(Connect {
            will: Some(Will {
                topic: Bytes::from_static(b"w"),
                qos: QoS::ExactlyOnce,
                ..Will::default()
            }),
            username: Some(String::new()),
            ..plain_connect()
        })),
        Packet::ConnAck(Box::default()),
        Packet::ConnAck(Box::new(ConnAck {
            session_present: true,
            code: reason::SUCCESS,
            session_expiry: Some(60),
            receive_maximum: Some(20),
            maximum_qos: Some(QoS::AtLeastOnce),
            retain_available: Some(false),
            maximum_packet_size: Some(65536),
            assigned_client_id: Some("auto-1".into()),
            topic_alias_maximum: Some(10),
            reason_string: Some("welcome".into()),
            user_properties: users(),
            wildcard_subscription_available: Some(true),
            subscription_identifiers_available: Some(false),
            shared_subscription_available: Some(false),
            server_keep_alive: Some(120),
            response_information: Some("resp/".into()),
            server_reference: Some("other.example".into()),
            authentication_method: Some("SCRAM-SHA-1".into()),
            authentication_data: Some(Bytes::from_static(b"server-final")),
        })),
        Packet::ConnAck(Box::new(ConnAck {
            code: reason::NOT_AUTHORIZED,
            ..ConnAck::default()
        })),
        Packet::ConnAck(Box::new(ConnAck {
            code: reason::SERVER_BUSY,
            ..ConnAck::default()
        })),
        Packet::Publish(Publish {
            topic: Bytes::from_static(b"sensors/a/temp"),
            payload: Bytes::from_static(b"21.5"),
            ..Publish::default()
        }),
        Packet::Publish(Publish {
            qos: QoS::AtLeastOnce,
            retain: true,
            topic: Bytes::from_static("ü/+/#".as_bytes()),
            pkid: 1,
            payload: Bytes::new(),
            topic_alias: Some(0),
            subscription_ids: vec![1, 127, 128, 300, 16_384, 268_435_455],
            properties: full_message_properties(),
            ..Publish::default()
        }),
        Packet::Publish(Publish {
            dup: true,
            qos: QoS::ExactlyOnce,
            topic: Bytes::from_static(b"t"),
            pkid: u16::MAX,
            payload: Bytes::from(vec![7u8; 300]),
            properties: Some(Box::new(MessageProperties {
                payload_is_utf8: Some(false),
                ..MessageProperties::default()
            })),
            ..Publish::default()
        }),
        Packet::PubAck(Ack::new(1)),
        Packet::PubAck(Ack::with_code(2, reason::NO_MATCHING_SUBSCRIBERS)),
        Packet::PubAck(Ack {
            pkid: 3,
            code: reason::SUCCESS,
            reason_string: None,
            user_properties: users(),
        }),
        Packet::PubRec(Ack {
            pkid: 4,
            code: reason::QUOTA_EXCEEDED,
            reason_string: Some("slow down".into()),
            user_properties: Vec::new(),
        }),
        Packet::PubRel(Ack::with_code(5, reason::PACKET_ID_NOT_FOUND)),
        Packet::PubRel(Ack::new(6)),
        Packet::PubComp(Ack::new(u16::MAX)),
        Packet::Subscribe(Subscribe {
            pkid: 7,
            filters: vec![
                ("sensors/#".into(), SubscriptionOptions::default()),
                (
                    "$share/g/x/+".into(),
                    SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: 2,
                    },
                ),
                (
                    "a".into(),
                    SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        retain_handling: 1,
                        ..SubscriptionOptions::default()
                    },
                ),
            ],
            id: Some(268_435_455),
            user_properties: users(),
        }),
        Packet::SubAck(SubAck {
            pkid: 7,
            codes: vec![0, 1, 2, 0x80, 0x97, 0xA2],
            reason_string: Some("partly".into()),
            user_properties: users(),
        }),
        Packet::Unsubscribe(Unsubscribe {
            pkid: 8,
            filters: vec!["sensors/#".into(), String::new()],
            user_properties: users(),
        }),
        Packet::UnsubAck(UnsubAck {
            pkid: 8,
            codes: vec![0x00, 0x11],
            reason_string: Some("done".into()),
            user_properties: users(),
        }),
        Packet::PingReq,
        Packet::PingResp,
        Packet::Disconnect(Disconnect::default()),
        Packet::Disconnect(Disconnect::new(reason::DISCONNECT_WITH_WILL, "")),
        Packet::Disconnect(Disconnect {
            code: reason::SESSION_TAKEN_OVER,
            session_expiry: Some(0),
            reason_string: Some("taken over".into()),
            user_properties: users(),
            server_reference: Some("other.example".into()),
        }),
        Packet::Auth(Auth::default()),
        Packet::Auth(Auth {
            code: 0x18,
            method: Some("SCRAM-SHA-1".into()),
            data: Some(Bytes::from_static(b"\x00data")),
            reason_string: Some("continue".into()),
            user_properties: users(),
        }),
        Packet::Auth(Auth {
            code: 0x19,
            ..Auth::default()
        }),
    ]
}

/// Packets only MQTT 5 can carry.
fn examples_v5_only() -> Vec<Packet> {
    vec![
        Packet::Connect(Box::new(Connect {
            password: Some(Bytes::from_static(b"token")),
            ..plain_connect()
        })),
        Packet::Publish(Publish {
            topic: Bytes::new(),
            topic_alias: Some(3),
            payload: Bytes::from_static(b"x"),
            ..Publish::default()
        }),
    ]
}

/// The CONNACK reason code that comes back after a trip through a 3.1.1 return code.
fn connack_code_v311(code: u8) -> u8 {
    match code {
        0x00 => 0x00,
        0x84 => 0x84,
        0x85 => 0x85,
        0x86 => 0x86,
        0x87 | 0x8A => 0x87,
        _ => 0x88,
    }
}

/// What decoding `p` written for `v` gives back: `p` without what `v` cannot carry; None if
/// nothing is written.
fn expected(p: &Packet, v: Version) -> Option<Packet> {
    if v.is_v5() {
        return Some(p.clone());
    }
    let strip_ack = |a: &Ack| Ack::new(a.pkid);
    Some(match p {
        Packet::Connect(c) => Packet::Connect(Box::new(Connect {
            will: c.will.clone().map(|w| Will {
                delay: 0,
                properties: None,
                ..w
            }),
            ..Connect {
                clean_start: c.clean_start,
                keep_alive: c.keep_alive,
                client_id: c.client_id.clone(),
                username: c.username.clone(),
                password: c.password.clone(),
                ..plain_connect()
            }
        })),
        Packet::ConnAck(c) => Packet::ConnAck(Box::new(ConnAck {
            session_present: c.session_present,
            code: connack_code_v311(c.code),
            ..ConnAck::default()
        })),
        Packet::Publish(x) => Packet::Publish(Publish {
            topic_alias: None,
            subscription_ids: Vec::new(),
            properties: None,
            ..x.clone()
        }),
        Packet::PubAck(a) => Packet::PubAck(strip_ack(a)),
        Packet::PubRec(a) => Packet::PubRec(strip_ack(a)),
        Packet::PubRel(a) => Packet::PubRel(strip_ack(a)),
        Packet::PubComp(a) => Packet::PubComp(strip_ack(a)),
        Packet::Subscribe(x) => Packet::Subscribe(Subscribe {
            pkid: x.pkid,
            filters: x
                .filters
                .iter()
                .map(|(f, o)| {
                    let o = SubscriptionOptions {
                        qos: o.qos,
                        ..SubscriptionOptions::default()
                    };
                    (f.clone(), o)
                })
                .collect(),
            ..Subscribe::default()
        }),
        Packet::SubAck(x) => Packet::SubAck(SubAck {
            pkid: x.pkid,
            codes: x.codes.iter().map(|&c| c.min(0x80)).collect(),
            ..SubAck::default()
        }),
        Packet::Unsubscribe(x) => Packet::Unsubscribe(Unsubscribe {
            user_properties: Vec::new(),
            ..x.clone()
        }),
        Packet::UnsubAck(x) => Packet::UnsubAck(UnsubAck {
            pkid: x.pkid,
            ..UnsubAck::default()
        }),
        Packet::PingReq | Packet::PingResp => p.clone(),
        Packet::Disconnect(_) | Packet::Auth(_) => return None,
    })
}

/// Encodes `p` for `v`, checks `encoded_len`, decodes and compares.
fn round_trip(p: &Packet, v: Version) -> Result<(), String> {
    let bytes = enc(p, v);
    if bytes.len() != encoded_len(p, v) {
        return Err(format!(
            "{} for {v:?}: encoded_len {} but {} bytes written",
            p.name(),
            encoded_len(p, v),
            bytes.len()
        ));
    }
    let Some(want) = expected(p, v) else {
        return if bytes.is_empty() {
            Ok(())
        } else {
            Err(format!("{} written for {v:?}", p.name()))
        };
    };
    match dec(&bytes, v) {
        Ok(got) if got == want => Ok(()),
        Ok(got) => Err(format!("{v:?}: wrote {want:?}\nread back {got:?}")),
        Err(e) => Err(format!("{v:?}: {p:?} read back as error {e}")),
    }
}

#[test]
fn examples_round_trip_in_both_versions() {
    let mut kinds = std::collections::BTreeSet::new();
    for p in examples() {
        kinds.insert(p.name());
        for v in [V311, V5] {
            round_trip(&p, v).unwrap();
        }
    }
    for p in examples_v5_only() {
        round_trip(&p, V5).unwrap();
    }
    assert_eq!(
        kinds.len(),
        15,
        "every packet type has an example: {kinds:?}"
    );
}

#[test]
fn exact_bytes() {
    let pub_v5 = Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        topic: Bytes::from_static(b"a/b"),
        pkid: 5,
        payload: Bytes::from_static(b"hi"),
        subscription_ids: vec![300],
        ..Publish::default()
    });
    let sub = Packet::Subscribe(Subscribe {
        pkid: 1,
        filters: vec![(
            "a".into(),
            SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
            },
        )],
        ..Subscribe::default()
    });
    let connack = |code| {
        Packet::ConnAck(Box::new(ConnAck {
            code,
            ..ConnAck::default()
        }))
    };
    let cases: Vec<(Packet, Version, Vec<u8>)> = vec![
        (
            Packet::Connect(Box::new(plain_connect())),
            V311,
            cat(&[&[0x10, 15], &s("MQTT"), &[4, 0x02, 0, 60], &s("abc")]),
        ),
        (
            Packet::Connect(Box::new(Connect {
                will: Some(Will {
                    topic: Bytes::from_static(b"w"),
                    payload: Bytes::from_static(b"x"),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                    ..Will::default()
                }),
                username: Some("u".into()),
                password: Some(Bytes::from_static(b"p")),
                ..plain_connect()
            })),
            V311,
            connect4(0xEE, &cat(&[&s("abc"), &s("w"), &s("x"), &s("u"), &s("p")])),
        ),
        (
            Packet::Connect(Box::new(plain_connect())),
            V5,
            cat(&[&[0x10, 16], &s("MQTT"), &[5, 0x02, 0, 60, 0], &s("abc")]),
        ),
        (
            Packet::ConnAck(Box::new(ConnAck {
                receive_maximum: Some(20),
                topic_alias_maximum: Some(10),
                ..ConnAck::default()
            })),
            V5,
            vec![0x20, 9, 0, 0, 6, 0x21, 0, 20, 0x22, 0, 10],
        ),
        (connack(0x00), V311, vec![0x20, 2, 0, 0]),
        (connack(0x84), V311, vec![0x20, 2, 0, 1]),
        (connack(0x85), V311, vec![0x20, 2, 0, 2]),
        (connack(0x89), V311, vec![0x20, 2, 0, 3]),
        (connack(0x86), V311, vec![0x20, 2, 0, 4]),
        (connack(0x8A), V311, vec![0x20, 2, 0, 5]),
        (connack(0x99), V311, vec![0x20, 2, 0, 3]),
        (Packet::PubAck(Ack::new(7)), V5, vec![0x40, 2, 0, 7]),
        (
            Packet::PubAck(Ack::with_code(7, 0x10)),
            V5,
            vec![0x40, 3, 0, 7, 0x10],
        ),
        (
            Packet::PubAck(Ack::with_code(7, 0x10)),
            V311,
            vec![0x40, 2, 0, 7],
        ),
        (
            Packet::PubRec(Ack {
                reason_string: Some("x".into()),
                ..Ack::new(7)
            }),
            V5,
            vec![0x50, 8, 0, 7, 0, 4, 0x1F, 0, 1, b'x'],
        ),
        (Packet::PubRel(Ack::new(1)), V311, vec![0x62, 2, 0, 1]),
        (
            pub_v5.clone(),
            V5,
            cat(&[&[0x32, 13], &s("a/b"), &[0, 5, 3, 0x0B, 0xAC, 0x02], b"hi"]),
        ),
        (pub_v5, V311, cat(&[&[0x32, 9], &s("a/b"), &[0, 5], b"hi"])),
        (
            sub.clone(),
            V5,
            cat(&[&[0x82, 7, 0, 1, 0], &s("a"), &[0x2D]]),
        ),
        (sub, V311, cat(&[&[0x82, 6, 0, 1], &s("a"), &[0x01]])),
        (
            Packet::SubAck(SubAck {
                pkid: 1,
                codes: vec![0, 1, 0x97],
                ..SubAck::default()
            }),
            V311,
            vec![0x90, 5, 0, 1, 0, 1, 0x80],
        ),
        (
            Packet::UnsubAck(UnsubAck {
                pkid: 1,
                codes: vec![0x11],
                ..UnsubAck::default()
            }),
            V311,
            vec![0xB0, 2, 0, 1],
        ),
        (
            Packet::UnsubAck(UnsubAck {
                pkid: 1,
                codes: vec![0x11],
                ..UnsubAck::default()
            }),
            V5,
            vec![0xB0, 4, 0, 1, 0, 0x11],
        ),
        (Packet::PingReq, V311, vec![0xC0, 0]),
        (Packet::PingResp, V5, vec![0xD0, 0]),
        (Packet::Disconnect(Disconnect::default()), V5, vec![0xE0, 0]),
        (
            Packet::Disconnect(Disconnect::new(0x8E, "")),
            V5,
            vec![0xE0, 1, 0x8E],
        ),
        (Packet::Disconnect(Disconnect::new(0x8E, "x")), V311, vec![]),
        (Packet::Auth(Auth::default()), V5, vec![0xF0, 0]),
        (Packet::Auth(Auth::default()), V311, vec![]),
    ];
    for (p, v, want) in cases {
        assert_eq!(enc(&p, v), want, "{} for {v:?}", p.name());
        assert_eq!(encoded_len(&p, v), want.len(), "{} for {v:?}", p.name());
    }
}

#[test]
fn refused_inputs_give_their_reason_code() {
    let p5 = |body: &[u8]| frame(0x30, body);
    let connack5 = |props: &[u8]| frame(0x20, &cat(&[&[0, 0], &vbi(props.len()), props]));
    #[rustfmt::skip]
    let cases: Vec<(&str, Version, Vec<u8>, u8)> = vec![
        // Fixed header.
        ("packet type 0", V5, vec![0x00, 0], 0x81),
        ("AUTH in 3.1.1", V311, vec![0xF0, 0], 0x81),
        ("PUBLISH QoS 3", V5, frame(0x36, &cat(&[&s("a"), &[0, 1, 0]])), 0x81),
        ("PUBLISH QoS 3, 3.1.1", V311, frame(0x36, &cat(&[&s("a"), &[0, 1]])), 0x81),
        ("PUBLISH QoS 0 with DUP", V5, frame(0x38, &cat(&[&s("a"), &[0]])), 0x81),
        ("PUBLISH QoS 0 with DUP, 3.1.1", V311, frame(0x38, &s("a")), 0x81),
        ("PUBACK flags 0010", V5, vec![0x42, 2, 0, 1], 0x81),
        ("PUBREL flags 0000", V5, vec![0x60, 2, 0, 1], 0x81),
        ("SUBSCRIBE flags 0000", V311, frame(0x80, &cat(&[&[0, 1], &s("a"), &[0]])), 0x81),
        ("UNSUBSCRIBE flags 0000", V311, frame(0xA0, &cat(&[&[0, 1], &s("a")])), 0x81),
        ("PINGREQ flags 0001", V311, vec![0xC1, 0], 0x81),
        ("CONNECT flags 0001", V5, vec![0x11, 0], 0x81),
        ("DISCONNECT flags 1000", V5, vec![0xE8, 0], 0x81),
        ("remaining length of 5 bytes", V5, vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], 0x81),
        ("remaining length of 4 bytes, all continued", V311, vec![0xC0, 0x80, 0x80, 0x80, 0x80], 0x81),
        // The body is read exactly.
        ("PUBACK trailing byte, 3.1.1", V311, vec![0x40, 3, 0, 1, 0], 0x81),
        ("PUBACK trailing byte after properties", V5, vec![0x40, 5, 0, 1, 0x10, 0, 0xFF], 0x81),
        ("PUBACK too short", V5, vec![0x40, 1, 0], 0x81),
        ("PINGREQ with a body", V5, vec![0xC0, 1, 0], 0x81),
        ("PINGRESP with a body", V311, vec![0xD0, 1, 0], 0x81),
        ("DISCONNECT with a body, 3.1.1", V311, vec![0xE0, 1, 0], 0x81),
        ("CONNACK trailing byte, 3.1.1", V311, vec![0x20, 3, 0, 0, 0], 0x81),
        ("topic longer than the packet", V311, frame(0x30, &[0, 5, b'a']), 0x81),
        ("PUBLISH without its property length", V5, frame(0x30, &s("a")), 0x81),
        ("CONNECT cut inside the client id", V311, connect4(0x02, &[0, 5, b'a']), 0x81),
        ("CONNECT without its will", V311, connect4(0x06, &s("c")), 0x81),
        // Strings.
        ("topic not UTF-8", V311, p5(&[0, 2, 0xC3, 0x28]), 0x81),
        ("topic with U+0000", V5, p5(&[0, 3, b'a', 0, b'b', 0]), 0x81),
        ("topic with a UTF-16 surrogate", V311, p5(&[0, 3, 0xED, 0xA0, 0x80]), 0x81),
        ("client id not UTF-8", V311, connect4(0x02, &[0, 1, 0xFF]), 0x81),
        ("user name with U+0000", V311, connect4(0x82, &cat(&[&s("c"), &[0, 1, 0]])), 0x81),
        ("will topic not UTF-8", V311, connect4(0x06, &cat(&[&s("c"), &[0, 1, 0xFE], &s("p")])), 0x81),
        ("filter with U+0000", V311, frame(0x82, &[0, 1, 0, 1, 0, 0]), 0x81),
        ("user property not UTF-8", V5, frame(0x40, &[0, 1, 0, 6, 0x26, 0, 1, 0xFF, 0, 0]), 0x81),
        // Packet id 0.
        ("PUBLISH QoS 1 with packet id 0", V5, frame(0x32, &cat(&[&s("a"), &[0, 0, 0]])), 0x82),
        ("PUBLISH QoS 2 with packet id 0, 3.1.1", V311, frame(0x34, &cat(&[&s("a"), &[0, 0]])), 0x81),
        ("PUBACK with packet id 0", V5, vec![0x40, 2, 0, 0], 0x82),
        ("PUBREL with packet id 0, 3.1.1", V311, vec![0x62, 2, 0, 0], 0x81),
        ("SUBSCRIBE with packet id 0", V5, frame(0x82, &cat(&[&[0, 0, 0], &s("a"), &[0]])), 0x82),
        ("UNSUBSCRIBE with packet id 0", V5, frame(0xA2, &cat(&[&[0, 0, 0], &s("a")])), 0x82),
        ("SUBACK with packet id 0, 3.1.1", V311, vec![0x90, 3, 0, 0, 0], 0x81),
        // CONNECT.
        ("level 4 read as MQTT 5", V5, connect4(0x02, &s("c")), 0x84),
        ("level 5 read as 3.1.1", V311, connect5(0x02, &[], &s("c")), 0x84),
        ("MQTT 3.1 (MQIsdp, 3)", V311, frame(0x10, &cat(&[&s("MQIsdp"), &[3, 2, 0, 60], &s("c")])), 0x84),
        ("protocol name MQTX", V311, frame(0x10, &cat(&[&s("MQTX"), &[4, 2, 0, 60], &s("c")])), 0x84),
        ("reserved connect flag", V311, connect4(0x03, &s("c")), 0x81),
        ("will QoS without a will", V311, connect4(0x0A, &s("c")), 0x81),
        ("will retain without a will", V5, connect5(0x22, &[], &s("c")), 0x81),
        ("will QoS 3", V311, connect4(0x1E, &cat(&[&s("c"), &s("t"), &s("p")])), 0x81),
        ("password without user name, 3.1.1", V311, connect4(0x42, &cat(&[&s("c"), &s("pw")])), 0x81),
        ("will payload not UTF-8 as its indicator says", V5,
            connect5(0x06, &[], &cat(&[&s("c"), &[2, 0x01, 1], &s("t"), &[0, 1, 0xFF]])), 0x99),
        ("Authentication Data without Method", V5, connect5(0x02, &[0x16, 0, 1, 0xAA], &s("c")), 0x82),
        // MQTT 5 properties.
        ("duplicate Receive Maximum", V5, connect5(0, &[0x21, 0, 10, 0x21, 0, 10], &s("c")), 0x82),
        ("duplicate Session Expiry", V5, connect5(0, &[0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 1], &s("c")), 0x82),
        ("duplicate Topic Alias", V5, p5(&cat(&[&s("a"), &[6, 0x23, 0, 1, 0x23, 0, 2]])), 0x82),
        ("duplicate Reason String", V5, vec![0x40, 12, 0, 1, 0x10, 8, 0x1F, 0, 1, b'a', 0x1F, 0, 1, b'b'], 0x82),
        ("duplicate Payload Format Indicator in the will", V5,
            connect5(0x06, &[], &cat(&[&s("c"), &[4, 0x01, 1, 0x01, 1], &s("t"), &s("p")])), 0x82),
        ("duplicate Subscription Identifier in SUBSCRIBE", V5,
            frame(0x82, &cat(&[&[0, 1, 4, 0x0B, 1, 0x0B, 2], &s("a"), &[0]])), 0x82),
        ("Topic Alias in CONNECT", V5, connect5(0, &[0x23, 0, 1], &s("c")), 0x81),
        ("Will Delay Interval in CONNECT's properties", V5, connect5(0, &[0x18, 0, 0, 0, 1], &s("c")), 0x81),
        ("Session Expiry in the will", V5,
            connect5(0x06, &[], &cat(&[&s("c"), &[5, 0x11, 0, 0, 0, 1], &s("t"), &s("p")])), 0x81),
        ("Reason String in PUBLISH", V5, p5(&cat(&[&s("a"), &[4, 0x1F, 0, 1, b'x']])), 0x81),
        ("Topic Alias in PUBACK", V5, vec![0x40, 7, 0, 1, 0, 3, 0x23, 0, 1], 0x81),
        ("Subscription Identifier in UNSUBSCRIBE", V5, frame(0xA2, &cat(&[&[0, 1, 2, 0x0B, 1], &s("a")])), 0x81),
        ("Receive Maximum in DISCONNECT", V5, vec![0xE0, 5, 0, 3, 0x21, 0, 1], 0x81),
        ("Topic Alias in AUTH", V5, vec![0xF0, 5, 0x18, 3, 0x23, 0, 1], 0x81),
        ("unknown property 0x7F", V5, connect5(0, &[0x7F, 0], &s("c")), 0x81),
        ("Receive Maximum 0", V5, connect5(0, &[0x21, 0, 0], &s("c")), 0x82),
        ("Receive Maximum 0 in CONNACK", V5, connack5(&[0x21, 0, 0]), 0x82),
        ("Maximum Packet Size 0", V5, connect5(0, &[0x27, 0, 0, 0, 0], &s("c")), 0x82),
        ("Subscription Identifier 0 in SUBSCRIBE", V5, frame(0x82, &cat(&[&[0, 1, 2, 0x0B, 0], &s("a"), &[0]])), 0x82),
        ("Subscription Identifier 0 in PUBLISH", V5, p5(&cat(&[&s("a"), &[2, 0x0B, 0]])), 0x82),
        ("Subscription Identifier of 5 bytes", V5, p5(&cat(&[&s("a"), &[6, 0x0B, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]])), 0x81),
        ("Request Problem Information 2", V5, connect5(0, &[0x17, 2], &s("c")), 0x82),
        ("Request Response Information 2", V5, connect5(0, &[0x19, 2], &s("c")), 0x82),
        ("Payload Format Indicator 2", V5, p5(&cat(&[&s("a"), &[2, 0x01, 2]])), 0x82),
        ("Maximum QoS 2", V5, connack5(&[0x24, 2]), 0x82),
        ("Retain Available 2", V5, connack5(&[0x25, 2]), 0x82),
        ("Wildcard Subscription Available 2", V5, connack5(&[0x28, 2]), 0x82),
        ("Subscription Identifier Available 2", V5, connack5(&[0x29, 2]), 0x82),
        ("Shared Subscription Available 9", V5, connack5(&[0x2A, 9]), 0x82),
        ("property length past the packet's end", V5, p5(&cat(&[&s("a"), &[5, 0x01]])), 0x81),
        ("property value past the property length", V5, p5(&cat(&[&s("a"), &[2, 0x02, 0, 0, 0, 1]])), 0x81),
        // PUBLISH topic.
        ("empty topic without alias", V5, p5(&[0, 0, 0]), 0x82),
        ("empty topic, 3.1.1", V311, p5(&[0, 0]), 0x81),
        // SUBSCRIBE and UNSUBSCRIBE.
        ("SUBSCRIBE with no filter", V5, frame(0x82, &[0, 1, 0]), 0x82),
        ("SUBSCRIBE with no filter, 3.1.1", V311, frame(0x82, &[0, 1]), 0x81),
        ("SUBSCRIBE filter without options", V311, frame(0x82, &cat(&[&[0, 1], &s("a")])), 0x81),
        ("3.1.1 options with no local", V311, frame(0x82, &cat(&[&[0, 1], &s("a"), &[0x04]])), 0x81),
        ("3.1.1 options with bit 7", V311, frame(0x82, &cat(&[&[0, 1], &s("a"), &[0x80]])), 0x81),
        ("options with reserved bit 6", V5, frame(0x82, &cat(&[&[0, 1, 0], &s("a"), &[0x40]])), 0x81),
        ("retain handling 3", V5, frame(0x82, &cat(&[&[0, 1, 0], &s("a"), &[0x30]])), 0x82),
        ("SUBSCRIBE QoS 3", V5, frame(0x82, &cat(&[&[0, 1, 0], &s("a"), &[0x03]])), 0x81),
        ("SUBSCRIBE QoS 3, 3.1.1", V311, frame(0x82, &cat(&[&[0, 1], &s("a"), &[0x03]])), 0x81),
        ("UNSUBSCRIBE with no filter", V5, frame(0xA2, &[0, 1, 0]), 0x82),
        ("UNSUBSCRIBE with no filter, 3.1.1", V311, frame(0xA2, &[0, 1]), 0x81),
        // Reason codes.
        ("PUBREL code 0x10", V5, vec![0x62, 3, 0, 1, 0x10], 0x82),
        ("PUBCOMP code 0x80", V5, vec![0x70, 3, 0, 1, 0x80], 0x82),
        ("PUBACK code 0x92", V5, vec![0x40, 3, 0, 1, 0x92], 0x82),
        ("PUBREC code 0x01", V5, vec![0x50, 3, 0, 1, 0x01], 0x82),
        ("DISCONNECT code 0x05", V5, vec![0xE0, 1, 0x05], 0x82),
        ("AUTH code 0x01", V5, vec![0xF0, 1, 0x01], 0x82),
        ("CONNACK code 0x10", V5, vec![0x20, 3, 0, 0x10, 0], 0x82),
        ("CONNACK return code 6, 3.1.1", V311, vec![0x20, 2, 0, 6], 0x81),
        ("CONNACK reserved flag bits", V5, vec![0x20, 3, 0x02, 0, 0], 0x81),
        ("CONNACK session present with a refusal", V5, vec![0x20, 3, 1, 0x87, 0], 0x82),
        ("SUBACK code 0x97, 3.1.1", V311, vec![0x90, 3, 0, 1, 0x97], 0x81),
        ("SUBACK code 0x11", V5, vec![0x90, 4, 0, 1, 0, 0x11], 0x82),
        ("SUBACK with no code", V5, vec![0x90, 3, 0, 1, 0], 0x82),
        ("UNSUBACK code 0x02", V5, vec![0xB0, 4, 0, 1, 0, 0x02], 0x82),
        ("UNSUBACK with no code", V5, vec![0xB0, 3, 0, 1, 0], 0x82),
        ("UNSUBACK with codes, 3.1.1", V311, vec![0xB0, 3, 0, 1, 0], 0x81),
    ];
    let mut failures = Vec::new();
    for (what, v, bytes, code) in cases {
        let mut buf = BytesMut::from(&bytes[..]);
        match decode(&mut buf, v, MAX) {
            Err(e) if e.code() == code => {}
            other => failures.push(format!("{what}: want 0x{code:02X}, got {other:?}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn accepted_edge_cases() {
    let cases: Vec<(&str, Version, Vec<u8>)> = vec![
        (
            "password without user name",
            V5,
            connect5(0x42, &[], &cat(&[&s("c"), &s("pw")])),
        ),
        ("empty client id", V311, connect4(0x02, &s(""))),
        (
            "wildcards in a topic name (the session checks them)",
            V311,
            frame(0x30, &s("a/+/#")),
        ),
        (
            "Topic Alias 0 (the session refuses it)",
            V5,
            frame(0x30, &cat(&[&s("a"), &[3, 0x23, 0, 0]])),
        ),
        (
            "repeated Subscription Identifier in PUBLISH",
            V5,
            frame(0x30, &cat(&[&s("a"), &[4, 0x0B, 1, 0x0B, 2]])),
        ),
        (
            "repeated User Property",
            V5,
            vec![
                0x40, 15, 0, 1, 0, 11, 0x26, 0, 1, b'a', 0, 0, 0x26, 0, 0, 0, 0,
            ],
        ),
        (
            "PUBACK with a code and property length 0",
            V5,
            vec![0x40, 4, 0, 1, 0x10, 0],
        ),
        (
            "DISCONNECT with a code and property length 0",
            V5,
            vec![0xE0, 2, 0x04, 0],
        ),
        ("non-minimal remaining length", V311, vec![0xC0, 0x80, 0x00]),
        ("remaining length of 4 bytes", V5, {
            let body = cat(&[&s("a"), &[0], &vec![0; 2_097_152 - 4]]);
            cat(&[&[0x30, 0x80, 0x80, 0x80, 0x01], &body])
        }),
    ];
    for (what, v, bytes) in cases {
        let mut buf = BytesMut::from(&bytes[..]);
        match decode(&mut buf, v, 4 << 20) {
            Ok(Some(_)) if buf.is_empty() => {}
            other => panic!("{what}: {other:?}"),
        }
    }
    // What the accepted cases read as.
    let Packet::Publish(p) = dec(
        &frame(0x30, &cat(&[&s("a"), &[5, 0x0B, 1, 0x0B, 0xAC, 0x02]])),
        V5,
    )
    .unwrap() else {
        panic!("not a PUBLISH");
    };
    assert_eq!(p.subscription_ids, vec![1, 300]);
    assert_eq!(p.properties, None);
    let Packet::Publish(p) = dec(&frame(0x30, &cat(&[&s("a"), &[2, 0x01, 1]])), V5).unwrap() else {
        panic!("not a PUBLISH");
    };
    assert_eq!(p.properties.unwrap().payload_is_utf8, Some(true));
    assert_eq!(
        dec(&[0xE0, 0], V311).unwrap(),
        Packet::Disconnect(Disconnect::default())
    );
    let Packet::Connect(c) = dec(&connect4(0x02, &s("c")), V311).unwrap() else {
        panic!("not a CONNECT");
    };
    assert_eq!(
        (c.session_expiry, c.receive_maximum, c.topic_alias_maximum),
        (0, 65535, 0)
    );
    assert!(!c.request_response_information && c.request_problem_information);
    let Packet::ConnAck(c) = dec(&[0x20, 2, 0, 5], V311).unwrap() else {
        panic!("not a CONNACK");
    };
    assert_eq!(c.code, reason::NOT_AUTHORIZED);
}

#[test]
fn errors_say_what_was_wrong() {
    let mut buf = BytesMut::from(&frame(0x36, &cat(&[&s("a"), &[0, 1]]))[..]);
    assert_eq!(
        decode(&mut buf, V311, MAX).unwrap_err().to_string(),
        "malformed packet: PUBLISH with QoS 3"
    );
    let mut buf = BytesMut::from(&connect5(0, &[0x21, 0, 10, 0x21, 0, 10], &s("c"))[..]);
    assert_eq!(
        decode(&mut buf, V5, MAX).unwrap_err().to_string(),
        "protocol error: duplicate Receive Maximum property"
    );
    let header = cat(&[&[0x30], &vbi(70_000 - 4)]);
    assert_eq!(header.len(), 4);
    let mut buf = BytesMut::from(&header[..]);
    assert_eq!(
        decode(&mut buf, V5, 65536).unwrap_err().to_string(),
        "packet too large: 70000 bytes, limit 65536"
    );
}

#[test]
fn too_large_is_found_from_the_fixed_header() {
    let p = Packet::Publish(Publish {
        topic: Bytes::from_static(b"t"),
        payload: Bytes::from(vec![1; 200]),
        ..Publish::default()
    });
    for v in [V311, V5] {
        let bytes = enc(&p, v);
        let len = bytes.len();
        // Exactly at the limit: accepted.
        let mut buf = BytesMut::from(&bytes[..]);
        assert!(decode(&mut buf, v, len).unwrap().is_some());
        // One byte over: refused with only the fixed header buffered.
        let mut buf = BytesMut::from(&bytes[..3]);
        let e = decode(&mut buf, v, len - 1).unwrap_err();
        assert_eq!(
            e,
            DecodeError::TooLarge {
                size: len,
                limit: len - 1
            }
        );
        assert_eq!(e.code(), 0x95);
    }
}

#[test]
fn every_prefix_needs_more_and_consumes_nothing() {
    for v in [V311, V5] {
        let mut packets = examples();
        if v.is_v5() {
            packets.extend(examples_v5_only());
        }
        for p in packets {
            let bytes = enc(&p, v);
            for n in 0..bytes.len() {
                let mut buf = BytesMut::from(&bytes[..n]);
                assert_eq!(
                    decode(&mut buf, v, MAX),
                    Ok(None),
                    "{} for {v:?}, {n} of {} bytes",
                    p.name(),
                    bytes.len()
                );
                assert_eq!(&buf[..], &bytes[..n], "nothing consumed");
            }
        }
    }
}

#[test]
fn packets_are_read_one_at_a_time() {
    let a = Packet::PubAck(Ack::new(9));
    let b = Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        topic: Bytes::from_static(b"x"),
        pkid: 10,
        payload: Bytes::from_static(b"p"),
        ..Publish::default()
    });
    let mut buf = BytesMut::new();
    encode(&a, V5, &mut buf);
    encode(&b, V5, &mut buf);
    encode(&Packet::PingReq, V5, &mut buf);
    buf.extend_from_slice(&[0x30]);
    assert_eq!(decode(&mut buf, V5, MAX), Ok(Some(a)));
    assert_eq!(decode(&mut buf, V5, MAX), Ok(Some(b)));
    assert_eq!(decode(&mut buf, V5, MAX), Ok(Some(Packet::PingReq)));
    assert_eq!(decode(&mut buf, V5, MAX), Ok(None));
    assert_eq!(&buf[..], &[0x30]);
}

#[test]
fn topic_and_payload_are_slices_of_the_read_buffer() {
    let p = Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        topic: Bytes::from_static(b"sensors/a"),
        pkid: 1,
        payload: Bytes::from_static(b"{\"t\":21}"),
        ..Publish::default()
    });
    for v in [V311, V5] {
        let mut buf = BytesMut::new();
        encode(&p, v, &mut buf);
        let range = buf.as_ptr_range();
        let Some(Packet::Publish(got)) = decode(&mut buf, v, MAX).unwrap() else {
            panic!("not a PUBLISH");
        };
        assert!(range.contains(&got.topic.as_ptr()));
        assert!(range.contains(&got.payload.as_ptr()));
        assert_eq!(got.properties, None);
    }
}

#[test]
fn connect_level_reads_the_protocol_level() {
    let mqtt31 = frame(0x10, &cat(&[&s("MQIsdp"), &[3, 2, 0, 60], &s("c")]));
    let mqtt311 = connect4(0x02, &s("c"));
    let mqtt5 = connect5(0x02, &[], &s("c"));
    let level6 = frame(0x10, &cat(&[&s("MQTT"), &[6, 2, 0, 60], &s("c")]));
    for (bytes, level, needed) in [
        (&mqtt31, 3, 2 + 2 + 6 + 1),
        (&mqtt311, 4, 2 + 2 + 4 + 1),
        (&mqtt5, 5, 2 + 2 + 4 + 1),
        (&level6, 6, 2 + 2 + 4 + 1),
    ] {
        assert_eq!(connect_level(bytes), Ok(Some(level)));
        assert_eq!(connect_level(&bytes[..needed]), Ok(Some(level)));
        for n in 0..needed {
            assert_eq!(
                connect_level(&bytes[..n]),
                Ok(None),
                "{n} bytes of level {level}"
            );
        }
    }
    let not_connect = connect_level(&[0x30, 3, 0, 1, b'a']).unwrap_err();
    assert_eq!(not_connect.code(), 0x82);
    assert_eq!(
        not_connect.to_string(),
        "protocol error: first packet is PUBLISH, not CONNECT"
    );
    assert_eq!(
        connect_level(b"GET / HTTP/1.1\r\n").unwrap_err().code(),
        0x82
    );
    let http = frame(0x10, &cat(&[&s("HTTP"), &[4, 2, 0, 60], &s("c")]));
    assert_eq!(connect_level(&http).unwrap_err().code(), 0x84);
    let long_name = frame(0x10, &cat(&[&s("MQTT5"), &[5, 2, 0, 60], &s("c")]));
    assert_eq!(connect_level(&long_name).unwrap_err().code(), 0x84);
    assert_eq!(
        connect_level(&[0x10, 3, 0, 4, b'M']).unwrap_err().code(),
        0x81
    );
    assert_eq!(
        connect_level(&[0x10, 0xFF, 0xFF, 0xFF, 0xFF])
            .unwrap_err()
            .code(),
        0x81
    );
}

/// Found by the `packet` fuzz target: a CONNECT shorter than its protocol name's length had
/// the name's length read from the bytes after it, so the answer depended on whether more
/// bytes had arrived ("ends before its protocol name" with two bytes, "protocol name of 0
/// bytes" with four).
#[test]
fn connect_level_reads_nothing_after_the_connect() {
    let short = [0x10, 0x01, 0x00, 0x00, 0x00];
    for n in 2..=short.len() {
        assert_eq!(
            connect_level(&short[..n]),
            Err(DecodeError::Malformed(
                "CONNECT ends before its protocol name".into()
            )),
            "{n} bytes"
        );
    }
    let empty = [0x10, 0x00, 0xC0, 0x00];
    assert_eq!(connect_level(&empty), connect_level(&empty[..2]));
}

/// Found by the `session` fuzz target: a second CONNECT of another protocol level was
/// answered with a DISCONNECT of 0x84, a reason code DISCONNECT does not have (a client
/// reads it as malformed). After the first CONNECT, any CONNECT is a protocol error.
#[test]
fn a_later_connect_of_another_protocol_closes_with_a_protocol_error() {
    let mqtt311 = connect4(0x02, &s("c"));
    let e = dec(&mqtt311, V5).unwrap_err();
    assert_eq!(e.code(), reason::UNSUPPORTED_PROTOCOL_VERSION, "in CONNACK");
    assert_eq!(e.disconnect_code(), reason::PROTOCOL_ERROR, "in DISCONNECT");
    let qos3 = dec(&[0x36, 0x05, 0x00, 0x01, b't', 0x00, 0x01], V5).unwrap_err();
    assert_eq!(qos3.disconnect_code(), qos3.code(), "other errors");
    let d = Packet::Disconnect(Disconnect::new(e.disconnect_code(), &e.to_string()));
    assert_eq!(
        dec(&enc(&d, V5), V5),
        Ok(d),
        "a DISCONNECT a client can read"
    );
}

/// A client's Maximum Packet Size binds what the server sends; the reason string and user
/// properties are what goes when a packet would be too large with them.
#[test]
fn fitted_leaves_out_reasons_only_when_they_make_a_packet_too_large() {
    let suback = Packet::SubAck(SubAck {
        pkid: 1,
        codes: vec![reason::TOPIC_FILTER_INVALID],
        reason_string: Some("0x8F not a valid filter".into()),
        user_properties: users(),
    });
    let bare = Packet::SubAck(SubAck {
        pkid: 1,
        codes: vec![reason::TOPIC_FILTER_INVALID],
        ..SubAck::default()
    });
    let size = encoded_len(&suback, V5);
    assert_eq!(fitted(&suback, V5, size), None, "it fits");
    assert_eq!(fitted(&suback, V5, size - 1), Some(bare.clone()));
    assert_eq!(
        fitted(&suback, V5, 1),
        Some(bare.clone()),
        "as small as it gets"
    );
    assert_eq!(fitted(&bare, V5, 1), None, "nothing to leave out");
    let publish = Packet::Publish(Publish {
        topic: Bytes::from_static(b"t"),
        payload: Bytes::from_static(b"too long for the client"),
        ..Publish::default()
    });
    assert_eq!(
        fitted(&publish, V5, 8),
        None,
        "a publish is not this function's"
    );
    let disconnect = Packet::Disconnect(Disconnect::new(reason::PROTOCOL_ERROR, "why"));
    assert_eq!(
        fitted(&disconnect, V5, 4),
        Some(Packet::Disconnect(Disconnect::new(
            reason::PROTOCOL_ERROR,
            ""
        )))
    );
}

// Generated packets: every packet MQTT 5 may carry, round-tripped in both versions.

const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_CODES: &[u8] = &[0x00, 0x92];
const SUBACK_CODES: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
const UNSUBACK_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
const DISCONNECT_CODES: &[u8] = &[0x00, 0x04, 0x80, 0x81, 0x8B, 0x8E, 0x93, 0x95, 0x98, 0xA2];

fn text() -> impl Strategy<Value = String> {
    "[a-z/+#é ]{0,6}"
}

fn opt_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(text())
}

fn bin() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..6).prop_map(Bytes::from)
}

fn gen_users() -> impl Strategy<Value = Vec<UserProperty>> {
    proptest::collection::vec((text(), text()), 0..3)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn code(codes: &'static [u8]) -> impl Strategy<Value = u8> {
    proptest::sample::select(codes)
}

fn message_properties() -> impl Strategy<Value = Option<Box<MessageProperties>>> {
    (
        proptest::option::of(any::<bool>()),
        proptest::option::of(any::<u32>()),
        opt_text(),
        opt_text(),
        proptest::option::of(bin()),
        gen_users(),
    )
        .prop_map(
            |(utf8, expiry, content_type, response_topic, data, users)| {
                let m = MessageProperties {
                    payload_is_utf8: utf8,
                    message_expiry: expiry,
                    content_type,
                    response_topic,
                    correlation_data: data,
                    user_properties: users,
                };
                (!m.is_empty()).then(|| Box::new(m))
            },
        )
}

fn will() -> impl Strategy<Value = Will> {
    (
        "[a-z/]{0,6}",
        bin(),
        qos(),
        any::<bool>(),
        any::<u32>(),
        message_properties(),
    )
        .prop_map(|(topic, payload, qos, retain, delay, properties)| {
            // A payload said to be UTF-8 must be (else the CONNECT is refused with 0x99).
            let utf8 = properties
                .as_ref()
                .is_some_and(|m| m.payload_is_utf8 == Some(true));
            let payload = if utf8 {
                Bytes::from(String::from_utf8_lossy(&payload).into_owned())
            } else {
                payload
            };
            Will {
                topic: Bytes::from(topic),
                payload,
                qos,
                retain,
                delay,
                properties,
            }
        })
}

fn connect() -> impl Strategy<Value = Packet> {
    (
        (
            any::<bool>(),
            any::<u16>(),
            text(),
            proptest::option::of(will()),
        ),
        proptest::option::of((text(), proptest::option::of(bin()))),
        (
            any::<u32>(),
            1..=u16::MAX,
            proptest::option::of(1..=u32::MAX),
            any::<u16>(),
            any::<bool>(),
            any::<bool>(),
        ),
        (
            gen_users(),
            proptest::option::of((text(), proptest::option::of(bin()))),
        ),
    )
        .prop_map(
            |((clean, keep_alive, id, will), login, props, (users, auth))| {
                let (se, rm, mps, tam, rri, rpi) = props;
                Packet::Connect(Box::new(Connect {
                    clean_start: clean,
                    keep_alive,
                    client_id: id,
                    will,
                    username: login.as_ref().map(|(u, _)| u.clone()),
                    password: login.and_then(|(_, p)| p),
                    session_expiry: se,
                    receive_maximum: rm,
                    maximum_packet_size: mps,
                    topic_alias_maximum: tam,
                    request_response_information: rri,
                    request_problem_information: rpi,
                    user_properties: users,
                    authentication_method: auth.as_ref().map(|(m, _)| m.clone()),
                    authentication_data: auth.and_then(|(_, d)| d),
                }))
            },
        )
}

fn connack() -> impl Strategy<Value = Packet> {
    let flags = proptest::option::of(any::<bool>());
    (
        (any::<bool>(), code(CONNACK_CODES)),
        (
            proptest::option::of(any::<u32>()),
            proptest::option::of(1..=u16::MAX),
            proptest::option::of(prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce)]),
            flags.clone(),
            proptest::option::of(1..=u32::MAX),
            opt_text(),
            proptest::option::of(any::<u16>()),
            opt_text(),
            gen_users(),
        ),
        (
            flags.clone(),
            flags.clone(),
            flags,
            proptest::option::of(any::<u16>()),
            opt_text(),
            opt_text(),
            opt_text(),
            proptest::option::of(bin()),
        ),
    )
        .prop_map(|((present, code), a, b)| {
            Packet::ConnAck(Box::new(ConnAck {
                session_present: present && code == 0,
                code,
                session_expiry: a.0,
                receive_maximum: a.1,
                maximum_qos: a.2,
                retain_available: a.3,
                maximum_packet_size: a.4,
                assigned_client_id: a.5,
                topic_alias_maximum: a.6,
                reason_string: a.7,
                user_properties: a.8,
                wildcard_subscription_available: b.0,
                subscription_identifiers_available: b.1,
                shared_subscription_available: b.2,
                server_keep_alive: b.3,
                response_information: b.4,
                server_reference: b.5,
                authentication_method: b.6,
                authentication_data: b.7,
            }))
        })
}

fn publish() -> impl Strategy<Value = Packet> {
    (
        (
            any::<bool>(),
            qos(),
            any::<bool>(),
            "[a-z/+#é]{1,8}",
            1..=u16::MAX,
        ),
        proptest::collection::vec(any::<u8>(), 0..40),
        proptest::option::of(any::<u16>()),
        proptest::collection::vec(1..=268_435_455u32, 0..3),
        message_properties(),
    )
        .prop_map(
            |((dup, qos, retain, topic, pkid), payload, alias, ids, props)| {
                let qos0 = qos == QoS::AtMostOnce;
                Packet::Publish(Publish {
                    dup: dup && !qos0,
                    qos,
                    retain,
                    topic: Bytes::from(topic),
                    pkid: if qos0 { 0 } else { pkid },
                    payload: Bytes::from(payload),
                    topic_alias: alias,
                    subscription_ids: ids,
                    properties: props,
                })
            },
        )
}

fn ack(codes: &'static [u8]) -> impl Strategy<Value = Ack> {
    (1..=u16::MAX, code(codes), opt_text(), gen_users()).prop_map(
        |(pkid, code, reason_string, user_properties)| Ack {
            pkid,
            code,
            reason_string,
            user_properties,
        },
    )
}

fn subscribe() -> impl Strategy<Value = Packet> {
    let options = (qos(), any::<bool>(), any::<bool>(), 0..3u8).prop_map(|(qos, nl, rap, rh)| {
        SubscriptionOptions {
            qos,
            no_local: nl,
            retain_as_published: rap,
            retain_handling: rh,
        }
    });
    (
        1..=u16::MAX,
        proptest::collection::vec((text(), options), 1..4),
        proptest::option::of(1..=268_435_455u32),
        gen_users(),
    )
        .prop_map(|(pkid, filters, id, user_properties)| {
            Packet::Subscribe(Subscribe {
                pkid,
                filters,
                id,
                user_properties,
            })
        })
}

fn packet() -> impl Strategy<Value = Packet> {
    prop_oneof![
        connect(),
        connack(),
        publish(),
        ack(PUBACK_CODES).prop_map(Packet::PubAck),
        ack(PUBACK_CODES).prop_map(Packet::PubRec),
        ack(PUBREL_CODES).prop_map(Packet::PubRel),
        ack(PUBREL_CODES).prop_map(Packet::PubComp),
        subscribe(),
        (
            1..=u16::MAX,
            proptest::collection::vec(code(SUBACK_CODES), 1..4),
            opt_text(),
            gen_users()
        )
            .prop_map(|(pkid, codes, reason_string, user_properties)| {
                Packet::SubAck(SubAck {
                    pkid,
                    codes,
                    reason_string,
                    user_properties,
                })
            }),
        (
            1..=u16::MAX,
            proptest::collection::vec(text(), 1..4),
            gen_users()
        )
            .prop_map(|(pkid, filters, user_properties)| {
                Packet::Unsubscribe(Unsubscribe {
                    pkid,
                    filters,
                    user_properties,
                })
            }),
        (
            1..=u16::MAX,
            proptest::collection::vec(code(UNSUBACK_CODES), 1..4),
            opt_text(),
            gen_users()
        )
            .prop_map(|(pkid, codes, reason_string, user_properties)| {
                Packet::UnsubAck(UnsubAck {
                    pkid,
                    codes,
                    reason_string,
                    user_properties,
                })
            }),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        (
            code(DISCONNECT_CODES),
            proptest::option::of(any::<u32>()),
            opt_text(),
            gen_users(),
            opt_text()
        )
            .prop_map(
                |(code, session_expiry, reason_string, users, server_reference)| {
                    Packet::Disconnect(Disconnect {
                        code,
                        session_expiry,
                        reason_string,
                        user_properties: users,
                        server_reference,
                    })
                }
            ),
        (
            code(&[0x00, 0x18, 0x19]),
            opt_text(),
            proptest::option::of(bin()),
            opt_text(),
            gen_users()
        )
            .prop_map(|(code, method, data, reason_string, user_properties)| {
                Packet::Auth(Auth {
                    code,
                    method,
                    data,
                    reason_string,
                    user_properties,
                })
            }),
    ]
}

proptest! {
    #[test]
    fn generated_packets_round_trip(p in packet()) {
        for v in [V311, V5] {
            if let Err(e) = round_trip(&p, v) {
                prop_assert!(false, "{}", e);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        for v in [V311, V5] {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode(&mut buf, v, 1 << 16) {}
            let _ = connect_level(&bytes);
        }
    }
}

//! The session's table tests: every packet type a client sends, every refusal and its reason
//! code, and what the session sends the client.

use super::*;
use crate::access::{Credentials, Role};
use crate::broker::gate::Proof;
use crate::broker::hub::HubLimits;
use crate::broker::packet::{MessageProperties, SubscriptionOptions, Will};
use crate::broker::retained::RetainedLimits;

struct Rig {
    hub: Hub,
    gate: Gate,
    stats: Arc<Stats>,
    limits: SessionLimits,
    _dir: tempfile::TempDir,
}

impl Rig {
    fn new() -> Rig {
        Rig::with(HubLimits::default(), 0)
    }

    fn with(hub: HubLimits, rate: u32) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("credentials.toml");
        let mut creds = Credentials::default();
        creds.add("boiler-1", Role::Device).unwrap();
        creds.save(&path).unwrap();
        let stats = Arc::new(Stats::default());
        Rig {
            hub: Hub::new(hub, stats.clone()),
            gate: Gate::new(true, &path, Vec::new(), rate).unwrap(),
            stats,
            limits: SessionLimits {
                receive_maximum: 4,
                max_packet: 1024,
                max_keep_alive: Some(60),
                refuse_subscriptions: vec![TopicFilter::new("test/nosubscribe").unwrap()],
            },
            _dir: dir,
        }
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            hub: &self.hub,
            gate: &self.gate,
            stats: &self.stats,
            limits: &self.limits,
        }
    }

    fn open_as(
        &self,
        connect: Connect,
        version: Version,
        identity: Identity,
        connection: u64,
    ) -> Result<Opened, Refused> {
        let admitted = Admitted {
            identity,
            proof: Proof::None,
        };
        Session::open(connect, version, admitted, connection, self.ctx())
    }

    fn open(&self, connect: Connect, version: Version) -> Result<Opened, Refused> {
        self.open_as(connect, version, Identity::Anonymous, 1)
    }

    /// The registered device `name`, connected with MQTT 5 under its name.
    fn device(&self, name: &str) -> Session {
        let identity = Identity::Named {
            name: name.into(),
            role: Role::Device,
        };
        self.open_as(connect(name), Version::V5, identity, 1)
            .expect("accepted")
            .session
    }

    /// A connected MQTT 5 (or 3.1.1) client `id`.
    fn client(&self, id: &str, version: Version) -> Session {
        self.open(connect(id), version).expect("accepted").session
    }
}

fn connect(id: &str) -> Connect {
    Connect {
        clean_start: true,
        client_id: id.to_owned(),
        receive_maximum: 65_535,
        request_problem_information: true,
        ..Connect::default()
    }
}

fn publish(topic: &str, qos: QoS, pkid: u16) -> Packet {
    Packet::Publish(Publish {
        qos,
        topic: Bytes::from(topic.to_owned()),
        pkid,
        payload: Bytes::from_static(b"21.5"),
        ..Publish::default()
    })
}

fn subscribe(pkid: u16, filter: &str, options: SubscriptionOptions, id: Option<u32>) -> Packet {
    Packet::Subscribe(Subscribe {
        pkid,
        filters: vec![(filter.to_owned(), options)],
        id,
        user_properties: Vec::new(),
    })
}

fn qos(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        ..SubscriptionOptions::default()
    }
}

/// Handles `packet`, then lets the hub route what was published and fills from the mailbox.
fn step(rig: &Rig, session: &mut Session, packet: Packet) -> (Output, Option<Close>) {
    let now = Instant::now();
    let mut out = Output::default();
    let close = session.handle(packet, rig.ctx(), now, &mut out).err();
    let routed: Vec<Arc<Message>> = out.route.iter().cloned().map(Arc::new).collect();
    rig.hub.route(&routed, now);
    session.fill(rig.ctx(), now, &mut out);
    (out, close)
}

fn ack_code(p: &Packet) -> (&'static str, u16, u8) {
    match p {
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            (p.name(), a.pkid, a.code)
        }
        other => panic!("not an ack: {other:?}"),
    }
}

fn disconnect_code(out: &Output) -> Option<u8> {
    out.send.iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.code),
        _ => None,
    })
}

fn published(out: &Output) -> Vec<&Publish> {
    out.send
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(p),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------- CONNECT

#[test]
fn connect_refusals_and_their_reason_codes() {
    let rig = Rig::new();
    let will = |topic: &str| {
        Some(Will {
            topic: Bytes::from(topic.to_owned()),
            payload: Bytes::from_static(b"offline"),
            ..Will::default()
        })
    };
    // (what, connect, version, identity, expected code)
    let anonymous = Identity::Anonymous;
    let device = Identity::Named {
        name: "boiler-1".into(),
        role: Role::Device,
    };
    let table: Vec<(&str, Connect, Version, Identity, u8)> = vec![
        (
            "3.1.1: persistent session without a client id",
            Connect {
                clean_start: false,
                ..connect("")
            },
            Version::V311,
            anonymous.clone(),
            reason::CLIENT_ID_NOT_VALID,
        ),
        (
            "reserved client id",
            connect("watchpost-internal-x"),
            Version::V5,
            anonymous.clone(),
            reason::CLIENT_ID_NOT_VALID,
        ),
        (
            "wildcard in client id",
            connect("a+b"),
            Version::V311,
            anonymous.clone(),
            reason::CLIENT_ID_NOT_VALID,
        ),
        (
            "anonymous client with a registered name",
            connect("boiler-1"),
            Version::V5,
            anonymous.clone(),
            reason::NOT_AUTHORIZED,
        ),
        (
            "named client with someone else's id",
            connect("pump-2"),
            Version::V5,
            device.clone(),
            reason::NOT_AUTHORIZED,
        ),
        (
            "will on a wildcard topic",
            Connect {
                will: will("a/#"),
                ..connect("c")
            },
            Version::V5,
            anonymous.clone(),
            reason::TOPIC_NAME_INVALID,
        ),
        (
            "will on the gateway's topics",
            Connect {
                will: will("alerts/x"),
                ..connect("c")
            },
            Version::V5,
            anonymous.clone(),
            reason::NOT_AUTHORIZED,
        ),
        (
            "device's will on another device's topic",
            Connect {
                will: will("sensors/pump-2/status"),
                ..connect("boiler-1")
            },
            Version::V311,
            device.clone(),
            reason::NOT_AUTHORIZED,
        ),
        (
            "enhanced authentication",
            Connect {
                authentication_method: Some("SCRAM-SHA-1".into()),
                ..connect("c")
            },
            Version::V5,
            anonymous.clone(),
            reason::BAD_AUTHENTICATION_METHOD,
        ),
    ];
    for (what, connect, version, identity, code) in table {
        let refused = rig
            .open_as(connect, version, identity, 1)
            .err()
            .unwrap_or_else(|| panic!("{what}: accepted"));
        assert_eq!(refused.code, code, "{what}: {}", refused.why);
        assert!(!refused.why.is_empty());
    }
}

#[test]
fn client_ids_are_assigned_as_each_version_asks() {
    let rig = Rig::new();
    let v5 = rig.open(connect(""), Version::V5).unwrap();
    let assigned = v5
        .connack
        .assigned_client_id
        .expect("assigned, and said so");
    assert_eq!(assigned, v5.session.client_id);
    // MQTT 5 accepts an empty id with a session to keep too.
    let kept = Connect {
        clean_start: false,
        ..connect("")
    };
    assert!(rig.open(kept, Version::V5).is_ok());
    let v311 = rig.open(connect(""), Version::V311).unwrap();
    assert!(v311.connack.assigned_client_id.is_none());
    assert!(v311.session.client_id.starts_with("watchpost-auto-"));
    let named = rig
        .open_as(
            connect(""),
            Version::V311,
            Identity::Named {
                name: "boiler-1".into(),
                role: Role::Device,
            },
            1,
        )
        .unwrap();
    assert_eq!(named.session.client_id, "boiler-1");
}

#[test]
fn connack_announces_the_limits() {
    let rig = Rig::new();
    let asked = Connect {
        keep_alive: 120,
        session_expiry: u32::MAX,
        ..connect("c")
    };
    let v5 = rig.open(asked.clone(), Version::V5).unwrap();
    let c = &v5.connack;
    assert_eq!(c.code, reason::SUCCESS);
    assert_eq!(c.server_keep_alive, Some(60));
    assert_eq!(v5.session.keep_alive, 60);
    assert_eq!(c.receive_maximum, Some(4));
    assert_eq!(c.maximum_packet_size, Some(1024));
    assert_eq!(c.topic_alias_maximum, Some(TOPIC_ALIASES));
    assert_eq!(c.session_expiry, Some(86_400), "capped, and said so");
    // 3.1.1 cannot be told: its keep-alive stands.
    let v311 = rig.open(asked, Version::V311).unwrap();
    assert_eq!(v311.session.keep_alive, 120);
    assert_eq!(v311.connack.server_keep_alive, None);
}

#[test]
fn a_kept_session_is_present_on_return_and_resends_what_was_in_flight() {
    let rig = Rig::new();
    let kept = Connect {
        clean_start: false,
        session_expiry: 60,
        ..connect("c")
    };
    let first = rig.open(kept.clone(), Version::V5).unwrap();
    assert!(!first.connack.session_present);
    let mut c = first.session;
    step(&rig, &mut c, subscribe(1, "t", qos(QoS::ExactlyOnce), None));
    let (out, _) = step(&rig, &mut c, publish("t", QoS::AtLeastOnce, 7));
    let sent = published(&out);
    assert_eq!(sent.len(), 1, "its own message back, not acknowledged");
    let pkid = sent[0].pkid;
    c.end(rig.ctx(), Instant::now());
    let again = rig
        .open_as(kept, Version::V5, Identity::Anonymous, 2)
        .unwrap();
    assert!(again.connack.session_present);
    let mut c = again.session;
    let mut out = Output::default();
    c.resend(rig.ctx(), Instant::now(), &mut out);
    let resent = published(&out);
    assert_eq!(resent.len(), 1);
    assert!(resent[0].dup);
    assert_eq!(resent[0].pkid, pkid);
}

// ---------------------------------------------------------------- PUBLISH

#[test]
fn publishes_are_routed_and_acknowledged_by_qos() {
    let rig = Rig::new();
    let mut c = rig.client("c", Version::V5);
    let (out, close) = step(&rig, &mut c, publish("sensors/c/t", QoS::AtMostOnce, 0));
    assert!(close.is_none());
    assert_eq!(out.route.len(), 1);
    assert!(out.acks.is_empty() && out.send.is_empty());
    let (out, _) = step(&rig, &mut c, publish("sensors/c/t", QoS::AtLeastOnce, 1));
    assert_eq!(out.route.len(), 1);
    assert_eq!(ack_code(&out.acks[0]), ("PUBACK", 1, reason::SUCCESS));
    let (out, _) = step(&rig, &mut c, publish("sensors/c/t", QoS::ExactlyOnce, 2));
    assert_eq!(out.route.len(), 1);
    assert_eq!(ack_code(&out.acks[0]), ("PUBREC", 2, reason::SUCCESS));
    // The same QoS 2 message again (DUP): acknowledged, not passed on twice.
    let (out, _) = step(&rig, &mut c, publish("sensors/c/t", QoS::ExactlyOnce, 2));
    assert!(out.route.is_empty());
    assert_eq!(ack_code(&out.send[0]), ("PUBREC", 2, reason::SUCCESS));
    let (out, _) = step(&rig, &mut c, Packet::PubRel(Ack::new(2)));
    assert_eq!(ack_code(&out.send[0]), ("PUBCOMP", 2, reason::SUCCESS));
    let (out, _) = step(&rig, &mut c, Packet::PubRel(Ack::new(2)));
    assert_eq!(
        ack_code(&out.send[0]),
        ("PUBCOMP", 2, reason::PACKET_ID_NOT_FOUND)
    );
    assert!(c.reports_as_device);
}

#[test]
fn refused_publishes_get_their_reason_code_and_go_nowhere() {
    let long = format!("t/{}", "x".repeat(MAX_TOPIC_BYTES));
    let not_utf8 = Packet::Publish(Publish {
        qos: QoS::AtLeastOnce,
        topic: Bytes::from_static(b"t"),
        pkid: 1,
        payload: Bytes::from_static(&[0xff, 0xfe]),
        properties: Some(Box::new(MessageProperties {
            payload_is_utf8: Some(true),
            ..MessageProperties::default()
        })),
        ..Publish::default()
    });
    let table: Vec<(&str, Packet, u8)> = vec![
        (
            "the gateway's topics",
            publish("alerts/x", QoS::AtLeastOnce, 1),
            reason::NOT_AUTHORIZED,
        ),
        (
            "$ topics",
            publish("$SYS/x", QoS::AtLeastOnce, 1),
            reason::NOT_AUTHORIZED,
        ),
        (
            "topic too long",
            publish(&long, QoS::AtLeastOnce, 1),
            reason::TOPIC_NAME_INVALID,
        ),
        (
            "payload not UTF-8 as announced",
            not_utf8,
            reason::PAYLOAD_FORMAT_INVALID,
        ),
    ];
    for (what, packet, code) in table {
        let rig = Rig::new();
        let mut c = rig.client("c", Version::V5);
        let (out, close) = step(&rig, &mut c, packet);
        assert!(close.is_none(), "{what}");
        assert!(out.route.is_empty(), "{what}");
        assert_eq!(ack_code(&out.send[0]), ("PUBACK", 1, code), "{what}");
        // The code alone: some clients cannot read an acknowledgement with properties.
        assert_eq!(encoded_len(&out.send[0], Version::V5), 5, "{what}");
    }
    // A device may publish only under its own name.
    let rig = Rig::new();
    let mut d = rig.device("boiler-1");
    let (out, _) = step(
        &rig,
        &mut d,
        publish("sensors/pump-2/t", QoS::ExactlyOnce, 3),
    );
    assert_eq!(
        ack_code(&out.send[0]),
        ("PUBREC", 3, reason::NOT_AUTHORIZED)
    );
    assert_eq!(Stats::get(&rig.stats.publish_denied), 1);
}

#[test]
fn the_rate_limit_answers_quota_exceeded() {
    let rig = Rig::with(HubLimits::default(), 1);
    let mut c = rig.client("c", Version::V5);
    let codes: Vec<u8> = (1..=20)
        .map(|i| {
            let (out, _) = step(&rig, &mut c, publish("t", QoS::AtLeastOnce, i));
            let ack = out.acks.first().or(out.send.first()).expect("an ack");
            ack_code(ack).2
        })
        .collect();
    assert!(codes.contains(&reason::QUOTA_EXCEEDED), "{codes:?}");
    assert!(Stats::get(&rig.stats.rate_limited) > 0);
}

#[test]
fn a_full_retained_store_refuses_with_quota_exceeded() {
    let limits = HubLimits {
        retained: RetainedLimits {
            messages: 1,
            bytes: 1 << 20,
        },
        ..HubLimits::default()
    };
    let rig = Rig::with(limits, 0);
    let mut c = rig.client("c", Version::V5);
    let retained = |topic: &str, pkid| {
        Packet::Publish(Publish {
            retain: true,
            ..match publish(topic, QoS::AtLeastOnce, pkid) {
                Packet::Publish(p) => p,
                _ => unreachable!(),
            }
        })
    };
    let (out, _) = step(&rig, &mut c, retained("a", 1));
    assert_eq!(ack_code(&out.acks[0]).2, reason::SUCCESS);
    let (out, _) = step(&rig, &mut c, retained("b", 2));
    assert_eq!(ack_code(&out.send[0]).2, reason::QUOTA_EXCEEDED);
    assert_eq!(Stats::get(&rig.stats.retained_refused), 1);
}

#[test]
fn acknowledgements_of_retained_publishes_wait_for_the_database() {
    let rig = Rig::new();
    rig.hub.retained.track_changes();
    let mut c = rig.client("c", Version::V5);
    let with = |retain, qos, topic: &str, pkid| {
        Packet::Publish(Publish {
            retain,
            ..match publish(topic, qos, pkid) {
                Packet::Publish(p) => p,
                _ => unreachable!(),
            }
        })
    };
    // (retain, QoS, the generation its acknowledgement waits for)
    let cases = [
        (false, QoS::AtLeastOnce, 0),
        (true, QoS::AtMostOnce, 0),
        (true, QoS::AtLeastOnce, 2),
        (true, QoS::ExactlyOnce, 3),
    ];
    for (i, (retain, qos, generation)) in cases.into_iter().enumerate() {
        let pkid = i as u16 + 1;
        let (out, _) = step(&rig, &mut c, with(retain, qos, "cfg/a", pkid));
        assert_eq!(out.durable, generation, "retain {retain}, {qos:?}");
        assert_eq!(out.route.len(), 1);
    }
}

#[test]
fn a_refused_qos_2_publish_of_a_311_client_is_completed_by_its_pubrel() {
    let rig = Rig::new();
    let mut c = rig.client("c", Version::V311);
    let (out, _) = step(&rig, &mut c, publish("alerts/x", QoS::ExactlyOnce, 5));
    assert_eq!(ack_code(&out.send[0]).0, "PUBREC");
    let (out, _) = step(&rig, &mut c, Packet::PubRel(Ack::new(5)));
    assert_eq!(ack_code(&out.send[0]), ("PUBCOMP", 5, reason::SUCCESS));
}

#[test]
fn protocol_violations_in_a_publish_disconnect_with_their_reason_code() {
    let with = |f: &dyn Fn(&mut Publish)| {
        let Packet::Publish(mut p) = publish("t", QoS::AtLeastOnce, 1) else {
            unreachable!()
        };
        f(&mut p);
        Packet::Publish(p)
    };
    let table: Vec<(&str, Packet, u8)> = vec![
        (
            "topic alias 0",
            with(&|p| p.topic_alias = Some(0)),
            reason::TOPIC_ALIAS_INVALID,
        ),
        (
            "topic alias above the maximum",
            with(&|p| p.topic_alias = Some(TOPIC_ALIASES + 1)),
            reason::TOPIC_ALIAS_INVALID,
        ),
        (
            "an alias never set",
            with(&|p| {
                p.topic = Bytes::new();
                p.topic_alias = Some(3);
            }),
            reason::TOPIC_ALIAS_INVALID,
        ),
        (
            "an empty topic without alias",
            with(&|p| p.topic = Bytes::new()),
            reason::TOPIC_NAME_INVALID,
        ),
        (
            "a wildcard in the topic",
            with(&|p| p.topic = Bytes::from_static(b"a/+")),
            reason::TOPIC_NAME_INVALID,
        ),
        (
            "a subscription identifier from a client",
            with(&|p| p.subscription_ids = vec![1]),
            reason::PROTOCOL_ERROR,
        ),
    ];
    for (what, packet, code) in table {
        let rig = Rig::new();
        let mut c = rig.client("c", Version::V5);
        let (out, close) = step(&rig, &mut c, packet);
        let close = close.unwrap_or_else(|| panic!("{what}: not closed"));
        assert_eq!(close.code, code, "{what}");
        assert!(!close.clean && close.will, "{what}");
        assert_eq!(disconnect_code(&out), Some(code), "{what}");
    }
    // 3.1.1 has no DISCONNECT from the server: the connection just closes.
    let rig = Rig::new();
    let mut c = rig.client("c", Version::V311);
    let (out, close) = step(&rig, &mut c, publish("a/#", QoS::AtMostOnce, 0));
    assert!(close.is_some());
    assert_eq!(disconnect_code(&out), None);
}

#[test]
fn topic_aliases_of_the_client_are_resolved() {
    let rig = Rig::new();
    let mut c = rig.client("c", Version::V5);
    let aliased = |topic: &'static str, pkid| {
        let Packet::Publish(mut p) = publish(topic, QoS::AtLeastOnce, pkid) else {
            unreachable!()
        };
        p.topic_alias = Some(1);
        Packet::Publish(p)
    };
    let (out, _) = step(&rig, &mut c, aliased("a/b", 1));
    assert_eq!(&out.route[0].topic[..], b"a/b");
    let (out, close) = step(&rig, &mut c, aliased("", 2));
    assert!(close.is_none());
    assert_eq!(&out.route[0].topic[..], b"a/b");
}

#[test]
fn more_than_the_receive_maximum_unacknowledged_disconnects() {
    let rig = Rig::new();
    let mut c = rig.client("c", Version::V5);
    for pkid in 1..=4 {
        let (_, close) = step(&rig, &mut c, publish("t", QoS::ExactlyOnce, pkid));
        assert!(close.is_none());
    }
    let (out, close) = step(&rig, &mut c, publish("t", QoS::ExactlyOnce, 5));
    assert_eq!(close.unwrap().code, reason::RECEIVE_MAXIMUM_EXCEEDED);
    assert_eq!(
        disconnect_code(&out),
        Some(reason::RECEIVE_MAXIMUM_EXCEEDED)
    );
}

#[test]
fn a_311_client_that_never_releases_its_qos_2_publishes_is_closed() {
    let rig = Rig::new();
    let mut c = rig.client("c", Version::V311);
    for pkid in 1..=MAX_PENDING_QOS2_V311 as u16 {
        let (_, close) = step(&rig, &mut c, publish("t", QoS::ExactlyOnce, pkid));
        assert!(close.is_none(), "{pkid}");
    }
    let next = MAX_PENDING_QOS2_V311 as u16 + 1;
    let (out, close) = step(&rig, &mut c, publish("t", QoS::ExactlyOnce, next));
    assert_eq!(close.unwrap().code, reason::RECEIVE_MAXIMUM_EXCEEDED);
    assert_eq!(disconnect_code(&out), None, "3.1.1 has no DISCONNECT");
}

// ---------------------------------------------------------------- SUBSCRIBE, UNSUBSCRIBE

#[test]
fn subscribe_answers_a_code_per_filter() {
    let rig = Rig::new();
    let mut c = rig.client("c", Version::V5);
    let filters = vec![
        ("a/#".to_owned(), qos(QoS::ExactlyOnce)),
        ("a/#/b".to_owned(), qos(QoS::AtMostOnce)),
        ("test/nosubscribe".to_owned(), qos(QoS::AtMostOnce)),
        ("$share//x".to_owned(), qos(QoS::AtMostOnce)),
        ("$share/g/x".to_owned(), qos(QoS::AtLeastOnce)),
    ];
    let (out, close) = step(
        &rig,
        &mut c,
        Packet::Subscribe(Subscribe {
            pkid: 9,
            filters,
            id: None,
            user_properties: Vec::new(),
        }),
    );
    assert!(close.is_none());
    let Packet::SubAck(suback) = &out.send[0] else {
        panic!("{:?}", out.send)
    };
    assert_eq!(suback.pkid, 9);
    assert_eq!(
        suback.codes,
        [
            reason::GRANTED_QOS_2,
            reason::TOPIC_FILTER_INVALID,
            reason::UNSPECIFIED,
            reason::TOPIC_FILTER_INVALID,
            reason::GRANTED_QOS_1,
        ]
    );
    assert!(
        suback
            .reason_string
            .as_ref()
            .is_some_and(|r| r.starts_with("3 of 5"))
    );
}

#[test]
fn a_device_may_subscribe_only_under_its_own_name() {
    let rig = Rig::new();
    let mut d = rig.device("boiler-1");
    let (out, _) = step(
        &rig,
        &mut d,
        subscribe(1, "sensors/#", qos(QoS::AtMostOnce), None),
    );
    let Packet::SubAck(suback) = &out.send[0] else {
        panic!()
    };
    assert_eq!(suback.codes, [reason::NOT_AUTHORIZED]);
    assert_eq!(Stats::get(&rig.stats.subscribe_denied), 1);
    let (out, _) = step(
        &rig,
        &mut d,
        subscribe(2, "sensors/boiler-1/cmd", qos(QoS::AtMostOnce), None),
    );
    let Packet::SubAck(suback) = &out.send[0] else {
        panic!()
    };
    assert_eq!(suback.codes, [reason::SUCCESS]);
}

#[test]
fn no_local_on_a_shared_subscription_is_a_protocol_error() {
    let rig = Rig::new();
    let mut c = rig.client("c", Version::V5);
    let options = SubscriptionOptions {
        no_local: true,
        ..qos(QoS::AtMostOnce)
    };
    let (out, close) = step(&rig, &mut c, subscribe(1, "$share/g/t", options, None));
    assert_eq!(close.unwrap().code, reason::PROTOCOL_ERROR);
    assert_eq!(disconnect_code(&out), Some(reason::PROTOCOL_ERROR));
}

#[test]
fn a_new_subscriber_gets_every_retained_message_whatever_its_queue_bound() {
    let limits = HubLimits {
        queue: crate::broker::hub::QueueLimits {
            messages: 2,
            bytes: 1 << 20,
        },
        retained: RetainedLimits {
            messages: 5,
            bytes: 1 << 20,
        },
        ..HubLimits::default()
    };
    let rig = Rig::with(limits, 0);
    let mut publisher = rig.client("p", Version::V5);
    for i in 0..5 {
        let Packet::Publish(mut p) = publish(&format!("r/{i}"), QoS::AtMostOnce, 0) else {
            unreachable!()
        };
        p.retain = true;
        step(&rig, &mut publisher, Packet::Publish(p));
    }
    let mut c = rig.client("c", Version::V5);
    let (out, _) = step(&rig, &mut c, subscribe(1, "#", qos(QoS::AtMostOnce), None));
    assert_eq!(published(&out).len(), 5, "more than the queue's bound of 2");
    assert_eq!(Stats::get(&rig.stats.queue_dropped), 0);
    // Still bounded: a client that asks again and again without reading is cut off at the
    // queue's bound plus the retained store's.
    let mut quiet = rig.client("q", Version::V5);
    let mut queued = 0;
    for pkid in 1..=3 {
        let mut out = Output::default();
        quiet
            .handle(
                subscribe(pkid, "#", qos(QoS::AtLeastOnce), None),
                rig.ctx(),
                Instant::now(),
                &mut out,
            )
            .unwrap();
        queued = quiet.mailbox().map_or(0, |m| m.lock().queue.len());
    }
    assert_eq!(queued, 2 + 5);
    assert_eq!(Stats::get(&rig.stats.queue_dropped), 3 * 5 - 7);
}

#[test]
fn retained_messages_follow_the_retain_handling() {
    let rig = Rig::new();
    let mut publisher = rig.client("p", Version::V5);
    for (topic, q, pkid) in [
        ("r/0", QoS::AtMostOnce, 0),
        ("r/1", QoS::AtLeastOnce, 1),
        ("r/2", QoS::ExactlyOnce, 2),
    ] {
        let Packet::Publish(mut p) = publish(topic, q, pkid) else {
            unreachable!()
        };
        p.retain = true;
        step(&rig, &mut publisher, Packet::Publish(p));
    }
    // (retain handling, first subscribe gets, same subscribe again gets)
    for (handling, first, again) in [(0, 3, 3), (1, 3, 0), (2, 0, 0)] {
        let mut c = rig.client("c", Version::V5);
        let options = SubscriptionOptions {
            retain_handling: handling,
            ..qos(QoS::ExactlyOnce)
        };
        let (out, _) = step(&rig, &mut c, subscribe(1, "r/+", options, Some(7)));
        assert!(matches!(out.send[0], Packet::SubAck(_)), "SUBACK first");
        let got = published(&out);
        assert_eq!(got.len(), first, "retain handling {handling}");
        if first > 0 {
            let qos: Vec<QoS> = got.iter().map(|p| p.qos).collect();
            assert_eq!(qos, [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce]);
            assert!(got.iter().all(|p| p.retain && p.subscription_ids == [7]));
        }
        let (out, _) = step(&rig, &mut c, subscribe(2, "r/+", options, Some(7)));
        assert_eq!(
            published(&out).len(),
            again,
            "retain handling {handling}, again"
        );
        c.end(rig.ctx(), Instant::now());
    }
    // Shared subscriptions get none.
    let mut c = rig.client("s", Version::V5);
    let (out, _) = step(
        &rig,
        &mut c,
        subscribe(1, "$share/g/r/+", qos(QoS::AtLeastOnce), None),
    );
    assert!(published(&out).is_empty());
}

#[test]
fn unsubscribe_says_whether_there_was_a_subscription() {
    let rig = Rig::new();
    let mut c = rig.client("c", Version::V5);
    step(&rig, &mut c, subscribe(1, "t", qos(QoS::AtMostOnce), None));
    let (out, _) = step(
        &rig,
        &mut c,
        Packet::Unsubscribe(Unsubscribe {
            pkid: 2,
            filters: vec!["t".into(), "u".into()],
            user_properties: Vec::new(),
        }),
    );
    let Packet::UnsubAck(unsuback) = &out.send[0] else {
        panic!()
    };
    assert_eq!(unsuback.pkid, 2);
    assert_eq!(
        unsuback.codes,
        [reason::SUCCESS, reason::NO_SUBSCRIPTION_EXISTED]
    );
}

// ---------------------------------------------------------------- to the client

#[test]
fn outgoing_qos_1_and_2_exchanges_complete() {
    let rig = Rig::new();
    let mut c = rig.client("c", Version::V5);
    step(&rig, &mut c, subscribe(1, "t", qos(QoS::ExactlyOnce), None));
    let (out, _) = step(&rig, &mut c, publish("t", QoS::AtLeastOnce, 10));
    let p1 = published(&out)[0].pkid;
    let (out, _) = step(&rig, &mut c, publish("t", QoS::ExactlyOnce, 11));
    let p2 = published(&out)[0].pkid;
    assert_ne!(p1, p2);
    let inflight = || c_inflight(&rig, "c");
    assert_eq!(inflight(), 2);
    step(&rig, &mut c, Packet::PubAck(Ack::new(p1)));
    assert_eq!(inflight(), 1);
    let (out, _) = step(&rig, &mut c, Packet::PubRec(Ack::new(p2)));
    assert_eq!(ack_code(&out.send[0]), ("PUBREL", p2, reason::SUCCESS));
    assert_eq!(inflight(), 1, "until PUBCOMP");
    step(&rig, &mut c, Packet::PubComp(Ack::new(p2)));
    assert_eq!(inflight(), 0);
    let (out, _) = step(&rig, &mut c, Packet::PubRec(Ack::new(999)));
    assert_eq!(
        ack_code(&out.send[0]),
        ("PUBREL", 999, reason::PACKET_ID_NOT_FOUND)
    );
}

fn c_inflight(rig: &Rig, client: &str) -> usize {
    rig.hub.inflight_of(client)
}

#[test]
fn the_clients_receive_maximum_holds_back_qos_1_but_not_qos_0() {
    let rig = Rig::new();
    let asked = Connect {
        receive_maximum: 2,
        ..connect("c")
    };
    let mut c = rig.open(asked, Version::V5).unwrap().session;
    step(&rig, &mut c, subscribe(1, "t", qos(QoS::AtLeastOnce), None));
    let mut p = rig.client("p", Version::V5);
    let mut sent = Vec::new();
    for pkid in 1..=3 {
        step(&rig, &mut p, publish("t", QoS::AtLeastOnce, pkid));
        let mut out = Output::default();
        c.fill(rig.ctx(), Instant::now(), &mut out);
        sent.extend(published(&out).into_iter().map(|p| p.pkid));
    }
    assert_eq!(sent.len(), 2, "the third waits");
    step(&rig, &mut p, publish("t", QoS::AtMostOnce, 0));
    let mut out = Output::default();
    c.fill(rig.ctx(), Instant::now(), &mut out);
    assert!(
        published(&out).is_empty(),
        "QoS 0 queued behind the waiting one"
    );
    let (out, _) = step(&rig, &mut c, Packet::PubAck(Ack::new(sent[0])));
    assert_eq!(
        published(&out).len(),
        2,
        "room: the third, then the QoS 0 one"
    );
}

#[test]
fn messages_too_large_for_the_client_are_dropped_and_counted() {
    let rig = Rig::new();
    let asked = Connect {
        maximum_packet_size: Some(20),
        ..connect("c")
    };
    let mut c = rig.open(asked, Version::V5).unwrap().session;
    step(&rig, &mut c, subscribe(1, "t", qos(QoS::AtMostOnce), None));
    let (out, _) = step(&rig, &mut c, publish("t", QoS::AtMostOnce, 0));
    assert_eq!(published(&out).len(), 1, "small enough");
    let Packet::Publish(mut big) = publish("t", QoS::AtMostOnce, 0) else {
        unreachable!()
    };
    big.payload = Bytes::from(vec![b'.'; 64]);
    let (out, _) = step(&rig, &mut c, Packet::Publish(big));
    assert!(published(&out).is_empty());
    assert_eq!(Stats::get(&rig.stats.too_large_for_client), 1);
}

/// Found by the `session` property tests: a message sent by topic alias (a few bytes) was
/// resent after a reconnect with its whole topic, as aliases do not outlive a connection, and
/// so larger than the client's Maximum Packet Size. It is discarded as if delivered, as a
/// message too large is when first sent.
#[test]
fn a_resend_too_large_for_the_client_is_dropped_and_counted() {
    let rig = Rig::new();
    let kept = Connect {
        clean_start: false,
        session_expiry: 60,
        ..connect("c")
    };
    let mut c = rig.open(kept.clone(), Version::V5).unwrap().session;
    step(&rig, &mut c, subscribe(1, "t", qos(QoS::AtLeastOnce), None));
    let Packet::Publish(mut big) = publish("t", QoS::AtLeastOnce, 2) else {
        unreachable!()
    };
    big.payload = Bytes::from(vec![b'.'; 64]);
    let (out, _) = step(&rig, &mut c, Packet::Publish(big));
    assert_eq!(published(&out).len(), 1, "in flight, not acknowledged");
    c.end(rig.ctx(), Instant::now());
    let smaller = Connect {
        maximum_packet_size: Some(40),
        ..kept
    };
    let mut c = rig
        .open_as(smaller, Version::V5, Identity::Anonymous, 2)
        .unwrap()
        .session;
    let mut out = Output::default();
    c.resend(rig.ctx(), Instant::now(), &mut out);
    assert!(out.send.is_empty(), "{:?}", out.send);
    assert_eq!(Stats::get(&rig.stats.too_large_for_client), 1);
    assert_eq!(rig.hub.inflight_of("c"), 0, "as if delivered");
}

/// Found by the `session` property tests: a message too large for the client set a topic
/// alias as it was discarded, and the next message on its topic went by that alias alone,
/// which the client had never been told.
#[test]
fn a_message_too_large_sets_no_topic_alias() {
    let rig = Rig::new();
    let asked = Connect {
        maximum_packet_size: Some(40),
        topic_alias_maximum: 4,
        ..connect("c")
    };
    let mut c = rig.open(asked, Version::V5).unwrap().session;
    step(
        &rig,
        &mut c,
        subscribe(1, "t/x", qos(QoS::AtMostOnce), None),
    );
    let Packet::Publish(mut big) = publish("t/x", QoS::AtMostOnce, 0) else {
        unreachable!()
    };
    big.payload = Bytes::from(vec![b'.'; 64]);
    let (out, _) = step(&rig, &mut c, Packet::Publish(big));
    assert!(published(&out).is_empty(), "too large");
    let (out, _) = step(&rig, &mut c, publish("t/x", QoS::AtMostOnce, 0));
    let sent = published(&out);
    assert_eq!(sent.len(), 1);
    assert_eq!(
        &sent[0].topic[..],
        b"t/x",
        "the topic, with the alias it sets"
    );
    assert_eq!(sent[0].topic_alias, Some(1));
}

#[test]
fn outgoing_topic_aliases_and_properties() {
    let rig = Rig::new();
    let asked = Connect {
        topic_alias_maximum: 1,
        ..connect("c")
    };
    let mut c = rig.open(asked, Version::V5).unwrap().session;
    step(
        &rig,
        &mut c,
        subscribe(1, "#", qos(QoS::AtMostOnce), Some(5)),
    );
    let props = MessageProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("a".into(), "2".into())],
        message_expiry: Some(60),
        response_topic: Some("reply".into()),
        correlation_data: Some(Bytes::from_static(b"334")),
        payload_is_utf8: Some(true),
    };
    let mut topics = Vec::new();
    for topic in ["t", "t", "u"] {
        let Packet::Publish(mut p) = publish(topic, QoS::AtMostOnce, 0) else {
            unreachable!()
        };
        p.properties = Some(Box::new(props.clone()));
        let (out, _) = step(&rig, &mut c, Packet::Publish(p));
        let sent = published(&out)[0].clone();
        let got = sent.properties.clone().expect("properties passed through");
        assert_eq!(got.content_type, props.content_type);
        assert_eq!(got.user_properties, props.user_properties);
        assert_eq!(got.correlation_data, props.correlation_data);
        assert!(got.message_expiry.is_some_and(|s| s <= 60));
        assert_eq!(sent.subscription_ids, [5]);
        topics.push((
            String::from_utf8_lossy(&sent.topic).into_owned(),
            sent.topic_alias,
        ));
    }
    assert_eq!(
        topics,
        [
            ("t".to_owned(), Some(1)),
            (String::new(), Some(1)),
            ("u".to_owned(), None),
        ]
    );
}

// ---------------------------------------------------------------- the rest

#[test]
fn pingreq_disconnect_and_packets_a_client_may_not_send() {
    let rig = Rig::new();
    let mut c = rig.client("c", Version::V5);
    let (out, close) = step(&rig, &mut c, Packet::PingReq);
    assert!(close.is_none());
    assert_eq!(out.send, [Packet::PingResp]);

    let table: Vec<(&str, Packet)> = vec![
        ("CONNECT", Packet::Connect(Box::new(connect("c")))),
        ("AUTH", Packet::Auth(Default::default())),
        ("CONNACK", Packet::ConnAck(Box::default())),
        ("SUBACK", Packet::SubAck(SubAck::default())),
        ("UNSUBACK", Packet::UnsubAck(UnsubAck::default())),
        ("PINGRESP", Packet::PingResp),
    ];
    for (what, packet) in table {
        let rig = Rig::new();
        let mut c = rig.client("c", Version::V5);
        let (out, close) = step(&rig, &mut c, packet);
        assert_eq!(close.expect(what).code, reason::PROTOCOL_ERROR, "{what}");
        assert_eq!(
            disconnect_code(&out),
            Some(reason::PROTOCOL_ERROR),
            "{what}"
        );
    }
}

#[test]
fn disconnect_ends_cleanly_with_or_without_the_will() {
    let rig = Rig::new();
    let mut c = rig.client("c", Version::V5);
    let (_, close) = step(&rig, &mut c, Packet::Disconnect(Disconnect::default()));
    let close = close.unwrap();
    assert!(close.clean && !close.will);
    let mut c = rig.client("d", Version::V5);
    let with_will = Disconnect {
        code: reason::DISCONNECT_WITH_WILL,
        ..Disconnect::default()
    };
    let (_, close) = step(&rig, &mut c, Packet::Disconnect(with_will));
    assert!(close.unwrap().will);
    // A session expiry at DISCONNECT after 0 at CONNECT is a protocol error.
    let mut c = rig.client("e", Version::V5);
    let late = Disconnect {
        session_expiry: Some(30),
        ..Disconnect::default()
    };
    let (out, close) = step(&rig, &mut c, Packet::Disconnect(late));
    assert_eq!(close.unwrap().code, reason::PROTOCOL_ERROR);
    assert_eq!(disconnect_code(&out), Some(reason::PROTOCOL_ERROR));
    // Otherwise it changes how long the session is kept.
    let kept = Connect {
        session_expiry: 1,
        ..connect("f")
    };
    let mut c = rig.open(kept, Version::V5).unwrap().session;
    let longer = Disconnect {
        session_expiry: Some(5),
        ..Disconnect::default()
    };
    step(&rig, &mut c, Packet::Disconnect(longer));
    assert_eq!(c.expiry(), 5);
}

#[test]
fn the_will_carries_its_properties_and_delay() {
    let rig = Rig::new();
    let asked = Connect {
        will: Some(Will {
            topic: Bytes::from_static(b"w"),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: true,
            delay: 3,
            properties: Some(Box::new(MessageProperties {
                user_properties: vec![("a".into(), "2".into())],
                ..MessageProperties::default()
            })),
        }),
        ..connect("c")
    };
    let mut c = rig.open(asked, Version::V5).unwrap().session;
    let (will, delay) = c.last_will(rig.ctx(), Instant::now()).expect("a will");
    assert_eq!(delay, 3);
    assert_eq!(&will.payload[..], b"gone");
    assert!(will.retain);
    assert_eq!(will.properties.unwrap().user_properties.len(), 1);
    assert!(
        c.last_will(rig.ctx(), Instant::now()).is_none(),
        "taken once"
    );
}

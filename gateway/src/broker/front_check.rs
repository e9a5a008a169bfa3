//! The broker's packet front under arbitrary bytes: the codec ([`packet`](fn@packet)), and one
//! client's session driven by what a client could send ([`session`]), each checked against the
//! promises of their module docs and the rules of MQTT a server must keep.
//!
//! For the fuzz targets `packet` and `session` (`fuzz/`) and the property tests
//! (`tests/properties/front.rs`), which share these checks as the other targets share
//! `tests/properties/check.rs`. The session is the broker's own business; this module is the
//! one door to it from outside the crate, and not part of the gateway's interface (hidden from
//! its documentation). Each function panics, naming the property and the packet, when a
//! property does not hold; a panic of the code under test is a failure too.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use super::gate::{Admitted, Gate, Proof};
use super::hub::{Hub, HubLimits, Message, QueueLimits};
use super::packet::{
    self, Ack, ConnAck, Connect, DecodeError, Disconnect, Packet, Publish, QoS, SubAck, Subscribe,
    SubscriptionOptions, UnsubAck, Unsubscribe, Version, Will, reason,
};
use super::retained::RetainedLimits;
use super::session::{Close, Ctx, MAX_TOPIC_BYTES, Output, Session, SessionLimits};
use crate::access::{Identity, Role};
use crate::sources::{Payload, Source};
use crate::stats::Stats;
use crate::topic::TopicFilter;

// ---------------------------------------------------------------------------------------------
// The codec.

/// The largest packet [`packet`](fn@packet) decodes with, by bits 1-2 of its first byte: the
/// broker's default, two that inputs reach, and the most MQTT can say.
const PACKET_LIMITS: [usize; 4] = [64 * 1024, 16, 300, 268_435_455 + 5];
/// How many bytes arrive at a time in the second reading, by bits 3-5 of the first byte.
const CHUNKS: [usize; 8] = [1, 2, 3, 5, 8, 13, 100, usize::MAX];

/// Decodes a byte stream the way a connection does, and checks what the codec promises.
///
/// The first byte is the mode: bit 0 the version (3.1.1, 5), bits 1-2 the largest packet
/// accepted ([`PACKET_LIMITS`]), bits 3-5 how many bytes arrive at a time in a second reading
/// of the same stream ([`CHUNKS`]). The rest is the stream, read packet by packet until it
/// runs out or an error ends it. Properties:
///
/// - `decode` consumes nothing when it answers "more bytes" (`Ok(None)`);
/// - the packets and the error are the same whether the stream arrives at once or in pieces;
/// - every packet re-encodes (`encode`) to exactly `encoded_len` bytes, never more than it
///   was read from; every proper prefix of those bytes is "more bytes", and the whole decodes
///   to an equal packet. The one exception: a 3.1.1 DISCONNECT, which the server never
///   sends, encodes to nothing (`encode`'s doc);
/// - a packet read as 3.1.1 carries nothing MQTT 5 only (no properties, no reason codes but
///   CONNACK's and SUBACK's, as the `packet` module doc says);
/// - an error's reason code is a failure (0x80 or above), it has a message, and the CONNACK
///   that refuses a CONNECT for it and the DISCONNECT that closes a connection for it later
///   (`DecodeError::disconnect_code`) are packets MQTT 5 can read;
/// - `connect_level` gives the same answer whether asked as bytes arrive or once, and it is
///   the CONNECT's own level when the stream starts with a CONNECT that decodes.
pub fn packet(input: &[u8]) {
    let Some((&mode, stream)) = input.split_first() else {
        return;
    };
    let version = if mode & 1 == 0 {
        Version::V311
    } else {
        Version::V5
    };
    let max = PACKET_LIMITS[usize::from(mode >> 1 & 3)];
    let chunk = CHUNKS[usize::from(mode >> 3 & 7)];

    let mut buf = BytesMut::from(stream);
    let mut whole = Read::default();
    if !whole.read(&mut buf, version, max) {
        assert!(
            stream.ends_with(&buf),
            "decode changed the bytes it left in the buffer"
        );
    }
    for (p, size) in &whole.packets {
        round_trip(p, version, *size, max);
        if !version.is_v5() {
            assert_eq!(
                *p,
                as_v311(p),
                "a packet read as 3.1.1 carries something only MQTT 5 has"
            );
        }
    }
    if let Some(e) = &whole.error {
        check_error(e);
    }

    let mut buf = BytesMut::new();
    let mut pieces = Read::default();
    for piece in stream.chunks(chunk) {
        buf.extend_from_slice(piece);
        if pieces.read(&mut buf, version, max) {
            break;
        }
    }
    assert_eq!(
        (&pieces.packets, &pieces.error),
        (&whole.packets, &whole.error),
        "read {chunk} bytes at a time, the stream gives other packets than read at once"
    );
    assert_eq!(
        pieces.left, whole.left,
        "read {chunk} bytes at a time, the stream leaves other bytes over"
    );

    let once = packet::connect_level(stream);
    let as_they_come = (1..=stream.len())
        .map(|n| packet::connect_level(&stream[..n]))
        .find(|answer| !matches!(answer, Ok(None)))
        .unwrap_or(Ok(None));
    assert_eq!(
        as_they_come, once,
        "connect_level answers otherwise once more bytes have come"
    );
    if let Some((Packet::Connect(_), _)) = whole.packets.first() {
        let level = if version.is_v5() { 5 } else { 4 };
        assert_eq!(
            once,
            Ok(Some(level)),
            "a stream that starts with a CONNECT of level {level}: connect_level says otherwise"
        );
    }
}

/// What reading a stream gave.
#[derive(Default)]
struct Read {
    /// Each packet and the bytes it was read from.
    packets: Vec<(Packet, usize)>,
    /// The error that ended the reading.
    error: Option<DecodeError>,
    /// Bytes left over (an incomplete packet) when no error ended it.
    left: usize,
}

impl Read {
    /// Decodes packets from `buf` until it holds no whole one or an error comes; true if an
    /// error came.
    fn read(&mut self, buf: &mut BytesMut, version: Version, max: usize) -> bool {
        loop {
            let before = buf.len();
            match packet::decode(buf, version, max) {
                Ok(None) => {
                    assert_eq!(buf.len(), before, "decode consumed bytes and said Ok(None)");
                    self.left = before;
                    return false;
                }
                Ok(Some(p)) => {
                    let size = before - buf.len();
                    assert!(size >= 2, "{} read from {size} bytes", p.name());
                    self.packets.push((p, size));
                }
                Err(e) => {
                    // How much an error consumed is unspecified (the connection closes).
                    self.error = Some(e);
                    self.left = 0;
                    return true;
                }
            }
        }
    }
}

/// An error's reason code says failure, and it has a message; the CONNACK that refuses a
/// CONNECT for it, and the DISCONNECT that closes a connection for it later, are packets MQTT 5
/// can read (their reason codes are ones these packets have).
fn check_error(e: &DecodeError) {
    assert!(
        e.code() >= 0x80 && e.disconnect_code() >= 0x80,
        "decode error {e:?} has reason code {:#04x} ({:#04x} in a DISCONNECT), not a failure",
        e.code(),
        e.disconnect_code()
    );
    let why = e.to_string();
    assert!(!why.is_empty(), "decode error {e:?} says nothing");
    let connack = Packet::ConnAck(Box::new(ConnAck {
        code: e.code(),
        reason_string: Some(why.clone()),
        ..ConnAck::default()
    }));
    let disconnect = Packet::Disconnect(Disconnect::new(e.disconnect_code(), &why));
    for p in [connack, disconnect] {
        let back = decode_exactly(&encoded(&p, Version::V5), Version::V5, usize::MAX);
        assert_eq!(
            back,
            p,
            "the {} for decode error {e:?} reads back otherwise",
            p.name()
        );
    }
}

/// `p` as written for `v`, checked against `encoded_len`.
fn encoded(p: &Packet, v: Version) -> BytesMut {
    let mut bytes = BytesMut::new();
    packet::encode(p, v, &mut bytes);
    assert_eq!(
        bytes.len(),
        packet::encoded_len(p, v),
        "{} for {v:?}: encoded_len disagrees with the bytes written: {p:?}",
        p.name()
    );
    bytes
}

/// Decodes `bytes`, given one at a time: every proper prefix is "more bytes" and consumes
/// nothing, and the whole is one packet with nothing left over.
fn decode_exactly(bytes: &[u8], v: Version, max: usize) -> Packet {
    let mut buf = BytesMut::with_capacity(bytes.len());
    let (last, head) = bytes.split_last().expect("not empty");
    for (i, &b) in head.iter().enumerate() {
        buf.put_u8(b);
        match packet::decode(&mut buf, v, max) {
            Ok(None) => assert_eq!(buf.len(), i + 1, "decode consumed a prefix"),
            other => panic!(
                "{v:?}: the first {} of {} bytes of a packet decode as {other:?}: {bytes:02x?}",
                i + 1,
                bytes.len()
            ),
        }
    }
    buf.put_u8(*last);
    match packet::decode(&mut buf, v, max) {
        Ok(Some(p)) if buf.is_empty() => p,
        other => panic!(
            "{v:?}: encoded packet decodes as {other:?}, {} bytes left: {bytes:02x?}",
            buf.len()
        ),
    }
}

/// A packet that decoded re-encodes to no more bytes, which decode to the same packet.
fn round_trip(p: &Packet, v: Version, size: usize, max: usize) {
    let bytes = encoded(p, v);
    if bytes.is_empty() {
        assert!(
            !v.is_v5() && matches!(p, Packet::Disconnect(_)),
            "{} read as {v:?} encodes to nothing",
            p.name()
        );
        return;
    }
    assert!(
        bytes.len() <= size,
        "{} read from {size} bytes re-encodes to {} bytes: {p:?}",
        p.name(),
        bytes.len()
    );
    let back = decode_exactly(&bytes, v, max);
    assert_eq!(
        back, *p,
        "{v:?}: a decoded packet does not survive a round trip"
    );
}

/// What of `p` MQTT 3.1.1 can say: what a 3.1.1 reader gets back once `p` is written for
/// 3.1.1 (a CONNACK's reason code aside: [`connack_v311`]). Properties, will delay, subscription
/// identifiers, topic aliases and the reason codes of acks and UNSUBACK are MQTT 5's; a SUBACK
/// refusal is 0x80 in 3.1.1.
fn as_v311(p: &Packet) -> Packet {
    match p {
        Packet::Connect(c) => Packet::Connect(Box::new(Connect {
            clean_start: c.clean_start,
            keep_alive: c.keep_alive,
            client_id: c.client_id.clone(),
            will: c.will.as_ref().map(|w| Will {
                topic: w.topic.clone(),
                payload: w.payload.clone(),
                qos: w.qos,
                retain: w.retain,
                ..Will::default()
            }),
            username: c.username.clone(),
            password: c.password.clone(),
            receive_maximum: u16::MAX,
            request_problem_information: true,
            ..Connect::default()
        })),
        Packet::ConnAck(c) => Packet::ConnAck(Box::new(ConnAck {
            session_present: c.session_present,
            code: c.code,
            ..ConnAck::default()
        })),
        Packet::Publish(x) => Packet::Publish(Publish {
            dup: x.dup,
            qos: x.qos,
            retain: x.retain,
            topic: x.topic.clone(),
            pkid: x.pkid,
            payload: x.payload.clone(),
            ..Publish::default()
        }),
        Packet::PubAck(a) => Packet::PubAck(Ack::new(a.pkid)),
        Packet::PubRec(a) => Packet::PubRec(Ack::new(a.pkid)),
        Packet::PubRel(a) => Packet::PubRel(Ack::new(a.pkid)),
        Packet::PubComp(a) => Packet::PubComp(Ack::new(a.pkid)),
        Packet::Subscribe(s) => Packet::Subscribe(Subscribe {
            pkid: s.pkid,
            filters: s
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
        Packet::SubAck(s) => Packet::SubAck(SubAck {
            pkid: s.pkid,
            codes: s
                .codes
                .iter()
                .map(|&c| c.min(reason::UNSPECIFIED))
                .collect(),
            ..SubAck::default()
        }),
        Packet::Unsubscribe(u) => Packet::Unsubscribe(Unsubscribe {
            pkid: u.pkid,
            filters: u.filters.clone(),
            ..Unsubscribe::default()
        }),
        Packet::UnsubAck(u) => Packet::UnsubAck(UnsubAck {
            pkid: u.pkid,
            ..UnsubAck::default()
        }),
        Packet::Disconnect(_) => Packet::Disconnect(Disconnect::default()),
        Packet::PingReq | Packet::PingResp | Packet::Auth(_) => p.clone(),
    }
}

/// The CONNACK reason code a 3.1.1 client reads for `code`: 3.1.1 has six return codes, so
/// the other refusals come back as one of them.
fn connack_v311(code: u8) -> u8 {
    match code {
        reason::SUCCESS
        | reason::UNSUPPORTED_PROTOCOL_VERSION
        | reason::CLIENT_ID_NOT_VALID
        | reason::BAD_USER_NAME_OR_PASSWORD
        | reason::NOT_AUTHORIZED => code,
        reason::BANNED => reason::NOT_AUTHORIZED,
        _ => reason::SERVER_UNAVAILABLE,
    }
}

// ---------------------------------------------------------------------------------------------
// One session.

/// The session's bounds, small so that inputs reach them.
fn session_limits() -> SessionLimits {
    SessionLimits {
        receive_maximum: 4,
        max_packet: 1024,
        max_keep_alive: Some(60),
        refuse_subscriptions: vec![TopicFilter::new("test/nosubscribe").expect("a filter")],
    }
}

/// The hub's bounds, small so that inputs reach them.
const HUB_LIMITS: HubLimits = HubLimits {
    queue: QueueLimits {
        messages: 8,
        bytes: 2048,
    },
    max_session_expiry: 3600,
    retained: RetainedLimits {
        messages: 4,
        bytes: 1024,
    },
};

/// Time between two rounds.
const ROUND: Duration = Duration::from_secs(1);
/// Packets handled per round, by bits 5-6 of the mode (256 is the connection's batch).
const PER_ROUND: [usize; 4] = [1, 2, 4, 256];

/// The registered device and operator of [`gates`].
const DEVICE: &str = "boiler-1";
const OPERATOR: &str = "panel";

/// The credentials file of [`gates`]: the secrets are never checked (the session gets its
/// client's identity from the gate), so any well-formed argon2 hash does.
const CREDENTIALS: &str = r#"
[client.boiler-1]
role = "device"
secret = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
created = "2026-01-01T00:00:00Z"

[client.panel]
role = "operator"
secret = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
created = "2026-01-01T00:00:00Z"
"#;

/// Two gates that let anonymous clients in, with a device and an operator registered and the
/// Tasmota source's topics: without a rate limit, and with 2 publishes a second. Made once per
/// process (each gate has a thread); they keep no state a session check changes but the rate
/// limit of the registered names.
fn gates() -> &'static [Gate; 2] {
    static GATES: OnceLock<[Gate; 2]> = OnceLock::new();
    GATES.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!(
            "watchpost-front-check-{}-{:x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        let path = dir.join("credentials.toml");
        std::fs::write(&path, CREDENTIALS).expect("a temporary credentials file");
        let tasmota = Source::new("tasmota", "tele/{device}/SENSOR", Payload::Json, None, None)
            .expect("a valid source");
        let gate = |rate| {
            Gate::new(true, &path, vec![tasmota.clone()], rate).expect("the credentials load")
        };
        let gates = [gate(0), gate(2)];
        // The gates have read the file: it is not needed any more.
        let _ = std::fs::remove_dir_all(&dir);
        gates
    })
}

/// One input's broker: a hub of its own and a shared gate.
struct Rig {
    hub: Hub,
    gate: &'static Gate,
    stats: Arc<Stats>,
    limits: SessionLimits,
}

impl Rig {
    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            hub: &self.hub,
            gate: self.gate,
            stats: &self.stats,
            limits: &self.limits,
        }
    }

    /// Routes messages as the injector does: to the hub only when someone may listen.
    fn route(&self, messages: &[Message], now: Instant) {
        if self.hub.listening() && !messages.is_empty() {
            let shared: Vec<Arc<Message>> = messages.iter().cloned().map(Arc::new).collect();
            self.hub.route(&shared, now);
        }
    }
}

/// What the client is, as the session sees it: from its CONNECT and its identity.
struct Client {
    version: Version,
    identity: Identity,
    /// The largest packet it accepts.
    max_packet: usize,
    /// QoS 1 and 2 publishes it may have in flight from the broker.
    receive_maximum: usize,
    /// Topic aliases it accepts from the broker (MQTT 5).
    aliases: u16,
    /// The topic aliases the broker has set on this connection, as the client knows them.
    known_aliases: RefCell<Vec<(u16, Bytes)>>,
}

/// A CONNECT from three bytes, for inputs that do not spell one out (`session`'s mode bit 1
/// clear): clean start, will, session expiry, problem information, receive maximum, maximum
/// packet size, topic aliases and the client id.
fn synthetic_connect(a: u8, b: u8) -> Connect {
    let will = match a >> 1 & 3 {
        0 => None,
        qos => Some(Will {
            topic: format!("sensors/{DEVICE}/status").into(),
            payload: "offline".into(),
            qos: QoS::from_u8(qos - 1).expect("0 to 2"),
            retain: a & 8 != 0,
            delay: if a & 16 != 0 { 5 } else { 0 },
            properties: None,
        }),
    };
    Connect {
        clean_start: a & 1 == 0,
        keep_alive: 30,
        client_id: ["", "c-7", DEVICE, "panel@2"][usize::from(b >> 6)].to_owned(),
        will,
        session_expiry: [0, 10, 3600, u32::MAX][usize::from(a >> 5 & 3)],
        receive_maximum: [u16::MAX, 1, 2, 3][usize::from(b & 3)],
        maximum_packet_size: [None, Some(24), Some(64), Some(300)][usize::from(b >> 2 & 3)],
        topic_alias_maximum: [0, 1, 2, 64][usize::from(b >> 4 & 3)],
        request_problem_information: a & 0x80 == 0,
        ..Connect::default()
    }
}

/// Drives one client's session from arbitrary bytes and checks every packet it answers with
/// and every message it passes on.
///
/// The first byte is the mode: bit 0 the version (3.1.1, 5) of a synthetic CONNECT; bit 1 set:
/// the input spells its CONNECT out (its level chooses the version, as on a listener); bits 2-3
/// who the client is (anonymous twice, the registered device, the operator); bit 4 a publish
/// rate limit; bits 5-6 packets per round ([`PER_ROUND`]); bit 7 a reconnect to the session
/// at the end. A synthetic CONNECT takes two bytes more ([`synthetic_connect`]). Then come the
/// client's packets, decoded as the connection decodes them, handed to the session
/// (`Session::handle`) a round at a time, with the hub routing what was published and
/// `Session::fill` sending what waits between rounds, a second apart. Properties:
///
/// - every packet for the client (the CONNACK, `Output::send`, `Output::acks`, what `fill`
///   and `resend` give), as the connection queues it (`packet::fitted`), encodes and decodes
///   back at the session's version to itself, or what 3.1.1 can say of it; no DISCONNECT is
///   meant for a 3.1.1 client; it fits the client's Maximum Packet Size, unless it would not
///   even without its reason string and user properties (and a publish always does); a
///   publish uses only topic aliases the client allows and has a packet id iff its QoS is
///   above 0, and no more QoS 1 and 2 publishes than its Receive Maximum are in flight;
/// - every packet is answered as MQTT says: PINGREQ by PINGRESP, SUBSCRIBE by one SUBACK of its
///   packet id with one code per filter (granting at most the QoS asked), UNSUBSCRIBE by one
///   UNSUBACK likewise, a QoS 1 or 2 PUBLISH by one PUBACK or PUBREC of its packet id (in
///   `acks` if it was passed on, else in `send` with a failure code), PUBREL by PUBCOMP, PUBREC
///   by PUBREL or nothing; a server's packet closes the session;
/// - `Output::unacknowledged` counts the PUBACKs in `acks`, which hold only PUBACKs and
///   PUBRECs;
/// - no message passed on (`Output::route`, the will) has a topic that is not a valid topic
///   name (empty, a wildcard, U+0000), is longer than the broker allows, or is the gateway's
///   own (`$...`, `alerts/...`); the operator passes nothing on, the device only its own
///   topics;
/// - a session that closes says why: to an MQTT 5 client that broke the protocol with a
///   DISCONNECT of a failure code, as the last packet; then nothing more is handled;
/// - a client that comes back (clean start off) finds its session iff it kept one, and gets
///   its in-flight publishes again with DUP set; once every session's expiry has passed, the
///   hub holds none.
pub fn session(input: &[u8]) {
    let Some((&mode, mut rest)) = input.split_first() else {
        return;
    };
    let limits = session_limits();
    let (connect, version) = if mode & 2 == 0 {
        let [a, b, more @ ..] = rest else {
            return;
        };
        rest = more;
        let version = if mode & 1 == 0 {
            Version::V311
        } else {
            Version::V5
        };
        (synthetic_connect(*a, *b), version)
    } else {
        // As the connection's handshake: the level, then the CONNECT at that version.
        let version = match packet::connect_level(rest) {
            Ok(Some(4)) => Version::V311,
            Ok(Some(5)) => Version::V5,
            Ok(_) => return,
            Err(e) => return check_error(&e),
        };
        let mut buf = BytesMut::from(rest);
        match packet::decode(&mut buf, version, limits.max_packet) {
            Ok(Some(Packet::Connect(c))) => {
                rest = &rest[rest.len() - buf.len()..];
                (*c, version)
            }
            Ok(_) => return,
            Err(e) => return check_error(&e),
        }
    };
    let identity = match mode >> 2 & 3 {
        2 => Identity::Named {
            name: DEVICE.into(),
            role: Role::Device,
        },
        3 => Identity::Named {
            name: OPERATOR.into(),
            role: Role::Operator,
        },
        _ => Identity::Anonymous,
    };
    let rig = Rig {
        hub: Hub::new(HUB_LIMITS, Arc::new(Stats::default())),
        gate: &gates()[usize::from(mode >> 4 & 1)],
        stats: Arc::new(Stats::default()),
        limits,
    };
    let client = Client {
        version,
        identity: identity.clone(),
        max_packet: connect
            .maximum_packet_size
            .filter(|_| version.is_v5())
            .map_or(usize::MAX, |m| m as usize),
        receive_maximum: if version.is_v5() {
            usize::from(connect.receive_maximum.max(1))
        } else {
            usize::from(rig.limits.receive_maximum)
        },
        aliases: if version.is_v5() {
            connect.topic_alias_maximum
        } else {
            0
        },
        known_aliases: RefCell::default(),
    };
    let start = Instant::now();
    let Some((mut session, _)) = open(&rig, &client, connect.clone(), 1, start) else {
        return;
    };
    let mut now = start;
    let per_round = PER_ROUND[usize::from(mode >> 5 & 3)];
    let mut buf = BytesMut::from(rest);
    let close = loop {
        let (close, more) = round(&rig, &client, &mut session, &mut buf, per_round, now);
        if close.is_some() || !more {
            break close;
        }
        now += ROUND;
    };
    // As the connection ends it: the will (unless the client said goodbye without it), then
    // the session kept or ended.
    let will = close.as_ref().is_none_or(|c| c.will);
    if will {
        if let Some((message, delay)) = session.last_will(rig.ctx(), now) {
            check_routed(&client, std::slice::from_ref(&message));
            let delay = delay.min(session.expiry());
            if delay == 0 {
                rig.route(std::slice::from_ref(&message), now);
            } else {
                let due = now + Duration::from_secs(delay.into());
                rig.hub.delay_will(&session.client_id, due, message);
            }
        }
    }
    let kept = session.mailbox().is_some() && session.expiry() > 0;
    session.end(rig.ctx(), now);

    if mode & 0x80 != 0 {
        let again = Connect {
            clean_start: false,
            client_id: session.client_id.clone(),
            ..connect
        };
        let (mut back, present) = open(&rig, &client, again, 2, now)
            .expect("a client accepted once is accepted again with the same CONNECT");
        assert_eq!(
            present, kept,
            "a client that comes back finds a session iff it kept one"
        );
        let mut more = Output::default();
        back.fill(rig.ctx(), now, &mut more);
        check_delivered(&client, &back, &more);
        back.end(rig.ctx(), now);
    }

    // Long after every session's expiry: the wills are due, and the hub is empty.
    let later = now + Duration::from_secs(u64::from(HUB_LIMITS.max_session_expiry) + 10);
    let wills = rig.hub.tick(later);
    check_routed(&client, &wills);
    let counts = rig.hub.counts();
    assert_eq!(
        (counts.online, counts.offline),
        (0, 0),
        "sessions are left in the hub after every connection ended and every expiry passed"
    );
}

/// `Session::open`, with the CONNACK and what a clean start made due checked, and the resent
/// packets of a resumed session: the session and whether it was resumed (`None` if the CONNECT
/// was refused).
fn open(
    rig: &Rig,
    client: &Client,
    connect: Connect,
    connection: u64,
    now: Instant,
) -> Option<(Session, bool)> {
    let admitted = Admitted {
        identity: client.identity.clone(),
        proof: Proof::None,
    };
    let clean_start = connect.clean_start;
    let v = client.version;
    // Topic aliases live as long as a connection.
    client.known_aliases.borrow_mut().clear();
    match Session::open(connect, v, admitted, connection, rig.ctx()) {
        Err(refused) => {
            assert!(
                refused.code >= 0x80,
                "CONNECT refused with {:#04x}, not a failure: {}",
                refused.code,
                refused.why
            );
            // As the connection answers a refusal.
            let connack = ConnAck {
                code: refused.code,
                reason_string: v.is_v5().then(|| refused.why.clone()),
                ..ConnAck::default()
            };
            check_sent(&Packet::ConnAck(Box::new(connack)), client);
            None
        }
        Ok(opened) => {
            assert_eq!(opened.connack.code, reason::SUCCESS, "an accepted CONNECT");
            check_sent(&Packet::ConnAck(Box::new(opened.connack.clone())), client);
            if let Some(will) = &opened.old_will {
                assert!(clean_start, "a will made due by a resumed session");
                check_routed(client, std::slice::from_ref(will));
            }
            let mut out = Output::default();
            let mut session = opened.session;
            session.resend(rig.ctx(), now, &mut out);
            for p in &out.send {
                if let Packet::Publish(x) = p {
                    assert!(
                        x.dup && x.qos != QoS::AtMostOnce,
                        "a resent publish without DUP or at QoS 0: {x:?}"
                    );
                }
            }
            check_delivered(client, &session, &out);
            Some((session, opened.connack.session_present))
        }
    }
}

/// One round of the connection: up to `per_round` packets handled, what they published
/// routed, then what waits sent. Returns the close, and whether more packets may come.
fn round(
    rig: &Rig,
    client: &Client,
    session: &mut Session,
    buf: &mut BytesMut,
    per_round: usize,
    now: Instant,
) -> (Option<Close>, bool) {
    let v = client.version;
    let mut out = Output::default();
    let mut close = None;
    let mut more = true;
    for _ in 0..per_round {
        match packet::decode(buf, v, rig.limits.max_packet) {
            Ok(Some(p)) => {
                let asked = Asked::of(&p);
                let before = (out.send.len(), out.acks.len(), out.route.len());
                let result = session.handle(p, rig.ctx(), now, &mut out);
                answered(&asked, v, &out, before, &result);
                if let Err(c) = result {
                    close = Some(c);
                    break;
                }
            }
            Ok(None) => {
                more = false;
                break;
            }
            Err(e) => {
                check_error(&e);
                // As the connection closes it.
                close = Some(Close::malformed(&e, v, &mut out));
                break;
            }
        }
    }
    check_output(client, &out, close.as_ref());
    rig.route(&out.route, now);
    if close.is_none() {
        let mut waiting = Output::default();
        session.fill(rig.ctx(), now, &mut waiting);
        check_delivered(client, session, &waiting);
    }
    (close, more)
}

/// What a packet from the client asks for.
enum Asked {
    /// PUBACK, PUBCOMP: nothing in answer.
    Nothing,
    Ping,
    Subscribe {
        pkid: u16,
        qos: Vec<QoS>,
    },
    Unsubscribe {
        pkid: u16,
        filters: usize,
    },
    Publish {
        pkid: u16,
        qos: QoS,
    },
    /// PUBREL of a packet id.
    Release(u16),
    /// PUBREC of a packet id.
    Received(u16),
    /// DISCONNECT with a reason code.
    Goodbye(u8),
    /// A packet a client may not send: CONNECT again, AUTH without a method, a server's.
    Forbidden,
}

impl Asked {
    fn of(p: &Packet) -> Asked {
        match p {
            Packet::PubAck(_) | Packet::PubComp(_) => Asked::Nothing,
            Packet::PingReq => Asked::Ping,
            Packet::Subscribe(s) => Asked::Subscribe {
                pkid: s.pkid,
                qos: s.filters.iter().map(|(_, o)| o.qos).collect(),
            },
            Packet::Unsubscribe(u) => Asked::Unsubscribe {
                pkid: u.pkid,
                filters: u.filters.len(),
            },
            Packet::Publish(x) => Asked::Publish {
                pkid: x.pkid,
                qos: x.qos,
            },
            Packet::PubRel(a) => Asked::Release(a.pkid),
            Packet::PubRec(a) => Asked::Received(a.pkid),
            Packet::Disconnect(d) => Asked::Goodbye(d.code),
            Packet::Connect(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp
            | Packet::Auth(_) => Asked::Forbidden,
        }
    }
}

/// The session answered one packet as MQTT says. `before` is the lengths of `send`, `acks`
/// and `route` before it.
fn answered(
    asked: &Asked,
    v: Version,
    out: &Output,
    before: (usize, usize, usize),
    result: &Result<(), Close>,
) {
    let send = &out.send[before.0..];
    let acks = &out.acks[before.1..];
    let routed = out.route.len() - before.2;
    if let Err(close) = result {
        assert!(
            acks.is_empty() && routed == 0,
            "a packet that closed the session acknowledged or passed on something"
        );
        if close.clean {
            assert!(
                matches!(asked, Asked::Goodbye(code) if *code == close.code),
                "a clean close, not from the client's DISCONNECT: {close:?}"
            );
            assert!(
                send.is_empty(),
                "the server answered a DISCONNECT: {send:?}"
            );
        } else {
            assert!(
                close.code >= 0x80,
                "a close for a broken protocol with {:#04x}: {}",
                close.code,
                close.why
            );
            if v.is_v5() {
                assert!(
                    matches!(send, [Packet::Disconnect(d)] if d.code == close.code),
                    "an MQTT 5 client closed for {:?} gets {send:?}",
                    close.why
                );
            } else {
                assert!(send.is_empty(), "a 3.1.1 client closed gets {send:?}");
            }
        }
        return;
    }
    let only =
        |what: &str| -> ! { panic!("{what}: send {send:?}, acks {acks:?}, {routed} routed") };
    if !matches!(asked, Asked::Publish { .. }) && routed > 0 {
        only("only a PUBLISH passes something on");
    }
    match asked {
        Asked::Nothing => {
            if !send.is_empty() || !acks.is_empty() {
                only("PUBACK or PUBCOMP answered");
            }
        }
        Asked::Ping => {
            if !matches!(send, [Packet::PingResp]) || !acks.is_empty() {
                only("PINGREQ not answered by one PINGRESP");
            }
        }
        Asked::Subscribe { pkid, qos } => {
            let [Packet::SubAck(s)] = send else {
                only("SUBSCRIBE not answered by one SUBACK");
            };
            assert_eq!(s.pkid, *pkid, "SUBACK of another packet id");
            assert_eq!(s.codes.len(), qos.len(), "SUBACK codes, one per filter");
            for (code, asked) in s.codes.iter().zip(qos) {
                assert!(
                    *code >= 0x80 || *code <= *asked as u8,
                    "SUBACK grants {code:#04x} for QoS {asked:?}"
                );
            }
        }
        Asked::Unsubscribe { pkid, filters } => {
            let [Packet::UnsubAck(u)] = send else {
                only("UNSUBSCRIBE not answered by one UNSUBACK");
            };
            assert_eq!(u.pkid, *pkid, "UNSUBACK of another packet id");
            assert_eq!(u.codes.len(), *filters, "UNSUBACK codes, one per filter");
            assert!(
                u.codes
                    .iter()
                    .all(|c| [reason::SUCCESS, reason::NO_SUBSCRIPTION_EXISTED].contains(c)),
                "UNSUBACK codes {:?}",
                u.codes
            );
        }
        Asked::Publish { qos, .. } if *qos == QoS::AtMostOnce => {
            if !send.is_empty() || !acks.is_empty() || routed > 1 {
                only("a QoS 0 PUBLISH answered");
            }
        }
        Asked::Publish { pkid, qos } => {
            let ack = match (send, acks) {
                ([a], []) => {
                    assert_eq!(routed, 0, "a PUBLISH answered in `send` was passed on");
                    a
                }
                ([], [a]) => {
                    assert_eq!(
                        routed, 1,
                        "a PUBLISH acknowledged in `acks` was not passed on"
                    );
                    a
                }
                _ => only("a QoS 1 or 2 PUBLISH not answered by one acknowledgement"),
            };
            let (Packet::PubAck(a) | Packet::PubRec(a)) = ack else {
                only("a PUBLISH answered by neither PUBACK nor PUBREC");
            };
            let want = if *qos == QoS::AtLeastOnce {
                "PUBACK"
            } else {
                "PUBREC"
            };
            assert_eq!(ack.name(), want, "a QoS {qos:?} PUBLISH answered");
            assert_eq!(a.pkid, *pkid, "{want} of another packet id");
            if !acks.is_empty() {
                assert_eq!(a.code, reason::SUCCESS, "{want} in `acks` with a failure");
            } else if a.code < 0x80 {
                // The one success in `send`: a QoS 2 publish already received, again.
                assert_eq!(
                    (*qos, a.code),
                    (QoS::ExactlyOnce, reason::SUCCESS),
                    "{want} in `send` without a failure"
                );
            }
        }
        Asked::Release(pkid) => match send {
            [Packet::PubComp(a)]
                if a.pkid == *pkid
                    && [reason::SUCCESS, reason::PACKET_ID_NOT_FOUND].contains(&a.code)
                    && acks.is_empty() => {}
            _ => only("PUBREL not answered by one PUBCOMP of its packet id"),
        },
        Asked::Received(pkid) => match send {
            [] => {}
            [Packet::PubRel(a)]
                if a.pkid == *pkid
                    && [reason::SUCCESS, reason::PACKET_ID_NOT_FOUND].contains(&a.code) => {}
            _ => only("PUBREC answered by more than a PUBREL of its packet id"),
        },
        Asked::Goodbye(_) => only("DISCONNECT did not close the session"),
        Asked::Forbidden => only("a packet no client may send was taken"),
    }
}

/// A round's output: every packet for the client written and read back, the acks counted,
/// what was passed on allowed, and a close said.
fn check_output(client: &Client, out: &Output, close: Option<&Close>) {
    for p in &out.acks {
        assert!(
            matches!(p, Packet::PubAck(a) | Packet::PubRec(a) if a.code == reason::SUCCESS),
            "`acks` holds {p:?}"
        );
    }
    let pubacks = out
        .acks
        .iter()
        .filter(|p| matches!(p, Packet::PubAck(_)))
        .count();
    assert_eq!(
        out.unacknowledged, pubacks,
        "`unacknowledged` does not count the PUBACKs in `acks`"
    );
    for p in out.acks.iter().chain(&out.send) {
        check_sent(p, client);
    }
    check_routed(client, &out.route);
    if let Some(close) = close.filter(|c| !c.clean && client.version.is_v5()) {
        assert!(
            matches!(out.send.last(), Some(Packet::Disconnect(d)) if d.code == close.code),
            "an MQTT 5 session closed for {:?} without a DISCONNECT last",
            close.why
        );
    }
}

/// What `fill` or `resend` gave: publishes (and PUBRELs) the client may take.
fn check_delivered(client: &Client, session: &Session, out: &Output) {
    assert!(
        out.acks.is_empty() && out.route.is_empty(),
        "sending what waits acknowledged or passed something on"
    );
    for p in &out.send {
        check_sent(p, client);
        let Packet::Publish(x) = p else {
            assert!(
                matches!(p, Packet::PubRel(_)),
                "sending what waits gave {}",
                p.name()
            );
            continue;
        };
        let size = packet::encoded_len(p, client.version);
        assert!(
            size <= client.max_packet,
            "a PUBLISH of {size} bytes for a client that takes at most {}",
            client.max_packet
        );
        if let Some(alias) = x.topic_alias {
            assert!(
                (1..=client.aliases).contains(&alias),
                "topic alias {alias} for a client that allows {}",
                client.aliases
            );
        }
        let mut known = client.known_aliases.borrow_mut();
        match (x.topic.is_empty(), x.topic_alias) {
            (false, Some(alias)) => {
                known.retain(|(a, _)| *a != alias);
                known.push((alias, x.topic.clone()));
            }
            (true, Some(alias)) => assert!(
                known.iter().any(|(a, _)| *a == alias),
                "a publish by topic alias {alias}, which the client was never sent"
            ),
            _ => {}
        }
        assert_eq!(
            x.pkid == 0,
            x.qos == QoS::AtMostOnce,
            "a QoS {:?} publish with packet id {}",
            x.qos,
            x.pkid
        );
    }
    if let Some(mailbox) = session.mailbox() {
        let outbox = mailbox.lock();
        assert!(
            outbox.inflight.len() <= client.receive_maximum,
            "{} publishes in flight to a client with a receive maximum of {}",
            outbox.inflight.len(),
            client.receive_maximum
        );
        let mut ids: Vec<u16> = outbox.inflight.iter().map(|i| i.pkid).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(
            ids.len(),
            outbox.inflight.len(),
            "a packet id twice in flight"
        );
    }
}

/// One packet for the client, as the connection queues it (`packet::fitted` to the client's
/// Maximum Packet Size), written at its version and read back: what it says, or what 3.1.1
/// can say of it. It fits the client's Maximum Packet Size, or would not even without its
/// reason string and user properties (MQTT 5, 3.1.2.11.4: a server leaves those out rather
/// than send a packet too large).
fn check_sent(p: &Packet, client: &Client) {
    let v = client.version;
    let bare = without_reasons(p);
    let fitted = packet::fitted(p, v, client.max_packet);
    if let Some(f) = &fitted {
        assert_eq!(
            *f, bare,
            "fitted to the client, a packet loses more than its reasons"
        );
    }
    let p = fitted.as_ref().unwrap_or(p);
    let bytes = encoded(p, v);
    assert!(
        !bytes.is_empty(),
        "{} for a {v:?} client writes nothing: {p:?}",
        p.name()
    );
    let back = decode_exactly(&bytes, v, usize::MAX);
    let want = match p {
        _ if v.is_v5() => p.clone(),
        Packet::ConnAck(c) => Packet::ConnAck(Box::new(ConnAck {
            session_present: c.session_present,
            code: connack_v311(c.code),
            ..ConnAck::default()
        })),
        _ => as_v311(p),
    };
    assert_eq!(
        back, want,
        "{v:?}: a packet for the client reads back otherwise"
    );
    if bytes.len() > client.max_packet {
        let smallest = packet::encoded_len(&bare, v);
        assert!(
            smallest > client.max_packet,
            "a {} of {} bytes for a client that takes at most {}; without its reason string it is {smallest}: {p:?}",
            p.name(),
            bytes.len(),
            client.max_packet
        );
    }
}

/// `p` without a reason string and user properties.
fn without_reasons(p: &Packet) -> Packet {
    let mut p = p.clone();
    let (reason, users) = match &mut p {
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            (&mut a.reason_string, &mut a.user_properties)
        }
        Packet::SubAck(s) => (&mut s.reason_string, &mut s.user_properties),
        Packet::UnsubAck(u) => (&mut u.reason_string, &mut u.user_properties),
        Packet::Disconnect(d) => (&mut d.reason_string, &mut d.user_properties),
        Packet::ConnAck(c) => (&mut c.reason_string, &mut c.user_properties),
        Packet::Auth(a) => (&mut a.reason_string, &mut a.user_properties),
        _ => return p,
    };
    *reason = None;
    users.clear();
    p
}

/// Messages passed on (published, or wills) have valid topic names, not the gateway's, of a
/// length the broker allows, and only what the client's role may publish.
fn check_routed(client: &Client, messages: &[Message]) {
    for m in messages {
        let Ok(topic) = std::str::from_utf8(&m.topic) else {
            panic!("a message passed on with a topic not UTF-8: {:?}", m.topic);
        };
        assert!(
            !topic.is_empty() && !topic.contains(['+', '#', '\0']),
            "a message passed on with an invalid topic name {topic:?}"
        );
        assert!(
            topic.len() <= MAX_TOPIC_BYTES,
            "a message passed on with a topic of {} bytes",
            topic.len()
        );
        let first = topic.split('/').next().unwrap_or_default();
        assert!(
            !topic.starts_with('$') && first != crate::alert::TOPIC_ROOT,
            "a client's message passed on with the gateway's topic {topic:?}"
        );
        match &client.identity {
            Identity::Anonymous => {}
            Identity::Named {
                role: Role::Operator,
                ..
            } => panic!("the operator's message on {topic:?} was passed on"),
            Identity::Named { name, .. } => {
                let own = topic
                    .strip_prefix(crate::codec::TOPIC_ROOT)
                    .and_then(|t| t.strip_prefix('/'))
                    .is_some_and(|t| t.split('/').next() == Some(name.as_str()));
                let tasmota = topic.strip_prefix("tele/").and_then(|t| t.split_once('/'))
                    == Some((name.as_str(), "SENSOR"));
                assert!(
                    own || tasmota,
                    "device {name}'s message on {topic:?}, not its own topic, was passed on"
                );
            }
        }
    }
}

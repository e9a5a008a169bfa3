//! Packets to bytes.
//!
//! Every packet is written by one generic function per packet type, run twice: once into a
//! counter, which gives the remaining length (and [`encoded_len`]), and once into the buffer.
//! So the length written in the fixed header and the length reported can never disagree
//! with the bytes written.
//!
//! Strings and binary data longer than 65,535 bytes cannot be written; they are cut to that
//! length (a string at a character boundary). A remaining length or subscription identifier
//! above 268,435,455 cannot be written either; callers keep within those limits (the
//! broker's maximum packet size is far below).

use bytes::{BufMut, BytesMut};

use super::{
    Ack, Auth, ConnAck, Connect, Disconnect, MessageProperties, Packet, Publish, QoS, SubAck,
    Subscribe, UnsubAck, Unsubscribe, UserProperty, Version, Will, reason,
};

/// Appends `packet` written for `version` to `buf`.
///
/// MQTT 5 only parts (properties, reason codes on acks, AUTH, a server's DISCONNECT) are left
/// out for 3.1.1: a DISCONNECT or AUTH for a 3.1.1 client writes nothing.
pub fn encode(packet: &Packet, version: Version, buf: &mut BytesMut) {
    if !written(packet, version) {
        return;
    }
    let mut count = Count(0);
    body(packet, version, &mut count);
    let remaining = count.0;
    buf.reserve(1 + vbi_len(remaining) + remaining);
    buf.put_u8(first_byte(packet));
    vbi(buf, remaining);
    body(packet, version, buf);
}

/// The number of bytes [`encode`] would write (used to honour a client's Maximum Packet
/// Size).
pub fn encoded_len(packet: &Packet, version: Version) -> usize {
    if !written(packet, version) {
        return 0;
    }
    let mut count = Count(0);
    body(packet, version, &mut count);
    1 + vbi_len(count.0) + count.0
}

/// `packet` without its reason string and user properties, if it is larger than `max` bytes
/// with them and has any; `None` if it is to be sent as it is.
///
/// A client's Maximum Packet Size binds every packet the server sends it (MQTT 5,
/// 3.1.2.11.4), and the reason string and user properties are what a server leaves out
/// rather than exceed it (3.2.2.3.9, 3.9.2.1.2, 3.14.2.2.3, ...). A publish too large is not
/// this function's: it is discarded as if delivered (`Session::fill`).
pub fn fitted(packet: &Packet, version: Version, max: usize) -> Option<Packet> {
    let reasons = match packet {
        Packet::ConnAck(c) => c.reason_string.is_some() || !c.user_properties.is_empty(),
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            has_reason_props(a.reason_string.as_ref(), &a.user_properties)
        }
        Packet::SubAck(s) => has_reason_props(s.reason_string.as_ref(), &s.user_properties),
        Packet::UnsubAck(u) => has_reason_props(u.reason_string.as_ref(), &u.user_properties),
        Packet::Disconnect(d) => has_reason_props(d.reason_string.as_ref(), &d.user_properties),
        Packet::Auth(a) => has_reason_props(a.reason_string.as_ref(), &a.user_properties),
        _ => false,
    };
    if !reasons || encoded_len(packet, version) <= max {
        return None;
    }
    let mut packet = packet.clone();
    let (reason, users) = match &mut packet {
        Packet::ConnAck(c) => (&mut c.reason_string, &mut c.user_properties),
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            (&mut a.reason_string, &mut a.user_properties)
        }
        Packet::SubAck(s) => (&mut s.reason_string, &mut s.user_properties),
        Packet::UnsubAck(u) => (&mut u.reason_string, &mut u.user_properties),
        Packet::Disconnect(d) => (&mut d.reason_string, &mut d.user_properties),
        Packet::Auth(a) => (&mut a.reason_string, &mut a.user_properties),
        _ => return None,
    };
    *reason = None;
    users.clear();
    Some(packet)
}

/// False for the packets 3.1.1 does not have: a DISCONNECT from the server, and AUTH.
fn written(packet: &Packet, version: Version) -> bool {
    version.is_v5() || !matches!(packet, Packet::Disconnect(_) | Packet::Auth(_))
}

/// Where bytes go: a buffer, or a counter.
trait Out {
    fn bytes(&mut self, b: &[u8]);

    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }

    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_be_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_be_bytes());
    }
}

/// Counts the bytes it is given.
struct Count(usize);

impl Out for Count {
    fn bytes(&mut self, b: &[u8]) {
        self.0 += b.len();
    }
}

impl Out for BytesMut {
    fn bytes(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }

    fn u8(&mut self, v: u8) {
        self.put_u8(v);
    }
}

/// Writes a property section: its length, then what `$f(o, args)` writes.
macro_rules! properties {
    ($o:expr, $f:ident ( $($arg:expr),* )) => {{
        let mut count = Count(0);
        $f(&mut count, $($arg),*);
        vbi($o, count.0);
        $f($o, $($arg),*);
    }};
}

fn vbi<O: Out>(o: &mut O, mut v: usize) {
    loop {
        let low = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            o.u8(low);
            return;
        }
        o.u8(low | 0x80);
    }
}

fn vbi_len(mut v: usize) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// A string with a two-byte length, cut to 65,535 bytes at a character boundary.
fn string<O: Out>(o: &mut O, s: &str) {
    let mut n = s.len().min(usize::from(u16::MAX));
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    o.u16(n as u16);
    o.bytes(&s.as_bytes()[..n]);
}

/// Binary data with a two-byte length, cut to 65,535 bytes.
fn binary<O: Out>(o: &mut O, b: &[u8]) {
    let b = &b[..b.len().min(usize::from(u16::MAX))];
    o.u16(b.len() as u16);
    o.bytes(b);
}

fn first_byte(packet: &Packet) -> u8 {
    match packet {
        Packet::Connect(_) => 0x10,
        Packet::ConnAck(_) => 0x20,
        Packet::Publish(p) => 0x30 | u8::from(p.dup) << 3 | (p.qos as u8) << 1 | u8::from(p.retain),
        Packet::PubAck(_) => 0x40,
        Packet::PubRec(_) => 0x50,
        Packet::PubRel(_) => 0x62,
        Packet::PubComp(_) => 0x70,
        Packet::Subscribe(_) => 0x82,
        Packet::SubAck(_) => 0x90,
        Packet::Unsubscribe(_) => 0xA2,
        Packet::UnsubAck(_) => 0xB0,
        Packet::PingReq => 0xC0,
        Packet::PingResp => 0xD0,
        Packet::Disconnect(_) => 0xE0,
        Packet::Auth(_) => 0xF0,
    }
}

/// Everything after the fixed header.
fn body<O: Out>(packet: &Packet, v: Version, o: &mut O) {
    match packet {
        Packet::Connect(c) => connect(o, c, v),
        Packet::ConnAck(c) => connack(o, c, v),
        Packet::Publish(p) => publish(o, p, v),
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            ack(o, a, v);
        }
        Packet::Subscribe(s) => subscribe(o, s, v),
        Packet::SubAck(s) => suback(o, s, v),
        Packet::Unsubscribe(u) => unsubscribe(o, u, v),
        Packet::UnsubAck(u) => unsuback(o, u, v),
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => disconnect(o, d),
        Packet::Auth(a) => auth(o, a),
    }
}

// Property writers: each writes a property only if it is set.

fn p_u8<O: Out>(o: &mut O, id: u8, v: Option<u8>) {
    if let Some(v) = v {
        o.u8(id);
        o.u8(v);
    }
}

fn p_u16<O: Out>(o: &mut O, id: u8, v: Option<u16>) {
    if let Some(v) = v {
        o.u8(id);
        o.u16(v);
    }
}

fn p_u32<O: Out>(o: &mut O, id: u8, v: Option<u32>) {
    if let Some(v) = v {
        o.u8(id);
        o.u32(v);
    }
}

fn p_str<O: Out>(o: &mut O, id: u8, v: Option<&String>) {
    if let Some(v) = v {
        o.u8(id);
        string(o, v);
    }
}

fn p_bin<O: Out>(o: &mut O, id: u8, v: Option<&[u8]>) {
    if let Some(v) = v {
        o.u8(id);
        binary(o, v);
    }
}

fn p_users<O: Out>(o: &mut O, users: &[UserProperty]) {
    for (k, v) in users {
        o.u8(0x26);
        string(o, k);
        string(o, v);
    }
}

/// The properties of an Ack, SUBACK and UNSUBACK: a reason string and user properties.
fn reason_props<O: Out>(o: &mut O, reason: Option<&String>, users: &[UserProperty]) {
    p_str(o, 0x1F, reason);
    p_users(o, users);
}

fn message_props<O: Out>(o: &mut O, m: &MessageProperties) {
    p_u8(o, 0x01, m.payload_is_utf8.map(u8::from));
    p_u32(o, 0x02, m.message_expiry);
    p_str(o, 0x03, m.content_type.as_ref());
    p_str(o, 0x08, m.response_topic.as_ref());
    p_bin(o, 0x09, m.correlation_data.as_deref());
    p_users(o, &m.user_properties);
}

fn connect_props<O: Out>(o: &mut O, c: &Connect) {
    p_u32(o, 0x11, (c.session_expiry != 0).then_some(c.session_expiry));
    p_u16(
        o,
        0x21,
        (c.receive_maximum != u16::MAX).then_some(c.receive_maximum),
    );
    p_u32(o, 0x27, c.maximum_packet_size);
    p_u16(
        o,
        0x22,
        (c.topic_alias_maximum != 0).then_some(c.topic_alias_maximum),
    );
    p_u8(o, 0x19, c.request_response_information.then_some(1));
    p_u8(o, 0x17, (!c.request_problem_information).then_some(0));
    p_users(o, &c.user_properties);
    p_str(o, 0x15, c.authentication_method.as_ref());
    p_bin(o, 0x16, c.authentication_data.as_deref());
}

fn will_props<O: Out>(o: &mut O, w: &Will) {
    p_u32(o, 0x18, (w.delay != 0).then_some(w.delay));
    if let Some(m) = &w.properties {
        message_props(o, m);
    }
}

fn connect<O: Out>(o: &mut O, c: &Connect, v: Version) {
    string(o, "MQTT");
    o.u8(if v.is_v5() { 5 } else { 4 });
    let mut flags = u8::from(c.clean_start) << 1;
    if let Some(w) = &c.will {
        flags |= 0b100 | (w.qos as u8) << 3 | u8::from(w.retain) << 5;
    }
    flags |= u8::from(c.password.is_some()) << 6 | u8::from(c.username.is_some()) << 7;
    o.u8(flags);
    o.u16(c.keep_alive);
    if v.is_v5() {
        properties!(o, connect_props(c));
    }
    string(o, &c.client_id);
    if let Some(w) = &c.will {
        if v.is_v5() {
            properties!(o, will_props(w));
        }
        binary(o, &w.topic);
        binary(o, &w.payload);
    }
    if let Some(u) = &c.username {
        string(o, u);
    }
    if let Some(p) = &c.password {
        binary(o, p);
    }
}

/// The 3.1.1 return code for an MQTT 5 CONNACK reason code.
fn connack_v311(code: u8) -> u8 {
    match code {
        reason::SUCCESS => 0,
        reason::UNSUPPORTED_PROTOCOL_VERSION => 1,
        reason::CLIENT_ID_NOT_VALID => 2,
        reason::SERVER_UNAVAILABLE | reason::SERVER_BUSY => 3,
        reason::BAD_USER_NAME_OR_PASSWORD => 4,
        reason::NOT_AUTHORIZED | reason::BANNED => 5,
        _ => 3,
    }
}

fn connack_props<O: Out>(o: &mut O, c: &ConnAck) {
    p_u32(o, 0x11, c.session_expiry);
    p_u16(o, 0x21, c.receive_maximum);
    p_u8(o, 0x24, c.maximum_qos.map(|q| q as u8));
    p_u8(o, 0x25, c.retain_available.map(u8::from));
    p_u32(o, 0x27, c.maximum_packet_size);
    p_str(o, 0x12, c.assigned_client_id.as_ref());
    p_u16(o, 0x22, c.topic_alias_maximum);
    p_str(o, 0x1F, c.reason_string.as_ref());
    p_users(o, &c.user_properties);
    p_u8(o, 0x28, c.wildcard_subscription_available.map(u8::from));
    p_u8(o, 0x29, c.subscription_identifiers_available.map(u8::from));
    p_u8(o, 0x2A, c.shared_subscription_available.map(u8::from));
    p_u16(o, 0x13, c.server_keep_alive);
    p_str(o, 0x1A, c.response_information.as_ref());
    p_str(o, 0x1C, c.server_reference.as_ref());
    p_str(o, 0x15, c.authentication_method.as_ref());
    p_bin(o, 0x16, c.authentication_data.as_deref());
}

fn connack<O: Out>(o: &mut O, c: &ConnAck, v: Version) {
    o.u8(u8::from(c.session_present));
    if v.is_v5() {
        o.u8(c.code);
        properties!(o, connack_props(c));
    } else {
        o.u8(connack_v311(c.code));
    }
}

fn publish_props<O: Out>(o: &mut O, p: &Publish) {
    if let Some(m) = &p.properties {
        message_props(o, m);
    }
    p_u16(o, 0x23, p.topic_alias);
    for &id in &p.subscription_ids {
        o.u8(0x0B);
        vbi(o, id as usize);
    }
}

fn publish<O: Out>(o: &mut O, p: &Publish, v: Version) {
    binary(o, &p.topic);
    if p.qos != QoS::AtMostOnce {
        o.u16(p.pkid);
    }
    if v.is_v5() {
        properties!(o, publish_props(p));
    }
    o.bytes(&p.payload);
}

/// True if a reason string or user properties are to be written.
fn has_reason_props(reason: Option<&String>, users: &[UserProperty]) -> bool {
    reason.is_some() || !users.is_empty()
}

fn ack<O: Out>(o: &mut O, a: &Ack, v: Version) {
    o.u16(a.pkid);
    if !v.is_v5() {
        return;
    }
    let props = has_reason_props(a.reason_string.as_ref(), &a.user_properties);
    if a.code != reason::SUCCESS || props {
        o.u8(a.code);
    }
    if props {
        properties!(
            o,
            reason_props(a.reason_string.as_ref(), &a.user_properties)
        );
    }
}

fn subscribe_props<O: Out>(o: &mut O, s: &Subscribe) {
    if let Some(id) = s.id {
        o.u8(0x0B);
        vbi(o, id as usize);
    }
    p_users(o, &s.user_properties);
}

fn subscribe<O: Out>(o: &mut O, s: &Subscribe, v: Version) {
    o.u16(s.pkid);
    if v.is_v5() {
        properties!(o, subscribe_props(s));
    }
    for (filter, opts) in &s.filters {
        string(o, filter);
        let mut b = opts.qos as u8;
        if v.is_v5() {
            b |= u8::from(opts.no_local) << 2
                | u8::from(opts.retain_as_published) << 3
                | (opts.retain_handling & 3) << 4;
        }
        o.u8(b);
    }
}

fn suback<O: Out>(o: &mut O, s: &SubAck, v: Version) {
    o.u16(s.pkid);
    if v.is_v5() {
        properties!(
            o,
            reason_props(s.reason_string.as_ref(), &s.user_properties)
        );
        o.bytes(&s.codes);
    } else {
        for &code in &s.codes {
            o.u8(if code >= 0x80 { 0x80 } else { code });
        }
    }
}

fn unsubscribe<O: Out>(o: &mut O, u: &Unsubscribe, v: Version) {
    o.u16(u.pkid);
    if v.is_v5() {
        properties!(o, p_users(&u.user_properties));
    }
    for filter in &u.filters {
        string(o, filter);
    }
}

fn unsuback<O: Out>(o: &mut O, u: &UnsubAck, v: Version) {
    o.u16(u.pkid);
    if v.is_v5() {
        properties!(
            o,
            reason_props(u.reason_string.as_ref(), &u.user_properties)
        );
        o.bytes(&u.codes);
    }
}

fn disconnect_props<O: Out>(o: &mut O, d: &Disconnect) {
    p_u32(o, 0x11, d.session_expiry);
    p_str(o, 0x1F, d.reason_string.as_ref());
    p_users(o, &d.user_properties);
    p_str(o, 0x1C, d.server_reference.as_ref());
}

/// MQTT 5 only: [`encode`] writes nothing for 3.1.1.
fn disconnect<O: Out>(o: &mut O, d: &Disconnect) {
    let props = d.session_expiry.is_some()
        || d.server_reference.is_some()
        || has_reason_props(d.reason_string.as_ref(), &d.user_properties);
    if d.code != reason::SUCCESS || props {
        o.u8(d.code);
    }
    if props {
        properties!(o, disconnect_props(d));
    }
}

fn auth_props<O: Out>(o: &mut O, a: &Auth) {
    p_str(o, 0x15, a.method.as_ref());
    p_bin(o, 0x16, a.data.as_deref());
    p_str(o, 0x1F, a.reason_string.as_ref());
    p_users(o, &a.user_properties);
}

/// MQTT 5 only: [`encode`] writes nothing for 3.1.1.
fn auth<O: Out>(o: &mut O, a: &Auth) {
    let props = a.method.is_some()
        || a.data.is_some()
        || has_reason_props(a.reason_string.as_ref(), &a.user_properties);
    if a.code != reason::SUCCESS || props {
        o.u8(a.code);
    }
    if props {
        properties!(o, auth_props(a));
    }
}

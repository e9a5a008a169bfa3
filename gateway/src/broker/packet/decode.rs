//! Bytes to packets, with the exact reason every refused packet is refused for.
//!
//! Choices where the specifications leave room:
//!
//! - MQTT 5 splits errors into malformed packets (0x81: the bytes cannot be parsed as the
//!   specification says, including a property identifier not allowed in the packet type) and
//!   protocol errors (0x82: the packet parses but a value breaks a rule: packet id 0, a
//!   duplicate property, a reason code the packet type does not have, Receive Maximum 0, ...).
//!   3.1.1 has no such split (a server just closes the connection), so for a 3.1.1 packet
//!   what MQTT 5 calls a protocol error is reported as malformed.
//! - A reason code not defined for the packet type is a protocol error (it is a well formed
//!   byte with a value the protocol does not allow).
//! - A remaining length (or any variable byte integer) written in more bytes than needed is
//!   accepted: it can be parsed, and no client is known to depend on either answer.
//! - The will's payload is checked to be UTF-8 when its Payload Format Indicator says so
//!   (0x99, for the CONNACK). A PUBLISH's payload is not: the session may answer such a
//!   publish with a PUBACK of 0x99 rather than close the connection, so it gets the packet.
//! - Whether a packet may travel in the direction it came (a Subscription Identifier from a
//!   client, a CONNACK to a server) is the session's to check: the codec reads both ways.
//! - A CONNACK with Session Present set and a non-zero code, a SUBACK with no codes and an
//!   MQTT 5 UNSUBACK with no codes are refused, as a client would refuse them.

use std::borrow::Cow;

use bytes::{Buf, Bytes, BytesMut};

use super::{
    Ack, Auth, ConnAck, Connect, Disconnect, MessageProperties, Packet, Publish, QoS, SubAck,
    Subscribe, SubscriptionOptions, UnsubAck, Unsubscribe, Version, Will, reason,
};

/// Why a packet was refused. [`DecodeError::code`] is the MQTT 5 reason code to answer with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes cannot be parsed as the specification says (0x81).
    #[error("malformed packet: {0}")]
    Malformed(Cow<'static, str>),
    /// The packet parses but breaks a rule of the protocol (0x82). Reported as
    /// [`DecodeError::Malformed`] for 3.1.1, which has no such distinction.
    #[error("protocol error: {0}")]
    Protocol(Cow<'static, str>),
    /// The whole packet is larger than the limit (0x95); found from the fixed header alone.
    #[error("packet too large: {size} bytes, limit {limit}")]
    TooLarge {
        /// The packet's size in bytes, fixed header included.
        size: usize,
        /// The largest packet accepted.
        limit: usize,
    },
    /// A CONNECT for another protocol, or another protocol level than expected (0x84).
    #[error("unsupported protocol version: {0}")]
    UnsupportedProtocol(Cow<'static, str>),
    /// A will message whose Payload Format Indicator says UTF-8 but is not (0x99).
    #[error("payload format invalid: {0}")]
    PayloadFormatInvalid(Cow<'static, str>),
}

impl DecodeError {
    /// The MQTT 5 reason code a server answers this error with in its DISCONNECT (or CONNACK).
    pub fn code(&self) -> u8 {
        match self {
            DecodeError::Malformed(_) => reason::MALFORMED,
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocol(_) => reason::UNSUPPORTED_PROTOCOL_VERSION,
            DecodeError::PayloadFormatInvalid(_) => reason::PAYLOAD_FORMAT_INVALID,
        }
    }

    /// The reason code of the DISCONNECT that closes a connection for this error once its
    /// CONNECT was accepted: [`DecodeError::code`], but for another protocol. That is news
    /// only in the first packet: a later CONNECT is a protocol error whatever it says (MQTT 5,
    /// 3.1.0-2), and DISCONNECT has no reason code 0x84.
    pub fn disconnect_code(&self) -> u8 {
        match self {
            DecodeError::UnsupportedProtocol(_) => reason::PROTOCOL_ERROR,
            _ => self.code(),
        }
    }
}

fn malformed(why: impl Into<Cow<'static, str>>) -> DecodeError {
    DecodeError::Malformed(why.into())
}

/// Packet type names by the type number of the fixed header.
const NAMES: [&str; 16] = [
    "reserved packet type 0",
    "CONNECT",
    "CONNACK",
    "PUBLISH",
    "PUBACK",
    "PUBREC",
    "PUBREL",
    "PUBCOMP",
    "SUBSCRIBE",
    "SUBACK",
    "UNSUBSCRIBE",
    "UNSUBACK",
    "PINGREQ",
    "PINGRESP",
    "DISCONNECT",
    "AUTH",
];

/// Reads one packet from the front of `buf` if a whole one is buffered (Ok(None): need more
/// bytes; nothing consumed).
///
/// `max_packet` is the largest whole packet accepted, in bytes, fixed header included (MQTT
/// 5's Maximum Packet Size). Too large is detected from the fixed header alone, before the
/// packet is all buffered. After an error the connection is to be closed: how much of `buf`
/// was consumed is unspecified.
pub fn decode(
    buf: &mut BytesMut,
    version: Version,
    max_packet: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    check_first_byte(first, version)?;
    let Some((remaining, header_len)) = remaining_length(buf)? else {
        return Ok(None);
    };
    let size = header_len + remaining;
    if size > max_packet {
        return Err(DecodeError::TooLarge {
            size,
            limit: max_packet,
        });
    }
    if buf.len() < size {
        return Ok(None);
    }
    let mut frame = buf.split_to(size).freeze();
    frame.advance(header_len);
    body(first, &frame, version).map(Some)
}

/// The protocol level of the CONNECT at the front of `buf` (3 for MQTT 3.1 "MQIsdp", 4, 5, or
/// whatever number is there), Ok(None) if more bytes are needed.
///
/// Errors if the first packet is not a CONNECT (0x82) or its protocol name is neither "MQTT"
/// nor "MQIsdp" (0x84).
pub fn connect_level(buf: &[u8]) -> Result<Option<u8>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first >> 4 != 1 {
        return Err(DecodeError::Protocol(
            format!(
                "first packet is {}, not CONNECT",
                NAMES[usize::from(first >> 4)]
            )
            .into(),
        ));
    }
    let Some((remaining, header_len)) = remaining_length(buf)? else {
        return Ok(None);
    };
    // The CONNECT's own bytes only: what follows it must not change the answer.
    let body = &buf[header_len..buf.len().min(header_len + remaining)];
    let (Some(&hi), Some(&lo)) = (body.first(), body.get(1)) else {
        return short_connect(remaining, 2);
    };
    let name_len = usize::from(u16::from_be_bytes([hi, lo]));
    if name_len != 4 && name_len != 6 {
        return Err(DecodeError::UnsupportedProtocol(
            format!("protocol name of {name_len} bytes, neither MQTT nor MQIsdp").into(),
        ));
    }
    let needed = 2 + name_len + 1;
    if remaining < needed {
        return Err(malformed("CONNECT ends before its protocol level"));
    }
    let Some(name_and_level) = body.get(2..needed) else {
        return Ok(None);
    };
    let (name, level) = name_and_level.split_at(name_len);
    if name != b"MQTT" && name != b"MQIsdp" {
        return Err(DecodeError::UnsupportedProtocol(
            format!(
                "protocol name {:?}, neither MQTT nor MQIsdp",
                String::from_utf8_lossy(name)
            )
            .into(),
        ));
    }
    Ok(Some(level[0]))
}

/// Ok(None) if `remaining` says more bytes will come, else the CONNECT is too short.
fn short_connect(remaining: usize, needed: usize) -> Result<Option<u8>, DecodeError> {
    if remaining < needed {
        Err(malformed("CONNECT ends before its protocol name"))
    } else {
        Ok(None)
    }
}

/// Checks the packet type and the flags of the fixed header's first byte.
fn check_first_byte(first: u8, version: Version) -> Result<(), DecodeError> {
    let kind = first >> 4;
    let flags = first & 0x0F;
    let name = NAMES[usize::from(kind)];
    match kind {
        0 => return Err(malformed("packet type 0 is reserved")),
        15 if !version.is_v5() => {
            return Err(malformed("packet type 15 (AUTH) is not MQTT 3.1.1"));
        }
        3 => {
            let qos = (flags >> 1) & 3;
            if qos == 3 {
                return Err(malformed("PUBLISH with QoS 3"));
            }
            if qos == 0 && flags & 0b1000 != 0 {
                return Err(malformed("PUBLISH with QoS 0 and DUP set"));
            }
        }
        6 | 8 | 10 if flags != 0b0010 => {
            return Err(malformed(format!(
                "{name} with header flags {flags:04b}, not 0010"
            )));
        }
        6 | 8 | 10 => {}
        _ if flags != 0 => {
            return Err(malformed(format!(
                "{name} with header flags {flags:04b}, not 0000"
            )));
        }
        _ => {}
    }
    Ok(())
}

/// The remaining length and the fixed header's length, Ok(None) if more bytes are needed.
fn remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        value |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((value, 2 + i)));
        }
    }
    Err(malformed("remaining length longer than 4 bytes"))
}

/// Decodes the body of a packet whose fixed header (`first`, checked) is already read.
fn body(first: u8, frame: &Bytes, version: Version) -> Result<Packet, DecodeError> {
    let kind = first >> 4;
    let mut r = Reader {
        frame,
        data: frame,
        pos: 0,
        end: frame.len(),
        version,
        name: NAMES[usize::from(kind)],
    };
    let packet = match kind {
        1 => Packet::Connect(Box::new(connect(&mut r)?)),
        2 => Packet::ConnAck(Box::new(connack(&mut r)?)),
        3 => Packet::Publish(publish(&mut r, first)?),
        4 => Packet::PubAck(ack(&mut r, PUBACK_CODES)?),
        5 => Packet::PubRec(ack(&mut r, PUBACK_CODES)?),
        6 => Packet::PubRel(ack(&mut r, PUBREL_CODES)?),
        7 => Packet::PubComp(ack(&mut r, PUBREL_CODES)?),
        8 => Packet::Subscribe(subscribe(&mut r)?),
        9 => Packet::SubAck(suback(&mut r)?),
        10 => Packet::Unsubscribe(unsubscribe(&mut r)?),
        11 => Packet::UnsubAck(unsuback(&mut r)?),
        12 => Packet::PingReq,
        13 => Packet::PingResp,
        14 => Packet::Disconnect(disconnect(&mut r)?),
        15 => Packet::Auth(auth(&mut r)?),
        _ => return Err(malformed("packet type 0 is reserved")),
    };
    r.finish()?;
    Ok(packet)
}

/// Reason codes by packet type (MQTT 5, 2.4).
const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_CODES: &[u8] = &[0x00, 0x92];
const SUBACK_CODES: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
const SUBACK_CODES_V311: &[u8] = &[0x00, 0x01, 0x02, 0x80];
const UNSUBACK_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT_CODES: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH_CODES: &[u8] = &[0x00, 0x18, 0x19];

/// 3.1.1 CONNACK return codes 0 to 5 as MQTT 5 reason codes.
const CONNACK_V311: [u8; 6] = [0x00, 0x84, 0x85, 0x88, 0x86, 0x87];

/// A cursor over the body of one packet.
struct Reader<'a> {
    /// The body, to slice [`Bytes`] from without a copy.
    frame: &'a Bytes,
    /// The same bytes, to read from.
    data: &'a [u8],
    pos: usize,
    /// Where reading must stop: the body's end, or the end of a property section.
    end: usize,
    version: Version,
    /// The packet type's name, for errors.
    name: &'static str,
}

impl<'a> Reader<'a> {
    fn v5(&self) -> bool {
        self.version.is_v5()
    }

    fn at_end(&self) -> bool {
        self.pos >= self.end
    }

    /// A protocol error in MQTT 5, reported as malformed for 3.1.1.
    fn protocol(&self, why: String) -> DecodeError {
        if self.v5() {
            DecodeError::Protocol(why.into())
        } else {
            DecodeError::Malformed(why.into())
        }
    }

    fn short(&self, what: &str) -> DecodeError {
        malformed(format!("{} ends inside its {what}", self.name))
    }

    /// Every byte of the body was read.
    fn finish(&self) -> Result<(), DecodeError> {
        match self.data.len() - self.pos {
            0 => Ok(()),
            n => Err(malformed(format!(
                "{} has {n} bytes after its last field",
                self.name
            ))),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.end - self.pos < n {
            return Err(self.short(what));
        }
        let start = self.pos;
        self.pos += n;
        Ok(&self.data[start..self.pos])
    }

    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A variable byte integer (at most 4 bytes).
    fn vbi(&mut self, what: &str) -> Result<u32, DecodeError> {
        let mut value = 0u32;
        for i in 0..4 {
            let b = self.u8(what)?;
            value |= u32::from(b & 0x7F) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed(format!(
            "{} {what} longer than 4 bytes",
            self.name
        )))
    }

    /// A non-zero packet id.
    fn pkid(&mut self) -> Result<u16, DecodeError> {
        match self.u16("packet id")? {
            0 => Err(self.protocol(format!("{} with packet id 0", self.name))),
            id => Ok(id),
        }
    }

    /// The position and length of a two-byte-length-prefixed field.
    fn prefixed(&mut self, what: &str) -> Result<(usize, usize), DecodeError> {
        let n = usize::from(self.u16(what)?);
        if self.end - self.pos < n {
            return Err(self.short(what));
        }
        let start = self.pos;
        self.pos += n;
        Ok((start, n))
    }

    /// A UTF-8 string, borrowed.
    fn str(&mut self, what: &str) -> Result<&'a str, DecodeError> {
        let (start, n) = self.prefixed(what)?;
        self.utf8(&self.data[start..start + n], what)
    }

    fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        self.str(what).map(str::to_owned)
    }

    /// Binary data, sliced from the packet.
    fn binary(&mut self, what: &str) -> Result<Bytes, DecodeError> {
        let (start, n) = self.prefixed(what)?;
        Ok(self.frame.slice(start..start + n))
    }

    /// A UTF-8 string kept as bytes sliced from the packet.
    fn topic(&mut self, what: &str) -> Result<Bytes, DecodeError> {
        let (start, n) = self.prefixed(what)?;
        self.utf8(&self.data[start..start + n], what)?;
        Ok(self.frame.slice(start..start + n))
    }

    fn utf8(&self, b: &'a [u8], what: &str) -> Result<&'a str, DecodeError> {
        let Ok(s) = std::str::from_utf8(b) else {
            return Err(malformed(format!("{} {what} is not UTF-8", self.name)));
        };
        if b.contains(&0) {
            return Err(malformed(format!("{} {what} contains U+0000", self.name)));
        }
        Ok(s)
    }

    /// The rest of the body, sliced from the packet.
    fn rest(&mut self) -> Bytes {
        let start = self.pos;
        self.pos = self.end;
        self.frame.slice(start..self.end)
    }

    /// A reason code, one of `allowed`.
    fn code(&mut self, allowed: &[u8]) -> Result<u8, DecodeError> {
        let code = self.u8("reason code")?;
        if allowed.contains(&code) {
            Ok(code)
        } else {
            Err(self.protocol(format!("{} with reason code 0x{code:02X}", self.name)))
        }
    }

    /// An MQTT 5 property section: its length, then properties, each handed to `f` once it
    /// is checked to be allowed in `ctx`, not repeated unless it may be, and of a valid value.
    fn properties(&mut self, ctx: Ctx, mut f: impl FnMut(u8, Prop)) -> Result<(), DecodeError> {
        let len = self.vbi("property length")? as usize;
        if len == 0 {
            return Ok(());
        }
        if self.end - self.pos < len {
            return Err(malformed(format!(
                "{} property length {len} runs past the end of the packet",
                self.name
            )));
        }
        let outer = self.end;
        self.end = self.pos + len;
        let mut seen = 0u64;
        while !self.at_end() {
            let id = self.u8("property identifier")?;
            let Some((name, kind, allowed)) = property(id) else {
                return Err(malformed(format!(
                    "{} with unknown property 0x{id:02X}",
                    self.name
                )));
            };
            if allowed & ctx.bit() == 0 {
                return Err(malformed(format!(
                    "{name} property is not allowed in {}",
                    ctx.name(self.name)
                )));
            }
            let repeats = id == USER_PROPERTY || (id == SUBSCRIPTION_ID && ctx == Ctx::Publish);
            if !repeats {
                if seen & (1 << id) != 0 {
                    return Err(DecodeError::Protocol(
                        format!("duplicate {name} property").into(),
                    ));
                }
                seen |= 1 << id;
            }
            let value = match kind {
                Kind::Byte => {
                    let b = self.u8(name)?;
                    if b > 1 {
                        return Err(DecodeError::Protocol(
                            format!("{name} of {b}, not 0 or 1").into(),
                        ));
                    }
                    Prop::Byte(b)
                }
                Kind::U16 => Prop::U16(self.u16(name)?),
                Kind::U32 => Prop::U32(self.u32(name)?),
                Kind::Vbi => Prop::U32(self.vbi(name)?),
                Kind::Str => Prop::Str(self.string(name)?),
                Kind::Bin => Prop::Bin(self.binary(name)?),
                Kind::Pair => Prop::Pair(self.string(name)?, self.string(name)?),
            };
            let zero = matches!(value, Prop::U16(0) | Prop::U32(0));
            if zero && matches!(id, RECEIVE_MAXIMUM | MAXIMUM_PACKET_SIZE | SUBSCRIPTION_ID) {
                return Err(DecodeError::Protocol(format!("{name} of 0").into()));
            }
            f(id, value);
        }
        self.end = outer;
        Ok(())
    }
}

/// The packet (or part of one) a property section belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Connect,
    Will,
    ConnAck,
    Publish,
    Ack,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

impl Ctx {
    const fn bit(self) -> u16 {
        1 << self as u16
    }

    fn name(self, packet: &'static str) -> &'static str {
        match self {
            Ctx::Will => "will properties",
            _ => packet,
        }
    }
}

/// The type of a property's value.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Byte,
    U16,
    U32,
    Vbi,
    Str,
    Bin,
    Pair,
}

/// A property's value as read.
enum Prop {
    Byte(u8),
    U16(u16),
    U32(u32),
    Str(String),
    Bin(Bytes),
    Pair(String, String),
}

const PAYLOAD_FORMAT: u8 = 0x01;
const MESSAGE_EXPIRY: u8 = 0x02;
const CONTENT_TYPE: u8 = 0x03;
const RESPONSE_TOPIC: u8 = 0x08;
const CORRELATION_DATA: u8 = 0x09;
const SUBSCRIPTION_ID: u8 = 0x0B;
const SESSION_EXPIRY: u8 = 0x11;
const ASSIGNED_CLIENT_ID: u8 = 0x12;
const SERVER_KEEP_ALIVE: u8 = 0x13;
const AUTH_METHOD: u8 = 0x15;
const AUTH_DATA: u8 = 0x16;
const REQUEST_PROBLEM: u8 = 0x17;
const WILL_DELAY: u8 = 0x18;
const REQUEST_RESPONSE: u8 = 0x19;
const RESPONSE_INFORMATION: u8 = 0x1A;
const SERVER_REFERENCE: u8 = 0x1C;
const REASON_STRING: u8 = 0x1F;
const RECEIVE_MAXIMUM: u8 = 0x21;
const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
const TOPIC_ALIAS: u8 = 0x23;
const MAXIMUM_QOS: u8 = 0x24;
const RETAIN_AVAILABLE: u8 = 0x25;
const USER_PROPERTY: u8 = 0x26;
const MAXIMUM_PACKET_SIZE: u8 = 0x27;
const WILDCARD_AVAILABLE: u8 = 0x28;
const SUBSCRIPTION_IDS_AVAILABLE: u8 = 0x29;
const SHARED_AVAILABLE: u8 = 0x2A;

/// A property's name, value type and the packets it may appear in (MQTT 5, 2.2.2.2).
fn property(id: u8) -> Option<(&'static str, Kind, u16)> {
    use Ctx::*;
    const MESSAGE: u16 = Publish.bit() | Will.bit();
    const REASONS: u16 =
        ConnAck.bit() | Ack.bit() | SubAck.bit() | UnsubAck.bit() | Disconnect.bit() | Auth.bit();
    Some(match id {
        PAYLOAD_FORMAT => ("Payload Format Indicator", Kind::Byte, MESSAGE),
        MESSAGE_EXPIRY => ("Message Expiry Interval", Kind::U32, MESSAGE),
        CONTENT_TYPE => ("Content Type", Kind::Str, MESSAGE),
        RESPONSE_TOPIC => ("Response Topic", Kind::Str, MESSAGE),
        CORRELATION_DATA => ("Correlation Data", Kind::Bin, MESSAGE),
        SUBSCRIPTION_ID => (
            "Subscription Identifier",
            Kind::Vbi,
            Publish.bit() | Subscribe.bit(),
        ),
        SESSION_EXPIRY => (
            "Session Expiry Interval",
            Kind::U32,
            Connect.bit() | ConnAck.bit() | Disconnect.bit(),
        ),
        ASSIGNED_CLIENT_ID => ("Assigned Client Identifier", Kind::Str, ConnAck.bit()),
        SERVER_KEEP_ALIVE => ("Server Keep Alive", Kind::U16, ConnAck.bit()),
        AUTH_METHOD => (
            "Authentication Method",
            Kind::Str,
            Connect.bit() | ConnAck.bit() | Auth.bit(),
        ),
        AUTH_DATA => (
            "Authentication Data",
            Kind::Bin,
            Connect.bit() | ConnAck.bit() | Auth.bit(),
        ),
        REQUEST_PROBLEM => ("Request Problem Information", Kind::Byte, Connect.bit()),
        WILL_DELAY => ("Will Delay Interval", Kind::U32, Will.bit()),
        REQUEST_RESPONSE => ("Request Response Information", Kind::Byte, Connect.bit()),
        RESPONSE_INFORMATION => ("Response Information", Kind::Str, ConnAck.bit()),
        SERVER_REFERENCE => (
            "Server Reference",
            Kind::Str,
            ConnAck.bit() | Disconnect.bit(),
        ),
        REASON_STRING => ("Reason String", Kind::Str, REASONS),
        RECEIVE_MAXIMUM => ("Receive Maximum", Kind::U16, Connect.bit() | ConnAck.bit()),
        TOPIC_ALIAS_MAXIMUM => (
            "Topic Alias Maximum",
            Kind::U16,
            Connect.bit() | ConnAck.bit(),
        ),
        TOPIC_ALIAS => ("Topic Alias", Kind::U16, Publish.bit()),
        MAXIMUM_QOS => ("Maximum QoS", Kind::Byte, ConnAck.bit()),
        RETAIN_AVAILABLE => ("Retain Available", Kind::Byte, ConnAck.bit()),
        USER_PROPERTY => ("User Property", Kind::Pair, u16::MAX),
        MAXIMUM_PACKET_SIZE => (
            "Maximum Packet Size",
            Kind::U32,
            Connect.bit() | ConnAck.bit(),
        ),
        WILDCARD_AVAILABLE => ("Wildcard Subscription Available", Kind::Byte, ConnAck.bit()),
        SUBSCRIPTION_IDS_AVAILABLE => (
            "Subscription Identifier Available",
            Kind::Byte,
            ConnAck.bit(),
        ),
        SHARED_AVAILABLE => ("Shared Subscription Available", Kind::Byte, ConnAck.bit()),
        _ => return None,
    })
}

/// Stores a property of an application message (the caller has checked `id` is allowed).
fn message_property(m: &mut MessageProperties, id: u8, value: Prop) {
    match (id, value) {
        (PAYLOAD_FORMAT, Prop::Byte(b)) => m.payload_is_utf8 = Some(b == 1),
        (MESSAGE_EXPIRY, Prop::U32(n)) => m.message_expiry = Some(n),
        (CONTENT_TYPE, Prop::Str(s)) => m.content_type = Some(s),
        (RESPONSE_TOPIC, Prop::Str(s)) => m.response_topic = Some(s),
        (CORRELATION_DATA, Prop::Bin(b)) => m.correlation_data = Some(b),
        (USER_PROPERTY, Prop::Pair(k, v)) => m.user_properties.push((k, v)),
        _ => {}
    }
}

fn boxed(m: MessageProperties) -> Option<Box<MessageProperties>> {
    (!m.is_empty()).then(|| Box::new(m))
}

fn connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.str("protocol name")?;
    let level = r.u8("protocol level")?;
    let expected = if r.v5() { 5 } else { 4 };
    if name != "MQTT" || level != expected {
        return Err(DecodeError::UnsupportedProtocol(
            format!("protocol {name:?} level {level}, expected \"MQTT\" level {expected}").into(),
        ));
    }
    let flags = r.u8("connect flags")?;
    if flags & 1 != 0 {
        return Err(malformed("CONNECT with its reserved flag set"));
    }
    let has_will = flags & 0b100 != 0;
    let will_qos = (flags >> 3) & 3;
    let will_retain = flags & 0b10_0000 != 0;
    let has_password = flags & 0b100_0000 != 0;
    let has_username = flags & 0b1000_0000 != 0;
    if !has_will && (will_qos != 0 || will_retain) {
        return Err(malformed(
            "CONNECT with will QoS or will retain but no will",
        ));
    }
    let Some(will_qos) = QoS::from_u8(will_qos) else {
        return Err(malformed("CONNECT with will QoS 3"));
    };
    if has_password && !has_username && !r.v5() {
        return Err(malformed("CONNECT with a password but no user name"));
    }
    let mut c = Connect {
        clean_start: flags & 0b10 != 0,
        keep_alive: r.u16("keep alive")?,
        receive_maximum: u16::MAX,
        request_problem_information: true,
        ..Connect::default()
    };
    if r.v5() {
        r.properties(Ctx::Connect, |id, value| match (id, value) {
            (SESSION_EXPIRY, Prop::U32(n)) => c.session_expiry = n,
            (RECEIVE_MAXIMUM, Prop::U16(n)) => c.receive_maximum = n,
            (MAXIMUM_PACKET_SIZE, Prop::U32(n)) => c.maximum_packet_size = Some(n),
            (TOPIC_ALIAS_MAXIMUM, Prop::U16(n)) => c.topic_alias_maximum = n,
            (REQUEST_RESPONSE, Prop::Byte(b)) => c.request_response_information = b == 1,
            (REQUEST_PROBLEM, Prop::Byte(b)) => c.request_problem_information = b == 1,
            (USER_PROPERTY, Prop::Pair(k, v)) => c.user_properties.push((k, v)),
            (AUTH_METHOD, Prop::Str(s)) => c.authentication_method = Some(s),
            (AUTH_DATA, Prop::Bin(b)) => c.authentication_data = Some(b),
            _ => {}
        })?;
        if c.authentication_data.is_some() && c.authentication_method.is_none() {
            return Err(DecodeError::Protocol(
                "CONNECT with Authentication Data but no Authentication Method".into(),
            ));
        }
    }
    c.client_id = r.string("client id")?;
    if has_will {
        let mut will = Will {
            qos: will_qos,
            retain: will_retain,
            ..Will::default()
        };
        if r.v5() {
            let mut m = MessageProperties::default();
            r.properties(Ctx::Will, |id, value| match (id, value) {
                (WILL_DELAY, Prop::U32(n)) => will.delay = n,
                (id, value) => message_property(&mut m, id, value),
            })?;
            will.properties = boxed(m);
        }
        will.topic = r.topic("will topic")?;
        will.payload = r.binary("will payload")?;
        let says_utf8 = will
            .properties
            .as_ref()
            .is_some_and(|m| m.payload_is_utf8 == Some(true));
        if says_utf8 && std::str::from_utf8(&will.payload).is_err() {
            return Err(DecodeError::PayloadFormatInvalid(
                "will payload is not UTF-8 but its Payload Format Indicator says it is".into(),
            ));
        }
        c.will = Some(will);
    }
    if has_username {
        c.username = Some(r.string("user name")?);
    }
    if has_password {
        c.password = Some(r.binary("password")?);
    }
    Ok(c)
}

fn connack(r: &mut Reader) -> Result<ConnAck, DecodeError> {
    let flags = r.u8("acknowledge flags")?;
    if flags & 0xFE != 0 {
        return Err(malformed(format!(
            "CONNACK with acknowledge flags {flags:08b}: bits 7-1 are reserved"
        )));
    }
    let mut c = ConnAck {
        session_present: flags & 1 != 0,
        ..ConnAck::default()
    };
    if r.v5() {
        c.code = r.code(CONNACK_CODES)?;
    } else {
        let code = r.u8("return code")?;
        let Some(&mapped) = CONNACK_V311.get(usize::from(code)) else {
            return Err(malformed(format!("CONNACK with return code {code}")));
        };
        c.code = mapped;
    }
    if c.session_present && c.code != reason::SUCCESS {
        return Err(r.protocol(format!(
            "CONNACK with session present and reason code 0x{:02X}",
            c.code
        )));
    }
    if r.v5() {
        r.properties(Ctx::ConnAck, |id, value| match (id, value) {
            (SESSION_EXPIRY, Prop::U32(n)) => c.session_expiry = Some(n),
            (RECEIVE_MAXIMUM, Prop::U16(n)) => c.receive_maximum = Some(n),
            (MAXIMUM_QOS, Prop::Byte(b)) => c.maximum_qos = QoS::from_u8(b),
            (RETAIN_AVAILABLE, Prop::Byte(b)) => c.retain_available = Some(b == 1),
            (MAXIMUM_PACKET_SIZE, Prop::U32(n)) => c.maximum_packet_size = Some(n),
            (ASSIGNED_CLIENT_ID, Prop::Str(s)) => c.assigned_client_id = Some(s),
            (TOPIC_ALIAS_MAXIMUM, Prop::U16(n)) => c.topic_alias_maximum = Some(n),
            (REASON_STRING, Prop::Str(s)) => c.reason_string = Some(s),
            (USER_PROPERTY, Prop::Pair(k, v)) => c.user_properties.push((k, v)),
            (WILDCARD_AVAILABLE, Prop::Byte(b)) => {
                c.wildcard_subscription_available = Some(b == 1);
            }
            (SUBSCRIPTION_IDS_AVAILABLE, Prop::Byte(b)) => {
                c.subscription_identifiers_available = Some(b == 1);
            }
            (SHARED_AVAILABLE, Prop::Byte(b)) => c.shared_subscription_available = Some(b == 1),
            (SERVER_KEEP_ALIVE, Prop::U16(n)) => c.server_keep_alive = Some(n),
            (RESPONSE_INFORMATION, Prop::Str(s)) => c.response_information = Some(s),
            (SERVER_REFERENCE, Prop::Str(s)) => c.server_reference = Some(s),
            (AUTH_METHOD, Prop::Str(s)) => c.authentication_method = Some(s),
            (AUTH_DATA, Prop::Bin(b)) => c.authentication_data = Some(b),
            _ => {}
        })?;
    }
    Ok(c)
}

fn publish(r: &mut Reader, first: u8) -> Result<Publish, DecodeError> {
    let qos = match (first >> 1) & 3 {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
    let topic = r.topic("topic name")?;
    let pkid = if qos == QoS::AtMostOnce { 0 } else { r.pkid()? };
    let mut p = Publish {
        dup: first & 0b1000 != 0,
        qos,
        retain: first & 1 != 0,
        topic,
        pkid,
        ..Publish::default()
    };
    if r.v5() {
        let mut m = MessageProperties::default();
        r.properties(Ctx::Publish, |id, value| match (id, value) {
            (TOPIC_ALIAS, Prop::U16(n)) => p.topic_alias = Some(n),
            (SUBSCRIPTION_ID, Prop::U32(n)) => p.subscription_ids.push(n),
            (id, value) => message_property(&mut m, id, value),
        })?;
        p.properties = boxed(m);
    }
    if p.topic.is_empty() && p.topic_alias.is_none() {
        return Err(r.protocol("PUBLISH with an empty topic name and no topic alias".into()));
    }
    p.payload = r.rest();
    Ok(p)
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP, whose reason codes are `codes`.
fn ack(r: &mut Reader, codes: &[u8]) -> Result<Ack, DecodeError> {
    let mut a = Ack::new(r.pkid()?);
    if r.v5() && !r.at_end() {
        a.code = r.code(codes)?;
        if !r.at_end() {
            r.properties(Ctx::Ack, |id, value| match (id, value) {
                (REASON_STRING, Prop::Str(s)) => a.reason_string = Some(s),
                (USER_PROPERTY, Prop::Pair(k, v)) => a.user_properties.push((k, v)),
                _ => {}
            })?;
        }
    }
    Ok(a)
}

fn subscribe(r: &mut Reader) -> Result<Subscribe, DecodeError> {
    let mut s = Subscribe {
        pkid: r.pkid()?,
        ..Subscribe::default()
    };
    if r.v5() {
        r.properties(Ctx::Subscribe, |id, value| match (id, value) {
            (SUBSCRIPTION_ID, Prop::U32(n)) => s.id = Some(n),
            (USER_PROPERTY, Prop::Pair(k, v)) => s.user_properties.push((k, v)),
            _ => {}
        })?;
    }
    while !r.at_end() {
        let filter = r.string("topic filter")?;
        let options = r.u8("subscription options")?;
        let reserved = if r.v5() { 0b1100_0000 } else { 0b1111_1100 };
        if options & reserved != 0 {
            return Err(malformed(format!(
                "SUBSCRIBE with subscription options {options:08b}: reserved bits set"
            )));
        }
        let Some(qos) = QoS::from_u8(options & 3) else {
            return Err(malformed("SUBSCRIBE with QoS 3"));
        };
        let retain_handling = (options >> 4) & 3;
        if retain_handling == 3 {
            return Err(DecodeError::Protocol(
                "SUBSCRIBE with retain handling 3".into(),
            ));
        }
        let o = SubscriptionOptions {
            qos,
            no_local: options & 0b100 != 0,
            retain_as_published: options & 0b1000 != 0,
            retain_handling,
        };
        s.filters.push((filter, o));
    }
    if s.filters.is_empty() {
        return Err(r.protocol("SUBSCRIBE with no topic filter".into()));
    }
    Ok(s)
}

fn suback(r: &mut Reader) -> Result<SubAck, DecodeError> {
    let mut s = SubAck {
        pkid: r.pkid()?,
        ..SubAck::default()
    };
    let codes = if r.v5() {
        r.properties(Ctx::SubAck, |id, value| match (id, value) {
            (REASON_STRING, Prop::Str(x)) => s.reason_string = Some(x),
            (USER_PROPERTY, Prop::Pair(k, v)) => s.user_properties.push((k, v)),
            _ => {}
        })?;
        SUBACK_CODES
    } else {
        SUBACK_CODES_V311
    };
    while !r.at_end() {
        s.codes.push(r.code(codes)?);
    }
    if s.codes.is_empty() {
        return Err(r.protocol("SUBACK with no reason code".into()));
    }
    Ok(s)
}

fn unsubscribe(r: &mut Reader) -> Result<Unsubscribe, DecodeError> {
    let mut u = Unsubscribe {
        pkid: r.pkid()?,
        ..Unsubscribe::default()
    };
    if r.v5() {
        r.properties(Ctx::Unsubscribe, |id, value| {
            if let (USER_PROPERTY, Prop::Pair(k, v)) = (id, value) {
                u.user_properties.push((k, v));
            }
        })?;
    }
    while !r.at_end() {
        u.filters.push(r.string("topic filter")?);
    }
    if u.filters.is_empty() {
        return Err(r.protocol("UNSUBSCRIBE with no topic filter".into()));
    }
    Ok(u)
}

fn unsuback(r: &mut Reader) -> Result<UnsubAck, DecodeError> {
    let mut u = UnsubAck {
        pkid: r.pkid()?,
        ..UnsubAck::default()
    };
    if r.v5() {
        r.properties(Ctx::UnsubAck, |id, value| match (id, value) {
            (REASON_STRING, Prop::Str(x)) => u.reason_string = Some(x),
            (USER_PROPERTY, Prop::Pair(k, v)) => u.user_properties.push((k, v)),
            _ => {}
        })?;
        while !r.at_end() {
            u.codes.push(r.code(UNSUBACK_CODES)?);
        }
        if u.codes.is_empty() {
            return Err(DecodeError::Protocol("UNSUBACK with no reason code".into()));
        }
    }
    Ok(u)
}

fn disconnect(r: &mut Reader) -> Result<Disconnect, DecodeError> {
    let mut d = Disconnect::default();
    if r.v5() && !r.at_end() {
        d.code = r.code(DISCONNECT_CODES)?;
        if !r.at_end() {
            r.properties(Ctx::Disconnect, |id, value| match (id, value) {
                (SESSION_EXPIRY, Prop::U32(n)) => d.session_expiry = Some(n),
                (REASON_STRING, Prop::Str(s)) => d.reason_string = Some(s),
                (USER_PROPERTY, Prop::Pair(k, v)) => d.user_properties.push((k, v)),
                (SERVER_REFERENCE, Prop::Str(s)) => d.server_reference = Some(s),
                _ => {}
            })?;
        }
    }
    Ok(d)
}

fn auth(r: &mut Reader) -> Result<Auth, DecodeError> {
    let mut a = Auth::default();
    if !r.at_end() {
        a.code = r.code(AUTH_CODES)?;
        if !r.at_end() {
            r.properties(Ctx::Auth, |id, value| match (id, value) {
                (AUTH_METHOD, Prop::Str(s)) => a.method = Some(s),
                (AUTH_DATA, Prop::Bin(b)) => a.data = Some(b),
                (REASON_STRING, Prop::Str(s)) => a.reason_string = Some(s),
                (USER_PROPERTY, Prop::Pair(k, v)) => a.user_properties.push((k, v)),
                _ => {}
            })?;
        }
    }
    Ok(a)
}

//! MQTT 3.1.1 and 5 packets: the types, and the codec that reads and writes them.
//!
//! The broker's own codec, not a library's: a server must answer every malformed or
//! forbidden packet with its own reason code (MQTT 5, 4.13), which needs the decoder to say
//! exactly what was wrong; and it must write QoS 1 and 2 publishes with packet ids it chose.
//! The codec is sans-io: bytes in, packets out, and packets in, bytes out.
//!
//! One set of types serves both versions. Properties are MQTT 5 only; written for a 3.1.1
//! client they are left out, and read from one they are always empty. Reason codes are MQTT 5
//! numbers ([`reason`]); [`encode`] maps them to the 3.1.1 return codes where 3.1.1 has them.
//!
//! Strings are checked as MQTT asks (UTF-8, no U+0000). Topic names are kept as [`Bytes`], a
//! slice of the packet, so that a reading's topic and payload need no copy on the way to
//! ingest; the decoder has checked they are UTF-8.

mod decode;
mod encode;
#[cfg(test)]
mod tests;

use bytes::Bytes;

pub use decode::{DecodeError, connect_level, decode};
pub use encode::{encode, encoded_len, fitted};

/// The protocol version of a connection, from its CONNECT's protocol level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5 (protocol level 5).
    V5,
}

impl Version {
    /// True for MQTT 5.
    pub fn is_v5(self) -> bool {
        self == Version::V5
    }
}

/// Quality of service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum QoS {
    /// At most once.
    #[default]
    AtMostOnce = 0,
    /// At least once.
    AtLeastOnce = 1,
    /// Exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// The QoS for `n`, if it is 0, 1 or 2.
    pub fn from_u8(n: u8) -> Option<QoS> {
        match n {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// MQTT 5 reason codes (MQTT 5, 2.4), the ones the broker sends or reads.
pub mod reason {
    /// Success, normal disconnection, granted QoS 0.
    pub const SUCCESS: u8 = 0x00;
    /// Granted QoS 1.
    pub const GRANTED_QOS_1: u8 = 0x01;
    /// Granted QoS 2.
    pub const GRANTED_QOS_2: u8 = 0x02;
    /// Disconnect with will message.
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    /// No matching subscribers.
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    /// No subscription existed.
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    /// Unspecified error.
    pub const UNSPECIFIED: u8 = 0x80;
    /// Malformed packet.
    pub const MALFORMED: u8 = 0x81;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x82;
    /// Implementation specific error.
    pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
    /// Unsupported protocol version.
    pub const UNSUPPORTED_PROTOCOL_VERSION: u8 = 0x84;
    /// Client identifier not valid.
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    /// Bad user name or password.
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    /// Not authorized.
    pub const NOT_AUTHORIZED: u8 = 0x87;
    /// Server unavailable.
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    /// Server busy.
    pub const SERVER_BUSY: u8 = 0x89;
    /// Banned.
    pub const BANNED: u8 = 0x8A;
    /// Server shutting down.
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    /// Bad authentication method.
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    /// Keep alive timeout.
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    /// Session taken over.
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    /// Topic filter invalid.
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    /// Topic name invalid.
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    /// Packet identifier in use.
    pub const PACKET_ID_IN_USE: u8 = 0x91;
    /// Packet identifier not found.
    pub const PACKET_ID_NOT_FOUND: u8 = 0x92;
    /// Receive maximum exceeded.
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    /// Topic alias invalid.
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    /// Packet too large.
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    /// Message rate too high.
    pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
    /// Quota exceeded.
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    /// Administrative action.
    pub const ADMINISTRATIVE_ACTION: u8 = 0x98;
    /// Payload format invalid.
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
    /// Retain not supported.
    pub const RETAIN_NOT_SUPPORTED: u8 = 0x9A;
    /// QoS not supported.
    pub const QOS_NOT_SUPPORTED: u8 = 0x9B;
    /// Shared subscriptions not supported.
    pub const SHARED_SUBSCRIPTIONS_NOT_SUPPORTED: u8 = 0x9E;
    /// Subscription identifiers not supported.
    pub const SUBSCRIPTION_IDS_NOT_SUPPORTED: u8 = 0xA1;
    /// Wildcard subscriptions not supported.
    pub const WILDCARDS_NOT_SUPPORTED: u8 = 0xA2;
}

/// A user property: name and value.
pub type UserProperty = (String, String);

/// CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Connect {
    /// Clean start (MQTT 5) or clean session (3.1.1).
    pub clean_start: bool,
    /// Seconds; 0 switches keep-alive off.
    pub keep_alive: u16,
    /// May be empty.
    pub client_id: String,
    /// The last will, if the will flag is set.
    pub will: Option<Will>,
    /// User name, if the user name flag is set.
    pub username: Option<String>,
    /// Password (binary data), if the password flag is set.
    pub password: Option<Bytes>,
    /// Session expiry interval in seconds; absent is 0.
    pub session_expiry: u32,
    /// Receive maximum; absent is 65,535. Never 0 (a protocol error).
    pub receive_maximum: u16,
    /// Maximum packet size the client accepts. Never 0 (a protocol error).
    pub maximum_packet_size: Option<u32>,
    /// Topic alias maximum the client accepts; absent is 0.
    pub topic_alias_maximum: u16,
    /// Request response information; absent is false.
    pub request_response_information: bool,
    /// Request problem information; absent is true.
    pub request_problem_information: bool,
    /// User properties (MQTT 5).
    pub user_properties: Vec<UserProperty>,
    /// Authentication method (MQTT 5).
    pub authentication_method: Option<String>,
    /// Authentication data (MQTT 5).
    pub authentication_data: Option<Bytes>,
}

/// The last will of a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Will {
    /// Checked to be UTF-8 (not yet checked to be a valid topic name: that is the session's).
    pub topic: Bytes,
    /// The will message.
    pub payload: Bytes,
    /// The will QoS.
    pub qos: QoS,
    /// Published retained.
    pub retain: bool,
    /// Will delay interval in seconds; absent is 0.
    pub delay: u32,
    /// The will's message properties (MQTT 5).
    pub properties: Option<Box<MessageProperties>>,
}

/// The properties of an application message that travel with it to subscribers (MQTT 5).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageProperties {
    /// Payload format indicator: `Some(true)` says the payload is UTF-8.
    pub payload_is_utf8: Option<bool>,
    /// Message expiry interval in seconds.
    pub message_expiry: Option<u32>,
    /// Content type.
    pub content_type: Option<String>,
    /// Response topic.
    pub response_topic: Option<String>,
    /// Correlation data.
    pub correlation_data: Option<Bytes>,
    /// User properties.
    pub user_properties: Vec<UserProperty>,
}

impl MessageProperties {
    /// True if no property is set.
    pub fn is_empty(&self) -> bool {
        *self == MessageProperties::default()
    }
}

/// CONNACK.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnAck {
    /// The server has a session for the client.
    pub session_present: bool,
    /// An MQTT 5 reason code; mapped to a 3.1.1 return code when written for 3.1.1.
    pub code: u8,
    /// Session expiry interval the server uses instead of the client's.
    pub session_expiry: Option<u32>,
    /// Receive maximum of the server.
    pub receive_maximum: Option<u16>,
    /// Maximum QoS the server accepts (0 or 1; absent is 2).
    pub maximum_qos: Option<QoS>,
    /// Retained messages are supported; absent is true.
    pub retain_available: Option<bool>,
    /// Maximum packet size the server accepts.
    pub maximum_packet_size: Option<u32>,
    /// The client id the server assigned to a client that sent none.
    pub assigned_client_id: Option<String>,
    /// Topic alias maximum the server accepts.
    pub topic_alias_maximum: Option<u16>,
    /// Reason string.
    pub reason_string: Option<String>,
    /// User properties.
    pub user_properties: Vec<UserProperty>,
    /// Wildcard subscriptions are supported; absent is true.
    pub wildcard_subscription_available: Option<bool>,
    /// Subscription identifiers are supported; absent is true.
    pub subscription_identifiers_available: Option<bool>,
    /// Shared subscriptions are supported; absent is true.
    pub shared_subscription_available: Option<bool>,
    /// Keep alive the server uses instead of the client's.
    pub server_keep_alive: Option<u16>,
    /// Response information.
    pub response_information: Option<String>,
    /// Another server the client may use.
    pub server_reference: Option<String>,
    /// Authentication method.
    pub authentication_method: Option<String>,
    /// Authentication data.
    pub authentication_data: Option<Bytes>,
}

/// PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Publish {
    /// Duplicate delivery flag.
    pub dup: bool,
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// UTF-8 (checked by the decoder). Empty only with a topic alias (MQTT 5).
    pub topic: Bytes,
    /// 0 for QoS 0; never 0 otherwise.
    pub pkid: u16,
    /// Application message.
    pub payload: Bytes,
    /// Topic alias (MQTT 5). 0 is kept as read: the session refuses it.
    pub topic_alias: Option<u16>,
    /// Subscription identifiers (MQTT 5): server to client only.
    pub subscription_ids: Vec<u32>,
    /// Message properties (MQTT 5); `None` when there are none, as for every 3.1.1 publish.
    pub properties: Option<Box<MessageProperties>>,
}

/// PUBACK, PUBREC, PUBREL or PUBCOMP: a packet id, a reason code and, in MQTT 5, properties.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ack {
    /// Packet id of the acknowledged publish (never 0).
    pub pkid: u16,
    /// An MQTT 5 reason code; 0 (success) when absent. Not written for 3.1.1.
    pub code: u8,
    /// Reason string (MQTT 5).
    pub reason_string: Option<String>,
    /// User properties (MQTT 5).
    pub user_properties: Vec<UserProperty>,
}

impl Ack {
    /// A success acknowledgement of `pkid`.
    pub fn new(pkid: u16) -> Ack {
        Ack {
            pkid,
            ..Ack::default()
        }
    }

    /// An acknowledgement of `pkid` with `code`.
    pub fn with_code(pkid: u16, code: u8) -> Ack {
        Ack {
            pkid,
            code,
            ..Ack::default()
        }
    }
}

/// The options of one filter in a SUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubscriptionOptions {
    /// Maximum QoS.
    pub qos: QoS,
    /// Not sent what this client publishes itself (MQTT 5).
    pub no_local: bool,
    /// Forwarded with the retain flag as published (MQTT 5).
    pub retain_as_published: bool,
    /// 0: send retained messages at subscribe; 1: only if the subscription is new; 2: never.
    pub retain_handling: u8,
}

/// SUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subscribe {
    /// Packet id (never 0).
    pub pkid: u16,
    /// Filters as read (UTF-8, no U+0000; not yet checked to be valid filters). Never empty.
    pub filters: Vec<(String, SubscriptionOptions)>,
    /// Subscription identifier (MQTT 5), 1 to 268,435,455.
    pub id: Option<u32>,
    /// User properties (MQTT 5).
    pub user_properties: Vec<UserProperty>,
}

/// SUBACK.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SubAck {
    /// Packet id of the SUBSCRIBE.
    pub pkid: u16,
    /// One MQTT 5 reason code per filter; any code of 0x80 or above is written as 0x80 for
    /// 3.1.1.
    pub codes: Vec<u8>,
    /// Reason string (MQTT 5).
    pub reason_string: Option<String>,
    /// User properties (MQTT 5).
    pub user_properties: Vec<UserProperty>,
}

/// UNSUBSCRIBE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Unsubscribe {
    /// Packet id (never 0).
    pub pkid: u16,
    /// Never empty.
    pub filters: Vec<String>,
    /// User properties (MQTT 5).
    pub user_properties: Vec<UserProperty>,
}

/// UNSUBACK. 3.1.1 has no codes: they are left out when written for it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UnsubAck {
    /// Packet id of the UNSUBSCRIBE.
    pub pkid: u16,
    /// One MQTT 5 reason code per filter.
    pub codes: Vec<u8>,
    /// Reason string (MQTT 5).
    pub reason_string: Option<String>,
    /// User properties (MQTT 5).
    pub user_properties: Vec<UserProperty>,
}

/// DISCONNECT. From a 3.1.1 client it is always a normal disconnection; the server never
/// sends one to a 3.1.1 client ([`encode`] writes nothing).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Disconnect {
    /// MQTT 5 reason code; 0 is a normal disconnection.
    pub code: u8,
    /// Session expiry interval the client sets at disconnection.
    pub session_expiry: Option<u32>,
    /// Reason string.
    pub reason_string: Option<String>,
    /// User properties.
    pub user_properties: Vec<UserProperty>,
    /// Another server the client may use.
    pub server_reference: Option<String>,
}

impl Disconnect {
    /// A DISCONNECT with `code` and, if not empty, a reason string.
    pub fn new(code: u8, why: &str) -> Disconnect {
        Disconnect {
            code,
            reason_string: (!why.is_empty()).then(|| why.to_owned()),
            ..Disconnect::default()
        }
    }
}

/// AUTH (MQTT 5).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Auth {
    /// MQTT 5 reason code: 0x00 success, 0x18 continue, 0x19 re-authenticate.
    pub code: u8,
    /// Authentication method.
    pub method: Option<String>,
    /// Authentication data.
    pub data: Option<Bytes>,
    /// Reason string.
    pub reason_string: Option<String>,
    /// User properties.
    pub user_properties: Vec<UserProperty>,
}

/// An MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNECT: a client asks to connect.
    Connect(Box<Connect>),
    /// CONNACK: the server answers a CONNECT.
    ConnAck(Box<ConnAck>),
    /// PUBLISH: an application message.
    Publish(Publish),
    /// PUBACK: a QoS 1 publish was received.
    PubAck(Ack),
    /// PUBREC: a QoS 2 publish was received (first step).
    PubRec(Ack),
    /// PUBREL: a QoS 2 publish is released (second step).
    PubRel(Ack),
    /// PUBCOMP: a QoS 2 publish is complete (third step).
    PubComp(Ack),
    /// SUBSCRIBE: a client subscribes to filters.
    Subscribe(Subscribe),
    /// SUBACK: the server answers a SUBSCRIBE.
    SubAck(SubAck),
    /// UNSUBSCRIBE: a client unsubscribes from filters.
    Unsubscribe(Unsubscribe),
    /// UNSUBACK: the server answers an UNSUBSCRIBE.
    UnsubAck(UnsubAck),
    /// PINGREQ: a client keeps the connection alive.
    PingReq,
    /// PINGRESP: the server answers a PINGREQ.
    PingResp,
    /// DISCONNECT: either side closes the connection.
    Disconnect(Disconnect),
    /// AUTH: an authentication exchange (MQTT 5).
    Auth(Auth),
}

impl Packet {
    /// The packet type's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}

//! One MQTT connection upstream, in MQTT 5 or 3.1.1: rumqttc has a client of each, with their
//! own types; this module puts both behind one client, one event loop and one set of events,
//! so that the uplink's loop is written once.
//!
//! Known rumqttc 0.25 behaviours this relies on or works around (read in its source):
//! - both event loops forget their queued requests when the broker answers
//!   `session_present = false`, which a clean start always gets: the uplink replays its own
//!   account after every connect;
//! - the MQTT 5 event loop applies the CONNACK's maximum packet size by failing the whole
//!   connection on a larger packet (`OutgoingPacketTooLarge`), and a PUBACK with an error reason
//!   code is only logged: the uplink checks sizes before it publishes and reads every PUBACK's
//!   reason itself;
//! - a topic alias above the broker's maximum fails the connection (`InvalidAlias`): aliases
//!   are only used up to the CONNACK's `topic_alias_max`.

use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode as Code5, Packet as Packet5, PubAckReason, PubCompReason, PubRecReason,
    PublishProperties,
};
use rumqttc::{Event, Outgoing, Packet, QoS};

use super::describe::{self, Failure, Setup};

/// The MQTT version of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Version {
    V5,
    V311,
}

impl Version {
    pub(super) fn name(self) -> &'static str {
        match self {
            Version::V5 => "MQTT 5",
            Version::V311 => "MQTT 3.1.1",
        }
    }

    pub(super) fn other(self) -> Version {
        match self {
            Version::V5 => Version::V311,
            Version::V311 => Version::V5,
        }
    }
}

/// What the upstream allows, from its CONNACK (MQTT 5); everything for MQTT 3.1.1, which says
/// nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Limits {
    pub retain: bool,
    pub max_qos: u8,
    pub max_packet: Option<u32>,
    pub topic_alias_max: u16,
}

impl Limits {
    pub(super) const ALL: Limits = Limits {
        retain: true,
        max_qos: 2,
        max_packet: None,
        topic_alias_max: 0,
    };
}

/// One event of the connection, in the uplink's terms.
#[derive(Debug)]
pub(super) enum Up {
    /// CONNACK with success.
    Connected(Limits),
    /// A publish went on the wire as this packet id.
    Sent(u16),
    /// The publish with this packet id is delivered (PUBACK, or PUBCOMP for QoS 2).
    Acked(u16),
    /// The upstream answered the publish with an error reason code (MQTT 5).
    Refused(u16, String),
    /// A keep-alive ping or its answer.
    Ping,
    /// The DISCONNECT went out.
    Disconnected,
    /// Anything else.
    Other,
    /// The connection failed or could not be made.
    Failed(Failure),
}

/// A publish as it goes on the wire.
#[derive(Debug, Clone)]
pub(super) struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 topic alias; with `topic` empty, the alias alone names the topic.
    pub alias: Option<u16>,
}

/// The options of both versions, kept in step.
#[derive(Clone)]
pub(super) struct Options {
    pub v4: rumqttc::MqttOptions,
    pub v5: v5::MqttOptions,
    /// One of a site pair: this gateway's id, for the `watchpost-gateway` user property.
    pub forwarded_by: Option<String>,
}

impl Options {
    pub(super) fn client_id(&self) -> String {
        self.v4.client_id()
    }

    pub(super) fn set_password(&mut self, user: &str, password: &str) {
        self.v4.set_credentials(user, password);
        self.v5.set_credentials(user, password);
    }
}

pub(super) enum Client {
    V4(rumqttc::AsyncClient),
    /// With the `watchpost-gateway` user property, if any.
    V5(v5::AsyncClient, Option<(String, String)>),
}

/// The MQTT 5 user property that names the gateway of a site pair that forwarded an alert.
pub const GATEWAY_PROPERTY: &str = "watchpost-gateway";

/// An event loop of either version, and whether its connection is up.
pub(super) struct Loop {
    inner: Inner,
    connected: bool,
}

enum Inner {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn qos5(level: u8) -> v5::mqttbytes::QoS {
    match level {
        0 => v5::mqttbytes::QoS::AtMostOnce,
        1 => v5::mqttbytes::QoS::AtLeastOnce,
        _ => v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// A client and its event loop. Alerts are small and go one at a time: without TCP_NODELAY
/// one could wait for the acknowledgement of the previous packet (Nagle's algorithm) and
/// reach the upstream tens of milliseconds late.
pub(super) fn new_client(options: &Options, version: Version, capacity: usize) -> (Client, Loop) {
    match version {
        Version::V311 => {
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options.v4.clone(), capacity);
            let mut network = eventloop.network_options();
            network.set_tcp_nodelay(true);
            eventloop.set_network_options(network);
            (
                Client::V4(client),
                Loop {
                    inner: Inner::V4(Box::new(eventloop)),
                    connected: false,
                },
            )
        }
        Version::V5 => {
            let mut opts = options.v5.clone();
            let mut network = opts.network_options();
            network.set_tcp_nodelay(true);
            opts.set_network_options(network);
            let (client, eventloop) = v5::AsyncClient::new(opts, capacity);
            (
                Client::V5(
                    client,
                    options
                        .forwarded_by
                        .clone()
                        .map(|id| (GATEWAY_PROPERTY.to_owned(), id)),
                ),
                Loop {
                    inner: Inner::V5(Box::new(eventloop)),
                    connected: false,
                },
            )
        }
    }
}

impl Client {
    /// Hands a publish to the event loop; false if its queue is full.
    pub(super) fn try_publish(&self, m: &Message) -> bool {
        let result = match self {
            Client::V4(c) => c
                .try_publish(m.topic.clone(), qos(m.qos), m.retain, m.payload.clone())
                .map_err(|e| e.to_string()),
            Client::V5(c, gateway) => {
                let properties = PublishProperties {
                    topic_alias: m.alias,
                    user_properties: gateway.iter().cloned().collect(),
                    ..Default::default()
                };
                c.try_publish_with_properties(
                    m.topic.clone(),
                    qos5(m.qos),
                    m.retain,
                    m.payload.clone(),
                    properties,
                )
                .map_err(|e| e.to_string())
            }
        };
        match result {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "uplink request queue full; will retry");
                false
            }
        }
    }

    /// Asks for a DISCONNECT; false if that could not even be queued.
    pub(super) fn try_disconnect(&self) -> bool {
        match self {
            Client::V4(c) => c.try_disconnect().is_ok(),
            Client::V5(c, _) => c.try_disconnect().is_ok(),
        }
    }
}

impl Loop {
    pub(super) fn version(&self) -> Version {
        match self.inner {
            Inner::V4(_) => Version::V311,
            Inner::V5(_) => Version::V5,
        }
    }

    /// The password for the next connect (a fresh SAS token).
    pub(super) fn set_password(&mut self, user: &str, password: &str) {
        match &mut self.inner {
            Inner::V4(e) => {
                e.mqtt_options.set_credentials(user, password);
            }
            Inner::V5(e) => {
                e.options.set_credentials(user, password);
            }
        }
    }

    /// True while a connection is up (the next poll does not connect first).
    pub(super) fn is_connected(&self) -> bool {
        self.connected
    }

    /// The next event; connects first if there is no connection.
    pub(super) async fn poll(&mut self, setup: &Setup) -> Up {
        let up = self.poll_inner(setup).await;
        match up {
            Up::Connected(_) => self.connected = true,
            Up::Failed(_) | Up::Disconnected => self.connected = false,
            _ => {}
        }
        up
    }

    async fn poll_inner(&mut self, setup: &Setup) -> Up {
        match &mut self.inner {
            Inner::V4(e) => match e.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => Up::Connected(Limits::ALL),
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Up::Sent(pkid),
                Ok(Event::Incoming(Packet::PubAck(ack))) => Up::Acked(ack.pkid),
                Ok(Event::Incoming(Packet::PubComp(comp))) => Up::Acked(comp.pkid),
                Ok(Event::Outgoing(Outgoing::PingReq) | Event::Incoming(Packet::PingResp)) => {
                    Up::Ping
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => Up::Disconnected,
                Ok(_) => Up::Other,
                Err(error) => Up::Failed(describe::v4(&error, setup)),
            },
            Inner::V5(e) => match e.poll().await {
                Ok(v5::Event::Incoming(Packet5::ConnAck(connack))) => {
                    Up::Connected(connack.properties.map_or(Limits::ALL, |props| Limits {
                        retain: props.retain_available != Some(0),
                        max_qos: props.max_qos.unwrap_or(2),
                        max_packet: props.max_packet_size,
                        topic_alias_max: props.topic_alias_max.unwrap_or(0),
                    }))
                }
                Ok(v5::Event::Outgoing(Outgoing::Publish(pkid))) => Up::Sent(pkid),
                Ok(v5::Event::Incoming(Packet5::PubAck(ack))) => match ack.reason {
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers => {
                        Up::Acked(ack.pkid)
                    }
                    reason => Up::Refused(
                        ack.pkid,
                        reason_text(
                            &format!("{reason:?}"),
                            ack.properties.and_then(|p| p.reason_string),
                        ),
                    ),
                },
                Ok(v5::Event::Incoming(Packet5::PubRec(rec))) => match rec.reason {
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers => Up::Other,
                    reason => Up::Refused(
                        rec.pkid,
                        reason_text(
                            &format!("{reason:?}"),
                            rec.properties.and_then(|p| p.reason_string),
                        ),
                    ),
                },
                Ok(v5::Event::Incoming(Packet5::PubComp(comp))) => match comp.reason {
                    PubCompReason::Success => Up::Acked(comp.pkid),
                    reason => Up::Refused(comp.pkid, format!("{reason:?}")),
                },
                Ok(
                    v5::Event::Outgoing(Outgoing::PingReq)
                    | v5::Event::Incoming(Packet5::PingResp(_)),
                ) => Up::Ping,
                Ok(v5::Event::Outgoing(Outgoing::Disconnect)) => Up::Disconnected,
                Ok(_) => Up::Other,
                Err(error) => Up::Failed(describe::v5(&error, setup)),
            },
        }
    }
}

fn reason_text(code: &str, reason: Option<String>) -> String {
    match reason {
        Some(r) if !r.is_empty() => format!("{code}: {r}"),
        _ => code.to_owned(),
    }
}

/// The CONNACK code an MQTT 5 connect was refused with, in the 3.1.1 terms the operator
/// messages are written in; `None` for codes that have no such twin.
pub(super) fn v311_code(code: Code5) -> Option<rumqttc::ConnectReturnCode> {
    use rumqttc::ConnectReturnCode as Code;
    Some(match code {
        Code5::BadUserNamePassword => Code::BadUserNamePassword,
        Code5::NotAuthorized | Code5::Banned | Code5::BadAuthenticationMethod => {
            Code::NotAuthorized
        }
        Code5::ClientIdentifierNotValid | Code5::BadClientId => Code::BadClientId,
        Code5::ServerUnavailable | Code5::ServiceUnavailable | Code5::ServerBusy => {
            Code::ServiceUnavailable
        }
        Code5::UnsupportedProtocolVersion | Code5::RefusedProtocolVersion => {
            Code::RefusedProtocolVersion
        }
        _ => return None,
    })
}

/// Bytes of one publish and its acknowledgement(s) on the wire: fixed header, topic, packet
/// id, MQTT 5 properties (a topic alias), payload; PUBACK, or PUBREC, PUBREL and PUBCOMP.
pub(super) fn wire_bytes(m: &Message, version: Version) -> u64 {
    let properties = match version {
        Version::V5 => 1 + if m.alias.is_some() { 3 } else { 0 },
        Version::V311 => 0,
    };
    let remaining = 2 + m.topic.len() + 2 + properties + m.payload.len();
    let acks = if m.qos >= 2 { 12 } else { 4 };
    (1 + varint_len(remaining) + remaining + acks) as u64
}

/// Bytes of the Remaining Length field for `n`.
pub(super) fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

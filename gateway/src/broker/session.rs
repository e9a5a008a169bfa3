//! One client's MQTT session as a state machine: packets in, packets and messages out. No
//! sockets and no clock of its own (time is passed in), so every packet type and every
//! refusal is tested in a table ([`tests`]); the connection ([`super::connection`]) only
//! moves bytes and waits.
//!
//! What the session decides:
//!
//! - at CONNECT ([`Session::open`]): the client id (assigned if empty), the will, the
//!   session to resume or discard, keep-alive and the limits both sides announce;
//! - for each PUBLISH: topic aliases, the topic's validity, who may publish where
//!   ([`crate::access`]), the rate limit, the receive maximum, QoS 2's exactly-once
//!   bookkeeping, retained messages; accepted messages leave in [`Output::route`], and their
//!   acknowledgements in [`Output::acks`], to be sent once the messages have been handed on;
//! - for each SUBSCRIBE and UNSUBSCRIBE: filter validity, permissions, the subscription in
//!   the [`Hub`], retained messages by the subscription's retain handling;
//! - what goes to the client ([`Session::fill`]): queued messages within the client's
//!   receive maximum and maximum packet size, with outgoing topic aliases, message expiry
//!   counted down and subscription identifiers; resends after a reconnect;
//! - how the session ends ([`Close`]), and its will ([`Session::last_will`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tracing::warn;

use super::client_id_allowed;
use super::gate::{Admitted, Gate, Proof, SharedBucket};
use super::hub::{Hub, Inflight, Mailbox, Message, Queued, Subscription, split_shared};
use super::packet::{
    Ack, ConnAck, Connect, DecodeError, Disconnect, Packet, Publish, QoS, SubAck, Subscribe,
    UnsubAck, Unsubscribe, Version, Will, encoded_len, reason,
};
use crate::access::{self, Identity};
use crate::codec;
use crate::stats::Stats;
use crate::topic::TopicFilter;

/// Longest topic a client may publish on.
pub const MAX_TOPIC_BYTES: usize = 512;
/// Topic aliases a client may set (MQTT 5).
pub(crate) const TOPIC_ALIASES: u16 = 16;
/// Most topic aliases the broker sets for a client, whatever the client allows.
const OUTGOING_ALIASES: u16 = 64;
/// QoS 2 publishes of a 3.1.1 client (which has no receive maximum) waiting for their
/// PUBREL; beyond, the connection is closed.
const MAX_PENDING_QOS2_V311: usize = 1024;
/// Refusals are logged at most this often per connection (and counted always).
const WARN_EVERY: Duration = Duration::from_secs(60);
/// Counter key of anonymous clients.
pub(crate) const ANONYMOUS: &str = "(anonymous)";

/// The broker's session settings, from `[broker]`.
#[derive(Debug, Clone)]
pub(crate) struct SessionLimits {
    /// QoS 1 and 2 publishes a client may have unacknowledged; also the most the broker
    /// has in flight to a 3.1.1 client.
    pub(crate) receive_maximum: u16,
    /// Largest packet a client may send, in bytes.
    pub(crate) max_packet: usize,
    /// Longest keep-alive an MQTT 5 client is granted, in seconds.
    pub(crate) max_keep_alive: Option<u16>,
    /// Subscriptions refused with 0x80.
    pub(crate) refuse_subscriptions: Vec<TopicFilter>,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            receive_maximum: 64,
            max_packet: 64 * 1024,
            max_keep_alive: None,
            refuse_subscriptions: Vec::new(),
        }
    }
}

/// What a session needs of the broker around it.
#[derive(Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub(crate) hub: &'a Hub,
    pub(crate) gate: &'a Gate,
    pub(crate) stats: &'a Stats,
    pub(crate) limits: &'a SessionLimits,
}

/// What the session wants done after a packet.
#[derive(Debug, Default)]
pub(crate) struct Output {
    /// Packets for the client, in order.
    pub(crate) send: Vec<Packet>,
    /// Accepted publishes, for ingest and the subscribers.
    pub(crate) route: Vec<Message>,
    /// Acknowledgements of `route`'s publishes (PUBACK, PUBREC), to send once they have
    /// been handed on.
    pub(crate) acks: Vec<Packet>,
    /// PUBACKs among `acks`: QoS 1 publishes not yet acknowledged.
    pub(crate) unacknowledged: usize,
    /// The retained messages' generation that must be on disk before `acks` are sent (0:
    /// none; see `Retained::durable`).
    pub(crate) durable: u64,
}

/// Why and how a session ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Close {
    /// The reason code: of the client's DISCONNECT, or of the server's (sent to an MQTT 5
    /// client, already in [`Output::send`]).
    pub(crate) code: u8,
    /// For logs.
    pub(crate) why: String,
    /// The client said goodbye (DISCONNECT), as opposed to breaking the protocol.
    pub(crate) clean: bool,
    /// The will is to be published.
    pub(crate) will: bool,
}

impl Close {
    fn violation(code: u8, why: impl Into<String>) -> Close {
        Close {
            code,
            why: why.into(),
            clean: false,
            will: true,
        }
    }

    /// The client sent bytes that are not a packet it may send: an MQTT 5 client is told why
    /// (a DISCONNECT, last in `out`), and the session ends as after any protocol violation.
    pub(crate) fn malformed(error: &DecodeError, version: Version, out: &mut Output) -> Close {
        let code = error.disconnect_code();
        if version.is_v5() {
            out.send.push(Packet::Disconnect(Disconnect::new(
                code,
                &error.to_string(),
            )));
        }
        Close::violation(code, error.to_string())
    }
}

/// A CONNECT the broker refuses: the CONNACK's code and why, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refused {
    pub(crate) code: u8,
    pub(crate) why: String,
}

fn refuse<T>(code: u8, why: impl Into<String>) -> Result<T, Refused> {
    Err(Refused {
        code,
        why: why.into(),
    })
}

/// What a session rarely needs, out of line so that a sensor's session stays small.
#[derive(Debug, Default)]
struct Extras {
    /// Topic aliases the client set.
    aliases_in: Vec<(u16, Bytes)>,
    /// Topic aliases the broker set for the client.
    aliases_out: Vec<(Bytes, u16)>,
    /// QoS 2 packet ids received and not yet released, while the session has no mailbox
    /// (with one, they are kept in its outbox and outlive the connection).
    incoming: Vec<u16>,
    /// When a refusal was last logged.
    warned_at: Option<Instant>,
    /// Refusals since, not logged.
    unlogged: u64,
}

/// One client's session.
pub(crate) struct Session {
    pub(crate) version: Version,
    pub(crate) client_id: String,
    /// Who the client is.
    pub(crate) identity: Identity,
    /// Identifies the session (no local); kept across connections with the session.
    number: u64,
    /// Identifies this connection to the hub.
    connection: u64,
    /// Session expiry interval, seconds.
    expiry: u32,
    /// Keep-alive in force, seconds (0: none).
    pub(crate) keep_alive: u16,
    /// The client's receive maximum.
    send_quota: u16,
    /// The largest packet the client accepts.
    client_max_packet: usize,
    /// Topic aliases the client accepts.
    client_aliases: u16,
    /// MQTT 5, and the client did not ask to go without reason strings.
    problem_info: bool,
    will: Option<Box<Will>>,
    mailbox: Option<Arc<Mailbox>>,
    extras: Option<Box<Extras>>,
    bucket: Option<SharedBucket>,
    /// The client published readings under its own name as device.
    pub(crate) reports_as_device: bool,
}

/// What [`Session::open`] gives the connection.
pub(crate) struct Opened {
    pub(crate) session: Session,
    pub(crate) connack: ConnAck,
    /// A will due now because a clean start ended the client's old session.
    pub(crate) old_will: Option<Message>,
    /// How the client proved who it is, for its registration with the gate.
    pub(crate) proof: Proof,
}

impl Session {
    /// The CONNECT of an admitted client: its session, and the CONNACK; or a refusal.
    /// `connection` identifies this connection to the hub.
    pub(crate) fn open(
        connect: Connect,
        version: Version,
        admitted: Admitted,
        connection: u64,
        ctx: Ctx<'_>,
    ) -> Result<Opened, Refused> {
        let v5 = version.is_v5();
        if connect.authentication_method.is_some() {
            return refuse(
                reason::BAD_AUTHENTICATION_METHOD,
                "enhanced authentication is not supported: connect with a user name and password",
            );
        }
        let mut client_id = connect.client_id;
        let mut assigned = None;
        if client_id.is_empty() {
            if let Some(name) = admitted.identity.name() {
                // A named client without a client id gets its name.
                client_id = name.to_owned();
            } else if !v5 && !connect.clean_start {
                return refuse(
                    reason::CLIENT_ID_NOT_VALID,
                    "a persistent session needs a client id",
                );
            } else {
                client_id = format!("watchpost-auto-{:016x}", fastrand::u64(..));
            }
            if v5 {
                assigned = Some(client_id.clone());
            }
        } else if !client_id_allowed(&client_id) {
            return refuse(
                reason::CLIENT_ID_NOT_VALID,
                "client id is reserved or has '+', '#', '/', '$'",
            );
        } else if !access::may_use_client_id(
            &admitted.identity,
            &client_id,
            &ctx.gate.credentials(),
        ) {
            return refuse(
                reason::NOT_AUTHORIZED,
                match admitted.identity {
                    Identity::Anonymous => {
                        "the client id is a registered name: connect with its credentials"
                    }
                    Identity::Named { .. } => {
                        "the client id must be the client's name, or start with name@"
                    }
                },
            );
        }
        // The last will is a publish like any other: it must be on a topic the client may
        // publish on.
        if let Some(will) = &connect.will {
            let topic = std::str::from_utf8(&will.topic).unwrap_or_default();
            if !valid_topic_name(topic) {
                return refuse(
                    reason::TOPIC_NAME_INVALID,
                    "the last will's topic is not a valid topic name",
                );
            }
            if ctx
                .gate
                .policy()
                .may_publish(&admitted.identity, &client_id, topic)
                .is_err()
            {
                return refuse(
                    reason::NOT_AUTHORIZED,
                    "the last will's topic is not one the client may publish on",
                );
            }
        }
        let max_expiry = ctx.hub.max_session_expiry();
        let asked = if v5 {
            connect.session_expiry
        } else if connect.clean_start {
            0
        } else {
            u32::MAX
        };
        let expiry = asked.min(max_expiry);
        let mut keep_alive = connect.keep_alive;
        let mut server_keep_alive = None;
        if let Some(max) = ctx.limits.max_keep_alive.filter(|_| v5) {
            if keep_alive == 0 || keep_alive > max {
                keep_alive = max;
                server_keep_alive = Some(max);
            }
        }
        let number = ctx.hub.number();
        let (resumed, old_will) = ctx.hub.connect(&client_id, connect.clean_start, connection);
        let session_present = resumed.is_some();
        let bucket = ctx.gate.bucket(&admitted.identity);
        let proof = admitted.proof;
        let mut session = Session {
            version,
            client_id,
            identity: admitted.identity,
            number,
            connection,
            expiry,
            keep_alive,
            send_quota: if v5 {
                connect.receive_maximum.max(1)
            } else {
                ctx.limits.receive_maximum
            },
            client_max_packet: connect
                .maximum_packet_size
                .map_or(usize::MAX, |m| m as usize),
            client_aliases: connect.topic_alias_maximum.min(OUTGOING_ALIASES),
            problem_info: v5 && connect.request_problem_information,
            will: connect.will.map(Box::new),
            mailbox: None,
            extras: None,
            bucket,
            reports_as_device: false,
        };
        if let Some(resumed) = resumed {
            session.number = resumed.number;
            session.mailbox = Some(resumed.mailbox);
        } else if expiry > 0 {
            // A session to keep gets its mailbox now, so that it exists while the client is
            // away even if it never subscribes.
            session.mailbox = ctx.hub.attach(
                &session.client_id,
                connection,
                number,
                expiry,
                &session.identity,
            );
        }
        if let Some(mailbox) = &session.mailbox {
            // Whatever comes next is sent by `fill`, after the CONNACK.
            mailbox.wake();
        }
        let connack = ConnAck {
            session_present,
            code: reason::SUCCESS,
            session_expiry: (v5 && expiry != asked).then_some(expiry),
            receive_maximum: v5.then_some(ctx.limits.receive_maximum),
            maximum_packet_size: v5
                .then(|| u32::try_from(ctx.limits.max_packet).unwrap_or(u32::MAX)),
            assigned_client_id: assigned,
            topic_alias_maximum: v5.then_some(TOPIC_ALIASES),
            server_keep_alive,
            ..ConnAck::default()
        };
        Ok(Opened {
            session,
            connack,
            old_will,
            proof,
        })
    }

    /// The device name: the client's name, or (anonymous) its client id.
    pub(crate) fn device(&self) -> &str {
        self.identity.name().unwrap_or(&self.client_id)
    }

    /// The name refusals are counted under.
    pub(crate) fn name_for_counters(&self) -> &str {
        self.identity.name().unwrap_or(ANONYMOUS)
    }

    /// True if the session is kept after the connection ends.
    pub(crate) fn expiry(&self) -> u32 {
        self.expiry
    }

    /// The session's mailbox, once it has one.
    pub(crate) fn mailbox(&self) -> Option<&Arc<Mailbox>> {
        self.mailbox.as_ref()
    }

    fn extras(&mut self) -> &mut Extras {
        self.extras.get_or_insert_with(Box::default)
    }

    /// Logs a refusal, at most once per [`WARN_EVERY`] for this connection.
    fn warn(&mut self, now: Instant, what: std::fmt::Arguments<'_>) {
        let client = self.identity.name().unwrap_or(ANONYMOUS).to_owned();
        let extras = self.extras();
        if extras
            .warned_at
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            warn!(
                client,
                earlier = extras.unlogged,
                "{what} (logged at most once a minute per connection; `earlier` counts the refusals not logged since)"
            );
            extras.warned_at = Some(now);
            extras.unlogged = 0;
        } else {
            extras.unlogged += 1;
        }
    }

    /// A DISCONNECT for an MQTT 5 client (3.1.1 has none: the socket just closes) and the
    /// [`Close`] that goes with it.
    fn disconnect(&self, out: &mut Output, code: u8, why: &str) -> Close {
        if self.version.is_v5() {
            out.send
                .push(Packet::Disconnect(Disconnect::new(code, why)));
        }
        Close::violation(code, why)
    }

    /// Handles one packet from the client.
    pub(crate) fn handle(
        &mut self,
        packet: Packet,
        ctx: Ctx<'_>,
        now: Instant,
        out: &mut Output,
    ) -> Result<(), Close> {
        match packet {
            Packet::Publish(publish) => self.publish(publish, ctx, now, out),
            Packet::PubAck(ack) => {
                self.acknowledged(ack.pkid, false);
                Ok(())
            }
            Packet::PubRec(ack) => {
                self.received(ack, out);
                Ok(())
            }
            Packet::PubRel(ack) => {
                self.released(ack.pkid, out);
                Ok(())
            }
            Packet::PubComp(ack) => {
                self.acknowledged(ack.pkid, true);
                Ok(())
            }
            Packet::Subscribe(subscribe) => self.subscribe(subscribe, ctx, now, out),
            Packet::Unsubscribe(unsubscribe) => {
                self.unsubscribe(unsubscribe, ctx, out);
                Ok(())
            }
            Packet::PingReq => {
                out.send.push(Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => self.disconnected(d, out),
            Packet::Connect(_) => Err(self.disconnect(
                out,
                reason::PROTOCOL_ERROR,
                "a second CONNECT on the same connection",
            )),
            Packet::Auth(_) => Err(self.disconnect(
                out,
                reason::PROTOCOL_ERROR,
                "AUTH without an authentication method at CONNECT",
            )),
            other @ (Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp) => Err(self.disconnect(
                out,
                reason::PROTOCOL_ERROR,
                &format!("{} is a server's packet", other.name()),
            )),
        }
    }

    fn disconnected(&mut self, d: Disconnect, out: &mut Output) -> Result<(), Close> {
        if let Some(expiry) = d.session_expiry {
            if self.expiry == 0 && expiry != 0 {
                return Err(self.disconnect(
                    out,
                    reason::PROTOCOL_ERROR,
                    "a session expiry interval at DISCONNECT after 0 at CONNECT",
                ));
            }
            self.expiry = expiry;
        }
        Err(Close {
            code: d.code,
            why: "the client disconnected".into(),
            clean: true,
            will: d.code == reason::DISCONNECT_WITH_WILL,
        })
    }

    fn publish(
        &mut self,
        mut publish: Publish,
        ctx: Ctx<'_>,
        now: Instant,
        out: &mut Output,
    ) -> Result<(), Close> {
        let v5 = self.version.is_v5();
        if let Some(alias) = publish.topic_alias.take() {
            if !v5 || alias == 0 || alias > TOPIC_ALIASES {
                return Err(self.disconnect(
                    out,
                    reason::TOPIC_ALIAS_INVALID,
                    &format!("topic alias {alias} is outside 1..={TOPIC_ALIASES}"),
                ));
            }
            let aliases = &mut self.extras().aliases_in;
            let known = aliases.iter_mut().find(|(a, _)| *a == alias);
            if publish.topic.is_empty() {
                match known {
                    Some((_, topic)) => publish.topic = topic.clone(),
                    None => {
                        return Err(self.disconnect(
                            out,
                            reason::TOPIC_ALIAS_INVALID,
                            &format!("topic alias {alias} was never set"),
                        ));
                    }
                }
            } else {
                // A copy of its own: the alias outlives this packet's read buffer.
                let topic = Bytes::copy_from_slice(&publish.topic);
                match known {
                    Some((_, t)) => *t = topic,
                    None => aliases.push((alias, topic)),
                }
            }
        }
        if !publish.subscription_ids.is_empty() {
            return Err(self.disconnect(
                out,
                reason::PROTOCOL_ERROR,
                "a client's PUBLISH has a subscription identifier",
            ));
        }
        let topic = std::str::from_utf8(&publish.topic).unwrap_or_default();
        if !valid_topic_name(topic) {
            return Err(self.disconnect(
                out,
                reason::TOPIC_NAME_INVALID,
                "topic name is empty or has a wildcard",
            ));
        }
        let pkid = publish.pkid;
        let qos = publish.qos;
        // QoS 0 has no packet id: no look into the session's bookkeeping for it.
        let (resent, pending) = if qos == QoS::AtMostOnce {
            (false, 0)
        } else {
            self.incoming(pkid)
        };
        if qos == QoS::ExactlyOnce && resent {
            // A resend of a message already received: acknowledged again, not passed on twice.
            out.send.push(Packet::PubRec(Ack::new(pkid)));
            return Ok(());
        }
        if qos == QoS::ExactlyOnce && !v5 && pending >= MAX_PENDING_QOS2_V311 {
            // 3.1.1 has no receive maximum; this bounds what a client that never releases
            // its messages can make the broker remember.
            return Err(self.disconnect(
                out,
                reason::RECEIVE_MAXIMUM_EXCEEDED,
                &format!("more than {MAX_PENDING_QOS2_V311} QoS 2 publishes without PUBREL"),
            ));
        }
        if qos != QoS::AtMostOnce && v5 {
            let unacknowledged = pending + out.unacknowledged;
            if unacknowledged >= usize::from(ctx.limits.receive_maximum) {
                return Err(self.disconnect(
                    out,
                    reason::RECEIVE_MAXIMUM_EXCEEDED,
                    &format!(
                        "more than the receive maximum of {} QoS 1 and 2 publishes unacknowledged",
                        ctx.limits.receive_maximum
                    ),
                ));
            }
        }
        let refused = if topic.len() > MAX_TOPIC_BYTES {
            Some((reason::TOPIC_NAME_INVALID, Refusal::TooLong))
        } else if let Err(denied) =
            ctx.gate
                .policy()
                .may_publish(&self.identity, &self.client_id, topic)
        {
            Some((reason::NOT_AUTHORIZED, Refusal::Denied(denied)))
        } else if self.bucket.as_ref().is_some_and(|b| {
            !b.lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(tokio::time::Instant::from_std(now))
        }) {
            Some((reason::QUOTA_EXCEEDED, Refusal::RateLimited))
        } else if publish
            .properties
            .as_ref()
            .is_some_and(|p| p.payload_is_utf8 == Some(true))
            && std::str::from_utf8(&publish.payload).is_err()
        {
            Some((reason::PAYLOAD_FORMAT_INVALID, Refusal::NotUtf8))
        } else {
            None
        };
        if let Some((code, why)) = refused {
            let shown = truncate(topic).to_owned();
            self.refused_publish(why, &shown, ctx, now);
            self.answer_refused(qos, pkid, code, out);
            return Ok(());
        }
        if !self.reports_as_device && is_own_reading(self.device(), topic) {
            self.reports_as_device = true;
        }
        // Topic and payload are slices of this connection's read buffer; messages are kept
        // for a while, and must not keep the whole buffer alive with them.
        let (topic, payload) = own(&publish.topic, &publish.payload);
        let expires_at = publish
            .properties
            .as_ref()
            .and_then(|p| p.message_expiry)
            .map(|s| now + Duration::from_secs(s.into()));
        let message = Message {
            topic,
            payload,
            qos,
            retain: publish.retain,
            properties: publish.properties.filter(|p| !p.is_empty()),
            expires_at,
            origin: self.number,
        };
        let kept = if message.retain {
            ctx.hub.retain(&Arc::new(message.clone()))
        } else {
            (super::retained::Kept::Stored, 0)
        };
        if kept.0 == super::retained::Kept::Full {
            self.warn(
                now,
                format_args!(
                    "retained message on {:?} not kept: broker.max_retained_messages or max_retained_bytes reached",
                    truncate(std::str::from_utf8(&message.topic).unwrap_or_default())
                ),
            );
            if qos != QoS::AtMostOnce {
                self.answer_refused(qos, pkid, reason::QUOTA_EXCEEDED, out);
                return Ok(());
            }
        }
        if out.route.is_empty() {
            // Most rounds carry one reading, and a batch may wait while ingest is behind:
            // room for one, not the four a first push makes.
            out.route.reserve_exact(1);
        }
        out.route.push(message);
        if qos != QoS::AtMostOnce {
            // Its acknowledgement says the retained message is kept: once it is on disk.
            out.durable = out.durable.max(kept.1);
        }
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                out.unacknowledged += 1;
                out.acks.push(Packet::PubAck(Ack::new(pkid)));
            }
            QoS::ExactlyOnce => {
                self.incoming_mut(|ids| ids.push(pkid));
                out.acks.push(Packet::PubRec(Ack::new(pkid)));
            }
        }
        Ok(())
    }

    /// Answers a refused QoS 1 or 2 publish so that the client does not resend it forever.
    /// The reason code says why; the reason string stays in the log. An acknowledgement with
    /// properties is valid MQTT 5, but common clients (the Eclipse Paho interoperability
    /// suite's among them) read a PUBACK or PUBREC of more than four bytes as malformed.
    fn answer_refused(&mut self, qos: QoS, pkid: u16, code: u8, out: &mut Output) {
        if qos == QoS::AtMostOnce {
            return;
        }
        let ack = Ack::with_code(pkid, code);
        if qos == QoS::AtLeastOnce {
            out.send.push(Packet::PubAck(ack));
            return;
        }
        if !self.version.is_v5() {
            // MQTT 3.1.1 has no failure PUBREC: the client goes on with PUBREL.
            self.incoming_mut(|ids| ids.push(pkid));
        }
        out.send.push(Packet::PubRec(ack));
    }

    fn refused_publish(&mut self, why: Refusal, topic: &str, ctx: Ctx<'_>, now: Instant) {
        let stats = ctx.stats;
        let client = self.name_for_counters().to_owned();
        match why {
            Refusal::RateLimited => {
                Stats::inc(&stats.rate_limited);
                stats.count_refusal(&client, |c| c.rate_limited += 1);
                let rate = ctx.gate.rate();
                self.warn(
                    now,
                    format_args!("publishes dropped: more than broker.max_publish_rate = {rate}/s"),
                );
            }
            Refusal::Denied(denied) => {
                Stats::inc(&stats.publish_denied);
                stats.count_refusal(&client, |c| c.publish_denied += 1);
                self.warn(now, format_args!("publish on {topic:?} refused: {denied}"));
            }
            Refusal::TooLong => {
                Stats::inc(&stats.publish_denied);
                stats.count_refusal(&client, |c| c.publish_denied += 1);
                self.warn(
                    now,
                    format_args!("publish refused: topic longer than {MAX_TOPIC_BYTES} bytes"),
                );
            }
            Refusal::NotUtf8 => {
                Stats::inc(&stats.publish_denied);
                stats.count_refusal(&client, |c| c.publish_denied += 1);
                self.warn(
                    now,
                    format_args!(
                        "publish on {topic:?} refused: its payload format indicator says UTF-8, and it is not"
                    ),
                );
            }
        }
    }

    /// Whether `pkid` is a QoS 2 packet id received and not yet released, and how many
    /// such ids there are.
    fn incoming(&self, pkid: u16) -> (bool, usize) {
        let look = |ids: &[u16]| (ids.contains(&pkid), ids.len());
        match (&self.mailbox, &self.extras) {
            (Some(m), _) => look(&m.lock().incoming),
            (None, Some(e)) => look(&e.incoming),
            (None, None) => (false, 0),
        }
    }

    fn incoming_mut(&mut self, f: impl FnOnce(&mut Vec<u16>)) {
        match &self.mailbox {
            Some(m) => f(&mut m.lock().incoming),
            None => f(&mut self.extras().incoming),
        }
    }

    fn released(&mut self, pkid: u16, out: &mut Output) {
        let mut found = false;
        self.incoming_mut(|ids| {
            if let Some(at) = ids.iter().position(|p| *p == pkid) {
                ids.swap_remove(at);
                found = true;
            }
        });
        let code = if found {
            reason::SUCCESS
        } else {
            reason::PACKET_ID_NOT_FOUND
        };
        out.send.push(Packet::PubComp(Ack::with_code(pkid, code)));
    }

    /// PUBACK (`complete` false) or PUBCOMP (true) of a message sent to the client.
    fn acknowledged(&mut self, pkid: u16, complete: bool) {
        if let Some(mailbox) = &self.mailbox {
            let mut outbox = mailbox.lock();
            if let Some(at) = outbox.inflight.iter().position(|i| {
                i.pkid == pkid
                    && if complete {
                        i.released
                    } else {
                        i.item.qos == QoS::AtLeastOnce
                    }
            }) {
                outbox.inflight.remove(at);
                drop(outbox);
                // Room for the next message.
                mailbox.wake();
            }
        }
    }

    fn received(&mut self, ack: Ack, out: &mut Output) {
        let Some(mailbox) = &self.mailbox else {
            return;
        };
        let mut outbox = mailbox.lock();
        let at = outbox
            .inflight
            .iter()
            .position(|i| i.pkid == ack.pkid && i.item.qos == QoS::ExactlyOnce);
        match at {
            Some(at) if ack.code >= 0x80 => {
                // The client refused it: the exchange ends here.
                outbox.inflight.remove(at);
                drop(outbox);
                mailbox.wake();
            }
            Some(at) => {
                outbox.inflight[at].released = true;
                out.send.push(Packet::PubRel(Ack::new(ack.pkid)));
            }
            None => out.send.push(Packet::PubRel(Ack::with_code(
                ack.pkid,
                reason::PACKET_ID_NOT_FOUND,
            ))),
        }
    }

    fn subscribe(
        &mut self,
        subscribe: Subscribe,
        ctx: Ctx<'_>,
        now: Instant,
        out: &mut Output,
    ) -> Result<(), Close> {
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut retained = Vec::new();
        let mut denied = Vec::new();
        for (filter, options) in &subscribe.filters {
            let (group, plain) = split_shared(filter);
            let valid = TopicFilter::new(plain)
                .ok()
                .filter(|_| group.is_none_or(|g| !g.is_empty() && !g.contains(['+', '#'])));
            let Some(matcher) = valid else {
                codes.push(reason::TOPIC_FILTER_INVALID);
                continue;
            };
            if group.is_some() && options.no_local {
                return Err(self.disconnect(
                    out,
                    reason::PROTOCOL_ERROR,
                    "no local on a shared subscription",
                ));
            }
            if ctx
                .limits
                .refuse_subscriptions
                .iter()
                .any(|r| r.matches(filter))
            {
                codes.push(reason::UNSPECIFIED);
                continue;
            }
            if let Err(why) =
                ctx.gate
                    .policy()
                    .may_subscribe(&self.identity, &self.client_id, plain)
            {
                denied.push(format!("{} ({why})", truncate(filter)));
                codes.push(reason::NOT_AUTHORIZED);
                continue;
            }
            if self.mailbox.is_none() {
                match ctx.hub.attach(
                    &self.client_id,
                    self.connection,
                    self.number,
                    self.expiry,
                    &self.identity,
                ) {
                    Some(mailbox) => self.mailbox = Some(mailbox),
                    None => {
                        return Err(self.disconnect(
                            out,
                            reason::SESSION_TAKEN_OVER,
                            "taken over by a newer connection with the same client id",
                        ));
                    }
                }
            }
            let subscription = Subscription {
                filter: filter.as_str().into(),
                options: *options,
                id: subscribe.id,
            };
            let Some(new) = ctx
                .hub
                .subscribe(&self.client_id, self.connection, subscription)
            else {
                return Err(self.disconnect(
                    out,
                    reason::SESSION_TAKEN_OVER,
                    "taken over by a newer connection with the same client id",
                ));
            };
            codes.push(options.qos as u8);
            let wanted = match options.retain_handling {
                0 => true,
                1 => new,
                _ => false,
            };
            // Shared subscriptions get no retained messages (MQTT 5, 4.8.2).
            if wanted && group.is_none() {
                for message in ctx.hub.retained.matching(&matcher, now) {
                    retained.push(Queued {
                        qos: message.qos.min(options.qos),
                        retain: true,
                        ids: subscribe.id.into_iter().collect(),
                        message,
                    });
                }
            }
        }
        if !denied.is_empty() {
            Stats::inc(&ctx.stats.subscribe_denied);
            let client = self.name_for_counters().to_owned();
            ctx.stats
                .count_refusal(&client, |c| c.subscribe_denied += 1);
            self.warn(
                now,
                format_args!("subscription refused: {}", denied.join(", ")),
            );
        }
        let refused = codes.iter().filter(|c| **c >= 0x80).count();
        let reason_string = (self.problem_info && refused > 0).then(|| {
            format!(
                "{refused} of {} filters refused: 0x80 refused by the broker's configuration, 0x87 not this client's, 0x8F not a valid filter",
                codes.len()
            )
        });
        out.send.push(Packet::SubAck(SubAck {
            pkid: subscribe.pkid,
            codes,
            reason_string,
            ..SubAck::default()
        }));
        if let Some(mailbox) = &self.mailbox {
            // Queued behind the SUBACK: `fill` sends them after it.
            for item in retained {
                if mailbox
                    .push(item, ctx.hub.retained_delivery_limits())
                    .is_err()
                {
                    Stats::inc(&ctx.stats.queue_dropped);
                }
            }
        }
        Ok(())
    }

    fn unsubscribe(&mut self, unsubscribe: Unsubscribe, ctx: Ctx<'_>, out: &mut Output) {
        let codes = unsubscribe
            .filters
            .iter()
            .map(|f| {
                if ctx.hub.unsubscribe(&self.client_id, self.connection, f) {
                    reason::SUCCESS
                } else {
                    reason::NO_SUBSCRIPTION_EXISTED
                }
            })
            .collect();
        out.send.push(Packet::UnsubAck(UnsubAck {
            pkid: unsubscribe.pkid,
            codes,
            ..UnsubAck::default()
        }));
    }

    /// After a reconnect to a kept session: what was in flight, again (QoS 1 and 2 publishes
    /// with DUP set, PUBRELs), before anything new. A publish now too large for the client is
    /// discarded as if delivered, as in [`Session::fill`]: topic aliases do not outlive a
    /// connection, and the client may have asked for less this time.
    pub(crate) fn resend(&mut self, ctx: Ctx<'_>, now: Instant, out: &mut Output) {
        let Some(mailbox) = self.mailbox.clone() else {
            return;
        };
        let mut outbox = mailbox.lock();
        let mut i = 0;
        while i < outbox.inflight.len() {
            let inflight = &outbox.inflight[i];
            if inflight.released {
                out.send.push(Packet::PubRel(Ack::new(inflight.pkid)));
            } else if let Some(packet) = self.deliverable(&inflight.item, inflight.pkid, true, now)
            {
                out.send.push(packet);
            } else {
                Stats::inc(&ctx.stats.too_large_for_client);
                outbox.inflight.remove(i);
                continue;
            }
            i += 1;
        }
    }

    /// Moves queued messages into `out.send`, as far as the client's receive maximum allows
    /// (QoS 0 messages need no room).
    pub(crate) fn fill(&mut self, ctx: Ctx<'_>, now: Instant, out: &mut Output) {
        let Some(mailbox) = self.mailbox.clone() else {
            return;
        };
        let mut outbox = mailbox.lock();
        while let Some(front) = outbox.queue.front() {
            if front.qos != QoS::AtMostOnce && outbox.inflight.len() >= usize::from(self.send_quota)
            {
                break;
            }
            let item = outbox.pop().expect("there is a front");
            if item.message.expired(now) {
                Stats::inc(&ctx.stats.messages_expired);
                continue;
            }
            let pkid = if item.qos == QoS::AtMostOnce {
                0
            } else {
                outbox.next_pkid()
            };
            let Some(packet) = self.deliverable(&item, pkid, false, now) else {
                Stats::inc(&ctx.stats.too_large_for_client);
                continue;
            };
            if item.qos != QoS::AtMostOnce {
                outbox.inflight.push_back(Inflight {
                    pkid,
                    released: false,
                    item,
                });
            }
            out.send.push(packet);
        }
    }

    /// The PUBLISH that delivers `item` to this client, or `None` if it is larger than the
    /// client takes: MQTT 5 (3.1.2.11.4) has it discarded as if delivered. A topic alias it
    /// would have set is forgotten with it, as the client never learns it.
    fn deliverable(&mut self, item: &Queued, pkid: u16, dup: bool, now: Instant) -> Option<Packet> {
        let mut publish = self.outgoing(item, pkid, now);
        publish.dup = dup;
        let new_alias = publish.topic_alias.filter(|_| !publish.topic.is_empty());
        let packet = Packet::Publish(publish);
        if encoded_len(&packet, self.version) <= self.client_max_packet {
            return Some(packet);
        }
        if let (Some(alias), Some(extras)) = (new_alias, &mut self.extras) {
            extras.aliases_out.retain(|(_, a)| *a != alias);
        }
        None
    }

    /// The PUBLISH that delivers `item` to this client.
    fn outgoing(&mut self, item: &Queued, pkid: u16, now: Instant) -> Publish {
        let message = &item.message;
        let v5 = self.version.is_v5();
        // Properties are MQTT 5's: a 3.1.1 client gets none, so none are copied for it.
        let mut properties = if v5 { message.properties.clone() } else { None };
        if let Some(left) = message.expiry_left(now).filter(|_| v5) {
            properties.get_or_insert_with(Box::default).message_expiry = Some(left);
        }
        let mut topic = message.topic.clone();
        let mut topic_alias = None;
        if self.client_aliases > 0 && v5 {
            let limit = self.client_aliases;
            let aliases = &mut self.extras().aliases_out;
            match aliases.iter().find(|(t, _)| *t == topic) {
                Some((_, alias)) => {
                    topic_alias = Some(*alias);
                    topic = Bytes::new();
                }
                None if aliases.len() < usize::from(limit) => {
                    let alias = aliases.len() as u16 + 1;
                    aliases.push((topic.clone(), alias));
                    topic_alias = Some(alias);
                }
                None => {}
            }
        }
        Publish {
            dup: false,
            qos: item.qos,
            retain: item.retain,
            topic,
            pkid,
            payload: message.payload.clone(),
            topic_alias,
            subscription_ids: if v5 { item.ids.clone() } else { Vec::new() },
            properties,
        }
    }

    /// The message to publish as the client's will, if it left one, taken.
    pub(crate) fn last_will(&mut self, ctx: Ctx<'_>, now: Instant) -> Option<(Message, u32)> {
        let will = self.will.take()?;
        // The ACL may have changed since the CONNECT: the will must still be allowed.
        let topic = std::str::from_utf8(&will.topic).unwrap_or_default();
        if let Err(denied) = ctx
            .gate
            .policy()
            .may_publish(&self.identity, &self.client_id, topic)
        {
            self.warn(
                now,
                format_args!("last will on {:?} not published: {denied}", truncate(topic)),
            );
            return None;
        }
        let expires_at = will
            .properties
            .as_ref()
            .and_then(|p| p.message_expiry)
            .map(|s| now + Duration::from_secs(s.into()));
        let delay = will.delay;
        Some((
            Message {
                topic: will.topic,
                payload: will.payload,
                qos: will.qos,
                retain: will.retain,
                properties: will.properties.filter(|p| !p.is_empty()),
                expires_at,
                origin: self.number,
            },
            delay,
        ))
    }

    /// The connection ended: the hub keeps the session for its expiry or ends it.
    pub(crate) fn end(&mut self, ctx: Ctx<'_>, now: Instant) {
        if self.mailbox.is_some() {
            if let Some(extras) = &mut self.extras {
                extras.aliases_out.clear();
            }
            ctx.hub
                .detach(&self.client_id, self.connection, self.expiry, now);
        }
    }
}

/// Why a publish was not passed on.
#[derive(Clone, Copy)]
enum Refusal {
    Denied(crate::acl::Denied),
    TooLong,
    RateLimited,
    NotUtf8,
}

/// True if `topic` may be published to: not empty, no wildcards, no NUL.
pub(crate) fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// True if `topic` is `sensors/{device}/...`.
fn is_own_reading(device: &str, topic: &str) -> bool {
    topic
        .strip_prefix(codec::TOPIC_ROOT)
        .and_then(|t| t.strip_prefix('/'))
        .and_then(|t| t.strip_prefix(device))
        .is_some_and(|t| t.starts_with('/'))
}

/// At most 100 characters of client-chosen text, for logs.
pub(crate) fn truncate(s: &str) -> &str {
    match s.char_indices().nth(100) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Copies of `topic` and `payload` in one small allocation of their own.
fn own(topic: &Bytes, payload: &Bytes) -> (Bytes, Bytes) {
    let mut both = BytesMut::with_capacity(topic.len() + payload.len());
    both.extend_from_slice(topic);
    both.extend_from_slice(payload);
    let mut both = both.freeze();
    let topic = both.split_to(topic.len());
    (topic, both)
}

#[cfg(test)]
mod tests;

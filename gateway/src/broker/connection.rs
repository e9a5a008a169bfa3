//! One client connection: the only place that touches a client socket.
//!
//! Reads MQTT packets with rumqttd's codec, passes them to the router through the client's
//! in-process link, and writes what the router sends back. Also does what the router leaves
//! to its network layer: the TLS handshake and the CONNECT handshake under a timeout, who the
//! client is ([`Gate`]), client id checks, keep-alive, and the client's last will when the
//! connection ends without a DISCONNECT.
//!
//! Every PUBLISH and SUBSCRIBE is checked here before the router sees it ([`crate::access`]):
//! a refused or rate-limited PUBLISH never reaches the router, is counted, and is answered by
//! this connection (PUBACK, or PUBREC and later PUBCOMP, with a reason code on MQTT 5) so
//! that the client does not resend it forever.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::Notification;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    self, ConnAck, ConnectReturnCode, LastWill, Packet, Protocol, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, Publish, PublishProperties, SubAck, SubscribeReasonCode,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, debug_span, info, warn};

use super::gate::{Admitted, Gate, Proof, Refusal, SharedBucket};
use super::{Router, client_id_allowed, tls};
use crate::access::{self, Credentials, Identity};
use crate::codec;
use crate::stats::Stats;

/// Most packets handed to the router in one go; the rest wait for the next round.
const BATCH: usize = 256;
/// A client that takes nothing from its socket for this long is dropped.
const WRITE_STALL: Duration = Duration::from_secs(30);
/// Longest topic a client may publish on.
pub const MAX_TOPIC_BYTES: usize = 512;
/// Topic aliases an MQTT 5 client may set (resolved here, never by the router).
const TOPIC_ALIASES: u16 = 16;
/// Refused QoS 2 publishes of an MQTT 3.1.1 client that may wait for their PUBREL.
const MAX_REFUSED_QOS2: usize = 64;
/// Refusals are logged at most this often per connection (and counted always).
const WARN_EVERY: Duration = Duration::from_secs(60);
/// Refused connections and failed handshakes are logged at most this often, all together.
const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(10);

/// A protocol version the broker serves.
pub(crate) trait Wire: Protocol + Clone + Send + Sync + 'static {
    /// True for MQTT 5.
    const V5: bool;
}

impl Wire for V4 {
    const V5: bool = false;
}

impl Wire for V5 {
    const V5: bool = true;
}

/// A byte stream to a client: TCP, or TLS over TCP.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) router: Router,
    pub(crate) gate: Arc<Gate>,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_packet_bytes: usize,
    pub(crate) max_connections: usize,
    pub(crate) stats: Arc<Stats>,
    pub(crate) refusal_logged_at: Mutex<Option<Instant>>,
}

impl Shared {
    /// Logs a refused connection, unless one was logged moments ago.
    fn log_refusal(&self, peer: SocketAddr, what: &str) {
        let now = Instant::now();
        let mut last = self
            .refusal_logged_at
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| now.duration_since(t) >= REFUSALS_LOGGED_EVERY) {
            *last = Some(now);
            warn!(%peer, "client refused: {what} (such lines are logged at most every {}s; every refusal is counted)", REFUSALS_LOGGED_EVERY.as_secs());
        }
    }
}

/// Holds one place in `broker.max_connections` until the connection is over.
pub(crate) struct Slot(Arc<Stats>);

impl Slot {
    /// Takes a place.
    pub(crate) fn take(stats: &Arc<Stats>) -> Slot {
        Stats::inc(&stats.connections);
        Slot(stats.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0
            .connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(protocol::Error),
    #[error("protocol: {0}")]
    BadPacket(&'static str),
    #[error("no CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    #[error("no TLS handshake within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("first packet was not CONNECT")]
    NotConnect,
    #[error("refused: {0}")]
    Refused(String),
    #[error("unexpected {0} packet from a client")]
    Unexpected(&'static str),
    #[error("broker link: {0}")]
    Link(#[from] Box<LinkError>),
    #[error("broker link setup failed")]
    LinkSetup,
}

impl ConnError {
    /// True if the client broke the protocol (as opposed to leaving or being refused).
    fn is_protocol(&self) -> bool {
        matches!(
            self,
            ConnError::Protocol(_)
                | ConnError::BadPacket(_)
                | ConnError::NotConnect
                | ConnError::Unexpected(_)
        )
    }
}

/// How a session ended.
enum End {
    /// The client sent DISCONNECT.
    Clean,
    /// The router closed the link (another connection took the client id over).
    Kicked,
    /// The client's name was removed from the credentials, or got a new secret.
    Revoked,
    /// The socket closed, keep-alive expired or the client broke the protocol.
    Lost(Option<ConnError>),
}

/// Serves one client until it leaves: the TLS handshake if `tls` is given, then the MQTT
/// session. Never panics on client input; errors end this connection only.
pub(crate) async fn serve<P: Wire>(
    stream: TcpStream,
    peer: SocketAddr,
    protocol: P,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    slot: Slot,
) {
    let span = debug_span!("client", %peer, client_id = tracing::field::Empty);
    async {
        // Small packets (readings, acks) must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let result = match tls {
            None => session(Io::new(stream, protocol, &shared), peer, &shared, None).await,
            Some(acceptor) => {
                // In this connection's task, under a deadline: a silent client holds up no one.
                match timeout(shared.connect_timeout, acceptor.accept(stream)).await {
                    Err(_) => Err(ConnError::HandshakeTimeout(shared.connect_timeout)),
                    Ok(Err(e)) => {
                        Stats::inc(&shared.stats.tls_failures);
                        shared.log_refusal(peer, &format!("TLS handshake failed: {e}"));
                        Err(ConnError::Handshake(e))
                    }
                    Ok(Ok(stream)) => {
                        let certificate = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .map(tls::common_name);
                        let io = Io::new(stream, protocol, &shared);
                        session(io, peer, &shared, certificate).await
                    }
                }
            }
        };
        if let Err(e) = result {
            if e.is_protocol() {
                Stats::inc(&shared.stats.protocol_errors);
            }
            debug!(error = %e, "connection closed");
        }
    }
    .instrument(span)
    .await;
    drop(slot);
}

/// The CONNECT handshake, then the session until it ends. `certificate` is the common name
/// of the client's verified certificate (`Some(None)`: a certificate without one).
async fn session<S: Stream, P: Wire>(
    mut io: Io<S, P>,
    peer: SocketAddr,
    shared: &Shared,
    certificate: Option<Option<String>>,
) -> Result<(), ConnError> {
    let io = &mut io;
    let first = match timeout(shared.connect_timeout, io.read_packet()).await {
        Ok(packet) => packet?.0,
        Err(_) => return Err(ConnError::ConnectTimeout(shared.connect_timeout)),
    };
    let Packet::Connect(connect, props, will, _will_props, login) = first else {
        return Err(ConnError::NotConnect);
    };
    let refused = |why: &str| {
        Stats::inc(&shared.stats.auth_failures);
        shared.log_refusal(
            peer,
            &format!("client id {:?}: {why}", truncate(&connect.client_id)),
        );
    };
    let certificate = match certificate {
        None => None,
        Some(Some(name)) => Some(name),
        Some(None) => {
            let why = "the client certificate has no common name to use as the client's name";
            refused(why);
            return refuse(io, ConnectReturnCode::NotAuthorized, why).await;
        }
    };
    let login = login.map(|l| (l.username, l.password));
    let admitted = match shared.gate.admit(certificate, login).await {
        Ok(a) => a,
        Err(refusal) => {
            refused(&refusal.to_string());
            let code = match refusal {
                Refusal::BadCredentials => ConnectReturnCode::BadUserNamePassword,
                Refusal::NotAuthorized(_) => ConnectReturnCode::NotAuthorized,
                Refusal::Busy => ConnectReturnCode::ServerBusy,
            };
            return refuse(io, code, &refusal.to_string()).await;
        }
    };

    let mut client_id = connect.client_id.clone();
    let mut assigned = None;
    if client_id.is_empty() {
        if let Some(name) = admitted.identity.name() {
            // A named client without a client id gets its name.
            client_id = name.to_owned();
            assigned = Some(client_id.clone());
        } else if !connect.clean_session {
            return refuse(
                io,
                ConnectReturnCode::ClientIdentifierNotValid,
                "a persistent session needs a client id",
            )
            .await;
        } else {
            client_id = format!("watchpost-auto-{:016x}", fastrand::u64(..));
            assigned = Some(client_id.clone());
        }
    } else if !client_id_allowed(&client_id) {
        return refuse(
            io,
            ConnectReturnCode::ClientIdentifierNotValid,
            "client id is reserved or has '+', '#', '/', '$'",
        )
        .await;
    } else if !access::may_use_client_id(&admitted.identity, &client_id, &shared.gate.credentials())
    {
        let why = match admitted.identity {
            Identity::Anonymous => {
                "the client id is a registered name: connect with its credentials"
            }
            Identity::Named { .. } => {
                "the client id must be the client's name, or start with name@"
            }
        };
        refused(why);
        return refuse(io, ConnectReturnCode::NotAuthorized, why).await;
    }
    tracing::Span::current().record("client_id", client_id.as_str());

    // The last will is a publish like any other: it must be on the client's own topics.
    let will = match will {
        None => None,
        Some(mut will) => {
            let sources = shared.gate.sources();
            let allowed = std::str::from_utf8(&will.topic).ok().and_then(|topic| {
                access::may_publish(&admitted.identity, topic, &sources).ok()?;
                Some(retain_allowed(topic))
            });
            match allowed {
                Some(retain) => {
                    will.retain &= retain;
                    Some(will)
                }
                None => {
                    let why = "the last will's topic is not one the client may publish on";
                    refused(why);
                    return refuse(io, ConnectReturnCode::NotAuthorized, why).await;
                }
            }
        }
    };

    // Topic aliases of the client are resolved here, so the router is never asked to keep any.
    let alias_max = props.as_ref().and_then(|p| p.topic_alias_max).unwrap_or(0);
    let connect_link = shared.router.connect.clone();
    let (id, clean) = (client_id.clone(), connect.clean_session);
    // Registering blocks until the router answers; keep that off the async workers.
    let (mut link_tx, mut link_rx, ack) =
        tokio::task::spawn_blocking(move || connect_link(&id, clean, alias_max))
            .await
            .map_err(|_| ConnError::LinkSetup)??;
    let Some(Packet::ConnAck(connack, connack_props)) = Option::<Packet>::from(ack) else {
        return Err(ConnError::LinkSetup);
    };
    let connack_props = P::V5.then(|| {
        let mut p = connack_props.unwrap_or_default();
        p.topic_alias_max = Some(TOPIC_ALIASES);
        if assigned.is_some() {
            p.assigned_client_identifier = assigned;
        }
        p
    });
    // From here on the router knows the client: every way out goes through the cleanup below.
    io.queue(Packet::ConnAck(connack, connack_props));
    let keep_alive = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let device = admitted.identity.name().unwrap_or(&client_id).to_owned();
    let mut session = Session {
        device_prefix: format!("{}/{device}/", codec::TOPIC_ROOT),
        device,
        reports_as_device: false,
        bucket: shared.gate.bucket(&admitted.identity),
        changes: matches!(admitted.proof, Proof::Secret(_)).then(|| shared.gate.changes()),
        admitted,
        aliases: HashMap::new(),
        refused_qos2: Vec::new(),
        warned_at: None,
        unlogged: 0,
    };
    let end = match io.flush().await {
        Ok(()) => {
            debug!(
                keep_alive = connect.keep_alive,
                clean = connect.clean_session,
                who = session.admitted.identity.name().unwrap_or("anonymous"),
                "client connected"
            );
            run(
                io,
                &mut link_tx,
                &mut link_rx,
                keep_alive,
                &mut session,
                shared,
            )
            .await
        }
        Err(e) => End::Lost(Some(e.into())),
    };
    let mut last = Vec::with_capacity(2);
    let error = match end {
        End::Clean => return Ok(()),
        End::Kicked => {
            return Err(ConnError::Refused(
                "taken over by a newer connection with the same client id".into(),
            ));
        }
        End::Revoked => {
            info!(
                name = session.device,
                "disconnected: the name was removed from the credentials or given a new secret"
            );
            if P::V5 {
                io.queue(Packet::Disconnect(
                    protocol::Disconnect {
                        reason_code: protocol::DisconnectReasonCode::NotAuthorized,
                    },
                    None,
                ));
                let _ = io.flush().await;
            }
            // No will: whoever holds revoked credentials gets no last word.
            None
        }
        End::Lost(error) => {
            // The router only learns of the end from us: publish the will (it never holds
            // one) and take the client off its books.
            if let Some(LastWill {
                topic,
                message,
                retain,
                ..
            }) = will
            {
                last.push(Packet::Publish(Publish::new(topic, message, retain), None));
            } else if session.reports_as_device {
                // A device without a will that drops off is still gone: say so on its status
                // topic, as its will would have.
                let topic = format!("{}{}", session.device_prefix, codec::STATUS_METRIC);
                last.push(Packet::Publish(
                    Publish::new(Bytes::from(topic), Bytes::from_static(b"offline"), false),
                    None,
                ));
            }
            error
        }
    };
    last.push(Packet::Disconnect(
        protocol::Disconnect {
            reason_code: protocol::DisconnectReasonCode::UnspecifiedError,
        },
        None,
    ));
    send_batch(&mut link_tx, last).await?;
    error.map_or(Ok(()), Err)
}

async fn refuse<S: Stream, P: Wire>(
    io: &mut Io<S, P>,
    code: ConnectReturnCode,
    why: &str,
) -> Result<(), ConnError> {
    io.queue(Packet::ConnAck(
        ConnAck {
            session_present: false,
            code,
        },
        None,
    ));
    io.flush().await?;
    Err(ConnError::Refused(why.to_owned()))
}

/// At most 100 characters of client-chosen text, for logs.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(100) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Retained messages are kept only on device status topics (`sensors/{device}/status`):
/// anything else retained would let one client fill the broker's memory topic by topic.
fn retain_allowed(topic: &str) -> bool {
    let mut levels = topic.split('/');
    levels.next() == Some(codec::TOPIC_ROOT)
        && levels.next().is_some_and(|d| !d.is_empty())
        && levels.next() == Some(codec::STATUS_METRIC)
        && levels.next().is_none()
}

/// What the connection knows about its client.
struct Session {
    admitted: Admitted,
    /// The device name: the client's name, or (anonymous) its client id.
    device: String,
    /// `sensors/{device}/`.
    device_prefix: String,
    /// The client published readings under its own name as device.
    reports_as_device: bool,
    bucket: Option<SharedBucket>,
    /// Credential changes, for clients that proved a secret.
    changes: Option<watch::Receiver<Arc<Credentials>>>,
    /// MQTT 5 topic aliases the client set.
    aliases: HashMap<u16, Bytes>,
    /// Packet ids of refused QoS 2 publishes whose PUBREL is still to come (MQTT 3.1.1).
    refused_qos2: Vec<u16>,
    warned_at: Option<Instant>,
    unlogged: u64,
}

/// What becomes of a packet from the client.
enum Verdict {
    /// To the router.
    Pass(Packet),
    /// Not to the router; this answer goes back to the client.
    Answer(Packet),
    /// Dropped without an answer.
    Drop,
}

/// Why a publish was not passed on.
#[derive(Clone, Copy)]
enum Refused {
    Denied(access::Denied),
    TooLong,
    RateLimited,
}

impl Session {
    fn name_for_counters(&self) -> &str {
        self.admitted.identity.name().unwrap_or(ANONYMOUS)
    }

    /// Logs a refusal, at most once per [`WARN_EVERY`] for this connection.
    fn warn(&mut self, what: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        if self
            .warned_at
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            warn!(
                client = self.name_for_counters(),
                earlier = self.unlogged,
                "{what} (logged at most once a minute per connection; `earlier` counts the refusals not logged since)"
            );
            self.warned_at = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
    }

    fn check_publish(
        &mut self,
        mut publish: Publish,
        mut props: Option<PublishProperties>,
        meta: Meta,
        shared: &Shared,
        v5: bool,
    ) -> Result<Verdict, ConnError> {
        if let Some(alias) = props.as_mut().and_then(|p| p.topic_alias.take()) {
            if alias == 0 || alias > TOPIC_ALIASES {
                return Err(ConnError::BadPacket("topic alias out of range"));
            }
            if publish.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(topic) => publish.topic = topic.clone(),
                    None => return Err(ConnError::BadPacket("unknown topic alias")),
                }
            } else {
                self.aliases.insert(alias, publish.topic.clone());
            }
        }
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return Err(ConnError::BadPacket("topic name is not UTF-8"));
        };
        if topic.is_empty() || !protocol::valid_topic(topic) || topic.contains('\0') {
            return Err(ConnError::BadPacket(
                "topic name is empty or has a wildcard or NUL",
            ));
        }
        let refused = if topic.len() > MAX_TOPIC_BYTES {
            Some(Refused::TooLong)
        } else if let Err(denied) =
            access::may_publish(&self.admitted.identity, topic, &shared.gate.sources())
        {
            Some(Refused::Denied(denied))
        } else if self.bucket.as_ref().is_some_and(|b| {
            !b.lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(Instant::now())
        }) {
            Some(Refused::RateLimited)
        } else {
            None
        };
        if let Some(why) = refused {
            let shown = truncate(topic).to_owned();
            return self.refuse_publish(why, &shown, meta, shared, v5);
        }
        let keep_retain = retain_allowed(topic);
        if !self.reports_as_device && topic.starts_with(&self.device_prefix) {
            self.reports_as_device = true;
        }
        publish.retain &= keep_retain;
        Ok(Verdict::Pass(Packet::Publish(publish, props)))
    }

    fn refuse_publish(
        &mut self,
        why: Refused,
        topic: &str,
        meta: Meta,
        shared: &Shared,
        v5: bool,
    ) -> Result<Verdict, ConnError> {
        let stats = &shared.stats;
        let client = self.name_for_counters().to_owned();
        match why {
            Refused::RateLimited => {
                Stats::inc(&stats.rate_limited);
                stats.count_refusal(&client, |c| c.rate_limited += 1);
                let rate = shared.gate.rate();
                self.warn(format_args!(
                    "publishes dropped: more than broker.max_publish_rate = {rate}/s"
                ));
            }
            Refused::Denied(denied) => {
                Stats::inc(&stats.publish_denied);
                stats.count_refusal(&client, |c| c.publish_denied += 1);
                self.warn(format_args!("publish on {topic:?} refused: {denied}"));
            }
            Refused::TooLong => {
                Stats::inc(&stats.publish_denied);
                stats.count_refusal(&client, |c| c.publish_denied += 1);
                self.warn(format_args!(
                    "publish refused: topic longer than {MAX_TOPIC_BYTES} bytes"
                ));
            }
        }
        let quota = matches!(why, Refused::RateLimited);
        Ok(match meta.qos {
            1 => Verdict::Answer(Packet::PubAck(
                PubAck {
                    pkid: meta.pkid,
                    reason: if quota {
                        PubAckReason::QuotaExceeded
                    } else {
                        PubAckReason::NotAuthorized
                    },
                },
                None,
            )),
            2 => {
                if !v5 {
                    // MQTT 3.1.1 has no failure PUBREC: the client goes on with PUBREL.
                    if self.refused_qos2.len() >= MAX_REFUSED_QOS2 {
                        return Err(ConnError::BadPacket(
                            "too many refused QoS 2 publishes without PUBREL",
                        ));
                    }
                    self.refused_qos2.push(meta.pkid);
                }
                Verdict::Answer(Packet::PubRec(
                    PubRec {
                        pkid: meta.pkid,
                        reason: if quota {
                            PubRecReason::QuotaExceeded
                        } else {
                            PubRecReason::NotAuthorized
                        },
                    },
                    None,
                ))
            }
            _ => Verdict::Drop,
        })
    }

    fn check_subscribe(
        &mut self,
        subscribe: protocol::Subscribe,
        props: Option<protocol::SubscribeProperties>,
        shared: &Shared,
    ) -> Verdict {
        let allowed: Vec<bool> = subscribe
            .filters
            .iter()
            .map(|f| access::may_subscribe(&self.admitted.identity, &f.path))
            .collect();
        if allowed.iter().all(|a| *a) {
            return Verdict::Pass(Packet::Subscribe(subscribe, props));
        }
        Stats::inc(&shared.stats.subscribe_denied);
        let client = self.name_for_counters().to_owned();
        shared
            .stats
            .count_refusal(&client, |c| c.subscribe_denied += 1);
        let denied: Vec<&str> = subscribe
            .filters
            .iter()
            .zip(&allowed)
            .filter(|(_, a)| !**a)
            .map(|(f, _)| truncate(&f.path))
            .collect();
        let text = format!(
            "subscription refused: {denied:?} not allowed for this client; the whole SUBSCRIBE is refused"
        );
        self.warn(format_args!("{text}"));
        // The whole packet is refused, so that the client does not half-subscribe.
        let return_codes = allowed
            .iter()
            .map(|a| {
                if *a {
                    SubscribeReasonCode::Unspecified
                } else {
                    SubscribeReasonCode::NotAuthorized
                }
            })
            .collect();
        Verdict::Answer(Packet::SubAck(
            SubAck {
                pkid: subscribe.pkid,
                return_codes,
            },
            None,
        ))
    }
}

/// Counter key of anonymous clients.
pub(crate) const ANONYMOUS: &str = "(anonymous)";

async fn run<S: Stream, P: Wire>(
    io: &mut Io<S, P>,
    link_tx: &mut LinkTx,
    link_rx: &mut LinkRx,
    keep_alive: Option<Duration>,
    session: &mut Session,
    shared: &Shared,
) -> End {
    let mut deadline = keep_alive.map(|k| Instant::now() + k);
    loop {
        // Hand every complete packet already read to the router.
        let mut batch = Vec::new();
        let mut disconnected = false;
        loop {
            let (packet, meta) = match io.parse() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => return End::Lost(Some(e)),
            };
            let verdict = match packet {
                Packet::Disconnect(..) => {
                    batch.push(packet);
                    disconnected = true;
                    break;
                }
                Packet::Publish(publish, props) => {
                    match session.check_publish(publish, props, meta, shared, P::V5) {
                        Ok(v) => v,
                        Err(e) => return End::Lost(Some(e)),
                    }
                }
                Packet::Subscribe(subscribe, props) => {
                    session.check_subscribe(subscribe, props, shared)
                }
                Packet::PubRel(rel, props) => {
                    match session.refused_qos2.iter().position(|p| *p == rel.pkid) {
                        Some(i) => {
                            session.refused_qos2.swap_remove(i);
                            Verdict::Answer(Packet::PubComp(
                                PubComp {
                                    pkid: rel.pkid,
                                    reason: PubCompReason::Success,
                                },
                                None,
                            ))
                        }
                        None => Verdict::Pass(Packet::PubRel(rel, props)),
                    }
                }
                Packet::Unsubscribe(..)
                | Packet::PingReq(..)
                | Packet::PubAck(..)
                | Packet::PubRec(..)
                | Packet::PubComp(..) => Verdict::Pass(packet),
                other => return End::Lost(Some(ConnError::Unexpected(packet_name(&other)))),
            };
            match verdict {
                Verdict::Pass(p) => batch.push(p),
                Verdict::Answer(p) => io.queue(p),
                Verdict::Drop => {}
            }
            if batch.len() >= BATCH {
                break;
            }
        }
        let more_buffered = batch.len() >= BATCH;
        if !batch.is_empty() {
            if let Err(e) = send_batch(link_tx, batch).await {
                return End::Lost(Some(e));
            }
        }
        // Answers this connection gave itself (refusals).
        if let Err(e) = io.flush().await {
            return End::Lost(Some(e.into()));
        }
        if disconnected {
            return End::Clean;
        }
        if more_buffered {
            continue;
        }

        let keep_alive_expired = async {
            match deadline {
                Some(d) => sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let credentials_changed = async {
            match session.changes.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = io.fill() => match read {
                Ok(0) => return End::Lost(None),
                Ok(_) => deadline = keep_alive.map(|k| Instant::now() + k),
                Err(e) => return End::Lost(Some(e.into())),
            },
            notification = link_rx.next() => match notification {
                Ok(Some(n)) => match forward_to_client(io, link_rx, n).await {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Kicked) => return End::Kicked,
                    Err(e) => return End::Lost(Some(e)),
                },
                Ok(None) => {}
                Err(_) => return End::Kicked,
            },
            changed = credentials_changed => {
                let Some(rx) = session.changes.as_mut() else { continue };
                if !changed {
                    // The gate is gone: the broker is stopping.
                    session.changes = None;
                } else if !Gate::still_valid(&session.admitted, &rx.borrow_and_update()) {
                    return End::Revoked;
                }
            }
            _ = keep_alive_expired => return End::Lost(Some(ConnError::Refused("keep-alive expired".into()))),
        }
    }
}

enum Flow {
    Continue,
    Kicked,
}

/// Writes `first` and whatever else the router has queued for this client, then flushes.
async fn forward_to_client<S: Stream, P: Wire>(
    io: &mut Io<S, P>,
    link_rx: &mut LinkRx,
    first: Notification,
) -> Result<Flow, ConnError> {
    let mut unscheduled = false;
    let mut kicked = false;
    let mut next = Some(first);
    while let Some(n) = next {
        match n {
            Notification::Unschedule => unscheduled = true,
            Notification::Disconnect(d, props) => {
                // MQTT 3.1.1 has no server DISCONNECT: just close.
                if P::V5 {
                    io.queue(Packet::Disconnect(d, props));
                }
                kicked = true;
            }
            other => {
                if let Some(packet) = Option::<Packet>::from(other) {
                    io.queue(packet);
                }
            }
        }
        // Drain without waiting.
        next = link_rx
            .recv_deadline(std::time::Instant::now())
            .ok()
            .flatten();
    }
    io.flush().await?;
    if kicked {
        return Ok(Flow::Kicked);
    }
    if unscheduled {
        // The router parked this link because its buffer filled; tell it we have room.
        link_rx.wake().await.map_err(Box::new)?;
    }
    Ok(Flow::Continue)
}

/// Hands packets to the router; the last `send` wakes it for the whole batch.
async fn send_batch(link_tx: &mut LinkTx, mut batch: Vec<Packet>) -> Result<(), ConnError> {
    let Some(last) = batch.pop() else {
        return Ok(());
    };
    if !batch.is_empty() {
        link_tx.buffer().extend(batch);
    }
    link_tx.send(last).await.map_err(Box::new)?;
    Ok(())
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(..) => "CONNECT",
        Packet::ConnAck(..) => "CONNACK",
        Packet::SubAck(..) => "SUBACK",
        Packet::UnsubAck(..) => "UNSUBACK",
        Packet::PingResp(..) => "PINGRESP",
        _ => "other",
    }
}

/// The QoS and packet id of a PUBLISH, read from its first bytes (rumqttd keeps them to
/// itself once decoded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Meta {
    qos: u8,
    pkid: u16,
}

/// [`Meta`] of the packet at the start of `buf`, if it is a whole PUBLISH with QoS 1 or 2.
fn peek_publish(buf: &[u8]) -> Meta {
    let none = Meta::default();
    let Some(&first) = buf.first() else {
        return none;
    };
    let qos = (first >> 1) & 0b11;
    if first >> 4 != 3 || qos == 0 {
        return none;
    }
    // Remaining length: 1 to 4 bytes, 7 bits each, high bit set on all but the last.
    let mut at = 1;
    while buf.get(at).is_some_and(|b| b & 0x80 != 0) && at < 4 {
        at += 1;
    }
    let header = at + 1;
    let topic_len = match buf.get(header..header + 2) {
        Some(&[h, l]) => usize::from(u16::from_be_bytes([h, l])),
        _ => return none,
    };
    let at = header + 2 + topic_len;
    match buf.get(at..at + 2) {
        Some(&[h, l]) => Meta {
            qos,
            pkid: u16::from_be_bytes([h, l]),
        },
        _ => none,
    }
}

/// The socket with its read and write buffers.
struct Io<S, P> {
    stats: Arc<Stats>,
    stream: S,
    read: BytesMut,
    write: BytesMut,
    protocol: P,
    max: usize,
}

impl<S: Stream, P: Wire> Io<S, P> {
    fn new(stream: S, protocol: P, shared: &Shared) -> Io<S, P> {
        Io {
            stats: shared.stats.clone(),
            stream,
            read: BytesMut::with_capacity(1024),
            write: BytesMut::with_capacity(1024),
            protocol,
            max: shared.max_packet_bytes,
        }
    }

    /// The next complete packet in the read buffer, if there is one, with its [`Meta`].
    fn parse(&mut self) -> Result<Option<(Packet, Meta)>, ConnError> {
        let meta = peek_publish(&self.read);
        match self.protocol.read_mut(&mut self.read, self.max) {
            Ok(p) => Ok(Some((p, meta))),
            Err(protocol::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(ConnError::Protocol(e)),
        }
    }

    /// Reads more bytes; `Ok(0)` means the client closed the socket. Cancel-safe.
    async fn fill(&mut self) -> std::io::Result<usize> {
        if self.read.capacity() - self.read.len() < 512 {
            self.read.reserve(4096);
        }
        let n = self.stream.read_buf(&mut self.read).await?;
        Stats::add(&self.stats.bytes_in, n as u64);
        Ok(n)
    }

    /// Reads until one whole packet is buffered and returns it.
    async fn read_packet(&mut self) -> Result<(Packet, Meta), ConnError> {
        loop {
            if let Some(p) = self.parse()? {
                return Ok(p);
            }
            if self.fill().await? == 0 {
                return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Encodes `packet` into the write buffer.
    fn queue(&mut self, packet: Packet) {
        let packet = if P::V5 { Some(packet) } else { for_v4(packet) };
        if let Some(packet) = packet {
            if let Err(e) = self.protocol.write(packet, &mut self.write) {
                debug!(error = %e, "packet could not be encoded for this client; skipped");
            }
        }
    }

    /// Writes the write buffer out; a client that takes nothing for [`WRITE_STALL`] is gone.
    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.write.is_empty() {
            timeout(WRITE_STALL, async {
                self.stream.write_all(&self.write).await?;
                self.stream.flush().await
            })
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading")
            })??;
            self.write.clear();
        }
        Ok(())
    }
}

/// Makes a packet from the router writable as MQTT 3.1.1.
///
/// The router keeps MQTT 5 properties on messages from MQTT 5 publishers and would hand them
/// to a 3.1.1 subscriber as is; rumqttd's 3.1.1 encoder panics on those, so they are removed
/// here. Return codes that 3.1.1 lacks are mapped to the nearest one it has.
fn for_v4(packet: Packet) -> Option<Packet> {
    Some(match packet {
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::SubAck(mut p, _) => {
            for code in &mut p.return_codes {
                if !matches!(
                    code,
                    SubscribeReasonCode::Success(_)
                        | SubscribeReasonCode::QoS0
                        | SubscribeReasonCode::QoS1
                        | SubscribeReasonCode::QoS2
                ) {
                    *code = SubscribeReasonCode::Failure;
                }
            }
            Packet::SubAck(p, None)
        }
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::ConnAck(mut c, _) => {
            c.code = match c.code {
                code @ (ConnectReturnCode::Success
                | ConnectReturnCode::RefusedProtocolVersion
                | ConnectReturnCode::ClientIdentifierNotValid
                | ConnectReturnCode::ServiceUnavailable
                | ConnectReturnCode::BadUserNamePassword
                | ConnectReturnCode::NotAuthorized) => code,
                ConnectReturnCode::UnsupportedProtocolVersion => {
                    ConnectReturnCode::RefusedProtocolVersion
                }
                ConnectReturnCode::BadAuthenticationMethod => {
                    ConnectReturnCode::BadUserNamePassword
                }
                ConnectReturnCode::Banned => ConnectReturnCode::NotAuthorized,
                _ => ConnectReturnCode::ServiceUnavailable,
            };
            Packet::ConnAck(c, None)
        }
        Packet::PingResp(p) => Packet::PingResp(p),
        // The server never sends these to a 3.1.1 client.
        Packet::Disconnect(..)
        | Packet::Connect(..)
        | Packet::Subscribe(..)
        | Packet::Unsubscribe(..)
        | Packet::PingReq(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{PubAck, PubAckReason, PublishProperties};

    #[test]
    fn v4_packets_lose_their_v5_properties() {
        let props = PublishProperties {
            content_type: Some("text/plain".into()),
            ..Default::default()
        };
        let p = Packet::Publish(Publish::new("a/b", "1", false), Some(props));
        let mut buf = BytesMut::new();
        // Would panic inside rumqttd's encoder without the conversion.
        V4.write(for_v4(p).unwrap(), &mut buf).unwrap();
        assert!(!buf.is_empty());
        let ack = Packet::PubAck(
            PubAck {
                pkid: 1,
                reason: PubAckReason::Success,
            },
            None,
        );
        assert!(for_v4(ack).is_some());
    }

    #[test]
    fn qos_and_packet_id_are_read_from_the_raw_publish() {
        for (qos, pkid) in [(1u8, 7u16), (2, 65535)] {
            let p = Publish::new("sensors/a/t", "21.5", false);
            // The fields are crate-private in rumqttd: build the bytes with its encoder.
            let mut buf = BytesMut::new();
            V4.write(Packet::Publish(p.clone(), None), &mut buf)
                .unwrap();
            buf[0] |= qos << 1;
            let at = buf.len() - 4;
            let mut with_id = buf[..at].to_vec();
            with_id.extend_from_slice(&pkid.to_be_bytes());
            with_id.extend_from_slice(b"21.5");
            with_id[1] += 2;
            assert_eq!(peek_publish(&with_id), Meta { qos, pkid });
        }
        assert_eq!(
            peek_publish(&[0x30, 3, 0, 1, b'a']),
            Meta::default(),
            "QoS 0"
        );
        assert_eq!(peek_publish(&[0x32, 200]), Meta::default(), "cut short");
        assert_eq!(peek_publish(&[]), Meta::default());
        assert_eq!(peek_publish(&[0xC0, 0]), Meta::default(), "not a publish");
    }

    #[test]
    fn retained_messages_only_on_status_topics() {
        assert!(retain_allowed("sensors/boiler-1/status"));
        assert!(!retain_allowed("sensors/boiler-1/temperature"));
        assert!(!retain_allowed("sensors//status"));
        assert!(!retain_allowed("sensors/a/status/x"));
        assert!(!retain_allowed("alerts/critical/a/status"));
    }

    #[test]
    fn v5_only_return_codes_map_to_v4_ones() {
        let c = Packet::ConnAck(
            ConnAck {
                session_present: false,
                code: ConnectReturnCode::ServerBusy,
            },
            None,
        );
        let mut buf = BytesMut::new();
        V4.write(for_v4(c).unwrap(), &mut buf).unwrap();
        assert_eq!(&buf[..], &[0x20, 2, 0, 3]);
        let d = Packet::Disconnect(
            protocol::Disconnect {
                reason_code: protocol::DisconnectReasonCode::NormalDisconnection,
            },
            None,
        );
        assert!(for_v4(d).is_none());
    }
}

//! One client connection: the only place that touches a client socket.
//!
//! Reads MQTT packets with rumqttd's codec and writes the answers. Also does what the router
//! leaves to its network layer: the TLS handshake and the CONNECT handshake under a timeout,
//! who the client is ([`Gate`]), client id checks, keep-alive, and the client's last will when
//! the connection ends without a DISCONNECT.
//!
//! Every PUBLISH and SUBSCRIBE is checked here first ([`crate::access`]): a refused or
//! rate-limited PUBLISH goes no further, is counted, and is answered by this connection
//! (PUBACK, or PUBREC and later PUBCOMP, with a reason code on MQTT 5) so that the client does
//! not resend it forever. Accepted QoS 0 and 1 publishes go to the shared [`inject`] task,
//! which hands them to ingest and, when someone may be listening, to the router. Only a client
//! that subscribes, keeps a persistent session or publishes with QoS 2 gets a router link of
//! its own ([`Link`]): most devices never do, and cost a few KiB instead of the router's
//! tens of KiB per link.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::Notification;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{
    self, ConnAck, ConnectReturnCode, Filter, LastWill, Packet, Protocol, PubAck, PubAckReason,
    PubComp, PubCompReason, PubRec, PubRecReason, Publish, PublishProperties, RetainForwardRule,
    SubAck, SubscribeReasonCode,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, debug_span, info, warn};

use super::gate::{Admitted, Gate, Refusal, Registration, SharedBucket};
use super::retained::Retained;
use super::{Router, client_id_allowed, tls};
use crate::access::{self, Identity};
use crate::codec;
use crate::sources::Source;
use crate::stats::Stats;

/// Most packets handed to the router in one go; the rest wait for the next round.
const BATCH: usize = 256;
/// A connection's first read buffer.
const READ_MIN: usize = 256;
/// The largest read a busy connection grows to.
const READ_MAX: usize = 64 * 1024;
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
    /// Publishes of every client into the router, a batch at a time ([`inject`]).
    pub(crate) inject: mpsc::Sender<Vec<Packet>>,
    /// Who may be listening to what devices publish ([`Watchers`]).
    pub(crate) watchers: Arc<Watchers>,
    pub(crate) gate: Arc<Gate>,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_packet_bytes: usize,
    pub(crate) max_connections: usize,
    pub(crate) stats: Arc<Stats>,
    pub(crate) refusal_logged_at: Mutex<Option<Instant>>,
    /// Devices' retained status ([`Retained`]).
    pub(crate) retained: Retained,
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
    /// Another connection took the client id over.
    Kicked,
    /// The client's name was removed from the credentials, or got a new secret.
    Revoked,
    /// The socket closed, keep-alive expired or the client broke the protocol.
    Lost(Option<ConnError>),
}

/// Serves one client on plain TCP until it leaves. Never panics on client input; errors end
/// this connection only.
///
/// Plain and TLS connections are tasks of different types, so that ten thousand idle devices
/// on plain TCP do not each carry room for a TLS session: a connection's memory is mostly its
/// future.
///
/// Not an `async fn`: the socket and the rest are moved into the future once, instead of
/// being kept both as arguments and as locals.
pub(crate) fn serve<P: Wire>(
    stream: TcpStream,
    peer: SocketAddr,
    protocol: P,
    shared: Arc<Shared>,
    slot: Slot,
) -> impl std::future::Future<Output = ()> + Send {
    // Small packets (readings, acks) must not wait for Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    let span = debug_span!("client", %peer, client_id = tracing::field::Empty);
    let mut io = Io::new(stream, protocol, &shared);
    async move {
        ended(session(&mut io, peer, &shared, None).await, &shared);
        drop(slot);
    }
    .instrument(span)
}

/// Serves one client on TLS until it leaves; see [`serve`].
pub(crate) async fn serve_tls<P: Wire>(
    stream: TcpStream,
    peer: SocketAddr,
    protocol: P,
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    slot: Slot,
) {
    let _ = stream.set_nodelay(true);
    let span = debug_span!("client", %peer, client_id = tracing::field::Empty);
    async {
        let result = over_tls(stream, acceptor, peer, protocol, &shared).await;
        ended(result, &shared);
    }
    .instrument(span)
    .await;
    drop(slot);
}

/// Counts and logs how a connection ended.
fn ended(result: Result<(), ConnError>, shared: &Shared) {
    if let Err(e) = result {
        if e.is_protocol() {
            Stats::inc(&shared.stats.protocol_errors);
        }
        debug!(error = %e, "connection closed");
    }
}

/// The TLS handshake, in this connection's task and under the CONNECT timeout (a silent client
/// holds up no one), then the session.
async fn over_tls<P: Wire>(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    peer: SocketAddr,
    protocol: P,
    shared: &Shared,
) -> Result<(), ConnError> {
    let stream = match timeout(shared.connect_timeout, acceptor.accept(stream)).await {
        Err(_) => return Err(ConnError::HandshakeTimeout(shared.connect_timeout)),
        Ok(Err(e)) => {
            Stats::inc(&shared.stats.tls_failures);
            shared.log_refusal(peer, &format!("TLS handshake failed: {e}"));
            return Err(ConnError::Handshake(e));
        }
        Ok(Ok(stream)) => stream,
    };
    let certificate = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(tls::common_name);
    let mut io = Io::new(stream, protocol, shared);
    let session = Box::pin(session(&mut io, peer, shared, certificate));
    session.await
}

/// What a client's CONNECT established.
struct Accepted {
    admitted: Admitted,
    client_id: String,
    /// The client id the server chose, if the client sent none.
    assigned: Option<String>,
    will: Option<LastWill>,
    keep_alive: u16,
    clean_session: bool,
    /// Topic aliases the client accepts from the server.
    alias_max: u16,
}

/// The CONNECT handshake: who the client is, and whether it may come in. A refusal is
/// answered (CONNACK) and returned as an error. `certificate` is the common name of the
/// client's verified certificate (`Some(None)`: a certificate without one).
async fn handshake<S: Stream, P: Wire>(
    io: &mut Io<S, P>,
    peer: SocketAddr,
    shared: &Shared,
    certificate: Option<Option<String>>,
) -> Result<Accepted, ConnError> {
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
    // Boxed: only needed at CONNECT, it should not size every connection's future.
    let admit = Box::pin(shared.gate.admit(certificate, login));
    let admitted = match admit.await {
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
                Some(retain_allowed(topic, &sources))
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
    Ok(Accepted {
        admitted,
        client_id,
        assigned,
        will,
        keep_alive: connect.keep_alive,
        clean_session: connect.clean_session,
        alias_max: props.as_ref().and_then(|p| p.topic_alias_max).unwrap_or(0),
    })
}

/// The CONNECT handshake, the client id's registration, a router link for a persistent
/// session, and the CONNACK queued.
async fn open<S: Stream, P: Wire>(
    io: &mut Io<S, P>,
    peer: SocketAddr,
    shared: &Shared,
    certificate: Option<Option<String>>,
) -> Result<Opened, ConnError> {
    let Accepted {
        admitted,
        client_id,
        assigned,
        will,
        keep_alive,
        clean_session,
        alias_max,
    } = handshake(io, peer, shared, certificate).await?;
    // One connection per client id: a newer one takes over (MQTT requires it), whether or not
    // either has a router link.
    let registration = shared.gate.register(&client_id, &admitted);
    // The router keeps a session only for clients that ask for one; everyone else gets a link
    // when they first need the router for more than publishing ([`Link`]).
    let mut link = None;
    let mut session_present = false;
    if !clean_session {
        let open = Box::pin(Link::open(shared, &client_id, false, alias_max));
        match open.await {
            Ok((opened, ack)) => {
                session_present = ack.session_present;
                link = Some(Box::new(opened));
            }
            Err(e) => {
                shared.gate.unregister(&client_id, &registration);
                return Err(e);
            }
        }
    }
    let connack_props = P::V5.then(|| rumqttd::protocol::ConnAckProperties {
        // Topic aliases of the client are resolved here, so the router is never asked to
        // keep any.
        topic_alias_max: Some(TOPIC_ALIASES),
        assigned_client_identifier: assigned,
        ..Default::default()
    });
    io.queue(Packet::ConnAck(
        ConnAck {
            session_present,
            code: ConnectReturnCode::Success,
        },
        connack_props,
    ));
    let session = Session {
        client_id,
        alias_max,
        link,
        reports_as_device: false,
        bucket: shared.gate.bucket(&admitted.identity),
        admitted,
        aliases: Vec::new(),
        refused_qos2: Vec::new(),
        reading_filters: Vec::new(),
        warned_at: None,
        unlogged: 0,
    };
    Ok(Opened {
        session,
        registration,
        will,
        keep_alive,
        clean_session,
    })
}

/// What [`open`] leaves for the rest of the session.
struct Opened {
    session: Session,
    registration: Registration,
    will: Option<LastWill>,
    keep_alive: u16,
    clean_session: bool,
}

/// The CONNECT handshake, then the session until it ends.
async fn session<S: Stream, P: Wire>(
    io: &mut Io<S, P>,
    peer: SocketAddr,
    shared: &Shared,
    certificate: Option<Option<String>>,
) -> Result<(), ConnError> {
    // Boxed: what CONNECT needs is gone once it is answered, and must not size the session,
    // which waits for the client most of its life.
    let Opened {
        mut session,
        registration,
        will,
        keep_alive,
        clean_session,
    } = Box::pin(open(io, peer, shared, certificate)).await?;
    let keep_alive_secs = keep_alive;
    let keep_alive = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    // From here on every way out goes through the cleanup below.
    let end = match io.flush().await {
        Ok(()) => {
            debug!(
                keep_alive = keep_alive_secs,
                clean = clean_session,
                who = session.admitted.identity.name().unwrap_or("anonymous"),
                "client connected"
            );
            run(io, keep_alive, &mut session, &registration, shared).await
        }
        Err(e) => End::Lost(Some(e.into())),
    };
    shared.gate.unregister(&session.client_id, &registration);
    if clean_session {
        shared.watchers.remove(session.reading_filters.len());
    } else if !session.reading_filters.is_empty() {
        // The router keeps a persistent session's subscriptions while the client is away.
        shared.watchers.keep_forever();
    }
    // A clean DISCONNECT went to the router with the client's other packets.
    let router_told = matches!(end, End::Clean);
    let mut last = Vec::with_capacity(2);
    let error = match end {
        End::Clean => None,
        End::Kicked => Some(ConnError::Refused(
            "taken over by a newer connection with the same client id".into(),
        )),
        End::Revoked => {
            info!(
                name = session.device(),
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
            // The router never holds a will: publish it, or say the device is gone.
            if let Some(LastWill {
                topic,
                message,
                retain,
                ..
            }) = will
            {
                let mut will = Publish::new(topic, message, retain);
                shared.retained.take(&mut will);
                last.push(will);
            } else if session.reports_as_device {
                // A device without a will that drops off is still gone: say so on its status
                // topic, as its will would have.
                let topic = format!(
                    "{}/{}/{}",
                    codec::TOPIC_ROOT,
                    session.device(),
                    codec::STATUS_METRIC
                );
                last.push(Publish::new(
                    Bytes::from(topic),
                    Bytes::from_static(b"offline"),
                    false,
                ));
            }
            error
        }
    };
    if !last.is_empty() {
        let last = last.into_iter().map(|p| Packet::Publish(p, None)).collect();
        // The injector only goes away when the broker stops.
        let _ = shared.inject.send(last).await;
    }
    if let Some(mut link) = session.link.take() {
        // Take the client off the router's books.
        if !router_told {
            let disconnect = Packet::Disconnect(
                protocol::Disconnect {
                    reason_code: protocol::DisconnectReasonCode::UnspecifiedError,
                },
                None,
            );
            // Boxed: only clients with a link get here.
            let _ = Box::pin(send_batch(&mut link.tx, vec![disconnect])).await;
        }
    }
    error.map_or(Ok(()), Err)
}

/// Answers CONNECT with a refusal; always an error.
async fn refuse<S: Stream, P: Wire, T>(
    io: &mut Io<S, P>,
    code: ConnectReturnCode,
    why: &str,
) -> Result<T, ConnError> {
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

/// Retained messages are kept only on device status topics (`sensors/{device}/status`, and
/// the presence topics of sources, such as Tasmota's `tele/{device}/LWT`): anything else
/// retained would let one client fill the broker's memory topic by topic.
fn retain_allowed(topic: &str, sources: &[Source]) -> bool {
    let mut levels = topic.split('/');
    (levels.next() == Some(codec::TOPIC_ROOT)
        && levels.next().is_some_and(|d| !d.is_empty())
        && levels.next() == Some(codec::STATUS_METRIC)
        && levels.next().is_none())
        || sources.iter().any(|s| s.is_presence_topic(topic))
}

/// What the connection knows about its client.
struct Session {
    admitted: Admitted,
    client_id: String,
    /// Topic aliases the client accepts from the server (for its router link).
    alias_max: u16,
    /// The client's router link, once it needs one.
    link: Option<Box<Link>>,
    /// The client published readings under its own name as device.
    reports_as_device: bool,
    bucket: Option<SharedBucket>,
    /// MQTT 5 topic aliases the client set (at most [`TOPIC_ALIASES`]).
    aliases: Vec<(u16, Bytes)>,
    /// Packet ids of refused QoS 2 publishes whose PUBREL is still to come (MQTT 3.1.1).
    refused_qos2: Vec<u16>,
    /// This client's subscriptions that may match what devices publish.
    reading_filters: Vec<String>,
    warned_at: Option<Instant>,
    unlogged: u64,
}

/// What becomes of a packet from the client.
enum Verdict {
    /// To the router through the client's own link (opened if need be).
    Pass(Packet),
    /// A QoS 0 or 1 publish, to the router through the shared injector; `Some(pkid)`: a QoS 1
    /// publish to acknowledge once the injector has it.
    Inject(Packet, Option<u16>),
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
    /// Notes a subscription (`on`) or unsubscription of `filter`, for [`Watchers`].
    fn watching(&mut self, filter: &str, on: bool, shared: &Shared) {
        if !Watchers::hears_readings(filter) {
            return;
        }
        let at = self.reading_filters.iter().position(|f| f == filter);
        match (on, at) {
            (true, None) => {
                self.reading_filters.push(filter.to_owned());
                shared.watchers.add(1);
            }
            (false, Some(i)) => {
                self.reading_filters.swap_remove(i);
                shared.watchers.remove(1);
            }
            _ => {}
        }
    }

    /// The device name: the client's name, or (anonymous) its client id.
    fn device(&self) -> &str {
        self.admitted.identity.name().unwrap_or(&self.client_id)
    }

    /// True if `topic` is `sensors/{device}/...`.
    fn is_own_reading(&self, topic: &str) -> bool {
        topic
            .strip_prefix(codec::TOPIC_ROOT)
            .and_then(|t| t.strip_prefix('/'))
            .and_then(|t| t.strip_prefix(self.device()))
            .is_some_and(|t| t.starts_with('/'))
    }

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
            let known = self.aliases.iter_mut().find(|(a, _)| *a == alias);
            if publish.topic.is_empty() {
                match known {
                    Some((_, topic)) => publish.topic = topic.clone(),
                    None => return Err(ConnError::BadPacket("unknown topic alias")),
                }
            } else {
                // A copy of its own: the alias outlives this packet's read buffer.
                let topic = Bytes::copy_from_slice(&publish.topic);
                match known {
                    Some((_, t)) => *t = topic,
                    None => self.aliases.push((alias, topic)),
                }
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
        // Only a retained publish needs the topic checked (readings rarely are).
        publish.retain = publish.retain && retain_allowed(topic, &shared.gate.sources());
        if !self.reports_as_device && self.is_own_reading(topic) {
            self.reports_as_device = true;
        }
        // Topic and payload are slices of this connection's read buffer; the router keeps
        // messages for a while, and must not keep the whole buffer alive with them.
        let (topic, payload) = own(&publish.topic, &publish.payload);
        publish.topic = topic;
        publish.payload = payload;
        shared.retained.take(&mut publish);
        let packet = Packet::Publish(publish, props);
        Ok(match meta.qos {
            0 => Verdict::Inject(packet, None),
            1 => Verdict::Inject(packet, Some(meta.pkid)),
            // Exactly-once needs the router's bookkeeping for this client.
            _ => Verdict::Pass(packet),
        })
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
            let mut subscribe = subscribe;
            for f in &mut subscribe.filters {
                // Retained status is sent by this connection after the SUBACK ([`Link`]);
                // whether the subscription is new is known only here. (Filters that cannot
                // match a status topic keep their rule for the router's retained alerts.)
                if f.retain_forward_rule == RetainForwardRule::OnNewSubscribe
                    && Watchers::hears_readings(&f.path)
                {
                    f.retain_forward_rule = if self.reading_filters.contains(&f.path) {
                        RetainForwardRule::Never
                    } else {
                        RetainForwardRule::OnEverySubscribe
                    };
                }
                self.watching(&f.path, true, shared);
            }
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

/// Copies of `topic` and `payload` in one small allocation of their own.
fn own(topic: &Bytes, payload: &Bytes) -> (Bytes, Bytes) {
    let mut both = BytesMut::with_capacity(topic.len() + payload.len());
    both.extend_from_slice(topic);
    both.extend_from_slice(payload);
    let mut both = both.freeze();
    let topic = both.split_to(topic.len());
    (topic, both)
}

/// The client's own router link. Most devices only publish, and their publishes go through
/// the shared injector, so they never need one: a link costs about 40 KiB in the router. A
/// client gets its link at CONNECT if it asks for a persistent session, else when it first
/// subscribes, unsubscribes or publishes with QoS 2.
struct Link {
    tx: LinkTx,
    rx: LinkRx,
    /// SUBSCRIBEs sent to the router and not yet acknowledged: packet id, filters, and
    /// subscription identifier. Their retained status goes to the client after the SUBACK.
    subscribing: Vec<(u16, Vec<Filter>, Option<usize>)>,
}

impl Link {
    async fn open(
        shared: &Shared,
        client_id: &str,
        clean: bool,
        alias_max: u16,
    ) -> Result<(Link, ConnAck), ConnError> {
        let connect_link = shared.router.connect.clone();
        let id = client_id.to_owned();
        // Registering blocks until the router answers; keep that off the async workers.
        let (tx, rx, ack) =
            tokio::task::spawn_blocking(move || connect_link(&id, clean, alias_max))
                .await
                .map_err(|_| ConnError::LinkSetup)??;
        match Option::<Packet>::from(ack) {
            Some(Packet::ConnAck(connack, _)) => Ok((
                Link {
                    tx,
                    rx,
                    subscribing: Vec::new(),
                },
                connack,
            )),
            _ => Err(ConnError::LinkSetup),
        }
    }

    /// Notes the SUBSCRIBEs in `batch`, on their way to the router.
    fn subscribing(&mut self, batch: &[Packet]) {
        for packet in batch {
            if let Packet::Subscribe(subscribe, props) = packet {
                let id = props.as_ref().and_then(|p| p.id);
                self.subscribing
                    .push((subscribe.pkid, subscribe.filters.clone(), id));
            }
        }
    }

    /// Queues, after the router's SUBACK, the retained status that each granted filter of the
    /// SUBSCRIBE it answers matches.
    fn send_retained<S: Stream, P: Wire>(
        &mut self,
        io: &mut Io<S, P>,
        suback: &SubAck,
        retained: &Retained,
    ) {
        let Some(i) = self.subscribing.iter().position(|s| s.0 == suback.pkid) else {
            return;
        };
        let (_, filters, id) = self.subscribing.swap_remove(i);
        for (filter, code) in filters.iter().zip(&suback.return_codes) {
            let granted = matches!(
                code,
                SubscribeReasonCode::Success(_)
                    | SubscribeReasonCode::QoS0
                    | SubscribeReasonCode::QoS1
                    | SubscribeReasonCode::QoS2
            );
            if granted {
                for (publish, props) in retained.for_subscription(filter, id) {
                    io.queue(Packet::Publish(publish, props));
                }
            }
        }
    }
}

/// Whether anyone may be listening, through the router, to what devices publish. Most sites
/// only watch `alerts/#`; then readings go to ingest alone and cost the router nothing.
/// Retained device status is kept apart ([`Retained`]) and sent to each new subscriber by its
/// connection.
#[derive(Default)]
pub(crate) struct Watchers {
    /// Live subscriptions whose filter may match a reading.
    live: std::sync::atomic::AtomicUsize,
    /// A persistent session subscribed to readings: the router may deliver to it at any time.
    forever: std::sync::atomic::AtomicBool,
}

impl Watchers {
    /// True if `filter` may match a topic a client publishes on (everything but the gateway's
    /// own `alerts/...` and `$...`).
    fn hears_readings(filter: &str) -> bool {
        let first = filter.split('/').next().unwrap_or_default();
        first != crate::alert::TOPIC_ROOT && !first.starts_with('$')
    }

    fn add(&self, n: usize) {
        self.live.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn remove(&self, n: usize) {
        self.live.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }

    fn keep_forever(&self) {
        self.forever
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// True if readings must go to the router too.
    pub(crate) fn any(&self) -> bool {
        self.forever.load(std::sync::atomic::Ordering::Relaxed)
            || self.live.load(std::sync::atomic::Ordering::Relaxed) > 0
    }
}

/// Counter key of anonymous clients.
pub(crate) const ANONYMOUS: &str = "(anonymous)";

async fn run<S: Stream, P: Wire>(
    io: &mut Io<S, P>,
    keep_alive: Option<Duration>,
    session: &mut Session,
    registration: &Registration,
    shared: &Shared,
) -> End {
    // One timer for the whole session, pushed back only when it fires: re-arming it on every
    // read would cost a timer update per packet.
    let mut last_read = Instant::now();
    let keep_alive_timer = tokio::time::sleep(keep_alive.unwrap_or(Duration::from_secs(3600)));
    tokio::pin!(keep_alive_timer);
    loop {
        // Hand every complete packet already read on: publishes to the injector, the rest to
        // the client's router link.
        let mut to_router = Vec::new();
        let mut injected = Vec::new();
        let mut acks = Vec::new();
        let mut disconnected = false;
        loop {
            let (packet, meta) = match io.parse() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => return End::Lost(Some(e)),
            };
            let linked = session.link.is_some();
            let verdict = match packet {
                Packet::Disconnect(..) => {
                    disconnected = true;
                    if linked {
                        to_router.push(packet);
                    }
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
                // Without a link the router has no state for this client to ask about.
                Packet::PingReq(_) if !linked => {
                    Verdict::Answer(Packet::PingResp(protocol::PingResp))
                }
                Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..) if !linked => {
                    Verdict::Drop
                }
                Packet::Unsubscribe(ref unsubscribe, _) => {
                    for f in &unsubscribe.filters {
                        session.watching(f, false, shared);
                    }
                    Verdict::Pass(packet)
                }
                Packet::PingReq(..)
                | Packet::PubAck(..)
                | Packet::PubRec(..)
                | Packet::PubComp(..) => Verdict::Pass(packet),
                other => return End::Lost(Some(ConnError::Unexpected(packet_name(&other)))),
            };
            match verdict {
                Verdict::Pass(p) => to_router.push(p),
                Verdict::Inject(p, ack) => {
                    if injected.is_empty() {
                        // Most rounds carry one reading, and a connection may wait with its
                        // batch while ingest is behind: room for one, not the four a first
                        // push makes (a packet is a few hundred bytes).
                        injected.reserve_exact(1);
                    }
                    injected.push(p);
                    acks.extend(ack);
                }
                Verdict::Answer(p) => io.queue(p),
                Verdict::Drop => {}
            }
            if to_router.len() + injected.len() >= BATCH {
                break;
            }
        }
        let more_buffered = to_router.len() + injected.len() >= BATCH;
        if !injected.is_empty() {
            // Waiting here is the backpressure: this client is not read while the router is
            // behind. An error means the broker is stopping.
            if shared.inject.send(injected).await.is_err() {
                return End::Lost(None);
            }
            for pkid in acks.drain(..) {
                io.queue(Packet::PubAck(
                    PubAck {
                        pkid,
                        reason: PubAckReason::Success,
                    },
                    None,
                ));
            }
        }
        if !to_router.is_empty() {
            if session.link.is_none() {
                let open = Box::pin(Link::open(
                    shared,
                    &session.client_id,
                    true,
                    session.alias_max,
                ));
                match open.await {
                    Ok((link, _)) => session.link = Some(Box::new(link)),
                    Err(e) => return End::Lost(Some(e)),
                }
            }
            let link = session.link.as_mut().expect("opened above");
            link.subscribing(&to_router);
            // Boxed: rare for a device, and this future would make every connection larger.
            let send = Box::pin(send_batch(&mut link.tx, to_router));
            if let Err(e) = send.await {
                return End::Lost(Some(e));
            }
        }
        // Answers this connection gave itself.
        if let Err(e) = io.flush().await {
            return End::Lost(Some(e.into()));
        }
        if disconnected {
            return End::Clean;
        }
        if more_buffered {
            continue;
        }

        let link = &mut session.link;
        let from_router = async {
            match link.as_mut() {
                // Boxed, and the notification too, and the error dropped (each 800 bytes):
                // only clients with a link pay for them.
                Some(l) => Box::pin(l.rx.next())
                    .await
                    .map(|n| n.map(Box::new))
                    .map_err(|_| ()),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = io.fill() => match read {
                Ok(0) => return End::Lost(None),
                Ok(_) => last_read = Instant::now(),
                Err(e) => return End::Lost(Some(e.into())),
            },
            notification = from_router => match notification {
                Ok(Some(n)) => {
                    let link = session.link.as_mut().expect("a notification came from it");
                    let forward = Box::pin(forward_to_client(io, link, &shared.retained, *n));
                    match forward.await {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Kicked) => return End::Kicked,
                        Err(e) => return End::Lost(Some(e)),
                    }
                }
                Ok(None) => {}
                Err(()) => return End::Kicked,
            },
            revoked = registration.kicked() => {
                return if revoked { End::Revoked } else { End::Kicked };
            }
            () = &mut keep_alive_timer, if keep_alive.is_some() => {
                let due = last_read + keep_alive.expect("guarded");
                if Instant::now() >= due {
                    return End::Lost(Some(ConnError::Refused("keep-alive expired".into())));
                }
                keep_alive_timer.as_mut().reset(due);
            }
        }
    }
}

/// Hands every client's QoS 0 and 1 publishes, in batches, to ingest (which judges them) and
/// to the router through one internal link (which delivers them to whoever subscribed), until
/// every sender is gone. Waiting for ingest is the backpressure that slows publishers down
/// when ingest is behind; nothing is dropped between a connection and ingest. Acknowledgements
/// the router sends back to the link are read and dropped (the connection acknowledged its
/// client when the injector took the message).
pub(crate) async fn inject(
    mut rx: mpsc::Receiver<Vec<Packet>>,
    ingest: mpsc::Sender<Vec<Publish>>,
    watchers: Arc<Watchers>,
    mut tx: LinkTx,
    mut acks: LinkRx,
) {
    let mut batches = Vec::with_capacity(16);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batches, 16) => {
                if n == 0 {
                    return;
                }
                let mut arrived = batches.drain(..);
                let mut all = arrived.next().expect("n > 0");
                for more in arrived {
                    all.extend(more);
                }
                let readings = all
                    .iter()
                    .filter_map(|p| match p {
                        Packet::Publish(publish, _) => Some(publish.clone()),
                        _ => None,
                    })
                    .collect();
                if ingest.send(readings).await.is_err() {
                    // Ingest has stopped: the gateway is shutting down.
                    return;
                }
                if watchers.any() {
                    if let Err(e) = send_batch(&mut tx, all).await {
                        tracing::error!(error = %e, "the broker's router refused the publish link; publishes are lost until restart");
                        return;
                    }
                }
            }
            notification = acks.next() => {
                let mut unscheduled = false;
                let mut next = match notification {
                    Ok(n) => n,
                    Err(_) => return,
                };
                while let Some(n) = next {
                    unscheduled |= matches!(n, Notification::Unschedule);
                    next = acks.recv_deadline(std::time::Instant::now()).ok().flatten();
                }
                if unscheduled && acks.wake().await.is_err() {
                    return;
                }
            }
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
    link: &mut Link,
    retained: &Retained,
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
                    let suback = match &packet {
                        Packet::SubAck(suback, _) => Some(suback.clone()),
                        _ => None,
                    };
                    io.queue(packet);
                    if let Some(suback) = suback {
                        link.send_retained(io, &suback, retained);
                    }
                }
            }
        }
        // Drain without waiting.
        next = link
            .rx
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
        link.rx.wake().await.map_err(Box::new)?;
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
    /// How much to read at once: small for a quiet device, growing for a busy client.
    read_chunk: usize,
    write: BytesMut,
    protocol: P,
    max: usize,
}

impl<S: Stream, P: Wire> Io<S, P> {
    fn new(stream: S, protocol: P, shared: &Shared) -> Io<S, P> {
        Io {
            stats: shared.stats.clone(),
            stream,
            read: BytesMut::new(),
            read_chunk: READ_MIN,
            write: BytesMut::new(),
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
    ///
    /// Ten thousand quiet devices must not cost ten thousand buffers. With nothing buffered,
    /// a connection waits without a buffer of its own: the read goes into scratch space on
    /// the stack of the poll that finds data, and only what arrived is kept. Behind a partial
    /// packet, a busy client should not pay a system call per packet: the buffer grows from
    /// [`READ_MIN`], doubling up to [`READ_MAX`] whenever a read fills it. Consumed bytes are
    /// reclaimed in place, since no packet keeps a reference into the buffer ([`own`]).
    async fn fill(&mut self) -> std::io::Result<usize> {
        if self.read.is_empty() {
            if self.read.capacity() > 0 {
                self.read = BytesMut::new();
            }
            let Io { stream, read, .. } = self;
            let n = std::future::poll_fn(|cx| {
                let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); READ_MAX];
                let mut buf = tokio::io::ReadBuf::uninit(&mut scratch);
                std::task::ready!(std::pin::Pin::new(&mut *stream).poll_read(cx, &mut buf))?;
                read.extend_from_slice(buf.filled());
                std::task::Poll::Ready(Ok::<_, std::io::Error>(buf.filled().len()))
            })
            .await?;
            Stats::add(&self.stats.bytes_in, n as u64);
            return Ok(n);
        }
        if self.read.capacity() - self.read.len() < self.read_chunk / 2 {
            self.read.reserve(self.read_chunk);
        }
        let room = self.read.capacity() - self.read.len();
        let n = self.stream.read_buf(&mut self.read).await?;
        if n == room && self.read_chunk < READ_MAX {
            self.read_chunk *= 2;
        }
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
            // An idle connection keeps no write buffer either.
            self.write = BytesMut::new();
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
        let tasmota = Source::new(
            "tasmota",
            "tele/{device}/SENSOR",
            crate::sources::Payload::Json,
            None,
            None,
        )
        .unwrap()
        .with_presence("tele/{device}/LWT", None, None, None)
        .unwrap();
        let sources = [tasmota];
        assert!(retain_allowed("sensors/boiler-1/status", &sources));
        assert!(!retain_allowed("sensors/boiler-1/temperature", &sources));
        assert!(!retain_allowed("sensors//status", &sources));
        assert!(!retain_allowed("sensors/a/status/x", &sources));
        assert!(!retain_allowed("alerts/critical/a/status", &sources));
        assert!(retain_allowed("tele/kitchen/LWT", &sources));
        assert!(!retain_allowed("tele/kitchen/SENSOR", &sources));
        assert!(!retain_allowed("tele/kitchen/LWT", &[]));
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

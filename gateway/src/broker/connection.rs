//! One client connection: the only place that touches a client socket.
//!
//! Reads bytes, decodes packets ([`packet`]) and hands them to the client's [`Session`],
//! which decides everything; writes what the session answers and what its mailbox has for
//! the client. Also does what needs the network or the clock: the TLS handshake and the
//! CONNECT under a timeout, admission by the [`Gate`] (which may hash a secret), keep-alive,
//! and waiting for the injector when ingest is behind.
//!
//! The protocol version is chosen from the CONNECT's protocol level, on every listener:
//! 4 is MQTT 3.1.1, 5 is MQTT 5; MQTT 3.1 (level 3) and anything else is refused with the
//! 3.1.1 return code 1, "unacceptable protocol version".
//!
//! Accepted publishes go to the shared [`inject`] task in batches, which hands them to ingest
//! and, when someone may be listening, to the [`Hub`] for the subscribers.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, debug_span, info, warn};

use super::gate::{Admitted, Gate, Refusal, Registration};
use super::hub::{Batch, Hub, Message};
use super::packet::{self, ConnAck, DecodeError, Disconnect, Packet, QoS, Version, reason};
use super::session::{Close, Ctx, Opened, Output, Session, SessionLimits, truncate};
use super::tls;
use crate::codec;
use crate::stats::Stats;

/// Most packets handled in one round before the answers go out.
const BATCH: usize = 256;
/// A connection's first read buffer.
const READ_MIN: usize = 256;
/// The largest read a busy connection grows to.
const READ_MAX: usize = 64 * 1024;
/// A client that takes nothing from its socket for this long is dropped.
const WRITE_STALL: Duration = Duration::from_secs(30);
/// How long a connection the server closed with a DISCONNECT waits for the client to close.
const LINGER: Duration = Duration::from_secs(2);
/// Refused connections and failed handshakes are logged at most this often, all together.
const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(10);

/// A byte stream to a client: TCP, or TLS over TCP.
pub(crate) trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) hub: Arc<Hub>,
    /// Publishes of every client, a batch at a time ([`inject`]).
    pub(crate) inject: mpsc::Sender<Batch>,
    pub(crate) gate: Arc<Gate>,
    pub(crate) connect_timeout: Duration,
    pub(crate) limits: SessionLimits,
    pub(crate) max_connections: usize,
    pub(crate) stats: Arc<Stats>,
    pub(crate) refusal_logged_at: Mutex<Option<Instant>>,
    pub(crate) violation_logged_at: Mutex<Option<Instant>>,
    pub(crate) next_connection: AtomicU64,
}

impl Shared {
    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            hub: &self.hub,
            gate: &self.gate,
            stats: &self.stats,
            limits: &self.limits,
        }
    }

    /// Logs a refused connection, unless one was logged moments ago. At the default level:
    /// an operator must be able to see why a client cannot connect.
    fn log_refusal(&self, peer: SocketAddr, what: &str) {
        if due(&self.refusal_logged_at) {
            warn!(%peer, "client refused: {what} (such lines are logged at most every {}s; every refusal is counted)", REFUSALS_LOGGED_EVERY.as_secs());
        }
    }

    /// Logs a connection closed for breaking the protocol, unless one was logged moments ago.
    fn log_violation(&self, peer: SocketAddr, client_id: &str, code: u8, why: &str) {
        if due(&self.violation_logged_at) {
            warn!(%peer, client_id = truncate(client_id), "connection closed: {why} (reason code {code:#04x}; such lines are logged at most every {}s; every one is counted in watchpost_protocol_errors_total)", REFUSALS_LOGGED_EVERY.as_secs());
        }
    }
}

/// True if a line limited by `last` may be logged now; notes the time if so.
fn due(last: &Mutex<Option<Instant>>) -> bool {
    let now = Instant::now();
    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
    if last.is_none_or(|t| now.duration_since(t) >= REFUSALS_LOGGED_EVERY) {
        *last = Some(now);
        return true;
    }
    false
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
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Decode(DecodeError),
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
    #[error("{why} (reason code {code:#04x})")]
    Violation { code: u8, why: String },
}

impl ConnError {
    /// True if the client broke the protocol (as opposed to leaving or being refused).
    fn is_protocol(&self) -> bool {
        matches!(
            self,
            ConnError::Decode(_) | ConnError::NotConnect | ConnError::Violation { .. }
        )
    }
}

/// How a session ended.
enum End {
    /// The session closed itself: the client's DISCONNECT, or a protocol violation.
    Closed(Close),
    /// Another connection took the client id over.
    Kicked,
    /// The client's name was removed from the credentials, or got a new secret.
    Revoked,
    /// The socket closed, keep-alive expired, or the socket broke.
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
pub(crate) fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    slot: Slot,
) -> impl std::future::Future<Output = ()> + Send {
    // Small packets (readings, acks) must not wait for Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    let span = debug_span!("client", %peer, client_id = tracing::field::Empty);
    let mut io = Io::new(stream, &shared);
    async move {
        ended(session(&mut io, peer, &shared, None).await, &shared);
        drop(slot);
    }
    .instrument(span)
}

/// Serves one client on TLS until it leaves; see [`serve`].
pub(crate) async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    slot: Slot,
) {
    let _ = stream.set_nodelay(true);
    let span = debug_span!("client", %peer, client_id = tracing::field::Empty);
    async {
        let result = over_tls(stream, acceptor, peer, &shared).await;
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
async fn over_tls(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    peer: SocketAddr,
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
    let mut io = Io::new(stream, shared);
    let session = Box::pin(session(&mut io, peer, shared, certificate));
    session.await
}

/// The CONNECT handshake: the protocol version, who the client is, and whether it may come
/// in. A refusal is answered (CONNACK), logged and returned as an error. `certificate` is
/// the common name of the client's verified certificate (`Some(None)`: a certificate without
/// one).
async fn handshake<S: Stream>(
    io: &mut Io<S>,
    peer: SocketAddr,
    shared: &Shared,
    certificate: Option<Option<String>>,
    connection: u64,
) -> Result<Opened, ConnError> {
    let deadline = Instant::now() + shared.connect_timeout;
    let level = loop {
        match packet::connect_level(&io.read) {
            Ok(Some(level)) => break level,
            Ok(None) => {}
            Err(e) => {
                shared.log_refusal(peer, &format!("not an MQTT client: {e}"));
                return Err(ConnError::Decode(e));
            }
        }
        fill_by(io, deadline, shared.connect_timeout).await?;
    };
    let version = match level {
        4 => Version::V311,
        5 => Version::V5,
        other => {
            // MQTT 3.1 and unknown levels: the 3.1.1 CONNACK that every version reads.
            io.version = Version::V311;
            let why = if other == 3 {
                "MQTT 3.1 (protocol level 3) is not supported: use MQTT 3.1.1 or 5".to_owned()
            } else {
                format!("unknown MQTT protocol level {other}")
            };
            shared.log_refusal(peer, &why);
            Stats::inc(&shared.stats.protocol_errors);
            return refuse(io, reason::UNSUPPORTED_PROTOCOL_VERSION, why).await;
        }
    };
    io.version = version;
    let first = loop {
        match io.parse() {
            Ok(Some(p)) => break p,
            Ok(None) => {}
            Err(e) => {
                shared.log_refusal(peer, &format!("bad CONNECT: {e}"));
                if version.is_v5() {
                    let code = e.code();
                    return refuse(io, code, e.to_string()).await;
                }
                return Err(ConnError::Decode(e));
            }
        }
        fill_by(io, deadline, shared.connect_timeout).await?;
    };
    let Packet::Connect(connect) = first else {
        return Err(ConnError::NotConnect);
    };
    if let Some(max) = connect.maximum_packet_size.filter(|_| version.is_v5()) {
        io.max_out = max as usize;
    }
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
            return refuse(io, reason::NOT_AUTHORIZED, why.to_owned()).await;
        }
    };
    let login = connect.username.clone().map(|user| {
        let password = connect
            .password
            .as_ref()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        (user, password)
    });
    // Boxed: only needed at CONNECT, it should not size every connection's future.
    let admit = Box::pin(shared.gate.admit(certificate, login));
    let admitted = match admit.await {
        Ok(a) => a,
        Err(refusal) => {
            refused(&refusal.to_string());
            let code = match refusal {
                Refusal::BadCredentials => reason::BAD_USER_NAME_OR_PASSWORD,
                Refusal::NotAuthorized(_) => reason::NOT_AUTHORIZED,
                Refusal::Busy => reason::SERVER_BUSY,
            };
            return refuse(io, code, refusal.to_string()).await;
        }
    };
    let client_id = connect.client_id.clone();
    let opened = Session::open(*connect, version, admitted, connection, shared.ctx());
    match opened {
        Ok(opened) => {
            tracing::Span::current().record("client_id", opened.session.client_id.as_str());
            Ok(opened)
        }
        Err(refusal) => {
            Stats::inc(&shared.stats.auth_failures);
            shared.log_refusal(
                peer,
                &format!("client id {:?}: {}", truncate(&client_id), refusal.why),
            );
            refuse(io, refusal.code, refusal.why).await
        }
    }
}

/// Reads more of the CONNECT, if it comes by `deadline`.
async fn fill_by<S: Stream>(
    io: &mut Io<S>,
    deadline: Instant,
    limit: Duration,
) -> Result<(), ConnError> {
    match tokio::time::timeout_at(deadline, io.fill()).await {
        Err(_) => Err(ConnError::ConnectTimeout(limit)),
        Ok(Ok(0)) => Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into())),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.into()),
    }
}

/// Answers CONNECT with a refusal; always an error.
async fn refuse<S: Stream, T>(io: &mut Io<S>, code: u8, why: String) -> Result<T, ConnError> {
    let reason_string = io.version.is_v5().then(|| why.clone());
    io.queue(&Packet::ConnAck(Box::new(ConnAck {
        code,
        reason_string,
        ..ConnAck::default()
    })));
    io.flush().await?;
    Err(ConnError::Refused(why))
}

/// The CONNECT handshake, then the session until it ends, then its end: the will, the
/// session kept or ended.
///
/// The handshake and the end are boxed futures of their own: what they hold must not size
/// the session's future, which waits for the client most of its life.
async fn session<S: Stream>(
    io: &mut Io<S>,
    peer: SocketAddr,
    shared: &Shared,
    certificate: Option<Option<String>>,
) -> Result<(), ConnError> {
    let connection = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    let (mut session, registration) =
        Box::pin(open(io, peer, shared, certificate, connection)).await?;
    let end = match io.flush().await {
        Ok(()) => {
            debug!(
                version = ?session.version,
                keep_alive = session.keep_alive,
                expiry = session.expiry(),
                who = session.identity.name().unwrap_or("anonymous"),
                "client connected"
            );
            run(io, &mut session, &registration, shared).await
        }
        Err(e) => End::Lost(Some(e.into())),
    };
    Box::pin(finish(io, peer, shared, session, registration, end)).await
}

/// The handshake; then the will a clean start made due, the client id's registration, the
/// CONNACK and what a resumed session had in flight, queued.
async fn open<S: Stream>(
    io: &mut Io<S>,
    peer: SocketAddr,
    shared: &Shared,
    certificate: Option<Option<String>>,
    connection: u64,
) -> Result<(Session, Registration), ConnError> {
    let Opened {
        mut session,
        connack,
        old_will,
        proof,
    } = handshake(io, peer, shared, certificate, connection).await?;
    if let Some(will) = old_will {
        let _ = hand_on(&shared.inject, vec![will].into()).await;
    }
    // One connection per client id: a newer one takes over (MQTT requires it).
    let admitted = Admitted {
        identity: session.identity.clone(),
        proof,
    };
    let registration = shared.gate.register(&session.client_id, &admitted);
    io.queue(&Packet::ConnAck(Box::new(connack)));
    let mut out = Output::default();
    session.resend(shared.ctx(), Instant::now().into_std(), &mut out);
    for p in &out.send {
        io.queue(p);
    }
    Ok((session, registration))
}

/// After the session: the registration given back, the will published or delayed, the
/// session kept or ended in the hub, and the way it ended logged.
async fn finish<S: Stream>(
    io: &mut Io<S>,
    peer: SocketAddr,
    shared: &Shared,
    mut session: Session,
    registration: Registration,
    end: End,
) -> Result<(), ConnError> {
    shared.gate.unregister(&session.client_id, &registration);
    let now = Instant::now().into_std();
    let (will, error) = match end {
        End::Closed(close) => {
            if !close.clean {
                shared.log_violation(peer, &session.client_id, close.code, &close.why);
            }
            let error = (!close.clean).then_some(ConnError::Violation {
                code: close.code,
                why: close.why,
            });
            (close.will, error)
        }
        End::Kicked => {
            if session.version.is_v5() {
                io.queue(&Packet::Disconnect(Disconnect::new(
                    reason::SESSION_TAKEN_OVER,
                    "another connection took over this client id",
                )));
                let _ = io.flush().await;
            }
            (
                false,
                Some(ConnError::Refused(
                    "taken over by a newer connection with the same client id".into(),
                )),
            )
        }
        End::Revoked => {
            info!(
                name = session.device(),
                "disconnected: the name was removed from the credentials or given a new secret"
            );
            if session.version.is_v5() {
                io.queue(&Packet::Disconnect(Disconnect::new(
                    reason::NOT_AUTHORIZED,
                    "the client's credentials were revoked",
                )));
                let _ = io.flush().await;
            }
            // No will: whoever holds revoked credentials gets no last word.
            (false, None)
        }
        End::Lost(error) => (true, error),
    };
    if will {
        match session.last_will(shared.ctx(), now) {
            Some((message, delay)) => {
                let delay = delay.min(session.expiry());
                if delay == 0 {
                    let _ = hand_on(&shared.inject, vec![message].into()).await;
                } else {
                    shared.hub.delay_will(
                        &session.client_id,
                        now + Duration::from_secs(delay.into()),
                        message,
                    );
                }
            }
            None if session.reports_as_device => {
                // A device without a will that drops off is still gone: say so on its status
                // topic, as its will would have.
                let topic = format!(
                    "{}/{}/{}",
                    codec::TOPIC_ROOT,
                    session.device(),
                    codec::STATUS_METRIC
                );
                let message = Message {
                    topic: topic.into(),
                    payload: bytes::Bytes::from_static(b"offline"),
                    ..Message::default()
                };
                let _ = hand_on(&shared.inject, vec![message].into()).await;
            }
            None => {}
        }
    }
    session.end(shared.ctx(), now);
    error.map_or(Ok(()), Err)
}

async fn run<S: Stream>(
    io: &mut Io<S>,
    session: &mut Session,
    registration: &Registration,
    shared: &Shared,
) -> End {
    let keep_alive = (session.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(session.keep_alive) * 1500));
    // One timer for the whole session, pushed back only when it fires: re-arming it on every
    // read would cost a timer update per packet.
    let mut last_read = Instant::now();
    let keep_alive_timer = tokio::time::sleep(keep_alive.unwrap_or(Duration::from_secs(3600)));
    tokio::pin!(keep_alive_timer);
    loop {
        let now = Instant::now().into_std();
        let mut out = Output::default();
        let mut close = None;
        let mut handled = 0;
        while handled < BATCH {
            match io.parse() {
                Ok(Some(packet)) => {
                    handled += 1;
                    if let Err(c) = session.handle(packet, shared.ctx(), now, &mut out) {
                        close = Some(c);
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    close = Some(Close::malformed(&e, session.version, &mut out));
                    break;
                }
            }
        }
        let more_buffered = handled >= BATCH;
        if !out.route.is_empty() {
            // Waiting here is the backpressure: this client is not read while ingest is
            // behind. An error means the broker is stopping.
            let messages = std::mem::take(&mut out.route);
            // A QoS 1 or 2 publish is acknowledged once ingest has judged it and the store
            // has committed what that wrote: an acknowledged reading, and the alert it
            // raised, survive a crash of the gateway, and the device does not send it again.
            let (judged, waiting) = if messages.iter().any(|m| m.qos != QoS::AtMostOnce) {
                let (tx, rx) = oneshot::channel();
                (vec![tx], Some(rx))
            } else {
                (Vec::new(), None)
            };
            let peer = matches!(
                session.identity,
                crate::access::Identity::Named {
                    role: crate::access::Role::Peer,
                    ..
                }
            );
            let batch = if peer {
                Batch {
                    messages,
                    judged: Vec::new(),
                    peer_judged: judged,
                }
            } else {
                Batch {
                    messages,
                    judged,
                    peer_judged: Vec::new(),
                }
            };
            if hand_on(&shared.inject, batch).await.is_err() {
                return End::Lost(None);
            }
            // Boxed: it must not size every connection's future. An error means the gateway
            // is stopping before it could judge them: nothing is acknowledged.
            if let Some(waiting) = waiting
                && Box::pin(waiting).await.is_err()
            {
                return End::Lost(None);
            }
        }
        if out.durable > 0 {
            // A QoS 1 or 2 retained publish is acknowledged once it is in the database.
            // Boxed: rare, and it must not size every connection's future.
            Box::pin(shared.hub.retained.durable(out.durable)).await;
        }
        // Acknowledgements of the publishes first: a DISCONNECT that ends the round is last.
        for p in out.acks.iter().chain(&out.send) {
            io.queue(p);
        }
        // Not kept across the waits below: it would size every connection's future.
        drop(out);
        if close.is_none() {
            let mut more = Output::default();
            session.fill(shared.ctx(), now, &mut more);
            for p in &more.send {
                io.queue(p);
            }
        }
        if let Err(e) = io.flush().await {
            return End::Lost(Some(e.into()));
        }
        if let Some(close) = close {
            if !close.clean && session.version.is_v5() {
                // Boxed: its buffer must not size every connection's future.
                Box::pin(io.linger()).await;
            }
            return End::Closed(close);
        }
        if more_buffered {
            continue;
        }
        let mailbox = session.mailbox().cloned();
        let queued = async {
            match &mailbox {
                Some(m) => m.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = io.fill() => match read {
                Ok(0) => return End::Lost(None),
                Ok(_) => last_read = Instant::now(),
                Err(e) => return End::Lost(Some(e.into())),
            },
            () = queued => {}
            revoked = registration.kicked() => {
                return if revoked { End::Revoked } else { End::Kicked };
            }
            () = &mut keep_alive_timer, if keep_alive.is_some() => {
                let due = last_read + keep_alive.expect("guarded");
                if Instant::now() >= due {
                    if session.version.is_v5() {
                        io.queue(&Packet::Disconnect(Disconnect::new(
                            reason::KEEP_ALIVE_TIMEOUT,
                            "nothing heard within 1.5 times the keep-alive",
                        )));
                        let _ = io.flush().await;
                    }
                    return End::Lost(Some(ConnError::Refused("keep-alive expired".into())));
                }
                keep_alive_timer.as_mut().reset(due);
            }
        }
    }
}

/// Hands every client's publishes, in batches, to the hub (which delivers them to whoever
/// subscribed, when anyone may be listening) and to ingest (which judges them), until every
/// sender is gone. Waiting for ingest is the backpressure that slows publishers down when
/// ingest is behind; nothing is dropped between a connection and ingest.
pub(crate) async fn inject(
    mut rx: mpsc::Receiver<Batch>,
    ingest: mpsc::Sender<Batch>,
    hub: Arc<Hub>,
) {
    let mut batches = Vec::with_capacity(16);
    loop {
        let n = rx.recv_many(&mut batches, 16).await;
        if n == 0 {
            return;
        }
        let mut arrived = batches.drain(..);
        let mut all = arrived.next().expect("n > 0");
        for more in arrived {
            all.messages.extend(more.messages);
            all.judged.extend(more.judged);
            all.peer_judged.extend(more.peer_judged);
        }
        if hub.listening() {
            let shared: Vec<Arc<Message>> =
                all.messages.iter().map(|m| Arc::new(m.clone())).collect();
            hub.route(&shared, std::time::Instant::now());
        }
        if ingest.send(all).await.is_err() {
            // Ingest has stopped: the gateway is shutting down.
            return;
        }
    }
}

/// The socket with its read and write buffers.
struct Io<S> {
    stats: Arc<Stats>,
    stream: S,
    read: BytesMut,
    /// How much to read at once: small for a quiet device, growing for a busy client.
    read_chunk: usize,
    write: BytesMut,
    /// The version chosen at CONNECT.
    version: Version,
    max: usize,
    /// The client's Maximum Packet Size (MQTT 5), once its CONNECT says it.
    max_out: usize,
}

impl<S: Stream> Io<S> {
    fn new(stream: S, shared: &Shared) -> Io<S> {
        Io {
            stats: shared.stats.clone(),
            stream,
            read: BytesMut::new(),
            read_chunk: READ_MIN,
            write: BytesMut::new(),
            version: Version::V311,
            max: shared.limits.max_packet,
            max_out: usize::MAX,
        }
    }

    /// The next complete packet in the read buffer, if there is one.
    fn parse(&mut self) -> Result<Option<Packet>, DecodeError> {
        packet::decode(&mut self.read, self.version, self.max)
    }

    /// Reads more bytes; `Ok(0)` means the client closed the socket. Cancel-safe.
    ///
    /// Ten thousand quiet devices must not cost ten thousand buffers. With nothing buffered,
    /// a connection waits without a buffer of its own: the read goes into scratch space on
    /// the stack of the poll that finds data, and only what arrived is kept. Behind a partial
    /// packet, a busy client should not pay a system call per packet: the buffer grows from
    /// [`READ_MIN`], doubling up to [`READ_MAX`] whenever a read fills it.
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

    /// Encodes `packet` into the write buffer, without its reason string and user properties
    /// if they would make it larger than the client takes.
    fn queue(&mut self, packet: &Packet) {
        match packet::fitted(packet, self.version, self.max_out) {
            Some(smaller) => packet::encode(&smaller, self.version, &mut self.write),
            None => packet::encode(packet, self.version, &mut self.write),
        }
    }

    /// After a DISCONNECT of the server's: closes the sending side and reads and discards what
    /// the client still sends, for a moment, so that the client reads the DISCONNECT and its
    /// reason code instead of a reset connection (closing a socket with unread data resets it).
    async fn linger(&mut self) {
        let _ = self.stream.shutdown().await;
        let _ = timeout(LINGER, async {
            let mut sink = [0u8; 4096];
            while matches!(self.stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }

    /// Writes the write buffer out; a client that takes nothing for [`WRITE_STALL`] is gone.
    ///
    /// Usually the socket takes it all at once: that is tried first, without a timer. Only a
    /// client that is slow to read gets the timed wait, boxed, so that its timer does not
    /// size every connection's future.
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.write.is_empty() {
            return Ok(());
        }
        let Io { stream, write, .. } = self;
        let mut written = 0;
        let done = std::future::poll_fn(|cx| {
            use std::task::Poll;
            while written < write.len() {
                match std::pin::Pin::new(&mut *stream).poll_write(cx, &write[written..]) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(n)) => written += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Ready(Ok(false)),
                }
            }
            match std::pin::Pin::new(&mut *stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(true)),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Ready(Ok(false)),
            }
        })
        .await?;
        if !done {
            let rest = &write[written..];
            Box::pin(timeout(WRITE_STALL, async {
                stream.write_all(rest).await?;
                stream.flush().await
            }))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading")
            })??;
        }
        // An idle connection keeps no write buffer either.
        self.write = BytesMut::new();
        Ok(())
    }
}

/// Hands `messages` to the injector: at once if it has room, else waiting (boxed, as it is
/// rare: only while ingest is behind). An error means the broker is stopping.
async fn hand_on(injector: &mpsc::Sender<Batch>, batch: Batch) -> Result<(), ()> {
    match injector.try_send(batch) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Full(batch)) => {
            Box::pin(injector.send(batch)).await.map_err(|_| ())
        }
        Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::hub::HubLimits;

    /// What every connection of a test shares, with `max_packet` as the broker's limit.
    fn shared(dir: &std::path::Path, inject: mpsc::Sender<Batch>) -> Arc<Shared> {
        let stats = Arc::new(Stats::default());
        let gate = Gate::new(true, &dir.join("c.toml"), Vec::new(), 0).unwrap();
        Arc::new(Shared {
            hub: Arc::new(Hub::new(HubLimits::default(), stats.clone())),
            inject,
            gate: Arc::new(gate),
            connect_timeout: Duration::from_secs(5),
            limits: SessionLimits::default(),
            max_connections: 10,
            stats,
            refusal_logged_at: Mutex::default(),
            violation_logged_at: Mutex::default(),
            next_connection: AtomicU64::default(),
        })
    }

    /// A connection's memory is mostly its future: ten thousand idle devices each hold one.
    /// Whatever only some connections need (the CONNECT handshake, the TLS session, a
    /// lingering close) is boxed, so that it does not size everyone's.
    #[tokio::test]
    async fn a_plain_connection_s_future_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let (inject, _rx) = mpsc::channel(1);
        let shared = shared(dir.path(), inject);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = TcpStream::connect(addr).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let stats = shared.stats.clone();
        let future = serve(stream, peer, shared, Slot::take(&stats));
        let size = std::mem::size_of_val(&future);
        println!("a plain connection's future: {size} bytes");
        assert!(size < 1280, "{size} bytes");
    }

    /// Found by the `session` fuzz target: the reason strings of a SUBACK and of a DISCONNECT
    /// made them larger than the Maximum Packet Size the client had set, which MQTT 5 forbids
    /// (the client closes the connection). They go without their reason strings now.
    #[tokio::test]
    async fn packets_fit_the_client_s_maximum_packet_size() {
        use super::packet::{Connect, Publish, Subscribe, SubscriptionOptions};
        const MAX: usize = 24;
        let dir = tempfile::tempdir().unwrap();
        let (inject, _rx) = mpsc::channel(1);
        let shared = shared(dir.path(), inject);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let stats = shared.stats.clone();
        let server = tokio::spawn(serve(stream, peer, shared, Slot::take(&stats)));

        let mut bytes = BytesMut::new();
        let packets = [
            Packet::Connect(Box::new(Connect {
                clean_start: true,
                client_id: "small".into(),
                receive_maximum: u16::MAX,
                maximum_packet_size: Some(MAX as u32),
                request_problem_information: true,
                ..Connect::default()
            })),
            // Refused, with a reason string of about 100 bytes.
            Packet::Subscribe(Subscribe {
                pkid: 1,
                filters: vec![("a/#/b".into(), SubscriptionOptions::default())],
                ..Subscribe::default()
            }),
            // Closes the connection, with a reason string of about 40 bytes.
            Packet::Publish(Publish {
                topic: "a/+".into(),
                ..Publish::default()
            }),
        ];
        for p in &packets {
            packet::encode(p, Version::V5, &mut bytes);
        }
        client.write_all(&bytes).await.unwrap();
        let mut got = Vec::new();
        timeout(Duration::from_secs(10), client.read_to_end(&mut got))
            .await
            .expect("the connection is closed")
            .unwrap();
        let mut got = BytesMut::from(&got[..]);
        let mut sizes = Vec::new();
        let mut answers = Vec::new();
        while !got.is_empty() {
            let before = got.len();
            let p = packet::decode(&mut got, Version::V5, MAX)
                .expect("no packet larger than the client takes")
                .expect("whole packets");
            sizes.push(before - got.len());
            answers.push(p);
        }
        match &answers[..] {
            [Packet::ConnAck(_), Packet::SubAck(s), Packet::Disconnect(d)] => {
                assert_eq!(s.codes, [reason::TOPIC_FILTER_INVALID]);
                assert_eq!(s.reason_string, None);
                assert_eq!(d.code, reason::TOPIC_NAME_INVALID);
                assert_eq!(d.reason_string, None);
            }
            other => panic!("{other:?}"),
        }
        assert!(sizes.iter().all(|n| *n <= MAX), "{sizes:?}");
        drop(client);
        server.await.unwrap();
    }
}

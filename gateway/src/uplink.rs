//! The uplink: the one client of the upstream broker. Sends the outbox with QoS 1, in order,
//! and removes a row only when the upstream's PUBACK for it arrives.
//!
//! The outbox lives in SQLite ([`crate::store`]); the uplink reads it a page at a time while
//! connected, so memory stays bounded however long the upstream was away. rumqttc's
//! `publish` returning `Ok` only means queued, and its eventloop forgets its queue when the
//! broker answers `session_present = false`; so the uplink keeps its own account of what is
//! on the wire ([`Pending`]) and, after every (re)connect, sends the unacknowledged rows again
//! in order. Duplicates that this may cause upstream carry the same alert id.
//!
//! "Connected" means acknowledgements arrive: rumqttc pings every keep-alive and fails when a
//! ping goes unanswered until the next one, so a hung upstream (socket open, no answers) is
//! noticed within two keep-alives; and if publishes go unacknowledged for two keep-alives
//! while pings are answered, the uplink drops the connection and starts over.
//!
//! `poll()` has no backoff of its own: failed connects are retried after a capped exponential
//! delay with jitter ([`backoff`]). The gateway serves locally whether or not the upstream is
//! reachable.
//!
//! With `mqtts://` the uplink trusts either the CA in `ca_file` alone or the system's roots,
//! and may present a client certificate (`client_cert`, `client_key`); a login goes in the
//! CONNECT packet. Files are read once, in [`Uplink::prepare`], so a bad path stops the start
//! with a message naming the file. A failed connect is logged as what is wrong and what to
//! check ([`describe`]), never with the options or packets themselves: `MqttOptions`' and
//! `Login`'s `Debug` print the password.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use tokio::time::Instant;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, AlertDescription, CertificateError, ClientConfig, RootCertStore};
use tracing::{debug, info, warn};

use crate::config::UplinkConfig;
use crate::shutdown::Signal;
use crate::stats::Stats;
use crate::store::{OutboxEntry, OutboxItem, Store};

/// Most messages sent and not yet acknowledged at once.
pub const WINDOW: usize = 64;
/// Outbox rows read per page.
pub const PAGE: usize = 256;
/// First retry delay after a failed connection.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long shutdown waits for acknowledgements of messages already sent.
pub const FLUSH_GRACE: Duration = Duration::from_millis(1000);

/// Errors of the uplink layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UplinkError {
    /// TLS was asked for but no usable root certificate was found.
    #[error(
        "mqtts:// needs the system's root certificates, but none could be loaded{0}; install the ca-certificates package"
    )]
    NoRootCertificates(String),
    /// A PEM file named in `[uplink]` cannot be read or holds nothing usable.
    #[error("[uplink] `{field}` {}: {problem}", path.display())]
    File {
        /// The configuration field that names the file.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it and what to do.
        problem: String,
    },
    /// The client certificate and key were read but rustls will not use them together.
    #[error(
        "[uplink] `client_cert` {} with `client_key` {} cannot be used: {source}; check that the key is the one the certificate was issued for",
        cert.display(),
        key.display()
    )]
    ClientAuth {
        /// The certificate chain file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why rustls refused them.
        source: rustls::Error,
    },
    /// rustls refused the configuration.
    #[error("cannot set up TLS for the uplink: {0}")]
    Tls(#[from] rustls::Error),
}

/// A configured, not yet running uplink.
///
/// Deliberately not `Debug`: the options hold the upstream password.
pub struct Uplink {
    options: MqttOptions,
    topic_prefix: String,
    target: String,
    keep_alive: Duration,
    setup: Setup,
}

/// What the uplink trusts and presents, so that a failed connect can say what to check.
/// Holds no secret.
#[derive(Debug, Clone, Default)]
struct Setup {
    host: String,
    ca_file: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    username: Option<String>,
}

type Poll = Pin<Box<dyn Future<Output = (EventLoop, Result<Event, ConnectionError>)> + Send>>;
type Page = Pin<Box<dyn Future<Output = Vec<OutboxItem>> + Send>>;

impl Uplink {
    /// Checks the configuration without connecting: reads the CA, the client certificate and
    /// its key (or the system's roots) and builds the TLS setup.
    pub fn prepare(config: &UplinkConfig) -> Result<Uplink, UplinkError> {
        let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
        options.set_keep_alive(config.keep_alive);
        // The uplink replays its own account; the broker must not hold a session for it.
        options.set_clean_session(true);
        options.set_inflight(WINDOW as u16);
        if config.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls_config(config)?),
            )));
        }
        if let Some((username, password)) = &config.login {
            options.set_credentials(username, password.expose());
        }
        let scheme = if config.tls { "mqtts" } else { "mqtt" };
        Ok(Uplink {
            options,
            topic_prefix: config.topic_prefix.clone(),
            target: format!("{scheme}://{}:{}", config.host, config.port),
            keep_alive: config.keep_alive,
            setup: Setup {
                host: config.host.clone(),
                ca_file: config.ca_file.clone().filter(|_| config.tls),
                client_cert: config
                    .client_cert
                    .as_ref()
                    .filter(|_| config.tls)
                    .map(|(cert, _)| cert.clone()),
                username: config.login.as_ref().map(|(user, _)| user.clone()),
            },
        })
    }

    /// Runs until `shutdown`, sending what `store` commits to the outbox.
    pub async fn run(self, store: Store, stats: Arc<Stats>, shutdown: Signal) {
        let Uplink {
            options,
            topic_prefix,
            target,
            keep_alive,
            setup,
        } = self;
        let (mut client, eventloop) = new_client(&options);
        let mut committed = store.committed();
        let mut committed_open = true;
        let mut pending = Pending::default();
        let mut connected = false;
        let mut failures: u32 = 0;
        let mut page: Option<Page> = None;
        // The eventloop lives inside this future and is only dropped whole: a poll that is
        // cancelled halfway could lose a request or leave a half-written packet.
        let mut poll: Poll = Box::pin(poll_after(eventloop, Duration::ZERO));
        let stall_limit = keep_alive * 2;
        let shutdown_wait = shutdown.clone().wait();
        tokio::pin!(shutdown_wait);
        loop {
            if connected && page.is_none() && pending.wants_more(*committed.borrow()) {
                let (store, after) = (store.clone(), pending.loaded_upto);
                page = Some(Box::pin(
                    async move { store.outbox_page(after, PAGE).await },
                ));
            }
            let stalled_at = pending.waiting_since.map(|t| t + stall_limit);
            tokio::select! {
                _ = &mut shutdown_wait => break,
                (eventloop, event) = &mut poll => {
                    let mut delay = Duration::ZERO;
                    match event {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            // CONNECT (fixed and variable header, client id) and CONNACK.
                            Stats::add(&stats.upstream_bytes, (14 + options.client_id().len() + 4) as u64);
                            connected = true;
                            stats.uplink_connected.store(true, Ordering::Relaxed);
                            let queued = Stats::get(&stats.outbox_depth);
                            info!(upstream = %target, queued, "uplink connected");
                            failures = 0;
                            pending.restart();
                        }
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Stats::add(&stats.upstream_bytes, pending.sent(pkid, topic_prefix.len())),
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            if let Some(seq) = pending.acked(ack.pkid) {
                                Stats::inc(&stats.uplink_acked);
                                store.outbox_done(seq);
                            }
                        }
                        Ok(Event::Outgoing(Outgoing::PingReq) | Event::Incoming(Packet::PingResp)) => Stats::add(&stats.upstream_bytes, 2),
                        Ok(_) => {}
                        Err(e) => {
                            let was_connected = std::mem::replace(&mut connected, false);
                            stats.uplink_connected.store(false, Ordering::Relaxed);
                            failures = failures.saturating_add(1);
                            delay = backoff(failures, fastrand::f64());
                            let state = match (failures, was_connected) {
                                (1, true) => "lost",
                                (1, false) => "cannot connect",
                                _ => "still down",
                            };
                            warn!(upstream = %target, queued = Stats::get(&stats.outbox_depth), "uplink {state}: {}; retrying in {:.1}s", describe(&e, &setup), delay.as_secs_f64());
                            pending.restart();
                        }
                    }
                    poll = Box::pin(poll_after(eventloop, delay));
                }
                changed = committed.changed(), if committed_open => {
                    // New rows: the check at the top of the loop pages them in. An error means
                    // the store is gone (shutdown).
                    committed_open = changed.is_ok();
                }
                items = async { page.as_mut().expect("guarded").await }, if page.is_some() => {
                    page = None;
                    pending.load(items);
                }
                _ = tokio::time::sleep_until(stalled_at.unwrap_or_else(Instant::now)), if connected && stalled_at.is_some() => {
                    // Pings may be answered while publishes are not: start over on a new
                    // connection instead of waiting forever.
                    connected = false;
                    stats.uplink_connected.store(false, Ordering::Relaxed);
                    failures = failures.saturating_add(1);
                    let delay = backoff(failures, fastrand::f64());
                    warn!(upstream = %target, in_flight = pending.in_flight(), "uplink stalled: nothing acknowledged for two keep-alives ({stall_limit:?}); reconnecting in {:.1}s", delay.as_secs_f64());
                    let (new_client, eventloop) = new_client(&options);
                    client = new_client;
                    poll = Box::pin(poll_after(eventloop, delay));
                    pending.restart();
                }
            }
            if connected {
                pending.send_window(&client, &topic_prefix);
            }
        }

        // Shutdown: give messages already sent a moment to be acknowledged, then say goodbye.
        if connected && pending.in_flight() > 0 {
            let _ = tokio::time::timeout(FLUSH_GRACE, async {
                while pending.in_flight() > 0 {
                    let (eventloop, event) = (&mut poll).await;
                    match event {
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Stats::add(
                            &stats.upstream_bytes,
                            pending.sent(pkid, topic_prefix.len()),
                        ),
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            if let Some(seq) = pending.acked(ack.pkid) {
                                Stats::inc(&stats.uplink_acked);
                                store.outbox_done(seq);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                    poll = Box::pin(poll_after(eventloop, Duration::ZERO));
                }
            })
            .await;
        }
        if connected && client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                loop {
                    let (eventloop, event) = (&mut poll).await;
                    if matches!(event, Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)) {
                        break;
                    }
                    poll = Box::pin(poll_after(eventloop, Duration::ZERO));
                }
            })
            .await;
        }
        let left = Stats::get(&stats.outbox_depth);
        if left > 0 {
            info!(upstream = %target, queued = left, "uplink stopped; the outbox keeps what is not acknowledged for the next start");
        }
    }
}

/// A client and its event loop. Alerts are small and go one at a time: without TCP_NODELAY
/// one could wait for the acknowledgement of the previous packet (Nagle's algorithm) and
/// reach the upstream tens of milliseconds late.
fn new_client(options: &MqttOptions) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = AsyncClient::new(options.clone(), WINDOW * 2);
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

async fn poll_after(
    mut eventloop: EventLoop,
    delay: Duration,
) -> (EventLoop, Result<Event, ConnectionError>) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let event = eventloop.poll().await;
    (eventloop, event)
}

/// One line for the operator: what went wrong connecting, and what to check. Never prints a
/// packet (a CONNECT carries the password).
fn describe(e: &ConnectionError, setup: &Setup) -> String {
    if let Some(tls) = rustls_error(e) {
        return describe_tls(tls, setup);
    }
    match e {
        ConnectionError::Tls(rumqttc::TlsError::DNSName(_)) => format!(
            "TLS: {:?} is neither a host name nor an address a certificate can be checked against",
            setup.host
        ),
        ConnectionError::Tls(rumqttc::TlsError::Io(io)) => {
            format!("TLS handshake failed: {io}")
        }
        ConnectionError::Tls(other) => format!("TLS: {other}"),
        ConnectionError::Io(io) => format!("network error: {io}"),
        ConnectionError::ConnectionRefused(code) => describe_refusal(*code, setup),
        ConnectionError::NotConnAck(_) => {
            "the upstream answered the connect with something other than CONNACK; is it an MQTT 3.1.1 broker?".into()
        }
        ConnectionError::NetworkTimeout => "connect timed out".into(),
        ConnectionError::MqttState(rumqttc::StateError::AwaitPingResp) => {
            "the broker stopped answering (no reply to the last keep-alive ping)".into()
        }
        ConnectionError::MqttState(s) => format!("protocol: {s}"),
        other => other.to_string(),
    }
}

/// The rustls error inside `e`, if any. rumqttc hands them over in several wrappings: its own
/// TLS error, or an I/O error from tokio-rustls (during the handshake, or on the first read
/// when a TLS 1.3 server rejects the client certificate after the handshake).
fn rustls_error(e: &ConnectionError) -> Option<&rustls::Error> {
    let mut current: &(dyn std::error::Error + 'static) = e;
    loop {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // `io::Error::source` skips the error it wraps; `get_ref` is that error.
        current = match current.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref()?,
            None => current.source()?,
        };
    }
}

fn describe_tls(e: &rustls::Error, setup: &Setup) -> String {
    let trusted = match &setup.ca_file {
        Some(ca) => format!(
            "ca_file {}; check that it holds the CA that issued the broker's certificate",
            ca.display()
        ),
        None => "the system's root certificates; if the broker's certificate comes from a private CA, set ca_file to that CA".into(),
    };
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "TLS: the upstream's certificate is not signed by a trusted CA (trusting {trusted})"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "TLS: the upstream's certificate is not issued for {:?} ({e}); use a url with a name the certificate lists",
                    setup.host
                )
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!(
                    "TLS: the upstream's certificate has expired, or this machine's clock is wrong ({e})"
                )
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!(
                    "TLS: the upstream's certificate is not valid yet; check this machine's clock ({e})"
                )
            }
            _ => format!("TLS: the upstream's certificate was rejected: {e}"),
        },
        rustls::Error::AlertReceived(alert) => match (alert, &setup.client_cert) {
            (AlertDescription::CertificateRequired, None) => {
                "TLS: the upstream requires a client certificate; set client_cert and client_key"
                    .into()
            }
            (
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied
                | AlertDescription::DecryptError,
                Some(cert),
            ) => format!(
                "TLS: the upstream rejected the client certificate in {} (alert {alert:?}); check that the broker trusts the CA that issued it and that it is still valid",
                cert.display()
            ),
            (AlertDescription::HandshakeFailure, None) => format!(
                "TLS: the upstream ended the handshake (alert {alert:?}); it may require a client certificate (client_cert, client_key)"
            ),
            (AlertDescription::ProtocolVersion | AlertDescription::InsufficientSecurity, _) => {
                format!(
                    "TLS: the upstream and the gateway share no TLS version or cipher suite (alert {alert:?}); the gateway speaks TLS 1.2 and 1.3"
                )
            }
            _ => format!("TLS: the upstream ended the handshake (alert {alert:?})"),
        },
        other => format!("TLS: {other}"),
    }
}

fn describe_refusal(code: rumqttc::ConnectReturnCode, setup: &Setup) -> String {
    use rumqttc::ConnectReturnCode as Code;
    match (code, &setup.username, &setup.client_cert) {
        (Code::BadUserNamePassword, Some(user), _) => format!(
            "the broker refused the username or password (user {user:?}); check username and password in [uplink]"
        ),
        // Mosquitto answers a wrong password this way too.
        (Code::NotAuthorized, Some(user), _) => format!(
            "the broker refused the login as user {user:?} (not authorized); check username and password in [uplink] and that the broker lets this user connect"
        ),
        (Code::BadUserNamePassword | Code::NotAuthorized, None, Some(cert)) => format!(
            "the broker refused the identity of the client certificate in {} (not authorized); check that the broker lets it connect",
            cert.display()
        ),
        (Code::BadUserNamePassword | Code::NotAuthorized, None, None) => {
            "the broker refused a connection without a login (not authorized); set username and password, or client_cert and client_key, in [uplink]".into()
        }
        (Code::BadClientId, ..) => {
            "the broker refused the client id; set another client_id in [uplink]".into()
        }
        (Code::ServiceUnavailable, ..) => {
            "the broker refused the connection: service unavailable".into()
        }
        (Code::RefusedProtocolVersion, ..) => {
            "the broker refused the connection: it does not speak MQTT 3.1.1".into()
        }
        (Code::Success, ..) => {
            "the broker answered CONNACK with success but the connect failed".into()
        }
    }
}

/// The TLS setup of an `mqtts://` uplink: the roots it trusts and the certificate it shows.
fn tls_config(config: &UplinkConfig) -> Result<ClientConfig, UplinkError> {
    // The operator's own files first: their errors are the ones to fix.
    let client_auth = match &config.client_cert {
        Some((cert, key)) => Some((
            cert,
            key,
            read_certificates("client_cert", cert)?,
            read_key(key)?,
        )),
        None => None,
    };
    let roots = match &config.ca_file {
        Some(path) => ca_roots(path)?,
        None => system_roots()?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    match client_auth {
        Some((cert, key, chain, private)) => {
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|source| UplinkError::ClientAuth {
                    cert: cert.clone(),
                    key: key.clone(),
                    source,
                })
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// Only the CA certificates in `path`.
fn ca_roots(path: &Path) -> Result<RootCertStore, UplinkError> {
    let certs = read_certificates("ca_file", path)?;
    let found = certs.len();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(UplinkError::File {
            field: "ca_file",
            path: path.to_owned(),
            problem: format!(
                "none of its {found} certificate(s) is a usable CA certificate; give the PEM file of the CA that issued the broker's certificate"
            ),
        });
    }
    Ok(roots)
}

/// The PEM certificates in `path`; at least one.
fn read_certificates(
    field: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, UplinkError> {
    crate::pem::certificates(path).map_err(|problem| UplinkError::File {
        field,
        path: path.to_owned(),
        problem,
    })
}

/// The first private key in `path`.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, UplinkError> {
    crate::pem::private_key(path).map_err(|problem| UplinkError::File {
        field: "client_key",
        path: path.to_owned(),
        problem,
    })
}

/// The operating system's root certificates.
fn system_roots() -> Result<RootCertStore, UplinkError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _unparsable) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(UplinkError::NoRootCertificates(why));
    }
    Ok(roots)
}

/// Bytes of one QoS 1 PUBLISH (topic and payload of the given lengths) and its PUBACK, in
/// MQTT 3.1.1.
pub fn qos1_bytes(topic_len: usize, payload_len: usize) -> u64 {
    let remaining = 2 + topic_len + 2 + payload_len;
    let length_bytes = match remaining {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    };
    (1 + length_bytes + remaining + 4) as u64
}

/// Delay before retry number `attempt` (1-based): doubling from [`BACKOFF_MIN`] up to
/// [`BACKOFF_MAX`], with "equal jitter": half fixed, half random (`jitter` in `[0, 1)`), so
/// that many gateways that lost the same broker do not come back in lockstep.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let exp = BACKOFF_MIN
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    exp / 2 + exp.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
}

/// Outbox rows read and not yet acknowledged, and which of them are on the wire under which
/// packet id.
#[derive(Debug, Default)]
struct Pending {
    /// Outbox position → row, for rows read and not acknowledged.
    queue: BTreeMap<u64, OutboxEntry>,
    /// Highest outbox position read so far.
    loaded_upto: u64,
    /// First position not yet handed to the client in this connection.
    next_send: u64,
    /// Handed to the client, waiting for the eventloop to assign a packet id (in order).
    handed: VecDeque<u64>,
    /// On the wire: packet id → outbox position.
    inflight: HashMap<u16, u64>,
    /// Since when something has been waiting for an acknowledgement without any arriving.
    waiting_since: Option<Instant>,
}

impl Pending {
    /// True if committed rows are left to read and there is room for them.
    fn wants_more(&self, committed: u64) -> bool {
        committed > self.loaded_upto && self.queue.len() < PAGE
    }

    fn load(&mut self, items: Vec<OutboxItem>) {
        for item in items {
            if item.seq > self.loaded_upto {
                self.loaded_upto = item.seq;
                self.queue.insert(item.seq, item.entry);
            }
        }
    }

    fn in_flight(&self) -> usize {
        self.handed.len() + self.inflight.len()
    }

    /// A new connection: nothing is on the wire any more; start again from the oldest.
    fn restart(&mut self) {
        self.handed.clear();
        self.inflight.clear();
        self.next_send = 0;
        self.waiting_since = None;
    }

    /// Hands queued rows to the client while the window has room.
    fn send_window(&mut self, client: &AsyncClient, prefix: &str) {
        while self.in_flight() < WINDOW {
            let Some((&seq, entry)) = self.queue.range(self.next_send..).next() else {
                break;
            };
            let topic = format!("{prefix}/{}", entry.topic);
            match client.try_publish(
                topic,
                QoS::AtLeastOnce,
                entry.retain,
                entry.payload.to_vec(),
            ) {
                Ok(()) => {
                    self.handed.push_back(seq);
                    self.next_send = seq + 1;
                    self.waiting_since.get_or_insert_with(Instant::now);
                }
                Err(e) => {
                    debug!(error = %e, "uplink request queue full; will retry");
                    break;
                }
            }
        }
    }

    /// The eventloop put the next handed row on the wire as `pkid`; returns the MQTT bytes
    /// of that PUBLISH and its PUBACK to come.
    fn sent(&mut self, pkid: u16, prefix_len: usize) -> u64 {
        let Some(seq) = self.handed.pop_front() else {
            return 0;
        };
        self.inflight.insert(pkid, seq);
        self.queue.get(&seq).map_or(0, |e| {
            qos1_bytes(prefix_len + 1 + e.topic.len(), e.payload.len())
        })
    }

    /// `pkid` was acknowledged: returns the outbox position that is now delivered.
    fn acked(&mut self, pkid: u16) -> Option<u64> {
        let seq = self.inflight.remove(&pkid)?;
        self.queue.remove(&seq);
        self.waiting_since = (self.in_flight() > 0).then(Instant::now);
        Some(seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn item(seq: u64) -> OutboxItem {
        OutboxItem {
            seq,
            entry: OutboxEntry {
                id: format!("a{seq}"),
                topic: format!("alerts/critical/d/r{seq}"),
                payload: Bytes::from_static(b"{}"),
                retain: true,
            },
        }
    }

    /// An uplink configuration for `mqtts://127.0.0.1:8883` with the given files.
    fn tls_uplink(ca_file: Option<&Path>, client_cert: Option<(&Path, &Path)>) -> UplinkConfig {
        UplinkConfig {
            host: "127.0.0.1".into(),
            port: 8883,
            tls: true,
            client_id: "watchpost-t".into(),
            topic_prefix: "site".into(),
            forward: Vec::new(),
            keep_alive: Duration::from_secs(30),
            summaries: None,
            ca_file: ca_file.map(Path::to_owned),
            client_cert: client_cert.map(|(c, k)| (c.to_owned(), k.to_owned())),
            login: None,
        }
    }

    fn prepare_error(config: &UplinkConfig) -> String {
        match Uplink::prepare(config) {
            Ok(_) => panic!("prepare accepted {config:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// A PEM private key block with a recognisable body that is not a key.
    const FAKE_KEY: &str =
        "-----BEGIN PRIVATE KEY-----\nU0VDUkVUS0VZQk9EWQ==\n-----END PRIVATE KEY-----\n";

    #[test]
    fn a_pem_file_that_cannot_be_used_is_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let key_only = dir.path().join("key-only.pem");
        std::fs::write(&key_only, FAKE_KEY).unwrap();
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "this is not PEM\n").unwrap();
        let truncated = dir.path().join("truncated.pem");
        std::fs::write(&truncated, "-----BEGIN CERTIFICATE-----\nMIIB\n").unwrap();
        let not_a_ca = dir.path().join("not-a-ca.pem");
        std::fs::write(
            &not_a_ca,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let cases: [(UplinkConfig, &str, &Path, &str); 7] = [
            (
                tls_uplink(Some(&missing), None),
                "`ca_file`",
                &missing,
                "cannot be read",
            ),
            (
                tls_uplink(Some(&key_only), None),
                "`ca_file`",
                &key_only,
                "holds no certificate",
            ),
            (
                tls_uplink(Some(&text), None),
                "`ca_file`",
                &text,
                "holds no certificate",
            ),
            (
                tls_uplink(Some(&truncated), None),
                "`ca_file`",
                &truncated,
                "is not valid PEM",
            ),
            (
                tls_uplink(Some(&not_a_ca), None),
                "`ca_file`",
                &not_a_ca,
                "usable CA certificate",
            ),
            (
                tls_uplink(None, Some((&missing, &key_only))),
                "`client_cert`",
                &missing,
                "cannot be read",
            ),
            (
                tls_uplink(None, Some((&key_only, &key_only))),
                "`client_cert`",
                &key_only,
                "holds no certificate",
            ),
        ];
        for (config, field, path, problem) in cases {
            let message = prepare_error(&config);
            assert!(message.contains(field), "{message}");
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains(problem), "{problem:?} not in {message}");
        }
    }

    #[test]
    fn a_client_key_file_that_cannot_be_used_is_named_and_never_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.key");
        let cert_only = dir.path().join("cert-only.pem");
        std::fs::write(
            &cert_only,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let broken = dir.path().join("broken.key");
        std::fs::write(
            &broken,
            "-----BEGIN PRIVATE KEY-----\nU0VDUkVUS0VZQk9EWQ==\n",
        )
        .unwrap();
        for (path, problem) in [
            (&missing, "cannot be read"),
            (&cert_only, "holds no private key"),
            (&broken, "is not valid PEM"),
        ] {
            let message = match read_key(path) {
                Ok(_) => panic!("{} was read as a key", path.display()),
                Err(e) => e.to_string(),
            };
            assert!(message.contains("`client_key`"), "{message}");
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(message.contains(problem), "{problem:?} not in {message}");
            assert!(
                !message.contains("U0VDUkVU"),
                "the key is quoted: {message}"
            );
        }
    }

    #[test]
    fn a_login_goes_into_the_connect_options_and_a_plain_uplink_reads_no_file() {
        let source = "[gateway]\nid = \"site-1\"\n[uplink]\nurl = \"mqtt://127.0.0.1:8883\"\nusername = \"site-1\"\npassword = \"hunter2-secret\"\n";
        let mut config = crate::config::parse(source, "t.toml")
            .expect("a plain uplink with a login is allowed, with a warning")
            .config
            .uplink
            .expect("[uplink]");
        // A ca_file on a plain uplink is refused by the config check; here it is just unused.
        config.ca_file = Some("/nonexistent/ca.pem".into());
        let uplink = Uplink::prepare(&config).expect("mqtt:// reads no file");
        let login = uplink.options.credentials().expect("the login is set");
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("site-1", "hunter2-secret")
        );
        assert_eq!(uplink.target, "mqtt://127.0.0.1:8883");
        assert!(uplink.setup.ca_file.is_none());
        assert!(!format!("{:?}", uplink.setup).contains("hunter2"));
    }

    fn setup() -> Setup {
        Setup {
            host: "broker.example.net".into(),
            ca_file: Some("/etc/watchpost/upstream-ca.pem".into()),
            client_cert: None,
            username: Some("site-17".into()),
        }
    }

    fn io_wrapped(e: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn connect_failures_say_what_is_wrong_and_what_to_check() {
        use rumqttc::{ConnectReturnCode, TlsError};
        let with_cert = Setup {
            client_cert: Some("/etc/watchpost/gw.crt".into()),
            ..setup()
        };
        let anonymous = Setup {
            username: None,
            ..setup()
        };
        let unknown_issuer = || rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let cases: Vec<(ConnectionError, Setup, &[&str])> = vec![
            (
                ConnectionError::Tls(TlsError::Io(io_wrapped(unknown_issuer()))),
                setup(),
                &[
                    "not signed by a trusted CA",
                    "ca_file /etc/watchpost/upstream-ca.pem",
                ],
            ),
            (
                ConnectionError::Tls(TlsError::TLS(unknown_issuer())),
                Setup {
                    ca_file: None,
                    ..setup()
                },
                &[
                    "not signed by a trusted CA",
                    "system's root certificates",
                    "set ca_file",
                ],
            ),
            (
                ConnectionError::Tls(TlsError::Io(io_wrapped(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName,
                )))),
                setup(),
                &["not issued for \"broker.example.net\""],
            ),
            (
                // TLS 1.3: the server rejects the client certificate after the handshake.
                ConnectionError::MqttState(rumqttc::StateError::Deserialization(
                    rumqttc::Error::Io(io_wrapped(rustls::Error::AlertReceived(
                        AlertDescription::UnknownCA,
                    ))),
                )),
                with_cert,
                &[
                    "rejected the client certificate in /etc/watchpost/gw.crt",
                    "UnknownCA",
                ],
            ),
            (
                ConnectionError::Io(io_wrapped(rustls::Error::AlertReceived(
                    AlertDescription::CertificateRequired,
                ))),
                setup(),
                &[
                    "requires a client certificate",
                    "client_cert and client_key",
                ],
            ),
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword),
                setup(),
                &[
                    "refused the username or password",
                    "\"site-17\"",
                    "check username and password",
                ],
            ),
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized),
                setup(),
                &[
                    "refused the login as user \"site-17\"",
                    "check username and password",
                ],
            ),
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized),
                Setup {
                    client_cert: Some("/etc/watchpost/gw.crt".into()),
                    ..anonymous.clone()
                },
                &["refused the identity of the client certificate in /etc/watchpost/gw.crt"],
            ),
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized),
                anonymous,
                &["without a login", "set username and password"],
            ),
        ];
        for (error, setup, expected) in cases {
            let line = describe(&error, &setup);
            for part in expected {
                assert!(
                    line.contains(part),
                    "{part:?} not in {line:?} (from {error:?})"
                );
            }
        }
    }

    #[test]
    fn a_connect_failure_never_prints_a_packet() {
        // rumqttc's own message for this error prints the packet with its Debug, which shows
        // a login in the clear.
        let mut connect = rumqttc::Connect::new("echo");
        connect.login = Some(rumqttc::Login::new("site-17", "hunter2-secret"));
        let error = ConnectionError::NotConnAck(rumqttc::Packet::Connect(connect));
        assert!(error.to_string().contains("hunter2-secret"));
        let line = describe(&error, &setup());
        assert!(!line.contains("hunter2-secret"), "{line}");
        assert!(line.contains("other than CONNACK"), "{line}");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        assert_eq!(backoff(1, 0.0), Duration::from_millis(250));
        assert_eq!(backoff(1, 1.0), Duration::from_millis(500));
        assert_eq!(backoff(2, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(3, 0.5), Duration::from_millis(1500));
        assert_eq!(backoff(30, 0.0), BACKOFF_MAX / 2);
        assert_eq!(backoff(u32::MAX, 1.0), BACKOFF_MAX);
    }

    #[tokio::test]
    async fn only_acknowledged_rows_leave_and_the_rest_are_resent_in_order() {
        let (client, _eventloop) =
            AsyncClient::new(MqttOptions::new("t", "localhost", 1883), WINDOW * 2);
        let mut p = Pending::default();
        assert!(p.wants_more(3));
        p.load(vec![item(1), item(2), item(3)]);
        assert!(!p.wants_more(3), "everything committed is loaded");
        p.load(vec![item(2)]);
        assert_eq!(p.queue.len(), 3, "a row is loaded once");
        p.send_window(&client, "site");
        assert_eq!(p.in_flight(), 3);
        assert!(p.waiting_since.is_some());
        p.sent(7, 4);
        p.sent(8, 4);
        assert_eq!(p.acked(8), Some(2));
        assert_eq!(p.acked(8), None, "an ack counts once");
        // The connection drops before 1 and 3 are acknowledged.
        p.restart();
        assert_eq!((p.in_flight(), p.waiting_since), (0, None));
        p.send_window(&client, "site");
        assert_eq!(p.handed.iter().copied().collect::<Vec<_>>(), [1, 3]);
    }

    #[tokio::test]
    async fn the_window_bounds_what_is_on_the_wire() {
        let (client, _eventloop) =
            AsyncClient::new(MqttOptions::new("t", "localhost", 1883), WINDOW * 2);
        let mut p = Pending::default();
        p.load((1..=200).map(item).collect());
        p.send_window(&client, "site");
        assert_eq!(p.in_flight(), WINDOW);
        for pkid in 1..=WINDOW as u16 {
            p.sent(pkid, 4);
        }
        assert_eq!(p.acked(1), Some(1));
        p.send_window(&client, "site");
        assert_eq!(p.in_flight(), WINDOW);
        assert_eq!(p.handed.back(), Some(&(WINDOW as u64 + 1)));
    }
}

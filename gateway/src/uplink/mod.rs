//! The uplink: the one client of the upstream broker. Sends the outbox in order, QoS 1 (or 2),
//! and removes a row only when the upstream acknowledges it (PUBACK; PUBCOMP for QoS 2).
//!
//! The outbox lives in SQLite ([`crate::store`]); the uplink reads it a page at a time while
//! connected, so memory stays bounded however long the upstream was away. rumqttc's
//! `publish` returning `Ok` only means queued, and its eventloop forgets its queue when the
//! broker answers `session_present = false`; so the uplink keeps its own account of what is
//! on the wire ([`Pending`]) and, after every (re)connect, sends the unacknowledged rows again
//! in order. Duplicates that this may cause upstream carry the same alert id.
//!
//! **MQTT 5 or 3.1.1** ([`link`]): with `mqtt_version = "auto"` (the default without a
//! profile) the uplink connects with MQTT 5 and, if the upstream's answer shows that it does
//! not speak it (no CONNACK it can read, a refusal of the version, the connection closed
//! before a CONNACK), with 3.1.1 at once. With MQTT 5 it follows the CONNACK: no retain where
//! retain is not available, QoS lowered to the maximum QoS, nothing larger than the maximum
//! packet size, topic aliases up to the alias maximum (they save an alert's topic on every
//! repeat). A row the upstream cannot take on this connection (over its limits, or answered
//! with an error reason code) is held: it stays in the outbox, is logged and counted
//! (`watchpost_uplink_held_total`), and is tried again on the next connection, while the rows
//! after it go on.
//!
//! **The cloud's form** ([`form`]): a profile may send rows elsewhere than
//! `{topic_prefix}/...` (Azure IoT Hub's events topic, ThingsBoard's gateway API) and, for
//! Azure, log in with a SAS token made from the device key and renewed (by reconnecting) at
//! four fifths of its life.
//!
//! "Connected" means acknowledgements arrive: rumqttc pings every keep-alive and fails when a
//! ping goes unanswered until the next one, so a hung upstream (socket open, no answers) is
//! noticed within two keep-alives; and if publishes go unacknowledged for two keep-alives
//! while pings are answered, the uplink drops the connection and starts over.
//!
//! `poll()` has no backoff of its own: failed connects are retried after a capped exponential
//! delay with jitter ([`backoff`]). The delay grows across connections that end before any
//! acknowledgement and within [`BACKOFF_MAX`], so an upstream that accepts the connection and
//! closes it after every publish is retried ever more slowly, not twice a second; the log then
//! names the message on the wire when it closed and the likely causes ([`describe`]). The
//! gateway serves locally whether or not the upstream is reachable.
//!
//! With `mqtts://` the uplink trusts either the CA in `ca_file` alone or the system's roots,
//! and may present a client certificate (`client_cert`, `client_key`); a login goes in the
//! CONNECT packet. Files are read once, in [`Uplink::prepare`], so a bad path stops the start
//! with a message naming the file. A failed connect is logged as what is wrong and what to
//! check ([`describe`]), never with the options or packets themselves: `MqttOptions`' and
//! `Login`'s `Debug` print the password.

mod describe;
mod form;
mod link;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{TlsConfiguration, Transport};
use tokio::time::Instant;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tracing::{error, info, warn};

use crate::config::{Delivery, Form, MIN_KEEP_ALIVE_V5, MqttVersion, UplinkConfig};
use crate::shutdown::Signal;
use crate::stats::Stats;
use crate::store::{OutboxEntry, OutboxItem, Store};
pub use describe::Failure;
use describe::Setup;
use form::{Sas, Shaper};
use link::{Client, Limits, Loop, Message, Up, Version};

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
/// A connection that ends this soon after a publish went out is taken to have been closed
/// because of it.
pub const CLOSED_AFTER_PUBLISH: Duration = Duration::from_secs(2);
/// Most topic aliases used on one MQTT 5 connection.
pub const MAX_ALIASES: u16 = 64;

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
    /// The Azure shared access key is not base64 (`watchpost check` says so first).
    #[error("[uplink] `shared_access_key` is not base64")]
    SharedAccessKey,
}

/// A configured, not yet running uplink.
///
/// Deliberately not `Debug`: the options hold the upstream password.
pub struct Uplink {
    options: link::Options,
    target: String,
    keep_alive: Duration,
    setup: Setup,
    shaper: Shaper,
    delivery: Delivery,
    sas: Option<Sas>,
}

type Poll = Pin<Box<dyn Future<Output = (Loop, Up)> + Send>>;
type Page = Pin<Box<dyn Future<Output = Vec<OutboxItem>> + Send>>;

impl Uplink {
    /// Checks the configuration without connecting: reads the CA, the client certificate and
    /// its key (or the system's roots) and builds the TLS setup.
    pub fn prepare(config: &UplinkConfig) -> Result<Uplink, UplinkError> {
        let mut v4 = rumqttc::MqttOptions::new(&config.client_id, &config.host, config.port);
        v4.set_keep_alive(config.keep_alive);
        // The uplink replays its own account; the broker must not hold a session for it.
        v4.set_clean_session(true);
        v4.set_inflight(WINDOW as u16);
        let mut v5 = rumqttc::v5::MqttOptions::new(&config.client_id, &config.host, config.port);
        // rumqttc's MQTT 5 client panics on a keep-alive under 5 s; `watchpost check` makes
        // such an uplink speak 3.1.1, and so does this for a configuration built in code.
        let mut delivery = config.delivery.clone();
        if config.keep_alive < MIN_KEEP_ALIVE_V5 {
            delivery.mqtt_version = MqttVersion::V311;
        }
        v5.set_keep_alive(config.keep_alive.max(MIN_KEEP_ALIVE_V5));
        v5.set_clean_start(true);
        v5.set_outgoing_inflight_upper_limit(WINDOW as u16);
        if config.tls {
            let mut tls = tls_config(config)?;
            // AWS IoT Core on port 443 tells MQTT from HTTPS by ALPN.
            if let Some(alpn) = config.delivery.alpn {
                tls.alpn_protocols = vec![alpn.as_bytes().to_vec()];
            }
            let transport = Transport::tls_with_config(TlsConfiguration::Rustls(Arc::new(tls)));
            v4.set_transport(transport.clone());
            v5.set_transport(transport);
        }
        let mut options = link::Options {
            v4,
            v5,
            forwarded_by: config.forwarded_by.clone(),
        };
        if let Some((username, password)) = &config.login {
            options.set_password(username, password.expose());
        }
        let sas = match &config.delivery.form {
            Form::Azure {
                key: Some(key),
                token_ttl,
            } => Some(
                Sas::new(&config.host, &config.client_id, key, *token_ttl)
                    .ok_or(UplinkError::SharedAccessKey)?,
            ),
            _ => None,
        };
        let scheme = if config.tls { "mqtts" } else { "mqtt" };
        Ok(Uplink {
            options,
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
                profile: config.delivery.profile,
            },
            shaper: Shaper {
                form: config.delivery.form.clone(),
                prefix: config.topic_prefix.clone(),
                client_id: config.client_id.clone(),
            },
            delivery,
            sas,
        })
    }

    /// Runs until `shutdown`, sending what `store` commits to the outbox.
    pub async fn run(self, store: Store, stats: Arc<Stats>, shutdown: Signal) {
        let Uplink {
            mut options,
            target,
            keep_alive,
            setup,
            shaper,
            delivery,
            sas,
        } = self;
        let user = setup.username.clone().unwrap_or_default();
        let auto = delivery.mqtt_version == MqttVersion::Auto;
        let mut version = match delivery.mqtt_version {
            MqttVersion::V311 => Version::V311,
            MqttVersion::Auto | MqttVersion::V5 => Version::V5,
        };
        // Version changes since the last connection, and whether MQTT 5 ever worked here.
        let mut fallbacks = 0u32;
        let mut v5_seen = false;
        let setup = Arc::new(setup);
        let sas = sas.map(Arc::new);
        if let Some(sas) = &sas {
            options.set_password(&user, &sas.token());
        }
        let (mut client, eventloop) = link::new_client(&options, version, WINDOW * 2);
        let mut committed = store.committed();
        let mut committed_open = true;
        let mut pending = Pending::new(&delivery);
        let mut connected = false;
        let mut failures: u32 = 0;
        let mut page: Option<Page> = None;
        let mut connected_at = Instant::now();
        let mut acked_since_connect = false;
        let mut renew_at: Option<Instant> = None;
        // The eventloop lives inside this future and is only dropped whole: a poll that is
        // cancelled halfway could lose a request or leave a half-written packet.
        let mut poll: Poll = poll_after(eventloop, Duration::ZERO, &setup, &sas, &user);
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
                (mut eventloop, up) = &mut poll => {
                    let mut delay = Duration::ZERO;
                    match up {
                        Up::Connected(limits) => {
                            // CONNECT (fixed and variable header, client id) and CONNACK.
                            Stats::add(&stats.upstream_bytes, (14 + options.client_id().len() + 4) as u64);
                            connected = true;
                            connected_at = Instant::now();
                            acked_since_connect = false;
                            fallbacks = 0;
                            v5_seen |= eventloop.version() == Version::V5;
                            stats.uplink_connected.store(true, Ordering::Relaxed);
                            let queued = Stats::get(&stats.outbox_depth);
                            info!(upstream = %target, queued, protocol = eventloop.version().name(), "uplink connected{}", pending.follow(limits, eventloop.version()));
                            pending.restart();
                            renew_at = sas.as_ref().map(|s| Instant::now() + s.renew_after());
                        }
                        Up::Sent(pkid) => Stats::add(&stats.upstream_bytes, pending.sent(pkid)),
                        Up::Acked(pkid) => {
                            if let Some(seq) = pending.acked(pkid) {
                                Stats::inc(&stats.uplink_acked);
                                acked_since_connect = true;
                                store.outbox_done(seq);
                            }
                        }
                        Up::Refused(pkid, reason) => {
                            if let Some((seq, entry)) = pending.refused(pkid, &stats) {
                                error!(upstream = %target, id = %entry.id, outbox = seq, "the upstream refused this message ({reason}); it stays in the outbox and is sent again on the next connection; check the upstream's access rules for its topic");
                            }
                        }
                        Up::Ping => Stats::add(&stats.upstream_bytes, 2),
                        Up::Other | Up::Disconnected => {}
                        Up::Failed(failure) => {
                            let was_connected = std::mem::replace(&mut connected, false);
                            stats.uplink_connected.store(false, Ordering::Relaxed);
                            let blamed = if was_connected { pending.blame() } else { None };
                            if acked_since_connect || (was_connected && connected_at.elapsed() >= BACKOFF_MAX) {
                                failures = 0;
                            }
                            failures = failures.saturating_add(1);
                            delay = backoff(failures, fastrand::f64());
                            let tried = eventloop.version();
                            let switch = auto && !was_connected && failure.version_suspect
                                && (fallbacks > 0 || !v5_seen || tried == Version::V311 || failures >= 2);
                            if switch {
                                version = tried.other();
                                if fallbacks == 0 {
                                    delay = Duration::ZERO;
                                }
                                fallbacks += 1;
                                info!(upstream = %target, "the upstream does not seem to speak {} ({}); trying {}", tried.name(), failure.text, version.name());
                                let (new_client, new_loop) = link::new_client(&options, version, WINDOW * 2);
                                client = new_client;
                                eventloop = new_loop;
                            } else if let Some(blamed) = blamed {
                                warn!(upstream = %target, queued = Stats::get(&stats.outbox_depth), "uplink lost: {}; it stays in the outbox; retrying in {:.1}s", describe::after_publish(&blamed, &failure), delay.as_secs_f64());
                            } else {
                                let state = match (failures, was_connected) {
                                    (1, true) => "lost",
                                    (1, false) => "cannot connect",
                                    (_, true) => "lost again",
                                    _ => "still down",
                                };
                                warn!(upstream = %target, queued = Stats::get(&stats.outbox_depth), "uplink {state}: {}; retrying in {:.1}s", failure.text, delay.as_secs_f64());
                            }
                            pending.restart();
                        }
                    }
                    poll = poll_after(eventloop, delay, &setup, &sas, &user);
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
                    let (new_client, eventloop) = link::new_client(&options, version, WINDOW * 2);
                    client = new_client;
                    poll = poll_after(eventloop, delay, &setup, &sas, &user);
                    pending.restart();
                }
                _ = tokio::time::sleep_until(renew_at.unwrap_or_else(Instant::now)), if connected && renew_at.is_some() => {
                    // A SAS token is only checked at CONNECT: a new one needs a new connection.
                    // What is unacknowledged is sent again on it.
                    info!(upstream = %target, "renewing the SAS token: reconnecting with a new one");
                    connected = false;
                    renew_at = None;
                    stats.uplink_connected.store(false, Ordering::Relaxed);
                    client.try_disconnect();
                    let (new_client, eventloop) = link::new_client(&options, version, WINDOW * 2);
                    client = new_client;
                    poll = poll_after(eventloop, Duration::ZERO, &setup, &sas, &user);
                    pending.restart();
                }
            }
            if connected {
                pending.send_window(&client, &shaper, &stats, &target);
            }
        }

        // Shutdown: give messages already sent a moment to be acknowledged, then say goodbye.
        if connected && pending.in_flight() > 0 {
            let _ = tokio::time::timeout(FLUSH_GRACE, async {
                while pending.in_flight() > 0 {
                    let (eventloop, up) = (&mut poll).await;
                    match up {
                        Up::Sent(pkid) => Stats::add(&stats.upstream_bytes, pending.sent(pkid)),
                        Up::Acked(pkid) => {
                            if let Some(seq) = pending.acked(pkid) {
                                Stats::inc(&stats.uplink_acked);
                                store.outbox_done(seq);
                            }
                        }
                        Up::Failed(_) => break,
                        _ => {}
                    }
                    poll = poll_after(eventloop, Duration::ZERO, &setup, &sas, &user);
                }
            })
            .await;
        }
        if connected && client.try_disconnect() {
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                loop {
                    let (eventloop, up) = (&mut poll).await;
                    if matches!(up, Up::Failed(_) | Up::Disconnected) {
                        break;
                    }
                    poll = poll_after(eventloop, Duration::ZERO, &setup, &sas, &user);
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

/// Polls `eventloop` once after `delay`. Before a connect, an Azure uplink makes a new SAS
/// token, so that no connect uses an old one.
fn poll_after(
    mut eventloop: Loop,
    delay: Duration,
    setup: &Arc<Setup>,
    sas: &Option<Arc<Sas>>,
    user: &str,
) -> Poll {
    let (setup, sas, user) = (setup.clone(), sas.clone(), user.to_owned());
    Box::pin(async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(sas) = &sas {
            if !eventloop.is_connected() {
                eventloop.set_password(&user, &sas.token());
            }
        }
        let up = eventloop.poll(&setup).await;
        (eventloop, up)
    })
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

/// A message on the wire (or handed to the client for it), for the account and for the log if
/// the connection closes right after it.
#[derive(Debug, Clone)]
pub struct OnWire {
    /// Outbox position.
    pub seq: u64,
    /// Alert (or summary) id.
    pub id: String,
    /// The topic it went to (in full, also when an alias carried it).
    pub topic: String,
    /// Bytes of the PUBLISH and its acknowledgement(s).
    pub bytes: u64,
    /// QoS it went with.
    pub qos: u8,
    /// Sent retained.
    pub retain: bool,
}

/// The message the upstream most likely closed the connection over.
#[derive(Debug, Clone)]
pub struct Blamed {
    /// The oldest unacknowledged message.
    pub message: OnWire,
    /// How long after the last publish the connection ended.
    pub after: Duration,
    /// Other messages unacknowledged at that moment.
    pub others: usize,
}

/// Outbox rows read and not yet acknowledged, which of them are on the wire under which packet
/// id, and what this connection's upstream allows.
#[derive(Debug)]
struct Pending {
    /// Outbox position → row, for rows read and not acknowledged.
    queue: BTreeMap<u64, OutboxEntry>,
    /// Highest outbox position read so far.
    loaded_upto: u64,
    /// First position not yet handed to the client in this connection.
    next_send: u64,
    /// Handed to the client, waiting for the eventloop to assign a packet id (in order).
    handed: VecDeque<OnWire>,
    /// On the wire: packet id → message.
    inflight: HashMap<u16, OnWire>,
    /// Since when something has been waiting for an acknowledgement without any arriving.
    waiting_since: Option<Instant>,
    /// When the last publish went on the wire.
    last_sent: Option<Instant>,
    /// What the configuration asks for.
    qos: u8,
    retain: bool,
    max_payload: Option<usize>,
    /// What the upstream of this connection allows, and its protocol.
    limits: Limits,
    version: Version,
    /// Rows not sent on this connection (over its limits, or refused by the upstream).
    held: HashSet<u64>,
    /// Held rows already logged, so that each is logged once while it waits: over the limits,
    /// and refused by the upstream.
    reported: HashSet<u64>,
    reported_refused: HashSet<u64>,
    /// Topic aliases of this connection.
    aliases: HashMap<String, u16>,
}

impl Pending {
    fn new(delivery: &Delivery) -> Pending {
        Pending {
            queue: BTreeMap::new(),
            loaded_upto: 0,
            next_send: 0,
            handed: VecDeque::new(),
            inflight: HashMap::new(),
            waiting_since: None,
            last_sent: None,
            qos: delivery.qos,
            retain: delivery.retain,
            max_payload: delivery.max_payload,
            limits: Limits::ALL,
            version: Version::V311,
            held: HashSet::new(),
            reported: HashSet::new(),
            reported_refused: HashSet::new(),
            aliases: HashMap::new(),
        }
    }

    /// A new connection with these limits; returns what of them changes what is sent, for the
    /// log line.
    fn follow(&mut self, limits: Limits, version: Version) -> String {
        self.limits = limits;
        self.version = version;
        let mut notes = Vec::new();
        if self.retain && !limits.retain {
            notes.push("retain is not available: alerts go without it".to_owned());
        }
        match limits.max_qos {
            0 => notes.push(
                "it allows QoS 0 only: nothing can be sent, since an alert leaves the outbox only when acknowledged".to_owned(),
            ),
            1 if self.qos == 2 => notes.push("QoS 2 is not available: QoS 1 is used".to_owned()),
            _ => {}
        }
        if let Some(max) = limits.max_packet {
            notes.push(format!("packets up to {max} bytes"));
        }
        if limits.topic_alias_max > 0 {
            notes.push(format!(
                "{} topic aliases",
                limits.topic_alias_max.min(MAX_ALIASES)
            ));
        }
        if notes.is_empty() {
            String::new()
        } else {
            format!(" (the upstream says: {})", notes.join("; "))
        }
    }

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
        self.last_sent = None;
        self.held.clear();
        self.aliases.clear();
    }

    /// The publish of `entry` under this connection's limits and its topic in full (an alias
    /// may carry it), or why it cannot go on this connection.
    fn message(
        &mut self,
        entry: &OutboxEntry,
        shaper: &Shaper,
    ) -> Result<(Message, String), String> {
        let qos = self.qos.min(self.limits.max_qos);
        if qos == 0 {
            return Err("the upstream allows QoS 0 only".into());
        }
        let (topic, payload) = shaper.shape(entry);
        if let Some(max) = self.max_payload {
            if payload.len() > max {
                return Err(format!(
                    "its payload of {} bytes is over the cloud's limit of {max}",
                    payload.len()
                ));
            }
        }
        let mut message = Message {
            topic,
            payload,
            qos,
            retain: entry.retain && self.retain && self.limits.retain,
            alias: None,
        };
        if let Some(max) = self.limits.max_packet {
            let acks = if qos >= 2 { 12 } else { 4 };
            let packet = link::wire_bytes(&message, self.version) - acks;
            if packet > u64::from(max) {
                return Err(format!(
                    "its packet of {packet} bytes is over the upstream's maximum packet size of {max}"
                ));
            }
        }
        let topic = message.topic.clone();
        if self.version == Version::V5 {
            let room = self.limits.topic_alias_max.min(MAX_ALIASES);
            if let Some(&alias) = self.aliases.get(&topic) {
                message.alias = Some(alias);
                message.topic = String::new();
            } else if (self.aliases.len() as u16) < room {
                let alias = self.aliases.len() as u16 + 1;
                self.aliases.insert(topic.clone(), alias);
                message.alias = Some(alias);
            }
        }
        Ok((message, topic))
    }

    /// Hands queued rows to the client while the window has room. Rows this connection cannot
    /// take are held (logged once, counted) and skipped.
    fn send_window(&mut self, client: &Client, shaper: &Shaper, stats: &Stats, target: &str) {
        while self.in_flight() < WINDOW {
            let Some((&seq, entry)) = self.queue.range(self.next_send..).next() else {
                break;
            };
            let entry = entry.clone();
            self.next_send = seq + 1;
            let (message, topic) = match self.message(&entry, shaper) {
                Ok(m) => m,
                Err(why) => {
                    self.held.insert(seq);
                    if self.reported.insert(seq) {
                        Stats::inc(&stats.uplink_held);
                        error!(upstream = %target, id = %entry.id, outbox = seq, "held back: {why}; it stays in the outbox and is tried again on the next connection");
                    }
                    continue;
                }
            };
            if !client.try_publish(&message) {
                // Tried again on the next round.
                self.next_send = seq;
                // An alias set up by this publish was not sent: it is not in use.
                if message.alias.is_some() && !message.topic.is_empty() {
                    self.aliases.remove(&topic);
                }
                break;
            }
            self.handed.push_back(OnWire {
                seq,
                id: entry.id.clone(),
                topic,
                bytes: link::wire_bytes(&message, self.version),
                qos: message.qos,
                retain: message.retain,
            });
            self.waiting_since.get_or_insert_with(Instant::now);
        }
    }

    /// The eventloop put the next handed row on the wire as `pkid`; returns the MQTT bytes
    /// of that PUBLISH and its acknowledgement(s) to come.
    fn sent(&mut self, pkid: u16) -> u64 {
        let Some(message) = self.handed.pop_front() else {
            return 0;
        };
        let bytes = message.bytes;
        self.inflight.insert(pkid, message);
        self.last_sent = Some(Instant::now());
        bytes
    }

    /// `pkid` was acknowledged: returns the outbox position that is now delivered.
    fn acked(&mut self, pkid: u16) -> Option<u64> {
        let seq = self.inflight.remove(&pkid)?.seq;
        self.queue.remove(&seq);
        self.reported.remove(&seq);
        self.reported_refused.remove(&seq);
        self.waiting_since = (self.in_flight() > 0).then(Instant::now);
        Some(seq)
    }

    /// The upstream answered `pkid` with an error: the row is held for this connection,
    /// counted, and returned the first time only, to be logged once while it waits.
    fn refused(&mut self, pkid: u16, stats: &Stats) -> Option<(u64, OnWire)> {
        let message = self.inflight.remove(&pkid)?;
        self.held.insert(message.seq);
        self.waiting_since = (self.in_flight() > 0).then(Instant::now);
        if !self.reported_refused.insert(message.seq) {
            return None;
        }
        Stats::inc(&stats.uplink_held);
        Some((message.seq, message))
    }

    /// The connection just ended: the message it most likely ended over, if a publish went
    /// out shortly before and is still unacknowledged.
    fn blame(&self) -> Option<Blamed> {
        let after = self.last_sent?.elapsed();
        if after > CLOSED_AFTER_PUBLISH {
            return None;
        }
        let message = self.inflight.values().min_by_key(|m| m.seq)?.clone();
        Some(Blamed {
            message,
            after,
            others: self.in_flight() - 1,
        })
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
            forwarded_by: None,
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
            delivery: Delivery::default(),
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
        let login = uplink.options.v4.credentials().expect("the login is set");
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("site-1", "hunter2-secret")
        );
        assert_eq!(uplink.target, "mqtt://127.0.0.1:8883");
        assert!(uplink.setup.ca_file.is_none());
        assert!(!format!("{:?}", uplink.setup).contains("hunter2"));
    }

    #[test]
    fn aws_on_port_443_offers_the_alpn_protocol_aws_iot_core_wants() {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let alpn = |config: &UplinkConfig| {
            let uplink = Uplink::prepare(config).unwrap();
            [uplink.options.v4.transport(), uplink.options.v5.transport()].map(|t| match t {
                Transport::Tls(TlsConfiguration::Rustls(tls)) => tls.alpn_protocols.clone(),
                _ => panic!("not TLS"),
            })
        };
        let mut config = tls_uplink(Some(&ca_file), None);
        assert_eq!(alpn(&config), [Vec::<Vec<u8>>::new(), Vec::new()]);
        config.port = 443;
        config.delivery.alpn = Some(crate::config::AWS_ALPN);
        let offered = vec![b"x-amzn-mqtt-ca".to_vec()];
        assert_eq!(alpn(&config), [offered.clone(), offered]);
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

    fn plain() -> Shaper {
        Shaper {
            form: Form::Plain,
            prefix: "site".into(),
            client_id: "gw".into(),
        }
    }

    /// A client whose event loop is kept (a dropped loop refuses every request) and never
    /// polled: requests wait in its queue.
    fn client(version: Version) -> (Client, Loop) {
        let options = link::Options {
            v4: rumqttc::MqttOptions::new("t", "localhost", 1883),
            v5: rumqttc::v5::MqttOptions::new("t", "localhost", 1883),
            forwarded_by: None,
        };
        link::new_client(&options, version, WINDOW * 2)
    }

    fn handed(p: &Pending) -> Vec<u64> {
        p.handed.iter().map(|m| m.seq).collect()
    }

    #[tokio::test]
    async fn only_acknowledged_rows_leave_and_the_rest_are_resent_in_order() {
        let (client, _eventloop) = client(Version::V311);
        let stats = Stats::default();
        let mut p = Pending::new(&Delivery::default());
        assert!(p.wants_more(3));
        p.load(vec![item(1), item(2), item(3)]);
        assert!(!p.wants_more(3), "everything committed is loaded");
        p.load(vec![item(2)]);
        assert_eq!(p.queue.len(), 3, "a row is loaded once");
        p.send_window(&client, &plain(), &stats, "t");
        assert_eq!(p.in_flight(), 3);
        assert!(p.waiting_since.is_some());
        p.sent(7);
        p.sent(8);
        assert_eq!(p.acked(8), Some(2));
        assert_eq!(p.acked(8), None, "an ack counts once");
        // The connection drops before 1 and 3 are acknowledged.
        p.restart();
        assert_eq!((p.in_flight(), p.waiting_since), (0, None));
        p.send_window(&client, &plain(), &stats, "t");
        assert_eq!(handed(&p), [1, 3]);
    }

    #[tokio::test]
    async fn the_window_bounds_what_is_on_the_wire() {
        let (client, _eventloop) = client(Version::V311);
        let stats = Stats::default();
        let mut p = Pending::new(&Delivery::default());
        p.load((1..=200).map(item).collect());
        p.send_window(&client, &plain(), &stats, "t");
        assert_eq!(p.in_flight(), WINDOW);
        for pkid in 1..=WINDOW as u16 {
            p.sent(pkid);
        }
        assert_eq!(p.acked(1), Some(1));
        p.send_window(&client, &plain(), &stats, "t");
        assert_eq!(p.in_flight(), WINDOW);
        assert_eq!(p.handed.back().map(|m| m.seq), Some(WINDOW as u64 + 1));
    }

    #[tokio::test]
    async fn the_connack_limits_shape_what_goes_out_and_what_is_held() {
        let (client, _eventloop) = client(Version::V5);
        let stats = Stats::default();
        let mut p = Pending::new(&Delivery {
            qos: 2,
            ..Delivery::default()
        });
        let note = p.follow(
            Limits {
                retain: false,
                max_qos: 1,
                max_packet: Some(120),
                topic_alias_max: 10,
            },
            Version::V5,
        );
        for part in [
            "retain is not available",
            "QoS 1 is used",
            "packets up to 120 bytes",
            "10 topic aliases",
        ] {
            assert!(note.contains(part), "{part:?} not in {note:?}");
        }
        p.restart();
        let mut big = item(3);
        big.entry.payload = Bytes::from(vec![b'x'; 200]);
        let mut repeat = item(4);
        repeat.entry.topic = item(1).entry.topic;
        p.load(vec![item(1), item(2), big, repeat]);
        p.send_window(&client, &plain(), &stats, "t");
        assert_eq!(
            handed(&p),
            [1, 2, 4],
            "the row over the packet limit is held"
        );
        assert!(p.held.contains(&3));
        assert_eq!(Stats::get(&stats.uplink_held), 1);
        let m: Vec<_> = p.handed.iter().map(|m| (m.qos, m.retain)).collect();
        assert_eq!(m, [(1, false); 3], "QoS lowered, retain off");
        // Row 4 repeats row 1's topic: the alias alone carries it, so it costs fewer bytes.
        assert!(p.handed[2].bytes < p.handed[0].bytes);
        assert_eq!(p.handed[2].topic, "site/alerts/critical/d/r1");
        // Held rows are logged and counted once, and tried again on the next connection.
        p.restart();
        p.send_window(&client, &plain(), &stats, "t");
        assert_eq!(Stats::get(&stats.uplink_held), 1);
        p.follow(Limits::ALL, Version::V5);
        p.restart();
        p.send_window(&client, &plain(), &stats, "t");
        assert_eq!(handed(&p), [1, 2, 3, 4]);
        assert!(p.handed.iter().all(|m| m.qos == 2 && m.retain));
    }

    #[tokio::test]
    async fn qos_0_only_holds_everything_and_a_refusal_holds_one_row() {
        let (client, _eventloop) = client(Version::V5);
        let stats = Stats::default();
        let mut p = Pending::new(&Delivery::default());
        p.follow(
            Limits {
                max_qos: 0,
                ..Limits::ALL
            },
            Version::V5,
        );
        p.load(vec![item(1), item(2)]);
        p.send_window(&client, &plain(), &stats, "t");
        assert_eq!(p.in_flight(), 0);
        p.follow(Limits::ALL, Version::V5);
        p.restart();
        p.send_window(&client, &plain(), &stats, "t");
        p.sent(1);
        p.sent(2);
        let (seq, _) = p.refused(1, &stats).expect("on the wire");
        assert_eq!(seq, 1);
        assert_eq!(
            Stats::get(&stats.uplink_held),
            3,
            "two held for QoS 0, one refused"
        );
        assert_eq!(p.acked(2), Some(2));
        assert_eq!(
            p.queue.keys().copied().collect::<Vec<_>>(),
            [1],
            "a refused row stays"
        );
        p.send_window(&client, &plain(), &stats, "t");
        assert_eq!(p.in_flight(), 0, "not again on the same connection");
        // On the next connection it goes again; refused again, it is not counted twice.
        p.restart();
        p.send_window(&client, &plain(), &stats, "t");
        p.sent(3);
        assert!(p.refused(3, &stats).is_none());
        assert_eq!(Stats::get(&stats.uplink_held), 3);
    }

    #[tokio::test]
    async fn a_connection_closed_right_after_a_publish_blames_the_oldest_unacknowledged() {
        let (client, _eventloop) = client(Version::V311);
        let stats = Stats::default();
        let mut p = Pending::new(&Delivery::default());
        p.load(vec![item(1), item(2), item(3)]);
        p.send_window(&client, &plain(), &stats, "t");
        assert!(p.blame().is_none(), "nothing on the wire yet");
        p.sent(1);
        p.sent(2);
        p.sent(3);
        assert_eq!(p.acked(1), Some(1));
        let blamed = p.blame().expect("closed right after publishes");
        assert_eq!((blamed.message.seq, blamed.others), (2, 1));
        let failure = Failure {
            text: "protocol: connection closed by peer abruptly".into(),
            version_suspect: false,
            server_reason: None,
        };
        let line = describe::after_publish(&blamed, &failure);
        for part in [
            "a2 (outbox 2, topic site/alerts/critical/d/r2",
            "retained",
            "with 1 more unacknowledged",
            "retained messages (set retain = false",
            "5 levels",
        ] {
            assert!(line.contains(part), "{part:?} not in {line}");
        }
        let told = Failure {
            server_reason: Some("RetainNotSupported".into()),
            ..failure
        };
        let line = describe::after_publish(&blamed, &told);
        assert!(
            line.contains("saying RetainNotSupported; set retain = false"),
            "{line}"
        );
    }
}

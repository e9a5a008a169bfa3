//! The embedded broker: Watchpost's own MQTT 3.1.1 and 5 broker.
//!
//! Sensors, local consumers and tools at a site all talk to it, on one port per listener
//! (plain and TLS), each speaking both versions, chosen from the CONNECT. The parts:
//!
//! | module | one job |
//! |---|---|
//! | [`packet`] | the codec: bytes to packets and back, with the exact reason code of every malformed or forbidden packet |
//! | `session` | one client's protocol as a state machine: packets in, packets and messages out, no sockets and no clock |
//! | `hub` | the router: subscriptions, each session's bounded queue, retained messages, delayed wills, session expiry |
//! | `connection` | the socket: TLS, reading and writing, keep-alive, admission, waiting for ingest |
//! | `gate` | who may connect; [`crate::access`] says what each client may do |
//!
//! Publishes of every client go to one injector task, which hands each batch to ingest and,
//! when some subscription may hear them, to the hub. A sensor that only publishes never gets
//! a session in the hub and costs a few KiB. Ingest is never behind a queue that could drop
//! what it has not read yet: the injector waits for it, and the clients wait for the
//! injector. A QoS 1 or 2 publish is acknowledged only once ingest has judged it and the store
//! has committed what that wrote ([`Batch::judged`]), so that nothing a client handed over is
//! lost when the gateway is killed.
//!
//! rumqttd's router did the routing until MQTT 5 had to work in full; why it was replaced is
//! in `hub`'s documentation. `SECURITY.md` has the threat model.

mod connection;
#[doc(hidden)]
pub mod front_check;
pub(crate) mod gate;
mod hub;
pub mod packet;
mod retained;
mod session;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{error, info, warn};

use crate::access::CredentialsError;
use crate::acl::AclRule;
use crate::config::BrokerConfig;
use crate::shutdown::Signal;
use crate::sources::Source;
use crate::stats::Stats;
use crate::store::Store;

pub(crate) use gate::Gate;
pub use hub::{Batch, Message};
pub use session::MAX_TOPIC_BYTES;

/// Client ids starting with this are reserved for the gateway.
pub const INTERNAL_PREFIX: &str = "watchpost-internal-";

/// Batches of publishes (each of at most 256) waiting for the injector; a client that finds
/// the queue full waits (and is not read meanwhile).
const INJECT_QUEUE: usize = 16;
/// How often session expiry and delayed wills are looked at.
const TICK: Duration = Duration::from_millis(250);
/// Sessions are counted for the metrics every this many ticks.
const COUNT_EVERY: u64 = 20;

/// Errors of the broker layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Which listener.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The credentials file is unusable.
    #[error("cannot read the broker's credentials: {0}")]
    Credentials(#[from] CredentialsError),
    /// The TLS listener cannot be set up.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// The broker's router, for the gateway's own messages. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    hub: Arc<hub::Hub>,
}

impl Broker {
    /// A broker with no clients yet, bounded as `config` says.
    pub fn new(config: &BrokerConfig, stats: Arc<Stats>) -> Broker {
        let limits = hub::HubLimits {
            queue: hub::QueueLimits {
                messages: config.max_queued_messages,
                bytes: config.max_queued_bytes,
            },
            max_session_expiry: u32::try_from(config.max_session_expiry.as_secs())
                .unwrap_or(u32::MAX),
            retained: retained::RetainedLimits {
                messages: config.max_retained_messages,
                bytes: config.max_retained_bytes,
            },
        };
        Broker {
            hub: Arc::new(hub::Hub::new(limits, stats)),
        }
    }

    /// Publishes a message of the gateway's own (an alert document, a Home Assistant
    /// discovery message) retained, at QoS 1, to the clients subscribed to its topic. The
    /// gateway's retained messages are kept whatever the bounds of retained messages; an
    /// empty payload deletes the topic's retained message, and still reaches the subscribers.
    pub fn publish_retained(&self, topic: String, payload: Bytes) {
        let message = Arc::new(Message {
            topic: Bytes::from(topic),
            payload,
            qos: packet::QoS::AtLeastOnce,
            retain: true,
            ..Message::default()
        });
        self.hub.retained.keep_own(&message);
        self.hub.route(&[message], std::time::Instant::now());
    }
}

impl Broker {
    /// Delivers the publishes the site's other gateway mirrored (its clients') to this
    /// gateway's subscribers, and keeps the retained ones, as if they had come here.
    pub fn route_from_peer(&self, messages: Vec<Message>) {
        let messages: Vec<Arc<Message>> = messages.into_iter().map(Arc::new).collect();
        for m in messages.iter().filter(|m| m.retain) {
            self.hub.retain(m);
        }
        if self.hub.listening() {
            self.hub.route(&messages, std::time::Instant::now());
        }
    }

    /// Takes back the retained messages the database kept from the last run (those of
    /// clients; the gateway's alerts come back through their saved states).
    pub async fn restore_retained(&self, store: &Store) {
        let rows = store.retained_all().await;
        if rows.is_empty() {
            return;
        }
        let (taken, dropped) =
            self.hub
                .retained
                .restore(rows, std::time::Instant::now(), crate::alert::now_millis());
        info!(taken, "retained messages taken back from the database");
        if dropped > 0 {
            warn!(
                dropped,
                "retained messages in the database were not taken back: expired, unreadable, or beyond broker.max_retained_messages or max_retained_bytes"
            );
        }
    }

    /// Removes the subscriptions that `policy` no longer allows (after a reload), and says
    /// which in the log; returns how many.
    pub fn revoke_subscriptions(&self, policy: &crate::acl::Policy) -> usize {
        let revoked = self.hub.revoke(policy);
        for (client_id, filter) in revoked.iter().take(20) {
            warn!(client = %client_id, filter = %filter, "subscription removed: the ACL no longer allows it");
        }
        if revoked.len() > 20 {
            warn!(
                more = revoked.len() - 20,
                "more subscriptions removed: the ACL no longer allows them"
            );
        }
        revoked.len()
    }

    /// Writes the retained messages to the database as they change, until `shutdown`.
    pub fn persist_retained(
        &self,
        store: Store,
        shutdown: Signal,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        retained::persist(self.hub.retained.clone(), store, shutdown)
    }
}

/// The bound listeners, before they serve.
pub struct Listeners {
    plain: TcpListener,
    tls: Option<(TcpListener, TlsAcceptor)>,
}

impl Listeners {
    /// Binds the configured listeners and loads the TLS certificates; errors name the
    /// address or file and the reason.
    pub async fn bind(config: &BrokerConfig) -> Result<Listeners, BrokerError> {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| BrokerError::Bind { addr, what, source })
        };
        let plain = bind(config.listen, "MQTT").await?;
        let tls = match &config.tls {
            Some(t) => {
                let acceptor = tls::acceptor(t)?;
                Some((bind(t.listen, "MQTT over TLS").await?, acceptor))
            }
            None => None,
        };
        Ok(Listeners { plain, tls })
    }

    /// The MQTT address actually bound (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.plain
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The TLS address actually bound, if any.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls
            .as_ref()
            .map(|(l, _)| l.local_addr().expect("a bound listener has an address"))
    }

    /// Serves clients until `shutdown`; then every client connection is closed.
    pub(crate) async fn serve(
        self,
        pipes: Pipes,
        gate: Arc<Gate>,
        config: &BrokerConfig,
        stats: Arc<Stats>,
        shutdown: Signal,
    ) {
        let Pipes { broker, readings } = pipes;
        let (inject, injected) = tokio::sync::mpsc::channel(INJECT_QUEUE);
        let refuse_subscriptions = config
            .refuse_subscriptions
            .iter()
            .filter_map(|f| crate::topic::TopicFilter::new(f).ok())
            .collect();
        let shared = Arc::new(connection::Shared {
            hub: broker.hub.clone(),
            inject: inject.clone(),
            gate,
            connect_timeout: config.connect_timeout,
            limits: session::SessionLimits {
                receive_maximum: config.receive_maximum,
                max_packet: config.max_packet_bytes(),
                max_keep_alive: config
                    .max_keep_alive
                    .map(|d| u16::try_from(d.as_secs()).unwrap_or(u16::MAX)),
                refuse_subscriptions,
            },
            max_connections: config.max_connections,
            stats,
            refusal_logged_at: Default::default(),
            violation_logged_at: Default::default(),
            next_connection: Default::default(),
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(connection::inject(injected, readings, broker.hub.clone()));
        tasks.spawn(tick(broker.hub.clone(), inject, shared.stats.clone()));
        tasks.spawn(accept_loop(self.plain, None, shared.clone()));
        if let Some((listener, acceptor)) = self.tls {
            tasks.spawn(accept_loop(listener, Some(acceptor), shared));
        }
        shutdown.wait().await;
        // Dropping the set aborts the accept loops, and with them every connection task.
        tasks.shutdown().await;
    }
}

/// Ends sessions whose expiry passed and publishes the wills whose delay passed; now and
/// then counts the sessions for the metrics.
async fn tick(hub: Arc<hub::Hub>, inject: tokio::sync::mpsc::Sender<Batch>, stats: Arc<Stats>) {
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for round in 0u64.. {
        every.tick().await;
        if round % COUNT_EVERY == 0 {
            let counts = hub.counts();
            let set = |gauge: &std::sync::atomic::AtomicU64, n: usize| {
                gauge.store(n as u64, Ordering::Relaxed);
            };
            set(&stats.sessions_online, counts.online);
            set(&stats.sessions_offline, counts.offline);
            set(&stats.queued_messages, counts.queued);
            set(&stats.retained_messages, hub.retained.len());
        }
        let wills = hub.tick(std::time::Instant::now());
        if !wills.is_empty() && inject.send(wills.into()).await.is_err() {
            return;
        }
    }
}

/// Where the broker sends what clients publish.
pub(crate) struct Pipes {
    /// The router.
    pub(crate) broker: Broker,
    /// Batches of publishes for ingest; full when ingest is behind, and then the front waits.
    pub(crate) readings: tokio::sync::mpsc::Sender<Batch>,
}

/// The gate for `config` with the ACL rules and sources: its credentials file read, and a
/// warning if it lets in no one or anyone.
pub(crate) fn gate(
    config: &BrokerConfig,
    acl: Vec<AclRule>,
    sources: Vec<Source>,
) -> Result<Arc<Gate>, BrokerError> {
    let gate = Gate::new(
        config.allow_anonymous,
        &config.credentials,
        Vec::new(),
        config.max_publish_rate,
    )?;
    gate.set_policy(acl, sources);
    gate::warn_about(
        &gate,
        config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
    );
    Ok(Arc::new(gate))
}

/// Accepts connections and gives each a task of its own. Nothing here waits on a client: the
/// TLS handshake, like everything else a client does, runs in the connection's task.
async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<connection::Shared>,
) {
    let mut connections = JoinSet::new();
    let mut refused_logged_at: Option<tokio::time::Instant> = None;
    loop {
        // Reap finished connection tasks so the set does not grow.
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Typically out of file descriptors: wait instead of spinning.
                error!(error = %e, "cannot accept a connection; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if shared.stats.connections.load(Ordering::Relaxed) >= shared.max_connections as u64 {
            Stats::inc(&shared.stats.connections_refused);
            let now = tokio::time::Instant::now();
            if refused_logged_at.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60)) {
                refused_logged_at = Some(now);
                warn!(%peer, max = shared.max_connections, "connection refused: broker.max_connections reached (logged at most once a minute)");
            }
            drop(stream);
            continue;
        }
        // The place is taken before the task starts, so a burst cannot overshoot the limit.
        let slot = connection::Slot::take(&shared.stats);
        match &tls {
            None => connections.spawn(connection::serve(stream, peer, shared.clone(), slot)),
            Some(acceptor) => connections.spawn(connection::serve_tls(
                stream,
                peer,
                shared.clone(),
                acceptor.clone(),
                slot,
            )),
        };
    }
}

/// True if `client_id` may be used by a remote client.
pub fn client_id_allowed(client_id: &str) -> bool {
    !client_id.starts_with(INTERNAL_PREFIX) && !client_id.contains(['+', '#', '/', '$', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_and_invalid_client_ids_are_refused() {
        assert!(client_id_allowed("boiler-1"));
        assert!(!client_id_allowed("watchpost-internal-ingest-00"));
        assert!(!client_id_allowed("a/b"));
        assert!(!client_id_allowed("$sys"));
    }
}

//! The embedded broker: rumqttd's router, with listeners and client connections owned by
//! Watchpost.
//!
//! rumqttd does the MQTT routing: subscriptions, the gateway's retained alerts, QoS 2
//! acknowledgement, persistent sessions. Devices' retained status is kept by the front
//! ([`retained`]), at a fraction of the router's cost per message. Watchpost accepts the
//! sockets itself ([`connection`]), because owning the socket is the only way to bind
//! `127.0.0.1:0` and report the port, to set `TCP_NODELAY`, to refuse client ids that would
//! take over an internal link, to check every packet, and to enforce limits before the router
//! sees a byte.
//!
//! Publishes (QoS 0 and 1) of every client go to one injector task, which hands each batch to
//! ingest directly and to the router through one internal link, for the clients that
//! subscribe. A client gets a router link of its own only when it needs the router for more:
//! a subscription, a QoS 2 publish or a persistent session. Most sensors never do, which
//! keeps a connection to a few KiB, and ingest is never behind a router log that could drop
//! what it has not read yet.
//!
//! The gateway's internal links (the injector's, and ingest's for publishing alerts) have
//! client ids with an unguessable suffix and a reserved prefix that remote clients are
//! refused, so no client can kick them off.
//!
//! Who may connect and what each client may do is decided by the [`gate`] and
//! [`crate::access`], packet by packet, in [`connection`]; `SECURITY.md` has the threat model.

mod connection;
pub(crate) mod gate;
pub mod packet;
mod retained;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::{Notification, RouterConfig};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{error, warn};

use crate::access::CredentialsError;
use crate::config::BrokerConfig;
use crate::shutdown::Signal;
use crate::sources::Source;
use crate::stats::Stats;

pub use connection::MAX_TOPIC_BYTES;
pub(crate) use gate::Gate;

/// Client ids starting with this are reserved for the gateway's own links.
pub const INTERNAL_PREFIX: &str = "watchpost-internal-";

/// Batches of publishes (each of at most 256) waiting for the injector; a client that finds
/// the queue full waits (and is not read meanwhile).
const INJECT_QUEUE: usize = 16;

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
    /// The operating system gave no randomness for an internal client id.
    #[error("cannot draw random bytes for an internal client id: {0}")]
    Random(String),
    /// The credentials file is unusable.
    #[error("cannot read the broker's credentials: {0}")]
    Credentials(#[from] CredentialsError),
    /// The TLS listener cannot be set up.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The router refused an internal link.
    #[error("the embedded broker refused the internal link {role}: {source}")]
    Link {
        /// What the link is for.
        role: &'static str,
        /// Why.
        source: Box<LinkError>,
    },
}

type Connector =
    dyn Fn(&str, bool, u16) -> Result<(LinkTx, LinkRx, Notification), Box<LinkError>> + Send + Sync;

/// Handle to the running router. Cheap to clone.
#[derive(Clone)]
pub struct Router {
    connect: Arc<Connector>,
}

impl Router {
    /// Starts rumqttd's router on a thread of its own.
    pub fn spawn(config: &BrokerConfig) -> Router {
        let router_tx = rumqttd::Router::new(0, router_config(config)).spawn();
        let connect = move |client_id: &str, clean_session: bool, topic_alias_max: u16| {
            LinkBuilder::new(client_id, router_tx.clone())
                .clean_session(clean_session)
                .topic_alias_max(topic_alias_max)
                .build()
                .map_err(Box::new)
        };
        Router {
            connect: Arc::new(connect),
        }
    }

    /// Opens an in-process link for the gateway itself; `role` names it in the client id.
    pub fn internal_link(&self, role: &'static str) -> Result<(LinkTx, LinkRx), BrokerError> {
        let suffix = random_hex().map_err(|e| BrokerError::Random(e.to_string()))?;
        let client_id = format!("{INTERNAL_PREFIX}{role}-{suffix}");
        let (tx, rx, _ack) = (self.connect)(&client_id, true, 0)
            .map_err(|source| BrokerError::Link { role, source })?;
        Ok((tx, rx))
    }
}

/// 128 random bits from the operating system, as hex.
fn random_hex() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Sizes the router's in-memory logs.
///
/// Every subscription filter gets a log of `max_segment_count` segments; a subscriber that
/// falls more than that far behind skips messages. Ingest is not a subscriber (the injector
/// feeds it directly), so the logs only serve clients that subscribe, such as an operator
/// watching `alerts/#` or a dashboard on `sensors/#`, and are kept small: every message in a
/// log costs about three times its topic and payload in memory.
fn router_config(config: &BrokerConfig) -> RouterConfig {
    RouterConfig {
        // Internal links count as connections too.
        max_connections: config.max_connections + 16,
        max_outgoing_packet_count: 256,
        max_segment_size: 256 * 1024,
        max_segment_count: 4,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

/// The bound listeners, before they serve.
pub struct Listeners {
    v4: TcpListener,
    v5: Option<TcpListener>,
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
        let v4 = bind(config.listen, "MQTT 3.1.1").await?;
        let v5 = match config.listen_v5 {
            Some(addr) => Some(bind(addr, "MQTT 5").await?),
            None => None,
        };
        let tls = match &config.tls {
            Some(t) => {
                let acceptor = tls::acceptor(t)?;
                Some((bind(t.listen, "MQTT 3.1.1 over TLS").await?, acceptor))
            }
            None => None,
        };
        Ok(Listeners { v4, v5, tls })
    }

    /// The MQTT 3.1.1 address actually bound (useful with port 0).
    pub fn v4_addr(&self) -> SocketAddr {
        self.v4
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The MQTT 5 address actually bound, if any.
    pub fn v5_addr(&self) -> Option<SocketAddr> {
        self.v5
            .as_ref()
            .map(|l| l.local_addr().expect("a bound listener has an address"))
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
        let Pipes {
            router,
            injector,
            readings,
        } = pipes;
        let (inject, injected) = tokio::sync::mpsc::channel(INJECT_QUEUE);
        let watchers = Arc::new(connection::Watchers::default());
        let shared = Arc::new(connection::Shared {
            router,
            inject,
            watchers: watchers.clone(),
            gate,
            connect_timeout: config.connect_timeout,
            max_packet_bytes: config.max_packet_bytes(),
            max_connections: config.max_connections,
            stats,
            refusal_logged_at: Default::default(),
            retained: Default::default(),
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(connection::inject(
            injected, readings, watchers, injector.0, injector.1,
        ));
        tasks.spawn(accept_loop(self.v4, V4, None, shared.clone()));
        if let Some(v5) = self.v5 {
            tasks.spawn(accept_loop(v5, V5, None, shared.clone()));
        }
        if let Some((listener, acceptor)) = self.tls {
            tasks.spawn(accept_loop(listener, V4, Some(acceptor), shared));
        }
        shutdown.wait().await;
        // Dropping the set aborts the accept loops, and with them every connection task.
        tasks.shutdown().await;
    }
}

/// Where the broker front sends what clients publish.
pub(crate) struct Pipes {
    /// The router, for clients that subscribe (they get links of their own).
    pub(crate) router: Router,
    /// The injector's link into the router, for publishes that someone subscribed to.
    pub(crate) injector: (LinkTx, LinkRx),
    /// Batches of publishes for ingest; full when ingest is behind, and then the front waits.
    pub(crate) readings: tokio::sync::mpsc::Sender<Vec<rumqttd::protocol::Publish>>,
}

/// The gate for `config`: its credentials file read, and a warning if it lets in no one or
/// anyone.
pub(crate) fn gate(config: &BrokerConfig, sources: Vec<Source>) -> Result<Arc<Gate>, BrokerError> {
    let gate = Gate::new(
        config.allow_anonymous,
        &config.credentials,
        sources,
        config.max_publish_rate,
    )?;
    gate::warn_about(
        &gate,
        config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
    );
    Ok(Arc::new(gate))
}

/// Accepts connections and gives each a task of its own. Nothing here waits on a client: the
/// TLS handshake, like everything else a client does, runs in the connection's task.
async fn accept_loop<P: connection::Wire>(
    listener: TcpListener,
    protocol: P,
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
            None => connections.spawn(connection::serve(
                stream,
                peer,
                protocol.clone(),
                shared.clone(),
                slot,
            )),
            Some(acceptor) => connections.spawn(connection::serve_tls(
                stream,
                peer,
                protocol.clone(),
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

    #[test]
    fn internal_ids_are_random() {
        let (a, b) = (random_hex().unwrap(), random_hex().unwrap());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}

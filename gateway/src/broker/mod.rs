//! The embedded broker: rumqttd's router, with listeners and client connections owned by
//! Watchpost.
//!
//! rumqttd does the MQTT routing: subscriptions, retained messages, QoS 1/2 acknowledgement,
//! persistent sessions. Watchpost accepts the sockets itself ([`connection`]) and hands each
//! client to the router through an in-process link, because owning the socket is the only way
//! to bind `127.0.0.1:0` and report the port, to set `TCP_NODELAY`, to refuse client ids that
//! would take over an internal link, and to enforce limits before the router sees a byte.
//!
//! Ingest reads from an internal link as well. Its client id carries an unguessable suffix
//! and a reserved prefix that remote clients are refused, so no client can kick it off.

mod connection;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::{Notification, RouterConfig, SegmentConfig};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{error, warn};

use crate::config::BrokerConfig;
use crate::shutdown::Signal;
use crate::stats::Stats;

/// Client ids starting with this are reserved for the gateway's own links.
pub const INTERNAL_PREFIX: &str = "watchpost-internal-";

/// The filter ingest subscribes to.
pub const SENSOR_FILTER: &str = "sensors/#";

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
/// falls more than that far behind loses messages (the read cursor jumps). Ingest's filter
/// gets a deep log so that a burst is absorbed while ingest catches up; other filters
/// (operators watching `alerts/#`) get a small one.
fn router_config(config: &BrokerConfig) -> RouterConfig {
    let mut custom = HashMap::new();
    custom.insert(
        SENSOR_FILTER.to_owned(),
        SegmentConfig {
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 4,
        },
    );
    RouterConfig {
        // Internal links count as connections too.
        max_connections: config.max_connections + 16,
        max_outgoing_packet_count: 256,
        max_segment_size: 256 * 1024,
        max_segment_count: 4,
        custom_segment: Some(custom),
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

/// The bound listeners, before they serve.
pub struct Listeners {
    v4: TcpListener,
    v5: Option<TcpListener>,
}

impl Listeners {
    /// Binds the configured listeners; errors name the address and the reason.
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
        Ok(Listeners { v4, v5 })
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

    /// Serves clients until `shutdown`; then every client connection is closed.
    pub async fn serve(
        self,
        router: Router,
        config: &BrokerConfig,
        stats: Arc<Stats>,
        shutdown: Signal,
    ) {
        let shared = Arc::new(connection::Shared {
            router,
            connect_timeout: config.connect_timeout,
            max_packet_bytes: config.max_packet_bytes(),
            max_connections: config.max_connections,
            stats,
        });
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(self.v4, V4, shared.clone()));
        if let Some(v5) = self.v5 {
            tasks.spawn(accept_loop(v5, V5, shared));
        }
        shutdown.wait().await;
        // Dropping the set aborts the accept loops, and with them every connection task.
        tasks.shutdown().await;
    }
}

async fn accept_loop<P: connection::Wire>(
    listener: TcpListener,
    protocol: P,
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
            let now = tokio::time::Instant::now();
            if refused_logged_at.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60)) {
                refused_logged_at = Some(now);
                warn!(%peer, max = shared.max_connections, "connection refused: broker.max_connections reached (logged at most once a minute)");
            }
            drop(stream);
            continue;
        }
        connections.spawn(connection::serve(
            stream,
            peer,
            protocol.clone(),
            shared.clone(),
        ));
    }
}

/// True if `client_id` may be used by a remote client.
pub fn client_id_allowed(client_id: &str) -> bool {
    !client_id.starts_with(INTERNAL_PREFIX) && !client_id.contains(['+', '#', '/', '$', '\0'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    #[test]
    fn internal_and_invalid_client_ids_are_refused() {
        assert!(client_id_allowed("boiler-1"));
        assert!(!client_id_allowed("watchpost-internal-ingest-00"));
        assert!(!client_id_allowed("a/b"));
        assert!(!client_id_allowed("$sys"));
    }

    #[test]
    fn ingest_filter_covers_the_decoder_root() {
        assert_eq!(SENSOR_FILTER, format!("{}/#", codec::TOPIC_ROOT));
    }

    #[test]
    fn internal_ids_are_random() {
        let (a, b) = (random_hex().unwrap(), random_hex().unwrap());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}

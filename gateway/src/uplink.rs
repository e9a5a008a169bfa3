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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use tokio::time::Instant;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
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
    /// rustls refused the configuration.
    #[error("cannot set up TLS for the uplink: {0}")]
    Tls(#[from] rustls::Error),
}

/// A configured, not yet running uplink.
pub struct Uplink {
    options: MqttOptions,
    topic_prefix: String,
    target: String,
    keep_alive: Duration,
}

type Poll = Pin<Box<dyn Future<Output = (EventLoop, Result<Event, ConnectionError>)> + Send>>;
type Page = Pin<Box<dyn Future<Output = Vec<OutboxItem>> + Send>>;

impl Uplink {
    /// Checks the configuration (loads TLS roots) without connecting.
    pub fn prepare(config: &UplinkConfig) -> Result<Uplink, UplinkError> {
        let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
        options.set_keep_alive(config.keep_alive);
        // The uplink replays its own account; the broker must not hold a session for it.
        options.set_clean_session(true);
        options.set_inflight(WINDOW as u16);
        if config.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(system_tls()?),
            )));
        }
        let scheme = if config.tls { "mqtts" } else { "mqtt" };
        Ok(Uplink {
            options,
            topic_prefix: config.topic_prefix.clone(),
            target: format!("{scheme}://{}:{}", config.host, config.port),
            keep_alive: config.keep_alive,
        })
    }

    /// Runs until `shutdown`, sending what `store` commits to the outbox.
    pub async fn run(self, store: Store, stats: Arc<Stats>, shutdown: Signal) {
        let Uplink {
            options,
            topic_prefix,
            target,
            keep_alive,
        } = self;
        let (mut client, eventloop) = AsyncClient::new(options.clone(), WINDOW * 2);
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
                            connected = false;
                            stats.uplink_connected.store(false, Ordering::Relaxed);
                            failures = failures.saturating_add(1);
                            delay = backoff(failures, fastrand::f64());
                            let state = if failures == 1 { "lost" } else { "still down" };
                            warn!(upstream = %target, queued = Stats::get(&stats.outbox_depth), "uplink {state}: {}; retrying in {:.1}s", describe(&e), delay.as_secs_f64());
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
                    let (new_client, eventloop) = AsyncClient::new(options.clone(), WINDOW * 2);
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

fn describe(e: &ConnectionError) -> String {
    match e {
        ConnectionError::Io(io) => format!("network error: {io}"),
        ConnectionError::ConnectionRefused(code) => {
            format!("the broker refused the connection ({code:?})")
        }
        ConnectionError::NetworkTimeout => "connect timed out".into(),
        ConnectionError::MqttState(rumqttc::StateError::AwaitPingResp) => {
            "the broker stopped answering (no reply to the last keep-alive ping)".into()
        }
        ConnectionError::MqttState(s) => format!("protocol: {s}"),
        other => other.to_string(),
    }
}

/// TLS with the operating system's root certificates.
fn system_tls() -> Result<ClientConfig, UplinkError> {
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
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
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

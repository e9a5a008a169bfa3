//! The uplink: the one client of the upstream broker. Sends alerts with QoS 1 and counts an
//! alert as delivered only when its PUBACK arrives.
//!
//! rumqttc's `publish` returning `Ok` only means queued, and its eventloop forgets its queue
//! when the broker answers `session_present = false`; so the uplink keeps its own queue of
//! unacknowledged alerts ([`Pending`]) and, after every (re)connect, sends them again in order.
//! Duplicates that this may cause upstream carry the same alert id.
//!
//! `poll()` has no backoff of its own: failed connects are retried after a capped exponential
//! delay with jitter ([`backoff`]). The gateway serves locally whether or not the upstream is
//! reachable.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS,
    TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tracing::{debug, info, warn};

use crate::config::UplinkConfig;
use crate::shutdown::Signal;
use crate::stats::Stats;

/// Most alerts sent and not yet acknowledged at once.
pub const WINDOW: usize = 64;
/// First retry delay after a failed connection.
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest retry delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long shutdown waits for acknowledgements of alerts already sent.
pub const FLUSH_GRACE: Duration = Duration::from_millis(1000);

/// One alert on its way upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct UplinkItem {
    /// Alert id, for logs.
    pub id: String,
    /// Topic below the upstream prefix (`alerts/{severity}/{device}/{rule}`).
    pub topic: String,
    /// The alert document.
    pub payload: Bytes,
}

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
}

impl Uplink {
    /// Checks the configuration (loads TLS roots) without connecting.
    pub fn prepare(config: &UplinkConfig) -> Result<Uplink, UplinkError> {
        let mut options = MqttOptions::new(&config.client_id, &config.host, config.port);
        options.set_keep_alive(config.keep_alive);
        // The uplink replays its own queue; the broker must not hold a session for it.
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
        })
    }

    /// Runs until `shutdown`, taking alerts from `rx`.
    pub async fn run(
        self,
        mut rx: mpsc::UnboundedReceiver<UplinkItem>,
        stats: Arc<Stats>,
        shutdown: Signal,
    ) {
        let Uplink {
            options,
            topic_prefix,
            target,
        } = self;
        let (client, eventloop) = AsyncClient::new(options, WINDOW * 2);
        let mut pending = Pending::default();
        let mut connected = false;
        let mut failures: u32 = 0;
        let mut rx_open = true;
        // The eventloop lives inside this future and is never dropped mid-poll: a poll that is
        // cancelled halfway could lose a request or leave a half-written packet.
        let mut poll = Box::pin(poll_after(eventloop, Duration::ZERO));
        let shutdown_wait = shutdown.clone().wait();
        tokio::pin!(shutdown_wait);
        loop {
            tokio::select! {
                _ = &mut shutdown_wait => break,
                (eventloop, event) = &mut poll => {
                    let mut delay = Duration::ZERO;
                    match event {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            connected = true;
                            stats.uplink_connected.store(true, Ordering::Relaxed);
                            if failures > 0 || pending.len() > 0 {
                                info!(upstream = %target, queued = pending.len(), "uplink connected; sending queued alerts");
                            } else {
                                info!(upstream = %target, "uplink connected");
                            }
                            failures = 0;
                            pending.restart();
                        }
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => pending.sent(pkid),
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            if let Some(item) = pending.acked(ack.pkid) {
                                Stats::inc(&stats.uplink_acked);
                                debug!(id = %item.id, "alert acknowledged upstream");
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            connected = false;
                            stats.uplink_connected.store(false, Ordering::Relaxed);
                            failures = failures.saturating_add(1);
                            delay = backoff(failures, fastrand::f64());
                            warn!(upstream = %target, queued = pending.len(), "uplink {}: {}; retrying in {:.1}s", if failures == 1 { "lost" } else { "still down" }, describe(&e), delay.as_secs_f64());
                            pending.restart();
                        }
                    }
                    poll.set(poll_after(eventloop, delay));
                }
                item = rx.recv(), if rx_open => match item {
                    Some(item) => {
                        Stats::inc(&stats.uplink_queued);
                        pending.push(item);
                    }
                    None => rx_open = false,
                },
            }
            if connected {
                pending.send_window(&client, &topic_prefix);
            }
        }

        // Shutdown: give alerts already sent a moment to be acknowledged.
        if connected && pending.in_flight() > 0 {
            let _ = tokio::time::timeout(FLUSH_GRACE, async {
                while pending.in_flight() > 0 {
                    let (eventloop, event) = (&mut poll).await;
                    match event {
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) => pending.sent(pkid),
                        Ok(Event::Incoming(Packet::PubAck(ack))) => {
                            if pending.acked(ack.pkid).is_some() {
                                Stats::inc(&stats.uplink_acked);
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                    poll.set(poll_after(eventloop, Duration::ZERO));
                }
            })
            .await;
        }
        // Say goodbye properly if we can; the eventloop must run to send the DISCONNECT.
        if connected && client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                loop {
                    let (eventloop, event) = (&mut poll).await;
                    if matches!(event, Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)) {
                        break;
                    }
                    poll.set(poll_after(eventloop, Duration::ZERO));
                }
            })
            .await;
        }
        if pending.len() > 0 {
            warn!(upstream = %target, unsent = pending.len(), "uplink stopped with alerts not yet acknowledged upstream");
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

/// Delay before retry number `attempt` (1-based): doubling from [`BACKOFF_MIN`] up to
/// [`BACKOFF_MAX`], with "equal jitter": half fixed, half random (`jitter` in `[0, 1)`), so
/// that many gateways that lost the same broker do not come back in lockstep.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let exp = BACKOFF_MIN
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_MAX);
    exp / 2 + exp.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
}

/// Alerts not yet acknowledged, and which of them are on the wire under which packet id.
#[derive(Debug, Default)]
struct Pending {
    queue: BTreeMap<u64, UplinkItem>,
    next_seq: u64,
    /// First queue key not yet handed to the client in this connection.
    next_send: u64,
    /// Handed to the client, waiting for the eventloop to assign a packet id (in order).
    handed: VecDeque<u64>,
    /// On the wire: packet id → queue key.
    inflight: HashMap<u16, u64>,
}

impl Pending {
    fn push(&mut self, item: UplinkItem) {
        self.queue.insert(self.next_seq, item);
        self.next_seq += 1;
    }

    fn len(&self) -> usize {
        self.queue.len()
    }

    fn in_flight(&self) -> usize {
        self.handed.len() + self.inflight.len()
    }

    /// A new connection: nothing is on the wire any more; start again from the oldest.
    fn restart(&mut self) {
        self.handed.clear();
        self.inflight.clear();
        self.next_send = 0;
    }

    /// Hands queued alerts to the client while the window has room.
    fn send_window(&mut self, client: &AsyncClient, prefix: &str) {
        while self.in_flight() < WINDOW {
            let Some((&key, item)) = self.queue.range(self.next_send..).next() else {
                break;
            };
            let topic = format!("{prefix}/{}", item.topic);
            match client.try_publish(topic, QoS::AtLeastOnce, true, item.payload.to_vec()) {
                Ok(()) => {
                    self.handed.push_back(key);
                    self.next_send = key + 1;
                }
                Err(e) => {
                    debug!(error = %e, "uplink request queue full; will retry");
                    break;
                }
            }
        }
    }

    /// The eventloop put the next handed alert on the wire as `pkid`.
    fn sent(&mut self, pkid: u16) {
        if let Some(key) = self.handed.pop_front() {
            self.inflight.insert(pkid, key);
        }
    }

    /// `pkid` was acknowledged: the alert is delivered.
    fn acked(&mut self, pkid: u16) -> Option<UplinkItem> {
        let key = self.inflight.remove(&pkid)?;
        self.queue.remove(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str) -> UplinkItem {
        UplinkItem {
            id: id.into(),
            topic: format!("alerts/critical/d/{id}"),
            payload: Bytes::from_static(b"{}"),
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

    #[test]
    fn only_acknowledged_alerts_leave_the_queue_and_the_rest_are_resent_in_order() {
        let (client, _eventloop) =
            AsyncClient::new(MqttOptions::new("t", "localhost", 1883), WINDOW * 2);
        let mut p = Pending::default();
        for id in ["a", "b", "c"] {
            p.push(item(id));
        }
        p.send_window(&client, "site");
        assert_eq!(p.in_flight(), 3);
        p.sent(7);
        p.sent(8);
        assert_eq!(p.acked(8).map(|i| i.id), Some("b".into()));
        assert_eq!(p.acked(8), None, "an ack counts once");
        // The connection drops before "a" and "c" are acknowledged.
        p.restart();
        assert_eq!(p.in_flight(), 0);
        p.send_window(&client, "site");
        let order: Vec<_> = p.handed.iter().map(|k| p.queue[k].id.clone()).collect();
        assert_eq!(order, ["a", "c"]);
    }
}

//! Counters that every part of the gateway updates and anyone may read: the CLI, tests and,
//! later, the metrics endpoint. Cheap to update (relaxed atomics) and never blocking the hot
//! path: per-device counters are owned by ingest and copied here about once a second.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::Serialize;

use crate::loss::LossCounters;

/// Key under which messages whose topic names no device are counted.
pub const OTHER_DEVICES: &str = "-";

/// Counters of one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeviceCounters {
    /// Messages received (duplicates included).
    pub messages: u64,
    /// Readings decoded and used.
    pub readings: u64,
    /// Malformed messages and fields.
    pub decode_errors: u64,
    /// Fields of foreign payloads that are neither numbers nor known states: not read, not
    /// errors.
    pub unmapped: u64,
    /// What the device's `seq` says about the way.
    pub loss: LossCounters,
    /// Last message, ms since the epoch.
    pub last_seen_ms: u64,
}

impl DeviceCounters {
    /// `self - earlier`, for counters that only grow (`last_seen_ms` is taken as is).
    pub fn since(&self, earlier: &DeviceCounters) -> DeviceCounters {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        DeviceCounters {
            messages: d(self.messages, earlier.messages),
            readings: d(self.readings, earlier.readings),
            decode_errors: d(self.decode_errors, earlier.decode_errors),
            unmapped: d(self.unmapped, earlier.unmapped),
            loss: LossCounters {
                lost: d(self.loss.lost, earlier.loss.lost),
                duplicated: d(self.loss.duplicated, earlier.loss.duplicated),
                out_of_order: d(self.loss.out_of_order, earlier.loss.out_of_order),
                restarts: d(self.loss.restarts, earlier.loss.restarts),
            },
            last_seen_ms: self.last_seen_ms,
        }
    }
}

/// What was refused to one client (by name; anonymous clients together).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ClientRefusals {
    /// Publishes on topics that are not the client's.
    pub publish_denied: u64,
    /// Subscriptions to filters that are not the client's.
    pub subscribe_denied: u64,
    /// Publishes over the rate limit.
    pub rate_limited: u64,
}

/// The outcome of the last attempt to reload the rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ReloadRecord {
    /// When, ms since the epoch.
    pub at_ms: u64,
    /// True if the new rules are in force.
    pub ok: bool,
    /// What happened, in a sentence.
    pub detail: String,
}

/// Gateway-wide counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// When the gateway started, ms since the epoch.
    pub started_ms: AtomicU64,
    /// Client connections open now.
    pub connections: AtomicU64,
    /// MQTT bytes read from clients.
    pub bytes_in: AtomicU64,
    /// Sensor messages taken from the broker.
    pub messages: AtomicU64,
    /// Readings decoded (a message may hold several).
    pub readings: AtomicU64,
    /// Malformed messages and fields, all devices.
    pub decode_errors: AtomicU64,
    /// Fields of foreign payloads not read (neither numbers nor known states), by source.
    pub unmapped_by_source: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
    /// Duplicate messages dropped (from `seq`), all devices.
    pub duplicates: AtomicU64,
    /// Messages missing from devices' `seq` when a gap was seen, all devices.
    pub seq_gap_messages: AtomicU64,
    /// Messages that arrived after a higher `seq`, all devices.
    pub seq_late: AtomicU64,
    /// Time spent judging messages (decode, rules, rollups), in nanoseconds.
    pub ingest_nanos: AtomicU64,
    /// Messages judged, for `ingest_nanos`.
    pub ingest_count: AtomicU64,
    /// Last time the ingest loop went round, on [`monotonic_ms`]: it must keep moving. Not the
    /// wall clock, whose steps would make a working loop look stalled, or a stalled one alive.
    pub ingest_heartbeat_ms: AtomicU64,
    /// Alerts raised.
    pub alerts_raised: AtomicU64,
    /// Alerts cleared.
    pub alerts_cleared: AtomicU64,
    /// Alerts raised, by severity (info, warning, critical).
    pub raised_by_severity: [AtomicU64; 3],
    /// Alerts cleared, by severity (info, warning, critical).
    pub cleared_by_severity: [AtomicU64; 3],
    /// Alerts raised now.
    pub alerts_active: AtomicU64,
    /// Devices heard from recently and not offline.
    pub devices_online: AtomicU64,
    /// Devices whose last word was `offline`.
    pub devices_offline: AtomicU64,
    /// Devices not heard from for longer than `gateway.stale_after`.
    pub devices_stale: AtomicU64,
    /// Devices forgotten: silent for `gateway.forget_after` with every rule at rest, dropped
    /// from memory (their counters and history stay in the database).
    pub devices_forgotten: AtomicU64,
    /// MQTT bytes every reading would have cost upstream (QoS 1 PUBLISH and PUBACK), the
    /// baseline of the reduction ratio.
    pub forward_all_bytes: AtomicU64,
    /// MQTT bytes exchanged with the upstream broker, counted from the packets.
    pub upstream_bytes: AtomicU64,
    /// Copies of the device list that ingest made for the status page (at most one a second).
    pub page_device_lists: AtomicU64,
    /// Microseconds ingest spent making them: what the page costs the ingest path.
    pub page_device_list_us: AtomicU64,
    /// Rows waiting in the outbox.
    pub outbox_depth: AtomicU64,
    /// When the oldest outbox row was queued (ms since the epoch; 0 if none).
    pub outbox_oldest_ms: AtomicU64,
    /// Outbox rows acknowledged by the upstream broker (PUBACK).
    pub uplink_acked: AtomicU64,
    /// Outbox rows the upstream would not take on a connection (an MQTT 5 PUBACK with an error
    /// reason code, or a row over the upstream's limits); they stay in the outbox.
    pub uplink_held: AtomicU64,
    /// The upstream broker accepted our connection and answers; false after a failure or
    /// when acknowledgements stop arriving.
    pub uplink_connected: AtomicBool,
    /// History rows dropped to keep the database within its budget.
    pub history_evicted: AtomicU64,
    /// History rows (raw readings, rollups) not written because the data directory's file
    /// system was full or the database failed.
    pub history_shed: AtomicU64,
    /// The data directory's file system is full: history is shed, alerts and the outbox use
    /// the reserve.
    pub disk_full: AtomicBool,
    /// Clients refused at CONNECT: wrong or missing credentials, a name or will not theirs.
    pub auth_failures: AtomicU64,
    /// Site pair: 1 while the mirror to the peer's broker is connected.
    pub peer_link_up: AtomicU64,
    /// Site pair: frames waiting for the peer's acknowledgement, and their bytes.
    pub peer_backlog_frames: AtomicU64,
    /// See `peer_backlog_frames`.
    pub peer_backlog_bytes: AtomicU64,
    /// Site pair: memory the catch-up ring holds (entries and their bytes, at most
    /// `peer::RING_BYTES`).
    pub peer_catchup_bytes: AtomicU64,
    /// Site pair: batches ingest handed to the mirror that it has not taken yet.
    pub peer_mirror_queue: AtomicU64,
    /// Site pair: mirrored publishes dropped because the backlog was full.
    pub peer_mirror_dropped: AtomicU64,
    /// Site pair: frames and publishes sent to the peer (again after a reconnect).
    pub peer_frames_sent: AtomicU64,
    /// See `peer_frames_sent`.
    pub peer_entries_sent: AtomicU64,
    /// Site pair: devices' acknowledgements given without the peer's, after the wait.
    pub peer_ack_timeouts: AtomicU64,
    /// Site pair: monotonic ms (`monotonic_ms`) of the last frame from the peer; 0: none yet.
    pub peer_heard_ms: AtomicU64,
    /// Site pair: how far behind this gateway's wall clock the peer's last watermark was.
    pub peer_lag_ms: AtomicU64,
    /// Site pair: frames received from the peer.
    pub peer_frames_received: AtomicU64,
    /// Site pair: mirrored publishes judged, seen before (sent again), and missing.
    pub peer_entries_received: AtomicU64,
    /// See `peer_entries_received`.
    pub peer_entries_duplicate: AtomicU64,
    /// See `peer_entries_received`.
    pub peer_entries_gap: AtomicU64,
    /// Site pair: alerts the peer says it has raised (as of its last frame).
    pub peer_alerts_raised: AtomicU64,
    /// Site pair: `monotonic_ms` since when the peer's raised alerts differ from this
    /// gateway's; 0 while they agree.
    pub peer_differs_since_ms: AtomicU64,
    /// Site pair: publishes sent to the peer in catch-ups (when its link came up).
    pub peer_entries_replayed: AtomicU64,
    /// Site pair: 1 while the peer's devices' deadlines follow the peer's time; 0 once it
    /// has been silent for `peer.takeover_after` (this gateway judges them alone).
    pub peer_active: AtomicU64,
    /// TLS handshakes that failed.
    pub tls_failures: AtomicU64,
    /// Connections closed because the client broke the MQTT protocol.
    pub protocol_errors: AtomicU64,
    /// Connections refused because `broker.max_connections` were open.
    pub connections_refused: AtomicU64,
    /// Publishes refused: a topic the client may not publish on.
    pub publish_denied: AtomicU64,
    /// Subscriptions refused: a filter the client may not subscribe to.
    pub subscribe_denied: AtomicU64,
    /// Publishes dropped by the per-device rate limit.
    pub rate_limited: AtomicU64,
    /// Messages for a session dropped because its queue was full (a client offline or not
    /// reading).
    pub queue_dropped: AtomicU64,
    /// Messages not delivered because their MQTT 5 expiry interval passed.
    pub messages_expired: AtomicU64,
    /// Messages not sent to a client because they exceed its maximum packet size.
    pub too_large_for_client: AtomicU64,
    /// Retained messages refused: a new topic beyond `broker.max_retained_messages` or
    /// `max_retained_bytes`.
    pub retained_refused: AtomicU64,
    /// Broker sessions with a client connected (clients that subscribed or keep a session).
    pub sessions_online: AtomicU64,
    /// Broker sessions kept for clients that are away.
    pub sessions_offline: AtomicU64,
    /// Messages waiting in the sessions' queues.
    pub queued_messages: AtomicU64,
    /// Topics with a retained message.
    pub retained_messages: AtomicU64,
    clients: Mutex<BTreeMap<String, ClientRefusals>>,
    devices: Mutex<BTreeMap<String, DeviceCounters>>,
    last_reload: Mutex<Option<ReloadRecord>>,
}

impl Stats {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets a gauge.
    pub fn set(gauge: &AtomicU64, value: u64) {
        gauge.store(value, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Replaces the copies of the given devices' counters.
    pub fn update_devices<'a>(
        &self,
        devices: impl IntoIterator<Item = (&'a str, &'a DeviceCounters)>,
    ) {
        let mut map = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        for (name, counters) in devices {
            match map.get_mut(name) {
                Some(c) => *c = counters.clone(),
                None => {
                    map.insert(name.to_owned(), counters.clone());
                }
            }
        }
    }

    /// Drops the copies of the counters of devices ingest forgot.
    pub fn forget_devices<'a>(&self, devices: impl IntoIterator<Item = &'a str>) {
        let mut map = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        for name in devices {
            map.remove(name);
        }
    }

    /// The latest copy of `device`'s counters (about a second old at most).
    pub fn device(&self, device: &str) -> Option<DeviceCounters> {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(device)
            .cloned()
    }

    /// Malformed messages and fields counted for `device` ([`OTHER_DEVICES`] for none).
    pub fn decode_errors_of(&self, device: &str) -> u64 {
        self.device(device).map_or(0, |c| c.decode_errors)
    }

    /// Notes the outcome of a reload.
    pub fn record_reload(&self, ok: bool, detail: impl Into<String>) {
        let record = ReloadRecord {
            at_ms: crate::alert::now_millis(),
            ok,
            detail: detail.into(),
        };
        *self.last_reload.lock().unwrap_or_else(|p| p.into_inner()) = Some(record);
    }

    /// The outcome of the last reload, if any.
    pub fn last_reload(&self) -> Option<ReloadRecord> {
        self.last_reload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Counts a transition of an alert of `severity`.
    pub fn count_transition(&self, severity: crate::rules::Severity, raised: bool) {
        let i = severity as usize;
        if raised {
            Self::inc(&self.alerts_raised);
            Self::inc(&self.raised_by_severity[i]);
        } else {
            Self::inc(&self.alerts_cleared);
            Self::inc(&self.cleared_by_severity[i]);
        }
    }

    /// Counts a refusal of `client` (a name, or the key of anonymous clients).
    pub fn count_refusal(&self, client: &str, count: impl FnOnce(&mut ClientRefusals)) {
        let mut map = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        match map.get_mut(client) {
            Some(c) => count(c),
            None => count(map.entry(client.to_owned()).or_default()),
        }
    }

    /// Refusals by client.
    pub fn client_refusals(&self) -> BTreeMap<String, ClientRefusals> {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every device's counters.
    pub fn devices(&self) -> BTreeMap<String, DeviceCounters> {
        self.devices
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Milliseconds on a monotonic clock that starts with the first call in this process: for
/// heartbeats, which a step of the wall clock must not move.
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_copies_are_replaced_not_added() {
        let s = Stats::default();
        let mut c = DeviceCounters {
            messages: 1,
            ..Default::default()
        };
        s.update_devices([("a", &c)]);
        c.messages = 5;
        c.decode_errors = 2;
        s.update_devices([("a", &c)]);
        assert_eq!(s.device("a").map(|d| d.messages), Some(5));
        assert_eq!(s.decode_errors_of("a"), 2);
        assert_eq!(s.decode_errors_of("b"), 0);
    }

    #[test]
    fn deltas_of_growing_counters() {
        let mut a = DeviceCounters {
            messages: 10,
            last_seen_ms: 5,
            ..Default::default()
        };
        a.loss.lost = 3;
        let mut b = a.clone();
        b.messages = 15;
        b.loss.lost = 4;
        b.last_seen_ms = 9;
        let d = b.since(&a);
        assert_eq!((d.messages, d.loss.lost, d.last_seen_ms), (5, 1, 9));
    }
}

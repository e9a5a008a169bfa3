//! The gateway's counters in the Prometheus text exposition format (version 0.0.4), and the
//! status summary that `watchpost status` prints. Pure: counters in, text out.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::alert::now_millis;
use crate::rules::Severity;
use crate::stats::{ClientRefusals, ReloadRecord, Stats};

/// What the endpoint knows besides the counters.
#[derive(Debug, Clone)]
pub struct Info {
    /// Gateway (site) id.
    pub gateway: String,
    /// `mqtt[s]://host:port` of the upstream, if configured.
    pub upstream: Option<String>,
    /// One of a site pair: the peer's id and address, and its `takeover_after`.
    pub peer: Option<PeerInfo>,
}

/// The other gateway of a site pair, as configured.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    /// Its gateway id.
    pub name: String,
    /// Its MQTT listener.
    pub address: String,
    /// How long its silence is waited out before this gateway takes its devices over.
    pub takeover_after: std::time::Duration,
}

/// The site pair's state, for status and readiness.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct PeerStatus {
    /// The peer's gateway id.
    pub name: String,
    /// Its MQTT listener.
    pub address: String,
    /// The mirror to the peer's broker is connected.
    pub mirror_up: bool,
    /// Seconds since the peer's last frame (`None`: never heard since start).
    pub heard_seconds_ago: Option<f64>,
    /// How far the peer's last watermark was behind this gateway's clock, in ms.
    pub lag_ms: u64,
    /// The peer's devices' deadlines follow the peer's time (false: taken over).
    pub active: bool,
    /// Frames waiting for the peer's acknowledgement.
    pub backlog_frames: u64,
    /// Alerts the peer has raised, as of its last frame.
    pub alerts_raised: u64,
    /// Seconds for which the peer's raised alerts have differed from this gateway's (0:
    /// they agree).
    pub alerts_differ_seconds: f64,
}

/// The site pair's state now, if this gateway is one of a pair.
pub fn peer_status(stats: &Stats, info: &Info) -> Option<PeerStatus> {
    let p = info.peer.as_ref()?;
    let g = Stats::get;
    let now = crate::stats::monotonic_ms();
    let heard = g(&stats.peer_heard_ms);
    let differs = g(&stats.peer_differs_since_ms);
    Some(PeerStatus {
        name: p.name.clone(),
        address: p.address.clone(),
        mirror_up: g(&stats.peer_link_up) == 1,
        heard_seconds_ago: (heard != 0).then(|| now.saturating_sub(heard) as f64 / 1000.0),
        lag_ms: g(&stats.peer_lag_ms),
        active: g(&stats.peer_active) == 1,
        backlog_frames: g(&stats.peer_backlog_frames),
        alerts_raised: g(&stats.peer_alerts_raised),
        alerts_differ_seconds: if differs == 0 {
            0.0
        } else {
            now.saturating_sub(differs) as f64 / 1000.0
        },
    })
}

const SEVERITIES: [Severity; 3] = [Severity::Info, Severity::Warning, Severity::Critical];

struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.0, "{name}{labels} {value}");
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, "counter", help);
        self.sample(name, "", value);
    }

    fn gauge(&mut self, name: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, "gauge", help);
        self.sample(name, "", value);
    }
}

/// Renders every metric.
pub fn render(stats: &Stats, info: &Info) -> String {
    let g = Stats::get;
    let now = now_millis();
    let mut o = Out(String::with_capacity(4096));
    o.family(
        "watchpost_info",
        "gauge",
        "Constant 1, labelled with the version and the gateway id.",
    );
    o.sample(
        "watchpost_info",
        &format!(
            "{{version=\"{}\",gateway=\"{}\"}}",
            env!("CARGO_PKG_VERSION"),
            info.gateway
        ),
        1,
    );
    o.gauge(
        "watchpost_uptime_seconds",
        "Seconds since the gateway started.",
        now.saturating_sub(g(&stats.started_ms)) as f64 / 1000.0,
    );
    o.gauge(
        "watchpost_connections",
        "MQTT client connections open now.",
        g(&stats.connections),
    );
    o.counter(
        "watchpost_bytes_in_total",
        "MQTT bytes read from clients.",
        g(&stats.bytes_in),
    );
    o.counter(
        "watchpost_messages_total",
        "Sensor messages taken from the broker.",
        g(&stats.messages),
    );
    o.counter(
        "watchpost_readings_total",
        "Readings decoded and judged.",
        g(&stats.readings),
    );
    o.counter(
        "watchpost_decode_errors_total",
        "Malformed sensor messages and fields.",
        g(&stats.decode_errors),
    );
    let unmapped = stats
        .unmapped_by_source
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if !unmapped.is_empty() {
        let name = "watchpost_unmapped_fields_total";
        o.family(
            name,
            "counter",
            "Fields of foreign payloads that are neither numbers nor known states (not read, not errors), by source.",
        );
        for (source, n) in &unmapped {
            o.sample(name, &format!("{{source=\"{source}\"}}"), n);
        }
    }
    o.counter(
        "watchpost_seq_gap_messages_total",
        "Messages missing from devices' seq when a gap was seen.",
        g(&stats.seq_gap_messages),
    );
    o.counter(
        "watchpost_seq_duplicates_total",
        "Duplicate messages dropped, from devices' seq.",
        g(&stats.duplicates),
    );
    o.counter(
        "watchpost_seq_late_total",
        "Messages that arrived after a higher seq.",
        g(&stats.seq_late),
    );
    for (name, help, values) in [
        (
            "watchpost_alerts_raised_total",
            "Alerts raised, by severity.",
            &stats.raised_by_severity,
        ),
        (
            "watchpost_alerts_cleared_total",
            "Alerts cleared, by severity.",
            &stats.cleared_by_severity,
        ),
    ] {
        o.family(name, "counter", help);
        for (sev, value) in SEVERITIES.iter().zip(values.iter()) {
            o.sample(
                name,
                &format!("{{severity=\"{}\"}}", sev.as_str()),
                g(value),
            );
        }
    }
    o.gauge(
        "watchpost_alerts_active",
        "Alerts raised now.",
        g(&stats.alerts_active),
    );
    o.family("watchpost_devices", "gauge", "Devices by state: online, offline (their last word), stale (not heard from for gateway.stale_after).");
    for (state, value) in [
        ("online", &stats.devices_online),
        ("offline", &stats.devices_offline),
        ("stale", &stats.devices_stale),
    ] {
        o.sample(
            "watchpost_devices",
            &format!("{{state=\"{state}\"}}"),
            g(value),
        );
    }
    o.counter(
        "watchpost_devices_forgotten_total",
        "Devices dropped from memory after gateway.forget_after of silence with every rule at rest; their counters and history stay in the database.",
        g(&stats.devices_forgotten),
    );
    o.gauge(
        "watchpost_outbox_depth",
        "Messages waiting in the outbox for the upstream's acknowledgement.",
        g(&stats.outbox_depth),
    );
    let oldest = g(&stats.outbox_oldest_ms);
    let age = if oldest == 0 {
        0.0
    } else {
        now.saturating_sub(oldest) as f64 / 1000.0
    };
    o.gauge(
        "watchpost_outbox_oldest_age_seconds",
        "Age of the oldest message in the outbox (0 if empty).",
        age,
    );
    o.gauge(
        "watchpost_uplink_configured",
        "1 if an upstream broker is configured.",
        u8::from(info.upstream.is_some()),
    );
    o.gauge(
        "watchpost_uplink_connected",
        "1 while the upstream broker accepts us and acknowledges.",
        u8::from(
            stats
                .uplink_connected
                .load(std::sync::atomic::Ordering::Relaxed),
        ),
    );
    o.counter(
        "watchpost_uplink_acked_total",
        "Outbox messages acknowledged by the upstream broker.",
        g(&stats.uplink_acked),
    );
    if let Some(p) = peer_status(stats, info) {
        o.gauge(
            "watchpost_peer_mirror_up",
            "Site pair: 1 while the mirror to the peer's broker is connected.",
            u8::from(p.mirror_up),
        );
        o.gauge(
            "watchpost_peer_last_heard_seconds",
            "Site pair: seconds since the peer's last frame (-1: not heard since start).",
            p.heard_seconds_ago.unwrap_or(-1.0),
        );
        o.gauge(
            "watchpost_peer_lag_seconds",
            "Site pair: how far the peer's last watermark was behind this gateway's clock.",
            p.lag_ms as f64 / 1000.0,
        );
        o.gauge(
            "watchpost_peer_active",
            "Site pair: 1 while the peer's devices' deadlines follow its time; 0 once taken over.",
            u8::from(p.active),
        );
        o.gauge(
            "watchpost_peer_backlog_frames",
            "Site pair: mirror frames waiting for the peer's acknowledgement.",
            p.backlog_frames,
        );
        o.gauge(
            "watchpost_peer_backlog_bytes",
            "Site pair: bytes of those frames.",
            g(&stats.peer_backlog_bytes),
        );
        o.gauge(
            "watchpost_peer_catchup_bytes",
            "Site pair: memory the catch-up kept for the peer takes (what was judged over the horizon; at most 32 MiB).",
            g(&stats.peer_catchup_bytes),
        );
        o.gauge(
            "watchpost_peer_mirror_queue",
            "Site pair: batches of readings ingest handed to the mirror that it has not taken yet.",
            g(&stats.peer_mirror_queue),
        );
        o.gauge(
            "watchpost_peer_alerts_raised",
            "Site pair: alerts the peer has raised, as of its last frame.",
            p.alerts_raised,
        );
        o.gauge(
            "watchpost_peer_alerts_differ_seconds",
            "Site pair: seconds for which the peer's raised alerts have differed from this gateway's (0: they agree).",
            p.alerts_differ_seconds,
        );
        for (name, help, value) in [
            (
                "watchpost_peer_entries_sent_total",
                "Site pair: publishes mirrored to the peer (again after a reconnect).",
                &stats.peer_entries_sent,
            ),
            (
                "watchpost_peer_entries_replayed_total",
                "Site pair: publishes sent in catch-ups when the link came up.",
                &stats.peer_entries_replayed,
            ),
            (
                "watchpost_peer_entries_received_total",
                "Site pair: the peer's publishes judged here.",
                &stats.peer_entries_received,
            ),
            (
                "watchpost_peer_entries_duplicate_total",
                "Site pair: the peer's publishes received again and skipped.",
                &stats.peer_entries_duplicate,
            ),
            (
                "watchpost_peer_entries_gap_total",
                "Site pair: the peer's publishes missing from its stream.",
                &stats.peer_entries_gap,
            ),
            (
                "watchpost_peer_mirror_dropped_total",
                "Site pair: publishes dropped from a full backlog for the peer.",
                &stats.peer_mirror_dropped,
            ),
            (
                "watchpost_peer_ack_timeouts_total",
                "Site pair: device acknowledgements given without the peer's, after waiting 2 s.",
                &stats.peer_ack_timeouts,
            ),
        ] {
            o.counter(name, help, g(value));
        }
    }
    o.gauge(
        "watchpost_disk_full",
        "1 while the data directory's file system is full: history is shed, alerts and the outbox use the reserve.",
        u8::from(stats.disk_full.load(std::sync::atomic::Ordering::Relaxed)),
    );
    o.counter(
        "watchpost_history_shed_total",
        "History rows (raw readings, rollups) not written because the disk was full or the database failed.",
        g(&stats.history_shed),
    );
    o.counter(
        "watchpost_uplink_held_total",
        "Times an outbox message was refused by the upstream or over its limits; it stays in the outbox.",
        g(&stats.uplink_held),
    );
    let upstream = g(&stats.upstream_bytes);
    let baseline = g(&stats.forward_all_bytes);
    o.counter(
        "watchpost_upstream_bytes_total",
        "MQTT bytes exchanged with the upstream broker, counted from the packets.",
        upstream,
    );
    o.counter("watchpost_forward_all_bytes_total", "MQTT bytes a bridge forwarding every sensor message upstream would have exchanged (QoS 1).", baseline);
    let ratio = if baseline == 0 {
        0.0
    } else {
        upstream as f64 / baseline as f64
    };
    o.gauge("watchpost_upstream_ratio", "watchpost_upstream_bytes_total / watchpost_forward_all_bytes_total: the share of a forward-everything bridge's upstream traffic.", ratio);
    o.counter(
        "watchpost_page_device_lists_total",
        "Copies of the device list that ingest made for the status page (at most one a second, however many pages are open).",
        g(&stats.page_device_lists),
    );
    o.family(
        "watchpost_page_device_list_seconds_total",
        "counter",
        "Time the ingest task spent copying the device list for the status page: all a page view costs the ingest path.",
    );
    o.sample(
        "watchpost_page_device_list_seconds_total",
        "",
        g(&stats.page_device_list_us) as f64 / 1e6,
    );
    o.counter(
        "watchpost_history_evicted_total",
        "History rows dropped to keep the database within its budget.",
        g(&stats.history_evicted),
    );
    o.family(
        "watchpost_ingest_seconds",
        "summary",
        "Time spent judging sensor messages: decode, loss accounting, rules, rollups.",
    );
    o.sample(
        "watchpost_ingest_seconds_sum",
        "",
        g(&stats.ingest_nanos) as f64 / 1e9,
    );
    o.sample("watchpost_ingest_seconds_count", "", g(&stats.ingest_count));
    o.counter(
        "watchpost_auth_failures_total",
        "Clients refused at CONNECT: wrong or missing credentials, or a client id or last will that is not theirs.",
        g(&stats.auth_failures),
    );
    o.counter(
        "watchpost_tls_handshake_failures_total",
        "TLS handshakes on the broker's TLS listener that failed.",
        g(&stats.tls_failures),
    );
    o.counter(
        "watchpost_protocol_errors_total",
        "Client connections closed because the client broke the MQTT protocol.",
        g(&stats.protocol_errors),
    );
    o.counter(
        "watchpost_connections_refused_total",
        "Connections refused because broker.max_connections were open.",
        g(&stats.connections_refused),
    );
    o.counter(
        "watchpost_broker_queue_dropped_total",
        "Messages for a broker session dropped because its queue was full (broker.max_queued_messages or max_queued_bytes): a client away or not reading.",
        g(&stats.queue_dropped),
    );
    o.counter(
        "watchpost_broker_messages_expired_total",
        "Messages not delivered because their MQTT 5 message expiry interval passed.",
        g(&stats.messages_expired),
    );
    o.counter(
        "watchpost_broker_too_large_for_client_total",
        "Messages not sent to a client because they exceed the maximum packet size it announced.",
        g(&stats.too_large_for_client),
    );
    o.counter(
        "watchpost_broker_retained_refused_total",
        "Retained messages not kept: a new topic beyond broker.max_retained_messages or max_retained_bytes.",
        g(&stats.retained_refused),
    );
    o.gauge(
        "watchpost_broker_sessions_online",
        "Broker sessions with their client connected (clients that subscribe or keep a session).",
        g(&stats.sessions_online),
    );
    o.gauge(
        "watchpost_broker_sessions_offline",
        "Broker sessions kept for clients that are away.",
        g(&stats.sessions_offline),
    );
    o.gauge(
        "watchpost_broker_queued_messages",
        "Messages waiting in broker sessions' queues.",
        g(&stats.queued_messages),
    );
    o.gauge(
        "watchpost_broker_retained_messages",
        "Topics with a retained message on the broker.",
        g(&stats.retained_messages),
    );
    let refusals = stats.client_refusals();
    for (name, help, field) in [
        (
            "watchpost_publish_denied_total",
            "Publishes refused because the topic is not the client's, by client.",
            (|c: &ClientRefusals| c.publish_denied) as fn(&ClientRefusals) -> u64,
        ),
        (
            "watchpost_subscribe_denied_total",
            "Subscriptions refused because the filter is not the client's, by client.",
            |c| c.subscribe_denied,
        ),
        (
            "watchpost_rate_limited_total",
            "Publishes dropped over broker.max_publish_rate, by client.",
            |c| c.rate_limited,
        ),
    ] {
        o.family(name, "counter", help);
        for (client, counts) in &refusals {
            o.sample(
                name,
                &format!("{{client=\"{}\"}}", label(client)),
                field(counts),
            );
        }
    }
    let reload = stats.last_reload();
    o.gauge(
        "watchpost_last_reload_success",
        "1 if the last reload of the rules succeeded (also 1 before any reload).",
        u8::from(reload.as_ref().is_none_or(|r| r.ok)),
    );
    o.0
}

/// `value` as a Prometheus label value: backslash, quote and newline escaped.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// What `GET /status` answers and `watchpost status` prints.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Status {
    /// Version of the running gateway.
    pub version: String,
    /// Gateway (site) id.
    pub gateway: String,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// The upstream, if configured.
    pub upstream: Option<String>,
    /// The upstream accepts us and acknowledges.
    pub uplink_connected: bool,
    /// Messages waiting for the upstream.
    pub outbox_depth: u64,
    /// Age of the oldest of them, seconds.
    pub outbox_oldest_seconds: u64,
    /// Devices heard from recently.
    pub devices_online: u64,
    /// Devices whose last word was `offline`.
    pub devices_offline: u64,
    /// Devices not heard from for `gateway.stale_after`.
    pub devices_stale: u64,
    /// Alerts raised now.
    pub alerts_active: u64,
    /// The last reload of the rules, if any.
    pub last_reload: Option<ReloadRecord>,
    /// Clients refused at CONNECT.
    #[serde(default)]
    pub auth_failures: u64,
    /// The data directory's file system is full: history is shed.
    #[serde(default)]
    pub disk_full: bool,
    /// History rows not written because the disk was full or the database failed.
    #[serde(default)]
    pub history_shed: u64,
    /// Publishes and subscriptions refused and publishes rate-limited, by client.
    #[serde(default)]
    pub refusals: BTreeMap<String, ClientRefusals>,
    /// One of a site pair: the peer's state.
    #[serde(default)]
    pub peer: Option<PeerStatus>,
}

/// The status now.
pub fn status(stats: &Stats, info: &Info) -> Status {
    let g = Stats::get;
    let now = now_millis();
    let oldest = g(&stats.outbox_oldest_ms);
    Status {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        gateway: info.gateway.clone(),
        uptime_seconds: now.saturating_sub(g(&stats.started_ms)) / 1000,
        upstream: info.upstream.clone(),
        uplink_connected: stats
            .uplink_connected
            .load(std::sync::atomic::Ordering::Relaxed),
        outbox_depth: g(&stats.outbox_depth),
        outbox_oldest_seconds: if oldest == 0 {
            0
        } else {
            now.saturating_sub(oldest) / 1000
        },
        devices_online: g(&stats.devices_online),
        devices_offline: g(&stats.devices_offline),
        devices_stale: g(&stats.devices_stale),
        alerts_active: g(&stats.alerts_active),
        last_reload: stats.last_reload(),
        auth_failures: g(&stats.auth_failures),
        disk_full: stats.disk_full.load(std::sync::atomic::Ordering::Relaxed),
        history_shed: g(&stats.history_shed),
        refusals: stats.client_refusals(),
        peer: peer_status(stats, info),
    }
}

/// One line on the site pair for people.
pub fn describe_peer(p: &PeerStatus) -> String {
    let heard = match p.heard_seconds_ago {
        None => "not heard from since start".to_owned(),
        Some(s) => format!("heard {s:.1} s ago, lag {} ms", p.lag_ms),
    };
    let mirror = if p.mirror_up {
        "mirror up"
    } else {
        "mirror DOWN"
    };
    let judged = if p.active {
        ""
    } else {
        "; its devices judged here alone"
    };
    let alerts = if p.alerts_differ_seconds > 0.0 {
        format!(
            "raised alerts DIFFER for {:.0} s (it has {})",
            p.alerts_differ_seconds, p.alerts_raised
        )
    } else {
        format!("raised alerts agree ({})", p.alerts_raised)
    };
    format!(
        "{} at {}: {mirror}, {heard}, backlog {} frames{judged}; {alerts}",
        p.name, p.address, p.backlog_frames
    )
}

/// A short summary for people.
pub fn summary(s: &Status) -> String {
    let d = std::time::Duration::from_secs(s.uptime_seconds);
    let mut out = format!(
        "watchpost {} on {}, up {}\n",
        s.version,
        s.gateway,
        humantime::format_duration(d)
    );
    let uplink = match (&s.upstream, s.uplink_connected) {
        (None, _) => "not configured (alerts stay local)".to_owned(),
        (Some(u), true) => format!("connected to {u}"),
        (Some(u), false) => format!("DOWN: {u} is not acknowledging; alerts wait in the outbox"),
    };
    let _ = writeln!(out, "uplink:   {uplink}");
    let age = if s.outbox_depth > 0 {
        format!(
            ", oldest {}",
            humantime::format_duration(std::time::Duration::from_secs(s.outbox_oldest_seconds))
        )
    } else {
        String::new()
    };
    let _ = writeln!(out, "outbox:   {} waiting{age}", s.outbox_depth);
    let _ = writeln!(
        out,
        "devices:  {} online, {} offline, {} stale",
        s.devices_online, s.devices_offline, s.devices_stale
    );
    let _ = writeln!(out, "alerts:   {} raised", s.alerts_active);
    let disk = match (s.disk_full, s.history_shed) {
        (true, shed) => format!(
            "FULL: history is shed ({shed} rows so far); alerts and the outbox use the reserve"
        ),
        (false, 0) => "ok".to_owned(),
        (false, shed) => format!("ok ({shed} history rows shed since start)"),
    };
    let _ = writeln!(out, "disk:     {disk}");
    if let Some(p) = &s.peer {
        let _ = writeln!(out, "peer:     {}", describe_peer(p));
    }
    let reload = match &s.last_reload {
        None => "none since start".to_owned(),
        Some(r) => format!(
            "{} at {}: {}",
            if r.ok { "ok" } else { "FAILED" },
            crate::alert::rfc3339(r.at_ms),
            r.detail
        ),
    };
    let _ = writeln!(out, "reload:   {reload}");
    let refused: Vec<String> = s
        .refusals
        .iter()
        .map(|(client, c)| {
            format!(
                "{client} ({} publishes, {} subscriptions denied; {} over the rate limit)",
                c.publish_denied, c.subscribe_denied, c.rate_limited
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "security: {} clients refused at connect; refused since start: {}",
        s.auth_failures,
        if refused.is_empty() {
            "nothing".to_owned()
        } else {
            refused.join(", ")
        }
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Info {
        Info {
            peer: None,
            gateway: "g".into(),
            upstream: None,
        }
    }

    #[test]
    fn every_family_is_declared_once_and_samples_follow_it() {
        let stats = Stats::default();
        stats.count_transition(Severity::Critical, true);
        let text = render(&stats, &local());
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(declared.insert(name.to_owned()), "{name} declared twice");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = name.trim_end_matches("_sum").trim_end_matches("_count");
                assert!(
                    declared.contains(name) || declared.contains(family),
                    "{name} has no TYPE before it"
                );
            }
        }
        assert!(
            text.contains("watchpost_alerts_raised_total{severity=\"critical\"} 1\n"),
            "{text}"
        );
        stats.count_refusal("odd\"name", |c| c.publish_denied += 2);
        let text = render(&stats, &local());
        assert!(
            text.contains("watchpost_publish_denied_total{client=\"odd\\\"name\"} 2\n"),
            "{text}"
        );
    }

    #[test]
    fn the_summary_says_when_the_uplink_is_down() {
        let stats = Stats::default();
        let s = status(
            &stats,
            &Info {
                peer: None,
                gateway: "g".into(),
                upstream: Some("mqtt://up:1883".into()),
            },
        );
        assert!(
            summary(&s).contains("uplink:   DOWN: mqtt://up:1883"),
            "{}",
            summary(&s)
        );
        assert!(summary(&s).contains("disk:     ok\n"), "{}", summary(&s));
    }

    #[test]
    fn the_summary_and_the_metrics_say_when_the_disk_is_full() {
        let stats = Stats::default();
        stats
            .disk_full
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Stats::add(&stats.history_shed, 42);
        let info = Info {
            peer: None,
            gateway: "g".into(),
            upstream: None,
        };
        let text = summary(&status(&stats, &info));
        assert!(
            text.contains("disk:     FULL: history is shed (42 rows so far)"),
            "{text}"
        );
        let metrics = render(&stats, &info);
        assert!(metrics.contains("\nwatchpost_disk_full 1\n"), "{metrics}");
        assert!(
            metrics.contains("\nwatchpost_history_shed_total 42\n"),
            "{metrics}"
        );
    }
}

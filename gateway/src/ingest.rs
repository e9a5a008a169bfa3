//! Ingest: takes sensor messages from the broker's in-process link and drives
//! decode → loss accounting → rules and rollups, then hands each alert transition to its
//! outputs (local retained topic, store, outbox) and history to the store.
//!
//! [`Engine`] is the synchronous core: messages and time in; alert documents, history rows and
//! counters out; every rule's state, rollup window and `seq` memory kept per device and metric.
//! [`run`] is the thin task around it that owns the link. Malformed input is counted per device
//! and logged at most once per device per minute; it never stops ingest and never touches
//! another device's state.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use serde_json::json;
use tracing::{debug, error, info, warn};

use crate::aggregate::{SiteSummary, Window, window_start};
use crate::alert::{AlertDoc, now_millis, rfc3339};
use crate::codec::{self, DecodeError, Limits, Message};
use crate::config::SummaryConfig;
use crate::loss::{Seq, SeqTracker};
use crate::rules::{AlertState, Input, Millis, Rule, Severity, State};
use crate::stats::{DeviceCounters, OTHER_DEVICES, Stats};
use crate::store::{DeviceDelta, OutboxEntry, RawRow, RollupRow, Store};

/// How often one device's malformed input (or lost messages) is logged.
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// How often counters are published and quiet rollup windows closed.
pub const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(1);

/// History rows buffered before they are handed to the store between housekeeping rounds.
const HISTORY_BATCH: usize = 4096;

/// Malformed messages create per-device counters only up to this many devices; beyond, they
/// are counted under [`OTHER_DEVICES`], so that invented device ids cannot grow memory.
pub const MAX_ERROR_ONLY_DEVICES: usize = 10_000;

/// Devices whose log suppression is remembered; beyond this the oldest entries are forgotten,
/// which at worst logs a little more often.
const MAX_LOG_ENTRIES: usize = 10_000;

/// What the engine is told to do besides rules.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Gateway (site) id.
    pub gateway: String,
    /// Threshold rules.
    pub rules: Vec<Rule>,
    /// Decoder limits.
    pub limits: Limits,
    /// Rollup window length.
    pub window: Duration,
    /// Keep every raw reading for the store.
    pub keep_raw: bool,
    /// Summaries upstream, if configured.
    pub summaries: Option<SummaryConfig>,
}

/// Per rule, device and metric state, plus decoding, loss accounting and rollups.
pub struct Engine {
    options: EngineOptions,
    window_ms: Millis,
    stats: Arc<Stats>,
    devices: HashMap<Box<str>, Device>,
    /// Deadlines of pending `for` conditions, earliest first. Entries whose state moved on are
    /// skipped when they come up.
    deadlines: BinaryHeap<Reverse<Deadline>>,
    error_log: LogLimit,
    loss_log: LogLimit,
    rollups: Vec<RollupRow>,
    raw: Vec<RawRow>,
    summary: Option<Summary>,
    next_window_scan: Millis,
}

struct Device {
    streams: HashMap<Box<str>, Stream>,
    seq: SeqTracker,
    counters: DeviceCounters,
    /// What the store and the stats have seen of `counters`.
    published: DeviceCounters,
    /// Start of the latest alert episode per rule, so that episode ids never repeat.
    episodes: Vec<(usize, Millis)>,
}

/// One metric of one device.
struct Stream {
    /// The rules that watch it, by index, with their state.
    rules: Vec<(usize, State)>,
    window: Option<Window>,
}

struct Summary {
    interval: Millis,
    from: Millis,
    metrics: Vec<(String, SiteSummary)>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Deadline {
    at: Millis,
    device: Box<str>,
    metric: Box<str>,
    rule: usize,
}

/// What a housekeeping round hands to the store.
#[derive(Debug, Default)]
pub struct Housekeeping {
    /// Closed rollup windows.
    pub rollups: Vec<RollupRow>,
    /// Raw readings.
    pub raw: Vec<RawRow>,
    /// Counter increments per device.
    pub devices: Vec<DeviceDelta>,
    /// A summary for upstream, when an interval ended.
    pub summary: Option<OutboxEntry>,
}

/// The stream a rule step is about.
struct Target<'a> {
    device: &'a str,
    metric: &'a str,
    /// Start of the latest episode per rule on this device.
    episodes: &'a mut Vec<(usize, Millis)>,
}

/// What one rule step may touch besides its own state.
struct StepContext<'a> {
    gateway: &'a str,
    stats: &'a Stats,
    deadlines: &'a mut BinaryHeap<Reverse<Deadline>>,
    out: &'a mut Vec<AlertDoc>,
}

impl StepContext<'_> {
    fn step(
        &mut self,
        rule: &Rule,
        rule_idx: usize,
        state: &mut State,
        stream: Target<'_>,
        input: Input,
        now: Millis,
    ) {
        let Target {
            device,
            metric,
            episodes,
        } = stream;
        let before = *state;
        let (mut after, mut transition) = rule.step(before, input, now);
        if let (Some(t), State::Raised { since, .. }) = (transition.as_mut(), &mut after) {
            if t.state == AlertState::Raised {
                // The alert id names the episode by its start in ms: two episodes of one rule
                // and device that begin in the same millisecond get distinct starts.
                match episodes.iter().position(|(r, _)| *r == rule_idx) {
                    Some(i) => {
                        *since = (*since).max(episodes[i].1 + 1);
                        episodes[i].1 = *since;
                    }
                    None => episodes.push((rule_idx, *since)),
                }
                t.since = *since;
            }
        }
        *state = after;
        if let Some(at) = after.deadline(rule.hold) {
            if before.deadline(rule.hold) != Some(at) {
                self.deadlines.push(Reverse(Deadline {
                    at,
                    device: device.into(),
                    metric: metric.into(),
                    rule: rule_idx,
                }));
            }
        }
        let Some(t) = transition else { return };
        match t.state {
            AlertState::Raised => {
                Stats::inc(&self.stats.alerts_raised);
                info!(device, metric, rule = %rule.name, value = t.value, threshold = t.threshold, severity = rule.severity.as_str(), "alert raised");
            }
            AlertState::Cleared => {
                Stats::inc(&self.stats.alerts_cleared);
                info!(device, metric, rule = %rule.name, value = t.value, "alert cleared");
            }
        }
        self.out
            .push(AlertDoc::new(self.gateway, rule, device, metric, &t));
    }
}

fn new_device() -> Device {
    Device {
        streams: HashMap::new(),
        seq: SeqTracker::default(),
        counters: DeviceCounters::default(),
        published: DeviceCounters::default(),
        episodes: Vec::new(),
    }
}

impl Engine {
    /// An engine with no state yet; `now` starts the first summary interval.
    pub fn new(options: EngineOptions, stats: Arc<Stats>, now: Millis) -> Self {
        let summary = options.summaries.as_ref().map(|s| {
            let interval = (s.interval.as_millis() as Millis).max(1);
            Summary {
                interval,
                from: window_start(now, interval),
                metrics: s
                    .metrics
                    .iter()
                    .map(|m| (m.clone(), SiteSummary::default()))
                    .collect(),
            }
        });
        Self {
            window_ms: (options.window.as_millis() as Millis).max(1),
            options,
            stats,
            devices: HashMap::new(),
            deadlines: BinaryHeap::new(),
            error_log: LogLimit::default(),
            loss_log: LogLimit::default(),
            rollups: Vec::new(),
            raw: Vec::new(),
            summary,
            next_window_scan: now,
        }
    }

    /// Handles one message published under `sensors/` at time `now`; returns the alert
    /// transitions it caused. History rows wait in the engine for [`Engine::housekeeping`].
    pub fn on_message(&mut self, topic: &[u8], payload: &[u8], now: Millis) -> Vec<AlertDoc> {
        Stats::inc(&self.stats.messages);
        let Ok(topic) = std::str::from_utf8(topic) else {
            self.malformed(None, "<not UTF-8>", &DecodeError::NotUtf8, now);
            return Vec::new();
        };
        let readings = match codec::decode(topic, payload, self.options.limits) {
            Ok(Message::Readings(r)) => r,
            Ok(Message::Status { device, online }) => {
                debug!(device, online, "device presence");
                let d = self.devices.entry(device.into()).or_insert_with(new_device);
                d.counters.messages += 1;
                d.counters.last_seen_ms = now;
                return Vec::new();
            }
            Err(rejected) => {
                self.malformed(rejected.device, topic, &rejected.error, now);
                return Vec::new();
            }
        };
        for (field, error) in &readings.rejected {
            self.malformed(
                Some(readings.device),
                &format!("{topic} field {field:?}"),
                error,
                now,
            );
        }
        let device_name = readings.device;
        let Engine {
            options,
            window_ms,
            stats,
            devices,
            deadlines,
            loss_log,
            rollups,
            raw,
            summary,
            ..
        } = self;
        let device = devices.entry(device_name.into()).or_insert_with(new_device);
        device.counters.messages += 1;
        device.counters.last_seen_ms = now;

        // The device's own counter: drop duplicates; late messages go to history, not rules,
        // which judge the present.
        let judge = match readings.seq.map(|s| (s, device.seq.observe(s))) {
            None => true,
            Some((s, outcome)) => {
                device.counters.loss.count(outcome);
                match outcome {
                    Seq::Duplicate => {
                        Stats::inc(&stats.duplicates);
                        return Vec::new();
                    }
                    Seq::Gap(n) => {
                        if let Some(suppressed) = loss_log.should_log(device_name, now) {
                            warn!(
                                device = device_name,
                                lost = n,
                                seq = s,
                                suppressed,
                                "messages from this device were lost on the way (a gap in its seq); logged at most once a minute per device"
                            );
                        }
                        true
                    }
                    Seq::Late => false,
                    Seq::First | Seq::InOrder | Seq::Restart => true,
                }
            }
        };

        let mut out = Vec::new();
        let mut ctx = StepContext {
            gateway: &options.gateway,
            stats,
            deadlines,
            out: &mut out,
        };
        Stats::add(&ctx.stats.readings, readings.values.len() as u64);
        device.counters.readings += readings.values.len() as u64;
        for (metric, value) in &readings.values {
            let (metric, value) = (metric.as_ref(), *value);
            let stream = match device.streams.get_mut(metric) {
                Some(s) => s,
                None => {
                    // A new stream: find the rules that watch it, once.
                    let topic = format!("{}/{device_name}/{metric}", codec::TOPIC_ROOT);
                    let rules = options
                        .rules
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| r.filter.matches(&topic))
                        .map(|(i, _)| (i, State::Normal))
                        .collect();
                    device.streams.entry(metric.into()).or_insert(Stream {
                        rules,
                        window: None,
                    })
                }
            };
            match &mut stream.window {
                Some(w) => {
                    if let Some(closed) = w.add(value, now, *window_ms) {
                        rollups.push(RollupRow {
                            device: device_name.into(),
                            metric: metric.into(),
                            rollup: closed,
                        });
                    }
                }
                None => stream.window = Some(Window::new(value, now, *window_ms)),
            }
            if options.keep_raw {
                raw.push(RawRow {
                    device: device_name.into(),
                    metric: metric.into(),
                    at: now,
                    value,
                    seq: readings.seq,
                });
            }
            if let Some(summary) = summary {
                if let Some((_, s)) = summary.metrics.iter_mut().find(|(m, _)| m == metric) {
                    s.add(device_name, value);
                }
            }
            if judge {
                for (rule_idx, state) in stream.rules.iter_mut() {
                    let target = Target {
                        device: device_name,
                        metric,
                        episodes: &mut device.episodes,
                    };
                    ctx.step(
                        &options.rules[*rule_idx],
                        *rule_idx,
                        state,
                        target,
                        Input::Reading(value),
                        now,
                    );
                }
            }
        }
        out
    }

    /// Lets pending `for` conditions whose time has come fire; returns the transitions.
    pub fn on_tick(&mut self, now: Millis) -> Vec<AlertDoc> {
        let mut out = Vec::new();
        while self.deadlines.peek().is_some_and(|Reverse(d)| d.at <= now) {
            let Some(Reverse(d)) = self.deadlines.pop() else {
                break;
            };
            let Engine {
                options,
                stats,
                devices,
                deadlines,
                ..
            } = self;
            let Some(dev) = devices.get_mut(&*d.device) else {
                continue;
            };
            let slot = dev
                .streams
                .get_mut(&*d.metric)
                .and_then(|s| s.rules.iter_mut().find(|(i, _)| *i == d.rule));
            if let Some((_, state)) = slot {
                let mut ctx = StepContext {
                    gateway: &options.gateway,
                    stats,
                    deadlines,
                    out: &mut out,
                };
                let target = Target {
                    device: &d.device,
                    metric: &d.metric,
                    episodes: &mut dev.episodes,
                };
                ctx.step(
                    &options.rules[d.rule],
                    d.rule,
                    state,
                    target,
                    Input::Tick,
                    now,
                );
            }
        }
        out
    }

    /// The earliest time at which [`Engine::on_tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.deadlines.peek().map(|Reverse(d)| d.at)
    }

    /// History rows waiting for the store.
    pub fn buffered_history(&self) -> usize {
        self.rollups.len() + self.raw.len()
    }

    /// Takes the history rows waiting for the store.
    pub fn take_history(&mut self) -> (Vec<RollupRow>, Vec<RawRow>) {
        (
            std::mem::take(&mut self.rollups),
            std::mem::take(&mut self.raw),
        )
    }

    /// The periodic round: closes rollup windows of quiet streams, publishes counters, and
    /// produces a summary when its interval ends.
    pub fn housekeeping(&mut self, now: Millis) -> Housekeeping {
        if now >= self.next_window_scan {
            // A window ends at the next reading, or here for a stream that went quiet.
            self.next_window_scan = now + 5_000;
            self.close_windows(|w, len| w.close_if_due(now, len));
        }
        let mut out = Housekeeping::default();
        let mut changed = Vec::new();
        for (name, d) in &mut self.devices {
            if d.counters != d.published {
                out.devices.push(DeviceDelta {
                    device: name.to_string(),
                    add: d.counters.since(&d.published),
                });
                d.published = d.counters.clone();
                changed.push(name.clone());
            }
        }
        self.stats.update_devices(
            changed
                .iter()
                .filter_map(|n| self.devices.get(n).map(|d| (&**n, &d.counters))),
        );
        out.summary = self.summary_due(now);
        (out.rollups, out.raw) = self.take_history();
        out
    }

    /// Everything that would be lost by stopping now: open windows as partial rollups (they
    /// merge with the rest of their window after a restart) and unpublished counters.
    pub fn finish(&mut self, now: Millis) -> Housekeeping {
        self.close_windows(|w, len| Some(w.rollup(len)));
        self.next_window_scan = Millis::MAX;
        self.housekeeping(now)
    }

    fn close_windows(
        &mut self,
        mut close: impl FnMut(&Window, Millis) -> Option<crate::aggregate::Rollup>,
    ) {
        for (device, d) in &mut self.devices {
            for (metric, s) in &mut d.streams {
                if let Some(rollup) = s.window.as_ref().and_then(|w| close(w, self.window_ms)) {
                    s.window = None;
                    self.rollups.push(RollupRow {
                        device: device.to_string(),
                        metric: metric.to_string(),
                        rollup,
                    });
                }
            }
        }
    }

    fn summary_due(&mut self, now: Millis) -> Option<OutboxEntry> {
        let s = self.summary.as_mut()?;
        let to = s.from.saturating_add(s.interval);
        if now < to {
            return None;
        }
        let metrics: serde_json::Map<_, _> = s
            .metrics
            .iter_mut()
            .filter_map(|(name, site)| site.take().map(|f| (name.clone(), json!(f))))
            .collect();
        let doc = json!({
            "gateway": self.options.gateway,
            "from": rfc3339(s.from),
            "to": rfc3339(to),
            "metrics": metrics,
        });
        let id = format!("{}:summary:{}", self.options.gateway, s.from);
        s.from = window_start(now, s.interval);
        Some(OutboxEntry {
            id,
            topic: SUMMARY_TOPIC.into(),
            payload: Bytes::from(doc.to_string()),
            retain: false,
        })
    }

    fn malformed(&mut self, device: Option<&str>, what: &str, error: &DecodeError, now: Millis) {
        Stats::inc(&self.stats.decode_errors);
        let tracked = device.filter(|d| {
            self.devices.contains_key(*d) || self.devices.len() < MAX_ERROR_ONLY_DEVICES
        });
        let key = tracked.unwrap_or(OTHER_DEVICES);
        let d = self.devices.entry(key.into()).or_insert_with(new_device);
        d.counters.decode_errors += 1;
        d.counters.last_seen_ms = now;
        let logged_as = device.unwrap_or(OTHER_DEVICES);
        if let Some(suppressed) = self.error_log.should_log(logged_as, now) {
            warn!(
                device = logged_as,
                suppressed,
                "malformed sensor message on {what}: {error}; further errors from this device are logged at most once a minute"
            );
        }
    }
}

/// Topic, below the upstream prefix, of summaries.
pub const SUMMARY_TOPIC: &str = "summaries";

/// Remembers when each device was last logged about.
#[derive(Default)]
struct LogLimit {
    last: HashMap<String, (Millis, u64)>,
}

impl LogLimit {
    /// `Some(suppressed since last time)` if `key` may be logged at `now`.
    fn should_log(&mut self, key: &str, now: Millis) -> Option<u64> {
        let interval = ERROR_LOG_INTERVAL.as_millis() as Millis;
        match self.last.get_mut(key) {
            Some((at, suppressed)) if now.saturating_sub(*at) < interval => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let n = *suppressed;
                *at = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                if self.last.len() >= MAX_LOG_ENTRIES {
                    self.last
                        .retain(|_, (at, _)| now.saturating_sub(*at) < interval);
                }
                if self.last.len() < MAX_LOG_ENTRIES {
                    self.last.insert(key.to_owned(), (now, 0));
                }
                Some(0)
            }
        }
    }
}

/// Detects jumps of the broker's read cursor: messages the router dropped from its log before
/// ingest read them. Offsets of one filter's log rise by one per message.
#[derive(Debug, Default)]
pub struct CursorWatch {
    next: Option<u64>,
}

impl CursorWatch {
    /// Notes the offset of a forwarded message; returns how many were skipped before it.
    pub fn observe(&mut self, offset: u64) -> u64 {
        let lost = match self.next {
            Some(expected) if offset > expected => offset - expected,
            _ => 0,
        };
        self.next = Some(offset + 1);
        lost
    }
}

/// Where alert transitions and history go.
pub struct Outputs {
    /// The store: history, and the outbox for what goes upstream.
    pub store: Store,
    /// Severities that go upstream (`None`: no uplink).
    pub forward: Option<Vec<Severity>>,
}

/// The ingest task: pulls from the link until `shutdown` resolves or the broker goes away.
pub async fn run(
    mut engine: Engine,
    mut link_tx: LinkTx,
    mut link_rx: LinkRx,
    outputs: Outputs,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let stats = engine.stats.clone();
    let mut cursor = CursorWatch::default();
    let mut jumps_stored = (0, 0);
    tokio::pin!(shutdown);
    // One timer for the earliest pending `for` deadline, re-armed only when that changes.
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let mut armed: Option<Millis> = None;
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING_EVERY);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = engine.next_deadline();
        if next != armed {
            if let Some(at) = next {
                let wait = Duration::from_millis(at.saturating_sub(now_millis()));
                timer.as_mut().reset(tokio::time::Instant::now() + wait);
            }
            armed = next;
        }
        let docs = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            n = link_rx.next() => match n {
                Ok(Some(Notification::Forward(f))) => {
                    if let Some((_, offset)) = f.cursor {
                        let lost = cursor.observe(offset);
                        if lost > 0 {
                            Stats::inc(&stats.cursor_jumps);
                            Stats::add(&stats.cursor_jump_lost, lost);
                            error!(lost, "the broker dropped {lost} sensor messages before ingest read them (read cursor jumped): ingest is falling behind the publish rate");
                        }
                    }
                    engine.on_message(&f.publish.topic, &f.publish.payload, now_millis())
                }
                Ok(Some(Notification::Unschedule)) => {
                    // The router parks a link whose buffer filled; it stays parked until told
                    // we are ready again.
                    if link_rx.wake().await.is_err() {
                        error!("the embedded broker stopped; ingest ends");
                        break;
                    }
                    continue;
                }
                Ok(_) => continue,
                Err(e) => {
                    error!(error = %e, "the embedded broker's link closed; ingest ends");
                    break;
                }
            },
            _ = &mut timer, if armed.is_some() => {
                armed = None;
                engine.on_tick(now_millis())
            }
            _ = housekeeping.tick() => {
                let round = engine.housekeeping(now_millis());
                store_round(&outputs.store, round);
                let jumps = (Stats::get(&stats.cursor_jumps), Stats::get(&stats.cursor_jump_lost));
                if jumps != jumps_stored {
                    outputs.store.counters(vec![("cursor_jumps", jumps.0 - jumps_stored.0), ("cursor_jump_lost", jumps.1 - jumps_stored.1)]);
                    jumps_stored = jumps;
                }
                continue;
            }
        };
        for doc in docs {
            dispatch(&doc, &mut link_tx, &outputs).await;
        }
        if engine.buffered_history() >= HISTORY_BATCH {
            let (rollups, raw) = engine.take_history();
            outputs.store.rollups(rollups);
            outputs.store.raw(raw);
        }
    }
    store_round(&outputs.store, engine.finish(now_millis()));
    debug!("ingest stopped");
}

fn store_round(store: &Store, round: Housekeeping) {
    store.rollups(round.rollups);
    store.raw(round.raw);
    store.devices(round.devices);
    if let Some(summary) = round.summary {
        store.outbox_push(summary);
    }
}

async fn dispatch(doc: &AlertDoc, link_tx: &mut LinkTx, outputs: &Outputs) {
    let payload = Bytes::from(doc.to_json());
    let topic = doc.topic();
    let upstream = outputs
        .forward
        .as_ref()
        .is_some_and(|f| f.contains(&doc.severity));
    let entry = upstream.then(|| OutboxEntry {
        id: doc.id.clone(),
        topic: topic.clone(),
        payload: payload.clone(),
        retain: true,
    });
    // History and outbox in one transaction; the uplink hears of it only once committed.
    outputs.store.alert(doc, entry);
    let publish = Publish::new(Bytes::from(topic), payload, true);
    if let Err(e) = link_tx.send(Packet::Publish(publish, None)).await {
        error!(error = %e, id = %doc.id, "could not publish the alert on the local broker");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Threshold;
    use crate::topic::TopicFilter;

    fn engine_with(hold_ms: u64, summaries: Option<SummaryConfig>, keep_raw: bool) -> Engine {
        let rule = Rule {
            name: "overheat".into(),
            filter: TopicFilter::new("sensors/+/temperature").unwrap(),
            threshold: Threshold {
                above: Some(90.0),
                clear_below: Some(85.0),
                ..Threshold::default()
            },
            hold: Duration::from_millis(hold_ms),
            severity: Severity::Critical,
        };
        let options = EngineOptions {
            gateway: "site".into(),
            rules: vec![rule],
            limits: Limits::default(),
            window: Duration::from_secs(60),
            keep_raw,
            summaries,
        };
        Engine::new(options, Arc::new(Stats::default()), 0)
    }

    fn engine(hold_ms: u64) -> Engine {
        engine_with(hold_ms, None, false)
    }

    fn states(docs: &[AlertDoc]) -> Vec<(&str, AlertState)> {
        docs.iter().map(|d| (d.device.as_str(), d.state)).collect()
    }

    #[test]
    fn devices_have_separate_state() {
        let mut e = engine(0);
        assert_eq!(
            states(&e.on_message(b"sensors/a/temperature", b"95", 1)),
            [("a", AlertState::Raised)]
        );
        assert!(e.on_message(b"sensors/b/temperature", b"80", 2).is_empty());
        assert!(e.on_message(b"sensors/a/temperature", b"96", 3).is_empty());
        assert_eq!(
            states(&e.on_message(b"sensors/a/temperature", b"70", 4)),
            [("a", AlertState::Cleared)]
        );
        assert!(
            e.on_message(b"sensors/a/humidity", b"99", 5).is_empty(),
            "no rule for humidity"
        );
    }

    #[test]
    fn object_payload_feeds_each_metric() {
        let mut e = engine(0);
        let docs = e.on_message(
            b"sensors/a",
            br#"{"temperature":95,"humidity":20,"seq":3}"#,
            1,
        );
        assert_eq!(states(&docs), [("a", AlertState::Raised)]);
        assert_eq!(docs[0].metric, "temperature");
        assert_eq!(Stats::get(&e.stats.readings), 2);
    }

    #[test]
    fn pending_for_fires_on_tick_at_the_deadline() {
        let mut e = engine(10_000);
        assert!(
            e.on_message(b"sensors/a/temperature", b"95", 1_000)
                .is_empty()
        );
        assert_eq!(e.next_deadline(), Some(11_000));
        assert!(e.on_tick(10_999).is_empty());
        assert_eq!(states(&e.on_tick(11_000)), [("a", AlertState::Raised)]);
        assert_eq!(e.next_deadline(), None);
    }

    #[test]
    fn interrupted_pending_leaves_a_stale_deadline_that_does_nothing() {
        let mut e = engine(10_000);
        e.on_message(b"sensors/a/temperature", b"95", 1_000);
        e.on_message(b"sensors/a/temperature", b"80", 5_000);
        e.on_message(b"sensors/a/temperature", b"95", 6_000);
        assert!(
            e.on_tick(11_000).is_empty(),
            "the first episode was interrupted"
        );
        assert_eq!(states(&e.on_tick(16_000)), [("a", AlertState::Raised)]);
    }

    #[test]
    fn malformed_input_is_counted_and_harms_no_one() {
        let mut e = engine(0);
        for (topic, payload) in [
            (&b"sensors/bad/temperature"[..], &b"abc"[..]),
            (b"sensors/bad/temperature", b"NaN"),
            (b"sensors/bad", b"{\"temperature\":"),
            (b"sensors", b"1"),
            (b"sensors/\xff/x", b"1"),
        ] {
            assert!(e.on_message(topic, payload, 1).is_empty());
        }
        e.housekeeping(2);
        assert_eq!(e.stats.decode_errors_of("bad"), 3);
        assert_eq!(e.stats.decode_errors_of(OTHER_DEVICES), 2);
        assert_eq!(
            states(&e.on_message(b"sensors/good/temperature", b"99", 2)),
            [("good", AlertState::Raised)]
        );
    }

    #[test]
    fn seq_gaps_and_duplicates_are_counted_and_duplicates_are_not_judged_twice() {
        let mut e = engine(0);
        let mut raised = 0;
        // A device that skips 3 and 4 and repeats 5 (a QoS 1 redelivery of the excursion).
        for (seq, v) in [
            (0, 20),
            (1, 20),
            (2, 20),
            (5, 95),
            (5, 95),
            (6, 70),
            (6, 70),
            (7, 95),
        ] {
            let payload = format!("{{\"v\":{v},\"seq\":{seq}}}");
            raised += e
                .on_message(b"sensors/d/temperature", payload.as_bytes(), seq)
                .iter()
                .filter(|d| d.state == AlertState::Raised)
                .count();
        }
        assert_eq!(raised, 2, "the duplicate of seq 5 raised nothing");
        let round = e.housekeeping(10);
        let c = e.stats.device("d").unwrap();
        assert_eq!(
            (c.messages, c.readings, c.loss.lost, c.loss.duplicated),
            (8, 6, 2, 2)
        );
        assert_eq!(round.devices.len(), 1);
        assert_eq!(round.devices[0].add.loss.lost, 2);
        // Nothing changed since: nothing to publish.
        assert!(e.housekeeping(11).devices.is_empty());
    }

    #[test]
    fn late_messages_go_to_history_but_not_to_rules() {
        let mut e = engine_with(0, None, true);
        e.on_message(b"sensors/d/temperature", br#"{"v":20,"seq":10}"#, 1);
        e.on_message(b"sensors/d/temperature", br#"{"v":20,"seq":12}"#, 2);
        assert!(
            e.on_message(b"sensors/d/temperature", br#"{"v":99,"seq":11}"#, 3)
                .is_empty(),
            "late: not judged"
        );
        let (_, raw) = e.take_history();
        assert_eq!(
            raw.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [Some(10), Some(12), Some(11)]
        );
        e.housekeeping(4);
        let c = e.stats.device("d").unwrap();
        assert_eq!((c.loss.lost, c.loss.out_of_order), (0, 1));
    }

    #[test]
    fn rollups_close_with_time_and_finish_flushes_partial_windows() {
        let mut e = engine(0);
        e.on_message(b"sensors/d/temperature", b"20", 1_000);
        e.on_message(b"sensors/d/temperature", b"30", 2_000);
        e.on_message(b"sensors/q/temperature", b"10", 2_000);
        e.on_message(b"sensors/d/temperature", b"25", 61_000);
        let round = e.housekeeping(61_000);
        let mut closed: Vec<_> = round
            .rollups
            .iter()
            .map(|r| (r.device.as_str(), r.rollup.count, r.rollup.mean))
            .collect();
        closed.sort_by(|a, b| a.0.cmp(b.0));
        assert_eq!(
            closed,
            [("d", 2, 25.0), ("q", 1, 10.0)],
            "d closed by its reading, quiet q by the round"
        );
        let last = e.finish(62_000);
        let partial: Vec<_> = last
            .rollups
            .iter()
            .map(|r| (r.device.as_str(), r.rollup.start, r.rollup.count))
            .collect();
        assert_eq!(partial, [("d", 60_000, 1)]);
    }

    #[test]
    fn a_summary_goes_out_once_per_interval() {
        let summaries = SummaryConfig {
            interval: Duration::from_secs(60),
            metrics: vec!["temperature".into()],
        };
        let mut e = engine_with(0, Some(summaries), false);
        e.on_message(b"sensors/a/temperature", b"20", 1_000);
        e.on_message(b"sensors/b/temperature", b"30", 2_000);
        e.on_message(b"sensors/b/humidity", b"50", 2_000);
        assert!(e.housekeeping(59_999).summary.is_none());
        let s = e.housekeeping(60_000).summary.expect("interval ended");
        assert_eq!((s.topic.as_str(), s.retain), (SUMMARY_TOPIC, false));
        let doc: serde_json::Value = serde_json::from_slice(&s.payload).unwrap();
        assert_eq!(doc["from"], rfc3339(0));
        assert_eq!(doc["metrics"]["temperature"]["devices"], 2);
        assert_eq!(doc["metrics"]["temperature"]["max_device"], "b");
        assert!(
            doc["metrics"].get("humidity").is_none(),
            "only the named metrics"
        );
        assert!(e.housekeeping(60_001).summary.is_none(), "one per interval");
    }

    #[test]
    fn error_log_is_rate_limited_per_device() {
        let mut log = LogLimit::default();
        assert_eq!(log.should_log("a", 0), Some(0));
        assert_eq!(log.should_log("a", 1_000), None);
        assert_eq!(log.should_log("b", 1_000), Some(0));
        assert_eq!(log.should_log("a", 59_999), None);
        assert_eq!(log.should_log("a", 60_000), Some(2));
    }

    #[test]
    fn cursor_jumps_are_measured() {
        let mut c = CursorWatch::default();
        assert_eq!(c.observe(10), 0);
        assert_eq!(c.observe(11), 0);
        assert_eq!(c.observe(15), 3);
        assert_eq!(c.observe(16), 0);
    }
}

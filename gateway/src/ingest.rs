//! Ingest: takes sensor messages from the broker's in-process link and drives
//! decode → rules, then hands each alert transition to its outputs (local retained topic,
//! store, uplink).
//!
//! [`Engine`] is the synchronous core: messages and time in, alert documents out, with every
//! rule's state kept per device and metric. [`run`] is the thin task around it that owns the
//! link. Malformed input is counted per device and logged at most once per device per minute;
//! it never stops ingest and never touches another device's state.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttd::Notification;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::alert::{AlertDoc, now_millis};
use crate::codec::{self, DecodeError, Limits, Message};
use crate::rules::{AlertState, Input, Millis, Rule, State};
use crate::stats::{OTHER_DEVICES, Stats};
use crate::store::Store;
use crate::uplink::UplinkItem;

/// How often one device's malformed input is logged.
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Devices whose log suppression is remembered; beyond this the oldest entries are forgotten,
/// which at worst logs a little more often.
const MAX_LOG_ENTRIES: usize = 10_000;

/// Per rule, device and metric state, plus decoding and logging.
pub struct Engine {
    gateway: String,
    rules: Vec<Rule>,
    limits: Limits,
    stats: Arc<Stats>,
    /// device → metric → (rule index, state) for the rules that match that metric.
    devices: HashMap<Box<str>, Metrics>,
    /// Deadlines of pending `for` conditions, earliest first. Entries whose state moved on are
    /// skipped when they come up.
    deadlines: BinaryHeap<Reverse<Deadline>>,
    error_log: ErrorLog,
}

/// Per metric of one device: the rules that watch it, by index, with their state.
type Metrics = HashMap<Box<str>, Vec<(usize, State)>>;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Deadline {
    at: Millis,
    device: Box<str>,
    metric: Box<str>,
    rule: usize,
}

/// What one rule step may touch besides its own state.
struct StepContext<'a> {
    gateway: &'a str,
    stats: &'a Stats,
    deadlines: &'a mut BinaryHeap<Reverse<Deadline>>,
    out: &'a mut Vec<AlertDoc>,
}

impl StepContext<'_> {
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        rule: &Rule,
        rule_idx: usize,
        state: &mut State,
        device: &str,
        metric: &str,
        input: Input,
        now: Millis,
    ) {
        let before = *state;
        let (after, transition) = rule.step(before, input, now);
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

impl Engine {
    /// An engine with no state yet.
    pub fn new(gateway: &str, rules: Vec<Rule>, limits: Limits, stats: Arc<Stats>) -> Self {
        Self {
            gateway: gateway.to_owned(),
            rules,
            limits,
            stats,
            devices: HashMap::new(),
            deadlines: BinaryHeap::new(),
            error_log: ErrorLog::default(),
        }
    }

    /// Handles one message published under `sensors/` at time `now`; returns the alert
    /// transitions it caused.
    pub fn on_message(&mut self, topic: &[u8], payload: &[u8], now: Millis) -> Vec<AlertDoc> {
        Stats::inc(&self.stats.messages);
        let Ok(topic) = std::str::from_utf8(topic) else {
            self.malformed(None, "<not UTF-8>", &DecodeError::NotUtf8, now);
            return Vec::new();
        };
        let readings = match codec::decode(topic, payload, self.limits) {
            Ok(Message::Readings(r)) => r,
            Ok(Message::Status { device, online }) => {
                debug!(device, online, "device presence");
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
        Stats::add(&self.stats.readings, readings.values.len() as u64);
        let mut out = Vec::new();
        for (metric, value) in &readings.values {
            self.evaluate(
                readings.device,
                metric,
                Input::Reading(*value),
                now,
                &mut out,
            );
        }
        out
    }

    /// Lets pending `for` conditions whose time has come fire; returns the transitions.
    pub fn on_tick(&mut self, now: Millis) -> Vec<AlertDoc> {
        let mut out = Vec::new();
        while let Some(Reverse(d)) = self.deadlines.peek() {
            if d.at > now {
                break;
            }
            let Some(Reverse(d)) = self.deadlines.pop() else {
                break;
            };
            self.tick_one(&d, now, &mut out);
        }
        out
    }

    /// The earliest time at which [`Engine::on_tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.deadlines.peek().map(|Reverse(d)| d.at)
    }

    /// Runs every rule that matches `device`/`metric`.
    fn evaluate(
        &mut self,
        device: &str,
        metric: &str,
        input: Input,
        now: Millis,
        out: &mut Vec<AlertDoc>,
    ) {
        let Engine {
            gateway,
            rules,
            stats,
            devices,
            deadlines,
            ..
        } = self;
        if !devices.get(device).is_some_and(|m| m.contains_key(metric)) {
            // A new stream: find the rules that watch it, once.
            let topic = format!("{}/{device}/{metric}", codec::TOPIC_ROOT);
            let matching = rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.filter.matches(&topic))
                .map(|(i, _)| (i, State::Normal))
                .collect();
            devices
                .entry(device.into())
                .or_default()
                .insert(metric.into(), matching);
        }
        let Some(slots) = devices.get_mut(device).and_then(|m| m.get_mut(metric)) else {
            return;
        };
        let mut ctx = StepContext {
            gateway,
            stats,
            deadlines,
            out,
        };
        for (rule_idx, state) in slots.iter_mut() {
            ctx.step(
                &rules[*rule_idx],
                *rule_idx,
                state,
                device,
                metric,
                input,
                now,
            );
        }
    }

    /// Steps one rule of one stream; used when its `for` deadline comes up.
    fn tick_one(&mut self, d: &Deadline, now: Millis, out: &mut Vec<AlertDoc>) {
        let Engine {
            gateway,
            rules,
            stats,
            devices,
            deadlines,
            ..
        } = self;
        let slot = devices
            .get_mut(&*d.device)
            .and_then(|m| m.get_mut(&*d.metric))
            .and_then(|slots| slots.iter_mut().find(|(i, _)| *i == d.rule));
        if let Some((_, state)) = slot {
            let mut ctx = StepContext {
                gateway,
                stats,
                deadlines,
                out,
            };
            ctx.step(
                &rules[d.rule],
                d.rule,
                state,
                &d.device,
                &d.metric,
                Input::Tick,
                now,
            );
        }
    }

    fn malformed(&mut self, device: Option<&str>, what: &str, error: &DecodeError, now: Millis) {
        self.stats.decode_error(device);
        let key = device.unwrap_or(OTHER_DEVICES);
        if let Some(suppressed) = self.error_log.should_log(key, now) {
            warn!(
                device = key,
                suppressed,
                "malformed sensor message on {what}: {error}; further errors from this device are logged at most once a minute"
            );
        }
    }
}

/// Remembers when each device's errors were last logged.
#[derive(Default)]
struct ErrorLog {
    last: HashMap<String, (Millis, u64)>,
}

impl ErrorLog {
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

/// Where alert transitions go.
pub struct Outputs {
    /// The uplink's queue, if an uplink is configured, with the severities it takes.
    pub uplink: Option<(
        mpsc::UnboundedSender<UplinkItem>,
        Vec<crate::rules::Severity>,
    )>,
    /// The store.
    pub store: Store,
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
    tokio::pin!(shutdown);
    // One timer for the earliest pending `for` deadline, re-armed only when that changes.
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let mut armed: Option<Millis> = None;
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
        };
        for doc in docs {
            dispatch(&doc, &mut link_tx, &outputs).await;
        }
    }
    debug!("ingest stopped");
}

async fn dispatch(doc: &AlertDoc, link_tx: &mut LinkTx, outputs: &Outputs) {
    let payload = Bytes::from(doc.to_json());
    let topic = doc.topic();
    outputs.store.record_alert(doc);
    if let Some((uplink, forward)) = &outputs.uplink {
        if forward.contains(&doc.severity) {
            let item = UplinkItem {
                id: doc.id.clone(),
                topic: topic.clone(),
                payload: payload.clone(),
            };
            if uplink.send(item).is_err() {
                error!(id = %doc.id, "the uplink task is gone; alert not forwarded");
            }
        }
    }
    let publish = Publish::new(Bytes::from(topic), payload, true);
    if let Err(e) = link_tx.send(Packet::Publish(publish, None)).await {
        error!(error = %e, id = %doc.id, "could not publish the alert on the local broker");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Severity, Threshold};
    use crate::topic::TopicFilter;

    fn engine(hold_ms: u64) -> Engine {
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
        Engine::new(
            "site",
            vec![rule],
            Limits::default(),
            Arc::new(Stats::default()),
        )
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
        assert_eq!(e.stats.decode_errors_of("bad"), 3);
        assert_eq!(e.stats.decode_errors_of(OTHER_DEVICES), 2);
        assert_eq!(
            states(&e.on_message(b"sensors/good/temperature", b"99", 2)),
            [("good", AlertState::Raised)]
        );
    }

    #[test]
    fn error_log_is_rate_limited_per_device() {
        let mut log = ErrorLog::default();
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

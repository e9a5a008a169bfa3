//! Ingest: takes sensor messages from the broker's in-process link and drives
//! decode → loss accounting → rules and rollups, then hands each alert transition to its
//! outputs (local retained topic, store, outbox) and history to the store.
//!
//! [`Engine`] is the synchronous core: messages (or bare readings) and time in; alerts,
//! history rows and counters out; every rule's state, rollup window and `seq` memory kept per
//! device and metric. The same engine replays recorded readings under virtual time for
//! `watchpost test-rules`. [`run`] is the thin task around it that owns the link.
//! Malformed input is counted per device and logged at most once per device per minute; it
//! never stops ingest and never touches another device's state.
//!
//! Time comes in as a [`Stamp`] (see [`crate::clock`]): deadlines, staleness and log limits
//! run on its monotonic half, documents, history rows, rollup windows and summaries on its
//! wall half. [`run`] reads both clocks from one [`Clock`], which logs steps of the wall
//! clock.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::aggregate::{Closed, SiteSummary, StreamWindow, window_start};
use crate::alert::{AlertDoc, rfc3339};
use crate::broker::Broker;
use crate::clock::{Clock, Stamp};
use crate::codec::{self, DecodeError, Limits, Message, Readings};
use crate::config::SummaryConfig;
use crate::loss::{Seq, SeqTracker};
use crate::rules::{AlertState, Input, Kind, Millis, Rule, RuleState, Severity, State};
use crate::sources::Source;
use crate::stats::{DeviceCounters, OTHER_DEVICES, Stats};
use crate::store::{DeviceDelta, OutboxEntry, RawRow, RollupRow, SavedAlert, Store};
use crate::value::Value;

/// Devices forgotten since the allocator last gave memory back, at which [`run`] asks it to
/// again while devices are still being forgotten (glibc keeps freed memory in its arenas
/// until told). It asks in any case at the first round that forgets no one after at least
/// [`TRIM_AT_LEAST`] were: a device or two now and then is not worth the allocator's time
/// (its locks are held while it looks). Either way one round after the forgetting: the store
/// frees the rows that forgetting handed it (deltas, partial rollups) once it has written them.
const TRIM_AFTER_FORGOTTEN: usize = 4096;

/// Devices forgotten (about 900 B each) below which no memory is given back yet.
const TRIM_AT_LEAST: usize = 64;

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

/// The metric name in documents and state of presence rules.
pub const PRESENCE_METRIC: &str = codec::STATUS_METRIC;
/// The metric name in documents and state of device-wide silence rules.
pub const ANY_METRIC: &str = "*";

/// What the engine is told to do besides rules.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Gateway (site) id.
    pub gateway: String,
    /// Rules.
    pub rules: Vec<Rule>,
    /// Foreign topic layouts.
    pub sources: Vec<Source>,
    /// Decoder limits.
    pub limits: Limits,
    /// Rollup window length.
    pub window: Duration,
    /// Keep every raw reading for the store.
    pub keep_raw: bool,
    /// Summaries upstream, if configured.
    pub summaries: Option<SummaryConfig>,
    /// A device not heard from for this long counts as stale.
    pub stale_after: Duration,
    /// A device not heard from for this long whose every rule is at rest (nothing raised or
    /// pending, no deadline) is forgotten: dropped from memory, its counters already in the
    /// store. If it comes back, it comes back as new.
    pub forget_after: Duration,
}

/// An alert transition and how its rule wants it forwarded.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// The document.
    pub doc: AlertDoc,
    /// The rule's `forward` override (`None`: by severity).
    pub forward: Option<bool>,
}

/// Per rule, device and metric state, plus decoding, loss accounting and rollups.
pub struct Engine {
    options: EngineOptions,
    window_ms: Millis,
    stats: Arc<Stats>,
    /// Boxed: the map's table has room for more devices than there are, and each slot of a
    /// `Device` would be a few hundred bytes.
    devices: HashMap<Box<str>, Box<Device>>,
    /// Deadlines of rule states (`for`, silence, grace, cooldown, renotify) on the monotonic
    /// clock, earliest first. An entry may be early or stale: when it comes up, the state's
    /// real deadline decides.
    deadlines: BinaryHeap<Reverse<Deadline>>,
    error_log: LogLimit,
    loss_log: LogLimit,
    rollups: Vec<RollupRow>,
    raw: Vec<RawRow>,
    summary: Option<Summary>,
    /// Monotonic time of the next scan for rollup windows of quiet streams.
    next_window_scan: Millis,
    /// Deadlines of devices whose readings come from the site's other gateway, while that
    /// gateway is heard from: they come up as its readings say its time has passed, never on
    /// this gateway's timer, so that both gateways fire them after the same readings.
    peer_deadlines: BinaryHeap<Reverse<Deadline>>,
    /// The other gateway is heard from (a site pair, and not taken over).
    peer_active: bool,
    /// The message being judged came from the other gateway.
    from_peer: bool,
    /// The `[[source]]` (by index) of the message being judged; `None`: native.
    current_source: Option<usize>,
    /// What happened since [`Engine::take_events`] last took it (see [`crate::events`]).
    events: Vec<crate::events::Event>,
    /// Per device, the newest reading this gateway had before it restarted: what a peer's
    /// catch-up brings up to there rebuilds rule states without a word (the transitions it
    /// causes were published before the restart) and without history rows.
    floors: HashMap<Box<str>, Millis>,
}

struct Device {
    streams: Streams,
    /// Rules kept per device (presence, device-wide silence), with their states.
    device_rules: Vec<(usize, RuleState)>,
    seq: SeqTracker,
    counters: DeviceCounters,
    /// What the store and the stats have seen of `counters`.
    published: DeviceCounters,
    /// Start of the latest alert episode per rule, so that episode ids never repeat.
    episodes: Vec<(usize, Millis)>,
    /// What the device last said on its status topic, if anything.
    online: Option<bool>,
    /// Monotonic time of the last message, for staleness (`counters` has the wall time).
    last_seen: Millis,
    /// Its last message came from the site's other gateway (a mirrored reading): its
    /// deadlines follow that gateway's time (see [`Engine::on_peer_message`]).
    via_peer: bool,
    /// The `[[source]]` its messages come through; `None`: Watchpost's own topics.
    source: Option<Box<str>>,
}

/// One device as the status page shows it ([`Engine::devices_view`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeviceView {
    /// Device id.
    pub name: String,
    /// What its status topic last said: `Some(true)` online, `Some(false)` offline.
    pub online: Option<bool>,
    /// Its last message, ms since the epoch.
    pub last_seen_ms: Millis,
    /// Silent for `gateway.stale_after`.
    pub stale: bool,
    /// Its metrics' last values.
    pub values: std::collections::BTreeMap<String, Value>,
    /// Messages lost on the way, from its `seq`.
    pub lost: u64,
    /// Malformed messages and fields.
    pub decode_errors: u64,
    /// `native` (Watchpost's topics), or the `[[source]]` it comes through.
    pub source: String,
    /// Alerts raised now, by rule.
    pub raised: Vec<String>,
}

/// A device's streams by metric name. Devices report a handful of metrics, so a list that
/// holds exactly what it needs beats a hash map, which starts at four slots: at ten thousand
/// devices that difference is megabytes.
#[derive(Default)]
struct Streams(Vec<(Box<str>, Stream)>);

impl Streams {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn values(&self) -> impl Iterator<Item = &Stream> {
        self.0.iter().map(|(_, s)| s)
    }

    fn contains_key(&self, metric: &str) -> bool {
        self.0.iter().any(|(m, _)| &**m == metric)
    }

    fn get_mut(&mut self, metric: &str) -> Option<&mut Stream> {
        self.0
            .iter_mut()
            .find(|(m, _)| &**m == metric)
            .map(|(_, s)| s)
    }

    fn insert(&mut self, metric: Box<str>, stream: Stream) {
        self.0.reserve_exact(1);
        self.0.push((metric, stream));
    }
}

impl<'a> IntoIterator for &'a Streams {
    type Item = (&'a Box<str>, &'a Stream);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Box<str>, Stream)>,
        fn(&'a (Box<str>, Stream)) -> (&'a Box<str>, &'a Stream),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(m, s)| (m, s))
    }
}

impl<'a> IntoIterator for &'a mut Streams {
    type Item = (&'a Box<str>, &'a mut Stream);
    type IntoIter = std::iter::Map<
        std::slice::IterMut<'a, (Box<str>, Stream)>,
        fn(&'a mut (Box<str>, Stream)) -> (&'a Box<str>, &'a mut Stream),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter_mut().map(|(m, s)| (&*m, s))
    }
}

/// One metric of one device.
struct Stream {
    /// The per-metric rules that watch it, by index, with their states.
    rules: Vec<(usize, RuleState)>,
    /// Positions in the device's `device_rules` that a reading of this metric feeds.
    feeds: Vec<usize>,
    window: Option<StreamWindow>,
    /// The last value, for documents of rules removed while raised, and the state a state
    /// window starts in.
    last: Option<Value>,
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
    /// `None` for a device-wide rule.
    metric: Option<Box<str>>,
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
    /// Devices forgotten in this round (silent for `forget_after`, every rule at rest).
    pub forgotten: usize,
}

/// The engine's rules and devices at one moment ([`Engine::snapshot`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The rules in force.
    pub rules: Arc<[Rule]>,
    /// Each device in memory, by name, with the metrics it has reported.
    pub devices: Vec<(Box<str>, Vec<Box<str>>)>,
}

/// What the rules of a reload changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReloadOutcome {
    /// Rules in force now.
    pub rules: usize,
    /// Rules that kept their alert states.
    pub kept: usize,
    /// Rules that are new.
    pub added: Vec<String>,
    /// Rules that are gone (their raised alerts were cleared).
    pub removed: Vec<String>,
}

/// Where one rule state lives, for stepping it.
struct Target<'a> {
    device: &'a str,
    /// The metric in documents and state keys.
    metric: &'a str,
    /// Deadline key: `None` for a device-wide rule.
    stream: Option<&'a str>,
    episodes: &'a mut Vec<(usize, Millis)>,
}

/// What one rule step may touch besides its own state.
struct StepContext<'a> {
    /// Steps rule states without publishing, logging or counting what they cause (a peer's
    /// catch-up of what this gateway judged before it restarted).
    quiet: bool,
    gateway: &'a str,
    stats: &'a Stats,
    deadlines: &'a mut BinaryHeap<Reverse<Deadline>>,
    out: &'a mut Vec<Alert>,
}

impl StepContext<'_> {
    fn step(
        &mut self,
        rule: &Rule,
        rule_idx: usize,
        state: &mut RuleState,
        target: Target<'_>,
        input: Input,
        now: Stamp,
    ) {
        let transition = rule.step(state, input, now);
        self.after_step(rule, rule_idx, state, target, transition, now);
    }

    fn after_step(
        &mut self,
        rule: &Rule,
        rule_idx: usize,
        state: &mut RuleState,
        target: Target<'_>,
        transition: Option<crate::rules::Transition>,
        now: Stamp,
    ) {
        let Target {
            device,
            metric,
            stream,
            episodes,
        } = target;
        if let Some(at) = rule.deadline(state) {
            self.schedule(at, state, device, stream, rule_idx);
        }
        let Some(mut t) = transition else { return };
        if t.state == AlertState::Raised && t.repeat == 0 {
            // The alert id names the episode by its start in ms: two episodes of one rule and
            // device that begin in the same millisecond get distinct starts.
            match episodes.iter().position(|(r, _)| *r == rule_idx) {
                Some(i) => {
                    t.since = t.since.max(episodes[i].1 + 1);
                    episodes[i].1 = t.since;
                }
                None => episodes.push((rule_idx, t.since)),
            }
            if let State::Raised { since, .. } = &mut state.core {
                since.wall = t.since;
            }
        }
        if self.quiet {
            return;
        }
        match (t.state, t.repeat) {
            (AlertState::Raised, 0) => {
                self.stats.count_transition(rule.severity, true);
                match t.threshold {
                    Some(threshold) => {
                        info!(device, metric, rule = %rule.name, kind = rule.kind.name(), value = %t.value, threshold, severity = rule.severity.as_str(), "alert raised")
                    }
                    None => {
                        info!(device, metric, rule = %rule.name, kind = rule.kind.name(), value = %t.value, severity = rule.severity.as_str(), "alert raised")
                    }
                }
            }
            (AlertState::Raised, n) => {
                debug!(device, metric, rule = %rule.name, repeat = n, "alert still raised (renotify)")
            }
            (AlertState::Cleared, _) => {
                self.stats.count_transition(rule.severity, false);
                info!(device, metric, rule = %rule.name, value = %t.value, "alert cleared");
            }
        }
        let _ = now;
        self.out.push(Alert {
            doc: AlertDoc::new(self.gateway, rule, device, metric, &t),
            forward: rule.forward,
        });
    }

    /// Schedules a wake-up at monotonic time `at` unless one at or before it is already
    /// scheduled for this state: a wake-up that comes early finds the state's real deadline
    /// and schedules that.
    fn schedule(
        &mut self,
        at: Millis,
        state: &mut RuleState,
        device: &str,
        stream: Option<&str>,
        rule: usize,
    ) {
        if state.scheduled == 0 || at < state.scheduled {
            state.scheduled = at;
            self.push_deadline(at, device, stream, rule);
        }
    }

    fn push_deadline(&mut self, at: Millis, device: &str, stream: Option<&str>, rule: usize) {
        self.deadlines.push(Reverse(Deadline {
            at,
            device: device.into(),
            metric: stream.map(Into::into),
            rule,
        }));
    }
}

/// The device a message is about, made if new, with where the message came from noted: the
/// site's other gateway (`from_peer`) and the `[[source]]` it came through.
fn arriving<'a>(
    devices: &'a mut HashMap<Box<str>, Box<Device>>,
    options: &EngineOptions,
    name: &str,
    from_peer: bool,
    source: Option<usize>,
) -> &'a mut Box<Device> {
    let device = devices
        .entry(name.into())
        .or_insert_with(|| Box::new(new_device(&options.rules, name)));
    device.via_peer = from_peer;
    note_source(device, options, source);
    device
}

/// Remembers which `[[source]]` (by index into `options.sources`) a device's messages come
/// through; allocates only when that changes.
fn note_source(device: &mut Device, options: &EngineOptions, source: Option<usize>) {
    let name = source
        .and_then(|i| options.sources.get(i))
        .map(|s| s.name.as_str());
    if device.source.as_deref() != name {
        device.source = name.map(Into::into);
    }
}

/// `v` without spare room: a filtered collect starts at four elements, and ten thousand
/// devices each keep theirs for good.
fn exact<T>(mut v: Vec<T>) -> Vec<T> {
    v.shrink_to_fit();
    v
}

/// The rules that keep one state for the whole device `name` (presence, device-wide
/// silence), by index: what a new device is given. Home Assistant discovery asks the same.
pub fn device_rules<'a>(rules: &'a [Rule], name: &str) -> impl Iterator<Item = usize> + 'a {
    let status_topic = format!("{}/{name}/{}", codec::TOPIC_ROOT, codec::STATUS_METRIC);
    let any_metric = format!("{}/{name}/+", codec::TOPIC_ROOT);
    rules
        .iter()
        .enumerate()
        .filter(move |(_, r)| match r.kind {
            Kind::Presence { .. } => r.filter.matches(&status_topic),
            ref k if k.per_device() => r.filter.can_match_pattern(&any_metric),
            _ => false,
        })
        .map(|(i, _)| i)
}

/// The rules that keep one state per metric and watch `metric` of device `name`, by index:
/// what a new stream is given. Home Assistant discovery asks the same.
pub fn stream_rules<'a>(
    rules: &'a [Rule],
    name: &str,
    metric: &str,
) -> impl Iterator<Item = usize> + 'a {
    let topic = format!("{}/{name}/{metric}", codec::TOPIC_ROOT);
    rules
        .iter()
        .enumerate()
        .filter(move |(_, r)| !r.kind.per_device() && r.filter.matches(&topic))
        .map(|(i, _)| i)
}

fn new_device(rules: &[Rule], name: &str) -> Device {
    let device_rules = device_rules(rules, name)
        .map(|i| (i, rules[i].new_state()))
        .collect();
    Device {
        device_rules: exact(device_rules),
        streams: Streams::default(),
        seq: SeqTracker::default(),
        counters: DeviceCounters::default(),
        published: DeviceCounters::default(),
        episodes: Vec::new(),
        online: None,
        last_seen: 0,
        via_peer: false,
        source: None,
    }
}

fn new_stream(
    rules: &[Rule],
    device_rules: &[(usize, RuleState)],
    device_name: &str,
    metric: &str,
) -> Stream {
    let topic = format!("{}/{device_name}/{metric}", codec::TOPIC_ROOT);
    let per_metric = stream_rules(rules, device_name, metric)
        .map(|i| (i, rules[i].new_state()))
        .collect();
    let feeds = device_rules
        .iter()
        .enumerate()
        .filter(|(_, (i, _))| {
            matches!(rules[*i].kind, Kind::Silence { .. }) && rules[*i].filter.matches(&topic)
        })
        .map(|(pos, _)| pos)
        .collect();
    Stream {
        rules: exact(per_metric),
        feeds: exact(feeds),
        window: None,
        last: None,
    }
}

impl Engine {
    /// An engine with no state yet; `now` (wall clock) starts the first summary interval.
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
            next_window_scan: 0,
            peer_deadlines: BinaryHeap::new(),
            peer_active: false,
            from_peer: false,
            floors: HashMap::new(),
            events: Vec::new(),
            current_source: None,
        }
    }

    /// True if a message on `topic` is for ingest: `sensors/...` or a source's topic. Clients
    /// publish on other topics too (anything an operator's tools use); those are not readings.
    pub fn handles(&self, topic: &[u8]) -> bool {
        let Ok(topic) = std::str::from_utf8(topic) else {
            // Counted as malformed if it claims to be a sensor's.
            return topic.starts_with(codec::TOPIC_ROOT.as_bytes());
        };
        topic.split('/').next() == Some(codec::TOPIC_ROOT)
            || self.options.sources.iter().any(|s| s.matches(topic))
    }

    /// The rules in force.
    pub fn rules(&self) -> &[Rule] {
        &self.options.rules
    }

    /// Handles one message at time `now`: native `sensors/...` or a configured source.
    /// Returns the alert transitions it caused; history waits for [`Engine::housekeeping`].
    pub fn on_message(
        &mut self,
        topic: &[u8],
        payload: &[u8],
        now: impl Into<Stamp>,
    ) -> Vec<Alert> {
        let now = now.into();
        Stats::inc(&self.stats.messages);
        let Ok(topic) = std::str::from_utf8(topic) else {
            self.malformed(None, "<not UTF-8>", &DecodeError::NotUtf8, now);
            return Vec::new();
        };
        let native = topic.split('/').next() == Some(codec::TOPIC_ROOT);
        let mut source = None;
        let decoded = if native {
            codec::decode(topic, payload, self.options.limits)
        } else {
            let limits = self.options.limits;
            match self.options.sources.iter().enumerate().find_map(|(i, s)| {
                let decoded = s.decode(topic, payload, limits)?;
                if let Ok(Message::Readings(r)) = &decoded {
                    if r.unmapped > 0 {
                        let n = u64::from(r.unmapped);
                        let mut counts = self
                            .stats
                            .unmapped_by_source
                            .lock()
                            .unwrap_or_else(|p| p.into_inner());
                        match counts.get_mut(&s.name) {
                            Some(count) => *count += n,
                            None => {
                                counts.insert(s.name.clone(), n);
                            }
                        }
                    }
                }
                Some((i, decoded))
            }) {
                Some((i, result)) => {
                    source = Some(i);
                    result
                }
                None => {
                    debug!(topic, "message on a topic no source matches");
                    return Vec::new();
                }
            }
        };
        self.current_source = source;
        match decoded {
            Ok(Message::Readings(r)) => self.readings(topic, r, now),
            Ok(Message::Status { device, online }) => self.presence(&device, online, now),
            Err(rejected) => {
                self.malformed(rejected.device.as_deref(), topic, &rejected.error, now);
                Vec::new()
            }
        }
    }

    /// One reading without a message around it (replays of recorded readings).
    pub fn on_reading(
        &mut self,
        device: &str,
        metric: &str,
        value: Value,
        now: impl Into<Stamp>,
    ) -> Vec<Alert> {
        let now = now.into();
        Stats::inc(&self.stats.messages);
        self.current_source = None;
        let readings = Readings {
            device: device.into(),
            seq: None,
            values: vec![(metric.into(), value)],
            rejected: Vec::new(),
            unmapped: 0,
        };
        self.readings("<replay>", readings, now)
    }

    /// A device said it is online or offline (a status message, usually its last will).
    pub fn presence(
        &mut self,
        device_name: &str,
        online: bool,
        now: impl Into<Stamp>,
    ) -> Vec<Alert> {
        let now = now.into();
        debug!(device = device_name, online, "device presence");
        let quiet = self.seen_before_restart(device_name, now.wall);
        let Engine {
            options,
            stats,
            devices,
            deadlines,
            peer_deadlines,
            peer_active,
            from_peer,
            current_source,
            ..
        } = self;
        let device = arriving(devices, options, device_name, *from_peer, *current_source);
        let deadlines = if *from_peer && *peer_active {
            peer_deadlines
        } else {
            deadlines
        };
        device.counters.messages += 1;
        device.counters.last_seen_ms = now.wall;
        device.last_seen = now.mono;
        if device.online != Some(online) {
            self.events.push(crate::events::Event::Presence {
                device: device_name.into(),
                online,
                at: now.wall,
            });
        }
        device.online = Some(online);
        let mut out = Vec::new();
        let mut ctx = StepContext {
            quiet,
            gateway: &options.gateway,
            stats,
            deadlines,
            out: &mut out,
        };
        let Device {
            device_rules,
            episodes,
            ..
        } = &mut **device;
        for (rule_idx, state) in device_rules.iter_mut() {
            let rule = &options.rules[*rule_idx];
            if matches!(rule.kind, Kind::Presence { .. }) {
                let target = Target {
                    device: device_name,
                    metric: PRESENCE_METRIC,
                    stream: None,
                    episodes,
                };
                ctx.step(rule, *rule_idx, state, target, Input::Presence(online), now);
            }
        }
        out
    }

    fn readings(&mut self, topic: &str, readings: Readings<'_>, now: Stamp) -> Vec<Alert> {
        let Readings {
            device: device_name,
            seq,
            mut values,
            rejected,
            unmapped,
        } = readings;
        let device_name: &str = &device_name;
        let quiet = self.seen_before_restart(device_name, now.wall);
        for (field, error) in &rejected {
            self.malformed(
                Some(device_name),
                &format!("{topic} field {field:?}"),
                error,
                now,
            );
        }
        // A device may report only so many metrics: each costs a stream, rollups and rows.
        let max = self.options.limits.max_metrics_per_device;
        let streams = self.devices.get(device_name).map(|d| &d.streams);
        let mut known = streams.map_or(0, Streams::len);
        let mut over = Vec::new();
        values.retain(|(metric, _)| {
            if streams.is_some_and(|s| s.contains_key(metric.as_ref())) {
                true
            } else if known < max {
                known += 1;
                true
            } else {
                over.push(metric.to_string());
                false
            }
        });
        for metric in over {
            let what = format!("{topic} metric {metric:?}");
            self.malformed(
                Some(device_name),
                &what,
                &DecodeError::TooManyMetrics { max },
                now,
            );
        }
        let Engine {
            options,
            window_ms,
            stats,
            devices,
            deadlines,
            peer_deadlines,
            peer_active,
            from_peer,
            loss_log,
            rollups,
            raw,
            summary,
            events,
            current_source,
            ..
        } = self;
        let device = arriving(devices, options, device_name, *from_peer, *current_source);
        let deadlines = if *from_peer && *peer_active {
            peer_deadlines
        } else {
            deadlines
        };
        device.counters.messages += 1;
        device.counters.last_seen_ms = now.wall;
        device.last_seen = now.mono;
        device.counters.unmapped += u64::from(unmapped);
        if device.online == Some(false) {
            // Readings mean it is back, whatever its last will said.
            device.online = Some(true);
            events.push(crate::events::Event::Presence {
                device: device_name.into(),
                online: true,
                at: now.wall,
            });
        }

        // The device's own counter: drop duplicates; late messages go to history, not rules,
        // which judge the present.
        let judge = match seq.map(|s| (s, device.seq.observe(s))) {
            None => true,
            Some((_, outcome)) if quiet => outcome != Seq::Duplicate && outcome != Seq::Late,
            Some((s, outcome)) => {
                device.counters.loss.count(outcome);
                match outcome {
                    Seq::Duplicate => {
                        Stats::inc(&stats.duplicates);
                        return Vec::new();
                    }
                    Seq::Gap(n) => {
                        Stats::add(&stats.seq_gap_messages, n);
                        if let Some(suppressed) = loss_log.should_log(device_name, now.mono) {
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
                    Seq::Late => {
                        Stats::inc(&stats.seq_late);
                        false
                    }
                    Seq::First | Seq::InOrder | Seq::Restart => true,
                }
            }
        };

        let mut out = Vec::new();
        let mut ctx = StepContext {
            quiet,
            gateway: &options.gateway,
            stats,
            deadlines,
            out: &mut out,
        };
        Stats::add(&ctx.stats.readings, values.len() as u64);
        device.counters.readings += values.len() as u64;
        let Device {
            streams,
            device_rules,
            episodes,
            ..
        } = &mut **device;
        for (metric, value) in &values {
            let metric = metric.as_ref();
            if !streams.contains_key(metric) {
                // A new stream: find the rules that watch it, once.
                let stream = new_stream(&options.rules, device_rules, device_name, metric);
                streams.insert(metric.into(), stream);
                events.push(crate::events::Event::Stream {
                    device: device_name.into(),
                    metric: metric.into(),
                });
            }
            let stream = streams.get_mut(metric).expect("inserted above");
            if quiet {
                // Its history was written before the restart.
                stream.last = Some(value.clone());
            } else {
                match &mut stream.window {
                    Some(w) => {
                        if let Some(closed) = w.add(value, now.wall, *window_ms) {
                            rollups.push(RollupRow {
                                device: device_name.into(),
                                metric: metric.into(),
                                rollup: closed,
                            });
                        }
                    }
                    None => {
                        stream.window = Some(StreamWindow::new(
                            value,
                            stream.last.as_ref(),
                            now.wall,
                            *window_ms,
                        ))
                    }
                }
                if stream.last.as_ref() != Some(value) {
                    stream.last = Some(value.clone());
                }
                if options.keep_raw {
                    raw.push(RawRow {
                        device: device_name.into(),
                        metric: metric.into(),
                        at: now.wall,
                        value: value.clone(),
                        seq,
                    });
                }
                if let (Some(summary), Value::Number(n)) = (summary.as_mut(), value) {
                    if let Some((_, s)) = summary.metrics.iter_mut().find(|(m, _)| m == metric) {
                        s.add(device_name, *n);
                    }
                }
            }
            if !judge {
                continue;
            }
            for (rule_idx, state) in stream.rules.iter_mut() {
                let target = Target {
                    device: device_name,
                    metric,
                    stream: Some(metric),
                    episodes,
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
            for &pos in &stream.feeds {
                let (rule_idx, state) = &mut device_rules[pos];
                let target = Target {
                    device: device_name,
                    metric: ANY_METRIC,
                    stream: None,
                    episodes,
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
        if judge {
            // Any reading says the device is there.
            for (rule_idx, state) in device_rules.iter_mut() {
                let rule = &options.rules[*rule_idx];
                if matches!(rule.kind, Kind::Presence { .. }) && state.core != State::Normal {
                    let target = Target {
                        device: device_name,
                        metric: PRESENCE_METRIC,
                        stream: None,
                        episodes,
                    };
                    ctx.step(rule, *rule_idx, state, target, Input::Presence(true), now);
                }
            }
        }
        out
    }

    /// Lets deadlines whose time has come fire; returns the transitions. Each is judged at
    /// its deadline, not at `now`: a wake-up that comes late (a busy gateway, or one that
    /// waited for its peer's readings) writes the same document as one on time.
    pub fn on_tick(&mut self, now: impl Into<Stamp>) -> Vec<Alert> {
        self.fire_due(false, now.into())
    }

    /// A message from the site's other gateway: a reading or presence its own client gave it,
    /// with the stamp it gave it (put on this gateway's clock). The deadlines of that
    /// gateway's devices that come up to the stamp fire first, then the message is judged
    /// like one of this gateway's own clients'.
    pub fn on_peer_message(&mut self, topic: &[u8], payload: &[u8], stamp: Stamp) -> Vec<Alert> {
        let mut out = self.fire_due(true, stamp);
        self.from_peer = true;
        out.extend(self.on_message(topic, payload, stamp));
        self.from_peer = false;
        out
    }

    /// The other gateway says its time is `stamp`, and that every reading it stamped up to
    /// then has been sent: the deadlines of its devices up to `stamp` fire.
    pub fn peer_time(&mut self, stamp: Stamp) -> Vec<Alert> {
        self.fire_due(true, stamp)
    }

    /// The other gateway is heard from (`true`), or has not been for `peer.takeover_after`
    /// (`false`): then this gateway's timer fires the deadlines of its devices too.
    pub fn set_peer_active(&mut self, active: bool) {
        if self.peer_active && !active {
            self.deadlines.extend(self.peer_deadlines.drain());
        }
        self.peer_active = active;
    }

    /// Every device in memory, as the status page shows it.
    pub fn devices_view(&self, now: impl Into<Stamp>) -> Vec<DeviceView> {
        let now = now.into();
        let stale_ms = self.options.stale_after.as_millis() as Millis;
        let rules = &self.options.rules;
        self.devices
            .iter()
            .filter(|(name, _)| &***name != OTHER_DEVICES)
            .map(|(name, d)| {
                let raised_in = |states: &[(usize, RuleState)]| -> Vec<String> {
                    states
                        .iter()
                        .filter(|(_, s)| matches!(s.core, State::Raised { .. }))
                        .map(|(i, _)| rules[*i].name.clone())
                        .collect()
                };
                let mut raised = raised_in(&d.device_rules);
                for s in d.streams.values() {
                    raised.extend(raised_in(&s.rules));
                }
                DeviceView {
                    name: name.to_string(),
                    online: d.online,
                    last_seen_ms: d.counters.last_seen_ms,
                    stale: now.mono.saturating_sub(d.last_seen) >= stale_ms,
                    values: (&d.streams)
                        .into_iter()
                        .filter_map(|(m, s)| Some((m.to_string(), s.last.clone()?)))
                        .collect(),
                    lost: d.counters.loss.lost,
                    decode_errors: d.counters.decode_errors,
                    source: d.source.as_deref().unwrap_or("native").to_owned(),
                    raised,
                }
            })
            .collect()
    }

    /// Takes what happened since the last call: presence changes, new streams, forgotten
    /// devices and rule changes (alert transitions are returned where they happen).
    pub fn take_events(&mut self) -> Vec<crate::events::Event> {
        std::mem::take(&mut self.events)
    }

    /// Sets what this gateway had judged before it restarted, per device (the wall time of
    /// its last reading): see [`Engine::on_peer_message`].
    pub fn set_floors(&mut self, floors: impl IntoIterator<Item = (String, Millis)>) {
        self.floors = floors
            .into_iter()
            .map(|(device, at)| (device.into_boxed_str(), at))
            .collect();
    }

    /// True if a peer's message about `device` stamped `wall` was judged here before the
    /// restart.
    fn seen_before_restart(&self, device: &str, wall: Millis) -> bool {
        self.from_peer && self.floors.get(device).is_some_and(|f| wall <= *f)
    }

    /// Fires the deadlines of one heap (this gateway's timer's, or the peer's) due at
    /// `until`. A deadline of a device that changed hands moves to the other heap, at its
    /// state's real deadline.
    fn fire_due(&mut self, peer_heap: bool, until: Stamp) -> Vec<Alert> {
        let mut out = Vec::new();
        loop {
            let heap = if peer_heap {
                &mut self.peer_deadlines
            } else {
                &mut self.deadlines
            };
            if heap.peek().is_none_or(|Reverse(d)| d.at > until.mono) {
                break;
            }
            let Some(Reverse(d)) = heap.pop() else {
                break;
            };
            let Engine {
                options,
                stats,
                devices,
                deadlines,
                peer_deadlines,
                peer_active,
                floors,
                ..
            } = self;
            let Some(dev) = devices.get_mut(&*d.device) else {
                continue;
            };
            let peer_owned = dev.via_peer && *peer_active;
            let floor = floors.get(&*d.device).copied().unwrap_or(0);
            let Device {
                streams,
                device_rules,
                episodes,
                ..
            } = &mut **dev;
            let (slot, metric) = match &d.metric {
                Some(m) => (
                    streams
                        .get_mut(m)
                        .and_then(|s| s.rules.iter_mut().find(|(i, _)| *i == d.rule)),
                    &**m,
                ),
                None => {
                    let metric = if matches!(
                        options.rules.get(d.rule).map(|r| &r.kind),
                        Some(Kind::Presence { .. })
                    ) {
                        PRESENCE_METRIC
                    } else {
                        ANY_METRIC
                    };
                    (device_rules.iter_mut().find(|(i, _)| *i == d.rule), metric)
                }
            };
            let Some((_, state)) = slot else { continue };
            if state.scheduled == d.at {
                // The wake-up this state was waiting for: spent.
                state.scheduled = 0;
            }
            let rule = &options.rules[d.rule];
            // A deadline a peer's catch-up reaches before this gateway's restart came up then.
            let deadline = rule.deadline(state);
            let quiet = peer_heap && deadline.is_some_and(|due| until.at_mono(due).wall <= floor);
            let mut ctx = StepContext {
                quiet,
                gateway: &options.gateway,
                stats,
                deadlines: if peer_owned {
                    peer_deadlines
                } else {
                    deadlines
                },
                out: &mut out,
            };
            match deadline {
                Some(due) if due <= until.mono && peer_owned == peer_heap => {
                    let at = until.at_mono(due);
                    let transition = rule.step(state, Input::Tick, at);
                    let target = Target {
                        device: &d.device,
                        metric,
                        stream: d.metric.as_deref(),
                        episodes,
                    };
                    ctx.after_step(rule, d.rule, state, target, transition, at);
                }
                Some(later) => ctx.schedule(later, state, &d.device, d.metric.as_deref(), d.rule),
                None => {}
            }
        }
        out
    }

    /// The earliest monotonic time at which [`Engine::on_tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.deadlines.peek().map(|Reverse(d)| d.at)
    }

    /// Brings back alerts that were raised when the gateway stopped, so that they are not
    /// raised a second time. Alerts of rules that no longer exist are skipped. A saved
    /// alert's `since` is a wall time; its monotonic time is taken to be as long ago.
    pub fn restore(&mut self, saved: &[SavedAlert], now: impl Into<Stamp>) -> usize {
        let now = now.into();
        let mut restored = 0;
        for s in saved.iter().filter(|s| s.raised) {
            let Some(rule_idx) = self.options.rules.iter().position(|r| r.name == s.rule) else {
                continue;
            };
            let rules = &self.options.rules;
            let device = self
                .devices
                .entry(s.device.as_str().into())
                .or_insert_with(|| Box::new(new_device(rules, &s.device)));
            let state = if rules[rule_idx].kind.per_device() {
                device
                    .device_rules
                    .iter_mut()
                    .find(|(i, _)| *i == rule_idx)
                    .map(|(_, st)| st)
            } else {
                if !device.streams.contains_key(s.metric.as_str()) {
                    let stream = new_stream(rules, &device.device_rules, &s.device, &s.metric);
                    device.streams.insert(s.metric.as_str().into(), stream);
                }
                device.streams.get_mut(s.metric.as_str()).and_then(|st| {
                    st.rules
                        .iter_mut()
                        .find(|(i, _)| *i == rule_idx)
                        .map(|(_, st)| st)
                })
            };
            if let Some(state) = state {
                state.core = State::Raised {
                    since: Stamp {
                        wall: s.since,
                        mono: now.mono_of(s.since),
                    },
                    threshold: s.threshold,
                };
                // What the last document said, so that a renotification repeats it.
                state.value = serde_json::from_str::<AlertDoc>(&s.doc)
                    .map(|d| d.value)
                    .unwrap_or_else(|_| Value::Number(s.threshold.unwrap_or_default()));
                state.notified_at = now.mono;
                device.episodes.retain(|(r, _)| *r != rule_idx);
                device.episodes.push((rule_idx, s.since));
                restored += 1;
            }
        }
        self.rebuild_deadlines();
        restored
    }

    /// Swaps in new rules and sources. A rule that keeps its name and kind keeps its states;
    /// raised alerts of rules that are gone are cleared. Returns the documents of those
    /// clears and what changed.
    pub fn replace_rules(
        &mut self,
        rules: Vec<Rule>,
        sources: Vec<Source>,
        now: impl Into<Stamp>,
    ) -> (Vec<Alert>, ReloadOutcome) {
        let now = now.into();
        let old = std::mem::replace(&mut self.options.rules, rules);
        self.options.sources = sources;
        let new = &self.options.rules;
        let carried = |old_idx: usize| {
            new.iter().position(|r| {
                r.name == old[old_idx].name && r.kind.name() == old[old_idx].kind.name()
            })
        };
        let mut outcome = ReloadOutcome {
            rules: new.len(),
            kept: old
                .iter()
                .enumerate()
                .filter(|(i, _)| carried(*i).is_some())
                .count(),
            added: new
                .iter()
                .filter(|r| {
                    !old.iter()
                        .any(|o| o.name == r.name && o.kind.name() == r.kind.name())
                })
                .map(|r| r.name.clone())
                .collect(),
            removed: old
                .iter()
                .filter(|o| {
                    !new.iter()
                        .any(|r| r.name == o.name && r.kind.name() == o.kind.name())
                })
                .map(|r| r.name.clone())
                .collect(),
        };
        outcome.removed.sort();
        let mut out = Vec::new();
        let clear = |rule: &Rule,
                     device: &str,
                     metric: &str,
                     state: &RuleState,
                     last: Option<&Value>,
                     out: &mut Vec<Alert>| {
            if let State::Raised { since, threshold } = state.core {
                let t = crate::rules::Transition {
                    state: AlertState::Cleared,
                    since: since.wall,
                    at: now.wall,
                    value: last.unwrap_or(&state.value).clone(),
                    threshold,
                    repeat: 0,
                };
                info!(device, metric, rule = %rule.name, "alert cleared: its rule was removed");
                out.push(Alert {
                    doc: AlertDoc::new(&self.options.gateway, rule, device, metric, &t),
                    forward: rule.forward,
                });
            }
        };
        for (name, device) in &mut self.devices {
            let mut fresh = new_device(new, name);
            for (new_idx, state) in &mut fresh.device_rules {
                if let Some((_, old_state)) = device
                    .device_rules
                    .iter()
                    .find(|(i, _)| carried(*i) == Some(*new_idx))
                {
                    *state = old_state.clone();
                }
            }
            for (old_idx, state) in &device.device_rules {
                if carried(*old_idx).is_none() {
                    let metric = if matches!(old[*old_idx].kind, Kind::Presence { .. }) {
                        PRESENCE_METRIC
                    } else {
                        ANY_METRIC
                    };
                    clear(&old[*old_idx], name, metric, state, None, &mut out);
                }
            }
            for (metric, stream) in &mut device.streams {
                let mut next = new_stream(new, &fresh.device_rules, name, metric);
                for (new_idx, state) in &mut next.rules {
                    if let Some((_, old_state)) = stream
                        .rules
                        .iter()
                        .find(|(i, _)| carried(*i) == Some(*new_idx))
                    {
                        *state = old_state.clone();
                    }
                }
                for (old_idx, state) in &stream.rules {
                    if carried(*old_idx).is_none() {
                        clear(
                            &old[*old_idx],
                            name,
                            metric,
                            state,
                            stream.last.as_ref(),
                            &mut out,
                        );
                    }
                }
                stream.rules = next.rules;
                stream.feeds = next.feeds;
            }
            device.device_rules = fresh.device_rules;
            device.episodes = device
                .episodes
                .iter()
                .filter_map(|&(i, t)| carried(i).map(|n| (n, t)))
                .collect();
        }
        for alert in &out {
            self.stats.count_transition(alert.doc.severity, false);
        }
        self.rebuild_deadlines();
        (out, outcome)
    }

    fn rebuild_deadlines(&mut self) {
        self.deadlines.clear();
        for (name, device) in &mut self.devices {
            for (i, state) in &mut device.device_rules {
                state.scheduled = 0;
                if let Some(at) = self.options.rules[*i].deadline(state) {
                    state.scheduled = at;
                    self.deadlines.push(Reverse(Deadline {
                        at,
                        device: name.clone(),
                        metric: None,
                        rule: *i,
                    }));
                }
            }
            for (metric, stream) in &mut device.streams {
                for (i, state) in &mut stream.rules {
                    state.scheduled = 0;
                    if let Some(at) = self.options.rules[*i].deadline(state) {
                        state.scheduled = at;
                        self.deadlines.push(Reverse(Deadline {
                            at,
                            device: name.clone(),
                            metric: Some(metric.clone()),
                            rule: *i,
                        }));
                    }
                }
            }
        }
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
    pub fn housekeeping(&mut self, now: impl Into<Stamp>) -> Housekeeping {
        let now = now.into();
        if now.mono >= self.next_window_scan {
            // A window ends at the next reading, or here for a stream that went quiet.
            self.next_window_scan = now.mono.saturating_add(5_000);
            self.close_windows(|w, len| w.close_if_due(now.wall, len));
        }
        let mut out = Housekeeping::default();
        let mut changed = Vec::new();
        let stale_after = self.options.stale_after.as_millis() as Millis;
        let (mut online, mut offline, mut stale, mut active) = (0, 0, 0, 0);
        for (name, d) in &mut self.devices {
            if &**name != OTHER_DEVICES {
                match d.online {
                    Some(false) => offline += 1,
                    _ if now.mono.saturating_sub(d.last_seen) > stale_after => stale += 1,
                    _ => online += 1,
                }
            }
            let raised = |(_, s): &(usize, RuleState)| matches!(s.core, State::Raised { .. });
            active += d.device_rules.iter().filter(|r| raised(r)).count() as u64;
            active += d
                .streams
                .values()
                .map(|s| s.rules.iter().filter(|r| raised(r)).count() as u64)
                .sum::<u64>();
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
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.devices_online.store(online, Relaxed);
        self.stats.devices_offline.store(offline, Relaxed);
        self.stats.devices_stale.store(stale, Relaxed);
        self.stats.alerts_active.store(active, Relaxed);
        out.summary = self.summary_due(now.wall);
        out.forgotten = self.forget_idle(now);
        (out.rollups, out.raw) = self.take_history();
        out
    }

    /// Drops the devices silent for `forget_after` whose every rule is at rest: nothing
    /// raised, nothing pending, no deadline to wait for (a silence rule that has yet to fire
    /// keeps its device). Their counters went to the store in this round (the caller runs this
    /// after the deltas); an open rollup window goes to the store as a partial rollup, which
    /// merges with the rest of its window if the device returns within it. Learned memory of
    /// rules (a deviation rule's mean, a rate or flapping window) and the `seq` memory go
    /// with the device: if it returns, it starts over as a new device, its first `seq` taken
    /// as it comes, so no loss is reported for the time it was away. Returns how many.
    fn forget_idle(&mut self, now: Stamp) -> usize {
        let forget_after = self.options.forget_after.as_millis() as Millis;
        let rules = &self.options.rules;
        let gone: Vec<Box<str>> = self
            .devices
            .iter()
            .filter(|(name, d)| {
                &***name != OTHER_DEVICES
                    && now.mono.saturating_sub(d.last_seen) >= forget_after
                    && at_rest(rules, d)
            })
            .map(|(name, _)| name.clone())
            .collect();
        if gone.is_empty() {
            return 0;
        }
        for name in &gone {
            let Some(d) = self.devices.remove(name) else {
                continue;
            };
            for (metric, s) in &d.streams {
                if let Some(w) = &s.window {
                    self.rollups.push(RollupRow {
                        device: name.to_string(),
                        metric: metric.to_string(),
                        rollup: w.rollup(now.wall, self.window_ms),
                    });
                }
            }
        }
        // A hash table keeps its size after removals: give the room back once most is empty.
        if self.devices.capacity() > 4 * self.devices.len().max(64) {
            self.devices.shrink_to_fit();
        }
        self.error_log.prune(now.mono);
        self.loss_log.prune(now.mono);
        self.stats.forget_devices(gone.iter().map(|n| &**n));
        self.events
            .push(crate::events::Event::Forgotten(gone.clone().into()));
        Stats::add(&self.stats.devices_forgotten, gone.len() as u64);
        debug!(
            forgotten = gone.len(),
            remaining = self.devices.len(),
            "devices silent for gateway.forget_after forgotten; their counters and history stay in the database"
        );
        gone.len()
    }

    /// Devices held in memory now.
    pub fn devices_in_memory(&self) -> usize {
        self.devices.len()
    }

    /// The rules in force and every device in memory with the metrics it reported: what a
    /// listener of [`crate::events`] that fell behind reads again.
    pub fn snapshot(&self) -> Snapshot {
        let mut devices: Vec<(Box<str>, Vec<Box<str>>)> = self
            .devices
            .iter()
            .filter(|(name, _)| &***name != OTHER_DEVICES)
            .map(|(name, d)| {
                let metrics = d.streams.into_iter().map(|(m, _)| m.clone()).collect();
                (name.clone(), metrics)
            })
            .collect();
        devices.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Snapshot {
            rules: self.options.rules.clone().into(),
            devices,
        }
    }

    /// Everything that would be lost by stopping now: open windows as partial rollups (they
    /// merge with the rest of their window after a restart) and unpublished counters.
    pub fn finish(&mut self, now: impl Into<Stamp>) -> Housekeeping {
        let now = now.into();
        self.close_windows(|w, len| Some(w.rollup(now.wall, len)));
        self.next_window_scan = Millis::MAX;
        self.housekeeping(now)
    }

    fn close_windows(&mut self, mut close: impl FnMut(&StreamWindow, Millis) -> Option<Closed>) {
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
        let doc = json!({ "gateway": self.options.gateway, "from": rfc3339(s.from), "to": rfc3339(to), "metrics": metrics });
        let id = format!("{}:summary:{}", self.options.gateway, s.from);
        s.from = window_start(now, s.interval);
        Some(OutboxEntry {
            id,
            topic: SUMMARY_TOPIC.into(),
            payload: Bytes::from(doc.to_string()),
            retain: false,
        })
    }

    fn malformed(&mut self, device: Option<&str>, what: &str, error: &DecodeError, now: Stamp) {
        Stats::inc(&self.stats.decode_errors);
        let tracked = device.filter(|d| {
            self.devices.contains_key(*d) || self.devices.len() < MAX_ERROR_ONLY_DEVICES
        });
        let key = tracked.unwrap_or(OTHER_DEVICES);
        let rules = &self.options.rules;
        let d = self
            .devices
            .entry(key.into())
            .or_insert_with(|| Box::new(new_device(rules, key)));
        d.counters.decode_errors += 1;
        d.counters.last_seen_ms = now.wall;
        d.last_seen = now.mono;
        let logged_as = device.unwrap_or(OTHER_DEVICES);
        if let Some(suppressed) = self.error_log.should_log(logged_as, now.mono) {
            warn!(
                device = logged_as,
                suppressed,
                "malformed sensor message on {what}: {error}; further errors from this device are logged at most once a minute"
            );
        }
    }
}

/// True if every rule state of `d` is at rest: nothing raised or pending, and no deadline
/// that would change that by itself.
fn at_rest(rules: &[Rule], d: &Device) -> bool {
    let rest = |(i, s): &(usize, RuleState)| {
        s.core == State::Normal && rules.get(*i).is_none_or(|r| r.deadline(s).is_none())
    };
    d.device_rules.iter().all(rest) && d.streams.values().all(|st| st.rules.iter().all(rest))
}

/// Topic, below the upstream prefix, of summaries.
pub const SUMMARY_TOPIC: &str = "summaries";

/// Remembers when each device was last logged about.
#[derive(Default)]
struct LogLimit {
    last: HashMap<String, (Millis, u64)>,
}

impl LogLimit {
    /// `Some(suppressed since last time)` if `key` may be logged at monotonic time `now`.
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

    /// Forgets keys last logged more than an interval ago with nothing suppressed since:
    /// logging them again would say the same.
    fn prune(&mut self, now: Millis) {
        let interval = ERROR_LOG_INTERVAL.as_millis() as Millis;
        self.last
            .retain(|_, (at, suppressed)| *suppressed > 0 || now.saturating_sub(*at) < interval);
        if self.last.capacity() > 4 * self.last.len().max(64) {
            self.last.shrink_to_fit();
        }
    }
}

/// Where alert transitions and history go.
pub struct Outputs {
    /// The store: history, and the outbox for what goes upstream.
    pub store: Store,
    /// Severities that go upstream (`None`: no uplink).
    pub forward: Option<Vec<Severity>>,
    /// Length of the upstream topic prefix, for the forward-everything baseline.
    pub prefix_len: usize,
    /// One of a site pair: the mirror of this gateway's clients' publishes to the peer.
    pub peer: Option<PeerIngest>,
    /// Where alert transitions, presence changes, new streams and rule changes are told
    /// (only while someone listens).
    pub events: Option<crate::events::Sender>,
}

/// The site pair, as ingest sees it: where its own clients' publishes go to be mirrored,
/// and what it knows of the peer's mirror.
pub struct PeerIngest {
    /// To the mirror task.
    pub out: mpsc::UnboundedSender<crate::peer::MirrorOut>,
    /// This process's stream id (random, never 0).
    pub stream: u64,
    /// The peer's frames so far.
    pub incoming: crate::peer::Incoming,
    /// The last entry number given.
    next_seq: u64,
    /// When an unreadable frame was last logged.
    malformed_logged: Option<std::time::Instant>,
    /// This gateway's raised alerts.
    pub raised: crate::peer::Raised,
    /// The peer's raised alerts as of its last frame, to compare once that frame's
    /// transitions here are published.
    theirs: Option<Option<crate::peer::frame::Digest>>,
}

impl PeerIngest {
    /// The pair's ingest side, mirroring to `out`.
    pub fn new(
        out: mpsc::UnboundedSender<crate::peer::MirrorOut>,
        stream: u64,
        incoming: crate::peer::Incoming,
    ) -> PeerIngest {
        PeerIngest {
            out,
            stream,
            incoming,
            next_seq: 0,
            malformed_logged: None,
            raised: crate::peer::Raised::default(),
            theirs: None,
        }
    }

    /// A frame from the peer: its new entries judged by their stamps and routed to this
    /// gateway's subscribers, then its watermark; returns the transitions.
    fn take_frame(
        &mut self,
        engine: &mut Engine,
        clock: &mut Clock,
        payload: &Bytes,
        routed: &mut Vec<crate::broker::Message>,
        judged: &mut Vec<crate::peer::Entry>,
    ) -> Vec<Alert> {
        let frame = match crate::peer::frame::decode(payload.clone()) {
            Ok(f) => f,
            Err(e) => {
                let now = std::time::Instant::now();
                if self
                    .malformed_logged
                    .is_none_or(|t| now.duration_since(t) >= ERROR_LOG_INTERVAL)
                {
                    self.malformed_logged = Some(now);
                    warn!(error = %e, "a mirror frame from the peer cannot be read (are both gateways the same version?); logged at most once a minute");
                }
                return Vec::new();
            }
        };
        let now = clock.now();
        self.incoming.heard(frame.watermark, now.wall);
        if !self.incoming.active {
            self.incoming.active = true;
            engine.set_peer_active(true);
            Stats::set(&engine.stats.peer_active, 1);
            info!("the peer gateway is heard from: its devices' deadlines follow its readings");
        }
        let mut out = Vec::new();
        for e in frame.entries {
            if !self.incoming.accept(&e) {
                continue;
            }
            let stamp = clock.stamp_of(e.wall);
            out.extend(engine.on_peer_message(&e.topic, &e.payload, stamp));
            routed.push(crate::broker::Message {
                topic: e.topic.clone(),
                payload: e.payload.clone(),
                qos: match e.qos {
                    0 => crate::broker::packet::QoS::AtMostOnce,
                    1 => crate::broker::packet::QoS::AtLeastOnce,
                    _ => crate::broker::packet::QoS::ExactlyOnce,
                },
                retain: e.retain,
                ..crate::broker::Message::default()
            });
            judged.push(e);
        }
        out.extend(engine.peer_time(clock.stamp_of(frame.watermark)));
        self.theirs = Some(frame.digest);
        out
    }

    /// An entry for a publish of this gateway's own client, stamped `wall`.
    fn entry(&mut self, publish: &crate::broker::Message, wall: Millis) -> crate::peer::Entry {
        self.next_seq += 1;
        crate::peer::Entry {
            stream: self.stream,
            seq: self.next_seq,
            wall,
            retain: publish.retain,
            qos: publish.qos as u8,
            topic: publish.topic.clone(),
            payload: publish.payload.clone(),
        }
    }

    /// The peer has been silent for `takeover_after`: its devices' deadlines go to this
    /// gateway's timer.
    fn check_takeover(&mut self, engine: &mut Engine) {
        if self.incoming.active && self.incoming.silent_too_long() {
            self.incoming.active = false;
            engine.set_peer_active(false);
            Stats::set(&engine.stats.peer_active, 0);
            warn!(
                "no word from the peer gateway for peer.takeover_after: this gateway now also judges the silence of the devices it mirrored"
            );
        }
    }
}

/// Requests to the running ingest task.
pub enum Control {
    /// Swap in new rules and sources; the reply says what changed.
    Reload {
        /// The new rules.
        rules: Vec<Rule>,
        /// The new sources.
        sources: Vec<Source>,
        /// Answered once the new rules are in force.
        reply: oneshot::Sender<ReloadOutcome>,
    },
    /// The devices in memory, for the status page.
    Devices {
        /// The answer.
        reply: oneshot::Sender<Vec<DeviceView>>,
    },
    /// Tell the rules and devices now ([`Engine::snapshot`]). Every event sent before the
    /// answer was sent before it was taken.
    Snapshot(oneshot::Sender<Snapshot>),
}

/// The ingest task: judges the batches of publishes the broker's injector hands it, until
/// `shutdown` resolves or the broker goes away; publishes alerts on the broker. `clock` is
/// the one whose stamps the engine has seen so far (its restored alerts).
pub async fn run(
    mut engine: Engine,
    mut clock: Clock,
    broker: Broker,
    mut readings: mpsc::Receiver<crate::broker::Batch>,
    outputs: Outputs,
    mut control: mpsc::Receiver<Control>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut outputs = outputs;
    let mut peer = outputs.peer.take();
    let stats = engine.stats.clone();
    let mut beat = tokio::time::interval(crate::peer::HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    // One timer for the earliest deadline, re-armed only when that changes.
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let mut armed: Option<Millis> = None;
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING_EVERY);
    let mut forgotten_since_trim = 0;
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = engine.next_deadline();
        if next != armed {
            if let Some(at) = next {
                let wait = Duration::from_millis(at.saturating_sub(clock.now().mono));
                timer.as_mut().reset(tokio::time::Instant::now() + wait);
            }
            armed = next;
        }
        // Biased, with readings last: under a flood of readings, deadlines, reloads and
        // housekeeping (the watchdog's heartbeat) still get their turn.
        // Alerts to publish, and who waits for this round's writes to be committed.
        let mut judged = Vec::new();
        // This gateway's clients' publishes for the peer, the stamp of the last one, and the
        // peer's publishes for this gateway's subscribers.
        let mut mirrored = Vec::new();
        let mut watermark = 0;
        let mut own_mirrored = false;
        // How many of `judged` (the first ones) are this gateway's own clients'.
        let mut clients_judged = 0;
        let mut routed = Vec::new();
        let alerts = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            _ = &mut timer, if armed.is_some() => {
                armed = None;
                engine.on_tick(clock.now())
            }
            Some(request) = control.recv() => match request {
                Control::Devices { reply } => {
                    let started = std::time::Instant::now();
                    let view = engine.devices_view(clock.now());
                    Stats::add(&stats.page_device_lists, 1);
                    Stats::add(&stats.page_device_list_us, started.elapsed().as_micros() as u64);
                    let _ = reply.send(view);
                    continue;
                }
                Control::Reload { rules, sources, reply } => {
                    if let Some(events) = outputs.events.as_ref().filter(|e| e.receiver_count() > 0) {
                        let _ = events.send(crate::events::Event::Rules(rules.clone().into()));
                    }
                    let (cleared, outcome) = engine.replace_rules(rules, sources, clock.now());
                    let _ = reply.send(outcome);
                    cleared
                }
                Control::Snapshot(reply) => {
                    // What happened before goes out first, so that the listener has seen
                    // every event older than the snapshot.
                    tell(&outputs, &mut engine, &[]);
                    let _ = reply.send(engine.snapshot());
                    continue;
                }
            },
            _ = housekeeping.tick() => {
                let now = clock.now();
                stats.ingest_heartbeat_ms.store(crate::stats::monotonic_ms(), std::sync::atomic::Ordering::Relaxed);
                let round = engine.housekeeping(now);
                let forgotten = round.forgotten;
                store_round(&outputs.store, round);
                if forgotten_since_trim >= TRIM_AFTER_FORGOTTEN
                    || (forgotten == 0 && forgotten_since_trim >= TRIM_AT_LEAST)
                {
                    forgotten_since_trim = 0;
                    give_back_memory();
                }
                forgotten_since_trim += forgotten;
                tell(&outputs, &mut engine, &[]);
                continue;
            }
            _ = beat.tick(), if peer.is_some() => {
                // Every reading stamped so far has been handed to the mirror: the peer may
                // fire this gateway's devices' deadlines up to now.
                let now = clock.now();
                let p = peer.as_mut().expect("checked");
                p.check_takeover(&mut engine);
                let _ = p.out.send(crate::peer::MirrorOut {
                    entries: Vec::new(),
                    watermark: now.wall,
                    digest: p.raised.digest,
                    judged: Vec::new(),
                    committed: None,
                });
                continue;
            }
            batch = readings.recv() => {
                let Some(batch) = batch else {
                    // The broker stops its connections when the shutdown fires; this wake-up
                    // can come first. Only a broker that stopped by itself is a fault.
                    if tokio::time::timeout(Duration::from_secs(1), &mut shutdown).await.is_err() {
                        error!("the broker's connections stopped; ingest ends");
                    }
                    break;
                };
                let mut alerts = Vec::new();
                for publish in &batch.messages {
                    if &publish.topic[..] == crate::peer::MIRROR_TOPIC.as_bytes() {
                        // Only the peer may publish there (the ACL); without a [peer], no one.
                        if let Some(p) = peer.as_mut() {
                            alerts.extend(p.take_frame(&mut engine, &mut clock, &publish.payload, &mut routed, &mut mirrored));
                        }
                        continue;
                    }
                    if !engine.handles(&publish.topic) {
                        continue;
                    }
                    // What a bridge forwarding everything would send for this message.
                    let baseline = crate::uplink::qos1_bytes(
                        outputs.prefix_len + 1 + publish.topic.len(),
                        publish.payload.len(),
                    );
                    Stats::add(&stats.forward_all_bytes, baseline);
                    let started = std::time::Instant::now();
                    let now = clock.now();
                    // Deadlines that came up first, so that a peer judging these readings
                    // after the same deadlines agrees.
                    alerts.extend(engine.on_tick(now));
                    alerts.extend(engine.on_message(&publish.topic, &publish.payload, now));
                    if let Some(p) = peer.as_mut() {
                        mirrored.push(p.entry(publish, now.wall));
                        watermark = now.wall;
                        own_mirrored = true;
                    }
                    Stats::add(&stats.ingest_nanos, started.elapsed().as_nanos() as u64);
                    Stats::inc(&stats.ingest_count);
                }
                clients_judged = batch.judged.len();
                judged = batch.judged;
                // The peer's frames are acknowledged once committed here, whatever this
                // gateway's own mirror is doing.
                judged.extend(batch.peer_judged);
                alerts
            }
        };
        let raised = !alerts.is_empty();
        tell(&outputs, &mut engine, &alerts);
        for alert in alerts {
            if let Some(p) = peer.as_mut() {
                p.raised.track(&alert.doc);
            }
            dispatch(&alert, &broker, &outputs);
        }
        if let Some(p) = peer.as_mut() {
            if let Some(theirs) = p.theirs.take() {
                p.incoming.compare(theirs, p.raised.digest);
            }
        }
        if !routed.is_empty() {
            broker.route_from_peer(routed);
        }
        // With the peer connected, clients' acknowledgements wait for it as well as for the
        // store (the mirror task answers them).
        let mut for_peer = Vec::new();
        let mut committed = None;
        if own_mirrored && clients_judged > 0 {
            for_peer = judged.drain(..clients_judged).collect();
            let (tx, rx) = oneshot::channel();
            judged.push(tx);
            committed = Some(rx);
        }
        // History goes to the store when the buffer is full, and at once when someone waits to
        // acknowledge these publishes: what judging them wrote (alert transitions, raw
        // readings) must be committed first. If they wrote nothing, there is nothing to wait
        // for, and the store is not woken for them.
        if !judged.is_empty() || engine.buffered_history() >= HISTORY_BATCH {
            let (rollups, raw) = engine.take_history();
            let wrote = raised || !rollups.is_empty() || !raw.is_empty();
            outputs.store.rollups(rollups);
            outputs.store.raw(raw);
            if wrote {
                outputs.store.judged(judged);
            } else {
                for reply in judged {
                    let _ = reply.send(());
                }
            }
        }
        if let (Some(p), false) = (peer.as_ref(), mirrored.is_empty()) {
            let _ = p.out.send(crate::peer::MirrorOut {
                entries: mirrored,
                watermark,
                digest: p.raised.digest,
                judged: for_peer,
                committed,
            });
        }
    }
    store_round(&outputs.store, engine.finish(clock.now()));
    debug!("ingest stopped");
}

/// Asks the allocator to give the memory it holds free back to the system. glibc's malloc
/// keeps what was freed in its arenas (one per thread that allocated, up to eight per core):
/// without this, the memory of forgotten devices would stay in RSS, free but not returned.
fn give_back_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers; it only returns free pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sends what happened to the event listeners, if any; drops it otherwise.
fn tell(outputs: &Outputs, engine: &mut Engine, alerts: &[Alert]) {
    let happened = engine.take_events();
    let Some(events) = outputs.events.as_ref().filter(|e| e.receiver_count() > 0) else {
        return;
    };
    for event in happened {
        let _ = events.send(event);
    }
    for alert in alerts {
        let _ = events.send(crate::events::Event::Alert(Arc::new(alert.doc.clone())));
    }
}

fn store_round(store: &Store, round: Housekeeping) {
    store.rollups(round.rollups);
    store.raw(round.raw);
    store.devices(round.devices);
    if let Some(summary) = round.summary {
        store.outbox_push(summary);
    }
}

/// True if `alert` goes upstream: the rule's `forward` if set, else its severity.
pub fn forwarded(alert: &Alert, forward: Option<&[Severity]>) -> bool {
    match (forward, alert.forward) {
        (None, _) => false,
        (Some(_), Some(explicit)) => explicit,
        (Some(severities), None) => severities.contains(&alert.doc.severity),
    }
}

fn dispatch(alert: &Alert, broker: &Broker, outputs: &Outputs) {
    let doc = &alert.doc;
    let payload = Bytes::from(doc.to_json());
    let topic = doc.topic();
    let entry = forwarded(alert, outputs.forward.as_deref()).then(|| OutboxEntry {
        id: doc.id.clone(),
        topic: topic.clone(),
        payload: payload.clone(),
        retain: true,
    });
    // History, current state and outbox in one transaction; the uplink hears of it only
    // once committed.
    outputs.store.alert(doc, entry);
    broker.publish_retained(topic, payload);
}

#[cfg(test)]
mod tests;

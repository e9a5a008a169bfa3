//! Home Assistant MQTT discovery: the site's alerts as entities in Home Assistant, with
//! nothing for an operator to write there.
//!
//! With `[homeassistant] discovery = true`, the gateway publishes discovery messages on its
//! own broker, retained, where Home Assistant's MQTT integration (connected to the gateway's
//! broker as an operator client) finds them:
//!
//! - each alert rule per device is a `binary_sensor`, on while the alert is raised. Its state
//!   is the rule's retained alert topic `alerts/{severity}/{device}/{rule}`, read with a
//!   value template (`state` of the alert document: `raised` is on, `cleared` off), so it
//!   follows every raise and clear without a message of its own; the document's fields are
//!   its attributes. Its device class comes from the rule: the label `device_class` if set,
//!   else the rule's name (and, for state rules, its metric), else `problem`;
//! - each sensor device is a Home Assistant device (identified by site and device name),
//!   linked to the gateway's device (`via_device`);
//! - the gateway is a device too, with its uplink (connected or not), outbox depth, alerts
//!   raised now and, in a site pair, the link to its peer, read from a retained JSON document
//!   of its own ([`state_topic`]) published when it changes and every 30 s.
//!
//! A rule that a reload removes, and a device forgotten after `gateway.forget_after`, take
//! their entities with them: an empty retained payload on the config topic, which deletes
//! the retained message and tells Home Assistant to remove the entity.
//!
//! The broker does not keep the gateway's own retained messages across a restart, so what
//! was published is saved in the data directory ([`SAVED_FILE`]): at the next start, the
//! entities of the devices known then are published again at once (a leak probe that
//! reports once a day must not be unavailable in Home Assistant until it does), those of
//! rules gone meanwhile are removed, and the devices that say nothing lose theirs after
//! `gateway.forget_after`, as they would have without the restart.
//!
//! The messages follow Home Assistant's documented schema for single-component discovery:
//! <https://www.home-assistant.io/integrations/mqtt/#mqtt-discovery> (topic
//! `<discovery_prefix>/<component>/[<node_id>/]<object_id>/config`, `[a-zA-Z0-9_-]` in ids,
//! the `device` and `origin` mappings, removal by an empty payload),
//! <https://www.home-assistant.io/integrations/binary_sensor.mqtt/>,
//! <https://www.home-assistant.io/integrations/sensor.mqtt/> and the binary sensor device
//! classes at <https://www.home-assistant.io/integrations/binary_sensor/#device-class>.
//! [`check_message`] checks a message against that schema; the tests run every message
//! through it. It was checked against the documentation, not against a running Home
//! Assistant.
//!
//! This module is not part of judging: [`Discovery`] is a pure state machine (events and
//! snapshots in, retained messages out), and [`run`] the task around it. It learns what
//! exists from [`crate::events`] and, at the start and whenever it fell behind, from a
//! snapshot of ingest's state ([`crate::ingest::Control::Snapshot`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::broker::Broker;
use crate::events::Event;
use crate::ingest::{Control, Snapshot};
use crate::rules::{Kind, Millis, Rule};
use crate::shutdown::Signal;
use crate::stats::Stats;

/// Home Assistant's default discovery prefix.
pub const DEFAULT_PREFIX: &str = "homeassistant";

/// The rule label that sets a rule's device class.
pub const DEVICE_CLASS_LABEL: &str = "device_class";

/// The device classes of a binary sensor, as Home Assistant documents them.
pub const BINARY_SENSOR_CLASSES: &[&str] = &[
    "battery",
    "battery_charging",
    "carbon_monoxide",
    "cold",
    "connectivity",
    "door",
    "garage_door",
    "gas",
    "heat",
    "light",
    "lock",
    "moisture",
    "motion",
    "moving",
    "occupancy",
    "opening",
    "plug",
    "power",
    "presence",
    "problem",
    "running",
    "safety",
    "smoke",
    "sound",
    "tamper",
    "update",
    "vibration",
    "window",
];

/// The class of a rule that says nothing more specific.
pub const DEFAULT_CLASS: &str = "problem";

/// How often the gateway's state is looked at; it is published when it changed.
const STATE_SAMPLE: Duration = Duration::from_secs(1);
/// The gateway's state is published at least this often, changed or not.
const STATE_HEARTBEAT: Duration = Duration::from_secs(30);
/// Home Assistant shows the gateway's sensors as unavailable after this long without a
/// state (`expire_after`, seconds): four heartbeats missed.
const STATE_EXPIRE_AFTER: u64 = 120;

/// Words of a state or threshold rule's name that say what its alert means, with the class
/// that shows it (on = raised). First match in this order wins (`garage` before `door`).
/// `power` is not guessed: a power rule may mean power detected or power lost, and Home
/// Assistant's `power` class shows on as "power detected"; set it with the label.
const NAME_WORDS: &[(&[&str], &str)] = &[
    (
        &["leak", "leaks", "leakage", "flood", "flooding"],
        "moisture",
    ),
    (&["smoke"], "smoke"),
    (&["co", "monoxide"], "carbon_monoxide"),
    (&["gas"], "gas"),
    (&["garage"], "garage_door"),
    (&["door"], "door"),
    (&["window"], "window"),
    (&["motion"], "motion"),
    (&["occupancy", "occupied"], "occupancy"),
    (&["tamper", "tampered", "tampering"], "tamper"),
    (&["vibration"], "vibration"),
    (&["battery"], "battery"),
    (&["overheat", "overheating", "heat", "hot"], "heat"),
    (&["cold", "freezing", "frost", "freeze"], "cold"),
];

/// Further words for state rules, in their name or their metric (`sensors/+/water_leak`):
/// a state of water or a contact is what it says; a threshold on `soil_moisture` is not.
const STATE_WORDS: &[(&[&str], &str)] = &[
    (&["water", "wet", "moisture"], "moisture"),
    (&["contact", "opening"], "opening"),
    (&["pir"], "motion"),
];

/// One retained message to publish: a discovery config, or an empty payload that removes
/// one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The topic.
    pub topic: String,
    /// The payload; empty to remove.
    pub payload: Bytes,
}

/// Who the gateway is, as discovery names it.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The discovery prefix (`homeassistant`).
    pub prefix: String,
    /// The site (`gateway.site`): sensor devices and their entities are the site's, the same
    /// from either gateway of a site pair.
    pub site: String,
    /// This gateway's id (`gateway.id`).
    pub gateway: String,
    /// An uplink is configured: the gateway shows its state and the outbox.
    pub uplink: bool,
    /// A site pair: the gateway shows its link to the peer.
    pub peer: bool,
}

impl Identity {
    /// The identity of the gateway `config` describes.
    pub fn of(config: &crate::config::Config) -> Identity {
        Identity {
            prefix: config.homeassistant.prefix.clone(),
            site: config.gateway.site.clone(),
            gateway: config.gateway.id.clone(),
            uplink: config.uplink.is_some(),
            peer: config.peer.is_some(),
        }
    }

    /// The `<node_id>` level of every config topic: the site.
    fn node(&self) -> String {
        slug(&self.site)
    }

    /// The gateway's device identifier.
    fn gateway_device(&self) -> String {
        format!("watchpost-gateway:{}:{}", self.site, self.gateway)
    }
}

/// The topic of the gateway's state document: under `$SYS`, which only the gateway
/// publishes on.
pub fn state_topic(gateway: &str) -> String {
    format!("$SYS/watchpost/{gateway}/state")
}

/// `s` as an id level of a discovery topic: `[a-zA-Z0-9_-]` (what Home Assistant allows),
/// other characters as `_`, at most 48 of them. Not unique by itself: [`object_id`] adds a
/// hash of the exact names.
fn slug(s: &str) -> String {
    s.chars()
        .take(48)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The `<object_id>` of the binary sensor of `rule` on `device`: readable names and the first
/// 8 hex digits of a SHA-256 of the exact site, device and rule, so that names that read
/// alike once made topic-safe (`a.b`, `a_b`), or that join alike, still differ.
fn object_id(site: &str, device: &str, rule: &str) -> String {
    let mut hash = Sha256::new();
    for part in [site, device, rule] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let digest = hash.finalize();
    format!(
        "{}_{}_{:02x}{:02x}{:02x}{:02x}",
        slug(device),
        slug(rule),
        digest[0],
        digest[1],
        digest[2],
        digest[3]
    )
}

fn words(s: &str) -> impl Iterator<Item = String> + '_ {
    s.split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_ascii_lowercase())
}

/// The literal last level of a rule's filter (`water_leak` of `sensors/+/water_leak`).
fn filter_metric(rule: &Rule) -> Option<&str> {
    let last = rule.filter.as_str().rsplit('/').next()?;
    (last != "+" && last != "#").then_some(last)
}

/// The device class of `rule`'s binary sensors: its `device_class` label if it is one of
/// Home Assistant's classes (`watchpost check` warns otherwise), else a class its name (or,
/// for a state rule, its metric) names, else `problem`. Rules of other kinds (rate,
/// deviation, silence, presence, flapping) are problems whatever their name: a
/// `door-chatter` rule raised does not mean the door is open.
pub fn device_class(rule: &Rule) -> &str {
    if let Some(class) = rule.labels.get(DEVICE_CLASS_LABEL) {
        if let Some(known) = BINARY_SENSOR_CLASSES.iter().find(|c| **c == class) {
            return known;
        }
    }
    let state = matches!(rule.kind, Kind::State(_));
    if !state && !matches!(rule.kind, Kind::Threshold(_)) {
        return DEFAULT_CLASS;
    }
    let name: Vec<String> = words(&rule.name).collect();
    let found = |table: &[(&[&str], &'static str)], words: &[String]| {
        table
            .iter()
            .find(|(keys, _)| words.iter().any(|w| keys.contains(&w.as_str())))
            .map(|(_, class)| *class)
    };
    if let Some(class) = found(NAME_WORDS, &name) {
        return class;
    }
    if state {
        let mut all = name;
        all.extend(filter_metric(rule).into_iter().flat_map(words));
        if let Some(class) = found(NAME_WORDS, &all).or_else(|| found(STATE_WORDS, &all)) {
            return class;
        }
    }
    DEFAULT_CLASS
}

fn to_bytes(doc: &Json) -> Bytes {
    Bytes::from(serde_json::to_vec(doc).expect("a JSON value always serializes"))
}

fn fingerprint(payload: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    payload.hash(&mut h);
    h.finish()
}

/// What discovery knows and has published: a pure state machine. Events, snapshots and the
/// time go in; the retained messages that bring Home Assistant up to date come out.
pub struct Discovery {
    id: Identity,
    rules: Arc<[Rule]>,
    /// Each device ingest knows, with the metrics it reported.
    devices: BTreeMap<Box<str>, BTreeSet<Box<str>>>,
    /// Devices known before the gateway restarted ([`Discovery::restore`]), with their
    /// metrics: their entities stay until `before_until`, as long as ingest would have kept
    /// them had it not restarted, unless ingest forgets them sooner.
    before: BTreeMap<Box<str>, BTreeSet<Box<str>>>,
    /// Monotonic ms at which `before` is let go.
    before_until: Millis,
    /// Per device, the config topics published and a fingerprint of each payload (`None`:
    /// published before the restart, payload unknown).
    published: HashMap<Box<str>, BTreeMap<String, Option<u64>>>,
    /// Something to save changed since [`Discovery::take_changed`].
    changed: bool,
}

/// What discovery keeps across restarts (`homeassistant.json` in the data directory): the
/// devices known and the config topics published, so that after a restart the entities of
/// devices that do not report at once are published again, and those of devices and rules
/// that went away meanwhile are removed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// The gateway's own config topics.
    #[serde(default)]
    pub gateway: Vec<String>,
    /// Each device by name.
    #[serde(default)]
    pub devices: BTreeMap<String, SavedDevice>,
}

/// One device in [`Saved`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SavedDevice {
    /// The metrics it reported.
    #[serde(default)]
    pub metrics: Vec<String>,
    /// Its config topics published.
    #[serde(default)]
    pub configs: Vec<String>,
}

impl Discovery {
    /// Nothing known, nothing published yet.
    pub fn new(id: Identity) -> Discovery {
        Discovery {
            id,
            rules: Arc::from(Vec::new()),
            devices: BTreeMap::new(),
            before: BTreeMap::new(),
            before_until: 0,
            published: HashMap::new(),
            changed: false,
        }
    }

    /// Takes back what the last run saved, before the first snapshot: its devices count as
    /// known until `until` (monotonic ms), its configs as published. Returns the removal of
    /// the gateway's own configs that this configuration no longer has (an uplink taken
    /// out).
    pub fn restore(&mut self, saved: Saved, until: Millis) -> Vec<Publish> {
        self.before_until = until;
        for (device, s) in saved.devices {
            let device: Box<str> = device.into();
            self.before.insert(
                device.clone(),
                s.metrics.into_iter().map(Into::into).collect(),
            );
            if !s.configs.is_empty() {
                self.published
                    .insert(device, s.configs.into_iter().map(|t| (t, None)).collect());
            }
        }
        let current: BTreeSet<String> = self
            .gateway_messages()
            .into_iter()
            .map(|m| m.topic)
            .collect();
        let gone: Vec<Publish> = saved
            .gateway
            .into_iter()
            .filter(|t| !current.contains(t))
            .map(|topic| Publish {
                topic,
                payload: Bytes::new(),
            })
            .collect();
        self.changed |= !gone.is_empty();
        gone
    }

    /// Lets the devices of the last run go once their time is up (`now`, monotonic ms):
    /// those that ingest has not heard of since lose their entities, the others keep those
    /// of the metrics they reported since. Returns what to publish.
    pub fn expire(&mut self, now: Millis) -> Vec<Publish> {
        let mut out = Vec::new();
        if self.before.is_empty() || now < self.before_until {
            return out;
        }
        let before = std::mem::take(&mut self.before);
        for device in before.keys() {
            self.reconcile(device, &mut out);
        }
        self.changed = true;
        out
    }

    /// What to save now ([`Saved`]).
    pub fn saved(&self) -> Saved {
        let mut devices: BTreeMap<String, SavedDevice> = BTreeMap::new();
        for (device, metrics) in self.devices.iter().chain(&self.before) {
            let entry = devices.entry(device.to_string()).or_default();
            entry.metrics.extend(metrics.iter().map(|m| m.to_string()));
        }
        for (device, configs) in &self.published {
            let entry = devices.entry(device.to_string()).or_default();
            entry.configs = configs.keys().cloned().collect();
        }
        for entry in devices.values_mut() {
            entry.metrics.sort_unstable();
            entry.metrics.dedup();
        }
        Saved {
            gateway: self
                .gateway_messages()
                .into_iter()
                .map(|m| m.topic)
                .collect(),
            devices,
        }
    }

    /// True if something to save changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The gateway's own device and its sensors: they depend on the configuration only.
    pub fn gateway_messages(&self) -> Vec<Publish> {
        let id = &self.id;
        let node = id.node();
        let gw = slug(&id.gateway);
        let state = state_topic(&id.gateway);
        let device = json!({
            "identifiers": [id.gateway_device()],
            "name": format!("Watchpost {}", id.gateway),
            "manufacturer": "Watchpost",
            "model": "MQTT edge gateway",
            "sw_version": env!("CARGO_PKG_VERSION"),
        });
        let entity = |component: &str, key: &str, name: &str, extra: Json| {
            let mut doc = json!({
                "name": name,
                "unique_id": format!("{}:{key}", id.gateway_device()),
                "state_topic": state,
                "value_template": format!("{{{{ value_json.{key} }}}}"),
                "expire_after": STATE_EXPIRE_AFTER,
                "entity_category": "diagnostic",
                "device": device,
                "origin": origin(),
            });
            if let (Some(doc), Json::Object(extra)) = (doc.as_object_mut(), extra) {
                doc.extend(extra);
            }
            Publish {
                topic: format!("{}/{component}/{node}/gateway_{gw}_{key}/config", id.prefix),
                payload: to_bytes(&doc),
            }
        };
        let connectivity = json!({
            "device_class": "connectivity",
            "payload_on": "connected",
            "payload_off": "disconnected",
        });
        let mut out = Vec::new();
        if id.uplink {
            out.push(entity(
                "binary_sensor",
                "uplink",
                "uplink",
                connectivity.clone(),
            ));
            out.push(entity(
                "sensor",
                "outbox_depth",
                "outbox",
                json!({"state_class": "measurement", "unit_of_measurement": "messages"}),
            ));
        }
        if id.peer {
            out.push(entity(
                "binary_sensor",
                "peer",
                "site pair peer",
                connectivity,
            ));
        }
        out.push(entity(
            "sensor",
            "alerts_active",
            "alerts raised",
            json!({"state_class": "measurement"}),
        ));
        out
    }

    /// The config of the binary sensor of rule `rule` on `device`: its topic and document.
    fn binary_sensor(&self, device: &str, rule: &Rule) -> (String, Json) {
        let id = &self.id;
        let alerts = crate::alert::topic(rule.severity, device, &rule.name);
        let topic = format!(
            "{}/binary_sensor/{}/{}/config",
            id.prefix,
            id.node(),
            object_id(&id.site, device, &rule.name)
        );
        let doc = json!({
            "name": rule.name,
            "unique_id": format!("watchpost:{}:{device}:{}", id.site, rule.name),
            "state_topic": alerts,
            "value_template": "{{ value_json.state }}",
            "payload_on": "raised",
            "payload_off": "cleared",
            "json_attributes_topic": alerts,
            "device_class": device_class(rule),
            "qos": 1,
            "device": {
                "identifiers": [format!("watchpost-device:{}:{device}", id.site)],
                "name": device,
                "via_device": id.gateway_device(),
            },
            "origin": origin(),
        });
        (topic, doc)
    }

    /// Every config `device` should have now, by topic.
    fn wanted(&self, device: &str) -> BTreeMap<String, Bytes> {
        let rules = &self.rules;
        let mut indices: BTreeSet<usize> = crate::ingest::device_rules(rules, device).collect();
        let metrics = self.devices.get(device).into_iter().flatten();
        for metric in metrics.chain(self.before.get(device).into_iter().flatten()) {
            indices.extend(crate::ingest::stream_rules(rules, device, metric));
        }
        indices
            .into_iter()
            .map(|i| {
                let (topic, doc) = self.binary_sensor(device, &rules[i]);
                (topic, to_bytes(&doc))
            })
            .collect()
    }

    /// Publishes what `device` lacks, changes what changed, removes what should not be
    /// there any more.
    fn reconcile(&mut self, device: &str, out: &mut Vec<Publish>) {
        let known = self.devices.contains_key(device) || self.before.contains_key(device);
        let wanted = if known {
            self.wanted(device)
        } else {
            BTreeMap::new()
        };
        let old = self.published.remove(device).unwrap_or_default();
        let before = out.len();
        for topic in old.keys().filter(|t| !wanted.contains_key(*t)) {
            out.push(Publish {
                topic: topic.clone(),
                payload: Bytes::new(),
            });
        }
        let mut now = BTreeMap::new();
        for (topic, payload) in wanted {
            let print = Some(fingerprint(&payload));
            if old.get(&topic) != Some(&print) {
                out.push(Publish {
                    topic: topic.clone(),
                    payload,
                });
            }
            now.insert(topic, print);
        }
        if !now.is_empty() {
            self.published.insert(device.into(), now);
        }
        self.changed |= out.len() > before;
    }

    /// Takes in what happened; returns what to publish.
    pub fn on_event(&mut self, event: &Event) -> Vec<Publish> {
        let mut out = Vec::new();
        match event {
            Event::Stream { device, metric } => {
                let metrics = self.devices.entry((**device).into()).or_default();
                if metrics.insert((**metric).into()) {
                    self.changed = true;
                    self.reconcile(device, &mut out);
                }
            }
            Event::Presence { device, .. } => {
                // A device that only ever said online or offline still has its presence
                // rules.
                if !self.devices.contains_key(&**device) {
                    self.devices.insert((**device).into(), BTreeSet::new());
                    self.changed = true;
                    self.reconcile(device, &mut out);
                }
            }
            Event::Forgotten(gone) => {
                for device in gone.iter() {
                    self.devices.remove(device);
                    self.before.remove(device);
                    self.changed = true;
                    self.reconcile(device, &mut out);
                }
            }
            Event::Rules(rules) => {
                self.rules = rules.clone();
                self.reconcile_all(&mut out);
            }
            // Alerts change entities' states, on the alert topics, not their configs.
            Event::Alert(_) => {}
        }
        out
    }

    /// Takes the engine's state as the whole truth (at the start, and after falling behind);
    /// returns what to publish and remove to match it.
    pub fn on_snapshot(&mut self, snapshot: Snapshot) -> Vec<Publish> {
        self.rules = snapshot.rules;
        self.devices = snapshot
            .devices
            .into_iter()
            .map(|(device, metrics)| (device, metrics.into_iter().collect()))
            .collect();
        self.changed = true;
        let mut out = Vec::new();
        self.reconcile_all(&mut out);
        out
    }

    fn reconcile_all(&mut self, out: &mut Vec<Publish>) {
        let mut all: BTreeSet<Box<str>> = self.devices.keys().cloned().collect();
        all.extend(self.before.keys().cloned());
        all.extend(self.published.keys().cloned());
        for device in all {
            self.reconcile(&device, out);
        }
    }

    /// Config topics published now, for the log and the tests.
    pub fn entities(&self) -> usize {
        self.published.values().map(BTreeMap::len).sum()
    }
}

fn origin() -> Json {
    json!({
        "name": "Watchpost",
        "sw_version": env!("CARGO_PKG_VERSION"),
        "support_url": env!("CARGO_PKG_REPOSITORY"),
    })
}

/// The gateway's state document: what its sensors read ([`Discovery::gateway_messages`]).
pub fn state_document(id: &Identity, stats: &Stats) -> Bytes {
    let mut doc = serde_json::Map::new();
    let link = |up: bool| Json::from(if up { "connected" } else { "disconnected" });
    if id.uplink {
        doc.insert(
            "uplink".into(),
            link(stats.uplink_connected.load(Ordering::Relaxed)),
        );
        doc.insert(
            "outbox_depth".into(),
            Stats::get(&stats.outbox_depth).into(),
        );
    }
    if id.peer {
        doc.insert("peer".into(), link(Stats::get(&stats.peer_link_up) == 1));
    }
    doc.insert(
        "alerts_active".into(),
        Stats::get(&stats.alerts_active).into(),
    );
    to_bytes(&Json::Object(doc))
}

/// What the discovery task is given besides the gateway's parts.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Names and what the gateway has.
    pub id: Identity,
    /// Where what discovery published is kept across restarts ([`Saved`]).
    pub file: PathBuf,
    /// `gateway.forget_after`: how long the devices of the last run keep their entities
    /// after a restart without a word from them.
    pub forget_after: Duration,
}

impl Setup {
    /// The setup of the gateway `config` describes.
    pub fn of(config: &crate::config::Config) -> Setup {
        Setup {
            id: Identity::of(config),
            file: config.gateway.data_dir.join(SAVED_FILE),
            forget_after: config.gateway.forget_after,
        }
    }
}

/// The file in the data directory that keeps [`Saved`].
pub const SAVED_FILE: &str = "homeassistant.json";

/// Saved at most this often while things change, and at the stop.
const SAVE_EVERY: Duration = Duration::from_secs(5);

/// The discovery task: publishes the gateway's entities, then follows the events until
/// `shutdown`. Entities stay in Home Assistant when the gateway stops: a restart must not
/// cost an operator the names and areas given to them there.
pub async fn run(
    setup: Setup,
    broker: Broker,
    stats: Arc<Stats>,
    events: crate::events::Sender,
    control: mpsc::Sender<Control>,
    shutdown: Signal,
) {
    let Setup {
        id,
        file,
        forget_after,
    } = setup;
    // Listening before asking for the snapshot: nothing falls between the two.
    let mut receiver = events.subscribe();
    let mut discovery = Discovery::new(id.clone());
    let publish = |messages: Vec<Publish>| {
        for m in messages {
            debug!(topic = %m.topic, removed = m.payload.is_empty(), "Home Assistant discovery");
            broker.publish_retained(m.topic, m.payload);
        }
    };
    let until = crate::stats::monotonic_ms() + forget_after.as_millis() as Millis;
    publish(discovery.restore(load(&file).await, until));
    publish(discovery.gateway_messages());
    let Some(snapshot) = read_snapshot(&control, &shutdown).await else {
        return;
    };
    publish(discovery.on_snapshot(snapshot));
    info!(
        prefix = %id.prefix,
        entities = discovery.entities(),
        state = %state_topic(&id.gateway),
        "Home Assistant discovery on"
    );
    let mut sample = tokio::time::interval(STATE_SAMPLE);
    sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_state = Bytes::new();
    let mut last_sent = Instant::now();
    let mut unsaved = false;
    let mut last_saved = Instant::now();
    let mut save_failed = false;
    let stopped = shutdown.clone().wait();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            _ = sample.tick() => {
                let state = state_document(&id, &stats);
                if state != last_state || last_sent.elapsed() >= STATE_HEARTBEAT {
                    broker.publish_retained(state_topic(&id.gateway), state.clone());
                    last_state = state;
                    last_sent = Instant::now();
                }
                publish(discovery.expire(crate::stats::monotonic_ms()));
                unsaved |= discovery.take_changed();
                if unsaved && last_saved.elapsed() >= SAVE_EVERY {
                    unsaved = false;
                    last_saved = Instant::now();
                    save(&file, discovery.saved(), &mut save_failed).await;
                }
            }
            event = receiver.recv() => match event {
                Ok(event) => publish(discovery.on_event(&event)),
                // Fell behind: `missed` events are gone, and which devices, metrics or rules
                // they were is unknown. Ingest's snapshot is the truth: configs it implies
                // are published, the others removed. The events still queued are applied
                // after it; each is a change the snapshot already holds or a later one, so
                // the end state is the engine's either way.
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    warn!(missed, "Home Assistant discovery fell behind the gateway's events; reading the devices and rules again");
                    let Some(snapshot) = read_snapshot(&control, &shutdown).await else {
                        break;
                    };
                    publish(discovery.on_snapshot(snapshot));
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
        }
    }
    if unsaved || discovery.take_changed() {
        save(&file, discovery.saved(), &mut save_failed).await;
    }
}

/// What the last run saved; nothing if there is no file. A file that cannot be read is
/// logged and left for the next save to replace.
async fn load(file: &Path) -> Saved {
    let path = file.to_owned();
    let read = tokio::task::spawn_blocking(move || std::fs::read(&path)).await;
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => return Saved::default(),
        Ok(Err(e)) => {
            warn!(file = %file.display(), error = %e, "cannot read what Home Assistant discovery published before the restart: entities of devices and rules gone since stay in Home Assistant (delete them there)");
            return Saved::default();
        }
        Err(_) => return Saved::default(),
    };
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        warn!(file = %file.display(), error = %e, "what Home Assistant discovery published before the restart is unreadable: entities of devices and rules gone since stay in Home Assistant (delete them there)");
        Saved::default()
    })
}

/// Writes `saved` to `file` (a temporary file renamed over it, so that a crash leaves the
/// old or the new one). A failure is logged once until a write succeeds again.
async fn save(file: &Path, saved: Saved, failed: &mut bool) {
    let path = file.to_owned();
    let written = tokio::task::spawn_blocking(move || {
        let bytes = serde_json::to_vec(&saved).expect("the saved state always serializes");
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)
    })
    .await;
    match written {
        Ok(Ok(())) => *failed = false,
        Ok(Err(e)) if !*failed => {
            *failed = true;
            warn!(file = %file.display(), error = %e, "cannot save what Home Assistant discovery published; after a restart, entities of devices and rules gone meanwhile may stay in Home Assistant");
        }
        _ => {}
    }
}

/// Asks ingest for its rules and devices; `None` once ingest is gone or the gateway stops.
async fn read_snapshot(control: &mpsc::Sender<Control>, shutdown: &Signal) -> Option<Snapshot> {
    let (reply, answer) = oneshot::channel();
    control.send(Control::Snapshot(reply)).await.ok()?;
    tokio::select! {
        answer = answer => answer.ok(),
        _ = shutdown.clone().wait() => None,
    }
}

/// Keys Home Assistant documents for the platforms discovery publishes (and the discovery
/// payload's own `origin`).
const COMMON_KEYS: &[&str] = &[
    "availability",
    "availability_mode",
    "availability_template",
    "availability_topic",
    "device",
    "device_class",
    "enabled_by_default",
    "encoding",
    "entity_category",
    "expire_after",
    "force_update",
    "icon",
    "json_attributes_template",
    "json_attributes_topic",
    "name",
    "object_id",
    "origin",
    "payload_available",
    "payload_not_available",
    "qos",
    "state_topic",
    "unique_id",
    "value_template",
];
const BINARY_SENSOR_KEYS: &[&str] = &["off_delay", "payload_off", "payload_on"];
const SENSOR_KEYS: &[&str] = &[
    "state_class",
    "suggested_display_precision",
    "unit_of_measurement",
];
const DEVICE_KEYS: &[&str] = &[
    "configuration_url",
    "connections",
    "hw_version",
    "identifiers",
    "manufacturer",
    "model",
    "model_id",
    "name",
    "serial_number",
    "suggested_area",
    "sw_version",
    "via_device",
];
const ORIGIN_KEYS: &[&str] = &["name", "support_url", "sw_version"];

/// An id level of a discovery topic: `[a-zA-Z0-9_-]+`.
fn id_level(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Checks one discovery message as Watchpost publishes them (single-component discovery of a
/// `binary_sensor` or `sensor`) against Home Assistant's documented schema: the topic's
/// format and id characters, a JSON object payload with the required keys, documented keys
/// only, a `unique_id`, a `device` mapping that identifies the device and names it (so that
/// entities may share it), a documented device class, an `origin` with a name. An empty
/// payload (a removal) passes if the topic does. Returns what is wrong.
pub fn check_message(prefix: &str, topic: &str, payload: &[u8]) -> Result<(), String> {
    let rest = topic
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| format!("{topic}: not under the discovery prefix {prefix:?}"))?;
    let levels: Vec<&str> = rest.split('/').collect();
    let (component, ids) = match levels.as_slice() {
        [component, ids @ .., "config"] if (1..=2).contains(&ids.len()) => (*component, ids),
        _ => {
            return Err(format!(
                "{topic}: not <prefix>/<component>/[<node_id>/]<object_id>/config"
            ));
        }
    };
    if let Some(bad) = ids.iter().find(|l| !id_level(l)) {
        return Err(format!(
            "{topic}: id {bad:?} has characters outside [a-zA-Z0-9_-]"
        ));
    }
    let platform_keys = match component {
        "binary_sensor" => BINARY_SENSOR_KEYS,
        "sensor" => SENSOR_KEYS,
        other => {
            return Err(format!(
                "{topic}: component {other:?} is not one Watchpost uses"
            ));
        }
    };
    if payload.is_empty() {
        return Ok(());
    }
    let doc: Json = serde_json::from_slice(payload)
        .map_err(|e| format!("{topic}: payload is not JSON: {e}"))?;
    let doc = doc
        .as_object()
        .ok_or_else(|| format!("{topic}: payload is not a JSON dictionary"))?;
    let text = |key: &str| doc.get(key).and_then(Json::as_str);
    for key in doc.keys() {
        if !COMMON_KEYS.contains(&key.as_str()) && !platform_keys.contains(&key.as_str()) {
            return Err(format!(
                "{topic}: {key:?} is not a documented {component} key"
            ));
        }
    }
    if !doc.contains_key("state_topic") {
        return Err(format!("{topic}: no state_topic (required)"));
    }
    for key in ["state_topic", "json_attributes_topic"] {
        if let Some(t) = text(key) {
            if t.is_empty() || t.contains(['+', '#', '\0']) {
                return Err(format!(
                    "{topic}: {key} {t:?} is not a topic to subscribe to"
                ));
            }
        } else if doc.contains_key(key) {
            return Err(format!("{topic}: {key} is not a string"));
        }
    }
    match text("unique_id") {
        Some(u) if !u.is_empty() => {}
        _ => {
            return Err(format!(
                "{topic}: no unique_id (needed for a device and for removal)"
            ));
        }
    }
    let device = doc
        .get("device")
        .and_then(Json::as_object)
        .ok_or_else(|| format!("{topic}: no device mapping"))?;
    if let Some(key) = device.keys().find(|k| !DEVICE_KEYS.contains(&k.as_str())) {
        return Err(format!("{topic}: {key:?} is not a documented device key"));
    }
    let identified = match device.get("identifiers") {
        Some(Json::String(s)) => !s.is_empty(),
        Some(Json::Array(list)) => {
            !list.is_empty()
                && list
                    .iter()
                    .all(|i| i.as_str().is_some_and(|s| !s.is_empty()))
        }
        _ => false,
    } || device.contains_key("connections");
    if !identified {
        return Err(format!(
            "{topic}: the device has neither identifiers nor connections"
        ));
    }
    if !device.get("name").is_some_and(Json::is_string) {
        return Err(format!(
            "{topic}: the device has no name (needed to share it between entities)"
        ));
    }
    if let Some(via) = device.get("via_device") {
        if via.as_str().is_none_or(str::is_empty) {
            return Err(format!("{topic}: via_device is not an identifier"));
        }
    }
    let origin = doc
        .get("origin")
        .and_then(Json::as_object)
        .ok_or_else(|| format!("{topic}: no origin mapping"))?;
    if let Some(key) = origin.keys().find(|k| !ORIGIN_KEYS.contains(&k.as_str())) {
        return Err(format!("{topic}: {key:?} is not a documented origin key"));
    }
    if !origin.get("name").is_some_and(Json::is_string) {
        return Err(format!("{topic}: the origin has no name (required)"));
    }
    if let Some(class) = doc.get("device_class") {
        let known = component != "binary_sensor"
            || class
                .as_str()
                .is_some_and(|c| BINARY_SENSOR_CLASSES.contains(&c));
        if !known {
            return Err(format!(
                "{topic}: device_class {class} is not a binary sensor class"
            ));
        }
    }
    if component == "binary_sensor" {
        let on = text("payload_on").unwrap_or("ON");
        let off = text("payload_off").unwrap_or("OFF");
        if on == off {
            return Err(format!(
                "{topic}: payload_on and payload_off are both {on:?}"
            ));
        }
    }
    if let Some(qos) = doc.get("qos") {
        if qos.as_u64().is_none_or(|q| q > 2) {
            return Err(format!("{topic}: qos {qos} is not 0, 1 or 2"));
        }
    }
    if let Some(after) = doc.get("expire_after") {
        if after.as_u64().is_none_or(|s| s == 0) {
            return Err(format!(
                "{topic}: expire_after {after} is not a number of seconds"
            ));
        }
    }
    if let Some(category) = doc.get("entity_category") {
        if !matches!(category.as_str(), Some("config" | "diagnostic")) {
            return Err(format!(
                "{topic}: entity_category {category} is not config or diagnostic"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

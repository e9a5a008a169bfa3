//! Retained messages, on every topic a client may publish to, within bounds, kept in the
//! database.
//!
//! A retained publish replaces the topic's message, or deletes it if its payload is empty
//! (MQTT 5, 3.3.1.3). Each message keeps its QoS and MQTT 5 properties; a subscription gets
//! the ones its filter matches, at the lower of the two QoS. A message with a Message Expiry
//! Interval is forgotten once it expires.
//!
//! The store is bounded in messages and bytes (`broker.max_retained_messages` and
//! `max_retained_bytes`): one client must not fill the gateway's memory topic by topic. A new
//! topic beyond either bound is refused and counted; replacing or deleting a topic's message
//! is always possible.
//!
//! **Persistence, off the hot path.** Memory is the truth while the gateway runs; the
//! database is its copy for the next start. Keeping a message only marks its topic as changed
//! (one more hash-set insert under the lock a publish takes anyway) and wakes [`persist`],
//! a task that writes the latest state of every changed topic in one transaction of the
//! store thread, and then pauses nine times as long as the write took. A topic that changes
//! a thousand times between two writes costs one row write, and however fast clients
//! retain, writing takes at most a tenth of the time. Each change has a generation number;
//! once a write is committed, the generations up to it are durable, and a QoS 1 or 2
//! retained publish is acknowledged only then (see [`Retained::durable`]), so an
//! acknowledged retained message survives a SIGKILL. The gateway's own retained messages
//! (alerts) are not written here: the store keeps alert states itself.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{Notify, watch};
use tracing::warn;

use super::hub::Message;
use super::packet::{self, Packet, Publish, QoS, Version};
use crate::shutdown::Signal;
use crate::store::{RetainedChange, RetainedRow, Store};
use crate::topic::TopicFilter;

/// After a write that took `t`, the next waits `t` times this: the writes take at most a
/// tenth of the time.
const PAUSE_PER_WRITE: u32 = 9;
/// The longest pause between two writes.
const MAX_PAUSE: Duration = Duration::from_millis(500);

/// Bounds of the store.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetainedLimits {
    /// Most topics with a retained message.
    pub(crate) messages: usize,
    /// Most bytes of topics and payloads together.
    pub(crate) bytes: usize,
}

impl Default for RetainedLimits {
    fn default() -> Self {
        RetainedLimits {
            messages: 10_000,
            bytes: 16 << 20,
        }
    }
}

/// What became of a retained publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kept {
    /// Stored, replacing what the topic had.
    Stored,
    /// The topic's message was deleted (empty payload).
    Deleted,
    /// Refused: a new topic beyond the bounds.
    Full,
}

/// Every retained message.
#[derive(Default)]
pub(crate) struct Retained {
    inner: Mutex<Inner>,
    limits: RetainedLimits,
    /// Wakes [`persist`] when a topic changed.
    changed: Notify,
    /// The highest generation written to the database.
    persisted: watch::Sender<u64>,
}

#[derive(Default)]
struct Inner {
    by_topic: HashMap<Bytes, Arc<Message>>,
    bytes: usize,
    /// Set once [`persist`] runs: changes are then tracked for it.
    durable: bool,
    /// Topics changed since the last write.
    dirty: HashSet<Bytes>,
    /// Counts changes; the generation of the latest.
    generation: u64,
}

impl Inner {
    fn changed(&mut self, topic: &Bytes) -> u64 {
        if self.durable {
            self.generation += 1;
            self.dirty.insert(topic.clone());
        }
        self.generation
    }
}

fn cost(message: &Message) -> usize {
    message.topic.len() + message.payload.len()
}

impl Retained {
    /// An empty store with `limits`.
    pub(crate) fn new(limits: RetainedLimits) -> Retained {
        Retained {
            limits,
            ..Retained::default()
        }
    }

    /// Keeps `message` (whose retain flag is set) as its topic's retained message, or
    /// deletes the topic's message if the payload is empty. Returns what became of it and
    /// the generation of the change, for [`Retained::durable`] (0: nothing changed).
    pub(crate) fn keep(&self, message: &Arc<Message>) -> (Kept, u64) {
        let (kept, generation) = {
            let mut inner = self.lock();
            if message.payload.is_empty() {
                match inner.by_topic.remove(&message.topic) {
                    Some(old) => {
                        inner.bytes -= cost(&old);
                        (Kept::Deleted, inner.changed(&message.topic))
                    }
                    None => (Kept::Deleted, 0),
                }
            } else {
                let old = inner.by_topic.get(&message.topic).map(|m| cost(m));
                let bytes = inner.bytes - old.unwrap_or(0) + cost(message);
                let count = inner.by_topic.len() + usize::from(old.is_none());
                if old.is_none() && (count > self.limits.messages || bytes > self.limits.bytes) {
                    return (Kept::Full, 0);
                }
                inner.bytes = bytes;
                inner
                    .by_topic
                    .insert(message.topic.clone(), Arc::clone(message));
                (Kept::Stored, inner.changed(&message.topic))
            }
        };
        if generation > 0 {
            self.changed.notify_one();
        }
        (kept, generation)
    }

    /// Keeps one of the gateway's own messages, whatever the bounds: an alert must never be
    /// refused because clients filled the store. Not written to the database: the store
    /// keeps alert states, and they are published again at the next start. An empty payload
    /// deletes the topic's message, as a client's would (Home Assistant discovery removes an
    /// entity so); a client's message that the database kept on that topic goes too.
    pub(crate) fn keep_own(&self, message: &Arc<Message>) {
        let mut inner = self.lock();
        if message.payload.is_empty() {
            if let Some(old) = inner.by_topic.remove(&message.topic) {
                inner.bytes -= cost(&old);
                inner.changed(&message.topic);
                drop(inner);
                self.changed.notify_one();
            }
            return;
        }
        let added = cost(message);
        if let Some(old) = inner
            .by_topic
            .insert(message.topic.clone(), Arc::clone(message))
        {
            inner.bytes -= cost(&old);
        }
        inner.bytes += added;
    }

    /// The retained messages whose topic `filter` matches, in topic order; expired ones are
    /// forgotten on the way.
    pub(crate) fn matching(&self, filter: &TopicFilter, now: Instant) -> Vec<Arc<Message>> {
        let mut inner = self.lock();
        let exact = filter.as_str();
        if !exact.contains(['+', '#']) {
            // A filter without wildcards names one topic: no need to look at the others.
            let Some(message) = inner.by_topic.get(exact.as_bytes()).cloned() else {
                return Vec::new();
            };
            if message.expired(now) {
                inner.forget(&message.topic);
                drop(inner);
                self.changed.notify_one();
                return Vec::new();
            }
            return vec![message];
        }
        let mut expired = Vec::new();
        let mut out: Vec<Arc<Message>> = inner
            .by_topic
            .values()
            .filter(|m| {
                if m.expired(now) {
                    expired.push(m.topic.clone());
                    return false;
                }
                std::str::from_utf8(&m.topic).is_ok_and(|t| filter.matches(t))
            })
            .cloned()
            .collect();
        for topic in &expired {
            inner.forget(topic);
        }
        drop(inner);
        if !expired.is_empty() {
            self.changed.notify_one();
        }
        out.sort_by(|a, b| a.topic.cmp(&b.topic));
        out
    }

    /// How many topics have a retained message.
    pub(crate) fn len(&self) -> usize {
        self.lock().by_topic.len()
    }

    /// Resolves once the change of `generation` (from [`Retained::keep`]) is in the
    /// database; at once for generation 0, or when nothing is written to a database.
    pub(crate) async fn durable(&self, generation: u64) {
        if generation == 0 {
            return;
        }
        let mut persisted = self.persisted.subscribe();
        // The sender lives as long as `self`: this returns only once written.
        let _ = persisted.wait_for(|&done| done >= generation).await;
    }

    /// Takes back the messages of the database, as the previous run left them, within the
    /// bounds. Expired, unreadable and excess rows are deleted from the database by
    /// [`persist`]. Returns how many were taken back and how many were not.
    pub(crate) fn restore(
        &self,
        rows: Vec<RetainedRow>,
        now: Instant,
        wall_ms: u64,
    ) -> (usize, usize) {
        let mut inner = self.lock();
        let (mut taken, mut dropped) = (0, 0);
        for row in rows {
            let message = from_row(&row, now, wall_ms);
            let fits = |inner: &Inner, m: &Message| {
                inner.by_topic.len() < self.limits.messages
                    && inner.bytes + cost(m) <= self.limits.bytes
            };
            match message {
                Some(m) if fits(&inner, &m) => {
                    inner.bytes += cost(&m);
                    inner.by_topic.insert(m.topic.clone(), Arc::new(m));
                    taken += 1;
                }
                _ => {
                    inner.dirty.insert(Bytes::from(row.topic.into_bytes()));
                    dropped += 1;
                }
            }
        }
        (taken, dropped)
    }

    /// The latest state of every topic changed since the last call, and the generation it
    /// is at.
    fn take_changes(&self, now: Instant, wall_ms: u64) -> (Vec<RetainedChange>, u64) {
        let (changed, generation) = {
            let mut inner = self.lock();
            let dirty = std::mem::take(&mut inner.dirty);
            let changed: Vec<(Bytes, Option<Arc<Message>>)> = dirty
                .into_iter()
                .map(|topic| {
                    let message = inner.by_topic.get(&topic).cloned();
                    (topic, message)
                })
                .collect();
            (changed, inner.generation)
        };
        // Encoding happens outside the lock that publishes take.
        let changes = changed
            .into_iter()
            .map(|(topic, message)| {
                let topic = String::from_utf8_lossy(&topic).into_owned();
                match message {
                    Some(m) => RetainedChange::Put(to_row(topic, &m, now, wall_ms)),
                    None => RetainedChange::Delete(topic),
                }
            })
            .collect();
        (changes, generation)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tracks changes as if [`persist`] ran.
    #[cfg(test)]
    pub(crate) fn track_changes(&self) {
        self.lock().durable = true;
    }
}

impl Inner {
    /// Forgets an expired message.
    fn forget(&mut self, topic: &Bytes) {
        if let Some(old) = self.by_topic.remove(topic) {
            self.bytes -= cost(&old);
            self.changed(topic);
        }
    }
}

/// A message as a database row: the MQTT 5 PUBLISH that carries it (topic, QoS, properties,
/// payload) and its expiry as a wall-clock time.
fn to_row(topic: String, message: &Message, now: Instant, wall_ms: u64) -> RetainedRow {
    let publish = Publish {
        dup: false,
        qos: message.qos,
        retain: true,
        topic: message.topic.clone(),
        pkid: u16::from(message.qos != QoS::AtMostOnce),
        payload: message.payload.clone(),
        topic_alias: None,
        subscription_ids: Vec::new(),
        properties: message.properties.clone(),
    };
    let mut packet = BytesMut::new();
    packet::encode(&Packet::Publish(publish), Version::V5, &mut packet);
    let expires_ms = message.expires_at.map(|at| {
        let left = at.saturating_duration_since(now);
        wall_ms.saturating_add(u64::try_from(left.as_millis()).unwrap_or(u64::MAX))
    });
    RetainedRow {
        topic,
        packet: packet.to_vec(),
        expires_ms,
    }
}

/// The message of a row, unless it expired or the row is unreadable.
fn from_row(row: &RetainedRow, now: Instant, wall_ms: u64) -> Option<Message> {
    let expires_at = match row.expires_ms {
        Some(at) if at <= wall_ms => return None,
        Some(at) => Some(now + Duration::from_millis(at - wall_ms)),
        None => None,
    };
    let mut buf = BytesMut::from(&row.packet[..]);
    let publish = match packet::decode(&mut buf, Version::V5, usize::MAX) {
        Ok(Some(Packet::Publish(p)))
            if !p.payload.is_empty() && p.topic == row.topic.as_bytes() =>
        {
            p
        }
        other => {
            warn!(topic = %row.topic, "a retained message in the database is unreadable and is dropped: {other:?}");
            return None;
        }
    };
    Some(Message {
        topic: publish.topic,
        payload: publish.payload,
        qos: publish.qos,
        retain: true,
        properties: publish.properties.filter(|p| !p.is_empty()),
        expires_at,
        origin: 0,
    })
}

/// Writes retained messages to the database as they change, until `shutdown`; what changed
/// before the shutdown is written last.
pub(crate) async fn persist(retained: Arc<Retained>, store: Store, shutdown: Signal) {
    retained.lock().durable = true;
    // What `restore` left to delete.
    retained.changed.notify_one();
    let stop = shutdown.wait();
    tokio::pin!(stop);
    loop {
        let stopping = tokio::select! {
            () = retained.changed.notified() => false,
            () = &mut stop => true,
        };
        let (changes, generation) =
            retained.take_changes(Instant::now(), crate::alert::now_millis());
        if !changes.is_empty() {
            let started = Instant::now();
            if !store.retained(changes).await {
                return;
            }
            retained.persisted.send_replace(generation);
            if !stopping {
                // At most a tenth of the time writing: a sensor that retains every reading
                // makes each round wait longer and write more topics at once, instead of
                // keeping the store busy. A lone retained publish waits for one quick write.
                let rest = (started.elapsed() * PAUSE_PER_WRITE).min(MAX_PAUSE);
                tokio::select! {
                    () = tokio::time::sleep(rest) => {}
                    () = &mut stop => {
                        // What changed meanwhile is written once more before the end.
                        let (changes, _) =
                            retained.take_changes(Instant::now(), crate::alert::now_millis());
                        if !changes.is_empty() {
                            store.retained(changes).await;
                        }
                        return;
                    }
                }
            }
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::packet::QoS;

    fn message(topic: &str, payload: &'static str) -> Arc<Message> {
        Arc::new(Message {
            topic: Bytes::from(topic.to_owned()),
            payload: Bytes::from_static(payload.as_bytes()),
            qos: QoS::AtLeastOnce,
            retain: true,
            ..Message::default()
        })
    }

    fn topics(list: &[Arc<Message>]) -> Vec<String> {
        list.iter()
            .map(|m| String::from_utf8_lossy(&m.topic).into_owned())
            .collect()
    }

    #[test]
    fn keeps_the_newest_message_of_each_topic_and_deletes_on_empty() {
        let retained = Retained::default();
        let now = Instant::now();
        for (topic, payload) in [("a/s", "online"), ("b/s", "online"), ("a/s", "offline")] {
            assert_eq!(retained.keep(&message(topic, payload)).0, Kept::Stored);
        }
        let all = TopicFilter::new("+/s").unwrap();
        let got = retained.matching(&all, now);
        assert_eq!(topics(&got), ["a/s", "b/s"]);
        assert_eq!(&got[0].payload[..], b"offline");
        assert_eq!(got[0].qos, QoS::AtLeastOnce);
        assert_eq!(retained.keep(&message("a/s", "")).0, Kept::Deleted);
        assert_eq!(topics(&retained.matching(&all, now)), ["b/s"]);
        let none = TopicFilter::new("c/#").unwrap();
        assert!(retained.matching(&none, now).is_empty());
    }

    #[test]
    fn the_gateways_own_empty_message_deletes_the_topics_message() {
        let retained = Retained::new(RetainedLimits {
            messages: 1,
            bytes: 1 << 20,
        });
        let now = Instant::now();
        let all = TopicFilter::new("#").unwrap();
        retained.keep_own(&message("ha/config", "{}"));
        retained.keep_own(&message("ha/other", "{}"));
        assert_eq!(
            topics(&retained.matching(&all, now)),
            ["ha/config", "ha/other"]
        );
        retained.keep_own(&message("ha/config", ""));
        assert_eq!(topics(&retained.matching(&all, now)), ["ha/other"]);
        // Deleting what is not there changes nothing.
        retained.keep_own(&message("ha/none", ""));
        assert_eq!(retained.len(), 1);
        assert_eq!(retained.lock().bytes, cost(&message("ha/other", "{}")));
    }

    #[test]
    fn new_topics_beyond_the_bounds_are_refused_but_replacing_is_not() {
        let retained = Retained::new(RetainedLimits {
            messages: 2,
            bytes: 20,
        });
        assert_eq!(retained.keep(&message("a", "1234")).0, Kept::Stored);
        assert_eq!(retained.keep(&message("b", "1234")).0, Kept::Stored);
        assert_eq!(retained.keep(&message("c", "1")).0, Kept::Full, "count");
        assert_eq!(retained.keep(&message("a", "12345678")).0, Kept::Stored);
        assert_eq!(retained.len(), 2);
        let big = Retained::new(RetainedLimits {
            messages: 10,
            bytes: 10,
        });
        assert_eq!(big.keep(&message("a", "1234")).0, Kept::Stored);
        assert_eq!(big.keep(&message("b", "123456")).0, Kept::Full, "bytes");
    }

    #[test]
    fn expired_messages_are_forgotten() {
        let retained = Retained::default();
        let now = Instant::now();
        let mut m = Message {
            topic: Bytes::from_static(b"t"),
            payload: Bytes::from_static(b"x"),
            retain: true,
            ..Message::default()
        };
        m.expires_at = Some(now + std::time::Duration::from_secs(1));
        retained.keep(&Arc::new(m));
        let all = TopicFilter::new("#").unwrap();
        assert_eq!(retained.matching(&all, now).len(), 1);
        let later = now + std::time::Duration::from_secs(2);
        assert!(retained.matching(&all, later).is_empty());
        assert_eq!(retained.len(), 0);
    }

    #[test]
    fn changes_are_written_once_per_topic_with_their_generation() {
        let retained = Retained::default();
        let (now, wall) = (Instant::now(), 1_000_000);
        // Before `persist` runs, nothing is tracked.
        assert_eq!(retained.keep(&message("early", "1")), (Kept::Stored, 0));
        retained.lock().durable = true;
        assert_eq!(retained.keep(&message("a", "1")), (Kept::Stored, 1));
        assert_eq!(retained.keep(&message("a", "2")), (Kept::Stored, 2));
        assert_eq!(retained.keep(&message("b", "1")), (Kept::Stored, 3));
        assert_eq!(retained.keep(&message("b", "")), (Kept::Deleted, 4));
        assert_eq!(
            retained.keep(&message("c", "")),
            (Kept::Deleted, 0),
            "nothing to delete"
        );
        let (mut changes, generation) = retained.take_changes(now, wall);
        assert_eq!(generation, 4);
        assert_eq!(changes.len(), 2, "one change per topic: {changes:?}");
        changes.sort_by_key(|c| matches!(c, RetainedChange::Delete(_)));
        let RetainedChange::Put(row) = &changes[0] else {
            panic!("{changes:?}")
        };
        assert_eq!(row.topic, "a");
        assert_eq!(changes[1], RetainedChange::Delete("b".into()));
        assert!(retained.take_changes(now, wall).0.is_empty());

        // The row brings back the message as it was.
        let back = Retained::default();
        assert_eq!(back.restore(vec![row.clone()], now, wall), (1, 0));
        let got = back.matching(&TopicFilter::new("a").unwrap(), now);
        assert_eq!(&got[0].payload[..], b"2");
        assert_eq!(got[0].qos, QoS::AtLeastOnce);
    }

    #[test]
    fn rows_keep_properties_and_expiry_and_restoring_keeps_the_bounds() {
        use crate::broker::packet::MessageProperties;
        let (now, wall) = (Instant::now(), 5_000_000);
        let properties = MessageProperties {
            content_type: Some("application/json".into()),
            message_expiry: Some(60),
            ..MessageProperties::default()
        };
        let m = Message {
            topic: Bytes::from_static(b"cfg/x"),
            payload: Bytes::from_static(b"{}"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: Some(Box::new(properties.clone())),
            expires_at: Some(now + Duration::from_secs(60)),
            origin: 7,
        };
        let row = to_row("cfg/x".into(), &m, now, wall);
        assert_eq!(row.expires_ms, Some(wall + 60_000));
        let later = now + Duration::from_secs(10);
        let back = from_row(&row, later, wall + 10_000).expect("readable");
        assert_eq!(back.properties.as_deref(), Some(&properties));
        assert_eq!(back.qos, QoS::ExactlyOnce);
        assert_eq!(back.expires_at, Some(later + Duration::from_secs(50)));
        assert!(from_row(&row, later, wall + 60_000).is_none(), "expired");
        let broken = RetainedRow {
            packet: vec![0x30, 0x05, 0, 1],
            ..row.clone()
        };
        assert!(from_row(&broken, now, wall).is_none(), "unreadable");

        let small = Retained::new(RetainedLimits {
            messages: 1,
            bytes: 100,
        });
        let other = to_row("cfg/y".into(), &message("cfg/y", "1"), now, wall);
        assert_eq!(small.restore(vec![row, other, broken], now, wall), (1, 2));
        assert_eq!(small.len(), 1);
        let dirty = small.lock().dirty.len();
        assert_eq!(
            dirty, 2,
            "what was not taken back is deleted from the database"
        );
    }

    #[tokio::test]
    async fn durable_waits_for_the_write() {
        let retained = Arc::new(Retained::default());
        retained.durable(0).await;
        retained.lock().durable = true;
        let (_, generation) = retained.keep(&message("a", "1"));
        let waiting = tokio::spawn({
            let retained = retained.clone();
            async move { retained.durable(generation).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        retained.persisted.send_replace(generation);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("resolved once written")
            .unwrap();
    }
}

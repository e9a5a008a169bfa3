//! Retained messages, on every topic a client may publish to, within bounds.
//!
//! A retained publish replaces the topic's message, or deletes it if its payload is empty
//! (MQTT 5, 3.3.1.3). Each message keeps its QoS and MQTT 5 properties; a subscription gets
//! the ones its filter matches, at the lower of the two QoS. A message with a Message Expiry
//! Interval is forgotten once it expires.
//!
//! The store is bounded in messages and bytes (`broker.max_retained_messages` and
//! `max_retained_bytes`): one client must not fill the gateway's memory topic by topic. A new
//! topic beyond either bound is refused and counted; replacing or deleting a topic's message
//! is always possible. A message costs its topic, its payload and about 150 bytes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;

use super::hub::Message;
use crate::topic::TopicFilter;

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
}

#[derive(Default)]
struct Inner {
    by_topic: HashMap<Bytes, Arc<Message>>,
    bytes: usize,
}

fn cost(message: &Message) -> usize {
    message.topic.len() + message.payload.len()
}

impl Retained {
    /// An empty store with `limits`.
    pub(crate) fn new(limits: RetainedLimits) -> Retained {
        Retained {
            inner: Mutex::default(),
            limits,
        }
    }

    /// Keeps `message` (whose retain flag is set) as its topic's retained message, or
    /// deletes the topic's message if the payload is empty.
    pub(crate) fn keep(&self, message: &Arc<Message>) -> Kept {
        let mut inner = self.lock();
        if message.payload.is_empty() {
            if let Some(old) = inner.by_topic.remove(&message.topic) {
                inner.bytes -= cost(&old);
            }
            return Kept::Deleted;
        }
        let old = inner.by_topic.get(&message.topic).map(|m| cost(m));
        let bytes = inner.bytes - old.unwrap_or(0) + cost(message);
        let count = inner.by_topic.len() + usize::from(old.is_none());
        if old.is_none() && (count > self.limits.messages || bytes > self.limits.bytes) {
            return Kept::Full;
        }
        inner.bytes = bytes;
        inner
            .by_topic
            .insert(message.topic.clone(), Arc::clone(message));
        Kept::Stored
    }

    /// Keeps one of the gateway's own messages, whatever the bounds: an alert must never be
    /// refused because clients filled the store.
    pub(crate) fn keep_own(&self, message: &Arc<Message>) {
        let mut inner = self.lock();
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
        for topic in expired {
            if let Some(old) = inner.by_topic.remove(&topic) {
                inner.bytes -= cost(&old);
            }
        }
        out.sort_by(|a, b| a.topic.cmp(&b.topic));
        out
    }

    /// How many topics have a retained message.
    pub(crate) fn len(&self) -> usize {
        self.lock().by_topic.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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
            assert_eq!(retained.keep(&message(topic, payload)), Kept::Stored);
        }
        let all = TopicFilter::new("+/s").unwrap();
        let got = retained.matching(&all, now);
        assert_eq!(topics(&got), ["a/s", "b/s"]);
        assert_eq!(&got[0].payload[..], b"offline");
        assert_eq!(got[0].qos, QoS::AtLeastOnce);
        assert_eq!(retained.keep(&message("a/s", "")), Kept::Deleted);
        assert_eq!(topics(&retained.matching(&all, now)), ["b/s"]);
        let none = TopicFilter::new("c/#").unwrap();
        assert!(retained.matching(&none, now).is_empty());
    }

    #[test]
    fn new_topics_beyond_the_bounds_are_refused_but_replacing_is_not() {
        let retained = Retained::new(RetainedLimits {
            messages: 2,
            bytes: 20,
        });
        assert_eq!(retained.keep(&message("a", "1234")), Kept::Stored);
        assert_eq!(retained.keep(&message("b", "1234")), Kept::Stored);
        assert_eq!(retained.keep(&message("c", "1")), Kept::Full, "count");
        assert_eq!(retained.keep(&message("a", "12345678")), Kept::Stored);
        assert_eq!(retained.len(), 2);
        let big = Retained::new(RetainedLimits {
            messages: 10,
            bytes: 10,
        });
        assert_eq!(big.keep(&message("a", "1234")), Kept::Stored);
        assert_eq!(big.keep(&message("b", "123456")), Kept::Full, "bytes");
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
}

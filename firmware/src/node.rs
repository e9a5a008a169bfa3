//! One sensor node: samples go through report-by-exception into a fixed ring, each message with
//! the next `seq`; the MQTT session drains the ring over a byte stream.
//!
//! Two paths that share only the ring. The sampling path ([`Node::sample`]) decides and queues
//! fixed-point values: no formatting, no I/O. The network path ([`Node::poll`]) formats the
//! oldest queued message into topic and payload and hands it to the [`Session`], which removes it
//! from the ring only once the broker acknowledged it. While the link is down the ring fills; when
//! it is full the oldest message is dropped and counted. Boards and the fleet simulator run the
//! same `Node`; they differ only in their clock, sensor and link.
//!
//! States (a leak probe, a door: [`Node::report_state`], fed by [`crate::input`]) share the ring
//! and the `seq` with numeric readings, in order. When the ring is full, numeric messages go
//! first: the oldest of them is dropped to make room, and a state message is dropped only when
//! the ring holds nothing else. The message in flight (sent, PUBACK not yet read) is never
//! dropped, so the acknowledgement always removes the message it acknowledges.

use core::cell::Cell;

use crate::mqtt::{self, Event, Link, Outbox, Session};
use crate::payload::{self, Writer};
use crate::report::{Deadband, Reporter};
use crate::ring::Ring;

/// A message waiting to be sent: the values that were due at one sample, and its `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample<const M: usize> {
    /// The device's message counter.
    pub seq: u32,
    /// Value of each metric in thousandths, `None` where the metric was not due.
    pub values: [Option<i32>; M],
}

/// A message in the ring: numeric values due at one sample, or one state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a, const M: usize> {
    /// Numeric values, from [`Node::sample`].
    Values(Sample<M>),
    /// A state reading, from [`Node::report_state`].
    State {
        /// The device's message counter.
        seq: u32,
        /// Metric name, e.g. `water_leak`.
        metric: &'a str,
        /// The state.
        state: payload::State<'a>,
    },
}

impl<const M: usize> Message<'_, M> {
    /// The message's `seq`.
    pub fn seq(&self) -> u32 {
        match self {
            Message::Values(sample) => sample.seq,
            Message::State { seq, .. } => *seq,
        }
    }
}

/// What a node is and how it reports. `M` metrics, in the order the sensor delivers them.
#[derive(Debug, Clone, Copy)]
pub struct Config<'a, const M: usize> {
    /// Device id: the MQTT client id and the `{device}` topic level.
    pub device: &'a str,
    /// Metric names, e.g. `["temperature", "humidity"]`.
    pub metrics: [&'a str; M],
    /// Report-by-exception rule of each metric, in thousandths and milliseconds.
    pub deadband: [Deadband<i32>; M],
    /// Optional user name and password for the gateway.
    pub credentials: Option<(&'a str, &'a str)>,
    /// MQTT keep-alive in ms.
    pub keep_alive_ms: u32,
    /// How long to wait for an answer from the gateway before the link counts as dead, in ms.
    pub ack_timeout_ms: u32,
    /// First and longest reconnect delay, in ms.
    pub backoff_ms: (u32, u32),
}

/// Why a [`Config`] cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The device id is not 1 to 32 of `A-Z a-z 0-9 - _ .`.
    BadDeviceId,
    /// A metric name is not 1 to 32 of `A-Z a-z 0-9 - _ .`, or is `seq` or `status`.
    BadMetricName,
    /// The longest message of this configuration does not fit the session's buffers.
    TooLarge,
    /// A state word the gateway would not read back as written ([`payload::State::check`]).
    BadState,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ConfigError::BadDeviceId => "device id must be 1-32 of A-Z a-z 0-9 - _ .",
            ConfigError::BadMetricName => {
                "metric names must be 1-32 of A-Z a-z 0-9 - _ . and not seq or status"
            }
            ConfigError::TooLarge => "the largest message does not fit the MQTT buffers",
            ConfigError::BadState => "a state word the gateway would not read back as written",
        })
    }
}

/// Counters of a node, for logs and the simulator's report.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Samples offered.
    pub samples: u32,
    /// Messages queued (each took a `seq`), states included.
    pub queued: u32,
    /// State messages queued.
    pub states: u32,
    /// Metric values in the queued messages.
    pub values: u32,
    /// Messages dropped from the full ring: numeric ones first, oldest first.
    pub dropped: u32,
    /// State messages among `dropped` (only when the ring held nothing else).
    pub states_dropped: u32,
    /// Messages waiting in the ring, the one in flight included.
    pub waiting: u32,
    /// The session's counters.
    pub mqtt: mqtt::Counters,
}

/// A sensor node with `M` metrics and a ring of `DEPTH` messages. See the module documentation.
pub struct Node<'a, const M: usize, const DEPTH: usize> {
    queue: Queue<'a, M, DEPTH>,
    reporters: [Reporter<i32>; M],
    next_seq: u32,
    samples: u32,
    values: u32,
    states: u32,
    session: Session<'a>,
}

struct Queue<'a, const M: usize, const DEPTH: usize> {
    device: &'a str,
    metrics: [&'a str; M],
    ring: Ring<Message<'a, M>, DEPTH>,
    /// The front message was handed to the session (it may be in flight): it stays until the
    /// session pops it.
    front_out: Cell<bool>,
    states_dropped: u32,
}

impl<'a, const M: usize, const DEPTH: usize> Queue<'a, M, DEPTH> {
    /// Appends `message`; when the ring is full, drops the oldest numeric message first, the
    /// oldest state only when there is no numeric one, and never the message in flight.
    fn push(&mut self, message: Message<'a, M>) {
        if self.ring.is_full() {
            let skip = usize::from(self.front_out.get());
            let numeric = self
                .ring
                .iter()
                .enumerate()
                .skip(skip)
                .find(|(_, m)| matches!(m, Message::Values(_)));
            let victim = numeric.map_or(skip, |(i, _)| i);
            if let Some(Message::State { .. }) = self.ring.evict(victim) {
                self.states_dropped = self.states_dropped.saturating_add(1);
            }
        }
        // There is room now (`Node::new` makes sure the ring holds at least two).
        self.ring.push(message);
    }
}

impl<'a, const M: usize, const DEPTH: usize> Node<'a, M, DEPTH> {
    /// A node that has sent nothing; it connects on its first [`poll`](Self::poll).
    pub fn new(config: Config<'a, M>) -> Result<Self, ConfigError> {
        // One message may be in flight while another waits to take its place.
        const { assert!(DEPTH >= 2, "a node's ring holds at least two messages") };
        if !payload::name_ok(config.device) {
            return Err(ConfigError::BadDeviceId);
        }
        if !config.metrics.iter().all(|m| payload::metric_name_ok(m)) {
            return Err(ConfigError::BadMetricName);
        }
        // Every name is at most 32 bytes and every value at most 12 characters.
        let largest_payload = config.metrics.len() * (32 + 4 + 12) + 20;
        if largest_payload > mqtt::PAYLOAD_MAX || 8 + 32 + 1 + 32 > mqtt::TOPIC_MAX {
            return Err(ConfigError::TooLarge);
        }
        let session = Session::new(mqtt::Config {
            client_id: config.device,
            credentials: config.credentials,
            keep_alive_ms: config.keep_alive_ms,
            ack_timeout_ms: config.ack_timeout_ms,
            backoff_min_ms: config.backoff_ms.0,
            backoff_max_ms: config.backoff_ms.1,
        })
        .map_err(|_| ConfigError::TooLarge)?;
        Ok(Self {
            queue: Queue {
                device: config.device,
                metrics: config.metrics,
                ring: Ring::new(),
                front_out: Cell::new(false),
                states_dropped: 0,
            },
            reporters: config.deadband.map(Reporter::new),
            next_seq: 0,
            samples: 0,
            values: 0,
            states: 0,
            session,
        })
    }

    /// The sampling path: offers one sample of every metric taken at `now_ms`. If any metric is
    /// due, queues one message with the due ones and returns its `seq`. Cheap: no formatting,
    /// no I/O.
    pub fn sample(&mut self, now_ms: u64, values: [i32; M]) -> Option<u32> {
        self.samples = self.samples.wrapping_add(1);
        let mut due = [None; M];
        let mut count = 0;
        for ((reporter, value), slot) in self.reporters.iter_mut().zip(values).zip(&mut due) {
            if reporter.offer(now_ms, value) {
                *slot = Some(value);
                count += 1;
            }
        }
        if count == 0 {
            return None;
        }
        self.values = self.values.wrapping_add(count);
        let seq = self.take_seq();
        self.queue
            .push(Message::Values(Sample { seq, values: due }));
        Some(seq)
    }

    /// Queues one state reading of `metric` (a digital input's change or heartbeat, as
    /// [`crate::input`] decides) and returns its `seq`. It goes out in order with the numeric
    /// messages, on `sensors/{device}/{metric}`. Fails, queueing nothing, when the metric name
    /// or the state word is one the gateway would not read as written.
    pub fn report_state(
        &mut self,
        metric: &'a str,
        state: payload::State<'a>,
    ) -> Result<u32, ConfigError> {
        if !payload::metric_name_ok(metric) {
            return Err(ConfigError::BadMetricName);
        }
        state.check().map_err(|_| ConfigError::BadState)?;
        self.values = self.values.wrapping_add(1);
        self.states = self.states.wrapping_add(1);
        let seq = self.take_seq();
        self.queue.push(Message::State { seq, metric, state });
        Ok(seq)
    }

    fn take_seq(&mut self) -> u32 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        seq
    }

    /// The network path: lets the session do what is due at `now_ms` over `link`. After
    /// [`Event::Connected`] it also announces `online` on the status topic.
    pub fn poll<L: Link>(&mut self, now_ms: u64, link: &mut L) -> Option<Event<L::Error>> {
        let event = self.session.poll(now_ms, link, &mut self.queue);
        if matches!(event, Some(Event::Connected)) {
            if let Some(lost) = self.session.announce_online(now_ms, link) {
                return Some(lost);
            }
        }
        event
    }

    /// True while connected to the gateway.
    pub fn is_up(&self) -> bool {
        self.session.is_up()
    }

    /// The `seq` the next message will carry.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }

    /// The device id.
    pub fn device(&self) -> &'a str {
        self.queue.device
    }

    /// Counters so far.
    pub fn counters(&self) -> Counters {
        Counters {
            samples: self.samples,
            queued: self.next_seq,
            states: self.states,
            values: self.values,
            dropped: self.queue.ring.dropped(),
            states_dropped: self.queue.states_dropped,
            waiting: self.queue.ring.len() as u32,
            mqtt: self.session.counters(),
        }
    }
}

impl<const M: usize, const DEPTH: usize> Outbox for Queue<'_, M, DEPTH> {
    fn peek(&self, topic: &mut Writer<'_>, body: &mut Writer<'_>) -> Result<bool, payload::Error> {
        let Some(message) = self.ring.front() else {
            return Ok(false);
        };
        match message {
            Message::Values(sample) => encode(self.device, &self.metrics, sample, topic, body)?,
            Message::State { seq, metric, state } => {
                encode_state(self.device, metric, *state, *seq, topic, body)?
            }
        }
        self.front_out.set(true);
        Ok(true)
    }

    fn pop(&mut self) {
        self.ring.pop_front();
        self.front_out.set(false);
    }
}

/// Writes the topic and payload of `sample`: one due metric goes on its own topic as
/// `{"v":..,"seq":..}`; several go on the device topic as one object.
pub fn encode<const M: usize>(
    device: &str,
    metrics: &[&str; M],
    sample: &Sample<M>,
    topic: &mut Writer<'_>,
    body: &mut Writer<'_>,
) -> Result<(), payload::Error> {
    let due = || {
        metrics
            .iter()
            .zip(&sample.values)
            .filter_map(|(name, v)| v.map(|v| (*name, v)))
    };
    let mut it = due();
    match (it.next(), it.next()) {
        (Some((name, value)), None) => {
            payload::metric_topic(topic, device, name)?;
            payload::single(body, value, sample.seq)
        }
        _ => {
            payload::device_topic(topic, device)?;
            payload::object(body, due(), sample.seq)
        }
    }
}

/// Writes the topic and payload of one state reading: `sensors/{device}/{metric}` with
/// `{"v":true,"seq":..}` or `{"v":"open","seq":..}`. Fails, before writing anything, when
/// the state does not pass [`payload::State::check`]. As with [`encode`], the names are the
/// caller's to check ([`payload::name_ok`], [`payload::metric_name_ok`]), once.
pub fn encode_state(
    device: &str,
    metric: &str,
    state: payload::State<'_>,
    seq: u32,
    topic: &mut Writer<'_>,
    body: &mut Writer<'_>,
) -> Result<(), payload::Error> {
    state.check()?;
    payload::metric_topic(topic, device, metric)?;
    payload::single_state(body, state, seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BAND: Deadband<i32> = Deadband {
        delta: 500,
        min_interval_ms: 0,
        heartbeat_ms: 10_000,
    };

    fn config() -> Config<'static, 2> {
        Config {
            device: "node-1",
            metrics: ["temperature", "humidity"],
            deadband: [BAND; 2],
            credentials: None,
            keep_alive_ms: 5_000,
            ack_timeout_ms: 2_000,
            backoff_ms: (100, 1_000),
        }
    }

    fn encoded(node: &Node<'_, 2, 4>) -> (std::string::String, std::string::String) {
        let (mut t, mut p) = ([0u8; mqtt::TOPIC_MAX], [0u8; mqtt::PAYLOAD_MAX]);
        let (mut tw, mut pw) = (Writer::new(&mut t), Writer::new(&mut p));
        assert!(node.queue.peek(&mut tw, &mut pw).unwrap());
        let (tn, pn) = (tw.len(), pw.len());
        (
            std::str::from_utf8(&t[..tn]).unwrap().into(),
            std::str::from_utf8(&p[..pn]).unwrap().into(),
        )
    }

    #[test]
    fn seq_counts_messages_not_samples() {
        let mut node: Node<'_, 2, 4> = Node::new(config()).unwrap();
        assert_eq!(node.sample(0, [20_000, 40_000]), Some(0));
        assert_eq!(
            node.sample(100, [20_100, 40_100]),
            None,
            "inside the deadband"
        );
        assert_eq!(node.sample(200, [21_000, 40_100]), Some(1));
        assert_eq!(node.sample(300, [21_000, 45_000]), Some(2));
        assert_eq!(node.sample(10_300, [21_000, 45_000]), Some(3), "heartbeat");
        let c = node.counters();
        assert_eq!((c.samples, c.queued, c.waiting, c.dropped), (5, 4, 4, 0));
        assert_eq!(c.values, 2 + 1 + 1 + 2);
    }

    #[test]
    fn one_due_metric_goes_on_its_topic_several_on_the_device_topic() {
        let mut node: Node<'_, 2, 4> = Node::new(config()).unwrap();
        node.sample(0, [21_500, 40_100]);
        assert_eq!(
            encoded(&node),
            (
                "sensors/node-1".into(),
                r#"{"temperature":21.5,"humidity":40.1,"seq":0}"#.into()
            )
        );
        node.queue.pop();
        node.sample(1, [23_000, 40_100]);
        assert_eq!(
            encoded(&node),
            (
                "sensors/node-1/temperature".into(),
                r#"{"v":23,"seq":1}"#.into()
            )
        );
    }

    #[test]
    fn a_state_goes_on_its_metric_topic() {
        let (mut t, mut p) = ([0u8; mqtt::TOPIC_MAX], [0u8; mqtt::PAYLOAD_MAX]);
        let (mut tw, mut pw) = (Writer::new(&mut t), Writer::new(&mut p));
        let state = payload::State::Word("open");
        encode_state("node-1", "door", state, 12, &mut tw, &mut pw).unwrap();
        let (tn, pn) = (tw.len(), pw.len());
        assert_eq!(&t[..tn], b"sensors/node-1/door");
        assert_eq!(&p[..pn], br#"{"v":"open","seq":12}"#);
    }

    #[test]
    fn a_refused_state_writes_neither_topic_nor_payload() {
        let (mut t, mut p) = ([0u8; mqtt::TOPIC_MAX], [0u8; mqtt::PAYLOAD_MAX]);
        let (mut tw, mut pw) = (Writer::new(&mut t), Writer::new(&mut p));
        let state = payload::State::Word("true");
        assert_eq!(
            encode_state("node-1", "door", state, 12, &mut tw, &mut pw),
            Err(payload::Error::StateReadsAsValue)
        );
        assert!(tw.is_empty() && pw.is_empty());
    }

    #[test]
    fn a_full_ring_drops_the_oldest_messages_and_counts_them() {
        let mut node: Node<'_, 2, 4> = Node::new(config()).unwrap();
        for i in 0..6 {
            node.sample(i, [20_000 + i as i32 * 1_000, 40_000]);
        }
        let c = node.counters();
        assert_eq!((c.queued, c.waiting, c.dropped), (6, 4, 2));
        assert_eq!(node.queue.ring.front().map(Message::seq), Some(2));
    }

    #[test]
    fn a_state_takes_the_next_seq_and_goes_out_in_order() {
        let mut node: Node<'_, 2, 4> = Node::new(config()).unwrap();
        assert_eq!(node.sample(0, [21_500, 40_100]), Some(0));
        assert_eq!(
            node.report_state("water_leak", payload::State::Bool(true)),
            Ok(1)
        );
        assert_eq!(node.sample(1, [23_000, 40_100]), Some(2));
        node.queue.pop();
        assert_eq!(
            encoded(&node),
            (
                "sensors/node-1/water_leak".into(),
                r#"{"v":true,"seq":1}"#.into()
            )
        );
        node.queue.pop();
        assert_eq!(encoded(&node).1, r#"{"v":23,"seq":2}"#);
        let c = node.counters();
        assert_eq!((c.queued, c.states, c.values), (3, 1, 2 + 1 + 1));
    }

    #[test]
    fn a_full_ring_drops_numbers_before_states_and_never_the_message_in_flight() {
        let mut node: Node<'_, 2, 4> = Node::new(config()).unwrap();
        node.sample(0, [20_000, 40_000]); // seq 0
        encoded(&node); // handed to the session: in flight from here
        node.report_state("water_leak", payload::State::Bool(true))
            .unwrap(); // 1
        node.sample(1, [22_000, 40_000]); // 2
        node.report_state("water_leak", payload::State::Bool(false))
            .unwrap(); // 3
        node.sample(2, [24_000, 40_000]); // 4: drops 2, the oldest number not in flight
        node.sample(3, [26_000, 40_000]); // 5: drops 4
        let seqs = |node: &Node<'_, 2, 4>| -> std::vec::Vec<u32> {
            node.queue.ring.iter().map(Message::seq).collect()
        };
        assert_eq!(seqs(&node), [0, 1, 3, 5]);
        node.report_state("water_leak", payload::State::Bool(true))
            .unwrap(); // 6: drops 5
        node.report_state("water_leak", payload::State::Bool(false))
            .unwrap(); // 7: drops 1
        assert_eq!(
            seqs(&node),
            [0, 3, 6, 7],
            "only states left: the oldest not in flight"
        );
        let c = node.counters();
        assert_eq!((c.dropped, c.states_dropped), (4, 1));
        // The PUBACK of seq 0 removes seq 0.
        node.queue.pop();
        assert_eq!(seqs(&node), [3, 6, 7]);
    }

    #[test]
    fn bad_state_reports_queue_nothing() {
        let mut node: Node<'_, 2, 4> = Node::new(config()).unwrap();
        assert_eq!(
            node.report_state("seq", payload::State::Bool(true)),
            Err(ConfigError::BadMetricName)
        );
        assert_eq!(
            node.report_state("door", payload::State::Word("OPEN")),
            Err(ConfigError::BadState)
        );
        assert_eq!((node.next_seq(), node.counters().waiting), (0, 0));
    }

    #[test]
    fn bad_names_are_refused() {
        let mut c = config();
        c.device = "a/b";
        assert_eq!(Node::<2, 4>::new(c).err(), Some(ConfigError::BadDeviceId));
        let mut c = config();
        c.metrics[1] = "seq";
        assert_eq!(Node::<2, 4>::new(c).err(), Some(ConfigError::BadMetricName));
    }
}

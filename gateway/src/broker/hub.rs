//! The broker's router: who is subscribed to what, each session's queue of messages, and the
//! timers of sessions and wills. In memory, no I/O, no clock of its own (time is passed in).
//!
//! Why not rumqttd's router, which the gateway used until MQTT 5 had to work in full: it
//! cannot carry session expiry, will delay, no local, retain as published, retain handling,
//! message expiry, outgoing topic aliases, flow control or subscription identifiers as the
//! specification asks (the Paho interoperability suite passed 10 of its 27 MQTT 5 tests
//! through it); its in-memory logs cost about 40 KiB per link and grew to 950 MiB behind one
//! slow subscriber; and it owns every packet id, so the front could not send a QoS 1 message
//! of its own. Here a session's queue is bounded in messages and bytes, and what does not fit
//! is dropped and counted.
//!
//! # Sessions and queues
//!
//! A session ([`Entry`]) exists for every client that subscribed or asked to keep its
//! session; most sensors only publish and never get one. Its [`Mailbox`] holds what waits
//! for the client ([`Outbox`]): messages not yet sent, QoS 1 and 2 messages sent and not yet
//! acknowledged, and the QoS 2 packet ids the client has sent and not yet released. All of it
//! outlives the connection while the session does, so that a client that comes back gets
//! what it missed (QoS 1 and 2 only, as Mosquitto does) and what was in flight again.
//!
//! # Locks
//!
//! One lock for the hub's state, one per mailbox. The hub's is taken first when both are;
//! a connection never takes the hub's while it holds its mailbox's.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use super::packet::{MessageProperties, QoS, SubscriptionOptions};
use super::retained::{Kept, Retained, RetainedLimits};
use crate::access::Identity;
use crate::acl::Policy;
use crate::stats::Stats;

/// An application message on its way through the broker.
#[derive(Debug, Default, Clone)]
pub struct Message {
    /// Topic name (UTF-8).
    pub topic: Bytes,
    /// Payload.
    pub payload: Bytes,
    /// The QoS it was published with.
    pub qos: QoS,
    /// The retain flag it was published with.
    pub retain: bool,
    /// MQTT 5 properties that travel with it.
    pub properties: Option<Box<MessageProperties>>,
    /// When it expires: its Message Expiry Interval counted from its arrival.
    pub expires_at: Option<Instant>,
    /// The session that published it, for no local; 0 for the gateway's own.
    pub origin: u64,
}

/// Publishes on their way from the clients, through the injector, to ingest.
#[derive(Debug, Default)]
pub struct Batch {
    /// The publishes, in the order they arrived.
    pub messages: Vec<Message>,
    /// Answered once ingest has judged `messages` and the store has committed what judging
    /// them wrote (alert transitions, raw history): the connections that sent QoS 1 and 2
    /// publishes among them acknowledge those only then, so that a reading a gateway
    /// acknowledged survives a crash of that gateway. Dropped unanswered if the gateway stops
    /// first.
    pub judged: Vec<tokio::sync::oneshot::Sender<()>>,
    /// The same for the publishes of the site's other gateway (its mirror frames): answered
    /// once committed here, never held for this gateway's own mirror to that gateway, so that
    /// the two gateways' acknowledgements never wait on each other.
    pub peer_judged: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl From<Vec<Message>> for Batch {
    fn from(messages: Vec<Message>) -> Self {
        Batch {
            messages,
            judged: Vec::new(),
            peer_judged: Vec::new(),
        }
    }
}

impl Message {
    /// True once its expiry interval has passed.
    pub(crate) fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }

    /// What it costs in a queue, roughly: topic, payload and bookkeeping.
    fn size(&self) -> usize {
        self.topic.len() + self.payload.len() + 64
    }

    /// The seconds left of its expiry interval (at least 1), if it has one.
    pub(crate) fn expiry_left(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|at| {
            let left = at.saturating_duration_since(now);
            u32::try_from(left.as_secs() + u64::from(left.subsec_nanos() > 0))
                .unwrap_or(u32::MAX)
                .max(1)
        })
    }
}

/// A message for one session, as its subscription shapes it.
#[derive(Debug, Clone)]
pub(crate) struct Queued {
    pub(crate) message: Arc<Message>,
    /// The lower of the message's QoS and the subscription's.
    pub(crate) qos: QoS,
    /// The retain flag the client sees.
    pub(crate) retain: bool,
    /// Subscription identifiers of the subscriptions that matched.
    pub(crate) ids: Vec<u32>,
}

/// A QoS 1 or 2 message sent to the client and not yet acknowledged.
#[derive(Debug, Clone)]
pub(crate) struct Inflight {
    pub(crate) pkid: u16,
    /// QoS 2: PUBREC came and PUBREL went; waiting for PUBCOMP.
    pub(crate) released: bool,
    pub(crate) item: Queued,
}

/// What waits for a session's client; outlives its connections.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    /// Not yet sent, oldest first.
    pub(crate) queue: VecDeque<Queued>,
    bytes: usize,
    /// Sent, waiting for the client's acknowledgement, oldest first.
    pub(crate) inflight: VecDeque<Inflight>,
    last_pkid: u16,
    /// QoS 2 packet ids the client sent whose PUBREL has not come yet.
    pub(crate) incoming: Vec<u16>,
    /// A connection serves the session now.
    online: bool,
    /// Messages dropped for a full queue since the last log line about it, and when that was.
    dropped: u64,
    drop_logged: Option<Instant>,
}

impl Outbox {
    /// The oldest message not yet sent.
    pub(crate) fn pop(&mut self) -> Option<Queued> {
        let item = self.queue.pop_front()?;
        self.bytes -= item.message.size();
        Some(item)
    }

    /// A packet id not in flight (there are never 65,535 in flight: the receive maximum
    /// bounds them).
    pub(crate) fn next_pkid(&mut self) -> u16 {
        loop {
            self.last_pkid = self.last_pkid.wrapping_add(1);
            if self.last_pkid != 0 && !self.inflight.iter().any(|i| i.pkid == self.last_pkid) {
                return self.last_pkid;
            }
        }
    }
}

/// A session's outbox and the signal that wakes its connection.
#[derive(Debug, Default)]
pub(crate) struct Mailbox {
    outbox: Mutex<Outbox>,
    notify: Notify,
    /// The session's client id, for the log.
    client: Box<str>,
}

/// How often a session whose queue is full is logged, at most.
const DROP_LOG_EVERY: Duration = Duration::from_secs(60);

/// Bounds of a session's queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLimits {
    pub(crate) messages: usize,
    pub(crate) bytes: usize,
}

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotQueued {
    /// QoS 0, and no connection serves the session.
    Offline,
    /// The queue is at its bounds.
    Full,
}

impl Mailbox {
    /// The outbox, locked.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until something was queued since the last wait.
    pub(crate) async fn wait(&self) {
        self.notify.notified().await;
    }

    /// Wakes the connection, as if something had been queued.
    pub(crate) fn wake(&self) {
        self.notify.notify_one();
    }

    /// Queues `item` and wakes the connection.
    pub(crate) fn push(&self, item: Queued, limits: QueueLimits) -> Result<(), NotQueued> {
        let mut outbox = self.lock();
        if !outbox.online && item.qos == QoS::AtMostOnce {
            return Err(NotQueued::Offline);
        }
        let size = item.message.size();
        if outbox.queue.len() >= limits.messages || outbox.bytes + size > limits.bytes {
            // A client that does not read (or reads too slowly) loses messages, never the
            // gateway its memory; as Mosquitto does with max_queued_messages.
            outbox.dropped += 1;
            if outbox
                .drop_logged
                .is_none_or(|t| t.elapsed() >= DROP_LOG_EVERY)
            {
                tracing::warn!(
                    client = %self.client,
                    dropped = outbox.dropped,
                    queued = outbox.queue.len(),
                    queued_bytes = outbox.bytes,
                    online = outbox.online,
                    "messages for this client dropped: its queue is full (broker.max_queued_messages = {}, max_queued_bytes = {}); it is not reading fast enough, or is offline (logged at most once a minute per client; every drop is counted in watchpost_broker_queue_dropped_total)",
                    limits.messages,
                    limits.bytes
                );
                outbox.drop_logged = Some(Instant::now());
                outbox.dropped = 0;
            }
            return Err(NotQueued::Full);
        }
        outbox.bytes += size;
        outbox.queue.push_back(item);
        drop(outbox);
        self.notify.notify_one();
        Ok(())
    }
}

/// The hub's bounds, from `[broker]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HubLimits {
    pub(crate) queue: QueueLimits,
    /// The longest a session outlives its connection, in seconds.
    pub(crate) max_session_expiry: u32,
    pub(crate) retained: RetainedLimits,
}

impl Default for HubLimits {
    fn default() -> Self {
        HubLimits {
            queue: QueueLimits {
                messages: 1000,
                bytes: 1 << 20,
            },
            max_session_expiry: 86_400,
            retained: RetainedLimits::default(),
        }
    }
}

/// One subscription of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Subscription {
    /// The filter as the client wrote it, `$share/{group}/` included.
    pub(crate) filter: Box<str>,
    pub(crate) options: SubscriptionOptions,
    pub(crate) id: Option<u32>,
}

/// A subscription as the tree keeps it.
#[derive(Debug, Clone)]
struct Subscriber {
    number: u64,
    mailbox: Arc<Mailbox>,
    options: SubscriptionOptions,
    id: Option<u32>,
}

/// The members of one shared subscription; each message goes to one of them.
#[derive(Debug)]
struct Group {
    name: Box<str>,
    members: Vec<Subscriber>,
    next: AtomicUsize,
}

/// A level of the subscription tree.
#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    subscribers: Vec<Subscriber>,
    groups: Vec<Group>,
}

/// `$share/{group}/{filter}` split into group and filter; other filters have no group.
pub(crate) fn split_shared(filter: &str) -> (Option<&str>, &str) {
    match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, filter)) => (Some(group), filter),
            None => (Some(rest), ""),
        },
        None => (None, filter),
    }
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.groups.is_empty()
    }

    /// Adds or replaces the subscription of `subscriber.number` to `filter`; true if new.
    fn insert(&mut self, filter: &str, group: Option<&str>, subscriber: Subscriber) -> bool {
        let mut node = self;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let list = match group {
            None => &mut node.subscribers,
            Some(name) => {
                let at = match node.groups.iter().position(|g| &*g.name == name) {
                    Some(at) => at,
                    None => {
                        node.groups.push(Group {
                            name: name.into(),
                            members: Vec::new(),
                            next: AtomicUsize::new(0),
                        });
                        node.groups.len() - 1
                    }
                };
                &mut node.groups[at].members
            }
        };
        match list.iter_mut().find(|s| s.number == subscriber.number) {
            Some(old) => {
                *old = subscriber;
                false
            }
            None => {
                list.push(subscriber);
                true
            }
        }
    }

    /// Removes `number`'s subscription to `filter`; true if there was one. Empty levels go.
    fn remove(
        &mut self,
        mut levels: std::str::Split<'_, char>,
        group: Option<&str>,
        number: u64,
    ) -> bool {
        let Some(level) = levels.next() else {
            return match group {
                None => {
                    let before = self.subscribers.len();
                    self.subscribers.retain(|s| s.number != number);
                    before != self.subscribers.len()
                }
                Some(name) => {
                    let Some(at) = self.groups.iter().position(|g| &*g.name == name) else {
                        return false;
                    };
                    let members = &mut self.groups[at].members;
                    let before = members.len();
                    members.retain(|s| s.number != number);
                    let removed = before != members.len();
                    if members.is_empty() {
                        self.groups.swap_remove(at);
                    }
                    removed
                }
            };
        };
        let Some(child) = self.children.get_mut(level) else {
            return false;
        };
        let removed = child.remove(levels, group, number);
        if child.is_empty() {
            self.children.remove(level);
        }
        removed
    }

    /// Calls `found` for every subscription and group whose filter matches the topic made of
    /// `levels`. `first`: `levels` starts at the topic's first level; `dollar`: the topic
    /// starts with `$`, which wildcards at the first level do not match.
    fn matching<'a>(
        &'a self,
        levels: &[&str],
        first: bool,
        dollar: bool,
        found: &mut impl FnMut(&'a [Subscriber], &'a [Group]),
    ) {
        let wild = !(first && dollar);
        let Some((level, rest)) = levels.split_first() else {
            found(&self.subscribers, &self.groups);
            // `a/#` matches `a` too.
            if let Some(hash) = self.children.get("#") {
                found(&hash.subscribers, &hash.groups);
            }
            return;
        };
        if let Some(child) = self.children.get(*level) {
            child.matching(rest, false, dollar, found);
        }
        if wild {
            if let Some(plus) = self.children.get("+") {
                plus.matching(rest, false, dollar, found);
            }
            if let Some(hash) = self.children.get("#") {
                found(&hash.subscribers, &hash.groups);
            }
        }
    }
}

/// A session the hub keeps.
#[derive(Debug)]
struct Entry {
    /// Identifies the session (no local compares it with a message's origin).
    number: u64,
    mailbox: Arc<Mailbox>,
    subscriptions: Vec<Subscription>,
    /// The connection that serves it now, if any.
    connection: Option<u64>,
    /// Seconds the session outlives its connection.
    expiry: u32,
    /// Since when no connection serves it.
    offline_since: Option<Instant>,
    /// Who made its subscriptions, to check them again when the ACL changes.
    identity: Identity,
}

/// A session a client comes back to.
pub(crate) struct Resumed {
    pub(crate) number: u64,
    pub(crate) mailbox: Arc<Mailbox>,
}

/// A will waiting for its delay.
#[derive(Debug)]
struct DelayedWill {
    client_id: Box<str>,
    due: Instant,
    message: Message,
}

#[derive(Debug, Default)]
struct State {
    sessions: HashMap<Box<str>, Entry>,
    tree: Node,
    wills: Vec<DelayedWill>,
}

/// Numbers of sessions, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SessionCounts {
    pub(crate) online: usize,
    pub(crate) offline: usize,
    /// Messages waiting in all queues.
    pub(crate) queued: usize,
}

/// The router. Shared by every connection, the injector and ingest.
pub(crate) struct Hub {
    state: Mutex<State>,
    limits: HubLimits,
    /// Retained messages.
    pub(crate) retained: Arc<Retained>,
    stats: Arc<Stats>,
    next_number: AtomicU64,
    /// Subscriptions whose filter may match what clients publish ([`hears_clients`]).
    listening: AtomicUsize,
}

/// True if `filter` may match a topic a client publishes on: everything but the gateway's
/// own `alerts/...` and `$...`. While no such subscription exists, what clients publish goes
/// to ingest alone and costs routing nothing.
pub(crate) fn hears_clients(filter: &str) -> bool {
    let (_, filter) = split_shared(filter);
    let first = filter.split('/').next().unwrap_or_default();
    first != crate::alert::TOPIC_ROOT && !first.starts_with('$')
}

impl Hub {
    /// An empty hub.
    pub(crate) fn new(limits: HubLimits, stats: Arc<Stats>) -> Hub {
        Hub {
            state: Mutex::default(),
            limits,
            retained: Arc::new(Retained::new(limits.retained)),
            stats,
            next_number: AtomicU64::new(1),
            listening: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session number, for a connection without a session yet.
    pub(crate) fn number(&self) -> u64 {
        self.next_number.fetch_add(1, Ordering::Relaxed)
    }

    /// The bounds for the retained messages that answer a subscription: the queue's, plus
    /// room for every retained message the broker may hold, so that a new subscriber to `#`
    /// gets all of them. Still a bound: a client that subscribes again and again without
    /// reading cannot queue more than this.
    pub(crate) fn retained_delivery_limits(&self) -> QueueLimits {
        let (queue, retained) = (self.limits.queue, self.limits.retained);
        QueueLimits {
            messages: queue.messages.saturating_add(retained.messages),
            bytes: queue
                .bytes
                .saturating_add(retained.bytes)
                .saturating_add(retained.messages.saturating_mul(64)),
        }
    }

    /// The longest a session may outlive its connection, in seconds.
    pub(crate) fn max_session_expiry(&self) -> u32 {
        self.limits.max_session_expiry
    }

    /// True if some subscription may hear what clients publish.
    pub(crate) fn listening(&self) -> bool {
        self.listening.load(Ordering::Relaxed) > 0
    }

    /// A client connected as `client_id` on `connection`. With `clean_start`, its old
    /// session ends; else the session comes back, if there is one. Returns the resumed session
    /// and any will that the old session's end makes due now.
    pub(crate) fn connect(
        &self,
        client_id: &str,
        clean_start: bool,
        connection: u64,
    ) -> (Option<Resumed>, Option<Message>) {
        let mut state = self.lock();
        let will = match state.wills.iter().position(|w| &*w.client_id == client_id) {
            Some(at) => {
                let will = state.wills.swap_remove(at);
                // A new connection to the session cancels its will; a clean start ends the
                // session, which sends it at once.
                clean_start.then_some(will.message)
            }
            None => None,
        };
        if clean_start {
            if let Some(entry) = state.sessions.remove(client_id) {
                self.drop_subscriptions(&mut state.tree, &entry);
            }
            return (None, will);
        }
        let resumed = state.sessions.get_mut(client_id).map(|entry| {
            entry.connection = Some(connection);
            entry.offline_since = None;
            entry.mailbox.lock().online = true;
            Resumed {
                number: entry.number,
                mailbox: entry.mailbox.clone(),
            }
        });
        (resumed, will)
    }

    /// The session of `client_id` served by `connection`, made if there is none; `None` if
    /// another connection has taken the client id over.
    pub(crate) fn attach(
        &self,
        client_id: &str,
        connection: u64,
        number: u64,
        expiry: u32,
        identity: &Identity,
    ) -> Option<Arc<Mailbox>> {
        let mut state = self.lock();
        if let Some(entry) = state.sessions.get_mut(client_id) {
            if entry.connection != Some(connection) {
                return None;
            }
            entry.expiry = expiry.min(self.limits.max_session_expiry);
            if entry.identity != *identity {
                entry.identity = identity.clone();
            }
            return Some(entry.mailbox.clone());
        }
        let mailbox = Arc::new(Mailbox {
            client: client_id.into(),
            ..Mailbox::default()
        });
        mailbox.lock().online = true;
        state.sessions.insert(
            client_id.into(),
            Entry {
                number,
                mailbox: mailbox.clone(),
                subscriptions: Vec::new(),
                connection: Some(connection),
                expiry: expiry.min(self.limits.max_session_expiry),
                offline_since: None,
                identity: identity.clone(),
            },
        );
        Some(mailbox)
    }

    /// Removes every subscription that `policy` no longer allows its session (online or
    /// offline) to make; returns them as (client id, filter).
    pub(crate) fn revoke(&self, policy: &Policy) -> Vec<(Box<str>, Box<str>)> {
        let mut state = self.lock();
        let State { sessions, tree, .. } = &mut *state;
        let mut revoked = Vec::new();
        for (client_id, entry) in sessions.iter_mut() {
            let mut i = 0;
            while i < entry.subscriptions.len() {
                let (_, plain) = split_shared(&entry.subscriptions[i].filter);
                if policy
                    .may_subscribe(&entry.identity, client_id, plain)
                    .is_ok()
                {
                    i += 1;
                    continue;
                }
                let subscription = entry.subscriptions.swap_remove(i);
                self.forget(tree, entry.number, &subscription);
                revoked.push((client_id.clone(), subscription.filter));
            }
        }
        revoked
    }

    /// Adds or replaces a subscription of the session of `client_id` on `connection`.
    /// `Some(true)` if it is new, `Some(false)` if it replaced one, `None` if the session is
    /// not this connection's any more.
    pub(crate) fn subscribe(
        &self,
        client_id: &str,
        connection: u64,
        subscription: Subscription,
    ) -> Option<bool> {
        let mut state = self.lock();
        let State { sessions, tree, .. } = &mut *state;
        let entry = served(sessions, client_id, connection)?;
        let (group, filter) = split_shared(&subscription.filter);
        let subscriber = Subscriber {
            number: entry.number,
            mailbox: entry.mailbox.clone(),
            options: subscription.options,
            id: subscription.id,
        };
        let new = tree.insert(filter, group, subscriber);
        match entry
            .subscriptions
            .iter_mut()
            .find(|s| s.filter == subscription.filter)
        {
            Some(old) => *old = subscription,
            None => {
                if hears_clients(&subscription.filter) {
                    self.listening.fetch_add(1, Ordering::Relaxed);
                }
                entry.subscriptions.push(subscription);
            }
        }
        Some(new)
    }

    /// Removes a subscription; true if there was one.
    pub(crate) fn unsubscribe(&self, client_id: &str, connection: u64, filter: &str) -> bool {
        let mut state = self.lock();
        let State { sessions, tree, .. } = &mut *state;
        let Some(entry) = served(sessions, client_id, connection) else {
            return false;
        };
        let Some(at) = entry
            .subscriptions
            .iter()
            .position(|s| &*s.filter == filter)
        else {
            return false;
        };
        let subscription = entry.subscriptions.swap_remove(at);
        self.forget(tree, entry.number, &subscription)
    }

    /// Takes `subscription` of session `number` out of the tree; true if it was there.
    fn forget(&self, tree: &mut Node, number: u64, subscription: &Subscription) -> bool {
        if hears_clients(&subscription.filter) {
            self.listening.fetch_sub(1, Ordering::Relaxed);
        }
        let (group, filter) = split_shared(&subscription.filter);
        tree.remove(filter.split('/'), group, number)
    }

    fn drop_subscriptions(&self, tree: &mut Node, entry: &Entry) {
        for subscription in &entry.subscriptions {
            self.forget(tree, entry.number, subscription);
        }
    }

    /// The connection of `client_id` ended; `expiry` is the session expiry interval it
    /// ended with. The session ends now (expiry 0) or waits for the client's return.
    pub(crate) fn detach(&self, client_id: &str, connection: u64, expiry: u32, now: Instant) {
        let mut state = self.lock();
        let State { sessions, tree, .. } = &mut *state;
        let Some(entry) = served(sessions, client_id, connection) else {
            return;
        };
        if expiry == 0 {
            let entry = sessions.remove(client_id).expect("found above");
            self.drop_subscriptions(tree, &entry);
            return;
        }
        entry.connection = None;
        entry.offline_since = Some(now);
        entry.expiry = expiry.min(self.limits.max_session_expiry);
        entry.mailbox.lock().online = false;
    }

    /// Keeps `will` until `due`, unless the client comes back first.
    pub(crate) fn delay_will(&self, client_id: &str, due: Instant, will: Message) {
        let mut state = self.lock();
        state.wills.retain(|w| &*w.client_id != client_id);
        state.wills.push(DelayedWill {
            client_id: client_id.into(),
            due,
            message: will,
        });
    }

    /// Ends the sessions whose expiry passed and returns the wills due by `now` (including
    /// those of the sessions that ended), for the caller to publish.
    pub(crate) fn tick(&self, now: Instant) -> Vec<Message> {
        let mut state = self.lock();
        let State {
            sessions,
            tree,
            wills,
        } = &mut *state;
        let expired: Vec<Box<str>> = sessions
            .iter()
            .filter(|(_, e)| {
                e.offline_since.is_some_and(|since| {
                    now.saturating_duration_since(since) >= Duration::from_secs(e.expiry.into())
                })
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            if let Some(entry) = sessions.remove(id) {
                self.drop_subscriptions(tree, &entry);
            }
        }
        let mut due = Vec::new();
        let mut i = 0;
        while i < wills.len() {
            if wills[i].due <= now || expired.contains(&wills[i].client_id) {
                due.push(wills.swap_remove(i).message);
            } else {
                i += 1;
            }
        }
        due
    }

    /// Keeps `message` as its topic's retained message (its retain flag is set), counting a
    /// refusal; the generation is for [`Retained::durable`].
    pub(crate) fn retain(&self, message: &Arc<Message>) -> (Kept, u64) {
        let kept = self.retained.keep(message);
        if kept.0 == Kept::Full {
            Stats::inc(&self.stats.retained_refused);
        }
        kept
    }

    /// Delivers each message to the sessions whose subscriptions match its topic: once per
    /// session (at the highest QoS of its matching subscriptions, with all their identifiers),
    /// and to one member of each shared subscription.
    pub(crate) fn route(&self, messages: &[Arc<Message>], now: Instant) {
        let state = self.lock();
        let mut targets: Vec<(u64, Arc<Mailbox>, Queued)> = Vec::new();
        for message in messages {
            if message.expired(now) {
                Stats::inc(&self.stats.messages_expired);
                continue;
            }
            let Ok(topic) = std::str::from_utf8(&message.topic) else {
                continue;
            };
            let levels: Vec<&str> = topic.split('/').collect();
            targets.clear();
            let add = |s: &Subscriber, targets: &mut Vec<(u64, Arc<Mailbox>, Queued)>| {
                let qos = message.qos.min(s.options.qos);
                let retain = s.options.retain_as_published && message.retain;
                match targets.iter_mut().find(|t| t.0 == s.number) {
                    Some((_, _, q)) => {
                        q.qos = q.qos.max(qos);
                        q.retain |= retain;
                        q.ids.extend(s.id);
                    }
                    None => targets.push((
                        s.number,
                        s.mailbox.clone(),
                        Queued {
                            message: message.clone(),
                            qos,
                            retain,
                            ids: s.id.into_iter().collect(),
                        },
                    )),
                }
            };
            state.tree.matching(
                &levels,
                true,
                topic.starts_with('$'),
                &mut |subs, groups| {
                    for s in subs {
                        if s.options.no_local && s.number == message.origin {
                            continue;
                        }
                        add(s, &mut targets);
                    }
                    for g in groups {
                        if let Some(s) = pick(g) {
                            add(s, &mut targets);
                        }
                    }
                },
            );
            for (_, mailbox, item) in targets.drain(..) {
                match mailbox.push(item, self.limits.queue) {
                    Ok(()) => {}
                    Err(NotQueued::Offline) => {}
                    Err(NotQueued::Full) => Stats::inc(&self.stats.queue_dropped),
                }
            }
        }
    }

    /// Messages in flight to the session of `client_id`.
    #[cfg(test)]
    pub(crate) fn inflight_of(&self, client_id: &str) -> usize {
        self.lock()
            .sessions
            .get(client_id)
            .map_or(0, |e| e.mailbox.lock().inflight.len())
    }

    /// Sessions online and offline, and the messages queued for them.
    pub(crate) fn counts(&self) -> SessionCounts {
        let state = self.lock();
        let mut counts = SessionCounts::default();
        for entry in state.sessions.values() {
            if entry.connection.is_some() {
                counts.online += 1;
            } else {
                counts.offline += 1;
            }
            counts.queued += entry.mailbox.lock().queue.len();
        }
        counts
    }
}

/// The session of `client_id`, if `connection` serves it.
fn served<'a>(
    sessions: &'a mut HashMap<Box<str>, Entry>,
    client_id: &str,
    connection: u64,
) -> Option<&'a mut Entry> {
    sessions
        .get_mut(client_id)
        .filter(|e| e.connection == Some(connection))
}

/// The member of a shared subscription that gets the next message: round robin, preferring
/// members that are online.
fn pick(group: &Group) -> Option<&Subscriber> {
    let n = group.members.len();
    if n == 0 {
        return None;
    }
    let start = group.next.load(Ordering::Relaxed) % n;
    let online = (0..n)
        .map(|i| (start + i) % n)
        .find(|&i| group.members[i].mailbox.lock().online);
    let at = online.unwrap_or(start);
    group.next.store(at + 1, Ordering::Relaxed);
    Some(&group.members[at])
}

#[cfg(test)]
mod tests;

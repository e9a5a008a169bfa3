//! The site pair: two gateways at one site that both judge every reading.
//!
//! Each gateway mirrors what its own clients publish (readings and presence, each with the
//! stamp it gave it) to the other: the mirror task here is an MQTT client of the peer's
//! broker that publishes [`frame`]s on [`MIRROR_TOPIC`] at QoS 1. The peer's broker admits it
//! under [`CLIENT_PREFIX`]`{name}` with a token made from the secret both share (never the
//! secret itself), lets it publish on that one topic and nothing else, and acknowledges a
//! frame only once the peer's ingest has judged it and committed what that wrote, as for any
//! client. No device may publish or subscribe there.
//!
//! The peer judges mirrored readings by their stamps, not by their arrival, and fires the
//! deadlines of the devices they come from only as the frames say time has passed (their
//! watermark): both gateways raise the same alerts at the same `since`, with the same ids,
//! and forward them; the upstream sees duplicates with identical documents. A device's
//! QoS 1 publish is acknowledged once both gateways have it (or the peer is away, or slow
//! beyond [`ACK_WAIT`]). Frames the peer has not acknowledged are kept (up to
//! [`BACKLOG_BYTES`]) and sent again when the link is back; entries carry their stream and
//! number, so that a frame sent twice is judged once.
//!
//! Catching up: the mirror task also keeps the last [`horizon`] of everything its gateway
//! judged (its own clients' publishes and the peer's, with their stamps; at most
//! [`RING_BYTES`]), and sends it first whenever the link to the peer comes up. A peer that
//! restarted judges it before anything new: what it had already seen before it stopped (by
//! each device's last reading in its database) only rebuilds its rule states, silently; the
//! rest raises and clears what the other gateway raised and cleared while it was away, under
//! the same ids. A peer that did not restart has seen it all and skips it by entry number.

pub mod frame;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::rules::Millis;
use crate::shutdown::Signal;
use crate::stats::Stats;
pub use frame::Entry;

/// The topic mirror frames are published on: a gateway topic, which devices cannot use.
pub const MIRROR_TOPIC: &str = "$watchpost/mirror";
/// Client id and user name of a peer: this, then its gateway id.
pub const CLIENT_PREFIX: &str = "watchpost-peer-";
/// A token is good this long either side of its time (the two clocks must agree this well).
pub const TOKEN_WINDOW_S: u64 = 300;
/// Fewest bytes of a shared secret.
pub const MIN_SECRET_BYTES: usize = 16;
/// A device's publish waits at most this long for the peer's acknowledgement of its mirror.
pub const ACK_WAIT: Duration = Duration::from_secs(2);
/// Frames kept for a peer that is away; beyond, the oldest are dropped (and counted).
pub const BACKLOG_BYTES: usize = 64 << 20;
/// Largest frame: well under the peer's default packet limit (64 KiB).
pub const FRAME_BYTES: usize = 48 * 1024;
/// Frames in flight to the peer at once.
const MAX_IN_FLIGHT: usize = 64;
/// How often the watermark goes to the peer when no reading does.
pub const HEARTBEAT: Duration = Duration::from_millis(250);
/// Wait between connection attempts.
const RETRY: Duration = Duration::from_secs(1);
/// Most memory the judged publishes kept for a peer's catch-up take (entries and their bytes).
pub const RING_BYTES: usize = 32 << 20;

/// How far back a peer's catch-up reaches: the longest time any rule looks back or waits
/// (`for`, silence, presence grace, rate, deviation and flapping windows, cooldown), plus a
/// minute; at least 2 minutes and at most an hour. A learned silence counts as 10 minutes.
pub fn horizon(rules: &[crate::rules::Rule]) -> Duration {
    use crate::rules::{Kind, SilenceAfter};
    let longest = rules
        .iter()
        .map(|r| {
            let kind = match &r.kind {
                Kind::Rate { window, .. }
                | Kind::Deviation { window, .. }
                | Kind::Flapping { window, .. } => *window,
                Kind::Silence {
                    after: SilenceAfter::Fixed(d),
                    ..
                } => *d,
                Kind::Silence { .. } => Duration::from_secs(600),
                Kind::Presence { grace } => *grace,
                Kind::Threshold(_) | Kind::State(_) => Duration::ZERO,
            };
            kind.max(r.hold).max(r.cooldown.unwrap_or_default())
        })
        .max()
        .unwrap_or_default();
    (longest + Duration::from_secs(60)).clamp(Duration::from_secs(120), Duration::from_secs(3600))
}

/// Why the site pair cannot start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The secret file cannot be read.
    #[error("cannot read the peer secret {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The secret is too short.
    #[error(
        "the peer secret in {path} has {len} bytes; it needs at least {MIN_SECRET_BYTES} (e.g. `head -c 32 /dev/urandom | base64 > {path}`, the same file on both gateways)"
    )]
    Short {
        /// The file.
        path: String,
        /// Its length.
        len: usize,
    },
}

/// The secret both gateways of a pair share.
#[derive(Clone)]
pub struct Secret(Arc<[u8]>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Reads the secret from `path` (surrounding white space is not part of it).
    pub fn read(path: &Path) -> Result<Secret, PeerError> {
        let text = std::fs::read(path).map_err(|source| PeerError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let trimmed = text.trim_ascii();
        if trimmed.len() < MIN_SECRET_BYTES {
            return Err(PeerError::Short {
                path: path.display().to_string(),
                len: trimmed.len(),
            });
        }
        Ok(Secret(trimmed.into()))
    }

    /// A secret from bytes (tests).
    pub fn from_bytes(bytes: &[u8]) -> Secret {
        Secret(bytes.into())
    }

    fn mac(&self, name: &str, unix_s: u64) -> ring::hmac::Tag {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        ring::hmac::sign(&key, format!("watchpost-peer\n{name}\n{unix_s}").as_bytes())
    }

    /// The password gateway `name` connects to its peer with at `unix_s`: the time and a
    /// MAC of name and time under the secret.
    pub fn token(&self, name: &str, unix_s: u64) -> String {
        let mac = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.mac(name, unix_s));
        format!("{unix_s}.{mac}")
    }

    /// True if `password` is a token of `name` made within [`TOKEN_WINDOW_S`] of `now_s`.
    pub fn verify(&self, name: &str, password: &str, now_s: u64) -> bool {
        let Some((time, mac)) = password.split_once('.') else {
            return false;
        };
        let Ok(unix_s) = time.parse::<u64>() else {
            return false;
        };
        if unix_s.abs_diff(now_s) > TOKEN_WINDOW_S {
            return false;
        }
        let Ok(mac) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(mac) else {
            return false;
        };
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        ring::hmac::verify(
            &key,
            format!("watchpost-peer\n{name}\n{unix_s}").as_bytes(),
            &mac,
        )
        .is_ok()
    }
}

/// Seconds since the epoch, now.
pub fn unix_now() -> u64 {
    crate::alert::now_millis() / 1000
}

/// What ingest hands the mirror task after a batch, or to move the watermark.
#[derive(Debug)]
pub struct MirrorOut {
    /// Every publish ingest judged, in order: this gateway's own clients' (stamped here, to
    /// be mirrored) and the peer's (kept for its catch-up only).
    pub entries: Vec<Entry>,
    /// Every entry this gateway stamped up to this wall time has been handed over.
    pub watermark: Millis,
    /// This gateway's raised alerts after judging them.
    pub digest: frame::Digest,
    /// Acknowledgements of the clients' publishes: answered once the store has committed
    /// (`committed`) and the peer has the frame, or is away, or did not answer in
    /// [`ACK_WAIT`].
    pub judged: Vec<oneshot::Sender<()>>,
    /// Answered when the store has committed what judging the batch wrote.
    pub committed: Option<oneshot::Receiver<()>>,
}

/// Acknowledgements waiting on a frame.
struct Waiters {
    judged: Vec<oneshot::Sender<()>>,
    committed: Option<oneshot::Receiver<()>>,
}

impl Waiters {
    /// Answers the clients once the store has committed.
    fn release(self) {
        if self.judged.is_empty() {
            return;
        }
        match self.committed {
            None => {
                for j in self.judged {
                    let _ = j.send(());
                }
            }
            Some(committed) => {
                tokio::spawn(async move {
                    // Dropped unanswered only if the gateway stops: then no one is acked.
                    if committed.await.is_ok() {
                        for j in self.judged {
                            let _ = j.send(());
                        }
                    }
                });
            }
        }
    }
}

/// `entries` cut into runs that each fit a frame of at most [`FRAME_BYTES`].
fn chunks(entries: &[Entry]) -> Vec<&[Entry]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    let mut size = frame::HEADER_BYTES;
    for (i, e) in entries.iter().enumerate() {
        if i > start && size + e.size() > FRAME_BYTES {
            chunks.push(&entries[start..i]);
            start = i;
            size = frame::HEADER_BYTES;
        }
        size += e.size();
    }
    chunks.push(&entries[start..]);
    chunks
}

impl Pending {
    fn new(bytes: Bytes, entries: &[Entry], waiters: Option<Waiters>) -> Pending {
        Pending {
            bytes,
            entries: entries.len(),
            first_wall: entries.first().map_or(0, |e| e.wall),
            sent: None,
            sent_at: None,
            waiters,
        }
    }
}

/// A frame on its way to the peer.
struct Pending {
    bytes: Bytes,
    entries: usize,
    /// The stamp of its first entry.
    first_wall: Millis,
    /// Packet id once published on this connection; `Some(0)` while rumqttc has not said.
    sent: Option<u16>,
    sent_at: Option<Instant>,
    waiters: Option<Waiters>,
}

/// The mirror: an MQTT client of the peer's broker.
pub struct Mirror {
    /// This gateway's id.
    pub own: String,
    /// This process's stream: entries with it are this gateway's clients'.
    pub stream: u64,
    /// How far back the catch-up reaches ([`horizon`]).
    pub horizon: Duration,
    /// The peer's MQTT listener.
    pub address: SocketAddr,
    /// The shared secret.
    pub secret: Secret,
}

impl Mirror {
    /// Sends what `from` hands over to the peer until `shutdown`, reconnecting as needed.
    pub async fn run(
        self,
        mut from: mpsc::UnboundedReceiver<MirrorOut>,
        stats: Arc<Stats>,
        shutdown: Signal,
    ) {
        let mut backlog = Backlog::new(stats.clone());
        backlog.stream = self.stream;
        backlog.horizon = self.horizon.as_millis() as Millis;
        let client_id = format!("{CLIENT_PREFIX}{}", self.own);
        let mut logged_down = false;
        let mut ever_connected = false;
        let mut refused_logged = false;
        let mut attempts = 0u64;
        'connect: loop {
            let mut options = MqttOptions::new(
                &client_id,
                self.address.ip().to_string(),
                self.address.port(),
            );
            options.set_credentials(&client_id, self.secret.token(&self.own, unix_now()));
            options.set_keep_alive(Duration::from_secs(5));
            options.set_clean_session(true);
            options.set_max_packet_size(256 * 1024, 256 * 1024);
            options.set_inflight(MAX_IN_FLIGHT as u16 + 8);
            let (client, mut events) = AsyncClient::new(options, MAX_IN_FLIGHT * 2 + 16);
            // Devices wait for the peer's acknowledgement: no Nagle delay on the way there.
            let mut network = events.network_options();
            network.set_tcp_nodelay(true);
            events.set_network_options(network);
            let mut connected = false;
            let mut heartbeat = tokio::time::interval(HEARTBEAT);
            heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut watermark_sent: Millis = 0;
            attempts += 1;
            loop {
                tokio::select! {
                    _ = shutdown.clone().wait() => break 'connect,
                    out = from.recv() => {
                        let Some(out) = out else { break 'connect };
                        backlog.push(out, connected);
                        Stats::set(&stats.peer_mirror_queue, from.len() as u64);
                    }
                    event = events.poll() => match event {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            if ack.code != rumqttc::ConnectReturnCode::Success {
                                // rumqttc reports refusals as errors (below); this is a guard.
                                break;
                            }
                            connected = true;
                            ever_connected = true;
                            refused_logged = false;
                            logged_down = false;
                            Stats::set(&stats.peer_link_up, 1);
                            info!(peer = %self.address, backlog = backlog.frames.len(), attempts, "mirroring to the peer");
                            attempts = 0;
                            backlog.restart();
                            let replayed = backlog.catch_up();
                            if replayed > 0 {
                                info!(entries = replayed, "catch-up sent to the peer: the last {} of judged readings", humantime::format_duration(self.horizon));
                            }
                        }
                        Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => backlog.sent(pkid),
                        Ok(Event::Incoming(Packet::PubAck(ack))) => backlog.acked(ack.pkid),
                        Ok(_) => {}
                        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
                            if !std::mem::replace(&mut refused_logged, true) {
                                warn!(peer = %self.address, ?code, "the peer refused the mirror's login: check that both gateways read the same secret, that each names the other's [gateway] id in [peer] name, and that their clocks agree within 5 minutes");
                            }
                            break;
                        }
                        Err(e) => {
                            if !ever_connected && !logged_down {
                                info!(peer = %self.address, error = %e, "waiting for the peer gateway (retrying every second)");
                                logged_down = true;
                            } else if connected || !logged_down {
                                warn!(peer = %self.address, error = %e, backlog = backlog.frames.len(), "the mirror to the peer is down; readings are kept for it and sent when it is back (devices are not kept waiting)");
                                logged_down = true;
                            } else {
                                debug!(peer = %self.address, error = %e, "the peer is still unreachable");
                            }
                            break;
                        }
                    },
                    _ = heartbeat.tick() => {
                        backlog.expire_waits();
                        if connected && backlog.all_published() && backlog.watermark > watermark_sent {
                            let beat = frame::encode(backlog.watermark, Some(backlog.digest), &[]);
                            if client.try_publish(MIRROR_TOPIC, QoS::AtMostOnce, false, beat).is_ok() {
                                watermark_sent = backlog.watermark;
                            }
                        }
                    }
                }
                if connected {
                    backlog.publish(&client);
                }
            }
            Stats::set(&stats.peer_link_up, 0);
            backlog.disconnected();
            // Wait before the next attempt, still taking what ingest hands over.
            let again = tokio::time::sleep(RETRY);
            tokio::pin!(again);
            loop {
                tokio::select! {
                    _ = &mut again => break,
                    _ = shutdown.clone().wait() => break 'connect,
                    out = from.recv() => {
                        let Some(out) = out else { break 'connect };
                        backlog.push(out, false);
                        Stats::set(&stats.peer_mirror_queue, from.len() as u64);
                    }
                }
            }
        }
        backlog.disconnected();
    }
}

/// `e` with its topic and payload copied into one buffer of their own: an entry's bytes are
/// slices of the buffer they arrived in (a client's read buffer, a peer's whole frame), and
/// an entry kept for minutes would keep all of that buffer alive.
fn kept_copy(e: &Entry) -> Entry {
    let mut both = bytes::BytesMut::with_capacity(e.topic.len() + e.payload.len());
    both.extend_from_slice(&e.topic);
    both.extend_from_slice(&e.payload);
    let mut both = both.freeze();
    let payload = both.split_off(e.topic.len());
    Entry {
        stream: e.stream,
        seq: e.seq,
        wall: e.wall,
        retain: e.retain,
        qos: e.qos,
        topic: both,
        payload,
    }
}

/// Memory an entry of the ring takes: its slot and its buffer (what [`RING_BYTES`] bounds).
fn ring_size(e: &Entry) -> usize {
    std::mem::size_of::<Entry>() + e.topic.len() + e.payload.len()
}

/// Frames not yet acknowledged by the peer, oldest first, and the catch-up ring.
struct Backlog {
    frames: VecDeque<Pending>,
    bytes: usize,
    /// The newest watermark ingest gave, and the raised alerts then.
    watermark: Millis,
    digest: frame::Digest,
    stats: Arc<Stats>,
    /// This gateway's stream.
    stream: u64,
    /// Everything judged in the last `horizon` ms, in order.
    ring: VecDeque<Entry>,
    ring_bytes: usize,
    horizon: Millis,
    /// When dropping from a full backlog was last logged.
    drop_logged: Option<Instant>,
}

impl Backlog {
    fn new(stats: Arc<Stats>) -> Backlog {
        Backlog {
            frames: VecDeque::new(),
            bytes: 0,
            watermark: 0,
            digest: frame::Digest::default(),
            stats,
            stream: 0,
            ring: VecDeque::new(),
            ring_bytes: 0,
            horizon: 0,
            drop_logged: None,
        }
    }

    /// Keeps `judged` for a catch-up; forgets what is older than the horizon or too much.
    fn remember(&mut self, judged: &[Entry]) {
        for e in judged {
            let kept = kept_copy(e);
            self.ring_bytes += ring_size(&kept);
            self.ring.push_back(kept);
        }
        // The horizon runs back from now (the watermark moves with every heartbeat), so that
        // a quiet spell after a burst lets the burst go.
        let newest = self.ring.back().map_or(0, |e| e.wall).max(self.watermark);
        while let Some(front) = self.ring.front() {
            if front.wall.saturating_add(self.horizon) >= newest && self.ring_bytes <= RING_BYTES {
                break;
            }
            self.ring_bytes -= ring_size(front);
            self.ring.pop_front();
        }
        // After a burst the slots stay allocated: give most of them back.
        if self.ring.capacity() > 4 * self.ring.len() + 1024 {
            self.ring.shrink_to(2 * self.ring.len());
        }
        Stats::set(&self.stats.peer_catchup_bytes, self.ring_bytes as u64);
    }

    /// A new connection: the catch-up (the ring) goes out before anything else, after the
    /// frames older than it; frames the ring covers are dropped (no one waits on them once
    /// the link was down). Returns the entries in the catch-up.
    fn catch_up(&mut self) -> usize {
        let Some(oldest) = self.ring.front().map(|e| e.wall) else {
            return 0;
        };
        let (older, covered): (Vec<Pending>, Vec<Pending>) =
            self.frames.drain(..).partition(|p| p.first_wall < oldest);
        for p in covered {
            if let Some(w) = p.waiters {
                w.release();
            }
        }
        self.frames.extend(older);
        let entries: Vec<Entry> = self.ring.iter().cloned().collect();
        for chunk in chunks(&entries) {
            let watermark = chunk.last().map_or(0, |e| e.wall);
            self.frames.push_back(Pending::new(
                frame::encode(watermark, None, chunk),
                chunk,
                None,
            ));
        }
        self.bytes = self.frames.iter().map(|p| p.bytes.len()).sum();
        Stats::add(&self.stats.peer_entries_replayed, entries.len() as u64);
        self.gauges();
        entries.len()
    }

    fn gauges(&self) {
        Stats::set(&self.stats.peer_backlog_frames, self.frames.len() as u64);
        Stats::set(&self.stats.peer_backlog_bytes, self.bytes as u64);
    }

    /// Takes a batch: its entries in frames of at most [`FRAME_BYTES`], the acknowledgements
    /// on the last. With the link down they are answered at once (after the store).
    fn push(&mut self, out: MirrorOut, connected: bool) {
        let MirrorOut {
            entries,
            watermark,
            digest,
            judged,
            committed,
        } = out;
        self.watermark = self.watermark.max(watermark);
        self.digest = digest;
        self.remember(&entries);
        let stream = self.stream;
        let entries: Vec<Entry> = entries.into_iter().filter(|e| e.stream == stream).collect();
        let mut waiters = Some(Waiters { judged, committed });
        if !connected {
            if let Some(w) = waiters.take() {
                w.release();
            }
        }
        if entries.is_empty() {
            if let Some(w) = waiters {
                w.release();
            }
            return;
        }
        let chunks = chunks(&entries);
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let pending = Pending::new(
                frame::encode(watermark, Some(self.digest), chunk),
                chunk,
                if i == last { waiters.take() } else { None },
            );
            self.bytes += pending.bytes.len();
            self.frames.push_back(pending);
        }
        // Full: the oldest frames not on their way go. Frames in flight stay: the peer may
        // have them already, and rumqttc gives packet ids in the order they were handed over.
        let mut dropped = 0;
        while self.bytes > BACKLOG_BYTES {
            let Some(at) = self.frames.iter().position(|p| p.sent.is_none()) else {
                break;
            };
            let old = self.frames.remove(at).expect("found");
            self.bytes -= old.bytes.len();
            dropped += old.entries;
            if let Some(w) = old.waiters {
                w.release();
            }
        }
        if dropped > 0 {
            Stats::add(&self.stats.peer_mirror_dropped, dropped as u64);
            let now = Instant::now();
            if self
                .drop_logged
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(60))
            {
                self.drop_logged = Some(now);
                warn!(
                    dropped,
                    backlog_mib = BACKLOG_BYTES >> 20,
                    "the backlog for the peer gateway is full: the oldest readings not yet sent to it are dropped (the peer will miss them; counted in watchpost_peer_mirror_dropped_total); logged at most once a minute"
                );
            }
        }
        self.gauges();
    }

    /// Publishes frames not yet sent on this connection, in order, up to the in-flight limit.
    fn publish(&mut self, client: &AsyncClient) {
        let in_flight = self.frames.iter().filter(|p| p.sent.is_some()).count();
        let mut room = MAX_IN_FLIGHT.saturating_sub(in_flight);
        for p in self.frames.iter_mut().filter(|p| p.sent.is_none()) {
            if room == 0 {
                break;
            }
            if client
                .try_publish(MIRROR_TOPIC, QoS::AtLeastOnce, false, p.bytes.clone())
                .is_err()
            {
                break;
            }
            p.sent = Some(0);
            p.sent_at = Some(Instant::now());
            room -= 1;
            Stats::inc(&self.stats.peer_frames_sent);
            Stats::add(&self.stats.peer_entries_sent, p.entries as u64);
        }
    }

    /// True when every frame has been handed to the connection (a heartbeat may follow).
    fn all_published(&self) -> bool {
        self.frames.iter().all(|p| p.sent.is_some())
    }

    /// rumqttc gave the next published frame its packet id.
    fn sent(&mut self, pkid: u16) {
        if let Some(p) = self.frames.iter_mut().find(|p| p.sent == Some(0)) {
            p.sent = Some(pkid);
        }
    }

    /// The peer acknowledged `pkid`: it has judged the frame and committed what it wrote.
    fn acked(&mut self, pkid: u16) {
        if let Some(at) = self.frames.iter().position(|p| p.sent == Some(pkid)) {
            let p = self.frames.remove(at).expect("found");
            self.bytes -= p.bytes.len();
            if let Some(w) = p.waiters {
                w.release();
            }
            self.gauges();
        }
    }

    /// Devices waited [`ACK_WAIT`] for the peer: they are answered; the frame stays.
    fn expire_waits(&mut self) {
        for p in &mut self.frames {
            if p.sent_at.is_some_and(|t| t.elapsed() >= ACK_WAIT) {
                if let Some(w) = p.waiters.take() {
                    Stats::inc(&self.stats.peer_ack_timeouts);
                    w.release();
                }
            }
        }
    }

    /// A new connection: everything goes out again, in order.
    fn restart(&mut self) {
        for p in &mut self.frames {
            p.sent = None;
            p.sent_at = None;
        }
    }

    /// The link is down: no device waits for it.
    fn disconnected(&mut self) {
        for p in &mut self.frames {
            p.sent = None;
            p.sent_at = None;
            if let Some(w) = p.waiters.take() {
                w.release();
            }
        }
        self.gauges();
    }
}

/// Alert states that differ between the two gateways for this long are reported.
pub const DIVERGENCE_AFTER: Duration = Duration::from_secs(10);

/// This gateway's raised alerts, for comparing with the peer's.
#[derive(Debug, Default)]
pub struct Raised {
    ids: std::collections::HashSet<String>,
    /// Their digest.
    pub digest: frame::Digest,
}

impl Raised {
    /// Follows one published transition.
    pub fn track(&mut self, doc: &crate::alert::AlertDoc) {
        let changed = match doc.state {
            crate::rules::AlertState::Raised => self.ids.insert(doc.id.clone()),
            crate::rules::AlertState::Cleared => self.ids.remove(&doc.id),
        };
        if changed {
            self.digest.hash ^= frame::id_hash(&doc.id);
            self.digest.raised = self.ids.len() as u32;
        }
    }
}

/// What a gateway knows of the mirror it receives.
#[derive(Debug)]
pub struct Incoming {
    /// This process's own stream: its entries, coming back in a catch-up, were judged here.
    own: u64,
    /// Per stream, the highest entry number judged.
    seen: HashMap<u64, u64>,
    /// When the last frame came.
    last_heard: Option<Instant>,
    /// The peer's devices' deadlines follow the peer's time.
    pub active: bool,
    takeover_after: Duration,
    stats: Arc<Stats>,
    /// Since when the peer's raised alerts have differed from this gateway's.
    differs_since: Option<Instant>,
}

impl Incoming {
    /// Nothing heard yet.
    pub fn new(own: u64, takeover_after: Duration, stats: Arc<Stats>) -> Incoming {
        Incoming {
            own,
            seen: HashMap::new(),
            last_heard: None,
            active: false,
            takeover_after,
            stats,
            differs_since: None,
        }
    }

    /// Compares the peer's raised alerts (as of its frame, now judged here too) with this
    /// gateway's; a difference that lasts [`DIVERGENCE_AFTER`] is logged and shown.
    pub fn compare(&mut self, theirs: Option<frame::Digest>, ours: frame::Digest) {
        let Some(theirs) = theirs else { return };
        Stats::set(&self.stats.peer_alerts_raised, u64::from(theirs.raised));
        if theirs == ours {
            if self
                .differs_since
                .take()
                .is_some_and(|t| t.elapsed() >= DIVERGENCE_AFTER)
            {
                info!("the peer gateway and this one agree on every raised alert again");
            }
            Stats::set(&self.stats.peer_differs_since_ms, 0);
            return;
        }
        let since = *self.differs_since.get_or_insert_with(Instant::now);
        if Stats::get(&self.stats.peer_differs_since_ms) == 0 {
            let at =
                crate::stats::monotonic_ms().saturating_sub(since.elapsed().as_millis() as u64);
            Stats::set(&self.stats.peer_differs_since_ms, at.max(1));
        }
        if since.elapsed() >= DIVERGENCE_AFTER && since.elapsed() < DIVERGENCE_AFTER + HEARTBEAT {
            warn!(
                ours = ours.raised,
                theirs = theirs.raised,
                "the peer gateway's raised alerts have differed from this one's for 10 s (a partition longer than peer.takeover_after, or a gateway that missed readings); both forward what they raise"
            );
        }
    }

    /// A frame came with `watermark`, at wall time `now`.
    pub fn heard(&mut self, watermark: Millis, now: Millis) {
        self.last_heard = Some(Instant::now());
        Stats::set(
            &self.stats.peer_heard_ms,
            crate::stats::monotonic_ms().max(1),
        );
        Stats::set(&self.stats.peer_lag_ms, now.saturating_sub(watermark));
        Stats::inc(&self.stats.peer_frames_received);
    }

    /// True if `entry` is new (not judged before); counts duplicates and gaps.
    pub fn accept(&mut self, entry: &Entry) -> bool {
        if entry.stream == self.own {
            Stats::inc(&self.stats.peer_entries_duplicate);
            return false;
        }
        let last = self.seen.entry(entry.stream).or_insert(0);
        if entry.seq <= *last {
            Stats::inc(&self.stats.peer_entries_duplicate);
            return false;
        }
        if *last != 0 && entry.seq > *last + 1 {
            Stats::add(&self.stats.peer_entries_gap, entry.seq - *last - 1);
        }
        *last = entry.seq;
        Stats::inc(&self.stats.peer_entries_received);
        true
    }

    /// True when the peer has been silent for `takeover_after` since it was last heard.
    pub fn silent_too_long(&self) -> bool {
        self.last_heard
            .is_some_and(|t| t.elapsed() >= self.takeover_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reading of `sensors/a/t` for the tests: stream, number, stamp and payload.
    fn entry(stream: u64, seq: u64, wall: Millis, payload: Bytes) -> Entry {
        Entry {
            stream,
            seq,
            wall,
            retain: false,
            qos: 1,
            topic: Bytes::from_static(b"sensors/a/t"),
            payload,
        }
    }

    #[test]
    fn tokens_prove_the_name_and_time_under_the_secret() {
        let secret = Secret::from_bytes(b"0123456789abcdef0123");
        let now = 1_795_284_345;
        let token = secret.token("gw-a", now);
        assert!(secret.verify("gw-a", &token, now));
        assert!(secret.verify("gw-a", &token, now + TOKEN_WINDOW_S));
        assert!(
            !secret.verify("gw-a", &token, now + TOKEN_WINDOW_S + 1),
            "too old"
        );
        assert!(!secret.verify("gw-b", &token, now), "another name");
        let other = Secret::from_bytes(b"0123456789abcdef0124");
        assert!(!other.verify("gw-a", &token, now), "another secret");
        assert!(!token.contains("0123456789"), "the secret is not in it");
        for bad in ["", ".", "x.y", &format!("{now}.AAAA"), &token[1..]] {
            assert!(!secret.verify("gw-a", bad, now), "{bad:?}");
        }
    }

    #[test]
    fn a_secret_file_must_hold_enough_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peer.secret");
        std::fs::write(&path, "short\n").unwrap();
        let e = Secret::read(&path).unwrap_err().to_string();
        assert!(e.contains("has 5 bytes; it needs at least 16"), "{e}");
        std::fs::write(&path, "  a-long-enough-secret-here\n").unwrap();
        let s = Secret::read(&path).unwrap();
        assert!(s.verify(
            "g",
            &Secret::from_bytes(b"a-long-enough-secret-here").token("g", 5),
            5
        ));
        assert!(
            Secret::read(&dir.path().join("missing"))
                .unwrap_err()
                .to_string()
                .contains("cannot read the peer secret")
        );
    }

    #[test]
    fn entries_are_judged_once_and_gaps_are_counted() {
        let stats = Arc::new(Stats::default());
        let mut incoming = Incoming::new(9, Duration::from_secs(10), stats.clone());
        let entry = |stream, seq| entry(stream, seq, 0, Bytes::new());
        let taken: Vec<bool> = [
            (1, 1),
            (1, 2),
            (1, 2),
            (1, 1),
            (1, 5),
            (2, 1),
            (1, 6),
            (9, 1),
        ]
        .into_iter()
        .map(|(s, n)| incoming.accept(&entry(s, n)))
        .collect();
        assert_eq!(taken, [true, true, false, false, true, true, true, false]);
        assert_eq!(Stats::get(&stats.peer_entries_duplicate), 3);
        assert_eq!(Stats::get(&stats.peer_entries_gap), 2);
        assert_eq!(Stats::get(&stats.peer_entries_received), 5);
    }

    #[test]
    fn a_batch_goes_in_frames_under_the_limit_with_its_acks_on_the_last() {
        let mut backlog = Backlog::new(Arc::new(Stats::default()));
        backlog.stream = 1;
        let entries: Vec<Entry> = (1..=40)
            .map(|seq| entry(1, seq, seq, Bytes::from(vec![b'1'; 4000])))
            .collect();
        let (tx, _rx) = oneshot::channel();
        backlog.push(
            MirrorOut {
                entries,
                watermark: 40,
                digest: Default::default(),
                judged: vec![tx],
                committed: None,
            },
            true,
        );
        assert!(backlog.frames.len() >= 4);
        assert!(backlog.frames.iter().all(|p| p.bytes.len() <= FRAME_BYTES));
        let decoded: Vec<u64> = backlog
            .frames
            .iter()
            .flat_map(|p| frame::decode(p.bytes.clone()).unwrap().entries)
            .map(|e| e.seq)
            .collect();
        assert_eq!(decoded, (1..=40).collect::<Vec<_>>());
        let with_waiters: Vec<bool> = backlog.frames.iter().map(|p| p.waiters.is_some()).collect();
        assert_eq!(with_waiters.iter().filter(|w| **w).count(), 1);
        assert!(with_waiters[with_waiters.len() - 1]);
    }

    #[test]
    fn the_ring_keeps_its_own_copies_within_its_memory_budget() {
        let mut backlog = Backlog::new(Arc::new(Stats::default()));
        backlog.horizon = 3_600_000;
        // A frame as it arrived: the entries' payloads are slices of it.
        let arrived = Bytes::from(vec![b'7'; 64 * 1024]);
        let entries: Vec<Entry> = (0..1_000u64)
            .map(|i| {
                let at = (i as usize) * 8;
                entry(2, i, 1_000 + i, arrived.slice(at..at + 8))
            })
            .collect();
        backlog.remember(&entries);
        drop(entries);
        assert!(
            arrived.is_unique(),
            "the ring holds none of the buffer the entries came in"
        );
        assert_eq!(&backlog.ring[5].payload[..], b"77777777");
        assert_eq!(&backlog.ring[5].topic[..], b"sensors/a/t");
        let slot = std::mem::size_of::<Entry>();
        assert_eq!(backlog.ring_bytes, 1_000 * (slot + 11 + 8));
        // Many small readings: bounded by the memory they take, slots included.
        let many = (1_000..1_000_000u64).map(|i| entry(2, i, 1_000 + i, Bytes::from_static(b"1")));
        for chunk in many.collect::<Vec<_>>().chunks(10_000) {
            backlog.remember(chunk);
        }
        assert!(backlog.ring_bytes <= RING_BYTES);
        assert_eq!(backlog.ring.len(), RING_BYTES / (slot + 12));
        // Then quiet: heartbeats move the watermark past the horizon, and the burst goes.
        let newest = backlog.ring.back().unwrap().wall;
        backlog.push(
            MirrorOut {
                entries: Vec::new(),
                watermark: newest + backlog.horizon + 1,
                digest: Default::default(),
                judged: Vec::new(),
                committed: None,
            },
            true,
        );
        assert_eq!((backlog.ring.len(), backlog.ring_bytes), (0, 0));
        assert!(
            backlog.ring.capacity() < 1024 * 4,
            "{}",
            backlog.ring.capacity()
        );
    }

    #[test]
    fn a_new_connection_sends_the_catch_up_first_and_only_own_entries_live() {
        let mut backlog = Backlog::new(Arc::new(Stats::default()));
        backlog.stream = 1;
        backlog.horizon = 10_000;
        let entry = |stream, seq, wall| entry(stream, seq, wall, Bytes::from_static(b"1"));
        let out = |entries| MirrorOut {
            entries,
            watermark: 0,
            digest: Default::default(),
            judged: Vec::new(),
            committed: None,
        };
        // Own entries and the peer's, while the link is down.
        backlog.push(out(vec![entry(1, 1, 1_000), entry(2, 7, 1_500)]), false);
        backlog.push(out(vec![entry(1, 2, 20_000), entry(2, 8, 20_500)]), false);
        let live: Vec<(u64, u64)> = backlog
            .frames
            .iter()
            .flat_map(|p| frame::decode(p.bytes.clone()).unwrap().entries)
            .map(|e| (e.stream, e.seq))
            .collect();
        assert_eq!(live, [(1, 1), (1, 2)], "only this gateway's own go live");
        assert_eq!(backlog.ring.len(), 2, "the ring keeps 10 s: 20.0 and 20.5");
        assert_eq!(backlog.catch_up(), 2);
        let sent: Vec<(u64, u64)> = backlog
            .frames
            .iter()
            .flat_map(|p| frame::decode(p.bytes.clone()).unwrap().entries)
            .map(|e| (e.stream, e.seq))
            .collect();
        assert_eq!(
            sent,
            [(1, 1), (1, 2), (2, 8)],
            "the frame older than the ring, then the ring (which covers the other)"
        );
    }

    #[test]
    fn alert_states_that_differ_for_long_are_reported_and_agreement_clears_it() {
        let stats = Arc::new(Stats::default());
        let mut incoming = Incoming::new(1, Duration::from_secs(10), stats.clone());
        let mut ours = Raised::default();
        let doc = |id: &str, state| crate::alert::AlertDoc {
            id: id.into(),
            rule: "r".into(),
            device: "d".into(),
            metric: "m".into(),
            severity: crate::rules::Severity::Critical,
            state,
            value: crate::value::Value::Number(1.0),
            threshold: None,
            since: String::new(),
            at: String::new(),
            gateway: "site".into(),
            repeat: 0,
            labels: Default::default(),
        };
        use crate::rules::AlertState::{Cleared, Raised as Up};
        ours.track(&doc("site:d:r:1", Up));
        ours.track(&doc("site:d:r:1", Up));
        let mut theirs = Raised::default();
        theirs.track(&doc("site:d:r:1", Up));
        assert_eq!(ours.digest, theirs.digest, "a raise seen twice counts once");
        incoming.compare(Some(theirs.digest), ours.digest);
        assert_eq!(Stats::get(&stats.peer_differs_since_ms), 0);
        assert_eq!(Stats::get(&stats.peer_alerts_raised), 1);

        theirs.track(&doc("site:d:r:1", Cleared));
        theirs.track(&doc("site:d:r:2", Up));
        incoming.compare(Some(theirs.digest), ours.digest);
        assert_ne!(Stats::get(&stats.peer_differs_since_ms), 0, "they differ");
        incoming.compare(None, frame::Digest::default());
        assert_ne!(
            Stats::get(&stats.peer_differs_since_ms),
            0,
            "a catch-up frame says nothing"
        );
        incoming.differs_since = Some(Instant::now() - DIVERGENCE_AFTER);
        incoming.compare(Some(theirs.digest), ours.digest);
        ours.track(&doc("site:d:r:1", Cleared));
        ours.track(&doc("site:d:r:2", Up));
        incoming.compare(Some(theirs.digest), ours.digest);
        assert_eq!(
            Stats::get(&stats.peer_differs_since_ms),
            0,
            "they agree again"
        );
    }

    #[test]
    fn a_full_backlog_drops_the_oldest_frames_not_in_flight_and_counts_only_those() {
        let stats = Arc::new(Stats::default());
        let mut backlog = Backlog::new(stats.clone());
        backlog.stream = 1;
        let big = |seq| MirrorOut {
            entries: vec![entry(
                1,
                seq,
                seq,
                Bytes::from(vec![b'1'; FRAME_BYTES - 100]),
            )],
            watermark: seq,
            digest: Default::default(),
            judged: Vec::new(),
            committed: None,
        };
        let fill = BACKLOG_BYTES / FRAME_BYTES;
        for seq in 1..=fill as u64 {
            backlog.push(big(seq), true);
        }
        // The first two are on their way (one with its packet id, one still without).
        backlog.frames[0].sent = Some(7);
        backlog.frames[1].sent = Some(0);
        for seq in fill as u64 + 1..=fill as u64 + 3 {
            backlog.push(big(seq), true);
        }
        let first: Vec<u64> = backlog
            .frames
            .iter()
            .take(3)
            .map(|p| frame::decode(p.bytes.clone()).unwrap().entries[0].seq)
            .collect();
        assert_eq!(first[..2], [1, 2], "frames in flight stay");
        assert!(first[2] > 3, "the oldest unsent went: {first:?}");
        assert!(backlog.bytes <= BACKLOG_BYTES);
        assert_eq!(
            Stats::get(&stats.peer_mirror_dropped),
            first[2] - 3,
            "counted: the unsent frames dropped, one entry each"
        );
        backlog.sent(9);
        assert_eq!(
            backlog.frames[1].sent,
            Some(9),
            "packet ids still match in order"
        );
    }
}

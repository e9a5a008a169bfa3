//! A small MQTT 3.1.1 client session over any byte stream: CONNECT with a last will, QoS 1
//! PUBLISH with one message in flight, PINGREQ, and the packets a broker sends back.
//!
//! The [`Session`] is a state machine driven by [`Session::poll`] with the time passed in: it
//! reads what the link has ready, never blocks waiting for input, and decides from timers alone
//! whether the link is dead. That is the only way to know on a UART, which has no link state:
//! a CONNACK, PUBACK or PINGRESP that does not come within `ack_timeout_ms` means the link is
//! gone, and the session reconnects with exponential backoff and jitter. Messages come from an
//! [`Outbox`] and leave it only when the broker acknowledged them, so whatever was queued while
//! the link was down, or was in flight when it died, is sent after the reconnect.
//!
//! Not here: subscriptions (sensors only publish), QoS 2, persistent sessions, TLS.

use embedded_io::{Read, ReadReady, Write};

use crate::payload::{self, Writer};

/// Largest topic the session sends.
pub const TOPIC_MAX: usize = 80;
/// Largest payload the session sends.
pub const PAYLOAD_MAX: usize = 192;
/// Largest packet the session writes: fixed header, topic, packet id, payload.
pub const PACKET_MAX: usize = 5 + 2 + TOPIC_MAX + 2 + PAYLOAD_MAX;
/// Bytes kept of incoming packets; the broker's packets to a publisher are all far smaller.
/// Larger packets are skipped, not fatal.
pub const RX_MAX: usize = 32;

/// What went wrong on the session's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error<E> {
    /// The transport failed to read or write.
    Transport(E),
    /// The stream ended (a TCP peer closed).
    Closed,
    /// The broker sent bytes that are not MQTT.
    Protocol,
    /// No CONNACK, PUBACK or PINGRESP within the acknowledgement timeout.
    Timeout,
}

/// A link the session can talk over: a readable, writable byte stream that can say whether a
/// read would block.
pub trait Link: Read + Write + ReadReady {
    /// Called before every CONNECT. A TCP link opens a new socket here; a UART has nothing to
    /// do (the default).
    fn reopen(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Where the session takes the messages it publishes.
pub trait Outbox {
    /// Writes the oldest waiting message's topic and payload; `Ok(false)` when none waits.
    fn peek(
        &self,
        topic: &mut Writer<'_>,
        payload: &mut Writer<'_>,
    ) -> Result<bool, payload::Error>;
    /// The broker acknowledged the oldest message, or it cannot be encoded at all: remove it.
    fn pop(&mut self);
}

/// Session settings.
#[derive(Debug, Clone, Copy)]
pub struct Config<'a> {
    /// MQTT client id; the device id.
    pub client_id: &'a str,
    /// Optional user name and password for the broker.
    pub credentials: Option<(&'a str, &'a str)>,
    /// Keep-alive announced in CONNECT; a PINGREQ goes out after this long without sending.
    pub keep_alive_ms: u32,
    /// How long to wait for a CONNACK, PUBACK or PINGRESP before the link counts as dead.
    pub ack_timeout_ms: u32,
    /// First reconnect delay; it doubles per failed attempt.
    pub backoff_min_ms: u32,
    /// Longest reconnect delay.
    pub backoff_max_ms: u32,
}

/// Something that happened in one [`Session::poll`], for logs and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<E> {
    /// A CONNECT went out.
    Connecting,
    /// The broker accepted the connection.
    Connected,
    /// The broker refused the connection with this CONNACK return code.
    Refused(u8),
    /// The link is considered dead; the next attempt is in `retry_in_ms`.
    LinkLost {
        /// Why.
        cause: Error<E>,
        /// Delay before the next CONNECT.
        retry_in_ms: u32,
    },
    /// The broker acknowledged a message.
    Acked,
}

/// Counters since the session was made (saturating).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// CONNECTs sent.
    pub connects: u32,
    /// Connections the broker accepted.
    pub connected: u32,
    /// Links declared dead.
    pub lost: u32,
    /// PUBLISH packets written, resends included.
    pub published: u32,
    /// PUBLISHes acknowledged.
    pub acked: u32,
    /// Messages dropped because they could not be encoded into the buffers.
    pub unencodable: u32,
    /// Bytes written to the link.
    pub bytes_out: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Down {
        retry_at: u64,
    },
    Connecting {
        since: u64,
    },
    Up {
        last_tx: u64,
        ping_since: Option<u64>,
        in_flight: Option<(u16, u64)>,
    },
}

/// An MQTT session with one broker. See the module documentation.
pub struct Session<'a> {
    config: Config<'a>,
    status_topic: heapless::String<TOPIC_MAX>,
    state: State,
    rx: heapless::Vec<u8, RX_MAX>,
    skip: usize,
    next_id: u16,
    backoff: Backoff,
    counters: Counters,
}

impl<'a> Session<'a> {
    /// A session that connects on its first poll. `config.client_id` must pass
    /// [`payload::name_ok`]; the last will `offline` is announced on `sensors/{id}/status`.
    pub fn new(config: Config<'a>) -> Result<Self, payload::Error> {
        let mut topic = [0u8; TOPIC_MAX];
        let mut w = Writer::new(&mut topic);
        payload::status_topic(&mut w, config.client_id)?;
        let n = w.len();
        let mut status_topic = heapless::String::new();
        for &c in &topic[..n] {
            status_topic
                .push(char::from(c))
                .map_err(|_| payload::Error::Overflow)?;
        }
        Ok(Self {
            backoff: Backoff::new(&config),
            config,
            status_topic,
            state: State::Down { retry_at: 0 },
            rx: heapless::Vec::new(),
            skip: 0,
            next_id: 1,
            counters: Counters::default(),
        })
    }

    /// True while the broker has accepted this connection and it has not been found dead.
    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up { .. })
    }

    /// Counters since the session was made.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Does whatever is due at `now_ms`: reads what the link has ready, handles the broker's
    /// packets, checks the timers, (re)connects and publishes the oldest waiting message. Never
    /// blocks on input; call it often (every few ms) and whenever something was queued.
    pub fn poll<L: Link>(
        &mut self,
        now_ms: u64,
        link: &mut L,
        outbox: &mut impl Outbox,
    ) -> Option<Event<L::Error>> {
        match self.step(now_ms, link, outbox) {
            Ok(event) => event,
            Err(cause) => Some(self.lost(now_ms, cause)),
        }
    }

    fn step<L: Link>(
        &mut self,
        now: u64,
        link: &mut L,
        outbox: &mut impl Outbox,
    ) -> Result<Option<Event<L::Error>>, Error<L::Error>> {
        if let State::Down { retry_at } = self.state {
            if now < retry_at {
                return Ok(None);
            }
            link.reopen().map_err(Error::Transport)?;
            self.rx.clear();
            self.skip = 0;
            let mut buf = [0u8; PACKET_MAX];
            let n = encode_connect(&mut buf, &self.config, &self.status_topic)
                .map_err(|_| Error::Protocol)?;
            self.counters.connects = self.counters.connects.saturating_add(1);
            self.state = State::Connecting { since: now };
            self.send(link, &buf[..n])?;
            return Ok(Some(Event::Connecting));
        }

        if let Some(event) = self.read_input(now, link, outbox)? {
            return Ok(Some(event));
        }

        let timeout = u64::from(self.config.ack_timeout_ms);
        match self.state {
            State::Down { .. } => {}
            State::Connecting { since } => {
                if now.saturating_sub(since) >= timeout {
                    return Err(Error::Timeout);
                }
            }
            State::Up {
                ping_since,
                in_flight,
                ..
            } => {
                let waited = |since: u64| now.saturating_sub(since) >= timeout;
                if ping_since.is_some_and(waited) || in_flight.is_some_and(|(_, at)| waited(at)) {
                    return Err(Error::Timeout);
                }
                if in_flight.is_none() {
                    self.publish_next(now, link, outbox)?;
                }
                let keep_alive = u64::from(self.config.keep_alive_ms);
                let mut ping_due = false;
                if let State::Up {
                    last_tx,
                    ping_since: ping @ None,
                    ..
                } = &mut self.state
                {
                    if now.saturating_sub(*last_tx) >= keep_alive {
                        *ping = Some(now);
                        *last_tx = now;
                        ping_due = true;
                    }
                }
                if ping_due {
                    self.send(link, &[0xC0, 0x00])?;
                }
            }
        }
        Ok(None)
    }

    /// Reads and handles every complete packet the link has ready.
    fn read_input<L: Link>(
        &mut self,
        now: u64,
        link: &mut L,
        outbox: &mut impl Outbox,
    ) -> Result<Option<Event<L::Error>>, Error<L::Error>> {
        let mut event = None;
        while link.read_ready().map_err(Error::Transport)? {
            let mut chunk = [0u8; RX_MAX];
            let room = RX_MAX - self.rx.len();
            let n = link.read(&mut chunk[..room]).map_err(Error::Transport)?;
            if n == 0 {
                return Err(Error::Closed);
            }
            let mut fresh = &chunk[..n];
            if self.skip > 0 {
                let k = self.skip.min(fresh.len());
                self.skip -= k;
                fresh = &fresh[k..];
            }
            // Cannot overflow: at most `room` bytes were read.
            let _ = self.rx.extend_from_slice(fresh);
            while let Some((packet, len)) = parse(&self.rx).map_err(|()| Error::Protocol)? {
                if len > self.rx.len() {
                    // Too big to keep (a PUBLISH we never asked for): drop it as it streams by.
                    self.skip = len - self.rx.len();
                    self.rx.clear();
                } else {
                    self.rx.rotate_left(len);
                    self.rx.truncate(self.rx.len() - len);
                }
                if let Some(e) = self.handle(now, packet, outbox) {
                    event = Some(e);
                }
            }
            if self.rx.is_full() {
                return Err(Error::Protocol);
            }
            if matches!(event, Some(Event::Refused(_))) {
                return Ok(event);
            }
        }
        Ok(event)
    }

    fn handle<E>(
        &mut self,
        now: u64,
        packet: Packet,
        outbox: &mut impl Outbox,
    ) -> Option<Event<E>> {
        match (packet, &mut self.state) {
            (Packet::ConnAck { code: 0 }, State::Connecting { .. }) => {
                self.state = State::Up {
                    last_tx: now,
                    ping_since: None,
                    in_flight: None,
                };
                self.backoff.reset();
                self.counters.connected = self.counters.connected.saturating_add(1);
                Some(Event::Connected)
            }
            (Packet::ConnAck { code }, State::Connecting { .. }) => {
                let retry_in = self.backoff.next();
                self.state = State::Down {
                    retry_at: now + u64::from(retry_in),
                };
                Some(Event::Refused(code))
            }
            (Packet::PubAck { id }, State::Up { in_flight, .. }) => {
                if in_flight.is_some_and(|(sent, _)| sent == id) {
                    *in_flight = None;
                    outbox.pop();
                    self.counters.acked = self.counters.acked.saturating_add(1);
                    Some(Event::Acked)
                } else {
                    None
                }
            }
            (Packet::PingResp, State::Up { ping_since, .. }) => {
                *ping_since = None;
                None
            }
            // Late answers to a dead connection, and packets a publisher does not need.
            _ => None,
        }
    }

    /// Publishes the oldest waiting message, if any, as the one in flight.
    fn publish_next<L: Link>(
        &mut self,
        now: u64,
        link: &mut L,
        outbox: &mut impl Outbox,
    ) -> Result<(), Error<L::Error>> {
        let mut topic = [0u8; TOPIC_MAX];
        let mut body = [0u8; PAYLOAD_MAX];
        let (t, p) = {
            let mut tw = Writer::new(&mut topic);
            let mut pw = Writer::new(&mut body);
            match outbox.peek(&mut tw, &mut pw) {
                Ok(true) => (tw.len(), pw.len()),
                Ok(false) => return Ok(()),
                Err(_) => {
                    outbox.pop();
                    self.counters.unencodable = self.counters.unencodable.saturating_add(1);
                    return Ok(());
                }
            }
        };
        let id = self.next_id;
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        let mut packet = [0u8; PACKET_MAX];
        let topic = core::str::from_utf8(&topic[..t]).map_err(|_| Error::Protocol)?;
        let n = encode_publish(&mut packet, topic, &body[..p], Some(id), false)
            .map_err(|_| Error::Protocol)?;
        if let State::Up {
            last_tx, in_flight, ..
        } = &mut self.state
        {
            *in_flight = Some((id, now));
            *last_tx = now;
        }
        self.counters.published = self.counters.published.saturating_add(1);
        self.send(link, &packet[..n])
    }

    /// Publishes `online` on the status topic (QoS 0, retained), e.g. right after
    /// [`Event::Connected`]. Does nothing unless the session is up.
    pub fn announce_online<L: Link>(
        &mut self,
        now_ms: u64,
        link: &mut L,
    ) -> Option<Event<L::Error>> {
        let State::Up { last_tx, .. } = &mut self.state else {
            return None;
        };
        *last_tx = now_ms;
        let mut packet = [0u8; PACKET_MAX];
        let n = match encode_publish(&mut packet, &self.status_topic, payload::ONLINE, None, true) {
            Ok(n) => n,
            Err(_) => return None,
        };
        match self.send(link, &packet[..n]) {
            Ok(()) => None,
            Err(cause) => Some(self.lost(now_ms, cause)),
        }
    }

    fn send<L: Link>(&mut self, link: &mut L, bytes: &[u8]) -> Result<(), Error<L::Error>> {
        link.write_all(bytes).map_err(Error::Transport)?;
        link.flush().map_err(Error::Transport)?;
        self.counters.bytes_out = self.counters.bytes_out.saturating_add(bytes.len() as u64);
        Ok(())
    }

    fn lost<E>(&mut self, now: u64, cause: Error<E>) -> Event<E> {
        let retry_in_ms = self.backoff.next();
        self.state = State::Down {
            retry_at: now + u64::from(retry_in_ms),
        };
        self.counters.lost = self.counters.lost.saturating_add(1);
        Event::LinkLost { cause, retry_in_ms }
    }
}

/// Reconnect delays: doubling from `min` to `max`, each drawn from `[d/2, d]` so that a fleet
/// that lost its gateway at once does not come back at once.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    min: u32,
    max: u32,
    attempt: u32,
    rng: u32,
}

impl Backoff {
    fn new(config: &Config<'_>) -> Self {
        // FNV-1a of the client id seeds the jitter: distinct per device, same on every boot.
        let mut seed: u32 = 0x811c_9dc5;
        for b in config.client_id.bytes() {
            seed = (seed ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        Self {
            min: config.backoff_min_ms.max(1),
            max: config.backoff_max_ms.max(config.backoff_min_ms.max(1)),
            attempt: 0,
            rng: seed | 1,
        }
    }

    fn next(&mut self) -> u32 {
        let full = self
            .min
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift32
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 17;
        self.rng ^= self.rng << 5;
        let half = full / 2;
        full - half + self.rng % (half + 1)
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A packet from the broker, as far as a publisher cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Packet {
    ConnAck { code: u8 },
    PubAck { id: u16 },
    PingResp,
    Other,
}

/// Parses the packet at the start of `buf`: `Ok(None)` if it is incomplete; otherwise the
/// packet and its total length, which may exceed `buf` for a packet too large to keep (its
/// header alone is then enough to know its kind).
fn parse(buf: &[u8]) -> Result<Option<(Packet, usize)>, ()> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut remaining: usize = 0;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return Err(());
        }
    }
    let total = i + remaining;
    let kind = first >> 4;
    let body = buf.get(i..total);
    let packet = match (kind, body) {
        (2, Some(b)) if b.len() == 2 => Packet::ConnAck { code: b[1] },
        (4, Some(b)) if b.len() >= 2 => Packet::PubAck {
            id: u16::from_be_bytes([b[0], b[1]]),
        },
        (13, Some(_)) => Packet::PingResp,
        (2 | 4, Some(_)) | (0 | 1 | 8 | 10 | 12 | 14 | 15, _) => return Err(()),
        // Acks are tiny, so a truncated one is simply incomplete.
        (2 | 4 | 13, None) => return Ok(None),
        // Anything else (PUBLISH, SUBACK, ...) is skipped whole, however large.
        (_, _) => Packet::Other,
    };
    Ok(Some((packet, total)))
}

fn encode_connect(
    out: &mut [u8],
    config: &Config<'_>,
    will_topic: &str,
) -> Result<usize, payload::Error> {
    let mut body = [0u8; PACKET_MAX];
    let mut w = Writer::new(&mut body);
    // Protocol name and level 4 (3.1.1); flags: clean session, will QoS 1, will retain.
    let mut flags = 0b0011_0110u8;
    if config.credentials.is_some() {
        flags |= 0b1100_0000;
    }
    w.bytes(&[0, 4, b'M', b'Q', b'T', b'T', 4, flags])?;
    let keep_alive_s = config.keep_alive_ms.div_ceil(1000).min(u32::from(u16::MAX)) as u16;
    w.bytes(&keep_alive_s.to_be_bytes())?;
    string(&mut w, config.client_id.as_bytes())?;
    string(&mut w, will_topic.as_bytes())?;
    string(&mut w, payload::OFFLINE)?;
    if let Some((user, password)) = config.credentials {
        string(&mut w, user.as_bytes())?;
        string(&mut w, password.as_bytes())?;
    }
    let len = w.len();
    frame(out, 0x10, &body[..len])
}

/// A PUBLISH: QoS 1 with `id`, or QoS 0 without.
fn encode_publish(
    out: &mut [u8],
    topic: &str,
    body: &[u8],
    id: Option<u16>,
    retain: bool,
) -> Result<usize, payload::Error> {
    let mut buf = [0u8; PACKET_MAX];
    let mut w = Writer::new(&mut buf);
    string(&mut w, topic.as_bytes())?;
    if let Some(id) = id {
        w.bytes(&id.to_be_bytes())?;
    }
    w.bytes(body)?;
    let len = w.len();
    let header = 0x30 | if id.is_some() { 0x02 } else { 0 } | u8::from(retain);
    frame(out, header, &buf[..len])
}

fn string(w: &mut Writer<'_>, s: &[u8]) -> Result<(), payload::Error> {
    let len = u16::try_from(s.len()).map_err(|_| payload::Error::Overflow)?;
    w.bytes(&len.to_be_bytes())?;
    w.bytes(s)
}

/// Fixed header (type and flags, remaining length) followed by `body`.
fn frame(out: &mut [u8], header: u8, body: &[u8]) -> Result<usize, payload::Error> {
    let mut w = Writer::new(out);
    w.bytes(&[header])?;
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        w.bytes(&[b])?;
        if len == 0 {
            break;
        }
    }
    w.bytes(body)?;
    Ok(w.len())
}

#[cfg(test)]
mod tests;

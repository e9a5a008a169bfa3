//! Just enough MQTT 3.1.1 over blocking sockets for load and measurement clients: CONNECT
//! (with a clean or a kept session), SUBSCRIBE, PUBLISH (QoS 0 and 1, retained or not), PUBACK,
//! DISCONNECT and reading packets back. A client library would add
//! queues and tasks between the socket and the clock; these write and read the socket
//! directly, so that a timestamp is taken next to the bytes it describes.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use watchpost_e2e::clients::{put_remaining_length, with_header};

/// Keep-alive announced by every client here; [`Conn::ping_if_due`] keeps it alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Appends an MQTT string (length-prefixed bytes).
fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// An anonymous MQTT 3.1.1 CONNECT of `client_id` announcing [`KEEP_ALIVE`]: with a clean
/// session, or asking the broker to keep the session (and what is queued for it) while the
/// client is away. `watchpost_e2e::clients::connect_packet` is the clean one, for tests.
pub fn connect_packet(client_id: &str, clean_session: bool) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.push(4);
    body.push(if clean_session { 0b10 } else { 0 });
    body.extend_from_slice(&(KEEP_ALIVE.as_secs() as u16).to_be_bytes());
    string(&mut body, client_id.as_bytes());
    with_header(0x10, &body)
}

/// A PUBACK of packet id `pkid`.
pub fn puback_packet(pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [0x40, 2, hi, lo]
}

/// A DISCONNECT: the client leaves on purpose (no will).
pub const DISCONNECT: [u8; 2] = [0xe0, 0];

/// A SUBSCRIBE of `filters` at `qos`, packet id 1.
pub fn subscribe_packet(filters: &[&str], qos: u8) -> Vec<u8> {
    let mut body = vec![0, 1];
    for filter in filters {
        string(&mut body, filter.as_bytes());
        body.push(qos);
    }
    with_header(0x82, &body)
}

/// Appends a PUBLISH of `payload` on `topic`: QoS 0 if `pkid` is `None`, else QoS 1; with the
/// retain flag if `retain`. Unlike [`clients::publish_packet`] it writes into a buffer that
/// load generators reuse.
pub fn put_publish(
    out: &mut Vec<u8>,
    topic: &[u8],
    payload: &[u8],
    pkid: Option<u16>,
    retain: bool,
) {
    let len = 2 + topic.len() + pkid.map_or(0, |_| 2) + payload.len();
    let qos = if pkid.is_some() { 0x02 } else { 0 };
    out.push(0x30 | qos | u8::from(retain));
    put_remaining_length(out, len);
    string(out, topic);
    if let Some(id) = pkid {
        out.extend_from_slice(&id.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Bytes on the wire of a QoS 1 PUBLISH of `payload` on `topic` and its PUBACK.
pub fn qos1_exchange_bytes(topic_len: usize, payload_len: usize) -> u64 {
    let body = 2 + topic_len + 2 + payload_len;
    let mut header = Vec::new();
    put_remaining_length(&mut header, body);
    (1 + header.len() + body + 4) as u64
}

/// One packet read from a connection.
#[derive(Debug)]
pub enum Incoming<'a> {
    /// A PUBLISH.
    Publish {
        /// Topic.
        topic: &'a [u8],
        /// Payload.
        payload: &'a [u8],
        /// Its packet id, if it is QoS 1 or 2 (and wants an acknowledgement).
        pkid: Option<u16>,
        /// Its retain flag: set when a broker sends a retained message to a new subscription.
        retain: bool,
    },
    /// A PUBACK.
    PubAck,
    /// Anything else (CONNACK, SUBACK, PINGRESP).
    Other,
}

/// A blocking client connection with its read buffer.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    last_ping: Instant,
}

impl Conn {
    /// Connects to `addr` as `client_id` with a clean session and waits (5 s at most) for a
    /// CONNACK that accepts.
    pub fn connect(addr: SocketAddr, client_id: &str) -> Result<Conn> {
        Ok(Conn::open(addr, client_id, true)?.0)
    }

    /// Connects to `addr` as `client_id`, with a clean session or asking to keep it, and waits
    /// (5 s at most) for a CONNACK that accepts; returns the connection and the CONNACK's
    /// session present flag.
    pub fn open(addr: SocketAddr, client_id: &str, clean_session: bool) -> Result<(Conn, bool)> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let mut conn = Conn {
            stream,
            buf: vec![0; 256 * 1024],
            start: 0,
            end: 0,
            last_ping: Instant::now(),
        };
        conn.write(&connect_packet(client_id, clean_session))?;
        conn.stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let present = match conn.next_packet()? {
            Some((0x20, body)) if body.len() == 2 && body[1] == 0 => body[0] & 1 == 1,
            Some((kind, body)) => bail!(
                "{addr} refused {client_id}: packet {kind:#x} {:?}",
                body.to_vec()
            ),
            None => bail!("{addr} closed the connection of {client_id}"),
        };
        conn.stream.set_read_timeout(None)?;
        Ok((conn, present))
    }

    /// Connects and subscribes to `filters` at `qos`, waiting for the SUBACK.
    pub fn subscriber(
        addr: SocketAddr,
        client_id: &str,
        filters: &[&str],
        qos: u8,
    ) -> Result<Conn> {
        let mut conn = Conn::connect(addr, client_id)?;
        conn.subscribe(filters, qos)?;
        Ok(conn)
    }

    /// Subscribes to `filters` at `qos` and waits (5 s at most) for a SUBACK that grants
    /// every one; whatever comes before it is skipped.
    pub fn subscribe(&mut self, filters: &[&str], qos: u8) -> Result<()> {
        let peer = self.stream.peer_addr()?;
        self.write(&subscribe_packet(filters, qos))?;
        self.stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        loop {
            match self.next_packet()? {
                Some((0x90, body)) => {
                    if body.iter().skip(2).any(|code| *code >= 0x80) {
                        bail!("{peer} refused a subscription to {filters:?}");
                    }
                    break;
                }
                Some(_) => continue,
                None => bail!("{peer} closed the connection before SUBACK"),
            }
        }
        self.stream.set_read_timeout(None)?;
        Ok(())
    }

    /// Sends DISCONNECT and waits (`timeout` at most) for the broker to close the connection,
    /// so that the session is offline on the broker's side when this returns. Whatever the
    /// broker still sends is read and dropped.
    pub fn disconnect(mut self, timeout: Duration) -> Result<()> {
        let peer = self.stream.peer_addr()?;
        self.write(&DISCONNECT)?;
        self.stream.set_read_timeout(Some(timeout))?;
        while self
            .next_packet()
            .with_context(|| format!("{peer} did not close the connection after DISCONNECT"))?
            .is_some()
        {}
        Ok(())
    }

    /// The socket, e.g. to clone a writer off it or set timeouts.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Writes all of `bytes`.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Sends a PINGREQ if the last one was a while ago (half the keep-alive).
    pub fn ping_if_due(&mut self) -> io::Result<()> {
        if self.last_ping.elapsed() >= KEEP_ALIVE / 2 {
            self.last_ping = Instant::now();
            self.write(&[0xc0, 0])?;
        }
        Ok(())
    }

    /// The next whole packet as (first byte, body); `None` at end of stream. Reads as needed;
    /// a read timeout on the socket comes back as an error of kind `WouldBlock`/`TimedOut`.
    pub fn next_packet(&mut self) -> io::Result<Option<(u8, &[u8])>> {
        loop {
            if let Some((first, start, len)) = self.parse_header() {
                self.start = start + len;
                return Ok(Some((first, &self.buf[start..start + len])));
            }
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            if self.end == self.buf.len() {
                let bigger = self.buf.len() * 2;
                self.buf.resize(bigger, 0);
            }
            let n = self.stream.read(&mut self.buf[self.end..])?;
            if n == 0 {
                return Ok(None);
            }
            self.end += n;
        }
    }

    /// The next packet, decoded far enough for a measurement client.
    pub fn next(&mut self) -> io::Result<Option<Incoming<'_>>> {
        let Some((first, body)) = self.next_packet()? else {
            return Ok(None);
        };
        Ok(Some(match first >> 4 {
            3 => {
                let qos = (first >> 1) & 3;
                let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                let topic = &body[2..2 + topic_len];
                let at = 2 + topic_len;
                let (pkid, skip) = if qos > 0 {
                    (Some(u16::from_be_bytes([body[at], body[at + 1]])), 2)
                } else {
                    (None, 0)
                };
                Incoming::Publish {
                    topic,
                    payload: &body[at + skip..],
                    pkid,
                    retain: first & 1 == 1,
                }
            }
            4 => Incoming::PubAck,
            _ => Incoming::Other,
        }))
    }

    /// (first byte, body start, body length) of a complete packet at the buffer's start.
    fn parse_header(&self) -> Option<(u8, usize, usize)> {
        let data = &self.buf[self.start..self.end];
        let first = *data.first()?;
        let mut len = 0usize;
        let mut shift = 0;
        for (i, byte) in data.iter().enumerate().skip(1).take(4) {
            len |= usize::from(byte & 0x7f) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                let start = i + 1;
                return (data.len() >= start + len).then_some((first, self.start + start, len));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use watchpost_e2e::clients;

    #[test]
    fn publish_sizes_match_the_encoder() {
        for (topic, payload) in [(10, 20), (100, 30), (30, 200)] {
            let mut out = Vec::new();
            put_publish(
                &mut out,
                &vec![b'a'; topic],
                &vec![b'1'; payload],
                Some(7),
                false,
            );
            assert_eq!(qos1_exchange_bytes(topic, payload), out.len() as u64 + 4);
        }
    }

    #[test]
    fn publishes_carry_their_qos_and_retain_flag() {
        let mut out = Vec::new();
        put_publish(&mut out, b"a/b", b"x", None, false);
        assert_eq!(out[0], 0x30);
        out.clear();
        put_publish(&mut out, b"a/b", b"x", None, true);
        assert_eq!(out[0], 0x31);
        out.clear();
        put_publish(&mut out, b"a/b", b"x", Some(1), true);
        assert_eq!(out[0], 0x33);
        out.clear();
        put_publish(&mut out, b"a/b", b"x", None, false);
        assert_eq!(out, clients::publish_packet(b"a/b", b"x"));
    }

    #[test]
    fn connect_asks_for_a_clean_or_a_kept_session() {
        assert_eq!(
            connect_packet("s0001", true),
            clients::connect_packet("s0001", None)
        );
        let kept = connect_packet("s0001", false);
        // Fixed header (2), protocol name (6), level (1): then the connect flags.
        assert_eq!(kept[9], 0);
        assert_eq!(kept.len(), connect_packet("s0001", true).len());
    }
}

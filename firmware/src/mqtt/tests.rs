//! The session driven byte by byte: a queue of bytes stands in for the broker.

use std::collections::VecDeque;

use embedded_io::{ErrorKind, ErrorType};

use super::*;

#[derive(Default)]
struct Wire {
    from_broker: VecDeque<u8>,
    to_broker: Vec<u8>,
    reopened: u32,
}

impl ErrorType for Wire {
    type Error = ErrorKind;
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ErrorKind> {
        let n = buf.len().min(self.from_broker.len());
        for b in &mut buf[..n] {
            *b = self.from_broker.pop_front().unwrap();
        }
        Ok(n)
    }
}

impl ReadReady for Wire {
    fn read_ready(&mut self) -> Result<bool, ErrorKind> {
        Ok(!self.from_broker.is_empty())
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> Result<usize, ErrorKind> {
        self.to_broker.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), ErrorKind> {
        Ok(())
    }
}

impl Link for Wire {
    fn reopen(&mut self) -> Result<(), ErrorKind> {
        self.reopened += 1;
        Ok(())
    }
}

impl Wire {
    fn broker_sends(&mut self, bytes: &[u8]) {
        self.from_broker.extend(bytes);
    }
    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.to_broker)
    }
}

#[derive(Default)]
struct Messages(VecDeque<(&'static str, &'static [u8])>);

impl Outbox for Messages {
    fn peek(
        &self,
        topic: &mut Writer<'_>,
        payload: &mut Writer<'_>,
    ) -> Result<bool, payload::Error> {
        match self.0.front() {
            Some((t, p)) => {
                topic.str(t)?;
                payload.bytes(p)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }
    fn pop(&mut self) {
        self.0.pop_front();
    }
}

const CONFIG: Config<'static> = Config {
    client_id: "d1",
    credentials: None,
    keep_alive_ms: 10_000,
    ack_timeout_ms: 2_000,
    backoff_min_ms: 1_000,
    backoff_max_ms: 8_000,
};

const CONNACK: [u8; 4] = [0x20, 2, 0, 0];

fn connect_bytes(credentials: Option<(&str, &str)>) -> Vec<u8> {
    let will_topic = b"sensors/d1/status";
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4];
    body.push(if credentials.is_some() { 0xf6 } else { 0x36 });
    body.extend([0, 10]); // keep-alive 10 s
    for field in [&b"d1"[..], will_topic, b"offline"] {
        body.extend((field.len() as u16).to_be_bytes());
        body.extend(field);
    }
    if let Some((u, p)) = credentials {
        for field in [u.as_bytes(), p.as_bytes()] {
            body.extend((field.len() as u16).to_be_bytes());
            body.extend(field);
        }
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

fn publish_bytes(topic: &str, id: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend(topic.as_bytes());
    body.extend(id.to_be_bytes());
    body.extend(payload);
    let mut packet = vec![0x32, body.len() as u8];
    packet.extend(body);
    packet
}

/// A session that is connected at t=0, with its CONNECT and `online` already taken off the wire.
fn connected(outbox: &mut Messages) -> (Session<'static>, Wire) {
    let mut s = Session::new(CONFIG).unwrap();
    let mut wire = Wire::default();
    assert_eq!(s.poll(0, &mut wire, outbox), Some(Event::Connecting));
    assert_eq!(wire.take(), connect_bytes(None));
    wire.broker_sends(&CONNACK);
    assert_eq!(s.poll(1, &mut wire, outbox), Some(Event::Connected));
    assert!(s.is_up());
    (s, wire)
}

#[test]
fn connect_announces_client_id_keep_alive_will_and_credentials() {
    let mut wire = Wire::default();
    let mut s = Session::new(Config {
        credentials: Some(("user", "secret")),
        ..CONFIG
    })
    .unwrap();
    s.poll(0, &mut wire, &mut Messages::default());
    assert_eq!(wire.take(), connect_bytes(Some(("user", "secret"))));
    assert_eq!(wire.reopened, 1);
}

#[test]
fn a_message_leaves_the_outbox_only_when_acknowledged() {
    let mut outbox = Messages::default();
    outbox.0.push_back(("sensors/d1/t", b"21.5"));
    outbox.0.push_back(("sensors/d1/t", b"22"));
    let (mut s, mut wire) = connected(&mut outbox);
    assert_eq!(s.poll(2, &mut wire, &mut outbox), None);
    assert_eq!(wire.take(), publish_bytes("sensors/d1/t", 1, b"21.5"));
    // One in flight at a time.
    assert_eq!(s.poll(3, &mut wire, &mut outbox), None);
    assert!(wire.take().is_empty());
    // A PUBACK for another id changes nothing.
    wire.broker_sends(&[0x40, 2, 0, 9]);
    assert_eq!(s.poll(4, &mut wire, &mut outbox), None);
    assert_eq!(outbox.0.len(), 2);
    wire.broker_sends(&[0x40, 2, 0, 1]);
    assert_eq!(s.poll(5, &mut wire, &mut outbox), Some(Event::Acked));
    assert_eq!(outbox.0.len(), 1);
    s.poll(6, &mut wire, &mut outbox);
    assert_eq!(wire.take(), publish_bytes("sensors/d1/t", 2, b"22"));
    let c = s.counters();
    assert_eq!(
        (c.connects, c.connected, c.published, c.acked),
        (1, 1, 2, 1)
    );
}

#[test]
fn an_unacknowledged_message_is_sent_again_after_reconnecting() {
    let mut outbox = Messages::default();
    outbox.0.push_back(("sensors/d1/t", b"1"));
    let (mut s, mut wire) = connected(&mut outbox);
    s.poll(10, &mut wire, &mut outbox);
    assert_eq!(wire.take(), publish_bytes("sensors/d1/t", 1, b"1"));
    assert_eq!(
        s.poll(2_009, &mut wire, &mut outbox),
        None,
        "not yet timed out"
    );
    let Some(Event::LinkLost {
        cause: Error::Timeout,
        retry_in_ms,
    }) = s.poll(2_010, &mut wire, &mut outbox)
    else {
        panic!("expected the link to be declared dead");
    };
    assert!((500..=1_000).contains(&retry_in_ms), "{retry_in_ms}");
    assert!(!s.is_up());
    assert_eq!(outbox.0.len(), 1, "still queued");
    // Nothing happens before the backoff has passed; then CONNECT on a reopened link.
    assert_eq!(
        s.poll(2_010 + u64::from(retry_in_ms) - 1, &mut wire, &mut outbox),
        None
    );
    let at = 2_010 + u64::from(retry_in_ms);
    assert_eq!(s.poll(at, &mut wire, &mut outbox), Some(Event::Connecting));
    assert_eq!(wire.take(), connect_bytes(None));
    assert_eq!(wire.reopened, 2);
    wire.broker_sends(&CONNACK);
    assert_eq!(
        s.poll(at + 1, &mut wire, &mut outbox),
        Some(Event::Connected)
    );
    s.poll(at + 2, &mut wire, &mut outbox);
    assert_eq!(wire.take(), publish_bytes("sensors/d1/t", 2, b"1"));
    wire.broker_sends(&[0x40, 2, 0, 2]);
    assert_eq!(s.poll(at + 3, &mut wire, &mut outbox), Some(Event::Acked));
    assert!(outbox.0.is_empty());
}

#[test]
fn keep_alive_pings_when_idle_and_a_missing_pingresp_is_a_dead_link() {
    let mut outbox = Messages::default();
    let (mut s, mut wire) = connected(&mut outbox);
    assert_eq!(s.poll(10_000, &mut wire, &mut outbox), None);
    assert!(
        wire.take().is_empty(),
        "not idle for a whole keep-alive yet"
    );
    s.poll(10_001, &mut wire, &mut outbox);
    assert_eq!(wire.take(), [0xc0, 0]);
    wire.broker_sends(&[0xd0, 0]);
    assert_eq!(s.poll(10_002, &mut wire, &mut outbox), None);
    // The next ping goes unanswered.
    s.poll(20_001, &mut wire, &mut outbox);
    assert_eq!(wire.take(), [0xc0, 0]);
    assert!(matches!(
        s.poll(22_001, &mut wire, &mut outbox),
        Some(Event::LinkLost {
            cause: Error::Timeout,
            ..
        })
    ));
}

#[test]
fn a_missing_connack_is_a_dead_link_and_backoff_doubles_up_to_its_maximum() {
    let mut outbox = Messages::default();
    let mut s = Session::new(CONFIG).unwrap();
    let mut wire = Wire::default();
    let mut now = 0;
    let mut delays = Vec::new();
    for _ in 0..6 {
        assert_eq!(s.poll(now, &mut wire, &mut outbox), Some(Event::Connecting));
        now += 2_000;
        match s.poll(now, &mut wire, &mut outbox) {
            Some(Event::LinkLost { retry_in_ms, .. }) => delays.push(retry_in_ms),
            other => panic!("{other:?}"),
        }
        now += u64::from(*delays.last().unwrap());
    }
    let ceilings = [1_000, 2_000, 4_000, 8_000, 8_000, 8_000];
    for (d, max) in delays.iter().zip(ceilings) {
        assert!((max / 2..=max).contains(d), "{delays:?}");
    }
    assert_eq!(s.counters().connects, 6);
}

#[test]
fn a_refused_connection_backs_off() {
    let mut outbox = Messages::default();
    let mut s = Session::new(CONFIG).unwrap();
    let mut wire = Wire::default();
    s.poll(0, &mut wire, &mut outbox);
    wire.broker_sends(&[0x20, 2, 0, 5]);
    assert_eq!(s.poll(1, &mut wire, &mut outbox), Some(Event::Refused(5)));
    assert!(!s.is_up());
    assert_eq!(s.poll(2, &mut wire, &mut outbox), None);
}

#[test]
fn large_unexpected_packets_are_skipped_and_garbage_ends_the_link() {
    let mut outbox = Messages::default();
    let (mut s, mut wire) = connected(&mut outbox);
    // A PUBLISH of 200 bytes after its 3-byte header (two-byte remaining length) the session never asked for, then a PINGRESP.
    let mut big = vec![0x30, 200, 1];
    big.extend([0; 200]);
    for chunk in big.chunks(7) {
        wire.broker_sends(chunk);
        assert_eq!(s.poll(2, &mut wire, &mut outbox), None);
    }
    assert!(s.is_up());
    wire.broker_sends(&[0xf0, 0]);
    assert!(matches!(
        s.poll(3, &mut wire, &mut outbox),
        Some(Event::LinkLost {
            cause: Error::Protocol,
            ..
        })
    ));
}

#[test]
fn a_closed_stream_is_a_dead_link() {
    struct Closed;
    impl ErrorType for Closed {
        type Error = ErrorKind;
    }
    impl Read for Closed {
        fn read(&mut self, _: &mut [u8]) -> Result<usize, ErrorKind> {
            Ok(0)
        }
    }
    impl ReadReady for Closed {
        fn read_ready(&mut self) -> Result<bool, ErrorKind> {
            Ok(true)
        }
    }
    impl Write for Closed {
        fn write(&mut self, b: &[u8]) -> Result<usize, ErrorKind> {
            Ok(b.len())
        }
        fn flush(&mut self) -> Result<(), ErrorKind> {
            Ok(())
        }
    }
    impl Link for Closed {}
    let mut s = Session::new(CONFIG).unwrap();
    let mut outbox = Messages::default();
    s.poll(0, &mut Closed, &mut outbox);
    assert!(matches!(
        s.poll(1, &mut Closed, &mut outbox),
        Some(Event::LinkLost {
            cause: Error::Closed,
            ..
        })
    ));
}

#[test]
fn parse_handles_split_and_multi_byte_lengths() {
    assert_eq!(parse(&[0x20]), Ok(None));
    assert_eq!(parse(&[0x20, 2, 0]), Ok(None));
    assert_eq!(
        parse(&[0x20, 2, 1, 0, 0xd0]),
        Ok(Some((Packet::ConnAck { code: 0 }, 4)))
    );
    assert_eq!(parse(&[0x30, 0x80, 0x01]), Ok(Some((Packet::Other, 131))));
    assert_eq!(parse(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]), Err(()));
    assert_eq!(parse(&[0x20, 3, 0, 0, 0]), Err(()));
}

//! The mirror frame: what one gateway of a site pair sends the other, as the payload of one
//! publish on [`super::MIRROR_TOPIC`].
//!
//! Binary, little-endian, so that a reading costs its own bytes plus 31:
//!
//! ```text
//! "WPM1"                      magic and version
//! u64  watermark              the sender's wall time (ms): every reading it stamped up to
//!                             then is in this frame or an earlier one
//! u64  digest                 of the sender's raised alerts when it sent the frame (XOR of
//! u32  raised                 a hash of each id), and how many; raised = u32::MAX: none
//! u32  entries, then each:
//!   u64  stream               the stamping gateway's stream (random per process start)
//!   u64  seq                  the entry's number in that stream, from 1
//!   u64  wall                 the stamp (ms since the epoch)
//!   u8   flags                bit 0 retain, bits 1-2 QoS
//!   u16  topic length, topic (UTF-8)
//!   u32  payload length, payload
//! ```
//!
//! A frame with no entries is a heartbeat: it only moves the watermark.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::rules::Millis;

const MAGIC: &[u8; 4] = b"WPM1";
/// Bytes of a frame without entries.
pub const HEADER_BYTES: usize = 4 + 8 + 8 + 4 + 4;
/// Bytes of an entry besides its topic and payload.
pub const ENTRY_OVERHEAD: usize = 8 + 8 + 8 + 1 + 2 + 4;

/// One mirrored publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The stream of the gateway that stamped it.
    pub stream: u64,
    /// Its number in that stream.
    pub seq: u64,
    /// The stamp, wall clock, ms since the epoch.
    pub wall: Millis,
    /// Published retained.
    pub retain: bool,
    /// Published at this QoS (0-2).
    pub qos: u8,
    /// The topic.
    pub topic: Bytes,
    /// The payload.
    pub payload: Bytes,
}

impl Entry {
    /// Bytes it takes in a frame.
    pub fn size(&self) -> usize {
        ENTRY_OVERHEAD + self.topic.len() + self.payload.len()
    }
}

/// What the sender's raised alerts were: a digest of their ids, and how many.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Digest {
    /// XOR of [`id_hash`] over the raised alerts' ids.
    pub hash: u64,
    /// How many are raised.
    pub raised: u32,
}

/// FNV-1a of an alert id: the same on every gateway and every version of Rust.
pub fn id_hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The sender's time.
    pub watermark: Millis,
    /// The sender's raised alerts when it sent the frame; `None` in a catch-up.
    pub digest: Option<Digest>,
    /// The publishes.
    pub entries: Vec<Entry>,
}

/// Why a frame could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not a mirror frame of this version.
    #[error("not a mirror frame (magic or version)")]
    Magic,
    /// It ends before its contents do, or goes on after them.
    #[error("the frame is cut short or has bytes after its entries")]
    Length,
    /// A topic that is not UTF-8 or has no levels.
    #[error("an entry's topic is not a UTF-8 topic name")]
    Topic,
    /// QoS above 2.
    #[error("an entry's QoS is above 2")]
    Qos,
}

/// Writes a frame.
pub fn encode(watermark: Millis, digest: Option<Digest>, entries: &[Entry]) -> Bytes {
    let size = HEADER_BYTES + entries.iter().map(Entry::size).sum::<usize>();
    let mut out = BytesMut::with_capacity(size);
    out.put_slice(MAGIC);
    out.put_u64_le(watermark);
    let digest = digest.unwrap_or(Digest {
        hash: 0,
        raised: u32::MAX,
    });
    out.put_u64_le(digest.hash);
    out.put_u32_le(digest.raised);
    out.put_u32_le(u32::try_from(entries.len()).expect("frames hold far fewer entries"));
    for e in entries {
        out.put_u64_le(e.stream);
        out.put_u64_le(e.seq);
        out.put_u64_le(e.wall);
        out.put_u8(u8::from(e.retain) | (e.qos.min(2) << 1));
        out.put_u16_le(u16::try_from(e.topic.len()).expect("topics are at most 65535 bytes"));
        out.put_slice(&e.topic);
        out.put_u32_le(u32::try_from(e.payload.len()).expect("payloads fit an MQTT packet"));
        out.put_slice(&e.payload);
    }
    out.freeze()
}

/// Reads a frame; the entries share `bytes`' memory.
pub fn decode(mut bytes: Bytes) -> Result<Frame, FrameError> {
    if bytes.len() < HEADER_BYTES {
        return Err(FrameError::Length);
    }
    if &bytes[..4] != MAGIC {
        return Err(FrameError::Magic);
    }
    bytes.advance(4);
    let watermark = bytes.get_u64_le();
    let digest = Digest {
        hash: bytes.get_u64_le(),
        raised: bytes.get_u32_le(),
    };
    let digest = (digest.raised != u32::MAX).then_some(digest);
    let count = bytes.get_u32_le() as usize;
    // Each entry takes at least its overhead: a count beyond that is a lie.
    if count > bytes.len() / ENTRY_OVERHEAD {
        return Err(FrameError::Length);
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        if bytes.len() < ENTRY_OVERHEAD {
            return Err(FrameError::Length);
        }
        let stream = bytes.get_u64_le();
        let seq = bytes.get_u64_le();
        let wall = bytes.get_u64_le();
        let flags = bytes.get_u8();
        let qos = (flags >> 1) & 0b11;
        if qos > 2 || flags >> 3 != 0 {
            return Err(FrameError::Qos);
        }
        let topic_len = usize::from(bytes.get_u16_le());
        if bytes.len() < topic_len + 4 {
            return Err(FrameError::Length);
        }
        let topic = bytes.split_to(topic_len);
        if topic.is_empty() || std::str::from_utf8(&topic).is_err() {
            return Err(FrameError::Topic);
        }
        let payload_len = bytes.get_u32_le() as usize;
        if bytes.len() < payload_len {
            return Err(FrameError::Length);
        }
        let payload = bytes.split_to(payload_len);
        entries.push(Entry {
            stream,
            seq,
            wall,
            retain: flags & 1 == 1,
            qos,
            topic,
            payload,
        });
    }
    if !bytes.is_empty() {
        return Err(FrameError::Length);
    }
    Ok(Frame {
        watermark,
        digest,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(seq: u64, topic: &str, payload: &str) -> Entry {
        Entry {
            stream: 7,
            seq,
            wall: 1_795_284_345_123 + seq,
            retain: seq % 2 == 0,
            qos: (seq % 3) as u8,
            topic: Bytes::from(topic.to_owned()),
            payload: Bytes::from(payload.to_owned()),
        }
    }

    #[test]
    fn a_frame_reads_back_as_written_and_costs_what_it_says() {
        let entries = vec![
            entry(1, "sensors/boiler-1/temperature", "95.2"),
            entry(2, "sensors/door-3/status", ""),
        ];
        let digest = Some(Digest { hash: 5, raised: 2 });
        let bytes = encode(42, digest, &entries);
        assert_eq!(
            bytes.len(),
            HEADER_BYTES + entries.iter().map(Entry::size).sum::<usize>()
        );
        assert_eq!(
            decode(bytes).unwrap(),
            Frame {
                watermark: 42,
                digest,
                entries
            }
        );
        let beat = decode(encode(9, None, &[])).unwrap();
        assert_eq!((beat.digest, beat.entries), (None, vec![]));
        assert_eq!(id_hash("site:a:r:1"), id_hash("site:a:r:1"));
        assert_ne!(id_hash("site:a:r:1"), id_hash("site:a:r:2"));
    }

    #[test]
    fn damaged_frames_are_refused_with_the_reason() {
        let good = encode(1, None, &[entry(1, "sensors/a/t", "1")]);
        assert_eq!(decode(Bytes::from_static(b"WPM2")), Err(FrameError::Length));
        let mut other = good.to_vec();
        other[3] = b'2';
        assert_eq!(decode(other.into()), Err(FrameError::Magic));
        for cut in 0..good.len() {
            assert!(decode(good.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut longer = good.to_vec();
        longer.push(0);
        assert_eq!(decode(longer.into()), Err(FrameError::Length));
        let mut huge_count = encode(1, None, &[]).to_vec();
        huge_count[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(huge_count.into()), Err(FrameError::Length));
        let mut qos3 = good.to_vec();
        qos3[HEADER_BYTES + 24] = 0b110;
        assert_eq!(decode(qos3.into()), Err(FrameError::Qos));
        let bad_topic = encode(1, None, &[entry(1, "", "1")]);
        assert_eq!(decode(bad_topic), Err(FrameError::Topic));
    }

    proptest! {
        #[test]
        fn any_entries_round_trip(
            watermark in any::<u64>(),
            raw in proptest::collection::vec(
                (any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>(), 0u8..3,
                 "[a-z/]{1,40}", proptest::collection::vec(any::<u8>(), 0..64)),
                0..20,
            ),
        ) {
            let entries: Vec<Entry> = raw
                .into_iter()
                .map(|(stream, seq, wall, retain, qos, topic, payload)| Entry {
                    stream, seq, wall, retain, qos,
                    topic: Bytes::from(topic),
                    payload: Bytes::from(payload),
                })
                .collect();
            let frame = decode(encode(watermark, None, &entries)).unwrap();
            prop_assert_eq!(frame, Frame { watermark, digest: None, entries });
        }

        #[test]
        fn any_bytes_decode_or_fail_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut framed = MAGIC.to_vec();
            framed.extend(bytes);
            let _ = decode(framed.into());
        }
    }
}

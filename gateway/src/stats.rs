//! Counters that every part of the gateway updates and anyone may read: the CLI, tests and,
//! later, the metrics endpoint. Cheap to update (relaxed atomics) and never blocking the
//! hot path; only per-device error counts take a lock, and only when an error happens.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Per-device error counts are kept for at most this many devices; the rest are summed
/// under [`OTHER_DEVICES`], so that a flood of invented device ids cannot grow memory.
pub const MAX_TRACKED_DEVICES: usize = 10_000;

/// Key under which errors without a device (or beyond the tracked devices) are counted.
pub const OTHER_DEVICES: &str = "-";

/// Gateway-wide counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Client connections open now.
    pub connections: AtomicU64,
    /// Sensor messages taken from the broker.
    pub messages: AtomicU64,
    /// Readings decoded (a message may hold several).
    pub readings: AtomicU64,
    /// Malformed messages and fields, all devices.
    pub decode_errors: AtomicU64,
    /// Times the broker's read cursor for ingest jumped ahead.
    pub cursor_jumps: AtomicU64,
    /// Messages skipped by those jumps.
    pub cursor_jump_lost: AtomicU64,
    /// Alerts raised.
    pub alerts_raised: AtomicU64,
    /// Alerts cleared.
    pub alerts_cleared: AtomicU64,
    /// Alerts handed to the uplink.
    pub uplink_queued: AtomicU64,
    /// Alerts acknowledged by the upstream broker (PUBACK).
    pub uplink_acked: AtomicU64,
    /// The upstream broker accepted our connection and has not failed since.
    pub uplink_connected: AtomicBool,
    decode_errors_by_device: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    /// Adds one to `counter`.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads `counter`.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Counts one malformed message or field from `device` (`None`: the topic named none).
    pub fn decode_error(&self, device: Option<&str>) {
        Self::inc(&self.decode_errors);
        let mut map = self
            .decode_errors_by_device
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = match device {
            Some(d) if map.contains_key(d) || map.len() < MAX_TRACKED_DEVICES => d,
            _ => OTHER_DEVICES,
        };
        match map.get_mut(key) {
            Some(n) => *n += 1,
            None => {
                map.insert(key.to_owned(), 1);
            }
        }
    }

    /// Malformed messages and fields counted for `device` ([`OTHER_DEVICES`] for none).
    pub fn decode_errors_of(&self, device: &str) -> u64 {
        let map = self
            .decode_errors_by_device
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.get(device).copied().unwrap_or(0)
    }

    /// Every device with malformed input, and its count.
    pub fn decode_errors_by_device(&self) -> BTreeMap<String, u64> {
        self.decode_errors_by_device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_errors_are_counted_per_device_with_a_bound() {
        let s = Stats::default();
        s.decode_error(Some("a"));
        s.decode_error(Some("a"));
        s.decode_error(None);
        assert_eq!(
            (s.decode_errors_of("a"), s.decode_errors_of(OTHER_DEVICES)),
            (2, 1)
        );
        for i in 0..MAX_TRACKED_DEVICES + 5 {
            s.decode_error(Some(&format!("d{i}")));
        }
        assert_eq!(s.decode_errors_by_device().len(), MAX_TRACKED_DEVICES);
        assert_eq!(
            Stats::get(&s.decode_errors),
            3 + MAX_TRACKED_DEVICES as u64 + 5
        );
    }
}

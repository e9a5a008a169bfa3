//! Report by exception: decides, for one metric, whether a new value is worth a message.
//!
//! A pure state machine with time passed in (milliseconds from any fixed origin): no clock, no
//! I/O, no allocation. The firmware runs one [`Reporter`] per metric; the gateway can run the
//! same rule over readings it already holds. It does not know topics, payloads or `seq`.

/// The distance between two values of a metric, never negative and never panicking.
pub trait Distance: Copy + PartialOrd {
    /// `|self - other|`, saturating where the type can overflow.
    fn distance(self, other: Self) -> Self;
}

impl Distance for i32 {
    fn distance(self, other: Self) -> Self {
        i32::try_from(self.abs_diff(other)).unwrap_or(i32::MAX)
    }
}

impl Distance for f32 {
    fn distance(self, other: Self) -> Self {
        let d = self - other;
        if d < 0.0 { -d } else { d }
    }
}

impl Distance for f64 {
    fn distance(self, other: Self) -> Self {
        let d = self - other;
        if d < 0.0 { -d } else { d }
    }
}

/// When a metric is reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Deadband<V> {
    /// Smallest change from the last reported value that is worth a message.
    pub delta: V,
    /// Least time between two messages of this metric, in ms, however far the value moved.
    pub min_interval_ms: u64,
    /// Most time between two messages, in ms: a value that does not move is sent again this
    /// often, so that silence means trouble.
    pub heartbeat_ms: u64,
}

/// The report-by-exception state of one metric: the last value reported and when.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reporter<V> {
    band: Deadband<V>,
    last: Option<(V, u64)>,
}

impl<V: Distance> Reporter<V> {
    /// A reporter that has reported nothing yet: its first offer is always reported.
    pub const fn new(band: Deadband<V>) -> Self {
        Self { band, last: None }
    }

    /// Offers `value` observed at `now_ms`; returns whether it is to be reported, and if so
    /// records it as the last reported value.
    ///
    /// A value is reported when nothing was reported before; otherwise never sooner than
    /// `min_interval_ms` after the last report, and then if `heartbeat_ms` has passed or the
    /// value moved by at least `delta`. A clock that goes backwards counts as no time passed.
    /// A value that compares with nothing (NaN) only goes out on the heartbeat.
    pub fn offer(&mut self, now_ms: u64, value: V) -> bool {
        let due = match self.last {
            None => true,
            Some((last, at)) => {
                let elapsed = now_ms.saturating_sub(at);
                elapsed >= self.band.min_interval_ms
                    && (elapsed >= self.band.heartbeat_ms
                        || value.distance(last) >= self.band.delta)
            }
        };
        if due {
            self.last = Some((value, now_ms));
        }
        due
    }

    /// The last reported value and when it was reported.
    pub fn last(&self) -> Option<(V, u64)> {
        self.last
    }

    /// The rule this reporter applies.
    pub fn band(&self) -> Deadband<V> {
        self.band
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BAND: Deadband<i32> = Deadband {
        delta: 500,
        min_interval_ms: 1_000,
        heartbeat_ms: 10_000,
    };

    #[test]
    fn deadband_table() {
        // (time, value, reported?) in order, one reporter.
        let steps: &[(u64, i32, bool)] = &[
            (0, 20_000, true),       // first value always goes out
            (500, 30_000, false),    // big move, but within min_interval
            (1_000, 20_400, false),  // min_interval passed, moved 400 < 500
            (1_500, 20_500, true),   // moved exactly delta
            (2_000, 20_000, false),  // within min_interval of the last report
            (2_500, 20_000, true),   // moved 500 down from 20_500
            (12_499, 20_100, false), // small move, heartbeat not yet due
            (12_500, 20_100, true),  // heartbeat
            (12_000, 99_000, false), // clock went backwards: no time passed
        ];
        let mut r = Reporter::new(BAND);
        for &(t, v, want) in steps {
            assert_eq!(r.offer(t, v), want, "t={t} v={v}");
        }
        assert_eq!(r.last(), Some((20_100, 12_500)));
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let mut r = Reporter::new(BAND);
        assert!(r.offer(0, i32::MIN));
        assert!(r.offer(1_000, i32::MAX));
    }

    #[test]
    fn floats_and_nan() {
        let mut r = Reporter::new(Deadband {
            delta: 0.5_f64,
            min_interval_ms: 0,
            heartbeat_ms: 60_000,
        });
        assert!(r.offer(0, 21.0));
        assert!(!r.offer(1, 21.4));
        assert!(r.offer(2, 20.5));
        assert!(!r.offer(3, f64::NAN), "NaN moves by nothing measurable");
        assert!(
            r.offer(60_002, f64::NAN),
            "but the heartbeat still goes out"
        );
    }
}

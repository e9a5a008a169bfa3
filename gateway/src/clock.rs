//! The gateway's two clocks, and steps of the wall clock.
//!
//! Durations run on the monotonic clock: `for`, silence, presence grace, cooldown,
//! renotify, rate, deviation and flapping windows, staleness and log limits. A step of the
//! wall clock (a box that boots in 1970 until NTP jumps it forward by decades, NTP stepping
//! it back a minute) therefore neither fires a rule early nor stalls it. Timestamps that
//! people and consumers read come from the wall clock: an alert's `since`, `at` and id,
//! history rows, rollup windows and summaries. After a forward step they are in the new,
//! correct time at once.
//!
//! [`Stamp`] is one instant on both clocks. The ingest task takes one from [`Clock`] per
//! message and per wake-up; the rules keep their deadlines on its `mono` half and the start
//! of an episode (`since`, which names the alert in its id) on its `wall` half. Why two
//! halves rather than one monotonic "judging time" converted to wall time for documents:
//! the id of an open episode must not change, and a conversion made after a step would
//! change it; and a reading stamped once with its wall time (as a gateway that shares
//! readings with a peer will) then names its episode by that stamp alone. An episode that
//! began before a step and is raised after it takes its `since` from the monotonic time
//! elapsed ([`Stamp::wall_of`]), so that it is not raised "since 1970" or after its `at`.
//!
//! The monotonic half counts from the wall time at which the [`Clock`] was made (the
//! process start): in normal operation both halves agree, and the wall-clock `since` of an
//! alert saved before a restart can be put back on the monotonic clock, assuming no step
//! across the restart (the only clock that survives one is the wall clock).
//!
//! [`Clock`] logs a step (a warning, once per step, with its size and direction) when the
//! wall clock moves more than [`STEP_THRESHOLD_MS`] further or less far than the monotonic
//! clock between two readings. The monotonic clock does not count time the machine is
//! suspended, so a resume shows as a forward step; gateways do not sleep.
//!
//! Virtual time (replays, tests) uses one number for both halves: `Stamp::from(ms)`.

use std::fmt;
use std::time::Instant;

use tracing::warn;

use crate::alert::{now_millis, rfc3339};
use crate::rules::Millis;

/// A disagreement between the wall and the monotonic clock larger than this is a step.
pub const STEP_THRESHOLD_MS: Millis = 2_000;

/// How far the wall clock may drift (NTP slewing it) from the monotonic clock plus the
/// clock's offset before [`Clock`] takes the offset again. Between two such resyncs the two
/// halves of every stamp differ by the same offset, to the millisecond: read separately,
/// each rounded down, they would differ by one now and then, and a duration measured on one
/// half would not equal the same duration on the other. Gateways of a site pair measure
/// durations of each other's readings from the wall times those carry.
pub const RESYNC_MS: Millis = 20;

/// One instant on both clocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Stamp {
    /// Milliseconds since the Unix epoch, as the wall clock says: for documents and history.
    pub wall: Millis,
    /// Milliseconds on the monotonic clock: for durations and deadlines.
    pub mono: Millis,
}

impl From<Millis> for Stamp {
    /// Virtual time: the same number on both clocks.
    fn from(ms: Millis) -> Self {
        Stamp { wall: ms, mono: ms }
    }
}

impl Stamp {
    /// The wall time of `earlier`, as the wall clock reads now (`self`): `earlier.wall`
    /// itself, unless the wall clock has stepped between the two, in which case the
    /// monotonic time elapsed counted back from `self.wall`.
    pub fn wall_of(self, earlier: Stamp) -> Millis {
        match step_between(earlier, self) {
            None => earlier.wall,
            Some(_) => self
                .wall
                .saturating_sub(self.mono.saturating_sub(earlier.mono)),
        }
    }

    /// The instant `mono` (at or before this one) on both clocks: its wall half counted back
    /// from this one's. While the wall clock does not step, this is exactly the wall time a
    /// [`Clock`] stamps at `mono`, so that a transition judged late at its deadline carries
    /// the deadline's time, the same on two gateways that judge the same readings.
    pub fn at_mono(self, mono: Millis) -> Stamp {
        Stamp {
            mono,
            wall: if mono <= self.mono {
                self.wall.saturating_sub(self.mono - mono)
            } else {
                self.wall.saturating_add(mono - self.mono)
            },
        }
    }

    /// A monotonic instant for a wall time from before this clock existed (a `since` saved
    /// before a restart), assuming the wall clock did not step in between; never later than
    /// now.
    pub fn mono_of(self, wall: Millis) -> Millis {
        self.mono.saturating_sub(self.wall.saturating_sub(wall))
    }
}

/// A step of the wall clock against the monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockStep {
    /// The wall clock jumped ahead by this many milliseconds.
    Forward(Millis),
    /// The wall clock went back by this many milliseconds.
    Backward(Millis),
}

impl fmt::Display for ClockStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (direction, ms) = match self {
            ClockStep::Forward(ms) => ("forward", ms),
            ClockStep::Backward(ms) => ("backward", ms),
        };
        write!(f, "{direction} by {}.{:03} s", ms / 1000, ms % 1000)
    }
}

/// The step of the wall clock between `earlier` and `later`, if the wall clock moved more
/// than [`STEP_THRESHOLD_MS`] further or less far than the monotonic clock.
pub fn step_between(earlier: Stamp, later: Stamp) -> Option<ClockStep> {
    let wall = i128::from(later.wall) - i128::from(earlier.wall);
    let mono = i128::from(later.mono) - i128::from(earlier.mono);
    let by = wall - mono;
    let size = Millis::try_from(by.unsigned_abs()).unwrap_or(Millis::MAX);
    if size <= STEP_THRESHOLD_MS {
        None
    } else if by > 0 {
        Some(ClockStep::Forward(size))
    } else {
        Some(ClockStep::Backward(size))
    }
}

/// Reads both clocks and watches for steps; owned by the ingest task.
#[derive(Debug)]
pub struct Clock {
    origin: Instant,
    origin_ms: Millis,
    last: Stamp,
    /// Wall minus monotonic time, in ms, as last taken.
    offset: i128,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    /// A clock whose monotonic half starts at the wall time now.
    pub fn new() -> Self {
        let wall = now_millis();
        Clock {
            origin: Instant::now(),
            origin_ms: wall,
            last: Stamp::from(wall),
            offset: 0,
        }
    }

    /// The stamp of a wall time another gateway gave a reading, on this clock: its
    /// monotonic half is where this clock's would have been at that wall time.
    pub fn stamp_of(&self, wall: Millis) -> Stamp {
        let mono = (i128::from(wall) - self.offset).clamp(0, i128::from(Millis::MAX));
        Stamp {
            wall,
            mono: mono as Millis,
        }
    }

    /// Now, on both clocks; logs a step of the wall clock since the last reading.
    pub fn now(&mut self) -> Stamp {
        let before = i128::from(now_millis());
        let elapsed = Millis::try_from(self.origin.elapsed().as_millis()).unwrap_or(Millis::MAX);
        let after = i128::from(now_millis());
        let mono = self.origin_ms.saturating_add(elapsed);
        // The wall clock read on both sides of the monotonic one: if the thread was held
        // between them (a busy machine), the two do not say the same instant, and this
        // reading does not move the offset.
        let raw = (before + after) / 2;
        if after - before <= 2
            && (raw - (i128::from(mono) + self.offset)).unsigned_abs() > u128::from(RESYNC_MS)
        {
            self.offset = raw - i128::from(mono);
        }
        let wall = (i128::from(mono) + self.offset).clamp(0, i128::from(Millis::MAX)) as Millis;
        let now = Stamp { wall, mono };
        if let Some(step) = self.observe(now) {
            warn!(
                %step,
                from = %rfc3339(wall_without(now, step)),
                to = %rfc3339(now.wall),
                "the wall clock stepped; rule durations are unaffected (they run on the monotonic clock), and new timestamps follow the wall clock. If this repeats, check the time service (NTP, chrony) and the real-time clock"
            );
        }
        now
    }

    /// Takes a reading of both clocks; returns the step since the previous reading, if any.
    /// Each step is reported once: the reading after it is compared with this one.
    pub fn observe(&mut self, now: Stamp) -> Option<ClockStep> {
        let step = step_between(self.last, now);
        self.last = now;
        step
    }
}

/// What the wall clock would read at `now` without `step`.
fn wall_without(now: Stamp, step: ClockStep) -> Millis {
    match step {
        ClockStep::Forward(ms) => now.wall.saturating_sub(ms),
        ClockStep::Backward(ms) => now.wall.saturating_add(ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Millis = 3_600_000;
    /// 2026-11-21T18:05:45.123Z.
    const Y2026: Millis = 1_795_284_345_123;

    fn at(wall: Millis, mono: Millis) -> Stamp {
        Stamp { wall, mono }
    }

    #[test]
    fn steps_are_detected_with_their_size_and_direction() {
        let cases = [
            ("no step", at(1_000, 1_000), None),
            ("within the threshold", at(3_000, 1_000), None),
            (
                "just over",
                at(3_001, 1_000),
                Some(ClockStep::Forward(2_001)),
            ),
            ("an hour ahead", at(HOUR, 0), Some(ClockStep::Forward(HOUR))),
            (
                "a minute back",
                at(0, 60_000),
                Some(ClockStep::Backward(60_000)),
            ),
            (
                "1970 to 2026",
                at(Y2026, 30_000),
                Some(ClockStep::Forward(Y2026 - 30_000)),
            ),
        ];
        for (name, later, expected) in cases {
            assert_eq!(step_between(at(0, 0), later), expected, "{name}");
        }
    }

    #[test]
    fn time_passing_on_both_clocks_is_no_step() {
        assert_eq!(step_between(at(Y2026, 5), at(Y2026 + HOUR, 5 + HOUR)), None);
        assert_eq!(step_between(at(5, Y2026), at(5 + HOUR, Y2026 + HOUR)), None);
    }

    #[test]
    fn a_step_is_reported_once() {
        let mut clock = Clock {
            origin: Instant::now(),
            origin_ms: 10_000,
            last: at(10_000, 10_000),
            offset: 0,
        };
        let readings = [
            (at(11_000, 11_000), None),
            (
                at(Y2026, 12_000),
                Some(ClockStep::Forward(Y2026 - 11_000 - 1_000)),
            ),
            (at(Y2026 + 1_000, 13_000), None),
            (at(Y2026 + 2_000, 14_000), None),
            (
                at(Y2026 - 57_000, 15_000),
                Some(ClockStep::Backward(60_000)),
            ),
            (at(Y2026 - 56_000, 16_000), None),
        ];
        for (i, (now, expected)) in readings.into_iter().enumerate() {
            assert_eq!(clock.observe(now), expected, "reading {i}");
        }
    }

    #[test]
    fn steps_read_as_an_operator_would_write_them() {
        assert_eq!(
            ClockStep::Forward(HOUR).to_string(),
            "forward by 3600.000 s"
        );
        assert_eq!(
            ClockStep::Backward(60_500).to_string(),
            "backward by 60.500 s"
        );
        let now = at(Y2026, 12_000);
        assert_eq!(
            wall_without(now, ClockStep::Forward(Y2026 - 12_000)),
            12_000
        );
        assert_eq!(
            wall_without(now, ClockStep::Backward(60_000)),
            Y2026 + 60_000
        );
    }

    #[test]
    fn the_wall_time_of_an_earlier_instant_follows_a_step() {
        let then = at(30_000, 30_000);
        let cases = [
            ("no step: as stamped", at(40_000, 40_000), 30_000),
            (
                "a disagreement within the threshold: as stamped",
                at(41_500, 40_000),
                30_000,
            ),
            (
                "after a step to 2026: in the new time",
                at(Y2026, 40_000),
                Y2026 - 10_000,
            ),
            ("after a step back: counted back from now", at(0, 40_000), 0),
        ];
        for (name, now, expected) in cases {
            assert_eq!(now.wall_of(then), expected, "{name}");
        }
        // Ten seconds later, after NTP stepped the clock back a minute.
        let then = at(Y2026, Y2026);
        let now = at(Y2026 - 50_000, Y2026 + 10_000);
        assert_eq!(now.wall_of(then), Y2026 - 60_000);
    }

    #[test]
    fn a_saved_wall_time_goes_back_on_the_monotonic_clock() {
        let now = at(Y2026, 5_000_000);
        assert_eq!(now.mono_of(Y2026 - 1_000), 4_999_000);
        assert_eq!(now.mono_of(Y2026 + HOUR), 5_000_000, "never after now");
        assert_eq!(now.mono_of(0), 0, "never before the start of the clock");
    }

    #[test]
    fn the_clock_reads_both_halves_together() {
        let mut clock = Clock::new();
        let a = clock.now();
        let b = clock.now();
        assert!(b.mono >= a.mono);
    }

    #[test]
    fn both_halves_keep_one_offset_so_durations_agree_to_the_millisecond() {
        let mut clock = Clock::new();
        let first = clock.now();
        let offset = i128::from(first.wall) - i128::from(first.mono);
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(50);
        while std::time::Instant::now() < deadline {
            let now = clock.now();
            assert_eq!(i128::from(now.wall) - i128::from(now.mono), offset);
            // Another gateway's reading, stamped with a wall time: back on this clock.
            assert_eq!(clock.stamp_of(now.wall), now);
            assert_eq!(now.at_mono(first.mono), first);
        }
    }
}

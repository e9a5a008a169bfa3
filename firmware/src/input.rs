//! Digital inputs as states: a leak probe, a door contact, a float switch on a GPIO.
//!
//! A contact bounces: for a few milliseconds after it closes or opens, the pin flips back and
//! forth. [`Debouncer`] turns the raw level into a stable state: a new level counts once it has
//! been read without interruption for `settle_ms`. [`InputReporter`] decides when the stable
//! state goes to the gateway: **at once on every change** (no deadband, no minimum interval: a
//! leak is never held back) and again every `heartbeat_ms` while nothing changes, so that a
//! silent device can be told from a dry basement. [`Input`] puts both on an embedded-hal 1.0
//! [`InputPin`].
//!
//! Like [`report`](crate::report), these are pure state machines with time passed in
//! (milliseconds from any fixed origin): no clock, no I/O, no allocation. A clock that goes
//! backwards counts as no time passed.

use embedded_hal::digital::InputPin;

/// Turns a bouncing level into a stable state. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debouncer {
    settle_ms: u64,
    stable: Option<bool>,
    /// A level that differs from `stable`, and since when it has been read without a break.
    candidate: Option<(bool, u64)>,
}

impl Debouncer {
    /// A debouncer that knows no state yet: the first level becomes the state once it has held
    /// for `settle_ms` (at once when `settle_ms` is 0).
    pub const fn new(settle_ms: u64) -> Self {
        Self {
            settle_ms,
            stable: None,
            candidate: None,
        }
    }

    /// Offers the level read at `now_ms`; returns the new stable state when it changed with
    /// this read (the first stable state included).
    pub fn update(&mut self, now_ms: u64, level: bool) -> Option<bool> {
        if self.stable == Some(level) {
            // Back to the stable level: whatever bounced before did not last.
            self.candidate = None;
            return None;
        }
        let since = match self.candidate {
            Some((candidate, since)) if candidate == level => since,
            _ => {
                self.candidate = Some((level, now_ms));
                now_ms
            }
        };
        if now_ms.saturating_sub(since) >= self.settle_ms {
            self.stable = Some(level);
            self.candidate = None;
            return Some(level);
        }
        None
    }

    /// The stable state, `None` until a level has held for `settle_ms`.
    pub fn stable(&self) -> Option<bool> {
        self.stable
    }
}

/// When a digital input's state goes out: on every debounced change at once, and on the
/// heartbeat. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputReporter {
    debouncer: Debouncer,
    heartbeat_ms: u64,
    /// When the state was last reported.
    last: Option<u64>,
}

impl InputReporter {
    /// A reporter that has reported nothing: its first report is the first stable state.
    pub const fn new(settle_ms: u64, heartbeat_ms: u64) -> Self {
        Self {
            debouncer: Debouncer::new(settle_ms),
            heartbeat_ms,
            last: None,
        }
    }

    /// Offers the level read at `now_ms`; returns the state to publish now, if any.
    ///
    /// A change of the debounced state is reported with this read, whenever the last report
    /// was. Otherwise the stable state is reported again once `heartbeat_ms` has passed since
    /// the last report; a change restarts that wait, so a change that becomes stable just when
    /// the heartbeat is due makes one report, not two. While the level bounces without
    /// settling, the heartbeat carries the last stable state: that is still the state.
    pub fn offer(&mut self, now_ms: u64, level: bool) -> Option<bool> {
        if let Some(state) = self.debouncer.update(now_ms, level) {
            self.last = Some(now_ms);
            return Some(state);
        }
        let state = self.debouncer.stable()?;
        let at = self.last?;
        if now_ms.saturating_sub(at) >= self.heartbeat_ms {
            self.last = Some(now_ms);
            return Some(state);
        }
        None
    }

    /// The debounced state, `None` until the first level has settled.
    pub fn state(&self) -> Option<bool> {
        self.debouncer.stable()
    }
}

/// A digital input on an embedded-hal pin, debounced and reported as a state: `true` while
/// active (a probe that is wet, a contact that is open, as the board defines it).
#[derive(Debug)]
pub struct Input<P> {
    pin: P,
    active_low: bool,
    reporter: InputReporter,
}

impl<P: InputPin> Input<P> {
    /// An input on `pin`. `active_low`: the input is active while the pin reads low (a probe or
    /// contact that pulls a pin with a pull-up to ground). `settle_ms` and `heartbeat_ms` as in
    /// [`InputReporter::new`].
    pub fn new(pin: P, active_low: bool, settle_ms: u64, heartbeat_ms: u64) -> Self {
        Self {
            pin,
            active_low,
            reporter: InputReporter::new(settle_ms, heartbeat_ms),
        }
    }

    /// Reads the pin at `now_ms`; returns the state to publish now, if any. Call it often
    /// (every few milliseconds, or at least several times per `settle_ms`): the debouncer only
    /// sees the reads it is given.
    pub fn poll(&mut self, now_ms: u64) -> Result<Option<bool>, P::Error> {
        let high = self.pin.is_high()?;
        Ok(self.reporter.offer(now_ms, high != self.active_low))
    }

    /// The debounced state, `None` until the first level has settled.
    pub fn state(&self) -> Option<bool> {
        self.reporter.state()
    }

    /// The pin.
    pub fn pin(&self) -> &P {
        &self.pin
    }

    /// The pin, e.g. to reconfigure it or, in a simulation, to move what it reads.
    pub fn pin_mut(&mut self) -> &mut P {
        &mut self.pin
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal_mock::eh1::digital::{Mock, State, Transaction};

    /// Feeds `(time, level)` reads and collects `(time, report)` for every read that reported.
    fn run(reporter: &mut InputReporter, reads: &[(u64, bool)]) -> std::vec::Vec<(u64, bool)> {
        reads
            .iter()
            .filter_map(|&(t, level)| reporter.offer(t, level).map(|s| (t, s)))
            .collect()
    }

    /// Reads every `step` ms from `from` (inclusive) to `to` (exclusive) at one level.
    fn steady(from: u64, to: u64, step: u64, level: bool) -> impl Iterator<Item = (u64, bool)> {
        (from..to).step_by(step as usize).map(move |t| (t, level))
    }

    #[test]
    fn a_level_counts_once_it_held_for_the_settle_time() {
        let mut d = Debouncer::new(20);
        assert_eq!(d.update(0, false), None);
        assert_eq!(d.update(10, false), None);
        assert_eq!(d.update(20, false), Some(false), "held 20 ms");
        assert_eq!(d.stable(), Some(false));
        assert_eq!(d.update(30, false), None, "no change, nothing new");
    }

    #[test]
    fn bounce_shorter_than_the_settle_time_is_no_change() {
        let mut d = Debouncer::new(20);
        d.update(0, false);
        d.update(20, false);
        // The probe touches water and bounces: high, low, high, low within 15 ms.
        for (t, level) in [
            (21, true),
            (25, false),
            (28, true),
            (33, false),
            (36, false),
        ] {
            assert_eq!(d.update(t, level), None, "at {t}");
        }
        assert_eq!(d.stable(), Some(false));
        // A new run of `true` starts the wait again from its own first read.
        assert_eq!(d.update(40, true), None);
        assert_eq!(d.update(59, true), None);
        assert_eq!(d.update(60, true), Some(true));
    }

    #[test]
    fn zero_settle_time_takes_every_level_at_once() {
        let mut d = Debouncer::new(0);
        assert_eq!(d.update(5, true), Some(true));
        assert_eq!(d.update(6, false), Some(false));
        assert_eq!(d.update(7, false), None);
    }

    #[test]
    fn a_change_is_reported_the_moment_it_settles_then_on_the_heartbeat() {
        let mut r = InputReporter::new(20, 1_000);
        let mut reads: std::vec::Vec<_> = steady(0, 500, 10, false).collect();
        reads.extend([(500, true), (505, false), (510, true)]); // bounce
        reads.extend(steady(520, 2_600, 10, true));
        assert_eq!(
            run(&mut r, &reads),
            [(20, false), (530, true), (1_530, true), (2_530, true)],
            "first state after 20 ms; the leak 20 ms after its last bounce; heartbeats 1 s apart"
        );
    }

    #[test]
    fn a_change_right_after_a_report_is_not_held_back() {
        let mut r = InputReporter::new(0, 60_000);
        assert_eq!(r.offer(0, false), Some(false));
        assert_eq!(r.offer(1, true), Some(true), "no minimum interval");
        assert_eq!(r.offer(2, false), Some(false));
    }

    #[test]
    fn a_change_that_settles_when_the_heartbeat_is_due_makes_one_report() {
        let mut r = InputReporter::new(20, 1_000);
        assert_eq!(r.offer(0, false), None);
        assert_eq!(r.offer(20, false), Some(false));
        // The level changes at 1000 and settles at 1020, when the heartbeat (due at 1020) is.
        assert_eq!(
            r.offer(1_000, true),
            None,
            "not yet settled, heartbeat not yet due"
        );
        assert_eq!(r.offer(1_020, true), Some(true), "the change, once");
        assert_eq!(
            r.offer(1_021, true),
            None,
            "and no heartbeat right behind it"
        );
        assert_eq!(r.offer(2_019, true), None);
        assert_eq!(
            r.offer(2_020, true),
            Some(true),
            "heartbeat a full period after"
        );
    }

    #[test]
    fn the_heartbeat_during_a_bounce_carries_the_last_stable_state() {
        let mut r = InputReporter::new(20, 1_000);
        r.offer(0, false);
        assert_eq!(r.offer(20, false), Some(false));
        // Bouncing across the heartbeat at 1020 without ever settling.
        assert_eq!(r.offer(1_010, true), None);
        assert_eq!(r.offer(1_020, false), Some(false), "heartbeat: still dry");
        assert_eq!(r.offer(1_025, true), None);
        assert_eq!(r.offer(1_030, false), None);
    }

    #[test]
    fn a_stuck_input_goes_out_on_every_heartbeat_and_nothing_more() {
        let mut r = InputReporter::new(20, 1_000);
        let reports = run(
            &mut r,
            &steady(0, 10_001, 5, true).collect::<std::vec::Vec<_>>(),
        );
        let times: std::vec::Vec<u64> = reports.iter().map(|&(t, _)| t).collect();
        assert_eq!(
            times,
            [
                20, 1_020, 2_020, 3_020, 4_020, 5_020, 6_020, 7_020, 8_020, 9_020
            ]
        );
        assert!(reports.iter().all(|&(_, s)| s));
    }

    #[test]
    fn an_input_that_chatters_forever_keeps_its_last_state_on_the_heartbeat() {
        let mut r = InputReporter::new(20, 1_000);
        r.offer(0, false);
        r.offer(20, false);
        // A failing probe: the level flips every 10 ms for 5 s.
        let reads: std::vec::Vec<_> = (30..5_030).step_by(10).map(|t| (t, t % 20 == 10)).collect();
        let reports = run(&mut r, &reads);
        assert_eq!(
            reports,
            [
                (1_020, false),
                (2_020, false),
                (3_020, false),
                (4_020, false),
                (5_020, false)
            ],
        );
    }

    #[test]
    fn nothing_is_reported_before_the_first_level_settles() {
        let mut r = InputReporter::new(50, 1_000);
        assert_eq!(r.offer(0, true), None);
        assert_eq!(r.offer(2_000, false), None, "the heartbeat needs a state");
        assert_eq!(r.state(), None);
        assert_eq!(r.offer(2_050, false), Some(false));
    }

    #[test]
    fn a_clock_that_goes_backwards_counts_as_no_time_passed() {
        let mut r = InputReporter::new(20, 1_000);
        r.offer(5_000, false);
        assert_eq!(r.offer(5_020, false), Some(false));
        assert_eq!(r.offer(100, false), None);
        assert_eq!(r.offer(6_019, false), None);
        assert_eq!(r.offer(6_020, false), Some(false));
    }

    #[test]
    fn an_active_low_pin_is_active_while_it_reads_low() {
        let pin = Mock::new(&[
            Transaction::get(State::High),
            Transaction::get(State::High),
            Transaction::get(State::Low),
            Transaction::get(State::Low),
        ]);
        let mut input = Input::new(pin, true, 10, 60_000);
        assert_eq!(input.poll(0).unwrap(), None);
        assert_eq!(input.poll(10).unwrap(), Some(false), "pulled up: dry");
        assert_eq!(input.poll(20).unwrap(), None);
        assert_eq!(
            input.poll(30).unwrap(),
            Some(true),
            "shorted to ground: wet"
        );
        assert_eq!(input.state(), Some(true));
        input.pin.done();
    }

    #[test]
    fn an_active_high_pin_is_active_while_it_reads_high() {
        let pin = Mock::new(&[Transaction::get(State::High)]);
        let mut input = Input::new(pin, false, 0, 60_000);
        assert_eq!(input.poll(0).unwrap(), Some(true));
        input.pin.done();
    }
}

//! Rule evaluation: a pure function of (rule, state, input, now). No I/O, no clock reads.
//!
//! A threshold rule watches one metric stream of one device (one `State` per rule, device and
//! metric). Its life:
//!
//! ```text
//!            condition true, for = 0
//!   Normal ─────────────────────────────▶ Raised ──clear condition──▶ Normal
//!     │  ▲                                  ▲
//!     │  └── condition false ── Pending ────┘ condition held for `for`
//!     └──── condition true, for > 0 ─▶
//! ```
//!
//! * The condition is `value > above` or `value < below` (strict: a value exactly at the bound
//!   does not fire).
//! * Once raised, the alert stays raised until the value is back in the normal zone:
//!   `value < clear_below` (or `value <= above` without hysteresis) and, for the low side,
//!   `value > clear_above` (or `value >= below`). Values inside the hysteresis band change
//!   nothing.
//! * `for` must elapse while the condition holds without interruption; a reading outside the
//!   condition while pending returns to normal. The deadline is also checked on `Input::Tick`,
//!   so an alert fires on time even if the device reports less often than `for`.
//! * NaN changes nothing. Time that runs backwards counts as no time passing.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::topic::TopicFilter;

/// Milliseconds since the Unix epoch: the clock every rule runs on.
pub type Millis = u64;

/// How urgent an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// For the record.
    Info,
    /// Needs attention soon.
    Warning,
    /// Needs attention now; forwarded upstream by default.
    Critical,
}

impl Severity {
    /// The lowercase name used in topics and documents.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// A checked threshold rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Unique name; part of the alert topic and id.
    pub name: String,
    /// Which reading topics (`sensors/{device}/{metric}`) the rule watches.
    pub filter: TopicFilter,
    /// The bounds.
    pub threshold: Threshold,
    /// How long the condition must hold before the alert is raised.
    pub hold: Duration,
    /// Severity of the alerts the rule raises.
    pub severity: Severity,
}

/// Bounds of a threshold rule. At least one of `above` and `below` is set; the clear bounds
/// lie on the normal side of their bound (checked by `config`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Threshold {
    /// Fires when the value is strictly greater.
    pub above: Option<f64>,
    /// Fires when the value is strictly less.
    pub below: Option<f64>,
    /// With `above`: clears when the value is strictly less (hysteresis).
    pub clear_below: Option<f64>,
    /// With `below`: clears when the value is strictly greater (hysteresis).
    pub clear_above: Option<f64>,
}

impl Threshold {
    /// The bound that `value` crosses, if any.
    pub fn crossed(&self, value: f64) -> Option<f64> {
        match (self.above, self.below) {
            (Some(a), _) if value > a => Some(a),
            (_, Some(b)) if value < b => Some(b),
            _ => None,
        }
    }

    /// True if `value` is back in the normal zone, past any hysteresis band.
    pub fn cleared_by(&self, value: f64) -> bool {
        let high_ok = match (self.above, self.clear_below) {
            (None, _) => true,
            (Some(_), Some(c)) => value < c,
            (Some(a), None) => value <= a,
        };
        let low_ok = match (self.below, self.clear_above) {
            (None, _) => true,
            (Some(_), Some(c)) => value > c,
            (Some(b), None) => value >= b,
        };
        high_ok && low_ok
    }
}

/// Where one rule stands for one device and metric.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum State {
    /// Nothing to report.
    #[default]
    Normal,
    /// The condition holds but `for` has not elapsed yet.
    Pending {
        /// When the condition started to hold.
        since: Millis,
        /// The latest value seen while pending.
        value: f64,
        /// The bound it crosses.
        threshold: f64,
    },
    /// The alert is raised.
    Raised {
        /// When the condition started to hold; names the episode.
        since: Millis,
        /// The bound that was crossed.
        threshold: f64,
    },
}

impl State {
    /// When the pending condition will have held long enough, if pending.
    pub fn deadline(&self, hold: Duration) -> Option<Millis> {
        match *self {
            State::Pending { since, .. } => Some(since.saturating_add(hold.as_millis() as Millis)),
            _ => None,
        }
    }
}

/// What the rule is told.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Input {
    /// A new reading.
    Reading(f64),
    /// Time passed without a reading; lets a pending `for` elapse.
    Tick,
}

/// Whether an alert went up or down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    /// The alert fired.
    Raised,
    /// The alert ended.
    Cleared,
}

/// A change of alert state, to be published.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transition {
    /// Raised or cleared.
    pub state: AlertState,
    /// When the episode began (the condition first held).
    pub since: Millis,
    /// When this transition happened.
    pub at: Millis,
    /// The value that caused it.
    pub value: f64,
    /// The bound that was crossed.
    pub threshold: f64,
}

impl Rule {
    /// One step of the rule: the next state and the transition to publish, if any.
    pub fn step(&self, state: State, input: Input, now: Millis) -> (State, Option<Transition>) {
        let hold = self.hold.as_millis() as Millis;
        let value = match input {
            Input::Reading(v) if v.is_nan() => return (state, None),
            Input::Reading(v) => v,
            Input::Tick => {
                return match state {
                    State::Pending {
                        since,
                        value,
                        threshold,
                    } if now.saturating_sub(since) >= hold => raise(since, now, value, threshold),
                    other => (other, None),
                };
            }
        };
        match state {
            State::Normal => match self.threshold.crossed(value) {
                None => (State::Normal, None),
                Some(threshold) if hold == 0 => raise(now, now, value, threshold),
                Some(threshold) => (
                    State::Pending {
                        since: now,
                        value,
                        threshold,
                    },
                    None,
                ),
            },
            State::Pending {
                since, threshold, ..
            } => match self.threshold.crossed(value) {
                None => (State::Normal, None),
                Some(_) if now.saturating_sub(since) >= hold => raise(since, now, value, threshold),
                Some(_) => (
                    State::Pending {
                        since,
                        value,
                        threshold,
                    },
                    None,
                ),
            },
            State::Raised { since, threshold } => {
                if self.threshold.cleared_by(value) {
                    let t = Transition {
                        state: AlertState::Cleared,
                        since,
                        at: now,
                        value,
                        threshold,
                    };
                    (State::Normal, Some(t))
                } else {
                    (state, None)
                }
            }
        }
    }
}

fn raise(since: Millis, now: Millis, value: f64, threshold: f64) -> (State, Option<Transition>) {
    let t = Transition {
        state: AlertState::Raised,
        since,
        at: now,
        value,
        threshold,
    };
    (State::Raised { since, threshold }, Some(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(threshold: Threshold, hold_ms: u64) -> Rule {
        Rule {
            name: "overheat".into(),
            filter: TopicFilter::new("sensors/+/temperature").unwrap(),
            threshold,
            hold: Duration::from_millis(hold_ms),
            severity: Severity::Critical,
        }
    }

    fn high(above: f64, clear_below: Option<f64>) -> Threshold {
        Threshold {
            above: Some(above),
            clear_below,
            ..Threshold::default()
        }
    }

    /// Feeds `(time, input)` steps and returns the transitions as (state, at) pairs.
    fn run(rule: &Rule, steps: &[(Millis, Input)]) -> Vec<(AlertState, Millis)> {
        let mut state = State::Normal;
        let mut out = Vec::new();
        for &(now, input) in steps {
            let (next, t) = rule.step(state, input, now);
            state = next;
            out.extend(t.map(|t| (t.state, t.at)));
        }
        out
    }

    /// Name, inputs at times, expected transitions at times.
    type Case<'a> = (&'a str, &'a [(Millis, Input)], &'a [(AlertState, Millis)]);

    use AlertState::{Cleared, Raised};
    use Input::{Reading as R, Tick};

    #[test]
    fn threshold_edges() {
        let no_hold = rule(high(90.0, Some(85.0)), 0);
        let cases: &[Case] = &[
            (
                "exactly at the threshold does not fire",
                &[(0, R(90.0))],
                &[],
            ),
            ("just above fires", &[(0, R(90.000_001))], &[(Raised, 0)]),
            (
                "raised once while above",
                &[(0, R(95.0)), (1, R(96.0)), (2, R(99.0))],
                &[(Raised, 0)],
            ),
            (
                "inside the band stays raised",
                &[(0, R(95.0)), (1, R(88.0)), (2, R(85.0)), (3, R(90.0))],
                &[(Raised, 0)],
            ),
            (
                "below the band clears once",
                &[(0, R(95.0)), (1, R(84.9)), (2, R(80.0))],
                &[(Raised, 0), (Cleared, 1)],
            ),
            (
                "re-raise after clear",
                &[(0, R(95.0)), (1, R(80.0)), (2, R(91.0))],
                &[(Raised, 0), (Cleared, 1), (Raised, 2)],
            ),
            (
                "NaN changes nothing",
                &[(0, R(f64::NAN)), (1, R(95.0)), (2, R(f64::NAN))],
                &[(Raised, 1)],
            ),
            (
                "band value from normal does not fire",
                &[(0, R(88.0)), (1, R(89.9))],
                &[],
            ),
        ];
        for (name, steps, expected) in cases {
            assert_eq!(run(&no_hold, steps), *expected, "{name}");
        }
    }

    #[test]
    fn without_hysteresis_clears_at_the_bound() {
        let r = rule(high(90.0, None), 0);
        assert_eq!(
            run(&r, &[(0, R(91.0)), (1, R(90.0))]),
            [(Raised, 0), (Cleared, 1)]
        );
    }

    #[test]
    fn low_side_and_band() {
        let r = rule(
            Threshold {
                below: Some(5.0),
                clear_above: Some(8.0),
                ..Threshold::default()
            },
            0,
        );
        let steps = [(0, R(5.0)), (1, R(4.0)), (2, R(8.0)), (3, R(8.1))];
        assert_eq!(run(&r, &steps), [(Raised, 1), (Cleared, 3)]);
    }

    #[test]
    fn both_sides_stay_one_episode() {
        let r = rule(
            Threshold {
                above: Some(90.0),
                below: Some(10.0),
                ..Threshold::default()
            },
            0,
        );
        // Jumping from the high side straight to the low side is still outside the range.
        let steps = [(0, R(95.0)), (1, R(5.0)), (2, R(50.0))];
        assert_eq!(run(&r, &steps), [(Raised, 0), (Cleared, 2)]);
    }

    #[test]
    fn hold_edges() {
        let r = rule(high(90.0, Some(85.0)), 10_000);
        let cases: &[Case] = &[
            (
                "held long enough fires",
                &[(0, R(95.0)), (5_000, R(95.0)), (10_000, R(95.0))],
                &[(Raised, 10_000)],
            ),
            (
                "interrupted just before it elapses",
                &[
                    (0, R(95.0)),
                    (9_999, R(89.0)),
                    (10_000, R(95.0)),
                    (19_999, R(95.0)),
                ],
                &[],
            ),
            (
                "restarts after interruption",
                &[
                    (0, R(95.0)),
                    (9_999, R(89.0)),
                    (10_000, R(95.0)),
                    (20_000, R(95.0)),
                ],
                &[(Raised, 20_000)],
            ),
            (
                "a band value interrupts too",
                &[(0, R(95.0)), (5_000, R(87.0)), (10_000, R(95.0))],
                &[],
            ),
            (
                "tick fires at the deadline",
                &[(0, R(95.0)), (9_999, Tick), (10_000, Tick)],
                &[(Raised, 10_000)],
            ),
            (
                "tick in normal does nothing",
                &[(0, R(50.0)), (50_000, Tick)],
                &[],
            ),
            (
                "time running backwards does not fire",
                &[(10_000, R(95.0)), (5_000, R(95.0)), (5_000, Tick)],
                &[],
            ),
            (
                "NaN does not interrupt",
                &[(0, R(95.0)), (5_000, R(f64::NAN)), (10_000, R(95.0))],
                &[(Raised, 10_000)],
            ),
        ];
        for (name, steps, expected) in cases {
            assert_eq!(run(&r, steps), *expected, "{name}");
        }
    }

    #[test]
    fn raised_transition_names_the_episode() {
        let r = rule(high(90.0, Some(85.0)), 10_000);
        let (s, _) = r.step(State::Normal, R(91.0), 1_000);
        let (s, t) = r.step(s, R(95.2), 11_000);
        let t = t.unwrap();
        assert_eq!(
            (t.since, t.at, t.value, t.threshold),
            (1_000, 11_000, 95.2, 90.0)
        );
        let (_, c) = r.step(s, R(70.0), 20_000);
        let c = c.unwrap();
        assert_eq!(
            (c.state, c.since, c.at, c.value),
            (Cleared, 1_000, 20_000, 70.0)
        );
    }

    #[test]
    fn deadline_of_a_pending_state() {
        let s = State::Pending {
            since: 1_000,
            value: 95.0,
            threshold: 90.0,
        };
        assert_eq!(s.deadline(Duration::from_secs(10)), Some(11_000));
        assert_eq!(State::Normal.deadline(Duration::from_secs(10)), None);
    }
}

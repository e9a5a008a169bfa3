//! Rule evaluation: pure state machines, `(rule, state, input, now) → transition`. No I/O, no
//! clock reads: time is passed in, so a rule's whole life is a table-driven test and the same
//! code replays recorded readings under virtual time (`watchpost test-rules`).
//!
//! Every kind judges a value against a [`Threshold`] and shares one life:
//!
//! ```text
//!            condition holds, `for` 0, not cooling down
//!   Normal ───────────────────────────────────────────▶ Raised ──clear condition──▶ Normal
//!     │  ▲                                                ▲  │ (cooldown starts)
//!     │  └── condition stops ── Pending ──────────────────┘  └── every `renotify`: Raised again,
//!     └──── condition holds ─▶          held for `for`,           same id, `repeat` + 1
//!                                       cooldown over
//! ```
//!
//! | kind | value judged | extra state |
//! |---|---|---|
//! | threshold | the reading | none |
//! | rate | change per second (or minute) between the oldest reading in `window` and this one | readings in the window |
//! | deviation | distance from the stream's own mean, in standard deviations (exponentially weighted over `window`) | mean, variance, count |
//! | silence | seconds since the last reading; fires after `silent_for`, or a multiple of the learned interval | last reading, mean interval |
//! | presence | fires when a device has been `offline` for its grace period | none |
//! | state | the reading is (`equals`, `in`) or is not (`not_in`) one of the given values | none |
//! | flapping | more than `changes_above` changes of value within `window` | times of the changes |
//!
//! A reading's value is a number or a state ([`Value`]). The numeric kinds (threshold, rate,
//! deviation) pass over states as they pass over NaN; state and flapping rules judge any
//! value; silence and presence rules count any reading.
//!
//! This file holds the types (a checked [`Rule`], its [`Kind`], the [`RuleState`] it keeps per
//! stream); `eval` holds the evaluation, `tests` the table-driven tests of every kind.
//!
//! Rules of the threshold family use strict bounds (a value exactly at `above` does not fire),
//! hysteresis (`clear_below`/`clear_above`) and `for`, which also elapses on an
//! [`Input::Tick`] so that an alert fires on time between readings. NaN changes nothing. Time
//! that runs backwards counts as no time passing.
//!
//! Time comes in as a [`Stamp`], one instant on two clocks (see [`crate::clock`]): every
//! duration (`for`, silence, grace, cooldown, renotify, the windows) is measured on its
//! monotonic half, so a step of the wall clock neither fires a rule early nor stalls it;
//! the documents' `since` and `at` are wall times. A step between the start of an episode
//! and its raise gives the episode a `since` counted back from the raise on the monotonic
//! clock, in the wall clock's new time. Virtual time passes one number for both halves.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::clock::Stamp;
use crate::topic::TopicFilter;
use crate::value::Value;

/// Milliseconds: since the Unix epoch on the wall clock, or on the monotonic clock (see
/// [`Stamp`]); virtual time (replays, tests) is both.
pub type Millis = u64;

/// Most readings a rate rule remembers per stream, whatever its window.
pub const MAX_RATE_POINTS: usize = 4096;

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

/// A checked rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Unique name; part of the alert topic and id.
    pub name: String,
    /// Which topics (`sensors/{device}/{metric}`, or `sensors/{device}/status` for presence)
    /// the rule watches.
    pub filter: TopicFilter,
    /// What is judged.
    pub kind: Kind,
    /// How long the condition must hold before the alert is raised (`for`).
    pub hold: Duration,
    /// Severity of the alerts the rule raises.
    pub severity: Severity,
    /// Publish the raised alert again this often while it stays raised.
    pub renotify: Option<Duration>,
    /// After a clear, do not raise again for this long (against flapping).
    pub cooldown: Option<Duration>,
    /// Overrides `uplink.forward` for this rule's alerts.
    pub forward: Option<bool>,
    /// Copied into every alert document of the rule.
    pub labels: BTreeMap<String, String>,
}

/// What a rule judges.
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// The reading itself.
    Threshold(Threshold),
    /// The rate of change over a window.
    Rate {
        /// Bounds on the rate.
        threshold: Threshold,
        /// Seconds per unit of the rate: 1 (per second) or 60 (per minute).
        per_seconds: f64,
        /// How far back the rate looks.
        window: Duration,
    },
    /// Distance from the stream's own recent mean, in standard deviations.
    Deviation {
        /// Bounds on that distance (`above` = N standard deviations).
        threshold: Threshold,
        /// Time constant of the exponentially weighted mean and variance.
        window: Duration,
        /// Readings needed before the stream is judged.
        min_samples: u32,
    },
    /// No reading for a while.
    Silence {
        /// How long is too long.
        after: SilenceAfter,
        /// Per metric, or per device (any matching metric counts).
        scope: Scope,
    },
    /// A device that announced `offline` (its last will) and did not come back in time.
    Presence {
        /// How long a device may be offline before the alert fires.
        grace: Duration,
    },
    /// The reading is, or is not, one of some values (a leak is `true`, a door is `open`).
    State(StateTest),
    /// The value changes too often: a chattering contact, a relay cycling.
    Flapping {
        /// Fires when more changes than this happen within `window`.
        changes: u32,
        /// How far back changes count.
        window: Duration,
    },
}

/// What a state rule asks of a reading.
#[derive(Debug, Clone, PartialEq)]
pub enum StateTest {
    /// Holds when the value is this one.
    Equals(Value),
    /// Holds when the value is one of these.
    In(Vec<Value>),
    /// Holds when the value is none of these.
    NotIn(Vec<Value>),
}

impl StateTest {
    /// True if `value` meets the test. Text compares without regard to ASCII case.
    pub fn holds(&self, value: &Value) -> bool {
        let same = |a: &Value| match (a, value) {
            (Value::Text(a), Value::Text(b)) => a.eq_ignore_ascii_case(b),
            _ => a == value,
        };
        match self {
            StateTest::Equals(v) => same(v),
            StateTest::In(vs) => vs.iter().any(same),
            StateTest::NotIn(vs) => !vs.iter().any(same),
        }
    }

    /// The values the test names.
    pub fn values(&self) -> &[Value] {
        match self {
            StateTest::Equals(v) => std::slice::from_ref(v),
            StateTest::In(vs) | StateTest::NotIn(vs) => vs,
        }
    }
}

/// When a silence rule fires.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SilenceAfter {
    /// After a fixed time without readings.
    Fixed(Duration),
    /// After `factor` times the stream's own mean reporting interval, once learned from
    /// `min_samples` intervals.
    Learned {
        /// Multiple of the mean interval.
        factor: f64,
        /// Intervals needed before the rule judges.
        min_samples: u32,
    },
}

/// What a silence rule watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Each matching metric of each device on its own.
    Metric,
    /// Each device: a reading of any matching metric counts.
    Device,
}

impl Kind {
    /// The name used in configuration and documents.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Threshold(_) => "threshold",
            Kind::Rate { .. } => "rate",
            Kind::Deviation { .. } => "deviation",
            Kind::Silence { .. } => "silence",
            Kind::Presence { .. } => "presence",
            Kind::State(_) => "state",
            Kind::Flapping { .. } => "flapping",
        }
    }

    /// True if the rule judges numbers only (states pass it by).
    pub fn numeric(&self) -> bool {
        matches!(
            self,
            Kind::Threshold(_) | Kind::Rate { .. } | Kind::Deviation { .. }
        )
    }

    /// True if the rule keeps one state per device rather than per metric.
    pub fn per_device(&self) -> bool {
        matches!(
            self,
            Kind::Presence { .. }
                | Kind::Silence {
                    scope: Scope::Device,
                    ..
                }
        )
    }
}

/// Bounds of the threshold family. At least one of `above` and `below` is set; the clear
/// bounds lie on the normal side of their bound (checked by `config`).
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

/// Where the alert of one rule stands for one stream.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum State {
    /// Nothing to report.
    #[default]
    Normal,
    /// The condition holds; waiting for `for` (or a cooldown, or a grace period) to pass.
    /// The latest value judged is [`RuleState::value`].
    Pending {
        /// When the condition started to hold.
        since: Stamp,
        /// The bound it crosses (none for a state rule).
        threshold: Option<f64>,
    },
    /// The alert is raised.
    Raised {
        /// When the condition started to hold; its wall half names the episode.
        since: Stamp,
        /// The bound that was crossed (none for a state rule).
        threshold: Option<f64>,
    },
}

/// What a rule remembers besides [`State`].
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Memory {
    /// Nothing.
    #[default]
    None,
    /// Readings in the rate window, oldest first, at monotonic times.
    Rate(VecDeque<(Millis, f64)>),
    /// Exponentially weighted mean and variance.
    Deviation {
        /// Mean.
        mean: f64,
        /// Variance.
        var: f64,
        /// Readings seen.
        n: u32,
        /// Monotonic time of the last reading.
        last: Millis,
    },
    /// Changes of value, for flapping; boxed, so that every other rule's memory stays as
    /// small as it was (each stream of each device keeps one per rule).
    Flapping(Box<Changes>),
    /// Reporting rhythm.
    Silence {
        /// Time of the last reading; the start of a silence.
        last: Option<Stamp>,
        /// Mean interval between readings, ms (exponentially weighted).
        interval: f64,
        /// Intervals seen.
        samples: u32,
    },
}

/// What a flapping rule remembers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Changes {
    /// The last value seen.
    pub last: Option<Value>,
    /// When the value changed (monotonic), oldest first, within the window.
    pub at: VecDeque<Millis>,
}

/// The whole state of one rule for one stream (or device).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RuleState {
    /// Normal, pending or raised.
    pub core: State,
    /// Kind-specific memory.
    pub memory: Memory,
    /// No raise before this monotonic time (a cooldown after the last clear).
    pub quiet_until: Millis,
    /// When the alert was last published while raised (monotonic).
    pub notified_at: Millis,
    /// Renotifications of the current episode so far.
    pub repeats: u32,
    /// The latest value judged (what a raise and a renotification report).
    pub value: Value,
    /// Kept by whoever drives the rule (ingest): the earliest monotonic time for which a
    /// wake-up is already scheduled, 0 for none, so that a state that goes pending again and
    /// again (a chattering contact under `for`) does not schedule one wake-up per change.
    pub scheduled: Millis,
}

/// What a rule is told.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Input<'a> {
    /// A new reading of the stream.
    Reading(&'a Value),
    /// Time passed without a reading; lets deadlines (`for`, silence, grace, cooldown,
    /// renotify) fire.
    Tick,
    /// The device said it is online (`true`) or offline (`false`, usually its last will).
    Presence(bool),
}

/// Whether an alert went up or down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    /// The alert fired (or, with `repeat` > 0, is still raised).
    Raised,
    /// The alert ended.
    Cleared,
}

/// A change of alert state, to be published.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// Raised or cleared.
    pub state: AlertState,
    /// When the episode began (the condition first held), wall clock.
    pub since: Millis,
    /// When this transition happened, wall clock.
    pub at: Millis,
    /// The value that caused it.
    pub value: Value,
    /// The bound that was crossed (none for a state rule).
    pub threshold: Option<f64>,
    /// 0 for the raise itself; 1, 2, ... for renotifications of the same episode.
    pub repeat: u32,
}

mod eval;
#[cfg(test)]
mod tests;

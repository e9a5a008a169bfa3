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
//! Rules of the threshold family use strict bounds (a value exactly at `above` does not fire),
//! hysteresis (`clear_below`/`clear_above`) and `for`, which also elapses on an
//! [`Input::Tick`] so that an alert fires on time between readings. NaN changes nothing. Time
//! that runs backwards counts as no time passing.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::topic::TopicFilter;
use crate::value::Value;

/// Milliseconds since the Unix epoch: the clock every rule runs on.
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
        since: Millis,
        /// The bound it crosses (none for a state rule).
        threshold: Option<f64>,
    },
    /// The alert is raised.
    Raised {
        /// When the condition started to hold; names the episode.
        since: Millis,
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
    /// Readings in the rate window, oldest first.
    Rate(VecDeque<(Millis, f64)>),
    /// Exponentially weighted mean and variance.
    Deviation {
        /// Mean.
        mean: f64,
        /// Variance.
        var: f64,
        /// Readings seen.
        n: u32,
        /// Time of the last reading.
        last: Millis,
    },
    /// Changes of value, for flapping.
    Flapping {
        /// The last value seen.
        last: Option<Value>,
        /// When the value changed, oldest first, within the window.
        changes: VecDeque<Millis>,
    },
    /// Reporting rhythm.
    Silence {
        /// Time of the last reading.
        last: Option<Millis>,
        /// Mean interval between readings, ms (exponentially weighted).
        interval: f64,
        /// Intervals seen.
        samples: u32,
    },
}

/// The whole state of one rule for one stream (or device).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RuleState {
    /// Normal, pending or raised.
    pub core: State,
    /// Kind-specific memory.
    pub memory: Memory,
    /// No raise before this time (a cooldown after the last clear).
    pub quiet_until: Millis,
    /// When the alert was last published while raised.
    pub notified_at: Millis,
    /// Renotifications of the current episode so far.
    pub repeats: u32,
    /// The latest value judged (what a raise and a renotification report).
    pub value: Value,
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
    /// When the episode began (the condition first held).
    pub since: Millis,
    /// When this transition happened.
    pub at: Millis,
    /// The value that caused it.
    pub value: Value,
    /// The bound that was crossed (none for a state rule).
    pub threshold: Option<f64>,
    /// 0 for the raise itself; 1, 2, ... for renotifications of the same episode.
    pub repeat: u32,
}

fn ms(d: Duration) -> Millis {
    d.as_millis() as Millis
}

impl Rule {
    /// A fresh state for this rule.
    pub fn new_state(&self) -> RuleState {
        let memory = match &self.kind {
            Kind::Rate { .. } => Memory::Rate(VecDeque::new()),
            Kind::Deviation { .. } => Memory::Deviation {
                mean: 0.0,
                var: 0.0,
                n: 0,
                last: 0,
            },
            Kind::Silence { .. } => Memory::Silence {
                last: None,
                interval: 0.0,
                samples: 0,
            },
            Kind::Flapping { .. } => Memory::Flapping {
                last: None,
                changes: VecDeque::new(),
            },
            Kind::Threshold(_) | Kind::Presence { .. } | Kind::State(_) => Memory::None,
        };
        RuleState {
            memory,
            ..RuleState::default()
        }
    }

    /// How long a pending condition must hold: `for`, or the grace period of a presence rule.
    fn hold_ms(&self) -> Millis {
        match self.kind {
            Kind::Presence { grace } => ms(grace),
            _ => ms(self.hold),
        }
    }

    /// One step of the rule; returns the transition to publish, if any.
    pub fn step(&self, s: &mut RuleState, input: Input<'_>, now: Millis) -> Option<Transition> {
        match (&self.kind, input) {
            (_, Input::Tick) => self.tick(s, now),
            // The numeric kinds pass over what they cannot judge: NaN and states.
            (kind, Input::Reading(v))
                if kind.numeric() && v.as_number().is_none_or(f64::is_nan) =>
            {
                None
            }
            (Kind::Threshold(th), Input::Reading(v)) => {
                let n = v.as_number()?;
                self.judge(s, Verdict::of(th, n), v.clone(), now)
            }
            (
                Kind::Rate {
                    threshold,
                    per_seconds,
                    window,
                },
                Input::Reading(v),
            ) => {
                let rate = rate_of_change(
                    &mut s.memory,
                    v.as_number()?,
                    now,
                    ms(*window),
                    *per_seconds,
                )?;
                self.judge(s, Verdict::of(threshold, rate), Value::Number(rate), now)
            }
            (
                Kind::Deviation {
                    threshold,
                    window,
                    min_samples,
                },
                Input::Reading(v),
            ) => {
                let z = deviation(
                    &mut s.memory,
                    v.as_number()?,
                    now,
                    ms(*window),
                    *min_samples,
                )?;
                self.judge(s, Verdict::of(threshold, z), Value::Number(z), now)
            }
            (Kind::State(test), Input::Reading(v)) => {
                let holds = test.holds(v);
                let verdict = Verdict {
                    fires: holds.then_some(None),
                    clears: !holds,
                };
                self.judge(s, verdict, v.clone(), now)
            }
            (Kind::Flapping { changes, window }, Input::Reading(v)) => {
                let n = count_changes(&mut s.memory, Some(v), now, ms(*window));
                self.judge(s, flapping(*changes, n), Value::Number(n as f64), now)
            }
            (Kind::Silence { .. }, Input::Reading(_)) => {
                if let Memory::Silence {
                    last,
                    interval,
                    samples,
                } = &mut s.memory
                {
                    if let Some(prev) = *last {
                        let gap = now.saturating_sub(prev) as f64;
                        *samples = samples.saturating_add(1);
                        // A running mean at first, then exponentially weighted (about 20).
                        let alpha = (1.0 / f64::from(*samples)).max(0.05);
                        *interval += alpha * (gap - *interval);
                    }
                    *last = Some(last.map_or(now, |l| l.max(now)));
                }
                match s.core {
                    State::Raised { since, threshold } => {
                        let silent = now.saturating_sub(since) as f64 / 1000.0;
                        Some(clear(s, self, since, now, Value::Number(silent), threshold))
                    }
                    _ => None,
                }
            }
            (Kind::Presence { grace }, Input::Presence(false)) => {
                if s.core == State::Normal {
                    s.core = State::Pending {
                        since: now,
                        threshold: Some(grace.as_secs_f64()),
                    };
                    s.value = Value::Number(0.0);
                    return self.try_raise(s, now);
                }
                None
            }
            (Kind::Presence { .. }, Input::Presence(true) | Input::Reading(_)) => match s.core {
                State::Pending { .. } => {
                    s.core = State::Normal;
                    None
                }
                State::Raised { since, threshold } => {
                    let offline = now.saturating_sub(since) as f64 / 1000.0;
                    Some(clear(
                        s,
                        self,
                        since,
                        now,
                        Value::Number(offline),
                        threshold,
                    ))
                }
                State::Normal => None,
            },
            (_, Input::Presence(_)) => None,
        }
    }

    /// The alert machine on a judged value.
    fn judge(
        &self,
        s: &mut RuleState,
        verdict: Verdict,
        value: Value,
        now: Millis,
    ) -> Option<Transition> {
        s.value = value;
        match s.core {
            State::Normal => {
                let threshold = verdict.fires?;
                s.core = State::Pending {
                    since: now,
                    threshold,
                };
                self.try_raise(s, now)
            }
            State::Pending { .. } => match verdict.fires {
                None => {
                    s.core = State::Normal;
                    None
                }
                Some(_) => self.try_raise(s, now),
            },
            State::Raised { since, threshold } => verdict.clears.then(|| {
                let value = s.value.clone();
                clear(s, self, since, now, value, threshold)
            }),
        }
    }

    /// Raises a pending alert if it has held long enough and no cooldown is running.
    fn try_raise(&self, s: &mut RuleState, now: Millis) -> Option<Transition> {
        let State::Pending { since, threshold } = s.core else {
            return None;
        };
        if now.saturating_sub(since) < self.hold_ms() || now < s.quiet_until {
            return None;
        }
        s.core = State::Raised { since, threshold };
        s.notified_at = now;
        s.repeats = 0;
        Some(Transition {
            state: AlertState::Raised,
            since,
            at: now,
            value: s.value.clone(),
            threshold,
            repeat: 0,
        })
    }

    fn tick(&self, s: &mut RuleState, now: Millis) -> Option<Transition> {
        if let Kind::Flapping { changes, window } = self.kind {
            // Changes leave the window as time passes: that alone may end the condition.
            let n = count_changes(&mut s.memory, None, now, ms(window));
            let verdict = flapping(changes, n);
            match s.core {
                State::Pending { .. } if verdict.fires.is_none() => {
                    s.core = State::Normal;
                    return None;
                }
                State::Raised { since, threshold } if verdict.clears => {
                    let value = Value::Number(n as f64);
                    s.value = value.clone();
                    return Some(clear(s, self, since, now, value, threshold));
                }
                _ => {}
            }
        }
        match s.core {
            State::Pending { .. } => self.try_raise(s, now),
            State::Raised { since, threshold } => {
                let every = ms(self.renotify?);
                if now.saturating_sub(s.notified_at) < every {
                    return None;
                }
                s.notified_at = now;
                s.repeats += 1;
                let value = match self.kind {
                    Kind::Silence { .. } | Kind::Presence { .. } => {
                        Value::Number(now.saturating_sub(since) as f64 / 1000.0)
                    }
                    _ => s.value.clone(),
                };
                Some(Transition {
                    state: AlertState::Raised,
                    since,
                    at: now,
                    value,
                    threshold,
                    repeat: s.repeats,
                })
            }
            State::Normal => {
                let Kind::Silence { after, .. } = &self.kind else {
                    return None;
                };
                let Memory::Silence {
                    last: Some(last), ..
                } = s.memory
                else {
                    return None;
                };
                let limit = silence_limit(after, &s.memory)?;
                let silent = now.saturating_sub(last);
                if silent < limit || now < s.quiet_until {
                    return None;
                }
                let threshold = Some(limit as f64 / 1000.0);
                s.core = State::Raised {
                    since: last,
                    threshold,
                };
                s.notified_at = now;
                s.repeats = 0;
                Some(Transition {
                    state: AlertState::Raised,
                    since: last,
                    at: now,
                    value: Value::Number(silent as f64 / 1000.0),
                    threshold,
                    repeat: 0,
                })
            }
        }
    }

    /// The next time at which [`Input::Tick`] may change something, if any.
    pub fn deadline(&self, s: &RuleState) -> Option<Millis> {
        let own = match s.core {
            State::Pending { since, .. } => {
                Some(since.saturating_add(self.hold_ms()).max(s.quiet_until))
            }
            State::Raised { .. } => self.renotify.map(|r| s.notified_at.saturating_add(ms(r))),
            State::Normal => {
                let Kind::Silence { after, .. } = &self.kind else {
                    return None;
                };
                let Memory::Silence {
                    last: Some(last), ..
                } = s.memory
                else {
                    return None;
                };
                Some(
                    last.saturating_add(silence_limit(after, &s.memory)?)
                        .max(s.quiet_until),
                )
            }
        };
        // A flapping condition ends when its oldest change leaves the window.
        let expiry = match (&self.kind, &s.memory, s.core) {
            (_, _, State::Normal) => None,
            (Kind::Flapping { window, .. }, Memory::Flapping { changes, .. }, _) => changes
                .front()
                .map(|t| t.saturating_add(ms(*window)).saturating_add(1)),
            _ => None,
        };
        match (own, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What one judged value says about a rule's condition.
struct Verdict {
    /// `Some` if the condition holds, with the bound crossed (none for a state rule).
    fires: Option<Option<f64>>,
    /// True if the value ends a raised alert (past any hysteresis band).
    clears: bool,
}

impl Verdict {
    fn of(th: &Threshold, v: f64) -> Verdict {
        Verdict {
            fires: th.crossed(v).map(Some),
            clears: th.cleared_by(v),
        }
    }
}

fn flapping(limit: u32, changes: usize) -> Verdict {
    let over = changes > limit as usize;
    Verdict {
        fires: over.then_some(Some(f64::from(limit))),
        clears: !over,
    }
}

/// Records a reading (if any) in a flapping rule's memory and returns the changes within
/// `window` before `now`. A value different from the last one is a change; the first value
/// is not.
fn count_changes(memory: &mut Memory, value: Option<&Value>, now: Millis, window: Millis) -> usize {
    let Memory::Flapping { last, changes } = memory else {
        return 0;
    };
    if let Some(v) = value {
        if last.as_ref().is_some_and(|l| l != v) {
            changes.push_back(now.max(changes.back().copied().unwrap_or(0)));
        }
        if last.as_ref() != Some(v) {
            *last = Some(v.clone());
        }
    }
    while changes
        .front()
        .is_some_and(|&t| now.saturating_sub(t) > window)
    {
        changes.pop_front();
    }
    while changes.len() > MAX_RATE_POINTS {
        changes.pop_front();
    }
    changes.len()
}

fn clear(
    s: &mut RuleState,
    rule: &Rule,
    since: Millis,
    now: Millis,
    value: Value,
    threshold: Option<f64>,
) -> Transition {
    s.core = State::Normal;
    s.quiet_until = rule.cooldown.map_or(0, |c| now.saturating_add(ms(c)));
    s.repeats = 0;
    Transition {
        state: AlertState::Cleared,
        since,
        at: now,
        value,
        threshold,
        repeat: 0,
    }
}

/// How long a silence rule waits, once it knows.
fn silence_limit(after: &SilenceAfter, memory: &Memory) -> Option<Millis> {
    match (after, memory) {
        (SilenceAfter::Fixed(d), _) => Some(ms(*d)),
        (
            SilenceAfter::Learned {
                factor,
                min_samples,
            },
            Memory::Silence {
                interval, samples, ..
            },
        ) => (*samples >= *min_samples && *interval > 0.0)
            .then(|| (interval * factor).ceil() as Millis),
        _ => None,
    }
}

/// Rate of change from the oldest reading within `window` to this one, per `per_seconds`.
/// A reading older than the newest one remembered is not used for rates.
fn rate_of_change(
    memory: &mut Memory,
    v: f64,
    now: Millis,
    window: Millis,
    per_seconds: f64,
) -> Option<f64> {
    let Memory::Rate(points) = memory else {
        return None;
    };
    if points.back().is_some_and(|&(t, _)| now < t) {
        return None;
    }
    points.push_back((now, v));
    while points.len() > 1
        && points
            .front()
            .is_some_and(|&(t, _)| now.saturating_sub(t) > window)
    {
        points.pop_front();
    }
    while points.len() > MAX_RATE_POINTS {
        points.pop_front();
    }
    if points.len() < 2 {
        return None;
    }
    let &(t0, v0) = points.front()?;
    let dt = now.saturating_sub(t0) as f64 / 1000.0;
    (dt > 0.0).then(|| (v - v0) / dt * per_seconds)
}

/// Distance of `v` from the mean in standard deviations, judged before `v` joins the mean.
fn deviation(
    memory: &mut Memory,
    v: f64,
    now: Millis,
    window: Millis,
    min_samples: u32,
) -> Option<f64> {
    let Memory::Deviation { mean, var, n, last } = memory else {
        return None;
    };
    let z = (*n >= min_samples && *var > 0.0).then(|| (v - *mean).abs() / var.sqrt());
    let dt = now.saturating_sub(*last) as f64;
    let weighted = 1.0 - (-dt / window.max(1) as f64).exp();
    let alpha = if *n == 0 {
        1.0
    } else {
        weighted.max(1.0 / f64::from(*n + 1))
    };
    let diff = v - *mean;
    let incr = alpha * diff;
    *mean += incr;
    *var = (1.0 - alpha) * (*var + diff * incr);
    *n = n.saturating_add(1);
    *last = (*last).max(now);
    z
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(kind: Kind, hold_ms: u64) -> Rule {
        Rule {
            name: "r".into(),
            filter: TopicFilter::new("sensors/+/temperature").unwrap(),
            kind,
            hold: Duration::from_millis(hold_ms),
            severity: Severity::Critical,
            renotify: None,
            cooldown: None,
            forward: None,
            labels: BTreeMap::new(),
        }
    }

    fn high(above: f64, clear_below: Option<f64>) -> Threshold {
        Threshold {
            above: Some(above),
            clear_below,
            ..Threshold::default()
        }
    }

    fn threshold(above: f64, clear_below: Option<f64>, hold_ms: u64) -> Rule {
        rule(Kind::Threshold(high(above, clear_below)), hold_ms)
    }

    /// Feeds `(time, input)` steps; returns the transitions as (state, at, repeat).
    fn run(rule: &Rule, steps: &[(Millis, Input)]) -> Vec<(AlertState, Millis, u32)> {
        let mut state = rule.new_state();
        steps
            .iter()
            .filter_map(|&(now, input)| rule.step(&mut state, input, now))
            .map(|t| (t.state, t.at, t.repeat))
            .collect()
    }

    /// Name, inputs at times, expected transitions at times.
    type Case<'a> = (
        &'a str,
        &'a [(Millis, Input<'a>)],
        &'a [(AlertState, Millis)],
    );

    fn check(rule: &Rule, cases: &[Case]) {
        for (name, steps, expected) in cases {
            let got: Vec<_> = run(rule, steps)
                .into_iter()
                .map(|(s, at, _)| (s, at))
                .collect();
            assert_eq!(got, *expected, "{name}");
        }
    }

    use AlertState::{Cleared, Raised};
    use Input::{Presence as P, Tick};

    /// A numeric reading (leaked: test inputs live for the whole test).
    #[allow(non_snake_case)]
    fn R(v: f64) -> Input<'static> {
        Input::Reading(Box::leak(Box::new(Value::Number(v))))
    }

    /// A state reading: `true`/`false` or a word, read as a payload would be.
    #[allow(non_snake_case)]
    fn S(text: &str) -> Input<'static> {
        Input::Reading(Box::leak(Box::new(Value::parse(text).unwrap())))
    }

    fn val(text: &str) -> Value {
        Value::parse(text).unwrap()
    }

    #[test]
    fn threshold_edges() {
        check(
            &threshold(90.0, Some(85.0), 0),
            &[
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
                (
                    "time running backwards still judges the value",
                    &[(10, R(95.0)), (5, R(80.0))],
                    &[(Raised, 10), (Cleared, 5)],
                ),
            ],
        );
    }

    #[test]
    fn without_hysteresis_clears_at_the_bound() {
        check(
            &threshold(90.0, None, 0),
            &[(
                "clears at 90",
                &[(0, R(91.0)), (1, R(90.0))],
                &[(Raised, 0), (Cleared, 1)],
            )],
        );
    }

    #[test]
    fn low_side_and_both_sides() {
        let low = rule(
            Kind::Threshold(Threshold {
                below: Some(5.0),
                clear_above: Some(8.0),
                ..Threshold::default()
            }),
            0,
        );
        check(
            &low,
            &[(
                "low side with band",
                &[(0, R(5.0)), (1, R(4.0)), (2, R(8.0)), (3, R(8.1))],
                &[(Raised, 1), (Cleared, 3)],
            )],
        );
        let range = rule(
            Kind::Threshold(Threshold {
                above: Some(90.0),
                below: Some(10.0),
                ..Threshold::default()
            }),
            0,
        );
        check(
            &range,
            &[(
                "high then low is one episode",
                &[(0, R(95.0)), (1, R(5.0)), (2, R(50.0))],
                &[(Raised, 0), (Cleared, 2)],
            )],
        );
    }

    #[test]
    fn hold_edges() {
        check(
            &threshold(90.0, Some(85.0), 10_000),
            &[
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
            ],
        );
    }

    fn state_rule(test: StateTest, hold_ms: u64) -> Rule {
        rule(Kind::State(test), hold_ms)
    }

    #[test]
    fn state_rules_equals_in_and_not_in() {
        let leak = state_rule(StateTest::Equals(val("true")), 0);
        check(
            &leak,
            &[
                ("a leak raises at once", &[(0, S("true"))], &[(Raised, 0)]),
                (
                    "raised once while wet, cleared once when dry",
                    &[
                        (0, S("true")),
                        (1, S("true")),
                        (2, S("false")),
                        (3, S("false")),
                    ],
                    &[(Raised, 0), (Cleared, 2)],
                ),
                ("dry never raises", &[(0, S("false")), (5, S("false"))], &[]),
                (
                    "a number is not the state, and NaN changes nothing",
                    &[(0, R(1.0)), (1, R(f64::NAN)), (2, S("true"))],
                    &[(Raised, 2)],
                ),
                (
                    "a text state is not the boolean",
                    &[(0, S("wet")), (1, S("on"))],
                    &[],
                ),
            ],
        );
        let door = state_rule(StateTest::Equals(val("open")), 600_000);
        check(
            &door,
            &[
                (
                    "open for ten minutes raises, on a tick",
                    &[
                        (0, S("OPEN")),
                        (599_999, Tick),
                        (600_000, Tick),
                        (700_000, S("closed")),
                    ],
                    &[(Raised, 600_000), (Cleared, 700_000)],
                ),
                (
                    "closed before the ten minutes: nothing",
                    &[(0, S("open")), (300_000, S("closed")), (600_000, Tick)],
                    &[],
                ),
                (
                    "closing and opening again starts `for` over",
                    &[
                        (0, S("open")),
                        (300_000, S("closed")),
                        (301_000, S("open")),
                        (600_000, Tick),
                        (901_000, Tick),
                    ],
                    &[(Raised, 901_000)],
                ),
            ],
        );
        let mode = state_rule(StateTest::In(vec![val("heat"), val("Boost")]), 0);
        check(
            &mode,
            &[(
                "in: any of the values, text without regard to case",
                &[
                    (0, S("off")),
                    (1, S("boost")),
                    (2, S("HEAT")),
                    (3, S("off")),
                ],
                &[(Raised, 1), (Cleared, 3)],
            )],
        );
        let normal = state_rule(StateTest::NotIn(vec![val("ok"), val("idle")]), 0);
        check(
            &normal,
            &[(
                "not_in: anything else raises",
                &[
                    (0, S("ok")),
                    (1, S("fault")),
                    (2, S("error")),
                    (3, S("idle")),
                ],
                &[(Raised, 1), (Cleared, 3)],
            )],
        );
    }

    #[test]
    fn state_alerts_carry_the_state_and_no_threshold() {
        let r = state_rule(StateTest::Equals(val("open")), 0);
        let mut s = r.new_state();
        let t = r.step(&mut s, S("Open"), 5).unwrap();
        assert_eq!((t.value, t.threshold), (val("open"), None));
        let c = r.step(&mut s, S("closed"), 9).unwrap();
        assert_eq!((c.state, c.since, c.value), (Cleared, 5, val("closed")));
    }

    #[test]
    fn state_rules_renotify_and_cool_down() {
        let mut r = state_rule(StateTest::Equals(val("true")), 0);
        r.renotify = Some(Duration::from_secs(60));
        r.cooldown = Some(Duration::from_secs(30));
        let got = run(
            &r,
            &[
                (0, S("true")),
                (59_000, Tick),
                (60_000, Tick),
                (120_000, Tick),
                (130_000, S("false")),
                (140_000, S("true")),
                (160_000, Tick),
                (170_000, Tick),
            ],
        );
        assert_eq!(
            got,
            [
                (Raised, 0, 0),
                (Raised, 60_000, 1),
                (Raised, 120_000, 2),
                (Cleared, 130_000, 0),
                (Raised, 160_000, 0),
            ],
            "renotify counts up; after the clear the cooldown holds the next raise back to 160 s"
        );
    }

    #[test]
    fn flapping_counts_changes_within_the_window() {
        let r = rule(
            Kind::Flapping {
                changes: 3,
                window: Duration::from_secs(60),
            },
            0,
        );
        check(
            &r,
            &[
                (
                    "three changes are not more than three",
                    &[
                        (0, S("on")),
                        (1_000, S("off")),
                        (2_000, S("on")),
                        (3_000, S("off")),
                    ],
                    &[],
                ),
                (
                    "the fourth change within a minute raises",
                    &[
                        (0, S("on")),
                        (1_000, S("off")),
                        (2_000, S("on")),
                        (3_000, S("off")),
                        (4_000, S("on")),
                    ],
                    &[(Raised, 4_000)],
                ),
                (
                    "the same value again is no change",
                    &[
                        (0, S("on")),
                        (1_000, S("on")),
                        (2_000, S("off")),
                        (3_000, S("off")),
                        (4_000, S("on")),
                        (5_000, S("on")),
                    ],
                    &[],
                ),
                (
                    "changes spread over more than the window do not raise",
                    &[
                        (0, S("on")),
                        (30_000, S("off")),
                        (60_000, S("on")),
                        (90_000, S("off")),
                        (120_000, S("on")),
                    ],
                    &[],
                ),
                (
                    "it clears when changes leave the window, on a tick",
                    &[
                        (0, S("on")),
                        (1_000, S("off")),
                        (2_000, S("on")),
                        (3_000, S("off")),
                        (4_000, S("on")),
                        (61_000, Tick),
                        (61_001, Tick),
                    ],
                    &[(Raised, 4_000), (Cleared, 61_001)],
                ),
            ],
        );
        let mut s = r.new_state();
        let mut last = None;
        for (i, v) in ["on", "off", "on", "off", "on"].iter().enumerate() {
            last = r.step(&mut s, S(v), i as Millis * 1_000).or(last);
        }
        let t = last.unwrap();
        assert_eq!((t.value, t.threshold), (Value::Number(4.0), Some(3.0)));
        assert_eq!(r.deadline(&s), Some(61_001), "when the first change leaves");
    }

    #[test]
    fn numeric_rules_pass_states_by_and_silence_counts_them() {
        let hot = threshold(90.0, None, 0);
        check(
            &hot,
            &[(
                "a state neither raises nor clears a threshold rule",
                &[(0, S("open")), (1, R(95.0)), (2, S("closed")), (3, R(80.0))],
                &[(Raised, 1), (Cleared, 3)],
            )],
        );
        let quiet = rule(
            Kind::Silence {
                after: SilenceAfter::Fixed(Duration::from_secs(60)),
                scope: Scope::Metric,
            },
            0,
        );
        check(
            &quiet,
            &[(
                "a state reading is a sign of life",
                &[
                    (0, S("closed")),
                    (50_000, S("closed")),
                    (100_000, Tick),
                    (111_000, Tick),
                ],
                &[(Raised, 111_000)],
            )],
        );
    }

    #[test]
    fn raised_transition_names_the_episode() {
        let r = threshold(90.0, Some(85.0), 10_000);
        let mut s = r.new_state();
        assert_eq!(r.step(&mut s, R(91.0), 1_000), None);
        let t = r.step(&mut s, R(95.2), 11_000).unwrap();
        assert_eq!(
            (t.since, t.at, t.value, t.threshold),
            (1_000, 11_000, Value::Number(95.2), Some(90.0))
        );
        let c = r.step(&mut s, R(70.0), 20_000).unwrap();
        assert_eq!(
            (c.state, c.since, c.at, c.value),
            (Cleared, 1_000, 20_000, Value::Number(70.0))
        );
    }

    #[test]
    fn rate_of_change_per_minute() {
        // More than 2 °C per minute up, over a 60 s window.
        let r = rule(
            Kind::Rate {
                threshold: Threshold {
                    above: Some(2.0),
                    ..Threshold::default()
                },
                per_seconds: 60.0,
                window: Duration::from_secs(60),
            },
            0,
        );
        check(
            &r,
            &[
                ("one reading has no rate", &[(0, R(20.0))], &[]),
                (
                    "exactly 2 per minute does not fire",
                    &[(0, R(20.0)), (30_000, R(21.0))],
                    &[],
                ),
                (
                    "faster fires, slower clears",
                    &[
                        (0, R(20.0)),
                        (30_000, R(21.5)),
                        (60_000, R(23.0)),
                        (90_000, R(23.1)),
                    ],
                    &[(Raised, 30_000), (Cleared, 90_000)],
                ),
                (
                    "readings outside the window do not count",
                    &[(0, R(0.0)), (120_000, R(20.0)), (121_000, R(20.0))],
                    &[],
                ),
                (
                    "a reading from the past is not used",
                    &[(10_000, R(20.0)), (5_000, R(99.0)), (20_000, R(20.1))],
                    &[],
                ),
                (
                    "NaN is skipped",
                    &[(0, R(20.0)), (10_000, R(f64::NAN)), (20_000, R(20.1))],
                    &[],
                ),
            ],
        );
    }

    #[test]
    fn rate_below_catches_a_fall() {
        let r = rule(
            Kind::Rate {
                threshold: Threshold {
                    below: Some(-1.0),
                    ..Threshold::default()
                },
                per_seconds: 1.0,
                window: Duration::from_secs(10),
            },
            0,
        );
        check(
            &r,
            &[(
                "a fall of 5 per second",
                &[(0, R(100.0)), (1_000, R(95.0))],
                &[(Raised, 1_000)],
            )],
        );
    }

    #[test]
    fn deviation_from_the_streams_own_behaviour() {
        let r = rule(
            Kind::Deviation {
                threshold: Threshold {
                    above: Some(4.0),
                    ..Threshold::default()
                },
                window: Duration::from_secs(600),
                min_samples: 10,
            },
            0,
        );
        let mut steps: Vec<(Millis, Input)> = (0..40)
            .map(|i| (i * 1000, R(20.0 + if i % 2 == 0 { 0.5 } else { -0.5 })))
            .collect();
        let quiet = run(&r, &steps);
        assert!(quiet.is_empty(), "normal noise does not fire: {quiet:?}");
        steps.push((40_000, R(30.0)));
        steps.push((41_000, R(20.2)));
        assert_eq!(run(&r, &steps), [(Raised, 40_000, 0), (Cleared, 41_000, 0)]);
        // Too few samples: not judged.
        assert!(run(&r, &[(0, R(20.0)), (1_000, R(21.0)), (2_000, R(500.0))]).is_empty());
        // A constant signal has no spread to measure against: not judged.
        let flat: Vec<_> = (0..20)
            .map(|i| (i * 1000, R(7.0)))
            .chain([(20_000, R(8.0))])
            .collect();
        assert!(run(&r, &flat).is_empty());
    }

    #[test]
    fn silence_fixed_and_learned() {
        let fixed = rule(
            Kind::Silence {
                after: SilenceAfter::Fixed(Duration::from_secs(60)),
                scope: Scope::Metric,
            },
            0,
        );
        check(
            &fixed,
            &[
                ("never reported: nothing to miss", &[(100_000, Tick)], &[]),
                (
                    "quiet for exactly 60 s fires, a reading clears",
                    &[
                        (0, R(1.0)),
                        (59_999, Tick),
                        (60_000, Tick),
                        (70_000, R(1.0)),
                    ],
                    &[(Raised, 60_000), (Cleared, 70_000)],
                ),
                (
                    "regular readings keep it quiet",
                    &[
                        (0, R(1.0)),
                        (50_000, R(1.0)),
                        (100_000, Tick),
                        (110_000, R(1.0)),
                    ],
                    &[],
                ),
            ],
        );
        let mut s = fixed.new_state();
        fixed.step(&mut s, R(1.0), 5_000);
        assert_eq!(fixed.deadline(&s), Some(65_000));

        let learned = rule(
            Kind::Silence {
                after: SilenceAfter::Learned {
                    factor: 3.0,
                    min_samples: 3,
                },
                scope: Scope::Device,
            },
            0,
        );
        let every_10s: Vec<_> = (0..4).map(|i| (i * 10_000, R(1.0))).collect();
        let mut steps = every_10s.clone();
        steps.extend([(59_999, Tick), (60_000, Tick)]);
        assert_eq!(
            run(&learned, &steps),
            [(Raised, 60_000, 0)],
            "three intervals of 10 s learned: silent after 30 s"
        );
        assert!(
            run(&learned, &[(0, R(1.0)), (10_000, R(1.0)), (500_000, Tick)]).is_empty(),
            "not learned yet"
        );
    }

    #[test]
    fn presence_grace() {
        let r = rule(
            Kind::Presence {
                grace: Duration::from_secs(120),
            },
            0,
        );
        check(
            &r,
            &[
                (
                    "back within the grace period",
                    &[(0, P(false)), (100_000, P(true)), (200_000, Tick)],
                    &[],
                ),
                (
                    "offline too long, then back",
                    &[
                        (0, P(false)),
                        (119_999, Tick),
                        (120_000, Tick),
                        (130_000, P(true)),
                    ],
                    &[(Raised, 120_000), (Cleared, 130_000)],
                ),
                (
                    "a reading counts as back",
                    &[(0, P(false)), (120_000, Tick), (121_000, R(1.0))],
                    &[(Raised, 120_000), (Cleared, 121_000)],
                ),
                (
                    "offline twice is one episode",
                    &[(0, P(false)), (60_000, P(false)), (120_000, Tick)],
                    &[(Raised, 120_000)],
                ),
            ],
        );
    }

    #[test]
    fn renotify_repeats_while_raised() {
        let mut r = threshold(90.0, None, 0);
        r.renotify = Some(Duration::from_secs(60));
        let steps = [
            (0, R(95.0)),
            (59_999, Tick),
            (60_000, Tick),
            (90_000, R(96.0)),
            (120_000, Tick),
            (130_000, R(50.0)),
            (200_000, Tick),
        ];
        assert_eq!(
            run(&r, &steps),
            [
                (Raised, 0, 0),
                (Raised, 60_000, 1),
                (Raised, 120_000, 2),
                (Cleared, 130_000, 0)
            ]
        );
        let mut s = r.new_state();
        r.step(&mut s, R(95.0), 1_000);
        assert_eq!(r.deadline(&s), Some(61_000));
    }

    #[test]
    fn cooldown_holds_back_a_flapping_alert() {
        let mut r = threshold(90.0, None, 0);
        r.cooldown = Some(Duration::from_secs(60));
        check(
            &r,
            &[
                (
                    "a quick re-raise waits for the cooldown and fires if still true",
                    &[
                        (0, R(95.0)),
                        (1_000, R(80.0)),
                        (2_000, R(95.0)),
                        (60_999, Tick),
                        (61_000, Tick),
                    ],
                    &[(Raised, 0), (Cleared, 1_000), (Raised, 61_000)],
                ),
                (
                    "a flap that ends inside the cooldown raises nothing",
                    &[
                        (0, R(95.0)),
                        (1_000, R(80.0)),
                        (2_000, R(95.0)),
                        (3_000, R(80.0)),
                        (61_000, Tick),
                    ],
                    &[(Raised, 0), (Cleared, 1_000)],
                ),
            ],
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Once raised, a signal that stays inside the hysteresis band (never below
            /// `clear_below`) cannot clear, so it cannot raise twice.
            #[test]
            fn oscillating_inside_the_band_raises_at_most_once(
                values in prop::collection::vec(85.0f64..100.0, 1..400),
                gaps in prop::collection::vec(0u64..5_000, 400),
                hold_ms in prop_oneof![Just(0u64), 0u64..20_000],
            ) {
                let r = threshold(90.0, Some(85.0), hold_ms);
                let mut s = r.new_state();
                let mut now = 0;
                let mut raises = 0;
                for (v, gap) in values.iter().zip(&gaps) {
                    now += gap;
                    for input in [R(*v), Input::Tick] {
                        if let Some(t) = r.step(&mut s, input, now) {
                            prop_assert_eq!(t.state, AlertState::Raised, "nothing clears inside the band");
                            raises += 1;
                        }
                    }
                }
                prop_assert!(raises <= 1, "{} raises", raises);
            }
        }
    }
}

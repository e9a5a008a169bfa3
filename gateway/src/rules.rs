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
//!
//! Rules of the threshold family use strict bounds (a value exactly at `above` does not fire),
//! hysteresis (`clear_below`/`clear_above`) and `for`, which also elapses on an
//! [`Input::Tick`] so that an alert fires on time between readings. NaN changes nothing. Time
//! that runs backwards counts as no time passing.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::topic::TopicFilter;

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
        }
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
    Pending {
        /// When the condition started to hold.
        since: Millis,
        /// The latest value judged while pending.
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
    /// The latest value judged (what a renotification reports).
    pub value: f64,
}

/// What a rule is told.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Input {
    /// A new reading of the stream.
    Reading(f64),
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
            Kind::Threshold(_) | Kind::Presence { .. } => Memory::None,
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
    pub fn step(&self, s: &mut RuleState, input: Input, now: Millis) -> Option<Transition> {
        match (&self.kind, input) {
            (_, Input::Reading(v)) if v.is_nan() => None,
            (_, Input::Tick) => self.tick(s, now),
            (Kind::Threshold(th), Input::Reading(v)) => self.judge(th, s, Some(v), now),
            (
                Kind::Rate {
                    threshold,
                    per_seconds,
                    window,
                },
                Input::Reading(v),
            ) => {
                let rate = rate_of_change(&mut s.memory, v, now, ms(*window), *per_seconds);
                self.judge(threshold, s, rate, now)
            }
            (
                Kind::Deviation {
                    threshold,
                    window,
                    min_samples,
                },
                Input::Reading(v),
            ) => {
                let z = deviation(&mut s.memory, v, now, ms(*window), *min_samples);
                self.judge(threshold, s, z, now)
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
                        Some(clear(s, self, since, now, silent, threshold))
                    }
                    _ => None,
                }
            }
            (Kind::Presence { grace }, Input::Presence(false)) => {
                if s.core == State::Normal {
                    s.core = State::Pending {
                        since: now,
                        value: 0.0,
                        threshold: grace.as_secs_f64(),
                    };
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
                    Some(clear(s, self, since, now, offline, threshold))
                }
                State::Normal => None,
            },
            (_, Input::Presence(_)) => None,
        }
    }

    /// The threshold machine on a judged value; `None` (not enough data yet) changes nothing.
    fn judge(
        &self,
        th: &Threshold,
        s: &mut RuleState,
        value: Option<f64>,
        now: Millis,
    ) -> Option<Transition> {
        let v = value.filter(|v| !v.is_nan())?;
        s.value = v;
        match s.core {
            State::Normal => {
                let threshold = th.crossed(v)?;
                s.core = State::Pending {
                    since: now,
                    value: v,
                    threshold,
                };
                self.try_raise(s, now)
            }
            State::Pending {
                since, threshold, ..
            } => match th.crossed(v) {
                None => {
                    s.core = State::Normal;
                    None
                }
                Some(_) => {
                    s.core = State::Pending {
                        since,
                        value: v,
                        threshold,
                    };
                    self.try_raise(s, now)
                }
            },
            State::Raised { since, threshold } => th
                .cleared_by(v)
                .then(|| clear(s, self, since, now, v, threshold)),
        }
    }

    /// Raises a pending alert if it has held long enough and no cooldown is running.
    fn try_raise(&self, s: &mut RuleState, now: Millis) -> Option<Transition> {
        let State::Pending {
            since,
            value,
            threshold,
        } = s.core
        else {
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
            value,
            threshold,
            repeat: 0,
        })
    }

    fn tick(&self, s: &mut RuleState, now: Millis) -> Option<Transition> {
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
                        now.saturating_sub(since) as f64 / 1000.0
                    }
                    _ => s.value,
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
                let threshold = limit as f64 / 1000.0;
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
                    value: silent as f64 / 1000.0,
                    threshold,
                    repeat: 0,
                })
            }
        }
    }

    /// The next time at which [`Input::Tick`] may change something, if any.
    pub fn deadline(&self, s: &RuleState) -> Option<Millis> {
        match s.core {
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
        }
    }
}

fn clear(
    s: &mut RuleState,
    rule: &Rule,
    since: Millis,
    now: Millis,
    value: f64,
    threshold: f64,
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
    type Case<'a> = (&'a str, &'a [(Millis, Input)], &'a [(AlertState, Millis)]);

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
    use Input::{Presence as P, Reading as R, Tick};

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

    #[test]
    fn raised_transition_names_the_episode() {
        let r = threshold(90.0, Some(85.0), 10_000);
        let mut s = r.new_state();
        assert_eq!(r.step(&mut s, R(91.0), 1_000), None);
        let t = r.step(&mut s, R(95.2), 11_000).unwrap();
        assert_eq!(
            (t.since, t.at, t.value, t.threshold),
            (1_000, 11_000, 95.2, 90.0)
        );
        let c = r.step(&mut s, R(70.0), 20_000).unwrap();
        assert_eq!(
            (c.state, c.since, c.at, c.value),
            (Cleared, 1_000, 20_000, 70.0)
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
                    for input in [Input::Reading(*v), Input::Tick] {
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

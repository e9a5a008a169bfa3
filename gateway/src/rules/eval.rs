//! Evaluation: one step of a rule on its state, given an input and the time. Pure: no I/O,
//! no clock reads. Durations compare the monotonic halves of [`Stamp`]s; documents get wall
//! times.

use super::*;

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
            Kind::Flapping { .. } => Memory::Flapping(Box::default()),
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

    /// One step of the rule at `now` (a [`Stamp`], or one number of virtual time); returns
    /// the transition to publish, if any.
    pub fn step(
        &self,
        s: &mut RuleState,
        input: Input<'_>,
        now: impl Into<Stamp>,
    ) -> Option<Transition> {
        let now = now.into();
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
                    now.mono,
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
                    now.mono,
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
                let n = count_changes(&mut s.memory, Some(v), now.mono, ms(*window));
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
                        let gap = now.mono.saturating_sub(prev.mono) as f64;
                        *samples = samples.saturating_add(1);
                        // A running mean at first, then exponentially weighted (about 20).
                        let alpha = (1.0 / f64::from(*samples)).max(0.05);
                        *interval += alpha * (gap - *interval);
                    }
                    *last = Some(last.map_or(now, |l| if l.mono > now.mono { l } else { now }));
                }
                match s.core {
                    State::Raised { since, threshold } => {
                        let silent = now.mono.saturating_sub(since.mono) as f64 / 1000.0;
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
                    let offline = now.mono.saturating_sub(since.mono) as f64 / 1000.0;
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
        now: Stamp,
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
    fn try_raise(&self, s: &mut RuleState, now: Stamp) -> Option<Transition> {
        let State::Pending { since, threshold } = s.core else {
            return None;
        };
        if now.mono.saturating_sub(since.mono) < self.hold_ms() || now.mono < s.quiet_until {
            return None;
        }
        let since = Stamp {
            wall: now.wall_of(since),
            ..since
        };
        s.core = State::Raised { since, threshold };
        s.notified_at = now.mono;
        s.repeats = 0;
        Some(Transition {
            state: AlertState::Raised,
            since: since.wall,
            at: now.wall,
            value: s.value.clone(),
            threshold,
            repeat: 0,
        })
    }

    fn tick(&self, s: &mut RuleState, now: Stamp) -> Option<Transition> {
        if let Kind::Flapping { changes, window } = self.kind {
            // Changes leave the window as time passes: that alone may end the condition.
            let n = count_changes(&mut s.memory, None, now.mono, ms(window));
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
                if now.mono.saturating_sub(s.notified_at) < every {
                    return None;
                }
                s.notified_at = now.mono;
                s.repeats += 1;
                let value = match self.kind {
                    Kind::Silence { .. } | Kind::Presence { .. } => {
                        Value::Number(now.mono.saturating_sub(since.mono) as f64 / 1000.0)
                    }
                    _ => s.value.clone(),
                };
                Some(Transition {
                    state: AlertState::Raised,
                    since: since.wall,
                    at: now.wall,
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
                let silent = now.mono.saturating_sub(last.mono);
                if silent < limit || now.mono < s.quiet_until {
                    return None;
                }
                let threshold = Some(limit as f64 / 1000.0);
                let since = Stamp {
                    wall: now.wall_of(last),
                    ..last
                };
                s.core = State::Raised { since, threshold };
                s.notified_at = now.mono;
                s.repeats = 0;
                Some(Transition {
                    state: AlertState::Raised,
                    since: since.wall,
                    at: now.wall,
                    value: Value::Number(silent as f64 / 1000.0),
                    threshold,
                    repeat: 0,
                })
            }
        }
    }

    /// The next monotonic time at which [`Input::Tick`] may change something, if any.
    pub fn deadline(&self, s: &RuleState) -> Option<Millis> {
        let own = match s.core {
            State::Pending { since, .. } => {
                Some(since.mono.saturating_add(self.hold_ms()).max(s.quiet_until))
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
                    last.mono
                        .saturating_add(silence_limit(after, &s.memory)?)
                        .max(s.quiet_until),
                )
            }
        };
        // A flapping condition ends when its oldest change leaves the window.
        let expiry = match (&self.kind, &s.memory, s.core) {
            (_, _, State::Normal) => None,
            (Kind::Flapping { window, .. }, Memory::Flapping(changes), _) => changes
                .at
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
    let Memory::Flapping(c) = memory else {
        return 0;
    };
    let Changes { last, at: changes } = &mut **c;
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
    since: Stamp,
    now: Stamp,
    value: Value,
    threshold: Option<f64>,
) -> Transition {
    s.core = State::Normal;
    s.quiet_until = rule.cooldown.map_or(0, |c| now.mono.saturating_add(ms(c)));
    s.repeats = 0;
    Transition {
        state: AlertState::Cleared,
        since: since.wall,
        at: now.wall,
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

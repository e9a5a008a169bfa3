//! Windowed statistics as state machines with time passed in. No I/O, no clock reads.
//!
//! [`Window`] keeps one numeric stream's rollup (count, min, max, mean, last) over fixed
//! windows aligned to multiples of the window length since the epoch, so that rollups of
//! different devices line up. [`StateWindow`] does the same for a stream of states: readings,
//! changes, the last state and the time spent in each state. [`StreamWindow`] is either, as a
//! stream's values are: a stream that switches between numbers and states closes its window
//! early and opens one of the other kind. [`SiteSummary`] folds many devices' readings of one metric into the compact
//! per-site figures that summaries send upstream.

use std::collections::HashSet;

use crate::rules::Millis;
use crate::value::Value;

/// Figures of one closed window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rollup {
    /// Window start (inclusive), ms since the epoch.
    pub start: Millis,
    /// Window length in ms.
    pub len: Millis,
    /// Readings in the window.
    pub count: u64,
    /// Smallest reading.
    pub min: f64,
    /// Largest reading.
    pub max: f64,
    /// Mean of the readings.
    pub mean: f64,
    /// The last reading.
    pub last: f64,
}

/// The open window of one stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    start: Millis,
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
    last: f64,
}

/// Start of the window of length `len` that holds `t`.
pub fn window_start(t: Millis, len: Millis) -> Millis {
    t - t % len.max(1)
}

impl Window {
    /// A window holding one first reading.
    pub fn new(value: f64, now: Millis, len: Millis) -> Self {
        Self {
            start: window_start(now, len),
            count: 1,
            min: value,
            max: value,
            sum: value,
            last: value,
        }
    }

    /// Adds a reading; if `now` is past this window, the window is closed and returned and a
    /// new one starts with the reading. A reading from before the window (the clock went
    /// back) counts in the current window.
    pub fn add(&mut self, value: f64, now: Millis, len: Millis) -> Option<Rollup> {
        let closed = self.close_if_due(now, len);
        if closed.is_some() {
            *self = Window::new(value, now, len);
        } else {
            self.count += 1;
            self.min = self.min.min(value);
            self.max = self.max.max(value);
            self.sum += value;
            self.last = value;
        }
        closed
    }

    /// The window's figures if it ended at or before `now`.
    pub fn close_if_due(&self, now: Millis, len: Millis) -> Option<Rollup> {
        (now >= self.start.saturating_add(len)).then(|| self.rollup(len))
    }

    /// The figures so far.
    pub fn rollup(&self, len: Millis) -> Rollup {
        Rollup {
            start: self.start,
            len,
            count: self.count,
            min: self.min,
            max: self.max,
            mean: self.sum / self.count as f64,
            last: self.last,
        }
    }
}

/// Figures of one closed window of a state stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StateRollup {
    /// Window start (inclusive), ms since the epoch.
    pub start: Millis,
    /// Window length in ms.
    pub len: Millis,
    /// Readings in the window.
    pub count: u64,
    /// Changes of state in the window.
    pub changes: u64,
    /// The last state.
    pub last: Value,
    /// Time spent in each state within the window, ms, in order of first appearance.
    pub time_in: Vec<(Value, Millis)>,
}

/// A closed window of either kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Closed {
    /// A numeric stream's window.
    Numbers(Rollup),
    /// A state stream's window.
    States(StateRollup),
}

/// The open window of one state stream.
#[derive(Debug, Clone, PartialEq)]
pub struct StateWindow {
    start: Millis,
    count: u64,
    changes: u64,
    current: Value,
    /// When `current` began (or the window began, if it began earlier).
    entered: Millis,
    time_in: Vec<(Value, Millis)>,
}

impl StateWindow {
    /// A window holding one first reading. `previous` is the stream's state before it, if
    /// known: it held from the window's start, so the reading may be a change.
    pub fn new(value: &Value, previous: Option<&Value>, now: Millis, len: Millis) -> Self {
        let start = window_start(now, len);
        match previous.filter(|p| p.is_state()) {
            Some(p) => {
                let mut w = Self {
                    start,
                    count: 0,
                    changes: 0,
                    current: p.clone(),
                    entered: start,
                    time_in: Vec::new(),
                };
                w.push(value, now);
                w
            }
            None => Self {
                start,
                count: 1,
                changes: 0,
                current: value.clone(),
                entered: now.max(start),
                time_in: Vec::new(),
            },
        }
    }

    fn credit(&mut self, until: Millis) {
        let ms = until.saturating_sub(self.entered);
        match self.time_in.iter_mut().find(|(v, _)| *v == self.current) {
            Some((_, t)) => *t += ms,
            None => self.time_in.push((self.current.clone(), ms)),
        }
    }

    fn push(&mut self, value: &Value, now: Millis) {
        self.count += 1;
        if *value != self.current {
            // A reading from before the last change (the clock went back) changes the state
            // without time passing.
            let at = now.max(self.entered);
            self.credit(at);
            self.current = value.clone();
            self.entered = at;
            self.changes += 1;
        }
    }

    /// The figures, with the current state credited up to `until` (at most the window's end).
    pub fn rollup(&self, until: Millis, len: Millis) -> StateRollup {
        let mut w = self.clone();
        w.credit(until.min(self.start.saturating_add(len)));
        StateRollup {
            start: w.start,
            len,
            count: w.count,
            changes: w.changes,
            last: w.current,
            time_in: w.time_in,
        }
    }
}

/// A stream's open window: numbers or states, as its values are.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamWindow {
    /// Numeric readings.
    Numbers(Window),
    /// States; boxed, so that a numeric stream's window stays as small as it was.
    States(Box<StateWindow>),
}

impl StreamWindow {
    /// A window holding one first reading; `previous` is the stream's value before it.
    pub fn new(value: &Value, previous: Option<&Value>, now: Millis, len: Millis) -> Self {
        match value {
            Value::Number(n) => StreamWindow::Numbers(Window::new(*n, now, len)),
            _ => StreamWindow::States(Box::new(StateWindow::new(value, previous, now, len))),
        }
    }

    /// Adds a reading; returns the window it closed, if any: one whose time is over, or one
    /// of the other kind (a stream that switched between numbers and states).
    pub fn add(&mut self, value: &Value, now: Millis, len: Millis) -> Option<Closed> {
        match (&mut *self, value) {
            (StreamWindow::Numbers(w), Value::Number(n)) => {
                return w.add(*n, now, len).map(Closed::Numbers);
            }
            (StreamWindow::States(w), v) if v.is_state() => {
                if w.start.saturating_add(len) > now {
                    w.push(v, now);
                    return None;
                }
                let closed = w.rollup(now, len);
                let previous = w.current.clone();
                *self = StreamWindow::new(value, Some(&previous), now, len);
                return Some(Closed::States(closed));
            }
            _ => {}
        }
        let closed = self.rollup(now, len);
        *self = StreamWindow::new(value, None, now, len);
        Some(closed)
    }

    /// The window's figures if it ended at or before `now`.
    pub fn close_if_due(&self, now: Millis, len: Millis) -> Option<Closed> {
        let start = match self {
            StreamWindow::Numbers(w) => w.start,
            StreamWindow::States(w) => w.start,
        };
        (now >= start.saturating_add(len)).then(|| self.rollup(now, len))
    }

    /// The figures so far; a state's time is counted up to `now` (at most the window's end).
    pub fn rollup(&self, now: Millis, len: Millis) -> Closed {
        match self {
            StreamWindow::Numbers(w) => Closed::Numbers(w.rollup(len)),
            StreamWindow::States(w) => Closed::States(w.rollup(now, len)),
        }
    }
}

/// One metric across all devices of a site, over one summary interval.
#[derive(Debug, Clone, Default)]
pub struct SiteSummary {
    count: u64,
    sum: f64,
    min: Option<(f64, Box<str>)>,
    max: Option<(f64, Box<str>)>,
    devices: HashSet<Box<str>>,
}

/// The figures of a [`SiteSummary`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SiteFigures {
    /// Readings.
    pub count: u64,
    /// Devices that reported.
    pub devices: usize,
    /// Smallest reading.
    pub min: f64,
    /// Device of the smallest reading.
    pub min_device: String,
    /// Largest reading.
    pub max: f64,
    /// Device of the largest reading.
    pub max_device: String,
    /// Mean of all readings.
    pub mean: f64,
}

impl SiteSummary {
    /// Adds one reading of `device`.
    pub fn add(&mut self, device: &str, value: f64) {
        self.count += 1;
        self.sum += value;
        if self.min.as_ref().is_none_or(|(m, _)| value < *m) {
            self.min = Some((value, device.into()));
        }
        if self.max.as_ref().is_none_or(|(m, _)| value > *m) {
            self.max = Some((value, device.into()));
        }
        if !self.devices.contains(device) {
            self.devices.insert(device.into());
        }
    }

    /// The figures, and the summary emptied for the next interval; `None` if nothing came in.
    pub fn take(&mut self) -> Option<SiteFigures> {
        let s = std::mem::take(self);
        let ((min, min_device), (max, max_device)) = (s.min?, s.max?);
        Some(SiteFigures {
            count: s.count,
            devices: s.devices.len(),
            min,
            min_device: min_device.into(),
            max,
            max_device: max_device.into(),
            mean: s.sum / s.count as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_align_and_close_when_time_passes_them() {
        let len = 60_000;
        let mut w = Window::new(20.0, 61_000, len);
        assert_eq!(w.add(22.0, 90_000, len), None);
        assert_eq!(w.add(19.0, 119_999, len), None);
        let closed = w
            .add(30.0, 120_000, len)
            .expect("window [60 s, 120 s) closes");
        assert_eq!(
            closed,
            Rollup {
                start: 60_000,
                len,
                count: 3,
                min: 19.0,
                max: 22.0,
                mean: 61.0 / 3.0,
                last: 19.0
            }
        );
        // The reading that closed it opened the next window.
        assert_eq!(
            w.rollup(len),
            Rollup {
                start: 120_000,
                len,
                count: 1,
                min: 30.0,
                max: 30.0,
                mean: 30.0,
                last: 30.0
            }
        );
    }

    #[test]
    fn a_quiet_stream_closes_on_a_tick_and_time_going_back_stays_in_the_window() {
        let len = 1_000;
        let mut w = Window::new(1.0, 5_500, len);
        assert_eq!(
            w.add(2.0, 5_100, len),
            None,
            "earlier reading counts in the open window"
        );
        assert_eq!(w.close_if_due(5_999, len), None);
        assert_eq!(
            w.close_if_due(6_000, len).map(|r| (r.start, r.count)),
            Some((5_000, 2))
        );
    }

    fn t(s: &str) -> Value {
        Value::parse(s).unwrap()
    }

    #[test]
    fn a_state_window_counts_changes_and_time_in_each_state() {
        let len = 60_000;
        let mut w = StreamWindow::new(&t("closed"), None, 60_000, len);
        for (v, at) in [("closed", 70_000), ("open", 80_000), ("closed", 90_000)] {
            assert_eq!(w.add(&t(v), at, len), None);
        }
        assert_eq!(w.add(&t("open"), 110_000, len), None);
        let Some(Closed::States(r)) = w.add(&t("open"), 125_000, len) else {
            panic!("the window [60 s, 120 s) closes");
        };
        assert_eq!(
            (r.start, r.count, r.changes, r.last.clone()),
            (60_000, 5, 3, t("open"))
        );
        assert_eq!(
            r.time_in,
            [(t("closed"), 40_000), (t("open"), 20_000)],
            "closed 60-80 and 90-110 s, open 80-90 and 110-120 s"
        );
        // The next window starts in the state the last one ended in.
        let Closed::States(next) = w.rollup(130_000, len) else {
            panic!()
        };
        assert_eq!((next.count, next.changes), (1, 0));
        assert_eq!(next.time_in, [(t("open"), 10_000)]);
    }

    #[test]
    fn a_stream_that_switches_kind_closes_its_window_early() {
        let len = 60_000;
        let mut w = StreamWindow::new(&Value::Number(1.0), None, 0, len);
        let closed = w.add(&t("on"), 10_000, len);
        assert!(matches!(
            closed,
            Some(Closed::Numbers(Rollup { count: 1, .. }))
        ));
        let closed = w.add(&Value::Number(2.0), 15_000, len);
        let Some(Closed::States(r)) = closed else {
            panic!("{closed:?}")
        };
        assert_eq!(r.time_in, [(t("on"), 5_000)]);
    }

    #[test]
    fn site_summary_names_extremes_and_counts_devices() {
        let mut s = SiteSummary::default();
        assert_eq!(s.take(), None);
        for (d, v) in [("a", 20.0), ("b", 25.0), ("a", 18.0), ("c", 30.0)] {
            s.add(d, v);
        }
        let f = s.take().unwrap();
        assert_eq!(
            (
                f.count,
                f.devices,
                f.min,
                f.min_device.as_str(),
                f.max,
                f.max_device.as_str()
            ),
            (4, 3, 18.0, "a", 30.0, "c")
        );
        assert_eq!(f.mean, 23.25);
        assert_eq!(s.take(), None, "taking empties it");
    }
}

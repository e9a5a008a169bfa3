//! The rules' table-driven tests: each kind's whole life (raise, hold, clear, re-raise),
//! fed inputs at virtual times.

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

/// Wall-clock steps: rules judge durations on the monotonic clock, documents get wall times.
mod clock_steps {
    use super::*;

    const HOUR: Millis = 3_600_000;
    /// 2026-11-21T18:05:45.123Z.
    const Y2026: Millis = 1_795_284_345_123;

    /// A box's clocks: from `start` (both clocks read it), the wall clock moves by `by`
    /// when `at` ms have passed on the monotonic clock.
    #[derive(Clone, Copy)]
    struct Steps {
        name: &'static str,
        start: Millis,
        at: Millis,
        by: i64,
    }

    impl Steps {
        /// The stamp `t` ms after the start, on the monotonic clock.
        fn stamp(self, t: Millis) -> Stamp {
            let mono = self.start + t;
            let wall = if t >= self.at {
                mono.checked_add_signed(self.by).unwrap()
            } else {
                mono
            };
            Stamp { wall, mono }
        }
    }

    /// Forward an hour, from 1970 (a box without a real-time clock, 30 s after boot) to
    /// 2026, and back a minute (NTP correcting a fast clock), each `at` ms into the run.
    fn steps(at: Millis) -> [Steps; 3] {
        [
            Steps {
                name: "an hour forward",
                start: Y2026,
                at,
                by: HOUR as i64,
            },
            Steps {
                name: "1970 to 2026",
                start: 30_000,
                at,
                by: (Y2026 - 30_000) as i64,
            },
            Steps {
                name: "a minute back",
                start: Y2026,
                at,
                by: -60_000,
            },
        ]
    }

    /// Feeds `(t, input)` at the stamps of `clock`; returns each transition with its `t`.
    fn drive(rule: &Rule, clock: Steps, inputs: &[(Millis, Input)]) -> Vec<(Millis, Transition)> {
        let mut state = rule.new_state();
        inputs
            .iter()
            .filter_map(|&(t, input)| {
                rule.step(&mut state, input, clock.stamp(t))
                    .map(|tr| (t, tr))
            })
            .collect()
    }

    /// `input` and a tick every second from 0 to `to`, and a tick 1 ms before each of
    /// `edges`, in order of time.
    fn timeline(
        input: Input<'static>,
        to: Millis,
        edges: &[Millis],
    ) -> Vec<(Millis, Input<'static>)> {
        let mut v: Vec<_> = (0..=to / 1_000)
            .flat_map(|s| [(s * 1_000, input), (s * 1_000, Tick)])
            .collect();
        v.extend(edges.iter().map(|e| (e - 1, Tick)));
        v.sort_by_key(|(t, _)| *t);
        v
    }

    #[test]
    fn for_and_grace_fire_when_their_monotonic_time_is_up_across_wall_clock_steps() {
        let presence = Rule {
            filter: TopicFilter::new("sensors/+/status").unwrap(),
            ..rule(
                Kind::Presence {
                    grace: Duration::from_secs(10),
                },
                0,
            )
        };
        let cases: [(&str, Rule, Input); 2] = [
            ("threshold for 10 s", threshold(90.0, None, 10_000), R(95.0)),
            ("presence grace 10 s", presence, P(false)),
        ];
        for (what, rule, input) in cases {
            // The step comes 4.5 s into the 10 s.
            for clock in steps(4_500) {
                let case = format!("{what}, {}", clock.name);
                let got = drive(&rule, clock, &timeline(input, 20_000, &[10_000]));
                let raised: Vec<_> = got.iter().map(|(t, tr)| (*t, tr.state)).collect();
                assert_eq!(raised, [(10_000, Raised)], "{case}: exactly at 10 s, once");
                let tr = &got[0].1;
                let now = clock.stamp(10_000);
                assert_eq!(tr.at, now.wall, "{case}: `at` is the wall clock");
                assert_eq!(
                    tr.since,
                    now.wall - 10_000,
                    "{case}: `since` is 10 s before, in the wall clock's new time"
                );
            }
        }
    }

    #[test]
    fn a_pending_rule_waits_for_its_deadline_on_the_monotonic_clock() {
        let r = threshold(90.0, None, 10_000);
        for clock in steps(4_500) {
            let mut s = r.new_state();
            assert_eq!(r.step(&mut s, R(95.0), clock.stamp(0)), None);
            assert_eq!(r.deadline(&s), Some(clock.start + 10_000), "{}", clock.name);
            assert_eq!(
                r.step(&mut s, Tick, clock.stamp(9_999)),
                None,
                "{}",
                clock.name
            );
            assert_eq!(r.deadline(&s), Some(clock.start + 10_000), "{}", clock.name);
        }
    }

    #[test]
    fn silence_fires_when_its_monotonic_time_is_up_across_wall_clock_steps() {
        let r = rule(
            Kind::Silence {
                after: SilenceAfter::Fixed(Duration::from_secs(30)),
                scope: Scope::Metric,
            },
            0,
        );
        // The last reading at 5 s; the step 12 s into the silence; a reading at 60 s.
        for clock in steps(17_000) {
            let mut inputs: Vec<_> = (0..=5).map(|s| (s * 1_000, R(1.0))).collect();
            inputs.extend((6..=59).map(|s| (s * 1_000, Tick)));
            inputs.extend([(34_999, Tick), (60_000, R(1.0))]);
            inputs.sort_by_key(|(t, _)| *t);
            let got = drive(&r, clock, &inputs);
            let summary: Vec<_> = got
                .iter()
                .map(|(t, tr)| (*t, tr.state, tr.value.clone()))
                .collect();
            assert_eq!(
                summary,
                [
                    (35_000, Raised, Value::Number(30.0)),
                    (60_000, Cleared, Value::Number(55.0)),
                ],
                "{}: raised exactly 30 s after the last reading; silent for 55 s when it clears",
                clock.name
            );
            let raised = &got[0].1;
            let now = clock.stamp(35_000);
            assert_eq!(
                (raised.since, raised.at),
                (now.wall - 30_000, now.wall),
                "{}: the silence began 30 s ago, in the wall clock's new time",
                clock.name
            );
            assert_eq!(got[1].1.since, raised.since, "{}: one episode", clock.name);
        }
    }

    #[test]
    fn renotify_and_cooldown_run_on_the_monotonic_clock() {
        let mut r = threshold(90.0, Some(85.0), 0);
        r.renotify = Some(Duration::from_secs(60));
        r.cooldown = Some(Duration::from_secs(20));
        for clock in steps(30_000) {
            let mut inputs = vec![(0, R(95.0))];
            inputs.extend((1..=130).map(|s| (s * 1_000, Tick)));
            inputs.extend([(59_999, Tick), (119_999, Tick)]);
            inputs.sort_by_key(|(t, _)| *t);
            inputs.push((130_500, R(80.0)));
            inputs.extend((131..=160).flat_map(|s| [(s * 1_000, R(95.0)), (s * 1_000, Tick)]));
            inputs.push((150_499, R(95.0)));
            inputs.push((150_500, R(95.0)));
            inputs.sort_by_key(|(t, _)| *t);
            let got: Vec<_> = drive(&r, clock, &inputs)
                .into_iter()
                .map(|(t, tr)| (t, tr.state, tr.repeat))
                .collect();
            assert_eq!(
                got,
                [
                    (0, Raised, 0),
                    (60_000, Raised, 1),
                    (120_000, Raised, 2),
                    (130_500, Cleared, 0),
                    (150_500, Raised, 0),
                ],
                "{}: a reminder every 60 s, and no raise within 20 s of the clear",
                clock.name
            );
        }
    }

    #[test]
    fn rates_and_flapping_windows_count_monotonic_time_across_wall_clock_steps() {
        let rate = rule(
            Kind::Rate {
                threshold: high(1.0, None),
                per_seconds: 1.0,
                window: Duration::from_secs(60),
            },
            0,
        );
        let flapping = rule(
            Kind::Flapping {
                changes: 2,
                window: Duration::from_secs(10),
            },
            0,
        );
        for clock in steps(5_000) {
            let got = drive(&rate, clock, &[(0, R(0.0)), (10_000, R(20.0))]);
            assert_eq!(
                got.iter()
                    .map(|(t, tr)| (*t, tr.state, tr.value.clone()))
                    .collect::<Vec<_>>(),
                [(10_000, Raised, Value::Number(2.0))],
                "{}: 20 in 10 s is 2 per second",
                clock.name
            );
            let inputs = [
                (0, S("open")),
                (1_000, S("closed")),
                (2_000, S("open")),
                (3_000, S("closed")),
                (11_000, Tick),
                (11_001, Tick),
            ];
            let got: Vec<_> = drive(&flapping, clock, &inputs)
                .into_iter()
                .map(|(t, tr)| (t, tr.state))
                .collect();
            assert_eq!(
                got,
                [(3_000, Raised), (11_001, Cleared)],
                "{}: changes age out of the window on the monotonic clock",
                clock.name
            );
        }
    }

    #[test]
    fn without_a_step_documents_carry_the_wall_clock_as_stamped() {
        // The two clocks of a real box disagree by a constant (the monotonic one starts at
        // the wall time of the process start, to the millisecond): ids stay the wall times.
        let r = threshold(90.0, None, 10_000);
        let mut s = r.new_state();
        let at = |t: Millis| Stamp {
            wall: Y2026 + t,
            mono: Y2026 - 1 + t,
        };
        assert_eq!(r.step(&mut s, R(95.0), at(0)), None);
        let t = r.step(&mut s, Tick, at(10_000)).unwrap();
        assert_eq!((t.since, t.at), (Y2026, Y2026 + 10_000));
    }
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

//! Rule compilation: one `[[rule]]` into a checked `Rule`: its kind (named, or inferred from its
//! fields), its bounds and hysteresis, and its lifecycle options.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::compile::value_of;
use super::compile::{NAME_HELP, is_name};
use super::diagnostics::Sink;
use super::raw::{RawRule, RawValue};
use crate::rules::{Kind, Rule, Scope, Severity, SilenceAfter, StateTest, Threshold};
use crate::topic::TopicFilter;

/// Field names of each rule kind, for inference and for mixed-up rules.
const KIND_FIELDS: &[(&str, &[&str])] = &[
    (
        "threshold",
        &["above", "below", "clear_below", "clear_above"],
    ),
    ("rate", &["rate_above", "rate_below", "rate_per"]),
    ("deviation", &["deviation_above", "clear_within"]),
    ("silence", &["silent_for", "silent_factor", "scope"]),
    ("presence", &["offline_for"]),
    ("state", &["equals", "in", "not_in"]),
    ("flapping", &["changes_above"]),
];

impl RawRule {
    /// The span of each condition field that is present, by name.
    fn present_fields(&self) -> Vec<(&'static str, Range<usize>)> {
        let f = |name: &'static str, span: Option<Range<usize>>| span.map(|s| (name, s));
        [
            f("above", self.above.as_ref().map(|v| v.span())),
            f("below", self.below.as_ref().map(|v| v.span())),
            f("clear_below", self.clear_below.as_ref().map(|v| v.span())),
            f("clear_above", self.clear_above.as_ref().map(|v| v.span())),
            f("rate_above", self.rate_above.as_ref().map(|v| v.span())),
            f("rate_below", self.rate_below.as_ref().map(|v| v.span())),
            f("rate_per", self.rate_per.as_ref().map(|v| v.span())),
            f(
                "deviation_above",
                self.deviation_above.as_ref().map(|v| v.span()),
            ),
            f("clear_within", self.clear_within.as_ref().map(|v| v.span())),
            f("silent_for", self.silent_for.as_ref().map(|v| v.span())),
            f(
                "silent_factor",
                self.silent_factor.as_ref().map(|v| v.span()),
            ),
            f("scope", self.scope.as_ref().map(|v| v.span())),
            f("offline_for", self.offline_for.as_ref().map(|v| v.span())),
            f("equals", self.equals.as_ref().map(|v| v.span())),
            f("in", self.in_.as_ref().map(|v| v.span())),
            f("not_in", self.not_in.as_ref().map(|v| v.span())),
            f(
                "changes_above",
                self.changes_above.as_ref().map(|v| v.span()),
            ),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

fn kind_of_field(field: &str) -> &'static str {
    KIND_FIELDS
        .iter()
        .find(|(_, fields)| fields.contains(&field))
        .map_or("threshold", |(k, _)| k)
}

/// The kind a rule asks for, explicitly or by its fields; `None` after reporting why not.
fn rule_kind(span: &Range<usize>, raw: &RawRule, sink: &mut Sink<'_>) -> Option<&'static str> {
    let present = raw.present_fields();
    let kind = match &raw.kind {
        Some(k) => match KIND_FIELDS
            .iter()
            .find(|(name, _)| *name == k.get_ref().as_str())
        {
            Some((name, _)) => *name,
            None => {
                let kinds: Vec<_> = KIND_FIELDS.iter().map(|(k, _)| *k).collect();
                sink.error(
                    k.span(),
                    format!("unknown rule kind {:?}", k.get_ref()),
                    Some(format!("kind is one of: {}", kinds.join(", "))),
                );
                return None;
            }
        },
        None => match present.first() {
            Some((field, _)) => kind_of_field(field),
            None => {
                sink.error(
                    span.clone(),
                    format!("rule {:?} has no condition", raw.name.get_ref()),
                    Some("add `above`/`below` (threshold), `rate_above`/`rate_below` (rate), `deviation_above` (deviation), `silent_for`/`silent_factor` (silence), `offline_for` (presence), `equals`/`in`/`not_in` (state) or `changes_above` (flapping)".into()),
                );
                return None;
            }
        },
    };
    let mut ok = true;
    for (field, field_span) in present {
        let belongs = kind_of_field(field);
        if belongs != kind {
            sink.error(
                field_span,
                format!("`{field}` belongs to {belongs} rules, and this is a {kind} rule"),
                Some("split it into two rules, one per condition".into()),
            );
            ok = false;
        }
    }
    ok.then_some(kind)
}

/// Checks bounds of the threshold family and builds them.
fn compile_bounds(
    span: &Range<usize>,
    names: [&str; 4],
    values: [&Option<Spanned<f64>>; 4],
    sink: &mut Sink<'_>,
) -> Threshold {
    let [above_n, below_n, clear_below_n, clear_above_n] = names;
    let [above_v, below_v, clear_below_v, clear_above_v] = values;
    for (field, value) in names.iter().zip(values) {
        if let Some(v) = value.as_ref().filter(|v| !v.get_ref().is_finite()) {
            sink.error(v.span(), format!("`{field}` must be a finite number"), None);
        }
    }
    let get = |v: &Option<Spanned<f64>>| v.as_ref().map(|s| *s.get_ref());
    let t = Threshold {
        above: get(above_v),
        below: get(below_v),
        clear_below: get(clear_below_v),
        clear_above: get(clear_above_v),
    };
    match (t.above, t.below) {
        (None, None) => sink.error(
            span.clone(),
            format!("the rule has neither `{above_n}` nor `{below_n}`"),
            Some(format!(
                "add `{above_n} = ...` (fires when greater) or `{below_n} = ...` (fires when less)"
            )),
        ),
        (Some(a), Some(b)) if b >= a => sink.error(
            below_v.as_ref().map_or(span.clone(), |b| b.span()),
            format!("`{below_n}` ({b}) must be less than `{above_n}` ({a}), or every value fires"),
            None,
        ),
        _ => {}
    }
    if let Some(c) = clear_below_v {
        match t.above {
            None => sink.error(c.span(), format!("`{clear_below_n}` needs `{above_n}`"), Some(format!("hysteresis for a `{below_n}` rule is `{clear_above_n}`"))),
            Some(a) if *c.get_ref() > a => sink.error(
                c.span(),
                format!("inverted hysteresis band: `{clear_below_n}` ({}) is greater than `{above_n}` ({a})", c.get_ref()),
                Some(format!("`{clear_below_n}` must be at most {a}, e.g. {}", a - (a.abs() * 0.05).max(1.0))),
            ),
            _ => {}
        }
    }
    if let Some(c) = clear_above_v {
        match t.below {
            None => sink.error(c.span(), format!("`{clear_above_n}` needs `{below_n}`"), Some(format!("hysteresis for an `{above_n}` rule is `{clear_below_n}`"))),
            Some(b) if *c.get_ref() < b => sink.error(
                c.span(),
                format!("inverted hysteresis band: `{clear_above_n}` ({}) is less than `{below_n}` ({b})", c.get_ref()),
                Some(format!("`{clear_above_n}` must be at least {b}")),
            ),
            _ => {}
        }
    }
    if let (Some(a), Some(b)) = (t.above, t.below) {
        if t.clear_above.unwrap_or(b) >= t.clear_below.unwrap_or(a) {
            sink.error(
                span.clone(),
                "the hysteresis bands overlap: no value would clear the alert",
                Some(format!("keep {clear_above_n} below {clear_below_n}")),
            );
        }
    }
    t
}

const NO_BOUND: Option<Spanned<f64>> = None;

/// `equals`, `in` or `not_in`: exactly one, with values that readings can have.
fn compile_state_test(
    span: &Range<usize>,
    raw: &RawRule,
    sink: &mut Sink<'_>,
) -> Option<StateTest> {
    let given = [
        raw.equals.as_ref().map(|e| e.span()),
        raw.in_.as_ref().map(|e| e.span()),
        raw.not_in.as_ref().map(|e| e.span()),
    ];
    if given.iter().flatten().count() > 1 {
        sink.error(
            given
                .iter()
                .flatten()
                .nth(1)
                .cloned()
                .unwrap_or(span.clone()),
            "give one of `equals`, `in` and `not_in`",
            Some("split it into two rules, one per condition".into()),
        );
        return None;
    }
    let values = |list: &[RawValue], at: Range<usize>, sink: &mut Sink<'_>| {
        if list.is_empty() {
            sink.error(
                at.clone(),
                "the list of values is empty",
                Some("e.g. in = [\"heat\", \"boost\"]".into()),
            );
        }
        list.iter()
            .filter_map(|v| match value_of(v) {
                Ok(v) => Some(v),
                Err(e) => {
                    sink.error(
                        at.clone(),
                        format!("not a value a reading can have: {e}"),
                        Some("a number, true/false, or a word of at most 64 bytes".into()),
                    );
                    None
                }
            })
            .collect::<Vec<_>>()
    };
    if let Some(e) = &raw.equals {
        return match value_of(e.get_ref()) {
            Ok(v) => Some(StateTest::Equals(v)),
            Err(err) => {
                sink.error(e.span(), format!("`equals`: not a value a reading can have: {err}"), Some("a number, true/false, or a word of at most 64 bytes, e.g. equals = true or equals = \"open\"".into()));
                None
            }
        };
    }
    if let Some(l) = &raw.in_ {
        return Some(StateTest::In(values(l.get_ref(), l.span(), sink)));
    }
    if let Some(l) = &raw.not_in {
        return Some(StateTest::NotIn(values(l.get_ref(), l.span(), sink)));
    }
    sink.error(
        span.clone(),
        "a state rule needs `equals`, `in` or `not_in`",
        Some("e.g. equals = true (a leak), equals = \"open\" (a door)".into()),
    );
    None
}

pub(super) fn compile_rule(span: Range<usize>, raw: &RawRule, sink: &mut Sink<'_>) -> Option<Rule> {
    let errors_before = sink.errors.len();
    let name = raw.name.get_ref().clone();
    if !is_name(&name) {
        sink.error(
            raw.name.span(),
            format!("rule name {name:?} is not a valid name"),
            Some(NAME_HELP.into()),
        );
    }
    let kind_name = rule_kind(&span, raw, sink);
    let presence = kind_name == Some("presence");
    let (pattern, example) = if presence {
        (
            "sensors/+/status",
            "presence rules watch sensors/{device}/status, e.g. \"sensors/+/status\"",
        )
    } else {
        (
            "sensors/+/+",
            "readings arrive as sensors/{device}/{metric}; e.g. \"sensors/+/temperature\"",
        )
    };
    let filter = match &raw.filter {
        Some(f) => match TopicFilter::new(f.get_ref()) {
            Ok(filter) => {
                if !filter.can_match_pattern(pattern) {
                    sink.error(
                        f.span(),
                        format!(
                            "`match` filter {:?} can never match a {} topic",
                            f.get_ref(),
                            if presence { "status" } else { "reading" }
                        ),
                        Some(example.into()),
                    );
                }
                Some(filter)
            }
            Err(e) => {
                sink.error(
                    f.span(),
                    format!("`match` is not an MQTT topic filter: {e}"),
                    None,
                );
                None
            }
        },
        None if presence => TopicFilter::new("sensors/+/status").ok(),
        None => {
            sink.error(
                span.clone(),
                format!("rule {name:?} has no `match`"),
                Some(format!("say which topics it watches: {example}")),
            );
            None
        }
    };
    let window = |sink: &mut Sink<'_>, default: Duration| {
        let w = sink.duration(&raw.window, "window", default);
        if let Some(ws) = raw.window.as_ref().filter(|_| w < Duration::from_secs(1)) {
            sink.error(ws.span(), "`window` must be at least 1s", None);
        }
        w
    };
    let min_samples = |sink: &mut Sink<'_>, default: u32| match &raw.min_samples {
        Some(m) if *m.get_ref() < 2 => {
            sink.error(m.span(), "`min_samples` must be at least 2", None);
            default
        }
        Some(m) => *m.get_ref(),
        None => default,
    };
    let kind = match kind_name? {
        "threshold" => Kind::Threshold(compile_bounds(
            &span,
            ["above", "below", "clear_below", "clear_above"],
            [&raw.above, &raw.below, &raw.clear_below, &raw.clear_above],
            sink,
        )),
        "rate" => {
            let threshold = compile_bounds(
                &span,
                ["rate_above", "rate_below", "clear_below", "clear_above"],
                [&raw.rate_above, &raw.rate_below, &NO_BOUND, &NO_BOUND],
                sink,
            );
            let per_seconds = match raw.rate_per.as_ref().map(|p| (p, p.get_ref().as_str())) {
                None | Some((_, "second" | "s")) => 1.0,
                Some((_, "minute" | "min")) => 60.0,
                Some((p, other)) => {
                    sink.error(
                        p.span(),
                        format!("unknown `rate_per` {other:?}"),
                        Some("rate_per is \"second\" or \"minute\"".into()),
                    );
                    1.0
                }
            };
            Kind::Rate {
                threshold,
                per_seconds,
                window: window(sink, Duration::from_secs(60)),
            }
        }
        "deviation" => {
            let threshold = compile_bounds(
                &span,
                ["deviation_above", "below", "clear_within", "clear_above"],
                [
                    &raw.deviation_above,
                    &NO_BOUND,
                    &raw.clear_within,
                    &NO_BOUND,
                ],
                sink,
            );
            if let Some(d) = raw.deviation_above.as_ref().filter(|d| *d.get_ref() <= 0.0) {
                sink.error(
                    d.span(),
                    "`deviation_above` is a number of standard deviations and must be positive",
                    Some("e.g. deviation_above = 4.0".into()),
                );
            }
            Kind::Deviation {
                threshold,
                window: window(sink, Duration::from_secs(600)),
                min_samples: min_samples(sink, 10),
            }
        }
        "silence" => {
            let scope = match raw.scope.as_ref().map(|s| (s, s.get_ref().as_str())) {
                None | Some((_, "metric")) => Scope::Metric,
                Some((_, "device")) => Scope::Device,
                Some((s, other)) => {
                    sink.error(s.span(), format!("unknown `scope` {other:?}"), Some("scope is \"metric\" (each metric on its own) or \"device\" (any matching metric counts)".into()));
                    Scope::Metric
                }
            };
            let after = match (&raw.silent_for, &raw.silent_factor) {
                (Some(_), Some(f)) => {
                    sink.error(
                        f.span(),
                        "give `silent_for` or `silent_factor`, not both",
                        None,
                    );
                    SilenceAfter::Fixed(Duration::ZERO)
                }
                (Some(_), None) => {
                    let d = sink.duration(&raw.silent_for, "silent_for", Duration::ZERO);
                    if d < Duration::from_secs(1) {
                        sink.error(
                            raw.silent_for.as_ref().map_or(span.clone(), |s| s.span()),
                            "`silent_for` must be at least 1s",
                            None,
                        );
                    }
                    SilenceAfter::Fixed(d)
                }
                (None, Some(f)) => {
                    if !(f.get_ref().is_finite() && *f.get_ref() > 1.0) {
                        sink.error(f.span(), "`silent_factor` must be more than 1 (a multiple of the learned reporting interval)", Some("e.g. silent_factor = 3.0".into()));
                    }
                    SilenceAfter::Learned {
                        factor: *f.get_ref(),
                        min_samples: min_samples(sink, 5),
                    }
                }
                (None, None) => {
                    sink.error(
                        span.clone(),
                        "a silence rule needs `silent_for` or `silent_factor`",
                        None,
                    );
                    SilenceAfter::Fixed(Duration::ZERO)
                }
            };
            Kind::Silence { after, scope }
        }
        "presence" => Kind::Presence {
            grace: sink.duration(&raw.offline_for, "offline_for", Duration::ZERO),
        },
        "state" => Kind::State(compile_state_test(&span, raw, sink)?),
        "flapping" => {
            let Some(changes) = raw.changes_above.as_ref() else {
                sink.error(
                    span.clone(),
                    "a flapping rule needs `changes_above`",
                    Some("e.g. changes_above = 5 with window = \"10m\": more than 5 changes within 10 minutes".into()),
                );
                return None;
            };
            Kind::Flapping {
                changes: *changes.get_ref(),
                window: window(sink, Duration::from_secs(600)),
            }
        }
        _ => unreachable!("rule_kind returns known kinds"),
    };
    if let Some(h) = raw
        .hold
        .as_ref()
        .filter(|_| matches!(kind, Kind::Silence { .. } | Kind::Presence { .. }))
    {
        let instead = if presence {
            "offline_for"
        } else {
            "silent_for"
        };
        sink.error(
            h.span(),
            format!("`for` does not apply to {} rules", kind.name()),
            Some(format!("their waiting time is `{instead}`")),
        );
    }
    if let Some(m) = raw.min_samples.as_ref().filter(|_| {
        !matches!(
            kind,
            Kind::Deviation { .. }
                | Kind::Silence {
                    after: SilenceAfter::Learned { .. },
                    ..
                }
        )
    }) {
        sink.error(
            m.span(),
            "`min_samples` applies to deviation rules and to silence rules with `silent_factor`",
            None,
        );
    }
    if let Some(w) = raw.window.as_ref().filter(|_| {
        !matches!(
            kind,
            Kind::Rate { .. } | Kind::Deviation { .. } | Kind::Flapping { .. }
        )
    }) {
        sink.error(
            w.span(),
            "`window` applies to rate, deviation and flapping rules",
            None,
        );
    }
    let hold = sink.duration(&raw.hold, "for", Duration::ZERO);
    let renotify = raw
        .renotify
        .as_ref()
        .map(|r| sink.duration(&Some(r.clone()), "renotify", Duration::from_secs(3600)));
    if let (Some(r), Some(d)) = (&raw.renotify, renotify) {
        if d < Duration::from_secs(1) {
            sink.error(r.span(), "`renotify` must be at least 1s", None);
        }
    }
    let cooldown = raw
        .cooldown
        .as_ref()
        .map(|c| sink.duration(&Some(c.clone()), "cooldown", Duration::ZERO));
    let labels = raw
        .labels
        .as_ref()
        .map_or_else(BTreeMap::new, |l| l.get_ref().clone());
    if let Some(l) = &raw.labels {
        for key in l.get_ref().keys().filter(|k| !is_name(k)) {
            sink.error(
                l.span(),
                format!("label name {key:?} is not a valid name"),
                Some(NAME_HELP.into()),
            );
        }
    }
    let severity = raw
        .severity
        .as_ref()
        .map_or(Severity::Warning, |s| *s.get_ref());
    if sink.errors.len() > errors_before {
        return None;
    }
    Some(Rule {
        name,
        filter: filter?,
        kind,
        hold,
        severity,
        renotify,
        cooldown: cooldown.filter(|c| !c.is_zero()),
        forward: raw.forward.as_ref().map(|f| *f.get_ref()),
        labels,
    })
}

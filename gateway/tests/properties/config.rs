//! The configuration parser and checker (`config::parse`) on the seed corpus, on the shipped
//! configurations, on mutations of both, and on generated sites: a generated valid site loads as
//! written, and a generated site with one defect is refused with exactly one error, on the
//! defect's line.

use std::time::Duration;

use proptest::prelude::*;
use watchpost::config::{self, Config};
use watchpost::rules::{Kind, Rule, Scope, Severity, SilenceAfter, Threshold};

use crate::check::{self, Outcome};
use crate::corpus::{awkward_char, cases, files, mutant_of, seeds};

/// Tokens of TOML and of the configuration's own language, and hostile ones.
const TOML_TOKENS: &[&str] = &[
    "[",
    "]",
    "[[rule]]",
    "[gateway]",
    "[[source]]",
    "[broker]",
    "=",
    "\"",
    "'",
    "\"\"\"",
    "'''",
    "\\",
    "\\u00e9",
    "\\U0010FFFF",
    "#",
    "\n",
    "\r\n",
    "\r",
    "\t",
    ",",
    "{",
    "}",
    ".",
    "1e999",
    "inf",
    "nan",
    "-0",
    "0x",
    "9223372036854775808",
    "18446744073709551616",
    "1979-05-27T07:32:00Z",
    "true",
    "é",
    "🔥",
    "\u{feff}",
    "\u{0}",
    "\"sensors/+/t\"",
    "\"10s\"",
    "\"18446744073709551615s\"",
    "above",
    "below",
    "name",
    "match",
    "for",
    "labels",
    "kind",
    "\"yaml\"",
    "{device}",
    "{metric}",
];

/// Seeds: the committed corpus and the shipped configurations.
fn all_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = seeds("config");
    seeds.extend(
        files("../config")
            .into_iter()
            .filter(|(name, _)| name.ends_with(".toml")),
    );
    seeds
}

#[test]
fn every_seed_keeps_the_contract_and_loads_as_its_name_says() {
    let seeds = all_seeds();
    assert!(
        seeds.iter().any(|(n, _)| n == "watchpost.toml"),
        "the shipped configurations are seeds"
    );
    for (name, data) in seeds {
        let text = String::from_utf8(data).expect("config seeds are UTF-8");
        check::config(&text);
        let outcome = check::parse_config(&text);
        if name.starts_with("valid-") || !name.contains('-') {
            assert!(matches!(outcome, Outcome::Ok(..)), "{name}: {outcome:?}");
        } else if name.starts_with("error-") {
            assert!(matches!(outcome, Outcome::Err(_)), "{name}: {outcome:?}");
        }
    }
}

#[test]
fn the_semantic_seed_reports_every_error_at_once() {
    // One file with a mistake in nearly every field: each is reported, none hides another.
    let text = std::fs::read_to_string(
        crate::corpus::manifest_dir().join("tests/corpus/config/error-semantics.toml"),
    )
    .unwrap();
    let Outcome::Err(errors) = check::parse_config(&text) else {
        panic!("error-semantics.toml loaded")
    };
    let lines: std::collections::BTreeSet<usize> = errors.iter().map(|d| d.line).collect();
    assert!(
        lines.len() >= 25,
        "{} lines with errors: {errors:#?}",
        lines.len()
    );
}

proptest! {
    #![proptest_config(cases(192))]

    #[test]
    fn mutated_configurations_keep_the_contract(
        data in mutant_of(all_seeds().into_iter().map(|(_, d)| d).collect(), TOML_TOKENS)
    ) {
        check::config(&String::from_utf8_lossy(&data));
    }
}

// ---------------------------------------------------------------------------------------------
// Generated sites.

/// A rule's condition, always valid as generated.
#[derive(Debug, Clone)]
enum Cond {
    Above {
        above: f64,
        clear_below: Option<f64>,
    },
    Below {
        below: f64,
        clear_above: Option<f64>,
    },
    Band {
        below: f64,
        clear_above: f64,
        clear_below: f64,
        above: f64,
    },
    Rate {
        above: f64,
        per_minute: bool,
        window_s: u32,
    },
    Deviation {
        above: f64,
        within: Option<f64>,
        window_s: u32,
        min_samples: u32,
    },
    SilentFor {
        secs: u32,
    },
    Learned {
        factor: f64,
        min_samples: u32,
        device: bool,
    },
    Presence {
        offline_s: u32,
        filter: bool,
    },
}

#[derive(Debug, Clone)]
struct GenRule {
    name: String,
    filter: String,
    cond: Cond,
    hold_s: Option<u32>,
    severity: Option<Severity>,
    labels: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
struct Site {
    id: String,
    max_payload: Option<usize>,
    uplink: Option<(bool, String, Option<u16>, Vec<Severity>)>,
    /// Username and password upstream (written only with an uplink).
    login: Option<(String, String)>,
    rules: Vec<GenRule>,
    crlf: bool,
    /// Layout choices, used in turn: blank lines, comments, spacing around `=`.
    layout: Vec<u8>,
}

fn finite() -> impl Strategy<Value = f64> {
    prop_oneof![
        3 => -1000.0f64..1000.0,
        1 => any::<i32>().prop_map(f64::from),
        1 => any::<f64>().prop_filter("finite", |f| f.is_finite()),
    ]
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_.-]{1,12}"
}

fn cond() -> impl Strategy<Value = Cond> {
    prop_oneof![
        (finite(), prop::option::of(0.0f64..100.0)).prop_map(|(above, d)| Cond::Above {
            above,
            clear_below: d.map(|d| above - d).filter(|c| c.is_finite()),
        }),
        (finite(), prop::option::of(0.0f64..100.0)).prop_map(|(below, d)| Cond::Below {
            below,
            clear_above: d.map(|d| below + d).filter(|c| c.is_finite()),
        }),
        (-1e6f64..1e6, 0.0f64..10.0, 0.001f64..10.0, 0.0f64..10.0).prop_map(|(b, d1, d2, d3)| {
            Cond::Band {
                below: b,
                clear_above: b + d1,
                clear_below: b + d1 + d2,
                above: b + d1 + d2 + d3,
            }
        }),
        (0.001f64..1e6, any::<bool>(), 1u32..100_000).prop_map(|(above, per_minute, window_s)| {
            Cond::Rate {
                above,
                per_minute,
                window_s,
            }
        }),
        (
            0.001f64..100.0,
            prop::option::of(0.0f64..1.0),
            1u32..100_000,
            2u32..1000
        )
            .prop_map(|(above, within, window_s, min_samples)| Cond::Deviation {
                above,
                within: within.map(|w| w * above),
                window_s,
                min_samples,
            }),
        (1u32..1_000_000).prop_map(|secs| Cond::SilentFor { secs }),
        (1.001f64..100.0, 2u32..100, any::<bool>()).prop_map(|(factor, min_samples, device)| {
            Cond::Learned {
                factor,
                min_samples,
                device,
            }
        }),
        (0u32..100_000, any::<bool>())
            .prop_map(|(offline_s, filter)| Cond::Presence { offline_s, filter }),
    ]
}

fn rule() -> impl Strategy<Value = GenRule> {
    (
        name(),
        prop::sample::select(vec![
            "sensors/+/+",
            "sensors/#",
            "sensors/+/temperature",
            "sensors/boiler-1/+",
            "sensors/+/température",
        ]),
        cond(),
        prop::option::of(0u32..100_000),
        prop::option::of(prop::sample::select(vec![
            Severity::Info,
            Severity::Warning,
            Severity::Critical,
        ])),
        prop::collection::vec((name(), "\\PC{0,8}"), 0..3),
    )
        .prop_map(|(name, filter, cond, hold_s, severity, mut labels)| {
            // A key twice in one inline table is a TOML error, not what is generated here.
            let mut seen = std::collections::HashSet::new();
            labels.retain(|(k, _)| seen.insert(k.clone()));
            GenRule {
                name,
                filter: filter.to_owned(),
                cond,
                hold_s,
                severity,
                labels,
            }
        })
}

fn site() -> impl Strategy<Value = Site> {
    (
        name(),
        prop::option::of(16usize..=1024 * 1024),
        prop::option::of((
            any::<bool>(),
            "[a-z][a-z0-9-]{0,10}(\\.[a-z]{2,5}){0,2}",
            prop::option::of(1u16..),
            prop::sample::subsequence(
                vec![Severity::Info, Severity::Warning, Severity::Critical],
                0..=3,
            ),
        )),
        prop::option::of((name(), "[A-Za-z0-9!@%^&*()_+=~-]{12,24}")),
        prop::collection::vec(rule(), 1..5),
        any::<bool>(),
        prop::collection::vec(any::<u8>(), 16),
    )
        .prop_map(
            |(id, max_payload, uplink, login, mut rules, crlf, layout)| {
                // Rule names are unique in a valid site.
                for i in 0..rules.len() {
                    if rules[..i].iter().any(|r| r.name == rules[i].name) {
                        rules[i].name = format!("{}-{i}", rules[i].name);
                    }
                }
                Site {
                    id,
                    max_payload,
                    login: login.filter(|_| uplink.is_some()),
                    uplink,
                    rules,
                    crlf,
                    layout,
                }
            },
        )
}

/// Where a line of a rendered site came from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Section {
    Gateway,
    Broker,
    Uplink,
    Rule(usize),
    None,
}

#[derive(Debug, Clone)]
struct Line {
    text: String,
    section: Section,
    key: &'static str,
}

fn toml_string(s: &str) -> String {
    // TOML basic strings escape like JSON for everything generated here.
    serde_json::to_string(s).unwrap()
}

fn toml_float(f: f64) -> String {
    // Rust's shortest round-trip form; TOML reads it back to the same f64.
    format!("{f:?}")
}

fn severity_name(s: Severity) -> &'static str {
    s.as_str()
}

impl Site {
    fn lines(&self) -> Vec<Line> {
        let mut out = Vec::new();
        let mut push = |section, key, text: String| out.push(Line { text, section, key });
        push(Section::Gateway, "", "[gateway]".into());
        push(
            Section::Gateway,
            "id",
            format!("id = {}", toml_string(&self.id)),
        );
        if let Some(n) = self.max_payload {
            push(Section::Broker, "", "[broker]".into());
            push(
                Section::Broker,
                "max_payload_bytes",
                format!("max_payload_bytes = {n}"),
            );
        }
        if let Some((tls, host, port, forward)) = &self.uplink {
            push(Section::Uplink, "", "[uplink]".into());
            let scheme = if *tls { "mqtts" } else { "mqtt" };
            let port = port.map_or(String::new(), |p| format!(":{p}"));
            push(
                Section::Uplink,
                "url",
                format!("url = \"{scheme}://{host}{port}\""),
            );
            let f: Vec<_> = forward
                .iter()
                .map(|s| format!("\"{}\"", severity_name(*s)))
                .collect();
            push(
                Section::Uplink,
                "forward",
                format!("forward = [{}]", f.join(", ")),
            );
            if let Some((user, password)) = &self.login {
                push(
                    Section::Uplink,
                    "username",
                    format!("username = {}", toml_string(user)),
                );
                push(
                    Section::Uplink,
                    "password",
                    format!("password = {}", toml_string(password)),
                );
            }
        }
        for (i, r) in self.rules.iter().enumerate() {
            let s = Section::Rule(i);
            push(s, "", "[[rule]]".into());
            push(s, "name", format!("name = {}", toml_string(&r.name)));
            let mut f = |key: &'static str, value: String| push(s, key, format!("{key} = {value}"));
            match &r.cond {
                Cond::Presence { filter: false, .. } => {}
                Cond::Presence { filter: true, .. } => f("match", "\"sensors/+/status\"".into()),
                _ => f("match", toml_string(&r.filter)),
            }
            match &r.cond {
                Cond::Above { above, clear_below } => {
                    f("above", toml_float(*above));
                    if let Some(c) = clear_below {
                        f("clear_below", toml_float(*c));
                    }
                }
                Cond::Below { below, clear_above } => {
                    f("below", toml_float(*below));
                    if let Some(c) = clear_above {
                        f("clear_above", toml_float(*c));
                    }
                }
                Cond::Band {
                    below,
                    clear_above,
                    clear_below,
                    above,
                } => {
                    f("kind", "\"threshold\"".into());
                    f("above", toml_float(*above));
                    f("clear_below", toml_float(*clear_below));
                    f("below", toml_float(*below));
                    f("clear_above", toml_float(*clear_above));
                }
                Cond::Rate {
                    above,
                    per_minute,
                    window_s,
                } => {
                    f("rate_above", toml_float(*above));
                    f(
                        "rate_per",
                        if *per_minute {
                            "\"minute\""
                        } else {
                            "\"second\""
                        }
                        .into(),
                    );
                    f("window", format!("\"{window_s}s\""));
                }
                Cond::Deviation {
                    above,
                    within,
                    window_s,
                    min_samples,
                } => {
                    f("deviation_above", toml_float(*above));
                    if let Some(w) = within {
                        f("clear_within", toml_float(*w));
                    }
                    f("window", format!("\"{window_s}s\""));
                    f("min_samples", min_samples.to_string());
                }
                Cond::SilentFor { secs } => f("silent_for", format!("\"{secs}s\"")),
                Cond::Learned {
                    factor,
                    min_samples,
                    device,
                } => {
                    f("silent_factor", toml_float(*factor));
                    f("min_samples", min_samples.to_string());
                    f(
                        "scope",
                        if *device { "\"device\"" } else { "\"metric\"" }.into(),
                    );
                }
                Cond::Presence { offline_s, .. } => f("offline_for", format!("\"{offline_s}s\"")),
            }
            let waits = matches!(
                r.cond,
                Cond::SilentFor { .. } | Cond::Learned { .. } | Cond::Presence { .. }
            );
            if let Some(h) = r.hold_s.filter(|_| !waits) {
                f("for", format!("\"{h}s\""));
            }
            if let Some(sev) = r.severity {
                f("severity", format!("\"{}\"", severity_name(sev)));
            }
            if !r.labels.is_empty() {
                let l: Vec<_> = r
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{} = {}", toml_string(k), toml_string(v)))
                    .collect();
                f("labels", format!("{{ {} }}", l.join(", ")));
            }
        }
        out
    }

    /// The lines with comments, blank lines and spacing from `layout` woven in.
    fn decorate(&self, lines: Vec<Line>) -> Vec<Line> {
        let mut choices = self.layout.iter().cycle();
        let mut out = Vec::new();
        for mut line in lines {
            let c = *choices.next().unwrap();
            if c % 7 == 0 {
                out.push(Line {
                    text: String::new(),
                    section: Section::None,
                    key: "",
                });
            }
            if c % 11 == 0 {
                out.push(Line {
                    text: "# réglage — ✓".into(),
                    section: Section::None,
                    key: "",
                });
            }
            if !line.key.is_empty() && c % 3 == 0 {
                line.text = line.text.replacen(" = ", "   =\t", 1);
            }
            if c % 5 == 0 {
                line.text.push_str("  # 注 note");
            }
            out.push(line);
        }
        out
    }

    fn render(lines: &[Line], crlf: bool) -> String {
        let nl = if crlf { "\r\n" } else { "\n" };
        lines.iter().map(|l| format!("{}{nl}", l.text)).collect()
    }
}

fn expected_rule(r: &GenRule) -> (String, &str, Kind, Duration) {
    let t = |above, below, clear_below, clear_above| Threshold {
        above,
        below,
        clear_below,
        clear_above,
    };
    let filter = match r.cond {
        Cond::Presence { .. } => "sensors/+/status",
        _ => r.filter.as_str(),
    };
    let kind = match &r.cond {
        Cond::Above { above, clear_below } => {
            Kind::Threshold(t(Some(*above), None, *clear_below, None))
        }
        Cond::Below { below, clear_above } => {
            Kind::Threshold(t(None, Some(*below), None, *clear_above))
        }
        Cond::Band {
            below,
            clear_above,
            clear_below,
            above,
        } => Kind::Threshold(t(
            Some(*above),
            Some(*below),
            Some(*clear_below),
            Some(*clear_above),
        )),
        Cond::Rate {
            above,
            per_minute,
            window_s,
        } => Kind::Rate {
            threshold: t(Some(*above), None, None, None),
            per_seconds: if *per_minute { 60.0 } else { 1.0 },
            window: Duration::from_secs((*window_s).into()),
        },
        Cond::Deviation {
            above,
            within,
            window_s,
            min_samples,
        } => Kind::Deviation {
            threshold: t(Some(*above), None, *within, None),
            window: Duration::from_secs((*window_s).into()),
            min_samples: *min_samples,
        },
        Cond::SilentFor { secs } => Kind::Silence {
            after: SilenceAfter::Fixed(Duration::from_secs((*secs).into())),
            scope: Scope::Metric,
        },
        Cond::Learned {
            factor,
            min_samples,
            device,
        } => Kind::Silence {
            after: SilenceAfter::Learned {
                factor: *factor,
                min_samples: *min_samples,
            },
            scope: if *device {
                Scope::Device
            } else {
                Scope::Metric
            },
        },
        Cond::Presence { offline_s, .. } => Kind::Presence {
            grace: Duration::from_secs((*offline_s).into()),
        },
    };
    let waits = matches!(
        r.cond,
        Cond::SilentFor { .. } | Cond::Learned { .. } | Cond::Presence { .. }
    );
    let hold = Duration::from_secs(r.hold_s.filter(|_| !waits).unwrap_or(0).into());
    (r.name.clone(), filter, kind, hold)
}

fn assert_loaded_as_written(site: &Site, c: &Config, text: &str) {
    assert_eq!(c.gateway.id, site.id, "{text}");
    assert_eq!(
        c.broker.limits.max_payload_bytes,
        site.max_payload.unwrap_or(4096),
        "{text}"
    );
    match (&site.uplink, &c.uplink) {
        (None, None) => {}
        (Some((tls, host, port, forward)), Some(u)) => {
            assert_eq!((u.tls, u.host.as_str()), (*tls, host.as_str()), "{text}");
            assert_eq!(
                u.port,
                port.unwrap_or(if *tls { 8883 } else { 1883 }),
                "{text}"
            );
            assert_eq!(&u.forward, forward, "{text}");
            let login = u
                .login
                .as_ref()
                .map(|(user, p)| (user.clone(), p.expose().to_owned()));
            assert_eq!(login, site.login, "{text}");
        }
        (a, b) => panic!("uplink {a:?} loaded as {b:?}\n{text}"),
    }
    assert_eq!(c.rules.len(), site.rules.len(), "{text}");
    for (g, r) in site.rules.iter().zip(&c.rules) {
        let (name, filter, kind, hold) = expected_rule(g);
        let Rule {
            name: n,
            filter: f,
            kind: k,
            hold: h,
            severity,
            labels,
            ..
        } = r;
        assert_eq!(
            (n, f.as_str(), k, h),
            (&name, filter, &kind, &hold),
            "{text}"
        );
        assert_eq!(*severity, g.severity.unwrap_or(Severity::Warning), "{text}");
        let expected: std::collections::BTreeMap<_, _> = g.labels.iter().cloned().collect();
        assert_eq!(labels, &expected, "{text}");
    }
}

/// One mistake an operator makes, put into a valid site.
#[derive(Debug, Clone, Copy)]
enum Defect {
    UnknownField,
    BadDuration,
    BadRuleName,
    DuplicateName,
    WrongType,
    InvertedHysteresis,
    SmallPayloadLimit,
    BadUrl,
    BadFilter,
    BadSeverity,
    BadGatewayId,
    UnclosedString,
}

const DEFECTS: &[Defect] = &[
    Defect::UnknownField,
    Defect::BadDuration,
    Defect::BadRuleName,
    Defect::DuplicateName,
    Defect::WrongType,
    Defect::InvertedHysteresis,
    Defect::SmallPayloadLimit,
    Defect::BadUrl,
    Defect::BadFilter,
    Defect::BadSeverity,
    Defect::BadGatewayId,
    Defect::UnclosedString,
];

/// Puts `defect` into `lines` (at the `pick`-th place it fits); returns the index of the line
/// the error must be reported on and a fragment of its message, or `None` if it fits nowhere.
fn inject(lines: &mut Vec<Line>, defect: Defect, pick: usize) -> Option<(usize, &'static str)> {
    let find = |lines: &[Line], pred: &dyn Fn(&Line) -> bool| -> Option<usize> {
        let at: Vec<usize> = (0..lines.len()).filter(|i| pred(&lines[*i])).collect();
        (!at.is_empty()).then(|| at[pick % at.len()])
    };
    let set = |line: &mut Line, value: &str| line.text = format!("{} = {value}", line.key);
    let fields = |keys: &'static [&'static str]| {
        move |l: &Line| keys.contains(&l.key) && matches!(l.section, Section::Rule(_))
    };
    match defect {
        Defect::UnknownField => {
            let i = find(lines, &|l| !l.key.is_empty())?;
            let section = lines[i].section;
            lines.insert(
                i + 1,
                Line {
                    text: "\"colour-é🔥\" = \"red\"".into(),
                    section,
                    key: "colour",
                },
            );
            Some((i + 1, "unknown field `colour-é🔥`"))
        }
        Defect::BadDuration => {
            let i = find(lines, &fields(&["for"]))?;
            set(&mut lines[i], "\"soon\"");
            Some((i, "`for` is not a duration"))
        }
        Defect::BadRuleName => {
            let i = find(lines, &fields(&["name"]))?;
            set(&mut lines[i], "\"no good\"");
            Some((i, "is not a valid name"))
        }
        Defect::DuplicateName => {
            let first = lines.iter().position(|l| l.key == "name")?;
            let i = find(lines, &|l| l.key == "name" && l.section != Section::Rule(0))?;
            lines[i].text = lines[first].text.clone();
            Some((i, "two rules are named"))
        }
        Defect::WrongType => {
            let i = find(
                lines,
                &fields(&[
                    "above",
                    "below",
                    "rate_above",
                    "deviation_above",
                    "silent_factor",
                ]),
            )?;
            set(&mut lines[i], "\"hot\"");
            Some((i, "invalid type"))
        }
        Defect::InvertedHysteresis => {
            let i = find(lines, &fields(&["clear_below"]))?;
            let Section::Rule(r) = lines[i].section else {
                unreachable!()
            };
            let above = lines
                .iter()
                .find(|l| l.section == Section::Rule(r) && l.key == "above")?;
            let above: f64 = above
                .text
                .split('=')
                .nth(1)?
                .split('#')
                .next()?
                .trim()
                .parse()
                .ok()?;
            let clear_below = Some(above + above.abs() + 1.0).filter(|c| c.is_finite())?;
            set(&mut lines[i], &toml_float(clear_below));
            Some((i, "inverted hysteresis"))
        }
        Defect::SmallPayloadLimit => {
            let i = find(lines, &|l| l.key == "max_payload_bytes")?;
            set(&mut lines[i], "8");
            Some((i, "`max_payload_bytes` must be between"))
        }
        Defect::BadUrl => {
            let i = find(lines, &|l| l.key == "url")?;
            set(&mut lines[i], "\"http://broker.example.net\"");
            Some((i, "is not a broker URL"))
        }
        Defect::BadFilter => {
            let i = find(lines, &fields(&["match"]))?;
            set(&mut lines[i], "\"sensors/#/t\"");
            Some((i, "is not an MQTT topic filter"))
        }
        Defect::BadSeverity => {
            let i = find(lines, &fields(&["severity"]))?;
            set(&mut lines[i], "\"urgent\"");
            Some((i, "unknown variant"))
        }
        Defect::BadGatewayId => {
            let i = find(lines, &|l| l.key == "id")?;
            set(&mut lines[i], "\"my site\"");
            Some((i, "gateway id"))
        }
        Defect::UnclosedString => {
            let i = find(lines, &fields(&["name", "match"]))?;
            set(&mut lines[i], "\"unclosed");
            Some((i, ""))
        }
    }
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn a_generated_site_loads_as_written(site in site()) {
        let lines = site.decorate(site.lines());
        let text = Site::render(&lines, site.crlf);
        let loaded = config::parse(&text, check::CONFIG_NAME)
            .unwrap_or_else(|e| panic!("refused:\n{e}\n{text}"));
        assert_loaded_as_written(&site, &loaded.config, &text);
        if let Some((_, password)) = &site.login {
            let shown = format!("{:?}{:?}", loaded.config, loaded.warnings);
            prop_assert!(!shown.contains(password.as_str()), "the password shows: {}", shown);
        }
        check::config(&text);
    }

    #[test]
    fn one_defect_gives_one_error_on_its_line(
        site in site(),
        defect in prop::sample::select(DEFECTS),
        pick in any::<usize>(),
    ) {
        let mut lines = site.decorate(site.lines());
        let Some((index, fragment)) = inject(&mut lines, defect, pick) else {
            return Ok(());
        };
        let text = Site::render(&lines, site.crlf);
        let errors = match config::parse(&text, check::CONFIG_NAME) {
            Ok(_) => panic!("{defect:?} on line {} was accepted\n{text}", index + 1),
            Err(e) => e.errors,
        };
        // A syntax error may come as more than one diagnostic from the TOML library (an
        // unclosed string in a CRLF file: the '\r', then the missing quote); all on its line.
        if !matches!(defect, Defect::UnclosedString) {
            prop_assert_eq!(errors.len(), 1, "{:?} on line {}:\n{:#?}\n{}", defect, index + 1, errors, text);
        }
        for d in &errors {
            prop_assert_eq!(d.line, index + 1, "{:?}: {}\n{}", defect, d, text);
            prop_assert!(d.message.contains(fragment), "{:?}: {}\n{}", defect, d, text);
            if let Some((_, password)) = &site.login {
                prop_assert!(!d.to_string().contains(password.as_str()), "the password shows: {}", d);
            }
        }
        check::config(&text);
    }

    /// A syntax error after arbitrary text on its line is reported at the character column
    /// where the stray token starts.
    #[test]
    fn syntax_error_columns_count_characters(
        value in prop::collection::vec(awkward_char(), 0..12),
        pad in " {0,3}",
    ) {
        let value: String = value.into_iter().filter(|c| !c.is_control() && !matches!(c, '"' | '\\')).collect();
        let prefix = format!("id = {}{pad} ", toml_string(&value));
        let text = format!("[gateway]\n{prefix}junk\n");
        let e = config::parse(&text, check::CONFIG_NAME).unwrap_err();
        let d = &e.errors[0];
        prop_assert_eq!((d.line, d.column), (2, prefix.chars().count() + 1), "{}\n{:?}", d, text);
    }

    /// A semantic error on a value after arbitrary text on its line (an inline table) is
    /// reported at the character column where the value starts.
    #[test]
    fn semantic_error_columns_count_characters(name in prop::collection::vec(awkward_char(), 0..12)) {
        let name: String = name.into_iter().filter(|c| !c.is_control() && !matches!(c, '"' | '\\')).collect();
        let prefix = format!("rule = [{{ name = {}, above = 1, match = ", toml_string(&format!("r{name}")));
        let text = format!("{prefix}\"alerts/#\" }}]\n[gateway]\nid = \"s\"\n");
        let e = config::parse(&text, check::CONFIG_NAME).unwrap_err();
        let d = e.errors.iter().find(|d| d.message.contains("`match`")).expect("the match error");
        prop_assert_eq!((d.line, d.column), (1, prefix.chars().count() + 1), "{}\n{:?}", d, text);
    }
}

//! The parsers of `watchpost test-rules` (`replay::parse_readings`, `replay::parse_expected`):
//! generated files read back exactly as written, a file with one bad line is refused with
//! exactly that line named, and mutations of the seeds keep the contract.

use std::time::{Duration, UNIX_EPOCH};

use proptest::prelude::*;
use serde_json::json;
use watchpost::replay::{self, Expected, Recorded};
use watchpost::rules::AlertState;
use watchpost::value::Value;

use crate::check::{self, LAST_RFC3339_MS};
use crate::corpus::{cases, files, mutant_of, seeds};

const TOKENS: &[&str] = &[
    ",",
    "\n",
    "\r\n",
    "#",
    " ",
    "time",
    "time,device,metric,value",
    "{",
    "}",
    "\"",
    ":",
    "\"time\":",
    "\"value\":",
    "1e300",
    "-1",
    "NaN",
    "inf",
    "1e11",
    "100000000001",
    "é",
    "9999-12-31T23:59:59Z",
    "10000-01-01T00:00:00Z",
    "1969-12-31T23:59:59Z",
    "\u{feff}",
];

fn reading_seeds() -> Vec<Vec<u8>> {
    let mut seeds: Vec<_> = seeds("readings").into_iter().map(|(_, d)| d).collect();
    seeds.extend(
        files("../config/examples")
            .into_iter()
            .filter(|(name, _)| name.ends_with(".csv") || name.ends_with(".jsonl"))
            .map(|(_, d)| d),
    );
    seeds
}

#[test]
fn every_seed_keeps_the_contract() {
    for data in reading_seeds() {
        let text = String::from_utf8(data).expect("seeds are UTF-8");
        check::readings(&text);
        check::expected(&text);
    }
    for (_, data) in seeds("expected") {
        check::expected(&String::from_utf8(data).unwrap());
    }
}

/// How a time is written in a readings file.
#[derive(Debug, Clone, Copy)]
enum TimeForm {
    Rfc3339,
    Seconds,
    FractionalSeconds,
    Milliseconds,
}

/// `at` written in `form`, if that form can say it exactly.
fn write_time(at: u64, form: TimeForm) -> Option<String> {
    let secs_ok = at / 1000 <= 100_000_000_000;
    match form {
        TimeForm::Rfc3339 => Some(
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(at)).to_string(),
        ),
        TimeForm::Seconds => (at % 1000 == 0 && secs_ok).then(|| (at / 1000).to_string()),
        TimeForm::FractionalSeconds => secs_ok.then(|| format!("{}.{:03}", at / 1000, at % 1000)),
        TimeForm::Milliseconds => (at > 100_000_000_000).then(|| at.to_string()),
    }
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        (-1e4f64..1e4).prop_map(Value::Number),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::Number),
        Just(Value::Number(-0.0)),
        any::<bool>().prop_map(Value::Bool),
        // Words as a state is written: the common ones in lower case, others as they are.
        "(open|closed|on|off|heat|idle|Single Click|a_b-c)".prop_map(|w| Value::parse(&w).unwrap()),
    ]
}

fn recorded() -> impl Strategy<Value = (Recorded, TimeForm, u8)> {
    (
        prop_oneof![
            0u64..=LAST_RFC3339_MS,
            1_700_000_000_000u64..1_900_000_000_000
        ],
        "[a-zA-Z0-9_][a-zA-Z0-9_.:/-]{0,9}",
        "[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,9}",
        value(),
        prop::sample::select(vec![
            TimeForm::Rfc3339,
            TimeForm::Seconds,
            TimeForm::FractionalSeconds,
            TimeForm::Milliseconds,
        ]),
        any::<u8>(),
    )
        .prop_map(|(at, device, metric, value, form, style)| {
            // Only the forms that can say `at` exactly; RFC 3339 always can.
            let form = if write_time(at, form).is_some() {
                form
            } else {
                TimeForm::Rfc3339
            };
            (
                Recorded {
                    at,
                    device,
                    metric,
                    value,
                },
                form,
                style,
            )
        })
}

/// A readings file: CSV (with or without header) or JSON lines, with comments, blank lines,
/// padding and CRLF as `style` says; one line per reading, in order, and the line number of
/// each reading.
fn write_readings(
    rows: &[(Recorded, TimeForm, u8)],
    jsonl: bool,
    header: bool,
    crlf: bool,
) -> (String, Vec<usize>) {
    let nl = if crlf { "\r\n" } else { "\n" };
    let mut lines: Vec<String> = Vec::new();
    let mut numbers = Vec::new();
    if header && !jsonl {
        lines.push("time,device,metric,value".into());
    }
    for (r, form, style) in rows {
        if style % 5 == 0 {
            lines.push(String::new());
        }
        if style % 7 == 0 {
            lines.push("  # recorded on site — ✓".into());
        }
        let time = write_time(r.at, *form).unwrap();
        let line = if jsonl {
            let time = match form {
                TimeForm::Rfc3339 => json!(time),
                _ => serde_json::from_str(&time).unwrap(),
            };
            json!({"time": time, "device": r.device, "metric": r.metric, "value": r.value})
                .to_string()
        } else {
            let v = match r.value.as_number() {
                Some(n) if style % 2 == 1 => format!("{n:e}"),
                _ => r.value.to_string(),
            };
            let sep = if style % 3 == 0 { " , " } else { "," };
            [time, r.device.clone(), r.metric.clone(), v].join(sep)
        };
        lines.push(line);
        numbers.push(lines.len());
    }
    (lines.iter().map(|l| format!("{l}{nl}")).collect(), numbers)
}

/// A line that must be refused, in CSV or JSON lines.
fn bad_line(jsonl: bool) -> impl Strategy<Value = String> {
    let csv = vec![
        "yesterday,a,t,1",
        "1,a,t",
        "1,a,t,1,2",
        ",a,t,1",
        "1,,t,1",
        "1,a,,1",
        "1,a,t,NaN",
        "1,a,t,inf",
        "1,a,t,-infinity",
        "1,a,t,[x]",
        "1,a,t,\"quoted\"",
        "-1,a,t,1",
        "1,a,t,1e999",
        "2026-13-01T00:00:00Z,a,t,1",
        "1e15,a,t,1",
        "253402300800000,a,t,1",
    ];
    let jsonl_lines = vec![
        r#"{"time":1,"device":"a","metric":"t"}"#,
        r#"{"time":true,"device":"a","metric":"t","value":1}"#,
        r#"{"time":1,"device":"a","metric":"t","value":null}"#,
        r#"{"time":1,"device":"a","metric":"t","value":[1]}"#,
        r#"{"time":1,"device":"","metric":"t","value":1}"#,
        r#"{"time":-5,"device":"a","metric":"t","value":1}"#,
        r#"{"time":1,"device":"a","metric":"t","value":1e999}"#,
        r#"{"time":1e300,"device":"a","metric":"t","value":1}"#,
        r#"{"time":1,"device":"a","metric":"t","value":1"#,
        "1,a,t,1",
    ];
    prop::sample::select(if jsonl { jsonl_lines } else { csv }).prop_map(str::to_owned)
}

/// Found by the readings fuzz target: times after year 9999 were accepted, and replay then
/// panicked printing the first alert at such a time (`alert::rfc3339`). They are refused now,
/// each on its line, and what is accepted replays.
#[test]
fn far_future_reading_times_are_refused_with_their_line() {
    for (text, line) in [
        // Minimized by the fuzzer: a millisecond time with two digits too many, after a
        // reading that lets the silence rule raise; the clear would be in the year 27171.
        ("4,a,t,2\n795284952840250,a,t,2\n", 2),
        ("time,device,metric,value\n0,a,t,95\n1e15,a,t,96\n", 3),
        ("time,device,metric,value\n1e300,a,t,-5\n", 2),
        ("time,device,metric,value\n253402300800000,a,t,-5\n", 2),
        (
            r#"{"time":"10000-01-01T00:00:00Z","device":"a","metric":"t","value":-5}"#,
            1,
        ),
    ] {
        let errors = replay::parse_readings(text).expect_err(text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with(&format!("line {line}: ")),
            "{errors:?}"
        );
        check::readings(text);
    }
    // The last millisecond of year 9999 is still a time, and alerts at and after it replay.
    let text = format!("0,a,t,95\n{LAST_RFC3339_MS},a,t,-5\n");
    let readings = replay::parse_readings(&text).unwrap();
    assert_eq!(readings[1].at, LAST_RFC3339_MS);
    let outcome = replay::replay(check::replay_config(), &readings, Some(u64::MAX));
    assert!(!outcome.alerts.is_empty(), "the readings raise alerts");
    check::readings(&text);
}

fn expected_alert() -> impl Strategy<Value = Expected> {
    (
        "\\PC{0,24}",
        "\\PC{0,10}",
        "\\PC{0,10}",
        "\\PC{0,10}",
        any::<bool>(),
    )
        .prop_map(|(at, device, rule, metric, raised)| Expected {
            at,
            device,
            rule,
            metric,
            state: if raised {
                AlertState::Raised
            } else {
                AlertState::Cleared
            },
            // What the written documents below say.
            value: Some(Value::Number(1.5)),
        })
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn written_readings_read_back_exactly(
        rows in prop::collection::vec(recorded(), 0..12),
        jsonl in any::<bool>(),
        header in any::<bool>(),
        crlf in any::<bool>(),
    ) {
        let (text, _) = write_readings(&rows, jsonl, header, crlf);
        let got = replay::parse_readings(&text).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        prop_assert_eq!(got.len(), rows.len(), "{}", text);
        for (g, (r, _, _)) in got.iter().zip(&rows) {
            prop_assert_eq!((g.at, &g.device, &g.metric), (r.at, &r.device, &r.metric), "{}", text);
            // Exact: JSON numbers are parsed with serde_json's `float_roundtrip`, CSV values
            // with Rust's parser.
            prop_assert_eq!(&g.value, &r.value, "{}", text);
        }
        check::readings(&text);
    }

    #[test]
    fn one_bad_line_is_named_and_only_it(
        rows in prop::collection::vec(recorded(), 1..8),
        (jsonl, bad) in any::<bool>().prop_flat_map(|jsonl| (Just(jsonl), bad_line(jsonl))),
        crlf in any::<bool>(),
        at in any::<usize>(),
    ) {
        // The bad line goes after the first reading, so that the first line still says
        // which format the file is in.
        let (text, numbers) = write_readings(&rows, jsonl, false, crlf);
        let nl = if crlf { "\r\n" } else { "\n" };
        let mut lines: Vec<&str> = text.split_terminator(nl).collect();
        let after = numbers[at % numbers.len()];
        lines.insert(after, &bad);
        let text: String = lines.iter().map(|l| format!("{l}{nl}")).collect();
        let errors = replay::parse_readings(&text).expect_err(&text);
        prop_assert_eq!(errors.len(), 1, "{:?}\n{}", errors, text);
        let prefix = format!("line {}:", after + 1);
        prop_assert!(errors[0].starts_with(&prefix), "{:?}, expected {}\n{}", errors, prefix, text);
        check::readings(&text);
    }

    #[test]
    fn expected_alerts_read_back_exactly(alerts in prop::collection::vec(expected_alert(), 0..8), blank in any::<u8>()) {
        let mut text = String::new();
        for (i, e) in alerts.iter().enumerate() {
            if (blank as usize + i) % 3 == 0 {
                text.push_str("  \n");
            }
            // What `--json` prints holds more fields than are compared.
            let state = match e.state { AlertState::Raised => "raised", AlertState::Cleared => "cleared" };
            let doc = json!({"id": "x", "rule": e.rule, "device": e.device, "metric": e.metric,
                "severity": "critical", "state": state, "value": 1.5, "at": e.at, "gateway": "g"});
            text.push_str(&doc.to_string());
            text.push('\n');
        }
        prop_assert_eq!(replay::parse_expected(&text), Ok(alerts), "{}", text);
        check::expected(&text);
    }

    #[test]
    fn mutated_seeds_keep_the_contract(data in mutant_of(reading_seeds(), TOKENS)) {
        let text = String::from_utf8_lossy(&data);
        check::readings(&text);
        check::expected(&text);
    }
}

//! `watchpost test-rules`: recorded readings replayed through the real rule engine under
//! virtual time, so that operators can test rules offline and in their own CI.
//!
//! Readings come as CSV (`time,device,metric,value`) or JSON lines
//! (`{"time":..,"device":..,"metric":..,"value":..}`). A value is a number or a state: in CSV
//! as a payload would write it (`21.5`, `open`, `true`: [`Value::parse`]), in JSON a number,
//! a boolean or a string. `time` is RFC 3339 or a number of
//! seconds since the epoch (milliseconds if it is larger than 10^11), and no later than
//! 9999-12-31, the last day an RFC 3339 time in an alert can name. Deadlines (`for`,
//! silence, grace periods, renotify) fire at their own virtual times between readings.
//!
//! Expected alerts are JSON lines with at least `at`, `device`, `rule`, `metric` and `state`:
//! exactly what `--json` prints, so a run can be reviewed once and kept as the expectation.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Deserialize;

use crate::alert::{AlertDoc, LAST_RFC3339_MS};
use crate::config::Config;
use crate::ingest::{self, Alert, Engine, EngineOptions};
use crate::rules::{AlertState, Millis};
use crate::stats::Stats;
use crate::uplink::qos1_bytes;
use crate::value::Value;

/// One recorded reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    /// Time, ms since the epoch.
    pub at: Millis,
    /// Device id.
    pub device: String,
    /// Metric name.
    pub metric: String,
    /// Value: a number or a state.
    pub value: Value,
}

/// What a replay produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Every alert transition, in order.
    pub alerts: Vec<Alert>,
    /// Readings replayed.
    pub readings: usize,
    /// Devices seen.
    pub devices: usize,
    /// MQTT bytes upstream (PUBLISH and PUBACK) for the forwarded alerts.
    pub upstream_bytes: u64,
    /// MQTT bytes upstream if every reading were forwarded (QoS 1), for comparison.
    pub forward_all_bytes: u64,
    /// Whether the configuration has an uplink at all.
    pub has_uplink: bool,
}

/// Parses recorded readings; every bad line is reported with its number.
pub fn parse_readings(text: &str) -> Result<Vec<Recorded>, Vec<String>> {
    let mut errors = Vec::new();
    let mut out = Vec::new();
    let lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap_or("");
    let json = first.starts_with('{');
    #[derive(Deserialize)]
    struct Line {
        time: serde_json::Value,
        device: String,
        metric: String,
        value: Value,
    }
    let mut header_seen = false;
    for (i, line) in lines {
        let n = i + 1;
        let parsed = if json {
            serde_json::from_str::<Line>(line)
                .map_err(|e| e.to_string())
                .and_then(|l| {
                    let time = match &l.time {
                        serde_json::Value::String(s) => parse_time(s),
                        serde_json::Value::Number(v) => parse_time(&v.to_string()),
                        _ => Err("`time` must be a string or a number".into()),
                    };
                    time.map(|at| Recorded {
                        at,
                        device: l.device,
                        metric: l.metric,
                        value: l.value,
                    })
                })
        } else {
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            if !header_seen
                && cells
                    .first()
                    .is_some_and(|c| c.eq_ignore_ascii_case("time"))
            {
                header_seen = true;
                if cells != ["time", "device", "metric", "value"] {
                    errors.push(format!(
                        "line {n}: the header must be time,device,metric,value"
                    ));
                }
                continue;
            }
            header_seen = true;
            match cells.as_slice() {
                [time, device, metric, value] => parse_time(time).and_then(|at| {
                    let value = Value::parse(value)
                        .map_err(|e| format!("{value:?} is not a value: {e}"))?;
                    Ok(Recorded {
                        at,
                        device: (*device).to_owned(),
                        metric: (*metric).to_owned(),
                        value,
                    })
                }),
                _ => Err(format!(
                    "expected 4 columns (time,device,metric,value), found {}",
                    cells.len()
                )),
            }
        };
        match parsed {
            Ok(r) if r.device.is_empty() || r.metric.is_empty() => {
                errors.push(format!("line {n}: device and metric must not be empty"))
            }
            Ok(r) => out.push(r),
            Err(e) => errors.push(format!("line {n}: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// RFC 3339, or seconds (or, above 10^11, milliseconds) since the epoch; at most
/// 9999-12-31T23:59:59.999Z, the last time an alert document can name.
fn parse_time(s: &str) -> Result<Millis, String> {
    let at = parse_any_time(s)?;
    if at > LAST_RFC3339_MS {
        let numeric = if s.parse::<f64>().is_ok() {
            " (a number above 10^11 is milliseconds since the epoch: is there a digit too many?)"
        } else {
            ""
        };
        return Err(format!("time {s:?} is after 9999-12-31{numeric}"));
    }
    Ok(at)
}

fn parse_any_time(s: &str) -> Result<Millis, String> {
    if let Ok(n) = s.parse::<f64>() {
        if n.is_finite() && n >= 0.0 {
            return Ok(if n > 1e11 {
                n as Millis
            } else {
                (n * 1000.0).round() as Millis
            });
        }
    }
    humantime::parse_rfc3339_weak(s)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as Millis)
        .ok_or_else(|| format!("{s:?} is not a time (RFC 3339, or seconds since the epoch)"))
}

/// The time to replay `until` when time runs on for `run_on` after the last reading (the
/// epoch if there is none); a span too long for the clock ends at its end instead of wrapping.
pub fn run_on_until(readings: &[Recorded], run_on: std::time::Duration) -> Millis {
    let last = readings.last().map_or(0, |r| r.at);
    last.saturating_add(Millis::try_from(run_on.as_millis()).unwrap_or(Millis::MAX))
}

/// Replays `readings` (in the given order) through `config`'s rules; deadlines that fall up
/// to `until` (default: the last reading) fire at their own times.
pub fn replay(config: &Config, readings: &[Recorded], until: Option<Millis>) -> Outcome {
    let options = EngineOptions {
        gateway: config.gateway.id.clone(),
        rules: config.rules.clone(),
        sources: Vec::new(),
        limits: config.broker.limits,
        window: config.history.window,
        keep_raw: false,
        summaries: None,
        stale_after: std::time::Duration::from_secs(600),
        forget_after: config.gateway.forget_after,
    };
    let start = readings.first().map_or(0, |r| r.at);
    let mut engine = Engine::new(options, Arc::new(Stats::default()), start);
    let mut alerts = Vec::new();
    let run_deadlines = |engine: &mut Engine, up_to: Millis, alerts: &mut Vec<Alert>| {
        while let Some(at) = engine.next_deadline().filter(|at| *at <= up_to) {
            alerts.extend(engine.on_tick(at));
        }
    };
    let prefix = config
        .uplink
        .as_ref()
        .map_or(config.gateway.id.as_str(), |u| u.topic_prefix.as_str());
    let mut forward_all_bytes = 0;
    let mut devices = BTreeSet::new();
    for r in readings {
        run_deadlines(&mut engine, r.at, &mut alerts);
        alerts.extend(engine.on_reading(&r.device, &r.metric, r.value.clone(), r.at));
        devices.insert(r.device.as_str());
        let topic = format!("{prefix}/sensors/{}/{}", r.device, r.metric);
        forward_all_bytes += qos1_bytes(topic.len(), r.value.to_string().len());
    }
    let end = until.unwrap_or_else(|| readings.last().map_or(0, |r| r.at));
    run_deadlines(&mut engine, end, &mut alerts);
    let forward = config.uplink.as_ref().map(|u| u.forward.clone());
    let upstream_bytes = alerts
        .iter()
        .filter(|a| ingest::forwarded(a, forward.as_deref()))
        .map(|a| {
            qos1_bytes(
                prefix.len() + 1 + a.doc.topic().len(),
                a.doc.to_json().len(),
            )
        })
        .sum();
    Outcome {
        alerts,
        readings: readings.len(),
        devices: devices.len(),
        upstream_bytes,
        forward_all_bytes,
        has_uplink: config.uplink.is_some(),
    }
}

/// One expected (or produced) alert transition, as compared.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Expected {
    /// When, RFC 3339.
    pub at: String,
    /// Device id.
    pub device: String,
    /// Rule name.
    pub rule: String,
    /// Metric.
    pub metric: String,
    /// `raised` or `cleared`.
    pub state: AlertState,
    /// The value (a number, or a state such as `true` or `"open"`); an expectation without
    /// one matches any value.
    #[serde(default)]
    pub value: Option<Value>,
}

impl Expected {
    /// The compared fields of a document.
    pub fn of(doc: &AlertDoc) -> Expected {
        Expected {
            at: doc.at.clone(),
            device: doc.device.clone(),
            rule: doc.rule.clone(),
            metric: doc.metric.clone(),
            state: doc.state,
            value: Some(doc.value.clone()),
        }
    }

    /// True if `got` is what `self` expects.
    fn matches(&self, got: &Expected) -> bool {
        (&self.at, &self.device, &self.rule, &self.metric, self.state)
            == (&got.at, &got.device, &got.rule, &got.metric, got.state)
            && (self.value.is_none() || self.value == got.value)
    }

    fn line(&self) -> String {
        let value = self.value.as_ref().map_or(String::new(), |v| {
            format!("  value {}", serde_json::json!(v))
        });
        format!(
            "{}  {:<7}  {}  {}  {}{value}",
            self.at,
            state_name(self.state),
            self.device,
            self.rule,
            self.metric
        )
    }
}

fn state_name(state: AlertState) -> &'static str {
    match state {
        AlertState::Raised => "raised",
        AlertState::Cleared => "cleared",
    }
}

/// Parses expected alerts (JSON lines); every bad line is reported with its number.
pub fn parse_expected(text: &str) -> Result<Vec<Expected>, Vec<String>> {
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        match serde_json::from_str::<Expected>(line) {
            Ok(e) => out.push(e),
            Err(e) => errors.push(format!("line {}: {e}", i + 1)),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The differences between expected and produced alerts, as readable lines (empty if none).
/// Order matters: the sequences are compared position by position after the common prefix.
pub fn compare(expected: &[Expected], got: &[Expected]) -> Vec<String> {
    if expected.len() == got.len() && expected.iter().zip(got).all(|(e, g)| e.matches(g)) {
        return Vec::new();
    }
    // Longest common subsequence, so that one missing alert shows as one line, not as a
    // shift of everything after it.
    let (n, m) = (expected.len(), got.len());
    let mut lcs = vec![vec![0u32; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if expected[i].matches(&got[j]) {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < n || j < m {
        if i < n && j < m && expected[i].matches(&got[j]) {
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push(format!("+ not expected:  {}", got[j].line()));
            j += 1;
        } else {
            out.push(format!("- missing:       {}", expected[i].line()));
            i += 1;
        }
    }
    out
}

/// The alerts as a table and a summary of the upstream traffic.
pub fn report(outcome: &Outcome) -> String {
    let rows: Vec<Vec<String>> = outcome
        .alerts
        .iter()
        .map(|a| {
            let d = &a.doc;
            let state = match d.repeat {
                0 => state_name(d.state).to_owned(),
                n => format!("raised (repeat {n})"),
            };
            vec![
                d.at.clone(),
                state,
                d.severity.as_str().to_owned(),
                d.device.clone(),
                d.rule.clone(),
                d.metric.clone(),
                d.value.to_string(),
                d.threshold.map_or("-".into(), |t| t.to_string()),
            ]
        })
        .collect();
    let mut text = crate::query::table(
        &[
            "AT",
            "STATE",
            "SEVERITY",
            "DEVICE",
            "RULE",
            "METRIC",
            "VALUE",
            "THRESHOLD",
        ],
        &rows,
    );
    let raised = outcome
        .alerts
        .iter()
        .filter(|a| a.doc.state == AlertState::Raised && a.doc.repeat == 0)
        .count();
    let cleared = outcome
        .alerts
        .iter()
        .filter(|a| a.doc.state == AlertState::Cleared)
        .count();
    text.push_str(&format!(
        "\n{} readings from {} devices: {raised} raised, {cleared} cleared\n",
        outcome.readings, outcome.devices
    ));
    if outcome.has_uplink {
        let share = if outcome.forward_all_bytes > 0 {
            100.0 * outcome.upstream_bytes as f64 / outcome.forward_all_bytes as f64
        } else {
            0.0
        };
        text.push_str(&format!(
            "upstream: {} bytes with these rules, {} bytes forwarding every reading ({share:.3} %)\n",
            outcome.upstream_bytes, outcome.forward_all_bytes
        ));
    } else {
        text.push_str(&format!(
            "upstream: none (no [uplink]); forwarding every reading would take {} bytes\n",
            outcome.forward_all_bytes
        ));
    }
    text
}

/// The alerts as JSON lines, usable as an `--expect` file.
pub fn json_lines(outcome: &Outcome) -> String {
    outcome
        .alerts
        .iter()
        .map(|a| String::from_utf8_lossy(&a.doc.to_json()).into_owned() + "\n")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::rfc3339;

    fn config() -> Config {
        let src = "[gateway]\nid = \"t\"\n[uplink]\nurl = \"mqtt://up\"\n\
                   [[rule]]\nname = \"hot\"\nmatch = \"sensors/+/t\"\nabove = 90\nfor = \"10s\"\nseverity = \"critical\"\n\
                   [[rule]]\nname = \"cold\"\nmatch = \"sensors/+/t\"\nbelow = 0\nseverity = \"info\"\n";
        crate::config::parse(src, "t.toml").unwrap().config
    }

    #[test]
    fn csv_and_json_lines_with_times_in_several_forms() {
        let csv = "time,device,metric,value\n2026-11-21T18:00:00Z,a,t,20\n1795284001,a,t,21.5\n# a comment\n1795284002500,a,t,22\n";
        let r = parse_readings(csv).unwrap();
        assert_eq!(
            r.iter().map(|x| x.at).collect::<Vec<_>>(),
            [1_795_284_000_000, 1_795_284_001_000, 1_795_284_002_500]
        );
        let jsonl = r#"{"time":"2026-11-21T18:00:00.250Z","device":"a","metric":"t","value":1}"#;
        assert_eq!(parse_readings(jsonl).unwrap()[0].at, 1_795_284_000_250);
        let bad =
            parse_readings("time,device,metric,value\nyesterday,a,t,1\n2026-11-21T18:00:00Z,a,t\n")
                .unwrap_err();
        assert_eq!(bad.len(), 2);
        assert!(
            bad[0].starts_with("line 2:") && bad[1].starts_with("line 3:"),
            "{bad:?}"
        );
    }

    #[test]
    fn times_after_year_9999_are_refused_with_their_line() {
        // Found by fuzzing: a millisecond time with two digits too many (year 27171) was
        // accepted, and replay panicked printing the alert it raised.
        for (text, line) in [
            ("4,a,t,2\n795284952840250,a,t,2\n", 2),
            ("time,device,metric,value\n0,a,t,95\n1e15,a,t,96\n", 3),
            ("time,device,metric,value\n1e300,a,t,-5\n", 2),
            ("time,device,metric,value\n253402300800000,a,t,-5\n", 2),
            (
                r#"{"time":253402300800000,"device":"a","metric":"t","value":-5}"#,
                1,
            ),
        ] {
            let errors = parse_readings(text).unwrap_err();
            assert_eq!(errors.len(), 1, "{errors:?}");
            let prefix = format!("line {line}: time ");
            assert!(
                errors[0].starts_with(&prefix) && errors[0].contains("is after 9999-12-31"),
                "{errors:?}"
            );
        }
        // The last millisecond of 9999 is a time, in any form.
        for last in [
            "253402300799999",
            "9999-12-31T23:59:59.999Z",
            "9999-12-31T23:59:59.999999999Z",
        ] {
            let text = format!("{last},a,t,1\n");
            assert_eq!(
                parse_readings(&text).unwrap()[0].at,
                LAST_RFC3339_MS,
                "{last}"
            );
        }
    }

    #[test]
    fn readings_in_year_9999_replay_with_deadlines_after_it() {
        // The hold of `hot` ends after 9999-12-31: the alert is written at its last instant.
        let text = "time,device,metric,value\n253402300795000,a,t,95\n253402300799999,a,t,95\n";
        let out = replay(&config(), &parse_readings(text).unwrap(), Some(u64::MAX));
        let got: Vec<_> = out
            .alerts
            .iter()
            .map(|a| (a.doc.at.as_str(), a.doc.state))
            .collect();
        assert_eq!(
            got,
            [("9999-12-31T23:59:59.999Z", AlertState::Raised)],
            "{out:?}"
        );
    }

    #[test]
    fn time_runs_on_from_the_last_reading_and_stops_at_the_end_of_the_clock() {
        use std::time::Duration;
        let readings = parse_readings("5,a,t,1\n7,a,t,1\n").unwrap();
        assert_eq!(run_on_until(&readings, Duration::from_secs(60)), 67_000);
        assert_eq!(run_on_until(&[], Duration::from_millis(5)), 5);
        // `--run-on` takes any duration humantime parses, up to u64::MAX seconds.
        assert_eq!(run_on_until(&readings, Duration::MAX), Millis::MAX);
        assert_eq!(
            run_on_until(&readings, Duration::from_millis(Millis::MAX - 1)),
            Millis::MAX
        );
    }

    #[test]
    fn deadlines_fire_at_their_own_virtual_time() {
        let readings =
            parse_readings("time,device,metric,value\n0,a,t,95\n5,a,t,96\n30,a,t,50\n").unwrap();
        let out = replay(&config(), &readings, None);
        let got: Vec<_> = out
            .alerts
            .iter()
            .map(|a| (a.doc.at.clone(), a.doc.state))
            .collect();
        assert_eq!(
            got,
            [
                (rfc3339(10_000), AlertState::Raised),
                (rfc3339(30_000), AlertState::Cleared)
            ],
            "raised at 10 s, not at the next reading"
        );
        assert_eq!(out.devices, 1);
        assert!(out.upstream_bytes > 0 && out.upstream_bytes < out.forward_all_bytes * 10);
    }

    #[test]
    fn only_forwarded_alerts_count_upstream() {
        let readings = parse_readings("time,device,metric,value\n0,a,t,-5\n1,a,t,5\n").unwrap();
        let out = replay(&config(), &readings, None);
        assert_eq!(out.alerts.len(), 2);
        assert_eq!(out.upstream_bytes, 0, "info is not forwarded");
        // "-5" and "5" on t/sensors/a/t, each with its PUBACK.
        assert_eq!(
            out.forward_all_bytes,
            qos1_bytes("t/sensors/a/t".len(), 2) + qos1_bytes("t/sensors/a/t".len(), 1)
        );
    }

    #[test]
    fn differences_are_shown_as_missing_and_unexpected_lines() {
        let e = |at: &str, state| Expected {
            at: at.into(),
            device: "a".into(),
            rule: "hot".into(),
            metric: "t".into(),
            state,
            value: None,
        };
        let expected = vec![
            e("1", AlertState::Raised),
            e("2", AlertState::Cleared),
            e("3", AlertState::Raised),
        ];
        assert!(compare(&expected, &expected).is_empty());
        let got = vec![
            e("1", AlertState::Raised),
            e("3", AlertState::Raised),
            e("4", AlertState::Cleared),
        ];
        let diff = compare(&expected, &got);
        assert_eq!(diff.len(), 2, "{diff:#?}");
        assert!(
            diff[0].starts_with("- missing:") && diff[0].contains("2  cleared"),
            "{diff:#?}"
        );
        assert!(
            diff[1].starts_with("+ not expected:") && diff[1].contains("4  cleared"),
            "{diff:#?}"
        );
    }

    #[test]
    fn mqtt_sizes() {
        assert_eq!(qos1_bytes(3, 2), 1 + 1 + (2 + 3 + 2 + 2) + 4);
        assert_eq!(qos1_bytes(200, 0), 1 + 2 + 204 + 4);
    }
}

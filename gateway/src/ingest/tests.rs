use super::*;
use crate::aggregate::Closed;
use crate::rules::{Scope, SilenceAfter, Threshold};
use crate::sources::Payload;
use crate::topic::TopicFilter;

fn rule(name: &str, filter: &str, kind: Kind, hold_ms: u64) -> Rule {
    Rule {
        name: name.into(),
        filter: TopicFilter::new(filter).unwrap(),
        kind,
        hold: Duration::from_millis(hold_ms),
        severity: Severity::Critical,
        renotify: None,
        cooldown: None,
        forward: None,
        labels: Default::default(),
    }
}

fn overheat(hold_ms: u64) -> Rule {
    let th = Threshold {
        above: Some(90.0),
        clear_below: Some(85.0),
        ..Threshold::default()
    };
    rule(
        "overheat",
        "sensors/+/temperature",
        Kind::Threshold(th),
        hold_ms,
    )
}

fn options(rules: Vec<Rule>) -> EngineOptions {
    EngineOptions {
        gateway: "site".into(),
        rules,
        sources: Vec::new(),
        limits: Limits::default(),
        window: Duration::from_secs(60),
        keep_raw: false,
        summaries: None,
        stale_after: Duration::from_secs(600),
        forget_after: Duration::from_secs(3600),
    }
}

fn engine_with(hold_ms: u64, summaries: Option<SummaryConfig>, keep_raw: bool) -> Engine {
    let options = EngineOptions {
        keep_raw,
        summaries,
        ..options(vec![overheat(hold_ms)])
    };
    Engine::new(options, Arc::new(Stats::default()), 0)
}

fn engine(hold_ms: u64) -> Engine {
    engine_with(hold_ms, None, false)
}

fn states(alerts: &[Alert]) -> Vec<(&str, &str, AlertState)> {
    alerts
        .iter()
        .map(|a| (a.doc.device.as_str(), a.doc.rule.as_str(), a.doc.state))
        .collect()
}

use AlertState::{Cleared, Raised};

#[test]
fn devices_have_separate_state() {
    let mut e = engine(0);
    assert_eq!(
        states(&e.on_message(b"sensors/a/temperature", b"95", 1)),
        [("a", "overheat", Raised)]
    );
    assert!(e.on_message(b"sensors/b/temperature", b"80", 2).is_empty());
    assert!(e.on_message(b"sensors/a/temperature", b"96", 3).is_empty());
    assert_eq!(
        states(&e.on_message(b"sensors/a/temperature", b"70", 4)),
        [("a", "overheat", Cleared)]
    );
    assert!(
        e.on_message(b"sensors/a/humidity", b"99", 5).is_empty(),
        "no rule for humidity"
    );
}

#[test]
fn object_payload_feeds_each_metric() {
    let mut e = engine(0);
    let alerts = e.on_message(
        b"sensors/a",
        br#"{"temperature":95,"humidity":20,"seq":3}"#,
        1,
    );
    assert_eq!(states(&alerts), [("a", "overheat", Raised)]);
    assert_eq!(alerts[0].doc.metric, "temperature");
    assert_eq!(Stats::get(&e.stats.readings), 2);
}

#[test]
fn pending_for_fires_on_tick_at_the_deadline() {
    let mut e = engine(10_000);
    assert!(
        e.on_message(b"sensors/a/temperature", b"95", 1_000)
            .is_empty()
    );
    assert_eq!(e.next_deadline(), Some(11_000));
    assert!(e.on_tick(10_999).is_empty());
    assert_eq!(states(&e.on_tick(11_000)), [("a", "overheat", Raised)]);
    assert_eq!(e.next_deadline(), None);
}

#[test]
fn interrupted_pending_leaves_a_stale_deadline_that_does_nothing() {
    let mut e = engine(10_000);
    e.on_message(b"sensors/a/temperature", b"95", 1_000);
    e.on_message(b"sensors/a/temperature", b"80", 5_000);
    e.on_message(b"sensors/a/temperature", b"95", 6_000);
    assert!(
        e.on_tick(11_000).is_empty(),
        "the first episode was interrupted"
    );
    assert_eq!(states(&e.on_tick(16_000)), [("a", "overheat", Raised)]);
}

#[test]
fn episodes_started_in_one_millisecond_get_distinct_ids() {
    let mut e = engine(0);
    let first = e.on_message(b"sensors/a/temperature", b"95", 1_000);
    e.on_message(b"sensors/a/temperature", b"70", 1_000);
    let second = e.on_message(b"sensors/a/temperature", b"95", 1_000);
    assert_ne!(first[0].doc.id, second[0].doc.id);
    let clear = e.on_message(b"sensors/a/temperature", b"70", 1_001);
    assert_eq!(
        clear[0].doc.id, second[0].doc.id,
        "the clear names the same episode"
    );
}

#[test]
fn malformed_input_is_counted_and_harms_no_one() {
    let mut e = engine(0);
    for (topic, payload) in [
        (&b"sensors/bad/temperature"[..], &b"[1,2]"[..]),
        (b"sensors/bad/temperature", b"NaN"),
        (b"sensors/bad", b"{\"temperature\":"),
        (b"sensors", b"1"),
        (b"sensors/\xff/x", b"1"),
    ] {
        assert!(e.on_message(topic, payload, 1).is_empty());
    }
    e.housekeeping(2);
    assert_eq!(e.stats.decode_errors_of("bad"), 3);
    assert_eq!(e.stats.decode_errors_of(OTHER_DEVICES), 2);
    assert_eq!(
        states(&e.on_message(b"sensors/good/temperature", b"99", 2)),
        [("good", "overheat", Raised)]
    );
}

#[test]
fn seq_gaps_and_duplicates_are_counted_and_duplicates_are_not_judged_twice() {
    let mut e = engine(0);
    let mut raised = 0;
    // A device that skips 3 and 4 and repeats 5 (a QoS 1 redelivery of the excursion).
    for (seq, v) in [
        (0, 20),
        (1, 20),
        (2, 20),
        (5, 95),
        (5, 95),
        (6, 70),
        (6, 70),
        (7, 95),
    ] {
        let payload = format!("{{\"v\":{v},\"seq\":{seq}}}");
        raised += e
            .on_message(b"sensors/d/temperature", payload.as_bytes(), seq)
            .iter()
            .filter(|a| a.doc.state == Raised)
            .count();
    }
    assert_eq!(raised, 2, "the duplicate of seq 5 raised nothing");
    let round = e.housekeeping(10);
    let c = e.stats.device("d").unwrap();
    assert_eq!(
        (c.messages, c.readings, c.loss.lost, c.loss.duplicated),
        (8, 6, 2, 2)
    );
    assert_eq!(round.devices[0].add.loss.lost, 2);
    assert!(
        e.housekeeping(11).devices.is_empty(),
        "nothing changed since"
    );
}

#[test]
fn late_messages_go_to_history_but_not_to_rules() {
    let mut e = engine_with(0, None, true);
    e.on_message(b"sensors/d/temperature", br#"{"v":20,"seq":10}"#, 1);
    e.on_message(b"sensors/d/temperature", br#"{"v":20,"seq":12}"#, 2);
    assert!(
        e.on_message(b"sensors/d/temperature", br#"{"v":99,"seq":11}"#, 3)
            .is_empty(),
        "late: not judged"
    );
    let (_, raw) = e.take_history();
    assert_eq!(
        raw.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [Some(10), Some(12), Some(11)]
    );
    e.housekeeping(4);
    let c = e.stats.device("d").unwrap();
    assert_eq!((c.loss.lost, c.loss.out_of_order), (0, 1));
}

#[test]
fn rollups_close_with_time_and_finish_flushes_partial_windows() {
    let mut e = engine(0);
    e.on_message(b"sensors/d/temperature", b"20", 1_000);
    e.on_message(b"sensors/d/temperature", b"30", 2_000);
    e.on_message(b"sensors/q/temperature", b"10", 2_000);
    e.on_message(b"sensors/d/temperature", b"25", 61_000);
    let round = e.housekeeping(61_000);
    let mut closed: Vec<_> = round
        .rollups
        .iter()
        .map(|r| match &r.rollup {
            Closed::Numbers(x) => (r.device.as_str(), x.count, x.mean),
            other => panic!("{other:?}"),
        })
        .collect();
    closed.sort_by(|a, b| a.0.cmp(b.0));
    assert_eq!(
        closed,
        [("d", 2, 25.0), ("q", 1, 10.0)],
        "d closed by its reading, quiet q by the round"
    );
    let last = e.finish(62_000);
    let partial: Vec<_> = last
        .rollups
        .iter()
        .map(|r| match &r.rollup {
            Closed::Numbers(x) => (r.device.as_str(), x.start, x.count),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(partial, [("d", 60_000, 1)]);
}

#[test]
fn a_summary_goes_out_once_per_interval() {
    let summaries = SummaryConfig {
        interval: Duration::from_secs(60),
        metrics: vec!["temperature".into()],
    };
    let mut e = engine_with(0, Some(summaries), false);
    e.on_message(b"sensors/a/temperature", b"20", 1_000);
    e.on_message(b"sensors/b/temperature", b"30", 2_000);
    e.on_message(b"sensors/b/humidity", b"50", 2_000);
    assert!(e.housekeeping(59_999).summary.is_none());
    let s = e.housekeeping(60_000).summary.expect("interval ended");
    assert_eq!((s.topic.as_str(), s.retain), (SUMMARY_TOPIC, false));
    let doc: serde_json::Value = serde_json::from_slice(&s.payload).unwrap();
    assert_eq!(doc["from"], rfc3339(0));
    assert_eq!(doc["metrics"]["temperature"]["devices"], 2);
    assert_eq!(doc["metrics"]["temperature"]["max_device"], "b");
    assert!(
        doc["metrics"].get("humidity").is_none(),
        "only the named metrics"
    );
    assert!(e.housekeeping(60_001).summary.is_none(), "one per interval");
}

#[test]
fn presence_from_status_messages_and_readings() {
    let presence = rule(
        "gone",
        "sensors/+/status",
        Kind::Presence {
            grace: Duration::from_secs(60),
        },
        0,
    );
    let mut e = Engine::new(options(vec![presence]), Arc::new(Stats::default()), 0);
    assert!(
        e.on_message(b"sensors/pump/status", b"offline", 1_000)
            .is_empty()
    );
    assert_eq!(e.next_deadline(), Some(61_000));
    let raised = e.on_tick(61_000);
    assert_eq!(states(&raised), [("pump", "gone", Raised)]);
    assert_eq!(raised[0].doc.metric, PRESENCE_METRIC);
    assert_eq!(
        states(&e.on_message(b"sensors/pump/flow", b"3", 70_000)),
        [("pump", "gone", Cleared)],
        "any reading means it is back"
    );
}

#[test]
fn device_wide_silence_is_reset_by_any_matching_metric() {
    let silence = rule(
        "quiet",
        "sensors/+/+",
        Kind::Silence {
            after: SilenceAfter::Fixed(Duration::from_secs(60)),
            scope: Scope::Device,
        },
        0,
    );
    let mut e = Engine::new(options(vec![silence]), Arc::new(Stats::default()), 0);
    e.on_message(b"sensors/d/temperature", b"1", 0);
    e.on_message(b"sensors/d/humidity", b"1", 50_000);
    assert!(
        e.on_tick(60_000).is_empty(),
        "humidity at 50 s counts for the device"
    );
    let raised = e.on_tick(110_000);
    assert_eq!(states(&raised), [("d", "quiet", Raised)]);
    assert_eq!(raised[0].doc.metric, ANY_METRIC);
}

#[test]
fn sources_turn_foreign_topics_into_readings() {
    let tasmota = Source::new(
        "tasmota",
        "tele/{device}/SENSOR",
        Payload::Json,
        Some([("AM2301.Temperature".to_owned(), "temperature".to_owned())].into()),
        None,
    )
    .unwrap();
    let options = EngineOptions {
        sources: vec![tasmota],
        ..options(vec![overheat(0)])
    };
    let mut e = Engine::new(options, Arc::new(Stats::default()), 0);
    assert!(e.handles(b"tele/kitchen/SENSOR") && e.handles(b"sensors/a/t"));
    assert!(!e.handles(b"tele/kitchen/STATE") && !e.handles(b"alerts/x"));
    let payload = br#"{"Time":"2026-11-21T18:05:45","AM2301":{"Temperature":95.5,"Humidity":40.1},"TempUnit":"C"}"#;
    assert_eq!(
        states(&e.on_message(b"tele/kitchen/SENSOR", payload, 1)),
        [("kitchen", "overheat", Raised)]
    );
    assert!(
        e.on_message(b"tele/kitchen/STATE", b"{}", 2).is_empty(),
        "not a source topic: ignored"
    );
}

#[test]
fn restored_alerts_are_not_raised_again() {
    let mut e = engine(0);
    let saved = SavedAlert {
        rule: "overheat".into(),
        device: "a".into(),
        metric: "temperature".into(),
        raised: true,
        since: 500,
        threshold: Some(90.0),
        topic: "alerts/critical/a/overheat".into(),
        doc: "{}".into(),
    };
    let gone = SavedAlert {
        rule: "deleted".into(),
        ..saved.clone()
    };
    assert_eq!(e.restore(&[saved, gone], 1_000), 1);
    assert!(
        e.on_message(b"sensors/a/temperature", b"97", 2_000)
            .is_empty(),
        "still raised"
    );
    let cleared = e.on_message(b"sensors/a/temperature", b"70", 3_000);
    assert_eq!(
        cleared[0].doc.id, "site:a:overheat:500",
        "the same episode ends"
    );
}

#[test]
fn reload_keeps_states_of_kept_rules_and_clears_removed_ones() {
    let damp = rule(
        "damp",
        "sensors/+/humidity",
        Kind::Threshold(Threshold {
            above: Some(80.0),
            ..Threshold::default()
        }),
        0,
    );
    let mut e = Engine::new(
        options(vec![overheat(0), damp]),
        Arc::new(Stats::default()),
        0,
    );
    e.on_message(b"sensors/a/temperature", b"95", 1);
    e.on_message(b"sensors/a/humidity", b"90", 1);
    let frost = rule(
        "frost",
        "sensors/+/temperature",
        Kind::Threshold(Threshold {
            below: Some(0.0),
            ..Threshold::default()
        }),
        0,
    );
    let (cleared, outcome) = e.replace_rules(vec![frost, overheat(0)], Vec::new(), 10);
    assert_eq!(states(&cleared), [("a", "damp", Cleared)]);
    assert_eq!(
        cleared[0].doc.value,
        Value::Number(90.0),
        "the clear reports the last reading"
    );
    assert_eq!(
        (outcome.kept, outcome.added.clone(), outcome.removed.clone()),
        (1, vec!["frost".to_owned()], vec!["damp".to_owned()])
    );
    assert!(
        e.on_message(b"sensors/a/temperature", b"96", 20).is_empty(),
        "overheat is still raised"
    );
    assert_eq!(
        states(&e.on_message(b"sensors/a/temperature", b"-1", 30)),
        [("a", "frost", Raised), ("a", "overheat", Cleared)],
        "in the new file order"
    );
}

#[test]
fn forwarding_follows_severity_unless_the_rule_says_otherwise() {
    let doc = |severity| AlertDoc {
        id: "i".into(),
        rule: "r".into(),
        device: "d".into(),
        metric: "m".into(),
        severity,
        state: Raised,
        value: Value::Number(1.0),
        threshold: Some(0.0),
        since: "s".into(),
        at: "a".into(),
        gateway: "g".into(),
        repeat: 0,
        labels: Default::default(),
    };
    let critical_only = Some(&[Severity::Critical][..]);
    assert!(forwarded(
        &Alert {
            doc: doc(Severity::Critical),
            forward: None
        },
        critical_only
    ));
    assert!(!forwarded(
        &Alert {
            doc: doc(Severity::Info),
            forward: None
        },
        critical_only
    ));
    assert!(forwarded(
        &Alert {
            doc: doc(Severity::Info),
            forward: Some(true)
        },
        critical_only
    ));
    assert!(!forwarded(
        &Alert {
            doc: doc(Severity::Critical),
            forward: Some(false)
        },
        critical_only
    ));
    assert!(
        !forwarded(
            &Alert {
                doc: doc(Severity::Critical),
                forward: Some(true)
            },
            None
        ),
        "no uplink, nothing goes up"
    );
}

#[test]
fn error_log_is_rate_limited_per_device() {
    let mut log = LogLimit::default();
    assert_eq!(log.should_log("a", 0), Some(0));
    assert_eq!(log.should_log("a", 1_000), None);
    assert_eq!(log.should_log("b", 1_000), Some(0));
    assert_eq!(log.should_log("a", 59_999), None);
    assert_eq!(log.should_log("a", 60_000), Some(2));
}

#[test]
fn a_device_reports_only_so_many_metrics_and_the_rest_are_counted() {
    let stats = Arc::new(Stats::default());
    let limited = EngineOptions {
        limits: Limits {
            max_metrics_per_device: 3,
            ..Limits::default()
        },
        ..options(vec![overheat(0)])
    };
    let mut e = Engine::new(limited, stats.clone(), 0);
    for i in 0..10 {
        e.on_message(format!("sensors/noisy/m{i}").as_bytes(), b"1", 1);
    }
    // A known metric still counts, and its rules still judge it.
    e.on_message(b"sensors/noisy/m1", b"2", 2);
    assert_eq!(Stats::get(&stats.decode_errors), 7);
    assert_eq!(Stats::get(&stats.readings), 4);
    // The limit is per device: another device is not affected, nor are the noisy one's
    // metrics that came first.
    assert_eq!(
        states(&e.on_message(b"sensors/calm/temperature", b"95", 3)),
        [("calm", "overheat", Raised)]
    );
    let mut e2 = {
        let limited = EngineOptions {
            limits: Limits {
                max_metrics_per_device: 1,
                ..Limits::default()
            },
            ..options(vec![overheat(0)])
        };
        Engine::new(limited, Arc::new(Stats::default()), 0)
    };
    e2.on_message(b"sensors/x/temperature", b"20", 1);
    assert!(e2.on_message(b"sensors/x/humidity", b"95", 2).is_empty());
    assert_eq!(
        states(&e2.on_message(b"sensors/x/temperature", b"95", 3)),
        [("x", "overheat", Raised)]
    );
}

fn leak_rule() -> Rule {
    rule(
        "water-leak",
        "sensors/+/water_leak",
        Kind::State(crate::rules::StateTest::Equals(Value::Bool(true))),
        0,
    )
}

#[test]
fn a_leak_state_raises_at_once_and_its_document_carries_the_state() {
    let mut e = Engine::new(
        options(vec![overheat(0), leak_rule()]),
        Arc::new(Stats::default()),
        0,
    );
    assert!(
        e.on_message(b"sensors/basement/water_leak", b"false", 1)
            .is_empty()
    );
    let raised = e.on_message(b"sensors/basement/water_leak", b"TRUE", 2);
    assert_eq!(states(&raised), [("basement", "water-leak", Raised)]);
    let doc = &raised[0].doc;
    assert_eq!(
        (doc.value.clone(), doc.threshold),
        (Value::Bool(true), None)
    );
    let json = String::from_utf8(doc.to_json()).unwrap();
    assert!(json.contains(r#""value":true,"since""#), "{json}");
    // The same leak in an object payload, with numbers beside it: each judged by its own rule.
    let both = e.on_message(
        b"sensors/boiler",
        br#"{"water_leak":true,"temperature":95,"seq":1}"#,
        3,
    );
    assert_eq!(
        states(&both),
        [
            ("boiler", "water-leak", Raised),
            ("boiler", "overheat", Raised)
        ]
    );
    assert_eq!(
        states(&e.on_message(b"sensors/basement/water_leak", br#"{"v":false}"#, 4)),
        [("basement", "water-leak", Cleared)]
    );
}

#[test]
fn a_state_stream_rolls_up_changes_and_time_in_each_state() {
    let mut e = engine(0);
    for (at, v) in [
        (0, "closed"),
        (10_000, "open"),
        (40_000, "closed"),
        (50_000, "closed"),
    ] {
        e.on_message(b"sensors/hall/door", v.as_bytes(), at);
    }
    let round = e.finish(60_000);
    let rows: Vec<_> = round
        .rollups
        .iter()
        .map(|r| match &r.rollup {
            Closed::States(x) => (x.count, x.changes, x.last.to_string(), x.time_in.clone()),
            other => panic!("{other:?}"),
        })
        .collect();
    let v = |w: &str| Value::parse(w).unwrap();
    assert_eq!(
        rows,
        [(
            4,
            2,
            "closed".to_owned(),
            vec![(v("closed"), 30_000), (v("open"), 30_000)]
        )]
    );
}

#[test]
fn foreign_presence_feeds_presence_rules_and_unmapped_fields_are_counted() {
    let tasmota = Source::new("tasmota", "tele/{device}/SENSOR", Payload::Json, None, None)
        .unwrap()
        .with_presence("tele/{device}/LWT", None, None, None)
        .unwrap();
    let offline = rule(
        "offline",
        "sensors/+/status",
        Kind::Presence {
            grace: Duration::from_secs(60),
        },
        0,
    );
    let stats = Arc::new(Stats::default());
    let options = EngineOptions {
        sources: vec![tasmota],
        ..options(vec![offline])
    };
    let mut e = Engine::new(options, stats.clone(), 0);
    assert!(e.handles(b"tele/plug/LWT"));
    e.on_message(
        b"tele/plug/SENSOR",
        br#"{"Time":"2026-11-21T18:05:45","ENERGY":{"Power":12}}"#,
        1,
    );
    assert!(e.on_message(b"tele/plug/LWT", b"Offline", 1_000).is_empty());
    let raised = e.on_tick(61_000);
    assert_eq!(states(&raised), [("plug", "offline", Raised)]);
    assert_eq!(
        states(&e.on_message(b"tele/plug/LWT", b"Online", 70_000)),
        [("plug", "offline", Cleared)]
    );
    e.housekeeping(71_000);
    let counters = stats.devices();
    assert_eq!(counters["plug"].unmapped, 1, "Time is counted, not read");
    assert_eq!(counters["plug"].decode_errors, 0);
    assert_eq!(
        stats.unmapped_by_source.lock().unwrap().get("tasmota"),
        Some(&1)
    );
}

#[test]
fn a_chattering_contact_raises_flapping_and_clears_as_changes_age() {
    let chatter = rule(
        "chatter",
        "sensors/+/door",
        Kind::Flapping {
            changes: 3,
            window: Duration::from_secs(60),
        },
        0,
    );
    let mut e = Engine::new(options(vec![chatter]), Arc::new(Stats::default()), 0);
    let mut raised = Vec::new();
    for (i, v) in ["open", "closed", "open", "closed", "open"]
        .iter()
        .enumerate()
    {
        raised.extend(e.on_message(b"sensors/hall/door", v.as_bytes(), i as u64 * 1_000));
    }
    assert_eq!(states(&raised), [("hall", "chatter", Raised)]);
    assert_eq!(raised[0].doc.value, Value::Number(4.0));
    assert_eq!(
        e.next_deadline(),
        Some(61_001),
        "the first change leaves the window"
    );
    assert_eq!(states(&e.on_tick(61_001)), [("hall", "chatter", Cleared)]);
}

#[test]
fn a_chattering_contact_under_for_schedules_one_wake_up_not_one_per_change() {
    let door_open = rule(
        "door-open",
        "sensors/+/door",
        Kind::State(crate::rules::StateTest::Equals(
            Value::parse("open").unwrap(),
        )),
        600_000,
    );
    let mut e = Engine::new(options(vec![door_open]), Arc::new(Stats::default()), 0);
    for i in 0..1_000u64 {
        let v: &[u8] = if i % 2 == 0 { b"open" } else { b"closed" };
        e.on_message(b"sensors/hall/door", v, i * 100);
    }
    assert!(
        e.deadlines.len() <= 2,
        "{} wake-ups scheduled for one door",
        e.deadlines.len()
    );
    // An open at 100 s held for ten minutes still raises, on time.
    e.on_message(b"sensors/hall/door", b"open", 100_000);
    assert!(e.on_tick(699_999).is_empty());
    assert_eq!(states(&e.on_tick(700_000)), [("hall", "door-open", Raised)]);
}

/// 2026-11-21T18:05:45.123Z.
const Y2026: Millis = 1_795_284_345_123;

#[test]
fn a_wall_clock_step_during_for_neither_fires_it_early_nor_stalls_it() {
    // Booted in 1970, NTP steps to 2026; NTP steps back a minute.
    for (name, start, step) in [
        ("1970 to 2026", 30_000, Y2026 as i64 - 30_000),
        ("a minute back", Y2026, -60_000),
    ] {
        let at = |t: Millis| Stamp {
            wall: (start + t)
                .checked_add_signed(if t >= 4_500 { step } else { 0 })
                .unwrap(),
            mono: start + t,
        };
        let mut e = engine(10_000);
        assert!(
            e.on_message(b"sensors/a/temperature", b"95", at(0))
                .is_empty()
        );
        assert!(
            e.on_message(b"sensors/a/temperature", b"96", at(5_000))
                .is_empty()
        );
        assert_eq!(e.next_deadline(), Some(start + 10_000), "{name}: monotonic");
        assert!(e.on_tick(at(9_999)).is_empty(), "{name}: not early");
        let raised = e.on_tick(at(10_000));
        assert_eq!(
            states(&raised),
            [("a", "overheat", Raised)],
            "{name}: on time"
        );
        let doc = &raised[0].doc;
        let now = at(10_000).wall;
        assert_eq!(
            (doc.id.clone(), doc.since.clone(), doc.at.clone()),
            (
                format!("site:a:overheat:{}", now - 10_000),
                rfc3339(now - 10_000),
                rfc3339(now)
            ),
            "{name}: documents in the wall clock's new time"
        );
        let cleared = e.on_message(b"sensors/a/temperature", b"70", at(20_000));
        assert_eq!(cleared[0].doc.id, doc.id, "{name}: one episode, one id");
    }
}

#[test]
fn a_wall_clock_step_forward_makes_no_device_stale() {
    let mut e = engine(0);
    e.on_message(b"sensors/a/temperature", b"20", Stamp::from(Y2026));
    let an_hour_later_on_the_wall_a_second_on_the_box = Stamp {
        wall: Y2026 + 3_601_000,
        mono: Y2026 + 1_000,
    };
    e.housekeeping(an_hour_later_on_the_wall_a_second_on_the_box);
    let stats = &e.stats;
    assert_eq!(Stats::get(&stats.devices_stale), 0);
    assert_eq!(Stats::get(&stats.devices_online), 1);
}

/// `forget_after` of [`options`], in ms.
const FORGET_MS: Millis = 3_600_000;

#[test]
fn devices_silent_for_forget_after_are_forgotten_but_not_while_an_alert_is_raised() {
    let mut e = engine(0);
    e.on_message(b"sensors/quiet/temperature", b"20", 0);
    let raised = e.on_message(b"sensors/hot/temperature", b"95", 0);
    assert_eq!(states(&raised), [("hot", "overheat", Raised)]);
    let round = e.housekeeping(1);
    assert_eq!(
        round.devices.len(),
        2,
        "both devices' counters go to the store"
    );
    assert_eq!(e.housekeeping(FORGET_MS - 1).forgotten, 0, "not yet");
    assert_eq!(e.devices_in_memory(), 2);

    let round = e.housekeeping(FORGET_MS);
    assert_eq!(
        round.forgotten, 1,
        "the quiet one, not the one with a raised alert"
    );
    assert_eq!(e.devices_in_memory(), 1);
    assert!(
        e.stats.device("quiet").is_none(),
        "its copy in the stats goes too"
    );
    assert!(e.stats.device("hot").is_some());
    assert_eq!(Stats::get(&e.stats.devices_forgotten), 1);

    // Still raised a day later: kept, and it clears as it would have.
    assert_eq!(e.housekeeping(30 * FORGET_MS).forgotten, 0);
    let cleared = e.on_message(b"sensors/hot/temperature", b"80", 30 * FORGET_MS);
    assert_eq!(states(&cleared), [("hot", "overheat", Cleared)]);
    assert_eq!(e.housekeeping(31 * FORGET_MS - 1).forgotten, 0);
    assert_eq!(e.housekeeping(31 * FORGET_MS).forgotten, 1, "at rest now");
    assert_eq!(e.devices_in_memory(), 0);
}

#[test]
fn a_device_a_silence_rule_is_waiting_for_is_not_forgotten() {
    let silence = rule(
        "quiet",
        "sensors/+/+",
        Kind::Silence {
            after: SilenceAfter::Fixed(Duration::from_secs(7200)),
            scope: Scope::Device,
        },
        0,
    );
    let mut e = Engine::new(options(vec![silence]), Arc::new(Stats::default()), 0);
    e.on_message(b"sensors/d/temperature", b"1", 0);
    assert_eq!(
        e.housekeeping(FORGET_MS).forgotten,
        0,
        "its silence has not been judged yet"
    );
    let raised = e.on_tick(7_200_000);
    assert_eq!(states(&raised), [("d", "quiet", Raised)]);
    assert_eq!(e.housekeeping(10 * FORGET_MS).forgotten, 0, "raised");
    assert_eq!(e.devices_in_memory(), 1);
}

#[test]
fn a_device_that_returns_after_being_forgotten_starts_over_without_a_loss() {
    let mut e = engine(0);
    for seq in 0..5u64 {
        let payload = format!("{{\"v\":20,\"seq\":{seq}}}");
        e.on_message(b"sensors/d/temperature", payload.as_bytes(), seq);
    }
    e.housekeeping(10);
    assert_eq!(e.housekeeping(10 + FORGET_MS).forgotten, 1);

    // Back with its counter far on (it kept counting, or it was reflashed): a new device,
    // judged at once, and no messages reported lost for the time it was away.
    let back = 2 * FORGET_MS;
    let raised = e.on_message(b"sensors/d/temperature", br#"{"v":95,"seq":100}"#, back);
    assert_eq!(states(&raised), [("d", "overheat", Raised)]);
    let round = e.housekeeping(back + 1);
    assert_eq!(round.devices.len(), 1);
    let add = &round.devices[0].add;
    assert_eq!((add.messages, add.loss.lost, add.loss.restarts), (1, 0, 0));
    assert_eq!(Stats::get(&e.stats.seq_gap_messages), 0);
    // Its `seq` is followed from there on.
    e.on_message(b"sensors/d/temperature", br#"{"v":95,"seq":103}"#, back + 2);
    e.housekeeping(back + 3);
    assert_eq!(e.stats.device("d").unwrap().loss.lost, 2);
}

/// A silence rule for any metric of a device, waiting 2 s.
fn silent_2s() -> Rule {
    rule(
        "silent",
        "sensors/+/+",
        Kind::Silence {
            after: SilenceAfter::Fixed(Duration::from_secs(2)),
            scope: Scope::Device,
        },
        0,
    )
}

#[test]
fn a_wake_up_that_comes_late_writes_the_document_of_one_on_time() {
    let run = |tick_at: Millis| {
        let mut e = Engine::new(
            options(vec![overheat(1_000), silent_2s()]),
            Arc::new(Stats::default()),
            0,
        );
        let mut docs = Vec::new();
        docs.extend(e.on_message(b"sensors/a/temperature", b"95", 10_000));
        docs.extend(e.on_tick(10_000 + tick_at));
        docs.extend(e.on_tick(12_000 + tick_at));
        docs.into_iter().map(|a| a.doc).collect::<Vec<_>>()
    };
    let on_time = run(0);
    assert_eq!(
        on_time
            .iter()
            .map(|d| (d.rule.as_str(), d.at.as_str()))
            .collect::<Vec<_>>(),
        [
            ("overheat", "1970-01-01T00:00:11.000Z"),
            ("silent", "1970-01-01T00:00:12.000Z")
        ]
    );
    assert_eq!(run(1_700), on_time, "late by 1.7 s: the same documents");
}

#[test]
fn a_peers_devices_fire_by_the_peers_time_and_the_two_engines_agree() {
    // Gateway A judges its device's readings as they come; gateway B gets them mirrored,
    // with A's stamps, and the time A says it has reached.
    let rules = || vec![overheat(1_000), silent_2s()];
    let mut a = Engine::new(options(rules()), Arc::new(Stats::default()), 0);
    let mut b = Engine::new(options(rules()), Arc::new(Stats::default()), 0);
    b.set_peer_active(true);
    let readings: [(Millis, &[u8]); 4] = [
        (10_000, b"95"),
        (10_400, b"96"),
        (10_900, b"80"),
        (11_500, b"97"),
    ];
    let mut from_a = Vec::new();
    let mut from_b = Vec::new();
    for (at, value) in readings {
        from_a.extend(a.on_tick(at));
        from_a.extend(a.on_message(b"sensors/a/temperature", value, at));
        // B's own timer runs ahead of A's readings: it must not fire A's device's deadlines.
        from_b.extend(b.on_tick(at + 5_000));
        from_b.extend(b.on_peer_message(b"sensors/a/temperature", value, Stamp::from(at)));
    }
    for t in [12_500, 13_600, 20_000] {
        from_a.extend(a.on_tick(t));
        from_b.extend(b.peer_time(Stamp::from(t)));
    }
    let docs = |v: Vec<Alert>| v.into_iter().map(|a| a.doc).collect::<Vec<_>>();
    let (from_a, from_b) = (docs(from_a), docs(from_b));
    assert_eq!(
        from_a
            .iter()
            .map(|d| (d.rule.as_str(), d.state, d.since.as_str()))
            .collect::<Vec<_>>(),
        [
            ("overheat", Raised, "1970-01-01T00:00:11.500Z"),
            ("silent", Raised, "1970-01-01T00:00:11.500Z"),
        ]
    );
    assert_eq!(from_b, from_a);

    // A is gone: B's own timer now fires what A's time would have.
    let mut c = Engine::new(options(rules()), Arc::new(Stats::default()), 0);
    c.set_peer_active(true);
    assert!(
        c.on_peer_message(b"sensors/x/temperature", b"20", Stamp::from(1_000))
            .is_empty()
    );
    assert!(
        c.on_tick(60_000).is_empty(),
        "held while the peer is heard from"
    );
    c.set_peer_active(false);
    assert_eq!(states(&c.on_tick(60_000)), [("x", "silent", Raised)]);
}

#[test]
fn presence_changes_new_streams_and_forgotten_devices_are_told() {
    use crate::events::Event;
    let mut e = engine(0);
    e.on_message(b"sensors/a/temperature", b"20", 1_000);
    e.on_message(b"sensors/a/temperature", b"21", 2_000);
    e.on_message(b"sensors/a/status", b"offline", 3_000);
    e.on_message(b"sensors/a/status", b"offline", 3_500);
    e.on_message(b"sensors/a/temperature", b"22", 4_000);
    let told = e.take_events();
    assert_eq!(
        told,
        [
            Event::Stream {
                device: "a".into(),
                metric: "temperature".into()
            },
            Event::Presence {
                device: "a".into(),
                online: false,
                at: 3_000
            },
            Event::Presence {
                device: "a".into(),
                online: true,
                at: 4_000
            },
        ],
        "a repeated status is not a change"
    );
    assert!(e.take_events().is_empty(), "taken once");
    e.housekeeping(4_000 + 3_600_000);
    assert!(
        matches!(&e.take_events()[..], [Event::Forgotten(gone)] if gone[..] == [Box::from("a")])
    );
}

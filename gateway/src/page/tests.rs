use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::aggregate::{Closed, Rollup};
use crate::rules::{AlertState, Severity};
use crate::store::{OutboxEntry, RollupRow, Store, StoreOptions};
use crate::value::Value;

/// 2026-11-21T18:05:45.123Z.
const NOW: Millis = 1_795_284_345_123;

fn doc(device: &str, rule: &str, severity: Severity, state: AlertState, since: Millis) -> AlertDoc {
    AlertDoc {
        id: format!("site:{device}:{rule}:{since}"),
        rule: rule.into(),
        device: device.into(),
        metric: "temperature".into(),
        severity,
        state,
        value: Value::Number(95.0),
        threshold: Some(90.0),
        since: crate::alert::rfc3339(since),
        at: crate::alert::rfc3339(since),
        gateway: "site".into(),
        repeat: 0,
        labels: Default::default(),
    }
}

fn store(dir: &std::path::Path) -> (Store, crate::store::StoreThread) {
    let options = StoreOptions {
        max_db_bytes: 64 << 20,
        raw_retention: None,
        reserve_bytes: 0,
    };
    Store::open(dir, options, Arc::new(Stats::default())).unwrap()
}

fn outbox(d: &AlertDoc) -> Option<OutboxEntry> {
    Some(OutboxEntry {
        id: d.id.clone(),
        topic: d.topic(),
        payload: Bytes::from(d.to_json()),
        retain: true,
    })
}

#[tokio::test]
async fn alerts_answer_what_is_raised_and_what_today_brought_delivered_or_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let (store, thread) = store(dir.path());
    let yesterday = doc(
        "old",
        "overheat",
        Severity::Critical,
        AlertState::Raised,
        NOW - 86_400_000,
    );
    let warm = doc(
        "a",
        "warm",
        Severity::Warning,
        AlertState::Raised,
        NOW - 5_000,
    );
    let hot = doc(
        "b",
        "overheat",
        Severity::Critical,
        AlertState::Raised,
        NOW - 10_000,
    );
    let hot_clear = AlertDoc {
        state: AlertState::Cleared,
        ..hot.clone()
    };
    let leak = doc(
        "c",
        "water-leak",
        Severity::Critical,
        AlertState::Raised,
        NOW - 1_000,
    );
    for d in [&yesterday, &warm, &hot, &hot_clear, &leak] {
        store.alert(d, outbox(d));
    }
    // The upstream acknowledged the first three rows.
    for item in store.outbox_page(0, 3).await {
        store.outbox_done(item.seq);
    }
    store.flush().await;

    // Recorded "today" is by the time of recording: everything here; ask as of today.
    let now = crate::alert::now_millis();
    let alerts = read_alerts(dir.path(), true, now).unwrap();
    let active: Vec<&str> = alerts.active.iter().map(|d| d.device.as_str()).collect();
    assert_eq!(
        active,
        ["c", "old", "a"],
        "critical first, newest first; b cleared"
    );
    let today: Vec<(&str, &str, bool)> = alerts
        .today
        .iter()
        .map(|t| (t.device.as_str(), t.state.as_str(), t.in_outbox))
        .collect();
    assert_eq!(
        today,
        [
            ("c", "raised", true),
            ("b", "cleared", true),
            ("b", "raised", true),
            ("a", "raised", false),
            ("old", "raised", false),
        ],
        "newest first; b's id still has its clear in the outbox"
    );
    let tomorrow = read_alerts(dir.path(), true, now + 86_400_000).unwrap();
    assert!(tomorrow.today.is_empty(), "only today's transitions");
    let json = serde_json::to_value(&alerts).unwrap();
    assert_eq!(json["active"][0]["rule"], "water-leak");
    assert_eq!(json["today"][0]["in_outbox"], true);
    drop(store);
    thread.join();
    assert!(read_alerts(&dir.path().join("nowhere"), true, now).is_err());
}

#[tokio::test]
async fn a_series_is_the_stream_s_rollups_of_the_hours_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let (store, thread) = store(dir.path());
    let row = |metric: &str, start: Millis, mean: f64| RollupRow {
        device: "boiler-1".into(),
        metric: metric.into(),
        rollup: Closed::Numbers(Rollup {
            start,
            len: 60_000,
            count: 6,
            min: mean - 1.0,
            max: mean + 1.0,
            mean,
            last: mean,
        }),
    };
    store.rollups(vec![
        row("temperature", NOW - 25 * 3_600_000, 10.0),
        row("temperature", NOW - 3_600_000, 20.0),
        row("temperature", NOW - 60_000, 21.0),
        row("humidity", NOW - 60_000, 40.0),
    ]);
    store.flush().await;
    let day = read_series(dir.path(), "boiler-1", "temperature", 24, NOW).unwrap();
    assert_eq!(
        day.points,
        [
            (NOW - 3_600_000, 19.0, 20.0, 21.0),
            (NOW - 60_000, 20.0, 21.0, 22.0)
        ]
    );
    let two_days = read_series(dir.path(), "boiler-1", "temperature", 48, NOW).unwrap();
    assert_eq!(two_days.points.len(), 3);
    assert!(
        read_series(dir.path(), "nobody", "temperature", 24, NOW)
            .unwrap()
            .points
            .is_empty()
    );
    drop(store);
    thread.join();
}

#[test]
fn query_strings_are_read_and_decoded() {
    let uri: Uri = "/api/series?device=boiler%201&metric=temp+C&hours=3&flag"
        .parse()
        .unwrap();
    assert_eq!(query(&uri, "device").as_deref(), Some("boiler 1"));
    assert_eq!(query(&uri, "metric").as_deref(), Some("temp C"));
    assert_eq!(query(&uri, "hours").as_deref(), Some("3"));
    assert_eq!(query(&uri, "flag").as_deref(), Some(""));
    assert_eq!(query(&uri, "nothing"), None);
    assert_eq!(query(&"/x".parse().unwrap(), "device"), None);
}

#[test]
fn bandwidth_keeps_a_day_of_samples_and_says_what_was_saved() {
    let stats = Arc::new(Stats::default());
    let (control, _) = mpsc::channel(1);
    let page = Page::new(
        stats.clone(),
        PathBuf::new(),
        control,
        crate::events::channel(),
        true,
    );
    assert_eq!(bandwidth_now(&page).saved_percent, None, "nothing yet");
    page.record_bandwidth();
    Stats::add(&stats.forward_all_bytes, 100_000);
    Stats::add(&stats.upstream_bytes, 250);
    let b = bandwidth_now(&page);
    assert_eq!(b.points.len(), 2, "the sample and now");
    assert_eq!((b.points[1].1, b.points[1].2), (250, 100_000));
    assert!((b.saved_percent.unwrap() - 99.75).abs() < 1e-9);
    for _ in 0..BANDWIDTH_SAMPLES + 10 {
        page.record_bandwidth();
    }
    assert_eq!(bandwidth_now(&page).points.len(), BANDWIDTH_SAMPLES + 1);
}

#[test]
fn the_page_asks_for_nothing_outside_the_gateway() {
    for (name, text) in [
        ("index.html", INDEX),
        ("page.js", SCRIPT),
        ("page.css", STYLE),
    ] {
        for outside in ["http:", "https:", "\"//", "'//", "@import", "url("] {
            let hits: Vec<&str> = text.lines().filter(|l| l.contains(outside)).collect();
            assert!(
                hits.is_empty(),
                "{name} refers outside with {outside:?}: {hits:?}"
            );
        }
    }
    assert!(POLICY.starts_with("default-src 'none'"));
    // Everything a device names goes in as text: the page sets markup only from the gateway's SVG.
    let markup: Vec<&str> = SCRIPT.lines().filter(|l| l.contains("innerHTML")).collect();
    assert_eq!(markup.len(), 2, "{markup:?}");
    assert!(
        markup
            .iter()
            .all(|l| l.contains("svg") || l.contains("plot/series.svg"))
    );
}

fn device(name: &str, online: Option<bool>, stale: bool, seen: Millis, lost: u64) -> DeviceView {
    DeviceView {
        name: name.into(),
        online,
        last_seen_ms: seen,
        stale,
        values: Default::default(),
        lost,
        decode_errors: 0,
        source: "native".into(),
        raised: Vec::new(),
    }
}

fn names(chosen: &[&DeviceView]) -> Vec<String> {
    chosen.iter().map(|d| d.name.clone()).collect()
}

fn ask(uri: &str) -> DeviceQuery {
    DeviceQuery::parse(&uri.parse().unwrap()).unwrap()
}

#[test]
fn the_device_list_is_filtered_sorted_and_paged_by_the_gateway() {
    let mut tank = device("Tank-2", Some(true), false, NOW - 5_000, 0);
    tank.values
        .insert("battery".into(), crate::value::Value::Number(12.0));
    tank.source = "tasmota".into();
    let mut list = vec![
        device("boiler-1", Some(true), false, NOW - 1_000, 3),
        device("boiler-2", Some(false), false, NOW - 60_000, 0),
        device("pump", None, true, NOW - 900_000, 7),
        tank,
    ];
    let mut cellar = device("tank-1", Some(true), false, NOW - 2_000, 0);
    cellar
        .values
        .insert("battery_pct".into(), crate::value::Value::Number(80.0));
    list.push(cellar);
    list.sort_by(|a, b| a.name.cmp(&b.name));

    // No query: every device, by name, as before paging existed.
    let (all, counts) = select_devices(&list, &ask("/api/devices"));
    assert_eq!(
        names(&all),
        ["Tank-2", "boiler-1", "boiler-2", "pump", "tank-1"]
    );
    assert_eq!(
        counts,
        DeviceCounts {
            total: 5,
            not_online: 2,
            matching: 5
        },
        "boiler-2 is offline, pump silent"
    );

    // What needs a look first: offline, then silent, then the rest by name.
    let (by_state, _) = select_devices(&list, &ask("/api/devices?sort=state"));
    assert_eq!(
        names(&by_state),
        ["boiler-2", "pump", "Tank-2", "boiler-1", "tank-1"]
    );
    let (reversed, _) = select_devices(&list, &ask("/api/devices?sort=state&desc=1"));
    assert_eq!(names(&reversed)[4], "boiler-2");

    // A filter ignores case and counts what it matched; the site's totals stay.
    let (tanks, counts) = select_devices(&list, &ask("/api/devices?q=TANK"));
    assert_eq!(names(&tanks), ["Tank-2", "tank-1"]);
    assert_eq!((counts.total, counts.matching), (5, 2));

    // Lowest battery first, devices without one last; most lost first; oldest heard first.
    let (battery, _) = select_devices(&list, &ask("/api/devices?sort=battery"));
    assert_eq!(names(&battery)[..2], ["Tank-2", "tank-1"]);
    let (lost, _) = select_devices(&list, &ask("/api/devices?sort=lost"));
    assert_eq!(names(&lost)[..2], ["pump", "boiler-1"]);
    let (seen, _) = select_devices(&list, &ask("/api/devices?sort=seen"));
    assert_eq!(names(&seen)[..2], ["pump", "boiler-2"]);
    let (source, _) = select_devices(&list, &ask("/api/devices?sort=source&desc=true"));
    assert_eq!(names(&source)[0], "Tank-2");

    // Pages: offset and limit after the order; past the end, nothing.
    let (page, counts) = select_devices(&list, &ask("/api/devices?sort=state&offset=1&limit=2"));
    assert_eq!(names(&page), ["pump", "Tank-2"]);
    assert_eq!(counts.matching, 5);
    let (past, _) = select_devices(&list, &ask("/api/devices?offset=9&limit=2"));
    assert!(past.is_empty());
}

#[test]
fn a_device_query_that_makes_no_sense_is_refused_with_the_reason() {
    let refused = |uri: &str| DeviceQuery::parse(&uri.parse().unwrap()).unwrap_err();
    assert!(refused("/api/devices?sort=colour").contains("one of state, name"));
    assert!(refused("/api/devices?limit=ten").contains("limit=\"ten\""));
    assert!(refused("/api/devices?offset=-1").contains("offset"));
    let q = ask("/api/devices?q=Boiler%201&limit=100");
    assert_eq!(
        (q.q.as_str(), q.limit, q.offset),
        ("boiler 1", Some(100), 0)
    );
}

//! Tables for `BENCHMARKS.md` from the raw figures of a run (`results.json`).
//!
//! Every figure is computed per run, then shown as the median over runs with the spread
//! (smallest–largest) when there was more than one. A target from the issue stands next to the
//! figure it is about, with "met" or "missed" judged on the median; when the runs disagree,
//! the verdict says so. The generated part sits between two marker lines; whatever else the
//! file holds (other benchmarks' sections) is kept.

use serde_json::Value;

use crate::stats::Spread;

/// First line of the generated part.
const BEGIN: &str = "<!-- watchpost-bench: begin. Written by the benchmark harness; edits up to the end marker are overwritten. -->";
/// Last line of the generated part.
const END: &str = "<!-- watchpost-bench: end -->";

/// The whole file: `previous` with its generated part replaced (or, the first time, inserted
/// after the title).
pub fn render(results: &Value, previous: &str) -> String {
    let generated = format!("{BEGIN}\n\n{}\n{END}\n", body(results));
    if let (Some(a), Some(b)) = (previous.find(BEGIN), previous.find(END)) {
        if a < b {
            let rest = previous[b + END.len()..].trim_start_matches('\n');
            let sep = if rest.is_empty() { "" } else { "\n" };
            return format!("{}{generated}{sep}{rest}", &previous[..a]);
        }
    }
    let (title, rest) = match previous.split_once('\n') {
        Some((first, rest)) if first.starts_with("# ") => (first, rest),
        _ => ("# Benchmarks", previous),
    };
    let rest = rest.trim_start_matches('\n');
    let sep = if rest.is_empty() { "" } else { "\n" };
    format!("{title}\n\n{generated}{sep}{rest}")
}

/// A figure over the runs, formatted by `unit`.
struct Figure {
    spread: Option<Spread>,
    unit: fn(f64) -> String,
}

impl Figure {
    fn over(
        runs: &[Value],
        unit: fn(f64) -> String,
        f: impl FnMut(&Value) -> Option<f64>,
    ) -> Figure {
        Figure {
            spread: Spread::of(runs.iter().filter_map(f)),
            unit,
        }
    }

    fn of(value: Option<f64>, unit: fn(f64) -> String) -> Figure {
        Figure {
            spread: Spread::of(value),
            unit,
        }
    }

    /// `median (min–max)`, or `median` of one run, or "–" without any.
    fn show(&self) -> String {
        match self.spread {
            None => "–".into(),
            Some(s) if s.n == 1 || s.min == s.max => (self.unit)(s.median),
            Some(s) => format!(
                "{} ({}–{})",
                (self.unit)(s.median),
                (self.unit)(s.min),
                (self.unit)(s.max)
            ),
        }
    }

    /// "met" or "missed" for `ok` judged on the median, noting runs that disagree.
    fn verdict(&self, ok: impl Fn(f64) -> bool) -> String {
        let Some(s) = self.spread else {
            return "not measured".into();
        };
        let (median, lo, hi) = (ok(s.median), ok(s.min), ok(s.max));
        match (median, lo && hi) {
            (true, true) => "**met**".into(),
            (true, false) => "**met** (not in every run)".into(),
            (false, _) if lo || hi => "**missed** (met in some runs)".into(),
            (false, _) => "**missed**".into(),
        }
    }
}

fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.1} ms")
    }
}

fn percent(v: f64) -> String {
    let p = v * 100.0;
    if p == 0.0 {
        "0 %".into()
    } else if p < 0.01 {
        format!("{p:.4} %")
    } else if p < 1.0 {
        format!("{p:.3} %")
    } else {
        format!("{p:.1} %")
    }
}

fn times(v: f64) -> String {
    format!("{v:.2}×")
}

fn cores(v: f64) -> String {
    format!("{v:.3}")
}

fn count(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn rate(v: f64) -> String {
    format!("{}/s", count(v))
}

fn bytes(v: f64) -> String {
    if v < 10_000.0 {
        format!("{} B", count(v))
    } else if v < 10.0 * 1024.0 * 1024.0 {
        format!("{:.1} KiB", v / 1024.0)
    } else if v < 10.0 * 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", v / 1024.0 / 1024.0)
    } else {
        format!("{:.2} GiB", v / 1024.0 / 1024.0 / 1024.0)
    }
}

fn kib(v: f64) -> String {
    bytes(v * 1024.0)
}

fn mib(v: f64) -> String {
    format!("{:.1} MiB", v / 1024.0)
}

fn plain(v: f64) -> String {
    format!("{v:.2}")
}

fn seconds(v: f64) -> String {
    format!("{v:.1} s")
}

fn seconds2(v: f64) -> String {
    format!("{v:.2} s")
}

/// Seconds, in ms below one.
fn since_stop(v: f64) -> String {
    if v < 1.0 { ms(v * 1000.0) } else { seconds2(v) }
}

/// `x / y`, if `y` is not 0.
fn ratio(x: Option<f64>, y: Option<f64>) -> Option<f64> {
    match (x, y) {
        (Some(x), Some(y)) if y != 0.0 => Some(x / y),
        _ => None,
    }
}

/// The element of the array `list` whose `system` (and `conns`, if given) match.
fn find<'a>(list: &'a Value, system: &str, conns: Option<u64>) -> Option<&'a Value> {
    list.as_array()?
        .iter()
        .find(|v| v["system"] == system && conns.is_none_or(|c| v["conns"].as_u64() == Some(c)))
}

/// True if, in some run, `system`'s consumer in `phase` was still going when the harness
/// stopped waiting for it.
fn unsettled(runs: &[Value], phase: &str, system: &str, conns: Option<u64>) -> bool {
    runs.iter()
        .any(|r| find(&r[phase], system, conns).is_some_and(|v| v["settled"] == false))
}

/// A table with a header row.
struct Table(String);

impl Table {
    fn new(header: &[&str]) -> Table {
        let mut t = Table(String::new());
        t.row(header.iter().map(|s| s.to_string()));
        let align: Vec<String> = header
            .iter()
            .enumerate()
            .map(|(i, _)| if i == 0 { "---" } else { "---:" }.to_owned())
            .collect();
        t.row(align);
        t
    }

    fn row(&mut self, cells: impl IntoIterator<Item = String>) {
        let cells: Vec<String> = cells.into_iter().collect();
        self.0.push_str(&format!("| {} |\n", cells.join(" | ")));
    }

    fn done(self) -> String {
        self.0
    }
}

/// Everything between the markers.
fn body(r: &Value) -> String {
    let runs: Vec<Value> = r["runs"].as_array().cloned().unwrap_or_default();
    let runs = runs.as_slice();
    let c = &r["config"];
    let m = &r["machine"];
    let quick = c["quick"].as_bool().unwrap_or(false);
    let mut out = String::new();

    out.push_str("## Watchpost against a Mosquitto bridge, bare rumqttd and bare Mosquitto\n\n");
    out.push_str(&format!(
        "Written by `{}` on {}, in {:.1} minutes (after building). Real processes over \
         loopback on one machine: simulated devices (`watchpost-sim`, the firmware's own logic \
         over TCP), the release `watchpost` binary, Mosquitto as the upstream broker and as the site's bridge, bare \
         rumqttd with an in-process subscriber that only counts, and the harness's own load and \
         measurement clients. Every figure is the median of {} run{}, with the spread \
         (smallest–largest) in brackets. Nothing here is asserted by a test; CI runs `--quick` \
         and does not check its figures.\n\n",
        r["command"].as_str().unwrap_or("?"),
        m["date"].as_str().unwrap_or("?"),
        r["elapsed_s"].as_f64().unwrap_or(0.0) / 60.0,
        runs.len(),
        if runs.len() == 1 { "" } else { "s" },
    ));
    if quick {
        out.push_str(
            "**This is a `--quick` run**: smaller fleets and windows of seconds, one run. Its \
             figures show that the harness works; they are not the project's figures.\n\n",
        );
    }

    out.push_str("### Machine and versions\n\n");
    let mut t = Table::new(&["", ""]);
    let text = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    t.row(["CPU".into(), text(&m["cpu"])]);
    t.row(["cores".into(), m["cores"].to_string()]);
    t.row([
        "memory".into(),
        format!("{:.1} GiB", m["memory_gib"].as_f64().unwrap_or(0.0)),
    ]);
    t.row(["kernel".into(), text(&m["kernel"])]);
    t.row([
        "load average (1, 5, 15 min) before / after".into(),
        format!("{} / {}", text(&m["load_before"]), text(&m["load_after"])),
    ]);
    let loads: Vec<f64> = runs
        .iter()
        .flat_map(|r| r["load_at_steps"].as_array().cloned().unwrap_or_default())
        .filter_map(|step| step[1].as_str()?.split_whitespace().next()?.parse().ok())
        .collect();
    if let Some(s) = Spread::of(loads) {
        t.row([
            "load average (1 min) as each step started".into(),
            format!("{:.2}–{:.2}, median {:.2}", s.min, s.max, s.median),
        ]);
    }
    t.row([
        "watchpost".into(),
        format!(
            "{}, git {}{}",
            text(&m["watchpost"]),
            text(&m["commit"]),
            if m["dirty"].as_bool().unwrap_or(false) {
                " with uncommitted changes"
            } else {
                ""
            }
        ),
    ]);
    t.row(["rustc".into(), text(&m["rustc"])]);
    t.row(["mosquitto".into(), text(&m["mosquitto"])]);
    t.row([
        "rumqttd".into(),
        format!(
            "{} (the bare peer; Watchpost's broker is its own since issue 17)",
            text(&m["rumqttd"])
        ),
    ]);
    t.row([
        "rumqttc".into(),
        format!("{} (Watchpost's uplink client)", text(&m["rumqttc"])),
    ]);
    t.row([
        "command".into(),
        format!("`{}`", r["command"].as_str().unwrap_or("?")),
    ]);
    out.push_str(&t.done());
    out.push('\n');

    let plant = Plant::new(runs);
    let latency = Latency::new(runs);
    let saturation = Saturation::new(runs, c);
    let overload = Overload::new(runs);
    let fleet = Fleet::new(runs);
    let sessions = Sessions::new(runs);
    let retained = Retained::new(runs);
    let churn = Churn::new(runs);
    let summary = summary_ratio(r, runs);

    out.push_str("### Targets\n\n");
    let mut t = Table::new(&["target (issue 8)", "figure", "verdict"]);
    t.row([
        "upstream bytes on plant ≤ 0.1 % of the Mosquitto bridge, summaries off".into(),
        plant.ratio.show(),
        plant.ratio.verdict(|v| v <= 0.001),
    ]);
    t.row([
        "critical alerts delivered upstream: 100 %".into(),
        plant.delivered.show(),
        plant.delivered.verdict(|v| v >= 1.0),
    ]);
    t.row([
        "the same with 15-minute summaries on (reported, no target)".into(),
        summary.show(),
        "–".into(),
    ]);
    t.row([
        "threshold alert latency device → upstream subscriber, p99 ≤ 5 ms on plant".into(),
        latency.plant_upstream.p99.show(),
        latency.plant_upstream.p99.verdict(|v| v <= 5.0),
    ]);
    t.row([
        "threshold alert latency device → local `alerts/#` subscriber, p99 ≤ 2 ms on plant".into(),
        latency.plant_local.p99.show(),
        latency.plant_local.p99.verdict(|v| v <= 2.0),
    ]);
    t.row([
        "leak alert (state rule) latency device → upstream subscriber, within a threshold \
         alert's: p99 ≤ 5 ms on plant"
            .into(),
        latency.plant_leak_upstream.p99.show(),
        latency.plant_leak_upstream.p99.verdict(|v| v <= 5.0),
    ]);
    t.row([
        "leak alert (state rule) latency device → local `alerts/#` subscriber, within a \
         threshold alert's: p99 ≤ 2 ms on plant"
            .into(),
        latency.plant_leak_local.p99.show(),
        latency.plant_leak_local.p99.verdict(|v| v <= 2.0),
    ]);
    for (i, conns) in saturation.conns.iter().enumerate() {
        let s = &saturation.by_conns[i];
        t.row([
            format!("sustained ingest ≥ 150,000 readings/s ({conns} connections, QoS 0)"),
            s.watchpost.show(),
            s.watchpost.verdict(|v| v >= 150_000.0),
        ]);
        t.row([
            format!("… and above bare Mosquitto ({conns} connections)"),
            s.vs_mosquitto.show(),
            s.vs_mosquitto.verdict(|v| v > 1.0),
        ]);
        t.row([
            format!("… and ≥ 80 % of bare rumqttd ({conns} connections)"),
            s.vs_rumqttd.show(),
            s.vs_rumqttd.verdict(|v| v >= 0.8),
        ]);
        t.row([
            format!(
                "sustained ingest with {} of the readings states ({conns} connections, QoS 0; \
                 reported, no target)",
                saturation.share
            ),
            s.mixed.show(),
            "–".into(),
        ]);
    }
    for row in saturation.retained.iter().filter(|r| r.name == "Watchpost") {
        t.row([
            format!(
                "readings with the retain flag set cost the saturation figure no more than \
                 noise ({} connections, QoS 0; issue 18)",
                row.conns
            ),
            format!("{} of the figure without", row.ratio.show()),
            row.verdict(),
        ]);
    }
    t.row([
        "RSS ≤ 48 MB on fleet (10,000 connected devices)".into(),
        fleet.watchpost_rss.show(),
        if fleet.devices >= 10_000 {
            fleet
                .watchpost_rss
                .verdict(|kib| kib * 1024.0 <= 48_000_000.0)
        } else {
            format!("not judged: {} devices in this run", fleet.devices)
        },
    ]);
    t.row([
        format!(
            "device churn ({} distinct devices): RSS after the idle expiry within 10 % of \
             before (issue 21)",
            count(c["churn_devices"].as_f64().unwrap_or(0.0))
        ),
        format!("{} of before", churn.after_over_before.show()),
        churn.after_over_before.verdict(|v| v <= 1.1),
    ]);
    t.row([
        "under QoS 1 overload, nothing acknowledged is lost silently".into(),
        format!("{} readings", overload.silently_lost.show()),
        overload.silently_lost.verdict(|v| v <= 0.0),
    ]);
    out.push_str(&t.done());
    out.push('\n');

    out.push_str(&plant.section(c, &summary, r));
    out.push_str(&latency.section(c));
    out.push_str(&saturation.section(c));
    out.push_str(&overload.section(c));
    out.push_str(&fleet.section(c));
    out.push_str(&sessions.section(c));
    out.push_str(&retained.section(c));
    out.push_str(&churn.section(c));
    out.push_str(&Pair::new(runs, c).section(c));
    out.push_str(&startup_section(r, runs));
    out.push_str(METHOD);
    out
}

/// Plant figures.
struct Plant {
    ratio: Figure,
    delivered: Figure,
    readings_rate: Figure,
    crossing: Figure,
    wp_bytes: Figure,
    br_bytes: Figure,
    wp_per_hour: Figure,
    br_per_hour: Figure,
    br_per_reading: Figure,
    raised: (Figure, Figure),
    cleared: (Figure, Figure),
    gw_cores: Figure,
    gw_cores_per_k: Figure,
    gw_rss: Figure,
    gw_peak: Figure,
    br_cores: Figure,
    br_rss: Figure,
    judged: Figure,
    dropped: Figure,
}

impl Plant {
    fn new(runs: &[Value]) -> Plant {
        let p = |r: &Value| r.get("plant").cloned();
        let f = |unit: fn(f64) -> String, g: fn(&Value) -> Option<f64>| {
            Figure::over(runs, unit, |r| p(r).and_then(|v| g(&v)))
        };
        Plant {
            ratio: f(percent, |v| {
                ratio(
                    v["upstream_bytes"]["watchpost"].as_f64(),
                    v["upstream_bytes"]["bridge"].as_f64(),
                )
            }),
            delivered: f(percent, |v| {
                let a = &v["alerts"];
                let expected = a["excursions"].as_f64()? + a["cleared_local"].as_f64()?;
                let got = a["raised_delivered"].as_f64()? + a["cleared_delivered"].as_f64()?;
                ratio(Some(got), Some(expected))
            }),
            readings_rate: f(rate, |v| v["readings_rate"].as_f64()),
            crossing: f(percent, |v| {
                ratio(
                    v["sim_watchpost"]["excursion_samples"].as_f64(),
                    v["sim_watchpost"]["values"].as_f64(),
                )
            }),
            wp_bytes: f(bytes, |v| v["upstream_bytes"]["watchpost"].as_f64()),
            br_bytes: f(bytes, |v| v["upstream_bytes"]["bridge"].as_f64()),
            wp_per_hour: f(bytes, |v| per_hour(v, "watchpost")),
            br_per_hour: f(bytes, |v| per_hour(v, "bridge")),
            br_per_reading: f(plain, |v| {
                ratio(
                    v["upstream_bytes"]["bridge"].as_f64(),
                    v["readings"].as_f64(),
                )
            }),
            raised: (
                f(count, |v| v["alerts"]["raised_delivered"].as_f64()),
                f(count, |v| v["alerts"]["excursions"].as_f64()),
            ),
            cleared: (
                f(count, |v| v["alerts"]["cleared_delivered"].as_f64()),
                f(count, |v| v["alerts"]["cleared_local"].as_f64()),
            ),
            gw_cores: f(cores, |v| v["gateway"]["cores"].as_f64()),
            gw_cores_per_k: f(cores, |v| {
                ratio(
                    v["gateway"]["cores"].as_f64(),
                    v["readings_rate"].as_f64().map(|r| r / 1000.0),
                )
            }),
            gw_rss: f(mib, |v| v["gateway"]["rss_kib"].as_f64()),
            gw_peak: f(mib, |v| v["gateway"]["peak_rss_kib"].as_f64()),
            br_cores: f(cores, |v| v["bridge_broker"]["cores"].as_f64()),
            br_rss: f(mib, |v| v["bridge_broker"]["rss_kib"].as_f64()),
            judged: f(percent, |v| {
                let a = &v["accounting"];
                ratio(a["readings_judged"].as_f64(), a["readings_sent"].as_f64())
            }),
            dropped: f(count, |v| v["accounting"]["dropped_counted"].as_f64()),
        }
    }

    fn section(&self, c: &Value, summary: &Figure, r: &Value) -> String {
        let mut out = String::from("### Plant: what goes upstream\n\n");
        out.push_str(&format!(
            "{} devices × 3 metrics (temperature, humidity, pressure), every reading sent, one per \
             metric per second, as one JSON object per device and second (QoS 1). Excursions \
             above the critical overheat rule (> 90 °C) come as episodes of 10 to 60 s. The same \
             devices (same seed) run at the same time against Watchpost and against a Mosquitto \
             that bridges `sensors/#` upstream at QoS 1. Bytes are counted by a TCP proxy on each \
             uplink, both directions, over a window of {:.0} s after every device connected.\n\n",
            c["plant_devices"],
            c["plant_window_s"].as_f64().unwrap_or(0.0)
        ));
        let mut t = Table::new(&["", "Watchpost", "Mosquitto bridge", "target", "verdict"]);
        let none = || "".to_owned();
        t.row([
            "readings/s into the site".into(),
            self.readings_rate.show(),
            "the same devices".into(),
            none(),
            none(),
        ]);
        t.row([
            "readings across the critical rule".into(),
            self.crossing.show(),
            "the same".into(),
            "about 0.1 %".into(),
            none(),
        ]);
        t.row([
            "upstream bytes in the window".into(),
            self.wp_bytes.show(),
            self.br_bytes.show(),
            none(),
            none(),
        ]);
        t.row([
            "upstream bytes per hour".into(),
            self.wp_per_hour.show(),
            self.br_per_hour.show(),
            none(),
            none(),
        ]);
        t.row([
            "upstream bytes, share of the bridge's".into(),
            self.ratio.show(),
            "100 %".into(),
            "≤ 0.1 %".into(),
            self.ratio.verdict(|v| v <= 0.001),
        ]);
        t.row([
            "… with 15-minute summaries on".into(),
            summary.show(),
            "100 %".into(),
            "(reported)".into(),
            none(),
        ]);
        t.row([
            "bridge: upstream bytes per reading".into(),
            none(),
            self.br_per_reading.show(),
            none(),
            none(),
        ]);
        t.row([
            "critical alerts raised: delivered upstream / excursions the devices started".into(),
            format!("{} / {}", self.raised.0.show(), self.raised.1.show()),
            none(),
            none(),
            none(),
        ]);
        t.row([
            "critical alerts cleared: delivered upstream / seen locally".into(),
            format!("{} / {}", self.cleared.0.show(), self.cleared.1.show()),
            none(),
            none(),
            none(),
        ]);
        t.row([
            "critical alert transitions delivered".into(),
            self.delivered.show(),
            none(),
            "100 %".into(),
            self.delivered.verdict(|v| v >= 1.0),
        ]);
        t.row([
            "CPU, cores".into(),
            self.gw_cores.show(),
            self.br_cores.show(),
            none(),
            none(),
        ]);
        t.row([
            "CPU, cores per 1,000 readings/s".into(),
            self.gw_cores_per_k.show(),
            none(),
            none(),
            none(),
        ]);
        t.row([
            "RSS at the end of the window".into(),
            self.gw_rss.show(),
            self.br_rss.show(),
            none(),
            none(),
        ]);
        t.row([
            "RSS, largest seen (sampled every second)".into(),
            self.gw_peak.show(),
            none(),
            none(),
            none(),
        ]);
        t.row([
            "readings judged, share of the readings devices sent and had acknowledged".into(),
            self.judged.show(),
            none(),
            none(),
            none(),
        ]);
        t.row([
            "messages counted as dropped on `/metrics`".into(),
            self.dropped.show(),
            none(),
            none(),
            none(),
        ]);
        out.push_str(&t.done());
        if let Some(s) = r.get("summary") {
            out.push_str(&format!(
                "\nWith summaries on, one summary per site and interval goes up: measured with \
                 `[uplink.summaries]` every {} for all three metrics, the largest was {} of JSON \
                 on `{}` ({} as a QoS 1 PUBLISH and its PUBACK). Four an hour are added to each \
                 run's alert traffic for the figure above; 15 minutes are too long to wait for in \
                 a benchmark.\n",
                s["interval"].as_str().unwrap_or("?"),
                bytes(s["payload_bytes"].as_f64().unwrap_or(0.0)),
                format_args!("{}/summaries", crate::setup::SITE),
                bytes(s["mqtt_bytes"].as_f64().unwrap_or(0.0)),
            ));
        }
        out.push('\n');
        out
    }
}

/// Upstream bytes of `key` (`watchpost` or `bridge`) in a plant run, per hour.
fn per_hour(v: &Value, key: &str) -> Option<f64> {
    Some(v["upstream_bytes"][key].as_f64()? / v["window_s"].as_f64()? * 3600.0)
}

/// The upstream share with four summaries an hour, per run.
fn summary_ratio(r: &Value, runs: &[Value]) -> Figure {
    let Some(summary) = r["summary"]["mqtt_bytes"].as_f64() else {
        return Figure::of(None, percent);
    };
    Figure::over(runs, percent, |run| {
        let v = &run["plant"];
        let window = v["window_s"].as_f64()?;
        let watchpost = v["upstream_bytes"]["watchpost"].as_f64()? + summary * window / 900.0;
        ratio(Some(watchpost), v["upstream_bytes"]["bridge"].as_f64())
    })
}

/// p50, p99, p99.9 and the counts of one latency path over the runs.
struct Percentiles {
    p50: Figure,
    p99: Figure,
    p999: Figure,
    n: Figure,
    missing: Figure,
}

fn percentiles(runs: &[Value], path: impl Fn(&Value) -> Option<&Value>) -> Percentiles {
    let q = |key: &'static str, unit: fn(f64) -> String| {
        Figure::over(runs, unit, |r| path(r).and_then(|v| v[key].as_f64()))
    };
    Percentiles {
        p50: q("p50", ms),
        p99: q("p99", ms),
        p999: q("p999", ms),
        n: q("n", count),
        missing: q("missing", count),
    }
}

/// One row of the latency table: what travelled where, under which load, and the p99 target
/// (text, limit in ms) if the issue set one.
struct LatencyRow {
    path: &'static str,
    load: &'static str,
    /// At half saturation: the system whose load it was.
    system: Option<&'static str>,
    figures: Percentiles,
    target: Option<(&'static str, f64)>,
}

/// Latency figures.
struct Latency {
    plant_upstream: Percentiles,
    plant_local: Percentiles,
    plant_leak_upstream: Percentiles,
    plant_leak_local: Percentiles,
    rows: Vec<LatencyRow>,
    runs: Vec<Value>,
}

impl Latency {
    fn new(runs: &[Value]) -> Latency {
        let plant = |key: &'static str| {
            percentiles(runs, move |r| r.get("plant").map(|p| &p["latency"][key]))
        };
        let half = |system: &'static str, key: &'static str| {
            percentiles(runs, move |r| {
                find(&r["half"], system, None).map(|v| &v[key])
            })
        };
        let plant_upstream = plant("watchpost_upstream");
        let plant_local = plant("watchpost_local");
        let row = |path, load, figures, target| LatencyRow {
            path,
            load,
            system: None,
            figures,
            target,
        };
        let half_row = |path, system, figures, target| LatencyRow {
            path,
            load: "half saturation",
            system: Some(system),
            figures,
            target,
        };
        let rows = vec![
            row(
                "Watchpost: threshold alert, device → upstream subscriber",
                "plant",
                plant("watchpost_upstream"),
                Some(("≤ 5 ms", 5.0)),
            ),
            row(
                "Watchpost: leak alert (state rule), device → upstream subscriber",
                "plant",
                plant("watchpost_leak_upstream"),
                Some(("≤ 5 ms, as a threshold alert", 5.0)),
            ),
            row(
                "Watchpost: threshold alert, device → local `alerts/#` subscriber",
                "plant",
                plant("watchpost_local"),
                Some(("≤ 2 ms", 2.0)),
            ),
            row(
                "Watchpost: leak alert (state rule), device → local `alerts/#` subscriber",
                "plant",
                plant("watchpost_leak_local"),
                Some(("≤ 2 ms, as a threshold alert", 2.0)),
            ),
            row(
                "Mosquitto bridge: the reading, device → upstream subscriber",
                "plant",
                plant("bridge_upstream"),
                None,
            ),
            row(
                "Mosquitto at the site: the reading, device → local subscriber",
                "plant",
                plant("mosquitto_local"),
                None,
            ),
            half_row(
                "Watchpost: threshold alert, device → upstream subscriber",
                "watchpost",
                half("watchpost", "latency_upstream"),
                Some(("(p99 ≤ 5 ms on plant)", 5.0)),
            ),
            half_row(
                "Watchpost: leak alert (state rule), device → upstream subscriber",
                "watchpost",
                half("watchpost", "latency_leak_upstream"),
                Some(("(p99 ≤ 5 ms on plant)", 5.0)),
            ),
            half_row(
                "Watchpost: threshold alert, device → local `alerts/#` subscriber",
                "watchpost",
                half("watchpost", "latency_local"),
                Some(("(p99 ≤ 2 ms on plant)", 2.0)),
            ),
            half_row(
                "Watchpost: leak alert (state rule), device → local `alerts/#` subscriber",
                "watchpost",
                half("watchpost", "latency_leak_local"),
                Some(("(p99 ≤ 2 ms on plant)", 2.0)),
            ),
            half_row(
                "bare rumqttd: the reading, device → subscriber",
                "rumqttd",
                half("rumqttd", "latency_subscriber"),
                None,
            ),
            half_row(
                "bare Mosquitto: the reading, device → subscriber",
                "mosquitto",
                half("mosquitto", "latency_subscriber"),
                None,
            ),
        ];
        Latency {
            plant_upstream,
            plant_local,
            plant_leak_upstream: plant("watchpost_leak_upstream"),
            plant_leak_local: plant("watchpost_leak_local"),
            rows,
            runs: runs.to_vec(),
        }
    }

    fn section(&self, c: &Value) -> String {
        let mut out = String::from("### Latency\n\n");
        out.push_str(&format!(
            "Probe devices in the harness raise and clear the overheat rule {} times a second \
             (QoS 1, `95.0` then `20.0` on `sensors/probe-N/temperature`), for {:.0} s on the \
             running plant and for {:.0} s under a steady QoS 0 load (10 connections) of half \
             of what each system sustained in the saturation test of the same run. At \
             Watchpost, leak probes follow for as long again at the same rate, load still \
             running: `true` then `false` on `sensors/probe-N/water_leak` (plain payloads, as \
             native devices send states), raising and clearing a critical state rule \
             (`equals = true`). The harness notes the time right before writing the PUBLISH \
             and right after reading what arrives, with one monotonic clock; at Watchpost what \
             arrives is the alert document, at a plain broker or bridge the reading itself. \
             All client sockets set TCP_NODELAY.\n\n",
            c["probe_rate"],
            c["plant_probe_s"].as_f64().unwrap_or(0.0),
            c["half_probe_s"].as_f64().unwrap_or(0.0),
        ));
        let mut t = Table::new(&[
            "path",
            "load",
            "p50",
            "p99",
            "p99.9",
            "samples (missing)",
            "target (p99)",
            "verdict",
        ]);
        for row in &self.rows {
            let f = &row.figures;
            let (target, verdict) = match row.target {
                Some((text, limit)) if row.load == "plant" => {
                    (text.to_owned(), f.p99.verdict(|v| v <= limit))
                }
                Some((text, _)) => (text.to_owned(), String::new()),
                None => (String::new(), String::new()),
            };
            let load = match row.system {
                Some(system) => format!(
                    "{} ({} offered)",
                    row.load,
                    Figure::over(&self.runs, rate, |r| {
                        find(&r["half"], system, None)?["offered_rate"].as_f64()
                    })
                    .show()
                ),
                None => row.load.to_owned(),
            };
            t.row([
                row.path.to_owned(),
                load,
                f.p50.show(),
                f.p99.show(),
                f.p999.show(),
                format!("{} ({})", f.n.show(), f.missing.show()),
                target,
                verdict,
            ]);
        }
        out.push_str(&t.done());
        out.push('\n');
        out
    }
}

/// Saturation figures at one connection count.
struct AtConns {
    watchpost: Figure,
    rumqttd: Figure,
    mosquitto: Figure,
    vs_rumqttd: Figure,
    vs_mosquitto: Figure,
    /// Watchpost with a share of the readings states.
    mixed: Figure,
    /// That, per run, over Watchpost's figure with numbers only.
    mixed_vs_numbers: Figure,
    rows: Vec<SaturationRow>,
}

/// One system at one connection count.
struct SaturationRow {
    name: String,
    consumed: Figure,
    offered: Figure,
    cores: Figure,
    rss: Figure,
    /// Share of what the load sent that was never consumed, once the load stopped.
    unconsumed: Figure,
    /// Whether consumption was still going on in some run when the harness stopped waiting.
    unsettled: bool,
}

/// Saturation figures.
struct Saturation {
    conns: Vec<u64>,
    /// The share of states in the mixed load, as text (`20 %`).
    share: String,
    by_conns: Vec<AtConns>,
    qos1: Vec<(String, Figure)>,
    /// Every reading retained, by connection count and system.
    retained: Vec<RetainedRow>,
}

/// One system at one connection count with every reading retained, beside the same load not
/// retained in the same runs.
struct RetainedRow {
    name: &'static str,
    conns: u64,
    plain: Figure,
    retained: Figure,
    /// Per run, retained over not retained.
    ratio: Figure,
    cores: Figure,
    rss: Figure,
    unconsumed: Figure,
    unsettled: bool,
}

impl RetainedRow {
    /// Whether the retained figure is within what the runs without the flag spread over: the
    /// target of issue 18 says "no more than noise", and the runs' own spread is the noise
    /// there is to go by.
    fn verdict(&self) -> String {
        match (self.plain.spread, self.retained.spread) {
            (Some(plain), Some(retained)) if plain.n >= 2 => {
                if retained.median >= plain.min {
                    "**met** (within the spread of the runs without the flag)".into()
                } else {
                    "**missed** (below every run without the flag)".into()
                }
            }
            (Some(_), Some(_)) => "not judged: one run, no spread to call noise".into(),
            _ => "not measured".into(),
        }
    }
}

impl Saturation {
    fn new(runs: &[Value], c: &Value) -> Saturation {
        let conns: Vec<u64> = c["conns"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        // Runs from before the mixed step have no share: the harness's own then.
        let share = c["mixed_state_share"]
            .as_f64()
            .unwrap_or(f64::from(crate::saturation::MIXED_STATES) / 100.0);
        let share = format!("{:.0} %", share * 100.0);
        let by_conns = conns
            .iter()
            .map(|&n| {
                // `phase` is `saturation`, or `mixed` for Watchpost with a share of states.
                let fig = |phase: &'static str,
                           system: &'static str,
                           key: &'static str,
                           unit: fn(f64) -> String| {
                    Figure::over(runs, unit, move |r| {
                        find(&r[phase], system, Some(n)).and_then(|v| v[key].as_f64())
                    })
                };
                let versus = |phase: &'static str, peer: &'static str| {
                    Figure::over(runs, times, move |r| {
                        let get = |p, s| find(&r[p], s, Some(n)).and_then(|v| v["rate"].as_f64());
                        ratio(get(phase, "watchpost"), get("saturation", peer))
                    })
                };
                let rows = [
                    (
                        "Watchpost (rules, rollups, durable outbox)".to_owned(),
                        "saturation",
                        "watchpost",
                    ),
                    (
                        format!("Watchpost, {share} of the readings states (a state rule)"),
                        "mixed",
                        "watchpost",
                    ),
                    (
                        "bare rumqttd, in-process counter".to_owned(),
                        "saturation",
                        "rumqttd",
                    ),
                    (
                        "bare Mosquitto, one subscriber".to_owned(),
                        "saturation",
                        "mosquitto",
                    ),
                ]
                .into_iter()
                .map(|(name, phase, system)| SaturationRow {
                    name,
                    consumed: fig(phase, system, "rate", rate),
                    offered: fig(phase, system, "offered", rate),
                    cores: fig(phase, system, "cores", cores),
                    rss: fig(phase, system, "rss_kib", mib),
                    unsettled: unsettled(runs, phase, system, Some(n)),
                    unconsumed: Figure::over(runs, percent, move |r| {
                        let v = find(&r[phase], system, Some(n))?;
                        ratio(v["sent_not_consumed"].as_f64(), v["flood"]["sent"].as_f64())
                    }),
                })
                .collect();
                AtConns {
                    watchpost: fig("saturation", "watchpost", "rate", rate),
                    rumqttd: fig("saturation", "rumqttd", "rate", rate),
                    mosquitto: fig("saturation", "mosquitto", "rate", rate),
                    vs_rumqttd: versus("saturation", "rumqttd"),
                    vs_mosquitto: versus("saturation", "mosquitto"),
                    mixed: fig("mixed", "watchpost", "rate", rate),
                    mixed_vs_numbers: versus("mixed", "watchpost"),
                    rows,
                }
            })
            .collect();
        let qos1 = ["watchpost", "rumqttd", "mosquitto"]
            .into_iter()
            .map(|system| {
                (
                    system.to_owned(),
                    Figure::over(runs, rate, move |r| {
                        let v = find(&r["overload"], system, None)?;
                        let consumed = v["consumed"].as_f64()?;
                        ratio(Some(consumed), v["flood"]["seconds"].as_f64())
                    }),
                )
            })
            .collect();
        // Runs from before the retained step name no connection counts: the harness's own.
        let retain_conns: Vec<u64> = c["retain_conns"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_else(|| vec![10]);
        let retained = retain_conns
            .iter()
            .flat_map(|&n| {
                [("Watchpost", "watchpost"), ("bare Mosquitto", "mosquitto")]
                    .into_iter()
                    .map(move |(name, system)| {
                        let fig = |phase: &'static str, key: &'static str, unit| {
                            Figure::over(runs, unit, move |r| {
                                find(&r[phase], system, Some(n))?[key].as_f64()
                            })
                        };
                        RetainedRow {
                            name,
                            conns: n,
                            plain: fig("saturation", "rate", rate),
                            retained: fig("retained_saturation", "rate", rate),
                            ratio: Figure::over(runs, times, move |r| {
                                let get = |p| {
                                    find(&r[p], system, Some(n)).and_then(|v| v["rate"].as_f64())
                                };
                                ratio(get("retained_saturation"), get("saturation"))
                            }),
                            cores: fig("retained_saturation", "cores", cores),
                            rss: fig("retained_saturation", "rss_kib", mib),
                            unconsumed: Figure::over(runs, percent, move |r| {
                                let v = find(&r["retained_saturation"], system, Some(n))?;
                                ratio(v["sent_not_consumed"].as_f64(), v["flood"]["sent"].as_f64())
                            }),
                            unsettled: unsettled(runs, "retained_saturation", system, Some(n)),
                        }
                    })
            })
            .collect();
        Saturation {
            conns,
            share,
            by_conns,
            qos1,
            retained,
        }
    }

    fn section(&self, c: &Value) -> String {
        let mut out = String::from("### Saturation: sustained ingest\n\n");
        out.push_str(&format!(
            "Load processes of the harness write QoS 0 readings (`{{\"v\":..,\"seq\":..}}` on \
             `sensors/{{device}}/{{metric}}`, 1,000 devices spread over the connections, `seq` \
             rising by one per device) as fast as each system takes them, for {:.0} s of \
             warm-up and a {:.0} s window. What counts is what was consumed in the window: \
             readings decoded and judged by Watchpost (`watchpost_readings_total`: the \
             overheat rule, 60 s rollups, SQLite history and the outbox all on, with the \
             per-device publish rate limit off), messages given to bare rumqttd's in-process \
             counting link, messages delivered to bare Mosquitto's one subscriber. QoS 0 has \
             no acknowledgement; the last column says what the load wrote and was never \
             consumed, counted once the load stopped and consumption settled (or after {:.0} s, \
             if it had not). In the rows of Watchpost with {share} of the readings states, that \
             share of each device's readings are its door's state instead (`{{\"v\":\"open\",\"seq\":..}}` and `{{\"v\":\"closed\",\"seq\":..}}` \
             in turn on `sensors/{{device}}/door`, spread evenly over devices and time), judged \
             by a state rule (`not_in = [\"open\", \"closed\"]`, which these doors never \
             fire, as the load's temperatures never fire overheat); the rest is the same \
             load.\n\n",
            c["sat_warm_s"].as_f64().unwrap_or(0.0),
            c["sat_window_s"].as_f64().unwrap_or(0.0),
            c["drain_s"].as_f64().unwrap_or(0.0),
            share = self.share,
        ));
        let mut t = Table::new(&[
            "system",
            "connections",
            "consumed readings/s",
            "offered by the load",
            "CPU, cores",
            "RSS",
            "sent, never consumed",
        ]);
        for (conns, at) in self.conns.iter().zip(&self.by_conns) {
            for row in &at.rows {
                t.row([
                    row.name.clone(),
                    conns.to_string(),
                    row.consumed.show(),
                    row.offered.show(),
                    row.cores.show(),
                    row.rss.show(),
                    if row.unsettled {
                        format!("{} (still consuming when counted)", row.unconsumed.show())
                    } else {
                        row.unconsumed.show()
                    },
                ]);
            }
        }
        out.push_str(&t.done());
        out.push('\n');
        let mut t = Table::new(&[
            "connections",
            "Watchpost",
            "÷ bare rumqttd",
            "target",
            "verdict",
            "÷ bare Mosquitto",
            "target",
            "verdict",
        ]);
        for (conns, at) in self.conns.iter().zip(&self.by_conns) {
            t.row([
                conns.to_string(),
                format!(
                    "{} ({})",
                    at.watchpost.show(),
                    at.watchpost.verdict(|v| v >= 150_000.0)
                ),
                at.vs_rumqttd.show(),
                "≥ 0.80×".into(),
                at.vs_rumqttd.verdict(|v| v >= 0.8),
                at.vs_mosquitto.show(),
                "> 1×".into(),
                at.vs_mosquitto.verdict(|v| v > 1.0),
            ]);
        }
        out.push_str(&t.done());
        out.push('\n');
        let mixed = format!("{} states", self.share);
        let mut t = Table::new(&["connections", "numbers only", &mixed, "÷ numbers only"]);
        for (conns, at) in self.conns.iter().zip(&self.by_conns) {
            t.row([
                conns.to_string(),
                at.watchpost.show(),
                at.mixed.show(),
                at.mixed_vs_numbers.show(),
            ]);
        }
        out.push_str(&t.done());
        out.push_str(&format!(
            "\nTarget for Watchpost: ≥ 150,000 readings/s (numbers only; none for the mixed load, \
             which is reported). Medians of the peers: rumqttd {} \
             and {}, Mosquitto {} and {} (for {} connections).\n\n",
            self.by_conns
                .first()
                .map_or("–".into(), |a| a.rumqttd.show()),
            self.by_conns
                .get(1)
                .map_or("–".into(), |a| a.rumqttd.show()),
            self.by_conns
                .first()
                .map_or("–".into(), |a| a.mosquitto.show()),
            self.by_conns
                .get(1)
                .map_or("–".into(), |a| a.mosquitto.show()),
            self.conns
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" and "),
        ));
        out.push_str(&format!(
            "With QoS 1 ({} connections, 64 PUBLISHes in flight each, as fast as PUBACKs come; \
             the overload below), consumed readings/s: {}.\n\n",
            c["overload_conns"],
            self.qos1
                .iter()
                .map(|(s, f)| format!("{s} {}", f.show()))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        out.push_str(&self.retained_part());
        out
    }

    /// The load again with every reading retained, beside the same load without.
    fn retained_part(&self) -> String {
        let mut out = String::from(
            "Every reading retained (issue 18): the same QoS 0 load into Watchpost and bare \
             Mosquitto once more, with the retain flag set on every reading, as a sensor does \
             whose last reading a dashboard connecting later should see. Each broker then \
             replaces the retained message of the load's 3,000 topics (1,000 devices × 3 \
             metrics) all the time; both have room for them by default. Target: the retain \
             flag costs the saturation figure no more than noise, read here as the spread of \
             the runs without it.\n\n",
        );
        let mut t = Table::new(&[
            "system",
            "connections",
            "not retained",
            "every reading retained",
            "÷ not retained",
            "CPU, cores (retained)",
            "RSS (retained)",
            "sent, never consumed (retained)",
            "verdict",
        ]);
        for row in &self.retained {
            t.row([
                row.name.to_owned(),
                row.conns.to_string(),
                row.plain.show(),
                row.retained.show(),
                row.ratio.show(),
                row.cores.show(),
                row.rss.show(),
                if row.unsettled {
                    format!("{} (still consuming when counted)", row.unconsumed.show())
                } else {
                    row.unconsumed.show()
                },
                row.verdict(),
            ]);
        }
        out.push_str(&t.done());
        out.push_str(
            "\nThe two columns come from the same runs, one after the other (`--only \
             saturation,retained-saturation` runs both; alone, the retained step has nothing \
             to be divided by).\n\n",
        );
        out
    }
}

/// QoS 1 overload figures.
struct Overload {
    silently_lost: Figure,
    rows: Vec<(String, Figure, Figure, Figure, Figure)>,
    /// Systems whose consumer was still going in some run when the harness stopped waiting.
    unsettled: Vec<String>,
    /// Lines of Watchpost's log that speak of dropped or lost readings.
    log_lines: Figure,
}

impl Overload {
    fn new(runs: &[Value]) -> Overload {
        let get = |system: &'static str, g: fn(&Value) -> Option<f64>| {
            Figure::over(runs, count, move |r| {
                find(&r["overload"], system, None).and_then(g)
            })
        };
        let rows = vec![
            (
                "Watchpost".to_owned(),
                get("watchpost", |v| v["acked"].as_f64()),
                get("watchpost", |v| v["watchpost"]["messages"].as_f64()),
                get("watchpost", |v| {
                    Some(
                        v["watchpost"]["dropped_counted"].as_f64()?
                            + v["watchpost"]["refused_counted"].as_f64()?,
                    )
                }),
                get("watchpost", |v| v["watchpost"]["silently_lost"].as_f64()),
            ),
            (
                "bare rumqttd".to_owned(),
                get("rumqttd", |v| v["acked"].as_f64()),
                get("rumqttd", |v| v["consumed"].as_f64()),
                Figure::of(None, count),
                get("rumqttd", |v| {
                    Some(v["acked"].as_f64()? - v["consumed"].as_f64()?)
                }),
            ),
            (
                "bare Mosquitto".to_owned(),
                get("mosquitto", |v| v["acked"].as_f64()),
                get("mosquitto", |v| v["consumed"].as_f64()),
                Figure::of(None, count),
                get("mosquitto", |v| {
                    Some(v["acked"].as_f64()? - v["consumed"].as_f64()?)
                }),
            ),
        ];
        let unsettled = ["watchpost", "rumqttd", "mosquitto"]
            .into_iter()
            .filter(|system| unsettled(runs, "overload", system, None))
            .map(str::to_owned)
            .collect();
        Overload {
            silently_lost: get("watchpost", |v| v["watchpost"]["silently_lost"].as_f64()),
            rows,
            unsettled,
            log_lines: get("watchpost", |v| {
                v["watchpost"]["log_lines_about_loss"].as_f64()
            }),
        }
    }

    fn section(&self, c: &Value) -> String {
        let mut out = String::from("### QoS 1 overload: is anything lost silently?\n\n");
        out.push_str(&format!(
            "{} connections publish QoS 1 readings for {:.0} s, each with 64 in flight, as fast \
             as PUBACKs come back. Afterwards, once the consumer stops counting, what was \
             acknowledged to the publishers is compared with what was consumed (Watchpost: \
             `watchpost_messages_total`; the peers: their counters) and, for Watchpost, with \
             every counter on `/metrics` whose name says `dropped` or `lost` (outside the \
             devices' own `seq` accounting) plus readings refused by rate limit or access \
             rules.\n\n",
            c["overload_conns"],
            c["overload_s"].as_f64().unwrap_or(0.0)
        ));
        let mut t = Table::new(&[
            "system",
            "acknowledged",
            "consumed",
            "counted as dropped",
            "acknowledged, not consumed, not counted",
        ]);
        for (name, acked, consumed, dropped, lost) in &self.rows {
            t.row([
                name.clone(),
                acked.show(),
                consumed.show(),
                dropped.show(),
                lost.show(),
            ]);
        }
        out.push_str(&t.done());
        out.push_str(&format!(
            "\nWatchpost's log lines that mention dropped or lost readings in this test: {}.\n",
            self.log_lines.show()
        ));
        if !self.unsettled.is_empty() {
            out.push_str(&format!(
                "\nStill consuming when counted (the last column may shrink with a longer wait): \
                 {}.\n",
                self.unsettled.join(", ")
            ));
        }
        out.push('\n');
        out
    }
}

/// Fleet figures.
struct Fleet {
    devices: u64,
    watchpost_rss: Figure,
    rows: Vec<[Figure; 7]>,
}

impl Fleet {
    fn new(runs: &[Value]) -> Fleet {
        let systems = ["watchpost", "rumqttd", "mosquitto"];
        let rows = systems
            .iter()
            .map(|&system| {
                let fig = |unit: fn(f64) -> String, g: fn(&Value) -> Option<f64>| {
                    Figure::over(runs, unit, move |r| {
                        find(&r["fleet"], system, None).and_then(g)
                    })
                };
                [
                    fig(count, |v| v["devices"].as_f64()),
                    fig(seconds, |v| v["connect_s"].as_f64()),
                    fig(plain, |v| v["readings_rate"].as_f64()),
                    fig(mib, |v| v["rss_kib"].as_f64()),
                    fig(kib, |v| {
                        ratio(
                            Some(v["rss_kib"].as_f64()? - v["idle_rss_kib"].as_f64()?),
                            v["devices"].as_f64(),
                        )
                    }),
                    fig(cores, |v| v["cores"].as_f64()),
                    fig(cores, |v| {
                        ratio(
                            v["cores"].as_f64(),
                            v["readings_rate"].as_f64().map(|r| r / 1000.0),
                        )
                    }),
                ]
            })
            .collect::<Vec<_>>();
        let devices = runs
            .iter()
            .filter_map(|r| find(&r["fleet"], "watchpost", None)?["devices"].as_u64())
            .min()
            .unwrap_or(0);
        Fleet {
            devices,
            watchpost_rss: Figure::over(runs, mib, |r| {
                find(&r["fleet"], "watchpost", None)?["rss_kib"].as_f64()
            }),
            rows,
        }
    }

    fn section(&self, c: &Value) -> String {
        let mut out = String::from("### Fleet: many connected devices\n\n");
        out.push_str(&format!(
            "{} simulated devices connect (keep-alive 60 s) and send one temperature reading a \
             minute each (QoS 1), first samples spread over the minute. Memory is read from \
             `/proc/PID/status` (VmRSS) at the end of a {:.0} s window (Watchpost; {:.0} s for \
             the peers) that starts once every device is connected and has settled; CPU from \
             `/proc/PID/stat` (utime + stime) over the window. Target for Watchpost: RSS ≤ 48 MB \
             (45.8 MiB).\n\n",
            c["fleet_devices"],
            c["fleet_window_s"].as_f64().unwrap_or(0.0),
            c["fleet_peers_window_s"].as_f64().unwrap_or(0.0),
        ));
        let mut t = Table::new(&[
            "system",
            "devices",
            "all connected after",
            "readings/s",
            "RSS",
            "RSS per connection (above idle)",
            "CPU, cores",
            "CPU, cores per 1,000 readings/s",
        ]);
        for (name, row) in ["Watchpost", "bare rumqttd", "bare Mosquitto"]
            .iter()
            .zip(&self.rows)
        {
            let mut cells = vec![name.to_string()];
            cells.extend(row.iter().map(Figure::show));
            t.row(cells);
        }
        out.push_str(&t.done());
        out.push('\n');
        out
    }
}

/// Offline persistent sessions figures.
struct Sessions {
    /// Rows: label, the figure for Watchpost and for Mosquitto, and whether it is a count out
    /// of every session or every queued message.
    rows: Vec<(&'static str, [Figure; 2], Of)>,
}

/// What a row's figure is a part of.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Of {
    Nothing,
    Sessions,
    Messages,
}

impl Sessions {
    fn new(runs: &[Value]) -> Sessions {
        let row = |label, unit: fn(f64) -> String, of, g: fn(&Value) -> Option<f64>| {
            let fig = |system: &'static str| {
                Figure::over(runs, unit, move |r| {
                    find(&r["sessions"], system, None).and_then(g)
                })
            };
            (label, [fig("watchpost"), fig("mosquitto")], of)
        };
        // RSS above idle once the sessions are away with their queues full, in bytes.
        fn above(v: &Value) -> Option<f64> {
            Some((v["rss_kib"].as_f64()? - v["idle_rss_kib"].as_f64()?) * 1024.0)
        }
        let rows = vec![
            row("RSS idle, fresh start", mib, Of::Nothing, |v| {
                v["idle_rss_kib"].as_f64()
            }),
            row(
                "RSS with the sessions away, their queues empty",
                mib,
                Of::Nothing,
                |v| v["sessions_rss_kib"].as_f64(),
            ),
            row(
                "RSS with the sessions away and their queues full",
                mib,
                Of::Nothing,
                |v| v["rss_kib"].as_f64(),
            ),
            row("… above idle", bytes, Of::Nothing, above),
            row("… per session", bytes, Of::Nothing, |v| {
                ratio(above(v), v["sessions"].as_f64())
            }),
            row("… per queued message", bytes, Of::Nothing, |v| {
                ratio(
                    above(v),
                    Some(v["sessions"].as_f64()? * v["messages"].as_f64()?),
                )
            }),
            row(
                "… per queued message, above the empty sessions",
                bytes,
                Of::Nothing,
                |v| {
                    ratio(
                        Some((v["rss_kib"].as_f64()? - v["sessions_rss_kib"].as_f64()?) * 1024.0),
                        Some(v["sessions"].as_f64()? * v["messages"].as_f64()?),
                    )
                },
            ),
            row(
                "queued, by `watchpost_broker_queued_messages`",
                count,
                Of::Messages,
                |v| v["queued_gauge"].as_f64(),
            ),
            row(
                "counted as dropped from a full queue",
                count,
                Of::Nothing,
                |v| v["queue_dropped"].as_f64(),
            ),
            row(
                "sessions made (connect, subscribe, DISCONNECT) in",
                seconds,
                Of::Nothing,
                |v| v["subscribe_s"].as_f64(),
            ),
            row("session present on return", count, Of::Sessions, |v| {
                v["present"].as_f64()
            }),
            row("delivered on return", count, Of::Messages, |v| {
                v["delivered"].as_f64()
            }),
            row("delivered twice", count, Of::Nothing, |v| {
                v["duplicates"].as_f64()
            }),
            row(
                "drain: first reconnect to last message received",
                seconds2,
                Of::Nothing,
                |v| v["drain_s"].as_f64(),
            ),
            row("RSS after the queues drained", mib, Of::Nothing, |v| {
                v["drained_rss_kib"].as_f64()
            }),
        ];
        Sessions { rows }
    }

    fn section(&self, c: &Value) -> String {
        let sessions = c["sessions"].as_f64().unwrap_or(0.0);
        let messages = c["session_messages"].as_f64().unwrap_or(0.0);
        let workers = c["session_workers"].as_f64().unwrap_or(0.0);
        let mut out = format!(
            "### Sessions: {} offline persistent sessions with queued messages\n\n",
            count(sessions)
        );
        out.push_str(&format!(
            "Each broker is started fresh (Watchpost with the configuration of the other steps, \
             bare Mosquitto with its defaults: sessions kept for ever, up to 1,000 queued \
             messages per session) and its VmRSS read. {} MQTT 3.1.1 clients (`s0000`, …) \
             connect with clean session off, {} at a time; each subscribes at QoS 1 to \
             `bench/s/<id>` and `bench/all` and leaves with DISCONNECT; VmRSS is read again. One publisher sends {} \
             QoS 1 messages of {} B to `bench/all`, each after the last one's PUBACK: {} queued \
             in all. Watchpost's VmRSS is read again once `watchpost_broker_queued_messages` \
             (refreshed every 5 s) counts them all; Mosquitto has no such gauge and is read a \
             fixed {:.0} s after the last PUBACK (it queues a message for every session before \
             it acknowledges it). Per session and per queued message divide the same \
             difference, VmRSS with the queues full minus idle; the last of those rows counts \
             only what the queues added to the empty sessions. Then every client comes back \
             with clean session off, {} at a time, acknowledges each message and counts the \
             distinct ones; the drain runs from the first reconnect to the last message any \
             client received. VmRSS is read a last time after the drain: memory the allocator \
             got back is not necessarily returned to the system.\n\n",
            count(sessions),
            count(workers),
            count(messages),
            count(c["session_payload_bytes"].as_f64().unwrap_or(0.0)),
            count(sessions * messages),
            c["session_mosquitto_settle_s"].as_f64().unwrap_or(0.0),
            count(workers),
        ));
        let mut t = Table::new(&["", "Watchpost", "bare Mosquitto"]);
        for (label, figures, of) in &self.rows {
            let total = match of {
                Of::Nothing => None,
                Of::Sessions => Some(sessions),
                Of::Messages => Some(sessions * messages),
            };
            let mut cells = vec![label.to_string()];
            cells.extend(figures.iter().map(|f| match (total, f.spread) {
                (Some(total), Some(_)) => format!("{} of {}", f.show(), count(total)),
                _ => f.show(),
            }));
            t.row(cells);
        }
        out.push_str(&t.done());
        out.push('\n');
        out
    }
}

/// Device churn figures.
struct Churn {
    /// Rows: label, the figure for Watchpost and for Mosquitto.
    rows: Vec<(&'static str, [Figure; 2])>,
    /// Watchpost's RSS after the expiry over its RSS before the churn.
    after_over_before: Figure,
}

impl Churn {
    fn new(runs: &[Value]) -> Churn {
        let row = |label, unit: fn(f64) -> String, g: fn(&Value) -> Option<f64>| {
            let fig = |system: &'static str| {
                Figure::over(runs, unit, move |r| {
                    find(&r["churn"], system, None).and_then(g)
                })
            };
            (label, [fig("watchpost"), fig("mosquitto")])
        };
        fn growth(v: &Value) -> Option<f64> {
            ratio(v["after_rss_kib"].as_f64(), v["before_rss_kib"].as_f64())
        }
        let rows = vec![
            row("RSS at a fresh start", mib, |v| v["fresh_rss_kib"].as_f64()),
            row("RSS before the churn (after the warm-up)", mib, |v| {
                v["before_rss_kib"].as_f64()
            }),
            row("RSS at the peak (VmHWM)", mib, |v| {
                v["peak_rss_kib"].as_f64()
            }),
            row("RSS as the last device left", mib, |v| {
                v["end_rss_kib"].as_f64()
            }),
            row("RSS after the idle expiry", mib, |v| {
                v["after_rss_kib"].as_f64()
            }),
            row("… of the RSS before", percent, growth),
            row("… above the RSS before, per device", bytes, |v| {
                ratio(
                    Some((v["after_rss_kib"].as_f64()? - v["before_rss_kib"].as_f64()?) * 1024.0),
                    v["devices"].as_f64(),
                )
            }),
            row("peak above the RSS before, per device", bytes, |v| {
                ratio(
                    Some((v["peak_rss_kib"].as_f64()? - v["before_rss_kib"].as_f64()?) * 1024.0),
                    v["devices"].as_f64(),
                )
            }),
            row("devices through", rate, |v| {
                ratio(v["devices"].as_f64(), v["churn_s"].as_f64())
            }),
            row("last device gone to every device forgotten", seconds, |v| {
                v["forget_wait_s"].as_f64()
            }),
        ];
        let after_over_before = Figure::over(runs, percent, |r| {
            find(&r["churn"], "watchpost", None).and_then(growth)
        });
        Churn {
            rows,
            after_over_before,
        }
    }

    fn section(&self, c: &Value) -> String {
        let devices = c["churn_devices"].as_f64().unwrap_or(0.0);
        let mut out = format!(
            "### Churn: {} distinct devices that come and go (issue 21)

",
            count(devices)
        );
        out.push_str(&format!(
            "Each broker is started fresh (Watchpost with `gateway.forget_after = \"{}\"` and \
             `stale_after` the same, one rule, no uplink; bare Mosquitto with its defaults) \
             and its VmRSS read. A warm-up of {} devices comes and goes first, and Watchpost \
             forgets them: the RSS before is read after it, in a gateway whose database page \
             cache is in use, as at a site that has run for a while. Then {} devices, each \
             with a client id of its own, connect (MQTT 3.1.1, clean session), publish one \
             reading `{{\"v\":21.5,\"seq\":0}}` on `sensors/<id>/temperature` at QoS 0 and \
             leave with DISCONNECT, {} at a time. The peak is VmHWM at the end of the churn. \
             Watchpost's RSS after the expiry is read {:.0} s after \
             `watchpost_devices_forgotten_total` counts every device; Mosquitto's {:.0} s after \
             the last device left (it drops a clean session's client at once). Target: \
             Watchpost's RSS after the expiry within 10 % of the RSS before.\n\n",
            c["churn_forget_after"].as_str().unwrap_or("?"),
            count(c["churn_warm_up"].as_f64().unwrap_or(0.0)),
            count(devices),
            count(c["churn_workers"].as_f64().unwrap_or(0.0)),
            c["churn_settle_s"].as_f64().unwrap_or(0.0),
            c["churn_settle_s"].as_f64().unwrap_or(0.0),
        ));
        let mut t = Table::new(&["", "Watchpost", "bare Mosquitto"]);
        for (label, figures) in &self.rows {
            let mut cells = vec![label.to_string()];
            cells.extend(figures.iter().map(Figure::show));
            t.row(cells);
        }
        out.push_str(&t.done());
        out.push('\n');
        out
    }
}

/// Site pair figures (issue 22).
struct Pair {
    /// Saturation rows, one per connection count: alone, A of a pair, and the rest.
    saturation: Vec<PairSaturation>,
    /// Takeover rows: label, one figure per way of stopping A.
    takeover: Vec<(&'static str, Vec<Figure>)>,
    /// The ways A was stopped, in column order.
    stops: Vec<String>,
    /// Memory under the plant: label, figures for the gateway alone, A and B.
    memory: Vec<(String, [Figure; 3])>,
}

/// One connection count of the saturation load into a gateway alone and into A of a pair.
struct PairSaturation {
    conns: u64,
    alone: Figure,
    pair: Figure,
    ratio: Figure,
    cores: [Figure; 3],
    us_per_reading: [Figure; 2],
    /// CPU of everything else on the machine in the window: alone, pair.
    others: [Figure; 2],
    peer_rate: Figure,
    lag: Figure,
    rss: [Figure; 3],
    dropped: Figure,
    gaps: Figure,
}

impl Pair {
    fn new(runs: &[Value], c: &Value) -> Pair {
        let sat = |r: &Value, system: &str, conns: u64| -> Option<Value> {
            find(&r["pair"]["saturation"], system, Some(conns)).cloned()
        };
        let us = |v: &Value| ratio(v["cores"].as_f64().map(|c| c * 1e6), v["rate"].as_f64());
        // The machine's busy cores less the gateways' and the load's: other processes.
        fn others(v: &Value) -> Option<f64> {
            let peer = v["peer"]["cores"].as_f64().unwrap_or(0.0);
            Some(
                v["machine_cores"].as_f64()?
                    - v["cores"].as_f64()?
                    - peer
                    - v["load_cores"].as_f64()?,
            )
        }
        let conns: Vec<u64> = c["pair"]["conns"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        let saturation = conns
            .iter()
            .map(|&n| {
                let alone = |f: fn(&Value) -> Option<f64>, unit| {
                    Figure::over(runs, unit, move |r| {
                        sat(r, "watchpost", n).as_ref().and_then(f)
                    })
                };
                let pair = |f: fn(&Value) -> Option<f64>, unit| {
                    Figure::over(runs, unit, move |r| {
                        sat(r, "watchpost-pair", n).as_ref().and_then(f)
                    })
                };
                PairSaturation {
                    conns: n,
                    alone: alone(|v| v["rate"].as_f64(), rate),
                    pair: pair(|v| v["rate"].as_f64(), rate),
                    ratio: Figure::over(runs, times, |r| {
                        ratio(
                            sat(r, "watchpost-pair", n)?["rate"].as_f64(),
                            sat(r, "watchpost", n)?["rate"].as_f64(),
                        )
                    }),
                    cores: [
                        alone(|v| v["cores"].as_f64(), cores),
                        pair(|v| v["cores"].as_f64(), cores),
                        pair(|v| v["pair_cores"].as_f64(), cores),
                    ],
                    us_per_reading: [alone(us, plain), pair(us, plain)],
                    others: [alone(others, cores), pair(others, cores)],
                    peer_rate: pair(|v| v["peer"]["rate"].as_f64(), rate),
                    lag: pair(
                        |v| {
                            v["peer"]["lag_at_window_end_s"]
                                .as_f64()
                                .map(|s| s * 1000.0)
                        },
                        ms,
                    ),
                    rss: [
                        alone(|v| v["rss_kib"].as_f64(), mib),
                        pair(|v| v["rss_kib"].as_f64(), mib),
                        pair(|v| v["peer"]["rss_kib"].as_f64(), mib),
                    ],
                    dropped: pair(|v| v["peer"]["mirror_dropped"].as_f64(), count),
                    gaps: pair(|v| v["peer"]["entries_gap"].as_f64(), count),
                }
            })
            .collect();
        let stops: Vec<String> = c["pair"]["stops"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let row = |label, unit: fn(f64) -> String, g: fn(&Value) -> Option<f64>| {
            let figures = stops
                .iter()
                .map(|stop| {
                    Figure::over(runs, unit, |r| {
                        r["pair"]["takeover"]
                            .as_array()?
                            .iter()
                            .find(|t| t["stop"] == stop.as_str())
                            .and_then(g)
                    })
                })
                .collect();
            (label, figures)
        };
        let takeover = vec![
            row(
                "every device connected to B (its `online` there): the last device",
                since_stop,
                |t| t["online"]["last"].as_f64(),
            ),
            row("… the median device", since_stop, |t| {
                t["online"]["median"].as_f64()
            }),
            row(
                "every device's readings judged by B again (its first reading through B): the last device",
                since_stop,
                |t| t["flowing"]["last"].as_f64(),
            ),
            row(
                "B's mirror to A seen down (`watchpost_peer_mirror_up` 0)",
                since_stop,
                |t| t["b_mirror_down_s"].as_f64(),
            ),
            row(
                "B takes over A's devices' deadlines (`watchpost_peer_active` 0)",
                since_stop,
                |t| t["b_took_over_s"].as_f64(),
            ),
            row(
                "reading-driven: `probe-mover` finds A gone",
                since_stop,
                |t| t["mover"]["gone_s"].as_f64(),
            ),
            row(
                "… its critical reading acknowledged by B",
                since_stop,
                |t| t["mover"]["critical_acked_s"].as_f64(),
            ),
            row(
                "… **its alert from B at the upstream subscriber**",
                since_stop,
                |t| t["mover"]["alert_s"].as_f64(),
            ),
            row(
                "… PUBACKs from B to it slower than 0.5 s, until (– if none)",
                since_stop,
                |t| t["mover"]["slow_acks_until_s"].as_f64(),
            ),
            row(
                "deadline-driven: **`probe-held`'s alert from B at the upstream subscriber**",
                since_stop,
                |t| t["held_alert_s"].as_f64(),
            ),
            row("fleet: readings queued by the devices", count, |t| {
                t["sim"]["queued"].as_f64()
            }),
            row("… acknowledged (by A or B)", count, |t| {
                t["sim"]["acked"].as_f64()
            }),
            row("… dropped or never sent", count, |t| {
                Some(t["sim"]["dropped"].as_f64()? + t["sim"]["unsent"].as_f64()?)
            }),
        ];
        let seconds = c["pair"]["memory_s"].as_f64().unwrap_or(0.0);
        let mem =
            |label: String, unit: fn(f64) -> String, g: &dyn Fn(&Value, &str) -> Option<f64>| {
                let fig = |who: &str| {
                    Figure::over(runs, unit, |r| {
                        let m = &r["pair"]["memory"];
                        if m.is_null() { None } else { g(m, who) }
                    })
                };
                (label, [fig("alone"), fig("a"), fig("b")])
            };
        // RSS at the sample nearest `at` seconds.
        fn rss_at(m: &Value, who: &str, at: f64) -> Option<f64> {
            let column = match who {
                "alone" => 0,
                "a" => 1,
                _ => 2,
            };
            m["series"].as_array()?.iter().min_by(|x, y| {
                let d = |v: &Value| (v["s"].as_f64().unwrap_or(f64::MAX) - at).abs();
                d(x).total_cmp(&d(y))
            })?["rss_kib"][column]
                .as_f64()
        }
        let memory = vec![
            mem("RSS at start".into(), mib, &|m, who| {
                m["rss_start_kib"][who].as_f64()
            }),
            mem("RSS after 60 s".into(), mib, &|m, who| rss_at(m, who, 60.0)),
            mem("RSS after 120 s".into(), mib, &|m, who| {
                rss_at(m, who, 120.0)
            }),
            mem(format!("RSS after {seconds:.0} s"), mib, &|m, who| {
                m["rss_end_kib"][who].as_f64()
            }),
            mem("readings judged".into(), count, &|m, who| {
                m["readings"][who].as_f64()
            }),
        ];
        Pair {
            saturation,
            takeover,
            stops,
            memory,
        }
    }

    fn section(&self, c: &Value) -> String {
        let p = &c["pair"];
        if p.is_null() {
            return String::new();
        }
        let mut out = String::from("### Two gateways at one site (issue 22)\n\n");
        out.push_str(
            "The saturation step (the same load, windows and counting as above) into a gateway \
             alone and into gateway A of a site pair, one after the other in each run. B, A's \
             peer, runs on the same machine: A mirrors every reading to it (QoS 1 frames on \
             loopback) and B judges them all, so the pair's two processes and the load share \
             the same cores, which two boxes at a site would not. The figure is what A judged \
             in the window; QoS 0 readings are not acknowledged, so A never waits for B here. \
             CPU per reading is A's CPU time over what it judged. The last two columns are \
             the machine's busy CPU (`/proc/stat`) in the window less the gateways' and the \
             load's: whatever else ran on the machine at the time.\n\n",
        );
        let mut t = Table::new(&[
            "connections",
            "Watchpost alone",
            "A of a pair",
            "÷ alone",
            "CPU, cores: alone",
            "A",
            "A + B",
            "CPU µs per reading: alone",
            "A",
            "other processes' CPU, cores: alone",
            "pair",
        ]);
        for s in &self.saturation {
            t.row([
                s.conns.to_string(),
                s.alone.show(),
                s.pair.show(),
                s.ratio.show(),
                s.cores[0].show(),
                s.cores[1].show(),
                s.cores[2].show(),
                s.us_per_reading[0].show(),
                s.us_per_reading[1].show(),
                s.others[0].show(),
                s.others[1].show(),
            ]);
        }
        out.push_str(&t.done());
        out.push('\n');
        let mut t = Table::new(&[
            "connections",
            "B judged (mirrored), readings/s",
            "B's lag behind A at the window's end",
            "RSS: alone",
            "A",
            "B",
            "entries A counted as dropped (`watchpost_peer_mirror_dropped_total`)",
            "entries B never received (`watchpost_peer_entries_gap_total`)",
        ]);
        for s in &self.saturation {
            t.row([
                s.conns.to_string(),
                s.peer_rate.show(),
                s.lag.show(),
                s.rss[0].show(),
                s.rss[1].show(),
                s.rss[2].show(),
                s.dropped.show(),
                s.gaps.show(),
            ]);
        }
        out.push_str(&t.done());
        out.push('\n');
        if let Some(seconds) = p["memory_s"].as_f64() {
            out.push_str(&format!(
                "Memory: the plant's {} devices (as in the plant step: one message a second \
                 each with three readings, QoS 1) run for {seconds:.0} s against a gateway \
                 alone and, at the same time, against A of a pair (B its peer, no devices of \
                 its own). Each gateway of a pair keeps what it judged over its catch-up \
                 horizon (here two minutes, the shortest: the plant's one rule looks back no \
                 further) to send it to the other after a restart; the horizon fills in the \
                 first two minutes.\n\n",
                count(c["plant_devices"].as_f64().unwrap_or(0.0)),
            ));
            let mut t = Table::new(&["", "gateway alone", "A of a pair", "B of a pair"]);
            for (label, figures) in &self.memory {
                let mut cells = vec![label.clone()];
                cells.extend(figures.iter().map(Figure::show));
                t.row(cells);
            }
            out.push_str(&t.done());
            out.push('\n');
        }
        out.push_str(&format!(
            "Takeover: A and B, each with an uplink to the same upstream Mosquitto, and {} \
             simulated devices (`watchpost-sim`: the firmware's session and list of gateways, \
             A first, then B; one temperature reading a second each, every one sent at QoS 1, \
             one in flight; PUBACK timeout {:.0} s, keep-alive 30 s, reconnect backoff from \
             0.5 s with jitter) publishing to A. Two probe devices of the harness are on A: \
             `probe-held` has sent a coolant temperature above the `coolant-held` rule \
             (critical, `for = \"{}\"`) just before A is stopped, acknowledged (so both \
             gateways have it) and not yet raised; it sends nothing more, and B raises it from \
             its own clock once A has been silent for `peer.takeover_after` ({}). \
             `probe-mover` publishes a reading every 100 ms and, at the first one A does not \
             answer (its socket closed, or no PUBACK within {:.0} s), connects to B at once and \
             publishes a temperature that raises `overheat` (no `for`). A is stopped with \
             SIGKILL (the process dies and the kernel closes its sockets: every client knows at \
             once) or SIGSTOP (it stops answering with its sockets open, as a hung box or one \
             whose power failed; clients find out by their own timeouts). Every time is from \
             the signal; the alerts are the first about each probe at a subscriber of the \
             upstream's `{}/alerts/#`, which, A being gone, B alone forwarded. Medians of the \
             runs with the smallest and largest in brackets.\n\n",
            count(p["devices"].as_f64().unwrap_or(0.0)),
            p["ack_timeout_s"].as_f64().unwrap_or(0.0),
            p["hold"].as_str().unwrap_or("?"),
            p["takeover_after"].as_str().unwrap_or("10 s, the default"),
            p["ack_timeout_s"].as_f64().unwrap_or(0.0),
            crate::setup::SITE,
        ));
        let mut header = vec!["from the moment A is stopped"];
        let names: Vec<String> = self
            .stops
            .iter()
            .map(|s| match s.as_str() {
                "sigkill" => "A killed (SIGKILL)".to_owned(),
                "sigstop" => "A frozen (SIGSTOP)".to_owned(),
                other => other.to_owned(),
            })
            .collect();
        header.extend(names.iter().map(String::as_str));
        let mut t = Table::new(&header);
        for (label, figures) in &self.takeover {
            let mut cells = vec![label.to_string()];
            cells.extend(figures.iter().map(Figure::show));
            t.row(cells);
        }
        out.push_str(&t.done());
        out.push('\n');
        out
    }
}

/// Retained messages figures.
struct Retained {
    /// Rows: label, the figure for Watchpost and for Mosquitto, and whether it is a count out
    /// of every retained message.
    rows: Vec<(&'static str, [Figure; 2], Of)>,
}

impl Retained {
    fn new(runs: &[Value]) -> Retained {
        let row = |label, unit: fn(f64) -> String, of, g: fn(&Value) -> Option<f64>| {
            let fig = |system: &'static str| {
                Figure::over(runs, unit, move |r| {
                    find(&r["retained"], system, None).and_then(g)
                })
            };
            (label, [fig("watchpost"), fig("mosquitto")], of)
        };
        // RSS above idle with every retained message in, in bytes.
        fn above(v: &Value) -> Option<f64> {
            Some((v["rss_kib"].as_f64()? - v["idle_rss_kib"].as_f64()?) * 1024.0)
        }
        // Bytes on disk above the fresh start.
        fn disk(v: &Value) -> Option<f64> {
            Some(v["disk_bytes"].as_f64()? - v["disk_idle_bytes"].as_f64()?)
        }
        // The main file of the store: Watchpost's database without its WAL, `mosquitto.db`.
        fn main_file(v: &Value) -> Option<f64> {
            let files = &v["disk_files"];
            files["watchpost.db"]
                .as_f64()
                .or_else(|| files["mosquitto.db"].as_f64())
        }
        let rows = vec![
            row("RSS idle, fresh start", mib, Of::Nothing, |v| {
                v["idle_rss_kib"].as_f64()
            }),
            row("RSS with the retained messages", mib, Of::Nothing, |v| {
                v["rss_kib"].as_f64()
            }),
            row("… above idle", bytes, Of::Nothing, above),
            row("… per retained message", bytes, Of::Nothing, |v| {
                ratio(above(v), v["messages"].as_f64())
            }),
            row(
                "retained messages the broker counts, above its fresh start",
                count,
                Of::Nothing,
                |v| Some(v["retained_count"].as_f64()? - v["retained_idle"].as_f64()?),
            ),
            row(
                "published (QoS 1, every PUBACK back) in",
                ms,
                Of::Nothing,
                |v| v["publish_s"].as_f64().map(|s| s * 1000.0),
            ),
            row("on disk, fresh start", bytes, Of::Nothing, |v| {
                v["disk_idle_bytes"].as_f64()
            }),
            row(
                "on disk with the retained messages",
                bytes,
                Of::Nothing,
                |v| v["disk_bytes"].as_f64(),
            ),
            row(
                "… of which the main file (`watchpost.db`, `mosquitto.db`)",
                bytes,
                Of::Nothing,
                main_file,
            ),
            row("… above fresh start", bytes, Of::Nothing, disk),
            row("… per retained message", bytes, Of::Nothing, |v| {
                ratio(disk(v), v["messages"].as_f64())
            }),
            row(
                "on disk after a clean stop (SIGTERM)",
                bytes,
                Of::Nothing,
                |v| v["disk_stopped_bytes"].as_f64(),
            ),
            row(
                "new subscriber to `#`: SUBSCRIBE → SUBACK",
                ms,
                Of::Nothing,
                |v| v["suback_ms"].as_f64(),
            ),
            row(
                "… SUBSCRIBE → first retained message",
                ms,
                Of::Nothing,
                |v| v["first_ms"].as_f64(),
            ),
            row(
                "… SUBSCRIBE → all of them (the last one read)",
                ms,
                Of::Nothing,
                |v| v["deliver_s"].as_f64().map(|s| s * 1000.0),
            ),
            row("… delivered", count, Of::Messages, |v| {
                v["delivered"].as_f64()
            }),
            row(
                "… delivered without the retain flag",
                count,
                Of::Nothing,
                |v| v["not_flagged"].as_f64(),
            ),
            row("… delivered twice", count, Of::Nothing, |v| {
                v["duplicates"].as_f64()
            }),
            row("RSS after the delivery", mib, Of::Nothing, |v| {
                v["delivered_rss_kib"].as_f64()
            }),
            row(
                "retained publishes refused (`watchpost_broker_retained_refused_total`)",
                count,
                Of::Nothing,
                |v| v["retained_refused"].as_f64(),
            ),
            row(
                "dropped from a full queue (`watchpost_broker_queue_dropped_total`)",
                count,
                Of::Nothing,
                |v| v["queue_dropped"].as_f64(),
            ),
        ];
        Retained { rows }
    }

    fn section(&self, c: &Value) -> String {
        let messages = c["retained_messages"].as_f64().unwrap_or(0.0);
        let bound = count(c["retained_bound"].as_f64().unwrap_or(0.0));
        let mut out = format!("### Retained: {} retained messages\n\n", count(messages));
        out.push_str(&format!(
            "Each broker is started fresh and saves what it retains: Watchpost with the \
             configuration of the other steps and a fresh data directory, bare Mosquitto with \
             `persistence true`, `autosave_interval {}` (it saves `mosquitto.db` every second \
             or two) and `sys_interval 1`. Watchpost is allowed {bound} retained messages \
             (`[broker] max_retained_messages`, default 10,000, its own alerts included); \
             Mosquitto is allowed {bound} queued messages per session (`max_queued_messages`): \
             with its default of 1,000, a new subscriber to `#` is given only the first \
             thousand or so of the retained messages at QoS 1. Watchpost gives a subscription \
             every retained message whatever the session's queue bound. VmRSS is read, then {} connections publish {} retained messages at \
             QoS 1, {} in flight each: one per topic `site/area{{i/100}}/dev{{i}}/config`, a \
             device's configuration as JSON of about 100 bytes. Once the broker counts them all \
             (`watchpost_broker_retained_messages`, refreshed every 5 s; Mosquitto's \
             `$SYS/broker/retained messages/count`, which also counts the `$SYS` topics it \
             added meanwhile), VmRSS is read again. On disk is every file of Watchpost's data \
             directory (`watchpost.db` and its `-wal` and `-shm`), whatever the gateway keeps \
             there, read once its size has not changed for 2 s (or, if it does not change at \
             all, after 10 s); and Mosquitto's `mosquitto.db`, read after an autosave that \
             started once every message was counted. Then a new client (clean session) \
             subscribes to `#` at QoS 1 and acknowledges each message as it reads it; the time \
             runs from writing its SUBSCRIBE to reading the last of the retained messages. \
             Mosquitto keeps its default `set_tcp_nodelay false`: its first retained message \
             waits for the subscriber's delayed acknowledgement of the SUBACK (Nagle's \
             algorithm), some 40 ms on Linux. Last, each broker is stopped with SIGTERM \
             (Watchpost checkpoints its WAL into `watchpost.db`; Mosquitto saves once more) and \
             its files measured again. Re-run this step alone with `cargo run --release -p \
             watchpost-e2e --bin watchpost-bench -- --only retained`.\n\n",
            c["retained_mosquitto_autosave_s"],
            c["retained_publishers"],
            count(messages),
            c["retained_window"],
        ));
        let mut t = Table::new(&["", "Watchpost", "bare Mosquitto"]);
        for (label, figures, of) in &self.rows {
            let total = (*of == Of::Messages).then_some(messages);
            let mut cells = vec![label.to_string()];
            cells.extend(figures.iter().map(|f| match (total, f.spread) {
                (Some(total), Some(_)) => format!("{} of {}", f.show(), count(total)),
                _ => f.show(),
            }));
            t.row(cells);
        }
        out.push_str(&t.done());
        out.push('\n');
        out
    }
}

/// Start-up and binary size.
fn startup_section(r: &Value, runs: &[Value]) -> String {
    // Every gateway start in a run: its median is that run's figure.
    fn starts(v: &Value, out: &mut Vec<f64>) {
        match v {
            Value::Object(map) => {
                for (k, x) in map {
                    if k == "startup_ms" {
                        out.extend(x.as_f64());
                    } else {
                        starts(x, out);
                    }
                }
            }
            Value::Array(list) => list.iter().for_each(|x| starts(x, out)),
            _ => {}
        }
    }
    let mut all = 0;
    let startup = Figure::over(runs, ms, |run| {
        let mut v = Vec::new();
        starts(run, &mut v);
        all += v.len();
        Spread::of(v).map(|s| s.median)
    });
    let m = &r["machine"];
    let mut out = String::from("### Start-up and size\n\n");
    let mut t = Table::new(&["", "Watchpost"]);
    t.row([
        format!(
            "start-up: spawn → ready line on stderr (listeners accepting, store open), fresh data directory; median of {all} starts per run"
        ),
        startup.show(),
    ]);
    t.row([
        "release binary (`target/release/watchpost`)".into(),
        bytes(m["binary_bytes"].as_f64().unwrap_or(0.0)),
    ]);
    let stripped = m["binary_stripped_bytes"].as_f64().unwrap_or(0.0);
    t.row([
        "the same, stripped".into(),
        if stripped > 0.0 {
            bytes(stripped)
        } else {
            "not measured (no `strip`)".into()
        },
    ]);
    out.push_str(&t.done());
    out.push('\n');
    out
}

const METHOD: &str = "### How it is measured, and what to keep in mind

- Everything runs on the one machine, with the other processes of the run sharing its cores:
  the simulator, the load and measurement clients and the peers compete with the system under
  test. On plant, two simulators (one per site), Watchpost, the bridge and the upstream
  Mosquitto run at once.
- Raw figures of every run, and every process's log, are in
  `target/watchpost-bench/<date>/`; `--from-json results.json` renders these tables again.
- Upstream bytes are MQTT bytes on the uplink's TCP connection (CONNECT, PUBLISH, PUBACK,
  PINGREQ, …), not IP or TCP headers, and not TLS: both uplinks run plain MQTT over loopback.
  Watchpost uses its default keep-alive (30 s), Mosquitto's bridge its own (60 s).
- Plant latency to the upstream passes the byte-counting proxy (two more loopback hops) on both
  Watchpost's and the bridge's side; the half-saturation runs have no proxy.
- An alert goes upstream only after its outbox row is committed with `synchronous = FULL`, so
  upstream alert latency includes a disk sync; the local alert is published before.
- Bare rumqttd is this harness's own code around rumqttd's `Broker` (its MQTT listener, its
  router with 4 × 4 MiB logs for `sensors/#`, and a local link subscribed to `sensors/#` that counts), started as a
  process of its own so that its CPU and memory are read apart from the harness's.
- Percentiles are by nearest rank over one run's samples; p99.9 of about a thousand samples is
  close to the largest.
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_part_is_replaced_and_the_rest_kept() {
        let first = render(
            &Value::Null,
            "# Benchmarks\n\nintro\n\n## Pipeline\n\ntable\n",
        );
        assert!(first.starts_with("# Benchmarks\n\n<!-- watchpost-bench: begin"));
        assert!(first.ends_with("\nintro\n\n## Pipeline\n\ntable\n"));
        let second = render(&Value::Null, &first);
        assert_eq!(first, second);
        assert_eq!(second.matches(BEGIN).count(), 1);
    }

    #[test]
    fn verdicts_say_when_runs_disagree() {
        let f = Figure::over(
            &[Value::from(1.0), Value::from(3.0), Value::from(6.0)],
            ms,
            Value::as_f64,
        );
        assert_eq!(f.show(), "3.00 ms (1.00 ms–6.00 ms)");
        assert_eq!(f.verdict(|v| v <= 10.0), "**met**");
        assert_eq!(f.verdict(|v| v <= 5.0), "**met** (not in every run)");
        assert_eq!(f.verdict(|v| v <= 2.0), "**missed** (met in some runs)");
        assert_eq!(f.verdict(|v| v <= 0.5), "**missed**");
    }

    #[test]
    fn results_from_before_states_render_without_them() {
        let latency =
            serde_json::json!({"n": 100, "missing": 0, "p50": 0.5, "p99": 1.0, "p999": 1.5});
        let old = serde_json::json!({
            "config": {"conns": [10], "quick": false},
            "runs": [{
                "plant": {"latency": {"watchpost_local": latency, "watchpost_upstream": latency}},
                "saturation": [{"system": "watchpost", "conns": 10, "rate": 200_000.0}],
                "half": [{"system": "watchpost", "offered_rate": 1000.0, "latency_local": latency}],
            }],
        });
        let text = body(&old);
        for line in [
            "| threshold alert latency device → local `alerts/#` subscriber, p99 ≤ 2 ms on plant | 1.00 ms | **met** |",
            "| leak alert (state rule) latency device → local `alerts/#` subscriber, within a threshold alert's: p99 ≤ 2 ms on plant | – | not measured |",
            "| sustained ingest with 20 % of the readings states (10 connections, QoS 0; reported, no target) | – | – |",
            "| Watchpost, 20 % of the readings states (a state rule) | 10 | – | – | – | – | – |",
            "| 10 | 200,000/s | – | – |",
        ] {
            assert!(text.contains(line), "{line}\nnot in\n{text}");
        }
    }

    #[test]
    fn churn_is_judged_on_the_rss_after_the_expiry_against_before() {
        let doc = serde_json::json!({
            "config": {"churn_devices": 100_000, "churn_warm_up": 10_000,
                       "churn_forget_after": "5s", "churn_settle_s": 3.0, "quick": false},
            "runs": [{"churn": [
                {"system": "watchpost", "devices": 100_000, "before_rss_kib": 15360.0,
                 "peak_rss_kib": 92160.0, "after_rss_kib": 16384.0, "churn_s": 10.0},
                {"system": "mosquitto", "devices": 100_000, "before_rss_kib": 9216.0,
                 "peak_rss_kib": 9216.0, "after_rss_kib": 9216.0, "churn_s": 8.0},
            ]}],
        });
        let text = body(&doc);
        for line in [
            "### Churn: 100,000 distinct devices that come and go (issue 21)",
            "| RSS at the peak (VmHWM) | 90.0 MiB | 9.0 MiB |",
            "| … of the RSS before | 106.7 % | 100.0 % |",
            "| devices through | 10,000/s | 12,500/s |",
            "RSS after the idle expiry within 10 % of before (issue 21) | 106.7 % of before | **met** |",
        ] {
            assert!(text.contains(line), "{line}\nnot in\n{text}");
        }
    }

    #[test]
    fn sessions_show_both_brokers_and_deliveries_out_of_what_was_queued() {
        let doc = serde_json::json!({
            "config": {"sessions": 1000, "session_messages": 100, "quick": false},
            "runs": [{"sessions": [
                {"system": "watchpost", "sessions": 1000, "messages": 100,
                 "idle_rss_kib": 10240.0, "sessions_rss_kib": 11264.0, "rss_kib": 20480.0,
                 "queued_gauge": 100_000.0, "present": 1000, "delivered": 99_990},
                {"system": "mosquitto", "sessions": 1000, "messages": 100,
                 "idle_rss_kib": 8192.0, "rss_kib": 18432.0, "present": 1000,
                 "delivered": 100_000},
            ]}],
        });
        let text = body(&doc);
        for line in [
            "### Sessions: 1,000 offline persistent sessions with queued messages",
            "| … per session | 10.2 KiB | 10.2 KiB |",
            "| … per queued message, above the empty sessions | 94 B | – |",
            "| queued, by `watchpost_broker_queued_messages` | 100,000 of 100,000 | – |",
            "| delivered on return | 99,990 of 100,000 | 100,000 of 100,000 |",
        ] {
            assert!(text.contains(line), "{line}\nnot in\n{text}");
        }
    }

    #[test]
    fn retained_messages_show_both_brokers_per_message() {
        let doc = serde_json::json!({
            "config": {"retained_messages": 10_000, "retained_bound": 20_000, "quick": false},
            "runs": [{"retained": [
                {"system": "watchpost", "messages": 10_000, "idle_rss_kib": 10240.0,
                 "rss_kib": 12240.0, "retained_idle": 0, "retained_count": 10_000,
                 "disk_idle_bytes": 150_000, "disk_bytes": 2_150_000,
                 "disk_files": {"watchpost.db": 1_000_000, "watchpost.db-wal": 1_117_232},
                 "delivered": 10_000, "deliver_s": 0.0125},
                {"system": "mosquitto", "messages": 10_000, "idle_rss_kib": 8192.0,
                 "rss_kib": 11192.0, "retained_idle": 40, "retained_count": 10_040,
                 "disk_idle_bytes": 47, "disk_bytes": 1_940_047,
                 "disk_files": {"mosquitto.db": 1_940_047},
                 "delivered": 9_000, "deliver_s": 0.5},
            ]}],
        });
        let text = body(&doc);
        for line in [
            "### Retained: 10,000 retained messages",
            "| … per retained message | 205 B | 307 B |",
            "| retained messages the broker counts, above its fresh start | 10,000 | 10,000 |",
            "| … of which the main file (`watchpost.db`, `mosquitto.db`) | 976.6 KiB | 1894.6 KiB |",
            "| … above fresh start | 1953.1 KiB | 1894.5 KiB |",
            "| … SUBSCRIBE → all of them (the last one read) | 12.5 ms | 500.0 ms |",
            "| … delivered | 10,000 of 10,000 | 9,000 of 10,000 |",
        ] {
            assert!(text.contains(line), "{line}\nnot in\n{text}");
        }
    }

    #[test]
    fn the_retain_flag_is_judged_against_the_spread_without_it() {
        let run = |plain: f64, retained: f64| {
            serde_json::json!({
                "saturation": [{"system": "watchpost", "conns": 10, "rate": plain}],
                "retained_saturation": [{"system": "watchpost", "conns": 10, "rate": retained}],
            })
        };
        let doc = |runs: Vec<Value>| serde_json::json!({"config": {"conns": [10], "retain_conns": [10]}, "runs": runs});
        let text = body(&doc(vec![
            run(200_000.0, 195_000.0),
            run(190_000.0, 196_000.0),
            run(210_000.0, 194_000.0),
        ]));
        for line in [
            "| Watchpost | 10 | 200,000/s (190,000/s–210,000/s) | 195,000/s (194,000/s–196,000/s) | 0.97× (0.92×–1.03×) |",
            "(within the spread of the runs without the flag)",
            "| readings with the retain flag set cost the saturation figure no more than noise (10 connections, QoS 0; issue 18) | 0.97× (0.92×–1.03×) of the figure without | **met** (within the spread of the runs without the flag) |",
        ] {
            assert!(text.contains(line), "{line}\nnot in\n{text}");
        }
        let text = body(&doc(vec![
            run(200_000.0, 150_000.0),
            run(190_000.0, 150_000.0),
        ]));
        assert!(text.contains("**missed** (below every run without the flag)"));
        let text = body(&doc(vec![run(200_000.0, 199_000.0)]));
        assert!(text.contains("not judged: one run, no spread to call noise"));
    }

    #[test]
    fn counts_have_thousands_separators() {
        assert_eq!(count(1234567.0), "1,234,567");
        assert_eq!(count(999.0), "999");
        assert_eq!(count(-1000.0), "-1,000");
        assert_eq!(percent(0.0003), "0.030 %");
    }
}

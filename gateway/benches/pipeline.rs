//! Throughput of the ingest pipeline without the network: decode → loss accounting → rules →
//! rollups → store, and the cost of one alert from its reading to its outbox commit.
//!
//! Run: `cargo bench -p watchpost --bench pipeline` (prints tables; nothing is asserted), or
//! `cargo bench -p watchpost --bench pipeline -- commits` for the durability cost alone: one
//! alert transition committed with its outbox row (`synchronous = FULL`, the WAL synced per
//! commit) against the same transition kept as history only (`synchronous = NORMAL`).
//! The database lives in a temporary directory on the same disk as the build.

use std::sync::Arc;
use std::time::{Duration, Instant};

use watchpost::alert::now_millis;
use watchpost::codec::Limits;
use watchpost::config;
use watchpost::ingest::{Engine, EngineOptions};
use watchpost::stats::Stats;
use watchpost::store::{OutboxEntry, RawRow, Store, StoreOptions};
use watchpost::value::Value;

const DEVICES: usize = 1000;
const METRICS: [&str; 3] = ["temperature", "humidity", "pressure"];

fn engine(window: Duration, keep_raw: bool, stats: Arc<Stats>) -> Engine {
    let rules = config::quickstart()
        .expect("quickstart compiles")
        .config
        .rules;
    let options = EngineOptions {
        gateway: "bench".into(),
        rules,
        sources: Vec::new(),
        limits: Limits::default(),
        window,
        keep_raw,
        summaries: None,
        stale_after: std::time::Duration::from_secs(600),
        forget_after: watchpost::config::DEFAULT_FORGET_AFTER,
    };
    Engine::new(options, stats, now_millis())
}

/// Pre-rendered messages: `{"v":..,"seq":..}` on `sensors/{device}/{metric}`, in range.
fn messages(n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let device = i % DEVICES;
            let metric = METRICS[(i / DEVICES) % METRICS.len()];
            let seq = i / (DEVICES * METRICS.len());
            let value = 20.0 + (i % 97) as f64 / 10.0;
            (
                format!("sensors/dev-{device}/{metric}").into_bytes(),
                format!("{{\"v\":{value:.1},\"seq\":{seq}}}").into_bytes(),
            )
        })
        .collect()
}

struct Row {
    what: &'static str,
    readings: usize,
    took: Duration,
}

/// A store in `dir` with a budget it never reaches, no reserve, and raw readings kept for
/// `raw_retention`.
fn open_store(
    dir: &std::path::Path,
    raw_retention: Option<Duration>,
    stats: &Arc<Stats>,
) -> (Store, watchpost::store::StoreThread) {
    let options = StoreOptions {
        max_db_bytes: 8 << 30,
        raw_retention,
        reserve_bytes: 0,
    };
    Store::open(dir, options, stats.clone()).expect("store opens")
}

async fn through_store(keep_raw: bool, msgs: &[(Vec<u8>, Vec<u8>)]) -> Row {
    let (dir, stats) = (
        tempfile::tempdir().expect("temp dir"),
        Arc::new(Stats::default()),
    );
    let (store, thread) = open_store(
        dir.path(),
        keep_raw.then_some(Duration::from_secs(86_400)),
        &stats,
    );
    // One-second windows so that rollups really reach the store during the run.
    let mut engine = engine(Duration::from_secs(1), keep_raw, stats);
    let start = Instant::now();
    let mut since_flush = Instant::now();
    for (topic, payload) in msgs {
        let now = now_millis();
        let _ = engine.on_message(topic, payload, now);
        if engine.buffered_history() >= 4096 || since_flush.elapsed() >= Duration::from_secs(1) {
            let round = engine.housekeeping(now);
            store.rollups(round.rollups);
            store.raw(round.raw);
            store.devices(round.devices);
            since_flush = Instant::now();
        }
    }
    let round = engine.finish(now_millis());
    store.rollups(round.rollups);
    store.raw(round.raw);
    store.devices(round.devices);
    store.flush().await;
    let took = start.elapsed();
    drop(store);
    thread.join();
    Row {
        what: if keep_raw {
            "decode+rules+rollups+store, raw readings kept"
        } else {
            "decode+rules+rollups+store (rollups only)"
        },
        readings: msgs.len(),
        took,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn alert_cost(n: usize) -> Vec<Duration> {
    let (dir, stats) = (
        tempfile::tempdir().expect("temp dir"),
        Arc::new(Stats::default()),
    );
    let (store, thread) = open_store(dir.path(), None, &stats);
    let mut committed = store.committed();
    let mut engine = engine(Duration::from_secs(60), false, stats);
    let mut costs = Vec::with_capacity(n);
    for i in 0..n {
        let device = format!("sensors/hot-{}/temperature", i % 50);
        let _ = engine.on_message(device.as_bytes(), b"20", now_millis());
        let start = Instant::now();
        // The quickstart's overheat rule holds 10 s; freezing (below 2) fires at once.
        let docs = engine.on_message(device.as_bytes(), b"1.5", now_millis());
        let doc = docs.into_iter().next().expect("an alert").doc;
        let entry = OutboxEntry {
            id: doc.id.clone(),
            topic: doc.topic(),
            payload: doc.to_json().into(),
            retain: true,
        };
        store.alert(&doc, Some(entry));
        committed.changed().await.expect("store alive");
        costs.push(start.elapsed());
        // Clear it again (history only) so the next round raises anew.
        for d in engine.on_message(device.as_bytes(), b"20", now_millis()) {
            store.alert(&d.doc, None);
        }
    }
    drop(store);
    thread.join();
    costs.sort();
    costs
}

/// Latency of committing one write at a time, `n` times: an alert transition with its outbox
/// row (synced, `synchronous = FULL`) if `upstream`, else a raw reading of the same rule's
/// input (history only, `synchronous = NORMAL`).
async fn transition_commit(n: usize, upstream: bool) -> Vec<Duration> {
    let (dir, stats) = (
        tempfile::tempdir().expect("temp dir"),
        Arc::new(Stats::default()),
    );
    let (store, thread) = open_store(dir.path(), None, &stats);
    let mut engine = engine(Duration::from_secs(60), false, stats);
    let mut costs = Vec::with_capacity(n);
    for i in 0..n {
        // The quickstart's freezing rule: below 2 raises at once, 20 clears.
        let topic = format!("sensors/cold-{}/temperature", i % 50);
        let reading: &[u8] = if (i / 50) % 2 == 0 { b"1.5" } else { b"20" };
        let docs = engine.on_message(topic.as_bytes(), reading, now_millis());
        let doc = docs.into_iter().next().expect("a transition").doc;
        let entry = upstream.then(|| OutboxEntry {
            id: doc.id.clone(),
            topic: doc.topic(),
            payload: doc.to_json().into(),
            retain: true,
        });
        let start = Instant::now();
        if upstream {
            store.alert(&doc, entry);
        } else {
            store.raw(vec![RawRow {
                device: doc.device.clone(),
                metric: "temperature".into(),
                at: now_millis(),
                value: Value::Number(1.5),
                seq: None,
            }]);
        }
        store.flush().await;
        costs.push(start.elapsed());
    }
    drop(store);
    thread.join();
    costs.sort();
    costs
}

/// The cost of durability: one transition per commit, FULL against NORMAL.
fn commits(runtime: &tokio::runtime::Runtime) {
    let n = 2000;
    println!("| one write per commit | p50 | p90 | p99 | max | commits/s |");
    println!("|---|---:|---:|---:|---:|---:|");
    let ms = |d: Duration| format!("{:.3} ms", d.as_secs_f64() * 1e3);
    for (what, upstream) in [
        ("with its outbox row: `synchronous = FULL`", true),
        ("a raw reading, history only: `synchronous = NORMAL`", false),
    ] {
        let costs = runtime.block_on(transition_commit(n, upstream));
        let total: Duration = costs.iter().sum();
        println!(
            "| {what} | {} | {} | {} | {} | {:.0} |",
            ms(percentile(&costs, 0.5)),
            ms(percentile(&costs, 0.9)),
            ms(percentile(&costs, 0.99)),
            ms(*costs.last().expect("some")),
            costs.len() as f64 / total.as_secs_f64()
        );
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if std::env::args().any(|a| a == "commits") {
        commits(&runtime);
        return;
    }
    let n = 1_000_000;
    let msgs = messages(n);

    let mut rows = Vec::new();
    {
        let mut engine = engine(Duration::from_secs(60), false, Arc::new(Stats::default()));
        let start = Instant::now();
        for (topic, payload) in &msgs {
            let _ = engine.on_message(topic, payload, now_millis());
        }
        let _ = engine.housekeeping(now_millis());
        rows.push(Row {
            what: "decode+rules+rollups (engine only)",
            readings: n,
            took: start.elapsed(),
        });
    }
    rows.push(runtime.block_on(through_store(false, &msgs)));
    rows.push(runtime.block_on(through_store(true, &msgs[..300_000])));

    println!("| pipeline stage | readings | seconds | readings/s | µs/reading |");
    println!("|---|---:|---:|---:|---:|");
    for r in &rows {
        let secs = r.took.as_secs_f64();
        println!(
            "| {} | {} | {:.2} | {:.0} | {:.2} |",
            r.what,
            r.readings,
            secs,
            r.readings as f64 / secs,
            secs * 1e6 / r.readings as f64
        );
    }

    let costs = runtime.block_on(alert_cost(1000));
    println!();
    println!("| one alert, reading → outbox commit (fsync) | p50 | p90 | p99 | max |");
    println!("|---|---:|---:|---:|---:|");
    let ms = |d: Duration| format!("{:.3} ms", d.as_secs_f64() * 1e3);
    println!(
        "| {} alerts | {} | {} | {} | {} |",
        costs.len(),
        ms(percentile(&costs, 0.5)),
        ms(percentile(&costs, 0.9)),
        ms(percentile(&costs, 0.99)),
        ms(*costs.last().expect("some"))
    );
    println!();
    commits(&runtime);
}

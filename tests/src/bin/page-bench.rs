//! The status page's figures (issue 23): its weight, its time to first render with 10,000
//! devices, and the gateway's ingest rate with the page open and refreshing.
//!
//! The gateway runs in this process (`watchpost::start`, on a tokio runtime of its own with
//! two workers); the flood is a plain thread writing MQTT over TCP; the page is in headless
//! Chromium (chromedriver on the PATH). Each of three rounds starts a fresh gateway, gives it
//! 10,000 devices, and measures everything once; the table shows min, median and max.
//!
//! A browser on the gateway's own two cores competes with the gateway for them, which an
//! operator's phone does not; so the page's requests are also made by a plain HTTP client (a
//! thread of this process, the same requests as the page's `loadAll()`), which leaves only
//! what serving them costs the gateway. The gateway's own counter of the time ingest spent
//! copying the device list for the page says what the ingest path paid.
//!
//! `cargo run --release -p watchpost-e2e --bin page-bench`

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rumqttc::QoS;
use serde_json::{Value, json};
use watchpost_e2e::browser::{Browser, Cdp};
use watchpost_e2e::clients::{connect_packet, put_remaining_length};
use watchpost_e2e::{OVERHEAT, Publisher, gateway_config_with};

const ROUNDS: usize = 3;
const DEVICES: usize = 10_000;
const PUBLISHERS: usize = 4;
const WINDOW: Duration = Duration::from_secs(10);
/// Rows of the page's device table (`PAGE` in page.js).
const PAGE_ROWS: usize = 100;
/// What the page's `loadAll()` asks for, in its first view (offline and silent devices first).
const LOAD_ALL: [&str; 5] = [
    "/status",
    "/api/devices?sort=state&offset=0&limit=100",
    "/api/alerts",
    "/plot/bandwidth.svg",
    "/api/bandwidth",
];

/// Installed before the page's own script on every navigation: notes, on the page's clock
/// (milliseconds from navigation start), when the header, the alerts and the device table's
/// first page are in the DOM, and the frame after the table.
const WATCH: &str = r#"
window.__bench = {};
new MutationObserver(function (_, observer) {
  const b = window.__bench, now = performance.now();
  const gw = document.getElementById('gateway');
  if (b.header === undefined && gw && gw.textContent !== '') b.header = now;
  const count = document.getElementById('alert-count');
  if (b.alerts === undefined && count && count.textContent !== '') b.alerts = now;
  const table = document.getElementById('devices');
  if (b.table === undefined && table && table.tBodies[0].rows.length >= TARGET) {
    b.table = now;
    requestAnimationFrame(() => requestAnimationFrame(() => { b.frame = performance.now(); }));
  }
  if (b.header !== undefined && b.alerts !== undefined && b.table !== undefined) observer.disconnect();
}).observe(document, { childList: true, subtree: true, characterData: true });
"#;

#[derive(Default)]
struct Figures {
    rows: Vec<(String, String, Vec<f64>)>,
}

impl Figures {
    fn add(&mut self, name: &str, unit: &str, value: f64) {
        match self.rows.iter_mut().find(|(n, _, _)| n == name) {
            Some((_, _, values)) => values.push(value),
            None => self
                .rows
                .push((name.to_owned(), unit.to_owned(), vec![value])),
        }
    }

    fn get(&self, name: &str) -> Vec<f64> {
        self.rows
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, v)| v.clone())
            .unwrap_or_default()
    }

    fn print(&self) {
        println!(
            "\n| {:<52} | {:>9} | {:>9} | {:>9} | {:<10} |",
            "figure", "min", "median", "max", "unit"
        );
        println!(
            "|{:-<54}|{:->11}|{:->11}|{:->11}|{:-<12}|",
            "", "", "", "", ""
        );
        for (name, unit, values) in &self.rows {
            let mut v = values.clone();
            v.sort_by(f64::total_cmp);
            let digits = if v.iter().all(|x| x.fract() == 0.0) {
                0
            } else if unit == "ratio" {
                3
            } else {
                1
            };
            println!(
                "| {:<52} | {:>9.*} | {:>9.*} | {:>9.*} | {:<10} |",
                name,
                digits,
                v[0],
                digits,
                v[v.len() / 2],
                digits,
                v[v.len() - 1],
                unit
            );
        }
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn main() -> Result<()> {
    let gateway_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("gateway")
        .enable_all()
        .build()?;
    let driver_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("driver")
        .enable_all()
        .build()?;
    println!(
        "page-bench: {ROUNDS} rounds, {DEVICES} devices, windows of {WINDOW:?}; {} cores, load {} at the start",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg()
    );
    let started = Instant::now();
    let mut figures = Figures::default();
    let Some(browser) = driver_rt.block_on(Browser::start()) else {
        bail!("chromedriver is needed: apt-get install chromium chromium-driver");
    };
    driver_rt.block_on(browser.client().issue_cmd(Cdp(
        "Page.addScriptToEvaluateOnNewDocument",
        json!({ "source": WATCH.replace("TARGET", &PAGE_ROWS.to_string()) }),
    )))?;
    for round in 0..ROUNDS {
        let data = tempfile::tempdir()?;
        let gateway = gateway_rt
            .block_on(watchpost::start(gateway_config_with(
                data.path(),
                None,
                // One flood connection stands for the fleet: no per-connection limit.
                "max_publish_rate = 0",
                OVERHEAT,
            )))
            .context("the gateway")?;
        let http = gateway.http_addr().context("the HTTP endpoint")?;
        let mqtt = gateway.mqtt_addr();
        let t = Instant::now();
        driver_rt.block_on(populate(mqtt, http, gateway.stats()))?;
        println!(
            "round {}: {DEVICES} devices in {:.1} s, load {}",
            round + 1,
            t.elapsed().as_secs_f64(),
            loadavg()
        );
        weigh(http, &mut figures)?;
        day_plot(&mut figures)?;
        // The device list is kept for a second: the page reads a fresh one.
        std::thread::sleep(Duration::from_millis(1100));
        driver_rt.block_on(first_render(&browser, http, &mut figures))?;
        driver_rt.block_on(cost_per_view(http, &mut figures))?;
        driver_rt.block_on(saturation(
            &browser,
            &gateway,
            mqtt,
            http,
            round,
            &mut figures,
        ))?;
        driver_rt.block_on(browser.client().goto("about:blank"))?;
        gateway_rt.block_on(gateway.shutdown());
    }
    for (with, name) in [
        ("loadAll", "ingest, page calling loadAll() every 1 s"),
        ("reload", "ingest, page reloaded every 1 s"),
        (
            "http loadAll",
            "ingest, HTTP client: loadAll()'s requests every 1 s",
        ),
        (
            "http all",
            "ingest, HTTP client: all 10,000 devices every 1 s",
        ),
    ] {
        let none = figures.get("ingest, no page");
        let with_page = figures.get(name);
        for (a, b) in none.iter().zip(&with_page) {
            figures.add(
                &format!("ratio {with} / no page (same round)"),
                "ratio",
                b / a,
            );
        }
    }
    figures.print();
    println!(
        "\n{} s in all; load {} at the end",
        started.elapsed().as_secs(),
        loadavg()
    );
    drop(browser);
    Ok(())
}

/// One reading for each of [`DEVICES`] devices, from [`PUBLISHERS`] clients at QoS 1; waits
/// until the page's device list holds them all.
async fn populate(
    mqtt: SocketAddr,
    http: SocketAddr,
    stats: &watchpost::stats::Stats,
) -> Result<()> {
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        tasks.push(tokio::spawn(async move {
            let publisher = Publisher::connect(mqtt, &format!("populate-{p}")).await?;
            let mut sent = 0;
            for d in (p..DEVICES).step_by(PUBLISHERS) {
                let topic = format!("sensors/dev-{:05}/temperature", d + 1);
                let value = format!("{}.5", 18 + d % 7);
                publisher.publish(&topic, QoS::AtLeastOnce, value).await?;
                sent += 1;
            }
            publisher.wait_acked(sent, Duration::from_secs(60)).await
        }));
    }
    for task in tasks {
        task.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = get(http, "/api/devices").await?;
        let n = serde_json::from_str::<Value>(&body)?
            .as_array()
            .map_or(0, Vec::len);
        if n >= DEVICES {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{n} of {DEVICES} devices listed after 30 s ({} readings, {} messages)",
                stats.readings.load(Ordering::Relaxed),
                stats.messages.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get(http: SocketAddr, path: &str) -> Result<(u16, String)> {
    let path = path.to_owned();
    Ok(tokio::task::spawn_blocking(move || watchpost::http::get_blocking(http, &path)).await??)
}

/// The bytes of what the page loads, as the gateway sends them (no compression).
fn weigh(http: SocketAddr, figures: &mut Figures) -> Result<()> {
    let mut total = 0;
    for (name, path) in [
        ("/ (index.html)", "/"),
        ("/page.js", "/page.js"),
        ("/page.css", "/page.css"),
        ("/favicon.svg", "/favicon.svg"),
        ("/api/devices (all 10,000 devices)", "/api/devices"),
        ("/api/devices (the page's first 100)", LOAD_ALL[1]),
        (
            "/plot/series.svg (one device)",
            "/plot/series.svg?device=dev-00001&metric=temperature",
        ),
        ("/plot/bandwidth.svg", "/plot/bandwidth.svg"),
    ] {
        let (status, body) = watchpost::http::get_blocking(http, path)?;
        if status != 200 {
            bail!("{path}: {status}");
        }
        figures.add(&format!("weight {name}"), "bytes", body.len() as f64);
        total += body.len();
    }
    figures.add("weight, all of the above", "bytes", total as f64);
    Ok(())
}

/// A day's plot of one metric (1,440 one-minute windows, max, mean and min) as the gateway
/// draws it, against the same points as JSON, which a charting script in the page would read
/// instead (and the script itself: uPlot is "~50 KB min" by its README, which calls it likely
/// the smallest time-series plotter that does without WebGL or WASM).
fn day_plot(figures: &mut Figures) -> Result<()> {
    use watchpost::page::svg::{Series, plot};
    let start = 1_796_000_000_000u64;
    let points: Vec<(u64, f64, f64, f64)> = (0..1_440u64)
        .map(|i| {
            let mean = 21.0 + (i as f64 / 90.0).sin() * 3.0 + (i % 7) as f64 * 0.013;
            (start + i * 60_000, mean - 0.8, mean, mean + 0.9)
        })
        .collect();
    let line = |name: &str, class, pick: fn(&(u64, f64, f64, f64)) -> f64| Series {
        name: name.to_owned(),
        class,
        points: points.iter().map(|p| (p.0, pick(p))).collect(),
    };
    let series = [
        line("max", "c", |p| p.3),
        line("mean", "a", |p| p.2),
        line("min", "b", |p| p.1),
    ];
    let mut times = Vec::new();
    let mut drawn = String::new();
    for _ in 0..51 {
        let t = Instant::now();
        drawn = plot("dev-00001 temperature", "temperature", &series);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let json = serde_json::to_vec(&watchpost::page::SeriesAnswer {
        device: "dev-00001".into(),
        metric: "temperature".into(),
        points: points.clone(),
    })?;
    figures.add(
        "plot of a day (1,440 windows): SVG",
        "bytes",
        drawn.len() as f64,
    );
    figures.add(
        "plot of a day: the same points as JSON",
        "bytes",
        json.len() as f64,
    );
    figures.add(
        "plot of a day: time to draw the SVG",
        "ms",
        times[times.len() / 2],
    );
    Ok(())
}

/// A fresh navigation to the page; times from the page's own clock.
async fn first_render(browser: &Browser, http: SocketAddr, figures: &mut Figures) -> Result<()> {
    browser.client().goto("about:blank").await?;
    let origin = format!("http://{http}/");
    browser.client().goto(&origin).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let b = loop {
        let b = browser
            .eval(
                "const b = window.__bench || {}; const n = performance.getEntriesByType('navigation')[0];\
                 const fcp = performance.getEntriesByName('first-contentful-paint')[0];\
                 return Object.assign({}, b, { dcl: n ? n.domContentLoadedEventEnd : null,\
                 fcp: fcp ? fcp.startTime : null, rows: document.querySelectorAll('#devices tbody tr').length })",
            )
            .await;
        if b["frame"].is_number() && b["header"].is_number() && b["alerts"].is_number() {
            break b;
        }
        if Instant::now() > deadline {
            bail!("the page did not show {PAGE_ROWS} devices within 60 s: {b}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ms = |k: &str| b[k].as_f64().unwrap_or(f64::NAN);
    figures.add("render: DOMContentLoaded", "ms", ms("dcl"));
    figures.add("render: first contentful paint", "ms", ms("fcp"));
    figures.add("render: header (gateway name) shown", "ms", ms("header"));
    figures.add("render: alerts shown", "ms", ms("alerts"));
    figures.add("render: table holds its first 100 rows", "ms", ms("table"));
    figures.add("render: the frame after the table", "ms", ms("frame"));
    Ok(())
}

/// CPU time the gateway's threads have run, in ns (`/proc/self/task/*/schedstat`): its tokio
/// workers and blocking threads ("gateway"), the store and the login threads ("watchpost-").
fn gateway_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("gateway") || c.starts_with("watchpost-"))
        })
        .filter_map(|t| {
            let stat = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// What serving a page view costs the gateway in CPU, with no flood: the requests of one
/// `loadAll()` when the device list must be copied afresh (as for the page's refresh every
/// 10 s) and when the copy of the last second serves it, and all 10,000 devices at once.
async fn cost_per_view(http: SocketAddr, figures: &mut Figures) -> Result<()> {
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // The first round copies the list afresh; the second, right after, is served the copy.
        for name in [
            "CPU, one loadAll(): fresh device list",
            "CPU, one loadAll(): device list of the last 1 s",
        ] {
            let before = gateway_cpu_ns();
            for path in LOAD_ALL {
                expect_ok(http, path).await?;
            }
            figures.add(
                name,
                "ms",
                (gateway_cpu_ns().saturating_sub(before)) as f64 / 1e6,
            );
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let before = gateway_cpu_ns();
        expect_ok(http, "/api/devices").await?;
        figures.add(
            "CPU, all 10,000 devices: fresh device list",
            "ms",
            (gateway_cpu_ns().saturating_sub(before)) as f64 / 1e6,
        );
    }
    Ok(())
}

/// Readings accepted per second while one client floods QoS 0: with no page, with the page
/// calling `loadAll()` every second, with the page reloaded every second, and with a plain
/// HTTP client making `loadAll()`'s requests, or reading all 10,000 devices, every second.
/// The order turns round by one each round, so that no case is always first.
async fn saturation(
    browser: &Browser,
    gateway: &watchpost::Gateway,
    mqtt: SocketAddr,
    http: SocketAddr,
    round: usize,
    figures: &mut Figures,
) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || flood(mqtt, &stop))
    };
    let stats = gateway.stats();
    let readings = || stats.readings.load(Ordering::Relaxed);
    let copying = || {
        (
            stats.page_device_lists.load(Ordering::Relaxed),
            stats.page_device_list_us.load(Ordering::Relaxed),
        )
    };
    // Warm up: the flood at full speed before anything is counted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let origin = format!("http://{http}/");
    let mut cases = vec!["none", "loadAll", "reload", "http loadAll", "http all"];
    let turn = round % cases.len();
    cases.rotate_left(turn);
    for case in cases {
        if case == "loadAll" || case == "reload" {
            browser.client().goto(&origin).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
        } else {
            browser.client().goto("about:blank").await?;
        }
        if case == "loadAll" {
            browser
                .eval(
                    "window.__loads = 0; window.__timer = setInterval(() => loadAll().then(() => window.__loads++), 1000); return true",
                )
                .await;
        }
        let (start, at, copied) = (readings(), Instant::now(), copying());
        let mut requests = 0;
        while at.elapsed() < WINDOW {
            let tick = Instant::now();
            match case {
                "reload" => {
                    browser.client().refresh().await?;
                    requests += 1;
                }
                "http loadAll" => {
                    for path in LOAD_ALL {
                        expect_ok(http, path).await?;
                    }
                    requests += 1;
                }
                "http all" => {
                    expect_ok(http, "/api/devices").await?;
                    requests += 1;
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_secs(1).saturating_sub(tick.elapsed())).await;
        }
        let seconds = at.elapsed().as_secs_f64();
        let rate = (readings() - start) as f64 / seconds;
        let (lists, micros) = copying();
        let (lists, micros) = (lists - copied.0, micros - copied.1);
        let name = match case {
            "none" => "ingest, no page",
            "loadAll" => "ingest, page calling loadAll() every 1 s",
            "reload" => "ingest, page reloaded every 1 s",
            "http loadAll" => "ingest, HTTP client: loadAll()'s requests every 1 s",
            _ => "ingest, HTTP client: all 10,000 devices every 1 s",
        };
        figures.add(name, "readings/s", rate);
        match case {
            "none" => {}
            "loadAll" => {
                let loads = browser
                    .eval("clearInterval(window.__timer); return window.__loads")
                    .await;
                figures.add(
                    "  loadAll() completed in the window",
                    "count",
                    loads.as_f64().unwrap_or(f64::NAN),
                );
            }
            "reload" => figures.add("  reloads in the window", "count", requests as f64),
            _ => figures.add(
                &format!("  {case}: rounds of requests in the window"),
                "count",
                requests as f64,
            ),
        }
        if case != "none" {
            figures.add(
                &format!("  {case}: ingest time copying the device list"),
                "ms/s",
                micros as f64 / 1e3 / seconds,
            );
            if lists > 0 {
                figures.add(
                    "  one copy of 10,000 devices, under the flood",
                    "ms",
                    micros as f64 / 1e3 / lists as f64,
                );
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent = flood.join().expect("the flood thread")?;
    println!("  flood: {sent} messages sent; load {}", loadavg());
    Ok(())
}

async fn expect_ok(http: SocketAddr, path: &str) -> Result<()> {
    let (status, _) = get(http, path).await?;
    if status != 200 {
        bail!("{path}: {status}");
    }
    Ok(())
}

/// One MQTT 3.1.1 connection writing QoS 0 readings for the fleet's devices as fast as the
/// socket takes them, until `stop`. Returns the messages written.
fn flood(mqtt: SocketAddr, stop: &AtomicBool) -> Result<u64> {
    let mut stream = TcpStream::connect(mqtt)?;
    stream.set_nodelay(true)?;
    stream.write_all(&connect_packet("page-bench-flood", None))?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack)?;
    if connack[0] != 0x20 || connack[3] != 0 {
        bail!("refused: {connack:?}");
    }
    let mut batch = Vec::with_capacity(70_000);
    let mut sent = 0u64;
    let mut device = 0usize;
    while !stop.load(Ordering::Relaxed) {
        batch.clear();
        while batch.len() < 64 * 1024 {
            let topic = format!("sensors/dev-{:05}/temperature", device % DEVICES + 1);
            let value = format!("{}.{}", 18 + device % 7, sent % 10);
            batch.push(0x30);
            put_remaining_length(&mut batch, 2 + topic.len() + value.len());
            batch.extend_from_slice(&(topic.len() as u16).to_be_bytes());
            batch.extend_from_slice(topic.as_bytes());
            batch.extend_from_slice(value.as_bytes());
            device += 1;
            sent += 1;
        }
        stream.write_all(&batch)?;
    }
    // DISCONNECT
    let _ = stream.write_all(&[0xe0, 0]);
    Ok(sent)
}

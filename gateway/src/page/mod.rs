//! The status page at `/` and the JSON behind it: which devices are alive, what is alarming
//! now, what happened today, and how much bandwidth the site saves.
//!
//! | path | what |
//! |---|---|
//! | `/` `/page.js` `/page.css` | the page: one HTML file, one script, one style sheet, all in the binary; nothing is fetched from elsewhere (the `Content-Security-Policy` says so to the browser) |
//! | `/api/devices[?q=&sort=&desc=1&offset=&limit=]` | the devices in memory (presence, last values, `seq` losses, source, alerts raised): all of them by name, or those whose name contains `q`, ordered by `state` (offline, silent, online), `name`, `seen`, `battery`, `lost` or `source`, a page of them; the headers `Watchpost-Devices`, `Watchpost-Devices-Not-Online` and `Watchpost-Devices-Matching` count them, and `Watchpost-Devices-Age-Ms` says how old the copy is (one serves every request for a second) |
//! | `/api/alerts` | alerts raised now, and today's transitions (UTC), each delivered upstream or still in the outbox |
//! | `/api/series?device=D&metric=M[&hours=H]` | a metric's rollups (min, mean, max per window) over the last `H` hours (24) |
//! | `/api/bandwidth` | bytes upstream and what forwarding every reading would have cost, sampled each minute since start |
//! | `/plot/series.svg?device=D&metric=M` `/plot/bandwidth.svg` | the same, drawn ([`svg`]) |
//! | `/api/events` | server-sent events: each alert transition and presence change as it happens |
//!
//! Read-only: nothing here changes the gateway. A page view costs ingest one copy of the
//! device list at most once a second, however many pages are open; the rest is read from
//! the database's read-only connection and the counters. On an address other than loopback
//! every path here asks for an operator's name and secret (HTTP basic authentication,
//! checked like an MQTT login, [`Login`]); `/metrics`, `/healthz`, `/readyz` and `/status`
//! stay as they were.

pub mod svg;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::BroadcastStream;

use crate::alert::{AlertDoc, now_millis};
use crate::events::Event;
use crate::ingest::{Control, DeviceView};
use crate::rules::Millis;
use crate::stats::Stats;

/// How long one copy of the device list serves every page that asks.
const DEVICES_FRESH: Duration = Duration::from_secs(1);
/// How often the bandwidth counters are sampled, and how many samples are kept (a day).
pub const BANDWIDTH_EVERY: Duration = Duration::from_secs(60);
const BANDWIDTH_SAMPLES: usize = 24 * 60;

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("page.js");
const STYLE: &str = include_str!("page.css");
/// A watchtower's lamp: a dot in a ring.
const ICON: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><circle cx="8" cy="8" r="6.5" fill="none" stroke="#1565c0" stroke-width="2"/><circle cx="8" cy="8" r="2.5" fill="#c2185b"/></svg>"##;
/// Nothing but the gateway itself: no CDN, no font, no script from anywhere else.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// What the page's handlers read.
pub struct Page {
    /// The gateway's counters.
    pub stats: Arc<Stats>,
    /// The data directory (the database is read through a read-only connection).
    pub data_dir: PathBuf,
    /// Requests to ingest (the device list).
    pub control: mpsc::Sender<Control>,
    /// Alert transitions and presence changes as they happen.
    pub events: crate::events::Sender,
    /// An upstream is configured.
    pub upstream: bool,
    devices: tokio::sync::Mutex<Option<(Instant, Arc<Vec<DeviceView>>)>>,
    bandwidth: Mutex<VecDeque<(Millis, u64, u64)>>,
}

/// Checks operators' names and secrets, as the broker does for MQTT logins.
#[derive(Clone)]
pub struct Login(pub(crate) Arc<crate::broker::Gate>);

impl Page {
    /// The page's state; [`sample_bandwidth`] keeps its bandwidth history.
    pub fn new(
        stats: Arc<Stats>,
        data_dir: PathBuf,
        control: mpsc::Sender<Control>,
        events: crate::events::Sender,
        upstream: bool,
    ) -> Page {
        Page {
            stats,
            data_dir,
            control,
            events,
            upstream,
            devices: tokio::sync::Mutex::new(None),
            bandwidth: Mutex::new(VecDeque::new()),
        }
    }

    fn sample(&self) -> (Millis, u64, u64) {
        (
            now_millis(),
            Stats::get(&self.stats.upstream_bytes),
            Stats::get(&self.stats.forward_all_bytes),
        )
    }

    /// Takes one bandwidth sample.
    pub fn record_bandwidth(&self) {
        let sample = self.sample();
        let mut kept = self.bandwidth.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() == BANDWIDTH_SAMPLES {
            kept.pop_front();
        }
        kept.push_back(sample);
    }
}

/// Samples the bandwidth counters every [`BANDWIDTH_EVERY`] until `shutdown`.
pub async fn sample_bandwidth(page: Arc<Page>, shutdown: crate::shutdown::Signal) {
    shutdown
        .every(BANDWIDTH_EVERY, || page.record_bandwidth())
        .await;
}

/// The page's routes, with `login` in front of them when one is required.
pub fn routes(page: Arc<Page>, login: Option<Login>) -> Router {
    let router = Router::new()
        .route("/", get(index))
        .route(
            "/page.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/page.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route(
            "/favicon.svg",
            get(|| async { asset(ICON, "image/svg+xml") }),
        )
        .route("/api/devices", get(devices))
        .route("/api/alerts", get(alerts))
        .route("/api/series", get(series))
        .route("/api/bandwidth", get(bandwidth))
        .route("/plot/series.svg", get(series_svg))
        .route("/plot/bandwidth.svg", get(bandwidth_svg))
        .route("/api/events", get(events));
    let router = match login {
        Some(login) => router.layer(axum::middleware::from_fn_with_state(
            login,
            require_operator,
        )),
        None => router,
    };
    router.with_state(page)
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX,
    )
        .into_response()
}

/// HTTP basic authentication against the credentials file: only operators.
async fn require_operator(
    State(login): State<Login>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let credentials = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.split_once(':').map(|(n, p)| (n.to_owned(), p.to_owned())));
    if let Some(login_pair) = credentials {
        match login.0.admit(None, Some(login_pair)).await {
            Ok(admitted)
                if matches!(
                    admitted.identity,
                    crate::access::Identity::Named {
                        role: crate::access::Role::Operator,
                        ..
                    }
                ) =>
            {
                return next.run(request).await;
            }
            Ok(_) => {
                return (
                    StatusCode::FORBIDDEN,
                    "only operators may see the status page (watchpost device add NAME --operator)\n",
                )
                    .into_response();
            }
            Err(_) => {}
        }
    }
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"watchpost\", charset=\"UTF-8\""),
        )],
        "log in with an operator's name and secret\n",
    )
        .into_response()
}

/// The device list, one copy per second whoever asks, and when it was copied.
async fn device_list(page: &Page) -> Result<(Instant, Arc<Vec<DeviceView>>), Response> {
    let mut cached = page.devices.lock().await;
    if let Some((at, list)) = cached.as_ref() {
        if at.elapsed() < DEVICES_FRESH {
            return Ok((*at, list.clone()));
        }
    }
    // Before asking: the copy is at least as new as this, never older.
    let at = Instant::now();
    let (reply, answer) = oneshot::channel();
    let unavailable =
        || (StatusCode::SERVICE_UNAVAILABLE, "the gateway is stopping\n").into_response();
    page.control
        .send(Control::Devices { reply })
        .await
        .map_err(|_| unavailable())?;
    let mut list = answer.await.map_err(|_| unavailable())?;
    list.sort_by(|a, b| a.name.cmp(&b.name));
    let list = Arc::new(list);
    *cached = Some((at, list.clone()));
    Ok((at, list))
}

fn json<T: Serialize>(value: &T) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        serde_json::to_vec(value).unwrap_or_default(),
    )
        .into_response()
}

fn svg_response(body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// How a device list is ordered: `?sort=` of `/api/devices`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    /// Offline, then silent (stale), then online: what needs a look first.
    State,
    /// By name (the default).
    Name,
    /// By the time of the last message, oldest first.
    Seen,
    /// By battery level, lowest first; devices that report none last.
    Battery,
    /// By readings lost, most first.
    Lost,
    /// By source (`native`, or the `[[source]]`).
    Source,
}

impl SortKey {
    fn parse(s: &str) -> Option<SortKey> {
        Some(match s {
            "state" => SortKey::State,
            "name" => SortKey::Name,
            "seen" => SortKey::Seen,
            "battery" => SortKey::Battery,
            "lost" => SortKey::Lost,
            "source" => SortKey::Source,
            _ => return None,
        })
    }
}

/// What `/api/devices` was asked for: `?q=&sort=&desc=&offset=&limit=`, all optional.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceQuery {
    /// Only devices whose name contains this, ignoring case.
    pub q: String,
    /// The order; ties go by name.
    pub sort: SortKey,
    /// Reversed (`desc=1`).
    pub desc: bool,
    /// Skip this many of the ordered devices.
    pub offset: usize,
    /// At most this many (none: all).
    pub limit: Option<usize>,
}

impl DeviceQuery {
    /// Reads the query string; an unknown sort key or a number that is not one is an error.
    pub fn parse(uri: &Uri) -> Result<DeviceQuery, String> {
        let number = |key: &str| -> Result<Option<usize>, String> {
            query(uri, key)
                .map(|v| {
                    v.parse()
                        .map_err(|_| format!("{key}={v:?} is not a whole number"))
                })
                .transpose()
        };
        let sort = match query(uri, "sort") {
            None => SortKey::Name,
            Some(s) => SortKey::parse(&s).ok_or_else(|| {
                format!("sort={s:?}: one of state, name, seen, battery, lost, source")
            })?,
        };
        Ok(DeviceQuery {
            q: query(uri, "q").unwrap_or_default().to_lowercase(),
            sort,
            desc: matches!(query(uri, "desc").as_deref(), Some("1" | "true")),
            offset: number("offset")?.unwrap_or(0),
            limit: number("limit")?,
        })
    }
}

/// Counts that go with an answer of `/api/devices`, as response headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceCounts {
    /// Devices known (`Watchpost-Devices`).
    pub total: usize,
    /// Of those, offline or silent (`Watchpost-Devices-Not-Online`).
    pub not_online: usize,
    /// Devices the filter matched, before `offset` and `limit` (`Watchpost-Devices-Matching`).
    pub matching: usize,
}

/// A device's battery level: the first numeric metric whose name says `battery`.
pub fn battery(d: &DeviceView) -> Option<f64> {
    d.values.iter().find_map(|(metric, v)| match v {
        crate::value::Value::Number(n)
            if metric
                .as_bytes()
                .windows(7)
                .any(|w| w.eq_ignore_ascii_case(b"battery")) =>
        {
            Some(*n)
        }
        _ => None,
    })
}

/// 0 offline, 1 silent, 2 online (also when its presence is unknown but it is not silent).
fn state_rank(d: &DeviceView) -> u8 {
    match (d.online, d.stale) {
        (Some(false), _) => 0,
        (_, true) => 1,
        _ => 2,
    }
}

/// The devices of `list` (sorted by name) that `query` asks for, in its order.
pub fn select_devices<'a>(
    list: &'a [DeviceView],
    query: &DeviceQuery,
) -> (Vec<&'a DeviceView>, DeviceCounts) {
    use std::cmp::Ordering;
    let mut chosen: Vec<&DeviceView> = if query.q.is_empty() {
        list.iter().collect()
    } else {
        list.iter()
            .filter(|d| d.name.to_lowercase().contains(&query.q))
            .collect()
    };
    let counts = DeviceCounts {
        total: list.len(),
        not_online: list.iter().filter(|d| state_rank(d) < 2).count(),
        matching: chosen.len(),
    };
    let order: fn(&DeviceView, &DeviceView) -> Ordering = match query.sort {
        SortKey::Name => |_, _| Ordering::Equal,
        SortKey::State => |a, b| state_rank(a).cmp(&state_rank(b)),
        SortKey::Seen => |a, b| a.last_seen_ms.cmp(&b.last_seen_ms),
        SortKey::Battery => |a, b| {
            let level = |d| battery(d).unwrap_or(f64::INFINITY);
            level(a).total_cmp(&level(b))
        },
        SortKey::Lost => |a, b| b.lost.cmp(&a.lost),
        SortKey::Source => |a, b| a.source.cmp(&b.source),
    };
    // The list is in name order and the sort is stable: ties stay by name.
    chosen.sort_by(|a, b| order(a, b));
    if query.desc {
        chosen.reverse();
    }
    let chosen = chosen
        .into_iter()
        .skip(query.offset)
        .take(query.limit.unwrap_or(usize::MAX))
        .collect();
    (chosen, counts)
}

async fn devices(State(page): State<Arc<Page>>, uri: Uri) -> Response {
    let query = match DeviceQuery::parse(&uri) {
        Ok(q) => q,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    };
    let (copied, list) = match device_list(&page).await {
        Ok(list) => list,
        Err(e) => return e,
    };
    let (chosen, counts) = select_devices(&list, &query);
    let mut response = json(&chosen);
    for (name, n) in [
        ("watchpost-devices", counts.total),
        ("watchpost-devices-not-online", counts.not_online),
        ("watchpost-devices-matching", counts.matching),
        (
            "watchpost-devices-age-ms",
            copied.elapsed().as_millis() as usize,
        ),
    ] {
        response
            .headers_mut()
            .insert(name, HeaderValue::from(n as u64));
    }
    response
}

/// One alert transition of today, and whether it reached the upstream.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Transition {
    /// Alert id.
    pub id: String,
    /// `raised` or `cleared`.
    pub state: String,
    /// Severity.
    pub severity: String,
    /// Device.
    pub device: String,
    /// Rule.
    pub rule: String,
    /// When, RFC 3339.
    pub at: String,
    /// Still waiting in the outbox for the upstream's acknowledgement.
    pub in_outbox: bool,
}

/// What `/api/alerts` answers.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Alerts {
    /// Raised now, most severe first, then newest.
    pub active: Vec<AlertDoc>,
    /// Today's transitions (UTC), newest first.
    pub today: Vec<Transition>,
    /// An upstream is configured (else nothing is forwarded).
    pub upstream: bool,
}

/// Reads the alerts from the database in `data_dir`.
pub fn read_alerts(
    data_dir: &std::path::Path,
    upstream: bool,
    now: Millis,
) -> Result<Alerts, String> {
    let reader = crate::store::Reader::open(data_dir).map_err(|e| e.to_string())?;
    let mut active = reader.raised_alerts().map_err(|e| e.to_string())?;
    active.sort_by(|a, b| b.severity.cmp(&a.severity).then(b.since.cmp(&a.since)));
    let waiting = reader.outbox_ids().map_err(|e| e.to_string())?;
    let midnight = now - now % 86_400_000;
    let mut today: Vec<Transition> = reader
        .alerts(midnight)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|r| Transition {
            in_outbox: waiting.contains(&r.id),
            id: r.id,
            state: r.state,
            severity: r.severity,
            device: r.device,
            rule: r.rule,
            at: r.at,
        })
        .collect();
    today.reverse();
    Ok(Alerts {
        active,
        today,
        upstream,
    })
}

async fn alerts(State(page): State<Arc<Page>>) -> Response {
    let dir = page.data_dir.clone();
    let upstream = page.upstream;
    match tokio::task::spawn_blocking(move || read_alerts(&dir, upstream, now_millis())).await {
        Ok(Ok(alerts)) => json(&alerts),
        Ok(Err(e)) => unreadable(&e),
        Err(e) => unreadable(&e.to_string()),
    }
}

fn unreadable(e: &str) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("cannot read the database: {e}\n"),
    )
        .into_response()
}

/// The value of `key` in the query string, percent-decoded.
fn query(uri: &Uri, key: &str) -> Option<String> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// A stream's plot points: the device, metric and hours asked for, or why not.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct SeriesAnswer {
    /// Device.
    pub device: String,
    /// Metric.
    pub metric: String,
    /// \[window start in ms, min, mean, max\], oldest first.
    pub points: Vec<(Millis, f64, f64, f64)>,
}

/// Reads `metric` of `device` over the last `hours` from the database in `data_dir`.
pub fn read_series(
    data_dir: &std::path::Path,
    device: &str,
    metric: &str,
    hours: u64,
    now: Millis,
) -> Result<SeriesAnswer, String> {
    let reader = crate::store::Reader::open(data_dir).map_err(|e| e.to_string())?;
    let since = now.saturating_sub(hours.saturating_mul(3_600_000));
    let points = reader
        .rollup_points(device, metric, since)
        .map_err(|e| e.to_string())?;
    Ok(SeriesAnswer {
        device: device.to_owned(),
        metric: metric.to_owned(),
        points,
    })
}

async fn series_of(page: &Page, uri: &Uri) -> Result<SeriesAnswer, Response> {
    let (Some(device), Some(metric)) = (query(uri, "device"), query(uri, "metric")) else {
        return Err((
            StatusCode::BAD_REQUEST,
            "name the stream: ?device=NAME&metric=NAME[&hours=24]\n",
        )
            .into_response());
    };
    let hours = query(uri, "hours")
        .and_then(|h| h.parse::<u64>().ok())
        .unwrap_or(24)
        .clamp(1, 24 * 31);
    let dir = page.data_dir.clone();
    match tokio::task::spawn_blocking(move || {
        read_series(&dir, &device, &metric, hours, now_millis())
    })
    .await
    {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(unreadable(&e)),
        Err(e) => Err(unreadable(&e.to_string())),
    }
}

async fn series(State(page): State<Arc<Page>>, uri: Uri) -> Response {
    match series_of(&page, &uri).await {
        Ok(answer) => json(&answer),
        Err(e) => e,
    }
}

async fn series_svg(State(page): State<Arc<Page>>, uri: Uri) -> Response {
    let answer = match series_of(&page, &uri).await {
        Ok(answer) => answer,
        Err(e) => return e,
    };
    let line = |name: &str, class, pick: fn(&(Millis, f64, f64, f64)) -> f64| svg::Series {
        name: name.to_owned(),
        class,
        points: answer.points.iter().map(|p| (p.0, pick(p))).collect(),
    };
    svg_response(svg::plot(
        &format!("{} {}", answer.device, answer.metric),
        &answer.metric,
        &[
            line("max", "c", |p| p.3),
            line("mean", "a", |p| p.2),
            line("min", "b", |p| p.1),
        ],
    ))
}

/// What `/api/bandwidth` answers.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Bandwidth {
    /// \[ms since the epoch, bytes upstream, bytes forwarding every reading would have
    /// cost\], since start, oldest first, the last one now.
    pub points: Vec<(Millis, u64, u64)>,
    /// The share of the forward-everything bytes saved so far, in percent (`None` before
    /// any reading).
    pub saved_percent: Option<f64>,
}

fn bandwidth_now(page: &Page) -> Bandwidth {
    let mut points: Vec<(Millis, u64, u64)> = page
        .bandwidth
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .copied()
        .collect();
    let now = page.sample();
    points.push(now);
    let saved_percent = (now.2 > 0).then(|| 100.0 * (1.0 - now.1 as f64 / now.2 as f64));
    Bandwidth {
        points,
        saved_percent,
    }
}

async fn bandwidth(State(page): State<Arc<Page>>) -> Response {
    json(&bandwidth_now(&page))
}

async fn bandwidth_svg(State(page): State<Arc<Page>>) -> Response {
    let b = bandwidth_now(&page);
    let line = |name: &str, class, pick: fn(&(Millis, u64, u64)) -> u64| svg::Series {
        name: name.to_owned(),
        class,
        points: b.points.iter().map(|p| (p.0, pick(p) as f64)).collect(),
    };
    let title = match b.saved_percent {
        Some(p) => format!("bytes upstream against forwarding every reading: {p:.2} % saved"),
        None => "bytes upstream against forwarding every reading".to_owned(),
    };
    svg_response(svg::plot(
        &title,
        "bytes",
        &[
            line("forwarding every reading", "c", |p| p.2),
            line("upstream", "a", |p| p.1),
        ],
    ))
}

/// One event as the page gets it.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum PageEvent {
    /// An alert transition: its document.
    Alert {
        /// The document.
        doc: Box<AlertDoc>,
    },
    /// A device went online or offline.
    Presence {
        /// Device.
        device: String,
        /// Online now.
        online: bool,
        /// When, ms since the epoch.
        at: Millis,
    },
    /// A device reported a metric for the first time: read the device list again.
    Device {
        /// Device.
        device: String,
    },
    /// Events were missed (a slow page): read everything again.
    Reload,
}

async fn events(State(page): State<Arc<Page>>) -> impl IntoResponse {
    let stream = BroadcastStream::new(page.events.subscribe()).filter_map(|event| {
        let event = match event {
            Ok(Event::Alert(doc)) => PageEvent::Alert {
                doc: Box::new((*doc).clone()),
            },
            Ok(Event::Presence { device, online, at }) => PageEvent::Presence {
                device: device.to_string(),
                online,
                at,
            },
            Ok(Event::Stream { device, .. }) => PageEvent::Device {
                device: device.to_string(),
            },
            Ok(_) => return None,
            Err(_) => PageEvent::Reload,
        };
        Some(Ok::<_, Infallible>(
            SseEvent::default().data(serde_json::to_string(&event).unwrap_or_default()),
        ))
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[cfg(test)]
mod tests;

//! Configuration: raw serde structs that mirror the TOML file, then `compile()` into a checked
//! [`Config`] plus warnings.
//!
//! Every problem is reported as a [`Diagnostic`] with the file, line and column, what is wrong
//! and how to fix it. Compilation collects all semantic errors at once instead of stopping at
//! the first; nothing here panics on bad input.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::codec;
use crate::rules::{Rule, Severity, Threshold};
use crate::topic::TopicFilter;

/// The quickstart configuration, embedded in the binary (`config/watchpost.toml`).
pub const QUICKSTART: &str = include_str!("../../config/watchpost.toml");

/// Name under which the embedded quickstart configuration appears in diagnostics.
pub const QUICKSTART_NAME: &str = "<embedded config/watchpost.toml>";

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The gateway itself.
    pub gateway: GatewayConfig,
    /// The embedded broker that sensors connect to.
    pub broker: BrokerConfig,
    /// The upstream broker; `None` keeps every alert local.
    pub uplink: Option<UplinkConfig>,
    /// Local history in the database.
    pub history: HistoryConfig,
    /// Threshold rules, in file order.
    pub rules: Vec<Rule>,
}

/// `[gateway]`
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Site id: part of alert ids and the default upstream topic prefix.
    pub id: String,
    /// Where the SQLite database lives; created if missing.
    pub data_dir: PathBuf,
}

/// `[broker]`
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// MQTT 3.1.1 listener.
    pub listen: SocketAddr,
    /// MQTT 5 listener, if configured.
    pub listen_v5: Option<SocketAddr>,
    /// Serve clients without credentials.
    pub allow_anonymous: bool,
    /// Most client connections served at once.
    pub max_connections: usize,
    /// A client must send CONNECT within this time.
    pub connect_timeout: Duration,
    /// Decoder limits for sensor payloads.
    pub limits: codec::Limits,
}

impl BrokerConfig {
    /// Largest MQTT packet a client may send. Well above the payload limit, so that an
    /// oversized reading reaches the decoder and is counted instead of dropping the connection.
    pub fn max_packet_bytes(&self) -> usize {
        (self.limits.max_payload_bytes * 16).max(64 * 1024)
    }
}

/// `[uplink]`
#[derive(Debug, Clone)]
pub struct UplinkConfig {
    /// Upstream host name or address.
    pub host: String,
    /// Upstream port.
    pub port: u16,
    /// `mqtts://`: TLS with the system's root certificates.
    pub tls: bool,
    /// MQTT client id on the upstream broker.
    pub client_id: String,
    /// Topic prefix upstream: alerts go to `{topic_prefix}/alerts/...`.
    pub topic_prefix: String,
    /// Severities that go upstream.
    pub forward: Vec<Severity>,
    /// MQTT keep-alive towards the upstream broker. A broker that stops answering is
    /// noticed within two of these.
    pub keep_alive: Duration,
    /// Periodic summaries upstream, if configured.
    pub summaries: Option<SummaryConfig>,
}

/// `[uplink.summaries]`: one compact message per site and interval.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryConfig {
    /// How often a summary goes up.
    pub interval: Duration,
    /// Metrics summarized (site-wide count, devices, min, max, mean).
    pub metrics: Vec<String>,
}

/// `[history]`
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryConfig {
    /// Length of the rollup windows.
    pub window: Duration,
    /// Keep every raw reading this long; `None` keeps rollups only.
    pub raw_retention: Option<Duration>,
    /// Disk budget of the database in bytes; the oldest history goes first when it is reached.
    pub max_db_bytes: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            raw_retention: None,
            max_db_bytes: DEFAULT_MAX_DB_MB * 1024 * 1024,
        }
    }
}

impl UplinkConfig {
    /// True if alerts of `severity` go upstream.
    pub fn forwards(&self, severity: Severity) -> bool {
        self.forward.contains(&severity)
    }
}

/// Whether a diagnostic stops the configuration from loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The configuration cannot be used.
    Error,
    /// The configuration works but probably not as meant.
    Warning,
}

/// One problem in a configuration file, located like a compiler would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub level: Level,
    /// The file as the user named it.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub help: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.level {
            Level::Error => "error",
            Level::Warning => "warning",
        };
        write!(
            f,
            "{}:{}:{}: {level}: {}",
            self.file, self.line, self.column, self.message
        )?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// A configuration that cannot be used: every error found, in file order.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    /// The errors (never empty).
    pub errors: Vec<Diagnostic>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

/// A loaded configuration and the warnings it raised.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The checked configuration.
    pub config: Config,
    /// Problems that do not stop it from working.
    pub warnings: Vec<Diagnostic>,
}

/// Reads and compiles the file at `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let name = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|e| ConfigError {
        errors: vec![Diagnostic {
            level: Level::Error,
            file: name.clone(),
            line: 1,
            column: 1,
            message: format!("cannot read the configuration file: {e}"),
            help: Some("pass an existing file with --config, or omit --config to run the embedded quickstart".into()),
        }],
    })?;
    parse(&source, &name)
}

/// Compiles the embedded quickstart configuration.
pub fn quickstart() -> Result<Loaded, ConfigError> {
    parse(QUICKSTART, QUICKSTART_NAME)
}

/// Parses and compiles `source`; `name` is used in diagnostics.
pub fn parse(source: &str, name: &str) -> Result<Loaded, ConfigError> {
    let mut sink = Sink {
        source,
        file: name,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let raw: RawConfig = match toml::from_str(source) {
        Ok(raw) => raw,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let (message, help) = explain_toml_error(e.message());
            sink.error(span, message, help);
            return Err(ConfigError {
                errors: sink.errors,
            });
        }
    };
    let config = compile(raw, &mut sink);
    if sink.errors.is_empty() {
        Ok(Loaded {
            config,
            warnings: sink.warnings,
        })
    } else {
        Err(ConfigError {
            errors: sink.errors,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Raw shape of the file.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    gateway: RawGateway,
    #[serde(default)]
    broker: RawBroker,
    uplink: Option<RawUplink>,
    #[serde(default)]
    history: RawHistory,
    #[serde(default, rename = "rule")]
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    id: Spanned<String>,
    data_dir: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBroker {
    listen: Option<Spanned<String>>,
    listen_v5: Option<Spanned<String>>,
    allow_anonymous: Option<Spanned<bool>>,
    max_connections: Option<Spanned<usize>>,
    connect_timeout: Option<Spanned<String>>,
    max_payload_bytes: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUplink {
    url: Spanned<String>,
    client_id: Option<Spanned<String>>,
    topic_prefix: Option<Spanned<String>>,
    forward: Option<Spanned<Vec<Severity>>>,
    keep_alive: Option<Spanned<String>>,
    summaries: Option<Spanned<RawSummaries>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSummaries {
    interval: Spanned<String>,
    metrics: Spanned<Vec<Spanned<String>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHistory {
    window: Option<Spanned<String>>,
    raw_retention: Option<Spanned<String>>,
    max_db_mb: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    #[serde(rename = "match")]
    filter: Spanned<String>,
    above: Option<Spanned<f64>>,
    below: Option<Spanned<f64>>,
    clear_below: Option<Spanned<f64>>,
    clear_above: Option<Spanned<f64>>,
    #[serde(rename = "for")]
    hold: Option<Spanned<String>>,
    severity: Option<Spanned<Severity>>,
}

// ---------------------------------------------------------------------------------------------
// Compilation.

/// Default place of the database.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/watchpost";
/// Default disk budget of the database, in MiB.
pub const DEFAULT_MAX_DB_MB: u64 = 1024;
/// Default MQTT listener: loopback, so nothing is exposed until the operator says so.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:1883";

struct Sink<'a> {
    source: &'a str,
    file: &'a str,
    errors: Vec<Diagnostic>,
    warnings: Vec<Diagnostic>,
}

impl Sink<'_> {
    fn diagnostic(
        &self,
        level: Level,
        span: Range<usize>,
        message: String,
        help: Option<String>,
    ) -> Diagnostic {
        let (line, column) = line_column(self.source, span.start);
        Diagnostic {
            level,
            file: self.file.to_owned(),
            line,
            column,
            message,
            help,
        }
    }

    fn error(&mut self, span: Range<usize>, message: impl Into<String>, help: Option<String>) {
        let d = self.diagnostic(Level::Error, span, message.into(), help);
        self.errors.push(d);
    }

    fn warn(&mut self, span: Range<usize>, message: impl Into<String>, help: Option<String>) {
        let d = self.diagnostic(Level::Warning, span, message.into(), help);
        self.warnings.push(d);
    }

    fn duration(
        &mut self,
        raw: &Option<Spanned<String>>,
        field: &str,
        default: Duration,
    ) -> Duration {
        let Some(raw) = raw else { return default };
        match humantime::parse_duration(raw.get_ref().trim()) {
            Ok(d) => d,
            Err(_) => {
                self.error(
                    raw.span(),
                    format!("`{field}` is not a duration: {:?}", raw.get_ref()),
                    Some(
                        "write a number with a unit, e.g. \"500ms\", \"10s\", \"5m\", \"1h 30m\""
                            .into(),
                    ),
                );
                default
            }
        }
    }

    fn socket_addr(&mut self, raw: &Spanned<String>, field: &str) -> Option<SocketAddr> {
        match raw.get_ref().parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    raw.span(),
                    format!(
                        "`{field}` is not an address with a port: {:?}",
                        raw.get_ref()
                    ),
                    Some("write IP:PORT, e.g. \"0.0.0.0:1883\" or \"[::]:1883\"".into()),
                );
                None
            }
        }
    }
}

/// 1-based line and character column of byte `offset` in `source`.
fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(source.len());
    while !source.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// Turns the TOML library's message into a sentence and a fix.
fn explain_toml_error(message: &str) -> (String, Option<String>) {
    let message = message.trim().to_owned();
    let help = if message.starts_with("unknown field") {
        Some(
            "remove the field or correct its spelling; the expected fields are listed above".into(),
        )
    } else if message.starts_with("missing field") {
        Some("add the field; see config/watchpost.toml for a complete example".into())
    } else if message.contains("unknown variant") {
        Some("severity is one of \"info\", \"warning\", \"critical\"".into())
    } else {
        None
    };
    (message, help)
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

const NAME_HELP: &str = "use letters, digits, '-', '_' and '.' only";

fn compile(raw: RawConfig, sink: &mut Sink<'_>) -> Config {
    let id = raw.gateway.id.get_ref().clone();
    if !is_name(&id) {
        sink.error(
            raw.gateway.id.span(),
            format!("gateway id {id:?} is not a valid name"),
            Some(NAME_HELP.into()),
        );
    }
    let data_dir = match &raw.gateway.data_dir {
        Some(d) if d.get_ref().trim().is_empty() => {
            sink.error(
                d.span(),
                "`data_dir` is empty",
                Some("name a directory, e.g. \"/var/lib/watchpost\"".into()),
            );
            PathBuf::new()
        }
        Some(d) => PathBuf::from(d.get_ref()),
        None => PathBuf::from(DEFAULT_DATA_DIR),
    };
    let gateway = GatewayConfig { id, data_dir };
    let broker = compile_broker(&raw.broker, sink);
    let uplink = raw
        .uplink
        .as_ref()
        .map(|u| compile_uplink(u, &gateway.id, sink));
    let history = compile_history(&raw.history, sink);

    let mut names = HashSet::new();
    let mut rules = Vec::with_capacity(raw.rules.len());
    for raw_rule in &raw.rules {
        let name = &raw_rule.get_ref().name;
        if !names.insert(name.get_ref().as_str()) {
            sink.error(
                name.span(),
                format!("two rules are named {:?}", name.get_ref()),
                Some(
                    "rule names appear in alert topics and ids: give each rule its own name".into(),
                ),
            );
        }
        if let Some(rule) = compile_rule(raw_rule, sink) {
            rules.push(rule);
        }
    }
    if raw.rules.is_empty() {
        sink.warn(
            0..0,
            "the configuration has no [[rule]]: no alert will ever be raised",
            None,
        );
    }
    Config {
        gateway,
        broker,
        uplink,
        history,
        rules,
    }
}

fn compile_broker(raw: &RawBroker, sink: &mut Sink<'_>) -> BrokerConfig {
    let default_listen: SocketAddr = DEFAULT_LISTEN.parse().expect("constant address");
    let listen = raw
        .listen
        .as_ref()
        .and_then(|l| sink.socket_addr(l, "listen"))
        .unwrap_or(default_listen);
    let listen_v5 = raw
        .listen_v5
        .as_ref()
        .and_then(|l| sink.socket_addr(l, "listen_v5"));
    if let (Some(v5), Some(raw_v5)) = (listen_v5, &raw.listen_v5) {
        if v5 == listen && v5.port() != 0 {
            sink.error(
                raw_v5.span(),
                "`listen_v5` is the same address as `listen`",
                Some("MQTT 5 needs a port of its own, e.g. 1884".into()),
            );
        }
    }
    let allow_anonymous = raw.allow_anonymous.as_ref().is_some_and(|a| *a.get_ref());
    if let Some(a) = raw.allow_anonymous.as_ref().filter(|a| *a.get_ref()) {
        let exposed = [Some(listen), listen_v5]
            .into_iter()
            .flatten()
            .any(|l| !l.ip().is_loopback());
        if exposed {
            sink.warn(
                a.span(),
                "anonymous clients are allowed on a listener that is not loopback: anyone on the network can publish readings",
                Some("use this only on a trusted network".into()),
            );
        }
    }
    let max_connections = match &raw.max_connections {
        Some(m) if *m.get_ref() == 0 => {
            sink.error(m.span(), "`max_connections` must be at least 1", None);
            1
        }
        Some(m) => *m.get_ref(),
        None => 10_000,
    };
    let max_payload_bytes = match &raw.max_payload_bytes {
        Some(m) if *m.get_ref() < 16 || *m.get_ref() > 1024 * 1024 => {
            sink.error(
                m.span(),
                "`max_payload_bytes` must be between 16 and 1048576",
                None,
            );
            codec::Limits::default().max_payload_bytes
        }
        Some(m) => *m.get_ref(),
        None => codec::Limits::default().max_payload_bytes,
    };
    let connect_timeout = sink.duration(
        &raw.connect_timeout,
        "connect_timeout",
        Duration::from_secs(5),
    );
    BrokerConfig {
        listen,
        listen_v5,
        allow_anonymous,
        max_connections,
        connect_timeout,
        limits: codec::Limits { max_payload_bytes },
    }
}

fn compile_uplink(raw: &RawUplink, gateway_id: &str, sink: &mut Sink<'_>) -> UplinkConfig {
    let (tls, host, port) = match parse_url(raw.url.get_ref()) {
        Ok(parts) => parts,
        Err(why) => {
            sink.error(
                raw.url.span(),
                format!("`url` {:?} is not a broker URL: {why}", raw.url.get_ref()),
                Some("write mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS)".into()),
            );
            (false, String::new(), 0)
        }
    };
    let client_id = match &raw.client_id {
        Some(c) if !is_name(c.get_ref()) => {
            sink.error(
                c.span(),
                format!("client id {:?} is not a valid name", c.get_ref()),
                Some(NAME_HELP.into()),
            );
            String::new()
        }
        Some(c) => c.get_ref().clone(),
        None => format!("watchpost-{gateway_id}"),
    };
    let topic_prefix = match &raw.topic_prefix {
        Some(p) => {
            let prefix = p.get_ref().trim_end_matches('/').to_owned();
            if prefix.is_empty() || prefix.contains(['+', '#', '\0']) || prefix.starts_with('/') {
                sink.error(
                    p.span(),
                    format!("topic prefix {:?} is not usable", p.get_ref()),
                    Some(
                        "use one or more plain topic levels without wildcards, e.g. \"site-17\""
                            .into(),
                    ),
                );
            }
            prefix
        }
        None => gateway_id.to_owned(),
    };
    let forward = match &raw.forward {
        Some(f) => {
            if f.get_ref().is_empty() {
                sink.warn(
                    f.span(),
                    "`forward` is empty: no alert will go upstream",
                    None,
                );
            }
            f.get_ref().clone()
        }
        None => vec![Severity::Critical],
    };
    let keep_alive = sink.duration(&raw.keep_alive, "keep_alive", Duration::from_secs(30));
    if let Some(k) = &raw.keep_alive {
        if keep_alive < Duration::from_secs(1)
            || keep_alive > Duration::from_secs(65535)
            || keep_alive.subsec_nanos() != 0
        {
            sink.error(
                k.span(),
                "`keep_alive` must be whole seconds between 1s and 18h",
                None,
            );
        }
    }
    let summaries = raw.summaries.as_ref().map(|s| compile_summaries(s, sink));
    UplinkConfig {
        host,
        port,
        tls,
        client_id,
        topic_prefix,
        forward,
        keep_alive,
        summaries,
    }
}

fn compile_summaries(raw: &Spanned<RawSummaries>, sink: &mut Sink<'_>) -> SummaryConfig {
    let r = raw.get_ref();
    let interval = sink.duration(
        &Some(r.interval.clone()),
        "interval",
        Duration::from_secs(900),
    );
    if interval < Duration::from_secs(1) {
        sink.error(
            r.interval.span(),
            "summary `interval` must be at least 1s",
            Some("e.g. \"15m\"".into()),
        );
    }
    let mut metrics = Vec::new();
    for m in r.metrics.get_ref() {
        let name = m.get_ref();
        if name.is_empty()
            || name.contains(['/', '+', '#'])
            || name == crate::codec::SEQ_KEY
            || name == crate::codec::STATUS_METRIC
        {
            sink.error(
                m.span(),
                format!("{name:?} is not a metric name"),
                Some("name a metric as it appears in sensors/{device}/{metric}".into()),
            );
        } else if metrics.contains(name) {
            sink.warn(m.span(), format!("metric {name:?} is listed twice"), None);
        } else {
            metrics.push(name.clone());
        }
    }
    if r.metrics.get_ref().is_empty() {
        sink.warn(
            r.metrics.span(),
            "`metrics` is empty: summaries will carry nothing",
            Some("name the metrics to summarize, e.g. [\"temperature\"]".into()),
        );
    }
    SummaryConfig { interval, metrics }
}

fn compile_history(raw: &RawHistory, sink: &mut Sink<'_>) -> HistoryConfig {
    let defaults = HistoryConfig::default();
    let window = sink.duration(&raw.window, "window", defaults.window);
    if let Some(w) = &raw.window {
        if window < Duration::from_secs(1) {
            sink.error(w.span(), "the rollup `window` must be at least 1s", None);
        }
    }
    // "0s" switches raw history off, like leaving it out.
    let raw_retention = raw
        .raw_retention
        .as_ref()
        .map(|r| sink.duration(&Some(r.clone()), "raw_retention", Duration::ZERO))
        .filter(|d| !d.is_zero());
    let max_db_bytes = match &raw.max_db_mb {
        Some(m) if *m.get_ref() < 1 => {
            sink.error(m.span(), "`max_db_mb` must be at least 1", None);
            defaults.max_db_bytes
        }
        Some(m) => m.get_ref().saturating_mul(1024 * 1024),
        None => defaults.max_db_bytes,
    };
    HistoryConfig {
        window,
        raw_retention,
        max_db_bytes,
    }
}

/// Splits `mqtt[s]://host[:port][/]` into (tls, host, port).
fn parse_url(url: &str) -> Result<(bool, String, u16), String> {
    let (scheme, rest) = url.split_once("://").ok_or("it has no scheme")?;
    let tls = match scheme {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
        other => return Err(format!("unknown scheme {other:?}")),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '@']) {
        return Err("paths, queries and credentials do not belong in the URL".into());
    }
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("unclosed '[' in IPv6 address")?;
        match after.strip_prefix(':') {
            Some(p) => (host, p),
            None if after.is_empty() => (host, ""),
            None => return Err("unexpected text after the IPv6 address".into()),
        }
    } else {
        rest.split_once(':').unwrap_or((rest, ""))
    };
    if host.is_empty() {
        return Err("it has no host".into());
    }
    let port = if port.is_empty() {
        default_port
    } else {
        port.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {port:?} is not a number from 1 to 65535"))?
    };
    Ok((tls, host.to_owned(), port))
}

fn compile_rule(raw: &Spanned<RawRule>, sink: &mut Sink<'_>) -> Option<Rule> {
    let span = raw.span();
    let raw = raw.get_ref();
    let errors_before = sink.errors.len();
    let name = raw.name.get_ref().clone();
    if !is_name(&name) {
        sink.error(
            raw.name.span(),
            format!("rule name {name:?} is not a valid name"),
            Some(NAME_HELP.into()),
        );
    }
    let filter = match TopicFilter::new(raw.filter.get_ref()) {
        Ok(f) => {
            if !f.can_match_pattern("sensors/+/+") {
                sink.error(
                    raw.filter.span(),
                    format!("`match` filter {:?} can never match a reading topic", raw.filter.get_ref()),
                    Some("readings arrive as sensors/{device}/{metric}; e.g. \"sensors/+/temperature\"".into()),
                );
            }
            Some(f)
        }
        Err(e) => {
            sink.error(
                raw.filter.span(),
                format!("`match` is not an MQTT topic filter: {e}"),
                None,
            );
            None
        }
    };
    let get = |v: &Option<Spanned<f64>>| v.as_ref().map(|s| *s.get_ref());
    for (field, value) in [
        ("above", &raw.above),
        ("below", &raw.below),
        ("clear_below", &raw.clear_below),
        ("clear_above", &raw.clear_above),
    ] {
        if let Some(v) = value.as_ref().filter(|v| !v.get_ref().is_finite()) {
            sink.error(v.span(), format!("`{field}` must be a finite number"), None);
        }
    }
    let threshold = Threshold {
        above: get(&raw.above),
        below: get(&raw.below),
        clear_below: get(&raw.clear_below),
        clear_above: get(&raw.clear_above),
    };
    match (threshold.above, threshold.below) {
        (None, None) => sink.error(
            span.clone(),
            format!("rule {name:?} has neither `above` nor `below`"),
            Some(
                "add `above = 90.0` (fires when greater) or `below = 5.0` (fires when less)".into(),
            ),
        ),
        (Some(a), Some(b)) if b >= a => sink.error(
            raw.below.as_ref().map_or(span.clone(), |b| b.span()),
            format!("`below` ({b}) must be less than `above` ({a}), or every value fires"),
            None,
        ),
        _ => {}
    }
    if let Some(c) = &raw.clear_below {
        match threshold.above {
            None => sink.error(
                c.span(),
                "`clear_below` needs `above`",
                Some("hysteresis for a `below` rule is `clear_above`".into()),
            ),
            Some(a) if *c.get_ref() > a => sink.error(
                c.span(),
                format!(
                    "inverted hysteresis band: `clear_below` ({}) is greater than `above` ({a})",
                    c.get_ref()
                ),
                Some(format!(
                    "`clear_below` must be at most {a}, e.g. {}",
                    a - (a.abs() * 0.05).max(1.0)
                )),
            ),
            _ => {}
        }
    }
    if let Some(c) = &raw.clear_above {
        match threshold.below {
            None => sink.error(
                c.span(),
                "`clear_above` needs `below`",
                Some("hysteresis for an `above` rule is `clear_below`".into()),
            ),
            Some(b) if *c.get_ref() < b => sink.error(
                c.span(),
                format!(
                    "inverted hysteresis band: `clear_above` ({}) is less than `below` ({b})",
                    c.get_ref()
                ),
                Some(format!("`clear_above` must be at least {b}")),
            ),
            _ => {}
        }
    }
    if let (Some(a), Some(b)) = (threshold.above, threshold.below) {
        let high = threshold.clear_below.unwrap_or(a);
        let low = threshold.clear_above.unwrap_or(b);
        if low >= high {
            sink.error(
                span.clone(),
                "the hysteresis bands overlap: no value would clear the alert",
                Some("keep clear_above below clear_below".into()),
            );
        }
    }
    let hold = sink.duration(&raw.hold, "for", Duration::ZERO);
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
        threshold,
        hold,
        severity,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[gateway]\nid = \"site-1\"\n";

    fn errors(src: &str) -> Vec<String> {
        match parse(src, "t.toml") {
            Ok(_) => vec![],
            Err(e) => e
                .errors
                .iter()
                .map(|d| format!("{}:{} {}", d.line, d.column, d.message))
                .collect(),
        }
    }

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let loaded = parse(MINIMAL, "t.toml").unwrap();
        let c = loaded.config;
        assert_eq!(c.broker.listen, DEFAULT_LISTEN.parse().unwrap());
        assert!(!c.broker.allow_anonymous);
        assert!(c.uplink.is_none());
        assert_eq!(c.gateway.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(loaded.warnings.len(), 1, "no rules warns");
    }

    #[test]
    fn full_rule_compiles() {
        let src = format!(
            "{MINIMAL}[uplink]\nurl = \"mqtts://broker.example.net\"\nforward = [\"critical\", \"warning\"]\n\
             [[rule]]\nname = \"overheat\"\nmatch = \"sensors/+/temperature\"\nabove = 90\nclear_below = 85.0\n\
             for = \"10s\"\nseverity = \"critical\"\n"
        );
        let c = parse(&src, "t.toml").unwrap().config;
        let u = c.uplink.unwrap();
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.topic_prefix.as_str()),
            (true, "broker.example.net", 8883, "site-1")
        );
        assert!(u.forwards(Severity::Warning) && !u.forwards(Severity::Info));
        let r = &c.rules[0];
        assert_eq!(r.threshold.above, Some(90.0));
        assert_eq!(r.hold, Duration::from_secs(10));
        assert_eq!(r.severity, Severity::Critical);
    }

    #[test]
    fn every_semantic_error_is_reported_with_its_position() {
        let src = format!(
            "{MINIMAL}\
             [[rule]]\nname = \"a\"\nmatch = \"alerts/#\"\nabove = 1.0\n\
             [[rule]]\nname = \"b\"\nmatch = \"sensors/+/t\"\nabove = 90.0\nclear_below = 95.0\n\
             [[rule]]\nname = \"b\"\nmatch = \"sensors/+/t\"\nbelow = 1.0\nfor = \"soon\"\n"
        );
        assert_eq!(
            errors(&src),
            [
                "5:9 `match` filter \"alerts/#\" can never match a reading topic",
                "11:15 inverted hysteresis band: `clear_below` (95) is greater than `above` (90)",
                "13:8 two rules are named \"b\"",
                "16:7 `for` is not a duration: \"soon\"",
            ]
        );
    }

    #[test]
    fn unknown_field_points_at_the_field() {
        let src =
            format!("{MINIMAL}[broker]\nlisten = \"127.0.0.1:1883\"\nallow_anonymus = true\n");
        let e = parse(&src, "t.toml").unwrap_err();
        let d = &e.errors[0];
        assert_eq!((d.line, d.column), (5, 1));
        assert!(
            d.message.contains("unknown field `allow_anonymus`"),
            "{}",
            d.message
        );
    }

    #[test]
    fn urls() {
        let cases = [
            ("mqtt://h", Ok((false, "h".to_owned(), 1883))),
            ("mqtts://h:9", Ok((true, "h".to_owned(), 9))),
            ("mqtt://[::1]:1884/", Ok((false, "::1".to_owned(), 1884))),
            ("http://h", Err("unknown scheme \"http\"".to_owned())),
            (
                "mqtt://h:0",
                Err("port \"0\" is not a number from 1 to 65535".to_owned()),
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(parse_url(url), expected, "{url}");
        }
    }

    #[test]
    fn line_and_column_count_characters() {
        assert_eq!(line_column("ab\ncé\nx", 6), (2, 3));
        assert_eq!(line_column("", 10), (1, 1));
    }
}

//! Configuration: raw serde structs that mirror the TOML file, then `compile()` into a checked
//! [`Config`] plus warnings.
//!
//! Every problem is reported as a [`Diagnostic`] with the file, line and column, what is wrong
//! and how to fix it. Compilation collects all semantic errors at once instead of stopping at
//! the first; nothing here panics on bad input.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::IntoDeserializer;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::codec;
use crate::rules::{Kind, Rule, Scope, Severity, SilenceAfter, Threshold};
use crate::sources::{Payload, Source};
use crate::topic::TopicFilter;

/// The quickstart configuration, embedded in the binary (`config/watchpost.toml`).
pub const QUICKSTART: &str = include_str!("../../../config/watchpost.toml");

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
    /// The HTTP endpoint.
    pub http: HttpConfig,
    /// Rules, in file order.
    pub rules: Vec<Rule>,
    /// Foreign topic layouts mapped onto readings.
    pub sources: Vec<Source>,
}

/// `[gateway]`
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    /// Site id: part of alert ids and the default upstream topic prefix.
    pub id: String,
    /// Where the SQLite database lives; created if missing.
    pub data_dir: PathBuf,
    /// Reload the rules when the configuration file changes (besides on SIGHUP).
    pub watch_config: bool,
    /// Log filter (`info`, `debug`, or per module: `info,watchpost::ingest=debug`); the
    /// `RUST_LOG` environment variable overrides it.
    pub log: String,
    /// A device not heard from for this long counts as stale.
    pub stale_after: Duration,
}

/// `[http]`: metrics, health and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Where the endpoint listens; `None` switches it off.
    pub listen: Option<SocketAddr>,
}

/// Default HTTP endpoint: loopback only.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9183";

/// `[broker]`
#[derive(Debug, Clone, PartialEq)]
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
    /// The credentials file (devices and operators with hashed secrets).
    pub credentials: PathBuf,
    /// Most publishes per second per device (anonymous: per connection); 0 for no limit.
    pub max_publish_rate: u32,
    /// The TLS listener, if configured.
    pub tls: Option<TlsListener>,
}

/// `[broker.tls]`: MQTT 3.1.1 over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsListener {
    /// Address.
    pub listen: SocketAddr,
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
    /// If set, clients must present a certificate signed by this CA (PEM); its common name
    /// is then the client's identity.
    pub client_ca: Option<PathBuf>,
}

/// A secret from the configuration: never printed, not even in debug output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl BrokerConfig {
    /// Largest MQTT packet a client may send. Well above the payload limit, so that an
    /// oversized reading reaches the decoder and is counted instead of dropping the connection.
    pub fn max_packet_bytes(&self) -> usize {
        (self.limits.max_payload_bytes * 16).max(64 * 1024)
    }
}

/// `[uplink]`
#[derive(Debug, Clone, PartialEq)]
pub struct UplinkConfig {
    /// Upstream host name or address.
    pub host: String,
    /// Upstream port.
    pub port: u16,
    /// `mqtts://`: TLS, with the system's root certificates unless `ca_file` names a CA.
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
    /// With `mqtts://`: the CA to trust (PEM) instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// With `mqtts://`: a client certificate chain and its key (PEM), e.g. for AWS IoT Core.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Username and password on the upstream broker.
    pub login: Option<(String, Secret)>,
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
    let (root, syntax) = DeTable::parse_recoverable(source);
    for e in &syntax {
        let (message, help) = explain_toml_error(e.message());
        sink.error(e.span().unwrap_or(0..0), message, help);
    }
    if sink.errors.is_empty() {
        // Each section (and each rule and source) is read on its own, so that one mistake
        // does not hide the next: every error is reported at once.
        let root = root.into_inner();
        check_keys(&root, TOP_LEVEL, "the top level", &mut sink);
        let gateway = match root.get("gateway") {
            Some(v) => section::<RawGateway>(v, "[gateway]", &mut sink),
            None => {
                sink.error(
                    0..0,
                    "the configuration has no [gateway] table",
                    Some("add [gateway] with at least id = \"my-site\"".into()),
                );
                None
            }
        };
        let raw = Raw {
            broker: root
                .get("broker")
                .and_then(|v| section(v, "[broker]", &mut sink))
                .unwrap_or_default(),
            uplink: root
                .get("uplink")
                .and_then(|v| section(v, "[uplink]", &mut sink)),
            history: root
                .get("history")
                .and_then(|v| section(v, "[history]", &mut sink))
                .unwrap_or_default(),
            http: root
                .get("http")
                .and_then(|v| section(v, "[http]", &mut sink))
                .unwrap_or_default(),
            rules: array(root.get("rule"), "[[rule]]", &mut sink),
            sources: array(root.get("source"), "[[source]]", &mut sink),
        };
        if let Some(gateway) = gateway {
            let config = compile(gateway, raw, &mut sink);
            if sink.errors.is_empty() {
                sink.warnings.sort_by_key(|d| (d.line, d.column));
                return Ok(Loaded {
                    config,
                    warnings: sink.warnings,
                });
            }
        }
    }
    sink.errors.sort_by_key(|d| (d.line, d.column));
    Err(ConfigError {
        errors: sink.errors,
    })
}

/// Top-level keys of the file.
const TOP_LEVEL: &[&str] = &[
    "gateway", "broker", "uplink", "history", "http", "rule", "source",
];

/// The sections of the file, read independently.
struct Raw {
    broker: RawBroker,
    uplink: Option<RawUplink>,
    history: RawHistory,
    http: RawHttp,
    rules: Vec<(Range<usize>, RawRule)>,
    sources: Vec<(Range<usize>, RawSource)>,
}

/// Reports every key of `table` not in `known`, with a suggestion if one is close.
fn check_keys(table: &DeTable<'_>, known: &[&str], what: &str, sink: &mut Sink<'_>) {
    for (key, _) in table.iter() {
        let k: &str = key.get_ref();
        if !known.contains(&k) {
            let help = match closest(k, known) {
                Some(near) => format!(
                    "did you mean `{near}`? The fields here are: {}",
                    known.join(", ")
                ),
                None => format!("the fields here are: {}", known.join(", ")),
            };
            sink.error(
                key.span(),
                format!("unknown field `{k}` in {what}"),
                Some(help),
            );
        }
    }
}

/// The known name nearest to `key` (by edit distance), if it is near enough to be a typo.
fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = if ca == *cb { prev } else { prev + 1 };
            prev = row[j + 1];
            row[j + 1] = cost.min(row[j] + 1).min(prev + 1);
        }
    }
    row[b.len()]
}

/// The field names serde's derive gives a struct, found by asking it to deserialize from a
/// probe that only records them.
fn fields_of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    use serde::de::value::Error;
    struct Probe<'a>(&'a std::cell::Cell<&'static [&'static str]>);
    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Error> {
            Err(serde::de::Error::custom("probe"))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Error> {
            self.0.set(fields);
            Err(serde::de::Error::custom("probe"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let cell = std::cell::Cell::new(&[][..]);
    let _ = T::deserialize(Probe(&cell));
    cell.get()
}

/// Reads one table into `T`: unknown keys are reported (all of them) and left out, then the
/// rest is deserialized; a type error is reported where it is.
fn section<'de, T: Deserialize<'de>>(
    value: &Spanned<DeValue<'de>>,
    what: &str,
    sink: &mut Sink<'_>,
) -> Option<T> {
    let Some(table) = value.get_ref().as_table() else {
        sink.error(value.span(), format!("{what} must be a table"), None);
        return None;
    };
    let fields = fields_of::<T>();
    check_keys(table, fields, what, sink);
    let mut known = table.clone();
    let unknown: Vec<String> = table
        .iter()
        .map(|(k, _)| k.get_ref().to_string())
        .filter(|k| !fields.contains(&k.as_str()))
        .collect();
    for key in &unknown {
        known.remove(key.as_str());
    }
    match T::deserialize(Spanned::new(value.span(), DeValue::Table(known)).into_deserializer()) {
        Ok(t) => Some(t),
        Err(e) => {
            let (message, help) = explain_toml_error(e.message());
            sink.error(
                e.span().unwrap_or(value.span()),
                format!("in {what}: {message}"),
                help,
            );
            None
        }
    }
}

/// Reads an array of tables (`[[rule]]`), each on its own; returns each with its span.
fn array<'de, T: Deserialize<'de>>(
    value: Option<&Spanned<DeValue<'de>>>,
    what: &str,
    sink: &mut Sink<'_>,
) -> Vec<(Range<usize>, T)> {
    let Some(value) = value else {
        return Vec::new();
    };
    let Some(items) = value.get_ref().as_array() else {
        sink.error(
            value.span(),
            format!(
                "{what} must be an array of tables: write [[{}]]",
                what.trim_matches(['[', ']'])
            ),
            None,
        );
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| section(item, what, sink).map(|t| (item.span(), t)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Raw shape of the file.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    id: Spanned<String>,
    data_dir: Option<Spanned<String>>,
    watch_config: Option<bool>,
    log: Option<Spanned<String>>,
    stale_after: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<Spanned<String>>,
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
    credentials: Option<Spanned<String>>,
    max_publish_rate: Option<Spanned<u32>>,
    max_metrics_per_device: Option<Spanned<usize>>,
    tls: Option<Spanned<RawTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    listen: Spanned<String>,
    cert: Spanned<String>,
    key: Spanned<String>,
    client_ca: Option<Spanned<String>>,
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
    ca_file: Option<Spanned<String>>,
    client_cert: Option<Spanned<String>>,
    client_key: Option<Spanned<String>>,
    username: Option<Spanned<String>>,
    password: Option<Spanned<String>>,
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
    filter: Option<Spanned<String>>,
    kind: Option<Spanned<String>>,
    above: Option<Spanned<f64>>,
    below: Option<Spanned<f64>>,
    clear_below: Option<Spanned<f64>>,
    clear_above: Option<Spanned<f64>>,
    rate_above: Option<Spanned<f64>>,
    rate_below: Option<Spanned<f64>>,
    rate_per: Option<Spanned<String>>,
    deviation_above: Option<Spanned<f64>>,
    clear_within: Option<Spanned<f64>>,
    window: Option<Spanned<String>>,
    min_samples: Option<Spanned<u32>>,
    silent_for: Option<Spanned<String>>,
    silent_factor: Option<Spanned<f64>>,
    scope: Option<Spanned<String>>,
    offline_for: Option<Spanned<String>>,
    #[serde(rename = "for")]
    hold: Option<Spanned<String>>,
    severity: Option<Spanned<Severity>>,
    renotify: Option<Spanned<String>>,
    cooldown: Option<Spanned<String>>,
    forward: Option<Spanned<bool>>,
    labels: Option<Spanned<BTreeMap<String, String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    name: Spanned<String>,
    topic: Spanned<String>,
    payload: Spanned<String>,
    metrics: Option<Spanned<BTreeMap<String, String>>>,
    metric: Option<Spanned<String>>,
}

// ---------------------------------------------------------------------------------------------
// Compilation.

/// Default log filter: Watchpost at info, the embedded broker and MQTT client only when
/// something is wrong.
pub const DEFAULT_LOG: &str = "info,rumqttd=warn,rumqttc=warn";

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

fn compile(raw_gateway: RawGateway, raw: Raw, sink: &mut Sink<'_>) -> Config {
    let id = raw_gateway.id.get_ref().clone();
    if !is_name(&id) {
        sink.error(
            raw_gateway.id.span(),
            format!("gateway id {id:?} is not a valid name"),
            Some(NAME_HELP.into()),
        );
    }
    let data_dir = match &raw_gateway.data_dir {
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
    let log = match &raw_gateway.log {
        Some(l) => {
            if let Err(e) = tracing_subscriber::EnvFilter::try_new(l.get_ref()) {
                sink.error(
                    l.span(),
                    format!("`log` is not a log filter: {e}"),
                    Some("e.g. \"info\", \"debug\" or \"info,watchpost::ingest=debug\"".into()),
                );
            }
            l.get_ref().clone()
        }
        None => DEFAULT_LOG.to_owned(),
    };
    let stale_after = sink.duration(
        &raw_gateway.stale_after,
        "stale_after",
        Duration::from_secs(600),
    );
    let gateway = GatewayConfig {
        id,
        data_dir,
        watch_config: raw_gateway.watch_config.unwrap_or(false),
        log,
        stale_after,
    };
    let http = HttpConfig {
        listen: match &raw.http.listen {
            Some(l) if l.get_ref() == "off" => None,
            Some(l) => sink.socket_addr(l, "listen"),
            None => DEFAULT_HTTP_LISTEN.parse().ok(),
        },
    };
    if let (Some(addr), Some(l)) = (http.listen, &raw.http.listen) {
        if !addr.ip().is_loopback() {
            sink.warn(l.span(), "the HTTP endpoint listens beyond loopback: metrics and status are readable by anyone who can reach it", None);
        }
    }
    let broker = compile_broker(&raw.broker, &gateway.data_dir, sink);
    let uplink = raw
        .uplink
        .as_ref()
        .map(|u| compile_uplink(u, &gateway.id, sink));
    let history = compile_history(&raw.history, sink);

    let mut names = HashSet::new();
    let mut rules = Vec::with_capacity(raw.rules.len());
    for (span, raw_rule) in &raw.rules {
        let name = &raw_rule.name;
        if !names.insert(name.get_ref().as_str()) {
            sink.error(
                name.span(),
                format!("two rules are named {:?}", name.get_ref()),
                Some(
                    "rule names appear in alert topics and ids: give each rule its own name".into(),
                ),
            );
        }
        if let Some(rule) = compile_rule(span.clone(), raw_rule, sink) {
            if rule.forward == Some(true) && uplink.is_none() {
                sink.warn(
                    raw_rule.forward.as_ref().map_or(span.clone(), |f| f.span()),
                    format!(
                        "rule {:?} asks to forward, but there is no [uplink]",
                        rule.name
                    ),
                    None,
                );
            }
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
    let mut source_names = HashSet::new();
    let mut sources = Vec::new();
    for (_, raw_source) in &raw.sources {
        if !source_names.insert(raw_source.name.get_ref().as_str()) {
            sink.error(
                raw_source.name.span(),
                format!("two sources are named {:?}", raw_source.name.get_ref()),
                None,
            );
        }
        if let Some(source) = compile_source(raw_source, sink) {
            sources.push(source);
        }
    }
    Config {
        gateway,
        broker,
        uplink,
        history,
        http,
        rules,
        sources,
    }
}

fn compile_source(raw: &RawSource, sink: &mut Sink<'_>) -> Option<Source> {
    let errors_before = sink.errors.len();
    let name = raw.name.get_ref();
    if !is_name(name) {
        sink.error(
            raw.name.span(),
            format!("source name {name:?} is not a valid name"),
            Some(NAME_HELP.into()),
        );
    }
    let payload = match raw.payload.get_ref().as_str() {
        "number" => Some(Payload::Number),
        "json" => Some(Payload::Json),
        other => {
            sink.error(raw.payload.span(), format!("unknown payload {other:?}"), Some("payload is \"number\" (a plain number) or \"json\" (numeric fields of a JSON object)".into()));
            None
        }
    };
    let metric_ok = |m: &str| crate::codec::check_metric_name(m).is_ok();
    if let Some(map) = &raw.metrics {
        for (path, metric) in map.get_ref() {
            if !metric_ok(metric) {
                sink.error(
                    map.span(),
                    format!("{metric:?} (for {path:?}) is not a usable metric name"),
                    Some(
                        "metric names cannot be empty, contain '/', '+', '#', or be seq or status"
                            .into(),
                    ),
                );
            }
        }
    }
    if let Some(m) = raw.metric.as_ref().filter(|m| !metric_ok(m.get_ref())) {
        sink.error(
            m.span(),
            format!("{:?} is not a usable metric name", m.get_ref()),
            None,
        );
    }
    let metrics = raw.metrics.as_ref().map(|m| m.get_ref().clone());
    let metric = raw.metric.as_ref().map(|m| m.get_ref().clone());
    let source = match Source::new(
        name,
        raw.topic.get_ref(),
        payload.unwrap_or(Payload::Number),
        metrics,
        metric,
    ) {
        Ok(s) => s,
        Err(e) => {
            sink.error(
                raw.topic.span(),
                format!("`topic` {:?}: {e}", raw.topic.get_ref()),
                Some("e.g. \"tele/{device}/SENSOR\" or \"{device}/sensor/{metric}/state\"".into()),
            );
            return None;
        }
    };
    match (
        payload,
        source.has_metric_level(),
        &raw.metric,
        &raw.metrics,
    ) {
        (Some(Payload::Number), false, None, _) => sink.error(
            raw.topic.span(),
            "a number payload needs the metric: put {metric} in the topic or set `metric`",
            None,
        ),
        (Some(Payload::Json), true, _, _) => sink.error(
            raw.topic.span(),
            "a JSON payload names its metrics by its fields: remove {metric} from the topic",
            Some(
                "use `metrics = { \"path.in.payload\" = \"metric\" }` to choose and rename fields"
                    .into(),
            ),
        ),
        (Some(Payload::Number), _, _, Some(m)) => sink.error(
            m.span(),
            "`metrics` maps JSON fields; a number payload has none",
            None,
        ),
        _ => {}
    }
    (sink.errors.len() == errors_before).then_some(source)
}

fn compile_broker(raw: &RawBroker, data_dir: &Path, sink: &mut Sink<'_>) -> BrokerConfig {
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
    let credentials = raw.credentials.as_ref().map_or_else(
        || data_dir.join(CREDENTIALS_FILE),
        |c| PathBuf::from(c.get_ref()),
    );
    let max_publish_rate = raw
        .max_publish_rate
        .as_ref()
        .map_or(DEFAULT_MAX_PUBLISH_RATE, |r| *r.get_ref());
    let max_metrics_per_device = match &raw.max_metrics_per_device {
        Some(m) if *m.get_ref() == 0 => {
            sink.error(
                m.span(),
                "`max_metrics_per_device` must be at least 1",
                None,
            );
            1
        }
        Some(m) => *m.get_ref(),
        None => 256,
    };
    let plain = [Some(listen), listen_v5];
    let tls = raw.tls.as_ref().and_then(|t| {
        let r = t.get_ref();
        let tls_listen = sink.socket_addr(&r.listen, "listen")?;
        for (field, path) in [
            ("cert", Some(&r.cert)),
            ("key", Some(&r.key)),
            ("client_ca", r.client_ca.as_ref()),
        ] {
            if let Some(p) = path.filter(|p| !Path::new(p.get_ref()).is_file()) {
                sink.error(
                    p.span(),
                    format!("`{field}` file {:?} does not exist", p.get_ref()),
                    Some("give the path of a PEM file".into()),
                );
            }
        }
        if plain.contains(&Some(tls_listen)) && tls_listen.port() != 0 {
            sink.error(
                r.listen.span(),
                "the TLS listener needs a port of its own, e.g. 8883",
                None,
            );
        }
        Some(TlsListener {
            listen: tls_listen,
            cert: PathBuf::from(r.cert.get_ref()),
            key: PathBuf::from(r.key.get_ref()),
            client_ca: r.client_ca.as_ref().map(|c| PathBuf::from(c.get_ref())),
        })
    });
    if let Some(a) = raw.allow_anonymous.as_ref().filter(|a| *a.get_ref()) {
        let exposed = [Some(listen), listen_v5, tls.as_ref().map(|t| t.listen)]
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
    BrokerConfig {
        listen,
        listen_v5,
        allow_anonymous,
        max_connections,
        connect_timeout,
        limits: codec::Limits {
            max_payload_bytes,
            max_metrics_per_device,
        },
        credentials,
        max_publish_rate,
        tls,
    }
}

/// File name of the credentials file inside the data directory, by default.
pub const CREDENTIALS_FILE: &str = "credentials.toml";

/// Default limit of publishes per second and device.
pub const DEFAULT_MAX_PUBLISH_RATE: u32 = 500;

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
    let file = |sink: &mut Sink<'_>, field: &str, v: &Option<Spanned<String>>| {
        let v = v.as_ref()?;
        if !tls {
            sink.error(
                v.span(),
                format!("`{field}` needs a TLS uplink"),
                Some("use an mqtts:// url".into()),
            );
        } else if !Path::new(v.get_ref()).is_file() {
            sink.error(
                v.span(),
                format!("`{field}` file {:?} does not exist", v.get_ref()),
                Some("give the path of a PEM file".into()),
            );
        }
        Some(PathBuf::from(v.get_ref()))
    };
    let ca_file = file(sink, "ca_file", &raw.ca_file);
    let client_cert = match (
        file(sink, "client_cert", &raw.client_cert),
        file(sink, "client_key", &raw.client_key),
    ) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (c, _) => {
            let (present, missing) = if c.is_some() {
                (&raw.client_cert, "client_key")
            } else {
                (&raw.client_key, "client_cert")
            };
            sink.error(present.as_ref().map_or(0..0, |p| p.span()), format!("a client certificate needs both `client_cert` and `client_key`: add `{missing}`"), None);
            None
        }
    };
    let login = match (&raw.username, &raw.password) {
        (Some(u), Some(p)) => Some((u.get_ref().clone(), Secret(p.get_ref().clone()))),
        (Some(u), None) => Some((u.get_ref().clone(), Secret(String::new()))),
        (None, Some(p)) => {
            sink.error(p.span(), "`password` needs `username`", None);
            None
        }
        (None, None) => None,
    };
    if login.is_some() && !tls {
        sink.warn(
            raw.username.as_ref().map_or(0..0, |u| u.span()),
            "the upstream password would travel in the clear over mqtt://",
            Some("use an mqtts:// url".into()),
        );
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
        ca_file,
        client_cert,
        login,
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
        if crate::codec::check_metric_name(name).is_err() {
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

/// Field names of each rule kind, for inference and for mixed-up rules.
const KIND_FIELDS: &[(&str, &[&str])] = &[
    (
        "threshold",
        &["above", "below", "clear_below", "clear_above"],
    ),
    ("rate", &["rate_above", "rate_below", "rate_per"]),
    ("deviation", &["deviation_above", "clear_within"]),
    ("silence", &["silent_for", "silent_factor", "scope"]),
    ("presence", &["offline_for"]),
];

impl RawRule {
    /// The span of each condition field that is present, by name.
    fn present_fields(&self) -> Vec<(&'static str, Range<usize>)> {
        let f = |name: &'static str, span: Option<Range<usize>>| span.map(|s| (name, s));
        [
            f("above", self.above.as_ref().map(|v| v.span())),
            f("below", self.below.as_ref().map(|v| v.span())),
            f("clear_below", self.clear_below.as_ref().map(|v| v.span())),
            f("clear_above", self.clear_above.as_ref().map(|v| v.span())),
            f("rate_above", self.rate_above.as_ref().map(|v| v.span())),
            f("rate_below", self.rate_below.as_ref().map(|v| v.span())),
            f("rate_per", self.rate_per.as_ref().map(|v| v.span())),
            f(
                "deviation_above",
                self.deviation_above.as_ref().map(|v| v.span()),
            ),
            f("clear_within", self.clear_within.as_ref().map(|v| v.span())),
            f("silent_for", self.silent_for.as_ref().map(|v| v.span())),
            f(
                "silent_factor",
                self.silent_factor.as_ref().map(|v| v.span()),
            ),
            f("scope", self.scope.as_ref().map(|v| v.span())),
            f("offline_for", self.offline_for.as_ref().map(|v| v.span())),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

fn kind_of_field(field: &str) -> &'static str {
    KIND_FIELDS
        .iter()
        .find(|(_, fields)| fields.contains(&field))
        .map_or("threshold", |(k, _)| k)
}

/// The kind a rule asks for, explicitly or by its fields; `None` after reporting why not.
fn rule_kind(span: &Range<usize>, raw: &RawRule, sink: &mut Sink<'_>) -> Option<&'static str> {
    let present = raw.present_fields();
    let kind = match &raw.kind {
        Some(k) => match KIND_FIELDS
            .iter()
            .find(|(name, _)| *name == k.get_ref().as_str())
        {
            Some((name, _)) => *name,
            None => {
                let kinds: Vec<_> = KIND_FIELDS.iter().map(|(k, _)| *k).collect();
                sink.error(
                    k.span(),
                    format!("unknown rule kind {:?}", k.get_ref()),
                    Some(format!("kind is one of: {}", kinds.join(", "))),
                );
                return None;
            }
        },
        None => match present.first() {
            Some((field, _)) => kind_of_field(field),
            None => {
                sink.error(
                    span.clone(),
                    format!("rule {:?} has no condition", raw.name.get_ref()),
                    Some("add `above`/`below` (threshold), `rate_above`/`rate_below` (rate), `deviation_above` (deviation), `silent_for`/`silent_factor` (silence) or `offline_for` (presence)".into()),
                );
                return None;
            }
        },
    };
    let mut ok = true;
    for (field, field_span) in present {
        let belongs = kind_of_field(field);
        if belongs != kind {
            sink.error(
                field_span,
                format!("`{field}` belongs to {belongs} rules, and this is a {kind} rule"),
                Some("split it into two rules, one per condition".into()),
            );
            ok = false;
        }
    }
    ok.then_some(kind)
}

/// Checks bounds of the threshold family and builds them.
fn compile_bounds(
    span: &Range<usize>,
    names: [&str; 4],
    values: [&Option<Spanned<f64>>; 4],
    sink: &mut Sink<'_>,
) -> Threshold {
    let [above_n, below_n, clear_below_n, clear_above_n] = names;
    let [above_v, below_v, clear_below_v, clear_above_v] = values;
    for (field, value) in names.iter().zip(values) {
        if let Some(v) = value.as_ref().filter(|v| !v.get_ref().is_finite()) {
            sink.error(v.span(), format!("`{field}` must be a finite number"), None);
        }
    }
    let get = |v: &Option<Spanned<f64>>| v.as_ref().map(|s| *s.get_ref());
    let t = Threshold {
        above: get(above_v),
        below: get(below_v),
        clear_below: get(clear_below_v),
        clear_above: get(clear_above_v),
    };
    match (t.above, t.below) {
        (None, None) => sink.error(
            span.clone(),
            format!("the rule has neither `{above_n}` nor `{below_n}`"),
            Some(format!(
                "add `{above_n} = ...` (fires when greater) or `{below_n} = ...` (fires when less)"
            )),
        ),
        (Some(a), Some(b)) if b >= a => sink.error(
            below_v.as_ref().map_or(span.clone(), |b| b.span()),
            format!("`{below_n}` ({b}) must be less than `{above_n}` ({a}), or every value fires"),
            None,
        ),
        _ => {}
    }
    if let Some(c) = clear_below_v {
        match t.above {
            None => sink.error(c.span(), format!("`{clear_below_n}` needs `{above_n}`"), Some(format!("hysteresis for a `{below_n}` rule is `{clear_above_n}`"))),
            Some(a) if *c.get_ref() > a => sink.error(
                c.span(),
                format!("inverted hysteresis band: `{clear_below_n}` ({}) is greater than `{above_n}` ({a})", c.get_ref()),
                Some(format!("`{clear_below_n}` must be at most {a}, e.g. {}", a - (a.abs() * 0.05).max(1.0))),
            ),
            _ => {}
        }
    }
    if let Some(c) = clear_above_v {
        match t.below {
            None => sink.error(c.span(), format!("`{clear_above_n}` needs `{below_n}`"), Some(format!("hysteresis for an `{above_n}` rule is `{clear_below_n}`"))),
            Some(b) if *c.get_ref() < b => sink.error(
                c.span(),
                format!("inverted hysteresis band: `{clear_above_n}` ({}) is less than `{below_n}` ({b})", c.get_ref()),
                Some(format!("`{clear_above_n}` must be at least {b}")),
            ),
            _ => {}
        }
    }
    if let (Some(a), Some(b)) = (t.above, t.below) {
        if t.clear_above.unwrap_or(b) >= t.clear_below.unwrap_or(a) {
            sink.error(
                span.clone(),
                "the hysteresis bands overlap: no value would clear the alert",
                Some(format!("keep {clear_above_n} below {clear_below_n}")),
            );
        }
    }
    t
}

const NO_BOUND: Option<Spanned<f64>> = None;

fn compile_rule(span: Range<usize>, raw: &RawRule, sink: &mut Sink<'_>) -> Option<Rule> {
    let errors_before = sink.errors.len();
    let name = raw.name.get_ref().clone();
    if !is_name(&name) {
        sink.error(
            raw.name.span(),
            format!("rule name {name:?} is not a valid name"),
            Some(NAME_HELP.into()),
        );
    }
    let kind_name = rule_kind(&span, raw, sink);
    let presence = kind_name == Some("presence");
    let (pattern, example) = if presence {
        (
            "sensors/+/status",
            "presence rules watch sensors/{device}/status, e.g. \"sensors/+/status\"",
        )
    } else {
        (
            "sensors/+/+",
            "readings arrive as sensors/{device}/{metric}; e.g. \"sensors/+/temperature\"",
        )
    };
    let filter = match &raw.filter {
        Some(f) => match TopicFilter::new(f.get_ref()) {
            Ok(filter) => {
                if !filter.can_match_pattern(pattern) {
                    sink.error(
                        f.span(),
                        format!(
                            "`match` filter {:?} can never match a {} topic",
                            f.get_ref(),
                            if presence { "status" } else { "reading" }
                        ),
                        Some(example.into()),
                    );
                }
                Some(filter)
            }
            Err(e) => {
                sink.error(
                    f.span(),
                    format!("`match` is not an MQTT topic filter: {e}"),
                    None,
                );
                None
            }
        },
        None if presence => TopicFilter::new("sensors/+/status").ok(),
        None => {
            sink.error(
                span.clone(),
                format!("rule {name:?} has no `match`"),
                Some(format!("say which topics it watches: {example}")),
            );
            None
        }
    };
    let window = |sink: &mut Sink<'_>, default: Duration| {
        let w = sink.duration(&raw.window, "window", default);
        if let Some(ws) = raw.window.as_ref().filter(|_| w < Duration::from_secs(1)) {
            sink.error(ws.span(), "`window` must be at least 1s", None);
        }
        w
    };
    let min_samples = |sink: &mut Sink<'_>, default: u32| match &raw.min_samples {
        Some(m) if *m.get_ref() < 2 => {
            sink.error(m.span(), "`min_samples` must be at least 2", None);
            default
        }
        Some(m) => *m.get_ref(),
        None => default,
    };
    let kind = match kind_name? {
        "threshold" => Kind::Threshold(compile_bounds(
            &span,
            ["above", "below", "clear_below", "clear_above"],
            [&raw.above, &raw.below, &raw.clear_below, &raw.clear_above],
            sink,
        )),
        "rate" => {
            let threshold = compile_bounds(
                &span,
                ["rate_above", "rate_below", "clear_below", "clear_above"],
                [&raw.rate_above, &raw.rate_below, &NO_BOUND, &NO_BOUND],
                sink,
            );
            let per_seconds = match raw.rate_per.as_ref().map(|p| (p, p.get_ref().as_str())) {
                None | Some((_, "second" | "s")) => 1.0,
                Some((_, "minute" | "min")) => 60.0,
                Some((p, other)) => {
                    sink.error(
                        p.span(),
                        format!("unknown `rate_per` {other:?}"),
                        Some("rate_per is \"second\" or \"minute\"".into()),
                    );
                    1.0
                }
            };
            Kind::Rate {
                threshold,
                per_seconds,
                window: window(sink, Duration::from_secs(60)),
            }
        }
        "deviation" => {
            let threshold = compile_bounds(
                &span,
                ["deviation_above", "below", "clear_within", "clear_above"],
                [
                    &raw.deviation_above,
                    &NO_BOUND,
                    &raw.clear_within,
                    &NO_BOUND,
                ],
                sink,
            );
            if let Some(d) = raw.deviation_above.as_ref().filter(|d| *d.get_ref() <= 0.0) {
                sink.error(
                    d.span(),
                    "`deviation_above` is a number of standard deviations and must be positive",
                    Some("e.g. deviation_above = 4.0".into()),
                );
            }
            Kind::Deviation {
                threshold,
                window: window(sink, Duration::from_secs(600)),
                min_samples: min_samples(sink, 10),
            }
        }
        "silence" => {
            let scope = match raw.scope.as_ref().map(|s| (s, s.get_ref().as_str())) {
                None | Some((_, "metric")) => Scope::Metric,
                Some((_, "device")) => Scope::Device,
                Some((s, other)) => {
                    sink.error(s.span(), format!("unknown `scope` {other:?}"), Some("scope is \"metric\" (each metric on its own) or \"device\" (any matching metric counts)".into()));
                    Scope::Metric
                }
            };
            let after = match (&raw.silent_for, &raw.silent_factor) {
                (Some(_), Some(f)) => {
                    sink.error(
                        f.span(),
                        "give `silent_for` or `silent_factor`, not both",
                        None,
                    );
                    SilenceAfter::Fixed(Duration::ZERO)
                }
                (Some(_), None) => {
                    let d = sink.duration(&raw.silent_for, "silent_for", Duration::ZERO);
                    if d < Duration::from_secs(1) {
                        sink.error(
                            raw.silent_for.as_ref().map_or(span.clone(), |s| s.span()),
                            "`silent_for` must be at least 1s",
                            None,
                        );
                    }
                    SilenceAfter::Fixed(d)
                }
                (None, Some(f)) => {
                    if !(f.get_ref().is_finite() && *f.get_ref() > 1.0) {
                        sink.error(f.span(), "`silent_factor` must be more than 1 (a multiple of the learned reporting interval)", Some("e.g. silent_factor = 3.0".into()));
                    }
                    SilenceAfter::Learned {
                        factor: *f.get_ref(),
                        min_samples: min_samples(sink, 5),
                    }
                }
                (None, None) => {
                    sink.error(
                        span.clone(),
                        "a silence rule needs `silent_for` or `silent_factor`",
                        None,
                    );
                    SilenceAfter::Fixed(Duration::ZERO)
                }
            };
            Kind::Silence { after, scope }
        }
        "presence" => Kind::Presence {
            grace: sink.duration(&raw.offline_for, "offline_for", Duration::ZERO),
        },
        _ => unreachable!("rule_kind returns known kinds"),
    };
    if let Some(h) = raw
        .hold
        .as_ref()
        .filter(|_| matches!(kind, Kind::Silence { .. } | Kind::Presence { .. }))
    {
        let instead = if presence {
            "offline_for"
        } else {
            "silent_for"
        };
        sink.error(
            h.span(),
            format!("`for` does not apply to {} rules", kind.name()),
            Some(format!("their waiting time is `{instead}`")),
        );
    }
    if let Some(m) = raw.min_samples.as_ref().filter(|_| {
        !matches!(
            kind,
            Kind::Deviation { .. }
                | Kind::Silence {
                    after: SilenceAfter::Learned { .. },
                    ..
                }
        )
    }) {
        sink.error(
            m.span(),
            "`min_samples` applies to deviation rules and to silence rules with `silent_factor`",
            None,
        );
    }
    if let Some(w) = raw
        .window
        .as_ref()
        .filter(|_| !matches!(kind, Kind::Rate { .. } | Kind::Deviation { .. }))
    {
        sink.error(
            w.span(),
            "`window` applies to rate and deviation rules",
            None,
        );
    }
    let hold = sink.duration(&raw.hold, "for", Duration::ZERO);
    let renotify = raw
        .renotify
        .as_ref()
        .map(|r| sink.duration(&Some(r.clone()), "renotify", Duration::from_secs(3600)));
    if let (Some(r), Some(d)) = (&raw.renotify, renotify) {
        if d < Duration::from_secs(1) {
            sink.error(r.span(), "`renotify` must be at least 1s", None);
        }
    }
    let cooldown = raw
        .cooldown
        .as_ref()
        .map(|c| sink.duration(&Some(c.clone()), "cooldown", Duration::ZERO));
    let labels = raw
        .labels
        .as_ref()
        .map_or_else(BTreeMap::new, |l| l.get_ref().clone());
    if let Some(l) = &raw.labels {
        for key in l.get_ref().keys().filter(|k| !is_name(k)) {
            sink.error(
                l.span(),
                format!("label name {key:?} is not a valid name"),
                Some(NAME_HELP.into()),
            );
        }
    }
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
        kind,
        hold,
        severity,
        renotify,
        cooldown: cooldown.filter(|c| !c.is_zero()),
        forward: raw.forward.as_ref().map(|f| *f.get_ref()),
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[gateway]\nid = \"site-1\"\n";

    #[test]
    fn security_settings_are_checked_where_they_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("x.pem");
        std::fs::write(&pem, "not checked here").unwrap();
        let pem = format!("{:?}", pem.display().to_string());
        let ok = parse(
            &format!(
                "[gateway]\nid = \"s\"\ndata_dir = \"/d\"\n[broker]\nmax_publish_rate = 20\nmax_metrics_per_device = 8\n\
                 [broker.tls]\nlisten = \"127.0.0.1:8883\"\ncert = {pem}\nkey = {pem}\nclient_ca = {pem}\n\
                 [uplink]\nurl = \"mqtts://up:8883\"\nca_file = {pem}\nclient_cert = {pem}\nclient_key = {pem}\nusername = \"u\"\npassword = \"hunter2\"\n"
            ),
            "t.toml",
        )
        .unwrap()
        .config;
        assert_eq!(
            ok.broker.credentials,
            Path::new("/d").join(CREDENTIALS_FILE)
        );
        assert_eq!(ok.broker.max_publish_rate, 20);
        assert_eq!(ok.broker.limits.max_metrics_per_device, 8);
        assert!(
            ok.broker
                .tls
                .as_ref()
                .is_some_and(|t| t.client_ca.is_some())
        );
        let uplink = ok.uplink.unwrap();
        assert!(uplink.ca_file.is_some() && uplink.client_cert.is_some());
        let (user, password) = uplink.login.clone().unwrap();
        assert_eq!((user.as_str(), password.expose()), ("u", "hunter2"));
        assert!(
            !format!("{uplink:?}").contains("hunter2"),
            "never in debug output"
        );

        let bad = errors(&format!(
            "{MINIMAL}[broker]\nlisten = \"127.0.0.1:1883\"\nmax_metrics_per_device = 0\n\
             [broker.tls]\nlisten = \"127.0.0.1:1883\"\ncert = \"/nope.pem\"\nkey = {pem}\n\
             [uplink]\nurl = \"mqtt://up:1883\"\nca_file = {pem}\nclient_cert = {pem}\npassword = \"p\"\n"
        ));
        let expected = [
            "`max_metrics_per_device` must be at least 1",
            "`cert` file \"/nope.pem\" does not exist",
            "the TLS listener needs a port of its own",
            "`ca_file` needs a TLS uplink",
            "add `client_key`",
            "`password` needs `username`",
        ];
        for e in expected {
            assert!(bad.iter().any(|b| b.contains(e)), "{e:?} not in {bad:#?}");
        }
    }

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
        assert!(matches!(
            r.kind,
            Kind::Threshold(Threshold {
                above: Some(90.0),
                ..
            })
        ));
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
    fn every_rule_kind_and_lifecycle_option_compiles() {
        let src = format!(
            "{MINIMAL}[uplink]\nurl = \"mqtt://up\"\n\
             [[rule]]\nname = \"climb\"\nmatch = \"sensors/+/t\"\nrate_above = 2.0\nrate_per = \"minute\"\nwindow = \"5m\"\n\
             [[rule]]\nname = \"odd\"\nmatch = \"sensors/+/t\"\ndeviation_above = 4.0\nclear_within = 3.0\nmin_samples = 20\n\
             [[rule]]\nname = \"quiet\"\nmatch = \"sensors/+/+\"\nsilent_factor = 3.0\nscope = \"device\"\n\
             [[rule]]\nname = \"gone\"\noffline_for = \"2m\"\nrenotify = \"1h\"\ncooldown = \"5m\"\nforward = false\nlabels = {{ team = \"ops\" }}\n"
        );
        let rules = parse(&src, "t.toml").unwrap().config.rules;
        let kinds: Vec<_> = rules.iter().map(|r| r.kind.name()).collect();
        assert_eq!(kinds, ["rate", "deviation", "silence", "presence"]);
        assert!(
            matches!(rules[0].kind, Kind::Rate { per_seconds, window, .. } if per_seconds == 60.0 && window == Duration::from_secs(300))
        );
        assert!(matches!(
            rules[1].kind,
            Kind::Deviation {
                threshold: Threshold {
                    above: Some(4.0),
                    clear_below: Some(3.0),
                    ..
                },
                min_samples: 20,
                ..
            }
        ));
        assert!(
            matches!(rules[2].kind, Kind::Silence { after: SilenceAfter::Learned { factor, .. }, scope: Scope::Device } if factor == 3.0)
        );
        let gone = &rules[3];
        assert_eq!(
            gone.filter.as_str(),
            "sensors/+/status",
            "presence watches status topics by default"
        );
        assert_eq!(
            (gone.renotify, gone.cooldown, gone.forward),
            (
                Some(Duration::from_secs(3600)),
                Some(Duration::from_secs(300)),
                Some(false)
            )
        );
        assert_eq!(gone.labels.get("team").map(String::as_str), Some("ops"));
    }

    #[test]
    fn rule_kinds_are_not_mixed_up() {
        let src = format!(
            "{MINIMAL}[[rule]]\nname = \"a\"\nmatch = \"sensors/+/t\"\nabove = 1.0\nrate_above = 2.0\n\
             [[rule]]\nname = \"b\"\nmatch = \"sensors/+/t\"\nkind = \"trend\"\nabove = 1.0\n\
             [[rule]]\nname = \"c\"\nmatch = \"sensors/+/t\"\nsilent_for = \"1m\"\nsilent_factor = 2.0\nfor = \"1s\"\n\
             [[rule]]\nname = \"d\"\nmatch = \"sensors/+/t\"\n"
        );
        assert_eq!(
            errors(&src),
            [
                "7:14 `rate_above` belongs to rate rules, and this is a threshold rule",
                "11:8 unknown rule kind \"trend\"",
                "17:17 give `silent_for` or `silent_factor`, not both",
                "18:7 `for` does not apply to silence rules",
                "19:1 rule \"d\" has no condition",
            ]
        );
    }

    #[test]
    fn all_unknown_fields_of_all_sections_are_reported_at_once() {
        let src = "[gateway]\nid = \"s\"\nname = \"x\"\n[broker]\nlisten = \"127.0.0.1:1\"\nalow_anonymous = true\nmax_conections = 5\n[stuff]\na = 1\n";
        let e = errors(src);
        assert_eq!(e.len(), 4, "{e:#?}");
        assert!(
            e[0].starts_with("3:1 unknown field `name` in [gateway]"),
            "{e:#?}"
        );
        assert!(
            e[1].starts_with("6:1 unknown field `alow_anonymous`"),
            "{e:#?}"
        );
        assert!(
            e[2].starts_with("7:1 unknown field `max_conections`"),
            "{e:#?}"
        );
        assert!(
            e[3].starts_with("8:2 unknown field `stuff` in the top level"),
            "{e:#?}"
        );
        let d = parse(src, "t.toml").unwrap_err();
        assert_eq!(
            d.errors[1]
                .help
                .as_deref()
                .map(|h| h.starts_with("did you mean `allow_anonymous`?")),
            Some(true)
        );
    }

    #[test]
    fn sources_are_checked() {
        let src = format!(
            "{MINIMAL}[[source]]\nname = \"t\"\ntopic = \"tele/{{device}}/SENSOR\"\npayload = \"json\"\n\
             [[source]]\nname = \"e\"\ntopic = \"{{device}}/sensor/+/state\"\npayload = \"number\"\n\
             [[source]]\nname = \"x\"\ntopic = \"sensors/{{device}}\"\npayload = \"yaml\"\n"
        );
        let e = errors(&src);
        assert_eq!(e.len(), 3, "{e:#?}");
        assert!(
            e[0].starts_with("9:9 a number payload needs the metric"),
            "{e:#?}"
        );
        assert!(e[1].starts_with("13:9 `topic`"), "{e:#?}");
        assert!(e[2].starts_with("14:11 unknown payload \"yaml\""), "{e:#?}");
    }

    #[test]
    fn syntax_errors_stop_before_the_rest() {
        let e = errors("[gateway\nid = \"s\"\n");
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(e[0].starts_with("1:"), "{e:#?}");
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

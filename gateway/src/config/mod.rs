//! Configuration: raw serde structs that mirror the TOML file, then `compile()` into a checked
//! [`Config`] plus warnings.
//!
//! Every problem is reported as a [`Diagnostic`] with the file, line and column, what is wrong
//! and how to fix it. Compilation collects all semantic errors at once instead of stopping at
//! the first; nothing here panics on bad input.
//!
//! # Layout
//!
//! This module holds the checked types and the entry points ([`load`], [`quickstart`],
//! [`parse`]); a file goes through the submodules in this order:
//!
//! | module | one job |
//! |---|---|
//! | `raw` | serde structs that mirror the TOML (`deny_unknown_fields`); each section and `[[array]]` read on its own, with its span |
//! | `compile` | raw sections into the checked [`Config`]: gateway, http, broker, uplink and its summaries, history, sources |
//! | `rules` | one `[[rule]]` into a checked [`Rule`]: its kind, bounds, hysteresis and lifecycle options |
//! | `homeassistant` | `[homeassistant]`: discovery on or off, the prefix, rules' `device_class` labels |
//! | `diagnostics` | [`Diagnostic`] and [`ConfigError`], the sink that collects them with line and column, unknown-key suggestions |

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::de::DeTable;

use crate::codec;
use crate::rules::{Rule, Severity};
use crate::sources::Source;

mod acl;
mod compile;
mod delivery;
pub(crate) use delivery::base64_decode;
pub use delivery::{AWS_ALPN, MIN_KEEP_ALIVE_V5};
mod diagnostics;
mod homeassistant;
pub use homeassistant::HomeAssistantConfig;
mod raw;
mod rules;
#[cfg(test)]
mod tests;

pub use diagnostics::{ConfigError, Diagnostic, Level};

use compile::compile;
use diagnostics::{Sink, check_keys, explain_toml_error};
use raw::{Raw, RawGateway, TOP_LEVEL, array, section};

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
    /// The other gateway of a site pair, if this gateway is one of two.
    pub peer: Option<PeerConfig>,
    /// Rules, in file order.
    pub rules: Vec<Rule>,
    /// Foreign topic layouts mapped onto readings.
    pub sources: Vec<Source>,
    /// Topic ACL rules, in file order (the defaults follow them: [`crate::acl::Policy`]).
    pub acl: Vec<crate::acl::AclRule>,
    /// Home Assistant MQTT discovery.
    pub homeassistant: HomeAssistantConfig,
}

/// `[gateway]`
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    /// This gateway's id: its upstream client id, its name to a peer, and by default the
    /// site id too.
    pub id: String,
    /// Site id: part of alert ids, the `gateway` field of alert documents, and the default
    /// upstream topic prefix. The two gateways of a site pair share it; `id` by default.
    pub site: String,
    /// Where the SQLite database lives; created if missing.
    pub data_dir: PathBuf,
    /// Reload the rules when the configuration file changes (besides on SIGHUP).
    pub watch_config: bool,
    /// Log filter (`info`, `debug`, or per module: `info,watchpost::ingest=debug`); the
    /// `RUST_LOG` environment variable overrides it.
    pub log: String,
    /// A device not heard from for this long counts as stale.
    pub stale_after: Duration,
    /// A device not heard from for this long, with every rule at rest (nothing raised or
    /// pending), is dropped from memory; its counters and history stay in the database.
    pub forget_after: Duration,
}

/// `[peer]`: the other gateway of a site pair.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerConfig {
    /// The peer's gateway id (its `[gateway] id`).
    pub name: String,
    /// The peer's MQTT listener.
    pub address: SocketAddr,
    /// A file holding the secret both gateways share (at least 16 bytes).
    pub secret_file: PathBuf,
    /// With no word from the peer for this long, this gateway also judges the silence of
    /// the devices that were the peer's.
    pub takeover_after: Duration,
}

/// Default `peer.takeover_after`.
pub const DEFAULT_TAKEOVER_AFTER: Duration = Duration::from_secs(10);

/// `[http]`: metrics, health and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Where the endpoint listens; `None` switches it off.
    pub listen: Option<SocketAddr>,
    /// The status page and its JSON ask for an operator's login: by default everywhere but
    /// on loopback.
    pub login: bool,
    /// `[http.tls]`: the same endpoint over HTTPS on an address of its own (`client_ca` is
    /// not used). The page there asks for a login unless that address is loopback and
    /// `login` is not set.
    pub tls: Option<TlsListener>,
}

/// How long a silent device is kept in memory by default (`gateway.forget_after`).
pub const DEFAULT_FORGET_AFTER: Duration = Duration::from_secs(86_400);

/// Default HTTP endpoint: loopback only.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:9183";

/// `[broker]`
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerConfig {
    /// The MQTT listener: MQTT 3.1.1 and MQTT 5 on one port, the version chosen from each
    /// client's CONNECT.
    pub listen: SocketAddr,
    /// Serve clients without credentials.
    pub allow_anonymous: bool,
    /// Most client connections served at once.
    pub max_connections: usize,
    /// A client must send CONNECT within this time.
    pub connect_timeout: Duration,
    /// Decoder limits for sensor payloads.
    pub limits: codec::Limits,
    /// `max_packet_bytes`, if set; see [`BrokerConfig::max_packet_bytes`].
    pub packet_limit: Option<usize>,
    /// The credentials file (devices and operators with hashed secrets).
    pub credentials: PathBuf,
    /// Most publishes per second per device (anonymous: per connection); 0 for no limit.
    pub max_publish_rate: u32,
    /// The TLS listener, if configured.
    pub tls: Option<TlsListener>,
    /// `max_keep_alive`: an MQTT 5 client that asks for a longer keep alive, or for none (0),
    /// is told this one in its CONNACK (Server Keep Alive). Whole seconds, 1 s to 65535 s;
    /// `None` takes what each client asks for.
    pub max_keep_alive: Option<Duration>,
    /// `receive_maximum`: QoS 1 and 2 publishes a client may have unacknowledged at once
    /// (MQTT 5 Receive Maximum), and the most the broker has in flight to a 3.1.1 client.
    /// 1 to 65535.
    pub receive_maximum: u16,
    /// `max_session_expiry`: a session a client asks to keep (MQTT 5 Session Expiry Interval,
    /// or a 3.1.1 `clean_session = false`) ends after at most this long offline. Whole
    /// seconds, at most `u32::MAX` (about 136 years); zero ends every session at disconnect.
    pub max_session_expiry: Duration,
    /// `max_queued_messages`: per session, messages waiting for a client (offline, or not
    /// reading); beyond this, or [`BrokerConfig::max_queued_bytes`], new messages for that
    /// session are dropped and counted. At least 1.
    pub max_queued_messages: usize,
    /// `max_queued_bytes`: per session, bytes of messages waiting for a client; see
    /// [`BrokerConfig::max_queued_messages`]. At least 1024.
    pub max_queued_bytes: usize,
    /// `max_retained_messages`: retained messages kept for all topics together; a retained
    /// publish beyond this, or [`BrokerConfig::max_retained_bytes`], is refused (not kept)
    /// and counted. At least 1.
    pub max_retained_messages: usize,
    /// `max_retained_bytes`: bytes of retained messages kept for all topics together; see
    /// [`BrokerConfig::max_retained_messages`]. At least 1024.
    pub max_retained_bytes: usize,
    /// `refuse_subscriptions`: MQTT topic filters no client may subscribe to. A SUBSCRIBE to a
    /// listed filter, or to any filter that a listed filter matches when read as a topic, is
    /// refused with SUBACK 0x80 (unspecified error) in both MQTT versions. For conformance
    /// suites (the Eclipse Paho interoperability tests expect `test/nosubscribe` refused) and
    /// to keep clients off a topic tree. Each is a valid filter, as written in the file.
    pub refuse_subscriptions: Vec<String>,
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
    /// Largest MQTT packet a client may send: `max_packet_bytes`, by default well above the
    /// payload limit, so that an oversized reading reaches the decoder and is counted instead
    /// of dropping the connection. A bridge's own messages can be larger than any reading
    /// (Zigbee2MQTT's device list is about 3 KB per device), hence the setting.
    pub fn max_packet_bytes(&self) -> usize {
        self.packet_limit
            .unwrap_or((self.limits.max_payload_bytes * 16).max(64 * 1024))
    }
}

/// `[uplink]`
#[derive(Debug, Clone, PartialEq)]
pub struct UplinkConfig {
    /// Upstream host name or address.
    pub host: String,
    /// One of a site pair: this gateway's id, sent with each alert over MQTT 5 as the user
    /// property `watchpost-gateway` (never in the document, which both gateways write alike).
    pub forwarded_by: Option<String>,
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
    /// How alerts go upstream: protocol, QoS, retain and the cloud's form (`profile`).
    pub delivery: Delivery,
}

/// `[uplink] profile`: the rules of one IoT cloud, set with one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// AWS IoT Core: X.509 client certificate, QoS at most 1, at most 7 `/` in a topic.
    AwsIotCore,
    /// Azure IoT Hub: MQTT 3.1.1, SAS token or X.509, `devices/{id}/messages/events/`.
    AzureIotHub,
    /// HiveMQ Cloud: TLS and a login.
    HivemqCloud,
    /// EMQX Cloud: TLS and a login.
    EmqxCloud,
    /// Any MQTT 5 broker or cluster.
    Mqtt5,
    /// ThingsBoard: access token as user name, alerts on the gateway API.
    Thingsboard,
}

impl Profile {
    /// Every profile, with the name written in the file.
    pub const ALL: [(Profile, &'static str); 6] = [
        (Profile::AwsIotCore, "aws-iot-core"),
        (Profile::AzureIotHub, "azure-iot-hub"),
        (Profile::HivemqCloud, "hivemq-cloud"),
        (Profile::EmqxCloud, "emqx-cloud"),
        (Profile::Mqtt5, "mqtt5"),
        (Profile::Thingsboard, "thingsboard"),
    ];

    /// The name written in the file.
    pub fn name(self) -> &'static str {
        Profile::ALL
            .iter()
            .find(|(p, _)| *p == self)
            .map_or("?", |(_, n)| n)
    }
}

/// `[uplink] mqtt_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MqttVersion {
    /// MQTT 5 where the upstream speaks it, else 3.1.1.
    #[default]
    Auto,
    /// MQTT 5 only.
    V5,
    /// MQTT 3.1.1 only.
    V311,
}

/// The form of what goes upstream.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Form {
    /// `{topic_prefix}/alerts/{severity}/{device}/{rule}`, the alert document as it is.
    #[default]
    Plain,
    /// Azure IoT Hub: `devices/{client_id}/messages/events/{properties}`, the document as the
    /// body and its fields as message properties.
    Azure {
        /// The device's shared access key (base64), from which SAS tokens are made; `None`
        /// with an X.509 client certificate.
        key: Option<Secret>,
        /// Lifetime of one SAS token; a new one is made before it ends.
        token_ttl: Duration,
    },
    /// ThingsBoard's gateway API: an alert as telemetry (`v1/gateway/telemetry`) or as
    /// attributes (`v1/gateway/attributes`) of the device that raised it.
    Thingsboard {
        /// Attributes instead of telemetry.
        attributes: bool,
    },
}

/// How alerts go upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The cloud profile, if any.
    pub profile: Option<Profile>,
    /// The MQTT version spoken upstream.
    pub mqtt_version: MqttVersion,
    /// QoS of every publish: 1 (default) or 2.
    pub qos: u8,
    /// Alerts are published retained (not where the upstream says it has no retain).
    pub retain: bool,
    /// Largest payload the upstream takes, where a profile knows it.
    pub max_payload: Option<usize>,
    /// The ALPN protocol to offer in the TLS handshake (AWS IoT Core on port 443).
    pub alpn: Option<&'static str>,
    /// Topic and payload form.
    pub form: Form,
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery {
            profile: None,
            mqtt_version: MqttVersion::Auto,
            qos: 1,
            retain: true,
            max_payload: None,
            alpn: None,
            form: Form::Plain,
        }
    }
}

/// The API version in the user name of an Azure IoT Hub device (the current GA version of
/// the device API in Microsoft's IoT Hub MQTT documentation).
pub const AZURE_API_VERSION: &str = "2021-04-12";

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
    /// Bytes set aside in the data directory for alerts and the outbox when its file system
    /// fills up (`reserve_mb`).
    pub reserve_bytes: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            raw_retention: None,
            max_db_bytes: DEFAULT_MAX_DB_MB * 1024 * 1024,
            reserve_bytes: crate::store::DEFAULT_RESERVE_BYTES,
        }
    }
}

impl UplinkConfig {
    /// True if alerts of `severity` go upstream.
    pub fn forwards(&self, severity: Severity) -> bool {
        self.forward.contains(&severity)
    }
}

/// Default log filter: Watchpost at info, the embedded broker and MQTT client only when
/// something is wrong.
pub const DEFAULT_LOG: &str = "info,rumqttc=warn";

/// Default place of the database.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/watchpost";
/// Default disk budget of the database, in MiB.
pub const DEFAULT_MAX_DB_MB: u64 = 1024;
/// Default MQTT listener: loopback, so nothing is exposed until the operator says so.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:1883";

/// File name of the credentials file inside the data directory, by default.
pub const CREDENTIALS_FILE: &str = "credentials.toml";

/// Default limit of publishes per second and device.
pub const DEFAULT_MAX_PUBLISH_RATE: u32 = 500;

/// Default of `broker.receive_maximum`: unacknowledged QoS 1 and 2 publishes per client.
pub const DEFAULT_RECEIVE_MAXIMUM: u16 = 64;
/// Default of `broker.max_session_expiry`: one day offline.
pub const DEFAULT_MAX_SESSION_EXPIRY: Duration = Duration::from_secs(24 * 60 * 60);
/// Default of `broker.max_queued_messages`, per session.
pub const DEFAULT_MAX_QUEUED_MESSAGES: usize = 1000;
/// Default of `broker.max_queued_bytes`, per session: 1 MiB.
pub const DEFAULT_MAX_QUEUED_BYTES: usize = 1024 * 1024;
/// Default of `broker.max_retained_messages`, for all topics together.
pub const DEFAULT_MAX_RETAINED_MESSAGES: usize = 10_000;
/// Default of `broker.max_retained_bytes`, for all topics together: 16 MiB.
pub const DEFAULT_MAX_RETAINED_BYTES: usize = 16 * 1024 * 1024;

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
            peer: root
                .get("peer")
                .and_then(|v| section(v, "[peer]", &mut sink)),
            rules: array(root.get("rule"), "[[rule]]", &mut sink),
            sources: array(root.get("source"), "[[source]]", &mut sink),
            acl: array(root.get("acl"), "[[acl]]", &mut sink),
            homeassistant: root
                .get("homeassistant")
                .and_then(|v| section(v, "[homeassistant]", &mut sink))
                .unwrap_or_default(),
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

//! Compilation: the raw sections into a checked `Config`, every error collected. The gateway,
//! HTTP, broker, uplink (with its summaries), history and source sections are compiled here;
//! each `[[rule]]` goes to `rules`.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::diagnostics::Sink;
use super::raw::{
    Raw, RawBroker, RawField, RawGateway, RawHistory, RawPresence, RawSource, RawSummaries,
    RawUplink, RawValue,
};
use super::rules::compile_rule;
use super::{
    BrokerConfig, CREDENTIALS_FILE, Config, DEFAULT_DATA_DIR, DEFAULT_FORGET_AFTER,
    DEFAULT_HTTP_LISTEN, DEFAULT_LISTEN, DEFAULT_LOG, DEFAULT_MAX_PUBLISH_RATE,
    DEFAULT_MAX_QUEUED_BYTES, DEFAULT_MAX_QUEUED_MESSAGES, DEFAULT_MAX_RETAINED_BYTES,
    DEFAULT_MAX_RETAINED_MESSAGES, DEFAULT_MAX_SESSION_EXPIRY, DEFAULT_RECEIVE_MAXIMUM,
    DEFAULT_TAKEOVER_AFTER, GatewayConfig, HistoryConfig, HttpConfig, PeerConfig, Secret,
    SummaryConfig, TlsListener, UplinkConfig,
};
use crate::codec;
use crate::rules::{Kind, Rule, Severity};
use crate::sources::{Field, FieldKind, Payload, Source};
use crate::topic::TopicFilter;
use crate::value::{Value, ValueMap};

pub(super) fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

pub(super) const NAME_HELP: &str = "use letters, digits, '-', '_' and '.' only";

pub(super) fn compile(raw_gateway: RawGateway, raw: Raw, sink: &mut Sink<'_>) -> Config {
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
    let forget_after = sink.duration(
        &raw_gateway.forget_after,
        "forget_after",
        DEFAULT_FORGET_AFTER,
    );
    if let Some(raw) = &raw_gateway.forget_after {
        if forget_after < Duration::from_secs(1) {
            sink.error(
                raw.span(),
                "`forget_after` must be at least 1s",
                Some("how long a silent device is kept in memory, e.g. \"1d\"".into()),
            );
        } else if forget_after < stale_after {
            sink.error(
                raw.span(),
                format!(
                    "`forget_after` ({}) is shorter than `stale_after` ({}): devices would be forgotten before they count as stale",
                    humantime::format_duration(forget_after),
                    humantime::format_duration(stale_after)
                ),
                Some("make `forget_after` at least as long as `stale_after` (default 10m)".into()),
            );
        }
    }
    let site = match &raw_gateway.site {
        Some(site) => {
            if !is_name(site.get_ref()) {
                sink.error(
                    site.span(),
                    format!("site id {:?} is not a valid name", site.get_ref()),
                    Some(NAME_HELP.into()),
                );
            }
            site.get_ref().clone()
        }
        None => id.clone(),
    };
    let peer = raw.peer.as_ref().map(|p| compile_peer(p, &id, sink));
    let pair_member = peer.is_some().then(|| id.clone());
    if peer.is_some() && raw_gateway.site.is_none() {
        sink.warn(
            raw_gateway.id.span(),
            "a gateway with a [peer] has no `site`: the site id is this gateway's id, and the two gateways' alert ids will differ",
            Some("give both gateways the same `site = \"...\"` in [gateway]".into()),
        );
    }
    let gateway = GatewayConfig {
        id,
        site,
        data_dir,
        watch_config: raw_gateway.watch_config.unwrap_or(false),
        log,
        stale_after,
        forget_after,
    };
    let listen = match &raw.http.listen {
        Some(l) if l.get_ref() == "off" => None,
        Some(l) => sink.socket_addr(l, "listen"),
        None => DEFAULT_HTTP_LISTEN.parse().ok(),
    };
    let beyond_loopback = listen.is_some_and(|a| !a.ip().is_loopback());
    let http_tls = raw.http.tls.as_ref().and_then(|t| {
        let r = t.get_ref();
        let tls_listen = sink.socket_addr(&r.listen, "listen")?;
        for (field, p) in [("cert", &r.cert), ("key", &r.key)] {
            if !Path::new(p.get_ref()).is_file() {
                sink.error(
                    p.span(),
                    format!("`{field}` file {:?} does not exist", p.get_ref()),
                    Some("give the path of a PEM file".into()),
                );
            }
        }
        if let Some(ca) = &r.client_ca {
            sink.error(
                ca.span(),
                "`client_ca` is not used by the HTTP endpoint: operators log in with a name and secret",
                Some("remove it from [http.tls]".into()),
            );
        }
        if Some(tls_listen) == listen && tls_listen.port() != 0 {
            sink.error(r.listen.span(), "HTTPS needs a port of its own, e.g. 9443", None);
        }
        Some(TlsListener {
            listen: tls_listen,
            cert: PathBuf::from(r.cert.get_ref()),
            key: PathBuf::from(r.key.get_ref()),
            client_ca: None,
        })
    });
    let http = HttpConfig {
        listen,
        login: raw
            .http
            .login
            .as_ref()
            .map_or(beyond_loopback, |l| *l.get_ref()),
        tls: http_tls,
    };
    if let (true, Some(l)) = (beyond_loopback, &raw.http.listen) {
        sink.warn(l.span(), "the HTTP endpoint listens beyond loopback: /metrics, /readyz and /status are readable by anyone who can reach it (the status page asks for an operator's login)", None);
        if !http.login {
            sink.warn(
                raw.http.login.as_ref().map_or(l.span(), |s| s.span()),
                "the status page is open to anyone who can reach this address (login = false)",
                Some("leave `login` out (or true) so that it asks for an operator's name and secret, or listen on loopback and use an SSH tunnel".into()),
            );
        }
    }
    let broker = compile_broker(&raw.broker, &gateway.data_dir, sink);
    let uplink = raw
        .uplink
        .as_ref()
        .map(|u| compile_uplink(u, &gateway.id, &gateway.site, sink))
        .map(|u| UplinkConfig {
            forwarded_by: pair_member,
            ..u
        });
    let history = compile_history(&raw.history, sink);

    let mut names = HashSet::new();
    let mut rules = Vec::with_capacity(raw.rules.len());
    let mut rule_spans = Vec::with_capacity(raw.rules.len());
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
            rule_spans.push(span.clone());
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
    check_rule_kinds(&rules, &rule_spans, &sources, sink);
    let acl = super::acl::compile_acl(&raw.acl, &broker, sink);
    let homeassistant = super::homeassistant::compile(&raw.homeassistant, &raw.rules, sink);
    Config {
        gateway,
        broker,
        uplink,
        history,
        http,
        peer,
        rules,
        sources,
        acl,
        homeassistant,
    }
}

/// `[peer]`: the other gateway of a site pair.
fn compile_peer(raw: &super::raw::RawPeer, own_id: &str, sink: &mut Sink<'_>) -> PeerConfig {
    let name = raw.name.get_ref().clone();
    if !is_name(&name) {
        sink.error(
            raw.name.span(),
            format!("peer name {name:?} is not a valid name"),
            Some(NAME_HELP.into()),
        );
    } else if name == own_id {
        sink.error(
            raw.name.span(),
            "the peer has this gateway's own id",
            Some("`name` is the other gateway's [gateway] id; each gateway of a pair has its own id and both share `site`".into()),
        );
    }
    let address = sink
        .socket_addr(&raw.address, "address")
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 1883)));
    if raw.secret_file.get_ref().trim().is_empty() {
        sink.error(
            raw.secret_file.span(),
            "`secret_file` is empty",
            Some("a file with the secret both gateways share, e.g. \"/etc/watchpost/peer.secret\" (`head -c 32 /dev/urandom | base64 > peer.secret`)".into()),
        );
    } else if !Path::new(raw.secret_file.get_ref()).exists() {
        sink.warn(
            raw.secret_file.span(),
            format!(
                "`secret_file` {:?} does not exist (yet): the gateway will not start without it",
                raw.secret_file.get_ref()
            ),
            Some(
                "`head -c 32 /dev/urandom | base64 > FILE`, once, and copy FILE to the other box"
                    .into(),
            ),
        );
    }
    let takeover_after = sink.duration(
        &raw.takeover_after,
        "takeover_after",
        DEFAULT_TAKEOVER_AFTER,
    );
    if takeover_after < Duration::from_secs(1) {
        sink.error(
            raw.takeover_after.as_ref().map_or(0..0, |t| t.span()),
            "`takeover_after` must be at least 1s",
            None,
        );
    }
    PeerConfig {
        name,
        address,
        secret_file: PathBuf::from(raw.secret_file.get_ref()),
        takeover_after,
    }
}

/// What the sources say a metric holds: each declaration's kind, its value map's outputs, and
/// the source that says so.
fn declarations<'a>(
    sources: &'a [Source],
    metric: &str,
) -> Vec<(FieldKind, Option<&'a ValueMap>, &'a str)> {
    let mut out = Vec::new();
    for s in sources {
        let map = |m: &'a ValueMap| (!m.is_empty()).then_some(m);
        match s.payload {
            Payload::Json => {
                for f in s.fields.iter().flat_map(|f| f.values()) {
                    if f.metric == metric {
                        out.push((f.kind, map(&f.values), s.name.as_str()));
                    }
                }
            }
            payload if s.metric.as_deref() == Some(metric) && !s.has_metric_level() => {
                let kind = match payload {
                    Payload::Number => FieldKind::Number,
                    Payload::State => FieldKind::State,
                    _ => FieldKind::Any,
                };
                out.push((kind, map(&s.values), s.name.as_str()));
            }
            _ => {}
        }
    }
    out
}

/// Rejects a state rule on a metric the sources map only as numbers, and a numeric rule on
/// one they map only as states; warns about a state rule that no value map can satisfy.
fn check_rule_kinds(
    rules: &[Rule],
    spans: &[Range<usize>],
    sources: &[Source],
    sink: &mut Sink<'_>,
) {
    for (rule, span) in rules.iter().zip(spans) {
        let Some(metric) = rule
            .filter
            .as_str()
            .split('/')
            .nth(2)
            .filter(|m| !m.contains(['+', '#']))
        else {
            continue;
        };
        let declared = declarations(sources, metric);
        if declared.is_empty() {
            continue;
        }
        let names = |kind: FieldKind| {
            declared
                .iter()
                .filter(|(k, _, _)| *k == kind)
                .map(|(_, _, s)| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let all = |kind: FieldKind| declared.iter().all(|(k, _, _)| *k == kind);
        match &rule.kind {
            Kind::State(_) if all(FieldKind::Number) => sink.error(
                span.clone(),
                format!(
                    "rule {:?} compares states, but source {} maps {metric:?} as a number",
                    rule.name,
                    names(FieldKind::Number)
                ),
                Some("use a threshold rule (above/below), or map the field as a state".into()),
            ),
            kind if kind.numeric() && all(FieldKind::State) => sink.error(
                span.clone(),
                format!(
                    "rule {:?} judges numbers, but source {} maps {metric:?} as a state",
                    rule.name,
                    names(FieldKind::State)
                ),
                Some("use equals/in/not_in for states".into()),
            ),
            Kind::State(test) => {
                // Only maps fix what a field can be; without one, any word may come.
                let maps: Vec<&ValueMap> = declared.iter().filter_map(|(_, m, _)| *m).collect();
                if maps.len() == declared.len()
                    && !maps.iter().any(|m| m.outputs().any(|v| test.holds(v)))
                {
                    let outputs: Vec<String> = maps
                        .iter()
                        .flat_map(|m| m.outputs())
                        .map(|v| serde_json::json!(v).to_string())
                        .collect();
                    sink.warn(
                        span.clone(),
                        format!(
                            "rule {:?} can never fire: the value maps of {metric:?} give only {}",
                            rule.name,
                            outputs.join(", ")
                        ),
                        Some("compare with one of those values".into()),
                    );
                }
            }
            _ => {}
        }
    }
}

/// A value the file wrote, checked as a reading's value would be.
pub(super) fn value_of(raw: &RawValue) -> Result<Value, String> {
    match raw {
        RawValue::Bool(b) => Ok(Value::Bool(*b)),
        RawValue::Int(n) => Ok(Value::Number(*n as f64)),
        RawValue::Float(n) => Value::number(*n).map_err(|e| e.to_string()),
        RawValue::Text(t) => Value::parse(t).map_err(|e| format!("{t:?}: {e}")),
    }
}

/// A value map from the file, reporting bad entries at `span`.
fn value_map(
    raw: &BTreeMap<String, RawValue>,
    span: Range<usize>,
    sink: &mut Sink<'_>,
) -> ValueMap {
    let mut pairs = Vec::new();
    for (key, value) in raw {
        match value_of(value) {
            Ok(v) => pairs.push((key.clone(), v)),
            Err(e) => sink.error(
                span.clone(),
                format!("value map entry {key:?}: {e}"),
                Some("map to a number, true/false, or a short word such as \"open\"".into()),
            ),
        }
    }
    let map = ValueMap::new(pairs.clone());
    if map.keys().count() < pairs.len() {
        sink.error(
            span,
            "the value map has two keys that differ only in case",
            Some("keys are matched without regard to case: keep one".into()),
        );
    }
    map
}

fn field_kind(kind: Option<&str>, span: Range<usize>, sink: &mut Sink<'_>) -> FieldKind {
    match kind {
        None => FieldKind::Any,
        Some("number") => FieldKind::Number,
        Some("state") => FieldKind::State,
        Some(other) => {
            sink.error(
                span,
                format!("unknown kind {other:?}"),
                Some("kind is \"number\" or \"state\"".into()),
            );
            FieldKind::Any
        }
    }
}

/// A value map's outputs decide a field's kind when it does not say: all numbers, or all
/// states. A declared kind that the map contradicts is an error.
fn kind_with_map(
    kind: FieldKind,
    map: &ValueMap,
    what: &str,
    span: Range<usize>,
    sink: &mut Sink<'_>,
) -> FieldKind {
    if map.is_empty() {
        return kind;
    }
    let numbers = map.outputs().all(|v| !v.is_state());
    let states = map.outputs().all(Value::is_state);
    match kind {
        FieldKind::Number if !numbers => sink.error(
            span,
            format!("{what} is declared a number, but its value map gives states"),
            Some("map to numbers, or declare kind = \"state\"".into()),
        ),
        FieldKind::State if !states => sink.error(
            span,
            format!("{what} is declared a state, but its value map gives numbers"),
            Some("map to words or true/false, or declare kind = \"number\"".into()),
        ),
        FieldKind::Any if numbers => return FieldKind::Number,
        FieldKind::Any if states => return FieldKind::State,
        _ => {}
    }
    kind
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
        "state" => Some(Payload::State),
        "value" => Some(Payload::Value),
        "json" => Some(Payload::Json),
        other => {
            sink.error(raw.payload.span(), format!("unknown payload {other:?}"), Some("payload is \"number\" (a plain number), \"state\" (a plain word such as ON or open), \"value\" (either) or \"json\" (fields of a JSON object)".into()));
            None
        }
    };
    let metric_ok = |m: &str| crate::codec::check_metric_name(m).is_ok();
    let mut fields = None;
    if let Some(map) = &raw.metrics {
        let mut out = BTreeMap::new();
        for (path, field) in map.get_ref() {
            let field = match field {
                RawField::Name(metric) => Field {
                    metric: metric.clone(),
                    ..Field::default()
                },
                RawField::Full(t) => {
                    let values = t
                        .values
                        .as_ref()
                        .map(|v| value_map(v, map.span(), sink))
                        .unwrap_or_default();
                    let kind = field_kind(t.kind.as_deref(), map.span(), sink);
                    let kind =
                        kind_with_map(kind, &values, &format!("field {path:?}"), map.span(), sink);
                    Field {
                        metric: t.metric.clone(),
                        kind,
                        values,
                    }
                }
            };
            if !metric_ok(&field.metric) {
                sink.error(
                    map.span(),
                    format!(
                        "{:?} (for {path:?}) is not a usable metric name",
                        field.metric
                    ),
                    Some(
                        "metric names cannot be empty, contain '/', '+', '#', or be seq or status"
                            .into(),
                    ),
                );
            }
            out.insert(path.clone(), field);
        }
        fields = Some(out);
    }
    if let Some(m) = raw.metric.as_ref().filter(|m| !metric_ok(m.get_ref())) {
        sink.error(
            m.span(),
            format!("{:?} is not a usable metric name", m.get_ref()),
            None,
        );
    }
    let metric = raw.metric.as_ref().map(|m| m.get_ref().clone());
    let values = raw
        .values
        .as_ref()
        .map(|v| value_map(v.get_ref(), v.span(), sink))
        .unwrap_or_default();
    let mut source = match Source::new(
        name,
        raw.topic.get_ref(),
        payload.unwrap_or(Payload::Number),
        None,
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
    if let Some(fields) = fields {
        source = source.with_fields(fields);
    }
    if let Some(k) = &raw.kind {
        sink.error(
            k.span(),
            "`kind` belongs to a field: metrics = { path = { metric = \"...\", kind = \"state\" } }",
            Some("for a plain payload, `payload = \"number\"` or `payload = \"state\"` says it".into()),
        );
    }
    if let Some(v) = &raw.values {
        match payload {
            Some(Payload::Json) => sink.error(
                v.span(),
                "`values` maps a plain payload; a JSON payload maps values per field",
                Some("metrics = { path = { metric = \"...\", values = { ... } } }".into()),
            ),
            Some(Payload::Number) if values.outputs().any(Value::is_state) => sink.error(
                v.span(),
                "a number payload's value map gives states",
                Some("use payload = \"state\" or \"value\"".into()),
            ),
            Some(Payload::State) if values.outputs().any(|o| !o.is_state()) => sink.error(
                v.span(),
                "a state payload's value map gives numbers",
                Some("use payload = \"number\" or \"value\"".into()),
            ),
            _ => {}
        }
        source = source.with_values(values);
    }
    if let Some(p) = &raw.presence {
        let (topic, field, online, offline) = match p.get_ref() {
            RawPresence::Topic(t) => (t.clone(), None, None, None),
            RawPresence::Full(t) => (
                t.topic.clone(),
                t.field.clone(),
                t.online.clone(),
                t.offline.clone(),
            ),
        };
        if let (Some(on), Some(off)) = (&online, &offline) {
            if let Some(both) = on
                .iter()
                .find(|w| off.iter().any(|o| o.eq_ignore_ascii_case(w)))
            {
                sink.error(
                    p.span(),
                    format!("presence word {both:?} means both online and offline"),
                    None,
                );
            }
        }
        match source.clone().with_presence(&topic, field, online, offline) {
            Ok(s) => source = s,
            Err(e) => sink.error(
                p.span(),
                format!("presence topic {topic:?}: {e}"),
                Some("e.g. presence = \"tele/{device}/LWT\"".into()),
            ),
        }
    }
    if let Some(ignore) = &raw.ignore {
        match source
            .clone()
            .with_ignore(ignore.get_ref().iter().map(String::as_str))
        {
            Ok(s) => source = s,
            Err(e) => sink.error(
                ignore.span(),
                format!("`ignore`: {e}"),
                Some(
                    "e.g. ignore = [\"zigbee2mqtt/bridge/#\", \"zigbee2mqtt/{device*}/set\"]"
                        .into(),
                ),
            ),
        }
    }
    let plain = matches!(
        payload,
        Some(Payload::Number | Payload::State | Payload::Value)
    );
    match (
        plain,
        payload,
        source.has_metric_level(),
        &raw.metric,
        &raw.metrics,
    ) {
        (true, _, false, None, _) => sink.error(
            raw.topic.span(),
            "a plain payload needs the metric: put {metric} in the topic or set `metric`",
            None,
        ),
        (_, Some(Payload::Json), true, _, _) => sink.error(
            raw.topic.span(),
            "a JSON payload names its metrics by its fields: remove {metric} from the topic",
            Some(
                "use `metrics = { \"path.in.payload\" = \"metric\" }` to choose and rename fields"
                    .into(),
            ),
        ),
        (true, _, _, _, Some(m)) => sink.error(
            m.span(),
            "`metrics` maps JSON fields; a plain payload has none",
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
    if let Some(v5) = &raw.listen_v5 {
        sink.error(
            v5.span(),
            "`listen_v5` is gone: `listen` now serves MQTT 3.1.1 and MQTT 5 on one port, chosen from each client's CONNECT",
            Some(format!(
                "remove this line and point MQTT 5 clients at `listen` ({listen})"
            )),
        );
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
    let packet_limit = match &raw.max_packet_bytes {
        Some(m) if *m.get_ref() < max_payload_bytes || *m.get_ref() > 256 * 1024 * 1024 => {
            sink.error(
                m.span(),
                format!(
                    "`max_packet_bytes` must be at least `max_payload_bytes` ({max_payload_bytes}) and at most 268435456"
                ),
                None,
            );
            None
        }
        Some(m) => Some(*m.get_ref()),
        None => None,
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
        if tls_listen == listen && tls_listen.port() != 0 {
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
        let exposed = [Some(listen), tls.as_ref().map(|t| t.listen)]
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
    let max_keep_alive = raw.max_keep_alive.as_ref().and_then(|k| {
        let errors = sink.errors.len();
        let d = sink.duration(&Some(k.clone()), "max_keep_alive", Duration::ZERO);
        if sink.errors.len() > errors {
            return None;
        }
        if !whole_seconds_within(d, 1..=u64::from(u16::MAX)) {
            sink.error(
                k.span(),
                "`max_keep_alive` must be whole seconds from 1s to 65535s (18h 12m 15s), what MQTT's keep alive can say",
                Some("e.g. \"60s\"; leave it out to grant each client the keep alive it asks for".into()),
            );
            return None;
        }
        Some(d)
    });
    let receive_maximum = match &raw.receive_maximum {
        Some(r) => match u16::try_from(*r.get_ref()) {
            Ok(n) if n >= 1 => n,
            _ => {
                sink.error(
                    r.span(),
                    "`receive_maximum` must be between 1 and 65535",
                    Some("it is how many QoS 1 and 2 publishes a client may have unacknowledged at once; e.g. 64".into()),
                );
                DEFAULT_RECEIVE_MAXIMUM
            }
        },
        None => DEFAULT_RECEIVE_MAXIMUM,
    };
    let mut max_session_expiry = sink.duration(
        &raw.max_session_expiry,
        "max_session_expiry",
        DEFAULT_MAX_SESSION_EXPIRY,
    );
    if let Some(e) = &raw.max_session_expiry {
        if !whole_seconds_within(max_session_expiry, 0..=u64::from(u32::MAX)) {
            sink.error(
                e.span(),
                "`max_session_expiry` must be whole seconds up to 4294967295s (about 136 years), what MQTT 5's session expiry can say",
                Some("e.g. \"1d\"; \"0s\" ends every session when its client disconnects".into()),
            );
            max_session_expiry = DEFAULT_MAX_SESSION_EXPIRY;
        }
    }
    let max_queued_messages = at_least(
        sink,
        &raw.max_queued_messages,
        "max_queued_messages",
        1,
        DEFAULT_MAX_QUEUED_MESSAGES,
        "messages queued for a session beyond it are dropped and counted; e.g. 1000",
    );
    let max_queued_bytes = at_least(
        sink,
        &raw.max_queued_bytes,
        "max_queued_bytes",
        1024,
        DEFAULT_MAX_QUEUED_BYTES,
        "bytes queued for a session beyond it are dropped and counted; e.g. 1048576 (1 MiB)",
    );
    let max_retained_messages = at_least(
        sink,
        &raw.max_retained_messages,
        "max_retained_messages",
        1,
        DEFAULT_MAX_RETAINED_MESSAGES,
        "retained publishes beyond it are refused and counted, and the gateway's own alerts are retained too; e.g. 10000",
    );
    let max_retained_bytes = at_least(
        sink,
        &raw.max_retained_bytes,
        "max_retained_bytes",
        1024,
        DEFAULT_MAX_RETAINED_BYTES,
        "retained publishes beyond it are refused and counted; e.g. 16777216 (16 MiB)",
    );
    let refuse_subscriptions = raw
        .refuse_subscriptions
        .as_ref()
        .map_or_else(Vec::new, |list| {
            list.get_ref()
                .iter()
                .filter_map(|f| match TopicFilter::new(f.get_ref()) {
                    Ok(_) => Some(f.get_ref().clone()),
                    Err(e) => {
                        sink.error(
                            f.span(),
                            format!(
                                "`refuse_subscriptions`: {:?} is not an MQTT topic filter: {e}",
                                f.get_ref()
                            ),
                            Some("e.g. \"test/nosubscribe\" or \"private/#\"".into()),
                        );
                        None
                    }
                })
                .collect()
        });
    BrokerConfig {
        listen,
        allow_anonymous,
        max_connections,
        connect_timeout,
        limits: codec::Limits {
            max_payload_bytes,
            max_metrics_per_device,
        },
        packet_limit,
        credentials,
        max_publish_rate,
        tls,
        max_keep_alive,
        receive_maximum,
        max_session_expiry,
        max_queued_messages,
        max_queued_bytes,
        max_retained_messages,
        max_retained_bytes,
        refuse_subscriptions,
    }
}

/// True if `d` is whole seconds within `range`: what MQTT carries as an integer of seconds.
fn whole_seconds_within(d: Duration, range: RangeInclusive<u64>) -> bool {
    d.subsec_nanos() == 0 && range.contains(&d.as_secs())
}

/// A count with a floor: the value written, or else an error at its span and `default`.
fn at_least(
    sink: &mut Sink<'_>,
    raw: &Option<Spanned<usize>>,
    field: &str,
    min: usize,
    default: usize,
    help: &str,
) -> usize {
    match raw {
        Some(n) if *n.get_ref() < min => {
            sink.error(
                n.span(),
                format!("`{field}` must be at least {min}"),
                Some(help.into()),
            );
            default
        }
        Some(n) => *n.get_ref(),
        None => default,
    }
}

fn compile_uplink(
    raw: &RawUplink,
    gateway_id: &str,
    site: &str,
    sink: &mut Sink<'_>,
) -> UplinkConfig {
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
        None => site.to_owned(),
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
    let mut uplink = UplinkConfig {
        forwarded_by: None,
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
        delivery: Default::default(),
    };
    uplink.delivery = super::delivery::compile(raw, &mut uplink, sink);
    uplink
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
    // 0 sets nothing aside; more than 1 GiB is surely a mistake.
    let reserve_bytes = match &raw.reserve_mb {
        Some(m) if *m.get_ref() > 1024 => {
            sink.error(m.span(), "`reserve_mb` must be at most 1024", None);
            defaults.reserve_bytes
        }
        Some(m) => m.get_ref() * 1024 * 1024,
        None => defaults.reserve_bytes,
    };
    HistoryConfig {
        window,
        raw_retention,
        max_db_bytes,
        reserve_bytes,
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

#[cfg(test)]
mod tests {
    use super::*;

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
}

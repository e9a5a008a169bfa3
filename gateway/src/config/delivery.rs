//! `[uplink]`'s delivery: MQTT version, QoS, retain and the cloud profile. A profile sets what
//! its cloud requires and refuses, with the reason, what its cloud forbids; the uplink then
//! follows the upstream's own CONNACK limits on top of it (`crate::uplink`).
//!
//! The clouds' rules, from their documentation:
//! - AWS IoT Core ("AWS IoT Core message broker and protocol limits and quotas", and "Device
//!   communication protocols"): X.509 client certificates on port 8883, or 443 with the ALPN
//!   protocol `x-amzn-mqtt-ca`; QoS 0 and 1 only; at most 7 forward slashes in a topic; topics
//!   beginning with `$` are reserved; payloads up to 128 KB; client ids up to 128 bytes;
//!   keep-alive between 30 and 1200 seconds.
//! - Azure IoT Hub ("Communicate with an IoT hub using the MQTT protocol"): MQTT 3.1.1 on port
//!   8883 (443 is MQTT over WebSockets); client id = device id; user name
//!   `{hub}/{device}/?api-version=...`; a SAS token or an X.509 certificate; device-to-cloud
//!   messages on `devices/{device}/messages/events/{property_bag}`; no retained messages (the
//!   hub closes the connection); QoS 0 and 1 only; messages up to 256 KB.
//! - HiveMQ Cloud and EMQX Cloud: TLS only, user name and password.
//! - ThingsBoard ("Gateway MQTT API"): the gateway device's access token as user name, device
//!   data on `v1/gateway/telemetry` and `v1/gateway/attributes`; QoS 0 and 1.

use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::diagnostics::Sink;
use super::raw::RawUplink;
use super::{Delivery, Form, MqttVersion, Profile, Secret, UplinkConfig};

/// AWS IoT Core's largest payload.
pub const AWS_MAX_PAYLOAD: usize = 128 * 1024;
/// Azure IoT Hub's largest device-to-cloud message.
pub const AZURE_MAX_PAYLOAD: usize = 256 * 1024;
/// AWS IoT Core: most `/` in a topic.
pub const AWS_MAX_SLASHES: usize = 7;
/// The ALPN protocol AWS IoT Core wants for MQTT with a client certificate on port 443.
pub const AWS_ALPN: &str = "x-amzn-mqtt-ca";
/// Default lifetime of an Azure SAS token.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60 * 60);

fn span<T>(v: &Option<Spanned<T>>) -> Option<Range<usize>> {
    v.as_ref().map(|v| v.span())
}

pub(super) fn compile(raw: &RawUplink, up: &mut UplinkConfig, sink: &mut Sink<'_>) -> Delivery {
    let url = raw.url.span();
    let profile = raw.profile.as_ref().and_then(|p| {
        let found = Profile::ALL
            .iter()
            .find(|(_, name)| name == p.get_ref())
            .map(|(profile, _)| *profile);
        if found.is_none() {
            let names: Vec<_> = Profile::ALL.iter().map(|(_, n)| *n).collect();
            sink.error(
                p.span(),
                format!("unknown profile {:?}", p.get_ref()),
                Some(format!("use one of {}", names.join(", "))),
            );
        }
        found
    });
    let profile_span = span(&raw.profile).unwrap_or(0..0);
    let version = raw.mqtt_version.as_ref().and_then(|v| {
        let version = match v.get_ref().as_str() {
            "auto" => MqttVersion::Auto,
            "5" | "5.0" => MqttVersion::V5,
            "3.1.1" => MqttVersion::V311,
            other => {
                sink.error(
                    v.span(),
                    format!("`mqtt_version` {other:?} is not a version Watchpost speaks"),
                    Some("use \"auto\" (MQTT 5, else 3.1.1), \"5\" or \"3.1.1\"".into()),
                );
                return None;
            }
        };
        Some((version, v.span()))
    });
    let qos = match &raw.qos {
        Some(q) if *q.get_ref() == 1 || *q.get_ref() == 2 => *q.get_ref() as u8,
        Some(q) => {
            sink.error(
                q.span(),
                format!("`qos` {} cannot carry alerts", q.get_ref()),
                Some("use 1 (default) or 2: an alert leaves the outbox only when the upstream acknowledges it, which QoS 0 never does".into()),
            );
            1
        }
        None => 1,
    };
    let retain = raw.retain.as_ref().map(|r| (*r.get_ref(), r.span()));

    // Keys that belong to one profile only.
    for (key, value_span, owner) in [
        (
            "shared_access_key",
            span(&raw.shared_access_key),
            Profile::AzureIotHub,
        ),
        ("token_ttl", span(&raw.token_ttl), Profile::AzureIotHub),
        (
            "access_token",
            span(&raw.access_token),
            Profile::Thingsboard,
        ),
        ("alerts_as", span(&raw.alerts_as), Profile::Thingsboard),
    ] {
        if let Some(s) = value_span {
            if profile != Some(owner) {
                sink.error(
                    s,
                    format!("`{key}` belongs to profile {:?}", owner.name()),
                    Some(format!(
                        "set profile = {:?} or remove `{key}`",
                        owner.name()
                    )),
                );
            }
        }
    }

    let mut delivery = Delivery {
        profile,
        qos,
        retain: retain.as_ref().is_none_or(|(r, _)| *r),
        ..Delivery::default()
    };
    let at = |v: Option<Range<usize>>| v.unwrap_or_else(|| profile_span.clone());
    let cloud = profile.map(Profile::name).unwrap_or_default();
    let tls = up.tls;
    let needs_tls = |sink: &mut Sink<'_>| {
        if !tls {
            refuse(
                sink,
                url.clone(),
                format!("profile {cloud:?}: the cloud accepts MQTT only over TLS"),
                "use an mqtts:// url",
            );
        }
    };
    let no_qos2 = |sink: &mut Sink<'_>, what: &str| {
        if qos == 2 {
            refuse(
                sink,
                at(span(&raw.qos)),
                format!("profile {cloud:?}: {what} does not support QoS 2"),
                "use qos = 1 (the default)",
            );
        }
    };
    let no_retain = |sink: &mut Sink<'_>, why: &str| {
        if let Some((true, r)) = &retain {
            refuse(
                sink,
                r.clone(),
                format!("profile {cloud:?}: retain = true is refused: {why}"),
                "remove `retain`",
            );
        }
    };
    let own_login = |sink: &mut Sink<'_>, what: &str| {
        if let Some(s) = span(&raw.username).or(span(&raw.password)) {
            refuse(
                sink,
                s,
                format!("profile {cloud:?} makes the user name and password itself ({what})"),
                "remove username and password",
            );
        }
    };
    let unused_prefix = |sink: &mut Sink<'_>, topic: &str| {
        if let Some(p) = &raw.topic_prefix {
            sink.warn(
                p.span(),
                format!(
                    "`topic_prefix` is not used with profile {cloud:?}: messages go to {topic}"
                ),
                None,
            );
        }
    };
    let mut default_version = MqttVersion::Auto;
    match profile {
        None => {}
        Some(Profile::AwsIotCore) => {
            needs_tls(sink);
            if up.client_cert.is_none() {
                refuse(
                    sink,
                    at(None),
                    "profile \"aws-iot-core\": AWS IoT Core authenticates a device by its X.509 certificate".into(),
                    "set client_cert and client_key to the thing's certificate and key",
                );
            }
            if up.port != 8883 && up.port != 443 {
                refuse(
                    sink,
                    url.clone(),
                    format!(
                        "profile \"aws-iot-core\": AWS IoT Core serves MQTT on port 8883, or 443 with ALPN, not {}",
                        up.port
                    ),
                    "use mqtts://ENDPOINT:8883 or mqtts://ENDPOINT:443",
                );
            }
            no_qos2(sink, "AWS IoT Core");
            // Alerts go to {prefix}/alerts/{severity}/{device}/{rule}: four more slashes.
            let slashes = up.topic_prefix.matches('/').count() + 4;
            if slashes > AWS_MAX_SLASHES {
                refuse(
                    sink,
                    at(span(&raw.topic_prefix)),
                    format!(
                        "profile \"aws-iot-core\": AWS IoT Core allows at most {AWS_MAX_SLASHES} '/' in a topic, and alerts would go to {}/alerts/{{severity}}/{{device}}/{{rule}} ({slashes})",
                        up.topic_prefix
                    ),
                    "use a topic_prefix of at most four levels",
                );
            }
            if up.topic_prefix.starts_with('$') {
                refuse(
                    sink,
                    at(span(&raw.topic_prefix)),
                    "profile \"aws-iot-core\": topics beginning with '$' are reserved by AWS IoT Core".into(),
                    "",
                );
            }
            if up.client_id.len() > 128 {
                refuse(
                    sink,
                    at(span(&raw.client_id)),
                    "profile \"aws-iot-core\": AWS IoT Core takes client ids of at most 128 bytes"
                        .into(),
                    "",
                );
            }
            let keep_alive = up.keep_alive.as_secs();
            if !(30..=1200).contains(&keep_alive) {
                refuse(
                    sink,
                    at(span(&raw.keep_alive)),
                    format!(
                        "profile \"aws-iot-core\": AWS IoT Core takes a keep-alive between 30s and 1200s, not {keep_alive}s"
                    ),
                    "",
                );
            }
            // AWS IoT Core keeps retained messages (a billed feature): off unless asked for.
            delivery.retain = retain.as_ref().is_some_and(|(r, _)| *r);
            delivery.max_payload = Some(AWS_MAX_PAYLOAD);
            delivery.alpn = (up.port == 443).then_some(AWS_ALPN);
        }
        Some(Profile::AzureIotHub) => {
            needs_tls(sink);
            if up.tls && up.port != 8883 {
                refuse(
                    sink,
                    url.clone(),
                    format!(
                        "profile \"azure-iot-hub\": Azure IoT Hub serves MQTT on port 8883, not {} (443 is MQTT over WebSockets, which Watchpost does not speak)",
                        up.port
                    ),
                    "use mqtts://HUB.azure-devices.net:8883",
                );
            }
            own_login(sink, "a SAS token from shared_access_key");
            no_retain(
                sink,
                "Azure IoT Hub does not keep retained messages and closes the connection of a device that sends one",
            );
            no_qos2(sink, "Azure IoT Hub");
            if let Some((MqttVersion::V5, v)) = &version {
                refuse(
                    sink,
                    v.clone(),
                    "profile \"azure-iot-hub\": Azure IoT Hub's device endpoint speaks MQTT 3.1.1"
                        .into(),
                    "remove `mqtt_version`",
                );
            }
            let key = raw.shared_access_key.as_ref().map(|k| {
                if base64_decode(k.get_ref()).is_none_or(|b| b.is_empty()) {
                    sink.error(
                        k.span(),
                        "`shared_access_key` is not base64",
                        Some("copy the device's primary key from the portal or `az iot hub device-identity show`".into()),
                    );
                }
                Secret(k.get_ref().clone())
            });
            match (&key, &up.client_cert) {
                (None, None) => refuse(
                    sink,
                    at(None),
                    "profile \"azure-iot-hub\": a device proves its identity with a shared access key or an X.509 certificate".into(),
                    "set shared_access_key (the device's primary key), or client_cert and client_key",
                ),
                (Some(_), Some(_)) => refuse(
                    sink,
                    at(span(&raw.shared_access_key)),
                    "profile \"azure-iot-hub\": set either shared_access_key or a client certificate, not both".into(),
                    "",
                ),
                _ => {}
            }
            let token_ttl = sink.duration(&raw.token_ttl, "token_ttl", DEFAULT_TOKEN_TTL);
            if let Some(t) = &raw.token_ttl {
                if token_ttl < Duration::from_secs(60)
                    || token_ttl > Duration::from_secs(365 * 86_400)
                {
                    sink.error(t.span(), "`token_ttl` must be between 1m and 365d", None);
                }
            }
            unused_prefix(sink, &format!("devices/{}/messages/events/", up.client_id));
            // The hub takes the user name and the client id from the device id.
            up.login = Some((
                format!(
                    "{}/{}/?api-version={}",
                    up.host,
                    up.client_id,
                    super::AZURE_API_VERSION
                ),
                Secret(String::new()),
            ));
            delivery.retain = false;
            delivery.max_payload = Some(AZURE_MAX_PAYLOAD);
            delivery.form = Form::Azure { key, token_ttl };
            default_version = MqttVersion::V311;
        }
        Some(Profile::HivemqCloud | Profile::EmqxCloud) => {
            needs_tls(sink);
            if up.login.is_none() {
                refuse(
                    sink,
                    at(None),
                    format!(
                        "profile {cloud:?}: the cloud authenticates a client by user name and password"
                    ),
                    "set username and password (the credentials made in the cloud's console)",
                );
            }
            default_version = MqttVersion::V5;
        }
        Some(Profile::Mqtt5) => {
            if let Some((MqttVersion::V311, v)) = &version {
                refuse(
                    sink,
                    v.clone(),
                    "profile \"mqtt5\" speaks MQTT 5, not 3.1.1".into(),
                    "remove `mqtt_version`, or the profile",
                );
            }
            default_version = MqttVersion::V5;
        }
        Some(Profile::Thingsboard) => {
            own_login(sink, "the access token is the user name");
            no_retain(
                sink,
                "ThingsBoard keeps no retained messages; alerts become telemetry or attributes of the device",
            );
            no_qos2(sink, "ThingsBoard");
            match &raw.access_token {
                Some(t) if !t.get_ref().is_empty() => {
                    up.login = Some((t.get_ref().clone(), Secret(String::new())));
                    if !up.tls {
                        sink.warn(
                            t.span(),
                            "the access token would travel in the clear over mqtt://",
                            Some("use an mqtts:// url".into()),
                        );
                    }
                }
                _ => refuse(
                    sink,
                    at(span(&raw.access_token)),
                    "profile \"thingsboard\": ThingsBoard authenticates the gateway device by its access token".into(),
                    "set access_token to the token of a device created with \"Is gateway\" checked",
                ),
            }
            let attributes = match &raw.alerts_as {
                None => false,
                Some(a) => match a.get_ref().as_str() {
                    "telemetry" => false,
                    "attributes" => true,
                    other => {
                        sink.error(
                            a.span(),
                            format!("`alerts_as` {other:?} is not a form ThingsBoard takes"),
                            Some("use \"telemetry\" (default) or \"attributes\"".into()),
                        );
                        false
                    }
                },
            };
            unused_prefix(
                sink,
                if attributes {
                    "v1/gateway/attributes"
                } else {
                    "v1/gateway/telemetry"
                },
            );
            delivery.retain = false;
            delivery.form = Form::Thingsboard { attributes };
            default_version = MqttVersion::V311;
        }
    }
    delivery.mqtt_version = version.clone().map_or(default_version, |(v, _)| v);
    // rumqttc's MQTT 5 client refuses keep-alives under 5 s (it panics on them).
    if up.keep_alive < MIN_KEEP_ALIVE_V5 {
        let at = span(&raw.keep_alive).unwrap_or(0..0);
        match delivery.mqtt_version {
            MqttVersion::Auto => {
                sink.warn(
                    at,
                    "a keep-alive under 5s: the uplink speaks MQTT 3.1.1 only",
                    Some("MQTT 5 upstream needs keep_alive = \"5s\" or more".into()),
                );
                delivery.mqtt_version = MqttVersion::V311;
            }
            MqttVersion::V5 => sink.error(
                at,
                "MQTT 5 upstream needs a keep-alive of 5s or more",
                Some("raise keep_alive, or set mqtt_version = \"3.1.1\"".into()),
            ),
            MqttVersion::V311 => {}
        }
    }
    delivery
}

/// The shortest keep-alive the MQTT 5 client takes.
pub const MIN_KEEP_ALIVE_V5: Duration = Duration::from_secs(5);

/// Standard base64 (with or without padding), as the clouds' consoles show keys.
pub(crate) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(text.trim()).ok()
}

fn refuse(sink: &mut Sink<'_>, at: Range<usize>, message: String, help: &str) {
    sink.error(at, message, (!help.is_empty()).then(|| help.to_owned()));
}

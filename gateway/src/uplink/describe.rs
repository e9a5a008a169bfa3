//! What the operator reads when the uplink cannot connect or loses its connection: what went
//! wrong and what to check, never a packet (a CONNECT carries the password).

use std::path::PathBuf;

use rumqttc::ConnectionError;
use rumqttc::v5;
use tokio_rustls::rustls::{self, AlertDescription, CertificateError};

use super::{Blamed, link};
use crate::config::Profile;

/// What the uplink trusts and presents, so that a failed connect can say what to check.
/// Holds no secret.
#[derive(Debug, Clone, Default)]
pub(super) struct Setup {
    pub host: String,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub username: Option<String>,
    /// The cloud profile, whose own words some answers are given in.
    pub profile: Option<Profile>,
}

/// A failed connection, for the log and for the uplink's next step.
#[derive(Debug, Clone)]
pub struct Failure {
    /// What went wrong and what to check, in one line without any secret.
    pub text: String,
    /// The connection was made but the answer to CONNECT was no CONNACK the client could
    /// read, or a refusal of the protocol version: the upstream may not speak this version.
    pub version_suspect: bool,
    /// The upstream said why it closed the connection (an MQTT 5 DISCONNECT reason).
    pub server_reason: Option<String>,
}

impl Failure {
    fn plain(text: String) -> Failure {
        Failure {
            text,
            version_suspect: false,
            server_reason: None,
        }
    }
}

/// The log line for a connection that ended right after a publish: which message, what it
/// was, and what the upstream most likely refused in it.
pub(super) fn after_publish(blamed: &Blamed, failure: &Failure) -> String {
    let m = &blamed.message;
    let others = match blamed.others {
        0 => String::new(),
        1 => ", with 1 more unacknowledged".to_owned(),
        n => format!(", with {n} more unacknowledged"),
    };
    let what = format!(
        "the upstream closed the connection {} ms after the gateway sent {} (outbox {}, topic {}, {} bytes, QoS {}{}){others}",
        blamed.after.as_millis(),
        m.id,
        m.seq,
        m.topic,
        m.bytes,
        m.qos,
        if m.retain { ", retained" } else { "" },
    );
    if let Some(reason) = &failure.server_reason {
        let hint = if reason.starts_with("RetainNotSupported") {
            "; set retain = false in [uplink], or the cloud's profile"
        } else if reason.starts_with("QoSNotSupported") {
            "; set qos = 1 in [uplink]"
        } else if reason.starts_with("PacketTooLarge") {
            "; the message is larger than the upstream takes"
        } else if reason.starts_with("TopicNameInvalid") || reason.starts_with("NotAuthorized") {
            "; check the upstream's topic rules and access rules for this topic, and topic_prefix"
        } else {
            ""
        };
        return format!("{what}, saying {reason}{hint}");
    }
    let mut causes = Vec::new();
    if m.retain {
        causes.push(
            "retained messages (set retain = false in [uplink], or the cloud's profile)".to_owned(),
        );
    }
    causes.push(format!("QoS {}", m.qos));
    causes.push(format!("messages of {} bytes", m.bytes));
    causes.push(format!(
        "the topic {} ({} levels; its access rules or topic rules)",
        m.topic,
        m.topic.split('/').count()
    ));
    format!(
        "{what}; it may refuse {}; a profile for the cloud sets what it takes ({})",
        causes.join(", or "),
        failure.text
    )
}

/// An MQTT 3.1.1 connection's failure.
pub(super) fn v4(e: &ConnectionError, setup: &Setup) -> Failure {
    let version_suspect = matches!(
        e,
        ConnectionError::NotConnAck(_)
            | ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::RefusedProtocolVersion
            )
    );
    Failure {
        version_suspect,
        ..Failure::plain(describe(e, setup))
    }
}

/// An MQTT 5 connection's failure.
pub(super) fn v5(e: &v5::ConnectionError, setup: &Setup) -> Failure {
    use v5::ConnectionError as E;
    if let Some(tls) = rustls_error(e) {
        return Failure::plain(describe_tls(tls, setup));
    }
    match e {
        E::MqttState(v5::StateError::ServerDisconnect {
            reason_code,
            reason_string,
        }) => {
            let reason = match reason_string {
                Some(r) if !r.is_empty() => format!("{reason_code:?} ({r})"),
                _ => format!("{reason_code:?}"),
            };
            Failure {
                text: format!("the upstream closed the connection with reason {reason}"),
                version_suspect: false,
                server_reason: Some(reason),
            }
        }
        E::MqttState(v5::StateError::AwaitPingResp) => Failure::plain(
            "the broker stopped answering (no reply to the last keep-alive ping)".into(),
        ),
        E::MqttState(v5::StateError::OutgoingPacketTooLarge { pkt_size, max }) => {
            Failure::plain(format!(
                "a packet of {pkt_size} bytes is over the upstream's maximum packet size of {max}"
            ))
        }
        E::MqttState(state) => Failure {
            version_suspect: true,
            ..Failure::plain(format!("protocol: {state}"))
        },
        E::NotConnAck(_) => Failure {
            version_suspect: true,
            ..Failure::plain(
                "the upstream answered the connect with something other than an MQTT 5 CONNACK"
                    .into(),
            )
        },
        E::ConnectionRefused(code) => match link::v311_code(*code) {
            Some(c) => Failure {
                version_suspect: c == rumqttc::ConnectReturnCode::RefusedProtocolVersion,
                ..Failure::plain(describe_refusal(c, setup))
            },
            None => Failure::plain(format!("the broker refused the connection: {code:?}")),
        },
        E::Tls(rumqttc::TlsError::DNSName(_)) => Failure::plain(format!(
            "TLS: {:?} is neither a host name nor an address a certificate can be checked against",
            setup.host
        )),
        E::Tls(other) => Failure::plain(format!("TLS: {other}")),
        E::Io(io) => Failure::plain(format!("network error: {io}")),
        E::Timeout(_) => Failure::plain("connect timed out".into()),
        other => Failure::plain(other.to_string()),
    }
}

/// One line for the operator: what went wrong connecting, and what to check. Never prints a
/// packet (a CONNECT carries the password).
pub(super) fn describe(e: &ConnectionError, setup: &Setup) -> String {
    if let Some(tls) = rustls_error(e) {
        return describe_tls(tls, setup);
    }
    match e {
        ConnectionError::Tls(rumqttc::TlsError::DNSName(_)) => format!(
            "TLS: {:?} is neither a host name nor an address a certificate can be checked against",
            setup.host
        ),
        ConnectionError::Tls(rumqttc::TlsError::Io(io)) => {
            format!("TLS handshake failed: {io}")
        }
        ConnectionError::Tls(other) => format!("TLS: {other}"),
        ConnectionError::Io(io) => format!("network error: {io}"),
        ConnectionError::ConnectionRefused(code) => describe_refusal(*code, setup),
        ConnectionError::NotConnAck(_) => {
            "the upstream answered the connect with something other than CONNACK; is it an MQTT 3.1.1 broker?".into()
        }
        ConnectionError::NetworkTimeout => "connect timed out".into(),
        ConnectionError::MqttState(rumqttc::StateError::AwaitPingResp) => {
            "the broker stopped answering (no reply to the last keep-alive ping)".into()
        }
        ConnectionError::MqttState(s) => format!("protocol: {s}"),
        other => other.to_string(),
    }
}

/// The rustls error inside `e`, if any. rumqttc hands them over in several wrappings: its own
/// TLS error, or an I/O error from tokio-rustls (during the handshake, or on the first read
/// when a TLS 1.3 server rejects the client certificate after the handshake).
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = e;
    loop {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // `io::Error::source` skips the error it wraps; `get_ref` is that error.
        current = match current.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref()?,
            None => current.source()?,
        };
    }
}

fn describe_tls(e: &rustls::Error, setup: &Setup) -> String {
    let trusted = match &setup.ca_file {
        Some(ca) => format!(
            "ca_file {}; check that it holds the CA that issued the broker's certificate",
            ca.display()
        ),
        None => "the system's root certificates; if the broker's certificate comes from a private CA, set ca_file to that CA".into(),
    };
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "TLS: the upstream's certificate is not signed by a trusted CA (trusting {trusted})"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "TLS: the upstream's certificate is not issued for {:?} ({e}); use a url with a name the certificate lists",
                    setup.host
                )
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!(
                    "TLS: the upstream's certificate has expired, or this machine's clock is wrong ({e})"
                )
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!(
                    "TLS: the upstream's certificate is not valid yet; check this machine's clock ({e})"
                )
            }
            _ => format!("TLS: the upstream's certificate was rejected: {e}"),
        },
        rustls::Error::AlertReceived(alert) => match (alert, &setup.client_cert) {
            (AlertDescription::CertificateRequired, None) => {
                "TLS: the upstream requires a client certificate; set client_cert and client_key"
                    .into()
            }
            (
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied
                | AlertDescription::DecryptError,
                Some(cert),
            ) => format!(
                "TLS: the upstream rejected the client certificate in {} (alert {alert:?}); check that the broker trusts the CA that issued it and that it is still valid",
                cert.display()
            ),
            (AlertDescription::HandshakeFailure, None) => format!(
                "TLS: the upstream ended the handshake (alert {alert:?}); it may require a client certificate (client_cert, client_key)"
            ),
            (AlertDescription::ProtocolVersion | AlertDescription::InsufficientSecurity, _) => {
                format!(
                    "TLS: the upstream and the gateway share no TLS version or cipher suite (alert {alert:?}); the gateway speaks TLS 1.2 and 1.3"
                )
            }
            _ => format!("TLS: the upstream ended the handshake (alert {alert:?})"),
        },
        other => format!("TLS: {other}"),
    }
}

fn describe_refusal(code: rumqttc::ConnectReturnCode, setup: &Setup) -> String {
    use rumqttc::ConnectReturnCode as Code;
    match (code, &setup.username, &setup.client_cert) {
        (Code::BadUserNamePassword | Code::NotAuthorized, Some(_), None)
            if setup.profile == Some(Profile::AzureIotHub) =>
        {
            "the hub refused the device's SAS token; check shared_access_key, that client_id is the device id and that the device is enabled".into()
        }
        (Code::BadUserNamePassword | Code::NotAuthorized, Some(_), _)
            if setup.profile == Some(Profile::Thingsboard) =>
        {
            "ThingsBoard refused the access token; check access_token (the gateway device's token)".into()
        }
        (Code::BadUserNamePassword, Some(user), _) => format!(
            "the broker refused the username or password (user {user:?}); check username and password in [uplink]"
        ),
        // Mosquitto answers a wrong password this way too.
        (Code::NotAuthorized, Some(user), _) => format!(
            "the broker refused the login as user {user:?} (not authorized); check username and password in [uplink] and that the broker lets this user connect"
        ),
        (Code::BadUserNamePassword | Code::NotAuthorized, None, Some(cert)) => format!(
            "the broker refused the identity of the client certificate in {} (not authorized); check that the broker lets it connect",
            cert.display()
        ),
        (Code::BadUserNamePassword | Code::NotAuthorized, None, None) => {
            "the broker refused a connection without a login (not authorized); set username and password, or client_cert and client_key, in [uplink]".into()
        }
        (Code::BadClientId, ..) => {
            "the broker refused the client id; set another client_id in [uplink]".into()
        }
        (Code::ServiceUnavailable, ..) => {
            "the broker refused the connection: service unavailable".into()
        }
        (Code::RefusedProtocolVersion, ..) => {
            "the broker refused the connection: it does not speak MQTT 3.1.1".into()
        }
        (Code::Success, ..) => {
            "the broker answered CONNACK with success but the connect failed".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> Setup {
        Setup {
            host: "broker.example.net".into(),
            ca_file: Some("/etc/watchpost/upstream-ca.pem".into()),
            client_cert: None,
            username: Some("site-17".into()),
            profile: None,
        }
    }

    fn io_wrapped(e: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn connect_failures_say_what_is_wrong_and_what_to_check() {
        use rumqttc::{ConnectReturnCode, TlsError};
        let with_cert = Setup {
            client_cert: Some("/etc/watchpost/gw.crt".into()),
            ..setup()
        };
        let anonymous = Setup {
            username: None,
            ..setup()
        };
        let unknown_issuer = || rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let cases: Vec<(ConnectionError, Setup, &[&str])> = vec![
            (
                ConnectionError::Tls(TlsError::Io(io_wrapped(unknown_issuer()))),
                setup(),
                &[
                    "not signed by a trusted CA",
                    "ca_file /etc/watchpost/upstream-ca.pem",
                ],
            ),
            (
                ConnectionError::Tls(TlsError::TLS(unknown_issuer())),
                Setup {
                    ca_file: None,
                    ..setup()
                },
                &[
                    "not signed by a trusted CA",
                    "system's root certificates",
                    "set ca_file",
                ],
            ),
            (
                ConnectionError::Tls(TlsError::Io(io_wrapped(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName,
                )))),
                setup(),
                &["not issued for \"broker.example.net\""],
            ),
            (
                // TLS 1.3: the server rejects the client certificate after the handshake.
                ConnectionError::MqttState(rumqttc::StateError::Deserialization(
                    rumqttc::Error::Io(io_wrapped(rustls::Error::AlertReceived(
                        AlertDescription::UnknownCA,
                    ))),
                )),
                with_cert,
                &[
                    "rejected the client certificate in /etc/watchpost/gw.crt",
                    "UnknownCA",
                ],
            ),
            (
                ConnectionError::Io(io_wrapped(rustls::Error::AlertReceived(
                    AlertDescription::CertificateRequired,
                ))),
                setup(),
                &[
                    "requires a client certificate",
                    "client_cert and client_key",
                ],
            ),
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword),
                setup(),
                &[
                    "refused the username or password",
                    "\"site-17\"",
                    "check username and password",
                ],
            ),
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized),
                setup(),
                &[
                    "refused the login as user \"site-17\"",
                    "check username and password",
                ],
            ),
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized),
                Setup {
                    client_cert: Some("/etc/watchpost/gw.crt".into()),
                    ..anonymous.clone()
                },
                &["refused the identity of the client certificate in /etc/watchpost/gw.crt"],
            ),
            (
                ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized),
                anonymous,
                &["without a login", "set username and password"],
            ),
        ];
        for (error, setup, expected) in cases {
            let line = describe(&error, &setup);
            for part in expected {
                assert!(
                    line.contains(part),
                    "{part:?} not in {line:?} (from {error:?})"
                );
            }
        }
    }

    #[test]
    fn a_connect_failure_never_prints_a_packet() {
        // rumqttc's own message for this error prints the packet with its Debug, which shows
        // a login in the clear.
        let mut connect = rumqttc::Connect::new("echo");
        connect.login = Some(rumqttc::Login::new("site-17", "hunter2-secret"));
        let error = ConnectionError::NotConnAck(rumqttc::Packet::Connect(connect));
        assert!(error.to_string().contains("hunter2-secret"));
        let line = describe(&error, &setup());
        assert!(!line.contains("hunter2-secret"), "{line}");
        assert!(line.contains("other than CONNACK"), "{line}");
    }
}

//! Clients as a site's devices and intruders run them: with or without credentials, over TCP
//! or TLS, recording every answer the broker gives, and raw sockets for bytes no client
//! library would send.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use crate::wait_until;

/// Options for a client `id` at `addr`, with `login` (username, password) if given.
pub fn options(addr: SocketAddr, id: &str, login: Option<(&str, &str)>) -> MqttOptions {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(1024 * 1024, 1024 * 1024);
    if let Some((user, pass)) = login {
        options.set_credentials(user, pass);
    }
    options
}

/// A rustls client configuration that trusts `ca_pem` and, if given, presents a client
/// certificate (chain PEM, key PEM).
pub fn tls_config(ca_pem: &str, client: Option<(&str, &str)>) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => {
            let chain =
                CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<Vec<_>, _>>()?;
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key.as_bytes())?)?
        }
    };
    Ok(Arc::new(config))
}

/// Switches `options` to TLS with `config`.
pub fn over_tls(mut options: MqttOptions, config: Arc<ClientConfig>) -> MqttOptions {
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    options
}

/// What the broker answered to a CONNECT.
pub enum Answer {
    /// Accepted: the client and its eventloop, CONNACK already read.
    Accepted(AsyncClient, Box<EventLoop>),
    /// Refused with this code.
    Refused(ConnectReturnCode),
    /// The connection failed before an answer (network, TLS).
    Failed(ConnectionError),
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Accepted(..) => f.write_str("Accepted"),
            Answer::Refused(code) => write!(f, "Refused({code:?})"),
            Answer::Failed(e) => write!(f, "Failed({e})"),
        }
    }
}

impl Answer {
    /// The refusal code, if refused.
    pub fn refused(&self) -> Option<ConnectReturnCode> {
        match self {
            Answer::Refused(code) => Some(*code),
            _ => None,
        }
    }
}

/// Connects with `options` and returns the broker's answer within 5 s.
pub async fn connect(options: MqttOptions) -> Result<Answer> {
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let event = tokio::time::timeout_at(deadline.into(), eventloop.poll())
            .await
            .context("no answer to CONNECT within 5 s")?;
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                return Ok(match ack.code {
                    ConnectReturnCode::Success => Answer::Accepted(client, Box::new(eventloop)),
                    code => Answer::Refused(code),
                });
            }
            Ok(_) => {}
            Err(ConnectionError::ConnectionRefused(code)) => return Ok(Answer::Refused(code)),
            Err(e) => return Ok(Answer::Failed(e)),
        }
    }
}

/// Something a [`Watched`] client received or suffered.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    /// A PUBACK for this packet id.
    PubAck(u16),
    /// A PUBREC for this packet id.
    PubRec(u16),
    /// A PUBCOMP for this packet id.
    PubComp(u16),
    /// A SUBACK with these codes.
    SubAck(Vec<SubscribeReasonCode>),
    /// A message.
    Publish(String, Vec<u8>),
    /// The connection failed or was closed.
    Error(String),
}

/// A connected client whose eventloop runs in a task that records what happens.
pub struct Watched {
    /// The client, to publish and subscribe with.
    pub client: AsyncClient,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watched {
    /// Connects with `options`; fails unless the broker accepts.
    pub async fn connect(options: MqttOptions) -> Result<Watched> {
        match connect(options).await? {
            Answer::Accepted(client, eventloop) => Ok(Watched::run(client, *eventloop)),
            other => bail!("the broker did not accept the client: {other:?}"),
        }
    }

    fn run(client: AsyncClient, mut eventloop: EventLoop) -> Watched {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let item = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(a))) => Seen::PubAck(a.pkid),
                    Ok(Event::Incoming(Packet::PubRec(a))) => Seen::PubRec(a.pkid),
                    Ok(Event::Incoming(Packet::PubComp(a))) => Seen::PubComp(a.pkid),
                    Ok(Event::Incoming(Packet::SubAck(a))) => Seen::SubAck(a.return_codes),
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        Seen::Publish(p.topic.clone(), p.payload.to_vec())
                    }
                    Ok(_) => continue,
                    Err(e) => {
                        sink.lock().unwrap().push(Seen::Error(e.to_string()));
                        // rumqttc reconnects on the next poll; do not spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                sink.lock().unwrap().push(item);
            }
        });
        Watched { client, seen, task }
    }

    /// Connects with `options`, subscribes to `filter` and waits for the SUBACK.
    pub async fn subscribed(options: MqttOptions, filter: &str) -> Result<Watched> {
        let watched = Watched::connect(options).await?;
        watched.client.subscribe(filter, QoS::AtLeastOnce).await?;
        watched
            .wait_for(Duration::from_secs(5), |s| matches!(s, Seen::SubAck(_)))
            .await?;
        Ok(watched)
    }

    /// Everything so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until something matching `wanted` was seen; returns it.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        wanted: impl Fn(&Seen) -> bool,
    ) -> Result<Seen> {
        let mut found = None;
        let held = wait_until(timeout, || {
            found = self
                .seen
                .lock()
                .unwrap()
                .iter()
                .find(|s| wanted(s))
                .cloned();
            found.is_some()
        })
        .await;
        match found {
            Some(s) if held => Ok(s),
            _ => bail!("not seen within {timeout:?}; seen: {:#?}", self.seen()),
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A raw MQTT 3.1.1 CONNECT packet for `id` with `login`, for tests that write bytes.
pub fn connect_packet(id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    let mut body = Vec::new();
    let string = |body: &mut Vec<u8>, s: &[u8]| {
        body.extend_from_slice(&(s.len() as u16).to_be_bytes());
        body.extend_from_slice(s);
    };
    string(&mut body, b"MQTT");
    body.push(4);
    body.push(if login.is_some() {
        0b1100_0010
    } else {
        0b0000_0010
    });
    body.extend_from_slice(&30u16.to_be_bytes());
    string(&mut body, id.as_bytes());
    if let Some((user, pass)) = login {
        string(&mut body, user.as_bytes());
        string(&mut body, pass.as_bytes());
    }
    with_header(0x10, &body)
}

/// A raw QoS 0 PUBLISH of `payload` on `topic` (any bytes, even invalid UTF-8).
pub fn publish_packet(topic: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic);
    body.extend_from_slice(payload);
    with_header(0x30, &body)
}

/// `first` byte, remaining length, `body`.
pub fn with_header(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_remaining_length(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// Appends `len` as an MQTT remaining length (7 bits a byte, least significant first).
pub fn put_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

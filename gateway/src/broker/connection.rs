//! One client connection: the only place that touches a client socket.
//!
//! Reads MQTT packets with rumqttd's codec, passes them to the router through the client's
//! in-process link, and writes what the router sends back. Also does what the router leaves
//! to its network layer: the CONNECT handshake and its timeout, client id checks, keep-alive,
//! and the client's last will when the connection ends without a DISCONNECT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::Notification;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{self, ConnAck, ConnectReturnCode, LastWill, Packet, Protocol, Publish};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{Instrument, debug, debug_span};

use super::{Router, client_id_allowed};
use crate::codec;
use crate::stats::Stats;

/// Most packets handed to the router in one go; the rest wait for the next round.
const BATCH: usize = 256;

/// A protocol version the broker serves.
pub(crate) trait Wire: Protocol + Clone + Send + Sync + 'static {
    /// True for MQTT 5.
    const V5: bool;
}

impl Wire for V4 {
    const V5: bool = false;
}

impl Wire for V5 {
    const V5: bool = true;
}

/// What every connection shares.
pub(crate) struct Shared {
    pub(crate) router: Router,
    pub(crate) connect_timeout: Duration,
    pub(crate) max_packet_bytes: usize,
    pub(crate) max_connections: usize,
    pub(crate) stats: Arc<Stats>,
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(protocol::Error),
    #[error("no CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    #[error("first packet was not CONNECT")]
    NotConnect,
    #[error("refused: {0}")]
    Refused(&'static str),
    #[error("unexpected {0} packet from a client")]
    Unexpected(&'static str),
    #[error("broker link: {0}")]
    Link(#[from] Box<LinkError>),
    #[error("broker link setup failed")]
    LinkSetup,
}

/// How a session ended.
enum End {
    /// The client sent DISCONNECT.
    Clean,
    /// The router closed the link (another connection took the client id over).
    Kicked,
    /// The socket closed, keep-alive expired or the client broke the protocol.
    Lost(Option<ConnError>),
}

/// Serves one client until it leaves. Never panics on client input; errors end this
/// connection only.
pub(crate) async fn serve<P: Wire>(
    stream: TcpStream,
    peer: SocketAddr,
    protocol: P,
    shared: Arc<Shared>,
) {
    Stats::inc(&shared.stats.connections);
    let span = debug_span!("client", %peer, client_id = tracing::field::Empty);
    async {
        // Small packets (readings, acks) must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let mut io = Io {
            stats: shared.stats.clone(),
            stream,
            read: BytesMut::with_capacity(1024),
            write: BytesMut::with_capacity(1024),
            protocol,
            max: shared.max_packet_bytes,
        };
        if let Err(e) = session(&mut io, &shared).await {
            debug!(error = %e, "connection closed");
        }
    }
    .instrument(span)
    .await;
    shared
        .stats
        .connections
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
}

async fn session<P: Wire>(io: &mut Io<P>, shared: &Shared) -> Result<(), ConnError> {
    let first = match timeout(shared.connect_timeout, io.read_packet()).await {
        Ok(packet) => packet?,
        Err(_) => return Err(ConnError::ConnectTimeout(shared.connect_timeout)),
    };
    let Packet::Connect(connect, props, will, _will_props, _login) = first else {
        return Err(ConnError::NotConnect);
    };
    let mut client_id = connect.client_id.clone();
    let mut assigned = None;
    if client_id.is_empty() {
        if !connect.clean_session {
            return refuse(
                io,
                ConnectReturnCode::ClientIdentifierNotValid,
                "a persistent session needs a client id",
            )
            .await;
        }
        client_id = format!("watchpost-auto-{:016x}", fastrand::u64(..));
        assigned = Some(client_id.clone());
    } else if !client_id_allowed(&client_id) {
        return refuse(
            io,
            ConnectReturnCode::ClientIdentifierNotValid,
            "client id is reserved or has '+', '#', '/', '$'",
        )
        .await;
    }
    tracing::Span::current().record("client_id", client_id.as_str());

    let alias_max = props.as_ref().and_then(|p| p.topic_alias_max).unwrap_or(0);
    let connect_link = shared.router.connect.clone();
    let (id, clean) = (client_id.clone(), connect.clean_session);
    // Registering blocks until the router answers; keep that off the async workers.
    let (mut link_tx, mut link_rx, ack) =
        tokio::task::spawn_blocking(move || connect_link(&id, clean, alias_max))
            .await
            .map_err(|_| ConnError::LinkSetup)??;
    let Some(Packet::ConnAck(connack, mut connack_props)) = Option::<Packet>::from(ack) else {
        return Err(ConnError::LinkSetup);
    };
    if P::V5 && assigned.is_some() {
        let mut p = connack_props.unwrap_or_default();
        p.assigned_client_identifier = assigned;
        connack_props = Some(p);
    }
    // From here on the router knows the client: every way out goes through the cleanup below.
    io.queue(Packet::ConnAck(connack, connack_props));
    let keep_alive = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let mut session = Session {
        device_prefix: format!("{}/{client_id}/", codec::TOPIC_ROOT),
        reports_as_device: false,
    };
    let end = match io.flush().await {
        Ok(()) => {
            debug!(
                keep_alive = connect.keep_alive,
                clean = connect.clean_session,
                "client connected"
            );
            run(io, &mut link_tx, &mut link_rx, keep_alive, &mut session).await
        }
        Err(e) => End::Lost(Some(e.into())),
    };
    match end {
        End::Clean => Ok(()),
        End::Kicked => Err(ConnError::Refused(
            "taken over by a newer connection with the same client id",
        )),
        End::Lost(error) => {
            // The router only learns of the end from us: publish the will (it never holds
            // one) and take the client off its books.
            let mut last = Vec::with_capacity(2);
            if let Some(LastWill {
                topic,
                message,
                retain,
                ..
            }) = will
            {
                last.push(Packet::Publish(Publish::new(topic, message, retain), None));
            } else if session.reports_as_device {
                // A device without a will that drops off is still gone: say so on its status
                // topic, as its will would have.
                let topic = format!("{}/{client_id}/{}", codec::TOPIC_ROOT, codec::STATUS_METRIC);
                last.push(Packet::Publish(
                    Publish::new(Bytes::from(topic), Bytes::from_static(b"offline"), false),
                    None,
                ));
            }
            last.push(Packet::Disconnect(
                protocol::Disconnect {
                    reason_code: protocol::DisconnectReasonCode::UnspecifiedError,
                },
                None,
            ));
            send_batch(&mut link_tx, last).await?;
            error.map_or(Ok(()), Err)
        }
    }
}

async fn refuse<P: Wire>(
    io: &mut Io<P>,
    code: ConnectReturnCode,
    why: &'static str,
) -> Result<(), ConnError> {
    io.queue(Packet::ConnAck(
        ConnAck {
            session_present: false,
            code,
        },
        None,
    ));
    io.flush().await?;
    Err(ConnError::Refused(why))
}

/// What the connection learns about its client along the way.
struct Session {
    /// `sensors/{client id}/`.
    device_prefix: String,
    /// The client published readings under its own client id as device.
    reports_as_device: bool,
}

async fn run<P: Wire>(
    io: &mut Io<P>,
    link_tx: &mut LinkTx,
    link_rx: &mut LinkRx,
    keep_alive: Option<Duration>,
    session: &mut Session,
) -> End {
    let mut deadline = keep_alive.map(|k| Instant::now() + k);
    loop {
        // Hand every complete packet already read to the router.
        let mut batch = Vec::new();
        let mut disconnected = false;
        loop {
            match io.parse() {
                Ok(Some(packet)) => match packet {
                    Packet::Disconnect(..) => {
                        batch.push(packet);
                        disconnected = true;
                        break;
                    }
                    Packet::Publish(ref publish, _) => {
                        if !session.reports_as_device
                            && publish.topic.starts_with(session.device_prefix.as_bytes())
                        {
                            session.reports_as_device = true;
                        }
                        batch.push(packet);
                    }
                    Packet::Subscribe(..)
                    | Packet::Unsubscribe(..)
                    | Packet::PingReq(..)
                    | Packet::PubAck(..)
                    | Packet::PubRec(..)
                    | Packet::PubRel(..)
                    | Packet::PubComp(..) => batch.push(packet),
                    other => return End::Lost(Some(ConnError::Unexpected(packet_name(&other)))),
                },
                Ok(None) => break,
                Err(e) => return End::Lost(Some(e)),
            }
            if batch.len() >= BATCH {
                break;
            }
        }
        let more_buffered = batch.len() >= BATCH;
        if !batch.is_empty() {
            if let Err(e) = send_batch(link_tx, batch).await {
                return End::Lost(Some(e));
            }
        }
        if disconnected {
            return End::Clean;
        }
        if more_buffered {
            continue;
        }

        let keep_alive_expired = async {
            match deadline {
                Some(d) => sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            read = io.fill() => match read {
                Ok(0) => return End::Lost(None),
                Ok(_) => deadline = keep_alive.map(|k| Instant::now() + k),
                Err(e) => return End::Lost(Some(e.into())),
            },
            notification = link_rx.next() => match notification {
                Ok(Some(n)) => match forward_to_client(io, link_rx, n).await {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Kicked) => return End::Kicked,
                    Err(e) => return End::Lost(Some(e)),
                },
                Ok(None) => {}
                Err(_) => return End::Kicked,
            },
            _ = keep_alive_expired => return End::Lost(Some(ConnError::Refused("keep-alive expired"))),
        }
    }
}

enum Flow {
    Continue,
    Kicked,
}

/// Writes `first` and whatever else the router has queued for this client, then flushes.
async fn forward_to_client<P: Wire>(
    io: &mut Io<P>,
    link_rx: &mut LinkRx,
    first: Notification,
) -> Result<Flow, ConnError> {
    let mut unscheduled = false;
    let mut kicked = false;
    let mut next = Some(first);
    while let Some(n) = next {
        match n {
            Notification::Unschedule => unscheduled = true,
            Notification::Disconnect(d, props) => {
                // MQTT 3.1.1 has no server DISCONNECT: just close.
                if P::V5 {
                    io.queue(Packet::Disconnect(d, props));
                }
                kicked = true;
            }
            other => {
                if let Some(packet) = Option::<Packet>::from(other) {
                    io.queue(packet);
                }
            }
        }
        // Drain without waiting.
        next = link_rx
            .recv_deadline(std::time::Instant::now())
            .ok()
            .flatten();
    }
    io.flush().await?;
    if kicked {
        return Ok(Flow::Kicked);
    }
    if unscheduled {
        // The router parked this link because its buffer filled; tell it we have room.
        link_rx.wake().await.map_err(Box::new)?;
    }
    Ok(Flow::Continue)
}

/// Hands packets to the router; the last `send` wakes it for the whole batch.
async fn send_batch(link_tx: &mut LinkTx, mut batch: Vec<Packet>) -> Result<(), ConnError> {
    let Some(last) = batch.pop() else {
        return Ok(());
    };
    if !batch.is_empty() {
        link_tx.buffer().extend(batch);
    }
    link_tx.send(last).await.map_err(Box::new)?;
    Ok(())
}

fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(..) => "CONNECT",
        Packet::ConnAck(..) => "CONNACK",
        Packet::SubAck(..) => "SUBACK",
        Packet::UnsubAck(..) => "UNSUBACK",
        Packet::PingResp(..) => "PINGRESP",
        _ => "other",
    }
}

/// The socket with its read and write buffers.
struct Io<P> {
    stats: Arc<Stats>,
    stream: TcpStream,
    read: BytesMut,
    write: BytesMut,
    protocol: P,
    max: usize,
}

impl<P: Wire> Io<P> {
    /// The next complete packet in the read buffer, if there is one.
    fn parse(&mut self) -> Result<Option<Packet>, ConnError> {
        match self.protocol.read_mut(&mut self.read, self.max) {
            Ok(p) => Ok(Some(p)),
            Err(protocol::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(ConnError::Protocol(e)),
        }
    }

    /// Reads more bytes; `Ok(0)` means the client closed the socket. Cancel-safe.
    async fn fill(&mut self) -> std::io::Result<usize> {
        if self.read.capacity() - self.read.len() < 512 {
            self.read.reserve(4096);
        }
        let n = self.stream.read_buf(&mut self.read).await?;
        Stats::add(&self.stats.bytes_in, n as u64);
        Ok(n)
    }

    /// Reads until one whole packet is buffered and returns it.
    async fn read_packet(&mut self) -> Result<Packet, ConnError> {
        loop {
            if let Some(p) = self.parse()? {
                return Ok(p);
            }
            if self.fill().await? == 0 {
                return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Encodes `packet` into the write buffer.
    fn queue(&mut self, packet: Packet) {
        let packet = if P::V5 { Some(packet) } else { for_v4(packet) };
        if let Some(packet) = packet {
            if let Err(e) = self.protocol.write(packet, &mut self.write) {
                debug!(error = %e, "packet could not be encoded for this client; skipped");
            }
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.write.is_empty() {
            self.stream.write_all(&self.write).await?;
            self.write.clear();
        }
        Ok(())
    }
}

/// Makes a packet from the router writable as MQTT 3.1.1.
///
/// The router keeps MQTT 5 properties on messages from MQTT 5 publishers and would hand them
/// to a 3.1.1 subscriber as is; rumqttd's 3.1.1 encoder panics on those, so they are removed
/// here. Return codes that 3.1.1 lacks are mapped to the nearest one it has.
fn for_v4(packet: Packet) -> Option<Packet> {
    Some(match packet {
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::ConnAck(mut c, _) => {
            c.code = match c.code {
                code @ (ConnectReturnCode::Success
                | ConnectReturnCode::RefusedProtocolVersion
                | ConnectReturnCode::ClientIdentifierNotValid
                | ConnectReturnCode::ServiceUnavailable
                | ConnectReturnCode::BadUserNamePassword
                | ConnectReturnCode::NotAuthorized) => code,
                ConnectReturnCode::UnsupportedProtocolVersion => {
                    ConnectReturnCode::RefusedProtocolVersion
                }
                ConnectReturnCode::BadAuthenticationMethod => {
                    ConnectReturnCode::BadUserNamePassword
                }
                ConnectReturnCode::Banned => ConnectReturnCode::NotAuthorized,
                _ => ConnectReturnCode::ServiceUnavailable,
            };
            Packet::ConnAck(c, None)
        }
        Packet::PingResp(p) => Packet::PingResp(p),
        // The server never sends these to a 3.1.1 client.
        Packet::Disconnect(..)
        | Packet::Connect(..)
        | Packet::Subscribe(..)
        | Packet::Unsubscribe(..)
        | Packet::PingReq(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::{PubAck, PubAckReason, PublishProperties};

    #[test]
    fn v4_packets_lose_their_v5_properties() {
        let props = PublishProperties {
            content_type: Some("text/plain".into()),
            ..Default::default()
        };
        let p = Packet::Publish(Publish::new("a/b", "1", false), Some(props));
        let mut buf = BytesMut::new();
        // Would panic inside rumqttd's encoder without the conversion.
        V4.write(for_v4(p).unwrap(), &mut buf).unwrap();
        assert!(!buf.is_empty());
        let ack = Packet::PubAck(
            PubAck {
                pkid: 1,
                reason: PubAckReason::Success,
            },
            None,
        );
        assert!(for_v4(ack).is_some());
    }

    #[test]
    fn v5_only_return_codes_map_to_v4_ones() {
        let c = Packet::ConnAck(
            ConnAck {
                session_present: false,
                code: ConnectReturnCode::ServerBusy,
            },
            None,
        );
        let mut buf = BytesMut::new();
        V4.write(for_v4(c).unwrap(), &mut buf).unwrap();
        assert_eq!(&buf[..], &[0x20, 2, 0, 3]);
        let d = Packet::Disconnect(
            protocol::Disconnect {
                reason_code: protocol::DisconnectReasonCode::NormalDisconnection,
            },
            None,
        );
        assert!(for_v4(d).is_none());
    }
}

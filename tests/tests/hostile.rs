//! Clients that break MQTT, byte by byte over real TCP: each gets the reason code the
//! specification names and loses its connection; nobody else notices.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use watchpost::broker::packet::{self, Connect, Packet, Version, reason};
use watchpost_e2e::{Collector, OVERHEAT, Publisher, gateway_config};

const DEADLINE: Duration = Duration::from_secs(10);

/// Everything the gateway sends until it closes the connection.
async fn until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let read = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection stays open: {got:?}");
    got
}

/// The packets in `bytes`, read as `version`.
fn packets(bytes: &[u8], version: Version) -> Vec<Packet> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(p) = packet::decode(&mut buf, version, 1 << 20).expect("well-formed") {
        out.push(p);
    }
    assert!(buf.is_empty(), "a partial packet at the end");
    out
}

/// A connected MQTT 5 client, its CONNACK read.
async fn connected_v5(addr: SocketAddr, id: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let connect = Packet::Connect(Box::new(Connect {
        clean_start: true,
        client_id: id.into(),
        receive_maximum: 65_535,
        request_problem_information: true,
        ..Connect::default()
    }));
    let mut buf = BytesMut::new();
    packet::encode(&connect, Version::V5, &mut buf);
    stream.write_all(&buf).await.unwrap();
    let mut connack = [0u8; 64];
    let n = tokio::time::timeout(DEADLINE, stream.read(&mut connack))
        .await
        .unwrap()
        .unwrap();
    match &packets(&connack[..n], Version::V5)[..] {
        [Packet::ConnAck(c)] => assert_eq!(c.code, reason::SUCCESS),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_get_their_reason_code_and_others_carry_on() {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    let addr = gateway.mqtt_addr();
    let watcher = Collector::subscribe(addr, "sensors/#").await.unwrap();
    let bystander = Publisher::connect(addr, "bystander").await.unwrap();

    // (what, bytes after a good MQTT 5 CONNECT, the DISCONNECT's reason code)
    let table: [(&str, &[u8], u8); 7] = [
        (
            "PUBLISH with QoS 3",
            &[0x36, 0x05, 0x00, 0x01, b't', 0x00, 0x01],
            reason::MALFORMED,
        ),
        (
            "SUBSCRIBE with wrong flags",
            &[0x80, 0x06, 0x00, 0x01, 0x00, 0x00, 0x01, b't'],
            reason::MALFORMED,
        ),
        (
            "a second CONNECT",
            &[
                0x10, 0x0d, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x00, 0x00, 0x00,
                0x00,
            ],
            reason::PROTOCOL_ERROR,
        ),
        (
            // Once found answered with 0x84, which DISCONNECT does not have.
            "a second CONNECT, of MQTT 3.1.1",
            &[
                0x10, 0x0c, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x00, 0x00, 0x00,
            ],
            reason::PROTOCOL_ERROR,
        ),
        (
            "a packet over the maximum size",
            &[0x30, 0xff, 0xff, 0xff, 0x7f],
            reason::PACKET_TOO_LARGE,
        ),
        (
            "a wildcard in a topic name",
            &[0x30, 0x06, 0x00, 0x03, b'a', b'/', b'#', 0x00],
            reason::TOPIC_NAME_INVALID,
        ),
        (
            "a CONNACK from a client",
            &[0x20, 0x03, 0x00, 0x00, 0x00],
            reason::PROTOCOL_ERROR,
        ),
    ];
    for (i, (what, bytes, code)) in table.into_iter().enumerate() {
        let mut hostile = connected_v5(addr, &format!("hostile-{i}")).await;
        hostile.write_all(bytes).await.unwrap();
        let got = until_closed(&mut hostile).await;
        drop(hostile);
        match &packets(&got, Version::V5)[..] {
            [Packet::Disconnect(d)] => {
                assert_eq!(d.code, code, "{what}: {:?}", d.reason_string);
                assert!(d.reason_string.is_some(), "{what}: says why");
            }
            other => panic!("{what}: expected one DISCONNECT, got {other:?}"),
        }
        // Nobody else noticed.
        bystander
            .publish(&format!("sensors/bystander/n{i}"), QoS::AtLeastOnce, "1")
            .await
            .unwrap();
        watcher.wait_for(i + 1, DEADLINE).await.unwrap();
    }
    // Counted once each connection has ended (after the client closed its side).
    let counted = watchpost_e2e::wait_until(DEADLINE, || {
        gateway
            .stats()
            .protocol_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 7
    })
    .await;
    assert!(counted, "each violation counted");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_the_broker_cannot_serve_are_refused_as_each_version_says() {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    let addr = gateway.mqtt_addr();

    // MQTT 3.1 ("MQIsdp", level 3): CONNACK with return code 1, unacceptable protocol version.
    let mut old = TcpStream::connect(addr).await.unwrap();
    let mut connect = vec![0x10, 0x13, 0x00, 0x06];
    connect.extend_from_slice(b"MQIsdp");
    connect.extend_from_slice(&[0x03, 0x02, 0x00, 0x3c, 0x00, 0x05]);
    connect.extend_from_slice(b"old-1");
    old.write_all(&connect).await.unwrap();
    assert_eq!(until_closed(&mut old).await, [0x20, 0x02, 0x00, 0x01]);

    // A protocol name that is not MQTT: not an MQTT client, closed without an answer.
    let mut stranger = TcpStream::connect(addr).await.unwrap();
    stranger
        .write_all(&[
            0x10, 0x0c, 0x00, 0x02, b'h', b'j', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x00,
        ])
        .await
        .unwrap();
    assert!(until_closed(&mut stranger).await.is_empty());

    // A malformed packet from a 3.1.1 client: closed, as 3.1.1 has no DISCONNECT to send.
    let mut v311 = TcpStream::connect(addr).await.unwrap();
    let mut buf = BytesMut::new();
    let hello = Packet::Connect(Box::new(Connect {
        clean_start: true,
        client_id: "v311".into(),
        receive_maximum: 65_535,
        request_problem_information: true,
        ..Connect::default()
    }));
    packet::encode(&hello, Version::V311, &mut buf);
    v311.write_all(&buf).await.unwrap();
    v311.write_all(&[0x36, 0x05, 0x00, 0x01, b't', 0x00, 0x01])
        .await
        .unwrap();
    let got = until_closed(&mut v311).await;
    assert_eq!(got, [0x20, 0x02, 0x00, 0x00], "only the CONNACK");

    // Garbage instead of a CONNECT.
    let mut noise = TcpStream::connect(addr).await.unwrap();
    let _ = noise.write_all(&[0xff; 4096]).await;
    assert!(until_closed(&mut noise).await.is_empty());
    gateway.shutdown().await;
}

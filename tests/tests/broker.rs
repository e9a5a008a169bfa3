//! The embedded broker as clients see it: both protocol versions on one port, the reserved
//! internal client ids, and last wills.

use std::time::Duration;

use rumqttc::{ConnectionError, Event, LastWill, Packet, QoS};
use watchpost_e2e::{Collector, OVERHEAT, Publisher, client, clients, gateway_config};

const DEADLINE: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_publishers_with_properties_reach_mqtt311_subscribers_and_rules() {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    // MQTT 5 clients connect to the same listener as 3.1.1 ones: the CONNECT says which.
    let addr = gateway.mqtt_addr();
    let raw = Collector::subscribe(gateway.mqtt_addr(), "sensors/#")
        .await
        .unwrap();
    let alerts = Collector::subscribe(gateway.mqtt_addr(), "alerts/#")
        .await
        .unwrap();

    use rumqttc::v5::{
        AsyncClient, Event as Event5, MqttOptions, mqttbytes::QoS as QoS5,
        mqttbytes::v5::Packet as Packet5, mqttbytes::v5::PublishProperties,
    };
    let (v5, mut eventloop) = AsyncClient::new(
        MqttOptions::new("sensor-v5", addr.ip().to_string(), addr.port()),
        10,
    );
    let props = PublishProperties {
        content_type: Some("text/plain".into()),
        user_properties: vec![("unit".into(), "C".into())],
        ..Default::default()
    };
    v5.publish_with_properties(
        "sensors/boiler/temperature",
        QoS5::AtLeastOnce,
        false,
        "95.5",
        props,
    )
    .await
    .unwrap();
    let acked = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Event5::Incoming(Packet5::PubAck(_)) = eventloop.poll().await.unwrap() {
                break;
            }
        }
    })
    .await;
    assert!(acked.is_ok(), "no PUBACK for the MQTT 5 client");

    // The 3.1.1 subscriber gets the reading without the 5-only properties.
    let got = raw.wait_for(1, DEADLINE).await.unwrap();
    assert_eq!(
        (got[0].topic.as_str(), got[0].payload.as_slice()),
        ("sensors/boiler/temperature", &b"95.5"[..])
    );
    let alert = alerts.wait_for(1, DEADLINE).await.unwrap();
    assert_eq!(alert[0].json()["value"], 95.5);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_take_the_internal_links_client_id() {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    let alerts = Collector::subscribe(gateway.mqtt_addr(), "alerts/#")
        .await
        .unwrap();

    let (_intruder, mut eventloop) = client(gateway.mqtt_addr(), "watchpost-internal-ingest-0123");
    let refused = tokio::time::timeout(DEADLINE, eventloop.poll())
        .await
        .unwrap();
    assert!(
        matches!(refused, Err(ConnectionError::ConnectionRefused(_))),
        "{refused:?}"
    );

    // Ingest is still on its link.
    let sensor = Publisher::connect(gateway.mqtt_addr(), "boiler")
        .await
        .unwrap();
    sensor
        .publish("sensors/boiler/temperature", QoS::AtLeastOnce, "99")
        .await
        .unwrap();
    assert_eq!(
        alerts.wait_for(1, DEADLINE).await.unwrap()[0].json()["state"],
        "raised"
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_connection_with_the_same_client_id_takes_over() {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    let addr = gateway.mqtt_addr();
    let watcher =
        clients::Watched::subscribed(clients::options(addr, "watcher", None), "sensors/#")
            .await
            .unwrap();
    // The first connection only publishes (no router link), the second subscribes too (it
    // gets one): the takeover works across both kinds.
    let mut will = clients::options(addr, "boiler", None);
    will.set_last_will(LastWill::new(
        "sensors/boiler/status",
        "offline",
        QoS::AtLeastOnce,
        false,
    ));
    let old = clients::Watched::connect(will).await.unwrap();
    old.client
        .publish("sensors/boiler/temperature", QoS::AtLeastOnce, false, "20")
        .await
        .unwrap();
    old.wait_for(DEADLINE, |s| matches!(s, clients::Seen::PubAck(_)))
        .await
        .unwrap();
    let new = clients::Watched::subscribed(
        clients::options(addr, "boiler", None),
        "sensors/boiler/config",
    )
    .await
    .unwrap();
    old.wait_for(DEADLINE, |s| matches!(s, clients::Seen::Error(_)))
        .await
        .expect("the older connection is closed");
    // rumqttc would reconnect and take the id back.
    drop(old);
    new.client
        .publish("sensors/boiler/temperature", QoS::AtLeastOnce, false, "21")
        .await
        .unwrap();
    watcher
        .wait_for(
            DEADLINE,
            |s| matches!(s, clients::Seen::Publish(_, p) if p == b"21"),
        )
        .await
        .unwrap();
    // Taken over is not gone: the old connection's will is not published.
    assert!(
        !watcher
            .seen()
            .iter()
            .any(|s| matches!(s, clients::Seen::Publish(t, _) if t == "sensors/boiler/status")),
        "{:?}",
        watcher.seen()
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_client_s_last_will_is_published() {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    let presence = Collector::subscribe(gateway.mqtt_addr(), "sensors/+/status")
        .await
        .unwrap();

    let (client, mut eventloop) = {
        let addr = gateway.mqtt_addr();
        let mut options = rumqttc::MqttOptions::new("w1", addr.ip().to_string(), addr.port());
        options.set_last_will(LastWill::new(
            "sensors/w1/status",
            "offline",
            QoS::AtLeastOnce,
            false,
        ));
        rumqttc::AsyncClient::new(options, 10)
    };
    client
        .publish("sensors/w1/status", QoS::AtLeastOnce, false, "online")
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, async {
        while !matches!(
            eventloop.poll().await.unwrap(),
            Event::Incoming(Packet::PubAck(_))
        ) {}
    })
    .await
    .unwrap();
    // The socket closes without DISCONNECT.
    drop(eventloop);

    let got = presence.wait_for(2, DEADLINE).await.unwrap();
    let payloads: Vec<_> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert_eq!(payloads, ["online", "offline"]);
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_subscriber_gets_the_newest_retained_message_of_each_topic() {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    let addr = gateway.mqtt_addr();
    let device = Publisher::connect(addr, "d1").await.unwrap();
    let retained = [
        ("sensors/d1/status", "online"),
        ("sensors/d2/status", "online"),
        ("sensors/d2/status", "offline"),
        ("sensors/d3/status", "online"),
        // An empty retained message clears the topic's.
        ("sensors/d3/status", ""),
    ];
    for (topic, payload) in retained {
        device
            .publish_retained(topic, QoS::AtLeastOnce, payload)
            .await
            .unwrap();
    }
    // Retained messages are kept on every topic, readings too.
    device
        .publish_retained("sensors/d1/temperature", QoS::AtLeastOnce, "21.5")
        .await
        .unwrap();
    device.wait_acked(6, DEADLINE).await.unwrap();

    let late = Collector::subscribe(addr, "sensors/#").await.unwrap();
    // A live status afterwards comes after the retained ones, without the flag.
    device
        .publish("sensors/d4/status", QoS::AtLeastOnce, "online")
        .await
        .unwrap();
    let got = late.wait_for(4, DEADLINE).await.unwrap();
    let seen: Vec<_> = got
        .iter()
        .map(|m| {
            (
                m.topic.as_str(),
                String::from_utf8_lossy(&m.payload).into_owned(),
                m.retain,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("sensors/d1/status", "online".to_owned(), true),
            ("sensors/d1/temperature", "21.5".to_owned(), true),
            ("sensors/d2/status", "offline".to_owned(), true),
            ("sensors/d4/status", "online".to_owned(), false),
        ]
    );
    // A subscription that matches none of them gets none.
    let other = Collector::subscribe(addr, "sensors/d9/#").await.unwrap();
    device
        .publish("sensors/d9/status", QoS::AtLeastOnce, "online")
        .await
        .unwrap();
    let got = other.wait_for(1, DEADLINE).await.unwrap();
    assert_eq!(
        (got[0].topic.as_str(), got[0].retain),
        ("sensors/d9/status", false)
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_pings_are_answered() {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    let addr = gateway.mqtt_addr();
    let mut options = rumqttc::MqttOptions::new("pinger", addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(1));
    let (_client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    let mut pongs = 0;
    let _ = tokio::time::timeout(Duration::from_millis(3500), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PingResp)) => pongs += 1,
                Ok(_) => {}
                Err(e) => panic!("connection failed: {e}"),
            }
        }
    })
    .await;
    assert!(
        pongs >= 2,
        "PINGRESPs in 3.5 s with a 1 s keep-alive: {pongs}"
    );
    gateway.shutdown().await;
}

/// MQTT 3.1.1 CONNECT with a clean session, the given keep-alive and a QoS 0 last will.
fn connect_with_will(client_id: &str, keep_alive: u16, will_topic: &str, will: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x06];
    body.extend(keep_alive.to_be_bytes());
    for field in [client_id, will_topic, will] {
        body.extend((field.len() as u16).to_be_bytes());
        body.extend(field.as_bytes());
    }
    assert!(body.len() < 128, "one-byte remaining length");
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_dropped_after_its_keep_alive_and_its_will_fires() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    let presence = Collector::subscribe(gateway.mqtt_addr(), "sensors/+/status")
        .await
        .unwrap();

    let mut socket = tokio::net::TcpStream::connect(gateway.mqtt_addr())
        .await
        .unwrap();
    socket
        .write_all(&connect_with_will(
            "silent",
            1,
            "sensors/silent/status",
            "offline",
        ))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    socket.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK, accepted");
    let connected = std::time::Instant::now();

    // Say nothing more: the broker must give up after 1.5 keep-alives and close the socket.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(DEADLINE, socket.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "socket closed by the broker: {read:?}"
    );
    assert!(
        connected.elapsed() >= Duration::from_secs(1),
        "not before the keep-alive: {:?}",
        connected.elapsed()
    );
    let got = presence.wait_for(1, DEADLINE).await.unwrap();
    assert_eq!(
        (got[0].topic.as_str(), got[0].payload.as_slice()),
        ("sensors/silent/status", &b"offline"[..])
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_without_a_will_that_drops_off_is_reported_offline() {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    let presence = Collector::subscribe(gateway.mqtt_addr(), "sensors/+/status")
        .await
        .unwrap();
    let (pump, mut eventloop) = client(gateway.mqtt_addr(), "pump-7");
    pump.publish("sensors/pump-7/flow", QoS::AtLeastOnce, false, "3.2")
        .await
        .unwrap();
    tokio::time::timeout(DEADLINE, async {
        while !matches!(
            eventloop.poll().await.unwrap(),
            Event::Incoming(Packet::PubAck(_))
        ) {}
    })
    .await
    .unwrap();
    drop(eventloop);
    let got = presence.wait_for(1, DEADLINE).await.unwrap();
    assert_eq!(
        (got[0].topic.as_str(), got[0].payload.as_slice()),
        ("sensors/pump-7/status", &b"offline"[..])
    );

    // A client that never reported as a device leaves no such trace.
    let (_watcher, mut eventloop) = client(gateway.mqtt_addr(), "dashboard");
    tokio::time::timeout(DEADLINE, eventloop.poll())
        .await
        .unwrap()
        .unwrap();
    drop(eventloop);
    let marker = Publisher::connect(gateway.mqtt_addr(), "marker")
        .await
        .unwrap();
    marker
        .publish("sensors/marker/status", QoS::AtLeastOnce, "online")
        .await
        .unwrap();
    let got = presence.wait_for(2, DEADLINE).await.unwrap();
    assert_eq!(
        got[1].topic, "sensors/marker/status",
        "nothing for the dashboard before the marker"
    );
    gateway.shutdown().await;
}

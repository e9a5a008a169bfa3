//! MQTT 3.1.1 and MQTT 5 clients on the broker's one port, with rumqttc's two clients: both
//! directions, QoS 0, 1 and 2, wills, kept sessions that resume after a dropped connection,
//! shared subscriptions, and what an MQTT 5 client is told at CONNECT.

use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::v5::mqttbytes::v5::{ConnectProperties, LastWill as LastWill5, Packet as Packet5};
use rumqttc::v5::{
    AsyncClient as Client5, Event as Event5, EventLoop as EventLoop5, MqttOptions as Options5,
};
use rumqttc::{Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use watchpost_e2e::{OVERHEAT, gateway_config};

const DEADLINE: Duration = Duration::from_secs(20);

/// What a client received: topic, payload, QoS (0..=2) and retain flag.
type Got = (String, String, u8, bool);

/// What a client's event loop saw.
#[derive(Debug)]
enum Seen {
    ConnAck(bool),
    SubAck,
    Publish(Got),
}

/// A client's view: what it saw, in order. Dropping it drops the connection (its event loop
/// stops, without DISCONNECT).
struct View(mpsc::UnboundedReceiver<Seen>, tokio::task::JoinHandle<()>);

impl Drop for View {
    fn drop(&mut self) {
        self.1.abort();
    }
}

impl View {
    async fn next(&mut self) -> Seen {
        tokio::time::timeout(DEADLINE, self.0.recv())
            .await
            .expect("within the deadline")
            .expect("the client is still running")
    }

    /// The session-present flag of the next CONNACK.
    async fn connack(&mut self) -> bool {
        match self.next().await {
            Seen::ConnAck(present) => present,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn suback(&mut self) {
        match self.next().await {
            Seen::SubAck => {}
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    async fn publish(&mut self) -> Got {
        match self.next().await {
            Seen::Publish(got) => got,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Nothing more arrives within a short while.
    async fn quiet(&mut self) {
        if let Ok(Some(extra)) =
            tokio::time::timeout(Duration::from_millis(500), self.0.recv()).await
        {
            panic!("unexpected: {extra:?}");
        }
    }
}

/// Polls an MQTT 5 event loop in the background.
fn drive5(mut eventloop: EventLoop5) -> View {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let seen = match eventloop.poll().await {
                Ok(Event5::Incoming(Packet5::Publish(p))) => Seen::Publish((
                    String::from_utf8_lossy(&p.topic).into_owned(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                    p.qos as u8,
                    p.retain,
                )),
                Ok(Event5::Incoming(Packet5::ConnAck(c))) => Seen::ConnAck(c.session_present),
                Ok(Event5::Incoming(Packet5::SubAck(_))) => Seen::SubAck,
                Ok(_) => continue,
                Err(_) => return,
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    View(rx, task)
}

/// Polls a 3.1.1 event loop in the background.
fn drive4(mut eventloop: rumqttc::EventLoop) -> View {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            let seen = match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => Seen::Publish((
                    p.topic.clone(),
                    String::from_utf8_lossy(&p.payload).into_owned(),
                    p.qos as u8,
                    p.retain,
                )),
                Ok(Event::Incoming(Packet::ConnAck(c))) => Seen::ConnAck(c.session_present),
                Ok(Event::Incoming(Packet::SubAck(_))) => Seen::SubAck,
                Ok(_) => continue,
                Err(_) => return,
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    View(rx, task)
}

fn options5(addr: std::net::SocketAddr, id: &str) -> Options5 {
    let mut o = Options5::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    o
}

fn options4(addr: std::net::SocketAddr, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_and_311_clients_exchange_messages_both_ways_on_one_port() {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    let addr = gateway.mqtt_addr();

    let (five, loop5) = Client5::new(options5(addr, "five"), 16);
    let mut got5 = drive5(loop5);
    let (four, loop4) = rumqttc::AsyncClient::new(options4(addr, "four"), 16);
    let mut got4 = drive4(loop4);
    got5.connack().await;
    got4.connack().await;
    five.subscribe("to/five", QoS5::ExactlyOnce).await.unwrap();
    four.subscribe("to/four", QoS::ExactlyOnce).await.unwrap();
    got5.suback().await;
    got4.suback().await;

    for (qos4, qos5) in [
        (QoS::AtMostOnce, QoS5::AtMostOnce),
        (QoS::AtLeastOnce, QoS5::AtLeastOnce),
        (QoS::ExactlyOnce, QoS5::ExactlyOnce),
    ] {
        four.publish(
            "to/five",
            qos4,
            false,
            format!("from 3.1.1 at {}", qos4 as u8),
        )
        .await
        .unwrap();
        five.publish("to/four", qos5, false, format!("from 5 at {}", qos5 as u8))
            .await
            .unwrap();
        let (topic, payload, qos, _) = got5.publish().await;
        assert_eq!((topic.as_str(), qos), ("to/five", qos4 as u8));
        assert_eq!(payload, format!("from 3.1.1 at {}", qos4 as u8));
        let (topic, payload, qos, _) = got4.publish().await;
        assert_eq!((topic.as_str(), qos), ("to/four", qos5 as u8));
        assert_eq!(payload, format!("from 5 at {}", qos5 as u8));
    }
    got5.quiet().await;
    got4.quiet().await;
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_of_both_versions_reach_subscribers_of_the_other() {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    let addr = gateway.mqtt_addr();
    let (five, loop5) = Client5::new(options5(addr, "watch5"), 16);
    let mut got5 = drive5(loop5);
    let (four, loop4) = rumqttc::AsyncClient::new(options4(addr, "watch4"), 16);
    let mut got4 = drive4(loop4);
    got5.connack().await;
    got4.connack().await;
    five.subscribe("wills/four", QoS5::AtLeastOnce)
        .await
        .unwrap();
    four.subscribe("wills/five", QoS::AtLeastOnce)
        .await
        .unwrap();
    got5.suback().await;
    got4.suback().await;

    // Each dies without DISCONNECT: its event loop is dropped with the socket.
    let mut o = options4(addr, "dies4");
    o.set_last_will(LastWill::new(
        "wills/four",
        "gone 3.1.1",
        QoS::AtLeastOnce,
        false,
    ));
    let (_c4, mut l4) = rumqttc::AsyncClient::new(o, 4);
    while !matches!(
        l4.poll().await.unwrap(),
        Event::Incoming(Packet::ConnAck(_))
    ) {}
    let mut o = options5(addr, "dies5");
    o.set_last_will(LastWill5::new(
        "wills/five",
        "gone 5",
        QoS5::AtLeastOnce,
        false,
        None,
    ));
    let (_c5, mut l5) = Client5::new(o, 4);
    while !matches!(
        l5.poll().await.unwrap(),
        Event5::Incoming(Packet5::ConnAck(_))
    ) {}
    drop(l4);
    drop(l5);
    let (topic, payload, _, _) = got5.publish().await;
    assert_eq!(
        (topic.as_str(), payload.as_str()),
        ("wills/four", "gone 3.1.1")
    );
    let (topic, payload, _, _) = got4.publish().await;
    assert_eq!((topic.as_str(), payload.as_str()), ("wills/five", "gone 5"));
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_sessions_of_both_versions_get_what_was_published_while_they_were_away() {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    let addr = gateway.mqtt_addr();
    let kept5 = || {
        let mut o = options5(addr, "kept5");
        o.set_clean_start(false);
        o.set_connect_properties(ConnectProperties {
            session_expiry_interval: Some(300),
            ..ConnectProperties::new()
        });
        o
    };
    let kept4 = || {
        let mut o = options4(addr, "kept4");
        o.set_clean_session(false);
        o
    };
    // First visit: subscribe, then drop the connection.
    let (c5, loop5) = Client5::new(kept5(), 16);
    let mut view5 = drive5(loop5);
    assert!(!view5.connack().await, "no session yet");
    c5.subscribe("news/#", QoS5::AtLeastOnce).await.unwrap();
    view5.suback().await;
    let (c4, loop4) = rumqttc::AsyncClient::new(kept4(), 16);
    let mut view4 = drive4(loop4);
    view4.connack().await;
    c4.subscribe("news/#", QoS::AtLeastOnce).await.unwrap();
    view4.suback().await;
    // The connections drop (no DISCONNECT): the event loops end with their clients.
    drop((c5, view5, c4, view4));
    let gone = watchpost_e2e::wait_until(DEADLINE, || {
        gateway
            .stats()
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
    })
    .await;
    assert!(gone, "both connections closed");

    // Meanwhile.
    let (p, ploop) = rumqttc::AsyncClient::new(options4(addr, "newsroom"), 16);
    let mut newsroom = drive4(ploop);
    newsroom.connack().await;
    p.subscribe("news/#", QoS::AtLeastOnce).await.unwrap();
    newsroom.suback().await;
    for i in 0..3 {
        p.publish(
            format!("news/{i}"),
            QoS::AtLeastOnce,
            false,
            format!("item {i}"),
        )
        .await
        .unwrap();
    }
    // Routed to every session once the publisher's own subscription has them all.
    for _ in 0..3 {
        newsroom.publish().await;
    }

    // Back: the sessions are there, with what came meanwhile, in order.
    let (_c5, loop5) = Client5::new(kept5(), 16);
    let mut got5 = drive5(loop5);
    assert!(got5.connack().await, "MQTT 5 session present");
    let (_c4, loop4) = rumqttc::AsyncClient::new(kept4(), 16);
    let mut got4 = drive4(loop4);
    assert!(got4.connack().await, "3.1.1 session present");
    for i in 0..3 {
        assert_eq!(got5.publish().await.1, format!("item {i}"));
        assert_eq!(got4.publish().await.1, format!("item {i}"));
    }
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_hands_each_message_to_one_member() {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    let addr = gateway.mqtt_addr();
    let (a, la) = Client5::new(options5(addr, "worker-a"), 16);
    let mut got_a = drive5(la);
    let (b, lb) = rumqttc::AsyncClient::new(options4(addr, "worker-b"), 16);
    let mut got_b = drive4(lb);
    got_a.connack().await;
    got_b.connack().await;
    a.subscribe("$share/workers/jobs/+", QoS5::AtLeastOnce)
        .await
        .unwrap();
    b.subscribe("$share/workers/jobs/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    got_a.suback().await;
    got_b.suback().await;
    let (p, lp) = rumqttc::AsyncClient::new(options4(addr, "boss"), 16);
    let mut boss = drive4(lp);
    boss.connack().await;
    for i in 0..10 {
        p.publish(format!("jobs/{i}"), QoS::AtLeastOnce, false, "do it")
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 10 {
        tokio::select! {
            Some(Seen::Publish(m)) = got_a.0.recv() => seen.push(("a", m.0)),
            Some(Seen::Publish(m)) = got_b.0.recv() => seen.push(("b", m.0)),
            () = tokio::time::sleep(DEADLINE) => panic!("only {} of 10: {seen:?}", seen.len()),
        }
    }
    got_a.quiet().await;
    got_b.quiet().await;
    let mut jobs: Vec<&str> = seen.iter().map(|(_, t)| t.as_str()).collect();
    jobs.sort_unstable();
    jobs.dedup();
    assert_eq!(jobs.len(), 10, "each job once");
    assert!(seen.iter().any(|(w, _)| *w == "a") && seen.iter().any(|(w, _)| *w == "b"));
    gateway.shutdown().await;
}

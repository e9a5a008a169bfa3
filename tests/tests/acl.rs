//! Topic ACLs end to end: named clients with real credentials, MQTT 5 and 3.1.1 clients on
//! the gateway's port, `[[acl]]` rules that allow and deny with `%u` and `%c`, and a reload
//! that takes a permission away from clients that are connected.

use std::path::Path;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;
use watchpost::access::{Credentials, Role};
use watchpost::config;
use watchpost_e2e::clients::{self, Seen as Seen4, Watched};

const DEADLINE: Duration = Duration::from_secs(20);

/// What an MQTT 5 client saw.
#[derive(Debug)]
enum Seen {
    SubAck(Vec<SubscribeReasonCode>),
    PubAck(PubAckReason),
    Publish(String, String),
}

/// An MQTT 5 client with a name and secret, and what it sees, in order.
struct Client {
    client: AsyncClient,
    seen: mpsc::UnboundedReceiver<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Client {
    async fn connect(addr: std::net::SocketAddr, id: &str, name: &str, secret: &str) -> Client {
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_credentials(name, secret);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, seen) = mpsc::unbounded_channel();
        let (connected, is_connected) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut connected = Some(connected);
            loop {
                let seen = match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(c))) => {
                        if let Some(tx) = connected.take() {
                            let _ = tx.send(c.code);
                        }
                        continue;
                    }
                    Ok(Event::Incoming(Packet::SubAck(s))) => Seen::SubAck(s.return_codes),
                    Ok(Event::Incoming(Packet::PubAck(a))) => Seen::PubAck(a.reason),
                    Ok(Event::Incoming(Packet::Publish(p))) => Seen::Publish(
                        String::from_utf8_lossy(&p.topic).into_owned(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                    ),
                    Ok(_) => continue,
                    Err(e) => panic!("client error: {e}"),
                };
                if tx.send(seen).is_err() {
                    return;
                }
            }
        });
        let code = tokio::time::timeout(DEADLINE, is_connected)
            .await
            .expect("CONNACK within the deadline")
            .expect("connected");
        assert_eq!(
            code,
            rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success,
            "{id}"
        );
        Client { client, seen, task }
    }

    async fn next(&mut self) -> Seen {
        tokio::time::timeout(DEADLINE, self.seen.recv())
            .await
            .expect("within the deadline")
            .expect("the client runs")
    }

    /// Subscribes to `filter` at QoS 1; the SUBACK's code.
    async fn subscribe(&mut self, filter: &str) -> SubscribeReasonCode {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        match self.next().await {
            Seen::SubAck(codes) => codes[0],
            other => panic!("expected SUBACK for {filter}, got {other:?}"),
        }
    }

    /// Publishes at QoS 1; the PUBACK's reason.
    async fn publish(&mut self, topic: &str, payload: &str) -> PubAckReason {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload.to_owned())
            .await
            .unwrap();
        match self.next().await {
            Seen::PubAck(reason) => reason,
            other => panic!("expected PUBACK for {topic}, got {other:?}"),
        }
    }

    /// The next message that arrives.
    async fn received(&mut self) -> (String, String) {
        match self.next().await {
            Seen::Publish(topic, payload) => (topic, payload),
            other => panic!("expected a message, got {other:?}"),
        }
    }
}

/// The `[[acl]]` rules before the reload: the dashboard (an operator) may command valves, a
/// device may hear its own commands (%u) and report on its connection's status topic (%c),
/// and nobody may subscribe to anyone's secrets.
const BEFORE: &str = r#"
[[acl]]
client = "dashboard"
allow = "publish"
topics = ["cmd/+/set"]

[[acl]]
role = "device"
allow = "subscribe"
topics = ["cmd/%u/#"]

[[acl]]
role = "device"
allow = "publish"
topics = ["status/%c"]

[[acl]]
everyone = true
deny = "subscribe"
topics = ["sensors/+/secret"]
"#;

/// After the reload: the dashboard may no longer command the boiler, and devices no longer
/// hear commands.
const AFTER: &str = r#"
[[acl]]
client = "dashboard"
deny = "publish"
topics = ["cmd/boiler/#"]

[[acl]]
client = "dashboard"
allow = "publish"
topics = ["cmd/+/set"]

[[acl]]
role = "device"
allow = "publish"
topics = ["status/%c"]
"#;

fn gateway_config(data: &Path, credentials: &Path, acl: &str) -> config::Config {
    let source = format!(
        "[gateway]\nid = \"acl\"\ndata_dir = {:?}\n[broker]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = false\ncredentials = {:?}\n[http]\nlisten = \"off\"\n{acl}",
        data.display().to_string(),
        credentials.display().to_string(),
    );
    match config::parse(&source, "acl.toml") {
        Ok(l) => l.config,
        Err(e) => panic!("{e}\n{source}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_rules_allow_deny_substitute_and_a_reload_revokes() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("credentials.toml");
    let mut c = Credentials::default();
    let valve = c.add("valve", Role::Device).unwrap();
    let boiler = c.add("boiler", Role::Device).unwrap();
    let dashboard = c.add("dashboard", Role::Operator).unwrap();
    c.save(&creds).unwrap();
    let mut gateway = watchpost::start(gateway_config(dir.path(), &creds, BEFORE))
        .await
        .unwrap();
    let addr = gateway.mqtt_addr();
    use PubAckReason as P;
    use SubscribeReasonCode as S;

    let mut ops = Client::connect(addr, "dashboard", "dashboard", &dashboard).await;
    let mut v = Client::connect(addr, "valve@1", "valve", &valve).await;
    // %u: the valve hears its own commands and no one else's.
    assert_eq!(
        v.subscribe("cmd/valve/#").await,
        S::Success(QoS::AtLeastOnce)
    );
    assert_eq!(v.subscribe("cmd/boiler/#").await, S::NotAuthorized);
    assert_eq!(v.subscribe("cmd/+/set").await, S::NotAuthorized);
    // A deny for everyone comes before the operator's default "subscribe to anything".
    assert_eq!(
        ops.subscribe("sensors/+/temperature").await,
        S::Success(QoS::AtLeastOnce)
    );
    assert_eq!(ops.subscribe("sensors/+/secret").await, S::NotAuthorized);
    assert_eq!(ops.subscribe("sensors/#").await, S::NotAuthorized);

    // The dashboard commands the valve, which hears it; other topics are refused (0x87).
    assert_eq!(ops.publish("cmd/valve/set", "open").await, P::Success);
    assert_eq!(v.received().await, ("cmd/valve/set".into(), "open".into()));
    assert_eq!(
        ops.publish("cmd/valve/reboot", "now").await,
        P::NotAuthorized
    );
    assert_eq!(ops.publish("cmd/boiler/set", "on").await, P::Success);
    // %c: the valve reports on its connection's own status topic only.
    assert_eq!(v.publish("status/valve@1", "up").await, P::Success);
    assert_eq!(v.publish("status/valve", "up").await, P::NotAuthorized);
    assert_eq!(
        v.publish("sensors/valve/temperature", "20").await,
        P::Success
    );
    assert_eq!(
        ops.received().await,
        ("sensors/valve/temperature".into(), "20".into())
    );

    // MQTT 3.1.1 says "refused" with 0x80.
    let b = Watched::connect(clients::options(addr, "boiler", Some(("boiler", &boiler))))
        .await
        .unwrap();
    b.client
        .subscribe("cmd/valve/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let ack = b
        .wait_for(DEADLINE, |s| matches!(s, Seen4::SubAck(_)))
        .await
        .unwrap();
    assert!(
        matches!(&ack, Seen4::SubAck(c) if c == &[rumqttc::SubscribeReasonCode::Failure]),
        "{ack:?}"
    );

    // The reload takes the valve's subscription away while it is connected, and the
    // dashboard's permission on the boiler.
    let outcome = gateway
        .reload(gateway_config(dir.path(), &creds, AFTER))
        .await
        .unwrap();
    assert_eq!(outcome.rules, 0);
    assert_eq!(ops.publish("cmd/boiler/set", "on").await, P::NotAuthorized);
    assert_eq!(ops.publish("cmd/valve/set", "close").await, P::Success);
    // The valve's own reading is routed after the command it must not get: if the command
    // still reached it, it would come first.
    assert_eq!(
        v.subscribe("sensors/valve/#").await,
        S::Success(QoS::AtLeastOnce)
    );
    assert_eq!(
        v.publish("sensors/valve/temperature", "21").await,
        P::Success
    );
    assert_eq!(
        v.received().await,
        ("sensors/valve/temperature".into(), "21".into())
    );
    assert_eq!(v.subscribe("cmd/valve/#").await, S::NotAuthorized);
    assert_eq!(
        ops.received().await,
        ("sensors/valve/temperature".into(), "21".into())
    );
    // The dashboard's subscriptions are as allowed as before: the deny rule is gone.
    assert_eq!(
        ops.subscribe("sensors/#").await,
        S::Success(QoS::AtLeastOnce)
    );
    gateway.shutdown().await;
}

//! Retained messages on any topic outlive the gateway: a restart, and a SIGKILL right after
//! their PUBACKs, and they stay within the configured bounds. The real `watchpost` process,
//! a real SQLite file, real MQTT clients on TCP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::QoS;
use watchpost_e2e::{Collector, GatewayProcess, Publisher};

const BIN: &str = env!("CARGO_BIN_EXE_watchpost");
const DEADLINE: Duration = Duration::from_secs(20);

fn write_config(dir: &Path, broker: &str) -> PathBuf {
    let path = dir.join("watchpost.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"site-retained\"\ndata_dir = {:?}\n\
             [broker]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = true\n{broker}\n[http]\nlisten = \"127.0.0.1:0\"\n",
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    path
}

/// Every retained message a new subscriber to `#` gets, as (topic, payload), sorted. A
/// marker published after the subscription arrives after them, so the list is complete.
async fn retained_now(addr: std::net::SocketAddr) -> Vec<(String, String)> {
    let all = Collector::subscribe(addr, "#").await.unwrap();
    let marker = Publisher::connect(addr, "marker").await.unwrap();
    marker
        .publish("zz/marker", QoS::AtLeastOnce, "end")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let got = all.messages();
        if let Some(end) = got.iter().position(|m| m.topic == "zz/marker") {
            let mut retained: Vec<_> = got[..end]
                .iter()
                .inspect(|m| assert!(m.retain, "{} came without the retain flag", m.topic))
                .map(|m| (m.topic.clone(), String::from_utf8_lossy(&m.payload).into()))
                .collect();
            retained.sort();
            return retained;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no marker; got {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes each (topic, payload) retained at QoS 1.
async fn publish_all(client: &Publisher, messages: &[(String, String)]) {
    for (topic, payload) in messages {
        client
            .publish_retained(topic, QoS::AtLeastOnce, payload.as_str())
            .await
            .unwrap();
    }
}

fn topics(n: usize) -> Vec<(String, String)> {
    let mut all: Vec<_> = (0..n)
        .map(|i| match i % 3 {
            0 => (
                format!("homeassistant/sensor/room{i}/config"),
                format!("{{\"name\":\"room {i}\"}}"),
            ),
            1 => (format!("dashboard/{i}/settings"), format!("theme={i}")),
            _ => (format!("cmd/valve-{i}/set"), "closed".to_owned()),
        })
        .collect();
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_retained_messages_survive_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let mut gateway = GatewayProcess::spawn(BIN, &config);
    let addr = gateway.wait_ready(DEADLINE);

    let wanted = topics(60);
    let client = Publisher::connect(addr, "dashboard").await.unwrap();
    publish_all(&client, &wanted).await;
    // An empty payload deletes; a second message replaces.
    let (deleted, _) = &wanted[0];
    client
        .publish_retained(deleted, QoS::AtLeastOnce, "")
        .await
        .unwrap();
    let (replaced, _) = &wanted[1];
    client
        .publish_retained(replaced, QoS::AtLeastOnce, "second")
        .await
        .unwrap();
    client.wait_acked(62, DEADLINE).await.unwrap();
    // No wait: what is acknowledged is on disk.
    gateway.signal(libc::SIGKILL);
    gateway.wait_exit(Duration::from_secs(5)).expect("killed");

    let mut gateway = GatewayProcess::spawn(BIN, &config);
    let addr = gateway.wait_ready(DEADLINE);
    let mut expected: Vec<_> = wanted[1..].to_vec();
    expected[0].1 = "second".into();
    assert_eq!(retained_now(addr).await, expected);
    assert!(
        gateway
            .wait_line("retained messages taken back", DEADLINE)
            .is_some_and(|l| l.contains("taken=59")),
        "{:#?}",
        gateway.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_a_restart_within_their_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "max_retained_messages = 3");
    let mut gateway = GatewayProcess::spawn(BIN, &config);
    let addr = gateway.wait_ready(DEADLINE);

    let wanted = topics(5);
    let client = Publisher::connect(addr, "dashboard").await.unwrap();
    publish_all(&client, &wanted).await;
    // MQTT 3.1.1 cannot refuse a publish: the two beyond the bound are acknowledged, logged
    // and counted, and not kept.
    client.wait_acked(5, DEADLINE).await.unwrap();
    let kept = retained_now(addr).await;
    assert_eq!(
        kept,
        wanted[..3].to_vec(),
        "the first three topics are kept"
    );
    assert!(
        gateway
            .wait_line("max_retained_messages", DEADLINE)
            .is_some(),
        "the refusal is logged: {:#?}",
        gateway.log()
    );
    drop(client);

    gateway.signal(libc::SIGTERM);
    gateway.wait_exit(DEADLINE).expect("stopped");
    let mut gateway = GatewayProcess::spawn(BIN, &config);
    let addr = gateway.wait_ready(DEADLINE);
    assert_eq!(retained_now(addr).await, kept, "the same after a restart");
    gateway.signal(libc::SIGTERM);
    gateway.wait_exit(DEADLINE).expect("stopped");

    // A lower bound at the next start: what is beyond it is not taken back, and says so.
    let config = write_config(dir.path(), "max_retained_messages = 2");
    let mut gateway = GatewayProcess::spawn(BIN, &config);
    let addr = gateway.wait_ready(DEADLINE);
    assert_eq!(retained_now(addr).await.len(), 2);
    assert!(
        gateway
            .wait_line("were not taken back", DEADLINE)
            .is_some_and(|l| l.contains("dropped=1")),
        "{:#?}",
        gateway.log()
    );
}

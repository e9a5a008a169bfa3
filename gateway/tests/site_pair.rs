//! Two gateways at one site (issue 22): the real `watchpost` processes A and B, each naming
//! the other in `[peer]`, a Mosquitto upstream, a fleet of simulated devices that know both
//! gateways, and a probe device that drives one alert episode.
//!
//! - `a_gateway_killed_mid_episode_with_the_upstream_down_loses_nothing`: A is killed with
//!   SIGKILL while an alert is raised and the upstream is paused; the devices move to B; when
//!   the upstream is back it holds the raise and the clear of that one episode (one id), and
//!   B's database alone holds every reading any device handed over.
//! - `a_partition_between_the_two_brings_only_identical_duplicates`: with the path between A
//!   and B broken, an episode starts and ends on A; after the path is mended B raises and
//!   clears it with the same id and the same documents, and both agree on every state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::QoS;
use watchpost::store::Reader;
use watchpost_e2e::failover::{self, KEEP_RAW};
use watchpost_e2e::relay::Relay;
use watchpost_e2e::{Collector, GatewayProcess, Mosquitto, Publisher, free_port, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_watchpost");
const DEVICES: usize = 20;
const SECRET: &str = "a-secret-both-gateways-of-the-site-share";
const WAIT: Duration = Duration::from_secs(20);

/// The site's rule: raised after 1 s above 90 (a deadline, fired by each gateway's time).
const OVERHEAT_FOR_1S: &str = "[[rule]]\nname = \"overheat\"\nmatch = \"sensors/+/temperature\"\nabove = 90.0\nclear_below = 85.0\nfor = \"1s\"\nseverity = \"critical\"\n";

/// One gateway of the pair: its MQTT port is chosen before either starts, since each names
/// the other's.
struct Member {
    id: &'static str,
    dir: tempfile::TempDir,
    port: u16,
}

impl Member {
    fn new(id: &'static str) -> Member {
        Member {
            id,
            dir: tempfile::tempdir().unwrap(),
            port: free_port().unwrap(),
        }
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Writes its configuration: the peer `peer` at `peer_addr`, upstream at `upstream`.
    fn config(&self, peer: &str, peer_addr: SocketAddr, upstream: SocketAddr) -> PathBuf {
        let secret = self.dir.path().join("peer.secret");
        std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
        let path = self.dir.path().join("watchpost.toml");
        let text = format!(
            "[gateway]\nid = \"{id}\"\nsite = \"site\"\ndata_dir = {data:?}\n\
             [broker]\nlisten = \"127.0.0.1:{port}\"\nallow_anonymous = true\n\
             [http]\nlisten = \"127.0.0.1:0\"\n{KEEP_RAW}\
             [uplink]\nurl = \"mqtt://{upstream}\"\nforward = [\"critical\"]\n\
             [peer]\nname = \"{peer}\"\naddress = \"{peer_addr}\"\nsecret_file = {secret:?}\ntakeover_after = \"2s\"\n\
             {OVERHEAT_FOR_1S}",
            id = self.id,
            data = self.data().display().to_string(),
            port = self.port,
            secret = secret.display().to_string(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn start(&self, config: &Path) -> GatewayProcess {
        let mut process = GatewayProcess::spawn(BIN, config);
        process.wait_ready(WAIT);
        process
    }
}

/// For each alert id and state, the gateways that forwarded it.
type ForwardedBy = BTreeMap<(String, String), BTreeSet<String>>;

/// An MQTT 5 subscriber on the upstream: who forwarded what (the `watchpost-gateway` user
/// property).
struct Forwarders {
    seen: std::sync::Arc<std::sync::Mutex<ForwardedBy>>,
    task: tokio::task::JoinHandle<()>,
}

impl Forwarders {
    async fn subscribe(upstream: SocketAddr) -> Forwarders {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{AsyncClient, Event, MqttOptions, mqttbytes::QoS};
        let options = MqttOptions::new("pair-v5", "127.0.0.1", upstream.port());
        let (client, mut events) = AsyncClient::new(options, 64);
        client
            .subscribe("site/alerts/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.unwrap() {
                break;
            }
        }
        let seen: std::sync::Arc<std::sync::Mutex<ForwardedBy>> = Default::default();
        let sink = seen.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            while let Ok(event) = events.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = event {
                    let doc: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                    let key = (
                        doc["id"].as_str().unwrap().to_owned(),
                        doc["state"].as_str().unwrap().to_owned(),
                    );
                    let by = p
                        .properties
                        .iter()
                        .flat_map(|props| props.user_properties.iter())
                        .filter(|(k, _)| k == "watchpost-gateway")
                        .map(|(_, v)| v.clone());
                    sink.lock().unwrap().entry(key).or_default().extend(by);
                }
            }
        });
        Forwarders { seen, task }
    }

    fn get(&self) -> ForwardedBy {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Forwarders {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `path` of the gateway's HTTP endpoint (from its ready line): the body.
fn http(gateway: &mut GatewayProcess, path: &str) -> String {
    let line = expect_line(gateway, "the gateway", "ready");
    let addr: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .expect("the ready line names the HTTP address")
        .parse()
        .unwrap();
    watchpost::http::get_blocking(addr, path).map_or_else(|e| e.to_string(), |(_, body)| body)
}

/// Waits for a log line of `gateway` containing `needle`, or fails with its log.
fn expect_line(gateway: &mut GatewayProcess, who: &str, needle: &str) -> String {
    match gateway.wait_line(needle, WAIT) {
        Some(line) => line,
        None => panic!(
            "{who} never logged {needle:?}; its log: {:#?}",
            gateway.log()
        ),
    }
}

/// Alert documents by (id, state), each as the set of distinct payloads received for it.
fn by_transition(
    messages: &[watchpost_e2e::Received],
) -> BTreeMap<(String, String), BTreeSet<Vec<u8>>> {
    let mut out: BTreeMap<(String, String), BTreeSet<Vec<u8>>> = BTreeMap::new();
    for m in messages {
        let doc = m.json();
        let key = (
            doc["id"].as_str().unwrap().to_owned(),
            doc["state"].as_str().unwrap().to_owned(),
        );
        out.entry(key).or_default().insert(m.payload.clone());
    }
    out
}

/// The last recorded state of every alert id in the database in `data`.
fn alert_states(data: &Path) -> BTreeMap<String, String> {
    Reader::open(data)
        .unwrap()
        .alerts(0)
        .unwrap()
        .into_iter()
        .map(|a| (a.id, a.state))
        .collect()
}

/// Each device's episode as the upstream must see it: one id per device, each state as one
/// document however many times it came. Returns, per device, its id and states.
fn episodes(upstream: &Collector) -> BTreeMap<String, (String, BTreeSet<String>)> {
    let transitions = by_transition(&upstream.messages());
    let mut out: BTreeMap<String, (String, BTreeSet<String>)> = BTreeMap::new();
    for ((id, state), docs) in &transitions {
        assert_eq!(
            docs.len(),
            1,
            "{id} {state}: the duplicates differ: {docs:#?}"
        );
        let device = id.split(':').nth(1).unwrap().to_owned();
        let entry = out
            .entry(device.clone())
            .or_insert_with(|| (id.clone(), BTreeSet::new()));
        assert_eq!(&entry.0, id, "{device} has two ids: {transitions:#?}");
        entry.1.insert(state.clone());
    }
    out
}

/// The probe's episode as the upstream must see it, alone: raised and cleared, one id.
fn assert_one_episode(upstream: &Collector) -> String {
    let episodes = episodes(upstream);
    assert_eq!(episodes.len(), 1, "{episodes:#?}");
    let (id, states) = &episodes["probe"];
    assert_eq!(states.iter().collect::<Vec<_>>(), ["cleared", "raised"]);
    id.clone()
}

/// Waits until `gateway` logs `alert {what}` for `device`.
async fn expect_alert(gateway: &mut GatewayProcess, who: &str, what: &str, device: &str) {
    let (event, name) = (format!("alert {what}"), format!("device=\"{device}\""));
    let found = wait_until(WAIT, || {
        gateway
            .log()
            .iter()
            .any(|l| l.contains(&event) && l.contains(&name))
    })
    .await;
    assert!(
        found,
        "{who} never logged {event} for {device}: {:#?}",
        gateway.log()
    );
}

/// Publishes `value` as `device`'s temperature at QoS 1 and waits for the acknowledgement.
async fn publish(probe: &Publisher, device: &str, value: &str) {
    let before = probe.acked();
    probe
        .publish(
            &format!("sensors/{device}/temperature"),
            QoS::AtLeastOnce,
            value,
        )
        .await
        .unwrap();
    probe.wait_acked(before + 1, WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_episode_with_the_upstream_down_loses_nothing() {
    let upstream = Mosquitto::start().unwrap();
    let collector = Collector::subscribe_persistent(upstream.addr(), "site/alerts/#", "pair-up")
        .await
        .unwrap();
    let (a, b) = (Member::new("gw-a"), Member::new("gw-b"));
    let mut gw_a = a.start(&a.config("gw-b", b.addr(), upstream.addr()));
    let mut gw_b = b.start(&b.config("gw-a", a.addr(), upstream.addr()));
    expect_line(&mut gw_a, "A", "mirroring to the peer");
    expect_line(&mut gw_b, "B", "mirroring to the peer");

    // The fleet publishes to A, and knows B.
    let mut options = failover::fleet(a.addr(), b.addr(), DEVICES);
    options.duration = Duration::from_secs(8);
    let fleet = tokio::task::spawn_blocking(move || watchpost_sim::run(&options));
    assert!(
        wait_until(WAIT, || failover::stored(&b.data(), DEVICES) >= 100).await,
        "B never stored A's mirrored readings"
    );

    // Devices that talk to A: one whole episode with the upstream up.
    let probes = Publisher::connect(a.addr(), "probes").await.unwrap();
    publish(&probes, "early", "95.5").await;
    expect_alert(&mut gw_a, "A", "raised", "early").await;
    expect_alert(&mut gw_b, "B", "raised", "early").await;
    publish(&probes, "early", "80").await;
    expect_alert(&mut gw_b, "B", "cleared", "early").await;

    // With the upstream down, an episode begins and is raised on both; another begins and is
    // still pending (its `for` running) when A dies.
    upstream.pause();
    publish(&probes, "probe", "95.5").await;
    expect_alert(&mut gw_a, "A", "raised", "probe").await;
    expect_alert(&mut gw_b, "B", "raised", "probe").await;
    assert!(
        wait_until(WAIT, || alert_states(&a.data()).len() == 2).await,
        "A never recorded the raise"
    );
    let before_kill = alert_states(&a.data());
    publish(&probes, "pending", "96").await;
    gw_a.signal(libc::SIGKILL);
    gw_a.wait_exit(Duration::from_secs(5)).expect("A killed");
    drop(probes);

    // The devices move to B. B raises the pending one once A has been silent for
    // takeover_after (2 s here), from A's stamp; the probe's episode ends on B.
    let probes = Publisher::connect(b.addr(), "probes").await.unwrap();
    publish(&probes, "probe", "80").await;
    expect_alert(&mut gw_b, "B", "cleared", "probe").await;
    expect_alert(&mut gw_b, "B", "raised", "pending").await;
    upstream.resume();

    let report = fleet.await.unwrap().unwrap();
    // Duplicates may still come: wait for B's outbox to empty, then judge the whole set.
    assert!(
        wait_until(WAIT, || Reader::open(&b.data())
            .unwrap()
            .outbox()
            .unwrap()
            .0
            == 0)
        .await,
        "B's outbox never emptied"
    );
    let expected = |devices: &[(&str, &[&str])]| -> Vec<(String, Vec<String>)> {
        devices
            .iter()
            .map(|(d, s)| (d.to_string(), s.iter().map(|s| s.to_string()).collect()))
            .collect()
    };
    let seen = |upstream: &Collector| -> Vec<(String, Vec<String>)> {
        episodes(upstream)
            .into_iter()
            .map(|(d, (_, s))| (d, s.into_iter().collect()))
            .collect()
    };
    let all = expected(&[
        ("early", &["cleared", "raised"]),
        ("pending", &["raised"]),
        ("probe", &["cleared", "raised"]),
    ]);
    assert!(
        wait_until(WAIT, || seen(&collector) == all).await,
        "upstream: {:#?}",
        episodes(&collector)
    );
    let ids = episodes(&collector);
    assert_eq!(
        before_kill.get(&ids["probe"].0).map(String::as_str),
        Some("raised"),
        "A raised the probe's episode under the same id before it died: {before_kill:?}"
    );

    // Every reading a device handed over, to A or to B, is in B's database alone.
    assert_eq!(report.connected_at_end, DEVICES, "{report}");
    assert!(report.gateway_moves >= DEVICES as u64, "{report}");
    assert_eq!((report.dropped, report.unsent), (0, 0), "{report}");
    assert_eq!(report.acked, report.queued, "{report}");
    for i in 0..DEVICES {
        let device = format!("{}{i}", failover::PREFIX);
        let at_b = failover::stored_seqs(&b.data(), &device);
        let last = *at_b.last().expect("B has the device's readings");
        let missing: Vec<u64> = (0..=last).filter(|s| !at_b.contains(s)).collect();
        assert!(
            missing.is_empty(),
            "{device}: {missing:?} not in B's database"
        );
    }

    // A comes back: it catches up from B, records what it missed (the probe's clear, the
    // pending raise, under B's ids), records nothing twice, and agrees with B on every alert.
    let restarted = std::time::Instant::now();
    let mut gw_a = a.start(&a.config("gw-b", b.addr(), upstream.addr()));
    expect_line(&mut gw_b, "B", "catch-up sent to the peer");
    let agreed = wait_until(WAIT, || alert_states(&a.data()) == alert_states(&b.data())).await;
    assert!(
        agreed,
        "A and B disagree after the restart: {:?} against {:?}",
        alert_states(&a.data()),
        alert_states(&b.data())
    );
    println!(
        "site pair: A restarted and agreed with B on every alert state in {:.2} s",
        restarted.elapsed().as_secs_f64()
    );
    let history = Reader::open(&a.data()).unwrap().alerts(0).unwrap();
    let mut transitions: Vec<(&str, &str)> = history
        .iter()
        .map(|r| (r.id.as_str(), r.state.as_str()))
        .collect();
    transitions.sort();
    let mut want: Vec<(&str, &str)> = ids
        .values()
        .flat_map(|(id, states)| states.iter().map(move |s| (id.as_str(), s.as_str())))
        .collect();
    want.sort();
    assert_eq!(
        transitions, want,
        "A's whole alert history: each transition once"
    );
    assert!(
        wait_until(WAIT, || Reader::open(&a.data())
            .unwrap()
            .outbox()
            .unwrap()
            .0
            == 0)
        .await,
        "A's outbox never emptied"
    );
    assert!(wait_until(WAIT, || seen(&collector) == all).await);
    for gateway in [&mut gw_a, &mut gw_b] {
        gateway.signal(libc::SIGTERM);
        gateway.wait_exit(WAIT).expect("stopped");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_between_the_two_brings_only_identical_duplicates() {
    let upstream = Mosquitto::start().unwrap();
    let collector = Collector::subscribe_persistent(upstream.addr(), "site/alerts/#", "pair-up")
        .await
        .unwrap();
    let (a, b) = (Member::new("gw-a"), Member::new("gw-b"));
    // Each mirror goes through a relay the test can break.
    let (to_b, to_a) = (Relay::to(b.addr()).await, Relay::to(a.addr()).await);
    let mut gw_a = a.start(&a.config("gw-b", to_b.addr, upstream.addr()));
    let mut gw_b = b.start(&b.config("gw-a", to_a.addr, upstream.addr()));
    expect_line(&mut gw_a, "A", "mirroring to the peer");
    expect_line(&mut gw_b, "B", "mirroring to the peer");
    let local_a = Collector::subscribe(a.addr(), "alerts/#").await.unwrap();
    let local_b = Collector::subscribe(b.addr(), "alerts/#").await.unwrap();
    let forwarders = Forwarders::subscribe(upstream.addr()).await;

    assert!(
        wait_until(WAIT, || http(&mut gw_b, "/readyz") == "ready\n").await,
        "{}",
        http(&mut gw_b, "/readyz")
    );
    to_b.partition();
    to_a.partition();
    let probe = Publisher::connect(a.addr(), "probe").await.unwrap();
    probe
        .publish("sensors/probe/temperature", QoS::AtLeastOnce, "95.5")
        .await
        .unwrap();
    probe.wait_acked(1, WAIT).await.unwrap();
    expect_line(&mut gw_a, "A", "alert raised");
    probe
        .publish("sensors/probe/temperature", QoS::AtLeastOnce, "80")
        .await
        .unwrap();
    probe.wait_acked(2, WAIT).await.unwrap();
    expect_line(&mut gw_a, "A", "alert cleared");
    assert!(
        gw_b.log().iter().all(|l| !l.contains("alert raised")),
        "B cannot know of the episode while the path is broken"
    );
    let readyz = http(&mut gw_b, "/readyz");
    assert!(
        readyz.starts_with("degraded: the peer gateway gw-a at"),
        "{readyz}"
    );

    to_b.heal();
    to_a.heal();
    expect_line(&mut gw_b, "B", "alert cleared");
    // Both forwarded both transitions: four messages upstream, two documents.
    collector.wait_for(4, WAIT).await.unwrap();
    assert_one_episode(&collector);
    // Each transition came from both, each naming itself in the MQTT 5 user property.
    let both: BTreeSet<String> = ["gw-a".to_owned(), "gw-b".to_owned()].into();
    assert!(
        wait_until(WAIT, || {
            let f = forwarders.get();
            f.len() == 2 && f.values().all(|by| *by == both)
        })
        .await,
        "{:#?}",
        forwarders.get()
    );
    local_a.wait_for(2, WAIT).await.unwrap();
    local_b.wait_for(2, WAIT).await.unwrap();
    assert_eq!(
        by_transition(&local_a.messages()),
        by_transition(&local_b.messages()),
        "the documents on both gateways' alert topics"
    );
    assert!(
        wait_until(WAIT, || alert_states(&a.data()) == alert_states(&b.data())).await,
        "A and B disagree: {:?} against {:?}",
        alert_states(&a.data()),
        alert_states(&b.data())
    );
    // Both say so, once the mirrors are back (each retries every second): the mirror is up,
    // the peer's devices follow its time again, and the raised alerts agree.
    for (gateway, peer) in [(&mut gw_a, "gw-b"), (&mut gw_b, "gw-a")] {
        let lines = [
            "watchpost_peer_mirror_up 1",
            "watchpost_peer_active 1",
            "watchpost_peer_alerts_differ_seconds 0",
            "watchpost_peer_alerts_raised 0",
        ];
        let healed = wait_until(WAIT, || {
            let metrics = http(gateway, "/metrics");
            lines
                .iter()
                .all(|line| metrics.contains(&format!("\n{line}\n")))
        })
        .await;
        assert!(healed, "{lines:?}: {}", http(gateway, "/metrics"));
        // What each keeps for the other's catch-up: the episode's readings, within the budget.
        let metrics = http(gateway, "/metrics");
        let kept: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("watchpost_peer_catchup_bytes "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(kept > 0 && kept <= 32 << 20, "catch-up: {kept} bytes");
        assert!(
            metrics.contains("\nwatchpost_peer_mirror_queue 0\n"),
            "{metrics}"
        );
        let status = http(gateway, "/status");
        assert!(status.contains(&format!("\"name\":\"{peer}\"")), "{status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_without_the_secret_is_refused_and_no_device_may_mirror() {
    let upstream = Mosquitto::start().unwrap();
    let (a, b) = (Member::new("gw-a"), Member::new("gw-b"));
    let config_a = a.config("gw-b", b.addr(), upstream.addr());
    let config_b = b.config("gw-a", a.addr(), upstream.addr());
    std::fs::write(
        b.dir.path().join("peer.secret"),
        "another-secret-of-enough-bytes\n",
    )
    .unwrap();
    let mut gw_a = a.start(&config_a);
    let mut gw_b = b.start(&config_b);
    expect_line(&mut gw_a, "A", "the peer refused the mirror's login");
    expect_line(&mut gw_b, "B", "the peer refused the mirror's login");

    // A device that publishes a frame on the mirror topic is refused (MQTT 5: a reason
    // code; counted), and B judges nothing of it.
    let device = Publisher::connect(b.addr(), "intruder").await.unwrap();
    device
        .publish(watchpost::peer::MIRROR_TOPIC, QoS::AtLeastOnce, "WPM1")
        .await
        .unwrap();
    device.wait_acked(1, WAIT).await.unwrap();
    let metrics = http(&mut gw_b, "/metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("watchpost_publish_denied_total{") && l.ends_with(" 1")),
        "{metrics}"
    );
    assert!(metrics.contains("\nwatchpost_peer_entries_received_total 0\n"));
    assert!(
        gw_a.log()
            .iter()
            .filter(|l| l.contains("refused the mirror's login"))
            .count()
            == 1,
        "logged once, not at every attempt"
    );
}

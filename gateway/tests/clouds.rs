//! The uplink against a real Mosquitto configured to behave like each cloud it has a profile
//! for, and like an MQTT 5 upstream with limits of its own, with the real `watchpost` binary
//! reading a real configuration file. Each test raises an alert, sees it upstream in the
//! cloud's form, then stops the upstream, clears the alert, starts the upstream again and sees
//! the clear: nothing is lost across an upstream restart.
//!
//! What each stand-in checks of its cloud:
//! - no profile: an MQTT 5 Mosquitto with `retain_available false` and `max_qos 1`, which
//!   closes the connection of a client that publishes retained or with QoS 2;
//! - AWS IoT Core: TLS on 8883 with a CA made here, an X.509 client certificate as the only
//!   identity (`use_identity_as_username`, an ACL on it), QoS 1 at most, no retain (AWS keeps
//!   retained messages, the profile leaves them off; the stand-in refuses them so that the
//!   default is proved), 128 KiB packets;
//! - Azure IoT Hub: TLS on 8883 and a test plugin (`tests/mosquitto/azure_iot_hub.c`) that
//!   checks MQTT 3.1.1, client id = device id, the user name and the SAS token's resource,
//!   expiry and HMAC signature under the device key, and lets the device publish only on its
//!   events topic; no retain, QoS 1 at most;
//! - HiveMQ Cloud, EMQX Cloud, MQTT 5: TLS and a password file, MQTT 5 required of them
//!   (Mosquitto's log names each client's protocol);
//! - ThingsBoard: the access token as user name (an ACL lets only that user write the gateway
//!   API topics), no retain, QoS 1 at most.
//!
//! Two more: an MQTT 3.1.1 upstream that closes the connection after every retained publish
//! (the log names the alert and the cause, the retries back off, the alert stays in the
//! outbox until the upstream takes it), and the plugin refusing a wrong device key.
//!
//! Not run here: the clouds themselves, ALPN on port 443 (Mosquitto 2.0 does not check it; a
//! unit test checks the offer), and a SAS token renewal (at four fifths of `token_ttl`, at
//! least 48 s: too long for CI; the token is made anew at every connect, which these tests do).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::QoS;
use serde_json::Value;
use tempfile::TempDir;
use watchpost_e2e::pki::Pki;
use watchpost_e2e::{
    Collector, GatewayProcess, Publisher, Received, clients, free_port, launch_mosquitto,
    send_signal,
};

const BIN: &str = env!("CARGO_BIN_EXE_watchpost");
const DEADLINE: Duration = Duration::from_secs(20);
const WATCHER_PASSWORD: &str = "watcher-Pa55-3e1d9c";
/// The Azure device's key (base64 of "test-device-key-7d1e4f").
const DEVICE_KEY: &str = "dGVzdC1kZXZpY2Uta2V5LTdkMWU0Zg==";

/// AWS IoT Core and Azure IoT Hub take MQTT on port 8883 only, and their profiles refuse any
/// other port: the tests that play them take turns on it.
static PORT_8883: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---- the upstream ------------------------------------------------------------------------

/// Mosquitto with one listener on loopback and the given settings, persistent so that the
/// watcher's session and queue survive a restart. Killed on drop.
struct Cloud {
    dir: TempDir,
    port: u16,
    body: String,
    child: Option<Child>,
    runs: u32,
}

impl Cloud {
    /// Starts Mosquitto on `port` (a free one if `None`) with `body` after the listener line.
    fn start(port: Option<u16>, body: &str) -> Cloud {
        let dir = tempfile::tempdir().unwrap();
        // Started as root, Mosquitto drops to its own user, which must write its persistence.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut cloud = Cloud {
            dir,
            port: port.unwrap_or(0),
            body: body.to_owned(),
            child: None,
            runs: 0,
        };
        let mut last = None;
        for _ in 0..5 {
            if port.is_none() {
                cloud.port = free_port().unwrap();
            }
            match cloud.spawn() {
                Ok(()) => return cloud,
                Err(e) => last = Some(e),
            }
            if port.is_some() {
                break;
            }
        }
        panic!("mosquitto did not start: {:#}", last.unwrap());
    }

    /// A file in the broker's directory, readable by it.
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        path
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        self.runs += 1;
        let conf = self.dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "persistence true\npersistence_location {}/\nlog_dest stderr\nlog_type all\n\
                 listener {} 127.0.0.1\n{}",
                self.dir.path().display(),
                self.port,
                self.body
            ),
        )?;
        let log = self.dir.path().join(format!("run-{}.log", self.runs));
        self.child = Some(launch_mosquitto(&conf, &[self.port], Some(&log))?);
        Ok(())
    }

    /// Stops the broker as an operator would (SIGTERM: it saves its sessions).
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(child.id(), libc::SIGTERM);
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, with `body` if given.
    fn restart(&mut self, body: Option<&str>) {
        self.stop();
        if let Some(body) = body {
            self.body = body.to_owned();
        }
        self.spawn().expect("mosquitto starts again");
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Everything it logged, over all its runs.
    fn log(&self) -> String {
        (1..=self.runs)
            .map(|run| {
                std::fs::read_to_string(self.dir.path().join(format!("run-{run}.log")))
                    .unwrap_or_default()
            })
            .collect()
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How a watcher proves who it is.
#[derive(Clone, Copy, PartialEq)]
enum Who {
    Anonymous,
    /// User `watcher` with [`WATCHER_PASSWORD`].
    Login,
    /// A client certificate for `watcher` from the test CA.
    Certificate,
}

/// A subscriber to `filter` with a persistent session: what arrives while it reconnects after
/// a restart waits for it. Over TLS, trusting `tls`'s CA, if given.
async fn watcher(cloud: &Cloud, filter: &str, tls: Option<&Pki>, who: Who) -> Collector {
    let login = (who == Who::Login).then_some(("watcher", WATCHER_PASSWORD));
    let id = format!("watcher-{}", cloud.port);
    let mut options = clients::options(cloud.addr(), &id, login);
    if let Some(pki) = tls {
        let cert = (who == Who::Certificate).then(|| pki.issue("watcher", "watcher").unwrap());
        let config = clients::tls_config(
            &pki.ca_pem(),
            cert.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
        )
        .unwrap();
        options = clients::over_tls(options, config);
    }
    Collector::subscribe_options(options, filter)
        .await
        .unwrap_or_else(|e| panic!("the watcher cannot subscribe: {e:#}\n{}", cloud.log()))
}

/// The TLS settings of a listener with the server certificate of `pki`.
fn tls_listener(pki: &Pki) -> String {
    pki.issue("server", "upstream").unwrap();
    let (cert, key) = pki.files("server");
    format!(
        "cafile {}\ncertfile {}\nkeyfile {}\n",
        pki.ca_file().display(),
        cert.display(),
        key.display()
    )
}

fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

// ---- the gateway -------------------------------------------------------------------------

/// A `watchpost` process with the overheat rule and `uplink` as its `[uplink]`, and a sensor
/// connected to it.
struct Site {
    gateway: GatewayProcess,
    sensor: Publisher,
    sent: u64,
    _dir: TempDir,
}

impl Site {
    async fn start(id: &str, uplink: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("watchpost.toml");
        std::fs::write(
            &config,
            format!(
                "[gateway]\nid = \"{id}\"\ndata_dir = {}\n\
                 [broker]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = true\n[http]\nlisten = \"127.0.0.1:0\"\n\
                 [uplink]\n{uplink}\n{}",
                toml_path(&dir.path().join("data")),
                watchpost_e2e::OVERHEAT
            ),
        )
        .unwrap();
        let mut gateway = GatewayProcess::spawn(BIN, &config);
        let addr = gateway.wait_ready(DEADLINE);
        let sensor = Publisher::connect(addr, "boiler-1").await.unwrap();
        Site {
            gateway,
            sensor,
            sent: 0,
            _dir: dir,
        }
    }

    /// The boiler reports `value` °C; returns once the gateway has acknowledged (judged and
    /// committed) it.
    async fn reading(&mut self, value: &str) {
        self.sensor
            .publish("sensors/boiler-1/temperature", QoS::AtLeastOnce, value)
            .await
            .unwrap();
        self.sent += 1;
        self.sensor.wait_acked(self.sent, DEADLINE).await.unwrap();
    }

    /// The first log line containing `needle`, within the deadline.
    fn line(&mut self, needle: &str) -> String {
        match self.gateway.wait_line(needle, DEADLINE) {
            Some(line) => line,
            None => panic!(
                "no log line with {needle:?}; the gateway logged:\n{}",
                self.gateway.log().join("\n")
            ),
        }
    }
}

/// Waits until `watcher` has `n` messages; returns the `n`th.
async fn nth(watcher: &Collector, n: usize, cloud: &Cloud, site: &mut Site) -> Received {
    match watcher.wait_for(n, DEADLINE).await {
        Ok(messages) => messages[n - 1].clone(),
        Err(e) => panic!(
            "{e:#}\ngateway:\n{}\nmosquitto:\n{}",
            site.gateway.log().join("\n"),
            cloud.log()
        ),
    }
}

/// Raises the overheat alert and waits for it upstream; then, with the upstream stopped, clears
/// it, starts the upstream again and waits for the clear.
async fn episode(site: &mut Site, cloud: &mut Cloud, watcher: &Collector) -> (Received, Received) {
    let before = watcher.count();
    site.reading("95").await;
    let raised = nth(watcher, before + 1, cloud, site).await;
    cloud.stop();
    site.line("uplink lost");
    site.reading("70").await;
    cloud.restart(None);
    let cleared = nth(watcher, before + 2, cloud, site).await;
    (raised, cleared)
}

/// The raise and the clear of one episode: `state` as expected, one id.
fn assert_one_episode(raised: &Value, cleared: &Value) {
    assert_eq!(raised["state"], "raised", "{raised}");
    assert_eq!(cleared["state"], "cleared", "{cleared}");
    assert_eq!(raised["id"], cleared["id"]);
    assert_eq!(raised["device"], "boiler-1");
}

// ---- the tests ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_profile_the_uplink_follows_an_mqtt5_upstream_without_retain_or_qos_2() {
    let mut cloud = Cloud::start(
        None,
        "allow_anonymous true\nretain_available false\nmax_qos 1\n",
    );
    let watcher = watcher(&cloud, "site-a/#", None, Who::Anonymous).await;
    // QoS 2 and retain (the default) asked for: the CONNACK says neither is available.
    let mut site = Site::start(
        "site-a",
        &format!("url = \"mqtt://127.0.0.1:{}\"\nqos = 2\n", cloud.port),
    )
    .await;
    let connected = site.line("uplink connected");
    for part in [
        "MQTT 5",
        "retain is not available",
        "QoS 2 is not available",
        "topic aliases",
    ] {
        assert!(connected.contains(part), "{part:?} not in {connected}");
    }
    let (raised, cleared) = episode(&mut site, &mut cloud, &watcher).await;
    for m in [&raised, &cleared] {
        assert_eq!(m.topic, "site-a/alerts/critical/boiler-1/overheat");
    }
    assert_one_episode(&raised.json(), &cleared.json());
    // Mosquitto would have closed the connection over a retained or QoS 2 publish.
    let log = site.gateway.log().join("\n");
    assert!(
        !log.contains("RetainNotSupported") && !log.contains("QoSNotSupported"),
        "{log}"
    );
    assert!(
        cloud.log().contains("as watchpost-site-a (p5"),
        "MQTT 5 spoken"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_closes_after_each_retained_publish_is_named_and_backed_off() {
    let mut cloud = Cloud::start(None, "allow_anonymous true\nretain_available false\n");
    let watcher = watcher(&cloud, "site-b/#", None, Who::Anonymous).await;
    let mut site = Site::start(
        "site-b",
        &format!(
            "url = \"mqtt://127.0.0.1:{}\"\nmqtt_version = \"3.1.1\"\n",
            cloud.port
        ),
    )
    .await;
    site.line("uplink connected");
    site.reading("95").await;
    let first = Instant::now();
    let lost = site.line("uplink lost: the upstream closed the connection");
    eprintln!("{lost}");
    for part in [
        "after the gateway sent site-b:boiler-1:overheat:",
        "topic site-b/alerts/critical/boiler-1/overheat",
        "retained",
        "it may refuse retained messages (set retain = false",
        "it stays in the outbox",
    ] {
        assert!(lost.contains(part), "{part:?} not in {lost}");
    }
    // Each new connection ends the same way; the retries slow down instead of looping twice a
    // second: four more losses take at least 0.25 + 0.5 + 1 + 2 s (the lower bounds of the
    // jittered backoff), where a loop without backoff takes about two seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    while site
        .gateway
        .log()
        .iter()
        .filter(|l| l.contains("uplink lost"))
        .count()
        < 5
    {
        assert!(Instant::now() < deadline, "no fifth loss within 30 s");
        site.gateway
            .wait_line("no such line", Duration::from_millis(100));
    }
    let span = first.elapsed();
    assert!(
        span >= Duration::from_millis(3_750),
        "five losses in {span:?}"
    );
    assert_eq!(watcher.count(), 0);
    // The operator lets the upstream keep retained messages: the alert, still in the outbox,
    // arrives.
    cloud.restart(Some("allow_anonymous true\n"));
    let raised = nth(&watcher, 1, &cloud, &mut site).await;
    assert_eq!(raised.json()["state"], "raised");
    eprintln!("five losses in {span:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_speaks_only_mqtt_311_is_reached_by_falling_back() {
    let upstream = watchpost_e2e::start_rumqttd_v311().unwrap();
    let watcher = Collector::subscribe(upstream, "site-v/alerts/#")
        .await
        .unwrap();
    let mut site = Site::start("site-v", &format!("url = \"mqtt://{upstream}\"\n")).await;
    let fallback = site.line("does not seem to speak MQTT 5");
    eprintln!("{fallback}");
    assert!(fallback.contains("trying MQTT 3.1.1"), "{fallback}");
    let connected = site.line("uplink connected");
    assert!(connected.contains("MQTT 3.1.1"), "{connected}");
    site.reading("95").await;
    let raised = watcher
        .wait_for(1, DEADLINE)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", site.gateway.log().join("\n")));
    assert_eq!(raised[0].topic, "site-v/alerts/critical/boiler-1/overheat");
    assert_eq!(raised[0].json()["state"], "raised");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_iot_core_gets_alerts_from_a_certificate_identity_without_retain() {
    let _turn = PORT_8883.lock().await;
    let pki = Pki::new("Test AWS CA").unwrap();
    let tls = tls_listener(&pki);
    pki.issue("thing", "site-c").unwrap();
    let (cert, key) = pki.files("thing");
    let mut cloud = Cloud::start(Some(8883), "");
    let acl = cloud.file(
        "acl",
        "user site-c\ntopic write site-c/#\nuser watcher\ntopic read #\n",
    );
    cloud.restart(Some(&format!(
        "{tls}require_certificate true\nuse_identity_as_username true\nacl_file {}\n\
         retain_available false\nmax_qos 1\nmax_packet_size 131072\n",
        acl.display()
    )));
    let watcher = watcher(&cloud, "site-c/#", Some(&pki), Who::Certificate).await;
    // 3.1.1 here, so that no CONNACK turns retain off: the profile's default must.
    let mut site = Site::start(
        "site-c",
        &format!(
            "profile = \"aws-iot-core\"\nurl = \"mqtts://127.0.0.1:8883\"\nclient_id = \"site-c\"\n\
             topic_prefix = \"site-c/things\"\nmqtt_version = \"3.1.1\"\nca_file = {}\n\
             client_cert = {}\nclient_key = {}\n",
            toml_path(&pki.ca_file()),
            toml_path(&cert),
            toml_path(&key)
        ),
    )
    .await;
    site.line("uplink connected");
    let (raised, cleared) = episode(&mut site, &mut cloud, &watcher).await;
    for m in [&raised, &cleared] {
        assert_eq!(m.topic, "site-c/things/alerts/critical/boiler-1/overheat");
        assert!(m.topic.matches('/').count() <= 7);
    }
    assert_one_episode(&raised.json(), &cleared.json());
    assert!(
        !site
            .gateway
            .log()
            .join("\n")
            .contains("uplink lost: the upstream closed")
    );
}

/// The Mosquitto plugin that plays Azure IoT Hub's login and topic rules, built for this run.
fn azure_plugin(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/mosquitto/azure_iot_hub.c");
    let plugin = dir.join("azure_iot_hub.so");
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&plugin)
        .arg(&source)
        .arg("-lcrypto")
        .stderr(Stdio::piped())
        .output()
        .expect("cc runs (apt-get install gcc)");
    assert!(
        out.status.success(),
        "building the test plugin failed (apt-get install mosquitto-dev libmosquitto-dev libssl-dev):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    plugin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_iot_hub_gets_alerts_on_the_events_topic_with_a_sas_token() {
    let _turn = PORT_8883.lock().await;
    let pki = Pki::new("Test Azure CA").unwrap();
    let tls = tls_listener(&pki);
    let mut cloud = Cloud::start(Some(8883), "");
    let plugin = azure_plugin(cloud.dir.path());
    let journal = cloud.file("journal", "");
    std::fs::set_permissions(&journal, std::fs::Permissions::from_mode(0o666)).unwrap();
    cloud.restart(Some(&format!(
        "{tls}allow_anonymous false\nplugin {}\nplugin_opt_device site-d\n\
         plugin_opt_username 127.0.0.1/site-d/?api-version=2021-04-12\n\
         plugin_opt_resource 127.0.0.1%2Fdevices%2Fsite-d\nplugin_opt_key {DEVICE_KEY}\n\
         plugin_opt_watcher_password {WATCHER_PASSWORD}\nplugin_opt_journal {}\n\
         retain_available false\nmax_qos 1\nmax_packet_size 262144\n",
        plugin.display(),
        journal.display()
    )));
    let watcher = watcher(&cloud, "devices/#", Some(&pki), Who::Login).await;
    let uplink = |key: &str| {
        format!(
            "profile = \"azure-iot-hub\"\nurl = \"mqtts://127.0.0.1:8883\"\nclient_id = \"site-d\"\n\
             shared_access_key = \"{key}\"\nca_file = {}\n",
            toml_path(&pki.ca_file())
        )
    };

    // A wrong key first: the hub refuses the token, and the log says what to check.
    let mut wrong = Site::start("site-d", &uplink("d3Jvbmcta2V5")).await;
    let refused = wrong.line("uplink cannot connect");
    assert!(
        refused.contains("refused the device's SAS token"),
        "{refused}"
    );
    drop(wrong);
    let journal_text = std::fs::read_to_string(&journal).unwrap();
    assert!(
        journal_text.contains("refused site-d: the signature does not match the device key"),
        "{journal_text}"
    );

    let mut site = Site::start("site-d", &uplink(DEVICE_KEY)).await;
    site.line("uplink connected");
    let (raised, cleared) = episode(&mut site, &mut cloud, &watcher).await;
    let (r, c) = (raised.json(), cleared.json());
    assert_one_episode(&r, &c);
    let id = r["id"].as_str().unwrap().replace(':', "%3A");
    assert_eq!(
        raised.topic,
        format!(
            "devices/site-d/messages/events/$.mid={id}&$.ct=application%2Fjson&$.ce=utf-8&kind=alert\
             &rule=overheat&device=boiler-1&metric=temperature&severity=critical&state=raised&gateway=site-d"
        )
    );
    assert!(
        cleared.topic.ends_with("&state=cleared&gateway=site-d"),
        "{}",
        cleared.topic
    );
    let journal_text = std::fs::read_to_string(&journal).unwrap();
    let accepted = journal_text.matches("accepted site-d: SAS token").count();
    assert!(accepted >= 2, "a token at each connect:\n{journal_text}");
    assert!(!journal_text.contains("denied"), "{journal_text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hivemq_emqx_and_mqtt5_profiles_log_in_over_tls_with_mqtt_5() {
    let pki = Pki::new("Test cluster CA").unwrap();
    let tls = tls_listener(&pki);
    let mut cloud = Cloud::start(None, "allow_anonymous true\n");
    let passwd = cloud.file("passwd", "");
    for (user, password) in [
        ("hive", "hive-Pa55-1"),
        ("emqx", "emqx-Pa55-2"),
        ("m5", "m5-Pa55-3"),
        ("watcher", WATCHER_PASSWORD),
    ] {
        let status = Command::new("mosquitto_passwd")
            .args(["-b"])
            .arg(&passwd)
            .args([user, password])
            .status()
            .expect("mosquitto_passwd runs");
        assert!(status.success());
    }
    std::fs::set_permissions(&passwd, std::fs::Permissions::from_mode(0o644)).unwrap();
    cloud.restart(Some(&format!(
        "{tls}allow_anonymous false\npassword_file {}\n",
        passwd.display()
    )));
    let watcher = watcher(&cloud, "+/alerts/#", Some(&pki), Who::Login).await;
    // `localhost` in the URL: the name the certificate is checked against (and sent as SNI).
    let profiles = [
        ("site-h", "hivemq-cloud", "hive", "hive-Pa55-1", "qos = 2\n"),
        ("site-e", "emqx-cloud", "emqx", "emqx-Pa55-2", ""),
        ("site-m", "mqtt5", "m5", "m5-Pa55-3", ""),
    ];
    let mut sites = Vec::new();
    for (id, profile, user, password, extra) in profiles {
        let mut site = Site::start(
            id,
            &format!(
                "profile = \"{profile}\"\nurl = \"mqtts://localhost:{}\"\nusername = \"{user}\"\n\
                 password = \"{password}\"\nca_file = {}\n{extra}",
                cloud.port,
                toml_path(&pki.ca_file())
            ),
        )
        .await;
        let connected = site.line("uplink connected");
        assert!(connected.contains("MQTT 5"), "{connected}");
        site.reading("95").await;
        sites.push(site);
    }
    let wait = |n| watcher.wait_for(n, DEADLINE);
    wait(3)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cloud.log()));
    cloud.stop();
    for site in &mut sites {
        site.line("uplink lost");
        site.reading("70").await;
    }
    cloud.restart(None);
    let messages = wait(6)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cloud.log()));
    for (id, ..) in profiles {
        let topic = format!("{id}/alerts/critical/boiler-1/overheat");
        let states: Vec<_> = messages
            .iter()
            .filter(|m| m.topic == topic)
            .map(|m| m.json()["state"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(states, ["raised", "cleared"], "{topic}");
        assert!(
            cloud.log().contains(&format!("as watchpost-{id} (p5")),
            "{id} spoke MQTT 5"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thingsboard_gets_alerts_as_telemetry_of_the_device_with_the_token_as_user_name() {
    let pki = Pki::new("Test ThingsBoard CA").unwrap();
    let tls = tls_listener(&pki);
    let mut cloud = Cloud::start(None, "allow_anonymous true\n");
    let acl = cloud.file(
        "acl",
        "user tb-Token-4f2a\ntopic write v1/gateway/telemetry\ntopic write v1/gateway/attributes\n\
         user watcher\ntopic read v1/#\n",
    );
    cloud.restart(Some(&format!(
        "{tls}allow_anonymous true\nacl_file {}\nretain_available false\nmax_qos 1\n",
        acl.display()
    )));
    let watcher = watcher(&cloud, "v1/#", Some(&pki), Who::Login).await;
    let mut site = Site::start(
        "site-t",
        &format!(
            "profile = \"thingsboard\"\nurl = \"mqtts://localhost:{}\"\naccess_token = \"tb-Token-4f2a\"\n\
             ca_file = {}\n",
            cloud.port,
            toml_path(&pki.ca_file())
        ),
    )
    .await;
    site.line("uplink connected");
    let (raised, cleared) = episode(&mut site, &mut cloud, &watcher).await;
    for (m, flag) in [(&raised, 1), (&cleared, 0)] {
        assert_eq!(m.topic, "v1/gateway/telemetry");
        let body = m.json();
        let entries = body["boiler-1"].as_array().expect("the device's entries");
        let values = &entries[0]["values"];
        assert_eq!(values["alert_overheat"], flag, "{body}");
        assert_eq!(values["alert_overheat_severity"], "critical");
        assert!(entries[0]["ts"].as_u64().unwrap() > 1_700_000_000_000);
    }
    assert_eq!(
        raised.json()["boiler-1"][0]["values"]["alert_overheat_id"],
        cleared.json()["boiler-1"][0]["values"]["alert_overheat_id"]
    );
}

//! The uplink over TLS against a real Mosquitto, with a CA, a server certificate and a client
//! certificate made by the test: a login and a client certificate are each accepted, an
//! upstream whose certificate the configured CA did not sign is refused with a clear log line
//! while the gateway keeps serving, and no secret reaches any log line at any level.
//!
//! Every test in this binary logs into one global TRACE subscriber (the gateway's tasks run on
//! the runtime's worker threads, where a thread-local subscriber would miss their lines); each
//! test finds its own lines by the ports and paths that only it uses.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rumqttc::QoS;
use tempfile::TempDir;
use tokio_rustls::rustls::pki_types::PrivateKeyDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use watchpost::Gateway;
use watchpost::config::UplinkConfig;
use watchpost::stats::Stats;
use watchpost_e2e::clients::{self, Seen, Watched};
use watchpost_e2e::pki::Pki;
use watchpost_e2e::{
    Collector, OVERHEAT, Publisher, free_port, gateway_config, launch_mosquitto, wait_until,
};

const DEADLINE: Duration = Duration::from_secs(20);
/// The gateway's upstream password.
const PASSWORD: &str = "uplink-Pa55word-7f3a91c2";
/// The test subscriber's password on the upstream.
const WATCHER_PASSWORD: &str = "watcher-Pa55word-0b8e44d1";
/// Where the alert that [`raise_overheat`] raises arrives upstream.
const ALERT_TOPIC: &str = "site-test/alerts/critical/boiler-1/overheat";

// ---- log capture -------------------------------------------------------------------------

/// Everything logged in this test binary, at every level and for every target (including
/// `log` records from rumqttc and rustls, which the subscriber's log bridge turns into events).
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the global TRACE subscriber once and returns its buffer.
fn captured() -> &'static LogBuffer {
    static LOG: OnceLock<LogBuffer> = OnceLock::new();
    LOG.get_or_init(|| {
        let buffer = LogBuffer::default();
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        buffer
    })
}

/// The log so far.
fn log_text() -> String {
    String::from_utf8_lossy(&captured().0.lock().unwrap()).into_owned()
}

/// Log lines that contain every one of `needles`.
fn log_lines(needles: &[&str]) -> Vec<String> {
    log_text()
        .lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .map(str::to_owned)
        .collect()
}

// ---- certificates ------------------------------------------------------------------------

/// The test CA with what it signed: `server` for the upstream (127.0.0.1 and localhost) and
/// `client`, whose common name `site-test` the upstream takes as the username. An unrelated
/// second CA is a second [`Pki::new`].
fn pki() -> Pki {
    let pki = Pki::new("Watchpost test CA").unwrap();
    pki.issue("server", "upstream").unwrap();
    pki.issue("client", "site-test").unwrap();
    pki
}

/// The private scalar of a P-256 key, in hex, from its PEM (rustls logs other DER structures
/// in hex): in the PKCS#8 DER, the 32 bytes after `02 01 01 04 20` (version 1, then the
/// OCTET STRING that holds it, RFC 5915).
fn private_scalar_hex(key_pem: &str) -> String {
    let der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("a PEM private key");
    let pkcs8 = der.secret_der();
    let marker = [0x02, 0x01, 0x01, 0x04, 0x20];
    let at = pkcs8
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("an EC private key");
    let scalar = &pkcs8[at + marker.len()..at + marker.len() + 32];
    scalar.iter().map(|b| format!("{b:02x}")).collect()
}

/// `path` as a TOML string.
fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

// ---- the upstream ------------------------------------------------------------------------

/// Mosquitto with two TLS listeners on loopback: one that wants a username and password,
/// one that wants a client certificate signed by the test CA (its common name becomes the
/// username). Its files go to the PKI's directory. Killed on drop.
struct Upstream {
    child: Child,
    password_port: u16,
    cert_port: u16,
    log: PathBuf,
}

fn mosquitto_passwd(args: &[&str]) {
    let status = Command::new("mosquitto_passwd")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .expect("mosquitto_passwd runs (apt-get install mosquitto)");
    assert!(status.success(), "mosquitto_passwd {args:?}: {status}");
}

impl Upstream {
    fn start(pki: &Pki) -> Upstream {
        let passwd = pki.dir().join("passwd");
        let passwd_arg = passwd.to_str().unwrap();
        mosquitto_passwd(&["-b", "-c", passwd_arg, "site-test", PASSWORD]);
        mosquitto_passwd(&["-b", passwd_arg, "watcher", WATCHER_PASSWORD]);
        // Mosquitto drops to its own user before it reads the password file.
        std::fs::set_permissions(&passwd, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let (cert, key) = pki.files("server");
        let tls = format!(
            "cafile {}\ncertfile {}\nkeyfile {}\n",
            pki.ca_file().display(),
            cert.display(),
            key.display()
        );
        let mut last = None;
        // A port free a moment ago may be taken by the time Mosquitto binds it: try again.
        for attempt in 0..5 {
            let (password_port, cert_port) = (free_port().unwrap(), free_port().unwrap());
            if password_port == cert_port {
                continue;
            }
            let conf = pki.dir().join(format!("mosquitto-{attempt}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "per_listener_settings true\npersistence false\nlog_dest stderr\nlog_type all\n\
                     listener {password_port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n{tls}\
                     listener {cert_port} 127.0.0.1\nallow_anonymous false\n{tls}\
                     require_certificate true\nuse_identity_as_username true\n",
                    passwd.display()
                ),
            )
            .unwrap();
            let log = pki.dir().join(format!("mosquitto-{attempt}.log"));
            match launch_mosquitto(&conf, &[password_port, cert_port], Some(&log)) {
                Ok(child) => {
                    return Upstream {
                        child,
                        password_port,
                        cert_port,
                        log,
                    };
                }
                Err(e) => last = Some(e),
            }
        }
        let last = last.map_or_else(
            || "no two distinct free ports".to_owned(),
            |e| format!("{e:#}"),
        );
        panic!("mosquitto did not start with TLS listeners: {last}");
    }

    /// Mosquitto's own log, for failure messages.
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A subscriber to the alerts on the upstream's password listener, over TLS, trusting the
/// test CA.
async fn watch(upstream: &Upstream, pki: &Pki) -> Watched {
    let addr = SocketAddr::from(([127, 0, 0, 1], upstream.password_port));
    let id = format!("watcher-{}", upstream.password_port);
    let options = clients::options(addr, &id, Some(("watcher", WATCHER_PASSWORD)));
    let tls = clients::tls_config(&pki.ca_pem(), None).unwrap();
    Watched::subscribed(clients::over_tls(options, tls), "site-test/alerts/#")
        .await
        .unwrap_or_else(|e| {
            panic!(
                "the watcher cannot subscribe over TLS: {e:#}; mosquitto:\n{}",
                upstream.log()
            )
        })
}

/// Waits until the alert that [`raise_overheat`] raises reaches `watcher`; returns its
/// payload as JSON.
async fn alert_upstream(watcher: &Watched, upstream: &Upstream) -> serde_json::Value {
    let arrived = watcher
        .wait_for(
            DEADLINE,
            |s| matches!(s, Seen::Publish(topic, _) if topic == ALERT_TOPIC),
        )
        .await;
    match arrived {
        Ok(Seen::Publish(_, payload)) => serde_json::from_slice(&payload).unwrap_or_else(|e| {
            panic!(
                "the alert is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&payload)
            )
        }),
        Ok(other) => unreachable!("waited for a message, got {other:?}"),
        Err(e) => panic!(
            "nothing arrived on {ALERT_TOPIC}: {e:#}\ngateway uplink log:\n{}\nmosquitto:\n{}",
            log_lines(&["watchpost::uplink"]).join("\n"),
            upstream.log()
        ),
    }
}

// ---- the gateway -------------------------------------------------------------------------

/// An `[uplink]` to `mqtts://127.0.0.1:{port}` with `extra` lines (files, login), compiled by
/// the gateway's own configuration parser.
fn uplink_config(port: u16, extra: &str) -> UplinkConfig {
    let source = format!(
        "[gateway]\nid = \"site-test\"\n[uplink]\nurl = \"mqtts://127.0.0.1:{port}\"\n\
         topic_prefix = \"site-test\"\nforward = [\"critical\"]\nkeep_alive = \"5s\"\n{extra}"
    );
    match watchpost::config::parse(&source, "uplink.toml") {
        Ok(loaded) => loaded.config.uplink.expect("[uplink]"),
        Err(e) => panic!("test uplink does not compile:\n{e}\n---\n{source}"),
    }
}

/// Starts a gateway (the shared test configuration, rule [`OVERHEAT`]) with `uplink`.
async fn start_gateway(uplink: UplinkConfig) -> (Gateway, TempDir) {
    let data = tempfile::tempdir().unwrap();
    let mut config = gateway_config(data.path(), None, OVERHEAT);
    config.uplink = Some(uplink);
    let gateway = watchpost::start(config).await.unwrap();
    (gateway, data)
}

/// A sensor reports 95 °C: the overheat rule raises a critical alert.
async fn raise_overheat(gateway: &Gateway) {
    let sensor = Publisher::connect(gateway.mqtt_addr(), "boiler-1")
        .await
        .unwrap();
    sensor
        .publish("sensors/boiler-1/temperature", QoS::AtLeastOnce, "95")
        .await
        .unwrap();
    sensor.wait_acked(1, DEADLINE).await.unwrap();
}

// ---- the tests ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_over_tls_with_a_private_ca_delivers_alerts() {
    captured();
    let pki = pki();
    let upstream = Upstream::start(&pki);
    let watcher = watch(&upstream, &pki).await;
    let uplink = uplink_config(
        upstream.password_port,
        &format!(
            "ca_file = {}\nusername = \"site-test\"\npassword = {PASSWORD:?}\n",
            toml_path(&pki.ca_file())
        ),
    );
    let (gateway, _data) = start_gateway(uplink).await;

    raise_overheat(&gateway).await;
    let alert = alert_upstream(&watcher, &upstream).await;
    assert_eq!(alert["state"], "raised");
    assert_eq!(alert["device"], "boiler-1");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_certificate_from_another_ca_is_refused_and_the_log_says_so() {
    captured();
    let pki = pki();
    let upstream = Upstream::start(&pki);
    let watcher = watch(&upstream, &pki).await;
    let other = Pki::new("Unrelated test CA").unwrap();
    let wrong_ca = other.ca_file();
    let uplink = uplink_config(
        upstream.password_port,
        &format!(
            "ca_file = {}\nusername = \"site-test\"\npassword = {PASSWORD:?}\n",
            toml_path(&wrong_ca)
        ),
    );
    let (gateway, _data) = start_gateway(uplink).await;
    let stats = gateway.stats().clone();
    let wrong_ca = wrong_ca.display().to_string();
    let refusal = ["WARN", "not signed by a trusted CA", wrong_ca.as_str()];

    // The gateway keeps serving locally: the alert is raised and queued for the upstream.
    let local = Collector::subscribe(gateway.mqtt_addr(), "alerts/#")
        .await
        .unwrap();
    raise_overheat(&gateway).await;
    let raised = local.wait_for(1, DEADLINE).await.unwrap();
    assert_eq!(raised[0].topic, "alerts/critical/boiler-1/overheat");
    assert!(wait_until(DEADLINE, || Stats::get(&stats.outbox_depth) == 1).await);

    // Attempts keep failing on the certificate, including one made after the alert was queued.
    let before = log_lines(&refusal).len();
    assert!(
        wait_until(DEADLINE, || log_lines(&refusal).len() > before).await,
        "no further refusal within {DEADLINE:?}; uplink log:\n{}",
        log_lines(&["watchpost::uplink"]).join("\n")
    );
    assert!(!stats.uplink_connected.load(Ordering::Relaxed));
    assert_eq!(Stats::get(&stats.uplink_acked), 0);
    assert_eq!(Stats::get(&stats.outbox_depth), 1, "the alert stays queued");
    let upstream_seen = watcher.seen();
    assert!(
        !upstream_seen.iter().any(|s| matches!(s, Seen::Publish(..))),
        "nothing reached the upstream: {upstream_seen:?}"
    );
    let line = &log_lines(&refusal)[0];
    assert!(
        line.contains(&format!("ca_file {wrong_ca}; check that it holds the CA")),
        "{line}"
    );
    eprintln!("the refusal as logged:\n{line}");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_accepted_where_the_upstream_requires_one() {
    captured();
    let pki = pki();
    let upstream = Upstream::start(&pki);
    let watcher = watch(&upstream, &pki).await;
    let (client_cert, client_key) = pki.files("client");
    let uplink = uplink_config(
        upstream.cert_port,
        &format!(
            "ca_file = {}\nclient_cert = {}\nclient_key = {}\n",
            toml_path(&pki.ca_file()),
            toml_path(&client_cert),
            toml_path(&client_key)
        ),
    );
    let (gateway, _data) = start_gateway(uplink).await;

    raise_overheat(&gateway).await;
    let alert = alert_upstream(&watcher, &upstream).await;
    assert_eq!(alert["state"], "raised");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_password_or_client_key_appears_in_any_log_line_at_any_level() {
    captured();
    let pki = pki();
    let upstream = Upstream::start(&pki);
    let watcher = watch(&upstream, &pki).await;
    let ca = toml_path(&pki.ca_file());
    let (client_cert, client_key) = pki.files("client");
    let client_key_pem = std::fs::read_to_string(&client_key).unwrap();

    // Both secrets in use: the key signs the TLS handshake, the password rides in CONNECT.
    let uplink = uplink_config(
        upstream.cert_port,
        &format!(
            "ca_file = {ca}\nclient_cert = {}\nclient_key = {}\nusername = \"site-test\"\npassword = {PASSWORD:?}\n",
            toml_path(&client_cert),
            toml_path(&client_key)
        ),
    );
    let (gateway, _data) = start_gateway(uplink).await;
    raise_overheat(&gateway).await;
    alert_upstream(&watcher, &upstream).await;
    gateway.shutdown().await;

    // And a refused password, whose failure is logged.
    let wrong_password = "wrong-Pa55word-91d0c7e3";
    let uplink = uplink_config(
        upstream.password_port,
        &format!("ca_file = {ca}\nusername = \"site-test\"\npassword = {wrong_password:?}\n"),
    );
    let (gateway, _data) = start_gateway(uplink).await;
    let target = format!("mqtts://127.0.0.1:{}", upstream.password_port);
    let refused = ["WARN", "refused", "\"site-test\"", target.as_str()];
    assert!(
        wait_until(DEADLINE, || !log_lines(&refused).is_empty()).await,
        "no refusal logged; uplink log:\n{}",
        log_lines(&["watchpost::uplink"]).join("\n")
    );
    gateway.shutdown().await;

    let log = log_text();
    // The capture demonstrably works, at every level and for other crates' `log` records.
    let connected = format!("upstream=mqtts://127.0.0.1:{}", upstream.cert_port);
    assert!(
        !log_lines(&["INFO", "uplink connected", &connected]).is_empty(),
        "the uplink's connect line is missing from the capture"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("TRACE") && l.contains("rustls"))
    );
    assert!(
        log.lines()
            .any(|l| l.contains("DEBUG") && l.contains("rumqttc"))
    );

    for secret in [PASSWORD, wrong_password] {
        let leaks = log_lines(&[secret]);
        assert!(leaks.is_empty(), "a password is logged: {leaks:#?}");
    }
    let key_body: Vec<&str> = client_key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && !l.is_empty())
        .collect();
    assert!(!key_body.is_empty());
    for line in &key_body {
        assert!(!log.contains(line), "the client key is logged");
    }
    assert!(
        !log.contains(&key_body.concat()),
        "the client key is logged"
    );
    assert!(
        !log.to_ascii_lowercase()
            .contains(&private_scalar_hex(&client_key_pem)),
        "the client key is logged in hex"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_key_from_another_certificate_stops_the_start_naming_both_files() {
    captured();
    let pki = pki();
    let (client_cert, _) = pki.files("client");
    let (_, server_key) = pki.files("server");
    let uplink = uplink_config(
        8883,
        &format!(
            "ca_file = {}\nclient_cert = {}\nclient_key = {}\n",
            toml_path(&pki.ca_file()),
            toml_path(&client_cert),
            toml_path(&server_key)
        ),
    );
    let data = tempfile::tempdir().unwrap();
    let mut config = gateway_config(data.path(), None, OVERHEAT);
    config.uplink = Some(uplink);
    let message = match watchpost::start(config).await {
        Ok(_) => panic!("the gateway started with a key that does not match its certificate"),
        Err(e) => e.to_string(),
    };
    for part in [
        client_cert.display().to_string(),
        server_key.display().to_string(),
        "check that the key is the one the certificate was issued for".into(),
    ] {
        assert!(message.contains(&part), "{part:?} not in {message}");
    }
}

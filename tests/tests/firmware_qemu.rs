//! The real firmware image under QEMU (mps2-an386, Cortex-M4F) against a real gateway.
//!
//! The image is built on first use (`cargo build --release --locked` in
//! `firmware/boards/qemu-mps2-an386`, its own target directory). QEMU's UART0 is the test's
//! pipe: the firmware logs there and the test scripts its simulated sensor through it. UART1
//! goes over TCP to a [`Modem`]: a transparent serial-to-TCP bridge, as a board with a modem
//! on a UART has. The bridge has no link state to give the firmware, exactly like a UART, so the
//! firmware must find a dead gateway by its own keep-alive.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use watchpost::codec::{self, Limits, Message};
use watchpost::config::UplinkConfig;
use watchpost::rules::Severity;
use watchpost_e2e::{
    Collector, Mosquitto, OVERHEAT, Received, gateway_config, shipped_config, wait_until,
};

const DEADLINE: Duration = Duration::from_secs(30);
/// The device id the image is built with (the board's default).
const DEVICE: &str = "qemu-1";

fn board_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware/boards/qemu-mps2-an386")
}

/// Builds the QEMU image once per test run and returns its path.
fn image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = board_dir();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let output = Command::new(&cargo)
            .args(["build", "--release", "--locked", "--bin", "sensor"])
            .current_dir(&dir)
            // The board has its own target, target directory and profile.
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("WATCHPOST_DEVICE_ID")
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
        assert!(
            output.status.success(),
            "building the QEMU image failed; run it yourself to see why:\n  \
             cd firmware/boards/qemu-mps2-an386 && cargo build --release --locked\n\
             (it needs `rustup target add thumbv7em-none-eabihf`)\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let elf = dir.join("target/thumbv7em-none-eabihf/release/sensor");
        assert!(elf.exists(), "the build did not produce {}", elf.display());
        elf
    })
}

/// The firmware running under QEMU. Killed on drop.
struct Qemu {
    child: Child,
    stdin: ChildStdin,
    log: Arc<Mutex<Vec<String>>>,
}

impl Qemu {
    /// Boots the image with UART1 connected to `uart1` (a TCP server).
    fn boot(uart1: SocketAddr) -> Qemu {
        let elf = image();
        let mut child = Command::new("qemu-system-arm")
            .args(["-machine", "mps2-an386", "-cpu", "cortex-m4"])
            .args(["-display", "none", "-monitor", "none"])
            .args(["-serial", "stdio", "-serial"])
            .arg(format!("tcp:{uart1}"))
            .arg("-kernel")
            .arg(elf)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start qemu-system-arm ({e}): apt-get install qemu-system-arm")
            });
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Qemu { child, stdin, log }
    }

    /// Sends one script line to the simulated sensor, e.g. `temperature=95.5`.
    fn script(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn count(&self, prefix: &str) -> usize {
        self.lines()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    /// Waits until the firmware has logged `n` lines starting with `prefix`.
    async fn wait_log(&self, prefix: &str, n: usize) {
        assert!(
            wait_until(DEADLINE, || self.count(prefix) >= n).await,
            "the firmware did not log {n} × {prefix:?} within {DEADLINE:?}; its log:\n{}",
            self.lines().join("\n")
        );
    }

    /// Waits until the firmware has queued `n` messages with a temperature (the leak probe's
    /// heartbeats are queued too, whenever they are due).
    async fn wait_temperatures_queued(&self, n: usize) {
        let count = || {
            self.queued()
                .iter()
                .filter(|(_, values)| values.starts_with("temperature="))
                .count()
        };
        assert!(
            wait_until(DEADLINE, || count() >= n).await,
            "the firmware did not queue {n} temperatures within {DEADLINE:?}; its log:\n{}",
            self.lines().join("\n")
        );
    }

    /// `seq` of every message the firmware queued, from its log.
    fn queued(&self) -> Vec<(u64, String)> {
        self.lines()
            .iter()
            .filter_map(|l| {
                let rest = l.strip_prefix("queued seq=")?;
                let (seq, values) = rest.split_once(' ')?;
                Some((seq.parse().ok()?, values.to_owned()))
            })
            .collect()
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A transparent serial-to-TCP bridge between QEMU's UART1 and the gateway: bytes from the
/// firmware open a connection to the current gateway if there is none, and are dropped while
/// there is no gateway; a connection the gateway closes is simply gone.
struct Modem {
    addr: SocketAddr,
    gateway: Arc<Mutex<Option<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Modem {
    async fn start() -> Modem {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gateway = Arc::new(Mutex::new(None));
        let target = gateway.clone();
        let task = tokio::spawn(async move {
            let Ok((mut uart, _)) = listener.accept().await else {
                return;
            };
            let _ = uart.set_nodelay(true);
            let mut upstream: Option<TcpStream> = None;
            let (mut from_uart, mut from_gateway) = ([0u8; 1024], [0u8; 1024]);
            loop {
                match upstream.as_mut() {
                    None => {
                        let n = match uart.read(&mut from_uart).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        let Some(addr) = *target.lock().unwrap() else {
                            continue;
                        };
                        if let Ok(mut s) = TcpStream::connect(addr).await {
                            let _ = s.set_nodelay(true);
                            if s.write_all(&from_uart[..n]).await.is_ok() {
                                upstream = Some(s);
                            }
                        }
                    }
                    Some(up) => {
                        tokio::select! {
                            r = uart.read(&mut from_uart) => match r {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    if up.write_all(&from_uart[..n]).await.is_err() {
                                        upstream = None;
                                    }
                                }
                            },
                            r = up.read(&mut from_gateway) => match r {
                                Ok(0) | Err(_) => upstream = None,
                                Ok(n) => {
                                    if uart.write_all(&from_gateway[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            },
                        }
                    }
                }
            }
        });
        Modem {
            addr,
            gateway,
            task,
        }
    }

    /// Where new connections go; `None` drops what the firmware sends.
    fn route_to(&self, gateway: Option<SocketAddr>) {
        *self.gateway.lock().unwrap() = gateway;
    }
}

impl Drop for Modem {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Decoded readings from the firmware among `messages`: (seq, temperature if present).
fn readings(messages: &[Received]) -> Vec<(u64, Option<f64>)> {
    messages
        .iter()
        .filter_map(
            |m| match codec::decode(&m.topic, &m.payload, Limits::default()) {
                Ok(Message::Readings(r)) if r.device == DEVICE => {
                    let t = r
                        .values
                        .iter()
                        .find(|(k, _)| k == "temperature")
                        .and_then(|(_, v)| v.as_number());
                    Some((r.seq.expect("the firmware sends seq on every reading"), t))
                }
                Ok(_) => None,
                Err(e) => panic!("the gateway cannot decode {m:?}: {e:?}"),
            },
        )
        .collect()
}

fn temperatures_seen(collector: &Collector) -> Vec<f64> {
    readings(&collector.messages())
        .into_iter()
        .filter_map(|(_, t)| t)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_readings_arrive_with_consecutive_seq() {
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), None, OVERHEAT))
        .await
        .unwrap();
    let sensors = Collector::subscribe(gateway.mqtt_addr(), "sensors/#")
        .await
        .unwrap();
    let modem = Modem::start().await;
    modem.route_to(Some(gateway.mqtt_addr()));
    let mut qemu = Qemu::boot(modem.addr);
    qemu.wait_log("mqtt connected", 1).await;

    let script: Vec<f64> = (0..10).map(|i| 22.0 + f64::from(i) * 0.5).collect();
    for t in &script {
        qemu.script(&format!("temperature={t}"));
        let want = *t;
        assert!(
            wait_until(DEADLINE, || temperatures_seen(&sensors).contains(&want)).await,
            "{want} never reached the gateway; firmware log:\n{}",
            qemu.lines().join("\n")
        );
    }

    let got = readings(&sensors.messages());
    let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs[0], 0,
        "the first message after boot has seq 0: {seqs:?}"
    );
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "seq must be consecutive: {seqs:?}"
    );
    let temps: Vec<f64> = got.iter().filter_map(|(_, t)| *t).collect();
    let scripted: Vec<f64> = temps
        .iter()
        .copied()
        .filter(|t| script.contains(t))
        .collect();
    assert_eq!(scripted, script, "in the order scripted");
    // Nothing the firmware queued is missing or unexpected.
    let queued: Vec<u64> = qemu.queued().into_iter().map(|(s, _)| s).collect();
    assert!(
        queued.starts_with(&seqs),
        "gateway {seqs:?}, firmware {queued:?}"
    );
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scripted_excursion_on_qemu_raises_and_clears_an_alert_upstream() {
    let upstream = Mosquitto::start().unwrap();
    let upstream_alerts = Collector::subscribe(upstream.addr(), "site-test/alerts/#")
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config(data.path(), Some(upstream.port()), OVERHEAT))
        .await
        .unwrap();
    let modem = Modem::start().await;
    modem.route_to(Some(gateway.mqtt_addr()));
    let mut qemu = Qemu::boot(modem.addr);
    qemu.wait_log("mqtt connected", 1).await;

    raise_and_clear(
        &mut qemu,
        &upstream_alerts,
        "overheat",
        ("temperature=95.5", json!(95.5)),
        ("temperature=21.25", json!(21.25)),
    )
    .await;
    gateway.shutdown().await;
}

/// Scripts `raise`, expects the critical alert of `rule` raised upstream with the value
/// `raised`, then scripts `clear` and expects it cleared with `cleared`, under the same id.
async fn raise_and_clear(
    qemu: &mut Qemu,
    upstream_alerts: &Collector,
    rule: &str,
    (raise, raised): (&str, Value),
    (clear, cleared): (&str, Value),
) {
    qemu.script(raise);
    let first = upstream_alerts.wait_for(1, DEADLINE).await.unwrap();
    assert_eq!(
        first[0].topic,
        format!("site-test/alerts/critical/{DEVICE}/{rule}")
    );
    let doc = first[0].json();
    assert_eq!((&doc["state"], &doc["value"]), (&json!("raised"), &raised));

    qemu.script(clear);
    let both = upstream_alerts.wait_for(2, DEADLINE).await.unwrap();
    let doc = both[1].json();
    assert_eq!(
        (&doc["state"], &doc["value"]),
        (&json!("cleared"), &cleared)
    );
    assert_eq!(doc["id"], both[0].json()["id"], "one episode");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_firmware_reconnects_after_a_gateway_restart_and_delivers_what_it_buffered() {
    let data = tempfile::tempdir().unwrap();
    let config = || gateway_config(data.path(), None, OVERHEAT);
    let gateway = watchpost::start(config()).await.unwrap();
    let before = Collector::subscribe(gateway.mqtt_addr(), "sensors/#")
        .await
        .unwrap();
    let modem = Modem::start().await;
    modem.route_to(Some(gateway.mqtt_addr()));
    let mut qemu = Qemu::boot(modem.addr);
    qemu.wait_log("mqtt connected", 1).await;
    qemu.script("temperature=25");
    assert!(wait_until(DEADLINE, || temperatures_seen(&before).contains(&25.0)).await);

    // The gateway goes away; the bridge keeps the serial side up, as a modem would.
    modem.route_to(None);
    gateway.shutdown().await;
    qemu.wait_log("mqtt link lost", 1).await;
    let buffered = [30.0, 31.5, 33.0];
    let queued_before = qemu
        .queued()
        .iter()
        .filter(|(_, values)| values.starts_with("temperature="))
        .count();
    for (i, t) in buffered.iter().enumerate() {
        qemu.script(&format!("temperature={t}"));
        qemu.wait_temperatures_queued(queued_before + i + 1).await;
    }
    assert!(
        temperatures_seen(&before)
            .iter()
            .all(|t| !buffered.contains(t)),
        "nothing of the outage went to the stopped gateway"
    );

    // Same configuration and data, new process and port.
    let gateway = watchpost::start(config()).await.unwrap();
    let after = Collector::subscribe(gateway.mqtt_addr(), "sensors/#")
        .await
        .unwrap();
    modem.route_to(Some(gateway.mqtt_addr()));
    assert!(
        wait_until(DEADLINE, || {
            let seen = temperatures_seen(&after);
            buffered.iter().all(|t| seen.contains(t))
        })
        .await,
        "the buffered readings never arrived; firmware log:\n{}",
        qemu.lines().join("\n")
    );
    let connects = qemu.count("mqtt connected");
    assert!(connects >= 2, "reconnected: {connects}");

    // Across both gateways, every seq the firmware queued arrived, none twice out of order.
    let mut seqs: Vec<u64> = readings(&before.messages())
        .into_iter()
        .chain(readings(&after.messages()))
        .map(|(s, _)| s)
        .collect();
    let in_order = seqs.clone();
    seqs.dedup();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "no seq lost and in order across the restart: {in_order:?}"
    );
    let queued: Vec<u64> = qemu.queued().into_iter().map(|(s, _)| s).collect();
    assert!(
        queued.starts_with(&seqs),
        "gateway {seqs:?}, firmware {queued:?}"
    );
    let after_seqs: Vec<(u64, Option<f64>)> = readings(&after.messages());
    let outage: Vec<f64> = after_seqs
        .iter()
        .filter_map(|(_, t)| *t)
        .filter(|t| buffered.contains(t))
        .collect();
    assert_eq!(outage, buffered, "delivered in the order they were taken");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_qemu_leak_probe_raises_and_clears_a_critical_alert_through_the_shipped_rules() {
    let upstream = Mosquitto::start().unwrap();
    let upstream_alerts = Collector::subscribe(upstream.addr(), "site-test/alerts/#")
        .await
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    // The quickstart configuration as shipped (its `water-leak` rule), with an uplink added.
    let mut config = shipped_config("watchpost.toml", data.path());
    config.uplink = Some(UplinkConfig {
        forwarded_by: None,
        host: "127.0.0.1".into(),
        port: upstream.port(),
        tls: false,
        client_id: "watchpost-qemu-leak".into(),
        topic_prefix: "site-test".into(),
        forward: vec![Severity::Critical],
        keep_alive: Duration::from_secs(5),
        summaries: None,
        ca_file: None,
        client_cert: None,
        login: None,
        delivery: Default::default(),
    });
    let gateway = watchpost::start(config).await.unwrap();
    let sensors = Collector::subscribe(gateway.mqtt_addr(), "sensors/+/water_leak")
        .await
        .unwrap();
    let modem = Modem::start().await;
    modem.route_to(Some(gateway.mqtt_addr()));
    let mut qemu = Qemu::boot(modem.addr);
    qemu.wait_log("mqtt connected", 1).await;
    // The probe is dry at boot, and says so once its pin has settled.
    let states = |c: &Collector| -> Vec<bool> {
        c.messages()
            .iter()
            .map(|m| m.json()["v"].as_bool().expect("a leak state is a boolean"))
            .collect()
    };
    assert!(
        wait_until(DEADLINE, || states(&sensors).first() == Some(&false)).await,
        "the dry state never reached the gateway; firmware log:\n{}",
        qemu.lines().join("\n")
    );

    raise_and_clear(
        &mut qemu,
        &upstream_alerts,
        "water-leak",
        ("water_leak=1", json!(true)),
        ("water_leak=0", json!(false)),
    )
    .await;
    // Wet, then dry, each reported once as it settled (heartbeats may repeat a state, never
    // invert one), and every state the firmware queued went out under its own seq.
    let seen = states(&sensors);
    let mut changes = seen.clone();
    changes.dedup();
    assert_eq!(
        changes,
        [false, true, false],
        "states at the gateway: {seen:?}"
    );
    let leak_seqs: Vec<u64> = qemu
        .queued()
        .into_iter()
        .filter(|(_, values)| values.starts_with("water_leak="))
        .map(|(seq, _)| seq)
        .collect();
    let gateway_seqs: Vec<u64> = readings(&sensors.messages())
        .into_iter()
        .map(|(seq, _)| seq)
        .collect();
    assert!(
        leak_seqs.starts_with(&gateway_seqs),
        "gateway {gateway_seqs:?}, firmware {leak_seqs:?}"
    );
    gateway.shutdown().await;
}

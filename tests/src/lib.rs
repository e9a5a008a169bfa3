//! Helpers for Watchpost's end-to-end tests: a real upstream broker (Mosquitto), real MQTT
//! clients, gateways on `127.0.0.1:0`, and waiting with deadlines instead of sleeps.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tempfile::TempDir;
use watchpost::config::{self, Config};

pub mod browser;
pub mod clients;
pub mod failover;
pub mod netns;
pub mod pki;
pub mod relay;

/// Like [`wait_until`] for a thread that is not async: polls `condition` every `period`.
pub fn wait_until_blocking(
    period: Duration,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(period);
    }
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A Mosquitto broker in a child process, listening on loopback. Killed on drop.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    persistent: bool,
    /// Holds the configuration (and, if persistent, the saved sessions).
    dir: TempDir,
}

/// The Mosquitto binary: in `/usr/sbin` on Debian, which a non-root `PATH` may lack.
pub fn mosquitto_binary() -> Result<PathBuf> {
    for candidate in [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ] {
        if Path::new(candidate).exists() {
            return Ok(candidate.into());
        }
    }
    bail!(
        "mosquitto is not installed: the end-to-end tests use it as the upstream broker (apt-get install mosquitto)"
    )
}

/// A port that was free a moment ago (Mosquitto cannot bind port 0 and report it): whoever
/// binds it should try again with another if it is taken by then.
///
/// It is drawn below Linux's ephemeral range (32768-60999), which every listener on
/// `127.0.0.1:0` and every outgoing connection of the tests takes its ports from. A port from
/// that range could be taken by another test between this check and Mosquitto's bind, and
/// Mosquitto's readiness probe would then connect to that test's listener and report a broker
/// that had in fact failed to start.
pub fn free_port() -> Result<u16> {
    for _ in 0..100 {
        let port = fastrand::u16(20_000..32_000);
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            return Ok(listener.local_addr()?.port());
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts Mosquitto on `port` with its configuration in `dir`; returns once it listens.
/// A persistent broker saves sessions and queued messages in `dir` when stopped.
fn spawn_mosquitto(dir: &Path, port: u16, persistent: bool) -> Result<Child> {
    let conf = dir.join(format!("mosquitto-{port}.conf"));
    let persistence = if persistent {
        format!(
            "persistence true\npersistence_location {}/\n",
            dir.display()
        )
    } else {
        "persistence false\n".to_owned()
    };
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\n{persistence}log_dest none\n"),
    )?;
    launch_mosquitto(&conf, &[port], None)
}

/// Starts Mosquitto with the configuration file `conf`, its stderr to `log` if given, and
/// returns once it accepts connections on every one of `ports` on loopback (within 5 s).
/// The error says whether it exited (a port taken?) or never listened, with its log.
pub fn launch_mosquitto(conf: &Path, ports: &[u16], log: Option<&Path>) -> Result<Child> {
    let stderr = match log {
        Some(path) => Stdio::from(
            std::fs::File::create(path)
                .with_context(|| format!("creating mosquitto's log {}", path.display()))?,
        ),
        None => Stdio::null(),
    };
    let mut child = Command::new(mosquitto_binary()?)
        .arg("-c")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .context("starting mosquitto")?;
    let logged = || match log {
        Some(path) => format!(
            "; its log:\n{}",
            std::fs::read_to_string(path).unwrap_or_default()
        ),
        None => String::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if ports
            .iter()
            .all(|port| TcpStream::connect(("127.0.0.1", *port)).is_ok())
        {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "mosquitto exited with {status} (port {ports:?} taken?){}",
                logged()
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "mosquitto did not listen on port {ports:?} within 5 s{}",
                logged()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Bare rumqttd 0.20 with only its MQTT 3.1.1 listener, on a free loopback port, in a thread
/// of this process (for the rest of it): an upstream that does not speak MQTT 5. Returns its
/// address once it accepts connections.
pub fn start_rumqttd_v311() -> Result<SocketAddr> {
    use std::collections::HashMap;
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let server = rumqttd::ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 5_000,
            max_payload_size: 64 * 1024,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: false,
        },
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 100,
            max_outgoing_packet_count: 256,
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    std::thread::spawn(move || {
        if let Err(e) = broker.start() {
            eprintln!("rumqttd stopped: {e}");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(listen).is_err() {
        if Instant::now() >= deadline {
            bail!("rumqttd did not listen on {listen} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(listen)
}

/// Sends `signal` (e.g. `libc::SIGSTOP`) to process `pid`.
pub fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let r = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(
        r,
        0,
        "kill({pid}, {signal}) failed: {}",
        std::io::Error::last_os_error()
    );
}

impl Mosquitto {
    /// Starts a broker on a free loopback port and waits until it accepts connections.
    pub fn start() -> Result<Mosquitto> {
        Self::start_with(false)
    }

    /// Like [`Mosquitto::start`], keeping sessions and queued messages across
    /// [`Mosquitto::stop`] and [`Mosquitto::restart`].
    pub fn start_persistent() -> Result<Mosquitto> {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> Result<Mosquitto> {
        let dir = tempfile::tempdir()?;
        if persistent {
            // Started as root, Mosquitto drops to its own user, which must be able to save.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))?;
        }
        let mut last_error = None;
        for _ in 0..5 {
            let port = free_port()?;
            match spawn_mosquitto(dir.path(), port, persistent) {
                Ok(child) => {
                    return Ok(Mosquitto {
                        child: Some(child),
                        port,
                        persistent,
                        dir,
                    });
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// Starts a broker on `port`, e.g. one that a gateway is already trying to reach.
    pub fn start_on(port: u16) -> Result<Mosquitto> {
        let dir = tempfile::tempdir()?;
        let child = spawn_mosquitto(dir.path(), port, false)?;
        Ok(Mosquitto {
            child: Some(child),
            port,
            persistent: false,
            dir,
        })
    }

    /// Stops the broker the way an operator would (SIGTERM), and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(child.id(), libc::SIGTERM);
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.child = Some(spawn_mosquitto(
            self.dir.path(),
            self.port,
            self.persistent,
        )?);
        Ok(())
    }

    /// Freezes the broker (SIGSTOP): its sockets stay open and nothing answers.
    pub fn pause(&self) {
        send_signal(self.child.as_ref().expect("running").id(), libc::SIGSTOP);
    }

    /// Lets a paused broker run again (SIGCONT).
    pub fn resume(&self) {
        send_signal(self.child.as_ref().expect("running").id(), libc::SIGCONT);
    }

    /// The broker's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One message a [`Collector`] received.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// The retain flag as delivered.
    pub retain: bool,
}

impl Received {
    /// The payload as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "payload on {} is not JSON ({e}): {:?}",
                self.topic,
                String::from_utf8_lossy(&self.payload)
            )
        })
    }
}

/// An MQTT subscriber that records everything it receives.
pub struct Collector {
    messages: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
    _client: AsyncClient,
}

impl Collector {
    /// Connects to `addr`, subscribes to `filter` and returns once the subscription is
    /// acknowledged.
    pub async fn subscribe(addr: SocketAddr, filter: &str) -> Result<Collector> {
        let id = format!("collector-{:08x}", fastrand_u32());
        Self::subscribe_with(client(addr, &id), filter).await
    }

    /// Like [`Collector::subscribe`] with a persistent session (clean session off, QoS 1):
    /// a persistent broker keeps what arrives while it is down or the collector is away, and
    /// the collector reconnects by itself.
    pub async fn subscribe_persistent(
        addr: SocketAddr,
        filter: &str,
        id: &str,
    ) -> Result<Collector> {
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(false);
        options.set_max_packet_size(1024 * 1024, 1024 * 1024);
        Self::subscribe_with(AsyncClient::new(options, 1024), filter).await
    }

    /// Like [`Collector::subscribe_persistent`] with the caller's options (TLS, a login, a
    /// client id); the session is made persistent here.
    pub async fn subscribe_options(mut options: MqttOptions, filter: &str) -> Result<Collector> {
        options.set_clean_session(false);
        Self::subscribe_with(AsyncClient::new(options, 1024), filter).await
    }

    async fn subscribe_with(
        (client, mut eventloop): (AsyncClient, EventLoop),
        filter: &str,
    ) -> Result<Collector> {
        client.subscribe(filter, QoS::AtLeastOnce).await?;
        let messages = Arc::new(Mutex::new(Vec::new()));
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let event = tokio::time::timeout_at(deadline.into(), eventloop.poll())
                .await
                .context("no SUBACK within 5 s")??;
            if let Event::Incoming(Packet::SubAck(_)) = event {
                break;
            }
            if let Event::Incoming(Packet::Publish(p)) = event {
                record(&messages, &p);
            }
        }
        let sink = messages.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => record(&sink, &p),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Ok(Collector {
            messages,
            task,
            _client: client,
        })
    }

    /// Everything received so far.
    pub fn messages(&self) -> Vec<Received> {
        self.messages.lock().unwrap().clone()
    }

    /// How many messages have arrived.
    pub fn count(&self) -> usize {
        self.messages.lock().unwrap().len()
    }

    /// Waits until at least `n` messages have arrived.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Result<Vec<Received>> {
        if wait_until(timeout, || self.count() >= n).await {
            Ok(self.messages())
        } else {
            bail!(
                "expected {n} messages within {timeout:?}, got {}: {:#?}",
                self.count(),
                self.messages()
            )
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn record(messages: &Mutex<Vec<Received>>, p: &rumqttc::Publish) {
    messages.lock().unwrap().push(Received {
        topic: p.topic.clone(),
        payload: p.payload.to_vec(),
        retain: p.retain,
    });
}

fn fastrand_u32() -> u32 {
    // Distinct client ids per test without another dependency.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    nanos ^ std::process::id().rotate_left(16)
}

/// An MQTT client and its eventloop for `addr`.
pub fn client(addr: SocketAddr, id: &str) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(1024 * 1024, 1024 * 1024);
    AsyncClient::new(options, 1024)
}

/// A client that publishes readings and drives its own eventloop.
pub struct Publisher {
    client: AsyncClient,
    acked: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    /// Connects to the gateway at `addr` and waits for CONNACK.
    pub async fn connect(addr: SocketAddr, id: &str) -> Result<Publisher> {
        let (client, mut eventloop) = client(addr, id);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let event = tokio::time::timeout_at(deadline.into(), eventloop.poll())
                .await
                .context("no CONNACK within 5 s")??;
            if let Event::Incoming(Packet::ConnAck(_)) = event {
                break;
            }
        }
        let acked = Arc::new(Mutex::new(0));
        let counter = acked.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => *counter.lock().unwrap() += 1,
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Ok(Publisher {
            client,
            acked,
            task,
        })
    }

    /// Publishes `payload` on `topic` with `qos`.
    pub async fn publish(&self, topic: &str, qos: QoS, payload: impl Into<Vec<u8>>) -> Result<()> {
        Ok(self.client.publish(topic, qos, false, payload).await?)
    }

    /// Publishes `payload` on `topic` with `qos` and the retain flag.
    pub async fn publish_retained(
        &self,
        topic: &str,
        qos: QoS,
        payload: impl Into<Vec<u8>>,
    ) -> Result<()> {
        Ok(self.client.publish(topic, qos, true, payload).await?)
    }

    /// QoS 1 publishes acknowledged by the broker so far.
    pub fn acked(&self) -> u64 {
        *self.acked.lock().unwrap()
    }

    /// Waits until `n` QoS 1 publishes are acknowledged.
    pub async fn wait_acked(&self, n: u64, timeout: Duration) -> Result<()> {
        if wait_until(timeout, || self.acked() >= n).await {
            Ok(())
        } else {
            bail!(
                "expected {n} PUBACKs within {timeout:?}, got {}",
                self.acked()
            )
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A gateway configuration for tests: listener on `127.0.0.1:0`, data in `data_dir`, uplink
/// to `upstream_port` if given (prefix `site-test`), and `rules` (TOML `[[rule]]` tables).
pub fn gateway_config(data_dir: &Path, upstream_port: Option<u16>, rules: &str) -> Config {
    gateway_config_with(data_dir, upstream_port, "", rules)
}

/// Like [`gateway_config`], with extra lines for the `[broker]` table.
pub fn gateway_config_with(
    data_dir: &Path,
    upstream_port: Option<u16>,
    broker: &str,
    rules: &str,
) -> Config {
    let uplink = upstream_port.map_or(String::new(), |port| {
        format!("[uplink]\nurl = \"mqtt://127.0.0.1:{port}\"\ntopic_prefix = \"site-test\"\nforward = [\"critical\"]\nkeep_alive = \"5s\"\n")
    });
    let source = format!(
        "[gateway]\nid = \"site-test\"\ndata_dir = {:?}\n[broker]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = true\nmax_payload_bytes = 256\n{broker}\n[http]\nlisten = \"127.0.0.1:0\"\n{uplink}{rules}",
        data_dir.display().to_string()
    );
    match config::parse(&source, "test.toml") {
        Ok(loaded) => loaded.config,
        Err(e) => panic!("test configuration does not compile:\n{e}\n---\n{source}"),
    }
}

/// A configuration shipped in `config/` (e.g. `"tasmota.toml"`), loaded as the binary would,
/// with its listeners moved to `127.0.0.1:0` and its data to `data_dir`.
pub fn shipped_config(file: &str, data_dir: &Path) -> Config {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config")
        .join(file);
    let mut config = config::load(&path)
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .config;
    config.broker.listen = "127.0.0.1:0".parse().expect("an address");
    config.http.listen = Some("127.0.0.1:0".parse().expect("an address"));
    config.gateway.data_dir = data_dir.to_owned();
    config
}

/// The rule most tests use: critical above 90, clears below 85, no `for`.
pub const OVERHEAT: &str = "[[rule]]\nname = \"overheat\"\nmatch = \"sensors/+/temperature\"\nabove = 90.0\nclear_below = 85.0\nseverity = \"critical\"\n";

/// A `watchpost` process (the real binary, from `CARGO_BIN_EXE_watchpost` in the gateway's
/// own tests), with its log lines collected. Killed on drop.
pub struct GatewayProcess {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl GatewayProcess {
    /// Starts `bin run --config config` with its default log levels.
    pub fn spawn(bin: &str, config: &Path) -> GatewayProcess {
        Self::spawn_with_env(bin, config, &[])
    }

    /// Like [`GatewayProcess::spawn`], with extra environment variables.
    pub fn spawn_with_env(bin: &str, config: &Path, env: &[(&str, &str)]) -> GatewayProcess {
        let mut child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the watchpost binary starts");
        let stderr = child.stderr.take().expect("piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        GatewayProcess {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return Some(line.clone());
        }
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Some(line);
                    }
                }
                Err(_) => break,
            }
        }
        None
    }

    /// Waits for the ready line and returns the MQTT address it names.
    pub fn wait_ready(&mut self, timeout: Duration) -> SocketAddr {
        let Some(line) = self.wait_line("ready", timeout) else {
            panic!(
                "no ready line within {timeout:?}; log so far: {:#?}",
                self.seen
            );
        };
        let field = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("mqtt="))
            .expect("the ready line names the MQTT address");
        field.parse().expect("an address")
    }

    /// Everything logged so far.
    pub fn log(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    /// Sends a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        send_signal(self.child.id(), signal);
    }

    /// Waits for the process to exit; returns its status and how long that took.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<(std::process::ExitStatus, Duration)> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some((status, start.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! Wiring: opens the store, binds the listeners, starts the router, ingest and uplink, and
//! stops them again in order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::broker::{self, Broker, BrokerError, Gate, Listeners};
use crate::config::Config;
use crate::http::{self, Endpoint};
use crate::ingest::{self, Control, Engine, EngineOptions, Outputs, ReloadOutcome};
use crate::metrics::Info;
use crate::shutdown::{self, Trigger};
use crate::stats::Stats;
use crate::store::{self, Store, StoreError, StoreOptions, StoreThread};
use crate::uplink::{Uplink, UplinkError};

/// Batches of publishes (of up to a few thousand each) waiting for ingest.
const INGEST_QUEUE: usize = 16;

/// How long shutdown waits for tasks before it stops waiting.
pub const SHUTDOWN_BUDGET: Duration = Duration::from_millis(1800);

/// Why the gateway did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker could not start.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The HTTP endpoint could not be bound.
    #[error("cannot listen on {addr} (HTTP endpoint): {source}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The uplink configuration is unusable.
    #[error(transparent)]
    Uplink(#[from] UplinkError),
    /// The site pair cannot start.
    #[error(transparent)]
    Peer(#[from] crate::peer::PeerError),
    /// The HTTPS endpoint's certificate or key is unusable.
    #[error("HTTPS endpoint ([http.tls]): {0}")]
    HttpsTls(crate::broker::tls::TlsError),
}

/// A running gateway.
pub struct Gateway {
    mqtt_addr: SocketAddr,
    mqtt_tls_addr: Option<SocketAddr>,
    gate: Arc<Gate>,
    http_addr: Option<SocketAddr>,
    https_addr: Option<SocketAddr>,
    stats: Arc<Stats>,
    trigger: Trigger,
    tasks: Vec<JoinHandle<()>>,
    store_thread: StoreThread,
    control: mpsc::Sender<Control>,
    /// The router, to apply a new ACL to existing subscriptions.
    broker: Broker,
    /// The configuration running now (rules as last reloaded).
    config: Config,
    /// What happens, for whoever listens.
    events: crate::events::Sender,
}

/// Why a reload did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The gateway is shutting down.
    #[error("the gateway is stopping")]
    Stopping,
}

/// Starts the gateway; returns once it serves.
pub async fn start(config: Config) -> Result<Gateway, StartError> {
    let stats = Arc::new(Stats::default());
    let started = crate::alert::now_millis();
    stats
        .started_ms
        .store(started, std::sync::atomic::Ordering::Relaxed);
    stats.ingest_heartbeat_ms.store(
        crate::stats::monotonic_ms(),
        std::sync::atomic::Ordering::Relaxed,
    );
    let store_options = StoreOptions {
        max_db_bytes: config.history.max_db_bytes,
        raw_retention: config.history.raw_retention,
        reserve_bytes: config.history.reserve_bytes,
    };
    let (store, store_thread) =
        Store::open(&config.gateway.data_dir, store_options, stats.clone())?;
    let gate = broker::gate(&config.broker, config.acl.clone(), config.sources.clone())?;
    let listeners = Listeners::bind(&config.broker).await?;
    let http_listener = match config.http.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Http { addr, source })?,
        ),
        None => None,
    };
    let https_listener = match &config.http.tls {
        Some(t) => Some((
            TcpListener::bind(t.listen)
                .await
                .map_err(|source| StartError::Http {
                    addr: t.listen,
                    source,
                })?,
            broker::tls::acceptor(t).map_err(StartError::HttpsTls)?,
        )),
        None => None,
    };
    let uplink = config.uplink.as_ref().map(Uplink::prepare).transpose()?;
    let peer_secret = config
        .peer
        .as_ref()
        .map(|p| crate::peer::Secret::read(&p.secret_file))
        .transpose()?;

    let broker = Broker::new(&config.broker, stats.clone());

    let (trigger, signal) = shutdown::channel();
    let mut tasks = Vec::new();
    if let Some(uplink) = uplink {
        tasks.push(tokio::spawn(uplink.run(
            store.clone(),
            stats.clone(),
            signal.clone(),
        )));
    }
    let options = EngineOptions {
        gateway: config.gateway.site.clone(),
        rules: config.rules.clone(),
        sources: config.sources.clone(),
        limits: config.broker.limits,
        window: config.history.window,
        keep_raw: config.history.raw_retention.is_some(),
        summaries: config.uplink.as_ref().and_then(|u| u.summaries.clone()),
        stale_after: config.gateway.stale_after,
        forget_after: config.gateway.forget_after,
    };
    // One clock for ingest from here on: restored alerts are put on its monotonic half.
    let mut clock = crate::clock::Clock::new();
    let now = clock.now();
    let mut engine = Engine::new(options, stats.clone(), now.wall);
    // Alerts outlive restarts: publish every alert's last document again (retained), and
    // take raised ones back so that they are not raised a second time.
    let saved = store.saved_alerts().await;
    for alert in &saved {
        broker.publish_retained(alert.topic.clone(), alert.doc.clone().into());
    }
    broker.restore_retained(&store).await;
    tasks.push(tokio::spawn(
        broker.persist_retained(store.clone(), signal.clone()),
    ));
    let restored = engine.restore(&saved, now);
    if config.peer.is_some() {
        // What this gateway had judged before it stopped: the peer's catch-up only rebuilds
        // rule states up to there.
        engine.set_floors(store::device_floors(&config.gateway.data_dir));
    }
    if restored > 0 {
        info!(restored, "alerts still raised from before the restart");
    }
    let (control_tx, control_rx) = mpsc::channel(4);
    // Batches of publishes from the broker's injector; when ingest is behind, the injector
    // waits, and so do the clients.
    let (readings_tx, readings_rx) = mpsc::channel(INGEST_QUEUE);
    let events = crate::events::channel();
    let mut outputs = Outputs {
        events: Some(events.clone()),
        peer: None,
        store,
        forward: config.uplink.as_ref().map(|u| u.forward.clone()),
        prefix_len: config
            .uplink
            .as_ref()
            .map_or(config.gateway.site.len(), |u| u.topic_prefix.len()),
    };
    let peer = match (&config.peer, peer_secret) {
        (Some(p), Some(secret)) => {
            gate.set_peer(&p.name, secret.clone());
            let (out, from_ingest) = mpsc::unbounded_channel();
            let stream = fastrand::u64(1..);
            let mirror = crate::peer::Mirror {
                own: config.gateway.id.clone(),
                stream,
                horizon: crate::peer::horizon(&config.rules),
                address: p.address,
                secret,
            };
            tasks.push(tokio::spawn(mirror.run(
                from_ingest,
                stats.clone(),
                signal.clone(),
            )));
            info!(peer = %p.name, address = %p.address, site = %config.gateway.site, "one of a site pair: mirroring this gateway's clients to the peer");
            let mut peer = ingest::PeerIngest::new(
                out,
                stream,
                crate::peer::Incoming::new(stream, p.takeover_after, stats.clone()),
            );
            for alert in saved.iter().filter(|a| a.raised) {
                if let Ok(doc) = serde_json::from_str::<crate::alert::AlertDoc>(&alert.doc) {
                    peer.raised.track(&doc);
                }
            }
            Some(peer)
        }
        _ => None,
    };
    outputs.peer = peer;
    tasks.push(tokio::spawn(ingest::run(
        engine,
        clock,
        broker.clone(),
        readings_rx,
        outputs,
        control_rx,
        signal.clone().wait(),
    )));
    if config.homeassistant.discovery {
        tasks.push(tokio::spawn(crate::homeassistant::run(
            crate::homeassistant::Setup::of(&config),
            broker.clone(),
            stats.clone(),
            events.clone(),
            control_tx.clone(),
            signal.clone(),
        )));
    }

    let mqtt_addr = listeners.addr();
    let mqtt_tls_addr = listeners.tls_addr();
    tasks.push(tokio::spawn(broker::gate::watch_credentials(
        gate.clone(),
        signal.clone(),
    )));
    let router = broker.clone();
    let broker_gate = gate.clone();
    let broker_config = config.broker.clone();
    let broker_stats = stats.clone();
    let broker_signal = signal.clone();
    tasks.push(tokio::spawn(async move {
        listeners
            .serve(
                broker::Pipes {
                    broker,
                    readings: readings_tx,
                },
                broker_gate,
                &broker_config,
                broker_stats,
                broker_signal,
            )
            .await
    }));

    let http_addr = http_listener.as_ref().and_then(|l| l.local_addr().ok());
    let https_addr = https_listener
        .as_ref()
        .and_then(|(l, _)| l.local_addr().ok());
    if http_listener.is_some() || https_listener.is_some() {
        let scheme = |u: &crate::config::UplinkConfig| if u.tls { "mqtts" } else { "mqtt" };
        let info = Info {
            peer: config.peer.as_ref().map(|p| crate::metrics::PeerInfo {
                name: p.name.clone(),
                address: p.address.to_string(),
                takeover_after: p.takeover_after,
            }),
            gateway: config.gateway.id.clone(),
            upstream: config
                .uplink
                .as_ref()
                .map(|u| format!("{}://{}:{}", scheme(u), u.host, u.port)),
        };
        let endpoint = Arc::new(Endpoint {
            stats: stats.clone(),
            info,
        });
        let page = Arc::new(crate::page::Page::new(
            stats.clone(),
            config.gateway.data_dir.clone(),
            control_tx.clone(),
            events.clone(),
            config.uplink.is_some(),
        ));
        tasks.push(tokio::spawn(crate::page::sample_bandwidth(
            page.clone(),
            signal.clone(),
        )));
        let login = |asked: bool| asked.then(|| crate::page::Login(gate.clone()));
        if let Some(listener) = http_listener {
            tasks.push(tokio::spawn(http::serve(
                listener,
                endpoint.clone(),
                Some((page.clone(), login(config.http.login))),
                signal.clone(),
            )));
        }
        if let Some((listener, acceptor)) = https_listener {
            // Over HTTPS the page asks for a login unless both the address is loopback and
            // `login` is not set.
            let beyond = https_addr.is_some_and(|a| !a.ip().is_loopback());
            let incoming =
                http::TlsIncoming::new(listener, acceptor).map_err(|source| StartError::Http {
                    addr: https_addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                    source,
                })?;
            tasks.push(tokio::spawn(http::serve(
                incoming,
                endpoint,
                Some((page, login(config.http.login || beyond))),
                signal.clone(),
            )));
        }
    }
    let uplink_text = config
        .uplink
        .as_ref()
        .map_or("none (alerts stay local)".to_owned(), |u| {
            let forwards: Vec<_> = u.forward.iter().map(|s| s.as_str()).collect();
            format!("{}:{} forwarding [{}]", u.host, u.port, forwards.join(", "))
        });
    info!(
        gateway = %config.gateway.id,
        mqtt = %mqtt_addr,
        mqtts = %mqtt_tls_addr.map_or("off".to_owned(), |a| a.to_string()),
        clients = if config.broker.allow_anonymous { "anonymous allowed" } else { "authenticated only" },
        http = %http_addr.map_or("off".to_owned(), |a| a.to_string()),
        https = %https_addr.map_or("off".to_owned(), |a| a.to_string()),
        db = %config.gateway.data_dir.join(store::DB_FILE).display(),
        rules = config.rules.len(),
        uplink = %uplink_text,
        "watchpost {} ready", env!("CARGO_PKG_VERSION"),
    );
    // The listeners accept and the store is open: tell systemd (Type=notify), if it asks.
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status("serving")]) {
        warn!(error = %e, "cannot tell the service manager that the gateway is ready");
    }
    // Pings only after READY=1: systemd counts the watchdog from there.
    if let Some(period) = sd_notify::watchdog_enabled() {
        tasks.push(tokio::spawn(watchdog(
            period,
            stats.clone(),
            signal.clone(),
        )));
    }
    Ok(Gateway {
        mqtt_addr,
        mqtt_tls_addr,
        gate,
        http_addr,
        https_addr,
        stats,
        trigger,
        tasks,
        store_thread,
        control: control_tx,
        broker: router,
        config,
        events,
    })
}

impl Gateway {
    /// The MQTT 3.1.1 listener's address.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// The TLS listener's address, if configured.
    pub fn mqtt_tls_addr(&self) -> Option<SocketAddr> {
        self.mqtt_tls_addr
    }

    /// The HTTP endpoint's address, if it is on.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The HTTPS endpoint's address (`[http.tls]`), if it is on.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https_addr
    }

    /// The gateway's counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// What happens at the gateway: subscribe to follow it ([`crate::events`]).
    pub fn events(&self) -> &crate::events::Sender {
        &self.events
    }

    /// Swaps in the rules and sources of `config`, which has already been checked, and reads
    /// the credentials file again. Alerts of rules that still exist keep their state. Other
    /// sections only take effect after a restart; each one that changed is logged.
    pub async fn reload(&mut self, config: Config) -> Result<ReloadOutcome, ReloadError> {
        let sections = [
            ("[gateway]", self.config.gateway != config.gateway),
            ("[broker]", self.config.broker != config.broker),
            ("[uplink]", self.config.uplink != config.uplink),
            ("[history]", self.config.history != config.history),
            (
                "[homeassistant]",
                self.config.homeassistant != config.homeassistant,
            ),
        ];
        for (section, changed) in sections {
            if changed {
                warn!(
                    "{section} changed: that takes effect after a restart; the rules are reloaded now"
                );
            }
        }
        let (reply, answer) = oneshot::channel();
        let request = Control::Reload {
            rules: config.rules.clone(),
            sources: config.sources.clone(),
            reply,
        };
        self.control
            .send(request)
            .await
            .map_err(|_| ReloadError::Stopping)?;
        let outcome = answer.await.map_err(|_| ReloadError::Stopping)?;
        let detail = format!(
            "{} rules ({} kept, {} added, {} removed)",
            outcome.rules,
            outcome.kept,
            outcome.added.len(),
            outcome.removed.len()
        );
        self.stats.record_reload(true, detail);
        self.gate
            .set_policy(config.acl.clone(), config.sources.clone());
        let revoked = self.broker.revoke_subscriptions(&self.gate.policy());
        match self.gate.reload() {
            Ok(Some(names)) => info!(names, "credentials reloaded"),
            Ok(None) => {}
            Err(e) => error!(
                "the credentials file has an error; the previous credentials stay in force: {e}"
            ),
        }
        self.config.rules = config.rules;
        self.config.sources = config.sources;
        self.config.acl = config.acl;
        info!(rules = outcome.rules, kept = outcome.kept, added = ?outcome.added, removed = ?outcome.removed, acl = self.config.acl.len(), subscriptions_revoked = revoked, "rules reloaded");
        Ok(outcome)
    }

    /// Stops accepting, stops ingest, lets the uplink flush briefly and closes the store.
    pub async fn shutdown(self) {
        let _ = sd_notify::notify(&[NotifyState::Stopping]);
        self.trigger.fire();
        let deadline = tokio::time::Instant::now() + SHUTDOWN_BUDGET;
        for mut task in self.tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                warn!("a task did not stop in time; abandoning it");
                task.abort();
            }
        }
        // Ingest held the last store handle; the store thread now writes what is left.
        tokio::task::spawn_blocking(move || self.store_thread.join())
            .await
            .ok();
        info!("watchpost stopped");
    }
}

/// Pings systemd's watchdog at half its period, but only while ingest keeps going round:
/// a stuck pipeline stops the pings, and systemd restarts the service.
async fn watchdog(period: Duration, stats: Arc<Stats>, shutdown: crate::shutdown::Signal) {
    let mut stalled = false;
    shutdown.every(period / 2, || {
        let behind =
            crate::stats::monotonic_ms().saturating_sub(Stats::get(&stats.ingest_heartbeat_ms));
        if behind <= crate::http::INGEST_STALL_MS {
            stalled = false;
            if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
                warn!(error = %e, "cannot ping the service manager's watchdog");
            }
        } else if !stalled {
            stalled = true;
            error!(
                behind_ms = behind,
                "ingest is not making progress: watchdog pings stop, and systemd will restart the gateway"
            );
        }
    })
    .await;
}

/// Runs the gateway until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let gateway = start(config).await?;
    shutdown.await;
    gateway.shutdown().await;
    Ok(())
}

//! Helper modes that run as processes of their own: bare rumqttd with an in-process counting
//! subscriber, and a counting MQTT subscriber for a bare Mosquitto. Both print `ready ...`, then
//! answer every line on stdin with the number of messages counted so far, so that the harness
//! reads a count at the moment it asks.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ChildStdin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rumqttd::local::LinkRx;
use rumqttd::{
    Broker, Config, ConnectionSettings, Notification, RouterConfig, SegmentConfig, ServerSettings,
};

use crate::procs::{self, Bins, Proc};
use crate::wire::Conn;

/// Answers count requests on stdin until stdin closes.
fn serve_counts(count: &AtomicU64) -> Result<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        line?;
        writeln!(out, "{}", count.load(Ordering::Relaxed))?;
        out.flush()?;
    }
    Ok(())
}

/// The router settings of bare rumqttd: 4 × 4 MiB of logs for `sensors/#`, as Watchpost gave
/// its ingest while it embedded rumqttd's router, so that the figures stay comparable.
pub fn router_config(max_connections: usize) -> RouterConfig {
    let mut custom = HashMap::new();
    custom.insert(
        "sensors/#".to_owned(),
        SegmentConfig {
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 4,
        },
    );
    RouterConfig {
        max_connections,
        max_outgoing_packet_count: 256,
        max_segment_size: 256 * 1024,
        max_segment_count: 4,
        custom_segment: Some(custom),
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

/// `rumqttd PORT`: bare rumqttd 0.20 listening on `127.0.0.1:PORT` (MQTT 3.1.1, anonymous,
/// no TLS), and a local link subscribed to `sensors/#` that counts what it is given.
pub fn rumqttd_main(port: u16) -> Result<()> {
    let listen: SocketAddr = ([127, 0, 0, 1], port).into();
    let server = ServerSettings {
        name: "v4".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 5_000,
            max_payload_size: 4096,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: false,
        },
    };
    let config = Config {
        id: 0,
        router: router_config(20_016),
        v4: Some(HashMap::from([("v4".to_owned(), server)])),
        ..Default::default()
    };
    let mut broker = Broker::new(config);
    let (mut link_tx, link_rx) = broker.link("bench-counter").context("the counter's link")?;
    link_tx
        .subscribe("sensors/#")
        .context("subscribing the counter")?;
    std::thread::spawn(move || {
        if let Err(e) = broker.start() {
            eprintln!("rumqttd stopped: {e}");
        }
    });
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    std::thread::spawn(move || count_link(link_rx, &counter));
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(listen).is_err() {
        if Instant::now() >= deadline {
            bail!("rumqttd did not listen on {listen} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("ready {listen}");
    std::io::stdout().flush()?;
    serve_counts(&count)
}

fn count_link(mut link_rx: LinkRx, count: &AtomicU64) {
    loop {
        match link_rx.recv() {
            Ok(Some(Notification::Forward(_))) => {
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(Notification::Unschedule)) => {
                // The router parked the link because its buffer filled: ready for more.
                if link_rx.ready().is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("the counter's link closed: {e}");
                return;
            }
        }
    }
}

/// `count-sub ADDR FILTER`: one MQTT subscriber (QoS 0) that counts the messages it receives.
pub fn count_sub_main(addr: SocketAddr, filter: &str) -> Result<()> {
    let mut conn = Conn::subscriber(addr, "bench-counter", &[filter], 0)?;
    let mut writer = conn.stream().try_clone()?;
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    std::thread::spawn(move || {
        while let Ok(Some(packet)) = conn.next_packet() {
            if packet.0 >> 4 == 3 {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
        eprintln!("the counting subscriber's connection closed");
    });
    // Keep the connection alive while counting.
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(crate::wire::KEEP_ALIVE / 2);
            if writer.write_all(&[0xc0, 0]).is_err() {
                return;
            }
        }
    });
    println!("ready {addr}");
    std::io::stdout().flush()?;
    serve_counts(&count)
}

/// The harness's end of a counting helper.
pub struct Counter {
    /// The helper process.
    pub proc: Proc,
    stdin: ChildStdin,
    reader: std::io::BufReader<std::process::ChildStdout>,
}

impl Counter {
    /// Starts bare rumqttd with its counter on a free port; returns it and the MQTT address.
    pub fn rumqttd(bins: &Bins, log: &std::path::Path) -> Result<(Counter, SocketAddr)> {
        let mut last = None;
        for _ in 0..5 {
            let port = watchpost_e2e::free_port()?;
            match Self::start(bins, "rumqttd", &["rumqttd".into(), port.to_string()], log) {
                Ok(c) => return Ok((c, ([127, 0, 0, 1], port).into())),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("rumqttd was never started")))
    }

    /// Starts a counting subscriber to `filter` at `addr`.
    pub fn subscriber(
        bins: &Bins,
        addr: SocketAddr,
        filter: &str,
        log: &std::path::Path,
    ) -> Result<Counter> {
        Self::start(
            bins,
            "counting subscriber",
            &["count-sub".into(), addr.to_string(), filter.into()],
            log,
        )
    }

    fn start(bins: &Bins, name: &str, args: &[String], log: &std::path::Path) -> Result<Counter> {
        let mut proc = procs::helper(bins, name, args, log)?;
        let stdin = proc.stdin().context("stdin")?;
        let (_, reader) = procs::wait_ready(&mut proc, Duration::from_secs(15))?;
        Ok(Counter {
            proc,
            stdin,
            reader,
        })
    }

    /// Messages counted so far.
    pub fn count(&mut self) -> Result<u64> {
        writeln!(self.stdin)?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        line.trim()
            .parse()
            .with_context(|| format!("{} answered {line:?}", self.proc.name))
    }
}

//! The systems under test as a benchmark starts them: Watchpost's configuration, the site
//! Mosquitto that bridges to the upstream, and bare Mosquitto.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::procs::{Bins, Gateway, Proc};

/// The site id and upstream topic prefix of the benchmarked gateway.
pub const SITE: &str = "site-bench";

/// The rule every Watchpost in the benchmark runs: critical above 90 °C, cleared below 85,
/// raised at the first reading above (no `for`), as the quickstart's overheat otherwise.
pub const OVERHEAT: &str = r#"[[rule]]
name = "overheat"
match = "sensors/+/temperature"
above = 90.0
clear_below = 85.0
severity = "critical"
"#;

/// The state rule of the leak probes: critical at the first `true` on a `water_leak` topic,
/// cleared at `false`, as the README's binary sensors do.
pub const WATER_LEAK: &str = r#"[[rule]]
name = "water-leak"
match = "sensors/+/water_leak"
equals = true
severity = "critical"
"#;

/// The state rule that judges the doors of the mixed saturation load: a door that reports
/// anything but `open` or `closed` (a jammed or tampered sensor). It is judged at every
/// reading and never fires, as overheat never fires on the load's temperatures. A rule with
/// `for` would not do: every `open` of the load's doors, which change at every one of their
/// readings, would start a pending condition and its deadline.
pub const DOOR_STATE: &str = r#"[[rule]]
name = "door-state"
match = "sensors/+/door"
not_in = ["open", "closed"]
severity = "warning"
"#;

/// Writes a Watchpost configuration into `dir` and returns its path: anonymous clients on
/// loopback (so that the local `alerts/#` subscriber needs no operator login), no publish rate
/// limit (one load connection stands in for many devices), uplink to `upstream` forwarding
/// critical alerts, connection limit (10,000) and history (rollups) as by default, and
/// [`OVERHEAT`], followed by `rules` (more `[[rule]]` tables, or nothing). `summaries` adds
/// `[uplink.summaries]` with that interval for all three metrics; `broker` is more lines of
/// `[broker]` (or nothing). Everything else is the default, as a site would run it.
pub fn watchpost_config(
    dir: &Path,
    upstream: SocketAddr,
    summaries: Option<&str>,
    rules: &str,
    broker: &str,
) -> Result<PathBuf> {
    write_config(dir, None, upstream, summaries, rules, broker)
}

/// One gateway of a site pair, as its configuration names it and its peer.
#[derive(Debug, Clone)]
pub struct PairMember {
    /// Its `[gateway] id` (both share the site id [`SITE`]).
    pub id: String,
    /// Its MQTT listener's port on loopback: the peer names it before either starts.
    pub port: u16,
    /// The other gateway's id.
    pub peer: String,
    /// The other gateway's MQTT listener.
    pub peer_addr: SocketAddr,
    /// `peer.takeover_after`; the default (10 s) if `None`.
    pub takeover_after: Option<String>,
}

/// The secret both gateways of a benchmarked pair share (each has it in a file of its own).
const PAIR_SECRET: &str = "the-benchmarked-site-pair-shares-this-secret";

/// [`watchpost_config`] for a gateway alone (`pair` is `None`: exactly that), or one of a
/// pair, whose configuration differs only in the gateway id, `site`, the listener's port
/// and `[peer]`.
pub fn write_config(
    dir: &Path,
    pair: Option<&PairMember>,
    upstream: SocketAddr,
    summaries: Option<&str>,
    rules: &str,
    broker: &str,
) -> Result<PathBuf> {
    let (gateway, listen, peer) = match pair {
        None => (
            format!("id = \"{SITE}\""),
            "127.0.0.1:0".to_owned(),
            String::new(),
        ),
        Some(m) => {
            let secret = dir.join("peer.secret");
            std::fs::write(&secret, format!("{PAIR_SECRET}\n"))?;
            let takeover = m
                .takeover_after
                .as_ref()
                .map_or(String::new(), |t| format!("takeover_after = \"{t}\"\n"));
            (
                format!("id = \"{}\"\nsite = \"{SITE}\"", m.id),
                format!("127.0.0.1:{}", m.port),
                format!(
                    "\n[peer]\nname = \"{}\"\naddress = \"{}\"\nsecret_file = {secret:?}\n{takeover}",
                    m.peer, m.peer_addr
                ),
            )
        }
    };
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let summaries = summaries.map_or(String::new(), |interval| {
        format!(
            "\n[uplink.summaries]\ninterval = \"{interval}\"\nmetrics = [\"temperature\", \"humidity\", \"pressure\"]\n"
        )
    });
    let text = format!(
        r#"[gateway]
{gateway}
data_dir = {data:?}

[broker]
listen = "{listen}"
allow_anonymous = true
max_publish_rate = 0
{broker}
[http]
listen = "127.0.0.1:0"

[uplink]
url = "mqtt://{upstream}"
topic_prefix = "{SITE}"
forward = ["critical"]
{summaries}{peer}
{OVERHEAT}{rules}"#
    );
    let path = dir.join("watchpost.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Starts Watchpost with [`watchpost_config`] in `dir` and waits until its uplink is up.
pub fn watchpost(
    bins: &Bins,
    dir: &Path,
    upstream: SocketAddr,
    summaries: Option<&str>,
    rules: &str,
) -> Result<Gateway> {
    watchpost_with(bins, dir, upstream, summaries, rules, "")
}

/// [`watchpost`] with `broker`, more lines of `[broker]` (bounds a workload needs raised).
pub fn watchpost_with(
    bins: &Bins,
    dir: &Path,
    upstream: SocketAddr,
    summaries: Option<&str>,
    rules: &str,
    broker: &str,
) -> Result<Gateway> {
    std::fs::create_dir_all(dir)?;
    let config = watchpost_config(dir, upstream, summaries, rules, broker)?;
    let mut gateway = Gateway::start(&bins.watchpost, &config, &dir.join("watchpost.log"))?;
    gateway.wait_metrics("the uplink connects", Duration::from_secs(20), |m| {
        m.get("watchpost_uplink_connected") == 1.0
    })?;
    Ok(gateway)
}

/// A site pair started by [`pair`]: gateway A (`gw-a`) and B (`gw-b`), each in its own
/// directory under the pair's.
pub struct Pair {
    /// Gateway A.
    pub a: Gateway,
    /// Gateway B.
    pub b: Gateway,
}

/// Starts two gateways as a site pair in `dir/a` and `dir/b` ([`write_config`] with `rules`
/// and `takeover_after`, the same upstream) and waits until both forward upstream, mirror to
/// each other and have heard from each other.
pub fn pair(
    bins: &Bins,
    dir: &Path,
    upstream: SocketAddr,
    rules: &str,
    takeover_after: Option<&str>,
) -> Result<Pair> {
    let (port_a, port_b) = (watchpost_e2e::free_port()?, watchpost_e2e::free_port()?);
    let member = |id: &str, port: u16, peer: &str, peer_port: u16| PairMember {
        id: id.into(),
        port,
        peer: peer.into(),
        peer_addr: ([127, 0, 0, 1], peer_port).into(),
        takeover_after: takeover_after.map(str::to_owned),
    };
    let mut started = Vec::new();
    for (name, me) in [
        ("a", member("gw-a", port_a, "gw-b", port_b)),
        ("b", member("gw-b", port_b, "gw-a", port_a)),
    ] {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir)?;
        let config = write_config(&dir, Some(&me), upstream, None, rules, "")?;
        started.push(Gateway::start(
            &bins.watchpost,
            &config,
            &dir.join("watchpost.log"),
        )?);
    }
    let (Some(mut b), Some(mut a)) = (started.pop(), started.pop()) else {
        unreachable!("two gateways were started");
    };
    for gw in [&mut a, &mut b] {
        gw.wait_metrics(
            "the uplink connects, the mirror is up and the peer is heard from",
            Duration::from_secs(30),
            |m| {
                m.get("watchpost_uplink_connected") == 1.0
                    && m.get("watchpost_peer_mirror_up") == 1.0
                    && m.get("watchpost_peer_active") == 1.0
            },
        )?;
    }
    Ok(Pair { a, b })
}

/// A Mosquitto started by the benchmark, and its MQTT address.
pub struct Broker {
    /// The process.
    pub proc: Proc,
    /// Its listener.
    pub addr: SocketAddr,
}

/// Starts Mosquitto with `extra` configuration lines in `dir`, on a free port. With
/// `persistence`, the lines that make it save its in-memory database (retained messages and
/// sessions) there; without, `persistence false`.
fn mosquitto(dir: &Path, name: &str, persistence: Option<&str>, extra: &str) -> Result<Broker> {
    std::fs::create_dir_all(dir)?;
    let persistence = persistence.unwrap_or("persistence false\n");
    let mut last = None;
    for _ in 0..5 {
        let port = watchpost_e2e::free_port()?;
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\n{persistence}log_dest stderr\nlog_type error\nlog_type warning\n{extra}"
            ),
        )?;
        let log = dir.join(format!("{name}.log"));
        // Launched through the tests' helper for its readiness check, then owned here.
        match watchpost_e2e::launch_mosquitto(&conf, &[port], Some(&log)) {
            Ok(child) => {
                return Ok(Broker {
                    proc: Proc::adopt(name, child, &log),
                    addr: ([127, 0, 0, 1], port).into(),
                });
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("{name} was never started")))
}

/// Bare Mosquitto: anonymous, no persistence, defaults otherwise.
pub fn bare_mosquitto(dir: &Path) -> Result<Broker> {
    mosquitto(dir, "mosquitto", None, "")
}

/// Bare Mosquitto that saves its in-memory database to `mosquitto.db` in `dir/db` every
/// `autosave_s` seconds (Mosquitto looks every second or two), with `extra` configuration
/// lines; returns it and the database's path. Mosquitto started as root runs as the user
/// `mosquitto`, so the directory is open to every user.
pub fn saving_mosquitto(dir: &Path, autosave_s: u32, extra: &str) -> Result<(Broker, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let db = dir.join("db");
    std::fs::create_dir_all(&db)?;
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o777))?;
    let persistence = format!(
        "persistence true\npersistence_location {}/\nautosave_interval {autosave_s}\n",
        db.display()
    );
    let broker = mosquitto(dir, "mosquitto", Some(&persistence), extra)?;
    Ok((broker, db.join("mosquitto.db")))
}

/// The site's Mosquitto bridging `sensors/#` to `upstream` at `qos`, as most sites run today.
pub fn bridge(dir: &Path, upstream: SocketAddr, qos: u8) -> Result<Broker> {
    mosquitto(
        dir,
        "site-bridge",
        None,
        &format!(
            "\nconnection upstream\naddress {upstream}\ntopic sensors/# out {qos}\nbridge_protocol_version mqttv311\ncleansession true\n"
        ),
    )
}

/// The version line of `mosquitto -h`.
pub fn mosquitto_version() -> String {
    let Ok(bin) = watchpost_e2e::mosquitto_binary() else {
        return "not installed".into();
    };
    Command::new(bin)
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

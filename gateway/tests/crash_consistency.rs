//! Crash consistency: the real `watchpost` process is killed with SIGKILL at random moments of a
//! busy run, again and again, and restarted on the same data directory each time.
//!
//! 24 devices publish QoS 1 readings continuously (5-30 ms between one acknowledgement and the
//! next reading), each one raising or clearing a critical alert, while the upstream Mosquitto
//! is up for half the incarnations and down for the other half. 36 kills, 12 at each of three
//! moments: during startup (before or just after the ready line), in steady state, and right
//! after a burst in which every device's alert changes at once. After each kill, before the
//! restart, the database is opened as a restart opens it and must pass `PRAGMA
//! integrity_check`, keep every transition committed before, and hold the transition of every
//! reading the gateway acknowledged; each restart must log its ready line, take back exactly
//! the alerts the database says are raised, and log no error. At the end every committed
//! transition must have reached the upstream (duplicates allowed, under the same id and with
//! the same document), and the committed transitions must be exactly those of the acknowledged
//! readings: one per reading.
//!
//! SIGKILL leaves the page cache alone, so this tests the process dying at any instruction,
//! not the disk losing unsynced writes; for a power cut the gateway relies on SQLite's WAL and
//! `synchronous = FULL` for alert commits (README, "Nothing that should go upstream is lost").
//!
//! Each device sends one reading at a time and sends it again, to the restarted gateway, until
//! it is acknowledged, as a device with a persistent session would. Reading `k` of a device has
//! a value of its own (`1000 + k` for even `k`, which raises, `-k` for odd `k`, which clears),
//! so the transition it caused can be found by device, state and value.
//!
//! The randomness is seeded; the seed is printed, and `WATCHPOST_CRASH_SEED=<n>` replays a run.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use rusqlite::{Connection, config::DbConfig};
use tokio::sync::watch;
use watchpost::store::{DB_FILE, Reader};
use watchpost_e2e::{Collector, GatewayProcess, Mosquitto, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_watchpost");
const SITE: &str = "site-crash";
const DEVICES: usize = 24;
/// Kills at each moment: startup, steady state, right after a burst.
const KILLS: [(Moment, usize); 3] = [
    (Moment::Startup, 12),
    (Moment::Steady, 12),
    (Moment::AfterBurst, 12),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Moment {
    /// At a random point between the start of the process and a little after its ready line.
    Startup,
    /// At a random point of steady traffic.
    Steady,
    /// Within 20 ms of the acknowledgement of a burst in which every device's alert changed.
    AfterBurst,
}

/// The value of reading `k` of a device: unique per device; even readings raise, odd clear.
fn value(k: u64) -> f64 {
    if k % 2 == 0 {
        1000.0 + k as f64
    } else {
        -(k as f64)
    }
}

/// The transition reading `k` causes.
fn state(k: u64) -> &'static str {
    if k % 2 == 0 { "raised" } else { "cleared" }
}

/// A transition as the test can predict it: device, state, the value of the reading.
type Key = (String, String, u64);

fn key(device: &str, state: &str, value: f64) -> Key {
    (device.to_owned(), state.to_owned(), value.to_bits())
}

/// A few of `keys`, readable: device, state, value.
fn some<'a>(keys: impl IntoIterator<Item = &'a Key>) -> Vec<(&'a str, &'a str, f64)> {
    keys.into_iter()
        .take(5)
        .map(|(d, s, v)| (d.as_str(), s.as_str(), f64::from_bits(*v)))
        .collect()
}

fn device_name(i: usize) -> String {
    format!("dev-{i:02}")
}

/// What the devices share with the test.
struct Fleet {
    /// Per device, how many readings the gateway has acknowledged (readings `0..n`).
    acked: Vec<AtomicU64>,
    /// The gateway to connect to, and its incarnation; `None` while it is down.
    gateway: watch::Receiver<(u64, Option<SocketAddr>)>,
    /// While true, devices do not start a new reading.
    hold: watch::Receiver<bool>,
    /// Devices waiting at the hold.
    holding: AtomicUsize,
    /// Devices stop once their current reading is acknowledged.
    stop: AtomicBool,
    seed: u64,
}

impl Fleet {
    fn total_acked(&self) -> u64 {
        self.acked.iter().map(|a| a.load(Ordering::SeqCst)).sum()
    }

    /// The transition of every reading acknowledged so far.
    fn expected(&self) -> BTreeSet<Key> {
        let mut expected = BTreeSet::new();
        for (i, acked) in self.acked.iter().enumerate() {
            for k in 0..acked.load(Ordering::SeqCst) {
                expected.insert(key(&device_name(i), state(k), value(k)));
            }
        }
        expected
    }
}

/// One device: sends reading after reading at QoS 1, each only once the one before is
/// acknowledged, and the unacknowledged one again after every reconnect.
async fn device(i: usize, fleet: Arc<Fleet>) {
    let mut rng = fastrand::Rng::with_seed(fleet.seed ^ (i as u64 + 1).wrapping_mul(0x9e37));
    let topic = format!("sensors/{}/temperature", device_name(i));
    let mut gateway = fleet.gateway.clone();
    let mut hold = fleet.hold.clone();
    let mut next = 0u64;
    'connection: loop {
        let (incarnation, addr) = *gateway.borrow_and_update();
        let Some(addr) = addr else {
            let _ = gateway.changed().await;
            continue;
        };
        let mut options = MqttOptions::new(format!("crash-{i}"), "127.0.0.1", addr.port());
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 10);
        let mut sent = false;
        loop {
            if !sent {
                if *hold.borrow_and_update() {
                    fleet.holding.fetch_add(1, Ordering::SeqCst);
                    let _ = hold.wait_for(|h| !h).await;
                    fleet.holding.fetch_sub(1, Ordering::SeqCst);
                }
                if fleet.stop.load(Ordering::SeqCst) {
                    let _ = client.try_disconnect();
                    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
                    return;
                }
                client
                    .try_publish(&topic, QoS::AtLeastOnce, false, value(next).to_string())
                    .expect("room in the request queue");
                sent = true;
            }
            match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                    next += 1;
                    fleet.acked[i].store(next, Ordering::SeqCst);
                    sent = false;
                    tokio::time::sleep(Duration::from_millis(rng.u64(5..30))).await;
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => {
                    // The gateway is gone: wait for the next one (or try this one again soon).
                    drop(client);
                    let _ = tokio::time::timeout(
                        Duration::from_millis(200),
                        gateway.wait_for(|(n, _)| *n != incarnation),
                    )
                    .await;
                    continue 'connection;
                }
            }
        }
    }
}

fn write_config(dir: &Path, upstream_port: u16) -> PathBuf {
    let path = dir.join("watchpost.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"{SITE}\"\ndata_dir = {:?}\n\
             [broker]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = true\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [uplink]\nurl = \"mqtt://127.0.0.1:{upstream_port}\"\nkeep_alive = \"5s\"\n\
             [[rule]]\nname = \"overheat\"\nmatch = \"sensors/+/temperature\"\nabove = 90.0\nclear_below = 85.0\nseverity = \"critical\"\n",
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    path
}

/// What a check of the database after a kill found.
struct Committed {
    /// Every transition in `alert_history`, with its alert id.
    transitions: BTreeMap<Key, String>,
    /// Rows in the outbox.
    outbox: usize,
    /// Devices whose last committed transition is a raise: what a restart takes back.
    raised: usize,
}

/// Opens the database of a killed gateway as the restart will (read-write, recovering the WAL
/// left behind) and checks it; closes it without a checkpoint, so that the restart finds the
/// WAL as the crash left it. `None` if the gateway died before creating it.
fn check_database(data: &Path) -> Option<Committed> {
    let path = data.join(DB_FILE);
    if !path.exists() {
        return None;
    }
    let conn = Connection::open(&path).unwrap();
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
        .unwrap();
    let integrity: Vec<String> = conn
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(integrity, ["ok"], "integrity_check after SIGKILL");
    let tables: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM sqlite_schema WHERE name IN ('alert_history', 'outbox')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    if tables < 2 {
        // Killed before the first migration was committed: nothing can have been acknowledged.
        return Some(Committed {
            transitions: BTreeMap::new(),
            outbox: 0,
            raised: 0,
        });
    }
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");

    let mut transitions = BTreeMap::new();
    let mut last_state = BTreeMap::new();
    let mut stmt = conn
        .prepare("SELECT id, device, state, value FROM alert_history ORDER BY seq")
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, f64>(3)?,
            ))
        })
        .unwrap();
    for row in rows {
        let (id, device, state, value) = row.unwrap();
        let previous = transitions.insert(key(&device, &state, value), id.clone());
        last_state.insert(device.clone(), state.clone());
        assert!(
            previous.is_none(),
            "one reading, two transitions: {device} {state} {value} as {previous:?} and {id}"
        );
    }
    // Every row in the outbox is a committed transition's document.
    let ids: BTreeSet<(&str, &str)> = transitions
        .iter()
        .map(|((_, state, _), id)| (id.as_str(), state.as_str()))
        .collect();
    let mut stmt = conn
        .prepare("SELECT alert_id, payload FROM outbox")
        .unwrap();
    let outbox: Vec<(String, Vec<u8>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (id, payload) in &outbox {
        let doc: serde_json::Value = serde_json::from_slice(payload).expect("JSON in the outbox");
        assert_eq!(doc["id"].as_str(), Some(id.as_str()));
        let state = doc["state"].as_str().unwrap();
        assert!(
            ids.contains(&(id.as_str(), state)),
            "outbox row {id} {state} has no history row"
        );
    }
    Some(Committed {
        transitions,
        outbox: outbox.len(),
        raised: last_state.values().filter(|s| *s == "raised").count(),
    })
}

/// Log lines of a gateway that say something went wrong.
fn errors(log: &[String]) -> Vec<&String> {
    log.iter()
        .filter(|l| {
            let lower = l.to_lowercase();
            l.contains("ERROR")
                || l.contains("panicked")
                || (l.contains("WARN")
                    && ["database", "sqlite", "corrupt", "malformed", "store"]
                        .iter()
                        .any(|w| lower.contains(w)))
        })
        .collect()
}

/// Waits for the ready line of `gateway` and checks the start: it took back exactly the `raised`
/// alerts that the database holds, and logged no error. Returns the MQTT address.
fn wait_clean_start(gateway: &mut GatewayProcess, raised: usize, what: &str) -> SocketAddr {
    let addr = gateway.wait_ready(Duration::from_secs(20));
    let log = gateway.log();
    let restored = log
        .iter()
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("restored="))
        })
        .map_or(0, |n| n.parse().expect("a count"));
    assert_eq!(restored, raised, "{what}: alerts taken back at the restart");
    let bad = errors(log);
    assert!(bad.is_empty(), "{what}: the gateway logged {bad:#?}");
    addr
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_alert_survives_repeated_sigkills() {
    let started = Instant::now();
    let seed = std::env::var("WATCHPOST_CRASH_SEED")
        .ok()
        .map(|s| s.parse().expect("WATCHPOST_CRASH_SEED is a number"))
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("crash consistency seed {seed} (replay: WATCHPOST_CRASH_SEED={seed})");
    let mut rng = fastrand::Rng::with_seed(seed);

    let mut upstream = Mosquitto::start_persistent().unwrap();
    let upstream_sub = Collector::subscribe_persistent(
        upstream.addr(),
        &format!("{SITE}/alerts/#"),
        "crash-watcher",
    )
    .await
    .unwrap();
    let mut upstream_up = true;

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), upstream.port());
    let data = dir.path().join("data");

    let (gateway_tx, gateway_rx) = watch::channel((0u64, None));
    let (hold_tx, hold_rx) = watch::channel(false);
    let fleet = Arc::new(Fleet {
        acked: (0..DEVICES).map(|_| AtomicU64::new(0)).collect(),
        gateway: gateway_rx,
        hold: hold_rx,
        holding: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        seed,
    });
    let devices: Vec<_> = (0..DEVICES)
        .map(|i| tokio::spawn(device(i, fleet.clone())))
        .collect();

    // The kills, in a random order, each with the upstream up or down: half and half.
    let mut plan: Vec<(Moment, bool)> = KILLS
        .iter()
        .flat_map(|&(moment, n)| (0..n).map(move |j| (moment, j % 2 == 0)))
        .collect();
    rng.shuffle(&mut plan);

    let mut committed: BTreeMap<Key, String> = BTreeMap::new();
    let mut raised = 0;
    let mut incarnation = 0u64;
    let mut before_ready = 0;
    let mut clean_starts = 0;
    // From spawn to the ready line, as seen so far: a startup kill comes within the median,
    // so that some land before the ready line and some just after it.
    let mut startups = vec![Duration::from_millis(20)];
    for (n, &(moment, want_up)) in plan.iter().enumerate() {
        if want_up != upstream_up {
            if want_up {
                blocking(|| upstream.restart()).unwrap();
            } else {
                blocking(|| upstream.stop());
            }
            upstream_up = want_up;
        }
        let spawned = Instant::now();
        let mut gateway = GatewayProcess::spawn(BIN, &config);
        incarnation += 1;
        match moment {
            Moment::Startup => {
                startups.sort();
                let span = startups[startups.len() / 2];
                tokio::time::sleep(span.mul_f64(rng.f64())).await;
            }
            Moment::Steady | Moment::AfterBurst => {
                let what = format!("restart before kill {n}");
                let addr = blocking(|| wait_clean_start(&mut gateway, raised, &what));
                startups.push(spawned.elapsed());
                clean_starts += 1;
                gateway_tx.send_replace((incarnation, Some(addr)));
                let flowing = fleet.total_acked() + DEVICES as u64;
                assert!(
                    wait_until(Duration::from_secs(20), || fleet.total_acked() >= flowing).await,
                    "kill {n}: readings are acknowledged after the restart"
                );
                if moment == Moment::Steady {
                    tokio::time::sleep(Duration::from_millis(rng.u64(50..600))).await;
                } else {
                    // Every device changes its alert at once, and the gateway dies just after.
                    hold_tx.send_replace(true);
                    let all_held = wait_until(Duration::from_secs(10), || {
                        fleet.holding.load(Ordering::SeqCst) == DEVICES
                    })
                    .await;
                    assert!(all_held, "kill {n}: every device waits for the burst");
                    let burst = fleet.total_acked() + DEVICES as u64;
                    hold_tx.send_replace(false);
                    assert!(
                        wait_until(Duration::from_secs(20), || fleet.total_acked() >= burst).await,
                        "kill {n}: the burst is acknowledged"
                    );
                    tokio::time::sleep(Duration::from_millis(rng.u64(0..20))).await;
                }
            }
        }
        gateway.signal(libc::SIGKILL);
        blocking(|| gateway.wait_exit(Duration::from_secs(5))).expect("killed");
        gateway_tx.send_replace((incarnation, None));
        let log = gateway.log().to_vec();
        if !log.iter().any(|l| l.contains(" ready")) {
            before_ready += 1;
        }
        let bad = errors(&log);
        assert!(bad.is_empty(), "kill {n}: the gateway logged {bad:#?}");

        // The gateway is dead: every acknowledgement counted now was sent by it.
        let expected = fleet.expected();
        let Some(now) = check_database(&data) else {
            assert!(
                expected.is_empty(),
                "kill {n}: acknowledged without a database"
            );
            continue;
        };
        let lost: Vec<_> = committed
            .iter()
            .filter(|(k, id)| now.transitions.get(*k) != Some(*id))
            .collect();
        assert!(
            lost.is_empty(),
            "kill {n}: committed transitions gone or changed: {lost:?}"
        );
        let missing: Vec<_> = expected
            .iter()
            .filter(|k| !now.transitions.contains_key(*k))
            .collect();
        assert!(
            missing.is_empty(),
            "kill {n} ({moment:?}): {} acknowledged readings have no committed transition, e.g. {:?}",
            missing.len(),
            some(missing.iter().copied())
        );
        eprintln!(
            "kill {n:2}: {moment:?}, upstream {}, {} transitions committed, {} acknowledged, {} in the outbox",
            if upstream_up { "up" } else { "down" },
            now.transitions.len(),
            expected.len(),
            now.outbox,
        );
        committed = now.transitions;
        raised = now.raised;
    }

    // The last restart, with the upstream up: the devices deliver what is left and stop.
    if !upstream_up {
        blocking(|| upstream.restart()).unwrap();
    }
    let mut gateway = GatewayProcess::spawn(BIN, &config);
    let addr = blocking(|| wait_clean_start(&mut gateway, raised, "the last restart"));
    clean_starts += 1;
    incarnation += 1;
    gateway_tx.send_replace((incarnation, Some(addr)));
    let flowing = fleet.total_acked() + DEVICES as u64;
    assert!(wait_until(Duration::from_secs(20), || fleet.total_acked() >= flowing).await);
    fleet.stop.store(true, Ordering::SeqCst);
    for device in devices {
        tokio::time::timeout(Duration::from_secs(20), device)
            .await
            .expect("every device has its last reading acknowledged")
            .unwrap();
    }
    let drained = wait_until(Duration::from_secs(30), || {
        Reader::open(&data).is_ok_and(|r| r.outbox().is_ok_and(|(n, _)| n == 0))
    })
    .await;
    assert!(drained, "the outbox drains");
    gateway.signal(libc::SIGTERM);
    let (status, _) = blocking(|| gateway.wait_exit(Duration::from_secs(10))).expect("stops");
    assert!(status.success(), "the last gateway stops cleanly: {status}");
    let bad = errors(gateway.log());
    assert!(bad.is_empty(), "the last gateway logged {bad:#?}");

    let last = check_database(&data).expect("a database");
    let expected = fleet.expected();
    let committed_keys: BTreeSet<Key> = last.transitions.keys().cloned().collect();
    let unexplained: Vec<_> = committed_keys.difference(&expected).collect();
    let missing: Vec<_> = expected.difference(&committed_keys).collect();
    assert!(
        missing.is_empty() && unexplained.is_empty(),
        "committed transitions are exactly those of the acknowledged readings: \
         {} missing (e.g. {:?}), {} without an acknowledged reading (e.g. {:?})",
        missing.len(),
        some(missing.iter().copied()),
        unexplained.len(),
        some(unexplained.iter().copied()),
    );

    // Upstream: every committed transition, by id and state, with the document committed.
    let wanted: BTreeMap<(String, String), u64> = last
        .transitions
        .iter()
        .map(|((_, state, value), id)| ((id.clone(), state.clone()), *value))
        .collect();
    let received = || {
        let mut got: BTreeMap<(String, String), BTreeSet<u64>> = BTreeMap::new();
        for m in upstream_sub.messages() {
            let doc = m.json();
            got.entry((
                doc["id"].as_str().unwrap().to_owned(),
                doc["state"].as_str().unwrap().to_owned(),
            ))
            .or_default()
            .insert(doc["value"].as_f64().unwrap().to_bits());
        }
        got
    };
    let all_arrived = wait_until(Duration::from_secs(30), || {
        let got = received();
        wanted.keys().all(|k| got.contains_key(k))
    })
    .await;
    let got = received();
    let not_delivered: Vec<_> = wanted.keys().filter(|k| !got.contains_key(*k)).collect();
    assert!(
        all_arrived,
        "{} of {} committed transitions never reached the upstream, e.g. {:?}",
        not_delivered.len(),
        wanted.len(),
        &not_delivered[..not_delivered.len().min(5)]
    );
    for (transition, values) in &got {
        let Some(value) = wanted.get(transition) else {
            panic!("{transition:?} arrived upstream but was never committed");
        };
        assert_eq!(
            values,
            &BTreeSet::from([*value]),
            "{transition:?} arrived as two documents"
        );
    }
    let deliveries = upstream_sub.count();
    startups.sort();
    eprintln!(
        "{} kills ({before_ready} before the ready line, median startup {} ms), {clean_starts} \
         clean starts checked, {} transitions committed and delivered ({deliveries} deliveries \
         upstream), {:.1} s",
        plan.len(),
        startups[startups.len() / 2].as_millis(),
        wanted.len(),
        started.elapsed().as_secs_f64()
    );
}

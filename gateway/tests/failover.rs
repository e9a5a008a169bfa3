//! A device that knows two gateways loses nothing when the first is killed: three simulated
//! devices (the firmware's own node logic over TCP, `watchpost-sim`) publish at QoS 1 to the
//! real `watchpost` process A, which gets SIGKILL mid-stream; the devices move to process B.
//! Afterwards every `seq` each device queued must be in A's or B's database: what A
//! acknowledged was committed before the PUBACK, and what it had not acknowledged the devices
//! sent again to B.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use watchpost::store::Reader;
use watchpost_e2e::{GatewayProcess, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_watchpost");
const DEVICES: usize = 3;

/// A gateway on loopback that keeps every raw reading with its `seq`, so that its database
/// says exactly what it took.
fn write_config(dir: &Path, id: &str) -> PathBuf {
    let path = dir.join("watchpost.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"{id}\"\ndata_dir = {:?}\n\
             [broker]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = true\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [history]\nraw_retention = \"1h\"\n\
             [[rule]]\nname = \"overheat\"\nmatch = \"sensors/+/temperature\"\nabove = 90.0\nclear_below = 85.0\nseverity = \"critical\"\n",
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    path
}

/// `seq`s of every stored reading of `device`.
fn stored_seqs(data: &Path, device: &str) -> BTreeSet<u64> {
    Reader::open(data)
        .map(|r| r.raw_readings(0).unwrap_or_default())
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.device == device)
        .filter_map(|r| r.seq)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_two_gateways_loses_nothing_when_the_first_is_killed() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = GatewayProcess::spawn(BIN, &write_config(dir_a.path(), "site-a"));
    let addr_a = a.wait_ready(Duration::from_secs(20));
    let mut b = GatewayProcess::spawn(BIN, &write_config(dir_b.path(), "site-b"));
    let addr_b = b.wait_ready(Duration::from_secs(20));
    let (data_a, data_b) = (dir_a.path().join("data"), dir_b.path().join("data"));

    let mut options = watchpost_sim::Options::new(addr_a, DEVICES);
    options.gateways.push(addr_b);
    options.rate = 20.0;
    options.every_sample();
    options.metrics = 1;
    options.duration = Duration::from_secs(5);
    options.drain = Duration::from_secs(15);
    options.keep_alive_ms = 2_000;
    options.ack_timeout_ms = 1_000;
    options.prefix = "pair-".into();
    let sim = tokio::task::spawn_blocking(move || watchpost_sim::run(&options));

    // A takes readings for a while, and dies while they keep coming.
    let stored_at_a = || {
        (0..DEVICES)
            .map(|i| stored_seqs(&data_a, &format!("pair-{i}")).len())
            .sum::<usize>()
    };
    assert!(
        wait_until(Duration::from_secs(20), || stored_at_a() >= 60).await,
        "A never stored readings"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    a.signal(libc::SIGKILL);
    a.wait_exit(Duration::from_secs(5)).expect("A killed");
    let report = sim.await.unwrap().unwrap();
    b.signal(libc::SIGTERM);
    b.wait_exit(Duration::from_secs(20)).expect("B stopped");

    // The devices: everything queued was acknowledged, by one gateway or the other.
    assert_eq!(report.connected_at_end, DEVICES, "{report}");
    assert!(report.gateway_moves >= DEVICES as u64, "{report}");
    assert_eq!((report.dropped, report.unsent), (0, 0), "{report}");
    assert_eq!(report.acked, report.queued, "{report}");
    // The gateways: every seq of every device is in A's or B's database.
    let devices_at_b = Reader::open(&data_b).unwrap().devices().unwrap();
    let mut stored = 0;
    for i in 0..DEVICES {
        let device = format!("pair-{i}");
        let at_a = stored_seqs(&data_a, &device);
        let at_b = stored_seqs(&data_b, &device);
        assert!(
            !at_a.is_empty() && !at_b.is_empty(),
            "{device}: A stored {}, B {}",
            at_a.len(),
            at_b.len()
        );
        let all: BTreeSet<u64> = at_a.union(&at_b).copied().collect();
        let expected: BTreeSet<u64> = (0..=*all.last().unwrap()).collect();
        let missing: Vec<u64> = expected.difference(&all).copied().collect();
        assert!(
            missing.is_empty(),
            "{device}: {missing:?} acknowledged by no database (A up to {:?}, B from {:?})",
            at_a.last(),
            at_b.first()
        );
        stored += all.len() as u64;
        let record = devices_at_b.iter().find(|d| d.device == device).unwrap();
        assert_eq!(record.lost, 0, "{device} at B: {record:?}");
    }
    assert_eq!(stored, report.queued, "{report}");
}

//! What the failover tests share: a small fleet of simulated devices that know two gateways,
//! and the check that nothing they handed over is missing from both gateways' databases.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use watchpost::store::Reader;

/// Device ids of the fleet are `pair-0`, `pair-1`, ...
pub const PREFIX: &str = "pair-";

/// A gateway configuration fragment that keeps every raw reading with its `seq`, so that the
/// database says exactly what the gateway took.
pub const KEEP_RAW: &str = "[history]\nraw_retention = \"1h\"\n";

/// `devices` simulated devices that know `first`, then `second`: one temperature reading at
/// QoS 1 every 50 ms for 5 s (report by exception off), a dead link found within about a
/// second, up to 15 s to deliver what is left afterwards.
pub fn fleet(first: SocketAddr, second: SocketAddr, devices: usize) -> watchpost_sim::Options {
    let mut options = watchpost_sim::Options::new(first, devices);
    options.gateways.push(second);
    options.rate = 20.0;
    options.every_sample();
    options.metrics = 1;
    options.duration = Duration::from_secs(5);
    options.drain = Duration::from_secs(15);
    options.keep_alive_ms = 2_000;
    options.ack_timeout_ms = 1_000;
    options.prefix = PREFIX.into();
    options
}

/// `seq`s of every stored reading of `device` in the database in `data` (none if there is no
/// database yet).
pub fn stored_seqs(data: &Path, device: &str) -> BTreeSet<u64> {
    Reader::open(data)
        .map(|r| r.raw_readings(0).unwrap_or_default())
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.device == device)
        .filter_map(|r| r.seq)
        .collect()
}

/// Readings of the fleet stored in the database in `data` so far.
pub fn stored(data: &Path, devices: usize) -> usize {
    (0..devices)
        .map(|i| stored_seqs(data, &format!("{PREFIX}{i}")).len())
        .sum()
}

/// After a run in which gateway A (database in `data_a`) died and B (`data_b`) took over, both
/// stopped: every device moved and ended connected, dropped nothing, had everything
/// acknowledged, and every `seq` each one queued is in A's or B's database, once; B's `seq`
/// accounting shows nothing lost.
pub fn assert_nothing_lost(
    report: &watchpost_sim::Report,
    devices: usize,
    data_a: &Path,
    data_b: &Path,
) {
    assert_eq!(report.connected_at_end, devices, "{report}");
    assert!(
        report.gateway_moves >= devices as u64,
        "every device moved: {report}"
    );
    assert_eq!((report.dropped, report.unsent), (0, 0), "{report}");
    assert_eq!(report.acked, report.queued, "{report}");
    let at_b = Reader::open(data_b).unwrap().devices().unwrap();
    let mut stored = 0;
    for i in 0..devices {
        let device = format!("{PREFIX}{i}");
        let (a, b) = (stored_seqs(data_a, &device), stored_seqs(data_b, &device));
        assert!(
            !a.is_empty() && !b.is_empty(),
            "{device}: A stored {}, B {}",
            a.len(),
            b.len()
        );
        let all: BTreeSet<u64> = a.union(&b).copied().collect();
        let expected: BTreeSet<u64> = (0..=*all.last().expect("not empty")).collect();
        let missing: Vec<u64> = expected.difference(&all).copied().collect();
        assert!(
            missing.is_empty(),
            "{device}: {missing:?} in neither database (A up to {:?}, B from {:?})",
            a.last(),
            b.first()
        );
        stored += all.len() as u64;
        let record = at_b
            .iter()
            .find(|d| d.device == device)
            .expect("B knows it");
        assert_eq!(record.lost, 0, "{device} at B: {record:?}");
    }
    assert_eq!(
        stored, report.queued,
        "every message the devices queued is at one gateway: {report}"
    );
}

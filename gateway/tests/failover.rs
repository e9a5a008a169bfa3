//! A device that knows two gateways loses nothing when the first is killed: three simulated
//! devices (the firmware's own node logic over TCP, `watchpost-sim`) publish at QoS 1 to the
//! real `watchpost` process A, which gets SIGKILL mid-stream; the devices move to process B.
//! Afterwards every `seq` each device queued must be in A's or B's database: what A
//! acknowledged was committed before the PUBACK, and what it had not acknowledged the devices
//! sent again to B.

use std::path::{Path, PathBuf};
use std::time::Duration;

use watchpost_e2e::failover::{self, KEEP_RAW};
use watchpost_e2e::{GatewayProcess, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_watchpost");
const DEVICES: usize = 3;

/// A gateway on loopback that keeps every raw reading with its `seq`.
fn write_config(dir: &Path, id: &str) -> PathBuf {
    let path = dir.join("watchpost.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"{id}\"\ndata_dir = {:?}\n\
             [broker]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = true\n[http]\nlisten = \"127.0.0.1:0\"\n\
             {KEEP_RAW}\
             [[rule]]\nname = \"overheat\"\nmatch = \"sensors/+/temperature\"\nabove = 90.0\nclear_below = 85.0\nseverity = \"critical\"\n",
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_with_two_gateways_loses_nothing_when_the_first_is_killed() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = GatewayProcess::spawn(BIN, &write_config(dir_a.path(), "site-a"));
    let addr_a = a.wait_ready(Duration::from_secs(20));
    let mut b = GatewayProcess::spawn(BIN, &write_config(dir_b.path(), "site-b"));
    let addr_b = b.wait_ready(Duration::from_secs(20));
    let (data_a, data_b) = (dir_a.path().join("data"), dir_b.path().join("data"));

    let options = failover::fleet(addr_a, addr_b, DEVICES);
    let sim = tokio::task::spawn_blocking(move || watchpost_sim::run(&options));
    // A takes readings for a while, and dies while they keep coming.
    assert!(
        wait_until(Duration::from_secs(20), || failover::stored(
            &data_a, DEVICES
        ) >= 60)
        .await,
        "A never stored readings"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    a.signal(libc::SIGKILL);
    a.wait_exit(Duration::from_secs(5)).expect("A killed");
    let report = sim.await.unwrap().unwrap();
    b.signal(libc::SIGTERM);
    b.wait_exit(Duration::from_secs(20)).expect("B stopped");

    failover::assert_nothing_lost(&report, DEVICES, &data_a, &data_b);
}

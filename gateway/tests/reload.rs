//! Hot reload as an operator does it: edit the rules file of the running `watchpost` process
//! and send SIGHUP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::QoS;
use watchpost_e2e::{Collector, GatewayProcess, Publisher};

const BIN: &str = env!("CARGO_BIN_EXE_watchpost");
const DEADLINE: Duration = Duration::from_secs(20);

fn write(dir: &Path, rules: &str) -> PathBuf {
    let path = dir.join("watchpost.toml");
    let data = dir.join("data").display().to_string();
    std::fs::write(&path, format!("[gateway]\nid = \"reload\"\ndata_dir = {data:?}\n[broker]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = true\n[http]\nlisten = \"127.0.0.1:0\"\n{rules}")).unwrap();
    path
}

const OVERHEAT: &str = "[[rule]]\nname = \"overheat\"\nmatch = \"sensors/+/temperature\"\nabove = 90.0\nclear_below = 85.0\nseverity = \"critical\"\n";
const DAMP: &str = "[[rule]]\nname = \"damp\"\nmatch = \"sensors/+/humidity\"\nabove = 80.0\nseverity = \"warning\"\n";

/// (device, rule, state) of each alert document so far.
fn log(collector: &Collector) -> Vec<(String, String, String)> {
    collector
        .messages()
        .iter()
        .map(|m| {
            let d = m.json();
            let s = |k: &str| d[k].as_str().unwrap().to_owned();
            (s("device"), s("rule"), s("state"))
        })
        .collect()
}

fn entry(device: &str, rule: &str, state: &str) -> (String, String, String) {
    (device.into(), rule.into(), state.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_rules_keeps_raised_alerts_and_survives_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), OVERHEAT);
    let mut gateway = GatewayProcess::spawn(BIN, &config);
    let addr = gateway.wait_ready(DEADLINE);
    let alerts = Collector::subscribe(addr, "alerts/#").await.unwrap();
    let sensor = Publisher::connect(addr, "boiler").await.unwrap();
    sensor
        .publish("sensors/boiler/temperature", QoS::AtLeastOnce, "95")
        .await
        .unwrap();
    alerts.wait_for(1, DEADLINE).await.unwrap();

    // A new rule beside the unchanged one.
    write(dir.path(), &format!("{OVERHEAT}{DAMP}"));
    gateway.signal(libc::SIGHUP);
    assert!(
        gateway.wait_line("rules reloaded", DEADLINE).is_some(),
        "{:#?}",
        gateway.log()
    );
    // Still above 90: the raised overheat alert must not be raised again...
    sensor
        .publish("sensors/boiler/temperature", QoS::AtLeastOnce, "96")
        .await
        .unwrap();
    // ...and the new rule works.
    sensor
        .publish("sensors/boiler/humidity", QoS::AtLeastOnce, "93")
        .await
        .unwrap();
    alerts.wait_for(2, DEADLINE).await.unwrap();
    assert_eq!(
        log(&alerts),
        [
            entry("boiler", "overheat", "raised"),
            entry("boiler", "damp", "raised")
        ]
    );

    // A broken file: reported, and the old rules keep running.
    write(
        dir.path(),
        &format!(
            "{OVERHEAT}{DAMP}[[rule]]\nname = \"broken\"\nmatch = \"sensors/+/x\"\nabove = \"high\"\n"
        ),
    );
    gateway.signal(libc::SIGHUP);
    assert!(
        gateway
            .wait_line("the old rules keep running", DEADLINE)
            .is_some(),
        "{:#?}",
        gateway.log()
    );
    assert!(
        gateway
            .log()
            .iter()
            .any(|l| l.contains("watchpost.toml:23:9")),
        "the error names its place: {:#?}",
        gateway.log()
    );
    sensor
        .publish("sensors/boiler/humidity", QoS::AtLeastOnce, "60")
        .await
        .unwrap();
    sensor
        .publish("sensors/boiler/temperature", QoS::AtLeastOnce, "70")
        .await
        .unwrap();
    alerts.wait_for(4, DEADLINE).await.unwrap();
    assert_eq!(
        log(&alerts)[2..],
        [
            entry("boiler", "damp", "cleared"),
            entry("boiler", "overheat", "cleared")
        ],
        "both rules still judge after the failed reload"
    );
    gateway.signal(libc::SIGTERM);
    gateway.wait_exit(Duration::from_secs(5)).expect("stops");
}

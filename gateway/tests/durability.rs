//! Alerts survive a crash: the real `watchpost` process is killed with SIGKILL in the middle
//! of a burst of alerts while the upstream broker is down; after a restart, everything that
//! was committed to the outbox reaches the upstream, each transition under one id.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use rumqttc::QoS;
use watchpost::store::Reader;
use watchpost_e2e::{Collector, GatewayProcess, Mosquitto, Publisher, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_watchpost");

fn write_config(dir: &Path, upstream_port: u16) -> std::path::PathBuf {
    let path = dir.join("watchpost.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"site-crash\"\ndata_dir = {:?}\n\
             [broker]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = true\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [uplink]\nurl = \"mqtt://127.0.0.1:{upstream_port}\"\nkeep_alive = \"1s\"\n\
             [[rule]]\nname = \"overheat\"\nmatch = \"sensors/+/temperature\"\nabove = 90.0\nclear_below = 85.0\nseverity = \"critical\"\n",
            dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_committed_before_a_sigkill_reach_the_upstream_after_restart() {
    let mut upstream = Mosquitto::start_persistent().unwrap();
    let upstream_sub =
        Collector::subscribe_persistent(upstream.addr(), "site-crash/alerts/#", "crash-watcher")
            .await
            .unwrap();
    upstream.stop();

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), upstream.port());
    let mut gateway = GatewayProcess::spawn(BIN, &config);
    let addr = gateway.wait_ready(Duration::from_secs(20));

    // A burst of raise/clear transitions on 20 devices, still going when the gateway dies.
    let sensor = Publisher::connect(addr, "burst").await.unwrap();
    let burst = tokio::spawn(async move {
        for round in 0u32.. {
            for d in 0..20 {
                let value = if round % 2 == 0 { "95" } else { "70" };
                let topic = format!("sensors/dev-{d}/temperature");
                if sensor
                    .publish(&topic, QoS::AtLeastOnce, value)
                    .await
                    .is_err()
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let data = dir.path().join("data");
    let history = || {
        Reader::open(&data)
            .ok()
            .and_then(|r| r.alerts(0).ok())
            .map_or(0, |a| a.len())
    };
    assert!(
        wait_until(Duration::from_secs(20), || history() >= 200).await,
        "alerts are being committed"
    );
    gateway.signal(libc::SIGKILL);
    gateway.wait_exit(Duration::from_secs(5)).expect("killed");
    burst.abort();

    // What the dead gateway committed: every critical transition, all still in the outbox.
    let reader = Reader::open(&data).unwrap();
    let committed: BTreeSet<(String, String)> = reader
        .alerts(0)
        .unwrap()
        .into_iter()
        .map(|a| (a.id, a.state))
        .collect();
    let (queued, _) = reader.outbox().unwrap();
    assert_eq!(
        queued as usize,
        committed.len(),
        "alert history and outbox are written together"
    );
    drop(reader);
    eprintln!(
        "{} alert transitions committed before SIGKILL",
        committed.len()
    );

    let mut gateway = GatewayProcess::spawn(BIN, &config);
    gateway.wait_ready(Duration::from_secs(20));
    upstream.restart().unwrap();
    let drained = wait_until(Duration::from_secs(60), || {
        Reader::open(&data).is_ok_and(|r| r.outbox().is_ok_and(|(n, _)| n == 0))
    })
    .await;
    assert!(drained, "the outbox drains after the restart");

    // A transition is its device, rule, state, episode start and time: a device can be raised,
    // cleared and raised again within one millisecond when several of its readings are judged
    // in one batch, so the time alone does not tell two clears apart.
    type Transition = (String, String, String, String, String);
    let received = || {
        let mut by_transition: BTreeMap<Transition, BTreeSet<String>> = BTreeMap::new();
        for m in upstream_sub.messages() {
            let doc = m.json();
            let s = |k: &str| doc[k].as_str().unwrap().to_owned();
            by_transition
                .entry((s("device"), s("rule"), s("state"), s("since"), s("at")))
                .or_default()
                .insert(s("id"));
        }
        by_transition
    };
    assert!(
        wait_until(Duration::from_secs(30), || received().len()
            >= committed.len())
        .await,
        "{} of {}",
        received().len(),
        committed.len()
    );
    let got = received();
    for (transition, ids) in &got {
        assert_eq!(
            ids.len(),
            1,
            "{transition:?} arrived under several ids: {ids:?}"
        );
    }
    let delivered: BTreeSet<(String, String)> = got
        .iter()
        .map(|((_, _, state, _, _), ids)| (ids.iter().next().unwrap().clone(), state.clone()))
        .collect();
    assert_eq!(
        delivered, committed,
        "exactly what was committed arrives upstream"
    );
    gateway.signal(libc::SIGTERM);
    gateway.wait_exit(Duration::from_secs(5)).expect("stops");
}

//! The `watchpost` binary as an operator runs it: start, serve, stop on a signal; refuse to
//! start with a reason; check configurations; add and remove devices and query the database
//! while the gateway runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rumqttc::{ConnectReturnCode, QoS};
use watchpost_e2e::{GatewayProcess, Publisher, clients, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_watchpost");

fn write_config(dir: &Path, broker: &str, extra: &str) -> PathBuf {
    let path = dir.join("watchpost.toml");
    let data = dir.join("data");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"cli\"\ndata_dir = {:?}\n[broker]\n{broker}\n[http]\nlisten = \"127.0.0.1:0\"\n{extra}\n[[rule]]\nname = \"hot\"\nmatch = \"sensors/+/t\"\nabove = 1.0\nseverity = \"critical\"\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    path
}

const ANONYMOUS_ON_ANY_PORT: &str = "listen = \"127.0.0.1:0\"\nallow_anonymous = true";

/// One MQTT CONNECT/CONNACK round trip with a real client.
fn mqtt_connects(addr: SocketAddr) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async { Publisher::connect(addr, "cli-probe").await.is_ok() })
}

#[test]
fn run_serves_and_stops_cleanly_within_two_seconds_on_sigterm_and_sigint() {
    for (name, sig) in [("SIGTERM", libc::SIGTERM), ("SIGINT", libc::SIGINT)] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), ANONYMOUS_ON_ANY_PORT, "");
        let mut gateway = GatewayProcess::spawn(BIN, &config);
        let addr = gateway.wait_ready(Duration::from_secs(20));
        assert!(
            dir.path().join("data/watchpost.db").exists(),
            "data directory and database created"
        );
        assert!(mqtt_connects(addr), "the broker serves MQTT");

        gateway.signal(sig);
        let (status, took) = gateway.wait_exit(Duration::from_secs(5)).expect("exited");
        assert!(status.success(), "{name}: {status}");
        assert!(
            took < Duration::from_secs(2),
            "{name}: shutdown took {took:?}"
        );
        assert!(
            gateway
                .wait_line("stopped", Duration::from_secs(1))
                .is_some(),
            "{:#?}",
            gateway.log()
        );
    }
}

/// Runs `watchpost ARGS --config CONFIG`.
fn output(args: &[&str], config: &Path) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

/// Runs `watchpost ARGS --config CONFIG`; returns whether it succeeded and what it printed
/// (standard output, then standard error).
fn cli(args: &[&str], config: &Path) -> (bool, String) {
    let out = output(args, config);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test]
async fn devices_come_and_go_with_the_cli_while_the_gateway_runs() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "listen = \"127.0.0.1:0\"\nallow_anonymous = false",
        "",
    );
    let mut gateway = GatewayProcess::spawn(BIN, &config);
    let addr = gateway.wait_ready(Duration::from_secs(20));
    assert!(
        gateway
            .wait_line("no device may connect yet", Duration::from_secs(1))
            .is_some(),
        "an empty credentials file is pointed out: {:#?}",
        gateway.log()
    );
    let anonymous = clients::connect(clients::options(addr, "anon", None))
        .await
        .unwrap();
    assert_eq!(anonymous.refused(), Some(ConnectReturnCode::NotAuthorized));

    let (ok, out) = cli(&["device", "add", "boiler-1"], &config);
    assert!(ok, "{out}");
    let secret = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("secret: "))
        .unwrap_or_else(|| panic!("the secret is printed: {out}"))
        .to_owned();
    let stored = std::fs::read_to_string(dir.path().join("data/credentials.toml")).unwrap();
    assert!(!stored.contains(&secret), "only a hash is stored");
    let (ok, out) = cli(&["device", "add", "boiler-1"], &config);
    assert!(!ok && out.contains("already exists"), "{out}");
    let (ok, out) = cli(&["device", "list"], &config);
    assert!(
        ok && out.contains("boiler-1") && !out.contains(&secret),
        "{out}"
    );

    // The running gateway picks the new device up by itself.
    let login = Some(("boiler-1", secret.as_str()));
    let mut device = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while device.is_none() && std::time::Instant::now() < deadline {
        device = clients::Watched::connect(clients::options(addr, "boiler-1", login))
            .await
            .ok();
    }
    let device = device.expect("the new device is let in within 5 s");

    let (ok, out) = cli(&["device", "remove", "boiler-1"], &config);
    assert!(ok, "{out}");
    device
        .wait_for(Duration::from_secs(5), |s| {
            matches!(s, clients::Seen::Error(_))
        })
        .await
        .expect("the removed device is disconnected");
    let again = clients::connect(clients::options(addr, "boiler-1", login))
        .await
        .unwrap();
    assert_eq!(
        again.refused(),
        Some(ConnectReturnCode::BadUserNamePassword)
    );
    let (ok, out) = cli(&["device", "remove", "boiler-1"], &config);
    assert!(!ok && out.contains("is not in"), "{out}");
}

#[test]
fn run_reports_a_taken_port() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!("listen = \"127.0.0.1:{port}\"\nallow_anonymous = true"),
        "",
    );
    let mut gateway = GatewayProcess::spawn(BIN, &config);
    let (status, _) = gateway
        .wait_exit(Duration::from_secs(10))
        .expect("exits by itself");
    assert_eq!(status.code(), Some(1));
    let line = gateway.wait_line(
        &format!("cannot listen on 127.0.0.1:{port}"),
        Duration::from_secs(1),
    );
    assert!(line.is_some(), "{:#?}", gateway.log());
}

#[test]
fn check_reports_every_mistake_with_its_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(dir.path(), "allow_anonymous = true", "");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Five different mistakes.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[gateway]\n\
         id = \"x\"\n\
         \n\
         [[rule]]\n\
         name = \"hot\"\n\
         match = \"sensors/+/temperature\"\n\
         above = 90.0\n\
         clear_below = 95.0\n\
         sevrity = \"critical\"\n\
         \n\
         [[rule]]\n\
         name = \"hot\"\n\
         match = \"alerts/#\"\n\
         above = 1.0\n\
         for = \"10 sex\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    let errors: Vec<&str> = text.lines().filter(|l| l.contains(": error: ")).collect();
    let expected = [
        "bad.toml:8:15: error: inverted hysteresis band: `clear_below` (95) is greater than `above` (90)",
        "bad.toml:9:1: error: unknown field `sevrity` in [[rule]]",
        "bad.toml:12:8: error: two rules are named \"hot\"",
        "bad.toml:13:9: error: `match` filter \"alerts/#\" can never match a reading topic",
        "bad.toml:15:7: error: `for` is not a duration: \"10 sex\"",
    ];
    assert_eq!(errors.len(), 5, "{text}");
    for (line, want) in errors.iter().zip(expected) {
        assert!(
            line.ends_with(want),
            "{line:?} should end with {want:?}\n{text}"
        );
    }
    assert!(text.contains("help: did you mean `severity`?"), "{text}");
    assert!(text.contains("5 error(s)"), "{text}");
}

/// `watchpost test-rules` of a shipped configuration on a shipped readings file, against
/// `expect`.
fn test_rules(config: &str, readings: &str, expect: &Path) -> std::process::Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    Command::new(BIN)
        .arg("test-rules")
        .arg("--config")
        .arg(root.join("config").join(config))
        .arg("--readings")
        .arg(root.join("config/examples").join(readings))
        .arg("--expect")
        .arg(expect)
        .output()
        .unwrap()
}

#[test]
fn test_rules_passes_on_the_shipped_example_and_shows_a_removed_expectation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let expected = root.join("config/examples/boiler-expected.jsonl");
    let run = |expect: &Path| test_rules("watchpost.toml", "boiler-readings.csv", expect);

    let out = run(&expected);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("14 readings from 3 devices: 2 raised, 2 cleared"),
        "{stdout}"
    );
    assert!(
        stderr.contains("all 4 expected alerts, and no others"),
        "{stderr}"
    );

    // Drop the expectation that boiler-1 overheats: the run must fail and say which alert.
    let dir = tempfile::tempdir().unwrap();
    let fewer = dir.path().join("fewer.jsonl");
    let text = std::fs::read_to_string(&expected).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !(l.contains("\"overheat\"") && l.contains("\"raised\"")))
        .collect();
    assert_eq!(kept.len(), 3);
    std::fs::write(&fewer, kept.join("\n")).unwrap();
    let out = run(&fewer);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("1 difference(s)"), "{stderr}");
    assert!(
        stderr.contains(
            "+ not expected:  2026-11-21T18:00:20.000Z  raised   boiler-1  overheat  temperature"
        ),
        "{stderr}"
    );
}

#[test]
fn test_rules_compares_states_on_the_zigbee_example() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let expected = root.join("config/examples/zigbee-expected.jsonl");
    let run = |expect: &Path| test_rules("zigbee2mqtt.toml", "zigbee-readings.csv", expect);
    let out = run(&expected);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("14 readings from 4 devices: 3 raised, 2 cleared"),
        "{stdout}"
    );
    // The table shows the states themselves.
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("basement.leak") && l.contains("water-leak") && l.contains("true")),
        "{stdout}"
    );

    // Remove the leak's raise: the run fails and names the alert, with its state.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&expected).unwrap();
    let fewer = dir.path().join("fewer.jsonl");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !(l.contains("\"water-leak\"") && l.contains("\"raised\"")))
        .collect();
    assert_eq!(kept.len(), 4);
    std::fs::write(&fewer, kept.join("\n")).unwrap();
    let out = run(&fewer);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "+ not expected:  2026-11-21T18:06:30.000Z  raised   basement.leak  water-leak  water_leak  value true"
        ),
        "{stderr}"
    );

    // Expect the door open when it was closed: a different state is a difference too.
    let wrong = dir.path().join("wrong.jsonl");
    std::fs::write(
        &wrong,
        text.replace(r#""value":"closed""#, r#""value":"open""#),
    )
    .unwrap();
    let out = run(&wrong);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("- missing:       2026-11-21T18:13:00.000Z  cleared  hall.door  door-open  door  value \"open\""),
        "{stderr}"
    );
}

#[test]
fn default_config_prints_the_quickstart() {
    let out = Command::new(BIN).arg("default-config").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        watchpost::config::QUICKSTART
    );
}

/// Runs `watchpost ARGS --config CONFIG`, which must succeed; returns its standard output.
fn watchpost(args: &[&str], config: &Path) -> String {
    let out = output(args, config);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_history_and_devices_are_queried_while_the_gateway_runs() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        ANONYMOUS_ON_ANY_PORT,
        "[history]\nwindow = \"1s\"\nraw_retention = \"1h\"",
    );
    let mut gateway = GatewayProcess::spawn(BIN, &config);
    let addr = gateway.wait_ready(Duration::from_secs(20));
    let sensor = Publisher::connect(addr, "probe").await.unwrap();
    for (seq, value) in [(0, "0.5"), (1, "0.7"), (3, "5.5"), (3, "5.5"), (4, "0.2")] {
        let payload = format!("{{\"v\":{value},\"seq\":{seq}}}");
        sensor
            .publish("sensors/kiln/t", QoS::AtLeastOnce, payload)
            .await
            .unwrap();
    }
    sensor.wait_acked(5, Duration::from_secs(10)).await.unwrap();

    // Counters reach the database about once a second, closed windows within seconds.
    let devices_json = || {
        let text = watchpost(&["devices", "--json"], &config);
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    };
    assert!(
        wait_until(
            Duration::from_secs(20),
            || devices_json()["devices"][0]["messages"] == 5
        )
        .await,
        "{}",
        devices_json()
    );
    let doc = devices_json();
    let kiln = &doc["devices"][0];
    assert_eq!(
        (
            kiln["device"].as_str(),
            kiln["lost"].as_u64(),
            kiln["duplicated"].as_u64()
        ),
        (Some("kiln"), Some(1), Some(1))
    );
    let table = watchpost(&["devices"], &config);
    assert!(
        table.lines().next().unwrap().starts_with("DEVICE"),
        "{table}"
    );
    assert!(table.contains("kiln"), "{table}");

    let alerts = watchpost(&["alerts", "--since", "1h"], &config);
    assert!(
        alerts.contains("raised") && alerts.contains("cleared") && alerts.contains("kiln"),
        "{alerts}"
    );
    let alerts_json: serde_json::Value =
        serde_json::from_str(&watchpost(&["alerts", "--json"], &config)).unwrap();
    assert_eq!(alerts_json.as_array().unwrap().len(), 2);

    let raw_seqs = || {
        let args = [
            "history", "--device", "kiln", "--metric", "t", "--raw", "--json",
        ];
        let rows: serde_json::Value = serde_json::from_str(&watchpost(&args, &config)).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert!(
        wait_until(Duration::from_secs(10), || raw_seqs() == [0, 1, 3, 4]).await,
        "{:?}",
        raw_seqs()
    );
    let rollups_ready = wait_until(Duration::from_secs(20), || {
        let text = watchpost(
            &["history", "--device", "kiln", "--metric", "t", "--json"],
            &config,
        );
        let rows: serde_json::Value = serde_json::from_str(&text).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| r["count"].as_u64().unwrap())
            .sum::<u64>()
            == 4
    })
    .await;
    assert!(
        rollups_ready,
        "four readings (the duplicate dropped) in closed windows"
    );
    gateway.signal(libc::SIGTERM);
    gateway.wait_exit(Duration::from_secs(5)).expect("stops");
}

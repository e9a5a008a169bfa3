//! The `watchpost` binary as an operator runs it: start, serve, stop on a signal; refuse to
//! start with a reason; check configurations.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use watchpost_e2e::{GatewayProcess, Publisher};

const BIN: &str = env!("CARGO_BIN_EXE_watchpost");

fn write_config(dir: &Path, broker: &str, extra: &str) -> PathBuf {
    let path = dir.join("watchpost.toml");
    let data = dir.join("data");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"cli\"\ndata_dir = {:?}\n[broker]\n{broker}\n{extra}\n[[rule]]\nname = \"hot\"\nmatch = \"sensors/+/t\"\nabove = 1.0\nseverity = \"critical\"\n",
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

#[test]
fn run_refuses_to_start_without_anonymous_access_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "listen = \"127.0.0.1:0\"\nallow_anonymous = false",
        "",
    );
    let mut gateway = GatewayProcess::spawn(BIN, &config);
    let (status, _) = gateway
        .wait_exit(Duration::from_secs(10))
        .expect("exits by itself");
    assert_eq!(status.code(), Some(1));
    let reason = gateway.wait_line("allow_anonymous = true", Duration::from_secs(1));
    assert!(
        reason.is_some(),
        "the reason names the fix: {:#?}",
        gateway.log()
    );
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
fn check_reports_errors_with_positions_and_exit_status() {
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

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[gateway]\nid = \"x\"\n[[rule]]\nname = \"r\"\nmatch = \"sensors/+/t\"\nabove = 5.0\nclear_below = 9.0\nfor = \"later\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.contains("bad.toml:7:15: error: inverted hysteresis band"),
        "{text}"
    );
    assert!(
        text.contains("bad.toml:8:7: error: `for` is not a duration"),
        "{text}"
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

//! The `watchpost` binary as an operator runs it: start, serve, stop on a signal; refuse to
//! start with a reason; check configurations.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_watchpost");

fn write_config(dir: &Path, broker: &str) -> std::path::PathBuf {
    let path = dir.join("watchpost.toml");
    let data = dir.join("data");
    std::fs::write(
        &path,
        format!("[gateway]\nid = \"cli\"\ndata_dir = {:?}\n[broker]\n{broker}\n[[rule]]\nname = \"hot\"\nmatch = \"sensors/+/t\"\nabove = 1.0\n", data.display().to_string()),
    )
    .unwrap();
    path
}

/// Starts `watchpost run` and returns it with a channel of its stderr lines.
fn spawn_run(config: &Path) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Waits for a line containing `needle`; returns it and everything read so far.
fn wait_line(
    lines: &mpsc::Receiver<String>,
    needle: &str,
    timeout: Duration,
) -> (Option<String>, Vec<String>) {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains(needle);
                seen.push(line.clone());
                if hit {
                    return (Some(line), seen);
                }
            }
            Err(_) => break,
        }
    }
    (None, seen)
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<(ExitStatus, Duration)> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(status) = child.try_wait().unwrap() {
            return Some((status, start.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = child.kill();
    None
}

fn signal(child: &Child, name: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(ok.success());
}

fn mqtt_addr(ready_line: &str) -> SocketAddr {
    let field = ready_line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("mqtt="))
        .expect("ready line names the MQTT address");
    field.parse().unwrap()
}

/// One MQTT CONNECT/CONNACK round trip with a real client.
fn mqtt_connects(addr: SocketAddr) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let opts = rumqttc::MqttOptions::new("cli-probe", addr.ip().to_string(), addr.port());
        let (_client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10);
        matches!(
            tokio::time::timeout(Duration::from_secs(5), eventloop.poll()).await,
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))))
        )
    })
}

#[test]
fn run_serves_and_stops_cleanly_within_two_seconds_on_sigterm_and_sigint() {
    for sig in ["TERM", "INT"] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(
            dir.path(),
            "listen = \"127.0.0.1:0\"\nallow_anonymous = true",
        );
        let (mut child, lines) = spawn_run(&config);
        let (ready, seen) = wait_line(&lines, "ready", Duration::from_secs(20));
        let ready = ready.unwrap_or_else(|| panic!("no ready line; stderr: {seen:#?}"));
        assert!(
            dir.path().join("data/watchpost.db").exists(),
            "data directory and database created"
        );
        assert!(mqtt_connects(mqtt_addr(&ready)), "the broker serves MQTT");

        signal(&child, sig);
        let (status, took) = wait_exit(&mut child, Duration::from_secs(5)).expect("exited");
        assert!(status.success(), "SIG{sig}: {status}");
        assert!(
            took < Duration::from_secs(2),
            "SIG{sig}: shutdown took {took:?}"
        );
        let (stopped, seen) = wait_line(&lines, "stopped", Duration::from_secs(1));
        assert!(stopped.is_some(), "{seen:#?}");
    }
}

#[test]
fn run_refuses_to_start_without_anonymous_access_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "listen = \"127.0.0.1:0\"\nallow_anonymous = false",
    );
    let (mut child, lines) = spawn_run(&config);
    let (status, _) = wait_exit(&mut child, Duration::from_secs(10)).expect("exits by itself");
    assert_eq!(status.code(), Some(1));
    let (line, seen) = wait_line(&lines, "allow_anonymous = true", Duration::from_secs(1));
    assert!(line.is_some(), "the reason names the fix: {seen:#?}");
}

#[test]
fn run_reports_a_taken_port() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!("listen = \"127.0.0.1:{port}\"\nallow_anonymous = true"),
    );
    let (mut child, lines) = spawn_run(&config);
    let (status, _) = wait_exit(&mut child, Duration::from_secs(10)).expect("exits by itself");
    assert_eq!(status.code(), Some(1));
    let (line, seen) = wait_line(
        &lines,
        &format!("cannot listen on 127.0.0.1:{port}"),
        Duration::from_secs(1),
    );
    assert!(line.is_some(), "{seen:#?}");
}

#[test]
fn check_reports_errors_with_positions_and_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(dir.path(), "allow_anonymous = true");
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
    std::fs::write(&bad, "[gateway]\nid = \"x\"\n[[rule]]\nname = \"r\"\nmatch = \"sensors/+/t\"\nabove = 5.0\nclear_below = 9.0\nfor = \"later\"\n").unwrap();
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

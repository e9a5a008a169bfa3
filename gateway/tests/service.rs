//! The binary as systemd runs it: readiness and watchdog over NOTIFY_SOCKET, and
//! `watchpost status` against the running gateway.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use watchpost_e2e::GatewayProcess;

const BIN: &str = env!("CARGO_BIN_EXE_watchpost");

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("watchpost.toml");
    let data = dir.join("data").display().to_string();
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"svc\"\ndata_dir = {data:?}\n[broker]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = true\n\
             [http]\nlisten = \"127.0.0.1:0\"\n{extra}\n[[rule]]\nname = \"hot\"\nmatch = \"sensors/+/t\"\nabove = 1.0\n"
        ),
    )
    .unwrap();
    path
}

/// Waits for the next datagram on `socket`.
fn next_message(socket: &UnixDatagram, timeout: Duration) -> Option<String> {
    socket.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 4096];
    socket
        .recv(&mut buf)
        .ok()
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn ready_is_sent_once_the_listener_accepts_and_watchdog_pings_follow() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let mut gateway = GatewayProcess::spawn_with_env(
        BIN,
        &config,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );

    let first = next_message(&socket, Duration::from_secs(20)).expect("a notification");
    assert!(
        first.lines().any(|l| l == "READY=1"),
        "the first notification is READY=1: {first:?}"
    );
    // At READY=1 the MQTT listener already accepts connections.
    let addr = gateway.wait_ready(Duration::from_secs(5));
    assert!(
        std::net::TcpStream::connect(addr).is_ok(),
        "the listener accepts at READY=1"
    );

    let start = Instant::now();
    let mut pings = 0;
    while pings < 3 && start.elapsed() < Duration::from_secs(10) {
        if let Some(m) = next_message(&socket, Duration::from_secs(2)) {
            pings += m.lines().filter(|l| *l == "WATCHDOG=1").count();
        }
    }
    assert!(
        pings >= 3,
        "watchdog pings every half period (0.2 s): {pings} in {:?}",
        start.elapsed()
    );

    gateway.signal(libc::SIGTERM);
    let mut stopping = false;
    while let Some(m) = next_message(&socket, Duration::from_secs(3)) {
        if m.lines().any(|l| l == "STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 on the way out");
    gateway.wait_exit(Duration::from_secs(5)).expect("stops");
}

fn status(config: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["status", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// The HTTP address a running gateway logged at start.
fn http_port(gateway: &mut GatewayProcess) -> u16 {
    let line = gateway
        .wait_line("ready", Duration::from_secs(20))
        .expect("ready line");
    let http = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .expect("http address in the ready line");
    http.parse::<std::net::SocketAddr>().unwrap().port()
}

#[test]
fn status_summarises_the_running_gateway_and_says_when_the_uplink_is_down() {
    let dir = tempfile::tempdir().unwrap();
    // An upstream with nothing behind it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = write_config(
        dir.path(),
        &format!("[uplink]\nurl = \"mqtt://127.0.0.1:{dead}\"\nkeep_alive = \"1s\"\n"),
    );
    let mut gateway = GatewayProcess::spawn(BIN, &config);
    let port = http_port(&mut gateway);
    // `status` reads the address from the configuration: point it at the port actually bound.
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        "[http]\nlisten = \"127.0.0.1:0\"",
        &format!("[http]\nlisten = \"127.0.0.1:{port}\""),
        1,
    );
    let status_config = dir.path().join("status.toml");
    std::fs::write(&status_config, text).unwrap();

    let (ok, out) = status(&status_config);
    assert!(ok, "{out}");
    assert!(
        out.starts_with("watchpost ") && out.contains("on svc, up"),
        "{out}"
    );
    assert!(
        out.contains(&format!("uplink:   DOWN: mqtt://127.0.0.1:{dead}")),
        "{out}"
    );
    assert!(out.contains("outbox:   0 waiting"), "{out}");
    assert!(
        out.contains("devices:  0 online, 0 offline, 0 stale"),
        "{out}"
    );
    assert!(out.contains("reload:   none since start"), "{out}");
    let (ok, json) = {
        let out = Command::new(BIN)
            .args(["status", "--json", "--config"])
            .arg(&status_config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert!(ok);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["uplink_connected"], false);
    // `status --check`, what keepalived's vrrp_script runs: serving locally with the upstream
    // down is still serving.
    let check = |config: &Path| {
        let out = Command::new(BIN)
            .args(["status", "--check", "--config"])
            .arg(config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = check(&status_config);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("degraded: serving locally"), "{out}");

    gateway.signal(libc::SIGTERM);
    gateway.wait_exit(Duration::from_secs(5)).expect("stops");
    let (ok, out) = status(&status_config);
    assert!(!ok && out.contains("no gateway answers"), "{out}");
    let (code, out) = check(&status_config);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.starts_with("no gateway answers"), "{out}");
}

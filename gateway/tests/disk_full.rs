//! A full disk: the real `watchpost` process with its data directory on a small tmpfs, which
//! the test fills until writes fail. Readings keep being judged and acknowledged, a critical
//! alert raised meanwhile reaches the upstream, `/readyz` and `/metrics` say what is shed, and
//! once space is freed history is written again without a restart. Afterwards the database
//! passes `PRAGMA integrity_check` and holds every alert transition.
//!
//! Mounting needs root, as CI runs; as another user the test says so and does nothing.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rumqttc::QoS;
use watchpost::store::Reader;
use watchpost_e2e::{Collector, GatewayProcess, Mosquitto, OVERHEAT, Publisher, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_watchpost");
const DEADLINE: Duration = Duration::from_secs(20);

/// A tmpfs of `size` mounted on a temporary directory; unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(status.success(), "mount -t tmpfs failed: {status}");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes 256 KiB blocks to `path` until the file system refuses one; returns the bytes
/// written.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0x5a_u8; 256 * 1024];
    let mut written = 0;
    loop {
        match file.write(&block) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    let _ = file.sync_all();
    written
}

/// `GET path` on the gateway's HTTP endpoint: (status line, body).
fn get(http: SocketAddr, path: &str) -> (String, String) {
    let mut stream = TcpStream::connect(http).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (
        head.lines().next().unwrap_or_default().to_owned(),
        body.to_owned(),
    )
}

/// One reading from each of 20 rooms, QoS 1; returns once all are acknowledged.
async fn readings(sensors: &Publisher, sent: &mut u64, round: u32) {
    for d in 0..20 {
        // The hundredths say the round: rows in the database are told apart by it.
        let value = format!("{}.{:02}", 20 + (round % 7) + d % 3, round % 100);
        sensors
            .publish(
                &format!("sensors/room-{d}/temperature"),
                QoS::AtLeastOnce,
                value,
            )
            .await
            .unwrap();
    }
    *sent += 20;
    sensors.wait_acked(*sent, DEADLINE).await.unwrap();
}

fn write_config(dir: &Path, data: &Path, upstream: u16) -> PathBuf {
    let path = dir.join("watchpost.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"site-full\"\ndata_dir = {:?}\n\
             [broker]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = true\n[http]\nlisten = \"127.0.0.1:0\"\n\
             [uplink]\nurl = \"mqtt://127.0.0.1:{upstream}\"\n\
             [history]\nwindow = \"1s\"\nraw_retention = \"1h\"\n{OVERHEAT}",
            data.display().to_string()
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_directory_sheds_history_and_still_delivers_alerts() {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting the small file system needs root (CI runs as root)");
        return;
    }
    let upstream = Mosquitto::start().unwrap();
    let alerts = Collector::subscribe(upstream.addr(), "site-full/alerts/#")
        .await
        .unwrap();
    let disk = Tmpfs::mount("40m");
    let data = disk.path().join("data");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &data, upstream.port());
    let mut gateway = GatewayProcess::spawn(BIN, &config);
    let mqtt = gateway.wait_ready(DEADLINE);
    let ready = gateway.wait_line("ready", DEADLINE).unwrap();
    let http: SocketAddr = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .expect("the ready line names the HTTP address")
        .parse()
        .unwrap();
    assert!(
        data.join("watchpost.reserve").exists(),
        "the reserve is set aside"
    );

    let sensors = Publisher::connect(mqtt, "fleet").await.unwrap();
    let mut sent = 0;
    for round in 0..5 {
        readings(&sensors, &mut sent, round).await;
    }

    // The disk fills up (another program's logs, say).
    let filler = disk.path().join("filler");
    let filled = fill(&filler);
    assert!(filled > 0);
    // Readings are still acknowledged and judged while history cannot be written.
    for round in 5..40 {
        readings(&sensors, &mut sent, round).await;
    }
    let boiler = Publisher::connect(mqtt, "boiler-1").await.unwrap();
    boiler
        .publish("sensors/boiler-1/temperature", QoS::AtLeastOnce, "95")
        .await
        .unwrap();
    boiler.wait_acked(1, DEADLINE).await.unwrap();
    let raised = alerts
        .wait_for(1, DEADLINE)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\ngateway:\n{}", gateway.log().join("\n")));
    assert_eq!(raised[0].json()["state"], "raised");
    let (status, body) = get(http, "/readyz");
    assert!(status.contains("200"), "{status}");
    assert!(
        body.starts_with("degraded: the data directory's file system is full"),
        "{body}\ngateway:\n{}",
        gateway.log().join("\n")
    );
    let (_, metrics) = get(http, "/metrics");
    assert!(metrics.contains("\nwatchpost_disk_full 1\n"), "{metrics}");
    let shed_line = metrics
        .lines()
        .find(|l| l.starts_with("watchpost_history_shed_total "))
        .unwrap();
    assert!(!shed_line.ends_with(" 0"), "{shed_line}");
    assert!(gateway.wait_line("file system is full", DEADLINE).is_some());

    // Space comes back: history resumes without a restart.
    std::fs::remove_file(&filler).unwrap();
    let back = wait_until(DEADLINE, || get(http, "/readyz").1 == "ready\n").await;
    assert!(back, "still degraded: {}", get(http, "/readyz").1);

    for round in 40..45 {
        readings(&sensors, &mut sent, round).await;
    }
    boiler
        .publish("sensors/boiler-1/temperature", QoS::AtLeastOnce, "70")
        .await
        .unwrap();
    boiler.wait_acked(2, DEADLINE).await.unwrap();
    let both = alerts.wait_for(2, DEADLINE).await.unwrap();
    assert_eq!(both[1].json()["state"], "cleared");
    assert_eq!(both[0].json()["id"], both[1].json()["id"]);

    gateway.signal(libc::SIGTERM);
    gateway.wait_exit(DEADLINE).expect("the gateway stops");
    let reader = Reader::open(&data).unwrap();
    // Every reading of the rounds after the space came back, each once (told by the round in
    // its value: stamps alone cannot separate them from the rounds just before, which the
    // store may still write once there is room).
    let mut after: Vec<(String, i64)> = reader
        .raw_readings(0)
        .unwrap()
        .into_iter()
        .filter(|r| r.device.starts_with("room-"))
        .filter_map(|r| match r.value {
            watchpost::value::Value::Number(n) => {
                Some((r.device, (n * 100.0).round() as i64 % 100))
            }
            _ => None,
        })
        .filter(|(_, round)| (40..45).contains(round))
        .collect();
    after.sort();
    let expected: Vec<(String, i64)> = {
        let mut e: Vec<_> = (0..20)
            .flat_map(|d| (40..45).map(move |round| (format!("room-{d}"), round)))
            .collect();
        e.sort();
        e
    };
    assert_eq!(
        after, expected,
        "history is written again after space came back: every reading of the 5 rounds, once"
    );
    let transitions = reader.alerts(0).unwrap();
    assert_eq!(
        transitions
            .iter()
            .map(|a| a.state.as_str())
            .collect::<Vec<_>>(),
        ["raised", "cleared"],
        "every alert transition is in the database"
    );
    assert_eq!(reader.outbox().unwrap().0, 0, "the outbox is empty");
    let check: String = rusqlite::Connection::open(data.join("watchpost.db"))
        .unwrap()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

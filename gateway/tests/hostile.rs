//! A hostile neighbourhood: while random bytes, truncated packets, oversized payloads, ten
//! thousand topics from one device, invalid UTF-8 topic names and a thousand connections
//! that open and drop hit the real `watchpost` binary, a well-behaved device's over-threshold
//! readings still raise their alert every time. The gateway's peak memory is reported.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::QoS;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use watchpost::access::{Credentials, Role};
use watchpost_e2e::GatewayProcess;
use watchpost_e2e::clients::{self, Seen, Watched};

const BIN: &str = env!("CARGO_BIN_EXE_watchpost");

/// `VmHWM` (peak resident memory) or another `/proc/PID/status` field, in KiB.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn get_metrics(http: SocketAddr) -> String {
    let mut stream = TcpStream::connect(http).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut out)
        .await
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn write_config(dir: &Path) -> (std::path::PathBuf, [String; 3]) {
    let creds = dir.join("credentials.toml");
    let mut c = Credentials::default();
    let secrets = [
        c.add("good", Role::Device).unwrap(),
        c.add("evil", Role::Device).unwrap(),
        c.add("ops", Role::Operator).unwrap(),
    ];
    c.save(&creds).unwrap();
    let path = dir.join("watchpost.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"hostile\"\ndata_dir = {:?}\n[broker]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = false\ncredentials = {:?}\nmax_payload_bytes = 256\nmax_connections = 256\n[http]\nlisten = \"127.0.0.1:0\"\n[[rule]]\nname = \"overheat\"\nmatch = \"sensors/+/temperature\"\nabove = 90.0\nclear_below = 85.0\nseverity = \"critical\"\n",
            dir.join("data").display().to_string(),
            creds.display().to_string()
        ),
    )
    .unwrap();
    (path, secrets)
}

/// Everything hostile, at once, until done. Returns what it did, for the report.
async fn storm(addr: SocketAddr, evil_secret: String) -> Vec<(&'static str, u64)> {
    let evil = Some(("evil", evil_secret.as_str()));
    let mut tasks = tokio::task::JoinSet::new();

    // Random bytes, with and without a valid CONNECT first.
    let connect = clients::connect_packet("evil@noise", evil);
    tasks.spawn(async move {
        for i in 0..200u32 {
            let Ok(mut s) = TcpStream::connect(addr).await else {
                continue;
            };
            if i % 2 == 0 {
                let _ = s.write_all(&connect).await;
            }
            let noise: Vec<u8> = (0..4096).map(|_| fastrand::u8(..)).collect();
            let _ = s.write_all(&noise).await;
        }
        ("connections sending 4 KiB of random bytes", 200)
    });

    // Truncated packets: a header that promises more than ever comes, left hanging.
    let connect = clients::connect_packet("evil@cut", evil);
    tasks.spawn(async move {
        let mut held = Vec::new();
        for i in 0..100u32 {
            let Ok(mut s) = TcpStream::connect(addr).await else {
                continue;
            };
            let packet = if i % 2 == 0 {
                connect[..connect.len() / 2].to_vec()
            } else {
                let mut p = connect.clone();
                let publish = clients::publish_packet(b"sensors/evil/temperature", &[b'9'; 200]);
                p.extend_from_slice(&publish[..20]);
                p
            };
            let _ = s.write_all(&packet).await;
            held.push(s);
        }
        // Held open past the CONNECT timeout, then dropped.
        tokio::time::sleep(Duration::from_secs(6)).await;
        drop(held);
        ("connections with truncated packets, held open 6 s", 100)
    });

    // Payloads over the limit: over max_payload_bytes (decoded as malformed) and over the
    // largest packet the broker reads (the connection is closed).
    let options = clients::options(addr, "evil@big", evil);
    tasks.spawn(async move {
        let mut sent = 0;
        for round in 0..20 {
            let Ok(c) = Watched::connect(options.clone()).await else {
                continue;
            };
            for _ in 0..10 {
                let _ = c
                    .client
                    .publish(
                        "sensors/evil/temperature",
                        QoS::AtMostOnce,
                        false,
                        vec![b'1'; 1000],
                    )
                    .await;
                sent += 1;
            }
            let huge = vec![b'1'; 512 * 1024 + round];
            let _ = c
                .client
                .publish("sensors/evil/temperature", QoS::AtMostOnce, false, huge)
                .await;
            sent += 1;
            let _ = c
                .wait_for(Duration::from_secs(2), |s| matches!(s, Seen::Error(_)))
                .await;
        }
        (
            "publishes over the payload limit (1 in 11 over the packet limit)",
            sent,
        )
    });

    // Ten thousand distinct topics from one device.
    let options = clients::options(addr, "evil@topics", evil);
    tasks.spawn(async move {
        let c = Watched::connect(options).await.unwrap();
        for i in 0..10_000 {
            let topic = format!("sensors/evil/metric-{i}");
            c.client
                .publish(topic, QoS::AtMostOnce, false, "1")
                .await
                .unwrap();
        }
        // Let the client's queue drain before it is dropped.
        let _ = c
            .client
            .publish("sensors/evil/done", QoS::AtLeastOnce, false, "1")
            .await;
        let _ = c
            .wait_for(Duration::from_secs(10), |s| matches!(s, Seen::PubAck(_)))
            .await;
        ("publishes on distinct topics from one device", 10_000)
    });

    // Invalid UTF-8 topic names, after a valid CONNECT.
    let connect = clients::connect_packet("evil@utf8", evil);
    tasks.spawn(async move {
        for _ in 0..100 {
            let Ok(mut s) = TcpStream::connect(addr).await else {
                continue;
            };
            let _ = s.write_all(&connect).await;
            let _ = s
                .write_all(&clients::publish_packet(
                    b"sensors/\xff\xfe/temperature",
                    b"99",
                ))
                .await;
        }
        ("publishes with invalid UTF-8 topics", 100)
    });

    // A thousand connections opened and dropped.
    tasks.spawn(async move {
        for _ in 0..1000 {
            if let Ok(s) = TcpStream::connect(addr).await {
                drop(s);
            }
        }
        ("connections opened and dropped", 1000)
    });

    let mut done = Vec::new();
    while let Some(r) = tasks.join_next().await {
        done.push(r.unwrap());
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_well_behaved_device_is_heard_through_a_hostile_storm() {
    let dir = tempfile::tempdir().unwrap();
    let (config, [good_secret, evil_secret, ops_secret]) = write_config(dir.path());
    let mut gateway = GatewayProcess::spawn(BIN, &config);
    let addr = gateway.wait_ready(Duration::from_secs(20));
    let ready = gateway.wait_line("ready", Duration::from_secs(1)).unwrap();
    let http: SocketAddr = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .unwrap()
        .parse()
        .unwrap();
    let pid = gateway.pid();
    let idle_kib = proc_status_kib(pid, "VmRSS:");

    let ops = Watched::subscribed(
        clients::options(addr, "ops", Some(("ops", &ops_secret))),
        "alerts/#",
    )
    .await
    .unwrap();
    let good = Watched::connect(clients::options(addr, "good", Some(("good", &good_secret))))
        .await
        .unwrap();

    let storm = tokio::spawn(storm(addr, evil_secret));
    // Raise and clear the good device's alert, round after round, until the storm is over.
    let alerts = |state: &str| {
        ops.seen()
            .iter()
            .filter(|s| matches!(s, Seen::Publish(t, p) if t == "alerts/critical/good/overheat" && String::from_utf8_lossy(p).contains(state)))
            .count()
    };
    let mut rounds = 0;
    let mut slowest = Duration::ZERO;
    let mut peak_kib = 0;
    while !storm.is_finished() || rounds < 3 {
        for (value, state) in [("95", "\"raised\""), ("70", "\"cleared\"")] {
            let before = alerts(state);
            let sent = Instant::now();
            good.client
                .publish("sensors/good/temperature", QoS::AtLeastOnce, false, value)
                .await
                .unwrap();
            let heard =
                watchpost_e2e::wait_until(Duration::from_secs(10), || alerts(state) > before).await;
            assert!(
                heard,
                "round {rounds}: the good device's {state} alert did not come within 10 s; log: {:#?}",
                gateway.log()
            );
            slowest = slowest.max(sent.elapsed());
        }
        rounds += 1;
        peak_kib = peak_kib.max(proc_status_kib(pid, "VmRSS:"));
    }
    let done = storm.await.unwrap();

    let metrics = get_metrics(http).await;
    let hwm_kib = proc_status_kib(pid, "VmHWM:");
    eprintln!("hostile storm:");
    for (what, n) in &done {
        eprintln!("  {n:>6} {what}");
    }
    eprintln!(
        "good device: {rounds} raise/clear rounds, slowest alert {slowest:?}\nmemory: {idle_kib} KiB resident before, peak sampled {peak_kib} KiB, VmHWM {hwm_kib} KiB"
    );
    for name in [
        "watchpost_protocol_errors_total",
        "watchpost_decode_errors_total",
        "watchpost_rate_limited_total",
        "watchpost_auth_failures_total",
        "watchpost_connections ",
    ] {
        eprintln!("  {name} {}", metric(&metrics, name));
    }
    assert!(
        metric(&metrics, "watchpost_protocol_errors_total") >= 100,
        "random bytes and bad topics close connections: {metrics}"
    );
    assert!(
        metric(&metrics, "watchpost_decode_errors_total") > 0,
        "oversized payloads and the metric limit are counted: {metrics}"
    );
    assert!(
        metric(&metrics, "watchpost_rate_limited_total{client=\"evil\"}") > 0,
        "the topic flood met the rate limit: {metrics}"
    );
    assert_eq!(
        metric(&metrics, "watchpost_rate_limited_total{client=\"good\"}"),
        0
    );
    // Every hostile connection is gone again.
    let mut open = 0;
    let closed = watchpost_e2e::wait_until(Duration::from_secs(10), || {
        open = proc_fd_sockets(pid);
        open <= 10
    })
    .await;
    assert!(closed, "{open} sockets still open");
    assert!(
        gateway.log().iter().all(|l| !l.contains("panicked")),
        "{:#?}",
        gateway.log()
    );
}

/// Sockets the process holds.
fn proc_fd_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

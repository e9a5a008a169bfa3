//! The virtual address of deploy/keepalived.conf moves from a killed gateway to its peer (issue
//! 22). Two network namespaces joined by a veth pair stand for the two boxes of a site, each with
//! its interface named `eth0` as in the shipped file; each runs the real `watchpost` binary and a
//! real keepalived with deploy/keepalived.conf, of which only the lines the file marks as per-box
//! (this box, the other box, the address) and the two paths of the check are changed. The
//! timings are the shipped ones, so the takeover measured here is what a site gets.
//!
//! A takes the address first; B joins as the backup. A's gateway gets SIGKILL, and the test
//! measures how long until B holds the address and until an MQTT client connecting to the
//! address gets a CONNACK (from A's namespace, so over the veth to B).
//!
//! Everything is bound inside the namespaces; nothing touches the host's network. Needs root,
//! iproute2 (`ip netns`) and keepalived, as CI has; otherwise the test says so and does nothing.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use watchpost_e2e::OVERHEAT;

const BIN: &str = env!("CARGO_BIN_EXE_watchpost");
const SHIPPED: &str = include_str!("../../deploy/keepalived.conf");
/// The site network between the two namespaces, and the address that moves.
const ADDRESSES: [&str; 2] = ["10.77.0.1", "10.77.0.2"];
const VIP: &str = "10.77.0.100";
const DEADLINE: Duration = Duration::from_secs(15);

/// `name` on PATH, or in the directories root's PATH usually has.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn quiet(command: &mut Command) -> bool {
    command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `ip args…` (`program` is iproute2's `ip`) and fails the test with its output if it fails.
fn ip(program: &Path, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes; returns whether it held.
fn wait_for(timeout: Duration, condition: impl FnMut() -> bool) -> bool {
    wait_every(Duration::from_millis(10), timeout, condition)
}

use watchpost_e2e::wait_until_blocking as wait_every;

/// One box: a network namespace, and the gateway and keepalived running in it.
struct Node {
    ns: String,
    addr: &'static str,
    dir: PathBuf,
    gateway: Option<Child>,
    keepalived: Option<Child>,
}

impl Node {
    fn log(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    /// Starts `program args…` inside the namespace with stdout and stderr in `log`. The child
    /// gets `death` if the thread that started it ends without stopping it (a killed test).
    fn spawn(&self, ip: &Path, program: &Path, args: &[&str], log: &str, death: i32) -> Child {
        let log = File::create(self.dir.join(log)).unwrap();
        let mut command = Command::new(ip);
        command
            .args(["netns", "exec", &self.ns])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl(2) is async-signal-safe and touches nothing of the parent's. `ip netns
        // exec` execs the program in place, so the setting reaches it.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, death as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command.spawn().expect("ip netns exec starts")
    }

    /// Asks keepalived to stop (SIGTERM): it stops its VRRP child, which lets the address go.
    fn signal_keepalived(&self) {
        if let Some(child) = &self.keepalived {
            // SAFETY: kill(2) on our own child, which has not been reaped yet.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
    }

    /// Waits for keepalived to stop after [`Node::signal_keepalived`]; SIGKILL, to it and to
    /// its VRRP child, if it has not within the deadline.
    fn reap_keepalived(&mut self) {
        let Some(mut child) = self.keepalived.take() else {
            return;
        };
        let stopped = wait_for(Duration::from_secs(5), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !stopped {
            let _ = child.kill();
            let _ = child.wait();
            if let Ok(pid) = std::fs::read_to_string(self.dir.join("vrrp.pid")) {
                if let Ok(pid) = pid.trim().parse::<libc::pid_t>() {
                    // SAFETY: kill(2) has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }

    fn kill_gateway(&mut self) {
        if let Some(mut child) = self.gateway.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Two namespaces joined by a veth pair, and what runs in them; all of it stopped and removed
/// on drop, also when the test panics.
struct Site {
    ip: PathBuf,
    /// Sub-second clock at creation: the namespaces' suffix, and the test's randomness.
    nanos: u32,
    nodes: [Node; 2],
    _dir: tempfile::TempDir,
}

impl Site {
    fn create(ip_path: PathBuf) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let suffix = format!("{}-{nanos:x}", std::process::id());
        let nodes = [("a", ADDRESSES[0]), ("b", ADDRESSES[1])].map(|(name, addr)| {
            let node_dir = dir.path().join(name);
            std::fs::create_dir(&node_dir).unwrap();
            Node {
                ns: format!("wp-vip-{name}-{suffix}"),
                addr,
                dir: node_dir,
                gateway: None,
                keepalived: None,
            }
        });
        let mut site = Site {
            ip: ip_path,
            nanos,
            nodes,
            _dir: dir,
        };
        // From here on, drop removes whatever was made.
        let [a, b] = [&site.nodes[0].ns, &site.nodes[1].ns];
        ip(&site.ip, &["netns", "add", a]);
        ip(&site.ip, &["netns", "add", b]);
        let veth = ["link", "add", "name", "eth0", "netns", a, "type", "veth"];
        let peer = ["peer", "name", "eth0", "netns", b];
        ip(&site.ip, &[&veth[..], &peer[..]].concat());
        for node in &mut site.nodes {
            let addr = format!("{}/24", node.addr);
            ip(&site.ip, &["-n", &node.ns, "link", "set", "lo", "up"]);
            ip(
                &site.ip,
                &["-n", &node.ns, "addr", "add", &addr, "dev", "eth0"],
            );
            ip(&site.ip, &["-n", &node.ns, "link", "set", "eth0", "up"]);
        }
        site
    }

    /// Whether node `i` has the virtual address on its interface.
    fn holds(&self, i: usize) -> bool {
        let out = ip(
            &self.ip,
            &[
                "-n",
                &self.nodes[i].ns,
                "-o",
                "-4",
                "addr",
                "show",
                "dev",
                "eth0",
            ],
        );
        out.contains(&format!(" {VIP}/24 "))
    }

    /// Every log, for a failure message.
    fn logs(&self) -> String {
        let mut all = String::new();
        for node in &self.nodes {
            for file in ["gateway.log", "keepalived.log"] {
                all += &format!("--- {} {file}\n{}\n", node.ns, node.log(file));
            }
        }
        all
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        // Both at once: each takes about a second to stop.
        for node in &self.nodes {
            node.signal_keepalived();
        }
        for node in &mut self.nodes {
            node.reap_keepalived();
            node.kill_gateway();
        }
        for node in &self.nodes {
            // Deleting either namespace also removes the veth pair.
            let _ = quiet(Command::new(&self.ip).args(["netns", "delete", &node.ns]));
        }
    }
}

/// deploy/keepalived.conf for one box: this box's address, the other box's, the test's virtual
/// address, the gateway just built and this box's configuration in the check. Everything else,
/// timings included, is the shipped file.
fn keepalived_conf(me: &str, peer: &str, gateway_config: &Path) -> String {
    let config = gateway_config.display().to_string();
    // (first word of the line, what to replace in it, by what)
    let edits = [
        ("script", "/usr/bin/watchpost", BIN),
        ("script", "/etc/watchpost/watchpost.toml", &config),
        ("unicast_src_ip", "192.0.2.11", me),
        ("192.0.2.12", "192.0.2.12", peer), // the one line of unicast_peer { }
        ("192.0.2.10/24", "192.0.2.10", VIP),
    ];
    let mut done = [0; 5];
    let mut out = String::new();
    for line in SHIPPED.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        let mut line = line.to_owned();
        for (i, (word, from, to)) in edits.iter().enumerate() {
            if first == *word && line.contains(from) {
                line = line.replacen(from, to, 1);
                done[i] += 1;
            }
        }
        out += &line;
        out.push('\n');
    }
    assert_eq!(
        done, [1; 5],
        "deploy/keepalived.conf no longer has the per-box lines this test fills in \
         (script, unicast_src_ip, the peer, the address, the configuration path)"
    );
    out
}

fn gateway_config(node: &Node, id: &str) -> PathBuf {
    let path = node.dir.join("watchpost.toml");
    // MQTT on every interface, as deploy/watchpost.toml has it, so that the gateway answers on
    // the virtual address whenever it arrives; HTTP (what `status --check` asks) on its default,
    // the namespace's own loopback.
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"{id}\"\ndata_dir = {:?}\n\
             [broker]\nlisten = \"0.0.0.0:1883\"\nallow_anonymous = true\n{OVERHEAT}",
            node.dir.join("data").display().to_string()
        ),
    )
    .unwrap();
    path
}

/// An MQTT 3.1.1 CONNECT to `addr`; whether a CONNACK accepting it came back.
fn connack(addr: SocketAddr, client_id: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(250)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut packet = vec![0x10, (12 + client_id.len()) as u8];
    packet.extend_from_slice(b"\x00\x04MQTT\x04\x02\x00\x3c");
    packet.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    packet.extend_from_slice(client_id.as_bytes());
    let mut ack = [0u8; 4];
    stream.write_all(&packet).is_ok()
        && stream.read_exact(&mut ack).is_ok()
        && ack == [0x20, 0x02, 0x00, 0x00]
}

/// Runs `f` on a thread of its own moved into network namespace `ns` (setns(2) moves only the
/// calling thread).
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns(2) on a descriptor that stays open for the call.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
}

/// Why this machine cannot run the test, if it cannot; else the paths of `ip` and keepalived.
fn prerequisites() -> Result<(PathBuf, PathBuf), &'static str> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("network namespaces and keepalived need root (CI runs as root)");
    }
    let ip = find_program("ip").filter(|ip| quiet(Command::new(ip).args(["netns", "list"])));
    let Some(ip) = ip else {
        return Err("`ip netns` is not available (apt-get install iproute2)");
    };
    let keepalived = find_program("keepalived").filter(|k| quiet(Command::new(k).arg("--version")));
    let Some(keepalived) = keepalived else {
        return Err("keepalived is not installed (apt-get install keepalived)");
    };
    Ok((ip, keepalived))
}

#[test]
fn the_virtual_address_moves_to_the_peer_when_the_gateway_holding_it_is_killed() {
    let (ip_path, keepalived) = match prerequisites() {
        Ok(found) => found,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let mut site = Site::create(ip_path);
    let ip_path = site.ip.clone();

    for (i, id) in [(0, "site-a"), (1, "site-b")] {
        let config = gateway_config(&site.nodes[i], id);
        let peer = site.nodes[1 - i].addr;
        let conf = keepalived_conf(site.nodes[i].addr, peer, &config);
        std::fs::write(site.nodes[i].dir.join("keepalived.conf"), conf).unwrap();
        let args = ["run", "--config", config.to_str().unwrap()];
        let child = site.nodes[i].spawn(
            &ip_path,
            Path::new(BIN),
            &args,
            "gateway.log",
            libc::SIGKILL,
        );
        site.nodes[i].gateway = Some(child);
    }
    for i in 0..2 {
        // What keepalived will ask, asked until it says the gateway serves.
        let node = &site.nodes[i];
        let config = node.dir.join("watchpost.toml");
        let serving = wait_for(DEADLINE, || {
            quiet(
                Command::new(&ip_path)
                    .args([
                        "netns", "exec", &node.ns, BIN, "status", "--check", "--config",
                    ])
                    .arg(&config),
            )
        });
        assert!(serving, "gateway {} never ready\n{}", node.ns, site.logs());
    }

    let start_keepalived = |node: &Node| {
        let dir = |file: &str| node.dir.join(file).display().to_string();
        #[rustfmt::skip]
        let args = [
            "--dont-fork", "--log-console", "--log-detail", "--no-syslog", "--vrrp",
            "--use-file", &dir("keepalived.conf"),
            "--pid", &dir("keepalived.pid"), "--vrrp_pid", &dir("vrrp.pid"),
            "--checkers_pid", &dir("checkers.pid"),
        ];
        node.spawn(
            &ip_path,
            &keepalived,
            &args,
            "keepalived.log",
            libc::SIGTERM,
        )
    };
    // A first: with nopreempt, the first box up takes the address and keeps it.
    site.nodes[0].keepalived = Some(start_keepalived(&site.nodes[0]));
    assert!(
        wait_for(DEADLINE, || site.holds(0)),
        "A never took {VIP}\n{}",
        site.logs()
    );
    site.nodes[1].keepalived = Some(start_keepalived(&site.nodes[1]));
    // B starts as backup and would take the address once it has heard no advert for 3
    // advert_int plus its skew (156/256 s). Still a backup well after that, it hears A. The kill
    // then comes at a point of A's 2 s check cycle that varies from run to run, so that the
    // figures printed below spread over what a site sees, not one point of it.
    let b_started = Instant::now();
    let master_down = Duration::from_millis(3_000 + 610 + 500);
    let phase = Duration::from_millis(u64::from(site.nanos) * 2_000 / 1_000_000_000);
    let mut b_took_it = false;
    let waited = wait_for(master_down + phase + DEADLINE, || {
        b_took_it = site.holds(1);
        b_took_it || b_started.elapsed() >= master_down + phase
    });
    assert!(
        waited && !b_took_it && site.holds(0),
        "A holds {VIP}, and B does not take it while A is there\n{}",
        site.logs()
    );
    assert!(
        site.nodes[1]
            .log("keepalived.log")
            .contains("Entering BACKUP STATE"),
        "B is the backup\n{}",
        site.logs()
    );
    let vip: SocketAddr = format!("{VIP}:1883").parse().unwrap();
    // From B's side of the link, the address leads to A's gateway.
    let before = in_netns(&site.nodes[1].ns, move || connack(vip, "vip-before"));
    assert!(
        before.join().unwrap(),
        "no CONNACK from A's gateway via {vip}\n{}",
        site.logs()
    );

    let killed = Instant::now();
    site.nodes[0].kill_gateway();
    // A device on A's side of the link (A's own namespace: once A lets go of the address, its
    // packets to the address go over the veth to B) connects again and again.
    let device = in_netns(&site.nodes[0].ns, move || {
        let served = wait_for(DEADLINE, || connack(vip, "vip-after"));
        served.then(|| killed.elapsed())
    });
    // B's own view: binding the address succeeds once it is on B's interface (polled in
    // process, every millisecond, to time the move more finely than `ip addr` could).
    let b_side = in_netns(&site.nodes[1].ns, move || {
        let held = wait_every(Duration::from_millis(1), DEADLINE, || {
            std::net::UdpSocket::bind((vip.ip(), 0)).is_ok()
        });
        held.then(|| killed.elapsed())
    });
    let moved = b_side.join().unwrap();
    let served = device.join().unwrap();
    let (Some(moved), Some(served)) = (moved, served) else {
        panic!(
            "after the kill: address on B {moved:?}, CONNACK via {vip} {served:?}\n{}",
            site.logs()
        );
    };
    assert!(
        site.holds(1) && !site.holds(0),
        "B, and only B, holds {VIP}\n{}",
        site.logs()
    );
    let a_log = site.nodes[0].log("keepalived.log");
    assert!(
        a_log.contains("VRRP_Script(chk_watchpost) failed") && a_log.contains("FAULT"),
        "A gave the address up because its check failed\n{}",
        site.logs()
    );
    // The check fails first up to 2 s after the kill (interval 2), the second failure (fall 2)
    // puts A in FAULT, and B takes over 156/256 of advert_int after A's priority-0 advert: about
    // 2.6 to 4.6 s, depending on where in A's check cycle the gateway dies.
    println!(
        "keepalived takeover with deploy/keepalived.conf's timings (check every 2 s, fall 2, \
         advert_int 1; expected 2.6 to 4.6 s): SIGKILL of A's gateway -> {VIP} on B in {:.3} s, \
         -> MQTT CONNACK via {VIP} in {:.3} s",
        moved.as_secs_f64(),
        served.as_secs_f64()
    );
}

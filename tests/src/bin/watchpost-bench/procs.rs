//! The processes a benchmark runs: the release `watchpost`, Mosquittos, the simulator and the
//! harness's own helper modes; reading their memory and CPU from `/proc`; and the gateway's
//! `/metrics`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Where the release binaries are: next to this harness's own executable.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `watchpost`.
    pub watchpost: PathBuf,
    /// `watchpost-sim`.
    pub sim: PathBuf,
    /// This harness, for its helper modes.
    pub bench: PathBuf,
}

impl Bins {
    /// Builds the gateway and the simulator in release mode with the cargo that runs this
    /// harness, into the same target directory, and names the binaries. The gateway is built
    /// on its own (`cargo build --release -p watchpost`), so that its dependencies have the
    /// features the gateway alone asks for, as in a release, not those the harness adds.
    pub fn build() -> Result<Bins> {
        let bench = std::env::current_exe().context("finding the harness's own executable")?;
        let dir = bench.parent().context("the harness has no directory")?;
        if dir.file_name().and_then(|n| n.to_str()) != Some("release") {
            bail!(
                "run the harness as a release build (cargo run --release -p watchpost-e2e --bin watchpost-bench), so that the figures are for release builds; it runs from {}",
                dir.display()
            );
        }
        let target = dir.parent().context("no target directory")?;
        eprintln!("building the release gateway and simulator ...");
        for package in ["watchpost", "watchpost-sim"] {
            cargo_build(package, target)?;
        }
        Ok(Bins {
            watchpost: dir.join("watchpost"),
            sim: dir.join("watchpost-sim"),
            bench,
        })
    }
}

/// `cargo build --release --locked -p package --target-dir target`, with the cargo that runs
/// this harness.
fn cargo_build(package: &str, target: &Path) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    // `cargo run` describes this package in the environment (CARGO_PKG_*, ...); build scripts
    // that watch such variables would otherwise rebuild what a plain `cargo build` built, and
    // the other way round.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if [
            "CARGO_PKG_",
            "CARGO_MANIFEST_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_",
        ]
        .iter()
        .any(|p| key.starts_with(p))
            || key == "OUT_DIR"
        {
            command.env_remove(key.as_ref());
        }
    }
    let status = command
        .args(["build", "--release", "--locked", "-p", package])
        .arg("--target-dir")
        .arg(target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p {package} failed ({status})");
    }
    Ok(())
}

/// A child process, killed on drop, whose stderr goes to a log file.
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    child: Child,
    log: PathBuf,
    /// Its stdout, if a reader was handed back after reading part of it.
    reader: Option<BufReader<ChildStdout>>,
}

impl Proc {
    /// Spawns `command` with stdout piped and stderr to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Result<Proc> {
        let stderr = std::fs::File::create(log)
            .with_context(|| format!("creating the log {}", log.display()))?;
        let child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            reader: None,
        })
    }

    /// Gives back its stdout, partly read, for [`Proc::wait_output`].
    pub fn give_stdout(&mut self, reader: BufReader<ChildStdout>) {
        self.reader = Some(reader);
    }

    /// Takes over a process started elsewhere, whose stderr goes to `log`.
    pub fn adopt(name: &str, child: Child, log: &Path) -> Proc {
        Proc {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            reader: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its stdout, once.
    pub fn stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Its stdin, once.
    pub fn stdin(&mut self) -> Option<ChildStdin> {
        self.child.stdin.take()
    }

    /// Fails if it has exited, with the end of its log.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early ({status}); end of its log:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Waits for it to exit by itself, at most `timeout`; returns its whole stdout.
    pub fn wait_output(&mut self, timeout: Duration) -> Result<String> {
        let mut out = String::new();
        let reader = self
            .reader
            .take()
            .or_else(|| self.child.stdout.take().map(BufReader::new));
        let (tx, rx) = mpsc::channel();
        if let Some(mut stdout) = reader {
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = stdout.read_to_string(&mut text);
                let _ = tx.send(text);
            });
        }
        let deadline = Instant::now() + timeout;
        loop {
            if self.child.try_wait()?.is_some() {
                if let Ok(text) = rx.recv_timeout(Duration::from_secs(5)) {
                    out = text;
                }
                return Ok(out);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not finish within {timeout:?}; end of its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops it with SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `watchpost`, with how long it took to say it was ready.
pub struct Gateway {
    /// The process.
    pub proc: Proc,
    /// Its MQTT 3.1.1 listener.
    pub mqtt: SocketAddr,
    /// Its HTTP endpoint.
    pub http: SocketAddr,
    /// From spawn to the ready line on stderr.
    pub startup: Duration,
}

impl Gateway {
    /// Starts `watchpost run --config config`, logging to `log`, and waits for its ready line.
    pub fn start(bin: &Path, config: &Path, log: &Path) -> Result<Gateway> {
        let mut logfile = std::fs::File::create(log)?;
        let spawned = Instant::now();
        let mut child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting watchpost")?;
        let stderr = child
            .stderr
            .take()
            .context("watchpost's stderr is not piped")?;
        let (tx, rx) = mpsc::channel();
        // The gateway must never block on its stderr: this thread reads it to the end.
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(logfile, "{line}");
                if !sent && line.contains(" ready") && line.contains("mqtt=") {
                    sent = tx.send((Instant::now(), line)).is_ok();
                }
            }
        });
        let proc = Proc {
            name: "watchpost".into(),
            child,
            log: log.to_owned(),
            reader: None,
        };
        let (at, line) = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| {
            anyhow::anyhow!(
                "watchpost did not log its ready line within 30 s; its log:\n{}",
                proc.log_tail()
            )
        })?;
        let field = |name: &str| -> Result<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .with_context(|| format!("the ready line names no {name}: {line}"))?
                .trim_matches('"')
                .parse()
                .with_context(|| format!("the ready line's {name} is no address: {line}"))
        };
        Ok(Gateway {
            mqtt: field("mqtt=")?,
            http: field("http=")?,
            startup: at - spawned,
            proc,
        })
    }

    /// Its `/metrics` now.
    pub fn metrics(&self) -> Result<Metrics> {
        Metrics::scrape(self.http)
    }

    /// Polls `/metrics` until `condition` holds, at most `timeout`.
    pub fn wait_metrics(
        &mut self,
        what: &str,
        timeout: Duration,
        condition: impl Fn(&Metrics) -> bool,
    ) -> Result<Metrics> {
        let deadline = Instant::now() + timeout;
        loop {
            self.proc.check_alive()?;
            let m = self.metrics()?;
            if condition(&m) {
                return Ok(m);
            }
            if Instant::now() >= deadline {
                bail!("{what}: not within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// One scrape of a Prometheus text endpoint: sample name with labels → value.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    samples: HashMap<String, f64>,
}

impl Metrics {
    /// GETs `/metrics` from `http`.
    pub fn scrape(http: SocketAddr) -> Result<Metrics> {
        let mut stream = TcpStream::connect_timeout(&http, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .context("no HTTP body from /metrics")?;
        let mut samples = HashMap::new();
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            if let Some((name, value)) = line.rsplit_once(' ') {
                if let Ok(v) = value.parse::<f64>() {
                    samples.insert(name.to_owned(), v);
                }
            }
        }
        Ok(Metrics { samples })
    }

    /// The sum of every sample of family `name` (all label sets).
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|(k, _)| {
                k.as_str() == name
                    || k.strip_prefix(name)
                        .is_some_and(|rest| rest.starts_with('{'))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Counters of readings or messages the gateway dropped and said so: every family whose
    /// name says `dropped` or `lost`, except the `seq` accounting of what devices lost before
    /// the gateway. Found by name, so that a counter added later is not missed.
    pub fn dropped(&self) -> Vec<(String, f64)> {
        let mut families: HashMap<&str, f64> = HashMap::new();
        for (sample, value) in &self.samples {
            let family = sample.split('{').next().unwrap_or(sample);
            let named = family.contains("dropped") || family.contains("lost");
            if named && !family.starts_with("watchpost_seq_") && family.ends_with("_total") {
                *families.entry(family).or_default() += value;
            }
        }
        let mut out: Vec<(String, f64)> = families
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// What [`Metrics::dropped`] counted since `earlier`, summed.
    pub fn dropped_since(&self, earlier: &Metrics) -> f64 {
        let before: HashMap<String, f64> = earlier.dropped().into_iter().collect();
        self.dropped()
            .iter()
            .map(|(k, v)| v - before.get(k).copied().unwrap_or(0.0))
            .sum()
    }

    /// One sample, by its exact name with labels, 0 if absent.
    pub fn get(&self, sample: &str) -> f64 {
        self.samples.get(sample).copied().unwrap_or(0.0)
    }
}

/// Resident memory now and at its peak, from `/proc/PID/status`, in KiB.
pub fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// CPU time used so far (user + system, all threads), from `/proc/PID/stat`, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name is in parentheses and may hold spaces: count fields after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are the 12th and 13th after the name.
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

/// CPU time the whole machine has spent busy so far (every core: all but idle and I/O wait),
/// from `/proc/stat`, in seconds.
pub fn machine_cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("an empty /proc/stat")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let total: u64 = ticks.iter().sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(total.saturating_sub(idle) as f64 / hz)
}

/// Memory and CPU of a process at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// When.
    pub at: Instant,
    /// CPU seconds so far.
    pub cpu: f64,
    /// VmRSS, KiB.
    pub rss_kib: u64,
    /// VmHWM, KiB.
    pub hwm_kib: u64,
}

impl Usage {
    /// Reads them now.
    pub fn of(pid: u32) -> Result<Usage> {
        let (rss_kib, hwm_kib) = memory_kib(pid)?;
        Ok(Usage {
            at: Instant::now(),
            cpu: cpu_seconds(pid)?,
            rss_kib,
            hwm_kib,
        })
    }

    /// Cores used on average between `earlier` and this.
    pub fn cores_since(&self, earlier: &Usage) -> f64 {
        let wall = (self.at - earlier.at).as_secs_f64();
        if wall > 0.0 {
            (self.cpu - earlier.cpu) / wall
        } else {
            0.0
        }
    }
}

/// Starts a helper mode of this harness (`watchpost-bench <args>`).
pub fn helper(bins: &Bins, name: &str, args: &[String], log: &Path) -> Result<Proc> {
    let mut command = Command::new(&bins.bench);
    command.args(args);
    Proc::spawn(name, command, log)
}

/// Reads `ready ...` from a helper's stdout (within `timeout`) and hands the reader back.
pub fn wait_ready(proc: &mut Proc, timeout: Duration) -> Result<(String, BufReader<ChildStdout>)> {
    let stdout = proc.stdout().context("stdout already taken")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let ok = reader.read_line(&mut line).is_ok();
        let _ = tx.send((ok, line, reader));
    });
    match rx.recv_timeout(timeout) {
        Ok((true, line, reader)) if line.starts_with("ready") => {
            Ok((line.trim().to_owned(), reader))
        }
        Ok((_, line, _)) => bail!(
            "{} did not start: {line:?}; its log:\n{}",
            proc.name,
            proc.log_tail()
        ),
        Err(_) => bail!(
            "{} was not ready within {timeout:?}; its log:\n{}",
            proc.name,
            proc.log_tail()
        ),
    }
}

//! The fleet simulator: many Watchpost sensor nodes in one process, each running the firmware's
//! own [`Node`] (report by exception, `seq`, ring, MQTT session) over a TCP socket instead of a
//! UART, fed by a signal model instead of a sensor.
//!
//! What differs from a board is only what a board supplies: the clock ([`Instant`]), the sensor
//! ([`Signal`]: noise, drift, rare excursions; optionally a third metric, pressure), optionally a
//! leak probe on a bouncing pin ([`LeakProbe`], read through the firmware's own
//! [`Input`]) and the link ([`TcpLink`], over the firmware's list of [`Gateways`]). Devices are shared out over a few threads that poll their nodes; [`run`]
//! returns a [`Report`] of what was sampled, queued, sent and acknowledged, which benchmarks
//! read.

use std::convert::Infallible;
use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;
use watchpost_firmware::gateways::Gateways;
use watchpost_firmware::input::Input;
use watchpost_firmware::mqtt::{Event, Link};
use watchpost_firmware::node::{Config, Counters, Node};
use watchpost_firmware::payload::State;
use watchpost_firmware::report::Deadband;
use watchpost_firmware::sensor::CLIMATE;

/// Ring depth of every simulated node, as on the boards.
pub const RING: usize = 64;

/// Metric names of three-metric devices: the climate sensor's two and `pressure` (hPa).
pub const CLIMATE_PRESSURE: [&str; 3] = [CLIMATE[0], CLIMATE[1], "pressure"];

/// Excursion length, in samples, when nothing else is asked for.
pub const EXCURSION_SAMPLES: (u32, u32) = (5, 20);

/// The leak probe's metric, as the shipped rule `water-leak` expects (`sensors/+/water_leak`).
pub const LEAK: &str = "water_leak";

/// How long a leak probe's pin bounces after the probe gets wet or dry, in ms.
pub const PROBE_BOUNCE_MS: u64 = 8;

/// Debounce time of the simulated probe's input, in ms (longer than its bounce).
pub const PROBE_SETTLE_MS: u64 = 20;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Options {
    /// The gateways' MQTT listeners, in the order a device tries them: the first, then the
    /// next after a failed connect or a lost session.
    pub gateways: Vec<SocketAddr>,
    /// Number of devices.
    pub devices: usize,
    /// Samples per second per device.
    pub rate: f64,
    /// Probability, per sample, that a device starts an excursion (a value far outside its
    /// normal range for [`Options::excursion`] samples).
    pub anomaly: f64,
    /// Shortest and longest excursion, in samples (inclusive).
    pub excursion: (u32, u32),
    /// Metrics per device: 1 (temperature), 2 (and humidity, as the climate sensor) or 3 (and
    /// pressure).
    pub metrics: usize,
    /// How long to sample.
    pub duration: Duration,
    /// After sampling stops, how long to wait at most for queued messages to be acknowledged.
    pub drain: Duration,
    /// Device ids are `{prefix}{index}`.
    pub prefix: String,
    /// Threads that poll the nodes.
    pub threads: usize,
    /// Seed of every random choice, so runs can be repeated.
    pub seed: u64,
    /// Report-by-exception rule for temperature, humidity and pressure (thousandths, ms), as far
    /// as [`Options::metrics`] goes. A `delta` of 0 reports every sample.
    pub deadband: [Deadband<i32>; 3],
    /// MQTT keep-alive in ms.
    pub keep_alive_ms: u32,
    /// How long a device waits for a CONNACK, PUBACK or PINGRESP before the link counts as dead.
    pub ack_timeout_ms: u32,
    /// Probability, per sample, that a device's leak probe gets wet (for as many samples as an
    /// excursion lasts). 0: the devices have no probe.
    pub leak: f64,
    /// The leak probe's heartbeat: its state is sent again this often while nothing changes.
    pub leak_heartbeat_ms: u64,
}

impl Options {
    /// Defaults for `devices` devices against `gateway`: 1 sample/s, no excursions, no leak
    /// probe, 10 s.
    pub fn new(gateway: SocketAddr, devices: usize) -> Self {
        Self {
            gateways: vec![gateway],
            devices,
            rate: 1.0,
            anomaly: 0.0,
            excursion: EXCURSION_SAMPLES,
            metrics: 2,
            duration: Duration::from_secs(10),
            drain: Duration::from_secs(10),
            prefix: "sim-".into(),
            threads: 2,
            seed: 1,
            deadband: [
                Deadband {
                    delta: 200,
                    min_interval_ms: 0,
                    heartbeat_ms: 60_000,
                },
                Deadband {
                    delta: 1_000,
                    min_interval_ms: 0,
                    heartbeat_ms: 60_000,
                },
                Deadband {
                    delta: 500,
                    min_interval_ms: 0,
                    heartbeat_ms: 60_000,
                },
            ],
            keep_alive_ms: 30_000,
            ack_timeout_ms: 5_000,
            leak: 0.0,
            leak_heartbeat_ms: 60_000,
        }
    }

    /// Reports every sample of every metric: no report by exception.
    pub fn every_sample(&mut self) {
        for band in &mut self.deadband {
            band.delta = 0;
        }
    }

    /// Sets [`Options::anomaly`] and [`Options::excursion`] so that excursions last `min` to
    /// `max` seconds (at [`Options::rate`]) and a `share` of all samples falls inside one.
    pub fn excursions(&mut self, share: f64, min: Duration, max: Duration) -> anyhow::Result<()> {
        anyhow::ensure!(
            (0.0..1.0).contains(&share),
            "the share of samples in excursions must be at least 0 and less than 1"
        );
        let samples = |d: Duration| (d.as_secs_f64() * self.rate).round().max(1.0) as u32;
        let (lo, hi) = (samples(min), samples(max));
        anyhow::ensure!(
            lo <= hi,
            "the shortest excursion is longer than the longest"
        );
        self.excursion = (lo, hi);
        // A device alternates between a normal stretch (mean 1/p samples) and an excursion
        // (mean L samples): the share inside is pL / (1 + pL), so p = share / (L (1 - share)).
        let mean = f64::from(lo + hi) / 2.0;
        self.anomaly = share / (mean * (1.0 - share));
        Ok(())
    }
}

/// What a run did, summed over all devices.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    /// Devices simulated.
    pub devices: usize,
    /// Devices connected to the gateway when sampling stopped.
    pub connected_at_end: usize,
    /// Wall time from start to the end of the drain.
    pub elapsed: Duration,
    /// Samples taken.
    pub samples: u64,
    /// Messages queued by report by exception (each with its own `seq`).
    pub queued: u64,
    /// Metric values in those messages.
    pub values: u64,
    /// Messages acknowledged by the gateway (PUBACK).
    pub acked: u64,
    /// PUBLISH packets written, resends after a reconnect included.
    pub published: u64,
    /// Messages dropped from full rings.
    pub dropped: u64,
    /// Messages still queued when the drain ended.
    pub unsent: u64,
    /// Excursions started.
    pub excursions: u64,
    /// Samples taken inside an excursion.
    pub excursion_samples: u64,
    /// CONNECTs sent, and connections lost.
    pub connects: u64,
    /// Connections declared dead (keep-alive, missing acks, closed sockets).
    pub links_lost: u64,
    /// Bytes written to the gateway.
    pub bytes_out: u64,
    /// State messages (leak probe changes and heartbeats) among `queued`.
    pub states: u64,
    /// Times a leak probe got wet.
    pub leaks: u64,
    /// Moves from one gateway of the list to another.
    pub gateway_moves: u64,
}

impl Report {
    fn add(&mut self, c: &Counters, signal: &Signal, up: bool, leaks: u64, moves: u32) {
        self.states += u64::from(c.states);
        self.leaks += leaks;
        self.gateway_moves += u64::from(moves);
        self.samples += u64::from(c.samples);
        self.queued += u64::from(c.queued);
        self.values += u64::from(c.values);
        self.acked += u64::from(c.mqtt.acked);
        self.published += u64::from(c.mqtt.published);
        self.dropped += u64::from(c.dropped);
        self.unsent += u64::from(c.waiting);
        self.excursions += signal.excursions;
        self.excursion_samples += signal.excursion_samples;
        self.connects += u64::from(c.mqtt.connects);
        self.links_lost += u64::from(c.mqtt.lost);
        self.bytes_out += c.mqtt.bytes_out;
        self.connected_at_end += usize::from(up);
    }

    /// The report as one JSON object, for benchmarks.
    pub fn to_json(&self) -> serde_json::Value {
        let secs = self.elapsed.as_secs_f64();
        json!({
            "devices": self.devices,
            "connected_at_end": self.connected_at_end,
            "elapsed_s": secs,
            "samples": self.samples,
            "queued": self.queued,
            "values": self.values,
            "published": self.published,
            "acked": self.acked,
            "dropped": self.dropped,
            "unsent": self.unsent,
            "excursions": self.excursions,
            "excursion_samples": self.excursion_samples,
            "connects": self.connects,
            "links_lost": self.links_lost,
            "bytes_out": self.bytes_out,
            "states": self.states,
            "leaks": self.leaks,
            "gateway_moves": self.gateway_moves,
            "acked_per_s": if secs > 0.0 { self.acked as f64 / secs } else { 0.0 },
        })
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        writeln!(
            f,
            "devices {} (connected at end {}), {:.1} s",
            self.devices, self.connected_at_end, secs
        )?;
        writeln!(
            f,
            "samples {}, messages queued {} ({} values), acked {} ({:.0}/s), published {}",
            self.samples,
            self.queued,
            self.values,
            self.acked,
            self.acked as f64 / secs.max(f64::EPSILON),
            self.published
        )?;
        writeln!(
            f,
            "dropped {}, unsent {}, excursions {} ({} samples), connects {}, links lost {}, gateway moves {}, bytes out {}",
            self.dropped,
            self.unsent,
            self.excursions,
            self.excursion_samples,
            self.connects,
            self.links_lost,
            self.gateway_moves,
            self.bytes_out
        )?;
        if self.leaks > 0 || self.states > 0 {
            writeln!(
                f,
                "leaks {}, leak probe states queued {}",
                self.leaks, self.states
            )?;
        }
        Ok(())
    }
}

/// A device's readings: a per-device baseline, slow drift, noise and rare excursions.
#[derive(Debug, Clone)]
pub struct Signal {
    rng: fastrand::Rng,
    base: [f64; 2],
    drift: [f64; 2],
    excursion_left: u32,
    excursion_value: f64,
    anomaly: f64,
    excursion: (u32, u32),
    /// Pressure has a generator of its own, so that temperature and humidity are the same
    /// for a seed whether or not pressure is simulated.
    pressure: Option<Pressure>,
    /// Excursions started.
    pub excursions: u64,
    /// Samples taken inside an excursion.
    pub excursion_samples: u64,
}

/// A standard normal sample (Box-Muller).
fn gauss(rng: &mut fastrand::Rng) -> f64 {
    let u = rng.f64().max(f64::MIN_POSITIVE);
    let v = rng.f64();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

#[derive(Debug, Clone)]
struct Pressure {
    rng: fastrand::Rng,
    base: f64,
    drift: f64,
}

impl Signal {
    /// A signal seeded with `seed`, starting excursions with probability `anomaly` per sample.
    pub fn new(seed: u64, anomaly: f64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let base = [18.0 + 6.0 * rng.f64(), 35.0 + 25.0 * rng.f64()];
        Self {
            rng,
            base,
            drift: [0.0; 2],
            excursion_left: 0,
            excursion_value: 0.0,
            anomaly,
            excursion: EXCURSION_SAMPLES,
            pressure: None,
            excursions: 0,
            excursion_samples: 0,
        }
    }

    /// Excursions last `min` to `max` samples (inclusive) instead of [`EXCURSION_SAMPLES`].
    pub fn with_excursions(mut self, (min, max): (u32, u32)) -> Self {
        self.excursion = (min.max(1), max.max(min).max(1));
        self
    }

    /// Adds a barometric pressure (hPa) to the signal: a per-device baseline near sea level,
    /// slow drift and noise; see [`Signal::sample3`].
    pub fn with_pressure(mut self) -> Self {
        let mut rng = fastrand::Rng::with_seed(self.rng.get_seed() ^ 0x7072_6573_7375_7265);
        let base = 995.0 + 30.0 * rng.f64();
        self.pressure = Some(Pressure {
            rng,
            base,
            drift: 0.0,
        });
        self
    }

    fn gauss(&mut self) -> f64 {
        gauss(&mut self.rng)
    }

    /// The next sample: temperature (m°C) and relative humidity (m%).
    pub fn sample(&mut self) -> [i32; 2] {
        for (i, (step, bound)) in [(0.02, 2.0), (0.1, 8.0)].into_iter().enumerate() {
            let d = self.drift[i] + step * self.gauss();
            self.drift[i] = d.clamp(-bound, bound);
        }
        if self.excursion_left == 0 && self.rng.f64() < self.anomaly {
            self.excursion_left = self.rng.u32(self.excursion.0..=self.excursion.1);
            self.excursion_value = 92.0 + 7.0 * self.rng.f64();
            self.excursions += 1;
        }
        let temperature = if self.excursion_left > 0 {
            self.excursion_left -= 1;
            self.excursion_samples += 1;
            self.excursion_value + 0.3 * self.gauss()
        } else {
            self.base[0] + self.drift[0] + 0.05 * self.gauss()
        };
        let humidity = (self.base[1] + self.drift[1] + 0.3 * self.gauss()).clamp(0.0, 100.0);
        [
            (temperature * 1000.0).round() as i32,
            (humidity * 1000.0).round() as i32,
        ]
    }

    /// The next sample with pressure: temperature (m°C), relative humidity (m%) and pressure
    /// (thousandths of a hPa). Without [`Signal::with_pressure`] the pressure is 0.
    pub fn sample3(&mut self) -> [i32; 3] {
        let [t, h] = self.sample();
        let Some(p) = self.pressure.as_mut() else {
            return [t, h, 0];
        };
        let step = 0.05 * gauss(&mut p.rng);
        let noise = 0.05 * gauss(&mut p.rng);
        p.drift = (p.drift + step).clamp(-5.0, 5.0);
        [t, h, ((p.base + p.drift + noise) * 1000.0).round() as i32]
    }
}

/// A TCP connection to a gateway as a firmware [`Link`]: non-blocking reads, a new socket on
/// every reconnect, to the next gateway of the list after the first.
pub struct TcpLink<'a> {
    gateways: Gateways<'a, SocketAddr>,
    stream: Option<TcpStream>,
    buf: [u8; 64],
    start: usize,
    end: usize,
    eof: bool,
}

impl<'a> TcpLink<'a> {
    /// A link to `gateways`; it connects when the session first asks it to.
    pub fn new(gateways: Gateways<'a, SocketAddr>) -> Self {
        Self {
            gateways,
            stream: None,
            buf: [0; 64],
            start: 0,
            end: 0,
            eof: false,
        }
    }

    fn stream(&mut self) -> io::Result<&mut TcpStream> {
        self.stream
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }

    /// Moves between gateways so far.
    pub fn moves(&self) -> u32 {
        self.gateways.moves()
    }
}

impl embedded_io::ErrorType for TcpLink<'_> {
    type Error = io::Error;
}

impl embedded_io::ReadReady for TcpLink<'_> {
    fn read_ready(&mut self) -> io::Result<bool> {
        if self.start < self.end || self.eof {
            return Ok(true);
        }
        let Some(stream) = self.stream.as_mut() else {
            return Ok(false);
        };
        match stream.read(&mut self.buf) {
            Ok(0) => {
                self.eof = true;
                Ok(true)
            }
            Ok(n) => {
                (self.start, self.end) = (0, n);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl embedded_io::Read for TcpLink<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end && !self.eof {
            // Only called after read_ready said yes; block briefly otherwise.
            let stream = self.stream()?;
            stream.set_nonblocking(false)?;
            let n = stream.read(out);
            stream.set_nonblocking(true)?;
            return n;
        }
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

impl embedded_io::Write for TcpLink<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.stream()?.write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                other => return other,
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Link for TcpLink<'_> {
    fn reopen(&mut self) -> io::Result<()> {
        self.stream = None;
        (self.start, self.end, self.eof) = (0, 0, false);
        let addr = *self.gateways.next_address();
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_nodelay(true)?;
        stream.set_nonblocking(true)?;
        self.stream = Some(stream);
        Ok(())
    }
}

/// A leak probe (two electrodes that water shorts) on a pin with a pull-up, as the firmware's
/// [`Input`] reads it: high while dry, low while wet, and for [`PROBE_BOUNCE_MS`] after either
/// change a level that flips at random. Wet spells start with probability `chance` per sample
/// and last as long as the signal's excursions.
#[derive(Debug, Clone)]
pub struct LeakProbe {
    rng: fastrand::Rng,
    chance: f64,
    spell: (u32, u32),
    wet_left: u32,
    wet: bool,
    changed_at: Option<u64>,
    now: u64,
    /// Wet spells started.
    pub leaks: u64,
}

impl LeakProbe {
    /// A dry probe seeded with `seed`.
    pub fn new(seed: u64, chance: f64, spell: (u32, u32)) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(seed ^ 0x6c65_616b),
            chance,
            spell: (spell.0.max(1), spell.1.max(spell.0).max(1)),
            wet_left: 0,
            wet: false,
            changed_at: None,
            now: 0,
            leaks: 0,
        }
    }

    /// One sample period at `now_ms`: a wet spell may start or end.
    pub fn sample(&mut self, now_ms: u64) {
        if self.wet_left == 0 && self.rng.f64() < self.chance {
            self.wet_left = self.rng.u32(self.spell.0..=self.spell.1);
            self.leaks += 1;
        }
        let wet = self.wet_left > 0;
        self.wet_left = self.wet_left.saturating_sub(1);
        if wet != self.wet {
            self.wet = wet;
            self.changed_at = Some(now_ms);
        }
    }

    /// Whether the probe is wet (what the debounced input should end up reporting).
    pub fn is_wet(&self) -> bool {
        self.wet
    }

    /// The time the next pin read happens at.
    pub fn set_now(&mut self, now_ms: u64) {
        self.now = now_ms;
    }
}

impl embedded_hal::digital::ErrorType for LeakProbe {
    type Error = Infallible;
}

impl embedded_hal::digital::InputPin for LeakProbe {
    fn is_high(&mut self) -> Result<bool, Infallible> {
        let bouncing = self
            .changed_at
            .is_some_and(|at| self.now.saturating_sub(at) < PROBE_BOUNCE_MS);
        Ok(if bouncing { self.rng.bool() } else { !self.wet })
    }

    fn is_low(&mut self) -> Result<bool, Infallible> {
        self.is_high().map(|high| !high)
    }
}

struct Device<'a, const M: usize> {
    node: Node<'a, M, RING>,
    link: TcpLink<'a>,
    signal: Signal,
    probe: Option<Input<LeakProbe>>,
    next_sample: u64,
    last_poll: u64,
}

/// What differs between a fleet of climate sensors and one with pressure too.
struct Sensor<'a, const M: usize> {
    metrics: [&'a str; M],
    deadband: [Deadband<i32>; M],
    sample: fn(&mut Signal) -> [i32; M],
}

/// Runs the fleet: samples for `options.duration`, then waits up to `options.drain` for every
/// queued message to be acknowledged, and reports.
pub fn run(options: &Options) -> anyhow::Result<Report> {
    anyhow::ensure!(options.devices > 0, "--devices must be at least 1");
    anyhow::ensure!(
        options.rate > 0.0 && options.rate.is_finite(),
        "--rate must be a positive number of samples per second"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&options.anomaly),
        "--anomaly is a probability between 0 and 1"
    );
    anyhow::ensure!(
        (1..=3).contains(&options.metrics),
        "--metrics is 1 (temperature), 2 (and humidity) or 3 (and pressure)"
    );
    anyhow::ensure!(
        0 < options.excursion.0 && options.excursion.0 <= options.excursion.1,
        "excursions last at least one sample, and the shortest is not longer than the longest"
    );
    anyhow::ensure!(!options.gateways.is_empty(), "give at least one --gateway");
    anyhow::ensure!(
        (0.0..=1.0).contains(&options.leak),
        "--leak is a probability between 0 and 1"
    );
    let ids: Vec<String> = (0..options.devices)
        .map(|i| format!("{}{i}", options.prefix))
        .collect();
    let threads = options.threads.clamp(1, options.devices);
    let start = Instant::now();
    let period_ms = (1000.0 / options.rate).max(1.0) as u64;
    let mut report = std::thread::scope(|scope| -> anyhow::Result<Report> {
        let shards: Vec<_> = ids
            .chunks(options.devices.div_ceil(threads))
            .enumerate()
            .map(|(shard, ids)| {
                scope.spawn(move || {
                    let [t, h, p] = options.deadband;
                    match options.metrics {
                        1 => {
                            let sensor = Sensor {
                                metrics: [CLIMATE[0]],
                                deadband: [t],
                                sample: |s: &mut Signal| [s.sample()[0]],
                            };
                            run_shard(options, &sensor, shard, ids, start, period_ms)
                        }
                        2 => {
                            let sensor = Sensor {
                                metrics: CLIMATE,
                                deadband: [t, h],
                                sample: Signal::sample,
                            };
                            run_shard(options, &sensor, shard, ids, start, period_ms)
                        }
                        _ => {
                            let sensor = Sensor {
                                metrics: CLIMATE_PRESSURE,
                                deadband: [t, h, p],
                                sample: Signal::sample3,
                            };
                            run_shard(options, &sensor, shard, ids, start, period_ms)
                        }
                    }
                })
            })
            .collect();
        let mut total = Report::default();
        for shard in shards {
            let part = shard
                .join()
                .map_err(|_| anyhow::anyhow!("a simulator thread panicked"))??;
            merge(&mut total, &part);
        }
        Ok(total)
    })?;
    report.devices = options.devices;
    report.elapsed = start.elapsed();
    Ok(report)
}

fn merge(total: &mut Report, part: &Report) {
    total.connected_at_end += part.connected_at_end;
    total.samples += part.samples;
    total.queued += part.queued;
    total.values += part.values;
    total.acked += part.acked;
    total.published += part.published;
    total.dropped += part.dropped;
    total.unsent += part.unsent;
    total.excursions += part.excursions;
    total.excursion_samples += part.excursion_samples;
    total.connects += part.connects;
    total.links_lost += part.links_lost;
    total.bytes_out += part.bytes_out;
    total.states += part.states;
    total.leaks += part.leaks;
    total.gateway_moves += part.gateway_moves;
}

fn run_shard<const M: usize>(
    options: &Options,
    sensor: &Sensor<'_, M>,
    shard: usize,
    ids: &[String],
    start: Instant,
    period_ms: u64,
) -> anyhow::Result<Report> {
    let mut devices = Vec::with_capacity(ids.len());
    for (i, id) in ids.iter().enumerate() {
        let seed =
            options.seed ^ ((shard as u64) << 32 | i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut signal = Signal::new(seed, options.anomaly).with_excursions(options.excursion);
        if M == 3 {
            signal = signal.with_pressure();
        }
        let node = Node::new(Config {
            device: id,
            metrics: sensor.metrics,
            deadband: sensor.deadband,
            credentials: None,
            keep_alive_ms: options.keep_alive_ms,
            ack_timeout_ms: options.ack_timeout_ms,
            backoff_ms: (500, 30_000),
        })
        .map_err(|e| anyhow::anyhow!("device {id}: {e}"))?;
        // Spread the first samples over one period.
        let next_sample = signal.rng.u64(0..period_ms);
        let gateways = Gateways::new(&options.gateways)
            .ok_or_else(|| anyhow::anyhow!("give at least one --gateway"))?;
        let probe = (options.leak > 0.0).then(|| {
            let pin = LeakProbe::new(seed, options.leak, options.excursion);
            // Active low: the wet probe pulls the pin to ground.
            Input::new(pin, true, PROBE_SETTLE_MS, options.leak_heartbeat_ms)
        });
        devices.push(Device {
            node,
            link: TcpLink::new(gateways),
            signal,
            probe,
            next_sample,
            last_poll: 0,
        });
    }
    let sample_until = options.duration.as_millis() as u64;
    let drain_until = sample_until + options.drain.as_millis() as u64;
    let mut connected_at_end = None;
    loop {
        let now = start.elapsed().as_millis() as u64;
        let sampling = now < sample_until;
        if !sampling && connected_at_end.is_none() {
            connected_at_end = Some(devices.iter().filter(|d| d.node.is_up()).count());
        }
        let mut busy = false;
        for d in &mut devices {
            let mut due = false;
            if sampling && now >= d.next_sample {
                let values = (sensor.sample)(&mut d.signal);
                d.node.sample(now, values);
                if let Some(probe) = d.probe.as_mut() {
                    probe.pin_mut().sample(now);
                }
                d.next_sample += period_ms;
                due = true;
            }
            if let Some(probe) = d.probe.as_mut().filter(|_| sampling) {
                probe.pin_mut().set_now(now);
                let Ok(state) = probe.poll(now);
                if let Some(wet) = state {
                    d.node
                        .report_state(LEAK, State::Bool(wet))
                        .map_err(|e| anyhow::anyhow!("{LEAK}: {e}"))?;
                    due = true;
                }
            }
            let waiting = d.node.counters().waiting > 0;
            if due || waiting || !d.node.is_up() || now.saturating_sub(d.last_poll) >= 100 {
                d.last_poll = now;
                if let Some(Event::Acked) = d.node.poll(now, &mut d.link) {
                    // Poll again at once: the next queued message can go out now.
                    d.node.poll(now, &mut d.link);
                }
            }
            busy |= d.node.counters().waiting > 0;
        }
        if !sampling && (!busy || now >= drain_until) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut report = Report::default();
    for d in &devices {
        let leaks = d.probe.as_ref().map_or(0, |p| p.pin().leaks);
        report.add(
            &d.node.counters(),
            &d.signal,
            d.node.is_up(),
            leaks,
            d.link.moves(),
        );
    }
    report.connected_at_end = connected_at_end.unwrap_or(report.connected_at_end);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_stay_in_their_normal_range_without_anomalies() {
        let mut s = Signal::new(3, 0.0);
        for _ in 0..10_000 {
            let [t, h] = s.sample();
            assert!((15_000..=27_000).contains(&t), "{t}");
            assert!((0..=100_000).contains(&h), "{h}");
        }
        assert_eq!(s.excursions, 0);
    }

    #[test]
    fn excursions_go_above_the_overheat_threshold_and_end() {
        let mut s = Signal::new(4, 1.0);
        let first = s.sample();
        assert!(first[0] > 90_000, "{first:?}");
        assert_eq!(s.excursions, 1);
        // It lasts 5 to 20 samples; with anomaly 1.0 the next one starts right after it.
        let mut length = 1;
        while s.excursions == 1 && length <= 20 {
            assert!(s.sample()[0] > 90_000);
            length += 1;
        }
        // The sample that started the second excursion is not part of the first.
        assert!((5..=20).contains(&(length - 1)), "{length}");
    }

    #[test]
    fn pressure_leaves_temperature_and_humidity_as_they_were() {
        let mut plain = Signal::new(11, 0.01);
        let mut with = Signal::new(11, 0.01).with_pressure();
        for _ in 0..1_000 {
            let [t, h] = plain.sample();
            let [t3, h3, p] = with.sample3();
            assert_eq!((t, h), (t3, h3));
            assert!((985_000..=1_030_000).contains(&p), "{p}");
        }
    }

    #[test]
    fn excursions_last_as_long_as_asked() {
        let mut s = Signal::new(5, 1.0).with_excursions((10, 12));
        s.sample();
        let mut length = 1;
        while s.excursions == 1 {
            s.sample();
            length += 1;
        }
        assert!((10..=12).contains(&(length - 1)), "{length}");
    }

    #[test]
    fn the_excursion_share_is_what_was_asked_for() {
        let mut o = Options::new(([127, 0, 0, 1], 1883).into(), 1);
        o.excursions(0.001, Duration::from_secs(10), Duration::from_secs(60))
            .unwrap();
        assert_eq!(o.excursion, (10, 60));
        let mut inside = 0;
        let n = 4_000_000;
        for seed in 0..40 {
            let mut s = Signal::new(seed, o.anomaly).with_excursions(o.excursion);
            for _ in 0..n / 40 {
                s.sample();
            }
            inside += s.excursion_samples;
        }
        let share = inside as f64 / n as f64;
        assert!((0.0007..0.0013).contains(&share), "{share}");
        assert!(o.excursions(1.0, Duration::ZERO, Duration::ZERO).is_err());
    }

    #[test]
    fn every_sample_reports_every_sample() {
        let mut o = Options::new(([127, 0, 0, 1], 1883).into(), 1);
        o.every_sample();
        assert!(o.deadband.iter().all(|b| b.delta == 0));
    }

    #[test]
    fn a_bouncing_leak_probe_is_reported_once_per_change_through_the_firmware_input() {
        use embedded_hal::digital::InputPin as _;
        // Wet spells of 3 to 6 samples, 100 ms apart; the pin is read every millisecond.
        let mut input = Input::new(
            LeakProbe::new(7, 0.05, (3, 6)),
            true,
            PROBE_SETTLE_MS,
            60_000,
        );
        let (mut reports, mut physical, mut flips) = (Vec::new(), Vec::new(), 0);
        let mut last_level = None;
        for now in 0..60_000u64 {
            if now % 100 == 0 {
                input.pin_mut().sample(now);
                let wet = input.pin().is_wet();
                if physical.last() != Some(&wet) {
                    physical.push(wet);
                }
            }
            input.pin_mut().set_now(now);
            let level = input.pin_mut().is_high().unwrap();
            flips += usize::from(last_level.is_some_and(|l| l != level));
            last_level = Some(level);
            input.pin_mut().set_now(now);
            if let Ok(Some(wet)) = input.poll(now) {
                reports.push(wet);
            }
        }
        let leaks = input.pin().leaks;
        assert!(leaks > 10, "{leaks}");
        assert!(flips > 4 * physical.len(), "the pin bounced: {flips} flips");
        // Dry at first, then one report per change of the probe: no bounce got through.
        assert_eq!(reports, physical, "{} leaks", leaks);
    }

    #[test]
    fn the_same_seed_gives_the_same_signal() {
        let (mut a, mut b) = (Signal::new(9, 0.01), Signal::new(9, 0.01));
        for _ in 0..1_000 {
            assert_eq!(a.sample(), b.sample());
        }
    }
}

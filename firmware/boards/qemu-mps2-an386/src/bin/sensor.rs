//! Watchpost sensor node on QEMU mps2-an386: a scripted sensor, logs on UART0, MQTT on UART1.
//!
//! The simulated sensor holds a temperature and a humidity that lines on UART0 set:
//! `temperature=95.2` or `humidity=40`. Every 100 ms the node samples them; report by
//! exception decides what goes to the gateway. A leak probe sits on a scripted pin with a
//! pull-up: `water_leak=1` shorts it to ground (wet), `water_leak=0` lets it go (dry); the pin
//! is read every millisecond, debounced (50 ms) and its state published at once on a change and
//! every 5 s. Log lines on UART0 say what happened, one per event, in a form the end-to-end
//! tests read (`queued seq=3 ...`, `mqtt connected`, ...).
#![no_std]
#![no_main]

use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, Ordering};

use cortex_m_rt::entry;
use panic_halt as _;
use watchpost_firmware::input::Input;
use watchpost_firmware::mqtt::{Error, Event};
use watchpost_firmware::node::{Config, Node};
use watchpost_firmware::payload::{State, parse_milli};
use watchpost_firmware::report::Deadband;
use watchpost_firmware::sensor::CLIMATE;
use watchpost_qemu_mps2_an386::{Clock, ScriptedPin, UART0, UART1, Uart};

/// Device id, set at build time: `WATCHPOST_DEVICE_ID=boiler-1 cargo build --release`.
const DEVICE: &str = match option_env!("WATCHPOST_DEVICE_ID") {
    Some(id) => id,
    None => "qemu-1",
};
const CREDENTIALS: Option<(&str, &str)> = match (
    option_env!("WATCHPOST_MQTT_USER"),
    option_env!("WATCHPOST_MQTT_PASSWORD"),
) {
    (Some(user), Some(password)) => Some((user, password)),
    _ => None,
};
/// Messages kept while the gateway is unreachable.
const RING: usize = 32;
const SAMPLE_MS: u64 = 100;
/// The leak probe's metric: the shipped rule `water-leak` matches `sensors/+/water_leak`.
const LEAK: &str = "water_leak";
/// The leak probe's pin: high (pulled up) while dry, low while the probe is wet.
static LEAK_PIN_HIGH: AtomicBool = AtomicBool::new(true);

#[entry]
fn main() -> ! {
    let core = cortex_m::Peripherals::take().unwrap_or_else(|| panic!());
    let mut clock = Clock::start(core.SYST);
    // SAFETY: the only handles to these UARTs.
    let (mut log, mut link) = unsafe { (Uart::new(UART0), Uart::new(UART1)) };

    let config = Config {
        device: DEVICE,
        metrics: CLIMATE,
        deadband: [
            Deadband {
                delta: 100,
                min_interval_ms: 0,
                heartbeat_ms: 5_000,
            },
            Deadband {
                delta: 1_000,
                min_interval_ms: 0,
                heartbeat_ms: 5_000,
            },
        ],
        credentials: CREDENTIALS,
        keep_alive_ms: 2_000,
        ack_timeout_ms: 1_500,
        backoff_ms: (200, 2_000),
    };
    let node = match Node::new(config) {
        // In static memory, so that the image's static RAM figure includes the node and ring.
        Ok(node) => cortex_m::singleton!(: Node<'static, 2, RING> = node),
        Err(e) => {
            let _ = writeln!(log, "config error: {e}");
            None
        }
    };
    let Some(node) = node else {
        loop {
            cortex_m::asm::wfi();
        }
    };
    let _ = writeln!(log, "watchpost qemu-mps2-an386 device={DEVICE} ring={RING}");

    // Active low: the probe pulls the pin to ground when wet.
    let mut leak = Input::new(ScriptedPin::new(&LEAK_PIN_HIGH), true, 50, 5_000);
    // The simulated sensor: what the script last set.
    let mut values = [21_000, 40_000];
    let mut line = [0u8; 48];
    let mut line_len = 0;
    let mut next_sample = 0;
    loop {
        while let Some(b) = log.read_byte() {
            if b == b'\n' || b == b'\r' {
                script(&mut log, &line[..line_len], &mut values);
                line_len = 0;
            } else if line_len < line.len() {
                line[line_len] = b;
                line_len += 1;
            }
        }

        let now = clock.now();
        let Ok(wet) = leak.poll(now);
        if let Some(wet) = wet {
            let _ = match node.report_state(LEAK, State::Bool(wet)) {
                Ok(seq) => {
                    let c = node.counters();
                    writeln!(
                        log,
                        "queued seq={seq} {LEAK}={wet} waiting={} dropped={}",
                        c.waiting, c.dropped
                    )
                }
                Err(e) => writeln!(log, "{LEAK} not queued: {e}"),
            };
        }
        if now >= next_sample {
            next_sample = now + SAMPLE_MS;
            if let Some(seq) = node.sample(now, values) {
                let c = node.counters();
                let _ = writeln!(
                    log,
                    "queued seq={seq} temperature={} humidity={} waiting={} dropped={}",
                    values[0], values[1], c.waiting, c.dropped
                );
            }
        }

        // Keep polling while the session has something to do right away.
        while let Some(event) = node.poll(now, &mut link) {
            let _ = match event {
                Event::Connecting => writeln!(log, "mqtt connecting"),
                Event::Connected => writeln!(log, "mqtt connected"),
                Event::Refused(code) => writeln!(log, "mqtt refused code={code}"),
                Event::Acked => writeln!(log, "mqtt acked waiting={}", node.counters().waiting),
                Event::LinkLost { cause, retry_in_ms } => writeln!(
                    log,
                    "mqtt link lost ({}), retry in {retry_in_ms} ms",
                    match cause {
                        Error::Timeout => "no answer",
                        Error::Protocol => "bad packet",
                        Error::Closed => "closed",
                        _ => "transport",
                    }
                ),
            };
            if !matches!(event, Event::Acked) {
                break;
            }
        }
        cortex_m::asm::wfi();
    }
}

/// Applies one script line: `temperature=95.2`, `humidity=40`, `water_leak=1` or `water_leak=0`.
fn script(log: &mut Uart, line: &[u8], values: &mut [i32; 2]) {
    let Ok(line) = core::str::from_utf8(line) else {
        return;
    };
    let Some((name, value)) = line.split_once('=') else {
        let _ = writeln!(log, "script? {line}");
        return;
    };
    if name.trim() == LEAK {
        let wet = match value.trim() {
            "1" => true,
            "0" => false,
            _ => {
                let _ = writeln!(log, "script? {line}");
                return;
            }
        };
        LEAK_PIN_HIGH.store(!wet, Ordering::Relaxed);
        let _ = writeln!(log, "script {LEAK}={}", u8::from(wet));
        return;
    }
    match (
        CLIMATE.iter().position(|m| *m == name.trim()),
        parse_milli(value),
    ) {
        (Some(i), Some(v)) => {
            values[i] = v;
            let _ = writeln!(log, "script {}={v}", CLIMATE[i]);
        }
        _ => {
            let _ = writeln!(log, "script? {line}");
        }
    }
}

//! Watchpost sensor node on an STM32F411 Black Pill: SHT4x on I2C1, a transparent modem on USART2,
//! a leak probe on PB12.
//!
//! Wiring and set-up are in `firmware/README.md`. Every 2 s the node measures temperature and
//! humidity; report by exception decides what goes to the gateway. The leak probe's pin is read
//! every millisecond, debounced, and its state sent at once on a change and every 5 min; the MQTT session runs over
//! the modem's serial line and finds a dead link by its keep-alive. Logs go out over RTT.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::{entry, exception};
use panic_rtt_target as _;
use rtt_target::{rprintln, rtt_init_print};
use stm32f4xx_hal::i2c::{I2c, Mode};
use stm32f4xx_hal::pac;
use stm32f4xx_hal::prelude::*;
use stm32f4xx_hal::rcc::Config as Clocks;
use stm32f4xx_hal::serial::Config as SerialConfig;
use watchpost_firmware::input::Input;
use watchpost_firmware::mqtt::{Error, Event};
use watchpost_firmware::node::{Config, Node};
use watchpost_firmware::payload::State;
use watchpost_firmware::report::Deadband;
use watchpost_firmware::sensor::{CLIMATE, Sensor, Sht4x};
use watchpost_firmware::serial::UartLink;

/// Device id, set at build time: `WATCHPOST_DEVICE_ID=boiler-1 cargo run --release`.
const DEVICE: &str = match option_env!("WATCHPOST_DEVICE_ID") {
    Some(id) => id,
    None => "blackpill-1",
};
/// Gateway credentials, set at build time with `WATCHPOST_MQTT_USER` and
/// `WATCHPOST_MQTT_PASSWORD` (both or neither).
const CREDENTIALS: Option<(&str, &str)> = match (
    option_env!("WATCHPOST_MQTT_USER"),
    option_env!("WATCHPOST_MQTT_PASSWORD"),
) {
    (Some(user), Some(password)) => Some((user, password)),
    _ => None,
};
/// Messages kept while the gateway is unreachable (about 20 bytes each).
const RING: usize = 256;
const SAMPLE_MS: u64 = 2_000;
/// The leak probe's metric: the shipped rule `water-leak` matches `sensors/+/water_leak`.
const LEAK: &str = "water_leak";
const SYSCLK_HZ: u32 = 84_000_000;

static TICKS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    TICKS.fetch_add(1, Ordering::Relaxed);
}

#[entry]
fn main() -> ! {
    rtt_init_print!();
    let (Some(dp), Some(mut cp)) = (pac::Peripherals::take(), cortex_m::Peripherals::take()) else {
        panic!("peripherals taken twice");
    };
    // The Black Pill has a 25 MHz crystal.
    let mut rcc = dp.RCC.freeze(Clocks::hse(25.MHz()).sysclk(SYSCLK_HZ.Hz()));
    cp.SYST.set_clock_source(SystClkSource::Core);
    cp.SYST.set_reload(SYSCLK_HZ / 1_000 - 1);
    cp.SYST.clear_current();
    cp.SYST.enable_interrupt();
    cp.SYST.enable_counter();

    let gpioa = dp.GPIOA.split(&mut rcc);
    let gpiob = dp.GPIOB.split(&mut rcc);
    let i2c = I2c::new(
        dp.I2C1,
        (gpiob.pb6, gpiob.pb7),
        Mode::standard(100.kHz()),
        &mut rcc,
    );
    let delay = dp.TIM5.delay_us(&mut rcc);
    let mut sensor = Sht4x::new(i2c, delay);
    let modem = match dp.USART2.serial(
        (gpioa.pa2, gpioa.pa3),
        SerialConfig::default().baudrate(115_200.bps()),
        &mut rcc,
    ) {
        Ok(serial) => serial,
        Err(_) => panic!("USART2 cannot run at 115200 baud with these clocks"),
    };
    let mut link = UartLink::new(modem);
    // The probe's two wires go to PB12 and GND: water shorts them, pulling the pin low.
    let mut leak = Input::new(gpiob.pb12.into_pull_up_input(), true, 50, 300_000);

    let config = Config {
        device: DEVICE,
        metrics: CLIMATE,
        deadband: [
            Deadband {
                delta: 200,
                min_interval_ms: 10_000,
                heartbeat_ms: 300_000,
            },
            Deadband {
                delta: 2_000,
                min_interval_ms: 10_000,
                heartbeat_ms: 300_000,
            },
        ],
        credentials: CREDENTIALS,
        keep_alive_ms: 30_000,
        ack_timeout_ms: 10_000,
        backoff_ms: (1_000, 60_000),
    };
    let node = match Node::new(config) {
        Ok(node) => cortex_m::singleton!(: Node<'static, 2, RING> = node),
        Err(e) => panic!("configuration: {e}"),
    };
    let Some(node) = node else {
        panic!("node made twice");
    };
    rprintln!("watchpost blackpill-f411 device={} ring={}", DEVICE, RING);

    let (mut last, mut now) = (0u32, 0u64);
    let mut next_sample = 0;
    loop {
        let ticks = TICKS.load(Ordering::Relaxed);
        now += u64::from(ticks.wrapping_sub(last));
        last = ticks;

        let Ok(wet) = leak.poll(now);
        if let Some(wet) = wet {
            match node.report_state(LEAK, State::Bool(wet)) {
                Ok(seq) => rprintln!("queued seq={} {}={}", seq, LEAK, wet),
                Err(e) => rprintln!("{}: {}", LEAK, e),
            }
        }
        if now >= next_sample {
            next_sample = now + SAMPLE_MS;
            match sensor.measure() {
                Ok(values) => {
                    if let Some(seq) = node.sample(now, values) {
                        rprintln!("queued seq={} values={:?}", seq, values);
                    }
                }
                Err(e) => rprintln!("sensor: {:?}; check the SHT4x wiring (PB6 SCL, PB7 SDA)", e),
            }
        }

        while let Some(event) = node.poll(now, &mut link) {
            match event {
                Event::Connecting => rprintln!("mqtt connecting"),
                Event::Connected => rprintln!("mqtt connected"),
                Event::Refused(code) => rprintln!("mqtt refused code={}; check credentials", code),
                Event::Acked => {}
                Event::LinkLost { cause, retry_in_ms } => rprintln!(
                    "mqtt link lost ({}), retry in {} ms",
                    match cause {
                        Error::Timeout => "no answer: is the modem connected to the gateway?",
                        Error::Protocol => "bad packet",
                        Error::Closed => "closed",
                        _ => "UART error",
                    },
                    retry_in_ms
                ),
            }
            if !matches!(event, Event::Acked) {
                break;
            }
        }
        cortex_m::asm::wfi();
    }
}

//! Watchpost sensor node on an ESP32-C3: SHT4x on I2C (GPIO6 SDA, GPIO7 SCL), a leak probe on
//! GPIO4, MQTT over Wi-Fi.
//!
//! Wiring, configuration and flashing are in `firmware/README.md`. Every 2 s the node measures
//! temperature and humidity; report by exception decides what goes to the gateway. The leak
//! probe's pin is read every tick (10 ms), debounced, and its state sent at once on a change and
//! every 5 min. The MQTT session runs over a TCP connection of the Wi-Fi station (DHCP address)
//! and reconnects with backoff, to the next gateway of the list each time, while the station
//! itself re-associates with backoff when the link drops. Samples and states keep going into the
//! ring while either is down. Logs go out over the USB serial port.
#![no_std]
#![no_main]

use core::pin::pin;

use esp_backtrace as _;
use esp_hal::clock::CpuClock;
use esp_hal::delay::Delay;
use esp_hal::gpio::{Input as Pin, InputConfig, Pull};
use esp_hal::i2c::master::{Config as I2cConfig, I2c};
use esp_hal::rng::Rng;
use esp_hal::time::Duration;
use esp_hal::timer::timg::TimerGroup;
use esp_println::println;
use esp_radio::wifi::sta::StationConfig;
use esp_radio::wifi::{
    AuthenticationMethodConfig, Config as WifiConfig, ControllerConfig, Interface, WifiController,
};
use static_cell::StaticCell;
use watchpost_esp32c3::config::{self, CREDENTIALS, DEVICE, GATEWAYS, WIFI_PASSWORD, WIFI_SSID};
use watchpost_esp32c3::net::{self, Net, NetEvent, Storage};
use watchpost_esp32c3::wifi;
use watchpost_firmware::gateways::Gateways;
use watchpost_firmware::input::Input;
use watchpost_firmware::mqtt::{Error, Event};
use watchpost_firmware::node::{Config, Node};
use watchpost_firmware::payload::State;
use watchpost_firmware::report::Deadband;
use watchpost_firmware::sensor::{CLIMATE, Sensor, Sht4x};

esp_bootloader_esp_idf::esp_app_desc!();

/// Messages kept while Wi-Fi or the gateway is unreachable (24 bytes each): at the fastest
/// rate (one every 10 s) almost 3 hours, at the heartbeat rate days.
const RING: usize = 1024;
const SAMPLE_MS: u64 = 2_000;
/// The leak probe's metric: the shipped rule `water-leak` matches `sensors/+/water_leak`.
const LEAK: &str = "water_leak";
/// The main loop runs every tick and sleeps in between, which lets the radio's tasks run.
const TICK_MS: u64 = 10;
/// Wi-Fi re-association delays: first and longest.
const WIFI_BACKOFF_MS: (u32, u32) = (1_000, 60_000);

static NODE: StaticCell<Node<'static, 2, RING>> = StaticCell::new();
static NET: StaticCell<Storage> = StaticCell::new();

#[esp_hal::main]
fn main() -> ! {
    let peripherals = esp_hal::init(esp_hal::Config::default().with_cpu_clock(CpuClock::max()));
    // The Wi-Fi driver allocates its buffers and tasks from this heap: 64 KiB in the RAM the
    // second-stage bootloader used (free once the app runs) and 36 KiB in ordinary RAM.
    esp_alloc::heap_allocator!(#[esp_hal::ram(reclaimed)] size: 64 * 1024);
    esp_alloc::heap_allocator!(size: 36 * 1024);
    // esp-rtos schedules the radio's tasks beside this main loop.
    let timg0 = TimerGroup::new(peripherals.TIMG0);
    esp_rtos::start(timg0.timer0, peripherals.FROM_CPU_INTR0);

    let i2c = match I2c::new(peripherals.I2C0, I2cConfig::default()) {
        Ok(i2c) => i2c.with_sda(peripherals.GPIO6).with_scl(peripherals.GPIO7),
        Err(e) => panic!("I2C0 at 100 kHz: {e:?}"),
    };
    let mut sensor = Sht4x::new(i2c, Delay::new());
    // The probe's two wires go to GPIO4 and GND: water shorts them, pulling the pin low against
    // the internal pull-up. 50 ms to settle; the state again every 5 min while nothing changes.
    let probe = Pin::new(
        peripherals.GPIO4,
        InputConfig::default().with_pull(Pull::Up),
    );
    let mut leak = Input::new(probe, true, 50, 300_000);

    let auth = if WIFI_PASSWORD.is_empty() {
        AuthenticationMethodConfig::Open
    } else {
        // Lengths were checked at compile time (src/config.rs).
        let Ok(password) = WIFI_PASSWORD.try_into() else {
            panic!("WATCHPOST_WIFI_PASSWORD is too long");
        };
        AuthenticationMethodConfig::Wpa2Personal(password)
    };
    let Ok(ssid) = WIFI_SSID.try_into() else {
        panic!("WATCHPOST_WIFI_SSID is too long");
    };
    let station = StationConfig::default()
        .with_ssid(ssid)
        .with_authentication(auth);
    let station_interface = Interface::station();
    let controller = match WifiController::new(
        peripherals.WIFI,
        ControllerConfig::default().with_initial_config(WifiConfig::Station(station)),
    ) {
        Ok(controller) => controller,
        Err(e) => panic!("Wi-Fi start: {e}"),
    };
    let rng = Rng::new();
    let seed = (u64::from(rng.random()) << 32) | u64::from(rng.random());
    let Some(gateways) = Gateways::new(&GATEWAYS) else {
        panic!("WATCHPOST_GATEWAYS: no gateway");
    };
    let mut link = Net::new(station_interface, NET.init(Storage::new()), gateways, seed);

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
        Ok(node) => NODE.init(node),
        Err(e) => panic!("configuration: {e}"),
    };
    println!(
        "watchpost esp32c3 device={} ring={} gateways={}",
        DEVICE,
        RING,
        config::GATEWAY_LIST
    );

    let mut station = pin!(wifi::keep_connected(controller, WIFI_SSID, WIFI_BACKOFF_MS));
    let mut next_sample = 0;
    loop {
        wifi::poll_once(station.as_mut());
        match link.poll() {
            None | Some(NetEvent::LinkUp) => {}
            Some(NetEvent::LinkDown) => println!("ip: Wi-Fi down, address released"),
            Some(NetEvent::Address(address)) => println!("ip: address {} by DHCP", address),
            Some(NetEvent::AddressLost) => println!("ip: DHCP lease lost"),
        }
        let now = net::now_ms();

        let Ok(wet) = leak.poll(now);
        if let Some(wet) = wet {
            match node.report_state(LEAK, State::Bool(wet)) {
                Ok(seq) => {
                    let c = node.counters();
                    println!(
                        "queued seq={} {}={} waiting={} dropped={}",
                        seq, LEAK, wet, c.waiting, c.dropped
                    );
                }
                Err(e) => println!("{}: {}", LEAK, e),
            }
        }

        if now >= next_sample {
            next_sample = now + SAMPLE_MS;
            match sensor.measure() {
                Ok(values) => {
                    if let Some(seq) = node.sample(now, values) {
                        let c = node.counters();
                        println!(
                            "queued seq={} temperature={} humidity={} waiting={} dropped={}",
                            seq, values[0], values[1], c.waiting, c.dropped
                        );
                    }
                }
                Err(e) => println!(
                    "sensor: {:?}; check the SHT4x wiring (GPIO6 SDA, GPIO7 SCL)",
                    e
                ),
            }
        }

        // Without Wi-Fi and an address there is nothing to connect to: the session waits (and
        // finds its connection closed, if it had one, once the network is back).
        while link.is_up()
            && let Some(event) = node.poll(now, &mut link)
        {
            match event {
                Event::Connecting => {
                    let (index, gateway) = link.gateway();
                    println!(
                        "mqtt connecting to {} (gateway {} of {})",
                        gateway,
                        index + 1,
                        link.gateway_count()
                    );
                }
                Event::Connected => println!("mqtt connected to {}", link.gateway().1),
                Event::Refused(code) => println!("mqtt refused code={}; check credentials", code),
                Event::Acked => {}
                Event::LinkLost { cause, retry_in_ms } => {
                    let c = node.counters();
                    match cause {
                        Error::Transport(e) => println!(
                            "mqtt link lost ({}), retry in {} ms waiting={} dropped={}",
                            e, retry_in_ms, c.waiting, c.dropped
                        ),
                        _ => println!(
                            "mqtt link lost ({}), retry in {} ms waiting={} dropped={}",
                            match cause {
                                Error::Timeout => "no answer from the gateway",
                                Error::Protocol => "bad packet",
                                _ => "closed by the gateway",
                            },
                            retry_in_ms,
                            c.waiting,
                            c.dropped
                        ),
                    }
                }
            }
            if !matches!(event, Event::Acked) {
                break;
            }
        }
        esp_rtos::CurrentThreadHandle::get().delay(Duration::from_millis(TICK_MS));
    }
}

//! Board support for QEMU's mps2-an386: the CMSDK APB UARTs, a millisecond clock on SysTick, and
//! a scripted input pin.
//!
//! QEMU maps the first `-serial` to UART0 and the second to UART1. Its UART model holds one
//! byte each way and holds back input until that byte is read, so nothing is lost while the
//! firmware sleeps between ticks.
#![no_std]

use core::convert::Infallible;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use cortex_m::peripheral::SYST;
use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::exception;

/// UART0: logs out, script in.
pub const UART0: usize = 0x4000_4000;
/// UART1: the MQTT link to the gateway.
pub const UART1: usize = 0x4000_5000;
/// The peripheral clock QEMU gives this board.
pub const SYSCLK_HZ: u32 = 25_000_000;

const DATA: usize = 0x00;
const STATE: usize = 0x04;
const CTRL: usize = 0x08;
const BAUDDIV: usize = 0x10;
const STATE_TX_FULL: u32 = 1 << 0;
const STATE_RX_FULL: u32 = 1 << 1;
const CTRL_TX_EN: u32 = 1 << 0;
const CTRL_RX_EN: u32 = 1 << 1;

/// One CMSDK APB UART, polled.
pub struct Uart {
    base: usize,
}

impl Uart {
    /// Enables the UART at `base` (one of [`UART0`], [`UART1`]) at 115200 baud.
    ///
    /// # Safety
    /// `base` must be a CMSDK UART of this board, and only one `Uart` may exist for it.
    pub unsafe fn new(base: usize) -> Self {
        let uart = Self { base };
        // QEMU ignores the UART until the divider is valid (16 or more).
        uart.write_reg(BAUDDIV, SYSCLK_HZ / 115_200);
        uart.write_reg(CTRL, CTRL_TX_EN | CTRL_RX_EN);
        uart
    }

    fn read_reg(&self, offset: usize) -> u32 {
        // SAFETY: `new`'s contract: a valid, exclusively owned register block.
        unsafe { core::ptr::read_volatile((self.base + offset) as *const u32) }
    }

    fn write_reg(&self, offset: usize, value: u32) {
        // SAFETY: as in `read_reg`.
        unsafe { core::ptr::write_volatile((self.base + offset) as *mut u32, value) }
    }

    /// Sends one byte, waiting while the transmit buffer is full.
    pub fn write_byte(&mut self, byte: u8) {
        while self.read_reg(STATE) & STATE_TX_FULL != 0 {}
        self.write_reg(DATA, u32::from(byte));
    }

    /// The received byte, if there is one.
    pub fn read_byte(&mut self) -> Option<u8> {
        (self.read_reg(STATE) & STATE_RX_FULL != 0).then(|| self.read_reg(DATA) as u8)
    }
}

impl embedded_io::ErrorType for Uart {
    type Error = Infallible;
}

impl embedded_io::Read for Uart {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Infallible> {
        if buf.is_empty() {
            return Ok(0);
        }
        let first = loop {
            if let Some(b) = self.read_byte() {
                break b;
            }
        };
        buf[0] = first;
        let mut n = 1;
        while n < buf.len() {
            match self.read_byte() {
                Some(b) => {
                    buf[n] = b;
                    n += 1;
                }
                None => break,
            }
        }
        Ok(n)
    }
}

impl embedded_io::ReadReady for Uart {
    fn read_ready(&mut self) -> Result<bool, Infallible> {
        Ok(self.read_reg(STATE) & STATE_RX_FULL != 0)
    }
}

impl embedded_io::Write for Uart {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Infallible> {
        for &b in buf {
            self.write_byte(b);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), Infallible> {
        Ok(())
    }
}

/// A UART is a link without link state: the session finds a dead one by its timers.
impl watchpost_firmware::mqtt::Link for Uart {}

impl core::fmt::Write for Uart {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            self.write_byte(b);
        }
        Ok(())
    }
}

static TICKS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    TICKS.fetch_add(1, Ordering::Relaxed);
}

/// Milliseconds since [`Clock::start`], from a 1 kHz SysTick interrupt, widened to 64 bits.
pub struct Clock {
    last: u32,
    now: u64,
}

impl Clock {
    /// Starts SysTick at 1 kHz.
    pub fn start(mut syst: SYST) -> Self {
        syst.set_clock_source(SystClkSource::Core);
        syst.set_reload(SYSCLK_HZ / 1_000 - 1);
        syst.clear_current();
        syst.enable_interrupt();
        syst.enable_counter();
        Self { last: 0, now: 0 }
    }

    /// Milliseconds since start. Call at least once every 49 days.
    pub fn now(&mut self) -> u64 {
        let ticks = TICKS.load(Ordering::Relaxed);
        self.now += u64::from(ticks.wrapping_sub(self.last));
        self.last = ticks;
        self.now
    }
}

/// A digital input pin whose level the test script sets. QEMU models the mps2 boards' GPIO
/// blocks as unimplemented devices, so nothing outside the machine can drive a real pin; this one
/// reads an atomic flag that the script line handler writes, and everything after the pin
/// (debouncing, reporting, the ring, MQTT) is the firmware's real code.
pub struct ScriptedPin {
    high: &'static AtomicBool,
}

impl ScriptedPin {
    /// A pin that reads high while `high` is set.
    pub const fn new(high: &'static AtomicBool) -> Self {
        Self { high }
    }
}

impl embedded_hal::digital::ErrorType for ScriptedPin {
    type Error = Infallible;
}

impl embedded_hal::digital::InputPin for ScriptedPin {
    fn is_high(&mut self) -> Result<bool, Infallible> {
        Ok(self.high.load(Ordering::Relaxed))
    }

    fn is_low(&mut self) -> Result<bool, Infallible> {
        Ok(!self.high.load(Ordering::Relaxed))
    }
}

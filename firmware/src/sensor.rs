//! Sensors behind embedded-hal 1.0: what a board needs from one, and the glue for the Sensirion
//! SHT4x (SHT40/41/45) temperature and humidity sensor through the `sht4x` driver crate.
//!
//! Values are thousandths of a unit (m°C, m%RH), the form the [`Node`](crate::node::Node)
//! queues and the payload encoder writes.

use embedded_hal::delay::DelayNs;
use embedded_hal::i2c::I2c;

/// The metric names of a temperature and humidity sensor, in the order of its values.
pub const CLIMATE: [&str; 2] = ["temperature", "humidity"];

/// A sensor that measures `M` metrics at once.
pub trait Sensor<const M: usize> {
    /// What can go wrong.
    type Error;
    /// Takes one measurement, in thousandths of each metric's unit.
    fn measure(&mut self) -> Result<[i32; M], Self::Error>;
}

/// Why a measurement failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error<E> {
    /// The I2C bus failed (no device at the address, arbitration lost, ...).
    Bus(E),
    /// The sensor's answer failed its checksum.
    Crc,
    /// The driver reported an error this glue does not know.
    Driver,
}

/// An SHT4x on an I2C bus: [`CLIMATE`] metrics, high precision (about 9 ms per measurement).
pub struct Sht4x<I, D> {
    driver: sht4x::Sht4x<I, D>,
    delay: D,
}

impl<I: I2c, D: DelayNs> Sht4x<I, D> {
    /// The sensor at its default address 0x44.
    pub fn new(i2c: I, delay: D) -> Self {
        Self {
            driver: sht4x::Sht4x::new(i2c),
            delay,
        }
    }

    /// Gives the bus and the delay back.
    pub fn destroy(self) -> (I, D) {
        (self.driver.destroy(), self.delay)
    }
}

impl<I: I2c, D: DelayNs> Sensor<2> for Sht4x<I, D> {
    type Error = Error<I::Error>;

    fn measure(&mut self) -> Result<[i32; 2], Self::Error> {
        let m = self
            .driver
            .measure(sht4x::Precision::High, &mut self.delay)
            .map_err(|e| match e {
                sht4x::Error::I2c(e) => Error::Bus(e),
                sht4x::Error::Crc => Error::Crc,
                _ => Error::Driver,
            })?;
        Ok([m.temperature_milli_celsius(), m.humidity_milli_percent()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal::i2c::ErrorKind;
    use embedded_hal_mock::eh1::delay::{CheckedDelay, Transaction as Delay};
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction as I2cTx};

    /// Sensirion's CRC-8: polynomial 0x31, initial value 0xFF (SHT4x datasheet, 4.4).
    fn crc(data: [u8; 2]) -> u8 {
        let mut crc = 0xffu8;
        for byte in data {
            crc ^= byte;
            for _ in 0..8 {
                crc = if crc & 0x80 != 0 {
                    (crc << 1) ^ 0x31
                } else {
                    crc << 1
                };
            }
        }
        crc
    }

    fn response(t: u16, rh: u16) -> Vec<u8> {
        let (t, rh) = (t.to_be_bytes(), rh.to_be_bytes());
        vec![t[0], t[1], crc(t), rh[0], rh[1], crc(rh)]
    }

    #[test]
    fn crc_matches_the_datasheet_example() {
        assert_eq!(crc([0xbe, 0xef]), 0x92);
    }

    #[test]
    fn measures_temperature_and_humidity_in_thousandths() {
        // T = -45 + 175 * raw / 65535 and RH = -6 + 125 * raw / 65535 (datasheet, 4.6).
        let (t_raw, rh_raw) = (0x6666, 0x6b85);
        let i2c = Mock::new(&[
            I2cTx::write(0x44, vec![0xfd]),
            I2cTx::read(0x44, response(t_raw, rh_raw)),
        ]);
        let delay = CheckedDelay::new(&[Delay::delay_ms(9)]);
        let mut sensor = Sht4x::new(i2c, delay);
        let [t, rh] = sensor.measure().unwrap();
        let want_t = -45_000.0 + 175_000.0 * f64::from(t_raw) / 65535.0;
        let want_rh = -6_000.0 + 125_000.0 * f64::from(rh_raw) / 65535.0;
        assert!((f64::from(t) - want_t).abs() < 5.0, "{t} vs {want_t}");
        assert!((f64::from(rh) - want_rh).abs() < 5.0, "{rh} vs {want_rh}");
        let (mut i2c, mut delay) = sensor.destroy();
        i2c.done();
        delay.done();
    }

    #[test]
    fn a_corrupted_answer_is_a_crc_error() {
        let mut bad = response(0x6666, 0x6b85);
        bad[2] ^= 0x01;
        let i2c = Mock::new(&[I2cTx::write(0x44, vec![0xfd]), I2cTx::read(0x44, bad)]);
        let delay = CheckedDelay::new(&[Delay::delay_ms(9)]);
        let mut sensor = Sht4x::new(i2c, delay);
        assert_eq!(sensor.measure(), Err(Error::Crc));
        let (mut i2c, mut delay) = sensor.destroy();
        i2c.done();
        delay.done();
    }

    #[test]
    fn a_missing_sensor_is_a_bus_error() {
        let i2c = Mock::new(&[I2cTx::write(0x44, vec![0xfd]).with_error(ErrorKind::Other)]);
        let delay = CheckedDelay::new(&[]);
        let mut sensor = Sht4x::new(i2c, delay);
        assert_eq!(sensor.measure(), Err(Error::Bus(ErrorKind::Other)));
        let (mut i2c, mut delay) = sensor.destroy();
        i2c.done();
        delay.done();
    }
}

//! A UART as an MQTT [`Link`]: any embedded-hal-nb serial port (the form most HALs offer), with
//! a one-byte look-ahead so that the session can ask whether a read would block.
//!
//! For a board whose network path is a modem in transparent mode on a UART. A UART has no
//! link state, so [`Link::reopen`] does nothing and the session's timers find a dead link.
//! Receive errors (overrun, framing, noise) are transport errors: the bytes after them cannot
//! be trusted, so the session starts over with a new CONNECT.

use embedded_hal_nb::nb;
use embedded_hal_nb::serial::{ErrorType, Read, Write};

use crate::mqtt::Link;

/// A serial port's error, as an `embedded-io` error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UartError<E>(pub E);

impl<E: core::fmt::Debug> embedded_io::Error for UartError<E> {
    fn kind(&self) -> embedded_io::ErrorKind {
        embedded_io::ErrorKind::Other
    }
}

/// A serial port as a byte stream. See the module documentation.
pub struct UartLink<S> {
    serial: S,
    held: Option<u8>,
}

impl<S> UartLink<S> {
    /// Wraps `serial`.
    pub fn new(serial: S) -> Self {
        Self { serial, held: None }
    }

    /// Gives the serial port back; a byte held for look-ahead is lost.
    pub fn release(self) -> S {
        self.serial
    }
}

impl<S: ErrorType> embedded_io::ErrorType for UartLink<S> {
    type Error = UartError<S::Error>;
}

impl<S: Read<u8>> embedded_io::ReadReady for UartLink<S> {
    fn read_ready(&mut self) -> Result<bool, Self::Error> {
        if self.held.is_some() {
            return Ok(true);
        }
        match self.serial.read() {
            Ok(b) => {
                self.held = Some(b);
                Ok(true)
            }
            Err(nb::Error::WouldBlock) => Ok(false),
            Err(nb::Error::Other(e)) => Err(UartError(e)),
        }
    }
}

impl<S: Read<u8>> embedded_io::Read for UartLink<S> {
    /// Waits for one byte, then takes whatever else has already arrived.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let Some(first) = buf.first_mut() else {
            return Ok(0);
        };
        *first = match self.held.take() {
            Some(b) => b,
            None => nb::block!(self.serial.read()).map_err(UartError)?,
        };
        let mut n = 1;
        while n < buf.len() {
            match self.serial.read() {
                Ok(b) => {
                    buf[n] = b;
                    n += 1;
                }
                Err(nb::Error::WouldBlock) => break,
                Err(nb::Error::Other(e)) => return Err(UartError(e)),
            }
        }
        Ok(n)
    }
}

impl<S: Write<u8>> embedded_io::Write for UartLink<S> {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        for &b in buf {
            nb::block!(self.serial.write(b)).map_err(UartError)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), Self::Error> {
        nb::block!(self.serial.flush()).map_err(UartError)
    }
}

impl<S: Read<u8> + Write<u8>> Link for UartLink<S> {}

#[cfg(test)]
mod tests {
    use embedded_hal_mock::eh1::serial::{Mock, Transaction};
    use embedded_hal_nb::serial::ErrorKind;
    use embedded_io::{Read as _, ReadReady as _, Write as _};

    use super::*;

    #[test]
    fn look_ahead_keeps_the_byte_it_peeked() {
        let serial = Mock::new(&[
            Transaction::read_error(nb::Error::WouldBlock),
            Transaction::read(0x20),
            Transaction::read_many([0x02, 0x00]),
            Transaction::read_error(nb::Error::WouldBlock),
        ]);
        let mut link = UartLink::new(serial);
        assert!(!link.read_ready().unwrap());
        assert!(link.read_ready().unwrap());
        assert!(link.read_ready().unwrap(), "still ready: the byte is held");
        let mut buf = [0u8; 8];
        assert_eq!(link.read(&mut buf).unwrap(), 3);
        assert_eq!(&buf[..3], &[0x20, 0x02, 0x00]);
        link.release().done();
    }

    #[test]
    fn writes_every_byte_and_flushes() {
        let serial = Mock::new(&[Transaction::write_many([0xc0, 0x00]), Transaction::flush()]);
        let mut link = UartLink::new(serial);
        link.write_all(&[0xc0, 0x00]).unwrap();
        link.flush().unwrap();
        link.release().done();
    }

    #[test]
    fn an_overrun_is_a_transport_error() {
        let serial = Mock::new(&[Transaction::read_error(nb::Error::Other(
            ErrorKind::Overrun,
        ))]);
        let mut link = UartLink::new(serial);
        assert_eq!(link.read_ready(), Err(UartError(ErrorKind::Overrun)));
        link.release().done();
    }
}

//! Topics and payloads in the gateway's contract (`DESIGN.md`, "Topics"), written into fixed
//! buffers without allocation or floating point.
//!
//! Values are fixed-point thousandths (`21_535` is `21.535`), as sensor drivers deliver them;
//! they are written as the shortest exact decimal (`21.535`, `21.5`, `-0.25`, `40`). This module
//! only formats; what to send and when is decided elsewhere, and formatting happens on the
//! network path, never while sampling.

/// Why a topic or payload could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The buffer is too small for it.
    Overflow,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Overflow => f.write_str("buffer too small for the topic or payload"),
        }
    }
}

/// Presence payload while connected.
pub const ONLINE: &[u8] = b"online";
/// Presence payload of the last will.
pub const OFFLINE: &[u8] = b"offline";

/// Appends to a byte slice, failing instead of truncating.
pub struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Writer<'a> {
    /// A writer at the start of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, len: 0 }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `bytes`.
    pub fn bytes(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let end = self.len.checked_add(bytes.len()).ok_or(Error::Overflow)?;
        self.buf
            .get_mut(self.len..end)
            .ok_or(Error::Overflow)?
            .copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }

    /// Appends `s`.
    pub fn str(&mut self, s: &str) -> Result<(), Error> {
        self.bytes(s.as_bytes())
    }

    /// Appends `milli / 1000` as the shortest exact decimal.
    pub fn milli(&mut self, milli: i32) -> Result<(), Error> {
        let mut digits = [0u8; 16];
        let n = format_milli(milli, &mut digits);
        self.bytes(&digits[..n])
    }

    /// Appends an unsigned integer.
    pub fn uint(&mut self, mut v: u64) -> Result<(), Error> {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.bytes(&digits[i..])
    }
}

/// Writes `milli / 1000` into `out` (at least 13 bytes) and returns the length.
fn format_milli(milli: i32, out: &mut [u8; 16]) -> usize {
    let negative = milli < 0;
    let abs = milli.unsigned_abs();
    let (int, mut frac) = (abs / 1000, abs % 1000);
    let mut n = 0;
    if negative {
        out[n] = b'-';
        n += 1;
    }
    let mut int_digits = [0u8; 10];
    let mut i = int_digits.len();
    let mut v = int;
    loop {
        i -= 1;
        int_digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &d in &int_digits[i..] {
        out[n] = d;
        n += 1;
    }
    if frac != 0 {
        out[n] = b'.';
        n += 1;
        let mut place = 100;
        while frac != 0 {
            out[n] = b'0' + (frac / place) as u8;
            n += 1;
            frac %= place;
            place /= 10;
        }
    }
    n
}

/// Parses a decimal such as `95.2`, `-3` or `21.535` into thousandths. Digits past the third
/// decimal are ignored; anything else that is not a plain decimal, or that overflows, is `None`.
pub fn parse_milli(text: &str) -> Option<i32> {
    let text = text.trim();
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, f),
        None => (body, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    let mut value: i64 = 0;
    for c in int.bytes() {
        if !c.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_add(i64::from(c - b'0'))?;
        if value > i64::from(i32::MAX) {
            return None;
        }
    }
    value *= 1000;
    let mut place = 100;
    for c in frac.bytes() {
        if !c.is_ascii_digit() {
            return None;
        }
        value += i64::from(c - b'0') * place;
        place /= 10;
    }
    let value = if negative { -value } else { value };
    i32::try_from(value).ok()
}

/// Whether `name` can be a device id or a metric name: 1 to 32 bytes of ASCII letters, digits,
/// `-`, `_` or `.`, so it is one topic level and a JSON key without escaping. `seq` and
/// `status` are reserved by the contract and refused as metric names (see [`metric_name_ok`]).
pub fn name_ok(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Whether `name` can be a metric: [`name_ok`] and neither `seq` nor `status`.
pub fn metric_name_ok(name: &str) -> bool {
    name_ok(name) && name != "seq" && name != "status"
}

/// `sensors/{device}/{metric}`.
pub fn metric_topic(out: &mut Writer<'_>, device: &str, metric: &str) -> Result<(), Error> {
    device_topic(out, device)?;
    out.str("/")?;
    out.str(metric)
}

/// `sensors/{device}`.
pub fn device_topic(out: &mut Writer<'_>, device: &str) -> Result<(), Error> {
    out.str(crate::TOPIC_ROOT)?;
    out.str("/")?;
    out.str(device)
}

/// `sensors/{device}/status`.
pub fn status_topic(out: &mut Writer<'_>, device: &str) -> Result<(), Error> {
    metric_topic(out, device, "status")
}

/// `{"v":21.5,"seq":1042}`, for one metric on its own topic.
pub fn single(out: &mut Writer<'_>, milli: i32, seq: u32) -> Result<(), Error> {
    out.str("{\"v\":")?;
    out.milli(milli)?;
    out.str(",\"seq\":")?;
    out.uint(u64::from(seq))?;
    out.str("}")
}

/// `{"temperature":21.5,"humidity":40.1,"seq":1042}`, for several metrics on the device topic.
pub fn object<'n>(
    out: &mut Writer<'_>,
    values: impl IntoIterator<Item = (&'n str, i32)>,
    seq: u32,
) -> Result<(), Error> {
    out.str("{")?;
    for (name, milli) in values {
        out.str("\"")?;
        out.str(name)?;
        out.str("\":")?;
        out.milli(milli)?;
        out.str(",")?;
    }
    out.str("\"seq\":")?;
    out.uint(u64::from(seq))?;
    out.str("}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn milli(v: i32) -> std::string::String {
        let mut buf = [0u8; 16];
        let n = format_milli(v, &mut buf);
        std::str::from_utf8(&buf[..n]).unwrap().into()
    }

    #[test]
    fn milli_is_written_as_the_shortest_exact_decimal() {
        let cases = [
            (0, "0"),
            (21_500, "21.5"),
            (21_535, "21.535"),
            (21_050, "21.05"),
            (40_000, "40"),
            (-250, "-0.25"),
            (-45_000, "-45"),
            (1, "0.001"),
            (i32::MAX, "2147483.647"),
            (i32::MIN, "-2147483.648"),
        ];
        for (v, want) in cases {
            assert_eq!(milli(v), want);
            assert_eq!(parse_milli(want), Some(v), "{want} parses back");
        }
    }

    #[test]
    fn parse_milli_accepts_plain_decimals_only() {
        assert_eq!(parse_milli(" 95.2\r"), Some(95_200));
        assert_eq!(parse_milli("-3"), Some(-3_000));
        assert_eq!(parse_milli(".5"), Some(500));
        assert_eq!(parse_milli("1.23456"), Some(1_234));
        for bad in [
            "",
            "-",
            ".",
            "abc",
            "1.2.3",
            "1e3",
            "99999999999",
            "2147484",
            "+1",
        ] {
            assert_eq!(parse_milli(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn payload_forms() {
        let mut buf = [0u8; 96];
        let mut w = Writer::new(&mut buf);
        single(&mut w, 21_500, 1042).unwrap();
        let n = w.len();
        assert_eq!(&buf[..n], br#"{"v":21.5,"seq":1042}"#);

        let mut w = Writer::new(&mut buf);
        object(&mut w, [("temperature", 21_500), ("humidity", 40_100)], 7).unwrap();
        let n = w.len();
        assert_eq!(
            &buf[..n],
            br#"{"temperature":21.5,"humidity":40.1,"seq":7}"#
        );

        let mut w = Writer::new(&mut buf);
        metric_topic(&mut w, "boiler-1", "temperature").unwrap();
        let n = w.len();
        assert_eq!(&buf[..n], b"sensors/boiler-1/temperature");
    }

    #[test]
    fn a_full_buffer_is_an_error_not_a_truncation() {
        let mut buf = [0u8; 10];
        let mut w = Writer::new(&mut buf);
        assert_eq!(single(&mut w, 21_500, 1042), Err(Error::Overflow));
        assert!(w.len() <= 10);
    }

    #[test]
    fn names() {
        assert!(name_ok("boiler-1") && name_ok("a.b_c"));
        for bad in ["", "a/b", "a+", "#", "a b", "é", "\"", &"x".repeat(33)] {
            assert!(!name_ok(bad), "{bad:?}");
        }
        assert!(!metric_name_ok("seq") && !metric_name_ok("status"));
        assert!(metric_name_ok("temperature"));
    }
}

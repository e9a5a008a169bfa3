//! Topics and payloads in the gateway's contract (`DESIGN.md`, "Topics"), written into fixed
//! buffers without allocation or floating point.
//!
//! A reading's value is a number or a state. Numbers are fixed-point thousandths (`21_535` is
//! `21.535`), as sensor drivers deliver them; they are written as the shortest exact decimal
//! (`21.535`, `21.5`, `-0.25`, `40`). States ([`State`]) are booleans or short words (`open`,
//! `heat`), written only when the gateway reads them back exactly as written: a word that it
//! would read as a number, a boolean or a different word is an error here, not a surprise there.
//! This module only formats; what to send and when is decided elsewhere, and formatting happens
//! on the network path, never while sampling.

/// Why a topic or payload could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The buffer is too small for it.
    Overflow,
    /// A state word is empty.
    StateEmpty,
    /// A state word is longer than [`MAX_STATE_LEN`] bytes.
    StateTooLong,
    /// A state word holds `"`, `\` or a control character: JSON would need an escape for it (or
    /// the gateway refuses it), and this encoder writes none.
    StateNeedsEscaping,
    /// The gateway would read the state word as a number (`1`, `-2.5`, `1e3`), as NaN or an
    /// infinity, or as a boolean (`true`, `False`): send a number or [`State::Bool`] instead.
    StateReadsAsValue,
    /// The gateway would not read the state word back as written: white space at either end
    /// (trimmed), a leading `{` or `[` (taken for JSON), or one of its own words
    /// ([`GATEWAY_WORDS`]) in other than lower case (`OPEN` reads as `open`).
    StateNotAsWritten,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Error::Overflow => "buffer too small for the topic or payload",
            Error::StateEmpty => "a state word is empty",
            Error::StateTooLong => "a state word is at most 64 bytes",
            Error::StateNeedsEscaping => "a state word must not hold \", \\ or control characters",
            Error::StateReadsAsValue => {
                "the gateway reads this state word as a number or a boolean; send that instead"
            }
            Error::StateNotAsWritten => {
                "the gateway reads this state word differently: no white space at either end, \
                 no leading { or [, and on/off/open/closed/online/offline in lower case"
            }
        })
    }
}

/// Longest state word, in bytes: the gateway's limit (`watchpost::value::MAX_STATE_LEN`).
pub const MAX_STATE_LEN: usize = 64;

/// Words the gateway reads in any case and turns into lower case
/// (`watchpost::value::DEFAULT_WORDS`). A state word must spell them in lower case.
pub const GATEWAY_WORDS: [&str; 6] = ["on", "off", "open", "closed", "online", "offline"];

/// The value of a state reading: a boolean (a leak probe, a switch) or a short word (a door's
/// `open`, a thermostat's `heat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State<'a> {
    /// Written as JSON `true` / `false`; the gateway reads a boolean.
    Bool(bool),
    /// Written as a JSON string; the gateway reads that text. Must pass [`State::check`]: 1 to
    /// [`MAX_STATE_LEN`] bytes, no `"`, `\` or control characters, no white space at either end,
    /// no leading `{` or `[`, not a number or a boolean, and [`GATEWAY_WORDS`] in lower case.
    Word(&'a str),
}

impl State<'_> {
    /// Whether the gateway reads this state back exactly as written; the error says why not.
    /// Cheap enough for the network path, but meant to be called once, where the words are
    /// chosen (a board's configuration), as [`name_ok`] is for names.
    pub fn check(&self) -> Result<(), Error> {
        match self {
            State::Bool(_) => Ok(()),
            State::Word(word) => check_word(word),
        }
    }
}

fn check_word(word: &str) -> Result<(), Error> {
    if word.is_empty() {
        return Err(Error::StateEmpty);
    }
    if word.len() > MAX_STATE_LEN {
        return Err(Error::StateTooLong);
    }
    if word
        .chars()
        .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        return Err(Error::StateNeedsEscaping);
    }
    if spells_number(word)
        || word.eq_ignore_ascii_case("true")
        || word.eq_ignore_ascii_case("false")
    {
        return Err(Error::StateReadsAsValue);
    }
    // The gateway trims Unicode white space (`str::trim`, which is `char::is_whitespace`).
    let padded = word.starts_with(char::is_whitespace) || word.ends_with(char::is_whitespace);
    let non_canonical = GATEWAY_WORDS
        .iter()
        .any(|w| word != *w && word.eq_ignore_ascii_case(w));
    if padded || word.starts_with(['{', '[']) || non_canonical {
        return Err(Error::StateNotAsWritten);
    }
    Ok(())
}

/// Whether the gateway reads `word` as a number, or refuses it as NaN or an infinity. Its parser
/// is Rust's `f64::from_str`, tried on text that starts with a digit, `+`, `-` or `.`; this is
/// that grammar (`[+-]?` then `inf`, `infinity` or `nan` in any case, or
/// `(digits[.digits?] | .digits)([eE][+-]?digits)?`), without parsing a float.
fn spells_number(word: &str) -> bool {
    let body = word.strip_prefix(['+', '-']).unwrap_or(word);
    if ["inf", "infinity", "nan"]
        .iter()
        .any(|w| body.eq_ignore_ascii_case(w))
    {
        return true;
    }
    let b = body.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    let mut mantissa = digits(&mut i);
    if b.get(i) == Some(&b'.') {
        i += 1;
        mantissa += digits(&mut i);
    }
    if mantissa == 0 {
        return false;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
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

    /// Appends `state` as a JSON value: `true`, `false` or `"open"`. Fails, before writing
    /// anything, when [`State::check`] does.
    pub fn state(&mut self, state: State<'_>) -> Result<(), Error> {
        state.check()?;
        self.checked_state(state)
    }

    /// Appends a state that passed [`State::check`].
    fn checked_state(&mut self, state: State<'_>) -> Result<(), Error> {
        match state {
            State::Bool(true) => self.str("true"),
            State::Bool(false) => self.str("false"),
            State::Word(word) => {
                self.str("\"")?;
                self.str(word)?;
                self.str("\"")
            }
        }
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

/// `{"v":true,"seq":7}` or `{"v":"open","seq":1043}`, for one state reading on its metric's
/// topic. Fails, before writing anything, when [`State::check`] does.
pub fn single_state(out: &mut Writer<'_>, state: State<'_>, seq: u32) -> Result<(), Error> {
    state.check()?;
    out.str("{\"v\":")?;
    out.checked_state(state)?;
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

    fn state(state: State<'_>, seq: u32) -> Result<std::string::String, Error> {
        let mut buf = [0u8; 96];
        let mut w = Writer::new(&mut buf);
        let result = single_state(&mut w, state, seq);
        let n = w.len();
        match result {
            Ok(()) => Ok(std::str::from_utf8(&buf[..n]).unwrap().into()),
            Err(e) => {
                assert_eq!(n, 0, "nothing is written when a state is refused");
                Err(e)
            }
        }
    }

    #[test]
    fn state_payloads() {
        let long = "x".repeat(MAX_STATE_LEN);
        let cases = [
            (State::Bool(true), 7, r#"{"v":true,"seq":7}"#.to_owned()),
            (State::Bool(false), 0, r#"{"v":false,"seq":0}"#.to_owned()),
            (
                State::Word("open"),
                1043,
                r#"{"v":"open","seq":1043}"#.to_owned(),
            ),
            (
                State::Word("Single Click"),
                u32::MAX,
                r#"{"v":"Single Click","seq":4294967295}"#.to_owned(),
            ),
            (
                State::Word("Über-heiß"),
                1,
                r#"{"v":"Über-heiß","seq":1}"#.to_owned(),
            ),
            (
                State::Word(&long),
                2,
                format!(r#"{{"v":"{long}","seq":2}}"#),
            ),
        ];
        for (s, seq, want) in cases {
            assert_eq!(state(s, seq), Ok(want), "{s:?}");
        }
    }

    #[test]
    fn state_words_the_gateway_would_read_otherwise_are_refused() {
        let long = "x".repeat(MAX_STATE_LEN + 1);
        let cases: &[(&str, Error)] = &[
            ("", Error::StateEmpty),
            (&long, Error::StateTooLong),
            ("say \"hi\"", Error::StateNeedsEscaping),
            ("a\\b", Error::StateNeedsEscaping),
            ("line\nbreak", Error::StateNeedsEscaping),
            ("tab\t", Error::StateNeedsEscaping),
            ("del\u{7f}", Error::StateNeedsEscaping),
            ("c1\u{85}", Error::StateNeedsEscaping),
            ("0", Error::StateReadsAsValue),
            ("-3", Error::StateReadsAsValue),
            ("+.5", Error::StateReadsAsValue),
            ("1.", Error::StateReadsAsValue),
            ("1e3", Error::StateReadsAsValue),
            ("2.5E-7", Error::StateReadsAsValue),
            ("1e999", Error::StateReadsAsValue),
            ("NaN", Error::StateReadsAsValue),
            ("-inf", Error::StateReadsAsValue),
            ("Infinity", Error::StateReadsAsValue),
            ("true", Error::StateReadsAsValue),
            ("FALSE", Error::StateReadsAsValue),
            (" open", Error::StateNotAsWritten),
            ("open ", Error::StateNotAsWritten),
            ("heat\u{a0}", Error::StateNotAsWritten),
            ("{x", Error::StateNotAsWritten),
            ("[1]", Error::StateNotAsWritten),
            ("OPEN", Error::StateNotAsWritten),
            ("Closed", Error::StateNotAsWritten),
            ("oN", Error::StateNotAsWritten),
        ];
        for (word, error) in cases {
            assert_eq!(state(State::Word(word), 1), Err(*error), "{word:?}");
            assert_eq!(State::Word(word).check(), Err(*error), "{word:?}");
        }
    }

    #[test]
    fn state_words_that_only_look_like_numbers_are_words() {
        for word in [
            "-", "+", ".", "e5", "1e", "1e+", "1.2.3", "1st", "-x", "0x10", "1_000", "inf1",
            "nano", "on", "open", "offline", "heat", "x]", "a{b}", "don't",
        ] {
            assert_eq!(State::Word(word).check(), Ok(()), "{word:?}");
        }
    }

    #[test]
    fn a_state_that_does_not_fit_is_an_overflow() {
        let mut buf = [0u8; 12];
        let mut w = Writer::new(&mut buf);
        assert_eq!(
            single_state(&mut w, State::Word("closed"), 1),
            Err(Error::Overflow)
        );
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

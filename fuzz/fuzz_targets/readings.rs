//! `readings`: any text through `test-rules`' parsers (`replay::parse_readings`, then a replay
//! of what it accepts through every rule kind, and `replay::parse_expected`), checked against
//! the properties in `gateway/tests/properties/check.rs`.
#![no_main]

#[path = "../../gateway/tests/properties/check.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check::readings(&text);
    check::expected(&text);
});

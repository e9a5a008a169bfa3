//! `config`: any text through `config::parse`, checked against the properties in
//! `gateway/tests/properties/check.rs` (positions, soundness of what it accepts, layout edits).
#![no_main]

#[path = "../../gateway/tests/properties/check.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // A configuration file is text (`config::load` refuses other bytes before parsing).
    check::config(&String::from_utf8_lossy(data));
});

//! `sources`: one MQTT message (topic on the first line, payload after it) through every source of the test fleet (`Source::decode`), checked
//! against the properties in `gateway/tests/properties/check.rs`.
#![no_main]

#[path = "../../gateway/tests/properties/check.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some((topic, payload)) = check::split_message(data) {
        check::sources(topic, payload);
    }
});

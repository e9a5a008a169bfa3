//! `codec`: one MQTT message (topic on the first line, payload after it) through `codec::decode`, checked
//! against the properties in `gateway/tests/properties/check.rs`.
#![no_main]

#[path = "../../gateway/tests/properties/check.rs"]
mod check;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some((topic, payload)) = check::split_message(data) {
        check::codec(topic, payload);
    }
});

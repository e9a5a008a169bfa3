//! `packet`: a byte stream through the broker's MQTT codec (`broker::packet::decode`,
//! `encode`, `connect_level`), checked by `broker::front_check::packet`: nothing consumed
//! on "more bytes", the same packets whether the bytes arrive at once or in pieces, every
//! packet re-encoded to `encoded_len` bytes that decode to it again, failure codes on errors.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    watchpost::broker::front_check::packet(data);
});

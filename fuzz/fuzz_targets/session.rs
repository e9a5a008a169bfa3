//! `session`: one client's MQTT session (`broker::session`) driven by a CONNECT and the
//! client's packets, with a real hub and gate, checked by `broker::front_check::session`:
//! every packet for the client reads back at its version and fits its limits, every packet is
//! answered as MQTT says, nothing invalid or not the client's to publish is passed on.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    watchpost::broker::front_check::session(data);
});

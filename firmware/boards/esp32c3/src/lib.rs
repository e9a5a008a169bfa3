//! Watchpost on the ESP32-C3: the parts of the board that are not the main loop.
//!
//! | module | one job |
//! |---|---|
//! | [`config`] | build-time settings from `WATCHPOST_*` variables, checked at compile time |
//! | [`wifi`] | keep the station associated, with backoff |
//! | [`net`] | smoltcp over the station: DHCP, and the TCP socket that is the MQTT [`Link`](watchpost_firmware::mqtt::Link) |
#![no_std]

pub mod config;
pub mod net;
pub mod wifi;

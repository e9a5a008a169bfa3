//! Watchpost sensor firmware: the `no_std` core that sensor boards build on.
//!
//! This crate is a skeleton for now. It will hold what every board shares: sensor drivers
//! behind embedded-hal 1.0, report-by-exception (deadband, minimum interval, heartbeat),
//! the device's `seq` counter, the payload encoder and the MQTT session over a byte stream.
//! Boards live in packages of their own under `firmware/boards/`.
#![no_std]
#![deny(unsafe_code)]

/// First topic level under which a device publishes its readings
/// (`sensors/{device}/{metric}`); the gateway's decoder expects the same.
pub const TOPIC_ROOT: &str = "sensors";

//! Watchpost sensor firmware: the `no_std`, allocation-free core that every sensor board and
//! the fleet simulator build on.
//!
//! # Layout
//!
//! | module | one job |
//! |---|---|
//! | [`report`] | report by exception: delta, minimum interval, heartbeat; pure, time passed in |
//! | [`ring`] | fixed-capacity FIFO that drops (and counts) the oldest item when full |
//! | [`payload`] | topics and payloads of the gateway's contract, into fixed buffers |
//! | [`mqtt`] | MQTT 3.1.1 session over any `embedded-io` byte stream: QoS 1, keep-alive, reconnect |
//! | [`sensor`] | sensors behind embedded-hal 1.0; SHT4x glue |
//! | [`input`] | digital inputs (leak probes, contacts) as states: debounced, reported on change and heartbeat |
//! | [`gateways`] | a list of gateway addresses, tried in turn after a failed connect or a lost session |
//! | [`serial`] | a UART (embedded-hal-nb) as a link: for modems in transparent mode |
//! | [`node`] | one device: samples → report by exception → `seq` → ring → session |
//!
//! A board supplies a clock (milliseconds), a [`sensor::Sensor`] and an [`mqtt::Link`] (a UART
//! to a modem, a TCP socket, QEMU's serial port), and calls [`node::Node::sample`] and
//! [`node::Node::poll`] from its main loop. Boards live in packages of their own under
//! `firmware/boards/`; the simulator is `firmware/sim`.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod gateways;
pub mod input;
pub mod mqtt;
pub mod node;
pub mod payload;
pub mod report;
pub mod ring;
pub mod sensor;
pub mod serial;

/// First topic level under which a device publishes its readings
/// (`sensors/{device}/{metric}`); the gateway's decoder expects the same.
pub const TOPIC_ROOT: &str = "sensors";

//! Watchpost: an MQTT edge gateway for IoT sensor fleets.
//!
//! Sensors publish readings to the embedded broker; the gateway judges every reading against
//! the operator's rules, publishes alert transitions as retained messages on `alerts/...`,
//! records them in SQLite, and forwards the ones that matter to an upstream broker.
//!
//! # Layout
//!
//! The pipeline, in the order a reading travels it:
//!
//! | module | one job |
//! |---|---|
//! | [`config`] | raw serde structs, then `compile()` into a checked [`config::Config`] plus warnings, with file:line:column diagnostics |
//! | [`broker`] | rumqttd's router plus Watchpost's own listeners and client connections; hands ingest its in-process link |
//! | [`codec`] | pure bytes → readings; no I/O |
//! | [`topic`] | MQTT topic filter syntax and matching |
//! | [`rules`] | pure rule evaluation: (rule, state, input, now) → (state, transition) |
//! | [`alert`] | the alert document and its topic |
//! | [`stats`] | counters every part updates |
//! | [`shutdown`] | one trigger that every task waits on |
#![deny(missing_docs)]

pub mod alert;
pub mod broker;
pub mod codec;
pub mod config;
pub mod rules;
pub mod shutdown;
pub mod stats;
pub mod topic;

pub use config::Config;

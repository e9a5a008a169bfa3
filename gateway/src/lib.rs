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
//! | [`codec`] | pure bytes → readings; no I/O |
//! | [`topic`] | MQTT topic filter syntax and matching |
//! | [`rules`] | pure rule evaluation: (rule, state, input, now) → (state, transition) |
//! | [`alert`] | the alert document and its topic |
#![deny(missing_docs)]

pub mod alert;
pub mod codec;
pub mod config;
pub mod rules;
pub mod topic;

pub use config::Config;

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
//! | [`access`] | identities (credentials file, client certificates, anonymous) and what each may publish and subscribe to |
//! | [`broker`] | the embedded MQTT 3.1.1 and 5 broker: codec, per-client sessions, the router, listeners; hands ingest every client's publishes in batches |
//! | [`value`] | a reading's value, a number or a state; how text becomes one; value maps |
//! | [`codec`] | pure bytes → readings; no I/O |
//! | [`sources`] | foreign topic layouts (Tasmota, ESPHome, Shelly, ...) mapped onto readings by configuration |
//! | [`topic`] | MQTT topic filter syntax and matching |
//! | [`loss`] | pure loss accounting from each device's `seq`: gaps, duplicates, late arrivals |
//! | [`clock`] | the wall clock for timestamps, the monotonic clock for durations, both in one [`clock::Stamp`]; logs steps of the wall clock |
//! | [`rules`] | pure rule evaluation: (rule, state, input, now) → (state, transition) |
//! | [`aggregate`] | windowed rollups and site summaries as state machines with time passed in |
//! | [`ingest`] | the task that takes the broker's batches and drives codec → loss → rules and rollups → outputs |
//! | [`alert`] | the alert document and its topic |
//! | [`store`] | the one owner of the SQLite connection: migrations, batched writes, history within a disk budget, the outbox |
//! | [`uplink`] | the upstream client task: drains the outbox with QoS 1, deletes a row only after its PUBACK, backoff with jitter; TLS and login |
//! | [`pem`] | certificates and keys from PEM files, with errors that never quote a key |
//! | [`stats`] | counters every part updates |
//! | [`homeassistant`] | Home Assistant MQTT discovery: alert rules per device as binary sensors, the gateway's health as sensors |
//! | [`metrics`], [`http`] | the counters as Prometheus text and a status summary; the loopback HTTP endpoint (`/metrics`, `/healthz`, `/readyz`, `/status`) |
//! | [`query`] | tables and JSON for the query commands (`alerts`, `history`, `devices`) |
//! | [`replay`] | `test-rules`: recorded readings through the same engine under virtual time, compared with expected alerts |
//! | [`app`], [`shutdown`] | wiring, start-up and graceful shutdown |
#![deny(missing_docs)]

pub mod access;
pub mod acl;
pub mod aggregate;
pub mod alert;
pub mod app;
pub mod broker;
pub mod clock;
pub mod codec;
pub mod config;
pub mod events;
pub mod homeassistant;
pub mod http;
pub mod ingest;
pub mod loss;
pub mod metrics;
pub mod page;
pub mod peer;
pub mod pem;
pub mod query;
pub mod replay;
pub mod rules;
pub mod shutdown;
pub mod sources;
pub mod stats;
pub mod store;
pub mod topic;
pub mod uplink;
pub mod value;

pub use app::{Gateway, StartError, run, start};
pub use config::Config;

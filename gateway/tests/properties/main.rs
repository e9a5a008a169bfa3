//! Property tests of the hostile-input surface: the native payload decoder (`codec`), foreign
//! payloads (`sources`), the configuration parser and checker (`config`), the readings and
//! expected-alert parsers of `test-rules` (`replay`), and the broker's packet front: the MQTT
//! codec and one client's session (`front`).
//!
//! Each target is fed its committed seed corpus (`tests/corpus/<target>/`), mutations of it,
//! and structured generators; the properties themselves live in `check.rs`, which the
//! coverage-guided fuzz targets in `fuzz/` share. Case counts are small so that CI stays
//! quick; `PROPTEST_CASES=100000 cargo test -p watchpost --test properties --release` runs
//! every property that much longer.

mod check;
mod codec;
mod config;
mod corpus;
mod front;
mod readings;
mod sources;

//! Puts memory.x where the linker looks, and rebuilds when it or the device settings change.

use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("memory.x"), include_bytes!("memory.x")).expect("write memory.x");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rerun-if-changed=build.rs");
    for var in [
        "WATCHPOST_DEVICE_ID",
        "WATCHPOST_MQTT_USER",
        "WATCHPOST_MQTT_PASSWORD",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
}

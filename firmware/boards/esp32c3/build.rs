//! Rebuilds when a build-time setting changes (they are read with `option_env!` in src/config.rs).
//! The linker script, esp-hal's `linkall.x`, is named in .cargo/config.toml.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for var in [
        "WATCHPOST_WIFI_SSID",
        "WATCHPOST_WIFI_PASSWORD",
        "WATCHPOST_DEVICE_ID",
        "WATCHPOST_MQTT_USER",
        "WATCHPOST_MQTT_PASSWORD",
        "WATCHPOST_GATEWAYS",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
}

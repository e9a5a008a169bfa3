//! Every configuration shipped in `config/` compiles, and the binary embeds the quickstart one.

use std::path::Path;

use watchpost::config;

#[test]
fn every_file_in_config_compiles_without_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(e) = config::load(&path) {
                panic!("{} does not compile:\n{e}", path.display());
            }
            checked += 1;
        }
    }
    assert!(checked >= 1, "no configuration found in {}", dir.display());
}

#[test]
fn the_embedded_quickstart_is_config_watchpost_toml() {
    let on_disk = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/watchpost.toml"),
    )
    .unwrap();
    assert_eq!(config::QUICKSTART, on_disk);
    let loaded = config::quickstart().unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert!(loaded.config.broker.allow_anonymous && loaded.config.broker.listen.ip().is_loopback());
}

//! Every configuration shipped in `config/` and `deploy/` compiles, the binary embeds the
//! quickstart one, the one the package installs fits the systemd unit, and the interop one
//! gives the Paho suite what it expects.

use std::path::{Path, PathBuf};

use watchpost::config;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn every_file_in_config_and_deploy_compiles_without_errors() {
    for dir in ["config", "config/examples", "deploy"] {
        let dir = repo().join(dir);
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
}

/// `deploy/watchpost.toml` becomes /etc/watchpost/watchpost.toml, which the unit runs with its
/// database in the unit's `StateDirectory=`, serving sensors on the network.
#[test]
fn the_packaged_config_fits_the_systemd_unit() {
    let unit = std::fs::read_to_string(repo().join("deploy/watchpost.service")).unwrap();
    for line in [
        "ExecStart=/usr/bin/watchpost run --config /etc/watchpost/watchpost.toml",
        "StateDirectory=watchpost",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    let loaded = config::load(&repo().join("deploy/watchpost.toml")).unwrap();
    assert_eq!(
        loaded.config.gateway.data_dir,
        Path::new("/var/lib/watchpost")
    );
    assert_eq!(loaded.config.broker.listen, "0.0.0.0:1883".parse().unwrap());
    // On the network, every client has credentials of its own.
    assert!(!loaded.config.broker.allow_anonymous);
    assert_eq!(
        loaded.config.broker.credentials,
        Path::new("/var/lib/watchpost/credentials.toml")
    );
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

/// `config/examples/interop.toml` is what the Paho interoperability suite runs against
/// (`tests/paho.sh`, which reads the port from it): what the suite expects of the broker.
#[test]
fn the_interop_config_fits_the_paho_suite() {
    let loaded = config::load(&repo().join("config/examples/interop.toml")).unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let broker = &loaded.config.broker;
    // A fixed port for the suite to be pointed at, on loopback, and not a usual broker's.
    assert!(broker.listen.ip().is_loopback(), "{}", broker.listen);
    assert!(
        ![0, 1883].contains(&broker.listen.port()),
        "{}",
        broker.listen
    );
    assert!(broker.allow_anonymous);
    assert_eq!(
        broker.max_keep_alive,
        Some(std::time::Duration::from_secs(60))
    );
    assert_eq!(broker.refuse_subscriptions, ["test/nosubscribe"]);
    assert!(
        loaded.config.gateway.data_dir.is_relative(),
        "the runner's working directory holds the data"
    );
}

#[test]
fn the_embedded_quickstart_is_config_watchpost_toml() {
    let on_disk = std::fs::read_to_string(repo().join("config/watchpost.toml")).unwrap();
    assert_eq!(config::QUICKSTART, on_disk);
    let loaded = config::quickstart().unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    assert!(loaded.config.broker.allow_anonymous && loaded.config.broker.listen.ip().is_loopback());
}

/// `config/examples/site-pair-a.toml` and `-b.toml` (README: "Two gateways at one site") are
/// two halves of one pair on one machine: one site, and each names the other where it listens.
#[test]
fn the_site_pair_examples_name_each_other() {
    let load = |name: &str| {
        config::load(&repo().join("config/examples").join(name))
            .unwrap()
            .config
    };
    let (a, b) = (load("site-pair-a.toml"), load("site-pair-b.toml"));
    assert_eq!(a.gateway.site, b.gateway.site);
    assert_ne!(a.gateway.id, b.gateway.id);
    assert_ne!(a.gateway.data_dir, b.gateway.data_dir);
    assert_ne!(a.http.listen, b.http.listen);
    let (pa, pb) = (a.peer.unwrap(), b.peer.unwrap());
    assert_eq!((pa.name, pa.address), (b.gateway.id, b.broker.listen));
    assert_eq!((pb.name, pb.address), (a.gateway.id, a.broker.listen));
    assert_eq!(pa.secret_file, pb.secret_file);
}

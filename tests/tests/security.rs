//! Nobody gets in where they do not belong: real clients against a gateway that requires
//! credentials, a TLS listener with a silent client holding a socket, and client certificates.

use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::{ConnectReturnCode, QoS, SubscribeReasonCode};
use watchpost::access::{Credentials, Role};
use watchpost::config;
use watchpost::stats::Stats;
use watchpost_e2e::clients::{self, Answer, Seen, Watched};
use watchpost_e2e::pki::Pki;
use watchpost_e2e::{OVERHEAT, wait_until};

const LONG: Duration = Duration::from_secs(10);

/// Writes a credentials file with devices `a`, `b` and operator `ops`; returns their secrets.
fn credentials(path: &Path) -> (String, String, String) {
    let mut c = Credentials::default();
    let a = c.add("a", Role::Device).unwrap();
    let b = c.add("b", Role::Device).unwrap();
    let ops = c.add("ops", Role::Operator).unwrap();
    c.save(path).unwrap();
    (a, b, ops)
}

fn gateway_config(data: &Path, broker: &str) -> config::Config {
    let source = format!(
        "[gateway]\nid = \"sec\"\ndata_dir = {:?}\n[broker]\nlisten = \"127.0.0.1:0\"\nallow_anonymous = false\n{broker}\n[http]\nlisten = \"off\"\n{OVERHEAT}",
        data.display().to_string()
    );
    match config::parse(&source, "security.toml") {
        Ok(l) => l.config,
        Err(e) => panic!("{e}\n{source}"),
    }
}

#[tokio::test]
async fn devices_publish_only_as_themselves_and_removed_ones_stay_out() {
    let dir = tempfile::tempdir().unwrap();
    let creds_path = dir.path().join("credentials.toml");
    let (a_secret, _b_secret, ops_secret) = credentials(&creds_path);
    let config = gateway_config(
        dir.path(),
        &format!("credentials = {:?}", creds_path.display().to_string()),
    );
    let gateway = watchpost::start(config).await.unwrap();
    let addr = gateway.mqtt_addr();
    let stats = gateway.stats().clone();

    // Who may not come in.
    let refusals = [
        (
            clients::options(addr, "anon", None),
            ConnectReturnCode::NotAuthorized,
        ),
        (
            clients::options(addr, "a", Some(("a", "wrong"))),
            ConnectReturnCode::BadUserNamePassword,
        ),
        (
            clients::options(addr, "x", Some(("x", &a_secret))),
            ConnectReturnCode::BadUserNamePassword,
        ),
        // The right secret, but another device's client id: it would take over b's session.
        (
            clients::options(addr, "b", Some(("a", &a_secret))),
            ConnectReturnCode::NotAuthorized,
        ),
    ];
    for (options, expected) in refusals {
        let answer = clients::connect(options).await.unwrap();
        assert_eq!(answer.refused(), Some(expected), "{answer:?}");
    }
    assert_eq!(Stats::get(&stats.auth_failures), 4);

    // The operator watches every alert.
    let ops = Watched::subscribed(
        clients::options(addr, "ops", Some(("ops", &ops_secret))),
        "alerts/#",
    )
    .await
    .unwrap();

    // Device a tries to be b, to raise an alert itself, and to read b's topics.
    let a = Watched::connect(clients::options(addr, "a", Some(("a", &a_secret))))
        .await
        .unwrap();
    let forged = r#"{"id":"sec:b:overheat:1","rule":"overheat","device":"b","metric":"temperature","severity":"critical","state":"raised","value":99.0}"#;
    a.client
        .publish("sensors/b/temperature", QoS::AtLeastOnce, false, "99")
        .await
        .unwrap();
    a.client
        .publish("alerts/critical/b/overheat", QoS::AtLeastOnce, true, forged)
        .await
        .unwrap();
    a.client
        .publish("sensors/b/temperature", QoS::ExactlyOnce, false, "99")
        .await
        .unwrap();
    a.client
        .subscribe("sensors/b/#", QoS::AtMostOnce)
        .await
        .unwrap();
    // Each refused publish is still acknowledged, so the client does not resend it forever;
    // the QoS 2 one goes through PUBREC and PUBCOMP.
    a.wait_for(LONG, |s| matches!(s, Seen::PubComp(_)))
        .await
        .unwrap();
    a.wait_for(
        LONG,
        |s| matches!(s, Seen::SubAck(c) if c == &[SubscribeReasonCode::Failure]),
    )
    .await
    .unwrap();
    assert_eq!(
        a.seen()
            .iter()
            .filter(|s| matches!(s, Seen::PubAck(_)))
            .count(),
        2,
        "{:?}",
        a.seen()
    );

    // a's own reading goes through: once its alert arrives, everything before it was handled.
    a.client
        .publish("sensors/a/temperature", QoS::AtLeastOnce, false, "95")
        .await
        .unwrap();
    ops.wait_for(
        LONG,
        |s| matches!(s, Seen::Publish(t, _) if t == "alerts/critical/a/overheat"),
    )
    .await
    .unwrap();
    let alerts: Vec<_> = ops
        .seen()
        .into_iter()
        .filter_map(|s| match s {
            Seen::Publish(t, _) => Some(t),
            _ => None,
        })
        .collect();
    assert_eq!(
        alerts,
        ["alerts/critical/a/overheat"],
        "nothing forged reached the operator"
    );
    assert!(
        stats.device("b").is_none(),
        "b has no readings: {:?}",
        stats.device("b")
    );
    let refused = stats.client_refusals();
    let a_refused = refused.get("a").expect("a's refusals are counted");
    assert_eq!(
        (a_refused.publish_denied, a_refused.subscribe_denied),
        (3, 1)
    );

    // Operators watch; they do not publish.
    ops.client
        .publish("sensors/ops/temperature", QoS::AtLeastOnce, false, "99")
        .await
        .unwrap();
    ops.wait_for(LONG, |s| matches!(s, Seen::PubAck(_)))
        .await
        .unwrap();
    assert!(
        wait_until(LONG, || stats
            .client_refusals()
            .get("ops")
            .is_some_and(|c| c.publish_denied == 1))
        .await
    );

    // Removing a closes its connection and keeps it out, without a restart.
    let mut c = Credentials::load(&creds_path).unwrap();
    assert!(c.remove("a"));
    c.save(&creds_path).unwrap();
    let removed_at = Instant::now();
    a.wait_for(LONG, |s| matches!(s, Seen::Error(_)))
        .await
        .unwrap();
    let took = removed_at.elapsed();
    let again = clients::connect(clients::options(addr, "a", Some(("a", &a_secret))))
        .await
        .unwrap();
    assert_eq!(
        again.refused(),
        Some(ConnectReturnCode::BadUserNamePassword),
        "{again:?}"
    );
    eprintln!("a removed device was disconnected {took:?} after its removal");
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_silent_socket_on_the_tls_port_delays_no_one() {
    let pki = Pki::new("Watchpost test CA").unwrap();
    pki.issue("server", "localhost").unwrap();
    let (cert, key) = pki.files("server");
    let dir = tempfile::tempdir().unwrap();
    let creds_path = dir.path().join("credentials.toml");
    let (a_secret, _, _) = credentials(&creds_path);
    let config = gateway_config(
        dir.path(),
        &format!(
            "credentials = {:?}\n[broker.tls]\nlisten = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}",
            creds_path.display().to_string(),
            cert.display().to_string(),
            key.display().to_string()
        ),
    );
    let gateway = watchpost::start(config).await.unwrap();
    let tls_addr = gateway.mqtt_tls_addr().expect("a TLS listener");

    // Sockets that never say a word, opened before the real client.
    let mut silent = Vec::new();
    for _ in 0..5 {
        silent.push(tokio::net::TcpStream::connect(tls_addr).await.unwrap());
    }
    let tls = clients::tls_config(&pki.ca_pem(), None).unwrap();
    let started = Instant::now();
    let answer = clients::connect(clients::over_tls(
        clients::options(tls_addr, "a", Some(("a", &a_secret))),
        tls.clone(),
    ))
    .await
    .unwrap();
    let took = started.elapsed();
    assert!(matches!(answer, Answer::Accepted(..)), "{answer:?}");
    assert!(
        took < Duration::from_secs(1),
        "the TLS client waited {took:?}"
    );
    eprintln!("TLS client connected in {took:?} with 5 silent sockets open");

    // TLS does not replace credentials.
    let anonymous = clients::connect(clients::over_tls(
        clients::options(tls_addr, "anon", None),
        tls,
    ))
    .await
    .unwrap();
    assert_eq!(anonymous.refused(), Some(ConnectReturnCode::NotAuthorized));
    // A client that does not trust the gateway's CA does not get through.
    let other = Pki::new("Some other CA").unwrap();
    let untrusting = clients::tls_config(&other.ca_pem(), None).unwrap();
    let refused = clients::connect(clients::over_tls(
        clients::options(tls_addr, "a", Some(("a", &a_secret))),
        untrusting,
    ))
    .await
    .unwrap();
    assert!(matches!(refused, Answer::Failed(_)), "{refused:?}");
    assert!(wait_until(LONG, || Stats::get(&gateway.stats().tls_failures) >= 1).await);
    drop(silent);
    gateway.shutdown().await;
}

#[tokio::test]
async fn a_client_certificate_names_the_device() {
    let pki = Pki::new("Watchpost test CA").unwrap();
    pki.issue("server", "localhost").unwrap();
    let (pump_cert, pump_key) = pki.issue("pump", "pump-3").unwrap();
    let (cert, key) = pki.files("server");
    let dir = tempfile::tempdir().unwrap();
    let creds_path = dir.path().join("credentials.toml");
    let (_, _, ops_secret) = credentials(&creds_path);
    let config = gateway_config(
        dir.path(),
        &format!(
            "credentials = {:?}\n[broker.tls]\nlisten = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}",
            creds_path.display().to_string(),
            cert.display().to_string(),
            key.display().to_string(),
            pki.ca_file().display().to_string()
        ),
    );
    let gateway = watchpost::start(config).await.unwrap();
    let (tls_addr, addr) = (gateway.mqtt_tls_addr().unwrap(), gateway.mqtt_addr());
    let ops = Watched::subscribed(
        clients::options(addr, "ops", Some(("ops", &ops_secret))),
        "alerts/#",
    )
    .await
    .unwrap();

    // The certificate is the credential: no password, and its name is the device.
    let with_cert = clients::tls_config(&pki.ca_pem(), Some((&pump_cert, &pump_key))).unwrap();
    let pump = Watched::connect(clients::over_tls(
        clients::options(tls_addr, "pump-3", None),
        with_cert.clone(),
    ))
    .await
    .unwrap();
    pump.client
        .publish("sensors/pump-9/temperature", QoS::AtLeastOnce, false, "99")
        .await
        .unwrap();
    pump.client
        .publish("sensors/pump-3/temperature", QoS::AtLeastOnce, false, "99")
        .await
        .unwrap();
    ops.wait_for(
        LONG,
        |s| matches!(s, Seen::Publish(t, _) if t == "alerts/critical/pump-3/overheat"),
    )
    .await
    .unwrap();
    assert!(gateway.stats().device("pump-9").is_none());
    // Another name in the client id than the certificate's is refused.
    let imposter = clients::connect(clients::over_tls(
        clients::options(tls_addr, "pump-9", None),
        with_cert,
    ))
    .await
    .unwrap();
    assert_eq!(imposter.refused(), Some(ConnectReturnCode::NotAuthorized));
    // Without a certificate there is no handshake.
    let without = clients::tls_config(&pki.ca_pem(), None).unwrap();
    let answer = clients::connect(clients::over_tls(
        clients::options(tls_addr, "x", None),
        without,
    ))
    .await
    .unwrap();
    assert!(matches!(answer, Answer::Failed(_)), "{answer:?}");
    gateway.shutdown().await;
}

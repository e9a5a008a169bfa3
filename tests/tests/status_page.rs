//! The status page in a real browser: headless Chromium driven over WebDriver (Debian's
//! `chromium` and `chromium-driver`, which `.ci/run` installs), against a gateway with a
//! Mosquitto upstream. Without chromedriver on the PATH each test says it was skipped.
//!
//! - the page loads with no console error and asks for nothing but the gateway;
//! - a device that publishes appears, its going offline and online shows within a second, and
//!   the filter narrows the list to it; an alert raised while the page is open appears in
//!   "Alerts now" without a reload within 2 s, and leaves it when cleared;
//! - the bandwidth plot shows a saving;
//! - on an address beyond loopback (in a network namespace of the test's own) the page asks
//!   for an operator's login by default.
//!
//! With `WATCHPOST_SCREENSHOT=1` the first test writes `docs/status-page.png` (the README's
//! picture).

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use fantoccini::Locator;
use rumqttc::QoS;
use serde_json::{Value, json};
use watchpost_e2e::browser::{Browser, Cdp, WAIT};
use watchpost_e2e::{Mosquitto, Publisher, gateway_config_with, wait_until};

const RULES: &str = "[[rule]]\nname = \"water-leak\"\nmatch = \"sensors/+/water_leak\"\nequals = true\nseverity = \"critical\"\n\
[[rule]]\nname = \"overheat\"\nmatch = \"sensors/+/temperature\"\nabove = 90.0\nclear_below = 85.0\nseverity = \"critical\"\n";

fn http_addr(gateway: &watchpost::Gateway) -> SocketAddr {
    gateway.http_addr().expect("the HTTP endpoint is on")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_devices_and_follows_alerts_live_without_a_reload() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let upstream = Mosquitto::start().unwrap();
    let data = tempfile::tempdir().unwrap();
    let gateway = watchpost::start(gateway_config_with(
        data.path(),
        Some(upstream.port()),
        "",
        &format!("[history]\nwindow = \"1s\"\n{RULES}"),
    ))
    .await
    .unwrap();
    let origin = format!("http://{}", http_addr(&gateway));
    browser.client().goto(&format!("{origin}/")).await.unwrap();
    browser
        .until(
            "the page read the status",
            "return document.getElementById('gateway').textContent === 'site-test'",
        )
        .await;
    // Set in the page: still there at the end means the page was never reloaded.
    browser.eval("window.stayed = true; return true").await;

    let sensor = Publisher::connect(gateway.mqtt_addr(), "boiler-1")
        .await
        .unwrap();
    for (i, value) in ["21.5", "22.0", "21.8"].iter().enumerate() {
        sensor
            .publish("sensors/boiler-1/temperature", QoS::AtLeastOnce, *value)
            .await
            .unwrap();
        sensor.wait_acked(i as u64 + 1, WAIT).await.unwrap();
    }
    browser
        .until(
            "the device appears",
            "return !!document.querySelector('#devices tr[data-device=\"boiler-1\"]')",
        )
        .await;
    let row = browser
        .eval("return document.querySelector('#devices tr[data-device=\"boiler-1\"]').innerText")
        .await;
    assert!(row.as_str().unwrap().contains("temperature 21.8"), "{row}");

    // A leak while the page is open: in "Alerts now" within 2 s, and gone when it clears.
    let probe = Publisher::connect(gateway.mqtt_addr(), "basement")
        .await
        .unwrap();
    probe
        .publish("sensors/basement/water_leak", QoS::AtLeastOnce, "true")
        .await
        .unwrap();
    let shown = browser
        .until(
            "the raised alert appears",
            "return document.getElementById('active').innerText.includes('water-leak')",
        )
        .await;
    probe.wait_acked(1, WAIT).await.unwrap();
    probe
        .publish("sensors/basement/water_leak", QoS::AtLeastOnce, "false")
        .await
        .unwrap();
    let gone = browser
        .until(
            "the cleared alert leaves",
            "return !document.getElementById('active').innerText.includes('water-leak')",
        )
        .await;
    println!("status page: alert shown {shown:?} after the publish, gone {gone:?} after the clear");
    assert!(shown < Duration::from_secs(2) && gone < Duration::from_secs(2));

    // A new device is listed with the gateway's next copy of the device list (one a second).
    let listed = browser
        .until(
            "the leak sensor is listed",
            "return !!document.querySelector('#devices tr[data-device=\"basement\"]')",
        )
        .await;
    assert!(listed < Duration::from_secs(2), "listed after {listed:?}");
    // A device that says it goes offline: its row says so within a second, without a reload,
    // and it is counted as not online.
    probe
        .publish("sensors/basement/status", QoS::AtLeastOnce, "offline")
        .await
        .unwrap();
    let offline = browser
        .until(
            "the device shows offline",
            "const row = document.querySelector('#devices tr[data-device=\"basement\"]');\
             return row !== null && row.className === 'offline'",
        )
        .await;
    // The count comes with the gateway's next copy of the device list (one a second).
    let counted = browser
        .until(
            "the device is counted as not online",
            "return document.getElementById('device-count').textContent === '(2, 1 not online)'\
             && document.querySelector('#devices tr[data-device=\"basement\"]').className === 'offline'",
        )
        .await;
    probe
        .publish("sensors/basement/status", QoS::AtLeastOnce, "online")
        .await
        .unwrap();
    let online = browser
        .until(
            "the device shows online again",
            "return document.querySelector('#devices tr[data-device=\"basement\"]').className === 'online'",
        )
        .await;
    println!(
        "status page: new device listed {listed:?} after the clear, offline shown {offline:?} after the publish (counted {counted:?} later), online again {online:?}"
    );
    assert!(offline < Duration::from_secs(1) && online < Duration::from_secs(1));
    assert!(counted < Duration::from_secs(2), "{counted:?}");

    // The filter asks the gateway for the matching devices only, and says how many of how many.
    browser
        .eval("const f = document.getElementById('filter'); f.value = 'BASE'; f.dispatchEvent(new Event('input')); return true")
        .await;
    browser
        .until(
            "only the filtered device is listed",
            "const rows = [...document.querySelectorAll('#devices tbody tr')].map(r => r.dataset.device);\
             return rows.length === 1 && rows[0] === 'basement'\
             && document.getElementById('device-range').textContent === '1–1 of 1'\
             && document.getElementById('device-count').textContent === '(2)'",
        )
        .await;
    browser
        .eval("const f = document.getElementById('filter'); f.value = ''; f.dispatchEvent(new Event('input')); return true")
        .await;
    browser
        .until(
            "both devices are listed again",
            "return document.querySelectorAll('#devices tbody tr').length === 2",
        )
        .await;

    // What went upstream (the raise and the clear) against what forwarding every reading
    // would have cost: a saving, drawn.
    for i in 0..200 {
        sensor
            .publish(
                "sensors/boiler-1/temperature",
                QoS::AtMostOnce,
                format!("2{}.5", i % 10),
            )
            .await
            .unwrap();
    }
    assert!(
        wait_until(WAIT, || gateway
            .stats()
            .readings
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 200)
        .await
    );
    browser.eval("loadAll(); return true").await;
    browser
        .until(
            "the saving is shown",
            "return /\\(\\d+\\.\\d+ % saved\\)/.test(document.getElementById('saved').textContent)",
        )
        .await;
    let saved: f64 = browser
        .eval("return parseFloat(document.getElementById('saved').textContent.slice(1))")
        .await
        .as_f64()
        .unwrap();
    let lines = browser
        .eval("return document.querySelectorAll('#bandwidth svg polyline').length")
        .await;
    assert!(saved > 50.0 && saved < 100.0, "{saved} % saved");
    assert_eq!(lines, json!(2), "forwarding everything, and upstream");

    // A device's plot, drawn by the gateway, once two of its one-second windows are closed.
    let series = "/api/series?device=boiler-1&metric=temperature";
    let addr = http_addr(&gateway);
    let windows = || {
        watchpost::http::get_blocking(addr, series)
            .ok()
            .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
            .and_then(|v| v["points"].as_array().map(Vec::len))
            .unwrap_or(0)
    };
    assert!(wait_until(WAIT, || windows() >= 2).await, "{}", windows());
    browser.eval("loadDevices(); return true").await;
    browser
        .client()
        .find(Locator::Css("#devices tr[data-device=\"boiler-1\"]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser
        .until(
            "the device's plot",
            "return document.querySelectorAll('#plot svg polyline').length === 3",
        )
        .await;

    assert_eq!(
        browser.eval("return window.stayed === true").await,
        json!(true),
        "never reloaded"
    );
    let elsewhere = browser
        .eval(&format!(
            "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('{origin}/'))"
        ))
        .await;
    assert_eq!(elsewhere, json!([]), "every request went to the gateway");
    let errors = browser.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:#?}");

    if std::env::var_os("WATCHPOST_SCREENSHOT").is_some() {
        // Something to show: an alert raised now.
        sensor
            .publish("sensors/boiler-1/temperature", QoS::AtLeastOnce, "95.2")
            .await
            .unwrap();
        browser
            .until(
                "the overheat alert",
                "return document.getElementById('active').innerText.includes('overheat')",
            )
            .await;
        let png = browser.client().screenshot().await.unwrap();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/status-page.png");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, png).unwrap();
        println!("wrote {}", path.display());
    }
    gateway.shutdown().await;
}

/// Off loopback (an address in a network namespace of the test's own, as CI is root), the page
/// asks for an operator's login without being told to; on a machine that cannot make a
/// namespace, the same is checked on loopback with `[http] login = true`.
#[test]
fn off_loopback_the_page_asks_for_an_operator() {
    let (netns, listen) = match watchpost_e2e::netns::Netns::with_address("10.78.0.1/24") {
        Ok(ns) => (Some(std::sync::Arc::new(ns)), "10.78.0.1:0"),
        Err(why) => {
            println!("on loopback with login = true: {why}");
            (None, "127.0.0.1:0")
        }
    };
    // Every thread of the runtime, and this one that drives it, in the namespace: the
    // gateway's listeners, chromedriver and Chromium are all there.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(2).enable_all();
    if let Some(ns) = netns.clone() {
        builder.on_thread_start(move || ns.enter());
    }
    std::thread::spawn(move || {
        if let Some(ns) = &netns {
            ns.enter();
        }
        let runtime = builder.build().unwrap();
        runtime.block_on(the_page_asks_for_an_operator(listen, netns.is_none()));
    })
    .join()
    .expect("the test's thread");
}

async fn the_page_asks_for_an_operator(listen: &str, force_login: bool) {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let data = tempfile::tempdir().unwrap();
    let creds = data.path().join("credentials.toml");
    let mut c = watchpost::access::Credentials::default();
    let operator = c.add("ops", watchpost::access::Role::Operator).unwrap();
    let device = c.add("boiler-1", watchpost::access::Role::Device).unwrap();
    c.save(&creds).unwrap();
    let source = format!(
        "[gateway]\nid = \"site-test\"\ndata_dir = {:?}\n[broker]\nlisten = \"127.0.0.1:0\"\ncredentials = {:?}\n[http]\nlisten = \"{listen}\"\n{RULES}",
        data.path().display().to_string(),
        creds.display().to_string()
    );
    let mut config = watchpost::config::parse(&source, "test.toml")
        .unwrap()
        .config;
    assert_eq!(
        config.http.login, !force_login,
        "beyond loopback the login is on by default"
    );
    config.http.login |= force_login;
    let gateway = watchpost::start(config).await.unwrap();
    let addr = http_addr(&gateway);
    assert_eq!(addr.ip().is_loopback(), force_login, "{addr}");

    for (path, login, expected) in [
        ("/", None, 401),
        ("/api/devices", None, 401),
        ("/api/devices", Some(("ops", "wrong")), 401),
        ("/api/devices", Some(("boiler-1", device.as_str())), 403),
        ("/api/devices", Some(("ops", operator.as_str())), 200),
        ("/healthz", None, 200),
    ] {
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        if let Some((name, secret)) = login {
            use base64::Engine as _;
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{name}:{secret}"));
            request.push_str(&format!("Authorization: Basic {token}\r\n"));
        }
        request.push_str("\r\n");
        let answer = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(request.as_bytes()).unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            text
        })
        .await
        .unwrap();
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {expected}")),
            "{path} {login:?}: {answer}"
        );
    }

    // In the browser: without a login, the page is not shown; with one, it is.
    browser
        .client()
        .goto(&format!("http://{addr}/"))
        .await
        .unwrap();
    let shown = browser
        .eval("return document.getElementById('gateway') !== null")
        .await;
    assert_eq!(shown, json!(false), "the page is not shown without a login");
    // What the browser sends once the operator typed the name and secret into its login
    // dialog (headless Chromium shows none): the Authorization header on every request.
    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("ops:{operator}"));
    for (cmd, params) in [
        ("Network.enable", json!({})),
        (
            "Network.setExtraHTTPHeaders",
            json!({ "headers": { "Authorization": format!("Basic {token}") } }),
        ),
    ] {
        browser
            .client()
            .issue_cmd(Cdp(cmd, params))
            .await
            .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    }
    browser
        .client()
        .goto(&format!("http://{addr}/"))
        .await
        .unwrap();
    browser
        .until(
            "the page behind the login",
            "return document.getElementById('gateway').textContent === 'site-test'",
        )
        .await;
    gateway.shutdown().await;
}

/// `[http.tls]`: the page over HTTPS on a port of its own, with the login (asked for here on
/// loopback), read with curl trusting the test's CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_over_https_asks_for_a_login_and_serves_an_operator() {
    if Command::new("curl").arg("--version").output().is_err() {
        println!("skipped: curl is not installed");
        return;
    }
    let pki = watchpost_e2e::pki::Pki::new("status-page-test-ca").unwrap();
    pki.issue("gateway", "localhost").unwrap();
    let (cert, key) = pki.files("gateway");
    let data = tempfile::tempdir().unwrap();
    let creds = data.path().join("credentials.toml");
    let mut c = watchpost::access::Credentials::default();
    let operator = c.add("ops", watchpost::access::Role::Operator).unwrap();
    c.save(&creds).unwrap();
    let tls = format!(
        "[http.tls]\nlisten = \"127.0.0.1:0\"\ncert = {:?}\nkey = {:?}\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    let mut config = gateway_config_with(
        data.path(),
        None,
        &format!("credentials = {:?}", creds.display().to_string()),
        &format!("{tls}{RULES}"),
    );
    config.http.login = true;
    let gateway = watchpost::start(config).await.unwrap();
    let https = gateway.https_addr().expect("the HTTPS endpoint is on");
    let ca = pki.ca_file();
    let curl = move |path: &str, login: Option<String>| {
        let mut command = Command::new("curl");
        command
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&ca)
            .arg(format!("https://localhost:{}{path}", https.port()));
        if let Some(login) = login {
            command.args(["-u", &login]);
        }
        String::from_utf8(command.output().unwrap().stdout).unwrap()
    };
    let answers = tokio::task::spawn_blocking(move || {
        [
            curl("/", None),
            curl("/api/alerts", Some("ops:wrong".into())),
            curl("/api/alerts", Some(format!("ops:{operator}"))),
            curl("/", Some(format!("ops:{operator}"))),
            curl("/readyz", None),
        ]
    })
    .await
    .unwrap();
    assert_eq!(answers, ["401", "401", "200", "200", "200"]);
    // Plain HTTP on the HTTPS port gets no page.
    let plain = watchpost::http::get_blocking(https, "/readyz");
    assert!(plain.is_err() || plain.unwrap().0 != 200);
    gateway.shutdown().await;
}

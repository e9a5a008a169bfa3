//! Tests of the whole path, from text to a checked `Config` or to diagnostics.

use super::*;
use crate::rules::{Kind, Scope, SilenceAfter, Threshold};

const MINIMAL: &str = "[gateway]\nid = \"site-1\"\n";

#[test]
fn security_settings_are_checked_where_they_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("x.pem");
    std::fs::write(&pem, "not checked here").unwrap();
    let pem = format!("{:?}", pem.display().to_string());
    let ok = parse(
        &format!(
            "[gateway]\nid = \"s\"\ndata_dir = \"/d\"\n[broker]\nmax_publish_rate = 20\nmax_metrics_per_device = 8\n\
             [broker.tls]\nlisten = \"127.0.0.1:8883\"\ncert = {pem}\nkey = {pem}\nclient_ca = {pem}\n\
             [uplink]\nurl = \"mqtts://up:8883\"\nca_file = {pem}\nclient_cert = {pem}\nclient_key = {pem}\nusername = \"u\"\npassword = \"hunter2\"\n"
        ),
        "t.toml",
    )
    .unwrap()
    .config;
    assert_eq!(
        ok.broker.credentials,
        Path::new("/d").join(CREDENTIALS_FILE)
    );
    assert_eq!(ok.broker.max_publish_rate, 20);
    assert_eq!(ok.broker.limits.max_metrics_per_device, 8);
    assert!(
        ok.broker
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca.is_some())
    );
    let uplink = ok.uplink.unwrap();
    assert!(uplink.ca_file.is_some() && uplink.client_cert.is_some());
    let (user, password) = uplink.login.clone().unwrap();
    assert_eq!((user.as_str(), password.expose()), ("u", "hunter2"));
    assert!(
        !format!("{uplink:?}").contains("hunter2"),
        "never in debug output"
    );

    let bad = errors(&format!(
        "{MINIMAL}[broker]\nlisten = \"127.0.0.1:1883\"\nmax_metrics_per_device = 0\n\
         [broker.tls]\nlisten = \"127.0.0.1:1883\"\ncert = \"/nope.pem\"\nkey = {pem}\n\
         [uplink]\nurl = \"mqtt://up:1883\"\nca_file = {pem}\nclient_cert = {pem}\npassword = \"p\"\n"
    ));
    let expected = [
        "`max_metrics_per_device` must be at least 1",
        "`cert` file \"/nope.pem\" does not exist",
        "the TLS listener needs a port of its own",
        "`ca_file` needs a TLS uplink",
        "add `client_key`",
        "`password` needs `username`",
    ];
    for e in expected {
        assert!(bad.iter().any(|b| b.contains(e)), "{e:?} not in {bad:#?}");
    }
}

fn errors(src: &str) -> Vec<String> {
    match parse(src, "t.toml") {
        Ok(_) => vec![],
        Err(e) => e
            .errors
            .iter()
            .map(|d| format!("{}:{} {}", d.line, d.column, d.message))
            .collect(),
    }
}

#[test]
fn minimal_config_gets_safe_defaults() {
    let loaded = parse(MINIMAL, "t.toml").unwrap();
    let c = loaded.config;
    assert_eq!(c.broker.listen, DEFAULT_LISTEN.parse().unwrap());
    assert!(!c.broker.allow_anonymous);
    assert!(c.uplink.is_none());
    assert_eq!(c.gateway.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    assert_eq!(loaded.warnings.len(), 1, "no rules warns");
}

#[test]
fn full_rule_compiles() {
    let src = format!(
        "{MINIMAL}[uplink]\nurl = \"mqtts://broker.example.net\"\nforward = [\"critical\", \"warning\"]\n\
         [[rule]]\nname = \"overheat\"\nmatch = \"sensors/+/temperature\"\nabove = 90\nclear_below = 85.0\n\
         for = \"10s\"\nseverity = \"critical\"\n"
    );
    let c = parse(&src, "t.toml").unwrap().config;
    let u = c.uplink.unwrap();
    assert_eq!(
        (u.tls, u.host.as_str(), u.port, u.topic_prefix.as_str()),
        (true, "broker.example.net", 8883, "site-1")
    );
    assert!(u.forwards(Severity::Warning) && !u.forwards(Severity::Info));
    let r = &c.rules[0];
    assert!(matches!(
        r.kind,
        Kind::Threshold(Threshold {
            above: Some(90.0),
            ..
        })
    ));
    assert_eq!(r.hold, Duration::from_secs(10));
    assert_eq!(r.severity, Severity::Critical);
}

#[test]
fn every_semantic_error_is_reported_with_its_position() {
    let src = format!(
        "{MINIMAL}\
         [[rule]]\nname = \"a\"\nmatch = \"alerts/#\"\nabove = 1.0\n\
         [[rule]]\nname = \"b\"\nmatch = \"sensors/+/t\"\nabove = 90.0\nclear_below = 95.0\n\
         [[rule]]\nname = \"b\"\nmatch = \"sensors/+/t\"\nbelow = 1.0\nfor = \"soon\"\n"
    );
    assert_eq!(
        errors(&src),
        [
            "5:9 `match` filter \"alerts/#\" can never match a reading topic",
            "11:15 inverted hysteresis band: `clear_below` (95) is greater than `above` (90)",
            "13:8 two rules are named \"b\"",
            "16:7 `for` is not a duration: \"soon\"",
        ]
    );
}

#[test]
fn unknown_field_points_at_the_field() {
    let src = format!("{MINIMAL}[broker]\nlisten = \"127.0.0.1:1883\"\nallow_anonymus = true\n");
    let e = parse(&src, "t.toml").unwrap_err();
    let d = &e.errors[0];
    assert_eq!((d.line, d.column), (5, 1));
    assert!(
        d.message.contains("unknown field `allow_anonymus`"),
        "{}",
        d.message
    );
}

#[test]
fn every_rule_kind_and_lifecycle_option_compiles() {
    let src = format!(
        "{MINIMAL}[uplink]\nurl = \"mqtt://up\"\n\
         [[rule]]\nname = \"climb\"\nmatch = \"sensors/+/t\"\nrate_above = 2.0\nrate_per = \"minute\"\nwindow = \"5m\"\n\
         [[rule]]\nname = \"odd\"\nmatch = \"sensors/+/t\"\ndeviation_above = 4.0\nclear_within = 3.0\nmin_samples = 20\n\
         [[rule]]\nname = \"quiet\"\nmatch = \"sensors/+/+\"\nsilent_factor = 3.0\nscope = \"device\"\n\
         [[rule]]\nname = \"gone\"\noffline_for = \"2m\"\nrenotify = \"1h\"\ncooldown = \"5m\"\nforward = false\nlabels = {{ team = \"ops\" }}\n"
    );
    let rules = parse(&src, "t.toml").unwrap().config.rules;
    let kinds: Vec<_> = rules.iter().map(|r| r.kind.name()).collect();
    assert_eq!(kinds, ["rate", "deviation", "silence", "presence"]);
    assert!(
        matches!(rules[0].kind, Kind::Rate { per_seconds, window, .. } if per_seconds == 60.0 && window == Duration::from_secs(300))
    );
    assert!(matches!(
        rules[1].kind,
        Kind::Deviation {
            threshold: Threshold {
                above: Some(4.0),
                clear_below: Some(3.0),
                ..
            },
            min_samples: 20,
            ..
        }
    ));
    assert!(
        matches!(rules[2].kind, Kind::Silence { after: SilenceAfter::Learned { factor, .. }, scope: Scope::Device } if factor == 3.0)
    );
    let gone = &rules[3];
    assert_eq!(
        gone.filter.as_str(),
        "sensors/+/status",
        "presence watches status topics by default"
    );
    assert_eq!(
        (gone.renotify, gone.cooldown, gone.forward),
        (
            Some(Duration::from_secs(3600)),
            Some(Duration::from_secs(300)),
            Some(false)
        )
    );
    assert_eq!(gone.labels.get("team").map(String::as_str), Some("ops"));
}

#[test]
fn rule_kinds_are_not_mixed_up() {
    let src = format!(
        "{MINIMAL}[[rule]]\nname = \"a\"\nmatch = \"sensors/+/t\"\nabove = 1.0\nrate_above = 2.0\n\
         [[rule]]\nname = \"b\"\nmatch = \"sensors/+/t\"\nkind = \"trend\"\nabove = 1.0\n\
         [[rule]]\nname = \"c\"\nmatch = \"sensors/+/t\"\nsilent_for = \"1m\"\nsilent_factor = 2.0\nfor = \"1s\"\n\
         [[rule]]\nname = \"d\"\nmatch = \"sensors/+/t\"\n"
    );
    assert_eq!(
        errors(&src),
        [
            "7:14 `rate_above` belongs to rate rules, and this is a threshold rule",
            "11:8 unknown rule kind \"trend\"",
            "17:17 give `silent_for` or `silent_factor`, not both",
            "18:7 `for` does not apply to silence rules",
            "19:1 rule \"d\" has no condition",
        ]
    );
}

#[test]
fn all_unknown_fields_of_all_sections_are_reported_at_once() {
    let src = "[gateway]\nid = \"s\"\nname = \"x\"\n[broker]\nlisten = \"127.0.0.1:1\"\nalow_anonymous = true\nmax_conections = 5\n[stuff]\na = 1\n";
    let e = errors(src);
    assert_eq!(e.len(), 4, "{e:#?}");
    assert!(
        e[0].starts_with("3:1 unknown field `name` in [gateway]"),
        "{e:#?}"
    );
    assert!(
        e[1].starts_with("6:1 unknown field `alow_anonymous`"),
        "{e:#?}"
    );
    assert!(
        e[2].starts_with("7:1 unknown field `max_conections`"),
        "{e:#?}"
    );
    assert!(
        e[3].starts_with("8:2 unknown field `stuff` in the top level"),
        "{e:#?}"
    );
    let d = parse(src, "t.toml").unwrap_err();
    assert_eq!(
        d.errors[1]
            .help
            .as_deref()
            .map(|h| h.starts_with("did you mean `allow_anonymous`?")),
        Some(true)
    );
}

#[test]
fn sources_are_checked() {
    let src = format!(
        "{MINIMAL}[[source]]\nname = \"t\"\ntopic = \"tele/{{device}}/SENSOR\"\npayload = \"json\"\n\
         [[source]]\nname = \"e\"\ntopic = \"{{device}}/sensor/+/state\"\npayload = \"number\"\n\
         [[source]]\nname = \"x\"\ntopic = \"sensors/{{device}}\"\npayload = \"yaml\"\n"
    );
    let e = errors(&src);
    assert_eq!(e.len(), 3, "{e:#?}");
    assert!(
        e[0].starts_with("9:9 a plain payload needs the metric"),
        "{e:#?}"
    );
    assert!(e[1].starts_with("13:9 `topic`"), "{e:#?}");
    assert!(e[2].starts_with("14:11 unknown payload \"yaml\""), "{e:#?}");
}

#[test]
fn syntax_errors_stop_before_the_rest() {
    let e = errors("[gateway\nid = \"s\"\n");
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(e[0].starts_with("1:"), "{e:#?}");
}

#[test]
fn state_and_flapping_rules_compile_from_their_fields() {
    let src = format!(
        "{MINIMAL}[[rule]]\nname = \"leak\"\nmatch = \"sensors/+/water_leak\"\nequals = true\nseverity = \"critical\"\n\
         [[rule]]\nname = \"mode\"\nmatch = \"sensors/+/mode\"\nin = [\"Heat\", \"boost\", 3]\n\
         [[rule]]\nname = \"ok\"\nmatch = \"sensors/+/status_code\"\nnot_in = [\"OK\"]\nfor = \"1m\"\n\
         [[rule]]\nname = \"chatter\"\nmatch = \"sensors/+/door\"\nchanges_above = 5\nwindow = \"2m\"\n"
    );
    let c = parse(&src, "t.toml").unwrap().config;
    use crate::rules::StateTest;
    use crate::value::Value;
    let word = |w: &str| Value::parse(w).unwrap();
    assert_eq!(
        c.rules[0].kind,
        Kind::State(StateTest::Equals(Value::Bool(true)))
    );
    assert_eq!(
        c.rules[1].kind,
        Kind::State(StateTest::In(vec![
            word("Heat"),
            word("boost"),
            Value::Number(3.0)
        ]))
    );
    assert_eq!(
        c.rules[2].kind,
        Kind::State(StateTest::NotIn(vec![word("OK")]))
    );
    assert_eq!(c.rules[2].hold, Duration::from_secs(60));
    assert_eq!(
        c.rules[3].kind,
        Kind::Flapping {
            changes: 5,
            window: Duration::from_secs(120)
        }
    );
}

#[test]
fn state_rules_are_checked() {
    let e = errors(&format!(
        "{MINIMAL}[[rule]]\nname = \"a\"\nmatch = \"sensors/+/door\"\nequals = \"open\"\nin = [\"x\"]\n\
         [[rule]]\nname = \"b\"\nmatch = \"sensors/+/door\"\nin = []\n\
         [[rule]]\nname = \"c\"\nmatch = \"sensors/+/door\"\nequals = \"[not a state]\"\n\
         [[rule]]\nname = \"d\"\nmatch = \"sensors/+/door\"\nequals = \"open\"\nabove = 3.0\n\
         [[rule]]\nname = \"e\"\nmatch = \"sensors/+/door\"\nkind = \"flapping\"\n\
         [[rule]]\nname = \"f\"\nmatch = \"sensors/+/door\"\nequals = \"open\"\nwindow = \"1m\"\n"
    ));
    let expected = [
        "give one of `equals`, `in` and `not_in`",
        "the list of values is empty",
        "`equals`: not a value a reading can have",
        "`equals` belongs to state rules, and this is a threshold rule",
        "a flapping rule needs `changes_above`",
        "`window` applies to rate, deviation and flapping rules",
    ];
    assert_eq!(e.len(), expected.len(), "{e:#?}");
    for want in expected {
        assert!(
            e.iter().any(|got| got.contains(want)),
            "{want:?} not in {e:#?}"
        );
    }
}

#[test]
fn sources_read_value_maps_kinds_presence_and_ignore() {
    let src = format!(
        "{MINIMAL}[[source]]\nname = \"z2m\"\ntopic = \"zigbee2mqtt/{{device*}}\"\npayload = \"json\"\n\
         presence = {{ topic = \"zigbee2mqtt/{{device*}}/availability\", online = [\"up\"], offline = [\"down\"] }}\n\
         ignore = [\"zigbee2mqtt/bridge/#\"]\n\
         [source.metrics]\n\
         contact = {{ metric = \"door\", values = {{ true = \"closed\", false = \"open\" }} }}\n\
         battery = {{ metric = \"battery\", kind = \"number\" }}\n\
         linkquality = \"lqi\"\n\
         [[source]]\nname = \"power\"\ntopic = \"stat/{{device}}/POWER\"\npayload = \"state\"\nmetric = \"relay\"\n\
         values = {{ ON = true, OFF = false }}\n"
    );
    let c = parse(&src, "t.toml").unwrap().config;
    use crate::sources::{FieldKind, Payload};
    let z2m = &c.sources[0];
    let fields = z2m.fields.as_ref().unwrap();
    assert_eq!(fields["contact"].metric, "door");
    assert_eq!(
        fields["contact"].kind,
        FieldKind::State,
        "its map gives states"
    );
    assert_eq!(fields["battery"].kind, FieldKind::Number);
    assert_eq!(fields["linkquality"].kind, FieldKind::Any);
    let presence = z2m.presence.as_ref().unwrap();
    assert_eq!(
        (presence.online.clone(), presence.offline.clone()),
        (vec!["up".to_owned()], vec!["down".to_owned()])
    );
    assert!(!z2m.matches("zigbee2mqtt/bridge/state"));
    assert!(z2m.is_presence_topic("zigbee2mqtt/a/b/availability"));
    assert_eq!(c.sources[1].payload, Payload::State);
    assert_eq!(
        c.sources[1].values.get("on"),
        Some(&crate::value::Value::Bool(true))
    );
}

#[test]
fn rules_must_judge_what_the_sources_say_a_field_holds() {
    let sources = "[[source]]\nname = \"z2m\"\ntopic = \"z/{device}\"\npayload = \"json\"\n\
                   [source.metrics]\n\
                   water_leak = { metric = \"leak\", kind = \"state\" }\n\
                   temperature = { metric = \"temperature\", kind = \"number\" }\n\
                   contact = { metric = \"door\", values = { true = \"closed\", false = \"open\" } }\n";
    let e = errors(&format!(
        "{MINIMAL}{sources}\
         [[rule]]\nname = \"hot-leak\"\nmatch = \"sensors/+/leak\"\nabove = 1.0\n\
         [[rule]]\nname = \"t-open\"\nmatch = \"sensors/+/temperature\"\nequals = \"open\"\n"
    ));
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(
        e[0].contains(
            "rule \"hot-leak\" judges numbers, but source \"z2m\" maps \"leak\" as a state"
        ),
        "{e:#?}"
    );
    assert!(
        e[1].contains(
            "rule \"t-open\" compares states, but source \"z2m\" maps \"temperature\" as a number"
        ),
        "{e:#?}"
    );
    // A state its value map can never give: allowed, with a warning that says why.
    let ok = parse(
        &format!(
            "{MINIMAL}{sources}[[rule]]\nname = \"ajar\"\nmatch = \"sensors/+/door\"\nequals = \"ajar\"\n\
             [[rule]]\nname = \"open\"\nmatch = \"sensors/+/door\"\nequals = \"OPEN\"\n"
        ),
        "t.toml",
    )
    .unwrap();
    let warnings: Vec<_> = ok.warnings.iter().map(|w| w.message.clone()).collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("rule \"ajar\" can never fire: the value maps of \"door\" give only \"open\", \"closed\""),
        "{warnings:#?}"
    );
}

#[test]
fn source_value_maps_and_kinds_are_checked() {
    let e = errors(&format!(
        "{MINIMAL}[[source]]\nname = \"a\"\ntopic = \"a/{{device}}\"\npayload = \"json\"\nvalues = {{ ON = true }}\n\
         [[source]]\nname = \"b\"\ntopic = \"b/{{device}}\"\npayload = \"number\"\nmetric = \"m\"\nvalues = {{ ON = \"on\" }}\n\
         [[source]]\nname = \"c\"\ntopic = \"c/{{device}}\"\npayload = \"json\"\n\
         metrics = {{ x = {{ metric = \"x\", kind = \"number\", values = {{ a = \"b\" }} }}, y = {{ metric = \"y\", kind = \"bool\" }} }}\n\
         [[source]]\nname = \"d\"\ntopic = \"d/{{device}}\"\npayload = \"state\"\nmetric = \"m\"\npresence = \"d/{{device}}/{{metric}}\"\n\
         [[source]]\nname = \"e\"\ntopic = \"e/{{device}}\"\npayload = \"json\"\nignore = [\"e/#/x\"]\n"
    ));
    let expected = [
        "`values` maps a plain payload",
        "a number payload's value map gives states",
        "field \"x\" is declared a number, but its value map gives states",
        "unknown kind \"bool\"",
        "presence topic \"d/{device}/{metric}\"",
        "`ignore`",
    ];
    assert_eq!(e.len(), expected.len(), "{e:#?}");
    for want in expected {
        assert!(
            e.iter().any(|got| got.contains(want)),
            "{want:?} not in {e:#?}"
        );
    }
}

#[test]
fn the_packet_limit_defaults_above_the_payload_limit_and_may_be_raised() {
    let c = parse(MINIMAL, "t.toml").unwrap().config;
    assert_eq!(c.broker.max_packet_bytes(), 64 * 1024);
    let c = parse(
        &format!("{MINIMAL}[broker]\nmax_payload_bytes = 8192\n"),
        "t.toml",
    )
    .unwrap()
    .config;
    assert_eq!(c.broker.max_packet_bytes(), 16 * 8192);
    let c = parse(
        &format!("{MINIMAL}[broker]\nmax_packet_bytes = 4194304\n"),
        "t.toml",
    )
    .unwrap()
    .config;
    assert_eq!(c.broker.max_packet_bytes(), 4 * 1024 * 1024);
    let e = errors(&format!(
        "{MINIMAL}[broker]\nmax_payload_bytes = 8192\nmax_packet_bytes = 100\n"
    ));
    assert!(
        e.len() == 1
            && e[0].contains("`max_packet_bytes` must be at least `max_payload_bytes` (8192)"),
        "{e:#?}"
    );
}

#[test]
fn listen_v5_is_an_error_that_says_how_to_move() {
    // Whatever its value: the line itself is what has to go.
    for value in ["\"127.0.0.1:1884\"", "1884"] {
        let src = format!("{MINIMAL}[broker]\nlisten = \"127.0.0.1:1883\"\nlisten_v5 = {value}\n");
        let e = parse(&src, "t.toml").unwrap_err();
        assert_eq!(e.errors.len(), 1, "{e}");
        let d = &e.errors[0];
        assert_eq!((d.line, d.column), (5, 13), "{e}");
        assert!(
            d.message.starts_with(
                "`listen_v5` is gone: `listen` now serves MQTT 3.1.1 and MQTT 5 on one port"
            ),
            "{e}"
        );
        assert_eq!(
            d.help.as_deref(),
            Some("remove this line and point MQTT 5 clients at `listen` (127.0.0.1:1883)")
        );
    }
}

#[test]
fn mqtt5_session_and_queue_limits_have_defaults() {
    let b = parse(MINIMAL, "t.toml").unwrap().config.broker;
    assert_eq!(b.max_keep_alive, None, "each client's own keep alive");
    assert_eq!(b.receive_maximum, 64);
    assert_eq!(b.max_session_expiry, Duration::from_secs(86_400));
    assert_eq!((b.max_queued_messages, b.max_queued_bytes), (1000, 1 << 20));
    assert_eq!(
        (b.max_retained_messages, b.max_retained_bytes),
        (10_000, 16 << 20)
    );
    assert!(b.refuse_subscriptions.is_empty());
}

#[test]
fn mqtt5_session_and_queue_limits_are_read_as_written() {
    let b = parse(
        &format!(
            "{MINIMAL}[broker]\nmax_keep_alive = \"60s\"\nreceive_maximum = 65535\nmax_session_expiry = \"0s\"\n\
             max_queued_messages = 1\nmax_queued_bytes = 1024\nmax_retained_messages = 1\nmax_retained_bytes = 1024\n\
             refuse_subscriptions = [\"test/nosubscribe\", \"private/#\", \"+/secret\"]\n"
        ),
        "t.toml",
    )
    .unwrap()
    .config
    .broker;
    assert_eq!(b.max_keep_alive, Some(Duration::from_secs(60)));
    assert_eq!(b.receive_maximum, u16::MAX);
    assert_eq!(b.max_session_expiry, Duration::ZERO);
    assert_eq!((b.max_queued_messages, b.max_queued_bytes), (1, 1024));
    assert_eq!((b.max_retained_messages, b.max_retained_bytes), (1, 1024));
    assert_eq!(
        b.refuse_subscriptions,
        ["test/nosubscribe", "private/#", "+/secret"]
    );
    let longest = parse(
        &format!(
            "{MINIMAL}[broker]\nmax_keep_alive = \"65535s\"\nmax_session_expiry = \"4294967295s\"\n"
        ),
        "t.toml",
    )
    .unwrap()
    .config
    .broker;
    assert_eq!(longest.max_keep_alive, Some(Duration::from_secs(65535)));
    assert_eq!(
        longest.max_session_expiry,
        Duration::from_secs(u32::MAX.into())
    );
}

#[test]
fn mqtt5_session_and_queue_limits_out_of_range_are_errors_where_written() {
    // (the line under [broker], the text the error points at, the start of its message)
    let cases = [
        (
            "max_keep_alive = \"0s\"",
            "\"0s\"",
            "`max_keep_alive` must be whole seconds from 1s to 65535s",
        ),
        (
            "max_keep_alive = \"65536s\"",
            "\"65536s\"",
            "`max_keep_alive` must be whole seconds",
        ),
        (
            "max_keep_alive = \"1.5s\"",
            "\"1.5s\"",
            "`max_keep_alive` must be whole seconds",
        ),
        (
            "max_keep_alive = \"soon\"",
            "\"soon\"",
            "`max_keep_alive` is not a duration",
        ),
        (
            "receive_maximum = 0",
            "0",
            "`receive_maximum` must be between 1 and 65535",
        ),
        (
            "receive_maximum = 65536",
            "65536",
            "`receive_maximum` must be between 1 and 65535",
        ),
        (
            "max_session_expiry = \"137years\"",
            "\"137years\"",
            "`max_session_expiry` must be whole seconds up to 4294967295s",
        ),
        (
            "max_session_expiry = \"never\"",
            "\"never\"",
            "`max_session_expiry` is not a duration",
        ),
        (
            "max_queued_messages = 0",
            "0",
            "`max_queued_messages` must be at least 1",
        ),
        (
            "max_queued_bytes = 1023",
            "1023",
            "`max_queued_bytes` must be at least 1024",
        ),
        (
            "max_retained_messages = 0",
            "0",
            "`max_retained_messages` must be at least 1",
        ),
        (
            "max_retained_bytes = 100",
            "100",
            "`max_retained_bytes` must be at least 1024",
        ),
        (
            "refuse_subscriptions = [\"test/nosubscribe\", \"a/#/b\"]",
            "\"a/#/b\"",
            "`refuse_subscriptions`: \"a/#/b\" is not an MQTT topic filter",
        ),
        (
            "refuse_subscriptions = [\"\"]",
            "\"\"",
            "`refuse_subscriptions`: \"\" is not an MQTT topic filter",
        ),
    ];
    for (line, at, message) in cases {
        let e = errors(&format!("{MINIMAL}[broker]\n{line}\n"));
        let column = line.find(at).unwrap() + 1;
        let want = format!("4:{column} {message}");
        assert!(
            e.len() == 1 && e[0].starts_with(&want),
            "{want:?} not {e:#?}"
        );
    }
}

#[test]
fn acl_rules_are_read_in_order_with_their_lines() {
    use crate::acl::{Action, Permission, Topics, Who};
    let src = format!(
        "{MINIMAL}[[acl]]\nclient = \"dashboard\"\nallow = \"subscribe\"\ntopics = [\"alerts/#\"]\n\
         [[acl]]\nrole = \"device\"\ndeny = \"both\"\ntopics = [\"cmd/%u/#\", \"x/%c\"]\n\
         [[acl]]\neveryone = true\nallow = \"publish\"\ntopics = [\"dashboard/#\"]\n"
    );
    let loaded = parse(&src, "t.toml").unwrap();
    let acl = &loaded.config.acl;
    assert_eq!(acl.len(), 3);
    assert_eq!(acl[0].who, Who::Client("dashboard".into()));
    assert_eq!(
        (acl[0].permission, acl[0].action, acl[0].number),
        (Permission::Allow, Action::Subscribe, 1)
    );
    assert_eq!(acl[1].who, Who::Role(crate::access::Role::Device));
    assert_eq!(
        acl[1].topics,
        Topics::Filters(vec!["cmd/%u/#".into(), "x/%c".into()])
    );
    assert_eq!((acl[1].permission, acl[1].number), (Permission::Deny, 2));
    assert_eq!(acl[2].who, Who::Everyone);
    // Only the file's lack of rules is worth a warning.
    assert_eq!(loaded.warnings.len(), 1, "{:#?}", loaded.warnings);
}

#[test]
fn acl_mistakes_are_errors_where_written() {
    let bad = errors(&format!(
        "{MINIMAL}[[acl]]\nallow = \"publish\"\ntopics = [\"a\"]\n\
         [[acl]]\nclient = \"x\"\nrole = \"device\"\nallow = \"publish\"\ntopics = [\"a\"]\n\
         [[acl]]\nclient = \"x\"\ntopics = [\"a\"]\n\
         [[acl]]\nclient = \"x\"\nallow = \"read\"\ntopics = [\"a\"]\n\
         [[acl]]\nclient = \"x\"\nallow = \"publish\"\ndeny = \"publish\"\ntopics = [\"a\"]\n\
         [[acl]]\nclient = \"x\"\nallow = \"publish\"\ntopics = []\n\
         [[acl]]\nclient = \"x\"\nallow = \"publish\"\ntopics = [\"a/#/b\", \"%d/x\", \"$share/g/a\"]\n\
         [[acl]]\nanonymous = false\nallow = \"publish\"\ntopics = [\"a\"]\n\
         [[acl]]\nrole = \"admin\"\nallow = \"publish\"\ntopics = [\"a\"]\n"
    ));
    let expected = [
        "3:1 this [[acl]] rule does not say whom it is for",
        "8:8 an [[acl]] rule is for one kind of client",
        "11:1 this [[acl]] rule neither allows nor denies",
        "16:9 \"read\" is not an action",
        "21:8 an [[acl]] rule either allows or denies",
        "26:10 `topics` is empty",
        "30:11 \"a/#/b\" is not an MQTT topic filter",
        "30:20 \"%d/x\" has a `%` that is neither %u nor %c",
        "30:28 ACL filters are written without `$share/{group}/`",
        "32:13 `anonymous = false` says nothing",
        "36:8 in [[acl]]: unknown variant `admin`",
    ];
    for e in expected {
        assert!(bad.iter().any(|b| b.contains(e)), "{e:?} not in {bad:#?}");
    }
}

#[test]
fn check_explains_acl_rules_that_never_match_or_never_decide() {
    let src = format!(
        "{MINIMAL}[broker]\nallow_anonymous = false\n\
         [[acl]]\nanonymous = true\nallow = \"publish\"\ntopics = [\"sensors/%u/#\"]\n\
         [[acl]]\nclient = \"a b\"\nallow = \"publish\"\ntopics = [\"a\"]\n\
         [[acl]]\neveryone = true\nallow = \"publish\"\ntopics = [\"alerts/#\", \"$SYS/x\", \"cmd/#\"]\n\
         [[acl]]\nrole = \"operator\"\ndeny = \"publish\"\ntopics = [\"cmd/valve/+\"]\n\
         [[acl]]\neveryone = true\nallow = \"publish\"\ntopics = [\"cmd/+/x\"]\n"
    );
    let loaded = parse(&src, "t.toml").unwrap();
    let warnings: Vec<String> = loaded.warnings.iter().map(|d| d.to_string()).collect();
    let expected = [
        "6:13: warning: this [[acl]] rule never applies: anonymous clients are not allowed",
        "8:11: warning: \"sensors/%u/#\" never matches: anonymous clients have no name for %u",
        "10:10: warning: this [[acl]] rule never applies: no client can be named \"a b\"",
        "16:11: warning: \"alerts/#\" never matches a client's publish",
        "16:23: warning: \"$SYS/x\" never matches a client's publish",
        "17:1: warning: this [[acl]] rule never decides anything: the rule at line 13 comes first, applies to the same clients and topics, and decides the other way",
        "21:1: warning: this [[acl]] rule never decides anything: the rule at line 13 comes first, applies to the same clients and topics, and says the same",
    ];
    for e in expected {
        assert!(
            warnings.iter().any(|w| w.contains(e)),
            "{e:?} not in {warnings:#?}"
        );
    }
    // And the lack of [[rule]].
    assert_eq!(warnings.len(), expected.len() + 1, "{warnings:#?}");
}

/// `[uplink]` with `url` and `lines`, for the profile tests; `{pem}` stands for an existing file.
fn uplink_source(url: &str, lines: &str, pem: &str) -> String {
    format!(
        "{MINIMAL}[uplink]\nurl = \"{url}\"\n{}",
        lines.replace("{pem}", pem)
    )
}

#[test]
fn cloud_profiles_refuse_what_their_cloud_forbids_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("x.pem");
    std::fs::write(&pem, "not checked here").unwrap();
    let pem = format!("{:?}", pem.display().to_string());
    let aws = "profile = \"aws-iot-core\"\nclient_cert = {pem}\nclient_key = {pem}\n";
    let azure = "profile = \"azure-iot-hub\"\nshared_access_key = \"c2VjcmV0LWtleQ==\"\n";
    let tb = "profile = \"thingsboard\"\naccess_token = \"A1b2C3\"\n";
    #[rustfmt::skip]
    let table: &[(&str, String, &str)] = &[
        // (url, [uplink] lines, what the error says)
        ("mqtts://a.iot.eu-west-1.amazonaws.com", format!("{aws}qos = 2\n"), "AWS IoT Core does not support QoS 2"),
        ("mqtt://a.iot.eu-west-1.amazonaws.com", aws.into(), "the cloud accepts MQTT only over TLS"),
        ("mqtts://a.iot.eu-west-1.amazonaws.com", "profile = \"aws-iot-core\"\n".into(), "authenticates a device by its X.509 certificate"),
        ("mqtts://a.iot.eu-west-1.amazonaws.com:1883", aws.into(), "serves MQTT on port 8883, or 443 with ALPN, not 1883"),
        ("mqtts://a.iot.eu-west-1.amazonaws.com", format!("{aws}topic_prefix = \"a/b/c/d/e\"\n"), "at most 7 '/' in a topic"),
        ("mqtts://a.iot.eu-west-1.amazonaws.com", format!("{aws}topic_prefix = \"$aws/x\"\n"), "topics beginning with '$' are reserved"),
        ("mqtts://a.iot.eu-west-1.amazonaws.com", format!("{aws}keep_alive = \"20m1s\"\n"), "keep-alive between 30s and 1200s, not 1201s"),
        ("mqtts://hub.azure-devices.net", format!("{azure}retain = true\n"), "retain = true is refused: Azure IoT Hub does not keep retained messages"),
        ("mqtts://hub.azure-devices.net", format!("{azure}qos = 2\n"), "Azure IoT Hub does not support QoS 2"),
        ("mqtts://hub.azure-devices.net", format!("{azure}mqtt_version = \"5\"\n"), "device endpoint speaks MQTT 3.1.1"),
        ("mqtts://hub.azure-devices.net:443", azure.into(), "serves MQTT on port 8883, not 443"),
        ("mqtts://hub.azure-devices.net", format!("{azure}username = \"u\"\npassword = \"p\"\n"), "makes the user name and password itself"),
        ("mqtts://hub.azure-devices.net", "profile = \"azure-iot-hub\"\n".into(), "a shared access key or an X.509 certificate"),
        ("mqtts://hub.azure-devices.net", "profile = \"azure-iot-hub\"\nshared_access_key = \"not base64!\"\n".into(), "`shared_access_key` is not base64"),
        ("mqtts://hub.azure-devices.net", format!("{azure}token_ttl = \"10s\"\n"), "`token_ttl` must be between 1m and 365d"),
        ("mqtt://x.s1.eu.hivemq.cloud", "profile = \"hivemq-cloud\"\nusername = \"u\"\npassword = \"p\"\n".into(), "the cloud accepts MQTT only over TLS"),
        ("mqtts://x.s1.eu.hivemq.cloud", "profile = \"hivemq-cloud\"\n".into(), "authenticates a client by user name and password"),
        ("mqtts://x.emqxsl.com", "profile = \"emqx-cloud\"\n".into(), "authenticates a client by user name and password"),
        ("mqtts://broker.example.net", "profile = \"mqtt5\"\nmqtt_version = \"3.1.1\"\n".into(), "profile \"mqtt5\" speaks MQTT 5"),
        ("mqtts://tb.example.net", format!("{tb}retain = true\n"), "retain = true is refused: ThingsBoard keeps no retained messages"),
        ("mqtts://tb.example.net", format!("{tb}qos = 2\n"), "ThingsBoard does not support QoS 2"),
        ("mqtts://tb.example.net", "profile = \"thingsboard\"\n".into(), "authenticates the gateway device by its access token"),
        ("mqtts://tb.example.net", format!("{tb}alerts_as = \"alarms\"\n"), "`alerts_as` \"alarms\" is not a form ThingsBoard takes"),
        ("mqtts://tb.example.net", format!("{tb}username = \"u\"\n"), "makes the user name and password itself"),
        ("mqtts://broker.example.net", "profile = \"aws\"\n".into(), "unknown profile \"aws\""),
        ("mqtts://broker.example.net", "qos = 0\n".into(), "`qos` 0 cannot carry alerts"),
        ("mqtts://broker.example.net", "mqtt_version = \"3\"\n".into(), "`mqtt_version` \"3\" is not a version"),
        ("mqtts://broker.example.net", "shared_access_key = \"c2VjcmV0\"\n".into(), "`shared_access_key` belongs to profile \"azure-iot-hub\""),
        ("mqtts://broker.example.net", "access_token = \"t\"\n".into(), "`access_token` belongs to profile \"thingsboard\""),
    ];
    for (url, lines, expected) in table {
        let found = errors(&uplink_source(url, lines, &pem));
        assert!(
            found.iter().any(|e| e.contains(expected)),
            "{expected:?} not in {found:#?}\nfor {lines}"
        );
    }
}

#[test]
fn cloud_profiles_set_what_their_cloud_requires() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("x.pem");
    std::fs::write(&pem, "not checked here").unwrap();
    let pem = format!("{:?}", pem.display().to_string());
    let uplink = |url: &str, lines: &str| {
        parse(&uplink_source(url, lines, &pem), "t.toml")
            .unwrap_or_else(|e| panic!("{e}"))
            .config
            .uplink
            .unwrap()
    };
    let none = uplink("mqtts://broker.example.net", "");
    assert_eq!(none.delivery, Delivery::default());
    assert!(none.delivery.retain && none.delivery.mqtt_version == MqttVersion::Auto);

    let aws = uplink(
        "mqtts://a.iot.eu-west-1.amazonaws.com:443",
        "profile = \"aws-iot-core\"\nclient_cert = {pem}\nclient_key = {pem}\n",
    );
    assert_eq!(aws.delivery.profile, Some(Profile::AwsIotCore));
    assert!(!aws.delivery.retain, "retain is off by default");
    assert_eq!(aws.delivery.alpn, Some("x-amzn-mqtt-ca"));
    assert_eq!(aws.delivery.max_payload, Some(128 * 1024));

    let azure = uplink(
        "mqtts://hub.azure-devices.net",
        "profile = \"azure-iot-hub\"\nclient_id = \"gw-17\"\nshared_access_key = \"c2VjcmV0LWtleQ==\"\ntoken_ttl = \"2h\"\n",
    );
    assert_eq!(azure.delivery.mqtt_version, MqttVersion::V311);
    assert!(!azure.delivery.retain);
    let (user, password) = azure.login.clone().unwrap();
    assert_eq!(
        user, "hub.azure-devices.net/gw-17/?api-version=2021-04-12",
        "the user name the hub expects"
    );
    assert_eq!(password.expose(), "", "the SAS token is made at connect");
    assert!(
        matches!(&azure.delivery.form, Form::Azure { key: Some(k), token_ttl } if k.expose() == "c2VjcmV0LWtleQ==" && *token_ttl == Duration::from_secs(7200))
    );
    assert!(
        !format!("{azure:?}").contains("c2VjcmV0LWtleQ"),
        "the key is a secret"
    );

    let tb = uplink(
        "mqtts://tb.example.net",
        "profile = \"thingsboard\"\naccess_token = \"A1b2C3\"\nalerts_as = \"attributes\"\n",
    );
    assert_eq!(tb.login.as_ref().map(|(u, _)| u.as_str()), Some("A1b2C3"));
    assert_eq!(tb.delivery.form, Form::Thingsboard { attributes: true });

    let hive = uplink(
        "mqtts://x.s1.eu.hivemq.cloud",
        "profile = \"hivemq-cloud\"\nusername = \"u\"\npassword = \"p\"\nqos = 2\n",
    );
    assert_eq!(
        (hive.delivery.mqtt_version, hive.delivery.qos),
        (MqttVersion::V5, 2)
    );
}

#[test]
fn forget_after_defaults_to_a_day_and_is_checked_against_stale_after() {
    let c = parse(MINIMAL, "t.toml").unwrap().config;
    assert_eq!(c.gateway.forget_after, DEFAULT_FORGET_AFTER);
    let with = |lines: &str| MINIMAL.replacen("[gateway]\n", &format!("[gateway]\n{lines}"), 1);
    let c = parse(
        &with("stale_after = \"2s\"\nforget_after = \"5s\"\n"),
        "t.toml",
    )
    .unwrap()
    .config;
    assert_eq!(c.gateway.forget_after, Duration::from_secs(5));
    let bad = errors(&with("forget_after = \"5m\"\n"));
    assert_eq!(bad.len(), 1, "{bad:#?}");
    assert!(
        bad[0].starts_with("2:16 `forget_after` (5m) is shorter than `stale_after` (10m)"),
        "{bad:#?}"
    );
    let bad = errors(&with("forget_after = \"0s\"\n"));
    assert!(
        bad[0].contains("`forget_after` must be at least 1s"),
        "{bad:#?}"
    );
    let bad = errors(&with("forget_after = \"soon\"\n"));
    assert!(
        bad[0].contains("`forget_after` is not a duration"),
        "{bad:#?}"
    );
}

#[test]
fn a_site_pair_shares_the_site_and_each_names_the_other() {
    let pair = "[gateway]\nid = \"gw-a\"\nsite = \"site-17\"\n\
                [uplink]\nurl = \"mqtt://up:1883\"\n\
                [peer]\nname = \"gw-b\"\naddress = \"10.0.0.12:1883\"\nsecret_file = \"/etc/watchpost/peer.secret\"\n";
    let loaded = parse(pair, "t.toml").unwrap();
    let c = loaded.config;
    assert_eq!(
        (c.gateway.id.as_str(), c.gateway.site.as_str()),
        ("gw-a", "site-17")
    );
    let peer = c.peer.unwrap();
    assert_eq!(peer.name, "gw-b");
    assert_eq!(peer.address, "10.0.0.12:1883".parse().unwrap());
    assert_eq!(peer.takeover_after, DEFAULT_TAKEOVER_AFTER);
    let uplink = c.uplink.unwrap();
    assert_eq!(uplink.topic_prefix, "site-17", "the site's prefix");
    assert_eq!(
        uplink.client_id, "watchpost-gw-a",
        "the box's own client id"
    );
    assert_eq!(uplink.forwarded_by.as_deref(), Some("gw-a"));

    // Without a pair, nothing changes: the site is the id, and no user property.
    let single = parse(MINIMAL, "t.toml").unwrap().config;
    assert_eq!(single.gateway.site, single.gateway.id);

    // A pair without `site` still runs, with a warning: the two ids would differ.
    let no_site = "[gateway]\nid = \"gw-a\"\n[peer]\nname = \"gw-b\"\naddress = \"10.0.0.12:1883\"\nsecret_file = \"s\"\n";
    let warned = parse(no_site, "t.toml").unwrap();
    assert!(
        warned
            .warnings
            .iter()
            .any(|w| w.message.contains("has no `site`")),
        "{:?}",
        warned.warnings
    );

    let bad = errors(
        "[gateway]\nid = \"gw-a\"\nsite = \"no site\"\n\
         [peer]\nname = \"gw-a\"\naddress = \"nowhere\"\nsecret_file = \" \"\ntakeover_after = \"100ms\"\nport = 1\n",
    );
    for e in [
        "site id \"no site\" is not a valid name",
        "unknown field `port`",
    ] {
        assert!(bad.iter().any(|b| b.contains(e)), "{e:?} not in {bad:#?}");
    }
    let bad = errors(
        "[gateway]\nid = \"gw-a\"\nsite = \"s\"\n\
         [peer]\nname = \"gw-a\"\naddress = \"nowhere\"\nsecret_file = \" \"\ntakeover_after = \"100ms\"\n",
    );
    for e in [
        "the peer has this gateway's own id",
        "`address`",
        "`secret_file` is empty",
        "`takeover_after` must be at least 1s",
    ] {
        assert!(bad.iter().any(|b| b.contains(e)), "{e:?} not in {bad:#?}");
    }
}

#[test]
fn the_status_page_s_login_and_https_are_checked() {
    let beyond = parse(
        "[gateway]\nid = \"g\"\n[http]\nlisten = \"0.0.0.0:9183\"\n",
        "t.toml",
    )
    .unwrap();
    assert!(beyond.config.http.login, "beyond loopback: a login");
    let open = parse(
        "[gateway]\nid = \"g\"\n[http]\nlisten = \"0.0.0.0:9183\"\nlogin = false\n",
        "t.toml",
    )
    .unwrap();
    assert!(!open.config.http.login);
    assert!(
        open.warnings
            .iter()
            .any(|w| w.message.contains("status page is open to anyone")),
        "{:?}",
        open.warnings
    );
    assert!(
        !parse(MINIMAL, "t.toml").unwrap().config.http.login,
        "loopback: open"
    );
    let bad = errors(
        "[gateway]\nid = \"g\"\n[http]\nlisten = \"127.0.0.1:9183\"\n\
         [http.tls]\nlisten = \"127.0.0.1:9183\"\ncert = \"/nope.pem\"\nkey = \"/nope.key\"\nclient_ca = \"/ca.pem\"\n",
    );
    for e in [
        "`cert` file \"/nope.pem\" does not exist",
        "`key` file \"/nope.key\" does not exist",
        "`client_ca` is not used by the HTTP endpoint",
        "HTTPS needs a port of its own",
    ] {
        assert!(bad.iter().any(|b| b.contains(e)), "{e:?} not in {bad:#?}");
    }
}

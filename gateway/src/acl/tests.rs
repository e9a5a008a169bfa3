//! The matcher's table tests: the default rules (today's permissions), configured rules with
//! `%u` and `%c`, the order that decides, and the subscription matchers against their
//! definition.

use super::*;
use crate::sources::{Payload, Source};

fn device(name: &str) -> Identity {
    Identity::Named {
        name: name.into(),
        role: Role::Device,
    }
}

fn operator(name: &str) -> Identity {
    Identity::Named {
        name: name.into(),
        role: Role::Operator,
    }
}

fn rule(
    who: Who,
    permission: Permission,
    action: Action,
    topics: &[&str],
    number: usize,
) -> AclRule {
    AclRule {
        who,
        permission,
        action,
        topics: Topics::Filters(topics.iter().map(|t| (*t).to_owned()).collect()),
        number,
    }
}

fn sources() -> Arc<[Source]> {
    let tasmota = Source::new("t", "tele/{device}/SENSOR", Payload::Json, None, None).unwrap();
    vec![tasmota].into()
}

#[test]
fn the_default_rules_are_today_s_permissions() {
    let policy = Policy::new(Vec::new(), sources());
    let a = device("a");
    let ops = operator("ops");
    let anon = Identity::Anonymous;
    use Denied::*;
    let publishes: &[(&Identity, &str, Result<(), Denied>)] = &[
        (&a, "sensors/a/temperature", Ok(())),
        (&a, "sensors/a", Ok(())),
        (&a, "sensors/a/status", Ok(())),
        (&a, "sensors/b/temperature", Err(NoRule)),
        (&a, "sensors/ab/temperature", Err(NoRule)),
        (&a, "sensors", Err(NoRule)),
        (&a, "tele/a/SENSOR", Ok(())),
        (&a, "tele/b/SENSOR", Err(NoRule)),
        (&a, "tele/a/LWT", Err(NoRule)),
        (&a, "alerts/critical/a/overheat", Err(GatewayTopic)),
        (&a, "alerts", Err(GatewayTopic)),
        (&anon, "alerts/critical/x/y", Err(GatewayTopic)),
        (&anon, "$SYS/x", Err(GatewayTopic)),
        (&anon, "sensors/anyone/t", Ok(())),
        (&anon, "dashboard/settings", Ok(())),
        (&ops, "sensors/ops/t", Err(NoRule)),
        (&device("alerts"), "alertsX/y", Err(NoRule)),
    ];
    for (who, topic, expected) in publishes {
        assert_eq!(
            policy.may_publish(who, "id", topic),
            *expected,
            "{who:?} publishing on {topic}"
        );
    }
    let subscriptions: &[(&Identity, &str, bool)] = &[
        (&a, "sensors/a/config", true),
        (&a, "sensors/a/#", true),
        (&a, "sensors/a", true),
        (&a, "sensors/a/+", true),
        (&a, "sensors/+/config", false),
        (&a, "sensors/#", false),
        (&a, "#", false),
        (&a, "alerts/#", false),
        (&a, "sensors/ab/#", false),
        (&ops, "alerts/#", true),
        (&ops, "#", true),
        (&ops, "$SYS/#", true),
        (&anon, "#", true),
    ];
    for (who, filter, allowed) in subscriptions {
        assert_eq!(
            policy.may_subscribe(who, "id", filter).is_ok(),
            *allowed,
            "{who:?} subscribing to {filter}"
        );
    }
}

#[test]
fn configured_rules_come_first_in_order_with_user_and_client_id() {
    use Action::*;
    use Permission::*;
    let configured = vec![
        rule(
            Who::Client("dashboard".into()),
            Allow,
            Subscribe,
            &["alerts/#"],
            1,
        ),
        rule(
            Who::Client("dashboard".into()),
            Allow,
            Publish,
            &["cmd/%u/#"],
            2,
        ),
        rule(Who::Everyone, Deny, Both, &["secret/#"], 3),
        rule(
            Who::Role(Role::Device),
            Allow,
            Publish,
            &["cmd/%c/ack", "dev-%u-%c/x"],
            4,
        ),
        rule(Who::Anonymous, Deny, Publish, &["sensors/%u/#"], 5),
        rule(
            Who::Role(Role::Operator),
            Deny,
            Subscribe,
            &["sensors/+/raw"],
            6,
        ),
    ];
    let policy = Policy::new(configured, sources());
    let dashboard = operator("dashboard");
    let a = device("a");
    let anon = Identity::Anonymous;
    use Denied::*;
    let publishes: &[(&Identity, &str, &str, Result<(), Denied>)] = &[
        (&dashboard, "dashboard", "cmd/dashboard/valve", Ok(())),
        (&dashboard, "dashboard", "cmd/other/valve", Err(NoRule)),
        (&dashboard, "dashboard", "secret/x", Err(Rule(3))),
        (&a, "a@spare", "cmd/a@spare/ack", Ok(())),
        (&a, "a@spare", "cmd/a/ack", Err(NoRule)),
        (&a, "a@spare", "dev-a-a@spare/x", Ok(())),
        (&a, "a@spare", "dev-a-a/x", Err(NoRule)),
        (&a, "a", "secret/a", Err(Rule(3))),
        (&a, "a", "sensors/a/t", Ok(())),
        // %u never matches a client without a name: the default rule decides.
        (&anon, "x", "sensors/x/t", Ok(())),
        (&anon, "x", "secret", Err(Rule(3))),
    ];
    for (who, id, topic, expected) in publishes {
        assert_eq!(
            policy.may_publish(who, id, topic),
            *expected,
            "{who:?} as {id} publishing on {topic}"
        );
    }
    let subscriptions: &[(&Identity, &str, Result<(), Denied>)] = &[
        (&dashboard, "alerts/critical/#", Ok(())),
        (&dashboard, "sensors/a/t", Ok(())),
        // A deny applies to every subscription that could receive what it denies.
        (&dashboard, "#", Err(Rule(3))),
        (&dashboard, "secret/+", Err(Rule(3))),
        (&dashboard, "sensors/+/+", Err(Rule(6))),
        (&dashboard, "sensors/a/raw", Err(Rule(6))),
        (&operator("ops"), "alerts/#", Ok(())),
        (&a, "sensors/a/#", Ok(())),
        (&a, "secret/#", Err(Rule(3))),
    ];
    for (who, filter, expected) in subscriptions {
        assert_eq!(
            policy.may_subscribe(who, "c", filter),
            *expected,
            "{who:?} subscribing to {filter}"
        );
    }
}

#[test]
fn names_that_are_not_a_topic_level_never_stand_for_placeholders() {
    let policy = Policy::new(
        vec![rule(
            Who::Everyone,
            Permission::Allow,
            Action::Publish,
            &["own/%u/#", "ids/%c"],
            3,
        )],
        sources(),
    );
    // A certificate's common name may hold anything; as %u it would widen the filter.
    for name in ["a/b", "+", "#", ""] {
        let who = device(name);
        assert_eq!(
            policy.may_publish(&who, "id", &format!("own/{name}/x")),
            Err(Denied::NoRule),
            "{name:?}"
        );
    }
    assert_eq!(
        policy.may_publish(&device("n"), "", "ids/"),
        Err(Denied::NoRule)
    );
    assert!(policy.may_publish(&device("n"), "n-1", "ids/n-1").is_ok());
}

#[test]
fn the_subscription_matchers_agree_with_their_definition() {
    let levels = ["a", "b", "+", "#", ""];
    let mut filters = Vec::new();
    for x in levels {
        filters.push(x.to_owned());
        for y in levels {
            filters.push(format!("{x}/{y}"));
            for z in ["a", "+", "#"] {
                filters.push(format!("{x}/{y}/{z}"));
            }
        }
    }
    let mut checked = 0;
    for f in &filters {
        for p in &filters {
            check_matchers(f, p);
            checked += 1;
        }
    }
    assert!(checked > 10_000, "{checked}");
}

#[test]
fn shadowed_and_redundant_rules_are_found() {
    use Action::*;
    use Permission::*;
    let rules = vec![
        rule(Who::Everyone, Allow, Subscribe, &["alerts/#"], 1),
        // Within rule 0, same answer: redundant.
        rule(
            Who::Role(Role::Operator),
            Allow,
            Subscribe,
            &["alerts/critical/#"],
            2,
        ),
        // Within rule 0, other answer, but a deny on subscriptions applies to more than
        // rule 0 lets through (`#` overlaps alerts/x and is not within alerts/#): kept.
        rule(Who::Everyone, Deny, Subscribe, &["alerts/x"], 3),
        rule(Who::Client("d".into()), Deny, Publish, &["cmd/%u/#"], 4),
        // Within rule 3 for the same client: shadowed.
        rule(
            Who::Client("d".into()),
            Allow,
            Publish,
            &["cmd/%u/valve"],
            5,
        ),
        // Another client's placeholder values: not within.
        rule(
            Who::Client("e".into()),
            Allow,
            Publish,
            &["cmd/%u/valve"],
            6,
        ),
        // `%c` is not `%u`.
        rule(
            Who::Client("d".into()),
            Allow,
            Publish,
            &["cmd/%c/valve"],
            7,
        ),
        // Both actions, earlier rule only one: kept.
        rule(Who::Client("d".into()), Deny, Both, &["cmd/d/x"], 8),
    ];
    assert_eq!(
        findings(&rules),
        vec![(1, Finding::Redundant(0)), (4, Finding::Shadowed(3))]
    );
}

#[test]
fn placeholders_match_as_if_the_values_were_written() {
    let patterns = [
        "cmd/%u/#",
        "%u",
        "x/%c",
        "dev-%u-%c/+",
        "%u%c/a",
        "+/%u",
        "#",
        "%c/%u/%c",
    ];
    let subjects = [
        "cmd/a/set",
        "cmd/+/set",
        "cmd/#",
        "a",
        "#",
        "x/a@1",
        "x/+",
        "dev-a-a@1/z",
        "aa@1/a",
        "+/a",
        "a@1/a/a@1",
        "+/+/+",
    ];
    for pattern in patterns {
        for subject in subjects {
            for (user, id) in [("a", "a@1"), ("a", "a"), ("", "a"), ("a+b", "c"), ("a", "")] {
                check_placeholders(pattern, user, id, subject);
            }
        }
    }
    // A deny rule with %u never applies to a client without a name, even to `#`.
    let policy = Policy::new(
        vec![rule(
            Who::Everyone,
            Permission::Deny,
            Action::Subscribe,
            &["%u/x"],
            1,
        )],
        sources(),
    );
    assert!(policy.may_subscribe(&Identity::Anonymous, "c", "#").is_ok());
    assert_eq!(
        policy.may_subscribe(&device("a"), "c", "#"),
        Err(Denied::Rule(1))
    );
}

#[test]
fn the_fuzz_seeds_keep_the_properties() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/acl");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let mut lines = text.split('\n');
        let mut next = || lines.next().unwrap_or_default();
        let (subject, pattern, user, id) = (next(), next(), next(), next());
        check_matchers(subject, pattern);
        check_placeholders(pattern, user, id, subject);
        seeds += 1;
    }
    assert!(seeds >= 8, "{seeds} seeds in {}", dir.display());
}

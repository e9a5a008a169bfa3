//! Topic ACLs: which client may publish and subscribe where.
//!
//! Rules come from `[[acl]]` tables in the configuration, in the spirit of Mosquitto's
//! `acl_file`. Each names who it is for (one client by name, a role, anonymous clients, or
//! everyone), whether it allows or denies, what (publish, subscribe or both) and on which
//! topic filters; `%u` in a filter stands for the client's user name (its name from the
//! credentials file or certificate) and `%c` for its client id.
//!
//! **Order decides.** A publish or subscription is decided by the first rule that applies to
//! it; the built-in [default rules](Policy::defaults) come after the configured ones; what no
//! rule allows is refused. A publish rule applies when one of its filters matches the topic.
//! An allow rule applies to a subscription when every topic the subscription can match is
//! matched by one of its filters (`sensors/a/#` within `sensors/+/#`); a deny rule when the
//! two can match a topic in common (a deny on `sensors/secret` refuses a subscription to
//! `sensors/#`). In ACL filters, `#` and `+` also match topics that start with `$`.
//!
//! Before any rule: only the gateway publishes under `alerts/` and on `$` topics.
//!
//! The rules are checked on every publish and subscribe with the rules in force, so a reload
//! takes effect at once for publishes; subscriptions that the new rules refuse are removed
//! from their sessions (`Hub::revoke`).

use std::borrow::Cow;
use std::sync::Arc;

use crate::access::{Identity, Role};
use crate::sources::Source;

/// Who a rule is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// The named client (device or operator, by its name).
    Client(String),
    /// Every named client with this role.
    Role(Role),
    /// Clients without credentials.
    Anonymous,
    /// Every client.
    Everyone,
}

impl Who {
    fn applies_to(&self, identity: &Identity) -> bool {
        match (self, identity) {
            (Who::Everyone, _) | (Who::Anonymous, Identity::Anonymous) => true,
            (Who::Client(n), Identity::Named { name, .. }) => n == name,
            (Who::Role(r), Identity::Named { role, .. }) => r == role,
            _ => false,
        }
    }

    /// True if this rule's clients include every client of `other`'s.
    fn covers(&self, other: &Who) -> bool {
        self == other || *self == Who::Everyone
    }
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Client(n) => write!(f, "client {n:?}"),
            Who::Role(Role::Device) => f.write_str("devices"),
            Who::Role(Role::Operator) => f.write_str("operators"),
            Who::Role(Role::Peer) => f.write_str("the peer gateway"),
            Who::Anonymous => f.write_str("anonymous clients"),
            Who::Everyone => f.write_str("every client"),
        }
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Let it through.
    Allow,
    /// Refuse it.
    Deny,
}

/// What a rule is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Publishing (and a last will's topic).
    Publish,
    /// Subscribing.
    Subscribe,
    /// Both.
    Both,
}

impl Action {
    fn includes(self, other: Action) -> bool {
        self == Action::Both || self == other
    }

    /// The word the configuration uses.
    pub fn parse(word: &str) -> Option<Action> {
        match word {
            "publish" => Some(Action::Publish),
            "subscribe" => Some(Action::Subscribe),
            "both" => Some(Action::Both),
            _ => None,
        }
    }
}

/// Which topics a rule covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topics {
    /// MQTT topic filters, with `%u` and `%c`.
    Filters(Vec<String>),
    /// The topics a `[[source]]` maps to the client's name as a device (a default rule).
    OwnSources,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclRule {
    /// For whom.
    pub who: Who,
    /// Allow or deny.
    pub permission: Permission,
    /// Publish, subscribe or both.
    pub action: Action,
    /// On which topics.
    pub topics: Topics,
    /// Which `[[acl]]` table it is, counting from 1 at the top of the file; 0 for a default
    /// rule. (Not the line: moving a rule down a line changes nothing it does.)
    pub number: usize,
}

impl AclRule {
    fn filters(&self) -> &[String] {
        match &self.topics {
            Topics::Filters(f) => f,
            Topics::OwnSources => &[],
        }
    }
}

/// Why a publish or subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Only the gateway publishes under `alerts/` and on `$` topics.
    GatewayTopic,
    /// A rule denies it: its number (the n-th `[[acl]]` table).
    Rule(usize),
    /// No rule allows it.
    NoRule,
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Denied::GatewayTopic => f.write_str("only the gateway publishes under alerts/ and $"),
            Denied::Rule(n) => write!(f, "denied by [[acl]] rule #{n} (counting from the top)"),
            Denied::NoRule => f.write_str(
                "no [[acl]] rule allows it (by default a device publishes and subscribes only under sensors/{its name}/, and operators do not publish)",
            ),
        }
    }
}

/// The rules in force: the configured ones, then the defaults.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: Vec<AclRule>,
    sources: Arc<[Source]>,
}

/// The client a rule is evaluated for.
struct Client<'a> {
    identity: &'a Identity,
    /// `%u`, if the client has a name that can stand in a topic level.
    user: Option<&'a str>,
    /// `%c`, likewise.
    id: Option<&'a str>,
}

/// A value that may stand for `%u` or `%c`: a whole topic level, and no wildcard.
fn usable(value: &str) -> Option<&str> {
    (!value.is_empty() && !value.contains(['/', '+', '#'])).then_some(value)
}

impl<'a> Client<'a> {
    fn new(identity: &'a Identity, client_id: &'a str) -> Client<'a> {
        Client {
            identity,
            user: identity.name().and_then(usable),
            id: usable(client_id),
        }
    }
}

impl Policy {
    /// `configured` rules (in file order), then the default rules for `sources`.
    pub fn new(configured: Vec<AclRule>, sources: Arc<[Source]>) -> Policy {
        let mut rules = configured;
        rules.extend(Policy::defaults());
        Policy { rules, sources }
    }

    /// Today's permissions of devices, operators and anonymous clients, as rules; they come
    /// after the configured ones. The README lists them.
    pub fn defaults() -> Vec<AclRule> {
        let rule = |who, action, topics| AclRule {
            who,
            permission: Permission::Allow,
            action,
            topics,
            number: 0,
        };
        let own = || Topics::Filters(vec!["sensors/%u/#".to_owned()]);
        vec![
            rule(Who::Role(Role::Device), Action::Both, own()),
            rule(Who::Role(Role::Device), Action::Publish, Topics::OwnSources),
            rule(Who::Role(Role::Operator), Action::Subscribe, everything()),
            rule(Who::Anonymous, Action::Both, everything()),
        ]
    }

    /// The sources in force.
    pub fn sources(&self) -> &Arc<[Source]> {
        &self.sources
    }

    /// The rules in order, the defaults last.
    pub fn rules(&self) -> &[AclRule] {
        &self.rules
    }

    /// May `identity`, connected as `client_id`, publish on `topic`?
    pub fn may_publish(
        &self,
        identity: &Identity,
        client_id: &str,
        topic: &str,
    ) -> Result<(), Denied> {
        if let Identity::Named {
            role: Role::Peer, ..
        } = identity
        {
            // The peer mirrors on its topic, and does nothing else.
            return if topic == crate::peer::MIRROR_TOPIC {
                Ok(())
            } else {
                Err(Denied::NoRule)
            };
        }
        if gateway_topic(topic) {
            return Err(Denied::GatewayTopic);
        }
        let client = Client::new(identity, client_id);
        for rule in &self.rules {
            if !rule.action.includes(Action::Publish) || !rule.who.applies_to(identity) {
                continue;
            }
            let applies = match &rule.topics {
                Topics::Filters(filters) => {
                    filters.iter().any(|f| publish_applies(f, topic, &client))
                }
                Topics::OwnSources => client.identity.name().is_some_and(|name| {
                    self.sources
                        .iter()
                        .any(|s| s.device_of(topic).as_deref() == Some(name))
                }),
            };
            if applies {
                return decide(rule);
            }
        }
        Err(Denied::NoRule)
    }

    /// May `identity`, connected as `client_id`, subscribe to `filter` (without a
    /// `$share/{group}/` prefix)?
    pub fn may_subscribe(
        &self,
        identity: &Identity,
        client_id: &str,
        filter: &str,
    ) -> Result<(), Denied> {
        if matches!(
            identity,
            Identity::Named {
                role: Role::Peer,
                ..
            }
        ) || filter.starts_with("$watchpost")
        {
            // The mirror is between the two gateways only.
            return Err(Denied::NoRule);
        }
        let client = Client::new(identity, client_id);
        for rule in &self.rules {
            if !rule.action.includes(Action::Subscribe) || !rule.who.applies_to(identity) {
                continue;
            }
            let applies = rule
                .filters()
                .iter()
                .any(|f| subscribe_applies(rule.permission, f, filter, &client));
            if applies {
                return decide(rule);
            }
        }
        Err(Denied::NoRule)
    }
}

/// True if the rule's `filter` can be used for `client`: it has the values its placeholders
/// need. A rule never applies through a filter that lacks one, even where a wildcard in
/// the subscription would make the level irrelevant.
fn usable_for(filter: &str, client: &Client<'_>) -> bool {
    (client.user.is_some() || !filter.contains("%u"))
        && (client.id.is_some() || !filter.contains("%c"))
}

/// Does a publish rule's `filter` apply to a publish on `topic`?
fn publish_applies(filter: &str, topic: &str, client: &Client<'_>) -> bool {
    usable_for(filter, client) && matches_topic(filter, topic, client) == Some(true)
}

/// Does a subscribe rule's `filter` apply to a subscription to `subscription`? An allow
/// when it covers it, a deny when the two have a topic in common.
fn subscribe_applies(
    permission: Permission,
    filter: &str,
    subscription: &str,
    client: &Client<'_>,
) -> bool {
    let test = match permission {
        Permission::Allow => within,
        Permission::Deny => overlaps,
    };
    usable_for(filter, client) && test(subscription, filter, client) == Some(true)
}

fn everything() -> Topics {
    Topics::Filters(vec!["#".to_owned()])
}

fn decide(rule: &AclRule) -> Result<(), Denied> {
    match rule.permission {
        Permission::Allow => Ok(()),
        Permission::Deny => Err(Denied::Rule(rule.number)),
    }
}

/// Topics only the gateway publishes on.
pub fn gateway_topic(topic: &str) -> bool {
    topic.starts_with('$')
        || topic
            .strip_prefix(crate::alert::TOPIC_ROOT)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// True if the level `text` (a topic's or a subscription's, taken literally) is what the
/// rule's level `pattern` says once `%u` and `%c` are replaced; `None` if the pattern needs
/// a value the client does not have.
fn level_is(pattern: &str, text: &str, client: &Client<'_>) -> Option<bool> {
    if !pattern.contains('%') {
        return Some(pattern == text);
    }
    let mut rest = text;
    let mut parts = pattern.split('%');
    let head = parts.next().unwrap_or_default();
    let Some(after) = rest.strip_prefix(head) else {
        return Some(false);
    };
    rest = after;
    for part in parts {
        let (value, literal) = match part.as_bytes().first() {
            Some(b'u') => (client.user?, &part[1..]),
            Some(b'c') => (client.id?, &part[1..]),
            // Not a placeholder (the configuration refuses these): a literal '%'.
            _ => ("%", part),
        };
        let Some(after) = rest
            .strip_prefix(value)
            .and_then(|r| r.strip_prefix(literal))
        else {
            return Some(false);
        };
        rest = after;
    }
    Some(rest.is_empty())
}

/// Does the rule's filter `pattern` match the topic name `topic`?
fn matches_topic(pattern: &str, topic: &str, client: &Client<'_>) -> Option<bool> {
    let mut topic = topic.split('/');
    for p in pattern.split('/') {
        if p == "#" {
            return Some(true);
        }
        let Some(t) = topic.next() else {
            return Some(false);
        };
        if p != "+" && !level_is(p, t, client)? {
            return Some(false);
        }
    }
    Some(topic.next().is_none())
}

/// Does every topic that the subscription `filter` matches also match the rule's `pattern`?
fn within(filter: &str, pattern: &str, client: &Client<'_>) -> Option<bool> {
    if filter == "#" && pattern == "+/#" {
        // Every topic has a first level: the two match the same topics.
        return Some(true);
    }
    let mut filter = filter.split('/');
    for p in pattern.split('/') {
        if p == "#" {
            return Some(true);
        }
        let Some(f) = filter.next() else {
            return Some(false);
        };
        let ok = match (f, p) {
            ("#", _) => false,
            ("+", p) => p == "+",
            (_, "+") => true,
            (f, p) => level_is(p, f, client)?,
        };
        if !ok {
            return Some(false);
        }
    }
    Some(filter.next().is_none())
}

/// Can the subscription `filter` and the rule's `pattern` match a topic in common?
fn overlaps(filter: &str, pattern: &str, client: &Client<'_>) -> Option<bool> {
    let mut filter = filter.split('/');
    let mut pattern = pattern.split('/');
    loop {
        match (filter.next(), pattern.next()) {
            (Some("#"), _) | (_, Some("#")) | (None, None) => return Some(true),
            (None, Some(_)) | (Some(_), None) => return Some(false),
            (Some(f), Some(p)) => {
                let ok = f == "+" || p == "+" || level_is(p, f, client)?;
                if !ok {
                    return Some(false);
                }
            }
        }
    }
}

/// What `watchpost check` says about a rule that does not do what it seems to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// Earlier rule (its index in the list) decides everything this one would, the same way.
    Redundant(usize),
    /// Earlier rule (its index) decides everything this one would, the other way.
    Shadowed(usize),
}

/// Rule `later` never decides anything because rule `earlier` comes first: for each of its
/// actions, each of its filters lies within one of `earlier`'s, and `earlier` applies to
/// every client `later` applies to. `%u` and `%c` are compared as written, which is sound:
/// the same client's values replace both. Sound, not complete: it never claims shadowing
/// that is not there, and may miss some.
pub fn shadowed_by(earlier: &AclRule, later: &AclRule) -> bool {
    if !earlier.who.covers(&later.who) || !earlier.action.includes(later.action) {
        return false;
    }
    let (Topics::Filters(first), Topics::Filters(then)) = (&earlier.topics, &later.topics) else {
        return false;
    };
    // A deny rule applies to subscriptions that merely overlap its filters; an earlier
    // allow rule may let some of those reach it.
    if later.action.includes(Action::Subscribe)
        && earlier.permission == Permission::Allow
        && later.permission == Permission::Deny
    {
        return false;
    }
    let literal = Client {
        identity: &Identity::Anonymous,
        user: None,
        id: None,
    };
    then.iter().all(|t| {
        first
            .iter()
            .any(|f| within_written(t, f, &literal) == Some(true))
    })
}

/// [`within`] with `%u` and `%c` compared as text on both sides.
fn within_written(filter: &str, pattern: &str, client: &Client<'_>) -> Option<bool> {
    let escaped: Cow<'_, str> = if pattern.contains('%') {
        // No value stands in: compare the placeholders themselves.
        Cow::Owned(pattern.replace('%', "\u{1}"))
    } else {
        Cow::Borrowed(pattern)
    };
    let filter: Cow<'_, str> = if filter.contains('%') {
        Cow::Owned(filter.replace('%', "\u{1}"))
    } else {
        Cow::Borrowed(filter)
    };
    within(&filter, &escaped, client)
}

/// Each rule that never decides anything, with the earlier rule that decides instead.
pub fn findings(rules: &[AclRule]) -> Vec<(usize, Finding)> {
    let mut out = Vec::new();
    for (j, later) in rules.iter().enumerate() {
        if let Some(i) = (0..j).find(|&i| shadowed_by(&rules[i], later)) {
            let finding = if rules[i].permission == later.permission {
                Finding::Redundant(i)
            } else {
                Finding::Shadowed(i)
            };
            out.push((j, finding));
        }
    }
    out
}

/// Checks the subscription matchers against their definition, for the tests and the fuzz
/// target `acl`: for the subscription `filter` and the rule filter `pattern` (valid filters
/// without `%`, at most 4 levels each and about 5 level names together; others are
/// skipped), `within` must hold exactly when every topic that `filter` matches is matched by
/// `pattern`, and `overlaps` exactly when some topic is matched by both; `matches_topic`
/// must agree with the specification on each topic tried. The topics tried are every topic
/// made of the levels the two filters name, an empty level and one level neither names, up
/// to one level longer than the longer filter. Panics with the counterexample.
#[doc(hidden)]
pub fn check_matchers(filter: &str, pattern: &str) {
    let valid = |f: &str| {
        crate::topic::TopicFilter::new(f).is_ok() && !f.contains('%') && f.split('/').count() <= 4
    };
    if !valid(filter) || !valid(pattern) {
        return;
    }
    let mut levels: Vec<&str> = filter
        .split('/')
        .chain(pattern.split('/'))
        .filter(|l| *l != "+" && *l != "#")
        .collect();
    levels.extend(["", "\u{2}other"]);
    levels.sort_unstable();
    levels.dedup();
    if levels.len() > 7 {
        // Too many topics to try them all quickly.
        return;
    }
    let nobody = Client {
        identity: &Identity::Anonymous,
        user: None,
        id: None,
    };
    let mut every_in_pattern = true;
    let mut some_in_both = false;
    let mut topic = Vec::new();
    let mut visit = |t: &str| {
        let f = reference_match(filter, t);
        let p = reference_match(pattern, t);
        assert_eq!(
            matches_topic(pattern, t, &nobody),
            Some(p),
            "matches_topic({pattern:?}, {t:?})"
        );
        every_in_pattern &= !f || p;
        some_in_both |= f && p;
    };
    // A topic one level longer than either filter tells every case apart.
    let depth = filter.split('/').count().max(pattern.split('/').count()) + 1;
    topics_of(&levels, depth, &mut topic, &mut visit);
    assert_eq!(
        within(filter, pattern, &nobody),
        Some(every_in_pattern),
        "within({filter:?}, {pattern:?})"
    );
    assert_eq!(
        overlaps(filter, pattern, &nobody),
        Some(some_in_both),
        "overlaps({filter:?}, {pattern:?})"
    );
}

/// Checks that `%u` and `%c` stand for the client's name and id exactly as if they had been
/// written in the filter, for the tests and the fuzz target `acl`: with `pattern` holding
/// placeholders, a topic or subscription `subject`, and a name and client id that may stand
/// in a level, each matcher gives the same answer as on the pattern with the values written
/// in; with a value that may not, a pattern that needs it matches nothing. Panics with the
/// counterexample.
#[doc(hidden)]
pub fn check_placeholders(pattern: &str, user: &str, client_id: &str, subject: &str) {
    if subject.contains('%') || crate::topic::TopicFilter::new(subject).is_err() {
        return;
    }
    let identity = Identity::Named {
        name: user.to_owned(),
        role: Role::Device,
    };
    let client = Client::new(&identity, client_id);
    let written = match (client.user, client.id) {
        (Some(u), Some(c)) => pattern.replace("%u", u).replace("%c", c),
        _ => {
            if !usable_for(pattern, &client) {
                let applies = publish_applies(pattern, subject, &client)
                    || subscribe_applies(Permission::Allow, pattern, subject, &client)
                    || subscribe_applies(Permission::Deny, pattern, subject, &client);
                assert!(
                    !applies,
                    "{pattern:?} applied to {subject:?} without a value"
                );
            }
            return;
        }
    };
    if written.contains('%') || crate::topic::TopicFilter::new(&written).is_err() {
        return;
    }
    let nobody = Client {
        identity: &identity,
        user: None,
        id: None,
    };
    let pairs = [
        (
            matches_topic(pattern, subject, &client),
            matches_topic(&written, subject, &nobody),
            "matches_topic",
        ),
        (
            within(subject, pattern, &client),
            within(subject, &written, &nobody),
            "within",
        ),
        (
            overlaps(subject, pattern, &client),
            overlaps(subject, &written, &nobody),
            "overlaps",
        ),
    ];
    for (placeholders, values, what) in pairs {
        assert_eq!(
            placeholders, values,
            "{what}: {pattern:?} for {user:?}/{client_id:?} against {subject:?} (written: {written:?})"
        );
    }
}

/// Calls `visit` with every topic of 1 to `depth` levels taken from `levels`.
fn topics_of<'a>(
    levels: &[&'a str],
    depth: usize,
    at: &mut Vec<&'a str>,
    visit: &mut impl FnMut(&str),
) {
    if depth == 0 {
        return;
    }
    for level in levels {
        at.push(level);
        visit(&at.join("/"));
        topics_of(levels, depth - 1, at, visit);
        at.pop();
    }
}

/// MQTT matching as the specification words it (without the `$` exception), level by level.
fn reference_match(filter: &str, topic: &str) -> bool {
    fn go(f: &[&str], t: &[&str]) -> bool {
        match (f.first(), t.first()) {
            (Some(&"#"), _) => true,
            (None, None) => true,
            (Some(&"+"), Some(_)) => go(&f[1..], &t[1..]),
            (Some(a), Some(b)) => a == b && go(&f[1..], &t[1..]),
            _ => false,
        }
    }
    let f: Vec<&str> = filter.split('/').collect();
    let t: Vec<&str> = topic.split('/').collect();
    go(&f, &t)
}

#[cfg(test)]
mod tests;

//! `[[acl]]` tables into checked [`AclRule`]s, and what `watchpost check` says about rules
//! that can never match or that an earlier rule shadows.

use std::ops::Range;

use toml::Spanned;

use super::BrokerConfig;
use super::compile::is_name;
use super::diagnostics::Sink;
use super::raw::RawAcl;
use crate::acl::{self, AclRule, Action, Finding, Permission, Topics, Who};
use crate::topic::TopicFilter;

const WHO_HELP: &str = "write one of: client = \"NAME\", role = \"device\" or \"operator\", anonymous = true, everyone = true";
const ACTION_HELP: &str = "write allow = \"publish\", \"subscribe\" or \"both\" (or deny = ...)";

/// The rules of every `[[acl]]`, in file order; errors and warnings go to `sink`.
pub(super) fn compile_acl(
    raw: &[(Range<usize>, RawAcl)],
    broker: &BrokerConfig,
    sink: &mut Sink<'_>,
) -> Vec<AclRule> {
    let mut rules = Vec::new();
    let mut spans = Vec::new();
    for (i, (span, r)) in raw.iter().enumerate() {
        if let Some(rule) = compile_one(i + 1, span, r, broker, sink) {
            rules.push(rule);
            spans.push(span.clone());
        }
    }
    for (later, finding) in acl::findings(&rules) {
        let (earlier, what) = match finding {
            Finding::Redundant(i) => (i, "says the same"),
            Finding::Shadowed(i) => (i, "decides the other way"),
        };
        sink.warn(
            spans[later].clone(),
            format!(
                "this [[acl]] rule never decides anything: the rule at line {} comes first, applies to the same clients and topics, and {what}",
                sink.line(spans[earlier].start)
            ),
            Some(match finding {
                Finding::Redundant(_) => "remove it".into(),
                Finding::Shadowed(_) => format!(
                    "the first rule that applies decides: move this one above line {}",
                    sink.line(spans[earlier].start)
                ),
            }),
        );
    }
    rules
}

fn compile_one(
    number: usize,
    span: &Range<usize>,
    r: &RawAcl,
    broker: &BrokerConfig,
    sink: &mut Sink<'_>,
) -> Option<AclRule> {
    let mut whos: Vec<(Range<usize>, Who)> = Vec::new();
    if let Some(c) = &r.client {
        whos.push((c.span(), Who::Client(c.get_ref().clone())));
    }
    if let Some(role) = &r.role {
        whos.push((role.span(), Who::Role(*role.get_ref())));
    }
    for (flag, who, key) in [
        (&r.anonymous, Who::Anonymous, "anonymous"),
        (&r.everyone, Who::Everyone, "everyone"),
    ] {
        match flag {
            Some(f) if *f.get_ref() => whos.push((f.span(), who)),
            Some(f) => sink.error(
                f.span(),
                format!("`{key} = false` says nothing"),
                Some(format!(
                    "write `{key} = true`, or leave it out and name the clients another way"
                )),
            ),
            None => {}
        }
    }
    let who = match whos.len() {
        1 => whos.pop().map(|(_, w)| w),
        0 => {
            sink.error(
                span.clone(),
                "this [[acl]] rule does not say whom it is for",
                Some(WHO_HELP.into()),
            );
            None
        }
        _ => {
            sink.error(
                whos[1].0.clone(),
                "an [[acl]] rule is for one kind of client: a name, a role, anonymous clients or everyone",
                Some("write one rule for each".into()),
            );
            None
        }
    };
    let permission = match (&r.allow, &r.deny) {
        (Some(a), None) => action(a, sink).map(|x| (Permission::Allow, x)),
        (None, Some(d)) => action(d, sink).map(|x| (Permission::Deny, x)),
        (Some(_), Some(d)) => {
            sink.error(
                d.span(),
                "an [[acl]] rule either allows or denies",
                Some("write two rules".into()),
            );
            None
        }
        (None, None) => {
            sink.error(
                span.clone(),
                "this [[acl]] rule neither allows nor denies",
                Some(ACTION_HELP.into()),
            );
            None
        }
    };
    let topics = filters(&r.topics, sink);
    let (who, (permission, action), topics) = (who?, permission?, topics?);
    warn_never_matches(&who, action, r, &topics, broker, sink);
    Some(AclRule {
        who,
        permission,
        action,
        topics: Topics::Filters(topics),
        number,
    })
}

fn action(word: &Spanned<String>, sink: &mut Sink<'_>) -> Option<Action> {
    let found = Action::parse(word.get_ref());
    if found.is_none() {
        sink.error(
            word.span(),
            format!("{:?} is not an action", word.get_ref()),
            Some("write \"publish\", \"subscribe\" or \"both\"".into()),
        );
    }
    found
}

/// The rule's filters, each checked: a valid MQTT filter once `%u` and `%c` stand for a
/// level, and no other `%`.
fn filters(raw: &Spanned<Vec<Spanned<String>>>, sink: &mut Sink<'_>) -> Option<Vec<String>> {
    if raw.get_ref().is_empty() {
        sink.error(
            raw.span(),
            "`topics` is empty: the rule would apply to nothing",
            Some("list MQTT topic filters, e.g. [\"alerts/#\", \"cmd/%u/#\"]".into()),
        );
        return None;
    }
    let mut ok = true;
    for t in raw.get_ref() {
        let text = t.get_ref();
        let bad_placeholder = text
            .split('%')
            .skip(1)
            .any(|rest| !rest.starts_with(['u', 'c']));
        if bad_placeholder {
            ok = false;
            sink.error(
                t.span(),
                format!("{text:?} has a `%` that is neither %u nor %c"),
                Some("%u stands for the client's name, %c for its client id".into()),
            );
            continue;
        }
        if text.starts_with("$share/") {
            ok = false;
            sink.error(
                t.span(),
                "ACL filters are written without `$share/{group}/`",
                Some("the rules apply to the filter a shared subscription names".into()),
            );
            continue;
        }
        let as_filter = text.replace("%u", "u").replace("%c", "c");
        if let Err(e) = TopicFilter::new(&as_filter) {
            ok = false;
            sink.error(
                t.span(),
                format!("{text:?} is not an MQTT topic filter: {e}"),
                None,
            );
        }
    }
    ok.then(|| raw.get_ref().iter().map(|t| t.get_ref().clone()).collect())
}

/// Warns about what the rule says that can never happen.
fn warn_never_matches(
    who: &Who,
    action: Action,
    r: &RawAcl,
    topics: &[String],
    broker: &BrokerConfig,
    sink: &mut Sink<'_>,
) {
    match who {
        Who::Anonymous if !broker.allow_anonymous => {
            let span = r.anonymous.as_ref().map_or(0..0, |a| a.span());
            sink.warn(
                span,
                "this [[acl]] rule never applies: anonymous clients are not allowed (broker.allow_anonymous = false)",
                None,
            );
        }
        Who::Client(name) if !is_name(name) && broker.tls.is_none() => {
            let span = r.client.as_ref().map_or(0..0, |c| c.span());
            sink.warn(
                span,
                format!("this [[acl]] rule never applies: no client can be named {name:?}"),
                Some("names in the credentials file use letters, digits, '-', '_' and '.'".into()),
            );
        }
        _ => {}
    }
    for (raw, text) in r.topics.get_ref().iter().zip(topics) {
        if *who == Who::Anonymous && text.contains("%u") {
            sink.warn(
                raw.span(),
                format!("{text:?} never matches: anonymous clients have no name for %u"),
                None,
            );
        }
        let level = text.split('/').next().unwrap_or_default();
        let gateway_only = level.starts_with('$') || level == crate::alert::TOPIC_ROOT;
        if action == Action::Publish && gateway_only {
            sink.warn(
                raw.span(),
                format!(
                    "{text:?} never matches a client's publish: only the gateway publishes under alerts/ and on $ topics"
                ),
                None,
            );
        }
    }
}

//! The topic ACL matcher: a subscription filter, a rule's filter, a name and a client id,
//! one per line. Checks the subscription matchers against the definition of MQTT matching
//! (`acl::check_matchers`) and that `%u` and `%c` match as if the values were written in
//! the filter (`acl::check_placeholders`); see fuzz/README.md.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let subject = lines.next().unwrap_or_default();
    let pattern = lines.next().unwrap_or_default();
    let user = lines.next().unwrap_or_default();
    let client_id = lines.next().unwrap_or_default();
    watchpost::acl::check_matchers(subject, pattern);
    watchpost::acl::check_placeholders(pattern, user, client_id, subject);
});

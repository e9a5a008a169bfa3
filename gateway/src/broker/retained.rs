//! Retained device status, kept by the broker's front instead of the router.
//!
//! The only retained messages a client may leave are on its status topic
//! (`sensors/{device}/status`, `online` or `offline`), or on the presence topic a configured
//! source names for foreign devices (Tasmota's `tele/{device}/LWT`, Zigbee2MQTT's
//! `zigbee2mqtt/{device*}/availability`), one topic per device as well. rumqttd's router keeps
//! each retained message as a full publish record of about 1 KiB; with ten thousand devices
//! that was about 8 MB of the gateway's 58 MiB. Here a status costs its topic and payload in one small
//! allocation and a map entry: about 150 bytes.
//!
//! A retained status is sent to a client right after the SUBACK of a subscription that
//! matches it, as MQTT asks, with the retain flag set. It goes at QoS 0: the router numbers
//! the packets it sends a client and owns every packet id, so the front cannot send a QoS 1
//! packet of its own. Devices publish their status at QoS 0 and their will at QoS 0, so for
//! them this is the QoS they published with; a retained status published at QoS 1 or 2 is
//! delivered at QoS 0 on subscribe (a live one still goes at the subscription's QoS).

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use rumqttd::protocol::{Filter, Publish, PublishProperties, RetainForwardRule};

use crate::topic::TopicFilter;

/// The retained status of every device that left one.
#[derive(Default)]
pub(crate) struct Retained {
    /// Topic → payload; both usually slices of one allocation.
    by_topic: Mutex<HashMap<Bytes, Bytes>>,
}

impl Retained {
    /// Takes the retained part of `publish` (already checked to be a status topic): keeps its
    /// payload, or forgets the topic's status on an empty payload (MQTT's way to clear a
    /// retained message), and clears the flag, so that the router forwards the message to
    /// the subscribers of the moment and keeps nothing.
    pub(crate) fn take(&self, publish: &mut Publish) {
        if !publish.retain {
            return;
        }
        publish.retain = false;
        let mut map = self.lock();
        if publish.payload.is_empty() {
            map.remove(&publish.topic);
        } else {
            map.insert(publish.topic.clone(), publish.payload.clone());
        }
    }

    /// The retained messages a subscription to `filter` gets, as publishes ready to send;
    /// `id` is its subscription identifier, if any. MQTT 5's "only on a new subscription" is
    /// settled by the connection, which knows the session's subscriptions, before this.
    pub(crate) fn for_subscription(
        &self,
        filter: &Filter,
        id: Option<usize>,
    ) -> Vec<(Publish, Option<PublishProperties>)> {
        let wanted = filter.retain_forward_rule != RetainForwardRule::Never;
        // Shared subscriptions get no retained messages (MQTT 5, 4.8.2).
        if !wanted || filter.path.starts_with("$share/") {
            return Vec::new();
        }
        let Ok(matcher) = TopicFilter::new(&filter.path) else {
            return Vec::new();
        };
        let props = id.map(|id| PublishProperties {
            subscription_identifiers: vec![id],
            ..Default::default()
        });
        let mut out: Vec<_> = self
            .lock()
            .iter()
            .filter(|(topic, _)| {
                std::str::from_utf8(topic).is_ok_and(|topic| matcher.matches(topic))
            })
            .map(|(topic, payload)| {
                let publish = Publish::new(topic.clone(), payload.clone(), true);
                (publish, props.clone())
            })
            .collect();
        // In topic order: the same order for every subscriber, and easy to read.
        out.sort_by(|a, b| a.0.topic.cmp(&b.0.topic));
        out
    }

    /// How many topics have a retained status.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Bytes, Bytes>> {
        self.by_topic.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::QoS;

    fn status(device: &str, payload: &'static str) -> Publish {
        Publish::new(
            Bytes::from(format!("sensors/{device}/status")),
            Bytes::from_static(payload.as_bytes()),
            true,
        )
    }

    fn filter(path: &str, rule: RetainForwardRule) -> Filter {
        Filter {
            path: path.to_owned(),
            qos: QoS::AtLeastOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: rule,
        }
    }

    fn topics(list: &[(Publish, Option<PublishProperties>)]) -> Vec<String> {
        list.iter()
            .map(|(p, _)| String::from_utf8_lossy(&p.topic).into_owned())
            .collect()
    }

    #[test]
    fn keeps_the_newest_status_and_clears_the_flag() {
        let retained = Retained::default();
        for (device, payload) in [("a", "online"), ("b", "online"), ("a", "offline")] {
            let mut p = status(device, payload);
            retained.take(&mut p);
            assert!(!p.retain, "the router must not keep it too");
        }
        let every = filter("sensors/+/status", RetainForwardRule::OnEverySubscribe);
        let got = retained.for_subscription(&every, None);
        assert_eq!(topics(&got), ["sensors/a/status", "sensors/b/status"]);
        assert_eq!(&got[0].0.payload[..], b"offline");
        assert!(got.iter().all(|(p, _)| p.retain));
    }

    #[test]
    fn an_empty_payload_forgets_and_a_live_message_is_not_kept() {
        let retained = Retained::default();
        retained.take(&mut status("a", "online"));
        let mut live = status("b", "online");
        live.retain = false;
        retained.take(&mut live);
        assert_eq!(retained.len(), 1);
        let mut clear = status("a", "");
        retained.take(&mut clear);
        assert_eq!(retained.len(), 0);
    }

    #[test]
    fn only_matching_wanted_and_unshared_subscriptions_get_them() {
        let retained = Retained::default();
        retained.take(&mut status("a", "online"));
        let rule = RetainForwardRule::OnEverySubscribe;
        assert_eq!(
            retained
                .for_subscription(&filter("#", rule.clone()), None)
                .len(),
            1
        );
        assert!(
            retained
                .for_subscription(&filter("sensors/b/#", rule.clone()), None)
                .is_empty()
        );
        assert!(
            retained
                .for_subscription(&filter("$share/g/sensors/#", rule), None)
                .is_empty()
        );
        let never = filter("sensors/#", RetainForwardRule::Never);
        assert!(retained.for_subscription(&never, None).is_empty());
        let got = retained.for_subscription(
            &filter("sensors/#", RetainForwardRule::OnEverySubscribe),
            Some(7),
        );
        let props = got[0].1.as_ref().expect("a subscription identifier");
        assert_eq!(props.subscription_identifiers, [7]);
    }
}

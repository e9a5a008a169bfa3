use super::*;

fn hub() -> Hub {
    Hub::new(HubLimits::default(), Arc::new(Stats::default()))
}

fn message(topic: &str, qos: QoS) -> Arc<Message> {
    Arc::new(Message {
        topic: Bytes::from(topic.to_owned()),
        payload: Bytes::from_static(b"x"),
        qos,
        ..Message::default()
    })
}

fn options(qos: QoS) -> SubscriptionOptions {
    SubscriptionOptions {
        qos,
        ..SubscriptionOptions::default()
    }
}

fn subscribe(
    hub: &Hub,
    client: &str,
    connection: u64,
    filter: &str,
    options: SubscriptionOptions,
    id: Option<u32>,
) -> bool {
    hub.subscribe(
        client,
        connection,
        Subscription {
            filter: filter.into(),
            options,
            id,
        },
    )
    .expect("the connection's session")
}

/// A session for `client` on `connection`, with its mailbox.
fn session(hub: &Hub, client: &str, connection: u64, expiry: u32) -> Arc<Mailbox> {
    let number = hub.number();
    hub.attach(client, connection, number, expiry, &Identity::Anonymous)
        .expect("attached")
}

fn drain(mailbox: &Mailbox) -> Vec<(String, QoS, bool, Vec<u32>)> {
    let mut outbox = mailbox.lock();
    let mut out = Vec::new();
    while let Some(q) = outbox.pop() {
        out.push((
            String::from_utf8_lossy(&q.message.topic).into_owned(),
            q.qos,
            q.retain,
            q.ids,
        ));
    }
    out
}

#[test]
fn filters_match_as_mqtt_says() {
    let now = Instant::now();
    // (filter, topic, delivered)
    let table = [
        ("a/b", "a/b", true),
        ("a/b", "a/c", false),
        ("a/+", "a/b", true),
        ("a/+", "a/b/c", false),
        ("a/#", "a", true),
        ("a/#", "a/b/c", true),
        ("#", "a/b", true),
        ("+/+", "/a", true),
        ("/+", "/a", true),
        ("+", "/a", false),
        ("#", "$SYS/x", false),
        ("+/x", "$SYS/x", false),
        ("$SYS/#", "$SYS/x", true),
        ("a/+/c", "a//c", true),
    ];
    for (filter, topic, delivered) in table {
        let hub = hub();
        let mailbox = session(&hub, "c", 1, 0);
        subscribe(&hub, "c", 1, filter, options(QoS::AtLeastOnce), None);
        hub.route(&[message(topic, QoS::AtLeastOnce)], now);
        assert_eq!(
            !drain(&mailbox).is_empty(),
            delivered,
            "{filter} against {topic}"
        );
    }
}

#[test]
fn overlapping_subscriptions_deliver_once_at_the_highest_qos_with_every_identifier() {
    let hub = hub();
    let mailbox = session(&hub, "c", 1, 0);
    assert!(subscribe(
        &hub,
        "c",
        1,
        "a/+",
        options(QoS::AtMostOnce),
        Some(2)
    ));
    assert!(subscribe(
        &hub,
        "c",
        1,
        "a/#",
        options(QoS::ExactlyOnce),
        Some(3)
    ));
    hub.route(&[message("a/b", QoS::ExactlyOnce)], Instant::now());
    let got = drain(&mailbox);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, QoS::ExactlyOnce);
    let mut ids = got[0].3.clone();
    ids.sort_unstable();
    assert_eq!(ids, [2, 3]);
    // The same filter again replaces the subscription: not new.
    assert!(!subscribe(
        &hub,
        "c",
        1,
        "a/+",
        options(QoS::AtLeastOnce),
        None
    ));
}

#[test]
fn qos_is_the_lower_of_message_and_subscription() {
    let hub = hub();
    let mailbox = session(&hub, "c", 1, 0);
    subscribe(&hub, "c", 1, "t", options(QoS::AtLeastOnce), None);
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        hub.route(&[message("t", qos)], Instant::now());
    }
    let qos: Vec<QoS> = drain(&mailbox).into_iter().map(|g| g.1).collect();
    assert_eq!(qos, [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::AtLeastOnce]);
}

#[test]
fn no_local_and_retain_as_published() {
    let hub = hub();
    let a = session(&hub, "a", 1, 0);
    let b = session(&hub, "b", 2, 0);
    let no_local = SubscriptionOptions {
        no_local: true,
        ..options(QoS::AtLeastOnce)
    };
    subscribe(&hub, "a", 1, "t", no_local, None);
    let as_published = SubscriptionOptions {
        retain_as_published: true,
        ..options(QoS::AtLeastOnce)
    };
    subscribe(&hub, "b", 2, "t", as_published, None);
    let number_of_a = hub.lock().sessions["a"].number;
    let mut own = Message::clone(&message("t", QoS::AtLeastOnce));
    own.origin = number_of_a;
    own.retain = true;
    hub.route(&[Arc::new(own)], Instant::now());
    assert!(drain(&a).is_empty(), "a does not hear itself");
    let got = drain(&b);
    assert_eq!(got.len(), 1);
    assert!(got[0].2, "retain flag as published");
}

#[test]
fn a_shared_subscription_gives_each_message_to_one_member_preferring_online_ones() {
    let hub = hub();
    let a = session(&hub, "a", 1, 0);
    let b = session(&hub, "b", 2, 60);
    subscribe(&hub, "a", 1, "$share/g/t", options(QoS::AtLeastOnce), None);
    subscribe(&hub, "b", 2, "$share/g/t", options(QoS::AtLeastOnce), None);
    let now = Instant::now();
    for _ in 0..4 {
        hub.route(&[message("t", QoS::AtLeastOnce)], now);
    }
    assert_eq!((drain(&a).len(), drain(&b).len()), (2, 2));
    hub.detach("b", 2, 60, now);
    for _ in 0..4 {
        hub.route(&[message("t", QoS::AtLeastOnce)], now);
    }
    assert_eq!((drain(&a).len(), drain(&b).len()), (4, 0));
}

#[test]
fn unsubscribe_stops_delivery_and_says_whether_there_was_one() {
    let hub = hub();
    let mailbox = session(&hub, "c", 1, 0);
    subscribe(&hub, "c", 1, "t/#", options(QoS::AtLeastOnce), None);
    assert!(hub.listening());
    assert!(hub.unsubscribe("c", 1, "t/#"));
    assert!(!hub.unsubscribe("c", 1, "t/#"));
    assert!(!hub.listening());
    hub.route(&[message("t/x", QoS::AtLeastOnce)], Instant::now());
    assert!(drain(&mailbox).is_empty());
    assert!(hub.lock().tree.is_empty(), "empty levels are pruned");
}

#[test]
fn alert_subscriptions_do_not_count_as_listening_to_clients() {
    let hub = hub();
    session(&hub, "op", 1, 0);
    subscribe(&hub, "op", 1, "alerts/#", options(QoS::AtLeastOnce), None);
    assert!(!hub.listening());
    subscribe(
        &hub,
        "op",
        1,
        "$share/g/sensors/#",
        options(QoS::AtLeastOnce),
        None,
    );
    assert!(hub.listening());
}

#[test]
fn queues_are_bounded_and_offline_sessions_keep_only_qos_1_and_2() {
    let stats = Arc::new(Stats::default());
    let limits = HubLimits {
        queue: QueueLimits {
            messages: 3,
            bytes: 1 << 20,
        },
        ..HubLimits::default()
    };
    let hub = Hub::new(limits, stats.clone());
    let mailbox = session(&hub, "c", 1, 60);
    subscribe(&hub, "c", 1, "t", options(QoS::AtLeastOnce), None);
    let now = Instant::now();
    hub.detach("c", 1, 60, now);
    hub.route(&[message("t", QoS::AtMostOnce)], now);
    for _ in 0..5 {
        hub.route(&[message("t", QoS::AtLeastOnce)], now);
    }
    assert_eq!(drain(&mailbox).len(), 3);
    assert_eq!(Stats::get(&stats.queue_dropped), 2);
}

#[test]
fn a_kept_session_comes_back_with_its_subscriptions_and_queue() {
    let hub = hub();
    let mailbox = session(&hub, "c", 1, 60);
    subscribe(&hub, "c", 1, "t", options(QoS::AtLeastOnce), None);
    let now = Instant::now();
    hub.detach("c", 1, 60, now);
    hub.route(&[message("t", QoS::AtLeastOnce)], now);
    let (resumed, will) = hub.connect("c", false, 2);
    let resumed = resumed.expect("session present");
    assert!(will.is_none());
    assert!(Arc::ptr_eq(&resumed.mailbox, &mailbox));
    assert_eq!(drain(&mailbox).len(), 1, "what came while away");
    // The old connection may not touch it any more.
    assert!(hub.attach("c", 1, 99, 60, &Identity::Anonymous).is_none());
    assert!(!hub.unsubscribe("c", 1, "t"));
    assert!(hub.unsubscribe("c", 2, "t"));
}

#[test]
fn a_clean_start_discards_the_old_session() {
    let hub = hub();
    session(&hub, "c", 1, 60);
    subscribe(&hub, "c", 1, "t", options(QoS::AtLeastOnce), None);
    hub.detach("c", 1, 60, Instant::now());
    let (resumed, _) = hub.connect("c", true, 2);
    assert!(resumed.is_none());
    assert!(hub.lock().sessions.is_empty());
    assert!(!hub.listening());
}

#[test]
fn sessions_end_when_their_expiry_passes_and_at_once_with_expiry_zero() {
    let hub = hub();
    session(&hub, "short", 1, 0);
    session(&hub, "kept", 2, 5);
    let now = Instant::now();
    hub.detach("short", 1, 0, now);
    hub.detach("kept", 2, 5, now);
    assert_eq!(hub.counts().offline, 1);
    hub.tick(now + Duration::from_secs(4));
    assert_eq!(hub.counts().offline, 1);
    hub.tick(now + Duration::from_secs(5));
    assert_eq!(hub.counts(), SessionCounts::default());
}

#[test]
fn session_expiry_is_capped_by_the_configured_maximum() {
    let limits = HubLimits {
        max_session_expiry: 10,
        ..HubLimits::default()
    };
    let hub = Hub::new(limits, Arc::new(Stats::default()));
    session(&hub, "c", 1, u32::MAX);
    let now = Instant::now();
    hub.detach("c", 1, u32::MAX, now);
    hub.tick(now + Duration::from_secs(10));
    assert_eq!(hub.counts().offline, 0);
}

#[test]
fn delayed_wills_go_when_due_or_when_the_session_ends_and_not_after_a_return() {
    let hub = hub();
    let now = Instant::now();
    let will = |t: &str| Message::clone(&message(t, QoS::AtLeastOnce));
    // Due by its delay.
    hub.delay_will("a", now + Duration::from_secs(3), will("a/will"));
    assert!(hub.tick(now + Duration::from_secs(2)).is_empty());
    assert_eq!(hub.tick(now + Duration::from_secs(3)).len(), 1);
    // Cancelled by a return to the session.
    hub.delay_will("b", now + Duration::from_secs(3), will("b/will"));
    let (_, due) = hub.connect("b", false, 7);
    assert!(due.is_none());
    assert!(hub.tick(now + Duration::from_secs(10)).is_empty());
    // Sent at once by a clean start, which ends the old session.
    hub.delay_will("c", now + Duration::from_secs(3), will("c/will"));
    let (_, due) = hub.connect("c", true, 8);
    assert_eq!(&due.expect("the will").topic[..], b"c/will");
    // Sent when the session expires first.
    session(&hub, "d", 9, 1);
    hub.detach("d", 9, 1, now);
    hub.delay_will("d", now + Duration::from_secs(30), will("d/will"));
    assert_eq!(hub.tick(now + Duration::from_secs(1)).len(), 1);
}

#[test]
fn expired_messages_are_not_routed_and_expiry_counts_down() {
    let stats = Arc::new(Stats::default());
    let hub = Hub::new(HubLimits::default(), stats.clone());
    let mailbox = session(&hub, "c", 1, 0);
    subscribe(&hub, "c", 1, "t", options(QoS::AtLeastOnce), None);
    let now = Instant::now();
    let mut m = Message::clone(&message("t", QoS::AtLeastOnce));
    m.expires_at = Some(now + Duration::from_secs(6));
    assert_eq!(m.expiry_left(now + Duration::from_millis(3100)), Some(3));
    assert_eq!(m.expiry_left(now + Duration::from_secs(7)), Some(1));
    hub.route(&[Arc::new(m)], now + Duration::from_secs(7));
    assert!(drain(&mailbox).is_empty());
    assert_eq!(Stats::get(&stats.messages_expired), 1);
}

#[test]
fn packet_ids_skip_zero_and_those_in_flight() {
    let mut outbox = Outbox::default();
    let first = outbox.next_pkid();
    assert_eq!(first, 1);
    outbox.inflight.push_back(Inflight {
        pkid: 2,
        released: false,
        item: Queued {
            message: message("t", QoS::AtLeastOnce),
            qos: QoS::AtLeastOnce,
            retain: false,
            ids: Vec::new(),
        },
    });
    assert_eq!(outbox.next_pkid(), 3);
    outbox.last_pkid = u16::MAX;
    assert_eq!(outbox.next_pkid(), 1);
}

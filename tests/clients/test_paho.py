"""End-to-end tests of an MQTT broker with a widely used client that is not ours: Eclipse Paho's
Python client (paho-mqtt 2.x).

The broker is whatever listens on MQTT_HOST:MQTT_PORT (default 127.0.0.1:1883): tests/clients.sh
starts the gateway for them, or points them at another broker (e.g. Mosquitto) to check the
tests themselves. MQTT 3.1.1 and MQTT 5 clients use the same port.

Every test uses topics and client ids of its own, waits for conditions with a deadline, and
removes the retained messages and sessions it leaves. Sleeps appear only where a test checks
that nothing arrives, or lets a session expire.

This file is not a conformance suite: it checks what a gateway's MQTT clients rely on.
"""

import os
import socket
import threading
import time
import unittest
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

HOST = os.environ.get("MQTT_HOST", "127.0.0.1")
PORT = int(os.environ.get("MQTT_PORT", "1883"))

V311 = mqtt.MQTTv311
V5 = mqtt.MQTTv5

# The longest any awaited condition may take.
DEADLINE = 5.0
# How long to watch for a message that must not arrive.
QUIET = 0.5


def unique(prefix):
    """A name no other test (or run) uses; as a client id, at most the 23 characters that every
    MQTT 3.1.1 broker must accept."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def connect_properties(**values):
    """CONNECT properties, e.g. SessionExpiryInterval=60."""
    return _properties(PacketTypes.CONNECT, values)


def publish_properties(**values):
    """PUBLISH properties, e.g. UserProperty=[("k", "v")]."""
    return _properties(PacketTypes.PUBLISH, values)


def will_properties(**values):
    """Will properties, e.g. WillDelayInterval=2."""
    return _properties(PacketTypes.WILLMESSAGE, values)


def _properties(packet_type, values):
    properties = Properties(packet_type)
    for name, value in values.items():
        setattr(properties, name, value)
    return properties


def seen(messages):
    """What a test compares: each message's topic and payload."""
    return [(m.topic, m.payload) for m in messages]


def code(reason):
    """A reason code (or a 3.1.1 granted QoS) as a number."""
    return reason if isinstance(reason, int) else reason.value


class Inbox:
    """Messages received by one or more clients, with a deadline-bound wait."""

    def __init__(self):
        self._changed = threading.Condition()
        self._messages = []

    def add(self, receiver, message):
        with self._changed:
            self._messages.append((receiver, message))
            self._changed.notify_all()

    def wait_for(self, count, timeout=DEADLINE):
        """Waits until at least `count` messages arrived; returns them all, in arrival order."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._messages) >= count, timeout):
                got = seen(m for _, m in self._messages)
                raise AssertionError(f"{count} message(s) expected within {timeout} s, got {got}")
            return [m for _, m in self._messages]

    def wait_quiet(self, count, quiet=QUIET):
        """Waits for `count` messages, then `quiet` seconds more, and returns all that came."""
        self.wait_for(count)
        time.sleep(quiet)
        return self.messages()

    def messages(self):
        with self._changed:
            return [m for _, m in self._messages]

    def receivers(self):
        with self._changed:
            return [(receiver, m) for receiver, m in self._messages]


class Client:
    """One paho client, connected on construction, with its acknowledgements and messages.

    Every call that expects an answer from the broker (CONNACK, SUBACK, PUBACK / PUBCOMP)
    waits for it with a deadline and fails the test if it does not come or is a refusal.
    """

    def __init__(
        self,
        test,
        protocol,
        client_id=None,
        *,
        clean=True,
        properties=None,
        will=None,
        inbox=None,
    ):
        self.id = client_id or unique("paho")
        self.protocol = protocol
        self.inbox = inbox or Inbox()
        self._answers = threading.Condition()
        self._connack = None
        self._closed_before_connack = False
        self._subacks = {}
        self._acks = {}
        self._closed = False

        self.paho = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.id,
            protocol=protocol,
            clean_session=clean if protocol != V5 else None,
        )
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = self._on_disconnect
        self.paho.on_subscribe = self._on_subscribe
        self.paho.on_publish = self._on_publish
        self.paho.on_message = lambda _c, _u, message: self.inbox.add(self.id, message)
        if will is not None:
            self.paho.will_set(**will)

        if protocol == V5:
            self.paho.connect(HOST, PORT, keepalive=30, clean_start=clean, properties=properties)
        else:
            self.paho.connect(HOST, PORT, keepalive=30)
        self.paho.loop_start()
        test.addCleanup(self.close)
        with self._answers:
            if not self._answers.wait_for(self._connack_or_close, DEADLINE):
                raise AssertionError(f"{self.id}: no CONNACK within {DEADLINE} s")
        if self._connack is None:
            raise AssertionError(f"{self.id}: the broker closed the connection, no CONNACK")
        flags, reason = self._connack
        if reason.is_failure:
            raise AssertionError(f"{self.id}: connection refused: {reason}")
        self.session_present = flags.session_present

    def _connack_or_close(self):
        return self._connack is not None or self._closed_before_connack

    def _on_connect(self, _client, _userdata, flags, reason, _properties):
        with self._answers:
            self._connack = (flags, reason)
            self._answers.notify_all()

    def _on_disconnect(self, _client, _userdata, _flags, _reason, _properties):
        with self._answers:
            if self._connack is None:
                self._closed_before_connack = True
                self._answers.notify_all()

    def _on_subscribe(self, _client, _userdata, mid, reasons, _properties):
        with self._answers:
            self._subacks[mid] = [code(r) for r in reasons]
            self._answers.notify_all()

    def _on_publish(self, _client, _userdata, mid, reason, _properties):
        with self._answers:
            self._acks[mid] = reason
            self._answers.notify_all()

    def _wait(self, answers, mid, what):
        with self._answers:
            if not self._answers.wait_for(lambda: mid in answers, DEADLINE):
                raise AssertionError(f"{self.id}: no {what} within {DEADLINE} s")
            return answers.pop(mid)

    def subscribe(self, *filters, qos=1):
        """Subscribes to each filter (a string, or a (filter, qos) pair); returns the SUBACK's
        codes (granted QoS or reason codes)."""
        pairs = [f if isinstance(f, tuple) else (f, qos) for f in filters]
        result, mid = self.paho.subscribe(pairs)
        assert result == mqtt.MQTT_ERR_SUCCESS, result
        return self._wait(self._subacks, mid, "SUBACK")

    def subscribe_granted(self, *filters, qos=1):
        """Subscribes and fails unless every filter was granted."""
        codes = self.subscribe(*filters, qos=qos)
        assert all(c < 0x80 for c in codes), f"{self.id}: subscription refused: {codes}"
        return codes

    def publish(self, topic, payload, qos=1, retain=False, properties=None):
        """Publishes; at QoS 1 and 2 waits until the broker acknowledged it and fails on a refusal
        (MQTT 5 reason code 0x80 or above)."""
        info = self.paho.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        if qos > 0:
            reason = self._wait(self._acks, info.mid, f"acknowledgement of QoS {qos} publish")
            assert not reason.is_failure, f"{self.id}: publish to {topic} refused: {reason}"

    def disconnect(self):
        """A normal disconnect: DISCONNECT is sent (before loop_stop returns), so no will."""
        self._closed = True
        self.paho.disconnect()
        self.paho.loop_stop()

    def drop(self):
        """Closes the socket without DISCONNECT, as a crashed client or a lost network would.

        The network thread is stopped first so that paho does not reconnect by itself."""
        self._closed = True
        self.paho.loop_stop()
        sock = self.paho.socket()
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()

    def close(self):
        """Disconnects normally unless the test already disconnected or dropped the client."""
        if not self._closed:
            self.disconnect()


class BrokerTest(unittest.TestCase):
    """Helpers shared by the tests."""

    def topic(self, *parts):
        """A topic of this test's own: clients/<test>/<random>[/parts]."""
        name = self.id().rsplit(".", 1)[-1]
        return "/".join((f"clients/{name}/{uuid.uuid4().hex[:10]}",) + parts)

    def client(self, protocol, client_id=None, **options):
        return Client(self, protocol, client_id, **options)

    def forget_session_later(self, protocol, client_id):
        """Removes the session `client_id` left on the broker when the test ends."""

        def forget():
            Client(self, protocol, client_id, clean=True).disconnect()

        self.addCleanup(forget)

    def clear_retained_later(self, protocol, topic):
        """Deletes the retained message on `topic` when the test ends."""

        def clear():
            Client(self, protocol).publish(topic, b"", qos=1, retain=True)

        self.addCleanup(clear)


class QualityOfService(BrokerTest):
    def check_each_qos(self, protocol):
        """A message published at each QoS reaches subscribers at each QoS exactly once, at the
        lower of the two, and QoS 1 and 2 publishes are acknowledged."""
        topic = self.topic()
        subscribers = {}
        for sub_qos in (0, 1, 2):
            subscriber = self.client(protocol)
            self.assertEqual(subscriber.subscribe(topic, qos=sub_qos), [sub_qos])
            subscribers[sub_qos] = subscriber
        publisher = self.client(protocol)
        for pub_qos in (0, 1, 2):
            publisher.publish(topic, f"qos {pub_qos}".encode(), qos=pub_qos)

        for sub_qos, subscriber in subscribers.items():
            received = subscriber.inbox.wait_quiet(3)
            with self.subTest(subscription_qos=sub_qos):
                self.assertEqual(
                    sorted((m.payload, m.qos) for m in received),
                    [(f"qos {q}".encode(), min(q, sub_qos)) for q in (0, 1, 2)],
                )

    def test_each_qos_delivered_once_at_lower_qos_v311(self):
        self.check_each_qos(V311)

    def test_each_qos_delivered_once_at_lower_qos_v5(self):
        self.check_each_qos(V5)


class MixedVersions(BrokerTest):
    def test_v311_and_v5_clients_exchange_messages_both_ways(self):
        to_v5, to_v311 = self.topic("to-v5"), self.topic("to-v311")
        old = self.client(V311)
        new = self.client(V5)
        old.subscribe_granted(to_v311)
        new.subscribe_granted(to_v5)

        old.publish(to_v5, b"from 3.1.1", qos=1)
        new.publish(to_v311, b"from 5", qos=1)

        self.assertEqual(seen(new.inbox.wait_quiet(1)), [(to_v5, b"from 3.1.1")])
        self.assertEqual(seen(old.inbox.wait_quiet(1)), [(to_v311, b"from 5")])


class Retained(BrokerTest):
    def check_retained_then_deleted(self, protocol):
        topic = self.topic()
        self.clear_retained_later(protocol, topic)
        publisher = self.client(protocol)
        publisher.publish(topic, b"kept", qos=1, retain=True)

        later = self.client(protocol)
        later.subscribe_granted(topic)
        [message] = later.inbox.wait_quiet(1)
        self.assertEqual((message.payload, message.retain), (b"kept", True))

        publisher.publish(topic, b"", qos=1, retain=True)
        after_delete = self.client(protocol)
        after_delete.subscribe_granted(topic)
        time.sleep(QUIET)
        self.assertEqual(seen(after_delete.inbox.messages()), [])

    def test_retained_message_reaches_later_subscriber_until_deleted_v311(self):
        self.check_retained_then_deleted(V311)

    def test_retained_message_reaches_later_subscriber_until_deleted_v5(self):
        self.check_retained_then_deleted(V5)

    def test_user_properties_survive_retention_v5(self):
        topic = self.topic()
        self.clear_retained_later(V5, topic)
        pairs = [("site", "north"), ("unit", "celsius")]
        properties = publish_properties(UserProperty=pairs)
        self.client(V5).publish(topic, b"21.5", qos=1, retain=True, properties=properties)

        later = self.client(V5)
        later.subscribe_granted(topic)
        [message] = later.inbox.wait_for(1)
        self.assertTrue(message.retain)
        self.assertEqual(getattr(message.properties, "UserProperty", None), pairs)


class Will(BrokerTest):
    def will_client(self, protocol, topic, client_id=None, delay=None, session_expiry=None):
        will = {"topic": topic, "payload": b"gone", "qos": 1}
        if delay is not None:
            will["properties"] = will_properties(WillDelayInterval=delay)
        properties = None
        if session_expiry is not None:
            properties = connect_properties(SessionExpiryInterval=session_expiry)
            self.forget_session_later(protocol, client_id)
        return self.client(protocol, client_id, will=will, properties=properties)

    def check_will_on_drop(self, protocol):
        topic = self.topic()
        watcher = self.client(protocol)
        watcher.subscribe_granted(topic)
        self.will_client(protocol, topic).drop()
        [message] = watcher.inbox.wait_for(1)
        self.assertEqual((message.topic, message.payload), (topic, b"gone"))

    def check_no_will_on_disconnect(self, protocol):
        topic = self.topic()
        watcher = self.client(protocol)
        watcher.subscribe_granted(topic)
        self.will_client(protocol, topic).disconnect()
        time.sleep(QUIET)
        self.assertEqual(seen(watcher.inbox.messages()), [])

    def test_will_published_when_connection_drops_v311(self):
        self.check_will_on_drop(V311)

    def test_will_published_when_connection_drops_v5(self):
        self.check_will_on_drop(V5)

    def test_no_will_after_normal_disconnect_v311(self):
        self.check_no_will_on_disconnect(V311)

    def test_no_will_after_normal_disconnect_v5(self):
        self.check_no_will_on_disconnect(V5)

    def test_will_delay_interval_delays_will_v5(self):
        topic = self.topic()
        watcher = self.client(V5)
        watcher.subscribe_granted(topic)
        # The session must outlive the delay: a will goes out when its session ends. 3 s, so
        # that a broker counting whole seconds still holds it for the 1 s watched here.
        self.will_client(V5, topic, unique("paho-delayed"), delay=3, session_expiry=60).drop()
        time.sleep(1.0)
        self.assertEqual(seen(watcher.inbox.messages()), [], "the will came before its 3 s delay")
        [message] = watcher.inbox.wait_for(1)
        self.assertEqual(message.payload, b"gone")

    def test_reconnecting_within_will_delay_cancels_will_v5(self):
        watcher = self.client(V5)
        back_id = unique("paho-back")
        back_topic, control_topic = self.topic("back"), self.topic("control")
        watcher.subscribe_granted(back_topic, control_topic)
        back = self.will_client(V5, back_topic, back_id, delay=2, session_expiry=60)
        # A second client with the same delay that stays away: once its will arrives, the first
        # one's delay has run out too.
        control_id = unique("paho-control")
        control = self.will_client(V5, control_topic, control_id, delay=2, session_expiry=60)
        back.drop()
        control.drop()
        session = connect_properties(SessionExpiryInterval=60)
        returned = self.client(V5, back_id, clean=False, properties=session)
        self.assertTrue(returned.session_present)

        watcher.inbox.wait_quiet(1)
        self.assertEqual([m.topic for m in watcher.inbox.messages()], [control_topic])


class Sessions(BrokerTest):
    def check_session_resumes(self, protocol, properties):
        topic = self.topic()
        subscriber_id = unique("paho-resume")
        self.forget_session_later(protocol, subscriber_id)
        subscriber = self.client(protocol, subscriber_id, clean=False, properties=properties)
        subscriber.subscribe_granted(topic, qos=1)
        subscriber.drop()

        publisher = self.client(protocol)
        for n in range(3):
            publisher.publish(topic, f"queued {n}".encode(), qos=1)

        back = self.client(protocol, subscriber_id, clean=False, properties=properties)
        self.assertTrue(back.session_present)
        received = back.inbox.wait_quiet(3)
        self.assertEqual([m.payload for m in received], [b"queued 0", b"queued 1", b"queued 2"])

    def test_session_resumes_with_queued_messages_v311(self):
        self.check_session_resumes(V311, None)

    def test_session_resumes_with_queued_messages_v5(self):
        self.check_session_resumes(V5, connect_properties(SessionExpiryInterval=60))

    def test_session_expires_after_its_interval_v5(self):
        topic = self.topic()
        subscriber_id = unique("paho-expiring")
        self.forget_session_later(V5, subscriber_id)
        properties = connect_properties(SessionExpiryInterval=1)
        subscriber = self.client(V5, subscriber_id, clean=False, properties=properties)
        subscriber.subscribe_granted(topic, qos=1)
        subscriber.drop()
        dropped = time.monotonic()
        self.client(V5).publish(topic, b"for nobody", qos=1)

        time.sleep(max(0.0, 3.0 - (time.monotonic() - dropped)))  # the session's 1 s, and spare
        back = self.client(V5, subscriber_id, clean=False, properties=properties)
        self.assertFalse(back.session_present)
        time.sleep(QUIET)
        self.assertEqual(seen(back.inbox.messages()), [])


class SharedSubscriptions(BrokerTest):
    def test_shared_subscription_delivers_each_message_to_one_member_v5(self):
        topic = self.topic()
        shared = f"$share/{unique('group')}/{topic}"
        members = Inbox()
        first = self.client(V5, inbox=members)
        second = self.client(V5, inbox=members)
        first.subscribe_granted(shared)
        second.subscribe_granted(shared)
        everyone = self.client(V5)
        everyone.subscribe_granted(topic)

        count = 10
        publisher = self.client(V5)
        for n in range(count):
            publisher.publish(topic, f"{n}".encode(), qos=1)

        expected = sorted(f"{n}".encode() for n in range(count))
        self.assertEqual(sorted(m.payload for m in everyone.inbox.wait_quiet(count)), expected)
        members.wait_quiet(count)
        received = members.receivers()
        self.assertEqual(sorted(m.payload for _, m in received), expected, "each exactly once")
        self.assertTrue(all(receiver in (first.id, second.id) for receiver, _ in received))


class RequestResponse(BrokerTest):
    def test_response_topic_and_correlation_data_reach_responder_v5(self):
        request_topic, response_topic = self.topic("request"), self.topic("response")
        responder = self.client(V5)
        responder.subscribe_granted(request_topic)
        requester = self.client(V5)
        requester.subscribe_granted(response_topic)
        correlation = b"\x00request-1"  # binary on purpose

        asking = publish_properties(ResponseTopic=response_topic, CorrelationData=correlation)
        requester.publish(request_topic, b"status?", qos=1, properties=asking)
        [request] = responder.inbox.wait_for(1)
        self.assertEqual(request.properties.ResponseTopic, response_topic)
        self.assertEqual(request.properties.CorrelationData, correlation)

        answering = publish_properties(CorrelationData=request.properties.CorrelationData)
        responder.publish(request.properties.ResponseTopic, b"ok", qos=1, properties=answering)
        [response] = requester.inbox.wait_for(1)
        self.assertEqual(response.payload, b"ok")
        self.assertEqual(response.properties.CorrelationData, correlation)


@unittest.skipUnless(
    os.environ.get("EXPECT_NOSUBSCRIBE_REFUSED") == "1",
    "the broker is not configured to refuse test/nosubscribe (set EXPECT_NOSUBSCRIBE_REFUSED=1)",
)
class RefusedSubscription(BrokerTest):
    def check_refused(self, protocol):
        allowed = self.topic()
        codes = self.client(protocol).subscribe(("test/nosubscribe", 1), (allowed, 1))
        self.assertEqual(codes, [0x80, 1])

    def test_subscription_to_refused_filter_gets_0x80_v311(self):
        self.check_refused(V311)

    def test_subscription_to_refused_filter_gets_0x80_v5(self):
        self.check_refused(V5)


if __name__ == "__main__":
    unittest.main()

"""Durable queues as clients see them, over real sockets: storage until ACK, delivery order,
round-robin and prefetch, ack modes, redelivery, exact subscriber counts, the ocamlmq bugs
pymq must not have (ocamlmq-behaviour.md section 12), bounded memory, async SENDs,
transactions and DISCONNECT.

Proving that something does NOT arrive never sleeps: a marker frame with a receipt is sent on
the same connection, and its RECEIPT must be the next frame (the broker handles one
connection's frames in order and queues a MESSAGE as soon as it decides to deliver it).
Redeliveries are awaited by reading the MESSAGE.
"""

import socket
import sqlite3
import time

import pytest

import pymq
from conftest import count_msgs

STORE_BACKENDS = ("sqlite", "postgresql")

VERSIONS = ["1.0", "1.1", "1.2"]


# -- helpers -----------------------------------------------------------------------------------

@pytest.fixture
def connect(raw, broker):
    """connect(version="1.2", at=None, **connect_headers) -> a connected RawClient on `at` (a
    BrokerThread from start_broker) or on the test's default broker."""
    def make(version="1.2", at=None, **headers):
        client = raw(address=(at or broker).address)
        client.connect(version, **headers)
        return client
    return make


def subscribe(client, queue, sub_id="s", ack="client-individual", **headers):
    """SUBSCRIBE with a receipt. Extra headers as keywords, '_' for '-' (prefetch_count=...);
    ack=None sends no ack header."""
    frame = {"destination": "/queue/" + queue, "id": sub_id}
    if ack is not None:
        frame["ack"] = ack
    frame.update({k.replace("_", "-"): v for k, v in headers.items()})
    client.request("SUBSCRIBE", frame)


def send_all(client, queue, bodies, headers=None):
    """Pipeline one SEND per body, only the last with a receipt, and wait for that receipt:
    every one of them is then stored (batches commit in order). `headers(i)` adds headers."""
    frames = []
    for i, text in enumerate(bodies):
        frame = {"destination": "/queue/" + queue}
        if headers is not None:
            frame.update(headers(i))
        if i == len(bodies) - 1:
            frame["receipt"] = "all-sent"
        frames.append(pymq.encode_frame("SEND", frame, text.encode(), client.version))
    client.send_bytes(b"".join(frames))
    assert client.expect("RECEIPT").headers["receipt-id"] == "all-sent"


def ack_headers(client, message):
    """What identifies `message` in an ACK or NACK: `id` = the `ack` header in 1.2,
    `message-id` (and `subscription`) before."""
    if client.version == "1.2":
        return {"id": message.headers["ack"]}
    return {"message-id": message.headers["message-id"],
            "subscription": message.headers["subscription"]}


def ack(client, message, receipt=False, command="ACK", **extra):
    headers = ack_headers(client, message)
    headers.update(extra)
    if receipt:
        client.request(command, headers)
    else:
        client.send(command, headers)


def nack(client, message, receipt=False, **extra):
    ack(client, message, receipt, command="NACK", **extra)


def assert_nothing_more(client):
    """No MESSAGE is queued for `client`: a marker's RECEIPT is the next frame."""
    client.request("SEND", {"destination": "/control/count-subscribers/topic/marker"})


def count_subscribers(client, queue):
    receipt = client.request("SEND", {"destination": "/control/count-subscribers/queue/" + queue})
    return int(receipt.headers["num-subscribers"])


def body(message):
    return message.body.decode()


def receive(client, n):
    return [client.expect("MESSAGE") for _ in range(n)]


def durable_count(url, queue):
    """Messages of `queue` committed to the store, read through a connection of our own, not
    through the broker: what a crash right now would leave."""
    if url.startswith("postgresql://"):
        import psycopg2
        db = psycopg2.connect(url)
        try:
            with db.cursor() as cursor:
                cursor.execute("SELECT COUNT(*) FROM pymq_messages WHERE queue = %s", (queue,))
                return cursor.fetchone()[0]
        finally:
            db.close()
    db = sqlite3.connect("file:%s?mode=ro" % url, uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM messages WHERE queue = ?", (queue,)).fetchone()[0]
    finally:
        db.close()


def reset(client):
    """Close abruptly: RST, no DISCONNECT."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    client.close()


def active_queues(b):
    return b.call(lambda: set(b.server.broker.queues.queues))


# -- SEND, MESSAGE, storage until ACK ----------------------------------------------------------

@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mode", ["client", "client-individual"])
def test_send_with_receipt_then_consume_and_ack(start_broker, connect, new_store, version, mode):
    path = new_store()
    b = start_broker(db=path)
    producer = connect(version, at=b)
    producer.request("SEND", {"destination": "/queue/jobs", "x-job": "42",
                              "content-type": "text/plain", "weird": "a b"}, b"payload\0!")
    assert durable_count(path, "jobs") == 1        # stored when the RECEIPT came
    assert count_msgs(producer, "jobs") == 1

    consumer = connect(version, at=b)
    subscribe(consumer, "jobs", "sub-1", ack=mode)
    message = consumer.expect("MESSAGE")
    headers = message.headers
    assert message.body == b"payload\0!"
    assert headers["x-job"] == "42"
    assert headers["content-type"] == "text/plain"
    assert headers["weird"] == "a b"
    assert headers["destination"] == "/queue/jobs"
    assert headers["subscription"] == "sub-1"
    assert headers["message-id"]
    assert "redelivered" not in headers
    assert "receipt" not in headers
    if version == "1.2":
        assert headers["ack"] == headers["message-id"]
    else:
        assert "ack" not in headers

    assert count_msgs(producer, "jobs") == 1        # in flight: still stored
    assert durable_count(path, "jobs") == 1
    ack(consumer, message, receipt=True)
    assert count_msgs(producer, "jobs") == 0
    assert durable_count(path, "jobs") == 0
    assert_nothing_more(consumer)


@pytest.mark.parametrize("mode", ["client", "client-individual"])
def test_ack_receipt_comes_once_the_deletion_is_durable(start_broker, connect, new_store, mode):
    path = new_store()
    b = start_broker(db=path)
    send_all(connect(at=b), "jobs", ["a", "b", "c"])
    consumer = connect(at=b)
    subscribe(consumer, "jobs", ack=mode)
    got = receive(consumer, 3)
    ack(consumer, got[1], receipt=True)
    assert durable_count(path, "jobs") == (1 if mode == "client" else 2)
    ack(consumer, got[2], receipt=True)
    assert durable_count(path, "jobs") == (0 if mode == "client" else 1)


def test_auto_mode_has_no_ack_header_in_1_2(connect):
    producer = connect()
    producer.request("SEND", {"destination": "/queue/q"}, b"x")
    consumer = connect()
    subscribe(consumer, "q", ack="auto")
    assert "ack" not in consumer.expect("MESSAGE").headers


@pytest.mark.parametrize("version", VERSIONS)
def test_stomp_py_produce_consume_ack(stomp_client, version):
    producer, plisten = stomp_client(version)
    producer.send("/queue/work", "job-1", headers={"receipt": "p1", "x-job": "1"})
    assert plisten.receipts.get(timeout=5).headers["receipt-id"] == "p1"
    producer.send("/queue/work", "job-2", headers={"receipt": "p2", "x-job": "2"})
    assert plisten.receipts.get(timeout=5).headers["receipt-id"] == "p2"

    def count(receipt):
        producer.send("/control/count-msgs/queue/work", "", headers={"receipt": receipt})
        frame = plisten.receipts.get(timeout=5)
        assert frame.headers["receipt-id"] == receipt
        return int(frame.headers["num-messages"])

    consumer, clisten = stomp_client(version)
    consumer.subscribe("/queue/work", id="s1", ack="client-individual")
    first, second = clisten.next_message(), clisten.next_message()
    assert (first.body, second.body) == ("job-1", "job-2")
    assert first.headers["x-job"] == "1"
    assert first.headers["destination"] == "/queue/work"
    assert first.headers["subscription"] == "s1"

    def ack_or_nack(method, message, receipt):
        mid = message.headers["message-id"]
        if version == "1.0":
            method(mid, receipt=receipt)
        elif version == "1.1":
            method(mid, "s1", receipt=receipt)
        else:
            method(message.headers["ack"], receipt=receipt)
        assert clisten.receipts.get(timeout=5).headers["receipt-id"] == receipt

    if version != "1.0":            # NACK exists from 1.1 on: the message comes back
        ack_or_nack(consumer.nack, second, "n1")
        again = clisten.next_message()
        assert again.body == "job-2"
        assert again.headers["redelivered"] == "true"
        second = again
    assert count("c1") == 2
    ack_or_nack(consumer.ack, first, "a1")
    assert count("c2") == 1
    ack_or_nack(consumer.ack, second, "a2")
    assert count("c3") == 0


# -- delivery order ----------------------------------------------------------------------------

MIX = [None, "9", "0", "4", None, "5", "9", "1", None, "4", "0", "7", "3", None, "8", "9"]


def _expected_order(priorities):
    return sorted(range(len(priorities)), key=lambda i: (-int(priorities[i] or 4), i))


def _priority_headers(priorities):
    return lambda i: {} if priorities[i] is None else {"priority": priorities[i]}


def test_priority_order_from_storage(connect):
    producer = connect()
    for i, priority in enumerate(MIX):
        headers = {"destination": "/queue/p"}
        if priority is not None:
            headers["priority"] = priority
        producer.request("SEND", headers, str(i).encode())
    consumer = connect()
    subscribe(consumer, "p")
    got = [int(body(m)) for m in receive(consumer, len(MIX))]
    assert got == _expected_order(MIX)


def test_priority_order_in_memory(connect):
    """Messages arriving while the only subscriber is busy wait in the active queue's buffer,
    in the same order as from storage."""
    consumer = connect()
    subscribe(consumer, "p", prefetch="1")
    producer = connect()
    producer.request("SEND", {"destination": "/queue/p"}, b"busy")
    held = consumer.expect("MESSAGE")
    for i, priority in enumerate(MIX):
        headers = {"destination": "/queue/p"}
        if priority is not None:
            headers["priority"] = priority
        producer.request("SEND", headers, str(i).encode())
    got = []
    ack(consumer, held)
    for _ in MIX:
        message = consumer.expect("MESSAGE")
        got.append(int(body(message)))
        ack(consumer, message)
    assert got == _expected_order(MIX)


def test_default_priority_is_4(connect):
    producer = connect()
    for text, priority in [("low", "3"), ("default-1", None), ("four", "4"), ("high", "5"),
                           ("default-2", None)]:
        headers = {"destination": "/queue/d"}
        if priority is not None:
            headers["priority"] = priority
        producer.request("SEND", headers, text.encode())
    consumer = connect()
    subscribe(consumer, "d")
    assert [body(m) for m in receive(consumer, 5)] == [
        "high", "default-1", "four", "default-2", "low"]


def test_priority_order_holds_across_storage_refills(connect):
    n = 1200                        # more than 2 * REFILL_BATCH
    assert n > 2 * pymq.REFILL_BATCH
    priorities = [None if i % 11 == 0 else str(i * 7 % 10) for i in range(n)]
    producer = connect()
    send_all(producer, "big", [str(i) for i in range(n)], _priority_headers(priorities))
    consumer = connect()
    subscribe(consumer, "big", prefetch="50")
    got = []
    for _ in range(n):
        message = consumer.expect("MESSAGE")
        got.append(int(body(message)))
        ack(consumer, message)
    assert got == _expected_order(priorities)
    assert count_msgs(consumer, "big") == 0


def test_urgent_message_overtakes_a_stored_backlog(connect):
    """A higher-priority SEND arriving while most of a backlog is still only in storage is the
    next one delivered."""
    producer = connect()
    send_all(producer, "backlog", [str(i) for i in range(1200)])
    consumer = connect()
    subscribe(consumer, "backlog", prefetch="1")
    for i in range(3):
        message = consumer.expect("MESSAGE")
        assert body(message) == str(i)
        ack(consumer, message)
    held = consumer.expect("MESSAGE")
    assert body(held) == "3"
    producer.request("SEND", {"destination": "/queue/backlog", "priority": "9"}, b"urgent")
    ack(consumer, held)
    urgent = consumer.expect("MESSAGE")
    assert body(urgent) == "urgent"
    ack(consumer, urgent)
    assert body(consumer.expect("MESSAGE")) == "4"


@pytest.mark.parametrize("header, value", [
    ("priority", "10"), ("priority", "x"), ("priority", "-1"), ("priority", ""),
    ("ack-timeout", "x"), ("ack-timeout", "-1"),
])
def test_bad_priority_or_ack_timeout_is_an_error_with_receipt_id(connect, header, value):
    producer = connect()
    producer.send("SEND", {"destination": "/queue/bad", header: value, "receipt": "bad-1"},
                  b"x")
    producer.expect_error(header, receipt="bad-1")
    assert count_msgs(connect(), "bad") == 0        # nothing stored


# -- round-robin and prefetch ------------------------------------------------------------------

def test_round_robin_alternates_between_ready_subscribers(connect):
    a, b_ = connect(), connect()
    subscribe(a, "rr", "a", prefetch="1")
    subscribe(b_, "rr", "b", prefetch="1")
    producer = connect()
    for i in range(6):
        producer.request("SEND", {"destination": "/queue/rr"}, str(i).encode())
        taker, other = (a, b_) if i % 2 == 0 else (b_, a)
        message = taker.expect("MESSAGE")
        assert body(message) == str(i)
        assert_nothing_more(other)
        ack(taker, message, receipt=True)


def test_round_robin_burst(connect):
    a, b_ = connect(), connect()
    subscribe(a, "rr", "a", prefetch="10")
    subscribe(b_, "rr", "b", prefetch="10")
    send_all(connect(), "rr", [str(i) for i in range(10)])
    assert [body(m) for m in receive(a, 5)] == ["0", "2", "4", "6", "8"]
    assert [body(m) for m in receive(b_, 5)] == ["1", "3", "5", "7", "9"]
    assert_nothing_more(a)
    assert_nothing_more(b_)


def _check_prefetch(consumer, expected):
    """`expected` messages arrive and no more; each ACK lets exactly one more through."""
    got = receive(consumer, expected)
    assert [body(m) for m in got] == [str(i) for i in range(expected)]
    assert_nothing_more(consumer)
    ack(consumer, got[-1])
    assert body(consumer.expect("MESSAGE")) == str(expected)
    assert_nothing_more(consumer)
    ack(consumer, got[0])
    assert body(consumer.expect("MESSAGE")) == str(expected + 1)
    assert_nothing_more(consumer)


@pytest.mark.parametrize("header", pymq.PREFETCH_HEADERS)
def test_prefetch_limits_messages_in_flight(start_broker, connect, header):
    b = start_broker(max_prefetch=10)
    send_all(connect(at=b), "pf", [str(i) for i in range(12)])
    consumer = connect(at=b)
    subscribe(consumer, "pf", **{header.replace("-", "_"): "3"})
    _check_prefetch(consumer, 3)


@pytest.mark.parametrize("headers", [{"prefetch": "50"}, {}], ids=["capped", "missing"])
def test_prefetch_defaults_to_and_is_capped_by_max_prefetch(start_broker, connect, headers):
    b = start_broker(max_prefetch=3)
    send_all(connect(at=b), "pf", [str(i) for i in range(10)])
    consumer = connect(at=b)
    subscribe(consumer, "pf", **headers)
    _check_prefetch(consumer, 3)


def test_prefetch_in_client_mode_counts_until_the_cumulative_ack(connect):
    send_all(connect(), "pf", [str(i) for i in range(10)])
    consumer = connect()
    subscribe(consumer, "pf", ack="client", prefetch="3")
    got = receive(consumer, 3)
    assert_nothing_more(consumer)
    ack(consumer, got[1])                   # covers 0 and 1: two slots free
    assert [body(m) for m in receive(consumer, 2)] == ["3", "4"]
    assert_nothing_more(consumer)


# -- ack modes ---------------------------------------------------------------------------------

@pytest.mark.parametrize("explicit", [True, False], ids=["ack-header", "default"])
def test_auto_mode_deletes_on_delivery(connect, explicit):
    producer = connect()
    send_all(producer, "auto", ["a", "b", "c"])
    consumer = connect()
    subscribe(consumer, "auto", ack="auto" if explicit else None)
    got = receive(consumer, 3)
    assert [body(m) for m in got] == ["a", "b", "c"]
    assert count_msgs(producer, "auto") == 0
    # ocamlmq-style clients ACK even in auto mode: ignored quietly.
    consumer.request("ACK", {"id": got[0].headers["message-id"]})
    assert count_msgs(producer, "auto") == 0


def _fake_message(client, message_id="1"):
    """A MESSAGE-shaped frame for ACKing an id that is not in flight."""
    return pymq.Frame("MESSAGE", {"message-id": message_id, "ack": message_id,
                                  "subscription": "s"})


@pytest.mark.parametrize("version", VERSIONS)
def test_client_mode_ack_is_cumulative(connect, version):
    producer = connect()
    send_all(producer, "cm", [str(i) for i in range(5)])
    consumer = connect(version)
    subscribe(consumer, "cm", ack="client")
    got = receive(consumer, 5)
    ack(consumer, got[2], receipt=True)            # acks 0, 1 and 2
    assert count_msgs(producer, "cm") == 2
    consumer.request("UNSUBSCRIBE", {"id": "s"})   # 3 and 4 go back; 0-2 are gone
    subscribe(consumer, "cm", ack="client")
    again = receive(consumer, 2)
    assert [body(m) for m in again] == ["3", "4"]
    assert all(m.headers["redelivered"] == "true" for m in again)
    ack(consumer, again[1], receipt=True)
    assert count_msgs(producer, "cm") == 0


def test_client_mode_ack_covers_only_its_own_subscription(connect):
    producer = connect()
    consumer = connect()
    subscribe(consumer, "one", "s1", ack="client")
    subscribe(consumer, "two", "s2", ack="client")
    for i in range(3):
        producer.request("SEND", {"destination": "/queue/two"}, b"two-%d" % i)
        producer.request("SEND", {"destination": "/queue/one"}, b"one-%d" % i)
    got = receive(consumer, 6)
    last_one = [m for m in got if m.headers["subscription"] == "s1"][-1]
    ack(consumer, last_one, receipt=True)
    assert count_msgs(producer, "one") == 0
    assert count_msgs(producer, "two") == 3


@pytest.mark.parametrize("version", VERSIONS)
def test_client_individual_ack_is_only_that_message(connect, version):
    producer = connect()
    send_all(producer, "ci", [str(i) for i in range(3)])
    consumer = connect(version)
    subscribe(consumer, "ci")
    got = receive(consumer, 3)
    ack(consumer, got[2], receipt=True)
    assert count_msgs(producer, "ci") == 2
    ack(consumer, got[0], receipt=True)
    assert count_msgs(producer, "ci") == 1
    consumer.request("UNSUBSCRIBE", {"id": "s"})
    subscribe(consumer, "ci")
    again = consumer.expect("MESSAGE")
    assert body(again) == "1"
    assert again.headers["redelivered"] == "true"


@pytest.mark.parametrize("version", VERSIONS)
def test_ack_identifies_the_message_by_version(connect, version):
    """1.0/1.1: message-id; 1.2: id, whose value is the MESSAGE's ack header."""
    producer = connect()
    producer.request("SEND", {"destination": "/queue/ids"}, b"x")
    consumer = connect(version)
    subscribe(consumer, "ids")
    message = consumer.expect("MESSAGE")
    if version == "1.2":
        consumer.request("ACK", {"id": message.headers["ack"]})
    else:
        consumer.request("ACK", {"message-id": message.headers["message-id"]})
    assert count_msgs(producer, "ids") == 0


@pytest.mark.parametrize("version, wrong_key", [("1.2", "message-id"), ("1.1", "id")])
def test_ack_without_the_version_key_is_an_error(connect, version, wrong_key):
    producer = connect()
    producer.request("SEND", {"destination": "/queue/ids"}, b"x")
    consumer = connect(version)
    subscribe(consumer, "ids")
    message = consumer.expect("MESSAGE")
    consumer.send("ACK", {wrong_key: message.headers["message-id"], "receipt": "a"})
    consumer.expect_error("ACK needs", receipt="a")
    assert count_msgs(producer, "ids") == 1


@pytest.mark.parametrize("version", VERSIONS)
def test_ack_of_unknown_id_is_ignored_quietly(connect, version):
    producer = connect()
    producer.request("SEND", {"destination": "/queue/u"}, b"x")
    consumer = connect(version)
    subscribe(consumer, "u")
    message = consumer.expect("MESSAGE")
    for unknown in ("nope", "999999", ""):
        consumer.request("ACK", ack_headers(consumer, _fake_message(consumer, unknown)))
    assert count_msgs(producer, "u") == 1
    ack(consumer, message, receipt=True)            # the connection still works
    assert count_msgs(producer, "u") == 0
    ack(consumer, message, receipt=True)            # a second ACK: no longer pending
    assert count_msgs(producer, "u") == 0


def test_ack_of_another_connections_message_is_ignored(connect):
    producer = connect()
    producer.request("SEND", {"destination": "/queue/o"}, b"x")
    owner, other = connect(), connect()
    subscribe(owner, "o")
    subscribe(other, "o")
    message = owner.expect("MESSAGE")
    ack(other, message, receipt=True)
    assert count_msgs(producer, "o") == 1
    ack(owner, message, receipt=True)
    assert count_msgs(producer, "o") == 0


@pytest.mark.parametrize("default_ack", ["client", "client-individual"])
def test_default_ack_option_applies_without_an_ack_header(start_broker, connect, default_ack):
    b = start_broker(default_ack=default_ack)
    producer = connect(at=b)
    send_all(producer, "da", ["a", "b"])
    consumer = connect(at=b)
    subscribe(consumer, "da", ack=None)
    got = receive(consumer, 2)
    assert got[0].headers["ack"] == got[0].headers["message-id"]
    assert count_msgs(producer, "da") == 2
    ack(consumer, got[1], receipt=True)
    assert count_msgs(producer, "da") == (0 if default_ack == "client" else 1)
    # An explicit header still wins over the option.
    other = connect(at=b)
    subscribe(other, "da2", ack="auto")
    producer.request("SEND", {"destination": "/queue/da2"}, b"x")
    assert "ack" not in other.expect("MESSAGE").headers
    assert count_msgs(producer, "da2") == 0


# -- redelivery --------------------------------------------------------------------------------

def _two_consumers_a_holding_m1(connect, at=None, version="1.2", send_headers=None):
    """A and B subscribed with room to spare; A holds m1 and B holds m2, so that the round-robin
    turn is A's again: a redelivery reaching B went to "another" consumer on purpose."""
    a, b_ = connect(version, at=at), connect(version, at=at)
    subscribe(a, "re", "a", prefetch="10")
    subscribe(b_, "re", "b", prefetch="10")
    producer = connect(at=at)
    producer.request("SEND", dict({"destination": "/queue/re"}, **(send_headers or {})), b"m1")
    producer.request("SEND", {"destination": "/queue/re"}, b"m2")
    m1, m2 = a.expect("MESSAGE"), b_.expect("MESSAGE")
    assert (body(m1), body(m2)) == ("m1", "m2")
    assert "redelivered" not in m1.headers
    return a, b_, producer, m1, m2


def _expect_redelivered(client, text):
    message = client.expect("MESSAGE")
    assert body(message) == text
    assert message.headers["redelivered"] == "true"
    return message


@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_nack_redelivers_to_another_ready_subscriber(connect, version):
    a, b_, producer, m1, _ = _two_consumers_a_holding_m1(connect, version=version)
    nack(a, m1, receipt=True)
    again = _expect_redelivered(b_, "m1")
    assert again.headers["message-id"] == m1.headers["message-id"]
    assert_nothing_more(a)
    assert count_msgs(producer, "re") == 2
    ack(b_, again, receipt=True)
    assert count_msgs(producer, "re") == 1


def test_nack_with_a_single_subscriber_comes_back_to_it(connect):
    producer = connect()
    producer.request("SEND", {"destination": "/queue/one"}, b"m")
    consumer = connect()
    subscribe(consumer, "one", prefetch="1")
    nack(consumer, consumer.expect("MESSAGE"))
    ack(consumer, _expect_redelivered(consumer, "m"), receipt=True)
    assert count_msgs(producer, "one") == 0


@pytest.mark.parametrize("source", ["send-header", "broker-option"])
def test_ack_timeout_redelivers_and_the_late_ack_is_ignored(start_broker, connect, source):
    if source == "send-header":
        b, send_headers = start_broker(), {"ack-timeout": "0.25"}
    else:
        b, send_headers = start_broker(ack_timeout=0.25), None
    a, b_, producer, m1, m2 = _two_consumers_a_holding_m1(connect, at=b,
                                                         send_headers=send_headers)
    if source == "broker-option":
        ack(b_, m2, receipt=True)   # m2 has the broker's timeout too: do not let it expire
    started = time.monotonic()
    again = _expect_redelivered(b_, "m1")
    assert time.monotonic() - started > 0.1
    ack(a, m1, receipt=True)        # too late: A no longer holds it, B's copy stays pending
    expected = 1 if source == "broker-option" else 2
    assert count_msgs(producer, "re") == expected
    assert_nothing_more(a)
    ack(b_, again, receipt=True)
    assert count_msgs(producer, "re") == expected - 1


def test_send_ack_timeout_overrides_the_broker_option(start_broker, connect):
    b = start_broker(ack_timeout=0.2)
    a = connect(at=b)
    subscribe(a, "ov", "a", prefetch="10")
    producer = connect(at=b)
    producer.request("SEND", {"destination": "/queue/ov", "ack-timeout": "60"}, b"patient")
    producer.request("SEND", {"destination": "/queue/ov"}, b"default")
    assert [body(m) for m in receive(a, 2)] == ["patient", "default"]
    b_ = connect(at=b)
    subscribe(b_, "ov", "b", prefetch="10")
    # Only "default" expires; "patient", delivered first with the broker's 0.2 s, would have
    # expired no later and been redelivered first.
    _expect_redelivered(b_, "default")
    assert_nothing_more(b_)


def test_unsubscribe_redelivers_messages_in_flight(connect):
    producer = connect()
    a = connect()
    subscribe(a, "un", "a")
    send_all(producer, "un", ["m1", "m2"])
    held = receive(a, 2)
    b_ = connect()
    subscribe(b_, "un", "b")
    a.request("UNSUBSCRIBE", {"id": "a"})
    again = [_expect_redelivered(b_, "m1"), _expect_redelivered(b_, "m2")]
    ack(a, held[0], receipt=True)                  # not A's any more: ignored
    assert count_msgs(producer, "un") == 2
    for message in again:
        ack(b_, message)
    assert count_msgs(b_, "un") == 0


@pytest.mark.parametrize("how", ["close", "reset"])
def test_connection_loss_redelivers_at_once(connect, how):
    a, b_, producer, m1, _ = _two_consumers_a_holding_m1(connect)
    if how == "close":
        a.close()
    else:
        reset(a)
    _expect_redelivered(b_, "m1")
    assert count_msgs(producer, "re") == 2


def test_heart_beat_expiry_redelivers(start_broker, connect):
    b = start_broker(heart_beat="0,100")
    producer = connect(at=b)
    producer.request("SEND", {"destination": "/queue/hb"}, b"m1")
    silent = connect(at=b, heart_beat="100,0")
    assert silent.version == "1.2"
    subscribe(silent, "hb", "silent")               # its last frame: then it goes quiet
    assert body(silent.expect("MESSAGE")) == "m1"
    alive = connect(at=b)                          # no heart-beats negotiated
    subscribe(alive, "hb", "alive")
    _expect_redelivered(alive, "m1")
    silent.expect_error("heart-beat")
    assert count_subscribers(producer, "hb") == 1


@pytest.mark.parametrize("how", ["unsubscribe", "disconnect"])
def test_redelivered_after_the_queue_had_no_subscribers(broker, connect, how):
    producer = connect()
    send_all(producer, "idle", ["m1", "m2"])
    a = connect()
    subscribe(a, "idle", "a")
    assert [body(m) for m in receive(a, 2)] == ["m1", "m2"]
    if how == "unsubscribe":
        a.request("UNSUBSCRIBE", {"id": "a"})
    else:
        a.send("DISCONNECT", {"receipt": "bye"})
        assert a.expect("RECEIPT").headers["receipt-id"] == "bye"
    assert "idle" not in active_queues(broker)
    producer.request("SEND", {"destination": "/queue/idle"}, b"m3")
    b_ = connect()
    subscribe(b_, "idle", "b")
    _expect_redelivered(b_, "m1")
    _expect_redelivered(b_, "m2")
    fresh = b_.expect("MESSAGE")
    assert body(fresh) == "m3"
    assert "redelivered" not in fresh.headers


# -- count-subscribers -------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["unsubscribe", "disconnect", "close", "reset", "heart-beat",
                                 "protocol-error"])
def test_count_subscribers_is_exact_after_a_subscriber_leaves(start_broker, connect, how):
    b = start_broker(heart_beat="0,100")
    producer = connect(at=b)
    assert count_subscribers(producer, "cs") == 0
    leaver = connect(at=b, **({"heart_beat": "100,0"} if how == "heart-beat" else {}))
    subscribe(leaver, "cs", "a", prefetch="10")
    stayer = connect(at=b)
    subscribe(stayer, "cs", "b", prefetch="100")
    producer.request("SEND", {"destination": "/queue/cs"}, b"m1")
    assert body(leaver.expect("MESSAGE")) == "m1"
    assert count_subscribers(producer, "cs") == 2

    if how == "unsubscribe":
        leaver.request("UNSUBSCRIBE", {"id": "a"})
    elif how == "disconnect":
        leaver.send("DISCONNECT", {"receipt": "bye"})
        leaver.expect("RECEIPT")
    elif how == "close":
        leaver.close()
    elif how == "reset":
        reset(leaver)
    elif how == "heart-beat":
        pass                                        # silence
    else:
        leaver.send("NONSENSE")
    _expect_redelivered(stayer, "m1")               # the subscription is gone by now
    assert count_subscribers(producer, "cs") == 1
    # The one left takes everything: nothing goes to the dead one.
    send_all(producer, "cs", [str(i) for i in range(10)])
    assert [body(m) for m in receive(stayer, 10)] == [str(i) for i in range(10)]
    assert_nothing_more(stayer)
    stayer.request("UNSUBSCRIBE", {"id": "b"})
    assert count_subscribers(producer, "cs") == 0


def test_count_subscribers_unchanged_by_an_ack_timeout(connect):
    a, b_, producer, m1, _ = _two_consumers_a_holding_m1(connect,
                                                         send_headers={"ack-timeout": "0.1"})
    _expect_redelivered(b_, "m1")
    assert count_subscribers(producer, "re") == 2
    producer.request("SEND", {"destination": "/queue/re"}, b"m3")
    assert body(a.expect("MESSAGE")) == "m3"       # A, still subscribed, takes its turn


# -- ocamlmq section 12: bugs pymq must not have -----------------------------------------------

@pytest.mark.parametrize("path", ["stored", "in-memory"])
def test_ocamlmq_2_fifo_within_a_priority_is_by_arrival_not_string_ids(connect, path):
    producer = connect()
    consumer = connect()
    if path == "in-memory":
        subscribe(consumer, "fifo", prefetch="1")
        producer.request("SEND", {"destination": "/queue/fifo"}, b"busy")
        busy = consumer.expect("MESSAGE")
    for i in range(1, 13):
        producer.request("SEND", {"destination": "/queue/fifo"}, str(i).encode())
    if path == "stored":
        subscribe(consumer, "fifo", prefetch="12")
        got = receive(consumer, 12)
    else:
        ack(consumer, busy)
        got = []
        for _ in range(12):
            got.append(consumer.expect("MESSAGE"))
            ack(consumer, got[-1])
    assert [body(m) for m in got] == [str(i) for i in range(1, 13)]
    ids = [m.headers["message-id"] for m in got]
    assert sorted(ids, key=str) != ids              # string order would have got this wrong
    assert [int(i) for i in ids] == sorted(int(i) for i in ids)


@pytest.mark.parametrize("backlog", [1, pymq.REFILL_BATCH + 100])
def test_ocamlmq_2_a_new_message_does_not_jump_ahead_of_the_stored_backlog(connect, backlog):
    """ocamlmq's other FIFO bug: unflushed messages overtook the on-disk backlog. Here the
    SUBSCRIBE and a SEND arrive in one packet, so the SEND is handled while the subscription's
    first load from storage is still under way; it was sent after the whole backlog and has
    the same priority, so it comes last."""
    send_all(connect(), "jump", [str(i) for i in range(backlog)])
    consumer = connect()
    consumer.send_bytes(
        pymq.encode_frame("SUBSCRIBE", {"destination": "/queue/jump", "id": "s", "ack": "auto"})
        + pymq.encode_frame("SEND", {"destination": "/queue/jump"}, b"new"))
    got = [body(m) for m in receive(consumer, backlog + 1)]
    assert got == [str(i) for i in range(backlog)] + ["new"]


def test_ocamlmq_7_subscribers_a_and_b_a_takes_a_message_and_closes(connect):
    """The verified ocamlmq bug: B gets the redelivery but count-subscribers still said 2."""
    a, b_ = connect(), connect()
    subscribe(a, "z", "a")
    subscribe(b_, "z", "b")
    producer = connect()
    producer.request("SEND", {"destination": "/queue/z"}, b"m")
    assert body(a.expect("MESSAGE")) == "m"
    a.close()
    _expect_redelivered(b_, "m")
    assert count_subscribers(producer, "z") == 1


def test_ocamlmq_7_unsubscribe_is_final_despite_a_late_ack_or_ack_timeout(connect):
    a, b_ = connect(), connect()
    subscribe(a, "z", "a")
    subscribe(b_, "z", "b")
    producer = connect()
    producer.request("SEND", {"destination": "/queue/z", "ack-timeout": "0.2"}, b"m")
    held = a.expect("MESSAGE")
    a.request("UNSUBSCRIBE", {"id": "a"})
    _expect_redelivered(b_, "m")
    ack(a, held, receipt=True)                      # late ACK on the old subscription
    assert count_subscribers(producer, "z") == 1
    assert count_msgs(producer, "z") == 1
    # B lets it time out: the only subscriber left is B, so it comes back to B (a resubscribed
    # A, being another ready consumer, would have been preferred).
    again = _expect_redelivered(b_, "m")
    assert_nothing_more(a)
    assert count_subscribers(producer, "z") == 1
    ack(b_, again, receipt=True)
    assert count_msgs(producer, "z") == 0
    # Still nothing for A, even for new messages.
    producer.request("SEND", {"destination": "/queue/z"}, b"new")
    assert body(b_.expect("MESSAGE")) == "new"
    assert_nothing_more(a)


def test_ocamlmq_8_a_subscription_never_loses_a_prefetch_slot(connect):
    producer = connect()
    consumer = connect()
    subscribe(consumer, "slot", prefetch="1")
    kinds = ["ack", "nack", "timeout", "double-ack", "unknown-ack", "nack-then-timeout"] * 3
    for i, kind in enumerate(kinds):
        headers = {"destination": "/queue/slot"}
        if "timeout" in kind:
            headers["ack-timeout"] = "0.15"
        producer.request("SEND", headers, str(i).encode())
        message = consumer.expect("MESSAGE")
        assert body(message) == str(i), kind
        if kind == "nack" or kind == "nack-then-timeout":
            nack(consumer, message)
            message = _expect_redelivered(consumer, str(i))
        if "timeout" in kind:
            message = _expect_redelivered(consumer, str(i))
        if kind == "unknown-ack":
            consumer.send("ACK", ack_headers(consumer, _fake_message(consumer, "424242")))
        ack(consumer, message, receipt=True)
        if kind == "double-ack":
            ack(consumer, message, receipt=True)
        assert_nothing_more(consumer)
    # Exactly one slot: one arrives, the next only after its ACK.
    send_all(producer, "slot", ["last-1", "last-2"])
    first = consumer.expect("MESSAGE")
    assert body(first) == "last-1"
    assert_nothing_more(consumer)
    ack(consumer, first)
    assert body(consumer.expect("MESSAGE")) == "last-2"
    assert_nothing_more(consumer)


def test_ocamlmq_9_async_sends_while_a_consumer_subscribes_all_arrive(connect):
    producer = connect()
    for round_, split in enumerate([0, 1, 37, 150, 299, 300]):
        queue = "race-%d" % round_
        frames = [pymq.encode_frame("SEND", {"destination": "/queue/" + queue},
                                    str(i).encode()) for i in range(300)]
        consumer = connect()
        producer.send_bytes(b"".join(frames[:split]))
        consumer.send("SUBSCRIBE", {"destination": "/queue/" + queue, "id": "s",
                                    "ack": "client-individual", "prefetch": "7"})
        producer.send_bytes(b"".join(frames[split:]))
        got = []
        for _ in range(300):
            message = consumer.expect("MESSAGE")
            got.append(int(body(message)))
            ack(consumer, message)
        assert sorted(got) == list(range(300)), split
        assert count_msgs(consumer, queue) == 0
        assert_nothing_more(consumer)


def test_ocamlmq_9_nacks_and_timeouts_with_a_backlog_in_storage(connect):
    n = 1200
    producer = connect()
    send_all(producer, "stall", [str(i) for i in range(n)],
             lambda i: {"ack-timeout": "0.2"} if i % 150 == 75 else {})
    consumer = connect()
    subscribe(consumer, "stall", prefetch="20")
    seen, acked = set(), set()
    while len(acked) < n:
        message = consumer.expect("MESSAGE")
        text = body(message)
        assert text not in acked
        i = int(text)
        first_time = text not in seen
        seen.add(text)
        if not first_time:
            assert message.headers["redelivered"] == "true"
        if first_time and i % 7 == 3:
            nack(consumer, message)
        elif first_time and i % 150 == 75:
            pass                                    # let it time out
        else:
            ack(consumer, message)
            acked.add(text)
    assert count_msgs(consumer, "stall") == 0
    assert_nothing_more(consumer)


def test_ocamlmq_13_nack_exists_and_redelivery_is_flagged_and_goes_elsewhere(connect):
    a, b_, producer, m1, m2 = _two_consumers_a_holding_m1(connect)
    nack(a, m1)
    again = _expect_redelivered(b_, "m1")
    assert_nothing_more(a)
    nack(b_, again)             # B has both now; A is the other ready consumer
    _expect_redelivered(a, "m1")
    assert_nothing_more(b_)


def test_ocamlmq_14_no_grace_after_eof_and_the_dead_connection_is_never_picked(connect):
    a, b_, producer, m1, m2 = _two_consumers_a_holding_m1(connect)
    started = time.monotonic()
    a.close()
    _expect_redelivered(b_, "m1")
    assert time.monotonic() - started < 1.0        # ocamlmq waited 2 s
    send_all(producer, "re", [str(i) for i in range(8)])
    assert [body(m) for m in receive(b_, 8)] == [str(i) for i in range(8)]
    assert count_subscribers(producer, "re") == 1


# -- memory ------------------------------------------------------------------------------------

def test_a_queue_without_subscribers_holds_no_broker_memory(broker, connect):
    producer = connect()
    send_all(producer, "cold", ["a", "b"])
    assert "cold" not in active_queues(broker)      # SENDs to an idle queue create nothing
    consumer = connect()
    subscribe(consumer, "cold", ack="auto")
    assert [body(m) for m in receive(consumer, 2)] == ["a", "b"]
    assert "cold" in active_queues(broker)
    consumer.request("UNSUBSCRIBE", {"id": "s"})
    assert "cold" not in active_queues(broker)
    # Left with a message in flight: it keeps nothing; the message's delivery count is stored.
    producer.request("SEND", {"destination": "/queue/cold"}, b"c")
    subscribe(consumer, "cold", "s2")
    consumer.expect("MESSAGE")
    consumer.send("DISCONNECT", {"receipt": "bye"})
    consumer.expect("RECEIPT")
    assert "cold" not in active_queues(broker)
    again = connect()
    subscribe(again, "cold")
    redelivered = _expect_redelivered(again, "c")
    assert redelivered.headers["redelivery-count"] == "1"
    ack(again, redelivered)
    again.request("UNSUBSCRIBE", {"id": "s"})
    assert "cold" not in active_queues(broker)
    assert count_msgs(producer, "cold") == 0


def _buffer_size(b, name):
    """(ready, held, the most ready the queue may keep) of queue `name`: after every event the
    buffer is at most twice its refill size (REFILL_BATCH, more for a queue whose consumers
    keep emptying it, never over REFILL_MAX)."""
    def size():
        queue = b.server.broker.queues.queues[name]
        if not isinstance(queue, pymq.Queue):
            return 0, 0, 0          # an idle queue, settled into its only subscription
        assert pymq.REFILL_BATCH <= queue.refill_size <= pymq.REFILL_MAX
        return len(queue.ready), len(queue.held or ()), 2 * queue.refill_size
    return b.call(size)


def _consume_in_order_checking_the_buffer(b, consumer, name, n):
    for i in range(n):
        message = consumer.expect("MESSAGE")
        assert body(message) == str(i)
        ack(consumer, message)
        if i % 100 == 0:
            ready, held, limit = _buffer_size(b, name)
            assert ready <= limit and held <= limit + 1, (i, ready, held, limit)
    assert_nothing_more(consumer)
    assert count_msgs(consumer, name) == 0


def test_an_active_queue_with_a_large_backlog_holds_a_bounded_buffer(broker, connect):
    n = 3000
    send_all(connect(), "huge", [str(i) for i in range(n)])
    consumer = connect()
    subscribe(consumer, "huge", prefetch="1")
    _consume_in_order_checking_the_buffer(broker, consumer, "huge", n)


def test_sends_to_a_busy_active_queue_keep_its_buffer_bounded(broker, connect):
    """The backlog builds up while the queue is active (its one subscriber holds a message), so
    it passes through the buffer, which must shed what storage holds anyway."""
    n = 3000
    consumer = connect()
    subscribe(consumer, "busy", prefetch="1")
    producer = connect()
    send_all(producer, "busy", [str(i) for i in range(n)])
    ready, held, limit = _buffer_size(broker, "busy")
    assert ready <= limit and held <= limit + 1
    _consume_in_order_checking_the_buffer(broker, consumer, "busy", n)



def test_a_queue_its_consumer_keeps_emptying_loads_more_per_refill(broker, connect):
    """A fast consumer (ack:auto, reading all the time) empties the buffer before each refill
    is back: the refills grow (fewer store round trips), never past REFILL_MAX, in order, and
    the queue stays a Queue with its size when idle rather than settling."""
    n = 6 * pymq.REFILL_BATCH
    send_all(connect(), "fast", [str(i) for i in range(n)])
    consumer = connect()
    subscribe(consumer, "fast", ack="auto")
    assert [body(m) for m in receive(consumer, n)] == [str(i) for i in range(n)]
    assert count_msgs(consumer, "fast") == 0
    size = broker.call(lambda: broker.server.broker.queues.queues["fast"].refill_size)
    assert pymq.REFILL_BATCH < size <= pymq.REFILL_MAX


# -- async SENDs -------------------------------------------------------------------------------

def test_async_sends_are_all_stored_and_delivered(connect):
    producer = connect()
    n = 1000
    producer.send_bytes(b"".join(pymq.encode_frame("SEND", {"destination": "/queue/as"},
                                                   str(i).encode()) for i in range(n)))
    assert count_msgs(producer, "as") == n          # the count rides after those writes
    consumer = connect()
    subscribe(consumer, "as", ack="auto")
    assert [body(m) for m in receive(consumer, n)] == [str(i) for i in range(n)]
    assert count_msgs(producer, "as") == 0


@pytest.mark.parametrize("subscribed", [True, False], ids=["consumer-first", "backlog"])
def test_tiny_async_budget_applies_backpressure_without_loss(start_broker, connect, subscribed):
    b = start_broker(async_budget=1)
    n = 500
    consumer = connect(at=b)
    if subscribed:
        subscribe(consumer, "bp", prefetch="20")
    producer = connect(at=b)
    producer.send_bytes(b"".join(pymq.encode_frame("SEND", {"destination": "/queue/bp"},
                                                   str(i).encode()) for i in range(n)))
    if not subscribed:
        assert count_msgs(producer, "bp") == n
        subscribe(consumer, "bp", prefetch="20")
    for i in range(n):
        message = consumer.expect("MESSAGE")
        assert body(message) == str(i)
        ack(consumer, message)
    assert count_msgs(consumer, "bp") == 0          # on the consumer's connection: after its ACKs
    assert_nothing_more(consumer)


# -- transactions ------------------------------------------------------------------------------

def test_transaction_sends_invisible_until_commit_and_durable_at_its_receipt(
        start_broker, connect, new_store):
    path = new_store()
    b = start_broker(db=path)
    consumer = connect(at=b)
    subscribe(consumer, "tx", prefetch="10")
    producer = connect(at=b)
    producer.request("BEGIN", {"transaction": "t1"})
    for text in ("one", "two"):
        producer.request("SEND", {"destination": "/queue/tx", "transaction": "t1"},
                         text.encode())
    producer.request("SEND", {"destination": "/queue/tx"}, b"outside")
    assert body(consumer.expect("MESSAGE")) == "outside"
    assert count_msgs(producer, "tx") == 1
    assert_nothing_more(consumer)
    producer.request("COMMIT", {"transaction": "t1"})
    assert durable_count(path, "tx") == 3
    assert [body(m) for m in receive(consumer, 2)] == ["one", "two"]
    assert count_msgs(producer, "tx") == 3


def test_transaction_abort_discards_its_sends(connect):
    consumer = connect()
    subscribe(consumer, "tx", prefetch="10")
    producer = connect()
    producer.request("BEGIN", {"transaction": "t1"})
    producer.request("SEND", {"destination": "/queue/tx", "transaction": "t1"}, b"gone")
    producer.request("ABORT", {"transaction": "t1"})
    assert count_msgs(producer, "tx") == 0
    producer.request("SEND", {"destination": "/queue/tx"}, b"kept")
    assert body(consumer.expect("MESSAGE")) == "kept"
    assert_nothing_more(consumer)


@pytest.mark.parametrize("bad", [{"priority": "x"}, {"ack-timeout": "-1"},
                                 {"destination": "/queue/"}], ids=["priority", "ack-timeout",
                                                                   "destination"])
def test_transaction_with_an_invalid_send_stores_none_of_it(connect, bad):
    """A transaction is all or nothing: a SEND that cannot be carried out gets an ERROR, and
    the transaction's other SENDs are not stored either."""
    consumer = connect()
    subscribe(consumer, "txbad", prefetch="10")
    producer = connect()
    producer.request("BEGIN", {"transaction": "t"})
    producer.send("SEND", {"destination": "/queue/txbad", "transaction": "t"}, b"good")
    producer.send("SEND", dict({"destination": "/queue/txbad", "transaction": "t"}, **bad),
                  b"bad")
    producer.send("COMMIT", {"transaction": "t"})
    producer.expect_error(next(iter(bad)))          # at the SEND or at the COMMIT
    assert count_msgs(connect(), "txbad") == 0
    assert_nothing_more(consumer)


def test_ack_in_a_transaction_takes_effect_at_commit(connect):
    producer = connect()
    send_all(producer, "txa", ["m1", "m2"])
    consumer = connect()
    subscribe(consumer, "txa", prefetch="1")
    m1 = consumer.expect("MESSAGE")
    consumer.request("BEGIN", {"transaction": "t"})
    ack(consumer, m1, receipt=True, transaction="t")
    assert count_msgs(producer, "txa") == 2
    assert_nothing_more(consumer)                   # the slot is still taken
    consumer.send("COMMIT", {"transaction": "t", "receipt": "commit"})
    assert body(consumer.expect("MESSAGE")) == "m2"  # the ACK freed the slot
    assert consumer.expect("RECEIPT").headers["receipt-id"] == "commit"
    assert count_msgs(producer, "txa") == 1


def test_ack_in_an_aborted_transaction_does_nothing(connect):
    producer = connect()
    producer.request("SEND", {"destination": "/queue/txa"}, b"m1")
    consumer = connect()
    subscribe(consumer, "txa", prefetch="1")
    m1 = consumer.expect("MESSAGE")
    consumer.request("BEGIN", {"transaction": "t"})
    ack(consumer, m1, transaction="t")
    consumer.request("ABORT", {"transaction": "t"})
    assert count_msgs(producer, "txa") == 1
    assert_nothing_more(consumer)                   # still in flight, not redelivered
    ack(consumer, m1, receipt=True)
    assert count_msgs(producer, "txa") == 0


# -- DISCONNECT --------------------------------------------------------------------------------

def test_disconnect_receipt_comes_after_earlier_send_receipts(start_broker, connect, new_store):
    path = new_store()
    b = start_broker(db=path)
    producer = connect(at=b)
    producer.send_bytes(b"".join([
        pymq.encode_frame("SEND", {"destination": "/queue/dq", "receipt": "s1"}, b"1"),
        pymq.encode_frame("SEND", {"destination": "/queue/dq", "receipt": "s2"}, b"2"),
        pymq.encode_frame("DISCONNECT", {"receipt": "bye"}),
    ]))
    receipts = [producer.expect("RECEIPT").headers["receipt-id"] for _ in range(3)]
    assert receipts == ["s1", "s2", "bye"]
    assert durable_count(path, "dq") == 2
    producer.expect_closed()


def test_disconnect_receipt_after_in_flight_messages_are_back_in_the_queue(connect):
    producer = connect()
    leaver = connect()
    subscribe(leaver, "dq", "a")
    send_all(producer, "dq", ["m1", "m2"])
    held = receive(leaver, 2)
    stayer = connect()
    subscribe(stayer, "dq", "b")
    leaver.send("DISCONNECT", {"receipt": "bye"})
    assert leaver.expect("RECEIPT").headers["receipt-id"] == "bye"
    leaver.expect_closed()
    # Queued for the stayer before the RECEIPT went out, so before this marker's RECEIPT.
    marker = {"destination": "/control/count-subscribers/queue/dq", "receipt": "marker"}
    stayer.send("SEND", marker)
    _expect_redelivered(stayer, "m1")
    _expect_redelivered(stayer, "m2")
    receipt = stayer.expect("RECEIPT")
    assert receipt.headers == {"receipt-id": "marker", "num-subscribers": "1"}
    assert held[0].headers["message-id"] != held[1].headers["message-id"]


def test_one_connection_drains_many_queues_past_its_backlog(connect):
    """One consumer subscribes to 2,000 queues holding a 2 KB message each, without reading
    at first: the queues skip it while its backlog is full and deliver again as it drains,
    a few at a time (no queue is forgotten, none loads what nobody can take yet)."""
    producer = connect()
    names = ["many.%d" % i for i in range(2000)]
    frames = [pymq.encode_frame("SEND", {"destination": "/queue/" + name}, name.encode() * 200)
              for name in names]
    frames.append(pymq.encode_frame("SEND", {"destination": "/queue/" + names[-1],
                                             "receipt": "sent"}, b"last"))
    producer.send_bytes(b"".join(frames))
    assert producer.expect("RECEIPT").headers["receipt-id"] == "sent"
    consumer = connect()
    consumer.send_bytes(b"".join(
        pymq.encode_frame("SUBSCRIBE", {"destination": "/queue/" + name, "id": name,
                                        "ack": "client-individual"}) for name in names)
        + pymq.encode_frame("SEND", {"destination": "/control/count-subscribers/topic/x",
                                     "receipt": "subscribed"}))
    got = []
    while len(got) < len(names) + 1:
        frame = consumer.expect()
        if frame.command == "MESSAGE":
            got.append((frame.headers["destination"], frame.body))
            ack(consumer, frame)
        else:
            assert frame.command == "RECEIPT", frame
    expected = [("/queue/" + name, name.encode() * 200) for name in names]
    expected.append(("/queue/" + names[-1], b"last"))
    assert sorted(got) == sorted(expected)
    assert count_msgs(consumer, names[0]) == 0

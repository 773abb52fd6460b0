"""Task-queue semantics as clients see them, over real sockets, on every store (memory, SQLite,
PostgreSQL): delivery counts, max redeliveries and dead-letter queues, NACK requeue:false and
delay, retry back-off, delayed delivery, expiry, lease extension (/control/touch),
de-duplication, purge and move; across restarts and kill -9 on the durable stores.

Waits are for events (a MESSAGE, a RECEIPT); where the event is that time has passed (a delay,
an expiry), the test awaits the MESSAGE that time releases and checks when it came. Proving
that nothing else arrives uses a marker RECEIPT, as in test_queues.py. Times are kept short
(100-400 ms) so that the file stays quick; bounds are generous above, exact below (a message is
never delivered early).
"""

import signal
import time

import pytest

import pymq
from conftest import RawClient

STORE_BACKENDS = ("memory", "sqlite", "postgresql")
DURABLE = ("sqlite", "postgresql")
WAIT = 10.0
SLACK = 1.5         # how late a timed delivery may be on a busy test machine (seconds)


# -- helpers -----------------------------------------------------------------------------------

class Client(RawClient):
    """A RawClient that may consume and make requests on one connection: a MESSAGE that
    arrives while it waits for a RECEIPT is kept for the next expect("MESSAGE")."""

    def __init__(self, address):
        super().__init__(address, timeout=WAIT)
        self.kept = []

    def expect(self, command=None, timeout=WAIT):
        if command == "MESSAGE" and self.kept:
            return self.kept.pop(0)
        while True:
            frame = super().expect(timeout=timeout)
            if frame.command == "MESSAGE" and command not in (None, "MESSAGE"):
                self.kept.append(frame)
                continue
            if command is not None:
                assert frame.command == command, frame
            return frame


def raw(at, version="1.2"):
    client = Client(at.address)
    client.connect(version)
    return client


def subscribe(client, queue, sub_id="s", ack="client-individual", **headers):
    frame = {"destination": "/queue/" + queue, "id": sub_id, "ack": ack}
    frame.update({k.replace("_", "-"): v for k, v in headers.items()})
    client.request("SUBSCRIBE", frame)


def send(client, queue, body, **headers):
    frame = {"destination": "/queue/" + queue}
    frame.update({k.replace("_", "-"): v for k, v in headers.items()})
    return client.request("SEND", frame, body.encode() if isinstance(body, str) else body)


def nack(client, message, **headers):
    frame = {"id": message.headers["ack"]}
    frame.update(headers)
    client.send("NACK", frame)


def ack(client, message, receipt=True):
    (client.request if receipt else client.send)("ACK", {"id": message.headers["ack"]})


def counts(client, queue):
    receipt = client.request("SEND", {"destination": "/control/count-msgs/queue/" + queue})
    return int(receipt.headers["num-messages"]), int(receipt.headers["num-delayed"])


def control(client, name, **headers):
    frame = {"destination": "/control/" + name}
    frame.update({k.replace("_", "-"): v for k, v in headers.items()})
    return client.request("SEND", frame).headers


def assert_nothing_more(client):
    """No MESSAGE is on its way to `client`: a marker's RECEIPT comes first."""
    client.request("SEND", {"destination": "/control/count-subscribers/topic/marker"})
    assert not client.kept, client.kept


def message_of(client, body):
    message = client.expect("MESSAGE", timeout=WAIT)
    assert message.body == body.encode(), message
    return message


def until(predicate, what, timeout=WAIT):
    """Poll the broker (each call is a request) until `predicate()` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "%s: not within %s s" % (what, timeout)
        time.sleep(0.02)


# -- 1. delivery count -------------------------------------------------------------------------

def test_first_delivery_has_no_count_and_each_redelivery_counts(stomp_client):
    conn, listener = stomp_client()
    conn.subscribe("/queue/count", id="1", ack="client-individual")
    conn.send("/queue/count", "job", receipt="sent")
    first = listener.next_message()
    assert "redelivered" not in first.headers and "redelivery-count" not in first.headers
    for n in (1, 2, 3):
        conn.nack(first.headers["ack"])
        again = listener.next_message()
        assert again.headers["redelivered"] == "true"
        assert again.headers["redelivery-count"] == str(n)
        assert again.headers["message-id"] == first.headers["message-id"]
    conn.ack(again.headers["ack"])


def _new_worker_gets(broker, queue, n):
    """A new worker subscribes to `queue` and gets "job", delivered `n` times before."""
    worker = raw(broker)
    subscribe(worker, queue)
    message = message_of(worker, "job")
    assert message.headers.get("redelivery-count") == (str(n) if n else None)
    return worker


def test_the_count_comes_back_with_a_queue_that_went_idle(start_broker):
    b = start_broker()
    producer = raw(b)
    send(producer, "idle", "job")
    for n in range(3):
        worker = _new_worker_gets(b, "idle", n)
        worker.close()              # the worker dies; the queue has no subscriber left
        until(lambda: int(control(producer, "count-subscribers/queue/idle")
                          ["num-subscribers"]) == 0, "worker gone")


@pytest.mark.parametrize("store_backend", DURABLE, indirect=True)
def test_the_count_survives_kill9(new_store, broker_process):
    db = new_store()
    broker = broker_process("--db", db)
    c = raw(broker)
    send(c, "crash", "job")
    subscribe(c, "crash")
    first = message_of(c, "job")
    counts(c, "crash")              # a RECEIPT after the MESSAGE: its count is durable
    broker.proc.kill()
    assert broker.proc.wait(WAIT) == -signal.SIGKILL
    c.close()
    broker = broker_process("--db", db)
    c = raw(broker)
    subscribe(c, "crash")
    again = message_of(c, "job")
    assert again.headers["redelivered"] == "true"
    assert again.headers["redelivery-count"] == "1"
    assert again.headers["message-id"] == first.headers["message-id"]
    ack(c, again)
    c.close()
    assert broker.stop() == 0


# -- 2. max redeliveries and dead letters ------------------------------------------------------

def _check_dead_letter(message, origin, reason, redeliveries, body):
    """`message`: a RawClient's or stomp.py's frame."""
    assert message.body in (body, body.encode())
    assert message.headers["destination"] == "/queue/DLQ." + origin
    assert message.headers["original-destination"] == "/queue/" + origin
    assert message.headers["dead-letter-reason"] == reason
    assert message.headers["original-redelivery-count"] == str(redeliveries)
    assert "redelivered" not in message.headers and "redelivery-count" not in message.headers


def test_a_poison_message_nacked_forever_ends_in_its_dlq(start_broker, stomp_client):
    b = start_broker(max_redeliveries=3)
    conn, listener = stomp_client(address=b.address)
    conn.subscribe("/queue/poison", id="1", ack="client-individual")
    conn.send("/queue/poison", "boom", headers={"job": "7"}, receipt="sent")
    deliveries = []
    producer = raw(b)
    for _ in range(4):
        message = listener.next_message()
        deliveries.append(message.headers.get("redelivery-count"))
        conn.nack(message.headers["ack"])
    assert deliveries == [None, "1", "2", "3"]      # once, then 3 redeliveries
    until(lambda: counts(producer, "DLQ.poison") == (1, 0), "dead-lettered")
    assert counts(producer, "poison") == (0, 0)
    conn.subscribe("/queue/DLQ.poison", id="2", ack="client-individual")
    dead = listener.next_message()
    _check_dead_letter(dead, "poison", "max-redeliveries", 3, "boom")
    assert dead.headers["job"] == "7"
    conn.ack(dead.headers["ack"], receipt="acked")
    until(lambda: counts(producer, "DLQ.poison") == (0, 0), "DLQ consumed")


def test_the_send_header_overrides_the_limit_and_the_dlq(broker):
    c = raw(broker)
    subscribe(c, "jobs")
    send(c, "jobs", "once", max_redeliveries="1", dead_letter_queue="/queue/failed")
    for _ in range(2):
        nack(c, message_of(c, "once"))
    subscribe(c, "failed", "f")
    dead = message_of(c, "once")
    assert dead.headers["destination"] == "/queue/failed"
    assert dead.headers["original-destination"] == "/queue/jobs"
    assert dead.headers["original-redelivery-count"] == "1"
    assert counts(c, "DLQ.jobs") == (0, 0)


def test_default_limit_is_20_redeliveries(broker):
    c = raw(broker)
    subscribe(c, "twenty")
    send(c, "twenty", "x")
    for n in range(21):
        message = message_of(c, "x")
        assert message.headers.get("redelivery-count") == (str(n) if n else None)
        nack(c, message)
    subscribe(c, "DLQ.twenty", "d")
    _check_dead_letter(message_of(c, "x"), "twenty", "max-redeliveries", 20, "x")


def test_zero_means_redelivered_forever(start_broker):
    b = start_broker(max_redeliveries=0)
    c = raw(b)
    subscribe(c, "forever")
    send(c, "forever", "x")
    for n in range(30):
        nack(c, message_of(c, "x"))
    assert message_of(c, "x").headers["redelivery-count"] == "30"
    assert counts(c, "DLQ.forever") == (0, 0)


def test_a_worker_killed_every_time_still_dead_letters_the_message(start_broker):
    b = start_broker(max_redeliveries=2)
    producer = raw(b)
    send(producer, "killer", "job")
    witness = raw(b)
    subscribe(witness, "DLQ.killer", "w")
    for n in range(3):
        worker = _new_worker_gets(b, "killer", n)
        worker.sock.close()         # the job kills its worker: connection lost, no NACK
    dead = message_of(witness, "job")
    _check_dead_letter(dead, "killer", "max-redeliveries", 2, "job")
    assert counts(producer, "killer") == (0, 0)


def test_a_dead_letter_is_never_dead_lettered_again(start_broker):
    b = start_broker(max_redeliveries=1)
    c = raw(b)
    subscribe(c, "jobs")
    send(c, "jobs", "x", ttl="60000")
    nack(c, message_of(c, "x"), requeue="false")
    subscribe(c, "DLQ.jobs", "d")
    dead = message_of(c, "x")
    for n in range(4):                       # past its limit; rejected too
        nack(c, dead, **({"requeue": "false"} if n % 2 else {}))
        dead = message_of(c, "x")
        assert dead.headers["destination"] == "/queue/DLQ.jobs"
        assert dead.headers["redelivery-count"] == str(n + 1)
    assert counts(c, "DLQ.DLQ.jobs") == (0, 0)
    assert counts(c, "DLQ.jobs") == (1, 0)


def test_a_dlq_is_an_ordinary_queue(broker):
    c = raw(broker)
    send(c, "DLQ.plain", "sent directly")
    assert counts(c, "DLQ.plain") == (1, 0)
    subscribe(c, "DLQ.plain")
    assert int(control(c, "count-subscribers/queue/DLQ.plain")["num-subscribers"]) == 1
    ack(c, message_of(c, "sent directly"))
    assert counts(c, "DLQ.plain") == (0, 0)


# -- 3. NACK that means something --------------------------------------------------------------

def test_nack_requeue_false_dead_letters_at_once(stomp_client):
    conn, listener = stomp_client()
    conn.subscribe("/queue/reject", id="1", ack="client-individual")
    conn.send("/queue/reject", "bad input", receipt="sent")
    message = listener.next_message()
    conn.nack(message.headers["ack"], requeue="false")
    conn.subscribe("/queue/DLQ.reject", id="2", ack="client-individual")
    dead = listener.next_message()
    _check_dead_letter(dead, "reject", "rejected", 0, "bad input")


def test_nack_delay_redelivers_no_earlier(broker):
    c = raw(broker)
    subscribe(c, "later")
    send(c, "later", "x")
    message = message_of(c, "x")
    nacked_at = time.monotonic()
    nack(c, message, delay="300")
    assert counts(c, "later") == (1, 1)       # stored, waiting, held by nobody
    assert_nothing_more(c)
    again = message_of(c, "x")
    waited = time.monotonic() - nacked_at
    assert 0.3 <= waited < 0.3 + SLACK, waited
    assert again.headers["redelivery-count"] == "1"


@pytest.mark.parametrize("bad", [{"delay": "-1"}, {"delay": "soon"}, {"requeue": "maybe"}])
def test_bad_nack_headers_are_an_error(broker, bad):
    c = raw(broker)
    subscribe(c, "badnack")
    send(c, "badnack", "x")
    message = message_of(c, "x")
    nack(c, message, receipt="n1", **bad)
    c.expect_error(next(iter(bad)), receipt="n1")
    other = raw(broker)
    subscribe(other, "badnack")
    assert message_of(other, "x").headers["redelivery-count"] == "1"


# -- 4. retry back-off -------------------------------------------------------------------------

def test_back_off_doubles_up_to_its_maximum(start_broker):
    b = start_broker(redelivery_delay=100, max_redelivery_delay=400)
    c = raw(b)
    subscribe(c, "backoff")
    send(c, "backoff", "x")
    message = message_of(c, "x")
    waits = []
    for _ in range(4):
        nacked_at = time.monotonic()
        nack(c, message)
        message = message_of(c, "x")
        waits.append(time.monotonic() - nacked_at)
    for waited, expected in zip(waits, (0.1, 0.2, 0.4, 0.4)):
        assert expected <= waited < expected + SLACK, waits
    assert waits[2] > waits[0] + 0.2, waits           # it did grow


def test_back_off_measured_on_the_brokers_clock(start_broker):
    """The due time the broker stores for a backed-off message is its NACK time plus the
    back-off, doubling: asked of the store at times read from the broker's clock."""
    b = start_broker(redelivery_delay=100, max_redelivery_delay=10000)
    c = raw(b)
    subscribe(c, "clock")
    send(c, "clock", "x")
    message = message_of(c, "x")
    storage = b.server.storage

    def delayed_at(now):
        return b.call(lambda: storage.count("clock", now)[1])

    for expected in (100, 200, 400, 800):
        before = b.call(pymq.pymq_storage.now_ms)
        nack(c, message)
        assert counts(c, "clock") == (1, 1)
        after = b.call(pymq.pymq_storage.now_ms)
        # due is in (before + expected - 1, after + expected]: still delayed just before
        # the earliest it could be due, and due by the latest.
        assert delayed_at(before + expected - 1) == 1, expected
        assert delayed_at(after + expected) == 0, expected
        message = message_of(c, "x")


def test_the_send_header_sets_the_back_off(broker):
    c = raw(broker)
    subscribe(c, "own")
    send(c, "own", "x", redelivery_delay="250")
    message = message_of(c, "x")
    nacked_at = time.monotonic()
    nack(c, message)
    message_of(c, "x")
    assert time.monotonic() - nacked_at >= 0.25


def test_an_ack_timeout_backs_off_and_a_lost_connection_does_not(start_broker):
    b = start_broker(redelivery_delay=300)
    producer = raw(b)
    a = raw(b)
    subscribe(a, "mixed")
    started = time.monotonic()            # before the first delivery, whose timeout counts
    send(producer, "mixed", "x", ack_timeout="0.2")
    message_of(a, "x")
    second = message_of(a, "x")           # ack timeout 0.2 s, then a back-off of 0.3 s
    assert time.monotonic() - started >= 0.5
    assert second.headers["redelivery-count"] == "1"
    other = raw(b)
    subscribe(other, "mixed")
    lost_at = time.monotonic()
    a.close()                             # at once, to the other consumer, counted
    third = message_of(other, "x")
    assert time.monotonic() - lost_at < 0.3
    assert third.headers["redelivery-count"] == "2"


def test_a_backed_off_message_is_held_by_nobody(start_broker):
    b = start_broker(redelivery_delay=400)
    a, other = raw(b), raw(b)
    subscribe(a, "held", prefetch="1")
    send(a, "held", "x")
    message = message_of(a, "x")
    nacked_at = time.monotonic()
    nack(a, message)
    a.request("UNSUBSCRIBE", {"id": "s"})     # nothing of it stays with its consumer
    subscribe(other, "held")
    assert counts(a, "held") == (1, 1)
    assert_nothing_more(other)                # not handed to the idle consumer early
    assert message_of(other, "x").headers["redelivery-count"] == "1"
    assert time.monotonic() - nacked_at >= 0.4


# -- 5. delayed delivery -----------------------------------------------------------------------

@pytest.mark.parametrize("header", ["delay", "x-delay", "AMQ_SCHEDULED_DELAY", "deliver-at"])
def test_a_delayed_message_is_stored_and_not_delivered_early(broker, header, stomp_client):
    conn, listener = stomp_client()
    conn.subscribe("/queue/delayed", id="1", ack="client-individual")
    # A second: the count below must come before it is due, on a cold PyPy too (300 ms was
    # not always enough there).
    value = str(pymq.pymq_storage.now_ms() + 1000) if header == "deliver-at" else "1000"
    sent_at = time.monotonic()
    conn.send("/queue/delayed", "later", headers={header: value}, receipt="stored")
    assert listener.receipts.get(timeout=WAIT).headers["receipt-id"] == "stored"
    c = raw(broker)
    assert counts(c, "delayed") == (1, 1)
    message = listener.next_message(timeout=WAIT)
    assert time.monotonic() - sent_at >= 1.0 - 0.002   # deliver-at: the broker's clock
    assert message.body == "later"
    assert message.headers[header] == value           # the header travels
    assert "redelivered" not in message.headers
    assert counts(c, "delayed") == (1, 0)             # in flight
    conn.ack(message.headers["ack"], receipt="acked")
    assert listener.receipts.get(timeout=WAIT).headers["receipt-id"] == "acked"
    assert counts(c, "delayed") == (0, 0)


def test_once_due_a_message_takes_its_place_by_priority_then_age(broker):
    c = raw(broker)
    send(c, "order", "old-delayed", delay="200")
    send(c, "order", "ready")
    send(c, "order", "urgent-delayed", delay="200", priority="9")
    send(c, "order", "newer")
    until(lambda: counts(c, "order") == (4, 0), "all due")
    subscribe(c, "order", prefetch="10")
    got = [c.expect("MESSAGE").body.decode() for _ in range(4)]
    assert got == ["urgent-delayed", "old-delayed", "ready", "newer"]


def test_a_delayed_message_reaches_an_active_queue_with_a_backlog(broker):
    c = raw(broker)
    consumer = raw(broker)
    subscribe(consumer, "busy", prefetch="1")
    for i in range(5):
        send(c, "busy", "b%d" % i)
    first = message_of(consumer, "b0")
    send(c, "busy", "urgent", delay="150", priority="9")
    until(lambda: counts(c, "busy")[1] == 0, "due")
    ack(consumer, first)
    # The count says due by the clock; the scheduler moves the message into the queue a
    # moment later, so b1 may still go first. Then urgent, before the rest of the backlog.
    message = consumer.expect("MESSAGE", timeout=WAIT)
    if message.body == b"b1":
        ack(consumer, message)
        message = consumer.expect("MESSAGE", timeout=WAIT)
    assert message.body == b"urgent" and message.headers.get("priority") == "9", message


def test_delayed_messages_to_an_idle_single_subscriber_arrive(broker):
    c = raw(broker)
    worker = raw(broker)
    subscribe(worker, "alone")        # stands alone for its queue: no Queue in memory
    send(c, "alone", "a", delay="100")
    send(c, "alone", "b", delay="200")
    message_of(worker, "a")
    message_of(worker, "b")


@pytest.mark.parametrize("store_backend", DURABLE, indirect=True)
def test_delayed_messages_survive_kill9_and_fall_due_while_down(new_store, broker_process):
    db = new_store()
    broker = broker_process("--db", db)
    c = raw(broker)
    sent_at = time.monotonic()      # before the SEND: its delay runs from when the broker got it
    send(c, "sleepy", "while-down", delay="200")
    send(c, "sleepy", "after-start", delay="3000")
    broker.proc.kill()
    broker.proc.wait(WAIT)
    c.close()
    time.sleep(0.3)                  # "while-down" falls due while no broker runs
    broker = broker_process("--db", db)
    c = raw(broker)
    assert counts(c, "sleepy")[0] == 2
    subscribe(c, "sleepy")
    message_of(c, "while-down")
    assert time.monotonic() - sent_at < 3.0
    assert_nothing_more(c)
    message_of(c, "after-start")
    assert time.monotonic() - sent_at >= 3.0
    c.close()
    assert broker.stop() == 0


@pytest.mark.parametrize("header, value", [("delay", "-5"), ("x-delay", "abc"),
                                           ("deliver-at", "nan"), ("ttl", "-1"),
                                           ("expires", "1e400"), ("max-redeliveries", "-1"),
                                           ("redelivery-delay", "x"),
                                           ("dead-letter-queue", "/topic/x"), ("dedup-id", "")])
def test_bad_task_headers_are_an_error_with_receipt_id(broker, header, value):
    c = raw(broker)
    c.send("SEND", {"destination": "/queue/bad", header: value, "receipt": "b1"}, b"x")
    c.expect_error(header, receipt="b1")
    other = raw(broker)
    assert counts(other, "bad") == (0, 0)


def test_topic_sends_ignore_task_headers(broker):
    c = raw(broker)
    c.request("SUBSCRIBE", {"destination": "/topic/t", "id": "t"})
    c.request("SEND", {"destination": "/topic/t", "delay": "5000", "ttl": "1"}, b"now")
    assert c.expect("MESSAGE").body == b"now"


# -- 6. expiry ---------------------------------------------------------------------------------

@pytest.mark.parametrize("header", ["ttl", "expiration", "expires"])
def test_an_expired_message_in_an_idle_queue_reaches_the_dlq(broker, header):
    c = raw(broker)
    value = str(pymq.pymq_storage.now_ms() + 150) if header == "expires" else "150"
    send(c, "perishable", "milk", **{header: value})
    send(c, "perishable", "salt")
    assert counts(c, "perishable") == (2, 0)
    witness = raw(broker)
    subscribe(witness, "DLQ.perishable")
    started = time.monotonic()
    dead = message_of(witness, "milk")
    assert time.monotonic() - started < 5.0           # the sweep runs at least every 5 s
    _check_dead_letter(dead, "perishable", "expired", 0, "milk")
    assert counts(c, "perishable") == (1, 0)
    subscribe(c, "perishable")
    message_of(c, "salt")


def test_count_msgs_never_counts_an_expired_message(broker):
    c = raw(broker)
    send(c, "count-exp", "gone", expires=str(pymq.pymq_storage.now_ms() - 1))
    send(c, "count-exp", "kept", ttl="60000")
    assert counts(c, "count-exp") == (1, 0)


def test_an_expired_message_is_never_delivered_from_memory(broker):
    c = raw(broker)
    consumer = raw(broker)
    subscribe(consumer, "fresh", prefetch="1")
    send(c, "fresh", "first")
    held = message_of(consumer, "first")
    send(c, "fresh", "stale", ttl="100")        # waits in the queue's buffer meanwhile
    send(c, "fresh", "good")
    until(lambda: counts(c, "fresh") == (2, 0), "expired")
    ack(consumer, held)
    message_of(consumer, "good")
    witness = raw(broker)
    subscribe(witness, "DLQ.fresh")
    _check_dead_letter(message_of(witness, "stale"), "fresh", "expired", 0, "stale")


def test_drop_expired_deletes_instead(start_broker):
    b = start_broker(drop_expired=True)
    c = raw(b)
    send(c, "drop", "x", expires=str(pymq.pymq_storage.now_ms() - 1))
    send(c, "drop", "marker")
    subscribe(c, "drop")
    message_of(c, "marker")
    assert_nothing_more(c)
    until(lambda: b.stats["expired"] == 1, "swept")
    assert counts(c, "DLQ.drop") == (0, 0) and counts(c, "drop") == (1, 0)


def test_a_dead_letter_never_expires(broker):
    c = raw(broker)
    subscribe(c, "short")
    send(c, "short", "x", ttl="300")
    nack(c, message_of(c, "x"), requeue="false")
    until(lambda: counts(c, "DLQ.short") == (1, 0), "rejected")
    time.sleep(0.4)                 # past the SEND's ttl: the dead letter must still count
    assert counts(c, "DLQ.short") == (1, 0)
    subscribe(c, "DLQ.short", "d")
    assert message_of(c, "x").headers["ttl"] == "300"


@pytest.mark.parametrize("store_backend", DURABLE, indirect=True)
def test_expiry_across_a_restart(new_store, broker_process):
    db = new_store()
    broker = broker_process("--db", db)
    c = raw(broker)
    send(c, "exp", "x", ttl="300")
    c.close()
    assert broker.stop() == 0
    time.sleep(0.3)
    broker = broker_process("--db", db)
    c = raw(broker)
    assert counts(c, "exp") == (0, 0)
    subscribe(c, "DLQ.exp")
    _check_dead_letter(message_of(c, "x"), "exp", "expired", 0, "x")
    c.close()
    assert broker.stop() == 0


# -- 7. lease extension ------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["1.1", "1.2"])
def test_touch_extends_the_ack_timeout(stomp_client, broker, version):
    conn, listener = stomp_client(version)
    sub = {"id": "1", "ack": "client-individual"}
    conn.subscribe("/queue/long", **sub)
    producer = raw(broker)
    send(producer, "long", "big job", ack_timeout="0.3")
    message = listener.next_message()
    key = {"1.1": "message-id", "1.2": "ack"}[version]
    value = message.headers["message-id"] if version == "1.1" else message.headers["ack"]
    for _ in range(4):              # 4 x 0.2 s: well past the 0.3 s of its own timeout
        conn.send("/control/touch", "", headers={key: value, "ack-timeout": "0.5",
                                                 "receipt": "t"})
        receipt = listener.receipts.get(timeout=WAIT)
        assert receipt.headers["touched"] == "true"
        assert listener.messages.empty()
        time.sleep(0.2)
    other = raw(broker)
    subscribe(other, "long")
    assert_nothing_more(other)      # still in flight to the toucher, not redelivered
    if version == "1.1":
        conn.ack(message.headers["message-id"], "1")
    else:
        conn.ack(message.headers["ack"])
    until(lambda: counts(producer, "long") == (0, 0), "acked")


def test_touch_without_a_timeout_restarts_the_messages_own(broker):
    c = raw(broker)
    subscribe(c, "own-lease")
    send(c, "own-lease", "x", ack_timeout="0.4")
    message = message_of(c, "x")
    time.sleep(0.25)
    touched_at = time.monotonic()
    assert control(c, "touch", ack=message.headers["ack"])["touched"] == "true"
    again = message_of(c, "x")
    assert time.monotonic() - touched_at >= 0.4 - 0.01
    assert again.headers["redelivery-count"] == "1"     # the timeout, not the touch, counted


def test_touch_of_a_message_not_in_flight_here(broker):
    c, other = raw(broker), raw(broker)
    subscribe(c, "mine")
    send(c, "mine", "x")
    message = message_of(c, "x")
    assert control(other, "touch", ack=message.headers["ack"])["touched"] == "false"
    assert control(c, "touch", ack="12345")["touched"] == "false"
    ack(c, message)
    assert control(c, "touch", ack=message.headers["ack"])["touched"] == "false"
    c.send("SEND", {"destination": "/control/touch", "receipt": "t"})
    c.expect_error("message-id", receipt="t")


# -- 8. de-duplication -------------------------------------------------------------------------

def test_a_second_send_with_the_same_dedup_id_stores_nothing(broker, stomp_client):
    conn, listener = stomp_client()
    for i in range(2):
        conn.send("/queue/dedup", "job %d" % i, headers={"dedup-id": "order-42"},
                  receipt="r%d" % i)
        assert listener.receipts.get(timeout=WAIT).headers["receipt-id"] == "r%d" % i
    c = raw(broker)
    assert counts(c, "dedup") == (1, 0)
    conn.subscribe("/queue/dedup", id="1", ack="client-individual")
    message = listener.next_message()
    assert message.body == "job 0"
    conn.ack(message.headers["ack"], receipt="acked")
    listener.receipts.get(timeout=WAIT)
    # consumed meanwhile: still within the window from the first SEND
    conn.send("/queue/dedup", "job 2", headers={"dedup-id": "order-42"}, receipt="r2")
    listener.receipts.get(timeout=WAIT)
    assert counts(c, "dedup") == (0, 0)
    # another queue, another key: stored
    send(c, "dedup-other", "x", dedup_id="order-42")
    send(c, "dedup", "y", dedup_id="order-43")
    assert counts(c, "dedup-other") == (1, 0) and counts(c, "dedup") == (1, 0)


def test_the_dedup_window_runs_from_the_first_send(start_broker):
    b = start_broker(dedup_window=0.3)
    c = raw(b)
    send(c, "window", "first", dedup_id="k")
    send(c, "window", "dup", dedup_id="k")
    assert counts(c, "window") == (1, 0)
    time.sleep(0.3)
    send(c, "window", "again", dedup_id="k")
    assert counts(c, "window") == (2, 0)


def test_dedup_sends_pipelined_in_one_batch(broker):
    c = raw(broker)
    frames = b"".join(pymq.encode_frame("SEND", {"destination": "/queue/pipe",
                                                 "dedup-id": "k%d" % (i % 10)}, b"%d" % i)
                      for i in range(100))
    c.send_bytes(frames)
    assert counts(c, "pipe") == (10, 0)
    subscribe(c, "pipe", prefetch="100")
    assert sorted(c.expect("MESSAGE").body for _ in range(10)) == sorted(
        b"%d" % i for i in range(10))
    assert_nothing_more(c)


@pytest.mark.parametrize("store_backend", DURABLE, indirect=True)
def test_dedup_keys_hold_across_kill9(new_store, broker_process):
    db = new_store()
    broker = broker_process("--db", db)
    c = raw(broker)
    send(c, "once", "a", dedup_id="k1")
    broker.proc.kill()
    broker.proc.wait(WAIT)
    c.close()
    broker = broker_process("--db", db)
    c = raw(broker)
    send(c, "once", "a again", dedup_id="k1")
    assert counts(c, "once") == (1, 0)
    c.close()
    assert broker.stop() == 0


# -- 9. purge and move -------------------------------------------------------------------------

def test_purge_deletes_what_is_not_in_flight(broker):
    c = raw(broker)
    consumer = raw(broker)
    for i in range(5):
        send(c, "purge", "m%d" % i)
    send(c, "purge", "delayed", delay="60000")
    subscribe(consumer, "purge", prefetch="1")
    held = message_of(consumer, "m0")
    assert control(c, "purge/queue/purge")["num-purged"] == "5"
    assert counts(c, "purge") == (1, 0)
    assert_nothing_more(consumer)
    ack(consumer, held)
    assert counts(c, "purge") == (0, 0)
    send(c, "purge", "after")
    message_of(consumer, "after")


def test_move_replays_a_dlq_oldest_first_and_fresh(broker):
    c = raw(broker)
    subscribe(c, "replay")
    for i in range(3):
        send(c, "replay", "j%d" % i, ttl="60000")
    for i in range(3):
        nack(c, message_of(c, "j%d" % i), requeue="false")
    c.request("UNSUBSCRIBE", {"id": "s"})
    until(lambda: counts(c, "DLQ.replay") == (3, 0), "dead-lettered")
    moved = control(c, "move/queue/DLQ.replay", to="/queue/replay", max="2")
    assert moved["num-moved"] == "2"
    assert counts(c, "DLQ.replay") == (1, 0) and counts(c, "replay") == (2, 0)
    subscribe(c, "replay", "again")
    for i in range(2):
        message = message_of(c, "j%d" % i)
        assert "redelivered" not in message.headers
        assert message.headers["dead-letter-reason"] == "rejected"     # user headers kept
        ack(c, message)
    assert control(c, "move/queue/DLQ.replay", to="/queue/replay")["num-moved"] == "1"
    message_of(c, "j2")


@pytest.mark.parametrize("headers, fragment", [({}, "to header"),
                                               ({"to": "/topic/x"}, "another /queue/"),
                                               ({"to": "/queue/src"}, "another /queue/"),
                                               ({"to": "/queue/x", "max": "-1"}, "max")])
def test_move_needs_another_queue(broker, headers, fragment):
    c = raw(broker)
    c.send("SEND", dict({"destination": "/control/move/queue/src", "receipt": "m"}, **headers))
    c.expect_error(fragment, receipt="m")

"""The protocol as clients see it: versions, topics, receipts, control, login, heart-beats."""

import socket
import time

import pytest

import pymq


# -- connecting --------------------------------------------------------------------------------

@pytest.mark.parametrize("offered, agreed", [
    (None, "1.0"), ("1.0", "1.0"), ("1.1", "1.1"), ("1.2", "1.2"),
    ("1.0,1.1", "1.1"), ("1.0,1.1,1.2", "1.2"), ("1.1,2.0", "1.1"),
])
@pytest.mark.parametrize("command", ["CONNECT", "STOMP"])
def test_version_negotiated_from_accept_version(raw, offered, agreed, command):
    client = raw()
    headers = {"host": "localhost"}
    if offered is not None:
        headers["accept-version"] = offered
    client.send(command, headers)
    frame = client.expect("CONNECTED")
    assert frame.headers["version"] == agreed
    assert frame.headers["server"].startswith("pymq/")
    assert frame.headers["session"]
    assert frame.headers["heart-beat"] == "0,0"


def test_sessions_are_distinct(raw):
    sessions = {raw().connect().headers["session"] for _ in range(3)}
    assert len(sessions) == 3


@pytest.mark.parametrize("version", ["1.0", "1.1", "1.2"])
def test_stomp_py_connects_with_each_version(stomp_client, version):
    conn, listener = stomp_client(version)
    conn.subscribe("/topic/hello", id="s1", ack="auto")
    conn.send("/topic/hello", "hi", headers={"receipt": "r1"})
    message = listener.next_message()
    assert message.body == "hi"
    assert listener.receipts.get(timeout=5).headers["receipt-id"] == "r1"


# -- topics ------------------------------------------------------------------------------------

def test_message_carries_user_headers_and_broker_headers(raw):
    sub = raw(connect=True)
    sub.request("SUBSCRIBE", {"destination": "/topic/t", "id": "sub-7", "ack": "client"})
    pub = raw(connect=True)
    pub.request("SEND", {"destination": "/topic/t", "x-job": "42", "content-type": "text/plain",
                         "reply-to": "/topic/back", "weird": "a:b\\c\nd"}, b"body\0with nul")
    message = sub.expect("MESSAGE")
    headers = message.headers
    assert message.body == b"body\0with nul"
    assert headers["x-job"] == "42"
    assert headers["content-type"] == "text/plain"
    assert headers["reply-to"] == "/topic/back"
    assert headers["weird"] == "a:b\\c\nd"
    assert headers["destination"] == "/topic/t"
    assert headers["subscription"] == "sub-7"
    assert headers["message-id"]
    assert headers["ack"] == headers["message-id"]       # 1.2 and a client ack mode
    assert "receipt" not in headers


def test_ack_header_only_for_acked_subscriptions_in_1_2(raw):
    sub = raw(connect=True)
    sub.request("SUBSCRIBE", {"destination": "/topic/t", "id": "1"})
    sub.send("SEND", {"destination": "/topic/t"}, b"x")
    assert "ack" not in sub.expect("MESSAGE").headers


def test_message_ids_are_unique(raw):
    sub = raw(connect=True)
    sub.request("SUBSCRIBE", {"destination": "/topic/t", "id": "1"})
    for _ in range(20):
        sub.send("SEND", {"destination": "/topic/t"}, b"x")
    ids = {sub.expect("MESSAGE").headers["message-id"] for _ in range(20)}
    assert len(ids) == 20


def test_broadcast_to_every_subscriber_across_versions(raw):
    subscribers = []
    for version in ("1.0", "1.1", "1.2"):
        for _ in range(2):
            client = raw(connect=True, version=version)
            client.request("SUBSCRIBE", {"destination": "/topic/news", "id": "s"})
            subscribers.append(client)
    pub = raw(connect=True)
    pub.request("SEND", {"destination": "/topic/news", "k": "v:1"}, b"extra")
    for client in subscribers:
        message = client.expect("MESSAGE")
        assert message.body == b"extra"
        assert message.headers["k"] == "v:1"
        assert message.headers["subscription"] == "s"


def test_prefix_subscriptions(raw):
    prefix = raw(connect=True)
    prefix.request("SUBSCRIBE", {"destination": "/topic/foo*", "id": "p"})
    everything = raw(connect=True)
    everything.request("SUBSCRIBE", {"destination": "/topic/*", "id": "all"})
    pub = raw(connect=True)
    for topic in ("fo", "foo", "foobar", "other"):
        pub.request("SEND", {"destination": "/topic/" + topic}, topic.encode())
    got = [prefix.expect("MESSAGE") for _ in range(2)]
    assert [m.body for m in got] == [b"foo", b"foobar"]
    assert [m.headers["destination"] for m in got] == ["/topic/foo", "/topic/foobar"]
    assert [everything.expect("MESSAGE").body for _ in range(4)] == [b"fo", b"foo", b"foobar",
                                                                       b"other"]
    # Nothing more came for /topic/fo or /topic/other: a marker sent now is the next frame.
    prefix.request("SUBSCRIBE", {"destination": "/topic/marker", "id": "m"})
    pub.request("SEND", {"destination": "/topic/marker"}, b"marker")
    assert prefix.expect("MESSAGE").body == b"marker"


def test_exact_and_prefix_subscriptions_on_one_connection_each_get_a_copy(raw):
    client = raw(connect=True)
    client.request("SUBSCRIBE", {"destination": "/topic/a.b", "id": "exact"})
    client.request("SUBSCRIBE", {"destination": "/topic/a.*", "id": "prefix"})
    client.send("SEND", {"destination": "/topic/a.b"}, b"x")
    subs = sorted(client.expect("MESSAGE").headers["subscription"] for _ in range(2))
    assert subs == ["exact", "prefix"]


def count_subscribers(client, topic):
    receipt = client.request("SEND", {"destination": "/control/count-subscribers/topic/" + topic})
    return int(receipt.headers["num-subscribers"])


def test_count_subscribers_counts_matching_prefixes(raw):
    counter = raw(connect=True)
    assert count_subscribers(counter, "a.b") == 0
    for destination in ("/topic/a.b", "/topic/a.b", "/topic/a.*", "/topic/*", "/topic/x*",
                        "/topic/a.bc"):
        client = raw(connect=True)
        client.request("SUBSCRIBE", {"destination": destination, "id": "1"})
    assert count_subscribers(counter, "a.b") == 4
    assert count_subscribers(counter, "xyz") == 2
    assert count_subscribers(counter, "q") == 1


def test_unsubscribe_by_id(raw):
    client = raw(connect=True, version="1.1")
    client.request("SUBSCRIBE", {"destination": "/topic/t", "id": "a"})
    client.request("SUBSCRIBE", {"destination": "/topic/other", "id": "b"})
    client.request("UNSUBSCRIBE", {"id": "a"})
    assert count_subscribers(client, "t") == 0
    client.send("SEND", {"destination": "/topic/t"}, b"not delivered")
    client.send("SEND", {"destination": "/topic/other"}, b"delivered")
    assert client.expect("MESSAGE").body == b"delivered"


@pytest.mark.parametrize("with_id", [False, True])
def test_unsubscribe_by_destination_in_1_0(raw, with_id):
    client = raw(connect=True, version="1.0")
    headers = {"destination": "/topic/t*"}
    if with_id:
        headers["id"] = "mine"
    client.request("SUBSCRIBE", headers)
    assert count_subscribers(client, "t1") == 1
    client.request("UNSUBSCRIBE", {"destination": "/topic/t*"})
    assert count_subscribers(client, "t1") == 0


def test_resubscribing_the_same_id_and_destination_is_idempotent(raw):
    client = raw(connect=True, version="1.0")
    client.request("SUBSCRIBE", {"destination": "/topic/t"})
    client.request("SUBSCRIBE", {"destination": "/topic/t"})
    assert count_subscribers(client, "t") == 1


def test_disconnect_removes_subscriptions(raw, stomp_client):
    conn, listener = stomp_client("1.2")
    conn.subscribe("/topic/gone*", id="1", ack="auto")
    counter = raw(connect=True)
    assert count_subscribers(counter, "gone") == 1
    conn.disconnect()       # stomp.py does not wait for the receipt; the broker then closes
    assert listener.disconnected.wait(5)
    assert count_subscribers(counter, "gone") == 0


def test_abrupt_close_removes_subscriptions(raw, broker):
    client = raw(connect=True)
    client.request("SUBSCRIBE", {"destination": "/topic/gone", "id": "1"})
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    client.close()          # RST, no DISCONNECT
    counter = raw(connect=True)
    deadline = time.monotonic() + 5
    while count_subscribers(counter, "gone") and time.monotonic() < deadline:
        pass                # each count is a round trip through the broker
    assert count_subscribers(counter, "gone") == 0


# -- receipts ----------------------------------------------------------------------------------

def test_receipt_for_every_frame_that_asks(raw):
    client = raw(connect=True)
    client.request("SUBSCRIBE", {"destination": "/topic/t", "id": "1"})
    client.request("SEND", {"destination": "/topic/nobody"}, b"x")
    client.request("ACK", {"id": "unknown"})           # not pending: ignored quietly
    client.request("NACK", {"id": "unknown"})
    client.request("BEGIN", {"transaction": "tx"})
    client.request("ABORT", {"transaction": "tx"})
    client.request("UNSUBSCRIBE", {"id": "1"})
    client.send("DISCONNECT", {"receipt": "bye"})
    assert client.expect("RECEIPT").headers["receipt-id"] == "bye"
    client.expect_closed()


def test_disconnect_receipt_with_stomp_py(stomp_client):
    conn, listener = stomp_client("1.2")
    conn.disconnect(receipt="last")
    assert listener.receipts.get(timeout=5).headers["receipt-id"] == "last"


def test_transaction_commit_and_abort(raw):
    client = raw(connect=True)
    client.request("SUBSCRIBE", {"destination": "/topic/t", "id": "1"})
    client.request("BEGIN", {"transaction": "a"})
    client.request("SEND", {"destination": "/topic/t", "transaction": "a"}, b"aborted")
    client.request("ABORT", {"transaction": "a"})
    client.request("BEGIN", {"transaction": "b"})
    client.request("SEND", {"destination": "/topic/t", "transaction": "b"}, b"one")
    client.request("SEND", {"destination": "/topic/t", "transaction": "b"}, b"two")
    client.send("SEND", {"destination": "/topic/t"}, b"outside")
    assert client.expect("MESSAGE").body == b"outside"
    client.send("COMMIT", {"transaction": "b", "receipt": "c"})
    assert [client.expect("MESSAGE").body for _ in range(2)] == [b"one", b"two"]
    assert client.expect("RECEIPT").headers["receipt-id"] == "c"


# -- login -------------------------------------------------------------------------------------

def test_login_and_passcode(start_broker, stomp_client):
    broker = start_broker(login="alice", passcode="s3cret")
    conn, listener = stomp_client("1.2", address=broker.address, username="alice",
                                  passcode="s3cret")
    conn.subscribe("/topic/t", id="1")
    conn.send("/topic/t", "ok")
    assert listener.next_message().body == "ok"


@pytest.mark.parametrize("credentials", [
    {}, {"login": "alice"}, {"passcode": "s3cret"}, {"login": "alice", "passcode": "wrong"},
    {"login": "bob", "passcode": "s3cret"},
])
def test_bad_credentials_get_an_error_and_are_closed(start_broker, credentials):
    broker = start_broker(login="alice", passcode="s3cret")
    from conftest import RawClient
    client = RawClient(broker.address)
    client.send("CONNECT", dict(credentials, **{"accept-version": "1.2"}))
    client.expect_error("bad credentials")
    client.close()


# -- heart-beats -------------------------------------------------------------------------------

def read_heart_beats(client, count, timeout):
    """Read until `count` EOLs arrived between frames; return the time that took."""
    start = time.monotonic()
    seen = 0
    client.sock.settimeout(timeout)
    while seen < count:
        data = client.sock.recv(1)
        assert data == b"\n", data
        seen += 1
    return time.monotonic() - start


def test_broker_sends_heart_beats_at_the_negotiated_interval(start_broker):
    from conftest import RawClient
    broker = start_broker(heart_beat="50,0")
    client = RawClient(broker.address)
    frame = client.connect("1.2", heart_beat="0,100")
    assert frame.headers["heart-beat"] == "100,0"       # max(50, 100), and we expect none
    elapsed = read_heart_beats(client, 5, timeout=2)
    assert 0.35 < elapsed < 1.5, elapsed                 # 100 ms each, honoured in ms
    client.close()


def test_default_broker_beats_as_often_as_the_client_asks(broker):
    """As RabbitMQ and ActiveMQ do: a client asking for a beat every 500 ms gets one every
    500 ms (the broker's offer is a floor, 100 ms), and is asked for none faster than 10 s."""
    from conftest import RawClient
    client = RawClient(broker.address)
    frame = client.connect("1.2", heart_beat="1000,500")
    assert frame.headers["heart-beat"] == "500,10000"
    elapsed = read_heart_beats(client, 4, timeout=5)
    assert 1.5 < elapsed < 3.0, elapsed
    client = RawClient(broker.address)
    assert client.connect("1.2", heart_beat="0,20").headers["heart-beat"] == "100,0"
    client.close()


def test_no_heart_beats_when_the_client_does_not_want_them(start_broker):
    from conftest import RawClient
    broker = start_broker(heart_beat="50,50")
    client = RawClient(broker.address)
    assert client.connect("1.2", heart_beat="0,0").headers["heart-beat"] == "0,0"
    client.request("SUBSCRIBE", {"destination": "/topic/t", "id": "1"})
    client.sock.settimeout(0.3)
    with pytest.raises(socket.timeout):
        client.sock.recv(1)          # nothing at all arrives: no EOLs
    client.close()


def test_silent_client_is_dropped_after_grace(start_broker):
    from conftest import RawClient
    broker = start_broker(heart_beat="0,100", heart_beat_grace=2.0)
    client = RawClient(broker.address)
    assert client.connect("1.2", heart_beat="100,0").headers["heart-beat"] == "0,100"
    start = time.monotonic()
    client.expect_error("no heart-beat")
    assert 0.15 < time.monotonic() - start < 2.0


def test_any_byte_counts_as_liveness(start_broker):
    from conftest import RawClient
    broker = start_broker(heart_beat="0,100", heart_beat_grace=2.0)
    client = RawClient(broker.address)
    client.connect("1.2", heart_beat="100,0")
    client.request("SUBSCRIBE", {"destination": "/topic/t", "id": "1"})
    # 1 s of liveness, 5x the 200 ms allowance: EOLs, and a frame trickled a byte at a time.
    frame = pymq.encode_frame("SEND", {"destination": "/topic/t"}, b"slow")
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        client.send_bytes(b"\n")
        time.sleep(0.05)
    for byte in frame:
        client.send_bytes(bytes([byte]))
        time.sleep(0.01)
    assert client.expect("MESSAGE").body == b"slow"
    client.request("SEND", {"destination": "/topic/none"})


def test_heart_beats_with_stomp_py(start_broker, stomp_client):
    broker = start_broker(heart_beat="100,100")
    conn, listener = stomp_client("1.2", address=broker.address,
                                  conn_kwargs={"heartbeats": (100, 100)})
    conn.subscribe("/topic/t", id="1")
    time.sleep(0.6)     # the thing under test is time passing: several heart-beat periods
    conn.send("/topic/t", "still here")
    assert listener.next_message().body == "still here"
    assert listener.errors.empty()


# -- slow consumers ----------------------------------------------------------------------------

def test_slow_topic_consumer_is_disconnected_and_counted(start_broker):
    from conftest import RawClient
    broker = start_broker(max_outbound=256 * 1024)
    slow = RawClient(broker.address)
    slow.connect("1.2")
    slow.request("SUBSCRIBE", {"destination": "/topic/firehose", "id": "1"})
    publisher = RawClient(broker.address)
    publisher.connect("1.2")
    body = b"x" * 10000
    for _ in range(5000):   # up to 50 MB: more than the socket buffers hold, and max-outbound
        publisher.request("SEND", {"destination": "/topic/firehose"}, body)
        if broker.stats["slow_consumers"]:
            break
    assert broker.stats["slow_consumers"] == 1
    publisher.request("SEND", {"destination": "/control/count-subscribers/topic/firehose"})
    # Once it reads again, the slow consumer finds what was already on its way, then the end:
    # the ERROR when it got through before the broker gave up on the backlog.
    slow.sock.settimeout(10)
    while True:
        frame = slow.parser.next_frame()
        if frame is None:
            data = slow.sock.recv(65536)
            if not data:
                break
            slow.parser.feed(data)
        elif frame.command == "ERROR":
            assert "slow consumer" in frame.headers["message"]
            slow.expect_closed()
            break
        else:
            assert frame.command == "MESSAGE"
    assert count_subscribers(publisher, "firehose") == 0

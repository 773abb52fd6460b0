"""Bad input: every bad client gets an ERROR frame (with a `message` header, and `receipt-id`
when its frame asked for a receipt) and a closed connection -- never a crash or a hang -- and a
bystander connected all along is still served afterwards.

Every test goes through the `scene` fixture: a broker, a bystander (a RawClient connected and
subscribed to /topic/bystander before any bad client acts), bad clients, and `scene.finish()`,
which closes the bad clients, awaits the broker's release of their connections, checks the
stats (protocol_errors and the rest) and has the bystander SEND with a receipt to
/topic/bystander and receive its own MESSAGE.
"""

import logging
import random
import select
import socket
import struct
import threading
import time

import pytest

import pymq
from conftest import RawClient

BYSTANDER_TOPIC = "/topic/bystander"
# Backstops, so that a bad client taking an unexpected path is still dropped quickly.
QUICK = dict(connect_timeout=1.0, frame_timeout=1.0)


def frame(command, headers=(), body=b"", end=b"\0"):
    """Raw frame bytes exactly as given: no content-length added, no escaping."""
    if isinstance(headers, dict):
        headers = headers.items()
    head = command + "\n" + "".join("%s:%s\n" % (k, v) for k, v in headers) + "\n"
    return head.encode() + body + end


def garbage(seed, size):
    return random.Random(seed).randbytes(size)


def wait_until(condition, timeout=3.0, what="condition"):
    """Poll `condition` (cheap) until true; an event we cannot block on any other way."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.005)


class Bystander:
    """A well-behaved client connected before the trouble starts."""

    def __init__(self, broker, **connect_headers):
        self.client = RawClient(broker.address)
        self.client.connect("1.2", **connect_headers)
        self.client.request("SUBSCRIBE", {"destination": BYSTANDER_TOPIC, "id": "by"})
        self.peer = "%s:%s" % self.client.sock.getsockname()[:2]
        self.checks = 0

    def check(self):
        """SEND with a receipt to the bystander's topic: the MESSAGE and RECEIPT come back."""
        self.checks += 1
        receipt = "bystander-%d" % self.checks
        body = b"still served %d" % self.checks
        self.client.send("SEND", {"destination": BYSTANDER_TOPIC, "receipt": receipt}, body)
        frames = {}
        for _ in range(2):
            got = self.client.expect()
            assert got.command in ("MESSAGE", "RECEIPT") and got.command not in frames, got
            frames[got.command] = got
        assert frames["MESSAGE"].body == body
        assert frames["MESSAGE"].headers["destination"] == BYSTANDER_TOPIC
        assert frames["MESSAGE"].headers["subscription"] == "by"
        assert frames["RECEIPT"].headers["receipt-id"] == receipt


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


class Scene:
    def __init__(self, broker, credentials):
        self.broker = broker
        self.credentials = credentials
        self.bystander = Bystander(broker, **credentials)
        self.clients = []
        self.connected = 0          # bad clients that got CONNECTED
        self.before = broker.stats

    def client(self, connect=False, version="1.2"):
        """A bad client (closed by finish()); connect=True: CONNECTed first."""
        client = RawClient(self.broker.address)
        self.clients.append(client)
        if connect:
            client.connect(version, **self.credentials)
            self.connected += 1
        return client

    def conn_of(self, client):
        """The broker's Connection for `client` (None once released); run in the broker."""
        peer = "%s:%s" % client.sock.getsockname()[:2]
        return next((c for c in self.broker.server.connections if c.peer == peer), None)

    def open_peers(self):
        server = self.broker.server
        return self.broker.call(lambda: (sorted(c.peer for c in server.connections),
                                         sorted(c.peer for c in server.broker.connections)))

    def finish(self, protocol_errors=1, messages_in=0, messages_out=0, connections=None,
               logins_refused=0):
        """Bad clients gone: the broker released them, counted them, still serves the
        bystander."""
        for client in self.clients:
            client.close()
        assert self.broker._thread.is_alive(), "broker thread died"
        only_bystander = ([self.bystander.peer], [self.bystander.peer])
        wait_until(lambda: self.open_peers() == only_bystander, what="connections released")
        after = self.broker.stats
        delta = {key: after[key] - self.before[key] for key in after}
        assert delta == {"connections": self.connected if connections is None else connections,
                         "messages_in": messages_in, "messages_out": messages_out,
                         "protocol_errors": protocol_errors, "slow_consumers": 0,
                         "redelivered": 0, "refused": 0, "dead_lettered": 0, "expired": 0,
                         "tls_failures": 0, "acked": 0, "nacked": 0, "ack_timeouts": 0,
                         "logins_refused": logins_refused, "access_refused": 0}
        self.bystander.check()
        self.bystander.check()
        self.before = self.broker.stats


@pytest.fixture
def scene(start_broker, request):
    """scene(**broker_options) -> Scene; every test must call scene.finish()."""
    failed_before = request.session.testsfailed
    scenes = []
    errors = _Collect()
    logger = logging.getLogger("pymq")
    logger.addHandler(errors)

    def make(**options):
        options = {**QUICK, **options}
        credentials = {k: options[k] for k in ("login", "passcode") if k in options}
        made = Scene(start_broker(**options), credentials)
        scenes.append(made)
        return made

    try:
        yield make
    finally:
        logger.removeHandler(errors)
        for made in scenes:
            for client in made.clients + [made.bystander.client]:
                client.close()
    if request.session.testsfailed == failed_before:       # the test itself passed
        assert scenes and all(s.bystander.checks for s in scenes), "bystander not checked"
    assert not errors.records, "broker logged errors: %s" % [r.getMessage() for r in
                                                             errors.records]


def expect_error(client, fragment="", receipt=None, **headers):
    """An ERROR with a non-empty `message` containing `fragment` (and `receipt-id` if given,
    none otherwise), then the connection closes."""
    error = client.expect("ERROR")
    assert error.headers.get("message"), error
    assert fragment in error.headers["message"], error
    assert error.headers.get("receipt-id") == receipt, error
    for name, value in headers.items():
        assert error.headers.get(name) == value, error
    client.expect_closed()
    return error


def send_ignoring_reset(client, data):
    """Send what may arrive after the broker has already given up on us."""
    try:
        client.send_bytes(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


# -- garbage -----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_random_garbage_before_connect(scene, seed):
    s = scene(connect_timeout=0.5, frame_timeout=0.5)
    bad = s.client()
    send_ignoring_reset(bad, garbage(seed, 4096))   # whatever it parses as, or stalls on
    expect_error(bad)
    s.finish()


@pytest.mark.parametrize("seed", range(5))
def test_random_garbage_with_a_frame_end_is_refused_at_once(scene, seed):
    s = scene(connect_timeout=30, frame_timeout=30)     # no timeout can be what catches it
    bad = s.client()
    send_ignoring_reset(bad, garbage(seed, 1024) + b"\n\n\0")
    expect_error(bad)
    s.finish()


@pytest.mark.parametrize("seed", range(3))
def test_random_garbage_after_a_valid_connect(scene, seed):
    s = scene(frame_timeout=30)
    bad = s.client(connect=True)
    send_ignoring_reset(bad, garbage(seed, 1024) + b"\n\n\0")
    expect_error(bad)
    s.finish()


def test_garbage_without_any_newline_hits_the_line_limit(scene):
    s = scene(max_header_line=200, connect_timeout=30)
    bad = s.client()
    send_ignoring_reset(bad, bytes(range(11, 256)) * 4)    # no newline, no NUL
    expect_error(bad, "longer than 200 bytes")
    s.finish()


@pytest.mark.parametrize("data, fragment", [
    (b"\xff\xfe\xfd\n\n\0", "command is not valid UTF-8"),
    (b"CONNECT\naccept-version:1.2\nlogin:\xc3\x28\n\n\0", "header is not valid UTF-8"),
    (b"CONNECT\naccept-version 1.2\n\n\0", "malformed header line"),
    (b"\0\0\0\n\n\0", "expected a CONNECT"),
    (b"CONNECT\naccept-version:1.2\nheart-beat:soon\n\n\0", "invalid heart-beat"),
    (b"CONNECT\naccept-version:1.2\nheart-beat:1,2,3\n\n\0", "invalid heart-beat"),
])
def test_malformed_connect(scene, data, fragment):
    s = scene()
    bad = s.client()
    bad.send_bytes(data)
    expect_error(bad, fragment)
    s.finish()


def test_bad_escape_after_connect(scene):
    s = scene()
    bad = s.client(connect=True)
    bad.send_bytes(frame("SEND", {"destination": "/topic/x", "x": "a\\tb"}))
    expect_error(bad, "undefined escape sequence")
    s.finish()


# -- commands ----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["SEND", "SUBSCRIBE", "DISCONNECT", "CONNECTED", "connect"])
@pytest.mark.parametrize("receipt", [None, "r-first"])
def test_first_frame_not_connect(scene, command, receipt):
    s = scene()
    bad = s.client()
    headers = {"destination": BYSTANDER_TOPIC, "id": "1"}
    if receipt:
        headers["receipt"] = receipt
    bad.send_bytes(frame(command, headers, b"sneaky"))
    expect_error(bad, "expected a CONNECT", receipt=receipt)
    s.finish()


@pytest.mark.parametrize("command", ["FOO", "send", "Subscribe", "MESSAGE", "RECEIPT", "ERROR",
                                     "SEND ", " SEND"])
@pytest.mark.parametrize("receipt", [None, "r-unknown"])
def test_unknown_command_after_connect(scene, command, receipt):
    s = scene()
    bad = s.client(connect=True)
    headers = {"destination": BYSTANDER_TOPIC}
    if receipt:
        headers["receipt"] = receipt
    bad.send_bytes(frame(command, headers, b"x"))
    expect_error(bad, "unknown command", receipt=receipt)
    s.finish()


# -- destinations ------------------------------------------------------------------------------

BAD_DESTINATIONS = [
    (None, "missing destination"),
    ("/foo/bar", "invalid destination"),
    ("topic/x", "invalid destination"),
    ("/topic/", "invalid destination"),
    ("/topic", "invalid destination"),
    ("/queue/", "invalid destination"),
    ("", "invalid destination"),
    ("//topic/x", "invalid destination"),
]


@pytest.mark.parametrize("command", ["SEND", "SUBSCRIBE"])
@pytest.mark.parametrize("destination, fragment", BAD_DESTINATIONS)
@pytest.mark.parametrize("receipt", [None, "r-dest"])
def test_bad_destination(scene, command, destination, fragment, receipt):
    s = scene()
    bad = s.client(connect=True)
    headers = {"id": "s1"}
    if destination is not None:
        headers["destination"] = destination
    if receipt:
        headers["receipt"] = receipt
    bad.send(command, headers, b"x" if command == "SEND" else b"")
    expect_error(bad, fragment, receipt=receipt)
    s.finish()


@pytest.mark.parametrize("command, destination, fragment, messages_in", [
    ("SEND", "/control/count-msgs/queue/", "unknown control destination", 1),
    ("SEND", "/control/count-subscribers/topic/", "unknown control destination", 1),
    ("SEND", "/control/no-such-thing", "unknown control destination", 1),
    ("SUBSCRIBE", "/control/count-subscribers/topic/x", "cannot subscribe", 0),
])
def test_unsupported_destination(scene, command, destination, fragment, messages_in):
    s = scene()
    bad = s.client(connect=True)
    bad.send(command, {"destination": destination, "id": "s1", "receipt": "r-unsupported"})
    expect_error(bad, fragment, receipt="r-unsupported")
    s.finish(messages_in=messages_in)


# -- content-length and limits -----------------------------------------------------------------

CONTENT_LENGTHS = [
    ("abc", "invalid content-length"),
    ("-1", "invalid content-length"),
    ("+3", "invalid content-length"),
    ("1e3", "invalid content-length"),
    ("\u0663", "invalid content-length"),       # ARABIC-INDIC DIGIT THREE: isdigit(), not ASCII
    ("", "invalid content-length"),
    ("1001", "over the limit of 1000 bytes"),
    ("99999999999999999999999", "over the limit of 1000 bytes"),
]


@pytest.mark.parametrize("length, fragment", CONTENT_LENGTHS)
def test_bad_content_length(scene, length, fragment):
    s = scene(max_body=1000, frame_timeout=30)
    bad = s.client(connect=True)
    send_ignoring_reset(bad, frame("SEND", {"destination": "/topic/x", "content-length": length},
                                   b"abc"))
    expect_error(bad, fragment)
    s.finish()


def test_huge_content_length_is_refused_before_the_body_arrives(scene):
    s = scene(max_body=1000, frame_timeout=30)
    bad = s.client(connect=True)
    bad.send_bytes(b"SEND\ndestination:/topic/x\ncontent-length:5000\n\n")    # body never sent
    expect_error(bad, "over the limit of 1000 bytes")
    s.finish()


def headers_frame(count):
    headers = [("destination", "/topic/x")] + [("h%d" % i, "v") for i in range(count - 1)]
    return frame("SEND", headers, b"x")


@pytest.mark.parametrize("complete", [True, False], ids=["whole-frame", "head-still-coming"])
def test_too_many_headers(scene, complete):
    s = scene(max_headers=5, frame_timeout=30)
    bad = s.client(connect=True)
    data = headers_frame(6)
    if not complete:
        data = data[:data.index(b"\n\n") + 1]      # every header line, not the blank line
    send_ignoring_reset(bad, data)
    expect_error(bad, "too many headers")
    s.finish()


def test_headers_at_the_limit_are_fine(scene):
    s = scene(max_headers=5)
    ok = s.client(connect=True)
    ok.send_bytes(frame("SEND", [("destination", "/topic/x"), ("receipt", "r-5"), ("h1", "v"),
                                 ("h2", "v"), ("h3", "v")], b"x"))
    assert ok.expect("RECEIPT").headers["receipt-id"] == "r-5"
    s.finish(protocol_errors=0, messages_in=1)


@pytest.mark.parametrize("where", ["command", "header", "header-still-coming"])
def test_header_line_too_long(scene, where):
    s = scene(max_header_line=200, frame_timeout=30)
    bad = s.client(connect=True)
    long = "x" * 201
    if where == "command":
        data = frame("SEND" + long, {"destination": "/topic/x"})
    elif where == "header":
        data = frame("SEND", {"destination": "/topic/x", "h": long})
    else:
        data = b"SEND\ndestination:/topic/x\nh:" + long.encode()
    send_ignoring_reset(bad, data)
    expect_error(bad, "longer than 200 bytes")
    s.finish()


def test_body_over_max_body_with_content_length(scene):
    s = scene(max_body=1000, frame_timeout=30)
    bad = s.client(connect=True)
    send_ignoring_reset(bad, frame("SEND", {"destination": "/topic/x", "content-length": "2000"},
                                   b"b" * 2000))
    expect_error(bad, "over the limit of 1000 bytes")
    s.finish()


def test_body_over_max_body_without_content_length_streamed(scene):
    """A body with no content-length and no NUL: cut at the limit, not buffered on and on."""
    s = scene(max_body=1000, frame_timeout=30)
    bad = s.client(connect=True)
    head = b"SEND\ndestination:/topic/x\n\n"
    bad.send_bytes(head)
    biggest = 0
    for _ in range(1000):                    # up to 1 MB, far over what the broker may hold
        send_ignoring_reset(bad, b"b" * 1000)
        if select.select([bad.sock], [], [], 0.01)[0]:
            break
        buffered = s.broker.call(lambda: len(s.conn_of(bad).parser._buf)
                                 if s.conn_of(bad) else 0)
        biggest = max(biggest, buffered)
    expect_error(bad, "over the limit of 1000 bytes")
    assert biggest <= len(head) + 1000 + pymq.RECV_SIZE     # the limit and one more read
    s.finish()


@pytest.mark.parametrize("size", [1001, 5000, 60000])
def test_body_over_max_body_without_content_length_in_one_piece(scene, size):
    """The whole oversized frame, NUL included, arrives at once: still over the limit."""
    s = scene(max_body=1000, frame_timeout=30)
    bad = s.client(connect=True)
    send_ignoring_reset(bad, frame("SEND", {"destination": BYSTANDER_TOPIC, "receipt": "r-big"},
                                   b"b" * size))
    expect_error(bad, "over the limit of 1000 bytes", receipt="r-big")
    s.finish()


def test_body_at_max_body_is_fine(scene):
    s = scene(max_body=1000)
    ok = s.client(connect=True)
    ok.request("SEND", {"destination": "/topic/x"}, b"b" * 1000)
    ok.send_bytes(frame("SEND", {"destination": "/topic/x", "receipt": "r-nolen"}, b"b" * 1000))
    assert ok.expect("RECEIPT").headers["receipt-id"] == "r-nolen"
    s.finish(protocol_errors=0, messages_in=2)


def test_content_length_not_followed_by_nul(scene):
    s = scene(frame_timeout=30)
    bad = s.client(connect=True)
    bad.send_bytes(frame("SEND", {"destination": BYSTANDER_TOPIC, "content-length": "3"},
                         b"abcX"))
    expect_error(bad, "not followed by a NUL")
    s.finish()


# Frames whose header block was read whole, so the broker knows they asked for a receipt.
@pytest.mark.parametrize("data, fragment", [
    (frame("SEND", {"destination": "/topic/x", "receipt": "r-p", "content-length": "abc"}, b"a"),
     "invalid content-length"),
    (frame("SEND", {"destination": "/topic/x", "receipt": "r-p", "content-length": "-1"}, b"a"),
     "invalid content-length"),
    (frame("SEND", {"destination": "/topic/x", "receipt": "r-p", "content-length": "5000"}),
     "over the limit"),
    (frame("SEND", {"destination": "/topic/x", "receipt": "r-p", "content-length": "3"},
           b"abcX"), "not followed by a NUL"),
    (frame("SEND", {"destination": "/topic/x", "receipt": "r-p"}, b"b" * 2000, end=b""),
     "over the limit"),
], ids=["content-length-abc", "content-length-negative", "content-length-huge", "no-nul",
        "body-over-limit"])
def test_parser_errors_carry_the_receipt_id(scene, data, fragment):
    s = scene(max_body=1000, frame_timeout=30)
    bad = s.client(connect=True)
    send_ignoring_reset(bad, data)
    expect_error(bad, fragment, receipt="r-p")
    s.finish()


# -- stalls and timeouts -----------------------------------------------------------------------

STALLED = [
    b"SEN",
    b"SEND\ndestination:/topic/x\n",
    b"SEND\ndestination:/topic/x\n\nno NUL and no content-length",
    b"SEND\ndestination:/topic/x\ncontent-length:10\n\nabc",
    b"SEND\ndestination:/topic/x\ncontent-length:3\n\nabc",
    b"\n\nSEND\ndestination:/topic/x\n\r",
]


@pytest.mark.parametrize("data", STALLED)
def test_half_a_frame_then_stall(scene, data):
    s = scene(frame_timeout=0.5)
    bad = s.client(connect=True)
    started = time.monotonic()
    bad.send_bytes(data)
    expect_error(bad, "frame not finished within 0.5 seconds")
    assert 0.45 <= time.monotonic() - started < 1.5
    s.finish()


@pytest.mark.parametrize("prefix", [b"SEND\ndestination:/topic/x\nh:",
                                    b"SEND\ndestination:/topic/x\n\n"], ids=["header", "body"])
def test_trickling_client_is_dropped_with_bounded_buffer(scene, prefix):
    """A slowloris: bytes keep coming, the frame never ends. Dropped at frame_timeout all the
    same, its buffer never larger than what it sent, and then released."""
    s = scene(frame_timeout=0.5, max_header_line=4096, max_body=4096)
    bad = s.client(connect=True)
    started = time.monotonic()
    bad.send_bytes(prefix)
    sent = len(prefix)
    biggest = 0
    while not select.select([bad.sock], [], [], 0.02)[0]:
        assert time.monotonic() - started < 1.5, "the trickling client was not dropped"
        send_ignoring_reset(bad, b"t" * 8)
        sent += 8
        conn_buf = s.broker.call(lambda: len(s.conn_of(bad).parser._buf)
                                 if s.conn_of(bad) else 0)
        assert conn_buf <= sent
        biggest = max(biggest, conn_buf)
    expect_error(bad, "frame not finished within 0.5 seconds")
    assert 0.45 <= time.monotonic() - started < 1.5
    assert biggest > len(prefix)            # the broker did read the trickle while it lasted
    s.finish()                              # ... and releases the connection


def test_frame_timer_restarts_with_each_frame(scene):
    """A producer whose reads always end mid-frame, but each frame finishes well within
    frame_timeout, is not a stalled client."""
    s = scene(frame_timeout=0.5)
    ok = s.client(connect=True)
    one = frame("SEND", {"destination": "/topic/x", "content-length": "4"}, b"data")
    half = len(one) // 2
    ok.send_bytes(one[:half])
    for _ in range(6):                              # 6 x 0.15 s: longer than frame_timeout
        time.sleep(0.15)                           # pacing the producer, not awaiting
        ok.send_bytes(one[half:] + one[:half])     # finish a frame, start the next
    ok.send_bytes(one[half:])
    ok.request("SEND", {"destination": "/topic/x"}, b"done")
    s.finish(protocol_errors=0, messages_in=8)


@pytest.mark.parametrize("chatter", [b"", b"\n", b"\r\n\n"], ids=["silent", "heart-beats",
                                                                  "crlf-heart-beats"])
def test_client_that_never_connects(scene, chatter):
    s = scene(connect_timeout=0.4, frame_timeout=30)
    bad = s.client()
    started = time.monotonic()
    if chatter:
        while not select.select([bad.sock], [], [], 0.05)[0]:   # chatter, but no CONNECT
            assert time.monotonic() - started < 1.5, "not dropped"
            send_ignoring_reset(bad, chatter)
    expect_error(bad, "no CONNECT frame within 0.4 seconds")
    assert 0.35 <= time.monotonic() - started < 1.5
    s.finish()


def test_half_a_connect_frame_hits_the_connect_timeout(scene):
    s = scene(connect_timeout=0.4, frame_timeout=30)
    bad = s.client()
    started = time.monotonic()
    bad.send_bytes(b"CONNECT\naccept-version:1.2\n")
    expect_error(bad, "no CONNECT frame within 0.4 seconds")
    assert 0.35 <= time.monotonic() - started < 1.5
    s.finish()


# -- connecting --------------------------------------------------------------------------------

@pytest.mark.parametrize("credentials", [
    {"login": "u", "passcode": "wrong"},
    {"login": "wrong", "passcode": "p"},
    {"login": "U", "passcode": "P"},
    {"login": "u"},
    {"passcode": "p"},
    {},
    {"login": "", "passcode": ""},
    {"login": "u\u00e9", "passcode": "p"},
], ids=["wrong-passcode", "wrong-login", "wrong-case", "no-passcode", "no-login", "none",
        "empty", "non-ascii"])
@pytest.mark.parametrize("receipt", [None, "r-cred"])
def test_bad_credentials(scene, credentials, receipt):
    s = scene(login="u", passcode="p")
    bad = s.client()
    headers = {"accept-version": "1.2", "host": "localhost", **credentials}
    if receipt:
        headers["receipt"] = receipt
    bad.send("CONNECT", headers)
    expect_error(bad, "bad credentials", receipt=receipt)
    s.finish(logins_refused=1)


@pytest.mark.parametrize("command", ["CONNECT", "STOMP"])
def test_right_credentials_work(scene, command):
    s = scene(login="u", passcode="p")
    ok = s.client()
    ok.connect("1.2", command=command, login="u", passcode="p")
    s.connected += 1
    ok.request("SUBSCRIBE", {"destination": "/topic/x", "id": "1"})
    ok.send("SEND", {"destination": "/topic/x"}, b"hi")
    assert ok.expect("MESSAGE").body == b"hi"
    s.finish(protocol_errors=0, messages_in=1, messages_out=1)


@pytest.mark.parametrize("offered", ["2.0", "", "1.3,0.9", "1.2.1", "v1.2"])
def test_no_supported_version(scene, offered):
    s = scene()
    bad = s.client()
    bad.send("CONNECT", {"accept-version": offered, "host": "localhost"})
    expect_error(bad, "supported protocol versions", version="1.2,1.1,1.0")
    s.finish()


# -- frames that make no sense in the session's state ------------------------------------------

@pytest.mark.parametrize("version, command, headers, fragment", [
    ("1.2", "UNSUBSCRIBE", {"id": "nope"}, "no such subscription"),
    ("1.0", "UNSUBSCRIBE", {"destination": "/topic/nope"}, "no such subscription"),
    ("1.2", "UNSUBSCRIBE", {}, "UNSUBSCRIBE needs an id"),
    ("1.2", "ACK", {"message-id": "m1"}, "ACK needs a id header"),
    ("1.2", "NACK", {}, "NACK needs a id header"),
    ("1.1", "ACK", {"id": "m1"}, "ACK needs a message-id header"),
    ("1.2", "CONNECT", {"accept-version": "1.2"}, "already connected"),
    ("1.2", "STOMP", {"accept-version": "1.2"}, "already connected"),
    ("1.0", "CONNECT", {}, "already connected"),
    ("1.2", "COMMIT", {"transaction": "t-nope"}, "no such transaction"),
    ("1.2", "ABORT", {"transaction": "t-nope"}, "no such transaction"),
    ("1.2", "COMMIT", {}, "COMMIT needs a transaction header"),
    ("1.2", "BEGIN", {}, "BEGIN needs a transaction header"),
    ("1.2", "SEND", {"destination": "/topic/x", "transaction": "t-nope"}, "no such transaction"),
    ("1.2", "SUBSCRIBE", {"destination": "/topic/x", "id": "1", "ack": "sometimes"},
     "unknown ack mode"),
])
@pytest.mark.parametrize("receipt", [None, "r-state"])
def test_frame_out_of_place(scene, version, command, headers, fragment, receipt):
    s = scene()
    bad = s.client(connect=True, version=version)
    headers = dict(headers)
    if receipt:
        headers["receipt"] = receipt
    bad.send(command, headers)
    expect_error(bad, fragment, receipt=receipt)
    s.finish()


def test_second_begin_of_one_transaction(scene):
    s = scene()
    bad = s.client(connect=True)
    bad.request("BEGIN", {"transaction": "t1"})
    bad.send("BEGIN", {"transaction": "t1", "receipt": "r-again"})
    expect_error(bad, "already begun", receipt="r-again")
    s.finish()


def test_subscription_id_reused_for_another_destination(scene):
    s = scene()
    bad = s.client(connect=True)
    bad.request("SUBSCRIBE", {"destination": "/topic/a", "id": "1"})
    bad.send("SUBSCRIBE", {"destination": "/topic/b", "id": "1"})
    expect_error(bad, "already in use")
    s.finish()


# -- clients that vanish -----------------------------------------------------------------------

def _reset(client):
    """Close with an RST rather than a FIN."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()


@pytest.mark.parametrize("connect", [False, True], ids=["before-connect", "after-connect"])
@pytest.mark.parametrize("how", ["close", "reset", "half-close"])
@pytest.mark.parametrize("data", [b"", b"SEN",
                                  b"SEND\ndestination:/topic/x\ncontent-length:9\n\nab"],
                         ids=["between-frames", "in-command", "in-body"])
def test_client_vanishes_mid_frame(scene, connect, how, data):
    """No ERROR is owed to a client that left; nothing counted but its CONNECT."""
    s = scene(connect_timeout=30, frame_timeout=30)
    bad = s.client(connect=connect)
    if connect:
        bad.request("SUBSCRIBE", {"destination": BYSTANDER_TOPIC, "id": "gone"})
    if data:
        bad.send_bytes(data)
    if how == "close":
        bad.close()
    elif how == "reset":
        _reset(bad)
    else:
        bad.sock.shutdown(socket.SHUT_WR)      # half-open: we still read, never write again
        bad.expect_closed()                    # the broker closes, without an ERROR
    s.finish(protocol_errors=0)
    # Its subscription went with it: the bystander's messages reach only the bystander.
    assert s.broker.call(lambda: len(pymq._members(s.broker.server.broker.topics.exact[BYSTANDER_TOPIC[7:]]))) == 1


# -- many at once ------------------------------------------------------------------------------

def test_many_bad_clients_in_parallel(scene):
    s = scene(connect_timeout=1.0, frame_timeout=1.0, max_header_line=1000)
    count = 50
    failures = []
    ready = threading.Barrier(count + 1)

    def bad_client(i):
        try:
            client = RawClient(s.broker.address)
            try:
                if i % 2:
                    client.connect("1.2")
                ready.wait(5)
                kind = i % 5
                if kind == 0:
                    data = garbage(i, 2048) + b"\n\n\0"
                elif kind == 1:
                    data = frame("SEND", {"destination": "/nowhere"}, b"x")
                elif kind == 2:
                    data = bytes(range(11, 256)) * 8           # a line over the limit
                elif kind == 3:
                    data = frame("FOO", {"receipt": "r%d" % i})
                else:
                    data = frame("SEND", {"destination": "/topic/x", "content-length": "x"})
                send_ignoring_reset(client, data)
                expect_error(client, receipt="r%d" % i if kind == 3 else None)
            finally:
                client.close()
        except BaseException as error:          # reported by the main thread
            failures.append((i, error))

    threads = [threading.Thread(target=bad_client, args=(i,), daemon=True)
               for i in range(count)]
    for thread in threads:
        thread.start()
    ready.wait(5)
    s.bystander.check()                          # served while the bad clients are at it
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive(), "a bad client hung"
    assert not failures, failures[:3]
    s.before["messages_in"] += 1                 # the bystander's check above
    s.before["messages_out"] += 1
    s.finish(protocol_errors=count, connections=count // 2)

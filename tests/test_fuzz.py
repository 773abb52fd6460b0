"""Fuzz tests: the frame parser on mutated valid frames, and one broker under random traffic
from several connections at once.

test_codec.py checks the codec's properties on well-formed streams and on unstructured garbage;
here the input is *almost* right, which is where parsers break:

  * Parser: a corpus of valid frames (every command, every version, with and without
    content-length, LF and CRLF) is mutated by hypothesis -- byte flips, inserted NUL / EOL /
    ':' / '\\', deletions, truncation, duplicated segments, absurd content-length values, two
    frames spliced -- and fed in arbitrary chunks, as a fixed version or like a connection that
    switches version after CONNECT. Only Frames or ProtocolError may come out, the buffer stays
    within one frame's limits plus the last chunk, what parses is self-consistent
    (content-length = body size) and does not depend on the cuts. A few big inputs are fed with
    tracemalloc on, to bound peak memory.
  * Broker: hypothesis scripts drive several raw sockets against ONE broker with small limits:
    valid and invalid frames of every command (and garbage), to /queue/, /topic/ and /control/
    destinations of a namespace of their own, with receipts, ids, ack modes, prefetch,
    priority, ack-timeout and transactions, ACKs of message ids the client really received,
    abrupt closes and reconnects. Every read is bounded. As it goes: every byte the broker
    sends parses in the negotiated version, nothing follows an ERROR, RECEIPTs come in the
    order asked for, and no sender header passes for one of the broker's. After each script:
    the broker thread and its greenlets live, nothing was logged at WARNING or above and no
    greenlet died, protocol_errors (and connections) match what the clients saw, a fresh
    client gets queue and topic service, every message left in the namespace's queues is
    delivered and ACKed, and once everyone left no connection, subscription, queue, prefix,
    returned message or live ack timer remains.
  * Regressions: minimal reproductions of the bugs these fuzzers found.

PYMQ_FUZZ_SCALE=N multiplies the number of examples, for a longer hunt (pytest's timeout scales
too); PYMQ_FUZZ_SHRINK=1 lets hypothesis shrink a failing broker script (slow).
bench/fuzz_parser.py is a coverage-guided (atheris) target for the parser.
"""

import collections
import contextlib
import itertools
import logging
import os
import re
import select
import socket
import time
try:
    import tracemalloc
except ImportError:         # PyPy has none: peak memory is checked on CPython
    tracemalloc = None

import pytest
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

import pymq
from conftest import TIMEOUT, RawClient

Frame = pymq.Frame
ProtocolError = pymq.ProtocolError
VERSIONS = ("1.0", "1.1", "1.2")
UNESCAPED = ("CONNECT", "STOMP", "CONNECTED")
# PYMQ_FUZZ_SCALE=N runs N times as many examples (a longer hunt: e.g. 20 for ten minutes).
SCALE = int(os.environ.get("PYMQ_FUZZ_SCALE", "1"))
DEFAULT_LIMITS = dict(max_headers=100, max_header_line=65536, max_body=16 * 1024 * 1024)


# =============================================================================================
# Part 1: the parser on mutated valid frames
# =============================================================================================

def buffer_bound(max_headers, max_header_line, max_body):
    """Most bytes one partial frame within the limits can take (as in test_codec.py): the
    command line and max_headers header lines (each the limit plus CR LF), the blank CR LF, the
    body and its NUL."""
    return (max_headers + 1) * (max_header_line + 2) + 2 + max_body + 1


SPECIAL_HEADER = ("we:ird\\na\nme", "va:l\\ue\r\n\\c")   # needs escaping everywhere

# (command, headers, body): every command a client or a broker sends, with the headers it
# carries. Encoded in every version, so escaping applies where the version has it.
TEMPLATES = [
    ("CONNECT", {"accept-version": "1.0,1.1,1.2", "host": "h", "login": "u",
                 "passcode": "p:w", "heart-beat": "0,1000"}, b""),
    ("CONNECT", {}, b""),
    ("STOMP", {"accept-version": "1.2", "host": "h"}, b""),
    ("CONNECTED", {"version": "1.2", "server": "pymq/0", "session": "s-1",
                   "heart-beat": "0,0"}, b""),
    ("SEND", {"destination": "/queue/q", "receipt": "r1", "priority": "9",
              "ack-timeout": "1.5", "transaction": "t1"}, b"hello"),
    ("SEND", {"destination": "/topic/t", SPECIAL_HEADER[0]: SPECIAL_HEADER[1]}, b"a\0b\nc"),
    ("SEND", {"destination": "/control/count-msgs/queue/q", "receipt": "r2"}, b""),
    ("SUBSCRIBE", {"destination": "/queue/q", "id": "s1", "ack": "client-individual",
                   "prefetch": "10"}, b""),
    ("SUBSCRIBE", {"destination": "/topic/a*", "id": "s2", "ack": "auto"}, b""),
    ("UNSUBSCRIBE", {"id": "s1", "receipt": "r3"}, b""),
    ("UNSUBSCRIBE", {"destination": "/topic/t"}, b""),
    ("ACK", {"id": "17", "message-id": "17", "subscription": "s1", "transaction": "t1"}, b""),
    ("NACK", {"id": "18", "message-id": "18", "receipt": "r4"}, b""),
    ("BEGIN", {"transaction": "t1"}, b""),
    ("COMMIT", {"transaction": "t1", "receipt": "r5"}, b""),
    ("ABORT", {"transaction": "t1"}, b""),
    ("DISCONNECT", {"receipt": "r6"}, b""),
    ("MESSAGE", {"subscription": "s1", "message-id": "42", "ack": "42",
                 "destination": "/queue/q", "redelivered": "true"}, b"\x00\xffbody"),
    ("RECEIPT", {"receipt-id": "r1", "num-messages": "3"}, b""),
    ("ERROR", {"message": "bad: thing", "receipt-id": "r9"}, b"details\n"),
]


def _corpus():
    """(version, bytes): each template encoded canonically, without content-length (when the
    body has no NUL) and with CRLF header lines, in every version."""
    corpus = []
    for version in VERSIONS:
        for command, headers, body in TEMPLATES:
            canonical = pymq.encode_frame(command, headers, body, version)
            corpus.append((version, canonical))
            escaped = version != "1.0" and command not in UNESCAPED
            if b"\0" not in body:
                corpus.append((version, (command + "\n").encode() + pymq.encode_rest(
                    headers, body, version, escaped, with_length=False)))
            head, _, rest = canonical.partition(b"\n\n")
            corpus.append((version, head.replace(b"\n", b"\r\n") + b"\r\n\r\n" + rest))
    return corpus


CORPUS = _corpus()

INSERTS = [b"\0", b"\n", b"\r", b":", b"\\", b"\r\n", b"\n\n", b"\n\r\n", b"\\c", b"\\n",
           b"\\r", b"\\t", b"\\", b"\xff", b"\xc3", b"\xed\xa0\x80", b" ", b"\0\n",
           b"content-length:", b"content-length:0\n", b"\nSEND\n\n\0", b"a:b\n"]
CONTENT_LENGTHS = [b"9" * 30, b"9" * 5000, b"0" * 5000 + b"3", b"0" * 70000 + b"1", b"-1",
                   b"+3", b" 3", b"3 ", b"0x10", b"1e3", "\u0663".encode(), "\u00b2".encode(),
                   b"", b"4294967296", b"18446744073709551617", b"0", b"1", b"2", b"5", b"8",
                   b"16777216", b"16777217", b"300", b"301"]

POSITIONS = st.integers(0, 1 << 16)     # taken modulo the current length


@st.composite
def mutations(draw):
    """One mutation, as a tuple that reads well in a failure report."""
    kind = draw(st.sampled_from(["flip", "insert", "insert", "delete", "truncate",
                                 "duplicate", "content-length", "content-length", "splice",
                                 "append", "heartbeats"]))
    if kind == "flip":
        return kind, draw(POSITIONS), draw(st.integers(1, 255))
    if kind == "insert":
        return kind, draw(POSITIONS), draw(st.sampled_from(INSERTS))
    if kind == "delete":
        return kind, draw(POSITIONS), draw(st.integers(1, 8))
    if kind == "truncate":
        return kind, draw(POSITIONS)
    if kind == "duplicate":
        return kind, draw(POSITIONS), draw(st.integers(1, 40)), draw(POSITIONS), \
            draw(st.integers(1, 3))
    if kind == "content-length":
        return kind, draw(st.sampled_from(CONTENT_LENGTHS))
    if kind == "splice":
        return kind, draw(st.integers(0, len(CORPUS) - 1)), draw(POSITIONS), draw(POSITIONS)
    if kind == "append":
        return kind, draw(st.integers(0, len(CORPUS) - 1))
    return kind, draw(POSITIONS), draw(st.sampled_from([b"\n", b"\r\n", b"\n" * 5, b"\r"]))


_CONTENT_LENGTH_LINE = re.compile(rb"content-length:[^\n]*")


def mutate(data, mutation):
    data = bytearray(data)
    kind, *args = mutation
    if kind == "flip":
        if data:
            data[args[0] % len(data)] ^= args[1]
    elif kind == "insert":
        i = args[0] % (len(data) + 1)
        data[i:i] = args[1]
    elif kind == "delete":
        i = args[0] % (len(data) + 1)
        del data[i:i + args[1]]
    elif kind == "truncate":
        del data[args[0] % (len(data) + 1):]
    elif kind == "duplicate":
        i = args[0] % (len(data) + 1)
        segment = bytes(data[i:i + args[1]]) * args[3]
        j = args[2] % (len(data) + 1)
        data[j:j] = segment
    elif kind == "content-length":
        line = b"content-length:" + args[0]
        if _CONTENT_LENGTH_LINE.search(data):
            data = bytearray(_CONTENT_LENGTH_LINE.sub(lambda _: line, bytes(data), count=1))
        else:
            eol = data.find(b"\n")
            i = len(data) if eol < 0 else eol + 1
            data[i:i] = line + b"\n"
    elif kind == "splice":
        other = CORPUS[args[0]][1]
        data = data[:args[1] % (len(data) + 1)] + other[args[2] % (len(other) + 1):]
    elif kind == "append":
        data += CORPUS[args[0]][1]
    else:
        i = args[0] % (len(data) + 1)
        data[i:i] = args[1]
    return bytes(data)


@st.composite
def mutated_streams(draw):
    """(corpus versions, bytes): one to three corpus frames, each mutated a few times."""
    pieces, versions = [], []
    for _ in range(draw(st.integers(1, 3))):
        version, data = CORPUS[draw(st.integers(0, len(CORPUS) - 1))]
        versions.append(version)
        for mutation in draw(st.lists(mutations(), min_size=0, max_size=4)):
            data = mutate(data, mutation)
        pieces.append(data)
    return versions, b"".join(pieces)


def split(data, cuts):
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


def check_frame(frame):
    """What any parsed frame must look like, whatever the input."""
    assert isinstance(frame, Frame)
    assert isinstance(frame.command, str) and "\n" not in frame.command
    assert isinstance(frame.body, bytes)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in frame.headers.items())
    length = frame.headers.get("content-length")
    if length is not None:
        # The content-length the parser framed the body by is the one the frame reports.
        assert len(frame.body) == int(length.strip().lstrip("0") or "0")
    else:
        assert b"\0" not in frame.body


def run_parser(chunks, version, limits, follow_connect, bound=None):
    """Feed chunks like Connection does (in_frame after each read); returns (frames, versions
    in force for each, error). With follow_connect, the version starts at 1.0 and switches
    after a CONNECT or STOMP frame, as the broker does once it negotiates one. With bound,
    the buffer is checked after every feed."""
    parser = pymq.FrameParser(**limits)
    parser.version = "1.0" if follow_connect else version
    frames, versions = [], []
    try:
        for chunk in chunks:
            parser.feed(chunk)
            if bound is not None:
                assert len(parser._buf) <= bound + len(chunk), \
                    "buffer %d > bound %d + chunk %d" % (len(parser._buf), bound, len(chunk))
            while True:
                frame = parser.next_frame()
                if frame is None:
                    break
                check_frame(frame)
                frames.append(frame)
                versions.append(parser.version)
                if follow_connect and frame.command in ("CONNECT", "STOMP"):
                    try:
                        parser.version = pymq.negotiate_version(
                            frame.headers.get("accept-version"))
                    except ProtocolError:
                        pass
            assert isinstance(parser.in_frame, bool)
    except ProtocolError as error:
        assert isinstance(error.message, str) and error.message
        assert error.receipt is None or isinstance(error.receipt, str)
        return frames, versions, True
    return frames, versions, False


LIMITS = st.one_of(
    st.just(DEFAULT_LIMITS),
    st.fixed_dictionaries(dict(max_headers=st.integers(0, 8),
                               max_header_line=st.integers(4, 200),
                               max_body=st.integers(0, 300))),
    st.just(dict(max_headers=20, max_header_line=1024, max_body=4096)),   # the broker fuzz's
)

PARSER_SETTINGS = settings(max_examples=400 * SCALE, deadline=None,
                           suppress_health_check=[HealthCheck.too_slow,
                                                  HealthCheck.data_too_large])


def test_corpus_is_valid():
    """Unmutated, every corpus entry is one frame in its version (the mutations start from
    valid input)."""
    for version, data in CORPUS:
        frames, _, error = run_parser([data], version, DEFAULT_LIMITS, False)
        assert not error and len(frames) == 1, (version, data)


@pytest.mark.timeout(120 * SCALE)
@PARSER_SETTINGS
@given(stream=mutated_streams(), limits=LIMITS, data=st.data())
def test_mutated_frames_give_frames_or_protocol_error(stream, limits, data):
    """Mutated valid frames, cut anywhere: Frames or ProtocolError only, the buffer bounded,
    and the outcome the same as when the stream comes in one piece."""
    versions, raw = stream
    follow_connect = data.draw(st.booleans(), label="follow_connect")
    version = data.draw(st.sampled_from(versions), label="version")
    cuts = data.draw(st.one_of(
        st.lists(st.integers(0, len(raw)), max_size=16),
        st.just(range(len(raw))) if len(raw) < 400 else st.nothing(),       # byte by byte
    ), label="cuts")
    bound = buffer_bound(**limits)
    chunked = run_parser(split(raw, cuts), version, limits, follow_connect, bound)
    whole = run_parser([raw], version, limits, follow_connect, bound)
    note("chunked: %r" % (chunked,))
    assert chunked == whole


@pytest.mark.timeout(120 * SCALE)
@PARSER_SETTINGS
@given(stream=mutated_streams(), limits=LIMITS,
       chunk=st.sampled_from([1, 2, 3, 7, 64, 4096]))
def test_mutated_frames_in_fixed_size_chunks(stream, limits, chunk):
    """Like a socket read: fixed-size chunks, in a connection that follows CONNECT."""
    _, raw = stream
    chunks = [raw[i:i + chunk] for i in range(0, len(raw), chunk)]
    bound = buffer_bound(**limits)
    assert (run_parser(chunks, "1.0", limits, True, bound)
            == run_parser([raw], "1.0", limits, True, bound))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("length", [b"9" * 5000, b"9" * 60000, b"0" * 60000 + b"3",
                                    b"1" + b"0" * 4400])
def test_content_length_with_thousands_of_digits(version, length):
    """Digits are compared before int() (which refuses over 4300 digits in Python >= 3.11)."""
    raw = b"SEND\ndestination:/queue/q\ncontent-length:" + length + b"\n\nabc\0"
    frames, _, error = run_parser([raw], version, DEFAULT_LIMITS, False)
    if length.lstrip(b"0") == b"3":
        assert not error and frames[0].body == b"abc"
    else:
        assert error and not frames


def _chunks(total, piece, size=64 * 1024):
    for start in range(0, total, size):
        yield piece[:min(size, total - start)]


# (id, limits, prefix, filler pattern, filler size, suffix, expect error, peak bound in bytes)
BIG_CASES = [
    ("endless-command", DEFAULT_LIMITS, b"", b"C", 8 << 20, b"", True, 1 << 20),
    ("endless-header", DEFAULT_LIMITS, b"SEND\nk:", b"v", 8 << 20, b"", True, 1 << 20),
    ("header-flood", DEFAULT_LIMITS, b"SEND\n", b"h:v\n", 8 << 20, b"", True, 1 << 20),
    ("content-length-digits", DEFAULT_LIMITS, b"SEND\ncontent-length:", b"9", 60000,
     b"\n\n", True, 1 << 20),
    ("content-length-zeros", DEFAULT_LIMITS, b"SEND\ncontent-length:", b"0", 60000,
     b"3\n\nabc\0", False, 1 << 20),
    ("body-without-nul", dict(DEFAULT_LIMITS, max_body=1 << 20), b"SEND\n\n", b"b", 8 << 20,
     b"", True, 4 << 20),
    # Small: the heart-beat loop allocates an int per byte, which tracemalloc makes slow.
    ("heart-beat-flood", DEFAULT_LIMITS, b"", b"\r\n", 256 << 10, b"", False, 1 << 20),
]


class PeakMemory:
    """The peak of memory allocated within the block, by tracemalloc; None on PyPy."""

    peak = None

    def __enter__(self):
        if tracemalloc is not None:
            tracemalloc.start()
        return self

    def __exit__(self, *exc):
        if tracemalloc is not None:
            self.peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()


@pytest.mark.parametrize("name, limits, prefix, pattern, size, suffix, error, peak_bound",
                         BIG_CASES, ids=[case[0] for case in BIG_CASES])
def test_big_inputs_peak_memory(name, limits, prefix, pattern, size, suffix, error,
                                peak_bound):
    """Megabytes fed in socket-sized chunks: the parser's peak memory (tracemalloc) stays
    near what the limits allow, not what the peer sends."""
    piece = (pattern * ((64 * 1024) // len(pattern) + 1))[:64 * 1024]
    parser = pymq.FrameParser(**limits)
    parser.version = "1.2"
    frames = []
    raised = False
    with PeakMemory() as memory:
        try:
            for chunk in itertools.chain([prefix], _chunks(size, piece), [suffix]):
                parser.feed(chunk)
                assert len(parser._buf) <= buffer_bound(**limits) + len(chunk)
                while True:
                    frame = parser.next_frame()
                    if frame is None:
                        break
                    frames.append(frame)
        except ProtocolError:
            raised = True
    assert raised == error
    if name == "content-length-zeros":
        assert [f.body for f in frames] == [b"abc"]
    assert memory.peak is None or memory.peak < peak_bound, "peak %d bytes" % memory.peak


def test_big_frame_at_the_limits_peak_memory():
    """A frame exactly at max_body, with content-length, arrives in chunks and parses. The
    parser holds the body three times at the end: the buffer, the bytearray slice
    buf[body_start:nul] and bytes() of it (a memoryview slice would save one copy)."""
    limits = dict(DEFAULT_LIMITS, max_body=4 << 20)
    body = b"x" * (4 << 20)
    raw = b"SEND\ndestination:/queue/q\ncontent-length:%d\n\n" % len(body) + body + b"\0\n"
    parser = pymq.FrameParser(**limits)
    frames = []
    with PeakMemory() as memory:
        for start in range(0, len(raw), 64 * 1024):
            parser.feed(raw[start:start + 64 * 1024])
            frame = parser.next_frame()
            if frame is not None:
                frames.append(frame)
    assert len(frames) == 1 and len(frames[0].body) == len(body)
    assert memory.peak is None or memory.peak < 3.5 * len(body), "peak %d bytes" % memory.peak


# =============================================================================================
# Part 2: one broker, several raw connections, random traffic
# =============================================================================================

FUZZ_LIMITS = dict(max_body=4096, max_headers=20, max_header_line=1024, frame_timeout=1,
                   connect_timeout=1)
CLIENTS = 6
STEP_READ = 0.005          # how long a step waits for the broker's answers
CLOSE_DEADLINE = 5.0       # how long a closing client waits for the broker to close too

# Destinations: "{ns}" is the example's own namespace. Only {ns}-a and {ns}-b are valid
# queues (drained after each example); the rest are topics, controls and invalid ones.
DESTINATIONS = ["/queue/{ns}-a", "/queue/{ns}-b", "/topic/{ns}-a", "/topic/{ns}-b",
                "/topic/{ns}-*", "/topic/{ns}-a*", "/topic/*",
                "/control/count-msgs/queue/{ns}-a", "/control/count-subscribers/topic/{ns}-a",
                "/control/count-subscribers/queue/{ns}-b", "/control/count-msgs/queue/",
                "/control/nope", "/queue/", "/topic/", "queue/{ns}-a", "/foo/{ns}", ""]
VALID_DESTINATIONS = DESTINATIONS[:7]
ACK_REF = "@ack:"          # "@ack:K": the K-th last message id this client received

HEADER_VALUES = {
    "destination": st.one_of(st.sampled_from(VALID_DESTINATIONS), st.sampled_from(DESTINATIONS)),
    "id": st.sampled_from(["s1", "s2", "s3", "", "a:b", "x\\y", "é"]),
    "receipt": st.sampled_from(["r1", "r2", "r:3", "r\\4", "r\n5", ""]),
    "ack": st.sampled_from(["auto", "client", "client-individual", "client-individual",
                            "Client", ""]),
    "prefetch": st.sampled_from(["1", "2", "0", "-3", "x", " 5 ", "99999999999999999999"]),
    "prefetch-count": st.sampled_from(["1", "3"]),
    "activemq.prefetchSize": st.sampled_from(["1", "abc"]),
    "priority": st.sampled_from(["0", "4", "9", "10", "-1", "x", " 5", "\u0663", ""]),
    "ack-timeout": st.sampled_from(["0", "0.05", "0.2", "nan", "inf", "-1", "1e9", "x",
                                    "1e-3", "30"]),
    "transaction": st.sampled_from(["t1", "t2", "t1", ""]),
    "accept-version": st.sampled_from(["1.0", "1.1", "1.2", "1.0,1.1,1.2", "2.0", "", "1.1,x"]),
    "heart-beat": st.sampled_from(["0,0", "10,10", "0,1000", "x", "1,2,3", "-1,0",
                                   "0," + "9" * 25, "0,1" + "0" * 400]),
    "host": st.just("localhost"),
    "login": st.sampled_from(["guest", ""]),
    "content-length": st.sampled_from(["0", "3", "5000", "x", "-1", "9" * 40]),
}
USER_NAMES = st.sampled_from(["x", "x-header", "a:b", "a\nb", "\\", "é", "", " pad ", "message-id",
                              "redelivered", "subscription", "destination:/topic/spoofed",
                              "content-length:"])
USER_VALUES = st.sampled_from(["v", "", "a:b", "a\nb", "c\\d", "\r", " pad ", "é" * 3])

COMMAND_HEADERS = {
    "CONNECT": ["accept-version", "host", "heart-beat", "login", "receipt"],
    "STOMP": ["accept-version", "host", "heart-beat"],
    "SEND": ["destination", "receipt", "priority", "ack-timeout", "transaction"],
    "SUBSCRIBE": ["destination", "id", "ack", "prefetch", "prefetch-count",
                  "activemq.prefetchSize", "receipt"],
    "UNSUBSCRIBE": ["id", "destination", "receipt"],
    "ACK": ["id", "message-id", "transaction", "receipt"],
    "NACK": ["id", "message-id", "transaction", "receipt"],
    "BEGIN": ["transaction", "receipt"],
    "COMMIT": ["transaction", "receipt"],
    "ABORT": ["transaction", "receipt"],
    "DISCONNECT": ["receipt"],
}
COMMANDS = st.one_of(
    st.sampled_from(["SEND"] * 6 + ["SUBSCRIBE"] * 4 + ["ACK"] * 3 + ["NACK", "UNSUBSCRIBE"] * 2
                    + ["BEGIN", "COMMIT", "ABORT"] * 2 + ["CONNECT", "STOMP", "DISCONNECT"]),
    st.sampled_from(["FOO", "send", "CONNECTED", "MESSAGE", "RECEIPT", "ERROR", " SEND", ""]))
BODIES = st.one_of(
    st.sampled_from([b"", b"hello", b"\0", b"a\0b", b"\n\n", b"\xff\xfe"]),
    st.binary(max_size=40),
    st.integers(4090, 4200).map(lambda n: b"x" * n))      # around max_body


def maybe(draw, percent, strategy):
    """A value of strategy `percent` % of the time, else None."""
    return draw(strategy) if draw(st.integers(0, 99)) < percent else None


TXS = st.sampled_from(["t1", "t2"])
ACK_IDS = st.sampled_from([ACK_REF + str(k) for k in (0, 0, 0, 1, 3)] + ["999999999"])
BENIGN_USER_HEADERS = st.sampled_from([("x-app", "v"), ("x-colon", "a:b"), ("x-nl", "a\nb"),
                                       ("x-bs", "c\\d"), ("x-utf", "\u00e9t\u00e9"),
                                       ("a:b", "named with a colon"), ("empty", ""),
                                       ("destination:/topic/spoofed", "x")])


@st.composite
def valid_frames(draw):
    """('frame', command, headers, body, encoding, reconnect): what a correct client sends,
    encoded in the negotiated version. reconnect: the version a dead client reconnects with
    before sending it (so that long scripts keep exercising a connected broker)."""
    command = draw(st.sampled_from(["SEND"] * 8 + ["SUBSCRIBE"] * 3 + ["ACK"] * 4 + ["NACK"]
                                   + ["UNSUBSCRIBE", "BEGIN", "COMMIT", "ABORT"] * 1
                                   + ["DISCONNECT"]))
    headers = {}
    body = b""
    if command == "SEND":
        headers["destination"] = draw(st.sampled_from(
            ["/queue/{ns}-a"] * 6 + ["/queue/{ns}-b", "/topic/{ns}-a"] * 2 + ["/topic/{ns}-b"]
            + ["/control/count-msgs/queue/{ns}-a", "/control/count-subscribers/topic/{ns}-a",
               "/control/count-subscribers/queue/{ns}-a"]))
        for name, percent, values in [
                ("priority", 20, st.sampled_from(["0", "4", "9"])),
                ("ack-timeout", 15, st.sampled_from(["0.05", "0.2", "30"])),
                ("transaction", 15, TXS)]:
            value = maybe(draw, percent, values)
            if value is not None:
                headers[name] = value
        for name, value in draw(st.lists(BENIGN_USER_HEADERS, max_size=2)):
            headers.setdefault(name, value)
        body = draw(st.one_of(st.sampled_from([b"m", b"hello", b"a\0b", b""]),
                              st.binary(max_size=30)))
    elif command == "SUBSCRIBE":
        headers["destination"] = draw(st.sampled_from(
            ["/queue/{ns}-a"] * 3 + ["/queue/{ns}-b", "/topic/{ns}-a", "/topic/{ns}-*",
                                     "/topic/*"]))
        headers["id"] = draw(st.sampled_from(["s1", "s2", "s3"]))
        headers["ack"] = draw(st.sampled_from(["auto", "client", "client-individual"]))
        prefetch = maybe(draw, 40, st.sampled_from(["1", "2", "3"]))
        if prefetch is not None:
            headers["prefetch"] = prefetch
    elif command == "UNSUBSCRIBE":
        headers["id"] = draw(st.sampled_from(["s1", "s2", "s3"]))
    elif command in ("ACK", "NACK"):
        headers["id"] = headers["message-id"] = draw(ACK_IDS)
        tx = maybe(draw, 10, TXS)
        if tx is not None:
            headers["transaction"] = tx
    elif command in ("BEGIN", "COMMIT", "ABORT"):
        headers["transaction"] = draw(TXS)
    if draw(st.integers(0, 99)) < 30:
        headers["receipt"] = draw(st.sampled_from(["r1", "r2", "r:3"]))
    reconnect = draw(st.sampled_from(["1.2", "1.2", "1.1", "1.0"]))
    return "frame", command, tuple(headers.items()), body, "negotiated", reconnect


@st.composite
def hostile_frames(draw):
    """('frame', command, headers, body, encoding, None): any command, mostly the headers it
    uses with values valid or not, a few random others; encoded by encode_frame in some
    version, or raw (no escaping, optional content-length, maybe no NUL)."""
    command = draw(COMMANDS)
    names = COMMAND_HEADERS.get(command, list(HEADER_VALUES))
    headers = {}
    for name in names:
        if draw(st.integers(0, 9)) < (8 if name in ("destination", "id", "transaction")
                                      else 3):
            if name in ("id", "message-id") and command in ("ACK", "NACK"):
                headers[name] = draw(ACK_IDS)
            else:
                headers[name] = draw(HEADER_VALUES[name])
    for _ in range(draw(st.integers(0, 2))):
        if draw(st.booleans()):
            name = draw(st.sampled_from(sorted(HEADER_VALUES)))
            headers.setdefault(name, draw(HEADER_VALUES[name]))
        else:
            headers.setdefault(draw(USER_NAMES), draw(USER_VALUES))
    body = draw(BODIES) if command in ("SEND", "FOO", "") or draw(st.integers(0, 9)) == 0 \
        else b""
    encoding = draw(st.sampled_from(["1.2", "1.1", "1.0", "negotiated", "negotiated",
                                     "raw", "raw-no-nul"]))
    return "frame", command, tuple(headers.items()), body, encoding, None


@st.composite
def garbage_steps(draw):
    if draw(st.booleans()):
        return "bytes", draw(st.binary(min_size=1, max_size=60))
    _, data = draw(mutated_streams())
    return "bytes", data[:2000]


@st.composite
def steps(draw, hostility):
    """(client index, action); valid frames dominate, so that deep broker states are reached,
    and more so at a lower hostility (0: no invalid frames nor garbage at all)."""
    kinds = (["valid"] * 14 + ["pump", "pump", "heart-beat", "close", "reopen"]
             + ["hostile", "hostile", "garbage"] * hostility)
    kind = draw(st.sampled_from(kinds))
    if kind == "valid":
        action = draw(valid_frames())
    elif kind == "hostile":
        action = draw(hostile_frames())
    elif kind == "garbage":
        action = draw(garbage_steps())
    elif kind == "pump":
        action = ("pump", draw(st.sampled_from([0.02, 0.06])))
    elif kind == "heart-beat":
        action = ("heart-beat", draw(st.sampled_from([b"\n", b"\r\n"])))
    elif kind == "close":
        action = ("close", draw(st.sampled_from(["graceful", "abrupt"])))
    else:
        action = ("reopen", draw(st.sampled_from(VERSIONS)))
    return draw(st.integers(0, CLIENTS - 1)), action


INITIAL = st.sampled_from([None] + [(command, version) for command in ("CONNECT", "STOMP")
                                  for version in ("1.2", "1.2", "1.1", "1.0", None)] * 2)
SCRIPTS = st.sampled_from([0, 1, 1, 2]).flatmap(lambda hostility: st.fixed_dictionaries(dict(
    hostility=st.just(hostility),
    initial=st.lists(INITIAL, min_size=CLIENTS, max_size=CLIENTS),
    steps=st.lists(steps(hostility), min_size=20, max_size=80))))


def raw_frame(command, headers, body, nul=True):
    head = command + "\n" + "".join("%s:%s\n" % (k, v) for k, v in headers) + "\n"
    return head.encode() + body + (b"\0" if nul else b"")


class FuzzClient:
    """A raw socket that remembers everything the broker said to it. Every read is bounded."""

    def __init__(self, address):
        self.sock = socket.create_connection(address, timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Lenient limits: we check the broker's output, not our own patience.
        self.parser = pymq.FrameParser(max_headers=10000, max_header_line=1 << 20,
                                       max_body=1 << 26)
        self.version = "1.0"        # the version the broker answered, once CONNECTED
        self.frames = []
        self.error = None           # the ERROR frame the broker ended with
        self.connected = False
        self.eof = False            # the broker closed its side
        self.closed = False         # we closed
        self.unknown = False        # closed abruptly or reset: an ERROR may have been lost
        self.ack_ids = []
        self.sent_connect = False
        self.disconnecting = False  # sent a DISCONNECT: the broker closes
        self.sent_receipts = []     # unique receipts of our valid frames ("...#N"), in order
        self.last_receipt = -1      # index in sent_receipts of the last one answered
        self.transactions = set()   # begun by our valid frames, not yet committed or aborted
        self.subscriptions = {}     # id -> destination, subscribed by our valid frames

    def send(self, data):
        if self.closed or not data:
            return
        try:
            self.sock.sendall(data)
        except OSError:
            # The broker closed first (after DISCONNECT, an ERROR and its linger, ...).
            self.pump(0)
            if self.error is None and not self.eof:
                self.unknown = True

    def pump(self, timeout):
        """Read and parse whatever the broker sent within `timeout` seconds."""
        while not self.closed and not self.eof:
            try:
                ready = select.select([self.sock], [], [], timeout)[0]
                if not ready:
                    return
                data = self.sock.recv(65536)
            except OSError:
                self.eof = True
                if self.error is None:
                    self.unknown = True
                return
            if not data:
                self.eof = True
                return
            self.parser.feed(data)
            while True:
                try:
                    frame = self.parser.next_frame()
                except ProtocolError as error:
                    raise AssertionError("broker output does not parse in %s: %s; buffer %r"
                                         % (self.parser.version, error.message,
                                            bytes(self.parser._buf[-400:])))
                if frame is None:
                    break
                self.on_frame(frame)
            timeout = 0

    def on_frame(self, frame):
        assert self.error is None, "frame after ERROR: %r" % (frame,)
        self.frames.append(frame)
        assert frame.command in ("CONNECTED", "MESSAGE", "RECEIPT", "ERROR"), frame
        if frame.command == "CONNECTED":
            assert not self.connected, "second CONNECTED"
            self.connected = True
            self.version = self.parser.version = frame.headers["version"]
        elif frame.command == "ERROR":
            assert frame.headers.get("message"), frame
            assert frame.headers["message"] != "internal error", frame
            self.error = frame
            self.check_receipt(frame.headers.get("receipt-id"))
        else:
            assert self.connected, "%s before CONNECTED" % frame.command
            if frame.command == "RECEIPT":
                self.check_receipt(frame.headers.get("receipt-id"))
            if frame.command == "MESSAGE":
                # No sender header may pass for one of the broker's (see the regression
                # test of the header name with a colon).
                assert "spoofed" not in frame.headers.get("destination", ""), frame
                key = "ack" if "ack" in frame.headers else "message-id"
                self.ack_ids.append(frame.headers[key])

    def check_receipt(self, receipt):
        """RECEIPTs (and the ERROR's receipt-id) come in the order they were asked for, each
        at most once: unique receipts of valid frames must advance through sent_receipts."""
        if receipt is None or "#" not in receipt:
            return
        assert receipt in self.sent_receipts, "unknown receipt-id %r" % receipt
        index = self.sent_receipts.index(receipt)
        assert index > self.last_receipt, "receipt %r out of order or repeated: %r" % (
            receipt, self.sent_receipts[:index + 1])
        self.last_receipt = index

    def close(self, how):
        """graceful: half-close and read until the broker closes; abrupt: reset."""
        if self.closed:
            return
        if how == "abrupt":
            if self.error is None and not self.eof:
                self.unknown = True
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        else:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            deadline = time.monotonic() + CLOSE_DEADLINE
            while not self.eof:
                remaining = deadline - time.monotonic()
                assert remaining > 0, "broker did not close the connection"
                self.pump(remaining)
        self.sock.close()
        self.closed = True


class LogTrap(logging.Handler):
    """Records pymq log records at WARNING and above, and any with a traceback."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        if record.levelno >= logging.WARNING or record.exc_info:
            self.records.append("%s %s: %s" % (record.levelname, record.name,
                                                record.getMessage()))


def wait_until(condition, timeout=TIMEOUT, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.005)


class FuzzBroker:
    """One broker for all the examples of a test, with traps for logged errors and for
    exceptions that kill greenlets (gevent's hub prints those, it does not log them)."""

    def __init__(self, broker):
        self.broker = broker
        self.trap = LogTrap()
        self.hub_errors = []
        self.namespaces = itertools.count(1)
        self.sockets = []           # every client socket of the running example
        logging.getLogger("pymq").addHandler(self.trap)
        broker.call(self._trap_hub_errors)

    def _trap_hub_errors(self):
        import gevent
        hub = gevent.get_hub()
        original = hub.handle_error
        errors = self.hub_errors

        def handle_error(context, kind, value, tb):
            errors.append("%r in %r" % (value, context))
            return original(context, kind, value, tb)

        hub.handle_error = handle_error

    def close(self):
        logging.getLogger("pymq").removeHandler(self.trap)

    def fuzz_client(self):
        client = FuzzClient(self.broker.address)
        self.sockets.append(client.sock)
        return client

    def raw_client(self):
        client = RawClient(self.broker.address)
        self.sockets.append(client.sock)
        return client

    @contextlib.contextmanager
    def example(self):
        """A namespace of its own for one example; whatever happens, its sockets are closed
        and (if it failed half-way) the broker given a moment to release them, so that the
        next example (hypothesis replays and shrinks on the same broker) starts clean."""
        try:
            yield "fz%d" % next(self.namespaces)
        finally:
            for sock in self.sockets:
                sock.close()
            self.sockets.clear()
            deadline = time.monotonic() + TIMEOUT
            while self.peers() != ([], []) and time.monotonic() < deadline:
                time.sleep(0.01)

    def check_healthy(self):
        assert self.broker._thread.is_alive(), "broker thread died"
        assert not self.trap.records, "broker logged: %s" % self.trap.records
        assert not self.hub_errors, "greenlets died: %s" % self.hub_errors
        server = self.broker.server
        assert self.broker.call(lambda: not server.broker.clock._greenlet.dead
                                and not server.storage._committer.dead), \
            "timer loop or storage committer died"

    def peers(self):
        server = self.broker.server
        return self.broker.call(lambda: (sorted(c.peer for c in server.connections),
                                         sorted(c.peer for c in server.broker.connections)))

    def leftovers(self, ns):
        """What the broker still holds once every client has left: no subscription, no queue,
        no ack timer."""
        def look():
            broker = self.broker.server.broker
            live_timers = [entry for entry in broker.clock._heap
                           if isinstance(entry[2], pymq.InFlight) and entry[2].deadline == entry[0]]
            topics = broker.topics
            return dict(topics=dict(topics.exact), prefixes=dict(topics.prefixes),
                        prefix_lengths=dict(topics.prefix_lengths),
                        queues=sorted(broker.queues.queues),
                        live_timers=len(live_timers),
                        connections=len(self.broker.server.connections),
                        broker_connections=len(broker.connections))
        return self.broker.call(look)


def resolve(client, command, headers, ns, valid):
    """The frame's final (command, headers): the namespace filled in, "@ack:K" replaced by a
    message id the client received and, for valid frames, transactions and subscription ids
    kept consistent with what the client has begun and subscribed (so that a correct client
    is not killed by "no such transaction"). None: nothing to send."""
    ack_ids = client.ack_ids
    out = {}
    for name, value in headers:
        if value.startswith(ACK_REF):
            back = int(value[len(ACK_REF):])
            value = ack_ids[-1 - back % len(ack_ids)] if ack_ids else "999999999"
        out[name] = value.replace("{ns}", ns)
    if not valid:
        return command, list(out.items())
    if command in ("ACK", "NACK") and not ack_ids:
        return None
    txs, subs = client.transactions, client.subscriptions
    if command == "BEGIN":
        free = [tx for tx in ("t1", "t2") if tx not in txs]
        if not free:
            command = "COMMIT"
        else:
            out["transaction"] = free[0] if out["transaction"] in txs else out["transaction"]
    if command in ("COMMIT", "ABORT"):
        if not txs:
            command = "BEGIN"
        elif out.get("transaction") not in txs:
            out["transaction"] = sorted(txs)[0]
    if command in ("SEND", "ACK", "NACK") and out.get("transaction") not in txs:
        out.pop("transaction", None)
    if command == "BEGIN":
        txs.add(out["transaction"])
    elif command in ("COMMIT", "ABORT"):
        txs.discard(out["transaction"])
    elif command == "SUBSCRIBE":
        sub_id, destination = out["id"], out["destination"]
        if subs.get(sub_id, destination) != destination:
            free = [i for i in ("s1", "s2", "s3") if i not in subs]
            if not free:
                return None
            out["id"] = sub_id = free[0]
        subs[sub_id] = destination
    elif command == "UNSUBSCRIBE":
        if not subs:
            return None
        if out["id"] not in subs:
            out["id"] = sorted(subs)[0]
        del subs[out["id"]]
    if "receipt" in out:
        out["receipt"] += "#%d" % len(client.sent_receipts)
        client.sent_receipts.append(out["receipt"])
    return command, list(out.items())


def run_script(fuzz, script, ns):
    """Play the script against the broker; returns the clients, all closed."""
    clients, retired = [], []
    for initial in script["initial"]:
        client = fuzz.fuzz_client()
        clients.append(client)
        if initial is not None:
            command, version = initial
            headers = {"host": "localhost"}
            if version is not None:
                headers["accept-version"] = version
            client.send(pymq.encode_frame(command, headers))
            client.sent_connect = True
    deadline = time.monotonic() + 0.2
    for client in clients:      # CONNECTED first: "negotiated" frames then use its version
        while client.sent_connect and not (client.connected or client.eof or client.error):
            if time.monotonic() > deadline:
                break
            client.pump(0.01)

    def reopen(index, version):
        clients[index].close("graceful")
        retired.append(clients[index])
        clients[index] = fuzz.fuzz_client()
        clients[index].send(pymq.encode_frame("CONNECT", {"accept-version": version,
                                                          "host": "localhost"}))
        clients[index].sent_connect = True
        return clients[index]

    for index, action in script["steps"]:
        client = clients[index]
        kind = action[0]
        if kind == "frame":
            _, command, headers, body, encoding, reconnect = action
            if reconnect is not None and (client.closed or client.eof or client.error
                                          is not None or not client.sent_connect
                                          or client.disconnecting):
                client = reopen(index, reconnect)
                client.pump(STEP_READ)
            resolved = resolve(client, command, headers, ns, valid=reconnect is not None)
            if resolved is None:
                continue
            command, resolved = resolved
            if encoding.startswith("raw"):
                data = raw_frame(command, resolved, body, nul=encoding == "raw")
            else:
                version = client.version if encoding == "negotiated" else encoding
                data = pymq.encode_frame(command, resolved, body, version)
            client.send(data)
            client.disconnecting |= command == "DISCONNECT" and reconnect is not None
        elif kind == "bytes":
            client.send(action[1])
        elif kind == "heart-beat":
            client.send(action[1])
        elif kind == "pump":
            client.pump(action[1])
        elif kind == "close":
            client.close(action[1])
        elif kind == "reopen":
            client = reopen(index, action[1])
        for other in clients:
            other.pump(STEP_READ if other is client else 0)
    for client in clients:
        client.close("graceful")
    return clients + retired


_drain_receipts = itertools.count(1)


def fresh_client_service(fuzz, ns):
    """A fresh 1.2 client: queue and topic round trips, then it drains the namespace's queues
    (ACKing each message) until count-msgs says 0. Returns the client, still connected."""
    client = fuzz.raw_client()
    client.connect("1.2")

    def count(queue):
        answer = client.request("SEND", {"destination": "/control/count-msgs" + queue})
        return int(answer.headers["num-messages"])

    queue = "/queue/%s-fresh" % ns
    client.request("SEND", {"destination": queue}, b"fresh " + ns.encode())
    client.send("SUBSCRIBE", {"destination": queue, "id": "fq", "ack": "client-individual"})
    message = client.expect("MESSAGE")
    assert message.body == b"fresh " + ns.encode(), message
    assert message.headers["destination"] == queue and "redelivered" not in message.headers
    client.request("ACK", {"id": message.headers["ack"]})
    assert count(queue) == 0
    client.request("UNSUBSCRIBE", {"id": "fq"})

    topic = "/topic/%s-fresh" % ns
    client.request("SUBSCRIBE", {"destination": topic, "id": "ft"})
    client.send("SEND", {"destination": topic, "receipt": "topic-trip"}, b"topic " + ns.encode())
    got = {}
    for _ in range(2):
        frame = client.expect()
        assert frame.command in ("MESSAGE", "RECEIPT") and frame.command not in got, frame
        got[frame.command] = frame
    assert got["MESSAGE"].body == b"topic " + ns.encode()
    assert got["MESSAGE"].headers["subscription"] == "ft"
    assert got["RECEIPT"].headers["receipt-id"] == "topic-trip"
    client.request("UNSUBSCRIBE", {"id": "ft"})

    # Whatever the fuzz clients left in the namespace's queues is still deliverable. A message
    # the fuzz sent with a short ack-timeout may come again before our ACK lands (or land
    # while it is back in the queue, and be ignored): every MESSAGE is ACKed, repeats too,
    # until count-msgs says 0.
    for name in ("a", "b"):
        queue = "/queue/%s-%s" % (ns, name)
        left = count(queue)
        if not left:
            continue
        client.send("SUBSCRIBE", {"destination": queue, "id": "d" + name,
                                  "ack": "client-individual"})
        seen = set()

        def answer(command, headers):
            """Send with a receipt; ACK every MESSAGE until the RECEIPT."""
            receipt = "drain-%d" % next(_drain_receipts)
            client.send(command, dict(headers, receipt=receipt))
            while True:
                frame = client.expect()
                if frame.command == "RECEIPT":
                    assert frame.headers["receipt-id"] == receipt, frame
                    return frame
                assert frame.command == "MESSAGE", frame
                assert frame.headers["destination"] == queue, frame
                assert frame.headers["subscription"] == "d" + name, frame
                seen.add(frame.headers["message-id"])
                client.send("ACK", {"id": frame.headers["ack"]})

        deadline = time.monotonic() + TIMEOUT
        while int(answer("SEND", {"destination": "/control/count-msgs" + queue})
                  .headers["num-messages"]):
            assert time.monotonic() < deadline, "%s not drained: %d of %d messages seen" % (
                queue, len(seen), left)
        assert len(seen) == left, (queue, left, seen)
        answer("UNSUBSCRIBE", {"id": "d" + name})
        assert count(queue) == 0
    return client


@pytest.fixture
def fuzz_broker(start_broker):
    fuzz = FuzzBroker(start_broker(**FUZZ_LIMITS))
    yield fuzz
    fuzz.close()


# An example takes ~0.1-0.6 s: shrinking a failure would take minutes (and meet pytest's
# timeout), so it is off unless PYMQ_FUZZ_SHRINK=1. The failing script is printed whole, and
# replayed first by the next run (.hypothesis/).
BROKER_PHASES = [Phase.explicit, Phase.reuse, Phase.generate] + (
    [Phase.shrink] if os.environ.get("PYMQ_FUZZ_SHRINK") else [])
BROKER_SETTINGS = settings(max_examples=25 * SCALE, deadline=None, phases=BROKER_PHASES,
                           suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                  HealthCheck.too_slow,
                                                  HealthCheck.data_too_large])


@pytest.mark.timeout(120 * SCALE)
@BROKER_SETTINGS
@given(script=SCRIPTS)
def test_broker_survives_random_traffic(fuzz_broker, script):
    with fuzz_broker.example() as ns:
        check_random_traffic(fuzz_broker, script, ns)


def check_random_traffic(fuzz, script, ns):
    before = fuzz.broker.stats
    clients = run_script(fuzz, script, ns)
    fuzz.check_healthy()

    # Every connection is released, and the stats match what the clients saw.
    wait_until(lambda: fuzz.peers() == ([], []), what="fuzz connections released")
    after = fuzz.broker.stats
    errors = sum(1 for c in clients if c.error is not None)
    connected = sum(1 for c in clients if c.connected)
    unknown = sum(1 for c in clients if c.unknown and c.error is None)
    note("errors %d, connected %d, unknown %d: %s"
         % (errors, connected, unknown, [c.error.headers["message"] for c in clients if c.error]))
    for c in clients:
        if c.error is not None:
            event("ERROR: " + re.sub(r"'.*", "", c.error.headers["message"])[:40])
    received = collections.Counter(f.command for c in clients for f in c.frames)
    event("MESSAGEs received: %s" % ("0" if not received["MESSAGE"] else
                                     "1-4" if received["MESSAGE"] < 5 else "5+"))
    event("RECEIPTs received: %s" % ("0" if not received["RECEIPT"] else
                                     "1-4" if received["RECEIPT"] < 5 else "5+"))
    event("clients CONNECTED: %d" % connected)
    event("hostility %d" % script["hostility"])
    if any(f.headers.get("redelivered") for c in clients for f in c.frames):
        event("redelivered MESSAGE seen")
    assert errors <= after["protocol_errors"] - before["protocol_errors"] <= errors + unknown
    assert connected <= after["connections"] - before["connections"] <= connected + unknown
    assert after["slow_consumers"] == before["slow_consumers"]
    assert after.get("refused") == before.get("refused")

    client = fresh_client_service(fuzz, ns)
    peer = "%s:%s" % client.sock.getsockname()[:2]
    assert fuzz.peers() == ([peer], [peer])
    assert fuzz.broker.call(lambda: [name for name, queue
                                     in fuzz.broker.server.broker.queues.queues.items()
                                     if isinstance(queue, pymq.Queue)
                                     and not queue.subs]) == []
    client.request("DISCONNECT")
    client.expect_closed()
    client.close()
    wait_until(lambda: fuzz.peers() == ([], []), what="fresh client released")
    assert fuzz.leftovers(ns) == dict(topics={}, prefixes={}, prefix_lengths={}, queues=[],
                                    live_timers=0, connections=0,
                                    broker_connections=0)
    fuzz.check_healthy()


# =============================================================================================
# Part 3: the bugs found, as minimal reproductions
# =============================================================================================

@pytest.fixture
def trap():
    handler = LogTrap()
    logging.getLogger("pymq").addHandler(handler)
    yield handler
    logging.getLogger("pymq").removeHandler(handler)


@pytest.mark.parametrize("heart_beat", ["0,1" + "0" * 400, "1" + "0" * 400 + ",0"],
                         ids=["cy-huge", "cx-huge"])
def test_huge_heart_beat_is_not_an_internal_error(broker, trap, heart_beat):
    """BUG: negotiate_heart_beat() accepts any integer; start_session() then divides it by
    1000.0, and an integer over ~1.8e308 raises OverflowError: 'internal error'."""
    client = RawClient(broker.address)
    client.send_bytes(b"CONNECT\naccept-version:1.2\nheart-beat:%s\n\n\0" % heart_beat.encode())
    frame = client.expect()
    client.close()
    assert frame.headers.get("message") != "internal error", frame
    assert not trap.records, trap.records


@pytest.mark.parametrize("command, header", [("SUBSCRIBE", "prefetch"), ("SEND", "priority")])
def test_integer_header_with_thousands_of_digits_is_not_an_internal_error(broker, trap,
                                                                          command, header):
    """BUG: _prefetch() and _send_options() call int() on any ASCII digit string; Python 3.11
    refuses over 4300 digits with ValueError: 'internal error'. The default max-header-line
    (64 KiB) lets such a header through."""
    client = RawClient(broker.address)
    client.connect("1.2")
    client.send(command, {"destination": "/queue/digits", "id": "s1", "receipt": "r1",
                          header: "0" * 5000 + "1"}, b"x")
    frame = client.expect()
    client.close()
    assert frame.headers.get("message") != "internal error", frame
    assert not trap.records, trap.records


@pytest.mark.parametrize("end", ["COMMIT", "ABORT"])
def test_transaction_at_the_frame_limit_can_end(broker, end):
    """BUG: _in_transaction() checks the MAX_TRANSACTION_FRAMES limit on every lookup, COMMIT
    and ABORT included: a transaction that reached the limit (which adding frames allows) can
    never be committed or aborted ('more than 10000 frames in one transaction')."""
    client = RawClient(broker.address, timeout=30)
    client.connect("1.2")
    client.send("BEGIN", {"transaction": "t"})
    client.send_bytes(pymq.encode_frame("SEND", {"destination": "/topic/tx-limit",
                                                 "transaction": "t"}, b"x")
                      * pymq.MAX_TRANSACTION_FRAMES)
    frame = client.request(end, {"transaction": "t"})       # fails if an ERROR comes instead
    client.close()
    assert frame.command == "RECEIPT"


def test_commit_is_all_or_nothing_with_a_control_destination(broker):
    """BUG: handle() validates a transactional SEND's destination kind and queue options, not a
    /control/ name; at COMMIT, control() raises 'unknown control destination' after the
    earlier SENDs of the transaction were carried out: half a transaction is committed."""
    client = RawClient(broker.address)
    client.connect("1.2")
    client.send("BEGIN", {"transaction": "t"})
    client.send("SEND", {"destination": "/queue/tx-half", "transaction": "t"}, b"first")
    client.send("SEND", {"destination": "/control/nope", "transaction": "t"})
    client.send("COMMIT", {"transaction": "t", "receipt": "commit"})
    committed = client.expect().command == "RECEIPT"
    client.close()
    observer = RawClient(broker.address)
    observer.connect("1.2")
    count = observer.request("SEND", {"destination": "/control/count-msgs/queue/tx-half"})
    observer.close()
    assert count.headers["num-messages"] == ("1" if committed else "0")


def test_header_name_with_colon_does_not_break_a_stomp10_subscriber(broker):
    """BUG: user headers go to a STOMP 1.0 subscriber unescaped (1.0 has no escapes), and only
    newlines are replaced: a 1.1/1.2 sender's header *name* holding ':' (sent as '\\c') is cut
    at that colon by the receiver. It spoofs any header the broker puts after the user headers
    (destination, content-length): here the 1.0 subscriber's parser refuses the MESSAGE
    ('invalid content-length'), and sees the sender's destination."""
    receiver = RawClient(broker.address)
    receiver.connect("1.0")
    receiver.request("SUBSCRIBE", {"destination": "/topic/colon"})
    sender = RawClient(broker.address)
    sender.connect("1.2")
    sender.request("SEND", {"destination": "/topic/colon",
                            "destination:/topic/spoofed": "x", "content-length:": "9"}, b"hello")
    try:
        message = receiver.expect("MESSAGE")
    except ProtocolError as error:
        pytest.fail("the 1.0 subscriber cannot parse the MESSAGE: %s" % error.message)
    finally:
        receiver.close()
        sender.close()
    assert message.headers["destination"] == "/topic/colon", message
    assert message.body == b"hello"


def test_header_line_past_max_headers_is_refused_while_it_arrives():
    """BUG (minor): FrameParser counts a header line only once its newline arrives, so after
    max_headers complete header lines it still buffers one more line up to max_header_line
    bytes before refusing it: more than "one partial frame within the limits" (the buffer
    bound its docstring promises and test_codec.buffer_bound() states). Found by
    test_mutated_frames_in_fixed_size_chunks on an unmutated CONNECT, one byte per feed."""
    limits = dict(max_headers=1, max_header_line=10, max_body=0)
    data = b"C" * 10 + b"\nh:" + b"v" * 8 + b"\n" + b"x" * 10 + b"\n\n\0"
    parser = pymq.FrameParser(**limits)
    with pytest.raises(ProtocolError, match="too many headers"):
        for i in range(len(data)):
            parser.feed(data[i:i + 1])
            assert len(parser._buf) <= buffer_bound(**limits) + 1
            assert parser.next_frame() is None


def test_receipt_owed_before_an_error_is_not_dropped(broker):
    """BUG: a queue SEND's RECEIPT waits for its storage batch; when a later frame of the same
    read is refused, close() queues the ERROR at once and seals the connection, so the RECEIPT
    (of a message that *was* stored) is silently dropped -- although close()'s docstring
    promises 'send what is queued (receipts waiting for storage included)'. A client that
    resends what was not receipted then duplicates the message."""
    client = RawClient(broker.address)
    client.connect("1.2")
    client.send_bytes(pymq.encode_frame("SEND", {"destination": "/queue/owed", "receipt": "r1"},
                                        b"stored") + b"BOGUS\n\n\0")
    first = client.expect()
    client.close()
    observer = RawClient(broker.address)
    observer.connect("1.2")
    count = observer.request("SEND", {"destination": "/control/count-msgs/queue/owed"})
    observer.close()
    assert count.headers["num-messages"] == "1"       # the SEND was carried out and stored...
    assert (first.command, first.headers.get("receipt-id")) == ("RECEIPT", "r1"), first

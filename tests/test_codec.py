"""The frame codec: FrameParser, encode_frame/encode_rest, escape/unescape.

Sans-IO, so no broker is needed: byte strings go in, Frames come out (and back).

  * PARSE_CASES: bytes -> frames, and (when the bytes are in encode_frame's canonical form)
    frames -> the very same bytes. ENCODE_CASES: encode_frame arguments -> exact bytes.
  * ERROR_CASES: bytes -> ProtocolError, fed at once and one byte at a time.
  * Hypothesis properties: encode/parse round trip per version, any split of a stream parses
    like the whole stream, limits always end in ProtocolError without over-buffering, and
    garbage only ever gives Frames or ProtocolError.
"""

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pymq

Frame = pymq.Frame
UNESCAPED = ("CONNECT", "STOMP", "CONNECTED")
LENGTH_COMMANDS = ("SEND", "MESSAGE", "ERROR")
VERSIONS = ("1.0", "1.1", "1.2")

FAST = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                       HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def make_parser(version="1.2", **limits):
    parser = pymq.FrameParser(**limits)
    parser.version = version
    return parser


def split(data, cuts):
    """data cut at the given offsets (any order, duplicates and out-of-range ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


def drain(parser, out):
    while True:
        frame = parser.next_frame()
        if frame is None:
            return
        out.append(frame)


def parse(data, version="1.2", cuts=(), **limits):
    """All frames in data, fed in pieces cut at `cuts`; ProtocolError propagates."""
    parser = make_parser(version, **limits)
    frames = []
    for chunk in split(data, cuts):
        parser.feed(chunk)
        drain(parser, frames)
    return frames


def outcome(data, version="1.2", cuts=(), **limits):
    """(frames parsed, whether a ProtocolError ended the stream)."""
    parser = make_parser(version, **limits)
    frames = []
    try:
        for chunk in split(data, cuts):
            parser.feed(chunk)
            drain(parser, frames)
    except pymq.ProtocolError:
        return frames, True
    return frames, False


def encode_all(frames, version):
    return b"".join(pymq.encode_frame(f.command, f.headers, f.body, version) for f in frames)


def expected_frame(command, headers, body, with_length=True):
    """What encode_frame(command, headers, body) parses back to."""
    headers = dict(headers)
    if with_length and (body or command in LENGTH_COMMANDS):
        headers["content-length"] = str(len(body))
    return Frame(command, headers, body)


def head_limit(max_headers, max_header_line):
    """Most bytes a header block that passes the limits can take: the command line (the limit
    plus CR LF), max_headers lines (the limit, CR included, plus LF) and the blank CR LF."""
    return (max_headers + 1) * (max_header_line + 2) + 2


def buffer_bound(max_headers, max_header_line, max_body):
    """Most bytes a parser that returned None may keep buffered: one partial frame in the limits."""
    return head_limit(max_headers, max_header_line) + max_body + 1


# ---------------------------------------------------------------------------------------------
# Table: bytes <-> frames
# ---------------------------------------------------------------------------------------------

# (id, version, bytes, frames, canonical): canonical means encode_frame of the frames, in the
# same version, gives exactly these bytes back.
PARSE_CASES = [
    ("connect-never-escaped-1.2", "1.2",
     b"CONNECT\naccept-version:1.2\nhost:a\\cb\nlogin:x\\ny\\\\\n\n\0\n",
     [Frame("CONNECT", {"accept-version": "1.2", "host": "a\\cb", "login": "x\\ny\\\\"})],
     True),
    ("stomp-never-escaped-1.1", "1.1",
     b"STOMP\naccept-version:1.1\nhost:h\\\\t\n\n\0\n",
     [Frame("STOMP", {"accept-version": "1.1", "host": "h\\\\t"})], True),
    ("connected-never-escaped-1.2", "1.2",
     b"CONNECTED\nversion:1.2\nserver:a\\rb\n\n\0\n",
     [Frame("CONNECTED", {"version": "1.2", "server": "a\\rb"})], True),
    ("connect-colon-in-value", "1.2",
     b"CONNECT\nhost:a:b::c\n\n\0\n",
     [Frame("CONNECT", {"host": "a:b::c"})], True),
    ("send-content-length-nul-in-body", "1.2",
     b"SEND\ndestination:/queue/a\ncontent-length:7\n\na\0b\n\0c\n\0\n",
     [Frame("SEND", {"destination": "/queue/a", "content-length": "7"}, b"a\0b\n\0c\n")], True),
    ("send-content-length-1.0", "1.0",
     b"SEND\ndestination:/queue/a\ncontent-length:3\n\n\0\0\0\0\n",
     [Frame("SEND", {"destination": "/queue/a", "content-length": "3"}, b"\0\0\0")], True),
    ("body-without-content-length", "1.2",
     b"SEND\ndestination:/queue/a\n\nhello\nworld\r\n\0",
     [Frame("SEND", {"destination": "/queue/a"}, b"hello\nworld\r\n")], False),
    ("body-without-content-length-ends-at-first-nul", "1.1",
     b"MESSAGE\nk:v\n\nab\0\nRECEIPT\nreceipt-id:1\n\n\0\n",
     [Frame("MESSAGE", {"k": "v"}, b"ab"), Frame("RECEIPT", {"receipt-id": "1"})], False),
    ("crlf-line-endings-1.2", "1.2",
     b"SEND\r\ndestination:/queue/a\r\ncontent-length:2\r\n\r\nhi\0\r\n",
     [Frame("SEND", {"destination": "/queue/a", "content-length": "2"}, b"hi")], False),
    ("crlf-line-endings-1.0", "1.0",
     b"SUBSCRIBE\r\ndestination:/topic/a\r\n\r\n\0",
     [Frame("SUBSCRIBE", {"destination": "/topic/a"})], False),
    ("crlf-body-keeps-its-crlf", "1.1",
     b"SEND\r\n\r\n\r\nx\r\n\0",
     [Frame("SEND", {}, b"\r\nx\r\n")], False),
    ("heart-beats-before-and-between", "1.2",
     b"\n\r\n\n\r\nSEND\ncontent-length:1\n\nx\0\n\n\r\n\n"
     b"SUBSCRIBE\nid:1\n\n\0\r\n\r\nDISCONNECT\n\n\0\n\n\n",
     [Frame("SEND", {"content-length": "1"}, b"x"), Frame("SUBSCRIBE", {"id": "1"}),
      Frame("DISCONNECT")], False),
    ("frames-back-to-back", "1.2",
     b"ACK\nid:1\n\n\0NACK\nid:2\n\n\0",
     [Frame("ACK", {"id": "1"}), Frame("NACK", {"id": "2"})], False),
    ("escapes-1.2", "1.2",
     b"MESSAGE\nk\\ce\\\\y\\n:a\\nb\\cc\\\\d\\re\ncontent-length:0\n\n\0\n",
     [Frame("MESSAGE", {"k:e\\y\n": "a\nb:c\\d\re", "content-length": "0"})], True),
    ("escapes-1.1", "1.1",
     b"MESSAGE\nk\\ce\\\\y\\n:a\\nb\\cc\\\\d\ncontent-length:0\n\n\0\n",
     [Frame("MESSAGE", {"k:e\\y\n": "a\nb:c\\d", "content-length": "0"})], True),
    ("raw-cr-in-value-1.1", "1.1",
     b"SEND\nk:a\rb\ncontent-length:0\n\n\0\n",
     [Frame("SEND", {"k": "a\rb", "content-length": "0"})], True),
    ("no-escapes-in-1.0", "1.0",
     b"MESSAGE\nk\\ce\\\\y:a\\nb\\cc\\\\d\\re\\t\ncontent-length:0\n\n\0\n",
     [Frame("MESSAGE", {"k\\ce\\\\y": "a\\nb\\cc\\\\d\\re\\t", "content-length": "0"})], True),
    ("trimmed-in-1.0", "1.0",
     b"SEND\n  destination :  /queue/a \t\ncontent-length: 1 \n\nx\0\n",
     [Frame("SEND", {"destination": "/queue/a", "content-length": "1"}, b"x")], False),
    ("not-trimmed-in-1.2", "1.2",
     b"SEND\n  destination :  /queue/a \t\ncontent-length: 1 \n\nx\0\n",
     [Frame("SEND", {"  destination ": "  /queue/a \t", "content-length": " 1 "}, b"x")],
     False),
    ("not-trimmed-in-1.1", "1.1",
     b"SEND\n k : v \ncontent-length:0\n\n\0\n",
     [Frame("SEND", {" k ": " v ", "content-length": "0"})], True),
    ("repeated-header-first-wins", "1.2",
     b"MESSAGE\nfoo:first\nfoo:second\nfoo:third\ncontent-length:0\n\n\0\n",
     [Frame("MESSAGE", {"foo": "first", "content-length": "0"})], False),
    ("repeated-content-length-first-wins", "1.2",
     b"SEND\ncontent-length:1\ncontent-length:3\n\nx\0\n",
     [Frame("SEND", {"content-length": "1"}, b"x")], False),
    ("repeated-header-first-wins-after-1.0-trim", "1.0",
     b"SEND\nfoo :first\n foo:second\n\n\0",
     [Frame("SEND", {"foo": "first"})], False),
    ("empty-body-no-content-length", "1.2",
     b"SUBSCRIBE\nid:1\ndestination:/topic/a\n\n\0\n",
     [Frame("SUBSCRIBE", {"id": "1", "destination": "/topic/a"})], True),
    ("empty-body-content-length-0", "1.2",
     b"SEND\ndestination:/queue/a\ncontent-length:0\n\n\0\n",
     [Frame("SEND", {"destination": "/queue/a", "content-length": "0"})], True),
    ("no-headers", "1.2", b"DISCONNECT\n\n\0\n", [Frame("DISCONNECT")], True),
    ("colon-in-value-1.0", "1.0",
     b"SEND\ndestination:/queue/a:b\ncontent-length:0\n\n\0\n",
     [Frame("SEND", {"destination": "/queue/a:b", "content-length": "0"})], True),
    ("raw-colon-in-value-tolerated-1.2", "1.2",
     b"SEND\ndestination:/queue/a:b\n\n\0",
     [Frame("SEND", {"destination": "/queue/a:b"})], False),
    ("empty-name-and-value", "1.2",
     b"SEND\n:\ncontent-length:0\n\n\0\n", [Frame("SEND", {"": "", "content-length": "0"})],
     True),
    ("utf8-headers", "1.2",
     "MESSAGE\nclé:väl€ur 🎉\ncontent-length:2\n\n".encode() + b"\xff\xfe\0\n",
     [Frame("MESSAGE", {"clé": "väl€ur 🎉", "content-length": "2"}, b"\xff\xfe")], True),
    ("nul-in-header-value", "1.2",
     b"SEND\nk:a\0b\ncontent-length:0\n\n\0\n",
     [Frame("SEND", {"k": "a\0b", "content-length": "0"})], True),
    ("content-length-leading-zeros", "1.2",
     b"SEND\ncontent-length:002\n\nab\0",
     [Frame("SEND", {"content-length": "002"}, b"ab")], False),
]


@pytest.mark.parametrize("version, data, frames",
                         [pytest.param(v, d, f, id=i) for i, v, d, f, _ in PARSE_CASES])
def test_parse_table(version, data, frames):
    assert parse(data, version) == frames


@pytest.mark.parametrize("version, data, frames",
                         [pytest.param(v, d, f, id=i) for i, v, d, f, _ in PARSE_CASES])
def test_parse_table_byte_by_byte(version, data, frames):
    assert parse(data, version, cuts=range(len(data))) == frames


@pytest.mark.parametrize("version, data, frames",
                         [pytest.param(v, d, f, id=i) for i, v, d, f, c in PARSE_CASES if c])
def test_encode_table(version, data, frames):
    assert encode_all(frames, version) == data


# (id, command, headers, body, version, bytes)
ENCODE_CASES = [
    ("send-gets-content-length-0", "SEND", {"destination": "/queue/a"}, b"", "1.2",
     b"SEND\ndestination:/queue/a\ncontent-length:0\n\n\0\n"),
    ("message-gets-content-length-0", "MESSAGE", {}, b"", "1.0",
     b"MESSAGE\ncontent-length:0\n\n\0\n"),
    ("error-gets-content-length-0", "ERROR", {"message": "bad"}, b"", "1.1",
     b"ERROR\nmessage:bad\ncontent-length:0\n\n\0\n"),
    ("subscribe-no-content-length", "SUBSCRIBE", {"id": "1"}, b"", "1.2",
     b"SUBSCRIBE\nid:1\n\n\0\n"),
    ("receipt-with-body-gets-content-length", "RECEIPT", {}, b"\0", "1.2",
     b"RECEIPT\ncontent-length:1\n\n\0\0\n"),
    ("given-content-length-ignored", "SEND", {"content-length": "99", "a": "b"}, b"xyz", "1.2",
     b"SEND\na:b\ncontent-length:3\n\nxyz\0\n"),
    ("header-pairs-keep-order-and-repeats", "MESSAGE", [("b", "1"), ("a", "2"), ("b", "3")],
     b"", "1.2", b"MESSAGE\nb:1\na:2\nb:3\ncontent-length:0\n\n\0\n"),
    ("escape-1.2", "MESSAGE", {"a:b": "c\nd\\e\rf"}, b"", "1.2",
     b"MESSAGE\na\\cb:c\\nd\\\\e\\rf\ncontent-length:0\n\n\0\n"),
    ("escape-1.1-leaves-cr", "MESSAGE", {"a:b": "c\nd\\e\rf"}, b"", "1.1",
     b"MESSAGE\na\\cb:c\\nd\\\\e\rf\ncontent-length:0\n\n\0\n"),
    ("escape-1.0-only-newline", "MESSAGE", {"a": "c\nd\\e:f"}, b"", "1.0",
     b"MESSAGE\na:c\\nd\\e:f\ncontent-length:0\n\n\0\n"),
    ("connected-not-escaped-except-newline", "CONNECTED", {"server": "a:b\\c", "x": "1\n2"},
     b"", "1.2", b"CONNECTED\nserver:a:b\\c\nx:1\\n2\n\n\0\n"),
    ("utf8", "SEND", {"€": "ü"}, "é".encode(), "1.2",
     "SEND\n€:ü\ncontent-length:2\n\né\0\n".encode()),
]


@pytest.mark.parametrize("command, headers, body, version, data",
                         [pytest.param(*case[1:], id=case[0]) for case in ENCODE_CASES])
def test_encode_frame(command, headers, body, version, data):
    assert pymq.encode_frame(command, headers, body, version) == data


def test_encode_rest():
    assert pymq.encode_rest({"a": "b:c"}, b"x", "1.2") == b"a:b\\cc\ncontent-length:1\n\nx\0\n"
    assert pymq.encode_rest({"a": "b:c"}, b"x", "1.2", escaped=False, with_length=False) \
        == b"a:b:c\n\nx\0\n"


@pytest.mark.parametrize("version, raw, text", [
    ("1.2", "a\\\\b\\nc\\cd\\re", "a\\b\nc:d\re"),
    ("1.1", "a\\\\b\\nc\\cd", "a\\b\nc:d"),
    ("1.2", "plain", "plain"),
    ("1.2", "", ""),
])
def test_escape_unescape(version, raw, text):
    assert pymq.unescape(raw, version) == text
    assert pymq.escape(text, version) == raw


@pytest.mark.parametrize("version, raw", [
    ("1.1", "a\\rb"), ("1.2", "a\\tb"), ("1.2", "trailing\\"), ("1.1", "\\x"), ("1.2", "\\\\\\"),
])
def test_unescape_undefined(version, raw):
    with pytest.raises(pymq.ProtocolError, match="undefined escape"):
        pymq.unescape(raw, version)


def test_in_frame():
    parser = make_parser()
    assert not parser.in_frame
    parser.feed(b"\n\r\n\n")
    assert not parser.in_frame
    assert parser.next_frame() is None
    parser.feed(b"SE")
    assert parser.in_frame
    assert parser.next_frame() is None
    parser.feed(b"ND\n\nbody")
    assert parser.next_frame() is None
    assert parser.in_frame
    parser.feed(b"\0\n\n")
    assert parser.next_frame() == Frame("SEND", {}, b"body")
    assert not parser.in_frame
    assert parser.next_frame() is None


def test_version_switch_between_frames():
    """The version is read per frame: CONNECT is parsed raw, later frames escaped."""
    parser = make_parser("1.0")
    parser.feed(b"CONNECT\nlogin:a\\cb\n\n\0MESSAGE\nk:a\\cb\n\n\0")
    assert parser.next_frame() == Frame("CONNECT", {"login": "a\\cb"})
    parser.version = "1.2"
    assert parser.next_frame() == Frame("MESSAGE", {"k": "a:b"})


# ---------------------------------------------------------------------------------------------
# Table: bytes -> ProtocolError
# ---------------------------------------------------------------------------------------------

LIMITS = dict(max_headers=3, max_header_line=20, max_body=10)

# (id, version, bytes, regex for the message, parser limits)
ERROR_CASES = [
    ("undefined-escape-t-1.2", "1.2", b"SEND\nfoo:a\\tb\n\n\0", "undefined escape", {}),
    ("undefined-escape-r-1.1", "1.1", b"SEND\nfoo:a\\rb\n\n\0", "undefined escape", {}),
    ("undefined-escape-in-name", "1.2", b"SEND\nf\\oo:a\n\n\0", "undefined escape", {}),
    ("trailing-backslash", "1.2", b"SEND\nfoo:a\\\n\n\0", "undefined escape", {}),
    ("header-without-colon", "1.2", b"SEND\nfoo\n\n\0", "no ':'", {}),
    ("header-without-colon-1.0", "1.0", b"SEND\na:b\nfoo bar\n\n\0", "no ':'", {}),
    ("header-without-colon-connect", "1.2", b"CONNECT\nhost\n\n\0", "no ':'", {}),
    ("content-length-not-numeric", "1.2", b"SEND\ncontent-length:abc\n\n\0", "content-length", {}),
    ("content-length-empty", "1.2", b"SEND\ncontent-length:\n\n\0", "content-length", {}),
    ("content-length-negative", "1.2", b"SEND\ncontent-length:-1\n\n\0", "content-length", {}),
    ("content-length-plus", "1.2", b"SEND\ncontent-length:+1\n\nx\0", "content-length", {}),
    ("content-length-float", "1.2", b"SEND\ncontent-length:1.5\n\nx\0", "content-length", {}),
    ("content-length-hex", "1.2", b"SEND\ncontent-length:0x1\n\nx\0", "content-length", {}),
    ("content-length-inner-space", "1.2", b"SEND\ncontent-length:1 0\n\n\0", "content-length",
     {}),
    ("content-length-non-ascii-digit", "1.2",
     "SEND\ncontent-length:\uff11\n\nx\0".encode(), "content-length", {}),
    ("content-length-huge", "1.2", b"SEND\ncontent-length:1000000000000\n\n\0",
     "over the limit", {}),
    ("content-length-over-limit", "1.2", b"SEND\ncontent-length:11\n\n", "over the limit", LIMITS),
    # 5000 digits: int() of more than 4300 digits raises ValueError in Python >= 3.11.
    ("content-length-5000-digits", "1.2", b"SEND\ncontent-length:" + b"9" * 5000 + b"\n\n\0",
     "content-length|over the limit", {}),
    ("content-length-5000-zeros", "1.2", b"SEND\ncontent-length:" + b"0" * 5000 + b"1\n\nx\0",
     "content-length|over the limit", {"max_body": 0}),
    ("body-not-followed-by-nul", "1.2", b"SEND\ncontent-length:2\n\nabc\0", "not followed by a NUL",
     {}),
    ("body-not-followed-by-nul-short-length", "1.2", b"SEND\ncontent-length:0\n\nx\0",
     "not followed by a NUL", {}),
    ("too-many-headers", "1.2", b"SEND\na:1\nb:2\nc:3\nd:4\n\n\0", "too many headers", LIMITS),
    ("too-many-headers-open-block", "1.2", b"SEND\na:1\nb:2\nc:3\nd:4\ne:", "too many headers",
     LIMITS),
    ("too-many-headers-default", "1.2",
     b"SEND\n" + b"".join(b"h%d:v\n" % i for i in range(101)) + b"\n\0", "too many headers", {}),
    ("header-line-too-long", "1.2", b"SEND\nk:" + b"v" * 19 + b"\n\n\0", "line longer than",
     LIMITS),
    ("header-line-too-long-open", "1.2", b"SEND\nk:" + b"v" * 19, "line longer than", LIMITS),
    ("command-line-too-long", "1.2", b"S" * 21 + b"\n\n\0", "line longer than", LIMITS),
    ("command-line-too-long-open", "1.2", b"S" * 21, "line longer than", LIMITS),
    ("header-line-too-long-default", "1.2", b"SEND\nk:" + b"v" * 65535 + b"\n\n\0",
     "line longer than", {}),
    ("body-over-limit-no-nul-yet", "1.2", b"SEND\n\n" + b"x" * 11, "body over the limit", LIMITS),
    ("body-over-limit-then-nul", "1.2", b"SEND\n\n" + b"x" * 11 + b"\0", "body over the limit",
     LIMITS),
    ("body-far-over-limit-then-nul", "1.2", b"SEND\n\n" + b"x" * 100 + b"\0\n",
     "body over the limit", LIMITS),
    ("invalid-utf8-header-value", "1.2", b"SEND\nfoo:\xff\n\n\0", "not valid UTF-8", {}),
    ("invalid-utf8-header-name", "1.0", b"SEND\n\xc3(:x\n\n\0", "not valid UTF-8", {}),
    ("invalid-utf8-surrogate", "1.2", b"SEND\nk:\xed\xa0\x80\n\n\0", "not valid UTF-8", {}),
    ("invalid-utf8-command", "1.2", b"\xffSEND\n\n\0", "not valid UTF-8", {}),
    ("error-after-good-frame", "1.2", b"SEND\n\nok\0\nSEND\nfoo\n\n\0", "no ':'", {}),
]


def _error_params():
    return [pytest.param(v, d, m, l, id=i) for i, v, d, m, l in ERROR_CASES]


@pytest.mark.parametrize("version, data, message, limits", _error_params())
def test_error_table(version, data, message, limits):
    with pytest.raises(pymq.ProtocolError, match=message):
        parse(data, version, **limits)


@pytest.mark.parametrize("version, data, message, limits", _error_params())
def test_error_table_byte_by_byte(version, data, message, limits):
    if len(data) > 6000:
        cuts = range(0, len(data), 997)
    else:
        cuts = range(len(data))
    with pytest.raises(pymq.ProtocolError, match=message):
        parse(data, version, cuts=cuts, **limits)


def test_limits_are_inclusive():
    """Exactly at each limit is fine."""
    data = (b"S" * 20 + b"\nk:" + b"v" * 18 + b"\nb:2\nc:3\n\n" + b"x" * 10 + b"\0"
            + b"SEND\ncontent-length:10\n\n" + b"y" * 10 + b"\0")
    expected = [Frame("S" * 20, {"k": "v" * 18, "b": "2", "c": "3"}, b"x" * 10),
                Frame("SEND", {"content-length": "10"}, b"y" * 10)]
    assert parse(data, **LIMITS) == expected
    assert parse(data, cuts=range(len(data)), **LIMITS) == expected


def test_huge_content_length_raises_before_the_body():
    parser = make_parser()
    parser.feed(b"SEND\ndestination:/queue/a\ncontent-length:1000000000000\n\n")
    with pytest.raises(pymq.ProtocolError, match="over the limit"):
        parser.next_frame()
    parser = make_parser(**LIMITS)
    parser.feed(b"SEND\ncontent-length:11\n\n01234")
    with pytest.raises(pymq.ProtocolError, match="over the limit"):
        parser.next_frame()


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

SPECIAL_CHARS = st.sampled_from(list(":\n\r\\ \t\0c") + ["\x85", "\u2028", "é", "🎉"])
TEXT = st.text(st.one_of(SPECIAL_CHARS, st.characters(exclude_categories=("Cs",))), max_size=10)
COMMANDS = st.one_of(
    st.sampled_from(["CONNECT", "STOMP", "CONNECTED", "SEND", "MESSAGE", "ERROR", "SUBSCRIBE",
                     "RECEIPT", "ACK"]),
    st.text(string.ascii_uppercase, min_size=1, max_size=10))
BODIES = st.one_of(
    st.binary(max_size=60),
    st.lists(st.sampled_from([b"\0", b"\n", b"\r\n", b"\n\n", b"\r", b"x", b"\xff"]),
             max_size=12).map(b"".join))
HEARTBEATS = st.lists(st.sampled_from([b"\n", b"\r\n"]), max_size=3).map(b"".join)


def header_texts(version, command):
    """(names, values) that survive encode_frame -> FrameParser unchanged.

    1.2 escapes everything. 1.1 cannot carry a CR (a trailing one is taken for the CRLF line
    end). Unescaped frames (1.0, CONNECT/STOMP/CONNECTED) cannot carry a newline nor a ':' in a
    name; 1.0 also trims names and values."""
    if version == "1.0":
        def value(s):
            return s.replace("\n", "").strip()

        def name(s):
            return value(s.replace(":", "")).strip()
    elif command in UNESCAPED:
        def value(s):
            return s.replace("\n", "").rstrip("\r")

        def name(s):
            return s.replace("\n", "").replace(":", "")
    elif version == "1.1":
        def value(s):
            return s.replace("\r", "")
        name = value
    else:
        def value(s):
            return s
        name = value
    names = TEXT.map(name).filter(lambda s: s != "content-length")
    return names, TEXT.map(value)


@st.composite
def frames(draw, version):
    command = draw(COMMANDS)
    names, values = header_texts(version, command)
    headers = draw(st.dictionaries(names, values, max_size=4))
    return Frame(command, headers, draw(BODIES))


def to_crlf(raw):
    """The frame's header block with CRLF line ends (the body untouched)."""
    head, _, rest = raw.partition(b"\n\n")
    return head.replace(b"\n", b"\r\n") + b"\r\n\r\n" + rest


@st.composite
def streams(draw, version=None):
    """(version, bytes, frames): several frames with heart-beats around them, some without
    content-length (when the body has no NUL), some with CRLF line ends."""
    if version is None:
        version = draw(st.sampled_from(VERSIONS))
    data, expected = [], []
    for frame in draw(st.lists(frames(version), max_size=3)):
        data.append(draw(HEARTBEATS))
        if b"\0" not in frame.body and draw(st.booleans()):
            escaped = version != "1.0" and frame.command not in UNESCAPED
            raw = (frame.command + "\n").encode() + pymq.encode_rest(
                frame.headers, frame.body, version, escaped, with_length=False)
            expected.append(Frame(frame.command, dict(frame.headers), frame.body))
        else:
            raw = pymq.encode_frame(frame.command, frame.headers, frame.body, version)
            expected.append(expected_frame(frame.command, frame.headers, frame.body))
        if draw(st.booleans()):
            raw = to_crlf(raw)
        data.append(raw)
    data.append(draw(HEARTBEATS))
    return version, b"".join(data), expected


def cuts_for(data):
    return st.lists(st.integers(0, max(len(data), 1)), max_size=12)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

@FAST
@given(data=st.data())
def test_round_trip(data):
    """(a) encode_frame -> FrameParser gives the frame back, plus its content-length."""
    version = data.draw(st.sampled_from(VERSIONS))
    frame = data.draw(frames(version))
    encoded = pymq.encode_frame(frame.command, frame.headers, frame.body, version)
    assert parse(encoded, version) == [expected_frame(frame.command, frame.headers, frame.body)]


@settings(FAST, max_examples=150)
@given(st.data())
def test_any_split_parses_like_the_whole(data):
    """(a, b) A stream of frames and heart-beats parses to its frames, fed at once and cut
    anywhere and fed in pieces."""
    version, stream, expected = data.draw(streams())
    assert parse(stream, version) == expected
    cuts = data.draw(cuts_for(stream))
    assert parse(stream, version, cuts=cuts) == expected


@settings(FAST, max_examples=150)
@given(st.data())
def test_any_split_same_outcome_under_small_limits(data):
    """(b) With limits the stream may break; it must break (or not) the same way whatever the
    cuts: a limit checked only while bytes are pending would let a single big feed through."""
    version, stream, _ = data.draw(streams())
    limits = dict(max_headers=data.draw(st.integers(0, 6)),
                  max_header_line=data.draw(st.integers(1, 80)),
                  max_body=data.draw(st.integers(0, 20)))
    cuts = data.draw(cuts_for(stream))
    assert outcome(stream, version, cuts, **limits) == outcome(stream, version, (), **limits)


@st.composite
def frames_near_limits(draw):
    """(limits, bytes): one frame with LF or CRLF line ends whose command line, header lines,
    header count and body are at or just under their limits, but for one (or none) of them
    that is just over."""
    mh, ml, mb = draw(st.integers(0, 4)), draw(st.integers(5, 12)), draw(st.integers(0, 12))
    over = draw(st.sampled_from(["none", "command", "line", "count", "body"]))

    def near(what):
        return draw(st.integers(1, 2) if what == over else st.integers(-2, 0))

    eol = draw(st.sampled_from([b"\n", b"\r\n"]))
    command = b"C" * max(1, ml + near("command"))
    # A header line's length counts its CR; "h0:" and the CR are taken off the v's.
    lines = [b"h%d:" % i + b"v" * max(0, ml - 3 - (len(eol) - 1) + near("line"))
             for i in range(max(0, mh + min(near("count"), 1)))]
    body = b"b" * max(0, mb + near("body"))
    if draw(st.booleans()):
        lines.append(b"content-length:%d" % len(body))
    frame = eol.join([command] + lines + [b"", body + b"\0"])
    return dict(max_headers=mh, max_header_line=ml, max_body=mb), frame


@settings(FAST, max_examples=300)
@given(st.data())
def test_limits_do_not_depend_on_cuts(data):
    """(b) Around each limit, a frame is refused or accepted the same way whatever the cuts."""
    limits, frame = data.draw(frames_near_limits())
    cuts = data.draw(st.one_of(cuts_for(frame), st.just(range(len(frame)))))
    assert outcome(frame, "1.2", cuts, **limits) == outcome(frame, "1.2", (), **limits)


@pytest.mark.parametrize("data, limits", [
    pytest.param(b"SEND\n\n" + b"x" * 11 + b"\0", dict(max_body=10),
                 id="body-limit-with-nul-in-same-feed"),
    pytest.param(b"ABCDEFGHIJ\r\n\n\0", dict(max_header_line=10),
                 id="command-at-limit-crlf-split-before-lf"),
])
def test_split_consistency_examples(data, limits):
    """Found by the properties above: every cut must give the same outcome as no cut."""
    whole = outcome(data, "1.2", (), **limits)
    for cut in range(len(data) + 1):
        assert outcome(data, "1.2", [cut], **limits) == whole, "cut at %d" % cut


def feed_checking_buffer(parser, chunks, bound):
    """Feed chunk by chunk, draining frames; after each feed the buffer must hold no more than
    `bound` (one partial frame within the limits) plus the chunk just fed."""
    frames = []
    for chunk in chunks:
        parser.feed(chunk)
        assert len(parser._buf) <= bound + len(chunk)
        drain(parser, frames)
    return frames


@st.composite
def oversized(draw):
    """(limits, chunks): a stream that breaks a limit, optionally after good frames."""
    limits = dict(max_headers=draw(st.integers(0, 5)),
                  max_header_line=draw(st.integers(1, 40)),
                  max_body=draw(st.integers(0, 60)))
    mh, ml, mb = limits["max_headers"], limits["max_header_line"], limits["max_body"]
    extra = draw(st.integers(1, 200))
    kind = draw(st.sampled_from(["command", "header", "headers", "length", "body", "body-nul",
                                 "long-lines"]))
    tail = draw(st.sampled_from([b"", b"\n", b"\n\n", b"\n\n\0", b"\r\n\r\n\0\n"]))
    if kind == "command":
        bad = b"C" * (ml + extra) + tail
    elif kind == "header":
        bad = b"SEND\nk:" + b"v" * max(ml - 2 + extra, 0) + tail
    elif kind == "headers":
        bad = b"SEND\n" + b"h:v\n" * (mh + min(extra, 20)) + tail
    elif kind == "length":
        bad = b"SEND\ncontent-length:%d\n\n" % (mb + extra) + b"b" * draw(st.integers(0, 300))
    elif kind == "body":
        bad = b"SEND\n\n" + b"b" * (mb + extra)
    elif kind == "body-nul":
        bad = b"SEND\n\n" + b"b" * (mb + extra) + b"\0\n"
    else:
        # Header lines each over the limit, each finished by a feed that opens the next one
        # with no more than the limit: the open line never looks too long.
        lines = [b"SEND"] + [b"h%d:" % i + b"v" * (ml + extra) for i in range(max(mh, 1))]
        chunks = []
        carry = b""
        for line in lines:
            head = draw(st.integers(0, min(ml, len(line))))
            chunks.append(carry + line[:head])
            carry = line[head:] + b"\n"
        chunks.append(carry + b"\n\0")
        return limits, [c for c in chunks if c]
    good = draw(st.sampled_from([b"", b"\r\nX\n\n\0\n"]))   # a frame within any limits
    stream = good + bad
    return limits, split(stream, draw(cuts_for(stream)))


@FAST
@given(oversized())
def test_limits_raise_protocol_error_without_over_buffering(case):
    """(c) Over a limit, however the bytes are cut: ProtocolError and nothing else, and never
    more buffered than one frame within the limits plus the last chunk."""
    limits, chunks = case
    parser = make_parser("1.2", **limits)
    bound = buffer_bound(**limits)
    with pytest.raises(pymq.ProtocolError):
        feed_checking_buffer(parser, chunks, bound)


def test_long_header_lines_across_feeds_are_bounded():
    """Each header line ends in the feed after the one that opened it, so the line left open
    after every feed is short: lines over the limit must still be refused, not buffered."""
    limits = dict(max_headers=3, max_header_line=10, max_body=10)
    big = 10000
    chunks = [b"SEND\nh0:vvvvvvv", b"v" * big + b"\nh1:vvvvvvv", b"v" * big + b"\nh2:vvvvvvv",
              b"v" * big + b"\n\n\0"]
    parser = make_parser("1.2", **limits)
    with pytest.raises(pymq.ProtocolError, match="line longer than"):
        feed_checking_buffer(parser, chunks, buffer_bound(**limits))


GARBAGE = st.lists(st.one_of(
    st.binary(max_size=20),
    st.sampled_from([b"\n", b"\r\n", b"\0", b":", b"\\", b"\\c", b"\\n", b"\\r", b"\\t",
                     b"\n\n", b"\r", b"\xff", b"\xc3", b"SEND\n", b"CONNECT\n", b"MESSAGE\n",
                     b"content-length:", b"content-length:3\n", b"1", b"99999", b"-1",
                     b"x" * 30])), max_size=30).map(b"".join)


@settings(FAST, max_examples=300)
@given(data=st.data())
def test_garbage_gives_frames_or_protocol_error(data):
    """(d) Fuzz: any bytes, any cuts, any version and limits: Frames, None or ProtocolError,
    and the buffer stays bounded."""
    stream = data.draw(GARBAGE)
    version = data.draw(st.sampled_from(VERSIONS))
    limits = data.draw(st.one_of(
        st.just({}),
        st.fixed_dictionaries(dict(max_headers=st.integers(0, 5),
                                   max_header_line=st.integers(1, 40),
                                   max_body=st.integers(0, 60)))))
    cuts = data.draw(cuts_for(stream))
    parser = make_parser(version, **limits)
    bound = buffer_bound(limits.get("max_headers", 100), limits.get("max_header_line", 65536),
                         limits.get("max_body", 16 * 1024 * 1024))
    try:
        frames = feed_checking_buffer(parser, split(stream, cuts), bound)
    except pymq.ProtocolError as error:
        assert isinstance(error.message, str) and error.message
        return
    for frame in frames:
        assert isinstance(frame, Frame)
        assert isinstance(frame.command, str) and isinstance(frame.body, bytes)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in frame.headers.items())
    # Whatever parsed must parse the same when fed at once.
    assert outcome(stream, version, (), **limits) == (frames, False)


@settings(FAST, max_examples=100)
@given(st.text(max_size=50))
def test_escape_unescape_property(text):
    assert pymq.unescape(pymq.escape(text, "1.2"), "1.2") == text
    text11 = text.replace("\r", "")
    assert pymq.unescape(pymq.escape(text11, "1.1"), "1.1") == text11
    assert "\n" not in pymq.escape(text, "1.0")

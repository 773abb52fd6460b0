#!/usr/bin/env python3
"""pymq: a STOMP message broker for task queues and communication between subsystems.

One file to run (``python pymq.py --port 61613``), or embedded in a gevent program::

    import pymq
    server = pymq.start(port=0)        # listens at once; server.address is (host, port)
    ...
    server.stop()

Importing this module has no side effects: no monkey-patching, no logging set-up, no signal
handlers. ``main()`` does those things for the command line.

Protocol: STOMP 1.0, 1.1 and 1.2, negotiated from ``accept-version``; ``CONNECT`` or ``STOMP``;
heart-beats both ways. Topics (``/topic/NAME``) are broadcast and non-durable; a subscription to
``/topic/PREFIX*`` receives every topic whose name starts with PREFIX (``/topic/*``: all).
Queues (``/queue/NAME``) are durable: a SEND's RECEIPT means stored (or already ACKed).

Extensions: control destinations, answered in the RECEIPT, so ask for one (count-subscribers
and count-msgs kept from ocamlmq; purge, move and touch are pymq's)::

    /control/count-subscribers/topic/T    -> num-subscribers: subscriptions a SEND to T reaches
    /control/count-subscribers/queue/Q    -> num-subscribers
    /control/count-msgs/queue/Q           -> num-messages, num-delayed
    /control/purge/queue/Q                -> num-purged
    /control/move/queue/SRC  to:/queue/DST [max:N]  -> num-moved
    /control/touch  message-id:ID | ack:ID [ack-timeout:SECS]  -> touched: true or false

and task-queue headers: on SEND delay (x-delay, AMQ_SCHEDULED_DELAY), deliver-at, expires,
ttl (expiration), max-redeliveries, redelivery-delay, dead-letter-queue, dedup-id; on NACK
requeue:false and delay; on MESSAGE redelivered and redelivery-count. A dead letter goes to
/queue/DLQ.NAME. README.md has the table.

Errors follow STOMP 1.2: an ERROR frame with a ``message`` header (and ``receipt-id`` when the
offending frame asked for a receipt), then the connection is closed.

With ``--http-port``, an HTTP listener on the same hub serves Prometheus metrics (``/metrics``),
a health check (``/healthz``), and a web console (``/``) with its JSON API (``/api/``).

The file reads top-down in data-flow order: options and limits, frame codec, topics, queues,
the clock, the message's life after a delivery, control destinations, broker, connection,
HTTP (metrics and health; the web console and its API), server, command line.
"""

import collections
import configparser
import difflib
import fnmatch
import functools
import gc
import heapq
import hmac
import itertools
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import textwrap
import time
import urllib.parse

import gevent
import gevent.event
import gevent.lock
import gevent.server
import gevent.socket

import pymq_storage

DEFAULT_PRIORITY = str(pymq_storage.DEFAULT_PRIORITY)    # of a SEND without one

__version__ = "0.1.0"
SERVER_NAME = "pymq/" + __version__

log = logging.getLogger("pymq")


# ---------------------------------------------------------------------------------------------
# Options and limits: the one table. The usage text, conf/pymq.conf and the README list exactly
# these rows (a test checks it). name, default, metavar, help.
# ---------------------------------------------------------------------------------------------

OPTIONS = (
    ("host", "127.0.0.1", "ADDR", "address to listen on"),
    ("port", 61613, "PORT", "TCP port to listen on (0: any free port; none: no plain "
                            "listener, with --tls-port)"),
    ("tls-port", None, "PORT", "TCP port for STOMP over TLS 1.2+ (with --tls-cert and "
                               "--tls-key) (default: none)"),
    ("tls-cert", None, "FILE", "the server's certificate chain, PEM (default: none)"),
    ("tls-key", None, "FILE", "the server's private key, PEM (default: none)"),
    ("tls-ca", None, "FILE", "CA certificates, PEM: TLS clients must present a certificate "
                             "signed by one (mutual TLS) (default: none)"),
    ("tls-cert-login", False, None, "with --tls-ca: a client certificate's subject CN is the "
                                    "client's login (no passcode needed)"),
    ("ws-port", None, "PORT", "TCP port for STOMP over WebSocket, at path /ws (default: "
                              "none)"),
    ("wss-port", None, "PORT", "TCP port for STOMP over WebSocket over TLS (with the TLS "
                               "options) (default: none)"),
    ("users", None, "FILE", "users, their password hashes and the destinations each may "
                            "read, write and administer; SIGHUP reloads it (default: none)"),
    ("login", None, "LOGIN", "login that CONNECT must carry: one user who may do everything "
                             "(default: none)"),
    ("passcode", None, "PASSCODE", "passcode that CONNECT must carry (default: none)"),
    ("heart-beat", "100,10000", "SX,SY", "heart-beats: send one as often as every SX ms if "
                                         "the client asks, want one from the client at most "
                                         "every SY ms (0: never)"),
    ("heart-beat-grace", 2.0, "N", "drop a client silent for N times its heart-beat interval"),
    ("connect-timeout", 10.0, "SECS", "drop a connection that has not sent CONNECT by then"),
    ("frame-timeout", 30.0, "SECS", "drop a client that takes longer to finish a frame"),
    ("max-headers", 100, "N", "most headers in one frame"),
    ("max-header-line", 65536, "BYTES", "longest header line, the command line included"),
    ("max-body", 16 * 1024 * 1024, "BYTES", "largest frame body"),
    ("max-outbound", 64 * 1024 * 1024, "BYTES", "drop a client this far behind in reading"),
    ("max-connections", 10000, "N", "refuse connections beyond this many, with an ERROR"),
    ("max-subscriptions", 1000000, "N", "most subscriptions on one connection"),
    ("max-pending-receipts", 10000, "N", "stop reading from a client while this many of its "
                                         "RECEIPTs wait for the store"),
    ("db", "pymq.db", "URL", "message store: a SQLite file, sqlite:///PATH, "
                             "postgresql://USER:PASS@HOST:PORT/DB, or memory: (not durable)"),
    ("db-retry", 30.0, "SECS", "how long a write is retried while the database is "
                               "unavailable; then its senders get an ERROR"),
    ("async-budget", 32 * 1024 * 1024, "BYTES", "bytes of SENDs without a receipt that may "
                                               "wait to be stored before senders are paused"),
    ("max-prefetch", 100, "N", "most unacknowledged messages per queue subscription; the "
                               "prefetch of a SUBSCRIBE without one"),
    ("default-ack", "auto", "MODE", "ack mode of a SUBSCRIBE without one: auto, client or "
                                    "client-individual (ocamlmq's behaviour)"),
    ("ack-timeout", 0.0, "SECS", "redeliver a message not ACKed in time, unless its SEND had "
                                 "an ack-timeout header (0: never)"),
    ("max-redeliveries", 20, "N", "redeliver a message at most N times (unless its SEND had a "
                                  "max-redeliveries header), then dead-letter it (0: never)"),
    ("redelivery-delay", 0, "MS", "wait this long before the first redelivery after a NACK or "
                                  "an ack timeout, twice as long before each further one "
                                  "(unless the SEND had a redelivery-delay header; 0: at once)"),
    ("max-redelivery-delay", 300000, "MS", "longest wait before a redelivery"),
    ("drop-expired", False, None, "delete expired messages instead of dead-lettering them"),
    ("dedup-window", 600.0, "SECS", "how long after a SEND with a dedup-id header another SEND "
                                    "with it to the same queue stores nothing"),
    ("http-port", None, "PORT", "serve the web console (/), its JSON API (/api/), "
                               "Prometheus /metrics and /healthz over HTTP on this port of "
                               "--host (0: any free port; default: none)"),
    ("metrics-queues", None, "GLOB", "/metrics gives the depth of each queue whose name (no "
                                     "/queue/) matches GLOB, say jobs.* (at most 1000; "
                                     "default: none)"),
    ("import-ocamlmq", None, "SOURCE", "at start, before listening, import the messages of an "
                                       "ocamlmq store, each once however often pymq starts "
                                       "with it: its SQLite file, or a postgresql:// URL of "
                                       "the database of its ocamlmq_msgs table (default: none)"),
    ("import-ocamlmq-binlog", None, "FILE", "with --import-ocamlmq: also the messages of "
                                            "ocamlmq's binlog (-binlog) that it had not "
                                            "flushed to its database (default: none)"),
    ("import-ocamlmq-partial", False, None, "import the records of a truncated or corrupt "
                                            "binlog up to the bad one, rather than refuse to "
                                            "start"),
    ("log-level", "info", "LEVEL", "log events of this level and above: debug, info, "
                                   "warning or error"),
    ("cluster", False, None, "one node of several sharing the PostgreSQL store: every node "
                             "serves every queue and topic"),
    ("node-name", None, "NAME", "this node's name in the cluster (default: host name and "
                                "port)"),
    ("lease-timeout", 15.0, "SECS", "a cluster node silent this long is dead to the others, "
                                    "which take over what it held"),
    ("debug", False, None, "log connections and frames to stderr (--log-level debug)"),
    # ocamlmq's PostgreSQL flags, so that its command lines and scripts keep working: any of
    # them selects PostgreSQL instead of --db.
    ("dbhost", None, "HOST", "PostgreSQL host (ocamlmq's flags)"),
    ("dbport", None, "PORT", "PostgreSQL port"),
    ("dbdatabase", None, "NAME", "PostgreSQL database"),
    ("dbsockdir", None, "DIR", "PostgreSQL unix socket directory"),
    ("dbuser", None, "USER", "PostgreSQL user"),
    ("dbpassword", None, "PASSWORD", "PostgreSQL password"),
    ("dbmaxconns", None, "N", "accepted and ignored: group commit needs one connection"),
    ("initdb", False, None, "accepted and ignored: tables are created when missing"),
)
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR}
OCAMLMQ_DB_FLAGS = ("dbhost", "dbport", "dbdatabase", "dbsockdir", "dbuser", "dbpassword")
PORT_OPTIONS = ("port", "tls-port", "ws-port", "wss-port", "http-port")   # TCP ports; 0: any free one; none: off
DEFAULTS = {name: default for name, default, _, _ in OPTIONS}

RECV_SIZE = 64 * 1024
# TCP keepalive finds a peer that vanished without a FIN (power loss, cable cut) even when no
# heart-beats were agreed: probes after 60 s of silence, every 10 s, 6 unanswered = dead.
KEEPALIVE = {"TCP_KEEPIDLE": 60, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 6}
FLUSH_TIMEOUT = 5.0         # how long a closing connection may take to flush its last frames
LINGER_TIMEOUT = 1.0        # read (and drop) what a client still sends after our ERROR, so that
                            # closing does not reset the connection before it reads the ERROR
SUPPORTED_VERSIONS = ("1.2", "1.1", "1.0")   # preference order


class Options:
    """Broker settings: every row of OPTIONS as an attribute (dashes become underscores)."""

    def __init__(self, **values):
        for name, default, _, _ in OPTIONS:
            setattr(self, name.replace("-", "_"), default)
        for key, value in values.items():
            name = key.replace("_", "-")
            if name not in DEFAULTS:
                raise ValueError("unknown option %r" % key)
            setattr(self, key.replace("-", "_"), _convert(name, value))
        self.heart_beat_ms = _parse_heart_beat(self.heart_beat)
        if any(getattr(self, name) for name in OCAMLMQ_DB_FLAGS):
            self.db = self._postgresql_url()
        if self.default_ack not in ACK_MODES:
            raise ValueError("option default-ack: %r is not one of %s"
                             % (self.default_ack, ", ".join(ACK_MODES)))
        if self.max_prefetch < 1:
            raise ValueError("option max-prefetch: must be at least 1")
        if all(port is None for port in (self.port, self.tls_port, self.ws_port,
                                          self.wss_port)):
            raise ValueError("option port: none, and no --tls-port, --ws-port or --wss-port: "
                             "nothing to listen on")
        for name in ("tls_port", "wss_port"):
            if getattr(self, name) is not None and not (self.tls_cert and self.tls_key):
                raise ValueError("option %s needs --tls-cert and --tls-key"
                                 % name.replace("_", "-"))
        if (self.tls_ca or self.tls_cert_login) and self.tls_port is None \
                and self.wss_port is None:
            raise ValueError("options tls-ca and tls-cert-login need --tls-port or --wss-port")
        if self.tls_cert_login and not self.tls_ca:
            raise ValueError("option tls-cert-login needs --tls-ca (client certificates)")
        if self.cluster and not self.db.startswith(("postgresql://", "postgres://")):
            raise ValueError("option cluster needs a PostgreSQL store (--db postgresql://... "
                             "or the --db* options), not %s"
                             % pymq_storage.without_password(self.db))
        if self.lease_timeout < 1:
            raise ValueError("option lease-timeout: must be at least 1 second")
        if self.log_level not in LOG_LEVELS:
            raise ValueError("option log-level: %r is not one of %s"
                             % (self.log_level, ", ".join(LOG_LEVELS)))

    def _postgresql_url(self):
        params = [("host", self.dbsockdir or self.dbhost), ("port", self.dbport),
                  ("user", self.dbuser), ("password", self.dbpassword)]
        query = urllib.parse.urlencode([(key, value) for key, value in params if value],
                                       quote_via=urllib.parse.quote)
        return "postgresql:///%s?%s" % (urllib.parse.quote(self.dbdatabase or ""), query)

    def __repr__(self):
        return "Options(%s)" % ", ".join(
            "%s=%r" % (n, getattr(self, n.replace("-", "_"))) for n in DEFAULTS)


def _convert(name, value):
    """Convert a setting (from code, a config file or the command line) to its option's type."""
    default = DEFAULTS[name]
    if name in PORT_OPTIONS:
        return _port(name, value)
    if default is None:
        return value or None        # "login =" in a config file means: none
    if value is None:
        return value
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return configparser.ConfigParser.BOOLEAN_STATES[value.lower()]
            return bool(value)
        value = type(default)(value)
    except (KeyError, ValueError, TypeError):
        raise ValueError("option %s: %r is not a valid %s" % (name, value, type(default).__name__))
    if isinstance(value, (int, float)) and value < 0:
        raise ValueError("option %s: must not be negative" % name)
    return value


def _port(name, value):
    """A TCP port, 0 (any free one), or None ("none", or empty in a config file: no listener)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        port = int(value)
    except (ValueError, TypeError):
        raise ValueError("option %s: %r is not a TCP port (or none)" % (name, value))
    if not 0 <= port <= 65535:
        raise ValueError("option %s: %d is not a TCP port" % (name, port))
    return port


def _parse_heart_beat(text):
    try:
        sx, sy = (int(part) for part in text.split(","))
        if sx < 0 or sy < 0:
            raise ValueError
    except ValueError:
        raise ValueError("option heart-beat: %r is not two non-negative integers 'SX,SY'" % text)
    return sx, sy


# ---------------------------------------------------------------------------------------------
# Frame codec. Sans-IO: feed bytes to a FrameParser and take frames out; encode_frame() gives
# bytes. Nothing here touches a socket.
# ---------------------------------------------------------------------------------------------

class ProtocolError(Exception):
    """The peer broke the protocol or a limit. It gets an ERROR frame and is disconnected."""

    def __init__(self, message, receipt=None, headers=(), delay=0.0):
        super().__init__(message)
        self.message = message
        self.receipt = receipt
        self.headers = tuple(headers)
        self.delay = delay          # seconds to wait before the ERROR (a failed login)


class Frame:
    __slots__ = ("command", "headers", "body")

    def __init__(self, command, headers=None, body=b""):
        self.command = command
        self.headers = {} if headers is None else headers
        self.body = body

    def __eq__(self, other):
        return (isinstance(other, Frame) and self.command == other.command
                and self.headers == other.headers and self.body == other.body)

    def __repr__(self):
        return "Frame(%r, %r, %r)" % (self.command, self.headers, self.body)


# Header escaping (STOMP 1.1 added it, 1.2 added \r). CONNECT and CONNECTED are never escaped,
# so that a 1.0 peer can read them before a version is agreed.
_UNESCAPED_FRAMES = ("CONNECT", "STOMP", "CONNECTED")
_ESCAPE = {
    "1.0": str.maketrans({"\n": "\\n"}),    # 1.0 has no escapes; a newline would break framing
    "1.1": str.maketrans({"\\": "\\\\", "\n": "\\n", ":": "\\c"}),
    "1.2": str.maketrans({"\\": "\\\\", "\n": "\\n", ":": "\\c", "\r": "\\r"}),
}
_UNESCAPE = {
    "1.1": {"\\": "\\", "n": "\n", "c": ":"},
    "1.2": {"\\": "\\", "n": "\n", "c": ":", "r": "\r"},
}


def escape(text, version):
    if "\\" in text or "\n" in text or ":" in text or "\r" in text:
        return text.translate(_ESCAPE[version])
    return text


def unescape(text, version):
    if "\\" not in text:
        return text
    table = _UNESCAPE[version]
    out = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            char = table.get(next(chars, None))
            if char is None:
                raise ProtocolError("undefined escape sequence in header %r" % text)
        out.append(char)
    return "".join(out)


def encode_frame(command, headers=(), body=b"", version="1.2"):
    """Encode one frame; headers is a dict or (name, value) pairs. content-length is computed
    (any given one is ignored). Frames end with NUL and a newline, legal in every version."""
    escaped = version != "1.0" and command not in _UNESCAPED_FRAMES
    with_length = bool(body) or command in ("SEND", "MESSAGE", "ERROR")
    return (command + "\n").encode() + encode_rest(headers, body, version, escaped, with_length)


def encode_rest(headers, body, version, escaped=True, with_length=True):
    """Everything of a frame after its command line: headers, blank line, body, NUL."""
    if isinstance(headers, dict):
        headers = headers.items()
    parts = []
    for name, value in headers:
        if name == "content-length":
            continue
        if escaped:
            name, value = escape(name, version), escape(value, version)
        elif ":" in name:
            continue                # a name with ':' cannot be written without escapes
        elif "\n" in name or "\n" in value:
            name, value = escape(name, "1.0"), escape(value, "1.0")
        parts += (name, ":", value, "\n")
    if with_length:
        parts += ("content-length:", str(len(body)), "\n")
    parts.append("\n")
    return "".join(parts).encode() + body + b"\0\n"


class FrameParser:
    """Turns a byte stream into frames.

    feed(data) buffers bytes; next_frame() returns the next complete Frame, or None until more
    bytes arrive, and raises ProtocolError when the stream breaks the protocol or a limit.
    `version` decides header unescaping; the connection sets it once a version is agreed, which
    is why frames are taken out one at a time. End-of-line bytes between frames are heart-beats.
    The buffer never holds more than one partial frame within the limits plus what the last
    feed() brought: every header line is measured as it arrives, and content-length is checked
    before any body is awaited. Line lengths count a line's "\r".
    """

    def __init__(self, max_headers=100, max_header_line=65536, max_body=16 * 1024 * 1024):
        self.max_headers = max_headers
        self.max_header_line = max_header_line
        self.max_body = max_body
        self.version = "1.0"
        self._buf = bytearray()
        self._head = None       # (command, headers, body_start, content_length) once parsed
        self._begin_frame(0)

    def _begin_frame(self, pos):
        self._pos = pos         # start of the frame being parsed
        self._scan = pos        # where the search for the end of the current part resumes
        self._line = pos        # start of the header line still arriving
        self._lines = 0         # complete lines of the header block so far

    @property
    def in_frame(self):
        """True when part of a frame (not just heart-beats) is waiting for more bytes."""
        self._skip_heartbeats()
        return self._pos < len(self._buf)

    def feed(self, data):
        shift = self._pos
        if shift:
            del self._buf[:shift]
            self._pos, self._scan, self._line = 0, self._scan - shift, self._line - shift
            if self._head is not None:
                command, headers, body_start, length = self._head
                self._head = (command, headers, body_start - shift, length)
        self._buf += data

    def next_frame(self):
        if self._head is None and not self._read_head():
            return None
        return self._read_body()

    def _skip_heartbeats(self):
        if self._head is not None:
            return
        buf, pos, end = self._buf, self._pos, len(self._buf)
        while pos < end:
            if buf[pos] == 10:
                pos += 1
            elif buf[pos] == 13 and pos + 1 < end and buf[pos + 1] == 10:
                pos += 2
            else:
                break
        if pos != self._pos:
            self._begin_frame(pos)

    def _read_head(self):
        self._skip_heartbeats()
        buf, start, end = self._buf, self._pos, len(self._buf)
        if start == end:
            return False
        # The header block ends at the first empty line: "\n\n", or "\n\r\n" before that.
        block_end = buf.find(b"\n\n", self._scan)
        crlf_end = buf.find(b"\n\r\n", self._scan, end if block_end < 0 else block_end + 2)
        if crlf_end >= 0:
            block_end, body_start = crlf_end, crlf_end + 3
        else:
            body_start = block_end + 2
        if block_end < 0:
            self._check_partial_head(end)
            return False
        lines = bytes(buf[start:block_end]).split(b"\n")
        if len(lines) - 1 > self.max_headers:
            raise ProtocolError("too many headers (the limit is %d)" % self.max_headers)
        command = self._decode(lines[0], "command")
        escaped = self.version != "1.0" and command not in _UNESCAPED_FRAMES
        headers = {}
        for line in lines[1:]:
            text = self._decode(line, "header")
            name, colon, value = text.partition(":")
            if not colon:
                raise ProtocolError("malformed header line %r (no ':')" % text[:100])
            if self.version == "1.0":
                name, value = name.strip(), value.strip()
            elif escaped:
                name, value = unescape(name, self.version), unescape(value, self.version)
            headers.setdefault(name, value)      # a repeated header: the first one wins
        length = headers.get("content-length")
        if length is not None:
            length = self._content_length(length, headers.get("receipt"))
        self._head = (command, headers, body_start, length)
        self._scan = body_start
        return True

    def _check_partial_head(self, end):
        # A header block still arriving: measure each line as it completes, and the one still
        # open, so that a client cannot make us buffer an endless header.
        buf, line = self._buf, self._line
        newline = buf.find(b"\n", line, end)
        while newline >= 0:
            if newline - line > self.max_header_line:
                raise ProtocolError("header line longer than %d bytes" % self.max_header_line)
            self._lines += 1
            line = newline + 1
            newline = buf.find(b"\n", line, end)
        if self._lines > self.max_headers + 1 or (
                self._lines == self.max_headers + 1 and end > line
                and not (end - line == 1 and buf[line] == 13)):
            # Past max_headers complete lines, only the blank line may follow.
            raise ProtocolError("too many headers (the limit is %d)" % self.max_headers)
        if end - line > self.max_header_line:
            raise ProtocolError("header line longer than %d bytes" % self.max_header_line)
        self._line = line
        self._scan = max(self._pos, end - 2)   # an empty line split across feeds is still found

    def _decode(self, line, what):
        if len(line) > self.max_header_line:
            raise ProtocolError("%s line longer than %d bytes" % (what, self.max_header_line))
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            return line.decode()
        except UnicodeDecodeError:
            raise ProtocolError("%s is not valid UTF-8" % what)

    def _content_length(self, text, receipt):
        text = text.strip()
        if not (text.isascii() and text.isdigit()):
            raise ProtocolError("invalid content-length %r" % text[:100], receipt)
        # Compare digits before converting: int() of thousands of digits is slow, or refused.
        digits = text.lstrip("0") or "0"
        if len(digits) > len(str(self.max_body)) or int(digits) > self.max_body:
            raise ProtocolError("body of %s bytes is over the limit of %d bytes"
                                % (digits[:30], self.max_body), receipt)
        return int(digits)

    def _read_body(self):
        command, headers, body_start, length = self._head
        buf = self._buf
        if length is not None:
            if len(buf) < body_start + length + 1:
                return None
            if buf[body_start + length] != 0:
                raise ProtocolError("frame body is not followed by a NUL byte "
                                    "(is content-length right?)", headers.get("receipt"))
            nul = body_start + length
        else:
            nul = buf.find(0, self._scan)
            size = (len(buf) if nul < 0 else nul) - body_start
            if size > self.max_body:
                raise ProtocolError("body over the limit of %d bytes (or no NUL byte ends the "
                                    "frame)" % self.max_body, headers.get("receipt"))
            if nul < 0:
                self._scan = len(buf)
                return None
        body = bytes(buf[body_start:nul])
        self._head = None
        self._begin_frame(nul + 1)
        return Frame(command, headers, body)


# ---------------------------------------------------------------------------------------------
# Topics: broadcast and non-durable. Exact subscriptions in one index, prefix subscriptions
# (/topic/PREFIX*) in another looked up at the lengths some prefix has, so that a SEND costs
# O(matching subscriptions + name length), not O(all subscriptions).
# ---------------------------------------------------------------------------------------------

# Each mode's one string object, shared by every subscription that uses it.
ACK_MODES = {mode: mode for mode in ("auto", "client", "client-individual")}
# Headers of a SEND that the broker sets itself on the MESSAGE, or that only concern the SEND.
_NOT_FORWARDED = frozenset(("destination", "message-id", "subscription", "ack", "receipt",
                            "content-length", "transaction", "redelivered", "redelivery-count"))


class Subscription:
    """A topic subscription. Kept small, since a million of them must fit in a few hundred
    megabytes: the name is the index's own key string, ids are interned (clients reuse the
    same few), the MESSAGE header is encoded on first delivery."""

    __slots__ = ("conn", "id", "name", "ack", "_header")
    kind = "topic"
    queue = None

    def __init__(self, conn, sub_id, name, ack):
        self.conn = conn
        self.id = sys.intern(sub_id)
        self.name = name
        self.ack = ack
        self._header = None

    @property
    def destination(self):
        return "/%s/%s" % (self.kind, self.name)

    @property
    def header(self):
        """Every MESSAGE to this subscription starts with these bytes."""
        header = self._header
        if header is None:
            header = self._header = ("MESSAGE\nsubscription:%s\n"
                                     % escape(self.id, self.conn.version)).encode()
        return header


class Topics:
    def __init__(self, id_prefix, stats):
        self.exact = {}             # topic name -> subscriptions, see _members()
        self.prefixes = {}          # "prefix*" -> subscriptions of /topic/prefix*
        self.prefix_lengths = {}    # prefix length -> how many prefixes have it
        self.stats = stats
        # Topic message ids: unique across restarts because each start gets its own prefix.
        self._id_prefix = id_prefix
        self._message_seq = itertools.count(1)

    def subscribe(self, conn, sub_id, name, ack):
        sub = Subscription(conn, sub_id, name, ack)
        if name.endswith("*"):
            if _index_add(self.prefixes, name, sub):
                length = len(name) - 1
                self.prefix_lengths[length] = self.prefix_lengths.get(length, 0) + 1
        else:
            _index_add(self.exact, name, sub)
        return sub

    def remove(self, sub):
        name = sub.name
        if name.endswith("*"):
            if _index_remove(self.prefixes, name, sub):
                length = len(name) - 1
                count = self.prefix_lengths[length] - 1
                if count:
                    self.prefix_lengths[length] = count
                else:
                    del self.prefix_lengths[length]
        else:
            _index_remove(self.exact, name, sub)

    def matching(self, topic):
        """Subscriptions a message to `topic` reaches: the exact ones, then the prefix ones."""
        subs = list(_members(self.exact.get(topic)))
        for length in self.prefix_lengths:
            if length <= len(topic):
                subs.extend(_members(self.prefixes.get(topic[:length] + "*")))
        return subs

    def publish(self, topic, frame):
        """Broadcast a SEND to every subscription matching `topic`."""
        subs = self.matching(topic)
        if not subs:
            return
        message_id = "%s%d" % (self._id_prefix, next(self._message_seq))
        id_line = ("message-id:%s\n" % message_id).encode()
        ack_line = ("ack:%s\n" % message_id).encode()
        user_headers = [(k, v) for k, v in frame.headers.items() if k not in _NOT_FORWARDED]
        user_headers.append(("destination", "/topic/" + topic))
        rests = {}          # per protocol version: the encoded headers and body, shared by all
        for sub in subs:
            version = sub.conn.version
            rest = rests.get(version)
            if rest is None:
                rest = rests[version] = encode_rest(user_headers, frame.body, version,
                                                    escaped=version != "1.0")
            if sub.ack != "auto" and version == "1.2":
                sub.conn.send((sub.header, id_line, ack_line, rest))
            else:
                sub.conn.send((sub.header, id_line, rest))
        self.stats["messages_out"] += len(subs)


def _members(entry):
    """The subscriptions of an index entry: None, one Subscription, or a dict of them (most
    topics have one subscriber; a dict per topic would triple its cost)."""
    if entry is None:
        return ()
    if type(entry) is dict:
        return entry
    return (entry,)


def _index_add(index, key, sub):
    """Add `sub` under `key`; sub.name becomes the index's key string (one copy)."""
    entry = index.get(key)
    if entry is None:
        index[key] = sub
        return True
    if type(entry) is dict:
        sub.name = next(iter(entry)).name
        entry[sub] = None
    else:
        sub.name = entry.name
        index[key] = {entry: None, sub: None}
    return False


def _index_remove(index, key, sub):
    """Remove `sub` from under `key`; True when the key is gone."""
    entry = index[key]
    if entry is sub:
        del index[key]
        return True
    del entry[sub]
    if len(entry) == 1:
        index[key] = next(iter(entry))
    return False


# ---------------------------------------------------------------------------------------------
# Queues: dispatch, refill, in flight. A queue's messages live in storage; an active queue (one
# with subscribers) keeps a bounded buffer of ready ones, refilled in delivery order, and
# delivers round-robin to subscriptions with room. A queue message's life:
#
#   SEND -> stored (the RECEIPT waits for the commit, or for the ACK if that comes first)
#        -> maybe delayed (not due yet: in storage only, see the clock)
#        -> ready -> in flight to one subscription (its delivery count is written later)
#        -> ACKed (deleted); or back (NACK, ack timeout, UNSUBSCRIBE, connection lost): see
#           "The message's life after a delivery" below: ready again, later, or a dead letter.
# ---------------------------------------------------------------------------------------------

PREFETCH_HEADERS = ("prefetch", "prefetch-count", "activemq.prefetchSize")
REFILL_BATCH = 500               # messages an active queue loads from storage at a time...
REFILL_BYTES = 8 * 1024 * 1024   # ...and at most this many bytes of them.
# A queue whose consumers empty its buffer before each refill is back loads twice as many
# next time, up to REFILL_MAX, and all queues' sizes together about REFILL_TOTAL: one store
# round trip then feeds them for longer (a busy queue is bound by round trips, not work).
REFILL_MAX = 4000
REFILL_TOTAL = 32000
QUEUE_BACKLOG = 256 * 1024       # bytes unwritten to a connection before queues skip it
REFILL_RETRY = 1.0               # seconds before a failed refill is tried again
# Seconds a cluster node waits before it looks again for a message that came back (NACK, ack
# timeout) when only its last consumer here could take it: another node's consumer first.
HAND_BACK_GRACE = 0.2


class QueueSubscription(Subscription):
    __slots__ = ("queue", "prefetch", "in_flight")
    kind = "queue"

    def __init__(self, conn, sub_id, name, ack, prefetch):
        super().__init__(conn, sub_id, name, ack)
        # The Queue; or, while the subscription stands alone for its queue (Queues._settle),
        # None, or the storage Batch of the probe still finding out whether the queue holds
        # messages.
        self.queue = None
        self.prefetch = prefetch      # most messages in flight (acked modes)
        self.in_flight = None         # message id -> InFlight, in delivery order, once used

    def ready(self):
        """Can take one more queue message now."""
        conn = self.conn
        return ((self.ack == "auto" or self.in_flight is None
                 or len(self.in_flight) < self.prefetch)
                and not conn.closing and conn.backlog < QUEUE_BACKLOG)


class InFlight:
    """A queue message delivered to a subscription and not yet ACKed; a timer of the clock
    while it has an ack timeout."""
    __slots__ = ("message", "sub", "deadline")

    def __init__(self, message, sub):
        self.message = message
        self.sub = sub                # None once ACKed or back in the queue
        self.deadline = None

    def fire(self):
        """Its ack timeout passed."""
        self.sub.conn.broker.redelivery.timed_out(self)


class Queue:
    """An active queue: one with subscribers. Its messages live in storage; this holds a
    bounded buffer of ready ones, refilled from storage in delivery order.

    The buffer invariant: every stored, ready message of the queue that is not in memory (in
    `ready` or in flight: in `held`) has a key after `cursor`; `exhausted` means storage has
    none. A message that appears in storage behind the cursor (a dead letter, a delayed one
    falling due: Queues.arrived) moves the cursor back (rewind).

    An idle queue with a single subscription has no Queue: Queues.queues maps its name to the
    subscription itself (see Queues._settle), so that a million idle workers each waiting on
    a queue of their own cost about what a million topic subscriptions do."""

    __slots__ = ("name", "subs", "next_sub", "ready", "held", "cursor", "exhausted",
                 "refilling", "acked_while_refilling", "refill_size", "loaded")

    def __init__(self, name):
        self.name = name
        self.subs = []                # round-robin order
        self.next_sub = 0
        self.ready = []               # heap of (key, message, its last connection or None)
        self.held = None              # seqs ready or in flight: a set, once there are any
        self.cursor = None            # key of the last message loaded from storage
        self.exhausted = False
        self.refilling = False        # the storage Load of a refill, while one is out
        self.acked_while_refilling = None     # seqs that left memory while it is out
        self.refill_size = REFILL_BATCH       # messages a refill loads (Queues._resize)
        self.loaded = False                   # a refill came back since it was created

    def make_ready(self, message, previous=None):
        heapq.heappush(self.ready, (message.key, message, previous))
        if self.held is None:
            self.held = set()
        self.held.add(message.seq)

    def release(self, seq):
        """The message leaves memory (ACKed, dead-lettered, or waiting in storage to be due):
        a refill out now must not bring it back."""
        if self.held:
            self.held.discard(seq)
        if self.refilling:
            if self.acked_while_refilling is None:
                self.acked_while_refilling = set()
            self.acked_while_refilling.add(seq)

    def in_order(self, key):
        """No message still only in storage comes before `key`."""
        return self.exhausted or (self.cursor is not None and key <= self.cursor)

    def rewind(self, key, restart=None):
        """Stored messages not in memory may now exist from `key` on (None: anywhere). A
        refill out now would move the cursor past them: restart(load, cursor) makes it read
        from the new cursor if it can (Storage.restart_load), else its answer is dropped."""
        if key is None:
            self.cursor = None
        elif self.cursor is not None and key <= self.cursor:
            self.cursor = pymq_storage.before(key)
        self.exhausted = False
        if self.refilling and restart is not None and restart(self.refilling, self.cursor):
            return
        self.refilling = False
        self.acked_while_refilling = None

    def trim(self):
        """Keep the buffer bounded: forget the last messages (they are in storage, their
        delivery counts too) and move the cursor back before them. Never during a refill,
        whose result would move the cursor past what was forgotten. Returns their seqs."""
        size = self.refill_size
        entries = sorted(self.ready)
        forgotten = [entry[1].seq for entry in entries[size:]]
        self.held.difference_update(forgotten)
        boundary = entries[size - 1][0]
        self.cursor = boundary if self.cursor is None else min(self.cursor, boundary)
        self.exhausted = False
        self.ready = entries[:size]     # sorted: a heap already
        return forgotten

    def next_subscription(self, avoid=None):
        """The next subscription, in round-robin order, that can take a message now; another
        connection than `avoid` (a redelivered message's last consumer) when one can."""
        subs = self.subs
        count = len(subs)
        fallback = None
        for i in range(count):
            index = (self.next_sub + i) % count
            sub = subs[index]
            if _can_take(sub, self):
                if sub.conn is avoid and fallback is None:
                    fallback = index
                    continue
                self.next_sub = index + 1
                return sub
        if fallback is not None:
            self.next_sub = fallback + 1
            return subs[fallback]
        return None


def _room(sub):
    """How many more messages a subscription may take before its prefetch is reached (auto:
    a refill's worth)."""
    if sub.conn.closing:
        return 0
    if sub.ack == "auto":
        return REFILL_BATCH
    return sub.prefetch - (len(sub.in_flight) if sub.in_flight else 0)


def _can_take(sub, queue):
    """Whether `sub` can take a message of `queue` now. If its connection's backlog is what
    stops it, the queue is noted: once the backlog is written, it dispatches again
    (Queues.drained)."""
    if sub.ready():
        return True
    conn = sub.conn
    if not conn.closing and conn.backlog >= QUEUE_BACKLOG:
        if conn.starved is None:
            conn.starved = set()
        conn.starved.add(queue)
    return False


class Queues:
    """Every queue: subscribing, storing a SEND, dispatching, refilling, ACKs."""

    def __init__(self, options, clock, stats):
        self.options = options
        self.clock = clock
        self.stats = stats
        self.storage = None           # given at start (Broker.start)
        self.redelivery = None        # what happens to a message that comes back: ditto
        self.schedule = None          # the store's timed work: ditto
        self.cluster = False          # one node of several: messages are claimed (ditto)
        # queue name -> Queue, only while it has subscribers; or its only QueueSubscription,
        # while nothing of the queue is ready in storage or in memory (see _settle)
        self.queues = {}

    # -- SEND ----------------------------------------------------------------------------------

    def enqueue(self, name, frame):
        """Store a SEND to a queue; returns (the Batch that makes it durable, the message, or
        None if it may not be delivered before it is stored: delayed, or de-duplicated). A
        message in memory may be delivered before its batch commits: an ACK that comes first
        cancels the write."""
        headers = frame.headers
        priority, ack_timeout, due, expires, dedup_key = _send_options(headers)
        user_headers = [(k, v) for k, v in headers.items() if k not in _NOT_FORWARDED]
        try:
            message = self.storage.new_message(name, priority, ack_timeout, user_headers,
                                               frame.body, due, expires)
        except pymq_storage.StorageError as error:
            raise ProtocolError("message not stored: %s" % error)
        dedup = None
        if dedup_key is not None:
            sent = pymq_storage.now_ms()
            dedup = (dedup_key, sent, sent + int(self.options.dedup_window * 1000))
        if self.cluster:
            return self._enqueue_shared(name, message, due, dedup)
        batch = self.storage.save(message, dedup)
        if due:
            self.schedule.note_due(due)
            message = None
        elif dedup is not None:
            message = None          # Queues.arrived, once stored (and not a duplicate)
        else:
            queue = self._queue(name)
            if queue is not None:
                # In memory only if the buffer invariant needs it (or it costs no read).
                if (queue.refilling or queue.exhausted
                        or (queue.cursor is not None and message.key < queue.cursor)):
                    queue.make_ready(message)
                self.dispatch(queue)
        # Backpressure: past the async budget, this sender's reads wait for the writer.
        self.storage.wait_for_budget(self.options.async_budget)
        return batch, message

    def _enqueue_shared(self, name, message, due, dedup):
        """enqueue() on a cluster node: a message that a consumer here can take at once is
        held by this node from its insert on (the local path: no claim, no round trip);
        any other is stored free, for whichever node has a consumer ready first."""
        queue = None
        if not due and dedup is None and self.storage.lease_ok():
            queue = self._queue(name)
            if queue is not None and (queue.ready or not any(_can_take(sub, queue)
                                                             for sub in queue.subs)):
                queue = None
        batch = self.storage.save(message, dedup, held=queue is not None)
        if due:
            self.schedule.note_due(due)
        if queue is None:
            message = None          # Queues.arrived, once stored, here and on every node
        else:
            queue.make_ready(message)
            self.dispatch(queue)
        self.storage.wait_for_budget(self.options.async_budget)
        return batch, message

    # -- SUBSCRIBE / UNSUBSCRIBE ---------------------------------------------------------------

    def subscribe(self, conn, sub_id, name, ack, headers):
        sub = QueueSubscription(conn, sub_id, name, ack, self._prefetch(headers))
        queue = self._queue(name)
        if queue is None:
            # The queue's first subscription stands alone for it while the store says
            # whether it holds anything: no Queue unless it does.
            self.queues[name] = sub
            sub.queue = self.storage.probe_async(name)
            return sub
        sub.queue = queue
        queue.subs.append(sub)
        self.dispatch(queue)
        return sub

    def _prefetch(self, headers):
        limit = self.options.max_prefetch
        for name in PREFETCH_HEADERS:
            value = headers.get(name)
            if value is not None:
                value = value.strip()
                digits = value.lstrip("0")
                if value.isascii() and value.isdigit() and digits:
                    return limit if len(digits) > len(str(limit)) else min(int(digits), limit)
        return limit

    def remove(self, sub):
        """Final: nothing (a late ACK, a timeout) brings the subscription back. Its messages
        in flight come back at once, as from a consumer that died."""
        queue = sub.queue
        if queue.__class__ is not Queue:    # it stood alone for its queue: nothing else
            del self.queues[sub.name]
            return
        queue.subs.remove(sub)
        for in_flight in list(sub.in_flight.values() if sub.in_flight else ()):
            self.redelivery.came_back(in_flight, LOST)
        if queue.subs:
            self.dispatch(queue)
        else:
            del self.queues[queue.name]      # its messages are all in storage
            if self.cluster:
                self.storage.release_queue(queue.name)      # others may take them now

    def count_subscribers(self, name):
        queue = self.queues.get(name)
        return 0 if queue is None else 1 if queue.__class__ is not Queue else len(queue.subs)

    def _queue(self, name):
        """The Queue `name`, or None if it has no subscribers. A queue settled into its only
        subscription becomes a Queue again."""
        queue = self.queues.get(name)
        if queue is None or queue.__class__ is Queue:
            return queue
        sub = queue
        queue = self.queues[name] = Queue(name)
        # Settled: what _settle() required. Else a probe is out: the Queue refills instead.
        queue.exhausted = sub.queue is None
        sub.queue = queue
        queue.subs.append(sub)
        return queue

    def _settle(self, queue):
        """Let an idle queue's only subscription stand for it: nothing of the queue is ready
        in storage or in memory, so the Queue holds nothing but that subscription. Not a
        queue that was busy enough to load more than REFILL_BATCH at a time: it keeps that
        (a few dozen at most can, REFILL_TOTAL)."""
        if (len(queue.subs) == 1 and queue.exhausted and not queue.ready and not queue.held
                and not queue.refilling and queue.refill_size == REFILL_BATCH
                and self.queues.get(queue.name) is queue):
            sub = queue.subs[0]
            sub.queue = None
            self.queues[queue.name] = sub

    # -- delivery ------------------------------------------------------------------------------

    def dispatch(self, queue):
        """Deliver ready messages round-robin to subscriptions that can take one; an expired
        one is never delivered; keep the buffer bounded and refilled."""
        if self.cluster and not self.storage.lease_ok():
            return          # what this node holds may be another's: wait for the heartbeat
        ready = queue.ready
        while ready and queue.in_order(ready[0][0]):
            _, message, previous = ready[0]
            if message.expires and message.expires <= pymq_storage.now_ms():
                heapq.heappop(ready)
                self.redelivery.dead_letter(queue, message, EXPIRED)
                continue
            sub = queue.next_subscription(avoid=previous)
            if sub is None:
                break
            heapq.heappop(ready)
            self._deliver(queue, sub, message)
        if queue.refilling:
            return
        if queue.exhausted and not ready:
            self._settle(queue)
        elif len(ready) > 2 * queue.refill_size:
            forgotten = queue.trim()
            if self.cluster:
                self.storage.release(forgotten)     # others may take them now
        elif not queue.exhausted and (len(ready) < queue.refill_size // 2
                                      or (ready and not queue.in_order(ready[0][0]))):
            if not ready and not any(_can_take(sub, queue) for sub in queue.subs):
                # Nobody can take a message now: load when someone can (an ACK, a drained
                # backlog, a new subscriber dispatch again), not to hold it in memory meanwhile.
                return
            size = queue.refill_size
            if self.cluster:
                # Claim no more than the consumers here can take: what one node holds, the
                # others' consumers cannot have. (One at least while the first ready one waits
                # for the cursor.)
                room = sum(_room(sub) for sub in queue.subs) - len(ready)
                if room <= 0 and ready and queue.in_order(ready[0][0]):
                    return
                size = max(1, min(size, room))
            queue.refilling = self.storage.load_async(queue.name, queue.cursor, size,
                                                      self._refilled)

    def _deliver(self, queue, sub, message):
        conn = sub.conn
        message_id = str(message.seq)
        extra = "message-id:%s\n" % message_id
        deliveries = message.deliveries
        if sub.ack != "auto":
            if conn.version == "1.2":
                extra += "ack:%s\n" % message_id
            in_flight = InFlight(message, sub)
            if sub.in_flight is None:
                sub.in_flight = {}
            sub.in_flight[message_id] = in_flight
            conn.in_flight[message_id] = in_flight
            timeout = message.ack_timeout or self.options.ack_timeout
            if timeout:
                self.clock.schedule(in_flight, time.monotonic() + timeout)
            message.deliveries = deliveries + 1
            if self.storage.count_delivery(message):    # later: the MESSAGE does not wait
                self.schedule.counted()
        else:
            self.forget(queue, message.seq)     # auto: acknowledged once sent
        if deliveries:
            extra += "redelivered:true\nredelivery-count:%d\n" % deliveries
            self.stats["redelivered"] += 1
        headers = message.headers + [("destination", "/queue/" + queue.name)]
        conn.send((sub.header, extra.encode(),
                   encode_rest(headers, message.body, conn.version, conn.version != "1.0")))
        self.stats["messages_out"] += 1

    def forget(self, queue, seq):
        """The message is done with: delete it from storage and from the queue's memory.
        Returns the storage Batch that makes the deletion durable."""
        queue.release(seq)
        return self.storage.delete(seq)

    def land(self, in_flight):
        """Take a message out of flight; returns the subscription it was in flight to."""
        sub = in_flight.sub
        message_id = str(in_flight.message.seq)
        del sub.in_flight[message_id]
        del sub.conn.in_flight[message_id]
        in_flight.sub = None
        if in_flight.deadline is not None:
            self.clock.cancel(in_flight)
        return sub

    def requeue(self, queue, message, previous):
        """Put a message that came back into its queue's buffer, if the queue is still active
        (else it waits in storage for the next subscriber); dispatch gives it to another
        connection than `previous` if one can take it."""
        if self.cluster:
            self._hand_back(queue, message, previous)
        elif self.queues.get(queue.name) is queue:
            heapq.heappush(queue.ready, (message.key, message, previous))

    def _hand_back(self, queue, message, previous):
        """requeue() on a cluster node: to another connection here that can take it, as on
        one node; else the node lets go of it, for whichever node has a consumer ready. If
        the only ones here that could take it are on `previous`, the other nodes go first:
        this node looks for it again HAND_BACK_GRACE later."""
        queue.release(message.seq)
        if self.queues.get(queue.name) is not queue:
            self.storage.release([message.seq])
            return
        others = last = False
        for sub in queue.subs:
            if _can_take(sub, queue):
                if sub.conn is previous:
                    last = True
                else:
                    others = True
                    break
        if others:
            queue.make_ready(message, previous)     # still held
            return
        self.storage.release([message.seq], here=not last)
        if last:
            name, key = queue.name, message.key
            self.clock.schedule(Timer(lambda: self.arrived({name: key})),
                                time.monotonic() + HAND_BACK_GRACE)

    def redispatch(self, queue):
        """Dispatch, unless the queue has lost its subscribers (and its Queue) meanwhile."""
        if self.queues.get(queue.name) is queue:
            self.dispatch(queue)

    def drained(self, conn):
        """The connection's outbound buffer emptied: the queues that skipped it for its
        backlog may deliver again; only those, and only until it is backlogged again (a
        connection may have a million queues)."""
        starved, conn.starved = conn.starved, None
        while starved and conn.backlog < QUEUE_BACKLOG and not conn.closing:
            self.redispatch(starved.pop())
        if starved:
            if conn.starved is None:
                conn.starved = starved
            else:
                conn.starved |= starved

    # -- ACK -----------------------------------------------------------------------------------

    def acked(self, conn, frame):
        """The in-flight messages an ACK or NACK frame covers: one, or in `client` mode every
        earlier one of the same subscription too. Unknown ids cover nothing (ignored quietly:
        ocamlmq-style clients ACK even in auto mode, and a late ACK is harmless)."""
        in_flight = conn.in_flight.get(_ack_id(conn, frame))
        if in_flight is None:
            return []
        sub = in_flight.sub
        if sub.ack != "client":
            return [in_flight]
        covered = []
        for other in sub.in_flight.values():
            covered.append(other)
            if other is in_flight:
                return covered

    def ack(self, conn, frame):
        """The RECEIPT of an ACK waits until the deletion is durable: a message whose ACK was
        receipted is never delivered again, crash or not. The ACK also settles the RECEIPT
        its sender may still be waiting for: a consumed message cannot be lost any more
        (ActiveMQ's concurrent store and dispatch; the sender need not wait for the disk)."""
        queues = set()
        batch = None
        covered = self.acked(conn, frame)
        self.stats["acked"] += len(covered)
        for in_flight in covered:
            sub = self.land(in_flight)
            message = in_flight.message
            deleted = self.forget(sub.queue, message.seq)
            if deleted is not None:     # None: it cancelled the insert, nothing to wait for
                batch = deleted
            sender = message.sender
            if sender is not None:
                message.sender = None
                sender.receipts_ready()
            queues.add(sub.queue)
        for queue in queues:
            self.redispatch(queue)
        return batch

    # -- what storage tells --------------------------------------------------------------------

    def _probed(self, batch, held):
        """The storage answered the probes of subscriptions standing alone for their queues
        (held: the names of those holding messages; None if the store failed)."""
        for name in batch.probes:
            sub = self.queues.get(name)
            if sub is None or sub.__class__ is Queue or sub.queue is not batch:
                continue                    # gone, or probed again since
            if held is not None and name not in held:
                sub.queue = None            # nothing stored: settled as it is
            else:
                self.dispatch(self._queue(name))        # a Queue, to load what is stored

    def _refilled(self, load, messages):
        """The storage answered a refill (messages is None if it failed); ignored unless it
        is the one the queue, still active, waits for."""
        queue = self.queues.get(load.queue)
        if queue.__class__ is not Queue or queue.refilling is not load:
            if self.cluster and messages:
                self._let_go(queue, messages)
            return
        queue.refilling = False
        gone, queue.acked_while_refilling = queue.acked_while_refilling, None
        if self.cluster and gone and messages:
            self._let_go(queue, [m for m in messages if m.seq in gone])
        if messages is None:
            log.error("queue %s: cannot load messages; trying again in %g s",
                      queue.name, REFILL_RETRY)
            self.clock.schedule(Timer(lambda: self.redispatch(queue)),
                                time.monotonic() + REFILL_RETRY)
            return
        if len(messages) == load.limit:
            self._resize(queue)
        queue.loaded = True
        budget = REFILL_BYTES
        for message in messages:
            queue.cursor = message.key
            if (queue.held and message.seq in queue.held) or (gone and message.seq in gone):
                continue
            queue.make_ready(message)
            budget -= message.size
            if budget <= 0:
                break
        else:
            queue.exhausted = len(messages) < load.limit
        self.dispatch(queue)

    def _let_go(self, queue, messages):
        """A cluster node's refill claimed these, and the queue does not take them (they came
        back meanwhile, or the answer is stale): others may have those it does not hold.
        The release rides in the pending batch, before any refill that reads them again."""
        held = queue.held if queue.__class__ is Queue and queue.held else ()
        seqs = [m.seq for m in messages if m.seq not in held]
        if seqs:
            self.storage.release(seqs)

    def _resize(self, queue):
        """A full refill came back: if the queue's consumers took all it had meanwhile (not the
        first refill: it had nothing yet) and want more, the next refill loads more; if much
        is still waiting, fewer again."""
        size = queue.refill_size
        if (queue.loaded and not queue.ready
                and any(_can_take(sub, queue) for sub in queue.subs)):
            size = min(2 * size, REFILL_MAX, max(REFILL_BATCH, REFILL_TOTAL // len(self.queues)))
        elif len(queue.ready) >= size:
            size = max(REFILL_BATCH, size // 2)
        queue.refill_size = size

    def arrived(self, arrivals):
        """Stored messages appeared that no queue put in memory (a de-duplicated SEND once
        stored, a dead letter, a move, delayed ones falling due): from each key on (None:
        anywhere) in each queue named, or anywhere at all (arrivals is None)."""
        if arrivals is None:
            arrivals = dict.fromkeys(self.queues)
        for name, key in arrivals.items():
            entry = self.queues.get(name)
            if entry is None:
                continue                # idle: its next subscriber finds them
            if entry.__class__ is not Queue:
                probe = entry.queue
                if probe is not None and self.storage.pending(probe):
                    continue            # its probe rides in a later batch: it will see them
                if key is None or probe is not None:
                    # Cheap, for a million. (A probe being applied may have looked before
                    # them: another cluster node's, told while this node's batch is out.)
                    entry.queue = self.storage.probe_async(name)
                    continue
            queue = self._queue(name)
            queue.rewind(key, self.storage.restart_load)
            self.dispatch(queue)

    def _unsend(self, messages):
        """Their inserts failed and their senders got an ERROR: those still ready must not be
        delivered (a sender that tries again would cause a duplicate)."""
        failed = {}
        for message in messages:
            failed.setdefault(message.queue, set()).add(message.seq)
        for name, seqs in failed.items():
            queue = self.queues.get(name)
            if queue is None or queue.__class__ is not Queue or not queue.ready:
                continue
            kept = [entry for entry in queue.ready if entry[1].seq not in seqs]
            if len(kept) < len(queue.ready):
                heapq.heapify(kept)
                queue.ready = kept
                queue.held -= seqs

    def fence(self):
        """This cluster node lost its lease: forget every message it held in memory (others
        may deliver them now); its queues load again from the store once it has a lease."""
        for queue in self.queues.values():
            if queue.__class__ is Queue:
                queue.ready, queue.held = [], None
                queue.rewind(None)

    # -- for the admin control destinations ----------------------------------------------------

    def hand_over(self, name, fresh):
        """A purge or move is about to take queue `name`'s stored messages but those with
        seqs in `fresh` (Storage.fresh_seqs): those ready in memory leave it (the store has
        them), those in flight stay. Returns the seqs in flight, for the store to leave
        alone."""
        queue = self.queues.get(name)
        if queue is None or queue.__class__ is not Queue:
            return set()
        ready = {entry[1].seq for entry in queue.ready}
        in_flight = (queue.held or set()) - ready
        queue.ready = [entry for entry in queue.ready if entry[1].seq in fresh]
        heapq.heapify(queue.ready)
        queue.held = in_flight | {entry[1].seq for entry in queue.ready}
        queue.rewind(None)          # what the store keeps is loaded again, in order
        return in_flight


def _ack_id(conn, frame):
    """The message an ACK or NACK names: by `id` in STOMP 1.2, by `message-id` before."""
    key = "id" if conn.version == "1.2" else "message-id"
    message_id = frame.headers.get(key)
    if message_id is None:
        raise ProtocolError("%s needs a %s header" % (frame.command, key))
    return message_id


# ---------------------------------------------------------------------------------------------
# The clock: one greenlet and one heap for everything timed (beanstalkd's prottick, NSQ's
# in-flight heap): ack timeouts, and the store's timed work (Schedule): promoting delayed and
# backed-off messages as they fall due, sweeping expired ones, forgetting old dedup keys. A
# million messages in flight or delayed are never a million greenlets: in flight they are
# heap entries, delayed they are rows in storage and the clock holds only the next due time.
# ---------------------------------------------------------------------------------------------

SWEEP_INTERVAL = 1.0      # seconds between sweeps for expired messages (the issue: at most 5)
SWEEP_BATCH = 1000        # expired messages taken per sweep step
PROMOTE_BATCH = 10000     # due messages made ready per batch
KEYS_INTERVAL = 10.0      # seconds between purges of de-duplication keys past their window
KEYS_BATCH = 10000        # keys forgotten per batch
HEARTBEATS = 5            # a cluster node's heartbeats per lease-timeout
STORE_RETRY = 1.0         # seconds before timed work whose batch failed is tried again
# Delivery counts are held this long before they are written: most messages are ACKed sooner,
# and a consumed message needs no count (Storage.count_delivery). A RECEIPT a consumer asks
# for after a MESSAGE writes them at once (Broker.handle): it means the count is durable too.
COUNT_HOLD = 0.05


class Timer:
    """Something the clock calls once its deadline (time.monotonic()) has come."""
    __slots__ = ("fire", "deadline")

    def __init__(self, function):
        self.fire = function
        self.deadline = None


class Clock:
    """A timer is any object with `deadline` and `fire()` (a Timer, an InFlight). Moving or
    cancelling one leaves a dead entry behind, which the loop skips; many dead entries are
    swept out at once."""

    def __init__(self):
        self._heap = []             # (deadline, n, timer)
        self._ids = itertools.count()
        self._dead = 0              # entries whose timer was moved or cancelled since
        self._wake = gevent.event.Event()
        self._greenlet = None

    def start(self):
        self._greenlet = gevent.spawn(self._run)

    def stop(self):
        if self._greenlet is not None:
            self._greenlet.kill()

    def schedule(self, timer, deadline):
        """Fire `timer` at `deadline`, instead of when it was due to fire before."""
        if timer.deadline == deadline:
            return
        if timer.deadline is not None:
            self._dead += 1
        timer.deadline = deadline
        heap = self._heap
        heapq.heappush(heap, (deadline, next(self._ids), timer))
        if heap[0][2] is timer:
            self._wake.set()        # a new earliest deadline
        if self._dead > 1000 and self._dead > len(heap) // 2:
            self._compact()

    def cancel(self, timer):
        if timer.deadline is not None:
            timer.deadline = None
            self._dead += 1

    def _compact(self):
        live, seen = [], set()
        for entry in self._heap:
            timer = entry[2]
            if timer.deadline == entry[0] and id(timer) not in seen:
                seen.add(id(timer))
                live.append(entry)
        heapq.heapify(live)
        self._heap = live
        self._dead = 0

    def _run(self):
        while True:
            now = time.monotonic()
            while self._heap and self._heap[0][0] <= now:
                deadline, _, timer = heapq.heappop(self._heap)
                if timer.deadline != deadline:
                    self._dead -= 1
                    continue
                timer.deadline = None
                try:
                    timer.fire()
                except Exception:
                    log.exception("timer failed")
            self._wake.clear()
            self._wake.wait(max(0.0, self._heap[0][0] - time.monotonic()) if self._heap
                            else None)


def _monotonic_at(epoch_ms):
    """The time.monotonic() of a wall-clock time in epoch milliseconds."""
    return time.monotonic() + (epoch_ms - pymq_storage.now_ms()) / 1000.0


class Schedule:
    """The store's timed work, each a timer on the clock and one storage request at a time:

    - due messages (delayed, or waiting out a back-off) are made ready when their time comes
      (Promote: one indexed query); the broker knows only the next due time. Queues.arrived
      then rewinds the queues concerned;
    - expired messages are swept out of the store (to their dead-letter queue, or dropped)
      every SWEEP_INTERVAL, SWEEP_BATCH at a time, so that an idle queue's expired message
      goes within seconds; those in flight are left to their consumer;
    - de-duplication keys past their window are forgotten every KEYS_INTERVAL;
    - delivery counts are written COUNT_HOLD after the first one still held."""

    def __init__(self, clock, storage, redelivery):
        self.clock = clock
        self.storage = storage
        self.redelivery = redelivery
        self.next_due = None          # epoch ms of the earliest due time known, or None
        self._promoting = False       # a Promote is out...
        self._noted = None            # ...and the earliest due time noted since it went
        self._promote = Timer(self._start_promote)
        self._sweep = Timer(self._start_sweep)
        self._sweep_after = None      # where the sweep continues, within one round
        self._forget = Timer(self._start_forget)
        self._counts = Timer(storage.release_counts)
        self._beat = Timer(self._start_heartbeat)
        self.changed_counts = dict    # the broker's: subscription counts changed since

    def start(self):
        # What fell due while the broker was down goes first; the answer says what is next.
        self._start_promote()
        self.clock.schedule(self._sweep, time.monotonic())
        self.clock.schedule(self._forget, time.monotonic() + KEYS_INTERVAL)
        if self.storage.backend.cluster:
            self._start_heartbeat()

    def note_due(self, due):
        """A message waits in storage until `due` (epoch ms)."""
        if self._promoting:
            if self._noted is None or due < self._noted:
                self._noted = due
        elif self.next_due is None or due < self.next_due:
            self.next_due = due
            self.clock.schedule(self._promote, _monotonic_at(due))

    def counted(self):
        """A delivery count is held: written within COUNT_HOLD."""
        if self._counts.deadline is None:
            self.clock.schedule(self._counts, time.monotonic() + COUNT_HOLD)

    def _start_promote(self):
        self._promoting, self._noted = True, None
        self.storage.promote_async(pymq_storage.now_ms(), PROMOTE_BATCH, self._promoted)

    def _promoted(self, op):
        self._promoting = False
        if op.result is None:
            self.next_due = pymq_storage.now_ms() + int(STORE_RETRY * 1000)
        else:
            _, promoted, left = op.result
            self.next_due = pymq_storage.now_ms() if promoted == op.limit else left
        if self._noted is not None and (self.next_due is None or self._noted < self.next_due):
            self.next_due = self._noted
        if self.next_due is not None:
            self.clock.schedule(self._promote, _monotonic_at(self.next_due))

    def _start_sweep(self):
        self.storage.expired_async(pymq_storage.now_ms(), self._sweep_after, SWEEP_BATCH,
                                   self._swept)

    def _swept(self, read, messages):
        delay = SWEEP_INTERVAL
        if messages is None:
            delay = STORE_RETRY
        else:
            self.redelivery.expired_found(messages)
            if len(messages) == read.limit:
                last = messages[-1]
                self._sweep_after, delay = (last.expires, last.seq), 0.0
            else:
                self._sweep_after = None
        self.clock.schedule(self._sweep, time.monotonic() + delay)

    def _start_heartbeat(self):
        self.storage.heartbeat_async(self.changed_counts(), self._beaten)

    def _beaten(self, op):
        """A cluster node renews its lease HEARTBEATS times per lease-timeout (Storage keeps
        the lease)."""
        interval = self.storage.backend.lease_timeout / HEARTBEATS
        self.clock.schedule(self._beat, time.monotonic() + interval)

    def _start_forget(self):
        self.storage.forget_keys_async(pymq_storage.now_ms(), KEYS_BATCH, self._forgot)

    def _forgot(self, op):
        more = op.result is not None and op.result == op.limit
        self.clock.schedule(self._forget, time.monotonic() + (0.0 if more else KEYS_INTERVAL))


# ---------------------------------------------------------------------------------------------
# The message's life after a delivery: what happens to a message that comes back (NACK, ack
# timeout, UNSUBSCRIBE, connection lost), with the redelivery policy (max redeliveries, back-off)
# and dead-letter queues; expiry; lease extension. And the SEND headers that set all this.
# ---------------------------------------------------------------------------------------------

# How a message came back.
NACKED, REJECTED, TIMED_OUT, LOST = "nacked", "rejected", "timed out", "lost"
# Why a message is dead-lettered (its dead-letter-reason header).
MAX_REDELIVERIES, EXPIRED = "max-redeliveries", "expired"
DEAD_LETTER_HEADERS = ("original-destination", "dead-letter-reason", "original-redelivery-count")
DEAD_LETTER_PREFIX = "DLQ."     # queue Q's dead letters go to DLQ.Q, unless the SEND says
# SEND headers, with the peers' spellings (RabbitMQ's delayed-message plugin, ActiveMQ's
# scheduler, RabbitMQ's per-message TTL).
DELAY_HEADERS = ("delay", "x-delay", "AMQ_SCHEDULED_DELAY")
TTL_HEADERS = ("ttl", "expiration")
MAX_MS = 10 ** 15           # about 31,000 years: a bound on any time in milliseconds
_TASK_HEADERS = frozenset(DELAY_HEADERS + TTL_HEADERS + (
    "deliver-at", "expires", "redelivery-delay", "max-redeliveries", "dead-letter-queue",
    "dedup-id"))


def _milliseconds(headers, names, what):
    """The value of the first of the header `names` present, a non-negative number of
    milliseconds, rounded up; None if none is present."""
    for name in names:
        value = headers.get(name)
        if value is not None:
            try:
                number = float(value)
            except ValueError:
                number = -1.0
            if not 0 <= number < MAX_MS:      # NaN fails this too
                raise ProtocolError("%s must be %s, not %r" % (name, what, value[:30]))
            return math.ceil(number)
    return None


def _send_options(headers):
    """(priority, ack_timeout, due, expires, dedup_key) of a queue SEND; ProtocolError if a
    header is invalid (the redelivery policy's ones are checked here too, and read again when
    the message comes back)."""
    priority = headers.get("priority", DEFAULT_PRIORITY)
    if not (priority.isascii() and priority.isdigit() and len(priority.lstrip("0")) <= 1):
        raise ProtocolError("priority must be an integer from 0 to 9, not %r" % priority[:20])
    priority = int(priority.lstrip("0") or "0")
    try:
        ack_timeout = float(headers.get("ack-timeout", 0))
    except ValueError:
        ack_timeout = -1.0
    if not 0 <= ack_timeout < 1e9:
        raise ProtocolError("ack-timeout must be a number of seconds, not %r"
                            % headers["ack-timeout"][:20])
    if _TASK_HEADERS.isdisjoint(headers):
        return priority, ack_timeout, 0, 0, None        # the common case, at C speed
    delay = _milliseconds(headers, DELAY_HEADERS, "a number of milliseconds")
    deliver_at = _milliseconds(headers, ("deliver-at",), "a time in epoch milliseconds")
    ttl = _milliseconds(headers, TTL_HEADERS, "a number of milliseconds")
    expires = _milliseconds(headers, ("expires",), "a time in epoch milliseconds (0: never)")
    expires = expires or 0
    due = 0
    if delay or deliver_at or ttl is not None:
        now = pymq_storage.now_ms()
        # Not before any of the times given, nor after any.
        due = max(now + (delay or 0), deliver_at or 0)
        due = 0 if due <= now else due
        if ttl is not None:
            expires = min(expires, now + ttl) if expires else now + ttl
    _milliseconds(headers, ("redelivery-delay",), "a number of milliseconds")
    limit = headers.get("max-redeliveries")
    if limit is not None and not (limit.isascii() and limit.isdigit() and len(limit) < 10):
        raise ProtocolError("max-redeliveries must be a non-negative integer, not %r"
                            % limit[:30])
    target = headers.get("dead-letter-queue")
    if target is not None and parse_destination(target)[0] != "queue":
        raise ProtocolError("dead-letter-queue must be a /queue/ destination, not %r"
                            % target[:100])
    dedup_key = headers.get("dedup-id")
    if dedup_key == "":
        raise ProtocolError("dedup-id must not be empty")
    return priority, ack_timeout, due, expires, dedup_key


def _nack_options(frame):
    """(how, delay in ms or None) of a NACK: requeue:false (RabbitMQ's) rejects; delay:MS."""
    headers = frame.headers
    delay = _milliseconds(headers, ("delay",), "a number of milliseconds")
    requeue = headers.get("requeue", "true").lower()
    if requeue not in ("true", "false"):
        raise ProtocolError("requeue must be true or false, not %r" % headers["requeue"][:20])
    return (REJECTED if requeue == "false" else NACKED), delay


def _header(message, name):
    for key, value in message.headers:
        if key == name:
            return value
    return None


class Redelivery:
    """What happens to a message that comes back, in one place:

    - NACK with requeue:false -> its dead-letter queue (reason rejected);
    - delivered max-redeliveries + 1 times already -> its dead-letter queue (max-redeliveries);
      a lost connection counts as a delivery too, so a job that kills its worker every time
      gets there as well;
    - NACK with delay:MS -> back after MS; NACK or ack timeout -> back after the back-off
      (redelivery-delay, doubled each time, at most max-redelivery-delay), or at once;
    - UNSUBSCRIBE, connection lost -> back at once, to another consumer if one is ready.

    A dead letter is never dead-lettered again (nor does it expire). Waiting out a back-off,
    a message is in storage only, like a delayed one."""

    def __init__(self, options, queues):
        self.options = options
        self.queues = queues
        self.storage = None           # given at start (Broker.start)
        self.schedule = None

    # -- coming back ---------------------------------------------------------------------------

    def nack(self, conn, frame):
        how, delay = _nack_options(frame)
        covered = self.queues.acked(conn, frame)
        self.queues.stats["nacked"] += len(covered)
        for queue in {self.came_back(in_flight, how, delay) for in_flight in covered}:
            self.queues.redispatch(queue)

    def timed_out(self, in_flight):
        log.debug("message %d: ack timeout", in_flight.message.seq)
        self.queues.stats["ack_timeouts"] += 1
        self.queues.redispatch(self.came_back(in_flight, TIMED_OUT))

    def came_back(self, in_flight, how, delay=None):
        """Take the message out of flight and decide where it goes; returns its Queue (to
        dispatch again)."""
        sub = self.queues.land(in_flight)
        queue, message = sub.queue, in_flight.message
        if not message.dead_letter:
            if how == REJECTED:
                self.dead_letter(queue, message, REJECTED)
                return queue
            limit = self.max_redeliveries(message)
            if limit and message.deliveries > limit:
                self.dead_letter(queue, message, MAX_REDELIVERIES)
                return queue
        if delay is None and how != LOST:
            delay = self.back_off(message)
        if delay:
            self.defer(queue, message, delay)
        else:
            self.storage.update(message)    # its count, before any reload of it
            self.queues.requeue(queue, message, sub.conn)
        return queue

    def max_redeliveries(self, message):
        limit = _header(message, "max-redeliveries")
        return self.options.max_redeliveries if limit is None else int(limit)

    def back_off(self, message):
        """Milliseconds before the next redelivery: the first one waits redelivery-delay,
        each further one twice as long as the last, up to max-redelivery-delay."""
        first = _header(message, "redelivery-delay")
        first = self.options.redelivery_delay if first is None else math.ceil(float(first))
        if not first:
            return 0
        doublings = min(max(message.deliveries - 1, 0), 64)
        return min(first * 2 ** doublings, self.options.max_redelivery_delay)

    def defer(self, queue, message, delay):
        """The message waits in storage, held by no consumer, until `delay` ms from now."""
        message.due = pymq_storage.now_ms() + delay
        queue.release(message.seq)
        self.storage.update(message)
        self.schedule.note_due(message.due)

    def dead_letter(self, queue, message, reason):
        """Move the message to its dead-letter queue (one commit: it is in exactly one of the
        two after any crash), or drop it if it expired and --drop-expired says so. `queue` is
        its Queue, or None if it is not in memory."""
        if queue is not None:
            queue.release(message.seq)
        if reason == EXPIRED:
            self.queues.stats["expired"] += 1
            if self.options.drop_expired:
                self.storage.delete(message.seq)
                return
        target = _header(message, "dead-letter-queue")
        target = (DEAD_LETTER_PREFIX + message.queue if target is None
                  else parse_destination(target)[1])
        headers = [pair for pair in message.headers if pair[0] not in DEAD_LETTER_HEADERS]
        headers += [("original-destination", "/queue/" + message.queue),
                    ("dead-letter-reason", reason),
                    ("original-redelivery-count", str(max(message.deliveries - 1, 0)))]
        self.storage.dead_letter(message, target, headers)
        self.queues.stats["dead_lettered"] += 1
        log.debug("message %d: dead-lettered from %s to %s (%s)", message.seq, message.queue,
                  target, reason)

    def expired_found(self, messages):
        """The sweep found these expired in storage (without bodies). Those in memory and in
        flight stay with their consumer; those ready in memory leave the buffer."""
        by_queue = {}
        for message in messages:
            by_queue.setdefault(message.queue, []).append(message)
        for name, found in by_queue.items():
            queue = self.queues.queues.get(name)
            if queue.__class__ is not Queue:
                for message in found:
                    self.dead_letter(None, message, EXPIRED)
                continue
            ready = {entry[1].seq: entry[1] for entry in queue.ready}
            doomed = set()
            for message in found:
                if message.seq in ready:
                    doomed.add(message.seq)
                elif not (queue.held and message.seq in queue.held):
                    self.dead_letter(queue, message, EXPIRED)
            if doomed:
                queue.ready = [entry for entry in queue.ready if entry[1].seq not in doomed]
                heapq.heapify(queue.ready)
                for seq in doomed:
                    self.dead_letter(queue, ready[seq], EXPIRED)
                self.queues.redispatch(queue)

    # -- lease extension -----------------------------------------------------------------------

    def touch(self, conn, message_id, timeout):
        """Extend the ack timeout of a message in flight on `conn` to `timeout` seconds from
        now (None: its own timeout); False if it is not in flight there. Not a redelivery."""
        in_flight = conn.in_flight.get(message_id)
        if in_flight is None:
            return False
        if timeout is None:
            timeout = in_flight.message.ack_timeout or self.options.ack_timeout
        if timeout:
            self.queues.clock.schedule(in_flight, time.monotonic() + timeout)
        return True


# ---------------------------------------------------------------------------------------------
# Control destinations: a SEND to /control/... is a request, answered in the headers of its
# RECEIPT (ocamlmq's count-msgs and count-subscribers; purge, move and touch are pymq's). Until
# users and permissions exist, any connected client may use them all.
# ---------------------------------------------------------------------------------------------

class Control:
    def __init__(self, broker):
        self.broker = broker
        # (destination prefix, handler of the rest of the name)
        self._routes = (("count-subscribers/topic/", self.count_topic_subscribers),
                        ("count-subscribers/queue/", self.count_queue_subscribers),
                        ("count-msgs/queue/", self.count_messages),
                        ("purge/queue/", self.purge),
                        ("move/queue/", self.move))

    def rights(self, name, frame):
        """[(right, destination)] that a user needs for this control SEND (see Auth); "read"
        is also granted by "admin" here (who administers a queue may count it)."""
        for prefix, right in (("count-subscribers/", "read"), ("count-msgs/", "read"),
                              ("purge/", "admin"), ("move/", "admin")):
            if name.startswith(prefix):
                wanted = [(right, "/" + name[len(prefix):])]
                if prefix == "move/" and frame.headers.get("to"):
                    # Replaying a dead-letter queue into a queue one may write to is fine.
                    wanted.append(("write", frame.headers["to"]))
                return wanted
        return []       # touch (one's own message), or unknown (refused by handle())

    def handle(self, conn, name, frame):
        if name == "touch":
            return self.touch(conn, frame)
        for prefix, handler in self._routes:
            if name.startswith(prefix) and len(name) > len(prefix):
                return handler(name[len(prefix):], frame)
        raise ProtocolError("unknown control destination /control/%s" % name[:100])

    def count_topic_subscribers(self, topic, frame):
        return self._subscribers(len(self.broker.topics.matching(topic)), "/topic/" + topic)

    def count_queue_subscribers(self, queue, frame):
        return self._subscribers(self.broker.queues.count_subscribers(queue), "/queue/" + queue)

    def _subscribers(self, here, destination):
        """A cluster node adds the other nodes' subscriptions, as their last heartbeats
        published them."""
        if self.broker.queues.cluster:
            here += self._stored(self.broker.storage.subscribers_elsewhere, [destination])
        return {"num-subscribers": str(here)}

    def count_messages(self, queue, frame):
        """Stored and not ACKed (in flight and delayed included, expired never); of them,
        those not yet due."""
        messages, delayed = self.broker.storage.count(queue)
        return {"num-messages": str(messages), "num-delayed": str(delayed)}

    def purge(self, queue, frame):
        """Delete the queue's stored messages, but those in flight."""
        storage = self.broker.storage
        fresh = storage.fresh_seqs()
        keep = self.broker.queues.hand_over(queue, fresh)
        purged = self._stored(storage.purge, queue, keep, fresh)
        self._redispatch(queue)
        return {"num-purged": str(purged)}

    def move(self, source, frame):
        """Move up to `max` of the queue's stored messages (but those in flight), oldest
        first, to the queue `to`, fresh: for replaying a dead-letter queue."""
        headers = frame.headers
        to = headers.get("to")
        if to is None:
            raise ProtocolError("/control/move needs a to header: the queue to move to")
        kind, target = parse_destination(to)
        if kind != "queue" or target == source:
            raise ProtocolError("to must be another /queue/ destination, not %r" % to[:100])
        limit = headers.get("max")
        if limit is not None:
            if not (limit.isascii() and limit.isdigit() and len(limit) < 19):
                raise ProtocolError("max must be a non-negative integer, not %r" % limit[:30])
            limit = int(limit)
        storage = self.broker.storage
        fresh = storage.fresh_seqs()
        keep = self.broker.queues.hand_over(source, fresh)
        moved = self._stored(storage.move, source, target, limit, keep, fresh)
        self._redispatch(source)
        return {"num-moved": str(moved)}

    def touch(self, conn, frame):
        """Extend the ack timeout of a message in flight on this connection."""
        headers = frame.headers
        message_id = headers.get("message-id", headers.get("ack"))
        if message_id is None:
            raise ProtocolError("/control/touch needs a message-id (or ack) header")
        timeout = headers.get("ack-timeout")
        if timeout is not None:
            try:
                timeout = float(timeout)
            except ValueError:
                timeout = -1.0
            if not 0 < timeout < 1e9:
                raise ProtocolError("ack-timeout must be a positive number of seconds, not %r"
                                    % headers["ack-timeout"][:20])
        touched = self.broker.redelivery.touch(conn, message_id, timeout)
        return {"touched": "true" if touched else "false"}

    @staticmethod
    def _stored(operation, *args):
        try:
            return operation(*args)
        except pymq_storage.StorageError as error:
            raise ProtocolError("not done: %s" % error)

    def _redispatch(self, name):
        queue = self.broker.queues.queues.get(name)
        if queue.__class__ is Queue:
            self.broker.queues.redispatch(queue)


# ---------------------------------------------------------------------------------------------
# Users and permissions: who may connect (--users FILE, --login/--passcode, a client
# certificate), and what each may do. A user has three lists of destination globs: read
# (SUBSCRIBE, and counting), write (SEND), admin (purge, move). A connection's `user` is None
# when it may do everything (no users configured, or the --login user): the common case costs
# one attribute test per frame.
# ---------------------------------------------------------------------------------------------

SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}     # 16 MiB and ~50 ms per hash: slow to guess
LOGIN_FAILURE_DELAY = 1.0   # seconds before a failed login's ERROR: guessing is slow
RIGHTS = ("read", "write", "admin")


def scrypt(password, salt, n, r, p, dklen, maxmem=0):
    """hashlib.scrypt, or where hashlib has none (PyPy 3.9) the OpenSSL function it calls,
    through ctypes. Either releases the GIL while it works."""
    import hashlib
    if hasattr(hashlib, "scrypt"):
        return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=maxmem)
    import ctypes
    key = ctypes.create_string_buffer(dklen)
    if _openssl_scrypt()(password, len(password), salt, len(salt), n, r, p, maxmem, key,
                         dklen) != 1:
        raise ValueError("scrypt: invalid parameters or out of memory")
    return key.raw


@functools.lru_cache(maxsize=None)
def _openssl_scrypt():
    """libcrypto's EVP_PBE_scrypt, looked up once (find_library runs ldconfig)."""
    import ctypes
    import ctypes.util
    size, u64 = ctypes.c_size_t, ctypes.c_uint64
    function = ctypes.CDLL(ctypes.util.find_library("crypto")).EVP_PBE_scrypt
    function.argtypes = [ctypes.c_char_p, size, ctypes.c_char_p, size, u64, u64, u64, u64,
                         ctypes.c_char_p, size]
    return function


def hash_password(password, salt=None):
    """'scrypt$N$R$P$SALT$HASH' (base64), the form a users file holds."""
    import base64
    salt = salt or os.urandom(16)
    digest = scrypt(password.encode(), salt, dklen=32, **SCRYPT)
    return "scrypt$%d$%d$%d$%s$%s" % (SCRYPT["n"], SCRYPT["r"], SCRYPT["p"],
                                      base64.b64encode(salt).decode(),
                                      base64.b64encode(digest).decode())


def check_password_hash(encoded):
    """Raise ValueError unless `encoded` is a hash verify_password() reads: scrypt$N$R$P$SALT$HASH
    or pbkdf2_sha256$ITERATIONS$SALT$HASH (Django's form, for hashes made elsewhere)."""
    import base64
    parts = encoded.split("$")
    try:
        if parts[0] == "scrypt" and len(parts) == 6:
            numbers, encoded_bytes = parts[1:4], parts[4:]
        elif parts[0] == "pbkdf2_sha256" and len(parts) == 4:
            numbers, encoded_bytes = parts[1:2], parts[3:]     # the salt is text
        else:
            raise ValueError
        if not all(n.isdigit() and 0 < int(n) < 2 ** 31 for n in numbers):
            raise ValueError
        for part in encoded_bytes:
            base64.b64decode(part, validate=True)
    except ValueError:
        raise ValueError("not a password hash (make one with: pymq hash-password)")


def verify_password(password, encoded):
    """Whether `password` matches `encoded` (checked by check_password_hash). Slow on purpose;
    hashlib releases the GIL, so it runs in a thread while the hub goes on."""
    import base64
    import hashlib
    parts = encoded.split("$")
    if parts[0] == "scrypt":
        n, r, p = (int(x) for x in parts[1:4])
        salt, expected = base64.b64decode(parts[4]), base64.b64decode(parts[5])
        digest = scrypt(password.encode(), salt, n, r, p, len(expected),
                        maxmem=256 * n * r + (1 << 20))
    else:
        iterations = int(parts[1])
        # Django keeps the salt as text and the hash in base64.
        salt, expected = parts[2].encode(), base64.b64decode(parts[3])
        digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations,
                                     len(expected))
    return hmac.compare_digest(digest, expected)


class User:
    """A user of the users file: a password hash (None: certificate login only) and, per
    right, one regular expression made of its globs (None: no destination)."""
    __slots__ = ("name", "password", "read", "write", "admin", "_prefixes")

    def __init__(self, name, password=None, read=(), write=(), admin=()):
        self.name = name
        self.password = password
        for right, globs in zip(RIGHTS, (read, write, admin)):
            pattern = "|".join(fnmatch.translate(glob) for glob in globs)
            setattr(self, right, re.compile(pattern) if globs else None)
        # For /topic/PREFIX* subscriptions: the read globs that are a plain prefix and a '*'.
        self._prefixes = tuple(glob[:-1] for glob in read
                               if glob.endswith("*") and not _has_wildcard(glob[:-1]))

    def may(self, right, destination):
        pattern = getattr(self, right)
        return pattern is not None and pattern.match(destination) is not None

    def may_subscribe(self, destination):
        """A prefix subscription (/topic/P*) receives every topic starting with P, so a glob
        that merely matches the text "/topic/P*" is not enough: some read glob must cover the
        whole prefix."""
        if destination.startswith("/topic/") and destination.endswith("*"):
            prefix = destination[:-1]
            return any(prefix.startswith(allowed) for allowed in self._prefixes)
        return self.may("read", destination)

    def __eq__(self, other):
        return (isinstance(other, User) and self.name == other.name
                and self.password == other.password
                and all(getattr(self, r) == getattr(other, r) for r in RIGHTS))

    __hash__ = None


def _has_wildcard(text):
    return any(c in text for c in "*?[")


def read_users(path):
    """{name: User} from a users file: INI, a section per user with `password` (a hash) and
    `read`, `write`, `admin` (destination globs, separated by spaces or commas). Raises
    ValueError saying what is wrong and where."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none",
                                       inline_comment_prefixes=(";", "#"))
    try:
        with open(path) as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as error:
        raise ValueError("cannot read users file %s: %s" % (path, error))
    users = {}
    for name in parser.sections():
        section = parser[name]
        unknown = set(section) - {"password", *RIGHTS}
        if unknown:
            raise ValueError("users file %s, user %s: unknown key %s (keys: password, read, "
                             "write, admin)" % (path, name, ", ".join(sorted(unknown))))
        password = section.get("password") or None
        if password is not None:
            try:
                check_password_hash(password)
            except ValueError as error:
                raise ValueError("users file %s, user %s: password is %s" % (path, name, error))
        globs = {right: section.get(right, "").replace(",", " ").split() for right in RIGHTS}
        for right, patterns in globs.items():
            for glob in patterns:
                if not glob.startswith("/"):
                    raise ValueError("users file %s, user %s: %s pattern %r is not a "
                                     "destination (/queue/..., /topic/...)"
                                     % (path, name, right, glob))
        users[name] = User(name, password, **globs)
    return users


class Auth:
    """Logins and permissions: who a CONNECT is, and whether a frame is allowed."""

    def __init__(self, options, stats):
        self.options = options
        self.stats = stats
        self.users = None       # {name: User} from the users file, if there is one
        # A passcode that passed the slow check, remembered as a keyed digest, so that a
        # reconnecting client does not cost 50 ms of hashing each time.
        self._key = os.urandom(32)
        self._verified = {}     # login -> (password hash, digest of the passcode)

    def load(self):
        if self.options.users:
            self.users = read_users(self.options.users)

    def login(self, conn, headers):
        """The User the CONNECT `headers` authenticate, or None for one who may do
        everything. Raises ProtocolError (delayed) for bad credentials."""
        opts = self.options
        login, passcode = headers.get("login"), headers.get("passcode")
        if conn.cert_login is not None:
            if login is not None and login != conn.cert_login:
                return self._refuse(conn, login, "login differs from the certificate's CN %r"
                                    % conn.cert_login)
            login, passcode = conn.cert_login, None
        if self.users is None and opts.login is None and opts.passcode is None:
            return None                             # nobody configured: everyone may
        user = self.users.get(login) if self.users is not None and login is not None else None
        if user is not None:
            if conn.cert_login is not None or self._password_ok(user, passcode):
                return user
        elif opts.login is not None or opts.passcode is not None:
            # The one-user shortcut (it may do everything).
            if (login == conn.cert_login and login == opts.login) or (
                    _credential_ok(opts.login, login) and _credential_ok(opts.passcode, passcode)):
                return None
        return self._refuse(conn, login, "bad credentials")

    def _password_ok(self, user, passcode):
        if user.password is None or passcode is None:
            return False
        digest = hmac.new(self._key, passcode.encode(), "sha256").digest()
        known = self._verified.get(user.name)
        if known is not None and known[0] == user.password:
            return hmac.compare_digest(known[1], digest)
        if not gevent.get_hub().threadpool.apply(verify_password, (passcode, user.password)):
            return False
        self._verified[user.name] = (user.password, digest)
        return True

    def _refuse(self, conn, login, why):
        self.stats["logins_refused"] += 1
        log.warning("%s: login refused for %s: %s", conn.peer,
                    "%r" % login[:100] if login is not None else "(no login)", why)
        raise ProtocolError("bad credentials", delay=LOGIN_FAILURE_DELAY)

    def authorize(self, conn, frame, control):
        """Raise ProtocolError "access refused" unless conn.user may carry out `frame` (a SEND
        or a SUBSCRIBE), before it touches anything."""
        user = conn.user
        destination = frame.headers.get("destination")
        kind, name = parse_destination(destination)
        if frame.command == "SUBSCRIBE":
            allowed = kind == "control" or user.may_subscribe(destination)
            wanted = [("read", destination)]
        elif kind == "control":
            wanted = control.rights(name, frame)
            allowed = all(user.may(right, target) or (right == "read"
                                                      and user.may("admin", target))
                          for right, target in wanted)
        else:
            wanted = [("write", destination)]
            allowed = user.may("write", destination)
        if not allowed:
            self.stats["access_refused"] += 1
            right, target = next((r, t) for r, t in wanted if not user.may(r, t))
            raise ProtocolError("access refused: %s may not %s %s"
                                % (user.name, right, target[:200]))

    def reload(self, connections):
        """Read the users file again (SIGHUP). New and changed users apply to new connections;
        the connections of users no longer in the file are closed. A file that does not
        parse is refused and the old one kept."""
        if not self.options.users:
            log.info("SIGHUP: no users file to reload")
            return
        try:
            users = read_users(self.options.users)
        except ValueError as error:
            log.error("users file not reloaded, the old one is kept: %s", error)
            return
        old, self.users = self.users, users
        self._verified.clear()
        changed = [name for name in users if old.get(name) != users[name]]
        removed = [name for name in old if name not in users]
        log.info("users file %s reloaded: %d users, %d new or changed, %d removed",
                 self.options.users, len(users), len(changed), len(removed))
        for conn in list(connections):
            if conn.user is not None and conn.user.name not in users:
                conn.abort("access revoked: user %s was removed" % conn.user.name)


# ---------------------------------------------------------------------------------------------
# Broker: the one shared object, the glue. It routes each frame to topics, queues, the
# message's life or control destinations; owns connections' sessions and transactions; never
# touches a socket: it calls Connection.send(), send_receipt() and close(), and the storage.
# ---------------------------------------------------------------------------------------------

MAX_TRANSACTION_FRAMES = 10000   # bounds the memory a client can park in an open transaction


class Broker:
    def __init__(self, options=None, storage=None):
        self.options = options or Options()
        self.storage = storage
        self.connections = set()
        self.recv_buffer = memoryview(bytearray(RECV_SIZE))   # shared by connections' readers
        self._sessions = itertools.count(1)
        # Session ids and topic message ids: unique across restarts, each start has its own
        # prefix. Queue message ids are the stored sequence numbers, unique across restarts too.
        self._id_prefix = "%x-" % time.time_ns()
        self.stats = dict.fromkeys(("connections", "messages_in", "messages_out", "redelivered",
                                    "dead_lettered", "expired", "protocol_errors",
                                    "slow_consumers", "refused", "tls_failures", "acked",
                                    "nacked", "ack_timeouts", "logins_refused",
                                    "access_refused"), 0)
        self.subscription_counts = {"queue": 0, "topic": 0}     # now, by kind
        self.clock = Clock()
        self.topics = Topics(self._id_prefix, self.stats)
        self.queues = Queues(self.options, self.clock, self.stats)
        self.redelivery = Redelivery(self.options, self.queues)
        self.queues.redelivery = self.redelivery
        self.schedule = None
        self.control = Control(self)
        self.auth = Auth(self.options, self.stats)
        self._handlers = {
            "SEND": self.on_send, "SUBSCRIBE": self.on_subscribe,
            "UNSUBSCRIBE": self.on_unsubscribe, "ACK": self.queues.ack,
            "NACK": self.redelivery.nack, "BEGIN": self.on_begin, "COMMIT": self.on_commit,
            "ABORT": self.on_abort, "DISCONNECT": self.on_disconnect,
        }
        self.drained = self.queues.drained      # a connection's backlog was written
        self._counts_changed = set()    # a cluster node's destinations whose count changed

    def start(self):
        self.auth.load()
        storage = self.storage
        self.queues.storage = self.redelivery.storage = storage
        self.schedule = Schedule(self.clock, storage, self.redelivery)
        self.schedule.changed_counts = self._changed_counts
        self.queues.schedule = self.redelivery.schedule = self.schedule
        storage.on_insert_failed = self.queues._unsend
        storage.on_probed = self.queues._probed
        storage.on_arrived = self.queues.arrived
        storage.on_topic = self._topic_from_node
        storage.on_due = self.schedule.note_due
        self.queues.cluster = storage.backend.cluster
        self.clock.start()
        self.schedule.start()

    def stop(self):
        self.clock.stop()

    def _topic_from_node(self, topic, headers, body):
        """Another cluster node's topic message, for the subscribers here."""
        self.topics.publish(topic, Frame("SEND", dict(headers), body))

    # -- connections -------------------------------------------------------------------------

    def handle(self, conn, frame):
        """Carry out one frame from `conn` and send the RECEIPT it asks for: at once, with any
        headers the handler answered (control destinations), once the Batch the handler
        returned is durable (ACKs, COMMITs), or, for a queue SEND (the handler answers
        (batch, message)), once the message is durable or ACKed by a consumer, whichever
        comes first. Raises ProtocolError for the connection to report."""
        try:
            if conn.version is None:
                if frame.command not in ("CONNECT", "STOMP"):
                    raise ProtocolError("expected a CONNECT frame, got %s" % frame.command[:100])
                return self.on_connect(conn, frame)
            handler = self._handlers.get(frame.command)
            if handler is None:
                if frame.command in ("CONNECT", "STOMP"):
                    raise ProtocolError("already connected")
                raise ProtocolError("unknown command %r" % frame.command[:100])
            if conn.user is not None and frame.command in ("SEND", "SUBSCRIBE"):
                self.auth.authorize(conn, frame, self.control)
            tx = frame.headers.get("transaction")
            if tx is not None and frame.command in ("SEND", "ACK", "NACK"):
                # Checked now, so that COMMIT cannot fail half-way: all or nothing.
                if frame.command == "SEND":
                    kind, _ = parse_destination(frame.headers.get("destination"))
                    if kind == "queue":
                        _send_options(frame.headers)
                    elif kind == "control":
                        raise ProtocolError("a /control/ destination cannot be in a transaction")
                else:
                    _ack_id(conn, frame)
                    if frame.command == "NACK":
                        _nack_options(frame)
                self._in_transaction(conn, tx).append(frame)
                answer = None
            else:
                answer = handler(conn, frame)
            receipt = frame.headers.get("receipt")
            if receipt is None:
                return
            # A RECEIPT a consumer asks for after a MESSAGE means the message's delivery count
            # is durable too: it waits for the batch the held counts go into (batches commit
            # in order, so that one last). Only a connection with messages in flight needs it
            # (a producer's receipts would write counts an ACK was about to make useless).
            counts = self.storage.release_counts() if conn.in_flight else None
            if frame.command != "DISCONNECT":
                headers = {"receipt-id": receipt}
                if isinstance(answer, dict):
                    headers.update(answer)
                    answer = None
                elif isinstance(answer, tuple):
                    conn.send_receipt(headers, after=counts or answer[0], message=answer[1])
                    return
                conn.send_receipt(headers, after=counts or answer)
        except ProtocolError as error:
            if error.receipt is None:
                error.receipt = frame.headers.get("receipt")
            raise

    def on_connect(self, conn, frame):
        headers = frame.headers
        version = negotiate_version(headers.get("accept-version"))
        opts = self.options
        conn.user = self.auth.login(conn, headers)
        send_ms, recv_ms = negotiate_heart_beat(headers.get("heart-beat"), opts.heart_beat_ms,
                                                version)
        conn.session = "%s%d" % (self._id_prefix, next(self._sessions))
        self.connections.add(conn)
        self.stats["connections"] += 1
        conn.start_session(version, send_ms, recv_ms)
        conn.send_frame("CONNECTED", {"version": version, "server": SERVER_NAME,
                                      "session": conn.session,
                                      "heart-beat": "%d,%d" % (send_ms, recv_ms)})

    def disconnected(self, conn):
        """The connection is gone (for whatever reason): forget everything it had; its messages
        in flight go back to their queues at once."""
        for sub in list(conn.subscriptions.values()):
            self._remove_subscription(sub)
        conn.subscriptions.clear()
        conn.transactions.clear()
        self.connections.discard(conn)

    def on_disconnect(self, conn, frame):
        # Forget the connection before the RECEIPT goes out: a client holding it can rely on
        # its subscriptions being gone and its unacknowledged messages being back in the queue.
        self.disconnected(conn)
        receipt = frame.headers.get("receipt")
        if receipt is not None:
            # ... and on everything it sent being stored, SENDs without receipt included.
            conn.send_receipt({"receipt-id": receipt}, after=self.storage.barrier())
        conn.close()

    # -- frames --------------------------------------------------------------------------------

    def on_send(self, conn, frame):
        kind, name = parse_destination(frame.headers.get("destination"))
        self.stats["messages_in"] += 1
        if kind == "topic":
            if self.queues.cluster:
                # The other nodes' subscribers too: with the next batch, in order.
                headers = [(k, v) for k, v in frame.headers.items() if k not in _NOT_FORWARDED]
                try:
                    self.storage.publish(name, headers, frame.body)
                except pymq_storage.StorageError as error:
                    raise ProtocolError("message not sent: %s" % error)
            self.topics.publish(name, frame)
        elif kind == "control":
            return self.control.handle(conn, name, frame)
        else:
            return self.queues.enqueue(name, frame)

    def on_subscribe(self, conn, frame):
        headers = frame.headers
        destination = headers.get("destination")
        kind, name = parse_destination(destination)
        if kind == "control":
            raise ProtocolError("cannot subscribe to a /control/ destination")
        sub_id = headers.get("id", destination)    # 1.0 clients may omit the id
        ack = ACK_MODES.get(headers.get("ack", self.options.default_ack))
        if ack is None:
            raise ProtocolError("unknown ack mode %r" % headers["ack"][:100])
        existing = conn.subscriptions.get(sub_id)
        if existing is None and len(conn.subscriptions) >= self.options.max_subscriptions:
            raise ProtocolError("too many subscriptions on one connection (max-subscriptions "
                                "is %d)" % self.options.max_subscriptions)
        if existing is not None:
            if existing.destination != destination:
                raise ProtocolError("subscription id %r is already in use" % sub_id[:100])
            self._remove_subscription(existing)     # re-subscribing replaces, e.g. the ack mode
        if kind == "queue":
            sub = self.queues.subscribe(conn, sub_id, name, ack, headers)
        else:
            sub = self.topics.subscribe(conn, sub_id, name, ack)
        conn.subscriptions[sub.id] = sub
        if self.queues.cluster:
            self._counts_changed.add(destination)
        self.subscription_counts[sub.kind] += 1

    def on_unsubscribe(self, conn, frame):
        headers = frame.headers
        sub = None
        if "id" in headers:
            sub = conn.subscriptions.get(headers["id"])
        elif "destination" in headers:
            destination = headers["destination"]
            sub = conn.subscriptions.get(destination)
            if sub is None or sub.destination != destination:
                sub = next((s for s in conn.subscriptions.values()
                            if s.destination == destination), None)
        else:
            raise ProtocolError("UNSUBSCRIBE needs an id (or, in STOMP 1.0, a destination)")
        if sub is None:
            raise ProtocolError("no such subscription")
        del conn.subscriptions[sub.id]
        self._remove_subscription(sub)

    def _remove_subscription(self, sub):
        self.subscription_counts[sub.kind] -= 1
        if sub.kind == "queue":
            self.queues.remove(sub)
        else:
            self.topics.remove(sub)
        if self.queues.cluster:
            self._counts_changed.add(sub.destination)

    def _changed_counts(self):
        """{destination: subscriptions here} of those whose count changed since the last call
        (a cluster node's heartbeat publishes them)."""
        changed, self._counts_changed = self._counts_changed, set()
        counts = {}
        for destination in changed:
            kind, _, name = destination[1:].partition("/")
            if kind == "queue":
                counts[destination] = self.queues.count_subscribers(name)
            else:
                index = self.topics.prefixes if name.endswith("*") else self.topics.exact
                counts[destination] = len(_members(index.get(name)))
        return counts

    # -- transactions --------------------------------------------------------------------------

    def _transaction(self, conn, tx):
        frames = conn.transactions.get(tx)
        if frames is None:
            raise ProtocolError("no such transaction %r" % tx[:100])
        return frames

    def _in_transaction(self, conn, tx):
        frames = self._transaction(conn, tx)
        if len(frames) >= MAX_TRANSACTION_FRAMES:
            raise ProtocolError("more than %d frames in one transaction" % MAX_TRANSACTION_FRAMES)
        return frames

    def _transaction_header(self, frame):
        tx = frame.headers.get("transaction")
        if tx is None:
            raise ProtocolError("%s needs a transaction header" % frame.command)
        return tx

    def on_begin(self, conn, frame):
        tx = self._transaction_header(frame)
        if tx in conn.transactions:
            raise ProtocolError("transaction %r already begun" % tx[:100])
        conn.transactions[tx] = []

    def on_commit(self, conn, frame):
        """Carry out the transaction's frames; the RECEIPT waits for the last durable write
        (batches commit in order)."""
        frames = self._transaction(conn, self._transaction_header(frame))
        del conn.transactions[frame.headers["transaction"]]
        last_batch = None
        for pending in frames:
            answer = self._handlers[pending.command](conn, pending)
            if isinstance(answer, tuple):           # a queue SEND: (batch, message)
                last_batch = answer[0]
            elif answer is not None and not isinstance(answer, dict):
                last_batch = answer
        return last_batch

    def on_abort(self, conn, frame):
        self._transaction(conn, self._transaction_header(frame))
        del conn.transactions[frame.headers["transaction"]]


def parse_destination(destination):
    """'/topic/a' -> ('topic', 'a'). Anything else than a non-empty /queue/, /topic/ or
    /control/ name is a protocol error."""
    if destination is None:
        raise ProtocolError("missing destination header")
    kind, _, name = destination[1:].partition("/")
    if destination[:1] != "/" or kind not in ("queue", "topic", "control") or not name:
        raise ProtocolError("invalid destination %r: must be /queue/NAME, /topic/NAME or "
                            "/control/..." % destination[:100])
    return kind, name


def negotiate_version(accept_version):
    if accept_version is None:
        return "1.0"
    offered = {v.strip() for v in accept_version.split(",")}
    for version in SUPPORTED_VERSIONS:
        if version in offered:
            return version
    raise ProtocolError("supported protocol versions are %s" % " ".join(SUPPORTED_VERSIONS),
                        headers=[("version", ",".join(SUPPORTED_VERSIONS))])


def negotiate_heart_beat(header, server_ms, version):
    """Return (send_ms, recv_ms): how often we send heart-beats and how often the client
    promised to. Each direction is on only when both sides want it, at the slower of the two.
    Our send side offers a floor (the fastest we will beat), so a client that asks for a beat
    every 500 ms gets one every 500 ms, as from RabbitMQ and ActiveMQ."""
    if header is None or version == "1.0":
        return 0, 0
    try:
        cx, cy = (int(part) for part in header.split(","))
        if not (0 <= cx <= 2**31 - 1 and 0 <= cy <= 2**31 - 1):
            raise ValueError
    except ValueError:
        raise ProtocolError("invalid heart-beat header %r" % header[:100])
    sx, sy = server_ms
    send_ms = max(sx, cy) if sx and cy else 0
    recv_ms = max(cx, sy) if cx and sy else 0
    return send_ms, recv_ms


def _credential_ok(expected, given):
    if expected is None:
        return True
    # Constant time, so that timing does not tell how much of a guess was right.
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


# ---------------------------------------------------------------------------------------------
# Connection: one greenlet reads the socket, parses frames and hands them to the broker; a
# writer greenlet drains the outbound buffer, many frames per sendall; a third sends heart-beats
# when they were negotiated. All timeouts of the reading side are one socket timeout.
# ---------------------------------------------------------------------------------------------

class Connection:
    def __init__(self, broker, sock, peer, accepted_at=None, transport="tcp", cert_login=None):
        opts = broker.options
        self.broker = broker
        self.sock = sock
        self.peer = "%s:%s" % peer[:2] if isinstance(peer, tuple) else str(peer)
        self.transport = transport     # tcp, tls, ws or wss
        # sock is a plain gevent socket (tcp): written without a greenlet when it can take
        # it, read after a wait for readability. A TLS socket or a WebSocketStream keeps
        # bytes of its own, and may stop mid-record: see _read_loop and _flush.
        self.plain = transport == "tcp"
        self.cert_login = cert_login   # the verified client certificate's subject CN
        self.user = None               # once CONNECTed: its User, None if it may do anything
        self.parser = FrameParser(opts.max_headers, opts.max_header_line, opts.max_body)
        self.version = None            # protocol version, once CONNECTed
        self.session = None
        self.subscriptions = {}        # subscription id -> Subscription
        self.in_flight = {}            # message id -> InFlight, of every queue subscription
        self.transactions = {}         # transaction id -> frames waiting for COMMIT
        self.closing = False           # reading has stopped; writing drains, then ends
        self.starved = None            # Queues that skipped us for our backlog: tell them when
                                       # it is written (a set, once there are any)
        self._sealed = False           # the last frame (an ERROR) is queued: nothing after it
        # RECEIPTs owed, in order: deque of (Batch or None, StoredMessage or None, RECEIPT
        # bytes, receipt id). Each goes once its batch is durable or its message is ACKed.
        self._receipts = None
        self._receipts_sent = gevent.event.Event()
        # connect-timeout counts from the TCP accept (a TLS handshake included).
        self.accepted_at = accepted_at or time.monotonic()
        self.last_read = self.last_write = self.accepted_at
        self.send_interval = self.recv_interval = 0.0   # heart-beats, seconds
        self._frame_started = None     # when the first byte of an unfinished frame arrived
        self._out = []                 # encoded bytes waiting to be written
        self._out_bytes = 0            # ... and their size
        self._flush_due = False        # a hub callback will write them, after this loop turn
        self._writer = None            # a greenlet, only while the socket is backed up
        self._writing = 0              # bytes the writer still holds: memory too
        self._written = gevent.event.Event()   # set when all that was queued is written
        self._heart = None

    def __repr__(self):
        return "<Connection %s %s>" % (self.peer, self.session or "(not connected)")

    # -- called by the broker ------------------------------------------------------------------

    def start_session(self, version, send_ms, recv_ms):
        self.version = self.parser.version = version
        self.send_interval, self.recv_interval = send_ms / 1000.0, recv_ms / 1000.0
        if self.send_interval:
            self._heart = gevent.spawn(self._heart_beat_loop)

    @property
    def backlog(self):
        """Bytes queued or being written: what this connection holds in memory."""
        return self._out_bytes + self._writing

    def send(self, chunks):
        """Queue encoded bytes (a tuple of chunks) for the writer."""
        if self._sealed:
            return
        self._queue(chunks)

    def _queue(self, chunks):
        self._out.extend(chunks)
        self._out_bytes += sum(map(len, chunks))
        if not self._flush_due and self._writer is None:
            # Written once this turn of the event loop is over: every frame queued meanwhile
            # (a burst of MESSAGEs, their RECEIPTs) goes out in the same send().
            self._flush_due = True
            gevent.get_hub().loop.run_callback(self._flush)
        if self._out_bytes + self._writing > self.broker.options.max_outbound:
            # A consumer that does not read must not grow our memory: drop what it has not
            # taken and disconnect it. The ERROR reaches it only if it starts reading again.
            self.broker.stats["slow_consumers"] += 1
            log.warning("%r: disconnected, %d bytes waiting to be written (max-outbound)",
                        self, self._out_bytes + self._writing)
            self._out.clear()
            self._out_bytes = 0
            self.abort("slow consumer: more than %d bytes waiting to be read"
                       % self.broker.options.max_outbound)

    def send_frame(self, command, headers, body=b""):
        self.send((encode_frame(command, headers, body, self.version or "1.0"),))

    def send_receipt(self, headers, after=None, message=None):
        """Send a RECEIPT once `after` (a storage Batch) is durable, or once the broker settles
        `message` (it was ACKed: Broker.on_ack), and after every RECEIPT asked for before it.
        If the batch failed first, the client gets an ERROR instead."""
        frame = encode_frame("RECEIPT", headers, b"", self.version)
        if after is None and not self._receipts:
            self.send((frame,))
            return
        if self._receipts is None:
            self._receipts = collections.deque()
        if message is not None:
            message.sender = self
        self._receipts.append((after, message, frame, headers["receipt-id"]))
        if after is not None:
            if message is None or not message.deliveries:
                self.broker.storage.awaited(after)      # no ACK will settle this one first
            after.done.rawlink(self.receipts_ready)

    def receipts_ready(self, _event=None):
        """Send the RECEIPTs, oldest first, that nothing holds back any more."""
        receipts = self._receipts
        while receipts:
            batch, message, frame, receipt = receipts[0]
            settled = message is not None and message.sender is None
            if batch is not None and not settled and not batch.done.is_set():
                return
            receipts.popleft()
            self._receipts_sent.set()
            if message is not None:
                message.sender = None
            if batch is not None and not settled and batch.error is not None:
                if self._sealed:
                    continue        # an ERROR is already on its way: it ends the connection
                self.abort("message not stored: %s" % batch.error, receipt)
                return
            self._queue((frame,))

    def close(self, error=None):
        """Stop reading; send the ERROR frame `error` (headers) if given, send what is
        queued (receipts waiting for storage included), then close."""
        if error is not None and not self._sealed:
            frame = encode_frame("ERROR", error, b"", self.version or "1.0")
            if self._receipts:
                # After the RECEIPTs owed for frames that came before the offending one.
                self._receipts.append((None, None, frame, None))
            else:
                self.send((frame,))
            self._sealed = True
        self.closing = True

    def abort(self, message, receipt=None):
        """Close with an ERROR from outside the reader, which may be waiting for the client."""
        if self._sealed:
            return
        for _batch, owed, _frame, _receipt in self._receipts or ():
            if owed is not None:
                owed.sender = None      # nobody to tell any more
        self._receipts = None
        error = {"message": message}
        if receipt is not None:
            error["receipt-id"] = receipt
        self.close(error)
        try:
            shutdown_read(self.sock)        # wakes the reader
        except OSError:
            pass

    # -- the greenlets -------------------------------------------------------------------------

    def serve(self):
        log.debug("%r: accepted", self)
        failed = False
        try:
            self._read_loop()
        except ProtocolError as error:
            failed = True
            self.broker.stats["protocol_errors"] += 1
            log.info("%r: %s", self, error.message)
            if error.delay:
                gevent.sleep(error.delay)
            self._send_error(error)
        except OSError as error:
            log.debug("%r: %s", self, error)
        except Exception:
            failed = True
            log.exception("%r: internal error", self)
            self._send_error(ProtocolError("internal error"))
        finally:
            self.broker.disconnected(self)
            self._finish(linger=failed)
            log.debug("%r: closed", self)

    def _send_error(self, error):
        headers = [("message", error.message)]
        if error.receipt is not None:
            headers.append(("receipt-id", error.receipt))
        headers.extend(error.headers)
        self.close(headers)

    def _read_loop(self):
        sock, parser, handle = self.sock, self.parser, self.broker.handle
        # One receive buffer for every connection of the broker: the parser copies what it
        # gets before anything can yield. (A fresh 64 KiB bytes per recv() fragmented the C
        # heap: the 10-minute soak grew RSS 10-14 % with flat live memory.)
        buffer = self.broker.recv_buffer
        drained = False             # stays so over TLS: decrypted bytes may wait in the SSL object
        timeout = False             # what settimeout() was given last (False: not yet)
        while not self.closing:
            last, timeout = timeout, self._read_timeout()
            if timeout != last:     # between frames with no deadline: None, again and again
                sock.settimeout(timeout)
            try:
                if drained:
                    # The last read emptied the socket: wait for data first rather than let
                    # recv_into() find nothing (a syscall and an exception, twice a message).
                    sock._wait(sock._read_event)
                size = sock.recv_into(buffer)
            except socket.timeout:
                continue            # _read_timeout() raises for the deadline that passed
            if not size:
                return
            drained = size < len(buffer) and self.plain
            self.last_read = time.monotonic()
            parser.feed(buffer[:size])
            finished = False
            while not self.closing:
                frame = parser.next_frame()
                if frame is None:
                    break
                finished = True
                log.debug("%r: %s", self, frame.command)
                handle(self, frame)
                while self._receipts and (len(self._receipts)
                                          > self.broker.options.max_pending_receipts):
                    self._receipts_sent.clear()     # the store is behind: stop reading
                    self._receipts_sent.wait()
            # frame-timeout counts from the first byte of the frame still unfinished.
            if not parser.in_frame:
                self._frame_started = None
            elif finished or self._frame_started is None:
                self._frame_started = self.last_read

    def _read_timeout(self):
        """Seconds until the nearest reading deadline; raise ProtocolError if one has passed."""
        opts = self.broker.options
        deadlines = []
        if self.version is None:
            deadlines.append((self.accepted_at + opts.connect_timeout,
                              "no CONNECT frame within %g seconds" % opts.connect_timeout))
        if self._frame_started is not None:
            deadlines.append((self._frame_started + opts.frame_timeout,
                              "frame not finished within %g seconds" % opts.frame_timeout))
        if self.recv_interval:
            deadlines.append((self.last_read + opts.heart_beat_grace * self.recv_interval,
                              "no heart-beat from the client within %g seconds"
                              % (opts.heart_beat_grace * self.recv_interval)))
        if not deadlines:
            return None
        deadline, message = min(deadlines)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ProtocolError(message)
        return remaining

    def _flush(self):
        """The hub callback that writes what was queued, without blocking: what the socket
        does not take at once goes to a writer greenlet, which waits for it to drain."""
        self._flush_due = False
        if self._writer is not None:
            return                  # the writer takes _out when it is done with the last lot
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            self._out_bytes = 0
            if not self.plain:
                sent = 0        # an SSL write may stop mid-record: the writer does it all
            else:
                try:
                    sent = self.sock._sock.send(data)       # the non-blocking socket underneath
                except BlockingIOError:
                    sent = 0
                except OSError as error:
                    return self._write_failed(error)
            self.last_write = time.monotonic()
            if sent < len(data):
                self._writing = len(data) - sent
                self._writer = gevent.spawn(self._write_rest, memoryview(data)[sent:])
                return
        self._all_written()

    def _write_rest(self, data):
        try:
            while True:
                self.sock.sendall(data)
                self.last_write = time.monotonic()
                if not self._out:
                    break
                data = b"".join(self._out)
                self._out.clear()
                self._out_bytes, self._writing = 0, len(data)
        except OSError as error:
            self._writer = None
            return self._write_failed(error)
        self._writer = None
        self._writing = 0
        self._all_written()

    def _all_written(self):
        if self.starved is not None and not self.closing:
            self.broker.drained(self)
        if not self._out:
            self._written.set()

    def _write_failed(self, error):
        log.debug("%r: write failed: %s", self, error)
        self.closing = True
        self._out.clear()
        self._out_bytes = 0
        self.sock.close()           # wakes the reader

    def _heart_beat_loop(self):
        interval = self.send_interval
        while not self.closing:
            idle = time.monotonic() - self.last_write
            if idle >= interval:
                self.send((b"\n",))
                idle = 0.0
            gevent.sleep(interval - idle)

    def _finish(self, linger):
        self.closing = True
        if self._heart is not None:
            self._heart.kill(block=False)
        # Let what is queued go out (RECEIPTs still waiting for the store included), briefly.
        deadline = time.monotonic() + FLUSH_TIMEOUT
        while self._out or self._writer is not None or self._receipts or self._flush_due:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._written.clear()
            self._written.wait(remaining)
        if self._writer is not None:
            self._writer.kill()
        sock = self.sock
        try:
            if linger:
                # Half-close and read what the client still sends, so that our ERROR is not
                # lost to a reset caused by unread input.
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(LINGER_TIMEOUT)
                deadline = time.monotonic() + LINGER_TIMEOUT
                while sock.recv(RECV_SIZE) and time.monotonic() < deadline:
                    pass
        except OSError:
            pass
        finally:
            sock.close()


# ---------------------------------------------------------------------------------------------
# Transports. A Connection reads and writes a gevent socket: plain TCP, TLS (an SSLSocket,
# made by Server._tls_handshake), or a WebSocketStream, which turns WebSocket messages into the
# same byte stream (wsproto, sans-IO, over the plain or TLS socket). Authentication, limits and
# the frame loop are the same for all of them.
# ---------------------------------------------------------------------------------------------

WS_PATH = "/ws"
WS_SUBPROTOCOLS = ("v12.stomp", "v11.stomp", "v10.stomp")     # preference order


def shutdown_read(sock):
    """Wake the greenlet reading `sock`. For a TLS socket, the plain socket's shutdown(), not
    SSLSocket's: that one drops the TLS layer, and what is still written would go out in
    clear."""
    if isinstance(sock, WebSocketStream):
        sock = sock.raw
    gevent.socket.socket.shutdown(sock, socket.SHUT_RD)


def websocket_handshake(sock, peer, options, accepted_at):
    """Read the HTTP upgrade request (within connect-timeout from `accepted_at`) and accept it:
    a WebSocketStream, or None after an HTTP 400 and closing the socket."""
    import wsproto
    import wsproto.events as ws_events
    from wsproto.utilities import RemoteProtocolError
    ws = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    peer_text = "%s:%s" % peer[:2]
    reason = None
    try:
        request = None
        while request is None:
            remaining = accepted_at + options.connect_timeout - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("no WebSocket upgrade within %g seconds"
                                     % options.connect_timeout)
            sock.settimeout(remaining)
            data = sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionResetError("closed during the WebSocket upgrade")
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, ws_events.Request):
                    request = event
        path = request.target.split("?", 1)[0]
        if path != WS_PATH:
            reason = "no WebSocket at %s: STOMP is at %s" % (path[:100], WS_PATH)
        else:
            offered = [p.strip().lower() for p in request.subprotocols]
            chosen = next((p for p in WS_SUBPROTOCOLS if p in offered), None)
            if offered and chosen is None:
                reason = "no STOMP subprotocol among %s (offer one of %s)" % (
                    ", ".join(offered)[:200], ", ".join(WS_SUBPROTOCOLS))
            else:
                sock.sendall(ws.send(ws_events.AcceptConnection(subprotocol=chosen)))
                return WebSocketStream(sock, ws, _largest_frame(options))
    except RemoteProtocolError as error:
        reason = "not a WebSocket upgrade: %s" % error
    except OSError as error:       # a timeout, a reset, a TLS error
        log.info("%s: WebSocket upgrade failed: %s", peer_text, error)
        sock.close()
        return None
    log.info("%s: WebSocket upgrade refused: %s", peer_text, reason)
    body = (reason + "\n").encode()
    try:
        sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    except OSError:
        pass
    sock.close()
    return None


def _largest_frame(options):
    """The largest STOMP frame the limits let through: a WebSocket message may not be larger
    (it may hold several smaller frames, or part of one)."""
    return options.max_body + options.max_headers * options.max_header_line + 1024


class WebSocketStream:
    """STOMP over an accepted WebSocket, with the socket methods a Connection uses:
    recv_into() gives the bytes of the messages received, text or binary, as one stream (a
    message may hold one frame, several or part of one); sendall() sends bytes as one message,
    text if they are UTF-8, else binary. Pings are answered; a close, or a malformed or
    oversized WebSocket frame (close codes 1002, 1007, 1009), ends the stream. Oversized: its
    header announces more than the largest STOMP frame the limits let through (wsproto hands
    a frame's payload on as it comes; the announced length is its decoder's)."""

    def __init__(self, raw, ws, max_message):
        import wsproto.events as ws_events
        from wsproto.connection import ConnectionState
        from wsproto.utilities import LocalProtocolError
        self.raw = raw                  # the gevent socket, plain or TLS
        self.ws = ws
        self.max_message = max_message
        # wsproto's names, looked up once rather than per message (imported here: only a
        # WebSocket listener needs wsproto)
        self._events = ws_events
        self._remote_closing = ConnectionState.REMOTE_CLOSING
        self._closed_error = LocalProtocolError
        self._in = bytearray()          # received, not yet read
        self._eof = False
        self._lock = gevent.lock.Semaphore()    # the reader's pongs and the writer's messages

    def settimeout(self, timeout):
        self.raw.settimeout(timeout)

    def recv_into(self, buffer):
        while not self._in:
            if self._eof:
                return 0
            data = self.raw.recv(RECV_SIZE)
            if not data:
                self._eof = True
                return 0
            self.ws.receive_data(data)
            self._receive()
            if self._announced() > self.max_message:
                self._close(1009, "frame larger than %d bytes" % self.max_message)
        size = min(len(buffer), len(self._in))
        buffer[:size] = self._in[:size]
        del self._in[:size]
        return size

    def recv(self, size):
        buffer = bytearray(size)
        return bytes(buffer[:self.recv_into(buffer)])

    def _receive(self):
        events = self._events
        for event in self.ws.events():
            if isinstance(event, (events.TextMessage, events.BytesMessage)):
                data = event.data
                self._in += data.encode() if isinstance(data, str) else data
            elif isinstance(event, events.Ping):
                self._send(event.response())
            elif isinstance(event, events.CloseConnection):
                if self.ws.state is self._remote_closing:
                    self._send(event.response())       # the peer closed: answer, and done
                    self._eof = True
                else:
                    self._close(event.code, event.reason)  # wsproto found a malformed frame
                return

    def _announced(self):
        """The payload length in the header of the WebSocket frame being received (0 if
        none, or if this wsproto keeps it elsewhere)."""
        decoder = getattr(getattr(self.ws.connection, "_proto", None), "_frame_decoder", None)
        header = getattr(decoder, "header", None)
        return getattr(header, "payload_len", 0) or 0

    def _close(self, code, reason):
        self._eof = True
        try:
            self._send(self._events.CloseConnection(code=code, reason=reason[:120]))
        except OSError:
            pass

    def _send(self, event):
        with self._lock:
            try:
                data = self.ws.send(event)
            except self._closed_error as error:        # closed already
                raise BrokenPipeError(str(error))
            self.raw.sendall(data)

    def sendall(self, data):
        data = bytes(data)
        try:
            self._send(self._events.TextMessage(data=data.decode()))
        except UnicodeDecodeError:
            self._send(self._events.BytesMessage(data=data))

    def shutdown(self, how):
        """SHUT_WR: a normal close (1000) first, as a WebSocket peer expects."""
        if how != socket.SHUT_RD and not self._eof:
            self._close(1000, "")
        gevent.socket.socket.shutdown(self.raw, how)

    def close(self):
        if not self._eof:           # a normal close, briefly, unless one was sent or received
            self.raw.settimeout(LINGER_TIMEOUT)
            self._close(1000, "")
        self.raw.close()


# ---------------------------------------------------------------------------------------------
# HTTP: metrics and health. With --http-port, a WSGI server on the same hub as STOMP answers
# GET /metrics (the Prometheus text format, written by prometheus-client, imported only then)
# and GET /healthz. The numbers are plain ints the broker and the store keep anyway
# (Broker.stats, Storage.stats and its histograms), read at scrape time: the hot path never
# touches a prometheus object. No series per queue (a million queues must not make a million
# series) but for the queues --metrics-queues matches, MAX_QUEUE_SERIES at most.
# ---------------------------------------------------------------------------------------------

HTTP_TIMEOUT = 10.0             # seconds an HTTP client may stall before it is dropped
HTTP_MAX_CONNECTIONS = 100      # served at once; more wait in the listen backlog
STORE_READ_TIMEOUT = 5.0        # seconds /healthz and /metrics wait for the store's answer
MAX_QUEUE_SERIES = 1000         # most queues --metrics-queues reports

# Counters: pymq_NAME_total, its key in Broker.stats, its help.
BROKER_COUNTERS = (
    ("connections_opened", "connections", "STOMP connections that CONNECTed"),
    ("connections_refused", "refused", "connections refused: max-connections reached"),
    ("messages_received", "messages_in", "SEND frames: to queues, topics and /control/"),
    ("messages_delivered", "messages_out", "MESSAGE frames sent, from queues and topics"),
    ("messages_acked", "acked", "queue messages ACKed"),
    ("messages_nacked", "nacked", "queue messages NACKed"),
    ("messages_redelivered", "redelivered", "queue messages delivered again"),
    ("messages_dead_lettered", "dead_lettered", "queue messages moved to a dead-letter queue"),
    ("messages_expired", "expired", "queue messages found expired (dead-lettered or dropped)"),
    ("ack_timeouts", "ack_timeouts", "queue messages not ACKed within their ack timeout"),
    ("protocol_errors", "protocol_errors", "connections closed with an ERROR for a bad frame"),
    ("slow_consumers", "slow_consumers", "connections dropped for max-outbound"),
    ("tls_handshake_failures", "tls_failures", "TLS connections dropped in the handshake"),
    ("logins_refused", "logins_refused", "CONNECTs refused for bad credentials"),
    ("access_refused", "access_refused", "frames refused: not permitted to the user"),
)
# ... and in Storage.stats.
STORE_COUNTERS = (
    ("store_batches", "batches", "batches (transactions) the store committed"),
    ("store_inserts", "inserts", "queue messages written"),
    ("store_deletes", "deletes", "queue messages deleted (ACKed, or dropped when expired)"),
    ("store_cancelled", "cancelled", "queue messages ACKed before they were written: never "
                                     "written"),
    ("store_updates", "updates", "delivery counts and due times written"),
    ("store_errors", "errors", "batches that failed: nothing written, senders got an ERROR"),
    ("store_retries", "retries", "attempts at a batch that failed while the database was "
                                 "unavailable, tried again"),
)


class Metrics:
    """The collector that prometheus-client asks at each scrape."""

    def __init__(self, server):
        self.server = server
        pattern = server.options.metrics_queues
        if pattern is not None and pattern.startswith("/queue/"):
            pattern = pattern[len("/queue/"):]
        self.queue_pattern = pattern            # a glob over queue names (without /queue/)
        self._cut_logged = False

    def collect(self):
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        broker, storage = self.server.broker, self.server.storage
        info = GaugeMetricFamily("pymq_info", "the broker's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        for name, key, text in BROKER_COUNTERS:
            yield CounterMetricFamily("pymq_" + name, text, broker.stats[key])
        for name, key, text in STORE_COUNTERS:
            yield CounterMetricFamily("pymq_" + name, text, storage.stats[key])
        yield GaugeMetricFamily("pymq_connections", "STOMP connections CONNECTed now",
                                len(broker.connections))
        subscriptions = GaugeMetricFamily("pymq_subscriptions", "subscriptions now, by kind",
                                          labels=["kind"])
        for kind, count in broker.subscription_counts.items():
            subscriptions.add_metric([kind], count)
        yield subscriptions
        yield GaugeMetricFamily("pymq_active_queues", "queues with subscribers",
                                len(broker.queues.queues))
        yield GaugeMetricFamily("pymq_messages_in_flight", "queue messages delivered, not ACKed",
                                sum(len(conn.in_flight) for conn in broker.connections))
        yield GaugeMetricFamily("pymq_stored_messages", "queue messages in the store",
                                storage.stored)
        yield GaugeMetricFamily("pymq_store_pending_bytes", "bytes of SENDs waiting to be "
                                "written (see --async-budget)", storage.pending_bytes)
        yield GaugeMetricFamily("pymq_store_outage", "1 while the database is unavailable and "
                                "batches are retried (see --db-retry)",
                                int(storage.outage_since is not None))
        yield self._histogram(HistogramMetricFamily, "pymq_store_batch_size",
                              "operations (writes and reads) per batch", storage.batch_sizes)
        yield self._histogram(HistogramMetricFamily, "pymq_store_commit_seconds",
                              "time to apply a batch, retries included", storage.commit_seconds)
        if self.queue_pattern is not None:
            yield from self._queue_depths(GaugeMetricFamily)

    @staticmethod
    def _histogram(family, name, text, histogram):
        from prometheus_client.utils import floatToGoString
        buckets, total = [], 0
        for bound, count in zip(histogram.bounds + (math.inf,), histogram.counts):
            total += count
            buckets.append((floatToGoString(bound), total))
        return family(name, text, buckets=buckets, sum_value=histogram.sum)

    def _queue_depths(self, family):
        """pymq_queue_depth of the queues matching --metrics-queues: a read riding in a batch,
        once per scrape; none while the store is unavailable or closing."""
        storage = self.server.storage
        if self.server.stopping or storage.outage_since is not None:
            return
        try:
            depths = storage.depths(self.queue_pattern, MAX_QUEUE_SERIES + 1,
                                    STORE_READ_TIMEOUT)
        except pymq_storage.StorageError as error:
            log.warning("/metrics: no queue depths: %s", error)
            return
        if len(depths) > MAX_QUEUE_SERIES:
            depths = depths[:MAX_QUEUE_SERIES]
            if not self._cut_logged:
                self._cut_logged = True
                log.warning("/metrics: more than %d queues match --metrics-queues %s: only "
                            "the first %d by name get a depth", MAX_QUEUE_SERIES,
                            self.queue_pattern, MAX_QUEUE_SERIES)
        gauge = family("pymq_queue_depth", "messages stored in the queue and not ACKed, as "
                       "count-msgs counts them (of the queues --metrics-queues matches)",
                       labels=["queue"])
        for queue, messages in depths:
            gauge.add_metric([queue], messages)
        yield gauge


class HTTPListener:
    """The WSGI server of --http-port: GET /metrics and GET /healthz (405 for other methods);
    the console and its API everywhere else (see Console). Its log lines go to the pymq.http logger: requests at DEBUG, bad ones at
    INFO (a scanner must not flood the log with warnings)."""

    def __init__(self, server):
        import gevent.pool
        import gevent.pywsgi
        import prometheus_client
        self.server = server
        self.registry = prometheus_client.CollectorRegistry(auto_describe=False)
        self.registry.register(Metrics(server))
        prometheus_client.ProcessCollector(registry=self.registry)  # CPU, memory, descriptors
        prometheus_client.GCCollector(registry=self.registry)   # CPython's collections (tune_gc)
        http_log = logging.getLogger("pymq.http")
        opts = server.options
        self._wsgi = gevent.pywsgi.WSGIServer(
            (opts.host, opts.http_port), self.app, spawn=gevent.pool.Pool(HTTP_MAX_CONNECTIONS),
            log=gevent.pywsgi.LoggingLogAdapter(http_log, logging.DEBUG),
            error_log=gevent.pywsgi.LoggingLogAdapter(http_log, logging.INFO))
        self._wsgi.set_handle(self._handle)
        self._routes = {"/metrics": self.metrics, "/healthz": self.healthz}
        self.console = Console(server)

    @property
    def address(self):
        return self._wsgi.address[:2]

    def start(self):
        self._wsgi.start()
        self.console.start()
        return self

    def stop(self):
        self.console.stop()
        # At once: a scraper's idle keep-alive connection must not hold up the shutdown.
        self._wsgi.stop(timeout=0)

    def _handle(self, sock, address):
        sock.settimeout(HTTP_TIMEOUT)       # a client that stalls is dropped, not kept forever
        self._wsgi.handler_class(sock, address, self._wsgi).handle()

    def app(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        route = self._routes.get(environ.get("PATH_INFO"))
        if route is None:
            return self.console.app(environ, start_response)
        headers = [("Content-Type", "text/plain; charset=utf-8")]
        if method not in ("GET", "HEAD"):
            status, body = "405 Method Not Allowed", b"method not allowed\n"
            headers.append(("Allow", "GET, HEAD"))
        else:
            try:
                status, headers, body = route(environ)
            except Exception:
                log.exception("HTTP %s: internal error", environ.get("PATH_INFO"))
                status, body = "500 Internal Server Error", b"internal error\n"
        headers.append(("Content-Length", str(len(body))))
        start_response(status, headers)
        return [] if method == "HEAD" else [body]

    def metrics(self, environ):
        from prometheus_client.exposition import choose_encoder
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT"))
        return "200 OK", [("Content-Type", content_type)], encoder(self.registry)

    def healthz(self, _environ):
        trouble = self.trouble()
        headers = [("Content-Type", "text/plain; charset=utf-8")]
        if trouble is None:
            return "200 OK", headers, b"ok\n"
        return "503 Service Unavailable", headers, (trouble + "\n").encode()

    def trouble(self):
        """Why the broker is not healthy, or None: it is not stopping, and the store answers a
        read (which also has it try a database that was unavailable again)."""
        server = self.server
        if server.stopping:
            return "shutting down"
        storage = server.storage
        try:
            storage.check(STORE_READ_TIMEOUT)
        except pymq_storage.StorageError as error:
            since = storage.outage_since
            if since is None:
                return "store: %s" % error
            return "database unavailable since %s (%d s)" % (
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)), time.time() - since)
        return None


# ---------------------------------------------------------------------------------------------
# HTTP: the web console and its JSON API, on the --http-port of /metrics. Plain pages (HTML,
# CSS and JavaScript from the strings at the end of this section: no build step, nothing from
# a CDN) that read everything from /api/, which scripts may use too. With a users file (or
# --login), one logs in with a STOMP login and passcode: a session cookie (HttpOnly,
# SameSite=Strict) and a CSRF token that every POST must echo in X-CSRF-Token. Anyone logged in
# may look; purge and move need the admin right on the queue, peeking at messages the read
# right. Without users, the console is open, as STOMP is.
# ---------------------------------------------------------------------------------------------

CONSOLE_COOKIE = "pymq_console"
CONSOLE_SESSION_TIME = 8 * 3600     # seconds a console login lasts
MAX_CONSOLE_SESSIONS = 10000        # the oldest is forgotten beyond this (a login flood)
MAX_API_BODY = 64 * 1024            # bytes of a POST's JSON body
QUEUE_PAGE = 50                     # queues on one page of the listing, by default
MAX_QUEUE_PAGE = 500
MAX_PEEK = 50                       # messages a peek shows at most
PEEK_BODY = 2000                    # characters of a peeked body shown
MAX_CONNECTIONS_PAGE = 1000
RATE_HISTORY = 300                  # seconds of per-second rates kept for the overview chart
CONSOLE_PAGES = ("/", "/queues", "/queue", "/connections")
# Defence in depth for the pages: scripts and styles from this origin only, no framing.
CONSOLE_HEADERS = [
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                "frame-ancestors 'none'; form-action 'self'"),
    ("X-Frame-Options", "DENY"), ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"), ("Cache-Control", "no-store"),
]


class ConsoleError(Exception):
    """An API request refused: its HTTP status and the reason, sent as {"error": ...}."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class ConsoleSession:
    """Who a console cookie is: a user of the users file (looked up again at each request, so
    that a SIGHUP that removes or changes a user applies at once), or the --login user, who
    may do everything."""
    __slots__ = ("login", "everything", "csrf", "expires")

    def __init__(self, login, everything):
        import secrets
        self.login = login
        self.everything = everything
        self.csrf = secrets.token_urlsafe(32)
        self.expires = time.monotonic() + CONSOLE_SESSION_TIME


class Console:
    def __init__(self, server):
        self.server = server
        self.sessions = collections.OrderedDict()     # cookie value -> ConsoleSession
        self.open = ConsoleSession(None, everything=True)   # when no login is needed
        self.started = time.time()
        # (monotonic time, messages in, delivered, acked, commits, seconds committing), one a
        # second: the chart's rates and the recent commit latency are differences of two.
        self.samples = collections.deque(maxlen=RATE_HISTORY + 1)
        self._sampler = None
        self._routes = {
            ("GET", "/api/session"): self.api_session, ("POST", "/api/login"): self.api_login,
            ("POST", "/api/logout"): self.api_logout, ("GET", "/api/overview"): self.api_overview,
            ("GET", "/api/queues"): self.api_queues, ("GET", "/api/queue"): self.api_queue,
            ("POST", "/api/queue/purge"): self.api_purge,
            ("POST", "/api/queue/move"): self.api_move,
            ("GET", "/api/connections"): self.api_connections,
        }
        self._assets = {"/console.js": ("application/javascript", CONSOLE_JS),
                        "/console.css": ("text/css", CONSOLE_CSS)}

    def start(self):
        self._sample()
        self._sampler = gevent.spawn(self._sample_loop)

    def stop(self):
        if self._sampler is not None:
            self._sampler.kill()

    def _sample_loop(self):
        while True:
            gevent.sleep(1.0)
            self._sample()

    def _sample(self):
        stats, commits = self.server.broker.stats, self.server.storage.commit_seconds
        self.samples.append((time.monotonic(), stats["messages_in"], stats["messages_out"],
                             stats["acked"], sum(commits.counts), commits.sum))

    # -- requests ----------------------------------------------------------------------------

    def app(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        headers = list(CONSOLE_HEADERS)
        if path.startswith("/api/"):
            try:
                status, answer = self._api(method, path, environ, headers)
            except ConsoleError as error:
                status, answer = error.status, {"error": str(error)}
            except Exception:
                log.exception("HTTP %s: internal error", path)
                status, answer = "500 Internal Server Error", {"error": "internal error"}
            headers.append(("Content-Type", "application/json"))
            body = json.dumps(answer).encode()
        else:
            status, body = self._asset(method, path, headers)
        headers.append(("Content-Length", str(len(body))))
        start_response(status, headers)
        return [] if method == "HEAD" else [body]

    def _asset(self, method, path, headers):
        if path in CONSOLE_PAGES:
            content_type, body = "text/html; charset=utf-8", CONSOLE_HTML
        elif path in self._assets:
            content_type, body = self._assets[path]
            content_type += "; charset=utf-8"
        else:
            headers.append(("Content-Type", "text/plain; charset=utf-8"))
            return "404 Not Found", b"not found: see / (the console), /metrics and /healthz\n"
        if method not in ("GET", "HEAD"):
            headers.append(("Allow", "GET, HEAD"))
            headers.append(("Content-Type", "text/plain; charset=utf-8"))
            return "405 Method Not Allowed", b"method not allowed\n"
        headers.append(("Content-Type", content_type))
        return "200 OK", body.encode()

    def _api(self, method, path, environ, headers):
        route = self._routes.get((method if method != "HEAD" else "GET", path))
        if route is None:
            if any(p == path for _, p in self._routes):
                raise ConsoleError("405 Method Not Allowed", "method not allowed")
            raise ConsoleError("404 Not Found", "no such API: %s" % path[:100])
        session = self._session(environ)
        if method == "POST":
            self._check_post(environ, session, path)
            request = self._json_body(environ)
        else:
            request = dict(urllib.parse.parse_qsl(environ.get("QUERY_STRING", "")))
        if route not in (self.api_session, self.api_login) and session is None:
            raise ConsoleError("401 Unauthorized", "log in first")
        return route(session, request, headers)

    def login_required(self):
        opts = self.server.options
        return (self.server.broker.auth.users is not None or opts.login is not None
                or opts.passcode is not None)

    def _session(self, environ):
        """The request's ConsoleSession; OPEN when no login is needed; None if it must log
        in."""
        if not self.login_required():
            return self.open
        cookies = {}
        for part in environ.get("HTTP_COOKIE", "").split(";"):
            name, _, value = part.strip().partition("=")
            cookies[name] = value
        session = self.sessions.get(cookies.get(CONSOLE_COOKIE, ""))
        if session is None:
            return None
        if session.expires < time.monotonic() or not (
                session.everything or self._user(session) is not None):
            self.sessions.pop(cookies[CONSOLE_COOKIE], None)
            return None
        return session

    def _user(self, session):
        """The session's User (None: may do everything), as the users file says now."""
        users = self.server.broker.auth.users
        return None if session.everything else (users or {}).get(session.login)

    def _check_post(self, environ, session, path):
        """A POST must be JSON (a form of another site cannot send that without asking), from
        a page of ours if the browser says where it is from, and carry the session's CSRF
        token (but a login, which has no session yet)."""
        if environ.get("CONTENT_TYPE", "").split(";")[0].strip() != "application/json":
            raise ConsoleError("415 Unsupported Media Type", "send application/json")
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and urllib.parse.urlsplit(origin).netloc != environ.get(
                "HTTP_HOST"):
            raise ConsoleError("403 Forbidden", "cross-origin request refused")
        if path == "/api/login":
            return
        token = environ.get("HTTP_X_CSRF_TOKEN", "")
        if session is None or not hmac.compare_digest(token.encode(), session.csrf.encode()):
            raise ConsoleError("403 Forbidden", "missing or wrong CSRF token (X-CSRF-Token)")

    @staticmethod
    def _json_body(environ):
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_API_BODY:
            raise ConsoleError("413 Payload Too Large", "body larger than %d bytes"
                               % MAX_API_BODY)
        try:
            request = json.loads(environ["wsgi.input"].read(length) or b"{}")
        except ValueError:
            raise ConsoleError("400 Bad Request", "the body is not JSON")
        if not isinstance(request, dict):
            raise ConsoleError("400 Bad Request", "the body must be a JSON object")
        return request

    def _may(self, session, right, destination):
        if session.everything:
            return True
        user = self._user(session)
        return user is None or user.may(right, destination) or (
            right == "read" and user.may("admin", destination))

    def _require(self, session, right, destination):
        if not self._may(session, right, destination):
            self.server.broker.stats["access_refused"] += 1
            raise ConsoleError("403 Forbidden", "%s may not %s %s"
                               % (session.login, right, destination[:200]))

    def _store(self, read, *args):
        """A read of the store, within STORE_READ_TIMEOUT; 503 if it does not answer."""
        try:
            return read(*args, timeout=STORE_READ_TIMEOUT)
        except pymq_storage.StorageError as error:
            raise ConsoleError("503 Service Unavailable", "store: %s" % error)

    # -- the API -------------------------------------------------------------------------------

    def api_session(self, session, request, headers):
        answer = {"login_required": self.login_required(), "version": __version__,
                  "logged_in": session is not None}
        if session is not None:
            answer.update(user=session.login, csrf=session.csrf,
                          admin=session.everything or self._user(session).admin is not None)
        return "200 OK", answer

    def api_login(self, session, request, headers):
        import secrets
        login, passcode = request.get("login"), request.get("passcode")
        if not (isinstance(login, str) and isinstance(passcode, str)):
            raise ConsoleError("400 Bad Request", "send login and passcode")
        auth, opts = self.server.broker.auth, self.server.options
        user = auth.users.get(login) if auth.users is not None else None
        if user is not None and auth._password_ok(user, passcode):
            session = ConsoleSession(login, everything=False)
        elif user is None and (opts.login is not None or opts.passcode is not None) and \
                _credential_ok(opts.login, login) and _credential_ok(opts.passcode, passcode):
            session = ConsoleSession(login, everything=True)
        else:
            self.server.broker.stats["logins_refused"] += 1
            log.warning("console: login refused for %r", login[:100])
            gevent.sleep(LOGIN_FAILURE_DELAY)       # guessing is slow
            raise ConsoleError("401 Unauthorized", "bad credentials")
        token = secrets.token_urlsafe(32)
        self.sessions[token] = session
        while len(self.sessions) > MAX_CONSOLE_SESSIONS:
            self.sessions.popitem(last=False)
        headers.append(("Set-Cookie", "%s=%s; Path=/; HttpOnly; SameSite=Strict; Max-Age=%d"
                        % (CONSOLE_COOKIE, token, CONSOLE_SESSION_TIME)))
        log.info("console: %s logged in", login)
        return self.api_session(session, request, headers)

    def api_logout(self, session, request, headers):
        for token, known in list(self.sessions.items()):
            if known is session:
                del self.sessions[token]
        headers.append(("Set-Cookie", "%s=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
                        % CONSOLE_COOKIE))
        return "200 OK", {"logged_in": False}

    def api_overview(self, session, request, headers):
        broker, storage = self.server.broker, self.server.storage
        samples = list(self.samples)
        epoch = time.time() - time.monotonic()
        rates = [{"t": round(b[0] + epoch, 1), "in": b[1] - a[1], "delivered": b[2] - a[2],
                  "acked": b[3] - a[3]} for a, b in zip(samples, samples[1:])]
        recent = samples[-61:]      # the last minute
        commits = recent[-1][4] - recent[0][4]
        latency = (recent[-1][5] - recent[0][5]) / commits if commits else None
        commit_seconds = storage.commit_seconds
        return "200 OK", {
            "version": __version__, "uptime": round(time.time() - self.started, 1),
            "connections": len(broker.connections),
            "subscriptions": dict(broker.subscription_counts),
            "stored": storage.stored,
            "in_flight": sum(len(conn.in_flight) for conn in broker.connections),
            "active_queues": len(broker.queues.queues),
            "store_commit_ms": None if latency is None else round(latency * 1000, 3),
            "store_commit_ms_all": round(1000 * commit_seconds.sum / sum(commit_seconds.counts), 3)
            if sum(commit_seconds.counts) else None,
            "store_outage_since": storage.outage_since,
            "counters": {key: broker.stats[key] for _, key, _ in BROKER_COUNTERS},
            "rates": rates,
        }

    def api_queues(self, session, request, headers):
        """A page of the queues holding messages: those whose names start with `prefix`,
        after `after`, `limit` of them; `next` is the `after` of the next page (null: none)."""
        prefix, after = request.get("prefix", ""), request.get("after") or None
        limit = self._int(request, "limit", QUEUE_PAGE, 1, MAX_QUEUE_PAGE)
        names = self._store(self.server.storage.queue_names, prefix, after, limit + 1)
        more = len(names) > limit
        names = names[:limit]
        return "200 OK", {"queues": self._figures(names), "prefix": prefix, "after": after,
                          "next": names[-1] if more else None}

    def _figures(self, names):
        """The console's figures of each queue: one read of the store for them all."""
        dead = [DEAD_LETTER_PREFIX + name for name in names]
        counts = self._store(self.server.storage.counts, list(names) + dead)
        queues = self.server.broker.queues
        figures = []
        for i, name in enumerate(names):
            (stored, delayed), dead_letters = counts[i], counts[len(names) + i][0]
            figures.append({
                "name": name, "stored": stored, "delayed": delayed,
                "in_flight": self._in_flight(name), "consumers": queues.count_subscribers(name),
                "dead_letter_queue": dead[i], "dead_letters": dead_letters})
        return figures

    def _in_flight(self, name):
        queue = self.server.broker.queues.queues.get(name)
        if queue is None:
            return 0
        subs = queue.subs if queue.__class__ is Queue else (queue,)
        return sum(len(sub.in_flight or ()) for sub in subs)

    def api_queue(self, session, request, headers):
        """One queue's figures, and a peek at its first `peek` ready messages (with the read
        right), bodies cut at PEEK_BODY characters."""
        name = self._queue_name(request, "name")
        destination = "/queue/" + name
        answer = self._figures([name])[0]
        answer.update(may_admin=self._may(session, "admin", destination),
                      may_peek=self._may(session, "read", destination), messages=None)
        limit = self._int(request, "peek", 10, 0, MAX_PEEK)
        if answer["may_peek"] and limit:
            answer["messages"] = [self._peeked(message) for message in
                                  self._store(self.server.storage.peek, name, limit)]
        return "200 OK", answer

    @staticmethod
    def _peeked(message):
        body = message.body.decode("utf-8", "replace")
        return {"id": str(message.seq), "priority": message.priority,
                "deliveries": message.deliveries, "dead_letter": bool(message.dead_letter),
                "headers": [list(pair) for pair in message.headers],
                "body": body[:PEEK_BODY], "body_bytes": len(message.body),
                "truncated": len(body) > PEEK_BODY}

    def api_purge(self, session, request, headers):
        name = self._queue_name(request, "name")
        self._require(session, "admin", "/queue/" + name)
        answer = self._control(self.server.broker.control.purge, name, {})
        log.info("console: %s purged /queue/%s (%s messages)", session.login, name,
                 answer["num-purged"])
        return "200 OK", {"purged": int(answer["num-purged"])}

    def api_move(self, session, request, headers):
        """Move a queue's messages (a dead-letter queue's, to replay them) to another queue,
        `max` of them at most: admin on the source, write on the target, as
        /control/move asks."""
        name, to = self._queue_name(request, "name"), self._queue_name(request, "to")
        self._require(session, "admin", "/queue/" + name)
        self._require(session, "write", "/queue/" + to)
        headers = {"to": "/queue/" + to}
        if request.get("max") not in (None, ""):
            headers["max"] = str(request["max"])
        answer = self._control(self.server.broker.control.move, name, headers)
        log.info("console: %s moved %s messages from /queue/%s to /queue/%s", session.login,
                 answer["num-moved"], name, to)
        return "200 OK", {"moved": int(answer["num-moved"])}

    @staticmethod
    def _control(operation, name, headers):
        try:
            return operation(name, Frame("SEND", headers))
        except ProtocolError as error:
            raise ConsoleError("400 Bad Request", str(error))

    def api_connections(self, session, request, headers):
        """The open connections, oldest first, `limit` from `offset`."""
        offset = self._int(request, "offset", 0, 0, 2 ** 31)
        limit = self._int(request, "limit", 100, 1, MAX_CONNECTIONS_PAGE)
        connections = sorted(self.server.connections, key=lambda conn: conn.accepted_at)
        now = time.monotonic()
        return "200 OK", {"total": len(connections), "offset": offset, "connections": [{
            "peer": conn.peer, "session": conn.session, "version": conn.version,
            "user": self._user_name(conn), "transport": conn.transport,
            "subscriptions": len(conn.subscriptions), "in_flight": len(conn.in_flight),
            "heart_beat": [int(conn.send_interval * 1000), int(conn.recv_interval * 1000)],
            "age": round(now - conn.accepted_at, 1),
        } for conn in connections[offset:offset + limit]]}

    def _user_name(self, conn):
        if conn.user is not None:
            return conn.user.name
        if conn.version is not None and self.login_required():
            return conn.cert_login or self.server.options.login
        return None

    @staticmethod
    def _int(request, key, default, low, high):
        value = request.get(key)
        if value in (None, ""):
            return default
        try:
            value = int(value)
        except (TypeError, ValueError):
            value = low - 1
        if not low <= value <= high:
            raise ConsoleError("400 Bad Request", "%s must be an integer from %d to %d"
                               % (key, low, high))
        return value

    @staticmethod
    def _queue_name(request, key):
        name = request.get(key)
        if isinstance(name, str) and name.startswith("/queue/"):
            name = name[len("/queue/"):]
        if not isinstance(name, str) or not name:
            raise ConsoleError("400 Bad Request", "%s: a queue name is needed" % key)
        return name


# The console's pages: one HTML shell for every page; console.js reads the path, asks /api/
# and builds the page with DOM calls (text is never parsed as HTML: queue names and message
# bodies are the senders').
CONSOLE_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pymq console</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/console.css">
<script src="/console.js" defer></script>
</head>
<body>
<header>
  <strong class="brand">pymq</strong>
  <nav aria-label="Console pages">
    <a href="/">Overview</a> <a href="/queues">Queues</a> <a href="/connections">Connections</a>
  </nav>
  <span id="who"></span>
</header>
<main id="main" aria-live="polite"><p>Loading&hellip;</p></main>
</body>
</html>
"""

CONSOLE_CSS = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 0; color: #1d232a; background: #f6f7f9; }
header { display: flex; gap: 1.5em; align-items: center; padding: .6em 1.2em;
         background: #243447; color: #fff; }
header a { color: #dbe7f5; margin-right: 1em; }
header a[aria-current] { color: #fff; font-weight: bold; }
#who { margin-left: auto; }
#who button { margin-left: .6em; }
main { padding: 1em 1.2em; max-width: 75em; }
h1 { font-size: 1.4em; margin: .2em 0 .6em; }
h2 { font-size: 1.1em; margin: 1.2em 0 .4em; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(11em, 1fr));
           gap: .6em; margin: 0; }
.figures div { background: #fff; border: 1px solid #d5dae0; border-radius: 4px;
               padding: .5em .7em; }
.figures dt { font-size: .85em; color: #56606b; }
.figures dd { margin: 0; font-size: 1.4em; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; background: #fff; width: 100%; }
th, td { border: 1px solid #d5dae0; padding: .3em .6em; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
caption { text-align: left; color: #56606b; padding: .3em 0; }
canvas { background: #fff; border: 1px solid #d5dae0; width: 100%; height: 240px; }
.legend span { margin-right: 1.2em; }
.legend i { display: inline-block; width: 1em; height: .3em; vertical-align: middle;
            margin-right: .3em; }
.swatch-in { background: #2f6fdf; } .swatch-delivered { background: #1a9a5b; }
.swatch-acked { background: #d9822b; }
pre { white-space: pre-wrap; word-break: break-all; margin: 0; max-height: 12em;
      overflow: auto; }
form.inline { display: flex; gap: .6em; align-items: end; flex-wrap: wrap; margin: .6em 0; }
label { display: flex; flex-direction: column; font-size: .9em; }
button { padding: .3em .9em; }
button.danger { background: #b42318; color: #fff; border: 1px solid #8c1c13; }
.error { color: #b42318; }
.note { color: #56606b; }
.confirm { background: #fff4e5; border: 1px solid #f0b35b; padding: .6em; margin: .6em 0; }
"""

CONSOLE_JS = r"""
'use strict';
const main = document.getElementById('main');
let session = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined)
      node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

async function api(path, body) {
  const options = {credentials: 'same-origin', headers: {}};
  if (body !== undefined) {
    options.method = 'POST';
    options.headers['Content-Type'] = 'application/json';
    if (session && session.csrf) options.headers['X-CSRF-Token'] = session.csrf;
    options.body = JSON.stringify(body);
  }
  const response = await fetch('/api/' + path, options);
  const answer = await response.json();
  if (response.status === 401 && path !== 'login') { showLogin(); throw new Error('log in'); }
  if (!response.ok) throw new Error(answer.error || response.statusText);
  return answer;
}

function number(value) { return value === null || value === undefined ? '–' : value.toLocaleString('en'); }

function figures(items) {
  return el('dl', {class: 'figures'}, items.map(([name, value, id]) =>
    el('div', {}, el('dt', {}, name), el('dd', {id: id}, value))));
}

function table(caption, columns, rows) {
  return el('table', {},
    el('caption', {}, caption),
    el('thead', {}, el('tr', {}, columns.map(c => el('th', {scope: 'col'}, c)))),
    el('tbody', {}, rows));
}

function show(...nodes) { main.replaceChildren(...nodes.filter(node => node !== null)); }

function failed(error) {
  if (error.message !== 'log in') show(el('p', {class: 'error', role: 'alert'}, 'Error: ' + error.message));
}

function showLogin(message) {
  document.getElementById('who').replaceChildren();
  const login = el('input', {id: 'login', name: 'login', autocomplete: 'username', required: true});
  const passcode = el('input', {id: 'passcode', name: 'passcode', type: 'password',
                                autocomplete: 'current-password', required: true});
  const status = el('p', {class: 'error', role: 'alert'}, message || '');
  const form = el('form', {class: 'inline', onsubmit: async event => {
    event.preventDefault();
    try {
      session = await api('login', {login: login.value, passcode: passcode.value});
      route();
    } catch (error) { status.textContent = error.message; }
  }}, el('label', {}, 'Login', login), el('label', {}, 'Passcode', passcode),
     el('button', {type: 'submit'}, 'Log in'));
  show(el('h1', {}, 'Log in'), el('p', {class: 'note'}, 'With a login of the broker\'s users file.'),
       form, status);
}

function showWho() {
  const who = document.getElementById('who');
  if (!session.login_required) { who.replaceChildren('open console: no login configured'); return; }
  who.replaceChildren(session.user + (session.admin ? ' (admin)' : ''),
    el('button', {type: 'button', onclick: async () => { await api('logout', {}); session = null; showLogin(); }},
       'Log out'));
}

// -- overview --------------------------------------------------------------------------------

// The colours are the legend's too (.swatch-KEY in console.css).
const SERIES = [['in', 'messages in', '#2f6fdf'], ['delivered', 'delivered', '#1a9a5b'],
                ['acked', 'acked', '#d9822b']];

function drawChart(canvas, rates) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = width * ratio; canvas.height = height * ratio;
  const g = canvas.getContext('2d');
  g.scale(ratio, ratio);
  const left = 50, bottom = 20, top = 10, plotW = width - left - 10, plotH = height - top - bottom;
  const peak = Math.max(1, ...rates.flatMap(r => SERIES.map(([key]) => r[key])));
  g.font = '12px system-ui, sans-serif'; g.fillStyle = '#56606b'; g.strokeStyle = '#e3e6ea';
  for (let i = 0; i <= 4; i++) {
    const y = top + plotH - plotH * i / 4;
    g.beginPath(); g.moveTo(left, y); g.lineTo(left + plotW, y); g.stroke();
    g.fillText(Math.round(peak * i / 4).toLocaleString('en'), 4, y + 4);
  }
  const seconds = rates.length;
  g.fillText('per second, over the last ' + (seconds < 120 ? seconds + ' s' : Math.round(seconds / 60) + ' min'),
             left, height - 4);
  const span = Math.max(rates.length - 1, 1);
  for (const [key, , color] of SERIES) {
    g.strokeStyle = color; g.lineWidth = 2; g.beginPath();
    rates.forEach((r, i) => {
      const x = left + plotW * i / span, y = top + plotH - plotH * r[key] / peak;
      if (i) g.lineTo(x, y); else g.moveTo(x, y);
    });
    g.stroke();
  }
}

function uptime(seconds) {
  const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600),
        m = Math.floor(seconds % 3600 / 60), s = Math.floor(seconds % 60);
  return (d ? d + 'd ' : '') + (d || h ? h + 'h ' : '') + m + 'm ' + s + 's';
}

async function overview() {
  const o = await api('overview');
  const subs = Object.values(o.subscriptions).reduce((a, b) => a + b, 0);
  const last = o.rates[o.rates.length - 1] || {in: 0, delivered: 0, acked: 0};
  const canvas = el('canvas', {id: 'rates', role: 'img',
    'aria-label': 'messages per second: ' + SERIES.map(([k, name]) => name + ' ' + last[k]).join(', ')});
  show(el('h1', {}, 'Overview'),
    figures([['version', o.version, 'version'], ['uptime', uptime(o.uptime), 'uptime'],
             ['connections', number(o.connections), 'connections'],
             ['subscriptions', number(subs), 'subscriptions'],
             ['stored messages', number(o.stored), 'stored'],
             ['in flight', number(o.in_flight), 'in-flight'],
             ['store commit (last min)', o.store_commit_ms === null ? '–' : o.store_commit_ms.toFixed(2) + ' ms', 'commit'],
             ['messages in / s', number(last.in), 'rate-in'],
             ['delivered / s', number(last.delivered), 'rate-delivered'],
             ['acked / s', number(last.acked), 'rate-acked']]),
    o.store_outage_since ? el('p', {class: 'error', role: 'alert'}, 'The database is unavailable: writes are being retried.') : null,
    el('h2', {}, 'Messages per second'),
    el('p', {class: 'legend'}, SERIES.map(([key, name]) => el('span', {}, el('i', {class: 'swatch-' + key}), name))),
    canvas);
  drawChart(canvas, o.rates);
}

// -- queues ----------------------------------------------------------------------------------

function queueLink(name) { return el('a', {href: '/queue?name=' + encodeURIComponent(name)}, name); }

async function queues() {
  const params = new URLSearchParams(location.search);
  const prefix = params.get('prefix') || '', after = params.get('after') || '';
  const page = await api('queues?' + new URLSearchParams({prefix: prefix, after: after}));
  const search = el('input', {id: 'prefix', name: 'prefix', value: prefix, type: 'search'});
  const rows = page.queues.map(q => el('tr', {},
    el('td', {}, queueLink(q.name)), el('td', {class: 'n'}, number(q.stored)),
    el('td', {class: 'n'}, number(q.in_flight)), el('td', {class: 'n'}, number(q.consumers)),
    el('td', {class: 'n'}, number(q.delayed)),
    el('td', {class: 'n'}, q.dead_letters ? queueLink(q.dead_letter_queue) : null, q.dead_letters ? ' ' : null, number(q.dead_letters))));
  const links = [];
  if (after) links.push(el('a', {href: '/queues?' + new URLSearchParams({prefix: prefix})}, 'First page'));
  if (page.next) links.push(el('a', {href: '/queues?' + new URLSearchParams({prefix: prefix, after: page.next}), rel: 'next'}, 'Next page'));
  show(el('h1', {}, 'Queues'),
    el('form', {class: 'inline', method: 'get', action: '/queues', role: 'search'},
       el('label', {}, 'Name starts with', search), el('button', {type: 'submit'}, 'Search')),
    table((after ? 'Queues after ' + after : 'Queues') + ' holding messages' + (prefix ? ', names starting with ' + prefix : ''),
          ['Queue', 'Stored', 'In flight', 'Consumers', 'Delayed', 'Dead letters'],
          rows.length ? rows : [el('tr', {}, el('td', {colspan: 6}, 'No queue holds messages' + (prefix ? ' under this prefix.' : '.')))]),
    el('p', {}, links.flatMap((link, i) => i ? [' · ', link] : [link])));
}

// -- one queue -------------------------------------------------------------------------------

function confirmThen(container, question, label, action) {
  const status = el('p', {role: 'status'});
  const box = el('div', {class: 'confirm', role: 'alertdialog', 'aria-label': question},
    el('p', {}, question),
    el('button', {type: 'button', class: 'danger', id: 'confirm', onclick: async () => {
      try { status.textContent = await action(); setTimeout(queue, 800); }
      catch (error) { status.textContent = 'Error: ' + error.message; status.className = 'error'; }
    }}, label), ' ',
    el('button', {type: 'button', onclick: () => box.remove()}, 'Cancel'), status);
  container.replaceChildren(box);
  box.querySelector('button').focus();
}

async function queue() {
  const name = new URLSearchParams(location.search).get('name') || '';
  const q = await api('queue?' + new URLSearchParams({name: name, peek: 10}));
  const admin = el('div', {id: 'admin'});
  const actions = el('section', {}, el('h2', {}, 'Admin'), admin);
  const to = el('input', {id: 'move-to', name: 'to', value: name.startsWith('DLQ.') ? name.slice(4) : '', required: true});
  const max = el('input', {id: 'move-max', name: 'max', type: 'number', min: 0, placeholder: 'all'});
  const confirmBox = el('div', {});
  admin.append(
    el('button', {type: 'button', class: 'danger', id: 'purge', onclick: () =>
      confirmThen(confirmBox, 'Delete the ' + q.stored + ' stored messages of ' + name + ' (but those in flight)?', 'Purge',
                  async () => 'Purged ' + (await api('queue/purge', {name: name})).purged + ' messages.')}, 'Purge…'),
    el('form', {class: 'inline', onsubmit: event => { event.preventDefault();
      confirmThen(confirmBox, 'Move ' + (max.value || 'all') + ' messages of ' + name + ' to ' + to.value + '?', 'Move',
                  async () => 'Moved ' + (await api('queue/move', {name: name, to: to.value, max: max.value})).moved + ' messages.'); }},
      el('label', {}, 'Move messages to queue', to), el('label', {}, 'At most', max),
      el('button', {type: 'submit', id: 'move'}, 'Move…')),
    confirmBox);
  let messages;
  if (!q.may_peek) messages = el('p', {class: 'note'}, 'You may not read this queue\'s messages.');
  else messages = table('The first ' + q.messages.length + ' ready messages, in delivery order (peeked: nothing is consumed)',
    ['Id', 'Priority', 'Deliveries', 'Headers', 'Body'],
    q.messages.length ? q.messages.map(m => el('tr', {},
      el('td', {}, m.id), el('td', {class: 'n'}, m.priority), el('td', {class: 'n'}, m.deliveries),
      el('td', {}, el('pre', {}, m.headers.map(([k, v]) => k + ': ' + v).join('\n'))),
      el('td', {}, el('pre', {}, m.body + (m.truncated ? '… (' + m.body_bytes.toLocaleString('en') + ' bytes)' : ''))))) :
      [el('tr', {}, el('td', {colspan: 5}, 'No ready message.'))]);
  show(el('h1', {}, 'Queue ', el('code', {}, name)),
    figures([['stored', number(q.stored), 'stored'], ['in flight', number(q.in_flight), 'in-flight'],
             ['consumers', number(q.consumers), 'consumers'], ['delayed', number(q.delayed), 'delayed'],
             ['dead letters (' + q.dead_letter_queue + ')', number(q.dead_letters), 'dead-letters']]),
    q.may_admin ? actions : null,
    el('h2', {}, 'Messages'), messages);
}

// -- connections -----------------------------------------------------------------------------

const TRANSPORTS = {tcp: 'TCP', tls: 'TLS', ws: 'WebSocket', wss: 'WebSocket over TLS'};

async function connections() {
  const offset = Number(new URLSearchParams(location.search).get('offset') || 0);
  const page = await api('connections?' + new URLSearchParams({offset: offset, limit: 100}));
  const rows = page.connections.map(c => el('tr', {},
    el('td', {}, c.peer), el('td', {}, c.user || '–'), el('td', {}, c.version || 'not connected'),
    el('td', {}, TRANSPORTS[c.transport] || c.transport), el('td', {class: 'n'}, number(c.subscriptions)),
    el('td', {class: 'n'}, number(c.in_flight)),
    el('td', {}, c.heart_beat[0] || c.heart_beat[1] ? 'send ' + c.heart_beat[0] + ' ms, expect ' + c.heart_beat[1] + ' ms' : 'none'),
    el('td', {}, uptime(c.age))));
  const links = [];
  if (offset > 0) links.push(el('a', {href: '/connections?offset=' + Math.max(0, offset - 100)}, 'Previous page'));
  if (offset + 100 < page.total) links.push(el('a', {href: '/connections?offset=' + (offset + 100)}, 'Next page'));
  show(el('h1', {}, 'Connections'),
    table(page.total + ' open connections' + (page.total > 100 ? ', ' + (offset + 1) + ' to ' + Math.min(page.total, offset + 100) : ''),
          ['Peer', 'User', 'Protocol', 'Transport', 'Subscriptions', 'In flight', 'Heart-beat', 'Connected for'],
          rows.length ? rows : [el('tr', {}, el('td', {colspan: 8}, 'No connection.'))]),
    el('p', {}, links.flatMap((link, i) => i ? [' · ', link] : [link])));
}

// -- routing ---------------------------------------------------------------------------------

const PAGES = {'/': overview, '/queues': queues, '/queue': queue, '/connections': connections};
let refresh = null;

async function route() {
  clearInterval(refresh);
  for (const link of document.querySelectorAll('nav a'))
    if (link.getAttribute('href') === location.pathname) link.setAttribute('aria-current', 'page');
  try {
    session = await api('session');
    if (!session.logged_in) { showLogin(); return; }
    showWho();
    const page = PAGES[location.pathname] || overview;
    await page();
    document.body.dataset.loaded = location.pathname;
    if (page === overview) refresh = setInterval(() => overview().catch(failed), 1000);
  } catch (error) { failed(error); }
}

route();
"""


# ---------------------------------------------------------------------------------------------
# Server: a gevent StreamServer with one Connection greenlet per client, and a clean stop.
# ---------------------------------------------------------------------------------------------

class Server:
    """A broker listening on its transports (TCP, TLS, WebSocket, WebSocket over TLS: each on
    a port of its own, if configured). Use from a gevent program:

        server = Server(Options(port=0)).start()     # or pymq.start(port=0)
        host, port = server.address
        server.stop()
    """

    def __init__(self, options=None):
        self.options = options or Options()
        self.broker = Broker(self.options)
        self.storage = None
        self.connections = set()       # every open connection, CONNECTed or not
        self._handshakes = 0           # TLS or WebSocket handshakes under way: connections too
        self._servers = {}             # transport (tcp, tls, ws, wss) -> its StreamServer
        self._tls_context = None
        self._started = False
        self.http = None               # the HTTPListener of --http-port
        self.stopping = False
        self._stopped = gevent.event.Event()

    @property
    def address(self):
        """(host, port) of the plain listener, or of the first other one when there is none."""
        return self.address_of("tcp") or next(iter(self._servers.values())).address[:2]

    def address_of(self, transport):
        """(host, port) of the listener of `transport` (tcp, tls, ws, wss), or None."""
        server = self._servers.get(transport)
        return None if server is None else server.address[:2]

    @property
    def tls_address(self):
        return self.address_of("tls")

    def _listeners(self):
        return list(self._servers.values())

    @property
    def http_address(self):
        return None if self.http is None else self.http.address

    def start(self):
        opts = self.options
        if opts.tls_port is not None or opts.wss_port is not None:
            self._tls_context = make_tls_context(opts)
        self.storage = self.broker.storage = self._open_storage()
        self.storage.on_fenced = self._fenced
        self.broker.start()
        listeners = (("tcp", opts.port, self._handle), ("tls", opts.tls_port, self._handle_tls),
                     ("ws", opts.ws_port, self._handle_ws), ("wss", opts.wss_port,
                                                             self._handle_wss))
        try:
            for transport, port, handle in listeners:
                if port is not None:
                    server = gevent.server.StreamServer((opts.host, port), handle, backlog=1024)
                    server.start()
                    self._servers[transport] = server
            if opts.http_port is not None:
                self.http = HTTPListener(self).start()
        except BaseException:
            for server in self._listeners():
                server.close()
            self.storage.close()
            raise
        self._started = True
        for transport, what in (("tcp", ""), ("tls", "for TLS "), ("ws", "for WebSocket "),
                                ("wss", "for WebSocket over TLS ")):
            address = self.address_of(transport)
            if address is not None:
                log.info("pymq %s listening %son %s:%d%s", __version__, what, *address,
                         " (client certificates required)"
                         if opts.tls_ca and transport in ("tls", "wss") else "")
        if self.http is not None:
            log.info("metrics and health on http://%s:%d/", *self.http_address)
        return self

    def _open_storage(self):
        """The store, with ocamlmq's messages in it first if asked (or if its PostgreSQL
        database holds ocamlmq's table): nobody can consume before they are all there. The
        source is checked before the store is opened, so a bad one leaves it untouched."""
        from pymq_storage import ocamlmq
        opts = self.options
        source = ocamlmq.open_import(opts.import_ocamlmq, opts.import_ocamlmq_binlog,
                                     opts.import_ocamlmq_partial, opts.db)
        try:
            node = None
            if opts.cluster:
                node = (opts.node_name or "%s:%s" % (socket.gethostname(), opts.port
                                                      or opts.tls_port or os.getpid()),
                        opts.lease_timeout)
            storage = pymq_storage.open_storage(opts.db, opts.db_retry, node)
            if source is not None:
                try:
                    source.import_into(storage)
                except BaseException:
                    storage.close()
                    raise
            return storage
        finally:
            if source is not None:
                source.close()

    def _accept(self, sock, peer):
        """Socket options for a new TCP connection; False if max-connections is reached."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in KEEPALIVE.items():
            if hasattr(socket, name):       # Linux; elsewhere the system's defaults
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
        if len(self.connections) + self._handshakes < self.options.max_connections:
            return True
        self.broker.stats["refused"] += 1
        log.warning("refused a connection from %s:%s: max-connections (%d) reached",
                    peer[0], peer[1], self.options.max_connections)
        return False

    def _handle(self, sock, peer):
        if not self._accept(sock, peer):
            sock.sendall(encode_frame("ERROR", {"message": "too many connections"}, b"", "1.0"))
            return      # StreamServer closes the socket
        self._serve(Connection(self.broker, sock, peer))

    def _handle_tls(self, sock, peer):
        self._handshake(sock, peer, tls=True, websocket=False)

    def _handle_ws(self, sock, peer):
        self._handshake(sock, peer, tls=False, websocket=True)

    def _handle_wss(self, sock, peer):
        self._handshake(sock, peer, tls=True, websocket=True)

    def _handshake(self, sock, peer, tls, websocket):
        """A connection that starts with handshakes (TLS, then the WebSocket upgrade), all
        within connect-timeout. Refused before them, so that a flood costs no crypto: the
        client sees the connection closed (an ERROR in clear would be garbage to it)."""
        if not self._accept(sock, peer):
            return
        accepted_at = time.monotonic()
        self._handshakes += 1
        cert_login = None
        try:
            if tls:
                sock = self._tls_handshake(sock, peer)
                if sock is not None and self.options.tls_cert_login:
                    cert_login = certificate_cn(sock.getpeercert())
            if sock is not None and websocket:
                sock = websocket_handshake(sock, peer, self.options, accepted_at)
        finally:
            self._handshakes -= 1
        if sock is not None:
            transport = ("wss" if tls else "ws") if websocket else "tls"
            self._serve(Connection(self.broker, sock, peer, accepted_at, transport, cert_login))

    def _tls_handshake(self, sock, peer):
        """The TLS socket once the handshake is done (within connect-timeout), or None."""
        tls = self._tls_context.wrap_socket(sock, server_side=True,
                                            do_handshake_on_connect=False)
        tls.settimeout(self.options.connect_timeout)
        try:
            tls.do_handshake()
            return tls
        except (OSError, ValueError) as error:     # ssl.SSLError, a timeout, a reset
            self.broker.stats["tls_failures"] += 1
            log.info("%s:%s: TLS handshake failed: %s", peer[0], peer[1], error)
            tls.close()     # wrap_socket() took the socket over from StreamServer
            return None

    def _serve(self, conn):
        self.connections.add(conn)
        try:
            conn.serve()
        finally:
            self.connections.discard(conn)

    def _fenced(self):
        """This cluster node lost its lease (it was paused or cut off): what it held may be
        delivered by others now. Every client is told, and nothing held is delivered again."""
        self.broker.queues.fence()
        for conn in list(self.connections):
            conn.abort("cluster node lost its lease: reconnect")

    def reload_users(self):
        """Read the users file again (what SIGHUP does)."""
        self.broker.auth.reload(self.connections)

    def serve_forever(self):
        if not self._started:
            self.start()
        self._stopped.wait()

    def stop(self, timeout=FLUSH_TIMEOUT):
        """Stop accepting; commit what was accepted, so its RECEIPTs still go out; tell every
        client; let connections flush and close; close the store."""
        if not self._started or self._stopped.is_set():
            return
        self.stopping = True           # /healthz says so from now on
        for server in self._listeners():
            server.close()
        self.storage.flush()
        for conn in list(self.connections):
            conn.abort("server shutting down")
        for server in self._listeners():
            server.stop(timeout=timeout)
        self.broker.stop()
        self.storage.close()         # commits the writes still pending: nothing accepted is lost
        if self.http is not None:
            self.http.stop()
        log.info("pymq stopped; storage: %s", ", ".join(
            "%d %s" % (value, key) for key, value in self.storage.stats.items()))
        self._stopped.set()


def make_tls_context(options):
    """The server's TLS context: TLS 1.2 and up, its certificate, and client certificates
    required and verified when --tls-ca is given. Raises ValueError naming the file at fault."""
    import gevent.ssl      # only a TLS listener needs it
    import ssl
    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(options.tls_cert, options.tls_key)
    except (OSError, ssl.SSLError) as error:
        raise ValueError("cannot load TLS certificate %s with key %s: %s"
                         % (options.tls_cert, options.tls_key, error))
    if options.tls_ca:
        try:
            context.load_verify_locations(options.tls_ca)
        except (OSError, ssl.SSLError) as error:
            raise ValueError("cannot load TLS CA certificates %s: %s" % (options.tls_ca, error))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def certificate_cn(cert):
    """The subject commonName of a verified peer certificate (ssl's getpeercert() dict)."""
    for rdn in (cert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


def start(**options):
    """Start a broker in this gevent program; keyword arguments are OPTIONS (port=0 allowed,
    dashes as underscores). Returns the running Server."""
    return Server(Options(**options)).start()


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------

def _usage():
    lines = []
    for name, default, metavar, help_text in OPTIONS:
        flag = "--%s %s" % (name, metavar) if metavar else "--%s" % name
        if default is not None and default is not False:
            help_text += " (default: %s)" % default
        # docopt needs two spaces between an option and its description: a longer option
        # has a line of its own.
        if len(flag) > 25:
            lines.append("  " + flag)
            flag = ""
        lines += textwrap.wrap(help_text, 79, initial_indent="  %-25s " % flag,
                               subsequent_indent=" " * 28)
    return USAGE_HEAD + "\n".join(lines) + "\n"


USAGE_HEAD = """\
pymq: a STOMP message broker.

Usage:
  pymq [options]
  pymq hash-password
  pymq (-h | --help)
  pymq --version

hash-password reads a password (from stdin, or asked twice on a terminal) and prints its
hash, for a users file (--users).

Options:
  -h --help                 show this text
  --version                 show the version
  --config FILE             read options from FILE (INI, section [pymq], keys as
                            below); the command line wins
"""
# Option defaults are written "(default: X)", not docopt's "[default: X]", so that docopt
# reports options absent from the command line as None and the config file can fill them.
USAGE = _usage()


def options_from_args(args):
    """Options from docopt's result: table defaults, then the config file, then the command
    line. Raises ValueError with a message meant for the user."""
    values = {}
    if args["--config"]:
        values.update(read_config(args["--config"]))
    for name in DEFAULTS:
        given = args["--" + name]
        if given is not None and given is not False:
            values[name] = given
    return Options(**values)


def read_config(path):
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path) as f:
            parser.read_file(f)
    except (OSError, configparser.Error) as error:
        raise ValueError("cannot read config file %s: %s" % (path, error))
    if not parser.has_section("pymq"):
        raise ValueError("config file %s has no [pymq] section" % path)
    values = dict(parser.items("pymq"))
    for key in values:
        if key not in DEFAULTS:
            raise ValueError("config file %s: unknown option %s%s"
                             % (path, key, _did_you_mean(key, DEFAULTS)))
    return values


def raise_fd_limit():
    """Every connection is a file descriptor: take the hard limit, and say what we got."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        log.info("file descriptors: up to %d open (about that many connections)", soft)
    except (ImportError, ValueError, OSError) as error:
        log.warning("cannot raise the file descriptor limit: %s", error)


# CPython's cycle collector, for the command line only (an application that embeds pymq owns its
# collector): the young generation is collected every this many new container objects, not
# 700. pymq makes no cycles (test_closed_connections_leave_no_reference_cycles), so the
# collector only costs: at 10,000 connections its default collected so often that the objects
# of messages in flight were promoted, and full collections of ~400,000 objects (~200 ms each)
# ran every 1.3 s, which pushed round trips into saturation (bench/README).
GC_THRESHOLDS = (50000, 20, 20)


def tune_gc():
    """Freeze what start-up made (never collected again) and collect young objects rarely.
    CPython only: PyPy's collector is generational and incremental, with no such knobs."""
    if hasattr(gc, "freeze"):
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)


# PyPy's collector, for the command line (PyPy reads its settings from the environment at
# start-up only). The nursery, where young objects are made (a minor collection each time it
# fills): PyPy's default is half the CPU's L2 cache (1 MB on the machine measured); at 64 MB, qr1
# on SQLite went from ~21,000 to ~28,000 msg/s and 10,000 connections stopped saturating. The
# heap below which PyPy starts no major collection: its default is 8 times the nursery, which
# at 64 MB let a broker under steady load grow to over 500 MB before its first one (bench/README).
PYPY_GC = {"PYPY_GC_NURSERY": "64MB", "PYPY_GC_MIN": "64MB"}


def set_pypy_gc():
    """On PyPy with no PYPY_GC_NURSERY in the environment, start again with PYPY_GC set (what
    the environment sets of it is kept): exec, so the process (its pid, its descriptors) stays
    the same, the command line too (not the interpreter's own flags)."""
    if sys.implementation.name != "pypy" or "PYPY_GC_NURSERY" in os.environ:
        return
    try:
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(PYPY_GC, **os.environ))
    except OSError as error:
        log.warning("cannot restart with %s: %s", " ".join(
            "%s=%s" % item for item in sorted(PYPY_GC.items())), error)


# ocamlmq's command line (its -help): single dash, the value in the next argument. Each means
# what the double-dash option of the same name means here, so a start script only changes the
# program's name.
OCAMLMQ_FLAGS = ("dbhost", "dbport", "dbdatabase", "dbsockdir", "dbuser", "dbpassword",
                 "dbmaxconns", "port", "login", "passcode", "initdb", "debug", "help")


def translate_args(argv):
    """The command line as docopt should see it: ocamlmq's single-dash options turned into
    ours, and an option given twice given once (the later wins, as a start script that
    appends an override expects). Refuses, in plain words, what docopt would answer with its
    usage text or take for something else: an unknown option (with the nearest known one),
    an abbreviated one (docopt takes a unique prefix, which a new option can make ambiguous),
    a missing value. Raises ValueError."""
    valued = {"--config"} | {"--" + name for name, _, metavar, _ in OPTIONS if metavar}
    known = sorted(valued | {"--" + name for name in DEFAULTS} | {"--help", "--version", "-h"})
    single = ["-" + name for name in OCAMLMQ_FLAGS]
    args, given = iter(argv), {}       # option -> its arguments, as docopt will see them
    for arg in args:
        if arg == "--":
            raise ValueError("unexpected argument '--' (see pymq --help)")
        if not arg.startswith("-") or arg == "-":
            raise ValueError("unexpected argument %r (options start with --; see pymq --help)"
                             % arg)
        typed = flag = arg.split("=", 1)[0]
        if flag in single:
            flag = arg = "-" + arg
        elif flag not in known:
            choices = known if flag.startswith("--") else single + known
            raise ValueError("unknown option %s%s" % (flag, _did_you_mean(flag, choices)))
        if "=" in arg and flag not in valued:
            raise ValueError("option %s takes no value" % typed)
        given.pop(flag, None)
        given[flag] = [arg]
        if flag in valued and "=" not in arg:
            value = next(args, None)
            if value is None:
                raise ValueError("option %s needs a value" % typed)
            given[flag].append(value)
    return [part for parts in given.values() for part in parts]


def _did_you_mean(word, choices):
    nearest = difflib.get_close_matches(word, choices, 1, 0.75)
    return "; did you mean %s?" % nearest[0] if nearest else " (see pymq --help)"


def hash_password_command(args):
    """pymq hash-password: the password from the terminal (asked twice) or from stdin (one
    line), never from the command line, where ps and the shell history would show it."""
    if args:
        print("pymq: hash-password reads the password from stdin, not from arguments",
              file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        import getpass
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("pymq: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("pymq: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def main(argv=None):
    from docopt import docopt     # only the command line needs it
    if argv is None:
        set_pypy_gc()
        argv = sys.argv[1:]
    if argv[:1] == ["hash-password"]:
        return hash_password_command(argv[1:])
    try:
        argv = translate_args(argv)
        options = options_from_args(docopt(USAGE, argv, version="pymq " + __version__))
    except ValueError as error:
        print("pymq: %s" % error, file=sys.stderr)
        return 2
    level = logging.DEBUG if options.debug else LOG_LEVELS[options.log_level]
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.umask(0o007)     # data files are not for other users
    raise_fd_limit()
    # Handlers first: a SIGTERM that comes while the store opens, or right after the
    # "listening" line, stops the broker cleanly instead of killing it.
    stop_asked = gevent.event.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, stop_asked.set)
    server = Server(options)
    try:
        server.start()
    except Exception as error:
        # One line, like every event in the log (libpq's messages span several).
        log.error("cannot start on %s:%s with store %s: %s", options.host,
                  options.port if options.port is not None else options.tls_port,
                  pymq_storage.without_password(options.db),
                  re.sub(r"\s*\n\s*", " ", str(error).strip()))
        return 1
    tune_gc()
    gevent.signal_handler(signal.SIGHUP, server.reload_users)
    stop_asked.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

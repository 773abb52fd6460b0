#!/usr/bin/env python3
"""Soak test for pymq (standard library only: raw sockets and threads).

Runs a mixed, rate-bounded load against one broker for --duration seconds (600) and watches
the broker's resident memory (VmRSS from /proc/PID/status) and open file descriptors
(/proc/PID/fd): once after a warm-up (10 % of the duration, 10 to 60 s), every --interval
seconds (30), and at the end, under the same load. The load:

  queues    producers SEND with receipts to a few queues; consumers (STOMP 1.2,
            client-individual) ACK, and NACK a few first deliveries; some SENDs carry
            ack-timeout:0.5, and a deliberately slow consumer lets those expire (ACKing late,
            which the broker must ignore) so that they are redelivered;
  topics    publishers and subscribers, exact and prefix subscriptions (/topic/PREFIX*);
  churn     short-lived connections that CONNECT, SUBSCRIBE to a topic and to a queue
            (client-individual, never ACKing: what they get comes back redelivered), often SEND
            to a queue, then either DISCONNECT with a receipt or just drop the socket (half
            each; some drops reset it);
  control   count-msgs and count-subscribers requests, answered in RECEIPTs.

Every queue message is tracked by its body. After the end sample, producers stop, and the
consumers drain the queues; every message whose RECEIPT arrived must have been delivered and
ACKed at least once (duplicates are allowed, and counted: redelivery makes them), count-msgs
must reach 0, and every topic subscription must have every message published to it.

Without --port it starts `python pymq.py --port 0 --db TMPDIR/soak.db` (or --db URL) in a
temporary directory and stops it with SIGINT at the end; with --port it uses a broker already
running there (its PID from /proc, or --broker-pid). Destinations carry a run id, so leftovers
of earlier runs do not interfere.

Exit status: 0 when status=ok; 1 when RSS or fds grew more than --max-growth-pct (10) from the
start sample to the end sample, a queue or topic message was lost, a message stayed stored, a
late ACK of the slow consumer was accepted (the ack-timeout had not fired: a stalled broker), or
a client saw an error; 2 when the set-up failed.

    python bench/soak.py                      # 10 minutes, SQLite in a temporary directory
    python bench/soak.py --duration 60        # a quick check of the script
    python bench/soak.py --db memory:         # another store (sqlite:///PATH, postgresql://...)
    python bench/soak.py --port 61630         # a broker already running
"""

import argparse
import collections
import os
import random
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time

from broker_process import find_listener_pid, launch_broker, stop_broker  # bench/ on sys.path
from rawstomp import BenchError, frame

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PYMQ = os.path.join(os.path.dirname(HERE), "pymq.py")
RECV_SIZE = 256 * 1024
SOCKET_TIMEOUT = 30.0           # bounds a blocked sendall(); reads use select() with their own


# -- raw STOMP ------------------------------------------------------------------------------

class Conn:
    """A STOMP 1.2 connection: send() from any thread (frames never interleave), next() from
    one reader thread. Registered connections get heart-beats from the Heart thread."""

    def __init__(self, args, name):
        self.name = name
        self.sock = socket.create_connection((args.host, args.port), timeout=SOCKET_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.lock = threading.Lock()
        self.buf = b""
        self.pos = 0
        self.last_send = time.monotonic()
        self.beat = 0.0                 # seconds between our heart-beats (0: none)
        self.closed = False
        self.send(frame("CONNECT", [("accept-version", "1.2"), ("host", "/"),
                                    ("heart-beat", args.heart_beat)]))
        command, headers, _ = self.next(SOCKET_TIMEOUT, expect=True)
        if command != "CONNECTED" or headers.get("version") != "1.2":
            raise BenchError("%s: unexpected answer to CONNECT: %s %r" % (name, command, headers))
        _, wants_ms = headers.get("heart-beat", "0,0").split(",")
        if int(wants_ms):
            self.beat = int(wants_ms) / 1000.0

    def send(self, data):
        with self.lock:
            self.sock.sendall(data)
            self.last_send = time.monotonic()

    def _parse(self):
        buf, pos = self.buf, self.pos
        n = len(buf)
        while pos < n and buf[pos] in (10, 13):           # heart-beats / frame trailers
            pos += 1
        self.pos = pos
        head_end = buf.find(b"\n\n", pos)
        if head_end < 0:
            return None
        lines = buf[pos:head_end].decode().split("\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.rstrip("\r").partition(":")
            headers.setdefault(name, value)
        start = head_end + 2
        if "content-length" in headers:
            end = start + int(headers["content-length"])
            if len(buf) <= end:
                return None
        else:
            end = buf.find(b"\0", start)
            if end < 0:
                return None
        self.pos = end + 1
        if self.pos > 65536:
            self.buf, self.pos = buf[self.pos:], 0
        command = lines[0].rstrip("\r")
        if command == "ERROR":
            raise BenchError("%s: ERROR from broker: %s %r"
                             % (self.name, headers.get("message"), buf[start:end][:200]))
        return command, headers, buf[start:end]

    def next(self, timeout, expect=False):
        """The next frame (command, headers, body), or None after `timeout` seconds (a
        BenchError instead if `expect`)."""
        deadline = time.monotonic() + timeout
        while True:
            parsed = self._parse()
            if parsed is not None:
                return parsed
            remaining = deadline - time.monotonic()
            readable = remaining > 0 and select.select([self.sock], [], [], remaining)[0]
            if not readable:
                if expect:
                    raise BenchError("%s: no answer from the broker in %g s" % (self.name,
                                                                               timeout))
                return None
            data = self.sock.recv(RECV_SIZE)
            if not data:
                raise BenchError("%s: broker closed the connection" % self.name)
            self.buf = self.buf[self.pos:] + data
            self.pos = 0

    def wait_receipt(self, receipt_id, timeout, on_other=None):
        """Read until RECEIPT `receipt_id`; other frames go to on_other (or are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            parsed = self.next(max(0.0, deadline - time.monotonic()), expect=True)
            if parsed[0] == "RECEIPT" and parsed[1].get("receipt-id") == receipt_id:
                return parsed[1]
            if on_other is not None:
                on_other(parsed)

    def close(self, disconnect=True):
        if self.closed:
            return
        self.closed = True
        if disconnect:
            try:
                self.send(frame("DISCONNECT", [("receipt", "bye")]))
                self.wait_receipt("bye", 10)
            except (OSError, BenchError):
                pass
        self.sock.close()


# -- shared state ---------------------------------------------------------------------------

class Tracker:
    """Everything the clients count, under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sent = {}                  # queue message body id -> queue
        self.receipted = set()
        self.acked = set()              # ids ACKed by a consumer (processed) at least once
        self.duplicates = 0             # deliveries of an id already ACKed
        self.deliveries = 0             # MESSAGE frames to consumers (not to churn connections)
        self.redelivered = 0            # ... of which marked redelivered:true
        self.nacked = 0
        self.expired = 0                # ack-timeout messages the slow consumer let expire
        self.late_acks = 0
        self.late_acked = set()         # ids the slow consumer ACKed late
        self.bad = 0                    # malformed bodies, unknown ids
        self.topic_published = collections.Counter()   # topic -> messages published
        self.topic_received = 0
        self.churned = 0
        self.control = 0
        self.errors = []
        self.t0 = time.monotonic()
        self.history = collections.defaultdict(list)   # body id -> events, for lost ones

    def event(self, bid, who, what, message_id):
        """Note what happened to a queue message (call with the lock held); only the
        messages not ACKed yet keep a history."""
        if bid in self.acked:
            return
        self.history[bid].append("%.2f %s %s id=%s" % (time.monotonic() - self.t0, who, what,
                                                        message_id))

    def error(self, message):
        with self.lock:
            self.errors.append(message)
        print("# ERROR %s" % message, flush=True)


class Pacer:
    """Paces a loop at `rate` iterations per second (no catching up after a stall)."""

    def __init__(self, rate):
        self.period = 1.0 / rate
        self.next_at = time.monotonic()

    def due(self):
        return time.monotonic() >= self.next_at

    def remaining(self):
        return max(0.0, self.next_at - time.monotonic())

    def advance(self):
        now = time.monotonic()
        self.next_at = max(self.next_at + self.period, now - 1.0)


def queue_body(bid, size):
    head = b"Q %s %d " % (bid.encode(), size)
    return head + b"x" * max(0, size - len(head))


def parse_queue_body(body):
    """The id of a queue body, or None if it is malformed."""
    parts = body.split(b" ", 3)
    if len(parts) < 3 or parts[0] != b"Q" or not parts[2].isdigit() \
            or int(parts[2]) != len(body):
        return None
    return parts[1].decode()


# -- the load -------------------------------------------------------------------------------

class Worker(threading.Thread):
    """A load thread: run() calls work(); an exception is recorded, never silent."""

    def __init__(self, name, soak):
        super().__init__(name=name, daemon=True)
        self.soak = soak
        self.args = soak.args
        self.tracker = soak.tracker
        self.rng = random.Random(hash((name, soak.run_id)))
        self.ready = threading.Event()
        self.conn = None

    def run(self):
        try:
            self.work()
        except Exception as error:          # noqa: BLE001 - any failure is reported
            self.tracker.error("%s: %s: %s" % (self.name, type(error).__name__, error))
        finally:
            self.ready.set()
            if self.conn is not None:
                self.soak.unregister(self.conn)
                self.conn.close()

    def connect(self):
        self.conn = Conn(self.args, self.name)
        self.soak.register(self.conn)
        return self.conn

    def subscribe(self, sub_id, destination, **extra):
        headers = [("id", sub_id), ("destination", destination), ("receipt", "sub-" + sub_id)]
        headers += list(extra.items())
        self.conn.send(frame("SUBSCRIBE", headers))
        self.conn.wait_receipt("sub-" + sub_id, 30)


class Producer(Worker):
    """SENDs with receipts to random queues, at most --window receipts outstanding."""

    def __init__(self, index, soak, rate):
        super().__init__("producer-%d" % index, soak)
        self.index, self.rate = index, rate

    def work(self):
        args, tracker, rng = self.args, self.tracker, self.rng
        conn = self.connect()
        self.ready.set()
        pacer = Pacer(self.rate)
        pending = {}                    # receipt id -> body id
        seq = 0
        while not self.soak.stop_load.is_set():
            if len(pending) < args.window and pacer.due():
                pacer.advance()
                seq += 1
                bid = "p%d-%d" % (self.index, seq)
                queue = rng.choice(self.soak.queues)
                headers = [("destination", "/queue/" + queue), ("receipt", bid)]
                if rng.random() < args.ack_timeout_ratio:
                    headers.append(("ack-timeout", "%g" % args.ack_timeout))
                if rng.random() < 0.2:
                    headers.append(("priority", str(rng.randint(0, 9))))
                with tracker.lock:
                    tracker.sent[bid] = queue
                conn.send(frame("SEND", headers, queue_body(bid, rng.randint(60, args.max_size))))
                pending[bid] = bid
            parsed = conn.next(min(0.2, pacer.remaining()) if len(pending) < args.window
                               else 0.2)
            if parsed is not None:
                self.on_frame(parsed, pending)
        deadline = time.monotonic() + 60
        while pending and time.monotonic() < deadline:
            parsed = conn.next(deadline - time.monotonic())
            if parsed is not None:
                self.on_frame(parsed, pending)
        if pending:
            raise BenchError("%d receipts never came" % len(pending))

    def on_frame(self, parsed, pending):
        command, headers, _ = parsed
        bid = pending.pop(headers.get("receipt-id"), None)
        if command != "RECEIPT" or bid is None:
            raise BenchError("unexpected %s %r" % (command, headers))
        with self.tracker.lock:
            self.tracker.receipted.add(bid)
            self.tracker.event(bid, self.name, "receipted", "")


class Consumer(Worker):
    """Subscribes to queues (client-individual, STOMP 1.2) and ACKs what it gets; NACKs a
    share of first deliveries. A slow consumer instead holds ack-timeout messages past their
    timeout and ACKs them late (the broker must ignore those ACKs and redeliver)."""

    def __init__(self, name, soak, queues, slow=False):
        super().__init__(name, soak)
        self.queues, self.slow = queues, slow
        self.acks = 0

    def work(self):
        args = self.args
        conn = self.connect()
        for queue in self.queues:
            self.subscribe(queue, "/queue/" + queue, ack="client-individual",
                           prefetch=str(args.prefetch))
        self.ready.set()
        late = collections.deque()      # (due, ack id), in due order
        while not self.soak.stop_consumers.is_set():
            parsed = conn.next(0.1)
            if parsed is not None:
                self.on_frame(parsed, late)
            now = time.monotonic()
            while late and late[0][0] <= now:
                _, ack_id, bid = late.popleft()
                conn.send(frame("ACK", [("id", ack_id)]))
                with self.tracker.lock:
                    self.tracker.late_acks += 1
                    self.tracker.late_acked.add(bid)
                    self.tracker.event(bid, self.name, "late ACK (should be ignored)", ack_id)

    def on_frame(self, parsed, late):
        command, headers, body = parsed
        if command == "RECEIPT":
            return
        if command != "MESSAGE":
            raise BenchError("unexpected %s %r" % (command, headers))
        tracker = self.tracker
        bid = parse_queue_body(body)
        redelivered = headers.get("redelivered") == "true"
        ack_id = headers["ack"]
        with tracker.lock:
            tracker.deliveries += 1
            tracker.redelivered += redelivered
            if bid is None or bid not in tracker.sent:
                tracker.bad += 1
                bid = None
        if bid is None:
            self.conn.send(frame("ACK", [("id", ack_id)]))
            return
        if self.slow and "ack-timeout" in headers and not redelivered:
            late.append((time.monotonic() + self.args.slow_ack_delay, ack_id, bid))
            with tracker.lock:
                tracker.expired += 1
                tracker.event(bid, self.name, "got, holds it past its ack-timeout", ack_id)
            return
        if not self.slow and not redelivered and self.rng.random() < self.args.nack_ratio:
            self.conn.send(frame("NACK", [("id", ack_id)]))
            with tracker.lock:
                tracker.nacked += 1
                tracker.event(bid, self.name, "got, NACKed", ack_id)
            return
        self.acks += 1
        ack_headers = [("id", ack_id)]
        if self.acks % 50 == 0:
            ack_headers.append(("receipt", "ack-%d" % self.acks))
        self.conn.send(frame("ACK", ack_headers))
        with tracker.lock:
            if bid in tracker.acked:
                tracker.duplicates += 1
            else:
                tracker.acked.add(bid)
            tracker.history.pop(bid, None)      # kept for the messages never ACKed only


class TopicPublisher(Worker):
    """Publishes to the soak topics in turn, a receipt every 20 messages, window 2."""

    def __init__(self, index, soak, rate):
        super().__init__("topic-pub-%d" % index, soak)
        self.index, self.rate = index, rate

    def work(self):
        args = self.args
        conn = self.connect()
        self.ready.set()
        pacer = Pacer(self.rate)
        outstanding = collections.deque()
        published = collections.Counter()
        seqs = collections.Counter()
        n = 0
        while not self.soak.stop_load.is_set():
            time.sleep(pacer.remaining())
            pacer.advance()
            topic = self.soak.topics[n % len(self.soak.topics)]
            n += 1
            seqs[topic] += 1
            body = b"T %d %d " % (self.index, seqs[topic])
            body += b"y" * self.rng.randint(0, args.max_size // 2)
            headers = [("destination", "/topic/" + topic)]
            if n % 20 == 0:
                headers.append(("receipt", "t%d" % n))
                outstanding.append("t%d" % n)
            conn.send(frame("SEND", headers, body))
            published[topic] += 1
            while len(outstanding) > 2:
                conn.wait_receipt(outstanding.popleft(), 30)
                self.flush(published)
        # A last receipt: every SEND before it has been published to the subscribers.
        conn.send(frame("SEND", [("destination", "/control/count-subscribers/topic/x"),
                                 ("receipt", "last")]))
        outstanding.append("last")
        while outstanding:
            conn.wait_receipt(outstanding.popleft(), 60)
        self.flush(published)

    def flush(self, published):
        with self.tracker.lock:
            self.tracker.topic_published.update(published)
        published.clear()


def matches(destination, topic):
    name = destination[len("/topic/"):]
    return topic.startswith(name[:-1]) if name.endswith("*") else topic == name


class TopicSubscriber(Worker):
    """Holds subscriptions (exact and prefix), counts what each receives, and checks the
    order of each publisher's messages per topic."""

    def __init__(self, index, soak, destinations):
        super().__init__("topic-sub-%d" % index, soak)
        self.destinations = destinations
        self.received = collections.Counter()      # subscription id -> messages
        self.last = {}                              # (sub id, publisher, topic) -> seq
        self.out_of_order = 0

    def work(self):
        conn = self.connect()
        for i, destination in enumerate(self.destinations):
            self.subscribe(str(i), destination)
        self.ready.set()
        while not self.soak.stop_consumers.is_set():
            parsed = conn.next(0.2)
            if parsed is None:
                continue
            command, headers, body = parsed
            if command != "MESSAGE":
                raise BenchError("unexpected %s %r" % (command, headers))
            sub_id = headers["subscription"]
            _, publisher, seq, _ = body.split(b" ", 3)
            key = (sub_id, publisher, headers["destination"])
            if int(seq) <= self.last.get(key, 0):
                self.out_of_order += 1
            self.last[key] = int(seq)
            self.received[sub_id] += 1
            with self.tracker.lock:
                self.tracker.topic_received += 1

    def shortfall(self, published):
        """(messages missing, messages in excess) over this connection's subscriptions."""
        missing = extra = 0
        for i, destination in enumerate(self.destinations):
            expected = sum(count for topic, count in published.items()
                           if matches(destination, topic))
            got = self.received[str(i)]
            missing += max(0, expected - got)
            extra += max(0, got - expected)
        return missing, extra


class Churn(Worker):
    """Short-lived connections, one at a time, at --churn-rate per second. Each holds the
    sampling gate while it lives, so that samples see no half-open churn connection."""

    def __init__(self, soak):
        super().__init__("churn", soak)

    def work(self):
        args, tracker, rng = self.args, self.tracker, self.rng
        self.ready.set()
        pacer = Pacer(args.churn_rate)
        n = 0
        while not self.soak.stop_load.is_set():
            time.sleep(pacer.remaining())
            pacer.advance()
            n += 1
            with self.soak.gate:
                self.one(n, rng)
            with tracker.lock:
                tracker.churned += 1

    def one(self, n, rng):
        tracker = self.tracker
        conn = Conn(self.args, "churn-%d" % n)

        def on_other(parsed):
            command, headers, body = parsed
            got = parse_queue_body(body) if command == "MESSAGE" else None
            if got is not None and headers.get("subscription") == "q":
                with tracker.lock:
                    tracker.event(got, conn.name, "got (never ACKs)", headers.get("ack"))

        try:
            queue = rng.choice(self.soak.queues)
            conn.send(frame("SUBSCRIBE", [("id", "t"), ("destination",
                                                        "/topic/" + rng.choice(self.soak.topics))])
                      + frame("SUBSCRIBE", [("id", "q"), ("destination", "/queue/" + queue),
                                            ("ack", "client-individual"), ("prefetch", "2")]))
            bid = None
            if rng.random() < 0.7:
                bid = "c%d" % n
                with tracker.lock:
                    tracker.sent[bid] = queue
            body = None if bid is None else queue_body(bid, rng.randint(60, self.args.max_size))
            if n % 2:
                # DISCONNECT with a receipt: its RECEIPT means the SEND (without a receipt of
                # its own) is stored, and that what this connection got is back in the queue.
                if body is not None:
                    conn.send(frame("SEND", [("destination", "/queue/" + queue)], body))
                time.sleep(rng.uniform(0, 0.1))
                conn.send(frame("DISCONNECT", [("receipt", "bye")]))
                conn.wait_receipt("bye", 30, on_other)
            else:
                # Just drop the socket (after the SEND's receipt); every other time with a reset.
                if body is not None:
                    conn.send(frame("SEND", [("destination", "/queue/" + queue),
                                             ("receipt", bid)], body))
                    conn.wait_receipt(bid, 30, on_other)
                time.sleep(rng.uniform(0, 0.1))
                if n % 4 == 0:
                    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))   # linger 0 s: a reset
            if bid is not None:
                with tracker.lock:
                    tracker.receipted.add(bid)
                    tracker.event(bid, conn.name, "sent, %s" % ("DISCONNECT receipted" if n % 2
                                                                else "receipted, drops"), "")
        finally:
            conn.close(disconnect=False)


class Control(Worker):
    """count-msgs / count-subscribers requests at --control-rate per second, with checks:
    a topic or queue has at least the long-lived subscriptions the soak holds on it."""

    def __init__(self, soak):
        super().__init__("control", soak)

    def work(self):
        conn = self.connect()
        self.ready.set()
        requests = []
        for queue in self.soak.queues:
            requests.append(("count-msgs/queue/" + queue, "num-messages", 0))
            requests.append(("count-subscribers/queue/" + queue, "num-subscribers",
                             self.soak.queue_subscriptions))
        for topic in self.soak.topics:
            requests.append(("count-subscribers/topic/" + topic, "num-subscribers",
                             self.soak.topic_subscriptions(topic)))
        pacer = Pacer(self.args.control_rate)
        n = 0
        while not self.soak.stop_load.is_set():
            time.sleep(pacer.remaining())
            pacer.advance()
            name, header, at_least = requests[n % len(requests)]
            n += 1
            conn.send(frame("SEND", [("destination", "/control/" + name),
                                     ("receipt", "c%d" % n)]))
            answer = conn.wait_receipt("c%d" % n, 30)
            value = answer.get(header, "")
            if not value.isdigit() or int(value) < at_least:
                raise BenchError("/control/%s answered %r, expected %s >= %d"
                                 % (name, answer, header, at_least))
            with self.tracker.lock:
                self.tracker.control += 1


class Heart(threading.Thread):
    """Sends the heart-beats every registered connection promised, at half the interval."""

    def __init__(self, soak):
        super().__init__(name="heart", daemon=True)
        self.soak = soak

    def run(self):
        while not self.soak.stop_consumers.wait(0.25):
            now = time.monotonic()
            for conn in self.soak.registered():
                if conn.beat and now - conn.last_send >= conn.beat / 2:
                    try:
                        conn.send(b"\n")
                    except OSError:
                        pass            # its owner finds out when it reads


# -- the broker process ---------------------------------------------------------------------

def start_broker(args, workdir):
    db = args.db or "sqlite:///" + os.path.join(workdir, "soak.db")
    proc, port = launch_broker([sys.executable, os.path.abspath(args.pymq), "--host", args.host,
                                "--port", "0", "--db", db] + args.broker_arg, cwd=workdir)
    return proc, port, db


def broker_sample(pid):
    """(RSS in KiB, open fds, CPU seconds, {VmRSS, RssAnon, RssFile, RssShmem: KiB}) of
    `pid`. Anonymous memory is the heap; file memory includes SQLite's mapped -shm file."""
    with open("/proc/%d/status" % pid) as f:
        kib = {line.split(":")[0]: int(line.split()[1]) for line in f
               if line.startswith(("VmRSS:", "RssAnon:", "RssFile:", "RssShmem:"))}
    fds = len(os.listdir("/proc/%d/fd" % pid))
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return kib["VmRSS"], fds, cpu, kib


# -- the soak -------------------------------------------------------------------------------

class Soak:
    def __init__(self, args, pid):
        self.args = args
        self.pid = pid
        self.run_id = "%x" % (int(time.time() * 1000) & 0xffffffff)
        base = "soak.%s" % self.run_id
        self.queues = ["%s.q%d" % (base, i) for i in range(args.queues)]
        self.topics = ["%s.t.a" % base, "%s.t.b" % base, "%s.t.c.x" % base, "%s.t.c.y" % base]
        self.sub_destinations = [
            ["/topic/%s.t.a" % base],                                  # exact
            ["/topic/%s.t.*" % base],                                  # prefix: every topic
            ["/topic/%s.*" % base, "/topic/%s.t.b" % base],            # two on one connection
            ["/topic/%s.t.c*" % base, "/topic/%s.t.c.y" % base],       # prefix and exact
        ]
        self.queue_subscriptions = args.consumers + 1                 # + the slow consumer
        self.tracker = Tracker()
        self.stop_load = threading.Event()
        self.stop_consumers = threading.Event()
        self.gate = threading.Lock()          # held by a churn connection while it lives
        self._conns = set()
        self._conns_lock = threading.Lock()
        self.samples = []
        self.last_cpu = None

    def topic_subscriptions(self, topic):
        return sum(matches(d, topic) for dests in self.sub_destinations for d in dests)

    def register(self, conn):
        with self._conns_lock:
            self._conns.add(conn)

    def unregister(self, conn):
        with self._conns_lock:
            self._conns.discard(conn)

    def registered(self):
        with self._conns_lock:
            return list(self._conns)

    def sample(self, label, t):
        """Record and print one sample, with no churn connection open."""
        with self.gate:
            time.sleep(0.3)                   # the broker finishes closing the last one
            rss, fds, cpu, kib = broker_sample(self.pid)
        now = time.monotonic()
        cpu_pct = None
        if self.last_cpu is not None:
            cpu_pct = 100.0 * (cpu - self.last_cpu[1]) / max(now - self.last_cpu[0], 1e-9)
        self.last_cpu = (now, cpu)
        tr = self.tracker
        with tr.lock:
            counts = (len(tr.sent), len(tr.receipted), len(tr.acked), tr.redelivered,
                      sum(tr.topic_published.values()), tr.topic_received, tr.churned,
                      tr.control)
        self.samples.append((label, t, rss, fds))
        print("sample %-5s t=%5.0f rss_mb=%.1f (anon %.1f file %.1f shmem %.1f) fds=%d "
              "broker_cpu_pct=%s queue_sent=%d receipted=%d delivered=%d redelivered=%d "
              "topic_published=%d topic_msgs=%d churned=%d control=%d"
              % ((label, t, rss / 1024.0, kib.get("RssAnon", 0) / 1024.0,
                  kib.get("RssFile", 0) / 1024.0, kib.get("RssShmem", 0) / 1024.0, fds,
                  "-" if cpu_pct is None else "%.0f" % cpu_pct) + counts), flush=True)
        return rss, fds

    def run(self):
        args, tracker = self.args, self.tracker
        warmup = args.warmup if args.warmup is not None else \
            min(60.0, max(10.0, 0.1 * args.duration))
        warmup = min(warmup, args.duration / 2)
        print("# pymq soak: broker pid %d on port %d, %g s (warm-up %g s, sample every %g s); "
              "queues %d x %d consumers + 1 slow, %g queue msgs/s by %d producers; "
              "topics %g msgs/s to %d subscriptions; churn %g conns/s; control %g req/s; "
              "run id %s"
              % (self.pid, args.port, args.duration, warmup, args.interval, args.queues,
                 args.consumers, args.queue_rate, args.producers, args.topic_rate,
                 sum(len(d) for d in self.sub_destinations), args.churn_rate,
                 args.control_rate, self.run_id), flush=True)
        consumers = [Consumer("consumer-%s-%d" % (q.rsplit(".", 1)[1], i), self, [q])
                     for q in self.queues for i in range(args.consumers)]
        consumers.append(Consumer("slow-consumer", self, self.queues, slow=True))
        subscribers = [TopicSubscriber(i, self, dests)
                       for i, dests in enumerate(self.sub_destinations)]
        load = ([Producer(i, self, args.queue_rate / args.producers)
                 for i in range(args.producers)]
                + [TopicPublisher(i, self, args.topic_rate / 2) for i in range(2)]
                + [Churn(self), Control(self)])
        Heart(self).start()
        for group in (consumers + subscribers, load):
            for worker in group:
                worker.start()
            for worker in group:
                worker.ready.wait(30)
            if tracker.errors:
                raise BenchError("set-up: %s" % tracker.errors[0])
        t0 = time.monotonic()
        client_cpu0 = sum(os.times()[:2])
        broker_cpu0 = broker_sample(self.pid)[2]

        time.sleep(warmup)
        rss_start, fds_start = self.sample("start", time.monotonic() - t0)
        next_at = t0 + warmup + args.interval
        end_at = t0 + args.duration
        while next_at < end_at - 1:
            time.sleep(max(0.0, next_at - time.monotonic()))
            self.sample("", time.monotonic() - t0)
            next_at += args.interval
        time.sleep(max(0.0, end_at - time.monotonic()))
        rss_end, fds_end = self.sample("end", time.monotonic() - t0)
        load_s = time.monotonic() - t0
        broker_cpu_pct = 100.0 * (broker_sample(self.pid)[2] - broker_cpu0) / load_s
        client_cpu_pct = 100.0 * (sum(os.times()[:2]) - client_cpu0) / load_s

        # Stop the load, let the consumers drain the queues, check.
        self.stop_load.set()
        for worker in load:
            worker.join(90)
            if worker.is_alive():
                tracker.error("%s did not stop" % worker.name)
        drain_deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < drain_deadline:
            with tracker.lock:
                if tracker.receipted <= tracker.acked:
                    break
            time.sleep(0.2)
        stored_left = self.stored_left(max(10.0, drain_deadline - time.monotonic()))
        topic_deadline = time.monotonic() + 10
        while True:
            with tracker.lock:
                published = dict(tracker.topic_published)
            topic_missing = sum(s.shortfall(published)[0] for s in subscribers)
            if topic_missing == 0 or time.monotonic() > topic_deadline:
                break
            time.sleep(0.2)
        topic_extra = sum(s.shortfall(published)[1] for s in subscribers)
        topic_disorder = sum(s.out_of_order for s in subscribers)
        self.stop_consumers.set()
        for worker in consumers + subscribers:
            worker.join(30)
        time.sleep(1)
        self.sample("idle", time.monotonic() - t0)    # every soak client gone (for reference)

        with tracker.lock:
            missing = tracker.receipted - tracker.acked
            # Not ACKed in time, but ACKed late, and never delivered again: the broker took
            # the late ACK, so the ack-timeout had not fired yet. Delivered, not lost.
            late_accepted = sorted(missing & tracker.late_acked)
            lost_ids = sorted(missing - tracker.late_acked)
            summary = dict(
                queue_sent=len(tracker.sent), queue_receipted=len(tracker.receipted),
                delivered=len(tracker.acked & tracker.receipted), lost=len(lost_ids),
                redelivered=tracker.redelivered, topic_msgs=tracker.topic_received,
                connections_churned=tracker.churned, late_ack_accepted=len(late_accepted),
                duplicates=tracker.duplicates,
                nacked=tracker.nacked, expired=tracker.expired, late_acks=tracker.late_acks,
                bad=tracker.bad, stored_left=stored_left,
                topic_published=sum(tracker.topic_published.values()),
                topic_lost=topic_missing, topic_extra=topic_extra,
                topic_disorder=topic_disorder, control_reqs=tracker.control,
                errors=len(tracker.errors))
        rss_growth = 100.0 * (rss_end - rss_start) / rss_start
        fds_growth = 100.0 * (fds_end - fds_start) / fds_start
        problems = []
        if rss_growth > args.max_growth_pct:
            problems.append("RSS grew %.1f %% (> %g %%)" % (rss_growth, args.max_growth_pct))
        if fds_growth > args.max_growth_pct:
            problems.append("fds grew %.1f %% (> %g %%)" % (fds_growth, args.max_growth_pct))
        if lost_ids:
            problems.append("%d queue messages lost, e.g. %s" % (len(lost_ids),
                                                                 " ".join(lost_ids[:10])))
        if late_accepted:
            problems.append("%d late ACKs (%g s after delivery) were accepted: the ack-timeout "
                            "(%g s) had not fired (did the broker stall?); not lost, e.g. %s"
                            % (len(late_accepted), args.slow_ack_delay, args.ack_timeout,
                               " ".join(late_accepted[:10])))
        if stored_left:
            problems.append("%d queue messages still stored after the drain" % stored_left)
        if summary["bad"]:
            problems.append("%d malformed or unknown queue messages" % summary["bad"])
        if topic_missing or topic_extra or topic_disorder:
            problems.append("topic messages: %d missing, %d in excess, %d out of order"
                            % (topic_missing, topic_extra, topic_disorder))
        problems += tracker.errors
        print("series rss_mb=%s" % ",".join("%.1f" % (s[2] / 1024.0) for s in self.samples))
        print("series fds=%s" % ",".join(str(s[3]) for s in self.samples))
        print("broker CPU %.0f %% of one core, client CPU %.0f %% (over the %.0f s of load)"
              % (broker_cpu_pct, client_cpu_pct, load_s))
        for problem in problems:
            print("problem: %s" % problem)
        for bid in lost_ids[:20] + late_accepted[:5]:
            print("missing %s (queue %s): %s" % (bid, tracker.sent[bid], "; ".join(
                tracker.history.get(bid, ["no event"]))))
        print("soak duration_s=%.0f rss_mb_start=%.1f rss_mb_end=%.1f rss_growth_pct=%.1f "
              "fds_start=%d fds_end=%d %s fds_growth_pct=%.1f broker_cpu_pct=%.0f status=%s"
              % (load_s, rss_start / 1024.0, rss_end / 1024.0, rss_growth, fds_start, fds_end,
                 " ".join("%s=%s" % kv for kv in summary.items()), fds_growth, broker_cpu_pct,
                 "FAILED" if problems else "ok"), flush=True)
        return 1 if problems else 0

    def stored_left(self, timeout):
        """Wait until count-msgs is 0 for every soak queue; returns what is left."""
        conn = Conn(self.args, "drain-check")
        try:
            deadline = time.monotonic() + timeout
            n = 0
            while True:
                left = 0
                for queue in self.queues:
                    n += 1
                    conn.send(frame("SEND", [("destination", "/control/count-msgs/queue/" + queue),
                                             ("receipt", "n%d" % n)]))
                    left += int(conn.wait_receipt("n%d" % n, 30)["num-messages"])
                if left == 0 or time.monotonic() > deadline:
                    return left
                time.sleep(0.5)
        finally:
            conn.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0,
                        help="seconds of load, warm-up included (600)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds before the start sample (10%% of --duration, 10 to 60)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples (30)")
    parser.add_argument("--max-growth-pct", type=float, default=10.0,
                        help="fail if RSS or fds grow more than this, start to end (10)")
    parser.add_argument("--queues", type=int, default=3, help="queues (3)")
    parser.add_argument("--consumers", type=int, default=2,
                        help="consumers per queue, besides the slow one on every queue (2)")
    parser.add_argument("--producers", type=int, default=2, help="queue producers (2)")
    parser.add_argument("--queue-rate", type=float, default=120.0,
                        help="queue SENDs per second, all producers (120)")
    parser.add_argument("--window", type=int, default=10,
                        help="receipts a producer may wait for at once (10)")
    parser.add_argument("--prefetch", type=int, default=20, help="consumers' prefetch (20)")
    parser.add_argument("--ack-timeout-ratio", type=float, default=0.1,
                        help="share of queue SENDs with an ack-timeout header (0.1)")
    parser.add_argument("--ack-timeout", type=float, default=0.5,
                        help="their ack-timeout, seconds (0.5)")
    parser.add_argument("--slow-ack-delay", type=float, default=1.5,
                        help="when the slow consumer ACKs what it let expire, seconds (1.5)")
    parser.add_argument("--nack-ratio", type=float, default=0.03,
                        help="share of first deliveries the consumers NACK (0.03)")
    parser.add_argument("--max-size", type=int, default=2000,
                        help="largest queue body, bytes; sizes are uniform from 60 (2000)")
    parser.add_argument("--topic-rate", type=float, default=200.0,
                        help="topic SENDs per second, 2 publishers (200)")
    parser.add_argument("--churn-rate", type=float, default=10.0,
                        help="short-lived connections per second (10)")
    parser.add_argument("--control-rate", type=float, default=10.0,
                        help="control requests per second (10)")
    parser.add_argument("--drain-timeout", type=float, default=60.0,
                        help="seconds the final drain may take (60)")
    parser.add_argument("--heart-beat", default="5000,5000",
                        help="heart-beat header of the soak's CONNECTs (5000,5000)")
    parser.add_argument("--db", default=None,
                        help="store of the broker started (default: SQLite in a temp dir)")
    parser.add_argument("--broker-arg", action="append", default=[],
                        help="extra option for the broker started (repeat; e.g. "
                             "--broker-arg=--ack-timeout=30)")
    parser.add_argument("--port", type=int, default=None,
                        help="use the broker already listening on this port (default: start one)")
    parser.add_argument("--host", default="127.0.0.1", help="broker address (127.0.0.1)")
    parser.add_argument("--broker-pid", type=int, default=None,
                        help="PID to watch with --port (default: the process listening there)")
    parser.add_argument("--pymq", default=DEFAULT_PYMQ, help="pymq.py to start (%(default)s)")
    args = parser.parse_args(argv)
    if args.duration < 20 or args.interval <= 0 or min(args.queues, args.consumers,
                                                       args.producers, args.window) < 1 \
            or min(args.queue_rate, args.topic_rate, args.churn_rate, args.control_rate) <= 0 \
            or args.max_size < 60:
        parser.error("--duration >= 20; counts >= 1; rates > 0; --max-size >= 60")

    proc = workdir = None
    try:
        if args.port is None:
            workdir = tempfile.mkdtemp(prefix="pymq-soak-")
            proc, args.port, db = start_broker(args, workdir)
            pid = proc.pid
            print("# broker: %s --db %s" % (args.pymq, db), flush=True)
        else:
            pid = args.broker_pid or find_listener_pid(args.port)
            if pid is None:
                raise BenchError("no process found listening on port %d: give --broker-pid"
                                 % args.port)
        return Soak(args, pid).run()
    except (BenchError, OSError) as error:
        print("soak: %s" % error, file=sys.stderr)
        print("soak status=FAILED")
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if proc is not None:
            stop_broker(proc)
            if proc.returncode not in (0, -signal.SIGINT):
                print("# broker exited with status %s" % proc.returncode, file=sys.stderr)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

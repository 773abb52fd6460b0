"""Crash safety of durable queues: the broker as ops run it (`python pymq.py --db URL`), killed
and restarted on the same store (SQLite file or PostgreSQL database).

  * kill -9 cycles (run_crash_cycles, also run at length by bench/crash_cycles.py): producers
    SEND with receipts while consumers receive and ACK with receipts, the broker is SIGKILLed
    at a random point (seeded), restarted on the same store, again and again; then everything
    is drained. Among plain SENDs go delayed, expiring, dedup'd ones (also dedup-ids sent
    again after a kill) and ones that consumers NACK (TASK_MIX). Checked, on SQLite and on
    PostgreSQL: every receipted SEND is delivered at least once after it was sent, from its
    queue or its DLQ; no message is delivered after its ACK was receipted (from either);
    no message appears that was never sent; nothing is delivered twice within one broker run
    unless NACKed; a delayed message is never delivered before it is due; of the SENDs with
    one dedup-id one at most is ever delivered; a dead letter is in its own queue's DLQ for a
    reason its SEND gave. Other duplicates across a crash are allowed (at-least-once) and
    counted.
  * The same harness against a cluster of two nodes over one PostgreSQL database: a cycle
    kills one node (or both) and starts it again, the other goes on. A killed node's messages
    are delivered again by the other (redelivered); two live nodes never have one message in
    flight at once.
  * The same harness with PostgreSQL outages: the database server is stopped (fast or
    immediate) under load and started again, with kill -9 of the broker mixed in, also while
    the database is down. Same checks; RECEIPTs wait for the database or become ERRORs.
  * A message delivered but not ACKed when the broker is killed is delivered again.
  * SIGTERM / SIGINT commit the SENDs still waiting for the group commit: exit 0, all there.
  * Message ids stay unique across restarts, clean or kill -9.
  * What a RECEIPT promises, made deterministic by holding SQLite's write lock from the test
    (the broker's commit then waits, like a slow fsync, and the test kills it meanwhile): a
    SEND's RECEIPT waits for the commit, and so does an ACK's.
  * A store with another schema version is refused with a clear log line and a non-zero exit.

Every wait is bounded; the broker runs in a subprocess and the clients are raw sockets in
threads (conftest.RawClient), so a hang fails a test instead of blocking the run.
"""

import collections
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

import postgres
import pymq

# The tests that take a fresh store (new_store) run on each backend; the others use SQLite's
# own locking to stop a commit half-way.
STORE_BACKENDS = ("sqlite", "postgresql")
from conftest import ROOT, BrokerProcess, RawClient, count_msgs

WAIT = 10.0     # the longest any single expected event may take (a broker start, a frame)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def brokers(broker_process):
    """brokers(db, *args) -> a BrokerProcess on that store; killed after the test if running."""
    return lambda db, *args: broker_process("--db", str(db), *args)


def kill9(broker):
    broker.proc.kill()
    assert broker.proc.wait(WAIT) == -signal.SIGKILL


def client(address):
    c = RawClient(address, timeout=WAIT)
    c.connect("1.2")
    return c


def stored_rows(db):
    """Messages in the store, read by the test itself (no interference with the broker)."""
    if str(db).startswith("postgresql://"):
        import psycopg2
        conn = psycopg2.connect(db)
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT COUNT(*) FROM pymq_messages")
                return cursor.fetchone()[0]
        finally:
            conn.close()
    conn = sqlite3.connect(str(db), timeout=WAIT)
    try:
        return conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    finally:
        conn.close()


class WriteLock:
    """Hold SQLite's write lock on `db` from the test: the broker's next commit waits for it
    (its busy timeout is 5 s), like a disk that has not finished the fsync. Lets a test kill
    the broker deterministically *before* a write is durable. Hold it well under 5 s."""

    def __init__(self, db):
        self.conn = sqlite3.connect(str(db), isolation_level=None, timeout=WAIT)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self):
        if self.conn is not None:
            self.conn.execute("ROLLBACK")
            self.conn.close()
            self.conn = None


@pytest.fixture
def write_lock():
    locks = []

    def take(db):
        lock = WriteLock(db)
        locks.append(lock)
        return lock

    yield take
    for lock in locks:
        lock.release()


def drain(address, queues, deadline=20.0, seen=None):
    """Consume and ACK everything on `queues` until count-msgs says every one is empty.
    Returns the MESSAGE frames in the order received; seen(frame), if given, is called as
    each arrives."""
    c = client(address)
    received = []

    def take(frame):
        if seen is not None:
            seen(frame)
        received.append(frame)
        c.send("ACK", {"id": frame.headers["ack"]})
    try:
        for q in queues:
            c.send("SUBSCRIBE", {"destination": "/queue/" + q, "id": q,
                                 "ack": "client-individual", "prefetch": "100"})
        end = time.monotonic() + deadline
        counter = 0
        while True:
            assert time.monotonic() < end, "queues not drained within %s s" % deadline
            counter += 1
            rid = "drain-count-%d" % counter
            # One count per queue, each in its own RECEIPT; ACKs sent before ride before it.
            for q in queues:
                c.send("SEND", {"destination": "/control/count-msgs/queue/" + q,
                                "receipt": "%s-%s" % (rid, q)})
            counts = {}
            while len(counts) < len(queues):
                frame = c.expect(timeout=WAIT)
                if frame.command == "MESSAGE":
                    take(frame)
                else:
                    assert frame.command == "RECEIPT", frame
                    counts[frame.headers["receipt-id"]] = int(frame.headers["num-messages"])
            if not any(counts.values()):
                return received
            # Messages not yet delivered, or delivered and ACKed after the count: wait for
            # the next MESSAGE (bounded) before counting again.
            try:
                frame = c.expect(timeout=0.2)
            except (AssertionError, OSError):
                continue
            assert frame.command == "MESSAGE", frame
            take(frame)
    finally:
        c.close()


# ---------------------------------------------------------------------------------------------
# 1. kill -9 cycles, and database outages: the harness (bench/crash_cycles.py runs it too)
# ---------------------------------------------------------------------------------------------

CRASH_QUEUES = ("crash-a", "crash-b")
DEAD_LETTERS = tuple("DLQ." + q for q in CRASH_QUEUES)

# What producers SEND, by share: task-queue headers among plain messages. "delayed" carries a
# delay (any of its spellings) or a deliver-at; "expiring" a ttl short enough to expire in a
# queue without consumers (it then reaches the DLQ); "dedup" a fresh dedup-id, "dedup-again"
# the dedup-id of an earlier SEND to the same queue, maybe of a run before a kill -9 (so it
# must store nothing); consumers NACK "poison" every time (max-redeliveries:1, or at once with
# requeue:false) and "flaky" once per run with delay:MS.
TASK_MIX = (("plain", 55), ("delayed", 15), ("expiring", 10), ("dedup", 10),
            ("dedup-again", 5), ("poison", 3), ("flaky", 2))
PLAIN_ONLY = (("plain", 1),)

Delivery = collections.namedtuple(
    "Delivery", "run body message_id tick destination wall reason origin")


class Ledger:
    """What every client thread saw, across all cycles. One lock for all of it, and one clock:
    every record takes the next tick, so "after" means after in the order the test saw."""

    def __init__(self):
        self.lock = threading.Condition()
        self.clock = 0
        self.attempted = {}             # body -> (queue, tick), recorded before it is written
        self.receipted = set()          # bodies whose SEND got its RECEIPT
        self.deliveries = []            # Delivery records, in the order seen
        self.kind = {}                  # body -> its kind in TASK_MIX
        self.not_before = {}            # body -> epoch ms: a delayed SEND is due no earlier
        self.dedup = {}                 # body -> (queue, key): SENT with dedup-id:key
        self.keys = []                  # (queue, key) of every dedup-id sent, for re-sends
        self.nacks = []                 # (run, body, tick, epoch ms its redelivery is due)
        self.nacked = set()             # (run, body): NACKed in that run, so it comes again
        # Runs in which a write failed through an outage: what it took out of memory (a NACK's
        # delay among them) is back where it was, so a NACKed message may come at once.
        self.failed_runs = set()
        self.ack_receipted = {}         # body -> tick at which its ACK's RECEIPT was read
        # (run, body): delivered on a connection that the broker closed with an ERROR before
        # the ACK was receipted (a write failed through a database outage): back in the queue,
        # so it may come again in the same run.
        self.released = set()
        # (tick, run, for good): from this tick the run holds nothing in flight any more:
        # its broker was killed (for good), or its cluster node fenced itself (it goes on).
        self.drops = []
        self.fences = 0                 # ERRORs "cluster node lost its lease" read
        self.cycle_receipts = 0         # SEND receipts since the current cycle began
        self.send_errors = 0            # ERROR "message not stored" instead of a SEND's RECEIPT
        self.ack_errors = 0             # ... instead of an ACK's RECEIPT
        self.db_down = False            # the database server is stopped (outage cycles)
        self.receipts_while_down = 0    # SEND RECEIPTs read meanwhile (committed before)
        self.errors = []                # unexpected client-side failures

    def _tick(self):
        self.clock += 1
        return self.clock

    def sent(self, body, queue, kind="plain", not_before=None, dedup=None):
        with self.lock:
            self.attempted[body] = (queue, self._tick())
            self.kind[body] = kind
            if not_before is not None:
                self.not_before[body] = not_before
            if dedup is not None:
                self.dedup[body] = (queue, dedup)
                if kind == "dedup":
                    self.keys.append((queue, dedup))

    def dedup_key(self, rng):
        """(queue, key) of a dedup-id sent before (by any run), or None."""
        with self.lock:
            return rng.choice(self.keys) if self.keys else None

    def send_receipted(self, body):
        with self.lock:
            self._tick()
            self.receipted.add(body)
            self.cycle_receipts += 1
            if self.db_down:
                self.receipts_while_down += 1
            self.lock.notify_all()

    def delivered(self, run, frame):
        """A MESSAGE read by a consumer; returns the body."""
        headers = frame.headers
        wall = time.time() * 1000.0
        body = frame.body.decode()
        with self.lock:
            self.deliveries.append(Delivery(run, body, headers["message-id"], self._tick(),
                                            headers["destination"], wall,
                                            headers.get("dead-letter-reason"),
                                            headers.get("original-destination")))
        return body

    def first_in_run(self, run, body):
        with self.lock:
            return (run, body) not in self.nacked

    def nack(self, run, body, due):
        with self.lock:
            self.nacked.add((run, body))
            self.nacks.append((run, body, self._tick(), due))

    def ack_receipt(self, body):
        with self.lock:
            self.ack_receipted.setdefault(body, self._tick())

    def send_error(self, run):
        with self.lock:
            self.send_errors += 1
            self.failed_runs.add(run)

    def ack_error(self, run, bodies):
        with self.lock:
            self.ack_errors += 1
            self.failed_runs.add(run)
            self.released.update((run, body) for body in bodies)

    def killed(self, run):
        """The run's broker is about to be killed: what it had in flight is not its any more
        (deliveries of it read later were sent before)."""
        with self.lock:
            self.drops.append((self._tick(), run, True))

    def fenced(self, run, bodies):
        """A client of the run got the ERROR of a cluster node that lost its lease: the node
        forgot what it held (another node may deliver it), `bodies` among them, and goes on."""
        with self.lock:
            self.fences += 1
            self.drops.append((self._tick(), run, False))
            self.released.update((run, body) for body in bodies)

    def error(self, *what):
        with self.lock:
            self.errors.append(what)

    def new_cycle(self):
        with self.lock:
            self.cycle_receipts = 0

    def wait_receipts(self, target, timeout):
        with self.lock:
            return self.lock.wait_for(lambda: self.cycle_receipts >= target, timeout)


def _read_frame(c, timeout):
    """The next frame on RawClient `c`, or None after `timeout` s; raises ConnectionError once
    the broker has closed the connection (killed)."""
    deadline = time.monotonic() + timeout
    while True:
        frame = c.parser.next_frame()
        if frame is not None:
            return frame
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        c.sock.settimeout(remaining)
        try:
            data = c.sock.recv(65536)
        except socket.timeout:
            return None
        if not data:
            raise ConnectionError("connection closed by the broker")
        c.parser.feed(data)


def _not_stored(frame, errors_allowed):
    """An ERROR the broker sends when a write failed through a database outage."""
    return (errors_allowed and frame.command == "ERROR"
            and "not stored" in frame.headers.get("message", ""))


def _fenced(frame):
    """The ERROR of a cluster node that lost its lease (it was cut off or starved for longer):
    it forgot what it held, and serves again as a new node."""
    return frame.command == "ERROR" and "cluster node lost its lease" in frame.headers.get(
        "message", "")


def _task_send(body, queue, rng, mix, ledger):
    """Record the SEND of `body` in the ledger; returns (queue, its headers) by a kind drawn
    from `mix`."""
    kinds, weights = zip(*mix)
    kind = rng.choices(kinds, weights)[0]
    headers = {}
    not_before = dedup = None
    if kind == "dedup-again":
        again = ledger.dedup_key(rng)
        if again is None:
            kind = "dedup"
        else:
            queue, dedup = again
    if kind == "delayed":
        delay = rng.randint(0, 800)
        # whole ms, as the broker's clock: it reads the time after this
        not_before = int(time.time() * 1000.0) + delay
        if rng.random() < 0.25:
            headers["deliver-at"] = str(not_before)
        else:
            headers[rng.choice(("delay", "x-delay", "AMQ_SCHEDULED_DELAY"))] = str(delay)
    elif kind == "expiring":
        headers[rng.choice(("ttl", "expiration"))] = str(rng.randint(100, 1500))
    elif kind == "dedup":
        dedup = "k-" + body
    elif kind == "poison":
        headers["max-redeliveries"] = "1"
    if dedup is not None:
        headers["dedup-id"] = dedup
    ledger.sent(body, queue, kind, not_before, dedup)
    return queue, headers


def producer(address, run, pid, queues, window, rng, ledger, stop, errors_allowed=False,
             receipt_timeout=WAIT, mix=PLAIN_ONLY):
    """SENDs with receipts, `window` outstanding, until `stop` or the broker dies; each SEND of
    a kind drawn from `mix` (TASK_MIX). After an ERROR "not stored" (allowed in outage cycles)
    or a cluster node's "lost its lease" it connects again and goes on."""
    n = 0
    while not stop.is_set():
        try:
            c = client(address)
        except OSError:
            return                      # the broker is dead, or not yet listening: done
        except Exception as error:
            if not stop.wait(WAIT):     # not the kill -9 closing it half-way through CONNECT
                ledger.error("producer connect", repr(error))
            return
        outstanding = {}                # receipt id -> body
        try:
            waited = 0.0
            while not stop.is_set():
                while len(outstanding) < window:
                    body = "r%d-p%d-%d" % (run, pid, n)
                    n += 1
                    queue, headers = _task_send(body, rng.choice(queues), rng, mix, ledger)
                    rid = "s-" + body
                    outstanding[rid] = body
                    headers.update({"destination": "/queue/" + queue, "receipt": rid,
                                    "content-type": "text/plain"})
                    c.send("SEND", headers, body.encode())
                frame = _read_frame(c, 0.25)
                if frame is None:
                    waited += 0.25
                    if waited >= receipt_timeout and not stop.is_set():
                        ledger.error("producer", "no RECEIPT within %g s" % receipt_timeout)
                        return
                    continue
                waited = 0.0
                if frame.command == "RECEIPT":
                    ledger.send_receipted(outstanding.pop(frame.headers["receipt-id"]))
                elif _not_stored(frame, errors_allowed):
                    ledger.send_error(run)  # none of `outstanding` is receipted: fine
                    break                   # the broker closes the connection: a new one
                elif _fenced(frame):
                    ledger.fenced(run, ())
                    break
                else:
                    ledger.error("producer got", frame)
                    return
        except OSError:
            return                          # killed
        except Exception as error:
            ledger.error("producer", repr(error))
            return
        finally:
            c.close()


def consumer(address, run, cid, queues, prefetch, ledger, stop, errors_allowed=False):
    """Receives and ACKs with receipts until `stop` or the broker dies; NACKs "poison" (every
    time) and "flaky" (once per run) messages of TASK_MIX instead. After an ERROR "not
    stored" (an ACK's delete failed through an outage; allowed in outage cycles) or a cluster
    node's "lost its lease" it marks what it held unreceipted as released, connects again and
    goes on."""
    rng = random.Random(cid)
    n = 0
    while not stop.is_set():
        try:
            c = client(address)
            for q in queues:
                c.send("SUBSCRIBE", {"destination": "/queue/" + q, "id": q,
                                     "ack": "client-individual", "prefetch": str(prefetch)})
        except OSError:
            return
        except Exception as error:
            if not stop.wait(WAIT):     # not the kill -9 closing it half-way through CONNECT
                ledger.error("consumer connect", repr(error))
            return
        acks = {}                       # receipt id -> body
        held = set()                    # delivered here, ACK not receipted
        try:
            while not stop.is_set():
                frame = _read_frame(c, 0.25)
                if frame is None:
                    continue
                if frame.command == "MESSAGE":
                    body = ledger.delivered(run, frame)
                    kind = ledger.kind.get(body)
                    if frame.headers.get("dead-letter-reason") is None and (
                            kind == "poison" or (kind == "flaky"
                                                 and ledger.first_in_run(run, body))):
                        nack = {"id": frame.headers["ack"]}
                        if kind == "poison":
                            due = 0
                            if rng.random() < 0.5:
                                nack["requeue"] = "false"
                        else:
                            delay = rng.randint(50, 400)
                            due = int(time.time() * 1000.0) + delay
                            nack["delay"] = str(delay)
                        ledger.nack(run, body, due)
                        c.send("NACK", nack)
                        continue
                    held.add(body)
                    n += 1
                    rid = "a-%d-%d-%d" % (run, cid, n)
                    acks[rid] = body
                    c.send("ACK", {"id": frame.headers["ack"], "receipt": rid})
                elif frame.command == "RECEIPT":
                    body = acks.pop(frame.headers["receipt-id"])
                    held.discard(body)
                    ledger.ack_receipt(body)
                elif _not_stored(frame, errors_allowed):
                    ledger.ack_error(run, held)
                    break
                elif _fenced(frame):
                    ledger.fenced(run, held)
                    break
                else:
                    ledger.error("consumer got", frame)
                    return
        except OSError:
            return
        except Exception as error:
            ledger.error("consumer", repr(error))
            return
        finally:
            c.close()


class Run:
    """One broker process on the store (with `node_args`, a node of a cluster), with its
    client threads."""

    def __init__(self, number, store_url, rng, ledger, producers, db_retry, errors_allowed,
                 workdir, mix, node_args=()):
        # A plain message delivered in every run, each ended by a kill, is counted each time:
        # it must not reach its DLQ within the cycles.
        args = ["--db", str(store_url), "--max-redeliveries", "1000", *node_args]
        if db_retry is not None:
            args += ["--db-retry", str(db_retry)]
        self.number = number
        self.ledger = ledger
        self.broker = BrokerProcess(*args, cwd=workdir)
        self.stop = threading.Event()
        # Some runs have no consumer, so that a backlog builds up and is read back from the
        # store by later runs.
        self.consumers = rng.choice([0, 1, 2, 2, 3])
        address = self.broker.address
        receipt_timeout = WAIT + (db_retry or 0)
        self.threads = [
            threading.Thread(target=consumer, name="consumer-%d" % i, daemon=True,
                             args=(address, number, i, CRASH_QUEUES + DEAD_LETTERS, 10, ledger,
                                   self.stop, errors_allowed))
            for i in range(self.consumers)]
        self.threads += [
            threading.Thread(target=producer, name="producer-%d" % i, daemon=True,
                             args=(address, number, i, CRASH_QUEUES, rng.randint(1, 5),
                                   random.Random(rng.random()), ledger, self.stop,
                                   errors_allowed, receipt_timeout, mix))
            for i in range(producers)]
        for t in self.threads:
            t.start()

    def kill(self):
        """kill -9 the broker, then wait for its clients to notice."""
        try:
            self.kill_broker()
        finally:
            self.finish()

    def kill_broker(self):
        self.ledger.killed(self.number)
        kill9(self.broker)

    def finish(self):
        """After kill_broker(): wait for the clients to notice."""
        self.stop.set()
        for t in self.threads:
            t.join(WAIT)
        _close_broker(self.broker)
        stuck = [t.name for t in self.threads if t.is_alive()]
        assert not stuck, "%s still running after the broker was killed" % stuck


def _close_broker(broker):
    """The broker has exited: keep its log, close its pipes. Once is enough."""
    if broker.proc.stderr.closed:
        return
    if broker.proc.poll() is None:
        broker.proc.kill()
    broker.proc.wait()
    broker.log.extend(_rest_of_log(broker))
    broker.proc.stdout.close()
    broker.proc.stderr.close()


class CrashResult:
    """What run_crash_cycles saw: `totals` (name -> number, in print order), `violations`
    (name -> examples; empty when all is well), client `errors`, and `broker_errors`: the
    distinct ERROR log records and tracebacks of the brokers (run, text)."""

    def __init__(self, seed, totals, violations, errors, broker_errors):
        self.seed = seed
        self.totals = totals
        self.violations = violations
        self.errors = errors
        self.broker_errors = broker_errors

    def report(self, title="kill -9 cycles"):
        lines = ["%s: seed %d" % (title, self.seed)]
        lines += ["  %-40s %s" % (name, value) for name, value in self.totals.items()]
        for name, examples in self.violations.items():
            if examples:
                lines.append("  VIOLATION %s: %r" % (name, examples[:10]))
        for what in self.errors[:5]:
            lines.append("  client error: %r" % (what,))
        for run, text in self.broker_errors[:5]:
            lines.append("  broker log, run %d:\n    %s" % (run, text.replace("\n", "\n    ")))
        return "\n".join(lines)

    def check(self):
        failed = {name: examples[:10] for name, examples in self.violations.items() if examples}
        assert not failed and not self.errors, "seed %d: %r; client errors: %r" % (
            self.seed, failed, self.errors[:5])


def _in_flight_twice(ledger):
    """[(body, run, [runs that had it in flight])] of the deliveries made while another live
    run (a cluster node) had the message in flight: delivered there, and since then neither
    NACKed there, nor ACKed with a RECEIPT, nor let go of with all that run held (a kill -9,
    or its node fenced itself)."""
    events = sorted([(d.tick, "delivered", d.run, d.body) for d in ledger.deliveries]
                    + [(tick, "nacked", run, body) for run, body, tick, _ in ledger.nacks]
                    + [(tick, "acked", None, body) for body, tick in ledger.ack_receipted.items()]
                    + [(tick, "dropped", run, killed) for tick, run, killed in ledger.drops],
                    key=lambda event: event[0])
    holders = collections.defaultdict(dict)     # body -> {run: tick of its delivery there}
    held = collections.defaultdict(set)         # run -> bodies it has in flight
    dead = set()
    found = []
    for tick, what, run, body in events:
        if what == "dropped":
            for held_body in held.pop(run, ()):
                holders[held_body].pop(run, None)
            if body:                # killed: what it sent before is read later, maybe
                dead.add(run)
        elif what == "nacked":
            holders[body].pop(run, None)
            held[run].discard(body)
        elif what == "acked":
            for holder in holders.pop(body, {}):
                held[holder].discard(body)
        elif run not in dead:
            others = sorted(r for r in holders[body] if r != run)
            if others:
                found.append((body, run, others))
            holders[body][run] = tick
            held[run].add(body)
    return found


def _broker_errors(logs):
    """Distinct ERROR records (with what follows them: a traceback) and bare tracebacks in the
    brokers' logs, except the expected ones of a database outage. A record starts with its
    timestamp; the lines that do not belong to the one before."""
    expected = ("storage unavailable", "storage batch failed", "cannot load messages")
    found = {}
    for run, lines in enumerate(logs):
        block = None
        for line in lines + ["0 end"]:
            line = line.rstrip("\n")
            if block is not None and not line[:1].isdigit():
                block.append(line)
                continue
            if block is not None:
                text = "\n".join(block)
                found.setdefault(re.sub(r"\d+", "N", text), (run, text))
                block = None
            if line.startswith("Traceback") or (" ERROR " in line and not any(
                    e in line for e in expected)):
                block = [line]
    return list(found.values())


CLUSTER_LEASE = 2.0     # --lease-timeout of the cluster runs' nodes: failover within seconds


def run_crash_cycles(store_url, cycles=20, seed=20261126, outage=None, db_retry=None,
                     receipts=(10, 200), producers=3, outage_time=(0.05, 1.0),
                     long_outage_rate=0.0, log=print, workdir=None, mix=TASK_MIX, nodes=1,
                     lease_timeout=CLUSTER_LEASE):
    """Producers SEND with receipts and consumers receive and ACK with receipts, against
    `python pymq.py --db store_url` in a subprocess, over `cycles` faults; then everything left
    is drained from a last broker on the same store, and the ledger is checked.

    A fault is kill -9 of the broker after a random number of SEND receipts in `receipts` (one
    cycle in ten: after 0 to 5, i.e. while it starts up and refills), sometimes a few ms later
    still; the broker is started again on the same store with new clients. With `outage` (a
    tests/postgres.Cluster holding the store's database), cycles are also of two more kinds:
    the PostgreSQL server is stopped ("fast" or "immediate") under load, kept down for a random
    time in `outage_time` (a share `long_outage_rate` of the outages for longer than the
    broker's --db-retry `db_retry`, so that writes fail with an ERROR) while the clients go
    on, and started again; either the broker survives
    it and the next cycle runs on the same broker ("outage"), or it is killed while the
    database is down ("kill-in-outage"). The last run ends with kill -9 too.

    With `nodes` above 1 (a PostgreSQL store, no outages), the broker is a cluster of that
    many nodes (`--cluster --lease-timeout lease_timeout`), each a run of its own with its own
    producers (`producers` spread over the nodes) and consumers; a fault kills one node
    ("kill"), or one cycle in five all of them ("kill-all"), and what was killed is started
    again while the others go on. The last drain is a cluster node too.

    Random choices come from `seed`: the same seed gives the same cycles (the threads' timing,
    hence the exact messages, still vary). Returns a CrashResult; raise nothing on a
    violation (CrashResult.check() does), only when the harness itself cannot go on."""
    if nodes > 1 and outage is not None:
        raise ValueError("database outages are run against one broker, not a cluster")
    rng = random.Random(seed)
    ledger = Ledger()
    errors_allowed = outage is not None
    if outage is not None and db_retry is None:
        db_retry = 5.0
    started = time.monotonic()
    kinds = collections.Counter()
    logs = []
    live = [None] * nodes           # the Run of each node while it is up
    every = []                      # every Run started, for the clean-up
    runs = 0
    tmp = None
    if workdir is None:
        import tempfile
        workdir = tmp = tempfile.mkdtemp(prefix="pymq-crash-")

    def node_args(name):
        if nodes == 1:
            return ()
        return ("--cluster", "--node-name", name, "--lease-timeout", str(lease_timeout))

    def kill(indexes):
        """kill -9 these nodes (all before waiting for any of their clients)."""
        victims = [live[i] for i in indexes]
        for i in indexes:
            live[i] = None
        for run in victims:
            run.kill_broker()
        for run in victims:
            run.finish()
            logs.append(run.broker.log)
        return victims

    try:
        for cycle in range(cycles):
            for node, run in enumerate(live):
                if run is None:
                    share = producers // nodes + (node < producers % nodes)
                    live[node] = Run(runs, store_url, rng, ledger, max(1, share), db_retry,
                                     errors_allowed, workdir, mix, node_args("n%d" % node))
                    every.append(live[node])
                    runs += 1
            kind = "kill"
            if outage is not None:
                kind = rng.choice(["kill", "outage", "kill-in-outage"])
            elif nodes > 1 and rng.random() < 0.2:
                kind = "kill-all"
            kinds[kind] += 1
            ledger.new_cycle()
            target = (rng.randint(0, 5) if kind == "kill" and rng.random() < 0.1
                      else rng.randint(*receipts))
            jitter = rng.choice([0.0, 0.0, rng.uniform(0.0, 0.02)])
            assert ledger.wait_receipts(target, 15.0 + (db_retry or 0)), \
                "cycle %d: only %d of %d SEND receipts within %g s; %s" % (
                    cycle, ledger.cycle_receipts, target, 15.0 + (db_retry or 0),
                    "\n".join(_stalled(run.broker) for run in live))
            time.sleep(jitter)
            what = "%d consumers, after %d SEND receipts" % (
                sum(run.consumers for run in live), target)
            if kind == "kill" and nodes > 1:
                victim = rng.randrange(nodes)
                run = kill([victim])[0]
                log("cycle %d: kill -9 of node n%d (run %d), %s" % (cycle, victim, run.number,
                                                                   what))
                continue
            if kind in ("kill", "kill-all"):
                killed = kill(range(nodes))
                log("cycle %d (run %s): kill -9%s, %s" % (
                    cycle, "+".join(str(run.number) for run in killed),
                    " of every node" if nodes > 1 else "", what))
                continue
            mode = rng.choice(["fast", "immediate"])
            down = rng.uniform(*outage_time)
            if rng.random() < long_outage_rate:
                down = db_retry + rng.uniform(0.2, 1.0)
            outage.stop(mode)
            ledger.db_down = True
            time.sleep(down)                # the clients go on meanwhile
            if kind == "kill-in-outage":
                kill([0])
            ledger.db_down = False
            outage.start()
            if live[0] is not None:
                # The same broker carries on: it must take SENDs again.
                with ledger.lock:
                    now = ledger.cycle_receipts
                assert ledger.wait_receipts(now + 1, WAIT + db_retry), \
                    "cycle %d: no SEND receipt within %g s of the database's restart" % (
                        cycle, WAIT + db_retry)
            log("cycle %d (run %d): %s, database stopped (%s) for %.2f s%s, %s"
                % (cycle, runs - 1, kind, mode, down,
                   ", broker killed meanwhile" if kind == "kill-in-outage" else "", what))
        kill([i for i, run in enumerate(live) if run is not None])

        # Restart once more and take everything that is left.
        last = BrokerProcess("--db", str(store_url), *node_args("drain"), cwd=workdir)
        try:
            final = drain(last.address, CRASH_QUEUES + DEAD_LETTERS, deadline=60.0,
                          seen=lambda frame: ledger.delivered(runs, frame))
            assert last.stop(signal.SIGTERM) == 0, "the last broker did not stop cleanly"
        finally:
            _close_broker(last)
        logs.append(last.log)
        left = stored_rows(store_url)
    finally:
        for run in every:
            run.stop.set()
            if run.broker.proc.poll() is None:
                run.broker.proc.kill()
            _close_broker(run.broker)
        if ledger.db_down:
            outage.start()
        if tmp is not None:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.monotonic() - started
    return _check_ledger(seed, ledger, cycles, kinds, runs, len(final), left, logs, seconds,
                         nodes)


def _check_ledger(seed, ledger, cycles, kinds, runs, final, left, logs, seconds, nodes=1):
    """The properties, and the totals to print."""
    deliveries = ledger.deliveries
    delivered = collections.Counter(d.body for d in deliveries)
    last_delivery = {}
    for d in deliveries:
        last_delivery[d.body] = max(d.tick, last_delivery.get(d.body, 0))
    # 1. Every receipted SEND is delivered at least once after it was sent, from its queue or
    #    its DLQ (in neither is lost), except a SEND with a dedup-id: see 6.
    lost = sorted(body for body in ledger.receipted if body not in ledger.dedup
                  and last_delivery.get(body, 0) <= ledger.attempted[body][1])
    # 2. No message is delivered after its ACK was receipted: not from its DLQ either (it is
    #    never in both).
    acked_again = sorted(body for body, tick in ledger.ack_receipted.items()
                         if last_delivery[body] > tick)
    # 3. No message appears that was never sent.
    unknown = sorted(set(delivered) - set(ledger.attempted))
    # 4. Nothing is delivered twice within one broker run (unless its connection was closed
    #    with an ERROR before the ACK was receipted, or it was NACKed: then it went back).
    per_run = collections.Counter((d.run, d.body) for d in deliveries)
    again = ledger.released | ledger.nacked
    same_run = sorted(key for key, n in per_run.items() if n > 1 and key not in again)
    after_error = sum(n - 1 for key, n in per_run.items() if n > 1 and key in ledger.released)
    # 4b. (A cluster.) No two live nodes have a message in flight at once: a delivery on one
    #    node while another node had it in flight (delivered there, not NACKed since), and
    #    that node was neither killed nor fenced in between. (Nor, with one node, a run.)
    twice_live = _in_flight_twice(ledger)
    runs_of = collections.defaultdict(set)
    for d in deliveries:
        runs_of[d.body].add(d.run)
    across = sum(len(r) - 1 for r in runs_of.values())
    ids = collections.defaultdict(set)
    for d in deliveries:
        ids[d.message_id].add(d.body)
    reused_ids = sorted(i for i, bodies in ids.items() if len(bodies) > 1)
    # 5. A delayed SEND is never delivered before it is due (epoch ms, the clock both sides
    #    share); nor a NACK with delay:MS redelivered, within the run, before it is due (its
    #    delay is written in a later batch, so a kill -9 may drop it).
    early = sorted((d.body, round(ledger.not_before[d.body] - d.wall, 1)) for d in deliveries
                   if d.body in ledger.not_before and d.wall < ledger.not_before[d.body])
    #    In a cluster another node may redeliver it: the NACKing node writes the due time
    #    before it lets go of the message; unless that node was killed or fenced before the
    #    redelivery (a NACK read after the kill was never sent).
    dropped = {}                # run -> the tick at which it first let go of all it held
    for tick, run, _ in ledger.drops:
        dropped.setdefault(run, tick)
    deliveries_of = collections.defaultdict(list)
    for d in deliveries:
        deliveries_of[d.body].append(d)
    for run, body, tick, due in ledger.nacks:
        if run in ledger.failed_runs:
            continue
        after = [d for d in deliveries_of[body] if d.tick > tick]
        if after and after[0].wall < due and dropped.get(run, after[0].tick) >= after[0].tick:
            early.append((body, "NACK", round(due - after[0].wall, 1)))
    # 6. No dedup-id is forgotten within its window: of the SENDs with one key to one queue,
    #    one at most is ever delivered, and one is if any was receipted.
    groups = collections.defaultdict(set)
    for body, key in ledger.dedup.items():
        groups[key].add(body)
    stored_twice, dedup_lost = [], []
    for key, bodies in sorted(groups.items()):
        seen = sorted(body for body in bodies if body in delivered)
        if len(seen) > 1:
            stored_twice.append((key, seen))
        elif not seen and bodies & ledger.receipted:
            dedup_lost.append(key)
    # 7. A dead letter came from its own queue, for a reason its SEND gave.
    reasons = {"poison": ("max-redeliveries", "rejected"), "expiring": ("expired",)}
    dead = [d for d in deliveries if d.destination.startswith("/queue/DLQ.")]
    wrong_dead = sorted((d.body, d.destination, d.reason, d.origin) for d in dead
                        if d.body in ledger.attempted and (
                            d.reason not in reasons.get(ledger.kind[d.body], ())
                            or d.origin != "/queue/" + ledger.attempted[d.body][0]
                            or d.destination != "/queue/DLQ." + ledger.attempted[d.body][0]))
    tracebacks = sum(1 for lines in logs for line in lines if line.startswith("Traceback"))
    broker_errors = _broker_errors(logs)

    by_kind = collections.Counter(ledger.kind.values())
    totals = collections.OrderedDict([
        ("cycles", "%d (%s), %d %s runs + the final drain"
         % (cycles, ", ".join("%s %d" % kv for kv in sorted(kinds.items())), runs,
            "broker" if nodes == 1 else "node (%d nodes)" % nodes)),
        ("seconds", "%.1f" % seconds),
        ("sent (written)", "%d  (%s)" % (len(ledger.attempted), ", ".join(
            "%s %d" % kv for kv in sorted(by_kind.items())))),
        ("SEND receipted", len(ledger.receipted)),
        ("delivered (distinct)", "%d  (%d deliveries, %d in the final drain)"
         % (len(delivered), len(deliveries), final)),
        ("delivered, SEND not receipted", "%d  (RECEIPT lost to the kill or an ERROR)"
         % len(set(delivered) - ledger.receipted)),
        ("duplicates across crashes", across),
        ("redelivered in a run after an ERROR", after_error),
        ("ACK receipted", len(ledger.ack_receipted)),
        ("NACKs", len(ledger.nacks)),
        ("dead letters delivered", "%d  (%s)" % (len(dead), ", ".join(
            "%s %d" % kv for kv in sorted(collections.Counter(d.reason for d in dead).items())))),
        ("dedup keys", "%d  (%d SENDs with one)" % (len(groups), len(ledger.dedup))),
        ("SEND ERRORs (not stored)", ledger.send_errors),
        ("ACK ERRORs (not stored)", ledger.ack_errors),
        ("SEND RECEIPTs read while db down", ledger.receipts_while_down),
        ("message ids given to two messages", len(reused_ids)),
        ("broker tracebacks", tracebacks),
        ("lost", len(lost) + len(dedup_lost)),
        ("never sent", len(unknown)),
        ("acked, then redelivered", len(acked_again)),
        ("delivered twice in one run", len(same_run)),
        ("in flight on two live nodes at once", len(twice_live)),
        ("fenced (ERROR: node lost its lease)", ledger.fences),
        ("delivered before due", len(early)),
        ("dedup key stored twice", len(stored_twice)),
        ("dead-lettered wrongly", len(wrong_dead)),
        ("left in the store after the drain", left),
    ])
    same_run = [(run, body, [(d.run, d.message_id, d.tick, d.destination) for d in deliveries
                             if d.body == body])
                for run, body in same_run]
    violations = {
        "receipted SENDs never delivered": lost,
        "dedup keys none of whose receipted SENDs was delivered": dedup_lost,
        "delivered but never sent": unknown,
        "delivered after its ACK was receipted": acked_again,
        "delivered twice within one broker run": same_run,
        "in flight on two live nodes (runs) at once (body, run, holders)": twice_live,
        "delivered before due (body, ms early)": early,
        "dedup key stored twice (within its window)": stored_twice,
        "dead letter from another queue or for no reason": wrong_dead,
        "left in the store after the final drain (its ACKs not stored)": [left] if left else [],
    }
    return CrashResult(seed, totals, violations, list(ledger.errors), broker_errors)


@pytest.mark.timeout(60)
def test_kill9_cycles_lose_no_receipted_message(new_store):
    """20 kill -9 cycles on each backend (bench/crash_cycles.py runs the long version)."""
    result = run_crash_cycles(new_store(), cycles=20, seed=20261126)
    print("\n" + result.report())
    result.check()


@pytest.mark.timeout(90)
def test_kill9_cycles_two_node_cluster_lose_no_receipted_message():
    """The harness against two cluster nodes over one PostgreSQL database, producers and
    consumers on both: each cycle kills one node (or both) and starts it again. What a killed
    node held is delivered again by the other, marked redelivered; two live nodes never have
    one message in flight at once."""
    result = run_crash_cycles(postgres.fresh_database_url(), cycles=10, seed=20261206, nodes=2)
    print("\n" + result.report("kill -9 cycles, two-node cluster"))
    result.check()


@pytest.mark.timeout(90)
def test_database_outages_and_kill9_cycles_lose_no_receipted_message():
    """The same harness with the PostgreSQL server stopped and started under load: receipts
    wait for it (or become ERRORs once --db-retry runs out), never come for what is not
    committed; mixed with kill -9 of the broker, also while the database is down."""
    cluster = postgres.new_cluster()
    try:
        result = run_crash_cycles(cluster.create_database(), cycles=20, seed=20261127,
                                  outage=cluster, db_retry=1.0, outage_time=(0.05, 0.4),
                                  long_outage_rate=0.15)
    finally:
        cluster.destroy()
    print("\n" + result.report("kill -9 cycles and database outages"))
    result.check()

# ---------------------------------------------------------------------------------------------
# 2. Delivered, not ACKed, killed: delivered again
# ---------------------------------------------------------------------------------------------

def test_unacked_messages_are_delivered_again_after_kill9(new_store, brokers):
    db = new_store()
    broker = brokers(db)
    producer_ = client(broker.address)
    bodies = [b"job-%d" % i for i in range(3)]
    for body in bodies:
        producer_.request("SEND", {"destination": "/queue/jobs"}, body)   # RECEIPT: stored
    consumer_ = client(broker.address)
    consumer_.send("SUBSCRIBE", {"destination": "/queue/jobs", "id": "1",
                                 "ack": "client-individual", "prefetch": "10"})
    first = [consumer_.expect("MESSAGE") for _ in bodies]
    assert [f.body for f in first] == bodies
    # The consumer is still holding all three (no ACK) when the broker dies.
    kill9(broker)
    producer_.close()
    consumer_.close()

    broker = brokers(db)
    c = client(broker.address)
    assert count_msgs(c, "jobs") == 3
    c.send("SUBSCRIBE", {"destination": "/queue/jobs", "id": "1", "ack": "client-individual",
                         "prefetch": "10"})
    again = [c.expect("MESSAGE") for _ in bodies]
    assert [f.body for f in again] == bodies
    print("\nmessage-ids before the kill %s, after %s; redelivered headers after: %s" % (
        [f.headers["message-id"] for f in first], [f.headers["message-id"] for f in again],
        [f.headers.get("redelivered") for f in again]))
    for frame in again:
        c.request("ACK", {"id": frame.headers["ack"]})
    assert count_msgs(c, "jobs") == 0
    c.close()
    assert broker.stop() == 0
    assert stored_rows(db) == 0


# ---------------------------------------------------------------------------------------------
# 3. SIGTERM / SIGINT flush the SENDs still waiting for the group commit
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_signal_commits_unreceipted_sends(new_store, brokers, signum):
    n = 2000
    pad = b"x" * 1000
    db = new_store()
    broker = brokers(db)
    c = client(broker.address)
    data = b"".join(pymq.encode_frame("SEND", {"destination": "/queue/flush", "n": str(i)},
                                      b"%06d:" % i + pad, "1.2")
                    for i in range(n))
    c.send_bytes(data)
    # A topic SEND's RECEIPT does not wait for storage: it only proves that the broker has
    # handled every frame before it on this connection (enqueued, not necessarily committed).
    c.request("SEND", {"destination": "/topic/fence"})
    committed = stored_rows(db)
    assert broker.stop(signum) == 0
    assert any("pymq stopped" in line for line in broker.log + _rest_of_log(broker)), broker.log
    c.close()
    print("\n%s: %d of %d SENDs committed when the signal was sent"
          % (signal.Signals(signum).name, committed, n))

    broker = brokers(db)
    c = client(broker.address)
    assert count_msgs(c, "flush") == n
    c.send("SUBSCRIBE", {"destination": "/queue/flush", "id": "1", "ack": "client-individual",
                         "prefetch": "100"})
    for i in range(n):
        frame = c.expect("MESSAGE")
        assert frame.body == b"%06d:" % i + pad, (i, frame.body[:20])
        assert frame.headers["n"] == str(i)
        c.send("ACK", {"id": frame.headers["ack"]})
    assert count_msgs(c, "flush") == 0
    c.close()
    assert broker.stop() == 0


def _stalled(broker):
    """What a broker that stopped answering was doing: its log so far and, where py-spy is
    installed, its greenlets' stacks."""
    lines = list(broker.log)
    while not broker.lines.empty():
        line = broker.lines.get()
        if line is None:
            break
        lines.append(line)
    try:
        stacks = subprocess.run(["py-spy", "dump", "--pid", str(broker.proc.pid)],
                                capture_output=True, text=True, timeout=WAIT).stdout
    except (OSError, subprocess.SubprocessError):
        stacks = "(py-spy not available)"
    return "broker log:\n%s\nstacks:\n%s" % ("".join(lines[-50:]), stacks)


def _rest_of_log(broker):
    """Log lines the reader thread queued and nobody waited for yet (the process has ended)."""
    lines = []
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        line = broker.lines.get(timeout=WAIT)
        if line is None:
            break
        lines.append(line)
    return lines


# ---------------------------------------------------------------------------------------------
# 4. Message ids unique across restarts
# ---------------------------------------------------------------------------------------------

def _consume(c, count, ack):
    """`count` MESSAGEs from `c`, ACKed with receipts when `ack` is not auto."""
    frames = [c.expect("MESSAGE") for _ in range(count)]
    if ack != "auto":
        for frame in frames:
            c.request("ACK", {"id": frame.headers["ack"]})
    return frames


@pytest.mark.parametrize("ack", ["client-individual", "auto"])
def test_message_ids_stay_unique_across_restarts(new_store, brokers, ack):
    """Three runs on one file, each: SEND 5 messages, consume them all (the store ends up
    empty), stop cleanly, restart. No message-id may repeat (README: "message-id (unique, also
    across restarts)").

    client-individual: the SENDs are receipted (stored) before anyone subscribes, then ACKed
    with receipts and deleted. auto: the queue already has an auto-ack subscriber, so each
    message is delivered and acknowledged while enqueued, before its insert is committed."""
    db = new_store()
    seen = {}                           # message-id -> body
    for run in range(3):
        broker = brokers(db)
        c = client(broker.address)
        bodies = [b"run%d-%d" % (run, i) for i in range(5)]
        if ack == "client-individual":
            for body in bodies:
                c.request("SEND", {"destination": "/queue/ids"}, body)
            c.send("SUBSCRIBE", {"destination": "/queue/ids", "id": "1", "ack": ack})
        else:
            c.send("SUBSCRIBE", {"destination": "/queue/ids", "id": "1", "ack": ack})
            for body in bodies:
                c.send("SEND", {"destination": "/queue/ids"}, body)
        frames = _consume(c, len(bodies), ack)
        assert [f.body for f in frames] == bodies
        for frame in frames:
            message_id = frame.headers["message-id"]
            assert message_id not in seen, (
                "run %d: message-id %s handed out again (first for %r, now for %r)"
                % (run, message_id, seen[message_id], frame.body))
            seen[message_id] = frame.body
        assert count_msgs(c, "ids") == 0
        c.close()
        assert broker.stop() == 0
    assert stored_rows(db) == 0


def test_message_ids_stay_unique_across_kill9(tmp_path, brokers, write_lock):
    """A queue message is delivered as soon as it is enqueued, before its insert commits. If
    the broker is killed before that commit, the id it handed out must still not be handed
    out again after the restart."""
    db = tmp_path / "pymq.db"
    broker = brokers(db)
    c = client(broker.address)
    c.request("SEND", {"destination": "/queue/ids"}, b"stored")
    c.send("SUBSCRIBE", {"destination": "/queue/ids", "id": "1", "ack": "client-individual"})
    first = c.expect("MESSAGE")
    c.request("ACK", {"id": first.headers["ack"]})
    assert count_msgs(c, "ids") == 0            # the delete is committed: the store is empty
    lock = write_lock(db)                       # the next commit cannot finish...
    c.send("SEND", {"destination": "/queue/ids"}, b"in flight, not stored")
    second = c.expect("MESSAGE")                # ...but the message is delivered already
    assert second.body == b"in flight, not stored"
    kill9(broker)
    c.close()
    lock.release()

    broker = brokers(db)
    c = client(broker.address)
    c.request("SEND", {"destination": "/queue/ids"}, b"after restart")
    c.send("SUBSCRIBE", {"destination": "/queue/ids", "id": "1", "ack": "client-individual"})
    third = c.expect("MESSAGE")
    assert third.body == b"after restart"
    ids = [f.headers["message-id"] for f in (first, second, third)]
    assert len(set(ids)) == 3, "message-ids %s: %r reused after kill -9" % (ids, ids[2])
    c.close()


# ---------------------------------------------------------------------------------------------
# 4b. What a RECEIPT promises, made deterministic by holding SQLite's write lock
# ---------------------------------------------------------------------------------------------

def test_send_receipt_waits_for_the_commit(tmp_path, brokers, write_lock):
    """Positive control for the lock technique: a queue SEND's RECEIPT does not come while
    the commit cannot happen, comes once it can, and the message then survives kill -9."""
    db = tmp_path / "pymq.db"
    broker = brokers(db)
    c = client(broker.address)
    count_msgs(c, "q")                          # the store is open and idle
    lock = write_lock(db)
    c.send("SEND", {"destination": "/queue/q", "receipt": "held"}, b"m")
    with pytest.raises(OSError):                # socket timeout: nothing arrives
        c.expect(timeout=0.5)
    lock.release()
    assert c.expect("RECEIPT", timeout=WAIT).headers["receipt-id"] == "held"
    kill9(broker)
    c.close()
    broker = brokers(db)
    c = client(broker.address)
    assert count_msgs(c, "q") == 1
    c.close()


def test_receipted_ack_survives_kill9(tmp_path, brokers, write_lock):
    """README: "The RECEIPT of an ACK comes once the deletion is durable: that message will
    never be delivered again." While the delete cannot commit, no RECEIPT; kill -9 right
    after the RECEIPT does not bring the message back."""
    db = tmp_path / "pymq.db"
    broker = brokers(db)
    c = client(broker.address)
    c.request("SEND", {"destination": "/queue/q"}, b"job")
    c.send("SUBSCRIBE", {"destination": "/queue/q", "id": "1", "ack": "client-individual"})
    message = c.expect("MESSAGE")
    lock = write_lock(db)                       # the delete cannot commit yet
    c.send("ACK", {"id": message.headers["ack"], "receipt": "ack"})
    with pytest.raises(OSError):                # socket timeout: no RECEIPT before the commit
        c.expect(timeout=0.5)
    lock.release()
    assert c.expect("RECEIPT", timeout=WAIT).headers["receipt-id"] == "ack"
    kill9(broker)                               # right after the RECEIPT
    c.close()
    lock.release()
    broker = brokers(db)
    c = client(broker.address)
    assert count_msgs(c, "q") == 0, "the receipted ACK was undone by kill -9"
    c.close()


# ---------------------------------------------------------------------------------------------
# 5. A store of another schema version is refused
# ---------------------------------------------------------------------------------------------

def test_other_schema_version_is_refused_with_a_clear_log_line(tmp_path, brokers):
    db = tmp_path / "pymq.db"
    broker = brokers(db)
    client(broker.address).request("SEND", {"destination": "/queue/q"}, b"kept")
    assert broker.stop() == 0
    conn = sqlite3.connect(str(db))
    conn.execute("PRAGMA user_version=99")
    conn.close()

    result = subprocess.run([sys.executable, str(ROOT / "pymq.py"), "--port", "0",
                             "--db", str(db)], cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result
    # The last word is one clear log line, whatever else was printed before it.
    last = result.stderr.strip().splitlines()[-1]
    assert re.search(r" ERROR pymq: cannot start on .* with store .*pymq\.db: .*pymq\.db has "
                     r"schema version 99; this pymq reads version 2 \(or upgrades older ones\): use a "
                     r"newer pymq$", last), result.stderr
    assert "listening" not in result.stderr
    if "Traceback" in result.stderr:
        # gevent's thread pool prints the worker's exception before pymq logs it: noise, but
        # not a traceback-only crash.
        print("\nnote: a traceback precedes the log line:\n" + result.stderr)
    # The file is left as it was: still version 99, the message still there.
    conn = sqlite3.connect(str(db))
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 99
        assert conn.execute("SELECT body FROM messages").fetchall() == [(b"kept",)]
    finally:
        conn.close()

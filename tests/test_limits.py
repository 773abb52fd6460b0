"""Resource limits, disk trouble and security basics: what keeps one client, or a full disk,
from hurting everyone else."""

import itertools
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

import pytest

import pymq
from conftest import RawClient, TIMEOUT


def wait_until(condition, timeout=TIMEOUT, what="condition"):
    """Poll a cheap condition on the broker's state: no event to block on from outside."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.01)


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


# -- connections, subscriptions, receipts ------------------------------------------------------

def test_connections_beyond_the_limit_are_refused_politely(start_broker):
    broker = start_broker(max_connections=3)
    clients = [RawClient(broker.address) for _ in range(3)]
    for client in clients:
        client.connect("1.2")
    refused = RawClient(broker.address)
    frame = refused.expect("ERROR")
    assert frame.headers["message"] == "too many connections"
    refused.expect_closed()
    assert broker.stats["refused"] == 1
    clients.pop().send("DISCONNECT", {"receipt": "bye"})
    wait_until(lambda: broker.call(lambda: len(broker.server.connections)) == 2,
               what="a connection to close")
    RawClient(broker.address).connect("1.2")      # room again


def test_subscriptions_per_connection_are_limited(start_broker):
    broker = start_broker(max_subscriptions=2)
    client = RawClient(broker.address)
    client.connect("1.2")
    client.request("SUBSCRIBE", {"destination": "/topic/a", "id": "1"})
    client.request("SUBSCRIBE", {"destination": "/queue/b", "id": "2"})
    client.request("SUBSCRIBE", {"destination": "/topic/a", "id": "1"})    # same one: allowed
    client.send("SUBSCRIBE", {"destination": "/topic/c", "id": "3", "receipt": "r"})
    client.expect_error("max-subscriptions is 2", receipt="r")


class WriteLock:
    """Hold SQLite's write lock on the broker's file: its next commit waits (under 5 s)."""

    def __init__(self, path):
        self.db = sqlite3.connect(path, isolation_level=None, timeout=TIMEOUT)
        self.db.execute("BEGIN IMMEDIATE")

    def release(self):
        self.db.execute("ROLLBACK")
        self.db.close()


def test_pending_receipts_pause_reading_not_memory(start_broker, tmp_path):
    path = str(tmp_path / "slow.db")
    broker = start_broker(db=path, max_pending_receipts=5)
    client = RawClient(broker.address)
    client.connect("1.2")
    client.request("SEND", {"destination": "/queue/warm"})      # the store is open and warm
    lock = WriteLock(path)
    frames = b"".join(pymq.encode_frame("SEND", {"destination": "/queue/q", "receipt": str(i)},
                                        b"m%d" % i) for i in range(30))
    client.send_bytes(frames)

    def pending():
        conns = [c for c in broker.server.connections if c.session]
        return max(len(c._receipts) for c in conns)

    wait_until(lambda: broker.call(pending) == 6, what="the reader to pause")
    assert broker.call(lambda: len(broker.server.storage._pending.inserts)) <= 6
    lock.release()
    assert [client.expect("RECEIPT").headers["receipt-id"] for _ in range(30)] == \
        [str(i) for i in range(30)]


# -- memory under floods (a broker process, its RSS read from /proc) ---------------------------

def test_connection_flood_keeps_memory_bounded(broker_process):
    broker = broker_process("--max-connections", "100", "--db", "memory:")
    pid = broker.proc.pid
    before = rss_kb(pid)
    clients = []
    for _ in range(300):
        sock = socket.create_connection(broker.address, timeout=TIMEOUT)
        clients.append(sock)
    # The first 100 wait for CONNECT; the others got an ERROR: read it, so they are done.
    for sock in clients[100:]:
        assert sock.recv(4096).startswith(b"ERROR\n")
    grown = rss_kb(pid) - before
    for sock in clients:
        sock.close()
    assert grown < 20 * 1024, "RSS grew %d kB for 300 connection attempts" % grown
    assert broker.stop() == 0


def test_send_flood_without_receipts_stays_within_the_async_budget(broker_process, tmp_path):
    broker = broker_process("--async-budget", str(4 * 1024 * 1024),
                            "--db", str(tmp_path / "flood.db"))
    pid = broker.proc.pid
    client = RawClient(broker.address)
    client.connect("1.2")
    client.request("SEND", {"destination": "/queue/warm"})
    before = rss_kb(pid)
    frame = pymq.encode_frame("SEND", {"destination": "/queue/flood"}, b"z" * 100000)
    peak = 0
    for i in range(2000):                    # 200 MB, fifty times the budget
        client.send_bytes(frame)
        if i % 100 == 0:
            peak = max(peak, rss_kb(pid) - before)
    count = client.request("SEND", {"destination": "/control/count-msgs/queue/flood"})
    assert count.headers["num-messages"] == "2000"          # nothing dropped
    peak = max(peak, rss_kb(pid) - before)
    # PyPy's nursery (pymq.PYPY_GC) is touched page by page the first time it fills.
    nursery = 64 * 1024 if sys.implementation.name == "pypy" else 0
    assert peak < 64 * 1024 + nursery, "RSS grew %d kB for a 200 MB flood" % peak
    assert broker.stop() == 0


# -- disk trouble ------------------------------------------------------------------------------

@pytest.fixture
def small_disk():
    """A 2 MB tmpfs of the test's own (root only: CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mountpoint = tempfile.mkdtemp(prefix="pymq-disk-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", mountpoint], check=True)
    yield mountpoint
    subprocess.run(["umount", "-l", mountpoint], check=False)
    shutil.rmtree(mountpoint, ignore_errors=True)


def test_full_disk_gets_errors_not_receipts_and_recovers(start_broker, small_disk):
    broker = start_broker(db=os.path.join(small_disk, "pymq.db"))
    producer = RawClient(broker.address)
    producer.connect("1.2")
    stored = 0
    while True:
        producer.send("SEND", {"destination": "/queue/big", "receipt": str(stored)},
                      b"x" * 100000)
        frame = producer.expect()
        if frame.command == "ERROR":
            break
        assert frame.command == "RECEIPT"
        stored += 1
        assert stored < 100, "a 2 MB disk took 10 MB"
    assert "not stored" in frame.headers["message"]
    assert frame.headers["receipt-id"] == str(stored)          # the SEND that failed
    producer.expect_closed()
    # Topics and the messages already stored are still served.
    reader = RawClient(broker.address)
    reader.connect("1.2")
    reader.request("SUBSCRIBE", {"destination": "/topic/news", "id": "t"})
    reader.send("SEND", {"destination": "/topic/news"}, b"still here")
    assert reader.expect("MESSAGE").body == b"still here"
    reader.request("SUBSCRIBE", {"destination": "/queue/big", "id": "q", "prefetch": "2",
                                 "ack": "client-individual"})
    assert [len(reader.expect("MESSAGE").body) for _ in range(2)] == [100000, 100000]
    # Space comes back: the same broker stores again, no restart.
    subprocess.run(["mount", "-o", "remount,size=64m", small_disk], check=True)
    producer = RawClient(broker.address)
    producer.connect("1.2")
    producer.request("SEND", {"destination": "/queue/after"}, b"stored again")
    count = producer.request("SEND", {"destination": "/control/count-msgs/queue/big"})
    assert count.headers["num-messages"] == str(stored)


# -- security basics ---------------------------------------------------------------------------

def test_debug_log_shows_no_credentials_and_no_bodies(broker_process):
    broker = broker_process("--debug", "--login", "alice", "--passcode", "pa55-w0rd-x",
                            "--db", "memory:")
    client = RawClient(broker.address)
    client.connect("1.2", login="alice", passcode="pa55-w0rd-x")
    client.request("SUBSCRIBE", {"destination": "/topic/t", "id": "1"})
    client.send("SEND", {"destination": "/topic/t"}, b"BODY-SECRET-123")
    assert client.expect("MESSAGE").body == b"BODY-SECRET-123"
    bad = RawClient(broker.address)
    bad.send("CONNECT", {"accept-version": "1.2", "login": "alice", "passcode": "guess-9x7"})
    bad.expect_error("bad credentials")
    assert broker.stop() == 0
    log = "".join(broker.log) + "".join(iter(lambda: broker.lines.get(timeout=5) or "", ""))
    assert "SEND" in log                                    # it did log the frames
    for secret in ("pa55-w0rd-x", "guess-9x7", "BODY-SECRET-123"):
        assert secret not in log


def test_closed_connections_leave_no_reference_cycles(start_broker):
    """A closed connection's objects are freed by reference counting, at once: none waits in
    a cycle for the garbage collector (memory would pile up between collections, and a full
    collection over 10,000 connections stalls every client). After clients that subscribe,
    consume, leave transactions open, break the protocol or vanish, no broker object may be
    left for the cyclic collector to find."""
    import gc
    if not hasattr(gc, "set_debug"):
        pytest.skip("PyPy has no reference counting: its collector frees every object, "
                    "cycles or not")
    broker = start_broker()

    sessions = itertools.count()

    def session(end):
        queue = "/queue/jobs.%d" % next(sessions)
        client = RawClient(broker.address)
        client.connect("1.2")
        client.request("SUBSCRIBE", {"destination": queue, "id": "q",
                                     "ack": "client-individual"})
        client.request("SUBSCRIBE", {"destination": "/topic/news.*", "id": "t"})
        client.send("BEGIN", {"transaction": "tx"})
        client.send("SEND", {"destination": queue}, b"job")
        client.send("SEND", {"destination": "/topic/news.today"}, b"news")
        messages = {client.expect("MESSAGE").headers["subscription"] for _ in range(2)}
        assert messages == {"q", "t"}
        if end == "disconnect":
            client.request("DISCONNECT")
        elif end == "garbage":
            client.send_bytes(b"NONSENSE\n\n\0")
            client.expect("ERROR")
        client.close()              # "vanish": in flight, unacknowledged, transaction open

    for end in ("disconnect", "garbage", "vanish"):
        session(end)                # warm-up: caches, interned strings
    wait_until_idle = time.monotonic() + TIMEOUT
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for end in ("disconnect", "garbage", "vanish") * 5:
            session(end)
        while broker.call(lambda: len(broker.server.connections)) and \
                time.monotonic() < wait_until_idle:
            time.sleep(0.01)
        assert broker.call(lambda: len(broker.server.connections)) == 0
        broker.call(gc.collect)
        ours = [type(o).__name__ for o in gc.garbage
                if type(o).__module__ in ("pymq", "pymq_storage.base")]
        assert ours == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()

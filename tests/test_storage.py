"""The storage contract (pymq_storage), run against every backend.

The tests drive Storage directly from the pytest main thread: gevent code runs there on the
thread's hub without monkey-patching (Storage only needs greenlets, events and, for blocking
backends, its own thread pool). Every wait that a bug could turn into a hang is bounded by
`within()`, so a hang is reported as a failure rather than blocking the run.

  * Contract suite, parametrised over BACKENDS: save/wait/count/load, delivery order, the
    `after` cursor, limits, queue isolation, exact round trip of headers, bodies and
    ack_timeout, deletes (including cancelling a pending insert), group commit, reads riding
    after writes, seq allocation, the insert budget, close() committing what is pending, and a
    hypothesis test of random save/delete/load/count sequences against a dict model.
  * Durable backends (DURABLE): seqs unique across reopen, survival of a simulated crash
    (a subprocess that os._exit()s without closing), close() then reopen.
  * SQLite specifics: schema version and foreign-database checks, URL forms, the one worker
    thread that does all of SQLite's work, a failing batch rolled back as a whole.
  * Fault injection: a MemoryBackend whose apply() fails on demand -> StorageError for every
    waiter, budget released, later batches fine.
"""

import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import gevent
import gevent.event
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymq_storage import (Backend, Storage, StorageError, StoredMessage, now_ms, open_backend,
                          open_storage)
import pymq_storage.base
from pymq_storage.base import Histogram
from conftest import STORE_TIMEOUT as TIMEOUT, shutdown, within
from pymq_storage.memory import MemoryBackend
from pymq_storage.sqlite import SCHEMA_VERSION, SQLiteBackend
import postgres

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Backends under test. A URL factory takes a fresh, empty directory and returns the URL of an
# empty store. To run the whole suite against another backend, add one line here (e.g.
# "postgresql": lambda directory: fresh_postgresql_database_url(),); every backend other than
# "memory" is also run through the durability (reopen / crash) tests.
# ---------------------------------------------------------------------------------------------

BACKENDS = {
    "memory": lambda directory: "memory:",
    "sqlite": lambda directory: "sqlite:///" + str(Path(directory).resolve() / "pymq.db"),
    "postgresql": lambda directory: postgres.fresh_database_url(),
}
DURABLE = [name for name in BACKENDS if name != "memory"]


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures
# ---------------------------------------------------------------------------------------------

def join_all(greenlets, seconds=10.0):
    """Wait for every greenlet; fail if any is still running after `seconds`."""
    gevent.joinall(greenlets, timeout=seconds)
    stuck = [g for g in greenlets if not g.dead]
    assert not stuck, "%d of %d greenlets still blocked after %s s" % (
        len(stuck), len(greenlets), seconds)


@pytest.fixture(params=list(BACKENDS))
def backend_url(request, tmp_path):
    return BACKENDS[request.param](tmp_path)


@pytest.fixture(params=DURABLE)
def durable_url(request, tmp_path):
    return BACKENDS[request.param](tmp_path)


@pytest.fixture
def store(open_store, backend_url):
    return open_store(backend_url)


def put(storage, queue="q", priority=4, body=b"x", headers=(), ack_timeout=0.0):
    """Create and save a message; returns (message, batch) without waiting."""
    message = storage.new_message(queue, priority, ack_timeout, list(headers), body)
    return message, storage.save(message)


def put_wait(storage, *args, **kwargs):
    message, batch = put(storage, *args, **kwargs)
    within(batch.wait)
    return message


def load(storage, queue="q", after=None, limit=1000):
    return within(storage.load, queue, after, limit)


def count(storage, queue="q"):
    return within(storage.count, queue)[0]


def seqs(messages):
    return [m.seq for m in messages]


def delivery_order(messages):
    return seqs(sorted(messages, key=lambda m: (-m.priority, m.seq)))


def assert_same_message(loaded, sent):
    assert loaded.seq == sent.seq
    assert loaded.queue == sent.queue
    assert loaded.priority == sent.priority
    assert loaded.ack_timeout == sent.ack_timeout
    assert type(loaded.ack_timeout) is float
    assert list(loaded.headers) == list(sent.headers)
    assert all(type(pair) is tuple and len(pair) == 2 for pair in loaded.headers)
    assert loaded.body == sent.body
    assert type(loaded.body) is bytes


# ---------------------------------------------------------------------------------------------
# Save, count, load
# ---------------------------------------------------------------------------------------------

def test_save_wait_then_count_and_load_see_it(store):
    message = put_wait(store, "q", 7, b"hello", [("a", "1")], 2.5)
    assert count(store) == 1
    [loaded] = load(store)
    assert_same_message(loaded, message)
    assert store.stats["inserts"] == 1
    assert store.pending_bytes == 0


def test_load_order_is_priority_high_first_then_arrival(store):
    priorities = [3, 9, 0, 4, 9, 5, 0, 4, 4, 1, 8, 2, 6, 7, 9, 3, 0, 5]
    sent = [put(store, priority=p, body=b"%d" % i)[0] for i, p in enumerate(priorities)]
    within(store.flush)
    got = load(store)
    assert seqs(got) == delivery_order(sent)
    assert [m.priority for m in got] == sorted(priorities, reverse=True)
    # within one priority, arrival order
    fours = [m.body for m in got if m.priority == 4]
    assert fours == [b"3", b"7", b"8"]


def test_after_cursor_continues_exactly_where_the_last_load_stopped(store):
    priorities = [9, 9, 5, 5, 5, 5, 4, 0, 9, 5, 0, 0, 2]
    sent = [put(store, priority=p)[0] for p in priorities]
    expected = delivery_order(sent)
    for limit in (1, 2, 3, 4, 5, 13, 50):
        pages, after = [], None
        while True:
            page = load(store, after=after, limit=limit)
            assert len(page) <= limit
            if not page:
                break
            pages.extend(page)
            after = page[-1].key
        assert seqs(pages) == expected, "limit %d" % limit


def test_after_cursor_crosses_priorities_and_tolerates_a_deleted_cursor(store):
    top = put_wait(store, priority=9)
    mid = [put_wait(store, priority=5) for _ in range(3)]
    low = put_wait(store, priority=1)
    # the cursor at the last message of priority 9 continues with priority 5
    assert seqs(load(store, after=top.key, limit=2)) == seqs(mid[:2])
    # the cursor at the end of priority 5 jumps to priority 1
    assert seqs(load(store, after=mid[-1].key, limit=10)) == [low.seq]
    # the message the cursor points at was deleted (ACKed) meanwhile: still continues after it
    store.delete(mid[0].seq)
    assert seqs(load(store, after=mid[0].key, limit=10)) == seqs(mid[1:]) + [low.seq]
    # a cursor past everything gives nothing; a cursor before everything gives everything
    assert load(store, after=low.key) == []
    assert seqs(load(store, after=(-10, 0))) == [top.seq] + seqs(mid[1:]) + [low.seq]
    # a cursor in a priority that holds no messages
    assert seqs(load(store, after=(-7, 0), limit=10)) == seqs(mid[1:]) + [low.seq]


def test_load_limit_is_respected(store):
    sent = [put(store, priority=i % 3)[0] for i in range(10)]
    expected = delivery_order(sent)
    for limit in (0, 1, 2, 9, 10, 11, 1000):
        assert seqs(load(store, limit=limit)) == expected[:limit]
    assert seqs(load(store, after=sent[0].key, limit=2)) == \
        expected[expected.index(sent[0].seq) + 1:][:2]


def test_queues_are_independent(store):
    a = [put(store, "a", priority=p)[0] for p in (1, 5, 3)]
    b = [put(store, "b", priority=p)[0] for p in (5, 1)]
    c = put(store, "queue/with:odd chars é", priority=4)[0]
    within(store.flush)
    assert count(store, "a") == 3 and count(store, "b") == 2
    assert count(store, "queue/with:odd chars é") == 1
    assert seqs(load(store, "a")) == delivery_order(a)
    assert seqs(load(store, "b")) == delivery_order(b)
    assert seqs(load(store, "queue/with:odd chars é")) == [c.seq]
    # a queue name that is a prefix of another, and an unknown queue
    assert count(store, "") == 0 and load(store, "") == []
    assert count(store, "nope") == 0 and load(store, "nope") == []
    # a cursor taken from queue b applies to a's messages only
    assert seqs(load(store, "a", after=b[0].key)) == \
        delivery_order([m for m in a if m.key > b[0].key])
    # deleting in one queue leaves the other alone
    for message in a:
        store.delete(message.seq)
    assert count(store, "a") == 0 and load(store, "a") == []
    assert count(store, "b") == 2 and seqs(load(store, "b")) == delivery_order(b)


HEADERS = [
    ("content-type", "text/plain; charset=utf-8"),
    ("x-unicode", "héllo wörld — 日本語 🚀"),
    ("ключ", "значение"),
    ("colon:in:name", "value:with:colons"),
    ("newline", "line1\nline2\r\nline3"),
    ("backslash", "a\\b\\nc"),
    ("empty", ""),
    ("dup", "first"),
    ("dup", "second"),
    ("nul", "a\x00b"),
    ("quote", "\"json\" {'x': [1]}"),
    ("", "empty name"),
]


@pytest.mark.parametrize("body", [
    b"",
    b"\x00",
    b"a\x00b\x00\x00c",
    bytes(range(256)) * 4,
    "utf-8 text é 🚀".encode(),
    b"\xff\xfe\x00\x00not utf-8 \x80\x81",
], ids=["empty", "nul", "nuls", "all-bytes", "utf8", "invalid-utf8"])
def test_headers_and_binary_bodies_round_trip_exactly(store, body):
    message = put_wait(store, "q", 6, body, HEADERS, 1.25)
    [loaded] = load(store)
    assert_same_message(loaded, message)
    assert list(loaded.headers) == HEADERS


def test_large_body_round_trips(store):
    body = os.urandom(1 << 20) + b"\x00" * 1000
    message = put_wait(store, body=body)
    [loaded] = load(store)
    assert loaded.body == body and loaded.seq == message.seq


@pytest.mark.parametrize("ack_timeout", [0.0, 0.001, 1.5, 30.0, 0.1 + 0.2, 1e-9, 86400.123456789])
def test_ack_timeout_float_round_trips(store, ack_timeout):
    put_wait(store, ack_timeout=ack_timeout)
    [loaded] = load(store)
    assert loaded.ack_timeout == ack_timeout
    assert type(loaded.ack_timeout) is float


def test_every_priority_round_trips(store):
    sent = [put(store, priority=p)[0] for p in range(10)]
    got = load(store)
    assert [m.priority for m in got] == list(range(9, -1, -1))
    assert seqs(got) == delivery_order(sent)


# ---------------------------------------------------------------------------------------------
# Deletes
# ---------------------------------------------------------------------------------------------

def test_delete_removes(store):
    keep = put_wait(store, priority=1)
    gone = put_wait(store, priority=9)
    store.delete(gone.seq)
    assert count(store) == 1
    assert seqs(load(store)) == [keep.seq]
    assert store.stats["deletes"] == 1
    assert store.stats["cancelled"] == 0


def test_delete_of_unknown_seq_is_harmless(store):
    message = put_wait(store)
    store.delete(message.seq + 10**9)       # never existed
    store.delete(-1)
    assert count(store) == 1
    store.delete(message.seq)
    store.delete(message.seq)               # twice in the same batch
    assert count(store) == 0
    store.delete(message.seq)               # already deleted in an earlier batch
    assert count(store) == 0
    assert load(store) == []
    # the store still works
    again = put_wait(store)
    assert seqs(load(store)) == [again.seq]


def test_delete_while_insert_pending_cancels_it(store):
    """Save then delete before the committer runs: the message is never written."""
    other, _ = put(store, "other")
    message, batch = put(store)
    assert store.pending_bytes == message.size + other.size
    store.delete(message.seq)                # same batch, no yield in between
    assert store.stats["cancelled"] == 1
    assert store.pending_bytes == other.size
    assert count(store) == 0
    assert load(store) == []
    assert store.stats["inserts"] == 1       # only `other` was written
    assert store.stats["deletes"] == 0       # and no delete was sent to the backend
    assert count(store, "other") == 1
    assert store.pending_bytes == 0
    assert batch.done.is_set() and batch.error is None


def test_a_batch_holds_for_acks_unless_somebody_waits_for_it(open_store, durable_url):
    """Inserts that nobody waits for (their messages are out to consumers) wait up to
    HOLD_FOR_ACKS before the commit: an ACK in that time cancels the write. Once somebody
    waits (Storage.awaited: a RECEIPT no ACK will settle), the batch starts at once."""
    store = open_store(durable_url)
    held, batch = put(store)
    gevent.sleep(0)                         # the committer takes it, and holds
    store.delete(held.seq)                  # the consumer's ACK
    within(batch.wait)
    assert store.stats["cancelled"] == 1 and store.stats["inserts"] == 0
    awaited, batch = put(store)
    store.awaited(batch)
    gevent.sleep(0)                         # the committer takes it, and applies it
    store.delete(awaited.seq)               # too late to cancel: a delete of its own
    within(batch.wait)
    assert store.stats["cancelled"] == 1 and store.stats["inserts"] == 1
    within(store.flush)
    assert count(store) == 0


def test_a_hold_lasts_while_each_insert_is_acked_in_time(open_store, durable_url, monkeypatch):
    """The hold counts from the oldest insert not yet ACKed, not from the batch's start: a
    stream of messages, each ACKed within HOLD_FOR_ACKS, is never written however long it
    lasts (at W=1 there is always a message in flight); one left unACKed is, once it has
    waited HOLD_FOR_ACKS. (The hold lengthened, so that the steps of the stream have room.)"""
    monkeypatch.setattr(pymq_storage.base, "HOLD_FOR_ACKS", 0.2)
    store = open_store(durable_url)
    previous, batch = put(store)
    gevent.sleep(0)                         # the committer takes it, and holds
    started = time.monotonic()
    for _ in range(4):                      # twice the hold in all, each message half of it
        gevent.sleep(0.1)
        message, _ = put(store)
        store.delete(previous.seq)          # its ACK
        previous = message
    assert time.monotonic() - started >= 0.4
    assert not batch.done.is_set() and store.stats["inserts"] == 0
    acked = time.monotonic()
    within(batch.wait)                      # the last one is never ACKed: written
    assert time.monotonic() - acked >= 0.1
    assert store.stats["inserts"] == 1 and store.stats["cancelled"] == 4
    assert count(store) == 1


def test_cancelled_save_batch_still_completes(store):
    """The save's batch must complete without error even if the cancelled insert was all it
    held (the waiter of that save must not block forever)."""
    message, batch = put(store)
    store.delete(message.seq)
    assert store.stats["cancelled"] == 1
    within(batch.wait, seconds=1.0, what="Batch.wait() of a save whose insert was cancelled")
    assert store.pending_bytes == 0
    assert count(store) == 0


def test_delete_returns_a_batch_to_wait_for_durability(store):
    """delete() returns the batch that makes the deletion durable (an ACK receipt waits on it)
    when the delete goes to the backend, whether the message is known or not; None when it
    cancelled a pending insert (nothing is written, nothing to wait for)."""
    committed = put_wait(store)
    batch = store.delete(committed.seq)
    within(batch.wait)
    assert batch.error is None
    pending, save_batch = put(store)
    assert store.delete(pending.seq) is None
    within(save_batch.wait)
    assert save_batch.error is None
    unknown_batch = store.delete(10**15)
    within(unknown_batch.wait)
    assert store.pending_bytes == 0
    assert count(store) == 0


def test_delete_after_the_insert_committed_is_not_a_cancel(store):
    message, batch = put(store)
    within(batch.wait)
    store.delete(message.seq)
    assert store.stats["cancelled"] == 0
    assert count(store) == 0
    assert store.stats["deletes"] == 1


def test_delete_while_insert_is_being_applied_is_not_lost(store):
    """The committer took the insert's batch already: the delete goes to the next batch."""
    message, batch = put(store)
    gevent.sleep(0)                          # the committer picks up (maybe finishes) the batch
    store.delete(message.seq)
    within(batch.wait)
    assert count(store) == 0
    assert load(store) == []


# ---------------------------------------------------------------------------------------------
# Group commit
# ---------------------------------------------------------------------------------------------

def test_group_commit_shares_batches_between_concurrent_savers(store):
    n = 200
    results = {}

    def sender(i):
        message = store.new_message("q", i % 10, 0.0, [("i", str(i))], b"%d" % i)
        store.save(message).wait()
        results[i] = message

    before = store.stats["batches"]
    greenlets = [gevent.spawn(sender, i) for i in range(n)]
    join_all(greenlets)
    assert all(g.successful() for g in greenlets), [g.exception for g in greenlets if g.exception]
    assert len(results) == n
    batches = store.stats["batches"] - before
    assert 1 <= batches < 50, "%d batches for %d concurrent savers: no sharing" % (batches, n)
    assert store.stats["inserts"] == n
    assert store.pending_bytes == 0
    assert count(store) == n
    assert seqs(load(store)) == delivery_order(results.values())


def test_all_waiters_of_one_batch_are_woken_together(store):
    messages, batches = zip(*[put(store, body=b"%d" % i) for i in range(20)])
    batch = batches[0]
    assert all(b is batch for b in batches), "saves without a yield share one batch"
    woken = []

    def waiter(i):
        batch.wait()
        woken.append(i)

    before = store.stats["batches"]
    greenlets = [gevent.spawn(waiter, i) for i in range(len(messages))]
    join_all(greenlets)
    assert sorted(woken) == list(range(len(messages)))
    assert store.stats["batches"] - before == 1
    assert batch.done.is_set() and batch.error is None
    assert count(store) == 20


def test_a_batch_in_flight_does_not_swallow_later_saves(store):
    """Saves made while the committer applies a batch go into the next one and commit too."""
    first, first_batch = put(store)
    gevent.sleep(0)                          # let the committer start on the first batch
    second, second_batch = put(store)
    within(second_batch.wait)
    within(first_batch.wait)
    assert count(store) == 2
    assert seqs(load(store)) == [first.seq, second.seq]


# ---------------------------------------------------------------------------------------------
# Reads ride after writes
# ---------------------------------------------------------------------------------------------

def test_load_async_answers_many_first_loads_at_once(store):
    """Loads from the start of 1,200 queues in one batch (a crowd of new subscribers; more
    than one chunk of the backends' which-queues-hold-anything query), some empty, names
    that need quoting, a load with a cursor and a count among them: each callback gets its
    own Load and the same messages a load of its own would have returned."""
    names = ["q%d" % i for i in range(1200)] + ["it's", "100%", 'q"x', "q,(?)", ""]
    holding = names[::7] + ["it's", "100%", 'q"x', "q,(?)"]
    sent = {name: [put(store, name, priority=p % 10)[0] for p in range(3)] for name in holding}
    within(store.barrier().wait)
    answers = {}

    def callback(load, messages):
        answers[load.queue, load.after] = messages

    loads = [store.load_async(name, None, 1000, callback) for name in names]
    cursor = sorted(sent["q0"], key=lambda m: m.key)[0].key
    with_cursor = store.load_async("q0", cursor, 1000, callback)
    counted = count(store, "q7")
    assert counted == 3
    assert all(load.queue == name for load, name in zip(loads, names))
    assert len(answers) == len(names) + 1
    for name in names:
        assert seqs(answers[name, None]) == delivery_order(sent.get(name, []))
    assert seqs(answers["q0", with_cursor.after]) == delivery_order(sent["q0"])[1:]


def test_probe_async_tells_which_queues_hold_messages(store):
    """1,200+ probes in one batch (a crowd of new subscribers; more than one chunk of the
    backends' query), names that need quoting, and a message saved in the same batch (the
    probe rides after the writes): on_probed gets the batch and the names holding any."""
    names = ["q%d" % i for i in range(1200)] + ["it's", "100%", 'q"x', "q,(?)", ""]
    holding = set(names[::7] + ["it's", "100%", 'q"x', "q,(?)"])
    for name in sorted(holding - {"q7"}):
        put(store, name)
    within(store.barrier().wait)
    put(store, "q7")                            # not waited for: same batch as the probes
    answers = []
    store.on_probed = lambda batch, held: answers.append((batch, held))
    batches = {store.probe_async(name) for name in names}
    assert len(batches) == 1
    within(batches.pop().wait)
    [(batch, held)] = answers
    assert batch.probes == names
    assert held == holding


def test_count_and_load_after_an_unwaited_save_see_it(store):
    message, batch = put(store)
    assert not batch.done.is_set()
    assert count(store) == 1
    message2, _ = put(store, priority=9)
    assert seqs(load(store)) == [message2.seq, message.seq]


def test_load_after_an_unwaited_delete_does_not_return_it(store):
    a = put_wait(store)
    b = put_wait(store)
    store.delete(a.seq)
    assert seqs(load(store)) == [b.seq]
    store.delete(b.seq)
    assert count(store) == 0


def test_reads_see_writes_asked_for_while_another_batch_is_in_flight(store):
    first, _ = put(store, priority=1)
    gevent.sleep(0)                          # the committer is (or was) applying the first batch
    second, _ = put(store, priority=2)
    store.delete(first.seq)
    assert seqs(load(store)) == [second.seq]
    assert count(store) == 1


def test_concurrent_readers_and_writers(store):
    """Many greenlets each save then read: every read sees at least the reader's own save."""
    seen = {}

    def worker(i):
        message, _ = put(store, "q%d" % (i % 3), priority=i % 10)
        got = store.load("q%d" % (i % 3), None, 1000)
        seen[i] = (message.seq, seqs(got), count(store, "q%d" % (i % 3)))

    greenlets = [gevent.spawn(worker, i) for i in range(60)]
    join_all(greenlets)
    assert all(g.successful() for g in greenlets)
    for seq, loaded, counted in seen.values():
        assert seq in loaded
        assert counted >= len(loaded) >= 1
    assert sum(count(store, "q%d" % k) for k in range(3)) == 60


# ---------------------------------------------------------------------------------------------
# Seq allocation
# ---------------------------------------------------------------------------------------------

def test_new_message_seqs_strictly_increase(store):
    handed_out = [store.new_message("q%d" % (i % 4), i % 10, 0.0, [], b"").seq
                  for i in range(500)]
    assert all(b > a for a, b in zip(handed_out, handed_out[1:]))
    # saving and committing does not disturb the sequence
    more = [put_wait(store).seq for _ in range(5)]
    assert more[0] > handed_out[-1]
    assert all(b > a for a, b in zip(more, more[1:]))


def test_seqs_unique_across_reopen_even_after_everything_was_deleted(durable_url, open_store):
    storage = open_store(durable_url)
    handed_out = []
    for i in range(20):
        handed_out.append(put_wait(storage, priority=i % 10).seq)
    for seq in handed_out:
        storage.delete(seq)
    assert count(storage) == 0
    within(storage.close)
    for _ in range(3):
        storage = open_store(durable_url)
        assert count(storage) == 0
        fresh = storage.new_message("q", 4, 0.0, [], b"").seq
        assert fresh > max(handed_out), "seq %d reused after reopen (max handed out: %d)" % (
            fresh, max(handed_out))
        handed_out.append(fresh)
        handed_out.append(put_wait(storage).seq)
        storage.delete(handed_out[-1])
        assert count(storage) == 0
        within(storage.close)


def test_seqs_unique_across_reopen_when_the_last_insert_was_cancelled(durable_url, open_store):
    """A message ACKed before its insert committed was still delivered under its seq (the
    message-id): after a restart that seq must not be handed out again."""
    storage = open_store(durable_url)
    committed = put_wait(storage)
    cancelled, _ = put(storage)
    storage.delete(cancelled.seq)            # cancels the pending insert
    assert storage.stats["cancelled"] == 1
    assert count(storage) == 1               # completes the batch
    within(storage.close)
    storage = open_store(durable_url)
    fresh = storage.new_message("q", 4, 0.0, [], b"").seq
    assert fresh > committed.seq
    assert fresh > cancelled.seq, (
        "seq %d handed out again after reopen (it was the id of a cancelled message)" % fresh)


# ---------------------------------------------------------------------------------------------
# Import: another broker's messages, each once (pymq_storage/ocamlmq.py drives it)
# ---------------------------------------------------------------------------------------------

def import_wait(storage, ids, deliveries=0):
    """Import one message per id (body: the id); the seqs of those skipped."""
    messages = [storage.new_message("q", 4, 1.5, [("origin-id", i)], i.encode())
                for i in ids]
    for message in messages:
        message.deliveries = deliveries
    op = storage.import_messages(messages, ids)
    within(op.batch.wait)
    return [m.seq for m in messages if m.seq in op.result]


def test_import_stores_each_id_once(store):
    assert import_wait(store, ["a", "b"], deliveries=1) == []
    skipped = import_wait(store, ["b", "c", "c", "a", "d"])
    assert len(skipped) == 3                        # b and a before, c twice in the batch
    loaded = load(store)
    assert [m.body for m in loaded] == [b"a", b"b", b"c", b"d"]
    assert [m.deliveries for m in loaded] == [1, 1, 0, 0]
    assert loaded[0].headers == [("origin-id", "a")] and loaded[0].ack_timeout == 1.5
    # A consumed message's id stays taken: importing it again brings nothing back.
    store.delete(loaded[0].seq)
    assert len(import_wait(store, ["a"])) == 1
    assert count(store) == 3


def test_imported_ids_survive_a_reopen(durable_url, open_store):
    storage = open_store(durable_url)
    import_wait(storage, ["a", "b"])
    within(storage.close)
    storage = open_store(durable_url)
    assert len(import_wait(storage, ["a", "b", "c"])) == 2
    assert [m.body for m in load(storage)] == [b"a", b"b", b"c"]


def test_sqlite_a_store_from_before_imports_gets_the_table(tmp_path, open_store):
    """The ids' table is made when missing, with no version bump: stores made before it open
    as they are, and an older pymq may open one that has it."""
    path = str(tmp_path / "pymq.db")
    within(open_store(path).close)
    db = sqlite3.connect(path)
    db.execute("DROP TABLE imported")
    db.commit()
    db.close()
    storage = open_store(path)
    assert import_wait(storage, ["a"]) == []
    within(storage.close)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


# ---------------------------------------------------------------------------------------------
# Durability: crash, close, reopen
# ---------------------------------------------------------------------------------------------

CRASH_SCRIPT = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
from pymq_storage import open_storage
storage = open_storage(sys.argv[2])
n = int(sys.argv[3])
for i in range(n):
    headers = [("i", str(i)), ("x", "é:\n")]
    message = storage.new_message("crash", (i * 7) % 10, i / 4.0, headers, b"body\x00%d" % i)
    storage.save(message).wait()
    print("saved", i, message.seq, flush=True)
deleted = [int(s) for s in sys.argv[4].split(",") if s]
for seq in deleted:
    storage.delete(seq)
storage.flush()
print("ok", flush=True)
os._exit(0)                 # a crash: no close(), no atexit, no flush of anything
"""


def run_crash_child(url, n, delete=()):
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(ROOT), url, str(n),
         ",".join(str(s) for s in delete)],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "ok", proc.stdout + proc.stderr
    return {int(i): int(seq) for _, i, seq in (line.split() for line in lines[:-1])}


def test_committed_messages_survive_a_crash(durable_url, open_store):
    n = 40
    seq_of = run_crash_child(durable_url, n)
    assert len(seq_of) == n
    storage = open_store(durable_url)
    assert count(storage, "crash") == n
    got = load(storage, "crash", limit=n + 10)
    expected = sorted(range(n), key=lambda i: (-((i * 7) % 10), seq_of[i]))
    assert seqs(got) == [seq_of[i] for i in expected]
    for message in got:
        i = int(dict(message.headers)["i"])
        assert message.headers == [("i", str(i)), ("x", "é:\n")]
        assert message.body == b"body\x00%d" % i
        assert message.priority == (i * 7) % 10
        assert message.ack_timeout == i / 4.0
    # new seqs after the crash are above everything the crashed process handed out
    assert storage.new_message("q", 4, 0.0, [], b"").seq > max(seq_of.values())


def test_committed_deletes_survive_a_crash(durable_url, open_store):
    """A second crashing run deletes some of the first run's messages: they stay deleted."""
    n = 10
    first = run_crash_child(durable_url, n)
    doomed = [first[i] for i in range(0, n, 3)]
    second = run_crash_child(durable_url, n, delete=doomed)
    assert min(second.values()) > max(first.values())
    storage = open_store(durable_url)
    remaining = set(seqs(load(storage, "crash")))
    assert remaining == (set(first.values()) | set(second.values())) - set(doomed)
    assert count(storage, "crash") == 2 * n - len(doomed)


def test_close_commits_pending_saves_then_reopen_sees_them(durable_url, open_store):
    storage = open_store(durable_url)
    earlier = put_wait(storage, priority=1)
    pending = [put(storage, priority=p, body=b"%d" % p)[0] for p in (5, 9, 0, 5)]
    within(storage.close, seconds=1.0, what="Storage.close() with saves pending")
    storage = open_store(durable_url)
    assert count(storage) == 5
    assert seqs(load(storage)) == delivery_order(pending + [earlier])


def test_close_with_pending_work_completes_every_batch(store):
    """close() commits what is pending: the batches of unwaited saves are done, no error."""
    messages, batches = zip(*[put(store) for _ in range(5)])
    within(store.close, seconds=1.0, what="Storage.close() with saves pending")
    assert all(b.done.is_set() and b.error is None for b in batches)
    assert store.pending_bytes == 0
    assert store.stats["inserts"] == 5


def test_close_while_a_batch_is_in_flight(durable_url, open_store):
    storage = open_store(durable_url)
    first, first_batch = put(storage)
    gevent.sleep(0)                          # the committer is applying the first batch
    within(storage.close)
    assert first_batch.done.is_set() and first_batch.error is None
    storage = open_store(durable_url)
    assert seqs(load(storage)) == [first.seq]


def test_close_with_nothing_pending_and_twice(store):
    put_wait(store)
    within(store.close)
    within(store.close)                      # a second close is harmless


# ---------------------------------------------------------------------------------------------
# Insert budget (pending_bytes / wait_for_budget)
# ---------------------------------------------------------------------------------------------

class GatedBackend(Backend):
    """Wraps a backend; apply() waits for `gate` so a test can hold the committer mid-batch.
    The gate is a threading.Event for blocking backends (apply runs in Storage's worker
    thread) and a gevent Event otherwise (apply runs in the committer greenlet)."""

    def __init__(self, inner):
        self.inner = inner
        self.blocking = inner.blocking
        self.gate = threading.Event() if inner.blocking else gevent.event.Event()
        self.gate.set()
        self.applies = 0

    def open(self):
        return self.inner.open()

    def apply(self, batch):
        self.applies += 1
        assert self.gate.wait(TIMEOUT) is not False, "gate never opened"
        return self.inner.apply(batch)

    def close(self):
        self.inner.close()


def test_wait_for_budget_blocks_while_over_budget(backend_url, open_store):
    backend = GatedBackend(open_backend(backend_url))
    storage = open_store(backend)
    budget = 10_000
    storage.wait_for_budget(budget)          # nothing pending: returns at once
    backend.gate.clear()
    applies = backend.applies                # open() applied the id reservation already
    held, held_batch = put(storage)          # the committer takes this batch and blocks
    gevent.sleep(0.01)
    assert backend.applies == applies + 1
    big = [put(storage, body=b"\x00" * 4000)[0] for _ in range(5)]   # ~20 kB pending
    assert storage.pending_bytes == held.size + sum(m.size for m in big)
    assert storage.pending_bytes > budget
    returned_with = []

    def producer():
        storage.wait_for_budget(budget)
        returned_with.append(storage.pending_bytes)

    waiter = gevent.spawn(producer)
    gevent.sleep(0.1)
    assert not waiter.dead, "wait_for_budget returned while over budget"
    backend.gate.set()
    join_all([waiter])
    assert returned_with and returned_with[0] <= budget
    within(storage.flush)
    assert storage.pending_bytes == 0
    assert held_batch.done.is_set()
    assert count(storage) == 6


def test_pending_bytes_tracks_uncommitted_inserts(store):
    assert store.pending_bytes == 0
    messages, batches = zip(*[put(store, body=b"y" * 100, headers=[("k", "v")])
                              for _ in range(3)])
    assert store.pending_bytes == sum(m.size for m in messages)
    assert store.pending_bytes == batches[0].bytes
    within(batches[0].wait)
    assert store.pending_bytes == 0
    for message in messages:                 # deletes hold no budget
        store.delete(message.seq)
    assert store.pending_bytes == 0
    assert count(store) == 0


def test_wait_for_budget_many_producers(backend_url, open_store):
    """Producers that respect a small budget all get through and leave nothing pending."""
    storage = open_store(backend_url)
    budget = 2_000
    peak = [0]

    def producer(i):
        for j in range(10):
            storage.wait_for_budget(budget)
            put(storage, body=b"z" * 300)
            peak[0] = max(peak[0], storage.pending_bytes)

    greenlets = [gevent.spawn(producer, i) for i in range(10)]
    join_all(greenlets, seconds=15)
    assert all(g.successful() for g in greenlets)
    within(storage.flush)
    assert storage.pending_bytes == 0
    assert count(storage) == 100
    # each producer adds at most one message after seeing the budget respected
    assert peak[0] <= budget + 10 * (300 + 100)


# ---------------------------------------------------------------------------------------------
# A failing backend (fault injection)
# ---------------------------------------------------------------------------------------------

class FailingMemoryBackend(MemoryBackend):
    """MemoryBackend whose apply() raises while `fail` is set (before touching anything)."""

    def __init__(self):
        super().__init__()
        self.fail = False

    def apply(self, batch):
        if self.fail:
            raise OSError("disk on fire")
        return super().apply(batch)


def test_failing_batch_raises_for_every_waiter_and_recovers(open_store):
    backend = FailingMemoryBackend()
    storage = open_store(backend)
    kept = put_wait(storage)
    backend.fail = True
    messages, batches = zip(*[put(storage, body=b"%d" % i) for i in range(10)])
    batch = batches[0]
    assert all(b is batch for b in batches)
    assert storage.pending_bytes > 0
    storage.delete(kept.seq)                 # in the failing batch too
    errors = []

    def waiter():
        try:
            batch.wait()
        except StorageError as error:
            errors.append(error)

    def reader():
        try:
            storage.count("q")
        except StorageError as error:
            errors.append(error)

    greenlets = [gevent.spawn(waiter) for _ in range(10)] + [gevent.spawn(reader)]
    join_all(greenlets)
    assert len(errors) == 11, "every waiter and reader of the failed batch gets StorageError"
    assert all("disk on fire" in str(error) for error in errors)
    assert storage.pending_bytes == 0, "a failed batch must release its budget"
    storage.wait_for_budget(0)               # nothing pending: must not block
    # later batches succeed; the failed batch's writes did not happen
    backend.fail = False
    after = put_wait(storage)
    assert seqs(load(storage)) == [kept.seq, after.seq]
    assert count(storage) == 2
    assert storage.stats["inserts"] == 2


def test_saver_greenlets_each_get_storage_error(open_store):
    backend = FailingMemoryBackend()
    storage = open_store(backend)
    backend.fail = True
    outcomes = []

    def sender(i):
        message = storage.new_message("q", 4, 0.0, [], b"%d" % i)
        try:
            storage.save(message).wait()
            outcomes.append("ok")
        except StorageError:
            outcomes.append("error")

    join_all([gevent.spawn(sender, i) for i in range(30)])
    assert outcomes == ["error"] * 30
    assert storage.pending_bytes == 0
    backend.fail = False
    put_wait(storage)
    assert count(storage) == 1


def test_sqlite_failing_batch_is_rolled_back_as_a_whole(tmp_path, open_store):
    """A batch whose insert violates the primary key fails; none of its writes happen."""
    storage = open_store(str(tmp_path / "atomic.db"))
    kept = put_wait(storage, priority=1)
    victim = put_wait(storage, priority=2)
    fresh, batch = put(storage, "other")
    storage.save(StoredMessage(kept.seq, "q", 4, 0.0, [], b"duplicate seq"))
    storage.delete(victim.seq)
    with pytest.raises(StorageError):
        within(batch.wait)
    assert storage.pending_bytes == 0
    assert count(storage, "other") == 0, "the batch's other insert must be rolled back"
    assert seqs(load(storage)) == [victim.seq, kept.seq], "the batch's delete rolled back too"
    assert load(storage)[1].body == b"x"
    # and the connection is usable afterwards
    again = put_wait(storage, "other")
    assert seqs(load(storage, "other")) == [again.seq]


# ---------------------------------------------------------------------------------------------
# SQLite: schema checks, URLs, its worker thread
# ---------------------------------------------------------------------------------------------

def make_pymq_db(path):
    storage = Storage(SQLiteBackend(str(path))).open()
    within(storage.close)


def test_sqlite_other_schema_version_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "future.db"
    make_pymq_db(path)
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.commit()
    db.close()
    with pytest.raises(Exception) as raised:
        within(open_storage, str(path))
    message = str(raised.value)
    assert "99" in message and str(SCHEMA_VERSION) in message, message
    assert "version" in message


def test_sqlite_foreign_database_is_refused_with_a_clear_message(tmp_path):
    path = tmp_path / "someone_else.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("INSERT INTO customers VALUES (1, 'alice')")
    db.commit()
    db.close()
    with pytest.raises(Exception) as raised:
        within(open_storage, str(path))
    message = str(raised.value)
    assert "not a pymq database" in message and str(path) in message, message
    # and it was left alone
    db = sqlite3.connect(path)
    assert db.execute("SELECT name FROM customers").fetchall() == [("alice",)]
    assert db.execute("PRAGMA user_version").fetchone()[0] == 0
    assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["customers"]
    db.close()


def test_sqlite_foreign_database_journal_mode_is_not_changed(tmp_path):
    """Refusing another application's database must not convert it to WAL mode (a persistent
    change to someone else's file)."""
    path = tmp_path / "someone_else.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    db.commit()
    db.close()
    with pytest.raises(Exception, match="not a pymq database"):
        within(open_storage, str(path))
    db = sqlite3.connect(path)
    mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    db.close()
    assert mode == "delete", "open of a refused database switched it to journal_mode=%s" % mode


def test_sqlite_file_that_is_not_a_database_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(Exception, match="not a database"):
        within(open_storage, str(path))


def test_sqlite_empty_file_becomes_a_new_store(tmp_path, open_store):
    path = tmp_path / "empty.db"
    path.touch()
    storage = open_store(str(path))
    message = put_wait(storage)
    assert seqs(load(storage)) == [message.seq]


def test_unknown_url_scheme_is_a_value_error():
    with pytest.raises(ValueError, match="bogus"):
        open_backend("bogus://x")
    with pytest.raises(ValueError):
        open_backend("postgres-typo:")
    assert isinstance(open_backend("memory:"), MemoryBackend)


def test_sqlite_url_forms(tmp_path, monkeypatch, open_store):
    monkeypatch.chdir(tmp_path)
    assert open_backend("sqlite:///relative.db").path == "relative.db"
    assert open_backend("sqlite:///sub/dir.db").path == "sub/dir.db"
    assert open_backend("sqlite:////abs/file.db").path == "/abs/file.db"
    assert open_backend("plain.db").path == "plain.db"
    assert open_backend(str(tmp_path / "abs.db")).path == str(tmp_path / "abs.db")
    for url, file in [("sqlite:///relative.db", tmp_path / "relative.db"),
                      ("plain.db", tmp_path / "plain.db"),
                      ("sqlite:///" + str(tmp_path / "viaurl.db"), tmp_path / "viaurl.db"),
                      (str(tmp_path / "abs.db"), tmp_path / "abs.db")]:
        storage = open_store(url)
        assert isinstance(storage.backend, SQLiteBackend)
        message = put_wait(storage)
        within(storage.close)
        assert file.exists(), url
        storage = open_store(url)
        assert seqs(load(storage)) == [message.seq], url
        within(storage.close)


class ThreadRecordingSQLiteBackend(SQLiteBackend):
    def __init__(self, path):
        super().__init__(path)
        self.threads = []

    def open(self):
        self.threads.append(("open", threading.get_ident()))
        return super().open()

    def apply(self, batch):
        self.threads.append(("apply", threading.get_ident()))
        return super().apply(batch)

    def close(self):
        self.threads.append(("close", threading.get_ident()))
        return super().close()


def test_sqlite_work_happens_in_one_thread_off_the_hub(tmp_path, open_store):
    backend = ThreadRecordingSQLiteBackend(str(tmp_path / "threads.db"))
    storage = open_store(backend)
    hub_thread = threading.get_ident()
    greenlets = [gevent.spawn(lambda i=i: put(storage, priority=i % 10)[1].wait())
                 for i in range(20)]
    join_all(greenlets)
    assert count(storage) == 20
    load(storage)
    storage.delete(load(storage, limit=1)[0].seq)
    assert count(storage) == 19
    within(storage.close)
    calls = [call for call, _ in backend.threads]
    assert calls[0] == "open" and calls[-1] == "close" and "apply" in calls
    idents = {ident for _, ident in backend.threads}
    assert hub_thread not in idents, "SQLite work ran on the gevent hub's thread"
    assert len(idents) == 1, "SQLite work spread over %d threads" % len(idents)


def test_sqlite_hub_keeps_running_while_the_disk_works(tmp_path, open_store):
    """While a (slow) apply runs in the worker thread, other greenlets keep running."""
    class SlowSQLiteBackend(SQLiteBackend):
        def apply(self, batch):
            time.sleep(0.2)
            return super().apply(batch)

    storage = open_store(SlowSQLiteBackend(str(tmp_path / "slow.db")))
    ticks = []

    def ticker():
        for _ in range(10):
            ticks.append(time.monotonic())
            gevent.sleep(0.01)

    _, batch = put(storage)
    t = gevent.spawn(ticker)
    within(batch.wait)
    committed_at = time.monotonic()
    join_all([t])
    during = [tick for tick in ticks if tick < committed_at]
    assert len(during) >= 5, "the hub was blocked during apply() (%d ticks)" % len(during)


# ---------------------------------------------------------------------------------------------
# What /metrics reads: the stored count, the queue depths, the batch histograms
# ---------------------------------------------------------------------------------------------

def test_stored_count_is_kept_through_every_kind_of_write(store, open_store, backend_url):
    assert store.stored == 0
    first, second = put_wait(store), put_wait(store)
    put_wait(store, "r")
    cancelled, _ = put(store)
    assert store.delete(cancelled.seq) is None          # never written
    now = now_ms()
    kept = store.new_message("d", 4, 0.0, [], b"x")
    within(store.save(kept, ("key", now, now + 60000)).wait)
    duplicate = store.new_message("d", 4, 0.0, [], b"x")
    within(store.save(duplicate, ("key", now, now + 60000)).wait)      # not stored
    assert store.stored == 4
    within(store.delete(first.seq).wait)
    within(store.delete(first.seq).wait)                # gone already: no change
    store.dead_letter(second, "DLQ.q", [])              # moved: no change
    assert within(store.purge, "r", set(), store.fresh_seqs()) == 1
    assert store.stored == 2
    assert store.stored == sum(count(store, queue) for queue in ("q", "r", "d", "DLQ.q"))
    if backend_url != "memory:":                        # counted once at open
        store.close()
        assert open_store(backend_url).stored == 2


class AnswerLostMemoryBackend(MemoryBackend):
    """Applies a batch, then fails as if the connection dropped before the answer came: the
    writes happened, though the batch failed (as a COMMIT whose outcome was lost)."""

    lose_answer = False

    def apply(self, batch):
        results = super().apply(batch)
        if self.lose_answer:
            self.lose_answer = False
            raise OSError("connection lost")
        return results


def test_stored_count_is_counted_again_after_an_uncertain_batch(open_store):
    backend = AnswerLostMemoryBackend()
    storage = open_store(backend)
    put_wait(storage)
    backend.lose_answer = True
    _, batch = put(storage)
    with pytest.raises(StorageError):
        within(batch.wait)
    assert storage.stats["errors"] == 1
    assert storage.stored == 1              # it cannot know
    within(storage.barrier().wait)          # the next batch counts
    assert storage.stored == 2 == len(backend.messages)


def test_depths_of_the_queues_a_glob_matches(store):
    now = now_ms()
    for queue, messages in (("jobs.a", 2), ("jobs.b", 1), ("JOBS.c", 1), ("a+b(c)", 1),
                            ("jobs", 1)):
        for _ in range(messages):
            put_wait(store, queue)
    delayed = store.new_message("jobs.b", 4, 0.0, [], b"x", due=now + 60000)
    within(store.save(delayed).wait)                    # delayed: counted
    for queue in ("jobs.b", "jobs.x"):                  # expired: never counted
        expired = store.new_message(queue, 4, 0.0, [], b"x", expires=now - 1)
        within(store.save(expired).wait)

    def depths(pattern, limit=10):
        return within(store.depths, pattern, limit)

    assert depths("jobs.*") == [("jobs.a", 2), ("jobs.b", 2)]
    assert depths("jobs*", 2) == [("jobs", 1), ("jobs.a", 2)]      # the first by name
    assert depths("jobs.[!a]") == [("jobs.b", 2)]
    assert depths("jobs.[ab]") == [("jobs.a", 2), ("jobs.b", 2)]
    assert depths("?OBS.?") == [("JOBS.c", 1)]                      # case-sensitive
    assert depths("a+b(*") == [("a+b(c)", 1)]                       # no regex in a glob
    assert depths("jobs") == [("jobs", 1)]
    assert depths("nothing*") == []


def test_queue_names_a_page_at_a_time_by_prefix(store):
    now = now_ms()
    for queue in ("jobs.b", "jobs.a", "jobs", "jobz", "mail", "jobs.c", "jobs.a"):
        put_wait(store, queue)
    delayed = store.new_message("jobs.d", 4, 0.0, [], b"x", due=now + 60000)
    within(store.save(delayed).wait)                    # only delayed: listed too

    def names(prefix, after=None, limit=10):
        return within(store.queue_names, prefix, after, limit)

    assert names("") == ["jobs", "jobs.a", "jobs.b", "jobs.c", "jobs.d", "jobz", "mail"]
    assert names("jobs.", limit=2) == ["jobs.a", "jobs.b"]
    assert names("jobs.", "jobs.b", 2) == ["jobs.c", "jobs.d"]
    assert names("jobs.", "jobs.d") == []
    assert names("jobs", "a") == ["jobs", "jobs.a", "jobs.b", "jobs.c", "jobs.d"]
    assert names("nothing") == []
    assert within(store.counts, ["jobs.a", "jobs.d", "none"]) == [(2, 0), (1, 1), (0, 0)]


def test_peek_reads_the_first_ready_messages_and_takes_none(store):
    first = put_wait(store, "q", body=b"first")
    urgent = store.new_message("q", 9, 0.0, [("h", "v")], b"urgent")
    within(store.save(urgent).wait)
    put_wait(store, "q")
    later = store.new_message("q", 4, 0.0, [], b"x", due=now_ms() + 60000)
    within(store.save(later).wait)                      # not ready: not peeked
    peeked = within(store.peek, "q", 2)
    assert [(m.seq, m.body, m.headers) for m in peeked] == [
        (urgent.seq, b"urgent", [("h", "v")]), (first.seq, b"first", [])]
    assert len(within(store.peek, "q", 10)) == 3
    assert within(store.load, "q", None, 10)[0].seq == urgent.seq     # still there


def test_batch_histograms_count_each_batch_applied(store):
    sizes, seconds = store.batch_sizes, store.commit_seconds
    before = sum(sizes.counts), sum(seconds.counts), sizes.sum
    messages = [put(store)[0] for _ in range(3)]        # one batch: three inserts
    within(store.flush)
    assert (sum(sizes.counts), sum(seconds.counts)) == (before[0] + 1, before[1] + 1)
    assert sizes.sum == before[2] + 3
    assert seconds.sum > 0
    for message in messages:
        store.delete(message.seq)
    within(store.flush)
    assert sum(sizes.counts) == before[0] + 2


def test_histogram_buckets_hold_values_up_to_their_bound():
    histogram = Histogram((1, 5))
    for value in (0, 1, 1.5, 5, 6):
        histogram.observe(value)
    assert histogram.counts == [2, 2, 1]
    assert histogram.sum == 13.5


# ---------------------------------------------------------------------------------------------
# Hypothesis: random operation sequences against a dict model
# ---------------------------------------------------------------------------------------------

QUEUES = ["a", "b"]

operations = st.lists(st.one_of(
    st.tuples(st.just("save"), st.sampled_from(QUEUES), st.integers(0, 9),
              st.binary(max_size=20),
              st.lists(st.tuples(st.text(max_size=5), st.text(max_size=5)), max_size=2)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.booleans()),
    st.tuples(st.just("load"), st.sampled_from(QUEUES), st.integers(0, 10**6),
              st.integers(0, 3), st.integers(0, 6)),
    st.tuples(st.just("count"), st.sampled_from(QUEUES)),
    st.tuples(st.just("yield")),
    st.tuples(st.just("flush")),
), max_size=40)


@pytest.mark.parametrize("backend", list(BACKENDS))
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_random_operations_match_a_dict_model(backend, ops):
    with tempfile.TemporaryDirectory() as directory:
        url = BACKENDS[backend](directory)
        storage = Storage(open_backend(url))
        within(storage.open)
        try:
            stored = run_against_model(storage, ops)
            within(storage.flush)
            assert storage.pending_bytes == 0
            assert storage.stored == stored     # kept, not counted: stale deletes included
        finally:
            shutdown(storage)


def run_against_model(storage, ops):
    model = {}                  # seq -> StoredMessage as saved
    every = []                  # every message ever created (for cursors and stale deletes)

    def expected(queue, after, limit):
        keys = sorted(m.key for m in model.values()
                      if m.queue == queue and (after is None or m.key > after))
        return [k[1] for k in keys[:limit]]

    for op in ops:
        kind = op[0]
        if kind == "save":
            _, queue, priority, body, headers = op
            message = storage.new_message(queue, priority, 0.5, headers, body)
            storage.save(message)
            model[message.seq] = message
            every.append(message)
        elif kind == "delete":
            _, pick, live = op
            if live and model:
                seq = sorted(model)[pick % len(model)]
            elif every and pick % 3:
                seq = every[pick % len(every)].seq         # maybe already deleted
            else:
                seq = pick + 10**15                        # never handed out
            storage.delete(seq)
            model.pop(seq, None)
        elif kind == "load":
            _, queue, pick, cursor, limit = op
            if cursor == 0 or not every:
                after = None
            elif cursor == 1:
                after = every[pick % len(every)].key       # a real (maybe deleted) message
            elif cursor == 2:
                after = (-(pick % 10), every[pick % len(every)].seq)
            else:
                after = (-(pick % 10), pick % 3)           # before every seq of a priority
            got = within(storage.load, queue, after, limit)
            assert seqs(got) == expected(queue, after, limit)
            for message in got:
                assert_same_message(message, model[message.seq])
        elif kind == "count":
            _, queue = op
            assert within(storage.count, queue)[0] == sum(
                1 for m in model.values() if m.queue == queue)
        elif kind == "yield":
            gevent.sleep(0)                                # let the committer take a batch
        elif kind == "flush":
            within(storage.flush)
    for queue in QUEUES:
        assert seqs(within(storage.load, queue, None, 10**6)) == expected(queue, None, 10**6)
    return len(model)

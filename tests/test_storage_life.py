"""The storage contract for a message's life (pymq_storage.base), on every backend: due times and
promotion, delivery counts, expiry, dead letters, moves and purges, de-duplication keys, what
Storage reports as arrivals; the schema upgrade from version 1 (fixtures made by the code of
that version: tests/fixtures/README.md); and, on SQLite, that every query is an index range.

Driven from the pytest main thread, as in test_storage.py (whose helpers this uses).
"""

import shutil
import sqlite3
from pathlib import Path

import gevent
import pytest

from pymq_storage import open_storage
from pymq_storage.base import StoredMessage, now_ms
import postgres
from conftest import within
from test_storage import BACKENDS, DURABLE, load, seqs

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(params=list(BACKENDS))
def backend_url(request, tmp_path):
    return BACKENDS[request.param](tmp_path)


@pytest.fixture
def store(open_store, backend_url):
    storage = open_store(backend_url)
    storage.arrivals = []
    storage.on_arrived = storage.arrivals.append
    return storage


def message(storage, queue="q", priority=4, body=b"x", headers=(), due=0, expires=0):
    return storage.new_message(queue, priority, 0.0, list(headers), body, due, expires)


def save(storage, *args, dedup=None, **kwargs):
    """Create and save a message and wait for its batch; returns the message."""
    m = message(storage, *args, **kwargs)
    within(storage.save(m, dedup).wait)
    return m


def counts(storage, queue="q", now=None):
    return within(storage.count, queue, now)


def promote(storage, now, limit=1000):
    done = gevent.event.AsyncResult()
    storage.promote_async(now, limit, done.set)
    return within(done.get).result


def expired(storage, now, after=None, limit=1000):
    done = gevent.event.AsyncResult()
    storage.expired_async(now, after, limit, lambda read, messages: done.set(messages))
    return within(done.get)


def barrier(storage):
    within(storage.barrier().wait)


# -- due times ---------------------------------------------------------------------------------

def test_a_message_not_yet_due_is_stored_counted_and_not_loaded(store):
    now = now_ms()
    ready = save(store, body=b"now")
    later = save(store, body=b"later", due=now + 60000)
    assert seqs(load(store)) == [ready.seq]
    assert counts(store, now=now) == (2, 1)
    # once its time has come it counts as due, though still waiting to be promoted
    assert counts(store, now=now + 60000) == (2, 0)
    assert store.arrivals == []
    assert later.due == now + 60000


def test_promote_makes_due_messages_ready_earliest_first_and_tells_where(store):
    now = now_ms()
    a = save(store, "a", priority=1, due=now + 10)
    b = save(store, "a", priority=9, due=now + 20)
    c = save(store, "b", due=now + 30)
    d = save(store, "b", due=now + 1000)
    arrivals, promoted, left = promote(store, now + 20)
    assert (promoted, left) == (2, now + 30)
    assert arrivals == {"a": min(a.key, b.key)}
    assert store.arrivals[-1] == {"a": b.key}
    assert seqs(load(store, "a")) == [b.seq, a.seq]     # by priority, then age
    assert load(store, "b") == []
    # the limit, earliest first
    arrivals, promoted, left = promote(store, now + 5000, limit=1)
    assert (arrivals, promoted, left) == ({"b": c.key}, 1, now + 1000)
    arrivals, promoted, left = promote(store, now + 5000)
    assert (arrivals, promoted, left) == ({"b": d.key}, 1, None)
    assert seqs(load(store, "b")) == [c.seq, d.seq]
    assert promote(store, now + 9000) == ({}, 0, None)
    assert counts(store, "a") == (2, 0) and counts(store, "b") == (2, 0)


def test_a_probe_sees_only_ready_messages(store):
    save(store, "delayed", due=now_ms() + 60000)
    save(store, "ready")
    batch = store.probe_async("delayed")
    store.probe_async("ready")
    held = []
    store.on_probed = lambda b, answer: held.append(answer)
    within(batch.wait)
    assert held == [{"ready"}]


# -- delivery counts and back-off --------------------------------------------------------------

def test_update_writes_deliveries_and_due_in_a_later_batch(store):
    m = save(store)
    m.deliveries = 3
    store.update(m)
    barrier(store)
    [loaded] = load(store)
    assert loaded.deliveries == 3 and loaded.due == 0
    # a back-off: it leaves the ready messages until it is due again
    m.deliveries, m.due = 4, now_ms() + 60000
    store.update(m)
    assert load(store) == []
    assert counts(store) == (1, 1)
    assert store.arrivals == []
    arrivals, promoted, _ = promote(store, m.due)
    assert promoted == 1 and arrivals == {"q": m.key}
    [loaded] = load(store)
    assert (loaded.deliveries, loaded.due) == (4, 0)


def test_an_update_rides_on_a_pending_insert_and_a_delete_cancels_it(store):
    m = message(store)
    batch = store.save(m)
    m.deliveries = 1
    store.update(m)                       # the insert, still pending, carries it
    within(batch.wait)
    assert store.stats["updates"] == 0
    assert load(store)[0].deliveries == 1
    m.deliveries = 2
    store.update(m)
    assert store.delete(m.seq) is not None     # the update goes, the delete stays
    barrier(store)
    assert store.stats["updates"] == 0
    assert counts(store) == (0, 0)


class DeliveredMeanwhile(StoredMessage):
    """A message the broker delivers again each time the storage thread reads its count: the
    hub changes a message's life while the backend writes it (sqlite3 runs in a thread)."""

    __slots__ = ("_count",)

    @property
    def deliveries(self):
        self._count += 1
        return self._count - 1

    @deliveries.setter
    def deliveries(self, value):
        self._count = value


def test_a_message_changed_while_it_is_written_is_written_once(store):
    delayed = message(store, due=now_ms() + 60000)
    m = message(store)
    changing = DeliveredMeanwhile(m.seq, m.queue, m.priority, 0.0, [], b"x")
    store.save(delayed)
    within(store.save(changing).wait)       # no UNIQUE failure: each field is read once
    assert counts(store) == (2, 1) and seqs(load(store)) == [m.seq]


def test_loaded_messages_are_copies(store):
    save(store)
    first = load(store)[0]
    first.deliveries, first.due = 7, 1
    again = load(store)[0]
    assert (again.deliveries, again.due) == (0, 0)


# -- expiry ------------------------------------------------------------------------------------

def test_expired_messages_are_not_counted_and_found_in_order_without_bodies(store):
    now = now_ms()
    keep = save(store, expires=now + 60000)
    gone = [save(store, body=b"%d" % i, expires=now - 10 + i, headers=[("i", str(i))])
            for i in range(5)]
    late = save(store, due=now + 60000, expires=now - 50)      # delayed and expired
    save(store)                                                  # no expiry
    assert counts(store, now=now) == (2, 0)
    found = expired(store, now)
    assert seqs(found) == [late.seq] + seqs(gone)
    assert all(m.body is None for m in found)
    assert found[1].headers == [("i", "0")] and found[1].expires == now - 10
    page = expired(store, now, limit=2)
    assert seqs(page) == [late.seq, gone[0].seq]
    rest = expired(store, now, after=(page[-1].expires, page[-1].seq))
    assert seqs(rest) == seqs(gone[1:])
    assert keep.seq not in seqs(expired(store, now + 59999))
    assert keep.seq in seqs(expired(store, now + 60000))


# -- dead letters, moves, purges ---------------------------------------------------------------

def test_dead_letter_moves_a_message_once_and_fresh(store):
    now = now_ms()
    m = save(store, "jobs", priority=7, body=b"poison", headers=[("a", "1")],
             expires=now + 60000)
    m.deliveries = 21
    store.update(m)
    headers = [("a", "1"), ("dead-letter-reason", "max-redeliveries")]
    store.dead_letter(m, "DLQ.jobs", headers)
    barrier(store)
    assert store.arrivals[-1] == {"DLQ.jobs": m.key}
    assert counts(store, "jobs") == (0, 0)
    [dead] = load(store, "DLQ.jobs")
    assert (dead.seq, dead.queue, dead.priority, dead.body) == (m.seq, "DLQ.jobs", 7, b"poison")
    assert dead.headers == headers
    assert (dead.deliveries, dead.due, dead.expires, dead.dead_letter) == (0, 0, 0, True)
    # a second dead-lettering from the queue it left does nothing
    store.dead_letter(m, "DLQ.jobs", [("twice", "yes")])
    barrier(store)
    assert load(store, "DLQ.jobs")[0].headers == headers


def test_dead_letter_in_the_batch_of_the_insert(store):
    m = message(store, "jobs")
    batch = store.save(m)
    store.dead_letter(m, "DLQ.jobs", [])
    within(batch.wait)
    assert counts(store, "jobs") == (0, 0)
    assert seqs(load(store, "DLQ.jobs")) == [m.seq]


def test_dead_letter_of_a_deleted_message_does_nothing(store):
    m = save(store, "jobs")
    store.delete(m.seq)
    store.dead_letter(m, "DLQ.jobs", [])
    barrier(store)
    assert counts(store, "DLQ.jobs") == (0, 0)


def test_move_takes_the_oldest_first_within_limit_and_keeps_what_it_is_told(store):
    now = now_ms()
    moved = [save(store, "DLQ.jobs", priority=p, expires=now + 100000) for p in (1, 9, 4, 4)]
    delayed = save(store, "DLQ.jobs", due=now + 60000)
    kept = save(store, "DLQ.jobs")
    fresh = store.fresh_seqs()
    newer = save(store, "DLQ.jobs")
    count_ = within(store.move, "DLQ.jobs", "jobs", 3, {moved[1].seq}, fresh)
    assert count_ == 3
    assert store.arrivals[-1] == {"jobs": None}
    assert set(seqs(load(store, "jobs"))) == {moved[0].seq, moved[2].seq, moved[3].seq}
    count_ = within(store.move, "DLQ.jobs", "jobs", None, {moved[1].seq, kept.seq}, fresh)
    assert count_ == 1                      # the delayed one, now ready
    assert {m.seq for m in load(store, "jobs")} == {m.seq for m in moved
                                                    if m is not moved[1]} | {delayed.seq}
    assert all(m.due == 0 and m.expires == 0 and not m.dead_letter for m in load(store, "jobs"))
    assert set(seqs(load(store, "DLQ.jobs"))) == {moved[1].seq, kept.seq, newer.seq}
    assert within(store.move, "empty", "jobs", None, set(), store.fresh_seqs()) == 0


def test_purge_deletes_all_but_what_it_keeps_and_what_came_after(store):
    doomed = [save(store, priority=p) for p in (0, 9)]
    delayed = save(store, due=now_ms() + 60000)
    kept = save(store)
    fresh = store.fresh_seqs()
    newer = save(store)
    save(store, "other")
    assert within(store.purge, "q", {kept.seq}, fresh) == len(doomed) + 1
    assert seqs(load(store)) == [kept.seq, newer.seq]
    assert delayed.seq not in seqs(expired(store, now_ms() + 10**9))
    assert counts(store) == (2, 0)
    assert counts(store, "other") == (1, 0)


# -- de-duplication keys -----------------------------------------------------------------------

def test_a_dedup_key_stores_the_first_message_only_within_its_window(store):
    now = now_ms()
    first = message(store, "jobs", body=b"first")
    second = message(store, "jobs", body=b"second")      # same batch
    batch = store.save(first, ("k1", now, now + 1000))
    assert store.save(second, ("k1", now + 1, now + 1001)) is batch
    elsewhere = message(store, "other")
    store.save(elsewhere, ("k1", now, now + 1000))       # keys are per queue
    within(batch.wait)
    assert batch.duplicates == {second.seq}
    assert seqs(load(store, "jobs")) == [first.seq]
    assert store.arrivals[-1] == {"jobs": first.key, "other": elsewhere.key}
    # a later batch, still within the window; then the first one consumed: still a duplicate
    third = save(store, "jobs", dedup=("k1", now + 999, now + 1999))
    store.delete(first.seq)
    barrier(store)
    assert counts(store, "jobs") == (0, 0) and third.seq not in seqs(load(store, "jobs"))
    # once the window is over, the key is free again
    fourth = save(store, "jobs", dedup=("k1", now + 1000, now + 2000))
    assert seqs(load(store, "jobs")) == [fourth.seq]


def test_forget_keys_deletes_keys_whose_window_ended(store):
    now = now_ms()
    for i in range(5):
        save(store, dedup=("k%d" % i, now, now + i))
    done = gevent.event.AsyncResult()
    store.forget_keys_async(now + 2, 2, done.set)
    assert within(done.get).result == 2
    store.forget_keys_async(now + 2, 10, done.set)
    done = gevent.event.AsyncResult()
    store.forget_keys_async(now + 2, 10, done.set)
    assert within(done.get).result == 0
    # the keys still within their window still hold
    again = save(store, dedup=("k4", now + 3, now + 100))
    assert again.seq not in seqs(load(store))


@pytest.mark.parametrize("durable", DURABLE)
def test_dedup_keys_and_the_message_life_survive_a_reopen(durable, tmp_path, open_store):
    url = BACKENDS[durable](tmp_path)
    storage = open_store(url)
    now = now_ms()
    first = save(storage, dedup=("k", now, now + 60000))
    first.deliveries = 2
    storage.update(first)
    later = save(storage, due=now + 60000, expires=now + 120000)
    barrier(storage)
    within(storage.close)
    storage = open_store(url)
    dup = save(storage, dedup=("k", now + 1, now + 60001))
    assert seqs(load(storage)) == [first.seq]
    [loaded] = load(storage)
    assert loaded.deliveries == 2
    assert counts(storage, now=now) == (2, 1)
    arrivals, promoted, left = promote(storage, now + 60000)
    assert (promoted, left) == (1, None)
    assert seqs(load(storage)) == [first.seq, later.seq]
    assert load(storage)[1].expires == now + 120000
    assert dup.seq not in seqs(load(storage))


# -- schema upgrade ----------------------------------------------------------------------------

FIXTURE_MESSAGES = {        # what tests/fixtures/ hold: seq -> (queue, priority, body)
    1: ("jobs", 4, b"first"), 2: ("jobs", 9, b"urgent"), 3: ("jobs", 0, b"\x00\x01binary\xff"),
    4: ("jobs", 4, b"fourth"), 5: ("other", 4, b"elsewhere"),
}


def _check_upgraded(storage):
    assert seqs(load(storage, "jobs")) == [2, 1, 4, 3]
    for m in load(storage, "jobs") + load(storage, "other"):
        assert (m.queue, m.priority, m.body) == FIXTURE_MESSAGES[m.seq]
        assert (m.due, m.expires, m.deliveries, m.dead_letter) == (0, 0, 0, False)
    assert [m.headers for m in load(storage, "jobs")][0] == [("priority", "9"),
                                                            ("ack-timeout", "30")]
    assert load(storage, "jobs")[0].ack_timeout == 30.0
    assert counts(storage, "jobs") == (4, 0)
    assert storage.new_message("q", 4, 0.0, [], b"").seq > 100000     # its reservation kept
    # the new features work on the upgraded store
    m = save(storage, "jobs", due=now_ms() + 60000)
    assert counts(storage, "jobs") == (5, 1)
    dup = save(storage, "jobs", dedup=("k", 1, 2))
    again = save(storage, "jobs", dedup=("k", 1, 2))
    assert dup.seq in seqs(load(storage, "jobs")) and again.seq not in seqs(load(storage, "jobs"))
    assert m.seq not in seqs(load(storage, "jobs"))


def test_sqlite_store_of_schema_version_1_is_upgraded_in_place(tmp_path, open_store):
    path = tmp_path / "pymq.db"
    shutil.copy(FIXTURES / "pymq-v1.db", path)
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 1
    storage = open_store(str(path))
    _check_upgraded(storage)
    within(storage.close)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "messages_delivery" not in indexes and "messages_ready" in indexes
    db.close()
    assert counts(open_store(str(path)), "jobs") == (6, 1)     # reopened: already version 2


def _postgresql_fixture():
    import psycopg2
    url = postgres.fresh_database_url()
    db = psycopg2.connect(url)
    sql = "\n".join(line for line in (FIXTURES / "pymq-v1-postgresql.sql").read_text()
                    .splitlines() if not line.startswith("\\"))
    with db.cursor() as cursor:
        cursor.execute(sql)
    db.commit()
    db.close()
    return url


def test_postgresql_tables_of_schema_version_1_are_upgraded_in_place(open_store):
    import psycopg2
    url = _postgresql_fixture()
    _check_upgraded(open_store(url))
    db = psycopg2.connect(url)
    with db.cursor() as cursor:
        cursor.execute("SELECT value FROM pymq_meta WHERE key = 'schema_version'")
        assert cursor.fetchone()[0] == 2
        cursor.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'pymq_messages'")
        indexes = {row[0] for row in cursor.fetchall()}
    db.close()
    assert "pymq_messages_delivery" not in indexes and "pymq_messages_ready" in indexes


def test_a_newer_schema_is_refused_with_a_clear_message(tmp_path):
    import psycopg2
    path = tmp_path / "future.db"
    shutil.copy(FIXTURES / "pymq-v1.db", path)
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 3")
    db.commit()
    db.close()
    with pytest.raises(Exception, match="schema version 3; this pymq reads version 2"):
        within(open_storage, str(path))
    url = _postgresql_fixture()
    db = psycopg2.connect(url)
    with db.cursor() as cursor:
        cursor.execute("UPDATE pymq_meta SET value = 3 WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(Exception, match="schema version 3; this pymq reads version 2"):
        within(open_storage, url)


# -- SQLite: every query is an index range, none scans the table -------------------------------

def test_sqlite_queries_use_their_indexes(tmp_path, open_store):
    """A refill, a probe, a count, the due and expiry sweeps, a move and a purge each use an
    index: with a million delayed messages, none of them may read them all."""
    from pymq_storage import sqlite as backend_module
    path = str(tmp_path / "plans.db")
    storage = open_store(path)
    save(storage)
    within(storage.close)
    db = sqlite3.connect(path)
    params = {"queue": "q", "below": 10, "keep": "[]", "limit": 5}
    chosen = backend_module.SQLiteBackend._chosen(None, "q", set(), 10, 5)[0]
    queries = [
        (backend_module.COLUMNS + "WHERE queue = 'q' AND due = 0 ORDER BY priority DESC, seq "
         "LIMIT 5", ()),
        (backend_module.COLUMNS + "WHERE queue = 'q' AND due = 0 AND priority = 4 AND seq > 1 "
         "ORDER BY seq LIMIT 5", ()),
        ("SELECT COUNT(*) FROM messages WHERE queue = 'q' AND due = 0", ()),
        ("SELECT COUNT(*) FROM messages WHERE queue = 'q' AND due > 0", ()),
        ("SELECT COUNT(*) FROM messages WHERE expires > 0 AND expires <= 5 AND queue = 'q'", ()),
        ("SELECT 1 FROM messages WHERE queue = 'q' AND due = 0", ()),
        ("SELECT seq FROM messages WHERE due > 0 AND due <= 5 ORDER BY due LIMIT 5", ()),
        ("SELECT MIN(due) FROM messages WHERE due > 0", ()),
        ("SELECT seq FROM messages WHERE expires > 0 AND expires <= 5 AND (expires, seq) > "
         "(0, 0) ORDER BY expires, seq LIMIT 5", ()),
        (chosen, params),
        ("DELETE FROM messages WHERE seq = 1", ()),
    ]
    for query, args in queries:
        plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + query, args))
        assert "SCAN messages" not in plan.replace("SCAN messages USING", ""), (query, plan)
        assert "USING" in plan or "PRIMARY KEY" in plan, (query, plan)
    db.close()

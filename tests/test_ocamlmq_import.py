"""Moving from ocamlmq: its stores read (pymq_storage/ocamlmq.py) and imported at start
(--import-ocamlmq, --import-ocamlmq-binlog, a PostgreSQL store holding ocamlmq's table).

The fixtures in ../shared/fixtures/ocamlmq were written by a real ocamlmq; they are read-only
and every test works on a copy. Bigger stores are made by ocamlmq_stores.py.
"""

import collections
import hashlib
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ocamlmq_stores
import postgres
from conftest import ROOT, RawClient, count_msgs
from pymq_storage.ocamlmq import (PostgreSQLTable, Source, SourceError, SQLiteTable,
                                  open_import, read_binlog)

FIXTURES = ROOT.parent / "shared" / "fixtures" / "ocamlmq"
# What ocamlmq had receipted, per queue: sending order (pymq's store: the queue's seq order).
STORE = {"jobs": 60, "emails": 25, "reports.daily": 15}
CRASHED = dict(STORE, late=50)


@pytest.fixture
def fixtures(tmp_path):
    """A writable copy of the fixtures: a test never opens the originals."""
    if not FIXTURES.is_dir():
        pytest.skip("no ocamlmq fixtures at %s" % FIXTURES)
    copy = tmp_path / "ocamlmq"
    shutil.copytree(FIXTURES, copy)
    for path in copy.iterdir():
        path.chmod(0o644)
    return copy


def sent(fixtures, name):
    """{queue: [(body, ack_timeout or None), ...]} in sending order, from NAME.json."""
    queues = json.loads((fixtures / (name + ".json")).read_text())["queues"]
    return {queue: [(bytes.fromhex(m["body_hex"]), m["ack_timeout"]) for m in messages]
            for queue, messages in queues.items()}


# A record's fields, by name (the module's records are plain tuples).
Record = collections.namedtuple("Record", "queue timestamp msg_id ack_timeout ack_pending body")


def records_of(source):
    return [Record._make(record) for record in source.records()]


def by_queue(records):
    queues = {}
    for record in records:
        queues.setdefault(record.queue, []).append(record)
    return queues


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading ocamlmq's stores
# ---------------------------------------------------------------------------------------------

def test_the_sqlite_table_reads_as_ocamlmq_was_sent(fixtures):
    source = Source(SQLiteTable(str(fixtures / "store.db")))
    queues = by_queue(records_of(source))
    source.close()
    expected = sent(fixtures, "store")
    assert {queue: len(records) for queue, records in queues.items()} == STORE
    for queue, records in queues.items():
        assert [(r.body, r.ack_timeout or None) for r in records] == expected[queue]
        assert all(r.ack_pending == (queue == "jobs") for r in records)
    assert len({r.msg_id for records in queues.values() for r in records}) == 100


def test_the_binlog_adds_what_was_not_flushed(fixtures):
    source = Source(SQLiteTable(str(fixtures / "crashed.db")), str(fixtures / "crashed.binlog"))
    queues = by_queue(records_of(source))
    from_binlog = {Record._make(record).msg_id for record in source.binlog}
    source.close()
    expected = sent(fixtures, "crashed")
    assert {queue: len(records) for queue, records in queues.items()} == CRASHED
    for queue, records in queues.items():
        assert [(r.body, r.ack_timeout or None) for r in records] == expected[queue]
        assert all((r.msg_id in from_binlog) == (queue == "late") for r in records)


def test_reading_leaves_the_source_as_it_was(fixtures):
    files = [fixtures / "crashed.db", fixtures / "crashed.binlog"]
    before = [digest(path) for path in files]
    source = open_import(str(files[0]), str(files[1]))
    list(source.records())
    source.close()
    assert [digest(path) for path in files] == before


def write(path, *records):
    path.write_bytes(b"".join(records))
    return str(path)


def test_binlog_deletes_and_duplicates(fixtures):
    """D (what ocamlmq writes) and B (what its reader wants) delete a message added earlier in
    the binlog; a delete of a message of the table is ignored (ocamlmq never logged those: the
    table is what it had); an A whose id is in the table (a crash between the flush's commit
    and the truncation) is the table's row."""
    table = SQLiteTable(str(fixtures / "crashed.db"))
    in_table = Record._make(next(table.records()))
    add, delete = ocamlmq_stores.add_record, ocamlmq_stores.delete_record
    binlog = write(fixtures / "edited.binlog",
                   add("a0", "late", 1.0, b"acked"), add("a1", "late", 2.0, b"kept\x00\xff"),
                   add("a2", "late", 3.0, b"acked too"), delete("a0"),
                   delete("a2", tag=b"B"), delete(in_table.msg_id), delete("never-added"),
                   add(in_table.msg_id, in_table.queue, in_table.timestamp, b"again"),
                   add("a3", "late", 2.5, b"after a delete", 9.5))
    source = Source(table, binlog)
    records = records_of(source)
    source.close()
    late = [(r.msg_id, r.body, r.ack_timeout) for r in records if r.queue == "late"]
    assert late == [("a1", b"kept\x00\xff", 0.0), ("a3", b"after a delete", 9.5)]
    assert [r.body for r in records if r.msg_id == in_table.msg_id] == [in_table.body]
    assert len(records) == 100 + 2


@pytest.mark.parametrize("cut", [1, 5, 30])
def test_a_truncated_binlog_record_is_an_error_naming_its_offset(fixtures, cut):
    data = (fixtures / "crashed.binlog").read_bytes()
    records = [Record._make(r) for r in read_binlog(str(fixtures / "crashed.binlog"))]
    last = len(data) - len(ocamlmq_stores.add_record(
        records[-1].msg_id, "late", records[-1].timestamp, records[-1].body))
    short = write(fixtures / "short.binlog", data[:len(data) - cut])
    with pytest.raises(SourceError, match=r"truncated record at byte %d of %d \(--import-ocamlmq"
                       r"-partial imports the records before it\)" % (last, len(data) - cut)):
        read_binlog(short)
    assert [Record._make(r).body for r in read_binlog(short, partial=True)] == [
        r.body for r in records[:-1]]


def test_a_corrupt_binlog_record_is_an_error_naming_its_offset(fixtures):
    good = ocamlmq_stores.add_record("a0", "late", 1.0, b"first")
    path = write(fixtures / "bad.binlog", good, b"X" + b"\x00" * 20)
    with pytest.raises(SourceError, match=r"corrupt \(unknown tag b'X'\) record at byte %d"
                       % len(good)):
        read_binlog(path)
    assert [Record._make(r).body for r in read_binlog(path, partial=True)] == [b"first"]


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing.db"), "missing.db does not exist"),
    (lambda d: str(d), "is not a file"),
    (lambda d: write(d / "text.db", b"not a database, just text\n" * 100),
     "text.db: file is not a database"),
    (lambda d: str(sqlite3.connect(str(d / "other.db")).execute("CREATE TABLE t (x)") and
                   d / "other.db"), "not an ocamlmq store: %s has no ocamlmq_msgs table"),
    (lambda d: str(sqlite3.connect(str(d / "cols.db")).execute(
        "CREATE TABLE ocamlmq_msgs (msg_id, destination, body, extra)") and d / "cols.db"),
     "other columns (missing ack_pending, ack_timeout, priority, timestamp; unknown extra)"),
])
def test_a_source_that_is_not_an_ocamlmq_store(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(SourceError) as error:
        open_import(path)
    assert message.replace("%s", path) in str(error.value)


def test_a_binlog_needs_a_table(fixtures):
    with pytest.raises(SourceError, match="needs --import-ocamlmq"):
        open_import(None, str(fixtures / "crashed.binlog"), store=str(fixtures / "pymq.db"))
    with pytest.raises(SourceError, match="cannot read ocamlmq binlog .*nothing.binlog: No such"):
        open_import(str(fixtures / "crashed.db"), str(fixtures / "nothing.binlog"))


def test_an_unreachable_database(tmp_path):
    url = "postgresql:///ocamlmq?host=%s&port=1&user=nobody&password=s3cret" % tmp_path
    with pytest.raises(SourceError, match="cannot connect to ocamlmq's database") as error:
        open_import(url)
    assert "s3cret" not in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# The broker imports at start
# ---------------------------------------------------------------------------------------------

SUMMARY = (r"imported from ocamlmq store (.*): (\d+) messages into (\d+) queues \((\d+) from "
           r"the binlog, (\d+) awaiting an ACK; (\d+) imported before\)")


def summary(broker):
    """(messages, queues, from the binlog, awaiting an ACK, imported before) of its log line."""
    return tuple(int(n) for n in broker.wait_for_log(SUMMARY).groups()[1:])


def client_of(broker):
    client = RawClient(broker.address, timeout=30)
    client.connect("1.2")
    return client


def drain(client, queue, n):
    """The n messages of `queue`, each ACKed, in the order they came."""
    client.request("SUBSCRIBE", {"destination": "/queue/" + queue, "id": queue,
                                 "ack": "client-individual"})
    frames = []
    for _ in range(n):
        frames.append(client.expect("MESSAGE"))
        client.send("ACK", {"id": frames[-1].headers["ack"]})
    client.request("UNSUBSCRIBE", {"id": queue})
    return frames


def check_arrived(client, expected, ack_pending=("jobs",)):
    """Every message once, bodies byte-equal, in sending order, with its headers."""
    ids = set()
    for queue, messages in expected.items():
        frames = drain(client, queue, len(messages))
        assert [(f.body, f.headers.get("ack-timeout")) for f in frames] == [
            (body, None if timeout is None else repr(timeout)) for body, timeout in messages]
        for frame in frames:
            ids.add(frame.headers["ocamlmq-message-id"])
            assert frame.headers["destination"] == "/queue/" + queue
            if queue in ack_pending:
                assert frame.headers["redelivered"] == "true"
                assert frame.headers["redelivery-count"] == "1"
            else:
                assert "redelivered" not in frame.headers
        assert count_msgs(client, queue) == 0
    assert len(ids) == sum(len(messages) for messages in expected.values())


def test_import_of_an_ocamlmq_store(fixtures, broker_process, tmp_path):
    store = str(tmp_path / "pymq.db")
    broker = broker_process("--import-ocamlmq", str(fixtures / "store.db"), "--db", store,
                            listening=False)
    assert summary(broker) == (100, 3, 0, 60, 0)
    broker.wait_until_listening()
    client = client_of(broker)
    assert {queue: count_msgs(client, queue) for queue in STORE} == STORE    # before delivery
    check_arrived(client, sent(fixtures, "store"))
    assert broker.stop() == 0


def test_import_of_a_killed_ocamlmq_with_its_binlog(fixtures, broker_process, tmp_path):
    before = digest(fixtures / "crashed.db"), digest(fixtures / "crashed.binlog")
    broker = broker_process("--import-ocamlmq", str(fixtures / "crashed.db"),
                            "--import-ocamlmq-binlog", str(fixtures / "crashed.binlog"),
                            "--db", str(tmp_path / "pymq.db"), listening=False)
    assert summary(broker) == (150, 4, 50, 60, 0)
    broker.wait_until_listening()
    client = client_of(broker)
    assert {queue: count_msgs(client, queue) for queue in CRASHED} == CRASHED
    check_arrived(client, sent(fixtures, "crashed"))
    assert broker.stop() == 0
    assert (digest(fixtures / "crashed.db"), digest(fixtures / "crashed.binlog")) == before


def test_an_imported_ack_timeout_is_honoured(fixtures, broker_process, tmp_path):
    """reports.daily's first message was sent with ack-timeout 2.14: not ACKed, it comes back
    after that long, no sooner."""
    broker = broker_process("--import-ocamlmq", str(fixtures / "store.db"),
                            "--db", str(tmp_path / "pymq.db"))
    client = client_of(broker)
    client.request("SUBSCRIBE", {"destination": "/queue/reports.daily", "id": "1",
                                 "ack": "client-individual", "prefetch": "1"})
    first = client.expect("MESSAGE")
    delivered = time.monotonic()
    assert first.headers["ack-timeout"] == "2.14"
    assert "redelivered" not in first.headers
    again = client.expect("MESSAGE", timeout=10)
    assert 2.1 <= time.monotonic() - delivered < 5
    assert again.headers["message-id"] == first.headers["message-id"]
    assert again.body == first.body
    assert again.headers["redelivered"] == "true"
    assert again.headers["redelivery-count"] == "1"
    assert broker.stop() == 0


def test_a_second_start_imports_nothing_again(fixtures, broker_process, tmp_path):
    """The option stays in the config file: restarts import nothing twice, not even what was
    consumed in between."""
    config = tmp_path / "pymq.conf"
    config.write_text("[pymq]\nimport-ocamlmq = %s\ndb = %s\n"
                      % (fixtures / "store.db", tmp_path / "pymq.db"))
    broker = broker_process("--config", str(config), listening=False)
    assert summary(broker) == (100, 3, 0, 60, 0)
    broker.wait_until_listening()
    client = client_of(broker)
    consumed = drain(client, "emails", 25)
    assert broker.stop() == 0

    broker = broker_process("--config", str(config), listening=False)
    assert summary(broker) == (0, 0, 0, 0, 100)
    broker.wait_until_listening()
    client = client_of(broker)
    assert {queue: count_msgs(client, queue) for queue in STORE} == dict(STORE, emails=0)
    assert len(consumed) == 25
    assert broker.stop() == 0


def run_pymq(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "pymq.py"), "--port", "0", *args],
                          capture_output=True, text=True, timeout=60, cwd=cwd,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args, message", [
    (["--import-ocamlmq", "{d}/none.db"], "ocamlmq store {d}/none.db does not exist"),
    (["--import-ocamlmq", "{d}/crashed.binlog"], "file is not a database"),
    (["--import-ocamlmq", "{d}/crashed.db", "--import-ocamlmq-binlog", "{d}/short.binlog"],
     "binlog {d}/short.binlog: truncated record at byte 3518 of 3580 (--import-ocamlmq-partial"),
    (["--import-ocamlmq", "postgresql:///mq?host={d}&port=1"],
     "cannot connect to ocamlmq's database postgresql:///mq?host={d}&port=1"),
    (["--import-ocamlmq-binlog", "{d}/crashed.binlog"], "needs --import-ocamlmq"),
])
def test_bad_input_stops_the_start_and_leaves_the_store_untouched(fixtures, args, message):
    data = (fixtures / "crashed.binlog").read_bytes()
    (fixtures / "short.binlog").write_bytes(data[:-10])
    store = fixtures / "pymq.db"
    result = run_pymq(*[arg.format(d=fixtures) for arg in args], "--db", str(store),
                      cwd=str(fixtures))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and message.format(d=fixtures) in errors[0], result.stderr
    assert "listening" not in result.stderr and "Traceback" not in result.stderr
    assert not store.exists()


def test_a_truncated_binlog_with_partial(fixtures, broker_process, tmp_path):
    data = (fixtures / "crashed.binlog").read_bytes()
    (fixtures / "short.binlog").write_bytes(data[:-10])
    broker = broker_process("--import-ocamlmq", str(fixtures / "crashed.db"),
                            "--import-ocamlmq-binlog", str(fixtures / "short.binlog"),
                            "--import-ocamlmq-partial", "--db", str(tmp_path / "pymq.db"),
                            listening=False)
    broker.wait_for_log(r"WARNING .*truncated record at byte 3518 of 3580: importing the "
                        r"records before it")
    assert summary(broker) == (149, 4, 49, 60, 0)
    broker.wait_until_listening()
    client = client_of(broker)
    late = drain(client, "late", 49)
    assert [frame.body for frame in late] == [b"late-%d" % i for i in range(49)]
    assert broker.stop() == 0


def test_import_into_a_memory_store(fixtures, broker_process):
    broker = broker_process("--import-ocamlmq", str(fixtures / "store.db"), "--db", "memory:",
                            listening=False)
    assert summary(broker) == (100, 3, 0, 60, 0)
    broker.wait_until_listening()
    client = client_of(broker)
    check_arrived(client, sent(fixtures, "store"))
    assert broker.stop() == 0


# ---------------------------------------------------------------------------------------------
# PostgreSQL: ocamlmq's old table (§7.7)
# ---------------------------------------------------------------------------------------------

PG_ROWS = 500


def expected_of(rows):
    """{queue: [(body, ack_timeout or None), ...]} in (timestamp, msg_id) order."""
    expected = {}
    for ack_pending, msg_id, _, queue, timestamp, ack_timeout, body in sorted(
            rows, key=lambda row: (row[4], row[1])):
        expected.setdefault(queue, []).append((body, ack_timeout or None))
    return expected


@pytest.fixture
def ocamlmq_database():
    """A fresh database holding ocamlmq's table, filled: (its URL, the rows)."""
    url = postgres.fresh_database_url()
    # One queue all delivered-not-ACKed, so that check_arrived() can tell them apart.
    rows = [(row[3] == "jobs",) + row[1:] for row in ocamlmq_stores.make_rows(PG_ROWS)]
    ocamlmq_stores.make_postgresql_table(url, rows)
    return url, rows


def pg_flags(url):
    """The same database in ocamlmq's spelling."""
    import urllib.parse
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    return ["--dbsockdir", query["host"], "--dbport", query["port"], "--dbuser", query["user"],
            "--dbdatabase", parts.path.lstrip("/")]


@pytest.mark.parametrize("spelling", ["--db", "ocamlmq's flags"])
def test_a_postgresql_store_imports_ocamlmqs_table_unasked(ocamlmq_database, broker_process,
                                                           spelling):
    url, rows = ocamlmq_database
    args = ["--db", url] if spelling == "--db" else pg_flags(url)
    broker = broker_process(*args, listening=False)
    broker.wait_for_log("the store's database holds ocamlmq's ocamlmq_msgs table: importing")
    expected = expected_of(rows)
    jobs = len(expected["jobs"])
    assert summary(broker) == (PG_ROWS, 4, 0, jobs, 0)
    broker.wait_until_listening()
    client = client_of(broker)
    assert {queue: count_msgs(client, queue) for queue in expected} == {
        queue: len(messages) for queue, messages in expected.items()}
    check_arrived(client, expected)
    assert broker.stop() == 0

    broker = broker_process(*args, listening=False)
    assert summary(broker) == (0, 0, 0, 0, PG_ROWS)          # the table is still there
    broker.wait_until_listening()
    assert count_msgs(client_of(broker), "jobs") == 0
    assert broker.stop() == 0


def test_a_postgresql_source_into_a_sqlite_store(ocamlmq_database, broker_process, tmp_path):
    url, rows = ocamlmq_database
    broker = broker_process("--import-ocamlmq", url, "--db", str(tmp_path / "pymq.db"),
                            listening=False)
    assert summary(broker)[:2] == (PG_ROWS, 4)
    broker.wait_until_listening()
    check_arrived(client_of(broker), expected_of(rows))
    assert broker.stop() == 0


def test_a_postgresql_database_without_the_table(broker_process, tmp_path):
    url = postgres.fresh_database_url()
    with pytest.raises(SourceError, match="has no ocamlmq_msgs table"):
        PostgreSQLTable(url)
    broker = broker_process("--db", url)        # a PostgreSQL store of its own: nothing to do
    assert not any("ocamlmq" in line for line in broker.log)
    assert broker.stop() == 0


# ---------------------------------------------------------------------------------------------
# kill -9 during a large import
# ---------------------------------------------------------------------------------------------

BIG = 200000


def test_kill_9_during_a_large_import_then_a_restart(broker_process, tmp_path):
    rows = list(ocamlmq_stores.make_rows(BIG))
    source = ocamlmq_stores.make_sqlite_store(str(tmp_path / "ocamlmq.db"), rows)
    store = str(tmp_path / "pymq.db")
    args = ("--import-ocamlmq", source, "--db", store, "--log-level", "debug")
    broker = broker_process(*args, listening=False)
    broker.wait_for_log(r"ocamlmq import: [1-9]\d* messages stored", timeout=60)
    broker.proc.send_signal(signal.SIGKILL)
    assert broker.proc.wait(10) == -signal.SIGKILL
    db = sqlite3.connect(store)
    done = db.execute("SELECT COUNT(*) FROM imported").fetchone()[0]
    assert 0 < done < BIG                           # it was killed part-way
    assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == done
    db.close()

    broker = broker_process(*args, listening=False)
    imported = summary(broker)
    assert (imported[0], imported[4]) == (BIG - done, done)
    broker.wait_until_listening(timeout=60)
    client = client_of(broker)
    expected = expected_of(rows)
    assert {queue: count_msgs(client, queue) for queue in expected} == {
        queue: len(messages) for queue, messages in expected.items()}
    assert broker.stop() == 0

    # Every message once, each queue in ocamlmq's order (the store's seq order).
    db = sqlite3.connect(store)
    stored = {}
    for queue, headers, body in db.execute("SELECT queue, headers, body FROM messages "
                                           "ORDER BY seq"):
        timeout = dict(json.loads(headers)).get("ack-timeout")
        stored.setdefault(queue, []).append((body, timeout and float(timeout)))
    db.close()
    assert stored == expected

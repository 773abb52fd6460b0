"""Moving from ocamlmq: its stores read, and their messages imported through the Storage
contract (ocamlmq-behaviour.md §7.2 SQLite table, §7.5 binlog, §7.7 PostgreSQL table).

open_import() checks a source before pymq's store is opened (a bad one leaves it untouched)
and reads ocamlmq's binlog whole; Source.import_into(storage) then writes the messages in
batches, each one Import (base.py): the messages and their ocamlmq ids in one commit, an id
imported before skipped. So an import that is run again, or cut short by a crash and run
again, stores each message exactly once; the ids stay recorded after their messages are
consumed, so a restart with the option still set brings nothing back. The source is only read.

Each ocamlmq message becomes what a SEND of it would have made: queue `destination`, its body
byte for byte, its ack_timeout (> 0) as an ``ack-timeout`` header, the default priority (ocamlmq
stored 0 and never read it), and an ``ocamlmq-message-id`` header. One that was delivered and
not ACKed when ocamlmq stopped (``ack_pending``) counts as delivered once: its MESSAGE says
``redelivered:true``, ``redelivery-count:1``. Within a queue, messages keep ocamlmq's
(timestamp, msg_id) order: sources are read in (queue, timestamp, msg_id) order, a total order,
so whatever a crashed import committed is a prefix of every queue, and a rerun gives the rest
higher sequence numbers.

The binlog (``-binlog FILE``) holds what ocamlmq had receipted but not flushed to its table:
``A`` adds a message, ``D`` deletes one. ocamlmq's own reader expects ``B`` for a delete (a bug:
it stops at the first ``D``); nothing ever wrote ``B``, but a writer fixed to match the reader
would, so both mean delete here. A delete only ever names a message of the binlog (an ACK of a
message in the table is kept in ocamlmq's memory, never logged), so one for an id not added
earlier in the binlog is ignored: the table is what ocamlmq had. An ``A`` whose id is in the
table (a crash between a flush's commit and the binlog's truncation) is the table's row.
Binlog messages were never ack-pending on disk: they come over undelivered.
"""

import heapq
import logging
import os
import sqlite3
import struct
import urllib.parse
from operator import itemgetter

import gevent

from . import import_psycopg2, without_password
from .base import DEFAULT_PRIORITY

log = logging.getLogger("pymq.ocamlmq")

TABLE = "ocamlmq_msgs"
COLUMNS = {"ack_pending", "msg_id", "priority", "destination", "timestamp", "ack_timeout",
           "body"}
# Per Import: few enough that memory stays bounded (about two batches are alive: one being
# committed, the next being read), many enough that the commits are few.
BATCH_MESSAGES = 10000
BATCH_BYTES = 16 * 1024 * 1024
FETCH = 2000                # rows per read from the source
MAX_ACK_TIMEOUT = 1e9       # what a SEND's ack-timeout header may say (seconds)


class SourceError(Exception):
    """The ocamlmq store cannot be imported; the message is one line, for the operator."""


# A record, one ocamlmq message, is a plain tuple, as SQLite returns its rows:
#     (queue, timestamp, msg_id, ack_timeout, ack_pending, body)
# so that records sort in import order, (queue, timestamp, msg_id), as they are: a million of
# them cost no object of their own.
QUEUE, MSG_ID, ACK_PENDING, BODY = 0, 2, 4, 5


# -- ocamlmq's table --------------------------------------------------------------------------

class SQLiteTable:
    """ocamlmq_msgs in ocamlmq's SQLite file, opened read-only (§7.2)."""

    def __init__(self, path):
        self.name = path
        if not os.path.exists(path):
            raise SourceError("ocamlmq store %s does not exist" % path)
        if not os.path.isfile(path):
            raise SourceError("ocamlmq store %s is not a file" % path)
        uri = "file:%s?mode=ro" % urllib.parse.quote(os.path.abspath(path))
        try:
            self.db = sqlite3.connect(uri, uri=True, isolation_level=None)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(%s)" % TABLE)}
        except sqlite3.Error as error:
            raise SourceError("cannot read ocamlmq store %s: %s" % (path, error))
        _check_columns(columns, "%s" % path)

    def records(self):
        cursor = self.db.execute(
            "SELECT destination, timestamp, msg_id, ack_timeout, ack_pending, "
            "CAST(body AS BLOB) FROM %s ORDER BY destination, timestamp, msg_id" % TABLE)
        while True:
            rows = cursor.fetchmany(FETCH)
            if not rows:
                return
            yield from rows

    def holding(self, ids):
        """Which of `ids` are in the table."""
        held = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            held.update(row[0] for row in self.db.execute(
                "SELECT msg_id FROM %s WHERE msg_id IN (%s)" % (TABLE, ",".join("?" * len(chunk))),
                chunk))
        return held

    def close(self):
        self.db.close()


class PostgreSQLTable:
    """ocamlmq_msgs in a PostgreSQL database (the seed's backend, §7.7)."""

    def __init__(self, url, db=None):
        self.name = "%s (table %s)" % (without_password(url), TABLE)
        if db is None:
            psycopg2 = import_psycopg2()
            try:
                db = psycopg2.connect(url)
            except psycopg2.Error as error:
                raise SourceError("cannot connect to ocamlmq's database %s: %s"
                                  % (without_password(url), _one_line(error)))
        self.db = db
        columns = _pg_columns(db)
        if columns is None:
            db.close()
            raise SourceError("not an ocamlmq store: database %s has no %s table"
                              % (without_password(url), TABLE))
        try:
            _check_columns(columns, self.name)
        except SourceError:
            db.close()
            raise

    def records(self):
        # A server-side cursor: the rows come FETCH at a time. COLLATE "C": code point order,
        # as Python and SQLite compare (the merge with the binlog relies on it).
        with self.db.cursor(name="ocamlmq_import") as cursor:
            cursor.itersize = FETCH
            cursor.execute(
                'SELECT destination, EXTRACT(EPOCH FROM timestamp)::float8, msg_id, ack_timeout, '
                'ack_pending, body FROM %s ORDER BY destination COLLATE "C", 2, '
                'msg_id COLLATE "C"' % TABLE)
            for row in cursor:
                yield row[:BODY] + (bytes(row[BODY]),)
        self.db.rollback()

    def holding(self, ids):
        with self.db.cursor() as cursor:
            cursor.execute("SELECT msg_id FROM %s WHERE msg_id = ANY(%%s)" % TABLE, (list(ids),))
            held = {row[0] for row in cursor.fetchall()}
        self.db.rollback()
        return held

    def close(self):
        self.db.close()


def _pg_columns(db):
    """The column names of the ocamlmq_msgs table visible in `db`, or None if there is none."""
    with db.cursor() as cursor:
        cursor.execute("SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                       "AND attnum > 0 AND NOT attisdropped", (TABLE,))
        columns = {row[0] for row in cursor.fetchall()}
    db.rollback()
    return columns or None


def _check_columns(columns, name):
    if not columns:
        raise SourceError("not an ocamlmq store: %s has no %s table" % (name, TABLE))
    if columns != COLUMNS:
        missing, extra = sorted(COLUMNS - columns), sorted(columns - COLUMNS)
        raise SourceError("not an ocamlmq store: %s's %s table has other columns (%s)" % (
            name, TABLE, "; ".join(part for part in (
                "missing " + ", ".join(missing) if missing else "",
                "unknown " + ", ".join(extra) if extra else "") if part)))


def _one_line(error):
    return " ".join(str(error).split())


# -- ocamlmq's binlog -------------------------------------------------------------------------

_INT32 = struct.Struct("<i")
_FLOAT64 = struct.Struct("<d")
_ADD_FIXED = struct.Struct("<id")       # priority, timestamp: between the queue and the body


class _Truncated(Exception):
    pass


def read_binlog(path, partial=False):
    """The records of ocamlmq's binlog at `path` that survive its deletes, sorted in import
    order (those also in the table are dropped by Source). A truncated or corrupt record is a
    SourceError naming its byte offset; with `partial`, a warning, and the records before it
    count. The file is read whole: it holds at most what ocamlmq had not flushed (-maxmsgs)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise SourceError("cannot read ocamlmq binlog %s: %s" % (path, error.strerror or error))
    messages = {}
    offset = 0
    while offset < len(data):
        try:
            offset = _read_record(data, offset, messages)
        except _Truncated as error:
            problem = "binlog %s: %s record at byte %d of %d" % (path, error, offset, len(data))
            if not partial:
                raise SourceError(problem + " (--import-ocamlmq-partial imports the records "
                                            "before it)")
            log.warning("%s: importing the records before it (--import-ocamlmq-partial)",
                        problem)
            break
    return sorted(messages.values())


def _read_record(data, offset, messages):
    """Apply the binlog record at `offset` to `messages` (id -> record); the offset after
    it."""
    tag = data[offset:offset + 1]
    if tag == b"A":
        msg_id, at = _string(data, offset + 1)
        queue, at = _string(data, at)
        _, timestamp = _unpack(_ADD_FIXED, data, at)
        body, at = _bytes(data, at + _ADD_FIXED.size)
        (ack_timeout,) = _unpack(_FLOAT64, data, at)
        messages[msg_id] = (queue, timestamp, msg_id, ack_timeout, False, body)
        return at + _FLOAT64.size
    if tag in (b"D", b"B"):
        msg_id, at = _string(data, offset + 1)
        messages.pop(msg_id, None)
        return at
    raise _Truncated("corrupt (unknown tag %r)" % tag)


def _unpack(layout, data, at):
    if at + layout.size > len(data):
        raise _Truncated("truncated")
    return layout.unpack_from(data, at)


def _bytes(data, at):
    (length,) = _unpack(_INT32, data, at)
    at += _INT32.size
    if length < 0:
        raise _Truncated("corrupt (negative length)")
    if at + length > len(data):
        raise _Truncated("truncated")
    return data[at:at + length], at + length


def _string(data, at):
    raw, at = _bytes(data, at)
    try:
        return raw.decode("utf-8"), at
    except UnicodeDecodeError:
        raise _Truncated("corrupt (a name that is not UTF-8)")


# -- the import -------------------------------------------------------------------------------

class Source:
    """An ocamlmq store to import: its table, and the survivors of its binlog (if any)."""

    def __init__(self, table, binlog=None, partial=False):
        self.table = table
        self.name = table.name
        self.binlog = []
        if binlog is not None:
            self.name += " + " + binlog
            try:
                survivors = read_binlog(binlog, partial)
            except SourceError:
                table.close()
                raise
            held = table.holding([record[MSG_ID] for record in survivors])
            self.binlog = [record for record in survivors if record[MSG_ID] not in held]

    def records(self):
        """Every message once, in import order."""
        return heapq.merge(self.table.records(), self.binlog)

    def import_into(self, storage):
        """Store the messages not imported before; log one line of what came over. Raises
        StorageError if a batch could not be stored (the batches before it are)."""
        summary = Summary({record[MSG_ID] for record in self.binlog})
        committing = None       # (Import, records) being committed while the next is read
        for records in _batches(self.records()):
            op = storage.import_messages([_message(storage, *r) for r in records],
                                         list(map(itemgetter(MSG_ID), records)))
            if committing is not None:
                summary.add(*committing)
            committing = (op, records)
            gevent.sleep(0)     # the committer takes the batch: the next one is read meanwhile
        if committing is not None:
            summary.add(*committing)
        log.info("imported from ocamlmq store %s: %s", self.name, summary)
        return summary

    def close(self):
        self.table.close()


class Summary:
    """What an import stored: messages, queues, from the binlog, awaiting an ACK; and how many
    it found imported already."""

    def __init__(self, binlog_ids):
        self.binlog_ids = binlog_ids
        self.messages = self.from_binlog = self.ack_pending = self.before = 0
        self.queues = set()

    def add(self, op, records):
        op.batch.wait()
        if op.result:
            records = [record for record, message in zip(records, op.messages)
                       if message.seq not in op.result]
            self.before += len(op.result)
        self.messages += len(records)
        self.queues.update(map(itemgetter(QUEUE), records))
        self.ack_pending += sum(map(bool, map(itemgetter(ACK_PENDING), records)))
        if self.binlog_ids:
            self.from_binlog += len(self.binlog_ids.intersection(map(itemgetter(MSG_ID),
                                                                     records)))
        log.debug("ocamlmq import: %d messages stored, %d found imported before",
                  self.messages, self.before)

    def __str__(self):
        return ("%d messages into %d queues (%d from the binlog, %d awaiting an ACK; %d "
                "imported before)" % (self.messages, len(self.queues), self.from_binlog,
                                      self.ack_pending, self.before))


def _batches(records):
    """Lists of records of at most BATCH_MESSAGES and about BATCH_BYTES (of bodies)."""
    batch, size = [], 0
    for record in records:
        batch.append(record)
        size += len(record[BODY])
        if size >= BATCH_BYTES or len(batch) >= BATCH_MESSAGES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _message(storage, queue, timestamp, msg_id, ack_timeout, ack_pending, body):
    """The pymq message an ocamlmq one becomes: what a SEND of it would have stored."""
    headers = [("ocamlmq-message-id", msg_id)]
    if 0 < ack_timeout < MAX_ACK_TIMEOUT:       # not NaN, not infinite
        headers.append(("ack-timeout", "%d" % ack_timeout if ack_timeout.is_integer()
                        else repr(ack_timeout)))
    else:
        ack_timeout = 0.0                       # ocamlmq's 0: none
    # The size as StoredMessage would reckon it (headers and all), within a few bytes.
    message = storage.new_message(queue, DEFAULT_PRIORITY, ack_timeout, headers, body,
                                  size=len(body) + len(msg_id) + 150)
    if ack_pending:
        message.deliveries = 1
    return message


def open_import(source, binlog=None, partial=False, store=None):
    """The ocamlmq store to import at start, checked, or None: `source` (a SQLite file or a
    postgresql:// URL), else the ocamlmq_msgs table of the database of a PostgreSQL `store`
    (ocamlmq and pymq pointed at the same database: swapping the binary is the migration).
    Raises SourceError for a source that cannot be imported."""
    if source:
        if source.startswith(("postgresql://", "postgres://")):
            table = PostgreSQLTable(source)
        else:
            table = SQLiteTable(source)
    else:
        table = _table_in_store(store or "")
        if table is None:
            if binlog:
                raise SourceError("--import-ocamlmq-binlog %s needs --import-ocamlmq (the "
                                  "ocamlmq database it goes with)" % binlog)
            return None
        log.info("the store's database holds ocamlmq's %s table: importing it", TABLE)
    return Source(table, binlog, partial)


def _table_in_store(store):
    """ocamlmq's table in the database of a PostgreSQL store, or None. A database that cannot
    be reached is the store's error to report, as it would be without this look."""
    if not store.startswith(("postgresql://", "postgres://")):
        return None
    psycopg2 = import_psycopg2()
    try:
        db = psycopg2.connect(store)
    except psycopg2.Error:
        return None
    if _pg_columns(db) is None:
        db.close()
        return None
    return PostgreSQLTable(store, db)

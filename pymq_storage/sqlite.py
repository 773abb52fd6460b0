"""SQLite storage: the embedded default, a file next to the broker (``--db pymq.db``).

WAL journal and ``synchronous=FULL``: a commit is on disk when apply() returns, which is what
a RECEIPT promises. sqlite3 blocks its OS thread, so Storage runs every call of this backend
in one thread of its own (``blocking = True``) and the gevent hub never waits on the disk.

The indexes are partial, so that a plain message (ready at once, never expiring) costs one
index entry, and each finding is one index range: ready messages in delivery order
(``messages_ready``), due ones by due time (``messages_due``), each queue's delayed ones
(``messages_delayed``, for counting), expired ones (``messages_expiry``). A query uses a partial
index only when its WHERE repeats the index's condition literally (``due = 0``, ``due > 0``).
"""

import json
import os
import sqlite3

from .base import Backend, StoredMessage, skip_scan

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE messages (
    seq         INTEGER PRIMARY KEY,    -- arrival order, and the message id
    queue       TEXT NOT NULL,
    priority    INTEGER NOT NULL,
    ack_timeout REAL NOT NULL,          -- seconds, 0: the broker default
    headers     TEXT NOT NULL,          -- JSON list of [name, value]
    body        BLOB NOT NULL,
    due         INTEGER NOT NULL DEFAULT 0,     -- epoch ms it may be delivered from, 0: ready
    expires     INTEGER NOT NULL DEFAULT 0,     -- epoch ms it expires at, 0: never
    deliveries  INTEGER NOT NULL DEFAULT 0,     -- times delivered
    dead_letter INTEGER NOT NULL DEFAULT 0      -- 1: in a dead-letter queue
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta VALUES ('next_seq', 1);
"""
# What version 1 lacks (the columns' defaults are what a version 1 message means).
UPGRADE_FROM_1 = """
ALTER TABLE messages ADD COLUMN due INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN expires INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN deliveries INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN dead_letter INTEGER NOT NULL DEFAULT 0;
DROP INDEX messages_delivery;
"""
INDEXES = """
CREATE INDEX messages_ready ON messages (queue, priority DESC, seq) WHERE due = 0;
CREATE INDEX messages_due ON messages (due) WHERE due > 0;
CREATE INDEX messages_delayed ON messages (queue, due) WHERE due > 0;
CREATE INDEX messages_expiry ON messages (expires) WHERE expires > 0;
CREATE TABLE dedup (
    queue   TEXT NOT NULL,
    key     TEXT NOT NULL,
    seq     INTEGER NOT NULL,           -- the message that took the key
    until   INTEGER NOT NULL,           -- epoch ms its window ends
    PRIMARY KEY (queue, key)
) WITHOUT ROWID;
CREATE INDEX dedup_until ON dedup (until);
"""
# Ids of the messages imported from another broker (pymq_storage/ocamlmq.py): see Import. Made
# when missing, with no version bump: it only adds, and an older pymq may ignore it.
IMPORTED = "CREATE TABLE IF NOT EXISTS imported (id TEXT PRIMARY KEY) WITHOUT ROWID"
COLUMNS = ("SELECT seq, queue, priority, ack_timeout, headers, body, due, expires, deliveries, "
           "dead_letter FROM messages ")
# Rows are written by multi-row statements of these sizes (a batch of 100 inserts is three of
# 32 and one of 4): one statement opens the table's and every index's cursors once for all its
# rows, where executemany() would for each row; a few fixed sizes are compiled once each.
CHUNKS = (256, 32, 4, 1)
# Every message of a queue: the two partial indexes between them hold them all.
OF_QUEUE = "((queue = :queue AND due = 0) OR (queue = :queue AND due > 0))"


def _check_directory(path):
    """Say which directory is wrong, and why: sqlite3 only says "unable to open database
    file". SQLite writes its journal files next to the database, so the directory must be
    writable even when the file exists."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(directory):
        raise OSError("cannot create %s: directory %s does not exist" % (path, directory))
    if not os.path.isdir(directory):
        raise OSError("cannot create %s: %s is not a directory" % (path, directory))
    if not os.access(directory, os.W_OK | os.X_OK):
        if os.statvfs(directory).f_flag & getattr(os, "ST_RDONLY", 1):   # not in PyPy's os
            why = "it is on a read-only filesystem"
        else:
            why = "not by this user (uid %d)" % os.geteuid()
        raise OSError("cannot write %s: directory %s is not writable: %s" % (path, directory, why))


class SchemaError(Exception):
    pass


def _script(db, script):
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _chunks(rows):
    """(size, rows) pieces of `rows`, of the CHUNKS sizes, largest first."""
    start = 0
    for size in CHUNKS:
        while len(rows) - start >= size:
            yield size, rows[start:start + size]
            start += size


def _message(row):
    seq, queue, priority, ack_timeout, headers, body, due, expires, deliveries, dead = row
    return StoredMessage(seq, queue, priority, ack_timeout,
                         [tuple(pair) for pair in json.loads(headers)], body, due, expires,
                         deliveries, bool(dead), len(body or b"") + len(headers) + 100)


class SQLiteBackend(Backend):
    blocking = True

    def __init__(self, path):
        self.path = path
        self.db = None
        self._reads = None

    def open(self):
        _check_directory(self.path)
        db = self.db = sqlite3.connect(self.path, isolation_level=None)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 and db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
            raise SchemaError("%s is not a pymq database" % self.path)
        if version > SCHEMA_VERSION:
            raise SchemaError("%s has schema version %d; this pymq reads version %d (or "
                              "upgrades older ones): use a newer pymq"
                              % (self.path, version, SCHEMA_VERSION))
        if version < SCHEMA_VERSION:
            db.execute("BEGIN IMMEDIATE")
            try:
                _script(db, SCHEMA if version == 0 else UPGRADE_FROM_1)
                _script(db, INDEXES)
                db.execute("PRAGMA user_version=%d" % SCHEMA_VERSION)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        db.execute(IMPORTED)
        # Only now that the file is known to be ours: the journal mode is stored in it.
        # It answers with a row: read it, or the statement stays in progress until the cursor
        # is freed, which on PyPy (no reference counting) is not before the first COMMIT.
        db.execute("PRAGMA journal_mode=WAL").fetchall()
        db.execute("PRAGMA synchronous=FULL")
        # One cursor for the reads a batch may hold by the hundred thousand (a refill per
        # queue): every db.execute() makes a cursor, and PyPy's sqlite3 (Python over cffi)
        # remembers each by a weak reference, sweeping its list every 200. With no reference
        # counting the dead ones stay until a major collection, so each sweep costs more than
        # the last: a batch of 415,000 loads took over 15 s, delivering nothing (bench/README).
        self._reads = db.cursor()
        stored = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0]
        highest = db.execute("SELECT MAX(seq) FROM messages").fetchone()[0] or 0
        return max(stored, highest + 1)

    def apply(self, batch):
        db = self.db
        if batch.has_writes():
            db.execute("BEGIN IMMEDIATE")
            try:
                self.write(batch)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return self.answer(batch.reads)

    # -- writes --------------------------------------------------------------------------------

    def insert(self, messages, dedup):
        duplicates = set()
        if dedup:
            for message in messages:
                if message.seq in dedup and not self._take_key(message, *dedup[message.seq]):
                    duplicates.add(message.seq)
            messages = [m for m in messages if m.seq not in duplicates]
        # Each message read once: this runs in the storage thread while the hub may deliver
        # one (deliveries) or defer it (due) meanwhile; two reads could put it in both lists.
        plain, life = [], []
        for m in messages:
            due, expires, deliveries, dead = m.due, m.expires, m.deliveries, m.dead_letter
            if due or expires or deliveries or dead:
                life.append((m.seq, m.queue, m.priority, m.ack_timeout, json.dumps(m.headers),
                             m.body, due, expires, deliveries, dead))
            else:
                plain.append(m)
        for size, chunk in _chunks(plain):  # a message's life keeps its defaults: not sent
            values = []
            for m in chunk:
                values += (m.seq, m.queue, m.priority, m.ack_timeout, json.dumps(m.headers),
                           m.body)
            self.db.execute("INSERT INTO messages (seq, queue, priority, ack_timeout, headers, "
                            "body) VALUES " + ",".join(("(?, ?, ?, ?, ?, ?)",) * size), values)
        if life:
            self.db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", life)
        return duplicates

    def _take_key(self, message, key, sent, until):
        """Whether the message takes `key` in its queue: nobody has it, or its window was
        over when the message was sent."""
        cursor = self.db.execute(
            "INSERT INTO dedup VALUES (?, ?, ?, ?) ON CONFLICT (queue, key) DO UPDATE "
            "SET seq = excluded.seq, until = excluded.until "
            "WHERE dedup.until <= ? OR dedup.seq = excluded.seq",
            (message.queue, key, message.seq, until, sent))
        return cursor.rowcount == 1

    def update(self, messages):
        self.db.executemany("UPDATE messages SET deliveries = ?, due = ? WHERE seq = ?",
                            [(m.deliveries, m.due, m.seq) for m in messages])

    def dead_letter(self, op):
        return self.db.execute(
            "UPDATE messages SET queue = ?, headers = ?, due = 0, expires = 0, deliveries = 0, "
            "dead_letter = 1 WHERE seq = ? AND queue = ?",
            (op.target, json.dumps(op.headers), op.seq, op.source)).rowcount == 1

    def _chosen(self, op_queue, keep, below, limit):
        """The subquery of the seqs a Move or Purge takes, and its parameters."""
        return ("SELECT seq FROM messages WHERE %s AND seq < :below AND seq NOT IN "
                "(SELECT value FROM json_each(:keep)) ORDER BY seq LIMIT :limit" % OF_QUEUE,
                {"queue": op_queue, "below": below, "keep": json.dumps(sorted(keep)),
                 "limit": -1 if limit is None else limit})

    def move(self, op):
        chosen, params = self._chosen(op.source, op.keep, op.below, op.limit)
        params["target"] = op.target
        return self.db.execute(
            "UPDATE messages SET queue = :target, due = 0, expires = 0, deliveries = 0, "
            "dead_letter = 0 WHERE seq IN (%s)" % chosen, params).rowcount

    def purge(self, op):
        chosen, params = self._chosen(op.queue, op.keep, op.below, None)
        return self.db.execute("DELETE FROM messages WHERE seq IN (%s)" % chosen,
                               params).rowcount

    def promote(self, op):
        rows = self.db.execute(
            "UPDATE messages SET due = 0 WHERE seq IN (SELECT seq FROM messages WHERE due > 0 "
            "AND due <= ? ORDER BY due LIMIT ?) RETURNING queue, priority, seq",
            (op.now, op.limit)).fetchall()
        arrivals = {}
        for queue, priority, seq in rows:
            key = (-priority, seq)
            if queue not in arrivals or key < arrivals[queue]:
                arrivals[queue] = key
        left = self.db.execute("SELECT MIN(due) FROM messages WHERE due > 0").fetchone()[0]
        return arrivals, len(rows), left

    def forget_keys(self, op):
        return self.db.execute(
            "DELETE FROM dedup WHERE (queue, key) IN (SELECT queue, key FROM dedup "
            "WHERE until <= ? LIMIT ?)", (op.now, op.limit)).rowcount

    def import_messages(self, op):
        # "WHERE true": SQLite's parser needs it before an upsert clause.
        new = {row[0] for row in self.db.execute(
            "INSERT INTO imported SELECT value FROM json_each(?) WHERE true "
            "ON CONFLICT DO NOTHING RETURNING id", (json.dumps(op.ids),))}
        stored, _, skipped = op.split(set(op.ids) - new)
        self.insert(stored, {})
        return skipped

    def delete(self, seqs):
        deleted = 0
        for size, chunk in _chunks(seqs):
            deleted += self.db.execute("DELETE FROM messages WHERE seq IN (%s)"
                                       % ",".join("?" * size), chunk).rowcount
        return deleted

    def reserve(self, next_seq):
        self.db.execute("UPDATE meta SET value = MAX(value, ?) WHERE key = 'next_seq'",
                        (next_seq,))

    # -- reads ---------------------------------------------------------------------------------

    def load(self, read):
        reads = self._reads
        if read.after is None:
            rows = reads.execute(COLUMNS + "WHERE queue = ? AND due = 0 "
                                 "ORDER BY priority DESC, seq LIMIT ?",
                                 (read.queue, read.limit)).fetchall()
        else:
            # Two index range scans rather than one OR: the rest of the current priority,
            # then the lower priorities.
            priority, seq = -read.after[0], read.after[1]
            rows = reads.execute(COLUMNS + "WHERE queue = ? AND due = 0 AND priority = ? "
                                 "AND seq > ? ORDER BY seq LIMIT ?",
                                 (read.queue, priority, seq, read.limit)).fetchall()
            if len(rows) < read.limit:
                rows += reads.execute(COLUMNS + "WHERE queue = ? AND due = 0 AND priority < ? "
                                      "ORDER BY priority DESC, seq LIMIT ?",
                                      (read.queue, priority, read.limit - len(rows))
                                      ).fetchall()
        # Inline rather than _message(): this builds every message a queue delivers.
        return [StoredMessage(seq, queue, priority, ack_timeout,
                              [tuple(pair) for pair in json.loads(headers)], body, due, expires,
                              deliveries, dead == 1, len(body) + len(headers) + 100)
                for seq, queue, priority, ack_timeout, headers, body, due, expires, deliveries,
                dead in rows]

    def count(self, read):
        db, queue, now = self.db, read.queue, read.now
        ready = db.execute("SELECT COUNT(*) FROM messages WHERE queue = ? AND due = 0",
                           (queue,)).fetchone()[0]
        delayed, waiting = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(due > ?), 0) FROM messages "
            "WHERE queue = ? AND due > 0", (now, queue)).fetchone()
        # Expired ones are few: the sweep moves them out within seconds.
        expired, expired_waiting = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(due > ?), 0) FROM messages "
            "WHERE expires > 0 AND expires <= ? AND queue = ?", (now, now, queue)).fetchone()
        return ready + delayed - expired, waiting - expired_waiting

    def queues_holding(self, names):
        names = list(names)
        held = set()
        for start in range(0, len(names), 500):
            chunk = names[start:start + 500]
            held.update(row[0] for row in self.db.execute(
                "WITH names(queue) AS (VALUES %s) SELECT queue FROM names WHERE EXISTS "
                "(SELECT 1 FROM messages WHERE messages.queue = names.queue AND due = 0)"
                % ",".join(["(?)"] * len(chunk)), chunk))
        return held

    def count_stored(self):
        return self.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]

    def depths(self, read):
        # As count(): the two partial indexes (a range of each where the glob starts with
        # literal text), minus the few expired. SQLite's GLOB is fnmatch's but for [!...].
        return self.db.execute(
            "SELECT queue, SUM(n) FROM ("
            "SELECT queue, COUNT(*) AS n FROM messages WHERE queue GLOB :glob AND due = 0 "
            "GROUP BY queue UNION ALL "
            "SELECT queue, COUNT(*) FROM messages WHERE queue GLOB :glob AND due > 0 "
            "GROUP BY queue UNION ALL "
            "SELECT queue, -COUNT(*) FROM messages WHERE expires > 0 AND expires <= :now "
            "AND queue GLOB :glob GROUP BY queue) "
            "GROUP BY queue HAVING SUM(n) > 0 ORDER BY queue LIMIT :limit",
            {"glob": read.pattern.replace("[!", "[^"), "now": read.now, "limit": read.limit}
        ).fetchall()

    def queue_names(self, read):
        # A skip scan: each next name is the first entry after the last in one of the two
        # partial indexes (ready, delayed), one probe each, however many messages a queue
        # holds. Names compare as bytes, i.e. by code point: those starting with the prefix
        # lie between it and its successor.
        prefix = read.prefix
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else "\U0010ffff"

        def probe(last, strict):
            found = [self.db.execute(
                "SELECT MIN(queue) FROM messages WHERE queue %s ? AND queue < ? AND %s"
                % (">" if strict else ">=", partial), (last, upper)).fetchone()[0]
                for partial in ("due = 0", "due > 0")]
            return min((name for name in found if name is not None), default=None)

        after = read.after
        return skip_scan(read.limit, (after, True) if after is not None and after >= prefix
                         else (prefix, False), probe)

    def expired(self, read):
        expires, seq = read.after or (0, 0)
        rows = self.db.execute(
            "SELECT seq, queue, priority, ack_timeout, headers, NULL, due, expires, deliveries, "
            "dead_letter FROM messages WHERE expires > 0 AND expires <= ? "
            "AND (expires, seq) > (?, ?) ORDER BY expires, seq LIMIT ?",
            (read.now, expires, seq, read.limit)).fetchall()
        return [_message(row) for row in rows]

    def close(self):
        if self.db is not None:
            self.db.close()
            self.db = self._reads = None

"""SQLite storage: the embedded default, a file next to the broker (``--db pymq.db``).

WAL journal and ``synchronous=FULL``: a commit is on disk when apply() returns, which is what
a RECEIPT promises. sqlite3 blocks its OS thread, so Storage runs every call of this backend
in one thread of its own (``blocking = True``) and the gevent hub never waits on the disk.
"""

import json
import sqlite3

from .base import Backend, Count, Load, StoredMessage

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE messages (
    seq         INTEGER PRIMARY KEY,    -- arrival order, and the message id
    queue       TEXT NOT NULL,
    priority    INTEGER NOT NULL,
    ack_timeout REAL NOT NULL,          -- seconds, 0: the broker's default
    headers     TEXT NOT NULL,          -- JSON list of [name, value]
    body        BLOB NOT NULL
);
CREATE INDEX messages_delivery ON messages (queue, priority DESC, seq);
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta VALUES ('next_seq', 1);
"""


class SchemaError(Exception):
    pass


class SQLiteBackend(Backend):
    blocking = True

    def __init__(self, path):
        self.path = path
        self.db = None

    def open(self):
        db = self.db = sqlite3.connect(self.path, isolation_level=None)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            if db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
                raise SchemaError("%s is not a pymq database" % self.path)
            db.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute("PRAGMA user_version=%d" % SCHEMA_VERSION)
            db.execute("COMMIT")
        elif version != SCHEMA_VERSION:
            raise SchemaError("%s has schema version %d; this pymq reads version %d"
                              % (self.path, version, SCHEMA_VERSION))
        # Only now that the file is known to be ours: the journal mode is stored in it.
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        stored = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0]
        highest = db.execute("SELECT MAX(seq) FROM messages").fetchone()[0] or 0
        return max(stored, highest + 1)

    def apply(self, inserts, deletes, reads, next_seq):
        db = self.db
        if inserts or deletes or next_seq is not None:
            db.execute("BEGIN IMMEDIATE")
            try:
                if inserts:
                    db.executemany(
                        "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                        [(m.seq, m.queue, m.priority, m.ack_timeout, json.dumps(m.headers),
                          m.body) for m in inserts])
                if next_seq is not None:
                    db.execute("UPDATE meta SET value = MAX(value, ?) WHERE key = 'next_seq'",
                               (next_seq,))
                if deletes:
                    db.executemany("DELETE FROM messages WHERE seq = ?",
                                   [(seq,) for seq in deletes])
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return self.answer(reads)

    def queues_holding(self, names):
        names = list(names)
        held = set()
        for start in range(0, len(names), 500):
            chunk = names[start:start + 500]
            held.update(row[0] for row in self.db.execute(
                "WITH names(queue) AS (VALUES %s) SELECT queue FROM names WHERE EXISTS "
                "(SELECT 1 FROM messages WHERE messages.queue = names.queue)"
                % ",".join(["(?)"] * len(chunk)), chunk))
        return held

    def read(self, read):
        if isinstance(read, Count):
            return self.db.execute("SELECT COUNT(*) FROM messages WHERE queue = ?",
                                   (read.queue,)).fetchone()[0]
        assert isinstance(read, Load)
        columns = "SELECT seq, queue, priority, ack_timeout, headers, body FROM messages "
        if read.after is None:
            rows = self.db.execute(columns + "WHERE queue = ? ORDER BY priority DESC, seq "
                                   "LIMIT ?", (read.queue, read.limit)).fetchall()
        else:
            # Two index range scans rather than one OR: the rest of the current priority,
            # then the lower priorities.
            priority, seq = -read.after[0], read.after[1]
            rows = self.db.execute(columns + "WHERE queue = ? AND priority = ? AND seq > ? "
                                   "ORDER BY seq LIMIT ?",
                                   (read.queue, priority, seq, read.limit)).fetchall()
            if len(rows) < read.limit:
                rows += self.db.execute(columns + "WHERE queue = ? AND priority < ? "
                                        "ORDER BY priority DESC, seq LIMIT ?",
                                        (read.queue, priority, read.limit - len(rows))
                                        ).fetchall()
        return [StoredMessage(seq, queue, priority, ack_timeout,
                              [tuple(pair) for pair in json.loads(headers)], body)
                for seq, queue, priority, ack_timeout, headers, body in rows]

    def close(self):
        if self.db is not None:
            self.db.close()
            self.db = None

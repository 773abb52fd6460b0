"""PostgreSQL storage: the production backend (``--db postgresql://user:pass@host:port/db``).

psycopg2 is made cooperative with psycogreen when the backend is opened (not at import): its
network waits then yield to the gevent hub instead of blocking it, so this backend runs in the
committer greenlet itself. Each batch is one transaction with ``synchronous_commit = on``: a
multi-row insert, one batched delete, then the reads. Inserts are ``ON CONFLICT DO NOTHING``
and deletes and the id reservation are idempotent, so a batch whose COMMIT's outcome was lost
with the connection can simply be applied again (Storage retries transient failures).

Several pymq nodes over one database (a later step) would need, beyond this:
- sequence numbers from a PostgreSQL SEQUENCE (or per-node blocks of one) instead of the
  single ``meta.next_seq`` reservation, which assumes one writer;
- delivery claims: a lease column set with ``SELECT ... FOR UPDATE SKIP LOCKED``, so that two
  nodes never deliver the same message at once, and lease expiry to replace the in-memory
  in-flight table after a node dies;
- ``LISTEN/NOTIFY`` on each queue's channel to wake the other nodes' refills, and for topics.
The schema keeps those doors open: nothing here depends on being the only reader.
"""

import json
import logging

from .base import Backend, Count, Load, StoredMessage

log = logging.getLogger("pymq.storage")

SCHEMA_VERSION = 1
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS pymq_messages (
        seq         BIGINT PRIMARY KEY,
        queue       TEXT NOT NULL,
        priority    SMALLINT NOT NULL,
        ack_timeout DOUBLE PRECISION NOT NULL,
        headers     TEXT NOT NULL,
        body        BYTEA NOT NULL)""",
    """CREATE INDEX IF NOT EXISTS pymq_messages_delivery
        ON pymq_messages (queue, priority DESC, seq)""",
    """CREATE TABLE IF NOT EXISTS pymq_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)""",
    """INSERT INTO pymq_meta VALUES ('next_seq', 1), ('schema_version', %d)
        ON CONFLICT (key) DO NOTHING""" % SCHEMA_VERSION,
]
COLUMNS = "SELECT seq, queue, priority, ack_timeout, headers, body FROM pymq_messages "


class SchemaError(Exception):
    pass


class PostgreSQLBackend(Backend):
    blocking = False        # cooperative, through psycogreen

    def __init__(self, dsn):
        self.dsn = dsn
        self.db = None

    def _connect(self):
        import psycopg2
        from psycogreen.gevent import patch_psycopg
        patch_psycopg()     # idempotent; here rather than at import: no side effects there
        db = psycopg2.connect(self.dsn)
        with db.cursor() as cursor:
            cursor.execute("SET synchronous_commit = on")      # a RECEIPT's promise
        db.commit()
        return db

    def open(self):
        self.db = db = self._connect()
        with db.cursor() as cursor:
            # Two brokers creating the schema at once must not trip over each other.
            cursor.execute("SELECT pg_advisory_xact_lock(7273211)")
            for statement in SCHEMA:
                cursor.execute(statement)
            cursor.execute("SELECT value FROM pymq_meta WHERE key = 'schema_version'")
            version = cursor.fetchone()[0]
            if version != SCHEMA_VERSION:
                db.rollback()
                raise SchemaError("database has pymq schema version %d; this pymq reads "
                                  "version %d" % (version, SCHEMA_VERSION))
            cursor.execute("SELECT value FROM pymq_meta WHERE key = 'next_seq'")
            stored = cursor.fetchone()[0]
            cursor.execute("SELECT COALESCE(MAX(seq), 0) FROM pymq_messages")
            highest = cursor.fetchone()[0]
        db.commit()
        return max(stored, highest + 1)

    def apply(self, inserts, deletes, reads, next_seq):
        from psycopg2.extras import execute_values
        if self.db is None or self.db.closed:
            self.db = self._connect()      # after an outage: a fresh connection
        db = self.db
        try:
            with db.cursor() as cursor:
                if inserts:
                    execute_values(
                        cursor, "INSERT INTO pymq_messages VALUES %s "
                                "ON CONFLICT (seq) DO NOTHING",
                        [(m.seq, m.queue, m.priority, m.ack_timeout, json.dumps(m.headers),
                          m.body) for m in inserts], page_size=1000)
                if deletes:
                    cursor.execute("DELETE FROM pymq_messages WHERE seq = ANY(%s)", (deletes,))
                if next_seq is not None:
                    cursor.execute("UPDATE pymq_meta SET value = GREATEST(value, %s) "
                                   "WHERE key = 'next_seq'", (next_seq,))
            if inserts or deletes or next_seq is not None:
                db.commit()
            results = self.answer(reads)
            db.commit()         # ends the reads' transaction: no idle snapshot held open
            return results
        except Exception:
            self._discard()
            raise

    def _discard(self):
        """Roll back, or drop a connection that cannot: the next batch reconnects."""
        db = self.db
        try:
            db.rollback()
        except Exception:
            try:
                db.close()
            except Exception:
                pass
            self.db = None

    def queues_holding(self, names):
        with self.db.cursor() as cursor:
            cursor.execute("SELECT name FROM unnest(%s::text[]) AS name WHERE EXISTS "
                           "(SELECT 1 FROM pymq_messages WHERE queue = name)", (list(names),))
            return {row[0] for row in cursor.fetchall()}

    def read(self, read):
        with self.db.cursor() as cursor:
            if isinstance(read, Count):
                cursor.execute("SELECT COUNT(*) FROM pymq_messages WHERE queue = %s",
                               (read.queue,))
                return cursor.fetchone()[0]
            assert isinstance(read, Load)
            if read.after is None:
                cursor.execute(COLUMNS + "WHERE queue = %s ORDER BY priority DESC, seq LIMIT %s",
                               (read.queue, read.limit))
            else:
                priority, seq = -read.after[0], read.after[1]
                cursor.execute(COLUMNS + "WHERE queue = %s AND (priority < %s OR (priority = %s "
                               "AND seq > %s)) ORDER BY priority DESC, seq LIMIT %s",
                               (read.queue, priority, priority, seq, read.limit))
            return [StoredMessage(seq, queue, priority, ack_timeout,
                                  [tuple(pair) for pair in json.loads(headers)], bytes(body))
                    for seq, queue, priority, ack_timeout, headers, body in cursor.fetchall()]

    def is_transient(self, error):
        """The database went away (restart, network cut): worth retrying the batch."""
        import psycopg2
        return isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError))

    def close(self):
        if self.db is not None and not self.db.closed:
            self.db.close()
        self.db = None

"""PostgreSQL storage: the production backend (``--db postgresql://user:pass@host:port/db``).

psycopg2 is made cooperative with psycogreen when the backend is opened (not at import): its
network waits then yield to the gevent hub instead of blocking it, so this backend runs in the
committer greenlet itself. Each batch is one transaction with ``synchronous_commit = on``: a
multi-row insert, the updates and operations, one batched delete, then the reads. Inserts are
``ON CONFLICT DO NOTHING``, a de-duplication key taken by the same seq counts as taken by it,
and updates, deletes and the id reservation are idempotent, so a batch whose COMMIT's outcome
was lost with the connection can simply be applied again (Storage retries transient failures).
The indexes are partial, as in sqlite.py.

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

from .base import Backend, StoredMessage

log = logging.getLogger("pymq.storage")

SCHEMA_VERSION = 2
TABLES = [
    """CREATE TABLE IF NOT EXISTS pymq_messages (
        seq         BIGINT PRIMARY KEY,
        queue       TEXT NOT NULL,
        priority    SMALLINT NOT NULL,
        ack_timeout DOUBLE PRECISION NOT NULL,
        headers     TEXT NOT NULL,
        body        BYTEA NOT NULL,
        due         BIGINT NOT NULL DEFAULT 0,
        expires     BIGINT NOT NULL DEFAULT 0,
        deliveries  INTEGER NOT NULL DEFAULT 0,
        dead_letter BOOLEAN NOT NULL DEFAULT FALSE)""",
    """CREATE TABLE IF NOT EXISTS pymq_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)""",
    # Ids of the messages imported from another broker (ocamlmq.py): see Import. Made when
    # missing, with no version bump: it only adds, and an older pymq may ignore it.
    "CREATE TABLE IF NOT EXISTS pymq_imported (id TEXT PRIMARY KEY)",
    """INSERT INTO pymq_meta VALUES ('next_seq', 1), ('schema_version', %d)
        ON CONFLICT (key) DO NOTHING""" % SCHEMA_VERSION,
]
# What version 1 lacks (the columns' defaults are what a version 1 message means).
UPGRADE_FROM_1 = [
    "ALTER TABLE pymq_messages ADD COLUMN due BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE pymq_messages ADD COLUMN expires BIGINT NOT NULL DEFAULT 0",
    "ALTER TABLE pymq_messages ADD COLUMN deliveries INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE pymq_messages ADD COLUMN dead_letter BOOLEAN NOT NULL DEFAULT FALSE",
    "DROP INDEX pymq_messages_delivery",
]
INDEXES = [
    """CREATE INDEX IF NOT EXISTS pymq_messages_ready
        ON pymq_messages (queue, priority DESC, seq) WHERE due = 0""",
    "CREATE INDEX IF NOT EXISTS pymq_messages_due ON pymq_messages (due) WHERE due > 0",
    """CREATE INDEX IF NOT EXISTS pymq_messages_delayed
        ON pymq_messages (queue, due) WHERE due > 0""",
    """CREATE INDEX IF NOT EXISTS pymq_messages_expiry
        ON pymq_messages (expires, seq) WHERE expires > 0""",
    """CREATE TABLE IF NOT EXISTS pymq_dedup (
        queue TEXT NOT NULL,
        key   TEXT NOT NULL,
        seq   BIGINT NOT NULL,
        until BIGINT NOT NULL,
        PRIMARY KEY (queue, key))""",
    "CREATE INDEX IF NOT EXISTS pymq_dedup_until ON pymq_dedup (until)",
]
COLUMNS = ("SELECT seq, queue, priority, ack_timeout, headers, body, due, expires, deliveries, "
           "dead_letter FROM pymq_messages ")
OF_QUEUE = "((queue = %(queue)s AND due = 0) OR (queue = %(queue)s AND due > 0))"


class SchemaError(Exception):
    pass


def _message(row):
    seq, queue, priority, ack_timeout, headers, body, due, expires, deliveries, dead = row
    body = None if body is None else bytes(body)
    return StoredMessage(seq, queue, priority, ack_timeout,
                         [tuple(pair) for pair in json.loads(headers)], body, due, expires,
                         deliveries, dead, len(body or b"") + len(headers) + 100)


class PostgreSQLBackend(Backend):
    blocking = False        # cooperative, through psycogreen

    def __init__(self, dsn):
        self.dsn = dsn
        self.db = None
        self.cursor = None      # of the transaction apply() is in

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
            # Two brokers creating or upgrading the schema at once must not trip over each
            # other.
            cursor.execute("SELECT pg_advisory_xact_lock(7273211)")
            for statement in TABLES:
                cursor.execute(statement)
            cursor.execute("SELECT value FROM pymq_meta WHERE key = 'schema_version'")
            version = cursor.fetchone()[0]
            if version > SCHEMA_VERSION:
                db.rollback()
                raise SchemaError("database has pymq schema version %d; this pymq reads "
                                  "version %d (or upgrades older ones): use a newer pymq"
                                  % (version, SCHEMA_VERSION))
            if version == 1:
                for statement in UPGRADE_FROM_1:
                    cursor.execute(statement)
                cursor.execute("UPDATE pymq_meta SET value = %s WHERE key = 'schema_version'",
                               (SCHEMA_VERSION,))
            for statement in INDEXES:
                cursor.execute(statement)
            cursor.execute("SELECT value FROM pymq_meta WHERE key = 'next_seq'")
            stored = cursor.fetchone()[0]
            cursor.execute("SELECT COALESCE(MAX(seq), 0) FROM pymq_messages")
            highest = cursor.fetchone()[0]
        db.commit()
        return max(stored, highest + 1)

    def apply(self, batch):
        if self.db is None or self.db.closed:
            self.db = self._connect()      # after an outage: a fresh connection
        db = self.db
        try:
            with db.cursor() as self.cursor:
                if batch.has_writes():
                    self.write(batch)
                    db.commit()
                results = self.answer(batch.reads)
            db.commit()         # ends the reads' transaction: no idle snapshot held open
            return results
        except Exception:
            self._discard()
            raise
        finally:
            self.cursor = None

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

    # -- writes --------------------------------------------------------------------------------

    def insert(self, messages, dedup):
        from psycopg2.extras import execute_values
        duplicates = set()
        if dedup:
            for message in messages:
                if message.seq in dedup and not self._take_key(message, *dedup[message.seq]):
                    duplicates.add(message.seq)
            messages = [m for m in messages if m.seq not in duplicates]
        if messages:
            execute_values(
                self.cursor, "INSERT INTO pymq_messages VALUES %s ON CONFLICT (seq) DO NOTHING",
                [(m.seq, m.queue, m.priority, m.ack_timeout, json.dumps(m.headers), m.body,
                  m.due, m.expires, m.deliveries, m.dead_letter) for m in messages],
                page_size=1000)
        return duplicates

    def _take_key(self, message, key, sent, until):
        """Whether the message takes `key` in its queue (see sqlite.py); the same seq holding
        it means a retried batch took it the first time."""
        self.cursor.execute(
            "INSERT INTO pymq_dedup VALUES (%s, %s, %s, %s) ON CONFLICT (queue, key) DO UPDATE "
            "SET seq = excluded.seq, until = excluded.until "
            "WHERE pymq_dedup.until <= %s OR pymq_dedup.seq = excluded.seq",
            (message.queue, key, message.seq, until, sent))
        return self.cursor.rowcount == 1

    def update(self, messages):
        from psycopg2.extras import execute_values
        execute_values(
            self.cursor, "UPDATE pymq_messages AS m SET deliveries = v.deliveries, due = v.due "
                         "FROM (VALUES %s) AS v (seq, deliveries, due) WHERE m.seq = v.seq",
            [(m.seq, m.deliveries, m.due) for m in messages], page_size=1000)

    def dead_letter(self, op):
        self.cursor.execute(
            "UPDATE pymq_messages SET queue = %s, headers = %s, due = 0, expires = 0, "
            "deliveries = 0, dead_letter = TRUE WHERE seq = %s AND queue = %s",
            (op.target, json.dumps(op.headers), op.seq, op.source))
        return self.cursor.rowcount == 1

    def _chosen(self, queue, keep, below, limit):
        return ("SELECT seq FROM pymq_messages WHERE %s AND seq < %%(below)s "
                "AND NOT (seq = ANY(%%(keep)s)) ORDER BY seq LIMIT %%(limit)s" % OF_QUEUE,
                {"queue": queue, "below": below, "keep": sorted(keep), "limit": limit})

    def move(self, op):
        chosen, params = self._chosen(op.source, op.keep, op.below, op.limit)
        params["target"] = op.target
        self.cursor.execute(
            "UPDATE pymq_messages SET queue = %%(target)s, due = 0, expires = 0, "
            "deliveries = 0, dead_letter = FALSE WHERE seq IN (%s)" % chosen, params)
        return self.cursor.rowcount

    def purge(self, op):
        chosen, params = self._chosen(op.queue, op.keep, op.below, None)
        self.cursor.execute("DELETE FROM pymq_messages WHERE seq IN (%s)" % chosen, params)
        return self.cursor.rowcount

    def promote(self, op):
        cursor = self.cursor
        cursor.execute(
            "UPDATE pymq_messages SET due = 0 WHERE seq IN (SELECT seq FROM pymq_messages "
            "WHERE due > 0 AND due <= %s ORDER BY due LIMIT %s) RETURNING queue, priority, seq",
            (op.now, op.limit))
        rows = cursor.fetchall()
        arrivals = {}
        for queue, priority, seq in rows:
            key = (-priority, seq)
            if queue not in arrivals or key < arrivals[queue]:
                arrivals[queue] = key
        cursor.execute("SELECT MIN(due) FROM pymq_messages WHERE due > 0")
        return arrivals, len(rows), cursor.fetchone()[0]

    def forget_keys(self, op):
        self.cursor.execute(
            "DELETE FROM pymq_dedup WHERE (queue, key) IN (SELECT queue, key FROM pymq_dedup "
            "WHERE until <= %s LIMIT %s)", (op.now, op.limit))
        return self.cursor.rowcount

    def import_messages(self, op):
        cursor = self.cursor
        cursor.execute("INSERT INTO pymq_imported SELECT DISTINCT unnest(%s::text[]) "
                       "ON CONFLICT DO NOTHING RETURNING id", (op.ids,))
        new = {row[0] for row in cursor.fetchall()}
        stored, _, skipped = op.split(set(op.ids) - new)
        self.insert(stored, {})
        return skipped

    def delete(self, seqs):
        self.cursor.execute("DELETE FROM pymq_messages WHERE seq = ANY(%s)", (seqs,))

    def reserve(self, next_seq):
        self.cursor.execute("UPDATE pymq_meta SET value = GREATEST(value, %s) "
                            "WHERE key = 'next_seq'", (next_seq,))

    # -- reads ---------------------------------------------------------------------------------

    def load(self, read):
        cursor = self.cursor
        if read.after is None:
            cursor.execute(COLUMNS + "WHERE queue = %s AND due = 0 ORDER BY priority DESC, seq "
                           "LIMIT %s", (read.queue, read.limit))
        else:
            priority, seq = -read.after[0], read.after[1]
            cursor.execute(COLUMNS + "WHERE queue = %s AND due = 0 AND (priority < %s OR "
                           "(priority = %s AND seq > %s)) ORDER BY priority DESC, seq LIMIT %s",
                           (read.queue, priority, priority, seq, read.limit))
        return [_message(row) for row in cursor.fetchall()]

    def count(self, read):
        cursor, queue, now = self.cursor, read.queue, read.now
        cursor.execute("SELECT COUNT(*) FROM pymq_messages WHERE queue = %s AND due = 0",
                       (queue,))
        ready = cursor.fetchone()[0]
        cursor.execute("SELECT COUNT(*), COUNT(*) FILTER (WHERE due > %s) FROM pymq_messages "
                       "WHERE queue = %s AND due > 0", (now, queue))
        delayed, waiting = cursor.fetchone()
        # Expired ones are few: the sweep moves them out within seconds.
        cursor.execute("SELECT COUNT(*), COUNT(*) FILTER (WHERE due > %s) FROM pymq_messages "
                       "WHERE expires > 0 AND expires <= %s AND queue = %s", (now, now, queue))
        expired, expired_waiting = cursor.fetchone()
        return ready + delayed - expired, waiting - expired_waiting

    def queues_holding(self, names):
        self.cursor.execute("SELECT name FROM unnest(%s::text[]) AS name WHERE EXISTS "
                            "(SELECT 1 FROM pymq_messages WHERE queue = name AND due = 0)",
                            (list(names),))
        return {row[0] for row in self.cursor.fetchall()}

    def expired(self, read):
        expires, seq = read.after or (0, 0)
        self.cursor.execute(
            "SELECT seq, queue, priority, ack_timeout, headers, NULL, due, expires, deliveries, "
            "dead_letter FROM pymq_messages WHERE expires > 0 AND expires <= %s "
            "AND (expires, seq) > (%s, %s) ORDER BY expires, seq LIMIT %s",
            (read.now, expires, seq, read.limit))
        return [_message(row) for row in self.cursor.fetchall()]

    def is_transient(self, error):
        """The database went away (restart, network cut): worth retrying the batch."""
        import psycopg2
        return isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError))

    def close(self):
        if self.db is not None and not self.db.closed:
            self.db.close()
        self.db = None

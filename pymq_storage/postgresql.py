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

import base64
import itertools
import json
import logging
import re

from . import import_psycopg2
from .base import (ANYWHERE, Backend, Load, StorageError, StoredMessage, _arrive,
                   skip_scan)

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
# Each with the relation (or table.column) it makes, run only when that is missing: CREATE
# INDEX IF NOT EXISTS and ALTER TABLE lock the table even when there is nothing to do, and the
# other nodes of a cluster are writing to it meanwhile (a deadlock at a node's start).
INDEXES = [
    ("pymq_messages_ready", """CREATE INDEX IF NOT EXISTS pymq_messages_ready
        ON pymq_messages (queue, priority DESC, seq) WHERE due = 0"""),
    ("pymq_messages_due",
     "CREATE INDEX IF NOT EXISTS pymq_messages_due ON pymq_messages (due) WHERE due > 0"),
    ("pymq_messages_delayed", """CREATE INDEX IF NOT EXISTS pymq_messages_delayed
        ON pymq_messages (queue, due) WHERE due > 0"""),
    ("pymq_messages_expiry", """CREATE INDEX IF NOT EXISTS pymq_messages_expiry
        ON pymq_messages (expires, seq) WHERE expires > 0"""),
    ("pymq_dedup", """CREATE TABLE IF NOT EXISTS pymq_dedup (
        queue TEXT NOT NULL,
        key   TEXT NOT NULL,
        seq   BIGINT NOT NULL,
        until BIGINT NOT NULL,
        PRIMARY KEY (queue, key))"""),
    ("pymq_dedup_until", "CREATE INDEX IF NOT EXISTS pymq_dedup_until ON pymq_dedup (until)"),
    # The cluster node that holds the message (ClusterBackend); always NULL on a single node.
    ("pymq_messages.owner", "ALTER TABLE pymq_messages ADD COLUMN IF NOT EXISTS owner BIGINT"),
]
COLUMNS = ("SELECT seq, queue, priority, ack_timeout, headers, body, due, expires, deliveries, "
           "dead_letter FROM pymq_messages ")
OF_QUEUE = "((queue = %(queue)s AND due = 0) OR (queue = %(queue)s AND due > 0))"


class SchemaError(Exception):
    pass


def glob_regex(pattern):
    """fnmatch's glob (*, ?, [...], [!...]) as an anchored PostgreSQL regular expression."""
    parts, i, n = ["^"], 0, len(pattern)
    while i < n:
        char = pattern[i]
        i += 1
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        elif char == "[":
            end = i + (pattern[i:i + 1] == "!")
            end += pattern[end:end + 1] == "]"      # a ] first is a member, as in fnmatch
            end = pattern.find("]", end)
            if end < 0:
                parts.append("\\[")               # no closing ]: a literal [
                continue
            members = pattern[i:end].replace("\\", "\\\\")
            i = end + 1
            if members.startswith("!"):
                members = "^" + members[1:]
            elif members.startswith("^"):
                members = "\\" + members
            parts.append("[%s]" % members)
        else:
            parts.append(re.escape(char))
    parts.append("$")
    return "".join(parts)


def _exists(cursor, name):
    """Whether the relation `name`, or the column "table.column", exists."""
    table, _, column = name.partition(".")
    if column:
        cursor.execute("SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND "
                       "attname = %s AND NOT attisdropped", (table, column))
        return cursor.fetchone() is not None
    cursor.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
    return cursor.fetchone()[0]


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
        psycopg2 = import_psycopg2()
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
            for name, statement in INDEXES:
                if not _exists(cursor, name):
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
                self._rows(messages), page_size=1000)
        return duplicates

    def _rows(self, messages):
        return [(m.seq, m.queue, m.priority, m.ack_timeout, json.dumps(m.headers), m.body,
                 m.due, m.expires, m.deliveries, m.dead_letter) for m in messages]

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
            "deliveries = 0, dead_letter = TRUE, owner = NULL WHERE seq = %s AND queue = %s",
            (op.target, json.dumps(op.headers), op.seq, op.source))
        return self.cursor.rowcount == 1

    def _chosen(self, queue, keep, below, limit, end=None):
        return ("SELECT seq FROM pymq_messages WHERE %s AND seq < %%(below)s "
                "AND NOT (seq = ANY(%%(keep)s)) ORDER BY seq LIMIT %%(limit)s" % OF_QUEUE,
                {"queue": queue, "below": below, "keep": sorted(keep), "limit": limit})

    def move(self, op):
        chosen, params = self._chosen(op.source, op.keep, op.below, op.limit, op.end)
        params["target"] = op.target
        self.cursor.execute(
            "UPDATE pymq_messages SET queue = %%(target)s, due = 0, expires = 0, "
            "deliveries = 0, dead_letter = FALSE, owner = NULL WHERE seq IN (%s)" % chosen,
            params)
        return self.cursor.rowcount

    def purge(self, op):
        chosen, params = self._chosen(op.queue, op.keep, op.below, None, op.end)
        self.cursor.execute("DELETE FROM pymq_messages WHERE seq IN (%s)" % chosen, params)
        return self.cursor.rowcount

    PROMOTE = ("UPDATE pymq_messages SET due = 0 WHERE seq IN (SELECT seq FROM pymq_messages "
               "WHERE due > 0 AND due <= %s ORDER BY due LIMIT %s) RETURNING queue, priority, seq")

    def promote(self, op):
        cursor = self.cursor
        cursor.execute(self.PROMOTE, (op.now, op.limit))
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
        return self.cursor.rowcount

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

    def count_stored(self):
        self.cursor.execute("SELECT COUNT(*) FROM pymq_messages")
        return self.cursor.fetchone()[0]

    def depths(self, read):
        # As count(): all of each queue's messages (both partial indexes), minus the few expired.
        self.cursor.execute(
            "SELECT queue, SUM(n) FROM ("
            "SELECT queue, COUNT(*) AS n FROM pymq_messages WHERE queue ~ %(re)s AND due = 0 "
            "GROUP BY queue UNION ALL "
            "SELECT queue, COUNT(*) FROM pymq_messages WHERE queue ~ %(re)s AND due > 0 "
            "GROUP BY queue UNION ALL "
            "SELECT queue, -COUNT(*) FROM pymq_messages WHERE expires > 0 AND expires <= %(now)s "
            "AND queue ~ %(re)s GROUP BY queue) AS counts "
            "GROUP BY queue HAVING SUM(n) > 0 ORDER BY queue LIMIT %(limit)s",
            {"re": glob_regex(read.pattern), "now": read.now, "limit": read.limit})
        return [(queue, int(n)) for queue, n in self.cursor.fetchall()]

    def queue_names(self, read):
        # A skip scan, as in sqlite.py: one probe of each partial index per name, in the
        # database's collation (the index's). starts_with() rather than a range: in a
        # collation other than C the names with a prefix need not be contiguous.
        def probe(last, strict):
            self.cursor.execute(
                "SELECT LEAST((SELECT MIN(queue) FROM pymq_messages WHERE queue {0} %(last)s "
                "AND starts_with(queue, %(prefix)s) AND due = 0), (SELECT MIN(queue) FROM "
                "pymq_messages WHERE queue {0} %(last)s AND starts_with(queue, %(prefix)s) "
                "AND due > 0))".format(">" if strict else ">="),
                {"last": last, "prefix": read.prefix})
            return self.cursor.fetchone()[0]

        return skip_scan(read.limit, (read.after, True) if read.after is not None
                         else (read.prefix, False), probe)

    def expired(self, read):
        expires, seq = read.after or (0, 0)
        self.cursor.execute(
            "SELECT seq, queue, priority, ack_timeout, headers, NULL, due, expires, deliveries, "
            "dead_letter FROM pymq_messages WHERE expires > 0 AND expires <= %s "
            "AND (expires, seq) > (%s, %s) ORDER BY expires, seq LIMIT %s",
            (read.now, expires, seq, read.limit))
        return [_message(row) for row in self.cursor.fetchall()]

    def is_transient(self, error):
        """The database went away (restart, network cut): worth retrying the batch. psycopg2
        says so with OperationalError; psycopg2cffi (PyPy) with a plain DatabaseError, after
        which the connection could not even roll back (_discard dropped it)."""
        import psycopg2
        return isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError)) or (
            isinstance(error, psycopg2.DatabaseError) and self.db is None)

    def close(self):
        if self.db is not None and not self.db.closed:
            self.db.close()
        self.db = None


# -- several nodes over one database (--cluster) -----------------------------------------------

CLUSTER_TABLES = [
    # One row per node incarnation: a restarted or fenced node registers again (a new id), so
    # the messages its old incarnation held are free once that one's heartbeat is stale.
    """CREATE TABLE IF NOT EXISTS pymq_nodes (
        id          BIGSERIAL PRIMARY KEY,
        name        TEXT NOT NULL,
        address     TEXT NOT NULL,
        started     TIMESTAMPTZ NOT NULL DEFAULT now(),
        heartbeat   TIMESTAMPTZ NOT NULL DEFAULT now())""",
    # Sequence numbers come in blocks, so that nodes never hand out the same one.
    "CREATE SEQUENCE IF NOT EXISTS pymq_seq_blocks",
    # Each node's subscriptions per destination, as of its last heartbeat (count-subscribers).
    """CREATE TABLE IF NOT EXISTS pymq_subscriptions (
        node        BIGINT NOT NULL,
        destination TEXT NOT NULL,
        count       INTEGER NOT NULL,
        PRIMARY KEY (node, destination))""",
]
SEQ_BLOCK = 1000            # seqs a node reserves at once (see ClusterBackend.reserve)
CHANNEL = "pymq"            # LISTEN/NOTIFY channel of the cluster
NOTICE_MAX = 7999           # bytes of a NOTIFY payload (PostgreSQL's limit is 8000)
# A message is free to take: nobody holds it, we do, or its holder's lease ran out.
FREE = ("(owner IS NULL OR owner = %(me)s OR NOT EXISTS (SELECT 1 FROM pymq_nodes n "
        "WHERE n.id = owner AND n.heartbeat > now() - %(lease)s * interval '1 second'))")


class ClusterBackend(PostgreSQLBackend):
    """PostgreSQL shared by several pymq nodes (--cluster). What differs from one node:

    - Delivery claims: a load takes the messages it returns (owner = this node) with
      SELECT ... FOR UPDATE SKIP LOCKED, among those nobody holds or whose holder's lease ran
      out; a message's lease is its node's, renewed by the node's heartbeat (Heartbeat op)
      rather than row by row. An insert is held when the node delivers it at once
      (batch.owned), else free. What leaves the node's memory without being deleted is let go
      (Release, ReleaseQueue, a due time, a dead letter, a move), and a clean stop lets go of
      everything.
    - Sequence numbers in blocks of SEQ_BLOCK from a SEQUENCE (Storage takes a new block at
      least every second, so that order by seq stays order of arrival across nodes to within
      a second).
    - After each batch, NOTIFY tells the other nodes in which queues messages became free to
      take (one notification per queue and batch, with the smallest key): their refills start
      again from there (Storage.on_arrived); and the earliest due time it wrote, so that
      whichever node is up then makes the message ready (Storage.on_due). A node that finds
      another's lease ran out tells everyone to look everywhere. A listener connection turns
      notifications into arrivals; after it (re)connects, anything may have changed.
    - A node writes only what it holds (updates) or nobody live holds (dead letters, purges,
      moves): one that lost its lease, or a sweep that found a message free just before
      another node took it, must not write over that node's delivery.
    """

    cluster = True

    def __init__(self, dsn, node_name, lease_timeout):
        super().__init__(dsn)
        self.node_name = node_name
        self.lease_timeout = lease_timeout
        self.node_id = None
        self.freed = {}             # queue -> smallest key freed in this batch; None: anywhere
        self._owned = None          # the batch's inserts this node holds
        self.told = {}              # like freed, for the other nodes only (Release.here)
        self.next_due = None        # the earliest due time the batch wrote (epoch ms)
        self._notices = itertools.count()
        self._listener = None

    def open(self):
        super().open()
        db = self.db
        with db.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(7273211)")
            for statement in CLUSTER_TABLES:
                cursor.execute(statement)
            # A store written by a single node goes on from its seqs.
            cursor.execute("SELECT GREATEST((SELECT value FROM pymq_meta WHERE key = "
                           "'next_seq'), (SELECT COALESCE(MAX(seq), 0) + 1 FROM pymq_messages))")
            floor = cursor.fetchone()[0]
            cursor.execute("SELECT setval('pymq_seq_blocks', %s, false) WHERE "
                           "(SELECT last_value FROM pymq_seq_blocks) < %s", (floor, floor))
        db.commit()
        with db.cursor() as self.cursor:
            self.register()
            block = self.reserve(None)
        self.cursor = None
        db.commit()
        return block

    def register(self):
        """A new incarnation of this node: a fresh id, so that nothing held by an old one
        (which may still be running somewhere, paused) is taken for ours."""
        self.cursor.execute("INSERT INTO pymq_nodes (name, address) VALUES (%s, '') "
                            "RETURNING id", (self.node_name,))
        self.node_id = self.cursor.fetchone()[0]
        log.info("cluster node %s is node %d", self.node_name, self.node_id)

    def reserve(self, next_seq):
        """A block of sequence numbers nobody else has: (first, last + 1). nextval() calls of
        nodes reserving at once interleave; the run of consecutive ones at the end is kept."""
        self.cursor.execute("SELECT nextval('pymq_seq_blocks') FROM generate_series(1, %s)",
                            (SEQ_BLOCK,))
        seqs = [row[0] for row in self.cursor.fetchall()]
        start = seqs[-1]
        for seq in reversed(seqs[:-1]):
            if seq != start - 1:
                break
            start = seq
        super().reserve(seqs[-1] + 1)       # for a single node started on this store later
        return start, seqs[-1] + 1

    def params(self, **extra):
        return dict(extra, me=self.node_id, lease=self.lease_timeout)

    # -- writes --------------------------------------------------------------------------------

    def apply(self, batch):
        self._owned = batch.owned
        return super().apply(batch)

    def write(self, batch):
        self.freed, self.told, self.next_due = {}, {}, None
        super().write(batch)
        batch.freed = ANYWHERE if self.freed is None else self.freed
        if self.freed is None:
            notices = [self._queue_notice(None, None)]
        else:
            everywhere = dict(self.freed)
            for queue, key in self.told.items():
                _arrive(everywhere, queue, key)
            notices = [self._queue_notice(queue, key) for queue, key in everywhere.items()]
        if self.next_due is not None:
            # The node that wrote it may be gone by then: every node learns when.
            notices.append(json.dumps({"n": self.node_id, "d": self.next_due}))
        if batch.notices:
            notices.extend(batch.notices)
        if notices:
            self.cursor.execute("SELECT pg_notify(%s, payload) FROM unnest(%s::text[]) AS "
                                "payload", (CHANNEL, notices))

    def _queue_notice(self, queue, key):
        """Messages of `queue` from `key` on (None for both: anywhere) are free to take."""
        return json.dumps({"n": self.node_id, "q": queue,
                           "k": list(key) if key is not None else None})

    def topic_notice(self, topic, headers, body):
        """A topic message for the other nodes, as a NOTIFY payload (at most NOTICE_MAX
        bytes: larger messages are refused). The body travels in base64."""
        # "i": PostgreSQL delivers identical notifications of one transaction once.
        notice = json.dumps({"n": self.node_id, "i": next(self._notices), "t": topic,
                             "h": headers, "b": base64.b64encode(body).decode()})
        if len(notice.encode()) > NOTICE_MAX:
            raise StorageError("a topic message in a cluster takes at most about %d bytes of "
                               "body and headers (NOTIFY's payload), this one %d"
                               % (NOTICE_MAX * 3 // 4 - 100, len(body)))
        return notice

    def _free(self, queue, key, here=True):
        """Messages of `queue` from `key` on (None: anywhere) became free to take; unless
        `here`, only the other nodes are told."""
        if self.freed is not None:
            _arrive(self.freed if here else self.told, queue, key)

    def _waits(self, due):
        """The batch writes a message that waits until `due` (epoch ms; 0: it does not)."""
        if due and (self.next_due is None or due < self.next_due):
            self.next_due = due

    def _rows(self, messages):
        """The rows of the inserts, with their owner: this node for one it delivers at once
        (batch.owned), unless it waits to be due already (NACKed with a delay before its
        insert); any other is free. Each message is read once: the broker may change it (a
        NACK's due time) while the batch is applied, the greenlet waiting on the database."""
        owned, me = self._owned or (), self.node_id
        rows = []
        for m in messages:
            due = m.due
            owner = me if not due and m.seq in owned else None
            rows.append((m.seq, m.queue, m.priority, m.ack_timeout, json.dumps(m.headers),
                         m.body, due, m.expires, m.deliveries, m.dead_letter, owner))
            if owner is None and not due:
                self._free(m.queue, m.key)
            self._waits(due)
        return rows

    def update(self, messages):
        """Write each message's deliveries and due time, if this node still holds it (one
        that lost its lease must not write over what another holds now). One waiting to be
        due (a back-off) is let go: it is whichever node's that is free then. One statement,
        each message read once (see _rows)."""
        from psycopg2.extras import execute_values
        rows = [(m.seq, m.deliveries, m.due) for m in messages]
        execute_values(
            self.cursor, "UPDATE pymq_messages AS m SET deliveries = v.deliveries, due = v.due, "
                         "owner = CASE WHEN v.due > 0 THEN NULL ELSE m.owner END FROM (VALUES %s) "
                         "AS v (seq, deliveries, due) WHERE m.seq = v.seq AND m.owner = "
                         + str(int(self.node_id)), rows, page_size=1000)
        for row in rows:
            self._waits(row[2])

    def dead_letter(self, op):
        # Not one another live node holds: a sweep found it free, then that node took it (and
        # finds it expired itself).
        self.cursor.execute("SELECT 1 FROM pymq_messages WHERE seq = %(seq)s AND " + FREE
                            + " FOR UPDATE", self.params(seq=op.seq))
        if self.cursor.fetchone() is None:
            return False
        moved = super().dead_letter(op)
        if moved:
            self._free(op.target, (-op.priority, op.seq))
        return moved

    def _chosen(self, queue, keep, below, limit, end=None):
        # Not what another live node holds: it is in flight there. The seqs this node may
        # still give (below to end) are left out, not all above: other nodes' blocks are.
        sql, params = super()._chosen(queue, keep, below, limit)
        sql = sql.replace("seq < %(below)s", "(seq < %(below)s OR seq >= %(end)s)").replace(
            "ORDER BY seq", "AND " + FREE + " ORDER BY seq")
        params.update(self.params(end=end))
        return sql, params

    def move(self, op):
        moved = super().move(op)
        if moved:
            self._free(op.target, None)
        return moved

    # Nodes promoting at once (each knows the due time) take each message once.
    PROMOTE = PostgreSQLBackend.PROMOTE.replace("LIMIT %s)", "LIMIT %s FOR UPDATE SKIP LOCKED)")

    def promote(self, op):
        result = super().promote(op)
        for queue, key in result[0].items():
            self._free(queue, key)
        return result

    def release(self, op):
        """The node lets go of messages it held (they came back, or left its buffer)."""
        self.cursor.execute("UPDATE pymq_messages SET owner = NULL WHERE seq = ANY(%s) AND "
                            "owner = %s RETURNING queue, priority, seq",
                            (sorted(op.seqs), self.node_id))
        for queue, priority, seq in self.cursor.fetchall():
            self._free(queue, (-priority, seq), op.here)

    def release_queue(self, op):
        self.cursor.execute("UPDATE pymq_messages SET owner = NULL WHERE queue = %s AND "
                            "owner = %s", (op.queue, self.node_id))
        if self.cursor.rowcount:
            self._free(op.queue, None)

    def heartbeat(self, op):
        """Renew this node's lease. Result: whether it still held it; if not (its row is
        stale or gone: it was paused, or cut off, past its lease), it is registered again
        under a new id and Storage fences it. Nodes whose lease ran out are forgotten, and
        everyone is told to look again everywhere: what they held is free."""
        # The clock's time, not the transaction's start: the lease runs from no earlier than
        # Heartbeat.started, where this node counts it from.
        self.cursor.execute("UPDATE pymq_nodes SET heartbeat = clock_timestamp() WHERE id = "
                            "%(me)s AND heartbeat > clock_timestamp() - %(lease)s * "
                            "interval '1 second'", self.params())
        held = self.cursor.rowcount == 1
        self.cursor.execute("DELETE FROM pymq_nodes WHERE heartbeat < now() - %(lease)s * "
                            "interval '1 second' RETURNING id", self.params())
        dead = [row[0] for row in self.cursor.fetchall()]
        if dead:
            self.freed = None
            self.cursor.execute("DELETE FROM pymq_subscriptions WHERE node = ANY(%s)", (dead,))
        if not held:
            self.register()
        if op.counts:
            from psycopg2.extras import execute_values
            gone = [d for d, count in op.counts.items() if not count]
            if gone:
                self.cursor.execute("DELETE FROM pymq_subscriptions WHERE node = %s AND "
                                    "destination = ANY(%s)", (self.node_id, gone))
            counted = [(self.node_id, d, count) for d, count in op.counts.items() if count]
            if counted:
                execute_values(self.cursor, "INSERT INTO pymq_subscriptions VALUES %s ON "
                               "CONFLICT (node, destination) DO UPDATE SET count = "
                               "excluded.count", counted, page_size=1000)
        return held

    # -- reads ---------------------------------------------------------------------------------

    def load(self, read):
        """Claim, and return, up to read.limit free messages in delivery order. One taken from
        a node whose lease ran out may have been delivered there: it counts as delivered
        once (redelivered)."""
        if read.after is None:
            after, params = "", {}
        else:
            after = "AND (priority < %(priority)s OR (priority = %(priority)s AND seq > %(seq)s)) "
            params = {"priority": -read.after[0], "seq": read.after[1]}
        self.cursor.execute(
            "UPDATE pymq_messages SET deliveries = CASE WHEN owner IS NULL OR owner = %(me)s "
            "THEN deliveries ELSE GREATEST(deliveries, 1) END, owner = %(me)s "
            "WHERE seq IN (SELECT seq FROM pymq_messages WHERE queue = %(queue)s AND due = 0 "
            + after + "AND " + FREE + " ORDER BY priority DESC, seq LIMIT %(limit)s "
            "FOR UPDATE SKIP LOCKED) RETURNING " + RETURNED,
            self.params(queue=read.queue, limit=read.limit, **params))
        messages = [_message(row) for row in self.cursor.fetchall()]
        messages.sort(key=_key)
        return messages

    def peek(self, read):
        return PostgreSQLBackend.load(self, Load(read.queue, None, read.limit))

    def subscribers(self, read):
        self.cursor.execute(
            "SELECT COALESCE(SUM(s.count), 0) FROM pymq_subscriptions s JOIN pymq_nodes n ON "
            "n.id = s.node WHERE s.node <> %(me)s AND n.heartbeat > now() - %(lease)s * "
            "interval '1 second' AND (s.destination = ANY(%(names)s) OR (s.destination LIKE "
            "'/topic/%%*' AND EXISTS (SELECT 1 FROM unnest(%(names)s) AS name WHERE name LIKE "
            "'/topic/%%' AND starts_with(name, left(s.destination, -1)))))",
            self.params(names=list(read.destinations)))
        return int(self.cursor.fetchone()[0])

    def expired(self, read):
        # Not what a live node holds: that node finds it expired itself.
        expires, seq = read.after or (0, 0)
        self.cursor.execute(
            "SELECT seq, queue, priority, ack_timeout, headers, NULL, due, expires, deliveries, "
            "dead_letter FROM pymq_messages WHERE expires > 0 AND expires <= %(now)s "
            "AND (expires, seq) > (%(expires)s, %(seq)s) AND " + FREE +
            " ORDER BY expires, seq LIMIT %(limit)s",
            self.params(now=read.now, expires=expires, seq=seq, limit=read.limit))
        return [_message(row) for row in self.cursor.fetchall()]

    # -- notifications ---------------------------------------------------------------------------

    def listen(self, on_notified, on_topic, on_due):
        """LISTEN (before the node serves: nothing sent to it after that is missed), then a
        greenlet turns the other nodes' notifications into on_notified({queue: key}) calls
        (on_notified(None): look everywhere), on_topic(topic, headers, body) calls and
        on_due(due) calls (a message waits until `due`, epoch ms; 0: look when)."""
        import gevent
        self._listener = gevent.spawn(self._listen_loop, self._listening(), on_notified,
                                      on_topic, on_due)

    def _listening(self):
        db = self._connect()
        db.autocommit = True
        with db.cursor() as cursor:
            cursor.execute("LISTEN " + CHANNEL)
        return db

    def _listen_loop(self, db, on_notified, on_topic, on_due):
        import gevent
        import gevent.socket
        delay = 0.1
        while True:
            try:
                if db is None:
                    db = self._listening()
                    on_notified(None)       # what was notified meanwhile is lost
                    on_due(0)
                    delay = 0.1
                while True:
                    gevent.socket.wait_read(db.fileno())
                    db.poll()
                    arrivals, due = {}, None
                    while db.notifies:
                        notice = json.loads(db.notifies.pop(0).payload)
                        if notice["n"] == self.node_id:
                            continue
                        if "t" in notice:
                            on_topic(notice["t"], notice["h"], base64.b64decode(notice["b"]))
                        elif "d" in notice:
                            due = notice["d"] if due is None else min(due, notice["d"])
                        elif notice["q"] is None:
                            arrivals = None
                        elif arrivals is not None:
                            key = notice["k"]
                            _arrive(arrivals, notice["q"], tuple(key) if key else None)
                    if arrivals is None or arrivals:
                        on_notified(arrivals)
                    if due is not None:
                        on_due(due)
            except gevent.GreenletExit:
                raise
            except Exception as error:
                log.warning("cluster notifications: %s; listening again in %g s",
                            str(error).strip() or error.__class__.__name__, delay)
                gevent.sleep(delay)
                delay = min(2 * delay, 5.0)
            finally:
                if db is not None:
                    db.close()
                    db = None

    def close(self):
        if self._listener is not None:
            self._listener.kill()
            self._listener = None
        # A clean stop: the others may take at once what this node held.
        try:
            if self.db is not None and not self.db.closed and self.node_id is not None:
                with self.db.cursor() as cursor:
                    cursor.execute("UPDATE pymq_messages SET owner = NULL WHERE owner = %s "
                                   "RETURNING queue", (self.node_id,))
                    for queue in {row[0] for row in cursor.fetchall()}:
                        cursor.execute("SELECT pg_notify(%s, %s)",
                                       (CHANNEL, self._queue_notice(queue, None)))
                    cursor.execute("DELETE FROM pymq_nodes WHERE id = %s", (self.node_id,))
                self.db.commit()
        except Exception as error:
            log.warning("cluster node %s: could not let go of what it held: %s",
                        self.node_name, error)
        super().close()


RETURNED = COLUMNS[len("SELECT "):-len("FROM pymq_messages ")]


def _key(message):
    return message.key

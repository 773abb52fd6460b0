"""ocamlmq stores made to order, for the import's tests and its benchmark: ocamlmq's SQLite table
(ocamlmq-behaviour.md §7.2), its old PostgreSQL table (§7.7) and binlog records (§7.5).

A row is (ack_pending, msg_id, priority, destination, timestamp, ack_timeout, body), the
columns in the order of ocamlmq's SQLite table; timestamps are epoch seconds (floats).
"""

import sqlite3
import struct

SQLITE_SCHEMA = """
CREATE TABLE ocamlmq_msgs(
    ack_pending BOOL NOT NULL,
    msg_id VARCHAR(255) NOT NULL PRIMARY KEY,
    priority INT NOT NULL,
    destination VARCHAR(255) NOT NULL,
    timestamp DOUBLE NOT NULL,
    ack_timeout DOUBLE NOT NULL,
    body BLOB NOT NULL);
CREATE INDEX ocamlmq_msgs_destination_priority_timestamp
    ON ocamlmq_msgs(destination, ack_pending, priority, timestamp);
CREATE INDEX ocamlmq_msgs_ack_pending ON ocamlmq_msgs(ack_pending);
"""
POSTGRESQL_SCHEMA = """
CREATE TABLE ocamlmq_msgs(
    msg_id VARCHAR(255) PRIMARY KEY,
    ack_pending BOOL NOT NULL DEFAULT false,
    priority INT NOT NULL,
    destination VARCHAR(255) NOT NULL,
    timestamp TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    ack_timeout FLOAT NOT NULL,
    body BYTEA NOT NULL);
CREATE INDEX ocamlmq_msgs_destination_priority_timestamp
    ON ocamlmq_msgs (destination, priority, timestamp);
CREATE INDEX ocamlmq_msgs_ack_pending ON ocamlmq_msgs (ack_pending);
"""
START = 1796568074.0        # the fixtures' era


def make_rows(n, queues=("jobs", "emails", "reports.daily", "late"), start=START):
    """n rows over `queues`, as ocamlmq would have stored them: ids like its own, timestamps
    1 ms apart but stored out of order within each queue (the import must sort), every
    seventh body binary with NULs and bytes that are not UTF-8, every fifth with an
    ack-timeout, every ninth delivered and not ACKed."""
    width = len(queues)
    for i in range(n):
        # Each queue's messages two by two, the later one first.
        t = start + (i + width if i // width % 2 == 0 else i - width) / 1000.0
        body = b"bin\x00%d\x00\xff\xfe" % i if i % 7 == 3 else b"message %d" % i
        yield (i % 9 == 4, "conn-1-msg-%.2f-%d" % (t, i + 1), 0, queues[i % len(queues)], t,
               2.5 + i % 4 if i % 5 == 0 else 0.0, body)


def make_sqlite_store(path, rows):
    db = sqlite3.connect(path)
    db.executescript(SQLITE_SCHEMA)
    db.executemany("INSERT INTO ocamlmq_msgs VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    return path


def make_postgresql_table(url, rows):
    import psycopg2
    db = psycopg2.connect(url)
    with db.cursor() as cursor:
        cursor.execute(POSTGRESQL_SCHEMA)
        cursor.executemany(
            "INSERT INTO ocamlmq_msgs (ack_pending, msg_id, priority, destination, timestamp, "
            "ack_timeout, body) VALUES (%s, %s, %s, %s, to_timestamp(%s) AT TIME ZONE 'UTC', "
            "%s, %s)", [row[:6] + (psycopg2.Binary(row[6]),) for row in rows])
    db.commit()
    db.close()


def _string(data):
    if isinstance(data, str):
        data = data.encode()
    return struct.pack("<i", len(data)) + data


def add_record(msg_id, queue, timestamp, body, ack_timeout=0.0):
    """ocamlmq's binlog record of a new message: the body comes before ack_timeout."""
    return (b"A" + _string(msg_id) + _string(queue) + struct.pack("<id", 0, timestamp)
            + _string(body) + struct.pack("<d", ack_timeout))


def delete_record(msg_id, tag=b"D"):
    """ocamlmq's binlog record of an ACKed message (its writer says D, its reader wants B)."""
    return tag + _string(msg_id)

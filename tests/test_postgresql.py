"""PostgreSQL as the store: ocamlmq's flags, and an outage of the database under load.

(The storage contract, the queue semantics and the crash tests run on PostgreSQL too: see
STORE_BACKENDS / BACKENDS in test_storage.py, test_queues.py and test_crash.py.)
"""

import logging
import threading
import time
import urllib.parse

import pytest

import postgres
from conftest import RawClient, TIMEOUT, count_msgs


@pytest.fixture
def cluster():
    """A PostgreSQL server of this test's own, which the test may stop and start."""
    server = postgres.new_cluster()
    yield server
    server.destroy()


def test_ocamlmq_flags_select_postgresql(cluster, broker_process):
    cluster.create_database("mq")
    broker = broker_process("--dbsockdir", cluster.dir, "--dbport", str(cluster.port),
                            "--dbuser", "postgres", "--dbdatabase", "mq", "--dbmaxconns", "4",
                            "--initdb")
    client = RawClient(broker.address)
    client.connect("1.2")
    client.request("SEND", {"destination": "/queue/jobs"}, b"in postgres")
    assert broker.stop() == 0

    import psycopg2
    db = psycopg2.connect(cluster.url("mq"))
    with db.cursor() as cursor:
        cursor.execute("SELECT body FROM pymq_messages WHERE queue = 'jobs'")
        assert [bytes(row[0]) for row in cursor.fetchall()] == [b"in postgres"]
    db.close()


def stored_bodies(url, queue):
    import psycopg2
    db = psycopg2.connect(url)
    try:
        with db.cursor() as cursor:
            cursor.execute("SELECT body FROM pymq_messages WHERE queue = %s ORDER BY seq",
                           (queue,))
            return [bytes(row[0]) for row in cursor.fetchall()]
    finally:
        db.close()


@pytest.mark.parametrize("host_flag", ["-dbsockdir", "-dbhost"])
def test_ocamlmq_command_line_as_it_is(cluster, host_flag):
    """ocamlmq's own command line (single dash, value apart), only the program changed."""
    from conftest import BrokerProcess
    cluster.create_database("mq")
    broker = BrokerProcess("-port", "0", host_flag, cluster.dir, "-dbport", str(cluster.port),
                           "-dbuser", "postgres", "-dbpassword", "unused", "-dbdatabase", "mq",
                           "-dbmaxconns", "10", "-login", "ocaml", "-passcode", "mq",
                           "-initdb", "-debug", port=None)
    try:
        wrong = RawClient(broker.address)
        wrong.send("CONNECT", {"login": "ocaml", "passcode": "guess"})
        wrong.expect_error("bad credentials")
        client = RawClient(broker.address)
        client.connect("1.0", login="ocaml", passcode="mq")      # ocamlmq's clients speak 1.0
        client.request("SEND", {"destination": "/queue/jobs"}, b"as before")
        broker.wait_for_log(r"SEND")                               # -debug: frames logged
        assert broker.stop() == 0
    finally:
        broker.stop()
    assert stored_bodies(cluster.url("mq"), "jobs") == [b"as before"]


def test_without_dbdatabase_the_database_is_named_after_the_user(cluster):
    from conftest import BrokerProcess
    broker = BrokerProcess("-port", "0", "-dbsockdir", cluster.dir, "-dbport", str(cluster.port),
                           "-dbuser", "postgres", port=None)
    try:
        client = RawClient(broker.address)
        client.connect("1.0")
        client.request("SEND", {"destination": "/queue/q"}, b"in postgres, the user's database")
        assert broker.stop() == 0
    finally:
        broker.stop()
    assert stored_bodies(cluster.url("postgres"), "q") == [b"in postgres, the user's database"]


def test_ocamlmq_flags_mix_with_pymq_options(broker_process):
    from test_cli import expect_max_headers_7
    broker = broker_process("-port", "0", "--db", "memory:", "--max-headers", "7")
    expect_max_headers_7(broker.address)
    assert broker.stop() == 0


def test_password_is_not_logged(cluster, broker_process):
    url = cluster.create_database()
    parts = urllib.parse.urlsplit(url)
    bad = urllib.parse.urlunsplit(parts._replace(netloc="postgres:s3cret-pw@", path="/nodb"))
    import subprocess
    import sys
    from conftest import ROOT
    result = subprocess.run([sys.executable, str(ROOT / "pymq.py"), "--port", "0", "--db", bad],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "cannot start" in result.stderr
    assert "s3cret-pw" not in result.stderr


class Producer(threading.Thread):
    """Sends numbered messages with receipts, one at a time, recording the receipted ones."""

    def __init__(self, address, count, queue="jobs"):
        super().__init__(daemon=True)
        self.client = RawClient(address, timeout=60)
        self.client.connect("1.2")
        self.count, self.queue = count, queue
        self.receipted = []
        self.errors = []
        self.progress = threading.Condition()

    def run(self):
        for n in range(self.count):
            try:
                self.client.request("SEND", {"destination": "/queue/" + self.queue}, b"%d" % n)
            except AssertionError as error:
                self.errors.append(error)
                return
            with self.progress:
                self.receipted.append(n)
                self.progress.notify_all()

    def wait_for(self, receipts, timeout=TIMEOUT):
        with self.progress:
            assert self.progress.wait_for(lambda: len(self.receipted) >= receipts, timeout)


def test_database_outage_under_load_loses_nothing(cluster, start_broker, caplog):
    caplog.set_level(logging.INFO, logger="pymq")
    broker = start_broker(db=cluster.create_database(), db_retry=30.0)
    consumer = RawClient(broker.address, timeout=30)
    consumer.connect("1.2")
    consumer.request("SUBSCRIBE", {"destination": "/queue/jobs", "id": "w",
                                   "ack": "client-individual", "prefetch": "20"})
    watcher = RawClient(broker.address)
    watcher.connect("1.2")
    watcher.request("SUBSCRIBE", {"destination": "/topic/news", "id": "t"})

    producer = Producer(broker.address, 600)
    producer.start()
    received = []

    def consume(until):
        while len(received) < until:
            message = consumer.expect("MESSAGE", timeout=30)
            received.append(int(message.body))
            consumer.send("ACK", {"id": message.headers["ack"]})

    producer.wait_for(100)
    cluster.stop("fast")
    # While the database is down: topics keep working, and no SEND is receipted.
    before = len(producer.receipted)
    watcher.send("SEND", {"destination": "/topic/news"}, b"still serving")
    assert watcher.expect("MESSAGE").body == b"still serving"
    time.sleep(1.0)         # the outage itself is what is under test: let it last
    assert len(producer.receipted) <= before + 1     # one may have committed before the stop
    cluster.start()

    producer.join(60)
    assert not producer.is_alive() and not producer.errors
    consume(600)
    assert sorted(set(received)) == list(range(600))        # every receipted message arrived
    # Asked on the consumer's connection, so after its ACKs: every ACK was stored.
    count = consumer.request("SEND", {"destination": "/control/count-msgs/queue/jobs"})
    assert count.headers["num-messages"] == "0"
    unavailable = [r for r in caplog.records if "storage unavailable" in r.getMessage()]
    available = [r for r in caplog.records if "available again" in r.getMessage()]
    assert len(unavailable) == 1 and len(available) == 1    # once per outage, not per message


def test_outage_longer_than_retry_errors_then_recovers(cluster, start_broker):
    broker = start_broker(db=cluster.create_database(), db_retry=0.5)
    client = RawClient(broker.address, timeout=30)
    client.connect("1.2")
    client.request("SEND", {"destination": "/queue/jobs"}, b"before")
    cluster.stop("fast")
    client.send("SEND", {"destination": "/queue/jobs", "receipt": "lost"}, b"during")
    error = client.expect("ERROR", timeout=10)          # never a RECEIPT
    assert "not stored" in error.headers["message"]
    client.expect_closed()
    cluster.start()
    # The broker recovered without a restart: new SENDs are stored, old ones are there.
    client = RawClient(broker.address)
    client.connect("1.2")
    client.request("SEND", {"destination": "/queue/jobs"}, b"after")
    client.request("SUBSCRIBE", {"destination": "/queue/jobs", "id": "1"})
    assert [client.expect("MESSAGE").body for _ in range(2)] == [b"before", b"after"]


def test_a_send_that_got_an_error_is_never_delivered(cluster, start_broker):
    broker = start_broker(db=cluster.create_database(), db_retry=0.5)
    consumer = RawClient(broker.address, timeout=30)
    consumer.connect("1.2")
    consumer.request("SUBSCRIBE", {"destination": "/queue/jobs", "id": "w", "prefetch": "1",
                                   "ack": "client-individual"})
    producer = RawClient(broker.address, timeout=30)
    producer.connect("1.2")
    producer.request("SEND", {"destination": "/queue/jobs"}, b"before")
    held = consumer.expect("MESSAGE")           # prefetch 1: the next one waits in memory
    cluster.stop("fast")
    producer.send("SEND", {"destination": "/queue/jobs", "receipt": "r"}, b"during")
    assert "not stored" in producer.expect("ERROR", timeout=10).headers["message"]
    cluster.start()
    producer = RawClient(broker.address)
    producer.connect("1.2")
    producer.request("SEND", {"destination": "/queue/jobs"}, b"after")
    consumer.send("ACK", {"id": held.headers["ack"]})
    assert consumer.expect("MESSAGE").body == b"after"    # not "during": it was never stored


def test_a_message_acked_during_an_outage_is_receipted(cluster, start_broker):
    """A SEND's RECEIPT goes once the message is durable or once a consumer has ACKed it,
    whichever comes first: a consumed message cannot be lost, so its sender does not wait
    for the store (here, until the database comes back)."""
    broker = start_broker(db=cluster.create_database(), db_retry=30.0)
    consumer = RawClient(broker.address, timeout=30)
    consumer.connect("1.2")
    consumer.request("SUBSCRIBE", {"destination": "/queue/jobs", "id": "w",
                                   "ack": "client-individual"})
    # A read of the store, answered after the new subscription's probe: the broker knows the
    # queue is empty before the database goes away.
    assert count_msgs(consumer, "jobs") == 0
    producer = RawClient(broker.address, timeout=30)
    producer.connect("1.2")
    cluster.stop("fast")
    producer.send("SEND", {"destination": "/queue/jobs", "receipt": "sent"}, b"job")
    message = consumer.expect("MESSAGE")
    assert message.body == b"job"
    consumer.send("ACK", {"id": message.headers["ack"], "receipt": "acked"})
    assert producer.expect("RECEIPT").headers["receipt-id"] == "sent"   # the store is down
    cluster.start()
    # The ACK's own RECEIPT says the deletion is durable: nothing is left, nothing comes back.
    assert consumer.expect("RECEIPT", timeout=30).headers["receipt-id"] == "acked"
    assert count_msgs(consumer, "jobs") == 0
    consumer.request("UNSUBSCRIBE", {"id": "w"})
    consumer.request("SUBSCRIBE", {"destination": "/queue/jobs", "id": "again"})
    producer.request("SEND", {"destination": "/queue/jobs"}, b"next")
    assert consumer.expect("MESSAGE").body == b"next"

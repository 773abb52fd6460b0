"""--http-port: Prometheus /metrics and /healthz, scraped with a real HTTP client (urllib) and
parsed with prometheus-client's own parser, on every store backend."""

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import gevent.event
import pytest
from prometheus_client.parser import text_string_to_metric_families

import postgres
import pymq
from conftest import ROOT, TIMEOUT, RawClient

STORE_BACKENDS = ("memory", "sqlite", "postgresql")


def get(broker, path, method="GET"):
    """(status, body) of an HTTP request to the broker's --http-port."""
    request = urllib.request.Request("http://%s:%d%s" % (*broker.server.http_address, path),
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=2 * pymq.STORE_READ_TIMEOUT) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


class Scrape:
    """One scrape of /metrics: scrape(name, **labels) is a sample's value (None: absent)."""

    def __init__(self, broker):
        status, text = get(broker, "/metrics")
        assert status == 200, text
        self.families = {family.name: family for family in text_string_to_metric_families(text)}
        self.samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                        for family in self.families.values() for sample in family.samples}

    def __call__(self, name, **labels):
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def labels(self, name, label):
        """The values of `label` in the samples of `name`."""
        return sorted(dict(labels)[label] for sample, labels in self.samples if sample == name)


def send(client, queue, count, body=b"job"):
    for _ in range(count):
        client.request("SEND", {"destination": "/queue/" + queue}, body)


def test_counters_move_as_messages_flow(start_broker):
    broker = start_broker(http_port=0)
    before = Scrape(broker)
    assert before("pymq_stored_messages") == 0
    assert before("pymq_messages_received_total") == 0
    producer = RawClient(broker.address)
    producer.connect("1.2")
    send(producer, "jobs", 5)       # receipted: stored before anyone consumes them
    stored = Scrape(broker)
    assert stored("pymq_messages_received_total") == 5
    assert stored("pymq_store_inserts_total") == 5
    assert stored("pymq_stored_messages") == 5

    consumer = RawClient(broker.address)
    consumer.connect("1.2")
    consumer.request("SUBSCRIBE", {"destination": "/queue/jobs", "id": "w",
                                   "ack": "client-individual"})
    messages = [consumer.expect("MESSAGE") for _ in range(5)]
    assert Scrape(broker)("pymq_messages_in_flight") == 5
    consumer.send("NACK", {"id": messages[0].headers["ack"]})
    again = consumer.expect("MESSAGE")
    assert again.headers["redelivered"] == "true"
    for message in messages[1:] + [again]:
        consumer.request("ACK", {"id": message.headers["ack"]})  # RECEIPT: the delete is durable
    after = Scrape(broker)
    assert after("pymq_messages_delivered_total") == 6
    assert after("pymq_messages_acked_total") == 5
    assert after("pymq_messages_nacked_total") == 1
    assert after("pymq_messages_redelivered_total") == 1
    assert after("pymq_messages_in_flight") == 0
    assert after("pymq_store_deletes_total") == 5
    assert after("pymq_stored_messages") == 0
    # Histograms: one observation per batch, every batch in the +Inf bucket.
    for name in ("pymq_store_commit_seconds", "pymq_store_batch_size"):
        count = after(name + "_count")
        assert count > before(name + "_count")
        assert after(name + "_bucket", le="+Inf") == count
    # Every batch applied is observed (batches_total also counts those with nothing to do).
    assert after("pymq_store_batches_total") >= after("pymq_store_commit_seconds_count")
    assert after("pymq_store_batch_size_sum") >= 10      # 5 inserts, 5 deletes at least
    assert after("pymq_store_errors_total") == 0
    assert after("pymq_store_outage") == 0

    # A rejected message is a dead letter, and stays stored (in its dead-letter queue).
    send(producer, "jobs", 1)
    consumer.send("NACK", {"id": consumer.expect("MESSAGE").headers["ack"], "requeue": "false",
                           "receipt": "rejected"})
    consumer.expect("RECEIPT")
    count = consumer.request("SEND", {"destination": "/control/count-msgs/queue/DLQ.jobs"})
    assert count.headers["num-messages"] == "1"         # after the dead letter's move
    dead = Scrape(broker)
    assert dead("pymq_messages_dead_lettered_total") == 1
    assert dead("pymq_stored_messages") == 1


def connection_gauges(broker):
    scrape = Scrape(broker)
    return {"connections": scrape("pymq_connections"),
            "opened": scrape("pymq_connections_opened_total"),
            "queue subscriptions": scrape("pymq_subscriptions", kind="queue"),
            "topic subscriptions": scrape("pymq_subscriptions", kind="topic"),
            "active queues": scrape("pymq_active_queues")}


def test_connections_and_subscriptions(start_broker):
    broker = start_broker(http_port=0, max_connections=2)
    first, second = RawClient(broker.address), RawClient(broker.address)
    first.connect("1.2")
    second.connect("1.0")
    first.request("SUBSCRIBE", {"destination": "/queue/jobs", "id": "q"})
    first.request("SUBSCRIBE", {"destination": "/topic/news", "id": "t"})
    second.request("SUBSCRIBE", {"destination": "/topic/news.*", "id": "t"})
    assert connection_gauges(broker) == {"connections": 2, "opened": 2, "queue subscriptions": 1,
                                         "topic subscriptions": 2, "active queues": 1}

    refused = RawClient(broker.address)
    refused.expect_error("too many connections")
    assert Scrape(broker)("pymq_connections_refused_total") == 1

    first.request("UNSUBSCRIBE", {"id": "t"})
    assert Scrape(broker)("pymq_subscriptions", kind="topic") == 1
    first.request("DISCONNECT")     # its RECEIPT comes once the connection is forgotten
    assert connection_gauges(broker) == {"connections": 1, "opened": 2, "queue subscriptions": 0,
                                         "topic subscriptions": 1, "active queues": 0}


def test_no_series_per_queue_by_default(start_broker):
    broker = start_broker(http_port=0)
    client = RawClient(broker.address)
    client.connect("1.2")
    for queue in ("a", "b", "c"):
        send(client, queue, 1)
    for queue in ("a", "b", "c"):
        client.send("SUBSCRIBE", {"destination": "/queue/" + queue, "id": queue})
    assert [client.expect("MESSAGE").body for _ in range(3)] == [b"job"] * 3
    scrape = Scrape(broker)
    assert "pymq_queue_depth" not in scrape.families
    assert not any(value in ("a", "b", "c") for _, labels in scrape.samples
                   for _, value in labels)


@pytest.mark.parametrize("glob, depths", [
    ("jobs.*", {"jobs.a": 3, "jobs.b": 1, "jobs.ab": 1}),
    ("/queue/jobs.[!b]", {"jobs.a": 3}),        # /queue/ is taken off; fnmatch's [!...]
    ("jobs.?", {"jobs.a": 3, "jobs.b": 1}),
    ("other", {"other": 2}),
])
def test_metrics_queues_gives_depths_of_matching_queues(start_broker, glob, depths):
    broker = start_broker(http_port=0, metrics_queues=glob)
    client = RawClient(broker.address)
    client.connect("1.2")
    send(client, "jobs.a", 3)
    send(client, "jobs.b", 1)
    send(client, "jobs.ab", 1)
    send(client, "other", 2)
    send(client, "Jobs.A", 1)           # globs are case-sensitive
    scrape = Scrape(broker)
    assert {queue: scrape("pymq_queue_depth", queue=queue)
            for queue in scrape.labels("pymq_queue_depth", "queue")} == depths


def test_queue_depths_move_and_are_bounded(start_broker, monkeypatch):
    monkeypatch.setattr(pymq, "MAX_QUEUE_SERIES", 2)
    broker = start_broker(http_port=0, metrics_queues="q*")
    client = RawClient(broker.address)
    client.connect("1.2")
    for queue in ("q3", "q1", "q2"):
        send(client, queue, 2)
    scrape = Scrape(broker)
    assert scrape.labels("pymq_queue_depth", "queue") == ["q1", "q2"]     # first by name
    client.send("SUBSCRIBE", {"destination": "/queue/q1", "id": "1",
                              "ack": "client-individual"})
    first, second = client.expect("MESSAGE"), client.expect("MESSAGE")
    client.request("ACK", {"id": first.headers["ack"]})
    # The other one is in flight: still stored, still counted.
    assert Scrape(broker)("pymq_queue_depth", queue="q1") == 1
    client.request("ACK", {"id": second.headers["ack"]})
    assert Scrape(broker).labels("pymq_queue_depth", "queue") == ["q2", "q3"]   # q1 is empty


def test_healthz_and_other_paths(start_broker):
    broker = start_broker(http_port=0)
    assert get(broker, "/healthz") == (200, "ok\n")
    assert get(broker, "/healthz", "HEAD") == (200, "")
    assert get(broker, "/")[0] == 200                   # the console (tests/test_console.py)
    assert get(broker, "/metrics/x")[0] == 404
    assert get(broker, "/metrics", "POST")[0] == 405
    assert get(broker, "/healthz", "DELETE")[0] == 405
    assert Scrape(broker)("pymq_info", version=pymq.__version__) == 1


def exchange(address, data):
    """Send `data`, hang up, and return what comes back until the server closes; the server
    may close (or reset) before it has read it all."""
    answer = b""
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        except (ConnectionResetError, BrokenPipeError, OSError):
            pass
    return answer


def test_garbage_on_the_http_port_leaves_the_broker_serving(start_broker, capfd):
    broker = start_broker(http_port=0)
    stomp = RawClient(broker.address)
    stomp.connect("1.2")
    for garbage in (b"\x00\xff\x16\x03\x01" * 100 + b"\r\n\r\n",     # binary, a TLS hello
                    b"GET /metrics HTTP/9.9\r\n\r\n",
                    b"GET /" + b"x" * 100000 + b" HTTP/1.1\r\n\r\n",
                    b"GET /metrics HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                    b"CONNECT\naccept-version:1.2\n\n\x00",           # STOMP on the wrong port
                    b"GET /metr"):                                    # and hang up half-way
        answer = exchange(broker.server.http_address, garbage)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer[:200]
    assert get(broker, "/healthz") == (200, "ok\n")
    stomp.request("SEND", {"destination": "/queue/jobs"}, b"still served")
    assert Scrape(broker)("pymq_messages_received_total") == 1
    assert "Traceback" not in capfd.readouterr().err


def test_healthz_says_shutting_down(start_broker):
    broker = start_broker(http_port=0)
    server = broker.server
    gate = broker.call(gevent.event.Event)
    flush = server.storage.flush

    def held_flush():
        gate.wait()                 # Server.stop() stays in progress until the test opens it
        flush()

    def stop():
        server.storage.flush = held_flush
        gevent.spawn(server.stop)

    broker.call(stop)
    assert broker.call(lambda: server.stopping)
    assert get(broker, "/healthz") == (503, "shutting down\n")
    address = server.http_address
    broker.call(gate.set)
    broker._thread.join(2 * pymq.FLUSH_TIMEOUT)
    assert not broker._thread.is_alive()
    with pytest.raises(OSError):        # the HTTP listener is closed too
        socket.create_connection(address, timeout=TIMEOUT)


def test_an_idle_keep_alive_connection_does_not_hold_up_the_shutdown(start_broker):
    broker = start_broker(http_port=0)
    with socket.create_connection(broker.server.http_address, timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: pymq\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        started = time.monotonic()
        broker.stop()
        assert time.monotonic() - started < pymq.FLUSH_TIMEOUT / 2


@pytest.fixture
def cluster():
    """A PostgreSQL server of this test's own, which the test may stop and start."""
    server = postgres.new_cluster()
    yield server
    server.destroy()


@pytest.mark.parametrize("store_backend", ["postgresql"], indirect=True)
def test_healthz_and_metrics_through_a_database_outage(cluster, start_broker):
    broker = start_broker(db=cluster.create_database(), db_retry=0.5, http_port=0)
    client = RawClient(broker.address, timeout=30)
    client.connect("1.2")
    send(client, "jobs", 1)
    assert get(broker, "/healthz") == (200, "ok\n")
    cluster.stop("fast")

    status, reason = get(broker, "/healthz")
    assert status == 503 and reason.startswith("database unavailable since "), reason
    assert Scrape(broker)("pymq_store_outage") == 1
    client.send("SEND", {"destination": "/queue/jobs", "receipt": "lost"}, b"during")
    assert "not stored" in client.expect("ERROR", timeout=10).headers["message"]
    scrape = Scrape(broker)
    assert scrape("pymq_store_errors_total") >= 1     # the SEND's batch, maybe /healthz's too
    assert scrape("pymq_store_retries_total") > 0
    assert scrape("pymq_store_outage") == 1         # until a batch gets through again

    cluster.start()
    # /healthz has the store try again; its batch is retried with back-off: poll.
    deadline = time.monotonic() + 10
    while get(broker, "/healthz") != (200, "ok\n"):
        assert time.monotonic() < deadline, "/healthz still failing after the database is back"
        time.sleep(0.05)
    scrape = Scrape(broker)
    assert scrape("pymq_store_outage") == 0
    assert scrape("pymq_stored_messages") == 1      # counted again after the uncertain batches


def test_command_line_http_port(broker_process):
    broker = broker_process("--http-port", "0", "--db", "memory:")
    match = broker.wait_for_log(r"metrics and health on http://(\S+):(\d+)/")
    url = "http://%s:%s/metrics" % match.groups()
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        names = {family.name for family in
                 text_string_to_metric_families(response.read().decode())}
    assert {"pymq_connections", "pymq_messages_received", "process_open_fds"} <= names
    assert broker.stop() == 0


def test_command_line_collects_young_objects_rarely(broker_process):
    """Run from the command line, pymq sets CPython's cycle collector for a server (tune_gc):
    start-up's objects frozen, young objects collected every 50,000 new ones, not 700, so a
    backlog of a few thousand messages costs no collection at all (with the default, a few
    dozen; at 10,000 connections, full collections every second). /metrics shows them."""
    import gc
    if not hasattr(gc, "freeze"):
        pytest.skip("PyPy's collector has no generations to set")
    broker = broker_process("--http-port", "0", "--db", "memory:")
    url = "http://%s:%s/metrics" % broker.wait_for_log(
        r"metrics and health on http://(\S+):(\d+)/").groups()
    client = RawClient(broker.address)
    client.connect("1.2")

    def collections():
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return {sample.labels["generation"]: sample.value
                    for family in text_string_to_metric_families(response.read().decode())
                    for sample in family.samples
                    if sample.name == "python_gc_collections_total"}

    before = collections()
    assert set(before) == {"0", "1", "2"}
    for number in range(3000):             # a backlog: its objects outlive young collections
        client.send("SEND", {"destination": "/queue/jobs", "receipt": str(number)},
                    b"job %d" % number)
    for number in range(3000):
        assert client.expect("RECEIPT").headers["receipt-id"] == str(number)
    client.send("SUBSCRIBE", {"destination": "/queue/jobs", "id": "w"})
    for number in range(3000):
        assert client.expect("MESSAGE").body == b"job %d" % number
    after = collections()
    assert {generation: after[generation] - before[generation] for generation in after} \
        == {"0": 0, "1": 0, "2": 0}
    assert broker.stop() == 0


def test_importing_pymq_does_not_import_prometheus_client():
    result = subprocess.run(
        [sys.executable, "-c", "import sys, pymq; print('prometheus_client' in sys.modules)"],
        capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.stdout.strip() == "False", result.stderr


def test_security_counters_move(start_broker, tmp_path):
    """Failed logins and refused frames are counted (TLS handshake failures: test_tls.py)."""
    path = tmp_path / "users.ini"
    path.write_text("[alice]\npassword = %s\nwrite = /queue/jobs.*\n"
                    % pymq.hash_password("pw"))
    broker = start_broker(users=str(path), http_port=0)
    bad = RawClient(broker.address)
    bad.send("CONNECT", {"accept-version": "1.2", "login": "alice", "passcode": "guess"})
    bad.expect_error("bad credentials")
    alice = RawClient(broker.address)
    alice.connect("1.2", login="alice", passcode="pw")
    alice.send("SEND", {"destination": "/queue/secret"})
    alice.expect_error("access refused")
    metrics = Scrape(broker)
    assert metrics("pymq_logins_refused_total") == 1
    assert metrics("pymq_access_refused_total") == 1

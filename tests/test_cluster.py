"""Several pymq nodes over one PostgreSQL (--cluster): every node serves every queue, a message
goes to one consumer in the whole cluster at a time, a dead or paused node's messages go to
the others' consumers. Nodes are real processes (kill -9, SIGSTOP), the database is the tests'
throwaway PostgreSQL."""

import os
import re
import signal
import socket
import threading
import time
import urllib.parse

import pytest

import postgres
from conftest import ROOT, TIMEOUT, BrokerProcess, RawClient, count_msgs
from test_cli import run_pymq

LEASE = 2.0         # --lease-timeout of the test nodes: failover within seconds


def node_process(name, url, *args):
    return BrokerProcess("--cluster", "--node-name", name, "--db", url,
                         "--lease-timeout", str(LEASE), "--heart-beat", "0,0", *args)


@pytest.fixture
def nodes():
    """nodes(n, *args) -> n running cluster nodes over one fresh database; killed after the
    test."""
    started = []

    def start(count, *args):
        url = postgres.fresh_database_url()
        for i in range(count):
            started.append(node_process("node%d" % i, url, *args))
        return started[-count:]

    yield start
    for node in started:
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGCONT)
        node.stop(signal.SIGKILL)


def subscriber(node, destination, **headers):
    client = RawClient(node.address)
    client.connect("1.2")
    client.request("SUBSCRIBE", dict(headers, destination=destination, id="1"))
    return client


def consumer(node, queue, prefetch=10):
    return subscriber(node, "/queue/" + queue, ack="client-individual", prefetch=str(prefetch))


@pytest.mark.parametrize("db", ["memory:", "pymq.db"])
def test_cluster_needs_postgresql(db):
    result = run_pymq("--cluster", "--db", db)
    assert result.returncode == 2
    assert "option cluster needs a PostgreSQL store" in result.stderr


def test_a_message_sent_to_one_node_is_consumed_on_another(nodes):
    a, b = nodes(2)
    producer = RawClient(a.address)
    producer.connect("1.2")
    send_jobs(producer, 20)         # stored before anyone consumes
    worker = consumer(b, "jobs", prefetch=100)
    messages = [worker.expect("MESSAGE") for _ in range(20)]
    assert [m.body for m in messages] == [b"%d" % i for i in range(20)]   # in order
    for message in messages:
        worker.request("ACK", {"id": message.headers["ack"]})     # deleted once receipted
    start = time.monotonic()
    producer.request("SEND", {"destination": "/queue/jobs"}, b"live")
    assert worker.expect("MESSAGE").body == b"live"     # woken by NOTIFY, not a poll
    assert time.monotonic() - start < 1.0
    assert count_msgs(producer, "jobs") == 1            # the store answers, on any node


class Worker(threading.Thread):
    """A consumer that ACKs what it gets, recording (body, redelivered)."""

    def __init__(self, node, queue, prefetch=10):
        super().__init__(daemon=True)
        self.client = consumer(node, queue, prefetch)
        self.got = []
        self.error = None
        self.stopping = False

    def run(self):
        try:
            while not self.stopping:
                try:
                    message = self.client.expect("MESSAGE", timeout=0.5)
                except socket.timeout:
                    continue
                except AssertionError as error:
                    if "no frame within" in str(error):
                        continue
                    raise
                self.got.append(message.body)
                self.client.send("ACK", {"id": message.headers["ack"]})
        except Exception as error:      # reported by the test
            self.error = error


def test_three_nodes_every_message_once(nodes):
    cluster = nodes(3)
    workers = [Worker(node, "work") for node in cluster for _ in range(2)]
    for worker in workers:
        worker.start()
    sent = []
    for n, node in enumerate(cluster):
        producer = RawClient(node.address)
        producer.connect("1.2")
        for i in range(150):
            body = b"%d-%d" % (n, i)
            producer.request("SEND", {"destination": "/queue/work"}, body)
            sent.append(body)
    deadline = time.monotonic() + 20
    while sum(len(w.got) for w in workers) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    for worker in workers:
        worker.stopping = True
    for worker in workers:
        worker.join()
        assert worker.error is None, worker.error
    got = [body for worker in workers for body in worker.got]
    assert sorted(got) == sorted(sent)          # every one, none twice
    assert sum(1 for w in workers if w.got) >= 3       # spread over the nodes' consumers


def test_kill_9_a_node_its_messages_go_to_the_others_marked_redelivered(nodes):
    a, b = nodes(2)
    producer = RawClient(b.address)
    producer.connect("1.2")
    doomed = consumer(a, "jobs", prefetch=5)        # takes 5 and never ACKs
    send_jobs(producer, 10)
    held = {doomed.expect("MESSAGE").body for _ in range(5)}
    survivor = consumer(b, "jobs", prefetch=100)
    others = set()
    for _ in range(5):
        message = survivor.expect("MESSAGE")
        assert "redelivered" not in message.headers
        others.add(message.body)
        survivor.send("ACK", {"id": message.headers["ack"]})
    a.proc.kill()
    killed = time.monotonic()
    again = set()
    for _ in range(5):
        message = survivor.expect("MESSAGE", timeout=LEASE + TIMEOUT)
        assert message.headers.get("redelivered") == "true", message
        again.add(message.body)
        survivor.send("ACK", {"id": message.headers["ack"]})
    assert time.monotonic() - killed < LEASE + 1.5      # the lease, and a heartbeat's look
    assert again == held and not (held & others)
    assert count_msgs(producer, "jobs") == 0
    survivor.sock.settimeout(0.5)
    with pytest.raises(socket.timeout):
        survivor.sock.recv(1)           # nothing ACKed comes back


def test_a_paused_node_never_delivers_what_another_took(nodes):
    a, b = nodes(2)
    producer = RawClient(b.address)
    producer.connect("1.2")
    paused_worker = consumer(a, "jobs", prefetch=3)
    send_jobs(producer, 6)
    held = {paused_worker.expect("MESSAGE").body for _ in range(3)}
    a.proc.send_signal(signal.SIGSTOP)
    survivor = consumer(b, "jobs", prefetch=100)
    taken = set()
    deadline = time.monotonic() + LEASE + TIMEOUT
    while len(taken) < 6 and time.monotonic() < deadline:
        message = survivor.expect("MESSAGE", timeout=LEASE + TIMEOUT)
        taken.add(message.body)
        survivor.send("ACK", {"id": message.headers["ack"]})
    assert taken == {b"%d" % i for i in range(6)}          # the paused node's three too
    a.proc.send_signal(signal.SIGCONT)
    # The paused node finds its lease gone: its consumer gets an ERROR, never a message; the
    # three it held are not delivered again.
    paused_worker.expect_error("cluster node lost its lease")
    a.wait_for_log(r"cluster lease lost")
    survivor.close()
    producer.request("SEND", {"destination": "/queue/jobs"}, b"after")
    late = consumer(a, "jobs")          # the node serves again, as a new node
    assert late.expect("MESSAGE", timeout=LEASE + TIMEOUT).body == b"after"
    assert held <= taken


def test_stomp_py_fails_over_to_the_other_node(nodes):
    import stomp
    from conftest import Listener
    a, b = nodes(2)
    conn = stomp.Connection12([a.address, b.address], reconnect_sleep_initial=0.1,
                              reconnect_sleep_increase=0.0, reconnect_attempts_max=50)
    listener = Listener()

    class Resubscribe(stomp.ConnectionListener):
        """stomp.py's way: connect again on a lost connection (to the next address of its
        list that answers), and subscribe on each connection."""

        def on_connected(self, frame):
            conn.subscribe("/queue/jobs", id="1", ack="client-individual")

        def on_disconnected(self):
            if not done.is_set():
                threading.Thread(target=conn.connect, kwargs={"wait": True},
                                 daemon=True).start()

    done = threading.Event()

    conn.set_listener("test", listener)
    conn.set_listener("resubscribe", Resubscribe())
    conn.connect(wait=True)
    producer = RawClient(b.address)
    producer.connect("1.2")
    producer.request("SEND", {"destination": "/queue/jobs"}, b"before")
    message = listener.next_message()
    conn.ack(message.headers["ack"])
    a.proc.kill()                           # the node it was on
    producer.request("SEND", {"destination": "/queue/jobs"}, b"after")
    message = listener.next_message(timeout=LEASE + 10)
    assert message.body == "after"
    conn.ack(message.headers["ack"])
    done.set()
    conn.disconnect()


def test_topics_reach_every_node_once_prefix_subscriptions_included(nodes):
    a, b, c = nodes(3)
    subscribers = [subscriber(node, destination) for node, destination in (
        (a, "/topic/news.sport"), (b, "/topic/news.*"), (c, "/topic/*"), (c, "/topic/other"))]
    publisher = RawClient(b.address)
    publisher.connect("1.2")
    body = bytes(range(256)) * 4            # binary, NULs included
    for i in range(3):
        publisher.send("SEND", {"destination": "/topic/news.sport", "n": str(i)}, body)
    publisher.send("SEND", {"destination": "/topic/news.sport", "n": "same"}, b"twice")
    publisher.send("SEND", {"destination": "/topic/news.sport", "n": "same"}, b"twice")
    for client in subscribers[:3]:
        got = [client.expect("MESSAGE") for _ in range(5)]
        assert [m.headers.get("n") for m in got] == ["0", "1", "2", "same", "same"], got
        assert all(m.body == body for m in got[:3])
        assert got[0].headers["destination"] == "/topic/news.sport"
    subscribers[3].sock.settimeout(0.3)
    with pytest.raises(socket.timeout):
        subscribers[3].sock.recv(1)          # /topic/other: nothing


def test_a_topic_message_too_large_for_the_cluster_is_refused(nodes):
    a, b = nodes(2)
    client = RawClient(a.address)
    client.connect("1.2")
    client.send("SEND", {"destination": "/topic/big", "receipt": "r1"}, b"x" * 7000)
    client.expect_error("topic message in a cluster takes at most", receipt="r1")


def eventually(function, expected, seconds=LEASE + TIMEOUT):
    """Poll `function` until it returns `expected` (the nodes publish counts with their
    heartbeats: no event to wait for from outside)."""
    deadline = time.monotonic() + seconds
    while True:
        value = function()
        if value == expected or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_count_subscribers_answers_for_the_whole_cluster(nodes):
    a, b, c = nodes(3)
    clients = [subscriber(node, destination) for node, destination in (
        (a, "/queue/jobs"), (b, "/queue/jobs"), (b, "/queue/jobs"), (c, "/topic/news.sport"),
        (a, "/topic/news.*"), (b, "/topic/*"))]
    asker = RawClient(c.address)
    asker.connect("1.2")

    def count(destination):
        receipt = asker.request("SEND", {"destination": "/control/count-subscribers"
                                         + destination})
        return int(receipt.headers["num-subscribers"])

    assert eventually(lambda: count("/queue/jobs"), 3) == 3
    assert eventually(lambda: count("/topic/news.sport"), 3) == 3
    assert count("/topic/weather") == 1             # only /topic/*
    clients[1].close()                              # one of b's goes
    assert eventually(lambda: count("/queue/jobs"), 2) == 2
    b.proc.kill()                                   # b's remaining ones go with it
    assert eventually(lambda: count("/queue/jobs"), 1, LEASE + TIMEOUT) == 1
    assert eventually(lambda: count("/topic/news.sport"), 2) == 2


# -- task queues across nodes -------------------------------------------------------------------

def producer(node):
    client = RawClient(node.address)
    client.connect("1.2")
    return client


def send_jobs(client, count):
    """SEND b"0", b"1", ... to /queue/jobs, each receipted; the bodies."""
    bodies = [b"%d" % i for i in range(count)]
    for body in bodies:
        client.request("SEND", {"destination": "/queue/jobs"}, body)
    return bodies


def taken_on(node, headers, body):
    """A message SENT to `node` and delivered to a consumer there (prefetch 1): (producer,
    consumer, MESSAGE)."""
    client = producer(node)
    client.request("SEND", dict(headers, destination="/queue/jobs"), body)
    worker = consumer(node, "jobs", prefetch=1)
    return client, worker, worker.expect("MESSAGE")


def nothing_more(client, seconds=1.0):
    """No frame arrives on `client` within `seconds` (polling: nothing to wait for)."""
    client.sock.settimeout(seconds)
    with pytest.raises(socket.timeout):
        client.sock.recv(1)


@pytest.mark.parametrize("sender", ["alive", "killed"])
def test_a_delayed_message_sent_to_one_node_is_delivered_on_another_when_due(nodes, sender):
    a, b = nodes(2)
    worker = consumer(b, "later")
    client = producer(a)
    # "at" is sent first and due last: its time leaves 2 s for its own round trip before the
    # second SEND (a fresh PyPy node, its JIT cold, once took over 0.5 s: CI had them swap).
    due = int(time.time() * 1000) + 3000
    client.request("SEND", {"destination": "/queue/later", "deliver-at": str(due)}, b"at")
    client.request("SEND", {"destination": "/queue/later", "delay": "1000"}, b"delayed")
    if sender == "killed":
        a.proc.kill()           # the node that knew when: another must make them ready
    first = worker.expect("MESSAGE", timeout=TIMEOUT)
    assert first.body == b"delayed"
    second = worker.expect("MESSAGE", timeout=TIMEOUT)
    assert time.time() * 1000 >= due
    assert second.body == b"at" and "redelivered" not in second.headers


def test_expired_messages_are_dead_lettered_once_with_every_node_sweeping(nodes):
    a, b, c = nodes(3)
    client = producer(a)
    sent = [b"%d" % i for i in range(30)]
    for body in sent:
        client.request("SEND", {"destination": "/queue/brief", "ttl": "100"}, body)
    # Nobody consumes them: every node's sweep finds them expired, one moves each.
    dead = consumer(b, "DLQ.brief", prefetch=100)
    got = [dead.expect("MESSAGE", timeout=TIMEOUT) for _ in sent]
    assert sorted(m.body for m in got) == sorted(sent)
    assert {m.headers["dead-letter-reason"] for m in got} == {"expired"}
    for message in got:
        dead.request("ACK", {"id": message.headers["ack"]})
    nothing_more(dead, 2.0)             # two sweeps later: none dead-lettered twice
    assert count_msgs(client, "brief") == 0
    assert count_msgs(client, "DLQ.brief") == 0


def test_one_dedup_id_sent_to_two_nodes_stores_one_message(nodes):
    a, b = nodes(2)
    on_a, on_b = producer(a), producer(b)
    for i in range(20):             # both at once, each to its node
        headers = {"destination": "/queue/once", "dedup-id": "k%d" % i}
        on_a.send("SEND", dict(headers, receipt="a%d" % i), b"a%d" % i)
        on_b.send("SEND", dict(headers, receipt="b%d" % i), b"b%d" % i)
    for client in (on_a, on_b):
        for _ in range(20):
            client.expect("RECEIPT")
    on_b.request("SEND", {"destination": "/queue/once", "dedup-id": "k0"}, b"again")
    assert count_msgs(on_a, "once") == 20
    worker = consumer(b, "once", prefetch=100)
    got = [worker.expect("MESSAGE") for _ in range(20)]
    assert sorted(int(m.body[1:]) for m in got) == list(range(20))      # one per key
    for message in got:
        worker.send("ACK", {"id": message.headers["ack"]})
    assert count_msgs(worker, "once") == 0


def test_max_redeliveries_reached_by_nacks_on_two_nodes_dead_letters_once(nodes):
    a, b = nodes(2)
    client, first, message = taken_on(a, {"max-redeliveries": "1"}, b"poison")
    first.send("NACK", {"id": message.headers["ack"]})
    first.request("DISCONNECT")
    second = consumer(b, "jobs")
    message = second.expect("MESSAGE")
    assert message.headers.get("redelivery-count") == "1"
    second.send("NACK", {"id": message.headers["ack"]})     # the second delivery's: the last
    dead = consumer(a, "DLQ.jobs")
    letter = dead.expect("MESSAGE")
    assert letter.body == b"poison"
    assert letter.headers["dead-letter-reason"] == "max-redeliveries"
    assert letter.headers["original-redelivery-count"] == "1"
    dead.request("ACK", {"id": letter.headers["ack"]})
    assert count_msgs(client, "jobs") == 0 and count_msgs(client, "DLQ.jobs") == 0
    nothing_more(second)
    nothing_more(dead)


def test_a_nack_requeue_false_on_another_node_dead_letters_it(nodes):
    a, b = nodes(2)
    client = producer(a)
    client.request("SEND", {"destination": "/queue/jobs"}, b"bad")
    worker = consumer(b, "jobs")
    message = worker.expect("MESSAGE")
    worker.send("NACK", {"id": message.headers["ack"], "requeue": "false"})
    dead = consumer(a, "DLQ.jobs")
    letter = dead.expect("MESSAGE")
    assert letter.headers["dead-letter-reason"] == "rejected"
    assert letter.headers["original-destination"] == "/queue/jobs"
    assert count_msgs(client, "jobs") == 0
    nothing_more(worker)


@pytest.mark.parametrize("control", ["purge", "move"])
def test_purge_and_move_from_one_node_leave_what_another_has_in_flight(nodes, control):
    a, b = nodes(2)
    client = producer(b)            # stored by b: ids of b's block, above a's
    send_jobs(client, 10)
    holder = consumer(b, "jobs", prefetch=3)        # takes three, ACKs none yet
    held = [holder.expect("MESSAGE") for _ in range(3)]
    admin = producer(a)
    if control == "purge":
        answer = admin.request("SEND", {"destination": "/control/purge/queue/jobs"})
        assert answer.headers["num-purged"] == "7"
    else:
        answer = admin.request("SEND", {"destination": "/control/move/queue/jobs",
                                        "to": "/queue/other"})
        assert answer.headers["num-moved"] == "7"
        assert count_msgs(admin, "other") == 7
    assert count_msgs(admin, "jobs") == 3
    holder.send("NACK", {"id": held[0].headers["ack"]})    # what b held is still there
    again = holder.expect("MESSAGE")
    assert again.body == held[0].body and again.headers["redelivered"] == "true"
    for message in [again] + held[1:]:
        holder.request("ACK", {"id": message.headers["ack"]})
    assert count_msgs(admin, "jobs") == 0
    nothing_more(holder)


def test_touch_on_the_node_of_the_message_and_an_ack_timeout_hands_it_to_another(nodes):
    a, b = nodes(2)
    client, slow, message = taken_on(a, {"ack-timeout": "1"}, b"long job")
    ack = message.headers["ack"]
    other = consumer(b, "jobs")
    for elsewhere in (client, other):           # not in flight on these connections
        answer = elsewhere.request("SEND", {"destination": "/control/touch", "ack": ack})
        assert answer.headers["touched"] == "false"
    answer = slow.request("SEND", {"destination": "/control/touch", "ack": ack,
                                   "ack-timeout": "2"})
    touched = time.monotonic()
    assert answer.headers["touched"] == "true"
    # Its last consumer still has room, but the message goes to another one first: b's.
    again = other.expect("MESSAGE", timeout=TIMEOUT)
    assert time.monotonic() - touched > 1.9         # the touched timeout, not the first one
    assert again.body == b"long job"
    assert again.headers["redelivered"] == "true"
    other.request("ACK", {"id": again.headers["ack"]})
    assert count_msgs(client, "jobs") == 0
    nothing_more(slow)


# -- a node cut off from the database ------------------------------------------------------------

@pytest.mark.timeout(120)
def test_nodes_cut_off_from_the_database_past_their_lease_fence_themselves_and_serve_again():
    """The database server stops for longer than the lease (pg_ctl stop -m immediate: every
    connection cut) and starts again: the nodes' leases ran out meanwhile, so each one tells
    its clients (ERROR "cluster node lost its lease") and serves again as a new node; no
    receipted message is lost, and what they held is delivered once afterwards."""
    server = postgres.new_cluster()
    started = []
    try:
        url = server.create_database()
        for name in ("a", "b"):
            started.append(node_process(name, url))
        a, b = started
        client = producer(a)
        sent = send_jobs(client, 10)
        holders = [consumer(node, "jobs", prefetch=3) for node in (a, b)]
        held = [holder.expect("MESSAGE").body for holder in holders for _ in range(3)]
        assert len(set(held)) == 6
        server.stop("immediate")
        client.send("SEND", {"destination": "/queue/jobs", "receipt": "late"}, b"late")
        time.sleep(LEASE + 1.0)         # down for longer than the lease: nothing to await
        server.start()
        for holder in holders:
            holder.expect_error("cluster node lost its lease")
        # The producer's connection is closed too, maybe after the late RECEIPT; the late
        # SEND is stored either way (its batch was retried until the database came back).
        frames = []
        try:
            while True:
                frames.append(client.expect())
        except AssertionError:          # closed
            pass
        assert frames[-1].command == "ERROR", frames
        sent.append(b"late")
        for node in (a, b):
            node.wait_for_log(r"cluster lease lost")
        worker = consumer(b, "jobs", prefetch=100)      # serving again
        got = []
        while not set(sent) <= set(got):
            message = worker.expect("MESSAGE", timeout=LEASE + TIMEOUT)
            got.append(message.body)
            worker.send("ACK", {"id": message.headers["ack"]})
        assert sorted(got) == sorted(sent)
        assert count_msgs(worker, "jobs") == 0
        nothing_more(worker)
    finally:
        for node in started:
            node.stop(signal.SIGKILL)
        server.destroy()



def test_a_peek_from_one_node_s_console_leaves_the_messages_to_any_node(nodes):
    """The console's peek reads the store without claiming: node b's consumer gets the
    messages peeked on node a at once, not after a lease."""
    import json
    import urllib.request
    a, b = nodes(2, "--http-port", "0")
    pattern = r"metrics and health on (http://\S+:\d+/)"
    found = [re.search(pattern, line) for line in a.log]
    base = next((m for m in found if m), None) or a.wait_for_log(pattern)
    client = producer(a)
    send_jobs(client, 3)
    with urllib.request.urlopen(base.group(1) + "api/queue?name=jobs&peek=10",
                                timeout=TIMEOUT) as response:
        peeked = json.load(response)["messages"]
    assert [m["body"] for m in peeked] == ["0", "1", "2"]
    worker = consumer(b, "jobs")
    for i in range(3):
        message = worker.expect("MESSAGE")
        assert message.body == b"%d" % i and "redelivered" not in message.headers



def test_the_readme_s_three_nodes_serve_one_queue():
    """README's three command lines, on the test database and free ports: a message sent to
    the first node is consumed on the third."""
    text = (ROOT / "README.md").read_text()
    lines = re.findall(r"^ +python pymq.py (--cluster .*) &$", text, re.M)
    assert len(lines) == 3, lines
    url = postgres.fresh_database_url()
    started = []
    try:
        for line in lines:
            args = line.replace("postgresql:///pymq", url).split()
            args[args.index("--port") + 1] = "0"
            started.append(BrokerProcess(*args, port=None))
        client = producer(started[0])
        client.request("SEND", {"destination": "/queue/jobs"}, b"hello")
        assert consumer(started[2], "jobs").expect("MESSAGE").body == b"hello"
    finally:
        for node in started:
            node.stop(signal.SIGKILL)


# -- one node cut off from the database, the others not ---------------------------------------

class DatabaseLink:
    """A TCP proxy in front of the test PostgreSQL's socket, for one node: partition() holds
    every byte in both directions with the connections left open (a network partition: the
    node's queries hang), cut() closes them and refuses new ones (a link that fails loudly);
    heal() lets everything through again."""

    def __init__(self, url):
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query))
        self.target = os.path.join(query["host"], ".s.PGSQL.%s" % query["port"])
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = "postgresql://%s@127.0.0.1:%d%s" % (
            query["user"], self.listener.getsockname()[1], urllib.parse.urlsplit(url).path)
        self.flowing = threading.Event()
        self.flowing.set()
        self.refusing = False
        self.sockets = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return                          # closed
            if self.refusing:
                client.close()
                continue
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.target)
            self.sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                self.flowing.wait()
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def partition(self):
        self.flowing.clear()

    def cut(self):
        self.refusing = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.sockets = []

    def heal(self):
        self.refusing = False
        self.flowing.set()

    def close(self):
        self.heal()
        self.listener.close()
        self.cut()


@pytest.mark.parametrize("fault", ["partition", "cut"])
def test_a_node_cut_off_alone_delivers_nothing_another_took_and_serves_again(fault):
    """Node a reaches the database through a link that fails (its queries hang, or its
    connections drop), node b directly: b's consumer gets what a held once a's lease ran out,
    marked redelivered; a delivers nothing meanwhile, not even a message its own consumer
    NACKs; when the link is back, a finds its lease gone, tells its clients and serves again.
    Every message is consumed, none lost."""
    url = postgres.fresh_database_url()
    link = DatabaseLink(url)
    started = []
    try:
        for name, db in (("a", link.url), ("b", url)):
            started.append(node_process(name, db))
        a, b = started
        client = producer(b)
        sent = send_jobs(client, 6)
        worker = consumer(a, "jobs", prefetch=3)
        held = [worker.expect("MESSAGE") for _ in range(3)]
        getattr(link, fault)()
        survivor = consumer(b, "jobs", prefetch=100)
        got = []
        while len(got) < len(sent):
            message = survivor.expect("MESSAGE", timeout=LEASE + TIMEOUT)
            got.append(message.body)
            survivor.send("ACK", {"id": message.headers["ack"]})
            if message.body in {m.body for m in held}:
                assert message.headers.get("redelivered") == "true", message
        assert sorted(got) == sorted(sent)          # a's three included, each once
        # a's lease has run out (b took its messages): what a's consumer gives back, a keeps.
        worker.send("NACK", {"id": held[0].headers["ack"]})
        nothing_more(worker)
        link.heal()
        worker.expect_error("cluster node lost its lease")
        a.wait_for_log(r"cluster lease lost")
        survivor.request("UNSUBSCRIBE", {"id": "1"})
        client.request("SEND", {"destination": "/queue/jobs"}, b"after")
        late = consumer(a, "jobs")                  # a serves again, as a new node
        message = late.expect("MESSAGE", timeout=LEASE + TIMEOUT)
        assert message.body == b"after"
        late.request("ACK", {"id": message.headers["ack"]})
        assert count_msgs(late, "jobs") == 0
    finally:
        for node in started:
            node.stop(signal.SIGKILL)
        link.close()

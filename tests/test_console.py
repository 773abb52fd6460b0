"""The web console's JSON API (--http-port, /api/), over real HTTP with urllib: the numbers are
the broker's, listings are paged and searched by prefix, peeking consumes nothing, purge and
move are for admins, POSTs need the CSRF token, and a users file means logging in. The pages
themselves are checked in a browser by tests/test_browser.py."""

import http.cookiejar
import json
import textwrap
import urllib.error
import urllib.request

import pytest

import pymq
from conftest import RawClient, count_msgs

STORE_BACKENDS = ("memory", "sqlite", "postgresql")
PASSWORDS = {"root": "toor", "alice": "wonderland"}


class Browser:
    """An HTTP client keeping cookies, as a browser would, for one broker's console."""

    def __init__(self, broker):
        self.base = "http://%s:%d" % broker.server.http_address
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self.csrf = None
        self.cookies = []

    def request(self, path, body=None, csrf=True, content_type="application/json",
                headers=()):
        """(status, parsed JSON or text) of a GET, or a POST when there is a body."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, headers=dict(headers))
        if data is not None:
            request.add_header("Content-Type", content_type)
            if csrf and self.csrf:
                request.add_header("X-CSRF-Token", self.csrf)
        try:
            with self.opener.open(request, timeout=2 * pymq.STORE_READ_TIMEOUT) as response:
                status, text = response.status, response.read().decode()
                self.cookies += response.headers.get_all("Set-Cookie") or []
                kind = response.headers["Content-Type"]
        except urllib.error.HTTPError as error:
            status, text, kind = error.code, error.read().decode(), error.headers["Content-Type"]
        return status, json.loads(text) if kind == "application/json" else text

    def get(self, path):
        status, answer = self.request(path)
        assert status == 200, answer
        return answer

    def session(self):
        answer = self.get("/api/session")
        self.csrf = answer.get("csrf")
        return answer

    def login(self, login, passcode):
        status, answer = self.request("/api/login", {"login": login, "passcode": passcode})
        self.csrf = answer.get("csrf")
        return status, answer


def send(client, queue, count, body=b"job", **headers):
    for i in range(count):
        client.request("SEND", dict(headers, destination="/queue/" + queue),
                       body + str(i).encode())


@pytest.fixture
def producer():
    clients = []

    def connect(broker, **headers):
        client = RawClient(broker.address)
        client.connect("1.2", **headers)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


@pytest.fixture
def users_file(tmp_path):
    path = tmp_path / "users.ini"
    hashes = {name: pymq.hash_password(password) for name, password in PASSWORDS.items()}
    path.write_text(textwrap.dedent("""\
        [root]
        password = {root}
        read = /queue/*
        write = /queue/*
        admin = /queue/*

        [alice]
        password = {alice}
        read = /queue/jobs.*
        write = /queue/jobs.*
        """).format(**hashes))
    return path


def test_overview_numbers_are_the_brokers(start_broker, producer):
    broker = start_broker(http_port=0)
    console = Browser(broker)
    session = console.session()
    assert session == {"login_required": False, "logged_in": True, "version": pymq.__version__,
                       "user": None, "csrf": session["csrf"], "admin": True}
    client = producer(broker)
    send(client, "jobs", 3)
    client.request("SUBSCRIBE", {"destination": "/queue/jobs", "id": "w",
                                 "ack": "client-individual"})
    for _ in range(3):
        client.expect("MESSAGE")
    client.request("SUBSCRIBE", {"destination": "/topic/news", "id": "t"})
    overview = console.get("/api/overview")
    assert overview["version"] == pymq.__version__
    assert overview["connections"] == 1
    assert overview["subscriptions"] == {"queue": 1, "topic": 1}
    assert overview["stored"] == 3
    assert overview["in_flight"] == 3
    assert overview["counters"]["messages_in"] == 3
    assert overview["counters"]["messages_out"] == 3
    assert overview["uptime"] >= 0
    assert overview["store_commit_ms_all"] > 0
    assert all(set(rate) == {"t", "in", "delivered", "acked"} for rate in overview["rates"])


def test_queues_are_listed_a_page_at_a_time_by_prefix(start_broker, producer):
    broker = start_broker(http_port=0)
    client = producer(broker)
    for name in ("jobs.a", "jobs.b", "jobs.c", "mail", "jobs.d"):
        send(client, name, 1)
    send(client, "jobs.b", 4)
    send(client, "DLQ.jobs.b", 2)
    console = Browser(broker)
    first = console.get("/api/queues?prefix=jobs.&limit=2")
    assert [q["name"] for q in first["queues"]] == ["jobs.a", "jobs.b"]
    assert first["next"] == "jobs.b"
    assert first["queues"][1] == {"name": "jobs.b", "stored": 5, "delayed": 0, "in_flight": 0,
                                  "consumers": 0, "dead_letter_queue": "DLQ.jobs.b",
                                  "dead_letters": 2}
    second = console.get("/api/queues?prefix=jobs.&limit=2&after=jobs.b")
    assert [q["name"] for q in second["queues"]] == ["jobs.c", "jobs.d"]
    assert second["next"] is None
    everything = console.get("/api/queues")
    assert [q["name"] for q in everything["queues"]] == [
        "DLQ.jobs.b", "jobs.a", "jobs.b", "jobs.c", "jobs.d", "mail"]
    assert console.request("/api/queues?limit=0")[0] == 400
    assert console.request("/api/queues?limit=x")[0] == 400


def test_one_queue_figures_and_a_peek_that_consumes_nothing(start_broker, producer):
    broker = start_broker(http_port=0)
    client = producer(broker)
    send(client, "jobs", 4, body=b"x" * 3000, priority="4")
    client.request("SEND", {"destination": "/queue/jobs", "priority": "9", "task": "urgent"},
                   b"first")
    client.request("SEND", {"destination": "/queue/jobs", "delay": "60000"}, b"later")
    worker = producer(broker)
    worker.request("SUBSCRIBE", {"destination": "/queue/jobs", "id": "w", "ack": "client",
                                 "prefetch": "1"})
    worker.expect("MESSAGE")
    console = Browser(broker)
    queue = console.get("/api/queue?name=jobs&peek=3")
    messages = queue.pop("messages")
    assert queue == {"name": "jobs", "stored": 6, "delayed": 1, "in_flight": 1, "consumers": 1,
                     "dead_letter_queue": "DLQ.jobs", "dead_letters": 0, "may_admin": True,
                     "may_peek": True}
    assert len(messages) == 3
    assert messages[0]["body"] == "first" and ["task", "urgent"] in messages[0]["headers"]
    assert messages[0]["priority"] == 9 and not messages[0]["truncated"]
    assert messages[1]["truncated"] and messages[1]["body_bytes"] == 3001
    assert len(messages[1]["body"]) == pymq.PEEK_BODY
    assert count_msgs(client, "jobs") == 6              # nothing consumed
    assert console.get("/api/queue?name=/queue/nothing")["stored"] == 0
    assert console.request("/api/queue")[0] == 400
    assert console.request("/api/queue?name=jobs&peek=1000")[0] == 400


def test_purge_and_move_need_the_csrf_token(start_broker, producer):
    broker = start_broker(http_port=0)
    client = producer(broker)
    send(client, "DLQ.jobs", 5)
    send(client, "trash", 3)
    console = Browser(broker)
    console.session()
    assert console.request("/api/queue/purge", {"name": "trash"}, csrf=False)[0] == 403
    assert console.request("/api/queue/purge", {"name": "trash"},
                           content_type="text/plain")[0] == 415
    assert console.request("/api/queue/purge", {"name": "trash"},
                           headers={"Origin": "http://evil.example"})[0] == 403
    assert console.request("/api/queue/purge")[0] == 405     # a GET
    assert count_msgs(client, "trash") == 3
    assert console.request("/api/queue/purge", {"name": "trash"}) == (200, {"purged": 3})
    assert count_msgs(client, "trash") == 0
    assert console.request("/api/queue/move", {"name": "DLQ.jobs", "to": "jobs", "max": 2}) \
        == (200, {"moved": 2})
    assert console.request("/api/queue/move", {"name": "DLQ.jobs", "to": "/queue/jobs"}) \
        == (200, {"moved": 3})
    assert (count_msgs(client, "DLQ.jobs"), count_msgs(client, "jobs")) == (0, 5)
    status, answer = console.request("/api/queue/move", {"name": "jobs", "to": "jobs"})
    assert status == 400 and "another /queue/" in answer["error"]


def test_login_required_with_a_users_file(start_broker, producer, users_file):
    broker = start_broker(http_port=0, users=str(users_file))
    client = producer(broker, login="root", passcode="toor")
    send(client, "jobs.a", 5)
    console = Browser(broker)
    assert console.session() == {"login_required": True, "logged_in": False,
                                 "version": pymq.__version__}
    for path in ("/api/overview", "/api/queues", "/api/queue?name=jobs.a", "/api/connections"):
        assert console.request(path)[0] == 401, path
    assert console.request("/api/queue/purge", {"name": "jobs.a"})[0] == 403     # no token
    assert console.get("/")                              # the page, which shows a login form
    assert console.login("root", "wrong")[0] == 401
    assert broker.stats["logins_refused"] == 1
    status, session = console.login("root", "toor")
    assert status == 200 and session["user"] == "root" and session["admin"]
    cookie = console.cookies[-1]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert console.get("/api/queue?name=jobs.a")["stored"] == 5
    connections = console.get("/api/connections")["connections"]
    assert [(c["user"], c["transport"], c["version"]) for c in connections] == [
        ("root", "tcp", "1.2")]
    assert "toor" not in json.dumps(connections) and "passcode" not in json.dumps(connections)
    assert console.request("/api/logout", {}) == (200, {"logged_in": False})
    assert console.request("/api/overview")[0] == 401


def test_a_user_without_admin_may_look_but_not_purge(start_broker, producer, users_file):
    broker = start_broker(http_port=0, users=str(users_file))
    client = producer(broker, login="root", passcode="toor")
    send(client, "jobs.a", 2)
    send(client, "secret", 1)
    console = Browser(broker)
    status, session = console.login("alice", "wonderland")
    assert status == 200 and not session["admin"]
    queue = console.get("/api/queue?name=jobs.a")
    assert not queue["may_admin"] and queue["may_peek"] and len(queue["messages"]) == 2
    secret = console.get("/api/queue?name=secret")
    assert secret["stored"] == 1 and secret["messages"] is None     # figures, not contents
    status, answer = console.request("/api/queue/purge", {"name": "jobs.a"})
    assert status == 403 and "alice may not admin /queue/jobs.a" in answer["error"]
    assert console.request("/api/queue/move", {"name": "jobs.a", "to": "jobs.b"})[0] == 403
    assert count_msgs(client, "jobs.a") == 2


def test_the_one_login_user_may_do_everything(start_broker, producer):
    broker = start_broker(http_port=0, login="admin", passcode="secret")
    client = producer(broker, login="admin", passcode="secret")
    send(client, "q", 1)
    console = Browser(broker)
    assert console.login("admin", "nope")[0] == 401
    status, session = console.login("admin", "secret")
    assert status == 200 and session["admin"]
    assert console.request("/api/queue/purge", {"name": "q"}) == (200, {"purged": 1})


def test_connections_show_transport_version_and_heart_beats(start_broker):
    broker = start_broker(http_port=0)
    client = RawClient(broker.address)
    client.connect("1.1", heart_beat="0,5000")
    client.request("SUBSCRIBE", {"destination": "/topic/t", "id": "1"})
    other = RawClient(broker.address)
    other.connect("1.2")
    console = Browser(broker)
    page = console.get("/api/connections")
    assert page["total"] == 2
    first = page["connections"][0]                      # the oldest first
    assert (first["version"], first["transport"], first["subscriptions"], first["in_flight"],
            first["heart_beat"], first["user"]) == ("1.1", "tcp", 1, 0, [5000, 0], None)
    assert console.get("/api/connections?offset=1&limit=1")["connections"][0]["version"] \
        == "1.2"
    client.close()
    other.close()


def test_pages_and_assets_are_served_without_anything_external(start_broker):
    broker = start_broker(http_port=0)
    console = Browser(broker)
    for path in ("/", "/queues", "/queue", "/connections"):
        page = console.get(path)
        assert '<script src="/console.js"' in page and "http" not in page.split("<body>")[1]
    assert "function overview" in console.get("/console.js")
    assert console.get("/console.css")
    assert console.request("/nothing")[0] == 404
    assert console.request("/api/nothing")[0] == 404
    assert console.request("/", {})[0] == 405

"""Test harness: a real broker on 127.0.0.1:0 per test, real sockets, real clients.

The broker runs in its own thread with its own gevent hub, so the tests themselves use plain
blocking sockets and stomp.py (which uses threads) without any monkey-patching.
"""

import itertools
import queue
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import gevent
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pymq  # noqa: E402
import postgres  # noqa: E402
from pymq_storage import Storage, import_psycopg2, open_backend  # noqa: E402

import_psycopg2()       # on PyPy: psycopg2cffi, answering to the tests' `import psycopg2`

TIMEOUT = 5.0       # how long any single expected event may take
STORE_TIMEOUT = 2.0     # how long a storage operation may take before a test calls it hung


class BrokerThread:
    """A pymq Server in a thread of its own."""

    def __init__(self, **options):
        options.setdefault("port", 0)
        self.options = options
        self.server = None
        self._error = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker", daemon=True)

    def _run(self):
        import gevent
        try:
            self.server = pymq.start(**self.options)
            self._hub = gevent.get_hub()
        except BaseException as error:      # reported to the test by start()
            self._error = error
            return
        finally:
            self._ready.set()
        self.server.serve_forever()

    def start(self):
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "broker did not start"
        if self._error is not None:
            raise self._error
        self.address = self.server.address
        return self

    def call(self, function, *args):
        """Run function(*args) in the broker's thread and return its result."""
        import gevent
        done = threading.Event()
        result = {}

        def run():
            try:
                result["value"] = function(*args)
            except BaseException as error:
                result["error"] = error
            done.set()

        self._hub.loop.run_callback_threadsafe(lambda: gevent.spawn(run))
        assert done.wait(TIMEOUT), "broker thread did not answer"
        if "error" in result:
            raise result["error"]
        return result["value"]

    @property
    def stats(self):
        return self.call(lambda: dict(self.server.broker.stats))

    def stop(self):
        if self._thread.is_alive():
            import gevent
            self._hub.loop.run_callback_threadsafe(lambda: gevent.spawn(self.server.stop))
            self._thread.join(2 * pymq.FLUSH_TIMEOUT)
            assert not self._thread.is_alive(), "broker did not stop"


def pytest_generate_tests(metafunc):
    """A test module that sets STORE_BACKENDS = ("sqlite", "postgresql") runs each of its
    tests that starts a broker once per backend (unless the test names its own backends:
    @pytest.mark.parametrize("store_backend", (...), indirect=True))."""
    backends = getattr(metafunc.module, "STORE_BACKENDS", None)
    chosen = any("store_backend" in mark.args[0]
                 for mark in metafunc.definition.iter_markers("parametrize"))
    if backends and "store_backend" in metafunc.fixturenames and not chosen:
        metafunc.parametrize("store_backend", backends, indirect=True)


@pytest.fixture(scope="session", autouse=True)
def _postgres_server():
    yield
    postgres.shutdown()


@pytest.fixture
def store_backend(request):
    return getattr(request, "param", "sqlite")


@pytest.fixture
def new_store(store_backend, tmp_path):
    """new_store() -> the URL of a fresh, empty store of the backend under test."""
    counter = itertools.count()

    def make():
        if store_backend == "postgresql":
            return postgres.fresh_database_url()
        if store_backend == "memory":
            return "memory:"
        return str(tmp_path / ("pymq-%d.db" % next(counter)))

    return make


@pytest.fixture
def start_broker(new_store):
    """start_broker(**options) -> a running BrokerThread, stopped after the test. Its store
    is a fresh one of the backend under test (SQLite by default) unless `db` says otherwise."""
    brokers = []

    def start(**options):
        options.setdefault("db", new_store())
        broker = BrokerThread(**options).start()
        brokers.append(broker)
        return broker

    yield start
    for broker in brokers:
        broker.stop()


@pytest.fixture
def broker(start_broker):
    return start_broker()


class RawClient:
    """A STOMP client on a bare socket, for the protocol's edge cases."""

    def __init__(self, address, timeout=TIMEOUT):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.parser = pymq.FrameParser(max_body=1 << 30)
        self.version = "1.0"
        self.heartbeats = 0        # EOLs received between frames

    def close(self):
        self.sock.close()

    def send_bytes(self, data):
        self.sock.sendall(data)

    def send(self, command, headers=(), body=b""):
        self.send_bytes(pymq.encode_frame(command, headers, body, self.version))

    def connect(self, version="1.2", command="CONNECT", **headers):
        headers.setdefault("accept-version", version)
        headers.setdefault("host", "localhost")
        self.send(command, {k.replace("_", "-"): v for k, v in headers.items()})
        frame = self.expect("CONNECTED")
        self.version = self.parser.version = frame.headers.get("version", "1.0")
        return frame

    def expect(self, command=None, timeout=TIMEOUT):
        """The next frame from the broker (heart-beats are counted, not returned)."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.parser.next_frame()
            if frame is not None:
                break
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no frame within %s s" % timeout
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            assert data, "connection closed while waiting for %s" % (command or "a frame")
            self.parser.feed(data)
        if command is not None:
            assert frame.command == command, frame
        return frame

    def expect_error(self, fragment, receipt=None):
        """An ERROR whose message contains `fragment`, then the connection closes."""
        frame = self.expect("ERROR")
        assert fragment in frame.headers.get("message", ""), frame
        if receipt is not None:
            assert frame.headers.get("receipt-id") == receipt, frame
        self.expect_closed()
        return frame

    def expect_closed(self, timeout=TIMEOUT):
        """Read until the broker closes the connection; fails on any further frame."""
        self.sock.settimeout(timeout)
        rest = b""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                rest += data
        except ConnectionResetError:
            pass
        assert rest.strip(b"\n") == b"", "unexpected bytes before close: %r" % rest[:200]

    def request(self, command, headers=(), body=b""):
        """Send a frame with a receipt and return the RECEIPT."""
        headers = dict(headers)
        receipt = headers.setdefault("receipt", "r-%d" % next(_receipts))
        self.send(command, headers, body)
        frame = self.expect("RECEIPT")
        assert frame.headers["receipt-id"] == receipt, frame
        return frame


_receipts = iter(range(1, 10**9))


def count_msgs(client, queue):
    """num-messages of /queue/`queue`, asked on `client` (a RawClient whose MESSAGEs must not
    interleave): the store answers after every write asked for before."""
    receipt = client.request("SEND", {"destination": "/control/count-msgs/queue/" + queue})
    return int(receipt.headers["num-messages"])


@pytest.fixture
def raw(broker):
    """raw() -> a RawClient on the test's broker (connected with raw(connect=True))."""
    clients = []

    def make(connect=False, version="1.2", address=None):
        client = RawClient(address or broker.address)
        clients.append(client)
        if connect:
            client.connect(version)
        return client

    yield make
    for client in clients:
        client.close()


class Listener:
    """A stomp.py listener that queues what arrives, so tests can await frames."""

    def __init__(self):
        self.messages = queue.Queue()
        self.errors = queue.Queue()
        self.receipts = queue.Queue()
        self.disconnected = threading.Event()

    def on_message(self, frame):
        self.messages.put(frame)

    def on_error(self, frame):
        self.errors.put(frame)

    def on_receipt(self, frame):
        self.receipts.put(frame)

    def on_disconnected(self):
        self.disconnected.set()

    def next_message(self, timeout=TIMEOUT):
        return self.messages.get(timeout=timeout)


def stomp_connect(address, version="1.2", conn_kwargs=None, **connect_kwargs):
    """A stomp.py connection to `address`, connected: (connection, Listener)."""
    import stomp
    classes = {"1.0": stomp.Connection10, "1.1": stomp.Connection11, "1.2": stomp.Connection12}
    conn = classes[version]([address], **(conn_kwargs or {}))
    listener = Listener()
    conn.set_listener("test", listener)
    conn.connect(wait=True, **connect_kwargs)
    return conn, listener


@pytest.fixture
def stomp_client(broker):
    """stomp_client(version="1.2", **connect_kwargs) -> (connection, Listener), connected."""
    connections = []

    def make(version="1.2", address=None, **kwargs):
        conn, listener = stomp_connect(address or broker.address, version, **kwargs)
        connections.append(conn)
        return conn, listener

    yield make
    for conn in connections:
        if conn.is_connected():
            conn.disconnect()


class BrokerProcess:
    """`python pymq.py ARGS` in a subprocess, as ops run it; its port is read from its log.
    `command` runs another pymq instead (an installed `pymq` command), with `env` if given."""

    def __init__(self, *args, cwd=None, port="0", command=None, env=None, listening=True):
        import subprocess
        import tempfile
        self._tmp = None
        if cwd is None:
            cwd = self._tmp = tempfile.mkdtemp(prefix="pymq-test-")    # for the default pymq.db
        command = command or [sys.executable, str(ROOT / "pymq.py")]
        ports = ("--port", port) if port is not None else ()
        self.proc = subprocess.Popen(
            [*command, *ports, *args], cwd=cwd, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        self.log = []
        threading.Thread(target=self._read_stderr, daemon=True).start()
        if listening:
            self.wait_until_listening()

    def wait_until_listening(self, timeout=10):
        match = self.wait_for_log(r"listening on (\S+):(\d+)", timeout)
        self.address = (match.group(1), int(match.group(2)))

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_log(self, pattern, timeout=10):
        import re
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, "broker exited; log:\n" + "".join(self.log)
            self.log.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def stop(self, signum=None, timeout=10):
        """Send `signum` (default SIGTERM) and return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum or signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            if self._tmp is not None:
                import shutil
                shutil.rmtree(self._tmp, ignore_errors=True)


@pytest.fixture
def broker_process():
    """broker_process(*args) -> a BrokerProcess, killed after the test if still running."""
    processes = []

    def start(*args, **kwargs):
        process = BrokerProcess(*args, **kwargs)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.stop(signal.SIGKILL)


# -- storage driven from the test's own thread (gevent without monkey-patching) ---------------

def within(function, *args, seconds=STORE_TIMEOUT, what=None):
    """function(*args) in this greenlet, failing the test if it blocks longer than `seconds`."""
    name = what or getattr(function, "__name__", "call")
    with gevent.Timeout(seconds, AssertionError("%s did not return within %s s (hang)"
                                                % (name, seconds))):
        return function(*args)


def shutdown(storage):
    """Close `storage`, forcibly if close() hangs, so one test's bug cannot leak into others."""
    try:
        within(storage.close, seconds=STORE_TIMEOUT)
    except AssertionError:
        # Best effort: stop the committer and release the backend and its thread.
        if storage._committer is not None:
            storage._committer.kill()
            storage._committer = None
        try:
            storage._call(storage.backend.close)
        finally:
            if storage._pool is not None:
                storage._pool.kill()


@pytest.fixture
def open_store():
    """open_store(url or Backend) -> an opened Storage, closed after the test."""
    stores = []

    def open_(target):
        backend = open_backend(target) if isinstance(target, str) else target
        storage = Storage(backend)
        stores.append(storage)
        return within(storage.open)

    yield open_
    for storage in stores:
        if storage._committer is not None:
            shutdown(storage)

"""In a real browser: headless Chromium (Debian's chromium and chromium-driver, driven by
Selenium). A page running @stomp/stompjs (from npm, served by the test) talks to the broker over
/ws and wss://, with stomp.py clients over TCP on the other side; and the web console's pages
load with no JavaScript error, show the broker's numbers, and let an admin, and only an admin,
purge a queue. Screenshots go to $PYMQ_SCREENSHOTS (default: a temporary directory).

Skipped, saying why, where Chromium, its driver or npm is missing, unless PYMQ_REQUIRE_BROWSER
is 1 (CI: .ci/run installs them)."""

import functools
import http.server
import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest

import certs
import pymq
from conftest import TIMEOUT, count_msgs, RawClient, stomp_connect

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver"
STOMPJS = "@stomp/stompjs@7"
NPM_TIMEOUT = 90          # within pytest-timeout's 120 s for the first test
PASSWORDS = {"root": "toor", "alice": "wonderland"}


def unavailable(reason):
    """Skip, unless the browser tests are required (CI), where a missing tool is a failure."""
    if os.environ.get("PYMQ_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + " (PYMQ_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def stompjs(tmp_path_factory):
    """The directory holding stomp.umd.min.js, installed from npm."""
    npm = shutil.which("npm")
    if npm is None:
        unavailable("npm is not installed (apt-get install npm)")
    directory = tmp_path_factory.mktemp("stompjs")
    result = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--silent", STOMPJS],
                            cwd=directory, capture_output=True, text=True, timeout=NPM_TIMEOUT)
    bundle = directory / "node_modules/@stomp/stompjs/bundles/stomp.umd.min.js"
    if result.returncode != 0 or not bundle.exists():
        unavailable("npm install %s failed: %s" % (STOMPJS, result.stderr[-500:]))
    return bundle.parent


@pytest.fixture
def chrome(tmp_path):
    """chrome() -> a new headless Chromium session (a WebDriver) with a profile of its own."""
    binary = next((path for path in CHROMIUM if os.path.exists(path)), None)
    if binary is None or not os.path.exists(CHROMEDRIVER):
        unavailable("Chromium is not installed (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
    except ImportError:
        unavailable("selenium is not installed (pip install -r requirements-test.txt)")
    from selenium.webdriver.chrome.service import Service
    drivers = []

    def start():
        options = webdriver.ChromeOptions()
        options.binary_location = binary
        for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                         "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync",
                         "--disable-dev-shm-usage", "--window-size=1280,900",
                         # The test CA's server certificate, for wss://
                         "--ignore-certificate-errors",
                         "--user-data-dir=%s" % tempfile.mkdtemp(dir=tmp_path)):
            options.add_argument(argument)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(3 * TIMEOUT)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.quit()


@pytest.fixture
def screenshots(tmp_path):
    directory = Path(os.environ.get("PYMQ_SCREENSHOTS") or tmp_path / "screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture
def web_server(tmp_path):
    """web_server(directory) -> the http:// base URL of a static server of it."""
    servers = []

    def serve(directory):
        handler = functools.partial(Handler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return "http://127.0.0.1:%d" % server.server_address[1]

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def wait_for(driver, script, timeout=TIMEOUT):
    """The value of the JavaScript expression `script` once it is truthy."""
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return " + script))


def javascript_errors(driver):
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


# ---------------------------------------------------------------------------------------------
# @stomp/stompjs over /ws and wss://
# ---------------------------------------------------------------------------------------------

# Subscribes to /queue/browser; on a message, ACKs it (with a receipt) and, once the ACK is
# receipted, publishes to /topic/from-browser. window.state tells the test how far it got.
STOMP_PAGE = textwrap.dedent("""\
    <!DOCTYPE html>
    <html><head><meta charset="utf-8"><title>stompjs</title><link rel="icon" href="data:,">
    <script src="stomp.umd.min.js"></script></head>
    <body><p id="log"></p><script>
    window.state = {connected: false, received: null, acked: false, error: null};
    const client = new StompJs.Client({
      brokerURL: new URLSearchParams(location.search).get('broker'),
      reconnectDelay: 0,
      onConnect: () => {
        client.subscribe('/queue/browser', message => {
          window.state.received = message.body;
          client.watchForReceipt('ack-1', () => {
            window.state.acked = true;
            client.publish({destination: '/topic/from-browser', body: 'hello from ' + message.body});
          });
          message.ack({receipt: 'ack-1'});
        }, {ack: 'client-individual'});
        window.state.connected = true;
      },
      onStompError: frame => { window.state.error = frame.headers.message; },
      onWebSocketError: () => { window.state.error = 'websocket error'; },
    });
    client.activate();
    </script></body></html>
    """)


@pytest.mark.parametrize("scheme", ("ws", "wss"))
def test_stompjs_in_chromium_talks_to_tcp_clients(scheme, start_broker, chrome, stompjs,
                                                  web_server, tmp_path):
    pki = certs.make_pki(tmp_path)
    broker = start_broker(ws_port=0, wss_port=0, tls_cert=pki["server_cert"],
                          tls_key=pki["server_key"])
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text(STOMP_PAGE)
    shutil.copy(stompjs / "stomp.umd.min.js", site)
    subscriber, listener = stomp_connect(broker.address)
    subscriber.subscribe("/topic/from-browser", id="t", headers={"receipt": "sub"})
    assert listener.receipts.get(timeout=TIMEOUT).headers["receipt-id"] == "sub"
    producer, _ = stomp_connect(broker.address)
    try:
        driver = chrome()
        host, port = broker.server.address_of(scheme)
        driver.get(web_server(site) + "/index.html?broker=%s://%s:%d/ws" % (scheme, host, port))
        wait_for(driver, "window.state.connected || window.state.error")
        assert driver.execute_script("return window.state.error") is None
        producer.send("/queue/browser", "over %s" % scheme, receipt="sent")
        state = wait_for(driver, "window.state.acked && window.state")
        assert state["received"] == "over %s" % scheme
        message = listener.next_message()
        assert message.body == "hello from over %s" % scheme
        checker = RawClient(broker.address)
        checker.connect()
        assert count_msgs(checker, "browser") == 0          # the ACK was receipted: deleted
        checker.close()
        transports = broker.call(lambda: [c.transport for c in broker.server.connections])
        assert scheme in transports
        assert javascript_errors(driver) == []
    finally:
        subscriber.disconnect()
        producer.disconnect()


# ---------------------------------------------------------------------------------------------
# The web console
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def console_broker(start_broker, tmp_path):
    hashes = {name: pymq.hash_password(password) for name, password in PASSWORDS.items()}
    users = tmp_path / "users.ini"
    users.write_text(textwrap.dedent("""\
        [root]
        password = {root}
        read = /queue/* /topic/*
        write = /queue/* /topic/*
        admin = /queue/*

        [alice]
        password = {alice}
        read = /queue/*
        write = /queue/test.*
        """).format(**hashes))
    broker = start_broker(http_port=0, ws_port=0, users=str(users))
    client = RawClient(broker.address)
    client.connect(login="root", passcode="toor", heart_beat="0,10000")
    for i in range(5):
        client.request("SEND", {"destination": "/queue/test.purge", "job": str(i)},
                       json.dumps({"job": i}).encode())
    for name in ("jobs.images", "jobs.mail", "DLQ.jobs.mail"):
        client.request("SEND", {"destination": "/queue/" + name}, b"x")
    client.request("SUBSCRIBE", {"destination": "/topic/news", "id": "news"})
    yield broker
    client.close()


def log_in(driver, broker, login, passcode):
    from selenium.webdriver.common.by import By
    driver.get("http://%s:%d/" % broker.server.http_address)
    wait_for(driver, "document.getElementById('login')")
    driver.find_element(By.ID, "login").send_keys(login)
    driver.find_element(By.ID, "passcode").send_keys(passcode)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for(driver, "document.body.dataset.loaded === '/'")


def open_page(driver, broker, path):
    driver.get("http://%s:%d%s" % (*broker.server.http_address, path))
    wait_for(driver, "document.body.dataset.loaded")


def text(driver, element_id):
    return driver.execute_script("return document.getElementById(arguments[0]).textContent",
                                 element_id)


def test_console_pages_in_chromium(console_broker, chrome, screenshots):
    from selenium.webdriver.common.by import By
    broker = console_broker
    driver = chrome()
    log_in(driver, broker, "root", "toor")
    wait_for(driver, "document.getElementById('rates')")
    assert text(driver, "stored") == "8"
    assert text(driver, "connections") == "1"
    assert text(driver, "subscriptions") == "1"
    assert text(driver, "version") == pymq.__version__
    driver.save_screenshot(str(screenshots / "overview.png"))

    open_page(driver, broker, "/queues")
    rows = [row.text for row in driver.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert rows[-1].split() == ["test.purge", "5", "0", "0", "0", "0"]
    assert len(rows) == 4
    driver.save_screenshot(str(screenshots / "queues.png"))
    open_page(driver, broker, "/queues?prefix=jobs.")
    assert [row.text.split()[0] for row in driver.find_elements(By.CSS_SELECTOR, "tbody tr")] \
        == ["jobs.images", "jobs.mail"]

    open_page(driver, broker, "/queue?name=jobs.mail")
    assert text(driver, "dead-letters") == "1"
    open_page(driver, broker, "/queue?name=test.purge")
    assert text(driver, "stored") == "5"
    assert len(driver.find_elements(By.CSS_SELECTOR, "tbody tr")) == 5     # peeked
    driver.save_screenshot(str(screenshots / "queue.png"))
    driver.find_element(By.ID, "purge").click()
    driver.find_element(By.ID, "confirm").click()
    wait_for(driver, "document.querySelector('[role=status]').textContent"
                     ".startsWith('Purged 5')")
    open_page(driver, broker, "/queue?name=test.purge")
    assert text(driver, "stored") == "0"

    open_page(driver, broker, "/connections")
    cells = [cell.text for cell in driver.find_elements(By.CSS_SELECTOR, "tbody td")]
    assert cells[1:6] == ["root", "1.2", "TCP", "1", "0"]
    assert cells[6] == "send 10000 ms, expect 0 ms"
    driver.save_screenshot(str(screenshots / "connections.png"))
    assert javascript_errors(driver) == []


def test_console_without_admin_shows_no_purge_and_gets_403(console_broker, chrome,
                                                          screenshots):
    from selenium.webdriver.common.by import By
    broker = console_broker
    driver = chrome()
    log_in(driver, broker, "alice", "wonderland")
    open_page(driver, broker, "/queue?name=test.purge")
    assert text(driver, "stored") == "5"
    assert driver.find_elements(By.ID, "purge") == []
    driver.save_screenshot(str(screenshots / "queue-read-only.png"))
    status = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('/api/session').then(r => r.json()).then(session => fetch('/api/queue/purge', {
            method: 'POST', body: JSON.stringify({name: 'test.purge'}),
            headers: {'Content-Type': 'application/json', 'X-CSRF-Token': session.csrf}}))
          .then(response => done(response.status));
        """)
    assert status == 403
    checker = RawClient(broker.address)
    checker.connect(login="root", passcode="toor")
    assert count_msgs(checker, "test.purge") == 5
    checker.close()
    # The 403 is the test's own doing; the page itself logged no error.
    assert [e for e in javascript_errors(driver) if "403" not in e["message"]] == []

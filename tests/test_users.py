"""Users and permissions (--users FILE): hashed passwords, read/write/admin destination globs,
access refused, failed logins, SIGHUP reloads, the --login shortcut, hash-password."""

import logging
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import pymq
from conftest import ROOT, TIMEOUT, RawClient, count_msgs

PASSWORDS = {"alice": "wonderland", "bob": "builder", "root": "toor"}


@pytest.fixture(scope="module")
def hashes():
    return {name: pymq.hash_password(password) for name, password in PASSWORDS.items()}


def users_text(hashes, **extra):
    text = textwrap.dedent("""\
        # alice runs jobs and replays their dead letters; bob only watches topics.
        [alice]
        password = {alice}
        read = /queue/jobs.*, /topic/*
        write = /queue/jobs.*
        admin = /queue/DLQ.*

        [bob]
        password = {bob}
        read = /topic/news.*
        """).format(**hashes)
    for name, body in extra.items():
        text += "\n[%s]\n%s\n" % (name, body)
    return text


@pytest.fixture
def users_file(tmp_path, hashes):
    path = tmp_path / "users.ini"
    path.write_text(users_text(hashes))
    return path


@pytest.fixture
def secured(start_broker, users_file):
    return start_broker(users=str(users_file))


def login(broker, name, password=None):
    client = RawClient(broker.address)
    client.connect("1.2", login=name, passcode=password or PASSWORDS[name])
    return client


def test_users_log_in_with_their_passwords(secured):
    login(secured, "alice").request("SEND", {"destination": "/queue/jobs.a"}, b"1")
    login(secured, "bob").request("SUBSCRIBE", {"destination": "/topic/news.x", "id": "1"})


@pytest.mark.parametrize("name, password", [
    ("alice", "wrong"), ("alice", None), ("nobody", "wonderland"), (None, None),
])
def test_failed_login_is_delayed_logged_and_refused(secured, caplog, name, password):
    client = RawClient(secured.address)
    headers = {"accept-version": "1.2", "host": "localhost"}
    if name is not None:
        headers["login"] = name
    if password is not None:
        headers["passcode"] = password
    with caplog.at_level(logging.INFO, logger="pymq"):
        start = time.monotonic()
        client.send("CONNECT", headers)
        client.expect_error("bad credentials")
        assert time.monotonic() - start >= 0.8         # about 1 s: guessing is slow
    refused = [r.getMessage() for r in caplog.records if "login refused" in r.getMessage()]
    assert len(refused) == 1, caplog.text
    assert "127.0.0.1:" in refused[0]
    assert (repr(name) if name else "(no login)") in refused[0]
    if password:
        assert password not in caplog.text


def test_failed_logins_do_not_hold_up_others(secured):
    """While failures wait out their delay, other clients log in and are served. (Alice has
    logged in before: her login does not wait for a hash behind the failures' ones.)"""
    login(secured, "alice").close()
    failing = []
    for _ in range(20):
        client = RawClient(secured.address)
        client.send("CONNECT", {"accept-version": "1.2", "login": "alice", "passcode": "x"})
        failing.append(client)
    start = time.monotonic()
    alice = login(secured, "alice")
    alice.request("SEND", {"destination": "/queue/jobs.a"}, b"served")
    assert time.monotonic() - start < 0.8
    for client in failing:
        client.expect_error("bad credentials")


@pytest.mark.parametrize("command, headers, refused", [
    ("SEND", {"destination": "/queue/secret"}, "alice may not write /queue/secret"),
    ("SEND", {"destination": "/topic/news.x"}, "alice may not write /topic/news.x"),
    ("SUBSCRIBE", {"destination": "/queue/secret", "id": "1"}, "may not read /queue/secret"),
    ("SEND", {"destination": "/control/count-msgs/queue/secret"}, "may not read /queue/secret"),
    ("SEND", {"destination": "/control/count-subscribers/queue/secret"},
     "may not read /queue/secret"),
    ("SEND", {"destination": "/control/purge/queue/jobs.a"}, "may not admin /queue/jobs.a"),
    ("SEND", {"destination": "/control/move/queue/DLQ.jobs.a", "to": "/queue/secret"},
     "may not write /queue/secret"),
    ("SEND", {"destination": "/control/move/queue/jobs.a", "to": "/queue/jobs.b"},
     "may not admin /queue/jobs.a"),
])
def test_forbidden_frames_are_refused_and_touch_nothing(secured, raw, command, headers,
                                                         refused):
    # Something in the queues a refused purge or move would change.
    root = RawClient(secured.address)
    root.connect("1.2", login="alice", passcode="wonderland")
    root.request("SEND", {"destination": "/queue/jobs.a"}, b"kept")
    client = login(secured, "alice")
    client.send(command, dict(headers, receipt="r1"))
    frame = client.expect_error("access refused", receipt="r1")
    assert refused in frame.headers["message"]
    assert count_msgs(root, "jobs.a") == 1
    root.request("SEND", {"destination": "/queue/jobs.a"}, b"others are unaffected")


def test_what_alice_may_do(secured):
    alice = login(secured, "alice")
    alice.request("SEND", {"destination": "/queue/jobs.resize"}, b"job")
    assert count_msgs(alice, "jobs.resize") == 1
    alice.request("SEND", {"destination": "/control/count-subscribers/topic/anything"})
    alice.request("SUBSCRIBE", {"destination": "/topic/*", "id": "all"})    # read /topic/*
    # Dead letters: alice administers DLQ.*, and may replay them into jobs.*
    alice.request("SEND", {"destination": "/queue/jobs.x"}, b"dead")
    consumer = login(secured, "alice")
    consumer.request("SUBSCRIBE", {"destination": "/queue/jobs.x", "id": "1",
                                   "ack": "client-individual"})
    message = consumer.expect("MESSAGE")
    consumer.request("NACK", {"id": message.headers["ack"], "requeue": "false"})
    assert count_msgs(alice, "DLQ.jobs.x") == 1
    moved = alice.request("SEND", {"destination": "/control/move/queue/DLQ.jobs.x",
                                   "to": "/queue/jobs.y"})
    assert moved.headers["num-moved"] == "1"
    purged = alice.request("SEND", {"destination": "/control/purge/queue/DLQ.jobs.x"})
    assert purged.headers["num-purged"] == "0"


def test_prefix_subscription_needs_a_glob_covering_the_prefix(secured):
    bob = login(secured, "bob")
    bob.request("SUBSCRIBE", {"destination": "/topic/news.*", "id": "1"})
    bob.request("SUBSCRIBE", {"destination": "/topic/news.sport*", "id": "2"})
    bob.send("SUBSCRIBE", {"destination": "/topic/*", "id": "3"})     # would get every topic
    bob.expect_error("access refused: bob may not read /topic/*")


def test_a_forbidden_send_in_a_transaction_is_refused_at_once(secured):
    alice = login(secured, "alice")
    alice.request("BEGIN", {"transaction": "t"})
    alice.request("SEND", {"destination": "/queue/jobs.a", "transaction": "t"}, b"ok")
    alice.send("SEND", {"destination": "/queue/secret", "transaction": "t"}, b"no")
    alice.expect_error("access refused")
    assert count_msgs(login(secured, "alice"), "jobs.a") == 0


def test_login_shortcut_may_do_everything_beside_the_users(start_broker, users_file):
    broker = start_broker(users=str(users_file), login="ops", passcode="s3cret")
    ops = RawClient(broker.address)
    ops.connect("1.2", login="ops", passcode="s3cret")
    ops.request("SEND", {"destination": "/queue/secret"}, b"x")
    ops.request("SEND", {"destination": "/control/purge/queue/secret"})
    login(broker, "alice").request("SEND", {"destination": "/queue/jobs.a"})
    wrong = RawClient(broker.address)
    wrong.send("CONNECT", {"accept-version": "1.2", "login": "ops", "passcode": "guess"})
    wrong.expect_error("bad credentials")


def test_reconnecting_is_cheap_after_the_first_login(secured):
    """The slow hash is computed once per user and password; later logins of the same user
    check a keyed digest."""
    login(secured, "alice").close()
    start = time.monotonic()
    for _ in range(20):
        login(secured, "alice").close()
    assert time.monotonic() - start < 20 * 0.04     # well under one scrypt (~50 ms) each


def test_django_pbkdf2_hashes_are_accepted(start_broker, tmp_path):
    import base64
    import hashlib
    digest = hashlib.pbkdf2_hmac("sha256", b"pass", b"salty", 1000)
    path = tmp_path / "users.ini"
    path.write_text("[carol]\npassword = pbkdf2_sha256$1000$salty$%s\nwrite = /queue/*\n"
                    % base64.b64encode(digest).decode())
    broker = start_broker(users=str(path))
    carol = RawClient(broker.address)
    carol.connect("1.2", login="carol", passcode="pass")
    carol.request("SEND", {"destination": "/queue/q"}, b"x")


# -- the file, SIGHUP, the command line ---------------------------------------------------------

def test_sighup_reloads_the_users_file(broker_process, users_file, hashes):
    broker = broker_process("--users", str(users_file), "--db", "memory:")
    bob = RawClient(broker.address)
    bob.connect("1.2", login="bob", passcode="builder")
    alice = login(broker, "alice")
    # Remove bob, add carol, change alice's password.
    new_hashes = dict(hashes, alice=pymq.hash_password("looking-glass"))
    users_file.write_text(users_text(new_hashes).split("[bob]")[0]
                          + "[carol]\npassword = %s\nread = /queue/*\n"
                          % pymq.hash_password("c"))
    broker.proc.send_signal(signal.SIGHUP)
    broker.wait_for_log(r"users file .* reloaded: 2 users, 2 new or changed, 1 removed")
    bob.expect_error("access revoked: user bob was removed")
    alice.request("SEND", {"destination": "/queue/jobs.a"})     # connected: keeps going
    carol = RawClient(broker.address)
    carol.connect("1.2", login="carol", passcode="c")
    old = RawClient(broker.address)
    old.send("CONNECT", {"accept-version": "1.2", "login": "alice", "passcode": "wonderland"})
    old.expect_error("bad credentials")
    new = RawClient(broker.address)
    new.connect("1.2", login="alice", passcode="looking-glass")
    # A file that does not parse is refused and the old one kept.
    users_file.write_text("[dave]\npassword = plain-text-password\n")
    broker.proc.send_signal(signal.SIGHUP)
    broker.wait_for_log(r"users file not reloaded, the old one is kept: .*dave.*not a "
                        r"password hash")
    again = RawClient(broker.address)
    again.connect("1.2", login="carol", passcode="c")
    assert broker.stop() == 0
    assert not any("Traceback" in line for line in broker.log)


@pytest.mark.parametrize("content, message", [
    ("[eve]\npassword = hunter2\n", "user eve: password is not a password hash"),
    ("[eve]\nread = queue/x\n", "read pattern 'queue/x' is not a destination"),
    ("[eve]\nwrit = /queue/x\n", "unknown key writ"),
    ("no section\n", "cannot read users file"),
])
def test_a_bad_users_file_stops_the_start_with_the_reason(tmp_path, content, message):
    path = tmp_path / "users.ini"
    path.write_text(content)
    result = subprocess.run([sys.executable, str(ROOT / "pymq.py"), "--port", "0", "--db",
                             "memory:", "--users", str(path)], capture_output=True, text=True,
                            timeout=30, stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert message in result.stderr, result.stderr


def test_hash_password_prints_a_hash_the_broker_accepts():
    result = subprocess.run([sys.executable, str(ROOT / "pymq.py"), "hash-password"],
                            input="correct horse\n", capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    encoded = result.stdout.strip()
    assert encoded.startswith("scrypt$") and "correct horse" not in encoded
    assert pymq.verify_password("correct horse", encoded)
    assert not pymq.verify_password("correct horse battery", encoded)
    refused = subprocess.run([sys.executable, str(ROOT / "pymq.py"), "hash-password", "pw"],
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert refused.returncode == 2 and "stdin" in refused.stderr


def test_readme_users_example_is_a_valid_users_file(tmp_path):
    import re
    text = (ROOT / "README.md").read_text()
    example = re.search(r"```ini\n(.*?)```", text, re.S).group(1)
    path = tmp_path / "users.ini"
    path.write_text(example.replace("scrypt$16384$8$1$...", pymq.hash_password("x")))
    users = pymq.read_users(str(path))
    assert set(users) == {"alice", "reporting"}
    alice = users["alice"]
    assert alice.may("write", "/queue/jobs.resize") and not alice.may("write", "/queue/other")
    assert alice.may("admin", "/queue/DLQ.jobs") and alice.may_subscribe("/topic/*")
    assert not users["reporting"].may_subscribe("/topic/*")

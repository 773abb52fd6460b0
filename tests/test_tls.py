"""STOMP over TLS (--tls-port, --tls-cert, --tls-key) and mutual TLS (--tls-ca), with real
certificates made for the run (certs.py), stomp.py and Python's ssl module as the clients."""

import socket
import ssl
import time

import pytest

from certs import make_pki
from conftest import TIMEOUT, RawClient, count_msgs


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def client_context(ca, cert=None, key=None):
    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    return context


def tls_client(address, context):
    """A RawClient whose socket is TLS (handshake done)."""
    client = RawClient(address)
    client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
    return client


@pytest.fixture
def tls_broker(start_broker, pki):
    def start(**options):
        return start_broker(tls_port=0, tls_cert=pki["server_cert"], tls_key=pki["server_key"],
                            **options)
    return start


def refused_after_handshake(client):
    """With TLS 1.3 a client's handshake ends before the server has checked the client's
    certificate: the refusal shows on the first read, as an alert or the connection closed."""
    try:
        client.send("CONNECT", {"accept-version": "1.2", "host": "localhost"})
        client.sock.settimeout(TIMEOUT)
        return client.sock.recv(4096) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


def test_stomp_py_over_tls_sends_and_receives(tls_broker, pki, stomp_client):
    broker = tls_broker()
    host, port = broker.server.tls_address
    import stomp
    from conftest import Listener
    conn = stomp.Connection12([(host, port)])
    conn.set_ssl(for_hosts=[(host, port)], ca_certs=pki["ca"])
    listener = Listener()
    conn.set_listener("test", listener)
    conn.connect(wait=True)
    try:
        conn.subscribe("/queue/jobs", id="1", ack="client-individual")
        conn.send("/queue/jobs", "over tls", receipt="r1")
        message = listener.next_message()
        assert message.body == "over tls"
        conn.ack(message.headers["ack"])
        assert listener.receipts.get(timeout=TIMEOUT).headers["receipt-id"] == "r1"
    finally:
        conn.disconnect()
    # The plain listener serves the same broker.
    client = RawClient(broker.address)
    client.connect("1.2")
    assert count_msgs(client, "jobs") == 0


def test_big_bodies_in_both_directions_over_tls(tls_broker, pki):
    """Frames span many TLS records, and the writer has to wait for the socket."""
    broker = tls_broker()
    context = client_context(pki["ca"])
    producer = tls_client(broker.server.tls_address, context)
    producer.connect("1.2")
    consumer = tls_client(broker.server.tls_address, context)
    consumer.connect("1.2")
    consumer.request("SUBSCRIBE", {"destination": "/topic/big", "id": "1"})
    bodies = [bytes([65 + i % 26]) * (100000 + i) for i in range(30)]
    for body in bodies:
        producer.send("SEND", {"destination": "/topic/big"}, body)
    producer.request("SEND", {"destination": "/topic/none"})
    for body in bodies:
        assert consumer.expect("MESSAGE").body == body


def test_client_that_does_not_trust_the_server_ca_fails(tls_broker, pki):
    broker = tls_broker()
    with pytest.raises(ssl.SSLCertVerificationError):
        tls_client(broker.server.tls_address, client_context(pki["other_ca"]))
    import stomp
    host, port = broker.server.tls_address
    conn = stomp.Connection12([(host, port)], reconnect_attempts_max=1)
    conn.set_ssl(for_hosts=[(host, port)], ca_certs=pki["other_ca"])
    with pytest.raises(stomp.exception.ConnectFailedException):
        conn.connect(wait=True)
    # ... and the broker keeps serving others.
    client = tls_client(broker.server.tls_address, client_context(pki["ca"]))
    client.connect("1.2")
    assert broker.stats["tls_failures"] >= 1


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
def test_mutual_tls_refuses_clients_without_a_good_certificate(tls_broker, pki, who):
    broker = tls_broker(tls_ca=pki["ca"])
    if who == "no certificate":
        context = client_context(pki["ca"])
    else:
        context = client_context(pki["ca"], pki["other_cert"], pki["other_key"])
    try:
        client = tls_client(broker.server.tls_address, context)
    except (ssl.SSLError, ConnectionResetError):
        pass        # TLS 1.2: refused in the handshake itself
    else:
        assert refused_after_handshake(client)
    good = tls_client(broker.server.tls_address,
                      client_context(pki["ca"], pki["client_cert"], pki["client_key"]))
    good.connect("1.2")
    good.request("SEND", {"destination": "/queue/q"}, b"from alice")
    assert count_msgs(good, "q") == 1


def test_mutual_tls_with_stomp_py(tls_broker, pki):
    broker = tls_broker(tls_ca=pki["ca"])
    import stomp
    from conftest import Listener
    host, port = broker.server.tls_address
    conn = stomp.Connection12([(host, port)])
    conn.set_ssl(for_hosts=[(host, port)], ca_certs=pki["ca"], cert_file=pki["client_cert"],
                 key_file=pki["client_key"])
    listener = Listener()
    conn.set_listener("test", listener)
    conn.connect(wait=True)
    conn.subscribe("/topic/t", id="1")
    conn.send("/topic/t", "mutual")
    assert listener.next_message().body == "mutual"
    conn.disconnect()


def test_plaintext_client_on_the_tls_port_is_dropped(tls_broker, pki):
    broker = tls_broker()
    plain = RawClient(broker.server.tls_address)
    plain.send_bytes(b"CONNECT\naccept-version:1.2\nhost:localhost\n\n\0")
    plain.sock.settimeout(TIMEOUT)
    try:
        data = plain.sock.recv(4096)
        while data and not data.startswith(b"CONNECTED"):
            data = plain.sock.recv(4096)    # a TLS alert, maybe, then the close
        assert data == b""
    except ConnectionResetError:
        pass
    client = tls_client(broker.server.tls_address, client_context(pki["ca"]))
    client.connect("1.2")


def test_a_handshake_never_finished_counts_against_connect_timeout(tls_broker, pki):
    broker = tls_broker(connect_timeout=0.5)
    silent = socket.create_connection(broker.server.tls_address)
    half = socket.create_connection(broker.server.tls_address)
    half.sendall(b"\x16\x03\x01\x00\xc8\x01")    # the start of a ClientHello, then nothing
    start = time.monotonic()
    # Meanwhile others are served.
    client = tls_client(broker.server.tls_address, client_context(pki["ca"]))
    client.connect("1.2")
    for sock in (silent, half):
        sock.settimeout(TIMEOUT)
        try:
            assert sock.recv(4096) == b""
        except ConnectionResetError:
            pass
        sock.close()
    assert time.monotonic() - start < 0.5 + 2.0
    # A TLS client that finished its handshake still has connect-timeout to send CONNECT.
    late = tls_client(broker.server.tls_address, client_context(pki["ca"]))
    late.expect_error("no CONNECT frame within 0.5 seconds")
    client.request("SEND", {"destination": "/topic/t"})


def test_tls_only_broker_and_shutdown_error_over_tls(start_broker, pki):
    broker = start_broker(port=None, tls_port=0, tls_cert=pki["server_cert"],
                          tls_key=pki["server_key"])
    assert broker.address == broker.server.tls_address
    client = tls_client(broker.address, client_context(pki["ca"]))
    client.connect("1.2")
    client.request("SUBSCRIBE", {"destination": "/topic/t", "id": "1"})
    broker.stop()
    # The ERROR comes through TLS, not in clear.
    assert client.expect("ERROR").headers["message"] == "server shutting down"
    client.expect_closed()


def test_slow_consumer_is_told_over_tls(tls_broker, pki):
    broker = tls_broker(max_outbound=256 * 1024)
    context = client_context(pki["ca"])
    slow = tls_client(broker.server.tls_address, context)
    slow.connect("1.2")
    slow.request("SUBSCRIBE", {"destination": "/topic/flood", "id": "1"})
    producer = tls_client(broker.server.tls_address, context)
    producer.connect("1.2")
    for _ in range(200):        # 20 MB the slow one does not read
        producer.send("SEND", {"destination": "/topic/flood"}, b"x" * 100000)
    producer.request("SEND", {"destination": "/topic/none"})
    deadline = time.monotonic() + TIMEOUT
    while broker.stats["slow_consumers"] == 0:
        assert time.monotonic() < deadline, "the slow consumer was not dropped"
        time.sleep(0.01)
    slow.close()
    producer.request("SEND", {"destination": "/topic/flood"}, b"still served")


@pytest.mark.parametrize("args, message", [
    (["--tls-port", "0"], "tls-port needs --tls-cert and --tls-key"),
    (["--port", "none"], "nothing to listen on"),
    (["--tls-ca", "ca.pem"], "need --tls-port"),
])
def test_tls_option_errors(args, message):
    from test_cli import run_pymq
    result = run_pymq(*args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_unreadable_certificate_is_named(tmp_path, pki):
    from test_cli import run_pymq
    result = run_pymq("--port", "0", "--db", str(tmp_path / "x.db"), "--tls-port", "0",
                      "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", pki["server_key"])
    assert result.returncode == 1
    assert "cannot load TLS certificate %s" % (tmp_path / "missing.pem") in result.stderr


def test_certificate_cn_stands_for_the_login(tls_broker, pki, tmp_path):
    users = tmp_path / "users.ini"
    users.write_text("[alice]\nwrite = /queue/jobs.*\nread = /queue/jobs.*\n")   # no password
    broker = tls_broker(tls_ca=pki["ca"], tls_cert_login=True, users=str(users))

    def with_cert(name):
        return tls_client(broker.server.tls_address,
                          client_context(pki["ca"], pki[name + "_cert"], pki[name + "_key"]))

    alice = with_cert("client")         # CN alice
    alice.connect("1.2")
    alice.request("SEND", {"destination": "/queue/jobs.a"}, b"as alice")
    alice.send("SEND", {"destination": "/queue/secret"}, b"no")
    alice.expect_error("access refused: alice may not write /queue/secret")
    bob = with_cert("bob")              # a good certificate, but no such user
    bob.send("CONNECT", {"accept-version": "1.2", "host": "localhost"})
    bob.expect_error("bad credentials")
    posing = with_cert("client")        # alice's certificate, another login
    posing.send("CONNECT", {"accept-version": "1.2", "login": "bob", "passcode": "x"})
    posing.expect_error("bad credentials")
    # Without a certificate login (the plain port) alice has no password: refused.
    plain = RawClient(broker.address)
    plain.send("CONNECT", {"accept-version": "1.2", "login": "alice"})
    plain.expect_error("bad credentials")


def test_certificate_login_with_the_login_shortcut(tls_broker, pki):
    broker = tls_broker(tls_ca=pki["ca"], tls_cert_login=True, login="alice", passcode="pw")
    alice = tls_client(broker.server.tls_address,
                       client_context(pki["ca"], pki["client_cert"], pki["client_key"]))
    alice.connect("1.2")
    alice.request("SEND", {"destination": "/control/purge/queue/any"})   # may do everything
    bob = tls_client(broker.server.tls_address,
                     client_context(pki["ca"], pki["bob_cert"], pki["bob_key"]))
    bob.send("CONNECT", {"accept-version": "1.2", "host": "localhost"})
    bob.expect_error("bad credentials")

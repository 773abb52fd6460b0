"""STOMP over WebSocket (--ws-port, --wss-port; path /ws): the same broker as over TCP, with
websocket-client as the client (and stomp.py over TCP beside it). The browser tests of stomp.js
are in test_browser.py."""

import socket
import ssl
import struct

import pytest
import websocket

import pymq
from certs import make_pki
from conftest import TIMEOUT, RawClient


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def ws_broker(start_broker):
    return start_broker(ws_port=0, max_body=1 << 20, max_header_line=1024)


class WSClient:
    """A STOMP client over websocket-client: frames out as WebSocket text (or binary)
    messages, frames in parsed from the messages' bytes, however they are cut."""

    def __init__(self, address, subprotocols=("v12.stomp",), scheme="ws", sslopt=None,
                 path="/ws"):
        self.ws = websocket.create_connection(
            "%s://%s:%d%s" % (scheme, address[0], address[1], path), timeout=TIMEOUT,
            subprotocols=list(subprotocols) or None, sslopt=sslopt)
        self.parser = pymq.FrameParser(max_body=1 << 30)
        self.parser.version = "1.2"

    def send(self, command, headers=(), body=b"", binary=False):
        data = pymq.encode_frame(command, headers, body, "1.2")
        if binary:
            self.ws.send_binary(data)
        else:
            self.ws.send(data.decode())

    def connect(self, **headers):
        headers.setdefault("accept-version", "1.2")
        headers.setdefault("host", "localhost")
        self.send("CONNECT", headers)
        return self.expect("CONNECTED")

    def expect(self, command=None):
        while True:
            frame = self.parser.next_frame()
            if frame is not None:
                break
            opcode, data = self.ws.recv_data()
            assert opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY), opcode
            self.parser.feed(data)
        if command is not None:
            assert frame.command == command, frame
        return frame

    def request(self, command, headers=(), body=b""):
        headers = dict(headers, receipt="r")
        self.send(command, headers, body)
        return self.expect("RECEIPT")

    def close_code(self):
        """Read until the broker closes the WebSocket; its close code."""
        while True:
            frame = self.ws.recv_frame()
            if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
                return struct.unpack("!H", frame.data[:2])[0] if len(frame.data) >= 2 else None


def test_stomp_over_websocket_with_tcp_clients_beside(ws_broker, stomp_client):
    client = WSClient(ws_broker.server.address_of("ws"))
    assert client.ws.getsubprotocol() == "v12.stomp"
    assert client.connect().headers["version"] == "1.2"
    client.request("SUBSCRIBE", {"destination": "/queue/jobs", "id": "1",
                                 "ack": "client-individual"})
    producer, _ = stomp_client("1.2", address=ws_broker.address)
    producer.send("/queue/jobs", "from tcp", receipt="p1")
    message = client.expect("MESSAGE")
    assert message.body == b"from tcp"
    client.request("ACK", {"id": message.headers["ack"]})
    _, listener = stomp_client("1.2", address=ws_broker.address)
    tcp_topic, topic_listener = stomp_client("1.2", address=ws_broker.address)
    tcp_topic.subscribe("/topic/news", id="t")
    client.request("SUBSCRIBE", {"destination": "/topic/barrier", "id": "b"})   # a barrier
    client.request("SEND", {"destination": "/topic/news"}, b"from the web")
    assert topic_listener.next_message().body == "from the web"
    assert count_over(client, "jobs") == 0


def count_over(client, queue):
    receipt = client.request("SEND", {"destination": "/control/count-msgs/queue/" + queue})
    return int(receipt.headers["num-messages"])


def test_frames_cut_anywhere_and_several_per_message_binary_too(ws_broker):
    client = WSClient(ws_broker.server.address_of("ws"))
    client.connect()
    client.request("SUBSCRIBE", {"destination": "/topic/t", "id": "1"})
    body = bytes(range(256))          # NULs and bytes that are not UTF-8: binary messages
    data = b"".join(pymq.encode_frame("SEND", {"destination": "/topic/t", "n": str(i)}, body,
                                      "1.2") for i in range(3))
    for start in range(0, len(data), 100):      # 100-byte pieces, frames cut anywhere
        client.ws.send_binary(data[start:start + 100])
    client.ws.send_binary(data)                 # three frames in one message
    got = [client.expect("MESSAGE") for _ in range(6)]
    assert [m.headers["n"] for m in got] == ["0", "1", "2"] * 2
    assert all(m.body == body for m in got)


def test_no_subprotocol_then_connect_decides(ws_broker):
    client = WSClient(ws_broker.server.address_of("ws"), subprotocols=())
    assert client.ws.getsubprotocol() is None
    assert client.connect(**{"accept-version": "1.1"}).headers["version"] == "1.1"


def test_ping_is_answered(ws_broker):
    client = WSClient(ws_broker.server.address_of("ws"))
    client.connect()
    client.ws.ping(b"still there?")
    opcode, data = client.ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_PONG and data == b"still there?"


def test_websocket_close_redelivers_what_was_in_flight(ws_broker):
    first = WSClient(ws_broker.server.address_of("ws"))
    first.connect()
    first.request("SUBSCRIBE", {"destination": "/queue/q", "id": "1", "ack": "client-individual"})
    first.send("SEND", {"destination": "/queue/q"}, b"job")
    assert first.expect("MESSAGE").body == b"job"
    first.ws.close()            # a WebSocket close: the connection is lost, not the message
    second = RawClient(ws_broker.address)
    second.connect("1.2")
    second.request("SUBSCRIBE", {"destination": "/queue/q", "id": "1",
                                 "ack": "client-individual"})
    message = second.expect("MESSAGE")
    assert message.body == b"job" and message.headers["redelivered"] == "true"


def test_bad_credentials_get_an_error_then_a_close(start_broker):
    broker = start_broker(ws_port=0, login="u", passcode="p")
    client = WSClient(broker.server.address_of("ws"))
    client.send("CONNECT", {"accept-version": "1.2", "login": "u", "passcode": "wrong"})
    assert "bad credentials" in client.expect("ERROR").headers["message"]
    assert client.close_code() == 1000


def read_to_end(sock):
    """Everything the broker sends until it closes the connection."""
    received = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return received
        received += data


def http_request(address, request):
    sock = socket.create_connection(address, timeout=TIMEOUT)
    sock.sendall(request)
    try:
        return read_to_end(sock)
    finally:
        sock.close()


@pytest.mark.parametrize("request_bytes, reason", [
    (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", b"not a WebSocket upgrade"),
    (b"GET /elsewhere HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
     b"no WebSocket at /elsewhere"),
    (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
     b"Sec-WebSocket-Protocol: mqtt\r\n\r\n", b"no STOMP subprotocol"),
    (b"\x16\x03\x01garbage\r\n\r\n", b"not a WebSocket upgrade"),
], ids=["no-upgrade", "wrong-path", "other-subprotocol", "garbage"])
def test_a_failed_upgrade_gets_http_400(ws_broker, request_bytes, reason):
    response = http_request(ws_broker.server.address_of("ws"), request_bytes)
    assert response.startswith(b"HTTP/1.1 400 "), response
    assert reason in response
    bystander = RawClient(ws_broker.address)
    bystander.connect("1.2")
    bystander.request("SEND", {"destination": "/topic/t"})


def test_an_upgrade_never_finished_counts_against_connect_timeout(start_broker):
    broker = start_broker(ws_port=0, connect_timeout=0.5)
    sock = socket.create_connection(broker.server.address_of("ws"), timeout=TIMEOUT)
    sock.sendall(b"GET /ws HTTP/1.1\r\n")           # and nothing more
    assert sock.recv(65536) == b""
    sock.close()
    late = WSClient(broker.server.address_of("ws"))     # upgraded, never CONNECTs
    assert "no CONNECT frame" in late.expect("ERROR").headers["message"]


def raw_websocket(address):
    """A socket upgraded to WebSocket by hand, for frames websocket-client will not send."""
    sock = socket.create_connection(address, timeout=TIMEOUT)
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                 b"Sec-WebSocket-Protocol: v12.stomp\r\n\r\n")
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101 "), response
    return sock


def close_code_of(sock):
    data = read_to_end(sock)
    assert data[:1] == b"\x88", data[:20]           # a close frame, unmasked
    return struct.unpack("!H", data[2:4])[0]


def test_malformed_and_oversized_websocket_frames_close_with_their_codes(ws_broker):
    unmasked = raw_websocket(ws_broker.server.address_of("ws"))
    unmasked.sendall(b"\x81\x05hello")              # a client frame must be masked
    assert close_code_of(unmasked) == 1002
    huge = raw_websocket(ws_broker.server.address_of("ws"))
    # A length far past the largest frame the limits allow: refused from its header on.
    huge.sendall(b"\x82\xff" + struct.pack("!Q", 1 << 40) + b"\0\0\0\0" + b"SEND\n")
    assert close_code_of(huge) == 1009
    bystander = WSClient(ws_broker.server.address_of("ws"))
    bystander.connect()


def test_stomp_over_websocket_over_tls(start_broker, pki):
    broker = start_broker(wss_port=0, tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    client = WSClient(broker.server.address_of("wss"), scheme="wss",
                      sslopt={"ca_certs": pki["ca"], "cert_reqs": ssl.CERT_REQUIRED})
    client.connect()
    client.request("SUBSCRIBE", {"destination": "/queue/secure", "id": "1"})
    client.send("SEND", {"destination": "/queue/secure"}, b"over wss")
    assert client.expect("MESSAGE").body == b"over wss"
    # The plain TCP port (the harness's port 0) is served beside it.
    assert broker.server.address_of("wss") != broker.address


def test_websocket_options_need_what_they_need():
    from test_cli import run_pymq
    result = run_pymq("--wss-port", "0")
    assert result.returncode == 2 and "wss-port needs --tls-cert and --tls-key" in result.stderr

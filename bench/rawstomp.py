"""A minimal STOMP 1.2 client on raw sockets, for the benchmark scripts (standard library only):
frame() encodes, FrameReader reads frames off a socket, stomp_connect() and wait_receipt() do
the two exchanges every script needs. Anything unexpected raises BenchError."""

import socket

RECV_SIZE = 256 * 1024


class BenchError(Exception):
    pass


def frame(command, headers, body=b""):
    lines = [command] + ["%s:%s" % kv for kv in headers]
    if body:
        lines.append("content-length:%d" % len(body))
    return ("\n".join(lines) + "\n\n").encode() + body + b"\0"


class FrameReader:
    """Reads frames from a socket: next() -> (command, headers, body)."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.pos = 0

    def _fill(self):
        data = self.sock.recv(RECV_SIZE)
        if not data:
            raise BenchError("broker closed the connection")
        self.buf = self.buf[self.pos:] + data
        self.pos = 0

    def next(self):
        while True:
            buf, pos = self.buf, self.pos
            n = len(buf)
            while pos < n and buf[pos] in (10, 13):          # heart-beats / frame trailers
                pos += 1
            self.pos = pos
            head_end = buf.find(b"\n\n", pos)
            if head_end < 0:
                self._fill()
                continue
            lines = buf[pos:head_end].decode().split("\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.rstrip("\r").partition(":")
                headers.setdefault(name, value)
            start = head_end + 2
            if "content-length" in headers:
                end = start + int(headers["content-length"])
                if len(buf) <= end:
                    self._fill()
                    continue
            else:
                end = buf.find(b"\0", start)
                if end < 0:
                    self._fill()
                    continue
            self.pos = end + 1
            command = lines[0].rstrip("\r")
            if command == "ERROR":
                raise BenchError("ERROR from broker: %s %r"
                                 % (headers.get("message"), buf[start:end][:200]))
            return command, headers, buf[start:end]


def stomp_connect(host, port, timeout):
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(frame("CONNECT", [("accept-version", "1.2"), ("host", "/"),
                                   ("heart-beat", "0,0")]))
    reader = FrameReader(sock)
    command, headers, _ = reader.next()
    if command != "CONNECTED" or headers.get("version") != "1.2":
        raise BenchError("unexpected answer to CONNECT: %s %r" % (command, headers))
    return sock, reader


def wait_receipt(reader, receipt_id):
    command, headers, _ = reader.next()
    if command != "RECEIPT" or headers.get("receipt-id") != receipt_id:
        raise BenchError("expected RECEIPT %s, got %s %r" % (receipt_id, command, headers))

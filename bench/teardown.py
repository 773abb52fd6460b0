#!/usr/bin/env python3
"""What a DISCONNECT costs the broker next to a round trip: N connections, each subscribed to
its own queue (client-individual, prefetch 1), first do R rounds of one round trip each (a
SEND with a receipt, its MESSAGE back, ACKed), then all send DISCONNECT with a receipt. Each
phase is pipelined (every connection's frame written, then every answer read) and reports the
broker's CPU (user, system) per connection, from /proc.

    python bench/teardown.py [--conns 5000] [--rounds 3] [--python PYTHON] [--pymq-arg ARG]

stompbench's `connections` scenario ends with every connection leaving within its last
interval, next to its last round trips: what that last second costs is one round trip plus
one DISCONNECT per connection (bench/README). The broker runs in its default durable
configuration (SQLite in a temporary directory) unless --pymq-arg says otherwise.
"""

import argparse
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

from broker_process import cpu_times, launch_broker, stop_broker     # bench/ is on sys.path
from rawstomp import BenchError, FrameReader, frame

def connect_all(port, n):
    conns = []
    for i in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        sock.sendall(frame("CONNECT", [("accept-version", "1.2"), ("host", "/"),
                                       ("heart-beat", "0,0")]))
        reader = FrameReader(sock)
        if reader.next()[0] != "CONNECTED":
            raise BenchError("connection %d: no CONNECTED" % i)
        sock.sendall(frame("SUBSCRIBE", [("id", "s"), ("destination", "/queue/teardown-%d" % i),
                                         ("ack", "client-individual"), ("prefetch-count", "1"),
                                         ("receipt", "sub")]))
        conns.append((sock, reader))
    for sock, reader in conns:
        if reader.next()[0] != "RECEIPT":
            raise BenchError("no RECEIPT for a SUBSCRIBE")
    return conns


def round_trip(conns):
    for i, (sock, _) in enumerate(conns):
        sock.sendall(frame("SEND", [("destination", "/queue/teardown-%d" % i),
                                    ("receipt", "sent")], b"x" * 100))
    for sock, reader in conns:
        seen = set()
        while seen != {"RECEIPT", "MESSAGE"}:
            command, headers, _ = reader.next()
            if command == "MESSAGE":
                sock.sendall(frame("ACK", [("id", headers["ack"])]))
            elif command != "RECEIPT":
                raise BenchError("unexpected %s" % command)
            seen.add(command)


def disconnect(conns):
    for sock, _ in conns:
        sock.sendall(frame("DISCONNECT", [("receipt", "bye")]))
    for sock, reader in conns:
        if reader.next()[0] != "RECEIPT":
            raise BenchError("no RECEIPT for a DISCONNECT")
        if sock.recv(1):
            raise BenchError("the broker did not close after the DISCONNECT's RECEIPT")
        sock.close()


def measure(pid, name, n, phase, conns):
    before, started = cpu_times(pid), time.monotonic()
    phase(conns)
    wall = time.monotonic() - started
    time.sleep(0.2)             # what the broker does after the last answer (closing sockets)
    user, system = (b - a for a, b in zip(before, cpu_times(pid)))
    print("%-12s %6d conns  %5.2f s  broker CPU %5.2f s (user %5.2f, system %5.2f)  "
          "%6.1f us per connection" % (name, n, wall, user + system, user, system,
                                        (user + system) / n * 1e6), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3, help="round trips before (3)")
    parser.add_argument("--python", default=sys.executable,
                        help="the broker's interpreter, words allowed (env VAR=... pypy3)")
    parser.add_argument("--pymq", default=os.path.join(ROOT, "pymq.py"))
    parser.add_argument("--pymq-arg", action="append", default=[])
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="pymq-teardown-")
    proc = None
    try:
        proc, port = launch_broker(
            shlex.split(args.python) + [args.pymq, "--port", "0", "--heart-beat", "0,0",
                                        "--max-connections", str(args.conns + 100),
                                        "--db", os.path.join(workdir, "pymq.db")]
            + args.pymq_arg, cwd=workdir)
        conns = connect_all(port, args.conns)
        for _ in range(args.rounds):
            measure(proc.pid, "round trip", args.conns, round_trip, conns)
        measure(proc.pid, "DISCONNECT", args.conns, disconnect, conns)
    finally:
        if proc is not None:
            stop_broker(proc)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

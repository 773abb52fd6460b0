#!/usr/bin/env python3
"""A deep queue: broker memory does not grow with the depth of a queue, and delivery starts
at once however deep it is.

    python bench/deep_queue.py [--msgs 5000000] [--drain 200000] [--port P]

Starts `python pymq.py` (SQLite in a temporary directory, default configuration; or uses the
broker on --port), preloads --msgs 100-byte messages into one queue, pipelined with a receipt
every 1,000, and prints the broker's RSS at each fifth of the way. Then a consumer subscribes
(client-individual, prefetch 100): the time to its first MESSAGE, then --drain messages
consumed with ACKs (rate, order checked, RSS). Standard library only.
"""

import argparse
import os
import signal
import tempfile
import time

from queue_backends import start_broker
from broker_process import find_listener_pid
from rawstomp import BenchError, frame, stomp_connect, wait_receipt

QUEUE = "/queue/deep"
CHUNK = 1000


def rss_mib(pid):
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def preload(port, pid, msgs):
    sock, reader = stomp_connect("127.0.0.1", port, 300)
    started = time.perf_counter()
    sent = 0
    while sent < msgs:
        n = min(CHUNK, msgs - sent)
        frames = [frame("SEND", [("destination", QUEUE)], b"%099d" % (sent + i))
                  for i in range(n - 1)]
        frames.append(frame("SEND", [("destination", QUEUE), ("receipt", "c")],
                            b"%099d" % (sent + n - 1)))
        sock.sendall(b"".join(frames))
        wait_receipt(reader, "c")
        sent += n
        if sent % (msgs // 5 or 1) < CHUNK or sent == msgs:
            elapsed = time.perf_counter() - started
            print("# %9d stored  %7.0f msgs/s  broker RSS %.1f MiB"
                  % (sent, sent / elapsed, rss_mib(pid)), flush=True)
    sock.close()
    return time.perf_counter() - started


def drain(port, pid, count):
    sock, reader = stomp_connect("127.0.0.1", port, 300)
    started = time.perf_counter()
    sock.sendall(frame("SUBSCRIBE", [("id", "d"), ("destination", QUEUE),
                                     ("ack", "client-individual"), ("prefetch", "100")]))
    first = None
    expected = 0
    acks = []
    while expected < count:
        command, headers, body = reader.next()
        if command != "MESSAGE":
            raise BenchError("expected MESSAGE, got %s %r" % (command, headers))
        if first is None:
            first = time.perf_counter() - started
        if int(body) != expected:
            raise BenchError("out of order: got %d, expected %d" % (int(body), expected))
        expected += 1
        acks.append(frame("ACK", [("id", headers["ack"])]))
        if len(acks) >= 50 or expected == count:
            sock.sendall(b"".join(acks))
            acks = []
    elapsed = time.perf_counter() - started
    sock.close()
    return first, elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--msgs", type=int, default=5000000)
    parser.add_argument("--drain", type=int, default=200000)
    parser.add_argument("--port", type=int, help="use the broker running there")
    args = parser.parse_args()
    proc = None
    if args.port:
        port = args.port
    else:
        workdir = tempfile.mkdtemp(prefix="pymq-deep-")
        proc, port = start_broker(os.path.join(workdir, "pymq.db"), workdir)
    try:
        pid = find_listener_pid(port) or proc.pid
        start_rss = rss_mib(pid)
        print("# broker RSS before: %.1f MiB" % start_rss, flush=True)
        preload_s = preload(port, pid, args.msgs)
        loaded_rss = rss_mib(pid)
        first, drain_s = drain(port, pid, min(args.drain, args.msgs))
        print("deep-queue msgs=%d preload_per_s=%.0f rss_mib_before=%.1f rss_mib_loaded=%.1f "
              "bytes_per_queued_msg=%.1f first_message_ms=%.1f drained=%d drain_per_s=%.0f "
              "rss_mib_after_drain=%.1f in_order=yes"
              % (args.msgs, args.msgs / preload_s, start_rss, loaded_rss,
                 (loaded_rss - start_rss) * 1048576 / args.msgs, first * 1000,
                 min(args.drain, args.msgs), min(args.drain, args.msgs) / drain_s,
                 rss_mib(pid)), flush=True)
        return 0
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(300)


if __name__ == "__main__":
    raise SystemExit(main())

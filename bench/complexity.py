#!/usr/bin/env python3
"""Complexity: a topic SEND, a SUBSCRIBE and an ACK cost the same with 10 or 1,000,000 other
subscriptions (ocamlmq's README table, measured).

    python bench/complexity.py [--conns 100] [--per-conn 10000] [--rounds 5] [--ops 1000]

Starts `python pymq.py` (SQLite in a temporary directory, default configuration), then times,
over real sockets, one operation after another (each waits for its answer):

- topic SEND: a SEND with a receipt to a topic with 10 subscribers (the RECEIPT comes after
  the fan-out), each subscriber draining its socket in a thread;
- SUBSCRIBE: a SUBSCRIBE then an UNSUBSCRIBE with receipts, to a fresh topic or queue;
- ACK: a consumer holding 100 queue messages ACKs them all (pipelined), then asks for a
  receipt on a control SEND, answered only after the ACKs: ACK handling time per message.

It measures each with 10 other subscriptions, then adds --conns x --per-conn more (a third
each of exact topics, topic prefixes and queues, each on a name of its own) and measures
again. Each figure is the median over --rounds rounds. It prints a table with the ratio, the
broker's RSS, and `status=ok` when every ratio is within 1.2 (exit 1 otherwise).
"""

import argparse
import os
import selectors
import signal
import statistics
import tempfile
import threading
import time

from queue_backends import start_broker
from broker_process import find_listener_pid
from rawstomp import BenchError, frame, stomp_connect, wait_receipt

HOST = "127.0.0.1"
TOPIC = "/topic/probe.topic.with.a.longish.name"
BODY = b"x" * 100


def connect(port):
    return stomp_connect(HOST, port, 120)


def add_subscriptions(port, conns, per_conn, tag):
    """`conns` connections with `per_conn` subscriptions each; returns their sockets."""
    socks = []
    for c in range(conns):
        sock, reader = connect(port)
        frames = []
        for i in range(per_conn):
            name = "other.%s.%d.%d" % (tag, c, i)
            destination = ("/topic/" + name, "/topic/" + name + ".*", "/queue/" + name)[i % 3]
            headers = [("id", "o%d" % i), ("destination", destination)]
            if i == per_conn - 1:
                headers.append(("receipt", "done"))
            frames.append(frame("SUBSCRIBE", headers))
        sock.sendall(b"".join(frames))
        wait_receipt(reader, "done")
        socks.append(sock)
    return socks


def time_topic_send(port, ops):
    """Microseconds per SEND (with receipt) to a topic with 10 subscribers."""
    socks = []
    for k in range(10):
        sock, reader = connect(port)
        sock.sendall(frame("SUBSCRIBE", [("id", "p"), ("destination", TOPIC),
                                         ("receipt", "s")]))
        wait_receipt(reader, "s")
        socks.append(sock)
    counts = {sock: 0 for sock in socks}

    def drain():
        # One thread for the ten subscribers (ten would fight the publisher for the GIL):
        # each frame ends with a NUL, and the body has none.
        selector = selectors.DefaultSelector()
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + 120
        while min(counts.values()) < ops and time.monotonic() < deadline:
            for key, _ in selector.select(1.0):
                data = key.fileobj.recv(1 << 16)
                if not data:
                    return
                counts[key.fileobj] += data.count(b"\0")
        selector.close()

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    pub, pub_reader = connect(port)
    started = time.perf_counter()
    for i in range(ops):
        pub.sendall(frame("SEND", [("destination", TOPIC), ("receipt", "r")], BODY))
        wait_receipt(pub_reader, "r")
    elapsed = time.perf_counter() - started
    thread.join(130)
    if min(counts.values()) != ops:
        raise BenchError("topic subscribers did not get every message: %r"
                         % sorted(counts.values()))
    for sock in socks + [pub]:
        sock.close()
    return elapsed / ops * 1e6


def time_subscribe(port, ops, tag):
    """Microseconds per SUBSCRIBE or UNSUBSCRIBE (with receipt), topics and queues."""
    sock, reader = connect(port)
    started = time.perf_counter()
    for i in range(ops):
        kind = "topic" if i % 2 else "queue"
        sock.sendall(frame("SUBSCRIBE", [("id", "x"), ("receipt", "s"),
                                         ("destination", "/%s/sub.%s.%d" % (kind, tag, i))]))
        wait_receipt(reader, "s")
        sock.sendall(frame("UNSUBSCRIBE", [("id", "x"), ("receipt", "u")]))
        wait_receipt(reader, "u")
    elapsed = time.perf_counter() - started
    sock.close()
    return elapsed / (2 * ops) * 1e6


def time_ack(port, ops, tag, window=100):
    """Microseconds per ACK handled: a consumer ACKs the `window` messages it holds (the
    default --max-prefetch) in one write, `ops` messages in all."""
    queue = "/queue/ack.%s" % tag
    consumer, consumer_reader = connect(port)
    consumer.sendall(frame("SUBSCRIBE", [("id", "c"), ("destination", queue), ("receipt", "s"),
                                         ("ack", "client-individual"),
                                         ("prefetch", str(window))]))
    wait_receipt(consumer_reader, "s")
    producer, producer_reader = connect(port)
    producer.sendall(b"".join(frame("SEND", [("destination", queue)], BODY)
                              for _ in range(ops - 1))
                     + frame("SEND", [("destination", queue), ("receipt", "sent")], BODY))
    wait_receipt(producer_reader, "sent")
    elapsed = 0.0
    held = []           # ack ids of the messages the consumer holds
    for _ in range(ops // window):
        while len(held) < window:
            command, headers, _ = consumer_reader.next()
            if command == "MESSAGE":
                held.append(headers["ack"])
        acks = [frame("ACK", [("id", ack)]) for ack in held]
        acks.append(frame("SEND", [("destination", "/control/count-subscribers/topic/none"),
                                   ("receipt", "acked")]))
        held = []
        started = time.perf_counter()
        consumer.sendall(b"".join(acks))
        while True:     # the next messages may come before the RECEIPT
            command, headers, _ = consumer_reader.next()
            if command == "MESSAGE":
                held.append(headers["ack"])
            elif command == "RECEIPT" and headers.get("receipt-id") == "acked":
                break
            else:
                raise BenchError("unexpected %s %r" % (command, headers))
        elapsed += time.perf_counter() - started
    consumer.close()
    producer.close()
    return elapsed / (ops // window * window) * 1e6


def measure(port, rounds, ops, phase):
    figures = {"topic SEND, 10 subscribers": [], "SUBSCRIBE / UNSUBSCRIBE": [], "ACK": []}
    for r in range(rounds):
        tag = "%s-%d" % (phase, r)
        figures["topic SEND, 10 subscribers"].append(time_topic_send(port, ops))
        figures["SUBSCRIBE / UNSUBSCRIBE"].append(time_subscribe(port, ops, tag))
        figures["ACK"].append(time_ack(port, ops, tag))
    return {name: statistics.median(values) for name, values in figures.items()}


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=100)
    parser.add_argument("--per-conn", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", type=int, default=1000)
    args = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="pymq-complexity-")
    proc, port = start_broker(os.path.join(workdir, "pymq.db"), workdir)
    try:
        pid = find_listener_pid(port) or proc.pid
        few = add_subscriptions(port, 1, 10, "few")
        before = measure(port, args.rounds, args.ops, "few")
        rss_before = rss_kib(pid)
        started = time.perf_counter()
        many = add_subscriptions(port, args.conns, args.per_conn, "many")
        added = args.conns * args.per_conn
        print("# added %d subscriptions in %.1f s; broker RSS %d -> %d MiB"
              % (added, time.perf_counter() - started, rss_before // 1024,
                 rss_kib(pid) // 1024), flush=True)
        after = measure(port, args.rounds, args.ops, "many")
        ok = True
        print("| operation (median of %d rounds of %d) | with 10 others | with %s others "
              "| ratio |" % (args.rounds, args.ops, format(added + 10, ",")))
        print("|---|---:|---:|---:|")
        for name in before:
            ratio = after[name] / before[name]
            ok = ok and ratio <= 1.2
            print("| %s | %.1f µs | %.1f µs | %.2f |" % (name, before[name], after[name], ratio))
        print("status=%s" % ("ok" if ok else "slower"), flush=True)
        for sock in few + many:
            sock.close()
        return 0 if ok else 1
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(120)


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""Topic fan-out benchmark for pymq (standard library only: raw sockets and threads).

S subscribers (STOMP 1.2, ack:auto) subscribe to /topic/bench; one publisher sends N messages
of SIZE bytes, asking for a receipt every R messages with at most W receipts outstanding, so
that it cannot overrun the broker. The run waits until every subscriber has received all N
messages (or --timeout passes), then prints the publish rate, the delivery rate
(N*S / time from the first SEND to the last delivery), the broker's RSS and CPU before and
after, and per-subscriber counts. Every body carries its sequence number: subscribers check
that nothing is lost, duplicated or reordered.

Without --port it starts `python pymq.py --port 0 --heart-beat 0,0` (the pymq.py next to this
folder, or --pymq PATH) and stops it at the end; with --port it uses a broker already running
there. Exit status: 0 when every subscriber got every message exactly once and in order,
1 otherwise (loss, duplicates, timeout, protocol error), 2 when the set-up failed.

    python bench/topic_fanout.py                              # 10 subscribers, 20000 x 100 B
    python bench/topic_fanout.py --msgs 50000 --subscribers 20 --size 1000
    python bench/topic_fanout.py --port 61630                 # an existing broker
"""

import argparse
import os
import socket
import sys
import threading
import time

from broker_process import broker_stats, find_listener_pid, launch_broker, stop_broker
from rawstomp import BenchError, frame, stomp_connect, wait_receipt

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PYMQ = os.path.join(os.path.dirname(HERE), "pymq.py")
DESTINATION = "/topic/bench"


# -- subscribers and publisher --------------------------------------------------------------

class Subscriber(threading.Thread):
    def __init__(self, index, args, deadline):
        super().__init__(name="sub-%d" % index, daemon=True)
        self.index, self.args, self.deadline = index, args, deadline
        self.received = self.duplicates = self.gaps = self.bad = 0
        self.last_at = None
        self.error = None
        self.ready = threading.Event()

    def run(self):
        sock = None
        try:
            sock, reader = stomp_connect(self.args.host, self.args.port, self.args.timeout)
            sock.sendall(frame("SUBSCRIBE", [("id", "0"), ("destination", DESTINATION),
                                             ("ack", "auto"), ("receipt", "sub")]))
            wait_receipt(reader, "sub")
            self.ready.set()
            self._receive(sock, reader)
        except socket.timeout:
            self.error = "timed out with %d of %d messages" % (self.received, self.args.msgs)
        except (OSError, BenchError, ValueError) as error:
            self.error = str(error)
        finally:
            self.ready.set()
            if sock is not None:
                try:
                    sock.sendall(frame("DISCONNECT", []))
                except OSError:
                    pass
                sock.close()

    def _receive(self, sock, reader):
        # The hot loop, kept cheap so that the client is not the bottleneck: MESSAGE frames
        # are parsed in place (content-length found by a byte search), one clock read per
        # recv(); anything else goes through FrameReader.next(), which raises on ERROR.
        expected, total, size = 0, self.args.msgs, self.args.size
        buf, pos = reader.buf, reader.pos
        now = time.monotonic()
        while expected < total:
            while pos < len(buf) and buf[pos] in (10, 13):       # frame trailers
                pos += 1
            head_end = buf.find(b"\n\n", pos)
            if buf.startswith(b"MESSAGE\n", pos) and head_end >= 0:
                cl = buf.rfind(b"\ncontent-length:", pos, head_end)
                if cl < 0:
                    raise BenchError("MESSAGE without content-length")
                start = head_end + 2
                end = start + int(buf[cl + 16:buf.find(b"\n", cl + 16)])
                if end < len(buf):
                    pos = end + 1
                    if end - start != size:
                        self.bad += 1
                    try:
                        seq = int(buf[start:start + 10])
                    except ValueError:
                        self.bad += 1
                        continue
                    if seq == expected:
                        self.received += 1
                        expected += 1
                        self.last_at = now
                    elif seq < expected:
                        self.duplicates += 1
                    else:                      # a gap: the messages in it are lost
                        self.gaps += 1
                        self.received += 1
                        expected = seq + 1
                        self.last_at = now
                    continue
            elif head_end >= 0:
                reader.buf, reader.pos = buf, pos
                command, headers, _ = reader.next()
                raise BenchError("unexpected %s frame %r" % (command, headers))
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout()
            sock.settimeout(remaining)
            reader.buf, reader.pos = buf, pos
            reader._fill()
            buf, pos = reader.buf, reader.pos
            now = time.monotonic()
        reader.buf, reader.pos = buf, pos


def publish(args, deadline):
    """Send the messages. Returns (first_send_at, last_receipt_at, messages sent, error)."""
    sock, reader = stomp_connect(args.host, args.port, args.timeout)
    pad = b"x" * max(0, args.size - 11)
    send_head = ("SEND\ndestination:%s\ncontent-length:%d\n" % (DESTINATION, args.size)).encode()
    outstanding = []                     # receipt ids, oldest first
    batch = []
    sent, error = 0, None
    first_at = time.monotonic()
    try:
        for seq in range(args.msgs):
            body = (b"%010d|" % seq + pad)[:args.size]
            if (seq + 1) % args.receipt_every and seq + 1 < args.msgs:
                batch.append(send_head + b"\n" + body + b"\0")
                continue
            receipt = "r%d" % seq
            batch.append(send_head + b"receipt:" + receipt.encode() + b"\n\n" + body + b"\0")
            sock.sendall(b"".join(batch))
            sent += len(batch)
            batch.clear()
            outstanding.append(receipt)
            while len(outstanding) > args.window or (outstanding and seq + 1 == args.msgs):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout()
                sock.settimeout(remaining)
                wait_receipt(reader, outstanding.pop(0))
    except socket.timeout:
        error = "publisher timed out after sending %d of %d messages" % (sent, args.msgs)
    except (OSError, BenchError) as exc:
        error = "publisher: %s" % exc
    finally:
        try:
            sock.sendall(frame("DISCONNECT", []))
        except OSError:
            pass
        sock.close()
    return first_at, time.monotonic(), sent, error


# -- the broker process ---------------------------------------------------------------------

def start_broker(args):
    return launch_broker([sys.executable, args.pymq, "--host", args.host, "--port", "0",
                          "--heart-beat", "0,0"])


def fmt_kib(kib):
    return "?" if kib is None else "%.1f MiB" % (kib / 1024.0)


# -- main -----------------------------------------------------------------------------------

def run(args):
    deadline = time.monotonic() + args.timeout
    pid = args.broker_pid or find_listener_pid(args.port)
    subs = [Subscriber(i, args, deadline) for i in range(args.subscribers)]
    for sub in subs:
        sub.start()
    for sub in subs:
        sub.ready.wait(max(0.1, deadline - time.monotonic()))
    failed = [s for s in subs if s.error or not s.ready.is_set()]
    if failed:
        raise BenchError("subscriber %s: %s" % (failed[0].name, failed[0].error or "not ready"))
    rss_before, cpu_before = broker_stats(pid)
    client_before = os.times()

    first_at, published_at, sent, pub_error = publish(args, deadline)
    for sub in subs:
        sub.join(max(0.1, deadline - time.monotonic()))
    timed_out = any(sub.is_alive() for sub in subs)
    end = time.monotonic()
    rss_after, cpu_after = broker_stats(pid)
    client_after = os.times()

    lasts = [s.last_at for s in subs if s.last_at is not None]
    last_delivery = max(lasts) if lasts else end
    received = sum(s.received for s in subs)
    expected = args.msgs * args.subscribers
    lost = expected - received
    dups = sum(s.duplicates for s in subs)
    gaps = sum(s.gaps for s in subs)
    bad = sum(s.bad for s in subs)
    publish_s = published_at - first_at
    deliver_s = last_delivery - first_at
    client_cpu = ((client_after.user + client_after.system)
                  - (client_before.user + client_before.system))
    broker_cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before

    print("# pymq topic fan-out: %d subscribers, %d messages of %d bytes, receipt every %d, "
          "window %d, broker pid %s on port %d"
          % (args.subscribers, args.msgs, args.size, args.receipt_every, args.window,
             pid if pid is not None else "?", args.port))
    print("published      %d msgs in %.3f s: %.0f msgs/s" % (sent, publish_s,
                                                            sent / max(publish_s, 1e-9)))
    print("delivered      %d of %d in %.3f s: %.0f deliveries/s"
          % (received, expected, deliver_s, received / deliver_s if deliver_s > 0 else 0))
    print("per subscriber min %d max %d" % (min(s.received for s in subs),
                                            max(s.received for s in subs)))
    print("missing %d, duplicates %d, gaps %d, bad %d%s"
          % (lost, dups, gaps, bad, ", TIMED OUT" if timed_out else ""))
    print("broker RSS     before %s, after %s" % (fmt_kib(rss_before), fmt_kib(rss_after)))
    print("broker CPU     %s; client CPU %.2f s (%.0f%% of the delivery time)"
          % ("?" if broker_cpu is None else "%.2f s (%.0f%% of one core)"
             % (broker_cpu, 100 * broker_cpu / max(deliver_s, 1e-9)),
             client_cpu, 100 * client_cpu / max(deliver_s, 1e-9)))
    if pub_error:
        print(pub_error)
    for sub in subs:
        if sub.error:
            print("subscriber %s: %s" % (sub.name, sub.error))
    ok = lost == 0 and dups == 0 and gaps == 0 and bad == 0 and not timed_out \
        and not pub_error and not any(s.error for s in subs)
    print("status=%s" % ("ok" if ok else "FAILED"))
    return 0 if ok else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--msgs", type=int, default=20000, help="messages to publish (20000)")
    parser.add_argument("--subscribers", type=int, default=10, help="subscribers (10)")
    parser.add_argument("--size", type=int, default=100, help="body size in bytes, >= 11 (100)")
    parser.add_argument("--receipt-every", type=int, default=100,
                        help="ask for a receipt every N messages (100)")
    parser.add_argument("--window", type=int, default=2,
                        help="receipts outstanding before the publisher waits (2)")
    parser.add_argument("--port", type=int, default=None,
                        help="use the broker already listening on this port (default: start one)")
    parser.add_argument("--host", default="127.0.0.1", help="broker address (127.0.0.1)")
    parser.add_argument("--broker-pid", type=int, default=None,
                        help="PID for RSS/CPU with --port (default: the process listening there)")
    parser.add_argument("--pymq", default=DEFAULT_PYMQ, help="pymq.py to start (%(default)s)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="bound on the whole run, seconds (120)")
    args = parser.parse_args(argv)
    if args.msgs < 1 or args.subscribers < 1 or args.size < 11 or args.receipt_every < 1 \
            or args.window < 1:
        parser.error("--msgs, --subscribers, --receipt-every, --window must be >= 1, --size >= 11")

    proc = None
    try:
        if args.port is None:
            proc, args.port = start_broker(args)
            args.broker_pid = proc.pid
        return run(args)
    except (BenchError, OSError) as error:
        print("topic_fanout: %s" % error, file=sys.stderr)
        print("status=FAILED")
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if proc is not None:
            stop_broker(proc)


if __name__ == "__main__":
    sys.exit(main())

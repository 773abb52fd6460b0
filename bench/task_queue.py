#!/usr/bin/env python3
"""Task-queue semantics under load: delayed delivery, poison messages, de-duplication.

    python bench/task_queue.py delayed [--msgs 1000000] [--spread 10] [--lead 60]
    python bench/task_queue.py poison  [--msgs 100000] [--max-redeliveries 2] [--consumers 4]
    python bench/task_queue.py dedup   [--msgs 100000]

Each starts `python pymq.py` on a fresh store (SQLite in a temporary directory, or --db URL),
runs one scenario over raw sockets and prints `# ` lines for people and one `key=value`
summary line ending in status=ok (exit 0) or status=FAILED (exit 1).

- delayed: a consumer (ack:auto) subscribes to /queue/delayed; a producer SENDs --msgs
  messages with deliver-at spread evenly over --spread seconds, starting --lead seconds after
  the first SEND (enough to store them all first: the script fails if it was not). Figures:
  SEND rate; the broker's RSS before, once every message is stored, and at most while they
  fall due (its growth is what a million delayed messages cost); lateness (arrival at the
  consumer minus deliver-at) p50/p99/max; every message delivered exactly once, none early.
- poison: --msgs messages are stored, then --consumers consumers NACK every delivery until
  each has been delivered --max-redeliveries + 1 times and dead-lettered to /queue/DLQ.poison,
  where one consumer takes them. Figures: NACKs/s (from the first delivery to the last dead
  letter), every message in the DLQ once with its headers, none left in /queue/poison.
- dedup: --msgs SENDs with dedup-id k<i>, each receipted, then the same --msgs again with the
  same keys and other bodies. Figures: the SEND rates of both passes; count-msgs must say
  --msgs, and a drain must find the first pass's bodies only.
Standard library only.
"""

import argparse
import os
import sys
import tempfile
import threading
import time

from broker_process import broker_stats, launch_broker, stop_broker
from rawstomp import BenchError, frame, stomp_connect, wait_receipt
from stompload import percentile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 1000            # SENDs per receipt
RECV = 1 << 20


def now_ms():
    return time.time_ns() // 1000000


class Frames:
    """A fast reader of the frames a consumer gets: bodies never hold a NUL here, so frames are
    split on NUL bytes. next_batch() -> [(command, header block, body)], arrival time."""

    def __init__(self, sock, reader):
        self.sock = sock
        self.rest = reader.buf[reader.pos:]     # what the CONNECTED read took in too

    def next_batch(self):
        while True:
            data = self.rest if self.rest and b"\0" in self.rest else self.rest + self._recv()
            arrived = time.time_ns() // 1000000
            pieces = data.split(b"\0")
            self.rest = pieces.pop()
            if not pieces:
                continue
            batch = []
            for piece in pieces:
                piece = piece.lstrip(b"\r\n")
                head, _, body = piece.partition(b"\n\n")
                command, _, headers = head.partition(b"\n")
                if command == b"ERROR":
                    raise BenchError("ERROR from broker: %r" % piece[:300])
                batch.append((command, headers, body))
            return batch, arrived

    def _recv(self):
        data = self.sock.recv(RECV)
        if not data:
            raise BenchError("broker closed the connection")
        return data


def header(headers, name):
    """The value of header `name` in a raw header block (bytes), or None."""
    key = b"\n" + name + b":"
    block = b"\n" + headers
    start = block.find(key)
    if start < 0:
        return None
    start += len(key)
    end = block.find(b"\n", start)
    return block[start:] if end < 0 else block[start:end]


def send_all(port, destination, count, make, timeout):
    """SEND `count` messages, make(i) -> (extra headers, body), a receipt every CHUNK with two
    chunks outstanding. Returns the seconds it took."""
    sock, reader = stomp_connect("127.0.0.1", port, timeout)
    started = time.perf_counter()
    outstanding = []
    for first in range(0, count, CHUNK):
        n = min(CHUNK, count - first)
        frames = []
        for i in range(first, first + n):
            extra, body = make(i)
            headers = [("destination", destination)] + extra
            if i == first + n - 1:
                headers.append(("receipt", "c%d" % first))
            frames.append(frame("SEND", headers, body))
        sock.sendall(b"".join(frames))
        outstanding.append("c%d" % first)
        if len(outstanding) == 2:
            wait_receipt(reader, outstanding.pop(0))
    for receipt in outstanding:
        wait_receipt(reader, receipt)
    seconds = time.perf_counter() - started
    sock.close()
    return seconds


def count_msgs(port, queue):
    """(num-messages, num-delayed) of `queue`."""
    sock, reader = stomp_connect("127.0.0.1", port, 60)
    sock.sendall(frame("SEND", [("destination", "/control/count-msgs/queue/" + queue),
                                ("receipt", "n")]))
    command, headers, _ = reader.next()
    sock.close()
    if command != "RECEIPT":
        raise BenchError("count-msgs: %s %r" % (command, headers))
    return int(headers["num-messages"]), int(headers.get("num-delayed", 0))


class RssWatch(threading.Thread):
    """Samples the broker's RSS (KiB) every 0.1 s; peak() since the last reset()."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid = pid
        self.top = 0
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(0.1):
            rss = broker_stats(self.pid)[0] or 0
            self.top = max(self.top, rss)

    def reset(self):
        self.top = broker_stats(self.pid)[0] or 0

    def peak(self):
        return max(self.top, broker_stats(self.pid)[0] or 0)


def mib(kib):
    return kib / 1024.0


# -- delayed ------------------------------------------------------------------------------------

def delayed(args, port, pid, watch):
    n, spread_ms = args.msgs, int(args.spread * 1000)
    sock, reader = stomp_connect("127.0.0.1", port, 60)
    sock.sendall(frame("SUBSCRIBE", [("id", "d"), ("destination", "/queue/delayed"),
                                     ("ack", "auto")]))
    frames = Frames(sock, reader)
    seen = bytearray(n)
    lateness = []
    problems = {"duplicates": 0, "early": 0}
    by_second = {}          # second of the spread -> lateness of the messages due in it
    done = threading.Event()
    failure = []

    def consume():
        try:
            got = 0
            while got < n:
                batch, arrived = frames.next_batch()
                for command, _, body in batch:
                    if command != b"MESSAGE":
                        continue
                    index, due = body.split(b" ")
                    index = int(index)
                    if seen[index]:
                        problems["duplicates"] += 1
                        continue
                    seen[index] = 1
                    got += 1
                    late = arrived - int(due)
                    if late < 0:
                        problems["early"] += 1
                    lateness.append(late)
                    by_second.setdefault((int(due) - start) // 1000, []).append(late)
        except Exception as error:         # reported by the main thread
            failure.append(error)
        finally:
            done.set()

    rss_before = broker_stats(pid)[0]
    start = now_ms() + int(args.lead * 1000)
    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    step = spread_ms / n

    def make(i):
        due = start + int(i * step)
        return [("deliver-at", str(due))], b"%d %d" % (i, due)

    print("# storing %d messages due from %.0f s to %.0f s from now"
          % (n, args.lead, args.lead + args.spread), flush=True)
    send_s = send_all(port, "/queue/delayed", n, make, 600)
    stored_at = now_ms()
    if stored_at >= start:
        raise BenchError("storing took %.1f s, longer than --lead %.0f s: raise --lead"
                         % (send_s, args.lead))
    messages, waiting = count_msgs(port, "delayed")
    rss_stored = broker_stats(pid)[0]
    print("# stored at %.0f msgs/s; count-msgs %d, num-delayed %d; broker RSS %.1f MiB "
          "(%.1f before)" % (n / send_s, messages, waiting, mib(rss_stored), mib(rss_before)),
          flush=True)
    if (messages, waiting) != (n, n) or lateness:
        raise BenchError("before any is due: count-msgs %d, num-delayed %d, %d delivered"
                         % (messages, waiting, len(lateness)))
    watch.reset()
    time.sleep(max(0.0, (start - now_ms()) / 1000.0))
    done.wait(args.spread + 120)
    if failure:
        raise failure[0]
    rss_peak = watch.peak()
    missing = n - sum(seen)
    for second, lates in sorted(by_second.items()):
        lates.sort()
        print("#   due in second %d: %d messages, lateness p50 %d ms, p99 %d ms"
              % (second, len(lates), percentile(lates, 0.5), percentile(lates, 0.99)))
    lateness.sort()
    growth = mib(max(rss_peak, rss_stored) - rss_before)
    ok = (missing == 0 and not problems["duplicates"] and not problems["early"]
          and growth < 50 and percentile(lateness, 0.99) < 100)
    print("delayed msgs=%d spread_s=%g send_per_s=%.0f rss_mib_before=%.1f rss_mib_stored=%.1f "
          "rss_mib_peak_due=%.1f rss_growth_mib=%.1f late_ms_p50=%d late_ms_p99=%d "
          "late_ms_max=%d delivered=%d missing=%d duplicates=%d early=%d status=%s"
          % (n, args.spread, n / send_s, mib(rss_before), mib(rss_stored), mib(rss_peak),
             growth, percentile(lateness, 0.5), percentile(lateness, 0.99),
             lateness[-1] if lateness else -1, len(lateness), missing,
             problems["duplicates"], problems["early"], "ok" if ok else "FAILED"), flush=True)
    sock.close()
    return ok


# -- poison -------------------------------------------------------------------------------------

def poison(args, port, pid, watch):
    n, limit = args.msgs, args.max_redeliveries
    print("# storing %d messages" % n, flush=True)
    send_all(port, "/queue/poison", n, lambda i: ([], b"%d" % i), 600)
    dead = bytearray(n)
    dead_count = [0]
    wrong = []
    nacks = [0] * args.consumers
    first_delivery = []
    finished = threading.Event()
    failure = []

    def dead_letters():
        try:
            sock, reader = stomp_connect("127.0.0.1", port, 60)
            sock.sendall(frame("SUBSCRIBE", [("id", "dlq"), ("destination", "/queue/DLQ.poison"),
                                             ("ack", "auto")]))
            frames = Frames(sock, reader)
            while dead_count[0] < n:
                batch, _ = frames.next_batch()
                for command, headers, body in batch:
                    if command != b"MESSAGE":
                        continue
                    index = int(body)
                    if dead[index]:
                        wrong.append("twice in the DLQ: %d" % index)
                        continue
                    dead[index] = 1
                    dead_count[0] += 1
                    if (header(headers, b"dead-letter-reason") != b"max-redeliveries"
                            or header(headers, b"original-redelivery-count") != b"%d" % limit
                            or header(headers, b"original-destination") != b"/queue/poison"):
                        wrong.append(headers.decode()[:300])
            finished.set()
            sock.close()
        except Exception as error:
            failure.append(error)
            finished.set()

    def nacker(number):
        try:
            sock, reader = stomp_connect("127.0.0.1", port, 60)
            sock.sendall(frame("SUBSCRIBE", [("id", "p"), ("destination", "/queue/poison"),
                                             ("ack", "client-individual"), ("prefetch", "100")]))
            frames = Frames(sock, reader)
            while not finished.is_set():
                sock.settimeout(0.5)
                try:
                    batch, _ = frames.next_batch()
                except OSError:
                    continue
                if not first_delivery:
                    first_delivery.append(time.perf_counter())
                out = [frame("NACK", [("id", header(headers, b"ack").decode())])
                       for command, headers, _ in batch if command == b"MESSAGE"]
                nacks[number] += len(out)
                sock.sendall(b"".join(out))
            sock.close()
        except Exception as error:
            failure.append(error)
            finished.set()

    threads = [threading.Thread(target=dead_letters, daemon=True)]
    threads += [threading.Thread(target=nacker, args=(i,), daemon=True)
                for i in range(args.consumers)]
    for t in threads:
        t.start()
    finished.wait(args.timeout)
    ended = time.perf_counter()
    for t in threads:
        t.join(5)
    if failure:
        raise failure[0]
    if not finished.is_set():
        raise BenchError("only %d of %d dead-lettered within %g s"
                         % (dead_count[0], n, args.timeout))
    seconds = ended - first_delivery[0]
    total = sum(nacks)
    left = count_msgs(port, "poison")
    ok = (dead_count[0] == n and not wrong and left == (0, 0) and total == n * (limit + 1))
    print("poison msgs=%d max_redeliveries=%d consumers=%d nacks=%d seconds=%.1f "
          "nacks_per_s=%.0f dead_lettered=%d wrong=%d left_in_queue=%d rss_mib_peak=%.1f "
          "status=%s" % (n, limit, args.consumers, total, seconds, total / seconds,
                         dead_count[0], len(wrong), left[0], mib(watch.peak()),
                         "ok" if ok else "FAILED"), flush=True)
    for line in wrong[:5]:
        print("#   wrong: %s" % line)
    return ok


# -- dedup --------------------------------------------------------------------------------------

def dedup(args, port, pid, watch):
    n = args.msgs
    first_s = send_all(port, "/queue/dedup", n,
                       lambda i: ([("dedup-id", "k%d" % i)], b"first %d" % i), 600)
    print("# first pass: %.0f SENDs/s" % (n / first_s), flush=True)
    again_s = send_all(port, "/queue/dedup", n,
                       lambda i: ([("dedup-id", "k%d" % i)], b"again %d" % i), 600)
    print("# second pass (all duplicates): %.0f SENDs/s" % (n / again_s), flush=True)
    stored = count_msgs(port, "dedup")[0]
    sock, reader = stomp_connect("127.0.0.1", port, 60)
    sock.sendall(frame("SUBSCRIBE", [("id", "d"), ("destination", "/queue/dedup"),
                                     ("ack", "auto")]))
    frames = Frames(sock, reader)
    bodies = wrong = 0
    sock.settimeout(10.0)
    try:
        while bodies < stored:
            batch, _ = frames.next_batch()
            for command, _, body in batch:
                if command == b"MESSAGE":
                    bodies += 1
                    wrong += not body.startswith(b"first ")
    except OSError:
        pass                    # stopped coming: the summary says how many came
    sock.close()
    ok = stored == n and bodies == n and not wrong
    print("dedup msgs=%d sends=%d first_pass_per_s=%.0f second_pass_per_s=%.0f stored=%d "
          "drained=%d not_first=%d rss_mib_peak=%.1f status=%s"
          % (n, 2 * n, n / first_s, n / again_s, stored, bodies, wrong, mib(watch.peak()),
             "ok" if ok else "FAILED"), flush=True)
    return ok


SCENARIOS = {"delayed": delayed, "poison": poison, "dedup": dedup}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--msgs", type=int, help="1000000 (delayed) or 100000")
    parser.add_argument("--spread", type=float, default=10.0,
                        help="delayed: seconds over which they fall due (10)")
    parser.add_argument("--lead", type=float, default=60.0,
                        help="delayed: seconds from the first SEND to the first due time (60)")
    parser.add_argument("--max-redeliveries", type=int, default=2, help="poison (2)")
    parser.add_argument("--consumers", type=int, default=4, help="poison: NACKing consumers")
    parser.add_argument("--db", help="the broker's store (default: SQLite in a temp dir)")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    if args.msgs is None:
        args.msgs = 1000000 if args.scenario == "delayed" else 100000
    workdir = tempfile.mkdtemp(prefix="pymq-task-queue-")
    command = [sys.executable, os.path.join(ROOT, "pymq.py"), "--port", "0",
               "--heart-beat", "0,0", "--db", args.db or os.path.join(workdir, "pymq.db")]
    if args.scenario == "poison":
        command += ["--max-redeliveries", str(args.max_redeliveries)]
    try:
        proc, port = launch_broker(command, cwd=workdir)
    except BenchError as error:
        print("set-up failed: %s" % error, file=sys.stderr)
        return 2
    watch = RssWatch(proc.pid)
    watch.start()
    try:
        ok = SCENARIOS[args.scenario](args, port, proc.pid, watch)
    except BenchError as error:
        print("%s status=FAILED error=%r" % (args.scenario, str(error)), flush=True)
        ok = False
    finally:
        watch.stopped.set()
        stop_broker(proc)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

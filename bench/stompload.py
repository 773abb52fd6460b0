#!/usr/bin/env python3
"""stompload: a STOMP 1.2 load generator in Python, standard library only.

It mirrors the scenarios of stompbench (the Rust reference tool in shared/tools/stompbench)
so that users can measure pymq, or any STOMP broker, without Rust:

    queue-receipt   P producers send N messages each to Q queues, every SEND with a receipt,
                    at most W receipts outstanding per producer; C consumers
                    (ack:client-individual, prefetch K) ACK every message
    many-producers  queue-receipt with 32 producers, window 1, 3000 messages each
    queue-drain     one producer preloads N messages into a queue nobody consumes (receipts,
                    window W), then C consumers drain it
    topic-fanout    one producer sends N messages to a topic (receipts, window W); S
                    subscribers (ack:auto) each receive all of them

Every body (100 bytes by default) is `sb|PRODUCER|SEQ|SEND_NS|` padded with `x`: consumers
check that every message arrives exactly once (`lost`, `dup`, `bad`) and measure end-to-end
latency (monotonic clock, shared by all the processes of the run). Each run prints `# ` lines
for people and exactly one summary line

    scenario=... msgs_per_s=... p50_ms=... p99_ms=... lost=... dup=... client_cpu_pct=...
    [more key=value pairs] status=ok|FAILED

and exits 0 only with status=ok (1: FAILED, 2: bad usage). `msgs_per_s` counts deliveries
(unique messages received, for topic-fanout times the subscribers) per second, from the first
SEND (for queue-drain, from the SUBSCRIBE) to the last delivery. `p50_ms`/`p99_ms` are
end-to-end latencies (`na` for queue-drain, where they would only say how long the messages
waited in the queue).

To keep the client from being the bottleneck, each role group runs in its own process (the
producers in --procs processes, the queue consumers in one, the topic subscribers in --procs),
one thread per process driving all its connections through a selector, with non-blocking
sockets and one reusable receive buffer; frames are read in bulk and split at NUL (the bodies
of this benchmark never contain one), and topic subscribers check a whole read with one
regular-expression pass when every frame in it is one of the expected messages.
`client_cpu_pct` is the CPU of all the client's processes over the measured time (100 = one
core); `client_proc_pct_max` is that of the busiest client process over its own active time:
near 100, that process, not the broker, sets the pace.

    python bench/stompload.py queue-receipt --port 61613 --producers 4 --consumers 4 --window 1
    python bench/stompload.py many-producers --port 61613
    python bench/stompload.py queue-drain --port 61613 --msgs 20000
    python bench/stompload.py topic-fanout --port 61613 --subscribers 10 --msgs 20000
    python bench/stompload.py queue-receipt --port 61613 --login guest --passcode guest \\
        --persistent --prefetch-header prefetch-count            # RabbitMQ
"""

import argparse
import array
import multiprocessing
import os
import re
import resource
import selectors
import signal
import socket
import sys
import time

from broker_process import find_listener_pid     # bench/ is on sys.path when run

RECV_SIZE = 1 << 18
# One receive buffer per process (each process has one thread): recv() would allocate, and
# for this size mmap, shrink and unmap, a new buffer on every call.
RECV_BUFFER = bytearray(RECV_SIZE)
RECV_VIEW = memoryview(RECV_BUFFER)
now_ns = time.monotonic_ns


class Failure(Exception):
    pass


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- one STOMP connection -------------------------------------------------------------------

class Conn:
    """A STOMP 1.2 connection. Once connected, the socket is non-blocking (a socket with a
    timeout costs a poll() before every recv and send): reads happen when the selector says
    the socket is readable; a write that does not fit in the socket buffer waits for it, up
    to the idle timeout."""

    __slots__ = ("sock", "rest", "pending", "name", "cfg", "index", "state")

    def __init__(self, cfg, name, index=0):
        self.cfg, self.name, self.index = cfg, name, index
        self.rest = b""
        self.pending = []             # complete frames read by wait_frame() and not used yet
        self.state = None
        remaining = cfg.deadline - time.monotonic()
        if remaining <= 0:
            raise Failure("%s: out of time before connecting" % name)
        try:
            self.sock = socket.create_connection((cfg.host, cfg.port),
                                                 timeout=min(remaining, cfg.idle_timeout))
        except OSError as error:
            raise Failure("%s: cannot connect to %s:%d: %s" % (name, cfg.host, cfg.port, error))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        headers = [("accept-version", "1.2"), ("host", cfg.vhost), ("heart-beat", "0,0")]
        if cfg.login is not None:
            headers.append(("login", cfg.login))
        if cfg.passcode is not None:
            headers.append(("passcode", cfg.passcode))
        self.send(frame("CONNECT", headers))
        command, headers, body = self.wait_frame()
        if command != b"CONNECTED":
            raise Failure("%s: answer to CONNECT: %s %s %r"
                          % (name, command.decode(errors="replace"), headers, body[:200]))
        if headers.get("version") != "1.2":
            raise Failure("%s: broker does not speak STOMP 1.2 (version %r)"
                          % (name, headers.get("version")))

    def send(self, data):
        try:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):                        # the slow path: wait for room
                self.sock.settimeout(self.cfg.idle_timeout)
                try:
                    self.sock.sendall(memoryview(data)[sent:])
                finally:
                    self.sock.setblocking(False)
        except OSError as error:
            raise Failure("%s: send failed: %s" % (self.name, error or "timed out"))

    def read(self):
        """One bulk recv: the complete frames it finished (without their NUL)."""
        return self.read_chunk().split(b"\0")[:-1]

    def read_chunk(self):
        """One bulk recv: the bytes of the complete frames it finished, up to the last NUL
        (b"" when none)."""
        rest = self.rest
        keep = len(rest) if len(rest) <= RECV_SIZE // 2 else 0    # the partial frame goes
        if keep:                                                  # first in the buffer
            RECV_BUFFER[:keep] = rest
        try:
            n = self.sock.recv_into(RECV_VIEW[keep:])
        except BlockingIOError:
            return []
        except OSError as error:
            raise Failure("%s: recv failed: %s" % (self.name, error or "timed out"))
        if not n:
            raise Failure("%s: broker closed the connection" % self.name)
        data = bytes(RECV_VIEW[:keep + n])
        if rest and not keep:
            data = rest + data
        end = data.rfind(b"\0") + 1
        self.rest = data[end:]
        return data[:end]

    def wait_frame(self, timeout=None):
        """Blocking read of the next frame (used outside the hot loops)."""
        deadline = time.monotonic() + (timeout or self.cfg.idle_timeout)
        deadline = min(deadline, self.cfg.deadline)
        while not self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Failure("%s: no answer from the broker in time" % self.name)
            self.sock.settimeout(remaining)
            self.pending = [f for f in self.read() if f.strip(b"\r\n")]
        self.sock.setblocking(False)
        return parse(self.pending.pop(0))

    def close(self, graceful=True):
        """DISCONNECT with a receipt (waited for up to 3 s), then close."""
        try:
            if graceful:
                self.sock.settimeout(3)
                self.sock.sendall(b"DISCONNECT\nreceipt:bye\n\n\0")
                end = min(time.monotonic() + 3, self.cfg.deadline + 3)
                while time.monotonic() < end:
                    self.sock.settimeout(max(0.01, end - time.monotonic()))
                    if any(f.lstrip(b"\r\n").startswith(b"RECEIPT") and b"receipt-id:bye" in f
                           for f in self.read()):
                        break
        except (OSError, Failure):
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def frame(command, headers, body=b""):
    lines = [command] + ["%s:%s" % kv for kv in headers]
    return ("\n".join(lines) + "\n\n").encode() + body + b"\0"


def parse(raw):
    """(command, {header: value}, body) of one frame (without its NUL); first header wins."""
    raw = raw.lstrip(b"\r\n")
    end = raw.find(b"\n\n")
    sep = 2
    if end < 0:
        end, sep = raw.find(b"\r\n\r\n"), 4
        if end < 0:
            end, sep = len(raw), 0
    lines = raw[:end].decode("utf-8", "replace").split("\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.rstrip("\r").partition(":")
        headers.setdefault(name, value)
    return lines[0].rstrip("\r").encode(), headers, raw[end + sep:]


def describe(raw):
    command, headers, body = parse(raw)
    text = command.decode(errors="replace")
    if command == b"ERROR":
        text += " message=%r body=%r" % (headers.get("message"), body[:300])
    else:
        text += " %r" % headers
    return text


# -- configuration shared by every process --------------------------------------------------

class Cfg:
    def __init__(self, args, deadline):
        self.host, self.port = args.host, args.port
        self.login, self.passcode, self.vhost = args.login, args.passcode, args.vhost
        self.persistent = args.persistent
        self.prefetch_header = args.prefetch_header
        self.size = args.size
        self.idle_timeout = args.idle_timeout
        self.deadline = deadline
        self.prefix = args.prefix or "sl%dx%d" % (int(time.time()) % 1000000, os.getpid())


# -- producers ------------------------------------------------------------------------------

class Producer:
    """Sends `count` messages with receipts, at most `window` outstanding."""

    __slots__ = ("pi", "dests", "count", "window", "heads", "pad", "sent", "done", "sent_at",
                 "rtts", "last_receipt", "progress_at", "finished", "size")

    def __init__(self, cfg, pi, dests, count, window):
        self.pi, self.dests, self.count, self.window = pi, dests, count, window
        persistent = "persistent:true\n" if cfg.persistent else ""
        self.heads = [("SEND\ndestination:%s\ncontent-length:%d\n%sreceipt:"
                       % (d, cfg.size, persistent)).encode() for d in dests]
        self.size = cfg.size
        self.sent = self.done = 0
        self.sent_at = array.array("q", bytes(8 * count))
        self.rtts = array.array("q")
        self.last_receipt = 0
        self.progress_at = time.monotonic()
        self.finished = count == 0

    def fill(self):
        """The SEND frames that refill the window, as one bytes object."""
        end = min(self.count, self.done + self.window)
        if self.sent >= end:
            return b""
        t = now_ns()
        heads, nd, pi, size = self.heads, len(self.heads), self.pi, self.size
        out = []
        for j in range(self.sent, end):
            body = (b"sb|%d|%d|%d|" % (pi, j, t)).ljust(size, b"x")
            out.append(b"%s%d\n\n%s\0" % (heads[(pi + j) % nd], j, body))
            self.sent_at[j] = t
        self.sent = end
        return b"".join(out)


def run_producers(cfg, specs, pipe, wait_go):
    """specs: [(producer index, [destinations], count, window)]. Runs in its own process."""
    conns, errors = [], []
    result = {"role": "producers", "errors": errors, "sent": 0, "receipted": 0,
              "rtts": array.array("q"), "last_receipt": 0, "cpu_s": 0.0, "active_s": 0.0}
    try:
        for pi, dests, count, window in specs:
            conn = Conn(cfg, "producer %d" % pi, pi)
            conn.state = Producer(cfg, pi, dests, count, window)
            conns.append(conn)
        pipe.send(("ready", None))
        if wait_go:
            msg = wait_control(pipe, cfg.deadline)
            if msg is None or msg[0] != "go":
                raise Failure("producers: no go from the parent")
        cpu0, t0 = cpu_seconds(), time.monotonic()
        try:
            produce_loop(cfg, conns)
        finally:
            result["cpu_s"] = cpu_seconds() - cpu0
            result["active_s"] = time.monotonic() - t0
    except Failure as error:
        errors.append(str(error))
    except Exception as error:                                  # report, never hang the parent
        errors.append("producers: %r" % error)
    for conn in conns:
        p = conn.state
        result["sent"] += p.sent
        result["receipted"] += p.done
        result["rtts"].extend(p.rtts)
        result["last_receipt"] = max(result["last_receipt"], p.last_receipt)
    for conn in conns:
        conn.close(graceful=not errors)
    pipe.send(("result", result))


def produce_loop(cfg, conns):
    sel = selectors.DefaultSelector()
    active = 0
    for conn in conns:
        if not conn.state.finished:
            sel.register(conn.sock, selectors.EVENT_READ, conn)
            conn.send(conn.state.fill())
            active += 1
    backlog = take_pending(conns)
    while active:
        now = time.monotonic()
        if now >= cfg.deadline:
            raise Failure("producers: timed out (--timeout) with %d of %d receipts"
                          % (sum(c.state.done for c in conns), sum(c.state.count for c in conns)))
        if backlog:
            ready, backlog = backlog, []
        else:
            ready = [(key.data, None) for key, _ in sel.select(min(0.5, cfg.deadline - now))]
        for conn, frames in ready:
            p = conn.state
            if p.finished:
                continue
            if frames is None:
                frames = conn.read()
            t = now_ns()
            sent_at, rtts = p.sent_at, p.rtts
            for raw in frames:
                i = raw.find(b"receipt-id:")
                if i < 0 or not raw.lstrip(b"\r\n").startswith(b"RECEIPT"):
                    if raw.strip(b"\r\n"):
                        raise Failure("%s: unexpected %s" % (conn.name, describe(raw)))
                    continue
                j = int(raw[i + 11:raw.find(b"\n", i)])
                if sent_at[j] < 0:
                    continue                                    # duplicate receipt
                rtts.append(t - sent_at[j])
                sent_at[j] = -1
                p.done += 1
            if frames:
                p.progress_at = time.monotonic()
                p.last_receipt = t
                if p.done >= p.count:
                    p.finished = True
                    sel.unregister(conn.sock)
                    active -= 1
                else:
                    data = p.fill()
                    if data:
                        conn.send(data)
        now = time.monotonic()
        for conn in conns:
            p = conn.state
            if not p.finished and now - p.progress_at > cfg.idle_timeout:
                raise Failure("%s: no RECEIPT for %.0f s (%d outstanding, %d of %d done)"
                              % (conn.name, cfg.idle_timeout, p.sent - p.done, p.done, p.count))
    sel.close()


# -- consumers ------------------------------------------------------------------------------

class Tracker:
    """Exactly-once bookkeeping of one consumer process: one counter per expected message."""

    def __init__(self, total):
        self.counts = bytearray(total)
        self.unique = self.dups = self.bad = 0
        self.first = self.last = 0
        self.lat = array.array("q")


def run_consumers(cfg, specs, pipe, mode, total, per_producer, producers, subscribe_at_go):
    """One consumer process. specs: [(conn index, [destinations], ack, prefetch, base)].
    A message (producer p, seq j) counts at index base + p * per_producer + j of the tracker.
    mode 'queue': done when `total` unique messages arrived (or idle timeout after the
    producers finished); 'topic': each connection is done after per_producer messages."""
    conns, errors = [], []
    track = Tracker(total)
    result = {"role": "consumers", "errors": errors, "cpu_s": 0.0, "active_s": 0.0,
              "t_subscribe": 0}
    try:
        for ci, dests, ack, prefetch, base in specs:
            conn = Conn(cfg, "consumer %d" % ci, ci)
            conn.state = [dests, ack, prefetch, base, 0]            # [.., .., .., .., received]
            conns.append(conn)
        if not subscribe_at_go:
            subscribe_all(cfg, conns)
        pipe.send(("ready", None))
        cpu0, t0 = cpu_seconds(), time.monotonic()
        try:
            if subscribe_at_go:
                msg = wait_control(pipe, cfg.deadline)
                if msg is None or msg[0] != "go":
                    raise Failure("consumers: no go from the parent")
                cpu0, t0 = cpu_seconds(), time.monotonic()
                result["t_subscribe"] = now_ns()
                subscribe_all(cfg, conns, wait=False)
            consume_loop(cfg, conns, pipe, track, mode, total, per_producer, producers,
                         idle_from_start=subscribe_at_go)
        finally:
            result["cpu_s"] = cpu_seconds() - cpu0
            result["active_s"] = time.monotonic() - t0
    except Failure as error:
        errors.append(str(error))
    except Exception as error:
        errors.append("consumers: %r" % error)
    result.update(unique=track.unique, dups=track.dups, bad=track.bad,
                  lost=track.counts.count(0), first=track.first, last=track.last, lat=track.lat,
                  per_conn=[c.state[4] for c in conns])
    for conn in conns:
        conn.close(graceful=not errors)
    pipe.send(("result", result))


def subscribe_all(cfg, conns, wait=True):
    for conn in conns:
        dests, ack, prefetch, _, _ = conn.state
        out = []
        for k, dest in enumerate(dests):
            headers = [("id", "s%d" % k), ("destination", dest), ("ack", ack)]
            if prefetch and cfg.prefetch_header:
                headers.append((cfg.prefetch_header, prefetch))
            if wait:
                headers.append(("receipt", "sub%d" % k))
            out.append(frame("SUBSCRIBE", headers))
        conn.send(b"".join(out))
    if wait:
        for conn in conns:
            for _ in conn.state[0]:
                command, headers, body = conn.wait_frame()
                if command != b"RECEIPT":
                    raise Failure("%s: answer to SUBSCRIBE: %s %s %r"
                                  % (conn.name, command.decode(errors="replace"), headers,
                                     body[:200]))


def consume_loop(cfg, conns, pipe, track, mode, total, per_producer, producers,
                 idle_from_start):
    sel = selectors.DefaultSelector()
    for conn in conns:
        sel.register(conn.sock, selectors.EVENT_READ, conn)
    sel.register(pipe, selectors.EVENT_READ, None)
    counts, lat = track.counts, track.lat
    size = cfg.size
    queue_mode = mode == "queue"
    producers_done = time.monotonic() if idle_from_start else None
    open_conns = len(conns)
    last_progress = time.monotonic()
    backlog = take_pending(conns)
    while True:
        now = time.monotonic()
        if queue_mode and track.unique >= total or open_conns == 0:
            break
        if now >= cfg.deadline:
            raise Failure("consumers: timed out (--timeout) with %d of %d messages"
                          % (track.unique, total))
        if producers_done is not None and \
                now - max(producers_done, last_progress) > cfg.idle_timeout:
            break                                               # the rest is lost
        if backlog:
            ready, backlog = backlog, []
        else:
            ready = [(key.data, None) for key, _ in sel.select(min(0.5, cfg.deadline - now))]
        for conn, frames in ready:
            if conn is None:
                msg = wait_control(pipe, cfg.deadline)
                if msg is None or msg[0] == "stop":
                    return
                if msg[0] == "producers_done":
                    producers_done = time.monotonic()
                continue
            state = conn.state
            base, auto = state[3], state[1] == "auto"
            if frames is None:
                if auto and producers == 1:
                    # The fast path of topic subscribers: one regex pass over the whole
                    # chunk. It is taken only when every frame of the chunk is a message of
                    # producer 0 with a sequence number in range; anything else goes through
                    # the frame-by-frame loop below.
                    chunk = conn.read_chunk()
                    found = FAST_BODY.findall(chunk)
                    nframes = chunk.count(b"\0")
                    if found and len(found) == nframes:
                        seqs = [int(seq) for seq, _ in found]
                        if max(seqs) < per_producer:
                            t = now_ns()
                            unique, dups = track.unique, track.dups
                            for seq in seqs:
                                idx = base + seq
                                c = counts[idx]
                                if c:
                                    dups += 1
                                    if c < 255:
                                        counts[idx] = c + 1
                                    continue
                                counts[idx] = 1
                                unique += 1
                            lat.extend([t - int(ts) for _, ts in found])
                            track.unique, track.dups = unique, dups
                            if not track.first:
                                track.first = t
                            track.last = t
                            last_progress = time.monotonic()
                            state[4] += nframes
                            if state[4] >= per_producer and \
                                    counts.count(0, base, base + per_producer) == 0:
                                sel.unregister(conn.sock)
                                open_conns -= 1
                            continue
                    frames = chunk.split(b"\0")[:-1]
                else:
                    frames = conn.read()
            t = now_ns()
            acks = []
            received = 0
            unique, dups, bad = track.unique, track.dups, track.bad
            for raw in frames:
                if raw[:1] == b"\n":
                    raw = raw.lstrip(b"\r\n")
                if not raw.startswith(b"MESSAGE"):
                    if raw.strip(b"\r\n"):
                        raise Failure("%s: unexpected %s" % (conn.name, describe(raw)))
                    continue
                end = raw.find(b"\n\n")
                if end < 0:
                    raw = raw.replace(b"\r\n", b"\n")
                    end = raw.find(b"\n\n")
                received += 1
                if not auto:
                    i = raw.find(b"\nack:", 0, end)
                    if i >= 0:
                        acks.append(b"ACK\nid:%s\n\n\0" % raw[i + 5:raw.find(b"\n", i + 5)])
                    else:
                        i = raw.find(b"\nmessage-id:", 0, end)
                        acks.append(b"ACK\nid:%s\n\n\0" % raw[i + 12:raw.find(b"\n", i + 12)])
                body = raw[end + 2:]
                fields = body.split(b"|", 4)
                try:
                    if len(body) != size or fields[0] != b"sb":
                        raise ValueError
                    pid, seq = int(fields[1]), int(fields[2])
                    if seq >= per_producer or pid >= producers:
                        raise ValueError
                    idx = base + pid * per_producer + seq
                    c = counts[idx]
                except (ValueError, IndexError):
                    bad += 1
                    continue
                if c:
                    dups += 1
                    if c < 255:
                        counts[idx] = c + 1
                    continue
                counts[idx] = 1
                unique += 1
                lat.append(t - int(fields[3]))
            if acks:
                conn.send(b"".join(acks))
            if received:
                if not track.first:
                    track.first = t
                track.last = t
                last_progress = time.monotonic()
                track.unique, track.dups, track.bad = unique, dups, bad
                state[4] += received
                if not queue_mode and state[4] >= per_producer and \
                        counts.count(0, base, base + per_producer) == 0:
                    sel.unregister(conn.sock)               # this subscriber has everything
                    open_conns -= 1
    sel.close()


# the start of a body of producer 0, right after the blank line that ends the headers:
# the bodies of this benchmark never contain a blank line
FAST_BODY = re.compile(rb"\n\nsb\|0\|(\d+)\|(\d+)\|x*\0")


def take_pending(conns):
    """[(conn, frames)] for the frames wait_frame() read ahead, to be handled first."""
    backlog = [(conn, conn.pending) for conn in conns if conn.pending]
    for conn in conns:
        conn.pending = []
    return backlog


def wait_control(pipe, deadline):
    """Next message from the parent, or None when out of time or the parent is gone."""
    try:
        if pipe.poll(max(0.0, deadline - time.monotonic())):
            return pipe.recv()
    except (EOFError, OSError):
        pass
    return None


# -- the parent: orchestration and the summary ----------------------------------------------

class Group:
    """A child process and its pipe."""

    def __init__(self, ctx, target, *args):
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=child_main, args=(target, child) + args, daemon=True)
        self.proc.start()
        child.close()
        self.result = None

    def expect(self, what, deadline):
        msg = wait_control(self.pipe, deadline)
        if msg is None:
            raise Failure("a client process died or did not answer in time")
        if msg[0] == "result":
            self.result = msg[1]
            if what != "result":
                raise Failure("; ".join(msg[1]["errors"]) or "a client process gave up")
        return msg

    def tell(self, *msg):
        try:
            self.pipe.send(msg)
        except OSError:
            pass

    def collect(self, deadline):
        if self.result is None:
            msg = self.expect("result", deadline)
            if msg[0] != "result":
                msg = self.expect("result", deadline)
            self.result = msg[1]
        return self.result

    def end(self):
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def child_main(target, pipe, *args):
    signal.signal(signal.SIGINT, signal.SIG_IGN)                # the parent handles ^C
    target(args[0], args[1], pipe, *args[2:])


def percentile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def fmt_ms(ns):
    return "na" if ns != ns else "%.3f" % (ns / 1e6)


def proc_cpu(pid):
    if pid is None:
        return None
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def split(items, parts):
    parts = max(1, min(parts, len(items)))
    return [items[k::parts] for k in range(parts)]


def say(text):
    print("# " + text, flush=True)


def run_scenario(args):
    """Runs one scenario; returns (summary fields, errors)."""
    start = time.monotonic()
    deadline = start + args.timeout
    cfg = Cfg(args, deadline)
    ctx = multiprocessing.get_context("fork")
    groups = []
    errors = []
    fields = {}
    broker_pid = args.broker_pid
    if broker_pid == "auto":
        broker_pid = find_listener_pid(args.port) if args.host in ("127.0.0.1", "localhost",
                                                                   "::1") else None
    elif broker_pid is not None:
        broker_pid = int(broker_pid)
    size = cfg.size
    scenario = args.scenario

    try:
        if scenario in ("queue-receipt", "many-producers"):
            p, c, q, n, w = args.producers, args.consumers, max(1, args.queues), args.msgs, \
                args.window
            total = p * n
            queues = ["/queue/%s.rq%d" % (cfg.prefix, i) for i in range(q)]
            say("%s: %d producers x %d msgs (%d B) -> %d queues, window %d, %d consumers "
                "ack:client-individual prefetch %d%s"
                % (scenario, p, n, size, q, w, c, args.prefetch,
                   ", persistent" if cfg.persistent else ""))
            cspecs = []
            for ci in range(c):
                mine = [queues[ci % q]] if c >= q else [queues[x] for x in range(q) if x % c == ci]
                cspecs.append((ci, mine, "client-individual", args.prefetch, 0))
            # all consumers in one process: a message may reach any of them
            cons = Group(ctx, run_consumers, cfg, cspecs, "queue", total, n, p, False)
            groups.append(cons)
            cons.expect("ready", deadline)
            pspecs = [(pi, [queues[(pi + x) % q] for x in range(q)], n, w) for pi in range(p)]
            prods = [Group(ctx, run_producers, cfg, part, True)
                     for part in split(pspecs, args.procs)]
            groups.extend(prods)
            for g in prods:
                g.expect("ready", deadline)
            b0, cpu0, t0 = proc_cpu(broker_pid), cpu_seconds(), now_ns()
            for g in prods:
                g.tell("go")
            presults = [g.collect(deadline + 10) for g in prods]
            cons.tell("producers_done")
            cres = cons.collect(deadline + args.idle_timeout + 10)
            b1 = proc_cpu(broker_pid)
            cresults = [cres]
            first_ns = t0
        elif scenario == "queue-drain":
            n, w, c = args.msgs, args.window, args.consumers
            queue = "/queue/%s.drain" % cfg.prefix
            say("queue-drain: preload %d msgs (%d B, window %d) into %s with no consumer, then "
                "%d consumer(s) ack:client-individual prefetch %d%s"
                % (n, size, w, queue, c, args.prefetch, ", persistent" if cfg.persistent else ""))
            prod = Group(ctx, run_producers, cfg, [(0, [queue], n, w)], True)
            groups.append(prod)
            prod.expect("ready", deadline)
            b0, cpu0, t0 = proc_cpu(broker_pid), cpu_seconds(), now_ns()
            prod.tell("go")
            pres = prod.collect(deadline + 10)
            presults = [pres]
            if pres["errors"]:
                raise Failure("; ".join(pres["errors"]))
            pre_s = max(1e-9, (pres["last_receipt"] - t0) / 1e9)
            fields["preload_per_s"] = "%.0f" % (pres["receipted"] / pre_s)
            time.sleep(args.settle)
            cspecs = [(ci, [queue], "client-individual", args.prefetch, 0) for ci in range(c)]
            cons = Group(ctx, run_consumers, cfg, cspecs, "queue", n, n, 1, True)
            groups.append(cons)
            cons.expect("ready", deadline)
            t_drain = now_ns()
            cons.tell("go")
            cres = cons.collect(deadline + args.idle_timeout + 10)
            b1 = proc_cpu(broker_pid)
            cresults = [cres]
            first_ns = cres["t_subscribe"] or t_drain
            total = n
        elif scenario == "topic-fanout":
            s, n, w = args.subscribers, args.msgs, args.window
            total = s * n
            topic = "/topic/%s.fan" % cfg.prefix
            say("topic-fanout: 1 producer x %d msgs (%d B, window %d) -> %s with %d subscribers "
                "(ack:auto)" % (n, size, w, topic, s))
            specs = [(si, [topic], "auto", None, si * n) for si in range(s)]
            cons_groups = []
            for part in split(specs, args.procs):
                # each process tracks only its own subscribers: the k-th at k * n
                rebased = [spec[:4] + (k * n,) for k, spec in enumerate(part)]
                g = Group(ctx, run_consumers, cfg, rebased, "topic", len(part) * n, n, 1, False)
                cons_groups.append(g)
            groups.extend(cons_groups)
            for g in cons_groups:
                g.expect("ready", deadline)
            prod = Group(ctx, run_producers, cfg, [(0, [topic], n, w)], True)
            groups.append(prod)
            prod.expect("ready", deadline)
            b0, cpu0, t0 = proc_cpu(broker_pid), cpu_seconds(), now_ns()
            prod.tell("go")
            presults = [prod.collect(deadline + 10)]
            for g in cons_groups:
                g.tell("producers_done")
            cresults = [g.collect(deadline + args.idle_timeout + 10) for g in cons_groups]
            b1 = proc_cpu(broker_pid)
            first_ns = t0
        else:
            raise Failure("unknown scenario %s" % scenario)
    finally:
        for g in groups:
            g.tell("stop")
        for g in groups:
            g.end()

    parent_cpu = cpu_seconds() - cpu0                # before the sorting below
    for r in presults + cresults:
        errors.extend(r["errors"])
    unique = sum(r["unique"] for r in cresults)
    dups = sum(r["dups"] for r in cresults)
    bad = sum(r["bad"] for r in cresults)
    lost = sum(r["lost"] for r in cresults)
    last = max(r["last"] for r in cresults)
    deliver_s = max(1e-9, (last - first_ns) / 1e9) if last else float("nan")
    rate = unique / deliver_s if last else 0.0
    lat = sorted(x for r in cresults for x in r["lat"])
    rtts = sorted(x for r in presults for x in r["rtts"])
    sent = sum(r["sent"] for r in presults)
    receipted = sum(r["receipted"] for r in presults)
    last_receipt = max(r["last_receipt"] for r in presults)
    send_s = max(1e-9, (last_receipt - t0) / 1e9)
    client_cpu = parent_cpu + sum(r["cpu_s"] for r in presults + cresults)
    # the measured time: first SEND to the last delivery or receipt (queue-drain: the
    # preload, then SUBSCRIBE to the last delivery); the client CPU counts the same span
    if scenario == "queue-drain":
        wall = max(0, last_receipt - t0) + max(0, last - first_ns)
    else:
        wall = max(last, last_receipt) - t0
    wall = max(1e-3, wall / 1e9)
    proc_pcts = [100 * r["cpu_s"] / r["active_s"] for r in presults + cresults
                 if r["active_s"] > 0.05]
    say("sent %d, receipted %d in %.2f s = %.0f receipts/s (receipt rtt p50 %s ms, p99 %s ms)"
        % (sent, receipted, send_s, receipted / send_s, fmt_ms(percentile(rtts, .5)),
           fmt_ms(percentile(rtts, .99))))
    say("delivered %d of %d unique in %.2f s = %.0f msgs/s; dup %d, lost %d, bad %d; "
        "%s p50 %s ms, p99 %s ms, max %s ms"
        % (unique, total, deliver_s, rate, dups, lost, bad,
           "time spent queued" if scenario == "queue-drain" else "latency",
           fmt_ms(percentile(lat, .5)), fmt_ms(percentile(lat, .99)),
           fmt_ms(lat[-1] if lat else float("nan"))))
    if scenario == "topic-fanout":
        per = [x for r in cresults for x in r["per_conn"]]
        say("per subscriber: min %d, max %d frames" % (min(per, default=0), max(per, default=0)))
    broker_cpu = None if b0 is None or b1 is None else b1 - b0
    say("client CPU %.2f s over %.2f s measured (%.0f%% of one core; busiest client process "
        "%.0f%%); broker CPU %s"
        % (client_cpu, wall, 100 * client_cpu / wall, max(proc_pcts, default=0),
           "?" if broker_cpu is None else "%.2f s (%.0f%% of one core)"
           % (broker_cpu, 100 * broker_cpu / wall)))
    for error in errors[:5]:
        say("error: %s" % error)

    drain = scenario == "queue-drain"
    out = {
        "scenario": scenario,
        "msgs_per_s": "%.0f" % rate,
        "p50_ms": "na" if drain else fmt_ms(percentile(lat, .5)),
        "p99_ms": "na" if drain else fmt_ms(percentile(lat, .99)),
        "lost": lost,
        "dup": dups,
        "client_cpu_pct": "%.1f" % (100 * client_cpu / wall),
        "client_proc_pct_max": "%.1f" % max(proc_pcts) if proc_pcts else "na",
        "client_cpu_s": "%.2f" % client_cpu,
        "bad": bad,
        "msgs": total,
        "delivered": unique,
        "secs": "%.3f" % deliver_s,
    }
    if not drain:
        out["send_per_s"] = "%.0f" % (receipted / send_s)
    out.update(fields)
    out["rcpt_p50_ms"] = fmt_ms(percentile(rtts, .5))
    out["rcpt_p99_ms"] = fmt_ms(percentile(rtts, .99))
    out["broker_cpu_pct"] = "na" if broker_cpu is None else "%.1f" % (100 * broker_cpu / wall)
    out["errors"] = len(errors)
    ok = not errors and lost == 0 and dups == 0 and bad == 0 and unique == total
    out["status"] = "ok" if ok else "FAILED"
    return out


DEFAULTS = {      # scenario: {option: default}, after stompbench's reference lines
    "queue-receipt": dict(producers=4, consumers=4, queues=4, msgs=25000, window=1, prefetch=100),
    "many-producers": dict(producers=32, consumers=4, queues=4, msgs=3000, window=1,
                           prefetch=100),
    "queue-drain": dict(msgs=20000, window=100, consumers=1, prefetch=100),
    "topic-fanout": dict(subscribers=10, msgs=20000, window=100),
}
HELP = {
    "queue-receipt": "producers SEND to queues with receipts (window per producer), "
                     "consumers ACK every message",
    "many-producers": "queue-receipt with 32 producers, window 1",
    "queue-drain": "preload a queue nobody consumes, then drain it",
    "topic-fanout": "one producer to a topic, every subscriber gets every message",
}
OPTION_HELP = {
    "producers": "producer connections (%(default)s)",
    "consumers": "consumer connections (%(default)s)",
    "queues": "queues; producer p sends its message j to queue (p+j) mod Q (%(default)s)",
    "msgs": "%s (%%(default)s)",
    "window": "RECEIPTs outstanding per producer (%(default)s)",
    "prefetch": "prefetch of each consumer subscription (%(default)s)",
    "subscribers": "subscriber connections (%(default)s)",
}


def parse_args(argv):
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("connection and run")
    g.add_argument("--host", default="127.0.0.1", help="broker address (%(default)s)")
    g.add_argument("--port", type=int, default=61613, help="broker STOMP port (%(default)s)")
    g.add_argument("--login", default=None, help="CONNECT login (none)")
    g.add_argument("--passcode", default=None, help="CONNECT passcode (none)")
    g.add_argument("--vhost", default="/", help="CONNECT host header (%(default)s)")
    g.add_argument("--persistent", action="store_true",
                   help="add persistent:true to every SEND (RabbitMQ, ActiveMQ)")
    g.add_argument("--prefetch-header", default="prefetch", metavar="NAME",
                   help="SUBSCRIBE header carrying the prefetch: prefetch (pymq, the "
                        "default), prefetch-count (RabbitMQ), activemq.prefetchSize "
                        "(ActiveMQ); none: send none")
    g.add_argument("--size", type=int, default=100,
                   help="body size in bytes, >= 40 (%(default)s)")
    g.add_argument("--procs", type=int, default=2,
                   help="client processes for the producers (queue scenarios) or the "
                        "subscribers (topic-fanout) (%(default)s)")
    g.add_argument("--timeout", type=float, default=600.0,
                   help="bound on the whole run, seconds (%(default)s)")
    g.add_argument("--idle-timeout", type=float, default=20.0,
                   help="give up waiting after this long without progress, seconds "
                        "(%(default)s)")
    g.add_argument("--broker-pid", default="auto",
                   help="broker PID for its CPU figure: a number, auto (the process "
                        "listening on --port, local brokers only; the default) or none")
    g.add_argument("--prefix", default=None,
                   help="destination name prefix (default: unique per run)")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name, defaults in DEFAULTS.items():
        p = sub.add_parser(name, parents=[common], help=HELP[name],
                           description="%s: %s" % (name, HELP[name]))
        g = p.add_argument_group("scenario")
        for option, value in defaults.items():
            text = OPTION_HELP[option]
            if option == "msgs":
                text = text % ("messages per producer" if "producers" in defaults
                               else "messages")
            g.add_argument("--" + option, type=int, default=value, help=text)
        if name == "queue-drain":
            g.add_argument("--settle", type=float, default=1.0,
                           help="pause between the preload and the drain, seconds "
                                "(%(default)s)")
    args = parser.parse_args(argv)
    if args.prefetch_header in ("", "none"):
        args.prefetch_header = None
    if args.broker_pid in ("", "none"):
        args.broker_pid = None
    for option in ("producers", "consumers", "subscribers", "msgs", "window", "procs"):
        if getattr(args, option, 1) < 1:
            parser.error("--%s must be >= 1" % option)
    if args.size < 40:
        parser.error("--size must be >= 40 (the body carries producer, sequence and time)")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        out = run_scenario(args)
    except Failure as error:
        say("error: %s" % error)
        out = {"scenario": args.scenario, "msgs_per_s": 0, "p50_ms": "na", "p99_ms": "na",
               "lost": "na", "dup": "na", "client_cpu_pct": "na", "errors": 1,
               "status": "FAILED"}
    except KeyboardInterrupt:
        return 130
    print(" ".join("%s=%s" % kv for kv in out.items()), flush=True)
    return 0 if out["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())

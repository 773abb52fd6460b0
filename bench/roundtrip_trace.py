#!/usr/bin/env python3
"""Runs pymq's command line in this process with three methods wrapped, to see where a
round trip of stompbench's `connections` scenario waits inside the broker. For each SEND whose
body is stompbench's (`sb|a|b|timestamp|...`): the wait before `Broker.on_send` handles it
(the client's timestamp against ours, less the smallest difference seen: the clocks differ),
and, per connection, the wait from the first frame queued (`Connection.send`) to the hub
callback that writes it (`Connection._flush`). At exit (SIGINT or SIGTERM) it prints their
percentiles, overall and over the first --steady seconds (stompbench's clients disconnect in
the run's last second), and when the flushes that waited over 50 ms happened.

    python bench/roundtrip_trace.py --steady 19.5 -- --port 61630 --heart-beat 0,0
    stompbench connections --port 61630 --conns 8000 --duration 20 --io epoll ...

On PyPy, set PYPY_GC_NURSERY=64MB first: pymq sets it by exec only when run as a command."""

import argparse
import atexit
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pymq  # noqa: E402
from stompload import percentile  # noqa: E402   (bench/ is on sys.path when run)

SLOW_MS = 50


def percentiles(name, values):
    values = sorted(values)
    if not values:
        return "%s: none" % name
    return "%s: n=%d p50=%.2f ms p99=%.2f ms p99.9=%.2f ms max=%.2f ms" % (
        name, len(values), percentile(values, 0.5), percentile(values, 0.99),
        percentile(values, 0.999), values[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steady", type=float, default=19.5,
                        help="seconds from the first SEND that count as steady (19.5)")
    parser.add_argument("pymq_args", nargs=argparse.REMAINDER, help="-- then pymq's options")
    options = parser.parse_args()
    args = options.pymq_args[1:] if options.pymq_args[:1] == ["--"] else options.pymq_args

    arrivals = []       # (our clock - client's clock, ns; when, s)
    queued = {}         # connection -> when its first unwritten frame was queued, ns
    flushes = []        # (wait, ms; when, s)
    on_send, send, flush = pymq.Broker.on_send, pymq.Connection.send, pymq.Connection._flush

    def traced_on_send(self, conn, frame):
        parts = bytes(frame.body[:64]).split(b"|")
        if parts[0] == b"sb" and len(parts) > 3 and parts[3].isdigit():
            arrivals.append((time.monotonic_ns() - int(parts[3]), time.monotonic()))
        return on_send(self, conn, frame)

    def traced_send(self, chunks):
        if not self._flush_due and self not in queued:
            queued[self] = time.monotonic_ns()
        return send(self, chunks)

    def traced_flush(self):
        started = queued.pop(self, None)
        if started is not None:
            flushes.append(((time.monotonic_ns() - started) / 1e6, time.monotonic()))
        return flush(self)

    pymq.Broker.on_send = traced_on_send
    pymq.Connection.send = traced_send
    pymq.Connection._flush = traced_flush

    def report():
        if not arrivals:
            print("no stompbench SEND seen", file=sys.stderr)
            return
        offset = min(d for d, _ in arrivals)
        first = arrivals[0][1]
        waits = [((d - offset) / 1e6, t) for d, t in arrivals]
        for name, series in (("before on_send", waits), ("queued to flush", flushes)):
            print(percentiles(name, [w for w, _ in series]), file=sys.stderr)
            print(percentiles(name + ", steady", [w for w, t in series
                                                  if t - first < options.steady]),
                  file=sys.stderr)
        slow = {}
        for wait, when in flushes:
            if wait > SLOW_MS:
                tenth = round(when - first, 1)
                slow[tenth] = slow.get(tenth, 0) + 1
        print("flushes over %d ms, by tenth of a second since the first SEND: %s"
              % (SLOW_MS, sorted(slow.items())), file=sys.stderr)

    atexit.register(report)
    return pymq.main(args)      # given arguments: no exec for PyPy's nursery (see above)


if __name__ == "__main__":
    sys.exit(main())

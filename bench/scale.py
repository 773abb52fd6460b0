#!/usr/bin/env python3
"""Scale: memory per subscription and per queue, and many connections (stompbench scenarios).

    python bench/scale.py [--stompbench PATH] [--full] [--python PYPY]

Starts `python pymq.py` (SQLite, default configuration) for each scenario and prints
stompbench's summary line. By default the sizes are a tenth of the targets so that a run takes
a couple of minutes; --full runs the targets themselves: 1,000,000 topic subscriptions
(100 connections x 10,000), 1,000,000 queue subscriptions, 1,000,000 queues with one stored
message each (then drained), and 10,000 connections sending and receiving once a second
(stompbench's epoll client: one thread for all of them). --python runs pymq on another
interpreter (PyPy: its memory next to CPython's).
bench/deep_queue.py (one queue of 5,000,000 messages) and bench/complexity.py (the cost of a
SEND, a SUBSCRIBE and an ACK with a million other subscriptions) are the other two targets.
"""

import argparse
import os
import shutil
import signal
import sys
import tempfile

from queue_backends import run, start_broker

SCENARIOS = {
    # name: (quick, full)
    "topic subscriptions": ("many-subs --conns 100 --dests 1000 --dest-kind topic",
                            "many-subs --conns 100 --dests 10000 --dest-kind topic"),
    "queue subscriptions": ("many-subs --conns 100 --dests 1000 --dest-kind queue",
                            "many-subs --conns 100 --dests 10000 --dest-kind queue"),
    "queues": ("many-queues --queues 100000 --window 100 --drain",
               "many-queues --queues 1000000 --window 100 --drain"),
    "connections": ("connections --conns 200 --interval-ms 1000 --duration 10 "
                    "--connect-parallel 50 --io epoll",
                    "connections --conns 10000 --interval-ms 1000 --duration 20 "
                    "--connect-parallel 50 --io epoll"),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stompbench", default="/tmp/stompbench/release/stompbench")
    parser.add_argument("--full", action="store_true", help="the targets' sizes")
    parser.add_argument("--python", default=sys.executable, help="pymq's interpreter")
    options = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="pymq-scale-")
    for name, sizes in SCENARIOS.items():
        db = os.path.join(workdir, name.replace(" ", "-") + ".db")
        proc, port = start_broker(db, workdir, options.python)
        try:
            print("%s: %s" % (name, run(options.stompbench, port, sizes[options.full])),
                  flush=True)
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(120)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Queue throughput on each store, same load, same run: SQLite (a file) and PostgreSQL (a
throwaway local server with fsync on, started and removed by this script).

    python bench/queue_backends.py [--stompbench PATH] [--backends sqlite,postgresql]

For each backend it starts `python pymq.py --db ...`, runs stompbench's queue scenarios (the
lines of shared/tools/stompbench/README.md) and prints their summary lines. Every run is
bounded by stompbench's --timeout; the brokers and the PostgreSQL server are stopped at the end.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from broker_process import launch_broker     # bench/ is on sys.path when run
from rawstomp import BenchError

SCENARIOS = [
    "queue-receipt --producers 4 --consumers 4 --queues 4 --msgs 25000 --window 1 --prefetch 100",
    "queue-receipt --producers 4 --consumers 4 --queues 4 --msgs 25000 --window 100 --prefetch 100",
    "queue-receipt --producers 32 --consumers 4 --queues 4 --msgs 3000 --window 1 --prefetch 100",
    "queue-drain --msgs 20000 --window 100 --prefetch 100",
]


def start_broker(db, workdir, python=sys.executable):
    try:
        return launch_broker([python, os.path.join(ROOT, "pymq.py"), "--port", "0",
                              "--heart-beat", "0,0", "--db", db], cwd=workdir)
    except BenchError as error:
        raise SystemExit(str(error))


def run(stompbench, port, scenario):
    name, *args = scenario.split()
    command = [stompbench, name, "--flavor", "pymq", "--port", str(port), "--broker-pid",
               "auto", "--timeout", "600", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    lines = [line for line in result.stdout.splitlines() if line.startswith("scenario=")]
    return lines[-1] if lines else "scenario=%s status=failed exit=%d" % (name, result.returncode)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stompbench", default="/tmp/stompbench/release/stompbench")
    parser.add_argument("--backends", default="sqlite,postgresql")
    options = parser.parse_args()
    workdir = tempfile.mkdtemp(prefix="pymq-bench-")
    cluster = None
    try:
        for backend in options.backends.split(","):
            if backend == "postgresql":
                import postgres
                cluster = postgres.new_cluster(fsync=True)
                db = cluster.create_database("bench")
            else:
                db = os.path.join(workdir, "bench.db")
            for scenario in SCENARIOS:
                proc, port = start_broker(db, workdir)
                try:
                    print("backend=%s %s" % (backend, run(options.stompbench, port, scenario)),
                          flush=True)
                finally:
                    proc.send_signal(signal.SIGINT)
                    proc.wait(60)
    finally:
        if cluster is not None:
            cluster.destroy()


if __name__ == "__main__":
    main()

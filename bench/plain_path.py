#!/usr/bin/env python3
"""The plain path, before and after a change, in one sitting: stompbench's qr1, qr100, drain
and fan-out rows against two pymq checkouts, alternating, each run on a fresh broker and a
fresh SQLite store, in its default durable configuration.

    python bench/plain_path.py --before /tmp/pymq-before [--rounds 5] [--stompbench PATH]

(`git worktree add /tmp/pymq-before <commit>` makes the "before" checkout.) For each row it
prints the median rate of each side with its range, the ratio after/before, and the broker's
CPU per message, which moves less with the machine's noise than the rate does. Exit 1 if any
run failed (stompbench's status, lost or duplicated messages).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

from broker_process import launch_broker, stop_broker     # bench/ is on sys.path when run

ROWS = [
    ("qr1", "queue-receipt --producers 4 --consumers 4 --queues 4 --msgs 25000 --window 1 "
            "--prefetch 100", 100000),
    ("qr100", "queue-receipt --producers 4 --consumers 4 --queues 4 --msgs 25000 --window 100 "
              "--prefetch 100", 100000),
    ("drain", "queue-drain --msgs 20000 --window 100 --prefetch 100", 20000),
    ("fan-out", "topic-fanout --subscribers 10 --msgs 20000 --window 100", 200000),
]


def run_row(stompbench, checkout, scenario, workdir):
    db = tempfile.mktemp(prefix="plain-", suffix=".db", dir=workdir)
    proc, port = launch_broker([sys.executable, os.path.join(checkout, "pymq.py"), "--port",
                                "0", "--heart-beat", "0,0", "--db", db], cwd=workdir)
    try:
        name, *args = scenario.split()
        result = subprocess.run([stompbench, name, "--flavor", "pymq", "--port", str(port),
                                 "--broker-pid", "auto", "--timeout", "600", *args],
                                capture_output=True, text=True, timeout=900)
    finally:
        stop_broker(proc)
    lines = [line for line in result.stdout.splitlines() if line.startswith("scenario=")]
    summary = dict(field.split("=", 1) for field in lines[-1].split()) if lines else {}
    ok = (summary.get("status") == "ok" and summary.get("lost", "0") == "0"
          and summary.get("dup", "0") == "0")
    return ok, summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="a pymq checkout to compare with")
    parser.add_argument("--after", default=ROOT, help="default: this checkout")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", default=",".join(name for name, _, _ in ROWS))
    parser.add_argument("--stompbench", default="/tmp/stompbench/release/stompbench")
    options = parser.parse_args()
    sides = (("before", options.before), ("after", options.after))
    wanted = options.rows.split(",")
    results = {}            # (row, side) -> [(rate, cpu µs per message)]
    failed = False
    with tempfile.TemporaryDirectory(prefix="pymq-plain-") as workdir:
        for round_ in range(options.rounds):
            for name, scenario, messages in ROWS:
                if name not in wanted:
                    continue
                # Alternate which side goes first, so that a drift in the machine's load
                # does not always favour the same one.
                for side, checkout in (sides if round_ % 2 == 0 else sides[::-1]):
                    ok, summary = run_row(options.stompbench, checkout, scenario, workdir)
                    rate = float(summary.get("msgs_per_s", 0))
                    cpu = float(summary.get("broker_cpu_s", 0)) * 1e6 / messages
                    results.setdefault((name, side), []).append((rate, cpu))
                    failed |= not ok
                    print("round %d %-7s %-6s %s %9.0f msg/s  broker %5.1f µs/msg"
                          % (round_ + 1, name, side, "ok    " if ok else "FAILED", rate, cpu),
                          flush=True)
    print("\n| row | before (msg/s) | after (msg/s) | after/before | broker µs/msg before "
          "-> after |\n|---|---:|---:|---:|---:|")
    for name, _, _ in ROWS:
        if name not in wanted:
            continue
        (before, after) = (results[(name, side)] for side, _ in sides)
        medians = [statistics.median(rate for rate, _ in runs) for runs in (before, after)]
        cpus = [statistics.median(cpu for _, cpu in runs) for runs in (before, after)]
        print("| %s | %s | %s | %.3f | %.1f -> %.1f |" % (
            name, *("%.0f [%.0f-%.0f]" % (median, min(r for r, _ in runs),
                                           max(r for r, _ in runs))
                    for median, runs in zip(medians, (before, after))),
            medians[1] / medians[0], cpus[0], cpus[1]))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The import of an ocamlmq store (--import-ocamlmq): how fast, in how much memory.

    python bench/ocamlmq_import.py [--rows 1000000] [--queues 10] [--size 200] [--db URL]

Makes an ocamlmq SQLite store of --rows messages (ocamlmq's table, ocamlmq-behaviour.md §7.2;
--size-byte bodies over --queues queues, made by tests/ocamlmq_stores.py), then starts
`python pymq.py --import-ocamlmq THAT --db STORE` (a fresh SQLite store in a temporary
directory, or --db URL) and times it from the start of the process to its "imported" log line.
Figures: messages/s, the broker's peak RSS (VmHWM) once it listens, and a second start with the
same option (it imports nothing: the cost of leaving the option set). Prints `# ` lines for
people and one `key=value` summary line ending in status=ok (exit 0) or status=FAILED (exit 1).
Standard library only.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import ocamlmq_stores  # noqa: E402

SUMMARY = re.compile(r"imported from ocamlmq store .*: (\d+) messages into (\d+) queues")


def run_import(source, store, timeout):
    """Start the broker on `source`; (seconds to the import's log line, messages imported,
    peak RSS in KiB once it listens). Stops it."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "pymq.py"), "--port", "0",
                             "--import-ocamlmq", source, "--db", store],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        seconds = imported = None
        deadline = started + timeout
        for line in proc.stderr:
            match = SUMMARY.search(line)
            if match:
                seconds, imported = time.monotonic() - started, int(match.group(1))
            if "listening on" in line or " ERROR " in line or time.monotonic() > deadline:
                break
        if seconds is None:
            raise SystemExit("# the broker did not import: %s" % line.strip())
        with open("/proc/%d/status" % proc.pid) as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return seconds, imported, peak
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1000000)
    parser.add_argument("--queues", type=int, default=10)
    parser.add_argument("--size", type=int, default=200, help="body bytes")
    parser.add_argument("--db", help="pymq's store (default: SQLite in a temporary directory)")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="pymq-import-bench-")
    source = os.path.join(directory, "ocamlmq.db")
    store = args.db or os.path.join(directory, "pymq.db")

    made = time.monotonic()
    queues = tuple("queue-%d" % n for n in range(args.queues))
    ocamlmq_stores.make_sqlite_store(source, (
        row[:6] + (row[6].ljust(args.size, b"x"),)
        for row in ocamlmq_stores.make_rows(args.rows, queues)))
    print("# made an ocamlmq store of %d messages (%d MiB) in %.1f s" % (
        args.rows, os.path.getsize(source) >> 20, time.monotonic() - made))

    seconds, imported, peak = run_import(source, store, args.timeout)
    rate = imported / seconds
    print("# imported %d messages in %.1f s (from the start of the process): %d msgs/s; "
          "peak RSS %.1f MiB" % (imported, seconds, rate, peak / 1024))
    again, none, again_peak = run_import(source, store, args.timeout)
    print("# a second start with the same option: %d imported, %.1f s, peak RSS %.1f MiB"
          % (none, again, again_peak / 1024))
    ok = imported == args.rows and none == 0
    print("rows=%d msgs_per_s=%d seconds=%.2f peak_rss_kib=%d again_seconds=%.2f status=%s"
          % (args.rows, rate, seconds, peak, again, "ok" if ok else "FAILED"))
    for name in os.listdir(directory):
        os.unlink(os.path.join(directory, name))
    os.rmdir(directory)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Crash anywhere, at length: the kill -9 harness of tests/test_crash.py over many cycles.

Producers SEND with receipts and consumers ACK with receipts against `python pymq.py` in a
subprocess; the broker is SIGKILLed at random moments (seeded) and restarted on the same store;
with --outages the PostgreSQL server is also stopped (fast or immediate) under load and started
again, sometimes for longer than --db-retry, sometimes with the broker killed meanwhile.
Among plain SENDs go delayed, expiring and dedup'd ones and ones the consumers NACK (unless
--plain). At the end everything left is drained and checked: every receipted SEND delivered
at least once after it was sent (from its queue or its DLQ), nothing delivered after its ACK
was receipted, nothing delivered that was never sent, nothing delivered twice within one
broker run unless NACKed, nothing delayed delivered early, no dedup-id stored twice, no dead
letter without its reason.

    python bench/crash_cycles.py                                  # 200 cycles, both stores
    python bench/crash_cycles.py --cycles 1000 --seed 7 --backend sqlite
    python bench/crash_cycles.py --backend postgresql --outages   # database outages too
    python bench/crash_cycles.py --cluster --cycles 500           # two nodes, one killed a cycle

With --cluster the broker is two nodes (--nodes) of a cluster over one PostgreSQL database,
producers and consumers on both; a cycle kills one node (one in five: all of them) and starts
it again while the other goes on. Also checked then: no message in flight on two live nodes at
once (a killed node's are delivered again by the other, marked redelivered).

PostgreSQL runs on a throwaway server of the script's own (tests/postgres.py: initdb in a
temporary directory, as `nobody` when run as root). Exit status: 0 when every backend passed,
1 on any violation or harness failure, 2 when the set-up failed.
"""

import argparse
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

import postgres  # noqa: E402
import test_crash  # noqa: E402


class SetupError(Exception):
    pass


def log(line):
    print(line, flush=True)


def run_backend(backend, args):
    """Run the cycles on one backend; returns (title, CrashResult or None, failure text)."""
    cluster = None
    title = backend + (" with database outages" if backend == "postgresql" and args.outages
                       else ", a cluster of %d nodes" % args.nodes if args.cluster else "")
    log("== %s: %d cycles, seed %d" % (title, args.cycles, args.seed))
    try:
        options = dict(cycles=args.cycles, seed=args.seed, receipts=tuple(args.receipts),
                       producers=args.producers, log=(lambda line: None) if args.quiet else log,
                       mix=test_crash.PLAIN_ONLY if args.plain else test_crash.TASK_MIX)
        if backend == "sqlite":
            import tempfile
            workdir = tempfile.mkdtemp(prefix="pymq-crash-cycles-")
            store = os.path.join(workdir, "pymq.db")
        else:
            if postgres.find_bindir() is None:
                raise SetupError(postgres.INSTALL_HINT)
            cluster = postgres.new_cluster(fsync=args.fsync)
            store = cluster.create_database()
            if args.cluster:
                options.update(nodes=args.nodes, lease_timeout=args.lease_timeout)
            elif args.outages:
                options.update(outage=cluster, db_retry=args.db_retry,
                               outage_time=(0.05, args.max_outage),
                               long_outage_rate=args.long_outages)
        result = test_crash.run_crash_cycles(store, **options)
    except SetupError:
        raise
    except BaseException:
        return title, None, traceback.format_exc()
    finally:
        if cluster is not None:
            cluster.destroy()
        if backend == "sqlite":
            import shutil
            shutil.rmtree(workdir, ignore_errors=True)
    try:
        result.check()
    except AssertionError as error:
        return title, result, str(error)
    return title, result, None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=200, help="faults per backend (200)")
    parser.add_argument("--seed", type=int, default=20261126,
                        help="seed of every random choice (20261126)")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--outages", action="store_true",
                        help="on PostgreSQL, also stop and start the database server under load")
    parser.add_argument("--db-retry", type=float, default=5.0,
                        help="the broker's --db-retry with --outages (5)")
    parser.add_argument("--max-outage", type=float, default=2.0,
                        help="outages last 0.05 s to this, with --outages (2)")
    parser.add_argument("--long-outages", type=float, default=0.1,
                        help="share of outages that outlast --db-retry, so that writes fail "
                             "with an ERROR (0.1)")
    parser.add_argument("--receipts", type=int, nargs=2, default=(10, 200), metavar=("MIN", "MAX"),
                        help="kill after this many SEND receipts (10 200)")
    parser.add_argument("--producers", type=int, default=3, help="producer connections (3)")
    parser.add_argument("--cluster", action="store_true",
                        help="PostgreSQL only: a cluster of --nodes nodes, one killed a cycle")
    parser.add_argument("--nodes", type=int, default=2, help="nodes with --cluster (2)")
    parser.add_argument("--lease-timeout", type=float, default=test_crash.CLUSTER_LEASE,
                        help="the nodes' --lease-timeout with --cluster (%g)"
                             % test_crash.CLUSTER_LEASE)
    parser.add_argument("--fsync", action="store_true", help="PostgreSQL with fsync on")
    parser.add_argument("--quiet", action="store_true", help="no line per cycle")
    parser.add_argument("--plain", action="store_true",
                        help="plain SENDs only: no delays, expiry, dedup-ids or NACKs")
    args = parser.parse_args(argv)
    if args.cluster:
        if args.outages or args.backend == "sqlite":
            parser.error("--cluster runs on PostgreSQL, without --outages")
        args.backend = "postgresql"

    backends = ("sqlite", "postgresql") if args.backend == "both" else (args.backend,)
    results = []
    try:
        for backend in backends:
            results.append(run_backend(backend, args))
    except SetupError as error:
        print("set-up failed: %s" % error, file=sys.stderr)
        return 2
    finally:
        postgres.shutdown()

    failed = False
    print()
    for title, result, failure in results:
        if result is not None:
            print(result.report("%s, %d cycles" % (title, args.cycles)))
        if failure:
            failed = True
            print("  FAILED: %s" % failure)
        else:
            print("  status=ok")
        print()
    return 1 if failed else 0


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print("total %.1f s" % (time.monotonic() - started))
    sys.exit(code)

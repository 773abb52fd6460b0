#!/usr/bin/env python3
"""pymq as a cluster (--cluster): several nodes over one PostgreSQL, measured.

    python bench/cluster.py latency  [--nodes 2] [--msgs 2000]
    python bench/cluster.py failover [--rounds 5] [--lease-timeout 15]
    python bench/cluster.py stompbench --nodes N -- STOMPBENCH ARGS...
    python bench/cluster.py table [--rounds 4] [--msgs 10000]

Each run starts a throwaway PostgreSQL server (tests/postgres.py, fsync on, as a production
server would have it) or uses --db URL, and N nodes `python pymq.py --cluster --db URL
--heart-beat 0,0`; stops everything it started at the end.

- latency: a producer on node 0 sends one message at a time (with a receipt) to a queue whose
  only consumer is on node 1, which ACKs it: the time from the SEND to the MESSAGE, through the
  store and NOTIFY (the message is stored free, node 1 is told and claims it). p50/p99/max.
- failover: a consumer on node 0 holds 10 messages without ACKing them, a consumer on node 1
  waits; node 0 is killed with SIGKILL; the time until node 1's consumer has the first of the
  10 (marked redelivered), and until it has all of them. Expect about --lease-timeout plus up
  to one heartbeat interval (lease-timeout / 5).
- stompbench: runs stompbench (../shared/tools/stompbench, built: see its README) once per
  node at the same time, each with its own queues (its own --prefix) on its own node, with the
  ARGS given; prints each summary line and the sums of msgs_per_s and broker CPU per message.
  Messages there mostly take a node's local path (a consumer of the node is ready); what the
  nodes share is the database, its commits and the claims. Also printed, from PostgreSQL:
  its CPU (the server's processes, when it runs on this machine), transactions committed and
  rows written per message: the costs bench/README's scaling estimate is made of.

- table: qr1, qr100 and drain (the rows bench/README's table shows) with 1, 2 and 3 nodes,
  --rounds times, alternating, each run on a fresh database; prints the medians (and ranges)
  as a table. --msgs is per producer.

Prints `# ` lines for people and one `key=value` summary line.
"""

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from broker_process import broker_stats, launch_broker, stop_broker  # noqa: E402
from rawstomp import BenchError, frame, stomp_connect, wait_receipt  # noqa: E402

STOMPBENCH = "/tmp/stompbench/release/stompbench"


def start_nodes(url, count, lease_timeout):
    nodes = []
    try:
        for i in range(count):
            cmd = [sys.executable, os.path.join(ROOT, "pymq.py"), "--port", "0", "--cluster",
                   "--node-name", "node%d" % i, "--db", url, "--heart-beat", "0,0",
                   "--lease-timeout", str(lease_timeout)]
            nodes.append(launch_broker(cmd))
    except BaseException:
        stop_nodes(nodes)
        raise
    return nodes


def stop_nodes(nodes):
    for proc, _ in nodes:
        stop_broker(proc)


def subscribe(port, queue, prefetch):
    sock, reader = stomp_connect("127.0.0.1", port, 30)
    sock.sendall(frame("SUBSCRIBE", [("destination", "/queue/" + queue), ("id", "1"),
                                     ("ack", "client-individual"), ("prefetch", str(prefetch)),
                                     ("receipt", "s")]))
    wait_receipt(reader, "s")
    return sock, reader


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def latency(url, options):
    nodes = start_nodes(url, max(2, options.nodes), options.lease_timeout)
    try:
        producer, preader = stomp_connect("127.0.0.1", nodes[0][1], 30)
        consumer, creader = subscribe(nodes[1][1], "latency", 1)
        times = []
        for i in range(options.msgs):
            started = time.perf_counter()
            producer.sendall(frame("SEND", [("destination", "/queue/latency"),
                                            ("receipt", "r%d" % i)], b"x" * 100))
            command, headers, _ = creader.next()
            times.append(time.perf_counter() - started)
            if command != "MESSAGE":
                raise BenchError("expected a MESSAGE, got %s" % command)
            consumer.sendall(frame("ACK", [("id", headers["ack"])]))
            wait_receipt(preader, "r%d" % i)
        ms = [t * 1000 for t in times]
        print("# cross-node delivery (SEND on node 0 -> MESSAGE on node 1), %d messages: "
              "p50 %.2f ms, p99 %.2f ms, max %.2f ms"
              % (len(ms), percentile(ms, 0.5), percentile(ms, 0.99), max(ms)))
        print("scenario=latency nodes=%d msgs=%d p50_ms=%.2f p99_ms=%.2f max_ms=%.2f status=ok"
              % (len(nodes), len(ms), percentile(ms, 0.5), percentile(ms, 0.99), max(ms)))
    finally:
        stop_nodes(nodes)


def failover(url, options):
    firsts, alls = [], []
    for round_ in range(options.rounds):
        nodes = start_nodes(url, 2, options.lease_timeout)
        try:
            queue = "failover%d" % round_
            doomed, dreader = subscribe(nodes[0][1], queue, 10)
            producer, preader = stomp_connect("127.0.0.1", nodes[1][1], 30)
            for i in range(10):
                producer.sendall(frame("SEND", [("destination", "/queue/" + queue),
                                                ("receipt", "r%d" % i)], b"%d" % i))
                wait_receipt(preader, "r%d" % i)
            for _ in range(10):
                if dreader.next()[0] != "MESSAGE":
                    raise BenchError("node 0's consumer did not get its 10 messages")
            survivor, sreader = subscribe(nodes[1][1], queue, 100)
            nodes[0][0].kill()
            killed = time.perf_counter()
            for n in range(10):
                command, headers, _ = sreader.next()
                if command != "MESSAGE" or headers.get("redelivered") != "true":
                    raise BenchError("expected a redelivered MESSAGE, got %s %r"
                                     % (command, headers))
                if n == 0:
                    firsts.append(time.perf_counter() - killed)
            alls.append(time.perf_counter() - killed)
            print("# round %d: first redelivery on node 1 %.2f s after kill -9, all 10 in %.2f s"
                  % (round_, firsts[-1], alls[-1]))
        finally:
            stop_nodes(nodes)
    print("scenario=failover lease_timeout=%g rounds=%d first_s_median=%.2f first_s_max=%.2f "
          "all_s_max=%.2f status=ok" % (options.lease_timeout, len(firsts),
                                        percentile(firsts, 0.5), max(firsts), max(alls)))


def server_cpu(data_dir):
    """CPU seconds of a local PostgreSQL server: its postmaster and the processes it forked
    (backends, WAL writer, checkpointer...), read from /proc. None without a data directory."""
    if data_dir is None:
        return None
    with open(os.path.join(data_dir, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue                            # gone meanwhile
        if int(entry) == postmaster or int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def database_activity(url):
    """(transactions committed, rows inserted + updated + deleted) of the bench database, once
    no other session is connected to it: a backend adds its counts to these when it is idle
    (at most once a second) and when it exits, so they are whole only then."""
    import psycopg2
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        conn.autocommit = True
        deadline = time.monotonic() + 30
        while True:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                        "current_database() AND pid <> pg_backend_pid()")
            if cur.fetchone()[0] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)        # the nodes' backends exiting: nothing to wait on
        cur.execute("SELECT xact_commit, tup_inserted + tup_updated + tup_deleted "
                    "FROM pg_stat_database WHERE datname = current_database()")
        commits, rows = cur.fetchone()
    conn.close()
    return commits, rows


def run_stompbench(url, options):
    activity0 = database_activity(url)      # from before the nodes start: their start-up counts
    nodes = start_nodes(url, options.nodes, options.lease_timeout)
    try:
        pg0 = server_cpu(options.data_dir)
        cpu0 = [broker_stats(proc.pid)[1] for proc, _ in nodes]
        runs = []
        for i, (proc, port) in enumerate(nodes):
            cmd = [STOMPBENCH] + options.args + ["--flavor", "pymq", "--port", str(port),
                                                 "--prefix", "n%dp%d" % (i, os.getpid())]
            runs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True))
        outputs = [run.communicate()[0] for run in runs]
        cpu1 = [broker_stats(proc.pid)[1] for proc, _ in nodes]
        pg1 = server_cpu(options.data_dir)
    finally:
        stop_nodes(nodes)
    activity1 = database_activity(url)
    total, messages, ok = 0.0, 0, True
    for i, output in enumerate(outputs):
        summary = [line for line in output.splitlines() if "status=" in line
                   and not line.startswith("#")]
        line = summary[-1] if summary else output.strip().splitlines()[-1]
        print("# node %d: %s" % (i, line))
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        ok = ok and fields.get("status") == "ok"
        total += float(fields.get("msgs_per_s", 0))
        messages += int(fields.get("delivered", fields.get("msgs", 0)) or 0)
    cpu = sum(b - a for a, b in zip(cpu0, cpu1))
    per = 1.0 / messages if messages else 0.0
    commits, rows = activity1[0] - activity0[0], activity1[1] - activity0[1]
    pg = "pg_cpu_us_per_msg=%.1f " % (1e6 * (pg1 - pg0) * per) if pg0 is not None else ""
    line = ("scenario=stompbench nodes=%d msgs_per_s_total=%.0f broker_cpu_s=%.2f "
            "broker_cpu_us_per_msg=%.1f %scommits_per_msg=%.4f rows_per_msg=%.2f "
            "rows_per_commit=%.1f status=%s"
            % (len(nodes), total, cpu, 1e6 * cpu * per, pg, commits * per, rows * per,
               rows / commits if commits else 0.0, "ok" if ok else "FAILED"))
    print(line)
    sys.stdout.flush()
    return dict(re.findall(r"(\w+)=(\S+)", line))


TABLE = {
    "qr1": "queue-receipt --producers 4 --consumers 4 --queues 4 --msgs {msgs} --window 1 "
           "--prefetch 100 --timeout 600",
    "qr100": "queue-receipt --producers 4 --consumers 4 --queues 4 --msgs {msgs} --window 100 "
             "--prefetch 100 --timeout 600",
    "drain": "queue-drain --msgs {drain} --window 100 --prefetch 100 --timeout 600",
}


def table(server, options):
    results = {}
    runs = 0
    for round_ in range(options.rounds):
        for nodes in (1, 2, 3):
            for name, args in TABLE.items():
                runs += 1
                print("# round %d, %d node(s), %s" % (round_ + 1, nodes, name))
                options.nodes = nodes
                options.args = args.format(msgs=options.msgs, drain=2 * options.msgs).split()
                url = server.create_database("bench%d" % runs)
                results.setdefault((name, nodes), []).append(run_stompbench(url, options))

    def median(rows, key):
        values = [float(row.get(key, "nan")) for row in rows]
        return statistics.median(values), min(values), max(values)

    print("| scenario | nodes | msg/s (range) | node CPU/msg | PostgreSQL CPU/msg | commits/msg "
          "| rows/msg |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for (name, nodes), rows in results.items():
        rate = median(rows, "msgs_per_s_total")
        print("| %s | %d | %.0f (%.0f–%.0f) | %.0f µs | %.0f µs | %.3f | %.2f |"
              % ((name, nodes) + rate + (median(rows, "broker_cpu_us_per_msg")[0],
                                         median(rows, "pg_cpu_us_per_msg")[0],
                                         median(rows, "commits_per_msg")[0],
                                         median(rows, "rows_per_msg")[0])))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=("latency", "failover", "stompbench", "table"))
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--msgs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lease-timeout", type=float, default=15.0)
    parser.add_argument("--db", help="a PostgreSQL database URL (default: a throwaway server)")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    options = parser.parse_args(argv[:split])
    options.args = argv[split + 1:]         # stompbench's arguments
    server = None
    try:
        url, options.data_dir = options.db, None
        if options.scenario == "table":
            import postgres
            server = postgres.new_cluster(fsync=True)
            options.data_dir = server.data
            return table(server, options)
        if url is None:
            import postgres
            server = postgres.new_cluster(fsync=True)
            url, options.data_dir = server.create_database("bench"), server.data
        {"latency": latency, "failover": failover,
         "stompbench": run_stompbench}[options.scenario](url, options)
    finally:
        if server is not None:
            server.destroy()


if __name__ == "__main__":
    main()

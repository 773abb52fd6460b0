#!/usr/bin/env python3
"""Runs the five benchmark scenarios against pymq and other STOMP brokers; prints a table.

Standard library only. pymq is started by the script, once per scenario, with its default
durable configuration (SQLite, `pymq.db` in a fresh temporary directory). Other brokers are
the ones you point at (they must already be running, on loopback for a fair comparison).
--runtime NAME=PYTHON (repeatable) makes one pymq column per Python interpreter instead of
one with this script's (a venv's python with pymq's requirements installed):

    python bench/compare.py                                         # pymq only
    python bench/compare.py --broker rabbitmq=127.0.0.1:61613:guest:guest
    python bench/compare.py --broker activemq=127.0.0.1:61614 --detect
    python bench/compare.py --stompbench /tmp/stompbench/release/stompbench   # Rust client
    python bench/compare.py --stompbench PATH --runtime cpython=python3 \
        --runtime pypy=/opt/pymq-pypy/bin/python --repeat 3      # pymq on CPython and PyPy
    python bench/compare.py --stompbench PATH --runtime ... --warmup 2   # JIT warmed first

The load generator is bench/stompload.py (Python), or, for the pymq column, the Rust
stompbench with --stompbench PATH. A broker NAME starting with `rabbitmq` gets
`persistent:true` on every SEND, the `prefetch-count` header and login guest/guest unless
given; one starting with `activemq` gets `persistent:true`, `activemq.prefetchSize` and host
`localhost`; any other name is driven like pymq. --detect adds a RabbitMQ or ActiveMQ found on
127.0.0.1:61613 (from the `server` header of its CONNECTED frame).

The table goes to stdout (markdown), progress to stderr. Exit status: 0 when every run was
ok, 1 otherwise.
"""

import argparse
import datetime
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
STOMPLOAD = os.path.join(HERE, "stompload.py")

# (key, label, stompload/stompbench scenario, options). Sizes: the reference lines of
# shared/tools/stompbench/README.md, except topic-fanout (50,000 messages instead of 20,000:
# at 20,000 a run lasts about half a second on pymq, too short to be steady).
SCENARIOS = [
    ("queue-receipt-w1", "queue-receipt W=1: {producers} producers x {msgs} msgs, "
     "{consumers} consumers ACKing, {queues} queues",
     "queue-receipt", dict(producers=4, consumers=4, queues=4, msgs=25000, window=1,
                           prefetch=100)),
    ("queue-receipt-w100", "queue-receipt W=100: {producers} producers x {msgs} msgs, "
     "{consumers} consumers ACKing, {queues} queues",
     "queue-receipt", dict(producers=4, consumers=4, queues=4, msgs=25000, window=100,
                           prefetch=100)),
    ("many-producers", "many-producers W=1: {producers} producers x {msgs} msgs, "
     "{consumers} consumers ACKing, {queues} queues",
     "queue-receipt", dict(producers=32, consumers=4, queues=4, msgs=3000, window=1,
                           prefetch=100)),
    ("queue-drain", "queue-drain: {msgs} stored msgs, 1 consumer ACKing",
     "queue-drain", dict(msgs=20000, window=100, prefetch=100)),
    ("topic-fanout", "topic-fanout W=100: {msgs} msgs to {subscribers} subscribers "
     "(deliveries/s)",
     "topic-fanout", dict(subscribers=10, msgs=50000, window=100)),
    # stompbench only: every connection its own wake-up (one SEND with a receipt a second)
    ("connections", "connections: {conns} connections x 1 SEND/s for {duration} s, "
     "round trip p50 / p99 ms",
     "connections", dict(conns=10000, interval_ms=1000, duration=20, connect_parallel=50,
                         io="epoll")),
]


class Broker:
    def __init__(self, name, host=None, port=None, login=None, passcode=None, python=None):
        self.name, self.host, self.port = name, host, port
        self.python = python or sys.executable      # pymq's interpreter (managed only)
        self.login, self.passcode = login, passcode
        self.managed = host is None                 # pymq, started by this script
        kind = name.lower()
        self.flavor = ("rabbitmq" if kind.startswith("rabbitmq") else
                       "activemq" if kind.startswith("activemq") else "pymq")
        if self.flavor == "rabbitmq" and login is None:
            self.login, self.passcode = "guest", "guest"

    def stompload_options(self):
        options = []
        if self.login is not None:
            options += ["--login", self.login]
        if self.passcode is not None:
            options += ["--passcode", self.passcode]
        if self.flavor == "rabbitmq":
            options += ["--persistent", "--prefetch-header", "prefetch-count", "--vhost", "/"]
        elif self.flavor == "activemq":
            options += ["--persistent", "--prefetch-header", "activemq.prefetchSize",
                        "--vhost", "localhost"]
        return options

    def describe(self):
        if self.managed:
            return ("pymq on %s (started by this script per scenario: SQLite pymq.db in a "
                    "temp dir)" % self.python)
        extra = {"rabbitmq": ", persistent:true, prefetch-count",
                 "activemq": ", persistent:true, activemq.prefetchSize"}.get(self.flavor, "")
        return "%s at %s:%d%s" % (self.name, self.host, self.port, extra)


def parse_runtime(text):
    name, _, python = text.partition("=")
    if not name or not python:
        raise argparse.ArgumentTypeError("expected NAME=PYTHON, got %r" % text)
    return Broker(name, python=python)


def parse_broker(text):
    match = re.match(r"^([\w.@+-]+)=([^:]+|\[[^\]]+\]):(\d+)(?::([^:]*):(.*))?$", text)
    if not match:
        raise argparse.ArgumentTypeError(
            "expected NAME=HOST:PORT or NAME=HOST:PORT:LOGIN:PASSCODE, got %r" % text)
    name, host, port, login, passcode = match.groups()
    return Broker(name, host.strip("[]"), int(port), login, passcode)


def detect(host="127.0.0.1", port=61613):
    """A Broker for a RabbitMQ or ActiveMQ STOMP listener on host:port, or None."""
    try:
        with socket.create_connection((host, port), timeout=3) as sock:
            sock.sendall(b"CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n"
                         b"heart-beat:0,0\n\n\0")
            sock.settimeout(3)
            data = b""
            while b"\0" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            try:
                sock.sendall(b"DISCONNECT\n\n\0")
            except OSError:
                pass
    except OSError as error:
        log("--detect: nothing usable on %s:%d (%s)" % (host, port, error))
        return None
    server = re.search(rb"\nserver:([^\n]*)", data)
    server = server.group(1).decode(errors="replace") if server else ""
    if not data.startswith(b"CONNECTED"):
        log("--detect: %s:%d answered %r" % (host, port, data[:100]))
        return None
    for kind in ("rabbitmq", "activemq"):
        if kind in server.lower():
            log("--detect: found %s on %s:%d" % (server, host, port))
            return Broker(kind, host, port, "guest", "guest")
    log("--detect: %s:%d is %r, neither RabbitMQ nor ActiveMQ: skipped" % (host, port, server))
    return None


def log(text):
    print(text, file=sys.stderr, flush=True)


# -- pymq -----------------------------------------------------------------------------------

class Pymq:
    """python pymq.py --port 0 in a fresh temporary directory (SQLite pymq.db there)."""

    def __init__(self, python, pymq, extra_args, timeout=60):
        self.dir = tempfile.mkdtemp(prefix="pymq-compare-")
        self.log_path = os.path.join(self.dir, "broker.log")
        self.log_file = open(self.log_path, "w")
        # PYTHON may carry words before it, e.g. "env PYPY_GC_NURSERY=64MB pypy3" (env execs:
        # the pid stays the broker's).
        cmd = shlex.split(python) + [pymq, "--port", "0"] + list(extra_args)
        self.proc = subprocess.Popen(cmd, cwd=self.dir, stdin=subprocess.DEVNULL,
                                     stdout=self.log_file, stderr=subprocess.STDOUT)
        end = time.monotonic() + timeout
        self.port = None
        while time.monotonic() < end and self.proc.poll() is None:
            with open(self.log_path) as f:
                match = re.search(r"listening on \S+:(\d+)", f.read())
            if match:
                self.port = int(match.group(1))
                break
            time.sleep(0.05)
        if self.port is None:
            tail = self.tail()
            self.stop()
            raise RuntimeError("pymq did not start: %s\n%s" % (" ".join(cmd), tail))

    def tail(self, lines=10):
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)            # pymq stops cleanly on SIGINT
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log_file.close()
        for name in os.listdir(self.dir):
            try:
                os.unlink(os.path.join(self.dir, name))
            except OSError:
                pass
        try:
            os.rmdir(self.dir)
        except OSError:
            pass


# -- one run --------------------------------------------------------------------------------

def parse_summary(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("scenario=")]
    if not lines:
        return None
    return dict(item.split("=", 1) for item in lines[-1].split() if "=" in item)


def scaled(options, scenario):
    params = dict(scenario[3])
    key = "msgs" if "msgs" in params else "conns"
    params[key] = max(1, int(round(params[key] * options.scale)))
    return params


def label(options, scenario):
    values = scaled(options, scenario)
    return scenario[1].format(**{k: "{:,}".format(v) if isinstance(v, int) else v
                                 for k, v in values.items()})


def run_one(options, broker, scenario, host, port, broker_pid):
    command, params = scenario[2], scaled(options, scenario)
    if options.stompbench and broker.managed:
        cmd = [options.stompbench, command, "--flavor", "pymq", "--host", host,
               "--port", str(port), "--broker-pid", str(broker_pid or "auto"),
               "--timeout", "%d" % options.timeout]
        if command == "queue-drain":
            cmd += ["--settle", "1"]
        tool = "stompbench"
    elif command == "connections":
        return {"status": "skipped", "msgs_per_s": "0", "tool": "stompload", "run_s": "0",
                "problem": "connections: stompbench only (--stompbench)"}
    else:
        cmd = [sys.executable, STOMPLOAD, command, "--host", host, "--port", str(port),
               "--broker-pid", str(broker_pid or "auto"), "--timeout", "%d" % options.timeout]
        cmd += broker.stompload_options()
        tool = "stompload"
    for name, value in params.items():
        cmd += ["--" + name.replace("_", "-"), str(value)]
    started = time.monotonic()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True,
                                timeout=options.timeout + 60)
        stdout, code = result.stdout, result.returncode
    except subprocess.TimeoutExpired as error:
        stdout, code = (error.stdout or b"").decode(errors="replace") \
            if isinstance(error.stdout, bytes) else (error.stdout or ""), "timeout"
    summary = parse_summary(stdout) or {"status": "FAILED", "msgs_per_s": "0"}
    if tool == "stompbench" and summary.get("status") == "ok" and \
            (summary.get("lost", "0") != "0" or summary.get("dup", "0") != "0"):
        summary["status"] = "FAILED"
    summary["tool"] = tool
    summary["exit"] = str(code)
    summary["run_s"] = "%.1f" % (time.monotonic() - started)
    if summary.get("status") != "ok":
        errors = [line for line in stdout.splitlines() if "error" in line.lower()][:3]
        summary["problem"] = "; ".join(errors) or "exit status %s" % code
        log("    " + summary["problem"])
        log("    command: " + " ".join(shlex.quote(c) for c in cmd))
    return summary


def run_scenario(options, broker, scenario):
    summaries = []
    for _ in range(options.repeat):
        if broker.managed:
            server = Pymq(broker.python, options.pymq, options.pymq_arg)
            try:
                for _ in range(options.warmup if scenario[0] != "connections" else 0):
                    # Unmeasured: PyPy's JIT compiles the hot paths meanwhile (a drain of
                    # 20,000 on PyPy: ~40,000 msg/s on a fresh broker, ~95,000 the third time).
                    run_one(options, broker, scenario, "127.0.0.1", server.port,
                            server.proc.pid)
                summary = run_one(options, broker, scenario, "127.0.0.1", server.port,
                                  server.proc.pid)
                if server.proc.poll() is not None:
                    summary["status"] = "FAILED"
                    summary["problem"] = "pymq exited: " + server.tail(3)
            finally:
                server.stop()
        else:
            summary = run_one(options, broker, scenario, broker.host, broker.port, None)
        log("  %-20s %-10s %10s msgs/s  p99 %s ms  client CPU %s%%  %s (%s s)"
            % (scenario[0], broker.name, summary.get("msgs_per_s", "?"),
               summary.get("p99_ms", "na"), summary.get("client_cpu_pct", "?"),
               summary.get("status", "?"), summary["run_s"]))
        summaries.append(summary)
    ok = [s for s in summaries if s.get("status") == "ok"]
    if not ok:
        return summaries[0], summaries
    ok.sort(key=lambda s: float(s.get("msgs_per_s", 0)))
    return ok[(len(ok) - 1) // 2], summaries                 # the (lower) median run


# -- the report -----------------------------------------------------------------------------

def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "%d CPUs (nproc), %s; %s %s; Python %s" % (
        os.cpu_count() or 0, model, platform.system(), platform.release(),
        platform.python_version())


def fmt_rate(summary):
    if summary.get("scenario") == "connections":
        text = "%s / %s ms" % (fmt(summary, "p50_ms"), fmt(summary, "p99_ms"))
        return text if summary.get("status") == "ok" else text + " FAILED"
    try:
        text = "{:,}".format(int(float(summary.get("msgs_per_s", "0"))))
    except ValueError:
        text = summary.get("msgs_per_s", "?")
    if summary.get("status") != "ok":
        text += " FAILED"
    return text


def fmt(summary, key):
    value = summary.get(key)
    if value is None or value == "na":
        return "–"
    return value


def cpu_per_message(summary):
    """Broker CPU per delivered message (topic-fanout: per delivery), µs."""
    try:
        count = float(summary.get("delivered") or summary.get("msgs") or summary["sent"])
        return "%.0f" % (1e6 * float(summary["broker_cpu_s"]) / count)
    except (KeyError, ValueError, ZeroDivisionError):
        return "–"


def report(options, brokers, results, argv, started, elapsed):
    out = []
    out.append("## Broker comparison")
    out.append("")
    out.append("- date: %s" % started.strftime("%Y-%m-%d %H:%M:%S %Z").strip())
    out.append("- machine: %s" % machine())
    out.append("- command: `python %s`" % " ".join(shlex.quote(a) for a in argv))
    for broker in brokers:
        tool = "stompbench (Rust)" if options.stompbench and broker.managed else \
            "stompload.py (Python)"
        out.append("- %s: %s; client %s" % (broker.name, broker.describe(), tool))
    if options.warmup:
        out.append("- each measured run after %d unmeasured one(s) of the same scenario on "
                   "the same fresh broker (not connections)" % options.warmup)
    out.append("- %d run(s) per cell%s; whole comparison %.0f s"
               % (options.repeat, " (median msgs/s shown)" if options.repeat > 1 else "",
                  elapsed))
    out.append("")
    out.append("Delivered messages per second (topic-fanout: deliveries to all subscribers), "
               "100-byte bodies, every SEND with a receipt, every queue message ACKed "
               "(client-individual):")
    out.append("")
    out.append("| scenario | " + " | ".join(b.name for b in brokers) + " |")
    out.append("|---|" + "---:|" * len(brokers))
    for scenario in SCENARIOS:
        if scenario[0] not in options.only:
            continue
        cells = [fmt_rate(results[(b.name, scenario[0])]) for b in brokers]
        out.append("| %s | %s |" % (label(options, scenario), " | ".join(cells)))
    out.append("")
    out.append("Details (latency: end-to-end, SEND to delivery; client CPU: all client "
               "processes, 100 = one core; busiest: the busiest client process, near 100 "
               "means the client sets the pace):")
    out.append("")
    out.append("| scenario | broker | msgs/s | p50 ms | p99 ms | lost | dup | client CPU % "
               "| busiest client proc % | broker CPU % | broker CPU µs/msg | status |")
    out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for scenario in SCENARIOS:
        if scenario[0] not in options.only:
            continue
        for b in brokers:
            s = results[(b.name, scenario[0])]
            broker_cpu = s.get("broker_cpu_pct")
            if broker_cpu is None and s.get("broker_cpu_s") not in (None, "na") \
                    and s.get("wall_s"):
                broker_cpu = "%.1f" % (100 * float(s["broker_cpu_s"]) / float(s["wall_s"]))
            out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                scenario[0], b.name, fmt(s, "msgs_per_s"), fmt(s, "p50_ms"), fmt(s, "p99_ms"),
                fmt(s, "lost"), fmt(s, "dup"), fmt(s, "client_cpu_pct"),
                fmt(s, "client_proc_pct_max"), broker_cpu or "–", cpu_per_message(s),
                s.get("status", "?") + ("" if s.get("tool") == "stompload" else
                                        " (" + s.get("tool", "?") + ")")))
    problems = [(b.name, scenario[0], results[(b.name, scenario[0])]["problem"])
                for scenario in SCENARIOS if scenario[0] in options.only for b in brokers
                if results[(b.name, scenario[0])].get("problem")]
    if problems:
        out.append("")
        for name, key, problem in problems:
            out.append("- %s / %s: %s" % (name, key, problem))
    return "\n".join(out)


def main(argv=None):
    argv = sys.argv if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", action="append", type=parse_broker, default=[],
                        metavar="NAME=HOST:PORT[:LOGIN:PASSCODE]",
                        help="another broker to measure (repeatable)")
    parser.add_argument("--detect", action="store_true",
                        help="also use a RabbitMQ or ActiveMQ found on 127.0.0.1:61613")
    parser.add_argument("--no-pymq", action="store_true", help="leave pymq out")
    parser.add_argument("--runtime", action="append", type=parse_runtime, default=[],
                        metavar="NAME=PYTHON",
                        help="a pymq column run by this interpreter (repeatable); default: "
                             "one column, this script's interpreter")
    parser.add_argument("--pymq", default=os.path.join(ROOT, "pymq.py"),
                        help="pymq.py to start (%(default)s)")
    parser.add_argument("--pymq-arg", action="append", default=[], metavar="ARG",
                        help="extra pymq option, e.g. --pymq-arg=--db=memory: (repeatable)")
    parser.add_argument("--stompbench", default=None, metavar="PATH",
                        help="measure the pymq column with this stompbench binary instead of "
                             "stompload.py")
    parser.add_argument("--only", default=",".join(s[0] for s in SCENARIOS),
                        help="comma-separated scenarios (default: all): "
                             + ", ".join(s[0] for s in SCENARIOS))
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every message count by this (1.0)")
    parser.add_argument("--warmup", type=int, default=0, metavar="N",
                        help="before each measured run, the same scenario N times on the same "
                             "broker, unmeasured (not connections) (0)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per scenario and broker; the median is shown (1)")
    parser.add_argument("--timeout", type=float, default=300,
                        help="bound on each run, seconds (300)")
    options = parser.parse_args(argv[1:])
    options.only = [x.strip() for x in options.only.split(",") if x.strip()]
    unknown = set(options.only) - {s[0] for s in SCENARIOS}
    if unknown:
        parser.error("unknown scenario(s): %s" % ", ".join(sorted(unknown)))
    if options.repeat < 1 or options.scale <= 0 or options.warmup < 0:
        parser.error("--repeat must be >= 1, --scale > 0 and --warmup >= 0")
    if options.stompbench and not os.access(options.stompbench, os.X_OK):
        parser.error("--stompbench %s is not an executable" % options.stompbench)

    brokers = [] if options.no_pymq else options.runtime or [Broker("pymq")]
    brokers += options.broker
    if options.detect:
        found = detect()
        if found and not any((b.host, b.port) == (found.host, found.port)
                             for b in options.broker):
            brokers.append(found)
    names = [b.name for b in brokers]
    if len(set(names)) != len(names):
        parser.error("broker names must differ: %s" % ", ".join(names))
    if not brokers:
        parser.error("no broker to measure")

    started = datetime.datetime.now().astimezone()
    t0 = time.monotonic()
    results = {}
    for scenario in SCENARIOS:
        if scenario[0] not in options.only:
            continue
        log(label(options, scenario))
        for broker in brokers:
            try:
                results[(broker.name, scenario[0])], _ = run_scenario(options, broker,
                                                                      scenario)
            except (RuntimeError, OSError) as error:
                log("    %s" % error)
                results[(broker.name, scenario[0])] = {"status": "FAILED", "msgs_per_s": "0",
                                                       "problem": str(error).splitlines()[0],
                                                       "tool": "stompload", "run_s": "0"}
    print(report(options, brokers, results, argv, started, time.monotonic() - t0), flush=True)
    return 0 if all(s.get("status") == "ok" for s in results.values()) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)

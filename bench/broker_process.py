"""The broker under test as a process, for the benchmark scripts (standard library only):
launch_broker() starts a pymq command line and reads its port from the log, stop_broker()
stops it cleanly, find_listener_pid() finds a running broker by its port, broker_stats()
reads its RSS and CPU from /proc, cpu_times() its CPU as user and system."""

import os
import re
import signal
import subprocess
import sys
import threading

from rawstomp import BenchError


def launch_broker(cmd, cwd=None):
    """Start a pymq command line (with --port 0); returns (process, port). Its log is read
    for the port, then drained so that the pipe never fills, warnings and errors echoed."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    found = threading.Event()
    port, early = [], []

    def drain():
        for line in proc.stderr:
            match = re.search(r"listening on \S+:(\d+)", line)
            if match and not port:
                port.append(int(match.group(1)))
                found.set()
            elif not port:
                early.append(line)
            elif "WARNING" in line or "ERROR" in line or "Traceback" in line:
                sys.stderr.write("broker: " + line)
        found.set()

    threading.Thread(target=drain, daemon=True).start()
    if not found.wait(30) or not port:
        stop_broker(proc)
        raise BenchError("broker did not start: %s\n%s" % (" ".join(cmd), "".join(early[-10:])))
    return proc, port[0]


def stop_broker(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)         # pymq stops cleanly on SIGINT
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def find_listener_pid(port):
    """PID of the process listening on TCP `port` (from /proc), or None."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add("socket:[%s]" % fields[9])
        except OSError:
            pass
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fd_dir = "/proc/%s/fd" % pid
            for fd in os.listdir(fd_dir):
                if os.readlink(os.path.join(fd_dir, fd)) in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


def broker_stats(pid):
    """(RSS in KiB, CPU seconds) of `pid`, or (None, None)."""
    if pid is None:
        return None, None
    try:
        with open("/proc/%d/status" % pid) as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return rss, sum(cpu_times(pid))
    except (OSError, StopIteration, ValueError):
        return None, None


def cpu_times(pid):
    """(user, system) CPU seconds of `pid`, from /proc; OSError if it is gone."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick

"""A throwaway PostgreSQL server for the tests.

initdb in a temporary directory, a unix socket there, a free port, trust authentication. As
root (CI runs as root, and PostgreSQL refuses to), the server runs as `nobody`. Each test gets
a fresh database with fresh_database_url(). PYMQ_TEST_POSTGRES_DSN=postgresql://... uses a
server you run instead (its user needs CREATEDB).

Where no PostgreSQL binaries exist the tests that need one are skipped with a message saying
how to install them, unless PYMQ_REQUIRE_POSTGRES=1 (as .ci/run sets), which fails them.
"""

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import urllib.parse

import pytest

import pymq_storage

_cluster = None
_databases = itertools.count(1)
INSTALL_HINT = ("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin "
                "(install them: apt-get install postgresql), or set PYMQ_TEST_POSTGRES_DSN")


class Cluster:
    def __init__(self, bindir, fsync=False):
        self.bindir = bindir
        self.fsync = fsync
        self.dir = tempfile.mkdtemp(prefix="pymq-pg-")
        self.data = os.path.join(self.dir, "data")
        self.log = os.path.join(self.dir, "server.log")
        self.user = "nobody" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.dir, self.user)
        self.port = _free_port()
        self._run("initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync")
        self.start()

    def _run(self, program, *args):
        command = [os.path.join(self.bindir, program), *args]
        if self.user:
            command = ["runuser", "-u", self.user, "--"] + command
        result = subprocess.run(command, capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError("%s failed: %s%s" % (program, result.stdout, result.stderr))

    def start(self):
        # fsync off for the tests: they kill the broker, never the machine; commits still
        # wait for the server (synchronous_commit stays on), which is what pymq relies on.
        # Benchmarks turn it on.
        self._run("pg_ctl", "-D", self.data, "-l", self.log, "-w", "-t", "30", "-o",
                  "-p %d -k %s -c listen_addresses='' -c fsync=%s -c max_connections=200"
                  % (self.port, self.dir, "on" if self.fsync else "off"), "start")

    def stop(self, mode="fast"):
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "30", "stop")

    def create_database(self, name="pymq"):
        return create_database(self.url, name)

    def url(self, database):
        return "postgresql:///%s?%s" % (database, urllib.parse.urlencode(
            {"host": self.dir, "port": self.port, "user": "postgres"}))

    def destroy(self):
        try:
            self.stop("immediate")
        except Exception:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_bindir():
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda path: int(path.split("/")[4]) if path.split("/")[4].isdigit()
                        else 0)
    return os.path.dirname(candidates[-1]) if candidates else None


def unavailable(reason):
    if os.environ.get("PYMQ_REQUIRE_POSTGRES") == "1":
        pytest.fail("PostgreSQL tests are required here (PYMQ_REQUIRE_POSTGRES=1): " + reason)
    pytest.skip(reason)


def new_cluster(fsync=False):
    """A cluster of its own (for tests that stop and start the server); destroy() it."""
    bindir = find_bindir()
    if bindir is None:
        unavailable(INSTALL_HINT)
    return Cluster(bindir, fsync)


def server_url(database):
    """The URL of `database` on the shared server, starting it on first use."""
    global _cluster
    dsn = os.environ.get("PYMQ_TEST_POSTGRES_DSN")
    if dsn:
        parts = urllib.parse.urlsplit(dsn)
        return urllib.parse.urlunsplit(parts._replace(path="/" + database))
    if _cluster is None:
        _cluster = new_cluster()
    return _cluster.url(database)


def create_database(url_of, name):
    """(Re)create database `name` on the server whose database URLs url_of() gives; its URL."""
    psycopg2 = pymq_storage.import_psycopg2()
    admin = psycopg2.connect(url_of("postgres"))
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute("DROP DATABASE IF EXISTS %s" % name)
        cursor.execute("CREATE DATABASE %s" % name)
    admin.close()
    return url_of(name)


def fresh_database_url():
    """A new, empty database on the shared test server."""
    return create_database(server_url, "pymq_test_%d_%d" % (os.getpid(), next(_databases)))


def shutdown():
    global _cluster
    if _cluster is not None:
        _cluster.destroy()
        _cluster = None

"""Storage backends for pymq behind one interface (see base.py for the contract).

open_storage(url) picks the backend from the URL:

    memory:                 non-durable, this process only
    sqlite:///PATH, PATH    SQLite file (the default: pymq.db in the working directory)
    postgresql://...        PostgreSQL (libpq URI: postgresql://user:pass@host:port/dbname)
"""

import re

from .base import (DEFAULT_PRIORITY, Backend, Count, Load, Storage, StorageError,  # noqa: F401
                   StoredMessage, before, now_ms)


def import_psycopg2():
    """The psycopg2 module. On PyPy it is psycopg2cffi (psycopg2 is CPython-only), which has
    the same API and registers itself under psycopg2's name, so that `import psycopg2` and
    psycogreen (through psycopg2.extensions) find it. Imported when a PostgreSQL store is
    used, not before."""
    try:
        import psycopg2
    except ImportError:
        from psycopg2cffi import compat
        compat.register()
        import psycopg2
    return psycopg2


def open_backend(url):
    """The Backend for `url`, not opened yet."""
    if url == "memory:":
        from .memory import MemoryBackend
        return MemoryBackend()
    if url.startswith(("postgresql://", "postgres://")):
        from .postgresql import PostgreSQLBackend
        return PostgreSQLBackend(url)
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if path.startswith("/"):
            path = path[1:] or path    # sqlite:///rel/path -> rel/path, sqlite:////abs -> /abs
        from .sqlite import SQLiteBackend
        return SQLiteBackend(path)
    if "://" in url or url.endswith(":"):
        raise ValueError("unknown storage URL %r (use memory:, sqlite:///PATH, a path, or "
                         "postgresql://...)" % url)
    from .sqlite import SQLiteBackend
    return SQLiteBackend(url)


def open_storage(url, retry_for=30.0, node=None):
    """Open the store at `url` with group commit; call from a gevent greenlet. A batch that
    fails for a transient reason (the database went away) is retried for `retry_for` s.
    node: (name, lease timeout) of this node of a cluster sharing the store (PostgreSQL)."""
    if node is None:
        backend = open_backend(url)
    elif url.startswith(("postgresql://", "postgres://")):
        from .postgresql import ClusterBackend
        backend = ClusterBackend(url, *node)
    else:
        raise ValueError("a cluster needs a PostgreSQL store (--db postgresql://...), not %s"
                         % url.split(":")[0])
    return Storage(backend, retry_for).open()


def without_password(url):
    """A storage URL fit for a log line."""
    url = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
    return re.sub(r"(password=)[^&]*", r"\1***", url)

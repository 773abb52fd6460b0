"""Storage backends for pymq behind one interface (see base.py for the contract).

open_storage(url) picks the backend from the URL:

    memory:                 non-durable, this process only
    sqlite:///PATH, PATH    SQLite file (the default: pymq.db in the working directory)
"""

from .base import (DEFAULT_PRIORITY, Backend, Count, Load, Storage, StorageError,  # noqa: F401
                   StoredMessage)


def open_backend(url):
    """The Backend for `url`, not opened yet."""
    if url == "memory:":
        from .memory import MemoryBackend
        return MemoryBackend()
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if path.startswith("/"):
            path = path[1:] or path    # sqlite:///rel/path -> rel/path, sqlite:////abs -> /abs
        from .sqlite import SQLiteBackend
        return SQLiteBackend(path)
    if "://" in url or url.endswith(":"):
        raise ValueError("unknown storage URL %r (use memory:, sqlite:///PATH or a path)" % url)
    from .sqlite import SQLiteBackend
    return SQLiteBackend(url)


def open_storage(url):
    """Open the store at `url` with group commit; call from a gevent greenlet."""
    return Storage(open_backend(url)).open()

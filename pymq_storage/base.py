"""The storage contract, and group commit.

A queue message lives in storage from the SEND until it is ACKed. The broker keeps in memory
only which messages are in flight and a bounded buffer of ready ones per active queue; after a
crash, everything still stored is delivered again (at-least-once).

A backend (memory.py, sqlite.py, postgresql.py) implements `Backend`: three calls, each run by
one greenlet at a time, in order:

- ``open() -> int``: create or check the schema; return the next free sequence number, higher
  than any this store ever handed out (message ids stay unique across restarts).
- ``apply(inserts, deletes, reads, next_seq) -> results``: in ONE transaction, store `inserts`
  (StoredMessage), delete the sequence numbers in `deletes` and, when `next_seq` is not None,
  record that sequence numbers below it are taken (reserved: see Storage.new_message); make it
  durable (commit and fsync) before returning; then answer `reads`
  (Load, Count) against the new state, one result each, in order: ``answer(reads)`` does it
  with the backend's ``read(read)`` and ``queues_holding(names)``. If it raises, none of the
  writes happened.
- ``close()``.
- ``is_transient(error) -> bool``: whether a failed apply() is worth retrying (the database
  went away). Storage then retries the same batch with back-off, for up to `retry_for`
  seconds, before failing its waiters; apply() must therefore be safe to repeat.

`Storage` wraps a backend with group commit: every write and read from every greenlet goes into
the pending batch; one committer greenlet applies a batch at a time and starts the next as soon
as the previous commits, so N concurrent senders share one fsync and all the waiters of a batch
wake together. A delete for a message whose insert is still pending cancels both: the message is
never written, and a batch that cancellations emptied completes without a round trip. Reads
ride in the batch after its writes, so a read sees every write asked for before it (a count is
exact; a load never misses a message sent before it was asked for, nor returns one ACKed before
it was asked for).
"""

import logging
import time

import gevent
import gevent.event

log = logging.getLogger("pymq.storage")

DEFAULT_PRIORITY = 4
# Sequence numbers (message ids) are reserved durably this many at a time, before any is handed
# out: a message may be delivered before its insert commits, so a crash must not let its id be
# given to another message. A restart skips what was left of the reservation.
SEQ_RESERVATION = 100000


class StorageError(Exception):
    """The store could not carry out a batch: its writes did not happen."""


class StoredMessage:
    """A queue message as stored. `headers` are the user headers to forward, (name, value)
    pairs. Delivery order is by `key`: higher priority first, then arrival (seq).

    `sender` is the broker's, not the store's: the connection that owes a RECEIPT for this
    SEND until the message is durable or ACKed, else None."""

    __slots__ = ("seq", "queue", "priority", "ack_timeout", "headers", "body", "sender")

    def __init__(self, seq, queue, priority, ack_timeout, headers, body):
        self.seq = seq
        self.queue = queue
        self.priority = priority
        self.ack_timeout = ack_timeout
        self.headers = headers
        self.body = body
        self.sender = None

    @property
    def key(self):
        return (-self.priority, self.seq)

    @property
    def size(self):
        """Roughly the bytes this message holds in memory."""
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + 100

    def __repr__(self):
        return "StoredMessage(%d, %r, priority=%d)" % (self.seq, self.queue, self.priority)


class Load:
    """Read: up to `limit` messages of `queue` whose key is after `after` (None: from the
    start), in delivery order. `callback`: see Storage.load_async()."""

    __slots__ = ("queue", "after", "limit", "callback")

    def __init__(self, queue, after, limit, callback=None):
        self.queue = queue
        self.after = after
        self.limit = limit
        self.callback = callback


class Count:
    """Read: how many messages of `queue` are stored."""

    __slots__ = ("queue",)
    callback = None

    def __init__(self, queue):
        self.queue = queue


class Holding:
    """Read: which of the queue names `names` have stored messages (a set). See
    Storage.probe_async()."""

    __slots__ = ("names",)
    callback = None

    def __init__(self, names):
        self.names = names


class Backend:
    """What a storage backend implements; see the module docstring for the contract."""

    # True when calls block the OS thread (sqlite3): Storage then runs them in one thread of
    # their own, so that the gevent hub never waits on the disk.
    blocking = False

    def open(self):
        raise NotImplementedError

    def apply(self, inserts, deletes, reads, next_seq):
        raise NotImplementedError

    def close(self):
        raise NotImplementedError

    def is_transient(self, error):
        return False

    def answer(self, reads):
        """The results of `reads`, in order, for apply()."""
        return [self.queues_holding(read.names) if read.__class__ is Holding
                else self.read(read) for read in reads]

    def read(self, read):
        """The result of one Load or Count."""
        raise NotImplementedError

    def queues_holding(self, names):
        """The set of those of the queue names `names` that have stored messages."""
        raise NotImplementedError


class Batch:
    """Writes and reads that will be applied in one transaction."""

    __slots__ = ("inserts", "deletes", "reads", "probes", "next_seq", "results", "bytes",
                 "done", "error", "used")

    def __init__(self):
        self.inserts = {}           # seq -> StoredMessage
        self.deletes = []
        self.reads = []
        self.probes = None      # queue names of probe_async(), once there are any
        self.next_seq = None    # a reservation of sequence numbers to record
        self.results = None
        self.bytes = 0
        self.done = gevent.event.Event()
        self.error = None
        self.used = False       # someone may wait on it, even if cancellations emptied it

    def __bool__(self):
        return self.used

    def wait(self):
        """Block the calling greenlet until the batch is durable; raise StorageError if not."""
        self.done.wait()
        if self.error is not None:
            raise self.error


def _capture(function, *args):
    try:
        return True, function(*args)
    except Exception as error:
        return False, error


class Storage:
    """Group commit over a Backend. All methods are called from greenlets of one hub."""

    def __init__(self, backend, retry_for=30.0):
        self.backend = backend
        self.retry_for = retry_for  # seconds a batch is retried through an outage
        self.pending_bytes = 0      # bytes of inserts not yet committed: the async budget
        self.stats = {"batches": 0, "inserts": 0, "deletes": 0, "cancelled": 0}
        self._next_seq = None
        self._reserved = None       # sequence numbers below this are durably reserved
        self._pending = Batch()
        self._wake = gevent.event.Event()
        self._committed = gevent.event.Event()
        self._committer = None
        self._current = None        # the batch being applied
        self._closing = False
        self._pool = None
        self._outage = None         # when the current outage began
        # Called with the messages of a batch that failed: they were never stored.
        self.on_insert_failed = None
        # Called as on_probed(batch, held) once a batch with probes (probe_async) is applied.
        self.on_probed = None

    def open(self):
        if self.backend.blocking:
            from gevent.threadpool import ThreadPool
            self._pool = ThreadPool(1)       # one OS thread does all of the backend's work
        try:
            self._next_seq = self._call(self.backend.open)
            self._reserved = self._next_seq + SEQ_RESERVATION
            self._call(self.backend.apply, [], [], [], self._reserved)
        except BaseException:
            self._call(self.backend.close)
            if self._pool is not None:
                self._pool.kill()
            raise
        self._committer = gevent.spawn(self._commit_loop)
        return self

    def _call(self, function, *args):
        if self._pool is None:
            return function(*args)
        # The exception travels back as a value, to be raised here, in the calling greenlet
        # (the thread pool would print its own traceback for it).
        ok, result = self._pool.apply(_capture, (function,) + args)
        if not ok:
            raise result
        return result

    def new_message(self, queue, priority, ack_timeout, headers, body):
        """A message with the next sequence number; may wait for a durable reservation."""
        while self._next_seq >= self._reserved:
            self._reserve()
        seq = self._next_seq
        self._next_seq += 1
        return StoredMessage(seq, queue, priority, ack_timeout, headers, body)

    def _reserve(self):
        batch = self._pending
        batch.used = True
        target = self._next_seq + SEQ_RESERVATION
        batch.next_seq = max(batch.next_seq or 0, target)
        self._wake.set()
        batch.wait()
        self._reserved = max(self._reserved, target)

    # -- writes --------------------------------------------------------------------------------

    def save(self, message):
        """Queue the message for the next batch; returns the Batch to wait on for durability."""
        batch = self._pending
        batch.used = True
        batch.inserts[message.seq] = message
        size = message.size
        batch.bytes += size
        self.pending_bytes += size
        self._wake.set()
        return batch

    def delete(self, seq):
        """The message was ACKed: delete it. Returns the Batch to wait on for the deletion to
        be durable, or None if it cancelled the message's pending insert (nothing to wait
        for: the message is never written)."""
        batch = self._pending
        message = batch.inserts.pop(seq, None)
        if message is not None:
            size = message.size
            batch.bytes -= size
            self.pending_bytes -= size
            self.stats["cancelled"] += 1
            return None
        batch.used = True
        batch.deletes.append(seq)
        self._wake.set()
        return batch

    def wait_for_budget(self, budget):
        """Block the caller while uncommitted inserts hold more than `budget` bytes."""
        while self.pending_bytes > budget:
            self._committed.wait()

    # -- reads ---------------------------------------------------------------------------------

    def _read(self, read):
        batch = self._pending
        batch.used = True
        index = len(batch.reads)
        batch.reads.append(read)
        self._wake.set()
        batch.wait()
        return batch.results[index]

    def load(self, queue, after, limit):
        return self._read(Load(queue, after, limit))

    def count(self, queue):
        return self._read(Count(queue))

    def load_async(self, queue, after, limit, callback):
        """load() without blocking and without a greenlet: returns the Load; the committer
        calls callback(load, messages), or callback(load, None) if the batch failed, once
        the batch is applied. The callback must not block. (The Load tells the answers apart,
        so one bound method serves every queue: no closure per refill.)"""
        batch = self._pending
        batch.used = True
        load = Load(queue, after, limit, callback)
        batch.reads.append(load)
        self._wake.set()
        return load

    def probe_async(self, name):
        """Ask whether queue `name` holds any message, without blocking and for the price of
        a list slot: a million workers may subscribe at once, each to a queue of its own.
        Returns the Batch the question rides in; once it is applied, the committer calls
        on_probed(batch, held): `held` is the set of the names of batch.probes that hold
        messages, or None if the batch failed."""
        batch = self._pending
        batch.used = True
        if batch.probes is None:
            batch.probes = []
        batch.probes.append(name)
        self._wake.set()
        return batch

    # -- the committer -------------------------------------------------------------------------

    def _commit_loop(self):
        while True:
            self._wake.wait()
            self._wake.clear()
            if not self._pending:
                if self._closing:
                    return
                continue
            # In a call of its own, so that nothing of the batch (say the probes of 100,000
            # new subscriptions, with their answer) stays referenced while the loop waits.
            self._commit()
            if self._pending or self._closing:
                self._wake.set()

    def _commit(self):
        """Apply the pending batch; wake its waiters, run its callbacks."""
        batch, self._pending = self._pending, Batch()
        self._current = batch
        if batch.probes:
            batch.reads.append(Holding(batch.probes))      # after the reads asked for
        try:
            if batch.inserts or batch.deletes or batch.reads or batch.next_seq is not None:
                batch.results = self._apply(batch)
            else:
                batch.results = []      # cancellations emptied it: no round trip
        except Exception as error:
            if self._outage is None:
                log.error("storage batch failed: %s", error)
                log.debug("storage batch failed", exc_info=True)
            else:
                log.error("storage batch failed: still unavailable after %g s",
                          self.retry_for)
            batch.error = StorageError(str(error).strip() or error.__class__.__name__)
            if batch.inserts and self.on_insert_failed is not None:
                self.on_insert_failed(list(batch.inserts.values()))
        else:
            self.stats["batches"] += 1
            self.stats["inserts"] += len(batch.inserts)
            self.stats["deletes"] += len(batch.deletes)
        self.pending_bytes -= batch.bytes
        self._current = None
        batch.done.set()
        for index, read in enumerate(batch.reads):
            if read.callback is None:
                continue
            try:
                read.callback(read, None if batch.error is not None else batch.results[index])
            except Exception:
                log.exception("storage callback failed")
        if batch.probes and self.on_probed is not None:
            try:
                self.on_probed(batch, None if batch.error is not None else batch.results[-1])
            except Exception:
                log.exception("storage callback failed")
        committed, self._committed = self._committed, gevent.event.Event()
        committed.set()

    def barrier(self):
        """A Batch that completes once everything asked for so far is durable."""
        batch = self._pending
        batch.used = True
        self._wake.set()
        return batch

    def _apply(self, batch):
        """Apply a batch; through an outage, retry it with back-off for up to retry_for
        seconds. Logged once when the outage begins and once when it ends."""
        deadline = None
        delay = 0.05
        while True:
            try:
                results = self._call(self.backend.apply, list(batch.inserts.values()),
                                     batch.deletes, batch.reads, batch.next_seq)
            except Exception as error:
                if not self.backend.is_transient(error):
                    raise
                now = time.monotonic()
                if self._outage is None:
                    self._outage = now
                    log.error("storage unavailable (%s); retrying",
                              str(error).strip() or error.__class__.__name__)
                if deadline is None:
                    deadline = now + self.retry_for
                if now + delay > deadline:
                    raise
                gevent.sleep(delay)
                delay = min(2 * delay, 2.0)
                continue
            if self._outage is not None:
                log.warning("storage available again after %.1f s",
                            time.monotonic() - self._outage)
                self._outage = None
            return results

    def flush(self):
        """Wait until everything asked for so far is committed."""
        batch = self._pending if self._pending else self._current
        if batch is not None:
            self._wake.set()
            batch.done.wait()

    def close(self):
        """Commit what is pending, then close the backend."""
        if self._committer is None:
            return
        self._closing = True
        self._wake.set()
        self._committer.join()
        self._committer = None
        self._call(self.backend.close)
        if self._pool is not None:
            self._pool.kill()

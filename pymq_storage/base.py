"""The storage contract, and group commit.

A queue message lives in storage from the SEND until it is ACKed (or purged, or dropped when it
expires). The broker keeps in memory only which messages are in flight and a bounded buffer of
ready ones per active queue; after a crash, everything still stored is delivered again
(at-least-once).

A stored message has, besides its queue, priority, seq, headers and body, three fields that
make its life (beanstalkd's job record keeps the same):

- ``due``: epoch milliseconds before which it is not delivered (a delay, or a retry back-off);
  0 once it is ready. Only ready messages are loaded; ``Promote`` makes due ones ready.
- ``expires``: epoch milliseconds after which it is never delivered; 0: never.
- ``deliveries``: how many times it was delivered; written after the delivery, in a later
  batch, so a MESSAGE never waits for it.

and ``dead_letter``: it is in a dead-letter queue (never expires, never dead-lettered again).

Delivery order is by `key`: higher priority first, then arrival (seq).

A backend (memory.py, sqlite.py, postgresql.py) implements `Backend`; each call is made by one
greenlet at a time, in order:

- ``open() -> int``: create, check or upgrade the schema; return the next free sequence number,
  higher than any this store ever handed out (message ids stay unique across restarts).
- ``apply(batch) -> results``: in ONE transaction, carry out the batch's writes in this order:
  its inserts (an insert with a de-duplication key is skipped when another message of its queue
  holds that key, unexpired: its seq goes into ``batch.duplicates``), its updates (a message's
  ``deliveries`` and ``due``), its operations (``batch.ops``: DeadLetter, Move, Purge, Promote,
  ForgetKeys, Import, in order; each gets its ``result``), its deletes, and, when
  ``batch.next_seq`` is not None, the record that sequence numbers below it are taken (see
  Storage.new_message). Make it durable (commit and fsync) before returning; then answer
  ``batch.reads`` (Load, Count, Holding, Expired, Stored, Depths, QueueNames, Counts, Peek)
  against the new state, one result each, in order. If it raises, none of the writes happened. `Backend.answer()` dispatches the reads.
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

Messages can also appear in a queue's storage without the broker having put them there in
memory: a de-duplicated SEND once its insert commits, a dead letter, a move, a delayed message
falling due, an import. After each batch Storage tells the broker, ``on_arrived({queue:
key})``: in each queue, stored messages may now exist from that key on (None: anywhere);
``on_arrived(None)`` means anything may have changed (a batch was retried through an outage
and its effects may have been applied twice, the first time unseen).
"""

import bisect
import logging
import sys
import time

import gevent
import gevent.event

log = logging.getLogger("pymq.storage")

DEFAULT_PRIORITY = 4
# Sequence numbers (message ids) are reserved durably this many at a time, before any is handed
# out: a message may be delivered before its insert commits, so a crash must not let its id be
# given to another message. A restart skips what was left of the reservation.
SEQ_RESERVATION = 100000
BLOCK_AGE = 1.0         # seconds a cluster node uses a block of seqs at most (see new_message)
# A batch nobody waits for yet, whose inserts are of messages already delivered to consumers,
# waits until the oldest of them has waited this long for its ACK, which cancels the insert
# (and its delete): at W=1 with consumers keeping up, most messages are never written
# (Storage._hold, bench/README).
HOLD_FOR_ACKS = 0.002
# ... and deletes and delivery counts nobody waits for ride along in it for up to this long.
HOLD_OTHERS = 0.02
LEASE_SAFETY = 0.8      # a cluster node stops delivering this far into its lease: the rest
                        # covers clocks that run at different rates


class StorageError(Exception):
    """The store could not carry out a batch: its writes did not happen."""


class StoredMessage:
    """A queue message as stored (see the module docstring for the fields). `headers` are the
    user headers to forward, (name, value) pairs; `body` is None in an Expired read.

    `sender` is the broker's, not the store's: the connection that owes a RECEIPT for this
    SEND until the message is durable or ACKed, else None."""

    __slots__ = ("seq", "queue", "priority", "ack_timeout", "headers", "body", "due", "expires",
                 "deliveries", "dead_letter", "sender", "size")

    def __init__(self, seq, queue, priority, ack_timeout, headers, body, due=0, expires=0,
                 deliveries=0, dead_letter=False, size=None):
        self.seq = seq
        self.queue = queue
        self.priority = priority
        self.ack_timeout = ack_timeout
        self.headers = headers
        self.body = body
        self.due = due
        self.expires = expires
        self.deliveries = deliveries
        self.dead_letter = dead_letter
        self.sender = None
        # Roughly the bytes it holds in memory, once: a backend loading it (or an import) may
        # pass a figure cheaper to get there (the length of the stored headers).
        if size is None:
            size = len(body or b"") + sum(len(k) + len(v) for k, v in headers) + 100
        self.size = size

    @property
    def key(self):
        return (-self.priority, self.seq)

    def copy(self):
        return StoredMessage(self.seq, self.queue, self.priority, self.ack_timeout,
                             self.headers, self.body, self.due, self.expires, self.deliveries,
                             self.dead_letter, self.size)

    def __repr__(self):
        return "StoredMessage(%d, %r, priority=%d)" % (self.seq, self.queue, self.priority)


def before(key):
    """The cursor just before `key`: a Load after it starts with the message at `key`."""
    return (key[0], key[1] - 1)


# -- reads ------------------------------------------------------------------------------------

class Load:
    """Read: up to `limit` ready messages (due 0) of `queue` whose key is after `after` (None:
    from the start), in delivery order. `callback`: see Storage.load_async()."""

    __slots__ = ("queue", "after", "limit", "callback", "batch")

    def __init__(self, queue, after, limit, callback=None):
        self.queue = queue
        self.after = after
        self.limit = limit
        self.callback = callback
        self.batch = None       # the Batch it rides in (load_async)


class Count:
    """Read: (messages, delayed) of `queue`: stored messages, and those of them not yet due at
    `now` (epoch ms), neither counting an expired one."""

    __slots__ = ("queue", "now")
    callback = None

    def __init__(self, queue, now):
        self.queue = queue
        self.now = now


class Holding:
    """Read: which of the queue names `names` have ready messages (a set). See
    Storage.probe_async()."""

    __slots__ = ("names",)
    callback = None

    def __init__(self, names):
        self.names = names


class Stored:
    """Read: how many messages the store holds, all queues together (see Storage.stored)."""

    __slots__ = ()
    callback = None


class Depths:
    """Read: [(queue, messages)] of the queues whose names match the glob `pattern` (fnmatch's
    ``*``, ``?``, ``[...]`` and ``[!...]``, case-sensitive) and hold messages, at most `limit`
    of them, in name order; messages counted as Count counts them at `now`."""

    __slots__ = ("pattern", "limit", "now")
    callback = None

    def __init__(self, pattern, limit, now):
        self.pattern = pattern
        self.limit = limit
        self.now = now


class QueueNames:
    """Read: the names of up to `limit` queues that hold messages, whose names start with
    `prefix` and come after `after` (None: from the first), in the store's name order: one page
    of a listing that may be a million queues long (the web console). Each step is an index
    probe, whatever the queues hold."""

    __slots__ = ("prefix", "after", "limit")
    callback = None

    def __init__(self, prefix, after, limit):
        self.prefix = prefix
        self.after = after
        self.limit = limit


def skip_scan(limit, first, probe):
    """The names of a QueueNames read, found one index probe at a time: `first` is (name,
    strict) to start from (strict: after it, else from it); probe(last, strict) -> the next
    name in the store's order, or None."""
    names = []
    last, strict = first
    while len(names) < limit:
        last, strict = probe(last, strict), True
        if last is None:
            break
        names.append(last)
    return names


class Counts:
    """Read: [(messages, delayed)] of each queue of `names`, as Count counts them at `now`."""

    __slots__ = ("names", "now")
    callback = None

    def __init__(self, names, now):
        self.names = names
        self.now = now


class Peek:
    """Read: up to `limit` ready messages of `queue` in delivery order, from the first, those
    in flight included, without taking any (a cluster node claims none)."""

    __slots__ = ("queue", "limit")
    callback = None

    def __init__(self, queue, limit):
        self.queue = queue
        self.limit = limit


class Subscribers:
    """Read (a cluster node): the subscriptions the other live nodes published for these
    destinations ("/queue/Q", "/topic/T", "/topic/P*"), all together; a "/topic/T" counts the
    prefix subscriptions that match it too."""

    __slots__ = ("destinations",)
    callback = None

    def __init__(self, destinations):
        self.destinations = destinations


class Expired:
    """Read: up to `limit` messages that expired at `now` (0 < expires <= now), in (expires,
    seq) order after `after` (None: from the first), without their bodies."""

    __slots__ = ("now", "after", "limit", "callback")

    def __init__(self, now, after, limit, callback):
        self.now = now
        self.after = after
        self.limit = limit
        self.callback = callback


# -- operations: writes that find what they change, each with a result -------------------------

class DeadLetter:
    """Move message `seq` from queue `source` to `target`, with `headers`, as a dead letter: no
    due time, no expiry, no deliveries. Result: whether it was still in `source`."""

    __slots__ = ("seq", "priority", "source", "target", "headers", "result")

    callback = None

    def __init__(self, seq, priority, source, target, headers):
        self.seq = seq
        self.priority = priority
        self.source = source
        self.target = target
        self.headers = headers
        self.result = None

    def apply(self, backend):
        return backend.dead_letter(self)


class Move:
    """Move up to `limit` (None: all) messages of `source` with seq below `below` and not in
    `keep` to `target`, oldest first, fresh: no due time, no expiry, no deliveries, not a dead
    letter. Result: how many. `end` (a cluster node): the seqs from `below` up to `end` are
    the ones left out, those this node may still give its messages (the other nodes' blocks
    of seqs lie above or below)."""

    __slots__ = ("source", "target", "limit", "keep", "below", "end", "result")

    callback = None

    def __init__(self, source, target, limit, keep, below, end=None):
        self.source = source
        self.target = target
        self.limit = limit
        self.keep = keep
        self.below = below
        self.end = end
        self.result = None

    def apply(self, backend):
        return backend.move(self)


class Purge:
    """Delete the messages of `queue` with seq below `below` and not in `keep`. Result: how
    many. `end`: see Move."""

    __slots__ = ("queue", "keep", "below", "end", "result")

    callback = None

    def __init__(self, queue, keep, below, end=None):
        self.queue = queue
        self.keep = keep
        self.below = below
        self.end = end
        self.result = None

    def apply(self, backend):
        return backend.purge(self)


class Promote:
    """Make ready (due 0) up to `limit` messages that are due at `now`, earliest first.
    Result: ({queue: smallest key promoted}, how many, the earliest due time left or None).
    `callback(op)` once applied (op.result None if the batch failed)."""

    __slots__ = ("now", "limit", "callback", "result")

    def __init__(self, now, limit, callback=None):
        self.now = now
        self.limit = limit
        self.callback = callback
        self.result = None

    def apply(self, backend):
        return backend.promote(self)


class ForgetKeys:
    """Delete up to `limit` de-duplication keys whose window ended at `now`. Result: how
    many. `callback(op)` once applied."""

    __slots__ = ("now", "limit", "callback", "result")

    def __init__(self, now, limit, callback=None):
        self.now = now
        self.limit = limit
        self.callback = callback
        self.result = None

    def apply(self, backend):
        return backend.forget_keys(self)


class Import:
    """Store `messages` (fresh from new_message()), each but those whose `ids` entry (another
    broker's id of it, one per message) was imported before, or comes twice; record the ids
    of those stored, in the same commit: importing the same messages again, after a crash
    part-way or not, stores none twice. Result: the seqs of those skipped. `batch`: the Batch
    it rides in (Storage.import_messages)."""

    __slots__ = ("messages", "ids", "batch", "result")

    callback = None

    def __init__(self, messages, ids):
        self.messages = messages
        self.ids = ids
        self.batch = None
        self.result = None

    def apply(self, backend):
        return backend.import_messages(self)

    def split(self, imported):
        """(messages to store, their ids, seqs skipped), given the set of ids `imported`
        before."""
        stored, ids, skipped = [], [], set()
        seen = set(imported)
        for message, source_id in zip(self.messages, self.ids):
            if source_id in seen:
                skipped.add(message.seq)
            else:
                seen.add(source_id)
                stored.append(message)
                ids.append(source_id)
        return stored, ids, skipped


class Release:
    """A cluster node lets go of messages it held (ClusterBackend): `seqs`. Unless `here`,
    only the other nodes are told (not this node's own on_arrived)."""

    __slots__ = ("seqs", "here", "result")

    callback = None

    def __init__(self, seqs, here=True):
        self.seqs = seqs
        self.here = here
        self.result = None

    def apply(self, backend):
        return backend.release(self)


class ReleaseQueue:
    """A cluster node lets go of every message of `queue` it held: it has no subscriber left."""

    __slots__ = ("queue", "result")

    callback = None

    def __init__(self, queue):
        self.queue = queue
        self.result = None

    def apply(self, backend):
        return backend.release_queue(self)


class Heartbeat:
    """A cluster node renews its lease, and publishes its subscription counts that changed
    (`counts`: {destination: subscriptions here}). Result: whether it still held the lease.
    `started`: when it was applied (time.monotonic()), from which the renewed lease runs."""

    __slots__ = ("counts", "callback", "started", "result")

    def __init__(self, counts, callback=None):
        self.counts = counts
        self.callback = callback
        self.started = None
        self.result = None

    def apply(self, backend):
        self.started = time.monotonic()
        return backend.heartbeat(self)


ANYWHERE = "anywhere"    # Batch.freed: messages may have become free in any queue


class Backend:
    """What a storage backend implements; see the module docstring for the contract."""

    # True when calls block the OS thread (sqlite3): Storage then runs them in one thread of
    # their own, so that the gevent hub never waits on the disk.
    blocking = False

    cluster = False     # several nodes share the store (postgresql.ClusterBackend)

    # Worth holding a batch for ACKs (Storage._hold): its commit costs more than a wait.
    hold_for_acks = True

    def open(self):
        raise NotImplementedError

    def apply(self, batch):
        raise NotImplementedError

    def close(self):
        raise NotImplementedError

    def is_transient(self, error):
        return False

    def write(self, batch):
        """The batch's writes, in the contract's order, inside the backend's transaction."""
        batch.duplicates = self.insert(list(batch.inserts.values()), batch.dedup)
        if batch.updates:
            self.update(list(batch.updates.values()))
        for op in batch.ops:
            op.result = op.apply(self)
        if batch.deletes:
            batch.deleted = self.delete(batch.deletes)
        if batch.next_seq is not None:
            batch.reserved = self.reserve(batch.next_seq)

    def answer(self, reads):
        """The results of `reads`, in order."""
        return [self.queues_holding(read.names) if read.__class__ is Holding
                else self.expired(read) if read.__class__ is Expired
                else self.count(read) if read.__class__ is Count
                else self.count_stored() if read.__class__ is Stored
                else self.depths(read) if read.__class__ is Depths
                else self.subscribers(read) if read.__class__ is Subscribers
                else self.queue_names(read) if read.__class__ is QueueNames
                else [self.count(Count(name, read.now)) for name in read.names]
                if read.__class__ is Counts
                else self.peek(read) if read.__class__ is Peek
                else self.load(read) for read in reads]

    def peek(self, read):
        return self.load(Load(read.queue, None, read.limit))

    # The primitives of write() and answer(), each inside apply()'s transaction:
    # insert(messages, dedup) -> seqs skipped as duplicates (dedup: seq -> (key, sent, until):
    #     the key is taken unless another message took it and `until` of that one is after
    #     `sent`); update(messages) writes each one's deliveries and due; dead_letter(op),
    #     move(op), purge(op), promote(op), forget_keys(op), import_messages(op) -> op's
    #     result; delete(seqs) -> how many there were (a seq may be gone already, or never
    #     have been written);
    #     reserve(next_seq) -> None, or (first, end) of a block of seqs it chose instead (a
    #     cluster node: next_seq is then ignored); load(read), count(read),
    #     queues_holding(names), expired(read), count_stored(), depths(read),
    #     queue_names(read); peek(read) if load() would not do (it claims messages).
    # A cluster backend also: release(op), release_queue(op), heartbeat(op), subscribers(read);
    # and open() -> (first, end) of its first block of seqs.


class Batch:
    """Writes and reads that will be applied in one transaction."""

    __slots__ = ("inserts", "dedup", "updates", "ops", "deletes", "reads", "probes", "next_seq",
                 "reserved", "owned", "freed", "notices", "results", "duplicates", "deleted",
                 "arrivals", "retried", "bytes", "done", "error", "used", "awaited")

    def __init__(self):
        self.inserts = {}           # seq -> StoredMessage
        self.dedup = {}             # seq -> (key, sent, until) of inserts that have a key
        self.updates = {}           # seq -> StoredMessage whose deliveries and due to write
        self.ops = []
        self.deletes = []
        self.reads = []
        self.probes = None      # queue names of probe_async(), once there are any
        self.next_seq = None    # a reservation of sequence numbers to record
        self.reserved = None    # the block a cluster backend reserved instead: (first, end)
        self.owned = None       # seqs of inserts this cluster node holds (delivers at once)
        self.freed = None       # {queue: key} made free to take by a cluster backend, or
                                # ANYWHERE
        self.notices = None     # topic messages for the other nodes of a cluster
        self.results = None
        self.duplicates = ()    # seqs of inserts skipped as duplicates
        self.deleted = 0        # how many of `deletes` were stored
        self.arrivals = None    # see Storage.on_arrived
        self.retried = False    # applied more than once (through an outage)
        self.bytes = 0
        self.done = gevent.event.Event()
        self.error = None
        self.used = False       # someone may wait on it, even if cancellations emptied it
        self.awaited = False    # someone waits for it to commit: it may not hold (_hold)

    def __bool__(self):
        return self.used

    def has_writes(self):
        return bool(self.inserts or self.updates or self.ops or self.deletes
                    or self.next_seq is not None or self.notices)

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


def _arrive(arrivals, queue, key):
    """Note that stored messages of `queue` may exist from `key` on (None: anywhere)."""
    if queue in arrivals:
        known = arrivals[queue]
        if known is None or key is None:
            arrivals[queue] = None
        elif key < known:
            arrivals[queue] = key
    else:
        arrivals[queue] = key


# Upper bounds of the buckets of Storage's histograms.
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
COMMIT_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                          2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    """Observations counted per bucket (`bounds`: the upper bounds, then one bucket for the
    rest) and their sum: a Prometheus histogram kept as plain numbers, which the committer
    updates once per batch (never per message)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0

    def observe(self, value):
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value


class Storage:
    """Group commit over a Backend. All methods are called from greenlets of one hub."""

    def __init__(self, backend, retry_for=30.0):
        self.backend = backend
        self.retry_for = retry_for  # seconds a batch is retried through an outage
        self.pending_bytes = 0      # bytes of inserts not yet committed: the async budget
        # errors: batches that failed (their writes did not happen); retries: attempts that
        # failed for a transient reason and were tried again.
        self.stats = {"batches": 0, "inserts": 0, "deletes": 0, "cancelled": 0, "updates": 0,
                      "errors": 0, "retries": 0}
        # Per batch applied: its operations (writes and reads), and the seconds it took (the
        # retries through an outage included).
        self.batch_sizes = Histogram(BATCH_SIZE_BUCKETS)
        self.commit_seconds = Histogram(COMMIT_SECONDS_BUCKETS)
        # Messages stored, all queues together. Counted once at open, then kept from what each
        # batch inserted, deleted and purged: a COUNT of a million rows is too dear for every
        # scrape. Counted again in the batch after one whose outcome is uncertain (failed, or
        # retried through an outage).
        self.stored = None
        self._recount = False
        self._next_seq = None
        self._reserved = None       # sequence numbers below this are durably reserved
        self._block_taken = None    # when a cluster node took its block of seqs (monotonic)
        # A cluster node's lease (see ClusterBackend): it may deliver what it holds until
        # this time.monotonic(); on_fenced() when it found it had lost it.
        self.lease_until = None
        self.on_fenced = None
        # Called as on_topic(topic, headers, body) for another cluster node's topic message.
        self.on_topic = None
        # Called as on_due(due) when another cluster node stored a message that waits until
        # `due` (epoch ms): whichever node is up then makes it ready.
        self.on_due = None
        self._pending = Batch()
        self._deliveries = {}       # seq -> message: delivery counts held (count_delivery)
        self._wake = gevent.event.Event()
        self._urgent = gevent.event.Event()     # the pending batch may not hold any longer
        self._committed = gevent.event.Event()
        self._committer = None
        self._current = None        # the batch being applied
        self._closing = False
        self._pool = None
        self._outage = None         # when the current outage began
        self._unavailable = gevent.event.Event()   # set during an outage
        # Called with the messages of a batch that failed: they were never stored.
        self.on_insert_failed = None
        # Called as on_probed(batch, held) once a batch with probes (probe_async) is applied.
        self.on_probed = None
        # Called as on_arrived(arrivals) after a batch (see the module docstring).
        self.on_arrived = None

    def open(self):
        if self.backend.blocking:
            from gevent.threadpool import ThreadPool
            self._pool = ThreadPool(1)       # one OS thread does all of the backend's work
        try:
            started = time.monotonic()
            opened = self._call(self.backend.open)
            batch = Batch()
            if self.backend.cluster:
                (self._next_seq, self._reserved), self._block_taken = opened, started
                self.lease_until = started + LEASE_SAFETY * self.backend.lease_timeout
            else:
                self._next_seq = opened
                self._reserved = self._next_seq + SEQ_RESERVATION
                batch.next_seq = self._reserved
            batch.reads.append(Stored())
            self.stored = self._call(self.backend.apply, batch)[0]
        except BaseException:
            self._call(self.backend.close)
            if self._pool is not None:
                self._pool.kill()
            raise
        self._committer = gevent.spawn(self._commit_loop)
        if self.backend.cluster:
            self.backend.listen(self._notified, self._topic_notified, self._due_notified)
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

    def new_message(self, queue, priority, ack_timeout, headers, body, due=0, expires=0,
                    size=None):
        """A message with the next sequence number; may wait for a durable reservation (a
        cluster node: a new block once its block is used up or a second old, so that seqs
        follow arrival across nodes). `size`: see StoredMessage."""
        while self._next_seq >= self._reserved or (
                self._block_taken is not None
                and time.monotonic() - self._block_taken > BLOCK_AGE):
            self._reserve()
        seq = self._next_seq
        self._next_seq += 1
        return StoredMessage(seq, queue, priority, ack_timeout, headers, body, due, expires,
                             size=size)

    @property
    def next_seq(self):
        """Every message created so far has a smaller sequence number."""
        return self._next_seq

    def _reserve(self):
        batch = self._use()
        target = self._next_seq + SEQ_RESERVATION
        batch.next_seq = max(batch.next_seq or 0, target)
        started = time.monotonic()
        batch.wait()
        if batch.reserved is None:
            self._reserved = max(self._reserved, target)
        elif batch.reserved[1] > self._reserved:
            # A newer block than ours (not the one another waiter of this batch took already:
            # blocks only grow).
            (self._next_seq, self._reserved), self._block_taken = batch.reserved, started

    def _use(self, urgent=True):
        """The pending batch, marked as holding work for the committer; `urgent` work (a
        read, an operation: somebody waits for it) ends a hold for ACKs (_hold)."""
        batch = self._pending
        batch.used = True
        self._wake.set()
        if urgent:
            self._urgent.set()
        return batch

    def awaited(self, batch):
        """Somebody waits for `batch` to commit (a RECEIPT that no ACK will settle): it starts
        without holding for ACKs."""
        batch.awaited = True
        if batch is self._pending:
            self._urgent.set()

    # -- writes --------------------------------------------------------------------------------

    def save(self, message, dedup=None, held=False):
        """Queue the message for the next batch; returns the Batch to wait on for durability.
        dedup: (key, sent, until), epoch ms: store it only if no other message of its queue
        holds `key` with a window that is still open at `sent`; `until` ends its own.
        held: a cluster node keeps it (it delivers it at once); else it is free to take."""
        batch = self._pending
        batch.used = True           # the hot path: _use() by hand
        self._wake.set()
        batch.inserts[message.seq] = message
        if dedup is not None:
            batch.dedup[message.seq] = dedup
        if held:
            if batch.owned is None:
                batch.owned = set()
            batch.owned.add(message.seq)
        size = message.size
        batch.bytes += size
        self.pending_bytes += size
        return batch

    def delete(self, seq):
        """The message was ACKed: delete it. Returns the Batch to wait on for the deletion to
        be durable, or None if it cancelled the message's pending insert (nothing to wait
        for: the message is never written)."""
        batch = self._pending
        if batch.updates:
            batch.updates.pop(seq, None)
        if self._deliveries:
            self._deliveries.pop(seq, None)
        message = batch.inserts.pop(seq, None)
        if message is not None:
            if batch.dedup:
                batch.dedup.pop(seq, None)
            size = message.size
            batch.bytes -= size
            self.pending_bytes -= size
            self.stats["cancelled"] += 1
            return None
        batch.used = True           # the hot path: _use() by hand
        batch.deletes.append(seq)
        self._wake.set()
        return batch

    def update(self, message):
        """Write the message's deliveries and due time in the next batch; nobody waits for it.
        A pending insert of the message carries them already."""
        self._deliveries.pop(message.seq, None)
        if message.seq not in self._pending.inserts:
            self._use(urgent=False).updates[message.seq] = message

    def count_delivery(self, message):
        """Hold the message's new delivery count until release_counts(): a consumer's ACK
        usually comes first and cancels it (a consumed message needs no count). A message
        whose count matters sooner (it came back) gets update(). True if it is the first
        count held since the last release."""
        if message.seq not in self._pending.inserts:
            held = self._deliveries
            held[message.seq] = message
            return len(held) == 1
        return False

    def release_counts(self):
        """The delivery counts held so far go into the next batch: returned, to wait on (None
        if no count was held)."""
        if self._deliveries:
            batch = self._use(urgent=False)     # a RECEIPT that waits says so: awaited()
            batch.updates.update(self._deliveries)
            self._deliveries = {}
            return batch
        return None

    def dead_letter(self, message, target, headers):
        """Move the message, if it is still in its queue, to queue `target` as a dead letter
        with `headers` (one commit: it is in exactly one of the two). Nobody waits for it;
        on_arrived tells the broker. It starts fresh there: a count still held is dropped."""
        self._deliveries.pop(message.seq, None)
        self._use().ops.append(DeadLetter(message.seq, message.priority, message.queue, target,
                                          headers))

    def publish(self, topic, headers, body):
        """Send a topic message to the other nodes of the cluster (with the next batch: in
        order, one round trip for many). Raises StorageError if it is too large for that."""
        notice = self.backend.topic_notice(topic, headers, body)
        batch = self._use()
        if batch.notices is None:
            batch.notices = []
        batch.notices.append(notice)

    def release(self, seqs, here=True):
        """A cluster node lets go of messages it held: others may take them; this node too
        (its on_arrived says so) unless not `here`."""
        self._use().ops.append(Release(seqs, here))

    def release_queue(self, queue):
        """A cluster node lets go of every message of `queue` it held."""
        self._use().ops.append(ReleaseQueue(queue))

    def heartbeat_async(self, counts, callback):
        """Renew a cluster node's lease, publish its changed subscription counts: callback(op)
        once applied (op.result None if the batch failed; False if the lease had been lost:
        on_fenced() was called first)."""
        self._use().ops.append(Heartbeat(counts, callback))

    def subscribers_elsewhere(self, destinations):
        """How many subscriptions the other live cluster nodes have to `destinations`
        (their last heartbeats' word), all together."""
        return self._read(Subscribers(destinations))

    def lease_ok(self):
        """Whether this cluster node may deliver what it holds now."""
        return time.monotonic() < self.lease_until

    def _beaten(self, op):
        if op.result is None:
            return              # the lease runs out unless a later heartbeat gets through
        lapsed = op.started >= self.lease_until
        if not op.result:
            log.error("cluster lease lost (paused or cut off for longer than %g s): what "
                      "this node held may be another's now; it goes on as a new node",
                      self.backend.lease_timeout)
            if self.on_fenced is not None:
                self.on_fenced()
        self.lease_until = op.started + LEASE_SAFETY * self.backend.lease_timeout
        if lapsed or not op.result:
            # Deliveries stopped meanwhile (or the broker forgot all it held): start again
            # from the store, everywhere.
            self._notified(None)

    def _notified(self, arrivals):
        if self.on_arrived is not None:
            self._callback(self.on_arrived, arrivals)

    def _topic_notified(self, topic, headers, body):
        if self.on_topic is not None:
            self._callback(self.on_topic, topic, headers, body)

    def _due_notified(self, due):
        if self.on_due is not None:
            self._callback(self.on_due, due)

    def wait_for_budget(self, budget):
        """Block the caller while uncommitted inserts hold more than `budget` bytes."""
        while self.pending_bytes > budget:
            self._urgent.set()
            self._committed.wait()

    # -- operations the caller waits for -------------------------------------------------------

    def _run(self, op):
        batch = self._use()
        batch.ops.append(op)
        batch.wait()
        return op.result

    def purge(self, queue, keep, fresh):
        """Delete queue's messages that are not in `keep` nor in `fresh` (fresh_seqs()); how
        many."""
        return self._run(Purge(queue, keep, fresh.start, self._end(fresh)))

    def move(self, source, target, limit, keep, fresh):
        """Move up to `limit` of source's messages (see Move) to target; how many."""
        return self._run(Move(source, target, limit, keep, fresh.start, self._end(fresh)))

    def fresh_seqs(self):
        """The seqs that messages this broker creates from now on may have within the pending
        batch: a purge or move asked for now must leave them alone. On one node every seq
        from next_seq on; on a cluster node those of its block (the other nodes' blocks lie
        above or below: their messages are the store's as committed)."""
        return range(self._next_seq, self._reserved if self.backend.cluster else sys.maxsize)

    def _end(self, fresh):
        return fresh.stop if self.backend.cluster else None

    def import_messages(self, messages, ids):
        """Store messages from another broker (see Import) in the next batch, without
        waiting: returns the Import; wait on its `batch`, then read its `result`."""
        op = Import(messages, ids)
        op.batch = self._use()
        op.batch.ops.append(op)
        return op

    # -- timed work (the broker's clock asks for it) -------------------------------------------

    def promote_async(self, now, limit, callback):
        """Make the messages that are due at `now` ready, up to `limit`: callback(op) once
        applied (op.result is None if the batch failed); on_arrived tells the broker where."""
        self._use().ops.append(Promote(now, limit, callback))

    def forget_keys_async(self, now, limit, callback):
        """Delete de-duplication keys whose window ended; callback(op) once applied."""
        self._use().ops.append(ForgetKeys(now, limit, callback))

    def expired_async(self, now, after, limit, callback):
        """Find expired messages (see Expired): callback(read, messages or None)."""
        read = Expired(now, after, limit, callback)
        self._use().reads.append(read)
        return read

    # -- reads ---------------------------------------------------------------------------------

    def _read(self, read, timeout=None):
        """The answer to `read`. With a timeout (seconds): StorageError if none came by then, or
        at once if the store is unavailable (an outage: batches are being retried)."""
        batch = self._use()
        index = len(batch.reads)
        batch.reads.append(read)
        if timeout is not None:
            gevent.wait([batch.done, self._unavailable], timeout, count=1)
            if not batch.done.is_set():
                raise StorageError("unavailable" if self._outage is not None
                                   else "no answer within %g s" % timeout)
        batch.wait()
        return batch.results[index]

    def load(self, queue, after, limit):
        return self._read(Load(queue, after, limit))

    def count(self, queue, now=None):
        """(messages, delayed) of `queue` at `now` (epoch ms; default: the present)."""
        return self._read(Count(queue, now_ms() if now is None else now))

    def depths(self, pattern, limit, timeout=None):
        """[(queue, messages)] of up to `limit` queues whose names match the glob `pattern`
        (see Depths)."""
        return self._read(Depths(pattern, limit, now_ms()), timeout)

    def queue_names(self, prefix, after, limit, timeout=None):
        """[queue] of a page of the queues holding messages (see QueueNames)."""
        return self._read(QueueNames(prefix, after, limit), timeout)

    def counts(self, names, timeout=None):
        """[(messages, delayed)] of each queue of `names`, in one read."""
        return self._read(Counts(names, now_ms()), timeout)

    def peek(self, queue, limit, timeout=None):
        """The first `limit` ready messages of `queue`, left where they are (see Peek)."""
        return self._read(Peek(queue, limit), timeout)

    def check(self, timeout):
        """Raise StorageError unless the store answers a read (one index probe) within
        `timeout` seconds; at once if it is unavailable. For health checks: the read also has
        the committer try the database again."""
        self._read(Holding(("",)), timeout)

    @property
    def outage_since(self):
        """When the current outage began (epoch seconds: the database has been unavailable
        since, batches are being retried), or None."""
        if self._outage is None:
            return None
        return time.time() - (time.monotonic() - self._outage)

    def load_async(self, queue, after, limit, callback):
        """load() without blocking and without a greenlet: returns the Load; the committer
        calls callback(load, messages), or callback(load, None) if the batch failed, once
        the batch is applied. The callback must not block. (The Load tells the answers apart,
        so one bound method serves every queue: no closure per refill.)"""
        load = Load(queue, after, limit, callback)
        load.batch = batch = self._use()
        batch.reads.append(load)
        return load

    def restart_load(self, load, after):
        """If `load` (from load_async) has not been applied yet, make it start after `after`
        instead and return True: a caller that must read again from further back keeps its
        place in the pending batch rather than adding a second read."""
        if load.batch is not self._pending:
            return False
        load.after = after
        return True

    def pending(self, batch):
        """Whether `batch` has not been applied yet (nor is being applied)."""
        return batch is self._pending

    def probe_async(self, name):
        """Ask whether queue `name` holds any ready message, without blocking and for the
        price of a list slot: a million workers may subscribe at once, each to a queue of its
        own. Returns the Batch the question rides in; once it is applied, the committer calls
        on_probed(batch, held): `held` is the set of the names of batch.probes that hold
        messages, or None if the batch failed."""
        batch = self._use()
        if batch.probes is None:
            batch.probes = []
        batch.probes.append(name)
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
            self._hold()
            # In a call of its own, so that nothing of the batch (say the probes of 100,000
            # new subscriptions, with their answer) stays referenced while the loop waits.
            self._commit()
            if self._pending or self._closing:
                self._wake.set()

    def _hold(self):
        """Let the pending batch wait while all it would write is inserts of messages already
        delivered (a SEND's RECEIPT waits for the ACK or the commit, whichever comes first:
        Storage.awaited() says when one cannot count on an ACK) and what rides along
        (deletes, counts): the ACKs that arrive meanwhile cancel those inserts. It waits until
        its oldest insert not yet cancelled has waited HOLD_FOR_ACKS (by a clock read every
        half of it, so up to half as long again), or its first delete or count HOLD_OTHERS.
        Anything else ends the hold at once: a read, an operation, a receipt or a flush that
        waits, the memory budget, a close."""
        batch = self._pending
        if not (batch.inserts and self._may_hold(batch)):
            return
        self._urgent.clear()
        oldest = since = others_since = None
        while True:
            now = time.monotonic()
            first = next(iter(batch.inserts), None)   # the oldest: dicts keep insertion order
            if first is None:
                deadline = None
            else:
                if first != oldest:
                    oldest, since = first, now
                deadline = since + HOLD_FOR_ACKS
            if batch.deletes or batch.updates:
                if others_since is None:
                    others_since = now
                if deadline is None or others_since + HOLD_OTHERS < deadline:
                    deadline = others_since + HOLD_OTHERS
            if deadline is None or now >= deadline or not self._may_hold(batch):
                return      # (every insert cancelled and nothing else: an empty batch)
            if self._urgent.wait(min(deadline - now, HOLD_FOR_ACKS / 2)):
                return

    def _may_hold(self, batch):
        """Whether nothing in `batch` forbids holding it for ACKs (see _hold)."""
        return (self.backend.hold_for_acks and not self._closing
                and not (batch.awaited or batch.reads or batch.ops or batch.probes
                         or batch.next_seq is not None or batch.notices)
                # A cluster's free messages are for the other nodes: they hear of them after
                # the commit.
                and (not self.backend.cluster
                     or (batch.owned is not None and batch.inserts.keys() <= batch.owned)))

    def _commit(self):
        """Apply the pending batch; wake its waiters, run its callbacks."""
        batch, self._pending = self._pending, Batch()
        self._current = batch
        recount = None
        if self._recount:
            recount = len(batch.reads)
            batch.reads.append(Stored())
        if batch.probes:
            batch.reads.append(Holding(batch.probes))      # after the reads asked for
        try:
            if batch.has_writes() or batch.reads:
                started = time.monotonic()
                batch.results = self._apply(batch)
                self.commit_seconds.observe(time.monotonic() - started)
                self.batch_sizes.observe(len(batch.inserts) + len(batch.updates) + len(batch.ops)
                                         + len(batch.deletes) + len(batch.reads))
            else:
                batch.results = []      # cancellations emptied it: no round trip
        except Exception as error:
            self.stats["errors"] += 1
            self._recount = True
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
            self.stats["inserts"] += len(batch.inserts) - len(batch.duplicates)
            self.stats["deletes"] += len(batch.deletes)
            self.stats["updates"] += len(batch.updates)
            self._count_stored(batch, recount)
        self.pending_bytes -= batch.bytes
        self._current = None
        arrivals = self._arrivals(batch)
        batch.done.set()
        for op in batch.ops:
            if op.__class__ is Heartbeat:
                self._beaten(op)
            if op.callback is not None:
                self._callback(op.callback, op)
        for index, read in enumerate(batch.reads):
            if read.callback is None:
                continue
            self._callback(read.callback, read,
                           None if batch.error is not None else batch.results[index])
        if batch.probes and self.on_probed is not None:
            self._callback(self.on_probed, batch,
                           None if batch.error is not None else batch.results[-1])
        if self.on_arrived is not None and (arrivals is None or arrivals):
            # After the loads of the same batch, whose results the broker has taken by now.
            self._callback(self.on_arrived, arrivals)
        committed, self._committed = self._committed, gevent.event.Event()
        committed.set()

    def _count_stored(self, batch, recount):
        """Keep `stored` after a batch applied: its Stored read's answer (at index `recount`)
        if it had one, else plus what it inserted, minus what it deleted and purged."""
        if recount is not None:
            self.stored, self._recount = batch.results[recount], False
        else:
            self.stored += (len(batch.inserts) - len(batch.duplicates) - batch.deleted
                            - sum(op.result for op in batch.ops if op.__class__ is Purge))
        if batch.retried:
            self._recount = True    # its effects may have been applied twice

    @staticmethod
    def _callback(function, *args):
        try:
            function(*args)
        except Exception:
            log.exception("storage callback failed")

    def _arrivals(self, batch):
        """Where stored messages may have appeared that the broker did not put there (see
        on_arrived)."""
        if batch.retried or batch.freed is ANYWHERE:
            return None
        arrivals = {}
        if batch.error is not None:
            # What the broker took out of memory expecting a write: it is still where it was.
            for message in batch.updates.values():
                _arrive(arrivals, message.queue, message.key)
            for op in batch.ops:
                if op.__class__ is DeadLetter:
                    _arrive(arrivals, op.source, (-op.priority, op.seq))
            return arrivals
        for seq, _ in batch.dedup.items():
            message = batch.inserts[seq]
            if seq not in batch.duplicates and not message.due:
                _arrive(arrivals, message.queue, message.key)
        for op in batch.ops:
            if op.__class__ is DeadLetter:
                # Even if it had gone already: a retried batch may have moved it unseen.
                _arrive(arrivals, op.target, (-op.priority, op.seq))
            elif op.__class__ is Move and op.result:
                _arrive(arrivals, op.target, None)
            elif op.__class__ is Import:
                for queue in {message.queue for message in op.messages}:
                    _arrive(arrivals, queue, None)
            elif op.__class__ is Promote:
                for queue, key in op.result[0].items():
                    _arrive(arrivals, queue, key)
        if batch.freed:
            for queue, key in batch.freed.items():
                _arrive(arrivals, queue, key)
        return arrivals

    def barrier(self):
        """A Batch that completes once everything asked for so far is durable."""
        return self._use()

    def _apply(self, batch):
        """Apply a batch; through an outage, retry it with back-off for up to retry_for
        seconds. Logged once when the outage begins and once when it ends."""
        deadline = None
        delay = 0.05
        while True:
            try:
                results = self._call(self.backend.apply, batch)
            except Exception as error:
                if not self.backend.is_transient(error):
                    raise
                now = time.monotonic()
                if self._outage is None:
                    self._outage = now
                    self._unavailable.set()
                    log.error("storage unavailable (%s); retrying",
                              str(error).strip() or error.__class__.__name__)
                if deadline is None:
                    deadline = now + self.retry_for
                if now + delay > deadline:
                    raise
                self.stats["retries"] += 1
                batch.retried = True
                gevent.sleep(delay)
                delay = min(2 * delay, 2.0)
                continue
            if self._outage is not None:
                log.warning("storage available again after %.1f s",
                            time.monotonic() - self._outage)
                self._outage = None
                self._unavailable.clear()
            return results

    def flush(self):
        """Wait until everything asked for so far is committed."""
        batch = self._pending if self._pending else self._current
        if batch is not None:
            self._wake.set()
            self._urgent.set()
            batch.done.wait()

    def close(self):
        """Commit what is pending, then close the backend."""
        if self._committer is None:
            return
        self.release_counts()
        self._closing = True
        self._wake.set()
        self._urgent.set()
        self._committer.join()
        self._committer = None
        self._call(self.backend.close)
        if self._pool is not None:
            self._pool.kill()


def now_ms():
    """The wall clock in epoch milliseconds: what due times and expiries are written in."""
    return time.time_ns() // 1000000

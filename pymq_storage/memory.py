"""Non-durable storage: messages live in this process only. For embedding and transient use
(``--db memory:``); same contract as the durable backends, minus surviving a restart.

The store keeps copies of what it is given and hands out copies, as a database would: the
broker's own objects (a delivered message whose count it raises) are never the stored ones."""

import collections
import fnmatch
import heapq
import time

from .base import Backend, Count


class MemoryBackend(Backend):
    hold_for_acks = False       # applying a batch costs next to nothing

    def __init__(self):
        self.messages = {}      # seq -> StoredMessage, as stored
        self.ready = {}         # queue -> {seq: StoredMessage} of those with due 0
        self.delayed = {}       # queue -> {seq: StoredMessage} of those with a due time
        self.schedule = []      # heap of (due, seq); an entry whose message moved on is stale
        self.expiring = {}      # seq -> StoredMessage of those with an expiry
        self.keys = {}          # (queue, dedup key) -> (seq, end of its window)
        self.key_order = collections.deque()    # (end of window, queue, key), oldest first
        self.imported = set()   # ids of the messages imported from another broker

    def open(self):
        # Nothing survives a restart, so ids only need to differ from the last run's:
        # start from the clock, in microseconds.
        return time.time_ns() // 1000

    def apply(self, batch):
        self.write(batch)
        return self.answer(batch.reads)

    def close(self):
        self.__init__()

    # -- where a message is kept ---------------------------------------------------------------

    def _place(self, message):
        self.messages[message.seq] = message
        if message.due:
            self.delayed.setdefault(message.queue, {})[message.seq] = message
            heapq.heappush(self.schedule, (message.due, message.seq))
        else:
            self.ready.setdefault(message.queue, {})[message.seq] = message
        if message.expires:
            self.expiring[message.seq] = message

    def _unplace(self, message):
        del self.messages[message.seq]
        index = self.delayed if message.due else self.ready
        queue = index[message.queue]
        del queue[message.seq]
        if not queue:
            del index[message.queue]
        self.expiring.pop(message.seq, None)

    def _messages_of(self, queue):
        return (list(self.ready.get(queue, {}).values())
                + list(self.delayed.get(queue, {}).values()))

    def _refresh(self, message, **fields):
        self._unplace(message)
        for name, value in fields.items():
            setattr(message, name, value)
        self._place(message)

    # -- writes --------------------------------------------------------------------------------

    def insert(self, messages, dedup):
        duplicates = set()
        for message in messages:
            if message.seq in self.messages:
                continue
            if message.seq in dedup:
                key, sent, until = dedup[message.seq]
                taken = self.keys.get((message.queue, key))
                if taken is not None and taken[1] > sent and taken[0] != message.seq:
                    duplicates.add(message.seq)
                    continue
                self.keys[(message.queue, key)] = (message.seq, until)
                self.key_order.append((until, message.queue, key))
            self._place(message.copy())
        return duplicates

    def update(self, messages):
        for message in messages:
            stored = self.messages.get(message.seq)
            if stored is not None:
                self._refresh(stored, deliveries=message.deliveries, due=message.due)

    def dead_letter(self, op):
        stored = self.messages.get(op.seq)
        if stored is None or stored.queue != op.source:
            return False
        self._refresh(stored, queue=op.target, headers=list(op.headers), due=0, expires=0,
                      deliveries=0, dead_letter=True)
        return True

    def _chosen(self, queue, keep, below, limit=None):
        chosen = sorted((m for m in self._messages_of(queue)
                         if m.seq < below and m.seq not in keep), key=lambda m: m.seq)
        return chosen if limit is None else chosen[:limit]

    def move(self, op):
        chosen = self._chosen(op.source, op.keep, op.below, op.limit)
        for stored in chosen:
            self._refresh(stored, queue=op.target, due=0, expires=0, deliveries=0,
                          dead_letter=False)
        return len(chosen)

    def purge(self, op):
        chosen = self._chosen(op.queue, op.keep, op.below)
        for stored in chosen:
            self._unplace(stored)
        return len(chosen)

    def promote(self, op):
        arrivals, promoted = {}, 0
        schedule = self.schedule
        while schedule and promoted < op.limit and schedule[0][0] <= op.now:
            due, seq = heapq.heappop(schedule)
            stored = self.messages.get(seq)
            if stored is None or stored.due != due:
                continue                    # stale: gone, or due at another time now
            self._refresh(stored, due=0)
            promoted += 1
            if stored.queue not in arrivals or stored.key < arrivals[stored.queue]:
                arrivals[stored.queue] = stored.key
        while schedule and self._stale(schedule[0]):
            heapq.heappop(schedule)
        return arrivals, promoted, schedule[0][0] if schedule else None

    def _stale(self, entry):
        stored = self.messages.get(entry[1])
        return stored is None or stored.due != entry[0]

    def forget_keys(self, op):
        forgotten = 0
        order = self.key_order
        while order and forgotten < op.limit and order[0][0] <= op.now:
            until, queue, key = order.popleft()
            taken = self.keys.get((queue, key))
            if taken is not None and taken[1] == until:
                del self.keys[(queue, key)]
                forgotten += 1
        return forgotten

    def import_messages(self, op):
        stored, ids, skipped = op.split(self.imported.intersection(op.ids))
        self.imported.update(ids)
        self.insert(stored, {})
        return skipped

    def delete(self, seqs):
        deleted = 0
        for seq in seqs:
            stored = self.messages.get(seq)
            if stored is not None:
                self._unplace(stored)
                deleted += 1
        return deleted

    def reserve(self, next_seq):
        pass

    # -- reads ---------------------------------------------------------------------------------

    def load(self, read):
        candidates = self.ready.get(read.queue, {}).values()
        if read.after is not None:
            candidates = (m for m in candidates if m.key > read.after)
        return [m.copy() for m in heapq.nsmallest(read.limit, candidates, key=lambda m: m.key)]

    def count(self, read):
        now = read.now
        live = [m for m in self._messages_of(read.queue) if not 0 < m.expires <= now]
        return len(live), sum(1 for m in live if m.due > now)

    def queues_holding(self, names):
        return {name for name in names if name in self.ready}

    def count_stored(self):
        return len(self.messages)

    def depths(self, read):
        names = sorted(name for name in set(self.ready) | set(self.delayed)
                       if fnmatch.fnmatchcase(name, read.pattern))
        depths = []
        for name in names:
            messages = self.count(Count(name, read.now))[0]
            if messages:
                depths.append((name, messages))
                if len(depths) == read.limit:
                    break
        return depths

    def queue_names(self, read):
        after = read.after
        return sorted(name for name in set(self.ready) | set(self.delayed)
                      if name.startswith(read.prefix) and (after is None or name > after)
                      )[:read.limit]

    def expired(self, read):
        found = sorted(((m.expires, m.seq), m) for m in self.expiring.values()
                       if m.expires <= read.now
                       and (read.after is None or (m.expires, m.seq) > read.after))
        messages = []
        for _, stored in found[:read.limit]:
            message = stored.copy()
            message.body = None
            messages.append(message)
        return messages

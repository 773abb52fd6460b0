"""Non-durable storage: messages live in this process only. For embedding and transient use
(``--db memory:``); same contract as the durable backends, minus surviving a restart."""

import heapq
import time

from .base import Backend, Count, Load


class MemoryBackend(Backend):
    def __init__(self):
        self.messages = {}      # seq -> StoredMessage
        self.queues = {}        # queue -> {seq: StoredMessage}

    def open(self):
        # Nothing survives a restart, so ids only need to differ from the last run's:
        # start from the clock, in microseconds.
        return time.time_ns() // 1000

    def apply(self, inserts, deletes, reads, next_seq):
        for message in inserts:
            self.messages[message.seq] = message
            self.queues.setdefault(message.queue, {})[message.seq] = message
        for seq in deletes:
            message = self.messages.pop(seq, None)
            if message is not None:
                queue = self.queues[message.queue]
                del queue[seq]
                if not queue:
                    del self.queues[message.queue]
        return self.answer(reads)

    def queues_holding(self, names):
        return {name for name in names if name in self.queues}

    def read(self, read):
        messages = self.queues.get(read.queue, {})
        if isinstance(read, Count):
            return len(messages)
        assert isinstance(read, Load)
        candidates = messages.values()
        if read.after is not None:
            candidates = (m for m in candidates if m.key > read.after)
        return heapq.nsmallest(read.limit, candidates, key=lambda m: m.key)

    def close(self):
        self.messages.clear()
        self.queues.clear()

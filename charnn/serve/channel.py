"""A request's events on their way from the decoding worker (scheduler.py) to the asyncio loop
that serves the request: a thread-safe deque the worker appends to, and a wake-up of the loop at
most once a step, none for a reader that waits out its interval between events unless an end
is waiting."""

from __future__ import annotations

import collections
import math


class Channel:
    """The events of one request's sequences, from the worker to the asyncio loop that reads
    them (``take``, on that loop). The worker ``put``s events and, once a step, ``Channel.post``s
    the channels it put into; see the module docstring."""

    def __init__(self, loop):
        self.loop = loop
        self.items: collections.deque = collections.deque()
        self.posted = False  # a wake-up is on its way to the loop (the worker's flag; the loop clears it)
        self.lazy = False  # the reader waits out its interval: wake it only for an end
        self.urgent = False  # an end is waiting
        self._waiter = None

    def put(self, ev, end: bool = False):
        self.items.append(ev)
        if end:
            self.urgent = True

    @staticmethod
    def post(channels):
        """Wake the readers of ``channels`` (the worker calls it once a step): one
        ``call_soon_threadsafe`` per loop, for the channels not already woken or waiting
        out their interval."""
        by_loop: dict = {}
        for ch in channels:
            if not ch.posted and (ch.urgent or not ch.lazy):
                ch.posted = True
                by_loop.setdefault(ch.loop, []).append(ch)
        for loop, chans in by_loop.items():
            try:
                loop.call_soon_threadsafe(_wake_all, chans)
            except RuntimeError:  # the loop has closed: nobody is listening
                pass

    def _wake(self):
        self.posted = False
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self, until: float | None = None) -> list:
        """Every waiting event, once there is one (on the channel's loop). With ``until`` (a
        ``loop.time()``; math.inf: for ever), pieces are left to gather until then; an end is
        taken at once."""
        loop = self.loop
        while True:
            due = until is None or loop.time() >= until
            if self.items and (self.urgent or due):
                self.urgent = False
                items = self.items
                return [items.popleft() for _ in range(len(items))]
            waiter = self._waiter = loop.create_future()
            self.lazy = not due
            timer = None if due or until == math.inf else loop.call_at(until, self._wake)
            try:
                if self.items and (self.urgent or due):  # (put while this was being set up)
                    continue
                await waiter
            finally:
                self._waiter = None
                self.lazy = False
                if timer is not None:
                    timer.cancel()


def _wake_all(channels):
    for ch in channels:
        ch._wake()

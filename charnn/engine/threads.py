"""Threads for the CPU engine: the BLAS's thread count, charnn's worker thread, and the work
two halves of a batch share.

charnn's own parallelism is two threads (the calling one and one worker), each running
NumPy's BLAS on one thread and numba kernels that release the GIL; see parallel.py for the
strategies built on it.
"""

from __future__ import annotations

import threading

import numpy

_executor = None

# ----- BLAS threads -----
# OpenBLAS splits even small GEMMs across its threads, and when another process holds a core
# its spinning threads wait to be scheduled: a (512x128)@(128x32) product measured 52 us on one
# thread and 4.4 ms on two with the second core busy. The per-step recurrent products are small
# and strictly sequential, so the time loops run them on one thread (see SMALL_GEMM_FLOPS) and
# leave the large chunk-wide GEMMs to all threads.
SMALL_GEMM_FLOPS = 64e6
_blas = None


def _blas_controllers():
    global _blas
    if _blas is None:
        try:
            from threadpoolctl import ThreadpoolController

            _blas = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
        except Exception:  # threadpoolctl missing or unable to find the BLAS: leave threads alone
            _blas = []
    return _blas


class blas_threads:
    """Context manager: run the BLAS with ``n`` threads inside (NumPy only; else a no-op)."""

    def __init__(self, n: int | None, xp=numpy):
        self.n = n if xp is numpy else None
        self.saved = []

    def __enter__(self):
        if self.n:
            for c in _blas_controllers():
                self.saved.append((c, c.get_num_threads()))
                if self.saved[-1][1] != self.n:
                    c.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        for c, n in self.saved:
            c.set_num_threads(n)
        self.saved = []


def loop_threads(flops_per_step: float, xp=numpy):
    """BLAS threads for a sequential loop whose GEMMs are ``flops_per_step`` each."""
    return blas_threads(1 if flops_per_step < SMALL_GEMM_FLOPS else None, xp)


def in_worker() -> bool:
    """Whether this code runs in charnn's worker thread (where run_in_two runs in sequence)."""
    return threading.current_thread().name.startswith("charnn")


def run_in_two(fn, a, b) -> list:
    """[fn(a), fn(b)], the second in charnn's worker thread while this one computes the first
    (fn should release the GIL: BLAS calls and the numba kernels do). Called from the worker
    itself, both run here, one after the other (the worker cannot wait for itself)."""
    global _executor
    if in_worker():
        return [fn(a), fn(b)]
    if _executor is None:
        from concurrent.futures import ThreadPoolExecutor

        _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="charnn")
    future = _executor.submit(fn, b)
    first = fn(a)
    return [first, future.result()]


class Deferred:
    """Work both halves of a batch split share: products off the critical path (the weight
    gradients) that either core may compute.

    Each half ``put``s such work (callables) as its backward pass reaches it and carries on
    down its own chain (the next layer's loop); at its end it calls ``close``, which runs put
    work, its own or the other half's, until every half has closed and none is left. The two
    cores of this machine run at different speeds from moment to moment (one half of (b)'s
    batch took 534 ms, the other 748, in the same step), so a static split waits for the slower
    one; the shared tail lets the faster core take over part of the slower one's products."""

    def __init__(self, halves: int = 2):
        import collections

        self._cv = threading.Condition()
        self._work = collections.deque()
        self._open = halves

    def put(self, fn):
        with self._cv:
            self._work.append(fn)
            self._cv.notify()

    def close(self, run: bool = True):
        """This half puts nothing more; with ``run``, run work until all is done (an exception
        from a piece of work propagates here, the rest is left to the other half)."""
        with self._cv:
            self._open -= 1
            self._cv.notify_all()
        while run:
            with self._cv:
                while not self._work and self._open > 0:
                    self._cv.wait()
                if not self._work:
                    return
                fn = self._work.popleft()
            fn()


def with_tail(tail, fn):
    """fn(defer) for one half of a batch split, ``defer`` being tail.put (None without a
    tail); then this half closes the tail and runs what is left in it. On an exception it
    closes without running anything, so the other half never waits for it."""
    if tail is None:
        return fn(None)
    try:
        result = fn(tail.put)
    except BaseException:
        tail.close(run=False)
        raise
    tail.close()
    return result


DEFER_BLOCK_FLOPS = 3e9  # the size of a deferred piece of a product (in_row_blocks)


def in_row_blocks(defer, rows: int, fn, flops: float):
    """fn(slice) over all ``rows``, or, with ``defer`` (Deferred.put), as deferred pieces of
    about DEFER_BLOCK_FLOPS each (at most four), so the halves can share the tail finely."""
    if defer is None:
        fn(slice(None))
        return
    k = int(min(4, max(1, round(flops / DEFER_BLOCK_FLOPS))))
    for j in range(k):
        defer(lambda r=slice(j * rows // k, (j + 1) * rows // k): fn(r))


def share_in_two(items: list, min_cut: int = 1 << 16) -> tuple:
    """Two lists of about equal work for :func:`run_in_two`: ``items`` are tuples of 1-D arrays
    of one length each (e.g. a parameter and its gradient, flattened); those of ``min_cut``
    elements or more are cut in half (the same cut for every array of the tuple), and the
    pieces are dealt out largest first to the lighter list."""
    pieces = []
    for arrays in items:
        n = len(arrays[0])
        cut = n // 2 if n >= min_cut else n
        pieces.append(tuple(a[:cut] for a in arrays))
        if cut < n:
            pieces.append(tuple(a[cut:] for a in arrays))
    groups, sizes = ([], []), [0, 0]
    for piece in sorted(pieces, key=lambda q: -len(q[0])):
        k = 0 if sizes[0] <= sizes[1] else 1
        groups[k].append(piece)
        sizes[k] += len(piece[0])
    return groups

"""Batched decoding for ``charnn serve``: one worker thread owns the model.

Requests reach the worker through a queue (``submit``); up to S sequences (slots) decode
together. Each step advances every active sequence by one token: the worker feeds the active
sequences' last tokens (n of them) to a Stepper of width w >= n in one batched forward, then
draws each sequence's next token from its row of the logits with the sequence's own NumPy
Generator, by sample.choose (the command line's choice). A new sequence is primed between
steps (its prompt but the last token run as one chunk, sample.prime_state) and joins at the
next step, which feeds its last prompt token; a finished, cancelled or timed-out one leaves
before the next step, freeing its slot.

Widths. The engine's step at widths 2-8 can cost more in aggregate than that many single
steps (a 2x512 LSTM on a 2-core Zen 4: 8.0k tokens/s at N=1, 6.3k at N=4), so the worker
times a step at every width it uses (the powers of two up to S, and S) while it warms up, and
for n active sequences runs whichever is faster: one step at the smallest width w >= n (the
unused columns padding), or n single steps of a width-1 Stepper with each sequence's state
swapped in and out. The timings keep being updated as it runs (a moving average of the plan
it ran; every PROBE steps the other plan runs once, so a timing taken in a burst of load
elsewhere is not kept for ever). The state moves between Steppers only when the active set or the plan changes.

Other work on the model (scoring) goes through ``run`` and runs on the worker between steps.
Events go back to the asyncio loop that made each request, batched: one
``call_soon_threadsafe`` per loop and step.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import threading
import time
from dataclasses import dataclass, field

import numpy

from ..backend import to_host
from ..io.vocab import EOS, Vocab
from ..sample import PieceText, StopRule, choose, prime_state

# A moving average's weight for a new timing of a plan, and how often (in steps) the plan
# not chosen is run once to refresh its timing.
EMA = 0.05
PROBE = 256


class QueueFull(Exception):
    """More sequences than free slots and queue places."""


class Closed(Exception):
    """The scheduler is stopping (or stopped): no new work."""


@dataclass(eq=False)
class Sequence:
    """One choice of a completion: its prompt tokens and settings, and where its events go.

    Events, in order: ("piece", index, text, logprobs or None) per token, then ("end", index,
    reason) with reason "stop", "length", "timeout", "shutdown" or "error: ...".
    Each event is put into ``sink`` (an asyncio.Queue) on ``loop``, batched per step;
    ``cancelled`` (set from any thread) makes it leave before the next step."""

    index: int
    ids: numpy.ndarray  # prompt tokens (at least one)
    prompt: str
    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: tuple = (0, 0)
    stops: tuple = ()
    logprobs: int | None = None
    deadline: float = math.inf  # time.monotonic()
    sink: object = None  # the caller's handle (an asyncio queue), returned with each event
    loop: object = None  # the caller's asyncio loop
    cancelled: bool = False
    # the worker's
    rng: numpy.random.Generator | None = field(default=None, repr=False)
    made: int = 0
    next_id: int = 0
    state: list | None = field(default=None, repr=False)
    col: int = -1
    stop_rule: StopRule | None = field(default=None, repr=False)
    piece_text: PieceText | None = field(default=None, repr=False)


def widths(slots: int) -> list:
    """The Stepper widths used for ``slots`` slots: powers of two below it, and it."""
    out, w = [], 1
    while w < slots:
        out.append(w)
        w *= 2
    return out + [slots]


class Scheduler:
    """Owns ``model`` on one worker thread; see the module docstring.

    Args:
        model, vocab: the loaded model and its vocabulary.
        slots: sequences decoded together at most.
        queue: sequences that may wait for a slot beyond the free ones (QueueFull past it).
        on_step: ``on_step(tokens, seconds)`` after each step (metrics); called on the worker.
    """

    def __init__(self, model, vocab: Vocab, slots: int = 16, queue: int = 64, on_step=None):
        self.model, self.vocab = model, vocab
        self.slots, self.queue_limit = slots, queue
        self.on_step = on_step
        self.widths = widths(slots)
        self.ready = threading.Event()
        self.failed: str | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: collections.deque = collections.deque()
        self._jobs: collections.deque = collections.deque()
        self._busy = 0
        self._closing = False
        self.active: list[Sequence] = []
        self._steppers: dict = {}
        self.cost: dict = {}  # width -> seconds per batched step; 0 -> seconds per swapped single step
        self._plan = None  # width of the batched Stepper in use, or 0 for single steps
        self._steps = 0
        self._dirty = True
        self._thread = threading.Thread(target=self._run, name="charnn-scheduler", daemon=True)

    # ----- the caller's side (any thread) -----
    def start(self):
        self._thread.start()
        return self

    def stop(self):
        """End every sequence (reason "shutdown"), refuse new work, let the worker exit."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()

    def join(self, timeout=None):
        self._thread.join(timeout)

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def waiting(self) -> int:
        return len(self._inbox)

    def submit(self, seqs: list):
        """Queue ``seqs`` (all or none): Closed when stopping, QueueFull when they do not fit
        in the free slots and the queue."""
        with self._wake:
            if self._closing:
                raise Closed("the server is shutting down")
            if len(self._inbox) + len(seqs) > self.queue_limit + (self.slots - self._busy):
                raise QueueFull(f"the server is busy: {self._busy} of {self.slots} slots in use and "
                                f"{len(self._inbox)} waiting")
            self._inbox.extend(seqs)
            self._wake.notify_all()

    def run(self, fn) -> concurrent.futures.Future:
        """Run ``fn(model, vocab)`` on the worker between steps; its Future."""
        fut = concurrent.futures.Future()
        with self._wake:
            if self._closing:
                raise Closed("the server is shutting down")
            self._jobs.append((fn, fut))
            self._wake.notify_all()
        return fut

    # ----- the worker -----
    def _run(self):
        try:
            self._warm()
        except Exception as e:  # a model that cannot step: said by the command, /health stays 503
            self.failed = f"{type(e).__name__}: {e}"
            self.ready.set()
            return
        self.ready.set()
        while True:
            with self._wake:
                self._busy = len(self.active)
                while not (self._closing or self._inbox or self._jobs or self.active):
                    self._wake.wait()
                closing = self._closing
                jobs = list(self._jobs)
                self._jobs.clear()
                joining = []
                if closing:
                    joining = list(self._inbox)
                    self._inbox.clear()
                else:
                    while self._inbox and len(self.active) + len(joining) < self.slots:
                        joining.append(self._inbox.popleft())
                self._busy = len(self.active) + len(joining)
            for fn, fut in jobs:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn(self.model, self.vocab))
                    except BaseException as e:
                        fut.set_exception(e)
            if closing:
                self._post([(s, ("end", s.index, "shutdown")) for s in self.active + joining])
                self.active = []
                self._busy = 0
                return
            events = []
            for seq in joining:
                self._prime(seq, events)
            self._leave(events)
            if self.active:
                self._step(events)
            self._post(events)

    def _prime(self, seq: Sequence, events: list):
        if seq.cancelled:
            return
        if time.monotonic() > seq.deadline:
            events.append((seq, ("end", seq.index, "timeout")))
            return
        seq.rng = numpy.random.default_rng(list(seq.seed))
        seq.stop_rule = StopRule(seq.stops)
        seq.piece_text = PieceText(self.vocab, seq.prompt)
        seq.state = prime_state(self.model, seq.ids)
        seq.next_id = int(seq.ids[-1])
        seq.col = -1
        self.active.append(seq)
        self._dirty = True

    def _leave(self, events: list):
        """Drop cancelled and timed-out sequences before the step."""
        now = time.monotonic()
        keep = []
        for seq in self.active:
            if seq.cancelled:
                self._dirty = True
            elif now > seq.deadline:
                events.append((seq, ("end", seq.index, "timeout")))
                self._dirty = True
            else:
                keep.append(seq)
        self.active = keep

    def _stepper(self, width: int):
        if width not in self._steppers:
            self._steppers[width] = self.model.stepper(width)
        return self._steppers[width]

    def _choose_plan(self, n: int) -> int:
        """The faster plan for n sequences by the timings so far; every PROBE-th step the other
        one, so that a timing taken in a burst of load elsewhere is not kept for ever."""
        w = next(w for w in self.widths if w >= n)
        single = n * self.cost[0] < self.cost[w]
        if self._steps % PROBE == PROBE - 1:
            single = not single
        return 0 if single else w

    def _relayout(self, plan: int):
        """Move every active sequence's state to where ``plan`` wants it."""
        xp = self.model.xp
        old = None
        if self._plan:
            old = self._stepper(self._plan).state()
        # Each sequence's own state, where it is not already in its own arrays.
        if old is not None:
            for seq in self.active:
                if seq.col >= 0:
                    j = seq.col
                    seq.state = [(h[:, j:j + 1], None if c is None else c[:, j:j + 1]) for h, c in old]
        if plan:
            stepper = self._stepper(plan)
            zero = self.model.initial_state(plan)
            state = [(h.copy(), None if c is None else c.copy()) for h, c in zero]
            for j, seq in enumerate(self.active):
                if seq.state is not None:
                    for (h, c), (sh, sc) in zip(state, seq.state):
                        h[:, j:j + 1] = sh
                        if c is not None:
                            c[:, j:j + 1] = sc
                seq.col, seq.state = j, None
            stepper.set_state(state)
            self._feed = numpy.zeros(plan, dtype=numpy.int64)
        else:
            zero = self.model.initial_state(1)
            for seq in self.active:
                if seq.state is None:
                    seq.state = [(h.copy(), None if c is None else c.copy()) for h, c in zero]
                else:
                    seq.state = [(xp.ascontiguousarray(h), None if c is None else xp.ascontiguousarray(c))
                                 for h, c in seq.state]
                seq.col = -1
        self._plan = plan
        self._dirty = False

    def _step(self, events: list):
        plan = self._choose_plan(len(self.active))
        self._steps += 1
        if self._dirty or plan != self._plan:
            self._relayout(plan)
        active, plan = self.active, self._plan
        t0 = time.perf_counter()
        if plan:
            feed = self._feed
            for j, seq in enumerate(active):
                feed[j] = seq.next_id
            rows = to_host(self._stepper(plan).step(feed))
        else:
            stepper = self._stepper(1)
            rows = []
            for seq in active:
                stepper.set_state(seq.state)
                rows.append(to_host(stepper.step(numpy.array([seq.next_id])))[0].copy())
                seq.state = stepper.state()
        seconds = time.perf_counter() - t0
        per = seconds if plan else seconds / len(active)  # plan 0's cost is per single step
        self.cost[plan] += EMA * (per - self.cost[plan])
        ops = self.model.ops
        keep = []
        for j, seq in enumerate(active):
            row = rows[j]
            tok = choose(row, seq.temperature, seq.rng, seq.top_k, seq.top_p, ops)
            text = seq.piece_text(tok)
            lp = self._logprobs(row, tok, text, seq.logprobs) if seq.logprobs is not None else None
            seq.made += 1
            events.append((seq, ("piece", seq.index, text, lp)))
            if seq.stop_rule.feed(text):
                events.append((seq, ("end", seq.index, "stop")))
            elif seq.made >= seq.max_tokens:
                events.append((seq, ("end", seq.index, "length")))
            else:
                seq.next_id = tok
                keep.append(seq)
        if len(keep) != len(active):
            self.active = keep
            self._dirty = True
        if self.on_step is not None:
            self.on_step(len(active), seconds)

    def _logprobs(self, row, tok: int, text: str, top: int) -> dict:
        """OpenAI's logprobs of one token: its log-probability under the model (temperature 1,
        no filtering) and the ``top`` most likely tokens'."""
        z = numpy.asarray(row, dtype=numpy.float64)
        z = z - z.max()
        lp = z - math.log(numpy.exp(z).sum())
        best = numpy.argsort(-lp, kind="stable")[:top] if top else []
        shown = {}
        for i in best:
            t = self.vocab.tokens[int(i)]
            shown["\n" if t == EOS else t] = float(lp[i])
        return {"token": text, "logprob": float(lp[tok]), "top": shown}

    def _post(self, events: list):
        by_loop: dict = {}
        for seq, ev in events:
            if not seq.cancelled and seq.loop is not None:
                by_loop.setdefault(seq.loop, []).append((seq.sink, ev))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop has closed: nobody is listening
                pass

    def _warm(self):
        """Compile and time a step at every width (and the swapped single step), and prime
        once, before the server says it is ready. Each width first runs past the thread
        tuner's trials (engine/stepper.py); then the widths are timed in turns, three rounds,
        so a burst of load elsewhere touches them all alike."""
        rng = numpy.random.default_rng(0)
        V = len(self.vocab)
        prime_state(self.model, rng.integers(0, V, 8))
        for w in self.widths:
            stepper = self._stepper(w)
            for _ in range(14):
                stepper.step(rng.integers(0, V, w))
        times: dict = {w: [] for w in [0] + self.widths}
        single = self._stepper(1)
        state = single.state()
        for _ in range(3):
            for w in self.widths:
                stepper = self._stepper(w)
                for _ in range(4):
                    t0 = time.perf_counter()
                    stepper.step(rng.integers(0, V, w))
                    times[w].append(time.perf_counter() - t0)
            for _ in range(4):
                t0 = time.perf_counter()
                single.set_state(state)
                single.step(rng.integers(0, V, 1))
                state = single.state()
                times[0].append(time.perf_counter() - t0)
        self.cost = {w: float(numpy.median(t)) for w, t in times.items()}


def _put_all(items):
    for sink, ev in items:
        sink.put_nowait(ev)

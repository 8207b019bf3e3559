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
swapped in and out. At each width from 2 it also times a Stepper with the engine's packed
products (where the CPU runs them) and keeps the faster for good. The timings keep being
updated as it runs (a moving average of the plan it ran; every PROBE steps the other plan runs
once, so a timing taken in a burst of load elsewhere is not kept for ever). The state moves
between Steppers only when the active set or the plan changes.

Each step draws the tokens of every sequence at its plain temperature (no top-k, top-p or
greedy) in one call over the whole (n, V) block of logits (ops.draw_scaled_rows, the same
index the command line's draw gives each row), the others row by row.

Other work on the model (scoring) goes through ``run`` and runs on the worker between steps.
Events go back to the asyncio loop that made each request through the request's Channel: the
worker appends them (a thread-safe deque) and wakes a loop at most once a step, and not at all
for a channel whose reader is waiting out its interval between events (it takes what gathered
when it wakes), unless a sequence ended. So the worker never waits for the loop, and a busy
loop takes many tokens at once instead of being woken for each.
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
from .channel import Channel

# A moving average's weight for a new timing of a plan, and how often (in steps) the plan
# not chosen is run once to refresh its timing.
EMA = 0.05
PROBE = 256
# Sequences at a plain temperature drawn in one call from this many up (below it, row by row:
# the whole-block call's dozen NumPy calls cost about what three rows' compiled draws do).
ROWS_AT_ONCE = 4
# The primed states of recent prompts kept (bytes of state; the least recently used go first).
PROMPT_CACHE_BYTES = 32 << 20


class QueueFull(Exception):
    """More sequences than free slots and queue places."""


class Closed(Exception):
    """The scheduler is stopping (or stopped): no new work."""


@dataclass(eq=False)
class Sequence:
    """One choice of a completion: its prompt tokens and settings, and where its events go.

    Events, in order: ("piece", index, text, logprobs or None) per token, then ("end", index,
    reason) with reason "stop", "length", "timeout", "shutdown" or "error: ...".
    Each event is put into ``channel`` (a Channel, read on its loop);
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
    channel: Channel | None = None  # where its events go (None: nowhere)
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
        self._plain_text = vocab.level != "word"  # a token's text is the token (PieceText's char level)
        self._prompts: dict = {}  # prompt tokens (bytes) -> their primed state, least recently used first
        self._prompt_bytes = 0
        cfg = model.config
        self._state_bytes = cfg.layers * cfg.hidden * numpy.dtype(model.dtype).itemsize * (2 if cfg.cell == "lstm" else 1)
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
                touched = set()
                for s in self.active + joining:
                    _emit(s, ("end", s.index, "shutdown"), touched)
                Channel.post(touched)
                self.active = []
                self._busy = 0
                return
            touched: set = set()  # the channels put into this step
            for seq in joining:
                self._prime(seq, touched)
            self._leave(touched)
            if self.active:
                self._step(touched)
            Channel.post(touched)

    def _prime(self, seq: Sequence, touched: set):
        if seq.cancelled:
            return
        if time.monotonic() > seq.deadline:
            _emit(seq, ("end", seq.index, "timeout"), touched)
            return
        seq.rng = numpy.random.default_rng(list(seq.seed))
        seq.stop_rule = StopRule(seq.stops)
        seq.piece_text = PieceText(self.vocab, seq.prompt)
        seq.state = self._primed(seq.ids)
        seq.next_id = int(seq.ids[-1])
        seq.col = -1
        self.active.append(seq)
        self._dirty = True

    def _primed(self, ids) -> list | None:
        """prime_state(model, ids), from the cache of recent prompts where it is there (the
        same arrays: a prompt's state does not depend on anything else). A prime is a
        forward pass over a chunk, some milliseconds even for a short prompt, while a step
        for every sequence costs a fraction of one; servers see the same prompt again and
        again (a page's default, a client's fixed preamble)."""
        if len(ids) <= 1:
            return None
        key = bytes(numpy.asarray(ids, dtype=numpy.int64))
        state = self._prompts.pop(key, None)
        if state is None:
            xp = self.model.xp
            state = [(xp.array(h), None if c is None else xp.array(c)) for h, c in prime_state(self.model, ids)]
            self._prompt_bytes += self._state_bytes
            while self._prompts and self._prompt_bytes > PROMPT_CACHE_BYTES:
                self._prompts.pop(next(iter(self._prompts)))
                self._prompt_bytes -= self._state_bytes
            if self._prompt_bytes > PROMPT_CACHE_BYTES:  # one state larger than the whole cache
                self._prompt_bytes -= self._state_bytes
                return state
        self._prompts[key] = state  # (the most recently used last)
        return state

    def _leave(self, touched: set):
        """Drop cancelled and timed-out sequences before the step."""
        now = time.monotonic()
        keep = []
        for seq in self.active:
            if seq.cancelled:
                self._dirty = True
            elif now > seq.deadline:
                _emit(seq, ("end", seq.index, "timeout"), touched)
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

    def _rejoin(self):
        """The same batched plan, the active set changed: the sequences that left free their
        columns (which run on as padding), and each new one takes a free column with its
        state written there; the others stay where they are (a full relayout copied every
        state at every join and leave)."""
        new = [seq for seq in self.active if seq.col < 0]
        if new:
            stepper = self._stepper(self._plan)
            used = {seq.col for seq in self.active}
            free = (j for j in range(self._plan) if j not in used)
            state = stepper.state()
            for seq in new:
                j = next(free)
                for layer, (h, c) in enumerate(state):
                    sh, sc = (0.0, 0.0) if seq.state is None else seq.state[layer]
                    h[:, j:j + 1] = sh
                    if c is not None:
                        c[:, j:j + 1] = sc
                seq.col, seq.state = j, None
            stepper.set_state(state)
        self._dirty = False

    def _step(self, touched: set):
        plan = self._choose_plan(len(self.active))
        self._steps += 1
        if plan != self._plan or (self._dirty and not plan):
            self._relayout(plan)
        elif self._dirty:
            self._rejoin()
        active, plan = self.active, self._plan
        t0 = time.perf_counter()
        if plan:
            feed = self._feed
            cols = [seq.col for seq in active]
            for j, seq in zip(cols, active):
                feed[j] = seq.next_id
            rows = to_host(self._stepper(plan).step(feed))
            if cols != list(range(len(active))):
                rows = rows[cols]  # (n, V): each sequence's row, in the order of active
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
        toks = self._draw(active, rows)
        tokens = self.vocab.tokens
        plain = self._plain_text
        keep = []
        for j, seq in enumerate(active):
            tok = toks[j]
            text = tokens[tok] if plain else seq.piece_text(tok)
            lp = None if seq.logprobs is None else self._logprobs(rows[j], tok, text, seq.logprobs)
            seq.made += 1
            ch = seq.channel
            live = ch is not None and not seq.cancelled
            if live:
                ch.items.append(("piece", seq.index, text, lp))
                touched.add(ch)
            end = "stop" if seq.stop_rule.feed(text) else "length" if seq.made >= seq.max_tokens else None
            if end is None:
                seq.next_id = tok
                keep.append(seq)
            elif live:
                ch.put(("end", seq.index, end), end=True)
        if len(keep) != len(active):
            self.active = keep
            self._dirty = True
        if self.on_step is not None:
            self.on_step(len(active), seconds)

    def _draw(self, active: list, rows) -> list:
        """Each sequence's next token from its row of ``rows``: the sequences at a plain
        temperature in one call where there are ROWS_AT_ONCE of them (ops.draw_scaled_rows,
        one ``random()`` of each one's generator, as the command line's draw takes), the
        others (greedy, top-k, top-p, or an ops without the call) by sample.choose row by row."""
        ops = self.model.ops
        n = len(active)
        plain = [j for j, seq in enumerate(active) if seq.temperature > 0 and seq.top_k is None and seq.top_p is None]
        toks = None
        if len(plain) >= ROWS_AT_ONCE:
            block = rows[:n] if len(plain) == n else numpy.asarray(rows)[plain]
            drawn = ops.draw_scaled_rows(block, [active[j].temperature for j in plain], [active[j].rng for j in plain])
            if drawn is not None:
                drawn = drawn.tolist()
                if len(plain) == n:
                    return drawn
                toks = [None] * n
                for j, tok in zip(plain, drawn):
                    toks[j] = tok
        if toks is None:
            toks = [None] * n
        for j, seq in enumerate(active):
            if toks[j] is None:
                toks[j] = choose(rows[j], seq.temperature, seq.rng, seq.top_k, seq.top_p, ops)
        return toks

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

    def _warm(self):
        """Compile and time a step at every width (and the swapped single step), and prime
        and draw once, before the server says it is ready. Each width first runs past the thread
        tuner's trials (engine/stepper.py); then the widths are timed in turns, three rounds,
        so a burst of load elsewhere touches them all alike. Where the engine can run a width's
        products packed, a packed stepper of that width is timed in the same turns, and the
        faster of the two is the width's from then on (never switched: their last bits differ)."""
        rng = numpy.random.default_rng(0)
        V = len(self.vocab)
        prime_state(self.model, rng.integers(0, V, 8))
        # Each width's stepper, and where the engine can run its products packed at that
        # width, a packed one: both are timed and the faster kept (engine/stepper.py).
        candidates = {}
        for w in self.widths:
            candidates[w] = [self._stepper(w)]
            packed = self.model.stepper(w, packed=True)
            if getattr(packed, "packed", None):
                candidates[w].append(packed)
            for stepper in candidates[w]:
                for _ in range(14):
                    rows = to_host(stepper.step(rng.integers(0, V, w)))
        self.model.ops.draw_scaled_rows(rows, [1.0] * len(rows), [rng] * len(rows))  # (compiled here)
        times: dict = {(w, k): [] for w in self.widths for k in range(len(candidates[w]))}
        times[0] = []
        single = self._stepper(1)
        state = single.state()
        for _ in range(3):
            for w in self.widths:
                for k, stepper in enumerate(candidates[w]):
                    for _ in range(4):
                        t0 = time.perf_counter()
                        stepper.step(rng.integers(0, V, w))
                        times[w, k].append(time.perf_counter() - t0)
            for _ in range(4):
                t0 = time.perf_counter()
                single.set_state(state)
                single.step(rng.integers(0, V, 1))
                state = single.state()
                times[0].append(time.perf_counter() - t0)
        self.cost = {0: float(numpy.median(times[0]))}
        for w in self.widths:
            k = min(range(len(candidates[w])), key=lambda k: numpy.median(times[w, k]))
            self._steppers[w] = candidates[w][k]
            self.cost[w] = float(numpy.median(times[w, k]))


def _emit(seq: Sequence, ev: tuple, touched: set):
    """Put an end ``ev`` of ``seq`` into its channel (not for a cancelled one)."""
    if seq.channel is not None and not seq.cancelled:
        seq.channel.put(ev, end=True)
        touched.add(seq.channel)

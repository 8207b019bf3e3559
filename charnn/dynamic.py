"""Dynamic evaluation: a model that adapts its weights to the text as it reads it.

Krause, Kahembwe, Murray and Renals, "Dynamic Evaluation of Neural Sequence Models" (ICML
2018). The text is cut into segments s_1, s_2, ... of ``segment`` tokens. Each segment is
first scored with the current weights (the state carried from the previous segment), and only
then is one gradient step taken on that segment's loss (truncated BPTT over the segment), so
every token's probability is computed before any update that saw it.

Notation:

    θ          the adapted parameters (a copy of the model's; the model is never changed)
    θ0         the trained parameters
    g          the gradient of a segment's mean loss (nats per token) at θ
    MS_g       the mean of g² per parameter over segments of training-side text, at θ0, with
               the segment length and the carried state of the scoring itself (one stream)
    s          sqrt(MS_g) + ε, ε = EPS_REL · mean(sqrt(MS_g))
    η, λ       the learning rate (``lr``) and the decay towards θ0 (``decay``)

The update after each segment (the paper's RMS-normalised rule with a global prior):

    θ ← θ − η g / s + min(λ s / mean(s), 1) ⊙ (θ0 − θ)

``mean`` is over every parameter of the model. The paper's RMS_norm = sqrt(MS_g) / mean(sqrt(MS_g))
is clipped at 1/λ, i.e. λ RMS_norm at 1, so the decay never overshoots θ0. Its rule has ε in the
gradient's denominator only; here ε is in the decay's weights too. Why: MS_g comes from a sample
of training text (at most STATS_TOKENS tokens), and a parameter that sample never moved (the
embedding of a word it lacks) has MS_g = 0: with the paper's decay it would drift under
η g / ε and never be pulled back. With ε in both, such a parameter learns at η / ε and decays
at λ ε / mean(s).

Hyperparameters (η, λ, segment length) are chosen on training-side text, never on the text
being scored: :func:`tune`'s grid search on a held-out training-side text (the grid extended
past an edge where the best sits on it, :func:`search`), or DEFAULTS per level (see
benchmarks/README.md, "Dynamic evaluation"). Which texts those are for a model file, and the
whole run of ``score --dynamic``, is charnn.dynamic_run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Optional

import numpy

from . import memory
from .backend import to_host
from .nn.model import LanguageModel
from .nn.ops import Ops
from .score import LN2, Scored, encode_known

# MS_g's ε, relative to mean(sqrt(MS_g)) (scale-free: MS_g's scale follows the loss's).
EPS_REL = 0.1
# The most training-side tokens MS_g is measured on (its last ones): one stream, like scoring.
STATS_TOKENS = 20_000

Progress = Optional[Callable[[int, int], None]]


class DynamicError(ValueError):
    """Dynamic evaluation cannot run as asked (bad hyperparameters, too little text, a loss
    that is not finite)."""


class _NonFinite(Exception):
    """A segment's loss is not finite: ``at`` tokens were scored before it, ``P`` in all."""

    def __init__(self, at: int, P: int):
        self.at, self.P = at, P


@dataclass(frozen=True)
class DynamicSettings:
    """Dynamic evaluation's settings: η (``lr``), λ (``decay``), the segment length in tokens,
    and the training-side texts it reads (paths). A value left None is chosen (dynamic_run):
    η and λ on held-out training-side text (``tune``, else the validation text the model file
    names) or, with none, the level's DEFAULTS; the segment from DEFAULTS; the gradient
    statistics on ``stats``, else the training part of the model's recorded corpus. Never the
    scored text: a ``stats`` or ``tune`` file that is the scored text is refused."""

    lr: float | None = None
    decay: float | None = None
    segment: int | None = None
    stats: str | None = None
    tune: str | None = None

    def __post_init__(self):
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr)
                                        and self.lr >= 0):
            raise DynamicError(f"the dynamic learning rate must be a finite number >= 0, got {self.lr}")
        if self.decay is not None and not (isinstance(self.decay, (int, float)) and math.isfinite(self.decay)
                                           and 0 <= self.decay <= 1):
            raise DynamicError(f"the dynamic decay must be a number in [0, 1], got {self.decay}")
        if self.segment is not None and (isinstance(self.segment, bool) or not isinstance(self.segment, int)
                                         or self.segment < 1):
            raise DynamicError(f"the dynamic segment must be a positive number of tokens, got {self.segment}")

    def given(self) -> list:
        """The names of the settings given (not None), in field order."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def chosen(self) -> bool:
        """Whether η, λ and the segment all have values (as scoring needs)."""
        return None not in (self.lr, self.decay, self.segment)

    def to_json(self) -> dict:
        """η, λ and the segment."""
        return {"lr": self.lr, "decay": self.decay, "segment": self.segment}


# Chosen on training-side text (benchmarks/README.md, "Dynamic evaluation"); the characters'
# decay since 2026-12-06 from the tuning grids of the policy's two fitting corpora (poems,
# austen: 3e-3 the lowest mean there; "Dynamic evaluation's character defaults refitted").
DEFAULTS = {"char": DynamicSettings(lr=3e-4, decay=3e-3, segment=20),
            "word": DynamicSettings(lr=3e-4, decay=0.0, segment=10)}
# tune()'s grid when the caller gives none: 12 passes over the tuning text.
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3)
DECAY_GRID = (0.0, 1e-4, 1e-3)


def text_ids(vocab, text: str) -> numpy.ndarray:
    """The tokens of ``text`` after the separator (newline or <eos>) as the first context, as
    score_document reads a document; characters outside the vocabulary are left out."""
    ids, _, _ = encode_known(vocab, text, strict=False)
    return _with_start(vocab, ids)


def _with_start(vocab, ids) -> numpy.ndarray:
    return numpy.concatenate([[vocab.start_id], ids]).astype(numpy.int64)


def _segments(ids, T: int):
    """(x, y) for each segment of one stream over ``ids``, each (T', 1) int64."""
    for a in range(0, len(ids) - 1, T):
        b = min(a + T, len(ids) - 1)
        yield ids[a:b, None].copy(), ids[a + 1:b + 1, None].copy()


def _copy_state(state):
    """A state of its own, whatever buffers the pass that returned it computes in."""
    return [(h.copy(), None if c is None else c.copy()) for h, c in state]


def check_memory(model: LanguageModel, segment: int, tokens: int, max_memory: int | None = None):
    """Refuse (memory.MemoryLimitError) dynamic evaluation of ``model`` in segments of
    ``segment`` tokens (of a text of ``tokens``) whose copies of the parameters and segment
    activations (memory.dynamic) would pass the memory available or ``max_memory`` bytes."""
    shape, D = memory.Shape.of(model.config), numpy.dtype(model.dtype).itemsize
    T = max(1, min(segment, tokens))
    lowest = min(d.segment for d in DEFAULTS.values())
    subject = memory.culprit(lambda T=T: memory.dynamic(shape, T, D).bytes,
                             {"--dynamic-segment": ("T", segment, min(lowest, T))},
                             f"--dynamic on a {model.config.cell} {model.config.layers}x{model.config.hidden} model")
    memory.check(memory.dynamic(shape, T, D), subject, max_memory)


def gradient_stats(model: LanguageModel, ids, segment: int, max_tokens: int = STATS_TOKENS,
                   progress: Progress = None, max_memory: int | None = None) -> dict:
    """MS_g: the mean squared gradient per parameter (arrays on the model's device) over the
    segments of ``ids``' last ``max_tokens`` + 1 tokens, read as one stream with the state
    carried and the weights fixed at the model's.

    Raises:
        DynamicError: fewer than two tokens.
        memory.MemoryLimitError: the work would pass the memory available or ``max_memory``.
    """
    ids = numpy.asarray(ids, dtype=numpy.int64)[-(max_tokens + 1):]
    if len(ids) < 2:
        raise DynamicError("the text for the gradient statistics has fewer than two tokens")
    check_memory(model, segment, len(ids) - 1, max_memory)
    xp = model.xp
    total = {k: xp.zeros_like(v) for k, v in model.params.items()}
    state, n, done = None, 0, 0
    if progress:
        progress(0, len(ids) - 1)
    forward_ops, backward_ops = model.ops.segment_ops(model, 1)
    with model.ops.small_chunk_loop(_largest_product(model, segment)):
        for x, y in _segments(ids, segment):
            _, cache, state = model.forward(x, y, state, store=True, ops=forward_ops)
            state = _copy_state(state)
            grads, _ = model.backward(cache, ops=backward_ops)
            for k, g in grads.items():
                total[k] += g * g
            n += 1
            done += len(y)
            if progress:
                progress(done, len(ids) - 1)
    for v in total.values():
        v /= n
    return total


class DynamicUpdate:
    """The update rule of the module docstring, on the arrays' own device (xp).

    Args:
        theta0: name -> the trained parameters (read here, not kept).
        ms: name -> MS_g, same shapes.
        lr, decay: η and λ.
    """

    def __init__(self, theta0: dict, ms: dict, lr: float, decay: float, eps_rel: float = EPS_REL):
        xp = _xp(next(iter(ms.values())))
        roots = {k: xp.sqrt(v) for k, v in ms.items()}
        count = sum(r.size for r in roots.values())
        mean_root = float(sum(float(r.sum()) for r in roots.values())) / count
        if not mean_root > 0 or not math.isfinite(mean_root):
            raise DynamicError("the gradient statistics are all zero or not finite; measure them on more "
                               "(or other) training-side text")
        eps = eps_rel * mean_root
        scale = {k: r + eps for k, r in roots.items()}  # s
        mean_s = mean_root + eps
        self.lr, self.decay = lr, decay
        # θ ← θ (1 − r) + r θ0 − (η / s) g, r = min(λ s / mean(s), 1), over arrays kept for it
        # (the decay's pull, r (θ0 − θ), at the old θ); without a decay (r = 0), θ − (η / s) g.
        self.keep, self.pull = {}, {}
        if decay > 0:
            rate = {k: xp.minimum(decay * s / mean_s, 1.0).astype(s.dtype) for k, s in scale.items()}
            self.keep = {k: (1.0 - r).astype(r.dtype) for k, r in rate.items()}
            self.pull = {k: (rate[k] * theta0[k]).astype(theta0[k].dtype) for k in scale}
        self.lr_scale = {k: (lr / s).astype(s.dtype) for k, s in scale.items()}

    def step(self, params: dict, grads: dict, ops=None):
        """One update of ``params`` in place from ``grads`` (of the segment's loss at params;
        they may be overwritten), one parameter at a time by ``ops`` (the model's; default the
        reference operations)."""
        ops = ops or Ops()
        for k, p in params.items():
            ops.dynamic_step(p, grads[k], self.keep.get(k), self.pull.get(k), self.lr_scale[k])


def _xp(a):
    from .backend import array_module

    return array_module(a)


def score_dynamic(model: LanguageModel, vocab, text: str, settings: DynamicSettings, stats: dict,
                  strict: bool = False, with_tokens: bool = False, progress: Progress = None,
                  max_memory: int | None = None) -> Scored:
    """Score ``text`` as one stream (as score_document with one stream) while adapting a copy
    of the model's weights, segment by segment (module docstring). ``stats``: MS_g from
    :func:`gradient_stats` with the same segment length. The model is not changed.

    ``progress`` is called with (tokens predicted, tokens to predict). Work that would pass
    the memory available (or ``max_memory`` bytes) is refused first (memory.MemoryLimitError)."""
    if not settings.chosen():
        raise DynamicError(f"scoring needs the dynamic learning rate, decay and segment, got {settings.to_json()}; "
                           "dynamic_run.evaluate chooses those not given")
    ids, toks, excluded = encode_known(vocab, text, strict)
    check_memory(model, settings.segment, len(ids), max_memory)
    try:
        nll = _run(model, _with_start(vocab, ids), settings, stats, progress)
    except _NonFinite as e:
        where = f"at token {e.at + 1:,} of {e.P:,}"
        if e.at == 0 or settings.lr == 0:
            raise DynamicError(f"the model gives a loss that is not a finite number {where}, before any update "
                               f"(its weights overflow); dynamic evaluation cannot score with it") from None
        raise DynamicError(f"dynamic evaluation diverged {where} (the adapted weights overflowed with learning "
                           f"rate {settings.lr:g}); try a smaller dynamic learning rate") from None
    s = Scored(text=text, tokens=len(nll), logprob=-float(nll.sum()), excluded=excluded)
    if with_tokens:
        s.token_strings = toks
        s.surprisal = list(nll / LN2)
    return s


def _run(model: LanguageModel, seq, settings: DynamicSettings, stats: dict, progress: Progress = None):
    """The negative log-likelihood (nats, float64 host array) of each token of ``seq`` after
    the first, scored dynamically. Raises _NonFinite at the first segment whose loss is not
    finite (the adapted weights overflowed: nothing after it can be finite either)."""
    P = len(seq) - 1
    out = numpy.zeros(max(P, 0))
    if P < 1:
        return out
    adapted = LanguageModel(model.config, model.params, model.backend)  # a private copy
    adapt = settings.lr > 0  # η = 0: θ stays θ0, where the decay has nothing to pull
    rule = DynamicUpdate(model.params, stats, settings.lr, settings.decay) if adapt else None
    state, done = None, 0
    if progress:
        progress(0, P)
    forward_ops, backward_ops = adapted.ops.segment_ops(adapted, 1)
    with model.ops.small_chunk_loop(_largest_product(model, settings.segment)):
        for x, y in _segments(seq, settings.segment):
            _, cache, state = adapted.forward(x, y, state, store=True, ops=forward_ops)
            state = _copy_state(state)
            T = len(y)
            out[done:done + T] = to_host(cache["nll"]).astype(numpy.float64).reshape(T)  # scored first
            if not numpy.isfinite(out[done:done + T]).all():
                raise _NonFinite(done + int(numpy.argmin(numpy.isfinite(out[done:done + T]))), P)
            done += T
            if adapt and done < P:  # no step after the last segment: nothing is left to score
                grads, _ = adapted.backward(cache, ops=backward_ops)
                rule.step(adapted.params, grads, adapted.ops)
            if progress:
                progress(done, P)
    return out


def _largest_product(model: LanguageModel, T: int) -> float:
    """The FLOPs of a segment's largest product (a weight matrix times T columns)."""
    return 2.0 * max(p.size for p in model.params.values()) * T


# How far tune()'s default grid may extend past its edges: η within these; λ up to 1, down to
# DECAY_FLOOR (η = 0 and λ = 0 are edges of their own: nothing is below them).
LR_LIMITS = (1e-6, 0.1)
DECAY_FLOOR = 1e-6


def ladder(x: float, up: bool) -> float:
    """The next value above (``up``) or below ``x`` > 0 on the default grids' ladder, ... 1e-4,
    3e-4, 1e-3, 3e-3 ... (1 and 3 in each decade): 1e-4 -> 3e-4 up, 3e-5 down."""
    k = math.floor(math.log10(x) + 1e-9)
    m = x / 10.0 ** k  # in [1, 10)
    if up:
        v = 3 * 10.0 ** k if m < 3 - 1e-9 else 10.0 ** (k + 1)
    else:
        v = 3 * 10.0 ** (k - 1) if m <= 1 + 1e-9 else 10.0 ** k if m <= 3 + 1e-9 else 3 * 10.0 ** k
    return float(f"{v:.0e}")


def search(loss: Callable[[float, float], float], lrs, decays, extend_lr: bool = True, extend_decay: bool = True):
    """The (η, λ) of the lowest ``loss(lr, decay)`` (one that is not finite is never the lowest):
    first the grid lrs x decays, in order; then, while the best sits on an edge of the values
    tried (the highest or lowest η, the highest or lowest λ) that may extend, the next value
    past that edge on the ladder, with the best's other value, until the loss turns up or a
    limit is reached (LR_LIMITS; λ in [DECAY_FLOOR, 1]; η = 0 and λ = 0 are floors). Ties go
    to the first tried.

    Returns:
        ((lr, decay), results): results a list of (lr, decay, loss) in the order tried.
    """
    losses = {}
    for lr in lrs:
        for d in decays:
            if (lr, d) not in losses:
                losses[lr, d] = loss(lr, d)
    while True:
        best = min(losses, key=lambda k: losses[k] if math.isfinite(losses[k]) else math.inf)
        if not math.isfinite(losses[best]):
            break
        lr, d = best
        tried_lr, tried_d = {k[0] for k in losses}, {k[1] for k in losses}
        nexts = []
        if extend_lr and lr == max(tried_lr) and ladder(lr, True) <= LR_LIMITS[1] * (1 + 1e-9) and lr > 0:
            nexts.append((ladder(lr, True), d))
        if extend_lr and lr == min(tried_lr) and lr > 0 and ladder(lr, False) >= LR_LIMITS[0] * (1 - 1e-9):
            nexts.append((ladder(lr, False), d))
        if extend_decay and d == max(tried_d) and 0 < d < 1:
            nexts.append((lr, min(ladder(d, True), 1.0)))
        if extend_decay and d == min(tried_d) and d > 0 and ladder(d, False) >= DECAY_FLOOR * (1 - 1e-9):
            nexts.append((lr, ladder(d, False)))
        nexts = [k for k in nexts if k not in losses]
        if not nexts:
            break
        for k in nexts:
            losses[k] = loss(*k)
    return best, [(lr, d, v) for (lr, d), v in losses.items()]


def tune(model: LanguageModel, ids, stats: dict, segment: int, lrs=None, decays=None,
         progress: Progress = None, max_memory: int | None = None) -> tuple[DynamicSettings, list]:
    """The (η, λ) with the lowest dynamic loss on ``ids`` (a held-out training-side text, from
    text_ids; never the text to be scored), ``stats`` measured with ``segment``, by
    :func:`search`: a grid left None is the default one (LR_GRID, DECAY_GRID), extended past
    an edge where the best sits on it; a grid given is searched as given.

    Returns:
        (settings, results): results a list of (lr, decay, nats per token), in the order tried
        (the grid's first).
    """
    grid = (len(tuple(LR_GRID if lrs is None else lrs)) * len(tuple(DECAY_GRID if decays is None else decays)))
    P = len(ids) - 1
    if P < 1:
        raise DynamicError("the tuning text has fewer than two tokens")
    check_memory(model, segment, P, max_memory)
    passes = []

    def loss(lr, d):
        n = len(passes)
        passes.append((lr, d))
        total = max(grid, n + 1) * P
        each = None if progress is None else (lambda done, _, n=n: progress(n * P + done, total))
        try:
            return float(_run(model, ids, DynamicSettings(lr, d, segment), stats, each).mean())
        except _NonFinite:
            return math.inf  # (diverged: never the best)

    best, results = search(loss, tuple(LR_GRID if lrs is None else lrs), tuple(DECAY_GRID if decays is None else decays),
                           extend_lr=lrs is None, extend_decay=decays is None)
    return DynamicSettings(best[0], best[1], segment), results

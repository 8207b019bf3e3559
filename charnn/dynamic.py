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
being scored: DEFAULTS per level (see benchmarks/README.md, "Dynamic evaluation"), or
:func:`tune`'s grid search on a held-out training-side text.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy

from . import memory
from .backend import to_host
from .nn.model import LanguageModel
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
    """η (``lr``), λ (``decay``) and the segment length in tokens."""

    lr: float
    decay: float
    segment: int

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr >= 0):
            raise DynamicError(f"the dynamic learning rate must be a finite number >= 0, got {self.lr}")
        if not (isinstance(self.decay, (int, float)) and math.isfinite(self.decay) and 0 <= self.decay <= 1):
            raise DynamicError(f"the dynamic decay must be a number in [0, 1], got {self.decay}")
        if isinstance(self.segment, bool) or not isinstance(self.segment, int) or self.segment < 1:
            raise DynamicError(f"the dynamic segment must be a positive number of tokens, got {self.segment}")

    def to_json(self) -> dict:
        return asdict(self)


# Chosen on training-side text (benchmarks/README.md, "Dynamic evaluation").
DEFAULTS = {"char": DynamicSettings(lr=3e-4, decay=0.0, segment=20),
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
    with model.ops.small_chunk_loop(_largest_product(model, segment)):
        for x, y in _segments(ids, segment):
            _, cache, state = model.forward(x, y, state, store=True)
            state = _copy_state(state)
            grads, _ = model.backward(cache)
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
        # θ ← θ (1 − r) + r θ0 − (η / s) g, r = min(λ s / mean(s), 1): four in-place passes a
        # step over arrays kept for it (the decay's pull, r (θ0 − θ), at the old θ).
        self.rate = {k: xp.minimum(decay * s / mean_s, 1.0).astype(s.dtype) for k, s in scale.items()}
        self.keep = {k: (1.0 - r).astype(r.dtype) for k, r in self.rate.items()}
        self.pull = {k: (self.rate[k] * theta0[k]).astype(theta0[k].dtype) for k in scale}
        self.lr_scale = {k: (lr / s).astype(s.dtype) for k, s in scale.items()}

    def step(self, params: dict, grads: dict):
        """One update of ``params`` in place from ``grads`` (of the segment's loss at params;
        overwritten)."""
        for k, p in params.items():
            g = grads[k]
            p *= self.keep[k]
            p += self.pull[k]
            g *= self.lr_scale[k]
            p -= g


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
    with model.ops.small_chunk_loop(_largest_product(model, settings.segment)):
        for x, y in _segments(seq, settings.segment):
            _, cache, state = adapted.forward(x, y, state, store=True)
            state = _copy_state(state)
            T = len(y)
            out[done:done + T] = to_host(cache["nll"]).astype(numpy.float64).reshape(T)  # scored first
            if not numpy.isfinite(out[done:done + T]).all():
                raise _NonFinite(done + int(numpy.argmin(numpy.isfinite(out[done:done + T]))), P)
            done += T
            if adapt and done < P:  # no step after the last segment: nothing is left to score
                grads, _ = adapted.backward(cache)
                rule.step(adapted.params, grads)
            if progress:
                progress(done, P)
    return out


def _largest_product(model: LanguageModel, T: int) -> float:
    """The FLOPs of a segment's largest product (a weight matrix times T columns)."""
    return 2.0 * max(p.size for p in model.params.values()) * T


def tune(model: LanguageModel, ids, stats: dict, segment: int, lrs=None, decays=None,
         progress: Progress = None, max_memory: int | None = None) -> tuple[DynamicSettings, list]:
    """The (η, λ) of the grid with the lowest dynamic loss on ``ids`` (a held-out training-side
    text, from text_ids; never the text to be scored), ``stats`` measured with ``segment``.

    Returns:
        (settings, results): results a list of (lr, decay, nats per token), in grid order.
    """
    lrs = tuple(LR_GRID if lrs is None else lrs)
    decays = tuple(DECAY_GRID if decays is None else decays)
    P = len(ids) - 1
    if P < 1:
        raise DynamicError("the tuning text has fewer than two tokens")
    check_memory(model, segment, P, max_memory)
    grid = [(lr, d) for lr in lrs for d in decays]
    results = []
    for n, (lr, d) in enumerate(grid):
        each = None if progress is None else (lambda done, total, n=n: progress(n * P + done, len(grid) * P))
        try:
            loss = float(_run(model, ids, DynamicSettings(lr, d, segment), stats, each).mean())
        except _NonFinite:
            loss = math.inf  # (diverged: never the best)
        results.append((lr, d, loss))
    best = min(results, key=lambda r: (r[2] if math.isfinite(r[2]) else math.inf))
    return DynamicSettings(best[0], best[1], segment), results


def dynamic_evaluation(model: LanguageModel, vocab, text: str, stats_text: str, lr: float | None = None,
                       decay: float | None = None, segment: int | None = None, tune_text: str | None = None,
                       stats_tokens: int = STATS_TOKENS) -> tuple[Scored, DynamicSettings]:
    """Dynamic evaluation in one call, for Python users and benchmarks: MS_g on ``stats_text``
    (training-side text), η and λ given, tuned on ``tune_text`` (those not given), or the
    level's DEFAULTS; then ``text`` scored. Returns (score, the settings used)."""
    base = DEFAULTS[vocab.level]
    segment = base.segment if segment is None else segment
    DynamicSettings(base.lr if lr is None else lr, base.decay if decay is None else decay, segment)  # validate
    if tune_text is not None and tune_text == text:
        raise DynamicError("the tuning text is the text to be scored; tune on held-out training-side text")
    stats = gradient_stats(model, text_ids(vocab, stats_text), segment, stats_tokens)
    if tune_text is not None and (lr is None or decay is None):
        settings, _ = tune(model, text_ids(vocab, tune_text), stats, segment,
                           lrs=None if lr is None else (lr,), decays=None if decay is None else (decay,))
    else:
        settings = DynamicSettings(base.lr if lr is None else lr, base.decay if decay is None else decay, segment)
    return score_dynamic(model, vocab, text, settings, stats), settings


def file_ids(path, vocab, encoding: str = "utf-8", errors: str = "strict", max_tokens: int = STATS_TOKENS):
    """text_ids(vocab, the text of ``path``)[-(max_tokens + 1):], read from the end of the file
    (io.corpus.tail_ids): a training-side text of any size costs about its last ``max_tokens``
    tokens.

    Raises:
        io.corpus.CorpusError: the file is missing, a folder, a FIFO, binary or not decodable.
    """
    from .io.corpus import tail_ids

    ids = tail_ids(path, vocab, max_tokens + 1, encoding, errors)
    return ids if len(ids) > max_tokens else _with_start(vocab, ids)


def training_corpus(meta: dict, model_path) -> tuple:
    """(path, train options) of the corpus a model file records it was trained on, when that
    file is present and unchanged (its SHA-256 equals the recorded one), else (None, why).
    The path is tried as recorded (relative to the working folder it was trained in) and then
    in the folder of the model file itself (a run folder, which keeps a corpus read from stdin
    as corpus-stdin.txt), whatever the working folder now; ``model_path`` may be a run folder."""
    from pathlib import Path

    from .io.checkpoint import CheckpointError, resolve
    from .io.fileio import file_kind, sha256_file

    train = meta.get("train") if isinstance(meta, dict) else None
    digest = meta.get("corpus_sha256") if isinstance(meta, dict) else None
    corpus = train.get("corpus") if isinstance(train, dict) else None
    if not isinstance(corpus, str) or not corpus or not isinstance(digest, str):
        return None, "the model file does not record its training corpus"
    recorded = Path(corpus)
    try:
        folder = resolve(model_path).resolve().parent
    except (CheckpointError, OSError):
        folder = Path(model_path).resolve().parent
    candidates = [recorded]
    if folder / recorded.name != recorded:
        candidates.append(folder / recorded.name)
    changed = False
    for path in candidates:
        if path.is_file() and not file_kind(path):
            try:
                if sha256_file(path) == digest:
                    return path, train
            except OSError:
                continue
            changed = True
    if changed:
        return None, f"its training corpus {corpus} has changed since training"
    return None, f"its training corpus {corpus} is not found"


def training_side_ids(meta: dict, vocab, model_path, max_tokens: int = STATS_TOKENS):
    """(ids, description): the last ``max_tokens`` + 1 tokens of the training part of the
    model's recorded corpus (the part before its validation tail, as training split it), or a
    DynamicError saying why there are none. Streamed: a count of the corpus's tokens, then only
    those tokens kept (without a validation tail, read from the end of the file)."""
    from .io.corpus import CorpusError, count_tokens, tail_ids, window_ids

    path, train = training_corpus(meta, model_path)
    if path is None:
        raise DynamicError(f"dynamic evaluation measures gradient statistics on training-side text and {train}; "
                           f"give it with --dynamic-stats FILE")
    encoding, errors = train.get("encoding", "utf-8"), train.get("errors", "strict")
    fraction = train.get("val_fraction", 0.1)
    want = max_tokens + 1
    try:
        if not train.get("val") and isinstance(fraction, (int, float)) and 0 < fraction < 1:
            n = count_tokens(path, vocab, encoding, errors)
            n_val = int(round(n * fraction))  # as data.split_tail cuts it (too short a tail: none)
            end = n - n_val if n_val >= 2 else n
            ids = window_ids(path, vocab, max(0, end - want), end, encoding, errors)
        else:
            ids = tail_ids(path, vocab, want, encoding, errors, strict=True)
    except (CorpusError, LookupError, ValueError) as e:
        raise DynamicError(f"{path}: {e}" if not str(e).startswith(str(path)) else str(e)) from None
    ids = numpy.asarray(ids, dtype=numpy.int64)
    return ids, f"the last {len(ids) - 1:,} training tokens of {path}"

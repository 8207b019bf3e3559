"""Dynamic evaluation as ``charnn score --dynamic`` runs it, for the command line and the Python
API alike: the training-side texts a model file names, the settings chosen (given, tuned or
the level's defaults), the gradient statistics, then the scoring. The method itself (the
update rule, the statistics, the grid search) is charnn.dynamic.

The texts, never the scored one:

- the gradient statistics (MS_g): ``settings.stats`` (a file), else the last STATS_TOKENS
  tokens of the training part of the corpus the model file records, when that file is present
  and its SHA-256 unchanged;
- η and λ not given: tuned (dynamic.tune, its grid extended past an edge where the best sits)
  on ``settings.tune`` (a file), else on the first TUNE_TOKENS tokens of the validation text
  the model file names (the validation tail of its recorded corpus, or the validation file it
  was trained with, its SHA-256 unchanged), or its last where the first overlap the scored
  text; with none (or both overlapping), the level's DEFAULTS, and the plan says why.

A ``stats`` or ``tune`` file that is the scored text is refused (DynamicError).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy

from .dynamic import (DEFAULTS, STATS_TOKENS, DynamicError, DynamicSettings, check_memory, gradient_stats,
                      score_dynamic, text_ids, tune)
from .nn.model import LanguageModel
from .score import Scored

# The most validation tokens η and λ are tuned on (the first ones): each grid point is a
# dynamic pass over them (12 to about 16 in all), so this bounds the tuning's cost. 10,000 chose
# what 20,000 chose on the two models measured, in half the time (25 s against 51 s for the
# bundled model; benchmarks/README.md, "Dynamic evaluation that tunes itself").
TUNE_TOKENS = 10_000
# The scored text overlaps the validation text when they share a run of this many tokens
# (found for sure from twice as many): a long passage, not a common phrase.
OVERLAP = {"char": 64, "word": 16}

# (done, total, stage): stage "gradient statistics", "tuning" or "scoring".
StagedProgress = Optional[Callable[[int, int, str], None]]


def file_ids(path, vocab, encoding: str = "utf-8", errors: str = "strict", max_tokens: int = STATS_TOKENS):
    """text_ids(vocab, the text of ``path``)[-(max_tokens + 1):], read from the end of the file
    (io.corpus.tail_ids): a training-side text of any size costs about its last ``max_tokens``
    tokens.

    Raises:
        io.corpus.CorpusError: the file is missing, a folder, a FIFO, binary or not decodable.
    """
    from .io.corpus import tail_ids

    ids = tail_ids(path, vocab, max_tokens + 1, encoding, errors)
    return ids if len(ids) > max_tokens else numpy.concatenate([[vocab.start_id], ids]).astype(numpy.int64)


def training_corpus(meta: dict, model_path) -> tuple:
    """(path, train options) of the corpus a model file records it was trained on, when that
    file is present and unchanged (its SHA-256 equals the recorded one), else (None, why).
    The path is tried as recorded (relative to the working folder it was trained in) and then
    in the folder of the model file itself (a run folder, which keeps a corpus read from stdin
    as corpus-stdin.txt), whatever the working folder now; ``model_path`` may be a run folder."""
    train = meta.get("train") if isinstance(meta, dict) else None
    digest = meta.get("corpus_sha256") if isinstance(meta, dict) else None
    corpus = train.get("corpus") if isinstance(train, dict) else None
    if not isinstance(corpus, str) or not corpus or not isinstance(digest, str):
        return None, "the model file does not record its training corpus"
    path, why = find_unchanged(corpus, digest, model_path, "its training corpus")
    return (path, train) if path is not None else (None, why)


def find_unchanged(recorded: str, digest: str, model_path, what: str) -> tuple:
    """(path, None) of the file a model file names as ``recorded`` with SHA-256 ``digest``, tried
    as recorded and then by its name in the model file's folder; else (None, why), ``what``
    naming the file in the reason ("its training corpus")."""
    from pathlib import Path

    from .io.checkpoint import CheckpointError, resolve
    from .io.fileio import file_kind, sha256_file

    recorded_path = Path(recorded)
    try:
        folder = resolve(model_path).resolve().parent
    except (CheckpointError, OSError):
        folder = Path(model_path).resolve().parent
    candidates = [recorded_path]
    if folder / recorded_path.name != recorded_path:
        candidates.append(folder / recorded_path.name)
    changed = False
    for path in candidates:
        if path.is_file() and not file_kind(path):
            try:
                if sha256_file(path) == digest:
                    return path, None
            except OSError:
                continue
            changed = True
    if changed:
        return None, f"{what} {recorded} has changed since training"
    return None, f"{what} {recorded} is not found"


@dataclass(frozen=True)
class RecordedCorpus:
    """The training corpus a model file records, present and unchanged, and how training read
    and split it: tokens [0, ``end``) are its training part, [``end``, ``tokens``) its
    validation tail (``end`` None: no tail, the whole file trained on, and ``tokens`` not
    counted)."""

    path: object
    encoding: str
    errors: str
    tokens: int | None
    end: int | None
    train: dict

    def ids(self, vocab, start: int, stop: int) -> numpy.ndarray:
        """Its tokens ``start`` to ``stop`` - 1 (int64), streamed (DynamicError if unreadable)."""
        from .io.corpus import CorpusError, window_ids

        try:
            return numpy.asarray(window_ids(self.path, vocab, start, stop, self.encoding, self.errors), dtype=numpy.int64)
        except (CorpusError, LookupError, ValueError) as e:
            raise DynamicError(f"{self.path}: {e}" if not str(e).startswith(str(self.path)) else str(e)) from None


def recorded_corpus(meta: dict, vocab, model_path) -> tuple:
    """(RecordedCorpus, None) for the model's recorded training corpus (training_corpus), counted
    where training split off a validation tail (as data.split_tail cuts it: too short a tail,
    none); or (None, why) when it is not recorded, not found or changed. DynamicError when it
    cannot be read as training read it."""
    from .io.corpus import CorpusError, count_tokens

    path, train = training_corpus(meta, model_path)
    if path is None:
        return None, train
    encoding, errors = train.get("encoding", "utf-8"), train.get("errors", "strict")
    fraction = train.get("val_fraction", 0.1)
    tokens = end = None
    if not train.get("val") and isinstance(fraction, (int, float)) and 0 < fraction < 1:
        try:
            tokens = count_tokens(path, vocab, encoding, errors)
        except (CorpusError, LookupError, ValueError) as e:
            raise DynamicError(f"{path}: {e}" if not str(e).startswith(str(path)) else str(e)) from None
        n_val = int(round(tokens * fraction))
        end = tokens - n_val if n_val >= 2 else tokens
    return RecordedCorpus(path, encoding, errors, tokens, end, train), None


def training_side_ids(meta: dict, vocab, model_path, max_tokens: int = STATS_TOKENS, corpus: RecordedCorpus = None):
    """(ids, description): the last ``max_tokens`` + 1 tokens of the training part of the
    model's recorded corpus (the part before its validation tail, as training split it), or a
    DynamicError saying why there are none. Streamed: a count of the corpus's tokens, then only
    those tokens kept (without a validation tail, read from the end of the file). ``corpus``:
    the model's recorded_corpus, when already found."""
    from .io.corpus import CorpusError, tail_ids

    if corpus is None:
        corpus, why = recorded_corpus(meta, vocab, model_path)
        if corpus is None:
            raise DynamicError(f"dynamic evaluation measures gradient statistics on training-side text and {why}; "
                               f"give it with --dynamic-stats FILE")
    want = max_tokens + 1
    if corpus.end is not None:
        ids = corpus.ids(vocab, max(0, corpus.end - want), corpus.end)
    else:
        try:
            ids = tail_ids(corpus.path, vocab, want, corpus.encoding, corpus.errors, strict=True)
        except (CorpusError, LookupError, ValueError) as e:
            path = corpus.path
            raise DynamicError(f"{path}: {e}" if not str(e).startswith(str(path)) else str(e)) from None
    ids = numpy.asarray(ids, dtype=numpy.int64)
    return ids, f"the last {len(ids) - 1:,} training tokens of {corpus.path}"


def heldout_ids(meta: dict, vocab, model_path, corpus: RecordedCorpus | None = None,
                max_tokens: int = TUNE_TOKENS, end: str = "first") -> tuple:
    """(ids, description) of the first (``end`` "first") or last ("last") ``max_tokens`` + 1
    tokens of the validation text the model file names: the validation file it was trained
    with (present, its SHA-256 the recorded one), else the validation tail of its recorded
    corpus (``corpus``, when already found); or (None, why) when there is none. A validation
    text of no more than ``max_tokens`` + 1 tokens is all of it at either end."""
    from .io.corpus import CorpusError, tail_ids, window_ids

    train = meta.get("train") if isinstance(meta, dict) else None
    if not isinstance(train, dict):
        return None, "the model file does not record its training corpus"
    want = max_tokens + 1
    if train.get("val"):
        digest = meta.get("val_sha256")
        if not isinstance(digest, str):
            return None, f"the model file does not record the digest of its validation file {train['val']}"
        path, why = find_unchanged(train["val"], digest, model_path, "its validation file")
        if path is None:
            return None, why
        encoding, errors = train.get("encoding", "utf-8"), train.get("errors", "strict")
        try:
            ids = (window_ids(path, vocab, 0, want, encoding, errors, strict=False) if end == "first"
                   else tail_ids(path, vocab, want, encoding, errors))
        except (CorpusError, LookupError, ValueError) as e:
            return None, f"{path}: {e}" if not str(e).startswith(str(path)) else str(e)
        if len(ids) < 2:
            return None, f"its validation file {path} holds fewer than two tokens"
        if len(ids) < want:  # all of it, read from its start as training did
            ids = numpy.concatenate([[vocab.start_id], ids])
        return numpy.asarray(ids, dtype=numpy.int64), f"the {end} {len(ids) - 1:,} tokens of its validation file {path}"
    if corpus is None:
        try:
            corpus, why = recorded_corpus(meta, vocab, model_path)
        except DynamicError as e:
            return None, str(e)
        if corpus is None:
            return None, why
    if corpus.end is None or corpus.tokens - corpus.end < 2:
        return None, f"the model was trained on all of {corpus.path}, with no validation split"
    start = corpus.end if end == "first" else max(corpus.end, corpus.tokens - want)
    try:
        ids = corpus.ids(vocab, start, min(corpus.tokens, start + want))
    except DynamicError as e:
        return None, str(e)
    return ids, f"the {end} {len(ids) - 1:,} tokens of the validation split of {corpus.path}"


def overlaps(ids, other, width: int) -> bool:
    """Whether the token sequences ``ids`` and ``other`` share a passage: every ``width``-th window
    of ``width`` tokens of ``ids`` is looked up among all of ``other``'s, so a shared run of
    2 ``width`` - 1 tokens or more is always found (from ``width`` tokens it may be); ``ids``
    shorter than ``width``: whether ``other`` holds all of it."""
    a = numpy.ascontiguousarray(ids, dtype=numpy.int32)
    b = numpy.ascontiguousarray(other, dtype=numpy.int32)
    w = min(width, len(a))
    if w < 1 or len(b) < w:
        return False
    windows = {b[i:i + w].tobytes() for i in range(len(b) - w + 1)}
    return any(a[i:i + w].tobytes() in windows for i in range(0, len(a) - w + 1, w))


def not_scored(path, option: str, scored: str, encoding: str = "utf-8", errors: str = "strict"):
    """Refuse (DynamicError) a training-side text ``path`` that is the scored text itself
    (compared as it is read, up to the first difference); ``option`` names it in the message.
    CorpusError when it cannot be read."""
    from .io.corpus import same_text

    if same_text(path, scored, encoding, errors):
        raise DynamicError(f"{path}: is the text being scored; {option} must be held-out training-side text, "
                           f"never the scored text")


def _stage(progress: StagedProgress, name: str):
    return None if progress is None else (lambda done, total: progress(done, total, name))


@dataclass
class DynamicPlan:
    """What dynamic evaluation will use, chosen before the scoring.

    Attributes:
        settings: η, λ and the segment (all chosen).
        source: "lr", "decay", "segment" -> "given", "default" or "tuned on <where>".
        stats: MS_g per parameter (arrays on the model's device).
        stats_from: where MS_g was measured, in words; stats_tokens: on how many tokens.
        tuned_on: where η and λ were tuned, in words (None: not tuned).
        tuning: (lr, decay, nats per token) of each tuning pass in order, or None.
        untuned: why η and λ not given were not tuned (the level's defaults used instead), or None.
    """

    settings: DynamicSettings
    source: dict
    stats: dict
    stats_from: str
    stats_tokens: int
    tuned_on: str | None = None
    tuning: list | None = None
    untuned: str | None = None

    def describe(self) -> str:
        """One line: the values, where each came from, and the texts read."""
        label = {k: "tuned" if v.startswith("tuned on ") and self.tuned_on else v for k, v in self.source.items()}
        s = self.settings
        line = (f"dynamic evaluation with lr {s.lr:g} ({label['lr']}), decay {s.decay:g} ({label['decay']}), "
                f"segment {s.segment} ({label['segment']})")
        if self.tuning is not None:
            line += f"; tuned on {self.tuned_on} ({len(self.tuning)} passes)"
        if self.untuned:
            line += f"; the defaults, not tuned: {self.untuned}"
        return line + f"; gradient statistics from {self.stats_from}"

    def to_json(self) -> dict:
        """The settings and where they came from, for score's JSON summary."""
        out = {**self.settings.to_json(), "source": self.source, "stats": self.stats_from,
               "stats_tokens": self.stats_tokens}
        if self.tuning is not None:
            out["tuning"] = [{"lr": lr, "decay": d, "nats_per_token": n} for lr, d, n in self.tuning]
        if self.untuned:
            out["untuned"] = self.untuned
        return out

    def score(self, model: LanguageModel, vocab, text: str, strict: bool = False, with_tokens: bool = False,
              progress: StagedProgress = None, max_memory: int | None = None) -> Scored:
        """``text`` scored dynamically with these settings (dynamic.score_dynamic)."""
        return score_dynamic(model, vocab, text, self.settings, self.stats, strict=strict, with_tokens=with_tokens,
                             progress=_stage(progress, "scoring"), max_memory=max_memory)


def plan(model: LanguageModel, vocab, settings: DynamicSettings, stats_ids, stats_from: str, tune_ids=None,
         tuned_on: str | None = None, untuned: str | None = None, progress: StagedProgress = None,
         max_memory: int | None = None) -> DynamicPlan:
    """MS_g on ``stats_ids`` (all of them), then η and λ: as given, tuned on ``tune_ids`` (held-out
    training-side tokens, ``tuned_on`` saying where) for those not given, or the level's
    DEFAULTS (``untuned`` saying why they were not tuned, where that is worth saying)."""
    base = DEFAULTS[vocab.level]
    segment = settings.segment or base.segment
    stats = gradient_stats(model, stats_ids, segment, max_tokens=max(len(stats_ids) - 1, 1),
                           progress=_stage(progress, "gradient statistics"), max_memory=max_memory)
    results = None
    if tune_ids is not None and (settings.lr is None or settings.decay is None):
        chosen, results = tune(model, tune_ids, stats, segment, lrs=None if settings.lr is None else (settings.lr,),
                               decays=None if settings.decay is None else (settings.decay,),
                               progress=_stage(progress, "tuning"), max_memory=max_memory)
    else:
        chosen = DynamicSettings(base.lr if settings.lr is None else settings.lr,
                                 base.decay if settings.decay is None else settings.decay, segment)
        tuned_on = None
    tuned = f"tuned on {tuned_on}"
    source = {"lr": "given" if settings.lr is not None else tuned if results is not None else "default",
              "decay": "given" if settings.decay is not None else tuned if results is not None else "default",
              "segment": "given" if settings.segment is not None else "default"}
    return DynamicPlan(chosen, source, stats, stats_from, len(stats_ids) - 1, tuned_on, results,
                       untuned if results is None and "default" in (source["lr"], source["decay"]) else None)


def _heldout_apart(model_path, meta: dict, vocab, corpus: RecordedCorpus | None, text: str, tokens: int) -> tuple:
    """(ids, where, None): the first ``tokens`` tokens of the model's validation text, or its
    last where the first overlap the scored ``text``; (None, None, why) when it has none, or
    both overlap the scored text."""
    scored, seen = None, []
    for end in ("first", "last"):
        ids, where = heldout_ids(meta, vocab, model_path, corpus, tokens, end)
        if ids is None:
            return None, None, f"no held-out training-side text to tune on ({where})"
        if seen and len(ids) == len(seen[0][0]) and (ids == seen[0][0]).all():
            break  # (a validation text of at most TUNE_TOKENS tokens: the same at both ends)
        seen.append((ids, where))
        scored = text_ids(vocab, text)[1:] if scored is None else scored
        if not overlaps(scored, ids, OVERLAP[vocab.level]):
            return ids, where, None
    return None, None, (f"the scored text overlaps the held-out text it would tune on ({seen[0][1]}"
                        f"{', and its other end' if len(seen) > 1 else ''}), and dynamic evaluation never tunes "
                        f"on the scored text")


def prepare(model: LanguageModel, vocab, text: str, settings: DynamicSettings | None = None, meta: dict | None = None,
            model_path=None, encoding: str = "utf-8", errors: str = "strict", progress: StagedProgress = None,
            max_memory: int | None = None, tune_tokens: int = TUNE_TOKENS) -> DynamicPlan:
    """The plan for scoring ``text`` dynamically with ``model`` (its file's metadata ``meta``,
    found at ``model_path``): the texts of the module docstring read, MS_g measured, η and λ
    chosen (on ``tune_tokens`` of the validation text). ``progress(done, total, stage)``
    follows the statistics and the tuning.

    Raises:
        DynamicError: no training-side text for the statistics, a file that is the scored text
            or holds no token, a tuning pass that fails.
        io.corpus.CorpusError: a ``stats`` or ``tune`` file that cannot be read.
        memory.MemoryLimitError: the work would pass the memory available or ``max_memory``.
    """
    from .io.data import read_text

    settings = settings or DynamicSettings()
    segment = settings.segment or DEFAULTS[vocab.level].segment
    check_memory(model, segment, len(text), max_memory)  # (the text's characters bound its tokens)
    corpus = None
    if settings.stats is not None:
        not_scored(settings.stats, "--dynamic-stats", text, encoding, errors)
        stats_ids = file_ids(settings.stats, vocab, encoding, errors)
        stats_from = f"the last {len(stats_ids) - 1:,} tokens of {settings.stats}"
        if len(stats_ids) < 2:
            raise DynamicError(f"{settings.stats}: holds no token to measure gradient statistics on")
    else:
        corpus, why = recorded_corpus(meta, vocab, model_path)
        if corpus is None:
            raise DynamicError(f"dynamic evaluation measures gradient statistics on training-side text and {why}; "
                               f"give it with --dynamic-stats FILE")
        stats_ids, stats_from = training_side_ids(meta, vocab, model_path, corpus=corpus)
    tune_ids = tuned_on = untuned = None
    if settings.tune is not None:
        not_scored(settings.tune, "--dynamic-tune", text, encoding, errors)
        tune_ids, tuned_on = text_ids(vocab, read_text(settings.tune, encoding, errors)), settings.tune
        if len(tune_ids) < 2:
            raise DynamicError(f"{settings.tune}: holds no token to tune on")
    elif (settings.lr is None or settings.decay is None) and settings.lr != 0:  # (η = 0: nothing to tune)
        tune_ids, tuned_on, untuned = _heldout_apart(model_path, meta, vocab, corpus, text, tune_tokens)
    return plan(model, vocab, settings, stats_ids, stats_from, tune_ids, tuned_on, untuned, progress, max_memory)


def evaluate(model: LanguageModel, vocab, text: str, settings: DynamicSettings | None = None, meta: dict | None = None,
             model_path=None, strict: bool = False, with_tokens: bool = False, encoding: str = "utf-8",
             errors: str = "strict", progress: StagedProgress = None,
             max_memory: int | None = None) -> tuple[Scored, DynamicPlan]:
    """``score --document --dynamic`` in one call: prepare, then the plan's score. Returns
    (the score, the plan: what was used and where it came from, ``plan.describe()`` in words)."""
    p = prepare(model, vocab, text, settings, meta, model_path, encoding, errors, progress, max_memory)
    return p.score(model, vocab, text, strict, with_tokens, progress, max_memory), p


def dynamic_evaluation(model: LanguageModel, vocab, text: str, stats_text: str, lr: float | None = None,
                       decay: float | None = None, segment: int | None = None, tune_text: str | None = None,
                       stats_tokens: int = STATS_TOKENS) -> tuple[Scored, DynamicSettings]:
    """Dynamic evaluation from texts in memory, for benchmarks: MS_g on ``stats_text``
    (training-side text), η and λ given, tuned on ``tune_text`` (those not given), or the
    level's DEFAULTS; then ``text`` scored. Returns (score, the settings used)."""
    settings = DynamicSettings(lr, decay, segment)
    if tune_text is not None and tune_text == text:
        raise DynamicError("the tuning text is the text to be scored; tune on held-out training-side text")
    stats_ids = text_ids(vocab, stats_text)[-(stats_tokens + 1):]
    tune_ids = None if tune_text is None else text_ids(vocab, tune_text)
    p = plan(model, vocab, settings, stats_ids, "the statistics text", tune_ids, "the tuning text")
    return p.score(model, vocab, text), p.settings

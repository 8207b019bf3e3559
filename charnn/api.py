"""charnn from Python in a few lines: load a model, generate text, score sentences, train.

    from charnn import api

    m = api.load()                                   # the bundled Shakespeare model
    print(api.generate(m, 100, prime="ROMEO:", temperature=0.8, seed=1))
    for s in api.score(m, ["To be, or not to be, that is the question."]):
        print(s.tokens, s.logprob, s.bits_per_token, s.perplexity)
    s, used = api.score_dynamic(m, open("heldout.txt").read())   # score --document --dynamic
    print(s.nats_per_token, used.describe())
    result = api.train("corpora/shakespeare.txt", "runs/try", hidden=128, time_limit=60)
    m = api.load(result["model"])

Thin wrappers over the library, which stays the interface for anything finer:
charnn.io.checkpoint.load_model, charnn.sample.generate and beam_search, charnn.score.score_lines
and score_document, charnn.dynamic_run.evaluate (score --dynamic), charnn.train.TrainConfig
and Trainer. Errors are the library's exceptions
(CheckpointError, SampleError, ScoreError, TrainError, CorpusError, MemoryLimitError, ...), each
with a one-line message; nothing here prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy

from .backend import get_backend
from .dynamic import DynamicSettings
from .dynamic_run import DynamicPlan, evaluate
from .io.checkpoint import load_model, resolve
from .io.vocab import Vocab, iter_lines
from .nn.model import LanguageModel
from .sample import generate as _generate
from .score import Scored, score_document, score_lines
from .train import TrainConfig, Trainer


@dataclass(frozen=True)
class Model:
    """A loaded model: the network, its vocabulary and the file it came from."""

    network: LanguageModel
    vocab: Vocab
    path: Path
    meta: dict = field(default_factory=dict, repr=False, compare=False)  # the file's metadata (its training run)


def load(path=None, device: str = "auto") -> Model:
    """Load a model file or run folder (default: the bundled Shakespeare model) in float32 on
    ``device`` ("auto", "cpu" or "gpu"); ``Model.path`` is the model file. Raises
    CheckpointError for anything but a model file (a FIFO included, which is never opened)."""
    path = resolve(path)
    network, vocab, ckpt = load_model(path, get_backend(device, "float32"))
    return Model(network, vocab, path, ckpt.meta)


def generate(model: Model, length: int = 200, prime: str = "", temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stop_at=None) -> str:
    """``length`` tokens (characters or words) continuing ``prime``, as text without the prime;
    the same seed gives the same text as ``charnn sample --seed``. Ends early, as ``--stop-at``
    does, once the text contains ``stop_at`` (a string or a list of them; see sample.StopRule)."""
    rng = numpy.random.default_rng(None if seed is None else [seed, 0])  # the command's first sample
    return "".join(_generate(model.network, model.vocab, length, temperature, top_k, top_p, prime, rng,
                             stop_at=stop_at))


def score(model: Model, lines, document: bool = False, strict: bool = False) -> list[Scored]:
    """Score each non-blank line of ``lines`` (a list of strings, or one string split at its
    line ends) as a sentence, its end included; or, with ``document``, the whole text as one
    stream (a list of one Scored). Each Scored has tokens, logprob (nats), nats_per_token,
    bits_per_token and perplexity. Characters the model never saw are left out and counted in
    ``excluded`` (an error with ``strict``)."""
    if document:
        text = lines if isinstance(lines, str) else "\n".join(lines) + "\n"
        return [score_document(model.network, model.vocab, text, strict=strict)]
    if isinstance(lines, str):
        lines = iter_lines(lines)
    return score_lines(model.network, model.vocab, list(lines), strict=strict)


def score_dynamic(model: Model, text: str, settings: DynamicSettings | None = None, strict: bool = False,
                  encoding: str = "utf-8", errors: str = "strict") -> tuple[Scored, DynamicPlan]:
    """Score ``text`` as one stream with dynamic evaluation, as ``charnn score --document
    --dynamic`` does: a copy of the weights adapts to the text as it is read (the model is not
    changed). ``settings`` (charnn.dynamic.DynamicSettings) as the command's --dynamic-*
    options, each None chosen as there: η and λ tuned on the validation text the model file
    names (never on ``text``), else the defaults; gradient statistics on the training part of
    its recorded corpus, which must be present and unchanged, or on ``settings.stats``.
    ``encoding``/``errors``: how the files in ``settings`` are read. Returns (the score, the
    plan: the settings used and where each came from; ``plan.describe()`` says it in words).
    Raises DynamicError, CorpusError or MemoryLimitError with a one-line message."""
    return evaluate(model.network, model.vocab, text, settings, model.meta, model.path, strict=strict,
                    encoding=encoding, errors=errors)


def train(corpus, out, max_memory: int | None = None, **options) -> dict:
    """Train on the text file ``corpus`` into the run folder ``out`` with the options of
    ``charnn train`` as keyword arguments (``hidden=128``, ``time_limit=60``, ``max_steps=500``,
    ``level="word"``, ...: the fields of charnn.train.TrainConfig). Without max_epochs, max_steps
    or time_limit it trains 10 epochs, as the command does. Silent; returns the command's --json
    summary (``model``: the best model's file, ``val_loss``, ``steps``, ...). A run whose memory
    estimate passes the memory available, or ``max_memory`` bytes, is refused before it
    allocates (charnn.memory.MemoryLimitError), as the command refuses it."""
    if not {"max_epochs", "max_steps", "time_limit"} & {k for k, v in options.items() if v is not None}:
        options["max_epochs"] = 10
    cfg = TrainConfig(corpus=str(corpus), out=str(out), **options)
    return Trainer(cfg, Path(out), announce=False, max_memory=max_memory).run()

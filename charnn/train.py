"""Training: truncated BPTT over contiguous streams, evaluation, checkpoints and exact resume.

A run lives in one folder:

    model.npz       the best model so far by validation loss (the last one without validation)
    last.npz        the latest checkpoint: model, optimizer state, carried hidden state, data
                    position, RNG state and schedule, everything a resume needs
    metrics.jsonl   one JSON object per log interval ("type": "train") and per evaluation
                    ("type": "eval"), each with the step, the epoch as a fraction, the tokens
                    seen and the elapsed seconds, counted across resumes (charnn plot reads it)
    tokens-*.uintN  the corpus encoded once (see corpus.py), memory-mapped while training
    .lock           held while a trainer runs, so two trainers cannot share the folder

Resuming loads last.npz and continues from the same step with the same data chunk, hidden
state, optimizer state and dropout RNG, so the losses equal those of a run never interrupted.
What it cannot restore exactly (a missing or malformed option, progress field, optimizer slot,
carried state, RNG state or corpus digest) it refuses (resume_config, check_resume_state).

Learning-rate schedule: the rate of each step is the base rate times a warm-up factor (linear
from 1/``warmup`` to 1 over the first ``warmup`` steps) times, with ``lr_schedule`` "cosine", a
half cosine from 1 down to ``lr_floor`` over the run's horizon, after holding 1 for the first
``lr_hold`` of it (warm-up, stable, decay): its progress is the largest of
step / max_steps, epochs / max_epochs and elapsed seconds / the time horizon (the first
--time-limit, counted across resumes; once passed, a resumed run starts a new cycle over its own
--time-limit). A run limited by steps or epochs alone follows the same rates on every machine;
one limited by time follows the clock. Without any limit the rate stays constant. The base rate
starts at --lr; after each evaluation whose validation loss is not lower than the best
so far, it is multiplied by ``lr_decay`` (1 = constant); after ``patience`` such
evaluations in a row, training stops early (0 = never). Only the scheduled evaluations (every
``eval_every`` steps) count: the extra one at the end of a run that stops between them (at
--max-steps or --time-limit) is reported and may save model.npz, but leaves the schedule alone,
so a run stopped there and resumed takes exactly the steps of a run never stopped.

Divergence: nothing non-finite or exploding is ever written. Before every save the model is
checked: its loss (the validation loss, or without validation data its loss on the first chunk
of the training text) must be finite and at most twice a uniform guess, 2 ln V nats per token
(a fresh model scores about ln V, a learning one below it), and its parameters, optimizer state
and carried hidden state must be finite. Training losses are held to the same limit at every
log interval. A model that fails stops the run with :class:`Diverged`, and the files of the
last save that passed are left as they were; before any save has passed there are none, and
the folder starts a fresh run.

Folder states: saves write last.npz before model.npz until last.npz exists, and model.npz
before last.npz after that, so whatever step a save fails or is killed at, the folder holds
either no model.npz and no last.npz (a fresh run starts) or a last.npz (--resume continues
exactly); a run resumed without model.npz writes it at its next evaluation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy

from . import memory
from .io import checkpoint as ckpt_mod
from .backend import DEVICES, DTYPES, array_module, get_backend, to_device, to_float, to_host
from .dist import StepSync, World
from .io.data import Batches, CorpusError, EvalStreams, read_text, split_tail
from .io.fileio import file_kind, sha256_file
from .io.metrics import MetricsError, read_lines
from .nn.functional import class_bounds, dropout_mask
from .nn.model import FORGET_BIAS, INPUT_SCALE, LanguageModel, ModelConfig
from .nn.optim import OPTIMIZERS, clip_scale, global_norm, make_optimizer
from .io.vocab import Vocab, VocabError
from .wording import plural

# Options that may change when resuming; every other one must match the checkpoint. The corpus
# may be named by another path (run from another folder): its content is checked by digest.
RESUMABLE = {"max_steps", "max_epochs", "time_limit", "eval_every", "log_every", "patience",
             "device", "sample_length", "out", "corpus"}


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says why."""


class Diverged(TrainError):
    """The loss became NaN, infinite or exploded."""


class Finished(Exception):
    """A resumed run has already reached its limits: nothing to do, nothing changed (not an
    error: the command says so and exits 0)."""


def loss_limit(vocab_size: int) -> float:
    """The loss (nats per token) above which a model counts as exploding: twice a uniform
    guess's ln V. A model there predicts worse than guessing blindly by a factor of V."""
    return 2.0 * math.log(vocab_size)


@dataclass
class TrainConfig:
    corpus: str
    level: str = "char"
    cell: str = "lstm"
    layers: int = 2
    hidden: int = 256
    embed: int = 0
    dropout: float = 0.0
    state_reset: float = 0.01  # chance per stream and chunk that its carried state restarts from zero
    forget_bias: float = FORGET_BIAS  # LSTM: the forget gate's initial bias
    input_scale: float = INPUT_SCALE  # one-hot input: layer 0's input weights start U(-this, this); 0 = 1/sqrt(H)
    activation: str = "tanh"
    tie: bool = False
    classes: int = -1  # class-factored softmax classes; 0 = full softmax; -1 = auto (see auto_classes)
    tokenizer: str = "regex"
    vocab_size: int | None = None
    min_count: int = 1
    seq_len: int = 50
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float | None = None
    lr_decay: float = 1.0
    lr_schedule: str = "cosine"  # or "constant" (measured: README, the quick start with each schedule)
    lr_floor: float = 0.05  # cosine: the last step's rate, as a fraction of the base rate
    warmup: int = 0  # steps of linear warm-up
    lr_hold: float = 0.6  # cosine: the fraction of the horizon at the full rate before the decay starts
    weight_decay: float = 0.0  # Adam only: decoupled weight decay of the weight matrices (AdamW)
    weight_drop: float = 0.0  # DropConnect on the recurrent weights Wh, one mask per layer and step
    clip: float = 5.0
    max_epochs: int | None = None
    max_steps: int | None = None
    time_limit: float | None = None
    val_fraction: float = 0.1
    val: str | None = None
    eval_every: int = 500
    log_every: int = 20
    patience: int = 0
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    encoding: str = "utf-8"
    errors: str = "strict"
    sample_length: int = 200
    out: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    # Fields added after runs were saved without them, with the value those runs used (not
    # today's default), so an old run resumes exactly as it would have.
    LEGACY = {"forget_bias": 1.0, "state_reset": 0.0, "lr_schedule": "constant", "lr_floor": 0.1, "warmup": 0, "lr_hold": 0.0,
              "weight_decay": 0.0, "input_scale": 0.0, "weight_drop": 0.0}

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{**cls.LEGACY, **{k: v for k, v in d.items() if k in known}})

    def model_config(self, vocab_size: int, class_bounds=()) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, cell=self.cell, layers=self.layers, hidden=self.hidden,
                           embed=self.embed, dropout=self.dropout, activation=self.activation, tie=self.tie,
                           class_bounds=tuple(class_bounds))

    def auto_classes(self, vocab_size: int) -> int:
        """-1 (auto): about sqrt(V) classes for word vocabularies over 1,000 words, else a full
        softmax (small vocabularies gain nothing from classes)."""
        if self.classes >= 0:
            return self.classes
        return round(math.sqrt(vocab_size)) if self.level == "word" and vocab_size > 1000 else 0


class Reporter:
    """Receives progress; the CLI shows it, tests ignore it."""

    def start(self, info: dict): ...
    def log(self, m: dict): ...
    def evaluation(self, m: dict, sample: str | None): ...
    def message(self, text: str): ...
    def end(self): ...


def file_digest(path) -> str:
    """The SHA-256 of a regular file (a FIFO or device is refused: opening one may wait forever,
    and it could not be read again for training)."""
    kind = file_kind(path)
    if kind:
        raise CorpusError(f"{path}: is {kind}, not a regular file")
    return sha256_file(path)


class RunLock:
    """An exclusive lock on a run folder (fcntl), so a second trainer is refused, not mixed in.

    The lock file is removed on exit while the lock is still held, so a clean exit leaves no
    ``.lock`` behind. That opens one race, closed on the acquiring side: a trainer that opened
    the file just before the holder removed it can lock the removed file once the holder lets
    go, while a third trainer creates and locks a new one. So after locking, a trainer checks
    that the path still names the file it locked (same device and inode) and otherwise starts
    over with the file now there. Any file that the path names is then only ever locked by
    one trainer at a time, and a trainer only holds the lock on the file the path names."""

    NAME = ".lock"

    def __init__(self, folder: Path):
        self.path = folder / self.NAME
        self.fd = None

    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def __enter__(self):
        import fcntl

        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise TrainError(f"{self.path.parent}: another charnn train is using this folder") from None
            try:
                named = os.stat(self.path)
            except FileNotFoundError:
                named = None
            held = os.fstat(fd)
            if named is not None and (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino):
                self.fd = fd
                return self
            os.close(fd)  # the holder removed this file while we opened it: try the one there now

    def __exit__(self, *exc):
        import fcntl

        if self.fd is not None:
            try:
                self.path.unlink()  # still locked: no other trainer holds this file
            except OSError:
                pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def prepare_data(cfg: TrainConfig, vocab: Vocab | None = None, cache_dir=None, digest: str | None = None):
    """Build or reuse the vocabulary and encode the corpus (and validation file).

    The corpus is streamed (corpus.py): a vocabulary pass, then an encoding pass into a token
    cache in ``cache_dir`` (the run folder), memory-mapped, so a corpus of several GB never sits
    in memory as text. Without ``cache_dir`` the ids are encoded in memory.

    Returns (vocab, train_ids, val_ids) with ids as compact unsigned arrays.
    """
    from .io import corpus

    val_text = read_text(cfg.val, cfg.encoding, cfg.errors) if cfg.val else None
    if cfg.val and not val_text:
        raise CorpusError(f"{cfg.val}: the validation file is empty")
    if vocab is None:
        try:
            vocab = _build_vocab(cfg, val_text)
        except VocabError as e:
            raise CorpusError(f"{cfg.corpus}: {e}") from None
    if len(vocab) < 2:
        raise CorpusError(f"{cfg.corpus}: the corpus has a single distinct token; a language model needs at least two")
    try:
        if cache_dir is not None:
            ids = corpus.cached_ids(cfg.corpus, vocab, cache_dir, digest or file_digest(cfg.corpus), cfg.encoding, cfg.errors)
        else:
            ids = corpus.encode_ids(cfg.corpus, vocab, cfg.encoding, cfg.errors)
    except CorpusError as e:
        if "not in the vocabulary" in str(e):
            raise CorpusError(f"{cfg.corpus}: holds characters outside the model's vocabulary") from None
        raise
    if len(ids) == 0:
        raise CorpusError(f"{cfg.corpus}: the corpus is empty")
    dtype = vocab.dtype()
    if val_text is not None:
        val_ids = vocab.encode(val_text)
        if (val_ids < 0).any():
            raise CorpusError(f"{cfg.val}: holds characters outside the model's vocabulary")
        if len(val_ids) < 2:
            raise CorpusError(f"{cfg.val}: the validation text needs at least two tokens")
        return vocab, ids, val_ids.astype(dtype)
    if cfg.val_fraction > 0:
        try:
            train_ids, val_ids = split_tail(ids, cfg.val_fraction)
        except CorpusError as e:
            raise CorpusError(f"{cfg.corpus}: {e}") from None
        return vocab, train_ids, val_ids
    return vocab, ids, None


def _build_vocab(cfg: TrainConfig, val_text: str | None) -> Vocab:
    from .io import corpus

    if cfg.level == "char":
        chars = set(val_text or "")
        for piece in corpus.iter_text(cfg.corpus, cfg.encoding, cfg.errors):
            chars.update(piece)
        return Vocab.build_char(chars)
    limit = None
    if cfg.val is None and cfg.val_fraction > 0:
        # Count words of the training part only, so held-out words can be unknown.
        _, n = corpus.count_words(cfg.corpus, cfg.tokenizer, None, cfg.encoding, cfg.errors)
        limit = n - int(round(n * cfg.val_fraction))
    counts, _ = corpus.count_words(cfg.corpus, cfg.tokenizer, limit, cfg.encoding, cfg.errors)
    return Vocab.build_word(counts, cfg.tokenizer, cfg.vocab_size, cfg.min_count)


def evaluate(model: LanguageModel, ids, batch_size: int, seq_len: int, world: World | None = None) -> float:
    """Mean nats per token over ``ids`` (every token after the first predicted once), with the
    state carried across chunks and no dropout; see data.EvalStreams for the layout.

    ``world``: data-parallel ranks, each of which evaluates its share of the streams (a
    collective: every rank calls it); their sums are added, so the result is the same on every
    rank and equals one process's up to the order of summation."""
    streams = EvalStreams(ids, batch_size, seq_len)
    a, b = 0, streams.N
    if world is not None and world.size > 1:
        cuts = numpy.linspace(0, streams.N, world.size + 1).round().astype(int)
        a, b = int(cuts[world.rank]), int(cuts[world.rank + 1])
    state = None
    total = model.xp.zeros((), dtype=numpy.float64)
    for k in range(len(streams) if b > a else 0):
        x, y, w = streams.chunk(k)
        if (a, b) != (0, streams.N):
            x, y, w = x[:, a:b], y[:, a:b], w[:, a:b]
        nll, state = model.nll(x, y, state)
        total += (nll.astype(numpy.float64) * to_device(w, model.xp)).sum()
    total = to_float(total)
    if world is not None and world.size > 1:
        total = world.sum(total)
    return total / streams.predictions


# What a resume needs from last.npz's progress, and the type of each. A value that is missing,
# of another type or out of range would make the resumed run take other steps than the
# uninterrupted one (or fail in the middle of the maths), so resume refuses it.
_PROGRESS = {"step": "count", "epoch": "count", "chunk": "count", "tokens": "count", "opt_t": "count",
             "bad_evals": "count", "lr": "positive", "best_val": "loss"}
_PROGRESS_OPTIONAL = {"train_seconds": "seconds", "elapsed": "seconds", "horizon_seconds": "seconds", "best_saved": "loss", "last_train_loss": "loss", "last_val": "loss"}
# TrainConfig fields that must be at least 1 (the others that are numbers at least 0).
_AT_LEAST_ONE = {"layers", "hidden", "seq_len", "batch_size", "min_count", "log_every", "vocab_size", "max_steps",
                 "max_epochs", "eval_every"}
_BELOW_ONE = {"dropout", "val_fraction", "lr_hold", "weight_drop"}  # in [0, 1)
_CHOICES = {"level": ("char", "word"), "cell": ("rnn", "lstm", "gru"), "activation": ("tanh", "relu"),
            "tokenizer": ("regex", "whitespace"), "optimizer": OPTIMIZERS, "lr_schedule": ("constant", "cosine"), "device": DEVICES, "dtype": DTYPES,
            "errors": ("strict", "replace", "ignore")}


def _is_count(v) -> bool:
    return type(v) is int and v >= 0  # noqa: E721  (not bool)


def _is_number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _progress_problem(kind: str, v) -> bool:
    if kind == "count":
        return not _is_count(v)
    if kind == "positive":
        return not (_is_number(v) and v > 0)
    if kind == "seconds":
        return not (_is_number(v) and v >= 0)
    return v is not None and not _is_number(v)  # a loss: None before the first one


def _train_field_ok(name: str, annotation: str, v) -> bool:
    """A TrainConfig value of the annotated type (``int``, ``float | None``, ...) and range."""
    if v is None:
        return "None" in annotation
    if "bool" in annotation:
        return type(v) is bool
    if "int" in annotation:
        ok = type(v) is int and (v >= 1 if name in _AT_LEAST_ONE else v >= -1 if name == "classes" else v >= 0)  # noqa: E721
    elif "float" in annotation:
        ok = _is_number(v) and v >= 0 and (v < 1 if name in _BELOW_ONE else v <= 1 if name in ("state_reset", "lr_floor") else True)
        ok = ok and (v > 0 if name in ("lr", "lr_decay") else True)
    else:
        ok = isinstance(v, str) and v in _CHOICES.get(name, (v,))
    return ok


def resume_config(path: Path, saved) -> TrainConfig:
    """The training configuration of a last.npz, checked field by field.

    Raises:
        TrainError: the file holds no training state, or a field of it is missing, of the wrong
            type or out of range (one line naming the file and the field).
    """
    meta = saved.meta
    train_meta = meta.get("train")
    if not (isinstance(train_meta, dict) and "corpus" in train_meta
            and isinstance(meta.get("progress"), dict) and "rng" in meta):
        raise TrainError(f"{path}: holds a model but no training state (not a checkpoint of charnn train); cannot resume")
    for f in fields(TrainConfig):
        if f.name in train_meta and not _train_field_ok(f.name, str(f.type), train_meta[f.name]):
            raise TrainError(f"{path}: the saved training option {f.name} is {_shown(train_meta[f.name])}, "
                             f"not a valid value; cannot resume")
    progress = meta["progress"]
    for key, kind in (_PROGRESS | _PROGRESS_OPTIONAL).items():
        if key not in progress:
            if key in _PROGRESS:
                raise TrainError(f"{path}: the saved progress has no {key}; cannot resume exactly")
        elif _progress_problem(kind, progress[key]):
            raise TrainError(f"{path}: the saved progress field {key} is {_shown(progress[key])}, "
                             f"not a valid value; cannot resume")
    digest = meta.get("corpus_sha256")
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise TrainError(f"{path}: holds no valid corpus digest, so an unchanged corpus cannot be checked; cannot resume exactly")
    return TrainConfig.from_json(train_meta)


def check_resume_state(path: Path, saved, cfg: TrainConfig, chunks: int, opt) -> None:
    """What resume restores besides the weights: the data position, the optimizer state (every
    slot of every parameter once a step was taken), the carried hidden state and the RNG.

    Raises:
        TrainError: naming the file and what is missing or malformed.
    """
    progress = saved.meta["progress"]
    if progress["chunk"] > chunks:
        raise TrainError(f"{path}: the saved data position (chunk {progress['chunk']}) is past the "
                         f"{plural(chunks, 'chunk')} of an epoch; cannot resume exactly")
    want = {f"{name}.{slot}" for name in opt.params for slot in opt.slots} if progress["opt_t"] else set()
    if set(saved.optim) != want:
        missing = sorted(want - set(saved.optim))
        what = f"lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "") if missing else \
            f"has arrays a {cfg.optimizer} optimizer does not use ({sorted(set(saved.optim) - want)[0]})"
        raise TrainError(f"{path}: the saved optimizer state {what}; cannot resume exactly")
    H, N = cfg.hidden, cfg.batch_size
    if saved.state is None or len(saved.state) != cfg.layers or any(h.shape != (H, N) for h, _ in saved.state):
        raise TrainError(f"{path}: holds no carried hidden state of shape ({H}, {N}) for each of the {cfg.layers} "
                         f"layers; cannot resume exactly")
    rng = numpy.random.default_rng(0).bit_generator
    try:
        rng.state = saved.meta["rng"]
        same = rng.state == saved.meta["rng"]  # floats and out-of-range ints are taken, altered
    except (TypeError, ValueError, KeyError, OverflowError):
        same = False
    if not same:
        raise TrainError(f"{path}: the saved random generator state is malformed; cannot resume exactly")


def _shown(v) -> str:
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else str(v)
    return text if len(text) <= 40 else text[:37] + "..."


class Trainer:
    """One training run. Build it, then call :meth:`run`."""

    def __init__(self, cfg: TrainConfig, out: Path, resume: bool = False, reporter: Reporter | None = None,
                 overrides: dict | None = None, init=None, corpus_stream=None, announce: bool = True,
                 world: World | None = None, max_memory: int | None = None):
        """Args:
            init: a finetune.InitFrom: start from that model's weights and vocabulary.
            corpus_stream: a binary stream (stdin) whose bytes are the corpus: read once into
                ``cfg.corpus`` (a file in the run folder) after the folder is locked.
            announce: say on stderr which device ``--device auto`` chose.
            world: the data-parallel ranks (dist.py); default one process. Rank 0 locks the
                folder, builds the token cache, writes every file and reports; every rank
                trains its share of the streams.
            max_memory: the bytes this process may use (--max-memory); default: refuse a run
                whose estimate (memory.py) passes the memory available.
        """
        self.cfg, self.out, self.reporter = cfg, Path(out), reporter or Reporter()
        self.world = world or World()
        self.resume = resume
        self.overrides = overrides or {}
        self.stop_requested = False  # (data-parallel: once every rank has heard of the request)
        self.interrupted_here = False  # SIGINT seen by this process
        self.time_up = False  # data-parallel: some rank's --time-limit ran out
        self.shared = {}  # data-parallel: what rank 0 found, so the others need not read it again
        self.sync = None
        self.elapsed_before = 0.0  # seconds of the runs this one resumes
        self.started = time.perf_counter()
        self.init, self.corpus_stream, self.announce = init, corpus_stream, announce
        self.init_record = None
        self.max_memory = max_memory

    # ----- setup -----
    def _setup(self):
        cfg = self.cfg
        last_path = self.out / ckpt_mod.LAST_NAME
        saved = None
        if self.resume:
            if not last_path.exists():
                if (self.out / ckpt_mod.BEST_NAME).exists():
                    raise TrainError(f"{self.out}: holds {ckpt_mod.BEST_NAME} but no {ckpt_mod.LAST_NAME}, the full checkpoint a "
                                     f"resume needs, so it cannot continue exactly; train in another --out, or move "
                                     f"{ckpt_mod.BEST_NAME} away to start afresh here")
                raise TrainError(f"{self.out}: nothing to resume (no {ckpt_mod.LAST_NAME})")
            saved = ckpt_mod.load(last_path)
            saved_cfg = resume_config(last_path, saved)
            for key, value in self.overrides.items():
                if key in RESUMABLE:
                    setattr(saved_cfg, key, value)
                elif getattr(saved_cfg, key) != value:
                    raise TrainError(f"cannot resume with --{key.replace('_', '-')} {value}: the checkpoint was trained with {getattr(saved_cfg, key)}")
            cfg = self.cfg = saved_cfg
            self._check_unfinished(saved.meta["progress"])
            self.init_record = saved.meta.get("init_from")
            digest = saved.meta.get("corpus_sha256")
            checked = not self.world.root  # (rank 0 checked the digests before the others started)
            if not checked and digest and Path(cfg.corpus).exists() and file_digest(cfg.corpus) != digest:
                raise TrainError(f"{cfg.corpus}: the corpus changed since the checkpoint; cannot resume exactly")
            val_digest = saved.meta.get("val_sha256")  # absent in runs saved before it was kept
            if (not checked and cfg.val and isinstance(val_digest, str) and Path(cfg.val).is_file()
                    and file_digest(cfg.val) != val_digest):
                raise TrainError(f"{cfg.val}: the validation file changed since the checkpoint; cannot resume exactly")
        elif last_path.exists():
            raise TrainError(f"{self.out}: already holds a run; pass --resume to continue it, or choose another --out")
        elif (self.out / ckpt_mod.BEST_NAME).exists():
            raise TrainError(f"{self.out}: already holds a {ckpt_mod.BEST_NAME} (with no {ckpt_mod.LAST_NAME} to resume from); "
                             f"choose another --out, or move {ckpt_mod.BEST_NAME} away to start afresh here")

        if cfg.batch_size % self.world.size:
            raise TrainError(f"--batch-size {cfg.batch_size} cannot be shared by {self.world.size} processes "
                             f"(each trains an equal share of the streams); use a multiple of {self.world.size}")
        hint = self.shared
        digest = saved.meta.get("corpus_sha256") if saved else hint.get("digest")
        vocab, start_config, start_params = (saved.vocab if saved else hint.get("vocab")), None, None
        if saved:
            self._check_memory(saved.config, host_only=cfg.device != "cpu")
        elif self.init is None:
            # Before the corpus is read: with the smallest vocabulary there can be (the real
            # one is checked once known), and on "auto" only what stays on the host.
            self._check_memory(cfg.model_config(len(vocab) if vocab else 2), host_only=cfg.device != "cpu",
                               vocab_known=vocab is not None)
        if self.init is not None:
            vocab, start_config, start_params = self.init.prepare(cfg)
            self.init_record = self.init.record()
        vocab, train_ids, val_ids = prepare_data(cfg, vocab, self.out, digest)
        # Announced once the inputs are known to be good (a missing corpus is said first).
        self.backend = get_backend(cfg.device, cfg.dtype, announce=self.announce)
        self.vocab = vocab
        try:
            self.batches = Batches(train_ids, cfg.batch_size, cfg.seq_len, part=self.world.part(cfg.batch_size))
        except CorpusError as e:
            raise CorpusError(f"{cfg.corpus}: {e}") from None
        self.val_ids = val_ids
        self.corpus_digest = saved.meta.get("corpus_sha256") if saved else digest or file_digest(cfg.corpus)
        self.val_digest = hint["val_digest"] if "val_digest" in hint else file_digest(cfg.val) if cfg.val else None
        n_classes = cfg.auto_classes(len(vocab))
        bounds = ()
        if saved:
            bounds = saved.config.class_bounds
        elif n_classes:
            bounds = class_bounds(numpy.bincount(train_ids, minlength=len(vocab)), n_classes)
        mcfg = start_config or cfg.model_config(len(vocab), bounds)
        self._check_memory(mcfg, host_only=self.backend.device != "cpu")
        if start_params is not None:
            self.model = LanguageModel(mcfg, start_params, self.backend)  # a fresh optimizer below
        elif saved:
            if saved.config != mcfg:
                raise TrainError("cannot resume: the checkpoint's architecture differs from the options given")
            self.model = LanguageModel(mcfg, saved.params, self.backend)
        else:
            self.model = LanguageModel.create(mcfg, cfg.seed, self.backend, forget_bias=cfg.forget_bias,
                                              input_scale=cfg.input_scale)
        try:
            self.opt = make_optimizer(cfg.optimizer, self.model.params, cfg.lr, self.model.ops, cfg.weight_decay)
        except ValueError as e:  # a checkpoint's options (the command line's are checked before)
            raise TrainError(f"cannot train: {e}") from None
        self.rng = numpy.random.default_rng(cfg.seed)
        if saved:
            check_resume_state(last_path, saved, cfg, len(self.batches), self.opt)
        p = {"step": 0, "epoch": 0, "chunk": 0, "tokens": 0, "train_seconds": 0.0, "lr": self.opt.lr,
             "best_val": None, "best_saved": None, "bad_evals": 0, "last_train_loss": None, "last_val": None}
        self.state = None
        if saved:
            p.update(saved.meta["progress"])
            # Files saved before "elapsed" was kept: their compute time is the closest count.
            self.elapsed_before = p.pop("elapsed", p["train_seconds"])
            if "best_saved" not in saved.meta["progress"]:
                p["best_saved"] = p["best_val"]
            self.opt.load_state_arrays(saved.optim, p["opt_t"])
            self.rng.bit_generator.state = saved.meta["rng"]
            if saved.state is not None:
                xp, (a, b) = self.backend.xp, self.batches.part
                self.state = [(to_device(h[:, a:b], xp, self.backend.dtype),
                               None if c is None else to_device(c[:, a:b], xp, self.backend.dtype))
                              for h, c in saved.state]
        self.progress = p
        if self.state is None:
            self.state = self.model.initial_state(self._local_n())
        if self.world.size > 1:
            self.sync = StepSync(self.world.reducer(self.backend.xp), self.model.params, n_flags=3)

    def _check_memory(self, config: ModelConfig, host_only: bool = False, vocab_known: bool = True):
        """Refuse (MemoryLimitError) a run whose model, optimizer state and step (this
        process's share of the streams) would pass the memory available or ``max_memory``
        (memory.py), blaming the option whose default would lower the estimate most, else
        naming the model (``vocab_known``: its vocabulary too)."""
        cfg = self.cfg
        shape = memory.Shape.of(config)
        N = max(1, cfg.batch_size // self.world.size)

        def estimate(T=cfg.seq_len, N=N, **changes):
            return memory.training(replace(shape, **changes), T, N, cfg.optimizer, cfg.dtype, cfg.weight_drop,
                                   "gpu" if host_only else "cpu")

        need = estimate()
        default = {f.name: f.default for f in fields(TrainConfig)}
        options = {"--hidden": ("hidden", cfg.hidden, default["hidden"]),
                   "--layers": ("layers", cfg.layers, default["layers"]),
                   "--embed": ("embed", cfg.embed, default["embed"]),
                   "--batch-size": ("N", cfg.batch_size, default["batch_size"]),
                   "--seq-len": ("T", cfg.seq_len, default["seq_len"])}
        model = f"a {config.cell} {config.layers}x{config.hidden} model"
        if vocab_known:
            model += f" of {plural(config.vocab_size, 'token')}" + (" (--vocab-size caps them)" if cfg.level == "word" else "")
        subject = memory.culprit(lambda **c: estimate(**c).bytes, options, model)
        memory.check(need, subject, self.max_memory)

    def _local_n(self) -> int:
        a, b = self.batches.part
        return b - a

    def _shared_setup(self) -> dict:
        """What rank 0's setup found that the other ranks would otherwise read the corpus for."""
        return {"vocab": self.vocab, "digest": self.corpus_digest, "val_digest": self.val_digest}

    def _check_unfinished(self, progress: dict):
        """Raise :class:`Finished` when a resumed run has nothing left to do: its step or epoch
        limit is reached (the time limit counts each process afresh, so it never is)."""
        cfg = self.cfg
        why = None
        if cfg.max_steps is not None and progress["step"] >= cfg.max_steps:
            why = f"--max-steps {cfg.max_steps}", "--max-steps"
        elif cfg.max_epochs is not None and progress["epoch"] >= cfg.max_epochs:
            why = f"--max-epochs {cfg.max_epochs}", "--max-epochs"
        if why:
            step = progress["step"]
            raise Finished(f"{self.out}: the run already finished ({step:,} {'step' if step == 1 else 'steps'}, "
                           f"its limit {why[0]}); nothing was trained or changed. To train further, resume it with "
                           f"a larger {why[1]}")

    def _read_stream(self):
        """Copy the corpus stream (stdin) into cfg.corpus in the run folder, once, so digests,
        token caches and --resume read a regular file."""
        path = Path(self.cfg.corpus)
        data = self.corpus_stream.read()
        try:
            ckpt_mod.atomic_write_bytes(path, data)
        except OSError as e:
            raise TrainError(f"cannot write {path}: {e.strerror or e}") from None
        return path

    # ----- checkpoints -----
    def _meta(self) -> dict:
        p = dict(self.progress, opt_t=self.opt.t, elapsed=self._elapsed())
        meta = {"train": self.cfg.to_json(), "progress": p, "rng": self.rng.bit_generator.state,
                "corpus_sha256": self.corpus_digest, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if self.val_digest:
            meta["val_sha256"] = self.val_digest
        if self.init_record:
            meta["init_from"] = self.init_record
        return meta

    def save_last(self, state=None):
        """Write last.npz; ``state``: the carried state of all N streams on the host (default:
        this process's, which holds them all outside data-parallel training)."""
        if state is None:
            state = [(to_host(h), None if c is None else to_host(c)) for h, c in self.state]
        ckpt = ckpt_mod.Checkpoint(self.model.config, self.vocab, self.model.host_params(), self._meta(),
                                   self.opt.state_arrays(), state)
        ckpt_mod.save(self.out / ckpt_mod.LAST_NAME, ckpt)

    def _all_state(self):
        """The carried state of all N streams on the host, on rank 0 (None elsewhere): every
        rank's columns, gathered (a collective)."""
        local = [(to_host(h), None if c is None else to_host(c)) for h, c in self.state]
        if self.world.size == 1:
            return local
        parts = self.world.gather(local)
        if parts is None:
            return None
        return [(numpy.concatenate([q[layer][0] for q in parts], axis=1),
                 None if c is None else numpy.concatenate([q[layer][1] for q in parts], axis=1))
                for layer, (_, c) in enumerate(local)]

    def _together(self, fn, root_only: bool = False):
        """Run ``fn`` (on rank 0 alone with ``root_only``) and agree on how it went: a
        TrainError, CorpusError, CheckpointError or OSError on any rank is raised on every
        rank (dist.World.agree), so they all leave together. One process: just ``fn()``."""
        world = self.world
        if world.size == 1:
            return fn()
        error = result = None
        if world.root or not root_only:
            try:
                result = fn()
            except (TrainError, CorpusError, ckpt_mod.CheckpointError, OSError) as e:
                error = e
        world.agree(error)
        return result

    def save_best(self):
        ckpt = ckpt_mod.Checkpoint(self.model.config, self.vocab, self.model.host_params(), self._meta())
        ckpt_mod.save(self.out / ckpt_mod.BEST_NAME, ckpt)

    def _save(self, best: bool):
        """Save last.npz, and model.npz too when ``best``, in the order that leaves no dead end.

        Until last.npz exists it is written first: a save that fails or is killed after it
        leaves a run that resumes (and writes model.npz at its next evaluation), one that fails
        before it leaves no model file at all, and a fresh run starts. model.npz alone, which
        neither a fresh run nor --resume accepts, never appears. Later, model.npz is written
        first, so last.npz never promises a better model.npz than the one on disk.

        Data-parallel: a collective; rank 0 writes, with the state of every rank's streams,
        once every rank is found to hold the same parameters."""
        self._check_ranks_agree()
        state = self._all_state()

        def write():
            if best and (self.out / ckpt_mod.LAST_NAME).exists():
                self.save_best()
                self.save_last(state)
            else:
                self.save_last(state)
                if best:
                    self.save_best()

        self._together(write, root_only=True)
        self.saved_step = self.progress["step"]

    def _check_ranks_agree(self):
        """Data-parallel: raise TrainError on every rank unless every rank holds the same
        parameters (a digest of them each), so a model only rank 0 holds is never saved. The
        same summed gradients and the same rate give every rank the same update; this checks
        it, at each save (a SHA-256 of the parameters: a few milliseconds a megabyte)."""
        world = self.world
        if world.size == 1:
            return
        digest = hashlib.sha256()
        for a in self.model.params.values():
            digest.update(numpy.ascontiguousarray(to_host(a)).tobytes())
        digests = world.allgather(digest.hexdigest())
        differ = [rank for rank, d in enumerate(digests) if d != digests[0]]

        def check():
            if differ:
                raise TrainError(f"at step {self.progress['step']:,} rank(s) {', '.join(map(str, differ))} hold other "
                                 f"parameters than rank 0 (their updates differed); nothing was saved, the last "
                                 f"checkpoint is kept")

        self._together(check)

    def _check_model(self, loss: float, what: str):
        """Raise :class:`Diverged` unless the model may be saved: ``loss`` (its ``what``) finite
        and within :func:`loss_limit`, and its parameters, optimizer state and carried state
        finite (a model can be finite while its Adam moments overflowed to inf)."""
        def check():
            self._check_loss(loss, what)
            xp = self.backend.xp
            groups = [("parameter", self.model.params.items()), ("optimizer state", self.opt.state.items()),
                      ("hidden state", ((f"{layer}/{k}", a) for layer, hc in enumerate(self.state)
                                        for k, a in zip("hc", hc) if a is not None))]
            for kind, arrays in groups:
                for name, a in arrays:
                    if not bool(xp.isfinite(a).all()):
                        raise self._diverged(f"{kind} {name} holds NaN or infinite values")

        self._together(check)  # (each rank checks its own streams' state)

    def _train_sample_loss(self) -> float:
        """The model's loss on the first chunk of the training text (N x T predictions, a cold
        start, no dropout): what a save without validation data checks the model by."""
        b = self.batches
        return self._evaluate(b.streams.reshape(-1)[: b.N * b.T + 1], b.N, b.T)

    def _evaluate(self, ids, N: int, T: int) -> float:
        """:func:`evaluate`, its streams shared by the ranks (a collective) when there are several."""
        return evaluate(self.model, ids, N, T, self.world)

    def _diverged(self, why: str) -> Diverged:
        # --lr and --clip cannot change on --resume (it would not be exact): a retry with lower
        # ones needs another folder, unless nothing was saved.
        if self.saved_step is not None:
            kept = (f"the last good checkpoint (step {self.saved_step}) is kept in {self.out}. "
                    f"Try a lower --lr or --clip in another --out")
        else:
            kept = (f"no good checkpoint exists yet, so nothing was saved and {self.out} starts a fresh run "
                    f"when trained again. Try a lower --lr or --clip")
        return Diverged(f"training diverged at step {self.progress['step']} ({why}); {kept}")

    def _elapsed(self) -> float:
        """Seconds of the whole run: this process's, and those of the runs it resumed."""
        return self.elapsed_before + time.perf_counter() - self.started

    def _metric(self, m: dict):
        path = self.out / "metrics.jsonl"
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(m) + "\n")
        except OSError as e:  # a torn line is dropped by the next start's _trim_metrics
            raise TrainError(f"cannot write {path}: {e.strerror or e}") from None

    def _trim_metrics(self, step: int):
        """On resume, drop metric lines written after the checkpoint (they will be redone)."""
        path = self.out / "metrics.jsonl"
        if not path.exists():
            return
        if file_kind(path):
            raise TrainError(f"{path}: is {file_kind(path)}, not a regular file; cannot resume")
        keep = []
        try:
            for n, line in read_lines(path):
                try:
                    m = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill
                except (ValueError, RecursionError):  # an integer of 4,300 digits; nesting past the stack
                    m = None
                at = m.get("step", 0) if isinstance(m, dict) else None
                if isinstance(at, bool) or not isinstance(at, (int, float)):
                    raise TrainError(f"{path}: line {n} is not a JSON object with a numeric step (charnn writes "
                                     f"those); move the file away to resume")
                if at <= step:
                    keep.append(line)
        except MetricsError as e:
            raise TrainError(f"{e}; move it away to resume") from None
        ckpt_mod.atomic_write_bytes(path, ("\n".join(keep) + ("\n" if keep else "")).encode("utf-8"))

    # ----- the loop -----
    def _done(self, started: float) -> str | None:
        cfg, p = self.cfg, self.progress
        if cfg.max_steps is not None and p["step"] >= cfg.max_steps:
            return "max_steps"
        if cfg.max_epochs is not None and p["epoch"] >= cfg.max_epochs:
            return "max_epochs"
        if cfg.time_limit is not None and (self.time_up if self.sync else time.perf_counter() - started >= cfg.time_limit):
            return "time_limit"
        if self.stop_requested:
            return "interrupted"
        return None

    def evaluate_and_save(self, sample: bool = True, scheduled: bool = True):
        """Evaluate, save model.npz if the model is the best so far, and save last.npz.

        A model that fails the check before saving (see the module docstring) raises
        :class:`Diverged` and nothing is written.

        Args:
            sample: show a generated sample with the result.
            scheduled: an evaluation of the eval_every schedule; only these decay the learning
                rate and count towards early stopping (``best_val``, ``bad_evals``), so an extra
                evaluation where a run stops cannot change the steps of its resumed run.
                ``best_saved`` is the validation loss of the model in model.npz, over all evaluations.
        """
        p, cfg = self.progress, self.cfg
        if self.val_ids is None:
            self._check_model(self._train_sample_loss(), "training loss")
            self._save(best=True)
            return None
        val = self._evaluate(self.val_ids, cfg.batch_size, cfg.seq_len)
        self._check_model(val, "validation loss")
        if scheduled:
            if p["best_val"] is None or val < p["best_val"]:
                p["best_val"] = val
                p["bad_evals"] = 0
            else:
                p["bad_evals"] += 1
                if cfg.lr_decay != 1.0:
                    p["lr"] *= cfg.lr_decay
        # model.npz missing (a resumed run whose first save failed before writing it): write it
        improved = p["best_saved"] is None or val < p["best_saved"] or not (self.out / ckpt_mod.BEST_NAME).exists()
        if improved:
            p["best_saved"] = val
        p["last_val"] = val
        m = {"type": "eval", "step": p["step"], "epoch": p["epoch"] + p["chunk"] / len(self.batches),
             "tokens": p["tokens"], "elapsed": self._elapsed(), "val_loss": val, "val_bits_per_token": val / math.log(2),
             "val_perplexity": math.exp(min(val, 700)), "best_val_loss": p["best_saved"],
             "lr": p["lr"] * self.lr_factor()}  # the rate of the next step
        self._together(lambda: self._metric(m), root_only=True)
        text = None
        if sample and cfg.sample_length > 0 and self.world.root:
            from .sample import generate

            text = "".join(generate(self.model, self.vocab, cfg.sample_length, temperature=0.8,
                                    rng=numpy.random.default_rng(p["step"])))
        self._save(best=improved)
        self.reporter.evaluation(m, text)
        return val

    def run(self) -> dict:
        """Lock the folder, set up and train. Data-parallel, rank 0 alone locks the folder (for
        the whole run) and builds the token cache, while the others wait; then they set up from
        what it found (the vocabulary, the digests: no rank reads the corpus again) and map
        the same cache. An error of either stage is agreed on, so every rank leaves."""
        world = self.world
        with contextlib.ExitStack() as held:
            error = None
            if world.root:
                try:
                    self._setup_locked(held)
                except Exception as e:
                    if world.size == 1:
                        raise
                    error = e
            if world.size > 1:
                world.agree(error)
                self.shared = world.bcast(self._shared_setup() if world.root else None)
                error = None
                if not world.root:
                    try:
                        self._setup()
                    except Exception as e:
                        error = e
                world.agree(error)
            if world.root:
                self._remove_stale_temp_files()
            return self._loop()

    def _setup_locked(self, held: contextlib.ExitStack):
        """Create and lock the run folder (the lock entered on ``held``), then set up."""
        created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrainError(f"{self.out}: cannot create the run folder: {e.strerror or e}") from None
        lock_existed = (self.out / RunLock.NAME).exists()
        caches_before = set(self.out.glob("tokens-*"))
        held.enter_context(RunLock(self.out))
        stdin_copy = None
        try:
            holds_run = (self.out / ckpt_mod.LAST_NAME).exists() or (self.out / ckpt_mod.BEST_NAME).exists()
            if self.corpus_stream is not None and not holds_run:  # (else _setup refuses the folder)
                stdin_copy = self._read_stream()
            self._setup()
        except BaseException:
            # Nothing of the run was written yet: leave no token cache, lock file, corpus
            # copy or empty run folder behind.
            for cache in set(self.out.glob("tokens-*")) - caches_before:
                cache.unlink(missing_ok=True)
            if stdin_copy is not None:
                stdin_copy.unlink(missing_ok=True)
            if not lock_existed:
                (self.out / RunLock.NAME).unlink(missing_ok=True)
            if created:
                try:
                    self.out.rmdir()
                except OSError:
                    pass
            raise

    def _remove_stale_temp_files(self):
        """Remove temporary files of saves that a kill interrupted (checkpoint.atomic_write_bytes
        names them .NAME.XXXX.tmp); safe while this process holds the run lock."""
        for name in (ckpt_mod.BEST_NAME, ckpt_mod.LAST_NAME, "metrics.jsonl"):
            for tmp in self.out.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)

    def _reset_some(self, state: list) -> list:
        """Restart the carried state of a random few streams (each with chance --state-reset).

        Streams otherwise start from a zero state only at the same few positions once an epoch,
        and a model that never learns to start cold can fall into a state it does not leave
        for thousands of characters when evaluation, scoring or sampling starts it at another
        position (seen on tiny Shakespeare: one validation stream at 10.9 nats/char while the
        same text started 21 characters earlier scored 1.41). The draws come from the run's
        RNG, so a resumed run makes the same ones."""
        p = self.cfg.state_reset
        if p <= 0:
            return state
        a, b = self.world.part(self.cfg.batch_size)  # drawn for all N streams: K changes no draw
        keep = (self.rng.random(self.cfg.batch_size) >= p)[a:b]
        if keep.all():
            return state
        h0 = state[0][0]
        mask = to_device(keep, array_module(h0), h0.dtype)
        return [(h * mask, None if c is None else c * mask) for h, c in state]

    def _dropout_masks(self, T: int):
        """Data-parallel: this rank's columns of the dropout masks of the whole batch, drawn
        as one process draws them (model.loss_and_grads), so K changes no mask. (One process:
        None, the model draws its own.)"""
        cfg = self.cfg
        if self.sync is None or cfg.dropout <= 0:
            return None
        xp, (a, b) = self.backend.xp, self.batches.part
        return [xp.ascontiguousarray(dropout_mask((cfg.hidden, T, cfg.batch_size), cfg.dropout, self.rng, xp,
                                                  self.backend.dtype)[:, :, a:b]) for _ in range(cfg.layers)]

    @contextlib.contextmanager
    def _weights_dropped(self):
        """--weight-drop P (DropConnect on the recurrent weights, as AWD-LSTM's weight drop):
        inside, each layer's Wh is replaced by Wh * mask, the mask 0 with chance P and 1/(1-P)
        elsewhere, one per layer for the whole chunk (every time step drops the same weights);
        the true Wh is back afterwards, before the update. Yields {name: mask}. The masks come
        from the run's generator before the dropout masks, every rank drawing the same."""
        cfg, params = self.cfg, self.model.params
        if cfg.weight_drop <= 0:
            yield {}
            return
        xp, dtype = self.backend.xp, self.backend.dtype
        names = [f"rnn.{layer}.Wh" for layer in range(cfg.layers)]
        masks = {n: dropout_mask(params[n].shape, cfg.weight_drop, self.rng, xp, dtype) for n in names}
        true = {n: params[n] for n in names}
        try:
            for n in names:
                params[n] = true[n] * masks[n]
            yield masks
        finally:
            params.update(true)

    def _step(self, x, y, started: float):
        """One training step: loss and gradients of this process's streams, then (data-parallel)
        their sum over the ranks with the stop and time-up flags in the same Allreduce, then
        the update. Returns the loss, the mean over the whole batch."""
        cfg, model, p = self.cfg, self.model, self.progress
        with self._weights_dropped() as masks:
            loss, grads, self.state = model.loss_and_grads(x, y, self.state, rng=self.rng, sparse=True,
                                                           dropout_masks=self._dropout_masks(x.shape[0]))
        for name, mask in masks.items():  # d loss / d Wh = (d loss / d (Wh * mask)) * mask
            grads[name] *= mask
            grads.changed(name)
        self.state = self._reset_some(self.state)
        if self.sync is None:
            self.opt.lr = p["lr"] * self.lr_factor()
            self.opt.step(grads, clip_scale(global_norm(grads, model.ops), cfg.clip))
            return loss
        time_up = cfg.time_limit is not None and time.perf_counter() - started >= cfg.time_limit
        # Rank 0's clock rides along (the others add 0), so a schedule over time gives every
        # rank the same rate.
        clock = self._elapsed() if self.world.root else 0.0
        grads, loss, (stops, time_ups, clock) = self.sync.reduce(
            grads, loss, (float(self.interrupted_here), float(time_up), clock))
        self.stop_requested, self.time_up = stops > 0, time_ups > 0
        self.opt.lr = p["lr"] * self.lr_factor(float(clock))
        # The sums are K times the means over the whole batch: the norm is divided by K, and
        # the update's scale (clipping) multiplied by 1/K (exact for K a power of two).
        K = self.world.size
        norm = global_norm(grads, model.ops) / K
        scale = clip_scale(norm, cfg.clip)
        scale = (self.backend.xp.ones((), dtype=norm.dtype) if scale is None else scale) * (1.0 / K)
        self.opt.step(grads, scale)
        return loss / K

    def _loop(self) -> dict:
        cfg, p, model, batches = self.cfg, self.progress, self.model, self.batches
        xp = self.backend.xp
        self._together(lambda: self._trim_metrics(p["step"]), root_only=True)
        self.saved_step = p["step"] if self.resume else None  # the step of the checkpoint on disk
        started = self.started = time.perf_counter()
        if cfg.time_limit is not None and (p.get("horizon_seconds") or 0.0) <= self.elapsed_before:
            p["horizon_seconds"] = self.elapsed_before + cfg.time_limit  # (see the module docstring)
        self.reporter.start({"vocab_size": len(self.vocab), "params": model.config.n_params(),
                             "train_tokens": len(batches.streams.reshape(-1)), "chunks_per_epoch": len(batches),
                             "val_tokens": 0 if self.val_ids is None else len(self.val_ids), "step": p["step"],
                             "device": self.backend.name, "config": cfg, "out": str(self.out)})
        log_sum = xp.zeros((), dtype=numpy.float64)
        log_n, log_tokens, log_time = 0, 0, 0.0
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum, frame):
            if self.interrupted_here:  # a second Ctrl-C: stop at once
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.interrupted_here = True
            if self.sync is None:  # (data-parallel: once the next Allreduce has told every rank)
                self.stop_requested = True
            self.reporter.message("stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

        signal.signal(signal.SIGINT, on_sigint)
        reason = None
        try:
            while True:
                reason = self._done(started)
                if reason:
                    break
                if p["chunk"] >= len(batches):
                    p["epoch"] += 1
                    p["chunk"] = 0
                    self.state = model.initial_state(self._local_n())
                    continue
                t0 = time.perf_counter()
                x, y = batches.chunk(p["chunk"])
                log_sum += self._step(x, y, started)
                log_time += time.perf_counter() - t0
                tokens = y.shape[0] * cfg.batch_size  # of all the ranks
                p["chunk"] += 1
                p["step"] += 1
                p["tokens"] += tokens
                log_n += 1
                log_tokens += tokens
                if log_n >= cfg.log_every or p["step"] == cfg.max_steps:
                    train_loss = to_float(log_sum) / log_n
                    self._together(lambda: self._check_loss(train_loss, "training loss"))
                    p["train_seconds"] += log_time
                    p["last_train_loss"] = train_loss
                    m = {"type": "train", "step": p["step"], "epoch": p["epoch"] + p["chunk"] / len(batches),
                         "train_loss": train_loss, "tokens": p["tokens"],
                         "tokens_per_second": log_tokens / max(log_time, 1e-9), "lr": self.opt.lr,
                         "elapsed": self._elapsed()}
                    self._together(lambda: self._metric(m), root_only=True)
                    self.reporter.log(m)
                    log_sum[...] = 0
                    log_n, log_tokens, log_time = 0, 0, 0.0
                if cfg.eval_every and p["step"] % cfg.eval_every == 0:
                    self.evaluate_and_save()
                    if cfg.patience and p["bad_evals"] >= cfg.patience:
                        reason = "early_stopping"
                        break
        finally:
            signal.signal(signal.SIGINT, previous)
        if log_n:
            train_loss = to_float(log_sum) / log_n
            self._together(lambda: self._check_loss(train_loss, "training loss"))
            p["train_seconds"] += log_time
            p["last_train_loss"] = train_loss
        if reason == "interrupted":
            self._check_model(self._train_sample_loss(), "training loss")
            state = self._all_state()
            self._together(lambda: self.save_last(state), root_only=True)
        elif not (cfg.eval_every and p["step"] % cfg.eval_every == 0 and p["step"] > 0):
            # Stopped between scheduled evaluations (early stopping always stops right after one).
            self.evaluate_and_save(sample=False, scheduled=False)
        self.reporter.end()
        return self.result(reason)

    def lr_factor(self, elapsed: float | None = None) -> float:
        """The schedule's factor for the next step (see the module docstring); ``elapsed``:
        the run's seconds so far by the clock all ranks agree on (default: this process's)."""
        cfg, p = self.cfg, self.progress
        factor = min(1.0, (p["step"] + 1) / cfg.warmup) if cfg.warmup else 1.0
        if cfg.lr_schedule == "cosine":
            done = []
            if cfg.max_steps is not None:
                done.append(p["step"] / cfg.max_steps)
            if cfg.max_epochs is not None:
                done.append((p["epoch"] + p["chunk"] / max(len(self.batches), 1)) / cfg.max_epochs)
            if p.get("horizon_seconds"):
                done.append((self._elapsed() if elapsed is None else elapsed) / p["horizon_seconds"])
            if done:
                x = max(min(max(done), 1.0) - cfg.lr_hold, 0.0) / (1.0 - cfg.lr_hold)
                factor *= cfg.lr_floor + (1.0 - cfg.lr_floor) * 0.5 * (1.0 + math.cos(math.pi * x))
        return factor

    def _check_loss(self, loss: float, what: str):
        limit = loss_limit(len(self.vocab))
        if not math.isfinite(loss):
            raise self._diverged(f"{what} {loss}")
        if loss > limit:
            raise self._diverged(f"{what} {loss:.4g} nats/token, above the limit {limit:.3g} = 2 ln V")

    def result(self, reason: str | None) -> dict:
        p = self.progress
        val = p.get("last_val")
        best = self.out / ckpt_mod.BEST_NAME
        return {
            "model": str(best if best.exists() else self.out / ckpt_mod.LAST_NAME),
            "checkpoint": str(self.out / ckpt_mod.LAST_NAME),
            "stopped": reason,
            "steps": p["step"], "epochs": p["epoch"] + p["chunk"] / max(len(self.batches), 1),
            "tokens": p["tokens"], "train_seconds": p["train_seconds"],
            "tokens_per_second": p["tokens"] / p["train_seconds"] if p["train_seconds"] else 0.0,
            "train_loss": p.get("last_train_loss"),
            "val_loss": val, "val_bits_per_token": None if val is None else val / math.log(2),
            "val_perplexity": None if val is None else math.exp(min(val, 700)),
            "best_val_loss": p.get("best_saved"),
        }

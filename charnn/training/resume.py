"""Resume's checks: a last.npz's training options, progress, optimizer slots, carried state and
random generator must each be what an exact resume needs, or it is refused in one line."""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path

import numpy

from ..backend import DEVICES, DTYPES
from ..nn import cells
from ..nn.optim import OPTIMIZERS
from ..wording import plural
from ..io import checkpoint as ckpt_mod
from .config import RESUMABLE, Finished, TrainConfig, TrainError
from .data import file_digest

# What a resume needs from last.npz's counters (its metadata's "progress"), and the type of
# each. A value that is missing, of another type or out of range would make the resumed run take other steps than the
# uninterrupted one (or fail in the middle of the maths), so resume refuses it.
_COUNTERS = {"step": "count", "epoch": "count", "chunk": "count", "tokens": "count", "opt_t": "count",
             "bad_evals": "count", "lr": "positive", "best_val": "loss"}
_COUNTERS_OPTIONAL = {"train_seconds": "seconds", "elapsed": "seconds", "horizon_seconds": "seconds", "best_saved": "loss", "last_train_loss": "loss", "last_val": "loss",
                      "best_step": "count", "best_seconds": "seconds"}
# TrainConfig fields that must be at least 1 (the others that are numbers at least 0).
_AT_LEAST_ONE = {"layers", "hidden", "seq_len", "batch_size", "min_count", "log_every", "vocab_size", "max_steps",
                 "max_epochs", "eval_every"}
_BELOW_ONE = {"dropout", "val_fraction", "lr_hold", "weight_drop"}  # in [0, 1)
_CHOICES = {"level": ("char", "word"),
            "tokenizer": ("regex", "whitespace"), "optimizer": OPTIMIZERS, "lr_schedule": ("constant", "cosine"), "device": DEVICES, "dtype": DTYPES,
            "errors": ("strict", "replace", "ignore")}


def _is_count(v) -> bool:
    return type(v) is int and v >= 0  # noqa: E721  (not bool)


def _is_number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _counter_problem(kind: str, v) -> bool:
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
    elif name == "cell":
        ok = isinstance(v, str) and v in cells.CELLS  # the registry, read now: cells registered later count
    elif name == "activation":
        ok = isinstance(v, str) and v in cells.activations()  # likewise
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
    counters = meta["progress"]
    for key, kind in (_COUNTERS | _COUNTERS_OPTIONAL).items():
        if key not in counters:
            if key in _COUNTERS:
                raise TrainError(f"{path}: the saved progress has no {key}; cannot resume exactly")
        elif _counter_problem(kind, counters[key]):
            raise TrainError(f"{path}: the saved progress field {key} is {_shown(counters[key])}, "
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
    counters = saved.meta["progress"]
    if counters["chunk"] > chunks:
        raise TrainError(f"{path}: the saved data position (chunk {counters['chunk']}) is past the "
                         f"{plural(chunks, 'chunk')} of an epoch; cannot resume exactly")
    want = {f"{name}.{slot}" for name in opt.params for slot in opt.slots} if counters["opt_t"] else set()
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


def check_unfinished(cfg: TrainConfig, counters: dict, out) -> None:
    """Raise :class:`Finished` when a resumed run has nothing left to do: its step or epoch
    limit is reached (the time limit counts each process afresh, so it never is)."""
    why = None
    if cfg.max_steps is not None and counters["step"] >= cfg.max_steps:
        why = f"--max-steps {cfg.max_steps}", "--max-steps"
    elif cfg.max_epochs is not None and counters["epoch"] >= cfg.max_epochs:
        why = f"--max-epochs {cfg.max_epochs}", "--max-epochs"
    if why:
        step = counters["step"]
        raise Finished(f"{out}: the run already finished ({step:,} {'step' if step == 1 else 'steps'}, "
                       f"its limit {why[0]}); nothing was trained or changed. To train further, resume it with "
                       f"a larger {why[1]}")


def load_resumed(folder, overrides: dict, check_files: bool = True):
    """(checkpoint, configuration) to resume the run in ``folder`` (a folder.RunFolder) from:
    its last.npz checked (resume_config), the options RESUMABLE allows changed by ``overrides``
    and any other override refused, a finished run refused (Finished), and with
    ``check_files`` the corpus and validation file checked unchanged by their digests."""
    out = folder.out
    if not folder.last.exists():
        if folder.best.exists():
            raise TrainError(f"{out}: holds {ckpt_mod.BEST_NAME} but no {ckpt_mod.LAST_NAME}, the full checkpoint a "
                             f"resume needs, so it cannot continue exactly; train in another --out, or move "
                             f"{ckpt_mod.BEST_NAME} away to start afresh here")
        raise TrainError(f"{out}: nothing to resume (no {ckpt_mod.LAST_NAME})")
    saved = ckpt_mod.load(folder.last, "float64")  # (finite in the file; in the run's dtype below)
    cfg = resume_config(folder.last, saved)
    for key, value in overrides.items():
        if key in RESUMABLE:
            setattr(cfg, key, value)
        elif getattr(cfg, key) != value:
            raise TrainError(f"cannot resume with --{key.replace('_', '-')} {value}: the checkpoint was trained with "
                             f"{getattr(cfg, key)}")
    ckpt_mod.check_values(folder.last, saved, cfg.dtype)
    check_unfinished(cfg, saved.meta["progress"], out)
    digest, val_digest = saved.meta.get("corpus_sha256"), saved.meta.get("val_sha256")
    if check_files:
        if digest and Path(cfg.corpus).exists() and file_digest(cfg.corpus) != digest:
            raise TrainError(f"{cfg.corpus}: the corpus changed since the checkpoint; cannot resume exactly")
        if cfg.val and isinstance(val_digest, str) and Path(cfg.val).is_file() and file_digest(cfg.val) != val_digest:
            raise TrainError(f"{cfg.val}: the validation file changed since the checkpoint; cannot resume exactly")
    return saved, cfg

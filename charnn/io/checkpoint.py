"""The model file: safe to load, versioned, written atomically.

A model file is a NumPy ``.npz`` (a zip of ``.npy`` arrays) read with ``allow_pickle=False``, so
loading one never runs code: an array of Python objects is refused. It holds

    meta           uint8   UTF-8 JSON: format name and version, model config, vocabulary,
                           training config and progress (step, data position, RNG state, ...)
    param/NAME     float   each model parameter (names as in model.py), on the host
    optim/NAME     float   optimizer state, in "last" checkpoints only (for exact resume)
    state/L/h|c    float   the carried hidden state, in "last" checkpoints only

The same file serves CPU and GPU: arrays are stored as host arrays and moved on load.
Saving writes a temporary file in the target folder, fsyncs it and renames it over the
target, so a crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from .fileio import atomic_write_bytes  # noqa: F401  (re-exported: train.py and tests use it)
from ..nn import cells
from ..nn.model import LanguageModel, ModelConfig, ModelError
from .vocab import Vocab, VocabError

FORMAT = "charnn-model"
VERSION = 1
BEST_NAME = "model.npz"
LAST_NAME = "last.npz"


class CheckpointError(Exception):
    """A model file cannot be read or written; the message names the path and the problem."""


@dataclass
class Checkpoint:
    config: ModelConfig
    vocab: Vocab
    params: dict  # name -> host array
    meta: dict = field(default_factory=dict)  # everything else in the JSON metadata
    optim: dict = field(default_factory=dict)  # name -> host array
    state: list | None = None  # [(h, c|None)] host arrays

    def model(self, backend=None) -> LanguageModel:
        return LanguageModel(self.config, self.params, backend)


def save(path, ckpt: Checkpoint):
    """Write a checkpoint atomically. Raises CheckpointError on I/O failure (e.g. disk full);
    the previous file at ``path``, if any, is then left as it was."""
    path = Path(path)
    meta = dict(ckpt.meta)
    meta.update(format=FORMAT, version=VERSION, config=ckpt.config.to_json(), vocab=ckpt.vocab.to_json())
    arrays = {"meta": numpy.frombuffer(json.dumps(meta).encode("utf-8"), dtype=numpy.uint8)}
    for k, v in ckpt.params.items():
        arrays[f"param/{k}"] = numpy.asarray(v)
    for k, v in ckpt.optim.items():
        arrays[f"optim/{k}"] = numpy.asarray(v)
    if ckpt.state is not None:
        for layer, (h, c) in enumerate(ckpt.state):
            arrays[f"state/{layer}/h"] = numpy.asarray(h)
            if c is not None:
                arrays[f"state/{layer}/c"] = numpy.asarray(c)
    buf = io.BytesIO()
    numpy.savez(buf, **arrays)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}") from None


def resolve(path) -> Path:
    """A model file path from a file or a run folder (its best model, else its last checkpoint)."""
    p = Path(path)
    if p.is_dir():
        for name in (BEST_NAME, LAST_NAME):
            if (p / name).is_file():
                return p / name
        raise CheckpointError(f"{p}: folder holds no {BEST_NAME} or {LAST_NAME}")
    if not p.exists():
        raise CheckpointError(f"{p}: no such file")
    return p


def load(path) -> Checkpoint:
    """Read and validate a model file without unpickling anything.

    Raises:
        CheckpointError: naming the path and what is wrong (not a model file, truncated,
            newer format version, pickled objects, shapes that do not match, ...).
    """
    p = resolve(path)
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read: {e.strerror or e}") from None
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"{p}: not a charnn model file")
    try:
        with numpy.load(p, allow_pickle=False) as z:
            names = list(z.files)
            if "meta" not in names:
                raise CheckpointError(f"{p}: not a charnn model file (no metadata)")
            arrays = {name: z[name] for name in names}
    except CheckpointError:
        raise
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise CheckpointError(f"{p}: refused: the file holds pickled Python objects, which charnn never loads") from None
        raise CheckpointError(f"{p}: not a valid model file ({e})") from None
    except Exception as e:
        # The bytes are untrusted: zipfile and NumPy's .npy header parser can raise many types
        # (BadZipFile, EOFError, tokenize.TokenError, MemoryError for an absurd shape, ...).
        raise CheckpointError(f"{p}: not a charnn model file or truncated ({type(e).__name__}: {e})") from None
    for name, a in arrays.items():
        if not isinstance(a, numpy.ndarray):  # NpzFile returns a member without .npy magic as bytes
            raise CheckpointError(f"{p}: not a valid model file (member {name!r} is not a NumPy array)")
    return _parse(p, arrays)


def _parse(p: Path, arrays: dict) -> Checkpoint:
    raw = arrays.pop("meta")
    if raw.dtype != numpy.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{p}: malformed metadata")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{p}: malformed metadata (not UTF-8 JSON)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a charnn model file")
    version = meta.get("version")
    if not isinstance(version, int):
        raise CheckpointError(f"{p}: malformed metadata (no format version)")
    if version > VERSION:
        raise CheckpointError(f"{p}: made by a newer charnn (model format {version}; this charnn reads up to {VERSION}): upgrade charnn")
    try:
        config = ModelConfig.from_json(meta.pop("config", None))
        vocab = Vocab.from_json(meta.pop("vocab", None))
    except (ModelError, VocabError, ValueError, TypeError, OverflowError) as e:
        # Not only ModelError/VocabError: a crafted value can fail inside a constructor's own
        # conversions (int("") or int(inf) in ModelConfig's class_bounds).
        raise CheckpointError(f"{p}: malformed metadata ({e})") from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{p}: the vocabulary has {len(vocab)} tokens but the weights expect {config.vocab_size}")
    params, optim, state_parts = {}, {}, {}
    for name, a in arrays.items():
        kind, _, rest = name.partition("/")
        if a.dtype.kind != "f":
            raise CheckpointError(f"{p}: array {name} has dtype {a.dtype}, expected floats")
        if kind == "param":
            params[rest] = a
        elif kind == "optim":
            optim[rest] = a
        elif kind == "state":
            state_parts[rest] = a
        else:
            raise CheckpointError(f"{p}: unexpected array {name}")
    if config.layers > len(params):
        # Checked before param_shapes(), which loops over the layers: a crafted layer count
        # (say 10**12) must not make loading hang.
        raise CheckpointError(f"{p}: the config has {config.layers} layers but the file holds only {len(params)} parameters")
    expected = config.param_shapes()
    for name, shape in expected.items():
        if name not in params:
            raise CheckpointError(f"{p}: parameter {name} is missing")
        if tuple(params[name].shape) != shape:
            raise CheckpointError(f"{p}: parameter {name} has shape {tuple(params[name].shape)}, expected {shape}")
        if not numpy.isfinite(params[name]).all():
            raise CheckpointError(f"{p}: parameter {name} holds NaN or infinite values")
    extra = set(params) - set(expected)
    if extra:
        raise CheckpointError(f"{p}: unexpected parameters: {', '.join(sorted(extra))}")
    state = None
    if state_parts:
        state = []
        for layer in range(config.layers):
            h = state_parts.get(f"{layer}/h")
            c = state_parts.get(f"{layer}/c")
            ok = h is not None and h.ndim == 2 and h.shape[0] == config.hidden
            ok = ok and (c is not None and c.shape == h.shape if cells.get(config.cell).has_c else c is None)
            ok = ok and (not state or h.shape == state[0][0].shape)
            if not ok:
                raise CheckpointError(f"{p}: the saved hidden state of layer {layer} is malformed")
            state.append((h, c))
        if len(state_parts) != sum(2 if c is not None else 1 for _, c in state):
            raise CheckpointError(f"{p}: unexpected saved hidden state arrays")
    for name, a in optim.items():
        pname = name.rsplit(".", 1)[0]
        if a.dtype.kind != "f" or pname not in expected or tuple(a.shape) != expected[pname] or not numpy.isfinite(a).all():
            raise CheckpointError(f"{p}: optimizer state {name} is malformed")
    return Checkpoint(config=config, vocab=vocab, params=params, meta=meta, optim=optim, state=state)


def load_model(path, backend=None):
    """(model, vocab, checkpoint) from a model file or run folder."""
    ckpt = load(path)
    try:
        return ckpt.model(backend), ckpt.vocab, ckpt
    except ModelError as e:
        raise CheckpointError(f"{path}: {e}") from None


DEFAULT_ENV = "CHARNN_DEFAULT_MODEL"
DEFAULT_REL = Path("models") / "default" / BEST_NAME


def default_model_path() -> Path:
    """The bundled model: $CHARNN_DEFAULT_MODEL, else models/default/model.npz beside the
    package (a source checkout or editable install), else the copy a regular install puts
    under <prefix>/share/charnn."""
    import sys

    env = os.environ.get(DEFAULT_ENV)
    if env:
        return Path(env)
    candidates = [Path(__file__).resolve().parent.parent / DEFAULT_REL,
                  Path(sys.prefix) / "share" / "charnn" / DEFAULT_REL]
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError("no MODEL given and the bundled default model is not installed; "
                          "name a model file or run folder (e.g. one made by charnn train)")

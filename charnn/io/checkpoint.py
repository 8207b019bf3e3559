"""The model file: safe to load, versioned, written atomically.

A model file is a NumPy ``.npz`` (a zip of ``.npy`` arrays) read with ``allow_pickle=False``, so
loading one never runs code: an array of Python objects is refused. It holds

    meta           uint8   UTF-8 JSON: format name and version, model config, vocabulary,
                           training config and progress (step, data position, RNG state, ...)
    param/NAME     float   each model parameter (names as in model.py), on the host
    optim/NAME     float   optimizer state, in "last" checkpoints only (for exact resume)
    state/L/h|c    float   the carried hidden state (H, N), in "last" checkpoints only, where
                           N is the metadata's train.batch_size

Loading reads nothing the configuration does not call for: the zip directory (npz_file.py) and
metadata (bounds.py) are size-capped, a name outside this table is refused unread, and each
array's dtype, shape and byte count (in its .npy header and the zip directory) are checked
before its data is inflated. Only stored and deflated members are read, and only the format versions in ``READS``.
Every value must be finite in the dtype it will be computed in (float32 unless the caller says).
A safetensors file (safetensors_file.py) is held to the same checks in the same order.

The same file serves CPU and GPU: arrays are stored as host arrays and moved on load.
Saving writes a temporary file in the target folder, fsyncs it and renames it over the
target, so a crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy

from . import bounds, npz_file, safetensors_file
from .fileio import atomic_write_bytes, file_kind  # noqa: F401  (atomic_write_bytes: training and tests use it)
from ..nn import cells
from ..nn.model import LanguageModel, ModelConfig, ModelError
from ..nn.optim import Adagrad, Adam, RMSprop
from .vocab import Vocab, VocabError
from ..wording import plural

FORMAT = "charnn-model"
VERSION = 1  # the version save() writes
READS = {1}  # the versions load() reads
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


def resolve(model=None, names=(BEST_NAME, LAST_NAME), purpose: str = "") -> Path:
    """The model file that MODEL names: the one place where a path becomes a model file, for
    the command line, fine-tuning and the Python API alike.

    Args:
        model: a model file, a run folder (its first file of ``names``: the best model, else
            the last checkpoint), or None for the bundled default (:func:`default_model_path`).
        purpose: said after a run folder's missing file (e.g. " to start from").

    Raises:
        CheckpointError: a missing path, a run folder without any of ``names``, or a FIFO,
            socket or device (opening a FIFO waits for a writer, forever without one).
    """
    p = default_model_path() if model is None else Path(model)
    if p.is_dir():
        found = next((p / n for n in names if (p / n).exists() and not (p / n).is_dir()), None)
        if found is None:
            raise CheckpointError(f"{p}: the run folder holds no {' or '.join(names)}{purpose}")
        p = found  # (a FIFO named model.npz is refused below, not passed over)
    elif not p.exists():
        raise CheckpointError(f"{p}: no such file")
    kind = file_kind(p)
    if kind:
        raise CheckpointError(f"{p}: is {kind}, not a regular model file")
    return p


def load(path, dtype="float32") -> Checkpoint:
    """Read and validate a model file (npz or safetensors) without unpickling anything, and
    without reading or allocating anything the file's configuration does not call for.

    The file's directory is read first (the zip directory or the safetensors header, its size
    capped), then the metadata (its size, lists, objects and values capped: bounds.py), whose
    configuration says which arrays the file must hold; each array's name, dtype, shape and
    byte count are checked against it before its data is read. So no file, however crafted,
    costs much more memory or time than the honest model it claims to be. The values are
    then checked in ``dtype``: a float64 1e300 is finite in the file but infinite in float32.

    Args:
        path: a model file or run folder (see :func:`resolve`).
        dtype: the float dtype the arrays will be computed in (the backend's).

    Raises:
        CheckpointError: naming the path and what is wrong (not a model file, truncated,
            unknown or newer format version, pickled objects, members or shapes that do not
            match the configuration, values not finite in ``dtype``, ...).
    """
    p = resolve(path)
    dtype = numpy.dtype(dtype)
    try:
        # Not blocking on open, then a regular file or nothing: a FIFO put in its place after
        # resolve() looked must not make this wait.
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read: {e.strerror or e}") from None
    f = npz_file.CappedFile(fd)
    with f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(f"{p}: not a regular file")
        os.set_blocking(fd, True)
        size = os.fstat(fd).st_size
        try:
            head = f.read(9)
            if head[:4] != b"PK\x03\x04":
                if safetensors_file.looks_like(head):
                    f.seek(0)
                    return _read_safetensors(p, f, size, dtype)
                raise CheckpointError(f"{p}: not a charnn model file")
            f.seek(0)
            f.cap = npz_file.MAX_DIRECTORY
            with zipfile.ZipFile(f) as z:
                f.cap = None
                return _read(p, z, size, dtype)
        except CheckpointError:
            raise
        except npz_file.NpzFileError as e:
            raise CheckpointError(f"{p}: {e}") from None
        except npz_file.TooLarge:
            raise CheckpointError(f"{p}: not a charnn model file (its zip directory is over "
                                  f"{npz_file.MAX_DIRECTORY >> 20} MiB)") from None
        except Exception as e:
            # The bytes are untrusted: zipfile, zlib and NumPy's header parser can raise many
            # types (BadZipFile, EOFError, zlib.error, ValueError, RecursionError, ...).
            raise CheckpointError(f"{p}: not a charnn model file or truncated "
                                  f"({type(e).__name__}: {_one_line(e)})") from None


# Limits on what a file may make the loader read before its configuration is known: the zip
# directory's and a .npy header's are npz_file.py's; the metadata's (mostly the vocabulary: a
# million words take about 10 MB of JSON) are bounds.py's, for both formats.
MAX_META = bounds.MAX_META  # bytes of metadata JSON, and at most 1 MiB more than 16x the file's size
MAX_META_CONTAINERS = bounds.MAX_META_CONTAINERS  # lists and objects in the metadata JSON
OPTIM_SLOTS = frozenset(s for cls in (Adagrad, Adam, RMSprop) for s in cls.slots)
_one_line = bounds.one_line


def _kind(name: str) -> str | None:
    """The part of the format a member name belongs to, or None for a name charnn never writes."""
    if name == "meta":
        return "meta"
    kind, _, rest = name.partition("/")
    if kind in ("param", "optim") and rest and "/" not in rest:
        return kind
    if kind == "state":
        layer, _, hc = rest.partition("/")
        if layer.isdigit() and layer.isascii() and hc in ("h", "c"):
            return kind
    return None


def _read(p: Path, z: zipfile.ZipFile, file_size: int, dtype: numpy.dtype) -> Checkpoint:
    if "meta.npy" not in z.namelist():
        raise CheckpointError(f"{p}: not a charnn model file (no metadata)")
    members = {}
    for info in z.infolist():
        name = info.filename[:-4] if info.filename.endswith(".npy") else None
        if name is None or _kind(name) is None:
            raise CheckpointError(f"{p}: unexpected member {info.filename!r} (not part of a charnn model file)")
        if name in members:
            raise CheckpointError(f"{p}: member {info.filename!r} appears twice")
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{p}: member {info.filename!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise CheckpointError(f"{p}: member {info.filename!r} uses a compression charnn does not read "
                                  f"(only stored or deflated members)")
        members[name] = info
    headers = {name: npz_file.read_header(z, name, info) for name, info in members.items()}
    m = headers.pop("meta")
    if m.dtype != numpy.uint8 or len(m.shape) != 1:
        raise CheckpointError(f"{p}: malformed metadata")
    limit = min(MAX_META, 16 * file_size + (1 << 20))
    if m.nbytes > limit:
        raise CheckpointError(f"{p}: malformed metadata ({m.nbytes} bytes; a charnn model file's is at most {limit})")
    meta = _parse_meta(p, npz_file.read_array(z, m))
    config, vocab = _config(p, meta)
    shapes = _expected_shapes(p, config, meta, headers)
    arrays = {}
    for name, h in headers.items():
        if h.dtype.kind != "f" or h.dtype.itemsize not in (2, 4, 8):
            raise CheckpointError(f"{p}: array {name} has dtype {h.dtype}, expected floats")
        if h.shape != shapes[name]:
            raise CheckpointError(f"{p}: {_describe(name)} has shape {h.shape}, expected {shapes[name]}")
    for name, h in headers.items():
        arrays[name] = npz_file.read_array(z, h)
        _check_values(p, _describe(name), arrays[name], dtype)
    return _assemble(p, config, vocab, meta, arrays)


def _read_safetensors(p: Path, f, file_size: int, dtype: numpy.dtype) -> Checkpoint:
    """A model exported by charnn export (or made elsewhere under the same names), open as
    ``f``: see safetensors_file.py. Held to the same checks as a model file, in the same order:
    the header alone, the metadata (configuration and vocabulary), the layer count against the
    tensors held, each tensor's name and shape against the configuration, then the data, each
    tensor's values finite in ``dtype``."""
    try:
        metadata, entries = safetensors_file.read_header(f, file_size)
        meta = safetensors_file.meta_of(metadata, {name: e.shape for name, e in entries.items()})
    except safetensors_file.SafetensorsFileError as e:
        raise CheckpointError(f"{p}: {e}") from None
    config, vocab = _config(p, meta)
    _check_layers(p, config, len(entries), "tensor")
    expected = safetensors_file.torch_shapes(config)
    for name in expected:
        if name not in entries:
            raise CheckpointError(f"{p}: tensor {name} is missing (a {config.cell} of {config.layers} layers)")
    extra = set(entries) - set(expected)
    if extra:
        shown = sorted(extra)
        raise CheckpointError(f"{p}: unexpected tensors: {', '.join(n[:80] for n in shown[:5])}"
                              + (f" and {len(shown) - 5:,} more" if len(shown) > 5 else ""))
    for name, e in entries.items():
        if e.shape != expected[name]:
            raise CheckpointError(f"{p}: tensor {name} has shape {e.shape}, expected {expected[name]}")
    tensors = {}
    try:
        for name, e in entries.items():
            tensors[name] = safetensors_file.read_tensor(f, e)
            _check_values(p, f"tensor {name}", tensors[name], dtype)
        params = safetensors_file.from_torch(config, tensors)
    except safetensors_file.SafetensorsFileError as e:
        raise CheckpointError(f"{p}: {e}") from None
    for name, a in params.items():  # GRU's and others' b = bias_ih + bias_hh: a sum can overflow
        _check_values(p, _describe(f"param/{name}"), a, dtype)
    return Checkpoint(config=config, vocab=vocab, params=params, meta=meta)


_VALUES = 1 << 18  # values checked at a time (a float64 chunk cast to float32: 1 MiB)


def _check_values(p: Path, what: str, a: numpy.ndarray, dtype: numpy.dtype):
    """Refuse an array with a value that is not finite, in the file or once cast to ``dtype``
    (the dtype it will be computed in): 1e300 is a float64 but infinity as a float32."""
    flat = a.ravel(order="K")  # (a view, in the array's own memory order)
    narrower = dtype.itemsize < a.dtype.itemsize
    for i in range(0, flat.size, _VALUES):
        part = flat[i: i + _VALUES]
        if not numpy.isfinite(part).all():
            raise CheckpointError(f"{p}: {what} holds NaN or infinite values")
        if narrower:
            with numpy.errstate(over="ignore"):
                bad = ~numpy.isfinite(part.astype(dtype))
            if bad.any():
                raise CheckpointError(f"{p}: {what} holds {part[bad][0]:.4g}, beyond the range of {dtype.name} "
                                      f"(the dtype it is computed in)")


def check_values(p, ckpt: Checkpoint, dtype):
    """Refuse (CheckpointError) a checkpoint loaded with a wider dtype that holds a value not
    finite in ``dtype`` (a resumed run knows its dtype only from the file's metadata)."""
    dtype = numpy.dtype(dtype)
    for kind, arrays in (("param", ckpt.params), ("optim", ckpt.optim)):
        for name, a in arrays.items():
            _check_values(p, _describe(f"{kind}/{name}"), a, dtype)
    for layer, pair in enumerate(ckpt.state or ()):
        for part, a in zip("hc", pair):
            if a is not None:
                _check_values(p, _describe(f"state/{layer}/{part}"), a, dtype)


def _check_layers(p: Path, config: ModelConfig, held: int, what: str):
    """Refuse a configuration of more layers than the file holds arrays, before anything loops
    over its layers: a crafted count (say 10**12) must not make loading hang or grow."""
    if config.layers > held:
        raise CheckpointError(f"{p}: the config has {plural(config.layers, 'layer')} but the file holds only "
                              f"{plural(held, what)}")


def looks_like_model(path) -> bool:
    """Whether a regular file starts as a model file does (a zip, or a safetensors header)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return head[:4] == b"PK\x03\x04" or safetensors_file.looks_like(head)


def _describe(name: str) -> str:
    kind, _, rest = name.partition("/")
    return {"param": f"parameter {rest}", "optim": f"optimizer state {rest}",
            "state": f"the saved hidden state {rest}"}[kind]


def _parse_meta(p: Path, raw: numpy.ndarray) -> dict:
    try:
        meta = bounds.parse_json(raw)  # (its size was checked before it was read)
    except bounds.BoundsError as e:
        raise CheckpointError(f"{p}: malformed metadata (not UTF-8 JSON a charnn model file holds: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not a charnn model file")
    version = meta.get("version")
    if type(version) is not int:  # noqa: E721  (bool is an int; true is not a version)
        raise CheckpointError(f"{p}: malformed metadata (the format version is {json.dumps(version)[:40]}, "
                              f"not a whole number)")
    if version > VERSION:
        raise CheckpointError(f"{p}: made by a newer charnn (model format {version}; this charnn reads up to {VERSION}): upgrade charnn")
    if version not in READS:
        raise CheckpointError(f"{p}: unknown model format version {version} (this charnn reads "
                              f"{', '.join(map(str, sorted(READS)))})")
    return meta


def _config(p: Path, meta: dict):
    try:
        config = ModelConfig.from_json(meta.pop("config", None))
        vocab = Vocab.from_json(meta.pop("vocab", None))
    except (ModelError, VocabError, ValueError, TypeError, OverflowError) as e:
        # Not only ModelError/VocabError: a crafted value can fail inside a constructor's own
        # conversions (int("") or int(inf) in ModelConfig's class_bounds).
        raise CheckpointError(f"{p}: malformed metadata ({_one_line(e)})") from None
    if len(vocab) != config.vocab_size:
        raise CheckpointError(f"{p}: the vocabulary has {plural(len(vocab), 'token')} but the weights expect {config.vocab_size}")
    return config, vocab


def _expected_shapes(p: Path, config: ModelConfig, meta: dict, headers: dict) -> dict:
    """name -> the shape the configuration calls for, for every array member; refuses members
    it does not call for and parameters it calls for but the file lacks."""
    params = [n[6:] for n in headers if n.startswith("param/")]
    _check_layers(p, config, len(params), "parameter")  # before param_shapes(), which loops over the layers
    expected = config.param_shapes()
    for name in expected:
        if f"param/{name}" not in headers:
            raise CheckpointError(f"{p}: parameter {name} is missing")
    extra = set(params) - set(expected)
    if extra:
        raise CheckpointError(f"{p}: unexpected parameters: {', '.join(sorted(extra))}")
    shapes = {f"param/{k}": v for k, v in expected.items()}
    for name in headers:
        kind, _, rest = name.partition("/")
        if kind == "optim":
            pname, _, slot = rest.rpartition(".")
            if pname not in expected or slot not in OPTIM_SLOTS:
                raise CheckpointError(f"{p}: unexpected optimizer state {rest}")
            shapes[name] = expected[pname]
    states = [n for n in headers if n.startswith("state/")]
    if states:
        train = meta.get("train")
        batch = train.get("batch_size") if isinstance(train, dict) else None
        if type(batch) is not int or batch < 1:  # noqa: E721
            raise CheckpointError(f"{p}: holds a saved hidden state but no valid batch size for it")
        for layer in range(config.layers):
            for part in ("h", "c") if cells.get(config.cell).has_c else ("h",):
                name = f"state/{layer}/{part}"
                if name not in headers:
                    raise CheckpointError(f"{p}: the saved hidden state of layer {layer} is malformed ({part} is missing)")
                shapes[name] = (config.hidden, batch)
        if set(states) - set(shapes):
            raise CheckpointError(f"{p}: unexpected saved hidden state arrays")
    return shapes


def _assemble(p: Path, config: ModelConfig, vocab: Vocab, meta: dict, arrays: dict) -> Checkpoint:
    params, optim, state_parts = {}, {}, {}
    for name, a in arrays.items():
        kind, _, rest = name.partition("/")
        {"param": params, "optim": optim, "state": state_parts}[kind][rest] = a
    state = None
    if state_parts:
        state = [(state_parts[f"{layer}/h"], state_parts.get(f"{layer}/c")) for layer in range(config.layers)]
    return Checkpoint(config=config, vocab=vocab, params=params, meta=meta, optim=optim, state=state)


def load_model(path, backend=None):
    """(model, vocab, checkpoint) from a model file or run folder, its values checked in the
    backend's dtype (float32 without one)."""
    ckpt = load(path, backend.dtype if backend is not None else "float32")
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
    candidates = [Path(__file__).resolve().parents[2] / DEFAULT_REL,  # charnn/io/ -> the checkout
                  Path(sys.prefix) / "share" / "charnn" / DEFAULT_REL]
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError("no MODEL given and the bundled default model is not installed; "
                          "name a model file or run folder (e.g. one made by charnn train)")

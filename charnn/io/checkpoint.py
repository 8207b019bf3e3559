"""The model file: safe to load, versioned, written atomically.

A model file is a NumPy ``.npz`` (a zip of ``.npy`` arrays) read with ``allow_pickle=False``, so
loading one never runs code: an array of Python objects is refused. It holds

    meta           uint8   UTF-8 JSON: format name and version, model config, vocabulary,
                           training config and progress (step, data position, RNG state, ...)
    param/NAME     float   each model parameter (names as in model.py), on the host
    optim/NAME     float   optimizer state, in "last" checkpoints only (for exact resume)
    state/L/h|c    float   the carried hidden state (H, N), in "last" checkpoints only, where
                           N is the metadata's train.batch_size

Loading reads nothing the configuration does not call for: the zip directory and metadata are
size-capped, a name outside this table is refused unread, and each array's dtype, shape and
byte count (in its .npy header and the zip directory) are checked before its data is inflated.
Only stored and deflated members are read, and only the format versions in ``READS``.

The same file serves CPU and GPU: arrays are stored as host arrays and moved on load.
Saving writes a temporary file in the target folder, fsyncs it and renames it over the
target, so a crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import codecs
import io
import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy
from numpy.lib import format as npy_format

from . import safetensors_file
from .fileio import atomic_write_bytes  # noqa: F401  (re-exported: training and tests use it)
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
    """Read and validate a model file without unpickling anything, and without inflating
    anything the file's configuration does not call for.

    The zip directory is read first (its size capped), then each member's name and ``.npy``
    header; then the metadata (its size capped), whose configuration says which arrays the
    file must hold; each array's name, dtype, shape and the byte count the zip directory
    declares are checked against it before its data is read. So no file, however crafted,
    costs much more memory or time than the honest model it claims to be.

    Raises:
        CheckpointError: naming the path and what is wrong (not a model file, truncated,
            unknown or newer format version, pickled objects, members or shapes that do not
            match the configuration, ...).
    """
    p = resolve(path)
    try:
        f = _CappedFile(p)
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read: {e.strerror or e}") from None
    with f:
        try:
            head = f.read(9)
            if head[:4] != b"PK\x03\x04":
                if safetensors_file.looks_like(head):
                    return _read_safetensors(p)
                raise CheckpointError(f"{p}: not a charnn model file")
            f.seek(0)
            f.cap = MAX_DIRECTORY
            with zipfile.ZipFile(f) as z:
                f.cap = None
                return _read(p, z, os.fstat(f.fileno()).st_size)
        except CheckpointError:
            raise
        except _TooLarge:
            raise CheckpointError(f"{p}: not a charnn model file (its zip directory is over "
                                  f"{MAX_DIRECTORY >> 20} MiB)") from None
        except Exception as e:
            # The bytes are untrusted: zipfile, zlib and NumPy's header parser can raise many
            # types (BadZipFile, EOFError, zlib.error, ValueError, RecursionError, ...).
            raise CheckpointError(f"{p}: not a charnn model file or truncated "
                                  f"({type(e).__name__}: {_one_line(e)})") from None


# Limits on what a file may make the loader read before its configuration is known. A 2-layer
# LSTM's last.npz has 31 members and a directory of about 2 KB; the metadata is mostly the
# vocabulary (a million words take about 10 MB of JSON).
MAX_DIRECTORY = 1 << 20  # bytes of zip central directory (about 15,000 members)
MAX_HEADER = 4096  # bytes of one .npy header (NumPy writes 128)
MAX_META_CONTAINERS = 10_000  # lists and objects in the metadata JSON (see _parse_meta)
# A JSON string literal, as an unrolled loop: (?:[^"\\]|\\.)* kept a backtracking frame per
# character (80 MB for a 512 KB string); this consumes runs of plain characters at once.
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
MAX_META = 64 << 20  # bytes of metadata JSON, and at most 1 MiB more than 16x the file's size
OPTIM_SLOTS = frozenset(s for cls in (Adagrad, Adam, RMSprop) for s in cls.slots)
_CHUNK = 1 << 20  # bytes read (and inflated) at a time
_NPY_MAGIC = b"\x93NUMPY"


class _TooLarge(Exception):
    pass


class _CappedFile(io.FileIO):
    """A file whose reads fail while ``cap`` is set and a read asks for more: zipfile reads the
    whole central directory in one call, whatever size the end record claims."""

    cap = None

    def read(self, n=-1):
        if self.cap is not None:
            want = n if n is not None and n >= 0 else os.fstat(self.fileno()).st_size - self.tell()
            if want > self.cap:
                raise _TooLarge
        return super().read(n)


@dataclass
class _Member:
    info: zipfile.ZipInfo
    dtype: numpy.dtype
    shape: tuple
    fortran: bool
    offset: int  # bytes of magic and header before the data

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _one_line(e) -> str:
    return " ".join(str(e).split())[:200]


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


def _header(p: Path, z: zipfile.ZipFile, name: str, info: zipfile.ZipInfo) -> _Member:
    """The .npy header of a member, read without reading its data."""
    with z.open(info) as f:
        start = f.read(len(_NPY_MAGIC) + 2)
        if len(start) < len(_NPY_MAGIC) + 2 or not start.startswith(_NPY_MAGIC):
            raise CheckpointError(f"{p}: not a valid model file (member {name!r} is not a NumPy array)")
        major = start[-2]
        if major not in (1, 2):
            raise CheckpointError(f"{p}: member {name!r} is a .npy file of version {major}, which charnn does not read")
        size_bytes = f.read(2 if major == 1 else 4)
        length = int.from_bytes(size_bytes, "little")
        if len(size_bytes) < (2 if major == 1 else 4) or length > MAX_HEADER:
            raise CheckpointError(f"{p}: member {name!r} has a malformed .npy header")
        text = f.read(length)
    if len(text) < length:
        raise CheckpointError(f"{p}: member {name!r} is truncated")
    fp = io.BytesIO(start + size_bytes + text)
    npy_format.read_magic(fp)
    reader = npy_format.read_array_header_1_0 if major == 1 else npy_format.read_array_header_2_0
    try:
        shape, fortran, dtype = reader(fp, max_header_size=MAX_HEADER)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError, OverflowError) as e:
        raise CheckpointError(f"{p}: member {name!r} has a malformed .npy header ({_one_line(e)})") from None
    if dtype.hasobject:
        raise CheckpointError(f"{p}: refused: the file holds pickled Python objects, which charnn never loads")
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise CheckpointError(f"{p}: member {name!r} declares a negative shape {shape}")
    m = _Member(info, dtype, shape, fortran, len(start) + len(size_bytes) + length)
    if m.offset + m.nbytes != info.file_size:
        # What the header declares and what the zip directory declares must agree, so the
        # data read below is exactly the size that was checked.
        raise CheckpointError(f"{p}: member {name!r} is malformed (its header declares {m.nbytes} bytes of data, "
                              f"the zip directory {info.file_size - m.offset})")
    return m


def _read_array(z: zipfile.ZipFile, m: _Member) -> numpy.ndarray:
    """The member's data: exactly the checked byte count, read a chunk at a time (the zip's
    checksum is verified as the last chunk arrives)."""
    a = numpy.empty(m.shape[::-1] if m.fortran else m.shape, dtype=m.dtype)
    view = memoryview(a.reshape(-1).view(numpy.uint8)) if a.size else memoryview(b"")
    with z.open(m.info) as f:
        f.read(m.offset)
        pos = 0
        while pos < m.nbytes:
            chunk = f.read(min(_CHUNK, m.nbytes - pos))
            if not chunk:
                raise EOFError(f"member {m.info.filename!r} ends after {pos} of {m.nbytes} bytes")
            view[pos: pos + len(chunk)] = chunk
            pos += len(chunk)
        f.read(1)  # at the end: makes zipfile check the CRC even for an empty array
    return a.T if m.fortran else a


def _read(p: Path, z: zipfile.ZipFile, file_size: int) -> Checkpoint:
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
    headers = {name: _header(p, z, name, info) for name, info in members.items()}
    m = headers.pop("meta")
    if m.dtype != numpy.uint8 or len(m.shape) != 1:
        raise CheckpointError(f"{p}: malformed metadata")
    limit = min(MAX_META, 16 * file_size + (1 << 20))
    if m.nbytes > limit:
        raise CheckpointError(f"{p}: malformed metadata ({m.nbytes} bytes; a charnn model file's is at most {limit})")
    meta = _parse_meta(p, _read_array(z, m))
    config, vocab = _config(p, meta)
    shapes = _expected_shapes(p, config, meta, headers)
    arrays = {}
    for name, h in headers.items():
        if h.dtype.kind != "f" or h.dtype.itemsize not in (2, 4, 8):
            raise CheckpointError(f"{p}: array {name} has dtype {h.dtype}, expected floats")
        if h.shape != shapes[name]:
            raise CheckpointError(f"{p}: {_describe(name)} has shape {h.shape}, expected {shapes[name]}")
    for name, h in headers.items():
        arrays[name] = _read_array(z, h)
    return _assemble(p, config, vocab, meta, arrays)


def _read_safetensors(p: Path) -> Checkpoint:
    """A model exported by charnn export (or made elsewhere under the same names): see
    safetensors_file.py. Held to the same checks as a model file: configuration, vocabulary,
    each tensor's name and shape, finite values."""
    try:
        meta, tensors = safetensors_file.read(p)
    except ImportError:
        raise CheckpointError(f"{p}: reading safetensors files needs the safetensors package: "
                              f"pip install safetensors") from None
    except safetensors_file.SafetensorsFileError as e:
        raise CheckpointError(f"{p}: {e}") from None
    config, vocab = _config(p, meta)
    expected = safetensors_file.torch_shapes(config)
    for name in expected:
        if name not in tensors:
            raise CheckpointError(f"{p}: tensor {name} is missing (a {config.cell} of {config.layers} layers)")
    extra = set(tensors) - set(expected)
    if extra:
        raise CheckpointError(f"{p}: unexpected tensors: {', '.join(sorted(extra))}")
    for name, a in tensors.items():
        if a.shape != expected[name]:
            raise CheckpointError(f"{p}: tensor {name} has shape {a.shape}, expected {expected[name]}")
        if not numpy.isfinite(a).all():
            raise CheckpointError(f"{p}: tensor {name} holds NaN or infinite values")
    try:
        params = safetensors_file.from_torch(config, tensors)
    except safetensors_file.SafetensorsFileError as e:
        raise CheckpointError(f"{p}: {e}") from None
    return Checkpoint(config=config, vocab=vocab, params=params, meta=meta)


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
        text = codecs.utf_8_decode(raw, "strict", True)[0]
        # An empty list costs Python about 60 bytes for its two characters: metadata of
        # "[[],[],...]" would take 30 times its size in memory. A model file's metadata holds a
        # few dozen lists and objects (the bundled model's: 9), so their number is capped
        # before parsing (counted outside string literals).
        bare = _STRINGS.sub("", text)
        containers = bare.count("[") + bare.count("{")
        if containers > MAX_META_CONTAINERS:
            raise ValueError(f"{containers:,} lists and objects, more than a model file's metadata holds")
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:
        # ValueError: not UTF-8, not JSON, or an integer of more than 4,300 digits;
        # RecursionError: nesting deeper than the parser's stack.
        raise CheckpointError(f"{p}: malformed metadata (not UTF-8 JSON a charnn model file holds: "
                              f"{_one_line(e)[:80]})") from None
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
    if config.layers > len(params):
        # Checked before param_shapes(), which loops over the layers: a crafted layer count
        # (say 10**12) must not make loading hang.
        raise CheckpointError(f"{p}: the config has {plural(config.layers, 'layer')} but the file holds only {plural(len(params), 'parameter')}")
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
        if not numpy.isfinite(a).all():
            raise CheckpointError(f"{p}: {_describe(name)} holds NaN or infinite values")
        {"param": params, "optim": optim, "state": state_parts}[kind][rest] = a
    state = None
    if state_parts:
        state = [(state_parts[f"{layer}/h"], state_parts.get(f"{layer}/c")) for layer in range(config.layers)]
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
    candidates = [Path(__file__).resolve().parents[2] / DEFAULT_REL,  # charnn/io/ -> the checkout
                  Path(sys.prefix) / "share" / "charnn" / DEFAULT_REL]
    for c in candidates:
        if c.is_file():
            return c
    raise CheckpointError("no MODEL given and the bundled default model is not installed; "
                          "name a model file or run folder (e.g. one made by charnn train)")

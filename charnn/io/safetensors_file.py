"""Models as safetensors files under PyTorch's names, for the rest of the ecosystem (and back).

The names are those of PyTorch's word_language_model example (``embedding``, ``rnn``,
``decoder``), so the tensors load into ``nn.Embedding`` / ``nn.RNN|LSTM|GRU`` / ``nn.Linear``
with ``load_state_dict`` (the README shows how). With cells.py's notation, L a layer:

    charnn          PyTorch                  shape
    embed.W         embedding.weight         (V, E)    absent with one-hot input (E = 0): the RNN's
                                                       input is then a one-hot vector of size V
    rnn.L.Wx        rnn.weight_ih_lL         (G*H, In)
    rnn.L.Wh        rnn.weight_hh_lL         (G*H, H)
    rnn.L.b         rnn.bias_ih_lL           (G*H,)    charnn's b is bias_ih + bias_hh ...
    (zeros)         rnn.bias_hh_lL           (G*H,)    ... so bias_hh is exported as zeros,
    rnn.L.bhn                                          except the GRU's n rows: [0, 0, bhn]
    head.W          decoder.weight           (V, H)    tied models: a copy of embedding.weight
    head.b          decoder.bias             (V,)
    class.W         decoder_class.weight     (C, H)    class-factored softmax only: p(word) =
    class.b         decoder_class.bias       (C,)      p(class) p(word | class), see functional.py

Importing sums bias_ih and bias_hh back into b (keeping the GRU's hidden n bias as bhn), so a
model trained elsewhere with any split loads, and charnn's own export comes back bit for bit.

The file's metadata (strings, as safetensors requires) holds ``format`` = ``pt``,
``charnn.config`` (model.py's ModelConfig as JSON), ``charnn.vocab`` (vocab.py's JSON:
``{"level": "char", "tokens": [...]}``) and ``charnn.meta`` (the model file's training metadata:
options, progress, corpus digest, date). A file made elsewhere needs only ``charnn.vocab``; the
architecture is then read from the tensors' shapes (tanh for a vanilla RNN, full softmax).

The ``safetensors`` package (its NumPy API) writes the files: a format of raw tensors and a JSON
header, nothing in it runs on load. charnn reads them itself, bounded as a model file is
(checkpoint.py): the header (its size, lists, objects and tensor count capped; each tensor's
dtype, shape and data offsets checked against each other and the file's size) is read alone,
then the metadata (bounds.py's caps), and only then, once checkpoint.py has checked the names
and shapes against the configuration, the data, a tensor at a time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy

from ..nn import cells
from . import bounds
from .fileio import atomic_write_bytes

SUFFIX = ".safetensors"
META_CONFIG, META_VOCAB, META_TRAIN = "charnn.config", "charnn.vocab", "charnn.meta"
DTYPES = {"F16": numpy.float16, "F32": numpy.float32, "F64": numpy.float64}
# What a model file's metadata carries over (the RNG state only serves a resume, which needs last.npz).
KEPT_META = ("train", "progress", "corpus_sha256", "val_sha256", "created")
MAX_HEADER = bounds.MAX_META + (1 << 20)  # bytes of header: the metadata, as checkpoint.py's, and the entries
MAX_TENSORS = 15_000  # tensors in a header (a model file's zip directory holds about as many members)
MAX_DIMS = 8  # sizes in one tensor's shape (charnn's have one or two)
_CHUNK = 1 << 20  # bytes read at a time


class SafetensorsFileError(ValueError):
    """A safetensors file cannot be read as a charnn model (or written); the message has no path."""


def looks_like(head: bytes) -> bool:
    """Whether a file's first 9 bytes start a safetensors file: an 8-byte little-endian header
    length, then the header's JSON object."""
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= MAX_HEADER


def torch_names(config) -> dict:
    """charnn parameter name -> PyTorch name; rnn.L.bhn (GRU) goes into rnn.bias_hh_lL."""
    names = {"embed.W": "embedding.weight", "head.W": "decoder.weight", "head.b": "decoder.bias",
             "class.W": "decoder_class.weight", "class.b": "decoder_class.bias"}
    for layer in range(config.layers):
        names.update({f"rnn.{layer}.Wx": f"rnn.weight_ih_l{layer}", f"rnn.{layer}.Wh": f"rnn.weight_hh_l{layer}",
                      f"rnn.{layer}.b": f"rnn.bias_ih_l{layer}"})
    return names


def _in_order(tensors: dict) -> dict:
    """PyTorch's state_dict order: embedding, each layer's weight_ih, weight_hh, bias_ih, bias_hh, decoder."""
    def key(name):
        part, _, rest = name.partition(".")
        if part == "rnn":
            kind, _, layer = rest.rpartition("_l")
            return (1, int(layer), ("weight_ih", "weight_hh", "bias_ih", "bias_hh").index(kind))
        return ({"embedding": 0, "decoder": 2, "decoder_class": 3}[part], 0, rest != "weight")
    return {k: tensors[k] for k in sorted(tensors, key=key)}


def torch_shapes(config) -> dict:
    """PyTorch name -> shape, for every tensor a file of ``config`` holds."""
    names = torch_names(config)
    shapes = {names[k]: s for k, s in config.param_shapes().items() if k in names}
    G, H = config.gates, config.hidden
    for layer in range(config.layers):
        shapes[f"rnn.bias_hh_l{layer}"] = (G * H,)
    if config.tie:
        shapes["decoder.weight"] = (config.vocab_size, H)
    return _in_order(shapes)


def to_torch(config, params: dict) -> dict:
    """PyTorch name -> array, from charnn's parameters (host arrays)."""
    names = torch_names(config)
    out = {names[k]: numpy.ascontiguousarray(v) for k, v in params.items() if k in names}
    H = config.hidden
    for layer in range(config.layers):
        b = params[f"rnn.{layer}.b"]
        bias_hh = numpy.zeros_like(b)
        if f"rnn.{layer}.bhn" in params:  # GRU: the n gate's hidden bias sits inside r * (Wh h + bhn)
            bias_hh[2 * H:] = params[f"rnn.{layer}.bhn"]
        out[f"rnn.bias_hh_l{layer}"] = bias_hh
    if config.tie:
        out["decoder.weight"] = numpy.ascontiguousarray(params["embed.W"])
    return _in_order(out)


def from_torch(config, tensors: dict) -> dict:
    """charnn's parameters from PyTorch-named arrays of the shapes :func:`torch_shapes` gives."""
    names = torch_names(config)
    params = {k: tensors[t] for k, t in names.items() if k in config.param_shapes()}
    H = config.hidden
    extra = cells.get(config.cell).extra
    for layer in range(config.layers):
        bias_ih, bias_hh = tensors[f"rnn.bias_ih_l{layer}"], tensors[f"rnn.bias_hh_l{layer}"]
        with numpy.errstate(over="ignore"):  # (a sum that overflows is refused by the loader, naming it)
            if "bhn" in extra:  # GRU: only the r and z rows of bias_hh add to bias_ih
                b = bias_ih.copy()
                b[: 2 * H] += bias_hh[: 2 * H]
                params[f"rnn.{layer}.b"] = b
                params[f"rnn.{layer}.bhn"] = bias_hh[2 * H:].copy()
            else:
                params[f"rnn.{layer}.b"] = bias_ih + bias_hh
    if config.tie and not numpy.array_equal(tensors["decoder.weight"], tensors["embedding.weight"]):
        raise SafetensorsFileError("the configuration ties decoder.weight to embedding.weight, but they differ")
    return params


def save(path, config, vocab_json: dict, params: dict, meta: dict):
    """Write the model as a safetensors file, atomically (see fileio.py).

    Raises:
        OSError: the file cannot be written (the previous one, if any, is left as it was).
    """
    from safetensors.numpy import save as to_bytes

    metadata = {"format": "pt", META_CONFIG: json.dumps(config.to_json()), META_VOCAB: json.dumps(vocab_json),
                META_TRAIN: json.dumps({k: meta[k] for k in KEPT_META if k in meta})}
    atomic_write_bytes(path, to_bytes(to_torch(config, params), metadata=metadata))


@dataclass(frozen=True)
class Entry:
    """One tensor as the header declares it: its data is ``nbytes`` bytes at ``start`` in the file."""

    dtype: numpy.dtype  # little-endian float16, float32 or float64
    shape: tuple
    start: int
    nbytes: int


def read_header(f, file_size: int) -> tuple[dict, dict]:
    """(metadata, entries) of the safetensors file open as ``f`` (at its start, ``file_size``
    bytes long): the metadata as the header holds it (str -> str), the entries by name. Reads
    the header alone; its size, its lists and objects, its tensor count, and each tensor's
    dtype, shape and place in the file are checked before anything else is read or allocated.

    Raises:
        SafetensorsFileError: not a safetensors file, or a header charnn does not read.
    """
    head = f.read(8)
    n = int.from_bytes(head, "little") if len(head) == 8 else -1
    if n < 2 or n > file_size - 8:
        raise SafetensorsFileError(f"not a valid safetensors file (its header length {n:,} does not fit "
                                   f"the file's {file_size:,} bytes)")
    if n > MAX_HEADER:
        raise SafetensorsFileError(f"not a valid safetensors file (its header is over {MAX_HEADER >> 20} MiB)")
    raw = f.read(n)
    if len(raw) < n:
        raise SafetensorsFileError("not a valid safetensors file (truncated header)")
    try:
        # Each tensor's entry is an object and two lists; its values, at most four and its dims.
        header = bounds.parse_json(raw, MAX_HEADER, 3 * MAX_TENSORS + 2, (4 + MAX_DIMS) * MAX_TENSORS + 1000,
                                   unique_keys=True)
    except bounds.BoundsError as e:
        raise SafetensorsFileError(f"not a valid safetensors file (its header: {e})") from None
    del raw
    if not isinstance(header, dict):
        raise SafetensorsFileError("not a valid safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsFileError("not a valid safetensors file (__metadata__ is not an object of strings)")
    if len(header) > MAX_TENSORS:
        raise SafetensorsFileError(f"holds {len(header):,} tensors, more than a charnn model has")
    entries = {name: _entry(name, e) for name, e in header.items()}
    # The tensors' data must tile the rest of the file, as the safetensors package requires.
    data = n + 8
    at = 0
    for name, e in sorted(entries.items(), key=lambda ne: (ne[1].start, ne[1].nbytes)):
        if e.start != at:
            raise SafetensorsFileError(f"not a valid safetensors file (tensor {name}'s data starts at byte {e.start:,} "
                                       f"of the data, not {at:,})")
        at += e.nbytes
    if at != file_size - data:
        raise SafetensorsFileError(f"not a valid safetensors file (its tensors hold {at:,} bytes of data, "
                                   f"the file {file_size - data:,})")
    return metadata, {name: Entry(e.dtype, e.shape, e.start + data, e.nbytes) for name, e in entries.items()}


def _entry(name: str, e) -> Entry:
    """An entry with its start within the data, checked for kind and consistency."""
    if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsFileError(f"not a valid safetensors file (the entry of tensor {name[:80]} is not "
                                   f"{{dtype, shape, data_offsets}})")
    if not isinstance(e["dtype"], str) or e["dtype"] not in DTYPES:
        raise SafetensorsFileError(f"tensor {name} has dtype {str(e['dtype'])[:20]}, expected F16, F32 or F64")
    shape, offsets = e["shape"], e["data_offsets"]
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_count(d) for d in shape)):
        raise SafetensorsFileError(f"not a valid safetensors file (tensor {name}'s shape is not "
                                   f"a list of at most {MAX_DIMS} sizes)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(d) for d in offsets)
            and offsets[0] <= offsets[1]):
        raise SafetensorsFileError(f"not a valid safetensors file (tensor {name}'s data_offsets are not [begin, end])")
    dtype = numpy.dtype(DTYPES[e["dtype"]]).newbyteorder("<")
    nbytes = math.prod(shape) * dtype.itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise SafetensorsFileError(f"not a valid safetensors file (tensor {name}'s shape {tuple(shape)} takes "
                                   f"{nbytes:,} bytes, its data_offsets {offsets[1] - offsets[0]:,})")
    return Entry(dtype, tuple(shape), offsets[0], nbytes)


def _count(v) -> bool:
    return type(v) is int and v >= 0  # noqa: E721  (bool is an int; true is not a size)


def read_tensor(f, entry: Entry) -> numpy.ndarray:
    """The tensor's data from the open file, exactly ``entry.nbytes``, read a chunk at a time."""
    a = numpy.empty(entry.shape, dtype=entry.dtype)
    view = memoryview(a.reshape(-1).view(numpy.uint8)) if a.size else memoryview(b"")
    f.seek(entry.start)
    pos = 0
    while pos < entry.nbytes:
        got = f.readinto(view[pos: pos + _CHUNK])
        if not got:
            raise SafetensorsFileError(f"not a valid safetensors file (truncated: a tensor ends after {pos:,} "
                                       f"of {entry.nbytes:,} bytes)")
        pos += got
    return a


def meta_of(metadata: dict, shapes: dict) -> dict:
    """The header's metadata as a charnn model file's: its config, vocab and training fields (the
    config read from the ``shapes`` when the file has none), each parsed within bounds.py's caps.

    Raises:
        SafetensorsFileError: no vocabulary, or metadata that is not JSON a model file holds.
    """
    def parsed(key):
        try:
            return bounds.parse_json(metadata[key])
        except bounds.BoundsError as e:
            raise SafetensorsFileError(f"malformed metadata: {key} is not JSON a charnn model file holds ({e})") from None

    if META_VOCAB not in metadata:
        raise SafetensorsFileError(f"holds no vocabulary (metadata {META_VOCAB}: "
                                   '{"level": "char", "tokens": [...]}), so its token ids mean nothing to charnn')
    meta = parsed(META_TRAIN) if META_TRAIN in metadata else {}
    if not isinstance(meta, dict):
        raise SafetensorsFileError(f"malformed metadata: {META_TRAIN} is not a JSON object")
    meta = {k: meta[k] for k in KEPT_META if k in meta}
    meta["vocab"] = parsed(META_VOCAB)
    meta["config"] = parsed(META_CONFIG) if META_CONFIG in metadata else infer_config(shapes)
    return meta


def infer_config(shapes: dict) -> dict:
    """A ModelConfig's JSON from the tensors' shapes (a file without charnn.config): the cell from
    the gate count, the layers, hidden and embedding sizes; tanh, untied, full softmax."""
    try:
        G_H, H = shapes["rnn.weight_hh_l0"]
        V = shapes["decoder.bias"][0]
    except (KeyError, ValueError, IndexError):
        raise SafetensorsFileError("holds no rnn.weight_hh_l0 (G*H, H) and decoder.bias (V,), so its architecture "
                                   "cannot be read from it") from None
    by_gates = {}
    for name, c in cells.CELLS.items():  # the first cell of each gate count: rnn 1, lstm 4, gru 3
        by_gates.setdefault(c.gates, name)
    if H < 1 or G_H % H or G_H // H not in by_gates:
        raise SafetensorsFileError(f"rnn.weight_hh_l0 has shape {(G_H, H)}: not the gates of "
                                   f"{', '.join(f'{n} ({c.gates}H)' for n, c in cells.CELLS.items())}")
    layers = 0
    while f"rnn.weight_ih_l{layers}" in shapes:
        layers += 1
    embed = shapes["embedding.weight"][1] if len(shapes.get("embedding.weight", ())) == 2 else 0
    return {"vocab_size": V, "cell": by_gates[G_H // H], "layers": max(layers, 1), "hidden": H, "embed": embed}

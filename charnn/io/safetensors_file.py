"""Models as safetensors files under PyTorch's names, for the rest of the ecosystem (and back).

The names are those of PyTorch's word_language_model example (``embedding``, ``rnn``,
``decoder``), so the tensors load into ``nn.Embedding`` / ``nn.RNN|LSTM|GRU`` / ``nn.Linear``
with ``load_state_dict`` (docs/export.md shows how). With cells.py's notation, L a layer:

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

The ``safetensors`` package (its NumPy API) reads and writes the files: a format of raw tensors
and a JSON header, nothing in it runs on load.
"""

from __future__ import annotations

import json

import numpy

from ..nn import cells
from .fileio import atomic_write_bytes

SUFFIX = ".safetensors"
META_CONFIG, META_VOCAB, META_TRAIN = "charnn.config", "charnn.vocab", "charnn.meta"
DTYPES = {"F16": numpy.float16, "F32": numpy.float32, "F64": numpy.float64}
# What a model file's metadata carries over (the RNG state only serves a resume, which needs last.npz).
KEPT_META = ("train", "progress", "corpus_sha256", "val_sha256", "created")
MAX_META = 64 << 20  # bytes of metadata, as checkpoint.py's


class SafetensorsFileError(ValueError):
    """A safetensors file cannot be read as a charnn model (or written); the message has no path."""


def looks_like(head: bytes) -> bool:
    """Whether a file's first 9 bytes start a safetensors file: an 8-byte little-endian header
    length, then the header's JSON object."""
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= MAX_META + (1 << 20)


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


def read(path) -> tuple[dict, dict]:
    """(metadata, tensors) of a safetensors model file: the metadata as a charnn model file's
    (its config, vocab and training fields; the config read from the shapes when the file has
    none), the tensors by PyTorch name as host arrays, each of a float dtype.

    Raises:
        SafetensorsFileError: not a safetensors file, malformed metadata, no vocabulary, a tensor
            that is not float16/32/64 or a layout no charnn cell has.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            shapes = {}
            for name in f.keys():
                s = f.get_slice(name)
                if s.get_dtype() not in DTYPES:
                    raise SafetensorsFileError(f"tensor {name} has dtype {s.get_dtype()}, expected F16, F32 or F64")
                shapes[name] = tuple(s.get_shape())
            meta = _meta(metadata, shapes)
            tensors = {name: f.get_tensor(name) for name in shapes}
    except SafetensorError as e:
        raise SafetensorsFileError(f"not a valid safetensors file ({' '.join(str(e).split())[:160]})") from None
    return meta, tensors


def _meta(metadata: dict, shapes: dict) -> dict:
    def parsed(key):
        try:
            return json.loads(metadata[key])
        except (ValueError, RecursionError):
            raise SafetensorsFileError(f"malformed metadata: {key} is not JSON") from None

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

"""Fuzzing the model-file loader: random bytes, and valid files with bytes flipped, cut or
inserted (in the raw file, inside one zip member with a correct CRC, and in the metadata's
values; for a safetensors file in the raw file, in its header's JSON and in its metadata's
values) only ever raise CheckpointError, and never hang. (The vocabulary round trip on any
Unicode text is fuzzed in test_vocab.py; the memory a crafted file may cost, in
test_loader_bounds.py.)"""

from __future__ import annotations

import io
import json
import tempfile
import zipfile
from pathlib import Path

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charnn.io import checkpoint, safetensors_file
from charnn.backend import get_backend, to_host
from charnn.io.checkpoint import Checkpoint, CheckpointError
from charnn.nn.model import LanguageModel, ModelConfig
from charnn.nn.optim import make_optimizer
from charnn.io.vocab import Vocab

from archive_support import st_bytes, st_layout
from cli_support import memory_cap, time_limit

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def make_file(cell: str) -> bytes:
    """A small "last" checkpoint (parameters, optimizer state and carried state) as bytes."""
    backend = get_backend("cpu", "float64")
    vocab = Vocab.build_char("hello world\n")
    config = ModelConfig(vocab_size=len(vocab), cell=cell, layers=2, hidden=4, embed=3)
    model = LanguageModel.create(config, 0, backend)
    ids = numpy.array([[0, 1, 2], [3, 4, 5], [6, 7, 0]])
    _, cache, state = model.forward(ids[:2], ids[1:])
    grads, _ = model.backward(cache)
    opt = make_optimizer("adam", model.params)
    opt.step(grads)
    host_state = [(to_host(h), None if c is None else to_host(c)) for h, c in state]
    ckpt = Checkpoint(config, vocab, model.host_params(), {"progress": {"step": 1}, "train": {"batch_size": 3}}, opt.state_arrays(), host_state)
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(Path(d) / "m.npz", ckpt)
        return (Path(d) / "m.npz").read_bytes()


VALID = {cell: make_file(cell) for cell in ("lstm", "gru")}


def make_st(cell: str) -> tuple[dict, dict]:
    """(header, tensors) of the same model as a safetensors file (as export writes it)."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "m.npz").write_bytes(VALID[cell])
        ckpt = checkpoint.load(Path(d) / "m.npz")
    metadata = {"format": "pt", "charnn.config": json.dumps(ckpt.config.to_json()),
                "charnn.vocab": json.dumps(ckpt.vocab.to_json()), "charnn.meta": json.dumps({"progress": {"step": 1}})}
    tensors = safetensors_file.to_torch(ckpt.config, ckpt.params)
    return st_layout(tensors, metadata)


VALID_ST = {cell: make_st(cell) for cell in ("lstm", "gru")}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "model.npz"


def load_only_raises_checkpoint_error(path, data: bytes):
    path.write_bytes(data)
    with time_limit(5.0), memory_cap():
        try:
            ckpt = checkpoint.load(path)
        except CheckpointError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            return None
    return ckpt


def test_the_valid_files_load(scratch):
    for data in VALID.values():
        assert load_only_raises_checkpoint_error(scratch, data) is not None


@FUZZ
@given(data=st.binary(max_size=3000), zip_magic=st.booleans())
def test_random_bytes(scratch, data, zip_magic):
    load_only_raises_checkpoint_error(scratch, (b"PK\x03\x04" if zip_magic else b"") + data)


# (kind, position as a fraction of the length, bytes to insert or xor with)
EDITS = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert"]), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
                 min_size=1, max_size=4)


def apply(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, where, chunk in edits:
        i = min(int(where * len(b)), max(len(b) - 1, 0))
        if kind == "flip" and b:
            for j, x in enumerate(chunk[: len(b) - i]):
                b[i + j] ^= x or 0xFF
        elif kind == "cut":
            del b[i:]
        else:
            b[i:i] = chunk
    return bytes(b)


@FUZZ
@given(cell=st.sampled_from(sorted(VALID)), edits=EDITS)
def test_mutated_files(scratch, cell, edits):
    load_only_raises_checkpoint_error(scratch, apply(VALID[cell], edits))


@FUZZ
@given(cell=st.sampled_from(sorted(VALID)), member=st.integers(0, 100), edits=EDITS, in_header=st.booleans(),
       rename=st.booleans())
def test_mutated_members_with_valid_crc(scratch, cell, member, edits, in_header, rename):
    """Edits inside one .npy member (its header, where NumPy parses a Python literal, or its
    data), rezipped so the zip's checksums are right and NumPy really reads the edited bytes."""
    with zipfile.ZipFile(io.BytesIO(VALID[cell])) as z:
        members = {name: z.read(name) for name in z.namelist()}
    names = sorted(members)
    name = names[member % len(names)]
    data = members[name]
    if in_header:
        data = apply(data[:128], edits) + data[128:]
    else:
        data = data[:128] + apply(data[128:], edits)
    members[name] = data
    if rename:
        members[name[::-1]] = members.pop(name)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, d in members.items():
            z.writestr(n, d)
    load_only_raises_checkpoint_error(scratch, buf.getvalue())


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5)


def paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            yield from paths(v, prefix + (i,))


@FUZZ
@given(cell=st.sampled_from(sorted(VALID)), picks=st.lists(st.tuples(st.integers(0, 10**6), JSON_VALUES, st.booleans()),
                                                          min_size=1, max_size=3))
def test_mutated_metadata_values(scratch, cell, picks):
    """Any value of the metadata (config, vocabulary, format, version) replaced by any JSON
    value, or deleted."""
    with zipfile.ZipFile(io.BytesIO(VALID[cell])) as z:
        members = {name: z.read(name) for name in z.namelist()}
    arrays = {}
    for name, data in members.items():
        arrays[name[:-4]] = numpy.load(io.BytesIO(data), allow_pickle=False)
    meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
    for index, value, delete in picks:
        candidates = [p for p in paths(meta) if p and p[0] in ("config", "vocab", "format", "version")]
        if not candidates:
            break
        path = candidates[index % len(candidates)]
        parent = meta
        for key in path[:-1]:
            parent = parent[key]
        if delete and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    arrays["meta"] = numpy.frombuffer(json.dumps(meta).encode("utf-8"), dtype=numpy.uint8)
    buf = io.BytesIO()
    numpy.savez(buf, **arrays)
    load_only_raises_checkpoint_error(scratch, buf.getvalue())


# ----- what the fuzzing found, pinned -----

@pytest.mark.parametrize("bounds", [[""], ["x"], [float("inf")], [float("nan")]])
def test_unconvertible_class_bounds_are_a_checkpoint_error(scratch, bounds):
    with zipfile.ZipFile(io.BytesIO(VALID["lstm"])) as z:
        arrays = {name[:-4]: numpy.load(io.BytesIO(z.read(name)), allow_pickle=False) for name in z.namelist()}
    meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
    meta["config"]["class_bounds"] = bounds
    arrays["meta"] = numpy.frombuffer(json.dumps(meta).encode("utf-8"), dtype=numpy.uint8)
    buf = io.BytesIO()
    numpy.savez(buf, **arrays)
    assert load_only_raises_checkpoint_error(scratch, buf.getvalue()) is None


@pytest.mark.parametrize("bounds", [[""], [float("inf")]])
def test_model_config_from_json_raises_model_error(bounds):
    from charnn.nn.model import ModelError

    with pytest.raises(ModelError):
        ModelConfig.from_json({"vocab_size": 5, "class_bounds": bounds})


# ----- safetensors files -----

def test_the_valid_safetensors_files_load(scratch):
    for header, data in VALID_ST.values():
        assert load_only_raises_checkpoint_error(scratch, st_bytes(header, data)) is not None


@FUZZ
@given(data=st.binary(max_size=3000), length=st.integers(2, 4000))
def test_random_bytes_after_a_safetensors_start(scratch, data, length):
    load_only_raises_checkpoint_error(scratch, length.to_bytes(8, "little") + b"{" + data)


@FUZZ
@given(cell=st.sampled_from(sorted(VALID_ST)), edits=EDITS)
def test_mutated_safetensors_files(scratch, cell, edits):
    load_only_raises_checkpoint_error(scratch, apply(st_bytes(*VALID_ST[cell]), edits))


@FUZZ
@given(cell=st.sampled_from(sorted(VALID_ST)), edits=EDITS)
def test_mutated_safetensors_headers(scratch, cell, edits):
    """Bytes of the header's JSON edited, its length prefix kept true."""
    header, data = VALID_ST[cell]
    load_only_raises_checkpoint_error(scratch, st_bytes(apply(json.dumps(header).encode(), edits), data))


@FUZZ
@given(cell=st.sampled_from(sorted(VALID_ST)), picks=st.lists(st.tuples(st.integers(0, 10**6), JSON_VALUES, st.booleans()),
                                                             min_size=1, max_size=3))
def test_mutated_safetensors_header_values(scratch, cell, picks):
    """Any value of the header (a tensor's dtype, shape or offsets, the metadata's strings, or
    inside the config and vocabulary they hold) replaced by any JSON value, or deleted."""
    header, data = VALID_ST[cell]
    header = json.loads(json.dumps(header))
    md = header["__metadata__"]
    inner = {k: json.loads(md[k]) for k in ("charnn.config", "charnn.vocab")}
    for index, value, delete in picks:
        candidates = [("header",) + p for p in paths(header) if p] + [("inner",) + p for p in paths(inner) if len(p) > 1]
        where, *path = candidates[index % len(candidates)]
        parent = header if where == "header" else inner
        for key in path[:-1]:
            parent = parent[key]
        if delete and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    if isinstance(header.get("__metadata__"), dict):
        for k, v in inner.items():
            if k in header["__metadata__"]:
                header["__metadata__"][k] = json.dumps(v)
    load_only_raises_checkpoint_error(scratch, st_bytes(header, data))

"""The model-file loader's cost is bounded by the model the file claims to be.

Archives are built byte by byte (archive_support.py), so a member can declare any .npy shape
and dtype, the zip directory any size, and the data can be a deflate stream that inflates to
far more than either declares. Whatever the file, loading it
either refuses it with a one-line CheckpointError naming the file, or returns exactly what an
honest file held; and the memory it takes (tracemalloc's peak: NumPy's arrays, zlib's output
and Python's objects are all traced) stays under twice what the honest model of that
configuration needs, plus a few MiB.
"""

from __future__ import annotations

import json
import math
import struct
import tracemalloc

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charnn.io import checkpoint
from charnn.io.checkpoint import CheckpointError
from charnn.nn.model import ModelConfig, init_params
from charnn.io.vocab import Vocab

from archive_support import BOMB_BYTES, MiB, Member, npy, npy_header, raw_header, zip_bytes
from cli_support import checkpoint_arrays, time_limit

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
SLACK = 6 * MiB  # read chunks, zlib's buffers, the zip directory, Python objects


# ----- an honest model, and what it costs -----

def honest(cell, layers, hidden, embed, chars, batch, last):
    vocab = Vocab.build_char(chars)
    config = ModelConfig(vocab_size=len(vocab), cell=cell, layers=layers, hidden=hidden, embed=embed)
    params = {k: numpy.asarray(v, dtype=numpy.float32) for k, v in init_params(config, 0).items()}
    meta = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "config": config.to_json(),
            "vocab": vocab.to_json(), "train": {"batch_size": batch}, "progress": {"step": 3}}
    arrays = {f"param/{k}": v for k, v in params.items()}
    if last:
        for k, v in params.items():
            arrays[f"optim/{k}.m"] = v * 0.5
            arrays[f"optim/{k}.v"] = v * v
        for layer in range(layers):
            arrays[f"state/{layer}/h"] = numpy.full((hidden, batch), 0.25, dtype=numpy.float32)
            if cell == "lstm":
                arrays[f"state/{layer}/c"] = numpy.full((hidden, batch), -0.5, dtype=numpy.float32)
    return config, meta, arrays


def honest_bytes(config: ModelConfig, batch: int) -> int:
    """What a full checkpoint of ``config`` takes in float64: parameters, three optimizer slots
    each, and the carried state."""
    n = config.n_params()
    return 8 * (4 * n + 2 * config.layers * config.hidden * batch)


def meta_member(meta, method=0) -> Member:
    raw = json.dumps(meta).encode("utf-8")
    return Member("meta.npy", npy_header("|u1", (len(raw),)) + raw, method)


def load_measured(path, data: bytes):
    """(checkpoint or None, peak bytes) of loading ``data``; any error but a one-line
    CheckpointError naming the file fails the test."""
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with time_limit(20):
            try:
                ckpt = checkpoint.load(path)
            except CheckpointError as e:
                msg = str(e)
                assert str(path) in msg and "\n" not in msg, msg
                ckpt = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return ckpt, peak


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("bounds") / "model.npz"


# ----- the fuzz -----

SHAPE_DIMS = st.sampled_from([0, 1, 2, 3, 7, 2**20, 2**31, 2**40, 10**15])
DESCRS = st.sampled_from(["<f4", "<f8", "<f2", ">f8", "<i8", "|u1", "|O", "|V8", "<c16", "<f16", "<U4"])
EDITS = st.lists(st.tuples(
    st.sampled_from(["shape", "dtype", "dirsize", "bomb", "drop", "extra", "deflate", "bzip2", "crc", "fortran",
                     "header"]),
    st.integers(0, 10**6), st.lists(SHAPE_DIMS, max_size=3), DESCRS,
    st.sampled_from([0, -1, 1, 2**32 + 7, 2**62])), max_size=3)
EXTRA_NAMES = st.sampled_from(["junk.npy", "../../escape.npy", "param/ghost.npy", "optim/head.b.zz.npy",
                               "state/9/h.npy", "state/0/x.npy", "meta", "/abs.npy", "param/head.b"])
META_EDITS = st.sampled_from(["none", "version0", "version-1", "versiontrue", "version2", "bigint", "deep",
                              "pad", "padbig", "batch0", "batchbig", "hidden", "layers", "notutf8"])


def edit_meta(meta: dict, kind: str):
    """The metadata member for ``kind`` (and whether it leaves the file loadable)."""
    if kind.startswith("version"):
        meta["version"] = {"0": 0, "-1": -1, "true": True, "2": 2}[kind[7:]]
    elif kind == "bigint":
        raw = json.dumps(meta)[:-1] + ', "step": ' + "9" * 5000 + "}"
        return Member("meta.npy", npy_header("|u1", (len(raw),)) + raw.encode()), False
    elif kind == "deep":
        raw = json.dumps(meta)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
        return Member("meta.npy", npy_header("|u1", (len(raw),)) + raw.encode(), 8), False
    elif kind == "notutf8":
        raw = json.dumps(meta).encode()[:-1] + b', "x": "\xff\xfe"}'
        return Member("meta.npy", npy_header("|u1", (len(raw),)) + raw), False
    elif kind == "pad":
        meta["notes"] = "x" * (MiB // 2)
        return meta_member(meta, 8), True
    elif kind == "padbig":  # 300 MiB of metadata in a few hundred KB
        head = json.dumps(meta)[:-1] + ', "notes": "'
        return Member.bomb("meta.npy", npy_header("|u1", (len(head) + BOMB_BYTES,)) + head.encode()), False
    elif kind == "batch0":
        meta["train"]["batch_size"] = 0
    elif kind == "batchbig":
        meta["train"]["batch_size"] = 10**9
    elif kind == "hidden":
        meta["config"]["hidden"] *= 1000
    elif kind == "layers":
        meta["config"]["layers"] = 10**12
    return meta_member(meta), kind == "none"


def edit_member(members: list, arrays: dict, edit, extra_name: str):
    kind, pick, dims, descr, size = edit
    if kind == "extra":
        members.append(Member.bomb(extra_name, npy_header("<f8", (BOMB_BYTES // 8,)), size=2**31 + 17))
        return
    i = 1 + pick % (len(members) - 1) if len(members) > 1 else 0
    m = members[i]
    name = m.name[:-4]
    a = arrays.get(name)
    if kind == "drop":
        members.pop(i)
    elif kind in ("shape", "dtype", "fortran", "header") and a is not None:
        shape = tuple(dims) if kind == "shape" else a.shape
        if kind == "header":
            head = raw_header("{'descr': '<f4', 'fortran_order': False, 'shape': (" + "9" * 4000 + ",), }"
                              if pick % 2 else "(" * 3000 + ")" * 3000)
        else:
            head = npy_header(descr if kind == "dtype" else a.dtype.str, shape, fortran=kind == "fortran")
        n = math.prod(shape) * numpy.dtype(descr if kind == "dtype" and descr not in ("|O",) else "<f4").itemsize
        if n <= 4 * MiB and kind != "header":
            members[i] = Member(m.name, head + bytes(n))
            if kind != "dtype" or numpy.dtype(descr).kind == "f":
                arrays[name] = numpy.zeros(shape, dtype=descr if kind == "dtype" else a.dtype)
        else:  # a shape too big to write: deflated zeros that inflate to 256 MiB
            members[i] = Member.bomb(m.name, head, size=len(head) + n if kind != "header" else None)
    elif kind == "dirsize":
        m.size = size if size >= 0 else m.size + size
    elif kind == "bomb" and a is not None:
        # The right header and directory size, but a stream that goes on inflating past them.
        head = npy_header(a.dtype.str, a.shape)
        members[i] = Member.bomb(m.name, head, size=len(head) + a.nbytes)
        arrays[name] = numpy.zeros_like(a)  # what the declared bytes hold
    elif kind == "deflate":
        plain = npy(a) if a is not None else None
        if plain is not None:
            members[i] = Member(m.name, plain, 8)
    elif kind == "bzip2" and a is not None:
        members[i] = Member(m.name, npy(a), 12)
    elif kind == "crc":
        m.crc ^= 1 + pick


@FUZZ
@given(cell=st.sampled_from(["rnn", "lstm", "gru"]), layers=st.integers(1, 2), hidden=st.integers(1, 6),
       embed=st.integers(0, 3), chars=st.text("abcdefghij \n", min_size=2, max_size=10).filter(lambda s: len(set(s)) >= 2),
       batch=st.integers(1, 4), last=st.booleans(), meta_edit=META_EDITS, edits=EDITS, extra_name=EXTRA_NAMES,
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_any_archive_is_refused_cheaply_or_loads_exactly(scratch, cell, layers, hidden, embed, chars, batch, last,
                                                          meta_edit, edits, extra_name, cut):
    config, meta, arrays = honest(cell, layers, hidden, embed, chars, batch, last)
    meta_m, loadable = edit_meta(meta, meta_edit)
    members = [meta_m] + [Member(f"{k}.npy", npy(v)) for k, v in arrays.items()]
    for edit in edits:
        edit_member(members, arrays, edit, extra_name)  # updates arrays where it writes other values
    data = zip_bytes(members)
    if cut is not None:
        data = data[: int(cut * len(data))]
    ckpt, peak = load_measured(scratch, data)
    bound = 2 * honest_bytes(config, batch) + SLACK + (4 * MiB if meta_edit == "pad" else 0)
    assert peak < bound, (peak, bound)
    if ckpt is None:
        return
    assert ckpt.config == config and ckpt.vocab.tokens == Vocab.build_char(chars).tokens
    loaded = checkpoint_arrays(ckpt)
    assert loaded.keys() <= arrays.keys()
    assert {k for k in arrays if k.startswith("param/")} <= loaded.keys()
    for k, v in loaded.items():
        numpy.testing.assert_array_equal(v, arrays[k], err_msg=k)


def test_the_fuzzed_files_load_when_unedited(scratch):
    """The fuzz's own archives are honest model files: they load, whole, and cheaply."""
    for cell in ("rnn", "lstm", "gru"):
        for method in (0, 8):
            config, meta, arrays = honest(cell, 2, 5, 3, "abc de\n", 3, True)
            data = zip_bytes([meta_member(meta, method)] + [Member(f"{k}.npy", npy(v), method) for k, v in arrays.items()])
            ckpt, peak = load_measured(scratch, data)
            assert ckpt is not None and ckpt.config == config and len(ckpt.optim) == 2 * len(ckpt.params)
            assert peak < 2 * honest_bytes(config, 3) + SLACK


# ----- the cases, pinned -----

def refused_cheaply(path, data, *words, limit=SLACK):
    ckpt, peak = load_measured(path, data)
    assert ckpt is None
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert peak < limit, peak
    return str(e.value)


def small_model():
    config, meta, arrays = honest("lstm", 1, 4, 2, "abcd\n", 2, True)
    return config, meta, [meta_member(meta)] + [Member(f"{k}.npy", npy(v)) for k, v in arrays.items()], arrays


def test_member_that_inflates_to_gigabytes(scratch):
    """head.W declares (V, 2**28) floats (4 GiB, ZIP64 sizes) in a file of a few hundred KB."""
    config, meta, members, _ = small_model()
    head = npy_header("<f4", (config.vocab_size, 2**28))
    members = [Member.bomb(m.name, head, size=len(head) + 4 * config.vocab_size * 2**28)
               if m.name == "param/head.W.npy" else m for m in members]
    refused_cheaply(scratch, zip_bytes(members), "head.W", "shape")


def test_directory_size_that_lies(scratch):
    """The header says (V, H); the directory says 4 GiB; the stream inflates to 256 MiB."""
    config, meta, members, arrays = small_model()
    a = arrays["param/head.W"]
    members = [Member.bomb(m.name, npy_header(a.dtype.str, a.shape), size=2**32 + 5)
               if m.name == "param/head.W.npy" else m for m in members]
    refused_cheaply(scratch, zip_bytes(members), "head.W", "zip directory")


def test_unknown_member_is_refused_unread(scratch):
    _, _, members, _ = small_model()
    members.append(Member.bomb("junk/blob.npy", npy_header("<f8", (2**28,)), size=2**31))
    refused_cheaply(scratch, zip_bytes(members), "unexpected member", "junk/blob.npy", limit=MiB)


def test_metadata_is_capped(scratch):
    """A metadata string that inflates to 256 MiB is refused before it is inflated."""
    _, meta, members, _ = small_model()
    head = json.dumps(meta)[:-1] + ', "notes": "'
    members[0] = Member.bomb("meta.npy", npy_header("|u1", (len(head) + BOMB_BYTES,)) + head.encode())
    refused_cheaply(scratch, zip_bytes(members), "metadata", limit=MiB)


def test_huge_npy_header_length_is_not_read(scratch):
    """A version 2 header may declare a length up to 4 GiB; NumPy would read all of it."""
    _, _, members, _ = small_model()
    head = b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31)
    members[1] = Member.bomb(members[1].name, head)
    refused_cheaply(scratch, zip_bytes(members), "header", limit=MiB)


def test_zip_directory_is_capped(scratch):
    _, _, members, _ = small_model()
    members += [Member(f"param/x{i:06d}.npy", b"") for i in range(30_000)]
    refused_cheaply(scratch, zip_bytes(members), "zip directory", limit=2 * MiB)


@pytest.mark.parametrize("method", [12, 14])
def test_only_stored_and_deflated_members(scratch, method):
    """bzip2 and LZMA inflate a few KB to gigabytes in one call that zipfile does not bound."""
    _, _, members, _ = small_model()
    members[1].method = method
    refused_cheaply(scratch, zip_bytes(members), "compression", limit=MiB)


def test_duplicate_member(scratch):
    _, _, members, _ = small_model()
    refused_cheaply(scratch, zip_bytes(members + [members[2]]), "twice", limit=MiB)


@pytest.mark.parametrize("version, words", [(0, "unknown model format version 0"),
                                            (-1, "unknown model format version -1"),
                                            (True, "format version is true"), (1.0, "format version is 1.0"),
                                            ("1", 'format version is "1"'), (None, "format version is null")])
def test_format_versions_this_code_does_not_read(scratch, version, words):
    _, meta, members, _ = small_model()
    meta["version"] = version
    members[0] = meta_member(meta)
    refused_cheaply(scratch, zip_bytes(members), words, limit=MiB)


@pytest.mark.parametrize("tail", ['"step": ' + "9" * 5000, '"x": ' + "[" * 100_000 + "]" * 100_000,
                                  '"x": ' + '{"a": ' * 50_000 + "1" + "}" * 50_000])
def test_pathological_json(scratch, tail):
    _, meta, members, _ = small_model()
    raw = (json.dumps(meta)[:-1] + ", " + tail + "}").encode()
    members[0] = Member("meta.npy", npy_header("|u1", (len(raw),)) + raw)
    refused_cheaply(scratch, zip_bytes(members), "malformed metadata")


def test_compressed_model_loads(scratch, tmp_path):
    """numpy.savez_compressed of a charnn model (deflated members) is an honest file."""
    _, meta, _, arrays = small_model()
    raw = numpy.frombuffer(json.dumps(meta).encode(), dtype=numpy.uint8)
    path = tmp_path / "c.npz"
    numpy.savez_compressed(path, meta=raw, **arrays)
    ckpt = checkpoint.load(path)
    numpy.testing.assert_array_equal(ckpt.params["head.W"], arrays["param/head.W"])
    numpy.testing.assert_array_equal(ckpt.state[0][1], arrays["state/0/c"])


@pytest.mark.parametrize("batch", [0, 5, "2", None])
def test_state_batch_must_match_the_metadata(scratch, batch):
    _, meta, members, _ = small_model()
    meta["train"]["batch_size"] = batch
    members[0] = meta_member(meta)
    refused_cheaply(scratch, zip_bytes(members), "state", limit=MiB)


def test_metadata_of_many_empty_containers_is_refused_before_parsing(scratch):
    """300,000 empty lists (900 KB of JSON, within the size cap for this file; a few KB
    deflated) would take about 20 MB as Python objects: their number is capped before
    json.loads builds them. Brackets inside strings (a vocabulary of "[" and "{" tokens) do
    not count."""
    _, meta, members, _ = small_model()
    raw = (json.dumps(meta)[:-1] + ', "x": [' + "[]," * 300_000 + "[]]}").encode()
    members[0] = Member("meta.npy", npy_header("|u1", (len(raw),)) + raw, 8)
    _, peak = load_measured(scratch, zip_bytes(members))
    assert peak < 3 * len(raw) + SLACK
    refused_cheaply(scratch, zip_bytes(members), "lists and objects")
    _, meta, members, _ = small_model()
    meta["notes"] = ["[{" * 20_000]  # inside a string: not containers
    members[0] = meta_member(meta)
    ckpt, _ = load_measured(scratch, zip_bytes(members))
    assert ckpt is not None

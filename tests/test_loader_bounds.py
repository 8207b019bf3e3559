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

from charnn.io import checkpoint, safetensors_file
from charnn.io.checkpoint import CheckpointError
from charnn.nn.model import ModelConfig, init_params
from charnn.io.vocab import Vocab

from archive_support import BOMB_BYTES, MiB, Member, npy, npy_header, raw_header, st_bytes, st_layout, zip_bytes
from cli_support import checkpoint_arrays, memory_cap, time_limit

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
        with time_limit(20), memory_cap():
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
    with time_limit(20), memory_cap(), pytest.raises(CheckpointError) as e:
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


# ----- safetensors files: the same bounds -----

def honest_st(cell, layers, hidden, embed, chars, with_config=True):
    """(config, vocab, tensors, metadata) of an honest safetensors model file, as export writes it."""
    config, meta, arrays = honest(cell, layers, hidden, embed, chars, 1, False)
    params = {k[6:]: v for k, v in arrays.items()}
    rng = numpy.random.default_rng(layers * 10 + hidden)
    for k, v in params.items():  # non-zero biases: the bias mapping then matters
        if k.endswith((".b", ".bhn")):
            v += rng.normal(0, 0.5, v.shape).astype(v.dtype)
    tensors = safetensors_file.to_torch(config, params)
    metadata = {"format": "pt", "charnn.vocab": json.dumps(meta["vocab"]),
                "charnn.meta": json.dumps({"progress": {"step": 3}})}
    if with_config:
        metadata["charnn.config"] = json.dumps(config.to_json())
    return config, Vocab.from_json(meta["vocab"]), tensors, metadata


@pytest.fixture(scope="module")
def st_scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("bounds") / "model.safetensors"


ST_DESCRS = st.sampled_from(["F16", "F32", "F64", "I32", "BF16", "U8", "F128", 7, None, ["F32"]])
ST_VALUES = st.sampled_from([0, -1, 1, 7, 2**32 + 7, 2**62, -(2**70), 1.5, True, None, "8"])
ST_EDITS = st.lists(st.tuples(
    st.sampled_from(["dtype", "shape", "offsets", "drop", "extra", "f64", "value", "length", "pad", "cut", "dup",
                     "entry"]),
    st.integers(0, 10**6), st.lists(SHAPE_DIMS, max_size=3), ST_DESCRS, ST_VALUES,
    st.sampled_from([1e300, -1e300, float("nan"), float("inf"), 3e38, 0.25])), max_size=3)
ST_META_EDITS = st.sampled_from(["none", "layers", "hidden", "vocab_size", "novocab", "noconfig", "deep", "containers",
                                 "pad", "notjson", "metalist", "bigint", "notstring", "metadata_list", "tokens"])


def edit_st_meta(config: ModelConfig, metadata: dict, kind: str) -> tuple[dict | None, bool]:
    """(the header's __metadata__ for ``kind``, whether it leaves the file loadable)."""
    md = dict(metadata)
    cfg = config.to_json()
    if kind in ("layers", "hidden", "vocab_size"):
        cfg[kind] = {"layers": 10**9, "hidden": config.hidden * 1000, "vocab_size": 10**12}[kind]
        md["charnn.config"] = json.dumps(cfg)
    elif kind == "novocab":
        del md["charnn.vocab"]
    elif kind == "noconfig":
        del md["charnn.config"]  # the architecture is then read from the shapes
        return md, True
    elif kind == "deep":
        md["charnn.vocab"] = "[" * 100_000 + "]" * 100_000
    elif kind == "containers":
        md["charnn.meta"] = "[" + "[]," * 30_000 + "[]]"
    elif kind == "pad":
        md["charnn.meta"] = json.dumps({"progress": {"step": 3}, "notes": "x" * (MiB // 2)})
        return md, True
    elif kind == "notjson":
        md["charnn.config"] = "{"
    elif kind == "metalist":
        md["charnn.meta"] = "[1, 2]"
    elif kind == "bigint":
        md["charnn.meta"] = '{"step": ' + "9" * 5000 + "}"
    elif kind == "notstring":
        md["charnn.config"] = cfg  # an object where safetensors holds strings only
    elif kind == "metadata_list":
        return ["charnn.vocab"], False
    elif kind == "tokens":
        md["charnn.vocab"] = json.dumps({"level": "char", "tokens": [chr(0x4E00 + i) for i in range(config.vocab_size + 1)]})
    return md, kind == "none"


def edit_st(header: dict, data: bytes, written: dict, edit) -> tuple[dict | str, bytes, int | None]:
    """One edit of the header (a dict, or its text once edited as text), the data, and the
    declared header length (None: the true one); ``written`` (name -> array) follows the
    tensors whose data an edit rewrites."""
    kind, pick, dims, descr, value, number = edit
    names = [n for n in header if n != "__metadata__"]
    if not isinstance(header, dict) or not names:
        return header, data, None
    name = names[pick % len(names)]
    entry = header[name]
    if not isinstance(entry, dict) and kind in ("dtype", "shape", "offsets", "entry", "f64", "value"):
        return header, data, None  # (an earlier edit made it something else)
    if kind == "dtype":
        entry["dtype"] = descr
    elif kind == "shape":
        entry["shape"] = list(dims)
        if pick % 2 and all(isinstance(d, int) for d in dims):  # offsets that agree with the shape
            entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][0] + 4 * math.prod(dims)]
    elif kind == "offsets":
        entry["data_offsets"] = [value, entry["data_offsets"][1]] if pick % 2 else [entry["data_offsets"][0], value]
    elif kind == "entry":
        header[name] = [entry] if pick % 3 == 0 else dict(entry, extra=value) if pick % 3 == 1 else "F32"
    elif kind == "drop":
        del header[name]
        written.pop(name, None)
        return _relaid(header, data, written)
    elif kind == "extra":  # an unknown tensor of 4 MiB, which must never be read
        written[f"junk{pick % 3}"] = numpy.zeros(MiB, dtype=numpy.float32)
        return _relaid(header, data, written)
    elif kind in ("f64", "value"):
        a = written[name].astype(numpy.float64)
        if kind == "value" and a.size:
            a.reshape(-1)[pick % a.size] = number
        written[name] = a
        return _relaid(header, data, written)
    elif kind == "length":
        if pick % 4 == 0 and type(value) is int:  # noqa: E721
            return header, data, value
        return header, data, len(json.dumps(header)) + (1, -1, 8)[pick % 3]
    elif kind == "pad":  # spaces after the JSON, as the format allows for alignment
        return json.dumps(header) + " " * (pick % 64), data, None
    elif kind == "cut":
        return header, data[: pick % (len(data) + 1)], None
    elif kind == "dup":  # a key twice: json.loads would keep the last silently
        text = json.dumps(header)
        return text[:-1] + f', "{name}": ' + json.dumps(entry) + "}", data, None
    return header, data, None


def _relaid(header: dict, data: bytes, written: dict):
    """The header and data laid out again from ``written``, keeping the metadata."""
    new, new_data = st_layout(written, header.get("__metadata__"))
    if "__metadata__" not in header:
        new.pop("__metadata__", None)
    return new, new_data, None


@FUZZ
@given(cell=st.sampled_from(["rnn", "lstm", "gru"]), layers=st.integers(1, 2), hidden=st.integers(1, 6),
       embed=st.integers(0, 3), chars=st.text("abcdefghij \n", min_size=2, max_size=10).filter(lambda s: len(set(s)) >= 2),
       meta_edit=ST_META_EDITS, edits=ST_EDITS)
def test_any_safetensors_file_is_refused_cheaply_or_loads_exactly(st_scratch, cell, layers, hidden, embed, chars,
                                                                  meta_edit, edits):
    """The npz fuzz's promise for safetensors files: headers, offsets, dtypes, metadata and
    values edited at random; the file is refused with one line, within twice the honest
    model's memory, or loads the very values written (and only finite float32 ones)."""
    config, vocab, tensors, metadata = honest_st(cell, layers, hidden, embed, chars)
    md, _ = edit_st_meta(config, metadata, meta_edit)
    written = dict(tensors)
    header, data = st_layout(written, {})
    header["__metadata__"] = md
    length = None
    for edit in edits:
        header, data, declared = edit_st(header, data, written, edit)
        length = declared if declared is not None else length
    ckpt, peak = load_measured(st_scratch, st_bytes(header, data, length))
    bound = 2 * honest_bytes(config, 1) + SLACK + (4 * MiB if meta_edit == "pad" else 0)
    assert peak < bound, (peak, bound)
    if ckpt is None:
        return
    assert ckpt.config == config and ckpt.vocab.tokens == vocab.tokens
    expected = safetensors_file.from_torch(config, written)
    assert ckpt.params.keys() == expected.keys()
    for k, v in ckpt.params.items():
        numpy.testing.assert_array_equal(v, expected[k], err_msg=k)
        assert numpy.isfinite(v.astype(numpy.float32)).all(), k


def test_the_fuzzed_safetensors_files_load_when_unedited(st_scratch):
    for cell in ("rnn", "lstm", "gru"):
        for with_config in (True, False):
            config, vocab, tensors, metadata = honest_st(cell, 2, 5, 3, "abc de\n", with_config)
            ckpt, peak = load_measured(st_scratch, st_bytes(*st_layout(tensors, metadata)))
            assert ckpt is not None and ckpt.config == config and ckpt.vocab.tokens == vocab.tokens
            assert peak < 2 * honest_bytes(config, 1) + SLACK


# ----- the safetensors cases, pinned -----

def small_st(**md_changes):
    config, vocab, tensors, metadata = honest_st("lstm", 1, 4, 2, "abcd\n")
    metadata.update(md_changes)
    return config, tensors, metadata


def test_safetensors_claiming_a_billion_layers_is_refused_at_once(st_scratch):
    """A 28 KB file of the issue grew to 9.7 GB in a minute: torch_shapes() looped over the layers."""
    config, tensors, metadata = small_st()
    cfg = dict(config.to_json(), layers=10**9)
    metadata["charnn.config"] = json.dumps(cfg)
    with time_limit(5):
        msg = refused_cheaply(st_scratch, st_bytes(*st_layout(tensors, metadata)), "1,000,000,000 layers", limit=MiB)
    assert "tensors" in msg


@pytest.mark.parametrize("key, text, words", [
    ("charnn.meta", "[" + "[]," * 30_000 + "[]]", ["charnn.meta", "lists and objects"]),
    ("charnn.vocab", "[" * 100_000 + "]" * 100_000, ["charnn.vocab"]),
    ("charnn.meta", "[" + "0," * 5_000_000 + "0]", ["charnn.meta", "values"]),
    ("charnn.config", '{"layers": ' + "9" * 5000 + "}", ["charnn.config"]),
])
def test_safetensors_metadata_is_held_to_the_npz_caps(st_scratch, key, text, words):
    config, tensors, metadata = small_st(**{key: text})
    refused_cheaply(st_scratch, st_bytes(*st_layout(tensors, metadata)), "malformed metadata", *words,
                    limit=4 * len(text) + SLACK)


def test_a_safetensors_header_of_many_containers_or_values_is_refused_before_parsing(st_scratch):
    """20,000 tensors, or one shape of a million sizes: refused by counting, not by building them."""
    config, tensors, metadata = small_st()
    header, data = st_layout(tensors, metadata)
    many = dict(header, **{f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(20_000)})
    refused_cheaply(st_scratch, st_bytes(many, data), "lists and objects", limit=4 * MiB)
    wide = json.dumps(header)[:-1] + ', "w": {"dtype": "F32", "shape": [' + "1," * 1_000_000 + '1], "data_offsets": [0, 4]}}'
    refused_cheaply(st_scratch, st_bytes(wide, data), "values", limit=4 * len(wide) + SLACK)


def test_a_safetensors_header_length_that_lies(st_scratch):
    config, tensors, metadata = small_st()
    header, data = st_layout(tensors, metadata)
    text = json.dumps(header)
    refused_cheaply(st_scratch, st_bytes(text, data, len(text) + len(data) + 1), "not a valid safetensors file",
                    limit=MiB)
    for length in (2**62, 1, 0):  # no safetensors file starts so
        refused_cheaply(st_scratch, st_bytes(text, data, length), "not a charnn model file", limit=MiB)


def test_an_unknown_safetensors_tensor_is_refused_unread(tmp_path):
    """400 MB of an unknown tensor (a sparse file: no disk used) cost 820 MB before "unexpected
    tensors"; its name is now refused from the header."""
    config, tensors, metadata = small_st()
    header, data = st_layout(tensors, metadata)
    n = 100_000_000
    header["junk"] = {"dtype": "F32", "shape": [n], "data_offsets": [len(data), len(data) + 4 * n]}
    path = tmp_path / "junk.safetensors"
    path.write_bytes(st_bytes(header, data))
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + 4 * n)
    tracemalloc.start()
    try:
        with memory_cap(), pytest.raises(CheckpointError) as e:
            checkpoint.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert "unexpected tensors: junk" in msg and str(path) in msg and peak < MiB, (msg, peak)


def test_safetensors_tensor_data_must_tile_the_file(st_scratch):
    """Offsets that overlap, leave a hole, or point past the end: refused from the header."""
    config, tensors, metadata = small_st()
    header, data = st_layout(tensors, metadata)
    first = next(n for n in header if n != "__metadata__")
    for offsets in ([0, 0], [4, header[first]["data_offsets"][1] + 4], [0, 2**62]):
        edited = json.loads(json.dumps(header))
        edited[first]["data_offsets"] = offsets
        refused_cheaply(st_scratch, st_bytes(edited, data), "not a valid safetensors file", limit=MiB)
    huge = json.loads(json.dumps(header))
    huge[first]["shape"] = [2**20, 2**20]
    huge[first]["data_offsets"] = [0, 4 * 2**40]
    refused_cheaply(st_scratch, st_bytes(huge, data), "not a valid safetensors file", limit=MiB)


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_values_finite_in_float64_but_not_in_float32_are_refused_naming_the_tensor(tmp_path, fmt):
    """1e300 passed the finite check as a float64 and became inf in float32: score said nan and
    exited 0, sample printed zzzz. Loaded for float64 (gradcheck, train --dtype float64) it is
    a finite weight and loads."""
    config, tensors, metadata = small_st()
    params = safetensors_file.from_torch(config, tensors)
    params["rnn.0.Wh"] = params["rnn.0.Wh"].astype(numpy.float64)
    params["rnn.0.Wh"][1, 2] = 1e300
    path = tmp_path / f"big.{fmt}"
    if fmt == "npz":
        vocab = Vocab.from_json(json.loads(metadata["charnn.vocab"]))
        checkpoint.save(path, checkpoint.Checkpoint(config, vocab, params, {}))
        name = "parameter rnn.0.Wh"
    else:
        path.write_bytes(st_bytes(*st_layout(safetensors_file.to_torch(config, params), metadata)))
        name = "tensor rnn.weight_hh_l0"
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    assert f"{name} holds 1e+300, beyond the range of float32" in str(e.value), str(e.value)
    assert checkpoint.load(path, "float64").params["rnn.0.Wh"][1, 2] == 1e300


def test_a_bias_sum_that_overflows_is_refused(tmp_path):
    """bias_ih and bias_hh are each finite in float32; charnn's b, their sum, is not."""
    config, tensors, metadata = small_st()
    tensors = dict(tensors)
    tensors["rnn.bias_ih_l0"] = numpy.full_like(tensors["rnn.bias_ih_l0"], 3e38)
    tensors["rnn.bias_hh_l0"] = numpy.full_like(tensors["rnn.bias_hh_l0"], 3e38)
    path = tmp_path / "sum.safetensors"
    path.write_bytes(st_bytes(*st_layout(tensors, metadata)))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    assert "parameter rnn.0.b holds NaN or infinite values" in str(e.value)


def test_a_safetensors_header_naming_a_key_twice(st_scratch):
    config, tensors, metadata = small_st()
    header, data = st_layout(tensors, metadata)
    text = json.dumps(header)
    text = text[:-1] + ', "decoder.bias": ' + json.dumps(header["decoder.bias"]) + "}"
    refused_cheaply(st_scratch, st_bytes(text, data), "appears twice", limit=MiB)


def test_a_resumed_checkpoint_is_checked_in_the_runs_dtype(tmp_path):
    """Resume reads last.npz before it knows the run's dtype (that is in the file): it loads in
    float64, then checks every array in the run's dtype, optimizer state and carried state too."""
    config, meta, arrays = honest("lstm", 1, 4, 2, "abcd\n", 2, True)
    arrays["optim/rnn.0.Wh.v"] = arrays["optim/rnn.0.Wh.v"].astype(numpy.float64)
    arrays["optim/rnn.0.Wh.v"][0, 0] = 1e300
    path = tmp_path / "last.npz"
    path.write_bytes(zip_bytes([meta_member(meta)] + [Member(f"{k}.npy", npy(v)) for k, v in arrays.items()]))
    ckpt = checkpoint.load(path, "float64")
    checkpoint.check_values(path, ckpt, "float64")
    with pytest.raises(CheckpointError, match=r"optimizer state rnn.0.Wh.v holds 1e\+300, beyond the range of float32"):
        checkpoint.check_values(path, ckpt, "float32")

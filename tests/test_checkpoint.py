"""The model file: round trips, atomic writes, and refusing every kind of bad file safely."""

from __future__ import annotations

import io
import json
import os

import numpy
import pytest

from charnn.io import checkpoint
from charnn.backend import get_backend, to_float, to_host
from charnn.io.checkpoint import Checkpoint, CheckpointError, load, load_model, save
from charnn.nn.model import LanguageModel, ModelConfig
from charnn.nn.optim import make_optimizer
from charnn.io.vocab import Vocab

F64 = get_backend("cpu", "float64")
TEXT = "hello world\n"
IDS = numpy.array([[0, 1, 2], [3, 4, 5], [6, 7, 0]])


def trained(cell="lstm", layers=2, seed=0):
    """A model after one Adam step, with its optimizer and carried state."""
    vocab = Vocab.build_char(TEXT)
    config = ModelConfig(vocab_size=len(vocab), cell=cell, layers=layers, hidden=4, embed=3)
    model = LanguageModel.create(config, seed, F64)
    loss, cache, state = model.forward(IDS[:2], IDS[1:])
    grads, _ = model.backward(cache)
    opt = make_optimizer("adam", model.params)
    opt.step(grads)
    return model, vocab, opt, state


def make_checkpoint(model, vocab, opt=None, state=None, meta=None):
    host_state = None if state is None else [(to_host(h), None if c is None else to_host(c)) for h, c in state]
    return Checkpoint(model.config, vocab, {k: v.copy() for k, v in model.host_params().items()},
                      meta or {}, opt.state_arrays() if opt else {}, host_state)


def eval_loss(model):
    loss, _, _ = model.forward(IDS[:2], IDS[1:], store=False)
    return to_float(loss)


def saved(tmp_path, name="model.npz", **kw):
    model, vocab, opt, state = trained(**kw)
    path = tmp_path / name
    save(path, make_checkpoint(model, vocab, opt, state, {"step": 7, "train": {"lr": 0.002, "batch_size": 3}}))
    return path, model, vocab, opt, state


def rewrite(path, out, edit):
    """Copy the npz at ``path`` to ``out`` through ``edit(arrays, meta)``, with numpy.savez."""
    with numpy.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
    edit(arrays, meta)
    arrays["meta"] = numpy.frombuffer(json.dumps(meta).encode("utf-8"), dtype=numpy.uint8)
    numpy.savez(out, **arrays)
    return out


def assert_refused(path, *words):
    with pytest.raises(CheckpointError) as e:
        load(path)
    msg = str(e.value)
    assert str(path) in msg
    for w in words:
        assert w in msg.lower(), msg
    return msg


# ----- round trips -----

@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_round_trip(tmp_path, cell):
    path, model, vocab, opt, state = saved(tmp_path, cell=cell)
    ckpt = load(path)
    assert ckpt.config == model.config
    assert ckpt.vocab.tokens == vocab.tokens and ckpt.vocab.level == "char"
    assert ckpt.meta == {"step": 7, "train": {"lr": 0.002, "batch_size": 3}, "format": checkpoint.FORMAT,
                         "version": checkpoint.VERSION}
    assert ckpt.params.keys() == model.params.keys()
    for k, v in model.host_params().items():
        numpy.testing.assert_array_equal(ckpt.params[k], v)
        assert ckpt.params[k].dtype == numpy.float64
    assert ckpt.optim.keys() == opt.state_arrays().keys()
    for k, v in opt.state_arrays().items():
        numpy.testing.assert_array_equal(ckpt.optim[k], v)
    assert len(ckpt.state) == model.config.layers
    for (h, c), (h0, c0) in zip(ckpt.state, state):
        numpy.testing.assert_array_equal(h, h0)
        if cell == "lstm":
            numpy.testing.assert_array_equal(c, c0)
        else:
            assert c is None
    loaded, lvocab, _ = load_model(path, F64)
    assert eval_loss(loaded) == eval_loss(model)
    # the resumed optimizer takes the same next step
    _, cache, _ = model.forward(IDS[1:], IDS[:2])
    grads, _ = model.backward(cache)
    _, cache2, _ = loaded.forward(IDS[1:], IDS[:2])
    grads2, _ = loaded.backward(cache2)
    opt2 = make_optimizer("adam", loaded.params)
    opt2.load_state_arrays(ckpt.optim, opt.t)
    opt.step(grads)
    opt2.step(grads2)
    for k in model.params:
        numpy.testing.assert_array_equal(loaded.params[k], model.params[k])


def test_minimal_checkpoint_and_run_folder(tmp_path):
    model, vocab, _, _ = trained(cell="gru", layers=1)
    save(tmp_path / checkpoint.BEST_NAME, make_checkpoint(model, vocab))
    ckpt = load(tmp_path)  # a run folder resolves to its best model
    assert ckpt.optim == {} and ckpt.state is None
    loaded, _, _ = load_model(tmp_path)  # default backend: CPU float32
    assert loaded.params["rnn.0.Wx"].dtype == numpy.float32
    assert eval_loss(loaded) == pytest.approx(eval_loss(model), rel=1e-5)
    with pytest.raises(CheckpointError, match="no such file"):
        load(tmp_path / "missing.npz")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="empty_run"):
        load(empty)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path, *_ = saved(tmp_path)
    model, vocab, opt, state = trained(seed=1)
    save(path, make_checkpoint(model, vocab, opt, state, {"train": {"batch_size": 3}}))  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]
    assert eval_loss(load_model(path, F64)[0]) == eval_loss(model)


# ----- bad files -----

def test_text_file(tmp_path):
    p = tmp_path / "notes.npz"
    p.write_text("just some text\n")
    assert_refused(p, "not a charnn model file")


def test_plain_npz_without_meta(tmp_path):
    p = tmp_path / "other.npz"
    numpy.savez(p, x=numpy.zeros(3))
    assert_refused(p, "no metadata")


def test_truncated_file(tmp_path):
    path, *_ = saved(tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    assert_refused(cut)


def test_corrupted_bytes(tmp_path):
    path, *_ = saved(tmp_path)
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid: mid + 64] = bytes(64)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(data))
    assert_refused(bad)


def test_newer_format_version(tmp_path):
    path, *_ = saved(tmp_path)
    newer = rewrite(path, tmp_path / "newer.npz", lambda a, m: m.update(version=99))
    assert_refused(newer, "newer", "99")


def test_malformed_metadata(tmp_path):
    path, *_ = saved(tmp_path)
    p = tmp_path / "m.npz"
    with numpy.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["meta"] = numpy.frombuffer(b"{not json", dtype=numpy.uint8)
    numpy.savez(p, **arrays)
    assert_refused(p, "metadata")
    assert_refused(rewrite(path, tmp_path / "f.npz", lambda a, m: m.update(format="other")), "not a charnn")
    assert_refused(rewrite(path, tmp_path / "c.npz", lambda a, m: m["config"].update(cell="tcn")), "cell")
    assert_refused(rewrite(path, tmp_path / "v.npz", lambda a, m: m.update(vocab={"level": "char"})))


class Exploit:
    """Unpickling this would write the marker file: proof that code ran."""

    marker = None

    def __reduce__(self):
        return (open, (str(Exploit.marker), "w"))


def test_pickled_objects_are_refused_and_never_run(tmp_path):
    path, *_ = saved(tmp_path)
    marker = tmp_path / "PWNED"
    Exploit.marker = marker
    obj = numpy.empty(1, dtype=object)
    obj[0] = Exploit()
    evil = tmp_path / "evil.npz"
    with numpy.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["param/head.b"] = obj
    numpy.savez(evil, **arrays)  # savez pickles object arrays
    assert not marker.exists()
    msg = assert_refused(evil, "pickle")
    assert not marker.exists()
    # an object array as the metadata is refused too
    evil2 = tmp_path / "evil2.npz"
    numpy.savez(evil2, meta=obj)
    assert_refused(evil2, "pickle")
    assert not marker.exists()
    assert "never" in msg


def test_shape_tampered_parameter(tmp_path):
    path, *_ = saved(tmp_path)
    p = rewrite(path, tmp_path / "shape.npz", lambda a, m: a.update({"param/rnn.0.Wh": numpy.zeros((16, 5))}))
    msg = assert_refused(p, "rnn.0.wh")
    assert "(16, 5)" in msg and "(16, 4)" in msg


def test_missing_and_unexpected_parameters(tmp_path):
    path, *_ = saved(tmp_path)
    assert_refused(rewrite(path, tmp_path / "a.npz", lambda a, m: a.pop("param/head.b")), "head.b", "missing")
    assert_refused(rewrite(path, tmp_path / "b.npz", lambda a, m: a.update({"param/extra": numpy.zeros(2)})),
                   "extra")
    assert_refused(rewrite(path, tmp_path / "c.npz", lambda a, m: a.update({"junk": numpy.zeros(2)})), "junk")
    assert_refused(rewrite(path, tmp_path / "d.npz",
                           lambda a, m: a.update({"param/head.b": a["param/head.b"].astype(numpy.int64)})), "dtype")


def test_vocabulary_size_mismatch(tmp_path):
    path, *_ = saved(tmp_path)
    p = rewrite(path, tmp_path / "vocab.npz", lambda a, m: m["vocab"]["tokens"].append("Z"))
    assert_refused(p, "vocabulary")


@pytest.mark.parametrize("bad", [numpy.nan, numpy.inf])
def test_non_finite_parameters(tmp_path, bad):
    path, *_ = saved(tmp_path)

    def poison(a, m):
        w = a["param/rnn.1.Wx"].copy()
        w[1, 2] = bad
        a["param/rnn.1.Wx"] = w

    assert_refused(rewrite(path, tmp_path / "nan.npz", poison), "rnn.1.wx", "nan")


@pytest.mark.parametrize("tamper", ["drop_c", "reshape_c"])
def test_tampered_lstm_state(tmp_path, tamper):
    path, *_ = saved(tmp_path, cell="lstm")

    def edit(a, m):
        if tamper == "drop_c":
            a.pop("state/0/c")
        else:
            a["state/0/c"] = numpy.zeros((3, 1))

    assert_refused(rewrite(path, tmp_path / "state.npz", edit), "state")


# ----- failed saves -----

@pytest.mark.parametrize("where", ["replace", "write"])
def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch, where):
    path, model, vocab, opt, state = saved(tmp_path)
    before = path.read_bytes()
    other, *_ = trained(seed=5)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    if where == "replace":
        monkeypatch.setattr(checkpoint.os, "replace", boom)
    else:
        monkeypatch.setattr(checkpoint.os, "fsync", boom)
    with pytest.raises(CheckpointError) as e:
        save(path, make_checkpoint(other, vocab))
    assert str(path) in str(e.value) and "No space left" in str(e.value)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert eval_loss(load_model(path, F64)[0]) == eval_loss(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.npz"]


def test_save_into_missing_folder(tmp_path):
    model, vocab, _, _ = trained()
    target = tmp_path / "nope" / "model.npz"
    with pytest.raises(CheckpointError, match="nope"):
        save(target, make_checkpoint(model, vocab))


def test_saved_file_is_a_plain_npz(tmp_path):
    """No pickles in what charnn writes: numpy can read every array with allow_pickle=False."""
    path, *_ = saved(tmp_path)
    with numpy.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
        assert meta["format"] == checkpoint.FORMAT and meta["version"] == checkpoint.VERSION
        for k in z.files:
            assert z[k].dtype != object
    buf = io.BytesIO(path.read_bytes())
    assert buf.read(4) == b"PK\x03\x04"
    assert os.path.getsize(path) > 0


def test_the_bundled_model_is_found_in_a_source_checkout(monkeypatch):
    """models/default/model.npz beside the package (it was looked for under charnn/ after
    checkpoint.py moved into charnn/io/, so `charnn sample` without MODEL failed)."""
    from pathlib import Path

    from charnn.io.checkpoint import DEFAULT_ENV, default_model_path

    monkeypatch.delenv(DEFAULT_ENV, raising=False)
    bundled = Path(__file__).resolve().parent.parent / "models" / "default" / "model.npz"
    if not bundled.is_file():
        pytest.skip("no bundled model in this checkout")
    assert default_model_path() == bundled


def test_file_digest_is_remembered_only_while_the_file_is_unchanged(tmp_path):
    import hashlib
    import os

    from charnn.io.fileio import sha256_file

    p = tmp_path / "corpus.txt"
    p.write_bytes(b"the cat sat\n")
    assert sha256_file(p) == hashlib.sha256(b"the cat sat\n").hexdigest()
    p.write_bytes(b"the dog sat\n")  # same size; a new modification time
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert sha256_file(p) == hashlib.sha256(b"the dog sat\n").hexdigest()

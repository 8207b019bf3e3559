"""The compiled LSTM loops of rowsplit.py: the one-core loop against kernels.py's Python loop,
the two-core loop split by hidden units against the one-core loop, the model's row-split
training step against its batch split, and a failure on one core stopping the other."""

import threading
import time

import numpy
import pytest

from charnn.backend import get_backend
from charnn.engine import cblas, kernels, layers, parallel, threads as threads_mod
from charnn.engine import loops as rowsplit
from charnn.engine.settings import Settings
from charnn.nn.model import LanguageModel, ModelConfig

# As on a machine with two cores, the kernels on (also under CHARNN_THREADS=1 or
# CHARNN_KERNELS=numpy).
TWO = Settings(threads=2, kernels=True, rowsplit=True)

pytestmark = pytest.mark.skipif(not (kernels.available and rowsplit.compiled_loops()),
                                reason="needs numba and a CBLAS sgemm in NumPy's BLAS")


def layer_inputs(H, N, T, seed=0):
    rng = numpy.random.default_rng(seed)
    f = numpy.float32
    XP = rng.normal(0, 0.7, (4 * H, T, N)).astype(f)
    Wh = rng.normal(0, 1 / numpy.sqrt(H), (4 * H, H)).astype(f)
    h0 = rng.normal(0, 0.5, (H, N)).astype(f)
    c0 = rng.normal(0, 0.5, (H, N)).astype(f)
    dhs = rng.normal(0, 1, (H, T, N)).astype(f)
    return XP, Wh, h0, c0, dhs


def close(a, b, rel=1e-5, name=""):
    assert a.shape == b.shape, name
    assert numpy.abs(a - b).max() <= rel * (numpy.abs(b).max() + 1e-12), name


@pytest.mark.parametrize("H,N,T", [(16, 5, 7), (40, 16, 9), (64, 20, 3), (16, 1, 4)])
def test_one_core_compiled_loop_matches_python_loop(monkeypatch, H, N, T):
    XP, Wh, h0, c0, dhs = layer_inputs(H, N, T)
    out = {}
    for mode in ("compiled", "python"):
        loop = mode == "compiled"
        hs, (h, c), cache = layers.layer_forward("lstm", XP, Wh, h0, c0, None, True, loop)
        hs2, (_, c2), _ = layers.layer_forward("lstm", XP, Wh, h0, c0, None, False, loop)
        numpy.testing.assert_array_equal(hs, hs2)  # evaluation runs the same numbers
        numpy.testing.assert_array_equal(c, c2)
        dXP, dWh, _, dh0, dc0 = layers.layer_backward("lstm", dhs, cache, Wh, None, loop)
        out[mode] = (hs, h, c, dXP, dWh, dh0, dc0)
    for a, b in zip(out["compiled"], out["python"]):
        close(a, b, 1e-6)


@pytest.mark.parametrize("H,N,T", [(16, 5, 7), (40, 16, 9), (64, 20, 3), (16, 2, 1)])
@pytest.mark.parametrize("store", [True, False])
def test_row_split_layer_matches_one_core(H, N, T, store):
    XP, Wh, h0, c0, dhs = layer_inputs(H, N, T)
    hs1, (h1, c1), cache1 = layers.layer_forward("lstm", XP, Wh, h0, c0, None, store, True)
    hs2, (h2, c2), cache2 = rowsplit.lstm_forward(XP, Wh, h0, c0, store=store)
    for a, b in ((hs2, hs1), (h2, h1), (c2, c1)):
        close(a, b, 1e-6)
    if not store:
        assert cache2 is None
        return
    assert cache2["rows"]
    one = layers.layer_backward("lstm", dhs, cache1, Wh, None, True)
    two = rowsplit.lstm_backward(dhs, cache2, Wh)
    for name, a, b in zip(("dXP", "dWh", "dextra", "dh0", "dc0"), two, one):
        if name == "dextra":
            assert a == b == {}
        else:
            close(a, b, 1e-5, name)


def row_split(m, N):
    return parallel.use_row_split(m.ops, m, N)


def test_row_split_is_used_only_where_it_pays(monkeypatch):
    f32 = get_backend("cpu", "float32", settings=TWO)
    lstm = LanguageModel.create(ModelConfig(vocab_size=10, cell="lstm", hidden=32), backend=f32)
    assert row_split(lstm, 20) and not row_split(lstm, 32)  # thin half batches only
    assert not row_split(LanguageModel.create(ModelConfig(vocab_size=10, cell="gru", hidden=32), backend=f32), 20)
    assert not row_split(LanguageModel.create(ModelConfig(vocab_size=10, cell="lstm", hidden=31), backend=f32), 20)
    f64 = LanguageModel.create(ModelConfig(vocab_size=10, cell="lstm", hidden=32),
                               backend=get_backend("cpu", "float64", settings=TWO))
    assert not row_split(f64, 20)
    for off in (Settings(threads=1), Settings(rowsplit=False), Settings(kernels=False)):
        m = LanguageModel.create(ModelConfig(vocab_size=10, cell="lstm", hidden=32),
                                 backend=get_backend("cpu", "float32", settings=off))
        assert not row_split(m, 20), off
    monkeypatch.setattr(cblas, "_blas", False)  # no sgemm found: the batch split, as before
    assert not row_split(lstm, 20)


@pytest.mark.parametrize("embed,tie,bounds,dropout", [(0, False, (), 0.0), (8, False, (), 0.2),
                                                      (16, True, (), 0.0), (8, False, (0, 3, 9, 25, 60), 0.2),
                                                      (16, True, (0, 3, 9, 25, 60), 0.0)])
def test_row_split_training_step_matches_batch_split(monkeypatch, embed, tie, bounds, dropout):
    """Loss, every gradient (the sparse embedding's too) and the carried state; the head runs
    on two halves of the time steps (full softmax) or once, split by class."""
    cfg = ModelConfig(vocab_size=60, cell="lstm", layers=2, hidden=16, embed=embed, tie=tie,
                      class_bounds=bounds, dropout=dropout)
    m = LanguageModel.create(cfg, seed=3, backend=get_backend("cpu", "float32", settings=TWO))
    rng = numpy.random.default_rng(0)
    T, N = 7, 11
    ids, tg = rng.integers(0, 60, (T, N)), rng.integers(0, 60, (T, N))
    state = [(rng.normal(0, 0.5, (16, N)).astype(numpy.float32), rng.normal(0, 0.5, (16, N)).astype(numpy.float32))
             for _ in range(2)]
    assert row_split(m, N)
    out = {}
    for mode in ("rows", "batch"):
        if mode == "batch":
            monkeypatch.setattr(parallel, "use_row_split", lambda ops, model, n: False)
        out[mode] = m.loss_and_grads(ids, tg, state, rng=numpy.random.default_rng(5), sparse=True)
    (l1, g1, s1), (l2, g2, s2) = out["rows"], out["batch"]
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    assert sorted(g1) == sorted(g2)
    for k in g1:
        a, b = (g.dense() if hasattr(g, "dense") else g for g in (g1[k], g2[k]))
        close(a, b, name=k)
    for (h1, c1), (h2, c2) in zip(s1, s2):
        numpy.testing.assert_allclose(h1, h2, atol=1e-6)
        numpy.testing.assert_allclose(c1, c2, atol=1e-6)


def test_model_with_threads_1_does_not_split(monkeypatch):
    m = LanguageModel.create(ModelConfig(vocab_size=10, cell="lstm", hidden=16),
                             backend=get_backend("cpu", "float32", settings=Settings(threads=1)))
    calls = []
    monkeypatch.setattr(rowsplit, "lstm_forward", lambda *a, **k: calls.append(1))
    ids = numpy.zeros((3, 10), dtype=numpy.int64)
    m.loss_and_grads(ids, ids, None)
    assert not calls


def test_a_failure_on_one_core_stops_the_other():
    """The worker raises while this thread waits for it at a meeting point: the wait ends
    and the worker's own error is raised, not a hang."""
    _, yld = cblas.find_blas()
    flags = numpy.zeros(3, dtype=numpy.int64)
    waited = threading.Event()

    def work(k):
        if k == 1:
            time.sleep(0.05)
            raise ValueError("boom on core 1")
        ok = rowsplit._meet(flags, 0, 1, yld)
        waited.set()
        return ok

    with pytest.raises(ValueError, match="boom on core 1"):
        rowsplit._in_two(work, flags)
    assert waited.is_set() and flags[2] == 1


def test_not_from_the_worker_thread(monkeypatch):
    """run_in_two from charnn's worker runs both halves there in turn; the row split, whose
    halves must run at once, is then not used."""
    def inner(k):
        return threads_mod.in_worker(), threads_mod.run_in_two(lambda x: x * 2, 1, 2), rowsplit.usable(16)

    (w0, r0, u0), (w1, r1, u1) = threads_mod.run_in_two(inner, 0, 1)
    assert (w0, w1) == (False, True) and r0 == r1 == [2, 4]
    assert u0 and not u1


def test_the_blas_is_found_once_for_two_threads_asking_at_once(monkeypatch):
    """The two halves of a batch ask on their first step at once; both must get the same
    answer (an answer seen half-made once sent one half down another code path, and the
    first step after a start or resume then differed from run to run in its last bits)."""
    found = cblas.find_blas()
    for _ in range(5):
        monkeypatch.setattr(cblas, "_blas", None)
        start = threading.Barrier(2)
        answers = [None, None]

        def ask(k):
            start.wait()
            answers[k] = cblas.find_blas()

        threads = [threading.Thread(target=ask, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert answers[0] is answers[1]  # one answer, made once
        assert bool(answers[0]) == bool(found)

"""The fused numba kernels against their plain NumPy twins, and the other fast paths (the
Stepper, the two-thread batch split) against the straightforward ones."""

import numpy
import pytest

from charnn.backend import get_backend
from charnn.engine import head_kernels, kernels, layers, parallel
from charnn.engine.cpu import CpuOps
from charnn.engine.settings import Settings
from charnn.nn.model import LanguageModel, ModelConfig
from charnn.nn.ops import Ops
from charnn.nn.optim import make_optimizer


def cpu(dtype="float32", **settings):
    """A CPU backend with the engine's settings given here (the rest at their defaults)."""
    return get_backend("cpu", dtype, settings=Settings(**settings))

pytestmark = pytest.mark.skipif(not kernels.available, reason="numba is not installed")


def run(monkeypatch, mode, cfg, ids, tg, state):
    m = LanguageModel.create(cfg, seed=1, backend=cpu(kernels=mode == "numba"))
    loss, cache, st = m.forward(ids, tg, state, train=True, rng=numpy.random.default_rng(5))
    grads, dstate = m.backward(cache)
    return float(loss), grads, st, dstate


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("embed", [0, 8])
@pytest.mark.parametrize("N", [5, 16, 32])  # flat step kernels, and the column ones (LSTM 16, GRU 32)
def test_fused_layers_match_plain_float32(monkeypatch, cell, embed, N):
    cfg = ModelConfig(vocab_size=20, cell=cell, layers=2, hidden=16, embed=embed, dropout=0.1)
    rng = numpy.random.default_rng(0)
    ids, tg = rng.integers(0, 20, (7, N)), rng.integers(0, 20, (7, N))
    state = [(rng.normal(0, 0.5, (16, N)).astype(numpy.float32),
              rng.normal(0, 0.5, (16, N)).astype(numpy.float32) if cell == "lstm" else None) for _ in range(2)]
    fused = run(monkeypatch, "numba", cfg, ids, tg, state)
    plain = run(monkeypatch, "numpy", cfg, ids, tg, state)
    assert fused[0] == pytest.approx(plain[0], rel=1e-6)
    for k in plain[1]:
        scale = numpy.abs(plain[1][k]).max() + 1e-12
        assert numpy.abs(fused[1][k] - plain[1][k]).max() / scale < 2e-5, k
    for (h1, c1), (h2, c2) in zip(fused[2], plain[2]):
        numpy.testing.assert_allclose(h1, h2, atol=1e-6)
    for (h1, c1), (h2, c2) in zip(fused[3], plain[3]):
        numpy.testing.assert_allclose(h1, h2, atol=1e-6)


def test_kernels_only_take_float32_numpy():
    on, off = CpuOps(Settings(kernels=True)), CpuOps(Settings(kernels=False))
    assert on.fused(numpy.zeros(3, numpy.float32))
    assert not on.fused(numpy.zeros(3, numpy.float64))  # gradient checks stay exact
    assert not off.fused(numpy.zeros(3, numpy.float32))


def test_rational_tanh_accuracy():
    x = numpy.linspace(-20, 20, 200001).astype(numpy.float32)
    approx = numpy.array([kernels._tanh(v) for v in x[::50]], dtype=numpy.float64)
    exact = numpy.tanh(x[::50].astype(numpy.float64))
    assert numpy.abs(approx - exact).max() < 5e-7
    assert kernels._tanh(numpy.float32(1e30)) == 1.0 and kernels._tanh(numpy.float32(-1e30)) == -1.0


def test_exp_accuracy():
    x = numpy.concatenate([-numpy.logspace(-9, numpy.log10(86.9), 4001), [0.0]]).astype(numpy.float32)
    approx = numpy.array([head_kernels._exp_nonpositive(v) for v in x], dtype=numpy.float64)
    exact = numpy.exp(x.astype(numpy.float64))
    assert (numpy.abs(approx - exact) / exact).max() < 6e-7  # a few float32 ulps
    assert 0 < head_kernels._exp_nonpositive(numpy.float32(-1e4)) < 2e-38  # floored, not inf or nan


@pytest.mark.parametrize("V", [3, 65, 1000])
@pytest.mark.parametrize("weighted", [False, True, "below one"])  # weights summing below 1 too
def test_fused_softmax_xent_matches_plain(monkeypatch, V, weighted):
    rng = numpy.random.default_rng(V)
    D, M = 8, 50
    X = rng.normal(0, 3, (D, M)).astype(numpy.float32)
    W = rng.normal(0, 2, (V, D)).astype(numpy.float32)
    W[0] *= 40  # some rows far apart, so that exp underflows for the others
    b = rng.normal(0, 1, V).astype(numpy.float32)
    targets = rng.integers(0, V, M)
    weights = rng.random(M).astype(numpy.float32) if weighted else None
    if weighted == "below one":
        weights *= numpy.float32(0.5 / weights.sum())
    out = {}
    for mode, ops in (("numba", CpuOps(Settings())), ("numpy", Ops())):
        loss, nll, cache = ops.softmax_xent_forward(X, W, b, targets, weights)
        assert "rows" in cache
        _, nll2, _ = ops.softmax_xent_forward(X, W, b, targets, weights, store=False)
        numpy.testing.assert_array_equal(nll, nll2)
        out[mode] = (loss, nll, *ops.softmax_xent_backward(cache, W))
    for a, b_ in zip(out["numba"], out["numpy"]):
        numpy.testing.assert_allclose(a, b_, rtol=2e-5, atol=2e-5 * (numpy.abs(b_).max() + 1e-3))


def test_onehot_projection_and_scatter_match_numpy():
    rng = numpy.random.default_rng(0)
    Wx = rng.normal(size=(12, 7)).astype(numpy.float32)
    b = rng.normal(size=12).astype(numpy.float32)
    ids = rng.integers(0, 7, 40)
    out = numpy.empty((12, 40), numpy.float32)
    kernels.onehot_projection(Wx, b, ids, out)
    numpy.testing.assert_allclose(out, Wx[:, ids] + b[:, None], rtol=1e-6)
    dXP = rng.normal(size=(12, 40)).astype(numpy.float32)
    dWx, db = numpy.zeros_like(Wx), numpy.zeros_like(b)
    kernels.scatter_columns(dWx, db, ids, dXP)
    ref = numpy.zeros_like(Wx)
    numpy.add.at(ref.T, ids, dXP.T)
    numpy.testing.assert_allclose(dWx, ref, rtol=1e-5, atol=1e-6)
    numpy.testing.assert_allclose(db, dXP.sum(axis=1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1024, 256), (37, 19), (16, 48), (1, 5), (5, 1)])
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_transposed_copies_in_tiles(shape, dtype):
    # Whole and partial 16 x 16 tiles; a view that is not C-contiguous takes NumPy's copy.
    W = numpy.random.default_rng(shape[0]).normal(size=shape).astype(dtype)
    for view in (W, W[:, ::-1], numpy.asfortranarray(W)):
        T = kernels.transposed(view)
        assert T.flags.c_contiguous and T.dtype == dtype
        numpy.testing.assert_array_equal(T, view.T)


def test_fused_adam_matches_plain(monkeypatch):
    out = {}
    for mode, ops in (("numba", CpuOps(Settings())), ("numpy", None)):
        rng = numpy.random.default_rng(0)
        p = {"w": rng.normal(size=(30, 20)).astype(numpy.float32)}
        opt = make_optimizer("adam", p, ops=ops)
        for _ in range(5):
            opt.step({"w": rng.normal(size=(30, 20)).astype(numpy.float32)})
        out[mode] = p["w"]
    numpy.testing.assert_allclose(out["numba"], out["numpy"], atol=2e-6)


@pytest.mark.parametrize("cell", layers.FUSED)  # every cell the engine has twins for: a step each
@pytest.mark.parametrize("embed", [0, 6])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_stepper_matches_model_step(cell, embed, dtype):
    m = LanguageModel.create(ModelConfig(vocab_size=11, cell=cell, layers=2, hidden=8, embed=embed), seed=2,
                             backend=get_backend("cpu", dtype))
    ids = numpy.random.default_rng(0).integers(0, 11, (9, 3))
    stepper, state = m.stepper(3), None
    assert type(stepper).__name__ == "FastStepper"
    for t in range(9):
        fast = stepper.step(ids[t]).copy()
        slow, state = m.step(ids[t], state)
        numpy.testing.assert_allclose(fast, slow, atol=1e-5 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("cell", ["lstm", "rnn", "gru"])
@pytest.mark.parametrize("N", [1, 2, 3, 4, 7, 16])
def test_stepper_on_packed_products_matches_the_blas_one(cell, N):
    """model.stepper(N, packed=True): the layers' products by the engine's packed products from
    2 streams where the CPU runs them (not the GRU, whose hidden product is apart), the same
    logits as the BLAS's stepper to float32 rounding; elsewhere no packed products and the same
    bits."""
    from charnn.engine import packed

    m = LanguageModel.create(ModelConfig(vocab_size=11, cell=cell, layers=2, hidden=40, embed=0), seed=2,
                             backend=get_backend("cpu", "float32"))
    ids = numpy.random.default_rng(0).integers(0, 11, (9, N))
    plain, fast = m.stepper(N), m.stepper(N, packed=True)
    expect = N >= 2 and cell != "gru" and packed.usable(N)
    assert bool(fast.packed) == expect and not plain.packed
    for t in range(9):
        a, b = plain.step(ids[t]).copy(), fast.step(ids[t]).copy()
        if expect:
            numpy.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
        else:
            assert numpy.array_equal(a, b)


@pytest.mark.parametrize("cell,bounds,N", [("lstm", (), 10), ("gru", (), 10), ("rnn", (), 10),
                                           ("lstm", (0, 3, 7, 13), 9)])
def test_two_thread_split_equals_one_thread(monkeypatch, cell, bounds, N):
    """Also with unequal halves (N odd) and the class-factored head."""
    cfg = ModelConfig(vocab_size=13, cell=cell, layers=2, hidden=8, embed=6, dropout=0.2, class_bounds=bounds)
    rng = numpy.random.default_rng(0)
    ids, tg = rng.integers(0, 13, (6, N)), rng.integers(0, 13, (6, N))
    res = []
    for threads in (1, 2):
        m = LanguageModel.create(cfg, backend=cpu("float64", threads=threads))
        assert len(parallel.split_columns(m.ops, m, N)) == threads
        loss, grads, state = m.loss_and_grads(ids, tg, None, rng=numpy.random.default_rng(5))
        nll, _ = m.nll(ids, tg)
        res.append((float(loss), grads, state, nll))
    (l1, g1, s1, n1), (l2, g2, s2, n2) = res
    assert l1 == pytest.approx(l2, abs=1e-14)
    for k in g1:
        numpy.testing.assert_allclose(g1[k], g2[k], atol=1e-15)
    for (h1, _), (h2, _) in zip(s1, s2):
        numpy.testing.assert_array_equal(h1, h2)
    numpy.testing.assert_array_equal(n1, n2)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sparse_embedding_gradient_equals_the_dense_one(monkeypatch, threads, dtype):
    from charnn.nn.optim import RowGrad

    cfg = ModelConfig(vocab_size=40, cell="lstm", layers=2, hidden=8, embed=6, class_bounds=(0, 5, 15, 40))
    m = LanguageModel.create(cfg, backend=cpu(dtype, threads=threads))
    rng = numpy.random.default_rng(0)
    ids, tg = rng.integers(0, 12, (5, 10)), rng.integers(0, 40, (5, 10))  # ids use only 12 of 40 rows
    _, dense, _ = m.loss_and_grads(ids, tg, None)
    _, sparse, _ = m.loss_and_grads(ids, tg, None, sparse=True)
    g = sparse["embed.W"]
    assert isinstance(g, RowGrad) and g.rows.tolist() == sorted(set(ids.ravel().tolist()))
    numpy.testing.assert_allclose(g.dense(), dense["embed.W"], atol=1e-6 if dtype == "float32" else 1e-14)
    for k in dense:
        if k != "embed.W":
            numpy.testing.assert_array_equal(sparse[k], dense[k])


def class_head_case(seed, refill):
    """Inputs of a class-factored head, float32: V = 50 words in 4 classes, D = 12, M = 40
    positions, no targets in class 2 (ids 7..19: those become ``refill``). Returns the
    generator too, for more draws."""
    rng = numpy.random.default_rng(seed)
    V, D, M, bounds = 50, 12, 40, [0, 2, 7, 20, 50]
    X = rng.normal(size=(D, M)).astype(numpy.float32)
    Wc, bc = rng.normal(size=(4, D)).astype(numpy.float32), rng.normal(size=4).astype(numpy.float32)
    W, b = rng.normal(size=(V, D)).astype(numpy.float32), rng.normal(size=V).astype(numpy.float32)
    t = rng.integers(0, V, M)
    t[(t >= 7) & (t < 20)] = refill
    return rng, X, Wc, bc, W, b, bounds, t


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_class_softmax_matches_plain_float32(monkeypatch, weighted, threads):
    """The compiled within-class pass against the per-class NumPy loop: loss, per-position nll
    and every gradient, with and without position weights (a zero weight drops a position),
    on one thread and split by class across two; one class has no targets (its rows of the
    word gradient must come out zero)."""
    rng, X, Wc, bc, W, b, bounds, t = class_head_case(0, refill=3)
    M = t.shape[0]
    w = (rng.random(M) > 0.3).astype(numpy.float32) if weighted else None
    out = {}
    for mode, ops in (("numba", CpuOps(Settings(threads=threads), head_threads=threads)), ("numpy", Ops())):
        loss, nll, cache = ops.class_xent_forward(X, Wc, bc, W, b, bounds, t, t, w)
        assert ("plan" in cache) == (mode == "numba")
        out[mode] = (float(loss), nll.copy(), *ops.class_xent_backward(cache, Wc, W))
    fused, plain = out["numba"], out["numpy"]
    assert fused[0] == pytest.approx(plain[0], rel=1e-6)
    numpy.testing.assert_allclose(fused[1], plain[1], rtol=1e-5, atol=1e-5)
    for a, p in zip(fused[2:], plain[2:]):
        numpy.testing.assert_allclose(a, p, rtol=1e-4, atol=1e-6)
    dW, db = fused[5], fused[6]
    assert not dW[7:20].any() and not db[7:20].any() and dW[20:].any()


@pytest.mark.parametrize("tie", [False, True])
def test_two_thread_split_with_class_head_float32(monkeypatch, tie):
    """The split path of a class-factored model (recurrent layers on two halves, the output
    layer once on the whole batch, its compiled passes split by class) against one thread;
    tied, the halves' row gradients of the embedding are added into the output layer's."""
    cfg = ModelConfig(vocab_size=60, cell="lstm", layers=2, hidden=16, embed=16 if tie else 8, dropout=0.2,
                      tie=tie, class_bounds=(0, 2, 5, 11, 25, 60))
    rng = numpy.random.default_rng(0)
    ids, tg = rng.integers(0, 60, (6, 11)), rng.integers(0, 60, (6, 11))
    res = []
    for threads in (1, 2):
        m = LanguageModel.create(cfg, backend=cpu(threads=threads))
        res.append(m.loss_and_grads(ids, tg, None, rng=numpy.random.default_rng(5), sparse=True))
    (l1, g1, s1), (l2, g2, s2) = res
    assert float(l1) == pytest.approx(float(l2), rel=1e-6)
    for k in g1:
        a, b = (g.dense() if hasattr(g, "dense") else g for g in (g1[k], g2[k]))
        assert numpy.abs(a - b).max() <= 1e-5 * (numpy.abs(a).max() + 1e-12), k
    for (h1, c1), (h2, c2) in zip(s1, s2):
        numpy.testing.assert_allclose(h1, h2, atol=1e-6)
        numpy.testing.assert_allclose(c1, c2, atol=1e-6)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_norm_summed_by_the_class_kernel_equals_the_recomputed_one(monkeypatch, tie, threads):
    """The compiled class pass sums the squares of the word gradient it writes (optim.Grads);
    the global norm from that sum equals the one read back from the arrays. Tied, the input
    gradient is added into that array afterwards, so the sum must be dropped, not used."""
    from charnn.nn.optim import Grads, clip_global_norm, global_norm

    cfg = ModelConfig(vocab_size=60, cell="lstm", layers=1, hidden=16, embed=16, tie=tie,
                      class_bounds=(0, 2, 5, 11, 25, 60))
    m = LanguageModel.create(cfg, backend=cpu(threads=threads))
    rng = numpy.random.default_rng(0)
    ids, tg = rng.integers(0, 60, (6, 11)), rng.integers(0, 60, (6, 11))
    _, grads, _ = m.loss_and_grads(ids, tg, None, sparse=True)
    assert isinstance(grads, Grads)
    assert bool(grads.known_sq) == (not tie)
    recomputed = float(global_norm(dict(grads)))
    assert float(global_norm(grads)) == pytest.approx(recomputed, rel=1e-5)
    clip_global_norm(grads, 1e-3 * recomputed)  # scales in place: the known sums go stale
    assert not grads.known_sq
    assert float(global_norm(grads)) == pytest.approx(1e-3 * recomputed, rel=1e-3)


@pytest.mark.parametrize("mode", ["numba", "numpy"])
@pytest.mark.parametrize("threads", [1, 2])
def test_class_softmax_forward_backward_in_one_equals_the_two_passes(monkeypatch, mode, threads):
    """class_xent_forward_backward (each class's compiled passes back to back; the plain
    path without numba) against class_xent_forward then class_xent_backward; one class gets
    no targets."""
    ops = CpuOps(Settings(threads=threads), head_threads=threads) if mode == "numba" else Ops()
    _, X, Wc, bc, W, b, bounds, t = class_head_case(1, refill=25)
    loss1, nll1, cache = ops.class_xent_forward(X, Wc, bc, W, b, bounds, t, t, None, True)
    grads1 = ops.class_xent_backward(cache, Wc, W)
    loss2, nll2, grads2, sq = ops.class_xent_forward_backward(X, Wc, bc, W, b, bounds, t)
    assert float(loss2) == pytest.approx(float(loss1), rel=1e-6)
    numpy.testing.assert_allclose(nll2, nll1, rtol=1e-6, atol=1e-6)
    for a, p in zip(grads2, grads1):
        numpy.testing.assert_allclose(a, p, rtol=1e-5, atol=1e-7)
    if mode == "numba":
        dW, db = grads2[3], grads2[4]
        assert sq == pytest.approx(float((dW.astype(numpy.float64) ** 2).sum() + (db.astype(numpy.float64) ** 2).sum()), rel=1e-5)
    else:
        assert sq is None

"""Optimizers and global-norm clipping."""

from __future__ import annotations

import math

import numpy
import pytest

from charnn.nn.optim import DEFAULT_LR, OPTIMIZERS, Adam, clip_global_norm, make_optimizer

TARGET = {"w": numpy.array([[1.0, -2.0], [0.5, 3.0]]), "b": numpy.array([-1.0, 0.25, 2.0])}
SCALE = {"w": numpy.array([[1.0, 4.0], [0.5, 2.0]]), "b": numpy.array([3.0, 1.0, 0.2])}


def quadratic(params):
    """L = 1/2 sum s (p - target)², a bowl with different curvatures; returns (L, grads)."""
    loss = sum(0.5 * float((SCALE[k] * (p - TARGET[k]) ** 2).sum()) for k, p in params.items())
    return loss, {k: SCALE[k] * (p - TARGET[k]) for k, p in params.items()}


def fresh():
    rng = numpy.random.default_rng(0)
    return {k: rng.normal(0, 1, v.shape) for k, v in TARGET.items()}


LRS = {"sgd": 0.1, "adagrad": 0.5, "rmsprop": 0.01, "adam": 0.05}


@pytest.mark.parametrize("threads", [1, 2])
def test_global_norm_of_large_gradients(monkeypatch, threads):
    """Above a million elements the sum of squares is shared by two threads (each takes half
    of every array, a RowGrad's values included): same norm as one thread, and as float64."""
    from charnn.engine.cpu import CpuOps
    from charnn.engine.settings import Settings
    from charnn.nn.optim import RowGrad, global_norm

    rng = numpy.random.default_rng(0)
    grads = {"W": rng.normal(size=(3001, 400)).astype(numpy.float32), "b": rng.normal(size=7).astype(numpy.float32),
             "E": RowGrad(numpy.array([2, 5]), rng.normal(size=(2, 3)).astype(numpy.float32), (9, 3))}
    exact = math.sqrt(sum(float((a.astype(numpy.float64) ** 2).sum()) for a in (grads["W"], grads["b"], grads["E"].values)))
    norm = global_norm(grads, CpuOps(Settings(threads=threads)))
    assert norm.dtype == numpy.float32
    assert float(norm) == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_decreases_a_quadratic(name):
    params = fresh()
    opt = make_optimizer(name, params, LRS[name])
    assert opt.name == name
    first, _ = quadratic(params)
    losses = []
    for _ in range(200):
        loss, grads = quadratic(params)
        losses.append(loss)
        opt.step(grads)
    final, _ = quadratic(params)
    assert final < 0.05 * first, (first, final)
    assert losses[1] < losses[0]
    assert opt.t == 200


def test_updates_are_in_place():
    params = fresh()
    w = params["w"]
    opt = make_optimizer("sgd", params, 0.1)
    _, grads = quadratic(params)
    expected = w - 0.1 * grads["w"]
    opt.step(grads)
    assert params["w"] is w
    numpy.testing.assert_allclose(w, expected, rtol=0, atol=1e-15)


def test_default_learning_rates_and_unknown_name():
    for name in OPTIMIZERS:
        assert make_optimizer(name, fresh()).lr == DEFAULT_LR[name]
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("lbfgs", fresh())


def test_adam_first_step_closed_form():
    """After one step m = (1-b1) g, v = (1-b2) g², m̂ = g, v̂ = g², and the update is
    lr * g / (|g| + eps) (PyTorch's form: eps added after the bias correction). A gradient of
    5e-7 moves 0.98 lr; in the paper's efficient form (eps before the correction, 32x larger
    at step 1) it moved 0.61 lr."""
    g = numpy.array([0.3, -2.0, 1e-3, 0.0, 5e-7])
    p = numpy.zeros(5)
    lr = 0.01
    opt = Adam({"p": p}, lr)
    opt.step({"p": g.copy()})
    numpy.testing.assert_allclose(p, -lr * g / (numpy.abs(g) + Adam.eps), rtol=1e-12, atol=0)
    assert abs(p[4] + 0.01 * 5e-7 / (5e-7 + 1e-8)) < 1e-15 and p[4] < -0.0098
    # for gradients far above eps the first step is lr * sign(g), as in the paper
    numpy.testing.assert_allclose(p[:2], -lr * numpy.sign(g[:2]), rtol=2e-7)
    numpy.testing.assert_allclose(opt.state["p.m"], 0.1 * g, rtol=1e-15)
    numpy.testing.assert_allclose(opt.state["p.v"], 0.001 * g * g, rtol=1e-15)


def test_adam_second_step_closed_form():
    g1, g2 = numpy.array([0.5, -1.0, 2e-7]), numpy.array([-0.25, 3.0, 1e-7])
    p = numpy.zeros(3)
    lr = 0.1
    opt = Adam({"p": p}, lr)
    opt.step({"p": g1.copy()})
    p1 = p.copy()
    opt.step({"p": g2.copy()})
    b1, b2, eps = Adam.b1, Adam.b2, Adam.eps
    m = b1 * (1 - b1) * g1 + (1 - b1) * g2
    v = b2 * (1 - b2) * g1 ** 2 + (1 - b2) * g2 ** 2
    m_hat, v_hat = m / (1 - b1 ** 2), v / (1 - b2 ** 2)
    numpy.testing.assert_allclose(p, p1 - lr * m_hat / (numpy.sqrt(v_hat) + eps), rtol=1e-12)


def test_adamw_decays_matrices_first_and_leaves_biases_and_rows_alone():
    """With weight_decay wd each weight matrix is first multiplied by 1 - lr wd (the step's
    lr, so a schedule lowers the decay with the rate) and then takes Adam's step; a bias
    takes Adam's step only, and an embedding's row gradient updates its rows undecayed."""
    from charnn.nn.optim import RowGrad

    rng = numpy.random.default_rng(5)
    w0, b0, e0 = rng.normal(size=(3, 4)), rng.normal(size=4), rng.normal(size=(6, 2))
    gw, gb = rng.normal(size=(3, 4)), rng.normal(size=4)
    ge = RowGrad(numpy.array([1, 4]), rng.normal(size=(2, 2)), (6, 2))
    params = {"w": w0.copy(), "b": b0.copy(), "e": e0.copy()}
    lr, wd = 0.01, 0.5
    opt = make_optimizer("adam", params, lr, weight_decay=wd)
    opt.step({"w": gw.copy(), "b": gb.copy(), "e": RowGrad(ge.rows, ge.values.copy(), ge.shape)})
    adam = lambda g: lr * g / (numpy.abs(g) + Adam.eps)  # noqa: E731  (Adam's first step)
    numpy.testing.assert_allclose(params["w"], w0 * (1 - lr * wd) - adam(gw), rtol=1e-12)
    numpy.testing.assert_allclose(params["b"], b0 - adam(gb), rtol=1e-12)
    expected = e0.copy()
    expected[ge.rows] -= adam(ge.values)
    numpy.testing.assert_allclose(params["e"], expected, rtol=1e-12)
    # the second step's decay uses the lr of that step
    opt.lr = 0.002
    before = params["w"].copy()
    opt.step({"w": numpy.zeros((3, 4)), "b": numpy.zeros(4), "e": RowGrad(ge.rows, ge.values * 0, ge.shape)})
    m, v = Adam.b1 * 0.1 * gw, Adam.b2 * 0.001 * gw ** 2
    step = 0.002 * (m / (1 - Adam.b1 ** 2)) / (numpy.sqrt(v / (1 - Adam.b2 ** 2)) + Adam.eps)
    numpy.testing.assert_allclose(params["w"], before * (1 - 0.002 * wd) - step, rtol=1e-12)


def test_weight_decay_is_refused_for_other_optimizers_and_zero_changes_nothing():
    with pytest.raises(ValueError, match="adam optimizer only, not sgd"):
        make_optimizer("sgd", fresh(), 0.1, weight_decay=0.1)
    with pytest.raises(ValueError, match="below 1"):
        make_optimizer("adam", fresh(), None, weight_decay=1 / 3e-3)
    a, b = fresh(), fresh()
    g = {k: numpy.ones_like(v) for k, v in a.items()}
    make_optimizer("adam", a, 0.01).step({k: v.copy() for k, v in g.items()})
    make_optimizer("adam", b, 0.01, weight_decay=0.0).step({k: v.copy() for k, v in g.items()})
    for k in a:
        numpy.testing.assert_array_equal(a[k], b[k])


def test_fused_adamw_equals_the_plain_update(monkeypatch):
    """The compiled Adam path (threads on) with weight decay: the plain update's result to
    float32 rounding, and the decay applied (the matrix shrinks where its gradient is zero)."""
    from charnn.engine import kernels
    from charnn.engine.cpu import CpuOps
    from charnn.engine.settings import Settings

    if not kernels.available:
        pytest.skip("numba not installed")
    rng = numpy.random.default_rng(4)
    init = {"big": rng.normal(size=(300, 257)).astype(numpy.float32), "b": rng.normal(size=9).astype(numpy.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(numpy.float32) for k, v in init.items()} for _ in range(3)]
    for g in grads:
        g["big"][0] = 0
    results = []
    for ops in (CpuOps(Settings(threads=2, kernels="numba")), None):
        p = {k: v.copy() for k, v in init.items()}
        opt = make_optimizer("adam", p, 0.01, ops, weight_decay=0.1)
        for g in grads:
            opt.step({k: v.copy() for k, v in g.items()}, numpy.float32(0.5))
        results.append(p)
    for k in init:
        numpy.testing.assert_allclose(results[0][k], results[1][k], rtol=2e-5, atol=1e-6)
    numpy.testing.assert_allclose(results[0]["big"][0], init["big"][0] * (1 - 0.01 * 0.1) ** 3, rtol=1e-6)


def test_sgd_adagrad_rmsprop_formulas():
    g = numpy.array([0.5, -2.0])
    p = numpy.zeros(2)
    make_optimizer("sgd", {"p": p}, 0.3).step({"p": g})
    numpy.testing.assert_allclose(p, -0.3 * g, rtol=1e-15)
    p = numpy.zeros(2)
    opt = make_optimizer("adagrad", {"p": p}, 0.1)
    opt.step({"p": g})
    opt.step({"p": g})
    numpy.testing.assert_allclose(p, -0.1 * g / (numpy.abs(g) + 1e-8) - 0.1 * g / (numpy.sqrt(2) * numpy.abs(g) + 1e-8),
                                  rtol=1e-12)
    p = numpy.zeros(2)
    make_optimizer("rmsprop", {"p": p}, 0.01).step({"p": g})
    numpy.testing.assert_allclose(p, -0.01 * g / (numpy.sqrt(0.05) * numpy.abs(g) + 1e-8), rtol=1e-12)


def test_clip_global_norm_scales_to_max_norm():
    grads = {"a": numpy.array([[3.0, 0.0], [0.0, 0.0]]), "b": numpy.array([4.0, 0.0]), "s": numpy.array(12.0)}
    norm = clip_global_norm(grads, 6.5)
    assert float(norm) == pytest.approx(13.0, abs=1e-12)  # sqrt(9 + 16 + 144), before clipping
    after = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    assert after == pytest.approx(6.5, rel=1e-6)
    numpy.testing.assert_allclose(grads["a"][0, 0] / grads["b"][0], 3 / 4)  # direction kept
    assert float(grads["s"]) == pytest.approx(6.0, rel=1e-6)


def test_clip_global_norm_leaves_small_gradients_alone():
    grads = {"a": numpy.array([0.3, -0.4])}
    norm = clip_global_norm(grads, 5.0)
    assert float(norm) == pytest.approx(0.5)
    numpy.testing.assert_array_equal(grads["a"], [0.3, -0.4])
    grads = {"a": numpy.array([30.0, -40.0])}
    assert float(clip_global_norm(grads, 0)) == pytest.approx(50.0)  # 0: measure only
    numpy.testing.assert_array_equal(grads["a"], [30.0, -40.0])


def test_clip_global_norm_float32():
    grads = {"a": numpy.full((3, 4), 10.0, dtype=numpy.float32)}
    clip_global_norm(grads, 1.0)
    assert grads["a"].dtype == numpy.float32
    assert float(numpy.sqrt((grads["a"].astype(float) ** 2).sum())) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_round_trip_gives_identical_updates(name):
    params = fresh()
    opt = make_optimizer(name, params, LRS[name])
    for _ in range(5):
        opt.step(quadratic(params)[1])
    saved_state, saved_t = opt.state_arrays(), opt.t
    assert all(type(v) is numpy.ndarray for v in saved_state.values())
    clone = {k: v.copy() for k, v in params.items()}
    opt2 = make_optimizer(name, clone, LRS[name])
    opt2.load_state_arrays({k: v.copy() for k, v in saved_state.items()}, saved_t)
    assert opt2.t == 5
    for _ in range(5):
        opt.step(quadratic(params)[1])
        opt2.step(quadratic(clone)[1])
        for k in params:
            numpy.testing.assert_array_equal(clone[k], params[k])
    if name != "sgd":
        assert saved_state  # stateful optimizers did save something


def test_adam_without_restored_step_count_differs():
    """The step count is part of the state: bias correction depends on it."""
    params = fresh()
    opt = make_optimizer("adam", params, 0.05)
    for _ in range(3):
        opt.step(quadratic(params)[1])
    clone = {k: v.copy() for k, v in params.items()}
    opt2 = make_optimizer("adam", clone, 0.05)
    opt2.load_state_arrays(opt.state_arrays(), 0)
    g = quadratic(params)[1]
    opt.step(g)
    opt2.step({k: v.copy() for k, v in g.items()})
    assert not numpy.allclose(clone["w"], params["w"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_with_a_clip_scale_equals_clipping_first(name):
    """opt.step(grads, clip_scale(global_norm(grads), c)) is clip_global_norm then step."""
    from charnn.nn.optim import clip_scale, global_norm

    rng = numpy.random.default_rng(1)
    shapes = {"big": (300, 400), "w": (7, 5), "b": (7,)}  # "big" takes the two-thread path
    for dtype in (numpy.float32, numpy.float64):
        init = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
        grads = [{k: (10 * rng.normal(size=s)).astype(dtype) for k, s in shapes.items()} for _ in range(3)]
        a = {k: v.copy() for k, v in init.items()}
        b = {k: v.copy() for k, v in init.items()}
        oa, ob = make_optimizer(name, a, 0.01), make_optimizer(name, b, 0.01)
        for g in grads:
            ga = {k: v.copy() for k, v in g.items()}
            clip_global_norm(ga, 3.0)
            oa.step(ga)
            gb = {k: v.copy() for k, v in g.items()}
            scale = clip_scale(global_norm(gb), 3.0)
            assert float(scale) < 1
            ob.step(gb, scale)
        for k in a:
            numpy.testing.assert_allclose(a[k], b[k], rtol=1e-6 if dtype == numpy.float32 else 1e-12, atol=1e-7)
        assert not numpy.allclose(a["big"], init["big"])
    assert clip_scale(global_norm(grads[0]), 0) is None


def test_fused_adam_in_two_threads_equals_one(monkeypatch):
    """The compiled Adam cuts large arrays in two and runs the halves in two threads: the same
    result, bit for bit, as with the threads off, and the plain NumPy update's to float32
    rounding."""
    from charnn.engine import kernels
    from charnn.engine.cpu import ADAM_HALF, CpuOps
    from charnn.engine.settings import Settings

    if not kernels.available:
        pytest.skip("numba not installed")
    rng = numpy.random.default_rng(2)
    rows = 2 * ADAM_HALF // 257 + 3  # large enough for two threads: each half over ADAM_HALF values
    init = {"big": rng.normal(size=(rows, 257)).astype(numpy.float32), "b": rng.normal(size=9).astype(numpy.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(numpy.float32) for k, v in init.items()} for _ in range(3)]
    results = []
    for threads, kern in ((2, "numba"), (1, "numba"), (2, "numpy")):
        p = {k: v.copy() for k, v in init.items()}
        opt = Adam(p, 0.01, CpuOps(Settings(threads=threads, kernels=kern == "numba")))
        for g in grads:
            opt.step({k: v.copy() for k, v in g.items()}, numpy.float32(0.5))
        results.append(p)
    for k in init:
        numpy.testing.assert_array_equal(results[0][k], results[1][k])
        numpy.testing.assert_allclose(results[0][k], results[2][k], rtol=2e-5, atol=1e-6)


# ----- row-sparse gradients (embedding tables) -----

def test_rowgrad_from_ids_sums_duplicates_and_merges():
    from charnn.nn.optim import RowGrad

    rng = numpy.random.default_rng(3)
    ids, src = numpy.array([2, 5, 2, 0]), rng.normal(size=(4, 3))
    g = RowGrad.from_ids(ids, src, (6, 3))
    expected = numpy.zeros((6, 3))
    numpy.add.at(expected, ids, src)
    assert g.rows.tolist() == [0, 2, 5]
    numpy.testing.assert_allclose(g.dense(), expected, atol=1e-15)
    other = RowGrad.from_ids(numpy.array([5, 1]), numpy.ones((2, 3)), (6, 3))
    g += other
    numpy.add.at(expected, [5, 1], numpy.ones((2, 3)))
    assert g.rows.tolist() == [0, 1, 2, 5]
    numpy.testing.assert_allclose(g.dense(), expected, atol=1e-15)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_rowgrad_updates_only_its_rows(name):
    """First step: the same as the dense gradient with zero rows (every optimizer leaves a
    zero-gradient row alone on its first step). Later steps are lazy: rows outside the
    gradient do not move, where dense Adam's momentum would still move them."""
    from charnn.nn.optim import RowGrad, clip_scale, global_norm

    rng = numpy.random.default_rng(4)
    W = rng.normal(size=(10, 4))
    rows = numpy.array([1, 3, 7])
    vals = rng.normal(size=(3, 4))
    dense = numpy.zeros_like(W)
    dense[rows] = vals
    a, b = {"W": W.copy()}, {"W": W.copy()}
    oa, ob = make_optimizer(name, a, 0.05), make_optimizer(name, b, 0.05)
    sparse = {"W": RowGrad(rows, vals.copy(), W.shape)}
    assert float(global_norm(sparse)) == pytest.approx(float(global_norm({"W": dense})), rel=1e-12)
    scale = clip_scale(global_norm(sparse), 0.5)
    oa.step({"W": dense.copy()}, scale)
    ob.step(sparse, scale)
    numpy.testing.assert_allclose(b["W"], a["W"], rtol=1e-12, atol=1e-14)
    assert not numpy.allclose(b["W"][rows], W[rows])
    before = b["W"].copy()
    ob.step({"W": RowGrad(numpy.array([1, 2]), rng.normal(size=(2, 4)), W.shape)})
    untouched = [0, 3, 4, 5, 6, 7, 8, 9]
    numpy.testing.assert_array_equal(b["W"][untouched], before[untouched])
    assert not numpy.allclose(b["W"][[1, 2]], before[[1, 2]])
    for key, arr in ob.state.items():
        assert arr.shape == W.shape, key

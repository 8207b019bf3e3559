"""The full model pipeline through the backend interface on a stand-in array module that refuses
silent host conversion the way CuPy does, so host/device mixing is caught without a GPU.

Every case runs the same steps on the stand-in and on plain NumPy and compares: forward (with
and without dropout), backward, clipping, an optimizer step, a second forward, step() for
sampling, and a gradient check. All parameters, gradients and optimizer state must stay
stand-in arrays: nothing may silently fall back to the host.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy
import pytest

from charnn.io import checkpoint
from charnn.backend import array_module, get_backend, to_device, to_float, to_host
from charnn.gradcheck import check_model, random_chunk
from charnn.nn.model import LanguageModel, ModelConfig
from charnn.nn.optim import OPTIMIZERS, clip_global_norm, make_optimizer
from charnn.io.vocab import Vocab

from standin import StrictArray, is_device, scalar_reads_forbidden, standin, standin_backend


# ----- the stand-in really refuses what CuPy refuses -----

def test_standin_refuses_host_device_mixing():
    a = standin.asarray(numpy.arange(3.0))
    host = numpy.ones(3)
    assert type(a) is StrictArray
    with pytest.raises(TypeError, match="Unsupported type"):
        a + host
    with pytest.raises(TypeError, match="Unsupported type"):
        host + a
    with pytest.raises(TypeError, match="Unsupported type"):
        a @ numpy.ones((3, 2))
    with pytest.raises(TypeError, match="Unsupported type"):
        a += host
    with pytest.raises(TypeError, match="Unsupported type"):
        standin.tanh(host)
    with pytest.raises(TypeError, match="Unsupported type"):
        standin.matmul(numpy.ones((2, 3)), a)
    out = standin.empty(3)
    with pytest.raises(TypeError, match="Unsupported type"):
        standin.multiply(a, host, out=out)
    with pytest.raises(TypeError, match="Unsupported type"):
        standin.concatenate([a, host])
    with pytest.raises(TypeError, match="Unsupported type"):
        standin.add.at(standin.zeros(3), numpy.array([0, 1]), 1.0)


def test_standin_refuses_plain_numpy_calls():
    a = standin.asarray(numpy.arange(3.0))
    with pytest.raises(TypeError, match="numpy.tanh"):
        numpy.tanh(a)
    with pytest.raises(TypeError, match="numpy.add"):
        numpy.add(a, a)
    with pytest.raises(TypeError, match="numpy.sum"):
        numpy.sum(a)
    with pytest.raises(TypeError, match="numpy.concatenate"):
        numpy.concatenate([a, a])
    with pytest.raises(TypeError, match="numpy.dot"):
        numpy.dot(a, a)
    with pytest.raises(TypeError):
        numpy.testing.assert_allclose(a, a)
    with pytest.raises(TypeError):
        a.__array__()


def test_scalar_reads_can_be_forbidden():
    a = standin.asarray(numpy.array([2.5]))
    assert float(a.sum()) == 2.5  # allowed by default, as in CuPy
    with scalar_reads_forbidden():
        for read in (lambda: float(a.sum()), lambda: bool(a.sum()), lambda: a.item(), lambda: a.tolist(),
                     lambda: int(a.sum())):
            with pytest.raises(TypeError, match="sync"):
                read()
        assert to_float(a.sum()) == 2.5  # the explicit path
    assert a.item() == 2.5


def test_standin_computes_like_numpy():
    h = numpy.linspace(-2, 2, 6).reshape(2, 3)
    a = standin.asarray(h)
    assert array_module(a) is standin
    assert standin.asarray(h) is not standin.asarray(h)  # a device copy each time
    b = standin.empty_like(a)
    r = standin.tanh(a, out=b)
    assert r is b and is_device(b)
    numpy.testing.assert_array_equal(to_host(b), numpy.tanh(h))
    s = (a * 2 + 1).sum(axis=1)
    assert is_device(s)
    numpy.testing.assert_array_equal(to_host(s), (h * 2 + 1).sum(axis=1))
    # 0-d results stay on the device, as CuPy's do; reading one back is explicit
    total = a.sum()
    assert is_device(total) and total.shape == ()
    assert to_float(total) == pytest.approx(h.sum())
    assert is_device(standin.vdot(a.ravel(), a.ravel()))
    z = standin.zeros((3, 2))
    standin.add.at(z, standin.asarray(numpy.array([0, 0, 2])), standin.ones(2))
    numpy.testing.assert_array_equal(to_host(z), [[2, 2], [0, 0], [1, 1]])
    assert standin.float32 is numpy.float32 and standin.newaxis is None
    # host -> device only through to_device (xp.asarray), device -> host only through to_host
    d = to_device(h, standin, numpy.float32)
    assert is_device(d) and d.dtype == numpy.float32
    back = to_host(d)
    assert type(back) is numpy.ndarray
    back[0, 0] = 99  # a copy
    assert to_host(d)[0, 0] != 99


# ----- the model pipeline -----

CASES = [
    dict(cell="rnn", embed=0), dict(cell="rnn", embed=3, activation="relu"),
    dict(cell="lstm", embed=0), dict(cell="lstm", embed=3),
    dict(cell="gru", embed=0), dict(cell="gru", embed=3),
    dict(cell="lstm", embed=4, tie=True),
]


def run_pipeline(config, backend, optimizer="adam", weights=False):
    """Forward, backward, clip, an optimizer step, forward again, and sampling steps.

    Returns host copies of everything for comparison, and the device objects for type checks.
    On the stand-in, implicit scalar reads (hidden device syncs) are refused as well."""
    if backend.xp is standin:
        with scalar_reads_forbidden():
            return _run_pipeline(config, backend, optimizer, weights)
    return _run_pipeline(config, backend, optimizer, weights)


def _run_pipeline(config, backend, optimizer, weights):
    model = LanguageModel.create(config, seed=1, backend=backend)
    T, N = 4, 3
    rng = numpy.random.default_rng(2)
    ids = rng.integers(0, config.vocab_size, (T, N))
    targets = rng.integers(0, config.vocab_size, (T, N))
    w = (rng.random((T, N)) > 0.3).astype(float) if weights else None
    train = config.dropout > 0
    loss, cache, state = model.forward(ids, targets, train=train, rng=numpy.random.default_rng(3), weights=w)
    grads, dstate = model.backward(cache)
    norm = clip_global_norm(grads, 0.5)
    opt = make_optimizer(optimizer, model.params)
    opt.step(grads)
    loss2, cache2, state2 = model.forward(ids, targets, state, train=train, rng=numpy.random.default_rng(4))
    eval_loss, eval_cache, _ = model.forward(ids, targets, state2, store=False)
    logits, st = model.step(ids[0], state2)
    logits2, st = model.step(ids[1], st)
    host = {
        "loss": to_float(loss), "loss2": to_float(loss2), "eval_loss": to_float(eval_loss),
        "norm": to_float(norm), "nll": to_host(eval_cache["nll"]),
        "logits": to_host(logits), "logits2": to_host(logits2),
        **{f"param:{k}": to_host(v) for k, v in model.params.items()},
        **{f"grad:{k}": to_host(v) for k, v in grads.items()},
        **{f"opt:{k}": v for k, v in opt.state_arrays().items()},
    }
    for i, ((h, c), (dh, dc)) in enumerate(zip(state2, dstate)):
        host[f"state:{i}.h"] = to_host(h)
        host[f"dstate:{i}.h"] = to_host(dh)
        if c is not None:
            host[f"state:{i}.c"] = to_host(c)
            host[f"dstate:{i}.c"] = to_host(dc)
    device = dict(model=model, loss=loss, loss2=loss2, norm=norm, grads=grads, dstate=dstate, opt=opt,
                  state=state2, step_state=st, logits=logits, cache=cache)
    return host, device


def assert_same(got, want, atol):
    assert got.keys() == want.keys()
    for k in want:
        numpy.testing.assert_allclose(got[k], want[k], rtol=0, atol=atol, err_msg=k)


def assert_on_device(dev):
    model = dev["model"]
    for name, p in model.params.items():
        assert is_device(p), f"parameter {name} is {type(p)}"
    for name, g in dev["grads"].items():
        assert is_device(g), f"gradient {name} is {type(g)}"
    for name, s in dev["opt"].state.items():
        assert is_device(s), f"optimizer state {name} is {type(s)}"
    for key in ("loss", "loss2", "norm", "logits"):
        assert is_device(dev[key]), f"{key} is {type(dev[key])}"
    for states in (dev["state"], dev["step_state"], dev["dstate"]):
        for h, c in states:
            assert is_device(h) and (c is None or is_device(c))
    assert set(dev["grads"]) == set(model.params)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_pipeline_matches_numpy_float64(case, dropout):
    config = ModelConfig(vocab_size=9, layers=2, hidden=4, dropout=dropout, **case)
    got, dev = run_pipeline(config, standin_backend(numpy.float64))
    want, _ = run_pipeline(config, get_backend("cpu", "float64"))
    assert_on_device(dev)
    assert_same(got, want, atol=1e-12)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_optimizer_on_the_device(optimizer):
    config = ModelConfig(vocab_size=9, cell="gru", layers=1, hidden=4, embed=3)
    got, dev = run_pipeline(config, standin_backend(numpy.float64), optimizer)
    want, _ = run_pipeline(config, get_backend("cpu", "float64"), optimizer)
    assert_on_device(dev)
    assert_same(got, want, atol=1e-12)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_pipeline_matches_numpy_float32(cell):
    config = ModelConfig(vocab_size=9, cell=cell, layers=2, hidden=4, embed=3, dropout=0.2)
    got, dev = run_pipeline(config, standin_backend(numpy.float32))
    want, _ = run_pipeline(config, get_backend("cpu", "float32"))
    assert_on_device(dev)
    assert dev["model"].params["rnn.0.Wx"].dtype == numpy.float32
    assert dev["grads"]["rnn.0.Wx"].dtype == numpy.float32
    assert_same(got, want, atol=1e-6)


def test_weighted_loss_on_the_device():
    config = ModelConfig(vocab_size=9, cell="lstm", layers=1, hidden=4)
    got, dev = run_pipeline(config, standin_backend(), weights=True)
    want, _ = run_pipeline(config, get_backend("cpu", "float64"), weights=True)
    assert_on_device(dev)
    assert_same(got, want, atol=1e-12)


def test_large_vocabulary_scatter_on_the_device():
    """Above ONE_HOT_SCATTER_MAX_V the one-hot gradient scatter uses xp.add.at instead of a GEMM."""
    from charnn.nn import functional

    config = ModelConfig(vocab_size=9, cell="rnn", layers=1, hidden=3, embed=0)
    got_gemm, _ = run_pipeline(config, standin_backend())
    old = functional.ONE_HOT_SCATTER_MAX_V
    try:
        functional.ONE_HOT_SCATTER_MAX_V = 4
        got_at, dev = run_pipeline(config, standin_backend())
        want, _ = run_pipeline(config, get_backend("cpu", "float64"))
    finally:
        functional.ONE_HOT_SCATTER_MAX_V = old
    assert_on_device(dev)
    assert_same(got_at, want, atol=1e-12)
    assert_same(got_at, got_gemm, atol=1e-12)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_gradcheck_on_the_device(cell):
    config = ModelConfig(vocab_size=7, cell=cell, layers=2, hidden=3, embed=3, dropout=0.2)
    model = LanguageModel.create(config, seed=0, backend=standin_backend())
    ids, targets = random_chunk(7, 3, 2, seed=0)
    results = check_model(model, ids, targets, max_elements=10)
    bad = [(r.name, r.max_rel_error) for r in results if not r.passed]
    assert not bad, bad
    assert all(is_device(p) for p in model.params.values())


def test_checkpoint_round_trip_onto_the_device(tmp_path):
    config = ModelConfig(vocab_size=5, cell="lstm", layers=1, hidden=3)
    vocab = Vocab.build_char("abcde")
    _, dev = run_pipeline(config, standin_backend())
    model, opt = dev["model"], dev["opt"]
    state = [(to_host(h), None if c is None else to_host(c)) for h, c in dev["state"]]
    path = tmp_path / "m.npz"
    checkpoint.save(path, checkpoint.Checkpoint(config, vocab, model.host_params(), {"step": 1, "train": {"batch_size": 3}},
                                                opt.state_arrays(), state))
    loaded, _, ckpt = checkpoint.load_model(path, standin_backend())
    assert all(is_device(p) for p in loaded.params.values())
    opt2 = make_optimizer("adam", loaded.params)
    opt2.load_state_arrays(ckpt.optim, opt.t)
    assert all(is_device(s) for s in opt2.state.values())
    ids = numpy.array([[0, 1, 2], [3, 4, 0]])
    la, _, _ = model.forward(ids, ids, store=False)
    lb, _, _ = loaded.forward(ids, ids, store=False)
    assert to_float(la) == to_float(lb)


def test_sparse_embedding_step_on_the_standin():
    """The row-sparse embedding gradient and the lazy Adam update stay on the device and match
    NumPy."""
    config = ModelConfig(vocab_size=11, cell="lstm", layers=1, hidden=4, embed=3, class_bounds=(0, 4, 11))
    rng = numpy.random.default_rng(0)
    ids, tg = rng.integers(0, 11, (4, 3)), rng.integers(0, 11, (4, 3))
    out = []
    for backend in (get_backend("cpu", "float64"), standin_backend("float64")):
        model = LanguageModel.create(config, seed=1, backend=backend)
        opt = make_optimizer("adam", model.params)
        ctx = scalar_reads_forbidden() if backend.xp is standin else nullcontext()
        with ctx:
            _, grads, _ = model.loss_and_grads(ids, tg, None, sparse=True)
            assert is_device(grads["embed.W"].values) == (backend.xp is standin)
            from charnn.nn.optim import clip_scale, global_norm

            opt.step(grads, clip_scale(global_norm(grads), 0.5))
        out.append({k: to_host(v) for k, v in model.params.items()})
    for k in out[0]:
        numpy.testing.assert_allclose(out[1][k], out[0][k], rtol=1e-12, atol=1e-14)


def test_forbidding_scalar_reads_from_two_threads_leaves_them_allowed_after():
    """Two threads in scalar_reads_forbidden() blocks that they leave in the other order than
    they entered (test_dist's two ranks do): reads are allowed again once both have left."""
    import threading

    a = standin.asarray(numpy.array([1.5]))
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    refused = []

    def first():
        with scalar_reads_forbidden():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second():
        first_in.wait(10)
        with scalar_reads_forbidden():
            second_in.set()
            first_out.wait(10)
            try:
                float(a.sum())  # the other thread has left, this block is still open
            except TypeError as e:
                refused.append("sync" in str(e))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert refused == [True]
    assert float(a.sum()) == 1.5

"""Every path of the CPU engine against the reference (nn/ops.Ops), on the same inputs.

The paths are chosen by passing settings (engine/settings.py), never by patching modules:
the compiled gate kernels with the LSTM's compiled time loop (and its packed products where
the CPU has AVX-512), the kernels with Python time loops (rowsplit off), the row split and
the batch split (two threads), and the reference's own array code. Inputs have random
nonzero biases (folded into XP, and the GRU's bhn) and random initial states, so a bias or a
state a kernel drops shows. Every output is compared: h over the chunk, the final h and c,
the loss, every gradient, dh0 and dc0.

Tolerances, float32: the kernels' rational tanh is within 3.6e-7 of tanh (3 ulp) and their
products sum in another order than NumPy's, so an output of magnitude 1 may differ by a few
1e-6 after a chunk of steps; gradients summed over T*N positions are compared relative to
their largest entry (2e-5). float64 runs the reference maths on every path (the kernels take
float32 only), so the splits there must agree to rounding (1e-12).
"""

from __future__ import annotations

import numpy
import pytest

from charnn.backend import get_backend
from charnn.engine import kernels, layers, loops, packed, parallel
from charnn.engine.cpu import CpuOps
from charnn.engine.settings import Settings
from charnn.nn import cells
from charnn.nn.model import LanguageModel, ModelConfig
from charnn.nn.ops import Ops

needs_numba = pytest.mark.skipif(not kernels.available, reason="numba is not installed")
needs_loops = pytest.mark.skipif(not (kernels.available and loops.compiled_loops()),
                                 reason="needs numba and a CBLAS sgemm in NumPy's BLAS")

# The engine's paths, by the settings that choose them (two threads where a split is tried).
PATHS = {
    "compiled loop": Settings(threads=1, kernels=True, rowsplit=True, packed=False),
    "compiled loop, packed": Settings(threads=1, kernels=True, rowsplit=True, packed=True),
    "python loop": Settings(threads=1, kernels=True, rowsplit=False, packed=False),
    "plain, threads": Settings(threads=2, kernels=False, rowsplit=False, packed=False),
    "batch or row split": Settings(threads=2, kernels=True, rowsplit=True, packed=True),
    "batch split, python loop": Settings(threads=2, kernels=True, rowsplit=False, packed=False),
}
CELLS = [("lstm", "tanh"), ("gru", "tanh"), ("rnn", "tanh"), ("rnn", "relu")]


def close(a, b, rel, name):
    a, b = numpy.asarray(a, dtype=numpy.float64), numpy.asarray(b, dtype=numpy.float64)
    assert a.shape == b.shape, name
    assert numpy.abs(a - b).max() <= rel * (numpy.abs(b).max() + 1e-12), (name, numpy.abs(a - b).max())


def layer_case(cell, H, N, T, seed=0):
    rng = numpy.random.default_rng(seed)
    f = numpy.float32
    G = cells.get(cell).gates
    XP = rng.normal(0, 0.8, (G * H, T, N)).astype(f) + rng.normal(0, 0.5, (G * H, 1, 1)).astype(f)  # a bias
    Wh = rng.normal(0, 1 / numpy.sqrt(H), (G * H, H)).astype(f)
    h0 = rng.normal(0, 0.5, (H, N)).astype(f)
    c0 = rng.normal(0, 0.5, (H, N)).astype(f) if cells.get(cell).has_c else None
    extra = {name: rng.normal(0, 0.5, shape(H)).astype(f) for name, shape in cells.get(cell).extra.items()}
    dhs = rng.normal(0, 1, (H, T, N)).astype(f)
    return XP, Wh, h0, c0, extra, dhs


def run_layer(ops, cell, activation, case):
    XP, Wh, h0, c0, extra, dhs = case
    hs, (h, c), cache = ops.layer_forward(cell, XP, Wh, h0, c0, extra, True, activation)
    hs2, (h2, c2), _ = ops.layer_forward(cell, XP, Wh, h0, c0, extra, False, activation)
    numpy.testing.assert_array_equal(hs, hs2)  # evaluation runs the same numbers as training
    dXP, dWh, dextra, dh0, dc0 = ops.layer_backward(cell, dhs.copy(), cache, Wh)
    return {"hs": hs, "h": h, "c": c, "dXP": dXP, "dWh": dWh, "dh0": dh0, "dc0": dc0,
            **{f"d{k}": v for k, v in dextra.items()}}


@needs_numba
@pytest.mark.parametrize("path", ["compiled loop", "compiled loop, packed", "python loop"])
@pytest.mark.parametrize("cell,activation", CELLS)
@pytest.mark.parametrize("H,N,T", [(16, 5, 7), (24, 16, 6), (8, 32, 4), (16, 1, 5), (8, 3, 2)])
def test_layer_paths_match_the_reference(path, cell, activation, H, N, T):
    case = layer_case(cell, H, N, T)
    want = run_layer(Ops(), cell, activation, case)
    got = run_layer(CpuOps(PATHS[path]), cell, activation, case)
    assert got.keys() == want.keys()
    for name in want:
        if want[name] is None:
            assert got[name] is None, name
        else:
            close(got[name], want[name], 2e-5 if name.startswith("d") else 1e-5, name)


@needs_loops
@pytest.mark.parametrize("H,N,T", [(16, 5, 7), (40, 16, 9), (16, 2, 1)])
def test_row_split_layer_matches_the_reference(H, N, T):
    case = layer_case("lstm", H, N, T, seed=1)
    want = run_layer(Ops(), "lstm", "tanh", case)
    two = CpuOps(Settings(threads=2)).derive(two=True)
    got = run_layer(two, "lstm", "tanh", case)
    for name in want:
        close(got[name], want[name], 2e-5 if name.startswith("d") else 1e-5, name)


def model_case(cell, activation, embed, tie, bounds, N, dtype, seed=3):
    H = 16
    cfg = ModelConfig(vocab_size=60, cell=cell, layers=2, hidden=H, embed=H if tie else embed, tie=tie,
                      class_bounds=bounds, activation=activation, dropout=0.2)
    rng = numpy.random.default_rng(seed)
    params = {}
    from charnn.nn.model import init_params

    for name, p in init_params(cfg, seed).items():  # every bias nonzero
        params[name] = p + rng.normal(0, 0.3, p.shape) if name.endswith((".b", ".bhn")) else p
    T = 7
    ids, tg = rng.integers(0, 60, (T, N)), rng.integers(0, 60, (T, N))
    has_c = cells.get(cell).has_c
    state = [(rng.normal(0, 0.5, (H, N)).astype(dtype), rng.normal(0, 0.5, (H, N)).astype(dtype) if has_c else None)
             for _ in range(2)]
    return cfg, params, ids, tg, state


def run_model(settings, case, dtype):
    cfg, params, ids, tg, state = case
    backend = get_backend("cpu", dtype, settings=settings)
    if settings is None:
        backend = type(backend)(xp=backend.xp, dtype=backend.dtype, device="cpu", ops=Ops())
    m = LanguageModel(cfg, params, backend)
    loss, grads, new_state = m.loss_and_grads(ids, tg, [(h.copy(), None if c is None else c.copy()) for h, c in state],
                                              rng=numpy.random.default_rng(5), sparse=cfg.embed > 0 and not cfg.tie)
    nll, _ = m.nll(ids, tg, state)
    out = {"loss": loss, "nll": nll}
    for k, g in grads.items():
        out[k] = g.dense() if hasattr(g, "dense") else g
    for layer, (h, c) in enumerate(new_state):
        out[f"h{layer}"] = h
        if c is not None:
            out[f"c{layer}"] = c
    return out


@needs_numba
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("cell,activation", CELLS)
@pytest.mark.parametrize("embed,tie,bounds,N", [(0, False, (), 11), (8, False, (), 20), (0, True, (0, 3, 9, 25, 60), 9)])
def test_training_step_paths_match_the_reference_float32(path, cell, activation, embed, tie, bounds, N):
    """A whole training step (dropout on, state carried in, a sparse embedding gradient) and
    a scoring pass through each path, against the reference operations."""
    case = model_case(cell, activation, embed, tie, bounds, N, numpy.float32)
    want = run_model(None, case, "float32")
    got = run_model(PATHS[path], case, "float32")
    assert got.keys() == want.keys()
    for name in want:
        close(got[name], want[name], 2e-5, name)


@pytest.mark.parametrize("path", ["plain, threads", "batch or row split"])
@pytest.mark.parametrize("cell,activation", CELLS)
def test_splits_match_the_reference_float64(path, cell, activation):
    case = model_case(cell, activation, 8, False, (0, 3, 9, 25, 60), 12, numpy.float64)
    want = run_model(None, case, "float64")
    got = run_model(PATHS[path], case, "float64")
    for name in want:
        close(got[name], want[name], 1e-12, name)


def test_the_engine_declares_what_it_overrides():
    """Every method CpuOps defines itself is in its ``accelerated`` set, and every name there is
    one of the reference's operations."""
    own = {name for name, value in vars(CpuOps).items()
           if callable(value) and not name.startswith("_") and hasattr(Ops, name)}
    assert own == set(CpuOps.accelerated)
    assert all(hasattr(Ops, name) for name in CpuOps.accelerated)


@needs_numba
@pytest.mark.parametrize("decay", [False, True])
def test_dynamic_step_matches_the_reference_bit_for_bit(decay):
    """Dynamic evaluation's compiled update rounds every operation as the reference's NumPy
    passes do (no fused multiply-add), on a matrix and on a non-contiguous view (which the
    reference updates)."""
    rng = numpy.random.default_rng(3)
    f = numpy.float32
    p, g, scale, keep, pull = (rng.normal(0, 1, (37, 19)).astype(f) for _ in range(5))
    args = (keep, pull, scale) if decay else (None, None, scale)
    want, got = p.copy(), p.copy()
    Ops().dynamic_step(want, g.copy(), *args)
    CpuOps(Settings(threads=1)).dynamic_step(got, g.copy(), *args)
    numpy.testing.assert_array_equal(got, want)
    assert not numpy.array_equal(got, p)
    view, ref = p.copy()[:, ::2], p.copy()[:, ::2]
    vargs = tuple(None if a is None else numpy.ascontiguousarray(a[:, ::2]) for a in args)
    Ops().dynamic_step(ref, g[:, ::2].copy(), *vargs)
    CpuOps(Settings(threads=1)).dynamic_step(view, g[:, ::2].copy(), *vargs)
    numpy.testing.assert_array_equal(view, ref)


@needs_loops
@pytest.mark.parametrize("cell", ["rnn", "gru"])
@pytest.mark.parametrize("N,T", [(16, 7), (32, 4), (5, 3), (2, 1)])
def test_compiled_rnn_and_gru_loops_give_the_python_loops_bits(cell, N, T):
    """A tanh RNN's or a GRU's whole time loop in one compiled call makes the calls the Python
    loop makes (the same sgemm, the same kernels): every output equal bit for bit, and the
    caches interchangeable."""
    case = layer_case(cell, 24, N, T, seed=4)
    loop = CpuOps(Settings(threads=1, rowsplit=False))
    compiled = CpuOps(Settings(threads=1, rowsplit=True))
    assert cell in layers.SGEMM_LOOPED and compiled.blas_loops(case[0]) and not loop.blas_loops(case[0])
    want = run_layer(loop, cell, "tanh", case)
    got = run_layer(compiled, cell, "tanh", case)
    assert got.keys() == want.keys()
    for name in want:
        if want[name] is None:
            assert got[name] is None, name
        else:
            numpy.testing.assert_array_equal(got[name], want[name], err_msg=name)
    XP, Wh, h0, c0, extra, dhs = case
    _, _, cache = compiled.layer_forward(cell, XP, Wh, h0, c0, extra, True)
    dXP = loop.layer_backward(cell, dhs.copy(), cache, Wh)[0]
    numpy.testing.assert_array_equal(dXP, want["dXP"])


def test_settings_come_from_the_environment_once():
    s = Settings.from_env({"CHARNN_THREADS": "1", "CHARNN_KERNELS": "numpy", "CHARNN_ROWSPLIT": "0",
                           "CHARNN_PACKED": "0"})
    assert s == Settings(threads=1, kernels=False, rowsplit=False, packed=False)
    assert Settings.from_env({}).kernels and Settings.from_env({}).rowsplit
    with pytest.raises(ValueError, match="CHARNN_THREADS"):
        Settings.from_env({"CHARNN_THREADS": "two"})
    assert get_backend("cpu", settings=s).ops.settings is s


def test_unknown_cell_is_an_error_never_another_cells_maths():
    with pytest.raises(KeyError, match="unknown cell 'lstn'"):
        cells.get("lstn")
    with pytest.raises(ValueError, match="unknown cell"):
        ModelConfig(vocab_size=5, cell="lstn")
    with pytest.raises(KeyError):
        Ops().layer_forward("lstn", None, None, None, None, {}, True)


def test_packed_products_are_off_without_avx512_or_when_asked():
    assert loops._packed_for(numpy.zeros((8, 4), numpy.float32), 16, False)[1].size == 0
    if not packed.available():
        assert loops._packed_for(numpy.zeros((8, 4), numpy.float32), 16, True)[1].size == 0


def test_split_choice_follows_the_settings():
    cfg = ModelConfig(vocab_size=10, cell="lstm", hidden=32)
    for settings, parts in ((Settings(threads=1), 1), (Settings(threads=2), 2)):
        m = LanguageModel.create(cfg, backend=get_backend("cpu", settings=settings))
        assert len(parallel.split_columns(m.ops, m, 40)) == parts


def test_the_compiled_cache_is_keyed_by_every_engine_source(monkeypatch):
    """numba reuses a cached function when its own file is unchanged; the engine's cache folder
    is named for all engine sources, so an edit to kernels.py also retires loops.py's cached
    loops (which inline its kernels)."""
    from pathlib import Path

    import charnn.engine as engine

    before = engine._cache_dir()
    for name in ("kernels.py", "loops.py", "layers.py"):
        real = Path.read_bytes
        monkeypatch.setattr(Path, "read_bytes", lambda self, real=real, name=name: real(self) + (b"#" if self.name == name else b""))
        assert engine._cache_dir() != before, name
        monkeypatch.undo()
    assert engine._cache_dir() == before
    if kernels.available and not __import__("os").environ.get("NUMBA_CACHE_DIR"):
        from numba.core import config

        assert config.CACHE_DIR == str(before)

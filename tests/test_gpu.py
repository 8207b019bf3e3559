"""GPU (CuPy) against CPU (NumPy): forward, gradients, training steps and sampling agree.

These run only where CuPy sees a CUDA device (see conftest.py); elsewhere they are reported as
skipped with the reason.
"""

import numpy
import pytest

from charnn.backend import get_backend, to_host
from charnn.nn.model import LanguageModel, ModelConfig
from charnn.nn.stepper import Stepper
from charnn.nn.optim import clip_global_norm, make_optimizer

pytestmark = pytest.mark.gpu

CASES = [("lstm", 0), ("lstm", 8), ("gru", 0), ("gru", 8), ("rnn", 8)]


def pair(cell, embed, dtype="float64"):
    cfg = ModelConfig(vocab_size=23, cell=cell, layers=2, hidden=16, embed=embed, dropout=0.1)
    return (LanguageModel.create(cfg, seed=3, backend=get_backend("cpu", dtype)),
            LanguageModel.create(cfg, seed=3, backend=get_backend("gpu", dtype)))


@pytest.mark.parametrize("cell,embed", CASES)
def test_forward_and_gradients_match(cell, embed):
    cpu, gpu = pair(cell, embed)
    rng = numpy.random.default_rng(0)
    ids, tg = rng.integers(0, 23, (9, 4)), rng.integers(0, 23, (9, 4))
    outs = []
    for m in (cpu, gpu):
        loss, cache, state = m.forward(ids, tg, None, train=True, rng=numpy.random.default_rng(1))
        grads, _ = m.backward(cache)
        outs.append((float(to_host(loss)), {k: to_host(v) for k, v in grads.items()}))
    assert outs[0][0] == pytest.approx(outs[1][0], abs=1e-10)
    for k in outs[0][1]:
        numpy.testing.assert_allclose(outs[0][1][k], outs[1][1][k], atol=1e-9)


@pytest.mark.parametrize("cell,embed", CASES)
def test_training_steps_and_sampling_match(cell, embed):
    cpu, gpu = pair(cell, embed)
    rng = numpy.random.default_rng(0)
    data = rng.integers(0, 23, (5, 7, 3))
    for m in (cpu, gpu):
        opt, state = make_optimizer("adam", m.params), None
        drng = numpy.random.default_rng(2)
        for k in range(5):
            loss, cache, state = m.forward(data[k, :-1], data[k, 1:], state, train=True, rng=drng)
            grads, _ = m.backward(cache)
            clip_global_norm(grads, 5.0)
            opt.step(grads)
    for k in cpu.params:
        numpy.testing.assert_allclose(to_host(cpu.params[k]), to_host(gpu.params[k]), atol=1e-8)
    logits = []
    for m in (cpu, gpu):
        st = Stepper(m, 1)
        for t in (1, 5, 7):
            out = st.step(numpy.array([t]))
        logits.append(to_host(out).copy())
    numpy.testing.assert_allclose(logits[0], logits[1], atol=1e-9)

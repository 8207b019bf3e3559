"""functional.py's pieces that the layer and model tests reach only indirectly: the dropout mask
and the class bounds of the factored softmax."""

from __future__ import annotations

import numpy
import pytest

from charnn.nn.functional import class_bounds, dropout_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_mask_is_inverted(p):
    """0 with probability p, else 1/(1-p), so a unit's expected output is unchanged."""
    mask = dropout_mask((200_000,), p, numpy.random.default_rng(0), numpy, numpy.float64)
    values = numpy.unique(mask)
    assert len(values) == 2 and values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p), rel=1e-12)
    assert (mask == 0).mean() == pytest.approx(p, abs=0.01)
    assert mask.mean() == pytest.approx(1.0, abs=0.02)


@pytest.mark.parametrize("counts,C", [([1] * 12, 4), ([1] * 100, 10), ([50, 20, 10, 5, 5, 3, 3, 2, 1, 1], 3)])
def test_class_bounds_cut_the_mass_into_the_classes_asked_for(counts, C):
    bounds = class_bounds(counts, C)
    assert bounds[0] == 0 and bounds[-1] == len(counts)
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    assert len(bounds) - 1 == C
    mass = numpy.array([sum(counts[a:b]) for a, b in zip(bounds, bounds[1:])]) / sum(counts)
    assert mass.max() <= 1 / C + max(counts) / sum(counts) + 1e-9  # no class much above its share



def test_a_class_factored_head_with_one_class_is_the_full_softmax():
    """With a single class P(class) = 1, so the factored loss, its gradients for the word layer
    and the scores equal the full softmax's (float64, the reference)."""
    from charnn.backend import get_backend
    from charnn.nn.model import LanguageModel, ModelConfig, init_params

    full = ModelConfig(vocab_size=7, cell="gru", layers=1, hidden=5)
    one = ModelConfig(vocab_size=7, cell="gru", layers=1, hidden=5, class_bounds=(0, 7))
    params = init_params(one, 3)
    f64 = get_backend("cpu", "float64")
    a = LanguageModel(one, params, f64)
    b = LanguageModel(full, {k: v for k, v in params.items() if not k.startswith("class.")}, f64)
    rng = numpy.random.default_rng(0)
    ids, tg = rng.integers(0, 7, (4, 3)), rng.integers(0, 7, (4, 3))
    la, ga, _ = a.loss_and_grads(ids, tg)
    lb, gb, _ = b.loss_and_grads(ids, tg)
    assert float(la) == pytest.approx(float(lb), rel=1e-12)
    for k in gb:
        numpy.testing.assert_allclose(ga[k], gb[k], rtol=1e-10, atol=1e-12, err_msg=k)
    numpy.testing.assert_allclose(a.nll(ids, tg)[0], b.nll(ids, tg)[0], rtol=1e-12)

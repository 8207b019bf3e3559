"""The hand-written backward passes against central differences (float64), and the checker
itself: a deliberately broken backward must fail and be named."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from charnn.nn import cells
from charnn.gradcheck import check_config
from charnn.nn.model import ModelConfig

VOCAB = {"char": 7, "word": 40}
SMALL = dict(T=4, N=2, seed=0, max_elements=24)


def failing(results):
    return {r.name for r in results if not r.passed}


def assert_all_pass(results, tolerance=1e-6):
    bad = [(r.name, r.max_rel_error) for r in results if not (r.passed and r.max_rel_error < tolerance)]
    assert not bad, bad
    assert all(r.checked > 0 for r in results)


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("embed", [0, 3])
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_check_config_passes(cell, layers, embed, level):
    config = ModelConfig(vocab_size=VOCAB[level], cell=cell, layers=layers, hidden=4, embed=embed)
    results = check_config(config, **SMALL)
    assert_all_pass(results)
    names = [r.name for r in results]
    assert names[: len(config.param_shapes())] == list(config.param_shapes())
    expected_state = [f"state.{i}.{k}" for i in range(layers) for k in (("h", "c") if cell == "lstm" else ("h",))]
    assert names[len(config.param_shapes()):] == expected_state


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_tied_weights_pass(cell):
    config = ModelConfig(vocab_size=7, cell=cell, layers=2, hidden=4, embed=4, tie=True)
    results = check_config(config, **SMALL)
    assert "head.W" not in {r.name for r in results}
    assert_all_pass(results)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("embed", [0, 3])
def test_dropout_passes(cell, embed):
    config = ModelConfig(vocab_size=7, cell=cell, layers=2, hidden=4, embed=embed, dropout=0.4)
    assert_all_pass(check_config(config, **SMALL))


def test_relu_rnn_passes(monkeypatch):
    # ReLU has a kink at 0: with the default step (4e-3) some pre-activation lies within a few
    # steps of it for most seeds and the difference quotient is wrong there, not the gradient.
    # A smaller step keeps every perturbation on one side of the kink.
    import charnn.gradcheck

    monkeypatch.setattr(charnn.gradcheck, "EPS", 1e-4)
    config = ModelConfig(vocab_size=7, cell="rnn", layers=2, hidden=4, embed=3, activation="relu")
    assert_all_pass(check_config(config, **SMALL))


def test_an_entry_past_the_tolerance_is_differenced_again_with_half_the_step(monkeypatch):
    """`charnn gradcheck --layers 2` (seed 0) failed on one entry of rnn.0.Wx of the LSTM 2x5
    with embeddings and a class-factored head: 1.68e-6 at the step 4e-3, the stencil's
    truncation error (1.7e-11 absolute), not the gradient (4.6e-8 at half the step). Such an
    entry is differenced again at half the step and keeps the smaller error."""
    import numpy

    import charnn.gradcheck as gradcheck
    from charnn.nn.functional import class_bounds

    bounds = tuple(class_bounds(1.0 / numpy.arange(1, 41), 6))
    config = ModelConfig(vocab_size=40, cell="lstm", layers=2, hidden=5, embed=4, class_bounds=bounds)
    assert_all_pass(check_config(config))  # the command's defaults: T 5, N 3, seed 0
    steps = []
    real = gradcheck._difference
    monkeypatch.setattr(gradcheck, "_difference", lambda *a: steps.append(a[3]) or real(*a))
    check_config(config)
    halved = [e for e in steps if e != gradcheck.EPS]
    assert halved and set(halved) == {gradcheck.EPS / 2} and len(halved) < len(steps) / 100


# ----- a broken backward must be caught and named -----

def _scale_forget_gate(monkeypatch, factor=1.01):
    original = cells.lstm_step_backward

    def broken(A, c_prev, tc, dh, dc, dA, tmp, xp):
        original(A, c_prev, tc, dh, dc, dA, tmp, xp)
        H = dh.shape[0]
        dA[H: 2 * H] *= factor  # the forget gate's pre-activation gradient, 1% off

    monkeypatch.setattr(cells, "lstm_step_backward", broken)


def test_broken_lstm_gate_gradient_fails_and_is_named(monkeypatch):
    _scale_forget_gate(monkeypatch)
    config = ModelConfig(vocab_size=7, cell="lstm", layers=1, hidden=4, embed=0)
    results = check_config(config, **SMALL)
    bad = failing(results)
    assert {"rnn.0.Wx", "rnn.0.Wh", "rnn.0.b"} <= bad
    assert not bad & {"head.W", "head.b"}  # the head's gradients do not go through the cell
    worst = max(r.max_rel_error for r in results)
    assert worst > 1e-4


def test_broken_dsigmoid_fails_for_gated_cells_only(monkeypatch):
    original = cells.dsigmoid

    def broken(y, out, xp):
        original(y, out, xp)
        out *= 1.001
        return out

    monkeypatch.setattr(cells, "dsigmoid", broken)
    for cell in ("lstm", "gru"):
        config = ModelConfig(vocab_size=7, cell=cell, layers=2, hidden=4, embed=3)
        bad = failing(check_config(config, **SMALL))
        assert {"rnn.0.Wx", "rnn.1.Wh", "rnn.1.b", "embed.W"} <= bad, (cell, bad)
        assert not bad & {"head.W", "head.b"}
    rnn = ModelConfig(vocab_size=7, cell="rnn", layers=2, hidden=4, embed=3)
    assert_all_pass(check_config(rnn, **SMALL))  # no sigmoid in a plain RNN


def test_tolerance_is_honoured():
    config = ModelConfig(vocab_size=7, cell="gru", layers=1, hidden=4)
    results = check_config(config, tolerance=1e-30, **SMALL)
    assert failing(results)  # nothing is exact to 1e-30


# ----- through the command line -----

GRADCHECK_ARGS = ["gradcheck", "--cell", "lstm", "--layers", "1", "--embed", "0", "--level", "char"]


def _invoke(args):
    from charnn.cli import cli

    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_cli_gradcheck_passes_and_prints_the_table():
    result = _invoke(GRADCHECK_ARGS)
    assert result.exit_code == 0, result.output
    for name in ("rnn.0.Wx", "rnn.0.Wh", "rnn.0.b", "head.W", "head.b", "state.0.h", "state.0.c"):
        assert name in result.stdout
    assert "pass" in result.stdout and "FAIL" not in result.stdout
    assert "all 7 gradient checks passed" in result.stdout


def test_cli_gradcheck_fails_naming_the_parameter(monkeypatch):
    _scale_forget_gate(monkeypatch)
    result = _invoke(GRADCHECK_ARGS)
    assert result.exit_code == 1, result.output
    assert "FAIL" in result.stdout
    assert "gradient checks failed" in result.stderr
    assert "rnn.0.Wx" in result.stderr
    assert "head.b" not in result.stderr


def test_cli_gradcheck_rejects_bad_layer_list():
    result = _invoke(["gradcheck", "--layers", "one"])
    assert result.exit_code == 2

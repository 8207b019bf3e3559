"""The cell registry is the extension point: a cell defined here, in the test file alone, is
trained, sampled, scored and gradient-checked through the public commands without a change
to the package.

The toy cell is a "leaky" RNN with a learned per-unit mix between the new candidate and the
previous state (an extra parameter, like the GRU's bhn):

    u_t = tanh(Wx x_t + Wh h_{t-1} + b)        h_t = u_t + m * h_{t-1}      m (H,)
"""

from __future__ import annotations

import json

import numpy
import pytest

from charnn.backend import array_module
from charnn.nn import cells
from charnn.nn.model import LanguageModel, ModelConfig

from cli_support import check_ok, invoke, train, write_corpus


def leaky_forward(XP, Wh, h0, c0=None, extra=None, store=True, activation="tanh"):
    xp = array_module(XP)
    GH, T, N = XP.shape
    m = extra["mix"][:, None]
    hs = xp.empty((Wh.shape[1], T, N), dtype=XP.dtype)
    us = xp.empty_like(hs)
    h = h0
    for t in range(T):
        us[:, t] = xp.tanh(Wh @ h + XP[:, t])
        hs[:, t] = us[:, t] + m * h
        h = hs[:, t]
    cache = {"us": us, "hs": hs, "h0": h0, "mix": extra["mix"]} if store else None
    return hs, (h.copy(), None), cache


def leaky_backward(dhs, cache, Wh):
    xp = array_module(dhs)
    us, hs, h0, mix = cache["us"], cache["hs"], cache["h0"], cache["mix"]
    H, T, N = hs.shape
    dXP = xp.empty((H, T, N), dtype=hs.dtype)
    dWh = xp.zeros_like(Wh)
    dmix = xp.zeros_like(mix)
    dh_next = xp.zeros((H, N), dtype=hs.dtype)
    for t in reversed(range(T)):
        dh = dhs[:, t] + dh_next
        h_prev = hs[:, t - 1] if t > 0 else h0
        da = dh * (1 - us[:, t] ** 2)
        dXP[:, t] = da
        dWh += da @ h_prev.T
        dmix += (dh * h_prev).sum(axis=1)
        dh_next = Wh.T @ da + mix[:, None] * dh
    return dXP, dWh, {"mix": dmix}, dh_next, None


def _mix_init(b, H, forget_bias):
    b[:] = 0.0  # the bias starts at zero; the mix parameter is an extra (zeros: a plain RNN)


LEAKY = cells.Cell("leaky", 1, False, leaky_forward, leaky_backward, extra={"mix": lambda H: (H,)},
                   init_bias=_mix_init)


@pytest.fixture
def leaky():
    cells.register(LEAKY)
    yield LEAKY
    del cells.CELLS["leaky"]


def test_registered_cell_trains_samples_scores_and_passes_gradcheck(tmp_path, leaky):
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    check_ok(train(corpus, out, "--cell", "leaky", "--max-steps", 40, "--eval-every", 20, "--lr", "0.01"))
    losses = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [m["val_loss"] for m in losses if "val_loss" in m]
    assert evals and evals[-1] < numpy.log(20)  # learned something: below a uniform guess over ~20 chars
    info = json.loads(check_ok(invoke("sample", out, "--length", 30, "--seed", 1, "--json")).stdout.splitlines()[0])
    assert len(info["text"]) >= 30
    scored = check_ok(invoke("score", out, "-", "--format", "jsonl", input="the cat sat\n")).stdout
    assert json.loads(scored.splitlines()[0])["logprob"] < 0
    result = check_ok(invoke("gradcheck", "--cell", "leaky", "--level", "char", "--layers", "1,2", "--embed", "0,4"))
    assert "leaky" in result.output  # exit 0: every parameter of the leaky cell passed


def test_registered_cell_gradients_are_checked_for_real(tmp_path, leaky, monkeypatch):
    """A wrong backward in the registered cell fails the check (so the test above could fail)."""
    broken = cells.Cell("leaky", 1, False, leaky_forward,
                        lambda dhs, cache, Wh: (lambda r: (r[0], r[1], {"mix": r[2]["mix"] * 1.1}, r[3], r[4]))(
                            leaky_backward(dhs, cache, Wh)),
                        extra={"mix": lambda H: (H,)})
    cells.register(broken)
    result = invoke("gradcheck", "--cell", "leaky", "--level", "char", "--layers", "1", "--embed", "0")
    assert result.exit_code == 1
    assert "mix" in result.output + result.stderr


def test_a_model_of_the_registered_cell_has_its_extra_parameters(leaky):
    m = LanguageModel.create(ModelConfig(vocab_size=7, cell="leaky", layers=2, hidden=5))
    assert m.params["rnn.1.mix"].shape == (5,) and m.params["rnn.0.Wh"].shape == (5, 5)
    assert m.initial_state(3)[0][1] is None


def test_an_unregistered_cell_is_refused_by_the_command_line(tmp_path):
    corpus = write_corpus(tmp_path)
    result = train(corpus, tmp_path / "run", "--cell", "leaky")
    assert result.exit_code == 2 and "leaky" in result.output + result.stderr


def test_a_run_of_the_registered_cell_resumes(tmp_path, leaky):
    """Resume checks the saved cell against the registry (it once held a list of the three
    built-in names, so a registered cell trained but could not be resumed)."""
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    check_ok(train(corpus, out, "--cell", "leaky", "--max-steps", 10, "--eval-every", 10))
    check_ok(invoke("train", "--resume", "--out", out, "--max-steps", 20, "--sample-length", 0, "-q"))
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert max(steps) == 20


def test_an_activation_of_a_registered_cell_is_accepted_everywhere(tmp_path):
    """The activations come from the registry too: a cell that accepts one the built-in cells
    do not is offered it by the command line, the model configuration and resume (each held
    the list "tanh", "relu" once)."""
    with pytest.raises(Exception, match="activation must be tanh or relu"):
        ModelConfig(vocab_size=7, activation="softsign")
    cells.register(cells.Cell("leaky", 1, False, leaky_forward, leaky_backward, extra={"mix": lambda H: (H,)},
                              init_bias=_mix_init, activations=("tanh", "softsign")))
    try:
        corpus = write_corpus(tmp_path)
        out = tmp_path / "run"
        check_ok(train(corpus, out, "--cell", "leaky", "--activation", "softsign", "--max-steps", 10,
                       "--eval-every", 10))
        check_ok(invoke("train", "--resume", "--out", out, "--max-steps", 20, "--sample-length", 0, "-q"))
        assert json.loads(check_ok(invoke("info", out, "--json")).stdout)["activation"] == "softsign"
        refused = train(corpus, tmp_path / "other", "--cell", "lstm", "--activation", "softsign")
        assert refused.exit_code == 2 and "--cell leaky only" in refused.output + refused.stderr
        assert cells.activations() == ("tanh", "relu", "softsign") and cells.get("leaky").takes_activation
        assert not cells.get("lstm").takes_activation and cells.get("rnn").takes_activation
    finally:
        del cells.CELLS["leaky"]

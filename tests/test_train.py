"""charnn train: exact resume, stopping rules, the schedule, refusals, divergence, crash safety and
signals. Tiny corpora and models (train.py's Trainer through the CLI), every seed fixed."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
from pathlib import Path

import numpy
import pytest

import charnn.training.regularise as regularise_mod
import charnn.training.trainer as train_mod  # the loop, and the names it calls
from charnn.io import checkpoint
from charnn.io import corpus as corpus_mod
from charnn.backend import to_host
from charnn.io.checkpoint import Checkpoint
from charnn.io.data import Batches
from charnn.train import TrainConfig, prepare_data

from cli_support import (TINY, assert_same_params, charnn_process, check_error, check_ok, has_metrics, invoke,
                         metrics, temp_files, train, train_losses, wait_for, write_corpus)

# A constant learning rate, for tests that stand for an interruption by a smaller --max-steps
# (a cosine schedule would end sooner) or read the rates --lr-decay sets; test_schedule.py tests
# the cosine schedule, interrupted and resumed.
CONSTANT = ["--lr-schedule", "constant"]

JSON_KEYS = {"model", "steps", "tokens", "train_seconds", "tokens_per_second", "train_loss", "val_loss",
             "val_bits_per_token", "val_perplexity"}


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


def resume(out, *extra):
    return invoke("train", "--resume", "--out", out, "-q", *extra)


def progress(path) -> dict:
    return checkpoint.load(path).meta["progress"]


def chunks_per_epoch(corpus, batch_size, seq_len) -> int:
    _, train_ids, _ = prepare_data(TrainConfig(corpus=str(corpus)))
    return len(Batches(train_ids, batch_size, seq_len))


# ----- exact resume -----

def assert_resume_is_exact(tmp_path, corpus, args, split: int, total: int) -> Path:
    """A run of ``total`` steps and one stopped at ``split`` and resumed to ``total`` take the
    same losses and end with the same parameters. Returns the uninterrupted run's folder."""
    a, b = tmp_path / "a", tmp_path / "b"
    check_ok(train(corpus, a, *args, "--max-steps", total))
    check_ok(train(corpus, b, *args, "--max-steps", split))
    check_ok(resume(b, "--max-steps", total))
    assert train_losses(a) == train_losses(b)
    assert_same_params(a / "last.npz", b / "last.npz")
    return a


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_resume_continues_exactly_with_dropout(tmp_path, corpus, cell):
    """K steps in one go, or k steps then --resume to K: the same losses after step k and the same
    final parameters and optimizer state (dropout > 0, so the saved RNG state matters)."""
    args = ["--cell", cell, "--dropout", "0.3", "--log-every", "1", "--eval-every", "5", "--seed", "3", *CONSTANT]
    a, b = tmp_path / "a", tmp_path / "b"
    check_ok(train(corpus, a, *args, "--max-steps", 30))
    check_ok(train(corpus, b, *args, "--max-steps", 12))
    assert progress(b / "last.npz")["step"] == 12
    check_ok(resume(b, "--max-steps", 30))
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, 31))
    assert la == lb
    assert_same_params(a / "last.npz", b / "last.npz")
    oa, ob = checkpoint.load(a / "last.npz").optim, checkpoint.load(b / "last.npz").optim
    assert oa.keys() == ob.keys() and all(numpy.array_equal(oa[k], ob[k]) for k in oa)


def test_a_run_without_dropout_differs_from_one_with_it(tmp_path, corpus):
    """The resume test above is only meaningful if dropout changes the losses."""
    check_ok(train(corpus, tmp_path / "a", "--log-every", "1", "--max-steps", 3))
    check_ok(train(corpus, tmp_path / "b", "--log-every", "1", "--max-steps", 3, "--dropout", "0.3"))
    assert train_losses(tmp_path / "a")[3] != train_losses(tmp_path / "b")[3]


# ----- --weight-drop (DropConnect on the recurrent weights) -----

def _one_step(monkeypatch, tmp_path, corpus, name, weight_drop):
    """One SGD step (lr 0.5, no clip, no dropout) of a float64 2-layer LSTM; returns the Wh the
    model computed with, its gradients, the masks the trainer drew, and the Wh after the step."""
    from charnn.nn.model import LanguageModel as Model

    seen, drawn = {}, []
    real_lg, real_mask = Model.loss_and_grads, regularise_mod.dropout_mask

    def loss_and_grads(self, *a, **k):
        seen["Wh"] = {n: v.copy() for n, v in self.params.items() if n.endswith(".Wh")}
        loss, grads, state = real_lg(self, *a, **k)
        seen["grads"] = {n: grads[n].copy() for n in seen["Wh"]}
        return loss, grads, state

    def mask(*a, **k):
        drawn.append(real_mask(*a, **k))
        return drawn[-1]

    monkeypatch.setattr(Model, "loss_and_grads", loss_and_grads)
    monkeypatch.setattr(regularise_mod, "dropout_mask", mask)
    cfg = TrainConfig(corpus=str(corpus), layers=2, hidden=8, seq_len=6, batch_size=3, optimizer="sgd", lr=0.5,
                      clip=0.0, max_steps=1, state_reset=0.0, dtype="float64", weight_drop=weight_drop,
                      lr_schedule="constant", sample_length=0, out=str(tmp_path / name))
    trainer = train_mod.Trainer(cfg, tmp_path / name)
    trainer.run()
    after = {n: to_host(trainer.model.params[n]) for n in seen["Wh"]}
    return seen["Wh"], seen["grads"], drawn, after


def test_weight_drop_step_uses_masked_recurrent_weights_and_masks_their_gradient(tmp_path, corpus, monkeypatch):
    """The step computes with Wh * mask (mask 0 or 1/(1-p), one per layer), the true Wh comes
    back, and the update is the gradient times the mask: d loss/d Wh = (d loss/d (Wh*mask)) * mask."""
    w0, _, none_drawn, _ = _one_step(monkeypatch, tmp_path, corpus, "plain", 0.0)
    assert none_drawn == []
    eff, grads, masks, after = _one_step(monkeypatch, tmp_path, corpus, "dropped", 0.5)
    names = sorted(w0)
    assert names == ["rnn.0.Wh", "rnn.1.Wh"] and len(masks) == 2
    for name, mask in zip(names, masks):
        mask = to_host(mask)
        assert mask.shape == w0[name].shape and set(numpy.unique(mask)) == {0.0, 2.0}
        assert 0.4 < (mask == 0).mean() < 0.6
        numpy.testing.assert_array_equal(eff[name], w0[name] * mask)  # the same initial weights, masked
        assert (grads[name][mask == 0] != 0).any()  # the masked-out weights' raw gradient is not 0 ...
        numpy.testing.assert_allclose(after[name], w0[name] - 0.5 * grads[name] * mask, rtol=0, atol=1e-15)
        numpy.testing.assert_array_equal(after[name][mask == 0], w0[name][mask == 0])  # ... nor is it applied
    assert not numpy.array_equal(masks[0], masks[1])


def test_resume_continues_exactly_with_weight_drop(tmp_path, corpus):
    args = ["--weight-drop", "0.3", "--dropout", "0.2", "--log-every", "1", "--eval-every", "4", "--seed", "2", *CONSTANT]
    a = assert_resume_is_exact(tmp_path, corpus, args, 4, 10)
    assert checkpoint.load(a / "last.npz").meta["train"]["weight_drop"] == 0.3
    check_ok(train(corpus, tmp_path / "c", *args[2:], "--max-steps", 10))
    assert train_losses(tmp_path / "c")[10] != train_losses(a)[10]
    check_error(resume(tmp_path / "b", "--max-steps", 12, "--weight-drop", "0.1"), 1, "--weight-drop")


def test_resume_continues_exactly_with_state_resets(tmp_path, corpus):
    """Frequent state resets draw from the run's RNG; a resumed run makes the same draws."""
    args = ["--state-reset", "0.3", "--log-every", "1", "--eval-every", "4", "--seed", "5", *CONSTANT]
    a = assert_resume_is_exact(tmp_path, corpus, args, 6, 14)
    check_ok(train(corpus, tmp_path / "c", *args[2:], "--state-reset", "0", "--max-steps", 14))
    assert train_losses(tmp_path / "c")[14] != train_losses(a)[14]


def test_state_reset_zeroes_a_random_fraction_of_streams(tmp_path, corpus):
    cfg = TrainConfig(corpus=str(corpus), batch_size=2000, state_reset=0.25, out=str(tmp_path / "r"))
    trainer = train_mod.Trainer(cfg, tmp_path / "r")
    rng = numpy.random.default_rng(0)
    state = [(rng.normal(size=(3, 2000)).astype(numpy.float32) + 5, rng.normal(size=(3, 2000)).astype(numpy.float32) + 5)]
    trainer.rng = numpy.random.default_rng(1)
    (h, c), = trainer._reset_some(state)
    zeroed = (h == 0).all(axis=0)
    assert numpy.array_equal(zeroed, (c == 0).all(axis=0))
    assert 0.2 < zeroed.mean() < 0.3
    kept = ~zeroed
    assert numpy.array_equal(h[:, kept], state[0][0][:, kept]) and numpy.array_equal(c[:, kept], state[0][1][:, kept])
    trainer.cfg.state_reset = 0.0
    assert trainer._reset_some(state) is state


# ----- the forget gate's initial bias -----

def test_forget_bias_option_reaches_the_parameters(tmp_path, corpus):
    check_ok(train(corpus, tmp_path / "r", "--forget-bias", "0.5", "--max-steps", 1, "--lr", "1e-12"))
    saved = checkpoint.load(tmp_path / "r" / "last.npz")
    assert saved.meta["train"]["forget_bias"] == 0.5
    b, H = saved.params["rnn.0.b"], 16
    numpy.testing.assert_allclose(b[H: 2 * H], 0.5, atol=1e-6)
    numpy.testing.assert_allclose(numpy.delete(b, numpy.s_[H: 2 * H]), 0.0, atol=1e-6)


def test_forget_bias_default(tmp_path, corpus):
    assert TrainConfig(corpus="c").forget_bias == 0.0
    from charnn.cli import cli
    from charnn.nn.cells import FORGET_BIAS

    option = next(p for p in cli.get_command(None, "train").params if p.name == "forget_bias")
    assert option.default == FORGET_BIAS == 0.0  # the CLI's literal default and the model's agree
    check_ok(train(corpus, tmp_path / "r", "--max-steps", 1))
    assert checkpoint.load(tmp_path / "r" / "last.npz").meta["train"]["forget_bias"] == 0.0


@pytest.mark.parametrize("extra, needle", [(["--forget-bias", "nan"], "--forget-bias"),
                                           (["--forget-bias", "inf"], "--forget-bias"),
                                           (["--cell", "gru", "--forget-bias", "0.5"], "--forget-bias")])
def test_forget_bias_is_validated(tmp_path, corpus, extra, needle):
    check_error(train(corpus, tmp_path / "r", *extra), 2, needle)
    assert not (tmp_path / "r").exists()


def test_a_run_saved_before_forget_bias_and_state_reset_resumes_with_their_old_values(tmp_path, corpus):
    """A checkpoint whose config lacks forget_bias (or state_reset) was made when they were 1
    and 0: it resumes with those, exactly as a run never stopped, whatever today's defaults."""
    args = ["--forget-bias", "1", "--state-reset", "0", "--log-every", "1", "--eval-every", "4", "--seed", "2", *CONSTANT]
    a, b = tmp_path / "a", tmp_path / "b"
    check_ok(train(corpus, a, *args, "--max-steps", 10))
    check_ok(train(corpus, b, *args, "--max-steps", 4))
    old = checkpoint.load(b / "last.npz")
    del old.meta["train"]["forget_bias"], old.meta["train"]["state_reset"]
    checkpoint.save(b / "last.npz", old)
    check_ok(resume(b, "--max-steps", 10))
    assert train_losses(a) == train_losses(b)
    assert_same_params(a / "last.npz", b / "last.npz")
    resumed = checkpoint.load(b / "last.npz").meta["train"]
    assert (resumed["forget_bias"], resumed["state_reset"]) == (1.0, 0.0)
    check_error(resume(b, "--max-steps", 12, "--forget-bias", "0"), 1, "--forget-bias", "1.0")


# ----- the one-hot input's initial scale -----

def test_input_scale_option_reaches_the_parameters(tmp_path, corpus):
    from charnn.cli import cli
    from charnn.nn.cells import INPUT_SCALE

    option = next(p for p in cli.get_command(None, "train").params if p.name == "input_scale")
    assert option.default == INPUT_SCALE == TrainConfig(corpus="c").input_scale
    for value in ("0", "1"):
        check_ok(train(corpus, tmp_path / value, "--input-scale", value, "--max-steps", 1, "--lr", "1e-12"))
    a, b = (checkpoint.load(tmp_path / v / "last.npz") for v in ("0", "1"))
    assert b.meta["train"]["input_scale"] == 1.0
    H = 16
    numpy.testing.assert_allclose(b.params["rnn.0.Wx"], a.params["rnn.0.Wx"] * H ** 0.5, rtol=1e-5, atol=1e-9)
    assert 0.5 < numpy.abs(b.params["rnn.0.Wx"]).max() <= 1.0
    numpy.testing.assert_allclose(b.params["rnn.0.Wh"], a.params["rnn.0.Wh"], rtol=1e-5, atol=1e-9)


# (its bad values are rows of tests/test_bad_input.py)

def test_a_run_saved_before_input_scale_resumes_with_the_old_scale(tmp_path, corpus):
    a = tmp_path / "a"
    check_ok(train(corpus, a, "--max-steps", 4, "--eval-every", 2, *CONSTANT))
    old = checkpoint.load(a / "last.npz")
    del old.meta["train"]["input_scale"]
    checkpoint.save(a / "last.npz", old)
    check_ok(resume(a, "--max-steps", 6))
    assert checkpoint.load(a / "last.npz").meta["train"]["input_scale"] == 0.0


@pytest.mark.parametrize("stop_offset", [-2, 0, 1])
def test_resume_across_an_epoch_boundary(tmp_path, corpus, stop_offset):
    """Stopped just before, exactly at, or just after the end of the first epoch."""
    args = ["--batch-size", "16", "--seq-len", "16", "--dropout", "0.2", "--log-every", "1", "--eval-every", "4", *CONSTANT]
    per_epoch = chunks_per_epoch(corpus, 16, 16)
    K, k = 2 * per_epoch + 3, per_epoch + stop_offset
    a = assert_resume_is_exact(tmp_path, corpus, args, k, K)
    assert progress(a / "last.npz")["epoch"] == progress(tmp_path / "b" / "last.npz")["epoch"] == 2


def fake_evaluate(model, ids, batch_size, seq_len, world=None):
    """A validation loss that is a pseudo-random function of the weights: the same model gives
    the same value, and about half the evaluations are worse than the best so far."""
    b = float(to_host(model.params["head.b"]).astype(numpy.float64).sum())
    return 2.0 + (abs(b) * 1e4) % 1.0


def test_resume_between_evaluations_keeps_the_schedule(tmp_path, corpus, monkeypatch):
    """A run stopped by --max-steps between scheduled evaluations evaluates once more at its end;
    that extra evaluation must not decay the learning rate or count towards --patience, or the
    resumed run takes other steps than an uninterrupted one."""
    monkeypatch.setattr(train_mod, "evaluate", fake_evaluate)
    # (--input-scale 0: the weights, and so fake_evaluate's values, for which patience 5 is not
    # reached in 40 steps while the decay acts; what the test checks does not depend on them)
    args = ["--log-every", "1", "--eval-every", "3", "--lr-decay", "0.5", "--patience", "5", "--lr", "0.01",
            "--input-scale", "0", *CONSTANT]
    a, b = tmp_path / "a", tmp_path / "b"
    check_ok(train(corpus, a, *args, "--max-steps", 40))
    check_ok(train(corpus, b, *args, "--max-steps", 7))
    check_ok(resume(b, "--max-steps", 20))
    check_ok(resume(b, "--max-steps", 40))
    lrs = [m["lr"] for m in metrics(a) if "val_loss" in m]
    assert min(lrs) < 0.01  # the schedule did act
    la, lb = train_losses(a), train_losses(b)
    assert la == lb
    sched = [(m["step"], m["lr"]) for m in metrics(a) if "train_loss" in m]
    assert sched == [(m["step"], m["lr"]) for m in metrics(b) if "train_loss" in m]
    assert_same_params(a / "last.npz", b / "last.npz")


# ----- stopping -----

def test_max_steps_counts_the_whole_run(tmp_path, corpus):
    out = tmp_path / "run"
    check_ok(train(corpus, out, "--max-steps", 5, "--log-every", "1"))
    r = check_ok(resume(out, "--max-steps", 8, "--json"))
    assert json.loads(r.stdout)["steps"] == 8
    assert sorted(train_losses(out)) == list(range(1, 9))


def test_max_epochs_counts_the_whole_run(tmp_path, corpus):
    out = tmp_path / "run"
    per_epoch = chunks_per_epoch(corpus, 16, 16)
    args = ["--batch-size", "16", "--seq-len", "16", "--eval-every", "1000"]
    r = check_ok(train(corpus, out, *args, "--max-epochs", 1, "--json"))
    assert json.loads(r.stdout)["steps"] == per_epoch
    r = check_ok(resume(out, "--max-epochs", 2, "--json"))
    res = json.loads(r.stdout)
    assert res["steps"] == 2 * per_epoch and res["epochs"] == 2.0


def test_time_limit_stops(tmp_path, corpus):
    r = check_ok(train(corpus, tmp_path / "run", "--time-limit", "0.3", "--json"))
    res = json.loads(r.stdout)
    assert res["stopped"] == "time_limit" and res["steps"] > 0
    assert res["train_seconds"] < 10.0  # 0.3 s and the step that crossed it (a cold JIT compile may be slow)


def test_json_summary(tmp_path, corpus):
    r = check_ok(train(corpus, tmp_path / "run", "--max-steps", 6, "--json"))
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert JSON_KEYS <= res.keys()
    assert res["steps"] == 6 and res["tokens"] == 6 * 4 * 8
    assert res["model"] == str(tmp_path / "run" / "model.npz")
    assert res["tokens_per_second"] > 0 and math.isfinite(res["train_loss"])
    assert res["val_bits_per_token"] == pytest.approx(res["val_loss"] / math.log(2))
    assert res["val_perplexity"] == pytest.approx(math.exp(res["val_loss"]))
    assert res["val_loss"] == pytest.approx(math.log(19), abs=0.3)  # barely trained: about uniform


# ----- the schedule: --lr-decay and --patience -----

def scripted(values):
    it = iter(values)
    return lambda *a, **k: next(it)


def test_lr_decay_and_early_stopping(tmp_path, corpus, monkeypatch):
    """Validation improves, then stops improving: each bad evaluation halves the learning rate,
    and training stops right after the second one (patience 2), evaluating nothing more."""
    monkeypatch.setattr(train_mod, "evaluate", scripted([3.0, 2.0, 2.5, 2.6, 2.7, 2.8]))
    out = tmp_path / "run"
    r = check_ok(train(corpus, out, *CONSTANT, "--lr", "0.01", "--lr-decay", "0.5", "--patience", "2", "--eval-every", "2",
                       "--log-every", "1", "--max-steps", "100", "--json"))
    res = json.loads(r.stdout)
    assert res["stopped"] == "early_stopping" and res["steps"] == 8
    evals = [(m["step"], m["val_loss"], m["lr"]) for m in metrics(out) if "val_loss" in m]
    assert evals == [(2, 3.0, 0.01), (4, 2.0, 0.01), (6, 2.5, 0.005), (8, 2.6, 0.0025)]
    assert res["val_loss"] == 2.6 and res["best_val_loss"] == 2.0
    train_lrs = {m["step"]: m["lr"] for m in metrics(out) if "train_loss" in m}
    assert train_lrs[6] == 0.01 and train_lrs[7] == 0.005 and train_lrs[8] == 0.005
    assert progress(out / "last.npz")["bad_evals"] == 2
    # model.npz is the model of the best evaluation (step 4), last.npz the latest.
    assert progress(out / "model.npz")["step"] == 4 and progress(out / "last.npz")["step"] == 8


def test_lr_decay_without_patience_keeps_training(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr(train_mod, "evaluate", scripted([2.0, 2.1, 2.2, 1.0, 1.5]))
    out = tmp_path / "run"
    r = check_ok(train(corpus, out, *CONSTANT, "--lr", "0.01", "--lr-decay", "0.1", "--eval-every", "2", "--max-steps", "10",
                       "--json"))
    assert json.loads(r.stdout)["stopped"] == "max_steps"
    lrs = [m["lr"] for m in metrics(out) if "val_loss" in m]
    assert lrs == pytest.approx([0.01, 0.001, 0.0001, 0.0001, 0.00001])


# ----- refusals -----

def test_resume_with_another_architecture_is_refused(tmp_path, corpus):
    out = tmp_path / "run"
    check_ok(train(corpus, out, "--max-steps", 3))
    before = (out / "last.npz").read_bytes()
    msg = check_error(resume(out, "--hidden", "32", "--max-steps", 6), 1, "--hidden 32", "16")
    assert "cannot resume" in msg
    check_error(resume(out, "--cell", "gru"), 1, "--cell gru")
    assert (out / "last.npz").read_bytes() == before


def test_resume_with_nothing_to_resume(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    check_error(resume(empty, "--max-steps", 3), 1, str(empty), "nothing to resume")
    assert list(empty.iterdir()) == []
    missing = tmp_path / "missing"
    check_error(resume(missing, "--max-steps", 3), 1, str(missing), "nothing to resume")
    assert not missing.exists()


def test_resume_from_a_model_without_training_state(tmp_path, corpus):
    out = tmp_path / "run"
    check_ok(train(corpus, out, "--max-steps", 3))
    ck = checkpoint.load(out / "model.npz")
    checkpoint.save(out / "last.npz", Checkpoint(ck.config, ck.vocab, ck.params))  # no training metadata
    check_error(resume(out), 1, "last.npz", "no training state")


def test_new_run_into_a_used_folder_is_refused(tmp_path, corpus):
    out = tmp_path / "run"
    check_ok(train(corpus, out, "--max-steps", 3))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    check_error(train(corpus, out, "--max-steps", 5, "--hidden", "8"), 1, str(out), "already holds a run", "--resume")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_names_the_corpus_by_another_path(tmp_path, corpus, monkeypatch):
    out = tmp_path / "run"
    check_ok(train(corpus, out, "--max-steps", 3))
    monkeypatch.chdir(tmp_path)
    check_ok(invoke("train", "./corpus.txt", "--resume", "--out", "run", "-q", "--max-steps", 5))
    assert progress(out / "last.npz")["step"] == 5
    corpus.write_text(corpus.read_text() + "more text\n")
    check_error(resume(out, "--max-steps", 7), 1, "corpus changed")


# ----- divergence -----

def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus, monkeypatch):
    """From step 11 the gradients are NaN, so the weights and then the loss become NaN."""
    real_norm = train_mod.global_norm
    calls = []

    def poisoned(grads, ops=None):
        calls.append(1)
        if len(calls) > 10:
            for g in grads.values():
                g[...] = numpy.nan
        return real_norm(grads, ops)

    monkeypatch.setattr(train_mod, "global_norm", poisoned)
    out = tmp_path / "run"
    check_error(train(corpus, out, "--max-steps", 30, "--eval-every", "5", "--log-every", "1"), 1,
                "diverged", "step 12", str(out), "--lr")
    for name in ("last.npz", "model.npz"):
        ck = checkpoint.load(out / name)  # load refuses NaN weights
        assert ck.meta["progress"]["step"] == 10
        assert all(numpy.isfinite(a).all() for a in ck.params.values())
    assert temp_files(out) == []
    metrics(out)  # still parses


def test_absurd_learning_rate_diverges_before_any_checkpoint(tmp_path, corpus):
    """Nothing good to keep: say so, and leave a folder that the plain command trains afresh."""
    out = tmp_path / "run"
    check_error(train(corpus, out, "--max-steps", 40, "--lr", "1e6", "--clip", "0", "--log-every", "1"), 1,
                "diverged", "no good checkpoint exists yet", "starts a fresh run")
    assert not (out / "last.npz").exists() and not (out / "model.npz").exists()
    check_error(resume(out), 1, "nothing to resume")
    check_ok(train(corpus, out, "--max-steps", 4, "--log-every", "1"))
    assert sorted(train_losses(out)) == [1, 2, 3, 4]  # the diverged run's metric lines are gone


def blow_up_after(monkeypatch, step, lr=1e6, interrupt_at=None):
    """From the step after ``step`` the learning rate is ``lr``: a run that learned, then diverges
    with finite but exploding weights (or NaN); ``interrupt_at``: Ctrl-C during the step after it."""
    real = train_mod.Trainer._reset_some

    def reset_some(self, state):
        if self.counters["step"] == step:
            self.counters["lr"] = lr  # the base rate (the schedule scales it)
        if self.counters["step"] == interrupt_at:
            self.stop_requested = True
        return real(self, state)

    monkeypatch.setattr(train_mod.Trainer, "_reset_some", reset_some)


def assert_saved_models_beat_a_uniform_guess(corpus, out, step):
    """Both files load, hold the checkpoint of ``step``, and score below ln V nats per token."""
    uniform = math.log(19)
    for name in ("model.npz", "last.npz"):
        assert progress(out / name)["step"] == step
        r = check_ok(invoke("score", out / name, corpus, "--document", "--format", "jsonl", "--device", "cpu"))
        assert json.loads(r.stdout.splitlines()[-1])["nats_per_token"] < uniform


@pytest.mark.parametrize("val", ["0.1", "0"])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rmsprop", "adam"])
def test_divergence_between_log_lines_keeps_the_last_good_checkpoint(tmp_path, corpus, monkeypatch, optimizer, val):
    """The learning rate jumps to 1e6 after step 12; the next evaluation (step 15) comes before the
    next log line, so only the check before saving sees the exploded model (which once was saved
    with a validation loss of millions of nats, and without validation data unchecked)."""
    blow_up_after(monkeypatch, 12)
    out = tmp_path / "run"
    check_error(train(corpus, out, "--optimizer", optimizer, "--clip", "0", "--val-fraction", val, "--eval-every", "5",
                      "--log-every", "100", "--max-steps", "40"), 1,
                "diverged at step 15", "validation loss" if val != "0" else "training loss",
                f"the last good checkpoint (step 10) is kept in {out}")
    assert_saved_models_beat_a_uniform_guess(corpus, out, 10)
    assert temp_files(out) == []


@pytest.mark.parametrize("optimizer, val, lr, clip, eval_every", [
    ("sgd", "0", "1e38", "0", "5"), ("sgd", "0.1", "1e6", "0", "10"),
    ("adagrad", "0", "1e6", "5", "1"), ("adagrad", "0.1", "1e38", "0", "3"),
    ("rmsprop", "0", "1e6", "0", "10"), ("rmsprop", "0.1", "1e6", "5", "1"),
    ("adam", "0", "1e6", "5", "3"), ("adam", "0.1", "1e38", "0", "5")])
def test_divergence_before_any_good_checkpoint_starts_afresh(tmp_path, corpus, optimizer, val, lr, clip, eval_every):
    """The issue's commands: an absurd learning rate from the first step, for every optimizer,
    with and without validation, clipped or not. Nothing is written, the message says so, and
    the plain command then trains in the same folder."""
    out = tmp_path / "run"
    args = ["--optimizer", optimizer, "--val-fraction", val, "--eval-every", eval_every, "--max-steps", "30"]
    check_error(train(corpus, out, *args, "--lr", lr, "--clip", clip), 1,
                "diverged", "no good checkpoint exists yet", str(out))
    assert not (out / "model.npz").exists() and not (out / "last.npz").exists()
    check_ok(train(corpus, out, *args))
    checkpoint.load(out / "model.npz")
    assert progress(out / "last.npz")["step"] == 30


def test_divergence_message_is_the_only_stderr_line_after_the_header(tmp_path, corpus):
    """As a real process (pytest records warnings, so in-process runs cannot show this): the
    overflow of a diverging run used to print NumPy's RuntimeWarnings, with source lines, above
    the one-line error (some from the engine's worker threads)."""
    proc = charnn_process("train", corpus, "--out", tmp_path / "run", "--hidden", "16", "--layers", "1",
                          "--optimizer", "sgd", "--lr", "1e38", "--clip", "0", "--eval-every", "5",
                          "--max-steps", "20", "--quiet")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    lines = err.decode().strip().splitlines()
    assert "Warning" not in err.decode(), err.decode()
    assert lines[-1].startswith("Error: training diverged at step 5") and len(lines) <= 3, lines


@pytest.mark.parametrize("optimizer, why", [("adagrad", "optimizer state"), ("rmsprop", "optimizer state"),
                                            ("adam", "validation loss nan")])
def test_overflowed_optimizer_state_is_not_saved(tmp_path, corpus, monkeypatch, optimizer, why):
    """Gradients of 1e25 from step 11 on: their squares overflow float32, so the optimizer's
    second moments become inf. Adagrad's and RMSprop's weights stay finite (the update is
    g / sqrt(inf) = 0) and so does the loss: such a last.npz would never load, and it is not
    written. (Adam's compiled update turns the weights to NaN as well.)"""
    real_norm = train_mod.global_norm
    calls = []

    def huge(grads, ops=None):
        calls.append(1)
        if len(calls) > 10:
            for k in grads:
                grads[k] *= 1e25
            grads.changed()
        return real_norm(grads, ops)

    monkeypatch.setattr(train_mod, "global_norm", huge)
    out = tmp_path / "run"
    check_error(train(corpus, out, "--optimizer", optimizer, "--clip", "0", "--eval-every", "5", "--max-steps", "30"), 1,
                "diverged at step 15", why, "(step 10) is kept")
    assert_saved_models_beat_a_uniform_guess(corpus, out, 10)


def test_divergence_with_evaluation_only_at_the_end(tmp_path, corpus, monkeypatch):
    """No scheduled evaluation before --max-steps: the only save is at the end, and it is refused."""
    blow_up_after(monkeypatch, 12)
    out = tmp_path / "run"
    check_error(train(corpus, out, "--eval-every", "1000", "--log-every", "100", "--max-steps", "20"), 1,
                "diverged at step 20", "no good checkpoint exists yet")
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".npz") == []


def test_ctrl_c_after_divergence_saves_nothing(tmp_path, corpus, monkeypatch):
    """Ctrl-C's checkpoint is checked like any other save: Ctrl-C in step 13, the one that
    explodes the weights (its own loss, computed before the update, is fine)."""
    blow_up_after(monkeypatch, 12, interrupt_at=12)
    out = tmp_path / "run"
    check_error(train(corpus, out, "--eval-every", "5", "--log-every", "100", "--max-steps", "40"), 1,
                "diverged at step 13", "training loss", "(step 10) is kept")
    assert_saved_models_beat_a_uniform_guess(corpus, out, 10)


# ----- files -----

def test_run_folder_files(tmp_path, corpus):
    out = tmp_path / "run"
    check_ok(train(corpus, out, "--max-steps", 6, "--eval-every", "3", "--log-every", "2"))
    ms = metrics(out)
    assert [m["step"] for m in ms if "train_loss" in m] == [2, 4, 6]
    assert [m["step"] for m in ms if "val_loss" in m] == [3, 6]
    best, last = checkpoint.load(out / "model.npz"), checkpoint.load(out / "last.npz")
    assert best.config == last.config and best.config.hidden == 16
    assert last.optim and last.state is not None and not best.optim
    assert last.meta["progress"]["step"] == 6
    names = sorted(p.name for p in out.iterdir())
    caches = [n for n in names if n.startswith("tokens-")]
    assert [n for n in names if n not in caches] == ["last.npz", "metrics.jsonl", "model.npz"]  # no .lock after a clean exit
    # the encoded corpus: one compact token per character, memory-mapped by the trainer
    assert len(caches) == 1 and caches[0].endswith(".uint8")
    assert (out / caches[0]).stat().st_size == len(corpus.read_text(encoding="utf-8")) + corpus_mod.TRAILER


def test_word_level_end_to_end(tmp_path, corpus):
    out = tmp_path / "run"
    r = check_ok(train(corpus, out, "--level", "word", "--tokenizer", "whitespace", "--max-steps", 10, "--json"))
    res = json.loads(r.stdout)
    ck = checkpoint.load(out / "model.npz")
    assert ck.vocab.level == "word" and ck.vocab.tokenizer == "whitespace"
    assert ck.vocab.tokens[:2] == ["<unk>", "<eos>"] and set(ck.vocab.tokens[2:]) <= {w for w in corpus.read_text().split()}
    assert math.isfinite(res["val_loss"])
    check_ok(invoke("sample", out, "-n", 5, "--seed", 1, "--device", "cpu"))
    r = check_ok(invoke("score", out, "-", "--format", "jsonl", "--device", "cpu", input="the cat sat\n"))
    assert json.loads(r.stdout.splitlines()[0])["tokens"] == 4  # three words and <eos>


# ----- crash safety -----

@pytest.mark.parametrize("fail", ["replace", "interrupt"])
def test_a_save_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, corpus, monkeypatch, fail):
    """The 3rd file write (model.npz at the second evaluation) dies after its temporary file is
    written: by an OSError from the rename, or by Ctrl-C (a KeyboardInterrupt) inside it."""
    out = tmp_path / "run"
    real_replace = os.replace
    writes = []

    def replace(src, dst):
        if str(dst).endswith(".npz"):
            writes.append(dst)
            if len(writes) == 3:
                assert os.path.getsize(src) > 0  # the new file was fully written: die at the rename
                if fail == "interrupt":
                    raise KeyboardInterrupt
                raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    r = train(corpus, out, "--max-steps", 20, "--eval-every", "5")
    assert r.exit_code != 0 and "Traceback" not in r.output
    if fail == "replace":
        check_error(r, 1, "model.npz", "Input/output error")
    monkeypatch.undo()
    for name in ("model.npz", "last.npz"):
        assert checkpoint.load(out / name).meta["progress"]["step"] == 5
    assert temp_files(out) == []
    check_ok(resume(out, "--max-steps", 12))
    assert progress(out / "last.npz")["step"] == 12


def test_sigkill_at_random_moments_then_resume(tmp_path, corpus):
    """Kill -9 a training run (and its resumptions) up to three times at random moments: each
    --resume continues from a loadable checkpoint, and the finished run equals one never killed."""
    out, ref = tmp_path / "run", tmp_path / "ref"
    args = ["--max-steps", 1500, "--eval-every", 20, "--log-every", 10, "--dropout", "0.1"]
    rng = random.Random(20240601)
    kills = 0
    cmd = ["train", corpus, "--out", out, *TINY, *args]
    for _ in range(3):
        proc = charnn_process(*cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: (out / "last.npz").exists(), proc, timeout=60)
            start = progress(out / "last.npz")["step"] if (out / "last.npz").exists() else 0
            wait_for(lambda: False, proc, timeout=rng.uniform(0.05, 0.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        finally:
            proc.wait(timeout=60)
        ck = checkpoint.load(out / "last.npz")  # whatever the moment, the checkpoint is whole
        assert ck.meta["progress"]["step"] >= start
        cmd = ["train", "--resume", "--out", out, "-q"]
    assert kills >= 1
    check_ok(invoke(*cmd))
    check_ok(train(corpus, ref, *args))
    assert progress(out / "last.npz")["step"] == 1500
    checkpoint.load(out / "model.npz")
    assert temp_files(out) == []
    assert_same_params(out / "last.npz", ref / "last.npz")
    assert train_losses(out) == train_losses(ref)  # torn or repeated metric lines were trimmed


# ----- signals and locking (real processes) -----

def long_run(corpus, out):
    return charnn_process("train", corpus, "--out", out, *TINY, "--max-steps", 10**7, "--log-every", 1,
                          "--eval-every", 50)


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, corpus):
    out = tmp_path / "run"
    proc = long_run(corpus, out)
    try:
        assert wait_for(lambda: has_metrics(out), proc), proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = stderr.decode()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "--resume" in stderr and str(out) in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr and stdout == b""
    step = progress(out / "last.npz")["step"]
    assert step > 0
    r = check_ok(resume(out, "--max-steps", step + 3, "--json"))
    assert json.loads(r.stdout)["steps"] == step + 3


def test_ctrl_c_during_the_final_evaluation_keeps_the_steps(tmp_path, corpus):
    """Ctrl-C after the last step, while the final evaluation runs (a large validation file
    makes it last seconds; the last step's metrics line says it began), exited 130 with no
    model file: every step since the last scheduled evaluation was lost. The final evaluation
    and save are now protected as the loop's are: the run saves, says what the loop says,
    exits 130, and --resume continues it."""
    out = tmp_path / "run"
    val = write_corpus(tmp_path, "val.txt", lines=40_000, seed=1)
    proc = charnn_process("train", corpus, "--val", val, "--out", out, *TINY, "--max-steps", 3, "--log-every", 1,
                          "--eval-every", 1000)

    def last_step_logged():
        return has_metrics(out) and any(json.loads(line).get("step") == 3
                                        for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip())
    try:
        assert wait_for(last_step_logged, proc), proc.communicate()
        assert proc.poll() is None and not (out / "last.npz").exists()  # (the evaluation is still running)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = stderr.decode()
    assert proc.returncode == 130, stderr
    assert f"interrupted: checkpoint saved to {out / 'last.npz'}; continue with --resume --out {out}" in stderr
    assert "Traceback" not in stderr and "Error" not in stderr and stdout == b""
    assert progress(out / "last.npz")["step"] == 3
    assert [m["type"] for m in metrics(out)][-1] == "eval"  # the final evaluation ran to its end
    checkpoint.load(out / "model.npz")
    r = check_ok(resume(out, "--max-steps", 5, "--json"))
    assert json.loads(r.stdout)["steps"] == 5


def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path, corpus):
    out = tmp_path / "run"
    proc = long_run(corpus, out)
    try:
        assert wait_for(lambda: has_metrics(out), proc), proc.communicate()
        check_error(train(corpus, out, "--max-steps", 3), 1, str(out), "another charnn train is using this folder")
        check_error(resume(out, "--max-steps", 3), 1, "another charnn train")
        assert proc.poll() is None  # the first one runs on
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    checkpoint.load(out / "last.npz")
    # The lock goes with its process: a new trainer may now continue the run.
    step = progress(out / "last.npz")["step"]
    check_ok(resume(out, "--max-steps", step + 1))


def test_progress_shows_paths_that_look_like_markup_verbatim(tmp_path, corpus):
    """The progress header printed the run folder as rich markup: "[/b]" crashed, "[v2]" vanished."""
    for name in ("run[/b]", "run[v2]"):
        out = tmp_path / name
        args = [a for a in TINY if a != "-q"]
        r = check_ok(invoke("train", corpus, "--out", out, *args, "--max-steps", 2))
        assert f"run folder {out}" in r.stderr


def test_final_message_gives_the_saved_models_loss(tmp_path, corpus, monkeypatch):
    """model.npz is the best evaluation's model; the closing line says its loss, and the
    last evaluation's when that one was worse."""
    loud = [a for a in TINY if a != "-q"]
    monkeypatch.setattr(train_mod, "evaluate", scripted([3.0, 2.0, 2.5]))
    r = check_ok(invoke("train", corpus, "--out", tmp_path / "a", *loud, "--eval-every", "2", "--max-steps", "6"))
    assert "best validation loss 2.0000 nats/token (the last evaluation 2.5000)" in r.stderr.splitlines()[-1]
    monkeypatch.setattr(train_mod, "evaluate", scripted([3.0, 2.0]))
    r = check_ok(invoke("train", corpus, "--out", tmp_path / "b", *loud, "--eval-every", "2", "--max-steps", "4"))
    last = r.stderr.splitlines()[-1]
    assert last.endswith("validation loss 2.0000 nats/token") and "best" not in last


def test_a_run_past_its_best_says_so(tmp_path, corpus, monkeypatch):
    """Without --patience, a run whose validation loss stops improving says so once, during the
    run, and its closing line says how much of the run came after the best model; the metrics
    and the JSON summary record the best model's step. With --patience neither note appears."""
    loud = [a for a in TINY if a != "-q"]
    monkeypatch.setattr(train_mod, "evaluate", scripted([3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9]))
    r = check_ok(invoke("train", corpus, "--out", tmp_path / "a", *loud, "--eval-every", "2", "--max-steps", "14"))
    notes = [line for line in r.stderr.splitlines() if "has not improved for 3 evaluations" in line]
    assert len(notes) == 1 and "best 2.0000 at step 4" in notes[0] and "--patience" in notes[0]
    last = r.stderr.splitlines()[-1]
    assert "the best model is from step 4, so the last 10 steps (71% of the run" in last
    assert last.endswith("did not improve it")
    evals = [m for m in map(json.loads, open(tmp_path / "a" / "metrics.jsonl")) if m["type"] == "eval"]
    assert [m["best_step"] for m in evals] == [2, 4, 4, 4, 4, 4, 4]
    monkeypatch.setattr(train_mod, "evaluate", scripted([3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9]))
    r = check_ok(invoke("train", corpus, "--out", tmp_path / "b", *TINY, "--eval-every", "2", "--max-steps", "14",
                        "--json"))
    result = json.loads(r.stdout)
    assert result["best_step"] == 4 and 0 <= result["best_train_seconds"] <= result["train_seconds"]
    monkeypatch.setattr(train_mod, "evaluate", scripted([3.0, 2.0, 2.5, 2.6, 2.7]))
    r = check_ok(invoke("train", corpus, "--out", tmp_path / "c", *loud, "--eval-every", "2", "--max-steps", "14",
                        "--patience", "3"))
    assert "has not improved" not in r.stderr and "did not improve it" not in r.stderr

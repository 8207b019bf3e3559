"""The learning-rate schedule: warm-up and a half cosine to --lr-floor over the run's limit
(train.py's docstring; the default: --lr-schedule cosine --lr-hold 0.6 --lr-floor 0.05), exact
across an interruption, and the constant rate of --lr-schedule constant and of older runs."""

from __future__ import annotations

import math

import pytest

import charnn.training.trainer as train_mod  # the loop, and the names it calls
from charnn.io import checkpoint
from charnn.train import TrainConfig

from cli_support import check_ok, invoke, metrics, stop_after, train, train_losses, write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


def logged_rates(out) -> dict:
    return {m["step"]: m["lr"] for m in metrics(out) if "train_loss" in m}


def expected_rate(step: int, lr: float, total: int, floor: float, warmup: int, hold: float = 0.0) -> float:
    """The rate of step ``step`` (1-based, as logged) written out from the docstring's formula."""
    k = step - 1  # steps taken before it
    w = min(1.0, (k + 1) / warmup) if warmup else 1.0
    x = max(k / total - hold, 0.0) / (1 - hold)
    return lr * w * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * x)))


@pytest.mark.parametrize("warmup, floor, hold", [(0, 0.1, 0.0), (5, 0.0, 0.0), (3, 0.5, 0.0), (2, 0.0, 0.5)])
def test_rates_follow_warmup_and_cosine_over_max_steps(tmp_path, corpus, warmup, floor, hold):
    out = tmp_path / "r"
    check_ok(train(corpus, out, "--lr-schedule", "cosine", "--max-steps", 20, "--log-every", 1, "--lr", "0.01",
                   "--warmup", warmup, "--lr-floor", floor, "--lr-hold", hold))
    rates = logged_rates(out)
    assert sorted(rates) == list(range(1, 21))
    for step, rate in rates.items():
        assert rate == pytest.approx(expected_rate(step, 0.01, 20, floor, warmup, hold), rel=1e-12), step
    assert rates[20] < 0.01 * (floor + 0.05 if hold else floor + 0.01)  # the last step is near the floor
    if warmup:
        assert rates[1] == pytest.approx(0.01 / warmup)
    if hold:  # the full rate, after the warm-up, up to the hold's end
        assert [rates[s] for s in range(warmup, 12)] == [0.01] * (12 - warmup)
        assert rates[12] < 0.01


def test_the_default_holds_the_rate_then_decays_to_five_percent(tmp_path, corpus):
    out = tmp_path / "r"
    check_ok(train(corpus, out, "--max-steps", 20, "--log-every", 1, "--lr", "0.01"))
    rates = logged_rates(out)
    for step, rate in rates.items():
        assert rate == pytest.approx(expected_rate(step, 0.01, 20, 0.05, 0, 0.6), rel=1e-12), step
    assert rates[13] == 0.01 and rates[14] < 0.01  # steps 1-13 start at or before 60% of 20


def test_constant_schedule_keeps_the_rate(tmp_path, corpus):
    out = tmp_path / "r"
    check_ok(train(corpus, out, "--max-steps", 8, "--log-every", 1, "--lr", "0.01", "--lr-schedule", "constant"))
    assert set(logged_rates(out).values()) == {0.01}


def test_cosine_over_epochs(tmp_path, corpus):
    out = tmp_path / "r"
    check_ok(train(corpus, out, "--lr-schedule", "cosine", "--max-epochs", 2, "--log-every", 1, "--lr", "0.01",
                   "--lr-floor", "0", "--lr-hold", "0"))
    rates = logged_rates(out)
    total = max(rates)
    assert total > 4
    for step, rate in rates.items():
        assert rate == pytest.approx(expected_rate(step, 0.01, total, 0.0, 0), rel=1e-9), step


@pytest.mark.parametrize("decay", [0, 0.1])
def test_a_cosine_run_interrupted_and_resumed_takes_the_same_steps(tmp_path, corpus, monkeypatch, decay):
    args = ["--lr-schedule", "cosine", "--max-steps", 30, "--log-every", 1, "--eval-every", 7, "--lr", "0.01",
            "--warmup", 4, "--seed", 3, "--weight-decay", decay]
    a, b = tmp_path / "a", tmp_path / "b"
    check_ok(train(corpus, a, *args))
    stop_after(monkeypatch, 11)
    assert train(corpus, b, *args).exit_code == 130
    assert checkpoint.load(b / "last.npz").meta["progress"]["step"] == 11
    check_ok(invoke("train", "--resume", "--out", b, "-q"))
    assert logged_rates(a) == logged_rates(b)
    assert train_losses(a) == train_losses(b)
    pa, pb = checkpoint.load(a / "last.npz").params, checkpoint.load(b / "last.npz").params
    assert all((pa[k] == pb[k]).all() for k in pa)


def test_a_time_limited_run_decays_over_its_time(tmp_path, corpus, monkeypatch):
    """The horizon is the first --time-limit, counted across resumes (a fake clock: the rate
    follows the elapsed seconds, not the steps)."""
    clock = [1000.0]

    def tick():
        clock[0] += 0.5
        return clock[0]

    monkeypatch.setattr(train_mod.time, "perf_counter", tick)
    out = tmp_path / "r"
    check_ok(train(corpus, out, "--lr-schedule", "cosine", "--time-limit", 20, "--log-every", 1, "--lr", "0.01",
                   "--lr-floor", "0"))
    rates = list(logged_rates(out).values())
    assert rates[0] > 0.009 and rates[-1] < 0.001
    assert all(x >= y for x, y in zip(rates, rates[1:]))
    progress = checkpoint.load(out / "last.npz").meta["progress"]
    assert progress["horizon_seconds"] == 20.0
    # resumed after its horizon has passed: a new cycle over the resumed run's own limit
    check_ok(invoke("train", "--resume", "--out", out, "-q", "--time-limit", 10))
    progress = checkpoint.load(out / "last.npz").meta["progress"]
    assert progress["horizon_seconds"] > 20.0


def test_runs_saved_before_the_schedule_resume_at_a_constant_rate(tmp_path, corpus):
    """A checkpoint whose config lacks lr_schedule was trained at a constant rate: it goes on so."""
    out = tmp_path / "r"
    check_ok(train(corpus, out, "--max-steps", 4, "--log-every", 1, "--lr", "0.01", "--lr-schedule", "constant"))
    old = checkpoint.load(out / "last.npz")
    for key in ("lr_schedule", "lr_floor", "warmup", "lr_hold"):
        del old.meta["train"][key]
    checkpoint.save(out / "last.npz", old)
    check_ok(invoke("train", "--resume", "--out", out, "-q", "--max-steps", 8))
    assert set(logged_rates(out).values()) == {0.01}
    assert checkpoint.load(out / "last.npz").meta["train"]["lr_schedule"] == "constant"


def test_weight_decay_reaches_the_optimizer(tmp_path, corpus):
    """--weight-decay shrinks the weight matrices against the same run without it (each step
    multiplies them by 1 - lr x 0.5 = 0.995), and leaves the biases to Adam alone: the runs
    share their draws, so the biases differ only through the other weights' effect."""
    norms = {}
    for decay in (0, 0.5):
        out = tmp_path / f"r{decay}"
        check_ok(train(corpus, out, "--max-steps", 30, "--lr", "0.01", "--lr-schedule", "constant", "--weight-decay", decay))
        saved = checkpoint.load(out / "last.npz")
        assert saved.meta["train"]["weight_decay"] == decay
        norms[decay] = {k: float((v.astype("float64") ** 2).sum()) for k, v in saved.params.items()}
    for k in norms[0]:
        if k.endswith("W") or ".W" in k:
            assert norms[0.5][k] < 0.93 * norms[0][k], k


@pytest.mark.parametrize("optimizer, decay, needle", [("sgd", 0.5, "works with the adam optimizer only, not sgd"),
                                                     ("adam", 1e4, "times the learning rate must be below 1")])
def test_a_checkpoint_whose_weight_decay_cannot_work_is_refused(tmp_path, corpus, optimizer, decay, needle):
    out = tmp_path / "r"
    check_ok(train(corpus, out, "--max-steps", 4, "--optimizer", optimizer, "--lr", "0.01"))
    saved = checkpoint.load(out / "last.npz")
    saved.meta["train"]["weight_decay"] = decay
    checkpoint.save(out / "last.npz", saved)
    before = (out / "last.npz").read_bytes()
    result = invoke("train", "--resume", "--out", out, "-q", "--max-steps", 8)
    assert result.exit_code == 1
    assert (out / "last.npz").read_bytes() == before  # the refused resume leaves the checkpoint as it was
    assert f"cannot train: weight decay {needle}" in result.output and "Traceback" not in result.output


def test_defaults():
    cfg = TrainConfig(corpus="c")
    assert (cfg.lr_schedule, cfg.lr_floor, cfg.warmup, cfg.lr_hold) == ("cosine", 0.05, 0, 0.6)

"""metrics.jsonl: a record type on every line, the epoch as a fraction on every line, the tokens
seen and the elapsed time counted across resumes (what charnn plot and other programs read)."""

from __future__ import annotations

import time
import types

import pytest

import charnn.training.trainer as train_mod  # the loop, and the names it calls
from charnn.io import checkpoint

from cli_support import check_ok, invoke, metrics, train, write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


@pytest.fixture
def slow_clock(monkeypatch):
    """train.py's clock advances one second per reading, so elapsed times are large and certain."""
    now = [1000.0]

    def perf_counter():
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=perf_counter, strftime=time.strftime))


def test_every_line_has_a_type_a_fractional_epoch_tokens_and_elapsed(tmp_path, corpus):
    out = tmp_path / "run"
    check_ok(train(corpus, out, "--max-steps", 25, "--log-every", 5, "--eval-every", 10))
    ms = metrics(out)
    assert {m["type"] for m in ms} == {"train", "eval"}
    for m in ms:
        assert {"type", "step", "epoch", "tokens", "elapsed"} <= m.keys(), m
        assert ("train_loss" in m) == (m["type"] == "train") and ("val_loss" in m) == (m["type"] == "eval")
    train_at = {m["step"]: m for m in ms if m["type"] == "train"}
    evals = [m for m in ms if m["type"] == "eval"]
    assert [m["step"] for m in evals] == [10, 20, 25]  # the last one where the run stopped
    for e in evals:  # an evaluation is made where a log line is: the same epoch, tokens and about the same time
        t = train_at[e["step"]]
        assert e["epoch"] == t["epoch"] and e["tokens"] == t["tokens"]
        assert e["elapsed"] >= t["elapsed"]
    epochs = [m["epoch"] for m in ms]
    assert any(e != int(e) for e in epochs)  # fractions, not whole epochs
    assert epochs == sorted(epochs)
    elapsed = [m["elapsed"] for m in ms]
    assert elapsed == sorted(elapsed)


def test_elapsed_keeps_counting_across_a_resume(tmp_path, corpus, slow_clock):
    out = tmp_path / "run"
    check_ok(train(corpus, out, "--max-steps", 20, "--log-every", 5, "--eval-every", 10))
    before = metrics(out)
    saved = checkpoint.load(out / "last.npz").meta["progress"]["elapsed"]
    assert saved > before[-1]["elapsed"] > 20  # one second a reading, several readings a step
    check_ok(invoke("train", "--resume", "--out", out, "-q", "--max-steps", 40))
    after = metrics(out)
    assert after[: len(before)] == before
    resumed = after[len(before):]
    assert resumed and resumed[0]["step"] == 25
    assert resumed[0]["elapsed"] > saved  # not restarted from zero
    elapsed = [m["elapsed"] for m in after]
    assert elapsed == sorted(elapsed)


def test_a_checkpoint_saved_before_elapsed_was_kept_resumes(tmp_path, corpus, slow_clock):
    """Older last.npz files have no "elapsed" in their progress: the run's compute time stands in."""
    out = tmp_path / "run"
    check_ok(train(corpus, out, "--max-steps", 10, "--log-every", 5, "--eval-every", 10))
    ckpt = checkpoint.load(out / "last.npz")
    del ckpt.meta["progress"]["elapsed"]
    checkpoint.save(out / "last.npz", ckpt)
    train_seconds = ckpt.meta["progress"]["train_seconds"]
    check_ok(invoke("train", "--resume", "--out", out, "-q", "--max-steps", 15))
    resumed = [m for m in metrics(out) if m["step"] > 10]
    assert resumed and all(m["elapsed"] > train_seconds for m in resumed)

"""charnn.api: the few-line Python interface gives what the commands give."""

from __future__ import annotations

import json

import pytest

from charnn import api
from charnn.io.checkpoint import CheckpointError

from cli_support import check_ok, corpus_text, invoke, write_corpus


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api")
    corpus = write_corpus(folder, lines=200)
    result = api.train(corpus, folder / "run", hidden=16, layers=1, seq_len=8, batch_size=4, max_steps=30,
                       eval_every=15, sample_length=0, device="cpu", seed=2)
    return folder, result


def test_train_returns_the_summary_and_writes_the_run(run):
    folder, result = run
    assert result["model"] == str(folder / "run" / "model.npz") and result["steps"] == 30
    assert result["stopped"] == "max_steps" and result["val_loss"] > 0
    assert (folder / "run" / "last.npz").exists()


def test_generate_is_charnn_sample(run):
    folder, result = run
    m = api.load(result["model"], device="cpu")
    text = api.generate(m, 40, prime="the ", seed=5)
    cli = check_ok(invoke("sample", result["model"], "--device", "cpu", "--length", 40, "--prime", "the ", "--seed", 5))
    assert cli.stdout == "the " + text + ("" if text.endswith("\n") else "\n")
    assert api.generate(m, 40, prime="the ", seed=5) == text != api.generate(m, 40, prime="the ", seed=6)
    assert api.generate(m, 500, stop_at="\n", seed=1).endswith("\n")


@pytest.mark.parametrize("stop", ["\n\n", "e ", "the"])
def test_generate_stops_as_charnn_sample_does(run, stop):
    """A stop string of several characters ends the API's text where it ends the command's (the
    library once matched it against one token, so "\\n\\n" never stopped a character model)."""
    folder, result = run
    m = api.load(result["model"], device="cpu")
    escaped = stop.replace("\n", "\\n")
    for seed in (1, 2):
        text = api.generate(m, 3000, seed=seed, stop_at=stop)
        cli = check_ok(invoke("sample", result["model"], "--device", "cpu", "--length", 3000, "--seed", seed,
                              "--stop-at", escaped, "--json"))
        assert json.loads(cli.stdout)["text"] == text
        assert text.endswith(stop) and text.find(stop) == len(text) - len(stop), repr(text[-80:])


def test_score_is_charnn_score(run, tmp_path):
    folder, result = run
    m = api.load(result["model"], device="cpu")
    text = corpus_text(6, seed=9)
    lines = tmp_path / "lines.txt"
    lines.write_text(text, encoding="utf-8")
    cli = check_ok(invoke("score", result["model"], lines, "--device", "cpu", "--format", "jsonl"))
    want = [json.loads(line)["logprob"] for line in cli.stdout.splitlines()[:-1]]
    assert [s.logprob for s in api.score(m, text)] == pytest.approx(want, rel=1e-12)
    assert [s.logprob for s in api.score(m, text.splitlines())] == pytest.approx(want, rel=1e-12)
    doc = check_ok(invoke("score", result["model"], lines, "--device", "cpu", "--format", "jsonl", "--document"))
    (whole,) = api.score(m, text, document=True)
    assert whole.logprob == pytest.approx(json.loads(doc.stdout)["logprob"], rel=1e-12)


def test_load_the_bundled_model_and_errors():
    m = api.load(device="cpu")
    assert m.vocab.level == "char" and m.path.name == "model.npz"
    with pytest.raises(CheckpointError):
        api.load("no/such/model.npz")


def test_load_refuses_a_fifo(tmp_path):
    """The command line refused a named pipe as MODEL; api.load opened it and waited for a
    writer forever. One function now resolves a model path for both."""
    import os

    from cli_support import time_limit

    fifo = tmp_path / "model.npz"
    os.mkfifo(fifo)
    with time_limit(10), pytest.raises(CheckpointError, match="FIFO"):
        api.load(fifo, device="cpu")
    with time_limit(10), pytest.raises(CheckpointError, match="FIFO"):
        api.load(tmp_path, device="cpu")  # a run folder whose model.npz is one

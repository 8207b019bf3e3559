"""train, sample and score end to end on the stand-in device (a CuPy-like array module that
refuses silent host conversion), checked against the plain NumPy backend."""

import json

import numpy
import pytest
from click.testing import CliRunner
from standin import is_device, standin_backend

import charnn.cli.sample
import charnn.train
import charnn.training.trainer
from charnn.backend import get_backend
from charnn.io.checkpoint import load
from charnn.cli import cli

TEXT = "the cat sat on the mat.\nthe dog sat on the log.\n" * 30


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def train_args(corpus, out, cell):
    return ["train", str(corpus), "--cell", cell, "--layers", "2", "--hidden", "8", "--seq-len", "6",
            "--batch-size", "3", "--max-steps", "6", "--eval-every", "3", "--log-every", "1",
            "--dropout", "0.2", "--dtype", "float64", "--out", str(out), "--quiet", "--json",
            "--sample-length", "10"]


def use_backend(monkeypatch, make):
    def fake(device="auto", dtype="float32", announce=False):
        return make(getattr(numpy, dtype))
    monkeypatch.setattr(charnn.training.trainer, "get_backend", fake)
    monkeypatch.setattr(charnn.cli.sample, "get_backend", fake)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_train_sample_score_on_standin_match_numpy(tmp_path, corpus, monkeypatch, cell):
    runner = CliRunner()
    results = {}
    for name, make in (("numpy", lambda dt: get_backend("cpu", numpy.dtype(dt).name)),
                       ("standin", standin_backend)):
        use_backend(monkeypatch, make)
        out = tmp_path / name
        r = runner.invoke(cli, train_args(corpus, out, cell))
        assert r.exit_code == 0, r.output
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        s = runner.invoke(cli, ["sample", str(out), "--length", "30", "--seed", "3"])
        assert s.exit_code == 0, s.output
        b = runner.invoke(cli, ["sample", str(out), "--length", "8", "--beam-size", "3"])
        assert b.exit_code == 0, b.output
        sc = runner.invoke(cli, ["score", str(out), str(corpus), "--format", "jsonl"])
        assert sc.exit_code == 0, sc.output
        doc = runner.invoke(cli, ["score", str(out), str(corpus), "--document", "--format", "jsonl"])
        assert doc.exit_code == 0, doc.output
        results[name] = (summary, s.stdout, b.stdout, sc.stdout, doc.stdout, load(out / "last.npz"))
    a, b = results["numpy"], results["standin"]
    assert a[0]["train_loss"] == pytest.approx(b[0]["train_loss"], abs=1e-12)
    assert a[0]["val_loss"] == pytest.approx(b[0]["val_loss"], abs=1e-12)
    assert a[1] == b[1]  # same sample text (same seed)
    assert a[2] == b[2]  # same beam
    # sample and score load models in float32, where NumPy may take the numba kernels (rational
    # tanh, about 3e-7) and the stand-in the plain path: compare to float32 precision.
    for la, lb in zip(a[3].splitlines(), b[3].splitlines()):
        assert json.loads(la)["logprob"] == pytest.approx(json.loads(lb)["logprob"], rel=1e-5)
    assert json.loads(a[4])["nats_per_token"] == pytest.approx(json.loads(b[4])["nats_per_token"], rel=1e-5)
    for k, v in a[5].params.items():
        numpy.testing.assert_allclose(v, b[5].params[k], atol=1e-12)
    for k, v in a[5].optim.items():
        numpy.testing.assert_allclose(v, b[5].optim[k], atol=1e-12)


def test_standin_trainer_keeps_arrays_on_device(tmp_path, corpus):
    cfg = charnn.train.TrainConfig(corpus=str(corpus), cell="lstm", layers=1, hidden=8, seq_len=6, batch_size=3,
                                   max_steps=4, eval_every=2, dropout=0.1, dtype="float64", sample_length=5)
    trainer = charnn.train.Trainer(cfg, tmp_path / "run")
    real = charnn.training.trainer.get_backend
    charnn.training.trainer.get_backend = lambda *a, **k: standin_backend(numpy.float64)
    try:
        trainer.run()
    finally:
        charnn.training.trainer.get_backend = real
    assert all(is_device(v) for v in trainer.model.params.values())
    assert all(is_device(v) for v in trainer.opt.state.values())
    assert all(is_device(h) and is_device(c) for h, c in trainer.state)

"""charnn info: the bundled model, a run's files, an old file without training metadata (each
missing fact "unknown", null in JSON), strict JSON, and the one-line refusals."""

from __future__ import annotations

import json
import os

import numpy

from charnn.io import checkpoint
from charnn.io.checkpoint import Checkpoint
from charnn.io.vocab import Vocab
from charnn.nn.model import ModelConfig, init_params

from cli_support import check_error, check_ok, invoke, metrics, train, write_corpus


def strict_json(text: str) -> dict:
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_the_bundled_model():
    default = checkpoint.default_model_path()
    ckpt = checkpoint.load(default)
    d = strict_json(check_ok(invoke("info", "--json")).output)
    assert d["path"] == str(default.resolve()) and d["file_bytes"] == default.stat().st_size
    assert (d["cell"], d["layers"], d["hidden"], d["embed"]) == (ckpt.config.cell, ckpt.config.layers,
                                                                  ckpt.config.hidden, ckpt.config.embed)
    assert d["parameters"] == sum(a.size for a in ckpt.params.values())
    assert d["vocab"]["size"] == len(ckpt.vocab) and d["vocab"]["first"] == ckpt.vocab.tokens[:12]
    assert d["corpus_sha256"] == ckpt.meta["corpus_sha256"] and d["steps"] == ckpt.meta["progress"]["step"]
    assert d["best_val_loss"] == ckpt.meta["progress"]["best_saved"] and d["created"] == ckpt.meta["created"]
    out = check_ok(invoke("info")).output
    assert out.startswith(f"{default.resolve()} (charnn model file, {default.stat().st_size:,} bytes)\n")
    assert f"{d['parameters']:,}" in out and ckpt.meta["corpus_sha256"] in out and "unknown" not in out


def test_a_run_folder_and_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    check_ok(train(write_corpus(tmp_path), out, "--max-steps", 20, "--eval-every", 10, "--cell", "gru", "--embed", 4))
    best = min((m["val_loss"], m["step"]) for m in metrics(out) if m["type"] == "eval")
    d = strict_json(check_ok(invoke("info", out, "--json")).output)
    assert d["path"] == str(out / "model.npz") and not d["resumable"]
    assert (d["cell"], d["embed"], d["steps"], d["val_loss"]) == ("gru", 4, best[1], best[0])
    assert d["tokens"] == best[1] * 4 * 8  # batch 4 x seq-len 8 a step
    last = strict_json(check_ok(invoke("info", out / "last.npz", "--json")).output)
    assert last["resumable"] and last["steps"] == 20 and last["best_val_loss"] == best[0]
    text = check_ok(invoke("info", out / "last.npz")).output
    assert "a resumable checkpoint" in text and "gru, 1 layer x 16 hidden, embedding 4, full softmax" in text


def test_an_old_file_says_unknown(tmp_path):
    vocab = Vocab("word", ["<unk>", "<eos>", "a", "b", "c"], "whitespace")
    config = ModelConfig(5, cell="rnn", layers=1, hidden=3, activation="relu", class_bounds=(0, 2, 5))
    path = tmp_path / "old.npz"
    checkpoint.save(path, Checkpoint(config, vocab, {k: v.astype(numpy.float32) for k, v in init_params(config).items()}))
    d = strict_json(check_ok(invoke("info", path, "--json")).output)
    for key in ("corpus", "corpus_sha256", "steps", "tokens", "train_seconds", "val_loss", "best_val_loss", "created"):
        assert d[key] is None, key
    assert d["classes"] == 2 and d["activation"] == "relu" and d["vocab"]["tokenizer"] == "whitespace"
    text = check_ok(invoke("info", path)).output
    assert "rnn (relu), 1 layer x 3 hidden, one-hot input (5), class-factored softmax (2 classes)" in text
    assert "5 words (whitespace tokenizer): '<unk>' '<eos>' 'a' 'b' 'c'\n" in text
    for row in ("corpus        unknown", "trained       unknown steps, unknown tokens, unknown s",
                "validation    unknown", "saved         unknown"):
        assert row in text, row


def test_bad_files(tmp_path):
    check_error(invoke("info", tmp_path / "none.npz"), 1, "none.npz", "no such file")
    check_error(invoke("info", tmp_path), 1, "holds no model.npz or last.npz")
    (tmp_path / "text.npz").write_text("hello")
    check_error(invoke("info", tmp_path / "text.npz"), 1, "not a charnn model file")
    os.mkfifo(tmp_path / "fifo")
    check_error(invoke("info", tmp_path / "fifo"), 1, "FIFO")
    check_error(invoke("info", "--json", "a", "b"), 2)

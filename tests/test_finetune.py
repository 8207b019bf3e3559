"""charnn train --init-from (fine-tuning) and --extend-vocab: the model's weights and vocabulary as
the start, refusals of contradicting options and unknown tokens, the extended rows, the metadata.
Tiny corpora and models, every seed fixed."""

from __future__ import annotations

import json

import numpy
import pytest

from charnn import finetune
from charnn.io import checkpoint
from charnn.io.checkpoint import Checkpoint
from charnn.io.vocab import Vocab
from charnn.nn.model import ModelConfig, init_params

from cli_support import check_error, check_ok, invoke, metrics, train, write_corpus


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny char model trained for 150 steps on text A (random sentences over 15 words)."""
    folder = tmp_path_factory.mktemp("base")
    corpus = write_corpus(folder, "a.txt", lines=300, seed=0)
    check_ok(train(corpus, folder / "run", "--max-steps", 150, "--eval-every", 150, "--lr-schedule", "constant"))
    return folder / "run"


def val_loss(result) -> float:
    return json.loads(result.stdout)["val_loss"]


def test_fine_tuning_lowers_the_loss_faster_than_a_fresh_model(tmp_path, base):
    # Text B: other sentences over the same words (a related text the model never saw).
    b = write_corpus(tmp_path, "b.txt", lines=200, seed=1)
    steps = ["--max-steps", 10, "--eval-every", 10, "--json"]
    tuned = check_ok(train(b, tmp_path / "tuned", "--init-from", base, *steps))
    fresh = check_ok(train(b, tmp_path / "fresh", *steps))
    assert val_loss(tuned) < val_loss(fresh) - 0.5, (val_loss(tuned), val_loss(fresh))
    # and training started from the model: its training loss over the 10 steps is lower too
    first = {run: [m["train_loss"] for m in metrics(tmp_path / run) if "train_loss" in m][0] for run in ("tuned", "fresh")}
    assert first["tuned"] < first["fresh"] - 0.3, first


def test_architecture_and_vocabulary_come_from_the_model(tmp_path, base):
    b = write_corpus(tmp_path, "b.txt", lines=100, seed=2)
    # no --hidden or --layers: the model's (16, 1), not the defaults (256, 2)
    r = invoke("train", b, "--init-from", base / "model.npz", "--max-steps", 3, "--seq-len", 8,
               "--batch-size", 4, "--device", "cpu", "-q", "--sample-length", 0, "--out", tmp_path / "run")
    check_ok(r)
    tuned, model = checkpoint.load(tmp_path / "run" / "model.npz"), checkpoint.load(base / "model.npz")
    assert tuned.config == model.config and tuned.vocab.tokens == model.vocab.tokens
    start = tuned.meta["init_from"]
    assert start["path"] == str(base / "model.npz") and start["step"] == 150 and start["added_tokens"] == []
    assert len(start["sha256"]) == 64
    # a fresh optimizer: 3 steps taken, not 153
    last = checkpoint.load(tmp_path / "run" / "last.npz")
    assert last.meta["progress"]["opt_t"] == 3 and last.meta["progress"]["step"] == 3
    # the record survives a resume
    check_ok(invoke("train", "--resume", "--out", tmp_path / "run", "--max-steps", 5, "-q"))
    assert checkpoint.load(tmp_path / "run" / "last.npz").meta["init_from"] == start


def test_default_out_names_the_models_architecture(tmp_path, base, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_corpus(tmp_path, "b.txt", lines=100, seed=2)
    check_ok(invoke("train", "b.txt", "--init-from", base, "--max-steps", 2, "--seq-len", 8, "--batch-size", 4,
                    "--device", "cpu", "-q", "--sample-length", 0))
    assert (tmp_path / "models" / "b-lstm-1x16" / "model.npz").is_file()


@pytest.mark.parametrize("option, value, needle", [
    ("--hidden", 32, "--hidden 32 contradicts the model"),
    ("--layers", 2, "--layers 2 contradicts"),
    ("--cell", "gru", "--cell gru contradicts"),
    ("--embed", 16, "--embed 16 contradicts"),
    ("--level", "word", "--level word contradicts"),
    ("--classes", 4, "--classes 4 contradicts the model"),
])
def test_contradicting_architecture_options_are_refused(tmp_path, base, option, value, needle):
    b = write_corpus(tmp_path, "b.txt", lines=50, seed=2)
    r = invoke("train", b, "--init-from", base, option, value, "--out", tmp_path / "run", "--device", "cpu", "-q")
    check_error(r, 1, needle, str(base / "model.npz"))
    assert not (tmp_path / "run").exists()


def test_agreeing_options_and_tie_are_checked(tmp_path, base):
    b = write_corpus(tmp_path, "b.txt", lines=100, seed=2)
    check_error(invoke("train", b, "--init-from", base, "--tie", "--embed", 16, "--out", tmp_path / "x", "-q"),
                1, "--embed 16 contradicts")
    # options equal to the model's are fine
    check_ok(invoke("train", b, "--init-from", base, "--hidden", 16, "--layers", 1, "--cell", "lstm", "--no-tie",
                    "--classes", 0, "--max-steps", 2, "--seq-len", 8, "--batch-size", 4, "--device", "cpu", "-q",
                    "--sample-length", 0, "--out", tmp_path / "ok"))


def test_refusals_of_the_command_line(tmp_path, base):
    b = write_corpus(tmp_path, "b.txt", lines=50, seed=2)
    check_error(invoke("train", b, "--init-from", base, "--resume", "--out", base), 2, "--init-from", "--resume")
    check_error(invoke("train", b, "--extend-vocab", "--out", tmp_path / "r"), 2, "--init-from")
    check_error(invoke("train", b, "--init-from", tmp_path / "nothing.npz", "--out", tmp_path / "r"), 1,
                "nothing.npz: no such file")
    (tmp_path / "empty").mkdir()
    check_error(invoke("train", b, "--init-from", tmp_path / "empty", "--out", tmp_path / "r"), 1, "no model.npz")


def test_unknown_characters_are_named_with_counts(tmp_path, base):
    text = write_corpus(tmp_path, "b.txt", lines=100, seed=2).read_text()
    (tmp_path / "b.txt").write_text(text + "QQQ ZZ X#\n" * 3, encoding="utf-8")
    r = invoke("train", tmp_path / "b.txt", "--init-from", base, "--out", tmp_path / "run", "--device", "cpu", "-q")
    line = check_error(r, 1, "4 characters the model never saw", "'Q' (9 times)", "'#' (3 times)", "--extend-vocab")
    assert "'Z' (6 times)" in line
    assert not (tmp_path / "run").exists()


def test_extend_vocab_trains_and_keeps_the_old_rows(tmp_path, base):
    text = write_corpus(tmp_path, "b.txt", lines=100, seed=2).read_text()
    (tmp_path / "b.txt").write_text(text + "QQQ ZZ\n" * 3, encoding="utf-8")
    check_ok(invoke("train", tmp_path / "b.txt", "--init-from", base, "--extend-vocab", "--out", tmp_path / "run",
                    "--max-steps", 2, "--seq-len", 8, "--batch-size", 4, "--device", "cpu", "-q",
                    "--sample-length", 0))
    model, tuned = checkpoint.load(base / "model.npz"), checkpoint.load(tmp_path / "run" / "model.npz")
    assert tuned.vocab.tokens == model.vocab.tokens + ["Q", "Z"]
    assert tuned.config.vocab_size == model.config.vocab_size + 2
    assert tuned.meta["init_from"]["added_tokens"] == ["Q", "Z"]
    check_ok(invoke("sample", tmp_path / "run", "--prime", "QZ the", "--length", 5, "--seed", 1, "--device", "cpu"))


def small_checkpoint(level="char", tie=False, embed=0, bounds=()):
    tokens = list("abcde") if level == "char" else ["<unk>", "<eos>", "the", "cat", "sat", "on"]
    vocab = Vocab(level, tokens, "regex" if level == "word" else None)
    config = ModelConfig(vocab_size=len(tokens), cell="gru", layers=2, hidden=embed or 4, embed=embed, tie=tie,
                         class_bounds=bounds)
    return Checkpoint(config, vocab, {k: v + 0.5 for k, v in init_params(config, seed=3).items()})


@pytest.mark.parametrize("kind", ["one-hot", "embedding", "tied", "classes"])
def test_extended_rows_are_those_of_a_new_model(kind):
    ckpt = {"one-hot": lambda: small_checkpoint(),
            "embedding": lambda: small_checkpoint(embed=4),
            "tied": lambda: small_checkpoint(embed=4, tie=True),
            "classes": lambda: small_checkpoint("word", embed=4, tie=True, bounds=(0, 2, 4, 6))}[kind]()
    new = ["f", "g"] if ckpt.vocab.level == "char" else ["dog", "mat"]
    vocab, config, params = finetune.extend(ckpt, new, seed=7)
    V0, V = ckpt.config.vocab_size, ckpt.config.vocab_size + 2
    assert vocab.tokens == ckpt.vocab.tokens + new and config.vocab_size == V
    if kind == "classes":
        # the new words join the last class; the class weights are unchanged
        assert config.class_bounds == (0, 2, 4, 8)
        numpy.testing.assert_array_equal(params["class.W"], ckpt.params["class.W"])
    fresh = init_params(config, seed=7)
    assert set(params) == set(config.param_shapes())
    for name, a in params.items():
        old = ckpt.params[name]
        assert a.shape == config.param_shapes()[name]
        numpy.testing.assert_array_equal(a[tuple(slice(0, s) for s in old.shape)], old, err_msg=name)
        if a.shape != old.shape:  # the new rows (columns for one-hot input weights)
            grown = a.shape[0] != old.shape[0]
            got = a[V0:] if grown else a[:, V0:]
            want = fresh[name][V0:] if grown else fresh[name][:, V0:]
            numpy.testing.assert_array_equal(got, want, err_msg=name)
    grown = {n for n in params if params[n].shape != ckpt.params[n].shape}
    expected = {"one-hot": {"rnn.0.Wx", "head.W", "head.b"}, "embedding": {"embed.W", "head.W", "head.b"},
                "tied": {"embed.W", "head.b"}, "classes": {"embed.W", "head.b"}}[kind]
    assert grown == expected


def test_word_level_unknown_words(tmp_path):
    a = write_corpus(tmp_path, "a.txt", lines=100, seed=0)
    check_ok(train(a, tmp_path / "w", "--level", "word", "--max-steps", 2))
    (tmp_path / "b.txt").write_text("the cat sat on a zebra\nthe zebra ran far\nthe yak sat\n", encoding="utf-8")
    r = invoke("train", tmp_path / "b.txt", "--init-from", tmp_path / "w", "--out", tmp_path / "r", "-q",
               "--device", "cpu")
    check_error(r, 1, "2 words the model never saw", "'zebra' (2 times)", "'yak' (1 time)")
    # --extend-vocab with --min-count 2: zebra is added, yak stays <unk>
    b = tmp_path / "b.txt"
    b.write_text(b.read_text() * 20, encoding="utf-8")
    check_ok(invoke("train", b, "--init-from", tmp_path / "w", "--extend-vocab", "--min-count", 30, "--out",
                    tmp_path / "r", "--max-steps", 2, "--seq-len", 8, "--batch-size", 4, "--device", "cpu", "-q",
                    "--sample-length", 0))
    assert checkpoint.load(tmp_path / "r" / "model.npz").meta["init_from"]["added_tokens"] == ["zebra"]

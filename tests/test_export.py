"""charnn export and import: safetensors files under PyTorch's names. Round trips without torch
(export -> import -> the same parameters, scores and samples), files made elsewhere (biases split
another way, no charnn configuration), refusals, and, where torch is installed, the README's
lines loading the file into nn.RNN / nn.LSTM / nn.GRU and giving charnn score's log-probabilities."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy
import pytest

from charnn.io import checkpoint
from charnn.io.checkpoint import Checkpoint
from charnn.io.vocab import Vocab
from charnn.nn.model import ModelConfig, init_params

from cli_support import check_error, check_ok, invoke

safetensors_numpy = pytest.importorskip("safetensors.numpy")

TEXT = "the cat sat on a mat\nand a dog ran far away\n"
LINES = "the cat sat\na dog ran far\n"
CHAR_VOCAB = Vocab.build_char(TEXT)
WORD_VOCAB = Vocab.build_word(Counter(TEXT.split()))


def make_model(path, cell="lstm", layers=2, embed=0, hidden=8, level="char", tie=False, class_bounds=(),
               activation="tanh", seed=0):
    """A model file with random weights and non-zero biases (every bias mapping then matters)."""
    vocab = CHAR_VOCAB if level == "char" else WORD_VOCAB
    config = ModelConfig(len(vocab), cell=cell, layers=layers, hidden=hidden, embed=embed, tie=tie,
                         class_bounds=class_bounds, activation=activation)
    params = {k: v.astype(numpy.float32) for k, v in init_params(config, seed).items()}  # as training saves them
    rng = numpy.random.default_rng(seed + 1)
    for k, v in params.items():
        if k.endswith((".b", ".bhn")):
            v += rng.normal(0, 0.5, v.shape).astype(v.dtype)
    meta = {"corpus_sha256": "ab" * 32, "progress": {"step": 7, "tokens": 700}, "created": "2026-01-02T03:04:05+0000",
            "rng": {"state": 1}}
    checkpoint.save(path, Checkpoint(config, vocab, params, meta))
    return path


def metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.metadata()


def scores(model, tmp_path):
    (tmp_path / "lines.txt").write_text(LINES, encoding="utf-8")
    return [json.loads(line) for line in
            check_ok(invoke("score", model, tmp_path / "lines.txt", "--format", "jsonl", "--device", "cpu")).output.splitlines()]


ARCHITECTURES = [
    dict(cell="lstm"), dict(cell="gru"), dict(cell="rnn", activation="relu"), dict(cell="lstm", embed=5),
    dict(cell="gru", embed=8, hidden=8, tie=True, layers=1),
    dict(cell="lstm", level="word", embed=4, class_bounds=(0, 3, 7, len(WORD_VOCAB))),
]


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: "-".join(f"{v}" for v in a.values()))
def test_round_trip(tmp_path, arch):
    npz = make_model(tmp_path / "model.npz", **arch)
    out = tmp_path / "model.safetensors"
    r = check_ok(invoke("export", npz, out))
    assert r.output.startswith(f"wrote {out} (")
    a, b = checkpoint.load(npz), checkpoint.load(out)
    assert b.config == a.config and b.vocab.to_json() == a.vocab.to_json()
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        assert b.params[k].dtype == a.params[k].dtype
        numpy.testing.assert_array_equal(b.params[k], a.params[k], err_msg=k)
    assert b.meta["corpus_sha256"] == "ab" * 32 and b.meta["progress"]["step"] == 7 and "rng" not in b.meta
    assert scores(out, tmp_path) == scores(npz, tmp_path)
    sample = ["sample", "-n", 30, "--seed", 4, "--device", "cpu"]
    assert check_ok(invoke(*sample, out)).output == check_ok(invoke(*sample, npz)).output
    # and once more: the export of the import holds the same (the header's key order may differ)
    again = tmp_path / "again.safetensors"
    check_ok(invoke("export", out, again))
    assert metadata(again) == metadata(out)
    t1, t2 = safetensors_numpy.load_file(out), safetensors_numpy.load_file(again)
    assert t1.keys() == t2.keys() and all(numpy.array_equal(t1[k], t2[k]) for k in t1)


def test_pytorch_names_and_the_bias_mapping(tmp_path):
    npz = make_model(tmp_path / "model.npz", cell="gru", embed=5, layers=2)
    out = tmp_path / "m.safetensors"
    check_ok(invoke("export", npz, out))
    t = safetensors_numpy.load_file(out)
    p = checkpoint.load(npz).params
    H = 8
    assert sorted(t) == sorted(["embedding.weight", "decoder.weight", "decoder.bias"] +
                               [f"rnn.{w}_l{k}" for k in range(2) for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")])
    numpy.testing.assert_array_equal(t["embedding.weight"], p["embed.W"])
    numpy.testing.assert_array_equal(t["rnn.weight_ih_l1"], p["rnn.1.Wx"])
    numpy.testing.assert_array_equal(t["rnn.weight_hh_l0"], p["rnn.0.Wh"])
    numpy.testing.assert_array_equal(t["rnn.bias_ih_l0"], p["rnn.0.b"])
    numpy.testing.assert_array_equal(t["rnn.bias_hh_l0"], numpy.concatenate([numpy.zeros(2 * H), p["rnn.0.bhn"]]))
    numpy.testing.assert_array_equal(t["decoder.weight"], p["head.W"])


def test_one_hot_class_factored_and_tied_layouts(tmp_path):
    one_hot = make_model(tmp_path / "a.npz", cell="lstm", layers=1)
    check_ok(invoke("export", one_hot, tmp_path / "a.safetensors"))
    t = safetensors_numpy.load_file(tmp_path / "a.safetensors")
    assert "embedding.weight" not in t and t["rnn.weight_ih_l0"].shape == (4 * 8, len(CHAR_VOCAB))
    classes = make_model(tmp_path / "b.npz", level="word", embed=8, hidden=8, tie=True, class_bounds=(0, 4, len(WORD_VOCAB)))
    check_ok(invoke("export", classes, tmp_path / "b.safetensors"))
    t = safetensors_numpy.load_file(tmp_path / "b.safetensors")
    p = checkpoint.load(classes).params
    numpy.testing.assert_array_equal(t["decoder_class.weight"], p["class.W"])
    numpy.testing.assert_array_equal(t["decoder_class.bias"], p["class.b"])
    numpy.testing.assert_array_equal(t["decoder.weight"], p["embed.W"])  # tied: PyTorch's state_dict has both


def test_a_model_made_elsewhere(tmp_path):
    """PyTorch's names, the biases split between bias_ih and bias_hh, only the vocabulary in the
    metadata: the architecture comes from the shapes, and it scores as the same model with the
    biases summed."""
    npz = make_model(tmp_path / "model.npz", cell="gru", embed=6, layers=2)
    check_ok(invoke("export", npz, tmp_path / "ours.safetensors"))
    t = safetensors_numpy.load_file(tmp_path / "ours.safetensors")
    rng = numpy.random.default_rng(5)
    H = 8
    for k in range(2):  # move part of the r and z biases into bias_hh: sums are what count
        shift = rng.normal(0, 0.3, 2 * H).astype(numpy.float32)
        t[f"rnn.bias_ih_l{k}"][: 2 * H] -= shift
        t[f"rnn.bias_hh_l{k}"][: 2 * H] += shift
    theirs = tmp_path / "theirs.safetensors"
    safetensors_numpy.save_file(t, theirs, metadata={"charnn.vocab": json.dumps(CHAR_VOCAB.to_json())})
    assert checkpoint.load(theirs).config == checkpoint.load(npz).config
    for a, b in zip(scores(theirs, tmp_path), scores(npz, tmp_path)):
        assert a["logprob"] == pytest.approx(b["logprob"], rel=1e-5)
    r = check_ok(invoke("info", theirs))
    assert "unknown" in r.output


def test_refusals(tmp_path):
    npz = make_model(tmp_path / "model.npz", cell="lstm", layers=1)
    good = tmp_path / "m.safetensors"
    check_ok(invoke("export", npz, good))
    t = safetensors_numpy.load_file(good)
    vocab = {"charnn.vocab": json.dumps(CHAR_VOCAB.to_json())}

    def bad(name, tensors, metadata=vocab):
        path = tmp_path / f"{name}.safetensors"
        safetensors_numpy.save_file(tensors, path, metadata=metadata)
        return path

    cases = [
        (bad("novocab", t, None), "holds no vocabulary"),
        (bad("missing", {k: v for k, v in t.items() if k != "rnn.bias_hh_l0"}), "tensor rnn.bias_hh_l0 is missing"),
        (bad("extra", dict(t, extra=numpy.zeros(2, numpy.float32))), "unexpected tensors: extra"),
        (bad("shape", dict(t, **{"decoder.weight": numpy.zeros((len(CHAR_VOCAB), 9), numpy.float32)})),
         f"tensor decoder.weight has shape ({len(CHAR_VOCAB)}, 9), expected ({len(CHAR_VOCAB)}, 8)"),
        (bad("vocab", dict(t, **{"decoder.bias": numpy.zeros(3, numpy.float32)})), "the vocabulary has"),
        (bad("ints", dict(t, **{"decoder.bias": t["decoder.bias"].astype(numpy.int32)})), "dtype I32"),
        (bad("nan", dict(t, **{"decoder.bias": t["decoder.bias"] * numpy.nan})), "NaN"),
        (bad("gates", {k: v[:-3] if k.startswith("rnn.") else v for k, v in t.items()}), "not the gates"),
        (bad("badjson", t, dict(vocab, **{"charnn.config": "{"})), "charnn.config is not JSON"),
    ]
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    cases.append((truncated, "not a valid safetensors file"))
    for path, needle in cases:
        for cmd in (["sample", path, "-n", 5], ["score", path, "-"], ["info", path]):
            check_error(invoke(*cmd, input="the cat\n"), 1, str(path), needle)
        check_error(invoke("export", path, tmp_path / "x.safetensors"), 1, needle)
    check_error(invoke("export", npz, tmp_path), 2, "is a directory")
    check_error(invoke("export", npz, tmp_path / "no" / "x.safetensors"), 1, "cannot write")
    check_error(invoke("export", tmp_path / "none.npz", tmp_path / "x.safetensors"), 1, "no such file")
    check_error(invoke("export", npz), 2, "OUT")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


# ----- PyTorch (skipped without torch) -----

def torch_logprob(path, text):
    """The README's lines: the exported file in nn.RNN / nn.LSTM / nn.GRU, then one line's
    log-probability as charnn score computes it (from the newline before it to the one after)."""
    import torch
    from torch import nn
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = load_file(path)
    with safe_open(path, "pt") as f:
        cfg, vocab = (json.loads(f.metadata()[k]) for k in ("charnn.config", "charnn.vocab"))
    V, E, H, cell = cfg["vocab_size"], cfg["embed"], cfg["hidden"], cfg["cell"]
    rnn = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell](
        E or V, H, cfg["layers"], **({"nonlinearity": cfg["activation"]} if cell == "rnn" else {}))
    rnn.load_state_dict({k[4:]: v for k, v in weights.items() if k.startswith("rnn.")})
    decoder = nn.Linear(H, V)
    decoder.load_state_dict({"weight": weights["decoder.weight"], "bias": weights["decoder.bias"]})
    embed = nn.Embedding.from_pretrained(weights["embedding.weight"].float()) if E else (lambda i: nn.functional.one_hot(i, V).float())

    ids = torch.tensor([vocab["tokens"].index(c) for c in "\n" + text + "\n"])[:, None]  # (T+1, 1)
    with torch.no_grad():
        logp = decoder(rnn(embed(ids[:-1]))[0]).log_softmax(-1)  # (T, 1, V)
        return logp.gather(-1, ids[1:, :, None]).sum().item()


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("embed", [0, 6])
def test_pytorch_gives_charnn_scores(tmp_path, cell, embed):
    pytest.importorskip("torch")
    npz = make_model(tmp_path / "model.npz", cell=cell, embed=embed, layers=2, hidden=12)
    out = tmp_path / "model.safetensors"
    check_ok(invoke("export", npz, out))
    for line, s in zip(LINES.splitlines(), scores(npz, tmp_path)):  # the model charnn trained, not the export
        assert torch_logprob(str(out), line) == pytest.approx(s["logprob"], rel=1e-5), line


# ----- export never replaces a model or a run's files -----

@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A trained run folder: model.npz, last.npz, metrics.jsonl and a token cache."""
    from cli_support import train, write_corpus

    folder = tmp_path_factory.mktemp("export-run")
    corpus = write_corpus(folder)
    check_ok(train(corpus, folder / "run", "--max-steps", 3))
    return folder / "run"


def unchanged(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_export_refuses_to_replace_the_runs_own_files(run_folder, tmp_path):
    """`charnn export RUN RUN/last.npz` replaced the resume checkpoint with a safetensors file
    (and --resume then failed); `export run/model.npz run/model.npz` the model itself."""
    before = unchanged(run_folder)
    cache = next(p for p in run_folder.iterdir() if p.name.startswith("tokens-"))
    cases = [(run_folder, run_folder / "last.npz", "the resume checkpoint last.npz"),
             (run_folder, run_folder / "model.npz", "the model file being exported"),
             (run_folder / "model.npz", run_folder / "model.npz", "the model file being exported"),
             (run_folder / "last.npz", run_folder / "model.npz", "the best model model.npz"),
             (run_folder, run_folder / "metrics.jsonl", "the metrics metrics.jsonl"),
             (run_folder, cache, f"a token cache {cache.name}"),
             (run_folder, run_folder / "corpus-stdin.txt", "the corpus kept from stdin")]
    link = tmp_path / "elsewhere.safetensors"
    link.symlink_to(run_folder / "last.npz")
    cases.append((run_folder, link, "the resume checkpoint last.npz"))
    hard = tmp_path / "hard.npz"
    os.link(run_folder / "model.npz", hard)
    cases.append((run_folder, hard, "the model file being exported"))
    for model, out, needle in cases:
        check_error(invoke("export", model, out), 1, str(out), needle)
    assert unchanged(run_folder) == before and link.is_symlink()
    assert checkpoint.load(run_folder / "last.npz").optim  # still the resume checkpoint
    # beside the run's files, a new name is fine
    check_ok(invoke("export", run_folder, run_folder / "model.safetensors"))
    check_ok(invoke("export", run_folder / "model.safetensors", tmp_path / "again.safetensors"))
    (run_folder / "model.safetensors").unlink()
    assert unchanged(run_folder) == before


def test_export_to_names_a_run_uses_outside_a_run_folder(tmp_path):
    """A folder that holds no run is not protected: model.npz there is just a name."""
    npz = make_model(tmp_path / "m.npz")
    other = tmp_path / "plain"
    other.mkdir()
    check_ok(invoke("export", npz, other / "metrics.jsonl"))

"""Dynamic evaluation that tunes itself (charnn/dynamic_run.py, dynamic.search): the grid that
extends past an edge (on a made-up loss), the validation text a model file names, the fallback
to the defaults when there is none, never tuning on the scored text, explicit settings winning,
and the Python API running the command's pipeline."""

from __future__ import annotations

import json
import math
import re

import numpy
import pytest

from charnn import api
from charnn import dynamic as dyn
from charnn import dynamic_run as dyn_run
from charnn.io.checkpoint import load

from cli_support import check_ok, corpus_text, invoke, readme_words, train, write_corpus


# ----- the grid that extends past an edge, on made-up losses -----

def bowl(lr_best, decay_best=0.0):
    """A loss whose lowest point is at (lr_best, decay_best) on log scales (λ = 0 counts as 1e-9)."""
    def loss(lr, d):
        return (math.log10(lr) - math.log10(lr_best)) ** 2 + (math.log10(d or 1e-9) - math.log10(decay_best or 1e-9)) ** 2 / 100
    return loss


def test_the_ladder_continues_the_grids_steps():
    assert dyn.ladder(1e-4, up=False) == 3e-5 and dyn.ladder(3e-5, up=False) == 1e-5
    assert dyn.ladder(3e-3, up=True) == 1e-2 and dyn.ladder(1e-2, up=True) == 3e-2
    assert dyn.ladder(1e-3, up=True) == 3e-3 and dyn.ladder(3e-4, up=False) == 1e-4


def test_the_grid_extends_below_its_low_edge_until_the_loss_turns():
    (lr, d), results = dyn.search(bowl(2e-5), dyn.LR_GRID, dyn.DECAY_GRID)
    grid = [(a, b) for a in dyn.LR_GRID for b in dyn.DECAY_GRID]
    assert [(a, b) for a, b, _ in results[:12]] == grid  # the grid first, in order
    # 1e-4 was best at the edge: 3e-5 better, 1e-5 worse (the loss turned), so it stops there
    assert [(a, b) for a, b, _ in results[12:]] == [(3e-5, 0.0), (1e-5, 0.0)]
    assert (lr, d) == (3e-5, 0.0)


def test_the_grid_extends_above_its_high_edges_up_to_the_limits():
    (lr, d), results = dyn.search(lambda lr, d: d - lr, dyn.LR_GRID, dyn.DECAY_GRID)  # the higher η the better
    assert (lr, d) == (dyn.LR_LIMITS[1], 0.0)
    assert [a for a, _, _ in results[12:]] == [1e-2, 3e-2, 0.1]  # at the best λ, never past the limit
    (lr, d), results = dyn.search(lambda lr, d: math.log10(lr / 1e-3) ** 2 - d, dyn.LR_GRID, dyn.DECAY_GRID)
    assert (lr, d) == (1e-3, 1.0)
    assert [(a, b) for a, b, _ in results[12:]] == [(1e-3, b) for b in (3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)]


def test_a_best_inside_the_grid_or_a_grid_given_is_not_extended():
    (lr, d), results = dyn.search(bowl(1e-3, 1e-4), dyn.LR_GRID, dyn.DECAY_GRID)
    assert (lr, d) == (1e-3, 1e-4) and len(results) == 12
    (lr, d), results = dyn.search(bowl(2e-5), dyn.LR_GRID, (0.0,), extend_lr=False)
    assert (lr, d) == (1e-4, 0.0) and len(results) == 4


def test_a_diverging_extension_stops_the_search():
    def loss(lr, d):
        return math.inf if lr > 5e-3 else -lr

    (lr, _), results = dyn.search(loss, dyn.LR_GRID, (0.0,))
    assert lr == 3e-3 and [a for a, _, _ in results] == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]


# ----- a small model trained with a validation split -----

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("selftune")
    corpus = write_corpus(folder, lines=300)
    check_ok(train(corpus, folder / "run", "--max-steps", 60, "--hidden", "32", "--forget-bias", "1"))
    return folder, corpus


def _dynamic(model, text, *extra):
    r = check_ok(invoke("score", model, text, "--document", "--dynamic", "--format", "jsonl", "--device", "cpu", *extra))
    line = [x for x in r.stderr.splitlines() if "dynamic evaluation" in x]
    assert len(line) == 1, r.stderr
    summary = json.loads(r.stdout.splitlines()[-1])
    return summary["dynamic"], line[0], summary


def test_the_validation_text_is_the_split_training_held_out(run):
    folder, corpus = run
    model = folder / "run" / "model.npz"
    ckpt = load(model)
    all_ids = ckpt.vocab.encode(corpus.read_text())
    end = len(all_ids) - int(round(len(all_ids) * 0.1))
    ids, where = dyn_run.heldout_ids(ckpt.meta, ckpt.vocab, model, max_tokens=100)
    numpy.testing.assert_array_equal(ids, all_ids[end:end + 101])  # its first tokens, bounded
    assert where == f"the first 100 tokens of the validation split of {corpus}"
    ids, _ = dyn_run.heldout_ids(ckpt.meta, ckpt.vocab, model)
    numpy.testing.assert_array_equal(ids, all_ids[end:])


def test_score_dynamic_tunes_itself_on_the_models_validation_split(run, tmp_path):
    folder, corpus = run
    text = tmp_path / "text.txt"
    text.write_text(corpus_text(10, seed=31))
    d, line, _ = _dynamic(folder / "run" / "model.npz", text)
    n_val = int(round(len(corpus.read_text()) * 0.1))
    where = f"the first {n_val - 1:,} tokens of the validation split of {corpus}"
    assert d["source"] == {"lr": f"tuned on {where}", "decay": f"tuned on {where}", "segment": "default"}
    assert [(t["lr"], t["decay"]) for t in d["tuning"]][:12] == [(a, b) for a in dyn.LR_GRID for b in dyn.DECAY_GRID]
    best = min(d["tuning"], key=lambda t: t["nats_per_token"])
    assert (d["lr"], d["decay"]) == (best["lr"], best["decay"])
    assert "untuned" not in d
    assert line == (f"charnn score: dynamic evaluation with lr {d['lr']:g} (tuned), decay {d['decay']:g} (tuned), "
                    f"segment 20 (default); tuned on {where} ({len(d['tuning'])} passes); gradient statistics from "
                    f"{d['stats']}")
    # the very passes of a tuning on the split's tokens, with the statistics of the training part
    from charnn.backend import get_backend
    from charnn.io.checkpoint import load_model

    lm, vocab, ckpt = load_model(folder / "run" / "model.npz", get_backend("cpu", "float32", announce=False))
    stats_ids, _ = dyn_run.training_side_ids(ckpt.meta, vocab, folder / "run")
    ids, _ = dyn_run.heldout_ids(ckpt.meta, vocab, folder / "run")
    best, results = dyn.tune(lm, ids, dyn.gradient_stats(lm, stats_ids, 20), 20)
    assert [t["nats_per_token"] for t in d["tuning"]] == [r[2] for r in results]
    assert (best.lr, best.decay) == (d["lr"], d["decay"])


def test_the_search_returns_a_point_where_the_loss_turned(run, tmp_path):
    """On a real model: the best is never on an edge of what was tried that could extend."""
    folder, _ = run
    d, _, _ = _dynamic(folder / "run" / "model.npz", write_corpus(tmp_path, "t.txt", lines=8, seed=40))
    lrs = sorted({t["lr"] for t in d["tuning"]})
    decays = sorted({t["decay"] for t in d["tuning"]})
    if d["lr"] == lrs[-1]:
        assert dyn.ladder(d["lr"], True) > dyn.LR_LIMITS[1]
    if d["lr"] == lrs[0]:
        assert dyn.ladder(d["lr"], False) < dyn.LR_LIMITS[0]
    if d["decay"] == decays[-1]:
        assert d["decay"] in (0.0, 1.0)
    if d["decay"] == decays[0]:
        assert d["decay"] == 0.0 or dyn.ladder(d["decay"], False) < dyn.DECAY_FLOOR


@pytest.mark.parametrize("how", ["changed", "missing"])
def test_without_its_corpus_it_falls_back_to_the_defaults_and_says_so(run, tmp_path, how):
    from test_dynamic import _with_corpus

    folder, corpus = run
    text, stats = tmp_path / "text.txt", tmp_path / "stats.txt"
    text.write_text(corpus_text(5, seed=32))
    stats.write_text(corpus_text(40, seed=33))
    recorded = tmp_path / "corpus.txt"
    if how == "changed":
        recorded.write_text(corpus.read_text() + "the end\n")
    model = _with_corpus(folder / "run" / "model.npz", tmp_path / "model.npz", str(recorded))
    d, line, _ = _dynamic(model, text, "--dynamic-stats", stats)
    default = dyn.DEFAULTS["char"]
    assert (d["lr"], d["decay"]) == (default.lr, default.decay) and "tuning" not in d
    assert d["source"] == {"lr": "default", "decay": "default", "segment": "default"}
    why = "has changed since training" if how == "changed" else "is not found"
    assert d["untuned"] == f"no held-out training-side text to tune on (its training corpus {recorded} {why})"
    assert f"the defaults, not tuned: {d['untuned']}" in line


def test_a_model_trained_without_a_split_falls_back_and_one_with_a_validation_file_tunes_on_it(tmp_path):
    corpus, val = write_corpus(tmp_path, lines=200), write_corpus(tmp_path, "val.txt", lines=20, seed=5)
    text = write_corpus(tmp_path, "text.txt", lines=5, seed=6)
    check_ok(train(corpus, tmp_path / "nosplit", "--max-steps", 3, "--val-fraction", 0))
    d, _, _ = _dynamic(tmp_path / "nosplit", text)
    assert d["untuned"] == (f"no held-out training-side text to tune on (the model was trained on all of {corpus}, "
                            f"with no validation split)")
    check_ok(train(corpus, tmp_path / "valfile", "--max-steps", 3, "--val", val))
    d, line, _ = _dynamic(tmp_path / "valfile", text)
    assert d["source"]["lr"] == f"tuned on the first {len(val.read_text()):,} tokens of its validation file {val}"
    val.write_text(val.read_text() + "more\n")
    d, _, _ = _dynamic(tmp_path / "valfile", text)
    assert d["untuned"] == f"no held-out training-side text to tune on (its validation file {val} has changed since training)"


def test_it_never_tunes_on_the_scored_text(run, tmp_path):
    """The validation split itself, or a text holding a passage of it, is scored with the
    defaults; a text with only a few words in common with it is not an overlap."""
    folder, corpus = run
    whole = corpus.read_text()
    n_val = int(round(len(whole) * 0.1))
    tail = whole[-n_val:]
    for name, scored in (("split", tail), ("passage", corpus_text(5, seed=50) + tail[300:450] + corpus_text(5, seed=51))):
        text = tmp_path / f"{name}.txt"
        text.write_text(scored)
        d, line, _ = _dynamic(folder / "run" / "model.npz", text)
        assert "tuning" not in d and d["source"]["lr"] == "default", name
        assert d["untuned"].startswith("the scored text overlaps the held-out text it would tune on (the first "), name
        assert "never tunes on the scored text" in line
    # a long validation text: where its first tokens overlap the scored text, its last are used
    from charnn.backend import get_backend
    from charnn.io.checkpoint import load_model

    lm, vocab, ckpt = load_model(folder / "run" / "model.npz", get_backend("cpu", "float32", announce=False))
    head = tail[:200]
    for scored, used in ((head, "last"), (corpus_text(5, seed=52), "first"), (tail[:120] + tail[-120:], None)):
        plan = dyn_run.prepare(lm, vocab, scored, meta=ckpt.meta, model_path=folder / "run", tune_tokens=150)
        if used is None:
            assert plan.tuning is None and plan.untuned.endswith(
                ", and its other end), and dynamic evaluation never tunes on the scored text")
        else:
            assert plan.tuned_on == f"the {used} 150 tokens of the validation split of {corpus}", (used, plan.untuned)
    ids = numpy.arange(100)
    assert dyn_run.overlaps(ids[10:80], ids, 64) and not dyn_run.overlaps(ids[10:80], ids[30:], 64)
    assert dyn_run.overlaps(ids[40:50], ids, 64)  # a short text wholly inside it
    assert not dyn_run.overlaps(numpy.r_[ids[:40], ids[60:99]], ids, 64)


def test_rates_given_or_a_tuning_file_win(run, tmp_path):
    folder, _ = run
    text, held = tmp_path / "text.txt", tmp_path / "held.txt"
    text.write_text(corpus_text(6, seed=34))
    held.write_text(corpus_text(6, seed=35))
    d, line, _ = _dynamic(folder / "run", text, "--dynamic-lr", "0.002", "--dynamic-decay", "0.01")
    assert (d["lr"], d["decay"]) == (0.002, 0.01) and "tuning" not in d and "untuned" not in d
    assert line.startswith("charnn score: dynamic evaluation with lr 0.002 (given), decay 0.01 (given), segment 20")
    d, _, _ = _dynamic(folder / "run", text, "--dynamic-tune", held)
    assert d["source"]["lr"] == f"tuned on {held}"
    d, _, _ = _dynamic(folder / "run", text, "--dynamic-lr", "0")  # η = 0: nothing to tune
    assert "tuning" not in d and d["source"]["decay"] == "default" and "untuned" not in d


def test_the_api_runs_the_commands_pipeline(run, tmp_path):
    folder, _ = run
    text = tmp_path / "text.txt"
    text.write_text(corpus_text(10, seed=36))
    d, line, summary = _dynamic(folder / "run", text)
    m = api.load(folder / "run")
    scored, plan = api.score_dynamic(m, text.read_text())
    assert (plan.settings.lr, plan.settings.decay, plan.settings.segment) == (d["lr"], d["decay"], d["segment"])
    assert scored.nats_per_token == summary["nats_per_token"] and scored.tokens == summary["tokens"]
    assert line == f"charnn score: {plan.describe()}"
    static = api.score(m, text.read_text(), document=True)[0]
    scored, plan = api.score_dynamic(m, text.read_text(), dyn.DynamicSettings(lr=0.0, segment=5))
    assert plan.source == {"lr": "given", "decay": "default", "segment": "given"}
    assert scored.logprob == pytest.approx(static.logprob, rel=1e-5)
    with pytest.raises(dyn.DynamicError, match="is the text being scored"):
        api.score_dynamic(m, text.read_text(), dyn.DynamicSettings(tune=str(text)))


def test_readme_states_the_defaults():
    """The README's manual gives dynamic.DEFAULTS as they are (dynamic.py holds them)."""
    said = re.search(r"\(characters: rate (\S+), decay (\S+), segments of (\d+); words: (\S+), (\S+), (\d+);",
                     readme_words())
    assert said, "the README no longer states the defaults where it did"
    c, w = dyn.DEFAULTS["char"], dyn.DEFAULTS["word"]
    assert [float(x) for x in said.groups()] == [c.lr, c.decay, c.segment, w.lr, w.decay, w.segment]

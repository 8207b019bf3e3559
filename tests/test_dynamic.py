"""Dynamic evaluation (charnn/dynamic.py, score --document --dynamic): the update rule on small
arrays, causality (a token is scored before any update that saw it), η = 0 as static scoring,
adaptation to a repeated sentence, the model file untouched, and the command line."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy
import pytest

from charnn import dynamic as dyn
from charnn import dynamic_run as dyn_run
from charnn.backend import get_backend
from charnn.io.checkpoint import load_model
from charnn.score import score_document

from cli_support import check_error, check_ok, corpus_text, invoke, train, write_corpus

# A sentence of the corpus's characters that its random sentences over WORDS never hold.
ODD = "bad hog omits wry fish at dawn\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(folder, corpus): a small model trained 60 steps on the random-sentence corpus (forget
    bias 1, the default when the thresholds below were measured; with 0 the weak model adapts
    less: 2.80 against 4.06 nats over the last five repetitions, not 2.1 against 4.1)."""
    folder = tmp_path_factory.mktemp("dyn")
    corpus = write_corpus(folder, lines=300)
    check_ok(train(corpus, folder / "run", "--max-steps", 60, "--hidden", "32", "--forget-bias", "1"))
    return folder, corpus


@pytest.fixture(scope="module")
def loaded(run):
    lm, vocab, _ = load_model(run[0] / "run" / "model.npz", get_backend("cpu", "float32", announce=False))
    return lm, vocab


@pytest.fixture(scope="module")
def stats(loaded):
    lm, vocab = loaded
    return dyn.gradient_stats(lm, dyn.text_ids(vocab, corpus_text(200, seed=5)), 8)


# ----- the update rule -----

def test_the_update_steps_against_the_normalised_gradient_and_decays_to_theta0():
    theta0 = {"w": numpy.array([1.0, 2.0, 3.0, 4.0])}
    ms = {"w": numpy.array([1.0, 4.0, 0.0, 16.0])}  # sqrt: 1, 2, 0, 4; mean 1.75
    rule = dyn.DynamicUpdate(theta0, ms, lr=0.5, decay=0.2, eps_rel=0.1)
    eps = 0.175
    s = numpy.array([1.0, 2.0, 0.0, 4.0]) + eps
    mean_s = 1.75 + eps
    p = {"w": numpy.array([2.0, 0.0, 3.5, 10.0])}
    g = {"w": numpy.array([1.0, -1.0, 2.0, 0.5])}
    before, grad = p["w"].copy(), g["w"].copy()
    rule.step(p, g)
    rate = numpy.minimum(0.2 * s / mean_s, 1.0)
    expected = before - 0.5 * grad / s + rate * (theta0["w"] - before)
    numpy.testing.assert_allclose(p["w"], expected, rtol=1e-12)
    assert rate[3] < 1.0 and rate[2] > 0  # a parameter the statistics never moved still decays


def test_decay_alone_pulls_every_parameter_towards_theta0_and_never_past_it():
    rng = numpy.random.default_rng(0)
    theta0 = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5)}
    ms = {"a": rng.random((3, 4)), "b": 100 + rng.random(5)}  # b's rates clip at 1
    rule = dyn.DynamicUpdate(theta0, ms, lr=0.0, decay=0.5)
    p = {k: v + rng.standard_normal(v.shape) for k, v in theta0.items()}
    zero = {k: numpy.zeros_like(v) for k, v in theta0.items()}
    for _ in range(5):
        gap = {k: numpy.abs(p[k] - theta0[k]) for k in p}
        side = {k: numpy.sign(p[k] - theta0[k]) for k in p}
        rule.step(p, zero)
        for k in p:
            now = p[k] - theta0[k]
            assert (numpy.abs(now) <= gap[k] + 1e-15).all()
            assert ((numpy.sign(now) == side[k]) | (numpy.abs(now) < 1e-12)).all()  # no overshoot
    numpy.testing.assert_allclose(p["b"], theta0["b"], rtol=0, atol=1e-12)  # rate 1: θ0 in one step
    assert (numpy.abs(p["a"] - theta0["a"]) > 0).all()


def test_settings_refuse_nonsense():
    for bad in [dict(lr=float("nan")), dict(lr=-1.0), dict(decay=1.5), dict(decay=float("inf")), dict(segment=0),
                dict(segment=2.5)]:
        kw = {"lr": 0.01, "decay": 0.1, "segment": 5, **bad}
        with pytest.raises(dyn.DynamicError):
            dyn.DynamicSettings(**kw)


# ----- scoring -----

def test_a_token_is_scored_before_any_update_that_saw_it(loaded, stats):
    """Changing one late token changes no earlier token's log-probability, bit for bit, even
    with a large learning rate (every update before it saw only the text before it)."""
    lm, vocab = loaded
    text = corpus_text(20, seed=3)
    k = len(text) - 30  # inside a late segment, not at its start
    other = "a" if text[k] != "a" else "o"
    changed = text[:k] + other + text[k + 1:]
    settings = dyn.DynamicSettings(lr=0.05, decay=0.01, segment=8)
    a = dyn.score_dynamic(lm, vocab, text, settings, stats, with_tokens=True)
    b = dyn.score_dynamic(lm, vocab, changed, settings, stats, with_tokens=True)
    # surprisal[i] is the prediction of text[i] (the first from the separator)
    assert a.surprisal[:k] == b.surprisal[:k]
    assert a.surprisal[k] != b.surprisal[k]
    static = dyn.score_dynamic(lm, vocab, text, dyn.DynamicSettings(0.0, 0.0, 8), stats, with_tokens=True)
    assert a.surprisal[8:] != static.surprisal[8:]  # the updates did change later scores


def test_the_first_segment_is_scored_with_the_trained_weights(loaded, stats):
    lm, vocab = loaded
    text = corpus_text(10, seed=4)
    huge = dyn.score_dynamic(lm, vocab, text, dyn.DynamicSettings(1e6, 0.0, 8), stats, with_tokens=True)
    static = dyn.score_dynamic(lm, vocab, text, dyn.DynamicSettings(0.0, 0.0, 8), stats, with_tokens=True)
    assert huge.surprisal[:8] == static.surprisal[:8]
    assert huge.surprisal[8:16] != static.surprisal[8:16]


def test_a_zero_learning_rate_is_static_scoring(loaded, stats):
    """η = 0: the weights never move (θ0 − θ stays 0, so the decay adds exact zeros), and the
    result is score --document's. Bit for bit against the same scoring without updates; to
    float rounding against score_document, which runs the text in chunks of 200 tokens
    through the forward pass that keeps no cache, where dynamic scoring runs segments of 8
    through the one that does (other shapes of the same float32 sums)."""
    lm, vocab = loaded
    text = corpus_text(40, seed=6)
    zero = dyn.score_dynamic(lm, vocab, text, dyn.DynamicSettings(0.0, 0.3, 8), stats, with_tokens=True)
    none = dyn.score_dynamic(lm, vocab, text, dyn.DynamicSettings(0.0, 0.0, 8), stats, with_tokens=True)
    assert zero.surprisal == none.surprisal
    static = score_document(lm, vocab, text, with_tokens=True)
    assert zero.tokens == static.tokens
    numpy.testing.assert_allclose(zero.surprisal, static.surprisal, rtol=1e-5, atol=1e-6)
    assert zero.logprob == pytest.approx(static.logprob, rel=1e-6)


def test_dynamic_evaluation_learns_a_repeated_sentence_the_model_never_saw(loaded, stats):
    lm, vocab = loaded
    text = ODD * 25
    static = score_document(lm, vocab, text, with_tokens=True)
    s = dyn.score_dynamic(lm, vocab, text, dyn.DynamicSettings(0.01, 0.01, 8), stats, with_tokens=True)
    n = len(ODD)
    last_static = float(numpy.mean(static.surprisal[-5 * n:]))
    last_dynamic = float(numpy.mean(s.surprisal[-5 * n:]))
    # measured: 2.16 against 2.81 nats per character over the text; the last five times 2.1
    # against 4.1 bits per character (a weak model: 60 steps of 32 units)
    assert s.nats_per_token < 0.85 * static.nats_per_token, (s.nats_per_token, static.nats_per_token)
    assert last_dynamic < 0.6 * last_static, (last_dynamic, last_static)


def test_the_model_is_not_changed(loaded, stats):
    lm, vocab = loaded
    before = lm.host_params()
    dyn.score_dynamic(lm, vocab, ODD * 3, dyn.DynamicSettings(0.5, 0.0, 4), stats)
    for k, v in lm.host_params().items():
        numpy.testing.assert_array_equal(v, before[k], err_msg=k)


def test_tune_picks_the_best_grid_point(loaded, stats):
    lm, vocab = loaded
    ids = dyn.text_ids(vocab, ODD * 6)
    best, results = dyn.tune(lm, ids, stats, 8, lrs=(0.0, 0.01), decays=(0.0, 0.5))
    assert [(lr, d) for lr, d, _ in results] == [(0.0, 0.0), (0.0, 0.5), (0.01, 0.0), (0.01, 0.5)]
    low = min(results, key=lambda r: r[2])
    assert (best.lr, best.decay, best.segment) == (low[0], low[1], 8)
    assert best.lr == 0.01  # a repeated sentence is learned
    assert results[0][2] == results[1][2]  # η = 0: the decay has nothing to undo


def test_dynamic_evaluation_in_one_call_refuses_the_scored_text_as_tuning_text(loaded):
    lm, vocab = loaded
    text = corpus_text(5, seed=8)
    with pytest.raises(dyn.DynamicError, match="tuning text is the text to be scored"):
        dyn_run.dynamic_evaluation(lm, vocab, text, corpus_text(30, seed=9), tune_text=text)
    s, settings = dyn_run.dynamic_evaluation(lm, vocab, text, corpus_text(30, seed=9), segment=6,
                                         tune_text=corpus_text(5, seed=10))
    assert settings.segment == 6 and settings.lr in dyn.LR_GRID and settings.decay in dyn.DECAY_GRID
    assert s.tokens == len(text)


# ----- the command line -----

def test_score_dynamic_says_what_it_used_and_leaves_the_model_file_alone(run, tmp_path):
    folder, corpus = run
    model = folder / "run" / "model.npz"
    text = tmp_path / "odd.txt"
    text.write_text(ODD * 10)
    raw, mtime = model.read_bytes(), os.stat(model).st_mtime_ns
    r = check_ok(invoke("score", model, text, "--document", "--dynamic", "--format", "jsonl", "--device", "cpu"))
    summary = json.loads(r.stdout.splitlines()[-1])
    d = summary["dynamic"]
    default = dyn.DEFAULTS["char"]
    # (since 2026-12-05 the rate and decay not given are tuned on the model's validation split)
    where = d["source"]["lr"].removeprefix("tuned on ")
    assert d["source"] == {"lr": f"tuned on {where}", "decay": f"tuned on {where}", "segment": "default"}
    assert str(corpus) in where and d["segment"] == default.segment
    assert str(corpus) in d["stats"] and d["stats_tokens"] > 0
    lines = [line for line in r.stderr.splitlines() if "dynamic evaluation" in line]
    assert lines == [f"charnn score: dynamic evaluation with lr {d['lr']:g} (tuned), decay {d['decay']:g} "
                     f"(tuned), segment {default.segment} (default); tuned on {where} ({len(d['tuning'])} passes); "
                     f"gradient statistics from {d['stats']}"]
    assert model.read_bytes() == raw and os.stat(model).st_mtime_ns == mtime
    static = json.loads(check_ok(invoke("score", model, text, "--document", "--format", "jsonl",
                                        "--device", "cpu")).stdout.splitlines()[-1])
    assert summary["tokens"] == static["tokens"]
    assert summary["nats_per_token"] < static["nats_per_token"]
    zero = json.loads(check_ok(invoke("score", model, text, "--document", "--dynamic", "--dynamic-lr", "0",
                                      "--format", "jsonl", "--device", "cpu")).stdout.splitlines()[-1])
    assert zero["nats_per_token"] == pytest.approx(static["nats_per_token"], rel=1e-6)


def test_score_dynamic_tunes_on_the_file_given_and_reports_it(run, tmp_path):
    folder, corpus = run
    model = folder / "run" / "model.npz"
    text, held = tmp_path / "text.txt", tmp_path / "held.txt"
    text.write_text(corpus_text(8, seed=11))
    held.write_text(corpus_text(8, seed=12))
    r = check_ok(invoke("score", model, text, "--document", "--dynamic", "--dynamic-tune", held, "--dynamic-decay",
                        "0.02", "--dynamic-segment", "6", "--format", "jsonl", "--device", "cpu"))
    d = json.loads(r.stdout.splitlines()[-1])["dynamic"]
    assert d["source"] == {"lr": f"tuned on {held}", "decay": "given", "segment": "given"}
    assert d["decay"] == 0.02 and d["segment"] == 6
    # the grid first, then past its edge where the best sat on it
    assert [t["lr"] for t in d["tuning"]][:4] == list(dyn.LR_GRID) and {t["decay"] for t in d["tuning"]} == {0.02}
    assert d["lr"] == min(d["tuning"], key=lambda t: t["nats_per_token"])["lr"]
    line = [x for x in r.stderr.splitlines() if "dynamic evaluation" in x]
    assert len(line) == 1 and "(tuned)" in line[0] and f"; tuned on {held} (" in line[0] and "decay 0.02 (given)" in line[0]
    # the table output says it too, and --dynamic-stats replaces the training corpus
    r = check_ok(invoke("score", model, text, "--document", "--dynamic", "--dynamic-stats", held, "--device", "cpu"))
    assert f"gradient statistics from the last {len(corpus_text(8, seed=12))} tokens of {held}" in r.stderr
    assert "nats/token" in r.stdout


def _with_corpus(src, dst, corpus: str):
    """A copy of the model file ``src`` at ``dst`` that records ``corpus`` as its training
    corpus (the digest of the original's kept)."""
    with numpy.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
    meta["train"]["corpus"] = corpus
    arrays["meta"] = numpy.frombuffer(json.dumps(meta).encode("utf-8"), dtype=numpy.uint8)
    numpy.savez(dst, **arrays)
    return dst


def test_score_dynamic_without_its_training_corpus_asks_for_stats(run, tmp_path):
    folder, corpus = run
    text = tmp_path / "text.txt"
    text.write_text(ODD)
    changed = tmp_path / "corpus.txt"
    changed.write_text(corpus.read_text() + "the end\n")
    model = _with_corpus(folder / "run" / "model.npz", tmp_path / "changed.npz", str(changed))
    check_error(invoke("score", model, text, "--document", "--dynamic", "--device", "cpu"), 1,
                str(changed), "has changed since training", "--dynamic-stats FILE")
    gone = _with_corpus(folder / "run" / "model.npz", tmp_path / "gone.npz", str(tmp_path / "gone.txt"))
    check_error(invoke("score", gone, text, "--document", "--dynamic", "--device", "cpu"), 1,
                "gone.txt", "not found", "--dynamic-stats FILE")
    r = check_ok(invoke("score", gone, text, "--document", "--dynamic", "--dynamic-stats", changed, "--device", "cpu"))
    assert f"of {changed}" in r.stderr
    # a corpus kept beside the model file (e.g. read from stdin) is found there
    beside = tmp_path / "beside"
    beside.mkdir()
    shutil.copy(corpus, beside / "corpus-stdin.txt")
    model = _with_corpus(folder / "run" / "model.npz", beside / "model.npz", "elsewhere/corpus-stdin.txt")
    r = check_ok(invoke("score", model, text, "--document", "--dynamic", "--device", "cpu"))
    assert str(beside / "corpus-stdin.txt") in r.stderr


def test_the_default_statistics_leave_out_the_validation_tail(run, loaded):
    folder, corpus = run
    lm, vocab = loaded
    from charnn.io.checkpoint import load

    meta = load(folder / "run" / "model.npz").meta
    ids, where = dyn_run.training_side_ids(meta, vocab, folder / "run" / "model.npz", max_tokens=10 ** 9)
    all_ids = vocab.encode(corpus.read_text())
    n_val = int(round(len(all_ids) * 0.1))
    numpy.testing.assert_array_equal(ids, all_ids[: len(all_ids) - n_val])
    assert str(corpus) in where
    assert math.isfinite(float(sum(float(v.sum()) for v in dyn.gradient_stats(lm, ids[-200:], 8).values())))


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 1e-4)])
@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_the_engine_adapts_as_the_reference_does(run, dtype, tol, decay):
    """Dynamic evaluation on the CPU engine's paths (its compiled loops, packed products where
    the CPU has them, the one-pass update) against the reference operations (Settings.reference):
    the gradient statistics and every token's surprisal. float64 runs the reference maths on
    both (the kernels take float32), so they agree to rounding; float32 within the kernels'
    error (test_engine.py) compounded over the updates (measured: 3e-6 bits)."""
    from charnn.engine.settings import Settings

    folder, _ = run
    text, stats_text = ODD * 3 + corpus_text(6, seed=21), corpus_text(20, seed=13)
    settings = dyn.DynamicSettings(0.01, decay, 8)
    got = {}
    # "by direction": the packed products left to the engine, which runs the segments' forward
    # on the BLAS and their backward packed (CpuOps.segment_ops)
    for name, paths in (("engine", Settings(threads=1)), ("by direction", Settings(threads=1, plan={"packed"})),
                        ("reference", Settings.reference())):
        lm, vocab, _ = load_model(folder / "run" / "model.npz", get_backend("cpu", dtype, settings=paths))
        ms = dyn.gradient_stats(lm, dyn.text_ids(vocab, stats_text), settings.segment)
        got[name] = ms, dyn.score_dynamic(lm, vocab, text, settings, ms, with_tokens=True)
    ms_r, reference = got.pop("reference")
    for ms_e, engine in got.values():
        for k in ms_r:
            assert numpy.abs(ms_e[k] - ms_r[k]).max() <= tol * float(ms_r[k].max()), k
        numpy.testing.assert_allclose(engine.surprisal, reference.surprisal, rtol=0, atol=tol)
        assert engine.tokens == reference.tokens > 200


def test_dynamic_evaluation_keeps_its_arrays_on_the_device(run):
    """On the stand-in device (CuPy's rules without a GPU) the statistics, the update and the
    scores match the NumPy backend's (both float64), and the adapted weights stay on the device."""
    from standin import is_device, standin_backend

    folder, _ = run
    text, stats_text = ODD * 4, corpus_text(20, seed=13)
    settings = dyn.DynamicSettings(0.01, 0.01, 8)
    scores = {}
    for name, backend in (("numpy", get_backend("cpu", "float64", announce=False)),
                          ("standin", standin_backend(numpy.float64))):
        lm, vocab, _ = load_model(folder / "run" / "model.npz", backend)
        ms = dyn.gradient_stats(lm, dyn.text_ids(vocab, stats_text), settings.segment)
        if name == "standin":
            assert all(is_device(v) for v in ms.values())
            rule = dyn.DynamicUpdate(lm.params, ms, settings.lr, settings.decay)
            assert all(is_device(v) for d in (rule.keep, rule.pull, rule.lr_scale) for v in d.values())
        scores[name] = dyn.score_dynamic(lm, vocab, text, settings, ms, with_tokens=True)
    numpy.testing.assert_allclose(scores["numpy"].surprisal, scores["standin"].surprisal, rtol=1e-9, atol=1e-9)


# ----- the training-side text, read only as far as it is used (issue 34) -----

TEXTS = {
    "ascii": "the cat sat on a mat\n" * 40,
    "multibyte": "café 漢字 🐈 naïve — end\n" * 30,
    "crlf": "one two\r\nthree four\r\n" * 40,
    "bom": "\ufeffstart of it\n" + "the dog ran\n" * 40,
    "no final newline": "a b c\n" * 30 + "last line",
}


@pytest.mark.parametrize("name", list(TEXTS))
@pytest.mark.parametrize("encoding", ["utf-8", "latin-1", "utf-16"])
@pytest.mark.parametrize("level", ["char", "word"])
def test_file_ids_equal_the_whole_texts_tail(tmp_path, monkeypatch, name, encoding, level):
    """Read from the end (UTF-8, Latin-1: several growing reads, each starting mid-character or
    mid-line) or streamed (UTF-16), the tokens are those of the whole text's tail, the separator
    before them when the text is shorter; characters outside a char vocabulary left out."""
    from charnn.io import corpus
    from charnn.io.vocab import Vocab

    text = TEXTS[name]
    if encoding == "latin-1":
        text = text.encode("latin-1", "replace").decode("latin-1")
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode(encoding))
    normalised = text.lstrip("\ufeff").replace("\r\n", "\n")
    if level == "char":
        vocab = Vocab.build_char(set(normalised.replace("a", "")) | {"\n"})  # "a" left out
    else:
        vocab = Vocab.build_word(Vocab.count_words(normalised.replace("cat", "")), "regex")  # "cat" is <unk>
    monkeypatch.setattr(corpus, "TAIL_START", 7)  # several reads, each from a byte inside a character
    for k in (1, 5, 37, 200, 10_000):
        expected = dyn.text_ids(vocab, normalised)[-(k + 1):]
        numpy.testing.assert_array_equal(dyn_run.file_ids(path, vocab, encoding, max_tokens=k), expected, err_msg=str(k))


def test_file_ids_reads_only_the_end_of_a_large_file(tmp_path, monkeypatch):
    from charnn.io import corpus
    from charnn.io.vocab import Vocab

    path = tmp_path / "big.txt"
    path.write_text(corpus_text(200_000))  # about 5 MB
    read = []
    real_open = open

    def counting_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if str(file) == str(path):
            real_read = f.read
            f.read = lambda n=-1: read.append(len(data := real_read(n))) or data
        return f

    monkeypatch.setattr("builtins.open", counting_open)
    vocab = Vocab.build_char(set(corpus_text(200)))
    ids = dyn_run.file_ids(path, vocab, max_tokens=20_000)
    assert len(ids) == 20_001 and sum(read) <= 8 * 20_001, sum(read)
    numpy.testing.assert_array_equal(ids, vocab.encode(path.read_text()[-20_001:]))
    assert corpus.TAIL_START <= sum(read)


def test_dynamic_stats_of_a_large_file_costs_what_is_used(tmp_path, run):
    """score --dynamic-stats decoded the whole file into int64 ids for its last 20,000 tokens (a
    200 MB text cost 7 GB); now the end of the file, at a few hundred MB under the test's cap."""
    from test_bad_input import run_capped

    folder, _ = run
    big = tmp_path / "big.txt"
    with open(big, "w") as f:
        block = corpus_text(20_000, seed=4)
        for _ in range(80):  # about 40 MB
            f.write(block)
    text = tmp_path / "text.txt"
    text.write_text(ODD * 4)
    code, out, err, peak = run_capped("score", folder / "run", text, "--document", "--dynamic", "--dynamic-stats", big,
                                  "--device", "cpu", "-q")
    assert code == 0, err
    assert "gradient statistics from the last 20,000 tokens of" in err
    assert peak < 450 * 2**20, peak / 2**20


def test_the_training_side_without_a_validation_tail_is_read_from_the_end(tmp_path):
    corpus = write_corpus(tmp_path, lines=400)
    check_ok(train(corpus, tmp_path / "run", "--max-steps", 2, "--val-fraction", 0))
    from charnn.io.checkpoint import load

    ckpt = load(tmp_path / "run" / "model.npz")
    ids, where = dyn_run.training_side_ids(ckpt.meta, ckpt.vocab, tmp_path / "run", max_tokens=1000)
    numpy.testing.assert_array_equal(ids, ckpt.vocab.encode(corpus.read_text())[-1001:])
    assert where == f"the last 1,000 training tokens of {corpus}"


def test_a_run_trained_from_stdin_is_scored_dynamically_from_another_folder(tmp_path, monkeypatch):
    """Its corpus-stdin.txt is found by the model file's location (the run folder), whatever the
    working folder: as a run folder or a model file, relative or absolute."""
    work, other = tmp_path / "work", tmp_path / "other"
    work.mkdir()
    other.mkdir()
    monkeypatch.chdir(work)
    check_ok(invoke("train", "-", "--out", "runs/small", "--hidden", 16, "--layers", 1, "--seq-len", 8,
                    "--batch-size", 4, "--max-steps", 3, "--device", "cpu", "-q", input=corpus_text(300)))
    assert (work / "runs" / "small" / "corpus-stdin.txt").exists()
    monkeypatch.chdir(other)
    text = other / "text.txt"
    text.write_text(ODD)
    for model in (work / "runs" / "small", work / "runs" / "small" / "model.npz", "../work/runs/small"):
        r = check_ok(invoke("score", model, text, "--document", "--dynamic", "--device", "cpu", "-q"))
        assert "gradient statistics from the last" in r.stderr
        assert f"training tokens of {work / 'runs' / 'small' / 'corpus-stdin.txt'}" in r.stderr, r.stderr

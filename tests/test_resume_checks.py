"""What --resume cannot reproduce exactly it refuses, with one line naming the file: a last.npz
whose progress, options, optimizer state, carried state or RNG state were removed or edited,
and a token cache that was truncated or altered (rebuilt instead when its corpus is unchanged).
Exactness itself (resume == a run never stopped) is tested in test_train.py."""

from __future__ import annotations

import json
import shutil

import numpy
import pytest

from cli_support import check_error, check_ok, invoke, train, train_losses, write_corpus

# A constant rate: these runs stop by a smaller --max-steps, which would end a cosine schedule
# sooner (an interrupted cosine run resumes exactly: test_schedule.py).
ARGS = ["--eval-every", "4", "--log-every", "1", "--seed", "2", "--lr-schedule", "constant"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run stopped at step 8 (never modified: tests copy it) and its corpus."""
    folder = tmp_path_factory.mktemp("resume")
    corpus = write_corpus(folder)
    check_ok(train(corpus, folder / "run", *ARGS, "--max-steps", 8))
    return folder / "run", corpus


@pytest.fixture(scope="module")
def reference(tmp_path_factory, run):
    """The same run never stopped, to 12 steps."""
    _, corpus = run
    out = tmp_path_factory.mktemp("ref") / "run"
    check_ok(train(corpus, out, *ARGS, "--max-steps", 12))
    return out


def copy_run(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run[0], out)
    return out


def edit_last(out, edit):
    """Rewrite ``out``/last.npz through ``edit(arrays, meta)`` (plain numpy.savez)."""
    path = out / "last.npz"
    with numpy.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
    edit(arrays, meta)
    arrays["meta"] = numpy.frombuffer(json.dumps(meta).encode("utf-8"), dtype=numpy.uint8)
    numpy.savez(path, **arrays)


def resume(out, corpus=None, steps=12):
    extra = [] if corpus is None else [corpus]
    return invoke("train", *extra, "--resume", "--out", out, "-q", "--max-steps", steps)


def progress(key, value):
    def edit(a, m):
        if value is DELETE:
            del m["progress"][key]
        else:
            m["progress"][key] = value
    return edit


def option(key, value):
    def edit(a, m):
        m["train"][key] = value
    return edit


def drop(*prefixes):
    def edit(a, m):
        for k in [k for k in a if k.startswith(prefixes)]:
            del a[k]
    return edit


def set_meta(key, value):
    def edit(a, m):
        if value is DELETE:
            del m[key]
        else:
            m[key] = value
    return edit


def reshape_state(a, m):
    a["state/0/h"] = numpy.zeros((16, 5), dtype=numpy.float32)


DELETE = object()

CASES = [
    ("no opt_t", progress("opt_t", DELETE), ["no opt_t"]),
    ("no chunk", progress("chunk", DELETE), ["no chunk"]),
    ("step as text", progress("step", "8"), ["step", '"8"']),
    ("negative epoch", progress("epoch", -1), ["epoch", "-1"]),
    ("bool step", progress("step", True), ["step", "true"]),
    ("float chunk", progress("chunk", 2.0), ["chunk", "2.0"]),
    ("chunk past the epoch", progress("chunk", 10**6), ["chunk 1000000", "past"]),
    ("zero lr", progress("lr", 0), ["lr"]),
    ("NaN lr", progress("lr", float("nan")), ["lr", "nan"]),
    ("best_val as text", progress("best_val", "low"), ["best_val"]),
    ("batch size 0", option("batch_size", 0), ["batch size"]),
    ("batch size as text", option("batch_size", "4"), ["batch size"]),
    ("seq_len 0", option("seq_len", 0), ["seq_len", "0"]),
    ("unknown optimizer", option("optimizer", "adamw"), ["optimizer", "adamw"]),
    ("negative clip", option("clip", -1.0), ["clip"]),
    ("errors handler", option("errors", "bogus"), ["errors", "bogus"]),
    ("dropout 2", option("dropout", 2), ["dropout"]),
    ("no optimizer state", drop("optim/"), ["optimizer state", "lacks"]),
    ("one optimizer array gone", drop("optim/head.b.v"), ["optimizer state", "head.b.v"]),
    ("no carried state", drop("state/"), ["carried hidden state"]),
    ("carried state of another batch", reshape_state, ["state", "(16, 4)"]),
    ("no RNG state", set_meta("rng", {}), ["random generator"]),
    ("RNG state of floats", lambda a, m: m["rng"]["state"].update(state=12345.5), ["random generator"]),
    ("RNG of another kind", lambda a, m: m["rng"].update(bit_generator="MT19937"), ["random generator"]),
    ("no corpus digest", set_meta("corpus_sha256", DELETE), ["corpus digest"]),
    ("progress not a dict", set_meta("progress", [1, 2]), ["no training state"]),
]


@pytest.mark.parametrize("edit, needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_edited_checkpoint_is_refused(tmp_path, run, edit, needles):
    out = copy_run(run, tmp_path)
    edit_last(out, edit)
    before = (out / "last.npz").read_bytes(), (out / "metrics.jsonl").read_bytes()
    check_error(resume(out), 1, "last.npz", *needles)
    assert ((out / "last.npz").read_bytes(), (out / "metrics.jsonl").read_bytes()) == before


def test_unedited_copy_resumes_exactly(tmp_path, run, reference):
    """The copies the cases above start from do resume, to the uninterrupted run's losses."""
    out = copy_run(run, tmp_path)
    check_ok(resume(out))
    assert train_losses(out) == train_losses(reference)


def cache_of(out):
    (cache,) = out.glob("tokens-*")
    return cache


@pytest.mark.parametrize("damage", ["truncate", "flip", "old format"])
def test_damaged_token_cache_is_rebuilt_from_the_unchanged_corpus(tmp_path, run, reference, damage):
    out = copy_run(run, tmp_path)
    cache = cache_of(out)
    data = bytearray(cache.read_bytes())
    good = bytes(data)
    if damage == "truncate":
        data = data[:1000]
    elif damage == "flip":
        data[500] ^= 1
    else:  # the ids alone, as charnn wrote them before caches had a trailer
        data = data[: -48]
    cache.write_bytes(bytes(data))
    check_ok(resume(out))
    assert train_losses(out) == train_losses(reference)
    assert cache.read_bytes() == good


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_token_cache_without_its_corpus_is_refused(tmp_path, run, damage):
    out = copy_run(run, tmp_path)
    corpus = tmp_path / "corpus.txt"
    shutil.copy(run[1], corpus)
    edit_last(out, option("corpus", str(corpus)))
    corpus.unlink()
    check_ok(resume(out))  # the corpus is gone; the intact cache still resumes
    cache = cache_of(out)
    data = bytearray(cache.read_bytes())
    if damage == "truncate":
        data = data[:1000]
    else:
        data[500] ^= 1
    cache.write_bytes(bytes(data))
    before = (out / "last.npz").read_bytes()
    # (a larger --max-steps: a resume of a finished run stops before it reads anything)
    check_error(resume(out, steps=16), 1, cache.name, "damaged", "cannot be rebuilt")
    assert (out / "last.npz").read_bytes() == before
    corpus.write_text("other text entirely\n" * 200)  # a corpus by that name, but not the one
    check_error(resume(out, steps=16), 1, "corpus changed")


def test_new_run_with_a_damaged_leftover_cache(tmp_path, run):
    """A cache left in a folder by a run that failed later is checked like any other."""
    _, corpus = run
    out = tmp_path / "run"
    check_ok(train(corpus, out, *ARGS, "--max-steps", 4))
    cache = cache_of(out)
    good = cache.read_bytes()
    for name in ("last.npz", "model.npz", "metrics.jsonl"):
        (out / name).unlink()
    cache.write_bytes(good[:100])
    check_ok(train(corpus, out, *ARGS, "--max-steps", 4))
    assert cache.read_bytes() == good


def test_changed_validation_file_is_refused_on_resume(tmp_path):
    corpus = write_corpus(tmp_path)
    val = write_corpus(tmp_path, "val.txt", lines=20, seed=5)
    out = tmp_path / "run"
    check_ok(train(corpus, out, *ARGS, "--val", val, "--max-steps", 4))
    check_ok(train(corpus, out, "--resume", "--max-steps", 6))  # unchanged: resumes
    val.write_text(val.read_text(encoding="utf-8") + "the cat sat\n", encoding="utf-8")
    check_error(train(corpus, out, "--resume", "--max-steps", 8), 1, "validation file changed", str(val))


def test_resume_whose_corpus_became_a_fifo_is_refused_not_a_hang(tmp_path):
    import os

    from cli_support import time_limit

    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    check_ok(train(corpus, out, *ARGS, "--max-steps", 4))
    corpus.unlink()
    os.mkfifo(corpus)
    with time_limit(30):
        check_error(invoke("train", "--resume", "--out", out, "-q", "--max-steps", 8), 1, "FIFO", str(corpus))


def test_a_folder_with_a_model_but_no_checkpoint_says_how_to_go_on(tmp_path):
    """Older charnn could leave model.npz without last.npz (a disk full at the first save):
    neither command may then answer with the other's advice."""
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    check_ok(train(corpus, out, *ARGS, "--max-steps", 4))
    (out / "last.npz").unlink()
    check_error(train(corpus, out, "--max-steps", 4), 1, "no last.npz", "another --out")
    check_error(train(corpus, out, "--resume"), 1, "no last.npz", "cannot continue exactly", "another --out")

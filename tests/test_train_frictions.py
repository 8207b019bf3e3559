"""charnn train's rough edges a newcomer met: resuming a finished run, a corpus on stdin, the
device announcement under --quiet and before an input error."""

from __future__ import annotations

from pathlib import Path

from charnn.io import checkpoint

from cli_support import TINY, check_error, check_ok, invoke, metrics, train, write_corpus, corpus_text


def snapshot(folder: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    corpus = write_corpus(tmp_path)
    out = tmp_path / "run"
    check_ok(train(corpus, out, "--max-steps", 4, "--eval-every", 2))
    before = snapshot(out)
    r = check_ok(invoke("train", "--resume", "--out", out))
    assert "already finished (4 steps, its limit --max-steps 4)" in r.stderr
    assert "a larger --max-steps" in r.stderr and "saved" not in r.stderr
    assert snapshot(out) == before
    # a larger --max-steps trains on, with no duplicated evaluation line
    check_ok(invoke("train", "--resume", "--out", out, "--max-steps", 6, "-q"))
    steps = [m["step"] for m in metrics(out) if "val_loss" in m]
    assert steps == [2, 4, 6]


def test_resume_of_a_run_that_finished_its_epochs(tmp_path):
    corpus = write_corpus(tmp_path, lines=40)
    out = tmp_path / "run"
    check_ok(train(corpus, out, "--max-epochs", 1))
    r = check_ok(invoke("train", "--resume", "--out", out))
    assert "its limit --max-epochs 1" in r.stderr and "a larger --max-epochs" in r.stderr


def test_corpus_on_stdin_is_kept_in_the_run_folder(tmp_path):
    text = corpus_text(150)
    out = tmp_path / "run"
    r = check_ok(invoke("train", "-", "--out", out, *TINY, "--max-steps", 3, input=text))
    kept = out / "corpus-stdin.txt"
    assert kept.read_text(encoding="utf-8") == text
    last = checkpoint.load(out / "last.npz")
    assert last.meta["train"]["corpus"] == str(kept)
    assert "Error" not in r.stderr
    # --resume reads the kept copy (stdin is not read again)
    check_ok(invoke("train", "--resume", "--out", out, "--max-steps", 5, "-q", input=""))
    assert checkpoint.load(out / "last.npz").meta["progress"]["step"] == 5


def test_corpus_on_stdin_refusals(tmp_path):
    out = tmp_path / "run"
    check_error(invoke("train", "-", "--out", out, *TINY, input=""), 1, "the corpus is empty")
    assert not out.exists()  # nothing left behind, not even the empty copy
    check_ok(invoke("train", "-", "--out", out, *TINY, "--max-steps", 2, input=corpus_text(150)))
    check_error(invoke("train", "-", "--resume", "--out", out, input="x"), 2, "--resume", "leave out -")
    # a folder that holds a run is refused before stdin is copied over its corpus
    kept = (out / "corpus-stdin.txt").read_bytes()
    check_error(invoke("train", "-", "--out", out, *TINY, input="other text\n" * 100), 1, "already holds a run")
    assert (out / "corpus-stdin.txt").read_bytes() == kept


def test_help_mentions_stdin():
    r = check_ok(invoke("train", "--help"))
    assert "- for stdin" in r.output and "corpus-stdin.txt" in r.output


def test_device_is_not_announced_under_quiet_or_before_an_input_error(tmp_path):
    corpus = write_corpus(tmp_path)
    args = ["--hidden", 16, "--layers", 1, "--seq-len", 8, "--batch-size", 4, "--max-steps", 2, "--sample-length", 0]
    r = check_ok(invoke("train", corpus, "--out", tmp_path / "a", *args, "-q"))
    assert "charnn: using" not in r.stderr
    r = check_ok(invoke("train", corpus, "--out", tmp_path / "b", *args))
    assert "charnn: using" in r.stderr
    r = invoke("train", tmp_path / "missing.txt", "--out", tmp_path / "c", *args)
    check_error(r, 1, "missing.txt: no such file")
    assert "charnn: using" not in r.stderr


def test_every_command_of_this_package_has_examples_in_its_help():
    for command in ("train", "sample", "score", "gradcheck"):
        r = check_ok(invoke(command, "--help"))
        examples = r.output.split("Examples:", 1)[1]
        assert examples.count(f"charnn {command}") >= 2, command

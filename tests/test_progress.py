"""Progress on stderr: training's line and header fit the terminal's width; score and gradcheck
report lines, tokens or checks done through the library's progress callbacks, shown only on a
terminal and not under --quiet; the first run says that it compiles."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

import pytest
from rich.console import Console

from charnn.backend import get_backend
from charnn.cli.common import COMPILING, compile_notice
from charnn.cli.progress import WorkProgress
from charnn.cli.train_progress import ConsoleReporter
from charnn.engine import compiles_first
from charnn.engine.settings import Settings
from charnn.gradcheck import check_config, count_checks
from charnn.io.checkpoint import load_model
from charnn.nn import cells
from charnn.nn.model import ModelConfig
from charnn.score import score_document, score_lines
from charnn.train import TrainConfig, Trainer

from cli_support import check_ok, corpus_text, invoke, write_corpus

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
HEADER_INFO = {"chunks_per_epoch": 627, "params": 894803, "vocab_size": 83, "train_tokens": 1003000,
               "val_tokens": 111000, "device": "cpu (float32)", "out": "models/shakespeare-lstm-2x256", "step": 0}


def terminal(width: int) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=width, force_terminal=True, color_system=None, legacy_windows=False), buf


def screen_lines(text: str) -> list[str]:
    """What stays on each line once carriage returns and cursor moves are applied (roughly: the
    last rewrite of every line)."""
    out = []
    for line in ANSI.sub("", text).split("\n"):
        out.append(line.split("\r")[-1] if line.split("\r")[-1] else (line.split("\r") + [""])[-2])
    return [line for line in out if line.strip()]


def train_display(width: int, level: str = "char", time_limit=None, max_epochs=10) -> tuple[list[str], str]:
    console, buf = terminal(width)
    reporter = ConsoleReporter(console=console)
    cfg = SimpleNamespace(level=level, max_steps=None, max_epochs=max_epochs, cell="lstm", layers=2, hidden=256,
                          time_limit=time_limit)
    reporter.start({"config": cfg, **HEADER_INFO})
    reporter.log({"step": 3765, "epoch": 0.6, "train_loss": 1.523, "tokens_per_second": 175100.0, "lr": 3e-3})
    reporter.evaluation({"step": 3765, "val_loss": 1.6012, "best_val_loss": 1.6012}, None)
    reporter.log({"step": 3780, "epoch": 0.61, "train_loss": 1.521, "tokens_per_second": 175100.0, "lr": 3e-3})
    reporter.end()
    return screen_lines(buf.getvalue()), buf.getvalue()


@pytest.mark.parametrize("width", [60, 80, 100, 160])
@pytest.mark.parametrize("level", ["char", "word"])
def test_the_training_line_fits_and_keeps_step_loss_and_eta(width, level):
    lines, _ = train_display(width, level)
    progress = [line for line in lines if line.startswith("step") and "ETA" in line]
    assert progress, lines
    last = progress[-1]
    assert len(last) <= width, (width, last)
    assert "3780" in last and "train 1.521" in last and re.search(r"ETA \d+:\d\d:\d\d|ETA -:--:--", last), last
    if width >= 160:  # everything, the bar included
        assert "━" in last and "tok/s" in last and "epoch 0.61" in last and "val 1.601" in last, last
    if width == 80 and level == "char":  # the bar and the validation loss still fit
        assert "━" in last and "val 1.601" in last, last


def test_a_time_limit_gives_the_eta():
    lines, _ = train_display(100, time_limit=3600, max_epochs=None)  # no step total: only the limit
    last = [line for line in lines if line.startswith("step")][-1]
    assert re.search(r"ETA 0:59:[0-5]\d", last), last


@pytest.mark.parametrize("width", [80, 160])
def test_the_header_wraps_at_word_boundaries(width):
    lines, _ = train_display(width)
    header = []
    for line in lines:
        if line.startswith("step"):
            break
        header.append(line)
    assert header[0].startswith("charnn train: lstm 2x256")
    assert all(len(line) <= width for line in header), header
    words = " ".join(header).split()
    # No word was cut in two: every word of the header reads whole.
    for word in ("parameters,", "1,003,000", "validation", "tokens,", "models/shakespeare-lstm-2x256"):
        assert word in words, (word, header)


def test_the_header_stays_one_line_off_a_terminal():
    buf = io.StringIO()
    reporter = ConsoleReporter(console=Console(file=buf, width=80))
    cfg = SimpleNamespace(level="char", max_steps=None, max_epochs=10, cell="lstm", layers=2, hidden=256,
                          time_limit=None)
    reporter.start({"config": cfg, **HEADER_INFO})
    reporter.end()
    assert len(buf.getvalue().splitlines()) == 1 and "run folder models/shakespeare-lstm-2x256" in buf.getvalue()


def test_log_lines_stay_whole_off_a_terminal():
    """Piped to a file, a log line longer than 80 columns is one line (rich wrapped it, its clock
    alone on the next line), and a sample's long line is not broken either."""
    buf = io.StringIO()
    reporter = ConsoleReporter(console=Console(file=buf, width=80))
    reporter.log({"step": 1840, "epoch": 0.67, "train_loss": 1.566, "tokens_per_second": 100030.4, "lr": 0.00299})
    reporter.evaluation({"val_loss": 1.6, "best_val_loss": 1.6, "step": 2000}, "x" * 120 + "\nshort")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert lines[0].startswith("step 1840  epoch 0.67  train 1.566") and len(lines[0]) > 80
    assert re.search(r"lr 0.00299  \d\d:\d\d:\d\d$", lines[0])  # the clock on the same line
    assert lines[2] == "  sample: " + "x" * 120 and lines[3] == " " * 10 + "short"


# ----- WorkProgress: the bar of score and gradcheck -----

class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_work_progress_shows_counts_rate_and_eta_on_a_terminal():
    console, buf = terminal(80)
    clock = Clock()
    with WorkProgress("scoring", "lines", console=console, delay=0.5, clock=clock) as progress:
        progress(0, 1000)
        progress(100, 1000)
        assert buf.getvalue() == ""  # a job shorter than the delay shows nothing
        clock.t = 1.0
        progress(400, 1000)
        progress.display.refresh()
        shown = ANSI.sub("", buf.getvalue())
    assert "400/1,000 lines" in shown and "ETA" in shown and "scoring" in shown, shown
    for line in screen_lines(shown):
        assert len(line) <= 80


def test_work_progress_fits_a_narrow_terminal():
    console, buf = terminal(30)
    with WorkProgress("lstm 3x5 embed 4 word 6 classes", "checks", console=console, delay=0) as progress:
        progress(5, 108)
        progress.display.refresh()
    lines = screen_lines(buf.getvalue())
    assert lines and all(len(line) <= 30 for line in lines), lines
    assert any("5/108 checks" in line and "ETA" in line for line in lines), lines


@pytest.mark.parametrize("how", ["quiet", "not a terminal"])
def test_work_progress_is_silent(how):
    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=how == "quiet")
    with WorkProgress("scoring", "lines", quiet=how == "quiet", console=console, delay=0) as progress:
        for k in range(5):
            progress(k, 4)
    assert buf.getvalue() == ""


# ----- the library's callbacks -----

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("progress")
    corpus = write_corpus(folder, lines=200)
    out = folder / "run"
    cfg = TrainConfig(corpus=str(corpus), out=str(out), hidden=16, layers=1, seq_len=8, batch_size=4,
                      max_steps=20, eval_every=1000, log_every=1000, sample_length=0, device="cpu", seed=1)
    Trainer(cfg, out).run()
    return out / "model.npz"


def test_score_lines_reports_lines_done(model):
    lm, vocab, _ = load_model(model, get_backend("cpu", "float32"))
    lines = corpus_text(23, seed=3).splitlines()
    lines.insert(5, "   ")  # blank lines are not scored, nor counted
    calls = []
    with_progress = score_lines(lm, vocab, lines, batch_size=5, progress=lambda d, t: calls.append((d, t)))
    assert calls[0] == (0, 23) and calls[-1] == (23, 23)
    assert [d for d, _ in calls] == [0, 5, 10, 15, 20, 23]
    assert [s.logprob for s in with_progress] == [s.logprob for s in score_lines(lm, vocab, lines, batch_size=5)]


@pytest.mark.parametrize("streams", [1, 3])
def test_score_document_reports_tokens_done(model, streams):
    lm, vocab, _ = load_model(model, get_backend("cpu", "float32"))
    text = corpus_text(30, seed=4)
    calls = []
    s = score_document(lm, vocab, text, streams=streams, seq_len=16, progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert calls[0] == (0, s.tokens) and calls[-1] == (s.tokens, s.tokens) and s.tokens == len(text)
    assert done == sorted(done) and len(calls) > 3
    assert s.logprob == score_document(lm, vocab, text, streams=streams, seq_len=16).logprob


@pytest.mark.parametrize("cell", sorted(cells.CELLS))
@pytest.mark.parametrize("layers,embed,level", [(1, 0, "char"), (2, 3, "word")])
def test_count_checks_is_what_check_config_returns(cell, layers, embed, level):
    bounds = (0, 10, 40) if level == "word" else ()
    config = ModelConfig(vocab_size=40 if level == "word" else 7, cell=cell, layers=layers, hidden=3, embed=embed,
                         class_bounds=bounds)
    calls = []
    results = check_config(config, T=3, N=2, max_elements=4, progress=lambda d, t: calls.append((d, t)))
    n = count_checks(config)
    assert len(results) == n
    assert calls == [(k, n) for k in range(n + 1)]


# ----- through the commands (CliRunner: stderr is not a terminal, so no bar) -----

def test_score_quiet_and_no_bar_off_a_terminal(model, tmp_path):
    text = tmp_path / "lines.txt"
    text.write_text(corpus_text(12, seed=5), encoding="utf-8")
    plain = check_ok(invoke("score", model, text, "--device", "cpu", "--format", "jsonl"))
    quiet = check_ok(invoke("score", model, text, "--device", "cpu", "--format", "jsonl", "-q"))
    assert plain.stdout == quiet.stdout and len(plain.stdout.splitlines()) == 13
    assert plain.stderr == "" and quiet.stderr == ""
    doc = check_ok(invoke("score", model, text, "--device", "cpu", "--document", "--quiet"))
    assert "tokens" in doc.stdout and doc.stderr == ""


def test_gradcheck_quiet(tmp_path):
    args = ["gradcheck", "--cell", "gru", "--layers", "1", "--embed", "0", "--level", "char", "--max-elements", "4"]
    plain = check_ok(invoke(*args))
    quiet = check_ok(invoke(*args, "-q"))
    assert "all 7 gradient checks passed" in plain.stdout and plain.stdout == quiet.stdout
    assert plain.stderr == "" and quiet.stderr == ""


# ----- "compiling kernels (first run only)" -----

def test_compiles_first_reads_the_cache_folder(tmp_path):
    on = Settings(threads=1)
    assert compiles_first(on, folder=tmp_path / "missing")
    (tmp_path / "empty" / "engine_abc").mkdir(parents=True)  # numba makes its folders on import
    assert compiles_first(on, folder=tmp_path / "empty")
    (tmp_path / "empty" / "engine_abc" / "kernels.f-1.py311.nbi").write_bytes(b"x")
    assert not compiles_first(on, folder=tmp_path / "empty")
    assert not compiles_first(Settings.reference(), folder=tmp_path / "missing")  # no kernels, no compiling


@pytest.mark.parametrize("device,quiet,tty,cold,said", [
    ("cpu", False, True, True, True),
    ("cpu", False, True, False, False),
    ("cpu", True, True, True, False),
    ("cpu", False, False, True, False),
    ("gpu", False, True, True, False),
])
def test_compile_notice(device, quiet, tty, cold, said):
    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=tty, color_system=None)
    assert compile_notice(device, quiet, console=console, cold=cold) is said
    assert (buf.getvalue() == COMPILING + "\n") if said else buf.getvalue() == ""
    assert COMPILING == "charnn: compiling kernels (first run only)..."

"""charnn/memory.py: the estimates made before allocating, the limit they are checked against,
and the estimate held against the peak resident memory of a real run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from charnn import memory
from charnn.memory import MemoryLimitError, Need, Shape
from charnn.nn.model import ModelConfig

from cli_support import check_error, check_ok, invoke, train, write_corpus


@pytest.mark.parametrize("config", [
    ModelConfig(65),
    ModelConfig(100, cell="gru", layers=3, hidden=7, embed=5),
    ModelConfig(50, cell="rnn", layers=1, hidden=8, embed=8, tie=True, class_bounds=(0, 10, 50)),
    ModelConfig(1000, cell="lstm", layers=4, hidden=12, embed=6, class_bounds=(0, 3, 40, 1000)),
])
def test_the_parameter_count_is_the_shapes_count(config):
    by_shapes = sum(math.prod(s) for s in config.param_shapes().values())
    assert config.n_params() == by_shapes
    assert Shape.of(config).params() == by_shapes


def test_a_billion_layers_are_counted_without_a_loop():
    """n_params multiplies a layer's count by the layers (param_shapes would build a dict of
    three billion entries)."""
    one = ModelConfig(65, layers=2).n_params() - ModelConfig(65, layers=1).n_params()
    assert ModelConfig(65, layers=10**9).n_params() == ModelConfig(65, layers=1).n_params() + one * (10**9 - 1)
    need = memory.training(Shape(65, layers=10**9), 50, 32)
    assert need.bytes > 10**15


@pytest.mark.parametrize("text, expected", [("8G", 8 * 10**9), ("500M", 5 * 10**8), ("500MB", 5 * 10**8),
                                            ("1.5 GiB", int(1.5 * 2**30)), ("2t", 2 * 10**12), ("64KiB", 2**16),
                                            ("1000b", 1000)])
def test_sizes(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text, needle", [("8", "needs a unit"), ("8Q", "not a size"), ("-1G", "not a size"),
                                          ("G", "not a size"), ("0.1b", "at least one byte"), ("", "not a size")])
def test_sizes_refused(text, needle):
    with pytest.raises(ValueError, match=needle):
        memory.parse_size(text)


def test_size_text():
    assert [memory.size_text(n) for n in (29e9, 2.4e9, 512e6, 12e3, 10, 1.2e15)] == [
        "29 GB", "2.4 GB", "512 MB", "12 KB", "10 bytes", "1,200 TB"]


def test_the_check_against_the_memory_available(monkeypatch):
    monkeypatch.setattr(memory, "available", lambda: 21 * 10**9)
    memory.check(Need(20 * 10**9, "the model needs", "parts"), "--hidden 30000")
    with pytest.raises(MemoryLimitError) as e:
        memory.check(Need(29 * 10**9, "the model needs", "parameters and more"), "--hidden 30000")
    assert str(e.value) == ("--hidden 30000: the model needs about 29 GB (parameters and more), more than the 21 GB "
                            "available (--max-memory SIZE sets another limit)")
    monkeypatch.setattr(memory, "available", lambda: None)  # nothing to read: nothing refused
    memory.check(Need(10**18, "the model needs", "parts"), "--hidden 30000")


def test_max_memory_counts_what_the_process_holds(monkeypatch):
    monkeypatch.setattr(memory, "resident", lambda: 300 * 10**6)
    memory.check(Need(600 * 10**6, "x needs", "y"), "--z 1", max_memory=10**9)
    with pytest.raises(MemoryLimitError, match=r"--z 1: x needs about 1.1 GB \(y\), more than --max-memory 1.0 GB$"):
        memory.check(Need(800 * 10**6, "x needs", "y"), "--z 1", max_memory=10**9)
    assert memory.fits(Need(700 * 10**6, "x", "y"), 10**9) and not memory.fits(Need(701 * 10**6, "x", "y"), 10**9)


def test_the_available_memory_is_read_and_honours_an_address_space_limit():
    """MemAvailable here; under `ulimit -v` (RLIMIT_AS) what is left of it, read in a child."""
    room = memory.available()
    assert room is not None and room > 0
    code = ("import resource; from charnn import memory; "
            "resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30)); print(memory.available())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert 0 < int(r.stdout) < 2 * 2**30


def test_culprit_blames_the_option_whose_default_lowers_the_estimate_most():
    def estimate(hidden=3000, layers=4, T=50):
        return hidden ** 2 * layers * T

    options = {"--hidden": ("hidden", 3000, 256), "--layers": ("layers", 4, 2), "--seq-len": ("T", 50, 50)}
    assert memory.culprit(estimate, options, "the model") == "--hidden 3000"
    options["--hidden"] = ("hidden", 256, 256)
    assert memory.culprit(lambda layers=4, **k: 256 ** 2 * layers, options, "the model") == "--layers 4"
    assert memory.culprit(lambda **k: 1, options, "the model") == "the model"


def test_each_cell_keeps_what_the_estimate_says():
    """The registry's kept arrays are those its forward caches beside A and hs (every cell's
    training-step estimate follows them)."""
    import numpy

    from charnn.nn import cells

    H, T, N = 3, 4, 2
    for name, cell in cells.CELLS.items():
        XP = numpy.zeros((cell.gates * H, T, N))
        extra = {k: numpy.zeros(shape(H)) for k, shape in cell.extra.items()}
        c0 = numpy.zeros((H, N)) if cell.has_c else None
        _, _, cache = cell.forward(XP, numpy.zeros((cell.gates * H, H)), numpy.zeros((H, N)), c0, extra, True)
        chunk = [k for k, v in cache.items() if k not in ("A", "hs") and getattr(v, "shape", None) == (T, H, N)]
        assert len(chunk) == cell.kept, (name, chunk)


# ----- the estimate against real runs -----

CHILD = r"""
import json, sys
from charnn import memory
from charnn.cli import cli
seen = []
real = memory.check
def check(need, subject, max_memory=None):
    seen.append((memory.resident(), need.bytes))
    return real(need, subject, max_memory)
memory.check = check
try:
    cli.main(sys.argv[1:], prog_name="charnn", standalone_mode=False)
except SystemExit:
    pass
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the forking process (pytest).
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"checks": seen, "peak": peak}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("cell, extra", [("lstm", ["--batch-size", "64", "--seq-len", "100"]),
                                         ("gru", ["--batch-size", "64", "--seq-len", "100"]),
                                         ("lstm", ["--hidden", "1024", "--batch-size", "4", "--seq-len", "8"])])
def test_the_estimate_is_above_the_peak_of_a_real_run_and_not_far(tmp_path, cell, extra):
    """A training run's peak resident memory (VmHWM) is at most what the check predicted
    (resident memory at the check + the estimate), and the prediction at most 1.6 times it."""
    corpus = write_corpus(tmp_path, lines=3000)
    argv = ["train", str(corpus), "--out", str(tmp_path / "run"), "--cell", cell, "--max-steps", "2", "--eval-every",
            "2", "--val-fraction", "0.01", "--sample-length", "0", "-q", "--device", "cpu", *extra]
    r = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    assert (tmp_path / "run" / "model.npz").exists(), r.stderr
    at, need = result["checks"][-1]
    predicted, peak = at + need, result["peak"]
    assert peak <= predicted <= 1.6 * peak, (predicted / 2**20, peak / 2**20)


# ----- the limit in the commands (in-process: the refusals allocate nothing) -----

def test_a_low_limit_refuses_and_max_memory_raises_the_bar(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path)
    monkeypatch.setattr(memory, "available", lambda: 50 * 10**6)
    msg = check_error(train(corpus, tmp_path / "a", "--max-steps", 2), 1, "the model needs about",
                      "more than the 50 MB available", "--max-memory")
    assert not (tmp_path / "a").exists()
    # No option's default would lower the estimate (the model is tiny): the model is named.
    assert msg.startswith("Error: a lstm 1x16 model:"), msg
    check_ok(train(corpus, tmp_path / "b", "--max-steps", 2, "--max-memory", "100G"))
    assert (tmp_path / "b" / "model.npz").exists()


def test_max_memory_in_a_config_file_and_its_kind(tmp_path):
    corpus = write_corpus(tmp_path)
    config = tmp_path / "c.toml"
    config.write_text('max-memory = "1M"\n')
    check_error(train(corpus, tmp_path / "a", "--max-steps", 2, "--config", config), 1, "more than --max-memory 1.0 MB")
    config.write_text("max-memory = 5\n")
    check_error(train(corpus, tmp_path / "a", "--max-steps", 2, "--config", config), 2,
                'max-memory must be a size in quotes (e.g. "8G"), not an integer')
    check_error(invoke("train", corpus, "--max-memory", "lots"), 2, "--max-memory", "not a size")
    assert not (tmp_path / "a").exists()


def test_the_api_checks_too(tmp_path, monkeypatch):
    from charnn import api

    corpus = write_corpus(tmp_path)
    with pytest.raises(MemoryLimitError, match="--hidden 20000: the model needs about"):
        api.train(corpus, tmp_path / "run", hidden=20000, max_steps=1, max_memory=10**9)
    assert not (tmp_path / "run").exists()


def test_an_allocation_that_fails_anyway_is_one_line(tmp_path, monkeypatch):
    """The safety net under the estimates: a MemoryError from anywhere in a command."""
    import charnn.gradcheck

    def fail(*a, **k):
        raise MemoryError("Unable to allocate 8.0 TiB for an array with shape (1099511627776,)")

    monkeypatch.setattr(charnn.gradcheck, "check_model", fail)
    msg = check_error(invoke("gradcheck", "--cell", "rnn", "--layers", "1", "--embed", "0", "--level", "char", "-q"), 1,
                      "out of memory", "Unable to allocate")
    assert msg.startswith("Error: out of memory")

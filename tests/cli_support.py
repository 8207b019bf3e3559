"""Shared helpers for the CLI tests: tiny corpora, tiny training runs, and reading run folders."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy
from click.testing import CliRunner

from charnn.io import checkpoint
from charnn.cli import cli

WORDS = "the cat sat on a mat and dog ran far away with big red hat".split()
# A tiny model that trains in milliseconds per step; --device cpu so a GPU never changes results.
TINY = ["--hidden", "16", "--layers", "1", "--seq-len", "8", "--batch-size", "4", "--device", "cpu",
        "--sample-length", "0", "-q"]


def corpus_text(lines: int = 150, seed: int = 0) -> str:
    """About 24 bytes a line of random sentences over 15 words (19 distinct characters)."""
    r = random.Random(seed)
    return "".join(" ".join(r.choice(WORDS) for _ in range(r.randint(3, 9))) + "\n" for _ in range(lines))


def write_corpus(folder: Path, name: str = "corpus.txt", lines: int = 150, seed: int = 0) -> Path:
    path = Path(folder) / name
    path.write_text(corpus_text(lines, seed), encoding="utf-8")
    return path


def invoke(*args, input=None):
    """Run the charnn CLI in-process; every argument is turned into a string."""
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=True)


def readme_words() -> str:
    """The project's README with every run of whitespace one space (a phrase reads the same
    however the text wraps it)."""
    return " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").split())


def check_ok(result):
    assert result.exit_code == 0, (result.exit_code, result.output, result.exception)
    return result


def check_error(result, code: int, *needles: str):
    """An error exit with a one-line message holding every needle, and no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    err = result.stderr
    assert "Traceback" not in result.output and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def train(corpus, out, *extra):
    return invoke("train", corpus, "--out", out, *TINY, *extra)


def metrics(out) -> list[dict]:
    with open(Path(out) / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def train_losses(out) -> dict:
    """step -> training loss, from a run logged with --log-every 1."""
    return {m["step"]: m["train_loss"] for m in metrics(out) if "train_loss" in m}


def params_of(path) -> dict:
    return checkpoint.load(path).params


def checkpoint_arrays(ckpt) -> dict:
    """Every array of a loaded checkpoint that training changes, by name: param/..., optim/...
    and state/LAYER/h (and /c)."""
    out = {f"param/{k}": v for k, v in ckpt.params.items()}
    out.update({f"optim/{k}": v for k, v in ckpt.optim.items()})
    for layer, (h, c) in enumerate(ckpt.state or []):
        out[f"state/{layer}/h"] = h
        if c is not None:
            out[f"state/{layer}/c"] = c
    return out


def assert_same_params(a, b):
    pa, pb = params_of(a), params_of(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        numpy.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def charnn_process(*args, **kw) -> subprocess.Popen:
    """charnn as a real process (for signals, kills and pipes)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "charnn", *map(str, args)], env=env,
                            stdout=kw.pop("stdout", subprocess.PIPE), stderr=kw.pop("stderr", subprocess.PIPE), **kw)


def wait_for(condition, proc: subprocess.Popen | None = None, timeout: float = 60.0) -> bool:
    """Poll until condition() holds (True) or the process ends or time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return condition()
        time.sleep(0.02)
    return False


def has_metrics(out) -> bool:
    p = Path(out) / "metrics.jsonl"
    return p.exists() and p.stat().st_size > 0


def temp_files(folder) -> list:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


class Hang(Exception):
    pass


@contextmanager
def time_limit(seconds: float):
    """Fail instead of hanging (SIGALRM interrupts a Python loop)."""
    def on_alarm(signum, frame):
        raise Hang(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextmanager
def memory_cap(extra: int = 1 << 30):
    """Cap this process's address space at what it uses now plus ``extra`` bytes while the block
    runs (the soft RLIMIT_AS, restored after): a loader that regresses into allocating without
    bound fails with a MemoryError instead of taking the machine down."""
    import resource

    with open("/proc/self/status") as f:
        used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = used + extra if hard == resource.RLIM_INFINITY else min(used + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def stop_after(monkeypatch, step: int):
    """Make the next in-process `charnn train` stop at ``step`` as Ctrl-C would (it saves a
    checkpoint and exits 130), and only that one run."""
    import charnn.train as train_mod

    original = train_mod.Trainer._done
    fired = []

    def done(self, started):
        if not fired and self.counters["step"] >= step:
            fired.append(step)
            self.stop_requested = True
        return original(self, started)

    monkeypatch.setattr(train_mod.Trainer, "_done", done)

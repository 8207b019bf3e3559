"""charnn train's saves under faults: every file operation of a save failing in turn, a full
tmpfs, and kill -9 inside a save. Whatever the fault, the run folder either resumes exactly
(--resume) or starts fresh (the plain command), and the finished run equals one never disturbed."""

from __future__ import annotations

import builtins
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy
import pytest

import charnn.training.folder as folder_mod
import charnn.training.trainer as train_mod  # the loop, and the names it calls
from charnn.io import checkpoint

from cli_support import TINY, assert_same_params, check_error, check_ok, invoke, temp_files, train, train_losses, write_corpus

ARGS = ["--max-steps", "10", "--eval-every", "5", "--log-every", "5"]  # saves at steps 5 and 10
TARGETS = ("model.npz", "last.npz", "metrics.jsonl")


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


@pytest.fixture
def reference(tmp_path, corpus):
    out = tmp_path / "ref"
    check_ok(train(corpus, out, *ARGS))
    return out


def assert_same_run(out, ref):
    """The same final checkpoint (parameters and optimizer state), best model and losses."""
    assert_same_params(out / "last.npz", ref / "last.npz")
    oa, ob = checkpoint.load(out / "last.npz").optim, checkpoint.load(ref / "last.npz").optim
    assert oa.keys() == ob.keys() and all(numpy.array_equal(oa[k], ob[k]) for k in oa)
    assert_same_params(out / "model.npz", ref / "model.npz")
    assert train_losses(out) == train_losses(ref)


def finish(corpus, out, ref, *extra):
    """Continue a disturbed run the way its folder allows (exactly one of the two commands
    works) and check that it ends where the undisturbed run ``ref`` did."""
    if (out / "last.npz").exists():
        check_error(train(corpus, out, *ARGS, *extra), 1, "already holds a run", "--resume")
        check_ok(invoke("train", "--resume", "--out", out, "-q"))
    else:
        assert not (out / "model.npz").exists()
        if out.exists():
            check_error(invoke("train", "--resume", "--out", out, "-q"), 1, "nothing to resume")
        check_ok(train(corpus, out, *ARGS, *extra))
    assert temp_files(out) == []
    assert_same_run(out, ref)


# ----- an OSError at every file operation of every save -----

class Faults:
    """Names each file operation of a save into ``folder`` (the open, write, fsync and rename of
    a temporary file of model.npz, last.npz or metrics.jsonl; the open and write of an append to
    metrics.jsonl) and fails the ``fail_at``-th (from 0) with ENOSPC; a failing write first
    writes half its bytes, as a filling disk does."""

    def __init__(self, monkeypatch, folder: Path, fail_at: int | None = None):
        self.folder, self.fail_at, self.points = Path(folder), fail_at, []
        fds = {}  # fd of a temporary file, until fdopen wraps it -> the name of its target
        self.open_files = {}  # fd of a wrapped file -> its name (for fsync)
        real_mkstemp, real_fdopen, real_fsync, real_replace = tempfile.mkstemp, os.fdopen, os.fsync, os.replace

        def mkstemp(suffix=None, prefix=None, dir=None, text=False):
            name = prefix[1:-1] if prefix and dir is not None and Path(dir) == self.folder else None
            if name in TARGETS:
                self.hit(f"open {name}")
            fd, tmp = real_mkstemp(suffix, prefix, dir, text)
            if name in TARGETS:
                fds[fd] = name
            return fd, tmp

        def fdopen(fd, *a, **k):
            f = real_fdopen(fd, *a, **k)
            return Faulty(f, fds.pop(fd), self) if fd in fds else f

        def fsync(fd):
            name = self.open_files.get(fd)
            if name:
                self.hit(f"fsync {name}")
            return real_fsync(fd)

        def replace(src, dst):
            dst = Path(dst)
            if dst.parent == self.folder and dst.name in TARGETS:
                self.hit(f"rename {dst.name}")
            return real_replace(src, dst)

        def open_(file, mode="r", *a, **k):
            if "a" not in mode or Path(file) != self.folder / "metrics.jsonl":
                return builtins.open(file, mode, *a, **k)
            self.hit("open metrics.jsonl (append)")
            return Faulty(builtins.open(file, mode, *a, **k), "metrics.jsonl (append)", self)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
        monkeypatch.setattr(os, "fdopen", fdopen)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(folder_mod, "open", open_, raising=False)

    def hit(self, label: str, before=None):
        self.points.append(label)
        if len(self.points) - 1 == self.fail_at:
            if before is not None:
                before()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class Faulty:
    """A file whose writes and fsyncs are fault points."""

    def __init__(self, f, name: str, faults: Faults):
        self.f, self.name, self.faults = f, name, faults
        faults.open_files[f.fileno()] = name

    def write(self, data):
        self.faults.hit(f"write {self.name}", before=lambda: self.f.write(data[: len(data) // 2]))
        return self.f.write(data)

    def __getattr__(self, attr):
        return getattr(self.f, attr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.faults.open_files.pop(self.f.fileno(), None)
        self.f.close()


def save_points(files: tuple, val: bool) -> list:
    """The fault points of one evaluation: its log line and (with validation data) evaluation
    line, then ``files``."""
    metric = ["open metrics.jsonl (append)", "write metrics.jsonl (append)"]
    return metric * (2 if val else 1) + [f"{op} {name}" for name in files for op in ("open", "write", "fsync", "rename")]


@pytest.mark.parametrize("val", ["0.1", "0"])
def test_every_file_operation_of_every_save_failing(tmp_path, corpus, monkeypatch, val):
    """Run 0 counts the fault points (and checks their order: last.npz before model.npz until
    last.npz exists, then model.npz first); run k fails the k-th. Each failed run exits with one
    line naming the full disk, and its folder then either resumes or starts fresh, to the end of
    the undisturbed run."""
    ref = tmp_path / "ref"
    extra = ["--val-fraction", val]
    with monkeypatch.context() as m:
        faults = Faults(m, ref)
        check_ok(train(corpus, ref, *ARGS, *extra))
    with_val = val != "0"
    assert faults.points == save_points(("last.npz", "model.npz"), with_val) + save_points(("model.npz", "last.npz"), with_val)
    for k, point in enumerate(faults.points):
        out = tmp_path / f"fail{k}"
        with monkeypatch.context() as m:
            injected = Faults(m, out, fail_at=k)
            r = train(corpus, out, *ARGS, *extra)
        assert injected.points[-1] == point, (k, point, injected.points)
        check_error(r, 1, str(out / point.split()[1]), "No space left on device")
        assert temp_files(out) == [], point
        finish(corpus, out, ref, *extra)


def test_a_resumed_run_writes_the_model_file_its_first_save_lost(tmp_path, corpus, monkeypatch):
    """The first save wrote last.npz, then failed at model.npz. The resumed run writes model.npz
    at its next evaluation even when that one is worse than the lost model (3.0 against 2.0),
    and reports the loss of the model that model.npz now holds."""
    out = tmp_path / "run"
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "model.npz":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)

    losses = iter([2.0, 3.0])
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: next(losses))
    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        check_error(train(corpus, out, *ARGS), 1, str(out / "model.npz"), "Input/output error")
    assert (out / "last.npz").exists() and not (out / "model.npz").exists()
    r = check_ok(invoke("train", "--resume", "--out", out, "-q", "--json"))
    res = json.loads(r.stdout)
    assert res["model"] == str(out / "model.npz") and res["best_val_loss"] == 3.0
    assert checkpoint.load(out / "model.npz").meta["progress"]["step"] == 10


# ----- a tmpfs that fills up -----

def mount(disk: Path, options: str):
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(disk)], capture_output=True, text=True)


@pytest.fixture
def tmpfs(tmp_path):
    """A function that mounts a new tmpfs of a given size (e.g. "8k") and returns its folder;
    all are unmounted at the end. Skips where mounting is refused (not root, or a container
    without CAP_SYS_ADMIN)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def new(size: str) -> Path:
        disk = tmp_path / f"disk{len(mounted)}"
        disk.mkdir()
        r = mount(disk, f"size={size}")
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(disk)
        return disk

    try:
        yield new
    finally:
        for disk in mounted:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_filling_tmpfs(tmp_path, corpus, reference, tmpfs):
    """Runs on a tmpfs of 4 KiB, 8 KiB, ... until one has room for the whole run: each stops at
    its own point (the token cache, a metric line, either file of either save) with one line
    naming the full disk; with the disk then enlarged, the folder resumes or starts fresh."""
    failed = 0
    for kib in range(4, 400, 4):
        disk = tmpfs(f"{kib}k")
        out = disk / "run"
        r = train(corpus, out, *ARGS)
        if r.exit_code == 0:
            break
        check_error(r, 1, "No space left on device")
        failed += 1
        grown = subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], capture_output=True, text=True)
        assert grown.returncode == 0, grown.stderr
        finish(corpus, out, reference)
    assert r.exit_code == 0 and failed >= 10
    assert_same_run(out, reference)


# ----- kill -9 inside a save -----

KILLER = r"""
import os, signal, sys, tempfile
mode, n = sys.argv[1], int(sys.argv[2])
seen = []
def kill_at(target):
    seen.append(target)
    if len(seen) == n:
        os.kill(os.getpid(), signal.SIGKILL)
if mode == "rename":  # the temporary file is written and fsynced; die before the rename
    real_replace = os.replace
    def replace(src, dst):
        if str(dst).endswith(".npz"):
            kill_at(dst)
        return real_replace(src, dst)
    os.replace = replace
else:  # die with half the bytes of the temporary file written
    real_mkstemp, real_fdopen, npz = tempfile.mkstemp, os.fdopen, set()
    def mkstemp(*a, **k):
        fd, path = real_mkstemp(*a, **k)
        if ".npz." in os.path.basename(path):
            npz.add(fd)
        return fd, path
    class Half:
        def __init__(self, f): self.f = f
        def write(self, data):
            self.f.write(data[: len(data) // 2]); self.f.flush()
            kill_at(self.f.name)
            return self.f.write(data[len(data) // 2:])
        def __getattr__(self, a): return getattr(self.f, a)
        def __enter__(self): return self
        def __exit__(self, *e): self.f.close()
    def fdopen(fd, *a, **k):
        f = real_fdopen(fd, *a, **k)
        return Half(f) if fd in npz else f
    tempfile.mkstemp, os.fdopen = mkstemp, fdopen
from charnn.cli import cli
cli(sys.argv[3:], prog_name="charnn")
"""


@pytest.mark.parametrize("mode", ["rename", "write"])
@pytest.mark.parametrize("n", [1, 2, 3], ids=["first-save-last", "first-save-model", "second-save-model"])
def test_kill_inside_a_save(tmp_path, corpus, reference, mode, n):
    """kill -9 at the n-th model file write (1: last.npz of the first save, 2: its model.npz,
    3: model.npz of the second), before the rename or halfway through writing the temporary
    file: the folder resumes or starts fresh, and the stale temporary file is removed."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", KILLER, mode, str(n), "train", str(corpus), "--out", str(out),
                           *TINY, *ARGS], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert len(temp_files(out)) == 1  # the kill left its temporary file
    expected_last = n >= 2  # last.npz is written first at the first save
    assert (out / "last.npz").exists() == expected_last
    assert (out / "model.npz").exists() == (n == 3)
    finish(corpus, out, reference)

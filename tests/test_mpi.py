"""Data-parallel training under a real ``mpiexec -n 2`` (dist.py), against one process.

Every launch runs under a timeout and in its own session, and a launch that outlives it has its
whole process group killed and fails the test: no test here can hang. The ranks run with one
thread each (CHARNN_THREADS=1 and the BLAS limits), as they would on a 2-core machine.
Skipped, with the reason, where mpi4py or mpiexec is missing or ``mpiexec -n 2`` cannot start.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest

from charnn.io import checkpoint

from cli_support import checkpoint_arrays, wait_for, write_corpus

pytestmark = pytest.mark.mpi

HERE = Path(__file__).parent
SUPPORT = HERE / "mpi_support.py"
MPIEXEC = shutil.which("mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
ONE_THREAD = {"CHARNN_THREADS": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "NUMBA_NUM_THREADS": "1"}
LAUNCH_VARIABLES = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE")
TIMEOUT = 120  # seconds for one launch (they take 2-5 s here)
# A tiny 2x16 model; the corpus is about 7,000 characters.
TINY = ["--hidden", "16", "--layers", "2", "--seq-len", "10", "--batch-size", "8", "--device", "cpu",
        "--sample-length", "0", "-q", "--log-every", "2"]


@functools.lru_cache(maxsize=1)
def why_not() -> str | None:
    """Why MPI cannot run here (None: it can)."""
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install -e '.[mpi]')"
    if MPIEXEC is None:
        return "no mpiexec on PATH or beside this Python (pip install -e '.[mpi]' brings MPICH's)"
    probe = "from mpi4py import MPI; assert MPI.COMM_WORLD.Get_size() == 2"
    try:
        done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", probe], capture_output=True, text=True,
                              timeout=60, env=_env(), start_new_session=True)
    except subprocess.TimeoutExpired:
        return "mpiexec -n 2 did not start two processes within 60 s"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        return f"mpiexec -n 2 cannot start here: {last}"
    return None


@pytest.fixture(autouse=True, scope="module")
def _needs_mpi():
    # module-scoped, so that it runs before the module-scoped fixtures that launch mpiexec
    # (pytest sets up wider scopes first; a function-scoped skip came too late for them)
    reason = why_not()
    if reason:
        pytest.skip(reason)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def command(args, ranks: int | None) -> list:
    """charnn with ``args`` under mpiexec -n ``ranks`` (through mpi_support.py), or as one
    process (None)."""
    args = [str(a) for a in args]
    if ranks is None:
        return [sys.executable, "-m", "charnn", *args]
    return [MPIEXEC, "-n", str(ranks), sys.executable, str(SUPPORT), *args]


def launch(args, ranks: int | None = 2, **env) -> subprocess.Popen:
    base = ONE_THREAD if ranks else {}
    return subprocess.Popen(command(args, ranks), env=_env(**base, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT):
    """(returncode, stdout, stderr); a process still running after ``timeout`` has its whole
    group killed and fails the test."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"hung: still running after {timeout} s; stderr: {err[-2000:]}")
    return proc.returncode, out, err


def charnn(args, ranks: int | None = 2, timeout: float = TIMEOUT, **env):
    return finish(launch(args, ranks, **env), timeout)


def train(corpus, out, *extra, ranks: int | None = 2, ok: bool = True, **env):
    rc, out_text, err = charnn(["train", corpus, "--out", out, *TINY, *extra], ranks, **env)
    if ok:
        assert rc == 0, err
    return rc, out_text, err


def arrays(path) -> dict:
    """Everything of a checkpoint that training changes, by name."""
    return checkpoint_arrays(checkpoint.load(path))


def meta(path) -> dict:
    return checkpoint.load(path).meta


def assert_close(a: Path, b: Path, atol: float):
    """Two last.npz at the same step with the same RNG state and every array within ``atol``."""
    ma, mb = meta(a), meta(b)
    assert ma["progress"]["step"] == mb["progress"]["step"]
    assert ma["rng"] == mb["rng"]
    xa, xb = arrays(a), arrays(b)
    assert xa.keys() == xb.keys()
    for k in xa:
        assert xa[k].shape == xb[k].shape, k
        numpy.testing.assert_allclose(xa[k], xb[k], rtol=0, atol=atol, err_msg=k)


def error_lines(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith(("Error:", "charnn: rank"))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), lines=300)


# ----- two ranks train what one process trains -----

@pytest.mark.parametrize("dtype, extra, atol", [
    # word level: a row gradient for the embedding; dropout and state resets drawn for the
    # whole batch, so two ranks make the same draws as one process
    ("float64", ["--level", "word", "--embed", "8", "--dropout", "0.2", "--state-reset", "0.3"], 1e-12),
    ("float32", [], 2e-6),
])
def test_two_ranks_train_what_one_process_trains(tmp_path, corpus, dtype, extra, atol):
    args = ["--max-steps", "8", "--eval-every", "4", "--dtype", dtype, *extra]
    train(corpus, tmp_path / "one", *args, ranks=None, CHARNN_THREADS="1")
    train(corpus, tmp_path / "two", *args)
    assert_close(tmp_path / "one" / "last.npz", tmp_path / "two" / "last.npz", atol)
    # equal because both trained alike, not because nothing moved: Adam's moments are nonzero
    moments = checkpoint.load(tmp_path / "two" / "last.npz").optim
    assert all(numpy.abs(v).max() > 0 for v in moments.values())
    assert (tmp_path / "two" / "model.npz").is_file()
    # evaluation is split over the ranks and summed: the validation losses agree
    numpy.testing.assert_allclose(val_losses(tmp_path / "two"), val_losses(tmp_path / "one"),
                                  rtol=1e-12 if dtype == "float64" else 1e-6)
    assert len(val_losses(tmp_path / "two")) == 2


def val_losses(run: Path) -> list:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["val_loss"] for line in lines if json.loads(line)["type"] == "eval"]


def test_the_other_ranks_print_nothing(tmp_path, corpus):
    """Rank 0 reports as one process does; rank 1 says nothing (its lines would double these)."""
    args = ["train", corpus, *TINY[:-3], "--max-steps", "4", "--eval-every", "2", "--log-every", "2"]
    rc, out, err = charnn([*args, "--out", tmp_path / "two" / "run"])
    assert rc == 0, err
    rc1, out1, err1 = charnn([*args, "--out", tmp_path / "one" / "run"], ranks=None)
    assert rc1 == 0, err1

    def shape(text):  # the first words of each line: what kind of line, which step
        return [line.replace(str(tmp_path / "two"), "").replace(str(tmp_path / "one"), "").split()[:3]
                for line in text.splitlines()]

    assert shape(err) == shape(err1), err
    assert len(err.splitlines()) == 6, err  # summary, 2 logs, 2 evaluations, "saved"


# ----- resume -----

@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """Two-rank runs in float64: 'whole' trained 8 steps straight, 'half' 4 of them."""
    root = tmp_path_factory.mktemp("runs")
    # a constant rate: "half" stands for an interrupted run by a smaller --max-steps, which
    # would end a cosine schedule sooner
    args = ["--eval-every", "4", "--dtype", "float64", "--dropout", "0.1", "--state-reset", "0.3",
            "--lr-schedule", "constant"]
    train(corpus, root / "whole", "--max-steps", "8", *args)
    train(corpus, root / "half", "--max-steps", "4", *args)
    return root


def test_resume_with_two_ranks_is_exact(runs, tmp_path, corpus):
    shutil.copytree(runs / "half", tmp_path / "run")
    train(corpus, tmp_path / "run", "--resume", "--max-steps", "8")
    a, b = arrays(runs / "whole" / "last.npz"), arrays(tmp_path / "run" / "last.npz")
    assert a.keys() == b.keys()
    for k in a:
        numpy.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert meta(runs / "whole" / "last.npz")["rng"] == meta(tmp_path / "run" / "last.npz")["rng"]


def test_resume_from_two_ranks_in_one_process(runs, tmp_path, corpus):
    shutil.copytree(runs / "half", tmp_path / "run")
    assert meta(tmp_path / "run" / "last.npz")["progress"]["step"] == 4
    train(corpus, tmp_path / "run", "--resume", "--max-steps", "8", ranks=None)
    assert_close(runs / "whole" / "last.npz", tmp_path / "run" / "last.npz", 1e-12)


# ----- refusals and faults -----

def test_a_batch_two_ranks_cannot_share_is_refused(tmp_path, corpus):
    rc, out, err = train(corpus, tmp_path / "run", "--batch-size", "5", "--max-steps", "2", ok=False)
    assert rc == 1, err
    assert "Traceback" not in err
    assert error_lines(err) == ["Error: --batch-size 5 cannot be shared by 2 processes (each trains an equal share "
                                "of the streams); use a multiple of 2"], err
    assert not (tmp_path / "run").exists()


def test_an_error_on_one_rank_ends_every_rank_with_one_message(tmp_path, corpus):
    started = time.monotonic()
    rc, out, err = train(corpus, tmp_path / "run", "--max-steps", "1000", "--eval-every", "2", ok=False,
                         CHARNN_TEST_FAIL="1:5")
    assert rc != 0
    assert time.monotonic() - started < 60
    assert error_lines(err) == ["charnn: rank 1: RuntimeError: injected fault"], err
    assert "Traceback" not in err
    # the last good checkpoint (step 4) is there and resumes
    assert meta(tmp_path / "run" / "last.npz")["progress"]["step"] == 4
    train(corpus, tmp_path / "run", "--resume", "--max-steps", "6")
    assert meta(tmp_path / "run" / "last.npz")["progress"]["step"] == 6


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_killed_rank_ends_the_run_and_keeps_its_checkpoint(tmp_path, corpus):
    pids = tmp_path / "pids"
    pids.mkdir()
    run = tmp_path / "run"
    proc = launch(["train", corpus, "--out", run, *TINY, "--max-steps", "100000", "--eval-every", "3"],
                  CHARNN_TEST_PIDS=str(pids))
    try:
        assert wait_for(lambda: (run / "last.npz").exists() and (pids / "rank-1").exists(), proc, TIMEOUT), \
            proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
        os.kill(int((pids / "rank-1").read_text()), signal.SIGKILL)
        killed = time.monotonic()
        rc, out, err = finish(proc, 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc != 0
    assert time.monotonic() - killed < 30, "the other rank took more than 30 s to end"
    rank0 = int((pids / "rank-0").read_text())
    # rank 0 ended too: mpiexec can return a moment before the killed job's last process is
    # gone (seen once in five runs here, and in CI), so it gets a few seconds
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and process_exists(rank0):
        time.sleep(0.1)
    assert not process_exists(rank0), "rank 0 still ran 15 s after mpiexec ended"
    # Rank 0 is killed too, and if that lands inside a save its temporary file stays (seen in
    # CI: .last.npz.XXXX.tmp); last.npz itself is whole, and the resume removes the leftover.
    step = meta(run / "last.npz")["progress"]["step"]
    assert step > 0 and step % 3 == 0
    train(corpus, run, "--resume", "--max-steps", str(step + 2))
    assert meta(run / "last.npz")["progress"]["step"] == step + 2
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


def test_ctrl_c_saves_and_exits_130_and_a_second_mpiexec_is_refused(tmp_path, corpus):
    run = tmp_path / "run"
    proc = launch(["train", corpus, "--out", run, *TINY[:-3], "--max-steps", "100000", "--eval-every", "3",
                   "--log-every", "1000"])
    try:
        assert wait_for(lambda: (run / "last.npz").exists(), proc, TIMEOUT), \
            proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
        rc2, out2, err2 = train(corpus, run, "--max-steps", "5", "--resume", ok=False)
        assert rc2 == 1, err2
        assert error_lines(err2) == [f"Error: {run}: another charnn train is using this folder"], err2
        proc.send_signal(signal.SIGINT)  # mpiexec passes it to every rank
        rc, out, err = finish(proc, 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 130, err
    assert err.count("stopping after this step") == 1, err
    assert err.count(f"interrupted: checkpoint saved to {run / 'last.npz'}") == 1, err
    assert not error_lines(err), err
    step = meta(run / "last.npz")["progress"]["step"]
    assert step > 0
    train(corpus, run, "--resume", "--max-steps", str(step + 1))
    assert meta(run / "last.npz")["progress"]["step"] == step + 1


def test_a_schedule_over_time_gives_every_rank_the_same_rate(tmp_path, corpus):
    """Over --time-limit the cosine follows rank 0's clock, carried in the Allreduce: were each
    rank to follow its own, their rates and so their parameters would part, and the check of
    every save (the ranks' parameter digests) would stop the run."""
    train(corpus, tmp_path / "run", "--lr-schedule", "cosine", "--time-limit", "4", "--eval-every", "25", "--log-every", "5",
          "--lr-floor", "0")
    rates = [m["lr"] for m in metrics_of(tmp_path / "run") if m["type"] == "train"]
    assert len(rates) >= 4 and rates[-1] < rates[0]
    assert all(x >= y for x, y in zip(rates, rates[1:]))


def metrics_of(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]

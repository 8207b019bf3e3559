"""dist.py without MPI: the launcher's environment, the one gradient buffer (on the stand-in
device array module: nothing may go through the host), the reducers' interface, and `charnn
train` outside mpiexec never importing mpi4py. The real multi-process runs: test_mpi.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy
import pytest

from charnn import dist
from charnn.backend import to_host
from charnn.nn.model import LanguageModel, ModelConfig
from charnn.nn.optim import RowGrad

from cli_support import write_corpus
from standin import is_device, scalar_reads_forbidden, standin_backend

LAUNCH_VARIABLES = dist.SIZE_VARIABLES + dist.RANK_VARIABLES


def test_the_launchers_environment_names_the_processes():
    assert dist.env_size({}) == 1 and dist.env_rank({}) == 0
    assert dist.env_size({"PMI_SIZE": "4", "PMI_RANK": "3"}) == 4
    assert dist.env_rank({"PMI_SIZE": "4", "PMI_RANK": "3"}) == 3
    assert dist.env_size({"OMPI_COMM_WORLD_SIZE": "2"}) == 2
    assert dist.env_rank({"OMPI_COMM_WORLD_RANK": "1"}) == 1
    assert dist.env_size({"PMI_SIZE": "junk"}) == 1
    world = dist.world_from_env({"PMI_SIZE": "1", "PMI_RANK": "0"})  # one process: no MPI at all
    assert type(world) is dist.World and world.size == 1 and world.part(6) == (0, 6)


def test_a_world_of_one_does_nothing():
    w = dist.World()
    assert w.allgather(3) == [3] and w.gather(3) == [3] and w.bcast(3) == 3 and w.sum(2.5) == 2.5
    w.agree(None)
    with pytest.raises(KeyError):
        w.agree(KeyError("x"))
    r = w.reducer(numpy)
    buf = numpy.arange(4.0)
    assert r.allreduce(buf) is buf and buf.tolist() == [0, 1, 2, 3] and r.calls == 1 and r.bytes == 32


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(extra)
    return env


def _train_in(tmp_path, code: str, **env):
    corpus = write_corpus(tmp_path)
    script = ("import sys\n" + code + "\nfrom charnn.cli import cli\n"
              "try:\n"
              f"    cli(['train', {str(corpus)!r}, '--out', {str(tmp_path / 'run')!r}, '--hidden', '8', '--layers', '1',"
              " '--batch-size', '4', '--seq-len', '8', '--max-steps', '2', '--sample-length', '0', '-q'],"
              " prog_name='charnn')\n"
              "finally:\n"
              "    sys.stderr.write('mpi4py imported: %s\\n' % any(m is not None for k, m in sys.modules.items() if k.startswith('mpi4py')))\n")
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=_env(**env))


def test_train_without_a_launcher_never_imports_mpi4py(tmp_path):
    done = _train_in(tmp_path, "")
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "mpi4py imported: False", done.stderr
    assert (tmp_path / "run" / "last.npz").is_file()


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_launcher_of_two_without_mpi4py_is_one_clear_line(tmp_path, rank):
    done = _train_in(tmp_path, "sys.modules['mpi4py'] = None  # as if not installed", PMI_SIZE="2", PMI_RANK=rank)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == "mpi4py imported: False"
    if rank == "0":
        assert lines[:-1] == ["Error: started by mpiexec as 2 processes, but mpi4py is not installed: "
                              "pip install 'charnn[mpi]' (or see the README's 'Training on several machines')"]
    else:
        assert lines[:-1] == []  # rank 0 says it
    assert not (tmp_path / "run").exists()


# ----- one buffer for every gradient, on a device array module -----

class TwoRanksInOneProcess:
    """Two reducers whose buffers are summed across two threads (the ranks), on the device
    arrays' own module: what MPI or NCCL does, without them."""

    def __init__(self):
        self.barrier = threading.Barrier(2)
        self.bufs = [None, None]

    def reducer(self, rank):
        pair = self

        class Half(dist.Reducer):
            size = 2

            def _allreduce(self, buf):
                pair.bufs[rank] = buf
                pair.barrier.wait()
                total = pair.bufs[0] + pair.bufs[1]
                pair.barrier.wait()
                buf[...] = total

        return Half()


@pytest.mark.parametrize("embed", [0, 4])
def test_the_buffer_sums_two_halves_into_the_whole_batch_on_the_device(embed):
    backend = standin_backend(numpy.float64)
    cfg = ModelConfig(vocab_size=11, cell="lstm", layers=2, hidden=6, embed=embed)
    rng = numpy.random.default_rng(0)
    ids, targets = rng.integers(0, 11, (5, 4)), rng.integers(0, 11, (5, 4))
    ids[:, :2] = rng.integers(0, 3, (5, 2))  # the halves use different embedding rows
    ids[:, 2:] = rng.integers(5, 11, (5, 2))
    whole_model = LanguageModel.create(cfg, 0, backend)
    loss, whole, _ = whole_model.loss_and_grads(ids, targets, sparse=True)
    pair, results = TwoRanksInOneProcess(), [None, None]

    def rank(r):
        model = LanguageModel.create(cfg, 0, backend)
        a, b = 2 * r, 2 * r + 2
        l, g, _ = model.loss_and_grads(ids[:, a:b], targets[:, a:b], sparse=True)
        sync = dist.StepSync(pair.reducer(r), model.params, n_flags=2)
        with scalar_reads_forbidden():  # the flags come back through to_host, nothing else
            results[r] = sync.reduce(g, l, (float(r == 1), 0.0))

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for grads, total, flags in results:
        assert flags == [1.0, 0.0]  # rank 1 asked to stop: both know
        assert is_device(total)
        numpy.testing.assert_allclose(to_host(total) / 2, to_host(loss), rtol=1e-12)
        assert grads.keys() == whole.keys()
        for name, g in grads.items():
            w = whole[name]
            if isinstance(w, RowGrad):  # the same rows as one process, summed
                assert isinstance(g, RowGrad) and is_device(g.values) and is_device(g.rows)
                numpy.testing.assert_array_equal(to_host(g.rows), to_host(w.rows))
                g, w = g.values, w.values
            assert is_device(g), name
            numpy.testing.assert_allclose(to_host(g) / 2, to_host(w), rtol=1e-10, atol=1e-14, err_msg=name)


# ----- NCCL, through its interface (no GPU here) -----

class FakeNccl:
    """The attributes of cupy.cuda.nccl that NcclReducer uses, and a communicator that records
    its calls."""
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0

    def __init__(self):
        self.calls = []

    def allReduce(self, send, recv, count, dtype, op, stream):
        self.calls.append((send, recv, count, dtype, op, stream))


class DeviceBuffer:
    """What NcclReducer reads of a CuPy array: its device pointer, size, dtype and bytes."""

    def __init__(self, n, dtype):
        self.size, self.dtype = n, numpy.dtype(dtype)
        self.nbytes = n * self.dtype.itemsize
        self.data = type("Memory", (), {"ptr": 0x7F00_0000_1000})()


def test_the_nccl_reducer_sums_in_place_on_the_device_with_the_buffers_type():
    nccl = FakeNccl()
    r = dist.NcclReducer(nccl, nccl, size=2, stream=5)
    r.allreduce(DeviceBuffer(10, numpy.float32))
    r.allreduce(DeviceBuffer(3, numpy.float64))
    assert nccl.calls == [(0x7F00_0000_1000, 0x7F00_0000_1000, 10, 7, 0, 5),
                          (0x7F00_0000_1000, 0x7F00_0000_1000, 3, 8, 0, 5)]
    assert r.calls == 2 and r.bytes == 40 + 24
    with pytest.raises(dist.DistError, match="float16"):
        r.allreduce(DeviceBuffer(3, numpy.float16))


def test_nccl_without_cupy_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dist, "nccl_module", lambda: None)

    class World:
        size, rank, root = 2, 0, True

    with pytest.raises(dist.DistError, match="needs CuPy with NCCL"):
        dist.NcclReducer.create(World())


class TwoRanksSeen(dist.World):
    """Rank 0 of two, whose peer reports ``peer_digest`` for its parameters."""

    size = 2

    def __init__(self, peer_digest=None):
        self.peer_digest = peer_digest

    def allgather(self, obj) -> list:
        return [obj, obj if self.peer_digest is None else self.peer_digest]


def test_a_save_is_refused_when_the_ranks_hold_different_parameters(tmp_path):
    """Before each save every rank's parameters are compared by digest: equal ones pass, a rank
    whose parameters differ (its updates differed) stops the run before anything is written."""
    import charnn.train as train_mod
    from charnn.training import ranks

    params = LanguageModel.create(ModelConfig(vocab_size=7, hidden=4, layers=1), seed=0).params
    ranks.check_same_params(TwoRanksSeen(), params, 12)  # the same digest on both
    with pytest.raises(train_mod.TrainError, match=r"at step 12 rank\(s\) 1 hold other parameters than rank 0"):
        ranks.check_same_params(TwoRanksSeen("0" * 64), params, 12)

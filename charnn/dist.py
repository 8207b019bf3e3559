"""Data-parallel training over K processes (``mpiexec -n K charnn train ...``).

Each of the K ranks owns N/K of the N contiguous streams of the global batch, computes the loss
and gradients of its part, and every step sums them with one ``Allreduce`` over one contiguous
buffer (:class:`GradientBuffer`), so every rank applies the same update to the same parameters:

    buffer = [ g(p1) | g(p2) | ... | rows(embed) | loss | stop | time-up | clock ]   (one dtype)

    g(p)        a parameter's gradient, flat; a row gradient (optim.RowGrad, the embedding
                table) scattered into its full table
    rows(p)     1 where a row gradient has a row (summed: where any rank has one), so the
                summed table becomes a row gradient over the same rows a single process has
    loss        the rank's mean loss (the sum over ranks / K is the global mean)
    stop        1 where a rank was asked to stop (SIGINT): every rank sees the sum, so every
                rank stops after the same step
    time-up     1 where a rank's --time-limit ran out (clocks differ between ranks)
    clock       rank 0's seconds of training (the others add 0), for a learning-rate
                schedule over --time-limit that gives every rank the same rate

Each rank's gradient is the mean over its own T x N/K tokens, so the sum over ranks is K times
the single-process gradient: the trainer folds 1/K into the clipping scale.

Reducers sum such a buffer across the ranks: :class:`LocalReducer` (one process: nothing to do),
:class:`MpiReducer` (mpi4py, host arrays), :class:`NcclReducer` (CuPy arrays on one GPU per
rank, reduced on the devices through NCCL; written to the same interface, not run: no GPU here).

:class:`World` is the group of ranks the trainer talks to; ``World()`` is one process and does
nothing. :func:`world_from_env` reads the launcher's environment (PMI_SIZE from MPICH's hydra
and Slurm, OMPI_COMM_WORLD_SIZE from Open MPI) and imports mpi4py only when it names more than
one process, so ``charnn train`` without ``mpiexec`` never imports it.

Errors: what every rank decides alike (a bad option, a diverged loss, a failed save on rank 0)
is agreed on (:meth:`World.agree`), and then every rank leaves together: rank 0 says why, the
others stay quiet (:class:`PeerStopped`). Anything else, on any rank, ends the job at once
(:meth:`World.abort`: one line ``charnn: rank R: ...`` and MPI_Abort), so no rank waits forever
in a collective another rank will never reach.
"""

from __future__ import annotations

import os
import sys
import time

import numpy

from .backend import array_module, nccl_module, to_host
from .nn.optim import Grads, RowGrad

# Variables a launcher sets in every process it starts: the number of processes, and the rank.
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
INSTALL = "pip install 'charnn[mpi]'"
ABORT_GRACE = 1.0  # seconds between a rank's last line and MPI_Abort (World.abort)


class DistError(RuntimeError):
    """Data-parallel training cannot start (mpi4py missing, a batch the ranks cannot share)."""


class PeerStopped(Exception):
    """Another rank (or this one, on a rank other than 0) hit an error every rank agreed on:
    leave quietly with ``code``; rank 0 says why."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _launcher_int(names, fallback: int, env=None) -> int:
    """The first of ``names`` the launcher's environment sets, as an integer (``fallback`` when
    none is set or the value is not a number)."""
    env = os.environ if env is None else env
    raw = next((env[name] for name in names if env.get(name) is not None), None)
    try:
        return fallback if raw is None else int(raw)
    except ValueError:
        return fallback


def env_size(env=None) -> int:
    """The number of processes the launcher's environment names (1 without a launcher)."""
    return max(1, _launcher_int(SIZE_VARIABLES, 1, env))


def env_rank(env=None) -> int:
    return _launcher_int(RANK_VARIABLES, 0, env)


def world_from_env(env=None) -> "World":
    """The ranks this process trains with: one (no launcher, or a launcher of one process), or
    all the launcher started, through mpi4py (imported here and nowhere else).

    Raises:
        DistError: the environment names several processes but mpi4py is not installed.
    """
    if env_size(env) <= 1:
        return World()
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistError(f"started by mpiexec as {env_size(env)} processes, but mpi4py is not installed: "
                        f"{INSTALL} (or see the README's 'Training on several machines')") from None
    return MpiWorld(MPI)


class World:
    """One process: every collective returns its input; nothing is ever waited for."""

    rank = 0
    size = 1

    @property
    def root(self) -> bool:
        return self.rank == 0

    def part(self, N: int) -> tuple:
        """The streams [a, b) of N this rank owns (N must be a multiple of the size)."""
        n = N // self.size
        return self.rank * n, (self.rank + 1) * n

    def reducer(self, xp) -> "Reducer":
        return LocalReducer()

    def allgather(self, obj) -> list:
        return [obj]

    def gather(self, obj) -> list | None:
        return [obj]

    def bcast(self, obj):
        return obj

    def sum(self, value: float) -> float:
        return value

    def agree(self, error: BaseException | None):
        """Raise on every rank if any rank had an error: the error itself on rank 0 when it
        was rank 0's (so the command reports it as it always does), a TrainError-like
        ``RankError`` naming the rank on rank 0 when it was another's, PeerStopped elsewhere."""
        if error is not None:
            raise error

    def abort(self, error: BaseException):
        raise error


class RankError(RuntimeError):
    """An error another rank had, said by rank 0 (the message names the rank)."""


def describe(error: BaseException) -> str:
    """One line: the message of charnn's and click's own errors (written for users), the type
    and message of anything else (a bug, MemoryError, KeyboardInterrupt)."""
    text = " ".join(str(error).split())
    if type(error).__module__.split(".")[0] in ("charnn", "click") and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def exit_code(error: BaseException) -> int:
    code = getattr(error, "exit_code", None)  # click exceptions: 1, usage errors 2
    if isinstance(code, int):
        return code
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else 1
    return 0 if type(error).__name__ == "Finished" else 1


class MpiWorld(World):
    """All the processes of an MPI job (mpi4py's COMM_WORLD)."""

    def __init__(self, MPI):
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()

    def reducer(self, xp) -> "Reducer":
        if xp is numpy:
            return MpiReducer(self.comm, self.MPI)
        return NcclReducer.create(self)

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj)

    def gather(self, obj) -> list | None:
        return self.comm.gather(obj, root=0)

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def sum(self, value: float) -> float:
        return self.comm.allreduce(float(value), op=self.MPI.SUM)

    def agree(self, error: BaseException | None):
        said = self.allgather(None if error is None else (describe(error), exit_code(error)))
        failed = [(r, s) for r, s in enumerate(said) if s is not None]
        if not failed:
            return
        rank, (text, code) = failed[0]
        if self.rank != 0:
            raise PeerStopped(code)
        if rank == 0:
            error.agreed = True
            raise error
        e = RankError(f"rank {rank}: {text}")
        e.agreed = True
        raise e

    def abort(self, error: BaseException):
        """Say why on stderr, as this rank, and end every rank of the job (MPI_Abort). Never
        returns: MPICH's MPI_Abort can return before the launcher's kill arrives (and Python
        would then print the traceback of the error being handled), so this process then
        leaves at once without running anything more. Between the line and the abort it waits a
        second: the launcher forwards a rank's stderr through a pipe and stops reading once the
        abort reaches it, and on a busy machine the line was lost so (a CI run under load)."""
        try:
            sys.stderr.write(f"charnn: rank {self.rank}: {describe(error)}\n")
            sys.stderr.flush()
            time.sleep(ABORT_GRACE)
        finally:
            try:
                self.comm.Abort(1)
            finally:
                os._exit(1)


# ----- summing a buffer across ranks -----

class Reducer:
    """Sums a contiguous 1-d buffer across the ranks, in place; counts the calls' time and bytes."""

    size = 1

    def __init__(self):
        self.seconds = 0.0
        self.bytes = 0
        self.calls = 0

    def allreduce(self, buf):
        t = time.perf_counter()
        self._allreduce(buf)
        self.seconds += time.perf_counter() - t
        self.bytes += buf.nbytes
        self.calls += 1
        return buf

    def _allreduce(self, buf):
        raise NotImplementedError


class LocalReducer(Reducer):
    """One process: the sum over one rank is the buffer."""

    def _allreduce(self, buf):
        pass


class MpiReducer(Reducer):
    """Host buffers through MPI_Allreduce (in place)."""

    def __init__(self, comm, MPI):
        super().__init__()
        self.comm, self.MPI, self.size = comm, MPI, comm.Get_size()

    def _allreduce(self, buf):
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)


class NcclReducer(Reducer):
    """CuPy buffers summed on the GPUs through NCCL (cupy.cuda.nccl), never through the host.

    One GPU per rank: rank r uses the device r modulo the GPUs its node has. Rank 0 makes the
    NCCL id and MPI broadcasts it. UNTESTED on real GPUs (none where charnn is developed): the
    tests run it with a stand-in communicator."""

    DTYPES = {"float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64"}

    def __init__(self, comm, nccl, size: int, stream=None):
        super().__init__()
        self.comm, self.nccl, self.size, self.stream = comm, nccl, size, stream

    @classmethod
    def create(cls, world: MpiWorld) -> "NcclReducer":
        nccl = nccl_module()
        if nccl is None:
            raise DistError("GPU training with several processes needs CuPy with NCCL (cupy.cuda.nccl)")
        uid = world.bcast(nccl.get_unique_id() if world.root else None)
        return cls(nccl.NcclCommunicator(world.size, uid, world.rank), nccl, world.size)

    def _allreduce(self, buf):
        kind = self.DTYPES.get(numpy.dtype(buf.dtype).name)
        if kind is None:
            raise DistError(f"NCCL cannot sum {buf.dtype} buffers")
        stream = 0 if self.stream is None else self.stream
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, getattr(self.nccl, kind), self.nccl.NCCL_SUM, stream)


# ----- one buffer for all gradients -----

class GradientBuffer:
    """Packs a step's gradients and a few scalars into one contiguous buffer of the model's
    array module and dtype, and reads the summed buffer back as gradients (views of it, no
    copies; a row gradient gathered from its rows).

    The layout is fixed by the first gradients packed (names in the parameters' order, which
    of them are row gradients): the same model on every rank gives the same layout.

    Args:
        params: the model's parameters (name -> array), for order, shapes and dtype.
        n_flags: the number of host scalars after the loss.
    """

    def __init__(self, params: dict, n_flags: int):
        self.params = params
        self.n_flags = n_flags
        first = next(iter(params.values()))
        self.xp, self.dtype = array_module(first), first.dtype
        self.layout = None  # [(name, offset, size, shape, rows_offset or None)]
        self.buf = None

    def _plan(self, grads: dict):
        layout, off = [], 0
        for name, p in self.params.items():
            if name not in grads:
                continue
            size = int(numpy.prod(p.shape))
            layout.append([name, off, size, tuple(p.shape), None])
            off += size
        for entry in layout:  # row-presence counts after all gradients
            if isinstance(grads[entry[0]], RowGrad):
                entry[4] = off
                off += entry[3][0]
        self.layout = [tuple(e) for e in layout]
        self.extras_at = off
        self.buf = self.xp.zeros(off + 1 + self.n_flags, dtype=self.dtype)

    def pack(self, grads: dict, loss, flags=()):
        """Write ``grads``, ``loss`` (a 0-d array) and the host ``flags`` into the buffer;
        returns it."""
        if self.layout is None:
            self._plan(grads)
        buf = self.buf
        for name, off, size, shape, rows_at in self.layout:
            g = grads[name]
            dense = buf[off:off + size]
            if rows_at is None:
                dense[...] = g.reshape(-1)
                continue
            table = dense.reshape(shape)
            table[...] = 0
            table[g.rows] = g.values
            seen = buf[rows_at:rows_at + shape[0]]
            seen[...] = 0
            seen[g.rows] = 1
        at = self.extras_at
        buf[at:at + 1] = loss.reshape(1)
        for k, v in enumerate(flags):
            buf[at + 1 + k] = v
        return buf

    def unpack(self):
        """(grads, loss, flags) from the summed buffer: grads a :class:`Grads` of views (row
        gradients over the rows any rank had), loss a 0-d array, flags host floats."""
        xp, buf = self.xp, self.buf
        grads = Grads()
        for name, off, size, shape, rows_at in self.layout:
            dense = buf[off:off + size].reshape(shape)
            if rows_at is None:
                grads[name] = dense
            else:
                rows = xp.nonzero(buf[rows_at:rows_at + shape[0]])[0]
                grads[name] = RowGrad(rows, dense[rows], shape)
        at = self.extras_at
        flags = to_host(buf[at + 1:at + 1 + self.n_flags]) if self.n_flags else ()
        return grads, buf[at:at + 1].reshape(()), [float(v) for v in flags]


class StepSync:
    """The data-parallel part of a training step: pack, sum across the ranks, unpack.

    ``reduce(grads, loss, flags)`` returns (grads, loss, flags) where the gradients and the loss
    are sums over the ranks (K times the global means: see the module docstring) and each flag
    the number of ranks that raised it."""

    def __init__(self, reducer: Reducer, params: dict, n_flags: int):
        self.reducer = reducer
        self.packer = GradientBuffer(params, n_flags)

    def reduce(self, grads: dict, loss, flags=()):
        buf = self.packer.pack(grads, loss, flags)
        self.reducer.allreduce(buf)
        return self.packer.unpack()

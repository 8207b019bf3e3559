"""The CPU engine's operations: nn/ops.py's reference, with the pieces this engine speeds up.

:class:`CpuOps` subclasses the reference :class:`~charnn.nn.ops.Ops` and overrides the
operations named in ``accelerated``; each override runs its compiled or threaded twin where
its settings and the arrays allow (float32 NumPy arrays and the compiled kernels on, for the
numba passes), and the reference otherwise. Which path runs is decided here and nowhere else,
from one :class:`~charnn.engine.settings.Settings`.

An instance may carry what a parallel strategy (parallel.py) asks of the maths it runs:
``two`` (a layer's loop and products on two cores, the row split), ``defer`` (the weight
gradients' products handed to a shared tail, the batch split) and ``head_threads`` (the
class-factored head's passes on two threads). The strategies derive such instances with
:meth:`CpuOps.derive`; the model passes them through without knowing what they carry.

A whole training step or scoring pass runs on a path (plan.Path: the split over threads, the
packed products): the rules' (parallel.rule_path), or, where the settings leave a knob free
and a planner is given (the engine's default, from CHARNN_* variables), the fastest candidate
measured the first time the work's shape is met (:meth:`CpuOps.planned`, plan.py).
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy

from ..backend import register_engine
from ..nn import cells
from ..nn.functional import class_xent_backward, class_xent_forward
from ..nn.ops import Ops
from ..nn.optim import RowGrad
from . import heads, kernels, layers, loops, parallel, plan
from .plan import Path
from .settings import Settings, default_settings
from .threads import blas_threads, in_row_blocks, in_worker, loop_threads, run_in_two, share_in_two


# Adam's compiled pass runs in two threads only where each would update this many values or
# more: handing half of it to the worker thread costs more than it saves below (2026-12-05,
# Zen 4, one float32 array: 131,072 values 47 us on one thread and 120 on two, 262,144 92
# against 155, 524,288 194 against 204, 1,048,576 353 against 318; config (a)'s 107,713
# parameters had taken two threads from a half of 65,536).
ADAM_HALF = 1 << 19

PLANNED_KEPT = 64  # pieces of work whose planned operations an instance keeps at most


def _rows_in_two(fn, rows: int, two: bool):
    """fn(slice) over rows [0, rows): two halves in two threads with ``two``, else at once."""
    if not two:
        fn(slice(0, rows))
        return
    run_in_two(fn, slice(0, rows // 2), slice(rows // 2, rows))


@dataclass(frozen=True)
class CpuOps(Ops):
    settings: Settings = Settings()
    two: bool = False
    defer: Callable | None = None
    head_threads: int = 1
    path: Path | None = None  # the path of the work at hand (None: the rules decide)
    planner: object = field(default=None, compare=False)  # plan.Planner, where the settings plan
    # planned()'s memory, so that work already planned costs a step one dict lookup instead of
    # its key's string and a derived CpuOps: (kind, id(config), N, T, xp, dtype) -> (config, the
    # work's key, its path, the operations for it). Each instance has its own (not copied by
    # derive: its settings are its own).
    _planned: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    name = "cpu"
    accelerated = frozenset({
        "layer_forward", "layer_backward", "input_projection", "input_grads", "scatter_add_rows",
        "softmax_xent_forward", "softmax_xent_backward", "class_xent_forward", "class_xent_backward",
        "class_xent_forward_backward", "sum_squares", "adam_update", "draw_scaled", "draw_scaled_rows", "stepper",
        "loss_and_grads", "nll", "small_chunk_loop", "dynamic_step", "segment_ops"})

    def derive(self, **changes) -> "CpuOps":
        if all(getattr(self, name) is value for name, value in changes.items()):
            return self  # (the batch split's halves without a shared tail ask this every step)
        return replace(self, **changes)

    def with_path(self, path: Path) -> "CpuOps":
        """These operations running ``path`` (its packed products in the settings the layers
        read)."""
        return replace(self, path=path, settings=replace(self.settings, packed=path.packed))

    def planned(self, kind: str, model, T: int, N: int, run) -> "CpuOps":
        """The operations for a piece of work of ``kind`` ("train", "score") on T x N tokens:
        with the planner's path where there is a choice to make (plan.py), measured on first
        meeting by calling run(ops, t), which does the work's first t time steps with ``ops``;
        else these (the rules decide). Work met before costs one lookup: the operations for
        its path are kept per shape while the planner's decision for its key stands."""
        if self.path is not None or self.planner is None or not self.settings.plan:
            return self
        config = model.config
        memo = (kind, id(config), N, T, model.xp, model.dtype)
        known = self._planned.get(memo)
        # Still the planner's decision (plan_report's --measure forgets a key and decides again)?
        if known is not None and known[0] is config and self.planner.decided.get(known[1], False) is known[2]:
            return known[3]
        key = plan.work_key(kind, config, N, T, self.settings, model.xp, model.dtype)
        path = self.planner.decided.get(key, False)  # what this process ran before, or False
        if path is False:
            path = None
            if self.unplanned(kind, model, T, N) is None:
                candidates = parallel.candidates(kind, self, model, N)
                path = self.planner.choose(key, candidates, lambda p, t: run(self.with_path(p), t), T)
            self.planner.decided[key] = path
        ops = self if path is None else self.with_path(path)
        if len(self._planned) >= PLANNED_KEPT:  # (sequence lengths that vary: the last chunk of each text)
            self._planned.clear()
        self._planned[memo] = (config, key, path, ops)  # (keeping config keeps its id unique)
        return ops

    def unplanned(self, kind: str, model, T: int, N: int) -> str | None:
        """Why the rules choose the path of this work instead of the planner, or None."""
        if self.planner is None or not self.settings.plan:
            return "the settings leave nothing to measure (CHARNN_PLAN=0, or the knobs set)"
        if model.xp is not numpy or numpy.dtype(model.dtype) != numpy.float32:
            return "the planner measures float32 NumPy work only"
        if in_worker():
            return "asked from charnn's worker thread"
        if work_flops(model.config, T, N) < self.planner.min_flops:
            return f"too small to be worth measuring (under {self.planner.min_flops:.0e} FLOPs)"
        if len(parallel.candidates(kind, self, model, N)) == 1:
            return "one candidate"
        return None

    def fused(self, *arrays) -> bool:
        """Whether the compiled kernels take these arrays: float32 NumPy, kernels on."""
        return (self.settings.kernels and kernels.available
                and all(type(a) is numpy.ndarray and a.dtype == numpy.float32 for a in arrays))

    def compiled_loop(self, cell: str, a) -> bool:
        """Whether a layer's whole time loop runs as one compiled call with the packed products
        and the row split available (loops.py: the cells of layers.LOOPED, the LSTM)."""
        return cell in layers.LOOPED and self.blas_loops(a)

    def blas_loops(self, a) -> bool:
        """Whether compiled time loops that call the BLAS may run (layers.py says for which
        cells: LOOPED, and SGEMM_LOOPED from two streams)."""
        return self.settings.rowsplit and self.fused(a) and loops.compiled_loops()

    # ----- recurrent layers -----
    def _fusable(self, cell, a, activation):
        # The kernels compute tanh where a cell takes an activation (the RNN's relu is not fused).
        return (cell in layers.FUSED and (not cells.get(cell).takes_activation or activation == "tanh")
                and self.fused(a))

    def layer_forward(self, cell, XP, Wh, h0, c0, extra, store, activation="tanh"):
        if self.two:  # the row split (parallel.py chose it: a float32 LSTM, loops available)
            return loops.lstm_forward(XP, Wh, h0, c0, store, self.settings.packed)
        if self._fusable(cell, XP, activation):
            return layers.layer_forward(cell, XP, Wh, h0, c0, extra.get("bhn"), store, self.blas_loops(XP),
                                        self.settings.packed)
        with loop_threads(2.0 * Wh.size * XP.shape[2]):
            return super().layer_forward(cell, XP, Wh, h0, c0, extra, store, activation)

    def layer_backward(self, cell, dhs, cache, Wh):
        if cache.get("rows"):
            return loops.lstm_backward(dhs, cache, Wh, self.settings.packed)
        if self._fusable(cell, dhs, cache.get("activation", "tanh")):
            return layers.layer_backward(cell, dhs, cache, Wh, self.defer, self.blas_loops(dhs), self.settings.packed)
        with loop_threads(2.0 * Wh.size * dhs.shape[2]):
            return super().layer_backward(cell, dhs, cache, Wh)

    # ----- a layer's input -----
    def input_projection(self, Wx, b, X, ids):
        # With ``two``, halves of the rows in two threads (the caller holds the BLAS at one).
        if X is None and self.fused(Wx):
            XP = numpy.empty((Wx.shape[0], ids.shape[0]), dtype=Wx.dtype)
            _rows_in_two(lambda r: kernels.onehot_projection(Wx[r], b[r], ids, XP[r]), Wx.shape[0], self.two)
            return XP
        if X is not None and self.two:
            XP = numpy.empty((Wx.shape[0], X.shape[1]), dtype=Wx.dtype)
            _rows_in_two(lambda r: numpy.matmul(Wx[r], X, out=XP[r]), Wx.shape[0], True)
            XP += b[:, None]
            return XP
        return super().input_projection(Wx, b, X, ids)

    def input_grads(self, Wx, dXP, X, ids):
        # ``two``: in two threads by rows; ``defer``: the weight gradient's product, or the
        # one-hot scatter, as deferred work.
        GH = Wx.shape[0]
        dtype = dXP.dtype
        if X is not None and self.two:
            db = numpy.empty(GH, dtype=dtype)
            dWx = numpy.empty(Wx.shape, dtype=dtype)
            dX = numpy.empty((Wx.shape[1], dXP.shape[1]), dtype=dtype)

            def part(k):
                r = slice(k * GH // 2, (k + 1) * GH // 2)
                numpy.sum(dXP[r], axis=1, out=db[r])
                numpy.matmul(dXP[r], X.T, out=dWx[r])
                c = slice(k * dX.shape[0] // 2, (k + 1) * dX.shape[0] // 2)
                numpy.matmul(Wx[:, c].T, dXP, out=dX[c])

            run_in_two(part, 0, 1)
            return dWx, db, dX
        if X is not None and self.defer is not None:
            db = dXP.sum(axis=1)
            dWx = numpy.empty(Wx.shape, dtype=dtype)
            in_row_blocks(self.defer, GH, lambda r: numpy.matmul(dXP[r], X.T, out=dWx[r]), 2.0 * dWx.size * dXP.shape[1])
            return dWx, db, Wx.T @ dXP
        if X is None and self.fused(dXP):
            dWx = numpy.zeros(Wx.shape, dtype=dtype)
            db = numpy.zeros(GH, dtype=dtype)
            if self.defer is not None and not self.two:
                self.defer(lambda: kernels.scatter_columns(dWx, db, ids, dXP))
            else:
                _rows_in_two(lambda r: kernels.scatter_columns(dWx[r], db[r], ids, dXP[r]), GH, self.two)
            return dWx, db, None
        return super().input_grads(Wx, dXP, X, ids)

    def scatter_add_rows(self, dst, ids, src):
        if self.fused(dst) and dst.flags.c_contiguous:
            kernels.scatter_rows(dst, ids, src)
            return dst
        return super().scatter_add_rows(dst, ids, src)

    # ----- the output layer -----
    def softmax_xent_forward(self, X, W, b, targets, weights=None, store=True):
        if self.fused(X, W):
            return heads.softmax_xent_forward(X, W, b, targets, weights, store)
        return super().softmax_xent_forward(X, W, b, targets, weights, store)

    def softmax_xent_backward(self, cache, W):
        if self.fused(cache["P"]):
            return heads.softmax_xent_backward(cache, W)
        return super().softmax_xent_backward(cache, W)

    def _words_fused(self, X, W, b):
        return self.fused(X, W) and heads.words_fusable(X, W, b)

    def class_xent_forward(self, X, Wc, bc, W, b, bounds, targets_host, targets, weights=None, store=True):
        if self._words_fused(X, W, b):
            return heads.class_xent_forward(X, Wc, bc, W, b, bounds, targets_host, weights, store, self.head_threads)
        return class_xent_forward(X, Wc, bc, W, b, bounds, targets_host, targets, weights, store,
                                  xent=self.softmax_xent_forward)

    def class_xent_backward(self, cache, Wc, W):
        if "plan" in cache:
            return heads.class_xent_backward(cache, Wc, W)
        return class_xent_backward(cache, Wc, W, xent_backward=self.softmax_xent_backward)

    def class_xent_forward_backward(self, X, Wc, bc, W, b, bounds, targets_host):
        if self._words_fused(X, W, b):
            return heads.class_xent_forward_backward(X, Wc, bc, W, b, bounds, targets_host, self.head_threads)
        return super().class_xent_forward_backward(X, Wc, bc, W, b, bounds, targets_host)

    # ----- optimizers -----
    def sum_squares(self, arrays, total):
        # A sum of squares is memory bound: 2.1 ms on one core for 30,000 x 200 float32, 0.9
        # on two; large gradients are cut in half and summed by two threads.
        if self.settings.threads >= 2 and sum(a.size for a in arrays) >= 1 << 20:
            groups = share_in_two([(a.reshape(-1),) for a in arrays])
            with blas_threads(1):
                parts = run_in_two(lambda part: sum(float(numpy.dot(f, f)) for (f,) in part), *groups)
            total += sum(parts)
            return total
        return super().sum_squares(arrays, total)

    def adam_update(self, opt, grads, scale) -> set:
        # One compiled pass per array that also applies the clipping scale, large arrays cut
        # in two and the pieces shared between two threads (the kernel releases the GIL);
        # Optimizer.step updates the rest (row gradients, other dtypes) the plain way.
        fused = [(n, p) for n, p in opt.params.items()
                 if self.fused(p) and not isinstance(grads[n], RowGrad) and p.flags.c_contiguous
                 and grads[n].flags.c_contiguous]
        if not fused:
            return set()
        F = numpy.float32
        step, inv = (F(x) for x in opt._step_size())
        gscale = F(1.0) if scale is None else F(float(numpy.asarray(scale)))
        groups = share_in_two([(p.reshape(-1), grads[name].reshape(-1), opt._buf(f"{name}.m", p).reshape(-1),
                                opt._buf(f"{name}.v", p).reshape(-1)) for name, p in fused])

        def run(part):
            for p, g, m, v in part:
                kernels.adam_update(p, g, m, v, step, inv, F(opt.b1), F(opt.b2), F(opt.eps), gscale)

        if self.settings.threads >= 2 and sum(len(q[0]) for q in groups[1]) >= ADAM_HALF:
            run_in_two(run, *groups)
        else:
            run(groups[0] + groups[1])
        return {n for n, _ in fused}

    # ----- dynamic evaluation -----
    def dynamic_step(self, p, g, keep, pull, scale):
        # One compiled pass over each parameter instead of two NumPy passes (four with a
        # decay), each a sweep over memory: the update of the 894,803 weights of a 2x256
        # LSTM after every segment of 20 characters.
        arrays = (p, g, scale) if keep is None else (p, g, scale, keep, pull)
        if self.fused(*arrays) and all(a.flags.c_contiguous for a in arrays):
            decay = keep is not None
            pf, gf, sf = p.reshape(-1), g.reshape(-1), scale.reshape(-1)
            kernels.dynamic_step(pf, gf, keep.reshape(-1) if decay else sf, pull.reshape(-1) if decay else sf, sf,
                                 decay)  # (without a decay, scale stands in for the arrays it never reads)
            return
        super().dynamic_step(p, g, keep, pull, scale)

    def segment_ops(self, model, N):
        # One stream's short segments, where the settings leave the packed products to the
        # engine: the LSTM's forward loop on the BLAS (matrix-vector products, nothing to pack)
        # and its backward packed (no transposed copy for the BLAS): at H 256 and 20 steps,
        # 273 against 457 us a layer forward, 341 against 488 backward (benchmarks/README.md,
        # "Start-up and dynamic evaluation's speed"). Not measured per machine (the planner
        # times whole training steps and scoring passes only).
        if N == 1 and "packed" in self.settings.plan and self.settings.packed and parallel.packed_matters(self, model):
            return self.derive(settings=replace(self.settings, packed=False)), self
        return self, self

    # ----- sampling -----
    def draw_scaled(self, logits, temperature, rng):
        # Compiled scaling and drawing around NumPy's vectorised exp: three calls instead of
        # a dozen (the NumPy calls took about 100 us per token at V = 10,000).
        if not (self.settings.kernels and kernels.available and temperature > 0):
            return None
        z = numpy.empty(logits.shape[0])
        kernels.scaled_logits(numpy.ascontiguousarray(logits), float(temperature), z)
        numpy.exp(z, out=z)
        return int(kernels.draw_unnormalised(z, rng.random()))

    def draw_scaled_rows(self, logits, temperatures, rngs):
        # The server's draw for every stream of a step: draw_scaled's kernels run over the
        # rows in one call each, around one NumPy exp of the whole block (a dozen Python calls
        # a step instead of three a row); each row's arithmetic is draw_scaled's, so its index
        # is too (tests/test_serve.py compares them).
        if not (self.settings.kernels and kernels.available):
            return None
        logits = numpy.ascontiguousarray(logits)
        n = logits.shape[0]
        z = numpy.empty(logits.shape)
        kernels.scaled_logits_rows(logits, numpy.array(temperatures, dtype=numpy.float64), z)
        numpy.exp(z, out=z)
        out = numpy.empty(n, dtype=numpy.int64)
        kernels.draw_unnormalised_rows(z, numpy.array([rng.random() for rng in rngs]), out)
        return out

    def stepper(self, model, N=1, packed=False):
        from .stepper import FastStepper

        if model.config.cell in layers.FUSED and model.xp is numpy:
            return FastStepper(model, N, self, packed)
        return super().stepper(model, N, packed)

    def small_chunk_loop(self, flops):
        # One BLAS thread where even the chunk-wide products are small: a segment of 20
        # characters of one stream (2x256 LSTM) scored and adapted at 1,160 tokens/s on one
        # thread and 300 on two, the second core busy (threads.py, SMALL_GEMM_FLOPS).
        return loop_threads(flops)

    # ----- whole training steps: the parallel strategies -----
    def loss_and_grads(self, model, ids, targets, state, masks, train, sparse):
        def first(ops, t):
            cut = None if masks is None else [mk[:, :t] for mk in masks]
            parallel.loss_and_grads(ops, model, ids[:t], targets[:t], state, cut, train, sparse)

        ops = self.planned("train", model, *ids.shape, first)
        return parallel.loss_and_grads(ops, model, ids, targets, state, masks, train, sparse)

    def nll(self, model, ids, targets, state, weights):
        def first(ops, t):
            parallel.nll(ops, model, ids[:t], targets[:t], state, None if weights is None else weights[:t])

        ops = self.planned("score", model, *ids.shape, first)
        return parallel.nll(ops, model, ids, targets, state, weights)


def work_flops(config, T: int, N: int) -> float:
    """GEMM FLOPs of a forward pass over T x N tokens (a one-hot input's projection is a
    gather; the head counted as a full softmax)."""
    c = config
    per_token = 2.0 * c.hidden * c.vocab_size
    for layer in range(c.layers):
        In = c.hidden if layer else c.embed  # 0 for one-hot input
        per_token += 2.0 * c.gates * c.hidden * (c.hidden + In)
    return per_token * T * N


def plan_report(model, N: int, T: int, measure: bool = False) -> dict:
    """What the engine runs for a training step and a scoring pass of N streams x T steps of
    ``model`` (with its backend's operations), and why: per kind, the rules' path, the
    candidates, and the plan kept (its path, when it was measured, each candidate's median
    seconds) or the reason there is none. ``measure``: measure now (again), on random tokens."""
    ops = model.ops
    if not isinstance(ops, CpuOps):
        return {"engine": getattr(ops, "name", "reference"), "kinds": {}}
    planner = ops.planner
    out = {"engine": ops.name, "settings": {"threads": ops.settings.threads, "kernels": ops.settings.kernels,
                                            "loops": ops.settings.rowsplit, "packed": ops.settings.packed,
                                            "plans": sorted(ops.settings.plan)},
           "batch": N, "seq_len": T, "kinds": {}}
    if planner is not None:
        out["machine"] = planner.machine()
        out["file"] = str(planner.file().path)
    V = model.config.vocab_size
    rng = numpy.random.default_rng(0)
    ids, targets = rng.integers(0, V, (T, N)), rng.integers(0, V, (T, N))
    for kind in ("train", "score"):
        rule = parallel.rule_path(kind, ops, model, N)
        d = {"rule": rule.label, "candidates": [c.label for c in parallel.candidates(kind, ops, model, N)]}
        why = ops.unplanned(kind, model, T, N)
        if why is not None:
            d.update(path=rule.label, why=why)
        else:
            key = plan.work_key(kind, model.config, N, T, ops.settings, model.xp, model.dtype)
            d["key"] = key
            if measure:
                planner.forget(key)
                if kind == "train":
                    model.loss_and_grads(ids, targets, None, rng=numpy.random.default_rng(0), sparse=True)
                else:
                    model.nll(ids, targets)
            entry = planner.entry(key)
            if entry is None:
                d.update(path=None, why="not measured yet: the first piece of this work will be (or --measure now)")
            else:
                d.update(path=plan.Path.from_json(entry["path"]).label, why="measured", plan=entry)
        out["kinds"][kind] = d
    stepper = model.stepper(1)
    out["sample"] = {"modes": getattr(stepper, "modes", []), "why": "timed as sampling goes (a few steps of each at "
                     "the start and every 512 steps), never kept: a step's cost moves with the machine's load"}
    return out


_MALLOC_TUNED = []


def keep_freed_memory():
    """Ask glibc's malloc (once a process) to keep what a step frees for the next step: blocks
    up to 32 MiB from the heap rather than fresh mappings, and the heap's free top kept up to
    256 MiB. With the defaults, each training step of config (a) on one thread had its buffers
    mapped afresh and paid their page faults: 12.5-14.5 ms a step against 8.0-8.3 with these
    settings (Zen 4, 2026-12-05; 396dfa0's code had stayed under the threshold). Elsewhere
    (another libc, another OS) nothing changes."""
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED.append(True)
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 256 << 20)


def engine_ops(settings: Settings | None = None) -> CpuOps:
    """The engine's operations for ``settings`` (default: the process's), with the process's
    planner where the settings leave a knob to it."""
    keep_freed_memory()
    settings = settings or default_settings()
    return CpuOps(settings, planner=plan.shared_planner() if settings.plan else None)


register_engine("cpu", engine_ops)

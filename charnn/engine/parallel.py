"""Parallel strategies: one training step (or scoring pass) of a model on two CPU cores.

Each strategy takes the model and runs its maths methods (forward, backward and their parts)
with operations derived from the engine's (cpu.CpuOps.derive) that say what the strategy needs
of them; the maths never sees a thread.

- **Batch split** (:func:`split_columns`): two halves of the N streams, one per core, each
  with one BLAS thread; streams are independent through the whole model, so only the weight
  gradients are summed. Dropout masks are drawn before the split, in one order, so results do
  not depend on it.
- **Shared tail** (:func:`shared_tail`): in a batch split, the weight gradients' products
  (needed by nothing else in the step) go to a list both halves work off at their ends
  (threads.Deferred), so the faster core takes over part of the slower one's products. The
  two cores of these machines run at different speeds from moment to moment; (b) 1.08-1.14x
  a step. Only from DEFER_FLOPS of such products a half (below, the waits cost more).
- **Row split** (:func:`use_row_split`): thin batches (under 16 streams a half) of float32
  LSTMs run as one batch, each layer's time loop split by hidden units across the cores
  (loops.py), the input and output layers by rows or positions.
- **Shared class head**: with a class-factored softmax, the recurrent layers run on two halves
  of the streams, the output layer once on the whole batch between them, its compiled passes
  split by class; its large weight gradient is computed once and never summed.
- **One thread**: the whole batch at once, the chunk-wide products with ``blas`` BLAS threads.

Which of them runs is a :class:`~charnn.engine.plan.Path` (the split, the BLAS threads of the
one-thread path, the packed products): the operations' own (``ops.path``, the planner's choice,
plan.py), or where they carry none the rules (:func:`rule_path`). :func:`candidates` lists the
paths the planner may time for a piece of work.
"""

from __future__ import annotations

import numpy

from ..nn.model import join_states
from ..nn.optim import Grads, add_grads
from . import loops, packed
from .plan import Path
from .threads import Deferred, blas_threads, in_worker, run_in_two, with_tail

# From this many FLOPs of weight-gradient products per half batch, the halves share them at
# their ends: (b), 20 GFLOP a half, 1.08-1.14x faster a step; (a), 0.1, 5% slower
# (benchmarks/README.md).
DEFER_FLOPS = 1e9


def split_columns(ops, model, N: int) -> list:
    """Column ranges to compute in parallel: two halves of the N streams with two threads on
    the NumPy backend and N >= 8, else one range."""
    if model.xp is not numpy or N < 8 or ops.settings.threads < 2:
        return [(0, N)]
    return _halves(N)


def _halves(N: int) -> list:
    return [(0, N // 2), (N // 2, N)]


def rule_path(kind: str, ops, model, N: int) -> Path:
    """The path the rules choose for ``kind`` of work ("train" or "score") on N streams: the
    batch split from 8 streams with two threads, the row split instead for a training step of
    thin half batches (use_row_split), else one thread with the BLAS's threads as they are."""
    if len(split_columns(ops, model, N)) == 1:
        return Path("one", None, ops.settings.packed)
    if kind == "train" and use_row_split(ops, model, N):
        return Path("rows", 1, ops.settings.packed)
    return Path("batch", 1, ops.settings.packed)


def candidates(kind: str, ops, model, N: int) -> list:
    """The paths the planner may time for ``kind`` of work on N streams, the rules' first:
    the knobs the settings leave free (Settings.plan) take each value that can run here. The
    split: one thread (the chunk-wide products on one BLAS thread or on ``threads``), the batch
    split (from 2 streams), the row split (an LSTM with compiled loops and an even hidden
    size). The packed products: on and off, where the LSTM's compiled loops use them."""
    rule = rule_path(kind, ops, model, N)
    free, threads = ops.settings.plan, ops.settings.threads
    splits = [(rule.split, rule.blas)]
    if "split" in free and threads >= 2 and model.xp is numpy:
        splits += [("one", 1), ("one", threads)]
        if N >= 2:
            splits.append(("batch", 1))
        if _rows_possible(ops, model):
            splits.append(("rows", 1))
    packs = [rule.packed]
    if "packed" in free and packed_matters(ops, model):
        packs = [rule.packed, not rule.packed]
    out = []
    for p in packs:
        for split, blas in splits:
            path = Path(split, blas, p)
            if path not in out:
                out.append(path)
    return out


def _rows_possible(ops, model) -> bool:
    cfg = model.config
    return (model.xp is numpy and ops.settings.threads >= 2
            and ops.compiled_loop(cfg.cell, model.params["rnn.0.Wh"]) and loops.usable(cfg.hidden))


def packed_matters(ops, model) -> bool:
    """Whether the packed products would run in this model's time loops (the LSTM's compiled
    loops, on a CPU where packed.py can run)."""
    return ops.compiled_loop(model.config.cell, model.params["rnn.0.Wh"]) and packed.available()


def run_split(model, parts, work, blas=True):
    """work(a, b) for each column range, in parallel threads with one BLAS thread each (the
    numba kernels and the BLAS release the GIL); ``blas=False``: the caller has set them."""
    if len(parts) == 1:
        return [work(*parts[0])]
    if not blas:
        return run_in_two(lambda ab: work(*ab), parts[0], parts[1])
    with blas_threads(1, model.xp):
        return run_in_two(lambda ab: work(*ab), parts[0], parts[1])


def _sub_state(state, a, b):
    return [(h[:, a:b], None if c is None else c[:, a:b]) for h, c in state]


def _sub_masks(masks, a, b):
    return None if masks is None else [mk[:, :, a:b] for mk in masks]


def use_row_split(ops, model, N: int) -> bool:
    """Whether a chunk of N streams runs as one batch on two cores, each LSTM layer split by
    hidden units, instead of two halves of the streams: where the halves would be thin
    (under 16 streams), whose per-step products cost nearly as much as whole ones (H = 200,
    N = 20: 57 against 63 ms per class-factored step). From 16 streams a half the two
    measured alike (H = 128, N = 32: 10.6 against 10.3 ms per step; H = 512, N = 64: within
    noise of each other), and the batch split stays."""
    cfg = model.config
    return (N < 32 and ops.settings.threads >= 2 and model.xp is numpy
            and ops.compiled_loop(cfg.cell, model.params["rnn.0.Wh"]) and loops.usable(cfg.hidden))


def shared_tail(model, T: int, N: int):
    """A threads.Deferred for the two halves of a batch split of N streams, or None: not where
    the weight-gradient products are small, nor from charnn's worker thread (the halves run
    one after the other there)."""
    cfg = model.config
    flops = 0.0  # of the recurrent layers' weight-gradient products, for a half
    for layer in range(cfg.layers):
        In = cfg.hidden if layer else (cfg.embed or 0)  # one-hot input: a scatter
        flops += 2.0 * cfg.gates * cfg.hidden * (cfg.hidden + In) * T * (N // 2)
    if flops < DEFER_FLOPS or in_worker():
        return None
    return Deferred(2)


def loss_and_grads(ops, model, ids, targets, state, masks, train, sparse):
    """model.loss_and_grads on the engine: one of the strategies above (the operations' path,
    or the rules')."""
    T, N = ids.shape
    path = ops.path or rule_path("train", ops, model, N)
    if path.split == "one":
        with blas_threads(path.blas, model.xp):
            loss, cache, new_state = model.forward(ids, targets, state, train=train, dropout_masks=masks, ops=ops)
            grads, _ = model.backward(cache, sparse, ops=ops)
        return loss, grads, new_state
    if path.split == "rows":
        with blas_threads(1, model.xp):
            return _row_split(ops, model, ids, targets, state, train, masks, sparse)
    parts = _halves(N)
    if model.config.class_bounds:
        with blas_threads(1, model.xp):
            return _shared_head(ops, model, ids, targets, state, train, masks, parts, sparse)

    tail = shared_tail(model, T, N)

    def half(a, b, defer):
        half_ops = ops.derive(defer=defer)
        loss, cache, st = model.forward(ids[:, a:b], targets[:, a:b], _sub_state(state, a, b), train=train,
                                        dropout_masks=_sub_masks(masks, a, b), ops=half_ops)
        # Each half's loss is a mean over its own T x (b - a) tokens; dividing its gradient
        # by all T x N tokens instead makes the two halves' gradients add up to the whole's.
        cache["head"]["denom"] = float(T * N)
        grads, _ = model.backward(cache, sparse, ops=half_ops)
        return loss, grads, st, b - a

    results = run_split(model, parts, lambda a, b: with_tail(tail, lambda defer: half(a, b, defer)))
    (l0, g0, s0, n0), (l1, g1, s1, n1) = results
    add_grads(g0, g1, ops)
    loss = l0 * (n0 / N) + l1 * (n1 / N)
    return loss, g0, join_states(model.xp, s0, s1)


def _row_split(ops, model, ids, targets, state, train, masks, sparse):
    """loss_and_grads with the recurrent layers split by hidden units, the input and output
    layers by rows or positions, all in two threads with one BLAS thread each."""
    xp = model.xp
    T, N = ids.shape
    two = ops.derive(two=True, head_threads=ops.settings.threads)
    X, cache, new_state = model.body_forward(ids, state, train, None, masks, True, ops=two)
    grads = Grads()
    if model.config.class_bounds:
        loss, dX = model.head_loss_and_grads(X, targets, grads, ops=two)
    else:
        # Two halves of the positions (first and second half of the time steps); each half's
        # loss is a mean over its tokens, its gradient divided by all T x N.
        t = T // 2 if T > 1 else T
        cuts = [(0, t), (t, T)] if t < T else [(0, T)]

        def head(tt):
            a, b = tt
            loss, _, hc = model.head_forward(X[:, a * N:b * N], targets[a:b], None, True, ops=ops)
            hc["denom"] = float(T * N)
            g = Grads()
            return loss * ((b - a) / T), model.head_backward(hc, g, ops=ops), g

        if len(cuts) == 2:
            (l0, d0, g0), (l1, d1, g1) = run_in_two(head, cuts[0], cuts[1])
            add_grads(g0, g1, ops)
            loss, dX, grads = l0 + l1, xp.concatenate([d0, d1], axis=1), g0
        else:
            loss, dX, grads = head(cuts[0])
    model.body_backward(dX, cache, grads, sparse, ops=two)
    return loss, grads, new_state


def _shared_head(ops, model, ids, targets, state, train, masks, parts, sparse):
    """loss_and_grads for a class-factored head: the recurrent layers on two halves of the
    streams in parallel, the output layer once on the whole batch between them, its compiled
    within-class passes split across the two threads by class. Everything runs with one BLAS
    thread: OpenBLAS's own threads, once woken for a product, spin on the core the other half
    needs (benchmarks/factored.py measured 107 ms per step with two BLAS threads around the
    output layer, 65 ms without)."""
    xp, H = model.xp, model.config.hidden
    T, N = ids.shape

    def body_forward(a, b):
        return model.body_forward(ids[:, a:b], _sub_state(state, a, b), train, None, _sub_masks(masks, a, b), True,
                                  ops=ops)

    halves = run_split(model, parts, body_forward, blas=False)
    tail = shared_tail(model, T, N)
    X = xp.concatenate([Xh.reshape(H, T, b - a) for (Xh, _, _), (a, b) in zip(halves, parts)], axis=2)
    grads = Grads()
    loss, dX = model.head_loss_and_grads(X.reshape(H, T * N), targets, grads,
                                         ops=ops.derive(head_threads=ops.settings.threads))
    dX = dX.reshape(H, T, N)

    def body_backward(k, defer):
        (a, b), (_, cache, _) = parts[k], halves[k]
        g = Grads()
        model.body_backward(xp.ascontiguousarray(dX[:, :, a:b]).reshape(H, T * (b - a)), cache, g, sparse,
                            ops=ops.derive(defer=defer))
        return g

    for g in run_split(model, [(0,), (1,)], lambda k: with_tail(tail, lambda d: body_backward(k, d)), blas=False):
        add_grads(grads, g, ops)
    return loss, grads, join_states(xp, halves[0][2], halves[1][2])


def nll(ops, model, ids, targets, state, weights):
    """model.nll on the engine: the streams split across cores like :func:`loss_and_grads`
    (the operations' path, or the rules'), or each layer split by hidden units (the row
    split's forward: :func:`_row_nll`)."""
    path = ops.path or rule_path("score", ops, model, ids.shape[1])

    def work(a, b):
        w = None if weights is None else weights[:, a:b]
        _, cache, st = model.forward(ids[:, a:b], targets[:, a:b], _sub_state(state, a, b), weights=w, store=False,
                                     ops=ops)
        return cache["nll"], st

    if path.split == "one":
        with blas_threads(path.blas, model.xp):
            return work(0, ids.shape[1])
    if path.split == "rows":
        with blas_threads(1, model.xp):
            return _row_nll(ops, model, ids, targets, state, weights)
    (n0, s0), (n1, s1) = run_split(model, _halves(ids.shape[1]), work)
    return model.xp.concatenate([n0, n1], axis=1), join_states(model.xp, s0, s1)


def _row_nll(ops, model, ids, targets, state, weights):
    """nll with the recurrent layers split by hidden units (as :func:`_row_split`'s forward)
    and the output layer on two halves of the positions, in two threads."""
    xp = model.xp
    T, N = ids.shape
    two = ops.derive(two=True, head_threads=ops.settings.threads)
    X, _, new_state = model.body_forward(ids, state, False, None, None, False, ops=two)
    t = T // 2 if T > 1 else T
    cuts = [(0, t), (t, T)] if t < T else [(0, T)]

    def head(tt):
        a, b = tt
        w = None if weights is None else weights[a:b]
        return model.head_forward(X[:, a * N:b * N], targets[a:b], w, False, ops=ops)[1]

    parts = run_in_two(head, *cuts) if len(cuts) == 2 else [head(cuts[0])]
    return xp.concatenate(parts).reshape(T, N), new_state

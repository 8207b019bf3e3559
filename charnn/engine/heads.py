"""The output layer's compiled passes (numba kernels), twins of functional.py's reference.

The full-vocabulary softmax cross-entropy runs in two compiled passes over the logits after
NumPy's row max (kernels.softmax_xent_rows; the reference takes five NumPy passes), and its
gradient with the bias gradient in one (kernels.softmax_xent_grad_rows). The class-factored
softmax's within-class passes run as one compiled loop over the positions grouped by class
(kernels.class_words_*), on two threads where the engine has them, each taking about half of
the classes present (disjoint rows of W and disjoint positions). Results equal the
reference's up to rounding (tests/test_engine.py compares them). Float32 NumPy arrays only.
"""

from __future__ import annotations

import numpy

from . import kernels
from ..nn.functional import class_part_backward, weighted_mean, xent_result
from .threads import run_in_two


def softmax_xent_forward(X, W, b, targets, weights=None, store=True):
    """functional.softmax_xent_forward with the softmax and the loss in two compiled passes."""
    logits = X.T @ W.T  # (M, V)
    logits += b
    M = targets.shape[0]
    rows = numpy.arange(M)
    nll = numpy.empty(M, dtype=logits.dtype)
    kernels.softmax_xent_rows(logits, logits.max(axis=1), targets, nll, store)
    return xent_result(logits, X, targets, weights, nll, rows, store)


def softmax_xent_backward(cache, W):
    """functional.softmax_xent_backward with dlogits and db in one compiled pass."""
    P, X, targets, weights = cache["P"], cache["X"], cache["targets"], cache["weights"]
    denom = cache["denom"]
    M = P.shape[0]
    scale = numpy.full(M, 1.0 / denom, dtype=P.dtype) if weights is None else (weights / (denom if denom > 0 else 1)).astype(P.dtype)
    db = numpy.empty(P.shape[1], dtype=P.dtype)
    kernels.softmax_xent_grad_rows(P, targets, scale, db)
    dW = P.T @ X.T
    dX = W.T @ P.T
    return dX, dW, db


def words_fusable(X, W, b) -> bool:
    """Whether the compiled within-class passes take these arrays (the caller has checked
    that they are float32 NumPy arrays)."""
    return W.flags.c_contiguous and b.flags.c_contiguous


def _split_groups(groups, sizes, threads):
    """Group ranges [(0, k), (k, K)] of about equal work (class size x (positions + 2)) for
    two threads, or [(0, K)]."""
    K = len(groups) - 1
    if threads < 2 or K < 2:
        return [(0, K)]
    work = numpy.cumsum(sizes * (numpy.diff(groups) + 2))
    k = int(numpy.searchsorted(work, work[-1] / 2.0))
    k = min(max(k, 1), K - 1)
    return [(0, k), (k, K)]


def _in_group_ranges(fn, ranges):
    """fn(k0, k1) for each group range, the second range in charnn's worker thread."""
    if len(ranges) == 1:
        fn(*ranges[0])
    else:
        run_in_two(lambda r: fn(*r), ranges[0], ranges[1])


def _words_plan(X, bounds_a, word_class, targets_host, threads) -> dict:
    """What the compiled within-class passes need: the positions grouped by class (``order``,
    ``groups``), each position's word range and offset into the probability buffer P, the
    classes present, and the group ranges of the two threads."""
    M = targets_host.shape[0]
    order = numpy.argsort(word_class, kind="stable")
    starts, ends = bounds_a[word_class], bounds_a[word_class + 1]
    offsets = numpy.zeros(M + 1, dtype=numpy.int64)
    numpy.cumsum(ends - starts, out=offsets[1:])
    groups = numpy.concatenate([[0], numpy.flatnonzero(numpy.diff(word_class[order])) + 1, [M]])
    present = word_class[order[groups[:-1]]]  # the class of each group
    return {"Xt": numpy.ascontiguousarray(X.T), "t64": numpy.ascontiguousarray(targets_host, dtype=numpy.int64),
            "order": order, "groups": groups, "starts": starts, "ends": ends, "offsets": offsets,
            "P": numpy.empty(offsets[-1], dtype=X.dtype), "present": present, "M": M,
            "ranges": _split_groups(groups, bounds_a[present + 1] - bounds_a[present], threads)}


def _words_grad_buffers(plan, W, bounds_a):
    """dW, db for the compiled backward pass (which writes the rows of the classes present;
    the others are zeroed here), and dXw (M, D) zeros."""
    dW = numpy.empty_like(W)
    db = numpy.empty(W.shape[0], dtype=W.dtype)
    absent = numpy.ones(len(bounds_a) - 1, dtype=bool)
    absent[plan["present"]] = False
    for k in numpy.flatnonzero(absent):
        dW[bounds_a[k]: bounds_a[k + 1]] = 0
        db[bounds_a[k]: bounds_a[k + 1]] = 0
    return dW, db, numpy.zeros((plan["M"], W.shape[1]), dtype=W.dtype)


def _scale(weights, denom, M, dtype):
    """Each position's factor in the gradient: 1/denom, or weight/denom."""
    if weights is None:
        return numpy.full(M, 1.0 / denom, dtype=dtype)
    return (weights / numpy.where(denom > 0, denom, 1)).astype(dtype)


def _sq_row(sq, k0):
    """The row of ``sq`` (2, 1) for the thread that runs group range k0..: one per thread."""
    return sq[0 if k0 == 0 else 1]


def class_xent_forward(X, Wc, bc, W, b, bounds, targets_host, weights=None, store=True, threads=1):
    """functional.class_xent_forward with the within-class passes compiled (see the module
    docstring); the cache holds the plan its backward needs."""
    M = targets_host.shape[0]
    bounds_a = numpy.asarray(bounds)
    word_class = numpy.searchsorted(bounds_a, targets_host, side="right") - 1  # (M,) host
    loss_c, nll, ccache = softmax_xent_forward(X, Wc, bc, word_class, None, store)
    nll = nll.copy()
    q = plan = _words_plan(X, bounds_a, word_class, targets_host, threads)
    _in_group_ranges(lambda k0, k1: kernels.class_words_forward(
        q["Xt"], W, b, q["t64"], q["order"], q["groups"], k0, k1, q["starts"], q["ends"], q["offsets"], nll,
        q["P"]), q["ranges"])
    loss, denom = weighted_mean(nll, weights)
    cache = None
    if store:
        cache = {"class": ccache, "plan": plan, "X": X, "weights": weights, "denom": denom, "M": M,
                 "bounds": bounds_a}
    return loss, nll, cache


def class_xent_backward(cache, Wc, W):
    """functional.class_xent_backward for a cache of :func:`class_xent_forward`. Also leaves
    cache["words_sq"] = |dW|^2 + |db|^2, summed while the values were in cache (optim.Grads)."""
    weights, denom = cache["weights"], cache["denom"]
    dX, dWc, dbc = class_part_backward(cache, Wc, softmax_xent_backward)
    dXt = dX.T  # (M, D) view: word-part gradients are added row by row
    plan = cache["plan"]
    dW, db, dXw = _words_grad_buffers(plan, W, cache["bounds"])
    sq = numpy.zeros((2, 1))  # one per thread
    q, per = plan, _scale(weights, denom, plan["M"], W.dtype)
    _in_group_ranges(lambda k0, k1: kernels.class_words_backward(
        q["Xt"], W, q["t64"], q["order"], q["groups"], k0, k1, q["starts"], q["ends"], q["offsets"], q["P"], per,
        dW, db, dXw, _sq_row(sq, k0)), q["ranges"])
    dXt += dXw
    cache["words_sq"] = float(sq.sum())  # absent classes' rows are zero
    return dX, dWc, dbc, dW, db


def class_xent_forward_backward(X, Wc, bc, W, b, bounds, targets_host, threads=1):
    """class_xent_forward (unweighted, stored) and class_xent_backward in one: (loss, nll,
    (dX, dWc, dbc, dW, db), words_sq). Each class's forward and backward passes run back to
    back, so the rows of W a class uses are read from memory once (from cache the second
    time) instead of once per pass."""
    bounds_a = numpy.asarray(bounds)
    word_class = numpy.searchsorted(bounds_a, targets_host, side="right") - 1
    _, nll, ccache = softmax_xent_forward(X, Wc, bc, word_class, None, True)
    nll = nll.copy()
    plan = _words_plan(X, bounds_a, word_class, targets_host, threads)
    M = plan["M"]
    dW, db, dXw = _words_grad_buffers(plan, W, bounds_a)
    sq = numpy.zeros((2, 1))
    q, per = plan, _scale(None, float(M), M, W.dtype)
    _in_group_ranges(lambda k0, k1: kernels.class_words_forward_backward(
        q["Xt"], W, b, q["t64"], q["order"], q["groups"], k0, k1, q["starts"], q["ends"], q["offsets"], nll, q["P"],
        per, dW, db, dXw, _sq_row(sq, k0)), q["ranges"])
    loss, denom = weighted_mean(nll)
    dX, dWc, dbc = class_part_backward({"class": ccache, "weights": None, "denom": denom}, Wc, softmax_xent_backward)
    dX.T[...] += dXw
    return loss, nll, (dX, dWc, dbc, dW, db), float(sq.sum())

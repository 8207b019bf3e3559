"""Stateless forward/backward pieces around the recurrent layers: input lookup, dropout and
the softmax cross-entropy output layer.

Notation as in cells.py; in addition V is the vocabulary size, M = T*N the number of token
positions in a chunk, and a column j = t*N + n of a (D, M) matrix is stream n at step t.
"""

from __future__ import annotations

import math

import numpy

from ..backend import array_module, to_device

# Up to this vocabulary size, scatter-adds are done as a GEMM with a one-hot matrix, which is
# much faster than ufunc.at on the CPU.
ONE_HOT_SCATTER_MAX_V = 1024


def scatter_add_rows(dst, ids, src):
    """dst[ids[j]] += src[j] for every j, duplicates accumulating.

    Args:
        dst: (V, D) array, updated in place.
        ids: (M,) integer ids in [0, V).
        src: (M, D) values.
    """
    xp = array_module(dst)
    V = dst.shape[0]
    if V <= ONE_HOT_SCATTER_MAX_V:
        onehot = xp.zeros((ids.shape[0], V), dtype=dst.dtype)
        onehot[xp.arange(ids.shape[0]), ids] = 1
        dst += onehot.T @ src
    else:
        xp.add.at(dst, ids, src)
    return dst


def dropout_mask(shape, p, rng, xp, dtype):
    """An inverted-dropout mask: 0 with probability p, else 1/(1-p). Drawn on the host from
    ``rng`` so the same seed gives the same masks on every device."""
    keep = rng.random(shape) >= p
    return to_device(keep.astype(dtype) / (1.0 - p), xp)


def weighted_mean(nll, weights=None):
    """(loss, denom): the mean of ``nll``, or sum(weights * nll) / sum(weights) with weights;
    an all-zero mask gives loss 0 rather than 0/0."""
    if weights is None:
        denom = float(nll.shape[0])
        return nll.sum() / denom, denom
    xp = array_module(nll)
    denom = weights.sum()
    return (nll * weights).sum() / xp.where(denom > 0, denom, 1), denom


def log_softmax_rows(logits):
    """Stable row-wise log-softmax of an (M, V) array (subtracts the row max first)."""
    xp = array_module(logits)
    shifted = logits - logits.max(axis=1, keepdims=True)
    lse = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    return shifted - lse


def softmax_xent_forward(X, W, b, targets, weights=None, store=True):
    """Output projection and softmax cross-entropy.

    Args:
        X: (D, M) inputs (top hidden states).
        W: (V, D) output weights; b: (V,) bias.
        targets: (M,) target ids.
        weights: optional (M,) per-position weights (0 masks a position out).
        store: keep what backward needs.

    Returns:
        (loss, nll, cache): loss = sum(weights * nll) / sum(weights) (the mean if weights is
        None; 0 if every weight is 0) as a 0-d array; nll (M,) the per-position negative log-likelihood in nats.
    """
    xp = array_module(X)
    logits = X.T @ W.T  # (M, V)
    logits += b
    M = targets.shape[0]
    rows = xp.arange(M)
    logits -= logits.max(axis=1, keepdims=True)
    picked = logits[rows, targets]  # the target's shifted logit, taken before exp can underflow
    xp.exp(logits, out=logits)  # unnormalised probabilities, each row's max is 1
    Z = logits.sum(axis=1)  # (M,), at least 1
    nll = xp.log(Z) - picked
    if store:
        logits /= Z[:, None]  # probabilities
    return xent_result(logits, X, targets, weights, nll, rows, store)


def xent_result(P, X, targets, weights, nll, rows, store):
    """(loss, nll, cache) of a softmax cross-entropy from its per-position ``nll``; the cache
    (with store) keeps P, the probabilities, and what the backward pass needs besides."""
    loss, denom = weighted_mean(nll, weights)
    cache = None
    if store:
        cache = {"P": P, "X": X, "targets": targets, "weights": weights, "denom": denom, "rows": rows}
    return loss, nll, cache


def softmax_xent_backward(cache, W):
    """Returns dX (D, M), dW (V, D), db (V,) for the loss of :func:`softmax_xent_forward`."""
    xp = array_module(W)
    P, X, targets, weights = cache["P"], cache["X"], cache["targets"], cache["weights"]
    dlogits = P  # reused in place: softmax - onehot, scaled
    denom = cache["denom"]
    dlogits[cache["rows"], targets] -= 1
    if weights is None:
        dlogits /= denom
    else:
        dlogits *= (weights / xp.where(denom > 0, denom, 1))[:, None]
    db = dlogits.sum(axis=0)
    dW = dlogits.T @ X.T
    dX = W.T @ dlogits.T
    return dX, dW, db


# ----- class-factored softmax (Mikolov's RNNLM) -----
#
# Words are split into C classes, contiguous ranges of ids [bounds[k], bounds[k+1]) (the word
# vocabulary is ordered by frequency, so each class holds words of similar frequency), and
#     P(w | h) = P(class(w) | h) * P(w | class(w), h)
# with a softmax over the C classes (weights Wc (C, D), bc) and a softmax over the words of one
# class (the rows W[a:b], b[a:b] of the word weights). Training costs about M * (C + size of
# the target's class) * D instead of M * V * D, and the probabilities stay exactly normalised.


def class_bounds(counts, n_classes: int) -> list:
    """Class boundaries [0, ..., V] over ids 0..V-1 (in vocabulary order) so that each class
    holds about 1/n_classes of the token mass (frequency binning, as in RNNLM)."""
    counts = numpy.asarray(counts, dtype=numpy.float64) + 1e-9
    V = len(counts)
    n_classes = max(1, min(n_classes, V))
    cum = numpy.cumsum(counts) / counts.sum()
    bounds = [0]
    for k in range(1, n_classes):
        # the first id whose cumulative mass passes k / C starts a new class
        i = int(numpy.searchsorted(cum, k / n_classes, side="right")) + 1
        if bounds[-1] < i < V:
            bounds.append(i)
    bounds.append(V)
    return bounds


def class_xent_forward(X, Wc, bc, W, b, bounds, targets_host, targets, weights=None, store=True,
                       xent=softmax_xent_forward):
    """Class-factored softmax cross-entropy; arguments and results as softmax_xent_forward,
    plus Wc (C, D), bc (C,), the class ``bounds`` (host list) and the targets also on the host
    (to group positions by class without a device round trip). ``xent``: the full softmax
    to use for the class part (an engine passes its own)."""
    xp = array_module(X)

    Xt = X.T  # (M, D)
    M = targets_host.shape[0]
    bounds_a = numpy.asarray(bounds)
    word_class = numpy.searchsorted(bounds_a, targets_host, side="right") - 1  # (M,) host
    cls_d = xp.asarray(word_class) if xp is not numpy else word_class
    loss_c, nll, ccache = xent(X, Wc, bc, cls_d, None, store)
    nll = nll.copy()
    order = numpy.argsort(word_class, kind="stable")
    edges = numpy.searchsorted(word_class[order], numpy.arange(len(bounds)))
    groups = []
    for k in range(len(bounds) - 1):
        s, e = edges[k], edges[k + 1]
        if s == e:
            continue
        pos = order[s:e]
        pos_d = xp.asarray(pos) if xp is not numpy else pos
        a, z = bounds[k], bounds[k + 1]
        Xk = Xt[pos_d]  # (P, D)
        lw = Xk @ W[a:z].T
        lw += b[a:z]
        lw -= lw.max(axis=1, keepdims=True)
        rows = xp.arange(len(pos))
        local = targets[pos_d] - a
        picked = lw[rows, local]
        xp.exp(lw, out=lw)
        Z = lw.sum(axis=1)
        nll[pos_d] += xp.log(Z) - picked
        if store:
            lw /= Z[:, None]
            groups.append((a, z, pos_d, Xk, lw, rows, local))
    loss, denom = weighted_mean(nll, weights)
    cache = None
    if store:
        cache = {"class": ccache, "groups": groups, "X": X, "weights": weights, "denom": denom, "M": M}
    return loss, nll, cache


def class_part_backward(cache, Wc, xent_backward=softmax_xent_backward):
    """The class softmax's part of the gradients: dX (D, M), dWc, dbc."""
    ccache = dict(cache["class"])
    ccache["weights"], ccache["denom"] = cache["weights"], cache["denom"]
    return xent_backward(ccache, Wc)


def class_xent_backward(cache, Wc, W, xent_backward=softmax_xent_backward):
    """Returns dX (D, M), dWc, dbc, dW (V, D), db (V,) for class_xent_forward's loss."""
    xp = array_module(W)
    weights, denom = cache["weights"], cache["denom"]
    dX, dWc, dbc = class_part_backward(cache, Wc, xent_backward)
    dXt = dX.T  # (M, D) view: word-part gradients are added row by row
    scale = None
    if weights is not None:
        scale = weights / xp.where(denom > 0, denom, 1)
    dW = xp.zeros_like(W)
    db = xp.zeros(W.shape[0], dtype=W.dtype)
    for a, z, pos_d, Xk, P, rows, local in cache["groups"]:
        P[rows, local] -= 1
        if scale is None:
            P /= denom
        else:
            P *= scale[pos_d][:, None]
        dW[a:z] += P.T @ Xk
        db[a:z] += P.sum(axis=0)
        dXt[pos_d] += P @ W[a:z]
    return dX, dWc, dbc, dW, db


def class_log_probs(X, Wc, bc, W, b, bounds):
    """Exact log P(w | h) for every word: (M, V) from X (D, M)."""
    xp = array_module(X)
    lc = log_softmax_rows(X.T @ Wc.T + bc)  # (M, C)
    out = xp.empty((X.shape[1], W.shape[0]), dtype=X.dtype)
    for k in range(len(bounds) - 1):
        a, z = bounds[k], bounds[k + 1]
        out[:, a:z] = log_softmax_rows(X.T @ W[a:z].T + b[a:z]) + lc[:, k: k + 1]
    return out


def perplexity(nats_per_token: float) -> float:
    """exp(nats per token), capped at exp(700) so that a diverged loss shows as a huge number
    instead of overflowing (float64 overflows just past exp(709))."""
    return math.exp(min(nats_per_token, 700.0))

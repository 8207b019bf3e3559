"""Stateless forward/backward pieces around the recurrent layers: input lookup, dropout and
the softmax cross-entropy output layer.

Notation as in cells.py; in addition V is the vocabulary size, M = T*N the number of token
positions in a chunk, and a column j = t*N + n of a (D, M) matrix is stream n at step t.
"""

from __future__ import annotations

from .backend import array_module

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
    from .backend import to_device

    keep = rng.random(shape) >= p
    return to_device(keep.astype(dtype) / (1.0 - p), xp)


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
    logits -= logits.max(axis=1, keepdims=True)
    M = targets.shape[0]
    rows = xp.arange(M)
    picked = logits[rows, targets]  # the target's shifted logit, taken before exp can underflow
    xp.exp(logits, out=logits)  # unnormalised probabilities, each row's max is 1
    Z = logits.sum(axis=1)  # (M,), at least 1
    nll = xp.log(Z) - picked
    if weights is None:
        denom = float(M)
        loss = nll.sum() / denom
    else:
        denom = weights.sum()
        # An all-zero mask gives loss 0 rather than 0/0.
        loss = (nll * weights).sum() / xp.where(denom > 0, denom, 1)
    cache = None
    if store:
        logits /= Z[:, None]  # probabilities
        cache = {"P": logits, "X": X, "targets": targets, "weights": weights, "denom": denom, "rows": rows}
    return loss, nll, cache


def softmax_xent_backward(cache, W):
    """Returns dX (D, M), dW (V, D), db (V,) for the loss of :func:`softmax_xent_forward`."""
    xp = array_module(W)
    P, X, targets, weights = cache["P"], cache["X"], cache["targets"], cache["weights"]
    dlogits = P  # reused in place: softmax - onehot, scaled
    dlogits[cache["rows"], targets] -= 1
    if weights is None:
        dlogits /= cache["denom"]
    else:
        denom = cache["denom"]
        dlogits *= (weights / xp.where(denom > 0, denom, 1))[:, None]
    dW = dlogits.T @ X.T
    db = dlogits.sum(axis=0)
    dX = W.T @ dlogits.T
    return dX, dW, db

"""The recurrent layers with compiled gate math: twins of nn/cells.py's reference, float32.

Each time step's elementwise work is one compiled pass (kernels.py) instead of a dozen NumPy
calls, each a sweep over memory with its own call overhead (which dominates small models).
The notation is cells.py's and the caches hold the same arrays, so either backward can follow
either forward. For the LSTM the whole time loop is one compiled call where loops.py can run
(`loops`: NumPy's BLAS found, with the packed products of packed.py where `packed`); the
Python time loops here are the fallback, their per-step products NumPy's.

cpu.CpuOps decides when these run; they accept the cells of FUSED only (tanh RNNs).
"""

from __future__ import annotations

import numpy

from . import kernels, loops
from .threads import in_row_blocks, loop_threads

FUSED = ("rnn", "lstm", "gru")  # the cells with compiled gate kernels (the RNN with tanh only)


def layer_forward(cell, XP, Wh, h0, c0, bhn, store, compiled_loop=False, packed=False):
    """cells.get(cell).forward with compiled gate math; ``compiled_loop``: the LSTM's whole
    loop in one compiled call (loops.lstm_forward_one), its products packed with ``packed``."""
    with loop_threads(2.0 * Wh.size * XP.shape[2]):
        return _layer_forward(cell, XP, Wh, h0, c0, bhn, store, compiled_loop, packed)


def _layer_forward(cell, XP, Wh, h0, c0, bhn, store, compiled_loop, packed):
    if cell == "lstm" and compiled_loop:
        return loops.lstm_forward_one(XP, Wh, h0, c0, store, packed)
    GH, T, N = XP.shape
    H = Wh.shape[1]
    dtype = XP.dtype
    XP = numpy.ascontiguousarray(XP)
    hs = numpy.empty((H, T, N), dtype=dtype)
    S = T if store else 1
    A = numpy.empty((S, GH, N), dtype=dtype)
    h, c = numpy.ascontiguousarray(h0), None if c0 is None else numpy.ascontiguousarray(c0)
    if cell == "lstm":
        # Without store, two cell-state buffers take turns: c_prev and c must not be one
        # buffer, or LLVM's alias check sends the step kernel down its scalar path (3x slower).
        cs = numpy.empty((T if store else 2, H, N), dtype=dtype)
        tcs = numpy.empty((S, H, N), dtype=dtype)
        step = kernels.lstm_step_forward_for(N)
        for t in range(T):
            s = t if store else 0
            ct = cs[t if store else t % 2]
            numpy.matmul(Wh, h, out=A[s])
            step(t, A[s], XP, c, ct, tcs[s], hs)
            h = hs[:, t]
            c = ct
        cache = {"A": A, "hs": hs, "h0": h0, "cs": cs, "tcs": tcs, "c0": c0} if store else None
        return hs, (hs[:, T - 1].copy(), c.copy()), cache
    if cell == "rnn" and compiled_loop and N > 1:
        return loops.rnn_forward_one(XP, Wh, h0, store)
    if cell == "rnn":
        for t in range(T):
            s = t if store else 0
            numpy.matmul(Wh, h, out=A[s])
            kernels.rnn_step_forward(t, A[s], XP, hs)
            h = hs[:, t]
        cache = {"A": A, "hs": hs, "h0": h0, "activation": "tanh"} if store else None
        return hs, (hs[:, T - 1].copy(), None), cache
    if cell != "gru":
        raise ValueError(f"no compiled gate kernels for the cell {cell!r}")
    if compiled_loop and N > 1:
        return loops.gru_forward_one(XP, Wh, h0, bhn, store)
    HN = numpy.empty((S, H, N), dtype=dtype)
    hp = numpy.empty((GH, N), dtype=dtype)
    h_prev = h
    step = kernels.gru_step_forward_for(N)
    for t in range(T):
        s = t if store else 0
        numpy.matmul(Wh, h_prev, out=hp)
        step(t, A[s], hp, XP, bhn, h_prev, HN[s], hs)
        h_prev = hs[:, t]
    cache = {"A": A, "hs": hs, "h0": h0, "HN": HN} if store else None
    return hs, (hs[:, T - 1].copy(), None), cache


def layer_backward(cell, dhs, cache, Wh, defer=None, compiled_loop=False, packed=False):
    """cells.get(cell).backward with compiled gate math: (dXP, dWh, dextra, dh0, dc0). With
    ``defer`` (threads.Deferred.put) dWh's products are handed over as deferred work and dWh
    is complete only once that has run."""
    with loop_threads(2.0 * Wh.size * dhs.shape[2]):
        dXP, dh_next, dc, dHP = _layer_backward_loop(cell, dhs, cache, Wh, compiled_loop, packed)
    return _weight_grads(cell, cache, Wh, dXP, dHP, dh_next, dc, defer)


def _layer_backward_loop(cell, dhs, cache, Wh, compiled_loop, packed):
    A, hs, h0 = cache["A"], cache["hs"], cache["h0"]
    H, T, N = hs.shape
    GH = A.shape[1]
    dtype = hs.dtype
    dhs = numpy.ascontiguousarray(dhs)
    if cell == "lstm" and compiled_loop:
        return loops.lstm_backward_loop_one(dhs, cache, Wh, packed) + (None,)
    # (G*H, T, N): the kernels write each step's column block; it is the layout of the
    # chunk-wide weight-gradient GEMMs, and BLAS takes the strided block dXP[:, t] as it is.
    dXP = numpy.empty((GH, T, N), dtype=dtype)
    dh_next = numpy.zeros((H, N), dtype=dtype)
    WhT = kernels.transposed(Wh)  # a contiguous copy multiplies about 13% faster than the view
    if cell == "lstm":
        cs, tcs, c0 = cache["cs"], cache["tcs"], numpy.ascontiguousarray(cache["c0"])
        dc = numpy.zeros((H, N), dtype=dtype)
        for t in reversed(range(T)):
            c_prev = cs[t - 1] if t > 0 else c0
            kernels.lstm_step_backward(t, A[t], c_prev, tcs[t], dhs, dh_next, dc, dXP)
            numpy.matmul(WhT, dXP[:, t], out=dh_next)
        return dXP, dh_next, dc, None
    if cell == "rnn" and compiled_loop and N > 1:
        return loops.rnn_backward_loop_one(dhs, cache, Wh) + (None, None)
    if cell == "rnn":
        for t in reversed(range(T)):
            kernels.rnn_step_backward(t, hs, dhs, dh_next, dXP)
            numpy.matmul(WhT, dXP[:, t], out=dh_next)
        return dXP, dh_next, None, None
    if compiled_loop and N > 1:
        dXP, dh, dHP = loops.gru_backward_loop_one(dhs, cache, Wh)
        return dXP, dh, None, dHP
    HN = cache["HN"]
    h0c = numpy.ascontiguousarray(h0)
    dHP = numpy.empty((GH, T, N), dtype=dtype)
    tmp = numpy.empty((H, N), dtype=dtype)
    for t in reversed(range(T)):
        h_prev = hs[:, t - 1] if t > 0 else h0c
        kernels.gru_step_backward(t, A[t], HN[t], h_prev, dhs, dh_next, dXP, dHP)
        numpy.matmul(WhT, dHP[:, t], out=tmp)
        dh_next += tmp
    return dXP, dh_next, None, dHP


def _weight_grads(cell, cache, Wh, dXP, dHP, dh_next, dc, defer=None):
    """dWh (and the GRU's dbhn) from the loop's results; with ``defer`` (threads.Deferred.put)
    dWh is returned unfilled and its products are handed over as deferred pieces."""
    hs, h0 = cache["hs"], cache["h0"]
    H, T, N = hs.shape
    GH = dXP.shape[0]
    dextra = {}
    dR = dXP
    if cell == "gru":
        dR = dHP  # the gradient of the recurrent products
        dextra["bhn"] = dR[2 * H:].sum(axis=(1, 2))
    dWh = numpy.empty((GH, H), dtype=dXP.dtype)
    dR2 = dR.reshape(GH, T * N)
    # The state before each step, h0 then hs but its last: one product over all T*N columns
    # (two, the first a rank-N update, and a sum cost 446 against 125 us at H = 256, T = 20,
    # N = 1, dynamic evaluation's segments).
    h_prev = numpy.concatenate([h0, hs.reshape(H, T * N)[:, : (T - 1) * N]], axis=1) if T > 1 else h0

    def rows(r):
        numpy.matmul(dR2[r], h_prev.T, out=dWh[r])

    in_row_blocks(defer, GH, rows, 2.0 * GH * H * T * N)
    return dXP, dWh, dextra, dh_next, dc

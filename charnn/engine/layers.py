"""The recurrent layers with compiled gate math: twins of nn/cells.py's reference, float32.

Each time step's elementwise work is one compiled pass (kernels.py) instead of a dozen NumPy
calls, each a sweep over memory with its own call overhead (which dominates small models).
The notation is cells.py's and the caches hold the same arrays, so either backward can follow
either forward. For the LSTM the whole time loop is one compiled call where loops.py can run
(`loops`: NumPy's BLAS found, with the packed products of packed.py where `packed`); the
Python time loops here are the fallback, their per-step products NumPy's.

cpu.CpuOps decides when these run; they accept the cells of FUSED only (tanh RNNs), the
whole-loop calls those of LOOPED.
"""

from __future__ import annotations

import numpy

from . import kernels, loops
from .threads import in_row_blocks, loop_threads


def layer_forward(cell, XP, Wh, h0, c0, bhn, store, compiled_loop=False, packed=False):
    """cells.get(cell).forward with compiled gate math; ``compiled_loop``: the whole loop in one
    compiled call (a cell of LOOPED: loops.lstm_forward_one), its products packed with ``packed``."""
    with loop_threads(2.0 * Wh.size * XP.shape[2]):
        if compiled_loop and cell in LOOPED:
            return loops.lstm_forward_one(XP, Wh, h0, c0, store, packed)
        if cell not in FORWARD:
            raise ValueError(f"no compiled gate kernels for the cell {cell!r}")
        return FORWARD[cell](numpy.ascontiguousarray(XP), Wh, h0, c0, bhn, store)


def _lstm_forward(XP, Wh, h0, c0, bhn, store):
    GH, T, N = XP.shape
    H = Wh.shape[1]
    S = T if store else 1
    hs = numpy.empty((H, T, N), dtype=XP.dtype)
    A = numpy.empty((S, GH, N), dtype=XP.dtype)
    h, c = numpy.ascontiguousarray(h0), numpy.ascontiguousarray(c0)
    # Without store, two cell-state buffers take turns: c_prev and c must not be one
    # buffer, or LLVM's alias check sends the step kernel down its scalar path (3x slower).
    cs = numpy.empty((T if store else 2, H, N), dtype=XP.dtype)
    tcs = numpy.empty((S, H, N), dtype=XP.dtype)
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


def _rnn_forward(XP, Wh, h0, c0, bhn, store):
    GH, T, N = XP.shape
    H = Wh.shape[1]
    S = T if store else 1
    hs = numpy.empty((H, T, N), dtype=XP.dtype)
    A = numpy.empty((S, GH, N), dtype=XP.dtype)
    h = numpy.ascontiguousarray(h0)
    for t in range(T):
        s = t if store else 0
        numpy.matmul(Wh, h, out=A[s])
        kernels.rnn_step_forward(t, A[s], XP, hs)
        h = hs[:, t]
    cache = {"A": A, "hs": hs, "h0": h0, "activation": "tanh"} if store else None
    return hs, (hs[:, T - 1].copy(), None), cache


def _gru_forward(XP, Wh, h0, c0, bhn, store):
    GH, T, N = XP.shape
    H = Wh.shape[1]
    S = T if store else 1
    hs = numpy.empty((H, T, N), dtype=XP.dtype)
    A = numpy.empty((S, GH, N), dtype=XP.dtype)
    HN = numpy.empty((S, H, N), dtype=XP.dtype)
    hp = numpy.empty((GH, N), dtype=XP.dtype)
    h_prev = numpy.ascontiguousarray(h0)
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
        dhs = numpy.ascontiguousarray(dhs)
        if compiled_loop and cell in LOOPED:
            dXP, dh_next, dc = loops.lstm_backward_loop_one(dhs, cache, Wh, packed)
            dHP = None
        else:
            A, hs = cache["A"], cache["hs"]
            H, T, N = hs.shape
            # (G*H, T, N): the kernels write each step's column block; it is the layout of the
            # chunk-wide weight-gradient GEMMs, and BLAS takes the strided block dXP[:, t] as it is.
            dXP = numpy.empty((A.shape[1], T, N), dtype=hs.dtype)
            dh_next = numpy.zeros((H, N), dtype=hs.dtype)
            WhT = kernels.transposed(Wh)  # a contiguous copy multiplies about 13% faster than the view
            dc, dHP = BACKWARD[cell](dhs, cache, WhT, dXP, dh_next)
    return _weight_grads(cache, Wh, dXP, dHP, dh_next, dc, defer)


def _lstm_backward(dhs, cache, WhT, dXP, dh_next):
    """The loop of an LSTM layer's backward: fills dXP and dh_next; returns (dc0, None)."""
    A, cs, tcs, c0 = cache["A"], cache["cs"], cache["tcs"], numpy.ascontiguousarray(cache["c0"])
    dc = numpy.zeros_like(dh_next)
    for t in reversed(range(dXP.shape[1])):
        c_prev = cs[t - 1] if t > 0 else c0
        kernels.lstm_step_backward(t, A[t], c_prev, tcs[t], dhs, dh_next, dc, dXP)
        numpy.matmul(WhT, dXP[:, t], out=dh_next)
    return dc, None


def _rnn_backward(dhs, cache, WhT, dXP, dh_next):
    """The loop of a (tanh) RNN layer's backward: returns (None, None)."""
    hs = cache["hs"]
    for t in reversed(range(dXP.shape[1])):
        kernels.rnn_step_backward(t, hs, dhs, dh_next, dXP)
        numpy.matmul(WhT, dXP[:, t], out=dh_next)
    return None, None


def _gru_backward(dhs, cache, WhT, dXP, dh_next):
    """The loop of a GRU layer's backward: returns (None, dHP), the gradient of the hidden
    products, which the reset gate keeps apart from the input's."""
    A, hs, HN = cache["A"], cache["hs"], cache["HN"]
    h0c = numpy.ascontiguousarray(cache["h0"])
    dHP = numpy.empty_like(dXP)
    tmp = numpy.empty_like(dh_next)
    for t in reversed(range(dXP.shape[1])):
        h_prev = hs[:, t - 1] if t > 0 else h0c
        kernels.gru_step_backward(t, A[t], HN[t], h_prev, dhs, dh_next, dXP, dHP)
        numpy.matmul(WhT, dHP[:, t], out=tmp)
        dh_next += tmp
    return None, dHP


def _weight_grads(cache, Wh, dXP, dHP, dh_next, dc, defer=None):
    """dWh (and the GRU's dbhn, where the loop kept the hidden products' gradient dHP apart)
    from the loop's results; with ``defer`` (threads.Deferred.put) dWh is returned unfilled and
    its products are handed over as deferred pieces."""
    hs, h0 = cache["hs"], cache["h0"]
    H, T, N = hs.shape
    GH = dXP.shape[0]
    dextra = {}
    dR = dXP
    if dHP is not None:
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


# The engine's gate kernels by registry name (nn/cells.py): the one table of the cells the engine
# has twins for (the RNN with tanh only), which cpu.CpuOps and sampling's FastStepper ask.
FORWARD = {"rnn": _rnn_forward, "lstm": _lstm_forward, "gru": _gru_forward}
BACKWARD = {"rnn": _rnn_backward, "lstm": _lstm_backward, "gru": _gru_backward}
FUSED = tuple(FORWARD)
LOOPED = ("lstm",)  # the cells whose whole time loop is one compiled call (loops.py)

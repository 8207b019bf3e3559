"""An LSTM layer's time loop shared by two cores by hidden units ("row split"), float32.

The batch split (parallel.split_columns) gives each core half of the streams and
the whole recurrent matrix: every step, each core multiplies all G*H rows of Wh by N/2
columns. OpenBLAS repacks Wh at every call, so a product with few columns costs nearly as much
as one with twice as many: (800x200)@(200x10) took 83 us, (400x200)@(200x20) 49 us on one
core. Here each core takes half of the hidden units instead, the gate rows of those units and
all N streams; after each step the two cores meet, since the next step's product needs both
halves of h. The meeting is a spin on two shared counters (atomic loads and stores, a
sched_yield after a short spin), and each core's whole time loop runs in one compiled call
that calls the BLAS itself, so the GIL is not taken once per step. Measured on the forward
loop alone (2 cores): H=200, N=20, T=35 2.95 ms against 4.6 with the batch split; whole
training steps in benchmarks/README.md.

The step kernels are kernels.py's, run on a "sub-layer" of H/2 units: the gate rows are
permuted so that each core's rows (its units' i, f, g, o) are one contiguous block, so the
results are those of the one-core loop (the forward bit for bit here; the backward's
products sum in another order). The same compiled loops also run a whole layer on one core
(``solo``; lstm_forward_one and lstm_backward_loop_one), which layers.py uses for every
float32 LSTM: no Python and no GIL per time step there either.

Each step's product is packed.py's where it runs (AVX-512; Wh packed once per call of a
loop, and the step's operand read from a contiguous buffer, hbuf or dbuf, on one core too),
else OpenBLAS's sgemm. With packed products both splits measured alike again for (b) and (d),
and the row split slower for (a) (benchmarks/README.md); the rule below is unchanged.

Used when numba is present and NumPy's BLAS exposes a CBLAS sgemm charnn can find and check
(OpenBLAS as NumPy's wheels ship it); otherwise layers.py's Python loops run. The settings'
``rowsplit`` (CHARNN_ROWSPLIT=0) turns both off (cpu.CpuOps.compiled_loop), ``packed`` the
packed products. parallel.use_row_split picks the row split for LSTMs with an even hidden
size, two threads allowed and thin half batches.
"""

from __future__ import annotations

import numpy

from . import kernels, packed
from .cblas import find_blas
from .threads import in_worker, run_in_two

def compiled_loops() -> bool:
    """Whether the compiled one-core LSTM loops (lstm_forward_one and friends) can run here."""
    return bool(find_blas())


def usable(H: int) -> bool:
    """Whether an LSTM layer of H units can run row split here (not from the worker thread,
    whose two halves would run one after the other and wait forever); the caller checks that
    two threads and the compiled kernels are allowed."""
    return H % 2 == 0 and H >= 16 and bool(find_blas()) and not in_worker()


if kernels.available:
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    jit = kernels.jit

    @intrinsic
    def _load(typingctx, arr, idx):
        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
            return builder.load_atomic(ptr, ordering="acquire", align=8)
        return types.int64(arr, idx), codegen

    @intrinsic
    def _store(typingctx, arr, idx, val):
        def codegen(context, builder, sig, args):
            ary = context.make_array(sig.args[0])(context, builder, args[0])
            ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, [args[1]])
            builder.store_atomic(args[2], ptr, ordering="release", align=8)
            return context.get_dummy_value()
        return types.void(arr, idx, val), codegen

    @jit
    def _meet(flags, k, target, yld):
        """Core k has finished step ``target``; wait until the other has too. flags[2] != 0
        means the other thread failed: returns False then."""
        _store(flags, k, target)
        spins = 0
        while _load(flags, 1 - k) < target:
            if _load(flags, 2) != 0:
                return False
            spins += 1
            if spins > 4000:  # a few microseconds; then let a thread that shares this core run
                yld()
        return True

    @jit
    def _gemm(sgemm, mm, A, Ap, B, ldb, C):
        """C (M, N) = A (M, K) @ B, B (K, N) with row stride ldb (row-major, C-contiguous A
        and C): by mm on Ap, A packed for it (packed.py), or where Ap is empty by the BLAS."""
        M, K = A.shape
        N = C.shape[1]
        if Ap.size:
            mm(Ap.ctypes.data, B.ctypes.data, ldb, C.ctypes.data, N)
        else:
            sgemm(101, 111, 111, M, N, K, F1, A.ctypes.data, K, B.ctypes.data, ldb, F0, C.ctypes.data, N)

    F1, F0 = numpy.float32(1.0), numpy.float32(0.0)

    @jit
    def _copy_step(src, t, dst):
        """dst (R, N) = src[:, t] for src (R, T, N)."""
        R, N = dst.shape
        for r in range(R):
            for n in range(N):
                dst[r, n] = src[r, t, n]

    @jit
    def lstm_rows_forward(k, sgemm, mm, yld, flags, Wk, Wkp, h0, XPk, Ak, c0k, csk, tcsk, hsk, hbuf, flat, store, solo):
        """Core k's part of the forward loop: its gate rows Wk (4*H2, H) of the permuted Wh,
        its input projections XPk (4*H2, T, N); writes Ak (gate values), csk, tcsk and hsk,
        its rows of hs (H, T, N). Without store, Ak holds one step and csk two that take
        turns (kernels.py explains why not one). Each step's h also goes to hbuf[t % 2]
        (2, H, N), which the next step's product reads: reading hs[:, t] instead, whose cache
        lines hold the other core's next writes too, cost about 20 us per step. ``solo``:
        the whole layer on this core (k = 0, Wk all of Wh), no partner; there the BLAS reads
        hs[:, t] itself (it copies its operand anyway), while the packed product reads hbuf:
        its (H, N) rows T*N apart in hs cost a TLB miss each, on every panel."""
        T, N = hsk.shape[1], hsk.shape[2]
        H2 = hsk.shape[0]
        direct = solo and Wkp.size == 0
        for t in range(T):
            s = t if store else 0
            ct = csk[t] if store else csk[t % 2]
            if t == 0:
                _gemm(sgemm, mm, Wk, Wkp, h0, h0.shape[1], Ak[s])
                c = c0k
            elif direct:
                _gemm(sgemm, mm, Wk, Wkp, hsk[:, t - 1], T * N, Ak[s])
                c = csk[t - 1] if store else csk[(t - 1) % 2]
            else:
                _gemm(sgemm, mm, Wk, Wkp, hbuf[(t - 1) % 2], N, Ak[s])
                c = csk[t - 1] if store else csk[(t - 1) % 2]
            if flat:
                kernels.lstm_step_forward_flat(t, Ak[s], XPk, c, ct, tcsk[s], hsk)
            else:
                kernels.lstm_step_forward(t, Ak[s], XPk, c, ct, tcsk[s], hsk)
            if direct:
                continue
            _copy_step(hsk, t, hbuf[t % 2, k * H2:(k + 1) * H2])
            if not solo and not _meet(flags, k, t + 1, yld):
                return False
        return True

    @jit
    def lstm_rows_backward(k, sgemm, mm, yld, flags, WhTk, WhTkp, Ak, csk, c0k, tcsk, dhsk, dhk, dck, dXPk, dbuf, solo):
        """Core k's part of the backward loop: dhk, dck (H2, N) its rows of dL/dh and dL/dc
        carried back (zeros in, dL/dh0 and dL/dc0 out); writes dXPk, its rows of the
        permuted dXP (G*H, T, N), and the same step's rows of dbuf[t % 2] (2, G*H, N), which
        both cores' products read once both have written their rows. ``solo``: the whole
        layer on this core (WhTk all of Wh^T); dbuf as hbuf in the forward loop."""
        T, N = dXPk.shape[1], dXPk.shape[2]
        R = dXPk.shape[0]
        direct = solo and WhTkp.size == 0
        for t in range(T - 1, -1, -1):
            c_prev = csk[t - 1] if t > 0 else c0k
            kernels.lstm_step_backward(t, Ak[t], c_prev, tcsk[t], dhsk, dhk, dck, dXPk)
            if direct:
                _gemm(sgemm, mm, WhTk, WhTkp, dXPk[:, t], T * N, dhk)
                continue
            _copy_step(dXPk, t, dbuf[t % 2, k * R:(k + 1) * R])
            if not solo and not _meet(flags, k, T - t, yld):
                return False
            _gemm(sgemm, mm, WhTk, WhTkp, dbuf[t % 2], N, dhk)
        return True


    @jit
    def rnn_loop_forward(sgemm, Wh, h0, XP, A, hs, store):
        """A tanh RNN layer's forward loop on one core (layers.py's, compiled): each step's
        product by the BLAS's sgemm with the arguments NumPy's matmul gives it there (the
        previous state read where it lies in hs, T*N apart), then kernels.rnn_step_forward.
        A (S, H, N) holds the products (all T of them with ``store``)."""
        T, N = hs.shape[1], hs.shape[2]
        for t in range(T):
            s = t if store else 0
            if t == 0:
                _gemm(sgemm, _NO_MM, Wh, _NO_PACK, h0, h0.shape[1], A[s])
            else:
                _gemm(sgemm, _NO_MM, Wh, _NO_PACK, hs[:, t - 1], T * N, A[s])
            kernels.rnn_step_forward(t, A[s], XP, hs)

    @jit
    def rnn_loop_backward(sgemm, WhT, hs, dhs, dh, dXP):
        """The backward loop of rnn_loop_forward (layers.py's, compiled): dh (H, N) carries
        dL/dh back (zeros in, dL/dh0 out); writes dXP (H, T, N)."""
        T, N = hs.shape[1], hs.shape[2]
        for t in range(T - 1, -1, -1):
            kernels.rnn_step_backward(t, hs, dhs, dh, dXP)
            _gemm(sgemm, _NO_MM, WhT, _NO_PACK, dXP[:, t], T * N, dh)


    @jit
    def gru_loop_forward(sgemm, Wh, h0, XP, bhn, A, hp, HN, hs, store, flat):
        """A GRU layer's forward loop on one core (layers.py's, compiled): each step's product
        hp = Wh @ h_prev by sgemm as NumPy's matmul calls it, then the step kernel (the flat
        one with ``flat``), each called with the state's layout the Python loop gives it
        (h0 contiguous, then a column block of hs)."""
        T, N = hs.shape[1], hs.shape[2]
        for t in range(T):
            s = t if store else 0
            if t == 0:
                _gemm(sgemm, _NO_MM, Wh, _NO_PACK, h0, h0.shape[1], hp)
                if flat:
                    kernels.gru_step_forward_flat(t, A[s], hp, XP, bhn, h0, HN[s], hs)
                else:
                    kernels.gru_step_forward(t, A[s], hp, XP, bhn, h0, HN[s], hs)
            else:
                h_prev = hs[:, t - 1]
                _gemm(sgemm, _NO_MM, Wh, _NO_PACK, h_prev, T * N, hp)
                if flat:
                    kernels.gru_step_forward_flat(t, A[s], hp, XP, bhn, h_prev, HN[s], hs)
                else:
                    kernels.gru_step_forward(t, A[s], hp, XP, bhn, h_prev, HN[s], hs)

    @jit
    def gru_loop_backward(sgemm, WhT, A, HN, hs, h0, dhs, dh, dXP, dHP, tmp):
        """The backward loop of gru_loop_forward (layers.py's, compiled): dh (H, N) carries
        dL/dh back (zeros in, dL/dh0 out); writes dXP and dHP (3H, T, N)."""
        T, N = hs.shape[1], hs.shape[2]
        H = hs.shape[0]
        for t in range(T - 1, -1, -1):
            if t > 0:
                kernels.gru_step_backward(t, A[t], HN[t], hs[:, t - 1], dhs, dh, dXP, dHP)
            else:
                kernels.gru_step_backward(t, A[t], HN[t], h0, dhs, dh, dXP, dHP)
            _gemm(sgemm, _NO_MM, WhT, _NO_PACK, dHP[:, t], T * N, tmp)
            for j in range(H):
                for n in range(N):
                    dh[j, n] += tmp[j, n]


def gru_forward_one(XP, Wh, h0, bhn, store=True):
    """layers.layer_forward for a GRU of N >= 2 streams, its time loop one compiled call (as
    :func:`rnn_forward_one`: the same results bit for bit)."""
    sgemm, _ = find_blas()
    GH, T, N = XP.shape
    H = GH // 3
    dtype = XP.dtype
    XP = numpy.ascontiguousarray(XP)
    S = T if store else 1
    hs = numpy.empty((H, T, N), dtype=dtype)
    A = numpy.empty((S, GH, N), dtype=dtype)
    HN = numpy.empty((S, H, N), dtype=dtype)
    hp = numpy.empty((GH, N), dtype=dtype)
    gru_loop_forward(sgemm, numpy.ascontiguousarray(Wh), numpy.ascontiguousarray(h0), XP, bhn, A, hp, HN, hs, store,
                     N % 32 != 0)
    cache = {"A": A, "hs": hs, "h0": h0, "HN": HN} if store else None
    return hs, (hs[:, T - 1].copy(), None), cache


def gru_backward_loop_one(dhs, cache, Wh):
    """layers.layer_backward's loop for a GRU's cache: (dXP, dh0, dHP)."""
    sgemm, _ = find_blas()
    A, hs, HN = cache["A"], cache["hs"], cache["HN"]
    H, T, N = hs.shape
    GH = A.shape[1]
    dXP = numpy.empty((GH, T, N), dtype=hs.dtype)
    dHP = numpy.empty((GH, T, N), dtype=hs.dtype)
    dh = numpy.zeros((H, N), dtype=hs.dtype)
    tmp = numpy.empty((H, N), dtype=hs.dtype)
    gru_loop_backward(sgemm, kernels.transposed(Wh), A, HN, hs, numpy.ascontiguousarray(cache["h0"]),
                      numpy.ascontiguousarray(dhs), dh, dXP, dHP, tmp)
    return dXP, dh, dHP


def rnn_forward_one(XP, Wh, h0, bhn=None, store=True):
    """layers.layer_forward for a tanh RNN of N >= 2 streams, its time loop one compiled call
    (the same products and kernels as layers.py's Python loop: the same results bit for bit;
    for one stream NumPy's matmul calls sgemv instead, whose sums round otherwise)."""
    sgemm, _ = find_blas()
    H, T, N = XP.shape
    XP = numpy.ascontiguousarray(XP)
    hs = numpy.empty((H, T, N), dtype=XP.dtype)
    A = numpy.empty((T if store else 1, H, N), dtype=XP.dtype)
    rnn_loop_forward(sgemm, numpy.ascontiguousarray(Wh), numpy.ascontiguousarray(h0), XP, A, hs, store)
    cache = {"A": A, "hs": hs, "h0": h0, "activation": "tanh"} if store else None
    return hs, (hs[:, T - 1].copy(), None), cache


def rnn_backward_loop_one(dhs, cache, Wh):
    """layers.layer_backward's loop for a cache of :func:`rnn_forward_one`: (dXP, dh0, None)."""
    sgemm, _ = find_blas()
    hs = cache["hs"]
    H, T, N = hs.shape
    dXP = numpy.empty((H, T, N), dtype=hs.dtype)
    dh = numpy.zeros((H, N), dtype=hs.dtype)
    rnn_loop_backward(sgemm, kernels.transposed(Wh), hs, numpy.ascontiguousarray(dhs), dh, dXP)
    return dXP, dh, None


def _packed_for(W, N: int, use_packed: bool):
    """(product, W packed) for the loops' products W @ (K, N) where packed.py can do them and
    ``use_packed`` allows, else (a stand-in never called, an empty array): the loops then call
    the BLAS."""
    if use_packed and packed.usable(N):
        return packed.product(W.shape[0], W.shape[1], N), packed.packed(W, N)
    return _NO_MM, _NO_PACK


class _Failed(RuntimeError):
    """The other core's half of a loop stopped early (its own error is the one raised)."""


def _perm(H: int, G: int = 4):
    """Row order of the permuted layer: core 0's units' gate rows, then core 1's."""
    H2 = H // 2
    return numpy.concatenate([numpy.arange(g * H + k * H2, g * H + (k + 1) * H2) for k in (0, 1) for g in range(G)])


def _in_two(work, flags):
    """work(0) here and work(1) in charnn's worker thread, at once. work returns False when
    its loop saw the other side fail; an exception on either side sets flags[2], which stops
    the other side's waiting, and is raised here once both have returned."""

    def guarded(k):
        try:
            if not work(k):
                raise _Failed("the other half of the loop failed")
            return None
        except BaseException as e:  # noqa: BLE001 - handed back to the caller below
            flags[2] = 1
            return e

    errors = [e for e in run_in_two(guarded, 0, 1) if e is not None]
    if errors:
        raise next((e for e in errors if not isinstance(e, _Failed)), errors[0])


def lstm_forward(XP, Wh, h0, c0, store=True, use_packed=True):
    """layers.layer_forward for an LSTM, row split (same arguments, results and cache
    contents, plus what backward needs of the split)."""
    sgemm, yld = find_blas()
    GH, T, N = XP.shape
    H = GH // 4
    H2 = H // 2
    perm = _perm(H)
    S = T if store else 1
    dtype = XP.dtype
    hs = numpy.empty((H, T, N), dtype=dtype)
    h0 = numpy.ascontiguousarray(h0)
    c0 = numpy.ascontiguousarray(c0)
    A = [numpy.empty((S, 2 * H, N), dtype=dtype) for _ in (0, 1)]
    cs = [numpy.empty((T if store else 2, H2, N), dtype=dtype) for _ in (0, 1)]
    tcs = [numpy.empty((S, H2, N), dtype=dtype) for _ in (0, 1)]
    hbuf = numpy.empty((2, H, N), dtype=dtype)
    flags = numpy.zeros(3, dtype=numpy.int64)
    flat = N % 16 != 0

    def work(k):
        rows = perm[k * 2 * H:(k + 1) * 2 * H]
        Wk = Wh[rows]  # fancy indexing: a contiguous copy
        XPk = numpy.concatenate([XP[g * H + k * H2:g * H + (k + 1) * H2] for g in range(4)])
        mm, Wkp = _packed_for(Wk, N, use_packed)
        return lstm_rows_forward(k, sgemm, mm, yld, flags, Wk, Wkp, h0, XPk, A[k], c0[k * H2:(k + 1) * H2], cs[k], tcs[k],
                                 hs[k * H2:(k + 1) * H2], hbuf, flat, store, False)

    _in_two(work, flags)
    last = T - 1 if store else (T - 1) % 2
    c = numpy.concatenate([cs[0][last], cs[1][last]])
    cache = None
    if store:
        cache = {"rows": True, "A": A, "cs": cs, "tcs": tcs, "hs": hs, "h0": h0, "c0": c0}
    return hs, (hs[:, T - 1].copy(), c), cache


def lstm_backward(dhs, cache, Wh, use_packed=True):
    """layers.layer_backward for a cache of :func:`lstm_forward` (same results)."""
    sgemm, yld = find_blas()
    hs, h0 = cache["hs"], cache["h0"]
    H, T, N = hs.shape
    H2 = H // 2
    GH = 4 * H
    perm = _perm(H)
    dtype = hs.dtype
    dhs = numpy.ascontiguousarray(dhs)
    dXPp = numpy.empty((GH, T, N), dtype=dtype)
    dXP = numpy.empty((GH, T, N), dtype=dtype)
    dWh = numpy.empty((GH, H), dtype=dtype)
    dh0 = numpy.zeros((H, N), dtype=dtype)
    dc0 = numpy.zeros((H, N), dtype=dtype)
    dbuf = numpy.empty((2, GH, N), dtype=dtype)
    flags = numpy.zeros(3, dtype=numpy.int64)
    c0 = cache["c0"]
    hs_prev = hs.reshape(H, T * N)[:, : (T - 1) * N].T

    def work(k):
        units = slice(k * H2, (k + 1) * H2)
        WhTk = Wh[perm, units].T  # (H2, GH): its units' rows of Wh^T, permuted columns
        dXPk = dXPp[k * 2 * H:(k + 1) * 2 * H]
        mm, WhTkp = _packed_for(WhTk, N, use_packed)
        WhTk = numpy.ascontiguousarray(WhTk) if WhTkp.size == 0 else _NO_MATRIX
        if not lstm_rows_backward(k, sgemm, mm, yld, flags, WhTk, WhTkp, cache["A"][k], cache["cs"][k], c0[units],
                                  cache["tcs"][k], dhs[units], dh0[units], dc0[units], dXPk, dbuf, False):
            return False
        # Its part of the recurrent weight gradient, dWh = dXP[:, 0] @ h0^T + dXP[:, 1:] @
        # hs[:, :-1]^T, in its permuted row order, then its rows of dXP and dWh back in the
        # canonical order (one block per gate).
        R = 2 * H
        dWk = numpy.matmul(dXPk[:, 0], h0.T)
        if T > 1:
            dWk += dXPk.reshape(R, T * N)[:, N:] @ hs_prev
        for g in range(4):
            rows = slice(g * H + k * H2, g * H + (k + 1) * H2)
            dXP[rows] = dXPk[g * H2:(g + 1) * H2]
            dWh[rows] = dWk[g * H2:(g + 1) * H2]
        return True

    _in_two(work, flags)
    return dXP, dWh, {}, dh0, dc0


def lstm_forward_one(XP, Wh, h0, c0, store=True, use_packed=True):
    """layers.layer_forward for an LSTM on one core, its time loop one compiled call (the
    product at each step from within it: no Python, no GIL per step)."""
    sgemm, yld = find_blas()
    GH, T, N = XP.shape
    H = GH // 4
    dtype = XP.dtype
    XP = numpy.ascontiguousarray(XP)
    S = T if store else 1
    hs = numpy.empty((H, T, N), dtype=dtype)
    A = numpy.empty((S, GH, N), dtype=dtype)
    cs = numpy.empty((T if store else 2, H, N), dtype=dtype)
    tcs = numpy.empty((S, H, N), dtype=dtype)
    h0c, c0c = numpy.ascontiguousarray(h0), numpy.ascontiguousarray(c0)
    Wh = numpy.ascontiguousarray(Wh)
    mm, Whp = _packed_for(Wh, N, use_packed)
    hbuf = numpy.empty((2, H, N), dtype=dtype) if Whp.size else _NO_BUF
    lstm_rows_forward(0, sgemm, mm, yld, _NO_FLAGS, Wh, Whp, h0c, XP, A, c0c, cs, tcs, hs, hbuf,
                      N % 16 != 0, store, True)
    c = cs[T - 1 if store else (T - 1) % 2].copy()
    cache = {"A": A, "hs": hs, "h0": h0, "cs": cs, "tcs": tcs, "c0": c0} if store else None
    return hs, (hs[:, T - 1].copy(), c), cache


def lstm_backward_loop_one(dhs, cache, Wh, use_packed=True):
    """layers._layer_backward_loop for an LSTM on one core, one compiled call: (dXP, dh0, dc0)."""
    sgemm, yld = find_blas()
    A, hs, cs, tcs = cache["A"], cache["hs"], cache["cs"], cache["tcs"]
    H, T, N = hs.shape
    dtype = hs.dtype
    dXP = numpy.empty((A.shape[1], T, N), dtype=dtype)
    dh = numpy.zeros((H, N), dtype=dtype)
    dc = numpy.zeros((H, N), dtype=dtype)
    # Packed straight from the view Wh.T; the BLAS gets a contiguous copy (about 13% faster).
    mm, WhTp = _packed_for(Wh.T, N, use_packed)
    WhT = kernels.transposed(Wh) if WhTp.size == 0 else _NO_MATRIX
    dbuf = numpy.empty((2, A.shape[1], N), dtype=dtype) if WhTp.size else _NO_BUF
    lstm_rows_backward(0, sgemm, mm, yld, _NO_FLAGS, WhT, WhTp, A, cs, numpy.ascontiguousarray(cache["c0"]), tcs,
                       numpy.ascontiguousarray(dhs), dh, dc, dXP, dbuf, True)
    return dXP, dh, dc


# Stand-ins for the arguments a solo loop never touches (the loops' signatures are shared).
_NO_FLAGS = numpy.zeros(3, dtype=numpy.int64)
_NO_BUF = numpy.zeros((2, 1, 1), dtype=numpy.float32)
_NO_PACK = numpy.zeros(0, dtype=numpy.float32)
_NO_MATRIX = numpy.zeros((1, 1), dtype=numpy.float32)
_NO_MM = packed.SIGNATURE(lambda *args: None)

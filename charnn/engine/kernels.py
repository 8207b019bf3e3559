"""Compiled CPU kernels (numba), float32: the engine's elementwise passes.

nn/cells.py holds the reference of every layer; the step kernels here do one time step's gate
math of an RNN, LSTM or GRU in one compiled pass instead of a dozen NumPy calls (each a
separate sweep over memory with its own call overhead, which dominates small models), in
cells.py's notation. layers.py runs them in time loops; loops.py compiles whole LSTM time
loops around them. Beside them: the one-hot input projection and its gradient's scatter,
Adam's update, sampling's scaled draw, and the output layer's passes (heads.py runs those).

Numerics: a compiled loop calling libm's tanh per element is slower than NumPy's vectorised
tanh, so these kernels use a rational approximation, tanh(x) ~ x P(x²) / Q(x²) on |x| <= 9
(clamped to ±1 beyond, where float32 tanh rounds to ±1 anyway), fitted by
benchmarks/fit_tanh.py: max error 2e-8 in exact arithmetic, about 3.6e-7 (3 ulp) evaluated in
float32. That is right for float32 training and wrong for float64 gradient checks, so the
engine (cpu.py) uses them for float32 NumPy arrays only; float64 always runs the reference.

The output layer's passes (the full softmax cross-entropy's, the class-factored head's and
sampling's scaled draw) live in head_kernels.py and are re-exported here.

Whether they run is the engine's choice (cpu.CpuOps.fused, from settings.py; CHARNN_KERNELS=numpy
turns them off); this module only says whether numba is here (``available``).
"""

from __future__ import annotations

import numpy

try:
    import numba

    available = True
except ImportError:  # numba is a dependency, but the plain path must work without it
    numba = None
    available = False

F = numpy.float32
# tanh(x) ~ x * P(x^2) / Q(x^2), |x| <= 9 (see the module docstring).
P0, P1, P2, P3, P4 = F(0.9999999794124377), F(0.13381036211073452), F(0.003495601358196784), F(2.0609327570862957e-05), F(1.3355048880306435e-08)
Q1, Q2, Q3, Q4 = F(0.4671435179101006), F(0.02587703075773743), F(0.0003285657655929101), F(7.776707121887352e-07)
CLAMP = F(9.0)
TILE = 16  # transpose_rows's square tiles
ONE, HALF = F(1.0), F(0.5)


if available:
    jit = numba.njit(cache=True, fastmath=True, nogil=True, error_model="numpy", boundscheck=False)

    @jit
    def _tanh(x):
        x = min(max(x, -CLAMP), CLAMP)
        u = x * x
        p = (((P4 * u + P3) * u + P2) * u + P1) * u + P0
        q = (((Q4 * u + Q3) * u + Q2) * u + Q1) * u + ONE
        return x * p / q

    @jit
    def _sigmoid(x):
        return HALF + HALF * _tanh(HALF * x)

    @jit
    def lstm_step_forward(t, a, XP, c_prev, c, tc, hs):
        """a (4H, N): Wh @ h_prev in, gate values out; XP (4H, T, N); writes c, tc (H, N)
        and hs[:, t]. The rows of XP[:, t] and hs[:, t] lie T*N apart, so the loop asks for
        those of unit j + AHEAD_FORWARD itself (as lstm_step_backward does): 127-133 -> 93-104
        us per step at H = 512, N = 32, T = 100; no change at H = 128, N = 16."""
        H, N = c.shape
        for j in range(H):
            if j + AHEAD_FORWARD < H:
                for n0 in range(0, N, 16):
                    for q in range(4):
                        _prefetch_read(XP, q * H + j + AHEAD_FORWARD, t, n0)
                    _prefetch_write(hs, j + AHEAD_FORWARD, t, n0)
            for n in range(N):
                i = _sigmoid(a[j, n] + XP[j, t, n])
                f = _sigmoid(a[H + j, n] + XP[H + j, t, n])
                g = _tanh(a[2 * H + j, n] + XP[2 * H + j, t, n])
                o = _sigmoid(a[3 * H + j, n] + XP[3 * H + j, t, n])
                a[j, n] = i
                a[H + j, n] = f
                a[2 * H + j, n] = g
                a[3 * H + j, n] = o
                cc = f * c_prev[j, n] + i * g
                c[j, n] = cc
                th = _tanh(cc)
                tc[j, n] = th
                hs[j, t, n] = o * th

    @jit
    def lstm_step_forward_flat(t, a, XP, c_prev, c, tc, hs):
        """lstm_step_forward for any N: the gate math runs over each gate's (H, N) block as
        one flat run of H*N elements, so LLVM vectorises it whatever N is (the loop over n
        above only vectorises for N a multiple of the vector width: at N = 10 this version
        took 20 us per step against 60, at N = 1, sampling, 16 against 24). The sum with XP
        and the copy into hs, whose rows are strided, are separate simple passes."""
        G, N = a.shape
        H = G // 4
        HN = H * N
        af = a.reshape(G * N)
        if XP.shape[1] == 1:  # one step (sampling): XP[:, 0] is contiguous, one flat run too
            xf = XP.reshape(G * N)
            for k in range(G * N):
                af[k] += xf[k]
        else:
            for j in range(G):
                for n in range(N):
                    a[j, n] += XP[j, t, n]
        cp, cf, tf = c_prev.reshape(HN), c.reshape(HN), tc.reshape(HN)
        for k in range(HN):
            i = _sigmoid(af[k])
            f = _sigmoid(af[HN + k])
            g = _tanh(af[2 * HN + k])
            o = _sigmoid(af[3 * HN + k])
            af[k] = i
            af[HN + k] = f
            af[2 * HN + k] = g
            af[3 * HN + k] = o
            cc = f * cp[k] + i * g
            cf[k] = cc
            tf[k] = _tanh(cc)
        if hs.shape[1] == 1:
            hf = hs.reshape(HN)
            for k in range(HN):
                hf[k] = af[3 * HN + k] * tf[k]
        else:
            for j in range(H):
                for n in range(N):
                    hs[j, t, n] = a[3 * H + j, n] * tc[j, n]

    def lstm_step_forward_for(N: int):
        """The LSTM step kernel for N streams: the column loop where N is a multiple of 16
        (there it measured as fast, or 10-15% faster at N = 64), else the flat one."""
        return lstm_step_forward if N % 16 == 0 else lstm_step_forward_flat

    def _prefetcher(write: int):
        """An intrinsic prefetch(arr, i, j, k) of the cache line holding arr[i, j, k] (a 3-D
        array), for reading (write=0) or writing (write=1): LLVM's llvm.prefetch."""
        from llvmlite import ir
        from numba.core import cgutils, types
        from numba.extending import intrinsic

        @intrinsic
        def prefetch(typingctx, arr, i, j, k):
            def codegen(context, builder, sig, args):
                ary = context.make_array(sig.args[0])(context, builder, args[0])
                ptr = cgutils.get_item_pointer(context, builder, sig.args[0], ary, list(args[1:]), wraparound=False)
                i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
                fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                    "llvm.prefetch.p0")
                builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, write), ir.Constant(i32, 3), ir.Constant(i32, 1)])
                return context.get_dummy_value()
            return types.void(arr, i, j, k), codegen

        return prefetch

    _prefetch_read, _prefetch_write = _prefetcher(0), _prefetcher(1)
    AHEAD = 4  # rows
    AHEAD_FORWARD = 8  # units

    @jit
    def lstm_step_backward(t, a, c_prev, tc, dhs, dh_next, dc, dXP):
        """dh = dhs[:, t] + dh_next; updates dc to dL/dc_{t-1}; writes dXP[:, t] (4H, T, N),
        the gradient of the pre-activations, straight into the layout of the chunk-wide
        weight-gradient GEMMs (no transposed copy afterwards). Only dXP and dc are stored to,
        which lets LLVM vectorise the loop (more output arrays defeat its alias checks).
        The rows of dhs[:, t] and dXP[:, t] lie T*N apart, too far for the hardware
        prefetchers, so the loop asks for the lines of row j + AHEAD itself: the step took
        135 instead of 240 us at H = 512, N = 32, T = 100, 12.7 instead of 16.4 at H = 128,
        N = 16, T = 50 (the forward kernel measured no better with it)."""
        H, N = dc.shape
        for j in range(H):
            if j + AHEAD < H:
                for n0 in range(0, N, 16):
                    _prefetch_read(dhs, j + AHEAD, t, n0)
                    for q in range(4):
                        _prefetch_write(dXP, q * H + j + AHEAD, t, n0)
            for n in range(N):
                i = a[j, n]
                f = a[H + j, n]
                g = a[2 * H + j, n]
                o = a[3 * H + j, n]
                th = tc[j, n]
                dh = dhs[j, t, n] + dh_next[j, n]
                dcc = dc[j, n] + dh * o * (ONE - th * th)
                dc[j, n] = dcc * f
                dXP[j, t, n] = dcc * g * i * (ONE - i)
                dXP[H + j, t, n] = dcc * c_prev[j, n] * f * (ONE - f)
                dXP[2 * H + j, t, n] = dcc * i * (ONE - g * g)
                dXP[3 * H + j, t, n] = dh * th * o * (ONE - o)

    @jit
    def gru_step_forward(t, a, hp, XP, bhn, h_prev, hn, hs):
        """hp (3H, N) = Wh @ h_prev; writes gate values r, z, n into a (3H, N), hn (H, N) and
        hs[:, t]."""
        H, N = hn.shape
        for j in range(H):
            for n in range(N):
                r = _sigmoid(XP[j, t, n] + hp[j, n])
                z = _sigmoid(XP[H + j, t, n] + hp[H + j, n])
                hnj = hp[2 * H + j, n] + bhn[j]
                nn = _tanh(XP[2 * H + j, t, n] + r * hnj)
                a[j, n] = r
                a[H + j, n] = z
                a[2 * H + j, n] = nn
                hn[j, n] = hnj
                hs[j, t, n] = nn + z * (h_prev[j, n] - nn)

    @jit
    def gru_step_forward_flat(t, a, hp, XP, bhn, h_prev, hn, hs):
        """gru_step_forward for any N, its gate math over each gate's (H, N) block as one flat
        run (the column loop above is not vectorised below N = 32: 25 us per step at
        H = 128, N = 16, against 9 at N = 32). The sums with XP, bhn and the update of h,
        whose arrays are strided, are separate simple passes."""
        G, N = a.shape
        H = G // 3
        for j in range(2 * H):
            for n in range(N):
                a[j, n] = XP[j, t, n] + hp[j, n]
        for j in range(H):
            for n in range(N):
                a[2 * H + j, n] = XP[2 * H + j, t, n]
                hn[j, n] = hp[2 * H + j, n] + bhn[j]
        HN = H * N
        af, hf = a.reshape(G * N), hn.reshape(HN)
        for k in range(HN):
            r = _sigmoid(af[k])
            af[k] = r
            af[HN + k] = _sigmoid(af[HN + k])
            af[2 * HN + k] = _tanh(af[2 * HN + k] + r * hf[k])
        for j in range(H):
            for n in range(N):
                nn = a[2 * H + j, n]
                hs[j, t, n] = nn + a[H + j, n] * (h_prev[j, n] - nn)

    def gru_step_forward_for(N: int):
        """The GRU step kernel for N streams: the column loop where N is a multiple of 32,
        else the flat one."""
        return gru_step_forward if N % 32 == 0 else gru_step_forward_flat

    @jit
    def gru_step_backward(t, a, hn, h_prev, dhs, dh_next, dXP, dHP):
        """dh = dhs[:, t] + dh_next; writes dXP[:, t] = dL/d(input projections) and dHP[:, t]
        = dL/d(hidden product) (both (3H, T, N)), and leaves dh * z (the path from h_t to
        h_{t-1} through z) in dh_next, to which the caller adds Wh^T @ dHP[:, t]."""
        H, N = hn.shape
        for j in range(H):
            for n in range(N):
                r = a[j, n]
                z = a[H + j, n]
                nn = a[2 * H + j, n]
                dh = dhs[j, t, n] + dh_next[j, n]
                dz = dh * (h_prev[j, n] - nn) * z * (ONE - z)
                dn = dh * (ONE - z) * (ONE - nn * nn)
                dr = dn * hn[j, n] * r * (ONE - r)
                dXP[j, t, n] = dr
                dXP[H + j, t, n] = dz
                dXP[2 * H + j, t, n] = dn
                dHP[j, t, n] = dr
                dHP[H + j, t, n] = dz
                dHP[2 * H + j, t, n] = dn * r
                dh_next[j, n] = dh * z

    @jit
    def rnn_step_forward(t, a, XP, hs):
        """hs[:, t] = tanh(a + XP[:, t]) for a (H, N) = Wh @ h_prev."""
        H, N = a.shape
        for j in range(H):
            for n in range(N):
                hs[j, t, n] = _tanh(a[j, n] + XP[j, t, n])

    @jit
    def rnn_step_backward(t, hs, dhs, dh_next, dXP):
        """dXP[:, t] = (dhs[:, t] + dh_next) * (1 - h_t²)."""
        H, N = dh_next.shape
        for j in range(H):
            for n in range(N):
                h = hs[j, t, n]
                dXP[j, t, n] = (dhs[j, t, n] + dh_next[j, n]) * (ONE - h * h)

    @jit
    def transpose_rows(S, p0, rows, width, out, at):
        """Rows p0 to p0 + rows of S (C-contiguous, K columns) transposed into out (flat):
        out[at + k * width + r] = S[p0 + r, k], in TILE x TILE tiles through a small buffer so
        that S is read and out written in runs of consecutive floats (element by element one
        of the two is strided, a cache line per float once the rows outgrow the cache). Whole
        tiles have loops of constant length, which LLVM unrolls (152 against 184 us for
        1024 x 256)."""
        K = S.shape[1]
        tile = numpy.empty((TILE, TILE), dtype=S.dtype)
        for r0 in range(0, rows, TILE):
            nr = min(TILE, rows - r0)
            for k0 in range(0, K, TILE):
                nk = min(TILE, K - k0)
                if nr == TILE and nk == TILE:
                    for a in range(TILE):
                        src = S[p0 + r0 + a, k0:k0 + TILE]
                        for b in range(TILE):
                            tile[b, a] = src[b]
                    for b in range(TILE):
                        o = at + (k0 + b) * width + r0
                        dst = out[o:o + TILE]
                        for a in range(TILE):
                            dst[a] = tile[b, a]
                    continue
                for a in range(nr):
                    src = S[p0 + r0 + a, k0:k0 + nk]
                    for b in range(nk):
                        tile[b, a] = src[b]
                for b in range(nk):
                    o = at + (k0 + b) * width + r0
                    dst = out[o:o + nr]
                    for a in range(nr):
                        dst[a] = tile[b, a]

    @jit
    def onehot_projection(Wx, b, ids, out):
        """out (G*H, M) = Wx[:, ids] + b[:, None]: the input projection of one-hot tokens
        (a gather, far cheaper than multiplying by a one-hot matrix)."""
        GH, M = out.shape
        for g in range(GH):
            bg = b[g]
            for m in range(M):
                out[g, m] = Wx[g, ids[m]] + bg

    @jit
    def scatter_columns(dWx, db, ids, dXP):
        """dWx[:, ids[m]] += dXP[:, m] and db += dXP.sum(axis=1), for dXP (G*H, M): the
        weight and bias gradients of a one-hot input projection in one pass."""
        GH, M = dXP.shape
        for g in range(GH):
            acc = dXP.dtype.type(0.0)
            for m in range(M):
                v = dXP[g, m]
                dWx[g, ids[m]] += v
                acc += v
            db[g] += acc

    @jit
    def adam_update(p, g, m, v, step, inv, b1, b2, eps, gscale):
        """One Adam update of flat float32 arrays in a single pass (see optim.Adam: step is
        lr / (1 - b1^t), inv 1 / sqrt(1 - b2^t)), of the gradient times gscale (the clipping
        factor)."""
        c1 = ONE - b1
        c2 = ONE - b2
        for i in range(p.shape[0]):
            gi = g[i] * gscale
            mi = b1 * m[i] + c1 * gi
            vi = b2 * v[i] + c2 * gi * gi
            m[i] = mi
            v[i] = vi
            p[i] -= step * mi / (numpy.sqrt(vi) * inv + eps)

    @numba.njit(cache=True, nogil=True, boundscheck=False)  # no fastmath: NumPy's roundings, step by step
    def dynamic_step(p, g, keep, pull, scale, decay):
        """Dynamic evaluation's update of flat float32 arrays in one pass (dynamic.py): p <-
        p * keep + pull - g * scale, each operation rounded as NumPy's passes round it (no
        fused multiply-add), so the results are theirs bit for bit; keep and pull are read
        only with ``decay``. g is not written."""
        if decay:
            for i in range(p.shape[0]):
                p[i] = (p[i] * keep[i] + pull[i]) - g[i] * scale[i]
        else:
            for i in range(p.shape[0]):
                p[i] = p[i] - g[i] * scale[i]

    from .head_kernels import (class_words_backward, class_words_forward,  # noqa: E402,F401  (re-exported)
                               class_words_forward_backward, draw_unnormalised, draw_unnormalised_rows,
                               scaled_logits, scaled_logits_rows, scatter_rows, softmax_xent_grad_rows,
                               softmax_xent_rows)


def transposed(W):
    """A C-contiguous copy of W.T (2-D). NumPy's copy of a tall matrix with rows of a
    power-of-two length is slow (cache-set conflicts: 7.5 ms for 2048 x 512, 0.3 for 1024 x 256);
    the tiled copy here takes about 0.6 ms for 2048 x 512 and 0.15 for 1024 x 256, e426f00)."""
    out = numpy.empty((W.shape[1], W.shape[0]), dtype=W.dtype)
    if not (available and W.flags.c_contiguous and W.dtype in (numpy.float32, numpy.float64)):
        out[...] = W.T
        return out
    transpose_rows(W, 0, W.shape[0], W.shape[0], out.reshape(-1), 0)
    return out

"""Compiled CPU kernels (numba) of the output layer, and sampling's draw: kernels.py's
companion (it re-exports these names; heads.py and the stepper call them through it).

The full-vocabulary softmax cross-entropy has compiled passes (softmax_xent_rows,
softmax_xent_grad_rows) with an exp of its own that LLVM vectorises (libm's it does not); the
class-factored head's are class_words_*; sampling's are scaled_logits and draw_unnormalised
(and their _rows, the server's draw for a whole step).
Whether they run is the engine's choice (cpu.CpuOps.fused); without numba none is defined.
"""

from __future__ import annotations

import math

import numpy

try:
    import numba

    available = True
except ImportError:  # (as kernels.py: the plain path works without numba)
    numba = None
    available = False

F = numpy.float32
ONE, HALF = F(1.0), F(0.5)

if available:
    jit = numba.njit(cache=True, fastmath=True, nogil=True, error_model="numpy", boundscheck=False)

    @jit
    def class_words_forward_backward(Xt, W, b, targets, order, groups, k0, k1, starts, ends, offsets, nll, P, scale,
                                     dW, db, dXt, sq):
        """class_words_forward then class_words_backward, class by class: the rows of W a
        class uses are still in cache for its backward pass (run separately, each pass reads
        all of W from memory)."""
        for k in range(k0, k1):
            class_words_forward(Xt, W, b, targets, order, groups, k, k + 1, starts, ends, offsets, nll, P)
            class_words_backward(Xt, W, targets, order, groups, k, k + 1, starts, ends, offsets, P, scale, dW, db, dXt, sq)

    @numba.njit(cache=True, nogil=True, boundscheck=False)  # no fastmath: exact float64 steps
    def scaled_logits(logits, temperature, z):
        """z = logits / temperature in float64, minus its maximum (the first half of
        sample.sample_index; NumPy's vectorised exp follows)."""
        top = -numpy.inf
        for i in range(logits.shape[0]):
            zi = numpy.float64(logits[i]) / temperature
            z[i] = zi
            top = max(top, zi)
        for i in range(logits.shape[0]):
            z[i] -= top

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def draw_unnormalised(e, u):
        """The index that sample.draw(e / e.sum(), rng) picks when rng.random() gives u: the
        first i whose running sum of e exceeds u times the whole sum (the same as
        numpy.searchsorted(cdf, u, side="right") on the normalised cumulative sum up to
        rounding, which moves a draw only when u falls within about 1e-16 of a boundary)."""
        s = 0.0
        for i in range(e.shape[0]):
            s += e[i]
        threshold = u * s
        acc = 0.0
        for i in range(e.shape[0]):
            acc += e[i]
            if acc > threshold:
                return i
        return e.shape[0] - 1

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def scaled_logits_rows(logits, temperatures, z):
        """scaled_logits for each row of logits (n, V), row r at temperatures[r], into z (n, V)."""
        for r in range(logits.shape[0]):
            scaled_logits(logits[r], temperatures[r], z[r])

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def draw_unnormalised_rows(e, us, out):
        """draw_unnormalised for each row of e (n, V) with us[r]: the indices into out (n,)."""
        for r in range(e.shape[0]):
            out[r] = draw_unnormalised(e[r], us[r])

    from llvmlite import ir as _ir
    from numba.core import types as _types
    from numba.extending import intrinsic as _intrinsic

    @_intrinsic
    def _float_from_bits(typingctx, i):
        """The float32 whose bits are the int32 i (LLVM's bitcast)."""
        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], _ir.FloatType())
        return _types.float32(_types.int32), codegen

    LOG2E, LN2_HI, LN2_LO = F(1.4426950408889634), F(0.693359375), F(-2.12194440e-4)
    E2, E3, E4, E5, E6, E7 = F(1 / 2), F(1 / 6), F(1 / 24), F(1 / 120), F(1 / 720), F(1 / 5040)
    EXP_MIN = F(-87.0)  # exp(-87) = 1.6e-38, still a normal float32

    @jit
    def _exp_nonpositive(x):
        """exp(x) for float32 x <= 0, in operations LLVM vectorises (libm's expf it does not):
        x = k ln2 + r, |r| <= ln2/2, exp(r) by its Taylor polynomial to r^7 (truncation error
        under 1e-8 relative), times 2^k built from its exponent bits. Below -87 it returns
        exp(-87) (1.6e-38) instead of a smaller number: nothing a softmax can notice."""
        x = max(x, EXP_MIN)
        k = numpy.floor(x * LOG2E + HALF)
        r = x - k * LN2_HI - k * LN2_LO
        p = ONE + r * (ONE + r * (E2 + r * (E3 + r * (E4 + r * (E5 + r * (E6 + r * E7))))))
        return p * _float_from_bits((numpy.int32(k) + numpy.int32(127)) << numpy.int32(23))

    @jit
    def softmax_xent_rows(logits, top, targets, nll, normalise):
        """In place over logits (M, V), the output layer's scores with the bias added, and
        top (M,) their row maxima: writes each row's negative log-likelihood of its target to
        nll (M,) and leaves exp(logit - row max) in the row, divided by the row's sum with
        ``normalise`` (the softmax probabilities). One or two passes over each row after the
        caller's max, where NumPy takes five (softmax_xent_forward); the row max stays with
        NumPy, whose reduction is vectorised where this loop's would not be (LLVM leaves a
        float max reduction scalar here: 10 against 1.3 ms at 700 x 10,000)."""
        M, V = logits.shape
        for m in range(M):
            row = logits[m]
            mx = top[m]
            picked = row[targets[m]] - mx  # taken before exp can underflow
            total = F(0.0)
            for v in range(V):
                e = _exp_nonpositive(row[v] - mx)
                row[v] = e
                total += e
            nll[m] = math.log(total) - picked
            if normalise:
                inv = ONE / total
                for v in range(V):
                    row[v] *= inv

    @jit
    def softmax_xent_grad_rows(P, targets, scale, db):
        """In place over P (M, V), softmax probabilities: row m becomes (P[m] - onehot(target))
        * scale[m], the gradient of the loss by the logits; db (V,) = the sum of the rows.
        One pass where NumPy takes three."""
        M, V = P.shape
        db[:] = 0.0
        for m in range(M):
            row = P[m]
            row[targets[m]] -= ONE
            s = scale[m]
            for v in range(V):
                g = row[v] * s
                row[v] = g
                db[v] += g

    @jit
    def scatter_rows(dst, ids, src):
        """dst[ids[m]] += src[m] for every m (duplicates accumulate): embedding gradients."""
        M, D = src.shape
        for m in range(M):
            r = ids[m]
            for d in range(D):
                dst[r, d] += src[m, d]


    @jit
    def class_words_forward(Xt, W, b, targets, order, groups, k0, k1, starts, ends, offsets, nll, P):
        """The within-class part of the class-factored softmax (functional.class_xent_forward)
        for the positions of classes k0..k1-1 of ``groups``: order[groups[k]:groups[k + 1]]
        are the positions whose target is in one class, so each row of W is loaded once for
        all of them. For each such position m: the logits of the words [starts[m], ends[m])
        of its target's class, nll[m] += their log-sum-exp - the target's logit, and their
        probabilities kept in P[offsets[m]:offsets[m + 1]]. Different group ranges touch
        disjoint positions, so two threads may run two ranges at once."""
        D = Xt.shape[1]
        for k in range(k0, k1):
            g0, g1 = groups[k], groups[k + 1]
            a, z = starts[order[g0]], ends[order[g0]]
            for j in range(z - a):
                w = W[a + j]  # row views: the inner loops vectorise (2-D indexing did not)
                bj = b[a + j]
                for i in range(g0, g1):
                    m = order[i]
                    x = Xt[m]
                    acc = F(0.0)
                    for d in range(D):
                        acc += x[d] * w[d]
                    P[offsets[m] + j] = acc + bj
        for i in range(groups[k0], groups[k1]):
            m = order[i]
            a, z, o = starts[m], ends[m], offsets[m]
            top = F(-3.0e38)
            for j in range(z - a):
                top = max(top, P[o + j])
            picked = P[o + targets[m] - a] - top
            Z = F(0.0)
            for j in range(z - a):
                e = numpy.exp(P[o + j] - top)
                P[o + j] = e
                Z += e
            nll[m] += numpy.log(Z) - picked
            inv = ONE / Z
            for j in range(z - a):
                P[o + j] *= inv

    @jit
    def class_words_backward(Xt, W, targets, order, groups, k0, k1, starts, ends, offsets, P, scale, dW, db, dXt, sq):
        """Gradients of class_words_forward's part of the loss for classes k0..k1-1 of
        ``groups``, each position's term weighted by scale[m] (P is overwritten). The rows of
        dW and db of those classes are written (not accumulated: they need no zeroing first);
        dXt's rows of their positions are accumulated. sq[0] += the sum of squares of the
        dW and db entries written (for the global gradient norm, while they are in cache)."""
        D = Xt.shape[1]
        total = 0.0
        for i in range(groups[k0], groups[k1]):
            m = order[i]
            o, a = offsets[m], starts[m]
            P[o + targets[m] - a] -= ONE
            for j in range(ends[m] - a):
                P[o + j] *= scale[m]
        for k in range(k0, k1):
            g0, g1 = groups[k], groups[k + 1]
            a, z = starts[order[g0]], ends[order[g0]]
            for j in range(z - a):
                w, dw = W[a + j], dW[a + j]
                for d in range(D):
                    dw[d] = F(0.0)
                gb = F(0.0)
                for i in range(g0, g1):
                    m = order[i]
                    g = P[offsets[m] + j]
                    x, dx = Xt[m], dXt[m]
                    gb += g
                    for d in range(D):
                        dw[d] += g * x[d]
                    for d in range(D):
                        dx[d] += g * w[d]
                db[a + j] = gb
                acc = gb * gb
                for d in range(D):
                    acc += dw[d] * dw[d]
                total += acc
        sq[0] += total

"""Sampling's step: one token at a time for N streams, with preallocated buffers.

The reference (nn/model.py's Stepper) runs the model's forward over a chunk of one step; this
twin concatenates each layer's input and recurrent weights once, so a step is one
matrix-vector product per layer, then the gate math in place (the compiled step kernels on
float32), and chooses the BLAS's thread count by timing (ThreadTuner).
tests/test_engine.py compares the two.
"""

from __future__ import annotations

import time

import numpy

from ..backend import to_device
from ..nn import cells
from ..nn.cells import lstm_step_forward, sigmoid_
from . import kernels
from . import packed as packed_products
from .threads import SMALL_GEMM_FLOPS, blas_threads


class FastStepper:
    """Advances N streams one token at a time with preallocated buffers (for sampling): the
    engine's twin of model.Stepper, for the cells the engine has twins for (layers.FUSED: a
    gate step each in STEPS) on NumPy.

    Each layer's input and recurrent weights are concatenated once, W = [Wx Wh] (G*H, In+H),
    so a step is one matrix-vector product per layer on [x; h] (one-hot layer 0: a column of
    Wx plus Wh @ h), then the gate math in place. The state lives in the buffers; ``state()``
    returns it in the model's layout and ``set_state`` loads one.
    """

    def __init__(self, model, N: int = 1, ops=None, packed: bool = False):
        self.model, self.N = model, N
        cfg, p, xp = model.config, model.params, model.xp
        self.xp = xp
        H, dt = cfg.hidden, model.dtype
        cell = cells.get(cfg.cell)
        self._gates = self.STEPS[cfg.cell]
        self.apart = cell.hidden_apart  # the GRU: its hidden product is kept apart (self.hp)
        self.onehot = not cfg.embed
        self.W, self.xh, self.a, self.bias, self.c, self.c_next, self.tc = [], [], [], [], [], [], []
        for layer in range(cfg.layers):
            Wx, Wh = p[f"rnn.{layer}.Wx"], p[f"rnn.{layer}.Wh"]
            In = Wx.shape[1]
            GH = Wx.shape[0]
            if layer == 0 and self.onehot:
                self.W.append(Wh)
                self.xh.append(xp.zeros((H, N), dtype=dt))
            else:
                self.W.append(xp.ascontiguousarray(xp.concatenate([Wx, Wh], axis=1)))
                self.xh.append(xp.zeros((In + H, N), dtype=dt))
            self.a.append(xp.empty((GH, N), dtype=dt))
            self.bias.append(xp.ascontiguousarray(xp.broadcast_to(p[f"rnn.{layer}.b"][:, None, None], (GH, 1, N))))
            self.c.append(xp.zeros((H, N), dtype=dt) if cell.has_c else None)
            # The fused step writes the new cell state to a second buffer (the two then swap):
            # one buffer for both would send its loop down the scalar path (see kernels).
            self.c_next.append(xp.empty((H, N), dtype=dt) if cell.has_c else None)
            self.tc.append(xp.empty((H, N), dtype=dt) if cell.has_c else None)
        # Layer 0's one-hot input weights by token (rows), so a step reads one contiguous row
        # instead of gathering a column of Wx (35 us per token at 2048 x 65).
        self.WxT0 = xp.ascontiguousarray(p["rnn.0.Wx"].T) if self.onehot else None
        self.hs = [self._h(layer).reshape(H, 1, N) for layer in range(cfg.layers)]  # views for the kernels
        self.hp = xp.empty((cfg.gates * H, N), dtype=dt)
        self.head_W = model.head_weight()
        self.logits = xp.empty((N, cfg.vocab_size), dtype=dt)
        self.fused = ops is not None and ops.fused(self.a[0])  # the LSTM's and GRU's compiled steps
        # With ``packed`` (asked by the server's scheduler, which times both kinds of stepper
        # per width and keeps the faster), each layer's product by the engine's packed products
        # (packed.py: W packed once here) where they run: from 2 streams, on a CPU with AVX-512,
        # for the cells whose step is one product a layer. OpenBLAS packs all of W again in every
        # thin product (the bundled 2x384's step: 138 us at N=1, 476-556 at N=2-8). Fixed for
        # the stepper's life: the products' last bits differ from the BLAS's.
        self.packed = []
        if (packed and self.fused and not self.apart and N >= 2 and ops.settings.packed
                and packed_products.usable(N)):
            # Per layer: the product, W packed (kept alive here) and the call's addresses (the
            # buffers never move), so a step makes one foreign call a layer and nothing else.
            self.packed = []
            for W, xh, a in zip(self.W, self.xh, self.a):
                Wp = packed_products.packed(W, N)
                self.packed.append((packed_products.product(W.shape[0], W.shape[1], N), Wp,
                                    (Wp.ctypes.data, xh.ctypes.data, N, a.ctypes.data, N)))
        small = 2.0 * max(w.size for w in self.W) * N < SMALL_GEMM_FLOPS
        self._tuner = ThreadTuner() if xp is numpy and small else None

    @property
    def modes(self) -> list:
        """The ways its products may run, which it times as it goes (labels)."""
        if self._tuner is None:
            return ["the BLAS's threads as they are"]
        return ["BLAS on 1 thread" if m == 1 else "BLAS on its own threads" for m in ThreadTuner.MODES]

    def _h(self, layer):
        """This layer's hidden state: the tail of its [x; h] buffer."""
        return self.xh[layer][-self.model.config.hidden:]

    def state(self) -> list:
        return [(self._h(l).copy(), None if c is None else c.copy()) for l, c in enumerate(self.c)]

    def set_state(self, state):
        for layer, (h, c) in enumerate(state):
            self._h(layer)[...] = h
            if c is not None:
                self.c[layer][...] = c

    def step(self, ids):
        """Feed ``ids`` (N,) host ints; returns the next-token logits (N, V) (a reused buffer).

        Matrix-vector products are memory bound: on a quiet machine two BLAS threads run them
        about twice as fast as one, but OpenBLAS's threads slow down tenfold when another
        process holds a core. So the Stepper times both settings as it goes (a few steps of
        each at the start and every 512 steps) and uses the faster."""
        mode = self._tuner.pick() if self._tuner else None
        t0 = time.perf_counter()
        with blas_threads(mode, self.xp):
            out = self._step(ids)
        if self._tuner:
            self._tuner.record(mode, time.perf_counter() - t0)
        return out

    def _step(self, ids):
        cfg, p, xp = self.model.config, self.model.params, self.xp
        ids = self.model.check_ids(numpy.asarray(ids).reshape(-1))
        H = cfg.hidden
        x = None
        for layer in range(cfg.layers):
            xh, a = self.xh[layer], self.a[layer]
            if layer > 0:
                xh[:H] = x
            elif not self.onehot:
                xh[: cfg.embed] = p["embed.W"][to_device(ids, xp)].T
            a_cat = self.hp if self.apart else a
            if self.apart and not (layer == 0 and self.onehot):
                In = xh.shape[0] - H
                Wx, Wh = p[f"rnn.{layer}.Wx"], p[f"rnn.{layer}.Wh"]
                xp.matmul(Wh, xh[In:], out=self.hp)
                xin = Wx @ xh[:In]
            elif self.packed:
                mm, _, args = self.packed[layer]
                mm(*args)  # (a_cat is self.a[layer]: the cell is not hidden_apart)
                xin = None
            else:
                xp.matmul(self.W[layer], xh, out=a_cat)
                xin = None
            if layer == 0 and self.onehot:
                col = self.WxT0[int(ids[0])][:, None] if self.N == 1 else self.WxT0[to_device(ids, xp)].T  # (G*H, N)
                if self.apart:
                    xin = col
                else:
                    a += col
            x = self._gates(self, layer, xin)
        if cfg.class_bounds:
            return self.model.logits(x)
        logits = self.logits
        xp.matmul(x.T, self.head_W.T, out=logits)
        logits += p["head.b"]
        return logits

    def _lstm(self, layer, xin):
        """An LSTM layer's gate math for one step; returns the new h (a view of the layer's buffer)."""
        a, bias, hs = self.a[layer], self.bias[layer], self.hs[layer]
        h = hs[:, 0]
        if self.fused:
            c_prev, c = self.c[layer], self.c_next[layer]
            kernels.lstm_step_forward_for(self.N)(0, a, bias, c_prev, c, self.tc[layer], hs)
            self.c[layer], self.c_next[layer] = c, c_prev
        else:
            a += bias[:, 0]
            lstm_step_forward(a, self.c[layer], self.c[layer], self.tc[layer], h, self.xp)
        return h

    def _gru(self, layer, xin):
        """A GRU layer's gate math for one step, from the input's product ``xin`` and the hidden
        product in self.hp."""
        p, xp = self.model.params, self.xp
        a, bias, hs = self.a[layer], self.bias[layer], self.hs[layer]
        h = hs[:, 0]
        XPt = (xin + bias[:, 0]).reshape(-1, 1, self.N)
        bhn = p[f"rnn.{layer}.bhn"]
        if self.fused:
            h_prev = h.copy()
            kernels.gru_step_forward_for(self.N)(0, a, self.hp, numpy.ascontiguousarray(XPt), bhn, h_prev, self.tc_gru(layer), hs)
        else:
            H = h.shape[0]
            a[: 2 * H] = XPt[: 2 * H, 0] + self.hp[: 2 * H]
            sigmoid_(a[: 2 * H], xp)
            hn = self.hp[2 * H:] + bhn[:, None]
            n = xp.tanh(XPt[2 * H:, 0] + a[:H] * hn)
            h[...] = n + a[H: 2 * H] * (h - n)
        return h

    def _rnn(self, layer, xin):
        """A vanilla RNN layer's step (tanh or relu, in NumPy)."""
        a, bias, hs = self.a[layer], self.bias[layer], self.hs[layer]
        h = hs[:, 0]
        a += bias[:, 0]
        if self.model.config.activation == "relu":
            self.xp.maximum(a, 0, out=h)
        else:
            self.xp.tanh(a, out=h)
        return h

    # Each cell's gate math by registry name: a step for every cell of layers.FUSED.
    STEPS = {"rnn": _rnn, "lstm": _lstm, "gru": _gru}

    def tc_gru(self, layer):
        if self.tc[layer] is None:
            self.tc[layer] = self.xp.empty_like(self._h(layer))
        return self.tc[layer]


class ThreadTuner:
    """Chooses between one BLAS thread and the library default by timing both: ``trial`` steps
    of each at the start and again every ``period`` steps, the faster median in between."""

    MODES = (1, None)

    def __init__(self, trial: int = 6, period: int = 512):
        self.trial, self.period = trial, period
        self.n = 0
        self.times = {m: [] for m in self.MODES}
        self.best = self.chosen = None

    def pick(self):
        phase = self.n % self.period
        if phase < 2 * self.trial:
            return self.MODES[phase % 2]
        if not self.chosen or phase == 2 * self.trial:
            self.chosen = True
            self.best = min(self.MODES, key=lambda m: sorted(self.times[m])[len(self.times[m]) // 2])
        return self.best

    def record(self, mode, seconds: float):
        phase = self.n % self.period
        if phase == 0:
            self.times = {m: [] for m in self.MODES}
        if phase < 2 * self.trial:
            self.times[mode].append(seconds)
        self.n += 1

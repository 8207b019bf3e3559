"""Sampling's step: one token at a time for N streams, with preallocated buffers.

The reference (nn/model.py's Stepper) runs the model's forward over a chunk of one step; this
twin concatenates each layer's input and recurrent weights once, so a step is one
matrix-vector product per layer, then the gate math in place (the compiled step kernels on
float32). How the products run is chosen by timing real steps as sampling goes (ThreadTuner):
the BLAS on one thread, the BLAS on its own threads, or (float32 RNN and LSTM layers, where
the CPU has AVX-512 and the settings allow) packed.py's products, the weights packed once.
A step is cheap and its cost moves with the machine's load, so these are timed as the work
goes (a few steps of each at the start and every 512 steps) rather than planned once.
tests/test_engine.py compares the two.
"""

from __future__ import annotations

import time

import numpy

from ..backend import to_device
from ..nn.cells import lstm_step_forward, sigmoid_
from . import kernels, packed
from .threads import SMALL_GEMM_FLOPS, blas_threads


class FastStepper:
    """Advances N streams one token at a time with preallocated buffers (for sampling): the
    engine's twin of model.Stepper, for the built-in cells on NumPy.

    Each layer's input and recurrent weights are concatenated once, W = [Wx Wh] (G*H, In+H),
    so a step is one matrix-vector product per layer on [x; h] (one-hot layer 0: a column of
    Wx plus Wh @ h), then the gate math in place. The state lives in the buffers; ``state()``
    returns it in the model's layout and ``set_state`` loads one.
    """

    CELLS = ("rnn", "lstm", "gru")

    def __init__(self, model, N: int = 1, ops=None):
        self.model, self.N = model, N
        cfg, p, xp = model.config, model.params, model.xp
        self.xp = xp
        H, dt = cfg.hidden, model.dtype
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
            self.c.append(xp.zeros((H, N), dtype=dt) if cfg.cell == "lstm" else None)
            # The fused step writes the new cell state to a second buffer (the two then swap):
            # one buffer for both would send its loop down the scalar path (see kernels).
            self.c_next.append(xp.empty((H, N), dtype=dt) if cfg.cell == "lstm" else None)
            self.tc.append(xp.empty((H, N), dtype=dt) if cfg.cell == "lstm" else None)
        # Layer 0's one-hot input weights by token (rows), so a step reads one contiguous row
        # instead of gathering a column of Wx (35 us per token at 2048 x 65).
        self.WxT0 = xp.ascontiguousarray(p["rnn.0.Wx"].T) if self.onehot else None
        self.hs = [self._h(layer).reshape(H, 1, N) for layer in range(cfg.layers)]  # views for the kernels
        self.hp = xp.empty((cfg.gates * H, N), dtype=dt)
        self.head_W = model.head_weight()
        self.logits = xp.empty((N, cfg.vocab_size), dtype=dt)
        self.fused = ops is not None and ops.fused(self.a[0]) and cfg.cell != "rnn"
        small = 2.0 * max(w.size for w in self.W) * N < SMALL_GEMM_FLOPS
        # The packed products, W packed once (float32 RNN and LSTM layers: the GRU keeps its
        # hidden product apart), as a third mode for the tuner.
        self.mm = None
        if (small and cfg.cell != "gru" and ops is not None and getattr(ops, "settings", None) is not None
                and ops.settings.packed and ops.fused(self.a[0]) and packed.usable(N)):
            # The buffers' addresses once: numpy's .ctypes costs about a microsecond a call.
            self._packed_w = [packed.packed(w, N) for w in self.W]
            self.mm = [(packed.product(w.shape[0], w.shape[1], N), wp.ctypes.data, xh.ctypes.data, a.ctypes.data)
                       for w, wp, xh, a in zip(self.W, self._packed_w, self.xh, self.a)]
        modes = [(1, False), (None, False)] + ([(1, True)] if self.mm else [])
        self._tuner = ThreadTuner(modes) if xp is numpy and small else None

    @property
    def modes(self) -> list:
        """The ways its products may run, which it times as it goes (labels)."""
        if self._tuner is None:
            return ["the BLAS's threads as they are"]
        return [("packed" if pk else "BLAS") + (", 1 thread" if blas == 1 else (", its threads" if not pk else ""))
                for blas, pk in self._tuner.modes]

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
        process holds a core. So the Stepper times each mode as it goes (a few steps of each
        at the start and every 512 steps) and uses the fastest."""
        mode = self._tuner.pick() if self._tuner else (None, False)
        t0 = time.perf_counter()
        with blas_threads(mode[0], self.xp):
            out = self._step(ids, mode[1])
        if self._tuner:
            self._tuner.record(mode, time.perf_counter() - t0)
        return out

    def _step(self, ids, use_packed=False):
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
            a_cat = a
            if cfg.cell == "gru":
                a_cat = self.hp  # GRU keeps the hidden product apart (the reset gate acts on it)
            if cfg.cell == "gru" and not (layer == 0 and self.onehot):
                In = xh.shape[0] - H
                Wx, Wh = p[f"rnn.{layer}.Wx"], p[f"rnn.{layer}.Wh"]
                xp.matmul(Wh, xh[In:], out=self.hp)
                xin = Wx @ xh[:In]
            elif use_packed:
                mm, w, x_, out = self.mm[layer]
                mm(w, x_, self.N, out, self.N)  # a_cat is this layer's a here (not a GRU)
                xin = None
            else:
                xp.matmul(self.W[layer], xh, out=a_cat)
                xin = None
            if layer == 0 and self.onehot:
                col = self.WxT0[int(ids[0])][:, None] if self.N == 1 else self.WxT0[to_device(ids, xp)].T  # (G*H, N)
                if cfg.cell == "gru":
                    xin = col
                else:
                    a += col
            x = self._cell(layer, xin)
        if cfg.class_bounds:
            return self.model.logits(x)
        logits = self.logits
        xp.matmul(x.T, self.head_W.T, out=logits)
        logits += p["head.b"]
        return logits

    def _cell(self, layer, xin):
        """Gate math for one step; returns the new h (a view of this layer's buffer)."""
        cfg, p, xp = self.model.config, self.model.params, self.xp
        a, bias, hs = self.a[layer], self.bias[layer], self.hs[layer]
        h = hs[:, 0]
        if cfg.cell == "lstm":
            if self.fused:
                c_prev, c = self.c[layer], self.c_next[layer]
                kernels.lstm_step_forward_for(self.N)(0, a, bias, c_prev, c, self.tc[layer], hs)
                self.c[layer], self.c_next[layer] = c, c_prev
            else:
                a += bias[:, 0]
                lstm_step_forward(a, self.c[layer], self.c[layer], self.tc[layer], h, xp)
            return h
        if cfg.cell == "gru":
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
        a += bias[:, 0]
        if cfg.activation == "relu":
            xp.maximum(a, 0, out=h)
        else:
            xp.tanh(a, out=h)
        return h

    def tc_gru(self, layer):
        if self.tc[layer] is None:
            self.tc[layer] = self.xp.empty_like(self._h(layer))
        return self.tc[layer]


class ThreadTuner:
    """Chooses among ``modes`` (by default one BLAS thread and the library's own count) by
    timing each: ``trial`` steps of each at the start and again every ``period`` steps, in
    turn, the fastest median in between."""

    def __init__(self, modes=(1, None), trial: int = 6, period: int = 512):
        self.modes = tuple(modes)
        self.trial, self.period = trial, period
        self.n = 0
        self.times = {m: [] for m in self.modes}
        self.best = self.chosen = None

    def pick(self):
        phase = self.n % self.period
        k = len(self.modes)
        if phase < k * self.trial:
            return self.modes[phase % k]
        if not self.chosen or phase == k * self.trial:
            self.chosen = True
            self.best = min(self.modes, key=lambda m: sorted(self.times[m])[len(self.times[m]) // 2])
        return self.best

    def record(self, mode, seconds: float):
        phase = self.n % self.period
        if phase == 0:
            self.times = {m: [] for m in self.modes}
        if phase < len(self.modes) * self.trial:
            self.times[mode].append(seconds)
        self.n += 1

"""The operations the language model is made of, in plain array code: the reference.

The model (model.py) never asks which path it is on: it calls its backend's ``ops`` for every
piece of work that has a faster twin, and :class:`Ops` here is the plain version of each, in
NumPy or CuPy through ``xp`` (thinc's ``Ops``). The CPU engine (engine/cpu.py) subclasses it
and overrides what it accelerates, naming those operations in ``accelerated``; what it does not
override runs this code. tests/test_engine.py runs every override against this reference.

Nothing here imports the engine.
"""

from __future__ import annotations

import contextlib

import numpy

from . import cells
from .functional import (class_xent_backward, class_xent_forward, scatter_add_rows, softmax_xent_backward,
                         softmax_xent_forward)
from ..backend import array_module
from .stepper import Stepper


class Ops:
    """The reference operations. Stateless; engines carry their settings on the instance."""

    name = "reference"
    accelerated: frozenset = frozenset()  # the operations a subclass overrides

    # ----- recurrent layers (cells.py's registry) -----
    def layer_forward(self, cell: str, XP, Wh, h0, c0, extra: dict, store: bool, activation: str = "tanh"):
        """One layer over a chunk: cells.get(cell).forward (signature in cells.py)."""
        return cells.get(cell).forward(XP, Wh, h0, c0, extra, store, activation)

    def layer_backward(self, cell: str, dhs, cache, Wh):
        """cells.get(cell).backward: (dXP, dWh, dextra, dh0, dc0)."""
        return cells.get(cell).backward(dhs, cache, Wh)

    # ----- a layer's input -----
    def input_projection(self, Wx, b, X, ids):
        """Wx @ X + b over a chunk: (G*H, M). X None (one-hot input): columns of Wx gathered
        by the ids (M,) instead of a product with a one-hot matrix."""
        xp = array_module(Wx)
        XP = xp.take(Wx, ids, axis=1) if X is None else Wx @ X
        XP += b[:, None]
        return XP

    def input_grads(self, Wx, dXP, X, ids):
        """The gradients of input_projection from dXP (G*H, M): (dWx, db, dX), dX (In, M)
        the gradient of X (None for one-hot input, whose dWx gets columns scattered by id)."""
        xp = array_module(dXP)
        db = dXP.sum(axis=1)
        if X is not None:
            return dXP @ X.T, db, Wx.T @ dXP
        dWx = xp.zeros(Wx.shape, dtype=dXP.dtype)
        self.scatter_add_rows(dWx.T, ids, dXP.T)
        return dWx, db, None

    def scatter_add_rows(self, dst, ids, src):
        """dst[ids[j]] += src[j] for every j (functional.scatter_add_rows)."""
        return scatter_add_rows(dst, ids, src)

    # ----- the output layer (functional.py) -----
    def softmax_xent_forward(self, X, W, b, targets, weights=None, store=True):
        return softmax_xent_forward(X, W, b, targets, weights, store)

    def softmax_xent_backward(self, cache, W):
        return softmax_xent_backward(cache, W)

    def class_xent_forward(self, X, Wc, bc, W, b, bounds, targets_host, targets, weights=None, store=True):
        return class_xent_forward(X, Wc, bc, W, b, bounds, targets_host, targets, weights, store)

    def class_xent_backward(self, cache, Wc, W):
        return class_xent_backward(cache, Wc, W)

    def class_xent_forward_backward(self, X, Wc, bc, W, b, bounds, targets_host):
        """class_xent_forward (unweighted, stored) then class_xent_backward: (loss, nll,
        (dX, dWc, dbc, dW, db), words_sq), words_sq the sum of squares of dW and db where the
        pass that wrote them knows it (else None)."""
        xp = array_module(X)
        targets = targets_host if xp is numpy else xp.asarray(targets_host)
        loss, nll, cache = self.class_xent_forward(X, Wc, bc, W, b, bounds, targets_host, targets, None, True)
        return loss, nll, self.class_xent_backward(cache, Wc, W), cache.get("words_sq")

    # ----- optimizers (optim.py) -----
    def sum_squares(self, arrays: list, total):
        """total + the sum of squares of every array (a 0-d array on their device)."""
        xp = array_module(total)
        for g in arrays:
            total += xp.vdot(g.ravel(), g.ravel()) if g.ndim else g * g
        return total

    def adam_update(self, opt, grads: dict, scale) -> set:
        """Update what a compiled pass can for Adam ``opt`` (scale included); returns the names
        it updated (the reference: none; Optimizer.step updates them one by one)."""
        return set()

    # ----- dynamic evaluation (dynamic.py) -----
    def dynamic_step(self, p, g, keep, pull, scale):
        """One step of dynamic evaluation's rule on one parameter, in place: p <- p * keep +
        pull - g * scale (dynamic.DynamicUpdate), where keep and pull are None without a decay
        (keep 1, pull 0). g may be overwritten."""
        if keep is not None:
            p *= keep
            p += pull
        g *= scale
        p -= g

    def segment_ops(self, model, N: int) -> tuple:
        """The operations for the forward passes and for the backward passes of a sequential
        loop of short chunks of N streams (dynamic evaluation's segments): the reference, these
        for both."""
        return self, self

    # ----- sampling -----
    def draw_scaled(self, logits, temperature: float, rng):
        """An index drawn from softmax(logits / temperature) by a faster route, or None (the
        caller then draws the plain way, sample.draw)."""
        return None

    def draw_scaled_rows(self, logits, temperatures, rngs):
        """draw_scaled for each row of host logits (n, V) at once: row r's index drawn from
        softmax(logits[r] / temperatures[r]) with ``rngs[r]`` (one ``random()`` of it), the
        index draw_scaled would give; an int array (n,), or None, having drawn nothing (the
        caller then draws row by row)."""
        return None

    def stepper(self, model, N: int = 1, packed: bool = False):
        """An object that advances N streams a token at a time (see model.Stepper). ``packed``:
        the engine may run its products packed (the reference has none to run)."""
        return Stepper(model, N)

    # ----- loops of small chunks -----
    def small_chunk_loop(self, flops: float):
        """A context for a strictly sequential loop of chunks whose largest product is about
        ``flops`` (dynamic evaluation's segments of one stream): the reference does nothing."""
        return contextlib.nullcontext()

    # ----- whole training steps -----
    def loss_and_grads(self, model, ids, targets, state, masks, train, sparse):
        """model.loss_and_grads's work: one forward and one backward over the whole batch."""
        loss, cache, new_state = model.forward(ids, targets, state, train=train, dropout_masks=masks)
        grads, _ = model.backward(cache, sparse)
        return loss, grads, new_state

    def nll(self, model, ids, targets, state, weights):
        """model.nll's work: (nll (T, N), final state) without dropout or a cache."""
        _, cache, new_state = model.forward(ids, targets, state, weights=weights, store=False)
        return cache["nll"], new_state

"""Optimizers (SGD, Adagrad, RMSprop, Adam) and global-norm gradient clipping.

Each optimizer updates the parameter arrays in place on their own device and keeps its state as
named arrays (``state_arrays``/``load_state_arrays``) plus a step count, so a checkpoint can
save it and a resumed run continue exactly.
"""

from __future__ import annotations

import numpy

from . import kernels
from .backend import array_module, to_device, to_host

OPTIMIZERS = ("adam", "adagrad", "rmsprop", "sgd")
DEFAULT_LR = {"adam": 3e-3, "adagrad": 1e-1, "rmsprop": 2e-3, "sgd": 1.0}


def clip_global_norm(grads: dict, max_norm: float):
    """Scale all gradients together so their global L2 norm is at most ``max_norm``.

    Stays on the device (no host sync): returns the norm before clipping as a 0-d array.
    """
    g0 = next(iter(grads.values()))
    xp = array_module(g0)
    total = xp.zeros((), dtype=g0.dtype)
    for g in grads.values():
        total += xp.vdot(g.ravel(), g.ravel()) if g.ndim else g * g
    norm = xp.sqrt(total)
    if max_norm and max_norm > 0:
        scale = xp.minimum(1.0, max_norm / (norm + 1e-6)).astype(g0.dtype)
        for g in grads.values():
            g *= scale
    return norm


class Optimizer:
    name = "base"

    def __init__(self, params: dict, lr: float):
        self.params = params
        self.lr = lr
        self.t = 0
        self.state: dict = {}

    def _buf(self, key, like):
        buf = self.state.get(key)
        if buf is None:
            xp = array_module(like)
            buf = self.state[key] = xp.zeros_like(like)
        return buf

    def step(self, grads: dict):
        self.t += 1
        for name, p in self.params.items():
            self.update(name, p, grads[name])

    def update(self, name, p, g):
        raise NotImplementedError

    def state_arrays(self) -> dict:
        return {k: to_host(v) for k, v in self.state.items()}

    def load_state_arrays(self, arrays: dict, t: int):
        xp = array_module(next(iter(self.params.values())))
        self.state = {k: to_device(v, xp) for k, v in arrays.items()}
        self.t = t


class SGD(Optimizer):
    name = "sgd"

    def update(self, name, p, g):
        p -= self.lr * g


class Adagrad(Optimizer):
    name = "adagrad"
    eps = 1e-8

    def update(self, name, p, g):
        xp = array_module(p)
        cache = self._buf(f"{name}.sq", p)
        cache += g * g
        p -= self.lr * g / (xp.sqrt(cache) + self.eps)


class RMSprop(Optimizer):
    """As in char-rnn: cache = a * cache + (1 - a) * g², step lr * g / (sqrt(cache) + eps)."""
    name = "rmsprop"
    alpha = 0.95
    eps = 1e-8

    def update(self, name, p, g):
        xp = array_module(p)
        cache = self._buf(f"{name}.sq", p)
        cache *= self.alpha
        cache += (1 - self.alpha) * g * g
        p -= self.lr * g / (xp.sqrt(cache) + self.eps)


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; beta1 0.9, beta2 0.999, eps 1e-8.

    Written in the paper's "efficient" form: the bias corrections fold into the step size and
    eps is added to sqrt(v) before correction, so it differs from PyTorch's Adam only for
    gradients below about 1e-5."""
    name = "adam"
    b1, b2, eps = 0.9, 0.999, 1e-8

    def update(self, name, p, g):
        xp = array_module(p)
        m = self._buf(f"{name}.m", p)
        v = self._buf(f"{name}.v", p)
        step = self.lr * (1 - self.b2 ** self.t) ** 0.5 / (1 - self.b1 ** self.t)
        if kernels.use_fused(p) and p.flags.c_contiguous and g.flags.c_contiguous:
            F = numpy.float32
            kernels.adam_update(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), F(step),
                                F(self.b1), F(self.b2), F(self.eps))
            return
        m *= self.b1
        m += (1 - self.b1) * g
        v *= self.b2
        g2 = g * g
        g2 *= 1 - self.b2
        v += g2
        denom = xp.sqrt(v, out=g2)
        denom += self.eps
        xp.divide(m, denom, out=denom)
        denom *= step
        p -= denom


def make_optimizer(name: str, params: dict, lr: float | None = None) -> Optimizer:
    cls = {"adam": Adam, "adagrad": Adagrad, "rmsprop": RMSprop, "sgd": SGD}.get(name)
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}: choose {', '.join(OPTIMIZERS)}")
    return cls(params, DEFAULT_LR[name] if lr is None else lr)

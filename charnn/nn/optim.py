"""Optimizers (SGD, Adagrad, RMSprop, Adam) and global-norm gradient clipping.

Each optimizer updates the parameter arrays in place on their own device and keeps its state as
named arrays (``state_arrays``/``load_state_arrays``) plus a step count, so a checkpoint can
save it and a resumed run continue exactly.
"""

from __future__ import annotations


from ..backend import array_module, to_device, to_host
from .functional import scatter_add_rows

OPTIMIZERS = ("adam", "adagrad", "rmsprop", "sgd")
DEFAULT_LR = {"adam": 3e-3, "adagrad": 1e-1, "rmsprop": 2e-3, "sgd": 1.0}


class RowGrad:
    """The gradient of a (R, D) parameter that is zero outside a few rows, e.g. an embedding
    table of which a batch uses a few hundred words: ``values`` (K, D) for the distinct
    ``rows`` (K,). Optimizers update only those rows (lazily: Adam's moments of the other rows
    are left as they are, as in PyTorch's SparseAdam), so a step costs K x D, not R x D."""

    def __init__(self, rows, values, shape):
        self.rows, self.values, self.shape = rows, values, tuple(shape)

    @classmethod
    def from_ids(cls, ids, src, shape, scatter=scatter_add_rows):
        """The gradient of ``table[ids]`` given ``src`` (M, D), the gradient of that gather;
        ``scatter``: the scatter-add to use (an engine's ops.scatter_add_rows), kept for +=."""
        xp = array_module(src)
        rows, inverse = xp.unique(ids, return_inverse=True)
        values = xp.zeros((rows.shape[0], src.shape[1]), dtype=src.dtype)
        scatter(values, inverse.reshape(-1), src)
        grad = cls(rows, values, shape)
        grad.scatter = scatter
        return grad

    scatter = staticmethod(scatter_add_rows)

    def __iadd__(self, other: "RowGrad"):
        xp = array_module(self.values)
        merged = RowGrad.from_ids(xp.concatenate([self.rows, other.rows]),
                                  xp.concatenate([self.values, other.values]), self.shape, self.scatter)
        self.rows, self.values = merged.rows, merged.values
        return self

    def __imul__(self, scale):
        self.values *= scale
        return self

    def dense(self):
        """The full (R, D) array (for checks; training never builds it)."""
        xp = array_module(self.values)
        out = xp.zeros(self.shape, dtype=self.values.dtype)
        out[self.rows] = self.values
        return out


class Grads(dict):
    """Gradients by parameter name, plus ``known_sq``: {tuple of names: their sum of squares}
    where the code that wrote those gradients also summed their squares while the values
    were in cache (the class-factored softmax's 30,000 x 200 word gradient: reading it back
    took 1-2 ms of a 50 ms step). Whoever changes a gradient in place after that calls
    :meth:`changed`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.known_sq = {}

    def changed(self, name=None):
        """Forget the known sums that cover ``name`` (all of them with None)."""
        self.known_sq = {} if name is None else {k: v for k, v in self.known_sq.items() if name not in k}


def add_grads(grads: dict, more: dict, ops=None):
    """grads += more, name by name, in place (a name only in ``more`` is taken over); a row
    gradient added to a dense one (a tied embedding) is scattered into it (with ``ops``'s
    scatter-add where given)."""
    for k, v in more.items():
        if k not in grads:
            grads[k] = v
            continue
        if isinstance(grads, Grads):
            grads.changed(k)
        if isinstance(v, RowGrad) and not isinstance(grads[k], RowGrad):
            (ops.scatter_add_rows if ops is not None else scatter_add_rows)(grads[k], v.rows, v.values)
        else:
            grads[k] += v


def global_norm(grads: dict, ops=None):
    """The L2 norm of all gradients together, a 0-d array on their device (no host sync),
    the squares summed by ``ops.sum_squares`` (an engine may use two threads). Sums a
    :class:`Grads` already knows are used as they are."""
    known = getattr(grads, "known_sq", {})
    skip = {name for names in known for name in names}
    arrays = [g.values if isinstance(g, RowGrad) else g for k, g in grads.items() if k not in skip]
    first = next(iter(grads.values()))
    first = first.values if isinstance(first, RowGrad) else first
    xp = array_module(first)
    total = xp.zeros((), dtype=first.dtype)
    for v in known.values():
        total += v
    if ops is None:
        from .ops import Ops

        ops = Ops()
    return xp.sqrt(ops.sum_squares(arrays, total))


def clip_scale(norm, max_norm: float):
    """The factor that brings a global norm down to ``max_norm`` (1 if it is below, or if
    max_norm is 0); a 0-d array like ``norm``, or None when there is no clipping."""
    if not max_norm or max_norm <= 0:
        return None
    xp = array_module(norm)
    return xp.minimum(1.0, max_norm / (norm + 1e-6)).astype(norm.dtype)


def clip_global_norm(grads: dict, max_norm: float):
    """Scale all gradients together so their global L2 norm is at most ``max_norm``.

    Stays on the device (no host sync): returns the norm before clipping as a 0-d array. (The
    trainer instead passes the scale to ``Optimizer.step``, which applies it in the same pass
    as the update.)
    """
    norm = global_norm(grads)
    scale = clip_scale(norm, max_norm)
    if scale is not None:
        for g in grads.values():
            g *= scale
        if isinstance(grads, Grads):
            grads.changed()
    return norm


class Optimizer:
    name = "base"

    slots: tuple = ()  # names of the per-parameter state arrays

    def __init__(self, params: dict, lr: float, ops=None):
        self.params = params
        self.lr = lr
        self.ops = ops
        self.t = 0
        self.state: dict = {}

    def _buf(self, key, like):
        buf = self.state.get(key)
        if buf is None:
            xp = array_module(like)
            buf = self.state[key] = xp.zeros_like(like)
        return buf

    def step(self, grads: dict, scale=None):
        """One update; ``scale`` (a 0-d array, e.g. from :func:`clip_scale`) multiplies every
        gradient first. The gradient arrays may be overwritten."""
        self.t += 1
        done = self._fused_update(grads, scale)
        for name, p in self.params.items():
            if name in done:
                continue
            g = grads[name]
            if scale is not None:
                g *= scale
            self._update_any(name, p, g)

    def _fused_update(self, grads: dict, scale) -> set:
        """Update what a compiled pass can (scale included); returns the names it updated."""
        return set()

    def _update_any(self, name, p, g):
        if isinstance(g, RowGrad):
            self._update_rows(name, p, g)
        else:
            self.update(name, p, g)

    def _update_rows(self, name, p, g: RowGrad):
        """The update of ``update`` applied to the rows of a RowGrad only: the rows of the
        parameter and of its state are gathered, updated and written back."""
        keys = [f"{name}.{slot}" for slot in self.slots]
        full = {k: self._buf(k, p) for k in keys}
        for k in keys:
            self.state[k] = full[k][g.rows]
        sub = p[g.rows]
        try:
            self.update(name, sub, g.values)
        finally:
            for k in keys:
                full[k][g.rows] = self.state[k]
                self.state[k] = full[k]
        p[g.rows] = sub

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
    slots = ("sq",)
    eps = 1e-8

    def update(self, name, p, g):
        xp = array_module(p)
        cache = self._buf(f"{name}.sq", p)
        cache += g * g
        p -= self.lr * g / (xp.sqrt(cache) + self.eps)


class RMSprop(Optimizer):
    """As in char-rnn: cache = a * cache + (1 - a) * g², step lr * g / (sqrt(cache) + eps)."""
    name = "rmsprop"
    slots = ("sq",)
    alpha = 0.95
    eps = 1e-8

    def update(self, name, p, g):
        xp = array_module(p)
        cache = self._buf(f"{name}.sq", p)
        cache *= self.alpha
        cache += (1 - self.alpha) * g * g
        p -= self.lr * g / (xp.sqrt(cache) + self.eps)


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; beta1 0.9, beta2 0.999, eps 1e-8, in PyTorch's
    form: p -= lr * m̂ / (sqrt(v̂) + eps), with m̂ = m / (1 - b1^t) and v̂ = v / (1 - b2^t).

    eps is added after the bias correction. The paper's "efficient" form (eps added to sqrt(v)
    before it, which charnn used until December 2026) makes eps count 32x larger at step 1 and
    still 1.7x at step 400; early gradients are small (global norm about 0.25 over 0.9 million
    parameters) and that form learned measurably slower per step (benchmarks/README.md,
    "Per-step learning against PyTorch").

    ``weight_decay`` (0 by default) makes it AdamW (Loshchilov & Hutter): before each update
    every weight matrix is multiplied by 1 - lr x weight_decay, with the step's scheduled lr,
    as PyTorch's AdamW does. Biases are not decayed, nor an embedding trained through row
    gradients (its unused rows are left alone, as Adam's moments of them are)."""
    name = "adam"
    slots = ("m", "v")
    b1, b2, eps = 0.9, 0.999, 1e-8
    weight_decay = 0.0

    def step(self, grads: dict, scale=None):
        if self.weight_decay:
            keep = 1.0 - self.lr * self.weight_decay
            for name, p in self.params.items():
                if p.ndim >= 2 and not isinstance(grads[name], RowGrad):
                    p *= keep
        super().step(grads, scale)

    def _fused_update(self, grads: dict, scale) -> set:
        # The operations may update some arrays in one compiled pass (engine/cpu.py).
        return set() if self.ops is None else self.ops.adam_update(self, grads, scale)

    def _step_size(self):
        """(lr / (1 - b1^t), 1 / sqrt(1 - b2^t)): p -= step * m / (sqrt(v) * inv + eps)."""
        return self.lr / (1 - self.b1 ** self.t), 1.0 / (1 - self.b2 ** self.t) ** 0.5

    def update(self, name, p, g):
        m = self._buf(f"{name}.m", p)
        v = self._buf(f"{name}.v", p)
        step, inv = self._step_size()
        xp = array_module(p)
        m *= self.b1
        m += (1 - self.b1) * g
        v *= self.b2
        g2 = g * g
        g2 *= 1 - self.b2
        v += g2
        denom = xp.sqrt(v, out=g2)
        denom *= inv
        denom += self.eps
        xp.divide(m, denom, out=denom)
        denom *= step
        p -= denom


def weight_decay_problem(name: str, lr: float | None, weight_decay: float) -> str | None:
    """Why ``weight_decay`` cannot be used with optimizer ``name`` at rate ``lr`` (None if it
    can): decoupled decay is Adam's here, and lr x weight_decay of 1 or more would zero or
    flip the weights each step."""
    if not weight_decay:
        return None
    if name != "adam":
        return f"works with the adam optimizer only, not {name}"
    if weight_decay * (DEFAULT_LR[name] if lr is None else lr) >= 1:
        return "times the learning rate must be below 1 (each step multiplies the weights by 1 - lr x weight decay)"
    return None


def make_optimizer(name: str, params: dict, lr: float | None = None, ops=None, weight_decay: float = 0.0) -> Optimizer:
    """An optimizer by name; ``ops``: the model's operations (an engine's may fuse updates);
    ``weight_decay``: Adam only (decoupled, AdamW)."""
    cls = {"adam": Adam, "adagrad": Adagrad, "rmsprop": RMSprop, "sgd": SGD}.get(name)
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}: choose {', '.join(OPTIMIZERS)}")
    lr = DEFAULT_LR[name] if lr is None else lr
    problem = weight_decay_problem(name, lr, weight_decay)
    if problem:
        raise ValueError(f"weight decay {problem}")
    opt = cls(params, lr, ops)
    if weight_decay:
        opt.weight_decay = float(weight_decay)
    return opt

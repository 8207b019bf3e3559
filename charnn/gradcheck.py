"""Check the hand-written backward pass against central differences, in float64.

For every parameter (and the initial state) the analytic gradient from ``model.backward`` is
compared with the fourth-order central difference
(-L(w + 2e) + 8 L(w + e) - 8 L(w - e) + L(w - 2e)) / (12 e), element by element, with
e = 4e-3, which balances its truncation error (O(e^4)) against rounding error (O(1e-16 / e));
measured on small models, the worst entry's error was 4x lower than at e = 1e-3. The error of one element
is |analytic - numeric| / max(|analytic|, |numeric|, floor); a parameter's error is the maximum
over the elements checked. An element whose error reaches the tolerance is differenced again
with e / 2 and keeps the smaller of its two errors: where the loss curves sharply around a
weight, the stencil's truncation error at e alone can pass the tolerance (an LSTM 2x5 with
embeddings and a class-factored head, seed 0: 1.7e-11 absolute, 1.68e-6 relative on one entry
of rnn.0.Wx at e = 4e-3, 4.6e-8 at e / 2), and halving e divides that error by 16, while a wrong
analytic gradient stays as far from both differences. Parameters with more than
``max_elements`` entries are checked on a fixed random sample of them (always including the
largest-gradient entry).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy

from . import memory
from .backend import get_backend, to_device, to_host
from .nn import cells
from .nn.model import LanguageModel, ModelConfig

# The command's smallest checks (its defaults), against which a memory estimate blames an option.
SMALL = {"T": 5, "N": 3, "hidden": 5, "layers": 1, "embed": 0}
EPS = 4e-3
EPS_RELU = 1e-4  # a relu's kink must not fall inside the stencil
FLOOR = 1e-6


@dataclass
class CheckResult:
    name: str
    shape: tuple
    checked: int
    max_rel_error: float
    max_abs_error: float
    passed: bool


def _loss(model, ids, targets, state, dropout_seed):
    rng = numpy.random.default_rng(dropout_seed)
    loss, _, _ = model.forward(ids, targets, state, train=model.config.dropout > 0, rng=rng, store=False)
    return float(to_host(loss))


def check_memory(config: ModelConfig, T: int, N: int, max_memory: int | None = None, loaded: bool = False):
    """Refuse (memory.MemoryLimitError) a check of ``config`` on a (T, N) chunk whose float64
    model, gradients and activations would pass the memory available or ``max_memory``
    (``loaded``: the model is a copy of one already in memory)."""
    shape = memory.Shape.of(config)

    def estimate(T=T, N=N, **changes):
        return memory.gradcheck(replace(shape, **changes), T, N, loaded).bytes

    options = {"--seq-len": ("T", T, SMALL["T"]), "--batch-size": ("N", N, SMALL["N"])}
    if not loaded:
        options.update({"--hidden": ("hidden", config.hidden, SMALL["hidden"]),
                        "--layers": ("layers", config.layers, SMALL["layers"]),
                        "--embed": ("embed", config.embed, SMALL["embed"])})
    subject = memory.culprit(estimate, options, f"a {config.cell} {config.layers}x{config.hidden} model")
    memory.check(memory.gradcheck(shape, T, N, loaded), subject, max_memory)


def count_checks(config: ModelConfig) -> int:
    """How many CheckResults check_model returns for a model of ``config``: one per parameter,
    one per layer's h, and one per layer's c for a cell that carries one."""
    return len(config.param_shapes()) + config.layers * (2 if cells.get(config.cell).has_c else 1)


def check_model(model: LanguageModel, ids, targets, state=None, tolerance: float = 1e-6,
                max_elements: int = 300, seed: int = 0,
                progress: Optional[Callable[[int, int], None]] = None) -> list[CheckResult]:
    """Compare analytic and numerical gradients of the mean loss on one chunk.

    Args:
        model: a model on a float64 backend.
        ids, targets: (T, N) host integer arrays.
        state: initial state (default: small random values, so its gradient is exercised).
        tolerance: the largest max relative error that passes.
        max_elements: check at most this many entries of each array.
        seed: for the initial state, the dropout masks and the entry sample.
        progress: called with (arrays checked, arrays to check) before the first check and
            after each one (for a display; it must not raise).

    Returns:
        One CheckResult per parameter, then one per state array ("state.L.h", "state.L.c").
    """
    if numpy.dtype(model.dtype) != numpy.float64:
        raise ValueError("gradient checks need a float64 model")
    xp = model.xp
    T, N = ids.shape
    rng = numpy.random.default_rng(seed)
    H = model.config.hidden
    if state is None:
        state = [(to_device(rng.normal(0, 0.5, (H, N)), xp), None if c is None else to_device(rng.normal(0, 0.5, (H, N)), xp))
                 for (_, c) in model.initial_state(N)]
    loss, cache, _ = model.forward(ids, targets, state, train=model.config.dropout > 0,
                                   rng=numpy.random.default_rng(seed + 1))
    grads, dstate = model.backward(cache)

    arrays = [(name, model.params[name], grads[name]) for name in model.config.param_shapes()]
    for layer, ((h, c), (dh, dc)) in enumerate(zip(state, dstate)):
        arrays.append((f"state.{layer}.h", h, dh))
        if c is not None:
            arrays.append((f"state.{layer}.c", c, dc))

    eps = EPS_RELU if model.config.activation == "relu" else EPS  # (only cells that accept relu use it)
    results = []
    if progress:
        progress(0, len(arrays))
    for name, arr, grad in arrays:
        g = to_host(grad).reshape(-1)
        flat = arr.reshape(-1)  # a view: perturbing it perturbs the model
        size = flat.shape[0]
        if size <= max_elements:
            idx = numpy.arange(size)
        else:
            idx = numpy.unique(numpy.concatenate([rng.choice(size, max_elements - 1, replace=False),
                                                  [int(numpy.argmax(numpy.abs(g)))]]))
        ana = g[idx]

        def errors(at, e):
            num = numpy.array([_difference(model, flat, i, e, ids, targets, state, seed + 1) for i in idx[at]])
            abs_err = numpy.abs(ana[at] - num)
            return abs_err, abs_err / numpy.maximum(numpy.maximum(numpy.abs(ana[at]), numpy.abs(num)), FLOOR)

        abs_err, rel = errors(slice(None), eps)
        again = numpy.flatnonzero(rel >= tolerance)  # (see the module docstring)
        if len(again):
            abs_half, rel_half = errors(again, eps / 2)
            better = rel_half < rel[again]
            abs_err[again[better]], rel[again[better]] = abs_half[better], rel_half[better]
        max_rel = float(rel.max()) if len(rel) else 0.0
        results.append(CheckResult(name, tuple(arr.shape), len(idx), max_rel,
                                   float(abs_err.max()) if len(abs_err) else 0.0, max_rel < tolerance))
        if progress:
            progress(len(results), len(arrays))
    return results


def _difference(model, flat, i, eps, ids, targets, state, dropout_seed) -> float:
    """The fourth-order central difference of the loss in element i of ``flat`` (a view of
    a model array) with step ``eps``; the element is restored."""
    old = float(to_host(flat[i]))
    f = []
    for step in (2, 1, -1, -2):
        flat[i] = old + step * eps
        f.append(_loss(model, ids, targets, state, dropout_seed))
    flat[i] = old
    return (-f[0] + 8 * f[1] - 8 * f[2] + f[3]) / (12 * eps)


def random_chunk(vocab_size: int, T: int, N: int, seed: int = 0):
    """Random (ids, targets), each (T, N), for a model with ``vocab_size`` tokens."""
    rng = numpy.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, (T + 1, N))
    return ids[:-1], ids[1:]


def check_config(config: ModelConfig, T: int = 5, N: int = 3, seed: int = 0, tolerance: float = 1e-6,
                 device: str = "cpu", max_elements: int = 300,
                 progress: Optional[Callable[[int, int], None]] = None,
                 max_memory: int | None = None) -> list[CheckResult]:
    """Build a float64 model with ``config`` and check it on a random chunk (``progress``: as
    check_model's), unless it would pass the memory available or ``max_memory`` bytes
    (memory.MemoryLimitError, before anything is allocated)."""
    check_memory(config, T, N, max_memory)
    model = LanguageModel.create(config, seed=seed, backend=get_backend(device, "float64"))
    # Random biases too, so no gradient is trivially zero.
    rng = numpy.random.default_rng(seed + 7)
    for name, p in model.params.items():
        if name.endswith((".b", ".bhn", "head.b")):
            p[...] = to_device(rng.normal(0, 0.1, p.shape), model.xp)
    ids, targets = random_chunk(config.vocab_size, T, N, seed)
    return check_model(model, ids, targets, tolerance=tolerance, seed=seed, max_elements=max_elements,
                       progress=progress)

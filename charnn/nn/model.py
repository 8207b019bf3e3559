"""The language model: embedding or one-hot input, a stack of recurrent layers, a softmax head.

Parameters live in one flat dict under dotted names, and gradients use the same names:

    embed.W      (V, E)      input embedding (absent when E = 0: one-hot input, as in char-rnn)
    rnn.L.Wx     (G*H, In)   layer L's input weights   (In = V for one-hot, E, or H above layer 0)
    rnn.L.Wh     (G*H, H)    layer L's recurrent weights
    rnn.L.b      (G*H,)      layer L's bias
    rnn.L.NAME               the cell's extra parameters (GRU: bhn (H,), the n gate's hidden bias)
    head.W       (V, H)      output weights (absent when tied to embed.W, which needs E = H)
    head.b       (V,)        output bias
    class.W      (C, H)      class-factored softmax only: class weights (see functional.py)
    class.b      (C,)        class-factored softmax only: class bias

Shapes and equations of the layers are in cells.py, whose registry says what each cell is.
Dropout (inverted) is applied to every recurrent layer's output, between layers and before the
head, during training only. A state is a list with one (h, c) pair per layer, each (H, N); c
is None for cells without a cell state.

The model computes with its backend's operations (``self.ops``: ops.py's reference, or an
engine's subclass of it); its maths methods take an ``ops`` argument so that a parallel
strategy (engine/parallel.py) can run them with operations derived for its needs. The model
itself never asks which path it is on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy

from ..backend import Backend, get_backend, to_device, to_host
from . import cells
from .functional import class_log_probs, dropout_mask
from .ops import Ops
from .optim import Grads, RowGrad


def join_states(xp, s0, s1) -> list:
    """The state of two column halves, joined back along the stream axis."""
    return [(xp.concatenate([h0, h1], axis=1), None if c0 is None else xp.concatenate([c0, c1], axis=1))
            for (h0, c0), (h1, c1) in zip(s0, s1)]


class ModelError(ValueError):
    """A model configuration or parameter set is invalid."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    cell: str = cells.DEFAULT_CELL
    layers: int = 2
    hidden: int = 256
    embed: int = 0
    dropout: float = 0.0
    activation: str = "tanh"  # of the cells that take one (cells.Cell.takes_activation): the RNN
    tie: bool = False
    class_bounds: tuple = ()  # class-factored softmax: word-id boundaries [0, ..., V]; () = full

    def __post_init__(self):
        object.__setattr__(self, "class_bounds", tuple(int(v) for v in self.class_bounds))
        if not isinstance(self.cell, str) or self.cell not in cells.CELLS:
            raise ModelError(f"unknown cell {self.cell!r}: choose {', '.join(cells.CELLS)}")
        for name in ("vocab_size", "layers", "hidden"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ModelError(f"{name} must be a positive integer")
        if not isinstance(self.embed, int) or self.embed < 0:
            raise ModelError("embed must be 0 (one-hot) or a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError("dropout must be in [0, 1)")
        if self.activation not in cells.activations():
            raise ModelError(f"activation must be {' or '.join(cells.activations())}")
        if self.tie and self.embed != self.hidden:
            raise ModelError("tied weights need --embed equal to --hidden")
        cb = self.class_bounds
        if cb and (len(cb) < 2 or cb[0] != 0 or cb[-1] != self.vocab_size or any(a >= b for a, b in zip(cb, cb[1:]))):
            raise ModelError("class_bounds must rise strictly from 0 to the vocabulary size")

    @property
    def gates(self) -> int:
        return cells.get(self.cell).gates

    @property
    def n_classes(self) -> int:
        return max(0, len(self.class_bounds) - 1)

    def to_json(self) -> dict:
        d = asdict(self)
        d["class_bounds"] = list(self.class_bounds)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ModelError("model config is malformed")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ModelError(f"model config has unknown fields: {', '.join(sorted(unknown))}")
        try:
            return cls(**d)
        except (TypeError, ValueError, OverflowError) as e:
            raise ModelError(f"model config is malformed: {e}") from None

    def layer_shapes(self, layer: int) -> dict:
        """The shapes of one recurrent layer's parameters, by their short names (Wx, Wh, b and
        the cell's extra ones); every layer above the first has the same."""
        E, H, G = self.embed, self.hidden, self.gates
        In = (E or self.vocab_size) if layer == 0 else H
        shapes = {"Wx": (G * H, In), "Wh": (G * H, H), "b": (G * H,)}
        for name, shape in cells.get(self.cell).extra.items():
            shapes[name] = shape(H)
        return shapes

    def outer_shapes(self) -> dict:
        """The shapes of the parameters outside the recurrent layers (embedding, head, classes)."""
        V, E, H = self.vocab_size, self.embed, self.hidden
        shapes = {}
        if E:
            shapes["embed.W"] = (V, E)
        if not self.tie:
            shapes["head.W"] = (V, H)
        shapes["head.b"] = (V,)
        if self.class_bounds:
            shapes["class.W"] = (self.n_classes, H)
            shapes["class.b"] = (self.n_classes,)
        return shapes

    def param_shapes(self) -> dict:
        outer = self.outer_shapes()
        shapes = {"embed.W": outer.pop("embed.W")} if "embed.W" in outer else {}
        for layer in range(self.layers):
            shapes.update({f"rnn.{layer}.{name}": s for name, s in self.layer_shapes(layer).items()})
        shapes.update(outer)
        return shapes

    def n_params(self) -> int:
        """The parameter count, from the shapes of the first two layers (no loop over the
        layers, so a crafted or mistyped layer count costs nothing to count)."""
        def size(shapes):
            return sum(math.prod(s) for s in shapes.values())

        above = size(self.layer_shapes(1)) * (self.layers - 1) if self.layers > 1 else 0
        return size(self.outer_shapes()) + size(self.layer_shapes(0)) + above


def init_params(config: ModelConfig, seed: int = 0, forget_bias: float = cells.FORGET_BIAS,
                input_scale: float = cells.INPUT_SCALE) -> dict:
    """Host (float64 NumPy) parameters: recurrent and head weights U(-1/sqrt(H), 1/sqrt(H)) as
    PyTorch does, other biases 0 but for what the cell's init_bias sets (the LSTM's forget gate
    to ``forget_bias``, rows H:2H of each rnn.L.b); embeddings N(0, 1) as PyTorch's
    nn.Embedding (U(-0.1, 0.1) when tied to the output layer, where unit-scale weights would
    start with very large logits).

    ``input_scale`` > 0 (one-hot input only) draws layer 0's input weights U(-input_scale,
    input_scale) instead: the same uniform draws, scaled, so every other parameter is what it
    would be with 0. A one-hot input picks one column of them, so at 1/sqrt(H) the input moves
    the gates by a few hundredths where an N(0, 1) embedding of size H moves them by about 0.6
    (U(-1, 1) gives that).

    The forget bias is 0 by default, as PyTorch's: on tiny Shakespeare 1 (the default until
    December 2026) was 0.19-0.26 nats/char behind at step 800 (benchmarks/README.md, "The
    forget bias").

    The embedding scale matters: on PTB (benchmarks/ptb.py's model, 6 epochs) N(0, 1) gave a
    test perplexity of 250 against 275 with U(-0.1, 0.1), which leaves the input's share of
    the gate pre-activations (about 0.03 against 0.6) too small to learn from quickly."""
    if not math.isfinite(forget_bias):
        raise ModelError(f"forget_bias must be a finite number, got {forget_bias}")
    if not (math.isfinite(input_scale) and input_scale >= 0):
        raise ModelError(f"input_scale must be a finite number >= 0, got {input_scale}")
    rng = numpy.random.default_rng(seed)
    k = 1.0 / math.sqrt(config.hidden)
    params = {}
    for name, shape in config.param_shapes().items():
        if name == "embed.W":
            params[name] = rng.uniform(-0.1, 0.1, shape) if config.tie else rng.standard_normal(shape)
        elif name.endswith(".b") or (name.startswith("rnn.") and name.rsplit(".", 1)[1] not in ("Wx", "Wh")):
            params[name] = numpy.zeros(shape)  # biases and the cell's extra parameters
        else:
            params[name] = rng.uniform(-k, k, shape)
            if name == "rnn.0.Wx" and not config.embed and input_scale:
                params[name] *= input_scale / k
    init_bias = cells.get(config.cell).init_bias
    if init_bias is not None:
        for layer in range(config.layers):
            init_bias(params[f"rnn.{layer}.b"], config.hidden, forget_bias)
    return params


class LanguageModel:
    """A recurrent language model on one backend.

    Args:
        config: the architecture.
        params: name -> array (host arrays are moved to the backend and cast to its dtype).
        backend: where to compute (default: CPU, float32), and with which operations.
    """

    def __init__(self, config: ModelConfig, params: dict, backend: Backend | None = None):
        self.config = config
        self.backend = backend or get_backend("cpu", "float32")
        self.xp = self.backend.xp
        self.ops = self.backend.ops if self.backend.ops is not None else Ops()
        expected = config.param_shapes()
        if set(params) != set(expected):
            missing = sorted(set(expected) - set(params))
            extra = sorted(set(params) - set(expected))
            raise ModelError(f"parameters do not match the architecture (missing: {missing or 'none'}, unexpected: {extra or 'none'})")
        for name, shape in expected.items():
            if tuple(params[name].shape) != shape:
                raise ModelError(f"parameter {name} has shape {tuple(params[name].shape)}, expected {shape}")
        # Always a private copy: the caller's arrays (e.g. a checkpoint's) are never trained in place.
        self.params = {k: to_device(numpy.array(to_host(v), dtype=self.backend.dtype), self.xp) for k, v in params.items()}

    @classmethod
    def create(cls, config: ModelConfig, seed: int = 0, backend: Backend | None = None,
               forget_bias: float = cells.FORGET_BIAS, input_scale: float = cells.INPUT_SCALE) -> "LanguageModel":
        return cls(config, init_params(config, seed, forget_bias, input_scale), backend)

    @property
    def dtype(self):
        return self.backend.dtype

    def host_params(self) -> dict:
        """A host copy of the parameters (a snapshot: later training does not change it)."""
        return {k: numpy.array(to_host(v)) for k, v in self.params.items()}

    def head_weight(self):
        return self.params["embed.W"] if self.config.tie else self.params["head.W"]

    # ----- state -----
    def initial_state(self, N: int) -> list:
        H, xp = self.config.hidden, self.xp
        has_c = cells.get(self.config.cell).has_c
        return [(xp.zeros((H, N), dtype=self.dtype), xp.zeros((H, N), dtype=self.dtype) if has_c else None)
                for _ in range(self.config.layers)]

    def check_ids(self, ids, what="token ids"):
        """ids as a host array, or a ModelError when one is outside the vocabulary."""
        ids = numpy.asarray(ids)
        if ids.size == 1:  # sampling's one token a step: NumPy's min and max would cost 20 us
            bad = not 0 <= ids.flat[0] < self.config.vocab_size
        else:
            bad = ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size)
        if bad:
            raise ModelError(f"{what} out of range for a vocabulary of {self.config.vocab_size}")
        return ids

    def layer_extra(self, layer: int) -> dict:
        """The cell's extra parameters of a layer, by their short names."""
        return {name: self.params[f"rnn.{layer}.{name}"] for name in cells.get(self.config.cell).extra}

    # ----- the chunk forward and backward -----
    def forward(self, ids, targets=None, state=None, train=False, rng=None, weights=None, store=None,
                dropout_masks=None, ops=None):
        """Run the model over a chunk.

        Args:
            ids: (T, N) host integer array of input tokens.
            targets: (T, N) host integer array of next tokens, or None for no loss.
            state: the carried state (default zeros).
            train: apply dropout (masks drawn from ``rng``).
            weights: optional (T, N) host array; 0 masks a position out of the loss.
            store: keep what backward needs (default: when there are targets).
            dropout_masks: masks to use instead of drawing them (one (H, T, N) per layer).
            ops: the operations to compute with (default: the backend's).

        Returns:
            (loss, cache, state): loss a 0-d array of mean nats per (weighted) token, or None;
            cache for :meth:`backward`; the final state. With store=False, cache holds only
            "nll" (T, N) and "top" (H, M).
        """
        ids = self.check_ids(ids)
        T, N = ids.shape
        if store is None:
            store = targets is not None
        X, cache, new_state = self.body_forward(ids, state, train, rng, dropout_masks, store, ops)
        loss = None
        if targets is not None:
            loss, nll, cache["head"] = self.head_forward(X, targets, weights, store, ops)
            cache["nll"] = nll.reshape(T, N)
        return loss, cache, new_state

    def body_forward(self, ids, state, train, rng, dropout_masks, store, ops=None):
        """The recurrent layers over a chunk (ids (T, N), already checked): returns the top
        hidden states X (H, T*N) after dropout, the cache, and the final state."""
        cfg, p, xp = self.config, self.params, self.xp
        ops = ops or self.ops
        T, N = ids.shape
        M = T * N
        if state is None:
            state = self.initial_state(N)
        ids_d = to_device(ids.reshape(M), xp)
        X = None
        if cfg.embed:
            X = p["embed.W"][ids_d].T  # (E, M)
        layer_caches, inputs, masks, new_state = [], [], [], []
        for layer in range(cfg.layers):
            XP = ops.input_projection(p[f"rnn.{layer}.Wx"], p[f"rnn.{layer}.b"], X, ids_d)
            h0, c0 = state[layer]
            hs, st, lc = ops.layer_forward(cfg.cell, XP.reshape(-1, T, N), p[f"rnn.{layer}.Wh"], h0, c0,
                                           self.layer_extra(layer), store, cfg.activation)
            new_state.append(st)
            inputs.append(X)
            layer_caches.append(lc)
            mask = None
            if train and cfg.dropout > 0:
                if dropout_masks is not None:
                    mask = dropout_masks[layer]
                elif rng is None:
                    raise ModelError("training with dropout needs a random generator (rng)")
                else:
                    mask = dropout_mask(hs.shape, cfg.dropout, rng, xp, self.dtype)
                hs = hs * mask
            masks.append(mask)
            X = hs.reshape(cfg.hidden, M)
        cache = {"top": X}
        if store:
            cache.update(ids=ids_d, layers=layer_caches, inputs=inputs, masks=masks, T=T, N=N)
        return X, cache, new_state

    def head_forward(self, X, targets, weights, store, ops=None):
        """The output layer's loss on top states X (H, M): (loss, nll (M,), head cache)."""
        cfg, p, xp = self.config, self.params, self.xp
        ops = ops or self.ops
        targets = self.check_ids(targets, "target ids")
        M = X.shape[1]
        t_d = to_device(targets.reshape(M), xp)
        w_d = None if weights is None else to_device(numpy.asarray(weights).reshape(M), xp, self.dtype)
        if cfg.class_bounds:
            return ops.class_xent_forward(X, p["class.W"], p["class.b"], self.head_weight(), p["head.b"],
                                          cfg.class_bounds, targets.reshape(M), t_d, w_d, store)
        return ops.softmax_xent_forward(X, self.head_weight(), p["head.b"], t_d, w_d, store)

    def backward(self, cache, sparse=False, ops=None):
        """Gradients of the loss of :meth:`forward` (called with targets and store=True).

        With ``sparse``, an untied embedding's gradient is an optim.RowGrad holding only the
        rows of the tokens in the chunk (the optimizers update just those rows).

        Returns:
            (grads, dstate): grads a dict with the parameter names; dstate the gradient with
            respect to the initial state, in the state's layout.
        """
        grads = Grads()
        dX = self.head_backward(cache["head"], grads, ops)
        dstate = self.body_backward(dX, cache, grads, sparse, ops)
        return grads, dstate

    def head_loss_and_grads(self, X, targets, grads, ops=None):
        """head_forward (no weights) and head_backward at once: (loss, dX). A class-factored
        head then runs each class's forward and backward back to back."""
        cfg, p = self.config, self.params
        ops = ops or self.ops
        if not cfg.class_bounds:
            loss, _, hcache = self.head_forward(X, targets, None, True, ops)
            return loss, self.head_backward(hcache, grads, ops)
        targets = self.check_ids(targets, "target ids")
        loss, _, (dX, grads["class.W"], grads["class.b"], dW, db), sq = ops.class_xent_forward_backward(
            X, p["class.W"], p["class.b"], self.head_weight(), p["head.b"], cfg.class_bounds, targets.reshape(-1))
        self._put_head_grads(grads, dW, db, sq)
        return loss, dX

    def head_backward(self, hcache, grads, ops=None) -> object:
        """The output layer's gradients, put into ``grads``; returns dX (H, M)."""
        cfg, p = self.config, self.params
        ops = ops or self.ops
        if cfg.class_bounds:
            dX, grads["class.W"], grads["class.b"], dW, db = ops.class_xent_backward(hcache, p["class.W"], self.head_weight())
        else:
            dX, dW, db = ops.softmax_xent_backward(hcache, self.head_weight())
        self._put_head_grads(grads, dW, db, hcache.get("words_sq"))
        return dX

    def _put_head_grads(self, grads, dW, db, sq=None):
        """The output weights' and bias's gradients into ``grads`` (the weights under
        embed.W when tied), with ``sq``, the sum of their squares, if the pass that wrote
        them gave one (see optim.Grads)."""
        name = "embed.W" if self.config.tie else "head.W"
        grads["head.b"], grads[name] = db, dW
        if sq is not None and isinstance(grads, Grads):
            grads.known_sq[(name, "head.b")] = sq

    def body_backward(self, dX, cache, grads, sparse, ops=None):
        """Backpropagate dX (H, M), the gradient of the top states, through the recurrent
        layers and the input; adds their gradients to ``grads``; returns dstate. (With an
        engine's deferred products some gradients are complete only once those have run:
        see engine/parallel.py.)"""
        cfg, p = self.config, self.params
        ops = ops or self.ops
        T, N, ids_d = cache["T"], cache["N"], cache["ids"]
        M = T * N
        dstate = [None] * cfg.layers
        for layer in reversed(range(cfg.layers)):
            dhs = dX.reshape(cfg.hidden, T, N)
            if cache["masks"][layer] is not None:
                dhs = dhs * cache["masks"][layer]
            dXP, dWh, dextra, dh0, dc0 = ops.layer_backward(cfg.cell, dhs, cache["layers"][layer], p[f"rnn.{layer}.Wh"])
            grads[f"rnn.{layer}.Wh"] = dWh
            for name, g in dextra.items():
                grads[f"rnn.{layer}.{name}"] = g
            dstate[layer] = (dh0, dc0)
            dWx, db, dX = ops.input_grads(p[f"rnn.{layer}.Wx"], dXP.reshape(-1, M), cache["inputs"][layer], ids_d)
            grads[f"rnn.{layer}.b"], grads[f"rnn.{layer}.Wx"] = db, dWx
        self._embed_grad(ids_d, dX, grads, sparse, ops)
        return dstate

    def _embed_grad(self, ids_d, dX, grads, sparse, ops):
        """The embedding's gradient from dX (E, M), the gradient of the looked-up vectors
        (added to the output layer's when tied; a RowGrad with ``sparse`` otherwise)."""
        if not self.config.embed:
            return
        xp, shape = self.xp, self.params["embed.W"].shape
        dE = grads.get("embed.W")
        if sparse and dE is None:
            grads["embed.W"] = RowGrad.from_ids(ids_d, dX.T, shape, ops.scatter_add_rows)
        else:
            dE = xp.zeros(shape, dtype=self.dtype) if dE is None else dE
            ops.scatter_add_rows(dE, ids_d, dX.T)
            grads["embed.W"] = dE
            if isinstance(grads, Grads):
                grads.changed("embed.W")

    # ----- whole chunks -----
    def loss_and_grads(self, ids, targets, state=None, train=True, rng=None, sparse=False, dropout_masks=None):
        """Mean loss, gradients and final state of one training chunk. Dropout masks are drawn
        here, in one order, so results do not depend on how the operations split the work
        (an engine may split the streams across cores: engine/parallel.py).

        ``sparse``: an untied embedding's gradient as an optim.RowGrad (see :meth:`backward`).
        ``dropout_masks``: masks to use instead of drawing them (one (H, T, N) per layer; a
        data-parallel rank's columns of the masks of the whole batch).

        Returns:
            (loss, grads, state): loss a 0-d array (mean nats per token).
        """
        cfg, xp = self.config, self.xp
        ids = self.check_ids(ids)
        T, N = ids.shape
        if state is None:
            state = self.initial_state(N)
        masks = dropout_masks if train and cfg.dropout > 0 else None
        if train and cfg.dropout > 0 and masks is None:
            if rng is None:
                raise ModelError("training with dropout needs a random generator (rng)")
            masks = [dropout_mask((cfg.hidden, T, N), cfg.dropout, rng, xp, self.dtype) for _ in range(cfg.layers)]
        return self.ops.loss_and_grads(self, ids, targets, state, masks, train, sparse)

    def nll(self, ids, targets, state=None, weights=None):
        """Per-position negative log-likelihood (T, N) and the final state, without dropout or a
        cache."""
        ids = self.check_ids(ids)
        if state is None:
            state = self.initial_state(ids.shape[1])
        return self.ops.nll(self, ids, targets, state, weights)

    # ----- one step at a time, for sampling -----
    def step(self, ids, state):
        """Advance N streams by one token each.

        Args:
            ids: (N,) host integer array.
            state: the current state (from :meth:`initial_state` or a previous step).

        Returns:
            (logits, state): logits (N, V) on the backend; the new state.
        """
        ids = numpy.asarray(ids).reshape(1, -1)
        _, cache, state = self.forward(ids, None, state, store=False)
        return self.logits(cache["top"]), state

    def stepper(self, N: int = 1, packed: bool = False):
        """An object that advances N streams a token at a time (Stepper's interface), the
        operations' fastest; ``packed``: with the engine's packed products where it has them
        (engine/stepper.py; the server's scheduler times both)."""
        return self.ops.stepper(self, N, packed)

    def logits(self, X):
        """Next-token logits (M, V) from top hidden states X (H, M). With the class-factored
        softmax these are the exact log-probabilities (also valid logits)."""
        p = self.params
        if self.config.class_bounds:
            return class_log_probs(X, p["class.W"], p["class.b"], self.head_weight(), p["head.b"], self.config.class_bounds)
        logits = X.T @ self.head_weight().T
        logits += p["head.b"]
        return logits

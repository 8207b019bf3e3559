"""The language model: embedding or one-hot input, a stack of recurrent layers, a softmax head.

Parameters live in one flat dict under dotted names, and gradients use the same names:

    embed.W      (V, E)      input embedding (absent when E = 0: one-hot input, as in char-rnn)
    rnn.L.Wx     (G*H, In)   layer L's input weights   (In = V for one-hot, E, or H above layer 0)
    rnn.L.Wh     (G*H, H)    layer L's recurrent weights
    rnn.L.b      (G*H,)      layer L's bias
    rnn.L.bhn    (H,)        GRU only: the hidden bias of the n gate
    head.W       (V, H)      output weights (absent when tied to embed.W, which needs E = H)
    head.b       (V,)        output bias
    class.W      (C, H)      class-factored softmax only: class weights (see functional.py)
    class.b      (C,)        class-factored softmax only: class bias

Shapes and equations of the layers are in cells.py. Dropout (inverted) is applied to every
recurrent layer's output, between layers and before the head, during training only.
A state is a list with one (h, c) pair per layer, each (H, N); c is None except for LSTM.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields

import numpy

from . import backend as backend_mod
from . import cells, kernels, rowsplit
from .backend import SMALL_GEMM_FLOPS, Backend, blas_threads, get_backend, to_device, to_host
from .functional import (class_log_probs, class_xent_backward, class_xent_forward, class_xent_forward_backward, dropout_mask,
                         scatter_add_rows, softmax_xent_backward, softmax_xent_forward)
from .optim import Grads, RowGrad

CELLS = ("rnn", "lstm", "gru")
# Threads that split a batch's streams (see LanguageModel.split_columns); CHARNN_THREADS=1 turns
# the split off.
THREADS = backend_mod.THREADS
# From this many FLOPs of weight-gradient products per half batch, the halves share them at
# their ends (backend.Deferred): (b), 20 GFLOP a half, 1.08-1.14x faster a step; (a), 0.1,
# 5% slower (benchmarks/README.md).
DEFER_FLOPS = 1e9
# The LSTM forget gate's initial bias (init_params); runs saved before it was an option used 1.
FORGET_BIAS = 1.0


def _join_states(xp, s0, s1) -> list:
    """The state of two column halves, joined back along the stream axis."""
    return [(xp.concatenate([h0, h1], axis=1), None if c0 is None else xp.concatenate([c0, c1], axis=1))
            for (h0, c0), (h1, c1) in zip(s0, s1)]


def _add_grads(grads: dict, more: dict):
    """grads += more, name by name, in place (a name only in ``more`` is taken over); a row
    gradient added to a dense one (a tied embedding) is scattered into it."""
    for k, v in more.items():
        if k not in grads:
            grads[k] = v
            continue
        if isinstance(grads, Grads):
            grads.changed(k)
        if isinstance(v, RowGrad) and not isinstance(grads[k], RowGrad):
            scatter_add_rows(grads[k], v.rows, v.values)
        else:
            grads[k] += v


def _rows_in_two(fn, rows: int, two: bool):
    """fn(slice) over rows [0, rows): two halves in two threads with ``two``, else at once."""
    if not two:
        fn(slice(0, rows))
        return
    backend_mod.run_in_two(fn, slice(0, rows // 2), slice(rows // 2, rows))


class ModelError(ValueError):
    """A model configuration or parameter set is invalid."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    cell: str = "lstm"
    layers: int = 2
    hidden: int = 256
    embed: int = 0
    dropout: float = 0.0
    activation: str = "tanh"  # RNN only: tanh or relu
    tie: bool = False
    class_bounds: tuple = ()  # class-factored softmax: word-id boundaries [0, ..., V]; () = full

    def __post_init__(self):
        object.__setattr__(self, "class_bounds", tuple(int(v) for v in self.class_bounds))
        if self.cell not in CELLS:
            raise ModelError(f"unknown cell {self.cell!r}: choose rnn, lstm or gru")
        for name in ("vocab_size", "layers", "hidden"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ModelError(f"{name} must be a positive integer")
        if not isinstance(self.embed, int) or self.embed < 0:
            raise ModelError("embed must be 0 (one-hot) or a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ModelError("dropout must be in [0, 1)")
        if self.activation not in ("tanh", "relu"):
            raise ModelError("activation must be tanh or relu")
        if self.tie and self.embed != self.hidden:
            raise ModelError("tied weights need --embed equal to --hidden")
        cb = self.class_bounds
        if cb and (len(cb) < 2 or cb[0] != 0 or cb[-1] != self.vocab_size or any(a >= b for a, b in zip(cb, cb[1:]))):
            raise ModelError("class_bounds must rise strictly from 0 to the vocabulary size")

    @property
    def gates(self) -> int:
        return cells.GATES[self.cell]

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

    def param_shapes(self) -> dict:
        V, E, H, G = self.vocab_size, self.embed, self.hidden, self.gates
        shapes = {}
        if E:
            shapes["embed.W"] = (V, E)
        for layer in range(self.layers):
            In = (E or V) if layer == 0 else H
            shapes[f"rnn.{layer}.Wx"] = (G * H, In)
            shapes[f"rnn.{layer}.Wh"] = (G * H, H)
            shapes[f"rnn.{layer}.b"] = (G * H,)
            if self.cell == "gru":
                shapes[f"rnn.{layer}.bhn"] = (H,)
        if not self.tie:
            shapes["head.W"] = (V, H)
        shapes["head.b"] = (V,)
        if self.class_bounds:
            shapes["class.W"] = (self.n_classes, H)
            shapes["class.b"] = (self.n_classes,)
        return shapes

    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes().values())


def init_params(config: ModelConfig, seed: int = 0, forget_bias: float = FORGET_BIAS) -> dict:
    """Host (float64 NumPy) parameters: recurrent and head weights U(-1/sqrt(H), 1/sqrt(H)) as
    PyTorch does, LSTM forget-gate bias ``forget_bias`` (rows H:2H of each rnn.L.b), other
    biases 0; embeddings N(0, 1) as PyTorch's nn.Embedding (U(-0.1, 0.1) when tied to the
    output layer, where unit-scale weights would start with very large logits).

    The forget bias is 1 by default; PyTorch's 0 learned no better per step (benchmarks/README.md,
    "Per-step learning against PyTorch").

    The embedding scale matters: on PTB (benchmarks/ptb.py's model, 6 epochs) N(0, 1) gave a
    test perplexity of 250 against 275 with U(-0.1, 0.1), which leaves the input's share of
    the gate pre-activations (about 0.03 against 0.6) too small to learn from quickly."""
    if not math.isfinite(forget_bias):
        raise ModelError(f"forget_bias must be a finite number, got {forget_bias}")
    rng = numpy.random.default_rng(seed)
    k = 1.0 / math.sqrt(config.hidden)
    params = {}
    for name, shape in config.param_shapes().items():
        if name == "embed.W":
            params[name] = rng.uniform(-0.1, 0.1, shape) if config.tie else rng.standard_normal(shape)
        elif name == "class.b":
            params[name] = numpy.zeros(shape)
        elif name.endswith((".b", ".bhn")):
            params[name] = numpy.zeros(shape)
        else:
            params[name] = rng.uniform(-k, k, shape)
    if config.cell == "lstm":
        H = config.hidden
        for layer in range(config.layers):
            params[f"rnn.{layer}.b"][H: 2 * H] = forget_bias
    return params


class LanguageModel:
    """A recurrent language model on one backend.

    Args:
        config: the architecture.
        params: name -> array (host arrays are moved to the backend and cast to its dtype).
        backend: where to compute (default: CPU, float32).
    """

    def __init__(self, config: ModelConfig, params: dict, backend: Backend | None = None):
        self.config = config
        self.backend = backend or get_backend("cpu", "float32")
        self.xp = self.backend.xp
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
               forget_bias: float = FORGET_BIAS) -> "LanguageModel":
        return cls(config, init_params(config, seed, forget_bias), backend)

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
        lstm = self.config.cell == "lstm"
        return [(xp.zeros((H, N), dtype=self.dtype), xp.zeros((H, N), dtype=self.dtype) if lstm else None)
                for _ in range(self.config.layers)]

    def _check_ids(self, ids, what="token ids"):
        ids = numpy.asarray(ids)
        if ids.size == 1:  # sampling's one token a step: NumPy's min and max would cost 20 us
            bad = not 0 <= ids.flat[0] < self.config.vocab_size
        else:
            bad = ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size)
        if bad:
            raise ModelError(f"{what} out of range for a vocabulary of {self.config.vocab_size}")
        return ids

    # ----- the chunk forward and backward -----
    def input_projection(self, layer: int, X, ids_d, two=False):
        """Wx @ X + b for a layer over a chunk: (G*H, M). Layer 0 with one-hot input gathers
        columns of Wx instead of multiplying by a one-hot matrix. ``two``: halves of the rows
        in two threads (the caller holds the BLAS at one thread)."""
        p = self.params
        Wx, b = p[f"rnn.{layer}.Wx"], p[f"rnn.{layer}.b"]
        if X is None and kernels.use_fused(Wx):
            XP = numpy.empty((Wx.shape[0], ids_d.shape[0]), dtype=Wx.dtype)
            _rows_in_two(lambda r: kernels.onehot_projection(Wx[r], b[r], ids_d, XP[r]), Wx.shape[0], two)
            return XP
        if X is None:
            XP = self.xp.take(Wx, ids_d, axis=1)
        elif two:
            XP = numpy.empty((Wx.shape[0], X.shape[1]), dtype=Wx.dtype)
            _rows_in_two(lambda r: numpy.matmul(Wx[r], X, out=XP[r]), Wx.shape[0], two)
        else:
            XP = Wx @ X
        XP += b[:, None]
        return XP

    def forward(self, ids, targets=None, state=None, train=False, rng=None, weights=None, store=None,
                dropout_masks=None):
        """Run the model over a chunk.

        Args:
            ids: (T, N) host integer array of input tokens.
            targets: (T, N) host integer array of next tokens, or None for no loss.
            state: the carried state (default zeros).
            train: apply dropout (masks drawn from ``rng``).
            weights: optional (T, N) host array; 0 masks a position out of the loss.
            store: keep what backward needs (default: when there are targets).
            dropout_masks: masks to use instead of drawing them (one (H, T, N) per layer).

        Returns:
            (loss, cache, state): loss a 0-d array of mean nats per (weighted) token, or None;
            cache for :meth:`backward`; the final state. With store=False, cache holds only
            "nll" (T, N) and "top" (H, M).
        """
        ids = self._check_ids(ids)
        T, N = ids.shape
        if store is None:
            store = targets is not None
        X, cache, new_state = self._body_forward(ids, state, train, rng, dropout_masks, store)
        loss = None
        if targets is not None:
            loss, nll, cache["head"] = self._head_forward(X, targets, weights, store)
            cache["nll"] = nll.reshape(T, N)
        return loss, cache, new_state

    def _body_forward(self, ids, state, train, rng, dropout_masks, store, two=False):
        """The recurrent layers over a chunk (ids (T, N), already checked): returns the top
        hidden states X (H, T*N) after dropout, the cache, and the final state. ``two``: the
        whole batch on two cores, each layer split by hidden units (rowsplit.py)."""
        cfg, p, xp = self.config, self.params, self.xp
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
            Wh = p[f"rnn.{layer}.Wh"]
            XP = self.input_projection(layer, X, ids_d, two)
            h0, c0 = state[layer]
            if two:
                hs, st, lc = rowsplit.lstm_forward(XP.reshape(-1, T, N), Wh, h0, c0, store)
            else:
                hs, st, lc = cells.layer_forward(cfg.cell, XP.reshape(-1, T, N), Wh, h0, c0,
                                                 p.get(f"rnn.{layer}.bhn"), cfg.activation, store)
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
            cache.update(ids=ids_d, layers=layer_caches, inputs=inputs, masks=masks, T=T, N=N, two=two)
        return X, cache, new_state

    def _head_forward(self, X, targets, weights, store, threads=1):
        """The output layer's loss on top states X (H, M): (loss, nll (M,), head cache)."""
        cfg, p, xp = self.config, self.params, self.xp
        targets = self._check_ids(targets, "target ids")
        M = X.shape[1]
        t_d = to_device(targets.reshape(M), xp)
        w_d = None if weights is None else to_device(numpy.asarray(weights).reshape(M), xp, self.dtype)
        if cfg.class_bounds:
            return class_xent_forward(X, p["class.W"], p["class.b"], self.head_weight(), p["head.b"],
                                      cfg.class_bounds, targets.reshape(M), t_d, w_d, store, threads)
        return softmax_xent_forward(X, self.head_weight(), p["head.b"], t_d, w_d, store)

    def backward(self, cache, sparse=False, defer=None):
        """Gradients of the loss of :meth:`forward` (called with targets and store=True).

        With ``sparse``, an untied embedding's gradient is an optim.RowGrad holding only the
        rows of the tokens in the chunk (the optimizers update just those rows). With
        ``defer`` (backend.Deferred.put), the recurrent and input weight gradients' products
        are handed over as deferred work: those gradients are complete only once it has run.

        Returns:
            (grads, dstate): grads a dict with the parameter names; dstate the gradient with
            respect to the initial state, in the state's layout.
        """
        grads = Grads()
        dX = self._head_backward(cache["head"], grads)
        dstate = self._body_backward(dX, cache, grads, sparse, defer)
        return grads, dstate

    def _head_loss_and_grads(self, X, targets, grads, threads):
        """_head_forward (no weights) and _head_backward at once: (loss, dX). A class-factored
        head then runs each class's two compiled passes back to back (functional.
        class_xent_forward_backward)."""
        cfg, p = self.config, self.params
        if not cfg.class_bounds:
            loss, _, hcache = self._head_forward(X, targets, None, True, threads)
            return loss, self._head_backward(hcache, grads)
        targets = self._check_ids(targets, "target ids")
        loss, _, (dX, grads["class.W"], grads["class.b"], dW, db), sq = class_xent_forward_backward(
            X, p["class.W"], p["class.b"], self.head_weight(), p["head.b"], cfg.class_bounds, targets.reshape(-1), threads)
        self._put_head_grads(grads, dW, db, sq)
        return loss, dX

    def _head_backward(self, hcache, grads) -> object:
        """The output layer's gradients, put into ``grads``; returns dX (H, M)."""
        cfg, p = self.config, self.params
        if cfg.class_bounds:
            dX, grads["class.W"], grads["class.b"], dW, db = class_xent_backward(hcache, p["class.W"], self.head_weight())
        else:
            dX, dW, db = softmax_xent_backward(hcache, self.head_weight())
        self._put_head_grads(grads, dW, db, hcache.get("words_sq"))
        return dX

    def _put_head_grads(self, grads, dW, db, sq=None):
        """The output weights' and bias's gradients into ``grads`` (the weights under
        embed.W when tied), with ``sq``, the sum of their squares, if the compiled pass that
        wrote them gave one (see optim.Grads)."""
        name = "embed.W" if self.config.tie else "head.W"
        grads["head.b"], grads[name] = db, dW
        if sq is not None and isinstance(grads, Grads):
            grads.known_sq[(name, "head.b")] = sq

    def _body_backward(self, dX, cache, grads, sparse, defer=None):
        """Backpropagate dX (H, M), the gradient of the top states, through the recurrent
        layers and the input; adds their gradients to ``grads``; returns dstate. ``defer``:
        as in :meth:`backward`."""
        cfg, p = self.config, self.params
        T, N, ids_d = cache["T"], cache["N"], cache["ids"]
        M = T * N
        dstate = [None] * cfg.layers
        for layer in reversed(range(cfg.layers)):
            dhs = dX.reshape(cfg.hidden, T, N)
            if cache["masks"][layer] is not None:
                dhs = dhs * cache["masks"][layer]
            lc = cache["layers"][layer]
            if lc.get("rows"):
                dXP, dWh, dbhn, dh0, dc0 = rowsplit.lstm_backward(dhs, lc, p[f"rnn.{layer}.Wh"])
            else:
                dXP, dWh, dbhn, dh0, dc0 = cells.layer_backward(dhs, lc, p[f"rnn.{layer}.Wh"], defer)
            grads[f"rnn.{layer}.Wh"] = dWh
            if dbhn is not None:
                grads[f"rnn.{layer}.bhn"] = dbhn
            dstate[layer] = (dh0, dc0)
            dX = self._input_grads(layer, dXP.reshape(-1, M), cache["inputs"][layer], ids_d, grads,
                                   cache.get("two", False), defer)
        self._embed_grad(ids_d, dX, grads, sparse)
        return dstate

    def _input_grads(self, layer, dXP, X, ids_d, grads, two=False, defer=None):
        """A layer's input-weight and bias gradients from dXP (G*H, M), the gradient of its
        input projections, and X (In, M) its input (None: one-hot ids_d), put into
        ``grads``; returns the gradient of X (None for one-hot input). ``two``: in two
        threads, by rows (the caller holds the BLAS at one thread). ``defer``: the weight
        gradient's product, or the one-hot scatter, as deferred work (NumPy arrays only)."""
        xp, Wx = self.xp, self.params[f"rnn.{layer}.Wx"]
        GH = Wx.shape[0]
        if X is not None:
            if not two:
                grads[f"rnn.{layer}.b"] = dXP.sum(axis=1)
                if defer is None:
                    grads[f"rnn.{layer}.Wx"] = dXP @ X.T
                else:
                    dWx = grads[f"rnn.{layer}.Wx"] = numpy.empty(Wx.shape, dtype=self.dtype)
                    backend_mod.in_row_blocks(defer, GH, lambda r: numpy.matmul(dXP[r], X.T, out=dWx[r]),
                                              2.0 * dWx.size * dXP.shape[1])
                return Wx.T @ dXP  # (In, M)
            db = numpy.empty(GH, dtype=self.dtype)
            dWx = numpy.empty(Wx.shape, dtype=self.dtype)
            dX = numpy.empty((Wx.shape[1], dXP.shape[1]), dtype=self.dtype)

            def part(k):
                r = slice(k * GH // 2, (k + 1) * GH // 2)
                numpy.sum(dXP[r], axis=1, out=db[r])
                numpy.matmul(dXP[r], X.T, out=dWx[r])
                c = slice(k * dX.shape[0] // 2, (k + 1) * dX.shape[0] // 2)
                numpy.matmul(Wx[:, c].T, dXP, out=dX[c])

            backend_mod.run_in_two(part, 0, 1)
            grads[f"rnn.{layer}.b"] = db
            grads[f"rnn.{layer}.Wx"] = dWx
            return dX
        # one-hot input: dWx gets columns scattered by token id
        dWx = xp.zeros(Wx.shape, dtype=self.dtype)
        if kernels.use_fused(dXP):
            db = xp.zeros(GH, dtype=self.dtype)
            if defer is not None and not two:
                defer(lambda: kernels.scatter_columns(dWx, db, ids_d, dXP))
            else:
                _rows_in_two(lambda r: kernels.scatter_columns(dWx[r], db[r], ids_d, dXP[r]), GH, two)
        else:
            db = dXP.sum(axis=1)
            scatter_add_rows(dWx.T, ids_d, dXP.T)
        grads[f"rnn.{layer}.b"] = db
        grads[f"rnn.{layer}.Wx"] = dWx
        return None

    def _embed_grad(self, ids_d, dX, grads, sparse):
        """The embedding's gradient from dX (E, M), the gradient of the looked-up vectors
        (added to the output layer's when tied; a RowGrad with ``sparse`` otherwise)."""
        if not self.config.embed:
            return
        xp, shape = self.xp, self.params["embed.W"].shape
        dE = grads.get("embed.W")
        if sparse and dE is None:
            grads["embed.W"] = RowGrad.from_ids(ids_d, dX.T, shape)
        else:
            dE = xp.zeros(shape, dtype=self.dtype) if dE is None else dE
            scatter_add_rows(dE, ids_d, dX.T)
            grads["embed.W"] = dE
            if isinstance(grads, Grads):
                grads.changed("embed.W")

    # ----- the batch split across CPU cores -----
    def split_columns(self, N: int) -> list:
        """Column ranges to compute in parallel: two halves of the N streams on a multi-core
        CPU (NumPy backend, N >= 8), else one range. Streams are independent through the whole
        model; only the weight gradients are summed."""
        if self.xp is not numpy or N < 8 or THREADS < 2:
            return [(0, N)]
        return [(0, N // 2), (N // 2, N)]

    def _run_split(self, parts, work, blas=True):
        """Run work(a, b) for each column range, in parallel threads with one BLAS thread each
        (the numba kernels and the BLAS release the GIL); ``blas=False``: the caller has set
        the BLAS threads."""
        if len(parts) == 1:
            return [work(*parts[0])]
        if not blas:
            return backend_mod.run_in_two(lambda ab: work(*ab), parts[0], parts[1])
        with blas_threads(1, self.xp):
            return backend_mod.run_in_two(lambda ab: work(*ab), parts[0], parts[1])

    def loss_and_grads(self, ids, targets, state=None, train=True, rng=None, sparse=False):
        """Mean loss, gradients and final state of one training chunk, the N streams split
        across cores (see :meth:`split_columns`). Dropout masks are drawn here, in one order,
        so results do not depend on the split.

        ``sparse``: an untied embedding's gradient as an optim.RowGrad (see :meth:`backward`).

        Returns:
            (loss, grads, state): loss a 0-d array (mean nats per token).
        """
        cfg, xp = self.config, self.xp
        ids = self._check_ids(ids)
        T, N = ids.shape
        if state is None:
            state = self.initial_state(N)
        masks = None
        if train and cfg.dropout > 0:
            if rng is None:
                raise ModelError("training with dropout needs a random generator (rng)")
            masks = [dropout_mask((cfg.hidden, T, N), cfg.dropout, rng, xp, self.dtype) for _ in range(cfg.layers)]
        parts = self.split_columns(N)
        if len(parts) == 1:
            loss, cache, new_state = self.forward(ids, targets, state, train=train, dropout_masks=masks)
            grads, _ = self.backward(cache, sparse)
            return loss, grads, new_state

        if self._row_split(N):
            with blas_threads(1, xp):
                return self._loss_and_grads_two(ids, targets, state, train, masks, sparse)
        if cfg.class_bounds:
            with blas_threads(1, xp):
                return self._split_shared_head(ids, targets, state, train, masks, parts, sparse)

        tail = self._shared_tail(T, N)

        def half(a, b, defer):
            sub = [(h[:, a:b], None if c is None else c[:, a:b]) for h, c in state]
            m = None if masks is None else [mk[:, :, a:b] for mk in masks]
            loss, cache, st = self.forward(ids[:, a:b], targets[:, a:b], sub, train=train, dropout_masks=m)
            # Each half's loss is a mean over its own T x (b - a) tokens; dividing its gradient
            # by all T x N tokens instead makes the two halves' gradients add up to the whole's.
            cache["head"]["denom"] = float(T * N)
            grads, _ = self.backward(cache, sparse, defer)
            return loss, grads, st, b - a

        results = self._run_split(parts, lambda a, b: backend_mod.with_tail(tail, lambda defer: half(a, b, defer)))
        (l0, g0, s0, n0), (l1, g1, s1, n1) = results
        _add_grads(g0, g1)
        loss = l0 * (n0 / N) + l1 * (n1 / N)
        new_state = _join_states(xp, s0, s1)
        return loss, g0, new_state

    def _shared_tail(self, T: int, N: int):
        """A backend.Deferred for the two halves of a batch split of N streams, or None: the
        weight gradients' products wait in a list both halves work off at their ends, so a
        core the machine slows hands part of them to the other; not where they are small (the
        waits cost more than they save) nor from charnn's worker thread (the halves run one
        after the other there)."""
        cfg = self.config
        flops = 0.0  # of the recurrent layers' weight-gradient products, for a half
        for layer in range(cfg.layers):
            In = cfg.hidden if layer else (cfg.embed or 0)  # one-hot input: a scatter
            flops += 2.0 * cfg.gates * cfg.hidden * (cfg.hidden + In) * T * (N // 2)
        if flops < DEFER_FLOPS or backend_mod.in_worker():
            return None
        return backend_mod.Deferred(2)

    def _row_split(self, N: int) -> bool:
        """Whether a chunk of N streams runs as one batch on two cores, each LSTM layer split
        by hidden units (rowsplit.py), instead of two halves of the streams: where the halves
        would be thin (under 16 streams), whose per-step products cost nearly as much as
        whole ones (H = 200, N = 20: 57 against 63 ms per class-factored step). From 16
        streams a half the two measured alike (H = 128, N = 32: 10.6 against 10.3 ms per
        step; H = 512, N = 64: within noise of each other), and the batch split stays."""
        cfg = self.config
        return (N < 32 and THREADS >= 2 and cfg.cell == "lstm" and self.xp is numpy
                and self.dtype == numpy.float32 and rowsplit.usable(self.params["rnn.0.Wh"], cfg.hidden))

    def _loss_and_grads_two(self, ids, targets, state, train, masks, sparse):
        """loss_and_grads with the recurrent layers split by hidden units, the input and
        output layers by rows or positions, all in two threads with one BLAS thread each."""
        cfg, xp = self.config, self.xp
        T, N = ids.shape
        X, cache, new_state = self._body_forward(ids, state, train, None, masks, True, two=True)
        grads = Grads()
        if cfg.class_bounds:
            loss, dX = self._head_loss_and_grads(X, targets, grads, THREADS)
        else:
            # Two halves of the positions (first and second half of the time steps); each
            # half's loss is a mean over its tokens, its gradient divided by all T x N.
            t = T // 2 if T > 1 else T
            cuts = [(0, t), (t, T)] if t < T else [(0, T)]

            def head(tt):
                a, b = tt
                loss, _, hc = self._head_forward(X[:, a * N:b * N], targets[a:b], None, True)
                hc["denom"] = float(T * N)
                g = Grads()
                return loss * ((b - a) / T), self._head_backward(hc, g), g

            if len(cuts) == 2:
                (l0, d0, g0), (l1, d1, g1) = backend_mod.run_in_two(head, cuts[0], cuts[1])
                _add_grads(g0, g1)
                loss, dX, grads = l0 + l1, xp.concatenate([d0, d1], axis=1), g0
            else:
                loss, dX, grads = head(cuts[0])
        self._body_backward(dX, cache, grads, sparse)
        return loss, grads, new_state

    def _split_shared_head(self, ids, targets, state, train, masks, parts, sparse):
        """loss_and_grads for a class-factored head: the recurrent layers run on two halves
        of the streams in parallel, the output layer once on the whole batch between them,
        its compiled within-class passes split across the two threads by class. Its large
        weight gradient is then computed once (each row by one thread) and never summed.
        Everything runs with one BLAS thread: OpenBLAS's own threads, once woken for a
        product, spin on the core the other half needs (benchmarks/factored.py measured
        107 ms per step with two BLAS threads around the output layer, 65 ms without)."""
        cfg, xp = self.config, self.xp
        T, N = ids.shape

        def body_forward(a, b):
            sub = [(h[:, a:b], None if c is None else c[:, a:b]) for h, c in state]
            m = None if masks is None else [mk[:, :, a:b] for mk in masks]
            return self._body_forward(ids[:, a:b], sub, train, None, m, True)

        halves = self._run_split(parts, body_forward, blas=False)
        tail = self._shared_tail(T, N)
        H = cfg.hidden
        X = xp.concatenate([Xh.reshape(H, T, b - a) for (Xh, _, _), (a, b) in zip(halves, parts)], axis=2)
        grads = Grads()
        loss, dX = self._head_loss_and_grads(X.reshape(H, T * N), targets, grads, THREADS)
        dX = dX.reshape(H, T, N)

        def body_backward(k, defer):
            (a, b), (_, cache, _) = parts[k], halves[k]
            g = Grads()
            self._body_backward(xp.ascontiguousarray(dX[:, :, a:b]).reshape(H, T * (b - a)), cache, g, sparse, defer)
            return g

        for g in self._run_split([(0,), (1,)], lambda k: backend_mod.with_tail(tail, lambda d: body_backward(k, d)),
                                 blas=False):
            _add_grads(grads, g)
        new_state = _join_states(xp, halves[0][2], halves[1][2])
        return loss, grads, new_state

    def nll(self, ids, targets, state=None, weights=None):
        """Per-position negative log-likelihood (T, N) and the final state, without dropout or a
        cache, the streams split across cores like :meth:`loss_and_grads`."""
        ids = self._check_ids(ids)
        T, N = ids.shape
        if state is None:
            state = self.initial_state(N)
        xp = self.xp

        def work(a, b):
            sub = [(h[:, a:b], None if c is None else c[:, a:b]) for h, c in state]
            w = None if weights is None else weights[:, a:b]
            _, cache, st = self.forward(ids[:, a:b], targets[:, a:b], sub, weights=w, store=False)
            return cache["nll"], st

        results = self._run_split(self.split_columns(N), work)
        if len(results) == 1:
            return results[0]
        (n0, s0), (n1, s1) = results
        new_state = _join_states(xp, s0, s1)
        return xp.concatenate([n0, n1], axis=1), new_state

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

    def logits(self, X):
        """Next-token logits (M, V) from top hidden states X (H, M). With the class-factored
        softmax these are the exact log-probabilities (also valid logits)."""
        p = self.params
        if self.config.class_bounds:
            return class_log_probs(X, p["class.W"], p["class.b"], self.head_weight(), p["head.b"], self.config.class_bounds)
        logits = X.T @ self.head_weight().T
        logits += p["head.b"]
        return logits


class Stepper:
    """Advances N streams one token at a time with preallocated buffers (for sampling).

    Each layer's input and recurrent weights are concatenated once, W = [Wx Wh] (G*H, In+H),
    so a step is one matrix-vector product per layer on [x; h] (one-hot layer 0: a column of
    Wx plus Wh @ h), then the gate math in place. The state lives in the buffers; ``state()``
    returns it in the model's layout and ``set_state`` loads one.
    """

    def __init__(self, model: LanguageModel, N: int = 1):
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
        self.fused = kernels.use_fused(self.a[0]) and cfg.cell != "rnn"
        small = 2.0 * max(w.size for w in self.W) * N < SMALL_GEMM_FLOPS
        self._tuner = ThreadTuner() if xp is numpy and small else None

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
        ids = self.model._check_ids(numpy.asarray(ids).reshape(-1))
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
                cells.lstm_step_forward(a, self.c[layer], self.c[layer], self.tc[layer], h, xp)
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
                cells.sigmoid_(a[: 2 * H], xp)
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

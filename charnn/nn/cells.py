"""Recurrent layers, forward and backward through time, in plain array code (NumPy or CuPy).

Notation (used in every function below; PyTorch's documented equations and gate order, so that
weights map one to one onto nn.RNN / nn.LSTM / nn.GRU):

    T time steps, N streams in the batch, In input size, H hidden size, G gates (RNN 1, LSTM 4, GRU 3)
    x_t  (In, N)   layer input at step t          h_t, c_t (H, N)  hidden and cell state
    Wx   (G*H, In) input weights (weight_ih)      Wh  (G*H, H)  recurrent weights (weight_hh)
    b    (G*H,)    bias (bias_ih + bias_hh, except GRU's n gate, see bhn)
    σ    logistic sigmoid

    RNN:  h_t = tanh(Wx x_t + Wh h_{t-1} + b)          (or relu)
    LSTM: [a_i; a_f; a_g; a_o] = Wx x_t + Wh h_{t-1} + b
          i = σ(a_i)  f = σ(a_f)  g = tanh(a_g)  o = σ(a_o)
          c_t = f * c_{t-1} + i * g
          h_t = o * tanh(c_t)
    GRU:  [xr; xz; xn] = Wx x_t + b        [hr; hz; hn] = Wh h_{t-1}  (+ bhn on the n rows)
          r = σ(xr + hr)  z = σ(xz + hz)
          n = tanh(xn + r * hn)            (reset applied after the hidden product)
          h_t = (1 - z) * n + z * h_{t-1}

Layout. Everything is "features x columns": a layer's inputs over a chunk are one matrix
X (In, T*N) whose column t*N + n is stream n at step t, so all input projections are one GEMM
(Wx @ X) outside the time loop, and only the recurrent product Wh @ h_{t-1} stays inside it.
Per step, the gate pre-activations are a contiguous (G*H, N) block with each gate a contiguous
(H, N) sub-block, which keeps the elementwise gate math on contiguous memory. Hidden outputs
are kept as hs (H, T, N), so hs.reshape(H, T*N) is the next layer's input with no copy.

Derivatives are written from the outputs: σ' = y(1 - y), tanh' = 1 - y².
Backward mirrors forward step by step in reverse; weight gradients are single GEMMs over the
whole chunk after the loop (dWx = dA @ X^T, dWh = dA[:, 1:] @ hs[:, :-1]^T + dA_0 @ h0^T).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..backend import array_module

# The LSTM forget gate's initial bias (init_params): 0, as PyTorch's nn.LSTM (in expectation).
# Until December 2026 it was 1 (and runs saved before it was an option used 1); measured on
# tiny Shakespeare, 1 learned far slower per step (benchmarks/README.md, "The forget bias").
# Here, not in model.py, so the CLI (which imports cells for its choices) takes its default
# from the one place.
FORGET_BIAS = 0.0
# One-hot input (--embed 0) only: layer 0's input weights start U(-INPUT_SCALE, INPUT_SCALE);
# 0 = U(-1/sqrt(H), 1/sqrt(H)) as the other weights and PyTorch's nn.LSTM. 1 since December
# 2026: at 1/sqrt(H) the input barely moves the gates and a model can sit on the unigram plateau
# for hundreds of steps (benchmarks/README.md, "The one-hot input's scale"). Runs saved before
# the option existed resume with 0. Here for the same reason as FORGET_BIAS.
INPUT_SCALE = 1.0
# The cell of a model, a training run and the command line when none is named.
DEFAULT_CELL = "lstm"


# ----- elementwise helpers (in place, on any xp array) -----

def sigmoid_(x, xp):
    """x <- σ(x), in place. The tanh form never overflows: σ(x) = (1 + tanh(x/2)) / 2."""
    x *= 0.5
    xp.tanh(x, out=x)
    x *= 0.5
    x += 0.5
    return x


def dsigmoid(y, out, xp):
    """out <- σ'(x) written from y = σ(x): y - y²."""
    xp.multiply(y, y, out=out)
    xp.subtract(y, out, out=out)
    return out


def dtanh(y, out, xp):
    """out <- tanh'(x) written from y = tanh(x): 1 - y²."""
    xp.multiply(y, y, out=out)
    xp.subtract(1.0, out, out=out)
    return out


# ----- one time step of each cell: the elementwise part (the GEMMs are in the loops) -----

def lstm_step_forward(A, c_prev, c, tc, h, xp):
    """A (4H, N): pre-activations in, gate values i, f, g, o out. Writes c, tanh(c) and h."""
    H = c.shape[0]
    sigmoid_(A[: 2 * H], xp)
    xp.tanh(A[2 * H: 3 * H], out=A[2 * H: 3 * H])
    sigmoid_(A[3 * H:], xp)
    i, f, g, o = A[:H], A[H: 2 * H], A[2 * H: 3 * H], A[3 * H:]
    xp.multiply(f, c_prev, out=c)
    xp.multiply(i, g, out=tc)
    c += tc
    xp.tanh(c, out=tc)
    xp.multiply(o, tc, out=h)


def lstm_step_backward(A, c_prev, tc, dh, dc, dA, tmp, xp):
    """Given dh = dL/dh_t and dc = dL/dc_t from later steps, write dA = dL/d(pre-activations)
    and turn dc into dL/dc_{t-1} in place. tmp is an (H, N) scratch buffer."""
    H = dh.shape[0]
    i, f, g, o = A[:H], A[H: 2 * H], A[2 * H: 3 * H], A[3 * H:]
    di, df, dg, do = dA[:H], dA[H: 2 * H], dA[2 * H: 3 * H], dA[3 * H:]
    # 1. h = o * tanh(c)
    xp.multiply(dh, tc, out=do)
    dsigmoid(o, tmp, xp)
    do *= tmp
    dtanh(tc, tmp, xp)
    tmp *= o
    tmp *= dh
    dc += tmp
    # 2. c = f * c_prev + i * g
    xp.multiply(dc, g, out=di)
    dsigmoid(i, tmp, xp)
    di *= tmp
    xp.multiply(dc, c_prev, out=df)
    dsigmoid(f, tmp, xp)
    df *= tmp
    xp.multiply(dc, i, out=dg)
    dtanh(g, tmp, xp)
    dg *= tmp
    dc *= f


# ----- whole layers over a chunk, one pair of functions per cell -----
#
# forward(XP, Wh, h0, c0, extra, store, activation) -> hs (H, T, N), (h, c), cache
#     XP (G*H, T, N) the input projections Wx @ X + b for all steps (read only); Wh (G*H, H);
#     h0, c0 (H, N) the initial state (c0 None for cells without a cell state); extra the
#     layer's extra parameters by name (GRU: {"bhn": (H,)}); store: keep what backward needs
#     (False for evaluation and sampling); activation "tanh" or "relu" (RNN only).
# backward(dhs, cache, Wh) -> dXP (G*H, T, N), dWh, dextra (name -> gradient), dh0, dc0
#     dhs (H, T, N) = dL/dhs from above; dc0 None for cells without a cell state.


def _new_forward_buffers(XP, Wh, store):
    GH, T, N = XP.shape
    H = Wh.shape[1]
    xp = array_module(XP)
    S = T if store else 1
    return xp, GH, T, N, H, S, xp.empty((H, T, N), dtype=XP.dtype), xp.empty((S, GH, N), dtype=XP.dtype)


def _recurrent_weight_grad(dR, h0, hs, xp):
    """dWh = dR_0 @ h0^T + dR[:, 1:] @ hs[:, :-1]^T over the whole chunk, from dR (G*H, T, N)
    the gradient with respect to the recurrent products."""
    GH = dR.shape[0]
    H, T, N = hs.shape
    dWh = xp.matmul(dR[:, 0], h0.T)
    if T > 1:
        # Column blocks of the flattened arrays are views, so these GEMMs copy nothing.
        dWh += dR.reshape(GH, T * N)[:, N:] @ hs.reshape(H, T * N)[:, : (T - 1) * N].T
    return dWh


def rnn_forward(XP, Wh, h0, c0=None, extra=None, store=True, activation="tanh"):
    xp, GH, T, N, H, S, hs, A = _new_forward_buffers(XP, Wh, store)
    h = h0
    for t in range(T):
        a = A[t if store else 0]
        xp.matmul(Wh, h, out=a)
        a += XP[:, t]
        if activation == "relu":
            xp.maximum(a, 0, out=hs[:, t])
        else:
            xp.tanh(a, out=hs[:, t])
        h = hs[:, t]
    cache = {"A": A, "hs": hs, "h0": h0, "activation": activation} if store else None
    return hs, (h.copy(), None), cache  # a copy: the carried state must not keep the chunk alive


def rnn_backward(dhs, cache, Wh):
    A, hs, h0 = cache["A"], cache["hs"], cache["h0"]
    xp = array_module(dhs)
    H, T, N = hs.shape
    dXP = xp.empty((A.shape[1], T, N), dtype=hs.dtype)
    da = xp.empty((A.shape[1], N), dtype=hs.dtype)
    dh = xp.empty((H, N), dtype=hs.dtype)
    dh_next = xp.zeros((H, N), dtype=hs.dtype)
    for t in reversed(range(T)):
        xp.add(dhs[:, t], dh_next, out=dh)
        if cache["activation"] == "relu":
            xp.greater(hs[:, t], 0, out=da)
            da *= dh
        else:
            dtanh(hs[:, t], da, xp)
            da *= dh
        xp.matmul(Wh.T, da, out=dh_next)
        dXP[:, t] = da
    return dXP, _recurrent_weight_grad(dXP, h0, hs, xp), {}, dh_next, None


def lstm_forward(XP, Wh, h0, c0, extra=None, store=True, activation="tanh"):
    xp, GH, T, N, H, S, hs, A = _new_forward_buffers(XP, Wh, store)
    cs = xp.empty((S, H, N), dtype=XP.dtype)
    tcs = xp.empty((S, H, N), dtype=XP.dtype)
    h, c = h0, c0
    for t in range(T):
        s = t if store else 0
        a = A[s]
        xp.matmul(Wh, h, out=a)
        a += XP[:, t]
        lstm_step_forward(a, c, cs[s], tcs[s], hs[:, t], xp)
        c = cs[s]  # with store=False this buffer is reused in place, which is safe
        h = hs[:, t]
    cache = {"A": A, "hs": hs, "h0": h0, "cs": cs, "tcs": tcs, "c0": c0} if store else None
    return hs, (h.copy(), c.copy()), cache


def lstm_backward(dhs, cache, Wh):
    A, hs, h0, cs, tcs, c0 = cache["A"], cache["hs"], cache["h0"], cache["cs"], cache["tcs"], cache["c0"]
    xp = array_module(dhs)
    H, T, N = hs.shape
    dtype = hs.dtype
    dXP = xp.empty((A.shape[1], T, N), dtype=dtype)
    da = xp.empty((A.shape[1], N), dtype=dtype)
    dh = xp.empty((H, N), dtype=dtype)
    dh_next = xp.zeros((H, N), dtype=dtype)
    dc = xp.zeros((H, N), dtype=dtype)
    tmp = xp.empty((H, N), dtype=dtype)
    for t in reversed(range(T)):
        xp.add(dhs[:, t], dh_next, out=dh)
        c_prev = cs[t - 1] if t > 0 else c0
        lstm_step_backward(A[t], c_prev, tcs[t], dh, dc, da, tmp, xp)
        xp.matmul(Wh.T, da, out=dh_next)
        dXP[:, t] = da
    return dXP, _recurrent_weight_grad(dXP, h0, hs, xp), {}, dh_next, dc


def gru_forward(XP, Wh, h0, c0=None, extra=None, store=True, activation="tanh"):
    xp, GH, T, N, H, S, hs, A = _new_forward_buffers(XP, Wh, store)
    bhn = extra["bhn"]
    HN = xp.empty((S, H, N), dtype=XP.dtype)
    HP = xp.empty((GH, N), dtype=XP.dtype)
    h = h0
    for t in range(T):
        s = t if store else 0
        a = A[s]
        xp.matmul(Wh, h, out=HP)
        xp.add(XP[: 2 * H, t], HP[: 2 * H], out=a[: 2 * H])
        sigmoid_(a[: 2 * H], xp)
        hn = HN[s]
        xp.add(HP[2 * H:], bhn[:, None], out=hn)
        n = a[2 * H:]
        xp.multiply(a[:H], hn, out=n)
        n += XP[2 * H:, t]
        xp.tanh(n, out=n)
        z = a[H: 2 * H]
        ht = hs[:, t]
        xp.subtract(h, n, out=ht)
        ht *= z
        ht += n
        h = hs[:, t]
    cache = {"A": A, "hs": hs, "h0": h0, "HN": HN} if store else None
    return hs, (h.copy(), None), cache


def gru_backward(dhs, cache, Wh):
    A, hs, h0, HN = cache["A"], cache["hs"], cache["h0"], cache["HN"]
    xp = array_module(dhs)
    H, T, N = hs.shape
    GH = A.shape[1]
    dtype = hs.dtype
    dXP = xp.empty((GH, T, N), dtype=dtype)
    dHP = xp.empty((GH, T, N), dtype=dtype)  # the gradient of the recurrent products
    da = xp.empty((GH, N), dtype=dtype)
    dhp = xp.empty((GH, N), dtype=dtype)
    dh = xp.empty((H, N), dtype=dtype)
    dh_next = xp.zeros((H, N), dtype=dtype)
    tmp = xp.empty((H, N), dtype=dtype)
    for t in reversed(range(T)):
        xp.add(dhs[:, t], dh_next, out=dh)
        a = A[t]
        h_prev = hs[:, t - 1] if t > 0 else h0
        r, z, n = a[:H], a[H: 2 * H], a[2 * H:]
        dr, dz, dn = da[:H], da[H: 2 * H], da[2 * H:]
        # 1. h = n + z * (h_prev - n)
        xp.subtract(h_prev, n, out=dz)
        dz *= dh
        dsigmoid(z, tmp, xp)
        dz *= tmp
        xp.subtract(1.0, z, out=dn)
        dn *= dh
        dtanh(n, tmp, xp)
        dn *= tmp
        # 2. n = tanh(xn + r * hn)
        xp.multiply(dn, HN[t], out=dr)
        dsigmoid(r, tmp, xp)
        dr *= tmp
        dhp[: 2 * H] = da[: 2 * H]
        xp.multiply(dn, r, out=dhp[2 * H:])
        dHP[:, t] = dhp
        # 3. h_prev feeds both the hidden product and the z-interpolation
        xp.matmul(Wh.T, dhp, out=dh_next)
        xp.multiply(dh, z, out=tmp)
        dh_next += tmp
        dXP[:, t] = da
    dbhn = dHP[2 * H:].sum(axis=(1, 2))
    return dXP, _recurrent_weight_grad(dHP, h0, hs, xp), {"bhn": dbhn}, dh_next, None


# ----- the registry: what a cell is, asked by everything that needs to know -----

def _lstm_init(b, H, forget_bias):
    b[H: 2 * H] = forget_bias


@dataclass(frozen=True)
class Cell:
    """What a recurrent cell is.

    name: its name on the command line and in model files.
    gates: G, the blocks of H rows in Wx, Wh and b.
    has_c: whether it carries a cell state c beside h (the state is (h, c), else (h, None)).
    extra: the layer's parameters beyond Wx, Wh and b: name -> shape as a function of H;
        initialised to zeros, saved as rnn.L.NAME.
    forward, backward: the layer over a chunk (signatures above).
    init_bias: fills a fresh layer's bias b (G*H,) in place (default: zeros stay), given H
        and the forget-gate bias asked for.
    forget_gate: whether it has a forget gate, whose initial bias ``forget_bias`` sets.
    hidden_apart: whether a gate acts on the hidden product Wh h_{t-1} alone (the GRU's reset
        gate, applied after the product), so a step cannot add it to the input's product first.
    activations: the values of the ``activation`` option it accepts (the first is the default).
        A cell that accepts one computes with it whatever a configuration's ``activation`` says
        (model files from before the command line checked it hold a GRU "with" relu).
    kept: how many (H, T, N) arrays its forward keeps for backward besides the gate values A
        (T, G*H, N) and the outputs hs (LSTM: c and tanh(c); GRU: the hidden product's n
        rows), for memory.py's estimate of a training step.
    backward_buffers: how many (G*H, T, N) arrays its backward makes (every cell: dXP; the
        GRU also the gradient of its hidden products), likewise.
    """

    name: str
    gates: int
    has_c: bool
    forward: Callable
    backward: Callable
    extra: dict = field(default_factory=dict)
    init_bias: Callable | None = None
    forget_gate: bool = False
    hidden_apart: bool = False
    activations: tuple = ("tanh",)
    kept: int = 0
    backward_buffers: int = 1

    @property
    def takes_activation(self) -> bool:
        """Whether the ``activation`` option chooses anything for it (more than one accepted)."""
        return len(self.activations) > 1


CELLS: dict = {}


class UnknownCell(KeyError):
    def __str__(self):
        return f"unknown cell {self.args[0]!r}: choose {', '.join(CELLS)}"


def register(cell: Cell) -> Cell:
    """Add a cell to the registry (a name already there is replaced)."""
    CELLS[cell.name] = cell
    return cell


def activations() -> tuple:
    """Every value of the ``activation`` option some registered cell accepts, in registry order
    (read now: a cell registered later counts)."""
    return tuple(dict.fromkeys(a for cell in CELLS.values() for a in cell.activations))


def get(name: str) -> Cell:
    """The registered cell called ``name``; an unknown name is an error, never another cell."""
    try:
        return CELLS[name]
    except (KeyError, TypeError):
        raise UnknownCell(name) from None


register(Cell("rnn", 1, False, rnn_forward, rnn_backward, activations=("tanh", "relu")))
register(Cell("lstm", 4, True, lstm_forward, lstm_backward, init_bias=_lstm_init, forget_gate=True, kept=2))
register(Cell("gru", 3, False, gru_forward, gru_backward, extra={"bhn": lambda H: (H,)}, hidden_apart=True, kept=1,
              backward_buffers=2))

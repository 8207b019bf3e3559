"""Forward outputs of the cells and the model pinned to an independent reference.

The reference below is a deliberately naive transcription of PyTorch's documented equations
(nn.RNN, nn.LSTM with gates i, f, g, o, nn.GRU with r, z, n and the reset gate applied after the
hidden product), one scalar at a time with math.exp / math.tanh, per step and per stream, in
PyTorch's own parameter layout (weight_ih, weight_hh, bias_ih, bias_hh). It shares no code with
charnn. The hand-computed cases at the top do not even rely on the reference.
"""

from __future__ import annotations

import math

import numpy
import pytest

from charnn.nn import cells
from charnn.backend import get_backend, to_host
from charnn.nn.model import LanguageModel, ModelConfig, init_params

TOL = 1e-12
F64 = get_backend("cpu", "float64")


def layer_forward(cell, XP, Wh, h0, c0=None, bhn=None, activation="tanh", store=True):
    """The registry's reference layer by the cell's name (bhn: the GRU's extra parameter)."""
    return cells.get(cell).forward(XP, Wh, h0, c0, {} if bhn is None else {"bhn": bhn}, store, activation)


# ----- the reference (PyTorch's equations, scalar loops) -----

def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _affine(W, v, b, rows):
    """[sum_k W[j, k] v[k] + b[j] for j in rows] with plain Python arithmetic."""
    return [sum(float(W[j][k]) * v[k] for k in range(len(v))) + float(b[j]) for j in rows]


def ref_step(cell, w_ih, w_hh, b_ih, b_hh, x, h, c=None, activation="tanh"):
    """One step of one stream. x (In,), h and c (H,) Python lists; returns (h', c')."""
    H = len(h)
    if cell == "rnn":
        a = [p + q for p, q in zip(_affine(w_ih, x, b_ih, range(H)), _affine(w_hh, h, b_hh, range(H)))]
        act = math.tanh if activation == "tanh" else (lambda v: max(v, 0.0))
        return [act(v) for v in a], None
    if cell == "lstm":
        gi = _affine(w_ih, x, b_ih, range(4 * H))
        gh = _affine(w_hh, h, b_hh, range(4 * H))
        a = [p + q for p, q in zip(gi, gh)]
        i = [_sig(v) for v in a[:H]]
        f = [_sig(v) for v in a[H: 2 * H]]
        g = [math.tanh(v) for v in a[2 * H: 3 * H]]
        o = [_sig(v) for v in a[3 * H:]]
        c_new = [f[j] * c[j] + i[j] * g[j] for j in range(H)]
        h_new = [o[j] * math.tanh(c_new[j]) for j in range(H)]
        return h_new, c_new
    # GRU: r = σ(W_ir x + b_ir + W_hr h + b_hr), z likewise,
    #      n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h
    gi = _affine(w_ih, x, b_ih, range(3 * H))
    gh = _affine(w_hh, h, b_hh, range(3 * H))
    r = [_sig(gi[j] + gh[j]) for j in range(H)]
    z = [_sig(gi[H + j] + gh[H + j]) for j in range(H)]
    n = [math.tanh(gi[2 * H + j] + r[j] * gh[2 * H + j]) for j in range(H)]
    return [(1 - z[j]) * n[j] + z[j] * h[j] for j in range(H)], None


def ref_layer(cell, w_ih, w_hh, b_ih, b_hh, xs, h0, c0=None, activation="tanh"):
    """xs (T, N, In), h0/c0 (N, H), PyTorch layout. Returns outputs (T, N, H), h_T, c_T (N, H)."""
    T, N = len(xs), len(xs[0])
    out = [[None] * N for _ in range(T)]
    hT, cT = [], []
    for n in range(N):
        h = [float(v) for v in h0[n]]
        c = None if c0 is None else [float(v) for v in c0[n]]
        for t in range(T):
            h, c = ref_step(cell, w_ih, w_hh, b_ih, b_hh, [float(v) for v in xs[t][n]], h, c, activation)
            out[t][n] = h
        hT.append(h)
        cT.append(c)
    return numpy.array(out), numpy.array(hT), None if c0 is None else numpy.array(cT)


def to_charnn(cell, w_ih, w_hh, b_ih, b_hh, xs):
    """PyTorch-layout weights and inputs -> layer_forward's arguments (XP, Wh, bhn).

    charnn folds bias_hh into b, except the GRU's n rows, whose hidden bias sits inside r * (...)."""
    H = w_hh.shape[1]
    b = b_ih + b_hh
    bhn = None
    if cell == "gru":
        b = b_ih.copy()
        b[: 2 * H] += b_hh[: 2 * H]
        bhn = b_hh[2 * H:].copy()
    XP = numpy.einsum("gi,tni->gtn", w_ih, xs) + b[:, None, None]  # (G*H, T, N)
    return numpy.ascontiguousarray(XP), numpy.ascontiguousarray(w_hh), bhn


def random_layer(cell, In, H, T, N, seed, scale=0.8):
    rng = numpy.random.default_rng(seed)
    G = cells.get(cell).gates
    w_ih = rng.normal(0, scale, (G * H, In))
    w_hh = rng.normal(0, scale, (G * H, H))
    b_ih = rng.normal(0, 0.3, G * H)
    b_hh = rng.normal(0, 0.3, G * H)
    xs = rng.normal(0, 1.0, (T, N, In))
    h0 = rng.normal(0, 0.5, (N, H))
    c0 = rng.normal(0, 0.5, (N, H)) if cell == "lstm" else None
    return w_ih, w_hh, b_ih, b_hh, xs, h0, c0


def run_charnn(cell, w_ih, w_hh, b_ih, b_hh, xs, h0, c0, activation="tanh", store=True):
    XP, Wh, bhn = to_charnn(cell, w_ih, w_hh, b_ih, b_hh, xs)
    h0c = numpy.ascontiguousarray(h0.T)
    c0c = None if c0 is None else numpy.ascontiguousarray(c0.T)
    hs, (h, c), _ = layer_forward(cell, XP, Wh, h0c, c0c, bhn, activation, store)
    return hs, h, c


# ----- hand-computed cases (no reference implementation involved) -----

def test_lstm_one_step_by_hand():
    # H = In = 1, x = 2, h0 = 1, c0 = 2 ln 2 - 0.6
    # a_i = 0.5*2 + (-1)*1 + 0      = 0     -> i = 1/2
    # a_f = -0.5*2 + 1*1 + 0        = 0     -> f = 1/2
    # a_g = 0*2 + ln2*1 + 0         = ln 2  -> g = tanh(ln 2) = (2 - 1/2) / (2 + 1/2) = 0.6
    # a_o = 0*2 + 0*1 + ln 3        = ln 3  -> o = 3 / (1 + 3) = 0.75
    # c = f c0 + i g = (ln 2 - 0.3) + 0.3 = ln 2
    # h = o tanh(c) = 0.75 * 0.6 = 0.45
    ln2, ln3 = math.log(2), math.log(3)
    Wx = numpy.array([[0.5], [-0.5], [0.0], [0.0]])
    Wh = numpy.array([[-1.0], [1.0], [ln2], [0.0]])
    b = numpy.array([0.0, 0.0, 0.0, ln3])
    x, h0, c0 = 2.0, numpy.array([[1.0]]), numpy.array([[2 * ln2 - 0.6]])
    XP = (Wx[:, 0] * x + b).reshape(4, 1, 1)
    hs, (h, c), cache = layer_forward("lstm", XP, Wh, h0, c0)
    assert c[0, 0] == pytest.approx(ln2, abs=TOL)
    assert h[0, 0] == pytest.approx(0.45, abs=TOL)
    assert hs[0, 0, 0] == pytest.approx(0.45, abs=TOL)
    # The cache holds the gate values i, f, g, o in PyTorch's order.
    numpy.testing.assert_allclose(cache["A"][0][:, 0], [0.5, 0.5, 0.6, 0.75], rtol=0, atol=TOL)


def test_gru_one_step_by_hand():
    # H = In = 1, x = 1, h0 = 0.5; W_ih = [1, 0, ln2 - 1], W_hh = [-2, 0, 2],
    # b_ih = [0, ln 3, 0], b_hh = [0, 0, 1]
    # r = σ(1 - 2*0.5)             = σ(0)    = 1/2
    # z = σ(ln 3)                              = 3/4
    # n = tanh((ln2 - 1) + r * (2*0.5 + 1)) = tanh(ln 2) = 0.6   (b_hn inside the reset product)
    # h = (1 - z) n + z h0 = 0.25*0.6 + 0.75*0.5 = 0.525
    ln2, ln3 = math.log(2), math.log(3)
    XP = numpy.array([1.0, ln3, ln2 - 1]).reshape(3, 1, 1)
    Wh = numpy.array([[-2.0], [0.0], [2.0]])
    hs, (h, c), _ = layer_forward("gru", XP, Wh, numpy.array([[0.5]]), None, numpy.array([1.0]))
    assert c is None
    assert h[0, 0] == pytest.approx(0.525, abs=TOL)


def test_rnn_two_steps_by_hand():
    # tanh, H = In = 1, Wh = 0.5, h0 = 1; inputs chosen so the pre-activations are ln 2, then 0:
    # step 1: a = XP_1 + Wh h0 = (ln2 - 0.5) + 0.5*1 = ln 2 -> h1 = 0.6
    # step 2: a = XP_2 + Wh h1 = -0.3 + 0.5*0.6     = 0    -> h2 = 0
    ln2 = math.log(2)
    XP = numpy.array([[[ln2 - 0.5], [-0.3]]])  # (1, T=2, N=1)
    hs, (h, _), _ = layer_forward("rnn", XP, numpy.array([[0.5]]), numpy.array([[1.0]]))
    numpy.testing.assert_allclose(hs[0, :, 0], [0.6, 0.0], rtol=0, atol=TOL)
    # relu, Wh = -1, h0 = 1: step 1: 0.7 + (-1)*1 = -0.3 -> 0; step 2: 0.25 + (-1)*0 = 0.25
    XP = numpy.array([[[0.7], [0.25]]])
    hs, _, _ = layer_forward("rnn", XP, numpy.array([[-1.0]]), numpy.array([[1.0]]), activation="relu")
    numpy.testing.assert_allclose(hs[0, :, 0], [0.0, 0.25], rtol=0, atol=TOL)


def test_reference_agrees_with_the_hand_cases():
    """The reference itself reproduces the hand-computed LSTM and GRU numbers."""
    ln2, ln3 = math.log(2), math.log(3)
    h, c = ref_step("lstm", [[0.5], [-0.5], [0.0], [0.0]], [[-1.0], [1.0], [ln2], [0.0]],
                    [0, 0, 0, ln3], [0, 0, 0, 0], [2.0], [1.0], [2 * ln2 - 0.6])
    assert h[0] == pytest.approx(0.45, abs=TOL) and c[0] == pytest.approx(ln2, abs=TOL)
    h, _ = ref_step("gru", [[1.0], [0.0], [ln2 - 1]], [[-2.0], [0.0], [2.0]], [0, ln3, 0], [0, 0, 1.0],
                    [1.0], [0.5])
    assert h[0] == pytest.approx(0.525, abs=TOL)


# ----- layer_forward against the reference -----

LAYER_CASES = [("rnn", "tanh"), ("rnn", "relu"), ("lstm", "tanh"), ("gru", "tanh")]


@pytest.mark.parametrize("cell,activation", LAYER_CASES)
@pytest.mark.parametrize("store", [True, False])
def test_layer_forward_matches_reference(cell, activation, store):
    In, H, T, N = 3, 4, 5, 2
    w_ih, w_hh, b_ih, b_hh, xs, h0, c0 = random_layer(cell, In, H, T, N, seed=11)
    out, hT, cT = ref_layer(cell, w_ih, w_hh, b_ih, b_hh, xs, h0, c0, activation)
    hs, h, c = run_charnn(cell, w_ih, w_hh, b_ih, b_hh, xs, h0, c0, activation, store)
    assert hs.shape == (H, T, N)
    numpy.testing.assert_allclose(hs, out.transpose(2, 0, 1), rtol=0, atol=TOL)
    numpy.testing.assert_allclose(h, hT.T, rtol=0, atol=TOL)
    if cell == "lstm":
        numpy.testing.assert_allclose(c, cT.T, rtol=0, atol=TOL)
    else:
        assert c is None
    if activation == "relu":
        assert (hs == 0).any() and (hs > 0).any()  # both sides of the kink were exercised


@pytest.mark.parametrize("cell,activation", LAYER_CASES)
def test_carried_state_equals_one_long_chunk(cell, activation):
    In, H, T, N = 2, 3, 6, 2
    w_ih, w_hh, b_ih, b_hh, xs, h0, c0 = random_layer(cell, In, H, T, N, seed=5)
    XP, Wh, bhn = to_charnn(cell, w_ih, w_hh, b_ih, b_hh, xs)
    h0c = numpy.ascontiguousarray(h0.T)
    c0c = None if c0 is None else numpy.ascontiguousarray(c0.T)
    h0_before, c0_before = h0c.copy(), None if c0c is None else c0c.copy()
    hs_full, (h_full, c_full), _ = layer_forward(cell, XP, Wh, h0c, c0c, bhn, activation)
    half = T // 2
    XP1, XP2 = numpy.ascontiguousarray(XP[:, :half]), numpy.ascontiguousarray(XP[:, half:])
    hs1, (h1, c1), _ = layer_forward(cell, XP1, Wh, h0c, c0c, bhn, activation, store=False)
    hs2, (h2, c2), _ = layer_forward(cell, XP2, Wh, h1, c1, bhn, activation)
    numpy.testing.assert_allclose(numpy.concatenate([hs1, hs2], axis=1), hs_full, rtol=0, atol=TOL)
    numpy.testing.assert_allclose(h2, h_full, rtol=0, atol=TOL)
    if cell == "lstm":
        numpy.testing.assert_allclose(c2, c_full, rtol=0, atol=TOL)
    # The initial state is read, never written.
    numpy.testing.assert_array_equal(h0c, h0_before)
    if c0c is not None:
        numpy.testing.assert_array_equal(c0c, c0_before)


def test_gru_bias_layout_is_pytorchs():
    """A hidden bias on the n gate is not the same as an input bias there (reset applies to it)."""
    w_ih, w_hh, b_ih, b_hh, xs, h0, _ = random_layer("gru", 2, 3, 3, 2, seed=2)
    wrong = b_ih.copy()
    wrong[6:] += b_hh[6:]  # folding b_hn into b, as if the reset came after the bias
    out, _, _ = ref_layer("gru", w_ih, w_hh, b_ih, b_hh, xs, h0)
    hs, _, _ = run_charnn("gru", w_ih, w_hh, b_ih, b_hh, xs, h0, None)
    numpy.testing.assert_allclose(hs, out.transpose(2, 0, 1), rtol=0, atol=TOL)
    b_hh_zero_n = b_hh.copy()
    b_hh_zero_n[6:] = 0
    out_wrong, _, _ = ref_layer("gru", w_ih, w_hh, wrong, b_hh_zero_n, xs, h0)
    assert numpy.abs(out_wrong - out).max() > 1e-3


# ----- the whole model against the reference -----

def ref_model(config, params, ids, targets, state, weights=None):
    """Mean (weighted) NLL of the model, from the reference cells and a scalar softmax."""
    T, N = ids.shape
    V, H = config.vocab_size, config.hidden
    rows = []  # rows[t][n] = input vector
    for t in range(T):
        row = []
        for n in range(N):
            if config.embed:
                row.append([float(v) for v in params["embed.W"][ids[t, n]]])
            else:
                row.append([1.0 if k == ids[t, n] else 0.0 for k in range(V)])
        rows.append(row)
    xs = numpy.array(rows)
    G = config.gates
    for layer in range(config.layers):
        b = params[f"rnn.{layer}.b"]
        b_hh = numpy.zeros(G * H)
        if config.cell == "gru":
            b_hh[2 * H:] = params[f"rnn.{layer}.bhn"]
        h0, c0 = state[layer]
        xs, _, _ = ref_layer(config.cell, params[f"rnn.{layer}.Wx"], params[f"rnn.{layer}.Wh"], b, b_hh, xs,
                             h0.T, None if c0 is None else c0.T, config.activation)
    W = params["embed.W"] if config.tie else params["head.W"]
    total = wsum = 0.0
    for t in range(T):
        for n in range(N):
            logits = _affine(W, list(xs[t][n]), params["head.b"], range(V))
            m = max(logits)
            lse = m + math.log(sum(math.exp(v - m) for v in logits))
            w = 1.0 if weights is None else float(weights[t, n])
            total += w * (lse - logits[targets[t, n]])
            wsum += w
    return total / wsum


def test_init_params_forget_bias():
    """LSTM forget-gate bias rows (H:2H of every rnn.L.b) start at 0 (PyTorch's), or as given."""
    config = ModelConfig(vocab_size=5, cell="lstm", layers=2, hidden=3)
    for fb, params in ((0.0, init_params(config, 1)), (1.0, init_params(config, 1, forget_bias=1.0)), (1.5, init_params(config, 1, forget_bias=1.5))):
        for layer in range(2):
            b = params[f"rnn.{layer}.b"]
            assert (b[3:6] == fb).all() and (b[:3] == 0).all() and (b[6:] == 0).all()
    with pytest.raises(ValueError, match="forget_bias"):
        init_params(config, 1, forget_bias=float("nan"))


def test_init_params_input_scale():
    """input_scale draws a one-hot model's layer-0 input weights U(-a, a): the same draws as at
    0, scaled, every other parameter identical; an embedded model ignores it."""
    config = ModelConfig(vocab_size=5, cell="lstm", layers=2, hidden=16)
    base, scaled = init_params(config, 3, input_scale=0.0), init_params(config, 3, input_scale=1.0)
    assert numpy.abs(base["rnn.0.Wx"]).max() <= 0.25 < numpy.abs(scaled["rnn.0.Wx"]).max() <= 1.0
    numpy.testing.assert_allclose(scaled["rnn.0.Wx"], base["rnn.0.Wx"] * 4.0)  # 1 / (1 / sqrt(16))
    for name in base:
        if name != "rnn.0.Wx":
            assert numpy.array_equal(base[name], scaled[name]), name
    embedded = ModelConfig(vocab_size=5, cell="lstm", layers=1, hidden=16, embed=4)
    assert all(numpy.array_equal(a, b) for a, b in zip(init_params(embedded, 3, input_scale=0.0).values(),
                                                       init_params(embedded, 3, input_scale=1.0).values()))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="input_scale"):
            init_params(config, 1, input_scale=bad)


def random_params(config, seed):
    params = init_params(config, seed)
    rng = numpy.random.default_rng(seed + 100)
    for name, p in params.items():
        if name.endswith((".b", ".bhn")):
            p[...] = rng.normal(0, 0.3, p.shape)
    return params


def random_state(config, N, seed):
    rng = numpy.random.default_rng(seed + 200)
    H = config.hidden
    return [(rng.normal(0, 0.5, (H, N)), rng.normal(0, 0.5, (H, N)) if config.cell == "lstm" else None)
            for _ in range(config.layers)]


MODEL_CASES = [
    dict(cell="rnn", layers=2, embed=0),
    dict(cell="rnn", layers=1, embed=3, activation="relu"),
    dict(cell="lstm", layers=2, embed=0),
    dict(cell="lstm", layers=1, embed=4, hidden=4, tie=True),
    dict(cell="gru", layers=2, embed=3),
    dict(cell="gru", layers=1, embed=0),
]


@pytest.mark.parametrize("case", MODEL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_model_loss_matches_reference(case):
    kw = dict(vocab_size=6, hidden=3)
    kw.update(case)
    config = ModelConfig(**kw)
    params = random_params(config, seed=3)
    T, N = 4, 2
    rng = numpy.random.default_rng(9)
    ids = rng.integers(0, config.vocab_size, (T, N))
    targets = rng.integers(0, config.vocab_size, (T, N))
    state = random_state(config, N, seed=3)
    model = LanguageModel(config, {k: v.copy() for k, v in params.items()}, F64)
    loss, cache, _ = model.forward(ids, targets, [(h.copy(), None if c is None else c.copy()) for h, c in state])
    assert float(loss) == pytest.approx(ref_model(config, params, ids, targets, state), abs=TOL)
    # per-position weights (0 masks a position out)
    weights = numpy.array([[1, 0], [1, 1], [0, 1], [1, 1]], dtype=float)
    loss_w, _, _ = model.forward(ids, targets, state, weights=weights)
    assert float(loss_w) == pytest.approx(ref_model(config, params, ids, targets, state, weights), abs=TOL)


def test_model_loss_with_fractional_weights_is_the_weighted_mean():
    config = ModelConfig(vocab_size=5, cell="rnn", layers=1, hidden=3)
    params = random_params(config, seed=1)
    ids = numpy.array([[1, 2]])
    targets = numpy.array([[3, 4]])
    state = random_state(config, 2, seed=1)
    model = LanguageModel(config, params, F64)
    weights = numpy.array([[0.25, 0.25]])
    loss, _, _ = model.forward(ids, targets, state, weights=weights)
    assert float(loss) == pytest.approx(ref_model(config, params, ids, targets, state, weights), abs=TOL)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("embed", [0, 3])
def test_step_equals_forward_one_token_at_a_time(cell, embed):
    config = ModelConfig(vocab_size=7, cell=cell, layers=2, hidden=4, embed=embed)
    model = LanguageModel(config, random_params(config, seed=4), F64)
    T, N = 5, 3
    rng = numpy.random.default_rng(12)
    ids = rng.integers(0, 7, (T, N))
    targets = rng.integers(0, 7, (T, N))
    state0 = random_state(config, N, seed=4)
    loss, cache, final = model.forward(ids, targets, state0)
    state = state0
    nll = numpy.empty((T, N))
    for t in range(T):
        logits, state = model.step(ids[t], state)
        logits = to_host(logits)
        assert logits.shape == (N, 7)
        m = logits.max(axis=1, keepdims=True)
        logp = logits - m - numpy.log(numpy.exp(logits - m).sum(axis=1, keepdims=True))
        nll[t] = -logp[numpy.arange(N), targets[t]]
    numpy.testing.assert_allclose(nll, to_host(cache["nll"]), rtol=0, atol=TOL)
    assert nll.mean() == pytest.approx(float(loss), abs=TOL)
    for (h, c), (hf, cf) in zip(state, final):
        numpy.testing.assert_allclose(h, hf, rtol=0, atol=TOL)
        if cell == "lstm":
            numpy.testing.assert_allclose(c, cf, rtol=0, atol=TOL)


def test_forward_rejects_out_of_range_ids():
    from charnn.nn.model import ModelError

    config = ModelConfig(vocab_size=5, cell="rnn", layers=1, hidden=3)
    model = LanguageModel.create(config, 0, F64)
    with pytest.raises(ModelError):
        model.forward(numpy.array([[5]]), numpy.array([[0]]))
    with pytest.raises(ModelError):
        model.forward(numpy.array([[0]]), numpy.array([[-1]]))
    with pytest.raises(ModelError):
        model.step(numpy.array([7]), model.initial_state(1))

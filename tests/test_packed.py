"""The packed products of packed.py against NumPy's, and the compiled LSTM loops with them
against the loops with the BLAS."""

import numpy
import pytest

from charnn.engine import layers, packed
from charnn.engine import loops as rowsplit

# Only what runs the generated code needs AVX-512; the layout and the settings do not.
needs_avx512 = pytest.mark.skipif(not packed.available(), reason="needs numba, llvmlite and an AVX-512 CPU")


@pytest.mark.parametrize("M,K,N", [(512, 128, 16), (37, 5, 1), (30, 7, 33), (200, 80, 10), (9, 3, 64), (28, 4, 16), (512, 64, 1), (70, 9, 3), (100, 30, 20),
                                   (56, 64, 17), (1, 1, 1), (29, 2, 48)])
@needs_avx512
def test_product_matches_numpy(M, K, N):
    rng = numpy.random.default_rng(M * K + N)
    W = rng.normal(size=(M, K)).astype(numpy.float32)
    # B and C wider than the product, so the strides differ from N and the columns beyond N
    # show whether anything was written there.
    B = rng.normal(size=(K, N + 3)).astype(numpy.float32)
    C = numpy.full((M, N + 5), 7.0, dtype=numpy.float32)
    Wp = packed.packed(W, N)  # held here: the product reads it through a raw pointer
    packed.product(M, K, N)(Wp.ctypes.data, B.ctypes.data, N + 3, C.ctypes.data, N + 5)
    want = W.astype(numpy.float64) @ B[:, :N]
    assert numpy.abs(C[:, :N] - want).max() <= 1e-5 * numpy.abs(want).max() + 1e-6
    assert (C[:, N:] == 7.0).all()


def test_packed_layout():
    R = packed.rows_per_panel(16)
    assert R == packed.ACCUMULATORS
    W = numpy.arange((R + 2) * 3, dtype=numpy.float32).reshape(R + 2, 3)
    flat = packed.packed(W, 16)
    # Panel 0: rows 0..R-1 k-major; then the last two rows, k-major.
    numpy.testing.assert_array_equal(flat[:R * 3].reshape(3, R), W[:R].T)
    numpy.testing.assert_array_equal(flat[R * 3:].reshape(3, 2), W[R:].T)
    assert packed.rows_per_panel(32) == packed.ACCUMULATORS // 2
    # Lanes over rows (N not a multiple of 16): panels of 16 * RV rows, the last padded with zeros.
    assert not packed.streams_in_lanes(20) and packed.vectors_per_panel(20) == 2
    W = numpy.arange(40 * 3, dtype=numpy.float32).reshape(40, 3) + 1
    flat = packed.packed(W, 20)
    assert flat.size == 64 * 3
    numpy.testing.assert_array_equal(flat[:96].reshape(3, 32), W[:32].T)
    numpy.testing.assert_array_equal(flat[96:].reshape(3, 32)[:, :8], W[32:].T)
    assert not flat[96:].reshape(3, 32)[:, 8:].any()
    # A transposed view packs to the same array as its contiguous copy (the loops read it the
    # other way round).
    for N in (16, 20):
        numpy.testing.assert_array_equal(packed.packed(W.T, N), packed.packed(numpy.ascontiguousarray(W.T), N))


def _layout(W, N):
    """packed.packed's layout written plainly: panels of rows, each k-major, zero-padded to
    16 * vectors_per_panel(N) rows where the lanes run over rows."""
    M, K = W.shape
    pad = not packed.streams_in_lanes(N)
    R = packed.LANES * packed.vectors_per_panel(N) if pad else packed.rows_per_panel(N)
    panels = []
    for p0 in range(0, M, R):
        block = W[p0:p0 + R]
        panel = numpy.zeros((K, R if pad else len(block)), numpy.float32)
        panel[:, :len(block)] = block.T
        panels.append(panel.ravel())
    return numpy.concatenate(panels)


@pytest.mark.parametrize("M,K", [(70, 40), (33, 17), (128, 64), (1, 5), (45, 1)])
@pytest.mark.parametrize("N", [1, 5, 16, 20, 33, 64])  # panels of 128, 80, 28, 32, 32 and 7 rows
def test_packing_in_tiles_and_from_a_transpose_keeps_the_layout(M, K, N):
    # Shapes with whole and partial 16 x 16 tiles, a matrix and the transposed view of one
    # (each packed by its own loop), and a strided view (copied first).
    rng = numpy.random.default_rng(M * 100 + K + N)
    W = rng.normal(size=(M, K)).astype(numpy.float32)
    for view in (W, numpy.ascontiguousarray(W.T).T, rng.normal(size=(M, 2 * K)).astype(numpy.float32)[:, ::2]):
        numpy.testing.assert_array_equal(packed.packed(view, N), _layout(view, N))


def test_usable_bounds():
    # Where the CPU lacks AVX-512 no width is usable, so the loops always fall back.
    inside = packed.available()
    assert packed.usable(packed.MIN_N) == inside and packed.usable(packed.MAX_N) == inside
    assert not packed.usable(packed.MIN_N - 1) and not packed.usable(packed.MAX_N + 1)


def test_loops_get_packed_weights_where_available():
    # The choice of path and its fallback run on every CPU; only building the product needs
    # AVX-512 (the signature, with its use_packed argument, is checked everywhere).
    W = numpy.ones((8, 4), numpy.float32)
    mm, Wp = rowsplit._packed_for(W, 16, True)
    if packed.available():
        assert Wp.size == W.size and mm is packed.product(8, 4, 16)
    else:
        assert Wp.size == 0 and mm is rowsplit._NO_MM
    assert rowsplit._packed_for(W, packed.MAX_N + 1, True)[1].size == 0  # too wide: the BLAS
    assert rowsplit._packed_for(W, 16, False)[1].size == 0  # turned off by the settings


@needs_avx512
def test_compiled_from_two_threads_at_once():
    import threading

    shapes = [(33 + i, 7, 5) for i in range(6)]  # shapes no other test compiles
    errors = []

    def work():
        try:
            for M, K, N in shapes:
                W = numpy.ones((M, K), numpy.float32)
                B = numpy.ones((K, N), numpy.float32)
                C = numpy.zeros((M, N), numpy.float32)
                Wp = packed.packed(W, N)
                packed.product(M, K, N)(Wp.ctypes.data, B.ctypes.data, N, C.ctypes.data, N)
                assert (C == K).all()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_turned_off_by_settings():
    assert rowsplit._packed_for(numpy.zeros((8, 4), numpy.float32), 16, False)[1].size == 0


def lstm_inputs(H, N, T, seed=0):
    rng = numpy.random.default_rng(seed)
    f = numpy.float32
    return (rng.normal(0, 0.7, (4 * H, T, N)).astype(f), rng.normal(0, 1 / numpy.sqrt(H), (4 * H, H)).astype(f),
            rng.normal(0, 0.5, (H, N)).astype(f), rng.normal(0, 0.5, (H, N)).astype(f), rng.normal(0, 1, (H, T, N)).astype(f))


@needs_avx512
@pytest.mark.skipif(not rowsplit.compiled_loops(), reason="needs a CBLAS sgemm in NumPy's BLAS")
@pytest.mark.parametrize("H,N,T", [(16, 6, 7), (40, 16, 9), (64, 20, 3), (32, 33, 4), (24, 1, 5)])
@pytest.mark.parametrize("split", ["one core", "rows"])
def test_loops_with_packed_products_match_blas(monkeypatch, H, N, T, split):
    XP, Wh, h0, c0, dhs = lstm_inputs(H, N, T)
    on = packed._setup()
    out = {}
    for mode in ("packed", "blas"):
        monkeypatch.setattr(packed, "_state", on if mode == "packed" else False)
        if split == "rows":
            hs, (h, c), cache = rowsplit.lstm_forward(XP, Wh, h0, c0)
            dXP, dWh, _, dh0, dc0 = rowsplit.lstm_backward(dhs, cache, Wh)
            grads = (dXP, dWh, dh0, dc0)
        else:
            hs, (h, c), cache = layers.layer_forward("lstm", XP, Wh, h0, c0, None, True, True, True)
            dXP, dWh, _, dh0, dc0 = layers.layer_backward("lstm", dhs, cache, Wh, None, True, True)
            grads = (dXP, dWh, dh0, dc0)
        out[mode] = (hs, h, c, *grads)
    for a, b in zip(out["packed"], out["blas"]):
        if b is not None:
            assert numpy.abs(a - b).max() <= 1e-5 * (numpy.abs(b).max() + 1e-12)

"""Thin matrix products C (M, N) = W (M, K) @ B (K, N) with W packed once, for the LSTM time loops.

Inside a time loop the recurrent product is thin: all G*H rows of Wh, a handful of streams.
OpenBLAS repacks W at every call and runs such products at 35-115 GFLOP/s on one core of this
machine. Here W is packed once per chunk into panels of rows, each panel stored k-major (its
rows' weights of column k side by side), and one small function per shape multiplies it, its
sums held in AVX-512 registers while k runs over K. Two kernels: where N is a multiple of 16,
the lanes run over the streams (per panel of R rows, R x N/16 accumulators; each step of k
loads a row of B and broadcasts the panel's R weights); otherwise over 16 rows of W at a time
(each step of k loads the panel's column k and broadcasts B's entries), so no lane idles at
N = 20 or N = 1. Measured on one core here (medians, us per product, OpenBLAS's sgemm through
CBLAS against this): (512x128)@(128x16) 34.6 / 14.7, (2048x512)@(512x32) 782 / 476,
(512x2048)@(2048x32) 747 / 448, (800x200)@(200x20) 118 / 52, (2048x512)@(512x1) 421 / 172:
140-157 GFLOP/s (benchmarks/README.md).

The functions are written in LLVM IR here and compiled by llvmlite (numba's own code
generator, so no new dependency) for the host CPU, one per (M, K, N), on first use; the object
code is kept on disk (objcache.py, beside numba's cache), so a later process loads it in about a
millisecond instead of compiling for 0.1 s a shape (:class:`CodeGen`). They are
used only where the CPU has AVX-512, the only kind they were measured on (elsewhere LLVM
would split each vector into narrower ones), and after a product checked against NumPy's. The
compiled LSTM loops (loops.py) call them through a ctypes pointer, as they call sgemm; the
sampler's stepper (stepper.py) calls them from Python where the server's scheduler finds its
packed stepper the faster at a width.
Whether the loops use them is the engine's choice (settings.py; CHARNN_PACKED=0 turns them off).
"""

from __future__ import annotations

import ctypes
import threading

import numpy

from . import kernels

LANES = 16  # floats in an AVX-512 register
ACCUMULATORS = 28  # of the 32 vector registers; the rest hold B's row and a broadcast weight
# Up to 64 columns these beat OpenBLAS on one core here nearly everywhere (benchmarks/README.md);
# from 96, too few rows fit a panel: (2048x512)@(512x128) 3.0 against 2.5 ms.
MIN_N, MAX_N = 1, 4 * LANES

_state = None  # a CodeGen for this CPU, or False
_lock = threading.RLock()  # where numba's compiler lock is missing (see _compiler_lock)
_compiled = {}  # (M, K, N) -> ctypes function
SIGNATURE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64)


def rows_per_panel(N: int) -> int:
    """R: as many rows as keep R * ceil(N/16) accumulators within the registers."""
    return max(1, ACCUMULATORS // -(-N // LANES))


def streams_in_lanes(N: int) -> bool:
    """Which of the two kernels serves N columns: lanes over the columns (the streams) where N
    is a multiple of 16, else lanes over the rows of W, 16 rows to a register: a product with
    N = 20 would leave 12 of 32 lanes idle in the first, and one with N = 1 (sampling) 15 of
    16."""
    return N % LANES == 0


def vectors_per_panel(N: int) -> int:
    """RV, for lanes over rows: panels of 16 * RV rows, as many as keep the RV * N accumulators,
    the panel's RV vectors of a column and B's broadcast entry within the 32 registers: at N 3,
    4 and 7 the rule RV * N <= 28 spilled (2026-12-06, one core, us a product of (1536x384)
    with N columns: N 3 107.6 with RV 8 against 37.9 with 7, N 4 111.7 with 7 against 48.6 with
    6, N 7 201.2 with 4 against 85.7 with 3; (2048x512): 184.5 / 63.2, 250.4 / 81.7, 352.3 /
    137.0; the other N unchanged). A panel's height changes no sum's order, so no bit of a
    product."""
    return 2 if N >= 14 else max(1, min(8, (2 * LANES - 1) // (N + 1)))


V = "<16 x float>"  # an AVX-512 register of floats, in LLVM IR


def symbol(M: int, K: int, N: int) -> str:
    """The product's function name (one engine holds the products of every shape)."""
    return f"mm_{M}x{K}x{N}"


def _ir(M: int, K: int, N: int, cpu: str, features: str) -> str:
    """The LLVM IR of ``void mm_MxKxN(ptr W, ptr B, i64 ldb, ptr C, i64 ldc)`` for one shape: W packed
    by :func:`packed`, B and C row-major with row strides ldb and ldc (in floats). The two
    kernels share the scaffolding below (the loops over panels and over k) and differ in what
    a step of k loads and how the sums reach C."""
    lines = [f"declare {V} @llvm.fma.v16f32({V}, {V}, {V})",
             f"define void @{symbol(M, K, N)}(ptr noalias %W, ptr noalias %B, i64 %ldb, ptr noalias %C, i64 %ldc) #0 {{",
             "entry:"]
    (_body_cols if streams_in_lanes(N) else _body_rows)(lines.append, M, K, N)
    lines += ["done:", "  ret void", "}",
              f'attributes #0 = {{ nounwind "target-cpu"="{cpu}" "target-features"="{features}" '
              '"prefer-vector-width"="512" "min-legal-vector-width"="512" }']
    return "\n".join(lines) + "\n"


def _panels(emit, M: int, K: int, height: int, panel):
    """The loop over panels of ``height`` rows (then one panel of the rows left over): each
    sets %<name>_row0 (its first row of W and C) and %<name>_w (its packed weights), and
    panel(name, rows) emits its body, which ends by branching to %<name>_end."""
    full, rest = divmod(M, height)
    kinds = [(f"q{rows}", rows, count, row0) for rows, count, row0 in ((height, full, 0), (rest, 1, full * height))
             if count and rows]
    emit(f"  br label %{kinds[0][0]}")
    for i, (name, rows, count, row0) in enumerate(kinds):
        came_from = "entry" if i == 0 else f"{kinds[i - 1][0]}_end"
        then = kinds[i + 1][0] if i + 1 < len(kinds) else "done"
        x = lambda s: f"%{name}_{s}"  # noqa: E731 - a local name in this block
        emit(f"{name}:")
        emit(f"  {x('p')} = phi i64 [0, %{came_from}], [{x('p_next')}, %{name}_end]")
        emit(f"  {x('prow')} = mul i64 {x('p')}, {height}")
        emit(f"  {x('row0')} = add i64 {x('prow')}, {row0}")
        emit(f"  {x('woff')} = mul i64 {x('row0')}, {K}")
        emit(f"  {x('w')} = getelementptr float, ptr %W, i64 {x('woff')}")
        panel(name, rows)
        emit(f"{name}_end:")
        emit(f"  {x('p_next')} = add i64 {x('p')}, 1")
        emit(f"  {x('p_more')} = icmp ult i64 {x('p_next')}, {count}")
        emit(f"  br i1 {x('p_more')}, label %{name}, label %{then}")


def _k_loop(emit, y, label: str, enter: str, K: int, accs, step):
    """Block ``label``: k from 0 to K - 1, the accumulators ``accs`` (names; each acc starts at
    zero, new<acc> is its next value) carried around; step(k) emits one step's loads and
    fmas. Falls through to the block ``label``_store. y makes a local name. (Labels and
    values share one namespace in LLVM IR: a label must not be a value's name.)"""
    emit(f"{label}:")
    emit(f"  {y('k')} = phi i64 [0, %{enter}], [{y('k_next')}, %{label}]")
    for acc in accs:
        emit(f"  {y(acc)} = phi {V} [zeroinitializer, %{enter}], [{y('new' + acc)}, %{label}]")
    step(y('k'))
    emit(f"  {y('k_next')} = add i64 {y('k')}, 1")
    emit(f"  {y('k_more')} = icmp ult i64 {y('k_next')}, {K}")
    emit(f"  br i1 {y('k_more')}, label %{label}, label %{label}_store")
    emit(f"{label}_store:")


def _row_at(emit, y, name: str, base: str, k, stride) -> str:
    """%name = base + k * stride floats (the start of row k); returns the pointer's name."""
    emit(f"  {y(name + 'o')} = mul i64 {k}, {stride}")
    emit(f"  {y(name)} = getelementptr float, ptr {base}, i64 {y(name + 'o')}")
    return y(name)


def _load_splat(emit, y, name: str, base: str, offset: int):
    """%name = a register of 16 copies of the float at base + offset."""
    emit(f"  {y(name + 'p')} = getelementptr float, ptr {base}, i64 {offset}")
    emit(f"  {y(name + 's')} = load float, ptr {y(name + 'p')}, align 4")
    emit(f"  {y(name + 'i')} = insertelement {V} poison, float {y(name + 's')}, i64 0")
    emit(f"  {y(name)} = shufflevector {V} {y(name + 'i')}, {V} poison, <16 x i32> zeroinitializer")


def _body_rows(emit, M: int, K: int, N: int):
    """Lanes over rows of W: for each panel of 16 * RV rows and each group of up to 28 // RV
    columns, RV x (columns) accumulators; each step of k loads the panel's RV vectors of
    column k (packed k-major, zero rows padding the last panel) and broadcasts B[k, n] for
    each column n. The sums go to C element by element (a register holds part of a column
    of C)."""
    RV = vectors_per_panel(N)
    PH = LANES * RV
    NC = min(N, ACCUMULATORS // RV)
    groups = [(n0, min(NC, N - n0)) for n0 in range(0, N, NC)]

    def panel(name, rows):
        x = lambda s: f"%{name}_{s}"  # noqa: E731
        emit(f"  br label %{name}_g0")
        for g, (n0, nc) in enumerate(groups):
            y = lambda s: x(f"g{g}_{s}")  # noqa: E731

            def step(k):
                wk = _row_at(emit, y, "wk", x('w'), k, PH)
                for j in range(RV):
                    emit(f"  {y(f'wp{j}')} = getelementptr float, ptr {wk}, i64 {LANES * j}")
                    emit(f"  {y(f'wv{j}')} = load {V}, ptr {y(f'wp{j}')}, align 4")
                brow = _row_at(emit, y, "brow", "%B", k, "%ldb")
                for n in range(nc):
                    _load_splat(emit, y, f"b{n}", brow, n0 + n)
                    for j in range(RV):
                        emit(f"  {y(f'newacc{j}_{n}')} = call {V} @llvm.fma.v16f32({V} {y(f'wv{j}')}, {V} {y(f'b{n}')}, "
                             f"{V} {y(f'acc{j}_{n}')})")

            enter = name if g == 0 else f"{name}_g{g - 1}_store"
            _k_loop(emit, y, f"{name}_g{g}", enter, K, [f"acc{j}_{n}" for j in range(RV) for n in range(nc)], step)
            for j in range(RV):
                for n in range(nc):
                    for e in range(min(LANES, rows - LANES * j)):
                        z = f"{j}_{n}_{e}"
                        emit(f"  {y(f'r{z}')} = add i64 {x('row0')}, {LANES * j + e}")
                        emit(f"  {y(f'o{z}')} = mul i64 {y(f'r{z}')}, %ldc")
                        emit(f"  {y(f'q{z}')} = add i64 {y(f'o{z}')}, {n0 + n}")
                        emit(f"  {y(f'cp{z}')} = getelementptr float, ptr %C, i64 {y(f'q{z}')}")
                        emit(f"  {y(f'e{z}')} = extractelement {V} {y(f'newacc{j}_{n}')}, i64 {e}")
                        emit(f"  store float {y(f'e{z}')}, ptr {y(f'cp{z}')}, align 4")
            emit(f"  br label %{name}_g{g + 1}" if g + 1 < len(groups) else f"  br label %{name}_end")

    _panels(emit, M, K, LANES * RV, panel)


def _body_cols(emit, M: int, K: int, N: int):
    """Lanes over the columns (N a multiple of 16): per panel of R rows, R x N/16
    accumulators; each step of k loads row k of B and broadcasts the panel's R weights of
    column k. Each sum is a run of 16 consecutive floats of a row of C."""
    assert N % LANES == 0
    R = rows_per_panel(N)
    NV = N // LANES

    def panel(name, rows):
        x = lambda s: f"%{name}_{s}"  # noqa: E731

        def step(k):
            brow = _row_at(emit, x, "brow", "%B", k, "%ldb")
            for v in range(NV):
                emit(f"  {x(f'bp{v}')} = getelementptr float, ptr {brow}, i64 {LANES * v}")
                emit(f"  {x(f'b{v}')} = load {V}, ptr {x(f'bp{v}')}, align 4")
            wk = _row_at(emit, x, "wk", x('w'), k, rows)
            for r in range(rows):
                _load_splat(emit, x, f"w{r}", wk, r)
                for v in range(NV):
                    emit(f"  {x(f'newacc{r}_{v}')} = call {V} @llvm.fma.v16f32({V} {x(f'w{r}')}, {V} {x(f'b{v}')}, "
                         f"{V} {x(f'acc{r}_{v}')})")

        emit(f"  br label %{name}_kloop")
        _k_loop(emit, x, f"{name}_kloop", name, K, [f"acc{r}_{v}" for r in range(rows) for v in range(NV)], step)
        for r in range(rows):
            emit(f"  {x(f'crow_at{r}')} = add i64 {x('row0')}, {r}")
            emit(f"  {x(f'coff{r}')} = mul i64 {x(f'crow_at{r}')}, %ldc")
            emit(f"  {x(f'crow{r}')} = getelementptr float, ptr %C, i64 {x(f'coff{r}')}")
            for v in range(NV):
                emit(f"  {x(f'cp{r}_{v}')} = getelementptr float, ptr {x(f'crow{r}')}, i64 {LANES * v}")
                emit(f"  store {V} {x(f'newacc{r}_{v}')}, ptr {x(f'cp{r}_{v}')}, align 4")
        emit(f"  br label %{name}_end")

    _panels(emit, M, K, R, panel)


def packed(W, N: int):
    """W (M, K), any strides, packed for the product with N columns, as one flat float32
    array: panels of rows, each stored k-major (all its rows' weights of column k side by
    side). Lanes over the columns: panels of R = rows_per_panel(N) rows, the last one shorter
    when R does not divide M. Lanes over the rows: panels of 16 * vectors_per_panel(N) rows,
    the last one padded with zero rows."""
    M, K = W.shape
    if streams_in_lanes(N):
        R, size = rows_per_panel(N), M * K
    else:
        R = LANES * vectors_per_panel(N)
        size = -(-M // R) * R * K
    out = numpy.empty(size, dtype=numpy.float32)
    pad = not streams_in_lanes(N)
    if W.T.flags.c_contiguous and not W.flags.c_contiguous:  # the transposed view of a matrix
        _pack_from_transpose(W.T, R, pad, out)
    else:
        _pack_transposing(numpy.ascontiguousarray(W), R, pad, out)
    return out


SMALL_PANEL = 32  # rows: up to this many, a panel is transposed a row at a time


if kernels.available:
    @kernels.jit
    def _pack_from_transpose(S, R, pad, out):
        """The loop of :func:`packed` for W = S^T, S C-contiguous (the loops pack Wh^T from Wh):
        column k of a panel of W's rows is a run of consecutive floats of S's row k, copied as
        a slice (unit strides LLVM can see: 240 us for W (256, 1024) at N = 1 when S was read
        by W's strides)."""
        K, M = S.shape
        i = 0
        for p0 in range(0, M, R):
            rows = min(R, M - p0)
            width = R if pad else rows
            for k in range(K):
                dst = out[i + k * width:i + (k + 1) * width]
                src = S[k, p0:p0 + rows]
                for r in range(rows):
                    dst[r] = src[r]
                for r in range(rows, width):
                    dst[r] = 0.0
            i += width * K

    @kernels.jit
    def _pack_transposing(S, R, pad, out):
        """The loop of :func:`packed` for W = S, C-contiguous: each panel is a transpose. A
        panel of up to SMALL_PANEL rows stays in cache while it is written a row of W at a
        time, its writes ``width`` floats apart ((1024, 256) for N = 16 in 118 us); a larger
        one would not (N = 1, panels of 128 rows: 253 us), and is done in tiles
        (kernels.transpose_rows: 177 us)."""
        M, K = S.shape
        i = 0
        for p0 in range(0, M, R):
            rows = min(R, M - p0)
            width = R if pad else rows
            if width <= SMALL_PANEL:
                for r in range(rows):
                    src = S[p0 + r]
                    for k in range(K):
                        out[i + k * width + r] = src[k]
            else:
                kernels.transpose_rows(S, p0, rows, width, out, i)
            for k in range(K):
                for r in range(rows, width):
                    out[i + k * width + r] = 0.0
            i += width * K


def _setup():
    """The code generator set up for this CPU, or False where the products should not be used
    (decided once, under the compiler lock: the two halves of a batch may ask at once)."""
    global _state
    if _state is None:
        with _compiler_lock():
            if _state is None:
                _state = _new_state()
    return _state


class CodeGen:
    """llvmlite's code generator for one CPU (``cpu``, ``features``: LLVM's names), with the
    cache its products' object code is kept in (objcache.ObjectCache, or None), and the one
    execution engine that holds the products it has loaded (the code lives as long as the
    engine, and the engine owns the target machine: one engine, so it is freed once)."""

    def __init__(self, cpu: str, features: str, cache=None):
        import llvmlite
        import llvmlite.binding as llvm

        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        self.llvm, self.cpu, self.features, self.cache = llvm, cpu, features, cache
        self.tm = llvm.Target.from_default_triple().create_target_machine(cpu=cpu, features=features, opt=3)
        self.engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), self.tm)
        self.loaded = {}  # (M, K, N) -> ctypes function
        self.versions = {"llvmlite": llvmlite.__version__, "llvm": ".".join(map(str, llvm.llvm_version_info)),
                         "triple": llvm.get_default_triple()}
        try:
            import numba

            self.versions["numba"] = numba.__version__
        except ImportError:
            pass

    def key(self, M: int, K: int, N: int, source: str | None = None) -> dict:
        """What the product's object code depends on: its shape, the CPU, the versions and the
        engine's sources (``source``, default their digest)."""
        if source is None:
            from . import SOURCE_DIGEST as source
        return product_key(M, K, N, self.cpu, self.features, source, self.versions)

    def object_code(self, M: int, K: int, N: int) -> bytes:
        """The product compiled (optimised, machine code) now, as an object file's bytes."""
        llvm = self.llvm
        module = llvm.parse_assembly(_ir(M, K, N, self.cpu, self.features))
        module.verify()
        passes = llvm.create_pass_builder(self.tm, llvm.create_pipeline_tuning_options(speed_level=3))
        passes.getModulePassManager().run(module, passes)
        return self.tm.emit_object(module)

    def product(self, M: int, K: int, N: int):
        """The product for this shape, a ctypes function: loaded once, from the cache where
        it holds it, else compiled now (and stored there). Not thread-safe: the module's
        :func:`product` calls it under the compiler lock."""
        fn = self.loaded.get((M, K, N))
        if fn is not None:
            return fn
        key = self.key(M, K, N) if self.cache is not None else None
        code = self.cache.load(key) if key is not None else None
        if code is None:
            code = self.object_code(M, K, N)
            if key is not None:
                self.cache.store(key, code)
        self.engine.add_object_file(self.llvm.ObjectFileRef.from_data(code))
        self.engine.finalize_object()
        fn = self.loaded[(M, K, N)] = SIGNATURE(self.engine.get_function_address(symbol(M, K, N)))
        return fn


def product_key(M: int, K: int, N: int, cpu: str, features: str, source: str, versions: dict) -> dict:
    """The cache key of a product: its shape, the CPU's name and features (LLVM's), the library
    versions and the digest of the engine's sources (which generate the code)."""
    return {"what": "packed product", "shape": [M, K, N], "cpu": cpu, "features": features, "source": source,
            **versions}


def _new_state():
    if not kernels.available:
        return False
    try:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features()
        if not features.get("avx512f"):
            return False
        from . import objects_dir
        from .objcache import ObjectCache

        state = CodeGen(llvm.get_host_cpu_name(), features.flatten(), ObjectCache(objects_dir()))
        # One product checked against NumPy's before any loop trusts the code generator (and
        # the cache: this product comes from it too after the first run).
        rng = numpy.random.default_rng(0)
        W = rng.normal(size=(37, 19)).astype(numpy.float32)
        B = rng.normal(size=(19, 41)).astype(numpy.float32)
        C = numpy.zeros((37, 50), dtype=numpy.float32)
        Wp = packed(W, 20)
        state.product(37, 19, 20)(Wp.ctypes.data, B.ctypes.data, 41, C.ctypes.data, 50)
        if numpy.allclose(C[:, :20], W @ B[:, :20], rtol=1e-4, atol=1e-4) and not C[:, 20:].any():
            return state
    except Exception:  # noqa: BLE001 - no usable code generator: OpenBLAS does the products
        pass
    return False


def _compiler_lock():
    """numba's compiler lock: LLVM's global context is not safe to use from two threads at
    once, and numba may be compiling in the other thread."""
    try:
        from numba.core.compiler_lock import global_compiler_lock

        return global_compiler_lock
    except ImportError:
        return _lock


def available() -> bool:
    return bool(_setup())


def usable(N: int) -> bool:
    """Whether products with N columns run here (else the caller uses the BLAS)."""
    return MIN_N <= N <= MAX_N and available()


def product(M: int, K: int, N: int):
    """The compiled product for this shape, a ctypes function (W packed, B, ldb, C, ldc)."""
    fn = _compiled.get((M, K, N))
    if fn is None:
        state = _setup()
        with _compiler_lock():
            fn = _compiled[(M, K, N)] = state.product(M, K, N)
    return fn

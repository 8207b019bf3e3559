"""NumPy's own CBLAS sgemm, found and checked once, for the compiled loops (loops.py) that call
the BLAS themselves instead of going through NumPy (no Python and no GIL per time step)."""

from __future__ import annotations

import ctypes
import threading

import numpy

from . import kernels

_blas = None  # (sgemm ctypes function, sched_yield ctypes function), or False
_blas_lock = threading.Lock()


def find_blas():
    """NumPy's CBLAS sgemm (a ctypes function) and libc's sched_yield, or False. Decided once,
    under a lock: the two halves of a batch ask at once on their first step, and an answer
    seen half-made (False) once sent one half down layers.py's Python loop, whose products
    round differently, so the first step after a start or a resume could differ from run to
    run in its last bits."""
    global _blas
    if _blas is None:
        with _blas_lock:
            if _blas is None:
                _blas = _locate_blas()
    return _blas


def _locate_blas():
    if not kernels.available:
        return False
    try:
        from threadpoolctl import threadpool_info

        lib = None
        for info in threadpool_info():
            if info.get("user_api") == "blas" and info.get("internal_api") == "openblas":
                lib = ctypes.CDLL(info["filepath"])
                break
        if lib is None:
            return False
        fn = None
        for name, wide in (("scipy_cblas_sgemm64_", True), ("cblas_sgemm64_", True), ("scipy_cblas_sgemm", False), ("cblas_sgemm", False)):
            fn = getattr(lib, name, None)
            if fn is not None:
                break
        if fn is None:
            return False
        I, S = ctypes.c_int, ctypes.c_size_t
        L = ctypes.c_int64 if wide else ctypes.c_int
        fn.restype = None
        fn.argtypes = [I, I, I, L, L, L, ctypes.c_float, S, L, S, L, ctypes.c_float, S, L]
        yld = ctypes.CDLL(None).sched_yield
        yld.restype, yld.argtypes = ctypes.c_int, []
        # A product checked against NumPy's before the loops trust the symbol and its
        # integer width (a wrong guess gives a wrong result here, not later).
        rng = numpy.random.default_rng(0)
        A = rng.normal(size=(7, 5)).astype(numpy.float32)
        B = rng.normal(size=(5, 9)).astype(numpy.float32)
        C = numpy.zeros((7, 3), dtype=numpy.float32)
        fn(101, 111, 111, 7, 3, 5, 1.0, A.ctypes.data, 5, B.ctypes.data, 9, 0.0, C.ctypes.data, 3)
        if numpy.allclose(C, A @ B[:, :3], rtol=1e-5, atol=1e-5):
            return (fn, yld)
    except (OSError, AttributeError, ImportError):
        pass
    return False

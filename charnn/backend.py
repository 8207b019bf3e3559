"""Array backends: NumPy on the CPU, CuPy on an NVIDIA GPU, one source for both.

A :class:`Backend` names the array module, the dtype and the operations (``ops``) the model
computes with: the CPU engine's (engine/cpu.py, built from the run's settings) on the CPU, the
reference's (nn/ops.py) elsewhere. :func:`get_backend` is the one place that choice is made;
it imports no engine: engines register themselves (:func:`register_engine`).

This is the only module that imports cupy. Everything else receives an array module ``xp``
(from :func:`get_backend` or :func:`array_module`) and does its math through it, so the same
code runs on either device. Arrays cross between host and device only here, through
:func:`to_device` and :func:`to_host`.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field

import numpy

try:  # CuPy is optional: the `gpu` extra.
    import cupy

    available = True
except Exception:  # ImportError, or a broken CUDA install that raises on import
    cupy = None
    available = False


class BackendError(RuntimeError):
    """The requested device or dtype cannot be used here."""


DTYPES = ("float32", "float64")
DEVICES = ("auto", "cpu", "gpu")


def nccl_module():
    """CuPy's NCCL bindings (cupy.cuda.nccl) for summing across GPUs (dist.NcclReducer), or None
    where CuPy or its NCCL is missing."""
    if not available:
        return None
    try:
        from cupy.cuda import nccl

        return nccl if getattr(nccl, "available", True) else None
    except Exception:
        return None


def gpu_count() -> int:
    if not available:
        return 0
    try:
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


@dataclass(frozen=True)
class Backend:
    """The array module to compute with, the float dtype of parameters and activations, and
    the operations to compute with (None: the reference's, nn/ops.py)."""

    xp: object
    dtype: object
    device: str  # "cpu" or "gpu"
    ops: object = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return f"{self.device} ({numpy.dtype(self.dtype).name})"


def get_backend(device: str = "auto", dtype: str = "float32", announce: bool = False, settings=None) -> Backend:
    """Pick the array module for ``device`` ("auto", "cpu" or "gpu") and the operations.

    "auto" takes the GPU when CuPy imports and sees a device, and the CPU otherwise; with
    ``announce`` the choice is said once on stderr. On the CPU the model computes with the
    engine's operations, built from ``settings`` (an engine.settings.Settings; default: the
    process's, from its CHARNN_* variables); on the GPU with the reference's.
    """
    if dtype not in DTYPES:
        raise BackendError(f"unknown dtype {dtype!r}: choose float32 or float64")
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}: choose auto, cpu or gpu")
    if device == "gpu":
        if not available:
            raise BackendError("--device gpu needs CuPy: pip install 'charnn[gpu]'")
        if gpu_count() == 0:
            raise BackendError("--device gpu: CuPy is installed but sees no CUDA device")
        chosen = "gpu"
    elif device == "auto":
        chosen = "gpu" if gpu_count() > 0 else "cpu"
        if announce:
            announce_device(device, chosen)
    else:
        chosen = "cpu"
    if chosen not in ENGINES and chosen in ENGINE_MODULES:
        importlib.import_module(ENGINE_MODULES[chosen])  # registers itself
    engine = ENGINES.get(chosen)
    return Backend(xp=cupy if chosen == "gpu" else numpy, dtype=getattr(numpy, dtype), device=chosen,
                   ops=None if engine is None else engine(settings))


def announce_device(requested: str, chosen: str):
    """Say on stderr which device --device auto chose (nothing for a device asked by name)."""
    if requested == "auto":
        print(f"charnn: using {'the GPU (CuPy)' if chosen == 'gpu' else 'the CPU (NumPy)'}", file=sys.stderr)


# device -> a function of the settings (or None: the process's) that builds the operations for
# it; an engine registers itself here when its module is imported. get_backend imports the
# module named in ENGINE_MODULES on first use (a plug-in, loaded by name: the backend knows no
# engine's code). A device without one computes with the reference operations (nn/ops.py).
ENGINES: dict = {}
ENGINE_MODULES = {"cpu": "charnn.engine.cpu"}


def register_engine(device: str, make_ops):
    ENGINES[device] = make_ops


def array_module(*arrays):
    """The array module that owns ``arrays`` (numpy, cupy, or a registered stand-in)."""
    for a in arrays:
        xp = getattr(type(a), "__charnn_xp__", None)
        if xp is not None:
            return xp
    if available:
        return cupy.get_array_module(*arrays)
    return numpy


def to_device(a, xp, dtype=None):
    """Copy a host (NumPy) array to the module ``xp``'s device; cast to ``dtype`` if given."""
    a = numpy.asarray(a) if not hasattr(a, "__array_interface__") else a
    if dtype is not None:
        a = a.astype(dtype, copy=False)
    if xp is numpy:
        return a
    return xp.asarray(a)


def to_host(a):
    """A NumPy copy (or view) of an array of any backend."""
    host = getattr(a, "__charnn_to_host__", None)
    if host is not None:  # a stand-in array module's arrays (tests)
        return host()
    if isinstance(a, numpy.ndarray):
        return a
    if available and isinstance(a, cupy.ndarray):
        return cupy.asnumpy(a)
    return numpy.asarray(a)


def to_float(a) -> float:
    """Read a 0-d array (a loss, a norm) back to the host as a Python float."""
    return float(to_host(a))

"""A stand-in "device" array module that refuses silent host conversion, the way CuPy does.

``standin`` is a module-like object exposing NumPy's API; its arrays are :class:`StrictArray`,
an ``ndarray`` subclass that computes only through the stand-in module's functions, its own
operators (``a + b``, ``a @ b``, ``a *= 2``) and methods (``a.sum()``). It raises TypeError when

- a plain ``numpy.<function>`` or ``numpy.<ufunc>`` is called on a StrictArray (``numpy.sum(a)``,
  ``numpy.tanh(a)``): charnn kernels must go through ``xp``,
- a StrictArray meets a plain ``numpy.ndarray`` in a ufunc or operator (``a + numpy.ones(3)``),
  as CuPy raises "Unsupported type <class 'numpy.ndarray'>"; Python and NumPy scalars are fine,
- a stand-in function is given a plain ``numpy.ndarray`` (``standin.tanh(host)``), except
  ``standin.asarray`` / ``standin.array``, the sanctioned host -> device copies,
- NumPy asks a StrictArray for ``__array__`` (it rarely does for a subclass),
- and, inside ``scalar_reads_forbidden()``, a value is read back implicitly (``float(a)``,
  ``bool(a)``, ``a.item()``): CuPy allows these but each is a hidden device sync.

Device -> host goes through ``charnn.backend.to_host``, which calls ``__charnn_to_host__``.
Known blind spot: ``numpy.asarray(strict)`` returns a base-class view without calling any hook
(NumPy treats subclasses as arrays), so the tests also assert the types of what comes back.

Use :func:`standin_backend` to get a ``charnn.backend.Backend`` on it. Test modules import this
file as ``from standin import ...`` (pytest puts tests/ on sys.path: there is no tests/__init__.py).
"""

from __future__ import annotations

import contextlib
import threading
import types

import numpy

from charnn.backend import Backend

SANCTIONED_HOST_TO_DEVICE = ("asarray", "array")


class StrictArray(numpy.ndarray):
    """An array of the stand-in device. Convert to host only with ``__charnn_to_host__``."""

    __charnn_xp__ = None  # set to the stand-in module below

    def __charnn_to_host__(self):
        return numpy.array(self.view(numpy.ndarray), copy=True)

    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion of a stand-in device array to a NumPy array is not "
                        "allowed; use charnn.backend.to_host")

    def __array_function__(self, func, types_, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} called on a stand-in device array: use the array "
                        "module (xp) instead of numpy")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        # Reached only by a direct numpy.<ufunc>(...) call: operators and methods below go to
        # the ufunc on unwrapped views themselves, after checking their operands.
        name = ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}"
        raise TypeError(f"numpy.{name} called on a stand-in device array: use the array module (xp)")

    def __repr__(self):
        return f"StrictArray({self.view(numpy.ndarray)!r})"

    # Reading a value back (float(a), bool(a), a.item()) is allowed, as CuPy allows it (with a
    # device sync); inside ``scalar_reads_forbidden()`` it raises, to find hidden syncs.
    def __float__(self):
        _scalar_read("float()")
        return float(self.view(numpy.ndarray))

    def __int__(self):
        _scalar_read("int()")
        return int(self.view(numpy.ndarray))

    def __bool__(self):
        _scalar_read("bool()")
        return bool(self.view(numpy.ndarray))

    def __index__(self):
        _scalar_read("an index")
        return self.view(numpy.ndarray).__index__()

    def item(self, *args):
        _scalar_read(".item()")
        return self.view(numpy.ndarray).item(*args)

    def tolist(self):
        _scalar_read(".tolist()")
        return self.view(numpy.ndarray).tolist()

    def __str__(self):
        return str(self.view(numpy.ndarray))


# How many scalar_reads_forbidden() blocks are open, in any thread. A count, not a saved and
# restored flag: two threads (test_dist's two ranks) each in a block, leaving in the other order,
# once left the flag set for every later test.
_scalar_reads = {"blocks": 0}
_scalar_reads_lock = threading.Lock()


def _scalar_read(what):
    if _scalar_reads["blocks"] > 0:
        raise TypeError(f"{what} of a stand-in device array: an implicit device -> host sync "
                        "(read values back with charnn.backend.to_host / to_float)")


@contextlib.contextmanager
def scalar_reads_forbidden():
    """Inside this block (in any thread, while any such block is open), float()/int()/bool()/
    .item()/.tolist() of a StrictArray raise."""
    with _scalar_reads_lock:
        _scalar_reads["blocks"] += 1
    try:
        yield
    finally:
        with _scalar_reads_lock:
            _scalar_reads["blocks"] -= 1


def _unsupported(x):
    return TypeError(f"Unsupported type {type(x)}: a host numpy.ndarray mixed with stand-in device "
                     "arrays (copy it with xp.asarray first)")


def _unwrap(x):
    """StrictArray -> plain ndarray view (recursively in lists/tuples/dicts); a plain ndarray raises."""
    if isinstance(x, StrictArray):
        return x.view(numpy.ndarray)
    if isinstance(x, numpy.ndarray):
        raise _unsupported(x)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _wrap(r):
    """ndarray or NumPy scalar results -> StrictArray (a 0-d one for scalars, as CuPy returns)."""
    if isinstance(r, StrictArray):
        return r
    if isinstance(r, numpy.ndarray):
        return r.view(StrictArray)
    if isinstance(r, numpy.generic):
        return numpy.asarray(r).view(StrictArray)
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, list):
        return [_wrap(v) for v in r]
    return r


def _apply_ufunc(ufunc, method, inputs, kwargs):
    out = kwargs.get("out")
    args = _unwrap(tuple(inputs))
    kw = _unwrap(dict(kwargs))
    result = getattr(ufunc, method)(*args, **kw)
    if method == "at":
        return None
    if out is not None:
        outs = out if isinstance(out, tuple) else (out,)
        return outs[0] if len(outs) == 1 else outs
    return _wrap(result)


def _operator(ufunc, reflected=False, inplace=False):
    def op(self, other):
        if inplace:
            return _apply_ufunc(ufunc, "__call__", (self, other), {"out": (self,)})
        args = (other, self) if reflected else (self, other)
        return _apply_ufunc(ufunc, "__call__", args, {})
    return op


def _unary(ufunc):
    return lambda self: _apply_ufunc(ufunc, "__call__", (self,), {})


def _method(name):
    def method(self, *args, **kwargs):
        return _wrap(getattr(self.view(numpy.ndarray), name)(*_unwrap(args), **_unwrap(kwargs)))
    method.__name__ = name
    return method


_BINARY = {"add": numpy.add, "sub": numpy.subtract, "mul": numpy.multiply, "truediv": numpy.true_divide,
           "floordiv": numpy.floor_divide, "mod": numpy.remainder, "pow": numpy.power,
           "matmul": numpy.matmul, "and": numpy.bitwise_and, "or": numpy.bitwise_or,
           "xor": numpy.bitwise_xor}
_COMPARE = {"lt": numpy.less, "le": numpy.less_equal, "gt": numpy.greater, "ge": numpy.greater_equal,
            "eq": numpy.equal, "ne": numpy.not_equal}
_UNARY = {"neg": numpy.negative, "pos": numpy.positive, "abs": numpy.absolute, "invert": numpy.invert}
# ndarray methods that compute through ufuncs internally (reductions, clip, ...).
_METHODS = ("sum", "prod", "max", "min", "mean", "var", "std", "any", "all", "cumsum", "cumprod",
            "clip", "round", "dot", "argmax", "argmin", "nonzero", "take", "fill", "sort", "argsort")

for _name, _uf in _BINARY.items():
    setattr(StrictArray, f"__{_name}__", _operator(_uf))
    setattr(StrictArray, f"__r{_name}__", _operator(_uf, reflected=True))
    setattr(StrictArray, f"__i{_name}__", _operator(_uf, inplace=True))
for _name, _uf in _COMPARE.items():
    setattr(StrictArray, f"__{_name}__", _operator(_uf))
for _name, _uf in _UNARY.items():
    setattr(StrictArray, f"__{_name}__", _unary(_uf))
for _name in _METHODS:
    setattr(StrictArray, _name, _method(_name))
StrictArray.__hash__ = None


class StandinUfunc:
    """``standin.tanh`` etc.: a NumPy ufunc that accepts only StrictArray (and scalar) operands."""

    def __init__(self, ufunc):
        self._ufunc = ufunc

    def __call__(self, *args, **kwargs):
        return _apply_ufunc(self._ufunc, "__call__", args, kwargs)

    def __getattr__(self, name):
        if name in ("at", "reduce", "accumulate", "reduceat", "outer"):
            return lambda *args, **kwargs: _apply_ufunc(self._ufunc, name, args, kwargs)
        return getattr(self._ufunc, name)

    def __repr__(self):
        return f"<standin ufunc {self._ufunc.__name__}>"


def _wrap_function(func, name):
    if name in SANCTIONED_HOST_TO_DEVICE:
        def host_to_device(a, *args, **kwargs):
            if isinstance(a, StrictArray):
                a = a.view(numpy.ndarray)
            return numpy.array(a, *args, **kwargs).view(StrictArray)  # always a device copy
        return host_to_device

    def device_function(*args, **kwargs):
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    device_function.__name__ = name
    return device_function


class StandinModule:
    """NumPy's namespace with every computation routed through StrictArray-only wrappers."""

    ndarray = StrictArray

    def __init__(self, base=numpy, name="standin"):
        self._base = base
        self.__name__ = name

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        obj = getattr(self._base, name)
        if isinstance(obj, numpy.ufunc):
            wrapped = StandinUfunc(obj)
        elif isinstance(obj, types.ModuleType):
            wrapped = StandinModule(obj, f"{self.__name__}.{name}")
        elif isinstance(obj, type) or not callable(obj):
            wrapped = obj  # dtypes, classes, constants pass through
        else:
            wrapped = _wrap_function(obj, name)
        setattr(self, name, wrapped)  # cache
        return wrapped

    def __repr__(self):
        return f"<stand-in array module {self.__name__}>"


standin = StandinModule()
StrictArray.__charnn_xp__ = standin


def standin_backend(dtype=numpy.float64) -> Backend:
    """A charnn Backend computing on the stand-in module."""
    return Backend(xp=standin, dtype=numpy.dtype(dtype).type, device="gpu")


def is_device(a) -> bool:
    return isinstance(a, StrictArray)

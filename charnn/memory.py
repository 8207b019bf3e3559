"""Memory estimates: what a piece of work will allocate, computed from its options before it
allocates anything, and the check that refuses it when that passes the memory there is.

A model of 30,000 hidden units, a billion streams or a beam of a billion asks NumPy for more
memory than a machine has: some fail part-way with an allocation error, and a billion layers
grow until the machine swaps. So every command first adds up the arrays it is about to make and
refuses in one line, naming the option, when the sum passes the memory available
(:func:`available`) or the ``--max-memory`` given (:func:`check`).

Notation: P parameters (counted from the configuration without a loop over its layers), D bytes
per number (4 for float32), T time steps and N streams of a chunk, M = T N, L layers, H hidden
units, E the embedding size (0: one-hot input), G gates, V the vocabulary, C classes; V' = V
for a full softmax and C + V / C for a class-factored one (its per-position arrays). Per cell
(nn/cells.py's registry): K the (H, T, N) arrays its forward keeps besides A and hs, B the
(G H, T, N) arrays its backward makes.

    creating a model    P (8 + D)       drawn in float64 on the host, then the model's copy
    a training step     P D (1 + S + R) the parameters, the optimizer's S slots (Adam 2, RMSprop
                                        and Adagrad 1, SGD 0), R sets of gradients (2 where the
                                        batch is split across two cores, N >= 8)
                        + M D [L H (G + 1 + K + 2 d + G B)   what backward needs of every layer
                                        (gates, outputs, the cell's own; d = 1 with dropout: the
                                        mask and the masked copy) and what each layer's backward
                                        makes, kept to the end of the step by the engine's
                                        deferred weight-gradient products
                               + 2 H + E + 2 V']             the gradients passed down, the
                                        input, the head's logits and their temporaries
                        + 3 L G H^2 D   with --weight-drop: the masks and both copies of Wh
    a save              P D (3 + 2 S)   the model and its optimizer, a host copy of the
                                        parameters and the .npz built in memory
    inference           M D (L H + 2 G H + 2 V')  (scoring, sampling's prime)
    beam search         B D L H (2 G + 4 + 5 c)   the step's buffers for B beams (c = 1 for an
                                        LSTM's cell state), their log-probabilities and texts

The peak of a training run is the largest of creating, a step and a save, times MARGIN (what
the allocator holds besides the live arrays), plus ENGINE (the compiled kernels and the BLAS's
buffers, loaded after the check). Measured against the peak resident memory of real runs
(benchmarks/memory.py; benchmarks/README.md, "The memory estimate"), training runs of 500 MB to
1.5 GB are estimated 8-14% above their peaks, smaller ones up to 25% above; beam search and
scoring 23-63% above, gradcheck's small models 1.5-2.1 times theirs.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace

from .nn import cells
from .nn.model import ModelConfig

KB, MB, GB, TB = 10**3, 10**6, 10**9, 10**12
# What a command's process gains after its check besides the arrays estimated: numba's compiled
# kernels, OpenBLAS's per-thread buffers and the worker thread (measured: about 80 MB between a
# check and the peak of a tiny training run; rounded up).
ENGINE = 120 * MB
# The allocator's share besides the live arrays (freed blocks it keeps, two threads' arenas):
# the formulas alone came to 1.00-1.09 of the peaks of large steps (benchmarks/README.md).
MARGIN = 1.1
SLOTS = {"adam": 2, "rmsprop": 1, "adagrad": 1, "sgd": 0}  # per-parameter arrays (nn/optim.py)
DTYPE_BYTES = {"float32": 4, "float64": 8}


class MemoryLimitError(RuntimeError):
    """Work refused before it started: its estimate passes the memory available (one line
    naming the option, the estimate and the limit)."""


@dataclass(frozen=True)
class Shape:
    """The numbers of a model an estimate needs (a ModelConfig's, without the class bounds,
    which are known only once the corpus is read: ``classes`` is their count)."""

    vocab: int
    cell: str = cells.DEFAULT_CELL
    layers: int = 2
    hidden: int = 256
    embed: int = 0
    tie: bool = False
    classes: int = 0
    dropout: float = 0.0

    @classmethod
    def of(cls, config: ModelConfig) -> "Shape":
        return cls(config.vocab_size, config.cell, config.layers, config.hidden, config.embed, config.tie,
                   config.n_classes, config.dropout)

    def params(self) -> int:
        """P: ModelConfig.n_params of this shape (which counts without looping over layers)."""
        config = ModelConfig(vocab_size=max(1, self.vocab), cell=self.cell, layers=self.layers, hidden=self.hidden,
                             embed=self.embed, tie=self.tie and self.embed == self.hidden)
        return config.n_params() + self.classes * (self.hidden + 1)

    def head_width(self) -> int:
        """V': the numbers per position of the output layer's logits."""
        if self.classes:
            return self.classes + -(-self.vocab // self.classes)
        return self.vocab


@dataclass(frozen=True)
class Need:
    """An estimate: ``bytes`` that ``who`` ("the model", "beam search") needs for ``what``
    (the parts, for the message)."""

    bytes: int
    who: str
    what: str


def _with_margin(arrays: int) -> int:
    return int(arrays * MARGIN) + ENGINE


def step_activations(shape: Shape, T: int, N: int, D: int) -> int:
    """Bytes a training step's forward and backward hold at once (module docstring)."""
    cell = cells.get(shape.cell)
    G, H = cell.gates, shape.hidden
    per_layer = H * (G + 1 + cell.kept + (2 if shape.dropout > 0 else 0) + G * cell.backward_buffers)
    return T * N * D * (shape.layers * per_layer + 2 * H + shape.embed + 2 * shape.head_width())


def inference_activations(shape: Shape, T: int, N: int, D: int) -> int:
    """Bytes a forward pass without a cache holds over a (T, N) chunk: every layer's outputs,
    the input projections of two layers (the last layer's is still held while the next one's
    is made), the logits and a temporary of them."""
    G = cells.get(shape.cell).gates
    projections = G * shape.hidden * min(shape.layers, 2)
    return T * N * D * (shape.layers * shape.hidden + projections + 2 * shape.head_width())


def stepper_buffers(shape: Shape, N: int, D: int) -> int:
    """Bytes sampling's step (engine/stepper.py's FastStepper) holds for N streams: per layer
    its [x; h] input, gate values and bias broadcast (G H each), an LSTM's c, next c and tanh c,
    and, while beam search reorders the beams, two copies of the state; the hidden product (G H)
    and the logits (V) once."""
    cell = cells.get(shape.cell)
    G, H, c = cell.gates, shape.hidden, 1 if cell.has_c else 0
    per_layer = H * (2 * G + 2 + 3 * c + 2 * (1 + c))
    return N * D * (shape.layers * per_layer + G * H + shape.vocab)


def training(shape: Shape, T: int, N: int, optimizer: str = "adam", dtype: str = "float32",
             weight_drop: float = 0.0, device: str = "cpu") -> Need:
    """What ``charnn train`` allocates: the largest of creating the model, a step and a save
    (module docstring). On a GPU the step's arrays are on the device, not counted here (the
    host still holds the initial draw and the saves)."""
    D = DTYPE_BYTES[dtype]
    P = shape.params()
    S = SLOTS[optimizer]
    create = P * (8 + D)
    step = P * D * (1 + S + (2 if N >= 8 else 1))
    if device != "gpu":
        step += step_activations(shape, T, N, D)
        if weight_drop > 0:
            step += 3 * shape.layers * cells.get(shape.cell).gates * shape.hidden ** 2 * D
    save = P * D * (3 + 2 * S)
    state = {"adam": "Adam's state", "rmsprop": "RMSprop's state", "adagrad": "Adagrad's state"}.get(optimizer)
    what = "parameters, " + (f"{state} and " if state else "") + "a step's activations"
    return Need(_with_margin(max(create, step, save)), "the model needs", what)


def gradcheck(shape: Shape, T: int, N: int, loaded: bool = False) -> Need:
    """What a gradient check of ``shape`` on a (T, N) chunk allocates (float64): the model
    (drawn, then copied; ``loaded``: copied from a model already in memory), its gradients,
    a step's activations and the random chunk's int64 ids."""
    P = shape.params()
    model = P * 8 if loaded else P * 16
    need = max(model, P * 16 + step_activations(shape, T, N, 8)) + (T + 1) * N * 8 * 2
    return Need(_with_margin(need), "the gradient check needs",
                "the float64 model, its gradients and a step's activations")


def beam(shape: Shape, beam_size: int, length: int, prime: int, no_repeat: int, D: int = 4) -> Need:
    """What beam search allocates: the prime's forward pass, the step's buffers for
    ``beam_size`` streams, the (beam, V) log-probabilities, scores and their sort in float64 and
    int64 on the host (about six such arrays at once), and the beams' token lists and n-gram
    tables (Python objects, some 400 bytes a token with the repetition guard on)."""
    B, V = beam_size, shape.vocab
    per_token = 400 if no_repeat else 16
    need = (inference_activations(shape, max(prime, 1), 1, D) + stepper_buffers(shape, B, D)
            + 48 * B * V + B * (length + prime) * per_token)
    return Need(_with_margin(need), "beam search needs", "the beams' states, log-probabilities and texts")


def inference(shape: Shape, T: int, N: int, D: int = 4, who: str = "scoring needs") -> Need:
    """What a forward pass over a (T, N) chunk allocates, with the host arrays of scoring
    (ids, targets, weights and the losses: 40 bytes a position)."""
    return Need(_with_margin(inference_activations(shape, T, N, D) + 40 * T * N), who,
                "the batch's activations and logits")


def dynamic(shape: Shape, segment: int, D: int = 4) -> Need:
    """What dynamic evaluation allocates: the adapted copy of the parameters, the statistics,
    the update's four arrays per parameter and their temporaries (9 P D), and a training
    step's activations over one segment of one stream."""
    P = shape.params()
    need = 9 * P * D + step_activations(replace(shape, dropout=0.0), segment, 1, D)
    return Need(_with_margin(need), "dynamic evaluation needs",
                "copies of the parameters for the update and a segment's activations")


# ----- what there is -----

def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _read_int(path) -> int | None:
    try:
        with open(path, "rb") as f:
            text = f.read(64).strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None  # "max": no limit


def _cgroup_room() -> int | None:
    """The memory left under this process's cgroup limit (v2, then v1), or None without one."""
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        cap = _read_int(limit)
        if cap is not None and cap < 1 << 60:  # v1 writes a huge number for none
            return max(0, cap - (_read_int(used) or 0))
    return None


def _statm(field: int) -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[field]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _address_space_room() -> int | None:
    """What an RLIMIT_AS (ulimit -v) leaves this process to map, or None without one."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    return max(0, soft - (_statm(0) or 0))


def available() -> int | None:
    """Bytes this process can still allocate without swapping or failing: the least of the
    kernel's MemAvailable, the room under a cgroup's limit and under an RLIMIT_AS; None where
    none of them can be read."""
    rooms = [r for r in (_meminfo_available(), _cgroup_room(), _address_space_room()) if r is not None]
    return min(rooms) if rooms else None


def resident() -> int:
    """This process's resident memory now, in bytes (0 where it cannot be read)."""
    return _statm(1) or 0


# ----- sizes as people write them -----

_UNITS = {"": None, "b": 1, "k": KB, "kb": KB, "m": MB, "mb": MB, "g": GB, "gb": GB, "t": TB, "tb": TB,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """Bytes from a size such as "8G", "500MB", "1.5 GiB" (K, M, G, T: powers of 1000; KiB,
    MiB, GiB, TiB: of 1024; B: bytes). A number needs its unit.

    Raises:
        ValueError: with a message saying what a size looks like.
    """
    m = _SIZE.fullmatch(str(text))
    unit = _UNITS.get(m.group(2).lower(), 0) if m else 0
    if not m or unit == 0:
        raise ValueError(f"{text!r} is not a size; write one such as 8G, 500M or 2GiB")
    if unit is None:
        raise ValueError(f"{text!r} needs a unit, e.g. {m.group(1)}G or {m.group(1)}M")
    value = float(m.group(1)) * unit
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"{text!r} is not a size of at least one byte")
    return int(value)


def size_text(n: float) -> str:
    """A byte count for people: "29 GB", "2.4 GB", "512 MB" (powers of 1000)."""
    for unit, name in ((TB, "TB"), (GB, "GB"), (MB, "MB"), (KB, "KB")):
        if n >= unit:
            v = n / unit
            return f"{v:.1f} {name}" if v < 10 else f"{v:,.0f} {name}"
    return f"{int(n)} bytes"


# ----- the check -----

def fits(need: Need, max_memory: int | None = None) -> bool:
    """Whether :func:`check` would let ``need`` pass."""
    if max_memory is None:
        room = available()
        return room is None or need.bytes <= room
    return resident() + need.bytes <= max_memory


def check(need: Need, subject: str, max_memory: int | None = None) -> None:
    """Refuse ``need`` when it passes the memory available, or with ``max_memory`` (bytes, the
    command's --max-memory) when this process's resident memory plus ``need`` passes that.

    ``subject`` is what the message starts with: the option to blame and its value
    ("--hidden 30000"; see :func:`culprit`).

    Raises:
        MemoryLimitError: "--hidden 30000: the model needs about 29 GB (parameters, Adam's
            state and a step's activations), more than the 21 GB available; ..."
    """
    if max_memory is None:
        room = available()
        if room is None or need.bytes <= room:
            return
        raise MemoryLimitError(f"{subject}: {need.who} about {size_text(need.bytes)} ({need.what}), more than the "
                               f"{size_text(room)} available (--max-memory SIZE sets another limit)")
    total = resident() + need.bytes
    if total <= max_memory:
        return
    raise MemoryLimitError(f"{subject}: {need.who} about {size_text(total)} ({need.what}), more than "
                           f"--max-memory {size_text(max_memory)}")


def culprit(estimate, options: dict, fallback: str) -> str:
    """The option to blame for an estimate: of ``options`` (name -> (value, default)), the one
    whose default would lower ``estimate(**{key: default})`` most, as "--name value"; or
    ``fallback`` when none is away from its default or none would lower it.

    Args:
        estimate: key -> value keyword arguments -> bytes.
        options: "--option-name" -> (key, value, default).
    """
    base = estimate()
    best, lowest = None, base
    for name, (key, value, default) in options.items():
        if value == default or value is None:
            continue
        lowered = estimate(**{key: default})
        if lowered < lowest:
            best, lowest = f"{name} {value}", lowered
    return best or fallback

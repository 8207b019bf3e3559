"""The planner: the engine times its candidate paths for a piece of work and keeps the fastest.

A *path* (:class:`Path`) is how the engine runs a training step or a scoring pass: the split of
the work over threads (parallel.py: "one" thread, the "batch" split, the "rows" split), the
BLAS's threads for the one-thread path's chunk-wide products, and whether the LSTM's time
loops use the packed products (packed.py). The rules (parallel.rule_path) pick one from the
shape and the settings; they were tuned on Intel AVX-512 machines and are wrong on others (on
an AMD Zen 4, config (a)'s training step ran faster on one thread than with the batch split).
So, as FFTW plans a transform by timing its algorithms and keeps the result, and cuDNN's
benchmark mode times each convolution algorithm for a shape once, the planner times the
candidates (parallel.candidates) on the work's own inputs the first time it meets a piece of
work, and keeps the fastest.

Measuring (:meth:`Planner.measure`), within ``budget`` seconds of an injected clock:

1. every candidate once on the work's first time step and once on its first PROBE_T, untimed:
   whatever compiles or allocates on first use (numba's cache, the packed products of a new
   shape, the buffers kept for a shape) does so here (the rules' path before
   the clock starts: the work would pay its first use without a planner too);
2. every candidate timed on its first step and on its first PROBE_T, which estimates what the
   whole work costs on it (its fixed costs and its cost per step); those slower than
   FAR_SLOWER x the best drop out;
3. rounds of timed runs of the whole work, every candidate left in each round (the machine's
   swings hit all alike), where MIN_RUNS rounds fit the budget left; from its MIN_RUNS-th
   run on, a candidate slower than SLOWER x the best drops out. It ends when those left have
   MAX_RUNS runs, or when no run left would end before the deadline.

The work is timed whole, never on its first few steps alone: on this machine a training step
of config (a) on one thread took 2.8 ms on 16 of its 50 steps, less than the batch split's
3.9, but 15 ms on all 50, twice the batch split's 7 (a chunk's activations outgrow one core's
cache as T grows; two cores have two caches).

Candidates are compared by their fastest run, not their median: other work on the machine
only ever adds time, and more to a path on two threads than to one on one, so a median
follows the load of the moment, which a kept plan outlives (on this project's shared 2-core
machine a plan measured by medians under load chose one thread for config (a), whose steps
then took 16% longer than the rules' batch split once the load had moved). The fastest run is
what a path costs when it has the cores it asks for. The fastest wins if it and the rules'
path both ran MIN_RUNS times and it beats the rules' by MARGIN, in its fastest run and in its
median both (a path that is faster only at its best, in a burst of quiet, does not replace the
rules'); otherwise the rules' path keeps the work (a choice between near-equals, or work too
large to time every candidate MIN_RUNS times within the budget, is left to the rules, not to
the noise). No timed run of the whole work starts that would end past the deadline (by its
estimate); the first step's and the estimates' runs may overrun it by one each. The caller
then runs the whole work with the winner, so results depend on the plan, never on which run
measured it.

Other processes on the machine while it measures: the fastest run and the median guard against
a burst of load, not against load that lasts the whole measuring (another training run on the
same cores), which slows a path on two threads more than one on one, for all of its runs (ab.py's
old-against-new of 2026-12-05 ran config (a)'s training at 0.63 of the rules' speed on plans
measured while the machine's other sessions ran). So the planner also reads the CPU time that
went to other work on this process's CPUs while it measured (:func:`cpu_reading`: /proc/stat's
busy time on those CPUs, steal included, less this process's own); a plan measured while other
work took more than LOADED of them is kept but provisional, like one cut short by compiling:
the next TRIES - 1 processes that meet the work measure it again, and the first quiet
measurement settles it.

A plan is kept in memory and on disk (:class:`PlanFile`: JSON, written atomically; a file that
cannot be read is ignored and replaced), in one file per machine key: the CPU model and flags,
NumPy, its BLAS (threadpoolctl's view: library, version, kernel), numba, and a digest of the
engine's sources; any change there starts a new file. Within it, a plan is keyed by the work
(:func:`work_key`: kind, model shape, batch, sequence length rounded up to a power of two,
settings). Work below MIN_FLOPS is not worth measuring: the rules run it.

Nothing here knows the model's maths: the caller (cpu.CpuOps) gives the candidates and a
function that runs the work on a path.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path as FilePath

import numpy

from ..nn import cells

FORMAT = 1
BUDGET = 0.75  # seconds of measuring for a new piece of work (plus at most one run past it)
PROBE_T = 4  # time steps of the second run of the estimate (the first: one)
MIN_RUNS = 3  # timed runs a path needs to replace the rules' (and before it can drop out)
MAX_RUNS = 9  # timed runs of each candidate at most
SLOWER = 1.3  # a candidate this much slower than the best (fastest runs) stops being timed
FAR_SLOWER = 3.0  # the same on the estimates
TRIES = 3  # processes that measure a piece of work whose candidates did not all run within the budget
MARGIN = 0.05  # another path replaces the rules' only when faster by this fraction
MIN_FLOPS = 2e7  # a piece of work of fewer GEMM FLOPs runs the rules' path unmeasured
LOADED = 0.1  # other work's share of this process's CPUs while measuring, above which a plan is provisional
SPLITS = ("one", "batch", "rows")


@dataclass(frozen=True)
class Path:
    """One way to run a piece of work: ``split`` ("one", "batch" or "rows"), ``blas`` (the
    BLAS's threads for the one-thread path's chunk-wide products; None leaves them as they
    are; the splits run it on one thread a half), ``packed`` (the LSTM loops' packed
    products)."""

    split: str
    blas: int | None
    packed: bool

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"unknown split {self.split!r}")

    @property
    def wakes_blas(self) -> bool:
        """Whether the path's products run on several of OpenBLAS's threads (which go on
        spinning after them)."""
        return self.split == "one" and (self.blas is None or self.blas > 1)

    @property
    def label(self) -> str:
        split = {"one": "one thread", "batch": "batch split", "rows": "row split"}[self.split]
        if self.split == "one" and self.blas:
            split += f", BLAS {self.blas}"
        return f"{split}, {'packed' if self.packed else 'sgemm'}"

    def to_json(self) -> dict:
        return {"split": self.split, "blas": self.blas, "packed": self.packed}

    @classmethod
    def from_json(cls, d) -> "Path":
        """The path of a cache entry, or ValueError where it is not one."""
        if not isinstance(d, dict) or set(d) != {"split", "blas", "packed"}:
            raise ValueError("not a path")
        blas, pk = d["blas"], d["packed"]
        if not (blas is None or (type(blas) is int and blas >= 1)) or type(pk) is not bool:
            raise ValueError("not a path")
        return cls(d["split"], blas, pk)


def bucket(T: int) -> int:
    """T rounded up to a power of two: the sequence lengths that share a plan."""
    return 1 << max(0, int(T) - 1).bit_length()


def work_key(kind: str, config, N: int, T: int, settings, xp=None, dtype="float32") -> str:
    """The key of a piece of work: what it is, the model's shape, the batch, the sequence
    length's bucket, the arrays, the settings that bound the candidates."""
    c = config
    knobs = "+".join(sorted(settings.plan)) or "none"
    arrays = f"{getattr(xp, '__name__', 'numpy')} {numpy.dtype(dtype).name}"
    activation = "-" + c.activation if cells.get(c.cell).takes_activation else ""
    return (f"{kind} {c.cell}{activation} {c.layers}x{c.hidden} E{c.embed} "
            f"V{c.vocab_size} C{c.n_classes}{' tied' if c.tie else ''} N{N} T{bucket(T)} {arrays} | threads "
            f"{settings.threads}, kernels {int(settings.kernels)}, loops {int(settings.rowsplit)}, packed "
            f"{int(settings.packed)}, plans {knobs}")


def machine_key() -> dict:
    """What a plan is valid for: the CPU (model, a digest of its flags), NumPy and its BLAS,
    numba, the engine's sources."""
    from . import source_digest

    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name" and cpu == (platform.processor() or platform.machine()):
                    cpu = value.strip()
                elif name in ("flags", "Features") and not flags:
                    flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    blas = "unknown"
    try:
        from threadpoolctl import threadpool_info

        blas = "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}"
                         for i in threadpool_info() if i.get("user_api") == "blas") or "none"
    except Exception:  # noqa: BLE001 - threadpoolctl missing or unable to look: keyed as unknown
        pass
    try:
        import numba

        numba_version = numba.__version__
    except ImportError:
        numba_version = "none"
    return {"cpu": cpu, "flags": hashlib.sha256(flags.encode()).hexdigest()[:16], "numpy": numpy.__version__,
            "blas": blas, "numba": numba_version, "engine": source_digest()}


def cpu_reading() -> tuple[float, float, int] | None:
    """(seconds of CPU time spent on this process's CPUs by anyone, by this process, the number
    of those CPUs) since boot, from /proc/stat and os.times (busy: user, nice, system, irq,
    softirq and steal: a virtual machine's host taking the core counts as other work); None
    where /proc/stat cannot be read (not Linux): the load is then unknown and taken as none."""
    try:
        cpus = os.sched_getaffinity(0)
        hz = os.sysconf("SC_CLK_TCK")
        busy = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
                    busy += user + nice + system + irq + softirq + steal
    except (AttributeError, OSError, ValueError):
        return None
    own = os.times()
    return busy / hz, own.user + own.system, len(cpus)


def others_share(before, after, seconds: float) -> float | None:
    """The share of this process's CPUs that other work took between two :func:`cpu_reading`
    s ``seconds`` apart (0 to 1; None where either reading is missing)."""
    if before is None or after is None or seconds <= 0:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return min(1.0, max(0.0, others / (seconds * after[2])))


class PlanFile:
    """One machine key's plans on disk: ``{"format", "machine", "plans": {work key: entry}}``.
    A missing, unreadable or foreign file reads as no plans."""

    def __init__(self, path: FilePath, machine: dict):
        self.path, self.machine = FilePath(path), machine

    def load(self) -> dict:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return {}
        if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("machine") == self.machine
                and isinstance(data.get("plans"), dict)):
            return {}
        plans = {}
        for key, entry in data["plans"].items():
            try:
                Path.from_json(entry["path"])
            except (TypeError, KeyError, ValueError):
                continue
            plans[key] = entry
        return plans

    def save(self, key: str, entry: dict):
        """Add one plan to the file (those another process wrote meanwhile are kept). Best
        effort: a folder that cannot be written leaves the plan in memory only."""
        from ..io.fileio import atomic_write_bytes

        plans = self.load()
        plans[key] = entry
        data = {"format": FORMAT, "machine": self.machine, "plans": plans}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
        except OSError:
            pass


class Planner:
    """Chooses a path for each piece of work: from memory, from the plan file, or by measuring.

    Args:
        folder: where the plan files live (default: charnn's cache folder's ``plans``).
        clock: seconds, as time.perf_counter (tests pass a fake one).
        budget: seconds of measuring per new piece of work.
        machine: the machine key (default: :func:`machine_key`, looked up on first use).
        min_flops: smaller work runs the rules' path unmeasured (the caller asks).
        load: a :func:`cpu_reading` (tests pass a fake one; seconds on ``clock``'s scale).
    """

    def __init__(self, folder=None, clock=time.perf_counter, budget: float = BUDGET, machine: dict | None = None,
                 min_flops: float = MIN_FLOPS, load=cpu_reading):
        self.folder = None if folder is None else FilePath(folder)
        self.clock, self.budget, self.min_flops, self.load = clock, budget, min_flops, load
        self._machine = machine
        self._plans = None
        self._file = None
        self._lock = threading.RLock()
        self.measured = 0  # pieces of work measured by this planner
        self.decided = {}  # work key -> the path this process runs it on (None: the rules'), for the caller
        self._measured_here = set()

    def machine(self) -> dict:
        if self._machine is None:
            self._machine = machine_key()
        return self._machine

    def file(self) -> PlanFile:
        if self._file is None:
            if self.folder is None:
                from . import cache_base

                self.folder = cache_base() / "plans"
            digest = hashlib.sha256(json.dumps(self.machine(), sort_keys=True).encode()).hexdigest()[:16]
            self._file = PlanFile(self.folder / f"plans-{digest}.json", self.machine())
        return self._file

    def entry(self, key: str) -> dict | None:
        """The plan kept for ``key`` (its path, the timings that chose it), or None."""
        with self._lock:
            if self._plans is None:
                self._plans = self.file().load()
            return self._plans.get(key)

    def forget(self, key: str):
        """Drop the plan kept for ``key`` in memory (the next choice measures and replaces it
        on disk)."""
        with self._lock:
            self.entry(key)
            self._plans.pop(key, None)
            self.decided.pop(key, None)
            self._measured_here.discard(key)

    def choose(self, key: str, candidates: list, run, T: int) -> Path:
        """The path for the work ``key``: the kept one if it is still a candidate, else the
        fastest of ``candidates`` (the rules' first), measured by calling run(path, t) on the
        first t time steps of the work (1 <= t <= T), and kept. A provisional plan (its
        measuring ran out of budget before every candidate had run once, compiling on a fresh
        install; or other work took more than LOADED of the CPUs meanwhile) is measured again by
        the next TRIES - 1 processes that meet the work, then kept as it is."""
        if len(candidates) == 1:
            return candidates[0]
        with self._lock:
            kept = self.entry(key)
            tries = 0
            if kept is not None:
                path = Path.from_json(kept["path"])
                settled = kept.get("warmed", True) and not kept.get("loaded", False)
                tries = 0 if settled else int(kept.get("tries", 1))
                if path in candidates and (tries == 0 or tries >= TRIES or key in self._measured_here):
                    return path
            before, t0 = self.load(), self.clock()
            m = self.measure(candidates, run, T)
            share = others_share(before, self.load(), self.clock() - t0)
            loaded = share is not None and share > LOADED
            entry = {"path": m.best.to_json(), "rule": candidates[0].label, "steps": m.steps, "of": T,
                     "seconds": {p.label: t for p, t in m.timings.items()},
                     "runs": {p.label: n for p, n in (m.runs or {}).items()},
                     "estimates": {p.label: t for p, t in m.estimates.items()}, "estimate_steps": m.estimate_steps,
                     "untimed": [p.label for p in candidates if p not in m.estimates], "warmed": m.warmed,
                     "others": None if share is None else round(share, 3), "loaded": loaded,
                     "tries": 0 if m.warmed and not loaded else tries + 1,
                     "measuring_seconds": m.spent, "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            self._plans[key] = entry
            self._measured_here.add(key)
            self.file().save(key, entry)
            self.measured += 1
            return m.best

    def measure(self, candidates: list, run, T: int) -> "Measured":
        """Time ``candidates`` by run(path, t): the phases of the module docstring, for the
        paths that keep OpenBLAS on one thread first and then for those that wake its threads
        (each group its share of the budget): once woken for a product, OpenBLAS's threads spin
        on the cores for about a tenth of a second, and a split run beside them took twice its
        time (config (a) on the Zen 4, 2026-12-05: the batch split 10.5 ms a step for the first
        four steps after the one thread with two BLAS threads, 5.5 ms in a run of its own)."""
        clock = self.clock
        rule = candidates[0]
        probe = min(T, PROBE_T)

        def warm_up(path):  # both lengths the estimate times: buffers are kept per shape
            run(path, 1)
            if probe > 1:
                run(path, probe)
        warm_up(rule)  # before the clock starts (see the module docstring)
        start = clock()
        groups = [g for g in ([p for p in candidates if not p.wakes_blas],
                              [p for p in candidates if p.wakes_blas]) if g]
        estimates, times, warmed = {}, {}, True
        for i, group in enumerate(groups):
            left = start + self.budget - clock()
            deadline = clock() + max(0.0, left) * len(group) / sum(len(g) for g in groups[i:])
            warm = []
            for path in group:
                if path != rule:
                    if clock() >= deadline:
                        break
                    warm_up(path)
                warm.append(path)
            warmed = warmed and len(warm) == len(group)
            # What the whole work costs on each, from timed runs on 1 and on PROBE_T time steps
            # (a straight line through the two: a path's fixed costs and its cost per step).
            first = {}
            for path in warm:
                if first and clock() >= deadline:
                    break
                t0 = clock()
                run(path, 1)
                t1 = clock()
                if probe > 1:
                    run(path, probe)
                t2 = clock()
                first[path] = estimate(t1 - t0, t2 - t1, probe, T)
            estimates.update(first)
            fastest = min(estimates.values())
            alive = [p for p in first if p == rule or first[p] <= FAR_SLOWER * fastest]
            times.update({p: [] for p in alive})
            if MIN_RUNS * sum(first[p] for p in alive) > deadline - clock():
                continue
            while not all(len(times[p]) >= MAX_RUNS for p in alive):
                ran = False
                for path in alive:
                    if clock() + first[path] > deadline:  # no run starts that would end past it
                        continue
                    t0 = clock()
                    run(path, T)
                    times[path].append(clock() - t0)
                    first[path] = min(times[path])
                    ran = True
                if not ran:
                    break
                best = {p: min(v) for p, v in times.items() if v}
                top = min(best.values())
                alive = [p for p in alive if p in best and (len(times[p]) < MIN_RUNS or best[p] <= SLOWER * top)]
        timings = {p: min(v) for p, v in times.items() if v}
        trusted = {p: t for p, t in timings.items() if len(times[p]) >= MIN_RUNS}
        best = rule
        if rule in trusted:
            fastest = min(trusted, key=trusted.get)
            typical = {p: statistics.median(times[p]) for p in (rule, fastest)}
            if (trusted[fastest] <= (1 - MARGIN) * trusted[rule]
                    and typical[fastest] <= (1 - MARGIN) * typical[rule]):
                best = fastest
        return Measured(best, timings, T, estimates, probe, clock() - start, warmed,
                        {p: len(v) for p, v in times.items() if v})


def estimate(one: float, some: float, probe: int, T: int) -> float:
    """What T time steps cost, from one run on 1 step (``one``) and one on ``probe`` steps
    (``some``): a straight line through the two (fixed costs and a cost per step). Where the
    probe ran no slower than the single step (a first call woken late, another process in the
    way), the line says nothing (its slope would be zero or negative, and an estimate below
    zero once dropped every candidate but the rules' as "far slower" than it): the probe's
    cost per step is taken for every step instead, which bounds the work from above."""
    if probe == 1:
        return one
    if probe == T:
        return some
    if some <= one:
        return some * T / probe
    return one + (some - one) * (T - 1) / (probe - 1)


@dataclass
class Measured:
    """What :meth:`Planner.measure` found: the winner, each candidate's fastest run of the
    whole work (``steps`` time steps), each one's estimate of it from runs on 1 and
    ``estimate_steps`` steps (those missing ran out of budget), the seconds it all took,
    whether every candidate ran once, and the timed runs each got."""

    best: Path
    timings: dict
    steps: int
    estimates: dict
    estimate_steps: int
    spent: float
    warmed: bool = True  # every candidate ran once (what compiles on first use has)
    runs: dict = None  # candidate -> timed runs on ``steps``


_shared = None
_shared_lock = threading.Lock()


def shared_planner() -> Planner:
    """The process's planner (one for every model: a plan measured once serves all)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Planner()
        return _shared


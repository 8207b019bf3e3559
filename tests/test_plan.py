"""The planner (charnn/engine/plan.py): it times the engine's candidate paths and keeps the
fastest. Tested with a fake clock (each run advances it by a cost per path and time step),
never with real timings: it picks the fastest, keeps the rules' path against a near tie,
caches on disk and reuses, measures again when the machine's key or the work changes,
survives a damaged plan file, respects the settings that force a knob, and bounds its own
time. Every candidate path also runs against the reference operations, as tests/test_engine.py
does for the rules' paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path as FilePath

import numpy
import pytest

from charnn.backend import get_backend
from charnn.engine import kernels, loops, packed, parallel, plan
from charnn.engine.cpu import CpuOps, engine_ops, plan_report
from charnn.engine.plan import Path, Planner
from charnn.engine.settings import Settings, SettingsError, default_settings
from charnn.nn import cells
from charnn.nn.model import LanguageModel, ModelConfig, init_params
from charnn.nn.ops import Ops

from cli_support import check_error, check_ok, invoke

MACHINE = {"cpu": "test CPU", "flags": "0", "numpy": "1", "blas": "b", "numba": "n", "engine": "e"}
RULE, FAST, SLOW = Path("batch", 1, True), Path("one", 1, True), Path("rows", 1, False)
PLANNING = Settings(threads=2, plan=frozenset({"split", "packed"}))


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def runner(clock, cost, calls=None, first=0.0):
    """run(path, t) that advances ``clock`` by cost[path] per time step (and ``first`` more the
    first time a path runs: its compiling); records (path, t) in ``calls``."""
    seen = set()

    def run(path, t):
        clock.now += cost[path] * t + (first if path not in seen else 0.0)
        seen.add(path)
        if calls is not None:
            calls.append((path, t))
    return run


def never(path, t):
    raise AssertionError("measured again")


def planner(tmp_path, clock, **kw):
    """A planner on ``clock`` whose CPU readings (``load``) default to unknown: no load."""
    return Planner(tmp_path / "plans", clock=clock, budget=1.0, machine=kw.pop("machine", MACHINE),
                   load=kw.pop("load", lambda: None), **kw)


class FakeLoad:
    """cpu_reading on a FakeClock: this process keeps one of two CPUs busy, other work takes
    ``others`` of both (a share)."""

    def __init__(self, clock, others=0.0):
        self.clock, self.others = clock, others

    def __call__(self):
        return (1 + 2 * self.others) * self.clock.now, self.clock.now, 2


def test_it_picks_the_fastest_and_keeps_it_on_disk(tmp_path):
    clock = FakeClock()
    p = planner(tmp_path, clock)
    cost = {RULE: 1e-3, FAST: 5e-4, SLOW: 2e-3}
    assert p.choose("k", [RULE, FAST, SLOW], runner(clock, cost), 50) == FAST
    data = json.loads(p.file().path.read_text())
    assert data["machine"] == MACHINE and data["format"] == plan.FORMAT
    entry = data["plans"]["k"]
    assert Path.from_json(entry["path"]) == FAST and entry["rule"] == RULE.label and entry["of"] == 50
    assert entry["steps"] == 50  # the whole work
    assert entry["seconds"][FAST.label] == pytest.approx(5e-4 * 50)
    assert entry["seconds"][RULE.label] == pytest.approx(1e-3 * 50)
    assert entry["runs"][FAST.label] == plan.MAX_RUNS
    assert entry["runs"][RULE.label] == plan.MIN_RUNS  # then dropped: 2x the fastest
    assert SLOW.label not in entry["runs"] and SLOW.label in entry["estimates"]  # 4x: dropped on its estimate
    assert entry["untimed"] == []


def test_a_path_replaces_the_rules_only_when_faster_at_best_and_typically(tmp_path):
    """Other work only adds time: the rules' path slowed in most of its runs still loses to a
    path 10% faster in all of them; a path faster only in its rare unhindered runs (its
    median three times its best) does not replace the rules'."""
    clock = FakeClock()
    mostly = [1, 1, 3] + [3, 1, 3, 3, 3] * 10  # its warm-up (two runs), its estimate, then one run in five unhindered

    def run(path, t):
        clock.now += {RULE: 1e-3, FAST: 0.9e-3}[path] * t * next(slowed[path])
    slowed = {RULE: iter(mostly), FAST: iter([1] * 60)}
    assert planner(tmp_path, clock).choose("k", [RULE, FAST], run, 50) == FAST
    slowed = {RULE: iter([1] * 60), FAST: iter(mostly)}
    p = planner(tmp_path / "b", clock)
    assert p.choose("k", [RULE, FAST], run, 50) == RULE
    assert p.entry("k")["seconds"][FAST.label] < p.entry("k")["seconds"][RULE.label]  # its best was faster


def test_too_few_runs_leave_the_rules_path(tmp_path):
    """Work so large that the candidates cannot each run MIN_RUNS times within the budget
    keeps the rules' path (and the plan is kept: everything ran once)."""
    clock = FakeClock()
    p = planner(tmp_path, clock)
    assert p.choose("k", [RULE, FAST, SLOW], runner(clock, {RULE: 0.1, FAST: 0.05, SLOW: 0.2}), 100) == RULE
    assert p.entry("k")["warmed"] and p.file().path.exists()


def test_the_rules_path_stays_against_a_near_tie(tmp_path):
    clock = FakeClock()
    cost = {RULE: 1e-3, FAST: 0.98e-3, SLOW: 2e-3}
    assert planner(tmp_path, clock).choose("k", [RULE, FAST, SLOW], runner(clock, cost), 50) == RULE
    cost[FAST] = 0.9e-3
    assert planner(tmp_path / "b", clock).choose("k", [RULE, FAST, SLOW], runner(clock, cost), 50) == FAST


def test_a_probe_faster_than_the_single_step_drops_no_candidate(tmp_path):
    """A candidate whose timed single step was slowed (woken late, another process in the way)
    so that its PROBE_T run took less: a straight line through the two fell below zero, and
    "far slower" than that dropped every other candidate, the fastest among them (config (a)'s
    training on the Zen 4, 2026-12-05). The estimate is bounded below by the probe's rate."""
    assert plan.estimate(0.010, 0.004, 4, 50) == pytest.approx(0.004 * 50 / 4)
    assert plan.estimate(0.001, 0.004, 4, 50) == pytest.approx(0.001 + 0.003 * 49 / 3)
    clock = FakeClock()
    cost = {RULE: 1e-3, FAST: 5e-4, SLOW: 0.9e-3}
    calls = []
    base = runner(clock, cost, calls)

    def run(path, t):
        base(path, t)
        if path == SLOW and t == 1 and calls.count((SLOW, 1)) == 2:
            clock.now += 0.05  # its timed single step (the first ran untimed), slowed
    assert planner(tmp_path, clock).choose("k", [RULE, SLOW, FAST], run, 50) == FAST
    assert all(e > 0 for e in json.loads((tmp_path / "plans").glob("*.json").__next__().read_text())
               ["plans"]["k"]["estimates"].values())


def test_a_kept_plan_is_reused_in_the_process_and_the_next(tmp_path):
    clock = FakeClock()
    p = planner(tmp_path, clock)
    cost = {RULE: 1e-3, FAST: 5e-4}
    assert p.choose("k", [RULE, FAST], runner(clock, cost), 50) == FAST
    assert p.choose("k", [RULE, FAST], never, 50) == FAST and p.measured == 1
    again = planner(tmp_path, clock)  # the next process: the plan file
    assert again.choose("k", [RULE, FAST], never, 50) == FAST and again.measured == 0
    # A kept path that is no longer a candidate (a knob forced since) is measured over.
    calls = []
    assert again.choose("k", [RULE, SLOW], runner(clock, {RULE: 1e-3, SLOW: 2e-3}, calls), 50) == RULE
    assert calls


def test_a_changed_machine_key_or_work_measures_again(tmp_path, monkeypatch):
    clock = FakeClock()
    cost = {RULE: 1e-3, FAST: 5e-4}
    p = planner(tmp_path, clock)
    p.choose("k", [RULE, FAST], runner(clock, cost), 50)
    for change in ("cpu", "flags", "numpy", "blas", "numba", "engine"):
        calls = []
        other = planner(tmp_path, clock, machine={**MACHINE, change: "other"})
        assert other.file().path != p.file().path
        other.choose("k", [RULE, FAST], runner(clock, cost, calls), 50)
        assert calls, change
    # The real key names the engine's sources: an edit to any of them retires every plan.
    import charnn.engine as engine

    before = plan.machine_key()
    assert set(before) == set(MACHINE) and before["numpy"] == numpy.__version__
    monkeypatch.setattr(engine, "source_digest", lambda: "edited")
    assert plan.machine_key()["engine"] == "edited" and plan.machine_key() != before
    # The work's key: the shape, the batch, the sequence length's power-of-two bucket, the
    # arrays and the settings.
    cfg = ModelConfig(vocab_size=65, cell="lstm", layers=1, hidden=128)
    key = plan.work_key("train", cfg, 32, 50, PLANNING)
    assert key == plan.work_key("train", cfg, 32, 40, PLANNING)  # 40 and 50: both up to 64
    for other in (plan.work_key("score", cfg, 32, 50, PLANNING), plan.work_key("train", cfg, 16, 50, PLANNING),
                  plan.work_key("train", cfg, 32, 70, PLANNING),
                  plan.work_key("train", ModelConfig(vocab_size=65, cell="gru", layers=1, hidden=128), 32, 50, PLANNING),
                  plan.work_key("train", cfg, 32, 50, Settings(threads=1, plan=frozenset({"packed"}))),
                  plan.work_key("train", cfg, 32, 50, PLANNING, dtype="float64")):
        assert other != key


@pytest.mark.parametrize("damage", [b"\x00\xff not json", b"[1, 2]", b'{"format": 1, "machine": {}, "plans": {}}',
                                    b'{"format": 99, "plans": {"k": {}}}'])
def test_a_damaged_plan_file_is_measured_over(tmp_path, damage):
    clock = FakeClock()
    p = planner(tmp_path, clock)
    p.file().path.parent.mkdir(parents=True)
    p.file().path.write_bytes(damage)
    calls = []
    assert p.choose("k", [RULE, FAST], runner(clock, {RULE: 1e-3, FAST: 5e-4}, calls), 50) == FAST
    assert calls
    assert planner(tmp_path, clock).choose("k", [RULE, FAST], never, 50) == FAST  # written whole again


def test_a_bad_entry_is_skipped_and_the_others_kept(tmp_path):
    clock = FakeClock()
    p = planner(tmp_path, clock)
    p.choose("good", [RULE, FAST], runner(clock, {RULE: 1e-3, FAST: 5e-4}), 50)
    data = json.loads(p.file().path.read_text())
    data["plans"]["bad"] = {"path": {"split": "diagonal", "blas": 1, "packed": True}}
    data["plans"]["worse"] = {"path": {"split": "one", "blas": "two", "packed": True}}
    data["plans"]["worst"] = "x"
    p.file().path.write_text(json.dumps(data))
    again = planner(tmp_path, clock)
    assert again.choose("good", [RULE, FAST], never, 50) == FAST
    calls = []
    again.choose("bad", [RULE, FAST], runner(clock, {RULE: 1e-3, FAST: 5e-4}, calls), 50)
    assert calls


def test_a_folder_that_cannot_be_written_keeps_the_plan_in_memory(tmp_path):
    clock = FakeClock()
    (tmp_path / "plans").write_text("a file where the folder would be")
    p = planner(tmp_path, clock)
    assert p.choose("k", [RULE, FAST], runner(clock, {RULE: 1e-3, FAST: 5e-4}), 50) == FAST
    assert p.choose("k", [RULE, FAST], never, 50) == FAST


def test_measuring_time_is_bounded(tmp_path):
    """Large work (a step of 100 time steps costing 0.4 s on each of 8 paths): estimated on
    its first 1 and 4 steps, never run whole, and the rules' path keeps it; the clock passes
    the deadline by one estimate's runs at most. Smaller work is timed whole in rounds, and no
    round's run starts that would end past the deadline."""
    clock = FakeClock()
    paths = [Path(s, b, pk) for pk in (True, False) for s, b in (("batch", 1), ("one", 1), ("one", 2), ("rows", 1))]
    cost = {p: 4e-3 * (1 - 0.05 * i) for i, p in enumerate(paths)}  # the last 35% faster than the rules'
    calls = []
    p = planner(tmp_path, clock)
    best = p.choose("big", paths, runner(clock, cost, calls), 100)
    rule_first = cost[paths[0]]  # its first step, before the clock starts
    assert clock.now - rule_first <= p.budget + max(cost.values()) * (1 + plan.PROBE_T)
    assert best == paths[0] and not p.entry("big")["runs"]
    assert max(t for _, t in calls) == plan.PROBE_T
    medium = {q: c / 10 for q, c in cost.items()}  # whole runs of 40 ms or less: rounds fit
    clock.now, calls = 0.0, []
    p = planner(tmp_path / "m", clock)
    best = p.choose("medium", paths, runner(clock, medium, calls), 100)
    assert best == paths[-1] and clock.now - medium[paths[0]] <= p.budget
    assert p.entry("medium")["runs"][paths[-1].label] >= plan.MIN_RUNS


def test_a_plan_cut_short_is_measured_again_a_few_times(tmp_path):
    """Each path's first run costs 0.6 s (compiling): the budget ends before every candidate
    has run, so the next processes measure again, TRIES in all, then keep what they found."""
    clock = FakeClock()
    paths = [RULE, FAST, SLOW, Path("one", 2, True)]
    p = planner(tmp_path, clock)
    best = p.choose("k", paths, runner(clock, {q: 1e-3 for q in paths}, first=0.6), 50)
    assert best in paths and p.entry("k")["untimed"] and not p.entry("k")["warmed"]
    assert p.choose("k", paths, never, 50) == best  # this process: kept in memory
    for attempt in range(2, plan.TRIES + 1):
        calls = []
        again = planner(tmp_path, clock)
        again.choose("k", paths, runner(clock, {q: 1e-3 for q in paths}, calls, first=0.6), 50)
        assert calls and again.entry("k")["tries"] == attempt
    last = planner(tmp_path, clock)
    assert last.choose("k", paths, never, 50) == Path.from_json(last.entry("k")["path"])


def test_a_plan_measured_under_load_is_measured_again_until_a_quiet_one_settles_it(tmp_path):
    """Other work that takes the cores for the whole measuring slows a path on two threads
    more than one on one, in every run: the fastest run does not see past it. Such a plan is
    used by the process that measured it but is provisional: the next process measures again;
    a quiet measurement settles it, and TRIES loaded ones are kept as they are."""
    clock = FakeClock()
    load = FakeLoad(clock, others=0.5)
    quiet = {RULE: 1e-3, FAST: 0.8e-3}
    crowded = {RULE: 2e-3, FAST: 1e-3}  # the two-thread rules' path hit harder
    p = planner(tmp_path, clock, load=load)
    assert p.choose("k", [RULE, FAST], runner(clock, crowded), 50) == FAST
    e = p.entry("k")
    assert e["loaded"] and e["others"] == pytest.approx(0.5) and e["tries"] == 1 and e["warmed"]
    assert p.choose("k", [RULE, FAST], never, 50) == FAST  # this process: kept in memory
    load.others = 0.02  # quiet (the machine's own chores are not load)
    quiet[FAST] = 1.2e-3  # the rules' path is the faster once the cores are free
    calls = []
    again = planner(tmp_path, clock, load=load)
    assert again.choose("k", [RULE, FAST], runner(clock, quiet, calls), 50) == RULE and calls
    e = again.entry("k")
    assert not e["loaded"] and e["tries"] == 0 and e["others"] == pytest.approx(0.02)
    assert planner(tmp_path, clock, load=load).choose("k", [RULE, FAST], never, 50) == RULE  # settled

    load.others = 0.9  # always loaded: measured by TRIES processes, then kept
    for attempt in range(1, plan.TRIES + 1):
        calls = []
        assert planner(tmp_path / "busy", clock, load=load).choose("k", [RULE, FAST], runner(clock, crowded, calls),
                                                                   50) == FAST
        assert calls and json.loads(next((tmp_path / "busy" / "plans").glob("*.json")).read_text())[
            "plans"]["k"]["tries"] == attempt
    assert planner(tmp_path / "busy", clock, load=load).choose("k", [RULE, FAST], never, 50) == FAST


def test_info_says_a_plan_is_provisional(tmp_path):
    """`charnn info --plan`'s text names the load a provisional plan was measured under."""
    from charnn.cli.info import plan_text

    clock = FakeClock()
    p = planner(tmp_path, clock, load=FakeLoad(clock, others=0.4))
    p.choose("k", [RULE, FAST], runner(clock, {RULE: 2e-3, FAST: 1e-3}), 50)
    cfg = ModelConfig(vocab_size=5, hidden=8, layers=1, cell="lstm")
    kind = {"path": FAST.label, "why": "measured", "rule": RULE.label, "candidates": [RULE.label, FAST.label],
            "plan": p.entry("k")}
    report = {"path": "m", "batch": 8, "seq_len": 50, "kinds": {"train": kind},
              "settings": {"threads": 2, "kernels": True, "loops": True, "packed": True, "plans": ["split"]}}
    text = plan_text(report, cfg)
    assert f"other work took 40% of the CPUs while it measured: provisional, measured again by the next processes " \
           f"(1 of {plan.TRIES} tries so far)" in text
    kind["plan"] = {**kind["plan"], "loaded": False, "others": 0.01}
    assert "provisional" not in plan_text(report, cfg)


def test_other_works_share_of_the_cpus():
    """others_share: busy time on this process's CPUs less its own, over the wall time and the
    CPUs; unknown readings give None. cpu_reading on Linux reads this process's CPUs."""
    assert plan.others_share((10.0, 4.0, 2), (12.0, 5.0, 2), 1.0) == pytest.approx(0.5)
    assert plan.others_share((10.0, 4.0, 2), (11.0, 5.0, 2), 1.0) == 0.0  # all of it ours
    assert plan.others_share((0.0, 0.0, 2), (9.0, 0.0, 2), 1.0) == 1.0  # ticks' rounding: at most all
    assert plan.others_share(None, (1.0, 1.0, 2), 1.0) is None
    assert plan.others_share((1.0, 1.0, 2), (1.0, 1.0, 2), 0.0) is None
    r = plan.cpu_reading()
    if not sys.platform.startswith("linux"):
        assert r is None
        return
    busy, own, cpus = r
    assert cpus == len(os.sched_getaffinity(0)) and busy >= own - 1.0 and own > 0
    later = plan.cpu_reading()
    assert later[0] >= busy and later[1] >= own


def test_settings_that_force_a_knob_leave_it_out_of_the_plan():
    assert Settings.from_env({}).plan == {"split", "packed"}
    assert Settings.from_env({"CHARNN_THREADS": "2"}).plan == {"packed"}
    assert Settings.from_env({"CHARNN_PACKED": "0"}).plan == {"split"}
    assert Settings.from_env({"CHARNN_PACKED": "1", "CHARNN_THREADS": "1"}).plan == frozenset()
    assert Settings.from_env({"CHARNN_PLAN": "0"}).plan == frozenset()
    with pytest.raises(SettingsError, match="CHARNN_PLAN"):
        Settings.from_env({"CHARNN_PLAN": "yes"})
    with pytest.raises(SettingsError, match="plan"):
        Settings(plan=frozenset({"threads"}))
    assert engine_ops(Settings.from_env({"CHARNN_PLAN": "0"})).planner is None
    assert engine_ops(Settings.from_env({})).planner is plan.shared_planner()
    assert engine_ops(Settings(threads=2)).planner is None  # settings a caller builds: the rules


def lstm(settings, H=16, **kw):
    cfg = ModelConfig(vocab_size=30, cell=kw.pop("cell", "lstm"), layers=1, hidden=H, **kw)
    return LanguageModel.create(cfg, seed=1, backend=get_backend("cpu", "float32", settings=settings))


def with_ops(cfg, ops, dtype="float32", seed=1, params=None):
    """A model computing with ``ops`` (a planner of the test's own, a path)."""
    backend = get_backend("cpu", dtype)
    backend = type(backend)(xp=numpy, dtype=backend.dtype, device="cpu", ops=ops)
    return LanguageModel(cfg, init_params(cfg, seed) if params is None else params, backend)


needs_loops = pytest.mark.skipif(not (kernels.available and loops.compiled_loops()),
                                 reason="needs numba and a CBLAS sgemm in NumPy's BLAS")


@needs_loops
def test_the_candidates_follow_the_settings():
    m = lstm(PLANNING)
    rule = parallel.rule_path("train", m.ops, m, 32)
    got = parallel.candidates("train", m.ops, m, 32)
    assert got[0] == rule == Path("batch", 1, True)
    splits = {(p.split, p.blas) for p in got}
    assert splits == {("batch", 1), ("one", 1), ("one", 2), ("rows", 1)}
    assert {p.packed for p in got} == ({True, False} if packed.available() else {True})
    threads_set = lstm(Settings(threads=2, plan=frozenset({"packed"})))
    assert {p.split for p in parallel.candidates("train", threads_set.ops, threads_set, 32)} == {"batch"}
    packed_off = lstm(Settings(threads=2, packed=False, plan=frozenset({"split"})))
    assert not any(p.packed for p in parallel.candidates("train", packed_off.ops, packed_off, 32))
    one = lstm(Settings(threads=1, plan=frozenset({"split", "packed"})))
    assert {(p.split, p.blas) for p in parallel.candidates("train", one.ops, one, 32)} == {("one", None)}
    gru = lstm(PLANNING, cell="gru")  # no packed products and no row split outside the LSTM loops
    assert {(p.split, p.packed) for p in parallel.candidates("score", gru.ops, gru, 32)} == {("batch", True), ("one", True)}
    assert parallel.rule_path("train", m.ops, m, 20).split == "rows" and parallel.rule_path("score", m.ops, m, 20).split == "batch"
    assert parallel.rule_path("train", m.ops, m, 4) == Path("one", None, True)


@needs_loops
def test_one_streams_segments_run_forward_on_the_blas_and_backward_packed():
    """Dynamic evaluation's segments (one stream) where the packed products are the engine's
    to choose: the forward's operations without them, the backward's with; anywhere else (the
    knob set, more streams, no packed products to choose) the same operations both ways."""
    m = lstm(Settings(threads=2, plan=frozenset({"packed"})))
    forward, backward = m.ops.segment_ops(m, 1)
    if packed.available():
        assert not forward.settings.packed and backward is m.ops and backward.settings.packed
    else:
        assert forward is backward is m.ops
    assert m.ops.segment_ops(m, 2) == (m.ops, m.ops)
    for fixed in (Settings(threads=2), Settings(threads=2, plan=frozenset({"split"})),
                  Settings(threads=2, packed=False, plan=frozenset({"split"}))):
        f = lstm(fixed)
        assert f.ops.segment_ops(f, 1) == (f.ops, f.ops)
    gru = lstm(Settings(threads=2, plan=frozenset({"packed"})), cell="gru")
    assert gru.ops.segment_ops(gru, 1) == (gru.ops, gru.ops)
    ref = Ops()
    assert ref.segment_ops(m, 1) == (ref, ref)


class PickLast(Planner):
    """Runs every candidate once and picks the last: what the engine does with a choice."""

    def measure(self, candidates, run, T):
        self.ran = []
        for p in candidates:
            run(p, min(T, 2))
            self.ran.append(p)
        last = candidates[-1]
        return plan.Measured(last, {last: 1.0}, 2, {p: 1.0 for p in candidates}, 2, 0.0)


@needs_loops
@pytest.mark.parametrize("kind", ["train", "score"])
def test_the_engine_runs_the_work_on_the_planners_choice(tmp_path, kind):
    """The results come from a run on the chosen path (never from a measuring run): equal, bit
    for bit, to the same work on that path without a planner; measured once per shape."""
    pl = PickLast(tmp_path, clock=FakeClock(), machine=MACHINE, min_flops=0)
    ops = CpuOps(PLANNING, planner=pl)
    cfg = ModelConfig(vocab_size=30, cell="lstm", layers=2, hidden=16, dropout=0.1)
    m = with_ops(cfg, ops)
    rng = numpy.random.default_rng(0)
    ids, tg = rng.integers(0, 30, (9, 12)), rng.integers(0, 30, (9, 12))

    def work(model):
        if kind == "train":
            loss, grads, state = model.loss_and_grads(ids, tg, None, rng=numpy.random.default_rng(3), sparse=True)
            return [loss, *[grads[k] for k in sorted(grads)], *[a for hc in state for a in hc]]
        nll, state = model.nll(ids, tg)
        return [nll, *[a for hc in state for a in hc]]

    got = work(m)
    cands = parallel.candidates(kind, ops, m, 12)
    assert pl.ran == cands and pl.measured == 1
    want = work(with_ops(cfg, ops.with_path(cands[-1])))
    for a, b in zip(got, want):
        numpy.testing.assert_array_equal(a, b)
    work(m)
    assert pl.measured == 1  # kept
    assert plan_report(m, 12, 9)["kinds"][kind]["path"] == cands[-1].label


class PickIndex(PickLast):
    """PickLast's planner, picking candidates[self.pick] (a test changes it)."""

    pick = -1

    def measure(self, candidates, run, T):
        m = super().measure(candidates, run, T)
        m.best = candidates[self.pick]
        return m


@needs_loops
def test_planned_work_is_looked_up_once_and_follows_a_new_plan(tmp_path):
    """A piece of work met again gets the same operations (nothing derived again); one of
    another shape or model its own; after the planner forgets a plan (info --plan
    --measure), the next step runs on the plan measured anew."""
    pl = PickIndex(tmp_path, clock=FakeClock(), machine=MACHINE, min_flops=0)
    ops = CpuOps(PLANNING, planner=pl)
    cfg = ModelConfig(vocab_size=30, cell="lstm", layers=1, hidden=16)
    m = with_ops(cfg, ops)
    cands = parallel.candidates("train", ops, m, 12)
    calls = []

    def run(o, t):
        calls.append(o.path)

    first = ops.planned("train", m, 9, 12, run)
    assert first.path == cands[-1] and pl.measured == 1 and calls == cands
    assert ops.planned("train", m, 9, 12, run) is first
    assert ops.planned("train", m, 11, 12, run).path == first.path and pl.measured == 1  # T 9 and 11: one plan
    other = with_ops(ModelConfig(vocab_size=30, cell="lstm", layers=1, hidden=18), ops)
    assert ops.planned("train", other, 9, 12, run).path == cands[-1] and pl.measured == 2
    assert ops.planned("score", m, 9, 12, run).path is not None and pl.measured == 3
    pl.pick = 0
    pl.forget(plan.work_key("train", cfg, 12, 9, ops.settings, numpy, m.dtype))
    again = ops.planned("train", m, 9, 12, run)
    assert again.path == cands[0] and pl.measured == 4
    assert ops.planned("train", m, 9, 12, run) is again
    assert CpuOps(PLANNING, planner=pl).planned("train", m, 9, 12, never).path == cands[0]  # kept by the planner


def test_small_work_and_float64_are_not_measured(tmp_path):
    pl = planner(tmp_path, FakeClock())  # the default floor of FLOPs
    cfg = ModelConfig(vocab_size=30, hidden=16, layers=1)
    m = with_ops(cfg, CpuOps(PLANNING, planner=pl))
    ids = numpy.zeros((5, 4), dtype=numpy.int64)
    m.loss_and_grads(ids, ids, None)
    m.nll(ids, ids)
    assert pl.measured == 0 and "too small" in m.ops.unplanned("train", m, 5, 4)
    f64 = with_ops(cfg, CpuOps(PLANNING, planner=Planner(tmp_path, clock=FakeClock(), machine=MACHINE, min_flops=0,
                                                                load=lambda: None)),
                   "float64")
    f64.nll(ids, ids)
    assert f64.ops.planner.measured == 0 and "float32" in f64.ops.unplanned("score", f64, 5, 4)


def close(a, b, name):
    a, b = numpy.asarray(a, numpy.float64), numpy.asarray(b, numpy.float64)
    assert a.shape == b.shape, name
    assert numpy.abs(a - b).max() <= 2e-5 * (numpy.abs(b).max() + 1e-12), (name, numpy.abs(a - b).max())


@needs_loops
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("embed,bounds,N", [(0, (), 11), (8, (0, 3, 9, 25, 60), 6), (0, (), 1)])
def test_every_candidate_path_matches_the_reference(cell, embed, bounds, N):
    """A training step (dropout, carried state, sparse embedding gradient) and a scoring pass
    (with weights) on every path the planner may choose, against the reference operations."""
    cfg = ModelConfig(vocab_size=60, cell=cell, layers=2, hidden=16, embed=embed, class_bounds=bounds, dropout=0.2)
    rng = numpy.random.default_rng(4)
    params = {k: p + rng.normal(0, 0.3, p.shape) if k.endswith((".b", ".bhn")) else p
              for k, p in init_params(cfg, 4).items()}
    T = 7
    ids, tg = rng.integers(0, 60, (T, N)), rng.integers(0, 60, (T, N))
    weights = rng.integers(0, 2, (T, N)).astype(float)
    has_c = cells.get(cell).has_c
    state = [(rng.normal(0, 0.5, (16, N)).astype(numpy.float32),
              rng.normal(0, 0.5, (16, N)).astype(numpy.float32) if has_c else None) for _ in range(2)]

    def run(ops, kind):
        m = with_ops(cfg, ops, params=params)
        if kind == "train":
            loss, grads, st = m.loss_and_grads(ids, tg, state, rng=numpy.random.default_rng(5), sparse=embed > 0)
            out = {"loss": loss, **{k: g.dense() if hasattr(g, "dense") else g for k, g in grads.items()}}
        else:
            nll, st = m.nll(ids, tg, state, weights)
            out = {"nll": nll}
        for layer, (h, c) in enumerate(st):
            out[f"h{layer}"] = h
            if c is not None:
                out[f"c{layer}"] = c
        return out

    for kind in ("train", "score"):
        want = run(Ops(), kind)
        ops = CpuOps(PLANNING)
        paths = parallel.candidates(kind, ops, with_ops(cfg, ops, params=params), N)
        assert len(paths) > 1
        for path in paths:
            got = run(ops.with_path(path), kind)
            assert got.keys() == want.keys()
            for name in want:
                close(got[name], want[name], f"{kind} {path.label} {name}")


def test_the_suite_does_not_measure():
    """conftest.py turns the planner off for every test that does not build its own."""
    assert os.environ["CHARNN_PLAN"] == "0"
    assert default_settings().plan == frozenset()
    assert get_backend("cpu").ops.planner is None


def test_info_plan_shows_the_rules_when_the_planner_is_off():
    out = check_ok(invoke("info", "--plan", "--batch-size", "20", "--seq-len", "10")).output
    assert "20 streams x 10 steps" in out and "the planner chooses nothing" in out
    assert "train         row split" in out and "score         batch split" in out
    d = json.loads(check_ok(invoke("info", "--plan", "--json")).output)
    assert d["kinds"]["train"]["why"].startswith("the settings leave nothing") and d["batch"] == 32
    check_error(invoke("info", "--measure"), 2, "--measure: needs --plan")
    check_error(invoke("info", "--seq-len", "4"), 2, "--seq-len: needs --plan")


@pytest.mark.slow
@pytest.mark.skipif(not kernels.available, reason="numba is not installed")
def test_info_plan_measures_and_shows_why(tmp_path):
    """In a process of its own with the planner on (CHARNN_PLAN=1) and a fresh cache folder
    (numba's kept where it is): --measure times the candidates and shows each; the next call
    finds the plan on disk; a knob set in the environment leaves the candidates that match it."""
    from numba.core import config as numba_config

    env = dict(os.environ, CHARNN_PLAN="1", XDG_CACHE_HOME=str(tmp_path), NUMBA_CACHE_DIR=str(numba_config.CACHE_DIR))
    env.pop("CHARNN_THREADS", None)
    env.pop("CHARNN_PACKED", None)
    args = [sys.executable, "-m", "charnn", "info", "--plan", "--batch-size", "8", "--seq-len", "6"]

    def info(*extra, **more):
        proc = subprocess.run(args + list(extra), env={**env, **more}, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    assert "not measured yet" in info()
    d = json.loads(info("--measure", "--json"))
    complete = {}
    for kind in ("train", "score"):
        k = d["kinds"][kind]
        assert k["why"] == "measured" and k["path"] in k["candidates"] and len(k["candidates"]) > 1
        e = k["plan"]
        assert set(e["estimates"]) | set(e["untimed"]) == set(k["candidates"])
        complete[kind] = e["warmed"]
    # On disk, and shown by the next call (a plan whose candidates did not all run, the budget
    # gone on compiling, is measured again by the next processes that run the work).
    kept = json.loads(FilePath(d["file"]).read_text())["plans"]
    again = json.loads(info("--json"))
    for kind in ("train", "score"):
        assert kept[d["kinds"][kind]["key"]]["warmed"] == complete[kind]
        assert again["kinds"][kind]["path"] == d["kinds"][kind]["path"]
    forced = json.loads(info("--json", CHARNN_THREADS="1"))
    assert all(c.startswith("one thread") for c in forced["kinds"]["train"]["candidates"])


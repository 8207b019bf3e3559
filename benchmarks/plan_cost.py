"""What the engine's planner costs on first meeting a piece of work, and what it chose.

    python benchmarks/plan_cost.py                  # configurations a-d of bench.py
    python benchmarks/plan_cost.py --configs a --env CHARNN_PACKED=0

For each configuration: a model on the rules' path runs a few training steps and scoring
passes first (so numba's compiled kernels are loaded and nothing of that is counted), then a
model with a planner of its own (an empty plan folder) runs its first training step and
scoring pass, which measure, and five more of each. The table gives the first's time, the
median of the rest, the difference (what the first meeting cost), the planner's own measuring
time, and the path it chose against the rules'. A second planner on the same folder then shows
that the next process pays nothing (its first step is timed like the others). Settings come
from the environment (CHARNN_*) with --env added; the planner is on unless they turn it off.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
if os.environ.get("OPENBLAS_CORETYPE") or os.environ.get("OPENBLAS_L2_SIZE"):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    os.execve(sys.executable, [sys.executable] + sys.argv, env)

import numpy  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="a,b,c-gru,c-rnn,d")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE added to the settings' environment")
    args = ap.parse_args()
    from bench import CONFIGS
    from threadpoolctl import threadpool_info

    from charnn.backend import Backend
    from charnn.engine.cpu import CpuOps
    from charnn.engine.plan import Path, Planner
    from charnn.engine.settings import Settings
    from charnn.nn.model import LanguageModel, ModelConfig, init_params

    env = dict(os.environ, **dict(e.split("=", 1) for e in args.env))
    settings = Settings.from_env(env)
    blas = [i.get("architecture") for i in threadpool_info() if i.get("user_api") == "blas"]
    print(f"# settings {settings}; OpenBLAS kernel {blas}")
    print(f"{'config':7} {'kind':6} {'first ms':>9} {'next ms':>9} {'extra ms':>9} {'measuring':>9}  chosen (rules)")
    folder = tempfile.mkdtemp(prefix="charnn-plans-")
    for name in args.configs.split(","):
        level, cell, L, H, N, T, V, E = CONFIGS[name]
        cfg = ModelConfig(vocab_size=V, cell=cell, layers=L, hidden=H, embed=E)
        params = init_params(cfg, 0)
        rng = numpy.random.default_rng(1)
        x, y = rng.integers(0, V, (T, N)), rng.integers(0, V, (T, N))

        def model(ops):
            return LanguageModel(cfg, params, Backend(xp=numpy, dtype=numpy.float32, device="cpu", ops=ops))

        def once(m, kind):
            t = time.perf_counter()
            if kind == "train":
                m.loss_and_grads(x, y, None, sparse=True)
            else:
                m.nll(x, y)
            return time.perf_counter() - t

        rules = model(CpuOps(settings))
        for kind in ("train", "score"):
            for _ in range(3):
                once(rules, kind)
        for label, planner in (("new", Planner(folder)), ("kept", Planner(folder))):
            m = model(CpuOps(settings, planner=planner))
            for kind in ("train", "score"):
                first = once(m, kind)
                rest = float(numpy.median([once(m, kind) for _ in range(5)]))
                key = next((k for k in planner.decided if k.startswith(kind + " ")), None)
                entry = planner.entry(key) if key else None
                spent = entry["measuring_seconds"] if entry and label == "new" else 0.0
                chosen = Path.from_json(entry["path"]).label if entry else "the rules (not planned)"
                rule = entry["rule"] if entry else "-"
                print(f"{name:7} {kind:6} {1e3 * first:9.1f} {1e3 * rest:9.1f} {1e3 * (first - rest):9.1f} "
                      f"{1e3 * spent:9.1f}  {chosen} ({rule}){' [kept: next process]' if label == 'kept' else ''}",
                      flush=True)


if __name__ == "__main__":
    main()

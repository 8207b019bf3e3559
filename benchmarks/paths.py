"""Every path the engine's planner may choose for a configuration, each forced, side by side.

    python benchmarks/paths.py a                      # bench.py's configuration (a)
    python benchmarks/paths.py a --env CHARNN_PACKED=0 --rounds 10

One model per path (the same weights), plus one on the rules' path (the engine as it ran
before the planner); the models take turns, a block of three training steps (Adam and the clip
included, the first untimed) and three scoring passes each, the order reversed every round,
so the machine's swings hit all alike. The table gives the median time of a training step and
of a scoring pass on each: what the planner's choice should match. Settings come from the
environment (CHARNN_*) with --env added; the candidates are those the planner would time
(engine/parallel.py's candidates). OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are unset (see
bench.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
if os.environ.get("OPENBLAS_CORETYPE") or os.environ.get("OPENBLAS_L2_SIZE"):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    os.execve(sys.executable, [sys.executable] + sys.argv, env)

import numpy  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="one of bench.py's configurations")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE added to the settings' environment")
    args = ap.parse_args()
    from bench import CONFIGS
    from threadpoolctl import threadpool_info, threadpool_limits

    from charnn.backend import Backend
    from charnn.engine import parallel
    from charnn.engine.cpu import CpuOps
    from charnn.engine.settings import Settings
    from charnn.nn.model import LanguageModel, ModelConfig, init_params
    from charnn.nn.optim import clip_scale, global_norm, make_optimizer

    env = dict(os.environ, **dict(e.split("=", 1) for e in args.env))
    env.pop("CHARNN_PLAN", None)  # the candidates the planner would time
    settings = Settings.from_env(env)
    level, cell, L, H, N, T, V, E = CONFIGS[args.config]
    cfg = ModelConfig(vocab_size=V, cell=cell, layers=L, hidden=H, embed=E)
    params = init_params(cfg, 0)

    def model(ops):
        return LanguageModel(cfg, params, Backend(xp=numpy, dtype=numpy.float32, device="cpu", ops=ops))

    base = CpuOps(settings)
    paths = []
    for kind in ("train", "score"):
        for p in parallel.candidates(kind, base, model(base), N):
            if p not in paths:
                paths.append(p)
    sides = {"rules": model(base)}
    sides.update({p.label: model(base.with_path(p)) for p in paths})
    opts = {k: make_optimizer("adam", m.params, 2e-3, m.ops) for k, m in sides.items()}
    data = numpy.random.default_rng(1).integers(0, V, (3, T + 1, N))
    res = {k: {"train": [], "score": []} for k in sides}
    blas = [i.get("architecture") for i in threadpool_info() if i.get("user_api") == "blas"]
    print(f"# {args.config}: {cell} {L}x{H} N{N} T{T} V{V}; settings {settings}; OpenBLAS kernel {blas}", flush=True)
    with threadpool_limits(args.threads):
        for r in range(args.rounds):
            for k in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                m, state = sides[k], None
                for j in range(3):
                    x, y = data[j, :-1], data[j, 1:]
                    t = time.perf_counter()
                    loss, grads, state = m.loss_and_grads(x, y, state, sparse=True)
                    opts[k].step(grads, clip_scale(global_norm(grads, m.ops), 5.0))
                    if j:
                        res[k]["train"].append(time.perf_counter() - t)
                for j in range(3):
                    t = time.perf_counter()
                    m.nll(x, y)
                    if j:
                        res[k]["score"].append(time.perf_counter() - t)
                time.sleep(0.05)
    print(f"{'path':30} {'train ms':>9} {'tok/s':>9} {'score ms':>9} {'tok/s':>9}")
    for k in sides:
        tr, sc = float(numpy.median(res[k]["train"])), float(numpy.median(res[k]["score"]))
        print(f"{k:30} {1e3 * tr:9.2f} {N * T / tr:9,.0f} {1e3 * sc:9.2f} {N * T / sc:9,.0f}", flush=True)


if __name__ == "__main__":
    main()

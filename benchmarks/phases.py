"""Where a small model's training step and scoring pass go: each phase timed alone, on one core.

    python benchmarks/phases.py a                  # bench.py's configuration (a), N = 32 and N = 16
    python benchmarks/phases.py a --env CHARNN_PACKED=0 --profile

Times the phases of one training step (the one-hot input's gather, the recurrent loops, the
recurrent weight gradient, the output layer and its gradient, the one-hot scatter, the norm
and Adam) and the whole forward+backward and scoring pass, each on one core with the shapes
of the whole batch and of half of it (what each core of the batch split runs), medians of
--repeats calls. With --profile, cProfile's view of 200 training steps and scoring passes on
the engine's own path (the main thread only: the worker's half does not show): what is in
Python rather than in a compiled kernel or the BLAS. paths.py times whole steps on every
path. Settings come from the environment (CHARNN_*) with --env added. One-layer one-hot
models only (a, c-gru, c-rnn). A timing: run it under flock /tmp/charnn-cpu.lock.
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


def median_us(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * float(numpy.median(times))


def phases(model, ops, T, N, repeats):
    """{phase: us} for one chunk of T x N on ``ops`` (one thread)."""
    from charnn.engine import heads, kernels, layers, loops
    from charnn.nn.optim import clip_scale, global_norm, make_optimizer

    p, cfg = model.params, model.config
    V, H = cfg.vocab_size, cfg.hidden
    rng = numpy.random.default_rng(0)
    ids = rng.integers(0, V, (T, N))
    targets = rng.integers(0, V, (T, N))
    M = T * N
    ids_d = ids.reshape(M)
    t_d = targets.reshape(M)
    out = {}
    Wx, Wh, b = p["rnn.0.Wx"], p["rnn.0.Wh"], p["rnn.0.b"]
    out["input projection (one-hot gather)"] = median_us(lambda: ops.input_projection(Wx, b, None, ids_d), repeats)
    XP = ops.input_projection(Wx, b, None, ids_d).reshape(-1, T, N)
    st = model.initial_state(N)[0]
    out["recurrent forward, stored"] = median_us(
        lambda: ops.layer_forward(cfg.cell, XP, Wh, st[0], st[1], model.layer_extra(0), True), repeats)
    out["recurrent forward, not stored"] = median_us(
        lambda: ops.layer_forward(cfg.cell, XP, Wh, st[0], st[1], model.layer_extra(0), False), repeats)
    hs, _, cache = ops.layer_forward(cfg.cell, XP, Wh, st[0], st[1], model.layer_extra(0), True)
    X = hs.reshape(H, M)
    W, hb = p["head.W"], p["head.b"]
    out["head forward, stored"] = median_us(lambda: ops.softmax_xent_forward(X, W, hb, t_d, None, True), repeats)
    out["head forward, not stored"] = median_us(lambda: ops.softmax_xent_forward(X, W, hb, t_d, None, False), repeats)
    out["  head logits GEMM"] = median_us(lambda: X.T @ W.T, repeats)

    def head_back():
        _, _, hc = ops.softmax_xent_forward(X, W, hb, t_d, None, True)
        return ops.softmax_xent_backward(hc, W)

    out["head forward+backward"] = median_us(head_back, repeats)
    dX = head_back()[0]
    dhs = dX.reshape(H, T, N)
    if cfg.cell == "lstm" and ops.compiled_loop("lstm", dhs):
        out["recurrent backward loop"] = median_us(
            lambda: loops.lstm_backward_loop_one(dhs, cache, Wh, ops.settings.packed), repeats)
    out["recurrent backward (loop + dWh)"] = median_us(lambda: ops.layer_backward(cfg.cell, dhs, cache, Wh), repeats)
    dXP = ops.layer_backward(cfg.cell, dhs, cache, Wh)[0]
    h_prev = numpy.concatenate([cache["h0"], hs.reshape(H, M)[:, : (T - 1) * N]], axis=1)
    out["  dWh GEMM"] = median_us(lambda: dXP.reshape(-1, M) @ h_prev.T, repeats)
    out["  h_prev concatenate"] = median_us(
        lambda: numpy.concatenate([cache["h0"], hs.reshape(H, M)[:, : (T - 1) * N]], axis=1), repeats)
    out["input grads (one-hot scatter)"] = median_us(lambda: ops.input_grads(Wx, dXP.reshape(-1, M), None, ids_d), repeats)
    loss, grads, _ = model.loss_and_grads(ids, targets, None, sparse=True)
    opt = make_optimizer("adam", model.params, 2e-3, ops)
    out["global norm + clip"] = median_us(lambda: clip_scale(global_norm(grads, ops), 5.0), repeats)
    scale = clip_scale(global_norm(grads, ops), 5.0)
    out["adam"] = median_us(lambda: opt.step(grads, scale), repeats)
    out["whole step (forward+backward)"] = median_us(lambda: model.loss_and_grads(ids, targets, None, sparse=True),
                                                     repeats)
    out["whole scoring pass"] = median_us(lambda: model.nll(ids, targets), repeats)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", help="one of bench.py's configurations")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE added to the settings' environment")
    ap.add_argument("--profile", action="store_true", help="also cProfile whole steps on the rules' path")
    args = ap.parse_args()
    from bench import CONFIGS
    from threadpoolctl import threadpool_limits

    from charnn.backend import Backend
    from charnn.engine.cpu import CpuOps
    from charnn.engine.plan import Path
    from charnn.engine.settings import Settings
    from charnn.nn.model import LanguageModel, ModelConfig, init_params
    from charnn.nn.optim import clip_scale, global_norm, make_optimizer

    env = dict(os.environ, **dict(e.split("=", 1) for e in args.env))
    settings = Settings.from_env(env)
    level, cell, L, H, N, T, V, E = CONFIGS[args.config]
    cfg = ModelConfig(vocab_size=V, cell=cell, layers=L, hidden=H, embed=E)
    params = init_params(cfg, 0)
    if L != 1 or E:
        sys.exit("phases.py times one-layer one-hot models (configurations a, c-gru, c-rnn)")
    one = CpuOps(settings).with_path(Path("one", 1, settings.packed))

    def model(ops):
        return LanguageModel(cfg, params, Backend(xp=numpy, dtype=numpy.float32, device="cpu", ops=ops))

    print(f"# {args.config}: {cell} {L}x{H} T{T} V{V}; settings {settings}")
    with threadpool_limits(1):
        res = {n: phases(model(one), one, T, n, args.repeats) for n in (N, N // 2)}
    print(f"{'phase':40} " + " ".join(f"{'N' + str(n) + ' us':>10}" for n in res))
    for k in res[N]:
        print(f"{k:40} " + " ".join(f"{res[n].get(k, float('nan')):10.1f}" for n in res))
    if args.profile:
        import cProfile
        import pstats

        m = model(CpuOps(settings))
        opt = make_optimizer("adam", m.params, 2e-3, m.ops)
        data = numpy.random.default_rng(1).integers(0, V, (3, T + 1, N))
        with threadpool_limits(2):
            def steps(k):
                state = None
                for j in range(k):
                    x, y = data[j % 3, :-1], data[j % 3, 1:]
                    loss, grads, state = m.loss_and_grads(x, y, state, sparse=True)
                    opt.step(grads, clip_scale(global_norm(grads, m.ops), 5.0))
                    m.nll(x, y)
            steps(3)
            pr = cProfile.Profile()
            pr.enable()
            steps(200)
            pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()

"""Two versions of charnn side by side: training steps, scoring passes and sampled tokens, old against new.

    git worktree add /tmp/charnn-old <commit>       # the version to compare with
    python benchmarks/ab.py /tmp/charnn-old          # against this checkout
    python benchmarks/ab.py /tmp/charnn-old --configs a,b --blocks 12 --env CHARNN_PACKED=0

Each version runs in a worker process of its own (its tree first on PYTHONPATH); the workers
take turns, a block of steps each, with a pause between blocks, so the machine's swings hit
both alike and neither's idle threads slow the other. Configurations are bench.py's. The table
gives the median time of a training step (batch split and all, Adam and the clip included),
of a scoring pass over the same chunk (model.nll, no gradient) and of a sampled token (batch
1, `charnn sample`'s path), and new/old as a ratio of rates. OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE are unset for the workers (see bench.py). Each worker runs with the
environment as it is plus --env: a version with the engine's planner measures its paths in
its first step of each kind (untimed: the first of each block is dropped) or reads the plans
its earlier runs kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy

HERE = os.path.dirname(os.path.abspath(__file__))


def worker():
    """Serve one version: read JSON commands on stdin, answer each with one JSON line."""
    sys.path.insert(0, HERE)
    from bench import CONFIGS

    import charnn

    new = os.path.isdir(os.path.join(os.path.dirname(charnn.__file__), "nn"))
    if new:
        from charnn.nn.model import LanguageModel, ModelConfig
        from charnn.nn.optim import clip_scale, global_norm, make_optimizer
    else:
        from charnn.model import LanguageModel, ModelConfig, Stepper
        from charnn.optim import clip_scale, global_norm, make_optimizer
    from charnn.sample import sample_index

    model = opt = state = data = stepper = None
    tok = numpy.zeros(1, dtype=numpy.int64)
    rng = numpy.random.default_rng(0)
    k = 0
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "setup":
            level, cell, L, H, N, T, V, E = CONFIGS[cmd["config"]]
            model = LanguageModel.create(ModelConfig(vocab_size=V, cell=cell, layers=L, hidden=H, embed=E), 0)
            opt = make_optimizer("adam", model.params, 2e-3, model.ops) if new else make_optimizer("adam", model.params, 2e-3)
            data = numpy.random.default_rng(1).integers(0, V, (8, T + 1, N))
            stepper = model.stepper(1) if new else Stepper(model, 1)
            state, k, tok[0] = None, 0, 0
            out = {"file": charnn.__file__}
        elif cmd["cmd"] == "train":
            times = []
            for _ in range(cmd["steps"]):
                x, y = data[k % 8, :-1], data[k % 8, 1:]
                k += 1
                t = time.perf_counter()
                loss, grads, state = model.loss_and_grads(x, y, state, sparse=True)
                norm = global_norm(grads, model.ops) if new else global_norm(grads)
                opt.step(grads, clip_scale(norm, 5.0))
                times.append(time.perf_counter() - t)
            out = {"times": times}
        elif cmd["cmd"] == "score":
            times = []
            for j in range(cmd["steps"]):
                x, y = data[j % 8, :-1], data[j % 8, 1:]
                t = time.perf_counter()
                model.nll(x, y)
                times.append(time.perf_counter() - t)
            out = {"times": times}
        else:
            times = []
            for _ in range(cmd["tokens"]):
                t = time.perf_counter()
                logits = stepper.step(tok)[0]
                tok[0] = sample_index(logits, 1.0, rng, model.ops) if new else sample_index(logits, 1.0, rng)
                times.append(time.perf_counter() - t)
            out = {"times": times}
        print(json.dumps(out), flush=True)


def start(tree, extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env.update(extra_env)
    env["PYTHONPATH"] = os.path.abspath(tree)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def ask(proc, **cmd):
    proc.stdin.write(json.dumps(cmd) + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main():
    if sys.argv[1:] == ["--worker"]:
        return worker()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", help="the other version's tree (a folder holding its charnn package)")
    ap.add_argument("new", nargs="?", default=os.path.dirname(HERE), help="this version's tree [this checkout]")
    ap.add_argument("--configs", default="a,b,c-gru,c-rnn,d")
    ap.add_argument("--blocks", type=int, default=10, help="blocks per side and configuration")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps (and scoring passes) per block")
    ap.add_argument("--warmup", type=int, default=5,
                    help="untimed steps before them in each block (a core idle through the pause between "
                         "blocks runs the next 20-30 ms slower on this project's VM; 1 until 2026-12-05)")
    ap.add_argument("--tokens", type=int, default=200, help="sampled tokens per block")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for both workers, e.g. CHARNN_PACKED=0")
    args = ap.parse_args()
    extra = dict(e.split("=", 1) for e in args.env)
    sides = {"old": start(args.old, extra), "new": start(args.new, extra)}
    from threadpoolctl import threadpool_info

    blas = [i.get("architecture") for i in threadpool_info() if i.get("user_api") == "blas"]
    print(f"# OpenBLAS kernel (this process, variables unset for the workers): {blas}; env {extra or 'as is'}")
    print(f"{'config':8} {'train old ms':>12} {'train new ms':>12} {'new/old':>8} {'score old ms':>12} {'score new ms':>12} "
          f"{'new/old':>8} {'sample old us':>13} {'sample new us':>13} {'new/old':>8}")
    for name in args.configs.split(","):
        files = {s: ask(p, cmd="setup", config=name)["file"] for s, p in sides.items()}
        assert files["old"] != files["new"], files
        train = {s: [] for s in sides}
        score = {s: [] for s in sides}
        sample = {s: [] for s in sides}
        for block in range(args.blocks):
            order = ("old", "new") if block % 2 == 0 else ("new", "old")
            for s in order:
                train[s] += ask(sides[s], cmd="train", steps=args.warmup + args.steps)["times"][args.warmup:]
                time.sleep(0.3)
            for s in order:
                score[s] += ask(sides[s], cmd="score", steps=args.warmup + args.steps)["times"][args.warmup:]
                time.sleep(0.3)
            for s in order:
                sample[s] += ask(sides[s], cmd="sample", tokens=args.tokens)["times"][10:]
                time.sleep(0.3)
        tr = {s: 1e3 * float(numpy.median(v)) for s, v in train.items()}
        sc = {s: 1e3 * float(numpy.median(v)) for s, v in score.items()}
        sa = {s: 1e6 * float(numpy.median(v)) for s, v in sample.items()}
        print(f"{name:8} {tr['old']:12.2f} {tr['new']:12.2f} {tr['old'] / tr['new']:8.3f} "
              f"{sc['old']:12.2f} {sc['new']:12.2f} {sc['old'] / sc['new']:8.3f} "
              f"{sa['old']:13.1f} {sa['new']:13.1f} {sa['old'] / sa['new']:8.3f}", flush=True)
    for p in sides.values():
        p.stdin.close()
        p.wait()


if __name__ == "__main__":
    main()

"""Training-step time of the class-factored softmax against the full softmax, large vocabulary.

    python benchmarks/factored.py --vocab 30000

The same word LSTM (2x200, embedding 200, batch 20, seq 35, Adam) on a Zipf-distributed token
stream, with the full softmax and with about sqrt(V) frequency-binned classes; medians of the
per-step times (after two warm-up steps), and a check that the factored model's next-token
probabilities sum to 1. The two models alternate step by step, so a busy spell on the machine
slows both alike.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

if os.environ.get("OPENBLAS_CORETYPE") or os.environ.get("OPENBLAS_L2_SIZE"):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    os.execve(sys.executable, [sys.executable] + sys.argv, env)

import numpy  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=30000)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    from charnn.nn.functional import class_bounds
    from charnn.nn.model import LanguageModel, ModelConfig
    from charnn.nn.optim import clip_scale, global_norm, make_optimizer

    V, H, N, T = args.vocab, 200, 20, 35
    rng = numpy.random.default_rng(0)
    p = 1.0 / numpy.arange(1, V + 1)
    p /= p.sum()
    data = rng.choice(V, size=(args.steps + 2, T + 1, N), p=p)
    C = round(math.sqrt(V))
    heads = {"full softmax": (), f"{C} classes": tuple(class_bounds(numpy.bincount(data.ravel(), minlength=V), C))}
    runs = {}
    for label, bounds in heads.items():
        m = LanguageModel.create(ModelConfig(vocab_size=V, cell="lstm", layers=2, hidden=H, embed=H, class_bounds=bounds))
        runs[label] = {"model": m, "opt": make_optimizer("adam", m.params, ops=m.ops), "state": None, "times": []}
    # The two models take turns, step by step, so a busy spell on the machine hits both.
    for k in range(args.steps + 2):
        for r in runs.values():
            t = time.perf_counter()
            loss, grads, r["state"] = r["model"].loss_and_grads(data[k, :-1], data[k, 1:], r["state"], sparse=True)
            r["opt"].step(grads, clip_scale(global_norm(grads, r["model"].ops), 5.0))
            r["times"].append(time.perf_counter() - t)
    results = {}
    for label, r in runs.items():
        results[label] = float(numpy.median(r["times"][2:]))
        logits, _ = r["model"].step(numpy.array([1, 2, 3]), None)
        if heads[label]:  # exact log-probabilities
            total = numpy.exp(logits.astype(numpy.float64)).sum(axis=1)
        else:
            probs = numpy.exp(logits.astype(numpy.float64) - logits.max(axis=1, keepdims=True))
            total = (probs / probs.sum(axis=1, keepdims=True)).sum(axis=1)
        print(f"{label:14s} {results[label] * 1e3:8.1f} ms/step  {N * T / results[label]:8,.0f} tokens/s  "
              f"sum of next-token probabilities {total.min():.6f}..{total.max():.6f}", flush=True)
    full, fact = results["full softmax"], results[f"{C} classes"]
    print(f"speed-up of the factored softmax at V={V}: {full / fact:.1f}x (medians of {args.steps} steps each, "
          f"the two models alternating)")


if __name__ == "__main__":
    main()

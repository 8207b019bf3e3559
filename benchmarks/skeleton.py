"""How close can configuration (b) get to the GEMM bound on this machine? Times a "skeleton" of
one (b) training step, its matrix products and nothing else (the same shapes and counts, the
batch split in two threads of one BLAS thread each, the per-step products packed as charnn's
loops do them), against charnn's whole training step and the machine's 2-thread sgemm peak,
in alternating rounds.

    python benchmarks/skeleton.py --rounds 8

The skeleton's share of the peak is what charnn's step could reach if its gate kernels,
softmax, gathers, optimizer and memory traffic cost nothing; the gap between the two lines is
what they cost. The same for sampling: (b)'s batch-1 token reads all 12 MB of its weights; the
two matrix-vector products alone (OpenBLAS, two threads) against charnn's whole token and
PyTorch's (oneDNN on and off), in alternating rounds. Like bench.py, this unsets
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE for itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if os.environ.get("OPENBLAS_CORETYPE") or os.environ.get("OPENBLAS_L2_SIZE"):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    os.execve(sys.executable, [sys.executable] + sys.argv, env)

import numpy  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import CONFIGS, CharnnSide, flops_per_token, sgemm_peak, token_stream  # noqa: E402

from charnn.engine import packed  # noqa: E402
from charnn.engine.threads import run_in_two  # noqa: E402


class Skeleton:
    """The GEMMs of one (b) step for a half batch of N streams (one-hot input: layer 0 has no
    input product; the output layer's three products; per layer T recurrent products forward
    and T backward, the input projection, the weight gradients and the input gradient)."""

    def __init__(self, H, T, V, N, seed=0):
        rng = numpy.random.default_rng(seed)
        f = numpy.float32

        def r(*shape):
            return rng.standard_normal(shape, dtype=f) * f(0.05)

        G, M = 4 * H, T * N
        self.H, self.T, self.N = H, T, N
        self.Wh, self.Wx1, self.Wy = [r(G, H), r(G, H)], r(G, H), r(V, H)
        self.X, self.XP, self.dXP, self.dX = r(H, M), numpy.empty((G, M), f), r(G, M), numpy.empty((H, M), f)
        self.h, self.a, self.d, self.dh = r(H, N), numpy.empty((G, N), f), r(G, N), numpy.empty((H, N), f)
        self.dW, self.Y, self.dY, self.dWy = numpy.empty((G, H), f), numpy.empty((V, M), f), r(V, M), numpy.empty((V, H), f)
        self.usable = packed.usable(N)

    def step(self):
        H, T, N = self.H, self.T, self.N
        G = 4 * H
        addr = (lambda x: x.ctypes.data)
        for layer in (0, 1):
            if layer == 1:
                numpy.matmul(self.Wx1, self.X, out=self.XP)
            self._loop(self.Wh[layer], G, H, self.h, self.a, addr)
        numpy.matmul(self.Wy, self.X, out=self.Y)
        numpy.matmul(self.dY, self.X.T, out=self.dWy)
        numpy.matmul(self.Wy.T, self.dY, out=self.dX)
        for layer in (1, 0):
            self._loop(self.Wh[layer].T, H, G, self.d, self.dh, addr)
            numpy.matmul(self.dXP, self.X.T, out=self.dW)
            if layer == 1:
                numpy.matmul(self.dXP, self.X.T, out=self.dW)
                numpy.matmul(self.Wx1.T, self.dXP, out=self.dX)

    def _loop(self, W, M, K, B, C, addr):
        if self.usable:
            mm, Wp = packed.product(M, K, self.N), packed.packed(W, self.N)
            for _ in range(self.T):
                mm(addr(Wp), addr(B), self.N, addr(C), self.N)
        else:
            W = numpy.ascontiguousarray(W)
            for _ in range(self.T):
                numpy.matmul(W, B, out=C)


def sampling(side, cfg, rounds, tokens=300):
    """Per-token times, medians over rounds of ``tokens`` tokens each: the weights' two
    matrix-vector products alone, charnn's sampling step, PyTorch's with oneDNN on and off."""
    import torch

    from bench import TorchSide, timed

    _, _, L, H, _, _, V, _ = cfg
    f = numpy.float32
    p = side.model.params
    W0 = p["rnn.0.Wh"]  # layer 0's input is one-hot: a row, not a product
    W1 = numpy.ascontiguousarray(numpy.concatenate([p["rnn.1.Wx"], p["rnn.1.Wh"]], axis=1))
    x0, x1, out = numpy.ones((H, 1), f), numpy.ones((2 * H, 1), f), numpy.empty((4 * H, 1), f)

    def gemv():  # at the BLAS's default threads, two here (a limit set per call costs more than the call)
        numpy.matmul(W0, x0, out=out)
        numpy.matmul(W1, x1, out=out)

    torch_side = TorchSide(cfg)
    steps = {"gemv alone": gemv, "charnn": side.sampler(), "pytorch oneDNN": torch_side.sampler(True),
             "pytorch no oneDNN": torch_side.sampler(False)}
    per = {k: [] for k in steps}
    for _ in range(rounds):
        for k, fn in steps.items():
            torch.backends.mkldnn.enabled = k != "pytorch no oneDNN"
            timed(fn, 20)
            per[k].append(float(numpy.median(timed(fn, tokens))))
            time.sleep(0.2)
    torch.backends.mkldnn.enabled = True
    mb = (W0.nbytes + W1.nbytes) / 2 ** 20
    print(f"sampling (b), batch 1, {mb:.0f} MiB of weights a token; us per token, median of {rounds} rounds of {tokens}:")
    for k, v in per.items():
        print(f"  {k:18s} {numpy.median(v) * 1e6:6.0f} us ({1 / numpy.median(v):6,.0f} tok/s)")
    best_torch = min(numpy.median(per["pytorch oneDNN"]), numpy.median(per["pytorch no oneDNN"]))
    print(f"  2x PyTorch's faster setting needs {best_torch / 2 * 1e6:.0f} us a token")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    cfg = CONFIGS["b"]
    _, _, L, H, N, T, V, _ = cfg
    halves = [Skeleton(H, T, V, N // 2, seed=k) for k in (0, 1)]
    side = CharnnSide(cfg)
    chunks = token_stream(V, 8 * N * (T + 1)).reshape(8, T + 1, N)

    def skeleton():
        with threadpool_limits(1):
            run_in_two(lambda k: halves[k].step(), 0, 1)

    def charnn(k):
        c = chunks[k % len(chunks)]
        side.train_step(numpy.ascontiguousarray(c[:-1]), numpy.ascontiguousarray(c[1:]))

    skeleton(), charnn(0), charnn(1)
    times = {"skeleton": [], "charnn": []}
    peaks = []
    for r in range(args.rounds):
        peaks.append(sgemm_peak(2, 2))
        time.sleep(0.3)
        t = time.perf_counter()
        skeleton()
        times["skeleton"].append(time.perf_counter() - t)
        time.sleep(0.3)
        t = time.perf_counter()
        charnn(r)
        times["charnn"].append(time.perf_counter() - t)
    sampling(side, cfg, args.rounds)
    peak, fpt, tokens = max(peaks), flops_per_token(cfg), N * T
    print(f"(b) {fpt / 1e6:.2f} MFLOP/token; 2-thread sgemm peak {peak / 1e9:.0f} GFLOP/s (fastest of {len(peaks)}, "
          f"median {numpy.median(peaks) / 1e9:.0f}); GEMM bound {peak / fpt:,.0f} tok/s; packed products: {halves[0].usable}")
    for name, ts in times.items():
        m = float(numpy.median(ts))
        print(f"{name:9s} {m * 1e3:7.1f} ms a step (median of {len(ts)}), {tokens / m:8,.0f} tok/s, "
              f"{tokens * fpt / m / 1e9:4.0f} GFLOP/s, {tokens * fpt / m / peak:.0%} of the bound")


if __name__ == "__main__":
    main()

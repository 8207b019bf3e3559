"""Side-by-side benchmark: charnn against PyTorch on the same models, data and thread count.

    pip install -e '.[benchmarks]'
    python benchmarks/bench.py                      # all configurations, 2 threads
    python benchmarks/bench.py --configs a,b --repeats 7 --json results.json

For each configuration both sides train the same architecture (same sizes, batch, sequence
length, Adam, global-norm clip 5) on the same random token stream, in alternating blocks of
steps (the first six untimed: --warmup) with a pause between blocks, so machine noise hits both alike
and neither side's idle-spinning threads slow the other; the table gives medians of the
per-step rates and their ratio. Sampling is batch 1, one token at a time (PyTorch with
oneDNN on and off; the faster is compared). Scoring is a forward pass over N x T tokens with no
gradient. Peak memory is each side's peak resident set in a fresh process doing the training
steps. FLOPs per token count the GEMMs of a training step (forward, input and recurrent
gradients, weight gradients); "% of peak" divides achieved GEMM FLOP/s by the machine's sgemm
peak with the same thread count: the fastest of the 2048^3 products timed at the start of the
run and before each round of the configuration's training blocks (this machine's speed drifts
by up to 40% within minutes, so a peak measured once at the start may be far from the speed
while a configuration ran).

charnn runs with its settings as the environment gives them (CHARNN_*): by default the engine's
planner measures its paths in the first step of each kind (an untimed one) or reads the plans
an earlier run kept; each row ends with the paths charnn ran (see charnn info --plan).

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, if set (some machines here set them for old OpenBLAS
builds), slow a current NumPy; this script unsets both for its own process and reports which
kernel threadpoolctl then sees.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

if os.environ.get("OPENBLAS_CORETYPE") or os.environ.get("OPENBLAS_L2_SIZE"):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    os.execve(sys.executable, [sys.executable] + sys.argv, env)

import numpy  # noqa: E402

CONFIGS = {
    # name: (level, cell, layers, hidden, batch, seq, vocab, embed)
    "a": ("char", "lstm", 1, 128, 32, 50, 65, 0),
    "b": ("char", "lstm", 2, 512, 64, 100, 65, 0),
    "c-gru": ("char", "gru", 1, 128, 32, 50, 65, 0),
    "c-rnn": ("char", "rnn", 1, 128, 32, 50, 65, 0),
    "d": ("word", "lstm", 2, 200, 20, 35, 10000, 200),
}
GATES = {"rnn": 1, "lstm": 4, "gru": 3}
PAUSE = 0.3  # seconds between one side's block and the other's


def flops_per_token(cfg) -> float:
    """GEMM FLOPs of one training step per token: forward, backward data, weight gradients."""
    level, cell, L, H, N, T, V, E = cfg
    G = GATES[cell]
    f = 0.0
    for layer in range(L):
        In = (E or V) if layer == 0 else H
        rec = 2 * G * H * H  # Wh @ h
        inp = 0 if (layer == 0 and not E) else 2 * G * H * In  # one-hot input is a gather
        f += 3 * rec + (3 * inp if layer > 0 or E else 0)  # forward, dX, dW
    f += 3 * 2 * H * V  # head
    return f


def sgemm_peak(threads: int, repeats: int = 5) -> float:
    from threadpoolctl import threadpool_limits

    a = numpy.random.default_rng(0).random((2048, 2048), dtype=numpy.float32)
    best = 0.0
    with threadpool_limits(threads):
        for _ in range(repeats):
            t = time.perf_counter()
            a @ a
            best = max(best, 2 * 2048 ** 3 / (time.perf_counter() - t))
    return best


def token_stream(V: int, n: int, seed: int = 0) -> numpy.ndarray:
    """Random tokens with a Zipf-like frequency profile (as text has)."""
    rng = numpy.random.default_rng(seed)
    p = 1.0 / numpy.arange(1, V + 1)
    p /= p.sum()
    return rng.choice(V, size=n, p=p)


# ----- charnn side -----
class CharnnSide:
    name = "charnn"

    def __init__(self, cfg, seed=0):
        from charnn.nn.model import LanguageModel, ModelConfig
        from charnn.nn.optim import make_optimizer

        level, cell, L, H, N, T, V, E = cfg
        self.model = LanguageModel.create(ModelConfig(vocab_size=V, cell=cell, layers=L, hidden=H, embed=E), seed)
        self.opt = make_optimizer("adam", self.model.params, 2e-3, self.model.ops)
        self.state = None

    def train_step(self, x, y):
        from charnn.nn.optim import clip_scale, global_norm

        loss, grads, self.state = self.model.loss_and_grads(x, y, self.state, sparse=True)
        self.opt.step(grads, clip_scale(global_norm(grads, self.model.ops), 5.0))
        return float(loss)

    def score(self, x, y):
        nll, _ = self.model.nll(x, y)
        return float(nll.mean())

    def paths(self, T, N) -> dict:
        """The engine's path for this model's training step and scoring pass ("train", "score":
        the planner's or the rules', see charnn info --plan)."""
        from charnn.engine.cpu import plan_report

        return {kind: d["path"] for kind, d in plan_report(self.model, N, T)["kinds"].items()}

    def sampler(self):
        from charnn.sample import sample_index

        st = self.model.stepper(1)
        rng = numpy.random.default_rng(0)
        tok = numpy.zeros(1, dtype=numpy.int64)

        def step():
            tok[0] = sample_index(st.step(tok)[0], 1.0, rng, self.model.ops)  # what `charnn sample` does
        return step


# ----- PyTorch side -----
class TorchSide:
    name = "pytorch"

    def __init__(self, cfg, seed=0):
        import torch

        level, cell, L, H, N, T, V, E = cfg
        torch.manual_seed(seed)
        cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell]
        self.torch = torch
        self.V, self.E = V, E
        self.rnn = cls(E or V, H, L)
        self.head = torch.nn.Linear(H, V)
        self.emb = torch.nn.Embedding(V, E) if E else None
        self.params = list(self.rnn.parameters()) + list(self.head.parameters()) + (list(self.emb.parameters()) if E else [])
        self.opt = torch.optim.Adam(self.params, lr=2e-3)
        self.eye = torch.eye(V)
        self.h = None

    def _inputs(self, x):
        return self.emb(x) if self.emb is not None else self.eye[x]

    def train_step(self, x, y):
        torch = self.torch
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        out, h = self.rnn(self._inputs(x), self.h)
        self.h = tuple(a.detach() for a in h) if isinstance(h, tuple) else h.detach()
        loss = torch.nn.functional.cross_entropy(self.head(out).reshape(-1, self.V), y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 5.0)
        self.opt.step()
        return loss.item()

    def score(self, x, y):
        torch = self.torch
        with torch.no_grad():
            x, y = torch.from_numpy(x), torch.from_numpy(y)
            out, _ = self.rnn(self._inputs(x))
            return float(torch.nn.functional.cross_entropy(self.head(out).reshape(-1, self.V), y.reshape(-1)))

    def sampler(self, mkldnn: bool):
        torch = self.torch
        torch.backends.mkldnn.enabled = mkldnn
        gen = torch.Generator().manual_seed(0)
        state = {"h": None, "tok": torch.zeros((1, 1), dtype=torch.long)}

        def step():
            with torch.no_grad():
                out, state["h"] = self.rnn(self._inputs(state["tok"]), state["h"])
                p = torch.softmax(self.head(out[0]), dim=-1)
                state["tok"] = torch.multinomial(p, 1, generator=gen)
        return step


def timed(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def run_config(name, cfg, repeats, threads, sample_tokens, peak=0.0, warmup=1):
    import torch

    level, cell, L, H, N, T, V, E = cfg
    block = warmup + 2  # steps per side per round; the first ``warmup`` of each block are not timed
    rounds = max(1, -(-repeats // 2))
    n_chunks = rounds * block
    stream = token_stream(V, n_chunks * N * (T + 1) + 1)
    chunks = stream[: n_chunks * N * (T + 1)].reshape(n_chunks, T + 1, N)
    sides = [CharnnSide(cfg), TorchSide(cfg)]
    train = {s.name: [] for s in sides}
    score = {s.name: [] for s in sides}
    # Blocks of steps per side, alternating, with a pause between blocks: alternating single
    # steps let one side's BLAS/OpenMP threads, still spinning after their work, slow the other.
    for r in range(rounds):
        peak = max(peak, sgemm_peak(threads, 2))
        time.sleep(PAUSE)
        for s in sides:
            for j in range(block):
                k = r * block + j
                x, y = numpy.ascontiguousarray(chunks[k, :-1]), numpy.ascontiguousarray(chunks[k, 1:])
                t = time.perf_counter()
                s.train_step(x, y)
                if j >= warmup:
                    train[s.name].append(N * T / (time.perf_counter() - t))
            for j in range(block):
                t = time.perf_counter()
                s.score(x, y)
                if j >= warmup:
                    score[s.name].append(N * T / (time.perf_counter() - t))
            time.sleep(PAUSE)
    sample = {}
    stepc = sides[0].sampler()
    steps_t = {True: sides[1].sampler(True), False: sides[1].sampler(False)}
    for fn in (stepc, steps_t[True], steps_t[False]):
        timed(fn, 20)
    rates = {"charnn": [], "pytorch-onednn": [], "pytorch-no-onednn": []}
    for _ in range(3):
        rates["charnn"].append(sample_tokens / sum(timed(stepc, sample_tokens)))
        time.sleep(PAUSE)
        torch.backends.mkldnn.enabled = True
        rates["pytorch-onednn"].append(sample_tokens / sum(timed(steps_t[True], sample_tokens)))
        time.sleep(PAUSE)
        torch.backends.mkldnn.enabled = False
        rates["pytorch-no-onednn"].append(sample_tokens / sum(timed(steps_t[False], sample_tokens)))
        time.sleep(PAUSE)
    torch.backends.mkldnn.enabled = True
    med = {k: float(numpy.median(v)) for k, v in rates.items()}
    sample = {"charnn": med["charnn"], "pytorch": max(med["pytorch-onednn"], med["pytorch-no-onednn"]),
              "pytorch_onednn": med["pytorch-onednn"], "pytorch_no_onednn": med["pytorch-no-onednn"]}
    return {
        "config": name, "level": level, "cell": cell, "layers": L, "hidden": H, "batch": N, "seq": T, "vocab": V, "embed": E,
        "train": {k: float(numpy.median(v)) for k, v in train.items()},
        "train_all": train,
        "score": {k: float(numpy.median(v)) for k, v in score.items()},
        "paths": sides[0].paths(T, N),
        "sample": sample,
        "flops_per_token": flops_per_token(cfg),
        "gemm_peak_flops": peak,
    }


def peak_memory(name, side, steps=5):
    """Peak RSS (MiB) of a fresh process doing ``steps`` training steps of ``side``: VmHWM from
    /proc (ru_maxrss is no good here: Linux carries the parent's high-water mark across exec)."""
    code = (
        "import sys, numpy; sys.path.insert(0, %r); import bench\n"
        "cfg = bench.CONFIGS[%r]; s = (bench.CharnnSide if %r == 'charnn' else bench.TorchSide)(cfg)\n"
        "level, cell, L, H, N, T, V, E = cfg\n"
        "x = bench.token_stream(V, %d * N * (T + 1)).reshape(%d, T + 1, N)\n"
        "for k in range(%d): s.train_step(numpy.ascontiguousarray(x[k, :-1]), numpy.ascontiguousarray(x[k, 1:]))\n"
        "print(int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024)\n"
    ) % (os.path.dirname(os.path.abspath(__file__)), name, side, steps, steps, steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy())
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10, help="Training steps timed per side (two a block, after --warmup).")
    ap.add_argument("--warmup", type=int, default=6,
                    help="Untimed steps at the start of each block, so that what is timed is a run of steps "
                         "as training runs them (on this project's VM a core idle through the 0.3 s pause runs "
                         "the next 20-30 ms slower: config (a)'s batch split 10 ms a step for three steps, then "
                         "5.5; --warmup 1 measures that start, as this script did until 2026-12-05).")
    ap.add_argument("--sample-tokens", type=int, default=300)
    ap.add_argument("--no-memory", action="store_true", help="Skip the peak-memory subprocesses.")
    ap.add_argument("--json", help="Also write the results to this file.")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    torch.set_num_threads(args.threads)
    blas = [(i.get("internal_api"), i.get("architecture"), i.get("num_threads")) for i in threadpool_info()]
    peak = sgemm_peak(args.threads)
    print(f"threads {args.threads}; numpy {numpy.__version__}, torch {torch.__version__}; BLAS {blas}; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}; sgemm peak {peak / 1e9:.0f} GFLOP/s", flush=True)
    results = []
    with threadpool_limits(args.threads):
        for name in args.configs.split(","):
            r = run_config(name, CONFIGS[name], args.repeats, args.threads, args.sample_tokens, peak, args.warmup)
            if not args.no_memory:
                r["peak_mib"] = {side: peak_memory(name, side) for side in ("charnn", "pytorch")}
            results.append(r)
            print_row(r, r["gemm_peak_flops"], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "blas": blas, "sgemm_peak": peak, "results": results}, f, indent=1)


def print_row(r, peak, flush=False):
    c, t = r["train"]["charnn"], r["train"]["pytorch"]
    fpt = r["flops_per_token"]
    mem = r.get("peak_mib", {})
    print(f"{r['config']:6s} {r['cell']} {r['layers']}x{r['hidden']} N{r['batch']} T{r['seq']} V{r['vocab']}: "
          f"train {c:,.0f} vs {t:,.0f} tok/s = {c / t:.2f}x | "
          f"sample {r['sample']['charnn']:,.0f} vs {r['sample']['pytorch']:,.0f} = {r['sample']['charnn'] / r['sample']['pytorch']:.2f}x | "
          f"score {r['score']['charnn']:,.0f} vs {r['score']['pytorch']:,.0f} = {r['score']['charnn'] / r['score']['pytorch']:.2f}x | "
          f"{fpt / 1e6:.2f} MFLOP/tok, sgemm peak {peak / 1e9:.0f} GFLOP/s, GEMM-bound {peak / fpt:,.0f} tok/s, "
          f"peak {c * fpt / peak:.0%} vs {t * fpt / peak:.0%}"
          + (f" | RSS {mem.get('charnn', 0):.0f} vs {mem.get('pytorch', 0):.0f} MiB" if mem else "")
          + (f" | paths: train {r['paths']['train']}; score {r['paths']['score']}" if r.get("paths") else ""), flush=flush)


if __name__ == "__main__":
    main()

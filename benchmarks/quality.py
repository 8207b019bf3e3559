"""Per-step learning: charnn's trainer against PyTorch's nn.LSTM on the same data.

    pip install -e '.[benchmarks]'
    python benchmarks/quality.py                                   # every corpus found, seed 1
    python benchmarks/quality.py --corpus corpora/shakespeare.txt --steps 400 --checkpoints 200,400
    python benchmarks/quality.py --variants old,defaults,pytorch --seeds 1,2 --json out.json

Both sides see identical data: the corpus is read, split and encoded once by charnn's own
train.prepare_data (character level, the last --val-fraction held out), and cut by
data.Batches into the same contiguous streams, read --seq-len characters a chunk with the
hidden state carried from chunk to chunk and reset to zero at each epoch's start, as
`charnn train` does. Held-out loss is measured the same way on both sides too (data.EvalStreams:
every held-out character after the first predicted once, in --batch-size streams, state
carried), in nats per character.

charnn's side is the real trainer (train.Trainer, what `charnn train` runs, evaluating every
gcd(--checkpoints) steps) with the variant's options (VARIANTS: its defaults, or a few
TrainConfig fields changed; "old" is the defaults before issue 20). PyTorch's side is
nn.LSTM as a user would write it: one-hot input (F.one_hot), nn.LSTM with its own
initialisation (forget bias near 0), an nn.Linear decoder, torch.optim.Adam, global-norm
clipping (clip_grad_norm_), no state resets, a constant rate (pytorch-cosine: charnn's default
cosine schedule over --steps, set by hand each step). Three diagnostic variants start nn.LSTM from other
parameters: pytorch-zero-bias (every bias 0), pytorch-single-bias (b_hh held at 0: one bias
vector per layer, as charnn has; nn.LSTM's two otherwise each take a full Adam step, so its
bias learns twice as fast) and pytorch-charnn (charnn's initial parameters, forget bias 0,
mapped 1:1). Both sides are deterministic for a seed, so the losses
after a fixed number of steps can be compared whatever else runs on the machine.

--seconds S compares at equal wall time instead: each run trains for S seconds (charnn with
--time-limit S, so its default schedule decays over the time; PyTorch until its clock passes
S, pytorch-cosine setting the same schedule by elapsed time), no evaluation in between, then
both are evaluated once. The table gives the steps each side ran and its held-out loss. This
mode is a timing: run nothing else beside it, one run at a time (they are sequential here).

Corpora: --corpus (repeatable); by default every one of these that exists: the shared tiny
Shakespeare (../shared/corpora/tinyshakespeare.txt beside the checkout), the project's
corpora/shakespeare.txt, and corpora/kjv.txt (built by corpora/build_kjv.py, not committed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from charnn.io.data import Batches, EvalStreams  # noqa: E402
from charnn.train import Reporter, TrainConfig, Trainer, prepare_data  # noqa: E402

DEFAULT_CORPORA = [ROOT.parent / "shared" / "corpora" / "tinyshakespeare.txt",
                   ROOT / "corpora" / "shakespeare.txt", ROOT / "corpora" / "kjv.txt"]
# name: TrainConfig fields for charnn ({} = its defaults); "pytorch" is nn.LSTM.
VARIANTS = {
    "old": {"forget_bias": 1.0, "state_reset": 0.01, "lr_schedule": "constant"},  # the defaults before this benchmark
    "fb0": {"forget_bias": 0.0, "lr_schedule": "constant"},
    "fb1": {"forget_bias": 1.0, "lr_schedule": "constant"},
    "sr0": {"state_reset": 0.0, "lr_schedule": "constant"},
    "fb0-sr0": {"forget_bias": 0.0, "state_reset": 0.0, "lr_schedule": "constant"},
    "constant": {"lr_schedule": "constant"},
    "warmup": {"warmup": 50},
    "floor0": {"lr_floor": 0.0},
    "defaults": {},
    "defaults-fb0": {"forget_bias": 0.0},  # the defaults but PyTorch's forget bias
    # one-hot input weights (layer 0's Wx) drawn U(-1, 1) (--input-scale 1), the scale an
    # N(0, 1) embedding of size H gives the gate pre-activations; in0: U(-1/sqrt(H), 1/sqrt(H))
    "defaults-in1": {"input_scale": 1.0},
    "defaults-in0": {"input_scale": 0.0},
    "fb0-in1": {"forget_bias": 0.0, "lr_schedule": "constant", "input_scale": 1.0},
    "pytorch": "pytorch",
    "pytorch-cosine": "pytorch",  # charnn's default schedule (hold 0.6, then cosine to 0.05), set by hand each step
    # diagnostics: nn.LSTM started from other initial parameters
    "pytorch-zero-bias": "pytorch",
    "pytorch-charnn": "pytorch",
    "pytorch-single-bias": "pytorch",
}


class Collect(Reporter):
    def __init__(self, label: str):
        self.val, self.label = {}, label

    def evaluation(self, m, sample):
        self.val[m["step"]] = m["val_loss"]
        print(f"  {self.label}: step {m['step']} {m['val_loss']:.4f}", file=sys.stderr, flush=True)


def base_config(args, corpus: Path, seed: int, out: str | None = None, **kw) -> TrainConfig:
    timed = dict(max_steps=None, time_limit=args.seconds, eval_every=0) if args.seconds else \
        dict(max_steps=args.steps, eval_every=math.gcd(*args.checkpoints))
    return TrainConfig(corpus=str(corpus), layers=args.layers, hidden=args.hidden, batch_size=args.batch_size,
                       seq_len=args.seq_len, lr=args.lr, clip=args.clip, dropout=args.dropout, log_every=10 ** 9,
                       val_fraction=args.val_fraction, seed=seed, device="cpu", sample_length=0, out=out,
                       **timed, **kw)


def run_charnn(args, corpus: Path, seed: int, variant) -> dict:
    kw = dict(variant)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = base_config(args, corpus, seed, out=tmp + "/run", **kw)
        reporter = Collect(f"charnn {kw or 'defaults'}, {corpus.name}, seed {seed}")
        result = Trainer(cfg, Path(cfg.out), reporter=reporter).run()
    if args.seconds:
        return {"steps": result["steps"], "val": result["val_loss"]}
    return {s: reporter.val[s] for s in args.checkpoints}


def run_pytorch(args, corpus: Path, seed: int, init: str = "torch") -> dict:
    import torch
    import torch.nn.functional as F

    cfg = base_config(args, corpus, seed)
    vocab, train_ids, val_ids = prepare_data(cfg)
    V, H, N, T = len(vocab), args.hidden, args.batch_size, args.seq_len
    batches = Batches(train_ids, N, T)
    torch.manual_seed(seed)
    lstm = torch.nn.LSTM(V, H, args.layers, dropout=args.dropout)  # (between layers; and before the head, below)
    head = torch.nn.Linear(H, V)
    if init == "zero-bias":  # PyTorch's weights, every bias 0 (as charnn's, forget gate included)
        with torch.no_grad():
            for name, p in list(lstm.named_parameters()) + [("bias", head.bias)]:
                if "bias" in name:
                    p.zero_()
    elif init == "single-bias":  # PyTorch's init, but one bias vector per layer (b_hh held at 0), as charnn has
        with torch.no_grad():
            for layer in range(args.layers):
                getattr(lstm, f"bias_hh_l{layer}").zero_().requires_grad_(False)
    elif init == "charnn":  # charnn's initial parameters for this seed (forget bias 0), mapped 1:1
        from charnn.nn.model import init_params

        cp = init_params(cfg.model_config(V), seed, forget_bias=0.0)
        with torch.no_grad():
            for layer in range(args.layers):
                getattr(lstm, f"weight_ih_l{layer}").copy_(torch.from_numpy(cp[f"rnn.{layer}.Wx"]))
                getattr(lstm, f"weight_hh_l{layer}").copy_(torch.from_numpy(cp[f"rnn.{layer}.Wh"]))
                getattr(lstm, f"bias_ih_l{layer}").copy_(torch.from_numpy(cp[f"rnn.{layer}.b"]))
                getattr(lstm, f"bias_hh_l{layer}").zero_()
            head.weight.copy_(torch.from_numpy(cp["head.W"]))
            head.bias.copy_(torch.from_numpy(cp["head.b"]))
    params = list(lstm.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=args.lr)
    floor, hold = TrainConfig.lr_floor, TrainConfig.lr_hold

    def rate(done: float) -> float:  # charnn's default schedule (train.Trainer.lr_factor), for "pytorch-cosine"
        x = max(min(done, 1.0) - hold, 0.0) / (1.0 - hold)  # done: the fraction of the steps or seconds run
        return args.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * x)))

    def logits(x, state, train=False):
        out, state = lstm(F.one_hot(torch.from_numpy(x), V).float(), state)  # (T, N, H)
        return head(F.dropout(out, args.dropout, train)), state

    def evaluate() -> float:
        streams = EvalStreams(val_ids, N, T)
        state, total = None, 0.0
        lstm.eval()
        with torch.no_grad():
            for k in range(len(streams)):
                x, y, w = streams.chunk(k)
                z, state = logits(x, state)
                nll = F.cross_entropy(z.reshape(-1, V), torch.from_numpy(y).reshape(-1), reduction="none")
                total += float((nll.double() * torch.from_numpy(w).reshape(-1)).sum())
        lstm.train()
        return total / streams.predictions

    val, state, chunk, step = {}, None, 0, 0
    started = time.perf_counter()
    while (time.perf_counter() - started < args.seconds) if args.seconds else step < args.steps:
        step += 1
        if chunk >= len(batches):
            chunk, state = 0, None  # a new epoch starts every stream from zero, as charnn's trainer does
        x, y = batches.chunk(chunk)
        chunk += 1
        z, state = logits(x, state, train=True)
        state = tuple(s.detach() for s in state)
        loss = F.cross_entropy(z.reshape(-1, V), torch.from_numpy(y).reshape(-1))
        if init == "cosine":
            done = (time.perf_counter() - started) / args.seconds if args.seconds else (step - 1) / args.steps
            for group in opt.param_groups:
                group["lr"] = rate(done)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        if not args.seconds and step in args.checkpoints:
            val[step] = evaluate()
            print(f"  pytorch ({init} init), {corpus.name}, seed {seed}: step {step} {val[step]:.4f}", file=sys.stderr, flush=True)
    if args.seconds:
        return {"steps": step, "val": evaluate()}
    return val


def int_list(text: str) -> list:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", action="append", type=Path, help="a text file (repeatable) [every default corpus found]")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seconds", type=float, default=None,
                    help="train each run for this many seconds instead of --steps (equal wall time; a timing)")
    ap.add_argument("--checkpoints", type=int_list, default=None, help="steps to report [200, 400, 800, ... up to --steps, and --steps]")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=100)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--clip", type=float, default=5.0)
    ap.add_argument("--dropout", type=float, default=0.0, help="on each layer's output, as charnn's --dropout")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--seeds", type=int_list, default=[1])
    ap.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS),
                    help=f"comma-separated, of {', '.join(VARIANTS)} [all]")
    ap.add_argument("--threads", type=int, default=2, help="PyTorch's intra-op threads")
    ap.add_argument("--json", type=Path, help="append one JSON line per result to this file")
    args = ap.parse_args(argv)
    args.checkpoints = sorted(set(args.checkpoints or [200 * 2 ** k for k in range(12)]) | {args.steps})
    args.checkpoints = [s for s in args.checkpoints if 0 < s <= args.steps]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants: {', '.join(unknown)}")
    if args.corpus:
        corpora = args.corpus
        missing = [str(c) for c in corpora if not c.exists()]
        if missing:
            ap.error(f"no such corpus: {', '.join(missing)}")
    else:
        corpora = []
        for c in DEFAULT_CORPORA:
            if c.exists() and c.resolve() not in [d.resolve() for d in corpora]:
                corpora.append(c)
            elif not c.exists():
                print(f"skipped (absent): {c}", file=sys.stderr)
    if any(v.startswith("pytorch") for v in args.variants):
        import torch

        torch.set_num_threads(args.threads)
    budget = f"{args.seconds:g} s each" if args.seconds else f"{args.steps} steps"
    print(f"{args.layers}x{args.hidden} LSTM, one-hot input, batch {args.batch_size}, sequence {args.seq_len}, "
          f"Adam {args.lr:g}, clip {args.clip:g}, dropout {args.dropout:g}, {budget}; held-out nats/char", flush=True)
    heads = ["steps run", "held-out"] if args.seconds else [f"step {s}" for s in args.checkpoints]
    print(f"| corpus | seed | variant | {' | '.join(heads)} |\n|---|---|---|" + "---|" * len(heads), flush=True)
    for corpus in corpora:
        for seed in args.seeds:
            for name in args.variants:
                v = VARIANTS[name]
                val = (run_pytorch(args, corpus, seed, name.partition("-")[2] or "torch") if v == "pytorch"
                       else run_charnn(args, corpus, seed, v))
                cells = [str(val["steps"]), f"{val['val']:.4f}"] if args.seconds else \
                    [f"{val[s]:.4f}" for s in args.checkpoints]
                print(f"| {corpus.name} | {seed} | {name} | {' | '.join(cells)} |", flush=True)
                if args.json:
                    with open(args.json, "a", encoding="utf-8") as f:
                        f.write(json.dumps({"corpus": str(corpus), "seed": seed, "variant": name, "steps": None if args.seconds else args.steps,
                                            "layers": args.layers, "hidden": args.hidden, "batch_size": args.batch_size,
                                            "seq_len": args.seq_len, "lr": args.lr, "clip": args.clip, "dropout": args.dropout,
                                            "seconds": args.seconds,
                                            "val": val if args.seconds else {str(s): val[s] for s in args.checkpoints}})
                            + "\n")


if __name__ == "__main__":
    main()

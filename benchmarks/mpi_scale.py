"""Data-parallel training: one process with two threads against `mpiexec -n 2` with one thread
each, on this machine, and a cost model that projects to clusters.

    pip install -e '.[mpi,benchmarks]'
    python benchmarks/mpi_scale.py                        # configurations b and d, 3 blocks a side
    python benchmarks/mpi_scale.py --configs b --blocks 5 --steps 4 --json mpi.json
    python benchmarks/mpi_scale.py --project-only --measured mpi.json   # the table again

**Measured.** Each side trains bench.py's configuration (its CONFIGS and token stream) with the
training step `charnn train` takes: `loss_and_grads` with the sparse embedding gradient, the
global-norm clip and Adam; the MPI side as the Trainer does it (dist.StepSync: one Allreduce a
step over one buffer, the norm and scale over the sum). The sides take turns, block by block
(one, mpi, mpi, one, ...), each block a fresh launch that times ``--steps`` steps after one
untimed step; the figures are medians over the blocks of each block's median step.

    one   CHARNN_THREADS=2, OMP/OPENBLAS/MKL/NUMBA threads 2: the batch split in two threads
    mpi   mpiexec -n 2, each rank CHARNN_THREADS=1 and one thread of everything, N/2 streams

For the MPI side: the time a step spends in MPI_Allreduce on rank 0 (which includes waiting for
the slower rank), that wait (the other rank's longer compute, from the per-step times of both),
and the bytes the buffer holds (gradients, the embedding's row flags, loss and two flags).

**Projected.** Nodes of 16 cores, each running the same data-parallel step on its share, with
a ring allreduce between nodes of

    t_allreduce = 2 (P - 1) / P * bytes / bandwidth + 2 (P - 1) * latency       (P nodes)

and no overlap of communication with compute (charnn reduces after the backward pass). The
assumptions, all stated in the output: a node computes ``--node-speedup`` (default 8 = 16/2)
times the measured two-core single-process rate (linear in cores: optimistic); each node
takes ``--node-batch`` (default 8) times the configuration's batch, so a node's step takes
the measured two-core step time (weak scaling: the global batch grows with the nodes);
``--latency`` 20 us a ring step. The 30,000-word model is configuration d with a 30,000-word
full softmax: its bytes from its parameter count, its compute per token (d)'s measured one
times the ratio of their FLOPs per token (bench.flops_per_token).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if os.environ.get("OPENBLAS_CORETYPE") or os.environ.get("OPENBLAS_L2_SIZE"):
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    os.execve(sys.executable, [sys.executable] + sys.argv, env)

import numpy  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import CONFIGS, flops_per_token, token_stream  # noqa: E402

WORD30K = ("word", "lstm", 2, 200, 20, 35, 30000, 200)
THREAD_VARIABLES = ("CHARNN_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
LAUNCH_VARIABLES = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")


# ----- one block, in a worker process (or each rank of one) -----

def worker(name: str, steps: int) -> dict | None:
    from charnn import dist
    from charnn.io.data import Batches
    from charnn.nn.model import LanguageModel, ModelConfig
    from charnn.nn.optim import clip_scale, global_norm, make_optimizer

    level, cell, L, H, N, T, V, E = CONFIGS[name]
    world = dist.world_from_env()
    K = world.size
    model = LanguageModel.create(ModelConfig(vocab_size=V, cell=cell, layers=L, hidden=H, embed=E), 0)
    opt = make_optimizer("adam", model.params, 2e-3, model.ops)
    batches = Batches(token_stream(V, N * (T * (steps + 1) + 1)), N, T, part=world.part(N))
    sync = dist.StepSync(world.reducer(numpy), model.params, n_flags=2) if K > 1 else None
    state, step_s, reduce_s, compute_s = None, [], [], []
    for k in range(steps + 1):
        x, y = batches.chunk(k)
        t0 = time.perf_counter()
        loss, grads, state = model.loss_and_grads(x, y, state, sparse=True)
        t1 = time.perf_counter()
        if sync is None:
            scale = clip_scale(global_norm(grads, model.ops), 5.0)
        else:
            before = sync.reducer.seconds
            grads, loss, _ = sync.reduce(grads, loss, (0.0, 0.0))
            reduced = sync.reducer.seconds - before
            norm = global_norm(grads, model.ops) / K
            scale = clip_scale(norm, 5.0) * (1.0 / K)
        opt.step(grads, scale)
        float(loss)
        t2 = time.perf_counter()
        if k:  # the first step is not timed
            step_s.append(t2 - t0)
            compute_s.append(t1 - t0)
            reduce_s.append(reduced if sync else 0.0)
    everyone = world.gather(compute_s)
    if not world.root:
        return None
    slowest = numpy.max(numpy.array(everyone), axis=0)
    wait = numpy.maximum(0.0, slowest - numpy.array(compute_s))
    return {"config": name, "ranks": K, "tokens_per_step": N * T, "step_s": float(numpy.median(step_s)),
            "allreduce_s": float(numpy.median(reduce_s)), "wait_s": float(numpy.median(wait)) if K > 1 else 0.0,
            "bytes": int(sync.packer.buf.nbytes) if sync else 0}


# ----- the parent: launches, alternating -----

def launch(side: str, name: str, steps: int, mpiexec: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    threads = "2" if side == "one" else "1"
    env.update({k: threads for k in THREAD_VARIABLES})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--steps", str(steps)]
    if side == "mpi":
        cmd = [mpiexec, "-n", "2"] + cmd
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{side} {name}: exit {done.returncode}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(names, blocks: int, steps: dict, mpiexec: str) -> dict:
    out = {}
    for name in names:
        runs = {"one": [], "mpi": []}
        for b in range(blocks):
            for side in (("one", "mpi") if b % 2 == 0 else ("mpi", "one")):
                r = launch(side, name, steps[name], mpiexec)
                runs[side].append(r)
                print(f"  {name} block {b + 1} {side}: {r['tokens_per_step'] / r['step_s']:,.0f} tok/s"
                      + (f", allreduce {r['allreduce_s'] * 1e3:.1f} ms (wait {r['wait_s'] * 1e3:.1f})" if side == "mpi" else ""),
                      file=sys.stderr, flush=True)
        med = {side: {k: float(numpy.median([r[k] for r in rs])) for k in ("step_s", "allreduce_s", "wait_s", "bytes")}
               for side, rs in runs.items()}
        tps = runs["one"][0]["tokens_per_step"]
        out[name] = {"tokens_per_step": tps, "one": med["one"], "mpi": med["mpi"], "blocks": runs,
                     "one_tok_s": tps / med["one"]["step_s"], "mpi_tok_s": tps / med["mpi"]["step_s"]}
    return out


def print_measured(measured: dict):
    print("\nmeasured on this machine (medians of blocks):")
    print(f"{'config':8} {'1 proc x 2 thr':>15} {'mpiexec -n 2':>13} {'ratio':>6} {'step ms':>8} {'allreduce ms':>13} "
          f"{'of it waiting':>14} {'MB/step':>8}")
    for name, m in measured.items():
        print(f"{name:8} {m['one_tok_s']:>11,.0f} t/s {m['mpi_tok_s']:>9,.0f} t/s {m['mpi_tok_s'] / m['one_tok_s']:>6.3f} "
              f"{m['mpi']['step_s'] * 1e3:>8.1f} {m['mpi']['allreduce_s'] * 1e3:>13.2f} {m['mpi']['wait_s'] * 1e3:>14.2f} "
              f"{m['mpi']['bytes'] / 1e6:>8.2f}")


# ----- the cost model -----

def buffer_bytes(cfg) -> int:
    """Bytes of the float32 gradient buffer of a configuration (dist.GradientBuffer)."""
    from charnn.nn.model import ModelConfig

    level, cell, L, H, N, T, V, E = cfg
    n = ModelConfig(vocab_size=V, cell=cell, layers=L, hidden=H, embed=E).n_params()
    return 4 * (n + (V if E else 0) + 3)


def project(measured: dict, nodes=(8, 64), gbps=(10, 25, 100), node_speedup=8.0, node_batch=8, latency=20e-6):
    rows = []
    models = [(n, CONFIGS[n], measured[n]["one"]["step_s"] / measured[n]["tokens_per_step"]) for n in measured]
    if "d" in measured:
        sec_tok_d = measured["d"]["one"]["step_s"] / measured["d"]["tokens_per_step"]
        models.append(("word30k", WORD30K, sec_tok_d * flops_per_token(WORD30K) / flops_per_token(CONFIGS["d"])))
    print(f"\nprojected: nodes of 16 cores computing {node_speedup:g}x the measured 2-core rate, each on {node_batch}x "
          f"the configuration's batch (weak scaling); ring allreduce, {latency * 1e6:g} us a ring step, no overlap")
    print(f"{'model':8} {'MB/step':>8} {'node step':>10} {'Gb/s':>5} " + " ".join(f"{f'{P} nodes tok/s':>16} {'eff':>5}" for P in nodes))
    for name, cfg, sec_tok in models:
        level, cell, L, H, N, T, V, E = cfg
        nbytes = buffer_bytes(cfg)
        node_tokens = node_batch * N * T
        t_compute = node_tokens * sec_tok / node_speedup
        for g in gbps:
            bw = g * 1e9 / 8
            cells = []
            row = {"model": name, "bytes": nbytes, "node_step_s": t_compute, "gbps": g}
            for P in nodes:
                t_ar = 2 * (P - 1) / P * nbytes / bw + 2 * (P - 1) * latency
                eff = t_compute / (t_compute + t_ar)
                tok_s = P * node_tokens / (t_compute + t_ar)
                row[f"{P}_tok_s"], row[f"{P}_eff"] = tok_s, eff
                cells.append(f"{tok_s:>16,.0f} {eff:>5.0%}")
            rows.append(row)
            print(f"{name:8} {nbytes / 1e6:>8.2f} {t_compute * 1e3:>8.0f}ms {g:>5} " + " ".join(cells))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="b,d")
    ap.add_argument("--blocks", type=int, default=3, help="blocks a side (launches), alternating")
    ap.add_argument("--steps", default="b=3,d=20", help="timed steps a block, per configuration")
    ap.add_argument("--json", help="write the measurements and the projection here")
    ap.add_argument("--project-only", action="store_true", help="no measuring: project from --measured")
    ap.add_argument("--measured", help="a --json file of an earlier run")
    ap.add_argument("--node-speedup", type=float, default=8.0)
    ap.add_argument("--node-batch", type=int, default=8)
    ap.add_argument("--latency", type=float, default=20e-6)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:  # (launched by measure: --steps is a number)
        r = worker(args.worker, int(args.steps))
        if r is not None:
            print(json.dumps(r))
        return
    steps = {k: int(v) for k, v in (kv.split("=") for kv in args.steps.split(","))}
    if args.project_only:
        measured = json.loads(Path(args.measured).read_text())["measured"]
    else:
        mpiexec = shutil.which("mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
        if mpiexec is None:
            raise SystemExit("no mpiexec: pip install -e '.[mpi]'")
        print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}", file=sys.stderr)
        names = args.configs.split(",")
        measured = measure(names, args.blocks, {n: steps.get(n, 3) for n in names}, mpiexec)
        print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}", file=sys.stderr)
    print_measured(measured)
    rows = project(measured, node_speedup=args.node_speedup, node_batch=args.node_batch, latency=args.latency)
    if args.json:
        Path(args.json).write_text(json.dumps({"measured": measured, "projection": rows}, indent=1))


if __name__ == "__main__":
    main()

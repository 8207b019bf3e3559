"""Mutation testing for the core maths: plant small bugs, one at a time, and see which the suite
lets live. Not part of the suite (too slow for CI); run it before a change to the maths lands:

    python tests/mutate.py                       # the curated mutants and 40 random ones
    python tests/mutate.py --random 0            # the curated list only
    python tests/mutate.py --random 100 --seed 3 --only engine/kernels.py

Each mutant is applied to a copy of the package in a temporary folder (the checkout is never
touched), and the fast maths tests (TESTS below) run against it with -x; a mutant is killed
when they fail. The random mutants swap one operator in the core maths modules (+ and -, *
and /, += and -=, < and <=, > and >=) or nudge one numeric constant, chosen with a fixed seed.
The engine's compiled-code cache is keyed by its sources (charnn/engine/__init__.py), so a
mutated kernel is compiled afresh, never served stale.

Survivors are printed at the end; tests/README.md lists the last run's and what was done with
each (killed by a new test, or explained: an equivalent mutant, or a path these tests do not
reach).
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ["tests/test_engine.py", "tests/test_cells.py", "tests/test_gradcheck.py", "tests/test_optim.py",
         "tests/test_kernels.py", "tests/test_state_carry.py", "tests/test_rowsplit.py", "tests/test_deferred.py",
         "tests/test_cell_registry.py", "tests/test_functional.py"]
MODULES = ["nn/cells.py", "nn/functional.py", "nn/optim.py", "nn/model.py", "engine/kernels.py", "engine/layers.py",
           "engine/heads.py", "engine/cpu.py", "engine/loops.py"]

# (file under charnn/, the exact text, its replacement, what the bug is[, the tests to run
# instead of TESTS]). The issue-21 classes: biases dropped, a wrong scale, a state not carried,
# a state of the wrong step, saves that are not atomic.
CURATED = [
    ("engine/kernels.py", "                hn[j, n] = hp[2 * H + j, n] + bhn[j]", "                hn[j, n] = hp[2 * H + j, n]",
     "GRU kernel (flat) drops bhn"),
    ("engine/kernels.py", "                hnj = hp[2 * H + j, n] + bhn[j]", "                hnj = hp[2 * H + j, n]",
     "GRU kernel (columns) drops bhn"),
    ("engine/heads.py", "scale = numpy.full(M, 1.0 / denom, dtype=P.dtype)", "scale = numpy.full(M, 1.0 / M, dtype=P.dtype)",
     "fused softmax gradient scaled by 1/M, not 1/denom"),
    ("train.py", "loss, grads, self.state = model.loss_and_grads(x, y, self.state, rng=self.rng, sparse=True)",
     "loss, grads, self.state = model.loss_and_grads(x, y, None, rng=self.rng, sparse=True)",
     "training restarts every chunk from a zero state"),
    ("engine/loops.py", "c = cs[T - 1 if store else (T - 1) % 2].copy()", "c = cs[max(T - 2, 0) if store else (T - 1) % 2].copy()",
     "compiled loop returns the cell state of step T-2"),
    ("nn/cells.py", "        xp.add(HP[2 * H:], bhn[:, None], out=hn)", "        xp.add(HP[2 * H:], 0 * bhn[:, None], out=hn)",
     "reference GRU drops bhn"),
    ("nn/cells.py", "    return dXP, _recurrent_weight_grad(dXP, h0, hs, xp), {}, dh_next, dc",
     "    return dXP, _recurrent_weight_grad(dXP, h0, hs, xp), {}, dh_next, 0 * dc", "reference LSTM loses dc0"),
    ("engine/layers.py", "        numpy.matmul(dR[r, 0], h0.T, out=dWh[r])", "        numpy.matmul(dR[r, 0], 0 * h0.T, out=dWh[r])",
     "engine dWh misses the h0 term"),
    ("nn/optim.py", "        v *= self.b2", "        v *= self.b1", "Adam's second moment decays with beta1"),
    ("engine/cpu.py", "                kernels.adam_update(p, g, m, v, step, inv, F(opt.b1), F(opt.b2), F(opt.eps), gscale)",
     "                kernels.adam_update(p, g, m, v, step, inv, F(opt.b1), F(opt.b2), F(opt.eps), F(1.0))",
     "fused Adam ignores the clipping scale"),
    ("engine/parallel.py", '        cache["head"]["denom"] = float(T * N)', '        cache["head"]["denom"] = float(T * (b - a))',
     "batch split: each half's gradient divided by its own tokens"),
    ("nn/model.py", "                hs = hs * mask", "                hs = hs", "dropout mask not applied in forward"),
    ("nn/functional.py", "    return to_device(keep.astype(dtype) / (1.0 - p), xp)", "    return to_device(keep.astype(dtype), xp)",
     "dropout not inverted (no 1/(1-p))"),
    ("io/fileio.py", '    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)',
     "    fd, tmp = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666), str(path)",
     "saves written in place, not atomically", ["tests/test_train_saves.py::test_kill_inside_a_save"]),
]

SWAPS = {ast.Add: (" + ", " - "), ast.Sub: (" - ", " + "), ast.Mult: (" * ", " / "), ast.Div: (" / ", " * ")}
AUG = {ast.Add: ("+=", "-="), ast.Sub: ("-=", "+="), ast.Mult: ("*=", "/="), ast.Div: ("/=", "*=")}
CMP = {ast.Lt: ("<", "<="), ast.LtE: ("<=", "<"), ast.Gt: (">", ">="), ast.GtE: (">=", ">")}


def random_mutants(rel: str, rng: random.Random, n: int) -> list:
    """Up to n single-token mutants of charnn/REL as (rel, line number, old line, new line, what)."""
    src = (ROOT / "charnn" / rel).read_text(encoding="utf-8")
    lines = src.splitlines()
    found = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.BinOp) and type(node.op) in SWAPS:
            old, new = SWAPS[type(node.op)]
        elif isinstance(node, ast.AugAssign) and type(node.op) in AUG:
            old, new = AUG[type(node.op)]
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in CMP:
            old, new = CMP[type(node.ops[0])]
            old, new = f" {old} ", f" {new} "
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float) and not isinstance(node.value, bool):
            if node.lineno != node.end_lineno:
                continue
            line = lines[node.lineno - 1]
            text = line[node.col_offset:node.end_col_offset]
            value = node.value + 1 if isinstance(node.value, int) else node.value * 1.5 + 0.25
            found.append((rel, node.lineno, line, line[:node.col_offset] + repr(value) + line[node.end_col_offset:],
                          f"constant {text} -> {value!r}"))
            continue
        else:
            continue
        line = lines[node.lineno - 1]
        if line.count(old) != 1 or line.lstrip().startswith(("#", '"')):
            continue
        found.append((rel, node.lineno, line, line.replace(old, new), f"{old.strip()} -> {new.strip()}"))
    rng.shuffle(found)
    return found[:n]


def run_mutant(rel: str, old: str, new: str, tests: list, timeout: float, lineno: int | None = None) -> tuple:
    with tempfile.TemporaryDirectory(prefix="charnn-mutant-") as tmp:
        shutil.copytree(ROOT / "charnn", Path(tmp) / "charnn", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(ROOT / "tests", Path(tmp) / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        target = Path(tmp) / "charnn" / rel
        src = target.read_text(encoding="utf-8")
        if lineno is not None:  # a random mutant: that line only
            lines = src.split("\n")
            if lines[lineno - 1] != old:
                return "not applied", "the line changed"
            lines[lineno - 1] = new
            target.write_text("\n".join(lines), encoding="utf-8")
        elif src.count(old) != 1:
            return "not applied", f"the text occurs {src.count(old)} times"
        else:
            target.write_text(src.replace(old, new), encoding="utf-8")
        env = dict(os.environ, PYTHONPATH=tmp, XDG_CACHE_HOME=os.path.join(tmp, "cache"))
        t = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                  cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "killed", f"timed out after {timeout:.0f} s"
        failed = [ln.split(" ")[1] for ln in proc.stdout.splitlines() if ln.startswith("FAILED ")]
        verdict = "survived" if proc.returncode == 0 else "killed"
        return verdict, (failed[0] if failed else f"exit {proc.returncode}") + f" ({time.monotonic() - t:.0f} s)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--random", type=int, default=40, help="random operator/constant mutants (spread over MODULES)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", default=None, help="one module under charnn/ for the random mutants")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    mutants = [(rel, None, old, new, what, *tests) for rel, old, new, what, *tests in CURATED]
    modules = [args.only] if args.only else MODULES
    per = -(-args.random // len(modules)) if args.random else 0
    for rel in modules:
        mutants += random_mutants(rel, rng, per)
    mutants = mutants[:len(CURATED) + args.random]
    survivors = []
    for k, (rel, lineno, old, new, what, *tests) in enumerate(mutants, 1):
        verdict, detail = run_mutant(rel, old, new, tests[0] if tests else TESTS, args.timeout, lineno)
        where = f"{rel}:{lineno}" if lineno else rel
        print(f"{k:3} {verdict:11} {where:24} {what:48} {detail}", flush=True)
        if verdict == "survived":
            survivors.append((where, what, new.strip()))
    print(f"\n{len(mutants)} mutants, {len(survivors)} survived")
    for where, what, line in survivors:
        print(f"  {where}  {what}:  {line}")


if __name__ == "__main__":
    main()

"""Whole-process start-up times of charnn commands, one or more source trees side by side.

Each round runs every command once per tree and setting, in turn, so old and new meet the same
noise; the figures are medians (and the fastest) over the rounds. A process is timed from its
start to its exit, stdout and stderr discarded.

    python benchmarks/startup.py                           this tree, warm caches, 9 rounds
    python benchmarks/startup.py /tmp/charnn-old .         an older checkout against this one
    python benchmarks/startup.py . --cold                  one run with empty caches first

Python's bytecode goes to a folder of this script's own (PYTHONPYCACHEPREFIX), as an installed
package has its .pyc files; the first, untimed round of each command fills it and the compiled-code
caches. ``--cold`` runs each command once more before that, with an empty cache folder
(XDG_CACHE_HOME: numba's cache and charnn's compiled products), and reports that run alone.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "help": (["--help"], None),
    "score": (["score", "-"], "hello\n"),  # one five-character line, the bundled model
    "sample": (["sample", "--length", "1", "--seed", "1"], None),
}
SETTINGS = {"default": {}, "CHARNN_PACKED=0": {"CHARNN_PACKED": "0"}}


def run_once(tree: Path, args, stdin, env) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "charnn", *args], input=stdin, text=True, env=env, cwd=tree,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    took = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{tree}: charnn {' '.join(args)} exited {done.returncode}: {done.stderr.strip()[-400:]}")
    return took


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs="*", default=["."], help="charnn checkouts (their roots) [.]")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--commands", default=",".join(COMMANDS), help=f"of {', '.join(COMMANDS)}")
    ap.add_argument("--settings", default=",".join(SETTINGS), help=f"of {', '.join(SETTINGS)}")
    ap.add_argument("--cold", action="store_true", help="first one run of each with empty caches")
    a = ap.parse_args()
    trees = [Path(t).resolve() for t in a.trees]
    commands = a.commands.split(",")
    settings = a.settings.split(",")
    with tempfile.TemporaryDirectory(prefix="charnn-startup-") as tmp:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CHARNN_")
                and k not in ("PYTHONDONTWRITEBYTECODE", "NUMBA_CACHE_DIR", "PYTHONPATH")}
        base["PYTHONPYCACHEPREFIX"] = str(Path(tmp) / "pyc")

        def env_for(tree, setting, cache):
            return {**base, **SETTINGS[setting], "PYTHONPATH": str(tree), "XDG_CACHE_HOME": cache}

        cells = [(c, s, t) for c in commands for s in settings for t in trees]
        warm = {t: str(Path(tmp) / f"cache{i}") for i, t in enumerate(trees)}
        if a.cold:
            print("cold caches (one run each):")
            for c, s, t in cells:
                args, stdin = COMMANDS[c]
                cold = tempfile.mkdtemp(dir=tmp)
                # Bytecode first, so the cold run measures the compiled-code caches alone.
                run_once(t, ["--version"], None, env_for(t, s, cold))
                print(f"  {c:7s} {s:16s} {t}: {run_once(t, args, stdin, env_for(t, s, cold)):.2f} s")
        for c, s, t in cells:  # untimed: fills the bytecode and the warm caches
            args, stdin = COMMANDS[c]
            run_once(t, args, stdin, env_for(t, s, warm[t]))
        times = {cell: [] for cell in cells}
        for _ in range(a.rounds):
            for cell in cells:
                c, s, t = cell
                args, stdin = COMMANDS[c]
                times[cell].append(run_once(t, args, stdin, env_for(t, s, warm[t])))
        print(f"warm caches, {a.rounds} rounds (median, fastest):")
        for (c, s, t), ts in times.items():
            print(f"  {c:7s} {s:16s} {t}: {statistics.median(ts):.3f} s  {min(ts):.3f} s")


if __name__ == "__main__":
    main()

"""Peak memory of `charnn train` against corpus size.

    python benchmarks/scale.py --sizes 10,100,1000      # MB of generated text

For each size, writes a text file of random English-like words (a fixed seed; character level,
about 30 distinct characters), then runs `charnn train` on it in a fresh process for a few
steps (a small LSTM, no validation) and reports the child's peak resident memory (ru_maxrss)
next to the size of the token array (one uint8 per character) and the model. The corpus is
streamed: a vocabulary pass, then an encoding pass into a memory-mapped token cache, so the
peak should grow with the token array at most, not with the text as Python strings.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but "
         "have an they you were her she there been one all we their has would when if so no what more out up "
         "king lord love night day heart death man good time sweet").split()


def make_corpus(path: Path, megabytes: int, seed: int = 0):
    rng = numpy.random.default_rng(seed)
    words = numpy.array(WORDS)
    target = megabytes * 1_000_000
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            picks = words[rng.integers(0, len(words), 200_000)]
            lines = [" ".join(picks[i:i + 12]) for i in range(0, len(picks), 12)]
            block = "\n".join(lines) + "\n"
            f.write(block)
            written += len(block)


WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.stderr.write(r.stderr)")


def peak_rss_mb(cmd) -> float:
    """Peak resident memory (MiB) of ``cmd``, run in a fresh process."""
    r = subprocess.run([sys.executable, "-c", WRAP, *cmd], capture_output=True, text=True)
    code, kib = r.stdout.split()
    if int(code) != 0:
        sys.exit(f"failed: {' '.join(cmd)}: {r.stderr.strip()}")
    return int(kib) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100,1000", help="Corpus sizes in MB.")
    ap.add_argument("--workdir", default=None, help="Where to write the corpora (default: a temp folder).")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="charnn-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{'corpus':>8} {'token array':>12} {'peak RSS':>10} {'time':>7}")
    for mb in [1] + [int(s) for s in args.sizes.split(",")]:
        corpus = work / f"corpus-{mb}mb.txt"
        if not corpus.exists():
            make_corpus(corpus, mb)
        out = work / f"run-{mb}mb"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        t = time.perf_counter()
        peak = peak_rss_mb([sys.executable, "-m", "charnn.cli", "train", str(corpus), "--out", str(out), "--layers", "1",
                            "--hidden", "64", "--max-steps", "5", "--eval-every", "5", "--val-fraction", "0", "--quiet"])
        seconds = time.perf_counter() - t
        tokens = corpus.stat().st_size  # ASCII: one uint8 token per byte
        print(f"{mb:>6}MB {tokens / 2**20:>10.0f}MB {peak:>8.0f}MB {seconds:>6.0f}s", flush=True)
    print("(the 1 MB run shows the fixed cost: Python, NumPy, numba and the model)")


if __name__ == "__main__":
    if os.environ.get("OPENBLAS_CORETYPE") or os.environ.get("OPENBLAS_L2_SIZE"):
        os.environ.pop("OPENBLAS_CORETYPE", None)
        os.environ.pop("OPENBLAS_L2_SIZE", None)
    main()

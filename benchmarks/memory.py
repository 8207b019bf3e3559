"""The memory estimate (charnn/memory.py) against the peak resident memory of real commands.

    python benchmarks/memory.py                 # every configuration below
    python benchmarks/memory.py --only train    # those of one command

Each configuration runs in a fresh process: charnn's command line in-process, with
memory.check wrapped to record the process's resident memory at the check and the estimate it
checked (the last check of the command, which sees the real vocabulary); at exit the process's
peak resident memory (VmHWM) is reported. "predicted" is resident-at-check + estimate, what
the check compares with --max-memory; "ratio" is predicted / peak (above 1: the estimate is
generous). A corpus of random words (about 30 distinct characters) is written once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys
from charnn import memory
from charnn.cli import cli
seen = []
real = memory.check
def check(need, subject, max_memory=None):
    seen.append((memory.resident(), need.bytes))
    return real(need, subject, max_memory)
memory.check = check
try:
    cli.main(sys.argv[2:], prog_name="charnn", standalone_mode=False)
    code = 0
except SystemExit as e:
    code = e.code or 0
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the forking process.
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "checks": seen, "peak": peak}, f)
"""

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but "
         "have an they you were her she there been one all we their has would when if so no what more out up "
         "king lord love night day heart death man good time sweet").split()


def corpus(path: Path, megabytes: float):
    import random

    r = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        written = 0
        while written < megabytes * 1e6:
            line = " ".join(r.choice(WORDS) for _ in range(12)) + "\n"
            f.write(line)
            written += len(line)


def configurations(work: Path):
    text = work / "corpus.txt"
    if not text.exists():
        corpus(text, 1)

    def run(name, val="0.02"):  # (a small validation part for the wide models: it is evaluated)
        return ["--out", str(work / name), "--max-steps", "2", "--eval-every", "2", "--val-fraction", val,
                "--sample-length", "0", "-q", "--device", "cpu"]

    model = work / "model"
    out = [
        ("train", "tiny 1x16", ["train", str(text), "--hidden", "16", "--layers", "1", *run("a")]),
        ("train", "default 2x256 lstm", ["train", str(text), *run("b")]),
        ("train", "2x512 lstm N64 T100", ["train", str(text), "--hidden", "512", "--batch-size", "64",
                                          "--seq-len", "100", *run("c")]),
        ("train", "2x256 lstm N256 T200", ["train", str(text), "--batch-size", "256", "--seq-len", "200", *run("d")]),
        ("train", "2x256 gru N256 T200", ["train", str(text), "--cell", "gru", "--batch-size", "256",
                                          "--seq-len", "200", *run("e")]),
        ("train", "2x256 rnn N256 T200", ["train", str(text), "--cell", "rnn", "--batch-size", "256",
                                          "--seq-len", "200", *run("f")]),
        ("train", "3x256 lstm dropout N128", ["train", str(text), "--layers", "3", "--dropout", "0.3",
                                              "--batch-size", "128", "--seq-len", "100", *run("g")]),
        ("train", "2x1792 lstm N4 (parameters)", ["train", str(text), "--hidden", "1792", "--batch-size", "4",
                                                  "--seq-len", "8", *run("h", "0.0005")]),
        ("train", "2x1792 lstm sgd N4", ["train", str(text), "--hidden", "1792", "--batch-size", "4",
                                         "--seq-len", "8", "--optimizer", "sgd", *run("i", "0.0005")]),
        ("train", "word 2x200 embed 200 N20 T35", ["train", str(text), "--level", "word", "--embed", "200",
                                                   "--hidden", "200", "--batch-size", "20", "--seq-len", "35",
                                                   *run("j")]),
        ("train", "model for the rest", ["train", str(text), *run("model")]),
        ("gradcheck", "lstm, the defaults", ["gradcheck", "--cell", "lstm", "-q"]),
        ("gradcheck", "seq-len 20000", ["gradcheck", "--cell", "lstm", "--layers", "1", "--embed", "0",
                                        "--level", "char", "--seq-len", "20000", "--max-elements", "1", "-q"]),
        ("gradcheck", "hidden 600 batch 200", ["gradcheck", "--cell", "gru", "--layers", "1", "--embed", "0",
                                               "--level", "char", "--hidden", "600", "--batch-size", "200",
                                               "--max-elements", "1", "-q"]),
        ("sample", "beam 5", ["sample", str(model), "--beam-size", "5", "-n", "200", "--device", "cpu"]),
        ("sample", "beam 2000", ["sample", str(model), "--beam-size", "2000", "-n", "100", "--device", "cpu"]),
        ("sample", "beam 20000 no guard", ["sample", str(model), "--beam-size", "20000", "-n", "30",
                                           "--no-repeat-ngram", "0", "--device", "cpu"]),
        ("score", "lines, batch 64", ["score", str(model), str(text), "--device", "cpu", "-q", "--format", "jsonl"]),
        ("score", "document, 1024 streams", ["score", str(model), str(text), "--document", "--streams", "1024",
                                             "--device", "cpu", "-q"]),
    ]
    return out


def measure(argv) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as f:
        r = subprocess.run([sys.executable, "-c", CHILD, f.name, *argv], capture_output=True, text=True)
        try:
            return json.load(f)
        except ValueError:
            sys.exit(f"failed: {' '.join(argv)}: {r.stderr.strip()[-500:]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="train, gradcheck, sample or score (comma-separated)")
    ap.add_argument("--workdir", default=None, help="Where to write the corpus and runs (default: a temp folder).")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="charnn-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{'command':<10} {'configuration':<32} {'at check':>9} {'estimate':>9} {'predicted':>10} {'peak':>8} {'ratio':>6}")
    for command, label, argv in configurations(work):
        if args.only and command not in args.only.split(","):
            if label == "model for the rest" and not (work / "model").exists():
                measure(argv)  # sample and score read it
            continue
        r = measure(argv)
        if r["code"] != 0:
            sys.exit(f"{label}: exit {r['code']}")
        if not r["checks"]:
            print(f"{command:<10} {label:<32} (no check)")
            continue
        at, need = r["checks"][-1]
        predicted = at + need
        mb = 2**20
        print(f"{command:<10} {label:<32} {at / mb:>7.0f}MB {need / mb:>7.0f}MB {predicted / mb:>8.0f}MB "
              f"{r['peak'] / mb:>6.0f}MB {predicted / r['peak']:>6.2f}", flush=True)


if __name__ == "__main__":
    main()

"""What other work does to the engine's batched step (charnn serve's decoding step): the bundled
model's `model.stepper(N).step` timed alone, beside a Python thread in the same process, and
beside a process, each busy all the time or in short bursts the way an event loop is, with one
BLAS thread and with the BLAS's own threads.

    flock /tmp/charnn-cpu.lock python benchmarks/serve_gil.py [--n 16] [--seconds 0.3] [--rounds 5]

A thread in the same process competes for the interpreter's lock: the step gives the lock up at
every BLAS product and compiled kernel, and must get it back from the other thread; a process
competes only for the cores. Prints the median microseconds a step over the rounds.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy  # noqa: E402

from charnn.engine.threads import blas_threads  # noqa: E402
from charnn.io.checkpoint import default_model_path, load_model  # noqa: E402

# Python a busy neighbour runs: always, or ~0.2 ms of work then ~0.8 ms asleep (about 20% of a
# core, what the server's event loop took at 16 streaming clients).
BUSY = "x = 0\nwhile not stop():\n    x += 1\n"
BURSTS = ("import time\nwhile not stop():\n    t = time.perf_counter()\n"
          "    while time.perf_counter() - t < 0.0002:\n        pass\n    time.sleep(0.0008)\n")


class Neighbour:
    """A thread or a process running ``code`` until stopped."""

    def __init__(self, kind: str, code: str):
        self.kind, self.code, self.done = kind, code, False

    def __enter__(self):
        if self.kind == "thread":
            self.th = threading.Thread(target=exec, args=(self.code, {"stop": lambda: self.done}), daemon=True)
            self.th.start()
        else:
            self.proc = subprocess.Popen([sys.executable, "-c", "stop = lambda: False\n" + self.code])
        return self

    def __exit__(self, *exc):
        self.done = True
        if self.kind == "thread":
            self.th.join()
        else:
            self.proc.kill()
            self.proc.wait()


def step_us(stepper, ids, seconds: float, rounds: int) -> float:
    for i in range(50):
        stepper.step(ids[i % len(ids)])
    found = []
    for _ in range(rounds):
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            stepper.step(ids[k % len(ids)])
            k += 1
        found.append(1e6 * (time.perf_counter() - t0) / k)
    return float(numpy.median(found))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16, help="streams in the step [16]")
    ap.add_argument("--seconds", type=float, default=0.3, help="seconds a round [0.3]")
    ap.add_argument("--rounds", type=int, default=5, help="rounds, the median shown [5]")
    args = ap.parse_args()
    model, vocab, _ = load_model(default_model_path())
    stepper = model.stepper(args.n)
    stepper._tuner = None  # the thread count is this benchmark's to set
    ids = numpy.random.default_rng(0).integers(0, len(vocab.tokens), (64, args.n))
    print(f"# bundled model, N={args.n}: microseconds a step (median of {args.rounds} rounds of {args.seconds} s)")
    print("| beside the step | one BLAS thread | the BLAS's threads |")
    print("|---|---:|---:|")
    cases = [("nothing", None, None), ("a thread, busy", "thread", BUSY), ("a thread, in bursts", "thread", BURSTS),
             ("a process, busy", "process", BUSY), ("a process, in bursts", "process", BURSTS)]
    for label, kind, code in cases:
        row = []
        for mode in (1, None):
            with blas_threads(mode, numpy):
                if kind is None:
                    row.append(step_us(stepper, ids, args.seconds, args.rounds))
                else:
                    with Neighbour(kind, code):
                        row.append(step_us(stepper, ids, args.seconds, args.rounds))
        print(f"| {label} | {row[0]:,.0f} | {row[1]:,.0f} |")


if __name__ == "__main__":
    main()
